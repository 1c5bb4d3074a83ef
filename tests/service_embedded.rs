//! `run --embedded` as a newcomer runs it: the binary starts the in-process mock cluster,
//! feeds it, serves the endpoints, logs JSON, and stops with exit code 0 on SIGTERM.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::service::{http_get, sample, sum_samples, try_http_get};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_run_serves_the_endpoints_and_stops_cleanly_on_sigterm() {
    let port = free_port();
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lifecycle-scorer"))
        .args([
            "--log-json",
            "run",
            "--embedded",
            "--contacts",
            "400",
            "--partitions",
            "4",
            "--listen",
            &address.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Ready, and every fed record processed (the generated stream is a few thousand records).
    let deadline = Instant::now() + Duration::from_secs(90);
    let metrics = loop {
        assert!(Instant::now() < deadline, "not ready and caught up in time");
        assert!(child.try_wait().unwrap().is_none(), "the service exited early");
        if let Some((200, _)) = try_http_get(address, "/readyz").await {
            let (_, metrics) = http_get(address, "/metrics").await;
            let lag = sum_samples(&metrics, "lifecycle_consumer_lag_records", &[]);
            let consumed = sum_samples(&metrics, "lifecycle_events_consumed_total", &[]);
            if consumed > 2_000.0 && lag == 0.0 && metrics.contains("lifecycle_consumer_lag_records{") {
                break metrics;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(sample(&metrics, "lifecycle_ready"), Some(1.0));
    assert!(sum_samples(&metrics, "lifecycle_stage_transitions_total", &[]) > 0.0);
    assert!(
        sum_samples(
            &metrics,
            "lifecycle_records_produced_total",
            &[r#"topic="lifecycle.stage-changes""#]
        ) > 0.0
    );
    assert_eq!(http_get(address, "/healthz").await.0, 200);
    let (status, stages) = http_get(address, "/stages").await;
    assert_eq!(status, 200);
    let stages: serde_json::Value = serde_json::from_str(&stages).unwrap();
    assert!(stages.to_string().contains("customer"), "{stages}");

    // SIGTERM: drain, commit, exit 0 within the shutdown bound.
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(30),
            "no exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut logs = String::new();
    child.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(exit.success(), "exit {exit:?}; logs:\n{logs}");
    // Structured logs: one JSON object per line.
    let lines: Vec<&str> = logs.lines().filter(|line| !line.trim().is_empty()).collect();
    assert!(lines.len() > 3);
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        assert!(entry["level"].is_string() && entry["timestamp"].is_string(), "{line}");
    }
    assert!(
        logs.contains("termination signal received") && logs.contains("\"stopped\""),
        "{logs}"
    );
    // A healthy run logs no error (librdkafka's end-of-partition events are not errors).
    let errors: Vec<&&str> = lines
        .iter()
        .filter(|line| line.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(errors.is_empty(), "errors logged by a healthy run:\n{errors:#?}");
}
