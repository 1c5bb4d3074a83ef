//! One partition's work on decoded events: dedupe -> lifecycle -> score -> stage changes.
//!
//! The same processor runs under `replay` (events from a file) and under the Kafka service
//! (events from one partition), which is why both give identical outputs. It owns the writes to
//! its shard and a timer wheel; it does no I/O and reads no clock: event time drives everything,
//! and idle-time timers come from the caller through [`Processor::advance_to`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Processing;
use crate::domain::{ContactEvent, ContactKey, ContactState, Erasure, Input, StageChange, Timestamp};
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
    /// Contacts erased on request.
    pub erased: u64,
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

    /// Handles one input: an event is [processed](Processor::process), an erasure request
    /// [erases](Processor::erase). `None` for requests (they are not events to count).
    pub fn handle(&mut self, input: &Input, out: &mut Vec<StageChange>) -> Option<Applied> {
        match input {
            Input::Event(event) => Some(self.process(event, out)),
            Input::Erase(erasure) => {
                self.erase(erasure, out);
                None
            }
        }
    }

    /// Erases every contact the request names: the state leaves the shard (and, through the
    /// touched set, the changelog) and a deletion record is pushed for each contact that was
    /// held. Timers due before the request fire first, as for an event; a request for a
    /// contact not held does nothing, so a repeated request is harmless.
    pub fn erase(&mut self, erasure: &Erasure, out: &mut Vec<StageChange>) {
        let at = erasure.occurred_at;
        if at > self.watermark {
            if self.bucket(at) > self.bucket(self.watermark) {
                self.advance_to(at, out);
            }
            self.watermark = at;
        }
        for key in erasure.keys() {
            let Some((key, mut state)) = self.shard.remove(&key) else {
                continue;
            };
            let emitted_before = out.len();
            self.engine.advance_to(&key, &mut state, at, out);
            out.push(
                self.engine
                    .erased(&key, &state, at.max(state.clock), &erasure.request_id),
            );
            self.stats.stage_changes += (out.len() - emitted_before) as u64;
            self.stats.erased += 1;
            if let Some(touched) = &mut self.touched {
                touched.push(key);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::json::decode_event;
    use crate::config::Config;
    use crate::domain::ChangeKind;
    use crate::state::new_shard;

    const DAY: i64 = 86_400_000;

    fn processor() -> Processor {
        let config = Config::builtin().unwrap();
        let mut processor = Processor::new(Arc::new(config.engine), Arc::new(new_shard(0)), config.processing);
        processor.track_touched();
        processor
    }

    fn signup(id: &str, event: &str, day: i64) -> ContactEvent {
        let at = crate::codec::format_timestamp(Timestamp::from_millis(1_735_689_600_000 + day * DAY));
        decode_event(
            format!(r#"{{"source":"clickstream","event_id":"{event}","contact_id":"{id}","occurred_at":"{at}","type":"signup"}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn erasure(id: &str, day: i64) -> Erasure {
        Erasure::tombstone(id, Timestamp::from_millis(1_735_689_600_000 + day * DAY))
    }

    #[test]
    fn an_erasure_removes_the_state_and_announces_it_once() {
        let mut processor = processor();
        let mut out = Vec::new();
        processor.process(&signup("c1", "e1", 0), &mut out);
        processor.process(&signup("c2", "e2", 0), &mut out);
        let last = out.iter().rfind(|change| change.key.id == "c1").unwrap().clone();
        processor.take_touched();
        out.clear();

        processor.erase(&erasure("c1", 1), &mut out);
        assert_eq!(out.len(), 1);
        let deletion = &out[0];
        assert_eq!(deletion.kind, ChangeKind::Deleted);
        assert_eq!((deletion.key.id.as_str(), deletion.seq), ("c1", last.seq + 1));
        assert_eq!(deletion.from, Some(last.to));
        assert!(processor.shard().get(&ContactKey::contact("c1")).is_none());
        assert!(
            processor.shard().get(&ContactKey::contact("c2")).is_some(),
            "others stay"
        );
        assert_eq!(
            processor.take_touched(),
            [ContactKey::contact("c1")],
            "the changelog learns of it"
        );
        assert_eq!(processor.stats().erased, 1);

        out.clear();
        processor.erase(&erasure("c1", 2), &mut out);
        processor.erase(&erasure("nobody", 2), &mut out);
        assert!(out.is_empty(), "a repeated or unknown request changes nothing");
    }

    #[test]
    fn a_contact_created_again_after_an_erasure_never_reuses_an_id() {
        let mut processor = processor();
        let mut before = Vec::new();
        processor.process(&signup("c1", "e1", 0), &mut before);
        processor.erase(&erasure("c1", 1), &mut before);
        let mut after = Vec::new();
        processor.process(&signup("c1", "e1", 2), &mut after);
        assert!(
            !after.is_empty(),
            "the old event id is not remembered: it is a new contact"
        );
        assert_eq!(after[0].seq, 1);
        for change in &after {
            assert!(before.iter().all(|old| old.event_id != change.event_id));
        }
    }

    #[test]
    fn timers_due_before_an_erasure_fire_first() {
        let mut processor = processor();
        let mut out = Vec::new();
        processor.process(&signup("c1", "e1", 0), &mut out);
        out.clear();
        // Leads go cold after 30 days without activity.
        processor.erase(&erasure("c1", 40), &mut out);
        let kinds: Vec<(ChangeKind, bool)> = out
            .iter()
            .map(|change| (change.kind.clone(), change.trigger == crate::domain::Trigger::Timer))
            .collect();
        assert_eq!(kinds, [(ChangeKind::Transition, true), (ChangeKind::Deleted, false)]);
        assert_eq!(out[1].from, Some(out[0].to));
    }
}
