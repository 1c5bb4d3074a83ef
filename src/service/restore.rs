//! Rebuilding a partition's shard from its changelog partition when it is assigned.
//!
//! The changelog partition is read from its start to the end offset seen when the restore
//! begins; each contact's latest record wins (a tombstone removes it), and the last checkpoint
//! says which inputs the restored states already reflect, so the task skips those. Records
//! delivered twice (some brokers re-send after compaction) are dropped by offset.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::domain::{ContactKey, ContactState, Input};
use crate::service::kafka::HelperContext;
use crate::state::codec::{
    decode_checkpoint, decode_handover, decode_key, decode_state, Checkpoint, CHECKPOINT_KEY, HANDOVER_KIND,
    WRITE_BEGUN_KEY,
};

/// What a changelog partition holds.
#[derive(Debug, Default)]
pub struct Restored {
    /// Every live contact's latest state.
    pub contacts: Vec<(ContactKey, ContactState)>,
    /// The inputs those states reflect.
    pub checkpoint: Checkpoint,
    /// Changelog records read.
    pub records: u64,
    /// Anonymous visitors handed to a contact: (anonymous id, contact id).
    pub handovers: Vec<(String, String)>,
    /// When the last write of states was cut short: the contacts it reached, whose states
    /// reflect more inputs than `checkpoint` says.
    pub ahead: Option<Ahead>,
}

/// The contacts an interrupted changelog write reached, and the inputs their states reflect.
///
/// A write is: a [`WRITE_BEGUN_KEY`] record naming the checkpoint it completes, the changed
/// states, then that checkpoint under [`CHECKPOINT_KEY`]. A crash in between leaves some
/// states written and the checkpoint not: those contacts already reflect the inputs between
/// the two checkpoints, the others do not. Reprocessing such an input for a contact it already
/// reached would apply it twice (the recent-event memory only covers a contact's last few), so
/// the task skips it for those contacts alone.
#[derive(Debug, Default)]
pub struct Ahead {
    /// The checkpoint the interrupted write was completing.
    pub checkpoint: Checkpoint,
    /// The contacts whose state it wrote (tombstones included).
    pub contacts: HashSet<ContactKey>,
}

impl Ahead {
    /// True when the restored state reflects all of `input` (at `offset` of `lane`). A
    /// deletion naming two contacts, one of which the write reached, is cut down to the other.
    pub fn reflects(&self, lane: usize, offset: i64, input: &mut Input) -> bool {
        if !self.checkpoint[lane].contains(offset) {
            return false;
        }
        let reached = |key: ContactKey| self.contacts.contains(&key);
        match input {
            Input::Event(event) => event.key().is_some_and(reached),
            Input::Identify(request) => reached(ContactKey::anonymous(request.anonymous_id.clone())),
            Input::Adopt(adoption) => reached(ContactKey::contact(adoption.request.contact_id.clone())),
            Input::Erase(erasure) => {
                if erasure
                    .contact_id
                    .clone()
                    .is_some_and(|id| reached(ContactKey::contact(id)))
                {
                    erasure.contact_id = None;
                }
                if erasure
                    .anonymous_id
                    .clone()
                    .is_some_and(|id| reached(ContactKey::anonymous(id)))
                {
                    erasure.anonymous_id = None;
                }
                erasure.contact_id.is_none() && erasure.anonymous_id.is_none()
            }
        }
    }
}

/// Folds a changelog partition's records, in offset order, into what it holds.
#[derive(Debug, Default)]
pub struct ChangelogFold {
    /// Key -> (offset, value) of its latest record (`None`: tombstone).
    latest: BTreeMap<Vec<u8>, (i64, Option<Vec<u8>>)>,
    checkpoint: Option<(i64, Vec<u8>)>,
    begun: Option<(i64, Vec<u8>)>,
    records: u64,
}

impl ChangelogFold {
    /// Takes the next record.
    pub fn push(&mut self, offset: i64, key: &[u8], value: Option<&[u8]>) {
        self.records += 1;
        let value = value.map(<[u8]>::to_vec);
        if key == CHECKPOINT_KEY {
            self.checkpoint = value.map(|value| (offset, value));
        } else if key == WRITE_BEGUN_KEY {
            self.begun = value.map(|value| (offset, value));
        } else {
            self.latest.insert(key.to_vec(), (offset, value));
        }
    }

    /// What the records hold.
    pub fn finish(self) -> anyhow::Result<Restored> {
        let mut restored = Restored {
            records: self.records,
            ..Restored::default()
        };
        let completed = self.checkpoint.as_ref().map(|(offset, _)| *offset);
        if let Some((_, bytes)) = &self.checkpoint {
            restored.checkpoint = decode_checkpoint(bytes).context("the changelog's checkpoint")?;
        }
        // A write begun after the last checkpoint was cut short.
        let interrupted = self
            .begun
            .filter(|(begun, _)| completed.is_none_or(|completed| *begun > completed));
        let mut ahead = match &interrupted {
            Some((_, bytes)) => Some(Ahead {
                checkpoint: decode_checkpoint(bytes).context("the changelog's interrupted write")?,
                contacts: HashSet::new(),
            }),
            None => None,
        };
        for (key, (offset, value)) in self.latest {
            if key.first() == Some(&HANDOVER_KIND) {
                if let Some(value) = value {
                    restored
                        .handovers
                        .push(decode_handover(&key, &value).context("a changelog handover marker")?);
                }
                continue;
            }
            let contact = decode_key(&key).context("a changelog key")?;
            if let (Some(ahead), Some((begun, _))) = (&mut ahead, &interrupted) {
                if offset > *begun {
                    ahead.contacts.insert(contact.clone());
                }
            }
            let Some(value) = value else { continue };
            let state = decode_state(&value).with_context(|| format!("the changelog state of {contact:?}"))?;
            restored.contacts.push((contact, state));
        }
        restored.ahead = ahead;
        Ok(restored)
    }
}

/// Reads changelog partition `partition` of `topic` (blocking: run it off the async runtime).
pub fn read_changelog(mut config: ClientConfig, topic: &str, partition: i32) -> anyhow::Result<Restored> {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "0");
    let consumer: BaseConsumer<HelperContext> = config
        .create_with_context(HelperContext)
        .context("cannot create the restore consumer")?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(30))
        .with_context(|| format!("cannot read the end of changelog partition {partition}"))?;
    let mut fold = ChangelogFold::default();
    if high <= low {
        return fold.finish();
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&assignment)?;
    let mut next = low;
    let mut last_progress = Instant::now();
    while next < high {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                if message.offset() < next {
                    continue; // delivered again
                }
                next = message.offset() + 1;
                fold.push(message.offset(), message.key().unwrap_or_default(), message.payload());
            }
            Some(Err(error)) => tracing::warn!(topic, partition, %error, "reading the changelog"),
            None if last_progress.elapsed() > Duration::from_secs(120) => {
                bail!("changelog partition {partition}: no progress for 120 s at offset {next} of {high}")
            }
            None => {}
        }
    }
    fold.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::json::decode_event;
    use crate::config::Config;
    use crate::domain::Erasure;
    use crate::state::codec::{encode_checkpoint, encode_key, encode_state, Processed};

    fn checkpoint(clickstream_position: i64) -> Vec<u8> {
        let mut checkpoint = Checkpoint::default();
        checkpoint[0] = Processed {
            position: Some(clickstream_position),
            above: Vec::new(),
        };
        let mut out = Vec::new();
        encode_checkpoint(&checkpoint, &mut out);
        out
    }

    fn state() -> Vec<u8> {
        let config = Config::builtin().unwrap();
        let mut out = Vec::new();
        encode_state(
            &config
                .engine
                .new_contact(crate::domain::Timestamp::from_millis(1_735_689_600_000)),
            &mut out,
        );
        out
    }

    fn event(contact: &str) -> Input {
        let line = format!(
            r#"{{"source":"clickstream","event_id":"e-{contact}","contact_id":"{contact}","occurred_at":"2025-01-01T00:00:00Z","type":"page_view"}}"#
        );
        Input::Event(decode_event(line.as_bytes()).unwrap())
    }

    /// Two complete writes, then one cut short after its first state.
    fn interrupted() -> Restored {
        let (a, b, c) = (
            ContactKey::contact("a"),
            ContactKey::contact("b"),
            ContactKey::contact("c"),
        );
        let mut fold = ChangelogFold::default();
        let records: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
            (WRITE_BEGUN_KEY.to_vec(), Some(checkpoint(10))),
            (encode_key(&a), Some(state())),
            (encode_key(&b), Some(state())),
            (CHECKPOINT_KEY.to_vec(), Some(checkpoint(10))),
            (WRITE_BEGUN_KEY.to_vec(), Some(checkpoint(20))),
            (encode_key(&a), None),
            (encode_key(&c), Some(state())),
        ];
        for (offset, (key, value)) in records.iter().enumerate() {
            fold.push(offset as i64, key, value.as_deref());
        }
        fold.finish().unwrap()
    }

    #[test]
    fn a_complete_write_leaves_nothing_ahead() {
        let mut fold = ChangelogFold::default();
        fold.push(0, &WRITE_BEGUN_KEY, Some(&checkpoint(5)));
        fold.push(1, &encode_key(&ContactKey::contact("a")), Some(&state()));
        fold.push(2, &CHECKPOINT_KEY, Some(&checkpoint(5)));
        let restored = fold.finish().unwrap();
        assert!(restored.ahead.is_none());
        assert_eq!(restored.checkpoint[0].position, Some(5));
        assert_eq!(restored.contacts.len(), 1);
        assert_eq!(restored.records, 3);
    }

    #[test]
    fn a_write_cut_short_names_the_contacts_it_reached() {
        let restored = interrupted();
        assert_eq!(restored.checkpoint[0].position, Some(10));
        let ahead = restored.ahead.expect("the last write was cut short");
        assert_eq!(ahead.checkpoint[0].position, Some(20));
        let mut reached: Vec<_> = ahead.contacts.iter().map(|key| key.id.to_string()).collect();
        reached.sort();
        assert_eq!(
            reached,
            ["a", "c"],
            "a tombstone counts, b was written by the complete write"
        );
        let mut live: Vec<_> = restored.contacts.iter().map(|(key, _)| key.id.to_string()).collect();
        live.sort();
        assert_eq!(live, ["b", "c"]);
    }

    #[test]
    fn inputs_the_interrupted_write_reflects_are_skipped_for_the_contacts_it_reached() {
        let ahead = interrupted().ahead.unwrap();
        // Between the two checkpoints: skipped for c, applied for b.
        assert!(ahead.reflects(0, 15, &mut event("c")));
        assert!(!ahead.reflects(0, 15, &mut event("b")));
        // After the interrupted write's checkpoint, or on another lane: applied.
        assert!(!ahead.reflects(0, 20, &mut event("c")));
        assert!(!ahead.reflects(1, 15, &mut event("c")));
        // A deletion naming a reached and an unreached contact keeps the unreached one.
        let erasure = Erasure {
            request_id: "r".into(),
            contact_id: Some("a".into()),
            anonymous_id: Some("v".into()),
            occurred_at: crate::domain::Timestamp::from_millis(1_735_689_600_000),
        };
        let mut both = Input::Erase(erasure.clone());
        assert!(!ahead.reflects(0, 15, &mut both));
        match both {
            Input::Erase(left) => {
                assert_eq!(left.contact_id, None);
                assert_eq!(left.anonymous_id.as_deref(), Some("v"));
            }
            other => panic!("expected the anonymous half of the erasure, got {other:?}"),
        }
        let reached_only = Erasure {
            anonymous_id: None,
            ..erasure
        };
        assert!(ahead.reflects(0, 15, &mut Input::Erase(reached_only)));
    }
}
