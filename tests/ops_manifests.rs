//! The deployment files (deploy/k8s/, Dockerfile) against the service they deploy.
//!
//! `scripts/check-deploy` validates them on their own (Kubernetes and prometheus-operator
//! schemas, hadolint, selectors and named ports); it must pass, and it fails this test when it
//! cannot run (its checkers are installed on first use). On top of that these tests read the
//! manifests (as JSON, from `scripts/check-deploy --json`) and hold them against the service:
//! the ConfigMap's configuration passes the binary's `check-config` and loads with the
//! StatefulSet's environment overrides applied, the container port is `http.listen`'s, the
//! probes hit /readyz and /healthz, and the grace period covers `service.shutdown_timeout`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

use lifecycle_scorer::config::Config;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The pod the environment overrides are resolved for.
const POD: &str = "lifecycle-scorer-0";
const NAMESPACE: &str = "lifecycle";
/// After the drain (bounded by `service.shutdown_timeout_seconds`) the service gives the
/// producer up to 5 s to flush (`src/service/mod.rs`) before it exits.
const PRODUCER_FLUSH_SECONDS: u64 = 5;

/// Runs `scripts/check-deploy` (everything must pass), then reads the manifests through its
/// `--json` mode. Once per test binary; every test fails with the same report when it fails.
fn manifests() -> &'static Value {
    static MANIFESTS: OnceLock<Result<Value, String>> = OnceLock::new();
    let loaded = MANIFESTS.get_or_init(|| {
        let script = format!("{ROOT}/scripts/check-deploy");
        let output = Command::new(&script)
            .output()
            .map_err(|error| format!("cannot run {script}: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "scripts/check-deploy failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let output = Command::new(&script)
            .arg("--json")
            .output()
            .map_err(|error| format!("cannot run {script} --json: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "scripts/check-deploy --json failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        serde_json::from_slice(&output.stdout).map_err(|error| format!("check-deploy --json printed no JSON: {error}"))
    });
    match loaded {
        Ok(manifests) => manifests,
        Err(report) => panic!("{report}"),
    }
}

/// The one document of `kind` in deploy/k8s.
fn one(kind: &str) -> &'static Value {
    let found = all(kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} in deploy/k8s, found {}",
        found.len()
    );
    found[0]
}

fn all(kind: &str) -> Vec<&'static Value> {
    manifests()
        .as_object()
        .unwrap()
        .values()
        .flat_map(|docs| docs.as_array().unwrap())
        .filter(|doc| doc["kind"] == kind)
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_else(|| panic!("not a string: {value}"))
}

fn container() -> &'static Value {
    let containers = one("StatefulSet")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "one container expected");
    &containers[0]
}

/// The configuration file the pods run with: the ConfigMap key mounted at the `--config` path.
fn config_file() -> (&'static str, &'static str) {
    let args: Vec<&str> = container()["args"].as_array().unwrap().iter().map(text).collect();
    let at = args
        .iter()
        .position(|arg| *arg == "--config")
        .expect("--config in args");
    let path = args[at + 1];
    let (dir, key) = path.rsplit_once('/').unwrap();
    let mount = container()["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mount| mount["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}, where --config {path} points"));
    let volume = one("StatefulSet")["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .unwrap();
    let config_map = one("ConfigMap");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    let toml = config_map["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no key {key}, which --config {path} reads"));
    (path, toml)
}

/// The container's `LIFECYCLE_SCORER__*` variables as the pod `POD` in `NAMESPACE` sees them:
/// field references resolved and `$(VAR)` expanded as the kubelet does.
fn environment_overrides() -> Vec<(String, String)> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut overrides = Vec::new();
    for env in container()["env"].as_array().unwrap() {
        let name = text(&env["name"]).to_owned();
        let value = if let Some(value) = env["value"].as_str() {
            let mut value = value.to_owned();
            for (var, resolved) in &seen {
                value = value.replace(&format!("$({var})"), resolved);
            }
            assert!(!value.contains("$("), "{name}: unresolved reference in {value}");
            value
        } else {
            match env["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => POD.to_owned(),
                Some("metadata.namespace") => NAMESPACE.to_owned(),
                other => panic!("{name}: unexpected valueFrom {other:?}"),
            }
        };
        seen.insert(name.clone(), value.clone());
        if name.starts_with(lifecycle_scorer::config::ENV_PREFIX) {
            overrides.push((name, value));
        }
    }
    overrides
}

/// The configuration a pod runs with: the ConfigMap's file plus the StatefulSet's overrides,
/// through the service's own loading and validation.
fn pod_config() -> Config {
    let (path, toml) = config_file();
    Config::from_toml(toml, path, environment_overrides().into_iter())
        .unwrap_or_else(|error| panic!("the pod's configuration does not load: {error}"))
}

fn listen_port() -> u16 {
    pod_config().service.listen.port()
}

fn container_port(name: &str) -> u16 {
    let port = container()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|port| port["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"));
    u16::try_from(port["containerPort"].as_u64().unwrap()).unwrap()
}

/// A probe's or Service's port (a name or a number) as a number.
fn resolve_port(port: &Value) -> u16 {
    match port.as_str() {
        Some(name) => container_port(name),
        None => u16::try_from(port.as_u64().unwrap()).unwrap(),
    }
}

#[test]
fn check_deploy_passes() {
    manifests();
}

#[test]
fn config_map_passes_check_config() {
    let (path, toml) = config_file();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(path.rsplit('/').next().unwrap());
    std::fs::write(&file, toml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lifecycle-scorer"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "check-config rejects the ConfigMap's file:\n{stdout}"
    );
    assert!(stdout.contains("0 warning(s)"), "{stdout}");
}

#[test]
fn statefulset_environment_sets_static_membership_and_the_advertised_url() {
    let config = pod_config();
    let consumer = &config.service.kafka.consumer_properties;
    assert_eq!(
        consumer["group.instance.id"], POD,
        "static membership from the pod name"
    );
    assert_eq!(consumer["partition.assignment.strategy"], "cooperative-sticky");
    let headless = text(&one("StatefulSet")["spec"]["serviceName"]);
    assert_eq!(
        config.service.advertised_url,
        format!(
            "http://{POD}.{headless}.{NAMESPACE}.svc.cluster.local:{}",
            config.service.listen.port()
        ),
        "the pod's stable DNS name through the headless Service, on the listen port"
    );
    let service = all("Service")
        .into_iter()
        .find(|service| service["metadata"]["name"] == headless)
        .unwrap();
    assert_eq!(service["spec"]["clusterIP"], "None");
}

#[test]
fn ports_match_http_listen() {
    let port = listen_port();
    assert_eq!(container_port("http"), port, "container port vs http.listen");
    for service in all("Service") {
        for service_port in service["spec"]["ports"].as_array().unwrap() {
            assert_eq!(resolve_port(&service_port["targetPort"]), port, "{service}");
        }
    }
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let exposed: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("EXPOSE "))
        .collect();
    assert_eq!(exposed, [port.to_string()], "Dockerfile EXPOSE vs http.listen");
}

#[test]
fn probes_hit_healthz_and_readyz() {
    let port = listen_port();
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container()[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(resolve_port(&get["port"]), port, "{probe} port");
    }
    let monitor = one("ServiceMonitor");
    for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
        assert_eq!(endpoint["path"], "/metrics");
    }
}

#[test]
fn grace_period_covers_the_graceful_shutdown() {
    let config = pod_config();
    let shutdown = config.service.tasks.shutdown_timeout.as_secs_f64();
    let grace = one("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace as f64 > shutdown + PRODUCER_FLUSH_SECONDS as f64,
        "terminationGracePeriodSeconds {grace} must exceed service.shutdown_timeout_seconds {shutdown} \
         + {PRODUCER_FLUSH_SECONDS} s of producer flush"
    );
    // Static membership only avoids the rebalance when the pod is back within the session
    // timeout, and stopping alone may take the whole grace period.
    let session_ms: u64 = config.service.kafka.consumer_properties["session.timeout.ms"]
        .parse()
        .unwrap();
    assert!(
        session_ms > grace * 1000,
        "session.timeout.ms {session_ms} must exceed terminationGracePeriodSeconds {grace}"
    );
}

#[test]
fn image_defaults_match_the_pod() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let (path, _) = config_file();
    let cmd = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("CMD "))
        .expect("CMD in the Dockerfile");
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    assert_eq!(
        cmd,
        ["run", "--config", path],
        "the image's default config path is the pod's"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("USER in the Dockerfile");
    let (uid, gid) = user.split_once(':').unwrap();
    let context = &one("StatefulSet")["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(context["runAsUser"].as_u64(), Some(uid.parse().unwrap()));
    assert_eq!(context["runAsGroup"].as_u64(), Some(gid.parse().unwrap()));
    assert_eq!(context["runAsNonRoot"], true);
}
