//! Confluent-framed Avro <-> domain events: the wire format of the Kafka input topics.
//!
//! A record is `0x00`, a 4-byte big-endian schema id, then the Avro binary body written with
//! that schema. The schema id is looked up in a [`SchemaStore`] (filled with the shipped
//! `schemas/*.avsc` under configured ids; the schema-registry client of the Kafka service adds
//! fetched schemas the same way), and the body is decoded with the writer's schema straight
//! into a tolerant field map, without building an Avro `Value`.
//!
//! Schema evolution: apache-avro 0.22's direct serde reader cannot apply a reader schema yet
//! (`GenericDatumReader::read_deser` panics when one is set), so resolution is done by serde's
//! field matching instead: every field of the wire struct is optional and unknown fields are
//! ignored, so a writer schema that adds fields, drops optional ones or reorders them decodes
//! the same; enum symbols arrive as strings and an unknown symbol is a per-record error, like a
//! missing required field. Validation is shared with the JSON codec
//! ([`json::build_event`](super::json)), so both formats mean the same.
//!
//! Readers are built once per schema and kept for the life of the process: their schemas are
//! leaked on purpose (a handful per process, only ever added), which lets a reader borrow its
//! schema without a self-referential store.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::Deserialize;

use super::json::{build_event, field, WireEvent};
use super::DecodeError;
use crate::domain::{ContactEvent, EventBody, Source, Timestamp};

/// The magic byte of the Confluent wire format.
pub const MAGIC: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// The shipped schema file of each input source.
pub fn schema_file(source: Source) -> &'static str {
    match source {
        Source::Clickstream => "clickstream_event.avsc",
        Source::AdConversion => "ad_conversion_event.avsc",
        Source::Purchase => "purchase_event.avsc",
    }
}

/// Why a schema could not be added to the store.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file could not be read.
    #[error("cannot read schema {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a valid Avro schema.
    #[error("invalid Avro schema {name}: {message}")]
    Parse {
        /// File name or registry id.
        name: String,
        /// The parser's message.
        message: String,
    },
}

/// One known writer schema with its reader and writer, built once.
struct Entry {
    schema: &'static Schema,
    reader: GenericDatumReader<'static>,
    writer: GenericDatumWriter<'static>,
}

/// Writer schemas by id, each with its prepared reader.
pub struct SchemaStore {
    entries: HashMap<u32, Entry>,
}

impl std::fmt::Debug for SchemaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&u32> = self.entries.keys().collect();
        ids.sort_unstable();
        f.debug_struct("SchemaStore").field("ids", &ids).finish()
    }
}

impl SchemaStore {
    /// An empty store.
    pub fn new() -> Self {
        SchemaStore {
            entries: HashMap::new(),
        }
    }

    /// Adds (or replaces) the schema under `id` from its JSON text.
    pub fn insert(&mut self, id: u32, name: &str, text: &str) -> Result<(), SchemaError> {
        let parse_error = |message: String| SchemaError::Parse {
            name: name.to_owned(),
            message,
        };
        let schema: &'static Schema = Box::leak(Box::new(
            Schema::parse_str(text).map_err(|error| parse_error(error.to_string()))?,
        ));
        let reader = GenericDatumReader::builder(schema)
            .build()
            .map_err(|error| parse_error(error.to_string()))?;
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|error| parse_error(error.to_string()))?;
        self.entries.insert(id, Entry { schema, reader, writer });
        Ok(())
    }

    /// Adds the schema in `path` under `id`.
    pub fn insert_file(&mut self, id: u32, path: &Path) -> Result<(), SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.insert(id, &path.display().to_string(), &text)
    }

    /// The schema under `id`, if known.
    pub fn schema(&self, id: u32) -> Option<&Schema> {
        self.entries.get(&id).map(|entry| entry.schema)
    }

    /// Decodes a Confluent-framed record of a topic carrying `source` events.
    pub fn decode(&self, source: Source, record: &[u8]) -> Result<ContactEvent, DecodeError> {
        let (id, mut body) = split_frame(record)?;
        let entry = self.entries.get(&id).ok_or(DecodeError::UnknownSchema(id))?;
        let wire: AvroWire = entry
            .reader
            .read_deser(&mut body)
            .map_err(|error| DecodeError::Avro(error.to_string()))?;
        if !body.is_empty() {
            return Err(DecodeError::Avro(format!("{} bytes after the record", body.len())));
        }
        wire.into_event(source)
    }

    /// Encodes `event` with the schema under `id`, framed. For producers and tests; the
    /// service itself only reads these records.
    pub fn encode(&self, id: u32, event: &ContactEvent) -> Result<Vec<u8>, DecodeError> {
        let entry = self.entries.get(&id).ok_or(DecodeError::UnknownSchema(id))?;
        let mut record = Vec::with_capacity(256);
        record.push(MAGIC);
        record.extend_from_slice(&id.to_be_bytes());
        let value = record_of(entry.schema, event).map_err(DecodeError::Avro)?;
        entry
            .writer
            .write_value_ref(&mut record, &value)
            .map_err(|error| DecodeError::Avro(error.to_string()))?;
        Ok(record)
    }
}

impl Default for SchemaStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits a Confluent frame into schema id and body.
pub fn split_frame(record: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    if record.len() < HEADER_LEN {
        return Err(DecodeError::Framing(format!(
            "{} bytes, shorter than the 5-byte header",
            record.len()
        )));
    }
    if record[0] != MAGIC {
        return Err(DecodeError::Framing(format!(
            "magic byte {:#04x}, expected 0x00",
            record[0]
        )));
    }
    let id = u32::from_be_bytes([record[1], record[2], record[3], record[4]]);
    Ok((id, &record[HEADER_LEN..]))
}

/// One field's value as read from any Avro schema: a tolerant stand-in for `Option<String>`,
/// `i64` and `f64` that accepts the field whether the writer declared it required or nullable
/// (serde's `Option` would demand a `["null", T]` union), and an enum symbol as its text.
#[derive(Clone, Debug, Default, PartialEq)]
enum Scalar {
    /// Absent or null.
    #[default]
    Null,
    /// A string or an enum symbol (moved, not copied: the Avro reader hands strings over owned).
    Text(String),
    /// An int, long or timestamp.
    Long(i64),
    /// A float or double.
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

/// An enum symbol's text (the Avro reader hands symbols out as identifiers).
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

/// Every field of the three input schemas, each optional: name matching is the schema
/// resolution (see the module docs). Read as a map, because the derived struct reader would
/// insist that the Rust type's name equal the Avro record's.
#[derive(Debug, Default)]
struct AvroWire([Scalar; FIELD_COUNT]);

const FIELD_COUNT: usize = 23;
const EVENT_ID: usize = 0;
const CONTACT_ID: usize = 1;
const ANONYMOUS_ID: usize = 2;
const OCCURRED_AT: usize = 3;
const TYPE: usize = 4;
const URL: usize = 5;
const USER_AGENT: usize = 6;
const IP: usize = 7;
const EMAIL: usize = 8;
const PHONE: usize = 9;
const FBC: usize = 10;
const FBP: usize = 11;
const TTCLID: usize = 12;
const CAMPAIGN_ID: usize = 13;
const PLATFORM: usize = 14;
const EVENT_NAME: usize = 15;
const AD_ID: usize = 16;
const CLICK_ID: usize = 17;
const VALUE: usize = 18;
const CURRENCY: usize = 19;
const ORDER_ID: usize = 20;
const AMOUNT: usize = 21;
const STATUS: usize = 22;

/// The slot of a record field, `None` for fields this version does not know.
fn field_index(name: &str) -> Option<usize> {
    Some(match name {
        "event_id" => EVENT_ID,
        "contact_id" => CONTACT_ID,
        "anonymous_id" => ANONYMOUS_ID,
        "occurred_at" => OCCURRED_AT,
        "type" => TYPE,
        "url" => URL,
        "user_agent" => USER_AGENT,
        "ip" => IP,
        "email" => EMAIL,
        "phone" => PHONE,
        "fbc" => FBC,
        "fbp" => FBP,
        "ttclid" => TTCLID,
        "campaign_id" => CAMPAIGN_ID,
        "platform" => PLATFORM,
        "event_name" => EVENT_NAME,
        "ad_id" => AD_ID,
        "click_id" => CLICK_ID,
        "value" => VALUE,
        "currency" => CURRENCY,
        "order_id" => ORDER_ID,
        "amount" => AMOUNT,
        "status" => STATUS,
        _ => return None,
    })
}

impl<'de> Deserialize<'de> for AvroWire {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(WireVisitor)
    }
}

struct WireVisitor;

/// A record field's slot in [`AvroWire`] (no allocation), `None` when unknown.
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

/// A text field's value, or the error for a field of another type.
fn text(value: Scalar, name: &'static str) -> Result<Option<Cow<'static, str>>, DecodeError> {
    match value {
        Scalar::Null => Ok(None),
        Scalar::Text(text) => Ok(Some(Cow::Owned(text))),
        other => Err(DecodeError::InvalidField {
            field: name,
            reason: format!("expected a string, got {other:?}"),
        }),
    }
}

/// A number field's value, or the error for a field of another type.
fn number(value: Scalar, name: &'static str) -> Result<Option<f64>, DecodeError> {
    match value {
        Scalar::Null => Ok(None),
        Scalar::Double(number) => Ok(Some(number)),
        Scalar::Long(number) => Ok(Some(number as f64)),
        Scalar::Text(_) => Err(DecodeError::InvalidField {
            field: name,
            reason: "expected a number, got a string".into(),
        }),
    }
}

impl AvroWire {
    fn into_event(mut self, source: Source) -> Result<ContactEvent, DecodeError> {
        let millis = match self.0[OCCURRED_AT] {
            Scalar::Long(millis) => millis,
            Scalar::Null => return Err(DecodeError::MissingField(field::OCCURRED_AT)),
            ref other => {
                return Err(DecodeError::InvalidField {
                    field: field::OCCURRED_AT,
                    reason: format!("expected timestamp-millis, got {other:?}"),
                })
            }
        };
        let occurred_at = Timestamp::from_millis(millis);
        if !occurred_at.is_plausible() {
            return Err(DecodeError::InvalidField {
                field: field::OCCURRED_AT,
                reason: format!("{millis} ms is outside the accepted range 1970-01-01 to 2200-01-01"),
            });
        }
        let mut take = |index: usize| std::mem::take(&mut self.0[index]);
        let wire = WireEvent {
            source: None,
            event_id: text(take(EVENT_ID), field::EVENT_ID)?,
            contact_id: text(take(CONTACT_ID), field::CONTACT_ID)?,
            anonymous_id: text(take(ANONYMOUS_ID), "anonymous_id")?,
            occurred_at: None,
            kind: text(take(TYPE), field::TYPE)?,
            url: text(take(URL), "url")?,
            user_agent: text(take(USER_AGENT), "user_agent")?,
            ip: text(take(IP), "ip")?,
            email: text(take(EMAIL), "email")?,
            phone: text(take(PHONE), "phone")?,
            fbc: text(take(FBC), "fbc")?,
            fbp: text(take(FBP), "fbp")?,
            ttclid: text(take(TTCLID), "ttclid")?,
            campaign_id: text(take(CAMPAIGN_ID), "campaign_id")?,
            platform: text(take(PLATFORM), field::PLATFORM)?,
            event_name: text(take(EVENT_NAME), field::EVENT_NAME)?,
            ad_id: text(take(AD_ID), "ad_id")?,
            click_id: text(take(CLICK_ID), "click_id")?,
            value: number(take(VALUE), field::VALUE)?,
            currency: text(take(CURRENCY), field::CURRENCY)?,
            order_id: text(take(ORDER_ID), field::ORDER_ID)?,
            amount: number(take(AMOUNT), field::AMOUNT)?,
            status: text(take(STATUS), field::STATUS)?,
        };
        build_event(wire, source, occurred_at)
    }
}

/// The fields of `event` by contract name.
fn fields_of(event: &ContactEvent) -> HashMap<&'static str, Scalar> {
    let text = |value: &Option<String>| value.clone().map_or(Scalar::Null, Scalar::Text);
    let mut fields = HashMap::from([
        (field::EVENT_ID, Scalar::Text(event.event_id.to_string())),
        (
            field::CONTACT_ID,
            event
                .contact_id
                .as_ref()
                .map_or(Scalar::Null, |id| Scalar::Text(id.to_string())),
        ),
        (
            "anonymous_id",
            event
                .anonymous_id
                .as_ref()
                .map_or(Scalar::Null, |id| Scalar::Text(id.to_string())),
        ),
        (field::OCCURRED_AT, Scalar::Long(event.occurred_at.millis())),
    ]);
    match &event.body {
        EventBody::Click(click) => fields.extend([
            (field::TYPE, Scalar::Text(click.kind.as_str().to_owned())),
            ("url", text(&click.url)),
            ("user_agent", text(&click.user_agent)),
            ("ip", text(&click.ip)),
            ("email", text(&click.email)),
            ("phone", text(&click.phone)),
            ("fbc", text(&click.fbc)),
            ("fbp", text(&click.fbp)),
            ("ttclid", text(&click.ttclid)),
            ("campaign_id", text(&click.campaign_id)),
        ]),
        EventBody::AdConversion(conversion) => fields.extend([
            (field::PLATFORM, Scalar::Text(conversion.platform.as_str().to_owned())),
            (field::EVENT_NAME, Scalar::Text(conversion.event_name.to_string())),
            ("campaign_id", text(&conversion.campaign_id)),
            ("ad_id", text(&conversion.ad_id)),
            ("click_id", text(&conversion.click_id)),
            (field::VALUE, conversion.value.map_or(Scalar::Null, Scalar::Double)),
            (field::CURRENCY, text(&conversion.currency)),
        ]),
        EventBody::Purchase(purchase) => fields.extend([
            (field::ORDER_ID, Scalar::Text(purchase.order_id.to_string())),
            (field::AMOUNT, Scalar::Double(purchase.amount)),
            (field::CURRENCY, Scalar::Text(purchase.currency.to_string())),
            (field::STATUS, Scalar::Text(purchase.status.as_str().to_owned())),
        ]),
    }
    fields
}

/// `value` as an Avro value of `schema`.
fn to_avro(schema: &Schema, value: &Scalar, name: &str) -> Result<Value, String> {
    let mismatch = || format!("field `{name}`: {value:?} does not fit {schema:?}");
    Ok(match (schema, value) {
        (Schema::Union(union), _) => {
            let wanted_null = *value == Scalar::Null;
            let (index, variant) = union
                .variants()
                .iter()
                .enumerate()
                .find(|(_, variant)| (**variant == Schema::Null) == wanted_null)
                .ok_or_else(mismatch)?;
            let index = u32::try_from(index).map_err(|_| mismatch())?;
            Value::Union(index, Box::new(to_avro(variant, value, name)?))
        }
        (Schema::Null, Scalar::Null) => Value::Null,
        (Schema::String, Scalar::Text(text)) => Value::String(text.clone()),
        (Schema::Enum(enumeration), Scalar::Text(symbol)) => {
            let index = enumeration
                .symbols
                .iter()
                .position(|known| known == symbol)
                .ok_or_else(mismatch)?;
            Value::Enum(u32::try_from(index).map_err(|_| mismatch())?, symbol.clone())
        }
        (Schema::TimestampMillis, Scalar::Long(millis)) => Value::TimestampMillis(*millis),
        (Schema::Long, Scalar::Long(number)) => Value::Long(*number),
        (Schema::Double, Scalar::Double(number)) => Value::Double(*number),
        _ => return Err(mismatch()),
    })
}

/// `event` as a record of `schema`; fields the schema has and the event lacks must be nullable.
fn record_of(schema: &Schema, event: &ContactEvent) -> Result<Value, String> {
    let Schema::Record(record) = schema else {
        return Err("the schema is not a record".into());
    };
    let fields = fields_of(event);
    let values = record
        .fields
        .iter()
        .map(|field| {
            let value = fields.get(field.name.as_str()).cloned().unwrap_or_default();
            Ok((field.name.clone(), to_avro(&field.schema, &value, &field.name)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Value::Record(values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::json::decode_event;

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
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/purchase_event.avsc"))
            .unwrap()
            .replace(
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
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/purchase_event.avsc")).unwrap()
    }

    /// A purchase record written by hand with another writer schema.
    fn write_with(schema_text: &str, fields: Vec<(&str, Value)>) -> (SchemaStore, Vec<u8>) {
        let mut store = store();
        store.insert(9, "hand-written", schema_text).unwrap();
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
        (store, record)
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
    }
}
