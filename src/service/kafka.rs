//! The librdkafka clients: configuration, the group consumer's context (rebalance and commit
//! callbacks), the input reader's context (statistics) and the threads that serve the two
//! consumers' main queues.
//!
//! Two consumers. The *group* consumer is the instance's membership: it subscribes to the
//! changelog topic alone (one partition per input partition, the service's own), so any
//! assignor, cooperative-sticky by default, hands out whole partitions p; it never reads (its
//! partitions are paused) and commits the input positions the tasks finished. The *input
//! reader* never joins the group: a task that owns changelog partition p restores its shard,
//! then assigns partition p of every input topic and of the identity topic to the reader,
//! from the position the changelog's checkpoint names, in a queue of its own.
//!
//! Rebalance callbacks only run while the main queue is polled (rust-rdkafka #738), so one
//! dedicated thread polls it for the service's whole life; on revocation that thread blocks,
//! bounded, until the partitions' tasks have drained and their positions are committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The group consumer.
pub(crate) type GroupConsumer = StreamConsumer<ServiceContext>;
/// The input reader.
pub(crate) type InputReader = StreamConsumer<ReaderContext>;
/// A split partition queue of the input reader.
pub(crate) type PartitionQueue = StreamPartitionQueue<ReaderContext>;

/// What the group consumer's thread tells the coordinator.
#[derive(Debug)]
pub(crate) enum GroupEvent {
    /// Partitions now owned.
    Assigned(Vec<i32>),
    /// Partitions about to be taken away: drain them, then answer.
    Revoking(Vec<i32>, std::sync::mpsc::Sender<()>),
}

/// Callbacks of the group consumer.
pub(crate) struct ServiceContext {
    topics: Topics,
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<GroupEvent>,
    /// False while every broker is unreachable.
    pub(crate) brokers_up: Arc<AtomicBool>,
    /// The input positions the tasks finished, to commit.
    pub(crate) positions: Arc<Positions>,
    drain_timeout: Duration,
}

/// Input positions finished (outputs acknowledged, state in the changelog), by (topic,
/// partition), and which of them are committed.
///
/// Commits are for the tools that watch a group's lag: an owner starts from its changelog's
/// checkpoint, and from the committed offsets only when the changelog has none.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    inner: Mutex<PositionMaps>,
}

#[derive(Debug, Default)]
struct PositionMaps {
    latest: HashMap<(String, i32), i64>,
    committed: HashMap<(String, i32), i64>,
}

impl Positions {
    /// Notes the position finished for a partition.
    pub(crate) fn finished(&self, topic: &str, partition: i32, offset: i64) {
        if let Ok(mut maps) = self.inner.lock() {
            maps.latest.insert((topic.to_owned(), partition), offset);
        }
    }

    /// The positions not committed yet (of `partitions` only, when given), noted as
    /// committed: a failed commit hands them back ([`Positions::failed`]).
    pub(crate) fn to_commit(&self, partitions: Option<&[i32]>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        let Ok(mut maps) = self.inner.lock() else {
            return list;
        };
        let PositionMaps { latest, committed } = &mut *maps;
        for ((topic, partition), offset) in latest.iter() {
            if partitions.is_some_and(|only| !only.contains(partition)) {
                continue;
            }
            let key = (topic.clone(), *partition);
            if committed.get(&key) != Some(offset) {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
                committed.insert(key, *offset);
            }
        }
        list
    }

    /// Forgets that `list`'s positions are committed (their commit failed): the next commit
    /// sends them again.
    pub(crate) fn failed(&self, list: &TopicPartitionList) {
        if let Ok(mut maps) = self.inner.lock() {
            for element in list.elements() {
                maps.committed
                    .remove(&(element.topic().to_owned(), element.partition()));
            }
        }
    }

    /// Forgets `partitions` (revoked: another instance commits them from now on).
    pub(crate) fn forget(&self, partitions: &[i32]) {
        if let Ok(mut maps) = self.inner.lock() {
            maps.latest.retain(|(_, partition), _| !partitions.contains(partition));
            maps.committed
                .retain(|(_, partition), _| !partitions.contains(partition));
        }
    }
}

impl ServiceContext {
    pub(crate) fn new(
        topics: Topics,
        metrics: Arc<Metrics>,
        events: mpsc::UnboundedSender<GroupEvent>,
        brokers_up: Arc<AtomicBool>,
        drain_timeout: Duration,
    ) -> Self {
        ServiceContext {
            topics,
            metrics,
            events,
            brokers_up,
            positions: Arc::default(),
            drain_timeout,
        }
    }

    /// Commits `list` (not empty) and counts a failure.
    fn commit(&self, consumer: &impl Consumer<Self>, list: &TopicPartitionList, mode: CommitMode) -> bool {
        match consumer.commit(list, mode) {
            Ok(()) => true,
            Err(error) => {
                self.commit_failed(list, &error);
                false
            }
        }
    }

    /// A commit of `list` failed (at once, or later in the commit callback): counted, and its
    /// positions go with the next commit.
    fn commit_failed(&self, list: &TopicPartitionList, error: &KafkaError) {
        self.positions.failed(list);
        self.metrics.commit_failures.inc();
        tracing::warn!(%error, "offset commit failed");
    }
}

/// Callbacks of the input reader: statistics (consumer lag) and errors.
pub(crate) struct ReaderContext {
    topics: Topics,
    metrics: Arc<Metrics>,
    brokers_up: Arc<AtomicBool>,
}

impl ReaderContext {
    pub(crate) fn new(topics: Topics, metrics: Arc<Metrics>, brokers_up: Arc<AtomicBool>) -> Self {
        ReaderContext {
            topics,
            metrics,
            brokers_up,
        }
    }
}

impl ClientContext for ReaderContext {
    fn stats(&self, statistics: Statistics) {
        note_brokers(&self.brokers_up, &statistics);
        for (name, topic) in &statistics.topics {
            if self.topics.lane_of(name).is_none() {
                continue;
            }
            for (partition, stats) in &topic.partitions {
                // -1 is librdkafka's internal unassigned partition; lag is -1 until known. The
                // reader stores the positions the tasks finished (it never commits).
                if *partition < 0 || stats.consumer_lag_stored < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[name.as_str(), &partition.to_string()])
                    .set(stats.consumer_lag_stored);
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(Some(&self.brokers_up), error, reason);
    }
}

impl ConsumerContext for ReaderContext {}

/// Any broker up in `statistics` means the brokers are reachable again.
fn note_brokers(brokers_up: &AtomicBool, statistics: &Statistics) {
    if statistics.brokers.values().any(|broker| broker.state == "UP") {
        brokers_up.store(true, Ordering::Relaxed);
    }
}

/// librdkafka's log lines, at their level.
fn log(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
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

/// Callbacks of the service's helper consumers (the instances-topic follower, the restore
/// consumers): librdkafka's log and errors handled as the other clients'. rust-rdkafka hands
/// every error event to the context before returning it, so its default context would log
/// each end of partition as an error.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HelperContext;

impl ClientContext for HelperContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(None, error, reason);
    }
}

impl ConsumerContext for HelperContext {}

/// A client error, logged as a warning: all brokers down clears `brokers_up`. End-of-partition
/// events are not errors: the consumers' owners see them themselves.
fn client_error(brokers_up: Option<&AtomicBool>, error: KafkaError, reason: &str) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::PartitionEOF) => return,
        Some(RDKafkaErrorCode::AllBrokersDown) => {
            if let Some(up) = brokers_up {
                up.store(false, Ordering::Relaxed);
            }
        }
        _ => {}
    }
    tracing::warn!(%error, reason, "kafka client error");
}

impl ClientContext for ServiceContext {
    fn stats(&self, statistics: Statistics) {
        note_brokers(&self.brokers_up, &statistics);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(Some(&self.brokers_up), error, reason);
    }
}

impl ConsumerContext for ServiceContext {
    /// Runs before librdkafka assigns or unassigns: a revocation drains the tasks and commits
    /// their positions while the partitions are still this member's.
    fn pre_rebalance(&self, base_consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let partitions = self.owned(list);
                tracing::info!(?partitions, "partitions assigned");
                // The coordinator only goes away at shutdown, when nothing is assigned any more.
                let _ = self.events.send(GroupEvent::Assigned(partitions));
            }
            Rebalance::Revoke(list) => self.revoke(base_consumer, list),
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, base_consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            // The group consumer never reads the changelog (tasks restore with readers of
            // their own): its partitions stay paused.
            Rebalance::Assign(list) => {
                if let Err(error) = base_consumer.pause(list) {
                    tracing::warn!(%error, "cannot pause the assigned changelog partitions");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Nothing stored since the last commit is not a failure.
            if !matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::NoOffset)) {
                self.commit_failed(offsets, &error);
            }
        }
    }
}

impl ServiceContext {
    /// The partitions of the changelog in `list`.
    fn owned(&self, list: &TopicPartitionList) -> Vec<i32> {
        let mut partitions: Vec<i32> = list
            .elements()
            .iter()
            .filter(|element| element.topic() == self.topics.changelog)
            .map(|element| element.partition())
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    /// Drains the revoked partitions' tasks (bounded) and commits what they finished.
    fn revoke(&self, base_consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        self.metrics.rebalances.with_label_values(&["revoke"]).inc();
        let partitions = self.owned(list);
        tracing::info!(?partitions, "partitions revoked: draining");
        let (done, drained) = std::sync::mpsc::channel();
        if self.events.send(GroupEvent::Revoking(partitions.clone(), done)).is_ok()
            && drained.recv_timeout(self.drain_timeout).is_err()
        {
            tracing::error!(
                timeout_seconds = self.drain_timeout.as_secs_f64(),
                "revoked partitions did not drain in time; committing what is finished"
            );
        }
        let list = self.positions.to_commit(Some(&partitions));
        if list.count() > 0 {
            self.commit(base_consumer, &list, CommitMode::Sync);
        }
        self.positions.forget(&partitions);
    }
}

/// The consumer properties, the service's own over the configured ones.
pub(crate) fn consumer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.consumer_properties {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", &kafka.group_id)
        .set("client.id", &kafka.client_id)
        // Positions are committed by the service, once the changelog holds what they reflect.
        .set("enable.auto.commit", "false")
        // Offsets are stored only once everything a record caused is acknowledged.
        .set("enable.auto.offset.store", "false")
        // End-of-partition events tell a task its input is caught up.
        .set("enable.partition.eof", "true")
        .set("statistics.interval.ms", kafka.statistics_interval_ms.to_string());
    config
}

/// Properties that make a consumer a member of the group: a reader of assigned partitions
/// (the input reader, restore, the instances topic) must not carry them.
const MEMBERSHIP_PROPERTIES: [&str; 5] = [
    "group.instance.id",
    "partition.assignment.strategy",
    "group.protocol",
    "session.timeout.ms",
    "heartbeat.interval.ms",
];

/// The client configuration of a consumer that reads assigned partitions and never joins the
/// group: the consumer's, without the membership properties. It keeps `group.id`, so a
/// partition assigned at [`Offset::Stored`] starts at the group's committed offset.
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

/// How often finished positions are committed: the consumer's `auto.commit.interval.ms`
/// (librdkafka's default, 5 s, when unset).
pub(crate) fn commit_interval(kafka: &KafkaSettings) -> Duration {
    let millis = kafka
        .consumer_properties
        .get("auto.commit.interval.ms")
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(5_000);
    Duration::from_millis(millis)
}

/// Creates the group consumer.
pub(crate) fn create_group_consumer(kafka: &KafkaSettings, context: ServiceContext) -> KafkaResult<Arc<GroupConsumer>> {
    Ok(Arc::new(consumer_config(kafka).create_with_context(context)?))
}

/// Creates the input reader.
pub(crate) fn create_reader(kafka: &KafkaSettings, context: ReaderContext) -> KafkaResult<Arc<InputReader>> {
    Ok(Arc::new(reader_config(kafka).create_with_context(context)?))
}

/// Creates the output producer.
pub(crate) fn create_producer(kafka: &KafkaSettings) -> KafkaResult<FutureProducer> {
    producer_config(kafka).create()
}

/// Commits the positions finished since the last commit, without waiting (failures come
/// back through the commit callback).
pub(crate) fn commit_finished(consumer: &GroupConsumer) {
    let context = consumer.context();
    let list = context.positions.to_commit(None);
    if list.count() > 0 {
        context.commit(consumer, &list, CommitMode::Async);
    }
}

/// Commits every position finished, waiting for the broker (shutdown).
pub(crate) fn commit_all(consumer: &GroupConsumer) -> bool {
    let context = consumer.context();
    let list = context.positions.to_commit(None);
    list.count() == 0 || context.commit(consumer, &list, CommitMode::Sync)
}

/// Serves a consumer's main queue (rebalances, statistics, errors) on a thread of its own
/// until `stop` is set. Records never arrive there: the input reader's partitions are split
/// off before they are assigned and the group consumer's are paused; anything that does is
/// logged. The thread drives the queue with a small runtime of its own, so it never depends
/// on (or outlives) the service's.
pub(crate) fn serve_main_queue<C: ConsumerContext + 'static>(
    name: &str,
    consumer: Arc<StreamConsumer<C>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    std::thread::Builder::new().name(name.into()).spawn(move || {
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
                    tracing::debug!(topic, partition, "record on a main queue: dropped");
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(error)) => tracing::warn!(%error, "consumer error"),
            }
        }
    })
}
