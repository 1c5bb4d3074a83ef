//! Bad input against a real broker (tansu): every kind of bad record mixed into a valid
//! stream lands in the dead-letter topic with its reason and origin, every valid record is
//! processed, the service keeps running, and the metrics count both.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as Avro;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use common::broker::{consume_all, produce, unique_name, Record, Tansu};
use common::service::{create_service_topics, generated_events, service_config, sum_samples, RunningService, TOPICS};
use lifecycle_scorer::codec::json::encode_event;
use lifecycle_scorer::codec::output::{shipped_input_schema_id, shipped_input_store, shipped_schema};
use lifecycle_scorer::domain::{ContactEvent, EventBody, Source, Timestamp};
use serde_json::Value;

/// A writer schema derived from a shipped one by `change`, as an upstream team might evolve it.
fn variant(file: &str, change: impl FnOnce(&mut Value)) -> String {
    let mut schema: Value = serde_json::from_str(shipped_schema(file).unwrap()).unwrap();
    change(&mut schema);
    schema.to_string()
}

fn fields(schema: &mut Value) -> &mut Vec<Value> {
    schema["fields"].as_array_mut().unwrap()
}

/// Re-encodes a framed record of `from` under writer schema `to_text` (id `to_id`), after
/// `change` edits its fields.
fn reencode(
    framed: &[u8],
    from: &str,
    to_id: u32,
    to_text: &str,
    change: impl FnOnce(&mut Vec<(String, Avro)>),
) -> Vec<u8> {
    let from = Schema::parse_str(from).unwrap();
    let mut body = &framed[5..];
    let Avro::Record(mut record) = GenericDatumReader::builder(&from)
        .build()
        .unwrap()
        .read_value(&mut body)
        .unwrap()
    else {
        panic!("not a record")
    };
    change(&mut record);
    let to = Schema::parse_str(to_text).unwrap();
    let mut out = vec![0];
    out.extend_from_slice(&to_id.to_be_bytes());
    GenericDatumWriter::builder(&to)
        .build()
        .unwrap()
        .write_value_ref(&mut out, &Avro::Record(record))
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_records_are_dead_lettered_with_their_reason_and_the_rest_is_processed() {
    let broker = Tansu::start();
    let bootstrap = broker.bootstrap();
    create_service_topics(&bootstrap, 2).await;

    // Writer schemas registered under ids of their own, mapped to files (no registry).
    let dir = tempfile::tempdir().unwrap();
    let without_order_id = variant("purchase_event.avsc", |schema| {
        fields(schema).retain(|field| field["name"] != "order_id");
    });
    let amount_as_text = variant("purchase_event.avsc", |schema| {
        for field in fields(schema) {
            if field["name"] == "amount" {
                field["type"] = "string".into();
            }
        }
    });
    let more_click_types = variant("clickstream_event.avsc", |schema| {
        for field in fields(schema) {
            if field["name"] == "type" {
                field["type"]["symbols"].as_array_mut().unwrap().push("teleport".into());
            }
        }
    });
    let teleport = {
        let schema: Value = serde_json::from_str(&more_click_types).unwrap();
        let field = schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|field| field["name"] == "type")
            .unwrap();
        u32::try_from(field["type"]["symbols"].as_array().unwrap().len() - 1).unwrap()
    };
    for (name, text) in [
        ("v7.avsc", &without_order_id),
        ("v8.avsc", &amount_as_text),
        ("v9.avsc", &more_click_types),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }

    let mut store = shipped_input_store().unwrap();
    store.insert(7, "v7", &without_order_id).unwrap();
    store.insert(9, "v9", &more_click_types).unwrap();

    // The valid stream: Avro clickstream and purchases, JSON ad conversions.
    let events = generated_events(300, 60, 5);
    let encode = |event: &ContactEvent| -> Vec<u8> {
        match event.source() {
            Source::AdConversion => encode_event(event).into_bytes(),
            source => store.encode(shipped_input_schema_id(source), event).unwrap(),
        }
    };
    let mut per_topic: [Vec<Record>; 3] = Default::default();
    for event in &events {
        per_topic[event.source().index()].push(Record::new(event.key().unwrap().id.as_bytes().to_vec(), encode(event)));
    }
    let valid = events.len();

    // The bad ones, each with the reason it must be dead-lettered with.
    let purchase = events.iter().find(|event| event.source() == Source::Purchase).unwrap();
    let click = events
        .iter()
        .find(|event| event.source() == Source::Clickstream)
        .unwrap();
    let framed_purchase = encode(purchase);
    let with = |change: &dyn Fn(&mut ContactEvent)| {
        let mut event = purchase.clone();
        change(&mut event);
        store.encode(3, &event).unwrap()
    };
    let mut wrong_magic = framed_purchase.clone();
    wrong_magic[0] = 1;
    let mut unknown_id = framed_purchase.clone();
    unknown_id[1..5].copy_from_slice(&99u32.to_be_bytes());
    let purchase_schema = shipped_schema("purchase_event.avsc").unwrap();
    let bad: Vec<(usize, Vec<u8>, &str)> = vec![
        (2, framed_purchase[..framed_purchase.len() - 4].to_vec(), "invalid_avro"),
        (2, wrong_magic, "bad_framing"),
        (2, unknown_id, "unknown_schema_id"),
        (2, store.encode(7, purchase).unwrap(), "missing_field"),
        (
            2,
            reencode(&framed_purchase, purchase_schema, 8, &amount_as_text, |record| {
                for (name, value) in record.iter_mut() {
                    if name == "amount" {
                        *value = Avro::String("twelve".into());
                    }
                }
            }),
            "invalid_field",
        ),
        (
            0,
            reencode(
                &store.encode(9, click).unwrap(),
                &more_click_types,
                9,
                &more_click_types,
                |record| {
                    for (name, value) in record.iter_mut() {
                        if name == "type" {
                            let Avro::Enum(_, _) = value else {
                                panic!("type is an enum")
                            };
                            *value = Avro::Enum(teleport, "teleport".into());
                        }
                    }
                },
            ),
            "unknown_symbol",
        ),
        (
            2,
            with(&|event| {
                if let EventBody::Purchase(order) = &mut event.body {
                    order.amount = -5.0;
                }
            }),
            "invalid_field",
        ),
        (
            2,
            with(&|event| event.occurred_at = Timestamp::from_millis(253_402_214_400_000)),
            "invalid_field",
        ),
        (
            2,
            with(&|event| event.occurred_at = Timestamp::from_millis(-86_400_000)),
            "invalid_field",
        ),
        (1, vec![b' '; 10_000], "oversized"),
        (
            1,
            b"{\"source\":\"ad_conversion\",\"event_id\":\"\xff\xfe\"}".to_vec(),
            "invalid_utf8",
        ),
        (1, b"this is not JSON".to_vec(), "invalid_json"),
        (1, encode_event(purchase).into_bytes(), "wrong_source"),
        (0, Vec::new(), "empty_record"),
    ];
    // Mixed into the valid stream, spread over it.
    for (index, (topic, payload, _)) in bad.iter().enumerate() {
        let records = &mut per_topic[*topic];
        let at = (records.len() * (index + 1)) / (bad.len() + 1);
        records.insert(at, Record::new(format!("bad-{index}"), payload.clone()));
    }
    for (source, records) in per_topic.iter().enumerate() {
        produce(&bootstrap, TOPICS[source], records).await;
    }

    let extra = format!(
        r#"
[input]
clickstream = "avro"
ad_conversions = "json"
purchases = "avro"
max_record_bytes = 4096

[schemas.files]
"1" = "builtin:clickstream_event.avsc"
"2" = "builtin:ad_conversion_event.avsc"
"3" = "builtin:purchase_event.avsc"
"7" = "{dir}/v7.avsc"
"8" = "{dir}/v8.avsc"
"9" = "{dir}/v9.avsc"

[service]
idle_timers = false
idle_flush_ms = 300
"#,
        dir = dir.path().display()
    );
    let service = RunningService::start(service_config(&bootstrap, &unique_name("bad-input"), &extra)).await;
    service.wait_ready(Duration::from_secs(60)).await;

    let dead = consume_all(&bootstrap, TOPICS[5], bad.len(), Duration::from_secs(120)).await;
    assert_eq!(
        dead.len(),
        bad.len(),
        "every bad record, and only those, is dead-lettered"
    );
    let mut reasons: BTreeMap<String, String> = BTreeMap::new();
    for record in &dead {
        let header = |name: &str| {
            let value = &record.headers.iter().find(|(key, _)| key == name).unwrap().1;
            String::from_utf8(value.clone()).unwrap()
        };
        let key = String::from_utf8(record.key.clone().unwrap()).unwrap();
        let index: usize = key.strip_prefix("bad-").unwrap().parse().unwrap();
        let (topic, payload, _) = &bad[index];
        assert_eq!(
            record.payload.as_deref().unwrap_or_default(),
            &payload[..],
            "raw bytes kept"
        );
        assert_eq!(header("source.topic"), TOPICS[*topic]);
        assert!(header("source.partition").parse::<i32>().is_ok());
        assert!(header("source.offset").parse::<i64>().is_ok());
        assert!(!header("error.message").is_empty());
        reasons.insert(key, header("error.reason"));
    }
    for (index, (_, _, reason)) in bad.iter().enumerate() {
        assert_eq!(reasons[&format!("bad-{index}")], *reason, "bad record {index}");
    }

    // Every valid record processed; the service never stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (_, metrics) = service.get("/metrics").await;
        let processed = inputs_consumed(&metrics) as usize;
        if processed >= valid + bad.len() || std::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(service.is_running());
    let dead_lettered = sum_samples(
        &metrics,
        "lifecycle_events_consumed_total",
        &[r#"outcome="dead_letter""#],
    );
    assert_eq!(dead_lettered as usize, bad.len());
    let others = inputs_consumed(&metrics) as usize - bad.len();
    assert_eq!(others, valid, "every valid record processed (or deduplicated) once");
    assert_eq!(
        sum_samples(&metrics, "lifecycle_dead_letters_total", &[]) as usize,
        bad.len()
    );
    let mut expected_reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, reason) in &bad {
        *expected_reasons.entry(reason).or_default() += 1;
    }
    for (reason, count) in expected_reasons {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(
            sum_samples(&metrics, "lifecycle_decode_errors_total", &[label.as_str()]) as usize,
            count,
            "decode errors counted for {reason}"
        );
    }
    service.stop().await;
}

/// Input records consumed (merges between partitions also go through the identity topic).
fn inputs_consumed(metrics: &str) -> f64 {
    TOPICS[..3]
        .iter()
        .map(|topic| {
            sum_samples(
                metrics,
                "lifecycle_events_consumed_total",
                &[&format!(r#"topic="{topic}""#)],
            )
        })
        .sum()
}
