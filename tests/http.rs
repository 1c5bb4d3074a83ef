//! The HTTP surface, scraped over a real socket: metrics, health, readiness, the query API.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lifecycle_scorer::codec::json::decode_event;
use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::Timestamp;
use lifecycle_scorer::http::{serve, OwnedShards, QueryState};
use lifecycle_scorer::metrics::Metrics;
use lifecycle_scorer::partition::partition_for;
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::state::new_shard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARTITIONS: u32 = 4;

fn fixed_now() -> Timestamp {
    parse_time_argument("2025-02-01").unwrap()
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn serves_metrics_health_readiness_and_contacts() {
    let config = Config::builtin().unwrap();
    let engine = Arc::new(config.engine);
    let metrics = Arc::new(Metrics::new().unwrap());
    let shards = Arc::new(OwnedShards::new(PARTITIONS));
    // This instance owns the partition of c1 only.
    let owned = partition_for(b"c1", PARTITIONS);
    let shard = Arc::new(new_shard(0));
    shards.insert(owned, shard.clone());
    let mut processor = Processor::new(engine.clone(), shard, config.processing);
    let mut out = Vec::new();
    for line in [
        r#"{"source":"clickstream","event_id":"e1","contact_id":"c1","occurred_at":"2025-01-01T00:00:00Z","type":"signup"}"#,
        r#"{"source":"purchase","event_id":"e2","contact_id":"c1","occurred_at":"2025-01-02T00:00:00Z","order_id":"o","amount":5,"currency":"EUR","status":"completed"}"#,
        r#"{"source":"purchase","event_id":"e3","contact_id":"c1","occurred_at":"2025-01-09T00:00:00Z","order_id":"p","amount":7,"currency":"EUR","status":"completed"}"#,
    ] {
        processor.process(&decode_event(line.as_bytes()).unwrap(), &mut out);
    }
    for change in &out {
        metrics.record_stage_change(change, &engine.model);
    }
    let ready = Arc::new(AtomicBool::new(false));
    let state = Arc::new(QueryState {
        engine: engine.clone(),
        shards,
        metrics,
        ready: ready.clone(),
        now: fixed_now,
        owners: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));

    assert_eq!(get(address, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(address, "/readyz").await.0, 503, "not ready until restored");
    ready.store(true, Ordering::Release);
    assert_eq!(get(address, "/readyz").await.0, 200);

    let (status, text) = get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"lifecycle_stage_transitions_total{from="customer",to="repeat_customer"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"lifecycle_contacts{stage="repeat_customer"} 1"#),
        "{text}"
    );

    let (status, body) = get(address, "/contacts/c1").await;
    assert_eq!(status, 200, "{body}");
    let contact: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(contact["contact_id"], "c1");
    assert_eq!(contact["stage"], "repeat_customer");
    assert_eq!(contact["partition"], owned);
    assert_eq!(contact["churn"]["source"], "bg_nbd");
    let risk = contact["churn"]["churn_risk"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&risk));
    assert!(contact["churn"]["p_alive"].as_f64().is_some());
    assert!(contact["churn"]["expected_purchases"].as_f64().is_some());
    // Entered repeat_customer on 2025-01-09, asked on 2025-02-01: 23 days.
    assert_eq!(contact["seconds_in_stage"], 23.0 * 86_400.0);

    let (status, body) = get(address, "/stages").await;
    assert_eq!(status, 200);
    let stages: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stages["contacts"], 1);
    let repeat = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stage| stage["stage"] == "repeat_customer")
        .unwrap();
    assert_eq!(repeat["contacts"], 1);

    // An unknown contact of an owned partition, and a contact owned elsewhere.
    let unknown = (0..1000)
        .map(|index| format!("x{index}"))
        .find(|id| partition_for(id.as_bytes(), PARTITIONS) == owned)
        .unwrap();
    assert_eq!(get(address, &format!("/contacts/{unknown}")).await.0, 404);
    let elsewhere = (0..1000)
        .map(|index| format!("y{index}"))
        .find(|id| partition_for(id.as_bytes(), PARTITIONS) != owned)
        .unwrap();
    let (status, body) = get(address, &format!("/contacts/{elsewhere}")).await;
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("\"partition\""));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
