//! The service on librdkafka's in-process mock cluster: two instances share the partitions of
//! one group and name each other as the owners of contacts they do not hold; when one stops
//! gracefully the other takes its partitions over where the changelog says: every record is
//! processed, none lost. A restarted instance restores its state, also when the group's
//! committed offsets are lost. A partition another instance still claims waits for the
//! release, or for the claim to lapse. Writer schemas come from a schema registry.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::{committed_offsets, consume_to_end, end_offsets};
use common::service::{
    canonical_changes, generated_events, replay_with_partitions, sample, service_config, sum_samples, RunningService,
    CHANGELOG, IDENTITY, TOPICS,
};
use lifecycle_scorer::codec::output::{shipped_input_schema_id, shipped_input_store, shipped_schema};
use lifecycle_scorer::domain::{ContactEvent, ContactKey, Source};
use lifecycle_scorer::partition::partition_for;
use lifecycle_scorer::state::codec::encode_key;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const PARTITIONS: i32 = 4;

/// A one-broker mock cluster with every topic of the service, [`PARTITIONS`] partitions each.
/// The mock broker has no admin API: the service's own topics are created here too.
fn mock_cluster() -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).unwrap();
    for topic in TOPICS.into_iter().chain([CHANGELOG, IDENTITY]) {
        cluster.create_topic(topic, PARTITIONS, 1).unwrap();
    }
    cluster
}

/// A producer to `bootstrap` with default settings.
fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap()
}

/// `events` as input records: (topic index, key, framed Avro).
fn records(events: &[ContactEvent]) -> Vec<(usize, Vec<u8>, Vec<u8>)> {
    let store = shipped_input_store().unwrap();
    events
        .iter()
        .map(|event| {
            let source = event.source();
            let key = event.key().unwrap().id.as_bytes().to_vec();
            (
                source.index(),
                key,
                store.encode(shipped_input_schema_id(source), event).unwrap(),
            )
        })
        .collect()
}

/// Writes one record to changelog partition 0 (`None`: a tombstone).
async fn write_changelog(bootstrap: &str, key: &[u8], value: Option<&[u8]>) {
    let producer = producer(bootstrap);
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(CHANGELOG).key(key).partition(0);
    if let Some(value) = value {
        record = record.payload(value);
    }
    producer.send(record, Duration::from_secs(10)).await.unwrap();
}

async fn feed(bootstrap: &str, records: &[(usize, Vec<u8>, Vec<u8>)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let mut deliveries = Vec::new();
    for (topic, key, payload) in records {
        let record = FutureRecord::to(TOPICS[*topic]).key(key).payload(payload);
        deliveries.push(producer.send_result(record).map_err(|(error, _)| error).unwrap());
    }
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }
}

async fn consumed(service: &RunningService) -> (f64, String) {
    let (_, metrics) = service.get("/metrics").await;
    // Input records only (not the service's own identity topic).
    let inputs = TOPICS[..3]
        .iter()
        .map(|topic| {
            sum_samples(
                &metrics,
                "lifecycle_events_consumed_total",
                &[&format!("topic=\"{topic}\"")],
            )
        })
        .sum();
    (inputs, metrics)
}

fn owned_partitions(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|line| line.starts_with("lifecycle_state_contacts{"))
        .count()
}

/// Whether the consumer-lag gauge (from the reader's statistics) names every input partition
/// and is 0 for each: every record up to the end offsets is finished. The counts alone can be
/// met early, as records read twice make up for some not read yet.
fn caught_up(metrics: &str) -> bool {
    TOPICS[..3].iter().all(|topic| {
        (0..PARTITIONS).all(|partition| {
            let series = format!("lifecycle_consumer_lag_records{{partition=\"{partition}\",topic=\"{topic}\"}}");
            sample(metrics, &series) == Some(0.0)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_instance_hands_its_partitions_over_without_losing_records() {
    let cluster = mock_cluster();
    let bootstrap = cluster.bootstrap_servers();
    let events = generated_events(1_500, 90, 3);
    let all = records(&events);
    let (first, second) = all.split_at(all.len() / 2);
    feed(&bootstrap, first).await;

    // The mock broker ignores a member's leave: a short session makes the takeover quick.
    let settings = "[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n\n[service]\nidle_timers = false\nidle_flush_ms = 200\nshutdown_timeout_seconds = 20\n";
    let a = RunningService::start(service_config(&bootstrap, "handover", settings)).await;
    let b = RunningService::start(service_config(&bootstrap, "handover", settings)).await;
    a.wait_ready(Duration::from_secs(60)).await;
    b.wait_ready(Duration::from_secs(60)).await;

    // Both instances own partitions, and together process the first half.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ((in_a, metrics_a), (in_b, metrics_b)) = (consumed(&a).await, consumed(&b).await);
        let split = owned_partitions(&metrics_a) + owned_partitions(&metrics_b) == PARTITIONS as usize
            && owned_partitions(&metrics_a) > 0
            && owned_partitions(&metrics_b) > 0;
        if split && in_a + in_b >= first.len() as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "first half not processed: {in_a} + {in_b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Asked about a contact of B's, A names B (from the instances topic).
    let (_, metrics_b) = consumed(&b).await;
    let owned_by_b: Vec<u32> = metrics_b
        .lines()
        .filter_map(|line| line.strip_prefix("lifecycle_state_contacts{partition=\""))
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect();
    // A known contact: anonymous visitors may have been merged into a contact elsewhere.
    let key = events[..first.len()]
        .iter()
        .filter_map(|event| event.contact_id.as_deref())
        .find(|key| owned_by_b.contains(&partition_for(key.as_bytes(), PARTITIONS as u32)))
        .unwrap();
    let (status, body) = a.get(&format!("/contacts/{key}")).await;
    assert_eq!(status, 421, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["owner"], format!("http://{}", b.address), "{body}");
    let (status, body) = b.get(&format!("/contacts/{key}")).await;
    assert_eq!(status, 200, "B holds it: {body}");

    let (in_a, metrics_a) = consumed(&a).await;
    let (_, before) = consumed(&b).await;
    let revoked_before = sum_samples(&before, "lifecycle_rebalances_total", &[r#"kind="revoke""#]);
    let assigned_before = sum_samples(&before, "lifecycle_rebalances_total", &[r#"kind="assign""#]);
    a.stop().await;
    // B takes A's partitions over from A's committed offsets and processes the rest.
    feed(&bootstrap, second).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Done when everything is read and nothing more gets processed for a while (the last
    // records wait for the idle flush).
    let mut last = (0.0, Instant::now());
    let (in_b, metrics_b) = loop {
        let (in_b, metrics_b) = consumed(&b).await;
        if in_b != last.0 {
            last = (in_b, Instant::now());
        }
        let settled = last.1.elapsed() > Duration::from_secs(1) && caught_up(&metrics_b);
        if settled && in_a + in_b >= all.len() as f64 && owned_partitions(&metrics_b) == PARTITIONS as usize {
            break (in_b, metrics_b);
        }
        assert!(
            Instant::now() < deadline,
            "not taken over: {in_a} + {in_b} of {}",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Cooperative rebalancing: B is given A's partitions and keeps its own throughout.
    assert!(sum_samples(&metrics_b, "lifecycle_rebalances_total", &[r#"kind="assign""#]) > assigned_before);
    assert_eq!(
        sum_samples(&metrics_b, "lifecycle_rebalances_total", &[r#"kind="revoke""#]),
        revoked_before,
        "B gave nothing up"
    );
    assert_eq!(sum_samples(&metrics_b, "lifecycle_dead_letters_total", &[]), 0.0);
    // Nothing is lost. B starts A's partitions where A's last changelog checkpoint says A
    // stopped: only inputs A held back for a merge still waiting are read again.
    let overlap = in_a + in_b - all.len() as f64;
    assert!(overlap >= 0.0, "records lost: {overlap}");
    eprintln!("records read twice: {overlap} of {}", all.len());
    assert!(overlap <= all.len() as f64 * 0.02, "{overlap} records read twice");
    assert_eq!(
        sum_samples(&metrics_a, "lifecycle_commit_failures_total", &[])
            + sum_samples(&metrics_b, "lifecycle_commit_failures_total", &[]),
        0.0,
        "commits of unassigned input partitions are accepted"
    );
    b.stop().await;
    for topic in &TOPICS[..3] {
        assert_eq!(
            committed_offsets(&bootstrap, "handover", topic).await,
            end_offsets(&bootstrap, topic).await,
            "{topic}: a graceful stop commits everything"
        );
    }
}

/// A schema registry that knows one evolved purchase schema, counting its requests.
async fn fake_registry(id: u32, schema: String) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let app = axum::Router::new().route(
        "/schemas/ids/{id}",
        axum::routing::get(move |axum::extract::Path(asked): axum::extract::Path<u32>| {
            let counted = counted.clone();
            let schema = schema.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if asked == id {
                    (
                        axum::http::StatusCode::OK,
                        serde_json::json!({ "schema": schema }).to_string(),
                    )
                } else {
                    (
                        axum::http::StatusCode::NOT_FOUND,
                        r#"{"error_code":40403,"message":"Schema not found"}"#.to_owned(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_schemas_come_from_the_registry_once_and_unknown_ids_are_dead_lettered() {
    let cluster = mock_cluster();
    let bootstrap = cluster.bootstrap_servers();
    // The upstream team added a field: a backward-compatible change under a new id.
    let mut evolved: serde_json::Value = serde_json::from_str(shipped_schema("purchase_event.avsc").unwrap()).unwrap();
    evolved["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "coupon", "type": ["null", "string"], "default": null}));
    let evolved = evolved.to_string();
    let (registry, requests) = fake_registry(42, evolved.clone()).await;

    let mut store = shipped_input_store().unwrap();
    store.insert(42, "evolved", &evolved).unwrap();
    let purchases: Vec<_> = generated_events(400, 60, 9)
        .into_iter()
        .filter(|event| event.source() == Source::Purchase)
        .collect();
    assert!(purchases.len() > 50);
    let mut records: Vec<(usize, Vec<u8>, Vec<u8>)> = purchases
        .iter()
        .map(|event| {
            (
                2,
                event.key().unwrap().id.as_bytes().to_vec(),
                store.encode(42, event).unwrap(),
            )
        })
        .collect();
    let mut unknown = store.encode(42, &purchases[0]).unwrap();
    unknown[1..5].copy_from_slice(&43u32.to_be_bytes());
    records.push((2, b"someone".to_vec(), unknown));
    feed(&bootstrap, &records).await;

    let settings = format!(
        "[schemas]\nregistry_url = \"http://{registry}\"\nregistry_timeout_ms = 2000\n\n[service]\nidle_timers = false\nidle_flush_ms = 200\n"
    );
    let service = RunningService::start(service_config(&bootstrap, "registry", &settings)).await;
    service.wait_ready(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (_, metrics) = service.get("/metrics").await;
        if sum_samples(&metrics, "lifecycle_events_consumed_total", &[]) as usize >= records.len() {
            break metrics;
        }
        assert!(Instant::now() < deadline, "not processed in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dead = sum_samples(
        &metrics,
        "lifecycle_decode_errors_total",
        &[r#"reason="unknown_schema_id""#],
    );
    assert_eq!(dead, 1.0, "the id the registry does not know is dead-lettered");
    let processed = sum_samples(&metrics, "lifecycle_events_consumed_total", &[r#"outcome="processed""#])
        + sum_samples(&metrics, "lifecycle_events_consumed_total", &[r#"outcome="duplicate""#]);
    assert_eq!(
        processed as usize,
        purchases.len(),
        "every record of the evolved schema decoded"
    );
    // Id 42 fetched once for all partitions (shared cache), id 43 once (remembered as unknown).
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    service.stop().await;
}

/// Waits until `service` has counted at least `records` inputs and nothing changed for a second.
async fn settle(service: &RunningService, records: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = (-1.0, Instant::now());
    loop {
        let (count, metrics) = consumed(service).await;
        if count != last.0 {
            last = (count, Instant::now());
        }
        if count as usize >= records && last.1.elapsed() > Duration::from_secs(1) {
            return metrics;
        }
        assert!(Instant::now() < deadline, "{count} of {records} records in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_instance_restores_its_state_and_goes_on_as_replay_would() {
    let cluster = mock_cluster();
    let bootstrap = cluster.bootstrap_servers();
    let events = generated_events(1_500, 120, 8);
    let records = records(&events);
    let (first, second) = records.split_at(records.len() / 2);
    // The mock broker ignores a member's leave: a short session makes the rejoin quick.
    let settings = concat!(
        "[kafka.consumer_properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
        "[service]\nidle_timers = false\nidle_flush_ms = 200\nmax_task_idle_ms = 10000\nchangelog_interval_ms = 100\n"
    );

    feed(&bootstrap, first).await;
    let a = RunningService::start(service_config(&bootstrap, "restart", settings)).await;
    a.wait_ready(Duration::from_secs(60)).await;
    settle(&a, first.len()).await;
    a.stop().await;

    // A new instance: its shards come back from the changelog before it reads on. One
    // changelog record is damaged: that partition's restore fails, is counted and tried again
    // while the instance stays unready, until the record is mended. Starting the partition
    // empty instead would lose its state and show in the comparison with replay below.
    feed(&bootstrap, second).await;
    let damaged = encode_key(&ContactKey::contact("damaged-in-transit"));
    write_changelog(&bootstrap, &damaged, Some(b"\xff not a state")).await;
    let b = RunningService::start(service_config(&bootstrap, "restart", settings)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = b.get("/metrics").await;
        if sum_samples(&metrics, "lifecycle_restore_failures_total", &[]) >= 2.0 {
            assert_eq!(sum_samples(&metrics, "lifecycle_restoring_partitions", &[]), 1.0);
            let (ready, _) = b.get("/readyz").await;
            assert_eq!(ready, 503, "not ready while a partition waits for its restore");
            break;
        }
        assert!(Instant::now() < deadline, "no failed restore seen:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write_changelog(&bootstrap, &damaged, None).await;
    b.wait_ready(Duration::from_secs(90)).await;
    let metrics = settle(&b, second.len()).await;
    assert!(sum_samples(&metrics, "lifecycle_restored_records_total", &[]) > 0.0);
    assert_eq!(sum_samples(&metrics, "lifecycle_restoring_partitions", &[]), 0.0);
    b.stop().await;

    // A topic that gets no new record keeps its position in the changelog. C reads one more
    // click and nothing else. The group's committed offsets are then lost (a crash before the
    // commit, offsets expired while the group was empty; here D joins a group without any,
    // which the mock cluster's refusal of commits from outside a group leaves as the way to
    // lose them). D goes on from the changelog's positions, every topic's, and reads nothing
    // again: were a topic's position missing from C's checkpoint, D would read that topic from
    // the start and count its records twice.
    let mut events = events;
    let mut late = events
        .iter()
        .rev()
        .find(|event| event.source() == Source::Clickstream && event.contact_id.is_some())
        .unwrap()
        .clone();
    late.event_id = "late-click".into();
    late.occurred_at = events
        .iter()
        .map(|event| event.occurred_at)
        .max()
        .unwrap()
        .plus_millis(60_000);
    feed(&bootstrap, &self::records(std::slice::from_ref(&late))).await;
    events.push(late);
    let c = RunningService::start(service_config(&bootstrap, "restart", settings)).await;
    c.wait_ready(Duration::from_secs(60)).await;
    settle(&c, 1).await;
    c.stop().await;
    let d = RunningService::start(service_config(&bootstrap, "restart-offsets-lost", settings)).await;
    d.wait_ready(Duration::from_secs(60)).await;
    // Reading from 0 would take a few milliseconds on the in-process cluster.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (read, metrics) = consumed(&d).await;
    assert_eq!(read, 0.0, "D read inputs again:\n{metrics}");
    d.stop().await;

    // Together they published exactly what one replay of everything gives: nothing lost,
    // nothing repeated, nothing contradictory after the restarts.
    let (expected, _) = replay_with_partitions(&events, PARTITIONS as u32);
    let published = consume_to_end(&bootstrap, TOPICS[3], Duration::from_secs(20)).await;
    let got = canonical_changes(&published);
    assert_eq!(got.len(), expected.len(), "as many stage changes as replay");
    assert!(got == expected, "the stage changes differ from replay's");
}

/// Writes to the instances topic what another instance's launch `holder` announces about
/// `partition`: that it holds it, or (`released`) that it has let it go.
async fn announce_elsewhere(bootstrap: &str, partition: u32, holder: &str, released: bool) {
    let producer = producer(bootstrap);
    let value =
        serde_json::json!({"owner": "http://elsewhere:8080", "holder": holder, "released": released}).to_string();
    let key = partition.to_string();
    let record = FutureRecord::to(TOPICS[6]).key(&key).payload(&value);
    producer.send(record, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_another_instance_holds_waits_for_its_release_or_its_lease() {
    let cluster = mock_cluster();
    let bootstrap = cluster.bootstrap_servers();
    const LEASE_MS: u64 = 3000;
    let settings = format!("[service]\nidle_timers = false\nownership_lease_ms = {LEASE_MS}\n");
    // Partition 0 is held by an instance that goes on renewing its claim, partition 1 by one
    // that stopped renewing (crashed) just before this instance starts.
    announce_elsewhere(&bootstrap, 1, "crashed", false).await;
    announce_elsewhere(&bootstrap, 0, "live", false).await;
    let service = RunningService::start(service_config(&bootstrap, "handover-wait", &settings)).await;
    let renew = || announce_elsewhere(&bootstrap, 0, "live", false);

    // Assigned every partition, it waits for partition 0.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        renew().await;
        let (_, metrics) = service.get("/metrics").await;
        if sum_samples(&metrics, "lifecycle_handover_waits_total", &[]) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no wait for partition 0:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Longer than the lease: the renewed claim keeps it waiting, the lapsed one does not.
    let until = Instant::now() + Duration::from_millis(LEASE_MS + 1500);
    while Instant::now() < until {
        renew().await;
        let (ready, _) = service.get("/readyz").await;
        assert_eq!(ready, 503, "ready while another instance holds partition 0");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, metrics) = service.get("/metrics").await;
    assert_eq!(
        sum_samples(&metrics, "lifecycle_restoring_partitions", &[]),
        1.0,
        "only partition 0 waits:\n{metrics}"
    );
    // Released: taken over at once, well before the last renewal would lapse.
    announce_elsewhere(&bootstrap, 0, "live", true).await;
    let released = Instant::now();
    service.wait_ready(Duration::from_millis(LEASE_MS * 2 / 3)).await;
    eprintln!("ready {:.2} s after the release", released.elapsed().as_secs_f64());
    service.stop().await;
}
