//! The binary's commands, run as a user runs them.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lifecycle-scorer"))
}

fn run(command: &mut Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&bytes));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    output
}

/// Generates `contacts` contacts over `days` into `dir/events.jsonl` and returns its path.
fn generate_file(dir: &std::path::Path, contacts: u32, days: u32, seed: u32) -> std::path::PathBuf {
    let events = dir.join("events.jsonl");
    let output = run(
        binary()
            .args([
                "generate",
                "--contacts",
                &contacts.to_string(),
                "--days",
                &days.to_string(),
            ])
            .args(["--seed", &seed.to_string(), "--output"])
            .arg(&events),
        b"",
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    events
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_accepts_the_shipped_file_and_locates_every_problem() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/lifecycle-scorer.toml");
    let output = run(binary().args(["check-config", shipped]), b"");
    assert!(output.status.success(), "{}", text(&output.stdout));
    assert!(
        text(&output.stdout).contains("ok (12 stages, 15 rules, 0 warning(s))"),
        "{}",
        text(&output.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[scoring]\nmodel = \"bg-nbd\"\ntime_unit = \"weeks\"\nr = -1\nalpha = 1\na = 1\nb = 1\nhorizon_days = 0\nrecency_half_life_days = 30\n\n[[stages]]\nid = \"new\"\n\n[[rules]]\nto = \"nowhere\"\nmin_purchase_days = 1\n",
    )
    .unwrap();
    let output = run(binary().args(["check-config"]).arg(&bad), b"");
    assert_eq!(output.status.code(), Some(1));
    let report = text(&output.stdout);
    for expected in [
        "scoring.r: must be a positive number, got -1",
        "scoring.horizon_days",
        "rules[0].to (line 14): unknown stage `nowhere`",
    ] {
        assert!(report.contains(expected), "missing `{expected}` in:\n{report}");
    }
}

#[test]
fn replay_reports_bad_lines_and_carries_on() {
    let input = concat!(
        r#"{"source":"clickstream","event_id":"e1","contact_id":"c1","occurred_at":"2025-01-01T00:00:00Z","type":"signup"}"#,
        "\n",
        "not json\n",
        r#"{"source":"purchase","event_id":"e2","contact_id":"c1","occurred_at":"2025-01-02T00:00:00Z","order_id":"o1","amount":-5,"currency":"EUR","status":"completed"}"#,
        "\n",
        r#"{"source":"clickstream","event_id":"e3","contact_id":"c1","occurred_at":"2025-01-02T00:00:00Z","type":"teleport"}"#,
        "\n",
        "\n",
        r#"{"source":"purchase","event_id":"e4","contact_id":"c1","occurred_at":"2025-01-03T00:00:00Z","order_id":"o1","amount":5,"currency":"EUR","status":"completed"}"#,
        "\n",
    );
    let output = run(binary().args(["replay", "--input", "-"]), input.as_bytes());
    assert!(output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("line 2: invalid JSON"), "{stderr}");
    assert!(
        stderr.contains("line 3: field `amount`: must be a non-negative number, got -5"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: field `type`: unknown value `teleport`"),
        "{stderr}"
    );
    let changes: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let stages: Vec<&str> = changes
        .iter()
        .map(|change| change["to_stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["lead", "customer"]);
    let summary_start = stderr.find("{\n").unwrap();
    let summary: serde_json::Value = serde_json::from_str(&stderr[summary_start..]).unwrap();
    assert_eq!(summary["summary"]["lines"], 5);
    assert_eq!(summary["summary"]["events"], 2);
    assert_eq!(summary["summary"]["errors"]["invalid_json"], 1);
    assert_eq!(summary["summary"]["errors"]["invalid_field"], 1);
    assert_eq!(summary["summary"]["errors"]["unknown_symbol"], 1);
}

#[test]
fn generate_then_replay_is_deterministic_and_writes_state() {
    let dir = tempfile::tempdir().unwrap();
    let events = generate_file(dir.path(), 2000, 120, 5);
    assert!(
        dir.path().join("events.jsonl.truth.jsonl").exists(),
        "ground truth is written beside the events"
    );
    let replay = |state: &std::path::Path| {
        let output = run(
            binary()
                .args(["replay", "--as-of", "2025-06-01", "--input"])
                .arg(&events)
                .arg("--state-out")
                .arg(state),
            b"",
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        output.stdout
    };
    let first = replay(&dir.path().join("state1.jsonl"));
    let second = replay(&dir.path().join("state2.jsonl"));
    assert!(!first.is_empty());
    assert_eq!(first, second, "same input, same bytes");
    let state1 = std::fs::read(dir.path().join("state1.jsonl")).unwrap();
    assert_eq!(state1, std::fs::read(dir.path().join("state2.jsonl")).unwrap());
    for line in text(&state1).lines() {
        let contact: serde_json::Value = serde_json::from_str(line).unwrap();
        let risk = contact["churn_risk"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&risk), "{line}");
        for field in ["stage", "x", "t_x", "T", "p_alive", "expected_purchases"] {
            assert!(contact.get(field).is_some(), "{field} missing in {line}");
        }
    }
    // Event ids are unique, one per transition.
    let mut ids = std::collections::HashSet::new();
    for line in text(&first).lines() {
        let change: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            ids.insert(change["event_id"].as_str().unwrap().to_owned()),
            "duplicate event_id in {line}"
        );
    }
}

#[test]
fn fit_prints_the_published_cdnow_parameters_as_json() {
    let summary = common::shared_data("cdnow_customers_summary.csv");
    let output = run(binary().args(["fit", "--json", "--summary"]).arg(&summary), b"");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let fitted: serde_json::Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    assert_eq!(fitted["model"], "bg-nbd");
    assert_eq!(fitted["time_unit"], "weeks");
    for (name, published) in [("r", 0.243), ("alpha", 4.414), ("a", 0.793), ("b", 2.426)] {
        let value = fitted[name].as_f64().unwrap();
        assert!(
            (value - published).abs() < 0.002,
            "{name} = {value}, published {published}"
        );
    }
    assert!((fitted["log_likelihood"].as_f64().unwrap() + 9582.4).abs() < 0.1);
}

#[test]
fn fit_from_events_recovers_the_generators_parameters() {
    // The generator's buyers follow BG/NBD and Gamma-Gamma with the CDNOW parameters; replaying
    // the stream and fitting must find them again (within sampling error at ~11k buyers).
    let dir = tempfile::tempdir().unwrap();
    let events = generate_file(dir.path(), 40000, 365, 3);
    let output = run(
        binary()
            .args(["fit", "--json", "--time-unit", "weeks", "--events"])
            .arg(&events),
        b"",
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let fitted: serde_json::Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    assert_eq!(fitted["converged"], true);
    let close = |value: &serde_json::Value, truth: f64, tolerance: f64| {
        let value = value.as_f64().unwrap();
        assert!(
            (value / truth - 1.0).abs() < tolerance,
            "{value} vs {truth} in {fitted}"
        );
    };
    close(&fitted["r"], 0.243, 0.15);
    close(&fitted["alpha"], 4.414, 0.15);
    close(&fitted["a"], 0.793, 0.25);
    close(&fitted["b"], 2.426, 0.25);
    let spend = &fitted["gamma_gamma"]["params"];
    close(&spend["p"], 6.25, 0.2);
    close(&spend["q"], 3.74, 0.2);
    close(&spend["v"], 15.44, 0.2);
}
