//! Which instance owns a partition, for queries about contacts held elsewhere.
//!
//! Every instance announces the input partitions it is assigned, with its advertised HTTP
//! address, on a small compacted topic (`topics.instances`, keyed by partition), and follows that
//! topic from the beginning, keeping the latest owner of each partition. The group's own
//! description (DescribeGroups) would say the same, but not every Kafka-compatible broker
//! implements it; a topic works on all of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::http::OwnerDirectory;

/// One announcement: the value of a record keyed by the partition number.
#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    /// The owning instance's advertised base URL.
    owner: String,
}

/// The owners seen on the instances topic, and this instance's own address.
#[derive(Debug)]
pub(crate) struct InstanceDirectory {
    own_url: String,
    owners: RwLock<BTreeMap<u32, String>>,
}

impl InstanceDirectory {
    pub(crate) fn new(own_url: String) -> Self {
        InstanceDirectory {
            own_url,
            owners: RwLock::new(BTreeMap::new()),
        }
    }

    /// This instance's advertised URL.
    pub(crate) fn own_url(&self) -> &str {
        &self.own_url
    }

    fn record(&self, partition: u32, owner: String) {
        if let Ok(mut owners) = self.owners.write() {
            owners.insert(partition, owner);
        }
    }
}

impl OwnerDirectory for InstanceDirectory {
    fn owner(&self, partition: u32) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        let owner = self
            .owners
            .read()
            .ok()
            .and_then(|owners| owners.get(&partition).cloned())
            // Still ourselves: revoked, and the next owner has not announced yet.
            .filter(|owner| *owner != self.own_url);
        Box::pin(std::future::ready(owner))
    }
}

/// Announces that this instance now owns `partitions`.
pub(crate) async fn announce(producer: &FutureProducer, topic: &str, own_url: &str, partitions: &[i32]) {
    let value = serde_json::to_vec(&Announcement {
        owner: own_url.to_owned(),
    })
    .unwrap_or_default();
    for partition in partitions {
        let key = partition.to_string();
        let record = FutureRecord::to(topic).key(&key).payload(&value);
        match producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => {}
            Err((error, _)) => tracing::warn!(topic, partition, %error, "cannot announce a partition's owner"),
        }
    }
}

/// Follows the instances topic from its beginning until the task is dropped, recording every
/// announcement in `directory`. `config` is the consumer's client configuration (TLS, SASL).
pub(crate) async fn follow(mut config: ClientConfig, topic: String, directory: Arc<InstanceDirectory>) {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "0")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = match config.create() {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::error!(%error, "cannot follow the instances topic");
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
        tracing::error!(%error, "cannot follow the instances topic");
        return;
    }
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
                    directory.record(partition, announcement.owner);
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

    #[test]
    fn the_latest_announcement_wins_and_our_own_is_not_an_answer() {
        let directory = InstanceDirectory::new("http://me:8080".into());
        directory.record(3, "http://other:8080".into());
        let owner = |partition| futures_util::FutureExt::now_or_never(directory.owner(partition)).flatten();
        assert_eq!(owner(3).as_deref(), Some("http://other:8080"));
        directory.record(3, "http://third:8080".into());
        assert_eq!(owner(3).as_deref(), Some("http://third:8080"));
        directory.record(3, "http://me:8080".into());
        assert_eq!(owner(3), None, "revoked from us, next owner unknown yet");
        assert_eq!(owner(4), None);
    }
}
