//! The oracle for tests that crash, move or cut off the service: what it published, after
//! dropping the copies a crash may repeat (same `event_id`), must equal what `replay` gives
//! for the same events, and no `event_id` may carry two different payloads.
//!
//! It also shapes input that can be produced while the service runs without changing the
//! answer. Within a partition the service merges its three input topics in event-time order,
//! but an input it has read to the end is not waited for: records produced to one topic after
//! the service caught up are processed before those still on their way to another topic, as a
//! live service must. A stream produced topic after topic while consumed would therefore be
//! processed in another order than `replay` reads it. [`split_live_tail`] cuts a stream into a
//! bulk, produced before any instance starts, and a tail of clickstream events only, all later
//! than the bulk, which may be produced at any moment: one topic, in time order, keeps the
//! order whatever the timing.

use std::collections::BTreeMap;

use lifecycle_scorer::codec::output::{shipped_input_schema_id, shipped_input_store};
use lifecycle_scorer::domain::{ContactEvent, Source, Timestamp};

use super::broker::{ConsumedRecord, Record};
use super::service::canonical_changes;

/// Splits a stream at the time of the event `fraction` of the way through: the bulk is every
/// event before that time, of every source; the tail keeps only the clickstream events from
/// that time on (the other sources' later events are left out of the test's input
/// altogether, and so out of the replay it is compared with). Both keep the stream's order;
/// every tail event is later than every bulk event (generated streams are sorted by time but
/// for a few late and re-sent events, which stay on their side of the cut by their own time).
pub fn split_live_tail(events: Vec<ContactEvent>, fraction: f64) -> (Vec<ContactEvent>, Vec<ContactEvent>) {
    let cut = ((events.len() as f64 * fraction) as usize).min(events.len().saturating_sub(1));
    let boundary = events[cut].occurred_at;
    let (bulk, later): (Vec<ContactEvent>, Vec<ContactEvent>) =
        events.into_iter().partition(|event| event.occurred_at < boundary);
    let tail = later
        .into_iter()
        .filter(|event| event.source() == Source::Clickstream)
        .collect();
    (bulk, tail)
}

/// Cuts a tail into `chunks` consecutive pieces of about equal size, only where every event
/// after the cut is strictly later than every event before it. The service may process one
/// piece completely before the next arrives; `replay` reads them in one go and holds events in
/// its reorder buffer across the cut: with such cuts both see the same order. (Fewer pieces
/// when there are not enough such places.)
pub fn chunks_at_clean_cuts(events: &[ContactEvent], chunks: usize) -> Vec<&[ContactEvent]> {
    // clean[i]: a cut before event i is clean.
    let mut suffix_min = vec![Timestamp::NEVER; events.len() + 1];
    for index in (0..events.len()).rev() {
        suffix_min[index] = suffix_min[index + 1].min(events[index].occurred_at);
    }
    let mut clean = vec![false; events.len() + 1];
    let mut prefix_max = Timestamp::MIN_VALID;
    for index in 1..events.len() {
        prefix_max = prefix_max.max(events[index - 1].occurred_at);
        clean[index] = prefix_max < suffix_min[index];
    }
    let mut pieces = Vec::with_capacity(chunks);
    let mut start = 0;
    for chunk in 1..chunks {
        let Some(end) = (events.len() * chunk / chunks..events.len()).find(|index| *index > start && clean[*index])
        else {
            break;
        };
        pieces.push(&events[start..end]);
        start = end;
    }
    pieces.push(&events[start..]);
    pieces
}

/// A clickstream-only tail as the Avro records of each of its pieces cut by
/// [`chunks_at_clean_cuts`], to be produced one piece at a time while the service runs.
pub fn clickstream_chunks(tail: &[ContactEvent], chunks: usize) -> Vec<Vec<Record>> {
    chunks_at_clean_cuts(tail, chunks)
        .into_iter()
        .map(|chunk| {
            let [clicks, others @ ..] = avro_records(chunk);
            assert!(others.iter().all(Vec::is_empty), "the tail is clickstream only");
            clicks
        })
        .collect()
}

/// The events as input records, Confluent-framed Avro keyed by contact (or anonymous) id, one
/// list per input topic in [`Source::index`] order, each in the events' order.
pub fn avro_records(events: &[ContactEvent]) -> [Vec<Record>; 3] {
    let store = shipped_input_store().expect("the shipped input schemas");
    let mut per_topic: [Vec<Record>; 3] = Default::default();
    for event in events {
        let source = event.source();
        let payload = store
            .encode(shipped_input_schema_id(source), event)
            .expect("encode an event as Avro");
        let key = event.key().expect("generated events have a key");
        per_topic[source.index()].push(Record::new(key.id.as_bytes().to_vec(), payload));
    }
    per_topic
}

/// A stage change published more than once.
#[derive(Debug, Clone)]
pub struct Repeated {
    pub event_id: String,
    /// Create (or append) times of every copy, in log order, milliseconds since the epoch.
    pub timestamps: Vec<Option<i64>>,
}

/// What [`check_against_replay`] found.
#[derive(Debug, Default)]
pub struct OracleReport {
    /// Records on the stage-change topic.
    pub records: usize,
    /// Distinct `event_id`s.
    pub distinct: usize,
    /// Records beyond the first of their `event_id` (`records - distinct`).
    pub duplicates: usize,
    /// Every repeated `event_id`, with its copies' times.
    pub repeated: Vec<Repeated>,
}

/// Checks published stage changes against `expected` (from `replay_with_partitions`): no
/// `event_id` with two different payloads; after keeping one record per `event_id`, exactly
/// the expected multiset, nothing missing and nothing extra. Panics with examples otherwise.
pub fn check_against_replay(published: &[ConsumedRecord], expected: &[String]) -> OracleReport {
    // Per event_id: the first record, then the copies (same key, so same partition: offsets
    // give the order they were written in).
    let mut by_id: BTreeMap<String, Vec<&ConsumedRecord>> = BTreeMap::new();
    for record in published {
        let change: serde_json::Value = serde_json::from_str(record.payload_str()).unwrap_or_else(|error| {
            panic!(
                "stage change at {}:{} is not JSON: {error}",
                record.partition, record.offset
            )
        });
        let event_id = change["event_id"]
            .as_str()
            .unwrap_or_else(|| panic!("stage change without event_id: {}", record.payload_str()))
            .to_owned();
        by_id.entry(event_id).or_default().push(record);
    }
    let mut conflicts = Vec::new();
    let mut repeated = Vec::new();
    let mut firsts = Vec::with_capacity(by_id.len());
    for (event_id, copies) in &by_id {
        let mut copies = copies.clone();
        copies.sort_by_key(|record| (record.partition, record.offset));
        let first = copies[0];
        for other in &copies[1..] {
            if other.payload != first.payload || other.key != first.key {
                conflicts.push(format!(
                    "{event_id}:\n  {}:{} {}\n  {}:{} {}",
                    first.partition,
                    first.offset,
                    first.payload_str(),
                    other.partition,
                    other.offset,
                    other.payload_str()
                ));
            }
        }
        if copies.len() > 1 {
            repeated.push(Repeated {
                event_id: event_id.clone(),
                timestamps: copies.iter().map(|record| record.timestamp).collect(),
            });
        }
        firsts.push(first.clone());
    }
    assert!(
        conflicts.is_empty(),
        "{} event_ids carry different payloads (first 5):\n{}",
        conflicts.len(),
        conflicts[..conflicts.len().min(5)].join("\n")
    );
    let got = canonical_changes(&firsts);
    if got != expected {
        let (missing, extra) = multiset_difference(expected, &got);
        panic!(
            "after dedupe by event_id: {} stage changes published, replay gives {}; {} missing, {} extra\n\
             missing (first 5): {:#?}\nextra (first 5): {:#?}",
            got.len(),
            expected.len(),
            missing.len(),
            extra.len(),
            &missing[..missing.len().min(5)],
            &extra[..extra.len().min(5)]
        );
    }
    OracleReport {
        records: published.len(),
        distinct: by_id.len(),
        duplicates: published.len() - by_id.len(),
        repeated,
    }
}

/// `(expected - got, got - expected)` of two sorted lists, as multisets.
fn multiset_difference<'a>(expected: &'a [String], got: &'a [String]) -> (Vec<&'a String>, Vec<&'a String>) {
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < expected.len() || j < got.len() {
        match (expected.get(i), got.get(j)) {
            (Some(want), Some(have)) if want == have => {
                i += 1;
                j += 1;
            }
            (Some(want), Some(have)) if want < have => {
                missing.push(want);
                i += 1;
            }
            (Some(_), Some(have)) => {
                extra.push(have);
                j += 1;
            }
            (Some(want), None) => {
                missing.push(want);
                i += 1;
            }
            (None, Some(have)) => {
                extra.push(have);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (missing, extra)
}

/// Every record of the stage-change topic, checked to be all of it (as many as the end
/// offsets say), for [`check_against_replay`].
pub async fn read_all_stage_changes(bootstrap: &str, timeout: std::time::Duration) -> Vec<ConsumedRecord> {
    let topic = super::service::TOPICS[3];
    let ends = super::broker::end_offsets(bootstrap, topic).await;
    let published = super::broker::consume_to_end(bootstrap, topic, timeout).await;
    assert_eq!(
        published.len() as i64,
        ends.values().sum::<i64>(),
        "the whole stage-change topic was read"
    );
    published
}
