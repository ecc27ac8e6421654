//! How the store reaches the disk: one write-ahead log fsync per commit, a
//! log that outlives the short-lived CNI processes, older PERSIST-mode files
//! converted on open, and no acknowledged allocation lost to a SIGKILL.
//!
//! Some tests run this test binary again as a child process (the
//! `child_process` test, which does nothing unless `NETD_IPAM_TEST_CHILD`
//! names a role), because fsyncs and SIGKILLs are properties of processes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use netd_ipam::cni::{ipam_plugin, Invocation};
use netd_ipam::{State, Store};

mod common;

use common::{pod, pool};

const CHILD_ENV: &str = "NETD_IPAM_TEST_CHILD";

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// The journal mode recorded in the file, read without writing anything.
fn journal_mode(path: &Path) -> String {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap()
}

/// The CNI configuration of a `netd-ipam` network storing under `data`.
fn cni_config(data: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"durability","type":"bridge","ipam":{{"type":"netd-ipam","dataDir":"{}","subnet":"10.77.0.0/16"}}}}"#,
        data.display()
    )
}

/// The store file the configuration above names.
fn cni_store(data: &Path) -> PathBuf {
    data.join("durability").join("netd-ipam.db")
}

/// One CNI call through the plugin's own entry point, as `netd-ipam` makes it.
fn cni(data: &Path, command: &str, n: usize) -> Result<String, String> {
    let invocation = Invocation {
        command: Some(command.into()),
        container_id: Some(format!("c{n}")),
        ifname: Some("eth0".into()),
        args: Some(format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=p{n}")),
    };
    ipam_plugin::run(&invocation, cni_config(data).as_bytes()).map_err(|e| e.to_json())
}

/// The address an ADD result hands out.
fn added_ip(result: &str) -> IpAddr {
    let value: serde_json::Value = serde_json::from_str(result).unwrap();
    let cidr = value["ips"][0]["address"].as_str().unwrap();
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// Runs this test binary's `child_process` test with `role`.
fn child(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_process", "--nocapture", "--test-threads=1"]).env(CHILD_ENV, role);
    cmd
}

/// The child side: `add:<data dir>:<n>`, `del:<data dir>:<n>` make one CNI
/// call; `writer:<data dir>` adds pods 0, 1, 2, … and prints `ack <n> <ip>`
/// once each ADD has returned, until it is killed.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    let mut parts = role.splitn(3, ':');
    let (what, data) = (parts.next().unwrap(), PathBuf::from(parts.next().unwrap()));
    let n: usize = parts.next().map(|n| n.parse().unwrap()).unwrap_or(0);
    match what {
        "add" => drop(cni(&data, "ADD", n).unwrap()),
        "del" => drop(cni(&data, "DEL", n).unwrap()),
        "writer" => {
            for n in 0.. {
                let ip = added_ip(&cni(&data, "ADD", n).unwrap());
                println!("ack {n} {ip}");
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn a_store_commits_through_a_write_ahead_log_that_outlives_its_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    let sets = pool("10.244.1.0/24");
    let mut store = Store::open(&path).unwrap();
    let ip = store.allocate(&sets, &pod("default/a"), "c1", "eth0").unwrap()[0].ip;
    drop(store);
    // The log is kept for the next process (not checkpointed and deleted
    // on close), and there is no rollback journal.
    assert!(std::fs::metadata(with_suffix(&path, "-wal")).unwrap().len() > 0);
    assert!(!with_suffix(&path, "-journal").exists());
    assert_eq!(journal_mode(&path), "wal");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.pins_of(&pod("default/a")).unwrap()[0].ip, ip);
}

#[test]
fn a_large_log_is_checkpointed_by_the_writer_that_drops_it_and_never_by_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    let wal = with_suffix(&path, "-wal");
    let sets = pool("10.244.0.0/16");
    let mut store = Store::open(&path).unwrap();
    let mut n = 0;
    // Well past the 256 KiB threshold, all from one handle.
    while std::fs::metadata(&wal).unwrap().len() < 400 << 10 {
        store.allocate(&sets, &pod(&format!("default/p{n}")), &format!("c{n}"), "eth0").unwrap();
        n += 1;
    }
    let db_len = std::fs::metadata(&path).unwrap().len();

    // A handle that only reads leaves the large log alone.
    let reader = Store::open(&path).unwrap();
    assert_eq!(reader.allocations().unwrap().len(), n);
    drop(reader);
    assert!(std::fs::metadata(&wal).unwrap().len() >= 400 << 10);

    // The handle that wrote checkpoints it and truncates it when dropped.
    drop(store);
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
    assert!(std::fs::metadata(&path).unwrap().len() > db_len, "the pages moved into the database file");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.allocations().unwrap().len(), n);
    store.integrity_check().unwrap();
}

/// A store as netd wrote it before this build: the same format in
/// `journal_mode=PERSIST`, with the zeroed `-journal` its last commit left.
fn older_store(path: &Path) -> IpAddr {
    let mut store = Store::open(path).unwrap();
    let ip = store.allocate(&pool("10.244.1.0/24"), &pod("default/old"), "c-old", "eth0").unwrap()[0].ip;
    store.release("c-old", "eth0").unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(path).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode = PERSIST", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "persist");
    conn.execute_batch("PRAGMA synchronous = FULL; INSERT INTO meta VALUES ('written-in', 'persist')").unwrap();
    drop(conn);
    assert!(with_suffix(path, "-journal").exists(), "a PERSIST commit leaves its journal");
    assert!(!with_suffix(path, "-wal").exists());
    ip
}

#[test]
fn a_persist_mode_store_of_an_older_netd_is_converted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    let old_ip = older_store(&path);

    let mut store = Store::open(&path).unwrap();
    assert_eq!(journal_mode(&path), "wal");
    assert!(!with_suffix(&path, "-journal").exists(), "SQLite removes the old journal when it leaves PERSIST");
    let pins = store.pins_of(&pod("default/old")).unwrap();
    assert_eq!((pins[0].ip, pins[0].state), (old_ip, State::Released));
    let again = store.allocate(&pool("10.244.1.0/24"), &pod("default/old"), "c-new", "eth0").unwrap();
    assert_eq!(again[0].ip, old_ip, "the pin survived the conversion");
    store.integrity_check().unwrap();
    drop(store);

    // An older build opening it again (a rollback) converts it back to
    // PERSIST, which first checkpoints what only the log holds.
    assert!(std::fs::metadata(with_suffix(&path, "-wal")).unwrap().len() > 0);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode = PERSIST", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "persist");
    drop(conn);
    assert!(!with_suffix(&path, "-wal").exists());
    let store = Store::open(&path).unwrap();
    let pins = store.pins_of(&pod("default/old")).unwrap();
    assert_eq!((pins[0].ip, pins[0].container_id.as_deref()), (old_ip, Some("c-new")));
    assert_eq!(journal_mode(&path), "wal");
}

#[test]
fn concurrent_first_opens_of_an_older_store_convert_it_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    let old_ip = older_store(&path);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let path = path.clone();
            // Each thread has its own connection: SQLite locks them
            // against each other as it locks processes.
            std::thread::spawn(move || {
                let mut store = Store::open(&path).unwrap();
                store
                    .allocate(&pool("10.244.1.0/24"), &pod(&format!("default/t{i}")), &format!("t{i}"), "eth0")
                    .unwrap()[0]
                    .ip
            })
        })
        .collect();
    let ips: HashSet<IpAddr> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(ips.len(), 8, "eight pods, eight addresses");
    assert!(!ips.contains(&old_ip), "the old pin is kept");
    assert_eq!(journal_mode(&path), "wal");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.allocations().unwrap().len(), 9);
    store.integrity_check().unwrap();
}

/// fsync/fdatasync calls of one traced process, by the file they synced.
fn syncs_by_file(trace: &str) -> HashMap<String, usize> {
    let mut fds: HashMap<String, String> = HashMap::new();
    let mut syncs = HashMap::new();
    for line in trace.lines() {
        // `PID  openat(AT_FDCWD, "/path", …) = 5`, `PID  fsync(5) = 0`
        let call = line.split_once(char::is_whitespace).map_or(line, |(_, rest)| rest.trim_start());
        if let Some(rest) = call.strip_prefix("openat(") {
            let (Some(path), Some((_, fd))) = (rest.split('"').nth(1), rest.rsplit_once("= ")) else { continue };
            fds.insert(fd.trim().to_string(), path.to_string());
        } else if let Some(rest) = call.strip_prefix("fsync(").or_else(|| call.strip_prefix("fdatasync(")) {
            let fd = rest.split(')').next().unwrap_or_default();
            *syncs.entry(fds.get(fd).cloned().unwrap_or_else(|| format!("fd {fd}"))).or_insert(0) += 1;
        }
    }
    syncs
}

#[test]
fn one_add_and_one_del_each_fsync_the_log_once() {
    if Command::new("strace").arg("-V").output().map(|o| !o.status.success()).unwrap_or(true) {
        // `cargo xtask test` installs strace and sets this: there a skip is a failure.
        assert!(std::env::var_os("NETD_REQUIRE_PRIVILEGED").is_none(), "strace is not installed (cargo xtask setup)");
        eprintln!("skipped: strace is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The first ADD creates the store (schema, host-local import check):
    // later calls find the file, its log and the index in place.
    cni(&data, "ADD", 0).unwrap();
    cni(&data, "DEL", 0).unwrap();
    let store = cni_store(&data);
    let network_dir = store.parent().unwrap().to_path_buf();
    for command in ["add", "del"] {
        let trace_file = dir.path().join(format!("{command}.trace"));
        let status = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=openat,fsync,fdatasync", "-o"])
            .arg(&trace_file)
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "child_process", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{command}:{}:1", data.display()))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let trace = std::fs::read_to_string(&trace_file).unwrap_or_default();
        if !status.success() && trace.is_empty() {
            assert!(std::env::var_os("NETD_REQUIRE_PRIVILEGED").is_none(), "strace cannot trace here ({status})");
            eprintln!("skipped: strace cannot trace here ({status})");
            return;
        }
        assert!(status.success(), "{command}: {status}\n{trace}");
        let syncs = syncs_by_file(&trace);
        let wal = with_suffix(&store, "-wal").display().to_string();
        let expected = HashMap::from([
            // The commit: the log's new frames, once.
            (wal, 1),
            // SQLite's one-time sync of the directory of a log it opened
            // with O_CREAT, once per process.
            (network_dir.display().to_string(), 1),
        ]);
        assert_eq!(syncs, expected, "{command}: fsyncs by file\n{trace}");
    }
    let store = Store::open(&store).unwrap();
    assert_eq!(store.pins_of(&pod("default/p1")).unwrap()[0].state, State::Released);
}

#[test]
fn sigkilled_writers_lose_no_acknowledged_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut acked: HashMap<usize, IpAddr> = HashMap::new();
    let mut rounds_with_acks = 0;
    for round in 0..6u64 {
        let mut writer = child(&format!("writer:{}", data.display())).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = writer.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| {
                    let mut words = line.strip_prefix("ack ")?.split(' ');
                    Some((words.next()?.parse::<usize>().ok()?, words.next()?.parse::<IpAddr>().ok()?))
                })
                .collect::<Vec<_>>()
        });
        // Different moments: mid-commit, mid-checkpoint, between calls.
        std::thread::sleep(Duration::from_millis(60 + round * 37));
        writer.kill().unwrap();
        writer.wait().unwrap();
        let lines = reader.join().unwrap();
        eprintln!("round {round}: {} ADDs acknowledged before the SIGKILL", lines.len());
        if !lines.is_empty() {
            rounds_with_acks += 1;
        }
        for (n, ip) in lines {
            // Each writer starts at pod 0 again: a pod acknowledged before
            // keeps its address (its ADD is a pin hit).
            assert_eq!(*acked.entry(n).or_insert(ip), ip, "pod p{n} changed address");
        }
        let store = Store::open(cni_store(&data)).unwrap();
        store.integrity_check().unwrap();
        let held: HashMap<IpAddr, String> = store
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| (a.ip, a.pod.map(|p| p.to_string()).unwrap_or_default()))
            .collect();
        for (n, ip) in &acked {
            assert_eq!(held.get(ip).map(String::as_str), Some(format!("default/p{n}").as_str()), "round {round}");
        }
    }
    assert!(rounds_with_acks >= 3, "the writers got too little done to test anything ({rounds_with_acks} rounds)");
}
