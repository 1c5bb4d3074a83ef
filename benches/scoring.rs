//! Benchmarks of the churn-model math on the CDNOW reference customers (`../shared/data/`):
//! the per-contact scores the service computes on every event and timer, the per-row
//! log-likelihood with its gradient (the inner loop of fitting), and a whole fit.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifecycle_scorer::fit_command::read_summary;
use lifecycle_scorer::scoring::fit::{compress, fit, WeightedRfm};
use lifecycle_scorer::scoring::{BgParams, Model, ModelKind, Rfm};

const SUMMARY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/cdnow_customers_summary.csv"
);

/// Published BG/NBD parameters for CDNOW, in weeks (Fader, Hardie & Lee 2005, Table 1).
const CDNOW: BgParams = BgParams {
    r: 0.243,
    alpha: 4.414,
    a: 0.793,
    b: 2.426,
};

fn customers() -> Vec<Rfm> {
    let text = std::fs::read_to_string(SUMMARY)
        .unwrap_or_else(|error| panic!("benchmark data missing: cannot read {SUMMARY}: {error}"));
    read_summary(text.as_bytes()).unwrap_or_else(|error| panic!("{SUMMARY}: {error}"))
}

fn scores(c: &mut Criterion) {
    let rows = customers();
    let mut group = c.benchmark_group("score_per_customer");
    group.throughput(Throughput::Elements(rows.len() as u64));
    for kind in [ModelKind::BgNbd, ModelKind::MbgNbd] {
        let model = Model { kind, params: CDNOW };
        // 13 weeks ≈ the default 90-day churn horizon.
        group.bench_with_input(BenchmarkId::new("p_no_purchase_13w", kind), &rows, |bench, rows| {
            bench.iter(|| {
                rows.iter()
                    .map(|&rfm| model.p_no_purchase(black_box(rfm), black_box(13.0)))
                    .sum::<f64>()
            })
        });
        // 39 weeks: the series path of the expectation kernel.
        group.bench_with_input(
            BenchmarkId::new("expected_purchases_39w", kind),
            &rows,
            |bench, rows| {
                bench.iter(|| {
                    rows.iter()
                        .map(|&rfm| model.expected_purchases(black_box(rfm), black_box(39.0)))
                        .sum::<f64>()
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("log_likelihood_and_gradient", kind),
            &rows,
            |bench, rows| {
                bench.iter(|| {
                    rows.iter()
                        .map(|&rfm| {
                            model.log_likelihood(black_box(rfm)) + model.log_likelihood_gradient(black_box(rfm))[0]
                        })
                        .sum::<f64>()
                })
            },
        );
    }
    group.finish();

    // A horizon of 5,000 weeks (z ≈ 0.99): the quadrature path, on a sample of 64 customers.
    let sample: Vec<Rfm> = rows.iter().step_by(rows.len() / 64).copied().collect();
    let mut long = c.benchmark_group("score_per_customer_long_horizon");
    long.throughput(Throughput::Elements(sample.len() as u64));
    let model = Model {
        kind: ModelKind::BgNbd,
        params: CDNOW,
    };
    long.bench_function("expected_purchases_5000w", |bench| {
        bench.iter(|| {
            sample
                .iter()
                .map(|&rfm| model.expected_purchases(black_box(rfm), black_box(5000.0)))
                .sum::<f64>()
        })
    });
    long.finish();
}

fn fitting(c: &mut Criterion) {
    let compressed: Vec<WeightedRfm> = compress(customers());
    let mut group = c.benchmark_group("fit_cdnow");
    group.sample_size(20);
    group.throughput(Throughput::Elements(compressed.len() as u64));
    for kind in [ModelKind::BgNbd, ModelKind::MbgNbd] {
        group.bench_with_input(BenchmarkId::from_parameter(kind), &compressed, |bench, data| {
            bench.iter(|| fit(black_box(kind), black_box(data)).map(|report| report.log_likelihood))
        });
    }
    group.finish();
}

criterion_group!(benches, scores, fitting);
criterion_main!(benches);
