//! The Gamma-Gamma model of monetary value (Fader, Hardie & Lee 2005, "RFM and CLV: Using
//! Iso-Value Curves for Customer Base Analysis"; Fader & Hardie 2013, "The Gamma-Gamma Model of
//! Monetary Value"): per-customer log-likelihood of the mean spend per transaction, its analytic
//! gradient, maximum-likelihood fitting, and the conditional expected spend.
//!
//! Pure math: no I/O, no clock, no contact state. Which transactions count (usually the repeat
//! transactions only, with same-day purchases merged into one) is the caller's decision.
//!
//! Model: each transaction's value is `Gamma(shape p, rate ν)`, and `ν ~ Gamma(shape q, rate v)`
//! across customers. The mean `m_x` of `x` transactions is `Gamma(p x, ν x)` given `ν`; with `ν`
//! integrated out (Fader & Hardie 2013)
//!
//! ```text
//! f(m_x | p, q, v, x) = Γ(px+q) / (Γ(px) Γ(q)) · v^q m_x^{px-1} x^{px} / (v + x m_x)^{px+q}
//! ```

use serde::{Deserialize, Serialize};

use super::fit::{minimize, FitError, Objective};
use super::special::{digamma, ln_gamma};

/// Gamma-Gamma parameters: transaction values `~ Gamma(p, ν)`, `ν ~ Gamma(q, v)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GammaGammaParams {
    /// Shape of a transaction's value.
    pub p: f64,
    /// Shape of the distribution of the rate `ν`.
    pub q: f64,
    /// Rate of the distribution of `ν` (in currency units; called γ in the note).
    pub v: f64,
}

/// One customer's spend summary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpendRow {
    /// Number of transactions averaged (> 0).
    pub x: f64,
    /// Their mean value (> 0).
    pub m_x: f64,
    /// Number of customers with this summary (≥ 0).
    pub weight: f64,
}

/// The outcome of [`fit_gamma_gamma`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GammaGammaFit {
    /// Fitted parameters.
    pub params: GammaGammaParams,
    /// Total weighted log-likelihood there.
    pub log_likelihood: f64,
    /// L-BFGS iterations.
    pub iterations: u64,
    /// Met the strict gradient tolerance (see [`FitReport`](super::fit::FitReport)).
    pub converged: bool,
    /// Total weight (customers).
    pub customers: f64,
}

impl GammaGammaParams {
    /// Every parameter must be finite and strictly positive.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [("p", self.p), ("q", self.q), ("v", self.v)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "gamma-gamma parameter {name} must be finite and > 0, got {value}"
                ));
            }
        }
        Ok(())
    }

    /// `ln f(m_x | x)` (see the module docs), for `x > 0`, `m_x > 0`.
    pub fn log_likelihood(&self, x: f64, m_x: f64) -> f64 {
        self.log_likelihood_with_gradient(x, m_x, None)
    }

    /// Analytic `∂ ln f / ∂(p, q, v)`:
    ///
    /// ```text
    /// ∂p = x [ψ(px+q) - ψ(px) + ln(x m_x / (v + x m_x))]
    /// ∂q = ψ(px+q) - ψ(q) - ln(1 + x m_x / v)
    /// ∂v = q/v - (px+q)/(v + x m_x)
    /// ```
    pub fn log_likelihood_gradient(&self, x: f64, m_x: f64) -> [f64; 3] {
        let mut gradient = [0.0; 3];
        self.log_likelihood_with_gradient(x, m_x, Some(&mut gradient));
        gradient
    }

    fn log_likelihood_with_gradient(&self, x: f64, m_x: f64, gradient: Option<&mut [f64; 3]>) -> f64 {
        debug_assert!(
            x > 0.0 && m_x > 0.0,
            "gamma-gamma needs x > 0 and m_x > 0, got {x}, {m_x}"
        );
        let GammaGammaParams { p, q, v } = *self;
        let px = p * x;
        let spend = x * m_x;
        // ln(v + x m_x) split as ln v + ln(1 + x m_x / v) so both derivatives reuse it.
        let ln_ratio = (spend / v).ln_1p();
        let ln_total = v.ln() + ln_ratio;
        let value = ln_gamma(px + q) - ln_gamma(px) - ln_gamma(q) + q * v.ln() + (px - 1.0) * m_x.ln() + px * x.ln()
            - (px + q) * ln_total;
        if let Some(gradient) = gradient {
            let digamma_total = digamma(px + q);
            gradient[0] = x * (digamma_total - digamma(px) + spend.ln() - ln_total);
            gradient[1] = digamma_total - digamma(q) - ln_ratio;
            gradient[2] = q / v - (px + q) / (v + spend);
        }
        value
    }

    /// `E[Z | p, q, v, x, m_x]`, the expected value of a customer's future transactions
    /// (Fader & Hardie 2013):
    /// `(v + x m_x) p / (p x + q - 1)`, a weighted mean of the population mean `p v / (q - 1)` and
    /// the customer's own `m_x`. With `x = 0` it is the population mean.
    ///
    /// Returns `+∞` when the posterior mean does not exist (`p x + q ≤ 1`, a heavy-tailed spend
    /// distribution): that is the model's honest answer, and callers must cap or reject it.
    pub fn conditional_expected_spend(&self, x: f64, m_x: f64) -> f64 {
        debug_assert!(x >= 0.0 && m_x >= 0.0, "conditional_expected_spend({x}, {m_x})");
        let GammaGammaParams { p, q, v } = *self;
        let denominator = p * x + q - 1.0;
        if denominator <= 0.0 {
            return f64::INFINITY;
        }
        (v + x * m_x) * p / denominator
    }
}

/// Rows grouped by `x` (the special functions depend on `x` only).
#[derive(Debug)]
struct SpendObjective {
    /// `(x, first row, end row)`.
    groups: Vec<(f64, usize, usize)>,
    m_x: Vec<f64>,
    weight: Vec<f64>,
    total_weight: f64,
}

impl Objective for SpendObjective {
    fn dimension(&self) -> usize {
        3
    }

    fn evaluate(&self, log_params: &[f64], gradient: &mut [f64]) -> f64 {
        debug_assert_eq!(log_params.len(), 3);
        let (p, q, v) = (log_params[0].exp(), log_params[1].exp(), log_params[2].exp());
        let (ln_v, ln_gamma_q, digamma_q) = (v.ln(), ln_gamma(q), digamma(q));
        let mut total = 0.0;
        let mut natural = [0.0; 3];
        for &(x, start, end) in &self.groups {
            let px = p * x;
            let (ln_gamma_total, digamma_total) = (ln_gamma(px + q), digamma(px + q));
            let (ln_gamma_px, digamma_px) = (ln_gamma(px), digamma(px));
            let constant = ln_gamma_total - ln_gamma_px - ln_gamma_q + q * ln_v + px * x.ln();
            for index in start..end {
                let (m_x, weight) = (self.m_x[index], self.weight[index]);
                let spend = x * m_x;
                let ln_ratio = (spend / v).ln_1p();
                let ln_total = ln_v + ln_ratio;
                let ln_m = m_x.ln();
                total += weight * (constant + (px - 1.0) * ln_m - (px + q) * ln_total);
                natural[0] += weight * x * (digamma_total - digamma_px + spend.ln() - ln_total);
                natural[1] += weight * (digamma_total - digamma_q - ln_ratio);
                natural[2] += weight * (q / v - (px + q) / (v + spend));
            }
        }
        let scale = -1.0 / self.total_weight;
        for ((slot, derivative), param) in gradient.iter_mut().zip(natural).zip([p, q, v]) {
            *slot = scale * derivative * param;
        }
        scale * total
    }
}

/// Fits the Gamma-Gamma model by maximum likelihood (L-BFGS on log-parameters with the analytic
/// gradient, as [`fit`](super::fit::fit)). Rows need `x > 0`, `m_x > 0` and a finite weight
/// `≥ 0`; customers without (repeat) transactions carry no spend information and must be left
/// out by the caller.
///
/// Starting point: `p = 1`, and `q = 3, v = 2 · mean(m_x)`, which puts the implied population
/// mean `p v / (q - 1)` at the observed mean spend; two more starts are tried if needed.
pub fn fit_gamma_gamma(rows: &[SpendRow]) -> Result<GammaGammaFit, FitError> {
    let mut sorted: Vec<SpendRow> = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        let valid = row.x.is_finite() && row.x > 0.0 && row.m_x.is_finite() && row.m_x > 0.0;
        if !(valid && row.weight.is_finite() && row.weight >= 0.0) {
            return Err(FitError::InvalidInput {
                index,
                reason: format!("gamma-gamma needs finite x > 0, m_x > 0 and weight >= 0, got {row:?}"),
            });
        }
        if row.weight > 0.0 {
            sorted.push(*row);
        }
    }
    if sorted.is_empty() {
        return Err(FitError::EmptyData);
    }
    sorted.sort_by(|left, right| left.x.total_cmp(&right.x).then(left.m_x.total_cmp(&right.m_x)));
    let mut objective = SpendObjective {
        groups: Vec::new(),
        m_x: Vec::new(),
        weight: Vec::new(),
        total_weight: 0.0,
    };
    let mut weighted_spend = 0.0;
    for (index, row) in sorted.iter().enumerate() {
        match objective.groups.last_mut() {
            Some(group) if group.0 == row.x => group.2 = index + 1,
            _ => objective.groups.push((row.x, index, index + 1)),
        }
        objective.m_x.push(row.m_x);
        objective.weight.push(row.weight);
        objective.total_weight += row.weight;
        weighted_spend += row.weight * row.m_x;
    }
    let mean_spend = weighted_spend / objective.total_weight;
    let starts = [
        [1.0, 3.0, 2.0 * mean_spend],
        [5.0, 2.0, 0.25 * mean_spend],
        [0.5, 10.0, 20.0 * mean_spend],
    ]
    .map(|start| start.iter().map(|value| value.ln()).collect::<Vec<f64>>());
    let minimum = minimize(&objective, &starts)?;
    let params = GammaGammaParams {
        p: minimum.log_params[0].exp(),
        q: minimum.log_params[1].exp(),
        v: minimum.log_params[2].exp(),
    };
    Ok(GammaGammaFit {
        params,
        log_likelihood: -minimum.value * objective.total_weight,
        iterations: minimum.iterations,
        converged: minimum.converged,
        customers: objective.total_weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Gamma};

    #[test]
    fn gradient_matches_finite_differences() {
        let params = GammaGammaParams {
            p: 6.25,
            q: 3.74,
            v: 15.44,
        };
        for (x, m_x) in [(1.0, 10.0), (3.0, 35.0), (20.0, 150.0)] {
            let gradient = params.log_likelihood_gradient(x, m_x);
            let bump = |index: usize, step: f64| {
                let mut shifted = params;
                match index {
                    0 => shifted.p += step,
                    1 => shifted.q += step,
                    _ => shifted.v += step,
                }
                shifted.log_likelihood(x, m_x)
            };
            for (index, analytic) in gradient.iter().enumerate() {
                let step = 1e-6;
                let numeric = (bump(index, step) - bump(index, -step)) / (2.0 * step);
                assert!(
                    (numeric - analytic).abs() <= 1e-6 * (1.0 + analytic.abs()),
                    "{index}: {numeric} vs {analytic}"
                );
            }
        }
    }

    #[test]
    fn conditional_expected_spend_shrinks_towards_population_mean() {
        let params = GammaGammaParams {
            p: 6.25,
            q: 3.74,
            v: 15.44,
        };
        let population = params.p * params.v / (params.q - 1.0);
        assert!((params.conditional_expected_spend(0.0, 0.0) - population).abs() < 1e-12);
        let one = params.conditional_expected_spend(1.0, 100.0);
        let many = params.conditional_expected_spend(50.0, 100.0);
        assert!(population < one && one < many && many < 100.0);
        let heavy = GammaGammaParams { p: 0.1, q: 0.5, v: 1.0 };
        assert_eq!(heavy.conditional_expected_spend(1.0, 5.0), f64::INFINITY);
    }

    #[test]
    fn recovers_known_parameters_from_synthetic_data() {
        let truth = GammaGammaParams {
            p: 4.0,
            q: 5.0,
            v: 60.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let rate = Gamma::new(truth.q, 1.0 / truth.v).expect("gamma");
        let rows: Vec<SpendRow> = (0..20_000)
            .map(|index| {
                let nu: f64 = rate.sample(&mut rng);
                let x = f64::from(1 + index % 7);
                let mean = Gamma::new(truth.p * x, 1.0 / (nu * x)).expect("gamma");
                SpendRow {
                    x,
                    m_x: mean.sample(&mut rng),
                    weight: 1.0,
                }
            })
            .collect();
        let fitted = fit_gamma_gamma(&rows).expect("fit");
        assert!(fitted.converged, "{fitted:?}");
        for (got, want) in [
            (fitted.params.p, truth.p),
            (fitted.params.q, truth.q),
            (fitted.params.v, truth.v),
        ] {
            assert!(((got - want) / want).abs() < 0.15, "{fitted:?}");
        }
    }
}
