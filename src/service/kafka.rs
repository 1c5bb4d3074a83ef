//! The librdkafka clients: configuration, the consumer context (rebalance, statistics, commit
//! and error callbacks) and the thread that serves the consumer's main queue.
//!
//! Every input partition is split into its own queue in the pre-rebalance callback, before
//! librdkafka fetches for it, and handed to the coordinator. Rebalance callbacks only run while
//! the main queue is polled (rust-rdkafka #738), so one dedicated thread polls it for the
//! service's whole life; on revocation that thread blocks, bounded, until the partitions' tasks
//! have drained and their offsets are committed, so the next owner starts exactly where this
//! one stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{KafkaSettings, Topics};
use crate::metrics::Metrics;

/// The consumer as the service uses it.
pub(crate) type Consumer_ = StreamConsumer<ServiceContext>;
/// A split partition queue.
pub(crate) type PartitionQueue = StreamPartitionQueue<ServiceContext>;

/// What the consumer thread tells the coordinator.
pub(crate) enum GroupEvent {
    /// Input topic-partitions now owned, each with its own queue.
    Assigned(Vec<(usize, i32, PartitionQueue)>),
    /// Partitions about to be taken away: drain them, then answer.
    Revoking(Vec<i32>, std::sync::mpsc::Sender<()>),
}

impl std::fmt::Debug for GroupEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupEvent::Assigned(queues) => {
                let owned: Vec<(usize, i32)> = queues
                    .iter()
                    .map(|(source, partition, _)| (*source, *partition))
                    .collect();
                f.debug_tuple("Assigned").field(&owned).finish()
            }
            GroupEvent::Revoking(partitions, _) => f.debug_tuple("Revoking").field(partitions).finish(),
        }
    }
}

/// Callbacks of the consumer.
pub(crate) struct ServiceContext {
    topics: Topics,
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<GroupEvent>,
    consumer: OnceLock<Weak<Consumer_>>,
    /// False while every broker is unreachable.
    pub(crate) brokers_up: Arc<AtomicBool>,
    /// The offsets the tasks stored last, by (topic, partition): what a commit would write.
    pub(crate) stored: Arc<StoredPositions>,
    drain_timeout: Duration,
}

/// Input positions stored for commit, and those whose commit a rebalance refused.
#[derive(Debug, Default)]
pub(crate) struct StoredPositions {
    latest: Mutex<HashMap<(String, i32), i64>>,
    /// Revoked while their commit was refused (brokers refuse commits while a rebalance is in
    /// progress). When the partition comes back to this instance, consumption resumes here
    /// instead of at the older committed offset, so nothing finished is read again.
    refused: Mutex<HashMap<(String, i32), i64>>,
}

impl StoredPositions {
    /// Notes the position stored for a partition.
    pub(crate) fn stored(&self, topic: &str, partition: i32, offset: i64) {
        if let Ok(mut latest) = self.latest.lock() {
            latest.insert((topic.to_owned(), partition), offset);
        }
    }

    fn revoked(&self, list: &TopicPartitionList, committed: bool) {
        let (Ok(mut latest), Ok(mut refused)) = (self.latest.lock(), self.refused.lock()) else {
            return;
        };
        for element in list.elements() {
            let key = (element.topic().to_owned(), element.partition());
            if let Some(offset) = latest.remove(&key) {
                if !committed {
                    refused.insert(key, offset);
                }
            }
        }
    }

    /// The refused positions of `list`'s partitions; forgets every other refused position (an
    /// assignment is complete: partitions not in it are someone else's now).
    fn take_refused(&self, list: &TopicPartitionList) -> Vec<(String, i32, i64)> {
        let Ok(mut refused) = self.refused.lock() else {
            return Vec::new();
        };
        let found = list
            .elements()
            .iter()
            .filter_map(|element| {
                let key = (element.topic().to_owned(), element.partition());
                refused.get(&key).map(|offset| (key.0, key.1, *offset))
            })
            .collect();
        refused.clear();
        found
    }
}

impl ServiceContext {
    pub(crate) fn new(
        topics: Topics,
        metrics: Arc<Metrics>,
        events: mpsc::UnboundedSender<GroupEvent>,
        drain_timeout: Duration,
    ) -> Self {
        ServiceContext {
            topics,
            metrics,
            events,
            consumer: OnceLock::new(),
            brokers_up: Arc::new(AtomicBool::new(true)),
            stored: Arc::default(),
            drain_timeout,
        }
    }
}

impl ClientContext for ServiceContext {
    fn stats(&self, statistics: Statistics) {
        let mut any_up = false;
        for broker in statistics.brokers.values() {
            any_up |= broker.state == "UP";
        }
        if any_up {
            self.brokers_up.store(true, Ordering::Relaxed);
        }
        for (name, topic) in &statistics.topics {
            if self.topics.lane_of(name).is_none() {
                continue;
            }
            for (partition, stats) in &topic.partitions {
                // -1 is librdkafka's internal unassigned partition; lag is -1 until known.
                if *partition < 0 || stats.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[name.as_str(), &partition.to_string()])
                    .set(stats.consumer_lag);
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // The partition tasks see end-of-partition events themselves.
            Some(RDKafkaErrorCode::PartitionEOF) => return,
            Some(RDKafkaErrorCode::AllBrokersDown) => self.brokers_up.store(false, Ordering::Relaxed),
            _ => {}
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for ServiceContext {
    fn pre_rebalance(&self, base_consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let mut queues = Vec::new();
                for element in list.elements() {
                    let Some(lane) = self.topics.lane_of(element.topic()) else {
                        tracing::warn!(topic = element.topic(), "assigned a topic that is not an input");
                        continue;
                    };
                    match consumer.split_partition_queue(element.topic(), element.partition()) {
                        Some(queue) => queues.push((lane, element.partition(), queue)),
                        None => tracing::error!(
                            topic = element.topic(),
                            partition = element.partition(),
                            "cannot split the partition's queue"
                        ),
                    }
                }
                tracing::info!(partitions = queues.len(), "partitions assigned");
                // The coordinator only goes away at shutdown, when nothing is assigned any more.
                let _ = self.events.send(GroupEvent::Assigned(queues));
            }
            Rebalance::Revoke(list) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let mut partitions: Vec<i32> = list.elements().iter().map(|element| element.partition()).collect();
                partitions.sort_unstable();
                partitions.dedup();
                tracing::info!(?partitions, "partitions revoked: draining");
                let (done, drained) = std::sync::mpsc::channel();
                if self.events.send(GroupEvent::Revoking(partitions, done)).is_ok()
                    && drained.recv_timeout(self.drain_timeout).is_err()
                {
                    tracing::error!(
                        timeout_seconds = self.drain_timeout.as_secs_f64(),
                        "revoked partitions did not drain in time; committing what is acknowledged"
                    );
                }
                let committed = match base_consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) => true,
                    Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => true,
                    Err(error) => {
                        self.metrics.commit_failures.inc();
                        tracing::warn!(%error, "commit on revocation refused; positions kept for a reassignment");
                        false
                    }
                };
                self.stored.revoked(list, committed);
            }
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, base_consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else { return };
        for (topic, partition, offset) in self.stored.take_refused(list) {
            // Back where this instance had finished, not at the older committed offset.
            match base_consumer.seek(&topic, partition, Offset::Offset(offset), Duration::ZERO) {
                Ok(()) => {
                    let mut position = TopicPartitionList::new();
                    let _ = position.add_partition_offset(&topic, partition, Offset::Offset(offset));
                    let _ = base_consumer.store_offsets(&position);
                    tracing::info!(
                        topic,
                        partition,
                        offset,
                        "resumed at the position whose commit was refused"
                    );
                }
                Err(error) => tracing::warn!(topic, partition, %error, "cannot resume at the refused position"),
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Nothing stored since the last commit is not a failure.
            if !matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::NoOffset)) {
                self.metrics.commit_failures.inc();
                tracing::warn!(%error, "offset commit failed");
            }
        }
    }
}

/// The consumer's client configuration.
pub(crate) fn consumer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.consumer_properties {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", &kafka.group_id)
        .set("client.id", &kafka.client_id)
        // Offsets are stored only once everything a record caused is acknowledged.
        .set("enable.auto.offset.store", "false")
        // End-of-partition events tell a task its input is caught up.
        .set("enable.partition.eof", "true")
        .set("statistics.interval.ms", kafka.statistics_interval_ms.to_string());
    config
}

/// Properties that make a consumer a member of the group: a reader of assigned partitions
/// (restore, the instances topic) must not carry them.
const MEMBERSHIP_PROPERTIES: [&str; 5] = [
    "group.instance.id",
    "partition.assignment.strategy",
    "group.protocol",
    "session.timeout.ms",
    "heartbeat.interval.ms",
];

/// The client configuration of a consumer that reads assigned partitions and never joins the
/// group: the consumer's, without the membership properties.
pub(crate) fn reader_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = consumer_config(kafka);
    for property in MEMBERSHIP_PROPERTIES {
        config.remove(property);
    }
    config
}

/// The producer's client configuration.
pub(crate) fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.producer_properties {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("client.id", &kafka.client_id);
    config
}

/// Creates the consumer and remembers it in its own context (the pre-rebalance callback
/// splits queues off it).
pub(crate) fn create_consumer(kafka: &KafkaSettings, context: ServiceContext) -> KafkaResult<Arc<Consumer_>> {
    let consumer: Arc<Consumer_> = Arc::new(consumer_config(kafka).create_with_context(context)?);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    Ok(consumer)
}

/// Creates the output producer.
pub(crate) fn create_producer(kafka: &KafkaSettings) -> KafkaResult<FutureProducer> {
    producer_config(kafka).create()
}

/// Serves the consumer's main queue (rebalances, errors) on a thread of its own until `stop`
/// is set. Messages never arrive there: every input partition is split off on assignment;
/// anything that does is logged. The thread drives the queue with a small runtime of its own,
/// so it never depends on (or outlives) the service's.
pub(crate) fn serve_main_queue(
    consumer: Arc<Consumer_>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    std::thread::Builder::new()
        .name("kafka-main-queue".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let polled = runtime.block_on(async {
                    tokio::time::timeout(Duration::from_millis(200), consumer.recv())
                        .await
                        .ok()
                        .map(|result| result.map(|message| (message.topic().to_owned(), message.partition())))
                });
                match polled {
                    None => {}
                    Some(Ok((topic, partition))) => {
                        tracing::warn!(
                            topic,
                            partition,
                            "record on the main queue: its partition was not split"
                        );
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => {}
                    Some(Err(error)) => tracing::warn!(%error, "consumer error"),
                }
            }
        })
}
