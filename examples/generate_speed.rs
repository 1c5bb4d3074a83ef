//! Measures `generate`: 1M contacts (or `generate_speed CONTACTS DAYS`) into `io::sink()`,
//! printing events per second and peak RSS (`VmHWM` from /proc/self/status, Linux only).
//!
//! Run with `cargo run --release --example generate_speed`.

use std::time::Instant;

use lifecycle_scorer::codec::json::{decode_event, encode_event};
use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::generate::{generate, GenerateOptions};

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds of this process (`/proc/self/stat`, assuming 100 ticks per second),
/// so the figure means something on a machine shared with other jobs.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
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
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let mut truth_sink = std::io::sink();
    let truth: Option<&mut dyn std::io::Write> = if with_truth { Some(&mut truth_sink) } else { None };
    let summary = generate(&options, &mut std::io::sink(), truth)?;
    let seconds = began.elapsed().as_secs_f64();
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu_before;
    let rss = peak_rss_kib().unwrap_or(0);
    println!(
        "contacts {contacts}, days {days}, truth {with_truth}: {} events in {seconds:.2} s wall = {:.0} events/s; \
         {cpu:.2} s CPU = {:.0} events per CPU second",
        summary.events,
        summary.events as f64 / seconds,
        summary.events as f64 / cpu.max(1e-9)
    );
    println!(
        "peak RSS {} MiB (before generating {} MiB); peak pending contacts {} -> {:.0} bytes per pending contact",
        rss / 1024,
        rss_before / 1024,
        summary.peak_pending_contacts,
        (rss.saturating_sub(rss_before) * 1024) as f64 / summary.peak_pending_contacts.max(1) as f64
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);

    // How much of that is the codec: re-encode a sample of the same stream with
    // `encode_event` alone.
    let sample = GenerateOptions {
        contacts: (contacts / 10).max(1),
        ..options
    };
    let mut lines = Vec::new();
    generate(&sample, &mut lines, None)?;
    let events = lines
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(decode_event)
        .collect::<Result<Vec<_>, _>>()?;
    let began = Instant::now();
    let bytes: usize = events.iter().map(|event| encode_event(event).len() + 1).sum();
    let seconds = began.elapsed().as_secs_f64();
    println!(
        "encode_event alone: {} events ({:.0} bytes each) in {seconds:.2} s = {:.0} events/s ({:.2} us per event)",
        events.len(),
        bytes as f64 / events.len().max(1) as f64,
        events.len() as f64 / seconds,
        seconds * 1e6 / events.len().max(1) as f64
    );
    Ok(())
}
