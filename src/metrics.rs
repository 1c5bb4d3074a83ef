//! Every metric the service exports: names, help texts and label sets, in one place.
//!
//! Label values are bounded: topics, partitions, stage ids and reason codes come from
//! configuration or fixed sets, never from event data; a contact id is never a label. Queue
//! depths are exported as pushed/popped counters, not gauges (Vector's convention).
//! An edge: the core never imports this module; the service records what the core returns.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::domain::{ChangeKind, StageChange};
use crate::lifecycle::StageModel;
use crate::state::Shard;

/// `lifecycle_events_consumed_total{topic, outcome}`.
pub const EVENTS_CONSUMED: &str = "lifecycle_events_consumed_total";
/// `lifecycle_decode_errors_total{topic, reason}`.
pub const DECODE_ERRORS: &str = "lifecycle_decode_errors_total";
/// `lifecycle_dead_letters_total{topic}`.
pub const DEAD_LETTERS: &str = "lifecycle_dead_letters_total";
/// `lifecycle_stage_transitions_total{from, to}`.
pub const STAGE_TRANSITIONS: &str = "lifecycle_stage_transitions_total";
/// `lifecycle_contacts{stage}`.
pub const CONTACTS: &str = "lifecycle_contacts";
/// `lifecycle_churn_risk` histogram.
pub const CHURN_RISK: &str = "lifecycle_churn_risk";
/// `lifecycle_end_to_end_latency_seconds` histogram.
pub const END_TO_END_LATENCY: &str = "lifecycle_end_to_end_latency_seconds";
/// `lifecycle_processing_latency_seconds` histogram.
pub const PROCESSING_LATENCY: &str = "lifecycle_processing_latency_seconds";
/// `lifecycle_consumer_lag_records{topic, partition}`.
pub const CONSUMER_LAG: &str = "lifecycle_consumer_lag_records";
/// `lifecycle_rebalances_total{kind}`.
pub const REBALANCES: &str = "lifecycle_rebalances_total";
/// `lifecycle_commit_failures_total`.
pub const COMMIT_FAILURES: &str = "lifecycle_commit_failures_total";
/// `lifecycle_state_contacts{partition}`.
pub const STATE_CONTACTS: &str = "lifecycle_state_contacts";
/// `lifecycle_records_produced_total{topic}`.
pub const RECORDS_PRODUCED: &str = "lifecycle_records_produced_total";
/// `lifecycle_output_retries_total{topic}`.
pub const OUTPUT_RETRIES: &str = "lifecycle_output_retries_total";
/// `lifecycle_record_latency_seconds` histogram.
pub const RECORD_LATENCY: &str = "lifecycle_record_latency_seconds";
/// `lifecycle_partition_stalls_total{topic}`.
pub const PARTITION_STALLS: &str = "lifecycle_partition_stalls_total";
/// `lifecycle_ready`.
pub const READY: &str = "lifecycle_ready";
/// `lifecycle_restored_records_total`.
pub const RESTORED_RECORDS: &str = "lifecycle_restored_records_total";
/// `lifecycle_restore_seconds` histogram.
pub const RESTORE_SECONDS: &str = "lifecycle_restore_seconds";
/// `lifecycle_restore_failures_total`.
pub const RESTORE_FAILURES: &str = "lifecycle_restore_failures_total";
/// `lifecycle_handover_waits_total`.
pub const HANDOVER_WAITS: &str = "lifecycle_handover_waits_total";
/// `lifecycle_restoring_partitions`.
pub const RESTORING_PARTITIONS: &str = "lifecycle_restoring_partitions";
/// `lifecycle_contacts_deleted_total`.
pub const CONTACTS_DELETED: &str = "lifecycle_contacts_deleted_total";
/// `lifecycle_contacts_merged_total`.
pub const CONTACTS_MERGED: &str = "lifecycle_contacts_merged_total";

/// Outcome label values of [`EVENTS_CONSUMED`].
pub mod outcome {
    /// Applied by the engine.
    pub const PROCESSED: &str = "processed";
    /// Already reflected in the state restored from the changelog: skipped.
    pub const RESTORED: &str = "restored";
    /// Dropped as a duplicate `event_id`.
    pub const DUPLICATE: &str = "duplicate";
    /// Too late to change a stage.
    pub const LATE: &str = "late";
    /// Undecodable or invalid: sent to the dead-letter topic.
    pub const DEAD_LETTER: &str = "dead_letter";
    /// A tombstone: an erasure request for its key.
    pub const DELETION: &str = "deletion";
}

/// The registry and every metric in it.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Events consumed, by topic and outcome.
    pub events_consumed: IntCounterVec,
    /// Decode errors, by topic and reason code.
    pub decode_errors: IntCounterVec,
    /// Records sent to the dead-letter topic, by source topic.
    pub dead_letters: IntCounterVec,
    /// Stage transitions, by from/to stage id (`none` for a contact's first stage).
    pub stage_transitions: IntCounterVec,
    /// Contacts per current stage.
    pub contacts: IntGaugeVec,
    /// Churn risk of scored buyers at their transitions.
    pub churn_risk: Histogram,
    /// Event time to output acknowledged, seconds.
    pub end_to_end_latency: Histogram,
    /// Time to process one poll batch, seconds.
    pub processing_latency: HistogramVec,
    /// Consumer lag per owned partition, records.
    pub consumer_lag: IntGaugeVec,
    /// Rebalances, by kind (`assign`, `revoke`).
    pub rebalances: IntCounterVec,
    /// Offset commits that failed.
    pub commit_failures: IntCounter,
    /// Contacts held per owned partition.
    pub state_contacts: IntGaugeVec,
    /// Output records acknowledged by the broker, by topic.
    pub records_produced: IntCounterVec,
    /// Output records sent again after a failed delivery, by topic.
    pub output_retries: IntCounterVec,
    /// From an input's append to the broker to its outputs acknowledged, seconds.
    pub record_latency: Histogram,
    /// Times an input partition was found stalled (lag but no progress), by topic.
    pub partition_stalls: IntCounterVec,
    /// 1 while `/readyz` answers ready.
    pub ready: IntGauge,
    /// Changelog records read while restoring shards.
    pub restored_records: IntCounter,
    /// Time to restore one partition's shard, seconds.
    pub restore_seconds: Histogram,
    /// Restore attempts that failed (each is retried with backoff; the partition waits).
    pub restore_failures: IntCounter,
    /// Assigned partitions that waited for another instance's claim to be released or to
    /// lapse before restoring.
    pub handover_waits: IntCounter,
    /// Partitions assigned and still restoring.
    pub restoring_partitions: IntGauge,
    /// Contacts whose state was erased on request.
    pub contacts_deleted: IntCounter,
    /// Anonymous visitors merged into the contact they turned out to be.
    pub contacts_merged: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
            register(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
            )
        };
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let processing_latency = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    PROCESSING_LATENCY,
                    "Time to process one batch of polled records, seconds",
                )
                .buckets(vec![
                    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
                ]),
                &["partition"],
            )?,
        )?;
        // The standard process metrics (`process_cpu_seconds_total`,
        // `process_resident_memory_bytes`, open file descriptors, threads, start time), read from
        // /proc at each scrape. The crate provides them on Linux only; elsewhere they are absent.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Metrics {
            events_consumed: counter_vec(
                EVENTS_CONSUMED,
                "Input records consumed, by topic and outcome",
                &["topic", "outcome"],
            )?,
            decode_errors: counter_vec(
                DECODE_ERRORS,
                "Input records that could not be decoded, by reason",
                &["topic", "reason"],
            )?,
            dead_letters: counter_vec(
                DEAD_LETTERS,
                "Records sent to the dead-letter topic, by source topic",
                &["topic"],
            )?,
            stage_transitions: counter_vec(STAGE_TRANSITIONS, "Lifecycle stage transitions", &["from", "to"])?,
            contacts: gauge_vec(CONTACTS, "Contacts per current lifecycle stage", &["stage"])?,
            churn_risk: histogram(
                CHURN_RISK,
                "Churn risk (P(no purchase in the horizon)) of buyers at their stage transitions",
                (1..=20).map(|step| f64::from(step) * 0.05).collect(),
            )?,
            end_to_end_latency: histogram(
                END_TO_END_LATENCY,
                "From an input's event time to its outputs acknowledged by the broker, seconds",
                latency_buckets.clone(),
            )?,
            processing_latency,
            consumer_lag: gauge_vec(
                CONSUMER_LAG,
                "Records between the end of an owned input partition and the position finished there",
                &["topic", "partition"],
            )?,
            rebalances: counter_vec(REBALANCES, "Consumer group rebalances seen, by kind", &["kind"])?,
            commit_failures: register(
                &registry,
                IntCounter::new(COMMIT_FAILURES, "Offset commits that failed")?,
            )?,
            state_contacts: gauge_vec(
                STATE_CONTACTS,
                "Contacts held in the state of each owned partition",
                &["partition"],
            )?,
            records_produced: counter_vec(
                RECORDS_PRODUCED,
                "Output records acknowledged by the broker, by topic",
                &["topic"],
            )?,
            output_retries: counter_vec(
                OUTPUT_RETRIES,
                "Output records sent again after a failed delivery, by topic",
                &["topic"],
            )?,
            record_latency: histogram(
                RECORD_LATENCY,
                "From an input's append to the broker to its outputs acknowledged, seconds",
                latency_buckets.clone(),
            )?,
            partition_stalls: counter_vec(
                PARTITION_STALLS,
                "Times an input partition had lag but made no progress for the stall timeout",
                &["topic"],
            )?,
            ready: register(
                &registry,
                IntGauge::new(
                    READY,
                    "1 while the instance is ready (every assigned partition consuming)",
                )?,
            )?,
            restored_records: register(
                &registry,
                IntCounter::new(RESTORED_RECORDS, "Changelog records read while restoring shards")?,
            )?,
            restore_seconds: histogram(
                RESTORE_SECONDS,
                "Time to restore one partition's shard from the changelog, seconds",
                vec![0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
            )?,
            restore_failures: register(
                &registry,
                IntCounter::new(
                    RESTORE_FAILURES,
                    "Attempts to restore a partition's shard from the changelog that failed (retried with backoff)",
                )?,
            )?,
            handover_waits: register(
                &registry,
                IntCounter::new(
                    HANDOVER_WAITS,
                    "Assigned partitions that waited for another instance to release them (or for its claim to lapse) before restoring",
                )?,
            )?,
            restoring_partitions: register(
                &registry,
                IntGauge::new(RESTORING_PARTITIONS, "Partitions assigned and still restoring")?,
            )?,
            contacts_deleted: register(
                &registry,
                IntCounter::new(CONTACTS_DELETED, "Contacts whose state was erased on request")?,
            )?,
            contacts_merged: register(
                &registry,
                IntCounter::new(
                    CONTACTS_MERGED,
                    "Anonymous visitors merged into the contact they turned out to be",
                )?,
            )?,
            registry,
        })
    }

    /// Counts a stage change: the transition, and the contacts per stage.
    pub fn record_stage_change(&self, change: &StageChange, model: &StageModel) {
        if change.kind != ChangeKind::Transition {
            // The contact's state ends here: erased, or merged into the contact it turned out
            // to be.
            match change.kind {
                ChangeKind::Deleted => self.contacts_deleted.inc(),
                _ => self.contacts_merged.inc(),
            }
            if let Some(from) = change.from {
                self.contacts.with_label_values(&[model.stage(from).id.as_str()]).dec();
            }
            return;
        }
        let to = model.stage(change.to).id.as_str();
        let from = change.from.map_or("none", |stage| model.stage(stage).id.as_str());
        self.stage_transitions.with_label_values(&[from, to]).inc();
        self.contacts.with_label_values(&[to]).inc();
        if change.from.is_some() {
            self.contacts.with_label_values(&[from]).dec();
        }
        if let Some(risk) = change.churn_risk {
            self.churn_risk.observe(risk);
        }
    }

    /// Forgets a shard this instance no longer owns: its contacts leave the per-stage gauge,
    /// and its per-partition series (the lag of each of `lanes`, the topics it read) are
    /// removed.
    pub fn forget_shard(&self, shard: &Shard, model: &StageModel, partition: i32, lanes: &[&str]) {
        for entry in shard.iter() {
            self.contacts
                .with_label_values(&[model.stage(entry.value().stage).id.as_str()])
                .dec();
        }
        let label = partition.to_string();
        let _ = self.state_contacts.remove_label_values(&[label.as_str()]);
        let _ = self.processing_latency.remove_label_values(&[label.as_str()]);
        for topic in lanes {
            let _ = self.consumer_lag.remove_label_values(&[topic, label.as_str()]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding metric families we built ourselves into memory cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Registers `metric` in `registry` and returns it (a handle: clones share the value).
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::json::decode_event;
    use crate::config::Config;
    use crate::processor::Processor;
    use crate::state::new_shard;
    use std::sync::Arc;

    #[test]
    fn stage_changes_are_counted_and_rendered() {
        let config = Config::builtin().unwrap();
        let engine = Arc::new(config.engine);
        let mut processor = Processor::new(engine.clone(), Arc::new(new_shard(0)), config.processing);
        let mut out = Vec::new();
        for line in [
            r#"{"source":"clickstream","event_id":"e1","contact_id":"c1","occurred_at":"2025-01-01T00:00:00Z","type":"signup"}"#,
            r#"{"source":"purchase","event_id":"e2","contact_id":"c1","occurred_at":"2025-01-02T00:00:00Z","order_id":"o","amount":5,"currency":"EUR","status":"completed"}"#,
        ] {
            processor.process(&decode_event(line.as_bytes()).unwrap(), &mut out);
        }
        let metrics = Metrics::new().unwrap();
        for change in &out {
            metrics.record_stage_change(change, &engine.model);
        }
        metrics
            .events_consumed
            .with_label_values(&["purchases", outcome::PROCESSED])
            .inc();
        let text = metrics.render();
        for expected in [
            r#"lifecycle_stage_transitions_total{from="none",to="lead"} 1"#,
            r#"lifecycle_stage_transitions_total{from="lead",to="customer"} 1"#,
            r#"lifecycle_contacts{stage="customer"} 1"#,
            r#"lifecycle_contacts{stage="lead"} 0"#,
            "lifecycle_churn_risk_count 1",
            r#"lifecycle_events_consumed_total{outcome="processed",topic="purchases"} 1"#,
            "# HELP lifecycle_commit_failures_total Offset commits that failed",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
    }
}
