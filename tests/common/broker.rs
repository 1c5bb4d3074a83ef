//! A real Kafka-compatible broker for integration tests, and the few client calls they share.
//!
//! [`Tansu`] runs one private tansu broker per test: its own process, data directory and
//! loopback port, so tests never share topics, offsets or group state, and may run in parallel.
//! The Kafka helpers are plain rdkafka clients built fresh on every call, independent of the
//! service under test: they produce its input and read its output the way any other client would.
//!
//! The process helpers ([`Tansu::start`], [`Tansu::stop`], [`Tansu::restart`]) block the calling
//! thread (milliseconds to start, up to a few seconds to stop); the Kafka helpers are async, so a
//! test can feed and read a service running on the same runtime.
//!
//! tansu speaks the Kafka protocol but is not Kafka: it has no topic auto-creation (create every
//! topic with [`create_topics`]) and no transactions.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;

/// Names the broker binary; `scripts/test` sets it after installing tansu.
pub const TANSU_ENV: &str = "LIFECYCLE_SCORER_TANSU";

/// The tansu release the tests were written against, and how to get it.
const INSTALL_HINT: &str = "install tansu 0.6.0 (about 15 minutes; `scripts/test` does it for you): \
     cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root ~/.tansu";

/// Log file inside the broker's data directory; it collects every run (restarts append).
const LOG_FILE: &str = "tansu.log";

/// How long a broker may take to answer its first metadata request; it usually needs ~100 ms.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a broker may take to exit on SIGTERM (about 1-3 s) before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound for single requests made by the helpers (metadata, admin, commits).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A tansu broker on `127.0.0.1:PORT` with sqlite storage in a temporary directory.
///
/// Dropping it stops the broker (SIGTERM, then SIGKILL) and deletes the directory, unless the
/// test is panicking: then the directory is kept and the log's tail printed, for the post-mortem.
#[derive(Debug)]
pub struct Tansu {
    binary: PathBuf,
    port: u16,
    /// Unique per broker, so readiness checks can tell our broker from a stranger that grabbed
    /// the port (another test's broker answers metadata too).
    cluster_id: String,
    /// Holds the sqlite database and the log; dropped (deleted) only after `Drop::drop` has
    /// stopped the process, because fields drop after it.
    dir: TempDir,
    /// `None` while stopped.
    child: Option<Child>,
}

impl Tansu {
    /// Starts a fresh broker and waits until it answers metadata requests.
    ///
    /// Panics when the binary is missing (a test that cannot find its broker must fail, not
    /// skip) or when the broker does not become ready.
    pub fn start() -> Tansu {
        exit_soon_after_a_failure();
        let binary = tansu_binary();
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .expect("create the broker's temp dir");
        let mut broker = Tansu {
            binary,
            port: 0,
            cluster_id: unique_name("tansu-test"),
            dir,
            child: None,
        };
        // The port is free when probed but may be taken before tansu binds it; then tansu exits
        // and another port is tried.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            broker.port = free_port();
            if broker.launch() {
                return broker;
            }
            eprintln!("tansu exited during start-up (attempt {attempt} of {ATTEMPTS}), retrying on another port");
        }
        panic!(
            "tansu did not start after {ATTEMPTS} attempts; log tail:\n{}",
            broker.log_tail()
        );
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The directory holding the broker's database and log.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the broker gracefully (SIGTERM), killing it if it has not exited within 10 s.
    /// Data and port are kept for [`Tansu::restart`]. Does nothing when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Kills the broker without warning (SIGKILL), as a crash would. Data written so far stays
    /// on disk for [`Tansu::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker if it is running, then starts it again on the same data and port, and
    /// waits until it is ready. Clients configured with the old bootstrap address reconnect.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.launch(),
            "tansu exited while restarting on port {}; log tail:\n{}",
            self.port,
            self.log_tail()
        );
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_none())
    }

    /// The last lines of the broker's log, for failure messages.
    pub fn log_tail(&self) -> String {
        const TAIL_BYTES: u64 = 8 * 1024;
        let Ok(mut file) = File::open(self.dir.path().join(LOG_FILE)) else {
            return "(no log)".to_owned();
        };
        let length = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Spawns the broker and waits until it is ready. Returns `false` if the process exited
    /// first (typically: the port was taken); panics if it is still not ready after 30 s.
    fn launch(&mut self) -> bool {
        debug_assert!(self.child.is_none(), "launch only a stopped broker");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(LOG_FILE))
            .expect("open the broker log");
        let stderr = log.try_clone().expect("clone the broker log handle");
        let url = format!("tcp://{}", self.bootstrap());
        // tansu reads every flag from the environment too; clear the ones not set here so a
        // developer's shell cannot point the test broker at a registry or a collector.
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--cluster-id", &self.cluster_id])
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            // Relative to the working directory; maintenance (compaction, retention) every 5 s.
            .args(["--storage-engine", "sqlite://tansu.db?maintenance_interval=5s"])
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}; {INSTALL_HINT}", self.binary.display()));
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        // Fast reconnects: librdkafka's default backoff grows to 10 s while the port is closed.
        let probe: BaseConsumer = client_config(&self.bootstrap())
            .set("reconnect.backoff.ms", "10")
            .set("reconnect.backoff.max.ms", "100")
            .create()
            .expect("create the readiness probe");
        loop {
            if !self.is_running() {
                self.child = None;
                return false;
            }
            let listening = TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok();
            if listening
                && probe.fetch_metadata(None, Duration::from_secs(1)).is_ok()
                && probe.client().fetch_cluster_id(Duration::from_secs(1)).as_deref() == Some(self.cluster_id.as_str())
            {
                return true;
            }
            if Instant::now() >= deadline {
                panic!(
                    "tansu on {} not ready after {READY_TIMEOUT:?}; log tail:\n{}",
                    self.bootstrap(),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "tansu data kept in {}; log tail:\n{}",
                self.dir.path().display(),
                self.log_tail()
            );
        }
    }
}

/// The broker binary: `$LIFECYCLE_SCORER_TANSU`, else `~/.tansu/bin/tansu`.
fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(TANSU_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{TANSU_ENV}={} does not exist; {INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    let default = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".tansu/bin/tansu"));
    match default {
        Some(path) if path.is_file() => path,
        _ => panic!("no tansu broker: {TANSU_ENV} is unset and ~/.tansu/bin/tansu is missing; {INSTALL_HINT}"),
    }
}

/// A loopback port that was free a moment ago (the OS picks it; see [`Tansu::start`] for the race).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a probe socket");
    listener.local_addr().expect("probe socket address").port()
}

/// Sends SIGTERM; false when it could not be sent. `Child::kill` only sends SIGKILL and
/// `unsafe` is forbidden, hence the `kill` command.
pub fn send_sigterm(child: &Child) -> bool {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL.
fn terminate(child: &mut Child) {
    if send_sigterm(child) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        eprintln!("tansu ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A name no other call in this test run returns: `{prefix}-{pid}-{n}`. Each test gets its own
/// broker, so this only has to be unique within the process.
/// Makes a failing broker test end its process. When a test panics, its runtime is dropped
/// while the service it ran in-process still has librdkafka work on blocking threads, and
/// dropping a runtime waits for those without end: the test binary would hang until the CI
/// limit instead of failing. The hook lets the panic unwind (so brokers are stopped and their
/// logs printed), then exits 30 s later if the process is still alive.
fn exit_soon_after_a_failure() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let _ = std::thread::Builder::new().spawn(|| {
                std::thread::sleep(Duration::from_secs(30));
                eprintln!("a test failed and the process did not end: exiting");
                std::process::exit(101);
            });
        }));
    });
}

pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Base client settings for talking to a test broker. Callers add their own.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("reconnect.backoff.max.ms", "1000");
    config
}

/// A topic to create: tansu has no auto-creation, so every test topic goes through here.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    /// Topic configs, e.g. `("cleanup.policy", "compact")`.
    pub configs: &'a [(&'a str, &'a str)],
}

/// Creates the topics (replication factor 1: one broker) and waits until metadata shows each
/// with its partition count, so that producers started right after do not race the creation.
pub async fn create_topics(bootstrap: &str, topics: &[TopicSpec<'_>]) {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create().expect("create admin client");
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|spec| {
            spec.configs.iter().fold(
                NewTopic::new(spec.name, spec.partitions, TopicReplication::Fixed(1)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .expect("create topics request");
    for result in results {
        if let Err((name, code)) = result {
            panic!("creating topic {name} failed: {code}");
        }
    }

    let deadline = Instant::now() + REQUEST_TIMEOUT;
    for spec in topics {
        loop {
            let partitions = partition_count(bootstrap, spec.name).await;
            if partitions == Some(spec.partitions) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "topic {} has {partitions:?} partitions in metadata, expected {}",
                spec.name,
                spec.partitions
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The topic's partition count from a fresh metadata request; `None` if unknown to the broker.
pub async fn partition_count(bootstrap: &str, topic: &str) -> Option<i32> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    blocking(move || {
        let consumer: BaseConsumer = client_config(&bootstrap).create().expect("create metadata client");
        let metadata = consumer
            .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
            .expect("fetch metadata");
        let found = metadata.topics().iter().find(|entry| entry.name() == topic)?;
        if found.error().is_some() || found.partitions().is_empty() {
            return None;
        }
        i32::try_from(found.partitions().len()).ok()
    })
    .await
}

/// The topic's configuration as the broker reports it (explicit settings and defaults).
pub async fn topic_configs(bootstrap: &str, topic: &str) -> BTreeMap<String, String> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create().expect("create admin client");
    let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await
        .expect("describe configs request");
    let resource = results
        .into_iter()
        .next()
        .expect("one result per resource")
        .unwrap_or_else(|error| panic!("describing topic {topic} failed: {error}"));
    resource
        .entries
        .into_iter()
        .filter_map(|entry| Some((entry.name, entry.value?)))
        .collect()
}

/// A record to produce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone (deletes the key in a compacted topic).
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None` lets the producer's murmur2 partitioner choose, as a Java client would.
    pub partition: Option<i32>,
    /// The record's create time, epoch milliseconds (`None`: the producer's clock).
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn new(key: impl Into<Vec<u8>>, payload: impl Into<Vec<u8>>) -> Record {
        Record {
            key: Some(key.into()),
            payload: Some(payload.into()),
            ..Record::default()
        }
    }

    pub fn tombstone(key: impl Into<Vec<u8>>) -> Record {
        Record {
            key: Some(key.into()),
            ..Record::default()
        }
    }

    pub fn header(mut self, key: &str, value: impl Into<Vec<u8>>) -> Record {
        self.headers.push((key.to_owned(), value.into()));
        self
    }

    pub fn partition(mut self, partition: i32) -> Record {
        self.partition = Some(partition);
        self
    }

    pub fn timestamp(mut self, millis: i64) -> Record {
        self.timestamp = Some(millis);
        self
    }
}

/// Produces `records` in order and waits for every acknowledgement; returns each record's
/// `(partition, offset)`, in input order. Panics on any failure.
///
/// Idempotent with `acks=all`, so a retried batch is neither duplicated nor reordered, and
/// `murmur2_random` so keys land where Java producers put them (librdkafka's default partitioner
/// hashes differently; see `lifecycle_scorer::partition`). Each call builds its own producer,
/// and librdkafka spends ~0.5 s getting an idempotent producer its id: pass records in few calls.
pub async fn produce(bootstrap: &str, topic: &str, records: &[Record]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("create producer");
    // Enqueue everything first (in order: per-partition order is the enqueue order), then await
    // the acknowledgements; awaiting each send in turn would cost a linger per record.
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |all, (key, value)| {
                all.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let mut future_record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        future_record.key = record.key.as_deref();
        future_record.payload = record.payload.as_deref();
        future_record.partition = record.partition;
        future_record.timestamp = record.timestamp;
        loop {
            match producer.send_result(future_record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    future_record = returned;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => panic!("enqueueing a record for {topic} failed: {error}"),
            }
        }
    }
    let mut placements = Vec::with_capacity(deliveries.len());
    for (index, delivery) in deliveries.into_iter().enumerate() {
        match delivery.await.expect("producer dropped a delivery report") {
            Ok(delivered) => placements.push((delivered.partition, delivered.offset)),
            Err((error, _)) => panic!("record {index} to {topic} was not delivered: {error}"),
        }
    }
    placements
}

/// A record as read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// In wire order; a null header value reads as empty.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Milliseconds since the epoch (create or log-append time), if the broker gave one.
    pub timestamp: Option<i64>,
}

impl ConsumedRecord {
    fn from_message(message: &impl Message) -> ConsumedRecord {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key.to_owned(), header.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        ConsumedRecord {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: message.timestamp().to_millis(),
        }
    }

    /// The payload as UTF-8, for JSON outputs.
    pub fn payload_str(&self) -> &str {
        std::str::from_utf8(self.payload.as_deref().unwrap_or_default()).expect("payload is UTF-8")
    }
}

/// Reads the topic from the beginning, every partition, until `expected` records arrived or
/// `timeout` passed, and returns what arrived, ordered by (partition, offset); the caller
/// asserts. Uses a throwaway consumer outside any group, so it neither sees nor moves the
/// service's committed offsets.
pub async fn consume_all(bootstrap: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<ConsumedRecord> {
    let partitions = partition_count(bootstrap, topic)
        .await
        .unwrap_or_else(|| panic!("topic {topic} does not exist"));
    let consumer = assigned_from_start(bootstrap, topic, 0..partitions);
    let mut received = receive(&consumer, timeout, |received| received.records.len() >= expected).await;
    close(consumer).await;
    received.records.sort_by_key(|record| (record.partition, record.offset));
    received.records
}

/// Reads every partition from the beginning up to the end offsets seen when called, or until
/// `timeout` passes, and returns what arrived ordered by (partition, offset). For topics whose
/// record count is unknown, such as a compacted changelog.
pub async fn consume_to_end(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<ConsumedRecord> {
    let ends = end_offsets(bootstrap, topic).await;
    let consumer = assigned_from_start(bootstrap, topic, ends.keys().copied());
    let reached_end = |received: &Received| {
        ends.iter()
            .all(|(partition, end)| received.next_offsets.get(partition).copied().unwrap_or(0) >= *end)
    };
    let mut received = receive(&consumer, timeout, reached_end).await;
    close(consumer).await;
    received.records.sort_by_key(|record| (record.partition, record.offset));
    received.records
}

/// Consumes as a member of `group` (subscribing, as the service does) until `expected` records
/// arrived or `timeout` passed, commits the offsets after exactly the records returned, and
/// leaves the group. A later call with the same group resumes after them.
pub async fn consume_in_group(
    bootstrap: &str,
    group: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<ConsumedRecord> {
    let consumer: StreamConsumer = consumer_config(bootstrap, group)
        .create()
        .expect("create group consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let received = receive(&consumer, timeout, |received| received.records.len() >= expected).await;
    // Commit only what was returned: the consumer may have fetched further ahead.
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in &received.next_offsets {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("commit offset");
    }
    // A synchronous commit, then leaving the group (on drop), both wait for the broker: do them
    // off the runtime.
    let group = group.to_owned();
    blocking(move || {
        if offsets.count() > 0 {
            consumer
                .commit(&offsets, CommitMode::Sync)
                .unwrap_or_else(|error| panic!("group {group} failed to commit {offsets:?}: {error}"));
        }
        drop(consumer);
    })
    .await;
    received.records
}

/// The group's committed offsets (the next offset it will read) per partition of `topic`;
/// partitions without a commit are absent.
pub async fn committed_offsets(bootstrap: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let partitions = partition_count(bootstrap, topic)
        .await
        .unwrap_or_else(|| panic!("topic {topic} does not exist"));
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    blocking(move || {
        let consumer: BaseConsumer = consumer_config(&bootstrap, &group)
            .create()
            .expect("create offsets client");
        let mut query = TopicPartitionList::new();
        for partition in 0..partitions {
            query.add_partition(&topic, partition);
        }
        let committed = consumer
            .committed_offsets(query, REQUEST_TIMEOUT)
            .expect("fetch committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some((element.partition(), offset)),
                _ => None,
            })
            .collect()
    })
    .await
}

/// The offset after the last record (high watermark) of each partition of `topic`: how far
/// an up-to-date consumer must have committed.
pub async fn end_offsets(bootstrap: &str, topic: &str) -> BTreeMap<i32, i64> {
    let partitions = partition_count(bootstrap, topic)
        .await
        .unwrap_or_else(|| panic!("topic {topic} does not exist"));
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    blocking(move || {
        let consumer: BaseConsumer = client_config(&bootstrap).create().expect("create watermarks client");
        (0..partitions)
            .map(|partition| {
                let (_low, high) = consumer
                    .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                    .expect("fetch watermarks");
                (partition, high)
            })
            .collect()
    })
    .await
}

/// Settings shared by the helpers' consumers: manual commits only, start from the beginning
/// when the group has no commit.
fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut config = client_config(bootstrap);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // tansu holds every fetch for its full wait (about 250 ms at librdkafka's 500 ms
        // default), even with data ready; a short wait keeps reads quick.
        .set("fetch.wait.max.ms", "100");
    config
}

/// A consumer outside any group, assigned the given partitions from offset 0.
///
/// A manual assignment starts fetching at once: no group join, no rebalance. Offset 0 rather
/// than `Offset::Beginning` saves a ListOffsets round that librdkafka delays by ~0.5 s while it
/// swaps the bootstrap connection for the broker's own; below the log start (retention)
/// `auto.offset.reset=earliest` still lands on the first record.
fn assigned_from_start(bootstrap: &str, topic: &str, partitions: impl IntoIterator<Item = i32>) -> StreamConsumer {
    let consumer: StreamConsumer = consumer_config(bootstrap, &unique_name("reader"))
        .create()
        .expect("create consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(0))
            .expect("assignment offset");
    }
    consumer.assign(&assignment).expect("assign partitions");
    consumer
}

/// What one consumer received so far.
#[derive(Debug, Default)]
struct Received {
    /// In arrival order, each offset once.
    records: Vec<ConsumedRecord>,
    /// Per partition, the offset after the last record received.
    next_offsets: BTreeMap<i32, i64>,
    /// Records dropped because their offset had been received already.
    redelivered: usize,
}

/// Receives until `done` or until `timeout` passes.
///
/// tansu 0.6.0 re-sends records within one fetch when a partition has offset gaps (after
/// compaction or retention): its fetch loop advances by record count, not by offset. A record
/// is identified by its offset, so anything at or below one already received is dropped here.
async fn receive(consumer: &StreamConsumer, timeout: Duration, done: impl Fn(&Received) -> bool) -> Received {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = Received::default();
    while !done(&received) {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => {
                let record = ConsumedRecord::from_message(&message);
                let next = received.next_offsets.entry(record.partition).or_insert(0);
                if record.offset < *next {
                    received.redelivered += 1;
                    continue;
                }
                *next = record.offset + 1;
                received.records.push(record);
            }
            Ok(Err(error)) => eprintln!("consumer error (continuing): {error}"),
            Err(_elapsed) => break,
        }
    }
    if received.redelivered > 0 {
        eprintln!(
            "dropped {} re-delivered records (offset already received)",
            received.redelivered
        );
    }
    received
}

/// Drops a consumer off the runtime: librdkafka's close waits for the broker (and longer when
/// a test has stopped it).
async fn close(consumer: StreamConsumer) {
    blocking(move || drop(consumer)).await;
}

/// Runs a blocking rdkafka call on tokio's blocking pool, so a `current_thread` test runtime
/// keeps driving the service under test meanwhile.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking broker call panicked")
}
