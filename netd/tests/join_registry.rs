//! `netd-join` through the registries without an API server (embedded,
//! etcd): tokens the registry holds (`netd registry token`), the node's key
//! and certificate signing request signed by `netd-cloud certs node --csr`, and a
//! netd started in a fresh namespace-node from the `config.json` join wrote,
//! each node-spec field's effect checked on the node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{self, Cluster, EtcdServer, NetdProcess};

const NETD: &str = env!("CARGO_BIN_EXE_netd");
const NETD_CLOUD: &str = env!("CARGO_BIN_EXE_netd-cloud");
const NETD_JOIN: &str = env!("CARGO_BIN_EXE_netd-join");

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(program: &str, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .env_remove("NETD_REGISTRY")
        .env_remove("NETD_JOIN_TOKEN")
        .env_remove("NETD_CONFIG_DIR")
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn netd(args: &[&str]) -> Run {
    run(NETD, args)
}

fn join(registry: &str, token: &str, dir: &Path, spec: &str, extra: &[&str]) -> Run {
    let mut args =
        vec!["--registry", registry, "--token", token, "--config-dir", dir.to_str().unwrap(), "--node-spec", spec];
    args.extend_from_slice(extra);
    run(NETD_JOIN, &args)
}

fn create_token(registry: &str, ttl: &str) -> String {
    let made = netd(&["registry", "token", "create", "--registry", registry, "--ttl", ttl, "--description", "test"]);
    assert!(made.ok, "{}", made.stderr);
    let token = made.stdout.trim().to_string();
    assert_eq!(token.len(), 23, "{token}");
    token
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            found.push(entry.file_name().to_string_lossy().into_owned());
            found.extend(files_in(&entry.path()));
        }
    }
    found
}

fn embedded_registry(dir: &Path) -> String {
    let db = dir.join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&db, &config).unwrap();
    format!("embedded:{}", db.display())
}

#[test]
fn tokens_the_embedded_registry_holds_gate_the_join_and_the_csr_is_signed_by_the_tunnel_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = embedded_registry(tmp.path());
    let token = create_token(&registry, "1h");
    let (id, secret) = token.split_once('.').unwrap();

    // The registry keeps the hash, never the secret; list shows id and time left.
    let db = std::fs::read(tmp.path().join("registry.db")).unwrap();
    assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is stored in the clear");
    let listed = netd(&["registry", "token", "list", "--registry", &registry]);
    assert!(listed.ok && listed.stdout.contains(id) && listed.stdout.contains("test"), "{}", listed.stdout);
    assert!(!listed.stdout.contains(secret));
    assert!(listed.stdout.contains("59m") || listed.stdout.contains("1h0m0s"), "{}", listed.stdout);

    let spec = r#"{"quiet":true,"nodeNameOverride":"edge-reg-1","flannelface":"lo","enableIptables":true}"#;
    let node_dir = tmp.path().join("etc-netd");
    let refused = |token: &str, spec: &str, extra: &[&str], expect: &str| {
        let out = join(&registry, token, &node_dir, spec, extra);
        assert!(!out.ok, "joined with {token:?} {spec}");
        assert!(out.stderr.contains(expect), "{} lacks {expect}", out.stderr);
        assert!(!out.stderr.contains(secret), "the secret leaked: {}", out.stderr);
        assert!(files_in(&node_dir).is_empty(), "a refused join wrote {:?}", files_in(&node_dir));
    };
    refused(&format!("{id}.0000000000000000"), spec, &[], "the secret does not match");
    refused("zzzzzz.0000000000000000", spec, &[], "holds no bootstrap token zzzzzz");
    let labelled =
        r#"{"quiet":true,"nodeNameOverride":"edge-reg-1","labels":{"a":"b"},"gpuVersion":"Nvidia_Tesla_T4"}"#;
    refused(&token, labelled, &[], "node-spec: labels, gpuVersion: the embedded:");
    let pin = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    refused(&token, spec, &["--discovery-token-ca-cert-hash", pin], "pins a Kubernetes API server's CA");
    let expiring = create_token(&registry, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    refused(&expiring, spec, &[], "expired");
    // A registry that is not there is not created by a join.
    let missing = tmp.path().join("missing.db");
    let out = join(&format!("embedded:{}", missing.display()), &token, &node_dir, spec, &[]);
    assert!(!out.ok && out.stderr.contains("is not there"), "{}", out.stderr);
    assert!(!missing.exists() && files_in(&node_dir).is_empty());

    // A good token joins; a re-run changes nothing.
    let out = join(&registry, &token, &node_dir, spec, &[]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("next: sign the node's tunnel certificate: netd-cloud certs node"), "{}", out.stdout);
    let mut written = files_in(&node_dir);
    written.sort();
    assert_eq!(written, ["config.json", "join.json", "node.csr", "node.key", "tunnel"], "{written:?}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"nodeName":"edge-reg-1","registry":registry,"iface":"lo","masquerade":true}),
        "{config}"
    );
    let key_mode = std::fs::metadata(node_dir.join("tunnel/node.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let again = join(&registry, &token, &node_dir, spec, &[]);
    assert!(again.ok && again.stdout.contains("already joined as node edge-reg-1"), "{}", again.stdout);

    // The cloud side signs the request; the key never left the node.
    let ca = tmp.path().join("tunnel-ca");
    assert!(run(NETD_CLOUD, &["certs", "ca", "--out", ca.to_str().unwrap()]).ok);
    let csr = node_dir.join("tunnel/node.csr");
    let out_dir = tmp.path().join("signed");
    let (ca_arg, csr_arg, out_arg) = (ca.to_str().unwrap(), csr.to_str().unwrap(), out_dir.to_str().unwrap());
    let wrong = run(
        NETD_CLOUD,
        &["certs", "node", "--ca-dir", ca_arg, "--csr", csr_arg, "--name", "edge-other", "--out", out_arg],
    );
    assert!(!wrong.ok && wrong.stderr.contains("asks for node \"edge-reg-1\", not \"edge-other\""), "{}", wrong.stderr);
    assert!(!out_dir.join("node.crt").exists());
    let signed = run(NETD_CLOUD, &["certs", "node", "--ca-dir", ca_arg, "--csr", csr_arg, "--out", out_arg]);
    assert!(signed.ok, "{}", signed.stderr);
    assert!(!out_dir.join("node.key").exists(), "no key is made when signing a request");
    for file in ["node.crt", "ca.crt"] {
        std::fs::copy(out_dir.join(file), node_dir.join("tunnel").join(file)).unwrap();
    }
    // What the tunnel agent loads: the node's own key with the signed certificate.
    let identity = netd::tunnel::certs::CertFiles::in_dir(&node_dir.join("tunnel"), "node").load().unwrap();
    assert_eq!(netd::tunnel::certs::node_name_of(&identity.chain[0]).unwrap(), "edge-reg-1");

    // A deleted token joins nobody.
    assert!(netd(&["registry", "token", "delete", "--registry", &registry, id]).ok);
    let gone = netd(&["registry", "token", "delete", "--registry", &registry, id]);
    assert!(!gone.ok && gone.stderr.contains(&format!("no bootstrap token {id}")), "{}", gone.stderr);
    let other_dir = tmp.path().join("other");
    let out = join(&registry, &token, &other_dir, spec, &[]);
    assert!(!out.ok && out.stderr.contains("holds no bootstrap token"), "{}", out.stderr);
    // Kubernetes keeps its tokens as Secrets: the command says so.
    let kube = netd(&["registry", "token", "list", "--registry", "kubernetes:https://127.0.0.1:1"]);
    assert!(!kube.ok && kube.stderr.contains("kubeadm token create"), "{}", kube.stderr);
}

/// Issue 23: the old writer reused a leftover `tunnel/node.tmp-netd-join`
/// (`create(true)` keeps an existing file's mode), so a 0644 leftover gave
/// a 0644 `node.key`. Now the leftover is never opened: the key is 0600.
#[test]
fn a_world_readable_leftover_temporary_file_never_yields_a_wider_node_key() {
    use std::os::unix::fs::MetadataExt as _;

    let tmp = tempfile::tempdir().unwrap();
    let registry = embedded_registry(tmp.path());
    let token = create_token(&registry, "1h");
    let node_dir = tmp.path().join("etc-netd");
    let tunnel = node_dir.join("tunnel");
    std::fs::create_dir_all(&tunnel).unwrap();
    let leftover = tunnel.join("node.tmp-netd-join");
    std::fs::write(&leftover, "stale").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
    let leftover_inode = std::fs::metadata(&leftover).unwrap().ino();

    let out = join(&registry, &token, &node_dir, r#"{"quiet":true,"nodeNameOverride":"edge-leftover"}"#, &[]);
    assert!(out.ok, "{}", out.stderr);
    let key = std::fs::metadata(tunnel.join("node.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o7777, 0o600);
    assert_ne!(key.ino(), leftover_inode, "the leftover became the key");
    assert!(std::fs::read_to_string(tunnel.join("node.key")).unwrap().contains("PRIVATE KEY"));
    assert_eq!(std::fs::read_to_string(&leftover).unwrap(), "stale", "the leftover was written to");
    // No file in the directory holds the key with a wider mode, and no
    // temporary file of the join is left.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&tunnel).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
        if std::fs::read_to_string(entry.path()).unwrap().contains("PRIVATE KEY") {
            assert_eq!(mode & 0o077, 0, "{} holds the key with mode {mode:o}", entry.path().display());
        }
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["node.csr", "node.key", "node.tmp-netd-join"]);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn tokens_in_etcd_expire_with_an_etcd_lease_and_gate_the_join() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let etcd = EtcdServer::new().unwrap();
    etcd.etcdctl(&[
        "put",
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#,
    ])
    .unwrap();
    let registry = format!("etcd:{}", etcd.endpoint());
    let token = create_token(&registry, "1h");
    let (id, secret) = token.split_once('.').unwrap();
    let stored =
        etcd.etcdctl(&["get", &format!("/coreos.com/network/bootstrap-tokens/{id}"), "--print-value-only"]).unwrap();
    assert!(stored.contains("\"secretSha256\"") && !stored.contains(secret), "{stored}");
    let lease = etcd.etcdctl(&["get", &format!("/coreos.com/network/bootstrap-tokens/{id}"), "-w", "json"]).unwrap();
    assert!(lease.contains("\"lease\":"), "the token key carries an etcd lease: {lease}");

    let tmp = tempfile::tempdir().unwrap();
    let node_dir = tmp.path().join("etc-netd");
    let spec = r#"{"quiet":true,"nodeNameOverride":"edge-etcd-1"}"#;
    let wrong = join(&registry, &format!("{id}.aaaaaaaaaaaaaaaa"), &node_dir, spec, &[]);
    assert!(!wrong.ok && wrong.stderr.contains("the secret does not match"), "{}", wrong.stderr);
    assert!(files_in(&node_dir).is_empty());
    let out = join(&registry, &token, &node_dir, spec, &[]);
    assert!(out.ok, "{}", out.stderr);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["registry"], registry.as_str());
    assert_eq!(config["iface"], serde_json::Value::Null, "no flannelface: the default-route interface");
}

/// `netd-join` run inside `node`'s network namespace (`ip netns exec`
/// mounts its /sys, so flannelface is checked against the node's links).
fn join_inside(node: &netd::testing::Node, registry: &str, token: &str, dir: &Path, spec: &str) -> Run {
    let dir = dir.to_str().unwrap();
    let args = ["netns", "exec", node.ns.name(), NETD_JOIN, "--registry", registry, "--token", token];
    run("ip", &[&args[..], &["--config-dir", dir, "--node-spec", spec]].concat())
}

/// `ip -d link show flannel.1` in `ns`.
fn vxlan_details(cluster: &Cluster) -> String {
    cluster.nodes[0].ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap_or_default()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn netd_runs_from_the_config_join_wrote_with_each_field_in_effect() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let registry = embedded_registry(tmp.path());
    let token = create_token(&registry, "1h");
    let cluster = Cluster::bare(1).unwrap();
    let node = &cluster.nodes[0];
    // A second uplink: flannelface picks it over the default-route eth0.
    // (A veth pair inside the node: this kernel has no dummy links.)
    node.ns.ip(&["link", "add", "wan1", "type", "veth", "peer", "name", "wan1-peer"]).unwrap();
    node.ns.ip(&["addr", "add", "192.168.77.2/24", "dev", "wan1"]).unwrap();
    node.ns.ip(&["link", "set", "wan1", "up"]).unwrap();
    node.ns.ip(&["link", "set", "wan1-peer", "up"]).unwrap();

    let node_dir = tmp.path().join("etc-netd");
    let spec = r#"{"quiet":true,"nodeNameOverride":"*.edge","flannelface":"wan1","enableIptables":true,"manageRuntime":false}"#;
    // Joined from inside the node: flannelface is checked against the node's interfaces.
    let out = join_inside(node, &registry, &token, &node_dir, spec);
    assert!(out.ok, "{}", out.stderr);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node_dir.join("join.json")).unwrap()).unwrap();
    let name = record["nodeName"].as_str().unwrap().to_string();
    assert!(name.len() == 11 && name.ends_with(".edge"), "nodeNameOverride \"*.edge\" drew {name}");
    let absent = join_inside(node, &registry, &token, &tmp.path().join("x"), r#"{"quiet":true,"flannelface":"wan9"}"#);
    assert!(!absent.ok && absent.stderr.contains("flannelface: no interface \"wan9\""), "{}", absent.stderr);

    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = node_dir.join("config.json");
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--config".into(),
        config.into(),
        "--state-dir".into(),
        state.clone().into(),
        "--subnet-env".into(),
        state.join("subnet.env").into(),
    ];
    let daemon = NetdProcess::spawn(&node.ns, Path::new(NETD), args, &state.join("netd.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(45);
    while !testing::http_get(&node.ns, testing::HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "netd never got ready:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // flannelface: the VXLAN device rides wan1 with wan1's address as local.
    let vxlan = vxlan_details(&cluster);
    assert!(vxlan.contains("local 192.168.77.2") && vxlan.contains("dev wan1"), "{vxlan}");
    // enableIptables: flannel's masquerade rules, in netd's table.
    let masq = node.ns.exec("nft", &["list", "table", "ip", "netd-masq"]).unwrap();
    assert!(String::from_utf8_lossy(&masq.stdout).contains("masquerade"));
    // nodeNameOverride: the lease is the drawn name's, with wan1's address.
    let conn = rusqlite::Connection::open(tmp.path().join("registry.db")).unwrap();
    let (node_name, attrs): (String, String) =
        conn.query_row("SELECT node, attrs FROM lease", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!(node_name, name);
    assert!(attrs.contains("\"PublicIP\":\"192.168.77.2\""), "{attrs}");
    drop(daemon);
}
