//! Which instance owns a partition: for queries about contacts held elsewhere, and for the
//! hand-over of a partition from one owner to the next.
//!
//! Every instance announces the input partitions it holds, with its advertised HTTP address
//! and a token of its own launch, on a small compacted topic (`topics.instances`, keyed by
//! partition): when it is assigned them, again every quarter of `service.ownership_lease_ms`
//! while it holds them, and once more as released when it has drained them. Every instance
//! follows that topic from the beginning. The group's own description (DescribeGroups) would
//! say who owns what, but not every Kafka-compatible broker implements it; a topic works on all
//! of them.
//!
//! The hand-over: a newly assigned partition is restored only once no other launch holds it,
//! that is once every other claim on it is released or has not been renewed for the lease. A
//! group coordinator never assigns a partition to two live members at once, but one that does
//! not wait for every member to rejoin before it answers (tansu 0.6.0) hands the leader stale
//! subscriptions, and the cooperative assignor then gives a partition to a new member while
//! its owner still processes it; two owners writing one changelog partition corrupt its state.
//! The lease also covers an owner that keeps running after the group dropped it (a long pause)
//! for as long as it renews; one that stays silent for the lease is taken for gone.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::http::OwnerDirectory;
use crate::service::kafka::HelperContext;

/// One announcement: the value of a record keyed by the partition number.
#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    /// The announcing instance's advertised base URL.
    owner: String,
    /// Its launch (empty from versions without hand-over).
    #[serde(default)]
    holder: String,
    /// Drained and given up; otherwise held.
    #[serde(default)]
    released: bool,
}

/// The latest announcement of one launch about one partition.
#[derive(Clone, Debug)]
struct Claim {
    owner: String,
    released: bool,
    /// When this instance read it. Not the record's timestamp: that is another machine's
    /// clock, and brokers differ in what they return for records of a compressed batch.
    seen: Instant,
    /// Its place among the announcements about the partition: the highest is the latest.
    sequence: u64,
}

/// The claims seen on the instances topic, and this launch's own address and token.
#[derive(Debug)]
pub(crate) struct InstanceDirectory {
    own_url: String,
    holder: String,
    /// Per partition, per launch.
    claims: RwLock<BTreeMap<u32, BTreeMap<String, Claim>>>,
    /// The topic was read to its end once: before that a claim may be unseen.
    caught_up: AtomicBool,
    sequence: AtomicU64,
}

impl InstanceDirectory {
    /// `holder` must be unique to this launch of the process.
    pub(crate) fn new(own_url: String, holder: String) -> Self {
        InstanceDirectory {
            own_url,
            holder,
            claims: RwLock::new(BTreeMap::new()),
            caught_up: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
        }
    }

    /// This instance's advertised URL.
    pub(crate) fn own_url(&self) -> &str {
        &self.own_url
    }

    fn record(&self, partition: u32, announcement: Announcement, seen: Instant) {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut claims) = self.claims.write() {
            let claims = claims.entry(partition).or_default();
            claims.insert(
                announcement.holder,
                Claim {
                    owner: announcement.owner,
                    released: announcement.released,
                    seen,
                    sequence,
                },
            );
            // Launches long gone: kept as long as they may matter to the HTTP answer.
            if claims.len() > MAX_CLAIMS_PER_PARTITION {
                if let Some(oldest) = claims
                    .iter()
                    .min_by_key(|(_, claim)| claim.sequence)
                    .map(|(holder, _)| holder.clone())
                {
                    claims.remove(&oldest);
                }
            }
        }
    }

    fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
    }

    /// Whether another launch may still hold `partition` at `now`, given the lease: one whose
    /// latest claim is not released and was read within the lease. A claim read while the
    /// topic is caught up on counts from then, so a launch that crashed is waited for a lease
    /// after this instance started at most.
    pub(crate) fn holder(&self, partition: u32, now: Instant, lease: Duration) -> Holder {
        if !self.caught_up.load(Ordering::Acquire) {
            return Holder::Unknown;
        }
        let Ok(claims) = self.claims.read() else {
            return Holder::Unknown;
        };
        claims
            .get(&partition)
            .and_then(|claims| {
                claims
                    .iter()
                    .filter(|(holder, claim)| {
                        **holder != self.holder && !claim.released && now.saturating_duration_since(claim.seen) < lease
                    })
                    .max_by_key(|(_, claim)| claim.sequence)
            })
            .map_or(Holder::Free, |(_, claim)| Holder::Other(claim.owner.clone()))
    }
}

/// Who may hold a partition, for a new owner ([`InstanceDirectory::holder`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// No other launch: the partition may be restored.
    Free,
    /// Another launch, at this address.
    Other(String),
    /// Not known yet: the instances topic is not read to its end.
    Unknown,
}

/// Launches remembered per partition.
const MAX_CLAIMS_PER_PARTITION: usize = 16;

impl OwnerDirectory for InstanceDirectory {
    fn owner(&self, partition: u32) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        let owner = self
            .claims
            .read()
            .ok()
            .and_then(|claims| {
                claims
                    .get(&partition)?
                    .values()
                    .max_by_key(|claim| claim.sequence)
                    .filter(|claim| !claim.released)
                    .map(|claim| claim.owner.clone())
            })
            // Still ourselves: revoked, and the next owner has not announced yet.
            .filter(|owner| *owner != self.own_url);
        Box::pin(std::future::ready(owner))
    }
}

/// Announces that this launch holds `partitions` (or, `released`, has given them up). The
/// records are queued at once, in call order, so a release never overtakes an earlier claim;
/// the returned future waits for their delivery and logs failures.
pub(crate) fn announce(
    producer: &FutureProducer,
    topic: &str,
    directory: &InstanceDirectory,
    partitions: &[i32],
    released: bool,
) -> impl Future<Output = ()> + Send + 'static {
    let value = serde_json::to_vec(&Announcement {
        owner: directory.own_url.clone(),
        holder: directory.holder.clone(),
        released,
    })
    .unwrap_or_default();
    let mut deliveries = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let key = partition.to_string();
        match producer.send_result(FutureRecord::to(topic).key(&key).payload(&value)) {
            Ok(delivery) => deliveries.push((*partition, delivery)),
            Err((error, _)) => tracing::warn!(topic, partition, %error, "cannot announce a partition's owner"),
        }
    }
    let topic = topic.to_owned();
    async move {
        for (partition, delivery) in deliveries {
            let error = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((error, _))) => error.to_string(),
                Err(_) => "the producer is gone".to_owned(),
            };
            tracing::warn!(topic, partition, error, "cannot announce a partition's owner");
        }
    }
}

/// Follows the instances topic from its beginning until the task is dropped, recording every
/// announcement in `directory`, which counts as caught up once every partition of the topic
/// was read to its end. `config` is the consumer's client configuration (TLS, SASL).
pub(crate) async fn follow(mut config: ClientConfig, topic: String, directory: Arc<InstanceDirectory>) {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("statistics.interval.ms", "0")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer<HelperContext> = match config.create_with_context(HelperContext) {
        Ok(consumer) => consumer,
        Err(error) => {
            // The other clients share this configuration: the service fails on its own.
            tracing::error!(%error, "cannot follow the instances topic: partitions are taken over unchecked");
            directory.set_caught_up();
            return;
        }
    };
    let partitions = {
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10));
        metadata
            .ok()
            .and_then(|metadata| metadata.topics().first().map(|topic| topic.partitions().len()))
            .unwrap_or(1)
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let _ = assignment.add_partition_offset(&topic, partition as i32, Offset::Beginning);
    }
    if let Err(error) = consumer.assign(&assignment) {
        tracing::error!(%error, "cannot follow the instances topic: partitions are taken over unchecked");
        directory.set_caught_up();
        return;
    }
    let mut at_end = std::collections::BTreeSet::new();
    loop {
        match consumer.recv().await {
            Ok(message) => {
                let partition = message
                    .key()
                    .and_then(|key| std::str::from_utf8(key).ok())
                    .and_then(|key| key.parse().ok());
                let announcement = message
                    .payload()
                    .and_then(|payload| serde_json::from_slice::<Announcement>(payload).ok());
                if let (Some(partition), Some(announcement)) = (partition, announcement) {
                    directory.record(partition, announcement, Instant::now());
                }
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                at_end.insert(partition);
                if at_end.len() >= partitions {
                    directory.set_caught_up();
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the instances topic");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(5);

    fn claim(owner: &str, holder: &str, released: bool) -> Announcement {
        Announcement {
            owner: owner.into(),
            holder: holder.into(),
            released,
        }
    }

    fn directory() -> InstanceDirectory {
        let directory = InstanceDirectory::new("http://me:8080".into(), "me-1".into());
        directory.set_caught_up();
        directory
    }

    fn after(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn the_latest_claim_wins_and_our_own_or_a_released_one_is_not_an_answer() {
        let directory = directory();
        let now = Instant::now();
        let owner = |partition| futures_util::FutureExt::now_or_never(directory.owner(partition)).flatten();
        directory.record(3, claim("http://other:8080", "other-1", false), now);
        assert_eq!(owner(3).as_deref(), Some("http://other:8080"));
        directory.record(3, claim("http://third:8080", "third-1", false), now);
        assert_eq!(owner(3).as_deref(), Some("http://third:8080"));
        directory.record(3, claim("http://me:8080", "me-1", false), now);
        assert_eq!(owner(3), None, "revoked from us, next owner unknown yet");
        directory.record(4, claim("http://other:8080", "other-1", true), now);
        assert_eq!(owner(4), None, "released, next owner unknown yet");
        assert_eq!(owner(5), None);
    }

    #[test]
    fn a_partition_is_held_elsewhere_until_released_or_the_lease_runs_out() {
        let directory = directory();
        let start = Instant::now();
        let holder = |millis| directory.holder(3, after(start, millis), LEASE);
        let other = Holder::Other("http://other:8080".into());
        assert_eq!(holder(0), Holder::Free, "never claimed");
        directory.record(3, claim("http://other:8080", "other-1", false), after(start, 1_000));
        // Our own claim, read later, does not hide the other one.
        directory.record(3, claim("http://me:8080", "me-1", false), after(start, 1_500));
        assert_eq!(holder(2_000), other);
        assert_eq!(holder(5_999), other);
        assert_eq!(holder(6_000), Holder::Free, "not renewed for the lease: gone");
        // Renewed, then released.
        directory.record(3, claim("http://other:8080", "other-1", false), after(start, 6_500));
        assert_eq!(holder(7_000), other);
        directory.record(3, claim("http://other:8080", "other-1", true), after(start, 7_100));
        assert_eq!(holder(7_200), Holder::Free);
    }

    #[test]
    fn nothing_is_known_before_the_topic_is_read_to_its_end() {
        let directory = InstanceDirectory::new("http://me:8080".into(), "me-1".into());
        let now = Instant::now();
        assert_eq!(directory.holder(3, now, LEASE), Holder::Unknown);
        directory.set_caught_up();
        assert_eq!(directory.holder(3, now, LEASE), Holder::Free);
    }

    #[test]
    fn old_launches_are_forgotten_beyond_a_bound() {
        let directory = directory();
        for launch in 0..100 {
            directory.record(
                3,
                claim("http://other:8080", &format!("other-{launch}"), true),
                Instant::now(),
            );
        }
        let claims = directory.claims.read().unwrap();
        assert_eq!(claims[&3].len(), MAX_CLAIMS_PER_PARTITION);
        assert!(claims[&3].contains_key("other-99"));
    }
}
