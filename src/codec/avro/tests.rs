//! Tests of the Avro codec: round trips through the shipped and evolved writer schemas, bad
//! input refused by reason, and the decoder's behaviour on arbitrary bytes, checked against the
//! serde reader it replaced.

use std::collections::HashMap;
use std::path::Path;

use apache_avro::reader::datum::GenericDatumReader;
use compact_str::CompactString;
use proptest::prelude::*;

use super::*;
use crate::codec::json::decode_event;
use crate::domain::{AdConversion, Click, ClickType, Platform, Purchase, PurchaseStatus};

fn shipped_schema_text(source: Source) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(schema_file(source)),
    )
    .unwrap()
}

fn store() -> SchemaStore {
    let mut store = SchemaStore::new();
    for (id, source) in [
        (1, Source::Clickstream),
        (2, Source::AdConversion),
        (3, Source::Purchase),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(schema_file(source));
        store.insert_file(id, &path).unwrap();
    }
    store
}

fn shipped_id(source: Source) -> u32 {
    match source {
        Source::Clickstream => 1,
        Source::AdConversion => 2,
        Source::Purchase => 3,
    }
}

fn events() -> Vec<(u32, Source, ContactEvent)> {
    [
        (1, Source::Clickstream, r#"{"source":"clickstream","event_id":"e1","contact_id":null,"anonymous_id":"a1","occurred_at":"2025-01-01T10:00:00.250Z","type":"signup","email":"Ann@Example.com","user_agent":"UA","fbc":"fb.1.2.3"}"#),
        (2, Source::AdConversion, r#"{"source":"ad_conversion","event_id":"e2","contact_id":"c1","occurred_at":"2025-01-01T11:00:00Z","platform":"tiktok","event_name":"Purchase","value":12.5,"currency":"EUR","click_id":"tt1"}"#),
        (3, Source::Purchase, r#"{"source":"purchase","event_id":"e3","contact_id":"c1","occurred_at":"2025-01-02T11:00:00Z","order_id":"o1","amount":59.9,"currency":"EUR","status":"refunded"}"#),
    ]
    .into_iter()
    .map(|(id, source, line)| (id, source, decode_event(line.as_bytes()).unwrap()))
    .collect()
}

#[test]
fn every_input_round_trips_through_the_shipped_schemas() {
    let store = store();
    for (id, source, event) in events() {
        let record = store.encode(id, &event).unwrap();
        assert_eq!(&record[..HEADER_LEN], &[0, 0, 0, 0, id as u8]);
        assert_eq!(store.decode(source, &record).unwrap(), event);
    }
}

#[test]
fn bad_frames_and_bodies_are_named() {
    let store = store();
    let (id, source, event) = events().remove(2);
    let record = store.encode(id, &event).unwrap();
    let reason = |bytes: &[u8]| store.decode(source, bytes).unwrap_err().reason();
    assert_eq!(reason(&record[..3]), "bad_framing");
    let mut magic = record.clone();
    magic[0] = 1;
    assert_eq!(reason(&magic), "bad_framing");
    let mut unknown = record.clone();
    unknown[4] = 99;
    assert_eq!(reason(&unknown), "unknown_schema_id");
    assert_eq!(reason(&record[..record.len() - 2]), "invalid_avro");
    let mut trailing = record.clone();
    trailing.push(0);
    assert_eq!(reason(&trailing), "invalid_avro");
}

#[test]
fn a_newer_writer_schema_with_an_extra_field_still_decodes() {
    // Backward-compatible evolution: the producer adds an optional field.
    let mut store = store();
    let text = purchase_schema_text().replace(
        r#"{"name": "order_id""#,
        r#"{"name": "coupon", "type": ["null", "string"], "default": null},
    {"name": "order_id""#,
    );
    assert!(text.contains("coupon"));
    store.insert(7, "purchase v2", &text).unwrap();
    let (_, source, event) = events().remove(2);
    let record = store.encode(7, &event).unwrap();
    assert_eq!(store.decode(source, &record).unwrap(), event);
}

fn purchase_schema_text() -> String {
    shipped_schema_text(Source::Purchase)
}

/// A record written by apache-avro with `schema_text` from `fields`, framed under id 9.
fn write_record(schema_text: &str, fields: Vec<(&str, Value)>) -> Vec<u8> {
    let schema = Schema::parse_str(schema_text).unwrap();
    let value = Value::Record(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    );
    let mut record = vec![0, 0, 0, 0, 9];
    record.extend(
        GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap(),
    );
    record
}

/// A purchase record written by hand with another writer schema.
fn write_with(schema_text: &str, fields: Vec<(&str, Value)>) -> (SchemaStore, Vec<u8>) {
    let mut store = store();
    store.insert(9, "hand-written", schema_text).unwrap();
    (store, write_record(schema_text, fields))
}

fn purchase_fields(status: Value, amount: Option<f64>, millis: i64) -> Vec<(&'static str, Value)> {
    let mut fields = vec![
        ("event_id", Value::String("e".into())),
        ("contact_id", Value::String("c".into())),
        ("anonymous_id", Value::Union(0, Box::new(Value::Null))),
        ("occurred_at", Value::TimestampMillis(millis)),
        ("order_id", Value::String("o".into())),
    ];
    if let Some(amount) = amount {
        fields.push(("amount", Value::Double(amount)));
    }
    fields.push(("currency", Value::String("EUR".into())));
    fields.push(("status", status));
    fields
}

#[test]
fn invalid_content_is_named_by_field() {
    let base = purchase_schema_text();
    let completed = || Value::Enum(0, "completed".into());
    let decode = |store: &SchemaStore, record: &[u8]| store.decode(Source::Purchase, record).unwrap_err();

    // A symbol the engine does not know (the producer's enum grew).
    let grown = base.replace(r#""cancelled"]"#, r#""cancelled", "chargeback"]"#);
    let (store, record) = write_with(
        &grown,
        purchase_fields(Value::Enum(3, "chargeback".into()), Some(5.0), 0),
    );
    assert!(matches!(
        decode(&store, &record),
        DecodeError::UnknownSymbol { field: "status", .. }
    ));

    // A required field the writer dropped.
    let start = base.find(r#"{"name": "amount""#).unwrap();
    let end = start + base[start..].find('\n').unwrap();
    let dropped = format!("{}{}", &base[..start], &base[end + 1..]);
    let (store, record) = write_with(&dropped, purchase_fields(completed(), None, 0));
    assert_eq!(decode(&store, &record), DecodeError::MissingField("amount"));

    // Negative amounts and absurd times are refused like in JSON.
    let (store, record) = write_with(&base, purchase_fields(completed(), Some(-1.0), 0));
    assert!(matches!(
        decode(&store, &record),
        DecodeError::InvalidField { field: "amount", .. }
    ));
    let year_9999 = 253_370_764_800_000;
    let (store, record) = write_with(&base, purchase_fields(completed(), Some(1.0), year_9999));
    assert!(matches!(
        decode(&store, &record),
        DecodeError::InvalidField {
            field: "occurred_at",
            ..
        }
    ));

    // A field of another type under a known name.
    let retyped = base.replace(
        r#"{"name": "amount", "type": "double""#,
        r#"{"name": "amount", "type": "string""#,
    );
    assert!(retyped.contains(r#""amount", "type": "string""#));
    let mut fields = purchase_fields(completed(), None, 0);
    fields.insert(5, ("amount", Value::String("12.50".into())));
    let (store, record) = write_with(&retyped, fields);
    assert!(matches!(
        decode(&store, &record),
        DecodeError::InvalidField { field: "amount", .. }
    ));

    // A known name whose type cannot hold a contract field at all.
    let boolean = base.replace(
        r#"{"name": "amount", "type": "double""#,
        r#"{"name": "amount", "type": "boolean""#,
    );
    let mut fields = purchase_fields(completed(), None, 0);
    fields.insert(5, ("amount", Value::Boolean(true)));
    let (store, record) = write_with(&boolean, fields);
    assert_eq!(decode(&store, &record).reason(), "invalid_avro");
}

/// The decoder the plan replaced: apache-avro 0.22's direct serde reader into a tolerant field
/// map, kept verbatim as an oracle. On any input the plan must accept what it accepted and
/// refuse what it refused, for the same reason. The intended differences: fields we do not
/// know that hold an enum or a record (it refused every such record), nesting beyond
/// `plan::MAX_DEPTH` (it overflowed the stack), and lengths and counts beyond the bytes left
/// (it allocated up to 512 MiB before finding out).
mod serde_oracle {
    use serde::Deserialize;

    use super::*;

    /// Writer schemas by id, read the old way.
    pub(super) struct Oracle(pub(super) HashMap<u32, Schema>);

    impl Oracle {
        pub(super) fn decode(&self, source: Source, record: &[u8]) -> Result<ContactEvent, DecodeError> {
            let (id, mut body) = split_frame(record)?;
            let schema = self.0.get(&id).ok_or(DecodeError::UnknownSchema(id))?;
            let wire: AvroWire = GenericDatumReader::builder(schema)
                .build()
                .unwrap()
                .read_deser(&mut body)
                .map_err(|error| DecodeError::Avro(error.to_string()))?;
            if !body.is_empty() {
                return Err(DecodeError::Avro(format!("{} bytes after the record", body.len())));
            }
            let slots = Slots(std::array::from_fn(|index| match &wire.0[index] {
                Scalar::Null => Slot::Null,
                Scalar::Text(text) => Slot::Text(text),
                Scalar::Long(number) => Slot::Long(*number),
                Scalar::Double(number) => Slot::Double(*number),
            }));
            into_event(&slots, source)
        }
    }

    #[derive(Clone, Debug, Default, PartialEq)]
    enum Scalar {
        #[default]
        Null,
        Text(String),
        Long(i64),
        Double(f64),
    }

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(ScalarVisitor)
        }
    }

    struct ScalarVisitor;

    impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
        type Value = Scalar;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("null, a string, an enum symbol or a number")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Scalar, E> {
            Ok(Scalar::Null)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Scalar, E> {
            Ok(Scalar::Null)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Scalar, D::Error> {
            deserializer.deserialize_any(self)
        }

        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Scalar, E> {
            Ok(Scalar::Text(value.to_owned()))
        }

        fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Scalar, E> {
            Ok(Scalar::Text(value))
        }

        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Scalar, E> {
            Ok(Scalar::Long(value))
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Scalar, E> {
            i64::try_from(value).map(Scalar::Long).map_err(E::custom)
        }

        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Scalar, E> {
            Ok(Scalar::Double(value))
        }

        fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Scalar, A::Error> {
            use serde::de::VariantAccess;
            let (Symbol(symbol), variant): (Symbol, _) = data.variant()?;
            variant.unit_variant()?;
            Ok(Scalar::Text(symbol))
        }
    }

    struct Symbol(String);

    impl<'de> Deserialize<'de> for Symbol {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct SymbolVisitor;
            impl serde::de::Visitor<'_> for SymbolVisitor {
                type Value = Symbol;

                fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    formatter.write_str("an enum symbol")
                }

                fn visit_str<E: serde::de::Error>(self, symbol: &str) -> Result<Symbol, E> {
                    Ok(Symbol(symbol.to_owned()))
                }
            }
            deserializer.deserialize_identifier(SymbolVisitor)
        }
    }

    #[derive(Debug, Default)]
    struct AvroWire([Scalar; FIELD_COUNT]);

    impl<'de> Deserialize<'de> for AvroWire {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(WireVisitor)
        }
    }

    struct WireVisitor;

    struct FieldName(Option<usize>);

    impl<'de> Deserialize<'de> for FieldName {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct NameVisitor;
            impl serde::de::Visitor<'_> for NameVisitor {
                type Value = FieldName;

                fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    formatter.write_str("a field name")
                }

                fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<FieldName, E> {
                    Ok(FieldName(field_index(name)))
                }
            }
            deserializer.deserialize_identifier(NameVisitor)
        }
    }

    impl<'de> serde::de::Visitor<'de> for WireVisitor {
        type Value = AvroWire;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("an event record")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AvroWire, A::Error> {
            let mut wire = AvroWire::default();
            while let Some(FieldName(index)) = map.next_key::<FieldName>()? {
                match index {
                    Some(index) => wire.0[index] = map.next_value()?,
                    None => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
            }
            Ok(wire)
        }
    }
}

use serde_oracle::Oracle;

// ---- Evolved writer schemas ----

/// Extra fields that no version of the contract knows, of every type the serde reader could
/// skip: primitives, logical types, fixed, arrays, maps, nested containers, unions.
const EXTRA_FIELDS: &str = r#"[
    {"name": "x_null", "type": "null"},
    {"name": "x_boolean", "type": "boolean"},
    {"name": "x_int", "type": "int"},
    {"name": "x_long", "type": "long"},
    {"name": "x_float", "type": "float"},
    {"name": "x_double", "type": "double"},
    {"name": "x_bytes", "type": "bytes"},
    {"name": "x_string", "type": "string"},
    {"name": "x_fixed", "type": {"type": "fixed", "name": "Digest", "size": 4}},
    {"name": "x_array", "type": {"type": "array", "items": "string"}},
    {"name": "x_map", "type": {"type": "map", "values": "long"}},
    {"name": "x_nested", "type": {"type": "map", "values": {"type": "array", "items": ["null", "bytes"]}}},
    {"name": "x_union", "type": ["null", "int", "string", {"type": "fixed", "name": "Tag", "size": 2}]},
    {"name": "x_date", "type": {"type": "int", "logicalType": "date"}},
    {"name": "x_micros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "x_decimal", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
    {"name": "x_uuid", "type": {"type": "string", "logicalType": "uuid"}}
]"#;

/// Extra fields of the types the serde reader could not skip (it refused every record with
/// one): enums and records, including a recursive record, references to named types, and
/// records inside maps and unions.
const EXTRA_NAMED_FIELDS: &str = r#"[
    {"name": "x_enum", "type": {"type": "enum", "name": "Channel", "symbols": ["web", "app", "store"]}},
    {"name": "x_enum_union", "type": ["null", {"type": "enum", "name": "Tier", "symbols": ["free", "paid"]}]},
    {"name": "x_record", "type": {"type": "record", "name": "Extra", "fields": [
        {"name": "device", "type": {"type": "enum", "name": "Device", "symbols": ["mobile", "desktop"]}},
        {"name": "devices", "type": {"type": "array", "items": "Device"}},
        {"name": "scores", "type": {"type": "array", "items": "double"}},
        {"name": "labels", "type": {"type": "map", "values": {"type": "record", "name": "Label", "fields": [
            {"name": "on", "type": "boolean"}, {"name": "note", "type": ["null", "string"]}]}}},
        {"name": "first", "type": ["null", "Label"]}
    ]}},
    {"name": "x_list", "type": {"type": "record", "name": "Cell", "fields": [
        {"name": "head", "type": "int"}, {"name": "tail", "type": ["null", "Cell"]}]}}
]"#;

/// The optional field each evolved writer schema drops.
fn removed_field(source: Source) -> &'static str {
    match source {
        Source::Clickstream => "phone",
        Source::AdConversion => "ad_id",
        Source::Purchase => "anonymous_id",
    }
}

/// `event` as it reads when the writer did not have [`removed_field`].
fn without_removed_field(mut event: ContactEvent) -> ContactEvent {
    match &mut event.body {
        EventBody::Click(click) => click.phone = None,
        EventBody::AdConversion(conversion) => conversion.ad_id = None,
        EventBody::Purchase(_) => event.anonymous_id = None,
    }
    event
}

/// The shipped schema of `source` without its [`removed_field`], with `extras` added and the
/// fields put in the order of `order` (a sort key per field; ties keep their place).
fn evolved_schema_text(source: Source, extras: &[&str], order: &[u32]) -> String {
    let mut schema: serde_json::Value = serde_json::from_str(&shipped_schema_text(source)).unwrap();
    let mut fields: Vec<serde_json::Value> = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|field| field["name"] != removed_field(source))
        .cloned()
        .collect();
    for extra in extras {
        let extra: Vec<serde_json::Value> = serde_json::from_str(extra).unwrap();
        fields.extend(extra);
    }
    let mut keyed: Vec<(u32, serde_json::Value)> = fields
        .into_iter()
        .enumerate()
        .map(|(index, field)| (order.get(index).copied().unwrap_or(0), field))
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    schema["fields"] = serde_json::Value::Array(keyed.into_iter().map(|(_, field)| field).collect());
    schema.to_string()
}

/// A record of `schema_text` framed under `id`: the contract fields from `event`, the extra
/// ones from `extras`.
fn evolved_record(id: u32, schema_text: &str, event: &ContactEvent, extras: &HashMap<String, Value>) -> Vec<u8> {
    let schema = Schema::parse_str(schema_text).unwrap();
    let Schema::Record(record) = &schema else {
        panic!("not a record")
    };
    let known = fields_of(event);
    let values: Vec<(String, Value)> = record
        .fields
        .iter()
        .map(|field| {
            let value = match extras.get(&field.name) {
                Some(extra) => extra.clone(),
                None => {
                    let slot = known
                        .iter()
                        .find(|(name, _)| *name == field.name)
                        .map_or(Slot::Null, |(_, slot)| *slot);
                    to_avro(&field.schema, slot, &field.name).unwrap()
                }
            };
            (field.name.clone(), value)
        })
        .collect();
    let mut framed = vec![MAGIC];
    framed.extend_from_slice(&id.to_be_bytes());
    framed.extend(
        GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(Value::Record(values))
            .unwrap(),
    );
    framed
}

// ---- Strategies ----

fn any_text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn any_id() -> impl Strategy<Value = String> {
    // Up to 30 characters: both inline and heap-allocated compact strings.
    "\\PC{1,30}"
}

fn any_millis() -> impl Strategy<Value = i64> {
    0..=Timestamp::MAX_VALID.millis()
}

fn any_amount() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), 0.0..1e9]
}

fn any_click() -> impl Strategy<Value = ContactEvent> {
    (
        (
            any_id(),
            prop::option::of(any_id()),
            any_id(),
            any::<bool>(),
            any_millis(),
        ),
        prop::sample::select(ClickType::ALL),
        prop::collection::vec(prop::option::of(any_text()), 9),
    )
        .prop_map(
            |((event_id, contact_id, anonymous_id, keep_anonymous, millis), kind, texts)| {
                let anonymous_id = (contact_id.is_none() || keep_anonymous).then(|| CompactString::from(anonymous_id));
                let mut texts = texts.into_iter();
                let mut next = || texts.next().flatten();
                ContactEvent {
                    event_id: event_id.into(),
                    contact_id: contact_id.map(CompactString::from),
                    anonymous_id,
                    occurred_at: Timestamp::from_millis(millis),
                    body: EventBody::Click(Click {
                        kind,
                        url: next(),
                        user_agent: next(),
                        ip: next(),
                        email: next(),
                        phone: next(),
                        fbc: next(),
                        fbp: next(),
                        ttclid: next(),
                        campaign_id: next(),
                    }),
                }
            },
        )
}

fn any_conversion() -> impl Strategy<Value = ContactEvent> {
    (
        (any_id(), any_id(), prop::option::of(any_id()), any_millis()),
        prop::sample::select(Platform::ALL),
        any_id(),
        prop::collection::vec(prop::option::of(any_text()), 4),
        prop::option::of(any_amount()),
    )
        .prop_map(
            |((event_id, contact_id, anonymous_id, millis), platform, event_name, texts, value)| {
                let mut texts = texts.into_iter();
                let mut next = || texts.next().flatten();
                ContactEvent {
                    event_id: event_id.into(),
                    contact_id: Some(contact_id.into()),
                    anonymous_id: anonymous_id.map(CompactString::from),
                    occurred_at: Timestamp::from_millis(millis),
                    body: EventBody::AdConversion(AdConversion {
                        platform,
                        event_name: event_name.into(),
                        campaign_id: next(),
                        ad_id: next(),
                        click_id: next(),
                        value,
                        currency: next(),
                    }),
                }
            },
        )
}

fn any_purchase() -> impl Strategy<Value = ContactEvent> {
    (
        (any_id(), any_id(), prop::option::of(any_id()), any_millis()),
        (any_id(), any_amount(), any_id()),
        prop::sample::select(PurchaseStatus::ALL),
    )
        .prop_map(
            |((event_id, contact_id, anonymous_id, millis), (order_id, amount, currency), status)| ContactEvent {
                event_id: event_id.into(),
                contact_id: Some(contact_id.into()),
                anonymous_id: anonymous_id.map(CompactString::from),
                occurred_at: Timestamp::from_millis(millis),
                body: EventBody::Purchase(Purchase {
                    order_id: order_id.into(),
                    amount,
                    currency: currency.into(),
                    status,
                }),
            },
        )
}

fn any_event() -> impl Strategy<Value = ContactEvent> {
    prop_oneof![any_click(), any_conversion(), any_purchase()]
}

/// A value of `Cell` (the recursive extra type) holding `items`.
fn cell_list(items: &[i32]) -> Value {
    items
        .iter()
        .rev()
        .fold(None, |tail: Option<Value>, head| {
            let tail = match tail {
                Some(cell) => Value::Union(1, Box::new(cell)),
                None => Value::Union(0, Box::new(Value::Null)),
            };
            Some(Value::Record(vec![
                ("head".into(), Value::Int(*head)),
                ("tail".into(), tail),
            ]))
        })
        .unwrap_or_else(|| {
            Value::Record(vec![
                ("head".into(), Value::Int(0)),
                ("tail".into(), Value::Union(0, Box::new(Value::Null))),
            ])
        })
}

fn null_or(value: Option<Value>) -> Value {
    match value {
        Some(value) => Value::Union(1, Box::new(value)),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

/// Random values of the fields of [`EXTRA_FIELDS`].
fn any_extras() -> impl Strategy<Value = HashMap<String, Value>> {
    let scalars = (
        any::<bool>(),
        any::<i32>(),
        any::<i64>(),
        any::<f32>(),
        any::<f64>(),
        prop::collection::vec(any::<u8>(), 0..20),
        any_text(),
        any::<[u8; 4]>(),
    );
    let containers = (
        prop::collection::vec(any_text(), 0..4),
        prop::collection::hash_map(any_text(), any::<i64>(), 0..4),
        prop::collection::hash_map(
            any_text(),
            prop::collection::vec(prop::option::of(prop::collection::vec(any::<u8>(), 0..4)), 0..3),
            0..3,
        ),
        (0_u32..4, any::<i32>(), any_text(), any::<[u8; 2]>()),
    );
    let logical = (
        any::<i32>(),
        any::<i64>(),
        prop::collection::vec(any::<u8>(), 1..4),
        any::<[u8; 16]>(),
    );
    (scalars, containers, logical).prop_map(|(scalars, containers, logical)| {
        let (boolean, int, long, float, double, bytes, string, fixed) = scalars;
        let (array, map, nested, (branch, union_int, union_text, tag)) = containers;
        let (date, micros, decimal, uuid) = logical;
        let nested = nested
            .into_iter()
            .map(|(key, items)| {
                let items = items.into_iter().map(|item| null_or(item.map(Value::Bytes))).collect();
                (key, Value::Array(items))
            })
            .collect();
        let union = match branch {
            0 => Value::Null,
            1 => Value::Int(union_int),
            2 => Value::String(union_text),
            _ => Value::Fixed(2, tag.to_vec()),
        };
        HashMap::from([
            ("x_null".to_owned(), Value::Null),
            ("x_boolean".to_owned(), Value::Boolean(boolean)),
            ("x_int".to_owned(), Value::Int(int)),
            ("x_long".to_owned(), Value::Long(long)),
            ("x_float".to_owned(), Value::Float(float)),
            ("x_double".to_owned(), Value::Double(double)),
            ("x_bytes".to_owned(), Value::Bytes(bytes)),
            ("x_string".to_owned(), Value::String(string)),
            ("x_fixed".to_owned(), Value::Fixed(4, fixed.to_vec())),
            (
                "x_array".to_owned(),
                Value::Array(array.into_iter().map(Value::String).collect()),
            ),
            (
                "x_map".to_owned(),
                Value::Map(map.into_iter().map(|(key, value)| (key, Value::Long(value))).collect()),
            ),
            ("x_nested".to_owned(), Value::Map(nested)),
            ("x_union".to_owned(), Value::Union(branch, Box::new(union))),
            ("x_date".to_owned(), Value::Date(date)),
            ("x_micros".to_owned(), Value::TimestampMicros(micros)),
            (
                "x_decimal".to_owned(),
                Value::Decimal(apache_avro::Decimal::from(decimal)),
            ),
            ("x_uuid".to_owned(), Value::Uuid(apache_avro::Uuid::from_bytes(uuid))),
        ])
    })
}

/// A value of `Label` (a record of [`EXTRA_NAMED_FIELDS`]).
fn label((on, note): (bool, Option<String>)) -> Value {
    Value::Record(vec![
        ("on".into(), Value::Boolean(on)),
        ("note".into(), null_or(note.map(Value::String))),
    ])
}

/// Random values of the fields of [`EXTRA_NAMED_FIELDS`].
fn any_named_extras() -> impl Strategy<Value = HashMap<String, Value>> {
    (
        (
            0_u32..3,
            prop::option::of(0_u32..2),
            0_u32..2,
            prop::collection::vec(0_u32..2, 0..4),
        ),
        prop::collection::vec(any::<f64>(), 0..4),
        prop::collection::hash_map(any_text(), (any::<bool>(), prop::option::of(any_text())), 0..3),
        prop::option::of(any::<bool>()),
        prop::collection::vec(any::<i32>(), 1..6),
    )
        .prop_map(|((channel, tier, device, devices), scores, labels, first, list)| {
            let device_value = |device: u32| Value::Enum(device, ["mobile", "desktop"][device as usize].into());
            let tier = tier.map(|tier| Value::Enum(tier, ["free", "paid"][tier as usize].into()));
            HashMap::from([
                (
                    "x_enum".to_owned(),
                    Value::Enum(channel, ["web", "app", "store"][channel as usize].into()),
                ),
                ("x_enum_union".to_owned(), null_or(tier)),
                (
                    "x_record".to_owned(),
                    Value::Record(vec![
                        ("device".into(), device_value(device)),
                        (
                            "devices".into(),
                            Value::Array(devices.into_iter().map(device_value).collect()),
                        ),
                        (
                            "scores".into(),
                            Value::Array(scores.into_iter().map(Value::Double).collect()),
                        ),
                        (
                            "labels".into(),
                            Value::Map(labels.into_iter().map(|(key, value)| (key, label(value))).collect()),
                        ),
                        ("first".into(), null_or(first.map(|on| label((on, None))))),
                    ]),
                ),
                ("x_list".to_owned(), cell_list(&list)),
            ])
        })
}

/// The reason of a result, or the event: what must not change between decoders.
fn outcome(result: Result<ContactEvent, DecodeError>) -> Result<ContactEvent, &'static str> {
    result.map_err(|error| error.reason())
}

/// The plan's result and the oracle's agree: the same event, or errors of the same reason.
fn assert_same_outcome(
    plan: Result<ContactEvent, DecodeError>,
    oracle: Result<ContactEvent, DecodeError>,
) -> Result<(), TestCaseError> {
    let message = format!("plan: {plan:?}\noracle: {oracle:?}");
    prop_assert_eq!(outcome(plan), outcome(oracle), "{}", message);
    Ok(())
}

/// Every strict prefix of `record` is refused (as a bad frame or invalid Avro), never a panic.
fn assert_every_truncation_refused(store: &SchemaStore, source: Source, record: &[u8]) {
    for cut in 0..record.len() {
        let reason = store.decode(source, &record[..cut]).unwrap_err().reason();
        let expected = if cut < HEADER_LEN {
            "bad_framing"
        } else {
            "invalid_avro"
        };
        assert_eq!(reason, expected, "cut at {cut} of {}", record.len());
    }
}

/// The shipped schemas under 1-3, and under 4 a purchase schema grown by every extra type the
/// oracle can read, with fields reversed.
fn wide_store_and_oracle() -> (SchemaStore, Oracle, String) {
    let mut store = store();
    let wide = evolved_schema_text(Source::Purchase, &[EXTRA_FIELDS], &(0..40).rev().collect::<Vec<u32>>());
    store.insert(4, "wide purchase", &wide).unwrap();
    let mut schemas = HashMap::new();
    for source in Source::ALL {
        schemas.insert(
            shipped_id(source),
            Schema::parse_str(&shipped_schema_text(source)).unwrap(),
        );
    }
    schemas.insert(4, Schema::parse_str(&wide).unwrap());
    (store, Oracle(schemas), wide)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Encode then decode gives the event back, through the shipped schema and through an
    /// evolved writer schema: extra fields of every Avro type, fields reordered, an optional
    /// field removed. Every truncation of the evolved record is refused.
    #[test]
    fn valid_events_round_trip_through_shipped_and_evolved_writer_schemas(
        event in any_event(),
        extras in any_extras(),
        named_extras in any_named_extras(),
        order in prop::collection::vec(any::<u32>(), 40),
    ) {
        let mut store = store();
        let source = event.source();
        let shipped = store.encode(shipped_id(source), &event).unwrap();
        prop_assert_eq!(store.decode(source, &shipped).unwrap(), event.clone());

        let evolved = evolved_schema_text(source, &[EXTRA_FIELDS, EXTRA_NAMED_FIELDS], &order);
        store.insert(10, "evolved", &evolved).unwrap();
        let mut all_extras = extras;
        all_extras.extend(named_extras);
        let record = evolved_record(10, &evolved, &event, &all_extras);
        prop_assert_eq!(store.decode(source, &record).unwrap(), without_removed_field(event));
        assert_every_truncation_refused(&store, source, &record);
    }

    /// Arbitrary bytes after a valid header never panic: they are refused, for the reason the
    /// serde reader gave, or (rarely) happen to be a valid record both decoders agree on.
    #[test]
    fn arbitrary_bodies_are_refused_like_before(
        id in 1_u32..=4,
        source in prop::sample::select(Source::ALL.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let (store, oracle, _) = wide_store_and_oracle();
        let mut record = vec![MAGIC];
        record.extend_from_slice(&id.to_be_bytes());
        record.extend(body);
        let decoded = store.decode(source, &record);
        if let Ok(event) = &decoded {
            // Bytes that happen to form a record: the event must be a valid one.
            let again = store.encode(shipped_id(event.source()), event).unwrap();
            prop_assert_eq!(&store.decode(event.source(), &again).unwrap(), event);
        }
        assert_same_outcome(decoded, oracle.decode(source, &record))?;
    }

    /// Valid records with bytes changed, inserted or cut are refused for the same reasons as
    /// before (or still decode the same), never a panic.
    #[test]
    fn damaged_records_are_refused_like_before(
        event in any_event(),
        extras in any_extras(),
        wide in any::<bool>(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0_u8..3), 1..4),
    ) {
        let (store, oracle, wide_text) = wide_store_and_oracle();
        let source = event.source();
        let mut record = if wide && source == Source::Purchase {
            evolved_record(4, &wide_text, &event, &extras)
        } else {
            store.encode(shipped_id(source), &event).unwrap()
        };
        for (at, byte, how) in damage {
            let at = HEADER_LEN + at.index(record.len() - HEADER_LEN + 1);
            match how {
                0 if at < record.len() => record[at] = byte,
                1 => record.insert(at, byte),
                _ => record.truncate(at),
            }
        }
        assert_same_outcome(store.decode(source, &record), oracle.decode(source, &record))?;
    }
}

#[test]
fn every_truncation_of_a_shipped_record_is_refused() {
    let store = store();
    for (id, source, event) in events() {
        assert_every_truncation_refused(&store, source, &store.encode(id, &event).unwrap());
    }
}

/// `value` as an Avro `long`: a zigzag varint.
fn zigzag_varint(value: i64) -> Vec<u8> {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let mut bytes = Vec::new();
    while zigzag >= 0x80 {
        bytes.push((zigzag as u8 & 0x7f) | 0x80);
        zigzag >>= 7;
    }
    bytes.push(zigzag as u8);
    bytes
}

/// A store with the shipped schemas and, under 11, a record of one field `x` of `field_type`
/// before the purchase fields.
fn store_with_leading_field(field_type: &str) -> SchemaStore {
    let mut store = store();
    let mut schema: serde_json::Value = serde_json::from_str(&purchase_schema_text()).unwrap();
    let field: serde_json::Value = serde_json::from_str(&format!(r#"{{"name": "x", "type": {field_type}}}"#)).unwrap();
    schema["fields"].as_array_mut().unwrap().insert(0, field);
    store.insert(11, "leading field", &schema.to_string()).unwrap();
    store
}

#[test]
fn a_huge_declared_length_is_refused_without_allocating_it() {
    // A terabyte: allocating it would abort the test process, so passing proves it never is.
    let huge: i64 = 1 << 40;
    let mut record = vec![0, 0, 0, 0, 3];
    record.extend(zigzag_varint(huge));
    record.extend_from_slice(b"not nearly enough bytes");
    let error = store().decode(Source::Purchase, &record).unwrap_err();
    assert_eq!(error.reason(), "invalid_avro");
    assert!(error.to_string().contains("event_id"), "{error}");

    // The same on skipped fields: a length of bytes, and an item count of arrays and maps
    // (also as a negative count with a block size), which is checked against the bytes left
    // before any item is read.
    for (field_type, prefix) in [
        (r#""bytes""#, zigzag_varint(huge)),
        (r#"{"type": "array", "items": "string"}"#, zigzag_varint(huge)),
        (
            r#"{"type": "array", "items": "string"}"#,
            [zigzag_varint(-huge), zigzag_varint(huge)].concat(),
        ),
        (r#"{"type": "map", "values": "long"}"#, zigzag_varint(huge)),
    ] {
        let mut record = vec![0, 0, 0, 0, 11];
        record.extend(prefix);
        let error = store_with_leading_field(field_type)
            .decode(Source::Purchase, &record)
            .unwrap_err();
        assert_eq!(error.reason(), "invalid_avro", "{field_type}: {error}");
        assert!(error.to_string().contains("field `x`"), "{error}");
    }
}

#[test]
fn a_huge_array_of_empty_values_is_skipped_without_a_loop() {
    // 2^60 nulls take no bytes: valid Avro, skipped at once instead of counted one by one.
    let store = store_with_leading_field(r#"{"type": "array", "items": "null"}"#);
    let (_, _, event) = events().remove(2);
    let shipped = store.encode(3, &event).unwrap();
    let mut record = vec![0, 0, 0, 0, 11];
    record.extend(zigzag_varint(1 << 60));
    record.push(0);
    record.extend_from_slice(&shipped[HEADER_LEN..]);
    assert_eq!(store.decode(Source::Purchase, &record).unwrap(), event);
}

#[test]
fn deep_recursive_values_are_refused_not_overflowed() {
    let store = store_with_leading_field(
        r#"{"type": "record", "name": "Cell", "fields": [
            {"name": "head", "type": "int"}, {"name": "tail", "type": ["null", "Cell"]}]}"#,
    );
    let (_, _, event) = events().remove(2);
    let shipped = store.encode(3, &event).unwrap();
    let list = |length: usize| {
        let mut record = vec![0, 0, 0, 0, 11];
        for _ in 1..length {
            record.extend_from_slice(&[2, 2]); // head 1, then the `Cell` branch of `tail`
        }
        record.extend_from_slice(&[2, 0]); // head 1, tail null
        record.extend_from_slice(&shipped[HEADER_LEN..]);
        record
    };
    assert_eq!(store.decode(Source::Purchase, &list(100)).unwrap(), event);
    let error = store.decode(Source::Purchase, &list(100_000)).unwrap_err();
    assert_eq!(error.reason(), "invalid_avro");
    assert!(error.to_string().contains("nested deeper"), "{error}");
}

#[test]
fn added_enum_and_record_fields_are_skipped() {
    // The serde reader could not ignore an enum or a record (serde's `IgnoredAny` asks for a
    // newtype variant, or for an ignored field name, and apache-avro refuses both), so a
    // producer adding such a field broke every record. The plan skips them like any other.
    let (_, source, event) = events().remove(2);
    let named: Vec<serde_json::Value> = serde_json::from_str(EXTRA_NAMED_FIELDS).unwrap();
    let values = HashMap::from([
        ("x_enum".to_owned(), Value::Enum(1, "app".into())),
        ("x_enum_union".to_owned(), null_or(Some(Value::Enum(0, "free".into())))),
        (
            "x_record".to_owned(),
            Value::Record(vec![
                ("device".into(), Value::Enum(0, "mobile".into())),
                ("devices".into(), Value::Array(vec![Value::Enum(1, "desktop".into())])),
                ("scores".into(), Value::Array(vec![Value::Double(0.5)])),
                (
                    "labels".into(),
                    Value::Map(HashMap::from([("a".to_owned(), label((true, Some("b".into()))))])),
                ),
                ("first".into(), null_or(Some(label((false, None))))),
            ]),
        ),
        ("x_list".to_owned(), cell_list(&[1, 2, 3])),
    ]);
    for field in named {
        let name = field["name"].as_str().unwrap().to_owned();
        let text = evolved_schema_text(source, &[&format!("[{field}]")], &[]);
        let mut store = store();
        store.insert(12, &name, &text).unwrap();
        let extras = HashMap::from([(name.clone(), values[&name].clone())]);
        let record = evolved_record(12, &text, &event, &extras);
        assert_eq!(
            store.decode(source, &record).unwrap(),
            without_removed_field(event.clone()),
            "{name}"
        );
        let oracle = Oracle(HashMap::from([(12, Schema::parse_str(&text).unwrap())]));
        assert_eq!(
            oracle.decode(source, &record).unwrap_err().reason(),
            "invalid_avro",
            "{name}"
        );
    }
}

#[test]
fn top_level_maps_and_unions_read_like_records() {
    // The serde reader took any map (keys as field names) and unions of records; so does the plan.
    let map_schema = r#"{"type": "map", "values": ["null", "string", "long", "double", "boolean"]}"#;
    let string = |text: &str| Value::Union(1, Box::new(Value::String(text.into())));
    let map = Value::Map(HashMap::from([
        ("event_id".to_owned(), string("e")),
        ("contact_id".to_owned(), string("c")),
        ("occurred_at".to_owned(), Value::Union(2, Box::new(Value::Long(1_000)))),
        ("order_id".to_owned(), string("o")),
        ("amount".to_owned(), Value::Union(3, Box::new(Value::Double(2.5)))),
        ("currency".to_owned(), string("EUR")),
        ("status".to_owned(), string("completed")),
        ("coupon".to_owned(), Value::Union(4, Box::new(Value::Boolean(true)))),
    ]));
    let union_schema = format!(r#"["null", {}]"#, purchase_schema_text());
    let (_, _, event) = events().remove(2);
    let mut store = store();
    store.insert(13, "map", map_schema).unwrap();
    store.insert(14, "union", &union_schema).unwrap();
    store.insert(15, "string", r#""string""#).unwrap();
    let oracle = Oracle(HashMap::from([
        (13, Schema::parse_str(map_schema).unwrap()),
        (14, Schema::parse_str(&union_schema).unwrap()),
        (15, Schema::String),
    ]));
    let frame = |id: u8, schema: &Schema, value: Value| {
        let mut record = vec![0, 0, 0, 0, id];
        record.extend(
            GenericDatumWriter::builder(schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap(),
        );
        record
    };
    let from_map = frame(13, &oracle.0[&13], map);
    let decoded = store.decode(Source::Purchase, &from_map).unwrap();
    assert_eq!(decoded.occurred_at.millis(), 1_000);
    assert_eq!(
        outcome(Ok(decoded)),
        outcome(oracle.decode(Source::Purchase, &from_map))
    );

    let shipped = store.encode(3, &event).unwrap();
    let mut from_union = vec![0, 0, 0, 0, 14, 2];
    from_union.extend_from_slice(&shipped[HEADER_LEN..]);
    assert_eq!(store.decode(Source::Purchase, &from_union).unwrap(), event);
    assert_eq!(oracle.decode(Source::Purchase, &from_union).unwrap(), event);
    let null_branch = [0, 0, 0, 0, 14, 0];
    assert_eq!(
        store.decode(Source::Purchase, &null_branch).unwrap_err().reason(),
        "invalid_avro"
    );
    assert_eq!(
        oracle.decode(Source::Purchase, &null_branch).unwrap_err().reason(),
        "invalid_avro"
    );

    let not_a_record = [0, 0, 0, 0, 15, 2, b'e'];
    assert_eq!(
        store.decode(Source::Purchase, &not_a_record).unwrap_err().reason(),
        "invalid_avro"
    );
    assert_eq!(
        oracle.decode(Source::Purchase, &not_a_record).unwrap_err().reason(),
        "invalid_avro"
    );
}
