//! `run`: the Kafka service around the core.
//!
//! The instances share the changelog's partitions through one consumer group (any assignor,
//! cooperative-sticky by default); the owner of changelog partition p owns partition p of
//! every input topic, read by a task with its own state shard (see [`task`], [`kafka`]). A
//! coordinator starts tasks on assignment and drains them on revocation and shutdown; the
//! HTTP server reads the shards. Delivery: an input position is finished only after every
//! output it caused is acknowledged (idempotent producer, acks=all) and the changelog holds
//! the state it made, with a checkpoint of the positions; the next owner starts there. The
//! positions are also committed to the group, for lag tooling, every
//! `auto.commit.interval.ms`, synchronously on revocation and shutdown.

pub mod embedded;
mod kafka;
mod offsets;
pub mod owners;
pub mod restore;
mod schemas;
mod task;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::Consumer;
use rdkafka::producer::Producer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use offsets::OffsetTracker;

use crate::codec::output::OutputEncoder;
use crate::config::{Config, OutputFormat, ServiceConfig};
use crate::domain::Timestamp;
use crate::http::{serve, OwnedShards, QueryState};
use crate::metrics::Metrics;
use crate::state::{new_shard, Shard};
use kafka::{GroupEvent, ReaderContext, ServiceContext};
use task::{run_task, Control, Shared};

/// What `run` needs besides the configuration.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Directory relative schema paths are resolved against (the config file's).
    pub config_dir: std::path::PathBuf,
    /// The wall clock (fixed in some tests).
    pub now: fn() -> Timestamp,
}

/// A running partition task.
struct TaskHandle {
    control: mpsc::Sender<Control>,
    join: JoinHandle<()>,
    shard: Arc<Shard>,
}

/// Runs the service until `shutdown` completes, then stops within the configured bound.
/// Returns the metrics registry.
pub async fn run(
    config: Config,
    options: RunOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Arc<Metrics>> {
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    run_with_metrics(config, options, listener, shutdown, metrics).await
}

/// [`run`] recording into `metrics`.
pub async fn run_with_metrics(
    config: Config,
    options: RunOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<Metrics>> {
    let service = Arc::new(config.service);
    let engine = Arc::new(config.engine);
    let schemas = Arc::new(schemas::Schemas::load(&service.schemas, &options.config_dir)?);
    let encoder = match (service.output_format, service.output_schema_ids) {
        (OutputFormat::Avro, Some((stage_change, conversion))) => OutputEncoder::avro(stage_change, conversion)?,
        _ => OutputEncoder::json(),
    };
    let producer = kafka::create_producer(&service.kafka).context("cannot create the producer")?;
    let partitions = check_topics(&producer, &service).await?;

    let (events, mut group_events) = mpsc::unbounded_channel();
    let brokers_up = Arc::new(AtomicBool::new(true));
    let context = ServiceContext::new(
        service.topics.clone(),
        metrics.clone(),
        events,
        brokers_up.clone(),
        service.tasks.shutdown_timeout,
    );
    let consumer = kafka::create_group_consumer(&service.kafka, context).context("cannot create the group consumer")?;
    let reader = kafka::create_reader(
        &service.kafka,
        ReaderContext::new(service.topics.clone(), metrics.clone(), brokers_up.clone()),
    )
    .context("cannot create the input reader")?;
    consumer
        .subscribe(&[service.topics.changelog.as_str()])
        .context("cannot subscribe to the changelog topic")?;

    let directory = Arc::new(owners::InstanceDirectory::new(
        advertised_url(&service.advertised_url, listener.local_addr()?),
        launch_token((options.now)()),
    ));
    let following = tokio::spawn(owners::follow(
        kafka::reader_config(&service.kafka),
        service.topics.instances.clone(),
        directory.clone(),
    ));
    let shards = Arc::new(OwnedShards::new(partitions));
    let ready = Arc::new(AtomicBool::new(false));
    let query = Arc::new(QueryState {
        engine: engine.clone(),
        shards: shards.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        now: options.now,
        owners: Some(directory.clone()),
    });
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(
        listen = %listener.local_addr()?,
        advertised_url = directory.own_url(),
        "HTTP endpoints: /metrics /healthz /readyz /contacts/{{id}} /stages"
    );
    let http = tokio::spawn(serve(listener, query, async {
        let _ = http_stopped.await;
    }));

    let stop_main_queue = Arc::new(AtomicBool::new(false));
    let main_queues = [
        kafka::serve_main_queue("kafka-group", consumer.clone(), stop_main_queue.clone()),
        kafka::serve_main_queue("kafka-reader", reader.clone(), stop_main_queue.clone()),
    ]
    .into_iter()
    .collect::<std::io::Result<Vec<_>>>()
    .context("cannot start the consumers' main-queue threads")?;
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        processing: config.processing,
        config: service.clone(),
        metrics: metrics.clone(),
        producer: producer.clone(),
        encoder,
        schemas,
        reader: reader.clone(),
        positions: consumer.context().positions.clone(),
        topics: task::OutputTopics::new(&service.topics),
        partitions,
        restoring: AtomicUsize::new(0),
        restore_slots: tokio::sync::Semaphore::new(task::RESTORE_CONCURRENCY),
        owners: directory.clone(),
        now: options.now,
    });
    tracing::info!(
        bootstrap_servers = service.kafka.bootstrap_servers,
        group_id = service.kafka.group_id,
        partitions,
        "service started"
    );

    let mut tasks: BTreeMap<i32, TaskHandle> = BTreeMap::new();
    let mut assigned_once = false;
    let mut readiness = tokio::time::interval(Duration::from_millis(250));
    let commit_interval = kafka::commit_interval(&service.kafka);
    let mut last_commit = std::time::Instant::now();
    // Claims on the instances topic: announced on assignment, renewed, released once drained
    // (queued in this order from this loop alone, see `owners`).
    let announce = |partitions: &[i32], released: bool| {
        tokio::spawn(owners::announce(
            &producer,
            &service.topics.instances,
            &directory,
            partitions,
            released,
        ));
    };
    let mut renewal = tokio::time::interval(service.tasks.ownership_lease / 4);
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = group_events.recv() => match event {
                Some(GroupEvent::Assigned(partitions)) => {
                    let started = assign(&shared, &shards, &mut tasks, partitions);
                    announce(&started, false);
                    assigned_once = true;
                }
                Some(GroupEvent::Revoking(partitions, done)) => {
                    ready.store(false, Ordering::Relaxed);
                    let mut drained = Vec::with_capacity(partitions.len());
                    for partition in partitions {
                        if let Some(handle) = tasks.remove(&partition) {
                            stop_task(partition, handle, &shards, &shared).await;
                            drained.push(partition);
                        }
                    }
                    announce(&drained, true);
                    let _ = done.send(());
                }
                None => break,
            },
            _ = renewal.tick() => {
                let held: Vec<i32> = tasks.keys().copied().collect();
                announce(&held, false);
            }
            _ = readiness.tick() => {}
        }
        if last_commit.elapsed() >= commit_interval {
            kafka::commit_finished(&consumer);
            last_commit = std::time::Instant::now();
        }
        let restoring = shared.restoring.load(Ordering::Acquire);
        metrics
            .restoring_partitions
            .set(i64::try_from(restoring).unwrap_or(i64::MAX));
        let is_ready = assigned_once && restoring == 0 && brokers_up.load(Ordering::Relaxed);
        ready.store(is_ready, Ordering::Relaxed);
        metrics.ready.set(i64::from(is_ready));
    }

    // Revocations from here on (the consumer closing) find nothing to drain: do not wait.
    drop(group_events);
    tracing::info!(partitions = tasks.len(), "shutting down: draining partitions");
    ready.store(false, Ordering::Relaxed);
    metrics.ready.set(0);
    let bound = service.tasks.shutdown_timeout;
    let drained = tokio::time::timeout(bound, async {
        let mut released = Vec::with_capacity(tasks.len());
        for (partition, handle) in std::mem::take(&mut tasks) {
            stop_task(partition, handle, &shards, &shared).await;
            released.push(partition);
        }
        // Delivered by the flush below.
        announce(&released, true);
        let committing = consumer.clone();
        let _ = tokio::task::spawn_blocking(move || kafka::commit_all(&committing)).await;
    })
    .await;
    following.abort();
    stop_main_queue.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || {
        for thread in main_queues {
            let _ = thread.join();
        }
    })
    .await;
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    let _ = http_stop.send(());
    let _ = http.await;
    // The consumers close (the group one leaving the group) when their last handles go.
    drop(reader);
    drop(consumer);
    if drained.is_err() {
        bail!(
            "shutdown did not finish within {:.0} s: uncommitted input will be read again",
            bound.as_secs_f64()
        );
    }
    tracing::info!("stopped");
    Ok(metrics)
}

/// A token unique to this launch of the service (process, start time, launch within the
/// process), naming its claims.
fn launch_token(started: Timestamp) -> String {
    static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        started.millis(),
        LAUNCHES.fetch_add(1, Ordering::Relaxed)
    )
}

/// The configured advertised URL, else `http://<host name or listen address>:<port>`.
fn advertised_url(configured: &str, listen: std::net::SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = if listen.ip().is_unspecified() {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    } else {
        listen.ip().to_string()
    };
    format!("http://{host}:{}", listen.port())
}

/// Starts a task for each newly assigned partition. Returns the partitions started.
fn assign(
    shared: &Arc<Shared>,
    shards: &Arc<OwnedShards>,
    tasks: &mut BTreeMap<i32, TaskHandle>,
    partitions: Vec<i32>,
) -> Vec<i32> {
    let mut started = Vec::new();
    for partition in partitions {
        if tasks.contains_key(&partition) {
            continue;
        }
        let shard = Arc::new(new_shard(0));
        if let Ok(index) = u32::try_from(partition) {
            shards.insert(index, shard.clone());
        }
        shared.restoring.fetch_add(1, Ordering::AcqRel);
        let (control, commands) = mpsc::channel(8);
        let join = tokio::spawn(run_task(shared.clone(), partition, shard.clone(), commands));
        tasks.insert(partition, TaskHandle { control, join, shard });
        started.push(partition);
    }
    started
}

/// Stops a task (it finishes, writes the changelog and gives its input partitions back) and
/// forgets its shard and per-partition series.
async fn stop_task(partition: i32, handle: TaskHandle, shards: &OwnedShards, shared: &Shared) {
    let _ = handle.control.send(Control::Stop).await;
    if let Err(error) = handle.join.await {
        tracing::error!(partition, %error, "partition task failed");
    }
    if let Ok(index) = u32::try_from(partition) {
        shards.remove(index);
    }
    shared.metrics.forget_shard(
        &handle.shard,
        &shared.engine.model,
        partition,
        &shared.config.topics.lanes(),
    );
}

/// Checks that the topics exist and the inputs are co-partitioned; returns their partition
/// count.
async fn check_topics(producer: &rdkafka::producer::FutureProducer, service: &ServiceConfig) -> anyhow::Result<u32> {
    let client = producer.clone();
    let metadata = tokio::task::spawn_blocking(move || client.client().fetch_metadata(None, Duration::from_secs(30)))
        .await?
        .with_context(|| {
            format!(
                "cannot read topic metadata from {} (is the broker reachable?)",
                service.kafka.bootstrap_servers
            )
        })?;
    let count = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|topic| topic.name() == name && topic.error().is_none())
            .map(|topic| topic.partitions().len())
    };
    let mut problems = Vec::new();
    let mut input_counts = Vec::new();
    for name in service.topics.inputs.iter() {
        match count(name) {
            Some(partitions) => input_counts.push((name.as_str(), partitions)),
            None => problems.push(format!("input topic `{name}` does not exist")),
        }
    }
    for name in [
        &service.topics.stage_changes,
        &service.topics.conversions,
        &service.topics.dead_letters,
        &service.topics.instances,
    ] {
        if count(name).is_none() {
            problems.push(format!("output topic `{name}` does not exist"));
        }
    }
    if input_counts.windows(2).any(|pair| pair[0].1 != pair[1].1) {
        problems.push(format!(
            "input topics are not co-partitioned (partition counts {input_counts:?}): give them the same count"
        ));
    }
    let partitions = input_counts.first().map_or(0, |(_, partitions)| *partitions);
    let internal = [
        ("changelog", &service.topics.changelog, "compact"),
        ("identity topic", &service.topics.identity, "delete"),
    ];
    for (what, name, cleanup) in internal {
        match count(name) {
            Some(found) if found != partitions => problems.push(format!(
                "the {what} `{name}` has {found} partitions, the inputs {partitions}: one per input partition"
            )),
            Some(_) => {}
            None if problems.is_empty() => create_internal_topic(producer, service, name, partitions, cleanup).await?,
            None => {}
        }
    }
    if !problems.is_empty() {
        bail!("topics are not ready:\n  {}", problems.join("\n  "));
    }
    Ok(partitions as u32)
}

/// Creates a topic of the service's own, one partition per input partition: the changelog
/// (compacted) or the identity topic (deleted after 7 days).
async fn create_internal_topic(
    producer: &rdkafka::producer::FutureProducer,
    service: &ServiceConfig,
    name: &str,
    partitions: usize,
    cleanup: &str,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = kafka::producer_config(&service.kafka)
        .create()
        .context("cannot create an admin client")?;
    let mut topic =
        NewTopic::new(name, i32::try_from(partitions)?, TopicReplication::Fixed(-1)).set("cleanup.policy", cleanup);
    if cleanup == "delete" {
        topic = topic.set("retention.ms", "604800000");
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .with_context(|| format!("cannot create the topic `{name}`"))?;
    for result in results {
        if let Err((topic, code)) = result {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("cannot create the topic `{topic}`: {code}");
            }
        }
    }
    // The consumer subscribes right after: make sure the brokers already describe the topic,
    // or its first assignment would leave it out until the next metadata refresh.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let client = producer.clone();
        let topic = name.to_owned();
        let described = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .any(|found| found.error().is_none() && found.partitions().len() == partitions)
                })
                .unwrap_or(false)
        })
        .await?;
        if described {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("created the topic `{name}` but the brokers do not describe it after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(topic = name, partitions, cleanup, "created the topic");
    Ok(())
}
