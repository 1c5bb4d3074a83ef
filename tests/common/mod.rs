//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod broker;
pub mod cluster;
pub mod oracle;
pub mod service;

use std::path::PathBuf;

/// Path of a file in the shared reference data, failing loudly when it is missing: a test that
/// cannot find its data must not pass.
pub fn shared_data(name: &str) -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")).join(name);
    assert!(
        path.exists(),
        "reference data {} is missing: the CDNOW files must sit in ../shared/data beside the checkout",
        path.display()
    );
    path
}

/// Converts the CDNOW transaction log (`master_id sample_id YYYYMMDD cds dollars`) into
/// purchase events as JSON lines, one completed order per line, keyed by the sample id (the
/// summary's `ID`).
pub fn cdnow_purchase_events(transactions: &str) -> String {
    let mut out = String::new();
    for (index, line) in transactions.lines().enumerate() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.is_empty() {
            continue;
        }
        assert_eq!(cells.len(), 5, "line {}: {line}", index + 1);
        let id: u32 = cells[1].parse().expect("sample id");
        let date = cells[2];
        let amount: f64 = cells[4].parse().expect("amount");
        out.push_str(&format!(
            concat!(
                r#"{{"source":"purchase","event_id":"tx{index}","contact_id":"{id}","#,
                r#""occurred_at":"{y}-{m}-{d}T12:00:00Z","order_id":"order{index}","amount":{amount},"#,
                r#""currency":"USD","status":"completed"}}"#,
                "\n"
            ),
            index = index,
            id = id,
            y = &date[..4],
            m = &date[4..6],
            d = &date[6..],
            amount = amount,
        ));
    }
    out
}
