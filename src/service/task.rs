//! One partition task: owns partition p of every input topic and its state shard.
//!
//! Records from the three topics are decoded as they arrive and queued per topic; the task
//! merges the queues in event-time order (waiting, bounded, for a topic with nothing queued
//! that is not known to be caught up, as Kafka Streams does), passes events through the reorder
//! buffer to the processor, and produces the stage changes and conversion records they cause.
//! A bad record goes to the dead-letter topic. Each batch's deliveries go to the task's acker,
//! which waits for the broker's acknowledgements (sending again on failure) and only then
//! stores the input offsets they finish, so a committed offset never covers an unacknowledged
//! output.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::kafka::{InputReader, PartitionQueue, Positions};
use super::offsets::OffsetTracker;
use super::owners::Holder;
use super::restore::{read_changelog, Ahead};
use super::schemas::Schemas;
use crate::attribution::ConversionRecord;
use crate::codec::avro::{split_frame, SchemaStore};
use crate::codec::json::decode_event;
use crate::codec::output::OutputEncoder;
use crate::codec::DecodeError;
use crate::config::{InputFormat, Processing, ServiceConfig};
use crate::domain::{ContactEvent, ContactKey, Erasure, Input, Source, StageChange, Timestamp};
use crate::lifecycle::{Applied, Engine};
use crate::metrics::{outcome, Metrics};
use crate::partition::partition_for;
use crate::processor::{Feeder, Processor};
use crate::reorder::ReorderBuffer;
use crate::state::codec::{
    decode_routed, encode_checkpoint, encode_handed_to, encode_key, encode_routed, encode_state, handover_key,
    Checkpoint, CHECKPOINT_KEY, LANES, WRITE_BEGUN_KEY,
};
use crate::state::Shard;

/// Partitions restored at once. Restoring 1M contacts on tansu took the same time 4 at a time
/// as all 16 at once, and retained less memory (`examples/restore_speed`).
pub(crate) const RESTORE_CONCURRENCY: usize = 4;

/// First and longest wait before a failed restore is tried again.
const RESTORE_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTORE_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a partition waiting for its previous owner looks again.
const HANDOVER_POLL: Duration = Duration::from_millis(100);

/// The lane of the identity topic (after the inputs, by `Source::index`).
const IDENTITY_LANE: usize = LANES - 1;

/// What every partition task shares.
pub(crate) struct Shared {
    pub(crate) engine: Arc<Engine>,
    pub(crate) processing: Processing,
    pub(crate) config: Arc<ServiceConfig>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) producer: FutureProducer,
    pub(crate) encoder: OutputEncoder,
    pub(crate) schemas: Arc<Schemas>,
    /// Reads the input partitions the tasks assign it.
    pub(crate) reader: Arc<InputReader>,
    /// Input positions finished, for the group consumer to commit.
    pub(crate) positions: Arc<Positions>,
    /// The output topics' names.
    pub(crate) topics: OutputTopics,
    /// Partitions of every input topic (and of the identity topic).
    pub(crate) partitions: u32,
    /// Partition tasks still restoring their shard (the instance is not ready until none).
    pub(crate) restoring: std::sync::atomic::AtomicUsize,
    /// Restores that may run at once ([`RESTORE_CONCURRENCY`]).
    pub(crate) restore_slots: tokio::sync::Semaphore,
    /// Who holds which partition: a new task waits for its previous owner's release.
    pub(crate) owners: Arc<super::owners::InstanceDirectory>,
    /// The wall clock (edge): conversion staleness, idle timers, latency.
    pub(crate) now: fn() -> Timestamp,
}

/// Commands to a running task.
pub(crate) enum Control {
    /// Stop reading, finish what was read, write the changelog, end.
    Stop,
}

/// Where an event came from, to finish its offset once its outputs are acknowledged.
#[derive(Clone, Copy, Debug)]
struct Origin {
    source: usize,
    offset: i64,
    occurred_at: Timestamp,
    appended_at: Option<i64>,
    /// Already reflected in the restored state: it only moves the partition's clock.
    reflected: bool,
}

/// A decoded record waiting to be merged.
struct Queued {
    event: Input,
    origin: Origin,
}

/// One batch's deliveries, the records they finish, and the changelog records of the contacts
/// the batch changed (encoded when the batch ended, so they reflect exactly its inputs; `None`
/// for a contact that is gone).
#[derive(Default)]
struct Batch {
    deliveries: Vec<(&'static str, DeliveryFuture)>,
    finished: Vec<Origin>,
    changelog: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Topic names the outputs go to, `'static` for metric labels: made once per `run`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutputTopics {
    stage_changes: &'static str,
    conversions: &'static str,
    dead_letters: &'static str,
    changelog: &'static str,
    identity: &'static str,
}

impl OutputTopics {
    /// The configured names (leaked: they live as long as the service).
    pub(crate) fn new(topics: &crate::config::Topics) -> Self {
        fn leak(name: &str) -> &'static str {
            Box::leak(name.to_owned().into_boxed_str())
        }
        OutputTopics {
            stage_changes: leak(&topics.stage_changes),
            conversions: leak(&topics.conversions),
            dead_letters: leak(&topics.dead_letters),
            changelog: leak(&topics.changelog),
            identity: leak(&topics.identity),
        }
    }
}

/// Runs the task for `partition` until told to stop (or every sender is gone).
pub(crate) async fn run_task(
    shared: Arc<Shared>,
    partition: i32,
    shard: Arc<Shard>,
    mut control: mpsc::Receiver<Control>,
) {
    let done_restoring = || shared.restoring.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let store = match shared.schemas.store() {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(%error, "cannot load the configured schemas");
            done_restoring();
            return;
        }
    };
    let trackers: Arc<Mutex<[OffsetTracker; LANES]>> = Arc::default();
    let (batches, acked) = mpsc::channel::<Batch>(64);
    let acker = tokio::spawn(acknowledge(shared.clone(), partition, trackers.clone(), acked));
    let mut task = Task::new(shared.clone(), partition, shard, store, trackers, batches);
    // A restore that keeps failing must not hold a revocation up: a stop ends it.
    let opened = tokio::select! {
        queues = task.start() => Some(queues),
        _ = control.recv() => None,
    };
    done_restoring();
    let Some(queues) = opened else {
        // Stopped while opening its inputs, perhaps once the reader had them.
        close_inputs(&shared, partition).await;
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let batch_max = shared.config.tasks.batch_max_records;
    loop {
        tokio::select! {
            biased;
            _ = control.recv() => break,
            received = queues[0].recv() => task.on_record(0, received).await,
            received = queues[1].recv() => task.on_record(1, received).await,
            received = queues[2].recv() => task.on_record(2, received).await,
            received = queues[3].recv() => task.on_record(3, received).await,
            _ = tick.tick() => task.on_tick(),
        }
        // Take whatever else is already fetched, up to a batch, without waiting.
        let mut taken = 0;
        'drain: while taken < batch_max {
            let mut any = false;
            for (source, queue) in queues.iter().enumerate() {
                if let Some(received) = queue.recv().now_or_never() {
                    task.on_record(source, received).await;
                    taken += 1;
                    any = true;
                }
            }
            if !any {
                break 'drain;
            }
        }
        task.process_ready().await;
    }
    // Stop: what was processed is produced; wait for its acknowledgements, write the
    // changelog and note the positions, then give the input partitions back.
    task.flush_batch().await;
    drop(task);
    if let Err(error) = acker.await {
        tracing::error!(partition, %error, "acknowledgement task failed");
    }
    close_inputs(&shared, partition).await;
    drop(queues);
}

/// Takes partition `partition` of every lane away from the input reader, as far as it has
/// them.
async fn close_inputs(shared: &Arc<Shared>, partition: i32) {
    let lanes = shared.config.topics.lanes().map(str::to_owned);
    let reader = shared.reader.clone();
    let closed = tokio::task::spawn_blocking(move || {
        let mut list = TopicPartitionList::new();
        for element in reader.assignment()?.elements() {
            if element.partition() == partition && lanes.iter().any(|lane| lane == element.topic()) {
                list.add_partition(element.topic(), partition);
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        reader.incremental_unassign(&list)
    })
    .await;
    match closed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(partition, %error, "cannot unassign the input partitions"),
        Err(error) => tracing::warn!(partition, %error, "cannot unassign the input partitions"),
    }
}

struct Task {
    shared: Arc<Shared>,
    partition: i32,
    partition_label: String,
    topics: OutputTopics,
    store: SchemaStore,
    processor: Processor,
    reorder: ReorderBuffer<Origin>,
    queued: [VecDeque<Queued>; LANES],
    at_eof: [bool; LANES],
    waiting_since: [Option<Instant>; LANES],
    last_record: [Instant; LANES],
    stalled: [bool; LANES],
    caught_up_since: Option<Instant>,
    trackers: Arc<Mutex<[OffsetTracker; LANES]>>,
    batches: mpsc::Sender<Batch>,
    batch: Batch,
    ready: Vec<(Input, Origin)>,
    /// Holds the inputs of contacts waiting for a merge.
    feeder: Feeder<Origin>,
    changes: Vec<StageChange>,
    buffer: Vec<u8>,
    /// `events_consumed` by input and outcome (processed, duplicate, late, restored,
    /// deletion), resolved once.
    consumed: [[prometheus::IntCounter; 5]; LANES],
    /// Inputs the restored state already reflects, per input topic.
    skip: Checkpoint,
    /// Inputs some restored contacts reflect beyond `skip` (a changelog write cut short).
    ahead: Option<Ahead>,
}

impl Task {
    fn new(
        shared: Arc<Shared>,
        partition: i32,
        shard: Arc<Shard>,
        store: SchemaStore,
        trackers: Arc<Mutex<[OffsetTracker; LANES]>>,
        batches: mpsc::Sender<Batch>,
    ) -> Self {
        let config = &shared.config;
        let topics = shared.topics;
        let mut processor = Processor::new(shared.engine.clone(), shard, shared.processing);
        processor.track_touched();
        if shared.processing.merge_identities {
            processor.merge_identities();
        }
        let consumed = std::array::from_fn(|source| {
            [
                outcome::PROCESSED,
                outcome::DUPLICATE,
                outcome::LATE,
                outcome::RESTORED,
                outcome::DELETION,
            ]
            .map(|label| {
                shared
                    .metrics
                    .events_consumed
                    .with_label_values(&[config.topics.lanes()[source], label])
            })
        });
        let now = Instant::now();
        Task {
            partition,
            partition_label: partition.to_string(),
            topics,
            store,
            processor,
            reorder: ReorderBuffer::new(shared.processing.reorder_window_millis),
            queued: Default::default(),
            at_eof: [false; LANES],
            waiting_since: [None; LANES],
            last_record: [now; LANES],
            stalled: [false; LANES],
            caught_up_since: None,
            trackers,
            batches,
            batch: Batch::default(),
            ready: Vec::new(),
            feeder: Feeder::default(),
            changes: Vec::new(),
            buffer: Vec::with_capacity(1024),
            consumed,
            skip: Checkpoint::default(),
            ahead: None,
            shared,
        }
    }

    /// Waits until no other instance holds the partition, restores the shard, then opens the
    /// partition's inputs where the restored state ends.
    async fn start(&mut self) -> [PartitionQueue; LANES] {
        self.await_handover().await;
        self.restore().await;
        let mut backoff = RESTORE_BACKOFF_MIN;
        loop {
            match self.open_inputs().await {
                Ok(queues) => return queues,
                Err(error) => {
                    tracing::error!(
                        partition = self.partition,
                        %error,
                        retry_in_seconds = backoff.as_secs_f64(),
                        "cannot open the input partitions: trying again"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESTORE_BACKOFF_MAX);
                }
            }
        }
    }

    /// Waits while another instance may still hold the partition (see `owners`): its claim
    /// is neither released nor older than the lease (or the instances topic is not read yet).
    /// The partition counts as restoring meanwhile; a wait for another instance is logged,
    /// counted, and logged again every half minute.
    async fn await_handover(&self) {
        let shared = &self.shared;
        let Ok(index) = u32::try_from(self.partition) else {
            return;
        };
        let lease = shared.config.tasks.ownership_lease;
        let started = Instant::now();
        let mut logged: Option<Instant> = None;
        loop {
            match shared.owners.holder(index, Instant::now(), lease) {
                Holder::Free => break,
                Holder::Unknown => {}
                Holder::Other(holder) => {
                    if logged.is_none() {
                        shared.metrics.handover_waits.inc();
                    }
                    if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
                        tracing::info!(
                            partition = self.partition,
                            holder,
                            waited_seconds = started.elapsed().as_secs_f64(),
                            "waiting for the partition's previous owner to release it"
                        );
                        logged = Some(Instant::now());
                    }
                }
            }
            tokio::time::sleep(HANDOVER_POLL).await;
        }
        if logged.is_some() {
            tracing::info!(
                partition = self.partition,
                waited_seconds = started.elapsed().as_secs_f64(),
                "no other instance holds the partition any more"
            );
        }
    }

    /// Assigns partition p of every lane to the input reader, each in a queue of its own, from
    /// the checkpoint's position (the group's committed offset, else `auto.offset.reset`, for a
    /// lane the checkpoint does not cover).
    async fn open_inputs(&self) -> anyhow::Result<[PartitionQueue; LANES]> {
        let shared = &self.shared;
        let lanes = shared.config.topics.lanes();
        let mut queues = Vec::with_capacity(LANES);
        for topic in lanes {
            // Split before assigning, so no record reaches the reader's main queue.
            let queue = shared
                .reader
                .split_partition_queue(topic, self.partition)
                .ok_or_else(|| anyhow::anyhow!("cannot split the queue of {topic} [{}]", self.partition))?;
            queues.push(queue);
        }
        let offsets: [Offset; LANES] =
            std::array::from_fn(|lane| self.skip[lane].position.map_or(Offset::Stored, Offset::Offset));
        // `known`: the checkpoint's positions, stored at once (the lag is known before the
        // first changelog write) and committed with the group's next commit (not at the first
        // changelog write, which a topic without new records would not bring).
        let (mut list, mut known) = (TopicPartitionList::new(), TopicPartitionList::new());
        for (topic, offset) in lanes.into_iter().zip(offsets) {
            list.add_partition_offset(topic, self.partition, offset)?;
            if let Offset::Offset(position) = offset {
                known.add_partition_offset(topic, self.partition, offset)?;
                shared.positions.finished(topic, self.partition, position);
            }
        }
        let reader = shared.reader.clone();
        tokio::task::spawn_blocking(move || reader.incremental_assign(&list)).await??;
        if known.count() > 0 {
            let _ = shared.reader.store_offsets(&known);
        }
        tracing::info!(partition = self.partition, ?offsets, "input partitions opened");
        queues.try_into().map_err(|_| anyhow::anyhow!("one queue per lane"))
    }

    /// Rebuilds the shard from the changelog before any input is processed. A failed read is
    /// retried with backoff (counted, the partition stays restoring and the instance not
    /// ready): starting empty would lose the partition's state.
    async fn restore(&mut self) {
        let shared = self.shared.clone();
        let partition = self.partition;
        let mut backoff = RESTORE_BACKOFF_MIN;
        let restored = loop {
            let started = Instant::now();
            // A few partitions at a time: as fast (the broker is the limit) and lighter than
            // one consumer per assigned partition at once (README "Performance").
            let slot = shared.restore_slots.acquire().await;
            let config = super::kafka::reader_config(&shared.config.kafka);
            let topic = shared.config.topics.changelog.clone();
            let read = tokio::task::spawn_blocking(move || read_changelog(config, &topic, partition)).await;
            drop(slot);
            let error = match read {
                Ok(Ok(restored)) => break (restored, started.elapsed().as_secs_f64()),
                Ok(Err(error)) => format!("{error:#}"),
                Err(error) => error.to_string(),
            };
            shared.metrics.restore_failures.inc();
            tracing::error!(
                partition,
                error,
                retry_in_seconds = backoff.as_secs_f64(),
                "restore failed: the partition waits and tries again"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RESTORE_BACKOFF_MAX);
        };
        let (restored, seconds) = restored;
        let contacts = restored.contacts.len();
        for (key, state) in restored.contacts {
            shared
                .metrics
                .contacts
                .with_label_values(&[shared.engine.model.stage(state.stage).id.as_str()])
                .inc();
            self.processor.restore(key, Box::new(state));
        }
        for (anonymous, contact) in restored.handovers {
            self.processor.restore_handover(anonymous.into(), contact.into());
        }
        // Positions go on from the checkpoint, also for a topic that gets no new record.
        if let Ok(mut trackers) = self.trackers.lock() {
            *trackers = std::array::from_fn(|lane| OffsetTracker::resume(&restored.checkpoint[lane]));
        }
        self.skip = restored.checkpoint;
        if let Some(ahead) = &restored.ahead {
            tracing::info!(
                partition,
                contacts = ahead.contacts.len(),
                "the last changelog write was cut short: its contacts skip the inputs it reflects"
            );
        }
        self.ahead = restored.ahead;
        shared.metrics.restored_records.inc_by(restored.records);
        shared.metrics.restore_seconds.observe(seconds);
        tracing::info!(
            partition,
            contacts,
            records = restored.records,
            seconds,
            "partition restored"
        );
    }

    fn topic(&self, source: usize) -> &str {
        self.shared.config.topics.lanes()[source]
    }

    /// Handles one received record (or an end-of-partition / error event).
    async fn on_record(&mut self, source: usize, received: Result<BorrowedMessage<'_>, KafkaError>) {
        let message = match received {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(_)) => {
                self.at_eof[source] = true;
                self.waiting_since[source] = None;
                return;
            }
            Err(error) => {
                tracing::warn!(partition = self.partition, topic = self.topic(source), %error, "consumer error");
                return;
            }
        };
        self.at_eof[source] = false;
        self.waiting_since[source] = None;
        self.last_record[source] = Instant::now();
        self.stalled[source] = false;
        self.caught_up_since = None;
        let offset = message.offset();
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers[source].received(offset);
        }
        let appended_at = message.timestamp().to_millis();
        let reflected = self.skip[source].contains(offset);
        let decoded = match (message.payload(), message.key()) {
            // Merges between partitions: records of the service's own.
            (payload, _) if source == IDENTITY_LANE => {
                decode_routed(payload.unwrap_or_default()).map_err(|error| DecodeError::Internal(error.to_string()))
            }
            // A tombstone: the key's contact is to be erased.
            (None, Some(key)) => match std::str::from_utf8(key) {
                Ok(id) if !id.is_empty() => {
                    let at = appended_at.map_or_else(self.shared.now, Timestamp::from_millis);
                    Ok(Input::Erase(Erasure::tombstone(id, at)))
                }
                Ok(_) => Err(DecodeError::Empty),
                Err(error) => Err(DecodeError::InvalidUtf8(error.valid_up_to())),
            },
            (payload, _) => self.decode(Source::ALL[source], payload).await.map(Input::Event),
        };
        match decoded {
            Ok(mut event) => {
                // Contacts an interrupted changelog write reached already reflect some inputs.
                let reflected = reflected
                    || self
                        .ahead
                        .as_ref()
                        .is_some_and(|ahead| ahead.reflects(source, offset, &mut event));
                // A reflected input still goes through the merge and the reorder buffer, in
                // its place, to move the partition's clock as it did the first time.
                let origin = Origin {
                    source,
                    offset,
                    // Requests between partitions carry the old time of what caused them.
                    occurred_at: if source == IDENTITY_LANE || reflected {
                        Timestamp::NEVER
                    } else {
                        event.occurred_at()
                    },
                    appended_at: appended_at.filter(|_| !reflected),
                    reflected,
                };
                self.queued[source].push_back(Queued { event, origin });
            }
            // Dead-lettered when it was first read.
            Err(_) if reflected => {
                self.consumed[source][3].inc();
                self.batch.finished.push(Origin {
                    source,
                    offset,
                    occurred_at: Timestamp::NEVER,
                    appended_at: None,
                    reflected,
                });
            }
            Err(error) => self.dead_letter(source, &message, &error).await,
        }
    }

    async fn decode(&mut self, source: Source, payload: Option<&[u8]>) -> Result<ContactEvent, DecodeError> {
        let payload = payload
            .filter(|payload| !payload.is_empty())
            .ok_or(DecodeError::Empty)?;
        let limit = self.shared.config.max_record_bytes;
        if payload.len() > limit {
            return Err(DecodeError::Oversized {
                bytes: payload.len(),
                limit,
            });
        }
        let event = match self.shared.config.input_formats[source.index()] {
            InputFormat::Json => decode_event(payload)?,
            InputFormat::Avro => {
                let (id, _) = split_frame(payload)?;
                if self.store.schema(id).is_none() {
                    self.shared.schemas.fetch(&mut self.store, id).await?;
                }
                self.store.decode(source, payload)?
            }
        };
        if event.source() != source {
            return Err(DecodeError::WrongSource {
                expected: source.as_str(),
                got: event.source().as_str(),
            });
        }
        Ok(event)
    }

    async fn dead_letter(&mut self, source: usize, message: &BorrowedMessage<'_>, error: &DecodeError) {
        let topic = self.topic(source).to_owned();
        let metrics = &self.shared.metrics;
        metrics
            .decode_errors
            .with_label_values(&[topic.as_str(), error.reason()])
            .inc();
        metrics
            .events_consumed
            .with_label_values(&[topic.as_str(), outcome::DEAD_LETTER])
            .inc();
        metrics.dead_letters.with_label_values(&[topic.as_str()]).inc();
        tracing::debug!(topic, offset = message.offset(), reason = error.reason(), %error, "dead letter");
        let offset = message.offset().to_string();
        let message_text = error.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(5);
        for (key, value) in [
            ("error.reason", error.reason()),
            ("error.message", message_text.as_str()),
            ("source.topic", topic.as_str()),
            ("source.partition", self.partition_label.as_str()),
            ("source.offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header {
                    key: &format!("original.{}", header.key),
                    value: header.value,
                });
            }
        }
        let key = message.key().unwrap_or_default().to_vec();
        let payload = message.payload().unwrap_or_default().to_vec();
        let delivery = send(
            &self.shared.producer,
            self.topics.dead_letters,
            &key,
            &payload,
            Some(headers),
        )
        .await;
        self.batch.deliveries.push((self.topics.dead_letters, delivery));
        self.batch.finished.push(Origin {
            source,
            offset: message.offset(),
            occurred_at: Timestamp::NEVER,
            appended_at: message.timestamp().to_millis(),
            reflected: false,
        });
    }

    /// True when every assigned input has been read to its end and nothing is queued.
    fn caught_up(&self) -> bool {
        (0..LANES).all(|source| self.at_eof[source] && self.queued[source].is_empty())
    }

    /// The queue whose head comes next in event-time order, or `None` when the merge must
    /// wait for a topic that has nothing queued and may still deliver earlier events.
    fn next_source(&mut self) -> Option<usize> {
        let max_idle = self.shared.config.tasks.max_task_idle;
        let mut best: Option<usize> = None;
        for source in 0..LANES {
            match self.queued[source].front() {
                Some(head) => {
                    let better = best.is_none_or(|current| {
                        let other = &self.queued[current][0].event;
                        let (at, _, id) = head.event.sort_key();
                        let (other_at, _, other_id) = other.sort_key();
                        (at, source, id) < (other_at, current, other_id)
                    });
                    if better {
                        best = Some(source);
                    }
                }
                None if self.at_eof[source] => {}
                None => {
                    let since = *self.waiting_since[source].get_or_insert_with(Instant::now);
                    if since.elapsed() < max_idle {
                        return None;
                    }
                }
            }
        }
        best
    }

    /// Merges, reorders and processes what can go now, then hands the batch to the acker.
    async fn process_ready(&mut self) {
        let started = Instant::now();
        // Left by the tick: a released reorder buffer, or timers fired on the wall clock.
        let mut processed = !self.ready.is_empty();
        if processed {
            self.process_released().await;
        }
        if !self.changes.is_empty() {
            self.produce_changes().await;
        }
        while let Some(source) = self.next_source() {
            let Some(Queued { event, origin }) = self.queued[source].pop_front() else {
                break;
            };
            self.reorder.push(event, origin, &mut self.ready);
            if !self.ready.is_empty() {
                self.process_released().await;
                processed = true;
                // After the merge waited for a topic, thousands of records may be queued: hand
                // a batch over every `batch_max_records` inputs (between inputs, so the
                // checkpoint stays exact), so their outputs are acknowledged, checkpointed and
                // committed as they go rather than all after the last one.
                if self.batch.finished.len() >= self.shared.config.tasks.batch_max_records {
                    self.flush_batch().await;
                }
            }
        }
        if processed {
            self.shared
                .metrics
                .processing_latency
                .with_label_values(&[self.partition_label.as_str()])
                .observe(started.elapsed().as_secs_f64());
        }
        self.flush_batch().await;
    }

    async fn process_released(&mut self) {
        let shared = self.shared.clone();
        let now = (shared.now)();
        let partition = self.partition as u32;
        let partitions = shared.partitions;
        let here = |request: &Input| {
            request
                .routing_id()
                .is_none_or(|id| partitions <= 1 || partition_for(id.as_bytes(), partitions) == partition)
        };
        let mut released = std::mem::take(&mut self.ready);
        let mut elsewhere = Vec::new();
        let mut conversions = Vec::new();
        for (input, origin) in released.drain(..) {
            if origin.reflected {
                self.processor.pass(&input, &mut self.changes);
                self.consumed[origin.source][3].inc();
                self.batch.finished.push(origin);
                continue;
            }
            let (consumed, finished) = (&self.consumed, &mut self.batch.finished);
            self.feeder.feed(
                &mut self.processor,
                input,
                Some(origin),
                &mut self.changes,
                here,
                &mut elsewhere,
                |processor, input, origin, applied| {
                    let Some(origin) = origin else {
                        return; // a request this partition made for itself
                    };
                    let outcome = match (input, applied) {
                        (_, Some(Applied::Applied)) => 0,
                        (_, Some(Applied::Duplicate)) => 1,
                        (_, Some(Applied::TooLate)) => 2,
                        (Input::Erase(_), None) => 4,
                        // Merge requests and handovers (the identity topic).
                        (_, None) => 0,
                    };
                    consumed[origin.source][outcome].inc();
                    if let (Input::Event(event), Some(Applied::Applied | Applied::TooLate), Some(rules)) =
                        (input, applied, &shared.config.attribution)
                    {
                        if let Some(key) = event.key() {
                            if let Some(state) = processor.shard().get(&key) {
                                conversions.extend(
                                    rules
                                        .conversions(event, &state, now)
                                        .into_iter()
                                        .map(|record| (key.clone(), record)),
                                );
                            }
                        }
                    }
                    finished.push(origin);
                },
            );
        }
        self.ready = released;
        self.produce_changes().await;
        for (key, record) in conversions {
            self.produce_conversion(&key, &record).await;
        }
        for request in elsewhere {
            self.route(&request).await;
        }
    }

    /// Sends a merge request or handover to the partition of its routing id, on the identity
    /// topic.
    async fn route(&mut self, request: &Input) {
        self.buffer.clear();
        if encode_routed(request, &mut self.buffer).is_none() {
            return;
        }
        let id = request.routing_id().unwrap_or_default();
        let partition = partition_for(id.as_bytes(), self.shared.partitions) as i32;
        let delivery = send_to(
            &self.shared.producer,
            self.topics.identity,
            Some(partition),
            id.as_bytes(),
            Some(&self.buffer),
            None,
        )
        .await;
        self.batch.deliveries.push((self.topics.identity, delivery));
    }

    async fn produce_changes(&mut self) {
        let shared = self.shared.clone();
        let model = &shared.engine.model;
        let mut changes = std::mem::take(&mut self.changes);
        for change in changes.drain(..) {
            shared.metrics.record_stage_change(&change, model);
            self.buffer.clear();
            if let Err(error) = shared.encoder.stage_change(&change, model, &mut self.buffer) {
                tracing::error!(%error, "stage change not encodable: dropped");
                continue;
            }
            let delivery = send(
                &shared.producer,
                self.topics.stage_changes,
                change.key.id.as_bytes(),
                &self.buffer,
                None,
            )
            .await;
            self.batch.deliveries.push((self.topics.stage_changes, delivery));
        }
        self.changes = changes;
    }

    async fn produce_conversion(&mut self, key: &ContactKey, record: &ConversionRecord) {
        self.buffer.clear();
        if let Err(error) = self.shared.encoder.conversion(record, &mut self.buffer) {
            tracing::error!(%error, "conversion not encodable: dropped");
            return;
        }
        let delivery = send(
            &self.shared.producer,
            self.topics.conversions,
            key.id.as_bytes(),
            &self.buffer,
            None,
        )
        .await;
        self.batch.deliveries.push((self.topics.conversions, delivery));
    }

    /// Hands the current batch to the acker, with the changelog records of every contact it
    /// changed (timers fired on the wall clock change contacts without any input).
    async fn flush_batch(&mut self) {
        for key in self.processor.take_touched() {
            // The state as it stands now: what the batch's inputs made of it.
            let value = self.processor.shard().get(&key).map(|state| {
                let mut value = Vec::with_capacity(128);
                encode_state(&state, &mut value);
                value
            });
            self.batch.changelog.push((encode_key(&key), value));
        }
        for (anonymous, contact) in self.processor.take_handovers() {
            let value = contact.map(|contact| encode_handed_to(&contact));
            self.batch.changelog.push((handover_key(&anonymous), value));
        }
        if self.batch.deliveries.is_empty() && self.batch.finished.is_empty() && self.batch.changelog.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if self.batches.send(batch).await.is_err() {
            tracing::error!(partition = self.partition, "acknowledgement task is gone");
        }
    }

    /// Periodic work: idle flush, idle timers, the stall watchdog, the state-size gauge.
    fn on_tick(&mut self) {
        let settings = self.shared.config.tasks;
        let metrics = &self.shared.metrics;
        metrics
            .state_contacts
            .with_label_values(&[self.partition_label.as_str()])
            .set(i64::try_from(self.processor.shard().len()).unwrap_or(i64::MAX));
        for source in 0..LANES {
            if self.at_eof[source] || !self.queued[source].is_empty() {
                continue;
            }
            let topic = self.shared.config.topics.lanes()[source];
            let lag = metrics
                .consumer_lag
                .get_metric_with_label_values(&[topic, self.partition_label.as_str()])
                .map_or(0, |gauge| gauge.get());
            if lag > 0 && !self.stalled[source] && self.last_record[source].elapsed() > settings.stall_timeout {
                self.stalled[source] = true;
                metrics.partition_stalls.with_label_values(&[topic]).inc();
                tracing::warn!(
                    topic,
                    partition = self.partition,
                    lag,
                    seconds_without_records = self.last_record[source].elapsed().as_secs_f64(),
                    "input partition stalled: lag but no records"
                );
            }
        }
        if !self.caught_up() {
            self.caught_up_since = None;
            return;
        }
        // Caught up: nothing read later can be older than the wall clock minus the window, so
        // what happened before that goes now rather than when later events push it out.
        let now = (self.shared.now)();
        self.reorder
            .release_through(now.plus_millis(-self.reorder.window_millis()), &mut self.ready);
        let since = *self.caught_up_since.get_or_insert_with(Instant::now);
        if since.elapsed() < settings.idle_flush {
            return;
        }
        if !self.reorder.is_empty() {
            self.reorder.flush(&mut self.ready);
            // Processing needs awaits (producer back-pressure): done by the next
            // `process_ready`, which runs right after this tick.
        }
        if settings.idle_timers && self.reorder.is_empty() && self.ready.is_empty() && now > self.processor.watermark()
        {
            self.processor.advance_to(now, &mut self.changes);
        }
    }
}

/// Sends one record, waiting while the producer's queue is full.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: Option<OwnedHeaders>,
) -> DeliveryFuture {
    send_to(producer, topic, None, key, Some(payload), headers).await
}

/// [`send`] to an explicit partition (`None`: the partitioner's choice), or a tombstone when
/// `payload` is `None`.
async fn send_to(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: &[u8],
    payload: Option<&[u8]>,
    headers: Option<OwnedHeaders>,
) -> DeliveryFuture {
    let mut backoff = Duration::from_millis(1);
    loop {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(headers) = &headers {
            record = record.headers(headers.clone());
        }
        match producer.send_result(record) {
            Ok(delivery) => return delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            Err((error, _)) => {
                tracing::error!(topic, %error, "cannot enqueue an output record; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Waits for every delivery, sending failed records again; false when the producer is gone.
async fn deliver(shared: &Shared, deliveries: Vec<(&'static str, DeliveryFuture)>) -> bool {
    for (topic, mut delivery) in deliveries {
        loop {
            match delivery.await {
                Ok(Ok(_)) => {
                    shared.metrics.records_produced.with_label_values(&[topic]).inc();
                    break;
                }
                Ok(Err((error, message))) => {
                    shared.metrics.output_retries.with_label_values(&[topic]).inc();
                    tracing::warn!(topic, %error, "output delivery failed; sending again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    delivery = send_to(
                        &shared.producer,
                        topic,
                        (message.partition() >= 0).then_some(message.partition()),
                        message.key().unwrap_or_default(),
                        message.payload(),
                        message.headers().map(|headers| headers.as_borrowed().detach()),
                    )
                    .await;
                }
                Err(_) => {
                    tracing::error!(topic, "producer gone before an acknowledgement");
                    return false;
                }
            }
        }
    }
    true
}

/// Waits for each batch's acknowledgements in order, sending failed records again. The
/// changelog records of acknowledged batches are coalesced (a contact's latest state wins) and
/// written every `service.changelog_interval_ms`, followed by a checkpoint of exactly which
/// inputs they reflect; once those are acknowledged the input offsets are stored: outputs, then
/// state, then offsets.
async fn acknowledge(
    shared: Arc<Shared>,
    partition: i32,
    trackers: Arc<Mutex<[OffsetTracker; LANES]>>,
    mut batches: mpsc::Receiver<Batch>,
) {
    let interval = shared.config.tasks.changelog_interval;
    let mut writer = ChangelogWriter {
        topic: shared.topics.changelog,
        partition,
        pending: BTreeMap::new(),
        dirty: false,
        stored: [None; LANES],
    };
    let mut last_write = Instant::now();
    loop {
        let wait = interval.saturating_sub(last_write.elapsed());
        let next = if writer.dirty {
            match tokio::time::timeout(wait, batches.recv()).await {
                Ok(batch) => batch.map(Some),
                Err(_) => Some(None),
            }
        } else {
            batches.recv().await.map(Some)
        };
        let Some(batch) = next else {
            // The task stopped: write what is left, then end.
            writer.write(&shared, &trackers).await;
            return;
        };
        if let Some(batch) = batch {
            if !deliver(&shared, batch.deliveries).await {
                return;
            }
            let now = (shared.now)();
            if let Ok(mut trackers) = trackers.lock() {
                for origin in &batch.finished {
                    if origin.occurred_at != Timestamp::NEVER {
                        let seconds = now.millis_since(origin.occurred_at) as f64 / 1000.0;
                        shared.metrics.end_to_end_latency.observe(seconds.max(0.0));
                    }
                    if let Some(appended) = origin.appended_at {
                        let seconds = (now.millis() - appended) as f64 / 1000.0;
                        shared.metrics.record_latency.observe(seconds.max(0.0));
                    }
                    trackers[origin.source].finished(origin.offset);
                }
            }
            writer.dirty |= !batch.finished.is_empty() || !batch.changelog.is_empty();
            writer.pending.extend(batch.changelog);
        }
        if writer.dirty && (last_write.elapsed() >= interval || writer.pending.len() >= MAX_PENDING_STATES) {
            if !writer.write(&shared, &trackers).await {
                return;
            }
            last_write = Instant::now();
        }
    }
}

/// Contacts whose latest state is waiting to be written, coalesced.
const MAX_PENDING_STATES: usize = 50_000;

/// The changelog side of one partition's acker.
struct ChangelogWriter {
    topic: &'static str,
    partition: i32,
    /// Contact key -> latest encoded state (`None`: gone).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Inputs finished or states changed since the last write.
    dirty: bool,
    /// The offsets stored last, per input topic.
    stored: [Option<i64>; LANES],
}

impl ChangelogWriter {
    /// Sends one record to this partition of the changelog (`None`: a tombstone).
    async fn send(&self, shared: &Shared, key: &[u8], value: Option<&[u8]>) -> (&'static str, DeliveryFuture) {
        let delivery = send_to(&shared.producer, self.topic, Some(self.partition), key, value, None).await;
        (self.topic, delivery)
    }

    /// Writes the pending states and a checkpoint, waits for them, then stores the input
    /// offsets. False when the producer is gone.
    async fn write(&mut self, shared: &Shared, trackers: &Mutex<[OffsetTracker; LANES]>) -> bool {
        if !self.dirty {
            return true;
        }
        let checkpoint: Checkpoint = match trackers.lock() {
            Ok(trackers) => std::array::from_fn(|source| trackers[source].processed()),
            Err(_) => return false,
        };
        let mut value = Vec::new();
        encode_checkpoint(&checkpoint, &mut value);
        let mut deliveries = Vec::with_capacity(self.pending.len() + 2);
        // Opens the write: should a crash cut it short, the restore knows which inputs the
        // states written after this record reflect (see `restore::Ahead`).
        deliveries.push(self.send(shared, &WRITE_BEGUN_KEY, Some(&value)).await);
        for (key, state) in std::mem::take(&mut self.pending) {
            deliveries.push(self.send(shared, &key, state.as_deref()).await);
        }
        deliveries.push(self.send(shared, &CHECKPOINT_KEY, Some(&value)).await);
        if !deliver(shared, deliveries).await {
            return false;
        }
        self.dirty = false;
        let mut list = TopicPartitionList::new();
        for (source, processed) in checkpoint.iter().enumerate() {
            let Some(offset) = processed.position else { continue };
            if self.stored[source] != Some(offset) {
                self.stored[source] = Some(offset);
                let topic = shared.config.topics.lanes()[source];
                let _ = list.add_partition_offset(topic, self.partition, Offset::Offset(offset));
                shared.positions.finished(topic, self.partition, offset);
            }
        }
        // Stored on the reader too: its statistics measure the lag from them.
        if list.count() > 0 {
            if let Err(error) = shared.reader.store_offsets(&list) {
                // After a revocation the partition is no longer ours: benign.
                tracing::debug!(partition = self.partition, %error, "cannot store offsets");
            }
        }
        true
    }
}
