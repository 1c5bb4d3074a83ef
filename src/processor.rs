//! One partition's work on decoded events: dedupe -> lifecycle -> score -> stage changes.
//!
//! The same processor runs under `replay` (events from a file) and under the Kafka service
//! (events from one partition), which is why both give identical outputs. It owns the writes to
//! its shard and a timer wheel; it does no I/O and reads no clock: event time drives everything,
//! and idle-time timers come from the caller through [`Processor::advance_to`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Processing;
use crate::domain::{ContactEvent, ContactKey, ContactState, StageChange, Timestamp};
use crate::lifecycle::{Applied, Engine};
use crate::state::Shard;

/// Counters of what the processor did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessorStats {
    /// Events handed in.
    pub events: u64,
    /// Events dropped as duplicates of a recent `event_id`.
    pub duplicates: u64,
    /// Events too late to change a stage (statistics still updated).
    pub too_late: u64,
    /// Contacts created.
    pub contacts_created: u64,
    /// Stage changes emitted.
    pub stage_changes: u64,
    /// Stage changes emitted by timers during sweeps.
    pub timer_changes: u64,
}

/// Applies events to one shard of contacts and drives their timers.
#[derive(Debug)]
pub struct Processor {
    engine: Arc<Engine>,
    shard: Arc<Shard>,
    sweep_millis: i64,
    /// Contacts with a pending timer, by sweep bucket (`next_due / sweep_millis`). A contact
    /// is filed at most once where it counts: under `ContactState::timer_bucket`, at or before
    /// its due bucket. When its due time moves later the entry stays (the sweep re-files it);
    /// when it moves earlier a new entry is filed and the old one becomes stale and is skipped.
    wheel: BTreeMap<u32, Vec<ContactKey>>,
    /// Highest event time seen: the partition's event-time clock.
    watermark: Timestamp,
    stats: ProcessorStats,
    /// Contacts whose state changed since [`Processor::take_touched`], when tracked (the
    /// service writes them to its changelog).
    touched: Option<Vec<ContactKey>>,
}

impl Processor {
    /// A processor writing to `shard`.
    pub fn new(engine: Arc<Engine>, shard: Arc<Shard>, processing: Processing) -> Self {
        Processor {
            engine,
            shard,
            sweep_millis: processing.timer_sweep_millis.max(1),
            wheel: BTreeMap::new(),
            watermark: Timestamp::MIN_VALID,
            stats: ProcessorStats::default(),
            touched: None,
        }
    }

    /// Starts remembering which contacts change, for [`Processor::take_touched`].
    pub fn track_touched(&mut self) {
        self.touched.get_or_insert_with(Vec::new);
    }

    /// The contacts whose state changed since the last call (each once, in no particular
    /// order); empty unless tracking.
    pub fn take_touched(&mut self) -> Vec<ContactKey> {
        let Some(touched) = &mut self.touched else {
            return Vec::new();
        };
        let mut keys = std::mem::take(touched);
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// What the processor has done so far.
    pub fn stats(&self) -> ProcessorStats {
        self.stats
    }

    /// The highest event time seen.
    pub fn watermark(&self) -> Timestamp {
        self.watermark
    }

    /// Moves the clock forward to `at` without firing timers (for a processor that stands for
    /// several whose clocks differ, as `replay` with partitions returns).
    pub fn raise_watermark(&mut self, at: Timestamp) {
        self.watermark = self.watermark.max(at);
    }

    /// Puts a contact restored from the changelog into the shard, with its timers filed as
    /// if it had been processed here. Replaces any state the shard held for it.
    pub fn restore(&mut self, key: ContactKey, mut state: Box<ContactState>) {
        state.timer_bucket = 0;
        let due = self.engine.next_due(&state);
        file(&mut self.wheel, self.sweep_millis, &key, &mut state, due);
        self.watermark = self.watermark.max(state.clock);
        self.shard.insert(key, state);
    }

    /// Removes a contact (a deletion, or a changelog tombstone). Its timer entries become
    /// stale and are skipped.
    pub fn forget(&mut self, key: &ContactKey) -> Option<Box<ContactState>> {
        self.shard.remove(key).map(|(_, state)| state)
    }

    /// Every contact's state without the timer wheel's bookkeeping (`timer_bucket`), which
    /// depends on when timers were swept rather than on what happened: for comparing states.
    pub fn states(&self) -> Vec<(ContactKey, ContactState)> {
        self.shard
            .iter()
            .map(|entry| {
                let mut state = (**entry.value()).clone();
                state.timer_bucket = 0;
                (entry.key().clone(), state)
            })
            .collect()
    }

    /// The shard this processor writes.
    pub fn shard(&self) -> &Arc<Shard> {
        &self.shard
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn bucket(&self, at: Timestamp) -> u32 {
        bucket_of(at, self.sweep_millis)
    }

    /// Applies one event, pushing the stage changes it causes onto `out`. When the event moves
    /// the partition's clock into a new sweep bucket, other contacts' due timers fire first.
    pub fn process(&mut self, event: &ContactEvent, out: &mut Vec<StageChange>) -> Applied {
        let at = event.occurred_at;
        if at > self.watermark {
            if self.bucket(at) > self.bucket(self.watermark) {
                self.advance_to(at, out);
            }
            self.watermark = at;
        }
        self.stats.events += 1;
        let Some(key) = event.key() else {
            debug_assert!(false, "decoded events always have a key");
            return Applied::Duplicate;
        };
        let emitted_before = out.len();
        if let Some(touched) = &mut self.touched {
            touched.push(key.clone());
        }
        let applied = match self.shard.get_mut(&key) {
            Some(mut state) => {
                let applied = self.engine.apply(&key, &mut state, event, out);
                let due = self.engine.next_due(&state);
                file(&mut self.wheel, self.sweep_millis, &key, &mut state, due);
                applied
            }
            None => {
                let mut state = Box::new(self.engine.new_contact(at));
                let applied = self.engine.apply(&key, &mut state, event, out);
                let due = self.engine.next_due(&state);
                file(&mut self.wheel, self.sweep_millis, &key, &mut state, due);
                self.shard.insert(key, state);
                self.stats.contacts_created += 1;
                applied
            }
        };
        match applied {
            Applied::Duplicate => self.stats.duplicates += 1,
            Applied::TooLate => self.stats.too_late += 1,
            Applied::Applied => {}
        }
        self.stats.stage_changes += (out.len() - emitted_before) as u64;
        applied
    }

    /// Fires every timer due at or before `now` for every contact of the shard. Output is
    /// sorted by (time, contact, sequence) so it does not depend on map order.
    pub fn advance_to(&mut self, now: Timestamp, out: &mut Vec<StageChange>) {
        let emitted_before = out.len();
        let last = self.bucket(now);
        while let Some(entry) = self.wheel.first_entry() {
            if *entry.key() > last {
                break;
            }
            let (bucket, keys) = entry.remove_entry();
            let mut refile = Vec::new();
            for key in keys {
                let Some(mut state) = self.shard.get_mut(&key) else {
                    continue;
                };
                if state.timer_bucket != bucket {
                    continue; // stale: filed again earlier since
                }
                state.timer_bucket = 0;
                if self.engine.next_due(&state) <= now {
                    self.engine.advance_to(&key, &mut state, now, out);
                    if let Some(touched) = &mut self.touched {
                        touched.push(key.clone());
                    }
                }
                let due = self.engine.next_due(&state);
                if due != Timestamp::NEVER {
                    // Never back into a bucket this loop is emptying, or it would not end.
                    let target = self.bucket(due).max(last.saturating_add(1));
                    state.timer_bucket = target;
                    refile.push((target, key));
                }
            }
            for (target, key) in refile {
                self.wheel.entry(target).or_default().push(key);
            }
        }
        let fired = &mut out[emitted_before..];
        fired.sort_by(|left, right| {
            (left.occurred_at, &left.key, left.seq).cmp(&(right.occurred_at, &right.key, right.seq))
        });
        let count = fired.len() as u64;
        self.stats.stage_changes += count;
        self.stats.timer_changes += count;
        self.watermark = self.watermark.max(now);
    }
}

/// The sweep bucket of an instant, from 1 (0 means "not filed").
fn bucket_of(at: Timestamp, sweep_millis: i64) -> u32 {
    let bucket = at.millis().div_euclid(sweep_millis).saturating_add(1);
    u32::try_from(bucket.max(1)).unwrap_or(u32::MAX)
}

/// Files `key` under the bucket of `due` unless it is already filed no later than that.
fn file(
    wheel: &mut BTreeMap<u32, Vec<ContactKey>>,
    sweep_millis: i64,
    key: &ContactKey,
    state: &mut ContactState,
    due: Timestamp,
) {
    if due == Timestamp::NEVER {
        return;
    }
    let bucket = bucket_of(due, sweep_millis);
    if state.timer_bucket == 0 || bucket < state.timer_bucket {
        state.timer_bucket = bucket;
        wheel.entry(bucket).or_default().push(key.clone());
    }
}
