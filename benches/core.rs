//! Criterion benches of the pure core on fixed inputs: applying events (engine + processor),
//! churn scoring, JSON and Avro decoding, and shard routing.
//!
//! The event stream comes from `generate` with a fixed seed, decoded once up front, so the
//! apply bench measures the decode-free core.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lifecycle_scorer::codec::avro::{schema_file, SchemaStore};
use lifecycle_scorer::codec::json::decode_event;
use lifecycle_scorer::codec::parse_time_argument;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{ContactEvent, ContactKey, Source, MILLIS_PER_DAY};
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::state::new_shard;

fn stream(contacts: u64) -> (Vec<Vec<u8>>, Vec<ContactEvent>) {
    let options = GenerateOptions {
        contacts,
        days: 365,
        seed: 42,
        start: parse_time_argument("2025-01-01").expect("date"),
    };
    let mut bytes = Vec::new();
    generate(&options, &mut bytes, None).expect("generate");
    let lines: Vec<Vec<u8>> = bytes
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let events = lines
        .iter()
        .map(|line| decode_event(line).expect("generated lines decode"))
        .collect();
    (lines, events)
}

fn schema_id(source: Source) -> u32 {
    match source {
        Source::Clickstream => 1,
        Source::AdConversion => 2,
        Source::Purchase => 3,
    }
}

fn schema_store() -> SchemaStore {
    let mut store = SchemaStore::new();
    for source in Source::ALL {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(schema_file(source));
        store.insert_file(schema_id(source), &path).expect("shipped schema");
    }
    store
}

fn bench_apply(c: &mut Criterion) {
    let config = Config::builtin().expect("default config");
    let engine = Arc::new(config.engine);
    let (lines, events) = stream(20_000);
    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(20);
    group.bench_function("process_events", |b| {
        b.iter_batched(
            || Processor::new(engine.clone(), Arc::new(new_shard(25_000)), config.processing),
            |mut processor| {
                let mut out = Vec::with_capacity(64);
                for event in &events {
                    processor.process(event, &mut out);
                    out.clear();
                }
                processor
            },
            BatchSize::LargeInput,
        );
    });
    group.bench_function("decode_json", |b| {
        b.iter(|| {
            for line in &lines {
                black_box(decode_event(black_box(line)).ok());
            }
        });
    });
    // The Kafka wire format: Confluent-framed Avro with the shipped schemas.
    let store = schema_store();
    let records: Vec<(Source, Vec<u8>)> = events
        .iter()
        .map(|event| {
            let source = event.source();
            (source, store.encode(schema_id(source), event).expect("encode"))
        })
        .collect();
    group.bench_function("decode_avro", |b| {
        b.iter(|| {
            for (source, record) in &records {
                black_box(store.decode(*source, black_box(record)).ok());
            }
        });
    });
    group.bench_function("decode_avro_and_process", |b| {
        b.iter_batched(
            || Processor::new(engine.clone(), Arc::new(new_shard(25_000)), config.processing),
            |mut processor| {
                let mut out = Vec::with_capacity(64);
                for (source, record) in &records {
                    if let Ok(event) = store.decode(*source, record) {
                        processor.process(&event, &mut out);
                    }
                    out.clear();
                }
                processor
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

fn bench_scoring(c: &mut Criterion) {
    let config = Config::builtin().expect("default config");
    let engine = Arc::new(config.engine);
    let (_, events) = stream(5_000);
    let mut processor = Processor::new(engine.clone(), Arc::new(new_shard(0)), config.processing);
    let mut out = Vec::new();
    for event in &events {
        processor.process(event, &mut out);
    }
    // A repeat buyer's state, scored a month after the stream.
    let buyer = processor
        .shard()
        .iter()
        .find(|entry| {
            entry
                .value()
                .purchase_history()
                .is_some_and(|history| history.repeat_days >= 2)
        })
        .map(|entry| entry.value().clone())
        .expect("a repeat buyer in the stream");
    let now = processor.watermark().plus_millis(30 * MILLIS_PER_DAY);
    let mut group = c.benchmark_group("scoring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("churn_risk", |b| {
        b.iter(|| black_box(engine.scorer.purchase_risk(black_box(&buyer), now)))
    });
    group.bench_function("full_score", |b| {
        b.iter(|| black_box(engine.scorer.score(black_box(&buyer), now)))
    });
    group.finish();

    let keys: Vec<ContactKey> = processor.shard().iter().map(|entry| entry.key().clone()).collect();
    let mut group = c.benchmark_group("shard");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("lookup", |b| {
        b.iter(|| {
            for key in &keys {
                black_box(processor.shard().get(key).map(|state| state.seq));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, bench_apply, bench_scoring);
criterion_main!(benches);
