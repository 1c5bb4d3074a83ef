//! The validated stage model: stages, the rules that move contacts between them, and the
//! engagement score the rules read.
//!
//! Built once from configuration (`crate::config`) and read-only afterwards. Plain data: no
//! parsing, no I/O, no clock.

use std::sync::Arc;

use compact_str::CompactString;

use crate::domain::{ClickType, ContactEvent, EventBody, PurchaseStatus, Source, StageId};

/// One configured stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageDef {
    /// Stable id used in outputs (`visitor`, `lead`, ...). Survives label changes.
    pub id: String,
    /// Human-readable label.
    pub label: String,
    /// True for lost stages (`cold_lead`, `at_risk`, ...), which sit off the main path.
    pub lost: bool,
    /// Position on the main path (0 = first); `None` for lost stages.
    pub rank: Option<u8>,
    /// For lost stages: the events that bring a contact back to the main path.
    pub reactivate_on: Vec<EventMatcher>,
}

/// Which events a rule or weight applies to.
#[derive(Clone, Debug, PartialEq)]
pub enum EventMatcher {
    /// Every event of a source (`clickstream:*`).
    AnyOf(Source),
    /// A clickstream type (`clickstream:add_to_cart`).
    Click(ClickType),
    /// An ad-platform conversion by event name (`ad_conversion:Purchase`).
    Conversion(CompactString),
    /// A purchase status (`purchase:completed`).
    Purchase(PurchaseStatus),
}

impl EventMatcher {
    /// Parses `source:name` or `source:*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (source_name, name) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not of the form `source:name` (e.g. `clickstream:signup`)"))?;
        let source = Source::parse(source_name).ok_or_else(|| {
            format!("`{source_name}` is not a source; expected clickstream, ad_conversion or purchase")
        })?;
        if name == "*" {
            return Ok(EventMatcher::AnyOf(source));
        }
        match source {
            Source::Clickstream => ClickType::parse(name).map(EventMatcher::Click).ok_or_else(|| {
                let known: Vec<&str> = ClickType::ALL.iter().map(|kind| kind.as_str()).collect();
                format!(
                    "`{name}` is not a clickstream type; expected one of {} or *",
                    known.join(", ")
                )
            }),
            Source::AdConversion if !name.is_empty() => Ok(EventMatcher::Conversion(name.into())),
            Source::AdConversion => Err("an ad_conversion matcher needs an event name or *".into()),
            Source::Purchase => PurchaseStatus::parse(name).map(EventMatcher::Purchase).ok_or_else(|| {
                format!("`{name}` is not a purchase status; expected completed, refunded, cancelled or *")
            }),
        }
    }

    /// True when `event` is one this matcher names.
    pub fn matches(&self, event: &ContactEvent) -> bool {
        match (self, &event.body) {
            (EventMatcher::AnyOf(source), _) => *source == event.source(),
            (EventMatcher::Click(kind), EventBody::Click(click)) => *kind == click.kind,
            (EventMatcher::Conversion(name), EventBody::AdConversion(conversion)) => *name == conversion.event_name,
            (EventMatcher::Purchase(status), EventBody::Purchase(purchase)) => *status == purchase.status,
            _ => false,
        }
    }
}

/// A set of stages, as a bit set over stage ids (at most 64 stages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageSet(u64);

impl StageSet {
    /// Adds a stage.
    pub fn insert(&mut self, stage: StageId) {
        self.0 |= 1 << stage.0;
    }

    /// True when `stage` is in the set.
    pub fn contains(self, stage: StageId) -> bool {
        self.0 & (1 << stage.0) != 0
    }
}

/// Conditions on a contact's state; a rule fires only when all its conditions hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conditions {
    /// Engagement score (decayed to now) at least this.
    pub min_engagement: Option<f64>,
    /// Distinct completed purchase days over the contact's life at least this.
    pub min_purchase_days: Option<u32>,
    /// At least `count` distinct completed purchase days within the last `window_millis`.
    pub min_purchase_days_within: Option<(u32, i64)>,
    /// Churn risk (purchase model) at least this. Contacts without purchases never match.
    pub min_churn_risk: Option<f64>,
    /// Churn risk (purchase model) below this. Contacts without purchases never match.
    pub max_churn_risk: Option<f64>,
    /// No activity for at least this long (milliseconds).
    pub min_inactive_millis: Option<i64>,
    /// Every order the contact placed was refunded or cancelled.
    pub all_orders_reversed: bool,
}

impl Conditions {
    /// True when the rule depends on the passing of time, so timers must evaluate it.
    pub fn is_timed(&self) -> bool {
        self.min_inactive_millis.is_some() || self.min_churn_risk.is_some()
    }

    /// True when the rule reads the churn score.
    pub fn needs_churn_risk(&self) -> bool {
        self.min_churn_risk.is_some() || self.max_churn_risk.is_some()
    }
}

/// A validated rule: move to `to` from any stage in `from` when triggered and conditions hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Target stage.
    pub to: StageId,
    /// Stages the rule applies from.
    pub from: StageSet,
    /// Triggering events; empty means a state rule, evaluated on every event and by timers.
    pub on: Vec<EventMatcher>,
    /// State conditions, all required.
    pub conditions: Conditions,
    /// Reason carried on the stage change.
    pub reason: Arc<str>,
}

/// Engagement scoring for the hot-lead rule: a weighted count of events decaying exponentially.
#[derive(Clone, Debug, PartialEq)]
pub struct Engagement {
    /// Half-life of the score, in milliseconds.
    pub half_life_millis: i64,
    /// Points added per matching event (first match wins).
    pub weights: Vec<(EventMatcher, f32)>,
}

impl Engagement {
    /// The points `event` adds.
    pub fn weight(&self, event: &ContactEvent) -> f32 {
        self.weights
            .iter()
            .find(|(matcher, _)| matcher.matches(event))
            .map_or(0.0, |(_, weight)| *weight)
    }

    /// `score` recorded `elapsed_millis` ago, decayed to now.
    pub fn decay(&self, score: f32, elapsed_millis: i64) -> f32 {
        if score == 0.0 || elapsed_millis <= 0 {
            return score;
        }
        let half_lives = elapsed_millis as f64 / self.half_life_millis as f64;
        (f64::from(score) * (-half_lives * std::f64::consts::LN_2).exp()) as f32
    }
}

/// Reason used for a contact's first stage when no rule names another.
pub const REASON_FIRST_SEEN: &str = "first_seen";
/// Reason used when a contact leaves a lost stage.
pub const REASON_REACTIVATED: &str = "reactivated";

/// The id of the stage called `id` among `stages`.
pub fn find_stage(stages: &[StageDef], id: &str) -> Option<StageId> {
    stages
        .iter()
        .position(|stage| stage.id == id)
        .and_then(|index| u8::try_from(index).ok())
        .map(StageId)
}

/// The complete, validated stage model.
#[derive(Clone, Debug, PartialEq)]
pub struct StageModel {
    /// All stages, indexed by [`StageId`].
    pub stages: Vec<StageDef>,
    /// Rules moving forward on the main path.
    pub main_rules: Vec<Rule>,
    /// Rules moving into lost stages.
    pub lost_rules: Vec<Rule>,
    /// Engagement scoring.
    pub engagement: Engagement,
    /// How late (behind the contact's clock) an event may be and still change its stage.
    pub grace_millis: i64,
    /// For each stage, the timer-driven rules (no `on`, a timed condition) that apply from it:
    /// lost rules, plus main rules for main stages. Precomputed because every event asks.
    pub timed: Vec<Vec<Rule>>,
    /// Shared copies of the two fixed reasons, so emitting them does not allocate.
    pub(crate) first_seen: Arc<str>,
    pub(crate) reactivated: Arc<str>,
}

impl StageModel {
    /// Builds a model from validated parts; `crate::config` is the usual way in.
    pub fn new(stages: Vec<StageDef>, rules: Vec<Rule>, engagement: Engagement, grace_millis: i64) -> Self {
        let (lost_rules, main_rules): (Vec<Rule>, Vec<Rule>) = rules
            .into_iter()
            .partition(|rule: &Rule| stages[usize::from(rule.to.0)].lost);
        let timed = (0..stages.len())
            .map(|index| {
                let stage = StageId(u8::try_from(index).unwrap_or(u8::MAX));
                let main = (!stages[index].lost).then_some(main_rules.iter()).into_iter().flatten();
                lost_rules
                    .iter()
                    .chain(main)
                    .filter(|rule| rule.on.is_empty() && rule.conditions.is_timed() && rule.from.contains(stage))
                    .cloned()
                    .collect()
            })
            .collect();
        StageModel {
            stages,
            main_rules,
            lost_rules,
            timed,
            engagement,
            grace_millis,
            first_seen: Arc::from(REASON_FIRST_SEEN),
            reactivated: Arc::from(REASON_REACTIVATED),
        }
    }

    /// The stage definition for an id produced by this model.
    pub fn stage(&self, stage: StageId) -> &StageDef {
        &self.stages[usize::from(stage.0)]
    }

    /// Looks a stage up by its id text.
    pub fn find(&self, id: &str) -> Option<StageId> {
        find_stage(&self.stages, id)
    }

    /// The entry stage: the first main-path stage.
    pub fn initial(&self) -> StageId {
        self.main_path().next().unwrap_or(StageId(0))
    }

    /// Main-path stages in rank order.
    pub fn main_path(&self) -> impl Iterator<Item = StageId> + '_ {
        let mut ranked: Vec<(u8, StageId)> = self
            .stages
            .iter()
            .enumerate()
            .filter_map(|(index, stage)| Some((stage.rank?, StageId(u8::try_from(index).ok()?))))
            .collect();
        ranked.sort_unstable();
        ranked.into_iter().map(|(_, stage)| stage)
    }

    /// Rank of a main-path stage; lost stages have none.
    pub fn rank(&self, stage: StageId) -> Option<u8> {
        self.stage(stage).rank
    }

    /// True for lost stages.
    pub fn is_lost(&self, stage: StageId) -> bool {
        self.stage(stage).lost
    }

    /// Main-path stages strictly between two ranks (the skipped ones of a forward move).
    pub fn between(&self, from_rank: Option<u8>, to_rank: u8) -> Vec<StageId> {
        self.main_path()
            .filter(|stage| {
                let rank = self.rank(*stage).unwrap_or(0);
                rank < to_rank && from_rank.is_none_or(|from| rank > from)
            })
            .collect()
    }
}
