//! Static membership against a real broker (tansu): an instance with a `group.instance.id` that
//! stops and comes back within its session timeout (a rolling restart, a rescheduled pod) gets
//! its partitions back without a rebalance: the other instance is neither revoked nor assigned
//! anything, and the returning one restores its shards from the changelog.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::broker::{produce, unique_name, Tansu};
use common::cluster::owned_partitions;
use common::oracle::avro_records;
use common::service::{create_service_topics, generated_events, service_config, sum_samples, RunningService, TOPICS};

const PARTITIONS: i32 = 4;

/// (partitions owned, assignments, revocations) of a running instance.
async fn membership(service: &RunningService) -> (BTreeSet<u32>, f64, f64) {
    let (_, metrics) = service.get("/metrics").await;
    (
        owned_partitions(&metrics),
        sum_samples(&metrics, "lifecycle_rebalances_total", &[r#"kind="assign""#]),
        sum_samples(&metrics, "lifecycle_rebalances_total", &[r#"kind="revoke""#]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_static_member_back_within_its_session_gets_its_partitions_without_a_rebalance() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    create_service_topics(&bootstrap, PARTITIONS).await;
    let events = generated_events(400, 60, 11);
    for (source, records) in avro_records(&events).iter().enumerate() {
        produce(&bootstrap, TOPICS[source], records).await;
    }
    let group = unique_name("static");
    let config = |instance: &str| {
        service_config(
            &bootstrap,
            &group,
            &format!(
                "[kafka.consumer_properties]\n\"group.instance.id\" = \"{instance}\"\n\
                 \"session.timeout.ms\" = \"30000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
                 [service]\nidle_timers = false\nidle_flush_ms = 500\n"
            ),
        )
    };
    let a = RunningService::start(config("pod-a")).await;
    let b = RunningService::start(config("pod-b")).await;
    a.wait_ready(Duration::from_secs(60)).await;
    b.wait_ready(Duration::from_secs(60)).await;

    // The two share the partitions and the group is settled.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (owned_a, owned_b) = loop {
        let ((owned_a, ..), (owned_b, ..)) = (membership(&a).await, membership(&b).await);
        if !owned_a.is_empty() && !owned_b.is_empty() && owned_a.len() + owned_b.len() == PARTITIONS as usize {
            break (owned_a, owned_b);
        }
        assert!(Instant::now() < deadline, "never split: {owned_a:?} {owned_b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (still_b, assigned_b, revoked_b) = membership(&b).await;
    assert_eq!(still_b, owned_b, "the group settled");

    // A stops (a static member does not leave the group) and comes back under its id.
    a.stop().await;
    let restarted = Instant::now();
    let a = RunningService::start(config("pod-a")).await;
    a.wait_ready(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let (owned, ..) = membership(&a).await;
        if owned == owned_a {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A did not get its partitions {owned_a:?} back within the session: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back_in = restarted.elapsed();
    let (_, metrics_a) = a.get("/metrics").await;
    assert!(
        sum_samples(&metrics_a, "lifecycle_restored_records_total", &[]) > 0.0,
        "A restored its shards"
    );
    // B saw no rebalance at all: nothing revoked, nothing assigned, same partitions.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (now_b, assigned_now, revoked_now) = membership(&b).await;
    assert_eq!(now_b, owned_b);
    assert_eq!(
        (assigned_now, revoked_now),
        (assigned_b, revoked_b),
        "B took part in no rebalance"
    );
    eprintln!("A back with partitions {owned_a:?} after {back_in:?}; B kept {owned_b:?} untouched");
    a.stop().await;
    b.stop().await;
}
