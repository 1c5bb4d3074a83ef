//! Churn risk is a calibrated probability: on a generated stream whose buyers follow the BG/NBD
//! story with known parameters, the risk scored at a cut-off matches how often buyers really made
//! no purchase in the following 90 days, overall and by decile of predicted risk.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use lifecycle_scorer::codec::json::decode_event;
use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{EventBody, PurchaseStatus, MILLIS_PER_DAY};
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::replay::{replay, ReplayOptions};

#[test]
fn predicted_churn_matches_observed_no_purchase_rates() {
    let start = parse_time_argument("2025-01-01").unwrap();
    let options = GenerateOptions {
        contacts: 40_000,
        days: 365,
        seed: 11,
        start,
    };
    let mut bytes = Vec::new();
    generate(&options, &mut bytes, None).unwrap();
    let cutoff = start.plus_millis(275 * MILLIS_PER_DAY);
    let horizon_end = cutoff.plus_millis(90 * MILLIS_PER_DAY);

    // Calibration period: every line before the cut-off. Hold-out: completed purchases after it.
    let mut calibration = Vec::new();
    let mut bought_later: HashMap<String, u32> = HashMap::new();
    for line in bytes.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
        let event = decode_event(line).unwrap();
        if event.occurred_at < cutoff {
            calibration.extend_from_slice(line);
            calibration.push(b'\n');
        } else if let EventBody::Purchase(purchase) = &event.body {
            if purchase.status == PurchaseStatus::Completed && event.occurred_at <= horizon_end {
                *bought_later.entry(event.contact_id.unwrap().to_string()).or_default() += 1;
            }
        }
    }

    let config = Config::builtin().unwrap();
    assert_eq!(config.engine.scorer.horizon_days, 90.0);
    let replay_options = ReplayOptions {
        as_of: Some(cutoff),
        max_errors_shown: 5,
        capacity: 0,
        ..ReplayOptions::default()
    };
    let (_, processor) = replay(
        Arc::new(config.engine),
        config.processing,
        calibration.as_slice(),
        &mut std::io::sink(),
        &mut std::io::sink(),
        replay_options,
    )
    .unwrap();

    let scorer = &processor.engine().scorer;
    let mut scored = Vec::new();
    let mut expected_total = 0.0;
    let mut actual_total = 0u32;
    for entry in processor.shard().iter() {
        if entry
            .value()
            .purchase_history()
            .and_then(|history| history.first_day)
            .is_none()
        {
            continue;
        }
        let score = scorer.score(entry.value(), cutoff);
        let purchases = bought_later.get(entry.key().id.as_str()).copied().unwrap_or(0);
        scored.push((score.churn_risk, purchases == 0));
        expected_total += score.expected_purchases.unwrap();
        actual_total += purchases;
    }
    assert!(scored.len() > 5_000, "enough buyers to judge: {}", scored.len());

    let mean_predicted = scored.iter().map(|(risk, _)| risk).sum::<f64>() / scored.len() as f64;
    let observed = scored.iter().filter(|(_, none)| *none).count() as f64 / scored.len() as f64;
    println!(
        "buyers {}, mean predicted churn {mean_predicted:.4}, observed {observed:.4}",
        scored.len()
    );
    println!("expected purchases in the horizon {expected_total:.0}, actual {actual_total}");
    assert!(
        (mean_predicted - observed).abs() < 0.02,
        "predicted {mean_predicted:.4} vs observed {observed:.4}"
    );
    let ratio = expected_total / f64::from(actual_total);
    assert!(
        (0.9..1.1).contains(&ratio),
        "expected {expected_total:.0} vs actual {actual_total}"
    );

    // By decile of predicted risk.
    scored.sort_by(|left, right| left.0.total_cmp(&right.0));
    let size = scored.len() / 10;
    for (decile, chunk) in scored.chunks(size).take(10).enumerate() {
        let predicted = chunk.iter().map(|(risk, _)| risk).sum::<f64>() / chunk.len() as f64;
        let observed = chunk.iter().filter(|(_, none)| *none).count() as f64 / chunk.len() as f64;
        println!(
            "decile {decile}: predicted {predicted:.3} observed {observed:.3} (n = {})",
            chunk.len()
        );
        // Binomial standard error at n ~ 1000 is at most 0.016; allow about three of them.
        assert!(
            (predicted - observed).abs() < 0.05,
            "decile {decile}: predicted {predicted:.3} vs observed {observed:.3}"
        );
    }
}
