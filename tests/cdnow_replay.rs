//! Streaming the CDNOW calibration transactions as purchase events and scoring as of
//! 1997-09-30 gives exactly the published summary's (x, t_x, T) for all 2,357 customers.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::fit_command::read_summary;
use lifecycle_scorer::replay::{replay, ReplayOptions};
use lifecycle_scorer::scoring::TimeUnit;

#[test]
fn replaying_cdnow_transactions_reproduces_the_summary_statistics() {
    let transactions = std::fs::read_to_string(common::shared_data("cdnow_calibration_transactions.txt")).unwrap();
    let summary_file = std::fs::File::open(common::shared_data("cdnow_customers_summary.csv")).unwrap();
    let expected = read_summary(std::io::BufReader::new(summary_file)).unwrap();
    assert_eq!(expected.len(), 2357);

    let events = common::cdnow_purchase_events(&transactions);
    let config = Config::builtin().unwrap();
    assert_eq!(
        config.engine.scorer.time_unit,
        TimeUnit::Weeks,
        "the CDNOW summary is in weeks"
    );
    let as_of = parse_time_argument("1997-09-30").unwrap();
    let options = ReplayOptions {
        as_of: Some(as_of),
        max_errors_shown: 10,
        capacity: 0,
        ..ReplayOptions::default()
    };
    let mut errors = Vec::new();
    let (summary, processor) = replay(
        Arc::new(config.engine),
        config.processing,
        events.as_bytes(),
        &mut std::io::sink(),
        &mut errors,
        options,
    )
    .unwrap();
    assert!(summary.errors.is_empty(), "{}", String::from_utf8_lossy(&errors));
    assert_eq!(summary.events, 4960);
    assert_eq!(summary.contacts, 2357);

    let scorer = &processor.engine().scorer;
    let mut actual = BTreeMap::new();
    for entry in processor.shard().iter() {
        let id: usize = entry.key().id.parse().unwrap();
        let rfm = scorer.rfm(entry.value().purchase_history().unwrap(), as_of).unwrap();
        actual.insert(id, rfm);
    }
    let mut mismatches = Vec::new();
    for (index, want) in expected.iter().enumerate() {
        let id = index + 1;
        let got = actual[&id];
        // The summary rounds to two decimals.
        let same =
            got.x == want.x && (got.t_x - want.t_x).abs() <= 0.005 + 1e-9 && (got.t - want.t).abs() <= 0.005 + 1e-9;
        if !same {
            mismatches.push(format!("customer {id}: got {got:?}, summary {want:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}
