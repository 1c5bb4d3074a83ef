//! Configuration: one TOML file, environment overrides, and validation into typed settings.
//!
//! Two steps, as in ripgrep's low/high args: the file is read into raw serde structs
//! (`deny_unknown_fields`, so a typo is an error, not a silently ignored key), then validated
//! into a [`Config`] whose stage model and scorer the core uses directly. Validation collects
//! every problem with its location (`rules[3].from[1]`, plus the file line of the table) instead
//! of stopping at the first.
//!
//! Sections the file leaves out come from the built-in default (`deploy/lifecycle-scorer.toml`,
//! compiled in). Environment variables `LIFECYCLE_SCORER__SECTION__FIELD=value` override single
//! fields after that.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::domain::{days_to_millis, StageId};
use crate::lifecycle::model::find_stage;
use crate::lifecycle::{Conditions, Engagement, Engine, EventMatcher, Rule, StageDef, StageModel, StageSet};
use crate::scoring::{BgParams, ChurnScorer, Model, ModelKind, TimeUnit};

mod service;

pub use service::{
    InputFormat, KafkaSettings, OutputFormat, RegistrySettings, SchemaSettings, ServiceConfig, TaskSettings, Topics,
};

/// The built-in default configuration (the shipped `deploy/lifecycle-scorer.toml`).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../deploy/lifecycle-scorer.toml");

/// Prefix of environment variables that override configuration fields.
pub const ENV_PREFIX: &str = "LIFECYCLE_SCORER__";

/// The most stages a model may have (stage sets are 64-bit).
pub const MAX_STAGES: usize = 64;

/// A problem found in a configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, e.g. `rules[3].to`.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field has the wrong type or an unknown name.
    #[error("{origin}: {message}")]
    Syntax {
        /// File name or `built-in default`.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Well-formed but invalid; every problem is listed.
    #[error("{origin}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// File name or `built-in default`.
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// Result type of configuration loading.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    scoring: RawScoring,
    engagement: RawEngagement,
    processing: RawProcessing,
    stages: Vec<RawStage>,
    rules: Vec<RawRule>,
    kafka: service::RawKafka,
    topics: service::RawTopics,
    input: service::RawInput,
    output: service::RawOutput,
    schemas: service::RawSchemas,
    attribution: service::RawAttribution,
    http: service::RawHttp,
    service: service::RawService,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScoring {
    model: ModelKind,
    time_unit: TimeUnit,
    r: f64,
    alpha: f64,
    a: f64,
    b: f64,
    horizon_days: f64,
    recency_half_life_days: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngagement {
    half_life_days: f64,
    #[serde(default)]
    weights: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcessing {
    late_event_grace_hours: f64,
    reorder_window_seconds: f64,
    timer_sweep_minutes: f64,
    merge_identities: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    id: String,
    label: Option<String>,
    #[serde(default)]
    lost: bool,
    #[serde(default)]
    reactivate_on: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    to: String,
    from: Option<Vec<String>>,
    #[serde(default)]
    on: Vec<String>,
    reason: Option<String>,
    min_engagement: Option<f64>,
    min_purchase_days: Option<u32>,
    min_purchase_days_within: Option<RawWithin>,
    min_churn_risk: Option<f64>,
    max_churn_risk: Option<f64>,
    min_inactive_days: Option<f64>,
    #[serde(default)]
    all_orders_reversed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWithin {
    count: u32,
    days: f64,
}

/// Settings for the per-partition processor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Processing {
    /// How often timers are swept over every contact, in milliseconds of event time.
    pub timer_sweep_millis: i64,
    /// Event-time reordering window, in milliseconds (see `crate::reorder`).
    pub reorder_window_millis: i64,
    /// Merge anonymous visitors into the contacts they turn out to be (see
    /// `Processor::merge_identities`).
    pub merge_identities: bool,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The stage model and churn scorer.
    pub engine: Engine,
    /// Processor settings.
    pub processing: Processing,
    /// The service's settings (`run`).
    pub service: ServiceConfig,
    /// Non-fatal findings (unreachable stages and the like).
    pub warnings: Vec<Problem>,
}

impl Config {
    /// The built-in default.
    pub fn builtin() -> Result<Config> {
        Self::from_toml(DEFAULT_CONFIG_TOML, "built-in default", std::iter::empty())
    }

    /// Loads `path` (or the built-in default when `None`) and applies the process's
    /// `LIFECYCLE_SCORER__*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let env = std::env::vars().filter(|(name, _)| name.starts_with(ENV_PREFIX));
        match path {
            None => Self::from_toml(DEFAULT_CONFIG_TOML, "built-in default", env),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::from_toml(&text, &path.display().to_string(), env)
            }
        }
    }

    /// Parses and validates TOML text; sections it lacks come from the built-in default, then
    /// `overrides` (`LIFECYCLE_SCORER__SECTION__FIELD`, value) are applied.
    pub fn from_toml(text: &str, origin: &str, overrides: impl Iterator<Item = (String, String)>) -> Result<Config> {
        let syntax = |message: String| ConfigError::Syntax {
            origin: origin.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|error: toml::de::Error| syntax(error.to_string()))?;
        let builtin: toml::Table = DEFAULT_CONFIG_TOML
            .parse()
            .map_err(|error: toml::de::Error| syntax(format!("built-in default: {error}")))?;
        for (section, value) in builtin.clone() {
            match (table.get_mut(&section), value) {
                (None, value) => {
                    table.insert(section, value);
                }
                // The service sections are filled field by field: a file may set one broker
                // address and keep every other default.
                (Some(toml::Value::Table(theirs)), toml::Value::Table(defaults))
                    if service::SERVICE_SECTIONS.contains(&section.as_str()) =>
                {
                    for (field, value) in defaults {
                        match (theirs.get_mut(&field), value) {
                            (None, value) => {
                                theirs.insert(field, value);
                            }
                            // librdkafka properties too: setting one keeps the others.
                            (Some(toml::Value::Table(their_map)), toml::Value::Table(default_map))
                                if section == "kafka" && field.ends_with("properties") =>
                            {
                                for (key, value) in default_map {
                                    their_map.entry(key).or_insert(value);
                                }
                            }
                            (Some(_), _) => {}
                        }
                    }
                }
                (Some(_), _) => {}
            }
        }
        let mut problems = Vec::new();
        for (name, value) in overrides {
            if let Err(message) = apply_override(&mut table, &builtin, &name, &value) {
                problems.push(Problem {
                    location: name,
                    message,
                });
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            });
        }
        let raw: RawConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|error: toml::de::Error| syntax(error.to_string()))?;
        let lines = TableLines::scan(text);
        validate(raw, &lines).map_err(|problems| ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }
}

/// Map-typed fields: their keys are free, so the default need not hold the one an override
/// sets, and their values have the type given here. librdkafka properties are text (a file may
/// write them as numbers or booleans, which are turned into text).
const MAP_FIELDS: [(&str, &str, FieldType); 5] = [
    ("engagement", "weights", FieldType::Number),
    ("kafka", "properties", FieldType::Text),
    ("kafka", "consumer_properties", FieldType::Text),
    ("kafka", "producer_properties", FieldType::Text),
    ("schemas", "files", FieldType::Text),
];

/// The type of a configuration field, which decides how an environment override's text is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldType {
    Text,
    Integer,
    Number,
    Boolean,
    Array,
    Table,
}

impl FieldType {
    /// The type of the field at `path`: for a key of a map-typed field the map's value type,
    /// else the type of the field's built-in default (`None` when the default leaves it out).
    fn of(builtin: &toml::Table, path: &[String]) -> Option<FieldType> {
        if let [section, field, _key] = path {
            if let Some(&(.., field_type)) = MAP_FIELDS
                .iter()
                .find(|(map_section, map_field, _)| map_section == section && map_field == field)
            {
                return Some(field_type);
            }
        }
        let (first, rest) = path.split_first()?;
        let mut default = builtin.get(first)?;
        for segment in rest {
            default = default.as_table()?.get(segment)?;
        }
        match default {
            toml::Value::String(_) => Some(FieldType::Text),
            toml::Value::Integer(_) => Some(FieldType::Integer),
            toml::Value::Float(_) => Some(FieldType::Number),
            toml::Value::Boolean(_) => Some(FieldType::Boolean),
            toml::Value::Array(_) => Some(FieldType::Array),
            toml::Value::Table(_) => Some(FieldType::Table),
            toml::Value::Datetime(_) => None,
        }
    }

    /// Reads an override's text as this type: text is kept exactly as written, anything else
    /// must be a TOML literal of the type.
    fn read(self, text: &str) -> std::result::Result<toml::Value, String> {
        let (expected, is_expected): (&str, fn(&toml::Value) -> bool) = match self {
            FieldType::Text => return Ok(toml::Value::String(text.to_owned())),
            FieldType::Integer => ("an integer", toml::Value::is_integer),
            FieldType::Number => ("a number", |value| value.is_integer() || value.is_float()),
            FieldType::Boolean => ("true or false", toml::Value::is_bool),
            FieldType::Array => ("a TOML array", toml::Value::is_array),
            FieldType::Table => ("a TOML inline table", toml::Value::is_table),
        };
        toml_literal(text)
            .filter(is_expected)
            .ok_or_else(|| format!("expected {expected}, got {text:?}"))
    }
}

/// `text` as one TOML value (`30`, `1e3`, `true`, `["a", "b"]`), if it is one.
fn toml_literal(text: &str) -> Option<toml::Value> {
    let mut literal = format!("v = {text}").parse::<toml::Table>().ok()?;
    let value = literal.remove("v")?;
    literal.is_empty().then_some(value)
}

/// Sets `table[a][b]... = value` from `LIFECYCLE_SCORER__A__B`. The value is read as the field's
/// type (see [`FieldType::of`]): string fields and librdkafka properties keep the text exactly as
/// written, numbers and booleans must parse as such. A field the default leaves out (the optional
/// output schema ids; unknown names, which deserialization then rejects) takes a TOML literal
/// when the text is one, else the text.
fn apply_override(
    table: &mut toml::Table,
    builtin: &toml::Table,
    name: &str,
    value: &str,
) -> std::result::Result<(), String> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err("empty path segment in environment override".into());
    }
    let parsed = match FieldType::of(builtin, &path) {
        Some(field_type) => field_type.read(value)?,
        None => toml_literal(value).unwrap_or_else(|| toml::Value::String(value.to_owned())),
    };
    let (last, parents) = path.split_last().ok_or("empty override path")?;
    let mut current = table;
    for segment in parents {
        current = match current
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(inner) => inner,
            _ => {
                return Err(format!(
                    "`{segment}` is not a table; only table fields can be overridden"
                ))
            }
        };
    }
    current.insert(last.clone(), parsed);
    Ok(())
}

/// Line numbers of `[[stages]]` and `[[rules]]` headers in the user's file, so problems inside
/// an array entry can point at its line.
#[derive(Debug, Default)]
struct TableLines {
    stages: Vec<usize>,
    rules: Vec<usize>,
}

impl TableLines {
    fn scan(text: &str) -> Self {
        let mut lines = TableLines::default();
        for (index, line) in text.lines().enumerate() {
            match line.trim() {
                "[[stages]]" => lines.stages.push(index + 1),
                "[[rules]]" => lines.rules.push(index + 1),
                _ => {}
            }
        }
        lines
    }

    fn locate(lines: &[usize], array: &str, index: usize, field: &str) -> String {
        let at = lines
            .get(index)
            .map(|line| format!(" (line {line})"))
            .unwrap_or_default();
        if field.is_empty() {
            format!("{array}[{index}]{at}")
        } else {
            format!("{array}[{index}].{field}{at}")
        }
    }

    fn stage(&self, index: usize, field: &str) -> String {
        Self::locate(&self.stages, "stages", index, field)
    }

    fn rule(&self, index: usize, field: &str) -> String {
        Self::locate(&self.rules, "rules", index, field)
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            location: location.into(),
            message: message.into(),
        });
    }

    fn positive(&mut self, location: &str, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            self.push(location, format!("must be a positive number, got {value}"));
        }
    }

    fn probability(&mut self, location: String, value: Option<f64>) {
        if let Some(value) = value {
            if !(0.0..=1.0).contains(&value) {
                self.push(location, format!("must be a probability in [0, 1], got {value}"));
            }
        }
    }
}

fn validate(raw: RawConfig, lines: &TableLines) -> std::result::Result<Config, Vec<Problem>> {
    let mut problems = Problems(Vec::new());
    let mut warnings = Problems(Vec::new());
    let service = service::validate_service(
        service::RawServiceSections {
            kafka: raw.kafka,
            topics: raw.topics,
            input: raw.input,
            output: raw.output,
            schemas: raw.schemas,
            attribution: raw.attribution,
            http: raw.http,
            service: raw.service,
        },
        &mut problems,
    );

    let scoring = &raw.scoring;
    for (name, value) in [
        ("r", scoring.r),
        ("alpha", scoring.alpha),
        ("a", scoring.a),
        ("b", scoring.b),
    ] {
        problems.positive(&format!("scoring.{name}"), value);
    }
    problems.positive("scoring.horizon_days", scoring.horizon_days);
    problems.positive("scoring.recency_half_life_days", scoring.recency_half_life_days);
    problems.positive("engagement.half_life_days", raw.engagement.half_life_days);
    problems.positive("processing.timer_sweep_minutes", raw.processing.timer_sweep_minutes);
    for (name, value) in [
        (
            "processing.late_event_grace_hours",
            raw.processing.late_event_grace_hours,
        ),
        (
            "processing.reorder_window_seconds",
            raw.processing.reorder_window_seconds,
        ),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            problems.push(name, format!("must be zero or more, got {value}"));
        }
    }

    let mut weights = Vec::new();
    for (matcher, weight) in &raw.engagement.weights {
        let location = format!("engagement.weights.\"{matcher}\"");
        match EventMatcher::parse(matcher) {
            Ok(parsed) if weight.is_finite() => weights.push((parsed, *weight as f32)),
            Ok(_) => problems.push(location, format!("must be a finite number, got {weight}")),
            Err(message) => problems.push(location, message),
        }
    }
    // A specific `source:name` entry wins over `source:*`, whatever the key order.
    weights.sort_by_key(|(matcher, _)| matches!(matcher, EventMatcher::AnyOf(_)));

    // Stages.
    if raw.stages.is_empty() {
        problems.push("stages", "at least one stage is required");
    }
    if raw.stages.len() > MAX_STAGES {
        problems.push(
            "stages",
            format!("at most {MAX_STAGES} stages are supported, got {}", raw.stages.len()),
        );
    }
    let mut stages: Vec<StageDef> = Vec::new();
    let mut next_rank = 0u8;
    for (index, stage) in raw.stages.iter().take(MAX_STAGES).enumerate() {
        if stage.id.is_empty()
            || !stage
                .id
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
        {
            problems.push(
                lines.stage(index, "id"),
                format!("`{}` must be non-empty lowercase letters, digits and _", stage.id),
            );
        }
        if let Some(first) = raw.stages[..index].iter().position(|other| other.id == stage.id) {
            problems.push(
                lines.stage(index, "id"),
                format!("`{}` is already used by stages[{first}]", stage.id),
            );
        }
        if !stage.lost && !stage.reactivate_on.is_empty() {
            problems.push(
                lines.stage(index, "reactivate_on"),
                "only lost stages are left by reactivation",
            );
        }
        let mut reactivate_on = Vec::new();
        for (position, matcher) in stage.reactivate_on.iter().enumerate() {
            match EventMatcher::parse(matcher) {
                Ok(parsed) => reactivate_on.push(parsed),
                Err(message) => problems.push(lines.stage(index, &format!("reactivate_on[{position}]")), message),
            }
        }
        if stage.lost && stage.reactivate_on.is_empty() {
            warnings.push(
                lines.stage(index, "reactivate_on"),
                "empty: contacts can never leave this lost stage",
            );
        }
        let rank = (!stage.lost).then(|| {
            next_rank += 1;
            next_rank - 1
        });
        stages.push(StageDef {
            id: stage.id.clone(),
            label: stage.label.clone().unwrap_or_else(|| stage.id.clone()),
            lost: stage.lost,
            rank,
            reactivate_on,
        });
    }
    if !stages.is_empty() && stages.iter().all(|stage| stage.lost) {
        problems.push("stages", "at least one stage must be on the main path (lost = false)");
    }
    let find = |id: &str| find_stage(&stages, id);

    // Rules.
    let mut rules = Vec::new();
    let mut reached = StageSet::default();
    for (index, raw_rule) in raw.rules.iter().enumerate() {
        let Some(to) = find(&raw_rule.to) else {
            problems.push(lines.rule(index, "to"), format!("unknown stage `{}`", raw_rule.to));
            continue;
        };
        reached.insert(to);
        let target = &stages[usize::from(to.0)];
        let mut from = StageSet::default();
        match &raw_rule.from {
            Some(list) => {
                if list.is_empty() {
                    problems.push(lines.rule(index, "from"), "empty: the rule could never fire");
                }
                for (position, id) in list.iter().enumerate() {
                    let location = lines.rule(index, &format!("from[{position}]"));
                    match find(id) {
                        None => problems.push(location, format!("unknown stage `{id}`")),
                        Some(source) => {
                            let source_def = &stages[usize::from(source.0)];
                            if source == to {
                                problems.push(location, format!("a rule cannot move `{id}` to itself"));
                            } else if !target.lost && (source_def.lost || source_def.rank >= target.rank) {
                                problems.push(
                                    location,
                                    format!(
                                        "`{id}` is not below `{}` on the main path: automatic moves are forward only (lost stages are left by reactivation)",
                                        target.id
                                    ),
                                );
                            }
                            from.insert(source);
                        }
                    }
                }
            }
            None => {
                for (position, stage) in stages.iter().enumerate() {
                    let Ok(position) = u8::try_from(position) else { continue };
                    let below = !target.lost && !stage.lost && stage.rank < target.rank;
                    if below || (target.lost && !stage.lost) {
                        from.insert(StageId(position));
                    }
                }
            }
        }
        let mut on = Vec::new();
        for (position, matcher) in raw_rule.on.iter().enumerate() {
            match EventMatcher::parse(matcher) {
                Ok(parsed) => on.push(parsed),
                Err(message) => problems.push(lines.rule(index, &format!("on[{position}]")), message),
            }
        }
        let conditions = Conditions {
            min_engagement: raw_rule.min_engagement,
            min_purchase_days: raw_rule.min_purchase_days,
            min_purchase_days_within: raw_rule
                .min_purchase_days_within
                .as_ref()
                .map(|within| (within.count, days_to_millis(within.days))),
            min_churn_risk: raw_rule.min_churn_risk,
            max_churn_risk: raw_rule.max_churn_risk,
            min_inactive_millis: raw_rule.min_inactive_days.map(days_to_millis),
            all_orders_reversed: raw_rule.all_orders_reversed,
        };
        problems.probability(lines.rule(index, "min_churn_risk"), raw_rule.min_churn_risk);
        problems.probability(lines.rule(index, "max_churn_risk"), raw_rule.max_churn_risk);
        if let (Some(min), Some(max)) = (raw_rule.min_churn_risk, raw_rule.max_churn_risk) {
            if min >= max {
                problems.push(
                    lines.rule(index, "max_churn_risk"),
                    format!("must be above min_churn_risk ({min}), got {max}"),
                );
            }
        }
        if let Some(days) = raw_rule.min_inactive_days {
            problems.positive(&lines.rule(index, "min_inactive_days"), days);
        }
        if let Some(within) = &raw_rule.min_purchase_days_within {
            problems.positive(&lines.rule(index, "min_purchase_days_within.days"), within.days);
            if within.count == 0 {
                problems.push(
                    lines.rule(index, "min_purchase_days_within.count"),
                    "must be at least 1",
                );
            }
        }
        if let Some(min) = raw_rule.min_engagement {
            if !min.is_finite() {
                problems.push(lines.rule(index, "min_engagement"), "must be a finite number");
            }
        }
        if on.is_empty() && conditions == Conditions::default() && raw_rule.on.is_empty() {
            problems.push(
                lines.rule(index, ""),
                "has neither `on` events nor conditions: it would fire on everything",
            );
        }
        let reason = raw_rule.reason.clone().unwrap_or_else(|| raw_rule.to.clone());
        if reason.is_empty() {
            problems.push(lines.rule(index, "reason"), "must not be empty");
        }
        rules.push(Rule {
            to,
            from,
            on,
            conditions,
            reason: reason.into(),
        });
    }
    for (index, stage) in stages.iter().enumerate() {
        let reachable = stage.rank == Some(0) || u8::try_from(index).is_ok_and(|id| reached.contains(StageId(id)));
        if !reachable {
            warnings.push(
                lines.stage(index, ""),
                format!("no rule moves contacts into `{}`", stage.id),
            );
        }
    }

    if !problems.0.is_empty() {
        return Err(problems.0);
    }
    let model = StageModel::new(
        stages,
        rules,
        Engagement {
            half_life_millis: days_to_millis(raw.engagement.half_life_days).max(1),
            weights,
        },
        days_to_millis(raw.processing.late_event_grace_hours / 24.0),
    );
    let scorer = ChurnScorer {
        model: Model {
            kind: scoring.model,
            params: BgParams {
                r: scoring.r,
                alpha: scoring.alpha,
                a: scoring.a,
                b: scoring.b,
            },
        },
        time_unit: scoring.time_unit,
        horizon_days: scoring.horizon_days,
        recency_half_life_days: scoring.recency_half_life_days,
    };
    Ok(Config {
        engine: Engine::new(model, scorer),
        processing: Processing {
            timer_sweep_millis: days_to_millis(raw.processing.timer_sweep_minutes / (24.0 * 60.0)).max(1),
            reorder_window_millis: days_to_millis(raw.processing.reorder_window_seconds / 86_400.0),
            merge_identities: raw.processing.merge_identities,
        },
        service,
        warnings: warnings.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config> {
        Config::from_toml(text, "test.toml", std::iter::empty())
    }

    #[test]
    fn builtin_default_is_valid_and_complete() {
        let config = Config::builtin().unwrap();
        let model = &config.engine.model;
        let ids: Vec<&str> = model.stages.iter().map(|stage| stage.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "visitor",
                "lead",
                "hot_lead",
                "payment",
                "customer",
                "repeat_customer",
                "core_customer",
                "advocate",
                "cold_lead",
                "disqualified",
                "at_risk",
                "lost_customer"
            ]
        );
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let text = r#"
[[stages]]
id = "new"
[[stages]]
id = "Bad Id"
[[stages]]
id = "won"
[[stages]]
id = "gone"
lost = true
reactivate_on = ["clickstream:nope"]

[[rules]]
to = "won"
from = ["nowhere"]

[[rules]]
to = "new"
from = ["won"]
on = ["fax:*"]

[[rules]]
to = "gone"
min_churn_risk = 1.5
"#;
        let Err(ConfigError::Invalid { problems, .. }) = load(text) else {
            panic!("expected validation problems");
        };
        let locations: Vec<&str> = problems.iter().map(|problem| problem.location.as_str()).collect();
        assert_eq!(
            locations,
            [
                "stages[1].id (line 4)",
                "stages[3].reactivate_on[0] (line 8)",
                "rules[0].from[0] (line 13)",
                "rules[0] (line 13)",
                "rules[1].from[0] (line 17)",
                "rules[1].on[0] (line 17)",
                "rules[2].min_churn_risk (line 22)",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_named() {
        let error = load("[scoring]\nmodel = \"bg-nbd\"\nhorizon = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("horizon"), "{error}");
        let error = load(
            "[processing]\nlate_event_grace_hours = \"soon\"\nreorder_window_seconds = 0\ntimer_sweep_minutes = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("late_event_grace_hours"), "{error}");
    }

    #[test]
    fn service_sections_keep_the_defaults_of_fields_a_file_leaves_out() {
        let config = load(
            "[kafka]\nbootstrap_servers = \"broker-1:9092\"\n[kafka.consumer_properties]\n\"session.timeout.ms\" = 6000\n",
        )
        .unwrap();
        let service = &config.service;
        assert_eq!(service.kafka.bootstrap_servers, "broker-1:9092");
        assert_eq!(service.kafka.group_id, "lifecycle-scorer");
        let consumer = &service.kafka.consumer_properties;
        assert_eq!(consumer["session.timeout.ms"], "6000");
        assert_eq!(
            consumer["partition.assignment.strategy"], "cooperative-sticky",
            "defaults kept beside it"
        );
        assert_eq!(service.kafka.producer_properties["acks"], "all");
        assert_eq!(service.topics.inputs, ["clickstream", "ad-conversions", "purchases"]);
        assert_eq!(service.input_formats, [InputFormat::Avro; 3]);
        assert_eq!(service.schemas.files.len(), 3);
        assert!(service.attribution.as_ref().is_some_and(|rules| rules.rules.len() == 6));
        assert_eq!(service.tasks.shutdown_timeout, std::time::Duration::from_secs(30));
    }

    #[test]
    fn service_problems_name_their_field() {
        let error = load(
            r#"
[kafka.properties]
"group.id" = "sneaky"
[kafka.consumer_properties]
"partition.assignment.strategy" = "cooperative-sticky,sticky"
"enable.auto.commit" = "true"
"group.protocol" = "consumer"
[topics]
purchases = "bad topic!"
dead_letters = "clickstream"
[output]
format = "avro"
[schemas]
registry_url = "registry:8081"
files = {}
[http]
listen = "everywhere"
[service]
shutdown_timeout_seconds = 0
[attribution]
rules = [{ on = "purchase:exploded", meta = "Purchase" }, { on = "purchase:*" }]
"#,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "kafka.consumer_properties.\"group.id\"",
            "kafka.consumer_properties.\"partition.assignment.strategy\": unknown assignor [\"sticky\"]",
            "kafka.consumer_properties.\"enable.auto.commit\": set by the service itself",
            "kafka.consumer_properties.\"group.protocol\": `consumer` is not supported",
            "topics.purchases: `bad topic!` is not a valid topic name",
            "topics.dead_letters: `clickstream` is already used by topics.clickstream",
            "output.stage_change_schema_id: required when output.format = \"avro\"",
            "schemas.registry_url: must start with http:// or https://",
            "http.listen: `everywhere` is not an address:port",
            "service.shutdown_timeout_seconds: must be a positive number",
            "attribution.rules[0].on",
            "attribution.rules[1]: names no platform event",
        ] {
            assert!(error.contains(expected), "missing `{expected}` in:\n{error}");
        }
        let error = load("[schemas]\nfiles = {}\n").unwrap_err().to_string();
        assert!(error.contains("an Avro input needs schemas"), "{error}");
    }

    #[test]
    fn environment_overrides_single_fields() {
        let overrides = [
            ("LIFECYCLE_SCORER__SCORING__HORIZON_DAYS".to_owned(), "30".to_owned()),
            ("LIFECYCLE_SCORER__SCORING__MODEL".to_owned(), "mbg-nbd".to_owned()),
            // Static membership from the pod name, as the deployment sets it.
            (
                "LIFECYCLE_SCORER__KAFKA__CONSUMER_PROPERTIES__GROUP.INSTANCE.ID".to_owned(),
                "lifecycle-scorer-2".to_owned(),
            ),
        ];
        let config = Config::from_toml("", "empty", overrides.into_iter()).unwrap();
        assert_eq!(config.engine.scorer.horizon_days, 30.0);
        assert_eq!(config.engine.scorer.model.kind, ModelKind::MbgNbd);
        let consumer = &config.service.kafka.consumer_properties;
        assert_eq!(consumer["group.instance.id"], "lifecycle-scorer-2");
        assert_eq!(
            consumer["partition.assignment.strategy"], "cooperative-sticky",
            "defaults kept"
        );
    }

    fn overridden(overrides: &[(&str, &str)]) -> Result<Config> {
        let overrides = overrides
            .iter()
            .map(|(name, value)| (format!("{ENV_PREFIX}{name}"), (*value).to_owned()));
        Config::from_toml("", "empty", overrides)
    }

    #[test]
    fn environment_overrides_of_text_fields_keep_the_text_as_written() {
        let config = overridden(&[
            ("KAFKA__CONSUMER_PROPERTIES__SASL.PASSWORD", "1e3"),
            ("KAFKA__CONSUMER_PROPERTIES__CLIENT.RACK", "007"),
            ("KAFKA__PRODUCER_PROPERTIES__ENABLE.IDEMPOTENCE", "true"),
            ("KAFKA__PRODUCER_PROPERTIES__SASL.USERNAME", "\"quoted\""),
            ("KAFKA__PROPERTIES__SSL.KEY.PASSWORD", " two  words "),
            ("KAFKA__PROPERTIES__SASL.KERBEROS.KINIT.CMD", "[1, 2]"),
            ("KAFKA__GROUP_ID", "1e3"),
            ("KAFKA__CLIENT_ID", "true"),
            ("SCHEMAS__FILES__4", "007"),
        ])
        .unwrap();
        let kafka = &config.service.kafka;
        let consumer = &kafka.consumer_properties;
        assert_eq!(consumer["sasl.password"], "1e3");
        assert_eq!(consumer["client.rack"], "007");
        let producer = &kafka.producer_properties;
        assert_eq!(producer["enable.idempotence"], "true");
        assert_eq!(producer["sasl.username"], "\"quoted\"");
        for properties in [consumer, producer] {
            assert_eq!(properties["ssl.key.password"], " two  words ", "shared ones reach both");
            assert_eq!(properties["sasl.kerberos.kinit.cmd"], "[1, 2]");
        }
        assert_eq!(kafka.group_id, "1e3");
        assert_eq!(kafka.client_id, "true");
        assert_eq!(config.service.schemas.files[&4], std::path::PathBuf::from("007"));
    }

    #[test]
    fn environment_overrides_of_numbers_and_booleans_are_parsed_or_rejected() {
        let config = overridden(&[
            ("SERVICE__BATCH_MAX_RECORDS", "500"),
            ("SCORING__HORIZON_DAYS", "1e3"),
            ("SCORING__R", "2"),
            ("PROCESSING__MERGE_IDENTITIES", "false"),
            ("ENGAGEMENT__WEIGHTS__CLICKSTREAM:REVIEW", "3"),
            // Optional fields the default leaves out are still read as TOML literals.
            ("OUTPUT__FORMAT", "avro"),
            ("OUTPUT__STAGE_CHANGE_SCHEMA_ID", "101"),
            ("OUTPUT__CONVERSION_SCHEMA_ID", "102"),
        ])
        .unwrap();
        assert_eq!(config.service.tasks.batch_max_records, 500);
        assert_eq!(config.engine.scorer.horizon_days, 1000.0);
        assert_eq!(config.engine.scorer.model.params.r, 2.0);
        assert!(!config.processing.merge_identities);
        assert_eq!(config.engine.model.engagement.weights.len(), 8);
        assert_eq!(config.service.output_schema_ids, Some((101, 102)));

        let error = overridden(&[
            ("SERVICE__BATCH_MAX_RECORDS", "abc"),
            ("SERVICE__CHANGELOG_INTERVAL_MS", "1e3"),
            ("SCORING__HORIZON_DAYS", "\"60\""),
            ("PROCESSING__MERGE_IDENTITIES", "yes"),
            ("ENGAGEMENT__WEIGHTS__CLICKSTREAM:REVIEW", "high"),
        ])
        .unwrap_err()
        .to_string();
        for expected in [
            "LIFECYCLE_SCORER__SERVICE__BATCH_MAX_RECORDS: expected an integer, got \"abc\"",
            "LIFECYCLE_SCORER__SERVICE__CHANGELOG_INTERVAL_MS: expected an integer, got \"1e3\"",
            "LIFECYCLE_SCORER__SCORING__HORIZON_DAYS: expected a number, got \"\\\"60\\\"\"",
            "LIFECYCLE_SCORER__PROCESSING__MERGE_IDENTITIES: expected true or false, got \"yes\"",
            "LIFECYCLE_SCORER__ENGAGEMENT__WEIGHTS__CLICKSTREAM:REVIEW: expected a number, got \"high\"",
        ] {
            assert!(error.contains(expected), "missing `{expected}` in:\n{error}");
        }
    }
}
