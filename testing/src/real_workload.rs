//! What the real-cluster test, the cluster demo and the benchmarks do on a
//! [`RealCluster`] alike: install `deploy/` as the book says, run a workload
//! across edge nodes, wait for its pods, read a streaming `kubectl`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::{json, Value};

use super::{http_get, HarnessError, RealCluster, Role, CLOUD_ROLE_LABEL, WORKLOAD_IMAGE};

/// This tree's `deploy/` directory.
pub const DEPLOY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The port [`edge_statefulset`]'s pods serve `/metrics` on.
pub const WORKLOAD_METRICS_PORT: u16 = 9100;
/// The tunnel server's metrics address on the cloud node (deploy/'s).
const TUNNEL_SERVER_METRICS: &str = "127.0.0.1:10266";

/// A pod as [`RealCluster::pods`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    /// The node it is bound to ("" before scheduling).
    pub node: String,
    /// Its address, if it has one yet.
    pub ip: Option<IpAddr>,
    /// `status.phase`.
    pub phase: String,
    /// Ready and not being deleted.
    pub ready: bool,
}

/// StatefulSet `default/<name>`: `replicas` pods of the test workload
/// image, at most one per edge node (never on the cloud node). Each logs a
/// line `tick <unix time>` a second (for `kubectl logs -f`) and serves
/// `up <pod name>` at `/metrics` on [`WORKLOAD_METRICS_PORT`] (busybox
/// httpd), its readiness probe.
pub fn edge_statefulset(name: &str, replicas: u32) -> Value {
    let (role_key, role_value) = CLOUD_ROLE_LABEL;
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "serviceName": name,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                            {"matchExpressions": [{"key": role_key, "operator": "NotIn", "values": [role_value]}]}
                        ]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                            {"labelSelector": {"matchLabels": {"app": name}}, "topologyKey": "kubernetes.io/hostname"}
                        ]}
                    },
                    "containers": [{
                        "name": name,
                        "image": WORKLOAD_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", format!(
                            "(while true; do echo \"tick $(date +%s)\"; sleep 1; done) & mkdir -p /www && \
                             echo \"up $(hostname)\" > /www/metrics && exec httpd -f -p {WORKLOAD_METRICS_PORT} -h /www"
                        )],
                        "ports": [{"name": "metrics", "containerPort": WORKLOAD_METRICS_PORT}],
                        "readinessProbe": {"tcpSocket": {"port": WORKLOAD_METRICS_PORT}, "periodSeconds": 1}
                    }]
                }
            }
        }
    })
}

/// Reads `child`'s stdout lines until one satisfies `done` and returns it;
/// after `timeout`, kills the child and fails with what it printed. Its
/// stdout is drained to the end even after this returns: a closed pipe
/// would kill kubectl with SIGPIPE at its next line (`port-forward` prints
/// one per connection).
pub fn read_line_until(
    child: &mut Child,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<String, HarnessError> {
    let stdout = child.stdout.take().ok_or_else(|| HarnessError::Usage("the child's stdout is not piped".into()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if done(&line) => return Ok(line),
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
    }
    let _ = child.wait();
    Err(HarnessError::Scenario(format!("timed out after {timeout:?}; stdout {seen:?}, stderr {stderr:?}")))
}

impl RealCluster {
    /// `kubectl apply` of one object.
    pub fn apply(&self, object: &Value) -> Result<(), HarnessError> {
        let file = self.scratch_file("apply.json");
        std::fs::write(&file, object.to_string())
            .map_err(|e| HarnessError::io(format!("writing {}", file.display()), e))?;
        self.kubectl(&["apply", "-f", &file.to_string_lossy()]).map(|_| ())
    }

    /// netd installed as the book's install steps say: the tunnel credentials (with
    /// `extra_ports` for the agents), `kubectl apply -f deploy/`, then every
    /// DaemonSet Ready on the nodes it selects and every node Ready.
    pub fn deploy(&self, extra_ports: &[u16], timeout: Duration) -> Result<(), HarnessError> {
        self.install_tunnel_credentials(extra_ports)?;
        self.kubectl(&["apply", "-f", DEPLOY_DIR])?;
        let all = self.nodes().len() as u64;
        let edges = self.nodes().iter().filter(|n| n.role == Role::Edge).count() as u64;
        let clouds = all - edges;
        for (daemonset, nodes) in
            [("netd", all), ("netd-tunnel-server", clouds), ("netd-controller", clouds), ("netd-tunnel-agent", edges)]
        {
            self.wait_daemonset(daemonset, nodes, timeout)?;
        }
        self.wait_for("every node Ready", timeout, || {
            let nodes = self.kubectl_json(&["get", "nodes"])?;
            let ready = items(&nodes).iter().filter(|n| has_condition(n, "Ready")).count();
            Ok((ready == self.nodes().len()).then_some(()))
        })
    }

    /// The pods of namespace `default` matching label `selector`, by name.
    pub fn pods(&self, selector: &str) -> Result<BTreeMap<String, PodStatus>, HarnessError> {
        let list = self.kubectl_json(&["get", "pods", "-l", selector])?;
        Ok(items(&list)
            .iter()
            .map(|pod| {
                let text = |pointer: &str| pod.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_string();
                let status = PodStatus {
                    node: text("/spec/nodeName"),
                    ip: text("/status/podIP").parse().ok(),
                    phase: text("/status/phase"),
                    ready: has_condition(pod, "Ready") && pod["metadata"].get("deletionTimestamp").is_none(),
                };
                (text("/metadata/name"), status)
            })
            .collect())
    }

    /// Waits until exactly `count` pods match `selector` (namespace
    /// `default`), each Running, Ready and addressed; returns each one's
    /// node and address. On timeout the error describes the pods and the
    /// nodes' logs.
    pub fn wait_pods_ready(
        &self,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<BTreeMap<String, (String, IpAddr)>, HarnessError> {
        let what = format!("{count} pods of {selector} Running and Ready");
        self.wait_for(&what, timeout, || {
            let pods = self.pods(selector)?;
            let all = pods.len() == count && pods.values().all(|p| p.ready && p.phase == "Running" && p.ip.is_some());
            Ok(all.then(|| pods.into_iter().filter_map(|(name, p)| Some((name, (p.node, p.ip?)))).collect()))
        })
        .map_err(|err| {
            let describe = self.kubectl(&["describe", "pods", "-l", selector]).unwrap_or_default();
            HarnessError::Scenario(format!("{err}\n{describe}\n{}", self.diagnostics()))
        })
    }

    /// Node `node`'s pod CIDR (kube-controller-manager's).
    pub fn pod_cidr(&self, node: &str) -> Result<IpNet, HarnessError> {
        let object = self.kubectl_json(&["get", "node", node])?;
        let cidr = object["spec"]["podCIDR"].as_str().unwrap_or_default();
        cidr.parse().map_err(|_| HarnessError::Scenario(format!("node {node} has no pod CIDR yet ({cidr:?})")))
    }

    /// The sum of the tunnel server's metric `name` (every label set), as
    /// the cloud node serves it; 0 when it does not answer.
    pub fn tunnel_server_metric(&self, name: &str) -> Result<f64, HarnessError> {
        let cloud = self
            .nodes()
            .iter()
            .find(|n| n.role == Role::Cloud)
            .ok_or_else(|| HarnessError::Usage("no cloud node".into()))?;
        let text = http_get(cloud.netns(), TUNNEL_SERVER_METRICS, "/metrics").unwrap_or_default();
        Ok(metric_sum(&text, name))
    }

    /// Waits until the hub of node `name` is caching (the node autonomous)
    /// and holds what its kubelet reads at boot: its Node, its netd pod and
    /// the ConfigMaps that pod mounts (the kubelet lists each by name once
    /// it syncs the pod), and each pod of namespace `default` in `pods`.
    pub fn wait_hub_holds_boot_reads(&self, name: &str, pods: &[&str], timeout: Duration) -> Result<(), HarnessError> {
        let node = self.node(name)?;
        let selector = format!("spec.nodeName={name}");
        let netd = self.kubectl_json(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=netd",
            "--field-selector",
            &selector,
        ])?;
        let netd_pod = netd["items"][0]["metadata"]["name"]
            .as_str()
            .ok_or_else(|| HarnessError::Scenario(format!("no netd pod on {name}")))?
            .to_string();
        self.wait_for(&format!("the hub of {name} caching what its kubelet reads"), timeout, || {
            let all = node.hub_metric("netd_hub_autonomous") == Some(1.0)
                && node.hub_caches("nodes", "@cluster", name)
                && node.hub_caches("pods", "kube-system", &netd_pod)
                && node.hub_caches("configmaps", "kube-system", "netd-cfg")
                && node.hub_caches("configmaps", "kube-system", "kube-root-ca.crt")
                && pods.iter().all(|pod| node.hub_caches("pods", "default", pod));
            Ok(all.then_some(()))
        })
    }

    /// kube-controller-manager killed and started again, as an operator
    /// restarts it: its node lifecycle controller begins with empty taint
    /// queues. Needed before relying on `NoExecute` taints in 1.20.2: a node
    /// that was NotReady and turned Ready again (every node while netd's CNI
    /// is not installed yet, a rebooted one) leaves a stale entry at the
    /// head of its zone's taint queue, and from then on no node is ever
    /// tainted `NoExecute`, so nothing is evicted (kubernetes#94183, fixed
    /// upstream by #96876 and its backports after 1.20.2).
    pub fn restart_controller_manager(&mut self) -> Result<(), HarnessError> {
        let manager = self
            .kube_mut()?
            .controller_manager_mut()
            .ok_or_else(|| HarnessError::Usage("the cluster runs no kube-controller-manager".into()))?;
        manager.stop()?;
        manager.start()
    }

    /// kube-apiserver restarted (with `extra_args`) as a process of the
    /// cloud node: its connections to kubelets then leave from the cloud
    /// node, where the tunnel DNAT catches those to edge nodes.
    pub fn restart_api_server_on_cloud_node(&mut self, extra_args: &[String]) -> Result<(), HarnessError> {
        let api = self.kube_mut()?.api_mut();
        api.restart_with(extra_args)?;
        let pid = api.pid().ok_or_else(|| HarnessError::Scenario("kube-apiserver did not start".into()))?;
        self.node("cloud-1")?.adopt_process(pid)
    }
}

/// The sum of metric `name` over every label set in a Prometheus text
/// page (0 when absent); `name_total` or `name_bucket` are other metrics.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn items(list: &Value) -> &[Value] {
    list["items"].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn has_condition(object: &Value, kind: &str) -> bool {
    object["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == kind && c["status"] == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_summed_over_its_label_sets_and_no_other_metric() {
        let page = "# HELP x_total X.\n# TYPE x_total counter\nx_total{door=\"a\"} 2\nx_total{door=\"b\"} 3.5\n\
                    x_total_bucket 100\nx 7\n";
        assert_eq!(metric_sum(page, "x_total"), 5.5);
        assert_eq!(metric_sum(page, "x"), 7.0);
        assert_eq!(metric_sum(page, "y"), 0.0);
    }

    #[test]
    fn the_workload_stays_off_the_cloud_node_and_serves_its_port() {
        let set = edge_statefulset("web", 2);
        let terms = &set["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0];
        assert_eq!(terms["key"], CLOUD_ROLE_LABEL.0);
        assert_eq!(terms["operator"], "NotIn");
        let container = &set["spec"]["template"]["spec"]["containers"][0];
        assert!(container["command"][2].as_str().is_some_and(|c| c.contains("httpd -f -p 9100")));
        assert_eq!(container["readinessProbe"]["tcpSocket"]["port"], WORKLOAD_METRICS_PORT);
    }
}
