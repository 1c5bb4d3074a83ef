//! The Avro schemas in `schemas/` mirror the JSON contract: same field names, same symbols.

#![allow(clippy::unwrap_used)]

use lifecycle_scorer::domain::{ChangeKind, ClickType, Platform, PurchaseStatus};
use serde_json::Value;

fn schema(name: &str) -> Value {
    let path = format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn field_names(schema: &Value) -> Vec<String> {
    schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|field| field["name"].as_str().unwrap().to_owned())
        .collect()
}

fn symbols(schema: &Value, field: &str) -> Vec<String> {
    let field = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|candidate| candidate["name"] == field)
        .unwrap();
    field["type"]["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|symbol| symbol.as_str().unwrap().to_owned())
        .collect()
}

fn names<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> Vec<String> {
    all.iter().map(|value| name(*value).to_owned()).collect()
}

#[test]
fn enum_symbols_match_the_domain() {
    assert_eq!(
        symbols(&schema("clickstream_event.avsc"), "type"),
        names(ClickType::ALL, ClickType::as_str)
    );
    assert_eq!(
        symbols(&schema("ad_conversion_event.avsc"), "platform"),
        names(Platform::ALL, Platform::as_str)
    );
    assert_eq!(
        symbols(&schema("purchase_event.avsc"), "status"),
        names(PurchaseStatus::ALL, PurchaseStatus::as_str)
    );
    assert_eq!(
        symbols(&schema("stage_change.avsc"), "kind"),
        [
            ChangeKind::Transition,
            ChangeKind::Deleted,
            ChangeKind::Merged("c".into())
        ]
        .map(|kind| kind.as_str().to_owned())
    );
}

#[test]
fn stage_change_fields_match_the_json_output() {
    let record = lifecycle_scorer::codec::json::StageChangeRecord {
        event_id: String::new(),
        contact_id: None,
        anonymous_id: None,
        seq: 1,
        from_stage: None,
        to_stage: None,
        lost: false,
        reactivated: false,
        reason: String::new(),
        skipped: Vec::new(),
        occurred_at: String::new(),
        trigger: String::new(),
        trigger_event_id: None,
        seconds_in_previous_stage: 0.0,
        churn_risk: None,
        kind: String::new(),
        merged_into: None,
    };
    let json = serde_json::to_value(&record).unwrap();
    let json_fields: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
    let mut avro_fields = field_names(&schema("stage_change.avsc"));
    avro_fields.sort();
    assert_eq!(avro_fields, json_fields);
}

#[test]
fn input_schemas_share_the_common_fields() {
    for name in [
        "clickstream_event.avsc",
        "ad_conversion_event.avsc",
        "purchase_event.avsc",
    ] {
        let fields = field_names(&schema(name));
        for common in ["event_id", "contact_id", "anonymous_id", "occurred_at"] {
            assert!(fields.iter().any(|field| field == common), "{name} lacks {common}");
        }
    }
}
