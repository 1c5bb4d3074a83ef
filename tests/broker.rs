//! The real-broker harness, proved against tansu: topics (plain and compacted), keyed records
//! with headers on their Java (murmur2) partition, group commits and resume, broker restart.
//! If these fail, every service test on the broker would fail for reasons unrelated to the service.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::broker::{
    committed_offsets, consume_all, consume_in_group, consume_to_end, create_topics, end_offsets, produce,
    topic_configs, unique_name, ConsumedRecord, Record, Tansu, TopicSpec,
};
use lifecycle_scorer::partition::partition_for;

const PARTITIONS: i32 = 4;
const RECORDS: usize = 1_000;
/// Distinct keys: several records per key, so per-key order is exercised too.
const KEYS: usize = 150;
/// Generous: reading 1,000 records from tansu takes well under a second.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn key_of(index: usize) -> String {
    format!("contact-{}", index % KEYS)
}

/// Keyed records with a text header and a binary one (the sequence number, big-endian).
fn keyed_records() -> Vec<Record> {
    (0..RECORDS)
        .map(|index| {
            Record::new(key_of(index), format!(r#"{{"seq":{index}}}"#))
                .header("source", "clickstream")
                .header("seq", (index as u64).to_be_bytes())
        })
        .collect()
}

fn seq_of(record: &ConsumedRecord) -> usize {
    let header = record
        .headers
        .iter()
        .find(|(name, _)| name == "seq")
        .expect("seq header");
    u64::from_be_bytes(header.1.as_slice().try_into().unwrap()) as usize
}

async fn create_events_topic(broker: &Tansu) -> String {
    let topic = unique_name("events");
    create_topics(
        &broker.bootstrap(),
        &[TopicSpec {
            name: &topic,
            partitions: PARTITIONS,
            configs: &[],
        }],
    )
    .await;
    topic
}

#[tokio::test]
async fn keyed_records_round_trip_with_headers_on_their_murmur2_partition() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    let topic = create_events_topic(&broker).await;
    let records = keyed_records();

    let placements = produce(&bootstrap, &topic, &records).await;
    for (record, (partition, _offset)) in records.iter().zip(&placements) {
        let expected = partition_for(record.key.as_deref().unwrap(), PARTITIONS as u32) as i32;
        assert_eq!(*partition, expected, "acknowledged partition of {:?}", record.key);
    }

    let consumed = consume_all(&bootstrap, &topic, RECORDS, READ_TIMEOUT).await;
    assert_eq!(consumed.len(), RECORDS);
    let mut seen = BTreeSet::new();
    let mut last_seq_per_key: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for record in &consumed {
        let seq = seq_of(record);
        assert!(seen.insert(seq), "record {seq} read twice");
        let sent = &records[seq];
        assert_eq!(record.key, sent.key);
        assert_eq!(record.payload, sent.payload);
        assert_eq!(record.headers, sent.headers, "headers keep their order and bytes");
        let key = record.key.clone().unwrap();
        assert_eq!(
            record.partition,
            partition_for(&key, PARTITIONS as u32) as i32,
            "partition of {seq}"
        );
        assert_eq!(
            (record.partition, record.offset),
            placements[seq],
            "read where it was acknowledged"
        );
        assert!(
            record.timestamp.is_some_and(|millis| millis > 0),
            "record {seq} has a timestamp"
        );
        // consume_all orders by (partition, offset), and a key lives on one partition.
        if let Some(previous) = last_seq_per_key.insert(key, seq) {
            assert!(previous < seq, "per-key order: {previous} before {seq}");
        }
    }
    assert_eq!(last_seq_per_key.len(), KEYS);
    let ends = end_offsets(&bootstrap, &topic).await;
    assert_eq!(ends.len(), PARTITIONS as usize);
    assert_eq!(ends.values().sum::<i64>(), RECORDS as i64);
}

#[tokio::test]
async fn explicit_partition_overrides_the_partitioner() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    let topic = create_events_topic(&broker).await;
    let records: Vec<Record> = (0..PARTITIONS)
        .map(|partition| Record::new("same-key", "x").partition(partition))
        .collect();

    let placements = produce(&bootstrap, &topic, &records).await;
    assert_eq!(
        placements,
        (0..PARTITIONS).map(|partition| (partition, 0)).collect::<Vec<_>>()
    );
    let consumed = consume_all(&bootstrap, &topic, records.len(), READ_TIMEOUT).await;
    assert_eq!(
        consumed.iter().map(|record| record.partition).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
}

#[tokio::test]
async fn compacted_topic_keeps_the_latest_value_per_key() {
    const COMPACTED_KEYS: usize = 20;
    const VERSIONS: usize = 3;
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_name("changelog");
    create_topics(
        &bootstrap,
        &[TopicSpec {
            name: &topic,
            partitions: 2,
            configs: &[("cleanup.policy", "compact")],
        }],
    )
    .await;
    let configs = topic_configs(&bootstrap, &topic).await;
    assert_eq!(configs.get("cleanup.policy").map(String::as_str), Some("compact"));

    // Three versions of each key, then a tombstone for one of them.
    let mut records = Vec::new();
    for version in 0..VERSIONS {
        for key in 0..COMPACTED_KEYS {
            records.push(Record::new(format!("contact-{key}"), format!("state-{key}-v{version}")));
        }
    }
    records.push(Record::tombstone("contact-7"));
    produce(&bootstrap, &topic, &records).await;
    let latest_state = |consumed: &[ConsumedRecord]| -> BTreeMap<String, Option<String>> {
        consumed
            .iter()
            .map(|record| {
                let key = String::from_utf8(record.key.clone().unwrap()).unwrap();
                (
                    key,
                    record
                        .payload
                        .clone()
                        .map(|payload| String::from_utf8(payload).unwrap()),
                )
            })
            .collect()
    };
    let expected: BTreeMap<String, Option<String>> = (0..COMPACTED_KEYS)
        .map(|key| {
            let value = (key != 7).then(|| format!("state-{key}-v{}", VERSIONS - 1));
            (format!("contact-{key}"), value)
        })
        .collect();

    // Before and after compaction alike, the last record per key is the latest state.
    let before = consume_to_end(&bootstrap, &topic, READ_TIMEOUT).await;
    assert_eq!(latest_state(&before), expected);

    // tansu compacts on its maintenance tick (every 5 s here): older versions go, offsets stay,
    // the tombstone stays for now. Reading across the gaps this leaves makes tansu re-send
    // records; the helpers drop them by offset.
    let deadline = Instant::now() + Duration::from_secs(30);
    let compacted = loop {
        let consumed = consume_to_end(&bootstrap, &topic, READ_TIMEOUT).await;
        if consumed.len() == COMPACTED_KEYS {
            break consumed;
        }
        assert!(
            Instant::now() < deadline,
            "not compacted after 30 s: {} records left",
            consumed.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(latest_state(&compacted), expected);
    let ends = end_offsets(&bootstrap, &topic).await;
    assert_eq!(
        ends.values().sum::<i64>(),
        records.len() as i64,
        "compaction keeps offsets"
    );
}

#[tokio::test]
async fn consumer_group_resumes_from_its_committed_offsets() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    let topic = create_events_topic(&broker).await;
    produce(&bootstrap, &topic, &keyed_records()).await;
    let group = unique_name("scorer");
    const FIRST: usize = 400;

    let first = consume_in_group(&bootstrap, &group, &topic, FIRST, READ_TIMEOUT).await;
    assert_eq!(first.len(), FIRST);
    let mut next_per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    for record in &first {
        let next = next_per_partition.entry(record.partition).or_default();
        *next = (*next).max(record.offset + 1);
    }
    assert_eq!(committed_offsets(&bootstrap, &group, &topic).await, next_per_partition);

    // A new member of the same group starts exactly after the committed offsets.
    let rest = consume_in_group(&bootstrap, &group, &topic, RECORDS - FIRST, READ_TIMEOUT).await;
    assert_eq!(rest.len(), RECORDS - FIRST);
    for record in &rest {
        let committed = next_per_partition.get(&record.partition).copied().unwrap_or(0);
        assert!(
            record.offset >= committed,
            "{record:?} was before the committed offset {committed}"
        );
    }
    let all: BTreeSet<usize> = first.iter().chain(&rest).map(seq_of).collect();
    assert_eq!(all.len(), RECORDS, "every record exactly once across the two members");
    assert_eq!(
        committed_offsets(&bootstrap, &group, &topic).await,
        end_offsets(&bootstrap, &topic).await
    );
}

#[tokio::test]
async fn data_and_commits_survive_a_broker_restart() {
    let mut broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    let topic = create_events_topic(&broker).await;
    let records = keyed_records();
    produce(&bootstrap, &topic, &records[..RECORDS / 2]).await;
    let group = unique_name("scorer");
    let first = consume_in_group(&bootstrap, &group, &topic, RECORDS / 2, READ_TIMEOUT).await;
    assert_eq!(first.len(), RECORDS / 2);
    let committed = committed_offsets(&bootstrap, &group, &topic).await;

    broker.restart();
    assert_eq!(broker.bootstrap(), bootstrap, "a restart keeps the address");
    assert_eq!(committed_offsets(&bootstrap, &group, &topic).await, committed);
    produce(&bootstrap, &topic, &records[RECORDS / 2..]).await;
    let rest = consume_in_group(&bootstrap, &group, &topic, RECORDS / 2, READ_TIMEOUT).await;
    let seqs: BTreeSet<usize> = rest.iter().map(seq_of).collect();
    assert_eq!(seqs, (RECORDS / 2..RECORDS).collect());

    broker.kill();
    broker.restart();
    assert_eq!(
        consume_all(&bootstrap, &topic, RECORDS, READ_TIMEOUT).await.len(),
        RECORDS,
        "data survives SIGKILL"
    );
}
