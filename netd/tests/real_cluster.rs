//! netd as it is deployed: the image `cargo xtask image` builds, `kubectl
//! apply -f deploy/` on real kubelets 1.20.2 and Debian's containerd (a
//! cloud node and two edge nodes, see `netd::testing::RealCluster`), pods
//! that get their addresses from netd-ipam through containerd's CNI call.
//!
//! One story, one cluster (it takes a minute to come up):
//! 1. every DaemonSet of `deploy/` Running and Ready on the nodes it
//!    selects, the CNI plugin and conflist installed on each node by the
//!    netd DaemonSet itself, every node Ready;
//! 2. a StatefulSet with one pod on each edge node: addresses from each
//!    node's pod CIDR, a ping across nodes over flannel.1;
//! 3. a sandbox killed and removed under the kubelet with `ctr`: the kubelet
//!    re-creates it and the pod keeps its address;
//! 4. `kubectl rollout restart` of the StatefulSet: every pod keeps its
//!    address;
//! 5. a deleted pod's address is freed by netd's pin keeper after the grace
//!    period (set short by hand, as an operator would: `kubectl set env`,
//!    then the OnDelete roll of netd's pods).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use netd::testing::{self, RealCluster, RealNode, Role, CLOUD_NODE_IP, WORKLOAD_IMAGE};
use serde_json::{json, Value};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const NS: &str = "kube-system";
/// Long enough for a first start of every pod on two shared cores.
const SLOW: Duration = Duration::from_secs(180);

fn json_of(cluster: &RealCluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cluster.kubectl(&all).unwrap()).unwrap()
}

fn apply(cluster: &RealCluster, object: &Value) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), object.to_string()).unwrap();
    cluster.kubectl(&["apply", "-f", &file.path().to_string_lossy()]).unwrap();
}

/// The tunnel's certificates and settings, as README's install steps make
/// them: the servers' certificate in Secret netd-tunnel-server, each edge
/// node's in its /etc/netd/tunnel, the agents' ConfigMap. The cluster CA
/// signs them (as with `netd-join` on Kubernetes).
fn install_tunnel_credentials(cluster: &RealCluster) {
    let ca = cluster.kube().unwrap().api().ca();
    let year = Duration::from_secs(365 * 24 * 3600);
    let dir = tempfile::tempdir().unwrap();
    ca.issue_server("netd-tunnel-server", &[], &[IpAddr::V4(CLOUD_NODE_IP)], year)
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    ca.write_cert(dir.path()).unwrap();
    let from = |name: &str| format!("--from-file={name}={}", dir.path().join(name).display());
    cluster
        .kubectl(&[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "netd-tunnel-server",
            &from("server.crt"),
            &from("server.key"),
            &from("ca.crt"),
        ])
        .unwrap();
    for node in cluster.nodes().iter().filter(|n| n.role == Role::Edge) {
        let tunnel = node.host_path("/etc/netd").join("tunnel");
        ca.issue_node(&node.name, &[IpAddr::V4(node.ip)], year).unwrap().write(&tunnel, "node").unwrap();
        ca.write_cert(&tunnel).unwrap();
    }
    cluster
        .kubectl(&[
            "-n",
            NS,
            "create",
            "configmap",
            "netd-tunnel-agent",
            &format!("--from-literal=servers={CLOUD_NODE_IP}:10262"),
        ])
        .unwrap();
}

/// Waits until DaemonSet `name` has a Ready pod on exactly `nodes` nodes.
fn wait_daemonset(cluster: &RealCluster, name: &str, nodes: u64) {
    cluster
        .wait_for(&format!("DaemonSet {name} Ready on {nodes} nodes"), SLOW, || {
            let ds = json_of(cluster, &["-n", NS, "get", "daemonset", name]);
            let status = &ds["status"];
            let ready = status["desiredNumberScheduled"].as_u64() == Some(nodes)
                && status["numberReady"].as_u64() == Some(nodes)
                && status["updatedNumberScheduled"].as_u64() == Some(nodes);
            Ok(ready.then_some(()))
        })
        .unwrap_or_else(|err| {
            let pods = cluster.kubectl(&["-n", NS, "get", "pods", "-o", "wide"]).unwrap_or_default();
            let selector = format!("app.kubernetes.io/name={name}");
            let describe = cluster.kubectl(&["-n", NS, "describe", "pods", "-l", &selector]).unwrap_or_default();
            let mut logs = String::new();
            for previous in ["--previous=true", "--previous=false"] {
                let out = cluster.kubectl_output(&[
                    "-n",
                    NS,
                    "logs",
                    "-l",
                    &selector,
                    "--all-containers",
                    previous,
                    "--tail=20",
                ]);
                if let Ok(out) = out {
                    logs.push_str(&format!(
                        "--- logs {previous}:\n{}{}\n",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            panic!("{err}\n{pods}\n{describe}\n{logs}\n{}", cluster.diagnostics())
        });
}

/// Pods of label `app=<app>` in `default`, by name: (node, IP, phase, ready).
fn pods_of(cluster: &RealCluster, app: &str) -> BTreeMap<String, (String, String, String, bool)> {
    let list = json_of(cluster, &["get", "pods", "-l", &format!("app={app}")]);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pod| {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (
                pod["metadata"]["name"].as_str().unwrap().to_string(),
                (
                    pod["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
                    pod["status"]["podIP"].as_str().unwrap_or_default().to_string(),
                    pod["status"]["phase"].as_str().unwrap_or_default().to_string(),
                    ready && pod["metadata"].get("deletionTimestamp").is_none(),
                ),
            )
        })
        .collect()
}

/// Waits until `count` pods of `app` are Running and Ready; returns them.
fn wait_pods_ready(cluster: &RealCluster, app: &str, count: usize) -> BTreeMap<String, (String, String)> {
    cluster
        .wait_for(&format!("{count} pods of {app} Running and Ready"), SLOW, || {
            let pods = pods_of(cluster, app);
            let all = pods.len() == count
                && pods.values().all(|(_, ip, phase, ready)| *ready && phase == "Running" && !ip.is_empty());
            Ok(all.then(|| pods.into_iter().map(|(name, (node, ip, _, _))| (name, (node, ip))).collect()))
        })
        .unwrap_or_else(|err| {
            let describe = cluster.kubectl(&["describe", "pods", "-l", &format!("app={app}")]).unwrap_or_default();
            panic!("{err}\n{describe}\n{}", cluster.diagnostics())
        })
}

fn pod_cidr(cluster: &RealCluster, node: &str) -> IpNet {
    let node = json_of(cluster, &["get", "node", node]);
    node["spec"]["podCIDR"].as_str().unwrap().parse().unwrap()
}

/// The pins netd-ipam holds on `node` for pod `name` (default namespace).
fn pins_of(node: &RealNode, name: &str) -> Vec<(IpAddr, String)> {
    let db = node.host_path("/var/lib/cni/networks").join("cbr0/netd-ipam.db");
    let store = netd_ipam::Store::open(&db).unwrap();
    store
        .allocations()
        .unwrap()
        .into_iter()
        .filter(|a| a.pod.as_ref().is_some_and(|p| p.namespace() == "default" && p.name() == name))
        .map(|a| (a.ip, format!("{:?}", a.state)))
        .collect()
}

/// The id of pod `name`'s sandbox on `node`, as containerd knows it.
fn sandbox_of(node: &RealNode, name: &str) -> String {
    let list = node
        .ctr(&[
            "containers",
            "list",
            "-q",
            // One filter, its conditions joined by commas: all must hold
            // (separate filters would be alternatives).
            &format!("labels.\"io.kubernetes.pod.name\"=={name},labels.\"io.cri-containerd.kind\"==sandbox"),
        ])
        .unwrap();
    let ids: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(ids.len(), 1, "one sandbox of {name} on {}: {list}", node.name);
    ids[0].to_string()
}

fn statefulset(replicas: u32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "serviceName": "web",
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    // One per edge node.
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "node-restriction.kubernetes.io/netd-role", "operator": "NotIn", "values": ["cloud"]}]}
                        ]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}
                        ]}
                    },
                    "containers": [{
                        "name": "web",
                        "image": WORKLOAD_IMAGE,
                        "imagePullPolicy": "Never",
                        // A metrics-like port: busybox httpd serving a file.
                        "command": ["/bin/sh", "-c", "mkdir -p /www && echo \"up $(hostname)\" > /www/metrics && exec httpd -f -p 9100 -h /www"],
                        "ports": [{"name": "metrics", "containerPort": 9100}],
                        "readinessProbe": {"tcpSocket": {"port": 9100}, "periodSeconds": 1}
                    }]
                }
            }
        }
    })
}

#[test]
fn deploy_runs_on_real_kubelets_and_pods_keep_their_addresses() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder = RealCluster::builder();
    if !builder.available().unwrap() {
        return;
    }
    let cluster = builder.start().unwrap();
    let edges: Vec<&RealNode> = cluster.nodes().iter().filter(|n| n.role == Role::Edge).collect();

    // 1. deploy/ as README says to apply it.
    install_tunnel_credentials(&cluster);
    cluster.kubectl(&["apply", "-f", DEPLOY]).unwrap();
    let all = cluster.nodes().len() as u64;
    wait_daemonset(&cluster, "netd", all);
    wait_daemonset(&cluster, "netd-tunnel-server", 1);
    wait_daemonset(&cluster, "netd-controller", 1);
    wait_daemonset(&cluster, "netd-tunnel-agent", edges.len() as u64);
    let config = json_of(&cluster, &["-n", NS, "get", "configmap", "netd-cfg"]);
    let conflist: Value = serde_json::from_str(config["data"]["cni-conf.json"].as_str().unwrap()).unwrap();
    for node in cluster.nodes() {
        // Installed by the DaemonSet's init container on the node itself.
        let plugin = node.host_path("/opt/cni/bin").join("netd-ipam");
        let version = std::process::Command::new(&plugin).env("CNI_COMMAND", "VERSION").output().unwrap();
        assert!(version.status.success(), "{}: {}", plugin.display(), String::from_utf8_lossy(&version.stderr));
        let versions: Value = serde_json::from_slice(&version.stdout).unwrap();
        assert!(versions["supportedVersions"].as_array().unwrap().contains(&json!("0.3.1")), "{versions}");
        let installed = node.host_path("/etc/cni/net.d").join("10-netd.conflist");
        let installed: Value = serde_json::from_slice(&std::fs::read(&installed).unwrap()).unwrap();
        assert_eq!(installed, conflist, "{}'s conflist is the ConfigMap's", node.name);
    }
    cluster
        .wait_for("every node Ready", SLOW, || {
            let nodes = json_of(&cluster, &["get", "nodes"]);
            let ready = nodes["items"].as_array().unwrap().iter().filter(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            Ok((ready.count() == cluster.nodes().len()).then_some(()))
        })
        .unwrap();

    // 2. One pod on each edge node, addressed from its node's pod CIDR,
    // reaching the other across nodes.
    apply(&cluster, &statefulset(2));
    let pods = wait_pods_ready(&cluster, "web", 2);
    let mut nodes_used: Vec<&str> = pods.values().map(|(node, _)| node.as_str()).collect();
    nodes_used.sort();
    assert_eq!(nodes_used, ["edge-1", "edge-2"]);
    for (name, (node, ip)) in &pods {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(pod_cidr(&cluster, node).contains(&ip), "{name} on {node} has {ip}");
        let pins = pins_of(cluster.node(node).unwrap(), name);
        assert_eq!(pins, [(ip, "Attached".to_string())], "{name}'s pin in netd-ipam's store on {node}");
    }
    let ip_of = |pods: &BTreeMap<String, (String, String)>, name: &str| pods[name].1.clone();
    for (from, to) in [("web-0", "web-1"), ("web-1", "web-0")] {
        let out = cluster.kubectl(&["exec", from, "--", "ping", "-c", "2", "-W", "2", &ip_of(&pods, to)]).unwrap();
        assert!(out.contains(" 0% packet loss"), "{from} -> {to}: {out}");
        let fetched = cluster
            .kubectl(&[
                "exec",
                from,
                "--",
                "wget",
                "-q",
                "-O",
                "-",
                &format!("http://{}:9100/metrics", ip_of(&pods, to)),
            ])
            .unwrap();
        assert_eq!(fetched.trim(), format!("up {to}"));
    }
    // Across nodes means through the VXLAN device.
    let edge1 = cluster.node("edge-1").unwrap();
    let fdb = edge1.netns().exec("bridge", &["fdb", "show", "dev", "flannel.1"]).unwrap();
    let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
    assert!(fdb.contains(&format!("dst {}", cluster.node("edge-2").unwrap().ip)), "{fdb}");

    // 3. The sandbox of web-0 killed and removed under its kubelet: the
    // kubelet makes a new one, and the pod keeps its address.
    let (node0, ip0) = pods["web-0"].clone();
    let node = cluster.node(&node0).unwrap();
    let sandbox = sandbox_of(node, "web-0");
    node.ctr(&["tasks", "kill", "--signal", "SIGKILL", &sandbox]).unwrap();
    cluster
        .wait_for("the killed sandbox's task to stop", Duration::from_secs(30), || {
            let tasks = node.ctr(&["tasks", "list"])?;
            Ok(tasks.lines().all(|l| !(l.starts_with(&sandbox) && l.contains("RUNNING"))).then_some(()))
        })
        .unwrap();
    let _ = node.ctr(&["tasks", "delete", &sandbox]);
    node.ctr(&["containers", "delete", &sandbox]).unwrap();
    let renewed = cluster
        .wait_for("web-0 in a new sandbox", SLOW, || {
            let list = node.ctr(&[
                "containers",
                "list",
                "-q",
                "labels.\"io.kubernetes.pod.name\"==web-0,labels.\"io.cri-containerd.kind\"==sandbox",
            ])?;
            let ids: Vec<String> = list.lines().filter(|l| !l.is_empty() && *l != sandbox).map(String::from).collect();
            let pods = pods_of(&cluster, "web");
            let ready = pods.get("web-0").is_some_and(|(_, _, phase, ready)| *ready && phase == "Running");
            Ok((ids.len() == 1 && ready).then(|| ids[0].clone()))
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", cluster.diagnostics()));
    assert_ne!(renewed, sandbox);
    let after = pods_of(&cluster, "web");
    assert_eq!(after["web-0"].1, ip0, "web-0 keeps its address in its new sandbox");
    let out = cluster.kubectl(&["exec", "web-1", "--", "ping", "-c", "1", "-W", "2", &ip0]).unwrap();
    assert!(out.contains(" 0% packet loss"), "{out}");

    // 4. A rollout restart: new pods, same names, same addresses.
    let before: BTreeMap<String, String> = pods.iter().map(|(n, (_, ip))| (n.clone(), ip.clone())).collect();
    let uids = |cluster: &RealCluster| -> BTreeMap<String, String> {
        json_of(cluster, &["get", "pods", "-l", "app=web"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["metadata"]["name"].as_str().unwrap().into(), p["metadata"]["uid"].as_str().unwrap().into()))
            .collect()
    };
    let old_uids = uids(&cluster);
    cluster.kubectl(&["rollout", "restart", "statefulset/web"]).unwrap();
    cluster
        .wait_for("the restart to replace every web pod", SLOW, || {
            let new = uids(&cluster);
            let replaced = new.len() == 2 && new.iter().all(|(name, uid)| old_uids.get(name) != Some(uid));
            Ok(replaced.then_some(()))
        })
        .unwrap();
    let restarted = wait_pods_ready(&cluster, "web", 2);
    let after: BTreeMap<String, String> = restarted.iter().map(|(n, (_, ip))| (n.clone(), ip.clone())).collect();
    assert_eq!(after, before, "every StatefulSet pod keeps its address across a rollout restart");

    // 5. A deleted pod's address is freed after the grace period. netd's
    // default grace is 10 minutes; shorten it as an operator would, and roll
    // netd's pods by hand (the DaemonSet is OnDelete).
    cluster.kubectl(&["-n", NS, "set", "env", "daemonset/netd", "NETD_PIN_GRACE=5s"]).unwrap();
    cluster.kubectl(&["-n", NS, "delete", "pod", "-l", "app.kubernetes.io/name=netd", "--wait=false"]).unwrap();
    wait_daemonset(&cluster, "netd", all);
    cluster.kubectl(&["scale", "statefulset/web", "--replicas=1"]).unwrap();
    let (gone_node, gone_ip) = restarted["web-1"].clone();
    let gone_node = cluster.node(&gone_node).unwrap();
    cluster
        .wait_for("web-1's pin freed after the grace", SLOW, || {
            Ok(pins_of(gone_node, "web-1").is_empty().then_some(()))
        })
        .unwrap_or_else(|err| panic!("{err}: web-1 had {gone_ip}; pins now {:?}", pins_of(gone_node, "web-1")));
    // web-0 keeps its pin: the keeper frees only what is gone.
    let (node0, ip0) = restarted["web-0"].clone();
    assert_eq!(pins_of(cluster.node(&node0).unwrap(), "web-0"), [(ip0.parse().unwrap(), "Attached".to_string())]);
}
