//! Property tests of the churn-model math (`scoring::bgnbd`) over the whole input range the
//! service can meet: up to 100,000 repeat purchase days, ages up to 20 years in days (7,305),
//! horizons up to 1e6, and parameters log-uniform over [1e-3, 1e3].
//!
//! A NaN, an out-of-range probability or a negative expectation is a bug; so is a churn risk
//! that falls while nothing happens.

#![allow(clippy::unwrap_used)]

use lifecycle_scorer::scoring::special::ln_gamma;
use lifecycle_scorer::scoring::{BgParams, Model, ModelKind, Rfm};
use proptest::prelude::*;

fn log_uniform(low_exponent: f64, high_exponent: f64) -> impl Strategy<Value = f64> {
    (low_exponent..high_exponent).prop_map(|exponent| 10f64.powf(exponent))
}

fn model() -> impl Strategy<Value = Model> {
    (
        prop_oneof![Just(ModelKind::BgNbd), Just(ModelKind::MbgNbd)],
        log_uniform(-3.0, 3.0),
        log_uniform(-3.0, 3.0),
        log_uniform(-3.0, 3.0),
        log_uniform(-3.0, 3.0),
    )
        .prop_map(|(kind, r, alpha, a, b)| Model {
            kind,
            params: BgParams { r, alpha, a, b },
        })
}

/// `(x, t_x, T)` in days: x small or anywhere up to 100,000; `t_x = 0` when x = 0 (the recency
/// of a one-time buyer), otherwise anywhere in [0, T], including the edges.
fn rfm() -> impl Strategy<Value = Rfm> {
    (
        prop_oneof![0u32..=10, 0u32..=100_000],
        0.0f64..=7305.0,
        prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
    )
        .prop_map(|(x, t, share)| {
            let x = f64::from(x);
            Rfm {
                x,
                t_x: if x == 0.0 { 0.0 } else { t * share },
                t,
            }
        })
}

fn horizon() -> impl Strategy<Value = f64> {
    prop_oneof![log_uniform(-3.0, 6.0), Just(1e6), 0.0f64..=365.0]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn outputs_are_finite_and_in_range(model in model(), rfm in rfm(), horizon in horizon()) {
        let p_alive = model.p_alive(rfm);
        prop_assert!((0.0..=1.0).contains(&p_alive), "p_alive {p_alive}");
        let p_none = model.p_no_purchase(rfm, horizon);
        prop_assert!((0.0..=1.0).contains(&p_none), "p_no_purchase {p_none}");
        let expected = model.expected_purchases(rfm, horizon);
        prop_assert!(expected.is_finite() && expected >= 0.0, "expected_purchases {expected}");
        let unconditional = model.unconditional_expected_purchases(rfm.t);
        prop_assert!(unconditional.is_finite() && unconditional >= 0.0, "unconditional {unconditional}");
        let log_likelihood = model.log_likelihood(rfm);
        prop_assert!(log_likelihood.is_finite(), "log_likelihood {log_likelihood}");
        let gradient = model.log_likelihood_gradient(rfm);
        prop_assert!(gradient.iter().all(|g| g.is_finite()), "gradient {gradient:?}");
    }

    /// Churn risk rises while nothing happens. With x and t_x fixed,
    /// `P0(T) = 1 - P(alive | T) · (1 - ((α+T)/(α+T+h))^{r+x})`; P(alive) is non-increasing in T
    /// (its drop-out odds contain `((α+T)/(α+t_x))^{r+x}`, increasing in T; for BG/NBD with x = 0
    /// it is constantly 1) and the bracket is decreasing in T (`(α+T)/(α+T+h)` increases towards
    /// 1), so their product falls and P0 rises. The slack is rounding only: P0 is a sum of two
    /// non-negative terms computed to a few ulp.
    #[test]
    fn churn_risk_never_falls_while_nothing_happens(
        model in model(),
        rfm in rfm(),
        later in prop_oneof![0.0f64..=1.0, log_uniform(-3.0, 3.6)],
        horizon in horizon(),
    ) {
        let older = Rfm { t: rfm.t + later, ..rfm };
        let before = model.p_no_purchase(rfm, horizon);
        let after = model.p_no_purchase(older, horizon);
        prop_assert!(after >= before - 1e-14, "{before} -> {after} ({rfm:?} -> {older:?})");
        // And the more time passes without a purchase, the less likely the customer is alive.
        prop_assert!(model.p_alive(older) <= model.p_alive(rfm) + 1e-15);
    }

    /// Longer windows hold at least as many purchases, and are at most as likely to stay quiet.
    /// `E[X(T, T+h)]` is non-decreasing in h exactly; the slack (1e-9 relative) covers the switch
    /// between the series and the quadrature inside `alive_expectation` (they agree to ~1e-12 in
    /// this range; 9e-10 was the worst seen with parameters up to 1e6).
    #[test]
    fn expectations_grow_with_the_horizon(
        model in model(),
        rfm in rfm(),
        horizon in horizon(),
        factor in prop_oneof![1.0f64..=1.01, 1.0f64..=100.0],
    ) {
        let longer = horizon * factor;
        let (short, long) = (model.expected_purchases(rfm, horizon), model.expected_purchases(rfm, longer));
        prop_assert!(long >= short * (1.0 - 1e-9), "E({horizon}) = {short} > E({longer}) = {long}");
        let (quiet_short, quiet_long) = (model.p_no_purchase(rfm, horizon), model.p_no_purchase(rfm, longer));
        prop_assert!(quiet_long <= quiet_short + 1e-14, "{quiet_short} -> {quiet_long}");
    }

    /// The analytic gradient against a 4th-order central difference in log-parameters (the
    /// coordinates the fit uses). The tolerance is the difference formula's own error: rounding,
    /// about `ε · S / h` where `S` bounds the size of the terms that cancel inside the
    /// log-likelihood (each ~1e6 when x = 100,000), plus a 1e-6 relative truncation allowance.
    #[test]
    fn gradient_matches_finite_differences(model in model(), rfm in rfm()) {
        let analytic = model.log_likelihood_gradient(rfm);
        let BgParams { r, alpha, a, b } = model.params;
        let natural = [r, alpha, a, b];
        let step = 1e-3;
        let scale = 1.0
            + ln_gamma(r + rfm.x).abs()
            + ln_gamma(r).abs()
            + (r + rfm.x) * (alpha + rfm.t).ln().abs()
            + r * alpha.ln().abs()
            + ln_gamma(a + b + rfm.x + 1.0).abs()
            + ln_gamma(b + rfm.x + 1.0).abs()
            + ln_gamma(a + b).abs()
            + ln_gamma(b).abs();
        for index in 0..4 {
            let at = |shift: f64| {
                let mut params = natural;
                params[index] *= shift.exp();
                let [r, alpha, a, b] = params;
                Model { kind: model.kind, params: BgParams { r, alpha, a, b } }.log_likelihood(rfm)
            };
            let numeric = (at(-2.0 * step) - 8.0 * at(-step) + 8.0 * at(step) - at(2.0 * step)) / (12.0 * step);
            let exact = analytic[index] * natural[index];
            let tolerance = 1e-6 * (1.0 + exact.abs()) + 4.0 * f64::EPSILON * scale / step;
            prop_assert!(
                (numeric - exact).abs() <= tolerance,
                "d/d ln {}: analytic {exact}, numeric {numeric}, tolerance {tolerance}",
                ["r", "alpha", "a", "b"][index]
            );
        }
    }
}
