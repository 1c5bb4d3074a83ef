//! The decode-free core on a realistic generated stream at scale.
//!
//! Runs `generate` for N contacts (default 7,100,000, which gives about 10 million contact
//! keys: anonymous browsers count apart from identified contacts) over 365 days, decodes its
//! lines in batches of 100,000 (not timed), and times only `Processor::process` on each batch.
//! Reports events/s of the core and resident memory per contact at the end.
//!
//! `cargo run --release --example core_at_scale -- [CONTACTS]`

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifecycle_scorer::codec::json::decode_event;
use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::ContactEvent;
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::process_stats::resident_bytes;
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::state::new_shard;

const BATCH: usize = 100_000;

/// Collects generated lines and feeds them, decoded, to the processor batch by batch.
struct Feeder {
    processor: Processor,
    pending: Vec<u8>,
    lines: usize,
    events: Vec<ContactEvent>,
    busy: Duration,
    processed: u64,
    changes: u64,
}

impl Feeder {
    fn flush_batch(&mut self) {
        self.events.clear();
        for line in self
            .pending
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
        {
            if let Ok(event) = decode_event(line) {
                self.events.push(event);
            }
        }
        self.pending.clear();
        self.lines = 0;
        let mut out = Vec::with_capacity(256);
        let started = Instant::now();
        for event in &self.events {
            self.processor.process(event, &mut out);
            self.changes += out.len() as u64;
            out.clear();
        }
        self.busy += started.elapsed();
        self.processed += self.events.len() as u64;
    }
}

impl Write for Feeder {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        self.lines += bytes.iter().filter(|byte| **byte == b'\n').count();
        if self.lines >= BATCH {
            // Keep a trailing partial line for the next batch.
            let cut = self
                .pending
                .iter()
                .rposition(|byte| *byte == b'\n')
                .map_or(0, |index| index + 1);
            let rest = self.pending.split_off(cut);
            self.flush_batch();
            self.pending = rest;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn main() -> io::Result<()> {
    let contacts: u64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(7_100_000);
    let config = Config::builtin().map_err(io::Error::other)?;
    let baseline_kib = resident_bytes().unwrap_or(0) / 1024;
    let shard = Arc::new(new_shard((contacts as usize) * 3 / 2));
    let mut feeder = Feeder {
        processor: Processor::new(Arc::new(config.engine), shard, config.processing),
        pending: Vec::with_capacity(64 << 20),
        lines: 0,
        events: Vec::with_capacity(BATCH + 1),
        busy: Duration::ZERO,
        processed: 0,
        changes: 0,
    };
    let options = GenerateOptions {
        contacts,
        days: 365,
        seed: 42,
        start: parse_time_argument("2025-01-01").map_err(io::Error::other)?,
    };
    generate(&options, &mut feeder, None)?;
    feeder.flush_batch();
    // The batch buffers are not contact state.
    let keys = feeder.processor.shard().len() as u64;
    drop(std::mem::take(&mut feeder.events));
    drop(std::mem::take(&mut feeder.pending));
    let rss_kib = resident_bytes().unwrap_or(0) / 1024;
    let report = serde_json::json!({
        "generated_contacts": contacts,
        "contact_keys": keys,
        "events": feeder.processed,
        "stage_changes": feeder.changes,
        "process_seconds": feeder.busy.as_secs_f64(),
        "events_per_second": feeder.processed as f64 / feeder.busy.as_secs_f64(),
        "rss_bytes": rss_kib * 1024,
        "rss_bytes_per_contact": (rss_kib.saturating_sub(baseline_kib) * 1024) as f64 / keys as f64,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    Ok(())
}
