//! lifecycle-scorer: customer-lifecycle stages and calibrated churn risk from clickstream,
//! ad-conversion and purchase events.
//!
//! ```text
//!  JSON lines / Kafka topics
//!  clickstream ─┐
//!  ad_conversion ├─ codec (decode, validate) ─► processor (one per partition)
//!  purchase ────┘                               │  dedupe (event_id)
//!                                               │  lifecycle::Engine::apply   (pure rules)
//!                                               │  scoring::ChurnScorer       (pure BG/NBD)
//!                                               │  timers: exact due times, swept by a wheel
//!                                               ▼
//!                                     stage changes ─► codec (encode) ─► stdout / topic
//!                                     state shard (DashMap per partition, read by queries)
//! ```
//!
//! # Layout
//!
//! - [`domain`]: events, contact state, stage changes. Plain data.
//! - [`attribution`]: Meta / TikTok shaped conversion records from events (pure).
//! - [`lifecycle`]: the stage model and the engine that applies events and timers (pure).
//! - [`scoring`]: BG/NBD, modified BG/NBD, Gamma-Gamma, maximum-likelihood fitting (pure).
//! - [`processor`]: one partition's work: state lookup, engine, timer wheel (pure).
//! - [`reorder`]: event-time reordering in front of the processor (pure).
//! - [`config`]: TOML + environment -> validated [`config::Config`].
//! - [`codec`]: JSON lines <-> domain (Avro joins with the Kafka service).
//! - [`state`]: the per-partition shard type.
//! - [`replay`], [`generate`], [`fit_command`]: the broker-free commands.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and the query API (an edge).
//! - [`metrics`]: every exported metric's name, help and labels (an edge).
//! - [`process_stats`]: the process's memory figures for benchmark reports.
//! - [`partition`]: the Java clients' murmur2 partitioner, for co-partitioned keys.
//!
//! `domain`, `lifecycle`, `scoring` and `processor` never import tokio, rdkafka, Avro or a
//! metrics crate, and never read the clock: the time is always an argument.

pub mod attribution;
pub mod codec;
pub mod config;
pub mod domain;
pub mod fit_command;
pub mod generate;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod partition;
pub mod process_stats;
pub mod processor;
pub mod reorder;
pub mod replay;
pub mod scoring;
pub mod service;
pub mod state;
