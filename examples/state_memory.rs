//! Memory per contact and decode-free throughput of the core at scale.
//!
//! Builds N contacts (default 10,000,000) through the processor with a fixed mix: 60 %
//! anonymous visitors (one page view), 25 % leads (signup, two page views), 15 % buyers (signup,
//! add-to-cart, two orders on different days), events in time order. Reports events/s of
//! `Processor::process` on pre-built events (built in chunks, so the input does not count
//! towards memory) and the process's resident memory per contact.
//!
//! `cargo run --release --example state_memory -- [CONTACTS]`

use std::sync::Arc;
use std::time::Instant;

use compact_str::format_compact;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{
    Click, ClickType, ContactEvent, EventBody, Purchase, PurchaseStatus, Timestamp, MILLIS_PER_DAY,
};
use lifecycle_scorer::process_stats::{peak_resident_bytes, resident_bytes};
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::state::new_shard;

fn click(index: u64, id: u64, kind: ClickType, at: Timestamp, anonymous: bool) -> ContactEvent {
    let key = format_compact!("c{id:010}");
    ContactEvent {
        event_id: format_compact!("e{index}"),
        contact_id: (!anonymous).then(|| key.clone()),
        anonymous_id: anonymous.then_some(key),
        occurred_at: at,
        body: EventBody::Click(Click::new(kind)),
    }
}

fn order(index: u64, id: u64, at: Timestamp) -> ContactEvent {
    ContactEvent {
        event_id: format_compact!("e{index}"),
        contact_id: Some(format_compact!("c{id:010}")),
        anonymous_id: None,
        occurred_at: at,
        body: EventBody::Purchase(Purchase {
            order_id: format_compact!("o{index}"),
            amount: 42.0,
            currency: "EUR".into(),
            status: PurchaseStatus::Completed,
        }),
    }
}

/// The events of contact `id`, first seen at `at`.
fn contact_events(id: u64, at: Timestamp, next_index: &mut u64, out: &mut Vec<ContactEvent>) {
    let mut index = || {
        *next_index += 1;
        *next_index
    };
    match id % 20 {
        0..=11 => out.push(click(index(), id, ClickType::PageView, at, true)),
        12..=16 => {
            out.push(click(index(), id, ClickType::Signup, at, false));
            out.push(click(index(), id, ClickType::PageView, at.plus_millis(60_000), false));
            out.push(click(index(), id, ClickType::PageView, at.plus_millis(120_000), false));
        }
        _ => {
            out.push(click(index(), id, ClickType::Signup, at, false));
            out.push(click(index(), id, ClickType::AddToCart, at.plus_millis(60_000), false));
            out.push(order(index(), id, at.plus_millis(120_000)));
            out.push(order(index(), id, at.plus_millis(3 * MILLIS_PER_DAY)));
        }
    }
}

fn main() {
    let contacts: u64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(10_000_000);
    let config = Config::builtin().expect("default config");
    let baseline_kib = resident_bytes().unwrap_or(0) / 1024;
    let shard = Arc::new(new_shard(contacts as usize));
    let mut processor = Processor::new(Arc::new(config.engine), shard, config.processing);
    let start = Timestamp::from_millis(1_735_689_600_000); // 2025-01-01
                                                           // Spread first sightings over 180 days.
    let spacing = (180 * MILLIS_PER_DAY) / contacts.max(1) as i64;
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut next_index = 0;
    let mut events = 0u64;
    let mut busy = std::time::Duration::ZERO;
    const CHUNK: u64 = 100_000;
    for first in (0..contacts).step_by(CHUNK as usize) {
        chunk.clear();
        for id in first..(first + CHUNK).min(contacts) {
            contact_events(id, start.plus_millis(id as i64 * spacing), &mut next_index, &mut chunk);
        }
        chunk.sort_by_key(|event| event.occurred_at);
        let started = Instant::now();
        for event in &chunk {
            processor.process(event, &mut out);
            out.clear();
        }
        busy += started.elapsed();
        events += chunk.len() as u64;
    }
    drop(chunk);
    let rss_kib = resident_bytes().unwrap_or(0) / 1024;
    let peak_kib = peak_resident_bytes().unwrap_or(0) / 1024;
    let report = serde_json::json!({
        "contacts": contacts,
        "events": events,
        "process_seconds": busy.as_secs_f64(),
        "events_per_second": events as f64 / busy.as_secs_f64(),
        "rss_bytes": rss_kib * 1024,
        "rss_bytes_per_contact": (rss_kib.saturating_sub(baseline_kib) * 1024) as f64 / contacts as f64,
        "peak_rss_bytes_per_contact": (peak_kib * 1024) as f64 / contacts as f64,
        "contact_state_size_bytes": std::mem::size_of::<lifecycle_scorer::domain::ContactState>(),
        "contact_key_size_bytes": std::mem::size_of::<lifecycle_scorer::domain::ContactKey>(),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
}
