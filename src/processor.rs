//! One partition's work on decoded events: dedupe -> lifecycle -> score -> stage changes.
//!
//! The same processor runs under `replay` (events from a file) and under the Kafka service
//! (events from one partition), which is why both give identical outputs. It owns the writes to
//! its shard and a timer wheel; it does no I/O and reads no clock: event time drives everything,
//! and idle-time timers come from the caller through [`Processor::advance_to`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use compact_str::CompactString;
use std::sync::Arc;

use crate::config::Processing;
use crate::domain::{
    fingerprint, Adoption, ChangeKind, ContactEvent, ContactKey, ContactState, Erasure, Identify, Input, Merge,
    StageChange, Timestamp,
};
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
    /// Anonymous visitors handed over to the contact they turned out to be.
    pub merged_away: u64,
    /// Handed-over visitors merged into their contact.
    pub merged: u64,
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
    /// A contact waiting for a merge is not filed until the merge arrives ([`Processor::catch_up`]).
    wheel: BTreeMap<u32, Vec<ContactKey>>,
    /// Highest event time seen: the partition's event-time clock.
    watermark: Timestamp,
    stats: ProcessorStats,
    /// Contacts whose state changed since [`Processor::take_touched`], when tracked (the
    /// service writes them to its changelog).
    touched: Option<Vec<ContactKey>>,
    /// Merge requests and handovers made, to be routed (see [`Processor::take_outbox`]).
    outbox: Vec<Input>,
    /// Contacts that stopped waiting for a merge (see [`Processor::take_released`]).
    released: Vec<ContactKey>,
    /// Whether identifying events ask for the anonymous visitor's state (the caller routes
    /// the requests: see [`Feeder`]).
    merges: bool,
    /// Anonymous visitors handed over, by anonymous id: the contact they went to. A repeated
    /// request is answered as such, never with "nothing held" (which would race the first
    /// answer at the contact's partition). Kept in the changelog.
    handed: HashMap<CompactString, CompactString>,
    /// Handover markers set (`Some`) or dropped (`None`) since the last
    /// [`Processor::take_handovers`].
    handed_changes: Vec<(CompactString, Option<CompactString>)>,
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
            outbox: Vec::new(),
            released: Vec::new(),
            merges: false,
            handed: HashMap::new(),
            handed_changes: Vec::new(),
        }
    }

    /// Merges anonymous visitors into the contacts they turn out to be: identifying events make
    /// requests to be routed by a [`Feeder`], and the contact's inputs wait for the answer.
    /// Off at creation: only callers that route the requests (`replay`, the service) turn it
    /// on, when `processing.merge_identities` says so; a processor handed events one by one
    /// with nobody to answer would leave contacts waiting for ever.
    pub fn merge_identities(&mut self) {
        self.merges = true;
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
    ///
    /// The partition's clock stays where it is: it moves with the inputs handed in, those
    /// the restored state already reflects included ([`Processor::pass`]), in their order. The
    /// restored states may be far ahead of inputs still to be read again (those held for a
    /// contact that waited for a merge are never checkpointed), and a clock taken from the
    /// states would fire that contact's timers before its own earlier inputs, making them late.
    pub fn restore(&mut self, key: ContactKey, mut state: Box<ContactState>) {
        state.timer_bucket = 0;
        let due = self.engine.next_due(&state);
        file(&mut self.wheel, self.sweep_millis, &key, &mut state, due);
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
        self.tick(event.occurred_at, out);
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
                let mut state = Box::new(self.engine.new_contact(event.occurred_at));
                let applied = self.engine.apply(&key, &mut state, event, out);
                let due = self.engine.next_due(&state);
                file(&mut self.wheel, self.sweep_millis, &key, &mut state, due);
                self.shard.insert(key.clone(), state);
                self.stats.contacts_created += 1;
                applied
            }
        };
        match applied {
            Applied::Duplicate => self.stats.duplicates += 1,
            Applied::TooLate => self.stats.too_late += 1,
            Applied::Applied => {}
        }
        if applied != Applied::Duplicate {
            self.ask_for_merge(&key, event);
        }
        self.stats.stage_changes += (out.len() - emitted_before) as u64;
        applied
    }

    /// Moves the partition's clock to `at`, firing other contacts' due timers first when it
    /// enters a new sweep bucket.
    fn tick(&mut self, at: Timestamp, out: &mut Vec<StageChange>) {
        if at > self.watermark {
            if self.bucket(at) > self.bucket(self.watermark) {
                self.advance_to(at, out);
            }
            self.watermark = at;
        }
    }

    /// When `event` identifies the contact as an anonymous visitor not asked for yet, records
    /// the request (the contact waits for the answer) and queues it for the visitor's
    /// partition.
    fn ask_for_merge(&mut self, key: &ContactKey, event: &ContactEvent) {
        if !self.merges {
            return;
        }
        let Some(anonymous_id) = self.engine.identifies(event) else {
            return;
        };
        let Some(mut state) = self.shard.get_mut(key) else {
            return;
        };
        let anonymous = fingerprint(anonymous_id);
        let merges = &mut state.extra_mut().merges;
        if merges.iter().any(|merge| merge.anonymous == anonymous) {
            return;
        }
        merges.push(Merge { anonymous, done: false });
        self.outbox.push(Input::Identify(Identify {
            contact_id: key.id.clone(),
            anonymous_id: anonymous_id.into(),
            occurred_at: event.occurred_at,
            event_id: event.event_id.clone(),
        }));
    }

    /// Moves the clock as handling `input` would, without applying it: for an input the
    /// restored state already reflects, read again after a crash, so that the clock (and with
    /// it every timer) follows the same inputs as the first time.
    pub fn pass(&mut self, input: &Input, out: &mut Vec<StageChange>) {
        match input {
            Input::Event(event) => self.tick(event.occurred_at, out),
            Input::Erase(erasure) => self.tick(erasure.occurred_at, out),
            Input::Identify(_) | Input::Adopt(_) => {}
        }
    }

    /// The contact whose input this is, when that contact waits for a merge: the input must
    /// wait too (the caller holds it and hands it in again once [`Processor::take_released`]
    /// names the contact).
    pub fn must_wait(&self, input: &Input) -> Option<ContactKey> {
        let Input::Event(event) = input else {
            return None;
        };
        let key = event.key()?;
        let waits = self.shard.get(&key).is_some_and(|state| state.awaiting_merge());
        waits.then_some(key)
    }

    /// Requests for other partitions (or this one) made since the last call, in order: to be
    /// routed by [`Input::routing_id`] and handed to that partition's processor.
    pub fn take_outbox(&mut self) -> Vec<Input> {
        std::mem::take(&mut self.outbox)
    }

    /// Contacts that stopped waiting for a merge since the last call: their held inputs go now.
    pub fn take_released(&mut self) -> Vec<ContactKey> {
        std::mem::take(&mut self.released)
    }

    /// Fires the timers a contact that waited for a merge missed meanwhile: those due by the
    /// partition's clock (later ones fire with the sweeps, as for every contact). Called once
    /// its held inputs are in, so that they come first, in their order.
    pub fn catch_up(&mut self, key: &ContactKey, out: &mut Vec<StageChange>) {
        let Some(mut state) = self.shard.get_mut(key) else {
            return;
        };
        if state.awaiting_merge() {
            return;
        }
        let emitted_before = out.len();
        // Due by due, so the contact's clock ends at its last timer, not at wherever the
        // partition's clock happened to be when the merge arrived.
        for _ in 0..=self.engine.model.stages.len() {
            let due = self.engine.next_due(&state);
            if due > self.watermark {
                break;
            }
            self.engine.advance_to(key, &mut state, due, out);
        }
        let due = self.engine.next_due(&state);
        file(&mut self.wheel, self.sweep_millis, key, &mut state, due);
        let fired = (out.len() - emitted_before) as u64;
        if fired > 0 {
            self.stats.stage_changes += fired;
            self.stats.timer_changes += fired;
            if let Some(touched) = &mut self.touched {
                touched.push(key.clone());
            }
        }
    }

    /// Hands the anonymous visitor's state (if held) over to the contact it turned out to be:
    /// it leaves the shard with a merge record, and an [`Adoption`] goes to the outbox.
    fn hand_over(&mut self, request: &Identify, out: &mut Vec<StageChange>) {
        if self.handed.get(&request.anonymous_id) == Some(&request.contact_id) {
            self.outbox.push(Input::Adopt(Adoption {
                request: request.clone(),
                state: None,
                repeated: true,
            }));
            return;
        }
        let key = ContactKey::anonymous(request.anonymous_id.clone());
        let state = self.shard.remove(&key).map(|(key, state)| {
            let at = request.occurred_at.max(state.clock);
            let kind = ChangeKind::Merged(request.contact_id.clone());
            out.push(self.engine.ended(&key, &state, at, &request.event_id, kind));
            self.stats.stage_changes += 1;
            self.stats.merged_away += 1;
            if let Some(touched) = &mut self.touched {
                touched.push(key);
            }
            state
        });
        if state.is_some() {
            self.set_handed(request.anonymous_id.clone(), Some(request.contact_id.clone()));
        }
        self.outbox.push(Input::Adopt(Adoption {
            request: request.clone(),
            state,
            repeated: false,
        }));
    }

    fn set_handed(&mut self, anonymous_id: CompactString, contact_id: Option<CompactString>) {
        match &contact_id {
            Some(contact_id) => self.handed.insert(anonymous_id.clone(), contact_id.clone()),
            None => self.handed.remove(&anonymous_id),
        };
        if self.touched.is_some() {
            self.handed_changes.push((anonymous_id, contact_id));
        }
    }

    /// Puts a handover marker restored from the changelog back.
    pub fn restore_handover(&mut self, anonymous_id: CompactString, contact_id: CompactString) {
        self.handed.insert(anonymous_id, contact_id);
    }

    /// Handover markers set or dropped since the last call, in order (for the changelog).
    pub fn take_handovers(&mut self) -> Vec<(CompactString, Option<CompactString>)> {
        std::mem::take(&mut self.handed_changes)
    }

    /// Merges a handed-over visitor into its contact (see [`Engine::adopt`]).
    fn adopt(&mut self, adoption: &Adoption, out: &mut Vec<StageChange>) {
        if adoption.repeated {
            return;
        }
        let key = ContactKey::contact(adoption.request.contact_id.clone());
        let emitted_before = out.len();
        let mut waits = false;
        if let Some(mut state) = self.shard.get_mut(&key) {
            if self
                .engine
                .adopt(&key, &mut state, adoption.state.as_deref(), &adoption.request, out)
            {
                self.stats.merged += u64::from(adoption.state.is_some());
                let due = self.engine.next_due(&state);
                file(&mut self.wheel, self.sweep_millis, &key, &mut state, due);
                if let Some(touched) = &mut self.touched {
                    touched.push(key.clone());
                }
            }
            waits = state.awaiting_merge();
        }
        self.stats.stage_changes += (out.len() - emitted_before) as u64;
        if !waits {
            self.released.push(key);
        }
    }

    /// Handles one input: an event is [processed](Processor::process), an erasure request
    /// [erases](Processor::erase), a merge request hands the visitor over, a handover is
    /// merged. `None` for requests (they are not events to count).
    pub fn handle(&mut self, input: &Input, out: &mut Vec<StageChange>) -> Option<Applied> {
        match input {
            Input::Event(event) => return Some(self.process(event, out)),
            Input::Erase(erasure) => self.erase(erasure, out),
            Input::Identify(request) => self.hand_over(request, out),
            Input::Adopt(adoption) => self.adopt(adoption, out),
        }
        None
    }

    /// Erases every contact the request names: the state leaves the shard (and, through the
    /// touched set, the changelog) and a deletion record is pushed for each contact that was
    /// held. Timers due before the request fire first, as for an event; a request for a
    /// contact not held does nothing, so a repeated request is harmless.
    pub fn erase(&mut self, erasure: &Erasure, out: &mut Vec<StageChange>) {
        let at = erasure.occurred_at;
        self.tick(at, out);
        // Handover markers name the visitor and the contact: both go.
        let marked: Vec<CompactString> = self
            .handed
            .iter()
            .filter(|(anonymous, contact)| {
                erasure.anonymous_id.as_ref() == Some(*anonymous) || erasure.contact_id.as_ref() == Some(*contact)
            })
            .map(|(anonymous, _)| anonymous.clone())
            .collect();
        for anonymous in marked {
            self.set_handed(anonymous, None);
        }
        for key in erasure.keys() {
            let Some((key, mut state)) = self.shard.remove(&key) else {
                continue;
            };
            let emitted_before = out.len();
            self.engine.advance_to(&key, &mut state, at, out);
            let at = at.max(state.clock);
            out.push(
                self.engine
                    .ended(&key, &state, at, &erasure.request_id, ChangeKind::Deleted),
            );
            if state.awaiting_merge() {
                // Its held inputs go now, to a contact that starts afresh.
                self.released.push(key.clone());
            }
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
                if state.awaiting_merge() {
                    // Its clock stands still until the merge arrives; `catch_up` fires what it
                    // missed and files it again then. Out of the wheel meanwhile: looking at it
                    // again every bucket cost more than the rest of the sweeps together.
                    state.timer_bucket = 0;
                    continue;
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

/// Feeds one partition's processor. Inputs of a contact that waits for a merge are held until
/// it arrives, then handed in, in their order, before anything later; requests the processor
/// makes for this partition are handed in at once, those for other partitions given back to be
/// routed. Each input reaches the processor once, whatever it waited for, so the outcome does
/// not depend on how long a merge took to arrive.
#[derive(Debug)]
pub struct Feeder<T> {
    held: HashMap<ContactKey, Vec<(Input, Option<T>)>>,
    queue: VecDeque<Step<T>>,
}

/// What a feeder does next.
#[allow(clippy::large_enum_variant)] // as `Input`: nearly every step is an input
#[derive(Debug)]
enum Step<T> {
    /// Hand in an input.
    Input(Input, Option<T>),
    /// A contact's held inputs are in: fire the timers it missed while it waited.
    CatchUp(ContactKey),
}

impl<T> Default for Feeder<T> {
    fn default() -> Self {
        Feeder {
            held: HashMap::new(),
            queue: VecDeque::new(),
        }
    }
}

impl<T> Feeder<T> {
    /// Hands `input` (tagged by the caller; requests the processor makes carry no tag) and
    /// everything it sets off here to `processor`. `here` tells whether a request belongs to
    /// this partition; the others go to `elsewhere`. `handled` sees each input right after the
    /// processor did, with what it made of it.
    #[allow(clippy::too_many_arguments)]
    pub fn feed(
        &mut self,
        processor: &mut Processor,
        input: Input,
        tag: Option<T>,
        out: &mut Vec<StageChange>,
        here: impl Fn(&Input) -> bool,
        elsewhere: &mut Vec<Input>,
        mut handled: impl FnMut(&Processor, &Input, Option<T>, Option<Applied>),
    ) {
        self.queue.push_back(Step::Input(input, tag));
        while let Some(step) = self.queue.pop_front() {
            let (input, tag) = match step {
                Step::Input(input, tag) => (input, tag),
                Step::CatchUp(key) => {
                    processor.catch_up(&key, out);
                    continue;
                }
            };
            if let Some(key) = processor.must_wait(&input) {
                self.held.entry(key).or_default().push((input, tag));
                continue;
            }
            let applied = processor.handle(&input, out);
            handled(processor, &input, tag, applied);
            let mut next = Vec::new();
            for request in processor.take_outbox() {
                if here(&request) {
                    next.push(Step::Input(request, None));
                } else {
                    elsewhere.push(request);
                }
            }
            for key in processor.take_released() {
                let held = self.held.remove(&key).unwrap_or_default();
                next.extend(held.into_iter().map(|(input, tag)| Step::Input(input, tag)));
                next.push(Step::CatchUp(key));
            }
            // What this input set off goes before the inputs after it.
            for item in next.into_iter().rev() {
                self.queue.push_front(item);
            }
        }
    }

    /// Inputs held for contacts that wait for a merge.
    pub fn held(&self) -> usize {
        self.held.values().map(Vec::len).sum()
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
        processor.merge_identities();
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

    fn click(contact: Option<&str>, anonymous: Option<&str>, event: &str, hour: i64, kind: &str, extra: &str) -> Input {
        let at = crate::codec::format_timestamp(Timestamp::from_millis(1_735_689_600_000 + hour * 3_600_000));
        let id = |value: Option<&str>| value.map_or("null".to_owned(), |value| format!("\"{value}\""));
        let line = format!(
            r#"{{"source":"clickstream","event_id":"{event}","contact_id":{},"anonymous_id":{},"occurred_at":"{at}","type":"{kind}"{extra}}}"#,
            id(contact),
            id(anonymous)
        );
        Input::Event(decode_event(line.as_bytes()).unwrap())
    }

    /// A visitor who put two things in the cart (with a Meta click id), then signed up.
    fn visitor_then_signup() -> Vec<Input> {
        vec![
            click(None, Some("a1"), "v1", 1, "add_to_cart", r#","fbc":"fb.1.1.x""#),
            click(None, Some("a1"), "v2", 2, "add_to_cart", ""),
            click(Some("c1"), Some("a1"), "s1", 3, "signup", ""),
            click(Some("c1"), None, "p1", 4, "page_view", ""),
        ]
    }

    fn feed_all(processor: &mut Processor, inputs: Vec<Input>) -> Vec<StageChange> {
        let mut feeder = Feeder::<()>::default();
        let mut out = Vec::new();
        let mut elsewhere = Vec::new();
        for input in inputs {
            feeder.feed(
                processor,
                input,
                None,
                &mut out,
                |_| true,
                &mut elsewhere,
                |_, _, _, _| {},
            );
        }
        assert!(elsewhere.is_empty());
        out
    }

    fn summary(changes: &[StageChange]) -> Vec<String> {
        let model = &Config::builtin().unwrap().engine.model;
        let mut lines: Vec<String> = changes
            .iter()
            .map(|change| crate::codec::json::encode_stage_change(change, model))
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_sign_up_merges_the_anonymous_visitor_into_the_contact() {
        let mut processor = processor();
        let out = feed_all(&mut processor, visitor_then_signup());
        let contact = ContactKey::contact("c1");
        let visitor = ContactKey::anonymous("a1");
        assert!(processor.shard().get(&visitor).is_none(), "the visitor's state moved");
        let state = processor.shard().get(&contact).unwrap();
        assert!(!state.awaiting_merge());
        let identity = state.identity().unwrap();
        assert_eq!(
            identity.get(crate::domain::IdentityField::Fbc),
            Some("fb.1.1.x"),
            "its click id came along"
        );
        assert!(state.engagement > 9.0, "engagement adds up: {}", state.engagement);
        let model = &processor.engine().model;
        assert_eq!(
            model.stage(state.stage).id,
            "hot_lead",
            "the merged engagement makes a hot lead"
        );
        let merge = out
            .iter()
            .find(|change| change.key == visitor && change.kind != ChangeKind::Transition)
            .unwrap();
        assert_eq!(merge.kind, ChangeKind::Merged("c1".into()));
        let hot = out
            .iter()
            .find(|change| change.key == contact && model.stage(change.to).id == "hot_lead")
            .unwrap();
        assert_eq!(
            hot.trigger,
            crate::domain::Trigger::Event("s1".into()),
            "caused by the sign-up"
        );
        assert_eq!(processor.stats().merged, 1);
    }

    #[test]
    fn a_merge_across_partitions_gives_what_one_partition_gives() {
        let month_later = Timestamp::from_millis(1_735_689_600_000 + 40 * DAY);
        let mut single = processor();
        let mut expected = feed_all(&mut single, visitor_then_signup());
        single.advance_to(month_later, &mut expected);
        let expected = summary(&expected);

        // The visitor on one partition, the contact on another.
        let (mut visitors, mut contacts) = (processor(), processor());
        let (mut visitor_feeder, mut contact_feeder) = (Feeder::<()>::default(), Feeder::<()>::default());
        let mut out = Vec::new();
        let mut elsewhere = Vec::new();
        let mine = |request: &Input| matches!(request, Input::Adopt(_));
        let inputs = visitor_then_signup();
        for input in inputs[..2].iter().cloned() {
            visitor_feeder.feed(
                &mut visitors,
                input,
                None,
                &mut out,
                |_| false,
                &mut elsewhere,
                |_, _, _, _| {},
            );
        }
        for input in inputs[2..].iter().cloned() {
            contact_feeder.feed(
                &mut contacts,
                input,
                None,
                &mut out,
                mine,
                &mut elsewhere,
                |_, _, _, _| {},
            );
        }
        assert_eq!(
            contact_feeder.held(),
            1,
            "the contact's later click waits for the merge"
        );
        // Its timers wait too: a month on, the lead would have gone cold.
        contacts.advance_to(month_later, &mut out);
        assert!(out.iter().all(|change| change.trigger != crate::domain::Trigger::Timer));
        let request = elsewhere.pop().unwrap();
        assert!(matches!(request, Input::Identify(_)));
        visitor_feeder.feed(
            &mut visitors,
            request,
            None,
            &mut out,
            |_| false,
            &mut elsewhere,
            |_, _, _, _| {},
        );
        let handover = elsewhere.pop().unwrap();
        contact_feeder.feed(
            &mut contacts,
            handover.clone(),
            None,
            &mut out,
            mine,
            &mut elsewhere,
            |_, _, _, _| {},
        );
        assert_eq!(contact_feeder.held(), 0);
        assert!(
            out.iter().any(|change| change.trigger == crate::domain::Trigger::Timer),
            "the timers it missed fire once merged"
        );
        contacts.advance_to(month_later, &mut out);
        assert_eq!(summary(&out), expected);

        // A handover delivered twice changes nothing.
        let mut again = Vec::new();
        contact_feeder.feed(
            &mut contacts,
            handover.clone(),
            None,
            &mut again,
            mine,
            &mut elsewhere,
            |_, _, _, _| {},
        );
        assert!(again.is_empty());
        // A request made again (the contact's partition crashed and processed the sign-up
        // anew) is answered as a repeat, never as "nothing held", which could overtake the
        // first answer; the marker is what the changelog keeps of it.
        let Input::Adopt(first) = &handover else { unreachable!() };
        visitor_feeder.feed(
            &mut visitors,
            Input::Identify(first.request.clone()),
            None,
            &mut again,
            |_| false,
            &mut elsewhere,
            |_, _, _, _| {},
        );
        let Some(Input::Adopt(repeat)) = elsewhere.pop() else {
            panic!("no answer")
        };
        assert!(repeat.repeated && repeat.state.is_none());
        assert_eq!(visitors.take_handovers(), [("a1".into(), Some("c1".into()))]);
    }
}
