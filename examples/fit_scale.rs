//! How long `fit` takes for N contacts (default 10,000,000).
//!
//! Simulates BG/NBD buyers with the CDNOW parameters, first purchases spread over two years,
//! purchase days at day resolution (as `fit --events` sees them), statistics in weeks; then
//! times compression and the maximum-likelihood fit separately, three fits, median reported.
//!
//! `cargo run --release --example fit_scale -- [CONTACTS]`

use std::time::Instant;

use lifecycle_scorer::scoring::fit::{compress, fit};
use lifecycle_scorer::scoring::{ModelKind, Rfm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Exp, Gamma};

fn main() {
    let contacts: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(10_000_000);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rate = Gamma::new(0.243, 1.0 / (4.414 * 7.0)).expect("gamma"); // per day
    let dropout = Beta::new(0.793, 2.426).expect("beta");
    let horizon_days: f64 = 730.0;
    let started = Instant::now();
    let rows: Vec<Rfm> = (0..contacts)
        .map(|_| {
            let first = rng.random_range(0.0..horizon_days).floor();
            let age = horizon_days - first;
            let lambda: f64 = rate.sample(&mut rng);
            let p: f64 = dropout.sample(&mut rng);
            let (mut now, mut last_day, mut days) = (0.0, 0.0, 0u32);
            if lambda > 0.0 {
                let gap = Exp::new(lambda).expect("exp");
                loop {
                    now += gap.sample(&mut rng);
                    if now >= age {
                        break;
                    }
                    let day = now.floor();
                    if day != last_day {
                        days += 1;
                        last_day = day;
                    }
                    if rng.random_bool(p) {
                        break;
                    }
                }
            }
            Rfm {
                x: f64::from(days),
                t_x: last_day / 7.0,
                t: age / 7.0,
            }
        })
        .collect();
    let simulated = started.elapsed();
    let started = Instant::now();
    let compressed = compress(rows);
    let compressed_in = started.elapsed();
    let mut times = Vec::new();
    let mut report = None;
    for _ in 0..3 {
        let started = Instant::now();
        report = Some(fit(ModelKind::BgNbd, &compressed).expect("fit"));
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let report = report.expect("three fits ran");
    println!(
        "{contacts} contacts (simulated in {:.1} s) -> {} distinct rows (compressed in {:.2} s); fit median {:.3} s of {:?}; r {:.4} alpha {:.4} a {:.4} b {:.4}; threads available {}",
        simulated.as_secs_f64(),
        compressed.len(),
        compressed_in.as_secs_f64(),
        times[1],
        times,
        report.model.params.r,
        report.model.params.alpha,
        report.model.params.a,
        report.model.params.b,
        std::thread::available_parallelism().map_or(1, usize::from),
    );
}
