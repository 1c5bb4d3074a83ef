//! The lifecycle engine on the shipped default model: scenarios for every rule, and property
//! tests for the invariants (forward-only main path, reasons on lost stages, scores in [0, 1],
//! determinism whatever the timer schedule, order-independent purchase statistics).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use lifecycle_scorer::codec::json::{decode_event, StageChangeRecord};
use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{ContactEvent, ContactKey, StageChange, Timestamp, MILLIS_PER_DAY};
use lifecycle_scorer::lifecycle::Engine;
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::state::new_shard;
use proptest::prelude::*;

const HOUR: i64 = 3_600_000;
const DAY: i64 = MILLIS_PER_DAY;

fn engine() -> Arc<Engine> {
    Arc::new(Config::builtin().unwrap().engine)
}

fn processor() -> Processor {
    let config = Config::builtin().unwrap();
    Processor::new(Arc::new(config.engine), Arc::new(new_shard(0)), config.processing)
}

fn start() -> Timestamp {
    parse_time_argument("2025-01-01").unwrap()
}

/// A tiny event builder: `kind` is a clickstream type, `purchase:<order>:<status>` or
/// `ad:<EventName>`.
fn event(contact: &str, event_id: &str, at: Timestamp, kind: &str) -> ContactEvent {
    let time = lifecycle_scorer::codec::format_timestamp(at);
    let line = if let Some(rest) = kind.strip_prefix("purchase:") {
        let (order, status) = rest.split_once(':').unwrap();
        format!(
            r#"{{"source":"purchase","event_id":"{event_id}","contact_id":"{contact}","occurred_at":"{time}","order_id":"{order}","amount":20.0,"currency":"EUR","status":"{status}"}}"#
        )
    } else if let Some(name) = kind.strip_prefix("ad:") {
        format!(
            r#"{{"source":"ad_conversion","event_id":"{event_id}","contact_id":"{contact}","occurred_at":"{time}","platform":"meta","event_name":"{name}"}}"#
        )
    } else if let Some(anonymous) = contact.strip_prefix("anon:") {
        format!(
            r#"{{"source":"clickstream","event_id":"{event_id}","contact_id":null,"anonymous_id":"{anonymous}","occurred_at":"{time}","type":"{kind}"}}"#
        )
    } else {
        format!(
            r#"{{"source":"clickstream","event_id":"{event_id}","contact_id":"{contact}","occurred_at":"{time}","type":"{kind}"}}"#
        )
    };
    decode_event(line.as_bytes()).unwrap()
}

fn records(engine: &Engine, changes: &[StageChange]) -> Vec<StageChangeRecord> {
    changes
        .iter()
        .map(|change| StageChangeRecord::new(change, &engine.model))
        .collect()
}

fn path(records: &[StageChangeRecord]) -> Vec<(Option<&str>, &str, &str)> {
    records
        .iter()
        .map(|record| {
            (
                record.from_stage.as_deref(),
                record.to_stage.as_deref().unwrap_or("-"),
                record.reason.as_str(),
            )
        })
        .collect()
}

#[test]
fn a_contact_walks_the_main_path_with_skips_and_reasons() {
    let mut processor = processor();
    let mut out = Vec::new();
    let t0 = start();
    let steps = [
        (0, "signup"),
        (HOUR, "add_to_cart"),
        (2 * HOUR, "add_to_cart"),
        (3 * HOUR, "checkout_started"),
        (4 * HOUR, "purchase:o1:completed"),
        (5 * HOUR, "purchase:o2:completed"), // same day: still one purchase day
        (3 * DAY, "purchase:o3:completed"),
        (4 * DAY, "review"),
    ];
    for (index, (offset, kind)) in steps.iter().enumerate() {
        processor.process(
            &event("c1", &format!("e{index}"), t0.plus_millis(*offset), kind),
            &mut out,
        );
    }
    let records = records(processor.engine(), &out);
    assert_eq!(
        path(&records),
        [
            (None, "lead", "identified"),
            (Some("lead"), "hot_lead", "engaged"),
            (Some("hot_lead"), "payment", "checkout"),
            (Some("payment"), "customer", "first_purchase"),
            (Some("customer"), "repeat_customer", "repeat_purchase"),
            (Some("repeat_customer"), "advocate", "advocacy"),
        ]
    );
    assert_eq!(records[0].skipped, ["visitor"]);
    assert_eq!(records[5].skipped, ["core_customer"]);
    assert_eq!(
        records.iter().map(|record| record.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert!(records[3].churn_risk.is_some_and(|risk| (0.0..=1.0).contains(&risk)));
    assert_eq!(records[1].seconds_in_previous_stage, 7200.0);
}

#[test]
fn anonymous_visitors_and_direct_buyers_skip_what_they_skip() {
    let mut processor = processor();
    let mut out = Vec::new();
    processor.process(&event("anon:a1", "e1", start(), "page_view"), &mut out);
    processor.process(&event("c2", "e2", start(), "purchase:o9:completed"), &mut out);
    let records = records(processor.engine(), &out);
    assert_eq!(
        path(&records),
        [(None, "visitor", "first_seen"), (None, "customer", "first_purchase")]
    );
    assert_eq!(records[0].anonymous_id.as_deref(), Some("a1"));
    assert_eq!(records[0].contact_id, None);
    assert_eq!(records[1].skipped, ["visitor", "lead", "hot_lead", "payment"]);
}

#[test]
fn an_inactive_lead_goes_cold_on_time_and_comes_back_when_active() {
    let mut processor = processor();
    let mut out = Vec::new();
    let t0 = start();
    processor.process(&event("c1", "e1", t0, "signup"), &mut out);
    processor.advance_to(t0.plus_millis(29 * DAY), &mut out);
    assert_eq!(out.len(), 1, "not cold before 30 days");
    processor.advance_to(t0.plus_millis(45 * DAY), &mut out);
    processor.process(&event("c1", "e2", t0.plus_millis(50 * DAY), "page_view"), &mut out);
    let records = records(processor.engine(), &out);
    assert_eq!(
        path(&records),
        [
            (None, "lead", "identified"),
            (Some("lead"), "cold_lead", "inactive"),
            (Some("cold_lead"), "lead", "reactivated")
        ]
    );
    assert_eq!(
        records[1].occurred_at, "2025-01-31T00:00:00.000Z",
        "fires at last activity + 30 days exactly"
    );
    assert_eq!(records[1].trigger, "timer");
    assert!(records[2].reactivated);
}

#[test]
fn refunding_the_only_order_loses_the_customer_and_a_new_order_wins_them_back() {
    let mut processor = processor();
    let mut out = Vec::new();
    let t0 = start();
    processor.process(&event("c1", "e1", t0, "purchase:o1:completed"), &mut out);
    processor.process(
        &event("c1", "e2", t0.plus_millis(DAY), "purchase:o1:refunded"),
        &mut out,
    );
    processor.process(
        &event("c1", "e3", t0.plus_millis(2 * DAY), "purchase:o2:completed"),
        &mut out,
    );
    let records = records(processor.engine(), &out);
    assert_eq!(
        path(&records),
        [
            (None, "customer", "first_purchase"),
            (Some("customer"), "lost_customer", "refunded"),
            (Some("lost_customer"), "customer", "reactivated")
        ]
    );
}

#[test]
fn disqualification_and_duplicates() {
    let mut processor = processor();
    let mut out = Vec::new();
    let t0 = start();
    processor.process(&event("c1", "e1", t0, "form_submitted"), &mut out);
    processor.process(&event("c1", "e1", t0, "form_submitted"), &mut out);
    processor.process(&event("c1", "e2", t0.plus_millis(HOUR), "unsubscribed"), &mut out);
    let records = records(processor.engine(), &out);
    assert_eq!(
        path(&records),
        [
            (None, "lead", "identified"),
            (Some("lead"), "disqualified", "unsubscribed")
        ]
    );
    assert_eq!(processor.stats().duplicates, 1);
}

#[test]
fn a_quiet_customer_becomes_at_risk_then_lost_at_exact_crossing_times() {
    let engine = engine();
    let mut processor = processor();
    let mut out = Vec::new();
    let t0 = start();
    processor.process(&event("c1", "e1", t0, "purchase:o1:completed"), &mut out);
    processor.process(
        &event("c1", "e2", t0.plus_millis(20 * DAY), "purchase:o2:completed"),
        &mut out,
    );
    processor.advance_to(t0.plus_millis(3 * 365 * DAY), &mut out);
    let records = records(&engine, &out);
    let stages: Vec<&str> = records
        .iter()
        .map(|record| record.to_stage.as_deref().unwrap_or("-"))
        .collect();
    assert_eq!(
        stages,
        ["customer", "repeat_customer", "at_risk", "lost_customer"],
        "{records:#?}"
    );
    // The at_risk change happens at the first whole second the risk reaches 0.85.
    let at_risk = parse_time_argument(&records[2].occurred_at).unwrap();
    let key = ContactKey::contact("c1");
    let state = processor.shard().get(&key).unwrap().clone();
    let before = engine.scorer.purchase_risk(&state, at_risk.plus_millis(-1000)).unwrap();
    let at = engine.scorer.purchase_risk(&state, at_risk).unwrap();
    assert!(before < 0.85 && at >= 0.85, "{before} {at}");
    assert_eq!(records[2].churn_risk.map(|risk| risk >= 0.85), Some(true));
}

/// One random event for the property tests: (contact index, gap in minutes, kind index).
fn kinds() -> &'static [&'static str] {
    &[
        "page_view",
        "product_view",
        "add_to_cart",
        "checkout_started",
        "payment_info_added",
        "signup",
        "form_submitted",
        "referral",
        "review",
        "disqualified",
        "unsubscribed",
        "ad:Lead",
        "ad:Purchase",
        "ad:InitiateCheckout",
        "purchase:o1:completed",
        "purchase:o2:completed",
        "purchase:o3:completed",
        "purchase:o1:refunded",
        "purchase:o4:cancelled",
        "purchase:o5:completed",
    ]
}

fn build_stream(raw: &[(u8, u32, usize)]) -> Vec<ContactEvent> {
    let mut at = start();
    raw.iter()
        .enumerate()
        .map(|(index, (contact, gap_minutes, kind))| {
            at = at.plus_millis(i64::from(*gap_minutes) * 60_000);
            let contact = format!("c{}", contact % 3);
            event(&contact, &format!("e{index}"), at, kinds()[kind % kinds().len()])
        })
        .collect()
}

fn run(events: &[ContactEvent], sweeps: &[usize], end: Timestamp) -> Vec<StageChange> {
    let mut processor = processor();
    let mut out = Vec::new();
    for (index, event) in events.iter().enumerate() {
        if sweeps.contains(&index) {
            processor.advance_to(event.occurred_at, &mut out);
        }
        processor.process(event, &mut out);
    }
    processor.advance_to(end, &mut out);
    out
}

/// The engine alone, no processor and no sweeps: a contact's timers fire only when its own next
/// event arrives, or at the end.
fn run_engine_only(events: &[ContactEvent], end: Timestamp) -> Vec<StageChange> {
    let engine = engine();
    let mut states = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for event in events {
        let key = event.key().unwrap();
        let state = states
            .entry(key.clone())
            .or_insert_with(|| engine.new_contact(event.occurred_at));
        engine.apply(&key, state, event, &mut out);
    }
    for (key, state) in states.iter_mut() {
        engine.advance_to(key, state, end, &mut out);
    }
    out
}

fn canonical(changes: &[StageChange]) -> Vec<String> {
    let engine = engine();
    let mut lines: Vec<String> = changes
        .iter()
        .map(|change| serde_json::to_string(&StageChangeRecord::new(change, &engine.model)).unwrap())
        .collect();
    lines.sort();
    lines
}

fn stream_strategy() -> impl Strategy<Value = Vec<(u8, u32, usize)>> {
    // Gaps from a minute to ~70 days so inactivity and churn timers fire in between.
    prop::collection::vec((0u8..3, prop_oneof![1u32..600, 600u32..100_000], 0usize..64), 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn invariants_hold_on_random_streams(raw in stream_strategy()) {
        let engine = engine();
        let events = build_stream(&raw);
        let end = events.last().unwrap().occurred_at.plus_millis(2 * 365 * DAY);
        let changes = run(&events, &[], end);
        let mut last_seq = std::collections::HashMap::new();
        for change in &changes {
            let model = &engine.model;
            // Sequence numbers run 1, 2, 3... per contact.
            let previous = last_seq.insert(change.key.clone(), change.seq).unwrap_or(0);
            prop_assert_eq!(change.seq, previous + 1);
            match change.from {
                None => prop_assert_eq!(change.seq, 1),
                Some(from) => {
                    let (from_lost, to_lost) = (model.is_lost(from), model.is_lost(change.to));
                    if !from_lost && !to_lost {
                        // The main path only moves forward.
                        prop_assert!(model.rank(change.to) > model.rank(from), "{:?}", change);
                        prop_assert!(!change.reactivated);
                    }
                    if from_lost && !to_lost {
                        prop_assert!(change.reactivated, "leaving a lost stage is a reactivation");
                    }
                }
            }
            if model.is_lost(change.to) {
                prop_assert!(!change.reason.is_empty());
                prop_assert!(change.reason.as_ref() != "first_seen");
            }
            if let Some(risk) = change.churn_risk {
                prop_assert!((0.0..=1.0).contains(&risk));
            }
        }
    }

    #[test]
    fn output_does_not_depend_on_when_timers_are_swept(raw in stream_strategy(), sweeps in prop::collection::vec(0usize..60, 0..20)) {
        let events = build_stream(&raw);
        let end = events.last().unwrap().occurred_at.plus_millis(400 * DAY);
        let rare = run_engine_only(&events, end);
        let often = run(&events, &sweeps, end);
        prop_assert_eq!(canonical(&rare), canonical(&often));
        // Same input, same bytes.
        prop_assert_eq!(canonical(&rare), canonical(&run(&events, &[], end)));
    }

    #[test]
    fn scores_stay_probabilities(raw in stream_strategy(), later_days in 0i64..20_000) {
        let engine = engine();
        let events = build_stream(&raw);
        let mut processor = processor();
        let mut out = Vec::new();
        for event in &events {
            processor.process(event, &mut out);
        }
        let now = events.last().unwrap().occurred_at.plus_millis(later_days * DAY);
        for entry in processor.shard().iter() {
            let score = engine.scorer.score(entry.value(), now);
            prop_assert!((0.0..=1.0).contains(&score.churn_risk), "{:?}", score);
            if let Some(alive) = score.p_alive {
                prop_assert!((0.0..=1.0).contains(&alive));
            }
            if let Some(expected) = score.expected_purchases {
                prop_assert!(expected.is_finite() && expected >= 0.0);
            }
        }
    }

    #[test]
    fn purchase_statistics_do_not_depend_on_arrival_order(
        orders in prop::collection::vec((0u32..8, 0i64..400, prop::bool::ANY), 1..20),
        seed in any::<u64>(),
    ) {
        // Purchases (some refunded later) arriving in time order vs shuffled (within grace or
        // not: statistics must match either way).
        let t0 = start();
        let mut events = Vec::new();
        for (index, (order, day, refunded)) in orders.iter().enumerate() {
            let at = t0.plus_millis(day * DAY + index as i64);
            events.push(event("c1", &format!("p{index}"), at, &format!("purchase:o{order}:completed")));
            if *refunded {
                events.push(event("c1", &format!("r{index}"), at.plus_millis(HOUR), &format!("purchase:o{order}:refunded")));
            }
        }
        events.sort_by_key(|event| event.occurred_at);
        let mut shuffled = events.clone();
        let mut state = seed;
        for index in (1..shuffled.len()).rev() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            shuffled.swap(index, (state >> 33) as usize % (index + 1));
        }
        let history = |events: &[ContactEvent]| {
            let mut processor = processor();
            let mut out = Vec::new();
            for event in events {
                processor.process(event, &mut out);
            }
            let key = ContactKey::contact("c1");
            let state = processor.shard().get(&key).unwrap().clone();
            let history = state.purchase_history().unwrap().clone();
            (history.first_day, history.last_day, history.repeat_days, history.completed_orders)
        };
        prop_assert_eq!(history(&events), history(&shuffled));
    }
}

#[test]
fn a_custom_stage_model_needs_no_recompiling() {
    // A B2B model: other stages, other rules, other thresholds, from configuration alone.
    let text = r#"
[[stages]]
id = "prospect"
label = "Prospect"
[[stages]]
id = "qualified"
label = "Sales qualified"
[[stages]]
id = "won"
label = "Closed won"
[[stages]]
id = "churned"
lost = true
reactivate_on = ["purchase:completed"]

[[rules]]
to = "qualified"
on = ["clickstream:form_submitted"]
reason = "form"

[[rules]]
to = "won"
min_purchase_days = 1
reason = "contract"

[[rules]]
to = "churned"
from = ["won"]
min_inactive_days = 60
reason = "silent"
"#;
    let config = Config::from_toml(text, "b2b.toml", std::iter::empty()).unwrap();
    let engine = Arc::new(config.engine);
    let mut processor = Processor::new(engine.clone(), Arc::new(new_shard(0)), config.processing);
    let mut out = Vec::new();
    let t0 = start();
    processor.process(&event("c1", "e1", t0, "page_view"), &mut out);
    processor.process(&event("c1", "e2", t0.plus_millis(HOUR), "form_submitted"), &mut out);
    processor.process(
        &event("c1", "e3", t0.plus_millis(DAY), "purchase:o1:completed"),
        &mut out,
    );
    processor.advance_to(t0.plus_millis(100 * DAY), &mut out);
    processor.process(
        &event("c1", "e4", t0.plus_millis(120 * DAY), "purchase:o2:completed"),
        &mut out,
    );
    let records = records(&engine, &out);
    assert_eq!(
        path(&records),
        [
            (None, "prospect", "first_seen"),
            (Some("prospect"), "qualified", "form"),
            (Some("qualified"), "won", "contract"),
            (Some("won"), "churned", "silent"),
            (Some("churned"), "won", "reactivated"),
        ]
    );
    assert_eq!(
        records[3].occurred_at, "2025-03-03T00:00:00.000Z",
        "60 days after the last activity (the purchase on Jan 2)"
    );
    assert_eq!(
        engine.model.stage(engine.model.find("qualified").unwrap()).label,
        "Sales qualified"
    );
}
