//! Reproduces the published CDNOW figures (Fader, Hardie & Lee 2005; Fader & Hardie 2013) from
//! the reference data in `../shared/data/` (see its README). The data must be present: a missing
//! file fails the test with a message, it never passes silently.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use lifecycle_scorer::fit_command::read_summary;
use lifecycle_scorer::scoring::fit::{compress, fit, FitReport};
use lifecycle_scorer::scoring::gamma_gamma::{fit_gamma_gamma, SpendRow};
use lifecycle_scorer::scoring::{BgParams, Model, ModelKind, Rfm};

const SUMMARY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/cdnow_customers_summary.csv"
);
const TRANSACTIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/cdnow_calibration_transactions.txt"
);

fn read(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => panic!(
            "CDNOW reference data missing: cannot read {path}: {error}. These tests need the shared \
             data directory next to the crate (see ../shared/data/README.md); they do not skip."
        ),
    }
}

/// `ID,frequency,recency,T` rows, in weeks, read by the same parser `fit --summary` uses.
fn summary() -> Vec<Rfm> {
    let rows = read_summary(read(SUMMARY).as_bytes()).unwrap_or_else(|error| panic!("{SUMMARY}: {error}"));
    assert_eq!(rows.len(), 2357, "the CDNOW 1/10 sample has 2,357 customers");
    rows
}

fn assert_close(name: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= tolerance,
        "{name}: got {got}, reference {want}, tolerance {tolerance}"
    );
}

fn fit_summary(kind: ModelKind) -> FitReport {
    let report = fit(kind, &compress(summary())).unwrap_or_else(|error| panic!("{kind} fit failed: {error}"));
    println!("{kind} on CDNOW: {report:?}");
    report
}

/// FHL 2005, Table 1: r = 0.243, α = 4.414, a = 0.793, b = 2.426, LL = -9582.4.
///
/// The published parameters are rounded to 3 decimals, so the true optimum lies within 0.0005 of
/// each; we allow 0.0015 for the optimiser's own tolerance (its gradient tolerance moves the
/// parameters by ~1e-6). The log-likelihood is published to one decimal: within 0.1.
///
/// Measured here: r = 0.242593, α = 4.413532, a = 0.792886, b = 2.425752, LL = -9582.4256
/// (17 L-BFGS iterations).
#[test]
fn bg_nbd_reproduces_published_fit() {
    let report = fit_summary(ModelKind::BgNbd);
    assert!(report.converged, "{report:?}");
    assert_eq!(report.customers, 2357.0);
    let BgParams { r, alpha, a, b } = report.model.params;
    assert_close("r", r, 0.243, 0.0015);
    assert_close("alpha", alpha, 4.414, 0.0015);
    assert_close("a", a, 0.793, 0.0015);
    assert_close("b", b, 2.426, 0.0015);
    assert_close("log-likelihood", report.log_likelihood, -9582.4, 0.1);
}

/// The modified BG/NBD has no published figure in the data README. The reference used here is
/// BTYDplus's MBG/NBD estimate on the same summary, r = 0.525, α = 6.183, a = 0.891, b = 1.614, as
/// asserted to 3 decimals by the `lifetimes` Python package (CamDavidsonPilon/lifetimes,
/// tests/test_estimation.py, `test_params_out_is_close_to_BTYDplus`); same tolerance as above.
///
/// Measured here: r = 0.524838, α = 6.182989, a = 0.891357, b = 1.614001, LL = -9582.1327
/// (19 iterations): slightly better than BG/NBD's -9582.43 with the same number of parameters.
/// The log-likelihood is not published; it is pinned to what we measured (±0.01).
#[test]
fn mbg_nbd_fit_matches_btydplus() {
    let report = fit_summary(ModelKind::MbgNbd);
    assert!(report.converged, "{report:?}");
    assert!(report.log_likelihood.is_finite(), "{report:?}");
    let BgParams { r, alpha, a, b } = report.model.params;
    assert_close("r", r, 0.525, 0.0015);
    assert_close("alpha", alpha, 6.183, 0.0015);
    assert_close("a", a, 0.891, 0.0015);
    assert_close("b", b, 1.614, 0.0015);
    assert_close("log-likelihood", report.log_likelihood, -9582.13, 0.01);
}

/// The data README / FHL 2005 section 5: customer 1 (x = 2, t_x = 30.43, T = 38.86) expects
/// 1.226 purchases in the next 39 weeks under the published parameters.
#[test]
fn customer_one_expected_purchases() {
    let model = Model {
        kind: ModelKind::BgNbd,
        params: BgParams {
            r: 0.243,
            alpha: 4.414,
            a: 0.793,
            b: 2.426,
        },
    };
    let first = summary()[0];
    assert_eq!(
        first,
        Rfm {
            x: 2.0,
            t_x: 30.43,
            t: 38.86
        }
    );
    let expected = model.expected_purchases(first, 39.0);
    println!("customer 1: E[X(39)] = {expected}");
    assert_close("E[X(T, T+39) | customer 1]", expected, 1.226, 0.001);
}

/// Per customer: repeat transactions with same-day purchases merged, and their mean value
/// (Fader & Hardie 2013 use the 946 customers with at least one repeat transaction).
fn repeat_spend() -> Vec<SpendRow> {
    let text = read(TRANSACTIONS);
    // customer -> date -> total value that day (BTreeMap: dates in order, deterministic).
    let mut days: BTreeMap<u32, BTreeMap<u32, f64>> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 5, "bad transaction line {line:?}");
        let customer: u32 = fields[1]
            .parse()
            .unwrap_or_else(|error| panic!("bad id in {line:?}: {error}"));
        let date: u32 = fields[2]
            .parse()
            .unwrap_or_else(|error| panic!("bad date in {line:?}: {error}"));
        let value: f64 = fields[4]
            .parse()
            .unwrap_or_else(|error| panic!("bad amount in {line:?}: {error}"));
        *days.entry(customer).or_default().entry(date).or_insert(0.0) += value;
    }
    assert_eq!(days.len(), 2357, "transactions should cover the 2,357 customers");
    days.values()
        .filter(|per_day| per_day.len() > 1)
        .map(|per_day| {
            let repeat: Vec<f64> = per_day.values().skip(1).copied().collect();
            let x = repeat.len() as f64;
            SpendRow {
                x,
                m_x: repeat.iter().sum::<f64>() / x,
                weight: 1.0,
            }
        })
        .collect()
}

/// Fader & Hardie 2013: p = 6.25, q = 3.74, γ = 15.44 on the 946 repeat customers' mean repeat
/// spend (mean $35.08). Published to 2 decimals; we allow 1% relative.
///
/// Measured here: p = 6.249573, q = 3.744225, γ = 15.443520, LL = -4055.9177 (21 iterations),
/// i.e. within 0.03% of the published values.
#[test]
fn gamma_gamma_reproduces_published_fit() {
    let rows = repeat_spend();
    assert_eq!(rows.len(), 946);
    let mean: f64 = rows.iter().map(|row| row.m_x).sum::<f64>() / rows.len() as f64;
    assert_close("mean repeat spend", mean, 35.08, 0.005);
    let fitted = fit_gamma_gamma(&rows).unwrap_or_else(|error| panic!("gamma-gamma fit failed: {error}"));
    println!("gamma-gamma on CDNOW: {fitted:?}");
    assert!(fitted.converged, "{fitted:?}");
    for (name, got, want) in [
        ("p", fitted.params.p, 6.25),
        ("q", fitted.params.q, 3.74),
        ("v", fitted.params.v, 15.44),
    ] {
        assert!(
            ((got - want) / want).abs() <= 0.01,
            "{name}: got {got}, published {want}"
        );
    }
}
