//! `netd-controller run` against kube-apiserver + kube-controller-manager
//! 1.20.2 (node IPAM off, as netd-controller assigns pod CIDRs): two
//! replicas, one leader; cloud nodes labelled and tainted; a node deleted
//! and re-registered gets its pod CIDR and VTEP MAC back while a new node
//! gets neither; killing the leader hands over within the lease duration
//! and the new leader carries on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netd::testing::{ControllerManagerOptions, KubeApiServer, KubeCluster};
use serde_json::{json, Value};

const LEASE_DURATION: u64 = 4;
const RETRY_PERIOD: u64 = 1;
const MAC: &str = "0e:11:22:33:44:55";
/// The trusted role label an operator sets on cloud nodes.
const CLOUD_LABEL: &str = netd::model::roles::LABEL_ROLE;

/// A `netd-controller run` process, killed on drop.
struct Replica {
    name: String,
    child: Child,
    metrics_port: u16,
    log: std::path::PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(api: &KubeApiServer, dir: &std::path::Path, name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let token = dir.join("token");
        std::fs::write(&token, api.token()).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_netd-controller"))
            .args(["run", "--kubernetes", &api.url(), "--token-file", token.to_str().unwrap()])
            .args(["--ca-file", api.ca_cert_path().to_str().unwrap(), "--identity", name])
            .args(["--lease-duration", &LEASE_DURATION.to_string(), "--renew-deadline", "3"])
            .args(["--retry-period", &RETRY_PERIOD.to_string()])
            .args(["--allocate-node-cidrs", "--cluster-cidr", "10.244.0.0/16"])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}"), "--log", "debug"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { name: name.into(), child, metrics_port: port, log }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_for<T>(what: &str, limit: Duration, replicas: &[&Replica], mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = replicas.iter().map(|r| format!("== {}\n{}", r.name, r.log())).collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(api: &KubeApiServer, path: &str) -> Option<Value> {
    let (status, body) = api.api("GET", path, None).unwrap();
    (status == 200).then(|| serde_json::from_str(&body).unwrap())
}

fn create_node(api: &KubeApiServer, name: &str, labels: Value) {
    let node = json!({"apiVersion":"v1","kind":"Node","metadata":{"name":name,"labels":labels}});
    let (status, body) = api.api("POST", "/api/v1/nodes", Some(("application/json", &node.to_string()))).unwrap();
    assert_eq!(status, 201, "{body}");
}

fn holder(api: &KubeApiServer) -> Option<String> {
    get(api, "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/netd-controller")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

/// Whether `node` carries the cloud taint (kube-controller-manager adds its
/// own `not-ready` taint beside it: nodes here have no kubelet).
fn has_addon_taint(node: &Value) -> bool {
    node["spec"]["taints"]
        .as_array()
        .is_some_and(|t| t.contains(&json!({"key":"node-role.alibabacloud.com/addon","effect":"NoSchedule"})))
}

fn pod_cidr(api: &KubeApiServer, node: &str) -> Option<String> {
    get(api, &format!("/api/v1/nodes/{node}"))?["spec"]["podCIDR"].as_str().map(str::to_string)
}

#[test]
fn one_leader_writes_nodes_keep_their_cidr_and_mac_and_a_killed_leader_hands_over() {
    let options = ControllerManagerOptions {
        extra_args: vec!["--allocate-node-cidrs=false".into()],
        ..ControllerManagerOptions::default()
    };
    let builder = KubeCluster::builder().controller_manager(true).controller_manager_options(options);
    if !builder.binaries_available().unwrap() {
        return;
    }
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Some(Replica::start(api, dir.path(), "ctl-a"));
    let b = Replica::start(api, dir.path(), "ctl-b");
    let replicas = || -> Vec<&Replica> { a.iter().chain([&b]).collect() };
    let leader = wait_for("a leader", Duration::from_secs(30), &replicas(), || holder(api));
    assert!(leader == "ctl-a" || leader == "ctl-b", "{leader}");

    // Roles: a node an operator labelled with the trusted label is a cloud
    // node; every other node is an edge node, whatever it says itself.
    create_node(api, "cloud-1", json!({CLOUD_LABEL: "cloud"}));
    create_node(api, "edge-a", json!({"alibabacloud.com/is-edge-worker": "true"}));
    create_node(api, "claims-cloud", json!({"alibabacloud.com/is-edge-worker": "false"}));
    let cloud = wait_for("cloud-1 tainted", Duration::from_secs(20), &replicas(), || {
        get(api, "/api/v1/nodes/cloud-1").filter(has_addon_taint)
    });
    assert_eq!(cloud["metadata"]["labels"]["alibabacloud.com/is-edge-worker"], "false");
    let edge_cidr = wait_for("edge-a's pod CIDR", Duration::from_secs(20), &replicas(), || pod_cidr(api, "edge-a"));
    let edge = get(api, "/api/v1/nodes/edge-a").unwrap();
    assert!(!has_addon_taint(&edge), "an edge node is not tainted: {edge}");
    let claims = wait_for("claims-cloud relabelled edge", Duration::from_secs(20), &replicas(), || {
        get(api, "/api/v1/nodes/claims-cloud")
            .filter(|n| n["metadata"]["labels"]["alibabacloud.com/is-edge-worker"] == "true")
    });
    assert!(!has_addon_taint(&claims), "a node's own is-edge-worker=false grants nothing: {claims}");
    // Its netd publishes its VTEP MAC; the controller remembers it.
    let backend = format!(r#"{{"VNI":1,"VtepMAC":"{MAC}"}}"#);
    let patch = json!({"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data": backend}}});
    let (status, _) =
        api.api("PATCH", "/api/v1/nodes/edge-a", Some(("application/merge-patch+json", &patch.to_string()))).unwrap();
    assert_eq!(status, 200);
    wait_for("edge-a's MAC remembered", Duration::from_secs(20), &replicas(), || {
        let memory = get(api, "/api/v1/namespaces/kube-system/configmaps/netd-node-subnets")?;
        memory["data"]["edge-a"].as_str().filter(|r| r.contains(MAC)).map(str::to_string)
    });

    // Deleted (an edge node cut off and cleaned up by someone) and re-registered.
    let (status, _) = api.api("DELETE", "/api/v1/nodes/edge-a", None).unwrap();
    assert_eq!(status, 200);
    wait_for("edge-a gone", Duration::from_secs(10), &replicas(), || {
        get(api, "/api/v1/nodes/edge-a").is_none().then_some(())
    });
    create_node(api, "edge-b", json!({"alibabacloud.com/is-edge-worker": "true"}));
    let other = wait_for("edge-b's pod CIDR", Duration::from_secs(20), &replicas(), || pod_cidr(api, "edge-b"));
    assert_ne!(other, edge_cidr, "a deleted node's subnet is not given to another node");
    create_node(api, "edge-a", json!({"alibabacloud.com/is-edge-worker": "true"}));
    let back = wait_for("edge-a's pod CIDR again", Duration::from_secs(20), &replicas(), || pod_cidr(api, "edge-a"));
    assert_eq!(back, edge_cidr, "re-registered with its old pod CIDR");
    let mac_back = wait_for("edge-a's MAC given back", Duration::from_secs(20), &replicas(), || {
        get(api, "/api/v1/nodes/edge-a")?["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"]
            .as_str()
            .map(str::to_string)
    });
    assert_eq!(mac_back, backend);

    // Only the leader wrote.
    let (lead, follow) = if leader == "ctl-a" { (a.as_ref().unwrap(), &b) } else { (&b, a.as_ref().unwrap()) };
    assert_eq!(lead.metric("netd_controller_leader"), Some(1.0));
    assert_eq!(follow.metric("netd_controller_leader"), Some(0.0));
    assert!(lead.metric("netd_controller_pod_cidrs_assigned_total").unwrap() >= 3.0);
    assert_eq!(lead.metric("netd_controller_pod_cidrs_restored_total"), Some(1.0));
    for counter in ["netd_controller_pod_cidrs_assigned_total", "netd_controller_cloud_nodes_marked_total"] {
        assert_eq!(follow.metric(counter), Some(0.0), "the follower wrote: {counter}");
    }

    // The leader dies without giving the lease up: the other takes over.
    let killed_at = Instant::now();
    let survivor = if leader == "ctl-a" {
        drop(a.take());
        &b
    } else {
        drop(b);
        a.as_ref().unwrap()
    };
    let new_leader =
        wait_for("a new leader", Duration::from_secs(30), &[survivor], || holder(api).filter(|h| *h != leader));
    let handover = killed_at.elapsed();
    eprintln!("handover after {handover:?} (lease duration {LEASE_DURATION} s, retry period {RETRY_PERIOD} s)");
    assert_eq!(new_leader, survivor.name);
    assert!(handover < Duration::from_secs(LEASE_DURATION + 3 * RETRY_PERIOD), "handover took {handover:?}");
    wait_for("the survivor leads", Duration::from_secs(10), &[survivor], || {
        (survivor.metric("netd_controller_leader") == Some(1.0)).then_some(())
    });
    create_node(api, "cloud-2", json!({CLOUD_LABEL: "cloud"}));
    wait_for("cloud-2 tainted by the new leader", Duration::from_secs(20), &[survivor], || {
        get(api, "/api/v1/nodes/cloud-2").filter(has_addon_taint)
    });
}

#[test]
fn rollout_plan_prints_the_batches_one_per_line() {
    let plan = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_netd-controller")).args(["rollout", "plan"]).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(plan(&["--nodes", "100"]).1, "1\n2\n4\n8\n10\n10\n10\n10\n10\n10\n10\n10\n5\n");
    assert_eq!(plan(&["--nodes", "100", "--remaining", "20"]).1, "1\n2\n4\n8\n5\n");
    assert_eq!(plan(&["--nodes", "0"]), (Some(0), String::new(), String::new()));
    let (code, _, stderr) = plan(&["--nodes", "10", "--remaining", "11"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--remaining 11 is more than --nodes 10"), "{stderr}");
    let (code, _, stderr) = plan(&["--nodes", "-3"]);
    assert_eq!(code, Some(2), "{stderr}");
}
