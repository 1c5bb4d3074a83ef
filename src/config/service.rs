//! The service's sections of the configuration: brokers, topics, wire formats, schemas,
//! attribution, HTTP and the partition tasks' timing. Read by `run`; the core never sees them.
//!
//! Fields a file leaves out of these sections come from the built-in default one by one (see
//! [`SERVICE_SECTIONS`]), so a file may hold just `[kafka] bootstrap_servers = "..."`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use crate::attribution::{AttributionRules, ConversionRule};
use crate::domain::{days_to_millis, Source};
use crate::lifecycle::EventMatcher;

/// Sections whose missing fields are filled from the built-in default field by field.
pub(super) const SERVICE_SECTIONS: [&str; 8] = [
    "kafka",
    "topics",
    "input",
    "output",
    "schemas",
    "attribution",
    "http",
    "service",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKafka {
    bootstrap_servers: String,
    group_id: String,
    client_id: String,
    statistics_interval_ms: u64,
    properties: BTreeMap<String, toml::Value>,
    consumer_properties: BTreeMap<String, toml::Value>,
    producer_properties: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTopics {
    clickstream: String,
    ad_conversions: String,
    purchases: String,
    stage_changes: String,
    conversions: String,
    dead_letters: String,
    instances: String,
    changelog: String,
    identity: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInput {
    clickstream: InputFormat,
    ad_conversions: InputFormat,
    purchases: InputFormat,
    max_record_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    format: OutputFormat,
    stage_change_schema_id: Option<u32>,
    conversion_schema_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchemas {
    registry_url: String,
    registry_username: String,
    registry_password: String,
    registry_timeout_ms: u64,
    registry_retries: u32,
    files: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAttribution {
    enabled: bool,
    action_source: String,
    default_country_code: String,
    max_age_days: f64,
    rules: Vec<RawConversionRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConversionRule {
    on: String,
    meta: Option<String>,
    tiktok: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    listen: String,
    advertised_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    max_task_idle_ms: u64,
    idle_flush_ms: u64,
    idle_timers: bool,
    stall_timeout_seconds: f64,
    batch_max_records: usize,
    shutdown_timeout_seconds: f64,
    changelog_interval_ms: u64,
    ownership_lease_ms: u64,
}

/// How one input topic's records are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// Confluent-framed Avro (magic byte, schema id, Avro binary).
    Avro,
    /// One JSON object per record, as `replay` reads.
    Json,
}

/// How the stage-change and conversion outputs are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// JSON, the same shape `replay` writes.
    Json,
    /// Confluent-framed Avro with the shipped `stage_change.avsc` / `conversion.avsc`.
    Avro,
}

/// Broker connection and client settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Consumer group id.
    pub group_id: String,
    /// `client.id` of the consumer and producer.
    pub client_id: String,
    /// librdkafka statistics interval (feeds the lag gauge), milliseconds.
    pub statistics_interval_ms: u64,
    /// librdkafka properties for the consumer (shared ones first, consumer ones over them).
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer.
    pub producer_properties: BTreeMap<String, String>,
}

/// Topic names.
#[derive(Clone, Debug, PartialEq)]
pub struct Topics {
    /// Input topics, indexed by [`Source::index`].
    pub inputs: [String; 3],
    /// Stage changes out.
    pub stage_changes: String,
    /// Conversion records out.
    pub conversions: String,
    /// Undecodable or invalid input records out.
    pub dead_letters: String,
    /// Which instance owns which input partition (compacted; written and read by the service).
    pub instances: String,
    /// Every changed contact's state, one partition per input partition (compacted).
    pub changelog: String,
    /// Identity merges between partitions: requests keyed by anonymous id, handed-over
    /// states keyed by contact id; one partition per input partition.
    pub identity: String,
}

impl Topics {
    /// The topics a partition task consumes, by lane: the inputs (by [`Source::index`]), then
    /// the identity topic.
    pub fn lanes(&self) -> [&str; 4] {
        [
            self.inputs[0].as_str(),
            self.inputs[1].as_str(),
            self.inputs[2].as_str(),
            self.identity.as_str(),
        ]
    }

    /// The lane of a consumed topic.
    pub fn lane_of(&self, topic: &str) -> Option<usize> {
        self.lanes().iter().position(|lane| *lane == topic)
    }

    /// The source an input topic carries.
    pub fn source_of(&self, topic: &str) -> Option<Source> {
        Source::ALL
            .into_iter()
            .find(|source| self.inputs[source.index()] == topic)
    }
}

/// Schema registry settings.
#[derive(Clone, PartialEq)]
pub struct RegistrySettings {
    /// Base URL.
    pub url: String,
    /// Basic-auth user, if any.
    pub username: Option<String>,
    /// Basic-auth password, if any.
    pub password: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Extra attempts for transient failures.
    pub retries: u32,
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// Where writer schemas come from.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SchemaSettings {
    /// The registry, when one is configured.
    pub registry: Option<RegistrySettings>,
    /// Schema id -> local `.avsc` file (registry-less setups, or pinned ids).
    pub files: BTreeMap<u32, PathBuf>,
}

/// Partition-task timing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskSettings {
    /// How long a partition task waits for an input topic with nothing buffered before it
    /// goes on without it (the three topics are merged in event-time order).
    pub max_task_idle: Duration,
    /// A partition caught up on every input for this long releases its reorder buffer.
    pub idle_flush: Duration,
    /// Fire timers on the wall clock when a partition is caught up and idle.
    pub idle_timers: bool,
    /// No progress for this long while lag is positive: the partition is reported stalled.
    pub stall_timeout: Duration,
    /// Most records taken from the queues before outputs are produced.
    pub batch_max_records: usize,
    /// Bound on a graceful shutdown (and on draining a revoked partition).
    pub shutdown_timeout: Duration,
    /// How often changed states are written to the changelog (coalesced) and offsets stored.
    pub changelog_interval: Duration,
    /// How long a partition's claim holds without renewal: a newly assigned partition waits
    /// for its previous owner's release, at most this long after that owner's last renewal.
    pub ownership_lease: Duration,
}

/// Everything `run` needs beyond the core.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    /// Broker and client settings.
    pub kafka: KafkaSettings,
    /// Topic names.
    pub topics: Topics,
    /// Wire format of each input topic, indexed by [`Source::index`].
    pub input_formats: [InputFormat; 3],
    /// Larger input records are dead-lettered as `oversized`.
    pub max_record_bytes: usize,
    /// Encoding of the outputs.
    pub output_format: OutputFormat,
    /// Schema ids the outputs are framed with, when Avro.
    pub output_schema_ids: Option<(u32, u32)>,
    /// Schema sources.
    pub schemas: SchemaSettings,
    /// Conversion records, when enabled.
    pub attribution: Option<AttributionRules>,
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// The base URL other instances give for contacts this one owns (empty: derived from the
    /// host name and the listen port).
    pub advertised_url: String,
    /// Partition-task timing.
    pub tasks: TaskSettings,
}

/// The raw service sections.
#[derive(Debug, Deserialize)]
pub(super) struct RawServiceSections {
    pub(super) kafka: RawKafka,
    pub(super) topics: RawTopics,
    pub(super) input: RawInput,
    pub(super) output: RawOutput,
    pub(super) schemas: RawSchemas,
    pub(super) attribution: RawAttribution,
    pub(super) http: RawHttp,
    pub(super) service: RawService,
}

fn property_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(number) => Some(number.to_string()),
        toml::Value::Float(number) => Some(number.to_string()),
        toml::Value::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn seconds(problems: &mut Problems, location: &str, value: f64) -> Duration {
    problems.positive(location, value);
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}

/// Validates the service sections, pushing every problem found.
pub(super) fn validate_service(raw: RawServiceSections, problems: &mut Problems) -> ServiceConfig {
    let kafka = raw.kafka;
    let mut properties = |section: &str, map: &BTreeMap<String, toml::Value>| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (key, value) in map {
            match property_text(value) {
                Some(text) => {
                    out.insert(key.clone(), text);
                }
                None => problems.push(
                    format!("kafka.{section}.\"{key}\""),
                    "librdkafka properties must be strings, numbers or booleans",
                ),
            }
        }
        out
    };
    let shared = properties("properties", &kafka.properties);
    let mut consumer_properties = shared.clone();
    consumer_properties.extend(properties("consumer_properties", &kafka.consumer_properties));
    let mut producer_properties = shared;
    producer_properties.extend(properties("producer_properties", &kafka.producer_properties));
    for (section, map) in [
        ("consumer_properties", &consumer_properties),
        ("producer_properties", &producer_properties),
    ] {
        for reserved in ["bootstrap.servers", "group.id", "enable.auto.offset.store"] {
            if map.contains_key(reserved) {
                problems.push(
                    format!("kafka.{section}.\"{reserved}\""),
                    "set by the service itself (use the kafka section's own fields)",
                );
            }
        }
    }
    // The group shares out the changelog's partitions only (partition p of every input goes
    // with changelog partition p), so any of the classic protocol's assignors will do.
    if let Some(strategy) = consumer_properties.get("partition.assignment.strategy") {
        let unknown: Vec<&str> = strategy
            .split(',')
            .map(str::trim)
            .filter(|name| !["range", "roundrobin", "cooperative-sticky"].contains(name))
            .collect();
        if !unknown.is_empty() {
            problems.push(
                "kafka.consumer_properties.\"partition.assignment.strategy\"",
                format!("unknown assignor {unknown:?}: use cooperative-sticky (the default), range or roundrobin"),
            );
        }
    }
    if consumer_properties.contains_key("enable.auto.commit") {
        problems.push(
            "kafka.consumer_properties.\"enable.auto.commit\"",
            "set by the service itself: it commits positions once the changelog holds the state they \
             made (\"auto.commit.interval.ms\" sets how often)",
        );
    }
    if let Some(protocol) = consumer_properties.get("group.protocol") {
        if protocol.trim() != "classic" {
            problems.push(
                "kafka.consumer_properties.\"group.protocol\"",
                format!("`{protocol}` is not supported: the service runs on the classic group protocol"),
            );
        }
    }
    if kafka.bootstrap_servers.trim().is_empty() {
        problems.push("kafka.bootstrap_servers", "must not be empty");
    }
    if kafka.group_id.trim().is_empty() {
        problems.push("kafka.group_id", "must not be empty");
    }

    let topics = raw.topics;
    let names = [
        ("topics.clickstream", &topics.clickstream),
        ("topics.ad_conversions", &topics.ad_conversions),
        ("topics.purchases", &topics.purchases),
        ("topics.stage_changes", &topics.stage_changes),
        ("topics.conversions", &topics.conversions),
        ("topics.dead_letters", &topics.dead_letters),
        ("topics.instances", &topics.instances),
        ("topics.changelog", &topics.changelog),
        ("topics.identity", &topics.identity),
    ];
    for (index, (location, name)) in names.iter().enumerate() {
        if name.is_empty()
            || name.len() > 249
            || !name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        {
            problems.push(
                *location,
                format!("`{name}` is not a valid topic name (1-249 of a-z A-Z 0-9 . _ -)"),
            );
        }
        if let Some((other, _)) = names[..index].iter().find(|(_, other)| other == name) {
            problems.push(*location, format!("`{name}` is already used by {other}"));
        }
    }

    if raw.input.max_record_bytes == 0 {
        problems.push("input.max_record_bytes", "must be at least 1");
    }

    let output_schema_ids = match (
        raw.output.format,
        raw.output.stage_change_schema_id,
        raw.output.conversion_schema_id,
    ) {
        (OutputFormat::Avro, Some(stage_change), Some(conversion)) => Some((stage_change, conversion)),
        (OutputFormat::Avro, stage_change, _) => {
            let missing = if stage_change.is_none() {
                "output.stage_change_schema_id"
            } else {
                "output.conversion_schema_id"
            };
            problems.push(
                missing,
                "required when output.format = \"avro\": the id the shipped schema is registered under",
            );
            None
        }
        (OutputFormat::Json, _, _) => None,
    };

    let schemas = raw.schemas;
    let mut files = BTreeMap::new();
    for (id, path) in &schemas.files {
        match id.parse::<u32>() {
            Ok(number) => {
                files.insert(number, PathBuf::from(path));
            }
            Err(_) => problems.push(
                format!("schemas.files.\"{id}\""),
                "keys are schema ids (non-negative integers)",
            ),
        }
    }
    let registry = (!schemas.registry_url.trim().is_empty()).then(|| {
        if !(schemas.registry_url.starts_with("http://") || schemas.registry_url.starts_with("https://")) {
            problems.push("schemas.registry_url", "must start with http:// or https://");
        }
        let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        RegistrySettings {
            url: schemas.registry_url.trim_end_matches('/').to_owned(),
            username: optional(&schemas.registry_username),
            password: optional(&schemas.registry_password),
            timeout: Duration::from_millis(schemas.registry_timeout_ms.max(1)),
            retries: schemas.registry_retries,
        }
    });
    let uses_avro = raw.input.clickstream == InputFormat::Avro
        || raw.input.ad_conversions == InputFormat::Avro
        || raw.input.purchases == InputFormat::Avro;
    if uses_avro && registry.is_none() && files.is_empty() {
        problems.push(
            "schemas",
            "an Avro input needs schemas: set registry_url, or map ids to files in [schemas.files]",
        );
    }

    let attribution = raw.attribution;
    let mut rules = Vec::new();
    for (index, rule) in attribution.rules.iter().enumerate() {
        match EventMatcher::parse(&rule.on) {
            Ok(on) => rules.push(ConversionRule {
                on,
                meta: rule.meta.clone(),
                tiktok: rule.tiktok.clone(),
            }),
            Err(message) => problems.push(format!("attribution.rules[{index}].on"), message),
        }
        if rule.meta.is_none() && rule.tiktok.is_none() {
            problems.push(
                format!("attribution.rules[{index}]"),
                "names no platform event (meta, tiktok): it would never produce a record",
            );
        }
    }
    problems.positive("attribution.max_age_days", attribution.max_age_days);
    if !attribution
        .default_country_code
        .bytes()
        .all(|byte| byte.is_ascii_digit())
    {
        problems.push(
            "attribution.default_country_code",
            "digits only, without + (e.g. \"1\", \"49\")",
        );
    }
    let attribution = attribution.enabled.then(|| AttributionRules {
        rules,
        action_source: attribution.action_source.clone(),
        default_country_code: (!attribution.default_country_code.is_empty())
            .then(|| attribution.default_country_code.clone()),
        max_age_millis: days_to_millis(attribution.max_age_days),
    });

    if !(raw.http.advertised_url.is_empty()
        || raw.http.advertised_url.starts_with("http://")
        || raw.http.advertised_url.starts_with("https://"))
    {
        problems.push(
            "http.advertised_url",
            "must start with http:// or https:// (or be empty)",
        );
    }
    let listen = raw.http.listen.parse().unwrap_or_else(|_| {
        problems.push(
            "http.listen",
            format!("`{}` is not an address:port (e.g. 0.0.0.0:8080)", raw.http.listen),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });

    let service = raw.service;
    if service.batch_max_records == 0 {
        problems.push("service.batch_max_records", "must be at least 1");
    }
    if service.ownership_lease_ms < 1000 {
        problems.push(
            "service.ownership_lease_ms",
            "must be at least 1000 (claims are renewed every quarter of it)",
        );
    }
    let tasks = TaskSettings {
        max_task_idle: Duration::from_millis(service.max_task_idle_ms),
        idle_flush: Duration::from_millis(service.idle_flush_ms),
        idle_timers: service.idle_timers,
        stall_timeout: seconds(problems, "service.stall_timeout_seconds", service.stall_timeout_seconds),
        batch_max_records: service.batch_max_records.max(1),
        shutdown_timeout: seconds(
            problems,
            "service.shutdown_timeout_seconds",
            service.shutdown_timeout_seconds,
        ),
        changelog_interval: Duration::from_millis(service.changelog_interval_ms),
        ownership_lease: Duration::from_millis(service.ownership_lease_ms),
    };

    ServiceConfig {
        kafka: KafkaSettings {
            bootstrap_servers: kafka.bootstrap_servers,
            group_id: kafka.group_id,
            client_id: kafka.client_id,
            statistics_interval_ms: kafka.statistics_interval_ms,
            consumer_properties,
            producer_properties,
        },
        topics: Topics {
            inputs: [topics.clickstream, topics.ad_conversions, topics.purchases],
            stage_changes: topics.stage_changes,
            conversions: topics.conversions,
            dead_letters: topics.dead_letters,
            instances: topics.instances,
            changelog: topics.changelog,
            identity: topics.identity,
        },
        input_formats: [raw.input.clickstream, raw.input.ad_conversions, raw.input.purchases],
        max_record_bytes: raw.input.max_record_bytes,
        output_format: raw.output.format,
        output_schema_ids,
        schemas: SchemaSettings { registry, files },
        attribution,
        listen,
        advertised_url: raw.http.advertised_url.trim_end_matches('/').to_owned(),
        tasks,
    }
}
