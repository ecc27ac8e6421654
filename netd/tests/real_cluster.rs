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
//! 5. netd upgraded on every node by `netd-controller rollout` (a new image
//!    tag and a short pin grace period in the DaemonSet's template; the
//!    real DaemonSet controller re-creates each netd pod the rollout
//!    deletes, node by node) while the two pods ping each other across
//!    nodes every 10 ms: no reply lost; then a deleted pod's address is
//!    freed by netd's pin keeper after that grace period;
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

use netd::rollout::{Phase, RolloutState};
use netd::testing::{
    self, edge_statefulset, http_get, RealCluster, RealNode, CLOUD_NODE_IP, WORKLOAD_IMAGE,
    WORKLOAD_METRICS_PORT as METRICS_PORT,
};
use serde_json::{json, Value};

const NS: &str = "kube-system";
/// The netd image deploy/ names, and the tag the rollout moves to.
const DEPLOYED_IMAGE: &str = "netd:0.1.0";
const NEW_IMAGE: &str = "netd:0.1.0-rollout";
/// Long enough for a first start of every pod on two shared cores.
const SLOW: Duration = Duration::from_secs(180);

/// `netd-controller <args>` as the cluster admin, run where the API server
/// is (the cloud node's network namespace).
fn netd_controller(cluster: &RealCluster, args: &[&str]) -> std::process::Output {
    let api = cluster.kube().unwrap().api();
    let token = api.dir().join("rollout-token");
    std::fs::write(&token, api.token()).unwrap();
    let (url, ca) = (api.url(), api.ca_cert_path());
    api.host()
        .run(|| {
            std::process::Command::new(env!("CARGO_BIN_EXE_netd-controller"))
                .args(args)
                .args([
                    "--kubernetes",
                    &url,
                    "--token-file",
                    &token.to_string_lossy(),
                    "--ca-file",
                    &ca.to_string_lossy(),
                ])
                .output()
        })
        .unwrap()
        .unwrap()
}

fn output_text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// (sent, received) from busybox ping's summary line
/// `N packets transmitted, M packets received, …`.
fn ping_summary(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty());
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

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
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn deploy_runs_on_real_kubelets_and_pods_keep_their_addresses() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder = RealCluster::builder();
    if !builder.available().unwrap() {
        return;
    }
    let mut cluster = builder.start().unwrap();

    // 1. deploy/ as the book says to apply it: every DaemonSet Ready on the
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

    // 5. netd upgraded by `netd-controller rollout` while the pods ping
    // each other every 10 ms: a new image tag, and netd's pin grace period
    // (10 minutes by default) shortened for what follows, in one template
    // change. The new tag names the same bytes (imported, never pulled):
    // the rollout and the DaemonSet controller go by the template.
    for node in cluster.nodes() {
        let images = node.ctr(&["images", "ls", "-q"]).unwrap();
        let current = images.lines().find(|l| l.ends_with(&format!("/{DEPLOYED_IMAGE}"))).unwrap_or_else(|| {
            panic!("{DEPLOYED_IMAGE} not in {}'s containerd: {images}", node.name);
        });
        node.ctr(&["images", "tag", current, &current.replace(DEPLOYED_IMAGE, NEW_IMAGE)]).unwrap();
    }
    let netd_pods = |cluster: &RealCluster| -> BTreeMap<String, (String, String)> {
        json_of(cluster, &["-n", NS, "get", "pods", "-l", "app.kubernetes.io/name=netd"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let text = |pointer: &str| p.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string();
                (text("/spec/nodeName"), (text("/metadata/uid"), text("/spec/containers/0/image")))
            })
            .collect()
    };
    let netd_before = netd_pods(&cluster);
    assert_eq!(netd_before.len() as u64, all, "one netd pod per node: {netd_before:?}");
    let pingers = [("web-0", restarted["web-1"].1), ("web-1", restarted["web-0"].1)];
    for (from, to) in &pingers {
        // In the background of the pod, its summary kept in a file: the
        // exec session ends at once, the pings go on.
        let start = format!("ping -i 0.01 -q {to} > /tmp/ping.out 2>&1 & echo $! > /tmp/ping.pid");
        cluster.kubectl(&["exec", from, "--", "sh", "-c", &start]).unwrap();
    }
    cluster.kubectl(&["-n", NS, "set", "image", "daemonset/netd", &format!("*={NEW_IMAGE}")]).unwrap();
    cluster.kubectl(&["-n", NS, "set", "env", "daemonset/netd", "NETD_PIN_GRACE=5s"]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(netd_pods(&cluster), netd_before, "OnDelete: nothing restarts before the rollout");
    let rolled = std::time::Instant::now();
    let started = netd_controller(&cluster, &["rollout", "start", "--node-timeout", "3m"]);
    assert!(started.status.success(), "rollout start: {}", output_text(&started));
    let status = netd_controller(&cluster, &["rollout", "status", "--timeout", "6m"]);
    let status_text = output_text(&status);
    let rolled = rolled.elapsed();
    let state = json_of(&cluster, &["-n", NS, "get", "configmap", "netd-rollout"]);
    let state = RolloutState::from_json(state["data"]["rollout.json"].as_str().unwrap()).unwrap();
    assert_eq!(state.phase, Phase::Complete, "{status_text}\n{state:?}\n{}", cluster.diagnostics());
    wait_daemonset(&cluster, "netd", all);
    let netd_after = netd_pods(&cluster);
    for (node, (uid, image)) in &netd_before {
        let (new_uid, new_image) = &netd_after[node];
        assert_ne!(new_uid, uid, "{node}'s netd pod replaced");
        assert!(new_image.ends_with(NEW_IMAGE) && !image.ends_with(NEW_IMAGE), "{node}: {image} → {new_image}");
    }
    for (from, to) in &pingers {
        let stop = "kill -INT $(cat /tmp/ping.pid); sleep 1; cat /tmp/ping.out";
        let out = cluster.kubectl(&["exec", from, "--", "sh", "-c", stop]).unwrap();
        let (sent, received) = ping_summary(&out).unwrap_or_else(|| panic!("{from}'s ping summary: {out}"));
        // One echo may be on its way back when the summary is printed.
        assert!(sent - received <= 1, "{from} → {to} lost replies while netd rolled out: {out}");
        // At 10 ms, the pings covered the rollout (busybox paces them).
        assert!(sent as f64 >= rolled.as_secs_f64() * 50.0, "{from} sent only {sent} pings in {rolled:?}");
        println!(
            "rollout of netd on {all} nodes in {:.1} s: {from} → {to} every 10 ms, {sent} sent, {received} answered",
            rolled.as_secs_f64()
        );
    }

    // A deleted pod's address is freed after that grace period.
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
