//! Restore speed: how fast partitions' shards come back from the state changelog.
//!
//! Replays a generated stream (default 100,000 contacts over a year) to get realistic states,
//! writes N contact records (default 1,000,000: the replayed states, repeated under new keys)
//! to a changelog topic of P partitions, then restores every partition as the service does on
//! assignment: one consumer per partition reading it to the end (`read_changelog`, with the
//! service's consumer properties), decode, `Processor::restore` with timers, into a shard of its
//! own. Reports records/s, seconds and resident memory: before the restore, the peak during it
//! (sampled every 50 ms) and after it, and the growth per restored contact. The report is one
//! JSON line on stdout; progress goes to stderr.
//!
//! The growth includes what the allocator keeps after the restore frees its read buffers
//! (glibc keeps per-thread arenas, and every partition is read on a thread of its own), so it
//! is an upper bound on what the restored state takes, and it grows with the concurrency.
//!
//! Brokers:
//! - `mock` (default): librdkafka's in-process mock cluster. It keeps only about 5 MB per
//!   partition, hence 64 partitions by default.
//! - `tansu`: a tansu broker started for the run (sqlite storage in a temporary directory, on a
//!   free loopback port; stopped and deleted at the end). The binary comes from
//!   `$LIFECYCLE_SCORER_TANSU`, else `$HOME/.tansu/bin/tansu`. The changelog topic is created
//!   with the admin API (`cleanup.policy=compact`). 16 partitions by default. tansu is slow
//!   (tens of thousands of records/s each way), so a million records take a while to write.
//!
//! The service starts every assigned partition's restore at once (one task, one blocking read
//! each), which is the default here; `--concurrency N` restores at most N partitions at a time.
//!
//! ```text
//! cargo run --release --example restore_speed -- [--broker mock|tansu] [--contacts N]
//!     [--partitions P] [--source-contacts S] [--concurrency N|all] [--compression none|lz4|zstd|...]
//! cargo run --release --example restore_speed -- [CONTACTS] [PARTITIONS] [SOURCE_CONTACTS]
//! ```
//!
//! Positional arguments and flags mix (`-- --broker tansu 1000000 16`); `--compression` is the
//! writing producer's (default none).

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{ContactKey, Timestamp};
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::partition::partition_for;
use lifecycle_scorer::process_stats::{cpu_seconds, peak_resident_bytes, resident_bytes};
use lifecycle_scorer::processor::Processor;
use lifecycle_scorer::replay::{replay, ReplayOptions};
use lifecycle_scorer::service::restore::read_changelog;
use lifecycle_scorer::state::codec::{encode_key, encode_state};
use lifecycle_scorer::state::new_shard;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// Names the tansu binary (the same variable the integration tests read).
const TANSU_ENV: &str = "LIFECYCLE_SCORER_TANSU";

/// How to get the tansu release the project is tested against.
const TANSU_INSTALL_HINT: &str = "install tansu 0.6.0 (about 15 minutes): \
     cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root ~/.tansu";

/// How long tansu may take to answer its first metadata request (it usually needs ~100 ms).
const TANSU_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long tansu may take to exit on SIGTERM (about 1-3 s) before it is killed.
const TANSU_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound for single metadata and admin requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Deliveries awaited at most: the writer keeps this many records in flight, awaiting the
/// oldest before sending more, so the producer's queue never runs dry between rounds.
const IN_FLIGHT: usize = 200_000;

/// How often the memory sampler reads the resident set size during the restore.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    Mock,
    Tansu,
}

#[derive(Debug)]
struct Options {
    broker: BrokerKind,
    contacts: usize,
    partitions: i32,
    source_contacts: u64,
    /// Partitions restored at a time; `None`: all at once, as the service does.
    concurrency: Option<usize>,
    compression: String,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
        let mut broker = BrokerKind::Mock;
        let (mut contacts, mut partitions, mut source_contacts) = (None, None, None);
        let mut concurrency = None;
        let mut compression = None;
        let mut positional = 0;
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                let slot = match positional {
                    0 => &mut contacts,
                    1 => &mut partitions,
                    2 => &mut source_contacts,
                    _ => bail!("unexpected argument {arg:?}"),
                };
                positional += 1;
                set_once(slot, arg, "a positional argument")?;
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            let value = match inline {
                Some(value) => value,
                None => args.next().with_context(|| format!("--{name} needs a value"))?,
            };
            match name {
                "broker" => {
                    broker = match value.as_str() {
                        "mock" => BrokerKind::Mock,
                        "tansu" => BrokerKind::Tansu,
                        other => bail!("--broker {other}: expected mock or tansu"),
                    }
                }
                "contacts" => set_once(&mut contacts, value, "--contacts")?,
                "partitions" => set_once(&mut partitions, value, "--partitions")?,
                "source-contacts" => set_once(&mut source_contacts, value, "--source-contacts")?,
                "concurrency" => set_once(&mut concurrency, value, "--concurrency")?,
                "compression" => set_once(&mut compression, value, "--compression")?,
                other => bail!("unknown flag --{other}"),
            }
        }
        let default_partitions = match broker {
            BrokerKind::Mock => "64",
            BrokerKind::Tansu => "16",
        };
        let partitions: i32 = partitions
            .as_deref()
            .unwrap_or(default_partitions)
            .parse()
            .context("partitions")?;
        if partitions < 1 {
            bail!("partitions must be at least 1");
        }
        let concurrency = match concurrency.as_deref() {
            None | Some("all") => None,
            Some(text) => Some(text.parse::<usize>().context("--concurrency")?.max(1)),
        };
        Ok(Options {
            broker,
            contacts: contacts.as_deref().unwrap_or("1000000").parse().context("contacts")?,
            partitions,
            source_contacts: source_contacts
                .as_deref()
                .unwrap_or("100000")
                .parse()
                .context("source contacts")?,
            concurrency,
            compression: compression.unwrap_or_else(|| "none".to_owned()),
        })
    }
}

fn set_once(slot: &mut Option<String>, value: String, what: &str) -> anyhow::Result<()> {
    if slot.is_some() {
        bail!("{what} given twice (as a flag and as a positional argument?)");
    }
    *slot = Some(value);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    let broker = match options.broker {
        BrokerKind::Mock => Broker::Mock(MockCluster::new(1).map_err(|error| anyhow!("{error}"))?),
        BrokerKind::Tansu => Broker::Tansu(Tansu::start()?),
    };
    // On Ctrl-C, stop the broker before exiting rather than leave a tansu process behind.
    let outcome = tokio::select! {
        outcome = run(&options, &broker) => outcome,
        _ = tokio::signal::ctrl_c() => {
            drop(broker);
            std::process::exit(130);
        }
    };
    drop(broker);
    println!("{}", outcome?);
    Ok(())
}

async fn run(options: &Options, broker: &Broker) -> anyhow::Result<serde_json::Value> {
    let &Options {
        contacts, partitions, ..
    } = options;

    // Realistic states from a replayed generated stream.
    let mut lines = Vec::new();
    generate(
        &GenerateOptions {
            contacts: options.source_contacts,
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
    if states.is_empty() {
        bail!("the replayed stream left no contacts to write");
    }

    let bootstrap = broker.bootstrap();
    let topic = config.service.topics.changelog.as_str();
    broker.create_changelog(topic, partitions).await?;

    // Write the changelog. Measured on tansu: uncompressed is faster to write than lz4 (about
    // 51k against 35k records/s, and its data on disk is about the same size either way: it
    // seems to store records uncompressed), and batches of 1 to 4 MB made no difference (16 MB
    // was slower).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "50")
        .set("batch.num.messages", "100000")
        .set("batch.size", "4000000")
        .set("compression.type", &options.compression)
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "300000")
        .create()?;
    eprintln!("writing {contacts} records to {partitions} partitions ({bootstrap})");
    let (written, write_cpu_before, broker_write_cpu_before) = (Instant::now(), cpu_seconds(), broker.cpu_seconds());
    let mut bytes = 0usize;
    let mut failed = 0usize;
    let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
    for index in 0..contacts {
        let (key, value) = &states[index % states.len()];
        let key = ContactKey {
            id: format!("{}-{}", key.id, index / states.len()).into(),
            anonymous: key.anonymous,
        };
        let partition = partition_for(key.id.as_bytes(), partitions as u32) as i32;
        let encoded_key = encode_key(&key);
        bytes += encoded_key.len() + value.len();
        let mut record = FutureRecord::to(topic)
            .key(&encoded_key)
            .payload(value)
            .partition(partition);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break in_flight.push_back(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    match in_flight.pop_front() {
                        Some(delivery) => failed += usize::from(!matches!(delivery.await, Ok(Ok(_)))),
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((error, _)) => return Err(error).context("enqueueing a changelog record"),
            }
        }
        if in_flight.len() >= IN_FLIGHT {
            if let Some(delivery) = in_flight.pop_front() {
                failed += usize::from(!matches!(delivery.await, Ok(Ok(_))));
            }
        }
    }
    for delivery in in_flight {
        failed += usize::from(!matches!(delivery.await, Ok(Ok(_))));
    }
    let write_seconds = written.elapsed().as_secs_f64();
    let write_cpu = since(write_cpu_before, cpu_seconds());
    let broker_write_cpu = since(broker_write_cpu_before, broker.cpu_seconds());
    if failed > 0 {
        bail!("{failed} of {contacts} changelog records were not delivered");
    }
    drop(producer);
    drop(states);
    eprintln!(
        "wrote {contacts} records in {write_seconds:.1} s ({:.0} records/s); restoring",
        contacts as f64 / write_seconds
    );

    // Restore every partition as the service does on assignment: a task per partition, each
    // reading its changelog partition on the blocking pool, then restoring into its own shard.
    let client = restore_client_config(&config.service.kafka, &bootstrap, options.broker);
    let concurrency = options.concurrency.unwrap_or(partitions as usize);
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = resident_bytes().unwrap_or(0);
    let sampler = PeakSampler::start();
    let (cpu_before, broker_cpu_before) = (cpu_seconds(), broker.cpu_seconds());
    let started = Instant::now();
    let tasks: Vec<_> = (0..partitions)
        .map(|partition| {
            let (client, permits, engine) = (client.clone(), permits.clone(), engine.clone());
            let topic = topic.to_owned();
            let processing = config.processing;
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let restored = tokio::task::spawn_blocking(move || read_changelog(client, &topic, partition)).await??;
                let mut processor = Processor::new(engine, Arc::new(new_shard(0)), processing);
                let records = restored.records;
                let contacts = restored.contacts.len();
                for (key, state) in restored.contacts {
                    processor.restore(key, Box::new(state));
                }
                anyhow::Ok((processor, records, contacts))
            })
        })
        .collect();
    // The processors (shards and timer wheels) stay alive until the memory is measured.
    let mut processors = Vec::with_capacity(tasks.len());
    let mut restored_records = 0u64;
    let mut restored_contacts = 0usize;
    for task in tasks {
        let (processor, records, contacts) = task.await??;
        processors.push(processor);
        restored_records += records;
        restored_contacts += contacts;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = since(cpu_before, cpu_seconds());
    let broker_cpu = since(broker_cpu_before, broker.cpu_seconds());
    let rss_peak = sampler.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss_after = resident_bytes().unwrap_or(0);
    let per_contact = |bytes: u64| bytes as f64 / restored_contacts.max(1) as f64;
    let report = serde_json::json!({
        "broker": broker.name(),
        "contacts_written": contacts,
        "partitions": partitions,
        "concurrency": concurrency,
        "compression": options.compression,
        "changelog_bytes": bytes,
        "bytes_per_record": bytes as f64 / contacts as f64,
        "write_seconds": write_seconds,
        "write_records_per_second": contacts as f64 / write_seconds,
        "write_cpu_seconds": write_cpu,
        "broker_write_cpu_seconds": broker_write_cpu,
        "restored_records": restored_records,
        "restored_contacts": restored_contacts,
        "restore_seconds": seconds,
        "records_per_second": restored_records as f64 / seconds,
        "restore_cpu_seconds": cpu,
        "broker_restore_cpu_seconds": broker_cpu,
        "resident_before_bytes": rss_before,
        "resident_peak_bytes": rss_peak.max(rss_after),
        "resident_after_bytes": rss_after,
        "resident_growth_bytes": rss_after.saturating_sub(rss_before),
        "resident_bytes_per_contact": per_contact(rss_after.saturating_sub(rss_before)),
        "peak_growth_bytes_per_contact": per_contact(rss_peak.max(rss_after).saturating_sub(rss_before)),
        "process_peak_resident_bytes": peak_resident_bytes(),
        "broker_data_bytes": broker.data_bytes(),
    });
    drop(processors);
    Ok(report)
}

/// The restore consumer's settings: the service's consumer properties (`consumer_config` in
/// `service::kafka`), as `run --embedded` adjusts them for the mock cluster.
fn restore_client_config(
    kafka: &lifecycle_scorer::config::KafkaSettings,
    bootstrap: &str,
    broker: BrokerKind,
) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &kafka.consumer_properties {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &kafka.group_id)
        .set("client.id", &kafka.client_id);
    if broker == BrokerKind::Mock {
        // The mock broker holds a fetch for its whole wait when no data is there; `run
        // --embedded` shortens the wait the same way.
        client.set("fetch.wait.max.ms", "10");
    }
    client
}

/// Samples the resident set size from its own thread until stopped; returns the largest seen.
#[derive(Debug)]
struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl PeakSampler {
    fn start() -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(resident_bytes().unwrap_or(0)));
        let thread = thread::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            move || loop {
                peak.fetch_max(resident_bytes().unwrap_or(0), Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                thread::sleep(SAMPLE_INTERVAL);
            }
        });
        PeakSampler { stop, peak, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}

enum Broker {
    Mock(MockCluster<'static, DefaultProducerContext>),
    Tansu(Tansu),
}

impl Broker {
    fn name(&self) -> &'static str {
        match self {
            Broker::Mock(_) => "mock",
            Broker::Tansu(_) => "tansu",
        }
    }

    fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(cluster) => cluster.bootstrap_servers(),
            Broker::Tansu(tansu) => tansu.bootstrap(),
        }
    }

    /// Bytes in the broker's data directory (tansu's sqlite files); `None` for the mock cluster.
    fn data_bytes(&self) -> Option<u64> {
        match self {
            Broker::Mock(_) => None,
            Broker::Tansu(tansu) => Some(directory_bytes(&tansu.dir)),
        }
    }

    /// CPU time (user + system) of the broker's own process so far; `None` for the mock cluster,
    /// which runs inside this process.
    fn cpu_seconds(&self) -> Option<f64> {
        match self {
            Broker::Mock(_) => None,
            Broker::Tansu(tansu) => tansu.child.as_ref().and_then(|child| process_cpu_seconds(child.id())),
        }
    }

    /// Creates the compacted changelog topic and waits until metadata shows its partitions.
    async fn create_changelog(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        match self {
            // The mock cluster has no admin API (and no compaction).
            Broker::Mock(cluster) => cluster
                .create_topic(topic, partitions, 1)
                .map_err(|error| anyhow!("cannot create topic {topic}: {error}"))?,
            Broker::Tansu(tansu) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", tansu.bootstrap())
                    .create()?;
                let new_topic =
                    NewTopic::new(topic, partitions, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
                let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
                for result in admin.create_topics([&new_topic], &options).await? {
                    result.map_err(|(name, code)| anyhow!("creating topic {name} failed: {code}"))?;
                }
            }
        }
        let bootstrap = self.bootstrap();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
            let deadline = Instant::now() + REQUEST_TIMEOUT;
            loop {
                let metadata = client.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)?;
                let found = metadata
                    .topics()
                    .iter()
                    .find(|entry| entry.name() == topic && entry.error().is_none())
                    .map_or(0, |entry| entry.partitions().len());
                if found == partitions as usize {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!("topic {topic} has {found} partitions in metadata, expected {partitions}");
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
        .await?
    }
}

/// A tansu broker on a free loopback port with sqlite storage in a temporary directory, as the
/// integration tests run it. Dropping it stops the broker (SIGTERM, then SIGKILL) and deletes
/// the directory.
#[derive(Debug)]
struct Tansu {
    port: u16,
    dir: PathBuf,
    /// `None` once stopped.
    child: Option<Child>,
}

impl Tansu {
    fn start() -> anyhow::Result<Tansu> {
        let binary = tansu_binary()?;
        let dir = std::env::temp_dir().join(format!("restore-speed-tansu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut tansu = Tansu {
            port: 0,
            dir,
            child: None,
        };
        // The port is free when probed but may be taken before tansu binds it; then tansu exits
        // and another port is tried.
        for _attempt in 0..3 {
            tansu.port = free_port()?;
            if tansu.launch(&binary)? {
                eprintln!(
                    "tansu started on {} (data in {})",
                    tansu.bootstrap(),
                    tansu.dir.display()
                );
                return Ok(tansu);
            }
        }
        bail!(
            "tansu exited during start-up three times; see {}",
            tansu.dir.join("tansu.log").display()
        )
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Spawns the broker and waits until it answers metadata requests. `Ok(false)` if it exited
    /// first (typically: the port was taken).
    fn launch(&mut self, binary: &Path) -> anyhow::Result<bool> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))?;
        let url = format!("tcp://{}", self.bootstrap());
        // tansu reads every flag from the environment too: keep the caller's shell from pointing
        // it at a schema registry or a trace collector.
        let child = Command::new(binary)
            .arg("broker")
            .args(["--cluster-id", &format!("restore-speed-{}", std::process::id())])
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            // Relative to the working directory; maintenance (compaction, retention) every 5 s.
            .args(["--storage-engine", "sqlite://tansu.db?maintenance_interval=5s"])
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}; {TANSU_INSTALL_HINT}", binary.display()))?;
        self.child = Some(child);

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        // Fast reconnects: librdkafka's default backoff grows to 10 s while the port is closed.
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("reconnect.backoff.ms", "10")
            .set("reconnect.backoff.max.ms", "100")
            .create()?;
        let deadline = Instant::now() + TANSU_READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait()?.is_some() {
                    self.child = None;
                    return Ok(false);
                }
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
                && probe.fetch_metadata(None, Duration::from_secs(1)).is_ok()
            {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                bail!(
                    "tansu on {} not ready after {TANSU_READY_TIMEOUT:?}; see {}",
                    self.bootstrap(),
                    self.dir.join("tansu.log").display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` only sends SIGKILL and `unsafe` is forbidden, hence the command.
            let sent = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            let deadline = Instant::now() + TANSU_STOP_TIMEOUT;
            while sent && Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `$LIFECYCLE_SCORER_TANSU`, else `$HOME/.tansu/bin/tansu`.
fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(TANSU_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{TANSU_ENV}={} does not exist; {TANSU_INSTALL_HINT}", path.display());
        }
        return Ok(path);
    }
    match std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".tansu/bin/tansu")) {
        Some(path) if path.is_file() => Ok(path),
        _ => bail!("no tansu broker: {TANSU_ENV} is unset and ~/.tansu/bin/tansu is missing; {TANSU_INSTALL_HINT}"),
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a probe socket")?;
    Ok(listener.local_addr()?.port())
}

/// CPU time (user + system) of process `pid`, from `/proc/PID/stat` (Linux), as
/// `process_stats::cpu_seconds` reads this process's.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// CPU seconds spent between two readings, when both exist.
fn since(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

/// Total size of the files directly in `dir`.
fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
        .sum()
}
