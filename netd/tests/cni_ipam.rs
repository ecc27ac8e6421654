//! The `netd-ipam` binary as runtimes run it: one process per command,
//! config on stdin, CNI_* in the environment.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const PLUGIN: &str = env!("CARGO_BIN_EXE_netd-ipam");

fn conf(data_dir: &Path, ipam_extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"testnet","type":"bridge","ipam":{{"type":"netd-ipam","dataDir":"{}"{ipam_extra}}}}}"#,
        data_dir.display()
    )
}

fn subnet_conf(data_dir: &Path, subnet: &str) -> String {
    conf(data_dir, &format!(r#","subnet":"{subnet}""#))
}

fn spawn(command: &str, container: &str, pod: Option<&str>, stdin: &str) -> Child {
    let mut cmd = Command::new(PLUGIN);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/unused")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(pod) = pod {
        let (ns, name) = pod.split_once('/').unwrap();
        cmd.env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"));
    }
    let mut child = cmd.spawn().unwrap();
    // A plugin killed early may close stdin first: ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child
}

fn run(command: &str, container: &str, pod: Option<&str>, stdin: &str) -> Output {
    spawn(command, container, pod, stdin).wait_with_output().unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", String::from_utf8_lossy(&out.stdout)))
}

fn add_ok(data_dir: &Path, subnet: &str, container: &str, pod: &str) -> String {
    let out = run("ADD", container, Some(pod), &subnet_conf(data_dir, subnet));
    assert!(out.status.success(), "ADD failed: {}", String::from_utf8_lossy(&out.stdout));
    json(&out)["ips"][0]["address"].as_str().unwrap().to_string()
}

/// Asserts a CNI error with `code` whose message contains `needle`.
fn assert_error(out: &Output, code: u64, needle: &str) {
    assert!(!out.status.success(), "expected failure, got {}", String::from_utf8_lossy(&out.stdout));
    let err = json(out);
    assert_eq!(err["code"], code, "{err}");
    let text = format!("{} {}", err["msg"].as_str().unwrap_or_default(), err["details"].as_str().unwrap_or_default());
    assert!(text.contains(needle), "{needle:?} not in {text}");
}

fn store_rows(data_dir: &Path) -> Vec<netd_ipam::Allocation> {
    netd_ipam::Store::open(data_dir.join("testnet/netd-ipam.db")).unwrap().allocations().unwrap()
}

#[test]
fn same_pod_same_ip_other_pod_other_ip_forget_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let a = add_ok(dir.path(), "10.50.0.0/24", "sandbox1", "default/web-0");
    assert!(run("DEL", "sandbox1", None, &subnet_conf(dir.path(), "10.50.0.0/24")).status.success());
    // Sandbox re-created with a new ID: same address.
    assert_eq!(add_ok(dir.path(), "10.50.0.0/24", "sandbox2", "default/web-0"), a);
    let b = add_ok(dir.path(), "10.50.0.0/24", "sandbox3", "default/web-1");
    assert_ne!(a, b);
    // Forget (the control plane deleted the pod): the address is reusable.
    let mut store = netd_ipam::Store::open(dir.path().join("testnet/netd-ipam.db")).unwrap();
    store.forget(&"default/web-0".parse().unwrap()).unwrap();
    drop(store);
    let tiny = tempfile::tempdir().unwrap();
    let only = add_ok(tiny.path(), "10.51.0.0/30", "s1", "default/a");
    let mut store = netd_ipam::Store::open(tiny.path().join("testnet/netd-ipam.db")).unwrap();
    store.forget(&"default/a".parse().unwrap()).unwrap();
    drop(store);
    assert_eq!(add_ok(tiny.path(), "10.51.0.0/30", "s2", "default/b"), only);
}

#[test]
fn fifty_concurrent_adds_from_separate_processes_get_distinct_ips() {
    let dir = tempfile::tempdir().unwrap();
    let config = subnet_conf(dir.path(), "10.52.0.0/24");
    let children: Vec<Child> =
        (0..50).map(|i| spawn("ADD", &format!("c{i}"), Some(&format!("default/p{i}")), &config)).collect();
    let mut ips = HashSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        ips.insert(json(&out)["ips"][0]["address"].as_str().unwrap().to_string());
    }
    assert_eq!(ips.len(), 50);
    assert_eq!(store_rows(dir.path()).len(), 50);
}

#[test]
fn pool_exhaustion_is_a_cni_error_and_leaves_the_store_intact() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        add_ok(dir.path(), "10.53.0.0/29", &format!("c{i}"), &format!("default/p{i}"));
    }
    let before = store_rows(dir.path());
    let out = run("ADD", "late", Some("default/late"), &subnet_conf(dir.path(), "10.53.0.0/29"));
    assert_error(&out, 100, "no free address");
    assert_eq!(store_rows(dir.path()), before);
    // STATUS tells the runtime before it tries.
    let out = run("STATUS", "x", None, &subnet_conf(dir.path(), "10.53.0.0/29"));
    assert_error(&out, 50, "no free address");
}

#[test]
fn bad_inputs_each_get_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pod = Some("default/p");
    let good = subnet_conf(d, "10.54.0.0/24");
    let cases: Vec<(String, Option<&str>, u64, &str)> = vec![
        (good[..good.len() - 9].to_string(), pod, 6, "not valid JSON"),
        ("".into(), pod, 6, "not valid JSON"),
        ("\u{0}\u{1}garbage".into(), pod, 6, "not valid JSON"),
        (conf(d, r#","subnet":42"#), pod, 7, "ipam.subnet: invalid type: integer"),
        (conf(d, r#","ranges":{"a":1}"#), pod, 7, "ipam.ranges: invalid type: map"),
        (
            conf(d, r#","ranges":[[{"subnet":"10.0.0/24"}]]"#),
            pod,
            7,
            "ipam.ranges[0][0].subnet: \"10.0.0/24\" is not a CIDR",
        ),
        (conf(d, r#","subnet":"banana"#), pod, 6, "not valid JSON"),
        (conf(d, r#","subnet":"banana""#), pod, 7, "\"banana\" is not a CIDR"),
        (conf(d, r#","subnet":"10.54.0.7/32""#), pod, 7, "too small to allocate from"),
        (conf(d, r#","subnet":"10.54.0.5/24""#), pod, 7, "host bits set"),
        (
            conf(d, r#","subnet":"10.54.0.0/24","rangeStart":"10.54.1.1""#),
            pod,
            7,
            "rangeStart 10.54.1.1 is not a usable address",
        ),
        (conf(d, r#","subnet":"10.54.0.0/24","ranges":[]"#), pod, 7, "both `ranges` and `subnet`"),
        (conf(d, r#","subnet":"10.54.0.0/24","routes":[{"dst":"nowhere"}]"#), pod, 7, "ipam.routes[0].dst"),
        (conf(d, r#","subnetFile":"/nonexistent/subnet.env""#), pod, 7, "flannel subnet file cannot be used"),
        (good.replace("1.0.0", "9.9.9"), pod, 1, "unsupported cniVersion \"9.9.9\""),
        (good.replace(r#""cniVersion":"1.0.0","#, ""), pod, 7, "missing field `cniVersion`"),
        (good.replace("testnet", "../etc"), pod, 7, "cannot name a network directory"),
        (good.clone(), None, 4, "missing pod identity"),
        (good.clone(), Some("default/Bad_Name"), 4, "invalid pod identity"),
    ];
    for (stdin, pod, code, needle) in cases {
        let out = run("ADD", "c1", pod, &stdin);
        assert_error(&out, code, needle);
    }
    let huge = format!("default/{}", "a".repeat(300));
    assert_error(&run("ADD", "c1", Some(&huge), &good), 4, "longer than 253 characters");
    // Bad environment.
    let out = Command::new(PLUGIN).env_clear().stdin(Stdio::null()).output().unwrap();
    assert_error(&out, 4, "CNI_COMMAND is not set");
    let mut child = spawn("ADD", "-bad id", pod, &good);
    child.stdin.take();
    assert_error(&child.wait_with_output().unwrap(), 4, "CNI_CONTAINERID is invalid");
    // Nothing above created an allocation.
    assert!(!d.join("testnet/netd-ipam.db").exists() || store_rows(d).is_empty());
}

#[test]
fn unreadable_store_is_an_io_error_and_is_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("testnet")).unwrap();
    let db = dir.path().join("testnet/netd-ipam.db");
    std::fs::write(&db, vec![0x5au8; 8192]).unwrap();
    let out = run("ADD", "c1", Some("default/p"), &subnet_conf(dir.path(), "10.55.0.0/24"));
    assert_error(&out, 5, "cannot be opened or read");
    assert_eq!(std::fs::read(&db).unwrap(), vec![0x5au8; 8192]);
}

#[test]
fn version_and_older_result_formats() {
    let out = Command::new(PLUGIN).env_clear().env("CNI_COMMAND", "VERSION").output().unwrap();
    let v = json(&out);
    assert_eq!(v["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    let dir = tempfile::tempdir().unwrap();
    let old = subnet_conf(dir.path(), "10.56.0.0/24").replace("1.0.0", "0.3.1");
    let out = run("ADD", "c1", Some("default/p"), &old);
    let r = json(&out);
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["ips"][0]["version"], "4");
    assert_eq!(r["ips"][0]["address"], "10.56.0.2/24");
    assert_error(&run("CHECK", "c1", None, &old), 1, "CHECK is not defined for cniVersion 0.3.1");
}

#[test]
fn subnet_env_fallback_dual_stack_routes_and_dns() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("subnet.env");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "# test\nnameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n",
    )
    .unwrap();
    let config = conf(dir.path(), &format!(r#","subnetFile":"{}","resolvConf":"{}""#, env.display(), resolv.display()));
    let r = json(&run("ADD", "c1", Some("default/p"), &config));
    assert_eq!(r["ips"][0]["address"], "10.244.9.2/24");
    assert_eq!(r["ips"][0]["gateway"], "10.244.9.1");
    assert_eq!(r["routes"], serde_json::json!([{"dst": "10.244.0.0/16"}]));
    assert_eq!(r["dns"]["nameservers"], serde_json::json!(["10.96.0.10"]));
    assert_eq!(r["dns"]["options"], serde_json::json!(["ndots:5"]));

    let dual = conf(
        dir.path(),
        r#","ranges":[[{"subnet":"10.57.0.0/24","rangeStart":"10.57.0.100","rangeEnd":"10.57.0.110"}],[{"subnet":"fd00:57::/64"}]],"routes":[{"dst":"0.0.0.0/0","gw":"10.57.0.1"},{"dst":"::/0"}]"#,
    );
    let r = json(&run("ADD", "c2", Some("default/q"), &dual));
    assert_eq!(r["ips"][0]["address"], "10.57.0.100/24");
    assert_eq!(r["ips"][1]["address"], "fd00:57::2/64");
    assert_eq!(r["routes"][0]["gw"], "10.57.0.1");
}

#[test]
fn check_gc_and_idempotent_del() {
    let dir = tempfile::tempdir().unwrap();
    let base = subnet_conf(dir.path(), "10.58.0.0/24");
    let ip = add_ok(dir.path(), "10.58.0.0/24", "c1", "default/p");
    let with_prev = |addr: &str| {
        base.replacen('{', &format!(r#"{{"prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"{addr}"}}]}},"#), 1)
    };
    assert!(run("CHECK", "c1", None, &with_prev(&ip)).status.success());
    assert_error(&run("CHECK", "c1", None, &with_prev("10.58.0.77/24")), 101, "10.58.0.77 is not allocated");
    assert_error(&run("CHECK", "nobody", None, &with_prev(&ip)), 3, "holds no address");
    // DEL twice, and DEL of an unknown container, succeed.
    for container in ["c1", "c1", "never-added"] {
        assert!(run("DEL", container, None, &base).status.success());
    }
    // DEL on a network that never had an ADD does not create anything.
    let other = tempfile::tempdir().unwrap();
    assert!(run("DEL", "c1", None, &subnet_conf(other.path(), "10.58.0.0/24")).status.success());
    assert!(!other.path().join("testnet").exists());

    add_ok(dir.path(), "10.58.0.0/24", "c2", "default/q");
    add_ok(dir.path(), "10.58.0.0/24", "c3", "default/r");
    let gc = base.replacen('{', r#"{"cni.dev/valid-attachments":[{"containerID":"c2","ifname":"eth0"}],"#, 1);
    assert!(run("GC", "x", None, &gc).status.success());
    let rows = store_rows(dir.path());
    let state =
        |pod: &str| rows.iter().find(|a| a.pod.as_ref().map(|p| p.to_string()).as_deref() == Some(pod)).unwrap().state;
    assert_eq!(state("default/q"), netd_ipam::State::Attached);
    assert_eq!(state("default/r"), netd_ipam::State::Released, "GC releases but keeps the pin");
    assert_eq!(rows.len(), 3);
}

#[test]
fn first_add_migrates_a_host_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("testnet");
    std::fs::create_dir_all(&net).unwrap();
    for (ip, owner) in [("10.59.0.2", "aaa\r\neth0"), ("10.59.0.3", "bbb\r\neth0"), ("10.59.0.4", "ccc\r\neth0")] {
        std::fs::write(net.join(ip), owner).unwrap();
    }
    std::fs::write(net.join("last_reserved_ip.0"), "10.59.0.4").unwrap();
    // The running pods' next ADD (e.g. kubelet's retry) keeps their addresses.
    assert_eq!(add_ok(dir.path(), "10.59.0.0/24", "bbb", "default/b"), "10.59.0.3/24");
    // New pods avoid every imported address.
    assert_eq!(add_ok(dir.path(), "10.59.0.0/24", "new", "default/n"), "10.59.0.5/24");
    let ips: HashSet<String> = store_rows(dir.path()).iter().map(|a| a.ip.to_string()).collect();
    assert_eq!(ips, ["10.59.0.2", "10.59.0.3", "10.59.0.4", "10.59.0.5"].map(String::from).into());
}

/// Many plugin processes allocate while being SIGKILLed at random points;
/// afterwards no address is doubly used, every acknowledged pin survives,
/// and the store opens and passes SQLite's integrity check.
#[test]
fn sigkill_at_random_points_never_breaks_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let config = subnet_conf(dir.path(), "10.60.0.0/22");
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..8 {
        let children: Vec<(String, Child)> = (0..24)
            .map(|i| {
                let pod = format!("default/r{round}-p{i}");
                (pod.clone(), spawn("ADD", &format!("r{round}c{i}"), Some(&pod), &config))
            })
            .collect();
        for (pod, mut child) in children {
            // Kill roughly half of them at a random moment of their run.
            if next() % 2 == 0 {
                std::thread::sleep(Duration::from_micros(next() % 4000));
                let _ = child.kill();
            }
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                let ip = json(&out)["ips"][0]["address"].as_str().unwrap().to_string();
                acknowledged.push((pod, ip));
            }
        }
    }
    assert!(acknowledged.len() > 20, "too few ADDs completed to prove anything: {}", acknowledged.len());
    let store = netd_ipam::Store::open(dir.path().join("testnet/netd-ipam.db")).unwrap();
    store.integrity_check().unwrap();
    let rows = store.allocations().unwrap();
    let unique: HashSet<_> = rows.iter().map(|a| a.ip).collect();
    assert_eq!(unique.len(), rows.len(), "an address is used twice");
    let pods: HashSet<_> = rows.iter().map(|a| a.pod.clone()).collect();
    assert_eq!(pods.len(), rows.len(), "a pod holds two addresses");
    for (pod, ip) in &acknowledged {
        let row = rows.iter().find(|a| a.pod.as_ref().map(ToString::to_string).as_deref() == Some(pod.as_str()));
        let row = row.unwrap_or_else(|| panic!("acknowledged pin of {pod} lost"));
        assert_eq!(format!("{}/22", row.ip), *ip);
    }
    drop(store);
    // Every acknowledged pod gets its address back on a new sandbox.
    for (pod, ip) in acknowledged.iter().take(10) {
        assert_eq!(&add_ok(dir.path(), "10.60.0.0/22", &format!("again-{}", pod.replace('/', "-")), pod), ip);
    }
}
