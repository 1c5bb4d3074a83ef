//! The BG/NBD model (Fader, Hardie & Lee 2005, "Counting Your Customers the Easy Way") and the
//! modified BG/NBD (Batislam, Denizel & Filiztekin 2007): per-customer log-likelihood and its
//! analytic gradient, P(alive), expected purchases, and the churn risk
//! `P(no purchase in the next h)`.
//!
//! Pure math on a customer's sufficient statistics `(x, t_x, T)` in the model's time unit: no I/O,
//! no clock, no contact state (turning a purchase history into an [`Rfm`] at a given time is
//! `scoring/mod.rs`'s job), and no fitting (`fit.rs`). Everything is computed in log space and
//! every output is finite and within its range for finite positive parameters and a valid
//! [`Rfm`]: probabilities in [0, 1], expectations `≥ 0`.
//!
//! The two models, per customer with purchase rate `λ` and drop-out probability `p`:
//! - BG/NBD: after each *repeat* purchase the customer drops out with probability `p`;
//!   `L = (1-p)^x λ^x e^{-λT} + [x > 0] p (1-p)^{x-1} λ^x e^{-λ t_x}`.
//! - MBG/NBD: the customer may also drop out right after the *first* purchase (time 0), so
//!   `L = (1-p)^{x+1} λ^x e^{-λT} + p (1-p)^x λ^x e^{-λ t_x}`, and a one-time buyer is not certainly
//!   alive.
//!
//! With `λ ~ Gamma(r, α)` and `p ~ Beta(a, b)` integrated out these give the papers' likelihood
//! functions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::special::{alive_expectation, digamma, ln_gamma_ratio, sigmoid};

/// Which member of the BG/NBD family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// BG/NBD (Fader, Hardie & Lee 2005): drop-out only after repeat purchases.
    BgNbd,
    /// Modified BG/NBD (Batislam, Denizel & Filiztekin 2007): drop-out possible after every
    /// purchase, the first included.
    MbgNbd,
}

impl ModelKind {
    /// The name used in config files and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelKind::BgNbd => "bg-nbd",
            ModelKind::MbgNbd => "mbg-nbd",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of an enum's spellings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?} (expected one of: {expected})")]
pub struct ParseNameError {
    /// What was being parsed.
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted spellings.
    pub expected: &'static str,
}

impl FromStr for ModelKind {
    type Err = ParseNameError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "bg-nbd" => Ok(ModelKind::BgNbd),
            "mbg-nbd" => Ok(ModelKind::MbgNbd),
            _ => Err(ParseNameError {
                what: "model kind",
                value: value.to_owned(),
                expected: "bg-nbd, mbg-nbd",
            }),
        }
    }
}

/// The time unit of a model's parameters (`α` is a time, `r/α` a rate per unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    /// One day.
    Days,
    /// Seven days (the unit of the CDNOW reference figures).
    Weeks,
}

impl TimeUnit {
    /// Length of one unit in days.
    pub const fn days(self) -> f64 {
        match self {
            TimeUnit::Days => 1.0,
            TimeUnit::Weeks => 7.0,
        }
    }

    /// The name used in config files and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Days => "days",
            TimeUnit::Weeks => "weeks",
        }
    }
}

impl fmt::Display for TimeUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TimeUnit {
    type Err = ParseNameError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "days" => Ok(TimeUnit::Days),
            "weeks" => Ok(TimeUnit::Weeks),
            _ => Err(ParseNameError {
                what: "time unit",
                value: value.to_owned(),
                expected: "days, weeks",
            }),
        }
    }
}

/// Parameters of a BG/NBD-family model: `λ ~ Gamma(shape r, rate α)`, `p ~ Beta(a, b)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BgParams {
    /// Shape of the purchase-rate distribution.
    pub r: f64,
    /// Rate (inverse scale) of the purchase-rate distribution, in the model's time unit.
    pub alpha: f64,
    /// First shape of the drop-out probability distribution.
    pub a: f64,
    /// Second shape of the drop-out probability distribution.
    pub b: f64,
}

impl BgParams {
    /// Every parameter must be finite and strictly positive.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [("r", self.r), ("alpha", self.alpha), ("a", self.a), ("b", self.b)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("model parameter {name} must be finite and > 0, got {value}"));
            }
        }
        Ok(())
    }
}

/// A customer's sufficient statistics, in the model's time unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rfm {
    /// Repeat purchases: distinct purchase days after the first (frequency).
    pub x: f64,
    /// Time from the first to the last purchase (recency); 0 when `x = 0`.
    pub t_x: f64,
    /// Time from the first purchase to now (age, `T`); `0 ≤ t_x ≤ t`.
    pub t: f64,
}

impl Rfm {
    /// Finite, `x ≥ 0`, `0 ≤ t_x ≤ t`. The model functions assume this (checked in debug builds).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.x.is_finite() && self.t_x.is_finite() && self.t.is_finite()) {
            return Err(format!("non-finite customer statistics {self:?}"));
        }
        if self.x < 0.0 || self.t_x < 0.0 || self.t_x > self.t {
            return Err(format!(
                "customer statistics need x >= 0 and 0 <= t_x <= T, got {self:?}"
            ));
        }
        Ok(())
    }
}

/// A model kind with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// BG/NBD or MBG/NBD.
    pub kind: ModelKind,
    /// Fitted parameters, in the time unit the data was expressed in.
    pub params: BgParams,
}

/// Per-evaluation constants: everything that depends on the parameters only.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParamTerms {
    kind: ModelKind,
    params: BgParams,
    ln_alpha: f64,
    ln_a: f64,
    digamma_r: f64,
    /// `ln Γ(a+b) - ln Γ(b)`.
    ln_gamma_ab_b: f64,
    digamma_ab: f64,
    digamma_b: f64,
}

/// Constants of one evaluation that depend on the parameters and the purchase count `x`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CountTerms {
    pub(crate) x: f64,
    /// Row log-likelihood without the `(α+T)` and drop-out terms:
    /// `ln Γ(r+x) - ln Γ(r) + r ln α + ln B(a, b+x') - ln B(a, b)`, `x' = x` (BG) or `x+1` (MBG).
    pub(crate) constant: f64,
    /// The matching parts of the gradient with respect to (r, a, b); α's part needs T.
    pub(crate) d_r: f64,
    pub(crate) d_a: f64,
    pub(crate) d_b: f64,
    /// Whether the "dropped out after the last purchase" term exists (x > 0 for BG/NBD, always
    /// for MBG/NBD).
    pub(crate) has_dropout_term: bool,
    /// `ln(a / (b + x''))`, `x'' = x - 1` (BG) or `x` (MBG): the odds of having dropped out after
    /// the last purchase rather than being alive, before the time factor.
    pub(crate) ln_dropout_odds: f64,
    /// `1 / (b + x'')` for the gradient.
    pub(crate) inv_b_denominator: f64,
}

impl ParamTerms {
    pub(crate) fn new(model: &Model) -> Self {
        let BgParams { r, alpha, a, b } = model.params;
        ParamTerms {
            kind: model.kind,
            params: model.params,
            ln_alpha: alpha.ln(),
            ln_a: a.ln(),
            digamma_r: digamma(r),
            ln_gamma_ab_b: -ln_gamma_ratio(b, a),
            digamma_ab: digamma(a + b),
            digamma_b: digamma(b),
        }
    }

    /// The terms for purchase count `x` (the expensive special functions are here, so the fit
    /// calls this once per distinct `x`, not once per row).
    pub(crate) fn count_terms(&self, x: f64) -> CountTerms {
        let BgParams { r, a, b, .. } = self.params;
        let (x_beta, has_dropout_term, b_denominator) = match self.kind {
            ModelKind::BgNbd => (x, x > 0.0, b + x - 1.0),
            ModelKind::MbgNbd => (x + 1.0, true, b + x),
        };
        // B(a, b+x') / B(a, b) = Γ(b+x') Γ(a+b) / (Γ(b) Γ(a+b+x')). The ratios of gamma functions
        // with large arguments go through `ln_gamma_ratio`, which never subtracts two numbers of
        // size x ln x (x can be 100,000).
        let constant = -ln_gamma_ratio(r, x) + r * self.ln_alpha + self.ln_gamma_ab_b + ln_gamma_ratio(b + x_beta, a);
        let digamma_abx = digamma(a + b + x_beta);
        let (ln_dropout_odds, inv_b_denominator) = if has_dropout_term {
            (self.ln_a - b_denominator.ln(), 1.0 / b_denominator)
        } else {
            (f64::NEG_INFINITY, 0.0)
        };
        CountTerms {
            x,
            constant,
            d_r: digamma(r + x) - self.digamma_r + self.ln_alpha,
            d_a: self.digamma_ab - digamma_abx,
            d_b: self.digamma_ab + digamma(b + x_beta) - self.digamma_b - digamma_abx,
            has_dropout_term,
            ln_dropout_odds,
            inv_b_denominator,
        }
    }

    /// The parameters these terms were computed for.
    pub(crate) fn params(&self) -> BgParams {
        self.params
    }

    /// `(ln(α + t), 1/(α + t))`: the only per-time quantities a row needs, so the fit can
    /// compute them once per distinct time value instead of once per row.
    #[inline]
    pub(crate) fn time_terms(&self, t: f64) -> (f64, f64) {
        let shifted = self.params.alpha + t;
        (shifted.ln(), 1.0 / shifted)
    }

    /// Log-likelihood of one customer with `x = count.x`, age terms `at_t = time_terms(T)` and
    /// recency terms `at_t_x = time_terms(t_x)`, with its gradient with respect to (r, α, a, b)
    /// written into `gradient`.
    ///
    /// `ln L = constant - (r+x) ln(α+T) + [dropout] ln(1 + e^D)` with
    /// `D = ln(a/(b+x'')) + (r+x) (ln(α+T) - ln(α+t_x))`: the two terms of the likelihood share
    /// the factor `(α+T)^-(r+x)`, and their ratio `e^D` is the odds of "dropped out after the last
    /// purchase" against "alive", so the log-sum-exp is a softplus and `1 - P(alive) = σ(D)`.
    /// (`fit.rs` sums the same expression over many rows with the per-count parts factored out;
    /// its tests check the two agree.)
    #[inline]
    pub(crate) fn row(&self, count: &CountTerms, at_t: (f64, f64), at_t_x: (f64, f64), gradient: &mut [f64; 4]) -> f64 {
        let BgParams { r, alpha, a, .. } = self.params;
        let rx = r + count.x;
        let (ln_alpha_t, inv_alpha_t) = at_t;
        let (ln_alpha_t_x, inv_alpha_t_x) = at_t_x;
        let mut log_likelihood = count.constant - rx * ln_alpha_t;
        let (dropout_weight, span, inverse_span) = if count.has_dropout_term {
            let span = ln_alpha_t - ln_alpha_t_x;
            let (softplus, weight) = softplus_and_sigmoid(count.ln_dropout_odds + rx * span);
            log_likelihood += softplus;
            (weight, span, inv_alpha_t_x - inv_alpha_t)
        } else {
            (0.0, 0.0, 0.0)
        };
        gradient[0] = count.d_r - ln_alpha_t + dropout_weight * span;
        gradient[1] = r / alpha - rx * inv_alpha_t - dropout_weight * rx * inverse_span;
        gradient[2] = count.d_a + dropout_weight / a;
        gradient[3] = count.d_b - dropout_weight * count.inv_b_denominator;
        log_likelihood
    }
}

/// `(ln(1 + e^d), 1/(1 + e^-d))` sharing one exponential: the softplus and its derivative, the
/// log-sum-exp of the likelihood's two terms and the weight of the second.
#[inline]
pub(crate) fn softplus_and_sigmoid(d: f64) -> (f64, f64) {
    let small = (-d.abs()).exp();
    let log_term = small.ln_1p();
    if d >= 0.0 {
        (d + log_term, 1.0 / (1.0 + small))
    } else {
        (log_term, small / (1.0 + small))
    }
}

impl Model {
    /// `ln P(X = x, t_x | T)` for one customer: FHL 2005 (BG/NBD) or Batislam et al. 2007
    /// (MBG/NBD), in log space (see [`Model::log_likelihood_gradient`] for the derivative).
    pub fn log_likelihood(&self, rfm: Rfm) -> f64 {
        debug_assert!(
            rfm.validate().is_ok() && self.params.validate().is_ok(),
            "{self:?} {rfm:?}"
        );
        let terms = ParamTerms::new(self);
        let mut gradient = [0.0; 4];
        terms.row(
            &terms.count_terms(rfm.x),
            terms.time_terms(rfm.t),
            terms.time_terms(rfm.t_x),
            &mut gradient,
        )
    }

    /// Analytic `∂ ln L / ∂(r, α, a, b)`:
    ///
    /// ```text
    /// ∂r = ψ(r+x) - ψ(r) + ln α - ln(α+T) + σ(D) ln((α+T)/(α+t_x))
    /// ∂α = r/α - (r+x)/(α+T) - σ(D) (r+x) (T - t_x) / ((α+T)(α+t_x))
    /// ∂a = ψ(a+b) - ψ(a+b+x') + σ(D)/a
    /// ∂b = ψ(a+b) + ψ(b+x') - ψ(b) - ψ(a+b+x') - σ(D)/(b+x'')
    /// ```
    /// with `x' = x, x'' = x - 1` (BG/NBD; σ(D) = 0 when x = 0) or `x' = x + 1, x'' = x` (MBG/NBD).
    pub fn log_likelihood_gradient(&self, rfm: Rfm) -> [f64; 4] {
        debug_assert!(
            rfm.validate().is_ok() && self.params.validate().is_ok(),
            "{self:?} {rfm:?}"
        );
        let terms = ParamTerms::new(self);
        let mut gradient = [0.0; 4];
        terms.row(
            &terms.count_terms(rfm.x),
            terms.time_terms(rfm.t),
            terms.time_terms(rfm.t_x),
            &mut gradient,
        );
        gradient
    }

    /// `ln` of the odds "dropped out after the last purchase : alive", `D` above; `-∞` when the
    /// customer cannot have dropped out (BG/NBD with no repeat purchase).
    fn ln_dropout_odds(&self, rfm: Rfm) -> f64 {
        let BgParams { r, alpha, a, b } = self.params;
        let b_denominator = match self.kind {
            ModelKind::BgNbd if rfm.x > 0.0 => b + rfm.x - 1.0,
            ModelKind::BgNbd => return f64::NEG_INFINITY,
            ModelKind::MbgNbd => b + rfm.x,
        };
        a.ln() - b_denominator.ln() + (r + rfm.x) * ((rfm.t - rfm.t_x) / (alpha + rfm.t_x)).ln_1p()
    }

    /// `P(alive at T | x, t_x, T)`: the share of the first likelihood term. For BG/NBD
    /// (FHL 2005; Fader, Hardie & Lee's note "Computing P(alive) using the BG/NBD model")
    /// `1 / (1 + a/(b+x-1) ((α+T)/(α+t_x))^{r+x})`, and 1 when x = 0; for MBG/NBD
    /// `1 / (1 + a/(b+x) ((α+T)/(α+t_x))^{r+x})` for every x.
    pub fn p_alive(&self, rfm: Rfm) -> f64 {
        debug_assert!(
            rfm.validate().is_ok() && self.params.validate().is_ok(),
            "{self:?} {rfm:?}"
        );
        sigmoid(-self.ln_dropout_odds(rfm))
    }

    /// Shape of the Beta posterior of `p` for a customer alive at T, `b + x` (BG/NBD: x drop-out
    /// chances survived) or `b + x + 1` (MBG/NBD: one more, at the first purchase).
    fn posterior_b(&self, x: f64) -> f64 {
        match self.kind {
            ModelKind::BgNbd => self.params.b + x,
            ModelKind::MbgNbd => self.params.b + x + 1.0,
        }
    }

    /// `E[X(T, T+h) | x, t_x, T]`, expected purchases in the next `horizon` time units.
    ///
    /// Given alive at T, `λ | data ~ Gamma(r+x, α+T)` and `p | data ~ Beta(a, b')` with the
    /// posterior `b'` above, and the future is a fresh BG/NBD process with those parameters, so
    /// `E = P(alive) · K(r+x, a, b', h/(α+T))` with the kernel
    /// [`alive_expectation`](super::special::alive_expectation). For BG/NBD this is FHL 2005
    /// conditional expectation; for MBG/NBD Batislam et al. 2007's. Returns 0 for `horizon ≤ 0`.
    pub fn expected_purchases(&self, rfm: Rfm, horizon: f64) -> f64 {
        debug_assert!(
            rfm.validate().is_ok() && self.params.validate().is_ok(),
            "{self:?} {rfm:?}"
        );
        if horizon.is_nan() || horizon <= 0.0 {
            return 0.0;
        }
        let p_alive = self.p_alive(rfm);
        if p_alive == 0.0 {
            // Also keeps 0 · ∞ out when the kernel overflows (it is at most (r+x) h/(α+T)).
            return 0.0;
        }
        let BgParams { r, alpha, a, .. } = self.params;
        let kernel = alive_expectation(
            r + rfm.x,
            a,
            self.posterior_b(rfm.x),
            scaled_horizon(horizon, alpha + rfm.t),
        );
        let value = p_alive * kernel;
        debug_assert!(value >= 0.0, "expected purchases {value} for {self:?} {rfm:?}");
        value.clamp(0.0, f64::MAX)
    }

    /// Churn risk: `P(X(T, T+h) = 0 | x, t_x, T)`.
    ///
    /// `P0 = (1 - P(alive)) + P(alive) ((α+T)/(α+T+h))^{r+x}`. Given alive at T, the posterior
    /// of `λ` is `Gamma(r+x, α+T)` in both models (the `λ` part of both likelihoods is
    /// `λ^x e^{-λT}`), and in both a customer can only drop out right *after* a purchase: in
    /// MBG/NBD the extra drop-out chance is at the first purchase, which lies in the past. So
    /// "no purchase in (T, T+h]" for a live customer is exactly "no Poisson event in the window",
    /// `E[e^{-λh}] = ((α+T)/(α+T+h))^{r+x}`, whatever happens to `p`. Only P(alive) differs
    /// between the models (MBG/NBD's is below 1 even for x = 0).
    ///
    /// Computed as the sum of its two non-negative terms, so there is no cancellation when the
    /// risk is small. Non-decreasing in T at fixed (x, t_x): P(alive) and the window factor
    /// `1 - ((α+T)/(α+T+h))^{r+x}` both decrease with T, so churn risk rises while nothing
    /// happens. Non-increasing in the horizon, from 1 at `horizon ≤ 0` (nobody buys in an empty
    /// window) to `1 - P(alive)` as the horizon grows without bound.
    pub fn p_no_purchase(&self, rfm: Rfm, horizon: f64) -> f64 {
        debug_assert!(
            rfm.validate().is_ok() && self.params.validate().is_ok(),
            "{self:?} {rfm:?}"
        );
        if horizon.is_nan() || horizon <= 0.0 {
            return 1.0;
        }
        let odds = self.ln_dropout_odds(rfm);
        let BgParams { r, alpha, .. } = self.params;
        let quiet_if_alive = (-(r + rfm.x) * (horizon / (alpha + rfm.t)).ln_1p()).exp();
        let value = sigmoid(odds) + sigmoid(-odds) * quiet_if_alive;
        debug_assert!((0.0..=1.0 + 1e-12).contains(&value), "p_no_purchase {value}");
        value.clamp(0.0, 1.0)
    }

    /// `E[X(t)]`, expected repeat purchases in the first `t` time units after a customer's first
    /// purchase: `K(r, a, b, t/α)` for BG/NBD (FHL 2005); for MBG/NBD the customer first
    /// survives the drop-out chance at time 0, `E[(1-p) h(p)] = b/(a+b) K(r, a, b+1, t/α)`
    /// (Batislam et al. 2007).
    pub fn unconditional_expected_purchases(&self, t: f64) -> f64 {
        debug_assert!(self.params.validate().is_ok(), "{self:?}");
        if t.is_nan() || t <= 0.0 {
            return 0.0;
        }
        let BgParams { r, alpha, a, b } = self.params;
        let s = scaled_horizon(t, alpha);
        let value = match self.kind {
            ModelKind::BgNbd => alive_expectation(r, a, b, s),
            ModelKind::MbgNbd => b / (a + b) * alive_expectation(r, a, b + 1.0, s),
        };
        value.clamp(0.0, f64::MAX)
    }
}

/// `horizon / scale`, capped at 1e300 so that an infinite horizon (or a tiny α) still gives the
/// kernel a finite argument; the expectations are saturated long before that.
fn scaled_horizon(horizon: f64, scale: f64) -> f64 {
    (horizon / scale).min(1e300)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDNOW_BG: BgParams = BgParams {
        r: 0.243,
        alpha: 4.414,
        a: 0.793,
        b: 2.426,
    };

    #[test]
    fn names_round_trip() {
        for kind in [ModelKind::BgNbd, ModelKind::MbgNbd] {
            assert_eq!(kind.to_string().parse::<ModelKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).expect("serialize");
            assert_eq!(json, format!("\"{kind}\""));
        }
        for unit in [TimeUnit::Days, TimeUnit::Weeks] {
            assert_eq!(unit.to_string().parse::<TimeUnit>(), Ok(unit));
            let json = serde_json::to_string(&unit).expect("serialize");
            assert_eq!(json, format!("\"{unit}\""));
        }
        assert!("bgnbd".parse::<ModelKind>().is_err());
        assert_eq!(TimeUnit::Weeks.days(), 7.0);
    }

    #[test]
    fn validate_rejects_bad_parameters() {
        assert!(CDNOW_BG.validate().is_ok());
        assert!(BgParams { r: 0.0, ..CDNOW_BG }.validate().is_err());
        assert!(BgParams {
            alpha: f64::NAN,
            ..CDNOW_BG
        }
        .validate()
        .is_err());
        assert!(BgParams {
            b: f64::INFINITY,
            ..CDNOW_BG
        }
        .validate()
        .is_err());
        assert!(Rfm {
            x: 1.0,
            t_x: 3.0,
            t: 2.0
        }
        .validate()
        .is_err());
    }

    /// FHL 2005, section 5 (and the data README): customer 1 of CDNOW, 39 weeks ahead.
    #[test]
    fn cdnow_customer_one_expected_purchases() {
        let model = Model {
            kind: ModelKind::BgNbd,
            params: CDNOW_BG,
        };
        let value = model.expected_purchases(
            Rfm {
                x: 2.0,
                t_x: 30.43,
                t: 38.86,
            },
            39.0,
        );
        assert!((value - 1.226).abs() < 5e-4, "{value}");
    }

    /// One reference row: `(x, t_x, T, h, P(alive) BG, E BG, P(alive) MBG, E MBG, LL BG, LL MBG)`.
    type ReferenceRow = (f64, f64, f64, f64, f64, f64, f64, f64, f64, f64);

    /// Reference rows at the published CDNOW parameters, computed with mpmath at 60 digits
    /// straight from the papers' formulas: FHL 2005 (BG/NBD) and Batislam et al. 2007
    /// (MBG/NBD). For example, the BG/NBD expectation is
    /// `(a+b+x-1)/(a-1) * (1 - ((al+T)/(al+T+h))**(r+x) * hyp2f1(r+x, b+x, a+b+x-1, h/(al+T+h)))`
    /// times P(alive), and MBG/NBD's uses `(a+b+x)` and `hyp2f1(r+x, b+x+1, a+b+x, ...)`; the
    /// likelihoods are `log(B(a,b+x)/B(a,b) Γ(r+x)α^r/(Γ(r)(α+T)^(r+x)) + ...)`.
    /// The last row (x = 100,000 in 7,305 days) has P(alive) ~ 1e-1846, which is 0 in f64.
    const REFERENCE: [ReferenceRow; 7] = [
        (
            2.0,
            30.43,
            38.86,
            39.0,
            0.726578570080673,
            1.2260281747671444,
            0.7744192426236461,
            1.3404974284912132,
            -9.45860630706627,
            -9.687182636249961,
        ),
        (
            0.0,
            0.0,
            38.86,
            39.0,
            1.0,
            0.19509805201126262,
            0.6372533379648953,
            0.1274613825456613,
            -0.5547132764381585,
            -0.38695222057085343,
        ),
        (
            1.0,
            1.71,
            38.86,
            13.0,
            0.2121009853773791,
            0.07467616500337061,
            0.275447369122965,
            0.09802961701900383,
            -4.469093275032589,
            -4.938632073574695,
        ),
        (
            7.0,
            29.43,
            35.71,
            52.0,
            0.7559130761325779,
            5.244238300489429,
            0.7760078533249226,
            5.500294768068138,
            -21.47958732585982,
            -21.586600479476072,
        ),
        (
            0.0,
            0.0,
            0.5,
            1000.0,
            1.0,
            6.295612000116691,
            0.7487770107409686,
            5.711645952668863,
            -0.02607559280225958,
            -0.019588478839294217,
        ),
        (
            25.0,
            30.0,
            31.0,
            4.0,
            0.9417626238360756,
            2.5798690881055513,
            0.9437666526248117,
            2.588772882332297,
            -37.331092791249255,
            -37.36172252704055,
        ),
        (
            100000.0,
            7000.0,
            7305.0,
            365.0,
            0.0,
            0.0,
            0.0,
            0.0,
            165837.61350460487,
            165837.61348667528,
        ),
    ];

    fn close(got: f64, want: f64, relative: f64) -> bool {
        (got - want).abs() <= relative * want.abs()
    }

    #[test]
    fn matches_mpmath_reference() {
        let bg = Model {
            kind: ModelKind::BgNbd,
            params: CDNOW_BG,
        };
        let mbg = Model {
            kind: ModelKind::MbgNbd,
            params: CDNOW_BG,
        };
        for (x, t_x, t, h, pa_bg, e_bg, pa_mbg, e_mbg, ll_bg, ll_mbg) in REFERENCE {
            let rfm = Rfm { x, t_x, t };
            for (model, pa, e, ll) in [(bg, pa_bg, e_bg, ll_bg), (mbg, pa_mbg, e_mbg, ll_mbg)] {
                let what = format!("{} {rfm:?} h={h}", model.kind);
                assert!(
                    close(model.p_alive(rfm), pa, 1e-14),
                    "{what}: P(alive) {} vs {pa}",
                    model.p_alive(rfm)
                );
                assert!(
                    close(model.expected_purchases(rfm, h), e, 1e-12),
                    "{what}: E {} vs {e}",
                    model.expected_purchases(rfm, h)
                );
                // Absolute 1e-12 of |LL| ~ 1e5 for the big row: its ln Γ terms are ~1e6 each.
                assert!(
                    close(model.log_likelihood(rfm), ll, 1e-13),
                    "{what}: LL {} vs {ll}",
                    model.log_likelihood(rfm)
                );
            }
        }
    }

    /// mpmath, 60 digits: `(a+b-1)/(a-1) * (1 - (al/(al+t))**r * hyp2f1(r, b, a+b-1, t/(al+t)))`
    /// (FHL 2005) and `b/(a-1) * (1 - (al/(al+t))**r * hyp2f1(r, b+1, a+b, t/(al+t)))`
    /// (Batislam et al. 2007) at the published CDNOW parameters.
    #[test]
    fn unconditional_expectation_matches_mpmath() {
        let cases = [
            (0.1429, 0.007828347516072164, 0.0059066874664007955),
            (1.0, 0.05326789117165828, 0.040451100918479525),
            (3.0, 0.15086523089304668, 0.1159828115346459),
            (31.8571, 1.041996060852211, 0.856576828622378),
            (32.0, 1.0452433283744438, 0.8593873376853567),
            (78.0, 1.8605190579427686, 1.5804734554010733),
        ];
        let bg = Model {
            kind: ModelKind::BgNbd,
            params: CDNOW_BG,
        };
        let mbg = Model {
            kind: ModelKind::MbgNbd,
            params: CDNOW_BG,
        };
        for (t, want_bg, want_mbg) in cases {
            assert!(close(bg.unconditional_expected_purchases(t), want_bg, 1e-12), "bg {t}");
            assert!(
                close(mbg.unconditional_expected_purchases(t), want_mbg, 1e-12),
                "mbg {t}"
            );
        }
        assert_eq!(bg.unconditional_expected_purchases(0.0), 0.0);
    }

    #[test]
    fn p_no_purchase_is_a_probability_and_consistent() {
        let bg = Model {
            kind: ModelKind::BgNbd,
            params: CDNOW_BG,
        };
        let mbg = Model {
            kind: ModelKind::MbgNbd,
            params: CDNOW_BG,
        };
        let rfm = Rfm {
            x: 2.0,
            t_x: 30.43,
            t: 38.86,
        };
        for model in [bg, mbg] {
            let pa = model.p_alive(rfm);
            // Empty window: nobody buys.
            assert_eq!(model.p_no_purchase(rfm, 0.0), 1.0);
            // Infinite horizon: the alive will buy eventually.
            assert!((model.p_no_purchase(rfm, 1e300) - (1.0 - pa)).abs() < 1e-12);
            let p0 = model.p_no_purchase(rfm, 39.0);
            let by_hand = 1.0 - pa + pa * ((0.243f64 + 38.86 + 4.414 - 0.243) / (4.414 + 38.86 + 39.0)).powf(2.243);
            assert!((p0 - by_hand).abs() < 1e-14, "{p0} vs {by_hand}");
        }
        // BG/NBD: a one-time buyer is certainly alive; MBG/NBD: not.
        let new_customer = Rfm {
            x: 0.0,
            t_x: 0.0,
            t: 0.0,
        };
        assert_eq!(bg.p_alive(new_customer), 1.0);
        assert!((mbg.p_alive(new_customer) - CDNOW_BG.b / (CDNOW_BG.a + CDNOW_BG.b)).abs() < 1e-15);
    }

    #[test]
    fn extreme_but_valid_inputs_stay_finite() {
        let tiny_alpha = BgParams {
            alpha: 1e-300,
            ..CDNOW_BG
        };
        for kind in [ModelKind::BgNbd, ModelKind::MbgNbd] {
            for params in [CDNOW_BG, tiny_alpha] {
                let model = Model { kind, params };
                for rfm in [
                    Rfm {
                        x: 0.0,
                        t_x: 0.0,
                        t: 0.0,
                    },
                    Rfm {
                        x: 3.0,
                        t_x: 1.0,
                        t: 1.0,
                    },
                ] {
                    for horizon in [f64::INFINITY, 1e308, 1e6] {
                        let expected = model.expected_purchases(rfm, horizon);
                        assert!(
                            expected.is_finite() && expected >= 0.0,
                            "{model:?} {rfm:?} {horizon}: {expected}"
                        );
                        let quiet = model.p_no_purchase(rfm, horizon);
                        assert!((0.0..=1.0).contains(&quiet), "{model:?} {rfm:?} {horizon}: {quiet}");
                    }
                    assert!(model.log_likelihood(rfm).is_finite());
                    assert!(model.unconditional_expected_purchases(f64::INFINITY).is_finite());
                }
            }
        }
    }

    #[test]
    fn gradient_matches_central_differences() {
        for kind in [ModelKind::BgNbd, ModelKind::MbgNbd] {
            let model = Model { kind, params: CDNOW_BG };
            for rfm in [
                Rfm {
                    x: 0.0,
                    t_x: 0.0,
                    t: 38.86,
                },
                Rfm {
                    x: 2.0,
                    t_x: 30.43,
                    t: 38.86,
                },
                Rfm {
                    x: 14.0,
                    t_x: 20.0,
                    t: 21.0,
                },
            ] {
                let analytic = model.log_likelihood_gradient(rfm);
                for (index, derivative) in analytic.iter().enumerate() {
                    let at = |step: f64| {
                        let mut params = [CDNOW_BG.r, CDNOW_BG.alpha, CDNOW_BG.a, CDNOW_BG.b];
                        params[index] += step;
                        let [r, alpha, a, b] = params;
                        Model {
                            kind,
                            params: BgParams { r, alpha, a, b },
                        }
                        .log_likelihood(rfm)
                    };
                    let step = 1e-6;
                    let numeric = (at(step) - at(-step)) / (2.0 * step);
                    assert!(
                        (numeric - derivative).abs() < 1e-7 * (1.0 + derivative.abs()),
                        "{kind} {rfm:?} [{index}]: {numeric} vs {derivative}"
                    );
                }
            }
        }
    }
}
