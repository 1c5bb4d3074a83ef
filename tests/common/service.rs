//! Running the service in-process against a broker, and reading its HTTP endpoints.

use std::time::Duration;

use lifecycle_scorer::codec::json::decode_event;
use lifecycle_scorer::config::Config;
use lifecycle_scorer::domain::{ContactEvent, Input, Timestamp};
use lifecycle_scorer::generate::{generate, GenerateOptions};
use lifecycle_scorer::service::{run, RunOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The default topic names: the three inputs, then stage changes, conversions, dead letters and
/// the instances topic. The service creates the changelog itself ([`CHANGELOG`]) where the
/// broker has an admin API.
pub const TOPICS: [&str; 7] = [
    "clickstream",
    "ad-conversions",
    "purchases",
    "lifecycle.stage-changes",
    "attribution.conversions",
    "lifecycle.dead-letters",
    "lifecycle.instances",
];

/// The default changelog topic name.
pub const CHANGELOG: &str = "lifecycle.state-changelog";

/// The default identity topic name (merges between partitions); created by the service too.
pub const IDENTITY: &str = "lifecycle.identity";

/// Creates every topic of [`TOPICS`] on a real broker with `partitions` partitions each, but
/// the instances topic with one, as deployments create it (docs/operations.md, "Topics"): one
/// batch per claim renewal rather than one per partition the claims hash to.
pub async fn create_service_topics(bootstrap: &str, partitions: i32) {
    let specs: Vec<super::broker::TopicSpec<'_>> = TOPICS
        .iter()
        .map(|name| super::broker::TopicSpec {
            name,
            partitions: if *name == TOPICS[6] { 1 } else { partitions },
            configs: &[],
        })
        .collect();
    super::broker::create_topics(bootstrap, &specs).await;
}

/// A generated stream from 2025-01-01, without the generator's deliberately bad lines.
pub fn generated_events(contacts: u64, days: u32, seed: u64) -> Vec<ContactEvent> {
    let mut lines = Vec::new();
    generate(
        &GenerateOptions {
            contacts,
            days,
            seed,
            start: Timestamp::from_millis(1_735_689_600_000),
        },
        &mut lines,
        None,
    )
    .expect("generate");
    lines
        .split(|byte| *byte == b'\n')
        .filter_map(|line| decode_event(line).ok())
        .filter(|event| event.key().is_some())
        .collect()
}

/// What `replay` writes for `events` processed as the service does with `partitions` input
/// partitions: canonical JSON lines, sorted, and the final state of every contact.
pub fn replay_with_partitions(
    events: &[ContactEvent],
    partitions: u32,
) -> (
    Vec<String>,
    std::collections::BTreeMap<lifecycle_scorer::domain::ContactKey, lifecycle_scorer::domain::ContactState>,
) {
    let inputs: Vec<Input> = events.iter().cloned().map(Input::Event).collect();
    replay_inputs_with_partitions(&inputs, partitions)
}

/// [`replay_with_partitions`] of events and erasure requests, in the given order.
pub fn replay_inputs_with_partitions(
    inputs: &[Input],
    partitions: u32,
) -> (
    Vec<String>,
    std::collections::BTreeMap<lifecycle_scorer::domain::ContactKey, lifecycle_scorer::domain::ContactState>,
) {
    replay_inputs_with_config(inputs, partitions, Config::builtin().expect("built-in config"))
}

/// [`replay_inputs_with_partitions`] with `config`'s stage model and processing settings.
pub fn replay_inputs_with_config(
    inputs: &[Input],
    partitions: u32,
    config: Config,
) -> (
    Vec<String>,
    std::collections::BTreeMap<lifecycle_scorer::domain::ContactKey, lifecycle_scorer::domain::ContactState>,
) {
    let input: String = inputs
        .iter()
        .map(|input| {
            let line = match input {
                Input::Event(event) => lifecycle_scorer::codec::json::encode_event(event),
                Input::Erase(erasure) => lifecycle_scorer::codec::json::encode_erasure(erasure),
                Input::Identify(_) | Input::Adopt(_) => panic!("routed between partitions, never input"),
            };
            line + "\n"
        })
        .collect();
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    let (_, processor) = lifecycle_scorer::replay::replay(
        std::sync::Arc::new(config.engine),
        config.processing,
        input.as_bytes(),
        &mut changes,
        &mut errors,
        lifecycle_scorer::replay::ReplayOptions {
            partitions,
            ..lifecycle_scorer::replay::ReplayOptions::default()
        },
    )
    .expect("replay");
    assert!(errors.is_empty(), "{}", String::from_utf8_lossy(&errors));
    let mut lines: Vec<String> = String::from_utf8(changes)
        .expect("UTF-8")
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .expect("JSON")
                .to_string()
        })
        .collect();
    lines.sort();
    (lines, processor.states().into_iter().collect())
}

/// Canonical JSON of published stage changes, sorted, to compare with [`replay_with_partitions`].
pub fn canonical_changes(records: &[super::broker::ConsumedRecord]) -> Vec<String> {
    let mut lines: Vec<String> = records
        .iter()
        .map(|record| {
            serde_json::from_str::<serde_json::Value>(record.payload_str())
                .expect("JSON")
                .to_string()
        })
        .collect();
    lines.sort();
    lines
}

/// A configuration for `run` against `bootstrap`: the built-in default with the test's own
/// group and `extra` TOML appended (sections the test sets).
pub fn service_config(bootstrap: &str, group: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
statistics_interval_ms = 1000

{extra}
"#
    );
    Config::from_toml(&text, "test", std::iter::empty()).unwrap_or_else(|error| panic!("{error}"))
}

/// A service running on the test's runtime.
pub struct RunningService {
    pub address: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<anyhow::Result<std::sync::Arc<lifecycle_scorer::metrics::Metrics>>>>,
}

impl RunningService {
    /// Starts `run` with `config`, HTTP on a free loopback port.
    pub async fn start(config: Config) -> RunningService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let options = RunOptions {
            config_dir: std::path::PathBuf::from("."),
            now: lifecycle_scorer::http::wall_clock,
        };
        let join = tokio::spawn(run(config, options, listener, async {
            let _ = stopped.await;
        }));
        RunningService {
            address,
            stop: Some(stop),
            join: Some(join),
        }
    }

    /// True while `run` has not returned.
    pub fn is_running(&self) -> bool {
        self.join.as_ref().is_some_and(|join| !join.is_finished())
    }

    /// Asks for a graceful stop and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let join = self.join.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), join)
            .await
            .expect("run returns within the shutdown bound")
            .expect("run does not panic")
            .expect("run ends without error");
        started.elapsed()
    }

    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.address, path).await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.get("/readyz").await.0 == 200 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "service not ready in {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A plain HTTP/1.1 GET over a fresh connection: status code and body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    try_http_get(address, path)
        .await
        .unwrap_or_else(|| panic!("GET {path} on {address} failed"))
}

/// [`http_get`], `None` when nothing answers (yet).
pub async fn try_http_get(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text.split_whitespace().nth(1).and_then(|code| code.parse().ok())?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of one sample line (`name{labels} value`) in a Prometheus text exposition.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line[series.len()..].trim().parse().ok())
}

/// The sum of every sample of a metric whose labels include all of `labels`.
pub fn sum_samples(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Panics unless the published stage changes (canonical, sorted) are exactly `expected`,
/// showing the first differences either way.
pub fn assert_same_changes(published: &[super::broker::ConsumedRecord], expected: &[String]) {
    let got = canonical_changes(published);
    if got != expected {
        let missing: Vec<&String> = expected.iter().filter(|line| !got.contains(line)).take(5).collect();
        let extra: Vec<&String> = got.iter().filter(|line| !expected.contains(line)).take(5).collect();
        panic!(
            "published {} stage changes, replay gives {}\nmissing (first 5): {missing:#?}\nextra (first 5): {extra:#?}",
            got.len(),
            expected.len()
        );
    }
}
