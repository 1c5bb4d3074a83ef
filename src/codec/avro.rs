//! Confluent-framed Avro <-> domain events: the wire format of the Kafka input topics.
//!
//! A record is `0x00`, a 4-byte big-endian schema id, then the Avro binary body written with
//! that schema. The schema id is looked up in a [`SchemaStore`] (filled with the shipped
//! `schemas/*.avsc` under configured ids; the schema-registry client of the Kafka service adds
//! fetched schemas the same way).
//!
//! Decoding: when a schema is added, the writer schema is compiled once into a decode plan
//! (`plan`): per writer field, either the contract field it feeds and a typed reader, or a
//! skip routine for a field we do not know. A record is then read straight from its borrowed
//! bytes into an array of field slots (strings stay slices of the record until the event owns
//! them), with no Avro `Value`, no serde and no per-record schema work. apache-avro still
//! parses the schemas and encodes (for producers and tests); its serde reader, used before,
//! allocated every string (ids included, which the event keeps inline) and cost about three
//! times as much per record.
//!
//! Schema evolution is resolved by field name, not by a reader schema: a writer schema that
//! adds fields of any type, drops optional ones or reorders them decodes the same; enum
//! symbols are matched by their text, so an unknown symbol is a per-record error, like a
//! missing required field or a known field of another type. Validation is shared with the
//! JSON codec ([`json::build_event`](super::json)), so both formats mean the same.
//!
//! Writers are built once per schema and kept for the life of the process: their schemas are
//! leaked on purpose (a handful per process, only ever added), which lets a writer borrow its
//! schema without a self-referential store.

mod plan;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::path::Path;

use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

use self::plan::DecodePlan;
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

/// One known writer schema with its decode plan and writer, built once.
struct Entry {
    schema: &'static Schema,
    plan: DecodePlan,
    writer: GenericDatumWriter<'static>,
}

/// Writer schemas by id, each with its compiled decode plan.
pub struct SchemaStore {
    /// Looked up once per record: foldhash rather than SipHash, ids are not attacker-chosen
    /// keys of a growing table (a handful, added by configuration or the registry).
    entries: foldhash::HashMap<u32, Entry>,
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
            entries: foldhash::HashMap::default(),
        }
    }

    /// Adds (or replaces) the schema under `id` from its JSON text, compiling its decode plan.
    pub fn insert(&mut self, id: u32, name: &str, text: &str) -> Result<(), SchemaError> {
        let parse_error = |message: String| SchemaError::Parse {
            name: name.to_owned(),
            message,
        };
        let schema: &'static Schema = Box::leak(Box::new(
            Schema::parse_str(text).map_err(|error| parse_error(error.to_string()))?,
        ));
        let plan = DecodePlan::compile(schema).map_err(parse_error)?;
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|error| parse_error(error.to_string()))?;
        self.entries.insert(id, Entry { schema, plan, writer });
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
        let (id, body) = split_frame(record)?;
        let entry = self.entries.get(&id).ok_or(DecodeError::UnknownSchema(id))?;
        let mut slots = Slots([Slot::Null; FIELD_COUNT]);
        entry.plan.read(body, &mut slots)?;
        into_event(&slots, source)
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
    let Some((&[magic, id_0, id_1, id_2, id_3], body)) = record.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Framing(format!(
            "{} bytes, shorter than the 5-byte header",
            record.len()
        )));
    };
    if magic != MAGIC {
        return Err(DecodeError::Framing(format!("magic byte {magic:#04x}, expected 0x00")));
    }
    Ok((u32::from_be_bytes([id_0, id_1, id_2, id_3]), body))
}

/// One field's value as read from a record, borrowed from the record bytes (strings) or from
/// the decode plan (enum symbols). Tolerant of the writer's choice: the same slot takes a
/// required or a nullable field, an int or a long.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Slot<'a> {
    /// Absent or null.
    #[default]
    Null,
    /// A string or an enum symbol.
    Text(&'a str),
    /// An int, long or timestamp.
    Long(i64),
    /// A float or double.
    Double(f64),
}

/// The values of every contract field in one record, by slot (see [`field_index`]). Any input
/// schema's fields: name matching is the schema resolution (see the module docs).
#[derive(Debug)]
struct Slots<'a>([Slot<'a>; FIELD_COUNT]);

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

/// The contract field name of each slot, in slot order (the constants above).
const FIELD_NAMES: [&str; FIELD_COUNT] = [
    field::EVENT_ID,
    field::CONTACT_ID,
    "anonymous_id",
    field::OCCURRED_AT,
    field::TYPE,
    "url",
    "user_agent",
    "ip",
    "email",
    "phone",
    "fbc",
    "fbp",
    "ttclid",
    "campaign_id",
    field::PLATFORM,
    field::EVENT_NAME,
    "ad_id",
    "click_id",
    field::VALUE,
    field::CURRENCY,
    field::ORDER_ID,
    field::AMOUNT,
    field::STATUS,
];

/// The slot of a record field, `None` for fields this version does not know.
fn field_index(name: &str) -> Option<usize> {
    FIELD_NAMES.iter().position(|known| *known == name)
}

/// A text field's value, or the error for a field of another type.
#[inline(always)]
fn text<'a>(slots: &[Slot<'a>; FIELD_COUNT], index: usize) -> Result<Option<Cow<'a, str>>, DecodeError> {
    match slots[index] {
        Slot::Null => Ok(None),
        Slot::Text(text) => Ok(Some(Cow::Borrowed(text))),
        other => Err(mistyped(index, other)),
    }
}

/// A number field's value, or the error for a field of another type.
#[inline(always)]
fn number(slots: &[Slot<'_>; FIELD_COUNT], index: usize) -> Result<Option<f64>, DecodeError> {
    match slots[index] {
        Slot::Null => Ok(None),
        Slot::Double(number) => Ok(Some(number)),
        Slot::Long(number) => Ok(Some(number as f64)),
        other => Err(mistyped(index, other)),
    }
}

/// The error for a field whose value has the wrong type (kept out of the inlined paths).
#[cold]
fn mistyped(index: usize, value: Slot<'_>) -> DecodeError {
    let reason = match value {
        Slot::Text(_) => "expected a number, got a string".to_owned(),
        other => format!("expected a string, got {other:?}"),
    };
    DecodeError::InvalidField {
        field: FIELD_NAMES[index],
        reason,
    }
}

/// Validates a record's fields into an event of `source`; strings are copied once, into the
/// event's own types, by [`build_event`].
fn into_event(Slots(slots): &Slots<'_>, source: Source) -> Result<ContactEvent, DecodeError> {
    let millis = match slots[OCCURRED_AT] {
        Slot::Long(millis) => millis,
        Slot::Null => return Err(DecodeError::MissingField(field::OCCURRED_AT)),
        other => {
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
    let wire = WireEvent {
        source: None,
        event_id: text(slots, EVENT_ID)?,
        contact_id: text(slots, CONTACT_ID)?,
        anonymous_id: text(slots, ANONYMOUS_ID)?,
        occurred_at: None,
        kind: text(slots, TYPE)?,
        url: text(slots, URL)?,
        user_agent: text(slots, USER_AGENT)?,
        ip: text(slots, IP)?,
        email: text(slots, EMAIL)?,
        phone: text(slots, PHONE)?,
        fbc: text(slots, FBC)?,
        fbp: text(slots, FBP)?,
        ttclid: text(slots, TTCLID)?,
        campaign_id: text(slots, CAMPAIGN_ID)?,
        platform: text(slots, PLATFORM)?,
        event_name: text(slots, EVENT_NAME)?,
        ad_id: text(slots, AD_ID)?,
        click_id: text(slots, CLICK_ID)?,
        value: number(slots, VALUE)?,
        currency: text(slots, CURRENCY)?,
        order_id: text(slots, ORDER_ID)?,
        amount: number(slots, AMOUNT)?,
        status: text(slots, STATUS)?,
    };
    build_event(wire, source, occurred_at)
}

/// An optional text field's slot.
fn optional<T: AsRef<str>>(value: &Option<T>) -> Slot<'_> {
    value.as_ref().map_or(Slot::Null, |text| Slot::Text(text.as_ref()))
}

/// The fields of `event` by contract name.
fn fields_of(event: &ContactEvent) -> Vec<(&'static str, Slot<'_>)> {
    let mut fields = vec![
        (field::EVENT_ID, Slot::Text(&event.event_id)),
        (field::CONTACT_ID, optional(&event.contact_id)),
        ("anonymous_id", optional(&event.anonymous_id)),
        (field::OCCURRED_AT, Slot::Long(event.occurred_at.millis())),
    ];
    match &event.body {
        EventBody::Click(click) => fields.extend([
            (field::TYPE, Slot::Text(click.kind.as_str())),
            ("url", optional(&click.url)),
            ("user_agent", optional(&click.user_agent)),
            ("ip", optional(&click.ip)),
            ("email", optional(&click.email)),
            ("phone", optional(&click.phone)),
            ("fbc", optional(&click.fbc)),
            ("fbp", optional(&click.fbp)),
            ("ttclid", optional(&click.ttclid)),
            ("campaign_id", optional(&click.campaign_id)),
        ]),
        EventBody::AdConversion(conversion) => fields.extend([
            (field::PLATFORM, Slot::Text(conversion.platform.as_str())),
            (field::EVENT_NAME, Slot::Text(&conversion.event_name)),
            ("campaign_id", optional(&conversion.campaign_id)),
            ("ad_id", optional(&conversion.ad_id)),
            ("click_id", optional(&conversion.click_id)),
            (field::VALUE, conversion.value.map_or(Slot::Null, Slot::Double)),
            (field::CURRENCY, optional(&conversion.currency)),
        ]),
        EventBody::Purchase(purchase) => fields.extend([
            (field::ORDER_ID, Slot::Text(&purchase.order_id)),
            (field::AMOUNT, Slot::Double(purchase.amount)),
            (field::CURRENCY, Slot::Text(&purchase.currency)),
            (field::STATUS, Slot::Text(purchase.status.as_str())),
        ]),
    }
    fields
}

/// `value` as an Avro value of `schema`.
fn to_avro(schema: &Schema, value: Slot<'_>, name: &str) -> Result<Value, String> {
    let mismatch = || format!("field `{name}`: {value:?} does not fit {schema:?}");
    Ok(match (schema, value) {
        (Schema::Union(union), _) => {
            let wanted_null = value == Slot::Null;
            let (index, variant) = union
                .variants()
                .iter()
                .enumerate()
                .find(|(_, variant)| (**variant == Schema::Null) == wanted_null)
                .ok_or_else(mismatch)?;
            let index = u32::try_from(index).map_err(|_| mismatch())?;
            Value::Union(index, Box::new(to_avro(variant, value, name)?))
        }
        (Schema::Null, Slot::Null) => Value::Null,
        (Schema::String, Slot::Text(text)) => Value::String(text.to_owned()),
        (Schema::Enum(enumeration), Slot::Text(symbol)) => {
            let index = enumeration
                .symbols
                .iter()
                .position(|known| known == symbol)
                .ok_or_else(mismatch)?;
            Value::Enum(u32::try_from(index).map_err(|_| mismatch())?, symbol.to_owned())
        }
        (Schema::TimestampMillis, Slot::Long(millis)) => Value::TimestampMillis(millis),
        (Schema::Long, Slot::Long(number)) => Value::Long(number),
        (Schema::Double, Slot::Double(number)) => Value::Double(number),
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
            let value = fields
                .iter()
                .find(|(name, _)| *name == field.name)
                .map_or(Slot::Null, |(_, value)| *value);
            Ok((field.name.clone(), to_avro(&field.schema, value, &field.name)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Value::Record(values))
}
