//! Measures `generate`: 1M contacts (or `generate_speed CONTACTS DAYS`) into `io::sink()`,
//! printing events per second and peak RSS (`VmHWM` from /proc/self/status, Linux only).
//!
//! Run with `cargo run --release --example generate_speed`.

use std::time::Instant;

use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::generate::{generate, GenerateOptions};

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let contacts = args.next().map(|text| text.parse()).transpose()?.unwrap_or(1_000_000);
    let days = args.next().map(|text| text.parse()).transpose()?.unwrap_or(365);
    let with_truth = args.next().is_some_and(|text| text == "truth");
    let options = GenerateOptions {
        contacts,
        days,
        seed: 1,
        start: parse_time_argument("2024-01-01")?,
    };
    let rss_before = peak_rss_kib().unwrap_or(0);
    let began = Instant::now();
    let mut truth_sink = std::io::sink();
    let truth: Option<&mut dyn std::io::Write> = if with_truth { Some(&mut truth_sink) } else { None };
    let summary = generate(&options, &mut std::io::sink(), truth)?;
    let seconds = began.elapsed().as_secs_f64();
    let rss = peak_rss_kib().unwrap_or(0);
    println!(
        "contacts {contacts}, days {days}, truth {with_truth}: {} events in {seconds:.2} s = {:.0} events/s",
        summary.events,
        summary.events as f64 / seconds
    );
    println!(
        "peak RSS {} MiB (before generating {} MiB); peak pending contacts {} -> {:.0} bytes per pending contact",
        rss / 1024,
        rss_before / 1024,
        summary.peak_pending_contacts,
        (rss.saturating_sub(rss_before) * 1024) as f64 / summary.peak_pending_contacts.max(1) as f64
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
