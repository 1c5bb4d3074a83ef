//! `fit`: model parameters from purchase history, from a summary CSV or from an events file.
//!
//! The summary format is the one of the BG/NBD literature (`ID,frequency,recency,T`, one row a
//! customer, in the unit given). An events file is replayed through the same engine, and the
//! statistics of every buyer are taken as of `--as-of` (default: the latest event). Rows are
//! compressed into distinct (x, t_x, T) with weights before fitting, so millions of customers
//! cost no more than their distinct histories.

use std::io::{self, BufRead};

use serde::Serialize;

use crate::domain::{PurchaseStatus, Timestamp};
use crate::processor::Processor;
use crate::scoring::fit::{compress, fit, FitReport, WeightedRfm};
use crate::scoring::gamma_gamma::{GammaGammaFit, SpendRow};
use crate::scoring::{ChurnScorer, ModelKind, Rfm, TimeUnit};

/// Why fitting input could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// Reading failed.
    #[error("reading the summary: {0}")]
    Io(#[from] io::Error),
    /// The header is not `ID,frequency,recency,T`.
    #[error("line 1: expected the header `ID,frequency,recency,T`, got `{0}`")]
    Header(String),
    /// A row is malformed.
    #[error("line {line}: {reason}")]
    Row {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Reads a summary CSV (`ID,frequency,recency,T`) into per-customer statistics.
pub fn read_summary(input: impl BufRead) -> Result<Vec<Rfm>, SummaryError> {
    let mut rows = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        let text = line.trim();
        if index == 0 {
            let header: Vec<String> = text.split(',').map(|cell| cell.trim().to_ascii_lowercase()).collect();
            if header != ["id", "frequency", "recency", "t"] {
                return Err(SummaryError::Header(text.to_owned()));
            }
            continue;
        }
        if text.is_empty() {
            continue;
        }
        let row = |reason: String| SummaryError::Row {
            line: index + 1,
            reason,
        };
        let cells: Vec<&str> = text.split(',').map(str::trim).collect();
        if cells.len() != 4 {
            return Err(row(format!("expected 4 columns, got {}", cells.len())));
        }
        let mut numbers = [0.0; 3];
        for (slot, (name, cell)) in numbers
            .iter_mut()
            .zip(["frequency", "recency", "T"].iter().zip(&cells[1..]))
        {
            *slot = cell
                .parse::<f64>()
                .ok()
                .filter(|value| value.is_finite() && *value >= 0.0)
                .ok_or_else(|| row(format!("{name} `{cell}` is not a non-negative number")))?;
        }
        let [x, t_x, t] = numbers;
        if t_x > t {
            return Err(row(format!("recency {t_x} exceeds T {t}")));
        }
        rows.push(Rfm { x, t_x, t });
    }
    Ok(rows)
}

/// Every buyer's statistics in `processor`'s shard, as of `now`, in `time_unit`.
pub fn statistics_from_state(processor: &Processor, time_unit: TimeUnit, now: Timestamp) -> Vec<Rfm> {
    let scorer = ChurnScorer {
        time_unit,
        ..processor.engine().scorer.clone()
    };
    processor
        .shard()
        .iter()
        .filter_map(|entry| scorer.rfm(entry.value().purchase_history()?, now))
        .collect()
}

/// Every repeat buyer's spend summary for the Gamma-Gamma model: `x` repeat purchase days and
/// the mean amount per repeat purchase day (orders on one day summed; the first day left out, as
/// in Fader, Hardie & Lee 2005). Buyers without a repeat day carry no spend information.
pub fn spend_rows_from_state(processor: &Processor) -> Vec<SpendRow> {
    let mut rows = Vec::new();
    for entry in processor.shard().iter() {
        let Some(history) = entry.value().purchase_history() else {
            continue;
        };
        let Some(first_day) = history.first_day else { continue };
        let mut days = 0u32;
        let mut total = 0.0;
        let mut last_day = None;
        for order in history
            .orders
            .iter()
            .filter(|order| order.status == PurchaseStatus::Completed)
        {
            let day = order.placed_at.day();
            if day == first_day {
                continue;
            }
            if last_day != Some(day) {
                days += 1;
                last_day = Some(day);
            }
            total += order.amount;
        }
        if days > 0 && total > 0.0 {
            rows.push(SpendRow {
                x: f64::from(days),
                m_x: total / f64::from(days),
                weight: 1.0,
            });
        }
    }
    rows
}

/// The `fit --json` output.
#[derive(Debug, Serialize)]
pub struct FitOutput {
    /// `bg-nbd` or `mbg-nbd`.
    pub model: ModelKind,
    /// Shape of the purchase-rate Gamma.
    pub r: f64,
    /// Scale of the purchase-rate Gamma, in `time_unit`.
    pub alpha: f64,
    /// Dropout Beta `a`.
    pub a: f64,
    /// Dropout Beta `b`.
    pub b: f64,
    /// Maximised total log-likelihood.
    pub log_likelihood: f64,
    /// Unit of the data the parameters were fitted on.
    pub time_unit: TimeUnit,
    /// Customers fitted.
    pub customers: f64,
    /// Distinct (x, t_x, T) rows after compression.
    pub distinct_rows: usize,
    /// Optimiser iterations.
    pub iterations: u64,
    /// Whether the optimiser met its convergence criterion.
    pub converged: bool,
    /// The Gamma-Gamma spend model, fitted when the input has amounts (`--events`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gamma_gamma: Option<GammaGammaFit>,
}

/// Fits `kind` to `rows`.
pub fn fit_rows(
    kind: ModelKind,
    rows: Vec<Rfm>,
    time_unit: TimeUnit,
) -> Result<FitOutput, crate::scoring::fit::FitError> {
    let weighted: Vec<WeightedRfm> = compress(rows);
    let FitReport {
        model,
        log_likelihood,
        iterations,
        converged,
        customers,
    } = fit(kind, &weighted)?;
    Ok(FitOutput {
        model: model.kind,
        r: model.params.r,
        alpha: model.params.alpha,
        a: model.params.a,
        b: model.params.b,
        log_likelihood,
        time_unit,
        customers,
        distinct_rows: weighted.len(),
        iterations,
        converged,
        gamma_gamma: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_rows_are_checked() {
        let rows = read_summary("ID,frequency,recency,T\n1,2,30.43,38.86\n\n2,0,0,38.86\n".as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            Rfm {
                x: 2.0,
                t_x: 30.43,
                t: 38.86
            }
        );
        let error = read_summary("ID,frequency,recency,T\n1,2,40,38.86\n".as_bytes()).unwrap_err();
        assert_eq!(error.to_string(), "line 2: recency 40 exceeds T 38.86");
        let error = read_summary("id,x\n".as_bytes()).unwrap_err();
        assert!(matches!(error, SummaryError::Header(_)));
    }
}
