//! The lifecycle engine (pure): applies events and timers to a contact's state and returns the
//! stage changes they cause.
//!
//! Semantics, in the order they are applied:
//!
//! 1. **Timers first.** Before an event at time `t` is applied, every timer due at or before
//!    `t` fires at its exact due time (inactivity: last activity + N; churn risk: the first whole
//!    second at which the score reaches the threshold, searched on a score that rises
//!    monotonically while nothing happens, and cached per contact until purchases or the stage
//!    change).
//!    Because due times are exact, calling [`Engine::advance_to`] often or rarely gives the same
//!    output: `advance_to(a); advance_to(b)` equals `advance_to(b)`.
//! 2. **Duplicates** (an `event_id` among the contact's recent ones) change nothing.
//! 3. **Late events** (older than the contact's clock) update statistics, so purchase statistics
//!    never depend on arrival order; they may change the stage only within the grace period, and
//!    then at the contact's clock, so history never runs backwards.
//! 4. **Main path**: forward only; the highest-ranked target among the rules that fire wins and
//!    the stages passed over are listed as skipped.
//! 5. **Lost stages**: entered only through a rule, which always names a reason; left only by
//!    reactivation (an event the lost stage lists), back to the highest main stage reached, or
//!    further if main rules fire. Reactivation that would be lost again at once is not emitted.
//!
//! Nothing here reads a clock, does I/O, or knows about Kafka: time is an argument.

pub mod model;

use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use model::{Conditions, Engagement, EventMatcher, Rule, StageDef, StageModel, StageSet};

use crate::domain::{
    fingerprint, ChangeKind, ClickType, ContactEvent, ContactKey, ContactState, EventBody, Identify, PurchaseHistory,
    StageChange, StageChangeId, StageId, StageSpan, Timestamp, Trigger,
};
use crate::scoring::ChurnScorer;

/// What [`Engine::apply`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied; stage changes, if any, were pushed.
    Applied,
    /// Its `event_id` was seen recently for this contact: ignored.
    Duplicate,
    /// Older than the contact's clock by more than the grace period: statistics updated, stage
    /// left alone.
    TooLate,
}

/// The stage model and the churn scorer, applied to contacts.
#[derive(Clone, Debug)]
pub struct Engine {
    /// Stages and rules.
    pub model: StageModel,
    /// Churn model for risk conditions and for scores on stage changes.
    pub scorer: ChurnScorer,
}

/// Upper bound on chained timer transitions in one `advance_to` (each moves to another stage,
/// so more than one per stage would be a cycle in the rules).
fn max_chained(model: &StageModel) -> usize {
    model.stages.len() + 1
}

/// Whole seconds, the resolution of timer due times.
const SECOND: i64 = 1000;

/// Churn risk at one instant, computed at most once per evaluation.
struct RiskCache {
    at: Timestamp,
    value: Option<Option<f64>>,
}

impl RiskCache {
    fn new(at: Timestamp) -> Self {
        RiskCache { at, value: None }
    }

    fn get(&mut self, scorer: &ChurnScorer, state: &ContactState) -> Option<f64> {
        *self.value.get_or_insert_with(|| scorer.purchase_risk(state, self.at))
    }
}

impl Engine {
    /// Builds an engine.
    pub fn new(model: StageModel, scorer: ChurnScorer) -> Self {
        Engine { model, scorer }
    }

    /// State for a contact first seen at `at`. It is announced (sequence 1) by the first
    /// [`Engine::apply`].
    pub fn new_contact(&self, at: Timestamp) -> ContactState {
        let initial = self.model.initial();
        ContactState::new(initial, initial, at)
    }

    /// Applies one event to a contact, pushing the stage changes it causes (timers due before it
    /// included) onto `out`.
    pub fn apply(
        &self,
        key: &ContactKey,
        state: &mut ContactState,
        event: &ContactEvent,
        out: &mut Vec<StageChange>,
    ) -> Applied {
        if !state.remember_event(fingerprint(&event.event_id)) {
            return Applied::Duplicate;
        }
        let at = event.occurred_at;
        let announced = state.seq > 0;
        let effective = if announced && at < state.clock {
            if state.clock.millis_since(at) > self.model.grace_millis {
                self.absorb(state, event, state.clock);
                if matches!(event.body, EventBody::Purchase(_)) {
                    self.refresh_risk_due(state);
                }
                return Applied::TooLate;
            }
            state.clock
        } else {
            if announced {
                self.advance_to(key, state, at, out);
            }
            at
        };
        let stage_before = (state.seq, state.stage);
        self.absorb(state, event, effective);
        state.clock = state.clock.max(effective);
        self.evaluate(key, state, effective, Some(event), None, out);
        if matches!(event.body, EventBody::Purchase(_)) || (state.seq, state.stage) != stage_before {
            self.refresh_risk_due(state);
        }
        Applied::Applied
    }

    /// Fires every timer due at or before `now`, pushing the resulting stage changes.
    pub fn advance_to(&self, key: &ContactKey, state: &mut ContactState, now: Timestamp, out: &mut Vec<StageChange>) {
        if state.seq == 0 || now <= state.clock {
            return;
        }
        for _ in 0..max_chained(&self.model) {
            if self.next_due(state) > now {
                break;
            }
            let mut dues: Vec<Timestamp> = self
                .timed_rules(state.stage)
                .filter_map(|rule| self.due_time(rule, state, now))
                .collect();
            dues.sort_unstable();
            dues.dedup();
            let mut moved = false;
            for due in dues {
                state.clock = state.clock.max(due);
                if self.evaluate(key, state, due, None, None, out) {
                    self.refresh_risk_due(state);
                    moved = true;
                    break;
                }
            }
            if !moved {
                break;
            }
        }
        state.clock = state.clock.max(now);
    }

    /// The timer-driven rules that can apply from `stage`.
    fn timed_rules(&self, stage: StageId) -> std::slice::Iter<'_, Rule> {
        self.model.timed[usize::from(stage.0)].iter()
    }

    /// The first instant in `[state.clock, until]` at which the rule's time-dependent conditions
    /// hold, if any. Exact and canonical (whole seconds for churn thresholds), so independent of
    /// how the interval was chosen.
    fn due_time(&self, rule: &Rule, state: &ContactState, until: Timestamp) -> Option<Timestamp> {
        let mut due = state.clock;
        if let Some(inactive) = rule.conditions.min_inactive_millis {
            due = due.max(state.last_activity_at.plus_millis(inactive));
        }
        if let Some(threshold) = rule.conditions.min_churn_risk {
            // One evaluation rules out the common case before searching.
            if !self
                .scorer
                .purchase_risk(state, until)
                .is_some_and(|risk| risk >= threshold)
            {
                return None;
            }
            due = due.max(self.risk_crossing(state, threshold)?);
        }
        (due <= until).then_some(due)
    }

    /// The first whole second at which the contact's purchase-model churn risk reaches
    /// `threshold`, or `None` if it never does before [`Timestamp::MAX_VALID`].
    ///
    /// Churn risk rises monotonically while nothing happens (P(alive) falls and the
    /// purchase-rate posterior shifts towards slower buyers), so "the smallest whole second at
    /// or above the threshold" is one canonical answer, whatever bracket the search starts from.
    /// The search gallops forward from the contact's clock to bracket the crossing, then narrows
    /// the bracket with the Illinois variant of regula falsi (a bisection step every fourth
    /// iteration bounds the worst case), keeping both ends whole seconds: typically 10-15 score
    /// evaluations instead of the ~33 of plain bisection over the whole range.
    fn risk_crossing(&self, state: &ContactState, threshold: f64) -> Option<Timestamp> {
        let first_day = state.purchase_history()?.first_day?;
        let excess = |second: i64| {
            let risk = self
                .scorer
                .purchase_risk(state, Timestamp::from_millis(second * SECOND))
                .unwrap_or(0.0);
            risk - threshold
        };
        let first = Timestamp::from_day(first_day).millis().div_euclid(SECOND);
        let last = Timestamp::MAX_VALID.millis().div_euclid(SECOND);
        let start = state.clock.millis().div_euclid(SECOND).clamp(first, last);
        // Bracket: `low` below the threshold, `high` at or above it.
        let (mut low, mut high, mut f_low, mut f_high);
        let f_start = excess(start);
        if f_start >= 0.0 {
            let f_first = excess(first);
            if f_first >= 0.0 {
                return Some(Timestamp::from_millis(first * SECOND));
            }
            (low, f_low, high, f_high) = (first, f_first, start, f_start);
        } else {
            (low, f_low) = (start, f_start);
            let mut step = 86_400;
            loop {
                let probe = (low + step).min(last);
                let f_probe = excess(probe);
                if f_probe >= 0.0 {
                    (high, f_high) = (probe, f_probe);
                    break;
                }
                if probe == last {
                    return None;
                }
                (low, f_low) = (probe, f_probe);
                step *= 2;
            }
        }
        let mut retained_side = 0i8;
        let mut iteration = 0u32;
        while high - low > 1 {
            iteration += 1;
            let probe = if iteration % 4 == 0 || f_high <= f_low {
                low + (high - low) / 2
            } else {
                let secant = low as f64 - f_low * (high - low) as f64 / (f_high - f_low);
                (secant.round() as i64).clamp(low + 1, high - 1)
            };
            let f_probe = excess(probe);
            if f_probe >= 0.0 {
                (high, f_high) = (probe, f_probe);
                if retained_side == 1 {
                    f_low /= 2.0;
                }
                retained_side = 1;
            } else {
                (low, f_low) = (probe, f_probe);
                if retained_side == -1 {
                    f_high /= 2.0;
                }
                retained_side = -1;
            }
        }
        Some(Timestamp::from_millis(high * SECOND))
    }

    /// Recomputes the cached [`ContactState::risk_due`](crate::domain::ContactExtra::risk_due) after purchases or the stage changed.
    fn refresh_risk_due(&self, state: &mut ContactState) {
        let lowest = self
            .timed_rules(state.stage)
            .filter_map(|rule| rule.conditions.min_churn_risk)
            .min_by(f64::total_cmp);
        let due = lowest
            .and_then(|threshold| self.risk_crossing(state, threshold))
            .unwrap_or(Timestamp::NEVER);
        if due != state.risk_due() {
            state.extra_mut().risk_due = due;
        }
    }

    /// A lower bound on when the next timer of this contact can fire ([`Timestamp::NEVER`] if
    /// none): cheap, from cached and stored fields only. Callers use it to skip contacts with
    /// nothing due and to schedule sweeps.
    pub fn next_due(&self, state: &ContactState) -> Timestamp {
        if state.seq == 0 {
            return Timestamp::NEVER;
        }
        self.timed_rules(state.stage)
            .map(|rule| {
                let mut due = state.clock;
                if let Some(inactive) = rule.conditions.min_inactive_millis {
                    due = due.max(state.last_activity_at.plus_millis(inactive));
                }
                if rule.conditions.min_churn_risk.is_some() {
                    due = due.max(state.risk_due());
                }
                due
            })
            .min()
            .unwrap_or(Timestamp::NEVER)
    }

    /// Folds an event's effect on statistics into the state (no stage logic).
    fn absorb(&self, state: &mut ContactState, event: &ContactEvent, effective: Timestamp) {
        let at = event.occurred_at;
        state.last_activity_at = state.last_activity_at.max(at);
        let weight = self.model.engagement.weight(event);
        if weight != 0.0 {
            let decayed = self
                .model
                .engagement
                .decay(state.engagement, effective.millis_since(state.engaged_at));
            state.engagement = decayed + weight;
            state.engaged_at = state.engaged_at.max(effective);
        }
        match &event.body {
            EventBody::Click(click) => {
                if click.carries_identity() {
                    state.extra_mut().identity.absorb(click);
                }
            }
            EventBody::Purchase(purchase) => {
                let history = state.extra_mut().purchases.get_or_insert_with(Default::default);
                history.record(fingerprint(&purchase.order_id), at, purchase.amount, purchase.status);
            }
            EventBody::AdConversion(_) => {}
        }
    }

    /// Decides and emits the stage changes due at `now`; returns true when any was emitted.
    /// The trigger is the event's, else `cause`, else a timer.
    fn evaluate(
        &self,
        key: &ContactKey,
        state: &mut ContactState,
        now: Timestamp,
        event: Option<&ContactEvent>,
        cause: Option<&str>,
        out: &mut Vec<StageChange>,
    ) -> bool {
        let mut risk = RiskCache::new(now);
        let emitted_before = out.len();
        let mut emit = |engine: &Self, state: &mut ContactState, risk: &mut RiskCache, step: Move| {
            let trigger = match (event, cause) {
                (Some(event), _) => Trigger::Event(event.event_id.clone()),
                (None, Some(cause)) => Trigger::Event(cause.into()),
                (None, None) => Trigger::Timer,
            };
            out.push(engine.take(key, state, now, step, trigger, risk));
        };
        if state.seq == 0 {
            // First sight: the initial stage, or further if a rule places the contact there.
            let (to, reason) = self
                .forward_target(state, state.stage, now, event, &mut risk)
                .unwrap_or((state.stage, self.model.first_seen.clone()));
            let skipped = self.model.between(None, self.model.rank(to).unwrap_or(0));
            emit(self, state, &mut risk, Move::new(to, reason, skipped, false));
        } else if self.model.is_lost(state.stage) {
            let lost = self.model.stage(state.stage);
            if event.is_some_and(|event| lost.reactivate_on.iter().any(|matcher| matcher.matches(event))) {
                let home = state.main_stage;
                let (to, _) = self
                    .forward_target(state, home, now, event, &mut risk)
                    .unwrap_or((home, self.model.reactivated.clone()));
                // Coming back only to be lost again at once is no reactivation.
                if self.lost_target(state, to, now, event, &mut risk).is_none() {
                    let skipped = self
                        .model
                        .between(self.model.rank(home), self.model.rank(to).unwrap_or(0));
                    let reason = self.model.reactivated.clone();
                    emit(self, state, &mut risk, Move::new(to, reason, skipped, true));
                }
                return out.len() > emitted_before;
            }
        } else if let Some((to, reason)) = self.forward_target(state, state.stage, now, event, &mut risk) {
            let skipped = self
                .model
                .between(self.model.rank(state.stage), self.model.rank(to).unwrap_or(0));
            emit(self, state, &mut risk, Move::new(to, reason, skipped, false));
        }
        if let Some((to, reason)) = self.lost_target(state, state.stage, now, event, &mut risk) {
            emit(self, state, &mut risk, Move::new(to, reason, Vec::new(), false));
        }
        out.len() > emitted_before
    }

    /// The highest-ranked main stage a firing rule moves `from` to, with the rule's reason.
    fn forward_target(
        &self,
        state: &ContactState,
        from: StageId,
        now: Timestamp,
        event: Option<&ContactEvent>,
        risk: &mut RiskCache,
    ) -> Option<(StageId, Arc<str>)> {
        let from_rank = self.model.rank(from)?;
        self.model
            .main_rules
            .iter()
            .filter(|rule| self.model.rank(rule.to).is_some_and(|rank| rank > from_rank))
            .filter(|rule| self.fires(rule, from, state, now, event, risk))
            .max_by_key(|rule| self.model.rank(rule.to))
            .map(|rule| (rule.to, rule.reason.clone()))
    }

    /// The lost stage a firing rule moves `from` to (the last-listed one when several fire).
    fn lost_target(
        &self,
        state: &ContactState,
        from: StageId,
        now: Timestamp,
        event: Option<&ContactEvent>,
        risk: &mut RiskCache,
    ) -> Option<(StageId, Arc<str>)> {
        self.model
            .lost_rules
            .iter()
            .filter(|rule| rule.to != from && self.fires(rule, from, state, now, event, risk))
            .max_by_key(|rule| rule.to)
            .map(|rule| (rule.to, rule.reason.clone()))
    }

    fn fires(
        &self,
        rule: &Rule,
        from: StageId,
        state: &ContactState,
        now: Timestamp,
        event: Option<&ContactEvent>,
        risk: &mut RiskCache,
    ) -> bool {
        if !rule.from.contains(from) {
            return false;
        }
        if !rule.on.is_empty() && !event.is_some_and(|event| rule.on.iter().any(|matcher| matcher.matches(event))) {
            return false;
        }
        self.conditions_hold(&rule.conditions, state, now, risk)
    }

    fn conditions_hold(
        &self,
        conditions: &Conditions,
        state: &ContactState,
        now: Timestamp,
        risk: &mut RiskCache,
    ) -> bool {
        let purchases = state.purchase_history();
        let purchase_days = purchases.map_or(0, |history| {
            if history.first_day.is_some() {
                history.repeat_days + 1
            } else {
                0
            }
        });
        if let Some(min) = conditions.min_engagement {
            let engagement = self
                .model
                .engagement
                .decay(state.engagement, now.millis_since(state.engaged_at));
            if f64::from(engagement) < min {
                return false;
            }
        }
        if conditions.min_purchase_days.is_some_and(|min| purchase_days < min) {
            return false;
        }
        if let Some((count, window)) = conditions.min_purchase_days_within {
            let within = purchases.map_or(0, |history| {
                history.purchase_days_between(now.plus_millis(-window), now)
            });
            if within < count {
                return false;
            }
        }
        if conditions
            .min_inactive_millis
            .is_some_and(|min| now.millis_since(state.last_activity_at) < min)
        {
            return false;
        }
        if conditions.all_orders_reversed && !purchases.is_some_and(PurchaseHistory::all_orders_reversed) {
            return false;
        }
        if conditions.needs_churn_risk() {
            let Some(value) = risk.get(&self.scorer, state) else {
                return false;
            };
            if conditions.min_churn_risk.is_some_and(|min| value < min)
                || conditions.max_churn_risk.is_some_and(|max| value >= max)
            {
                return false;
            }
        }
        true
    }

    /// Moves the contact and describes the move as a stage change.
    fn take(
        &self,
        key: &ContactKey,
        state: &mut ContactState,
        now: Timestamp,
        step: Move,
        trigger: Trigger,
        risk: &mut RiskCache,
    ) -> StageChange {
        let (from, millis_in_previous) = if state.seq == 0 {
            state.stage = step.to;
            state.stage_entered_at = now;
            (None, 0)
        } else {
            let from = state.stage;
            let spent = now.millis_since(state.stage_entered_at).max(0);
            state.move_to(step.to, now);
            (Some(from), spent)
        };
        if self.model.rank(step.to) > self.model.rank(state.main_stage) {
            state.main_stage = step.to;
        }
        state.seq += 1;
        StageChange {
            event_id: stage_change_id(key, state.born_at, state.seq),
            key: key.clone(),
            seq: state.seq,
            from,
            to: step.to,
            occurred_at: now,
            reason: step.reason,
            skipped: step.skipped,
            reactivated: step.reactivated,
            trigger,
            millis_in_previous,
            churn_risk: risk.get(&self.scorer, state),
            kind: ChangeKind::Transition,
        }
    }

    /// The record announcing that a contact's state ends here, at `at`, because of input
    /// `cause` (the caller removes the state): erased on request ([`ChangeKind::Deleted`]) or
    /// moved to the contact an anonymous visitor turned out to be ([`ChangeKind::Merged`]). It
    /// has the contact's next sequence number and leaves the stage it was in.
    pub fn ended(
        &self,
        key: &ContactKey,
        state: &ContactState,
        at: Timestamp,
        cause: &str,
        kind: ChangeKind,
    ) -> StageChange {
        let reason = match kind {
            ChangeKind::Merged(_) => "identity_merge",
            _ => "deletion_request",
        };
        let seq = state.seq + 1;
        StageChange {
            event_id: stage_change_id(key, state.born_at, seq),
            key: key.clone(),
            seq,
            from: (state.seq > 0).then_some(state.stage),
            to: state.stage,
            occurred_at: at,
            reason: Arc::from(reason),
            skipped: Vec::new(),
            reactivated: false,
            trigger: Trigger::Event(cause.into()),
            millis_in_previous: at.millis_since(state.stage_entered_at).max(0),
            churn_risk: None,
            kind,
        }
    }

    /// The anonymous id an event identifies as its contact: a sign-up or form submission that
    /// carries both ids.
    pub fn identifies<'a>(&self, event: &'a ContactEvent) -> Option<&'a str> {
        let EventBody::Click(click) = &event.body else {
            return None;
        };
        if !matches!(click.kind, ClickType::Signup | ClickType::FormSubmitted) {
            return None;
        }
        event.contact_id.as_ref()?;
        event.anonymous_id.as_deref().filter(|id| !id.is_empty())
    }

    /// Merges the state of the anonymous visitor the contact turned out to be (`visitor`,
    /// `None` when none was held) into the contact, answering `request`; a request the contact
    /// did not make, or one already answered, changes nothing (a handover delivered twice).
    ///
    /// The visitor's engagement adds to the contact's (both decayed to the merge), its stage
    /// visits join the contact's history, its identifiers fill the contact's gaps (the
    /// contact's own win), and the highest main stage it reached counts as reached. The
    /// contact's stage is then decided anew: forward to that stage if it is further along the
    /// main path (reason `identity_merge`), and on by the state rules; each change triggered
    /// by the identifying event.
    pub fn adopt(
        &self,
        key: &ContactKey,
        state: &mut ContactState,
        visitor: Option<&ContactState>,
        request: &Identify,
        out: &mut Vec<StageChange>,
    ) -> bool {
        let wanted = fingerprint(&request.anonymous_id);
        let Some(merge) = state.extra.as_deref_mut().and_then(|extra| {
            extra
                .merges
                .iter_mut()
                .find(|merge| merge.anonymous == wanted && !merge.done)
        }) else {
            return false;
        };
        merge.done = true;
        let Some(visitor) = visitor else {
            return true;
        };
        let at = state.clock.max(request.occurred_at);
        let engagement = &self.model.engagement;
        state.engagement = engagement.decay(state.engagement, at.millis_since(state.engaged_at))
            + engagement.decay(visitor.engagement, at.millis_since(visitor.engaged_at));
        state.engaged_at = at;
        state.last_activity_at = state.last_activity_at.max(visitor.last_activity_at);
        let open_visit = StageSpan {
            stage: visitor.stage,
            visits: 1,
            first_entered_at: visitor.stage_entered_at,
            last_exited_at: at,
            total_millis: at.millis_since(visitor.stage_entered_at).max(0),
        };
        let extra = state.extra_mut();
        for span in visitor.history().iter().chain([&open_visit]) {
            match extra.history.iter_mut().find(|mine| mine.stage == span.stage) {
                Some(mine) => {
                    mine.visits += span.visits;
                    mine.first_entered_at = mine.first_entered_at.min(span.first_entered_at);
                    mine.last_exited_at = mine.last_exited_at.max(span.last_exited_at);
                    mine.total_millis += span.total_millis;
                }
                None => extra.history.push(*span),
            }
        }
        if let Some(identity) = visitor.identity() {
            extra.identity.fill_from(identity);
        }
        let stage_before = (state.seq, state.stage);
        let reached = self.model.rank(visitor.main_stage);
        if reached > self.model.rank(state.main_stage) {
            state.main_stage = visitor.main_stage;
        }
        let mut risk = RiskCache::new(at);
        if !self.model.is_lost(state.stage) && reached > self.model.rank(state.stage) {
            let step = Move::new(
                visitor.main_stage,
                Arc::from("identity_merge"),
                self.model.between(self.model.rank(state.stage), reached.unwrap_or(0)),
                false,
            );
            out.push(self.take(
                key,
                state,
                at,
                step,
                Trigger::Event(request.event_id.clone()),
                &mut risk,
            ));
        }
        state.clock = at;
        self.evaluate(key, state, at, None, Some(&request.event_id), out);
        if (state.seq, state.stage) != stage_before {
            self.refresh_risk_due(state);
        }
        true
    }
}

/// A decided move, before it is taken.
struct Move {
    to: StageId,
    reason: Arc<str>,
    skipped: Vec<StageId>,
    reactivated: bool,
}

impl Move {
    fn new(to: StageId, reason: Arc<str>, skipped: Vec<StageId>, reactivated: bool) -> Self {
        Move {
            to,
            reason,
            skipped,
            reactivated,
        }
    }
}

/// The deterministic id of the `seq`-th stage change of the contact under `key` first seen at
/// `born_at`: the first 128 bits of SHA-256 over the key, the birth time and the sequence
/// number, shown as a UUID-shaped hex string. A retry or a replay gives the same id, so
/// consumers can drop duplicates by it; a contact created again under the same key after an
/// erasure is born later, so its ids differ from its predecessor's.
pub fn stage_change_id(key: &ContactKey, born_at: Timestamp, seq: u32) -> StageChangeId {
    let mut hasher = Sha256::new();
    hasher.update(if key.anonymous { b"a" } else { b"c" });
    hasher.update(key.id.as_bytes());
    hasher.update(b"\0");
    hasher.update(born_at.millis().to_be_bytes());
    hasher.update(seq.to_be_bytes());
    let digest = hasher.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    StageChangeId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_change_ids_are_stable_sha256_prefixes() {
        // Pinned: consumers dedupe on these ids across releases, so they must never change.
        // Reference: python3 hashlib.sha256(b"c" + b"c1" + b"\0"
        //     + (1735689600000).to_bytes(8, "big", signed=True) + (1).to_bytes(4, "big")).
        let born = Timestamp::from_millis(1_735_689_600_000);
        assert_eq!(
            stage_change_id(&ContactKey::contact("c1"), born, 1).to_string(),
            "b272baa4-d185-6175-7ba1-df29b8b00902"
        );
        assert_eq!(
            stage_change_id(&ContactKey::anonymous("c1"), born, 1).to_string(),
            "f0860cfc-14db-dfc0-0f04-c1c79e13358a"
        );
        assert_ne!(
            stage_change_id(&ContactKey::contact("c1"), born, 2),
            stage_change_id(&ContactKey::contact("c1"), born, 1)
        );
        assert_ne!(
            stage_change_id(&ContactKey::contact("c1"), born.plus_millis(1), 1),
            stage_change_id(&ContactKey::contact("c1"), born, 1),
            "a contact created again after an erasure gets new ids"
        );
    }
}
