//! Restoring a partition from its changelog encoding: a processor rebuilt from the encoded
//! states of another, mid-stream, goes on exactly as the original would have (same stage
//! changes, timers included; same final states).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::service::generated_events;
use lifecycle_scorer::codec::json::StageChangeRecord;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{StageChange, Timestamp};
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::state::codec::{decode_key, decode_state, encode_key, encode_state};
use lifecycle_scorer::state::new_shard;

fn canonical(changes: &[StageChange], config: &Config) -> Vec<String> {
    let mut out: Vec<String> = changes
        .iter()
        .map(|change| serde_json::to_string(&StageChangeRecord::new(change, &config.engine.model)).unwrap())
        .collect();
    out.sort();
    out
}

#[test]
fn a_processor_restored_mid_stream_goes_on_as_the_original() {
    let config = Config::builtin().unwrap();
    let engine = Arc::new(config.engine.clone());
    let events = generated_events(2_000, 300, 21);
    let end = Timestamp::from_millis(1_735_689_600_000 + 320 * 86_400_000);
    for split in [events.len() / 3, events.len() * 2 / 3] {
        // The original, straight through.
        let mut original = Processor::new(engine.clone(), Arc::new(new_shard(0)), config.processing);
        let mut expected = Vec::new();
        for event in &events {
            original.process(event, &mut expected);
        }
        original.advance_to(end, &mut expected);

        // The same up to `split`, then every state through the changelog encoding.
        let mut before = Processor::new(engine.clone(), Arc::new(new_shard(0)), config.processing);
        let mut got = Vec::new();
        for event in &events[..split] {
            before.process(event, &mut got);
        }
        let records: Vec<(Vec<u8>, Vec<u8>)> = before
            .shard()
            .iter()
            .map(|entry| {
                let mut value = Vec::new();
                encode_state(entry.value(), &mut value);
                (encode_key(entry.key()), value)
            })
            .collect();
        drop(before);
        let mut restored = Processor::new(engine.clone(), Arc::new(new_shard(0)), config.processing);
        for (key, value) in &records {
            restored.restore(decode_key(key).unwrap(), Box::new(decode_state(value).unwrap()));
        }
        for event in &events[split..] {
            restored.process(event, &mut got);
        }
        restored.advance_to(end, &mut got);

        assert!(expected.len() > 5_000, "{} changes", expected.len());
        assert_eq!(
            canonical(&got, &config),
            canonical(&expected, &config),
            "split at {split}"
        );
        assert_eq!(restored.shard().len(), original.shard().len());
        let have: BTreeMap<_, _> = restored.states().into_iter().collect();
        for (key, want) in original.states() {
            assert_eq!(have.get(&key), Some(&want), "{key:?}");
        }

        // A forgotten contact is gone, timers included.
        let key = records
            .iter()
            .map(|(key, _)| decode_key(key).unwrap())
            .find(|key| restored.shard().get(key).is_some())
            .unwrap();
        assert!(restored.forget(&key).is_some());
        assert!(restored.shard().get(&key).is_none());
        let mut later = Vec::new();
        restored.advance_to(end.plus_millis(400 * 86_400_000), &mut later);
        assert!(later.iter().all(|change| change.key != key));
    }
}
