//! Service instances as real processes of the built binary, for tests that kill them.
//!
//! An [`Instance`] runs `lifecycle-scorer run --config FILE`: its configuration is written to
//! the test's directory, its HTTP endpoints listen on a loopback port of their own (also its
//! advertised URL), and its log is appended to `NAME.log` beside the configuration across
//! restarts. It can be killed without warning ([`Instance::kill`], SIGKILL: a crash, an OOM
//! kill, a node lost), stopped gracefully ([`Instance::terminate`], SIGTERM) and started again.
//! A [`Cluster`] owns the directory and the instances: dropping it kills whatever still runs,
//! and when the test is panicking it keeps the directory and prints every instance's log tail
//! then the failure again (with `LIFECYCLE_TEST_KEEP_LOGS` set it keeps the directory of a
//! passing test too).
//!
//! The helpers at the end measure how far a consumer group has committed its input, tell which
//! partitions an instance owns, and make a group rebalance ([`nudge_group`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::broker::{client_config, committed_offsets, end_offsets};
use super::service::try_http_get;

/// The service binary cargo built for the integration tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_lifecycle-scorer");

/// Environment variables starting with this configure the service (`LIFECYCLE_SCORER_LOG`,
/// `LIFECYCLE_SCORER__SECTION__FIELD`): instances are started without them, so a developer's
/// shell cannot change what a test runs.
const ENV_PREFIX: &str = "LIFECYCLE_SCORER_";

/// Set (to anything) to keep the instances' configurations and logs after a passing test too.
pub const KEEP_LOGS_ENV: &str = "LIFECYCLE_TEST_KEEP_LOGS";

/// The instances' log filter (`--log`), `info` when unset; e.g. `info,librdkafka=debug` with
/// `"debug" = "cgrp"` in the consumer properties shows the group protocol.
pub const LOG_FILTER_ENV: &str = "LIFECYCLE_TEST_INSTANCE_LOG";

/// How long a started process may take to answer HTTP (it first checks the topics).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One service process (stopped or running) and everything needed to start it again.
#[derive(Debug)]
pub struct Instance {
    name: String,
    dir: PathBuf,
    bootstrap: String,
    group: String,
    /// TOML appended to the generated `[kafka]` and `[http]` sections.
    settings: String,
    /// The HTTP port of the current (or last) run; a new one is picked on every start.
    port: u16,
    /// `None` while stopped.
    child: Option<Child>,
    launches: u32,
}

impl Instance {
    /// A stopped instance named `name` (also its `client.id` suffix and log file name).
    /// `settings` is TOML for every section but the `[kafka]` table's own fields and `[http]`
    /// (e.g. `[kafka.consumer_properties]` and `[service]`).
    pub fn new(dir: &Path, name: &str, bootstrap: &str, group: &str, settings: &str) -> Instance {
        Instance {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            bootstrap: bootstrap.to_owned(),
            group: group.to_owned(),
            settings: settings.to_owned(),
            port: 0,
            child: None,
            launches: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The HTTP address of the current (or last) run.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// How many times the process was started.
    pub fn launches(&self) -> u32 {
        self.launches
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join(format!("{}.toml", self.name))
    }

    /// The configuration file's text for HTTP on `port`.
    fn config_text(&self, port: u16) -> String {
        format!(
            r#"[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
client_id = "lifecycle-scorer-{name}"
statistics_interval_ms = 1000

[http]
listen = "127.0.0.1:{port}"
advertised_url = "http://127.0.0.1:{port}"

{settings}
"#,
            bootstrap = self.bootstrap,
            group = self.group,
            name = self.name,
            settings = self.settings,
        )
    }

    /// Starts the process (the instance must be stopped) and waits until its HTTP endpoints
    /// answer: it has then checked the topics and is joining the group. Retries on another
    /// port when the one picked was taken meanwhile; panics, with the log's tail, when the
    /// process exits for any other reason or does not answer within a minute.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            self.port = free_port();
            std::fs::write(self.config_path(), self.config_text(self.port)).expect("write the instance's config");
            self.launches += 1;
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .expect("open the instance's log");
            writeln!(
                log,
                "----- launch {} of {} on port {} -----",
                self.launches, self.name, self.port
            )
            .expect("write the instance's log");
            let stderr = log.try_clone().expect("clone the log handle");
            let mut command = Command::new(BINARY);
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with(ENV_PREFIX) {
                    command.env_remove(name);
                }
            }
            let filter = std::env::var(LOG_FILTER_ENV).unwrap_or_else(|_| "info".to_owned());
            let child = command
                .args(["--log", &filter, "run", "--config"])
                .arg(self.config_path())
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|error| panic!("cannot run {BINARY}: {error}"));
            self.child = Some(child);

            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(status) = self.exit_status() {
                    self.child = None;
                    if self.log_tail(2048).contains("cannot listen on") {
                        break; // the port was taken: try another
                    }
                    panic!(
                        "{} exited during start-up ({status}); log tail:\n{}",
                        self.name,
                        self.log_tail(8192)
                    );
                }
                if try_http_get(self.address(), "/healthz").await.is_some() {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} did not answer HTTP within {START_TIMEOUT:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(8192)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("{} found no free port in {ATTEMPTS} attempts", self.name);
    }

    /// Kills the process without warning (SIGKILL) and reaps it. Does nothing when stopped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it to exit; kills it
    /// if it has not. Returns the exit status, or `None` when it had to be killed.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if super::broker::send_sigterm(&child) {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exit_status().is_none()
    }

    /// The exit status if the process has exited (without being stopped through here).
    fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Panics, with the log's tail, when the process was started and has exited on its own.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited on its own ({status}); log tail:\n{}",
                self.name,
                self.log_tail(8192)
            );
        }
    }

    /// `GET path` on the instance; `None` when nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        try_http_get(self.address(), path).await
    }

    /// Waits until `/readyz` answers 200; panics (with the log's tail) after `timeout` or if
    /// the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_alive();
            if matches!(self.get("/readyz").await, Some((200, _))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {timeout:?}; log tail:\n{}",
                self.name,
                self.log_tail(8192)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `bytes` of the instance's log (every launch appends to it).
    pub fn log_tail(&self, bytes: u64) -> String {
        let Ok(mut file) = File::open(self.log_path()) else {
            return "(no log)".to_owned();
        };
        let length = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(bytes)));
        let mut text = Vec::new();
        let _ = file.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last panic's report (location and message). [`Cluster`]'s drop prints it again after
/// the instances' logs, which would otherwise bury it far above the end of the output.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs, once, a panic hook that keeps the report in [`LAST_PANIC`] and then prints it as
/// usual.
fn remember_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = Some(info.to_string());
            }
            print(info);
        }));
    });
}

/// Service instances sharing one directory, broker and consumer group.
#[derive(Debug)]
pub struct Cluster {
    pub instances: Vec<Instance>,
    /// Configurations and logs; dropped after the instances are killed.
    dir: TempDir,
}

impl Cluster {
    /// `names.len()` stopped instances of group `group` on `bootstrap`, all with `settings`
    /// (see [`Instance::new`]).
    pub fn new(names: &[&str], bootstrap: &str, group: &str, settings: &str) -> Cluster {
        remember_panics();
        let dir = tempfile::Builder::new()
            .prefix("lifecycle-instances-")
            .tempdir()
            .expect("create the instances' temp dir");
        let instances = names
            .iter()
            .map(|name| Instance::new(dir.path(), name, bootstrap, group, settings))
            .collect();
        Cluster { instances, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Indexes of the running instances.
    pub fn running(&mut self) -> Vec<usize> {
        (0..self.instances.len())
            .filter(|index| self.instances[*index].is_running())
            .collect()
    }

    /// Panics when an instance that was started has exited on its own.
    pub fn assert_alive(&mut self) {
        for instance in &mut self.instances {
            instance.assert_alive();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for instance in &mut self.instances {
            instance.kill();
        }
        if std::env::var_os(KEEP_LOGS_ENV).is_some() && !std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("instance configs and logs kept in {}", self.dir.path().display());
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("instance configs and logs kept in {}", self.dir.path().display());
            for instance in &self.instances {
                eprintln!(
                    "===== {} (launched {} times), log tail:\n{}",
                    instance.name(),
                    instance.launches(),
                    instance.log_tail(6 * 1024)
                );
            }
            if let Some(report) = LAST_PANIC.lock().ok().and_then(|mut last| last.take()) {
                eprintln!("===== the failure (reported above the logs too):\n{report}");
            }
        }
    }
}

/// A loopback port that was free a moment ago ([`Instance::start`] retries if it is taken).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a probe socket");
    listener.local_addr().expect("probe socket address").port()
}

/// What `group` has not committed yet on `topics`: per (topic, partition), the end offset
/// minus the committed one (the whole partition when nothing is committed).
pub async fn uncommitted(bootstrap: &str, group: &str, topics: &[&str]) -> BTreeMap<(String, i32), i64> {
    let mut lag = BTreeMap::new();
    for topic in topics {
        let committed = committed_offsets(bootstrap, group, topic).await;
        for (partition, end) in end_offsets(bootstrap, topic).await {
            let done = committed.get(&partition).copied().unwrap_or(0);
            lag.insert(((*topic).to_owned(), partition), end - done);
        }
    }
    lag
}

/// The sum of [`uncommitted`]'s lags.
pub fn total_lag(lag: &BTreeMap<(String, i32), i64>) -> i64 {
    lag.values().sum()
}

/// The partitions still lagging, for failure messages: `topic/partition: lag`.
pub fn describe_lag(lag: &BTreeMap<(String, i32), i64>) -> String {
    let lagging: Vec<String> = lag
        .iter()
        .filter(|(_, lag)| **lag != 0)
        .map(|((topic, partition), lag)| format!("{topic}/{partition}: {lag}"))
        .collect();
    if lagging.is_empty() {
        "none".to_owned()
    } else {
        lagging.join(", ")
    }
}

/// The input partitions an instance owns, from its `/metrics` (each owned partition's task
/// reports `lifecycle_state_contacts{partition="N"}`; the series goes when the partition does).
pub fn owned_partitions(metrics: &str) -> BTreeSet<u32> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("lifecycle_state_contacts{partition=\""))
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect()
}

/// Makes `group` rebalance: a plain consumer joins it (subscribed to `topics` with the
/// service's assignor, cooperative-sticky), waits until it is given partitions, and leaves
/// without committing anything. Two generations later the other members share every
/// partition again. Returns whether it joined within a minute.
///
/// For brokers that drop an expired member without starting a new generation (tansu 0.6.0
/// does: the survivors' heartbeats keep succeeding and a leader's re-sync in the same
/// generation gets the old assignment back), so the dropped member's partitions stay
/// unassigned until the membership changes again.
pub async fn nudge_group(bootstrap: &str, group: &str, topics: &[&str]) -> bool {
    let (bootstrap, group) = (bootstrap.to_owned(), group.to_owned());
    let topics: Vec<String> = topics.iter().map(|topic| (*topic).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&bootstrap)
            .set("group.id", &group)
            .set("client.id", "group-nudge")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("create the nudging consumer");
        let subscription: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&subscription)
            .expect("subscribe the nudging consumer");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut joined = false;
        while Instant::now() < deadline {
            // Records fetched meanwhile are dropped: nothing is stored or committed.
            let _ = consumer.poll(Duration::from_millis(100));
            if consumer.assignment().is_ok_and(|assignment| assignment.count() > 0) {
                joined = true;
                break;
            }
        }
        consumer.unsubscribe();
        for _ in 0..5 {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        // Closing the consumer leaves the group.
        drop(consumer);
        joined
    })
    .await
    .expect("the nudging consumer panicked")
}
