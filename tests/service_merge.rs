//! Identity merge against a real broker (tansu): a sign-up carrying both ids moves the anonymous
//! visitor's state (engagement, stage progress, click ids) to the contact, also when the two
//! ids live on different partitions (through the identity topic). The stage changes equal those
//! of `replay` with the same partitions, the merged contact's later purchase is attributed with
//! the visitor's click id, and a restarted instance restores the merged state.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::broker::{consume_all, consume_to_end, produce, unique_name, Tansu};
use common::oracle::avro_records;
use common::service::{
    assert_same_changes, create_service_topics, replay_inputs_with_config, service_config, sum_samples, RunningService,
    TOPICS,
};
use lifecycle_scorer::codec::format_timestamp;
use lifecycle_scorer::codec::json::decode_event;
use lifecycle_scorer::domain::{ContactEvent, Input, Timestamp};
use lifecycle_scorer::partition::partition_for;
use serde_json::Value;

const PARTITIONS: i32 = 4;
const PAIRS: usize = 40;
/// 2025-03-01T00:00:00Z.
const START: i64 = 1_740_787_200_000;

fn event(json: String) -> ContactEvent {
    decode_event(json.as_bytes()).unwrap()
}

fn at(minutes: i64) -> String {
    format_timestamp(Timestamp::from_millis(START + minutes * 60_000))
}

/// Visitor `anon-i` browses with a Meta click id and fills the cart twice, signs up as
/// `cust-i`, browses on, and buys a day later.
fn journey(i: usize) -> Vec<ContactEvent> {
    let (anonymous, contact) = (format!("anon-{i}"), format!("cust-{i}"));
    let minute = i as i64 * 10;
    vec![
        event(format!(
            r#"{{"source":"clickstream","event_id":"{anonymous}-1","contact_id":null,"anonymous_id":"{anonymous}","occurred_at":"{}","type":"add_to_cart","fbc":"fb.1.1.{i}"}}"#,
            at(minute)
        )),
        event(format!(
            r#"{{"source":"clickstream","event_id":"{anonymous}-2","contact_id":null,"anonymous_id":"{anonymous}","occurred_at":"{}","type":"add_to_cart"}}"#,
            at(minute + 1)
        )),
        event(format!(
            r#"{{"source":"clickstream","event_id":"{contact}-1","contact_id":"{contact}","anonymous_id":"{anonymous}","occurred_at":"{}","type":"signup","email":"{contact}@example.com"}}"#,
            at(minute + 2)
        )),
        event(format!(
            r#"{{"source":"clickstream","event_id":"{contact}-2","contact_id":"{contact}","anonymous_id":null,"occurred_at":"{}","type":"page_view"}}"#,
            at(minute + 3)
        )),
        event(format!(
            r#"{{"source":"purchase","event_id":"{contact}-3","contact_id":"{contact}","occurred_at":"{}","order_id":"o-{i}","amount":25.0,"currency":"EUR","status":"completed"}}"#,
            at(minute + 24 * 60)
        )),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_ups_merge_the_visitor_across_partitions_as_replay_does() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    create_service_topics(&bootstrap, PARTITIONS).await;

    let mut events: Vec<ContactEvent> = (0..PAIRS).flat_map(journey).collect();
    events.sort_by_key(|event| event.occurred_at);
    let crossing = (0..PAIRS)
        .filter(|i| {
            let partition = |id: String| partition_for(id.as_bytes(), PARTITIONS as u32);
            partition(format!("anon-{i}")) != partition(format!("cust-{i}"))
        })
        .count();
    assert!(
        (20..PAIRS).contains(&crossing),
        "{crossing} of {PAIRS} pairs cross partitions"
    );

    // Merging is on by default; said here explicitly, for replay's configuration too.
    const MERGE: &str = "[processing]\nlate_event_grace_hours = 24.0\nreorder_window_seconds = 5.0\n\
                         timer_sweep_minutes = 60.0\nmerge_identities = true\n";
    let inputs: Vec<Input> = events.iter().cloned().map(Input::Event).collect();
    let merging = service_config("127.0.0.1:9092", "replay", MERGE);
    let (expected, final_states) = replay_inputs_with_config(&inputs, PARTITIONS as u32, merging);
    let merges = expected
        .iter()
        .filter(|line| line.contains(r#""kind":"merge""#))
        .count();
    assert_eq!(merges, PAIRS, "replay merges every visitor");
    assert!(final_states.keys().all(|key| !key.anonymous), "no visitor left behind");

    let per_topic = avro_records(&events);
    for (source, records) in per_topic.iter().enumerate() {
        produce(&bootstrap, TOPICS[source], records).await;
    }
    let group = unique_name("merge");
    let config = || {
        service_config(
            &bootstrap,
            &group,
            &format!("[service]\nidle_timers = false\nidle_flush_ms = 500\nmax_task_idle_ms = 10000\n{MERGE}"),
        )
    };
    let service = RunningService::start(config()).await;
    service.wait_ready(Duration::from_secs(60)).await;
    let published = consume_all(&bootstrap, TOPICS[3], expected.len(), Duration::from_secs(120)).await;
    assert_same_changes(&published, &expected);

    // Each visitor's last record says where it went; the contact went on from the sign-up
    // with the visitor's engagement: a hot lead, triggered by the sign-up.
    let changes: Vec<Value> = published
        .iter()
        .map(|record| serde_json::from_str(record.payload_str()).unwrap())
        .collect();
    for i in 0..PAIRS {
        let merge = changes
            .iter()
            .find(|change| change["anonymous_id"] == format!("anon-{i}").as_str() && change["kind"] == "merge")
            .unwrap();
        assert_eq!(merge["merged_into"], format!("cust-{i}").as_str());
        assert!(merge["to_stage"].is_null());
        let contact = format!("cust-{i}");
        let hot = changes
            .iter()
            .find(|change| change["contact_id"] == contact.as_str() && change["to_stage"] == "hot_lead")
            .unwrap_or_else(|| panic!("{contact} never became a hot lead"));
        assert_eq!(hot["trigger_event_id"], format!("{contact}-1").as_str(), "{hot}");
    }
    let stages: BTreeSet<&str> = changes
        .iter()
        .filter(|change| change["anonymous_id"].is_string())
        .filter_map(|change| change["to_stage"].as_str())
        .collect();
    assert_eq!(stages, BTreeSet::from(["visitor"]), "visitors only ever were visitors");

    // The purchase a day later is attributed with the click id the visitor arrived with.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let purchases = loop {
        let conversions = consume_to_end(&bootstrap, TOPICS[4], Duration::from_secs(30)).await;
        let purchases: Vec<Value> = conversions
            .iter()
            .map(|record| serde_json::from_str::<Value>(record.payload_str()).unwrap())
            .filter(|conversion| conversion["platform"] == "meta" && conversion["event_name"] == "Purchase")
            .collect();
        if purchases.len() >= PAIRS || std::time::Instant::now() > deadline {
            break purchases;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(purchases.len(), PAIRS, "one Meta purchase per merged contact");
    for conversion in &purchases {
        let order = conversion["custom_data"]["order_id"].as_str().unwrap();
        let i = order.trim_start_matches("o-");
        assert_eq!(
            conversion["user_data"]["fbc"],
            format!("fb.1.1.{i}").as_str(),
            "{conversion}"
        );
    }

    let (_, metrics) = service.get("/metrics").await;
    assert_eq!(
        sum_samples(
            &metrics,
            "lifecycle_records_produced_total",
            &[r#"topic="lifecycle.identity""#]
        ) as usize,
        2 * crossing,
        "a request and a handover through the identity topic per pair that crosses partitions"
    );
    service.stop().await;

    // A restarted instance restores the merged contacts, and no visitor.
    let service = RunningService::start(config()).await;
    service.wait_ready(Duration::from_secs(60)).await;
    for i in 0..PAIRS {
        let (status, body) = service.get(&format!("/contacts/cust-{i}")).await;
        assert_eq!(status, 200, "{body}");
        let contact: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(contact["stage"], "customer", "{body}");
        assert_eq!(service.get(&format!("/contacts/anon-{i}")).await.0, 404);
    }
    service.stop().await;
}
