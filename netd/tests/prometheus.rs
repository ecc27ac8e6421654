//! The monitoring of `deploy/monitoring/` against a real Prometheus
//! (Debian's `prometheus` and `promtool`, which `cargo xtask setup`
//! installs):
//!
//! - the PrometheusRule manifest carries exactly the groups of the plain
//!   rules file, the PodMonitors name ports the DaemonSets declare, and
//!   every `netd_*` name the rules and the dashboard use is documented in
//!   the metrics reference (no root, no Prometheus);
//! - `promtool check rules` accepts the rules and `promtool test rules`
//!   passes their unit tests (no root);
//! - the real processes, in one node namespace this test makes: `netd run`
//!   (with the pin keeper on a kube-apiserver 1.20.2 "in the cloud"), the
//!   tunnel server and an agent linked to it, `netd-controller run`, the
//!   edge hub `netd hub`; a `prometheus` beside them scrapes their
//!   `/metrics` with the jobs and relabeling of `prometheus.yml` (its
//!   `kubernetes_sd_configs` replaced by static targets carrying the labels
//!   Kubernetes discovery would give, plus one that the relabeling must
//!   drop; the hub by the static job the file's comment shows) and
//!   evaluates the rules file. Every target is up with the job and instance labels the rules
//!   and the dashboard expect, every rule loads with health `ok`, and every
//!   query of the dashboard, with Grafana's variables substituted as
//!   Grafana would, returns at least one series.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{self, Cluster, KubeApiServer, NetNs, NetdProcess};
use netd::tunnel::certs::CertificateAuthority;
use serde_json::{json, Value};

const MONITORING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const METRICS_REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/src/reference/metrics.md");
const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
/// Where Prometheus listens, inside the test's node namespace.
const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";
/// Grafana's `$__rate_interval` for a 1 s scrape interval: four intervals.
const RATE_INTERVAL: &str = "4s";

/// The scraped processes: job (the DaemonSet's app.kubernetes.io/name),
/// the container port name the manifests give their /metrics, and the
/// port each listens on here (the deploy/ ports, in the test's namespace).
const TARGETS: [(&str, &str, u16); 4] = [
    ("netd", "health", 9617),
    ("netd-tunnel-server", "metrics", 10266),
    ("netd-tunnel-agent", "metrics", 10268),
    ("netd-controller", "metrics", 10267),
];

/// The edge hub: no pod, so no job of `prometheus.yml`; scraped by a
/// job of its own as the file's comment shows (a node-local agent).
const HUB_JOB: &str = "netd-hub";
const HUB_METRICS_PORT: u16 = 10269;

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|value| !value.is_null())
        .collect()
}

fn rules() -> Value {
    yaml_file(&Path::new(MONITORING).join("netd-rules.yaml"))
}

fn dashboard() -> Value {
    let path = Path::new(MONITORING).join("netd-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(nested);
        }
    }
    all
}

/// Every query of the dashboard: (panel title, expr as written).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(dashboard).into_iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            assert!(!expr.trim().is_empty(), "panel {title:?}: empty expr");
            queries.push((title.clone(), expr.to_string()));
        }
    }
    queries
}

/// A dashboard query as Grafana sends it with "All" instances selected.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL).replace("$instance", ".*")
}

/// The `netd_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("netd_") {
        let starts_word =
            at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric() && rest.as_bytes()[at - 1] != b'_';
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if starts_word {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap().to_string();
            exprs.push((name, rule["expr"].as_str().unwrap().to_string()));
        }
    }
    exprs
}

/// Whether a tool a test needs is missing: it is skipped (saying so), or,
/// where privileged tests must run, fails.
fn missing(tool: &str) -> bool {
    if Path::new(tool).is_file() {
        return false;
    }
    assert!(!testing::privileged_required(), "{tool} is missing: run `sudo cargo xtask setup` (Debian's prometheus)");
    eprintln!("skipped: {tool} is missing (`sudo cargo xtask setup` installs Debian's prometheus)");
    true
}

#[test]
fn the_prometheus_rule_manifest_carries_the_rules_file_and_pod_monitors_name_declared_ports() {
    let plain = rules();
    let operator = yaml_file(&Path::new(MONITORING).join("prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(operator["spec"]["groups"], plain["groups"], "prometheusrule.yaml and netd-rules.yaml differ");

    // Each rule alerts with a severity, a summary, a description and a `for:`
    // unless it counts events (an increase over a window needs none).
    for group in plain["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(["info", "warning", "critical"].contains(&severity), "{name}: severity {severity:?}");
            for annotation in ["summary", "description"] {
                assert!(rule["annotations"][annotation].is_string(), "{name}: no {annotation}");
            }
            let expr = rule["expr"].as_str().unwrap();
            assert!(rule["for"].is_string() || expr.contains("increase("), "{name}: no `for:`");
        }
    }

    // The PodMonitors and the scrape configuration select the ports the
    // DaemonSets declare, by the same names.
    let mut declared = BTreeMap::new();
    for file in std::fs::read_dir(DEPLOY).unwrap().map(|e| e.unwrap().path()) {
        if file.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        for object in yaml_documents(&file).into_iter().filter(|o| o["kind"] == "DaemonSet") {
            let app = object["metadata"]["labels"]["app.kubernetes.io/name"].as_str().unwrap().to_string();
            let ports: BTreeMap<String, u64> = object["spec"]["template"]["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap()))
                .collect();
            declared.insert(app, ports);
        }
    }
    let monitors = yaml_documents(&Path::new(MONITORING).join("podmonitors.yaml"));
    assert_eq!(monitors.len(), TARGETS.len());
    for (job, port_name, port) in TARGETS {
        assert_eq!(declared[job].get(port_name), Some(&u64::from(port)), "{job}: container port {port_name}");
        let monitor = monitors.iter().find(|m| m["metadata"]["name"] == job).unwrap_or_else(|| panic!("no {job}"));
        assert_eq!(monitor["kind"], "PodMonitor");
        assert_eq!(monitor["spec"]["jobLabel"], "app.kubernetes.io/name", "{job}: job label (NetdTargetDown)");
        assert_eq!(monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], job);
        assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], port_name, "{job}");
    }
    let config = yaml_file(&Path::new(MONITORING).join("prometheus.yml"));
    let jobs: Vec<&str> =
        config["scrape_configs"].as_array().unwrap().iter().map(|j| j["job_name"].as_str().unwrap()).collect();
    assert_eq!(jobs, TARGETS.map(|(job, _, _)| job));
}

#[test]
fn every_metric_of_the_rules_and_the_dashboard_is_documented_and_the_dashboard_is_well_formed() {
    let reference = std::fs::read_to_string(METRICS_REFERENCE).unwrap();
    let dashboard = dashboard();
    let mut used = BTreeSet::new();
    for (_, expr) in rule_exprs(&rules()).into_iter().chain(dashboard_queries(&dashboard)) {
        used.extend(metric_names(&expr));
    }
    assert!(used.len() > 40, "only {} metric names found: {used:?}", used.len());
    let undocumented: Vec<_> = used.iter().filter(|name| !reference.contains(&format!("`{name}`"))).collect();
    assert!(undocumented.is_empty(), "not in docs/src/reference/metrics.md: {undocumented:?}");

    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "no datasource variable"
    );
    let rows: Vec<&str> =
        panels(&dashboard).iter().filter(|p| p["type"] == "row").map(|p| p["title"].as_str().unwrap()).collect();
    for row in ["Node data plane", "IPAM pins", "Tunnel", "Controller"] {
        assert!(rows.iter().any(|r| r.starts_with(row)), "no {row:?} row in {rows:?}");
    }
    for panel in panels(&dashboard).into_iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {}", panel["title"]);
    }
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    if missing(PROMTOOL) {
        return;
    }
    let dir = Path::new(MONITORING);
    for args in [["check", "rules", "netd-rules.yaml"], ["test", "rules", "netd-rules.test.yaml"]] {
        let out = std::process::Command::new(PROMTOOL).args(args).current_dir(dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The value of the unlabelled sample `name` in a /metrics body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `curl` inside `ns`: the body of a 2xx answer, `None` otherwise.
fn curl(ns: &NetNs, args: &[&str]) -> Option<String> {
    let mut all = vec!["-sS", "--fail", "--noproxy", "*", "-m", "5"];
    all.extend_from_slice(args);
    let out = ns.exec("curl", &all).ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET /api/v1/<path>` of the Prometheus inside `ns`, its `data`.
fn prometheus_api(ns: &NetNs, path: &str, query: Option<&str>) -> Option<Value> {
    let url = format!("http://{PROMETHEUS_ADDR}/api/v1/{path}");
    let body = match query {
        Some(query) => curl(ns, &["-G", "--data-urlencode", &format!("query={query}"), &url])?,
        None => curl(ns, &[&url])?,
    };
    let answer: Value = serde_json::from_str(&body).ok()?;
    (answer["status"] == "success").then(|| answer["data"].clone())
}

fn wait_for<T>(what: &str, limit: Duration, logs: impl Fn() -> String, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The scrape configuration the test hands Prometheus: the jobs of
/// `prometheus.yml`, relabeling and all, with static targets carrying the
/// `__meta_kubernetes_*` labels Kubernetes discovery would give the
/// DaemonSets' pods (Debian's Prometheus is built without it), and a 1 s
/// interval. Beside each real target, its pod's other declared ports,
/// which the relabeling must drop.
fn scrape_config(rules_file: &Path) -> Value {
    let mut config = yaml_file(&Path::new(MONITORING).join("prometheus.yml"));
    let target = |job: &str, port_name: &str, port: u16| {
        json!({
            "targets": [format!("127.0.0.1:{port}")],
            "labels": {
                "__meta_kubernetes_namespace": "kube-system",
                "__meta_kubernetes_pod_name": format!("{job}-x7k2p"),
                "__meta_kubernetes_pod_node_name": "node-1",
                "__meta_kubernetes_pod_phase": "Running",
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": job,
                "__meta_kubernetes_pod_container_port_name": port_name,
                "__meta_kubernetes_pod_container_port_number": port.to_string(),
            }
        })
    };
    for job in config["scrape_configs"].as_array_mut().unwrap() {
        let name = job["job_name"].as_str().unwrap().to_string();
        let (_, port_name, port) = TARGETS.into_iter().find(|(j, _, _)| *j == name).unwrap();
        let job = job.as_object_mut().unwrap();
        assert!(job.remove("kubernetes_sd_configs").is_some(), "{name}: no kubernetes_sd_configs");
        let mut statics = vec![target(&name, port_name, port)];
        if name == "netd-tunnel-server" {
            statics.push(target(&name, "agents", 10262));
        }
        job.insert("static_configs".into(), Value::Array(statics));
        job.insert("scrape_interval".into(), json!("1s"));
        job.insert("scrape_timeout".into(), json!("1s"));
    }
    config["scrape_configs"].as_array_mut().unwrap().push(json!({
        "job_name": HUB_JOB,
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{
            "targets": [format!("127.0.0.1:{HUB_METRICS_PORT}")],
            "labels": { "node": "node-1", "namespace": "kube-system", "instance": format!("node-1:{HUB_METRICS_PORT}") },
        }],
    }));
    let config = config.as_object_mut().unwrap();
    config.insert("global".into(), json!({ "scrape_interval": "1s", "evaluation_interval": "1s" }));
    config.insert("rule_files".into(), json!([rules_file]));
    Value::Object(config.clone())
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_real_prometheus_scrapes_netd_loads_the_rules_and_answers_every_dashboard_query() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    if missing(PROMETHEUS) {
        return;
    }
    let started = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path();

    // One node on the underlay; kube-apiserver "in the cloud" on it.
    let cluster = Cluster::bare(1).unwrap();
    let node = &cluster.nodes[0];
    let api = KubeApiServer::new_on(cluster.control_plane()).unwrap();
    let token_file = dir.join("token");
    let ca_file = dir.join("kube-ca.pem");
    std::fs::write(&token_file, api.token()).unwrap();
    std::fs::write(&ca_file, api.ca_cert_pem().unwrap()).unwrap();
    let (token, kube_ca) = (token_file.to_str().unwrap(), ca_file.to_str().unwrap());
    let log = |name: &str| dir.join(format!("{name}.log"));

    // netd run: the overlay on the embedded registry, the pin keeper on a
    // netd-ipam store named by a conflist, its pods from the API server.
    let registry = dir.join("registry.db");
    let network = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry, &network).unwrap();
    let conf_dir = dir.join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conflist = json!({ "cniVersion": "1.0.0", "name": "mon", "plugins": [{
        "type": "bridge",
        "ipam": { "type": "netd-ipam", "dataDir": dir.join("ipam"), "ranges": [[{ "subnet": "10.244.1.0/24" }]] }
    }]});
    std::fs::write(conf_dir.join("10-mon.conflist"), conflist.to_string()).unwrap();
    let daemon_dir = dir.join("daemon");
    std::fs::create_dir_all(&daemon_dir).unwrap();
    let mut args = testing::netd_run_args(&node.name, &format!("embedded:{}", registry.display()), &daemon_dir);
    args.extend(
        [
            format!("--pods=kubernetes:{}", api.url()),
            "--token-file".into(),
            token.into(),
            "--ca-file".into(),
            kube_ca.into(),
            // The keeper publishes its gauges every grace/4 (at most 30 s):
            // a short grace has netd_pods_synced at 1 within a second.
            "--pin-grace=4s".into(),
            "--cni-conf-dir".into(),
            conf_dir.to_str().unwrap().into(),
            format!("--health-addr=127.0.0.1:{}", TARGETS[0].2),
        ]
        .map(Into::into),
    );
    let _daemon = NetdProcess::spawn(&node.ns, Path::new(env!("CARGO_BIN_EXE_netd")), &args, &log("netd")).unwrap();

    // The tunnel: a server on the node's loopback and an agent linked to it.
    let pki = dir.join("tunnel");
    std::fs::create_dir_all(&pki).unwrap();
    let day = Duration::from_secs(86_400);
    let ca = CertificateAuthority::generate("netd monitoring test CA", day).unwrap();
    ca.write_cert(&pki).unwrap();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    ca.issue_server("tunnel-server", &[], &[loopback], day).unwrap().write(&pki, "server").unwrap();
    ca.issue_node(&node.name, &[IpAddr::V4(node.public_ip())], day).unwrap().write(&pki, "node").unwrap();
    let pki = pki.to_str().unwrap();
    let server_args = [
        "tunnel-server",
        "--cert-dir",
        pki,
        "--address",
        "127.0.0.1",
        "--agents-listen",
        "127.0.0.1:10262",
        "--connect-listen",
        "127.0.0.1:10265",
        "--dnat-listen",
        "",
        "--http-listen",
        "",
        "--metrics-listen",
        &format!("127.0.0.1:{}", TARGETS[1].2),
    ];
    let netd_cloud = Path::new(env!("CARGO_BIN_EXE_netd-cloud"));
    let _server = NetdProcess::spawn(&node.ns, netd_cloud, server_args, &log("tunnel-server")).unwrap();
    let agent_args =
        ["tunnel-agent", "--server", "127.0.0.1:10262", "--cert-dir", pki, "--metrics-listen", "127.0.0.1:10268"];
    let netd_bin = Path::new(env!("CARGO_BIN_EXE_netd"));
    let _agent = NetdProcess::spawn(&node.ns, netd_bin, agent_args, &log("tunnel-agent")).unwrap();

    // The controller, leading alone.
    let controller_args = [
        "run",
        "--kubernetes",
        &api.url(),
        "--token-file",
        token,
        "--ca-file",
        kube_ca,
        "--identity",
        "monitoring-test",
        "--metrics-listen",
        &format!("127.0.0.1:{}", TARGETS[3].2),
    ];
    let controller_bin = Path::new(env!("CARGO_BIN_EXE_netd-controller"));
    let _controller = NetdProcess::spawn(&node.ns, controller_bin, controller_args, &log("controller")).unwrap();

    // The edge hub in front of the same API server, with the node's client
    // certificate from the cluster CA, caching.
    let issued = api.ca().issue_node(&node.name, &[], day).unwrap();
    let hub_cert = dir.join("hub-client.pem");
    std::fs::write(&hub_cert, format!("{}{}", issued.cert_pem(), issued.key_pem())).unwrap();
    let hub_args = [
        "hub".to_string(),
        format!("--node-name={}", node.name),
        format!("--server={}", api.url()),
        format!("--ca-file={kube_ca}"),
        format!("--client-cert={}", hub_cert.display()),
        "--listen=127.0.0.1:10261".into(),
        format!("--metrics-listen=127.0.0.1:{HUB_METRICS_PORT}"),
        format!("--cache-dir={}", dir.join("hub-cache").display()),
        "--probe-interval=1s".into(),
        "--cache=true".into(),
    ];
    let _hub = NetdProcess::spawn(&node.ns, netd_bin, hub_args, &log("hub")).unwrap();

    let logs = || {
        ["netd", "tunnel-server", "tunnel-agent", "controller", "hub", "prometheus"]
            .map(|name| format!("== {name}\n{}", std::fs::read_to_string(log(name)).unwrap_or_default()))
            .join("\n")
    };
    // Prometheus starts once every endpoint answers in that state, so its
    // first scrapes already see every family.
    wait_for("every /metrics answering, the agent linked", Duration::from_secs(30), logs, || {
        let bodies: Vec<String> = TARGETS
            .iter()
            .map(|(_, _, port)| curl(&node.ns, &[&format!("http://127.0.0.1:{port}/metrics")]).unwrap_or_default())
            .collect();
        // The healthy state the rules must find quiet: ready, registry
        // reached, pod view synced, agent linked, one leader.
        let ready = ["netd_ready", "netd_registry_connected", "netd_pods_synced"]
            .iter()
            .all(|name| sample(&bodies[0], name) == Some(1.0))
            && bodies[0].lines().any(|line| line.starts_with("netd_ipam_pins{"))
            && sample(&bodies[1], "netd_tunnel_agents") == Some(1.0)
            && sample(&bodies[2], "netd_tunnel_agent_links_up") == Some(1.0)
            && sample(&bodies[3], "netd_controller_leader") == Some(1.0)
            && curl(&node.ns, &[&format!("http://127.0.0.1:{HUB_METRICS_PORT}/metrics")])
                .is_some_and(|body| sample(&body, "netd_hub_cloud_reachable") == Some(1.0));
        ready.then_some(())
    });
    let processes_up = started.elapsed();

    let rules_file = Path::new(MONITORING).join("netd-rules.yaml").canonicalize().unwrap();
    let config_file = dir.join("prometheus.json");
    std::fs::write(&config_file, scrape_config(&rules_file).to_string()).unwrap();
    let prometheus_args: Vec<String> = vec![
        format!("--config.file={}", config_file.display()),
        format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
        format!("--web.listen-address={PROMETHEUS_ADDR}"),
        "--log.level=warn".into(),
    ];
    let _prometheus =
        NetdProcess::spawn(&node.ns, Path::new(PROMETHEUS), &prometheus_args, &log("prometheus")).unwrap();

    // Every target up, with the job and instance labels of prometheus.yml's
    // relabeling; the pods' other ports dropped.
    let targets = wait_for("Prometheus scraping every target", Duration::from_secs(30), logs, || {
        let data = prometheus_api(&node.ns, "targets", None)?;
        let active = data["activeTargets"].as_array()?.clone();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        (up == TARGETS.len() + 1).then_some(data)
    });
    let active = targets["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), TARGETS.len() + 1, "{active:#?}");
    let labels: BTreeSet<(String, String)> = active
        .iter()
        .map(|t| {
            let labels = &t["labels"];
            (labels["job"].as_str().unwrap().to_string(), labels["instance"].as_str().unwrap().to_string())
        })
        .collect();
    let expected: BTreeSet<(String, String)> = TARGETS
        .iter()
        .map(|(job, _, port)| (job.to_string(), format!("node-1:{port}")))
        .chain([(HUB_JOB.to_string(), format!("node-1:{HUB_METRICS_PORT}"))])
        .collect();
    assert_eq!(labels, expected);
    for target in active {
        for (label, value) in [("node", "node-1"), ("namespace", "kube-system")] {
            assert_eq!(target["labels"][label], value, "{target:#?}");
        }
    }
    assert!(
        targets["droppedTargets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["discoveredLabels"]["__address__"] == "127.0.0.1:10262"),
        "the tunnel server's agents port was not dropped: {targets:#?}"
    );

    // The instance variable's query lists every target's instance.
    let variable = dashboard()["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "instance")
        .cloned()
        .unwrap();
    let definition = variable["definition"].as_str().unwrap();
    let (selector, label) = definition
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|args| args.rsplit_once(", "))
        .unwrap_or_else(|| panic!("instance variable: {definition}"));
    let url = format!("http://{PROMETHEUS_ADDR}/api/v1/label/{label}/values");
    let body = curl(&node.ns, &["-G", "--data-urlencode", &format!("match[]={selector}"), &url]).unwrap();
    let values: BTreeSet<String> = serde_json::from_str::<Value>(&body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(values, expected.iter().map(|(_, instance)| instance.clone()).collect(), "{definition}");

    // Every dashboard query returns data once a few scrapes are in.
    let queries = dashboard_queries(&dashboard());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let empty: Vec<&(String, String)> = queries
            .iter()
            .filter(|(_, expr)| {
                let data = prometheus_api(&node.ns, "query", Some(&as_grafana_sends(expr)));
                data.is_none_or(|d| d["result"].as_array().is_none_or(|r| r.is_empty()))
            })
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "dashboard queries without data: {empty:#?}\n{}", logs());
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every rule loaded and evaluated without error; none of the alerts
    // fires on this healthy stage.
    let expected_rules: BTreeSet<String> = rule_exprs(&rules()).into_iter().map(|(name, _)| name).collect();
    let loaded = wait_for("the rules evaluated", Duration::from_secs(20), logs, || {
        let data = prometheus_api(&node.ns, "rules", None)?;
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")));
        (evaluated && rules.len() == expected_rules.len()).then_some(rules)
    });
    let names: BTreeSet<String> = loaded.iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, expected_rules);
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "{rule:#?}");
        assert_eq!(rule["state"], "inactive", "an alert fires on a healthy stage: {rule:#?}\n{}", logs());
    }
    eprintln!(
        "{} dashboard queries, {} rules: processes up after {:.1}s, done after {:.1}s",
        queries.len(),
        loaded.len(),
        processes_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
