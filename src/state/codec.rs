//! The changelog encoding of a contact: key and state in a compact, versioned binary form
//! (pure).
//!
//! Contact records: the key is one byte (0 identified, 1 anonymous) and the id's bytes, so the
//! changelog is keyed exactly as the state is; the value is a format version and the state.
//! Integers are LEB128 varints, times zigzag varints relative to the contact's clock (most are
//! close to it), fingerprints and floats fixed-width little-endian. Derived purchase statistics
//! are not stored: they are recomputed from the orders. The timer-wheel bucket is not stored
//! either: restore files timers anew.
//!
//! Checkpoint records (key: the single byte 2) say which inputs the contact records before
//! them reflect: per input topic of the partition, the first offset not processed and the
//! offsets above it that were (records finish out of order behind the reorder buffer). A task
//! writes the changed contacts of a batch, then a checkpoint, on the same changelog partition,
//! so a restore that reads up to a checkpoint knows exactly which inputs to skip.
//!
//! A newer version than this code knows is refused with [`StateDecodeError::Version`], never
//! misread: a rollback must not silently corrupt state.

use crate::domain::{
    Adoption, ContactExtra, ContactKey, ContactState, Identify, Identity, Input, Merge, OrderRecord, PurchaseHistory,
    PurchaseStatus, StageId, StageSpan, Timestamp, RECENT_EVENTS,
};

/// The version this code writes.
pub const FORMAT_VERSION: u8 = 2;

/// Why a changelog record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateDecodeError {
    /// Written by a newer version of the service.
    #[error("state format version {0} is newer than this service understands ({FORMAT_VERSION})")]
    Version(u8),
    /// Cut short or inconsistent.
    #[error("malformed state record: {0}")]
    Malformed(&'static str),
}

/// The key of checkpoint records: a write of states is complete, and the states reflect
/// exactly the inputs the checkpoint names.
pub const CHECKPOINT_KEY: [u8; 1] = [2];

/// The key of the record that opens each write of states: the checkpoint the write is about
/// to complete. When a crash cuts a write short, the states after it (but not the states the
/// write did not reach) already reflect that checkpoint's inputs: the restore tells them apart
/// by offset.
pub const WRITE_BEGUN_KEY: [u8; 1] = [4];

/// Which inputs of one topic-partition the state reflects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// The first offset not processed (`None`: nothing read yet).
    pub position: Option<i64>,
    /// Offsets above `position` that were processed, ascending.
    pub above: Vec<i64>,
}

impl Processed {
    /// True when the input at `offset` is already reflected in the state.
    pub fn contains(&self, offset: i64) -> bool {
        self.position.is_some_and(|position| offset < position) || self.above.binary_search(&offset).is_ok()
    }
}

/// Topics a partition task consumes: the three inputs (by `Source::index`), then the
/// identity topic (merges routed between partitions).
pub const LANES: usize = 4;

/// A checkpoint: what the state reflects, per consumed topic of the partition ([`LANES`]).
pub type Checkpoint = [Processed; LANES];

/// Appends the changelog value of a checkpoint.
pub fn encode_checkpoint(checkpoint: &Checkpoint, out: &mut Vec<u8>) {
    out.push(FORMAT_VERSION);
    for processed in checkpoint {
        put_varint(out, processed.position.map_or(0, |offset| offset.max(-1) as u64 + 1));
        put_varint(out, processed.above.len() as u64);
        let mut previous = processed.position.unwrap_or(0);
        for offset in &processed.above {
            // Ascending: store the gaps.
            put_varint(out, offset.wrapping_sub(previous) as u64);
            previous = *offset;
        }
    }
}

/// Reads a checkpoint value.
pub fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, StateDecodeError> {
    let mut input = Reader(bytes);
    input.version()?;
    let mut checkpoint = Checkpoint::default();
    for processed in &mut checkpoint {
        let raw = input.varint()?;
        processed.position = (raw > 0)
            .then(|| i64::try_from(raw - 1).map_err(|_| StateDecodeError::Malformed("offset out of range")))
            .transpose()?;
        let count = input.count(1)?;
        let mut previous = processed.position.unwrap_or(0);
        for _ in 0..count {
            let gap = i64::try_from(input.varint()?).map_err(|_| StateDecodeError::Malformed("offset gap"))?;
            previous = previous
                .checked_add(gap)
                .ok_or(StateDecodeError::Malformed("offset out of range"))?;
            processed.above.push(previous);
        }
    }
    input.end()?;
    Ok(checkpoint)
}

/// Appends the identity-topic value of a merge request or a handed-over state; `None` for other
/// inputs, which never travel between partitions.
pub fn encode_routed(input: &Input, out: &mut Vec<u8>) -> Option<()> {
    let (kind, request, state) = match input {
        Input::Identify(request) => (0u8, request, None),
        Input::Adopt(adoption) => (
            1u8 | u8::from(adoption.repeated) << 2,
            &adoption.request,
            adoption.state.as_deref(),
        ),
        Input::Event(_) | Input::Erase(_) => return None,
    };
    out.push(FORMAT_VERSION);
    out.push(kind | u8::from(state.is_some()) << 1);
    for text in [&request.contact_id, &request.anonymous_id, &request.event_id] {
        put_varint(out, text.len() as u64);
        out.extend_from_slice(text.as_bytes());
    }
    put_signed(out, request.occurred_at.millis());
    if let Some(state) = state {
        encode_state(state, out);
    }
    Some(())
}

/// Reads an identity-topic value.
pub fn decode_routed(bytes: &[u8]) -> Result<Input, StateDecodeError> {
    let mut input = Reader(bytes);
    input.version()?;
    let flags = input.byte()?;
    let request = Identify {
        contact_id: input.text()?,
        anonymous_id: input.text()?,
        event_id: input.text()?,
        occurred_at: Timestamp::from_millis(input.signed()?),
    };
    match flags {
        0 => {
            input.end()?;
            Ok(Input::Identify(request))
        }
        1 | 5 => {
            input.end()?;
            Ok(Input::Adopt(Adoption {
                request,
                state: None,
                repeated: flags == 5,
            }))
        }
        3 => Ok(Input::Adopt(Adoption {
            request,
            state: Some(Box::new(decode_state(input.0)?)),
            repeated: false,
        })),
        _ => Err(StateDecodeError::Malformed("unknown routed record kind")),
    }
}

/// The changelog key of a handover marker (an anonymous visitor handed to a contact); its
/// value is [`encode_handed_to`].
pub fn handover_key(anonymous_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(anonymous_id.len() + 1);
    out.push(HANDOVER_KIND);
    out.extend_from_slice(anonymous_id.as_bytes());
    out
}

/// The first byte of handover-marker keys.
pub const HANDOVER_KIND: u8 = 3;

/// The value of a handover marker: the contact the visitor went to.
pub fn encode_handed_to(contact_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(contact_id.len() + 1);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(contact_id.as_bytes());
    out
}

/// Reads a handover marker: (anonymous id, contact id).
pub fn decode_handover(key: &[u8], value: &[u8]) -> Result<(String, String), StateDecodeError> {
    let text = |bytes: &[u8]| {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| StateDecodeError::Malformed("id is not UTF-8"))
    };
    let anonymous = match key.split_first() {
        Some((&HANDOVER_KIND, id)) => text(id)?,
        _ => return Err(StateDecodeError::Malformed("not a handover key")),
    };
    let mut input = Reader(value);
    input.version()?;
    Ok((anonymous, text(input.0)?))
}

/// The changelog key of a contact.
pub fn encode_key(key: &ContactKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.id.len() + 1);
    out.push(u8::from(key.anonymous));
    out.extend_from_slice(key.id.as_bytes());
    out
}

/// The contact of a changelog key.
pub fn decode_key(bytes: &[u8]) -> Result<ContactKey, StateDecodeError> {
    let (&kind, id) = bytes.split_first().ok_or(StateDecodeError::Malformed("empty key"))?;
    let id = std::str::from_utf8(id).map_err(|_| StateDecodeError::Malformed("key is not UTF-8"))?;
    match kind {
        0 => Ok(ContactKey::contact(id)),
        1 => Ok(ContactKey::anonymous(id)),
        _ => Err(StateDecodeError::Malformed("unknown key kind")),
    }
}

/// Appends the changelog value of `state`.
pub fn encode_state(state: &ContactState, out: &mut Vec<u8>) {
    out.push(FORMAT_VERSION);
    let clock = state.clock;
    let flags = u8::from(state.extra.is_some());
    out.push(flags);
    out.push(state.stage.0);
    out.push(state.main_stage.0);
    put_varint(out, u64::from(state.seq));
    out.extend_from_slice(&state.engagement.to_le_bytes());
    put_signed(out, clock.millis());
    for at in [
        state.stage_entered_at,
        state.last_activity_at,
        state.engaged_at,
        state.born_at,
    ] {
        put_time(out, at, clock);
    }
    // Which slots are filled (bit i = slot i), then those slots: positions matter (oldest
    // first), empty ones cost nothing.
    let filled = state
        .recent_events
        .iter()
        .enumerate()
        .fold(0u8, |mask, (slot, fingerprint)| {
            mask | (u8::from(*fingerprint != 0) << slot)
        });
    out.push(filled);
    for fingerprint in state.recent_events.iter().filter(|fingerprint| **fingerprint != 0) {
        out.extend_from_slice(&fingerprint.to_le_bytes());
    }
    let Some(extra) = &state.extra else { return };
    put_varint(out, extra.history.len() as u64);
    for span in &extra.history {
        out.push(span.stage.0);
        put_varint(out, u64::from(span.visits));
        put_time(out, span.first_entered_at, clock);
        put_time(out, span.last_exited_at, clock);
        put_signed(out, span.total_millis);
    }
    let orders = extra
        .purchases
        .as_ref()
        .map_or(&[][..], |purchases| &purchases.orders[..]);
    put_varint(out, orders.len() as u64);
    for order in orders {
        out.extend_from_slice(&order.order.to_le_bytes());
        put_time(out, order.placed_at, clock);
        out.extend_from_slice(&order.amount.to_le_bytes());
        out.push(order.status as u8);
    }
    let (text, ends) = extra.identity.packed();
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
    for end in ends {
        put_varint(out, u64::from(end));
    }
    put_time(out, extra.risk_due, clock);
    put_varint(out, extra.merges.len() as u64);
    for merge in &extra.merges {
        out.extend_from_slice(&merge.anonymous.to_le_bytes());
        out.push(u8::from(merge.done));
    }
}

/// Reads a contact record's value.
pub fn decode_state(bytes: &[u8]) -> Result<ContactState, StateDecodeError> {
    let mut input = Reader(bytes);
    input.version()?;
    let flags = input.byte()?;
    let stage = StageId(input.byte()?);
    let main_stage = StageId(input.byte()?);
    let seq = u32::try_from(input.varint()?).map_err(|_| StateDecodeError::Malformed("seq out of range"))?;
    let engagement = f32::from_le_bytes(input.array()?);
    let clock = Timestamp::from_millis(input.signed()?);
    let stage_entered_at = input.time(clock)?;
    let last_activity_at = input.time(clock)?;
    let engaged_at = input.time(clock)?;
    let born_at = input.time(clock)?;
    let filled = input.byte()?;
    if u32::from(filled) >> RECENT_EVENTS != 0 {
        return Err(StateDecodeError::Malformed("recent-event slots out of range"));
    }
    let mut recent_events = [0u64; RECENT_EVENTS];
    for (slot, fingerprint) in recent_events.iter_mut().enumerate() {
        if filled & (1 << slot) != 0 {
            *fingerprint = u64::from_le_bytes(input.array()?);
        }
    }
    let mut state = ContactState::new(stage, main_stage, stage_entered_at);
    state.seq = seq;
    state.engagement = engagement;
    state.clock = clock;
    state.last_activity_at = last_activity_at;
    state.engaged_at = engaged_at;
    state.born_at = born_at;
    state.recent_events = recent_events;
    if flags & 1 == 1 {
        let spans = input.count(2)?;
        let mut history = Vec::with_capacity(spans);
        for _ in 0..spans {
            history.push(StageSpan {
                stage: StageId(input.byte()?),
                visits: u32::try_from(input.varint()?).map_err(|_| StateDecodeError::Malformed("visits"))?,
                first_entered_at: input.time(clock)?,
                last_exited_at: input.time(clock)?,
                total_millis: input.signed()?,
            });
        }
        let count = input.count(18)?;
        let mut orders = Vec::with_capacity(count);
        for _ in 0..count {
            orders.push(OrderRecord {
                order: u64::from_le_bytes(input.array()?),
                placed_at: input.time(clock)?,
                amount: f64::from_le_bytes(input.array()?),
                status: match input.byte()? {
                    0 => PurchaseStatus::Completed,
                    1 => PurchaseStatus::Refunded,
                    2 => PurchaseStatus::Cancelled,
                    _ => return Err(StateDecodeError::Malformed("unknown order status")),
                },
            });
        }
        let length = input.count(1)?;
        let text = std::str::from_utf8(input.take(length)?)
            .map_err(|_| StateDecodeError::Malformed("identity is not UTF-8"))?
            .to_owned();
        let mut ends = [0u16; 7];
        for end in &mut ends {
            *end = u16::try_from(input.varint()?).map_err(|_| StateDecodeError::Malformed("identity end"))?;
        }
        let identity =
            Identity::from_packed(&text, ends).ok_or(StateDecodeError::Malformed("identity ends do not fit"))?;
        let risk_due = input.time(clock)?;
        let count = input.count(9)?;
        let mut merges = Vec::with_capacity(count);
        for _ in 0..count {
            merges.push(Merge {
                anonymous: u64::from_le_bytes(input.array()?),
                done: match input.byte()? {
                    0 => false,
                    1 => true,
                    _ => return Err(StateDecodeError::Malformed("merge flag")),
                },
            });
        }
        state.extra = Some(Box::new(ContactExtra {
            history,
            purchases: (!orders.is_empty()).then(|| Box::new(PurchaseHistory::from_orders(orders))),
            identity,
            risk_due,
            merges,
        }));
    }
    input.end()?;
    Ok(state)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_signed(out: &mut Vec<u8>, value: i64) {
    put_varint(out, ((value << 1) ^ (value >> 63)) as u64);
}

/// A time relative to the contact's clock; [`Timestamp::NEVER`] has its own code.
fn put_time(out: &mut Vec<u8>, at: Timestamp, clock: Timestamp) {
    if at == Timestamp::NEVER {
        put_varint(out, 0);
    } else {
        // Shifted by one so 0 stays free for NEVER.
        let delta = clock.millis().wrapping_sub(at.millis());
        put_varint(out, (((delta << 1) ^ (delta >> 63)) as u64).wrapping_add(1));
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn version(&mut self) -> Result<(), StateDecodeError> {
        match self.byte()? {
            FORMAT_VERSION => Ok(()),
            newer if newer > FORMAT_VERSION => Err(StateDecodeError::Version(newer)),
            _ => Err(StateDecodeError::Malformed("unknown format version")),
        }
    }

    fn end(&self) -> Result<(), StateDecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(StateDecodeError::Malformed("trailing bytes"))
        }
    }

    fn text(&mut self) -> Result<compact_str::CompactString, StateDecodeError> {
        let length = self.count(1)?;
        std::str::from_utf8(self.take(length)?)
            .map(compact_str::CompactString::from)
            .map_err(|_| StateDecodeError::Malformed("id is not UTF-8"))
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], StateDecodeError> {
        let (head, rest) = self
            .0
            .split_at_checked(count)
            .ok_or(StateDecodeError::Malformed("cut short"))?;
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, StateDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateDecodeError> {
        self.take(N)?
            .try_into()
            .map_err(|_| StateDecodeError::Malformed("cut short"))
    }

    fn varint(&mut self) -> Result<u64, StateDecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(StateDecodeError::Malformed("varint too long"))
    }

    fn signed(&mut self) -> Result<i64, StateDecodeError> {
        let raw = self.varint()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    fn time(&mut self, clock: Timestamp) -> Result<Timestamp, StateDecodeError> {
        let raw = self.varint()?;
        if raw == 0 {
            return Ok(Timestamp::NEVER);
        }
        let zigzag = raw - 1;
        let delta = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
        Ok(Timestamp::from_millis(clock.millis().wrapping_sub(delta)))
    }

    /// A count of items at least `min_bytes` long each, checked against what is left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, StateDecodeError> {
        let count = usize::try_from(self.varint()?).map_err(|_| StateDecodeError::Malformed("count"))?;
        if count.saturating_mul(min_bytes) > self.0.len() {
            return Err(StateDecodeError::Malformed("count larger than the record"));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::generate::{generate, GenerateOptions};
    use crate::replay::{replay, ReplayOptions};

    /// Every contact of a generated stream, replayed: buyers, leads, anonymous visitors,
    /// refunds, identifiers, long histories.
    fn states() -> Vec<(ContactKey, ContactState)> {
        let mut lines = Vec::new();
        generate(
            &GenerateOptions {
                contacts: 1_500,
                days: 365,
                seed: 4,
                start: Timestamp::from_millis(1_735_689_600_000),
            },
            &mut lines,
            None,
        )
        .unwrap();
        let config = Config::builtin().unwrap();
        let (_, processor) = replay(
            Arc::new(config.engine),
            config.processing,
            &lines[..],
            &mut std::io::sink(),
            &mut std::io::sink(),
            ReplayOptions::default(),
        )
        .unwrap();
        processor.states()
    }

    #[test]
    fn every_replayed_state_round_trips() {
        let states = states();
        assert!(states
            .iter()
            .any(|(_, state)| state.extra.as_ref().is_some_and(|extra| extra.purchases.is_some())));
        assert!(states.iter().any(|(key, _)| key.anonymous));
        let mut bytes = 0;
        for (key, state) in &states {
            let mut out = Vec::new();
            encode_state(state, &mut out);
            bytes += out.len();
            assert_eq!(&decode_state(&out).unwrap(), state, "{key:?}");
            assert_eq!(decode_key(&encode_key(key)).unwrap(), *key);
        }
        // Compact: well under the in-memory size of this mix (about 450 bytes per contact,
        // README "Performance"); measured 260, most of it the attribution identifiers. (It
        // was 189 before anonymous visitors were merged into the contacts they became: the
        // small visitor states that merged are no longer contacts of their own.)
        let average = bytes / states.len();
        assert!(
            average < 290,
            "{average} bytes per contact, {} contacts, {bytes} bytes",
            states.len()
        );
    }

    #[test]
    fn damaged_records_are_errors_never_panics() {
        for (_, state) in states().iter().step_by(37) {
            let mut out = Vec::new();
            encode_state(state, &mut out);
            for cut in 0..out.len() {
                assert!(decode_state(&out[..cut]).is_err(), "cut at {cut}");
            }
            for index in 0..out.len() {
                let mut damaged = out.clone();
                damaged[index] ^= 0xa5;
                let _ = decode_state(&damaged);
            }
        }
        assert_eq!(
            decode_state(&[FORMAT_VERSION + 1]),
            Err(StateDecodeError::Version(FORMAT_VERSION + 1))
        );
        assert!(decode_key(&[7, b'x']).is_err());
        assert!(decode_key(&[]).is_err());
    }

    #[test]
    fn routed_requests_and_handovers_round_trip() {
        let request = Identify {
            contact_id: "c1".into(),
            anonymous_id: "a1".into(),
            occurred_at: Timestamp::from_millis(1_735_689_600_123),
            event_id: "e9".into(),
        };
        let mut visitor = ContactState::new(StageId(0), StageId(0), Timestamp::from_millis(1_735_000_000_000));
        visitor.seq = 1;
        for input in [
            Input::Identify(request.clone()),
            Input::Adopt(Adoption {
                request: request.clone(),
                state: None,
                repeated: false,
            }),
            Input::Adopt(Adoption {
                request: request.clone(),
                state: None,
                repeated: true,
            }),
            Input::Adopt(Adoption {
                request,
                state: Some(Box::new(visitor)),
                repeated: false,
            }),
        ] {
            let mut out = Vec::new();
            encode_routed(&input, &mut out).unwrap();
            assert_eq!(decode_routed(&out).unwrap(), input);
            for cut in 0..out.len() {
                assert!(decode_routed(&out[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn checkpoints_round_trip_and_say_what_is_processed() {
        let checkpoint: Checkpoint = [
            Processed {
                position: Some(1_000),
                above: vec![1_002, 1_003, 1_050],
            },
            Processed::default(),
            Processed {
                position: Some(0),
                above: vec![],
            },
            Processed {
                position: Some(7),
                above: vec![9],
            },
        ];
        let mut out = Vec::new();
        encode_checkpoint(&checkpoint, &mut out);
        assert_eq!(decode_checkpoint(&out).unwrap(), checkpoint);
        for cut in 0..out.len() {
            assert!(decode_checkpoint(&out[..cut]).is_err(), "cut at {cut}");
        }
        let processed = &checkpoint[0];
        assert!(processed.contains(999) && processed.contains(1_002) && processed.contains(1_050));
        assert!(!processed.contains(1_000) && !processed.contains(1_001) && !processed.contains(1_051));
        assert!(!checkpoint[1].contains(0), "nothing read: nothing processed");
    }
}
