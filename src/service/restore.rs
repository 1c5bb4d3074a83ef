//! Rebuilding a partition's shard from its changelog partition when it is assigned.
//!
//! The changelog partition is read from its start to the end offset seen when the restore
//! begins; each contact's latest record wins (a tombstone removes it), and the last checkpoint
//! says which inputs the restored states already reflect, so the task skips those. Records
//! delivered twice (some brokers re-send after compaction) are dropped by offset.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::domain::{ContactKey, ContactState};
use crate::state::codec::{
    decode_checkpoint, decode_handover, decode_key, decode_state, Checkpoint, CHECKPOINT_KEY, HANDOVER_KIND,
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
}

/// Reads changelog partition `partition` of `topic` (blocking: run it off the async runtime).
pub fn read_changelog(mut config: ClientConfig, topic: &str, partition: i32) -> anyhow::Result<Restored> {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "0");
    let consumer: BaseConsumer = config.create().context("cannot create the restore consumer")?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(30))
        .with_context(|| format!("cannot read the end of changelog partition {partition}"))?;
    let mut restored = Restored::default();
    if high <= low {
        return Ok(restored);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
    consumer.assign(&assignment)?;
    let mut latest: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let mut checkpoint = None;
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
                restored.records += 1;
                let key = message.key().unwrap_or_default();
                if key == CHECKPOINT_KEY {
                    checkpoint = message.payload().map(<[u8]>::to_vec);
                } else {
                    latest.insert(key.to_vec(), message.payload().map(<[u8]>::to_vec));
                }
            }
            Some(Err(error)) => tracing::warn!(topic, partition, %error, "reading the changelog"),
            None if last_progress.elapsed() > Duration::from_secs(120) => {
                bail!("changelog partition {partition}: no progress for 120 s at offset {next} of {high}")
            }
            None => {}
        }
    }
    if let Some(bytes) = checkpoint {
        restored.checkpoint = decode_checkpoint(&bytes).context("the changelog's checkpoint")?;
    }
    for (key, value) in latest {
        let Some(value) = value else { continue };
        if key.first() == Some(&HANDOVER_KIND) {
            restored
                .handovers
                .push(decode_handover(&key, &value).context("a changelog handover marker")?);
            continue;
        }
        let contact = decode_key(&key).context("a changelog key")?;
        let state = decode_state(&value).with_context(|| format!("the changelog state of {contact:?}"))?;
        restored.contacts.push((contact, state));
    }
    Ok(restored)
}
