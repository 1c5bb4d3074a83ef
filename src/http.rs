//! The HTTP surface: `/metrics`, `/healthz`, `/readyz`, and the query API
//! (`GET /contacts/{id}`, `GET /stages`) over the shards this instance owns.
//!
//! Handlers only read: each shard is a `DashMap` whose single writer is its partition task.
//! A guard is held only while one contact is described, never across an `.await`
//! (dashmap #74, #369). The clock is read here, at the edge, for "time in stage as of now".

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::domain::{ContactKey, Timestamp};
use crate::lifecycle::Engine;
use crate::metrics::Metrics;
use crate::partition::partition_for;
use crate::replay::ContactReport;
use crate::scoring::ChurnScore;
use crate::state::Shard;

/// The shards this instance owns, by partition, and the partition count of the input topics.
#[derive(Debug, Default)]
pub struct OwnedShards {
    /// Partitions of the (co-partitioned) input topics.
    pub partitions: u32,
    /// Owned partition -> its shard. Written on assignment and revocation only.
    pub shards: RwLock<BTreeMap<u32, Arc<Shard>>>,
}

impl OwnedShards {
    /// The shards of `partitions` input partitions, none owned yet.
    pub fn new(partitions: u32) -> Self {
        OwnedShards {
            partitions,
            shards: RwLock::new(BTreeMap::new()),
        }
    }

    /// Starts owning `partition` with `shard`.
    pub fn insert(&self, partition: u32, shard: Arc<Shard>) {
        if let Ok(mut shards) = self.shards.write() {
            shards.insert(partition, shard);
        }
    }

    /// Stops owning `partition`.
    pub fn remove(&self, partition: u32) {
        if let Ok(mut shards) = self.shards.write() {
            shards.remove(&partition);
        }
    }

    /// The shard of `partition`, if owned here.
    pub fn get(&self, partition: u32) -> Option<Arc<Shard>> {
        self.shards.read().ok()?.get(&partition).cloned()
    }

    /// Every owned shard.
    pub fn all(&self) -> Vec<Arc<Shard>> {
        self.shards
            .read()
            .map(|shards| shards.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Tells which instance serves a partition this one does not own.
pub trait OwnerDirectory: Send + Sync + std::fmt::Debug {
    /// The advertised base URL of the instance owning `partition`, if known.
    fn owner(&self, partition: u32) -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send + '_>>;
}

/// What the handlers read.
#[derive(Debug)]
pub struct QueryState {
    /// Stage model and scorer, to describe contacts.
    pub engine: Arc<Engine>,
    /// The owned shards.
    pub shards: Arc<OwnedShards>,
    /// The metrics registry, served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// True once every assigned partition is restored and consuming.
    pub ready: Arc<AtomicBool>,
    /// The current time (the wall clock in the service; fixed in tests).
    pub now: fn() -> Timestamp,
    /// Who owns the partitions this instance does not (none: answer with the partition only).
    pub owners: Option<Arc<dyn OwnerDirectory>>,
}

/// The wall clock, for [`QueryState::now`].
#[allow(clippy::disallowed_methods)] // the edge is where the clock is read
pub fn wall_clock() -> Timestamp {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX));
    Timestamp::from_millis(millis)
}

/// The routes.
pub fn router(state: Arc<QueryState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/contacts/{id}", get(contact))
        .route("/stages", get(stages))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<QueryState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<Arc<QueryState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<QueryState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// `?anonymous=true` looks the id up as an `anonymous_id`.
#[derive(Debug, Deserialize)]
struct ContactQuery {
    #[serde(default)]
    anonymous: bool,
}

/// `GET /contacts/{id}`: the contact's stage, time in stage, history and churn risk with its
/// inputs.
#[derive(Debug, Serialize)]
struct ContactAnswer {
    partition: u32,
    #[serde(flatten)]
    contact: ContactReport,
    churn: ChurnScore,
}

#[derive(Debug, Serialize)]
struct ErrorAnswer {
    error: &'static str,
    partition: u32,
}

/// `421`: another instance owns the contact's partition.
#[derive(Debug, Serialize)]
struct ElsewhereAnswer {
    error: &'static str,
    partition: u32,
    /// The owning instance's base URL, when the group says.
    owner: Option<String>,
}

async fn contact(
    State(state): State<Arc<QueryState>>,
    Path(id): Path<String>,
    Query(query): Query<ContactQuery>,
) -> Response {
    let key = if query.anonymous {
        ContactKey::anonymous(id.as_str())
    } else {
        ContactKey::contact(id.as_str())
    };
    let partition = partition_for(id.as_bytes(), state.shards.partitions);
    let Some(shard) = state.shards.get(partition) else {
        // Another instance of the group owns it: say which, and where to ask.
        let owner = match &state.owners {
            Some(owners) => owners.owner(partition).await,
            None => None,
        };
        let location = owner.as_ref().map(|owner| {
            let suffix = if query.anonymous { "?anonymous=true" } else { "" };
            format!("{}/contacts/{id}{suffix}", owner.trim_end_matches('/'))
        });
        let answer = ElsewhereAnswer {
            error: "the contact's partition is owned by another instance",
            partition,
            owner,
        };
        let mut response = (StatusCode::MISDIRECTED_REQUEST, Json(answer)).into_response();
        if let Some(location) = location.and_then(|location| header::HeaderValue::from_str(&location).ok()) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return response;
    };
    let now = (state.now)();
    let answer = shard.get(&key).map(|contact| ContactAnswer {
        partition,
        contact: ContactReport::new(&state.engine, &key, &contact, now),
        churn: state.engine.scorer.score(&contact, now),
    });
    match answer {
        Some(answer) => Json(answer).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(ErrorAnswer {
                error: "unknown contact",
                partition,
            }),
        )
            .into_response(),
    }
}

#[derive(Debug, Serialize)]
struct StageCount {
    stage: String,
    label: String,
    lost: bool,
    contacts: u64,
    /// Share of all contacts.
    share: f64,
}

#[derive(Debug, Serialize)]
struct StagesAnswer {
    contacts: u64,
    stages: Vec<StageCount>,
    /// Share of contacts in lost stages.
    lost_share: f64,
    partitions_owned: usize,
}

/// `GET /stages`: contacts per stage over the owned shards, and the drop-off into lost stages.
/// Counts by scanning the shards: fine for an analyst's request, not for a dashboard's scrape
/// (the `lifecycle_contacts` gauge is for that).
async fn stages(State(state): State<Arc<QueryState>>) -> Json<StagesAnswer> {
    let model = &state.engine.model;
    let mut counts = vec![0u64; model.stages.len()];
    let shards = state.shards.all();
    for shard in &shards {
        for entry in shard.iter() {
            if let Some(count) = counts.get_mut(usize::from(entry.value().stage.0)) {
                *count += 1;
            }
        }
    }
    let total: u64 = counts.iter().sum();
    let share = |count: u64| if total == 0 { 0.0 } else { count as f64 / total as f64 };
    let lost: u64 = counts
        .iter()
        .zip(&model.stages)
        .filter(|(_, stage)| stage.lost)
        .map(|(count, _)| count)
        .sum();
    Json(StagesAnswer {
        contacts: total,
        stages: model
            .stages
            .iter()
            .zip(&counts)
            .map(|(stage, count)| StageCount {
                stage: stage.id.clone(),
                label: stage.label.clone(),
                lost: stage.lost,
                contacts: *count,
                share: share(*count),
            })
            .collect(),
        lost_share: share(lost),
        partitions_owned: shards.len(),
    })
}
