//! The service through a broker outage: the broker (tansu) goes down for 15 s while the
//! service is in the middle of its input. `/readyz` must turn 503 while no broker is reachable
//! and 200 again once the broker is back, without the service being restarted; the rest of
//! the input, produced after the broker's return, is processed too, and the stage changes
//! published, after dropping repeated `event_id`s, are exactly what `replay` gives for the same
//! events (and no `event_id` carries two payloads). The run prints how long readiness took to
//! turn red and green again.
//!
//! The input is cut as in the chaos test (`common::oracle`): the first half of a generated
//! stream (every source) is produced before the service starts; the second half's clickstream
//! is then streamed in chunks, part of it before the outage, the rest after.
//!
//! The broker is taken down with SIGKILL, not SIGTERM: tansu 0.6.0 stopped gracefully while
//! clients are busy shuts its storage down before its listeners (requests fail with
//! `SendError` meanwhile, and its group coordinator panics), and after the restart it panics
//! on the next idempotent produce (`tansu-storage` `lite.rs:503`, "more or less than one row"),
//! after which every request fails. Killed, it comes back sound, and a crash is the harder
//! outage for the service anyway: nothing is closed cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::broker::{produce, unique_name, Record, Tansu};
use common::cluster::{describe_lag, total_lag, uncommitted};
use common::oracle::{avro_records, check_against_replay, clickstream_chunks, read_all_stage_changes, split_live_tail};
use common::service::{
    create_service_topics, generated_events, replay_with_partitions, service_config, sum_samples, RunningService,
    TOPICS,
};
use lifecycle_scorer::domain::ContactEvent;

const PARTITIONS: i32 = 4;
const OUTAGE: Duration = Duration::from_secs(15);
/// The streamed clickstream: chunks, how many go out before the outage, and their pace.
const CHUNKS: usize = 30;
const CHUNKS_BEFORE: usize = 10;
const PACE: Duration = Duration::from_millis(400);

/// Settings beyond broker and group.
///
/// - `max_task_idle_ms` longer than the outage and the recovery: a partition task waits for an
///   input with nothing buffered that is not read to its end, instead of merging the others
///   past it (allowed after the bound, as in Kafka Streams, but then the order differs from
///   `replay`'s).
/// - Timers on event time only, as `replay`. Session timeout and reconnection are the
///   service's defaults.
const SETTINGS: &str = r#"
[service]
idle_timers = false
idle_flush_ms = 500
max_task_idle_ms = 120000
"#;

/// Produces the chunks one after the other, one every [`PACE`].
async fn stream(bootstrap: &str, chunks: Vec<Vec<Record>>) {
    for chunk in chunks {
        let next = Instant::now() + PACE;
        produce(bootstrap, TOPICS[0], &chunk).await;
        tokio::time::sleep_until(next.into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_turns_readiness_red_and_the_service_recovers_by_itself() {
    let began = Instant::now();
    let mut broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    create_service_topics(&bootstrap, PARTITIONS).await;

    let (bulk, tail) = split_live_tail(generated_events(4_000, 180, 21), 0.5);
    let all: Vec<ContactEvent> = bulk.iter().chain(&tail).cloned().collect();
    let (expected, _) = replay_with_partitions(&all, PARTITIONS as u32);
    let [clicks, conversions, purchases] = avro_records(&bulk);
    tokio::join!(
        produce(&bootstrap, TOPICS[0], &clicks),
        produce(&bootstrap, TOPICS[1], &conversions),
        produce(&bootstrap, TOPICS[2], &purchases),
    );
    let mut chunks: Vec<Vec<Record>> = clickstream_chunks(&tail, CHUNKS);
    assert!(chunks.len() > CHUNKS_BEFORE, "only {} chunks", chunks.len());
    let after = chunks.split_off(CHUNKS_BEFORE);
    eprintln!(
        "{} events ({} before the service starts, {} clickstream streamed: {} chunks before the outage, {} after), \
         {PARTITIONS} partitions; replay gives {} stage changes",
        all.len(),
        bulk.len(),
        tail.len(),
        chunks.len(),
        after.len(),
        expected.len()
    );

    let group = unique_name("outage");
    let service = RunningService::start(service_config(&bootstrap, &group, SETTINGS)).await;
    service.wait_ready(Duration::from_secs(60)).await;
    stream(&bootstrap, chunks).await;

    // The outage, right after the last chunk before it: the broker goes down at once, as in a
    // crash (see the module docs for why not SIGTERM), and stays down for OUTAGE.
    let (_, metrics) = service.get("/metrics").await;
    let consumed = sum_samples(&metrics, "lifecycle_events_consumed_total", &[]) as usize;
    broker.kill();
    let down = Instant::now();
    eprintln!("broker killed with {consumed} records consumed");
    let mut first_red: Option<Instant> = None;
    let mut green_after_red = 0;
    let mut last_green: Option<Instant> = None;
    while down.elapsed() < OUTAGE {
        let (status, _) = service.get("/readyz").await;
        match (status, first_red) {
            (503, None) => first_red = Some(Instant::now()),
            (200, Some(_)) => green_after_red += 1,
            (200, None) => last_green = Some(Instant::now()),
            _ => {}
        }
        assert!(service.is_running(), "the service stopped during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = service.get("/metrics").await;
    let red_at = first_red.unwrap_or_else(|| {
        panic!(
            "/readyz answered 200 for the whole outage ({OUTAGE:?} with the broker down; last 200 {:.1} s after it went down)",
            last_green.map_or(0.0, |at| (at - down).as_secs_f64())
        )
    });
    assert_eq!(green_after_red, 0, "/readyz went back to 200 while the broker was down");
    assert_eq!(
        sum_samples(&metrics, "lifecycle_ready", &[]),
        0.0,
        "lifecycle_ready during the outage"
    );

    broker.restart();
    let up = Instant::now();
    // The rest of the stream, while the service finds the broker again.
    let streaming = tokio::spawn({
        let bootstrap = bootstrap.clone();
        async move { stream(&bootstrap, after).await }
    });
    let deadline = up + Duration::from_secs(120);
    let green_at = loop {
        if service.get("/readyz").await.0 == 200 {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still 503 two minutes after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    streaming.await.expect("streaming the rest failed");

    // Everything is processed and committed, by the same service.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let lag = uncommitted(&bootstrap, &group, &TOPICS[..3]).await;
        if total_lag(&lag) == 0 {
            break;
        }
        assert!(service.is_running(), "the service stopped after the outage");
        assert!(
            Instant::now() < deadline,
            "input not all committed 3 minutes after the outage; uncommitted: {}",
            describe_lag(&lag)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let done = Instant::now();
    let (status, metrics) = service.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sum_samples(&metrics, "lifecycle_dead_letters_total", &[]), 0.0);

    let published = read_all_stage_changes(&bootstrap, Duration::from_secs(120)).await;
    let report = check_against_replay(&published, &expected);

    eprintln!("---- outage report ----");
    eprintln!(
        "/readyz 503 {:.1} s after the broker went down (polled every 0.1 s); 200 again {:.1} s after it was back",
        (red_at - down).as_secs_f64(),
        (green_at - up).as_secs_f64()
    );
    eprintln!(
        "all input committed {:.1} s after the broker was back; stage changes: {} records, {} distinct, {} duplicates",
        (done - up).as_secs_f64(),
        report.records,
        report.distinct,
        report.duplicates
    );
    eprintln!(
        "rebalances {}, commit failures {}, output retries {}, inputs skipped as already restored {}; wall time {:.1} s",
        sum_samples(&metrics, "lifecycle_rebalances_total", &[]) as u64,
        sum_samples(&metrics, "lifecycle_commit_failures_total", &[]) as u64,
        sum_samples(&metrics, "lifecycle_output_retries_total", &[]) as u64,
        sum_samples(&metrics, "lifecycle_events_consumed_total", &[r#"outcome="restored""#]) as u64,
        began.elapsed().as_secs_f64()
    );
    let took = service.stop().await;
    assert!(took < Duration::from_secs(30), "stop took {took:?}");
}
