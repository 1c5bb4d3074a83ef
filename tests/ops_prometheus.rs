//! The operations pack checked with the real tools: `promtool` checks and unit-tests the rules
//! of `deploy/prometheus/rules.yml`; every alert has a unit test and a runbook section in
//! `docs/alerts.md`; and a real Prometheus scraping `run --embedded` loads the rules and answers
//! every query of the Grafana dashboard `deploy/grafana/lifecycle-scorer.json`.
//!
//! Needs `promtool` and `prometheus` (2.5 or later): `$LIFECYCLE_SCORER_PROMTOOL` and
//! `$LIFECYCLE_SCORER_PROMETHEUS`, else both on `PATH`. `scripts/install-prometheus` installs
//! Debian's package. A missing tool fails the tests: they never skip.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::service::try_http_get;
use serde_json::Value;

const PROMTOOL_ENV: &str = "LIFECYCLE_SCORER_PROMTOOL";
const PROMETHEUS_ENV: &str = "LIFECYCLE_SCORER_PROMETHEUS";
const INSTALL_HINT: &str = "run scripts/install-prometheus (as root on Debian: installs the `prometheus` \
     package, which provides both), or point LIFECYCLE_SCORER_PROMTOOL and LIFECYCLE_SCORER_PROMETHEUS \
     at Prometheus 2.5 or later";

const RULES: &str = "deploy/prometheus/rules.yml";
const RULES_TEST: &str = "deploy/prometheus/rules_test.yml";
const DASHBOARD: &str = "deploy/grafana/lifecycle-scorer.json";
const RUNBOOKS: &str = "docs/alerts.md";

/// The scrape job of the generated Prometheus configuration (the dashboard's `$job`).
const JOB: &str = "lifecycle-scorer";

/// What a dashboard query must give against the embedded demo.
#[derive(Clone, Copy, Debug)]
enum Demo {
    /// At least one sample with a finite value.
    Data,
    /// Evaluates without error; may be empty (or NaN) in the demo, for the reason given.
    MayBeEmpty(&'static str),
}

const NO_BAD_INPUT: &str = "the demo feeds only valid records: no dead letters, no decode errors";

/// Every target of the dashboard, by panel title and refId, with what the demo gives. The test
/// fails when the dashboard and this list differ: a new panel needs a decision here.
const PANELS: &[(&str, &str, Demo)] = &[
    ("Input records consumed by topic and outcome", "A", Demo::Data),
    ("Output records acknowledged by topic", "A", Demo::Data),
    (
        "Output records acknowledged by topic",
        "B",
        Demo::MayBeEmpty("the mock cluster acknowledges every delivery: no retry series"),
    ),
    ("Consumer lag in records by topic", "A", Demo::Data),
    ("Lag in seconds: broker append to outputs acknowledged", "A", Demo::Data),
    ("Lag in seconds: broker append to outputs acknowledged", "B", Demo::Data),
    ("Lag in seconds: broker append to outputs acknowledged", "C", Demo::Data),
    (
        "Partition stalls",
        "A",
        Demo::MayBeEmpty("no partition stalls for the 60 s stall timeout in the demo"),
    ),
    (
        "End-to-end latency: event time to outputs acknowledged",
        "A",
        Demo::Data,
    ),
    (
        "End-to-end latency: event time to outputs acknowledged",
        "B",
        Demo::Data,
    ),
    (
        "End-to-end latency: event time to outputs acknowledged",
        "C",
        Demo::Data,
    ),
    ("Batch processing time", "A", Demo::Data),
    ("Batch processing time", "B", Demo::Data),
    ("Stage transitions", "A", Demo::Data),
    ("Contacts per stage", "A", Demo::Data),
    ("Churn risk distribution over the time range", "A", Demo::Data),
    ("Churn risk over time", "A", Demo::Data),
    ("Contacts erased and merged", "A", Demo::Data),
    ("Contacts erased and merged", "B", Demo::Data),
    ("Dead letters by topic", "A", Demo::MayBeEmpty(NO_BAD_INPUT)),
    ("Decode errors by topic and reason", "A", Demo::MayBeEmpty(NO_BAD_INPUT)),
    ("Commit failures", "A", Demo::Data),
    ("Rebalances by kind", "A", Demo::Data),
    ("Ready and restoring partitions", "A", Demo::Data),
    ("Ready and restoring partitions", "B", Demo::Data),
    ("Ready and restoring partitions", "C", Demo::Data),
    (
        "Restores over the time range",
        "A",
        Demo::MayBeEmpty(
            "the demo restores its empty partitions in about a second at start, often before the first \
             scrape: no restore in the range, the percentile is NaN",
        ),
    ),
    ("Restores over the time range", "B", Demo::Data),
    ("Restores over the time range", "C", Demo::Data),
    ("Changelog records read while restoring", "A", Demo::Data),
    ("Contacts held per instance", "A", Demo::Data),
    ("CPU", "A", Demo::Data),
    ("Resident memory", "A", Demo::Data),
    ("Open file descriptors and threads", "A", Demo::Data),
    ("Open file descriptors and threads", "B", Demo::Data),
];

/// Key series the embedded demo must produce (through the recording rules where there is one).
const KEY_SERIES: &[&str] = &[
    "job:lifecycle_events_processed:rate5m > 0",
    r#"instance_topic_outcome:lifecycle_events_consumed:rate5m{outcome="processed"} > 0"#,
    "instance_from_to:lifecycle_stage_transitions:rate5m > 0",
    "instance_topic:lifecycle_records_produced:rate5m > 0",
    "lifecycle_contacts > 0",
    "lifecycle_churn_risk_bucket",
    r#"job:lifecycle_record_latency_seconds:quantile_rate5m{quantile="0.99"}"#,
    r#"job:lifecycle_end_to_end_latency_seconds:quantile_rate5m{quantile="0.99"}"#,
    "job_topic:lifecycle_consumer_lag_records:sum",
    "lifecycle_ready == 1",
    // Exported from the start (zero while restores succeed): the alert and the panels that
    // read it have a series to work with.
    "lifecycle_restore_failures_total",
    "process_resident_memory_bytes > 0",
    "process_cpu_seconds_total",
];

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|error| panic!("cannot read {relative}: {error}"))
}

/// A tool from `env`, else `name` on `PATH`; panics with the install hint when neither exists.
fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} does not exist; {INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| panic!("no `{name}`: {env} is unset and `{name}` is not on PATH; {INSTALL_HINT}"))
}

fn promtool(args: &[&str]) -> Output {
    let binary = tool(PROMTOOL_ENV, "promtool");
    Command::new(&binary)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()))
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_check_rules_accepts_the_rules() {
    let output = promtool(&["check", "rules", RULES]);
    assert_success("promtool check rules", &output);
    let (records, alerts) = rule_names(&read(RULES));
    let expected = format!("SUCCESS: {} rules found", records.len() + alerts.len());
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(&expected),
        "expected `{expected}`:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let output = promtool(&["test", "rules", RULES_TEST]);
    assert_success("promtool test rules", &output);
}

// ------------------------------------------------------------------ reading the files

/// Names of the recording rules and of the alerts in `rules.yml` (one `- record:` or
/// `- alert:` per line, as the file is written).
fn rule_names(rules: &str) -> (Vec<String>, Vec<String>) {
    let field = |key: &str| -> Vec<String> {
        rules
            .lines()
            .filter_map(|line| line.trim().strip_prefix(key))
            .map(|name| name.trim().to_owned())
            .collect()
    };
    (field("- record:"), field("- alert:"))
}

/// Each alert's block of `rules.yml`: from its `- alert:` line to the next rule.
fn alert_blocks(rules: &str) -> BTreeMap<String, String> {
    let mut blocks = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in rules.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("- alert:") || trimmed.starts_with("- record:") || trimmed.starts_with("- name:") {
            if let Some((name, block)) = current.take() {
                blocks.insert(name, block);
            }
            if let Some(name) = trimmed.strip_prefix("- alert:") {
                current = Some((name.trim().to_owned(), String::new()));
            }
        }
        if let Some((_, block)) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    if let Some((name, block)) = current {
        blocks.insert(name, block);
    }
    blocks
}

/// Alert names of `rules_test.yml` with a firing case (non-empty `exp_alerts`) and with a
/// quiet case (`exp_alerts: []`).
fn alert_tests(tests: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let mut alertname: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            alertname = Some(name.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = alertname.take().expect("exp_alerts right after its alertname");
            if rest.trim() == "[]" {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    (firing, quiet)
}

/// GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The dashboard's targets: (panel title, refId, expression).
fn dashboard_targets(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut targets = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(panel) = panels.pop() {
        // Collapsed rows hold their panels.
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            targets.push((
                panel["title"].as_str().expect("panel title").to_owned(),
                target["refId"].as_str().expect("refId").to_owned(),
                target["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    targets.sort();
    targets
}

/// A dashboard expression as Grafana sends it for one job and instance.
fn substitute(expr: &str, instance: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "15s")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$job", JOB)
        .replace("$instance", &instance.replace('.', "\\\\."));
    assert!(!out.contains('$'), "unknown template variable left in `{out}`");
    out
}

#[test]
fn every_alert_is_tested_and_has_a_runbook_and_every_panel_is_listed() {
    let rules = read(RULES);
    let (records, alerts) = rule_names(&rules);
    assert!(alerts.len() >= 10, "{alerts:?}");
    let blocks = alert_blocks(&rules);
    assert_eq!(
        blocks.keys().cloned().collect::<BTreeSet<_>>(),
        alerts.iter().cloned().collect()
    );

    // Runbooks: one section per alert, where its runbook_url points.
    let runbooks = read(RUNBOOKS);
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(anchor)
        .collect();
    let mut problems = Vec::new();
    for (alert, block) in &blocks {
        for needed in ["severity:", "summary:", "description:", "runbook_url:"] {
            if !block.contains(needed) {
                problems.push(format!("{alert}: no `{needed}`"));
            }
        }
        let url = block
            .lines()
            .find_map(|line| line.trim().strip_prefix("runbook_url:"))
            .map(|url| url.trim().trim_matches('"').to_owned())
            .unwrap_or_default();
        match url.split_once("docs/alerts.md#") {
            Some((_, fragment)) if fragment == anchor(alert) && anchors.contains(fragment) => {}
            _ => problems.push(format!(
                "{alert}: runbook_url `{url}` is not docs/alerts.md#{} with a `## {alert}` section there",
                anchor(alert)
            )),
        }
    }

    // Unit tests: every alert fires in one case and stays quiet in another; every recording
    // rule is evaluated by a promql_expr_test.
    let tests = read(RULES_TEST);
    let (firing, quiet) = alert_tests(&tests);
    for alert in &alerts {
        if !firing.contains(alert) {
            problems.push(format!("{alert}: no firing case in {RULES_TEST}"));
        }
        if !quiet.contains(alert) {
            problems.push(format!("{alert}: no quiet case (exp_alerts: []) in {RULES_TEST}"));
        }
    }
    for tested in firing.union(&quiet) {
        if !alerts.contains(tested) {
            problems.push(format!("{RULES_TEST} tests `{tested}`, which {RULES} does not define"));
        }
    }
    let exprs: Vec<&str> = tests
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- expr:"))
        .collect();
    for record in &records {
        if !exprs.iter().any(|expr| expr.contains(record.as_str())) {
            problems.push(format!("recording rule {record}: no promql_expr_test in {RULES_TEST}"));
        }
    }

    // The dashboard: templated datasource, job and instance; every target listed in PANELS;
    // every query filtered by job and instance; every recorded series it reads defined.
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    for needed in ["DS_PROMETHEUS", "job", "instance"] {
        if !variables.contains(needed) {
            problems.push(format!("dashboard: no `{needed}` variable"));
        }
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" && panel["datasource"]["uid"] != "${DS_PROMETHEUS}" {
            problems.push(format!(
                "panel `{}`: datasource is not ${{DS_PROMETHEUS}}",
                panel["title"]
            ));
        }
    }
    let targets = dashboard_targets(&dashboard);
    let listed: BTreeSet<(String, String)> = PANELS
        .iter()
        .map(|(title, ref_id, _)| ((*title).to_owned(), (*ref_id).to_owned()))
        .collect();
    let present: BTreeSet<(String, String)> = targets
        .iter()
        .map(|(title, ref_id, _)| (title.clone(), ref_id.clone()))
        .collect();
    for missing in present.difference(&listed) {
        problems.push(format!("dashboard target {missing:?} is not listed in PANELS"));
    }
    for gone in listed.difference(&present) {
        problems.push(format!("PANELS lists {gone:?}, which the dashboard does not have"));
    }
    assert_eq!(listed.len(), PANELS.len(), "PANELS lists a target twice");
    for (title, ref_id, expr) in &targets {
        if !(expr.contains(r#"job="$job""#) && expr.contains(r#"instance=~"$instance""#)) {
            problems.push(format!(
                "{title}/{ref_id}: `{expr}` is not filtered by $job and $instance"
            ));
        }
        for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
            if word.contains(':')
                && word.starts_with(|c: char| c.is_ascii_alphabetic())
                && !records.iter().any(|r| r == word)
            {
                problems.push(format!(
                    "{title}/{ref_id}: reads `{word}`, not a recording rule of {RULES}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ------------------------------------------------------------------ the live check

/// A child process killed (and waited for) when dropped, even when the test panics; then its
/// log is printed.
struct Guard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Guard {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Guard {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Guard { name, child, log }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early ({status}):\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of the {} log:", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// An instant query: `Ok(result vector)`, `Err` with Prometheus' error for a bad query.
/// Panics when Prometheus does not answer.
async fn query(prometheus: SocketAddr, expr: &str) -> Result<Vec<Value>, String> {
    let path = format!("/api/v1/query?query={}", percent_encode(expr));
    let (_, body) = try_http_get(prometheus, &path)
        .await
        .unwrap_or_else(|| panic!("Prometheus on {prometheus} does not answer"));
    let answer: Value =
        serde_json::from_str(&body).unwrap_or_else(|error| panic!("not JSON ({error}) for `{expr}`: {body}"));
    if answer["status"] != "success" {
        return Err(format!("{}: {}", answer["errorType"], answer["error"]));
    }
    Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn has_finite_value(result: &[Value]) -> bool {
    result.iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|value| value.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_embedded_service_and_answers_every_dashboard_query() {
    let started = Instant::now();
    let prometheus_binary = tool(PROMETHEUS_ENV, "prometheus");
    let dir = tempfile::tempdir().unwrap();
    let service_address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let prometheus_address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    // A small stream fed at a fixed rate, so the service keeps consuming while it is scraped.
    let mut service = Guard::spawn(
        "lifecycle-scorer",
        Command::new(env!("CARGO_BIN_EXE_lifecycle-scorer")).args([
            "--log",
            "warn",
            "run",
            "--embedded",
            "--contacts",
            "1000",
            "--partitions",
            "4",
            "--rate",
            "200",
            "--listen",
            &service_address.to_string(),
        ]),
        dir.path().join("lifecycle-scorer.log"),
    );

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{service_address}']\n",
            rules = repo_path(RULES).display()
        ),
    )
    .unwrap();
    let mut prometheus = Guard::spawn(
        "prometheus",
        Command::new(&prometheus_binary).args([
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address={prometheus_address}"),
            "--log.level=warn".to_owned(),
        ]),
        dir.path().join("prometheus.log"),
    );

    let deadline = started + Duration::from_secs(50);
    // Prometheus up, the service scraped.
    loop {
        service.assert_running();
        prometheus.assert_running();
        assert!(Instant::now() < deadline, "the service was never scraped successfully");
        if let Some((200, _)) = try_http_get(prometheus_address, "/-/ready").await {
            let up = query(prometheus_address, &format!(r#"up{{job="{JOB}"}} == 1"#))
                .await
                .unwrap();
            if !up.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let instance = service_address.to_string();

    // The key series, then every dashboard query; retried together until the rates have two
    // scrapes in their windows and the recording rules have run.
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let targets = dashboard_targets(&dashboard);
    let expectations: BTreeMap<(&str, &str), Demo> = PANELS
        .iter()
        .map(|(title, ref_id, demo)| ((*title, *ref_id), *demo))
        .collect();
    let mut empty_in_demo: Vec<String> = Vec::new();
    loop {
        service.assert_running();
        prometheus.assert_running();
        let mut missing = Vec::new();
        empty_in_demo.clear();
        for expr in KEY_SERIES {
            let result = query(prometheus_address, expr)
                .await
                .unwrap_or_else(|error| panic!("key series `{expr}` does not evaluate: {error}"));
            if !has_finite_value(&result) {
                missing.push(format!("key series `{expr}`: {result:?}"));
            }
        }
        for (title, ref_id, expr) in &targets {
            let expr = substitute(expr, &instance);
            let result = query(prometheus_address, &expr)
                .await
                .unwrap_or_else(|error| panic!("panel `{title}` {ref_id}: `{expr}` does not evaluate: {error}"));
            match expectations.get(&(title.as_str(), ref_id.as_str())) {
                Some(Demo::Data) if !has_finite_value(&result) => {
                    missing.push(format!("panel `{title}` {ref_id}: `{expr}` gives {result:?}"))
                }
                Some(Demo::MayBeEmpty(reason)) if !has_finite_value(&result) => {
                    empty_in_demo.push(format!("{title} {ref_id}: {reason}"))
                }
                _ => {}
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no data after {:?}:\n{}",
            started.elapsed(),
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The rule groups are loaded, and every rule has been evaluated without error.
    let (records, alerts) = rule_names(&read(RULES));
    loop {
        let (status, body) = try_http_get(prometheus_address, "/api/v1/rules").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        let groups = answer["data"]["groups"].as_array().cloned().unwrap_or_default();
        let group_names: BTreeSet<&str> = groups.iter().filter_map(|group| group["name"].as_str()).collect();
        assert_eq!(
            group_names,
            BTreeSet::from(["lifecycle-scorer.alerts", "lifecycle-scorer.recording"]),
            "{body}"
        );
        let rules: Vec<&Value> = groups
            .iter()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        let mut loaded_alerts: Vec<String> = rules
            .iter()
            .filter(|rule| rule["type"] == "alerting")
            .map(|rule| rule["name"].as_str().unwrap().to_owned())
            .collect();
        loaded_alerts.sort();
        let mut expected_alerts = alerts.clone();
        expected_alerts.sort();
        assert_eq!(
            loaded_alerts, expected_alerts,
            "alerts loaded against alerts read from {RULES}"
        );
        assert_eq!(rules.len(), records.len() + alerts.len());
        for rule in &rules {
            assert!(
                rule["health"] != "err",
                "rule {} fails: {}",
                rule["name"],
                rule["lastError"]
            );
        }
        if rules.iter().all(|rule| rule["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "rules not all evaluated:\n{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    eprintln!(
        "every dashboard query evaluated in {:?}; empty in the demo, as allowed:\n{}",
        started.elapsed(),
        empty_in_demo.join("\n")
    );
    drop(prometheus);
    drop(service);
}
