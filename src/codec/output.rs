//! Encoding of the service's outputs: stage changes and conversion records, as JSON or as
//! Confluent-framed Avro with the shipped `stage_change.avsc` and `conversion.avsc`.
//!
//! Writers are built once; records are serialised straight from borrowed structs through
//! apache-avro's schema-aware serializer (no `Value` tree per record).

use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::Serialize;

use super::avro::{SchemaError, MAGIC};
use crate::attribution::ConversionRecord;
use crate::codec::json::StageChangeRecord;
use crate::domain::{ChangeKind, StageChange, Trigger};
use crate::lifecycle::StageModel;

/// The schemas shipped in `schemas/`, compiled in, by file name. Configuration refers to them as
/// `builtin:<file name>`.
pub const SHIPPED_SCHEMAS: [(&str, &str); 5] = [
    (
        "clickstream_event.avsc",
        include_str!("../../schemas/clickstream_event.avsc"),
    ),
    (
        "ad_conversion_event.avsc",
        include_str!("../../schemas/ad_conversion_event.avsc"),
    ),
    ("purchase_event.avsc", include_str!("../../schemas/purchase_event.avsc")),
    ("stage_change.avsc", include_str!("../../schemas/stage_change.avsc")),
    ("conversion.avsc", include_str!("../../schemas/conversion.avsc")),
];

/// The text of a shipped schema by file name.
pub fn shipped_schema(file_name: &str) -> Option<&'static str> {
    SHIPPED_SCHEMAS
        .iter()
        .find(|(name, _)| *name == file_name)
        .map(|(_, text)| *text)
}

/// The shipped input schemas under the ids the built-in configuration maps them to
/// (`[schemas.files]`: 1 clickstream, 2 ad conversions, 3 purchases): for feeding and tests.
pub fn shipped_input_store() -> Result<super::avro::SchemaStore, SchemaError> {
    let mut store = super::avro::SchemaStore::new();
    for (id, file) in [
        (1, "clickstream_event.avsc"),
        (2, "ad_conversion_event.avsc"),
        (3, "purchase_event.avsc"),
    ] {
        store.insert(id, file, shipped_schema(file).unwrap_or_default())?;
    }
    Ok(store)
}

/// The schema id [`shipped_input_store`] holds a source's schema under.
pub fn shipped_input_schema_id(source: crate::domain::Source) -> u32 {
    1 + source.index() as u32
}

/// Why an output could not be encoded (a bug or a schema mismatch: never the input's fault).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {what}: {message}")]
pub struct EncodeError {
    /// Which output.
    pub what: &'static str,
    /// The encoder's message.
    pub message: String,
}

struct AvroWriter {
    id: u32,
    writer: GenericDatumWriter<'static>,
}

impl AvroWriter {
    fn new(id: u32, file_name: &str) -> Result<Self, SchemaError> {
        let parse_error = |message: String| SchemaError::Parse {
            name: file_name.to_owned(),
            message,
        };
        let text = shipped_schema(file_name).ok_or_else(|| parse_error("not a shipped schema".into()))?;
        let schema: &'static Schema = Box::leak(Box::new(
            Schema::parse_str(text).map_err(|error| parse_error(error.to_string()))?,
        ));
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|error| parse_error(error.to_string()))?;
        Ok(AvroWriter { id, writer })
    }

    fn write(&self, what: &'static str, value: &impl Serialize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.push(MAGIC);
        out.extend_from_slice(&self.id.to_be_bytes());
        self.writer
            .write_ser(out, value)
            .map(|_| ())
            .map_err(|error| EncodeError {
                what,
                message: error.to_string(),
            })
    }
}

/// Encodes outputs in the configured format.
pub struct OutputEncoder {
    avro: Option<(AvroWriter, AvroWriter)>,
}

impl std::fmt::Debug for OutputEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = self.avro.as_ref().map(|(stage, conversion)| (stage.id, conversion.id));
        f.debug_struct("OutputEncoder").field("avro_schema_ids", &ids).finish()
    }
}

/// Avro enum symbols are written from unit variants.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum AvroTrigger {
    Event,
    Timer,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum AvroPlatform {
    Meta,
    Tiktok,
}

/// The Avro shape of a stage change: as the JSON one, with the time as epoch milliseconds.
#[derive(Serialize)]
struct AvroStageChange<'a> {
    event_id: String,
    contact_id: Option<&'a str>,
    anonymous_id: Option<&'a str>,
    seq: i32,
    from_stage: Option<&'a str>,
    to_stage: Option<&'a str>,
    lost: bool,
    reactivated: bool,
    reason: &'a str,
    skipped: Vec<&'a str>,
    occurred_at: i64,
    trigger: AvroTrigger,
    trigger_event_id: Option<&'a str>,
    seconds_in_previous_stage: f64,
    churn_risk: Option<f64>,
    kind: AvroChangeKind,
    merged_into: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum AvroChangeKind {
    Transition,
    Deletion,
    Merge,
}

#[derive(Serialize)]
struct AvroUserData<'a> {
    em: Vec<&'a str>,
    ph: Vec<&'a str>,
    external_id: Vec<&'a str>,
    client_ip_address: Option<&'a str>,
    client_user_agent: Option<&'a str>,
    fbc: Option<&'a str>,
    fbp: Option<&'a str>,
    ttclid: Option<&'a str>,
}

#[derive(Serialize)]
struct AvroCustomData<'a> {
    value: Option<f64>,
    currency: Option<&'a str>,
    order_id: Option<&'a str>,
}

#[derive(Serialize)]
struct AvroConversion<'a> {
    platform: AvroPlatform,
    event_name: &'a str,
    event_time: i64,
    event_id: &'a str,
    action_source: &'a str,
    event_source_url: Option<&'a str>,
    user_data: AvroUserData<'a>,
    custom_data: AvroCustomData<'a>,
    stale: bool,
}

impl<'a> AvroConversion<'a> {
    fn new(record: &'a ConversionRecord) -> Self {
        match record {
            ConversionRecord::Meta {
                event_name,
                event_time,
                event_id,
                action_source,
                event_source_url,
                user_data,
                custom_data,
                stale,
            } => AvroConversion {
                platform: AvroPlatform::Meta,
                event_name,
                event_time: *event_time,
                event_id,
                action_source,
                event_source_url: event_source_url.as_deref(),
                user_data: AvroUserData {
                    em: user_data.em.iter().map(String::as_str).collect(),
                    ph: user_data.ph.iter().map(String::as_str).collect(),
                    external_id: user_data.external_id.iter().map(String::as_str).collect(),
                    client_ip_address: user_data.client_ip_address.as_deref(),
                    client_user_agent: user_data.client_user_agent.as_deref(),
                    fbc: user_data.fbc.as_deref(),
                    fbp: user_data.fbp.as_deref(),
                    ttclid: None,
                },
                custom_data: AvroCustomData {
                    value: custom_data.value,
                    currency: custom_data.currency.as_deref(),
                    order_id: custom_data.order_id.as_deref(),
                },
                stale: *stale,
            },
            ConversionRecord::Tiktok {
                event,
                event_time,
                event_id,
                event_source,
                page_url,
                user,
                properties,
                stale,
            } => AvroConversion {
                platform: AvroPlatform::Tiktok,
                event_name: event,
                event_time: *event_time,
                event_id,
                action_source: event_source,
                event_source_url: page_url.as_deref(),
                user_data: AvroUserData {
                    em: user.email.as_deref().into_iter().collect(),
                    ph: user.phone.as_deref().into_iter().collect(),
                    external_id: user.external_id.as_deref().into_iter().collect(),
                    client_ip_address: user.ip.as_deref(),
                    client_user_agent: user.user_agent.as_deref(),
                    fbc: None,
                    fbp: None,
                    ttclid: user.ttclid.as_deref(),
                },
                custom_data: AvroCustomData {
                    value: properties.value,
                    currency: properties.currency.as_deref(),
                    order_id: properties.order_id.as_deref(),
                },
                stale: *stale,
            },
        }
    }
}

impl OutputEncoder {
    /// JSON outputs.
    pub fn json() -> Self {
        OutputEncoder { avro: None }
    }

    /// Avro outputs framed with the ids the shipped schemas are registered under.
    pub fn avro(stage_change_schema_id: u32, conversion_schema_id: u32) -> Result<Self, SchemaError> {
        Ok(OutputEncoder {
            avro: Some((
                AvroWriter::new(stage_change_schema_id, "stage_change.avsc")?,
                AvroWriter::new(conversion_schema_id, "conversion.avsc")?,
            )),
        })
    }

    /// Appends the encoding of `change` to `out`.
    pub fn stage_change(&self, change: &StageChange, model: &StageModel, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let Some((writer, _)) = &self.avro else {
            return serde_json::to_writer(out, &StageChangeRecord::new(change, model)).map_err(|error| EncodeError {
                what: "stage change",
                message: error.to_string(),
            });
        };
        let (contact_id, anonymous_id) = change.key.output_ids();
        let (trigger, trigger_event_id) = match &change.trigger {
            Trigger::Event(id) => (AvroTrigger::Event, Some(id.as_str())),
            Trigger::Timer => (AvroTrigger::Timer, None),
        };
        let transition = change.kind == ChangeKind::Transition;
        let record = AvroStageChange {
            event_id: change.event_id.to_string(),
            contact_id,
            anonymous_id,
            seq: i32::try_from(change.seq).unwrap_or(i32::MAX),
            from_stage: change.from.map(|stage| model.stage(stage).id.as_str()),
            to_stage: transition.then(|| model.stage(change.to).id.as_str()),
            lost: transition && model.stage(change.to).lost,
            reactivated: change.reactivated,
            reason: &change.reason,
            skipped: change
                .skipped
                .iter()
                .map(|stage| model.stage(*stage).id.as_str())
                .collect(),
            occurred_at: change.occurred_at.millis(),
            trigger,
            trigger_event_id,
            seconds_in_previous_stage: change.millis_in_previous as f64 / 1000.0,
            churn_risk: change.churn_risk,
            kind: match change.kind {
                ChangeKind::Transition => AvroChangeKind::Transition,
                ChangeKind::Deleted => AvroChangeKind::Deletion,
                ChangeKind::Merged(_) => AvroChangeKind::Merge,
            },
            merged_into: match &change.kind {
                ChangeKind::Merged(into) => Some(into.as_str()),
                _ => None,
            },
        };
        writer.write("stage change", &record, out)
    }

    /// Appends the encoding of a conversion record to `out`.
    pub fn conversion(&self, record: &ConversionRecord, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &self.avro {
            None => serde_json::to_writer(out, record).map_err(|error| EncodeError {
                what: "conversion",
                message: error.to_string(),
            }),
            Some((_, writer)) => writer.write("conversion", &AvroConversion::new(record), out),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::types::Value;
    use compact_str::CompactString;

    use super::*;
    use crate::attribution::{ConversionValue, MetaUserData, TiktokUser};
    use crate::config::Config;
    use crate::domain::{ContactKey, StageChangeId, StageId, Timestamp};

    fn read(file_name: &str, framed: &[u8], id: u32) -> Vec<(String, Value)> {
        assert_eq!(framed[0], MAGIC);
        assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()), id);
        let schema = Schema::parse_str(shipped_schema(file_name).unwrap()).unwrap();
        let reader = GenericDatumReader::builder(&schema).build().unwrap();
        let mut body = &framed[5..];
        let Value::Record(fields) = reader.read_value(&mut body).unwrap() else {
            panic!("not a record")
        };
        assert!(body.is_empty(), "trailing bytes");
        fields
    }

    fn field<'a>(fields: &'a [(String, Value)], name: &str) -> &'a Value {
        &fields.iter().find(|(field, _)| field == name).unwrap().1
    }

    fn change() -> StageChange {
        StageChange {
            event_id: StageChangeId([7; 16]),
            key: ContactKey {
                id: CompactString::from("c1"),
                anonymous: false,
            },
            seq: 3,
            from: Some(StageId(0)),
            to: StageId(1),
            occurred_at: Timestamp::from_millis(1_735_725_600_250),
            reason: "signed_up".into(),
            skipped: vec![],
            reactivated: false,
            trigger: Trigger::Event("e9".into()),
            millis_in_previous: 1_500,
            churn_risk: Some(0.25),
            kind: ChangeKind::Transition,
        }
    }

    #[test]
    fn stage_changes_encode_to_the_shipped_avro_schema() {
        let config = Config::builtin().unwrap();
        let model = &config.engine.model;
        let encoder = OutputEncoder::avro(101, 102).unwrap();
        let mut out = Vec::new();
        encoder.stage_change(&change(), model, &mut out).unwrap();
        let fields = read("stage_change.avsc", &out, 101);
        let json = StageChangeRecord::new(&change(), model);
        assert_eq!(field(&fields, "event_id"), &Value::String(json.event_id));
        assert_eq!(
            field(&fields, "contact_id"),
            &Value::Union(1, Box::new(Value::String("c1".into())))
        );
        assert_eq!(field(&fields, "anonymous_id"), &Value::Union(0, Box::new(Value::Null)));
        assert_eq!(field(&fields, "seq"), &Value::Int(3));
        assert_eq!(
            field(&fields, "to_stage"),
            &Value::Union(1, Box::new(Value::String(json.to_stage.unwrap())))
        );
        assert_eq!(
            field(&fields, "occurred_at"),
            &Value::TimestampMillis(1_735_725_600_250)
        );
        assert_eq!(field(&fields, "trigger"), &Value::Enum(0, "event".into()));
        assert_eq!(field(&fields, "seconds_in_previous_stage"), &Value::Double(1.5));
        assert_eq!(
            field(&fields, "churn_risk"),
            &Value::Union(1, Box::new(Value::Double(0.25)))
        );
        assert_eq!(field(&fields, "kind"), &Value::Enum(0, "transition".into()));
    }

    #[test]
    fn deletions_have_no_to_stage_in_either_format() {
        let config = Config::builtin().unwrap();
        let model = &config.engine.model;
        let deletion = StageChange {
            kind: ChangeKind::Deleted,
            ..change()
        };
        let mut out = Vec::new();
        OutputEncoder::avro(101, 102)
            .unwrap()
            .stage_change(&deletion, model, &mut out)
            .unwrap();
        let fields = read("stage_change.avsc", &out, 101);
        assert_eq!(field(&fields, "to_stage"), &Value::Union(0, Box::new(Value::Null)));
        assert_eq!(field(&fields, "kind"), &Value::Enum(1, "deletion".into()));
        assert_eq!(field(&fields, "lost"), &Value::Boolean(false));
        let json = StageChangeRecord::new(&deletion, model);
        assert_eq!((json.to_stage, json.kind.as_str()), (None, "deletion"));
        assert_eq!(json.from_stage.as_deref(), Some(model.stage(StageId(0)).id.as_str()));
    }

    #[test]
    fn json_outputs_are_the_replay_shapes() {
        let config = Config::builtin().unwrap();
        let model = &config.engine.model;
        let mut out = Vec::new();
        OutputEncoder::json().stage_change(&change(), model, &mut out).unwrap();
        let parsed: StageChangeRecord = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, StageChangeRecord::new(&change(), model));
    }

    #[test]
    fn conversions_of_both_platforms_encode_to_the_shipped_avro_schema() {
        let encoder = OutputEncoder::avro(101, 102).unwrap();
        let meta = ConversionRecord::Meta {
            event_name: "Purchase".into(),
            event_time: 1_735_725_600,
            event_id: "o-1".into(),
            action_source: "website".into(),
            event_source_url: None,
            user_data: MetaUserData {
                em: vec!["aa".into()],
                fbc: Some("fb.1.1.abc".into()),
                ..MetaUserData::default()
            },
            custom_data: ConversionValue {
                value: Some(12.5),
                currency: Some("EUR".into()),
                order_id: Some("o-1".into()),
            },
            stale: false,
        };
        let tiktok = ConversionRecord::Tiktok {
            event: "CompletePayment".into(),
            event_time: 1_735_725_600,
            event_id: "o-1".into(),
            event_source: "website".into(),
            page_url: Some("https://shop.example/".into()),
            user: TiktokUser {
                phone: Some("bb".into()),
                ttclid: Some("tt-9".into()),
                ..TiktokUser::default()
            },
            properties: ConversionValue::default(),
            stale: true,
        };
        let mut out = Vec::new();
        encoder.conversion(&meta, &mut out).unwrap();
        let fields = read("conversion.avsc", &out, 102);
        assert_eq!(field(&fields, "platform"), &Value::Enum(0, "meta".into()));
        assert_eq!(field(&fields, "event_id"), &Value::String("o-1".into()));
        let Value::Record(user) = field(&fields, "user_data") else {
            panic!()
        };
        assert_eq!(field(user, "em"), &Value::Array(vec![Value::String("aa".into())]));
        assert_eq!(
            field(user, "fbc"),
            &Value::Union(1, Box::new(Value::String("fb.1.1.abc".into())))
        );
        out.clear();
        encoder.conversion(&tiktok, &mut out).unwrap();
        let fields = read("conversion.avsc", &out, 102);
        assert_eq!(field(&fields, "platform"), &Value::Enum(1, "tiktok".into()));
        assert_eq!(field(&fields, "stale"), &Value::Boolean(true));
        let Value::Record(user) = field(&fields, "user_data") else {
            panic!()
        };
        assert_eq!(field(user, "ph"), &Value::Array(vec![Value::String("bb".into())]));
        assert_eq!(
            field(user, "ttclid"),
            &Value::Union(1, Box::new(Value::String("tt-9".into())))
        );
    }
}
