//! The service against a real broker (tansu): the oracle test (the stage changes `run`
//! publishes equal those `replay` gives for the same events), conversions, metrics scraped over
//! HTTP, and a graceful stop that commits everything.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::broker::{
    committed_offsets, consume_all, consume_to_end, end_offsets, produce, topic_configs, unique_name, Record, Tansu,
};
use common::service::{
    canonical_changes, create_service_topics, generated_events, replay_with_partitions, service_config, sum_samples,
    RunningService, CHANGELOG, TOPICS,
};
use lifecycle_scorer::attribution::{normalise_email, sha256_hex};
use lifecycle_scorer::codec::output::{shipped_input_schema_id, shipped_input_store};
use lifecycle_scorer::domain::{ContactEvent, ContactKey, ContactState, EventBody, PurchaseStatus, Source};
use lifecycle_scorer::state::codec::{
    decode_checkpoint, decode_key, decode_state, Checkpoint, CHECKPOINT_KEY, HANDOVER_KIND, WRITE_BEGUN_KEY,
};
use serde_json::Value;

const PARTITIONS: i32 = 4;
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_publishes_exactly_what_replay_gives_and_commits_everything() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    create_service_topics(&bootstrap, PARTITIONS).await;

    let events = generated_events(3_000, 120, 11);
    assert!(events.len() >= 20_000, "only {} events", events.len());
    let store = shipped_input_store().unwrap();
    let mut per_topic: [Vec<Record>; 3] = Default::default();
    for event in &events {
        let source = event.source();
        let payload = store.encode(shipped_input_schema_id(source), event).unwrap();
        per_topic[source.index()].push(Record::new(event.key().unwrap().id.as_bytes().to_vec(), payload));
    }
    for (source, records) in per_topic.iter().enumerate() {
        produce(&bootstrap, TOPICS[source], records).await;
    }
    let (expected, final_states) = replay_with_partitions(&events, PARTITIONS as u32);
    assert!(expected.len() > 5_000, "only {} stage changes", expected.len());

    let group = unique_name("oracle");
    let config = service_config(
        &bootstrap,
        &group,
        // Timers on event time only, as replay; wait for every topic of a partition before
        // merging, as the three topics reach the broker one after the other.
        "[service]\nidle_timers = false\nidle_flush_ms = 500\nmax_task_idle_ms = 10000\n",
    );
    let service = RunningService::start(config).await;
    service.wait_ready(Duration::from_secs(60)).await;

    // An independent consumer reads the output topic.
    let published = consume_all(&bootstrap, TOPICS[3], expected.len(), Duration::from_secs(300)).await;
    let got = canonical_changes(&published);
    if got != expected {
        let got_set: BTreeSet<&String> = got.iter().collect();
        let expected_set: BTreeSet<&String> = expected.iter().collect();
        let missing: Vec<&&String> = expected_set.difference(&got_set).take(5).collect();
        let extra: Vec<&&String> = got_set.difference(&expected_set).take(5).collect();
        panic!(
            "published {} stage changes, replay gives {}\nmissing (first 5): {missing:#?}\nextra (first 5): {extra:#?}",
            got.len(),
            expected.len()
        );
    }
    // Keyed by contact, so a consumer of the topic sees each contact's changes in order.
    for record in &published {
        let change: Value = serde_json::from_str(record.payload_str()).unwrap();
        let id = change["contact_id"]
            .as_str()
            .or(change["anonymous_id"].as_str())
            .unwrap();
        assert_eq!(record.key.as_deref(), Some(id.as_bytes()));
    }

    // Metrics, scraped over HTTP.
    let (status, metrics) = service.get("/metrics").await;
    assert_eq!(status, 200);
    let consumed: f64 = TOPICS[..3]
        .iter()
        .map(|topic| {
            sum_samples(
                &metrics,
                "lifecycle_events_consumed_total",
                &[&format!(r#"topic="{topic}""#)],
            )
        })
        .sum();
    assert_eq!(consumed as usize, events.len(), "every record counted once");
    // Merge records (a visitor handed to its contact) are stage-change records, not
    // transitions: `lifecycle_contacts_merged_total` counts them.
    let transitions = sum_samples(&metrics, "lifecycle_stage_transitions_total", &[]);
    let merges = expected
        .iter()
        .filter(|line| line.contains(r#""kind":"merge""#))
        .count();
    assert!(merges > 0, "the generated stream has sign-ups of anonymous visitors");
    assert_eq!(transitions as usize, expected.len() - merges);
    assert_eq!(
        sum_samples(&metrics, "lifecycle_contacts_merged_total", &[]) as usize,
        merges
    );
    let produced = sum_samples(
        &metrics,
        "lifecycle_records_produced_total",
        &[r#"topic="lifecycle.stage-changes""#],
    );
    assert_eq!(produced as usize, expected.len());
    assert_eq!(sum_samples(&metrics, "lifecycle_dead_letters_total", &[]), 0.0);
    assert_eq!(sum_samples(&metrics, "lifecycle_ready", &[]), 1.0);
    let contacts = sum_samples(&metrics, "lifecycle_contacts", &[]);
    let state = sum_samples(&metrics, "lifecycle_state_contacts", &[]);
    assert_eq!(contacts, state, "contacts per stage add up to the contacts held");
    assert!(sum_samples(&metrics, "lifecycle_record_latency_seconds_count", &[]) >= events.len() as f64);
    assert!(metrics.contains(r#"lifecycle_consumer_lag_records{partition="0",topic="purchases"}"#));
    assert!(metrics.contains("lifecycle_churn_risk_bucket"));

    // The query API answers for a contact with a purchase.
    let buyer = events
        .iter()
        .find_map(|event| match &event.body {
            EventBody::Purchase(purchase) if purchase.status == PurchaseStatus::Completed => event.contact_id.clone(),
            _ => None,
        })
        .unwrap();
    let (status, body) = service.get(&format!("/contacts/{buyer}")).await;
    assert_eq!(status, 200, "{body}");
    let contact: Value = serde_json::from_str(&body).unwrap();
    assert!(contact["stage"].is_string(), "{body}");
    let (status, _) = service.get("/contacts/nobody-at-all").await;
    assert_eq!(status, 404);

    check_conversions(&bootstrap, &events).await;

    // A graceful stop commits every input offset: a restart would read nothing again.
    let took = service.stop().await;
    assert!(took < Duration::from_secs(30), "stop took {took:?}");
    for topic in &TOPICS[..3] {
        let committed = committed_offsets(&bootstrap, &group, topic).await;
        let ends = end_offsets(&bootstrap, topic).await;
        assert_eq!(committed, ends, "{topic}: committed offsets are the end offsets");
    }
    check_changelog(&bootstrap, &final_states).await;
}

/// The changelog the service created (compacted, one partition per input partition) holds, as
/// each contact's latest record, exactly the state replay ends with, and its last checkpoint on
/// every partition says every input was processed.
async fn check_changelog(bootstrap: &str, final_states: &BTreeMap<ContactKey, ContactState>) {
    let configs = topic_configs(bootstrap, CHANGELOG).await;
    assert_eq!(configs.get("cleanup.policy").map(String::as_str), Some("compact"));
    let records = consume_to_end(bootstrap, CHANGELOG, Duration::from_secs(120)).await;
    let mut latest: BTreeMap<Vec<u8>, &Option<Vec<u8>>> = BTreeMap::new();
    let mut checkpoints: BTreeMap<i32, Checkpoint> = BTreeMap::new();
    let mut handovers = 0;
    for record in &records {
        let key = record.key.clone().unwrap();
        if key == CHECKPOINT_KEY {
            checkpoints.insert(
                record.partition,
                decode_checkpoint(record.payload.as_deref().unwrap()).unwrap(),
            );
        } else if key.first() == Some(&HANDOVER_KIND) {
            handovers += 1;
        } else if key == WRITE_BEGUN_KEY {
            // Opens each write; its checkpoint is the one that closes it.
        } else {
            latest.insert(key, &record.payload);
        }
    }
    // Visitors merged into a contact left a tombstone where their state was.
    latest.retain(|_, value| value.is_some());
    assert_eq!(latest.len(), final_states.len(), "one live contact record per contact");
    for (key, value) in latest {
        let contact = decode_key(&key).unwrap();
        let mut state = decode_state(value.as_deref().unwrap()).unwrap();
        let expected = final_states.get(&contact).unwrap();
        // The time a state was last advanced to depends on when the partition's sweeps ran,
        // and with identity merge on a contact that waited for a merge shifts the sweeps of
        // its partition: it is bookkeeping (everything published is compared exactly above).
        state.clock = expected.clock;
        assert_eq!(&state, expected, "{contact:?}");
    }
    assert!(
        handovers > 0,
        "identity merge is on by default: visitors were handed over"
    );
    assert_eq!(
        checkpoints.len(),
        PARTITIONS as usize,
        "a checkpoint on every partition"
    );
    for (source, topic) in TOPICS[..3].iter().enumerate() {
        let ends = end_offsets(bootstrap, topic).await;
        for (partition, checkpoint) in &checkpoints {
            assert_eq!(
                checkpoint[source].position,
                ends.get(partition).copied(),
                "{topic} {partition}"
            );
            assert!(checkpoint[source].above.is_empty());
        }
    }
}

/// Conversion records of completed purchases carry the order id as dedup id, the hashed email
/// and external id, and the click ids captured from the contact's clickstream.
async fn check_conversions(bootstrap: &str, events: &[ContactEvent]) {
    let purchases: Vec<&ContactEvent> = events
        .iter()
        .filter(|event| matches!(&event.body, EventBody::Purchase(purchase) if purchase.status == PurchaseStatus::Completed))
        .collect();
    assert!(!purchases.is_empty());
    let records = consume_to_end(bootstrap, TOPICS[4], Duration::from_secs(60)).await;
    let mut by_order: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in &records {
        let value: Value = serde_json::from_str(record.payload_str()).unwrap();
        by_order
            .entry(value["event_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(value);
    }
    // Identifiers each contact's (identified) clickstream carried: checkable when unambiguous.
    let mut emails: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut fbcs: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for event in events {
        if let (EventBody::Click(click), Some(contact)) = (&event.body, event.contact_id.as_deref()) {
            if let Some(email) = click.email.as_deref() {
                emails.entry(contact).or_default().insert(email);
            }
            if let Some(fbc) = click.fbc.as_deref() {
                fbcs.entry(contact).or_default().insert(fbc);
            }
        }
    }
    let mut checked_email = 0;
    let mut checked_fbc = 0;
    for purchase in &purchases {
        let EventBody::Purchase(order) = &purchase.body else {
            unreachable!()
        };
        let contact = purchase.contact_id.as_deref().unwrap();
        let found = by_order
            .get(order.order_id.as_str())
            .unwrap_or_else(|| panic!("no conversion for order {}", order.order_id));
        let meta = found.iter().find(|value| value["platform"] == "meta").unwrap();
        let tiktok = found.iter().find(|value| value["platform"] == "tiktok").unwrap();
        assert_eq!(meta["event_name"], "Purchase");
        assert_eq!(tiktok["event"], "CompletePayment");
        assert_eq!(meta["event_time"], purchase.occurred_at.secs());
        assert_eq!(meta["custom_data"]["value"], order.amount);
        assert_eq!(meta["user_data"]["external_id"][0], sha256_hex(contact));
        // Generated in 2025: far older than the platforms' 7 days.
        assert_eq!(meta["stale"], true);
        if let Some(set) = emails.get(contact).filter(|set| set.len() == 1) {
            let email = set.iter().next().unwrap();
            if let Some(hashed) = meta["user_data"]["em"].get(0) {
                assert_eq!(hashed, &sha256_hex(&normalise_email(email).unwrap()));
                assert_eq!(tiktok["user"]["email"], *hashed);
                checked_email += 1;
            }
        }
        if let Some(set) = fbcs.get(contact).filter(|set| set.len() == 1) {
            if let Some(fbc) = meta["user_data"]["fbc"].as_str() {
                assert_eq!(fbc, *set.iter().next().unwrap());
                checked_fbc += 1;
            }
        }
    }
    assert!(checked_email >= 20, "only {checked_email} hashed emails checked");
    assert!(checked_fbc >= 5, "only {checked_fbc} click ids checked");
    assert!(purchases.iter().all(|event| event.source() == Source::Purchase));
}
