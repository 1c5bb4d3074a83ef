//! `run --embedded`: the whole service with no external broker.
//!
//! Starts librdkafka's mock cluster in process, creates the topics, feeds it a generated
//! stream (Confluent-framed Avro with the shipped schemas, ids 1-3 as the built-in default
//! configuration maps them), and runs the service against it with the same HTTP endpoints.
//! With `exit_when_done` it stops once every fed record is processed and reports throughput,
//! latency and CPU: the end-to-end benchmark.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::Serialize;

use super::RunOptions;
use crate::codec::json::decode_event;
use crate::codec::output::{shipped_input_schema_id, shipped_input_store};
use crate::config::{Config, InputFormat};
use crate::domain::{Source, Timestamp};
use crate::generate::{generate, GenerateOptions};
use crate::metrics::Metrics;
use crate::process_stats::cpu_seconds;

/// What to feed and how to run.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Contacts in the generated stream.
    pub contacts: u64,
    /// Days the stream spans.
    pub days: u32,
    /// Generator seed.
    pub seed: u64,
    /// Partitions of every topic.
    pub partitions: i32,
    /// Records per second fed to the inputs; 0 feeds as fast as the broker takes them.
    pub rate: u64,
    /// Stop when every fed record is processed, and report.
    pub exit_when_done: bool,
    /// Where the HTTP endpoints listen.
    pub listen: SocketAddr,
}

/// The end-to-end figures of an embedded run.
#[derive(Clone, Debug, Serialize)]
pub struct EmbeddedReport {
    /// Records fed to the input topics.
    pub records: u64,
    /// Partitions per topic.
    pub partitions: i32,
    /// From the service's start until every fed record was processed, seconds (joining the
    /// consumer group included).
    pub seconds: f64,
    /// From the first record processed until every fed record was, seconds (without `rate`,
    /// every record was fed before the service started).
    pub processing_seconds: f64,
    /// Records per second over `processing_seconds`.
    pub records_per_second: f64,
    /// Stage changes acknowledged by the broker.
    pub stage_changes: u64,
    /// Conversion records acknowledged.
    pub conversions: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Broker append to outputs acknowledged, seconds: median and 99th percentile (from the
    /// histogram's buckets, interpolated as Prometheus's `histogram_quantile` does).
    pub latency_p50_seconds: f64,
    /// 99th percentile of the same.
    pub latency_p99_seconds: f64,
    /// Process CPU time (user + system) over the run, seconds.
    pub cpu_seconds: f64,
    /// CPU microseconds per record.
    pub cpu_micros_per_record: f64,
}

/// Runs the embedded service. Returns the report when `exit_when_done`, else runs until
/// `shutdown`.
pub async fn run_embedded(
    mut config: Config,
    options: EmbeddedOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Option<EmbeddedReport>> {
    let cluster = MockCluster::new(1).map_err(|error| anyhow!("cannot start the mock cluster: {error}"))?;
    let bootstrap = cluster.bootstrap_servers();
    let topics = config.service.topics.clone();
    for topic in topics.inputs.iter().chain([
        &topics.stage_changes,
        &topics.conversions,
        &topics.dead_letters,
        &topics.instances,
        // The mock broker has no admin API for the service to create these with.
        &topics.changelog,
        &topics.identity,
    ]) {
        cluster
            .create_topic(topic, options.partitions, 1)
            .map_err(|error| anyhow!("cannot create topic {topic}: {error}"))?;
    }
    config.service.kafka.bootstrap_servers = bootstrap.clone();
    config.service.input_formats = [InputFormat::Avro; 3];
    // The mock broker holds a fetch for its whole wait when no data is there (a real broker
    // answers as soon as data arrives): keep that wait short.
    config
        .service
        .kafka
        .consumer_properties
        .insert("fetch.wait.max.ms".into(), "10".into());
    tracing::info!(bootstrap, partitions = options.partitions, "mock cluster started");

    let records = encode_stream(&options)?;
    let total = records.len() as u64;
    tracing::info!(
        records = total,
        contacts = options.contacts,
        "generated the input stream"
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("cannot create the feeding producer")?;

    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let run_options = RunOptions {
        config_dir: std::path::PathBuf::from("."),
        now: crate::http::wall_clock,
    };
    let metrics_slot: Arc<std::sync::OnceLock<Arc<Metrics>>> = Arc::default();
    // At a fixed rate the figures are the service's latency when it keeps up, so feeding starts
    // once it is consuming. As fast as possible for a report, everything is fed before the
    // service starts, so the figures are its catch-up alone.
    let feeder = tokio::spawn(feed(
        producer,
        topics.inputs.clone(),
        records,
        options.rate,
        (options.rate > 0).then(|| metrics_slot.clone()),
    ));
    let feeder = if options.exit_when_done && options.rate == 0 {
        let _ = feeder.await;
        None
    } else {
        Some(feeder)
    };
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(f64, f64)>();
    let stop = {
        let exit_when_done = options.exit_when_done;
        let metrics_slot = metrics_slot.clone();
        async move {
            if exit_when_done {
                let seconds = wait_until_processed(metrics_slot, total, started).await;
                let _ = done_tx.send(seconds);
            } else {
                shutdown.await;
            }
        }
    };
    let metrics = run_with_slot(config, run_options, listener, stop, metrics_slot).await?;
    if let Some(feeder) = feeder {
        feeder.abort();
    }
    drop(cluster);
    let Ok((seconds, processing_seconds)) = done_rx.await else {
        return Ok(None);
    };
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map_or(0.0, |(after, before)| after - before);
    let sum = |counter: &prometheus::IntCounterVec, topic: &str| {
        counter
            .get_metric_with_label_values(&[topic])
            .map_or(0, |metric| metric.get())
    };
    Ok(Some(EmbeddedReport {
        records: total,
        partitions: options.partitions,
        seconds,
        processing_seconds,
        records_per_second: total as f64 / processing_seconds.max(1e-9),
        stage_changes: sum(&metrics.records_produced, &topics.stage_changes),
        conversions: sum(&metrics.records_produced, &topics.conversions),
        dead_letters: topics
            .inputs
            .iter()
            .map(|topic| sum(&metrics.dead_letters, topic))
            .sum(),
        latency_p50_seconds: histogram_quantile(&metrics.record_latency, 0.5),
        latency_p99_seconds: histogram_quantile(&metrics.record_latency, 0.99),
        cpu_seconds: cpu,
        cpu_micros_per_record: cpu * 1e6 / total.max(1) as f64,
    }))
}

/// `run`, publishing its metrics registry as soon as it exists (the done-watcher reads it).
async fn run_with_slot(
    config: Config,
    options: RunOptions,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
    slot: Arc<std::sync::OnceLock<Arc<Metrics>>>,
) -> anyhow::Result<Arc<Metrics>> {
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    let _ = slot.set(metrics.clone());
    super::run_with_metrics(config, options, listener, stop, metrics).await
}

/// Waits until `total` records are processed; returns the seconds since `started` and since
/// the first record was processed.
async fn wait_until_processed(
    slot: Arc<std::sync::OnceLock<Arc<Metrics>>>,
    total: u64,
    started: Instant,
) -> (f64, f64) {
    let mut last_report = Instant::now();
    let mut first: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(metrics) = slot.get() else { continue };
        let consumed: u64 = prometheus::core::Collector::collect(&metrics.events_consumed)
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum();
        if consumed > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if consumed >= total {
            let processing = first.map_or(0.0, |first| first.elapsed().as_secs_f64());
            return (started.elapsed().as_secs_f64(), processing);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(consumed, total, "progress");
        }
    }
}

/// The generated stream as (source, key, Avro record), in event order.
/// One input record to feed: its source, key and framed Avro payload.
type Feed = (Source, Vec<u8>, Vec<u8>);

fn encode_stream(options: &EmbeddedOptions) -> anyhow::Result<Vec<Feed>> {
    let mut lines = Vec::new();
    generate(
        &GenerateOptions {
            contacts: options.contacts,
            days: options.days,
            seed: options.seed,
            start: Timestamp::from_millis(1_735_689_600_000),
        },
        &mut lines,
        None,
    )?;
    let store = shipped_input_store()?;
    let mut records = Vec::new();
    for line in lines.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
        // The generator's deliberately bad lines have no place in an Avro topic.
        let Ok(event) = decode_event(line) else { continue };
        let Some(key) = event.key() else { continue };
        let record = store.encode(shipped_input_schema_id(event.source()), &event)?;
        records.push((event.source(), key.id.as_bytes().to_vec(), record));
    }
    Ok(records)
}

async fn feed(
    producer: FutureProducer,
    inputs: [String; 3],
    records: Vec<Feed>,
    rate: u64,
    wait_ready: Option<Arc<std::sync::OnceLock<Arc<Metrics>>>>,
) {
    if let Some(slot) = wait_ready {
        while slot.get().is_none_or(|metrics| metrics.ready.get() == 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let started = Instant::now();
    let mut pending = Vec::with_capacity(4096);
    for (index, (source, key, payload)) in records.iter().enumerate() {
        if rate > 0 {
            let due = Duration::from_secs_f64(index as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let mut record = FutureRecord::to(&inputs[source.index()]).key(key).payload(payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        if pending.len() >= 4096 {
            for delivery in pending.drain(..) {
                let _ = delivery.await;
            }
        }
    }
    for delivery in pending {
        let _ = delivery.await;
    }
    tracing::info!(
        records = records.len(),
        seconds = started.elapsed().as_secs_f64(),
        "input fed"
    );
}

/// The q-quantile of a histogram, interpolated within its bucket as Prometheus does.
pub fn histogram_quantile(histogram: &prometheus::Histogram, q: f64) -> f64 {
    let families = prometheus::core::Collector::collect(histogram);
    let Some(metric) = families.first().and_then(|family| family.get_metric().first()) else {
        return f64::NAN;
    };
    let proto = metric.get_histogram();
    let count = proto.get_sample_count() as f64;
    if count == 0.0 {
        return f64::NAN;
    }
    let rank = q * count;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for bucket in proto.get_bucket() {
        let upper = bucket.upper_bound();
        let cumulative = bucket.cumulative_count() as f64;
        if cumulative >= rank {
            let in_bucket = cumulative - lower_count;
            if in_bucket <= 0.0 {
                return upper;
            }
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / in_bucket;
        }
        lower_bound = upper;
        lower_count = cumulative;
    }
    lower_bound
}
