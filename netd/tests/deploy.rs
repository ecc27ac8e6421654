//! The `deploy/` manifests: what each object is (no root needed), and
//! against a real kube-apiserver 1.20.2 with `--authorization-mode=Node,RBAC`
//! and NodeRestriction, as kubeadm runs it: a server-side dry run and a real
//! `kubectl apply -f deploy/`, the exact permissions the ServiceAccounts end
//! up with (netd's: none), what the Node authorizer grants a node, and the
//! real `netd run` started as its node (a client certificate of
//! `system:node:<name>`, as the DaemonSet uses the kubelet's) and `netd
//! tunnel-server` with its ServiceAccount's token, so a missing permission
//! fails here and a superfluous one shows in the rule sets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use netd::testing::{self, Cluster, KubeApiServer, KubeCluster, NetdProcess, Node, HEALTH_ADDR, KUBE_APISERVER_BIN};
use serde::Deserialize;
use serde_json::{json, Value};

const NETD: &str = env!("CARGO_BIN_EXE_netd");
const NETD_CLOUD: &str = env!("CARGO_BIN_EXE_netd-cloud");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const KUBECTL: &str = "/usr/bin/kubectl";
const NS: &str = "kube-system";

/// (API group, resource, verb).
type Rule = (String, String, String);

fn rules(list: &[(&str, &str, &[&str])]) -> BTreeSet<Rule> {
    list.iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|v| (group.to_string(), resource.to_string(), v.to_string()))
        })
        .collect()
}

/// What `netd run` calls (netd/src/registry/kubernetes.rs, netd/src/kube/pods.rs):
/// all of it granted to `system:node:<name>` by the Node authorizer, none of
/// it to netd's ServiceAccount.
fn netd_rules() -> BTreeSet<Rule> {
    rules(&[
        ("", "nodes", &["get", "list", "watch"]),
        ("", "nodes/status", &["patch"]),
        ("", "pods", &["get", "list", "watch"]),
    ])
}

/// What `netd-cloud tunnel-server --registry kubernetes` calls: one list +
/// watch of the nodes (ClusterRole), and its replica Leases in kube-system
/// (Role; registry/src/kubernetes/replicas.rs).
fn tunnel_server_rules() -> BTreeSet<Rule> {
    rules(&[
        ("", "nodes", &["list", "watch"]),
        ("coordination.k8s.io", "leases", &["list", "create", "patch", "delete"]),
    ])
}

/// What `netd-controller run` calls (netd/src/controller/, and the
/// rollout executor in netd/src/rollout/): cluster-wide nodes and pods, in
/// kube-system its Lease, ConfigMaps, Events and deleting (netd) pods.
fn controller_rules() -> BTreeSet<Rule> {
    rules(&[
        ("", "nodes", &["list", "watch", "patch"]),
        ("", "pods", &["get", "list", "watch", "patch", "delete"]),
        ("coordination.k8s.io", "leases", &["get", "create", "update"]),
        ("", "configmaps", &["get", "list", "watch", "create", "update", "delete"]),
        ("", "events", &["create"]),
    ])
}

/// The manifest files in the order `kubectl apply -f deploy/` takes them.
fn files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DEPLOY)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
        .collect();
    files.sort();
    files
}

/// Every object of every manifest, with its file's name.
fn objects() -> Vec<(String, Value)> {
    let mut objects = Vec::new();
    for file in files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !value.is_null() {
                objects.push((name.clone(), value));
            }
        }
    }
    objects
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
}

/// A ClusterRole's rules as triples; resourceNames and nonResourceURLs
/// are refused (none is meant to be there).
fn role_rules(role: &Value) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(), "{rule}");
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    let text = |v: &Value| v.as_str().unwrap().to_string();
                    out.insert((text(group), text(resource), text(verb)));
                }
            }
        }
    }
    out
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|a| a.iter().map(|v| v.as_str().unwrap()).collect()).unwrap_or_default()
}

fn env_of(container: &Value) -> Vec<(String, Option<String>)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].as_str().map(String::from)))
        .collect()
}

fn env_value(container: &Value, name: &str) -> String {
    env_of(container).into_iter().find(|(n, _)| n == name).and_then(|(_, v)| v).unwrap_or_else(|| panic!("no {name}"))
}

/// `program <command> --help`.
fn help(program: &str, command: &str) -> String {
    let out = Command::new(program).args([command, "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Every hostPath volume is mounted at its own host path (netd reads paths
/// that name host files: the conflist's dataDir, subnet.env for netd-ipam).
fn check_mounts(pod: &Value, container: &Value, expect: &[(&str, bool)]) {
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let got: BTreeSet<(String, bool)> = mounts
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap().to_string(), m["readOnly"].as_bool().unwrap_or(false)))
        .collect();
    let want: BTreeSet<(String, bool)> = expect.iter().map(|(p, ro)| (p.to_string(), *ro)).collect();
    assert_eq!(got, want, "mounts of {}", container["name"]);
    for mount in mounts {
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap_or_else(|| panic!("{mount}"));
        if let Some(host) = volume["hostPath"]["path"].as_str() {
            let path = mount["mountPath"].as_str().unwrap();
            assert!(path == host || path == format!("/host{host}"), "{path} mounts host {host}");
        }
    }
}

/// The default clap prints for `flag` in a `--help` text: the
/// `[default: …]` after the option's `[env: …]`, so a default its
/// description spells out in words is not taken for it. An option's entry
/// is its line and, in long help, the lines up to the next option.
fn help_default(help: &str, flag: &str) -> Option<String> {
    let mut lines = help.lines().map(str::trim_start);
    let first = lines.find(|l| l.starts_with(&format!("{flag} ")) || l.contains(&format!(", {flag} ")))?;
    let mut entry = first.to_string();
    for line in lines.take_while(|l| !l.is_empty() && !l.starts_with('-')) {
        entry.push(' ');
        entry.push_str(line);
    }
    let after_env = entry.find("[env: ").map_or(&entry[..], |at| &entry[at..]);
    let (_, rest) = after_env.split_once("[default: ")?;
    rest.split_once(']').map(|(value, _)| value.to_string())
}

/// The volume `container` mounts at `path`.
fn volume_of<'a>(pod: &'a Value, container: &Value, path: &str) -> &'a Value {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", container["name"]));
    pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap_or_else(|| panic!("{mount}"))
}

/// The host path of the hostPath volume `container` mounts at `path`.
fn host_path<'a>(pod: &'a Value, container: &Value, path: &str) -> Option<&'a str> {
    volume_of(pod, container, path)["hostPath"]["path"].as_str()
}

/// The `valueFrom` of variable `name` (`null` for a literal value).
fn env_from<'a>(container: &'a Value, name: &str) -> &'a Value {
    let env = container["env"].as_array().unwrap();
    let matching: Vec<&Value> = env.iter().filter(|e| e["name"] == name).collect();
    let [variable] = matching.as_slice() else { panic!("{name} is set {} times", matching.len()) };
    &variable["valueFrom"]
}

/// The port of an `IP:PORT` listen address.
fn port_of(listen: &str) -> u16 {
    listen.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or_else(|| panic!("{listen:?}"))
}

#[test]
fn manifests_are_what_they_should_be() {
    let names: Vec<String> = files().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "10-rbac.yaml",
            "20-net-conf.yaml",
            "30-daemonset.yaml",
            "40-tunnel-server.yaml",
            "45-tunnel-agent.yaml",
            "50-controller.yaml"
        ]
    );
    let objects = objects();
    let found: Vec<(String, String, String)> = objects
        .iter()
        .map(|(file, o)| {
            (file.clone(), o["kind"].as_str().unwrap().to_string(), o["metadata"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    let expected = [
        ("10-rbac.yaml", "ServiceAccount", "netd"),
        ("10-rbac.yaml", "ServiceAccount", "netd-tunnel-server"),
        ("10-rbac.yaml", "ClusterRole", "netd-tunnel-server"),
        ("10-rbac.yaml", "ClusterRoleBinding", "netd-tunnel-server"),
        ("10-rbac.yaml", "Role", "netd-tunnel-server"),
        ("10-rbac.yaml", "RoleBinding", "netd-tunnel-server"),
        ("10-rbac.yaml", "ServiceAccount", "netd-controller"),
        ("10-rbac.yaml", "ClusterRole", "netd-controller"),
        ("10-rbac.yaml", "ClusterRoleBinding", "netd-controller"),
        ("10-rbac.yaml", "Role", "netd-controller"),
        ("10-rbac.yaml", "RoleBinding", "netd-controller"),
        ("20-net-conf.yaml", "ConfigMap", "netd-cfg"),
        ("30-daemonset.yaml", "DaemonSet", "netd"),
        ("40-tunnel-server.yaml", "DaemonSet", "netd-tunnel-server"),
        ("45-tunnel-agent.yaml", "DaemonSet", "netd-tunnel-agent"),
        ("50-controller.yaml", "DaemonSet", "netd-controller"),
    ];
    let expected: Vec<(String, String, String)> =
        expected.iter().map(|(f, k, n)| (f.to_string(), k.to_string(), n.to_string())).collect();
    assert_eq!(found, expected);
    for (_, object) in &objects {
        let namespaced = !object["kind"].as_str().unwrap().starts_with("Cluster");
        // (A Role's and RoleBinding's namespace is theirs, kube-system too.)
        assert_eq!(object["metadata"].get("namespace").is_some(), namespaced, "{}", object["metadata"]);
        if namespaced {
            assert_eq!(object["metadata"]["namespace"], NS);
        }
    }

    // RBAC: exactly what the code calls, bound to the right accounts; netd's
    // account is bound to nothing and its token never mounted (netd acts as
    // its node).
    // The tunnel server: nodes cluster-wide, Leases in kube-system only.
    let cluster_wide = role_rules(find(&objects, "ClusterRole", "netd-tunnel-server"));
    let in_kube_system = role_rules(find(&objects, "Role", "netd-tunnel-server"));
    assert!(cluster_wide.iter().all(|(_, resource, _)| resource == "nodes"), "{cluster_wide:?}");
    assert!(in_kube_system.iter().all(|(_, resource, _)| resource == "leases"), "{in_kube_system:?}");
    assert_eq!(cluster_wide.union(&in_kube_system).cloned().collect::<BTreeSet<_>>(), tunnel_server_rules());
    assert_eq!(find(&objects, "ServiceAccount", "netd")["automountServiceAccountToken"], false);
    for (_, object) in &objects {
        for subject in object["subjects"].as_array().into_iter().flatten() {
            assert!(subject["name"] != "netd", "netd's ServiceAccount is bound: {object}");
        }
    }
    let name = "netd-tunnel-server";
    for kind in ["ClusterRole", "Role"] {
        let binding = find(&objects, &format!("{kind}Binding"), name);
        assert_eq!(binding["roleRef"], json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}));
        assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": name, "namespace": NS}]));
    }

    // net-conf.json as netd's own parser reads it; the conflist as the pin
    // keeper discovers it.
    let config = find(&objects, "ConfigMap", "netd-cfg");
    let net_conf = config["data"]["net-conf.json"].as_str().unwrap();
    let network = netd::model::flannel::parse_network_config(net_conf.as_bytes()).unwrap();
    assert_eq!((network.network.to_string().as_str(), network.subnet_len, network.vni), ("10.244.0.0/16", 24, 1));
    let cni_conf: Value = serde_json::from_str(config["data"]["cni-conf.json"].as_str().unwrap()).unwrap();
    assert_eq!(cni_conf["name"], "cbr0", "flannel's network name: netd-ipam imports host-local's cbr0 directory");
    assert_eq!(cni_conf["plugins"][0]["type"], "bridge");
    assert_eq!(cni_conf["plugins"][0]["mtu"], 1450, "FLANNEL_MTU on a 1500-byte underlay");
    // What `netd install-cni` checks before it replaces the host's conflist.
    netd::cni::install::validate_conflist(config["data"]["cni-conf.json"].as_str().unwrap().as_bytes()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-netd.conflist"), cni_conf.to_string()).unwrap();
    let discovered = netd::cni::discover::discover(dir.path());
    assert!(discovered.problems.is_empty(), "{:?}", discovered.problems);
    assert_eq!(
        discovered.stores.into_iter().collect::<Vec<_>>(),
        [PathBuf::from("/var/lib/cni/networks/cbr0/netd-ipam.db")]
    );

    // The netd DaemonSet.
    let ds = find(&objects, "DaemonSet", "netd");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(ds["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
    assert_eq!(ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(pod["serviceAccountName"], "netd");
    assert_eq!(pod["automountServiceAccountToken"], false, "no ServiceAccount token on any node");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        json!([{"operator": "Exists", "effect": "NoSchedule"}, {"operator": "Exists", "effect": "NoExecute"}])
    );
    assert!(pod.get("hostPID").is_none() && pod.get("hostIPC").is_none());
    let [init] = pod["initContainers"].as_array().unwrap().as_slice() else { panic!("one init container") };
    let [netd] = pod["containers"].as_array().unwrap().as_slice() else { panic!("one container") };
    assert_eq!(init["image"], netd["image"]);
    assert_eq!(strings(&netd["command"]), ["/usr/local/bin/netd", "run"]);
    let run_help = help(NETD, "run");
    for (name, _) in env_of(netd) {
        assert!(name == "NODE_NAME" || run_help.contains(&format!("[env: {name}=")), "netd run reads no {name}");
    }
    assert_eq!(env_value(netd, "NETD_REGISTRY"), "kubernetes");
    // As its node: the kubelet's client certificate, from the directory
    // mounted read-only (a re-pointed symlink is seen); the CA from the
    // kube-root-ca.crt ConfigMap.
    assert_eq!(env_value(netd, "NETD_CLIENT_CERT"), "/var/lib/kubelet/pki/kubelet-client-current.pem");
    let ca_file = env_value(netd, "NETD_CA_FILE");
    let ca_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "kube-ca").unwrap();
    assert_eq!(ca_volume["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(
        ca_file,
        format!("/var/run/netd/kube-ca/{}", ca_volume["configMap"]["items"][0]["path"].as_str().unwrap())
    );
    let health = env_value(netd, "NETD_HEALTH_ADDR");
    let health_port: u16 = health.rsplit_once(':').unwrap().1.parse().unwrap();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &netd[probe]["httpGet"];
        assert_eq!(
            (get["host"].as_str(), get["port"].as_u64(), get["path"].as_str()),
            (Some("127.0.0.1"), Some(u64::from(health_port)), Some(path))
        );
    }
    assert!(health.starts_with("127.0.0.1:"), "probes dial 127.0.0.1, so netd must listen there");
    // The environment is one netd accepts (its network as net-conf.json says;
    // in the pod netd reads the mounted file).
    let mut print = Command::new(NETD);
    print.args(["run", "--print-config"]).env_clear().env("NODE_NAME", "node-1").env("NETD_NETWORK", "10.244.0.0/16");
    for (name, value) in env_of(netd) {
        if let Some(value) = value {
            print.env(name, value);
        }
    }
    let printed = print.output().unwrap();
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let printed: Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(
        (&printed["registry"], &printed["healthAddr"], &printed["masquerade"]),
        (&json!("kubernetes"), &json!(health), &json!(true))
    );
    assert_eq!(
        (&printed["clientCert"], &printed["clientKey"], &printed["caFile"]),
        (&json!("/var/lib/kubelet/pki/kubelet-client-current.pem"), &Value::Null, &json!(ca_file))
    );
    assert_eq!(
        netd["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN"]}),
        "rtnetlink and nftables need NET_ADMIN, nothing else"
    );
    assert_eq!(netd["securityContext"]["privileged"], false);
    assert_eq!(init["securityContext"]["capabilities"], json!({"drop": ["ALL"]}));
    check_mounts(
        pod,
        netd,
        &[
            ("/run/flannel", false),
            ("/var/lib/netd", false),
            ("/etc/cni/net.d", true),
            ("/var/lib/cni/networks", false),
            ("/etc/kube-flannel", true),
            ("/var/lib/kubelet/pki", true),
            ("/var/run/netd/kube-ca", true),
        ],
    );
    // The init container is `netd install-cni` as it stands: no arguments
    // and no NETD_CNI_* variables, so its defaults (read from its --help)
    // must be exactly where the mounts put the host's directories and the
    // ConfigMap's conflist.
    assert_eq!(strings(&init["command"]), ["/usr/local/bin/netd", "install-cni"]);
    for field in ["args", "env", "envFrom"] {
        assert!(init.get(field).is_none(), "install-cni runs with its defaults, not {field}: {init}");
    }
    let install_help = help(NETD, "install-cni");
    let default = |flag: &str| {
        help_default(&install_help, flag).unwrap_or_else(|| panic!("install-cni {flag}: no default in\n{install_help}"))
    };
    let (bin_dir, conf_dir, conflist) = (default("--bin-dir"), default("--conf-dir"), default("--conflist"));
    let (conflist_dir, conflist_file) = conflist.rsplit_once('/').unwrap();
    check_mounts(pod, init, &[(&bin_dir, false), (&conf_dir, false), (conflist_dir, true)]);
    // The host's directories the kubelet and the runtime read, the conflist
    // directory the same one netd's own container reads.
    assert_eq!(host_path(pod, init, &bin_dir), Some("/opt/cni/bin"));
    assert_eq!(host_path(pod, init, &conf_dir), Some("/etc/cni/net.d"));
    assert_eq!(host_path(pod, netd, "/etc/cni/net.d"), Some("/etc/cni/net.d"));
    assert_eq!(
        volume_of(pod, init, conflist_dir)["configMap"],
        json!({"name": "netd-cfg", "items": [{"key": "cni-conf.json", "path": conflist_file}]}),
        "{conflist} is the ConfigMap's cni-conf.json"
    );
    // The plugin comes from the image, beside netd; the conflist is the name
    // discovery reads above, and flannel's is the one that would shadow it.
    let plugin = default("--plugin");
    assert_eq!(
        plugin.rsplit_once('/'),
        strings(&init["command"])[0].rsplit_once('/').map(|(dir, _)| (dir, "netd-ipam"))
    );
    assert_eq!(
        (default("--conf-name").as_str(), default("--remove").as_str()),
        ("10-netd.conflist", "10-flannel.conflist")
    );
    assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);

    // The tunnel server: cloud nodes only, BPF for the pinned DNAT.
    let ds = find(&objects, "DaemonSet", "netd-tunnel-server");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "netd-tunnel-server");
    assert_eq!(pod["hostNetwork"], true);
    // Cloud nodes by the label kubelets cannot set (SPEC §3b).
    assert_eq!(pod["nodeSelector"], json!({"node-restriction.kubernetes.io/netd-role": "cloud"}));
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "node-role.alibabacloud.com/addon", "operator": "Exists", "effect": "NoSchedule"}])
    );
    let [server] = pod["containers"].as_array().unwrap().as_slice() else { panic!("one container") };
    assert_eq!(strings(&server["command"]), ["/usr/local/bin/netd-cloud", "tunnel-server"]);
    let server_help = help(NETD_CLOUD, "tunnel-server");
    for (name, _) in env_of(server) {
        assert!(
            name == "NODE_NAME" || server_help.contains(&format!("[env: {name}=")),
            "tunnel-server reads no {name}"
        );
    }
    // The drain fits in the pod's grace period, with time to exit after it.
    let drain = env_value(server, "NETD_TUNNEL_DRAIN_GRACE");
    let drain_s: u64 = drain.strip_suffix('s').and_then(|n| n.parse().ok()).expect("drain grace in whole seconds");
    let grace_s = pod["terminationGracePeriodSeconds"].as_u64().expect("a termination grace period");
    assert!(drain_s + 5 <= grace_s, "a {drain} drain in a {grace_s} s termination grace period: SIGKILL cuts it short");
    let metrics = env_value(server, "NETD_TUNNEL_METRICS_LISTEN");
    let get = &server["readinessProbe"]["httpGet"];
    assert_eq!(format!("{}:{}", get["host"].as_str().unwrap(), get["port"]), metrics);
    assert_eq!(server["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["BPF", "NET_ADMIN"]}));
    check_mounts(pod, server, &[("/etc/netd/tunnel", true), ("/etc/kube-flannel", true), ("/sys/fs/bpf", false)]);
    let certs = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "certs").unwrap();
    assert_eq!(certs["secret"]["secretName"], "netd-tunnel-server");

    // The controller: every cloud node (its own DNAT), one leader.
    let mut role = role_rules(find(&objects, "ClusterRole", "netd-controller"));
    role.extend(role_rules(find(&objects, "Role", "netd-controller")));
    assert_eq!(role, controller_rules());
    let ds = find(&objects, "DaemonSet", "netd-controller");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "netd-controller");
    assert_eq!(
        (&pod["hostNetwork"], &pod["nodeSelector"]),
        (&json!(true), &json!({"node-restriction.kubernetes.io/netd-role": "cloud"}))
    );
    let [controller] = pod["containers"].as_array().unwrap().as_slice() else { panic!("one container") };
    assert_eq!(strings(&controller["command"]), ["/usr/local/bin/netd-controller", "run"]);
    let controller_help = Command::new(env!("CARGO_BIN_EXE_netd-controller")).args(["run", "--help"]).output().unwrap();
    let controller_help = String::from_utf8_lossy(&controller_help.stdout).into_owned();
    for (name, _) in env_of(controller) {
        assert!(
            name == "NODE_NAME" || name == "POD_NAME" || controller_help.contains(&format!("[env: {name}=")),
            "netd-controller run reads no {name}"
        );
    }
    let metrics = env_value(controller, "NETD_METRICS_LISTEN");
    let get = &controller["readinessProbe"]["httpGet"];
    assert_eq!(format!("{}:{}", get["host"].as_str().unwrap(), get["port"]), metrics);
    assert_eq!(controller["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["BPF", "NET_ADMIN"]}));
    check_mounts(pod, controller, &[("/sys/fs/bpf", false), ("/sys/fs/cgroup", true)]);

    // The tunnel agent: every node that is not a cloud node, with netd's
    // reach (every taint), no API access and no capability.
    let netd_pod = &find(&objects, "DaemonSet", "netd")["spec"]["template"]["spec"];
    let server_pod = &find(&objects, "DaemonSet", "netd-tunnel-server")["spec"]["template"]["spec"];
    let ds = find(&objects, "DaemonSet", "netd-tunnel-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"]);
    // Exactly the complement of the servers' nodes: NotIn the label's one
    // value (an unlabelled node is an edge node too, which NotIn matches).
    let cloud = server_pod["nodeSelector"].as_object().unwrap();
    let cloud: Vec<_> = cloud.iter().collect();
    let [(label, role)] = cloud.as_slice() else { panic!("{cloud:?}") };
    assert_eq!((label.as_str(), role.as_str()), ("node-restriction.kubernetes.io/netd-role", Some("cloud")));
    assert_eq!(
        pod["affinity"],
        json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": label, "operator": "NotIn", "values": [role]}]}]}}})
    );
    assert!(pod.get("nodeSelector").is_none(), "{}", pod["nodeSelector"]);
    assert_eq!(pod["serviceAccountName"], "netd", "bound to nothing");
    assert_eq!(pod["automountServiceAccountToken"], false, "no ServiceAccount token on any node");
    assert_eq!(pod["hostNetwork"], true, "it dials the node's own addresses as the node");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], netd_pod["tolerations"], "every NoSchedule and NoExecute taint, as netd");
    assert!(pod.get("hostPID").is_none() && pod.get("hostIPC").is_none() && pod.get("initContainers").is_none());
    let [agent] = pod["containers"].as_array().unwrap().as_slice() else { panic!("one container") };
    assert_eq!(strings(&agent["command"]), ["/usr/local/bin/netd", "tunnel-agent"]);
    assert!(agent.get("args").is_none() && agent.get("envFrom").is_none(), "{agent}");
    let agent_help = help(NETD, "tunnel-agent");
    for (name, _) in env_of(agent) {
        assert!(agent_help.contains(&format!("[env: {name}=")), "tunnel-agent reads no {name}");
    }
    // The servers from the ConfigMap the admin writes (the pod waits until
    // it has them), the name their certificate carries only if given.
    assert_eq!(
        env_from(agent, "NETD_TUNNEL_SERVERS"),
        &json!({"configMapKeyRef": {"name": "netd-tunnel-agent", "key": "servers"}})
    );
    assert_eq!(
        env_from(agent, "NETD_TUNNEL_SERVER_NAME"),
        &json!({"configMapKeyRef": {"name": "netd-tunnel-agent", "key": "server-name", "optional": true}})
    );
    assert_eq!(env_from(agent, "NETD_TUNNEL_NODE_IPS"), &json!({"fieldRef": {"fieldPath": "status.hostIP"}}));
    // Probes dial 127.0.0.1 on the agent's own port: not one another
    // host-network process of the same node already listens on.
    let metrics = env_value(agent, "NETD_TUNNEL_METRICS_LISTEN");
    assert!(metrics.starts_with("127.0.0.1:"), "probes dial 127.0.0.1, so the agent must listen there: {metrics}");
    let agent_port = port_of(&metrics);
    for (probe, get) in [("readinessProbe", &agent["readinessProbe"]), ("livenessProbe", &agent["livenessProbe"])] {
        assert_eq!(get["httpGet"], json!({"host": "127.0.0.1", "port": agent_port, "path": "/healthz"}), "{probe}");
    }
    assert_eq!(agent["ports"], json!([{"name": "metrics", "containerPort": agent_port}]));
    let controller_port = port_of(&env_value(controller, "NETD_METRICS_LISTEN"));
    let server_port = port_of(&env_value(&server_pod["containers"][0], "NETD_TUNNEL_METRICS_LISTEN"));
    let netd_port = port_of(&env_value(&netd_pod["containers"][0], "NETD_HEALTH_ADDR"));
    for (other, port) in
        [("netd-controller", controller_port), ("netd-tunnel-server", server_port), ("netd", netd_port)]
    {
        assert_ne!(agent_port, port, "the agent's metrics port is {other}'s (a node may run both)");
    }
    // Outbound TCP only.
    assert_eq!(
        agent["securityContext"],
        json!({"privileged": false, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": true,
               "allowPrivilegeEscalation": false})
    );
    // Its certificate: the node's own directory, read-only, where the agent
    // reads it; the pod subnet from the subnet.env netd writes.
    let cert_dir = env_value(agent, "NETD_TUNNEL_CERT_DIR");
    let subnet_env_dir = netd::subnet_env::DEFAULT_PATH.rsplit_once('/').unwrap().0;
    check_mounts(pod, agent, &[(&cert_dir, true), (subnet_env_dir, true)]);
    assert_eq!(host_path(pod, agent, &cert_dir), Some(cert_dir.as_str()));
    assert_eq!(volume_of(pod, agent, &cert_dir)["hostPath"]["type"], "Directory", "no empty directory made for it");
    assert_eq!(host_path(pod, agent, subnet_env_dir), host_path(netd_pod, &netd_pod["containers"][0], subnet_env_dir));

    // Two images, the ones `cargo xtask image` builds: what every node runs
    // (netd:<workspace version>: netd, netd-ipam, netd-join) and what only
    // cloud nodes run (netd-cloud:<version>: netd-cloud, netd-controller,
    // netd-autonomy). Edge nodes never pull the cloud's.
    let node_image = concat!("netd:", env!("CARGO_PKG_VERSION"));
    let cloud_image = concat!("netd-cloud:", env!("CARGO_PKG_VERSION"));
    let mut seen = BTreeSet::new();
    for (_, ds) in objects.iter().filter(|(_, o)| o["kind"] == "DaemonSet") {
        let name = ds["metadata"]["name"].as_str().unwrap();
        let expected = match name {
            "netd-tunnel-server" | "netd-controller" => cloud_image,
            _ => node_image,
        };
        let pod = &ds["spec"]["template"]["spec"];
        for container in pod["initContainers"].as_array().into_iter().chain(pod["containers"].as_array()).flatten() {
            assert_eq!(container["image"], expected, "{name}/{}", container["name"]);
            seen.insert(expected);
        }
    }
    assert_eq!(seen, BTreeSet::from([node_image, cloud_image]));
}

// ---------------------------------------------------------------------------
// Against kube-apiserver with RBAC.

struct Kube<'a> {
    server: &'a KubeApiServer,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kube<'_> {
    /// `kubectl args…` where the API server listens.
    fn kubectl(&self, args: &[&str]) -> Output {
        let mut command = Command::new(KUBECTL);
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.cache.display()))
            .args(args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy");
        self.server.host().run(move || command.output().unwrap()).unwrap()
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (status, reply) = self.server.api(method, path, text.as_deref().map(|t| ("application/json", t))).unwrap();
        (status, serde_json::from_str(&reply).unwrap_or(Value::String(reply)))
    }

    fn api_ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, reply) = self.api(method, path, body);
        assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {reply}");
        reply
    }

    /// A token of ServiceAccount kube-system/`account` from the TokenRequest API.
    fn token(&self, account: &str) -> String {
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"expirationSeconds": 3600}});
        let reply =
            self.api_ok("POST", &format!("/api/v1/namespaces/{NS}/serviceaccounts/{account}/token"), Some(request));
        reply["status"]["token"].as_str().unwrap().to_string()
    }

    /// SelfSubjectRulesReview in kube-system as the token's owner:
    /// resource rules as triples, and the non-resource rules.
    fn rules_of(&self, token: &str, files: &Path) -> (BTreeSet<Rule>, BTreeSet<(String, String)>) {
        let review = files.join("review.json");
        let body = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
                          "spec": {"namespace": NS}});
        std::fs::write(&review, body.to_string()).unwrap();
        let reply = self.kubectl_ok(&[
            "--token",
            token,
            "create",
            "--raw",
            "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
            "-f",
            review.to_str().unwrap(),
        ]);
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["status"]["incomplete"], false, "{reply}");
        let mut resources = BTreeSet::new();
        for rule in reply["status"]["resourceRules"].as_array().unwrap() {
            assert!(rule.get("resourceNames").is_none(), "{rule}");
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        resources.insert((group.to_string(), resource.to_string(), verb.to_string()));
                    }
                }
            }
        }
        let mut urls = BTreeSet::new();
        for rule in reply["status"]["nonResourceRules"].as_array().unwrap() {
            for url in strings(&rule["nonResourceURLs"]) {
                for verb in strings(&rule["verbs"]) {
                    urls.insert((url.to_string(), verb.to_string()));
                }
            }
        }
        (resources, urls)
    }

    fn can_i(&self, token: &str, args: &[&str]) -> bool {
        let mut all = vec!["--token", token, "auth", "can-i"];
        all.extend_from_slice(args);
        let out = self.kubectl(&all);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            answer == "yes" || answer == "no",
            "kubectl auth can-i {args:?}: {answer:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer == "yes"
    }
}

fn wait_for(what: &str, logs: &dyn Fn() -> String, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(45);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has_route(node: &Node, dst: &str) -> bool {
    node.ns.ip(&["route", "show", dst]).is_ok_and(|r| r.contains("dev flannel.1"))
}

/// The flag of a `NETD_*` variable of `netd run` (`NETD_HEALTH_ADDR` →
/// `--health-addr`), so the test runs netd with the DaemonSet's settings
/// without touching its own environment.
fn flag_of(variable: &str) -> String {
    format!("--{}", variable.trim_start_matches("NETD_").to_lowercase().replace('_', "-"))
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn deploy_applies_and_netd_runs_as_its_node_under_node_rbac_and_node_restriction() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let required = std::env::var_os(testing::REQUIRE_ENV).is_some();
    for tool in [KUBE_APISERVER_BIN, KUBECTL] {
        let present = Path::new(tool).is_file()
            || (tool == KUBE_APISERVER_BIN && std::env::var_os(testing::KUBE_APISERVER_ENV).is_some());
        if !present {
            assert!(!required, "{tool} is missing ({} is set)", testing::REQUIRE_ENV);
            eprintln!("skipping: {tool} is missing (`cargo xtask setup` builds kube-apiserver)");
            return;
        }
    }
    let objects = objects();
    let net_conf = find(&objects, "ConfigMap", "netd-cfg")["data"]["net-conf.json"].as_str().unwrap().to_string();
    let network = netd::model::flannel::parse_network_config(net_conf.as_bytes()).unwrap().network.to_string();

    let files = tempfile::tempdir().unwrap();
    let cluster = Cluster::bare(1).unwrap();
    // As kubeadm runs it: the Node authorizer, RBAC and NodeRestriction.
    let kube_cluster =
        KubeCluster::builder().host(cluster.control_plane()).rbac(true).node_restriction(true).start().unwrap();
    let server = kube_cluster.api();
    let ca = files.path().join("ca.crt");
    std::fs::write(&ca, server.ca_cert_pem().unwrap()).unwrap();
    let kubeconfig = server.admin_kubeconfig();
    let kube = Kube { server, kubeconfig, cache: files.path().join("kube-cache") };

    // A server-side dry run of the whole directory: validated and admitted,
    // nothing stored.
    let dry = kube.kubectl_ok(&["apply", "--dry-run=server", "-f", DEPLOY]);
    assert_eq!(dry.lines().filter(|l| l.ends_with("(server dry run)")).count(), objects.len(), "{dry}");
    assert_eq!(kube.api("GET", &format!("/api/v1/namespaces/{NS}/serviceaccounts/netd"), None).0, 404);
    // The real apply, then again: nothing left to change.
    let applied = kube.kubectl_ok(&["apply", "-f", DEPLOY]);
    assert_eq!(applied.lines().filter(|l| l.ends_with(" created")).count(), objects.len(), "{applied}");
    let again = kube.kubectl_ok(&["apply", "-f", DEPLOY]);
    assert_eq!(again.lines().filter(|l| l.ends_with(" unchanged")).count(), objects.len(), "{again}");
    let ds = kube.api_ok("GET", &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/netd"), None);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "OnDelete");

    // What each ServiceAccount may do: its ClusterRole's rules exactly, over
    // what any authenticated account has (measured on an account bound to
    // nothing).
    kube.api_ok(
        "POST",
        &format!("/api/v1/namespaces/{NS}/serviceaccounts"),
        Some(json!({"metadata": {"name": "nobody"}})),
    );
    let (base_resources, base_urls) = kube.rules_of(&kube.token("nobody"), files.path());
    let reviews = rules(&[
        ("authorization.k8s.io", "selfsubjectaccessreviews", &["create"]),
        ("authorization.k8s.io", "selfsubjectrulesreviews", &["create"]),
    ]);
    assert_eq!(base_resources, reviews, "an account bound to nothing may only ask what it may do");
    assert!(!base_urls.iter().any(|(url, _)| url == "*"), "{base_urls:?}");
    // netd's account (netd-tunnel-agent's too): nothing beyond any
    // account's (a token of it, were one ever made, could not touch a Node).
    let netd_token = kube.token("netd");
    let (resources, urls) = kube.rules_of(&netd_token, files.path());
    assert_eq!(resources, base_resources, "netd's ServiceAccount has no permission of its own");
    assert_eq!(urls, base_urls);
    assert!(!kube.can_i(&netd_token, &["patch", "nodes", "--subresource=status"]));
    assert!(!kube.can_i(&netd_token, &["list", "nodes"]));
    {
        let (account, token, expected) =
            ("netd-tunnel-server", kube.token("netd-tunnel-server"), tunnel_server_rules());
        let (resources, urls) = kube.rules_of(&token, files.path());
        let extra: BTreeSet<Rule> = resources.difference(&base_resources).cloned().collect();
        assert_eq!(extra, expected, "{account}'s permissions beyond any account's");
        assert!(resources.is_superset(&base_resources));
        assert_eq!(urls, base_urls, "{account} gets no non-resource URL beyond any account's");
        let list = kube.kubectl_ok(&["--token", &token, "auth", "can-i", "--list", "-n", NS]);
        // (netd-controller's own check is below: it may patch nodes and write ConfigMaps.)
        assert!(list.lines().any(|l| l.starts_with("nodes ")), "{list}");
        assert!(list.lines().any(|l| l.starts_with("leases.coordination.k8s.io ")), "{list}");
        for forbidden in ["secrets", "pods/exec", "configmaps"] {
            assert!(!list.lines().any(|l| l.starts_with(&format!("{forbidden} "))), "{account}: {list}");
        }
        for args in [
            &["get", "secrets"][..],
            &["create", "pods", "--subresource=exec"],
            &["get", "pods", "--subresource=log"],
            &["delete", "nodes"],
            &["patch", "nodes"],
            &["update", "nodes", "--subresource=status"],
            &["create", "pods"],
            &["create", "events"],
            &["get", "leases"],
            &["update", "leases"],
            &["watch", "leases"],
        ] {
            assert!(!kube.can_i(&token, &[args, &["-n", NS]].concat()), "{account} may {args:?}");
        }
        // Its replica Leases in kube-system, nowhere else (not the kubelets'
        // heartbeats in kube-node-lease).
        assert!(kube.can_i(&token, &["patch", "leases", "-n", NS]));
        for namespace in ["kube-node-lease", "default"] {
            for verb in ["create", "patch", "delete", "list"] {
                assert!(!kube.can_i(&token, &[verb, "leases", "-n", namespace]), "{account} may {verb} in {namespace}");
            }
        }
    }
    // What a node may do, by the Node authorizer alone (no binding): every
    // call of `netd run`. (The authorizer does not look at names; which Node
    // a node may write is NodeRestriction's, checked below for real.)
    let node = &cluster.nodes[0];
    let as_node = |args: &[&str]| {
        let user = format!("--as=system:node:{}", node.name);
        let all = [&["auth", "can-i", &user, "--as-group=system:nodes"][..], args].concat();
        let out = kube.kubectl(&all);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (group, resource, verb) in netd_rules() {
        assert!(group.is_empty());
        let (resource, sub) = resource.split_once('/').map_or((resource.as_str(), None), |(r, s)| (r, Some(s)));
        let mut args = vec![verb.as_str(), resource, "--all-namespaces"];
        let sub = sub.map(|s| format!("--subresource={s}"));
        args.extend(sub.as_deref());
        assert!(as_node(&args), "the Node authorizer does not grant {verb} {resource} {sub:?}");
    }
    for args in
        [&["get", "secrets", "-n", NS][..], &["delete", "nodes"], &["create", "pods", "--subresource=exec", "-n", NS]]
    {
        assert!(!as_node(args), "a node may {args:?}");
    }
    // netd-controller: what its parts call, no more (no secrets, no deletes
    // but kube-system's pods and ConfigMaps, no exec, nothing outside
    // kube-system but nodes and pods).
    let controller_token = kube.token("netd-controller");
    let (resources, urls) = kube.rules_of(&controller_token, files.path());
    let extra: BTreeSet<Rule> = resources.difference(&base_resources).cloned().collect();
    assert_eq!(extra, controller_rules(), "netd-controller's permissions beyond any account's");
    assert_eq!(urls, base_urls);
    for args in [
        &["get", "secrets", "-n", NS][..],
        &["delete", "nodes"],
        &["delete", "pods", "-n", "default"],
        &["delete", "daemonsets", "-n", NS],
        &["create", "pods", "--subresource=exec", "-n", NS],
        &["update", "nodes", "--subresource=status"],
        &["create", "configmaps", "-n", "default"],
        &["update", "leases", "-n", "kube-node-lease"],
    ] {
        assert!(!kube.can_i(&controller_token, args), "netd-controller may {args:?}");
    }
    assert!(kube.can_i(&controller_token, &["patch", "pods", "--all-namespaces"]));

    // netd run, as the DaemonSet runs it: as its node, with a client
    // certificate and key in one file (the form of kubelet's
    // kubelet-client-current.pem) issued by the cluster CA.
    let cidr = "10.244.1.0/24";
    kube.api_ok(
        "POST",
        "/api/v1/nodes",
        Some(json!({"metadata": {"name": node.name}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})),
    );
    let state = files.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let issued = server.ca().issue_node(&node.name, &[], Duration::from_secs(3600)).unwrap();
    let node_pem = files.path().join("kubelet-client-current.pem");
    std::fs::write(&node_pem, format!("{}{}", issued.cert_pem(), issued.key_pem())).unwrap();
    // The conflist the init container installs, its stores in the temp dir.
    let cni_dir = files.path().join("net.d");
    std::fs::create_dir_all(&cni_dir).unwrap();
    let mut cni_conf: Value =
        serde_json::from_str(find(&objects, "ConfigMap", "netd-cfg")["data"]["cni-conf.json"].as_str().unwrap())
            .unwrap();
    cni_conf["plugins"][0]["ipam"]["dataDir"] = json!(files.path().join("networks"));
    std::fs::write(cni_dir.join("10-netd.conflist"), cni_conf.to_string()).unwrap();
    let ds = find(&objects, "DaemonSet", "netd");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let mut args = testing::netd_run_args(&node.name, &format!("kubernetes:{}", server.url()), &state);
    // The pod's paths (certificate, CA) are the test's files here.
    let own = ["NETD_REGISTRY", "NETD_CLIENT_CERT", "NETD_CA_FILE"];
    for (name, value) in env_of(container) {
        if let (Some(value), true) = (value, name.starts_with("NETD_") && !own.contains(&name.as_str())) {
            args.push(format!("{}={value}", flag_of(&name)).into());
        }
    }
    for (flag, value) in [("--client-cert", &node_pem), ("--ca-file", &ca), ("--cni-conf-dir", &cni_dir)] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.extend(["--network".into(), network.clone().into()]);
    // The pin keeper refreshes its metrics every grace / 4 (at most 30 s):
    // a short grace makes the pod watch visible in seconds.
    args.extend(["--pin-grace".into(), "8s".into()]);
    let log = files.path().join("netd.log");
    let netd = NetdProcess::spawn(&node.ns, Path::new(NETD), args, &log).unwrap();
    let netd_log = || netd.log();

    // Start-up: lease published on the Node, subnet.env written, ready.
    wait_for("/readyz", &netd_log, || {
        testing::http_get(&node.ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    let object = kube.api_ok("GET", &format!("/api/v1/nodes/{}", node.name), None);
    let annotation = |key: &str| object["metadata"]["annotations"][format!("flannel.alpha.coreos.com/{key}")].clone();
    assert_eq!(annotation("backend-type"), "vxlan");
    assert_eq!(annotation("kube-subnet-manager"), "true");
    assert_eq!(annotation("public-ip"), node.public_ip().to_string());
    assert!(annotation("backend-data").as_str().unwrap().starts_with(r#"{"VNI":1,"VtepMAC":""#));
    let condition = object["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .cloned()
        .unwrap_or_else(|| panic!("no NetworkUnavailable condition: {object}"));
    assert_eq!(condition["status"], "False");
    let subnet_env = std::fs::read_to_string(state.join("subnet.env")).unwrap();
    assert!(subnet_env.contains(&format!("FLANNEL_NETWORK={network}\n")), "{subnet_env}");
    assert!(subnet_env.contains("FLANNEL_SUBNET=10.244.1.1/24\n"), "{subnet_env}");
    // The pod watch listed this node's pods (pods list is granted).
    let metric = |name: &str| testing::metric(&node.ns, name);
    wait_for("the pod list", &netd_log, || metric("netd_pods_synced") == Some(1.0));

    // Watches: a flannel node joining becomes a peer, a pod bound here shows up.
    kube.api_ok(
        "POST",
        "/api/v1/nodes",
        Some(json!({
            "metadata": {"name": "flannel-2", "annotations": {
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"62:a4:3c:2f:18:d1"}"#,
                "flannel.alpha.coreos.com/public-ip": "192.168.50.12",
                "flannel.alpha.coreos.com/kube-subnet-manager": "true"}},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]},
        })),
    );
    wait_for("the new node's route", &netd_log, || has_route(node, "10.244.2.0/24"));
    assert_eq!(metric("netd_peers_programmed"), Some(1.0));
    kube.api_ok(
        "POST",
        &format!("/api/v1/namespaces/{NS}/pods"),
        Some(json!({"metadata": {"name": "web-1"}, "spec": {
            "nodeName": node.name, "serviceAccountName": "nobody", "automountServiceAccountToken": false,
            "containers": [{"name": "web", "image": "example.invalid/web:1"}]}})),
    );
    wait_for("the pod watch", &netd_log, || metric("netd_pods_bound") == Some(1.0));
    kube.api_ok("DELETE", "/api/v1/nodes/flannel-2", None);
    wait_for("the departed node's route removed", &netd_log, || !has_route(node, "10.244.2.0/24"));
    let text = netd.log();
    assert!(!text.contains("forbidden") && !text.contains("HTTP 403"), "netd was refused something:\n{text}");
    // Its credential writes its own Node only: another node's lease, with
    // the same certificate, is refused by NodeRestriction.
    kube.api_ok(
        "POST",
        "/api/v1/nodes",
        Some(json!({"metadata": {"name": "other"}, "spec": {"podCIDR": "10.244.3.0/24"}})),
    );
    let cert_file = files.path().join("node.crt");
    let key_file = files.path().join("node.key");
    std::fs::write(&cert_file, issued.cert_pem()).unwrap();
    std::fs::write(&key_file, issued.key_pem()).unwrap();
    let hijack = json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "192.168.50.11"}}});
    let auth = testing::ApiAuth::ClientCert { cert: &cert_file, key: &key_file };
    let patch = |name: &str| {
        let path = format!("/api/v1/nodes/{name}/status");
        server.api_as(auth, "PATCH", &path, Some(("application/merge-patch+json", &hijack.to_string()))).unwrap()
    };
    let (status, body) = patch("other");
    assert_eq!(status, 403, "{body}");
    assert_eq!(patch(&node.name).0, 200, "its own Node's status is its to write");

    // The tunnel server with its own token: reads the nodes' leases and
    // announces itself in its replica Lease, nothing else.
    let tunnel_token = files.path().join("tunnel.token");
    std::fs::write(&tunnel_token, kube.token("netd-tunnel-server")).unwrap();
    let certs = files.path().join("tunnel");
    let run = |args: &[&str]| {
        let out = Command::new(NETD_CLOUD).args(args).output().unwrap();
        assert!(out.status.success(), "netd-cloud {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (ca_dir, cert_dir) = (files.path().join("tunnel-ca"), certs.to_str().unwrap());
    run(&["certs", "ca", "--out", ca_dir.to_str().unwrap()]);
    run(&["certs", "server", "--ca-dir", ca_dir.to_str().unwrap(), "--ip", "192.168.50.11", "--out", cert_dir]);
    let tunnel_log = files.path().join("tunnel.log");
    let mut tunnel_args: Vec<std::ffi::OsString> = vec!["tunnel-server".into()];
    for (flag, value) in [
        ("--cert-dir", cert_dir.to_string()),
        // The doors bind the cloud node's address (the test node has no
        // default route to find it by).
        ("--address", node.public_ip().to_string()),
        ("--registry", format!("kubernetes:{}", server.url())),
        ("--network", network.clone()),
        ("--token-file", tunnel_token.display().to_string()),
        ("--ca-file", ca.display().to_string()),
        // No DNAT is pinned here; its doors would need bpffs.
        ("--dnat-listen", String::new()),
        ("--http-listen", String::new()),
    ] {
        tunnel_args.push(flag.into());
        tunnel_args.push(value.into());
    }
    let tunnel = NetdProcess::spawn(&node.ns, Path::new(NETD_CLOUD), tunnel_args, &tunnel_log).unwrap();
    wait_for("the tunnel server's lease list", &|| tunnel.log(), || tunnel.log().contains("leased nodes routable"));
    // Its replica announcement, a Lease in kube-system written with its
    // Role's verbs (a refusal would also show in the log below).
    let replica_leases = || {
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases?labelSelector=netd.io%2Ftunnel-replica%3Dtrue"
        );
        kube.api_ok("GET", &path, None)["items"].as_array().cloned().unwrap_or_default()
    };
    wait_for("the tunnel server's replica Lease", &|| tunnel.log(), || replica_leases().len() == 1);
    let lease = &replica_leases()[0];
    let announced = lease["metadata"]["annotations"]["netd.io/tunnel-replica"].as_str().unwrap();
    let announced: Value = serde_json::from_str(announced).unwrap();
    assert_eq!(announced["address"], format!("{}:10265", node.public_ip()), "{lease}");
    assert_eq!(lease["spec"]["holderIdentity"], announced["id"], "{lease}");
    let text = tunnel.log();
    assert!(text.contains("tunnel server: 1 leased nodes routable"), "{text}");
    assert!(!text.contains("forbidden") && !text.contains("HTTP 403") && !text.contains("retrying"), "{text}");
    drop(tunnel);
    drop(netd);
    // netd cleanup of the node namespace is the namespace's removal.
    drop(kube);
    drop(kube_cluster);
}
