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
        (
            conf(d, r#","subnetFile":"/nonexistent/subnet.env","subnetFileWait":0"#),
            pod,
            7,
            "flannel subnet file cannot be used",
        ),
        (conf(d, r#","subnetFileWait":-1"#), pod, 7, "ipam.subnetFileWait: -1 is out of range"),
        (conf(d, r#","subnetFileWait":91"#), pod, 7, "ipam.subnetFileWait: 91 is out of range"),
        (conf(d, r#","subnetFileWait":"5s""#), pod, 7, "ipam.subnetFileWait: invalid type: string"),
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

/// After a boot the kubelet starts pods before netd has written subnet.env:
/// ADD waits for the file (and takes the address as soon as it is there)
/// instead of failing into the kubelet's back-off; DEL never waits; a file
/// that stays away fails once the wait is over, saying so; a file that is
/// there but wrong fails at once.
#[test]
fn add_waits_for_a_subnet_file_netd_has_not_written_yet() {
    let dir = tempfile::tempdir().unwrap();
    // As after a reboot: not even /run/flannel exists yet.
    let env = dir.path().join("run/flannel/subnet.env");
    let config = conf(dir.path(), &format!(r#","subnetFile":"{}","subnetFileWait":30"#, env.display()));
    let started = std::time::Instant::now();
    let add = spawn("ADD", "c1", Some("default/p"), &config);
    std::thread::sleep(Duration::from_millis(600));
    let del = run("DEL", "c0", Some("default/o"), &config);
    assert!(del.status.success(), "DEL does not wait: {}", String::from_utf8_lossy(&del.stdout));
    assert!(started.elapsed() < Duration::from_secs(5), "DEL waited");
    std::fs::create_dir_all(env.parent().unwrap()).unwrap();
    let written = std::time::Instant::now();
    netd_model::subnet_env::SubnetEnv::parse(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        &env,
    )
    .unwrap()
    .write(&env)
    .unwrap();
    let out = add.wait_with_output().unwrap();
    let r = json(&out);
    assert_eq!(r["ips"][0]["address"], "10.244.7.2/24", "the address from the file written during the wait");
    assert!(written.elapsed() < Duration::from_secs(5), "ADD returned {:?} after the file came", written.elapsed());

    let missing = conf(
        dir.path(),
        &format!(r#","subnetFile":"{}","subnetFileWait":0.3"#, dir.path().join("never/subnet.env").display()),
    );
    let started = std::time::Instant::now();
    let out = run("ADD", "c2", Some("default/q"), &missing);
    assert!(started.elapsed() >= Duration::from_millis(300), "gave up before its wait: {:?}", started.elapsed());
    assert_error(&out, 7, "after waiting for netd to write it");

    let wrong = dir.path().join("wrong.env");
    std::fs::write(&wrong, "FLANNEL_SUBNET=banana\n").unwrap();
    let started = std::time::Instant::now();
    let out =
        run("ADD", "c3", Some("default/r"), &conf(dir.path(), &format!(r#","subnetFile":"{}""#, wrong.display())));
    assert_error(&out, 7, "flannel subnet file cannot be used");
    assert!(started.elapsed() < Duration::from_secs(5), "a wrong file is not waited for");
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

#[test]
fn empty_or_relative_data_dir_is_refused_and_nothing_lands_in_the_working_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let with_data_dir = |value: &str| {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"testnet","type":"bridge","ipam":{{"type":"netd-ipam","dataDir":"{value}","subnet":"10.64.0.0/24"}}}}"#
        )
    };
    let run_in = |command: &str, stdin: &str| {
        let mut child = Command::new(PLUGIN)
            .env_clear()
            .current_dir(cwd.path())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c1")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    for command in ["ADD", "DEL", "CHECK", "STATUS"] {
        assert_error(&run_in(command, &with_data_dir("")), 7, "ipam.dataDir: \"\" is empty");
        assert_error(&run_in(command, &with_data_dir("   ")), 7, "ipam.dataDir: \"   \" is empty");
        for relative in ["networks", "./networks", "var/lib/cni/networks", "../networks"] {
            assert_error(
                &run_in(command, &with_data_dir(relative)),
                7,
                &format!("ipam.dataDir: \"{relative}\" is a relative path; it must be absolute"),
            );
        }
    }
    let out = run_in("ADD", &with_data_dir(""));
    let err = json(&out);
    assert!(err["details"].as_str().unwrap().contains("omit ipam.dataDir"), "{err}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ipam.dataDir"), "the reason is logged too");
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "something was written to the working directory");
    // An absolute dataDir still works from any working directory.
    let data = tempfile::tempdir().unwrap();
    let out = run_in("ADD", &with_data_dir(&data.path().display().to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(data.path().join("testnet/netd-ipam.db").exists());
}

/// Store stats of the test network.
fn stats(data_dir: &Path) -> netd_ipam::PinStats {
    let store = netd_ipam::Store::open(data_dir.join("testnet/netd-ipam.db")).unwrap();
    store.integrity_check().unwrap();
    store.stats().unwrap()
}

/// The issue's churn: Deployments and Jobs create a new pod name every run.
/// 1 000 distinct pods on a /24 (253 addresses), at most 10 attached at a
/// time, each ADD then DEL through the real plugin, 10 processes at a time.
/// Without pressure reclaim the 254th ADD fails; with it none does, every
/// reclaim is logged naming the pod that lost its pin, and counted.
#[test]
fn churn_of_a_thousand_pod_names_on_a_slash_24_never_fails_an_add() {
    let dir = tempfile::tempdir().unwrap();
    let subnet = "10.65.0.0/24";
    let config = subnet_conf(dir.path(), subnet);
    let mut released: HashSet<String> = HashSet::new();
    let mut reclaim_lines = 0;
    for batch in 0..100 {
        let pods: Vec<String> = (0..10).map(|i| format!("default/churn-{}", batch * 10 + i)).collect();
        let adds: Vec<Child> =
            pods.iter().map(|pod| spawn("ADD", &pod.replace('/', "-"), Some(pod), &config)).collect();
        let mut ips = HashSet::new();
        for (pod, child) in pods.iter().zip(adds) {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "ADD of {pod} failed: {}", String::from_utf8_lossy(&out.stdout));
            ips.insert(json(&out)["ips"][0]["address"].as_str().unwrap().to_string());
            let stderr = String::from_utf8_lossy(&out.stderr);
            for line in stderr.lines().filter(|l| l.contains("reclaimed")) {
                reclaim_lines += 1;
                // `... reclaimed 10.65.0.7 from pod default/churn-3 (eth0), released 1s ago, ...`
                let lost = line.split("from pod ").nth(1).unwrap().split(' ').next().unwrap();
                assert!(released.contains(lost), "reclaimed from {lost}, which is not released: {line}");
                assert!(line.contains(&format!("for new pod {pod}")), "{line}");
                assert!(line.contains("is full"), "{line}");
                released.remove(lost);
            }
        }
        assert_eq!(ips.len(), 10, "two attached pods share an address: {ips:?}");
        // Every attached pod holds its address in the store.
        let rows = store_rows(dir.path());
        let attached = rows.iter().filter(|a| a.state == netd_ipam::State::Attached).count();
        assert_eq!(attached, 10);
        let dels: Vec<Child> = pods.iter().map(|pod| spawn("DEL", &pod.replace('/', "-"), None, &config)).collect();
        for child in dels {
            assert!(child.wait_with_output().unwrap().status.success());
        }
        released.extend(pods);
    }
    let stats = stats(dir.path());
    // The first 253 pods fill the pool; each of the 747 after it reclaims one pin.
    assert_eq!(stats.freed.pressure, 747);
    assert_eq!(reclaim_lines, 747);
    assert_eq!((stats.attached, stats.released), (0, 253));
}

/// Concurrent ADD and DEL plugin processes on a full pool, half of them
/// SIGKILLed at random moments. 16 resident pods stay attached throughout
/// (their ADD is retried now and then, as kubelet does); churn pods come and
/// go, every new one reclaiming a released pin. After every round: the store
/// passes SQLite's integrity check, no address or pin is held twice, every
/// resident still has its address, and every acknowledged ADD still holds its.
#[test]
fn attached_pods_keep_their_addresses_under_concurrency_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let subnet = "10.66.0.0/27"; // .2-.30: 29 addresses
    let config = subnet_conf(dir.path(), subnet);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let residents: Vec<(String, String)> = (0..16)
        .map(|i| {
            let pod = format!("default/resident-{i}");
            let ip = add_ok(dir.path(), subnet, &format!("resident-{i}"), &pod);
            (pod, ip)
        })
        .collect();
    // Fill the rest of the pool with released pins.
    for i in 0..13 {
        add_ok(dir.path(), subnet, &format!("old-{i}"), &format!("default/old-{i}"));
        assert!(run("DEL", &format!("old-{i}"), None, &config).status.success());
    }
    assert_eq!(store_rows(dir.path()).len(), 29, "the pool is full of pins");

    // Churn pods of the previous round: (pod, container, acknowledged address).
    let mut previous: Vec<(String, String, Option<String>)> = Vec::new();
    let (mut acknowledged, mut killed_adds, mut killed_total) = (0u64, 0u64, 0u64);
    for round in 0..12 {
        // At most 16 residents + 6 previous (being deleted) + 6 new attached: the pool of 29 suffices.
        enum Kind {
            NewPod(String, String),
            Retry(usize),
            Del(String),
        }
        let mut children: Vec<(Kind, Child)> = Vec::new();
        for (_, container, _) in &previous {
            children.push((Kind::Del(container.clone()), spawn("DEL", container, None, &config)));
        }
        for i in 0..6 {
            let pod = format!("default/churn-{round}-{i}");
            let container = format!("churn-{round}-{i}");
            children
                .push((Kind::NewPod(pod.clone(), container.clone()), spawn("ADD", &container, Some(&pod), &config)));
        }
        for _ in 0..2 {
            let r = (next() % residents.len() as u64) as usize;
            let child = spawn("ADD", &format!("resident-{r}"), Some(&residents[r].0), &config);
            children.push((Kind::Retry(r), child));
        }
        let mut current = Vec::new();
        let mut redo_dels = Vec::new();
        for (kind, mut child) in children {
            let killed = next() % 2 == 0;
            if killed {
                // Within 1.5 ms: a faster machine finishes an ADD in a few ms, and
                // a kill after it proves nothing (up to 5 ms left only 5 of ~48 mid-run).
                std::thread::sleep(Duration::from_micros(next() % 1500));
                let _ = child.kill();
            }
            let out = child.wait_with_output().unwrap();
            // Killed before it finished: no exit code.
            let finished = out.status.code().is_some();
            killed_total += u64::from(!finished);
            if finished {
                assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stdout));
            }
            match kind {
                Kind::NewPod(pod, container) => {
                    let ip = finished.then(|| json(&out)["ips"][0]["address"].as_str().unwrap().to_string());
                    acknowledged += u64::from(ip.is_some());
                    killed_adds += u64::from(ip.is_none());
                    // Deleted next round either way, as kubelet would clean up a failed sandbox.
                    current.push((pod, container, ip));
                }
                Kind::Retry(r) => {
                    if finished {
                        assert_eq!(json(&out)["ips"][0]["address"], residents[r].1.as_str(), "retried ADD moved");
                    }
                }
                Kind::Del(container) => {
                    if !finished {
                        redo_dels.push(container);
                    }
                }
            }
        }
        for container in redo_dels {
            assert!(run("DEL", &container, None, &config).status.success());
        }
        // The invariants, after every round.
        let store = netd_ipam::Store::open(dir.path().join("testnet/netd-ipam.db")).unwrap();
        store.integrity_check().unwrap();
        let rows = store.allocations().unwrap();
        let ips: HashSet<_> = rows.iter().map(|a| a.ip).collect();
        assert_eq!(ips.len(), rows.len(), "round {round}: an address is held twice");
        let pods: HashSet<_> = rows.iter().map(|a| a.pod.clone()).collect();
        assert_eq!(pods.len(), rows.len(), "round {round}: a pod holds two addresses");
        let holds = |pod: &str, ip: &str| {
            rows.iter().any(|a| {
                a.pod.as_ref().map(ToString::to_string).as_deref() == Some(pod)
                    && a.state == netd_ipam::State::Attached
                    && format!("{}/27", a.ip) == ip
            })
        };
        for (pod, ip) in &residents {
            assert!(holds(pod, ip), "round {round}: resident {pod} lost {ip}: {rows:?}");
        }
        for (pod, _, ip) in &current {
            if let Some(ip) = ip {
                assert!(holds(pod, ip), "round {round}: {pod} lost its acknowledged {ip}");
            }
        }
        previous = current;
    }
    assert!(acknowledged >= 20, "too few ADDs completed to prove anything: {acknowledged}");
    assert!(killed_total >= 10, "too few processes killed mid-run to prove anything: {killed_total}");
    // The pool stays full of pins, so every new pod's committed ADD reclaimed exactly one;
    // a killed ADD may or may not have committed.
    let pressure = stats(dir.path()).freed.pressure;
    eprintln!(
        "{acknowledged} new-pod ADDs acknowledged, {killed_adds} killed; {killed_total} processes killed in all; \
         {pressure} pins reclaimed"
    );
    assert!(
        (acknowledged..=acknowledged + killed_adds).contains(&pressure),
        "{pressure} reclaims for {acknowledged} ADDs"
    );
}
