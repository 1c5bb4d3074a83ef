//! Deletion requests against a real broker (tansu): a tombstone on an input topic erases the
//! contact's state, writes a changelog tombstone and publishes a deletion record; the stage
//! changes equal those of `replay` given the same requests as deletion lines; after a restart
//! the restored state still lacks the contact, and a contact that comes back under the same id
//! starts afresh with ids of its own.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::broker::{consume_all, consume_to_end, produce, unique_name, Record, Tansu};
use common::oracle::avro_records;
use common::service::{
    assert_same_changes, create_service_topics, generated_events, replay_inputs_with_partitions, service_config,
    sum_samples, RunningService, CHANGELOG, TOPICS,
};
use lifecycle_scorer::domain::{ContactKey, Erasure, Input, Source, Timestamp};
use lifecycle_scorer::state::codec::encode_key;
use serde_json::Value;

const PARTITIONS: i32 = 4;
/// 2025-12-31T00:00:00Z: after every generated event.
const ERASED_AT: i64 = 1_767_139_200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstones_erase_contacts_for_good_and_replay_agrees() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    create_service_topics(&bootstrap, PARTITIONS).await;

    let events = generated_events(600, 120, 5);
    let per_topic = avro_records(&events);
    // Every 10th identified contact is erased, by a tombstone on one of the input topics.
    let identified: BTreeSet<&str> = events.iter().filter_map(|event| event.contact_id.as_deref()).collect();
    let erased: Vec<&str> = identified.iter().copied().step_by(10).collect();
    assert!(erased.len() >= 20, "only {} contacts to erase", erased.len());
    let mut tombstones: [Vec<Record>; 3] = Default::default();
    for (index, id) in erased.iter().enumerate() {
        tombstones[index % 3].push(Record::tombstone(id.as_bytes().to_vec()).timestamp(ERASED_AT));
    }

    let mut inputs: Vec<Input> = events.iter().cloned().map(Input::Event).collect();
    inputs.extend(
        erased
            .iter()
            .map(|id| Input::Erase(Erasure::tombstone(id, Timestamp::from_millis(ERASED_AT)))),
    );
    let (expected, final_states) = replay_inputs_with_partitions(&inputs, PARTITIONS as u32);
    let expected_deletions = expected
        .iter()
        .filter(|line| line.contains(r#""kind":"deletion""#))
        .count();
    assert_eq!(expected_deletions, erased.len(), "replay erases each contact once");
    for id in &erased {
        assert!(!final_states.contains_key(&ContactKey::contact(*id)));
    }

    let group = unique_name("deletion");
    let config = || {
        service_config(
            &bootstrap,
            &group,
            "[service]\nidle_timers = false\nidle_flush_ms = 500\nmax_task_idle_ms = 10000\n",
        )
    };
    // All events are in before the service starts, so it merges the three topics as replay
    // does; the requests come once those events have been processed.
    for (source, records) in per_topic.iter().enumerate() {
        produce(&bootstrap, TOPICS[source], records).await;
    }
    let service = RunningService::start(config()).await;
    service.wait_ready(Duration::from_secs(60)).await;
    let (before, _) = replay_inputs_with_partitions(&inputs[..events.len()], PARTITIONS as u32);
    consume_all(&bootstrap, TOPICS[3], before.len(), Duration::from_secs(180)).await;
    for (source, records) in tombstones.iter().enumerate() {
        produce(&bootstrap, TOPICS[source], records).await;
    }
    let published = consume_all(&bootstrap, TOPICS[3], expected.len(), Duration::from_secs(180)).await;
    assert_same_changes(&published, &expected);

    // The deletion records: keyed by the contact, from its last stage, no stage after.
    let deletions: Vec<Value> = published
        .iter()
        .map(|record| serde_json::from_str::<Value>(record.payload_str()).unwrap())
        .filter(|change| change["kind"] == "deletion")
        .collect();
    let deleted_ids: BTreeSet<&str> = deletions
        .iter()
        .map(|change| change["contact_id"].as_str().unwrap())
        .collect();
    assert_eq!(deleted_ids, erased.iter().copied().collect());
    for change in &deletions {
        assert!(
            change["to_stage"].is_null() && change["from_stage"].is_string(),
            "{change}"
        );
        assert_eq!(change["reason"], "deletion_request");
    }
    for id in &erased {
        let (status, body) = service.get(&format!("/contacts/{id}")).await;
        assert_eq!(status, 404, "{id}: {body}");
    }
    let (_, metrics) = service.get("/metrics").await;
    assert_eq!(
        sum_samples(&metrics, "lifecycle_contacts_deleted_total", &[]) as usize,
        erased.len()
    );
    assert_eq!(
        sum_samples(&metrics, "lifecycle_events_consumed_total", &[r#"outcome="deletion""#]) as usize,
        erased.len()
    );
    assert_eq!(
        sum_samples(&metrics, "lifecycle_contacts", &[]),
        sum_samples(&metrics, "lifecycle_state_contacts", &[]),
        "the per-stage gauge forgets erased contacts"
    );
    service.stop().await;

    // The changelog's last word on each erased contact is a tombstone.
    let changelog = consume_to_end(&bootstrap, CHANGELOG, Duration::from_secs(60)).await;
    let mut latest: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
    for record in &changelog {
        latest.insert(record.key.clone().unwrap(), record.payload.is_some());
    }
    for id in &erased {
        assert_eq!(latest.get(&encode_key(&ContactKey::contact(*id))), Some(&false), "{id}");
    }

    // A restarted instance restores without them, and one who comes back is a new contact.
    let service = RunningService::start(config()).await;
    service.wait_ready(Duration::from_secs(60)).await;
    for id in &erased {
        assert_eq!(service.get(&format!("/contacts/{id}")).await.0, 404, "{id} restored");
    }
    let kept = identified.iter().find(|id| !erased.contains(id)).unwrap();
    assert_eq!(service.get(&format!("/contacts/{kept}")).await.0, 200);
    let returning = erased[0];
    let comeback = events
        .iter()
        .find(|event| event.contact_id.as_deref() == Some(returning) && event.source() == Source::Clickstream)
        .cloned()
        .unwrap();
    let comeback = lifecycle_scorer::domain::ContactEvent {
        event_id: "comeback-1".into(),
        occurred_at: Timestamp::from_millis(ERASED_AT + 86_400_000),
        ..comeback
    };
    let [comeback_clicks, _, _] = avro_records(std::slice::from_ref(&comeback));
    produce(&bootstrap, TOPICS[0], &comeback_clicks).await;
    let all = consume_all(&bootstrap, TOPICS[3], expected.len() + 1, Duration::from_secs(60)).await;
    let fresh: Vec<Value> = all[..]
        .iter()
        .map(|record| serde_json::from_str::<Value>(record.payload_str()).unwrap())
        .filter(|change| change["trigger_event_id"] == "comeback-1")
        .collect();
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert_eq!(fresh[0]["seq"], 1, "a new contact: {}", fresh[0]);
    assert!(fresh[0]["from_stage"].is_null());
    let old_ids: BTreeSet<String> = published
        .iter()
        .map(|record| serde_json::from_str::<Value>(record.payload_str()).unwrap()["event_id"].to_string())
        .collect();
    assert!(
        !old_ids.contains(&fresh[0]["event_id"].to_string()),
        "never an id of the erased contact's"
    );
    assert_eq!(service.get(&format!("/contacts/{returning}")).await.0, 200);
    service.stop().await;
}
