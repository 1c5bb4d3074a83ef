//! Restore speed: how fast partitions' shards come back from the state changelog.
//!
//! Replays a generated stream (default 100,000 contacts over a year) to get realistic states,
//! writes N contact records (default 1,000,000: the replayed states, repeated under new keys)
//! to a changelog topic of P partitions (default 64) on librdkafka's in-process mock cluster,
//! then restores every partition as the service does on assignment (read to the end, decode,
//! `Processor::restore` with timers), several at a time. Reports records/s, seconds and the
//! resident memory the restored state takes.
//!
//! The mock cluster keeps about 5 MB per partition, hence many partitions for many contacts.
//!
//! `cargo run --release --example restore_speed -- [CONTACTS] [PARTITIONS] [SOURCE_CONTACTS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{ContactKey, Timestamp};
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::partition::partition_for;
use lifecycle_scorer::process_stats::resident_bytes;
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::replay::{replay, ReplayOptions};
use lifecycle_scorer::service::restore::read_changelog;
use lifecycle_scorer::state::codec::{encode_key, encode_state};
use lifecycle_scorer::state::new_shard;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const TOPIC: &str = "lifecycle.state-changelog";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let contacts: usize = args.next().map_or(Ok(1_000_000), |arg| arg.parse())?;
    let partitions: i32 = args.next().map_or(Ok(64), |arg| arg.parse())?;
    let source_contacts: u64 = args.next().map_or(Ok(100_000), |arg| arg.parse())?;

    // Realistic states from a replayed generated stream.
    let mut lines = Vec::new();
    generate(
        &GenerateOptions {
            contacts: source_contacts,
            days: 365,
            seed: 12,
            start: Timestamp::from_millis(1_735_689_600_000),
        },
        &mut lines,
        None,
    )?;
    let config = Config::builtin()?;
    let engine = Arc::new(config.engine);
    let (_, processor) = replay(
        engine.clone(),
        config.processing,
        &lines[..],
        &mut std::io::sink(),
        &mut std::io::sink(),
        ReplayOptions::default(),
    )?;
    drop(lines);
    let states: Vec<(ContactKey, Vec<u8>)> = processor
        .shard()
        .iter()
        .map(|entry| {
            let mut value = Vec::new();
            encode_state(entry.value(), &mut value);
            (entry.key().clone(), value)
        })
        .collect();
    drop(processor);

    let cluster = MockCluster::new(1).map_err(|error| anyhow::anyhow!("{error}"))?;
    let bootstrap = cluster.bootstrap_servers();
    cluster
        .create_topic(TOPIC, partitions, 1)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let written = Instant::now();
    let mut bytes = 0usize;
    let mut pending = Vec::with_capacity(100_000);
    for index in 0..contacts {
        let (key, value) = &states[index % states.len()];
        let key = ContactKey {
            id: format!("{}-{}", key.id, index / states.len()).into(),
            anonymous: key.anonymous,
        };
        let partition = partition_for(key.id.as_bytes(), partitions as u32) as i32;
        let encoded_key = encode_key(&key);
        bytes += encoded_key.len() + value.len();
        let record = FutureRecord::to(TOPIC)
            .key(&encoded_key)
            .payload(value)
            .partition(partition);
        pending.push(producer.send_result(record).map_err(|(error, _)| error)?);
        if pending.len() == pending.capacity() {
            for delivery in pending.drain(..) {
                let _ = delivery.await;
            }
        }
    }
    for delivery in pending {
        let _ = delivery.await;
    }
    let write_seconds = written.elapsed().as_secs_f64();

    // Restore every partition, four at a time, as the service does on assignment.
    let rss_before = resident_bytes().unwrap_or(0);
    let started = Instant::now();
    let shard = Arc::new(new_shard(contacts));
    let mut restored_records = 0u64;
    let mut restored_contacts = 0usize;
    for chunk in (0..partitions).collect::<Vec<_>>().chunks(4) {
        let reads: Vec<_> = chunk
            .iter()
            .map(|partition| {
                let mut client = ClientConfig::new();
                client
                    .set("bootstrap.servers", &bootstrap)
                    .set("group.id", "restore-speed");
                let partition = *partition;
                tokio::task::spawn_blocking(move || read_changelog(client, TOPIC, partition))
            })
            .collect();
        for read in reads {
            let restored = read.await??;
            restored_records += restored.records;
            let mut target = Processor::new(engine.clone(), shard.clone(), config.processing);
            for (key, state) in restored.contacts {
                target.restore(key, Box::new(state));
                restored_contacts += 1;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss_after = resident_bytes().unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "contacts_written": contacts,
            "partitions": partitions,
            "changelog_bytes": bytes,
            "bytes_per_record": bytes as f64 / contacts as f64,
            "write_seconds": write_seconds,
            "restored_records": restored_records,
            "restored_contacts": restored_contacts,
            "restore_seconds": seconds,
            "records_per_second": restored_records as f64 / seconds,
            "resident_growth_bytes": rss_after.saturating_sub(rss_before),
            "resident_bytes_per_contact": rss_after.saturating_sub(rss_before) as f64 / restored_contacts.max(1) as f64,
        })
    );
    Ok(())
}
