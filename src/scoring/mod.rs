//! Churn scoring (pure): BG/NBD-family models, fitting, and per-contact scores.
//!
//! `churn_risk = P(no purchase in the next H)` from the BG/NBD model (Fader, Hardie & Lee 2005)
//! or the modified BG/NBD (Batislam, Denizel & Filiztekin 2007), computed from a contact's
//! sufficient statistics (x, t_x, T) at a time passed in by the caller. Contacts who never bought
//! have no purchase process to model; they are scored on engagement recency instead and the
//! score says so. No I/O and no clock here.

pub mod bgnbd;
pub mod fit;
pub mod gamma_gamma;
pub mod special;

pub use bgnbd::{BgParams, Model, ModelKind, Rfm, TimeUnit};

use serde::Serialize;

use crate::domain::{ContactState, PurchaseHistory, Timestamp, MILLIS_PER_DAY};

/// Which model produced a score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreSource {
    /// BG/NBD on purchase history.
    BgNbd,
    /// Modified BG/NBD on purchase history.
    MbgNbd,
    /// No purchase yet: recency of any activity, exponential with a configured half-life.
    EngagementRecency,
}

/// A churn score with the inputs that explain it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ChurnScore {
    /// Which model produced it.
    pub source: ScoreSource,
    /// Probability of no purchase in the horizon (purchase models), or of having gone quiet
    /// (engagement recency). Always within [0, 1].
    pub churn_risk: f64,
    /// Horizon in days.
    pub horizon_days: f64,
    /// P(alive) from the purchase model.
    pub p_alive: Option<f64>,
    /// Expected purchases in the horizon.
    pub expected_purchases: Option<f64>,
    /// Repeat purchase days (model units are not needed for this one).
    pub x: Option<f64>,
    /// Recency in the model's time unit.
    pub t_x: Option<f64>,
    /// Age (T) in the model's time unit.
    pub t: Option<f64>,
    /// Days since the last purchase day began.
    pub days_since_last_purchase: Option<f64>,
    /// Days since the last activity of any kind.
    pub days_since_last_activity: f64,
}

/// Scores contacts with a fitted model and a horizon.
#[derive(Clone, Debug, PartialEq)]
pub struct ChurnScorer {
    /// The purchase model and its parameters.
    pub model: Model,
    /// The time unit the parameters were fitted in.
    pub time_unit: TimeUnit,
    /// Horizon H of `P(no purchase in the next H)`, in days.
    pub horizon_days: f64,
    /// Half-life of the engagement-recency score for contacts without purchases, in days.
    pub recency_half_life_days: f64,
}

impl ChurnScorer {
    /// The model's sufficient statistics for a purchase history as of `now`, in model units.
    ///
    /// `t_x` runs from the first to the last purchase *day*, `T` from the start of the first
    /// purchase day to `now`, as in the CDNOW summary (Fader, Hardie & Lee 2005).
    pub fn rfm(&self, purchases: &PurchaseHistory, now: Timestamp) -> Option<Rfm> {
        let first_day = purchases.first_day?;
        let last_day = purchases.last_day.unwrap_or(first_day);
        let unit = self.time_unit.days();
        let t_x = (last_day - first_day) as f64 / unit;
        let age_days = now.millis_since(Timestamp::from_day(first_day)) as f64 / MILLIS_PER_DAY as f64;
        Some(Rfm {
            x: f64::from(purchases.repeat_days),
            t_x,
            t: (age_days / unit).max(t_x),
        })
    }

    fn horizon(&self) -> f64 {
        self.horizon_days / self.time_unit.days()
    }

    /// Churn risk from the purchase model, for contacts with at least one completed purchase.
    /// This is what lifecycle rules compare against thresholds.
    pub fn purchase_risk(&self, state: &ContactState, now: Timestamp) -> Option<f64> {
        let rfm = self.rfm(state.purchase_history()?, now)?;
        Some(clamp_probability(self.model.p_no_purchase(rfm, self.horizon())))
    }

    /// The full score with its inputs.
    pub fn score(&self, state: &ContactState, now: Timestamp) -> ChurnScore {
        let days_since_last_activity = now.days_since(state.last_activity_at).max(0.0);
        let purchases = state.purchase_history();
        match purchases.and_then(|history| Some((history, self.rfm(history, now)?))) {
            Some((history, rfm)) => {
                let horizon = self.horizon();
                ChurnScore {
                    source: match self.model.kind {
                        ModelKind::BgNbd => ScoreSource::BgNbd,
                        ModelKind::MbgNbd => ScoreSource::MbgNbd,
                    },
                    churn_risk: clamp_probability(self.model.p_no_purchase(rfm, horizon)),
                    horizon_days: self.horizon_days,
                    p_alive: Some(clamp_probability(self.model.p_alive(rfm))),
                    expected_purchases: Some(self.model.expected_purchases(rfm, horizon).max(0.0)),
                    x: Some(rfm.x),
                    t_x: Some(rfm.t_x),
                    t: Some(rfm.t),
                    days_since_last_purchase: history
                        .last_day
                        .map(|day| now.days_since(Timestamp::from_day(day)).max(0.0)),
                    days_since_last_activity,
                }
            }
            None => ChurnScore {
                source: ScoreSource::EngagementRecency,
                churn_risk: clamp_probability(
                    1.0 - (-days_since_last_activity / self.recency_half_life_days * std::f64::consts::LN_2).exp(),
                ),
                horizon_days: self.horizon_days,
                p_alive: None,
                expected_purchases: None,
                x: None,
                t_x: None,
                t: None,
                days_since_last_purchase: None,
                days_since_last_activity,
            },
        }
    }
}

/// Maps any float into [0, 1]; NaN (which would be a bug upstream) becomes 1, the cautious side.
fn clamp_probability(value: f64) -> f64 {
    debug_assert!(!value.is_nan(), "probability is NaN");
    if value.is_nan() {
        1.0
    } else {
        value.clamp(0.0, 1.0)
    }
}
