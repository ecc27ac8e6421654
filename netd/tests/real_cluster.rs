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
//!    then the OnDelete roll of netd's pods);
//! 6. the cloud cut off from the edge as NAT does (no new connection from
//!    the cloud node to an edge node, no VXLAN between them), checked;
//! 7. kube-apiserver as a process of the cloud node dials edge kubelets by
//!    address, and the controller's eBPF DNAT sends it through the tunnel:
//!    `kubectl logs -f`, an interactive `kubectl exec` session and
//!    `kubectl port-forward` to the edge pod, the kubelet's serving
//!    certificate verified end to end (`--kubelet-certificate-authority`);
//!    then a pod on the cloud node pulls the edge pod's metrics port by pod
//!    IP through the DNAT (pod namespaces) and the tunnel;
//! 8. kube-apiserver restarted with its egress selector instead: the same
//!    three operations through the tunnel server's CONNECT door.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::Child;
use std::time::Duration;

use netd::testing::{
    self, edge_statefulset, http_get, RealCluster, RealNode, CLOUD_NODE_IP, WORKLOAD_IMAGE,
    WORKLOAD_METRICS_PORT as METRICS_PORT,
};
use serde_json::{json, Value};

const NS: &str = "kube-system";
/// Long enough for a first start of every pod on two shared cores.
const SLOW: Duration = Duration::from_secs(180);

fn json_of(cluster: &RealCluster, args: &[&str]) -> Value {
    cluster.kubectl_json(args).unwrap()
}

/// Waits until DaemonSet `name` has a Ready pod on exactly `nodes` nodes.
fn wait_daemonset(cluster: &RealCluster, name: &str, nodes: u64) {
    cluster.wait_daemonset(name, nodes, SLOW).unwrap_or_else(|err| panic!("{err}"));
}

/// Waits until `count` pods of `app` are Running and Ready; returns each
/// one's node and address.
fn wait_pods_ready(cluster: &RealCluster, app: &str, count: usize) -> BTreeMap<String, (String, IpAddr)> {
    cluster.wait_pods_ready(&format!("app={app}"), count, SLOW).unwrap_or_else(|err| panic!("{err}"))
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

fn read_until(child: &mut Child, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    testing::read_line_until(child, timeout, done).unwrap_or_else(|err| panic!("{err}"))
}

/// A counter of the tunnel server's /metrics (on the cloud node's loopback).
fn tunnel_counter(cluster: &RealCluster, name: &str) -> f64 {
    cluster.tunnel_server_metric(name).unwrap()
}

/// `kubectl logs -f`, an interactive `kubectl exec` session and `kubectl
/// port-forward` to `pod`, whose node the cloud has no route to: they can
/// only pass through the tunnel server, whose `netd_tunnel_streams_total`
/// grows.
fn operate_through_tunnel(cluster: &RealCluster, pod: &str, how: &str) {
    let streams = tunnel_counter(cluster, "netd_tunnel_streams_total");
    // logs -f: lines keep coming (two distinct ticks).
    let mut logs = cluster.kubectl_spawn(&["logs", "-f", "--tail=1", pod]).unwrap();
    let first = read_until(&mut logs, Duration::from_secs(30), |l| l.starts_with("tick "));
    let mut again = cluster.kubectl_spawn(&["logs", "-f", "--tail=1", pod]).unwrap();
    let later = read_until(&mut again, Duration::from_secs(30), |l| l.starts_with("tick ") && l != first);
    assert_ne!(first, later, "{how}: logs -f streams new lines");
    let _ = (logs.kill(), again.kill(), logs.wait(), again.wait());

    // An interactive exec session: commands written to its stdin, answers read back.
    let mut exec = cluster.kubectl_spawn(&["exec", "-i", pod, "--", "sh"]).unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    stdin.write_all(b"echo answer-$((6*7)) from $(hostname)\n").unwrap();
    let answer = read_until(&mut exec, Duration::from_secs(30), |l| l.starts_with("answer-"));
    assert_eq!(answer, format!("answer-42 from {pod}"), "{how}: exec session");
    stdin.write_all(b"exit\n").unwrap();
    drop(stdin);
    let status = exec.wait().unwrap();
    assert!(status.success(), "{how}: exec session ended with {status}");

    // port-forward: a local port on the cloud node reaches the pod's port.
    let mut forward =
        cluster.kubectl_spawn(&["port-forward", &format!("pod/{pod}"), &format!(":{METRICS_PORT}")]).unwrap();
    let line = read_until(&mut forward, Duration::from_secs(30), |l| l.starts_with("Forwarding from 127.0.0.1:"));
    let local = line.trim_start_matches("Forwarding from ").split(' ').next().unwrap().to_string();
    let cloud = cluster.node("cloud-1").unwrap();
    // curl, not a short-timeout probe: the first request opens the stream
    // through the API server, the tunnel and the kubelet, seconds on a
    // loaded machine.
    let response = cloud
        .netns()
        .exec(
            "curl",
            &[
                "-sS",
                "--max-time",
                "20",
                "--retry",
                "4",
                "--retry-all-errors",
                "--retry-delay",
                "1",
                &format!("http://{local}/metrics"),
            ],
        )
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|err| format!("curl failed: {err}"));
    let _ = (forward.kill(), forward.wait());
    if response != format!("up {pod}\n") {
        let mut stderr = String::new();
        if let Some(mut err) = forward.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        eprintln!("port-forward stderr: {stderr}\n{}", cluster.diagnostics());
    }
    assert_eq!(response, format!("up {pod}\n"), "{how}: port-forward");

    let grown = tunnel_counter(cluster, "netd_tunnel_streams_total") - streams;
    // The exec and the port-forward each upgrade a connection of their own;
    // the logs may ride a kept-alive one of kube-apiserver's.
    assert!(grown >= 2.0, "{how}: {grown} tunnel streams for two logs, an exec and a port-forward");
}

/// kube-apiserver's egress selector: every connection to a node is a
/// CONNECT to the tunnel server's CONNECT door, authenticated with a client
/// certificate `CN=kube-apiserver` of the cluster CA.
fn egress_selector(cluster: &RealCluster, dir: &std::path::Path) -> String {
    let ca = cluster.kube().unwrap().api().ca();
    ca.issue_client("kube-apiserver", None, Duration::from_secs(24 * 3600)).unwrap().write(dir, "client").unwrap();
    ca.write_cert(dir).unwrap();
    let config = dir.join("egress.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n\
             - name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      tcp:\n\
             \x20       url: https://{CLOUD_NODE_IP}:10265\n        tlsConfig:\n\
             \x20         caBundle: {dir}/ca.crt\n          clientKey: {dir}/client.key\n          clientCert: {dir}/client.crt\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    format!("--egress-selector-config-file={}", config.display())
}

#[test]
fn deploy_runs_on_real_kubelets_and_pods_keep_their_addresses() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder = RealCluster::builder();
    if !builder.available().unwrap() {
        return;
    }
    let mut cluster = builder.start().unwrap();

    // 1. deploy/ as README says to apply it: every DaemonSet Ready on the
    // nodes it selects, every node Ready.
    cluster.deploy(&[METRICS_PORT], SLOW).unwrap();
    let all = cluster.nodes().len() as u64;
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

    // 2. One pod on each edge node, addressed from its node's pod CIDR,
    // reaching the other across nodes.
    cluster.apply(&edge_statefulset("web", 2)).unwrap();
    let pods = wait_pods_ready(&cluster, "web", 2);
    let mut nodes_used: Vec<&str> = pods.values().map(|(node, _)| node.as_str()).collect();
    nodes_used.sort();
    assert_eq!(nodes_used, ["edge-1", "edge-2"]);
    for (name, (node, ip)) in &pods {
        assert!(cluster.pod_cidr(node).unwrap().contains(ip), "{name} on {node} has {ip}");
        let pins = pins_of(cluster.node(node).unwrap(), name);
        assert_eq!(pins, [(*ip, "Attached".to_string())], "{name}'s pin in netd-ipam's store on {node}");
    }
    let ip_of = |pods: &BTreeMap<String, (String, IpAddr)>, name: &str| pods[name].1.to_string();
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
            let pods = cluster.pods("app=web")?;
            let ready = pods.get("web-0").is_some_and(|p| p.ready && p.phase == "Running");
            Ok((ids.len() == 1 && ready).then(|| ids[0].clone()))
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", cluster.diagnostics()));
    assert_ne!(renewed, sandbox);
    let after = cluster.pods("app=web").unwrap();
    assert_eq!(after["web-0"].ip, Some(ip0), "web-0 keeps its address in its new sandbox");
    let out = cluster.kubectl(&["exec", "web-1", "--", "ping", "-c", "1", "-W", "2", &ip0.to_string()]).unwrap();
    assert!(out.contains(" 0% packet loss"), "{out}");

    // 4. A rollout restart: new pods, same names, same addresses.
    let before: BTreeMap<String, IpAddr> = pods.iter().map(|(n, (_, ip))| (n.clone(), *ip)).collect();
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
    let after: BTreeMap<String, IpAddr> = restarted.iter().map(|(n, (_, ip))| (n.clone(), *ip)).collect();
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
    assert_eq!(pins_of(cluster.node(&node0).unwrap(), "web-0"), [(ip0, "Attached".to_string())]);

    // 6. The cloud cut off from the edge, as NAT does: from here on the
    // cloud reaches edge kubelets and pods only through the tunnel.
    let (node0, ip0) = restarted["web-0"].clone();
    let edge0 = cluster.node(&node0).unwrap().ip;
    cluster.cut_cloud_from_edges().unwrap();
    let cloud = cluster.node("cloud-1").unwrap();
    let direct = cloud.netns().exec("curl", &["-sk", "--max-time", "3", &format!("https://{edge0}:10250/healthz")]);
    assert!(direct.is_err(), "the cloud node still reaches {edge0}:10250 directly: {direct:?}");
    // Pods' metrics port as a DNAT extra port (SPEC's ConfigMap).
    cluster
        .kubectl(&[
            "-n",
            NS,
            "create",
            "configmap",
            "edge-tunnel-server-cfg",
            &format!("--from-literal=dnat-ports-pair={METRICS_PORT}=10264"),
        ])
        .unwrap();

    // 7. kube-apiserver as a process of the cloud node (a fresh one: no
    // connection to a kubelet kept from before the cut), dialling edge
    // kubelets by their addresses: the tunnel DNAT sends it to the tunnel
    // server, it verifies the kubelet's certificate end to end.
    cluster.restart_api_server_on_cloud_node(&[]).unwrap();
    cluster
        .wait_for("kubectl logs through the tunnel DNAT", SLOW, || {
            let out = cluster.kubectl_output(&["logs", "--tail=1", "web-0"])?;
            Ok((out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("tick ")).then_some(()))
        })
        .unwrap_or_else(|err| {
            let out = cluster.kubectl_output(&["logs", "--tail=1", "web-0"]).unwrap();
            panic!("{err}: {}\n{}", String::from_utf8_lossy(&out.stderr), cluster.diagnostics())
        });
    operate_through_tunnel(&cluster, "web-0", "DNAT");

    // A pod on the cloud node pulls the edge pod's metrics by pod IP: the
    // DNAT (pod namespaces too) and the tunnel, as Prometheus would.
    cluster
        .apply(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "scraper", "namespace": "default", "labels": {"app": "scraper"}},
            "spec": {
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 1,
                "nodeSelector": {"node-restriction.kubernetes.io/netd-role": "cloud"},
                "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "scraper", "image": WORKLOAD_IMAGE, "imagePullPolicy": "Never",
                                "command": ["/bin/sleep", "3600"]}]
            }
        }))
        .unwrap();
    wait_pods_ready(&cluster, "scraper", 1);
    let url = "/metrics";
    let last = std::cell::RefCell::new(String::new());
    let scraped = cluster
        .wait_for("the cloud pod's scrape of the edge pod", Duration::from_secs(60), || {
            // nc, not busybox's wget: Debian's static busybox wget dies of
            // SIGSEGV when given a timeout (-T), before it connects.
            let request = format!("printf 'GET {url} HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc {ip0} {METRICS_PORT}");
            let out = cluster.kubectl_output(&["exec", "scraper", "--", "sh", "-c", &request])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            *last.borrow_mut() = String::from_utf8_lossy(&out.stderr).into_owned();
            Ok((out.status.success() && !text.is_empty()).then_some(text))
        })
        .unwrap_or_else(|err| {
            let cloud = cluster.node("cloud-1").unwrap();
            let metrics = http_get(cloud.netns(), "127.0.0.1:10266", "/metrics").unwrap_or_default();
            let logs = |name: &str| {
                let selector = format!("app.kubernetes.io/name={name}");
                let out = cluster.kubectl_output(&["-n", NS, "logs", "-l", &selector, "--tail=15"]).unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            panic!(
                "{err}: wget said {:?}\n--- tunnel server metrics:\n{metrics}\n--- tunnel server:\n{}\n--- controller:\n{}\n--- agents:\n{}",
                last.borrow(),
                logs("netd-tunnel-server"),
                logs("netd-controller"),
                logs("netd-tunnel-agent")
            )
        });
    assert!(scraped.starts_with("HTTP/1.1 200 OK"), "{scraped}");
    assert!(scraped.ends_with("\r\n\r\nup web-0\n"), "the edge pod's own answer: {scraped}");

    // 8. kube-apiserver with its egress selector instead (and outside the
    // DNAT's reach): the same operations through the CONNECT door.
    let egress_dir = tempfile::tempdir().unwrap();
    let egress = egress_selector(&cluster, egress_dir.path());
    cluster.kube_mut().unwrap().api_mut().restart_with(&[egress]).unwrap();
    operate_through_tunnel(&cluster, "web-0", "egress selector");
}
