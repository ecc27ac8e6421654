//! Freeing pins: pressure reclaim, reconcile and `free_released` never touch
//! an attached pin, write nothing when there is nothing to free, lose
//! against a concurrent re-attach, and count what they free by reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use netd_ipam::{Authority, Error, FreeReason, PodRef, RangeSet, State, Store};

mod common;

use common::{ip, pod, pool};

fn db(dir: &Path) -> PathBuf {
    dir.join("ipam.db")
}

/// Allocates `name` (container `c-<name>`) and returns its address.
fn attach(store: &mut Store, sets: &[RangeSet], name: &str) -> IpAddr {
    store.allocate(sets, &pod(&format!("default/{name}")), &format!("c-{name}"), "eth0").unwrap()[0].ip
}

/// Releases `name` and waits past a millisecond so release times differ.
fn release(store: &mut Store, name: &str) {
    store.release(&format!("c-{name}"), "eth0").unwrap();
    std::thread::sleep(Duration::from_millis(3));
}

fn state_of(store: &Store, name: &str) -> Option<(IpAddr, State)> {
    store.pins_of(&pod(&format!("default/{name}"))).unwrap().first().map(|a| (a.ip, a.state))
}

/// What a write would change: the size and mtime of the database file, its
/// write-ahead log (where commits go) and a rollback journal (none expected).
fn file_marks(path: &Path) -> Vec<Option<(u64, SystemTime)>> {
    ["", "-wal", "-journal"]
        .iter()
        .map(|suffix| PathBuf::from(format!("{}{suffix}", path.display())))
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().unwrap())))
        .collect()
}

/// The bytes of the database file and of its write-ahead log.
fn contents(path: &Path) -> [Option<Vec<u8>>; 2] {
    ["", "-wal"].map(|suffix| std::fs::read(format!("{}{suffix}", path.display())).ok())
}

#[test]
fn pressure_reclaims_the_longest_released_pin_and_never_an_attached_one() {
    let dir = tempfile::tempdir().unwrap();
    let sets = pool("10.9.0.0/29"); // .2-.6: five addresses
    let mut store = Store::open(db(dir.path())).unwrap();
    let a1 = attach(&mut store, &sets, "a1");
    let a2 = attach(&mut store, &sets, "a2");
    let r1 = attach(&mut store, &sets, "r1");
    let r2 = attach(&mut store, &sets, "r2");
    let r3 = attach(&mut store, &sets, "r3");
    // Released in the order r2, r3, r1: r2 has been gone longest.
    release(&mut store, "r2");
    release(&mut store, "r3");
    release(&mut store, "r1");

    let started = SystemTime::now();
    let n1 = store.allocate_or_reclaim(&sets, &pod("default/n1"), "c-n1", "eth0").unwrap();
    assert_eq!(n1.allocations[0].ip, r2);
    assert_eq!(n1.reclaimed.len(), 1);
    let lost = &n1.reclaimed[0];
    assert_eq!((lost.pod.clone(), lost.ip, lost.ifname.as_str()), (pod("default/r2"), r2, "eth0"));
    assert!(lost.released_for >= Duration::from_millis(6), "{:?}", lost.released_for);
    assert!(lost.released_for < started.duration_since(lost.released_since).unwrap() + Duration::from_secs(1));
    assert!(lost.range_set.contains("10.9.0.0/29"), "{}", lost.range_set);
    assert_eq!(state_of(&store, "r2"), None, "the reclaimed pod has no pin any more");

    let n2 = store.allocate_or_reclaim(&sets, &pod("default/n2"), "c-n2", "eth0").unwrap();
    assert_eq!((n2.allocations[0].ip, n2.reclaimed[0].pod.clone()), (r3, pod("default/r3")));
    let n3 = store.allocate_or_reclaim(&sets, &pod("default/n3"), "c-n3", "eth0").unwrap();
    assert_eq!((n3.allocations[0].ip, n3.reclaimed[0].pod.clone()), (r1, pod("default/r1")));
    // The attached pods never moved.
    assert_eq!(state_of(&store, "a1"), Some((a1, State::Attached)));
    assert_eq!(state_of(&store, "a2"), Some((a2, State::Attached)));
    assert_eq!(store.stats().unwrap().freed.pressure, 3);

    // Every address attached: the precise exhaustion error, and nothing changes.
    let before = (store.allocations().unwrap(), store.stats().unwrap());
    let err = store.allocate_or_reclaim(&sets, &pod("default/n4"), "c-n4", "eth0").unwrap_err();
    assert!(matches!(err, Error::Exhausted { capacity: 5, attached: 5, released: 0, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no free address in 10.9.0.0/29 (10.9.0.1-10.9.0.6): all 5 are taken (5 attached, 0 held by released \
         pins that only an authoritative reconcile or an explicit forget frees)"
    );
    assert_eq!((store.allocations().unwrap(), store.stats().unwrap()), before);

    // A pod whose pin was reclaimed comes back: it takes the oldest released pin like any new pod.
    release(&mut store, "n1");
    let back = store.allocate_or_reclaim(&sets, &pod("default/r2"), "c-r2-again", "eth0").unwrap();
    assert_eq!((back.allocations[0].ip, back.reclaimed[0].pod.clone()), (r2, pod("default/n1")));
    // A pod with its own released pin gets it back without reclaiming anything.
    release(&mut store, "n2");
    release(&mut store, "a1");
    let own = store.allocate_or_reclaim(&sets, &pod("default/a1"), "c-a1-again", "eth0").unwrap();
    assert_eq!((own.allocations[0].ip, own.reclaimed.len()), (a1, 0));
    assert_eq!(store.stats().unwrap().freed.pressure, 4);
    // The strict `allocate` never reclaims.
    assert!(matches!(
        store.allocate(&sets, &pod("default/strict"), "c-strict", "eth0"),
        Err(Error::Exhausted { released: 1, .. })
    ));
    store.integrity_check().unwrap();
}

#[test]
fn a_failed_dual_stack_allocation_reclaims_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sets = pool("10.9.0.0/30"); // one IPv4 address
    sets.extend(pool("fd00:9::/126")); // ::2 and ::3 (::1 is the gateway; IPv6 has no broadcast)
    let mut store = Store::open(db(dir.path())).unwrap();
    let v4 = pool("10.9.0.0/30");
    let v6 = pool("fd00:9::/126");
    store.allocate(&v4, &pod("default/old"), "c-old", "eth0").unwrap();
    store.release("c-old", "eth0").unwrap();
    store.allocate(&v6, &pod("default/busy"), "c-busy", "eth0").unwrap();
    store.allocate(&v6, &pod("default/busy2"), "c-busy2", "eth0").unwrap();
    let before = store.allocations().unwrap();
    // IPv4 could be reclaimed, IPv6 cannot (attached): all or nothing.
    let err = store.allocate_or_reclaim(&sets, &pod("default/new"), "c-new", "eth0").unwrap_err();
    assert!(matches!(err, Error::Exhausted { attached: 2, released: 0, .. }), "{err}");
    assert_eq!(store.allocations().unwrap(), before);
    assert_eq!(store.stats().unwrap().freed.pressure, 0);
}

#[test]
fn reconcile_never_frees_an_attached_pin_and_counts_list_frees() {
    let dir = tempfile::tempdir().unwrap();
    let sets = pool("10.244.1.0/24");
    let mut store = Store::open(db(dir.path())).unwrap();
    let running = attach(&mut store, &sets, "running");
    attach(&mut store, &sets, "gone");
    release(&mut store, "gone");
    let live = attach(&mut store, &sets, "live");
    release(&mut store, "live");
    let live_set: HashSet<PodRef> = [pod("default/live")].into();

    let report = store.reconcile(&live_set, Authority::Unverified, Duration::ZERO).unwrap();
    assert_eq!((report.freed.len(), report.kept_unverified, report.kept_attached), (0, 1, 1));

    // The list says `running` is gone, but a container holds its address.
    let report = store.reconcile(&live_set, Authority::Authoritative, Duration::ZERO).unwrap();
    assert_eq!(report.freed.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>(), ["default/gone"]);
    assert_eq!(report.kept_attached, 1);
    assert_eq!(state_of(&store, "running"), Some((running, State::Attached)));
    assert_eq!(state_of(&store, "live"), Some((live, State::Released)));
    // Its next DEL releases it; the next reconcile frees it.
    release(&mut store, "running");
    let report = store.reconcile(&live_set, Authority::Authoritative, Duration::ZERO).unwrap();
    assert_eq!(report.freed, vec![(pod("default/running"), running)]);

    let stats = store.stats().unwrap();
    assert_eq!((stats.attached, stats.released), (0, 1));
    assert_eq!(stats.freed.list, 2);
    assert_eq!(stats.freed.total(), 2);
}

#[test]
fn reconcile_and_free_released_with_nothing_to_free_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(dir.path());
    let sets = pool("10.244.1.0/24");
    let mut store = Store::open(&path).unwrap();
    let mut live = HashSet::new();
    for i in 0..20 {
        attach(&mut store, &sets, &format!("p{i}"));
        if i % 2 == 0 {
            store.release(&format!("c-p{i}"), "eth0").unwrap();
        }
        live.insert(pod(&format!("default/p{i}")));
    }
    attach(&mut store, &sets, "absent-but-attached");
    attach(&mut store, &sets, "absent-in-grace");
    store.release("c-absent-in-grace", "eth0").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let marks = file_marks(&path);
    assert!(marks[1].is_some_and(|(len, _)| len > 0), "the commits above are in the write-ahead log");
    let changes = store.changes();

    // Another process holds the write lock for the whole time: any write
    // transaction would block (30 s busy timeout) instead of returning.
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let report = store.reconcile(&live, Authority::Authoritative, Duration::from_secs(3600)).unwrap();
    assert_eq!((report.freed.len(), report.kept_attached, report.kept_in_grace), (0, 1, 1));
    let report = store.reconcile(&HashSet::new(), Authority::Unverified, Duration::ZERO).unwrap();
    assert_eq!((report.freed.len(), report.kept_unverified), (0, 11));
    assert!(store.free_released(&pod("default/p1"), FreeReason::Deleted).unwrap().is_empty(), "attached");
    assert!(store.free_released(&pod("default/nobody"), FreeReason::Moved).unwrap().is_empty());
    assert!(started.elapsed() < Duration::from_secs(5), "a call waited for the write lock");
    locker.execute_batch("ROLLBACK").unwrap();

    assert_eq!(store.changes(), changes, "rows were written");
    assert_eq!(file_marks(&path), marks, "the store files were touched");
}

#[test]
fn free_released_frees_only_released_pins_and_counts_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut dual = pool("10.244.1.0/24");
    dual.extend(pool("fd00:1::/120"));
    let mut store = Store::open(db(dir.path())).unwrap();
    let deleted = attach(&mut store, &dual, "deleted");
    release(&mut store, "deleted");
    attach(&mut store, &dual, "moved");
    release(&mut store, "moved");
    let running = attach(&mut store, &dual, "running");

    let freed = store.free_released(&pod("default/deleted"), FreeReason::Deleted).unwrap();
    assert_eq!(freed.len(), 2, "both families: {freed:?}");
    assert!(freed.contains(&deleted));
    assert_eq!(store.free_released(&pod("default/moved"), FreeReason::Moved).unwrap().len(), 2);
    assert!(store.free_released(&pod("default/running"), FreeReason::Deleted).unwrap().is_empty());
    assert!(store.free_released(&pod("default/running"), FreeReason::Moved).unwrap().is_empty());
    assert_eq!(state_of(&store, "running"), Some((running, State::Attached)));
    // Freeing twice is a no-op.
    assert!(store.free_released(&pod("default/deleted"), FreeReason::Deleted).unwrap().is_empty());

    let stats = store.stats().unwrap();
    assert_eq!((stats.attached, stats.released), (2, 0));
    assert_eq!((stats.freed.deleted, stats.freed.moved, stats.freed.list, stats.freed.pressure), (2, 2, 0, 0));
    for reason in FreeReason::ALL {
        assert_eq!(stats.freed.get(reason), [2, 2, 0, 0][reason as usize]);
    }
    assert_eq!(FreeReason::ALL.map(FreeReason::as_str), ["deleted", "moved", "list", "pressure"]);
    // The counters are in the file, not in this handle.
    drop(store);
    assert_eq!(Store::open(db(dir.path())).unwrap().stats().unwrap(), stats);
}

/// The window a free could lose a live pod's address in: the free has
/// decided, but a re-attach commits before it writes. Another connection
/// holds the write lock, re-attaches the pod the way ADD does (state
/// attached, new container and time) and commits while the free waits.
fn race_against_reattach(free: impl FnOnce(&mut Store) -> usize + Send + 'static) {
    let dir = tempfile::tempdir().unwrap();
    let path = db(dir.path());
    let sets = pool("10.244.1.0/24");
    let mut store = Store::open(&path).unwrap();
    let addr = attach(&mut store, &sets, "p");
    release(&mut store, "p");
    std::thread::sleep(Duration::from_millis(5));
    drop(store);

    let adder = rusqlite::Connection::open(&path).unwrap();
    adder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let freer = std::thread::spawn(move || {
        let mut store = Store::open(&path).unwrap();
        free(&mut store)
    });
    // Let the free read the released pin and block on the write lock.
    std::thread::sleep(Duration::from_millis(300));
    adder
        .execute(
            "UPDATE allocation SET state = 'attached', container_id = 'c-p-2', since_ms = since_ms + 1 \
             WHERE pod = 'default/p'",
            [],
        )
        .unwrap();
    adder.execute_batch("COMMIT").unwrap();
    assert_eq!(freer.join().unwrap(), 0, "the free won against a re-attach");
    let store = Store::open(db(dir.path())).unwrap();
    assert_eq!(state_of(&store, "p"), Some((addr, State::Attached)));
    assert_eq!(store.stats().unwrap().freed.total(), 0);
}

#[test]
fn free_released_loses_against_a_concurrent_reattach() {
    race_against_reattach(|store| store.free_released(&pod("default/p"), FreeReason::Deleted).unwrap().len());
}

#[test]
fn reconcile_loses_against_a_concurrent_reattach() {
    race_against_reattach(|store| {
        store.reconcile(&HashSet::new(), Authority::Authoritative, Duration::ZERO).unwrap().freed.len()
    });
}

/// Two handles (as two processes would), one re-attaching a pod with new
/// sandboxes, the other freeing it as deleted, as fast as they can: every
/// ADD that returned finds its address attached to the pod afterwards.
#[test]
fn concurrent_free_and_reattach_never_lose_an_attached_address() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(dir.path());
    let sets = pool("10.244.1.0/24");
    drop(Store::open(&path).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let freer = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut store = Store::open(&path).unwrap();
            let mut freed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                freed += store.free_released(&pod("default/p"), FreeReason::Deleted).unwrap().len();
            }
            freed
        })
    };
    let mut store = Store::open(&path).unwrap();
    for i in 0..150 {
        let got = store.allocate(&sets, &pod("default/p"), &format!("s{i}"), "eth0").unwrap()[0].ip;
        let pins = store.pins_of(&pod("default/p")).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!((pins[0].ip, pins[0].state), (got, State::Attached), "round {i}");
        store.release(&format!("s{i}"), "eth0").unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let freed = freer.join().unwrap() as u64;
    assert_eq!(store.stats().unwrap().freed.deleted, freed);
    store.integrity_check().unwrap();
}

/// The version 1 schema exactly as the first release wrote it.
const SCHEMA_V1: &str = "
CREATE TABLE allocation (
    ip TEXT PRIMARY KEY NOT NULL, family INTEGER NOT NULL CHECK (family IN (4, 6)), pod TEXT,
    ifname TEXT NOT NULL, container_id TEXT,
    state TEXT NOT NULL CHECK (state IN ('attached', 'released')), since_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX allocation_pin ON allocation (pod, ifname, family) WHERE pod IS NOT NULL;
CREATE INDEX allocation_container ON allocation (container_id, ifname);
CREATE TABLE vtep_mac (node TEXT PRIMARY KEY NOT NULL, mac TEXT NOT NULL, attempt INTEGER NOT NULL, since_ms INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
PRAGMA application_id = 1850298445;
PRAGMA user_version = 1;
INSERT INTO allocation VALUES ('10.9.0.2', 4, 'default/old', 'eth0', 'c-old', 'released', 1000);
INSERT INTO meta VALUES ('last_reserved:10.9.0.2-10.9.0.2', '10.9.0.2');
";

#[test]
fn a_version_1_file_without_counters_opens_and_gains_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(dir.path());
    rusqlite::Connection::open(&path).unwrap().execute_batch(SCHEMA_V1).unwrap();
    let mut store = Store::open(&path).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.attached, stats.released, stats.freed.total()), (0, 1, 0));
    let got = store.allocate_or_reclaim(&pool("10.9.0.0/30"), &pod("default/new"), "c-new", "eth0").unwrap();
    assert_eq!(got.allocations[0].ip, ip("10.9.0.2"));
    assert_eq!(got.reclaimed[0].pod, pod("default/old"));
    assert!(got.reclaimed[0].released_for > Duration::from_secs(365 * 86_400), "released at Unix ms 1000");
    drop(store);
    let raw = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = raw.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 1, "no format change");
    let counter: String =
        raw.query_row("SELECT value FROM meta WHERE key = 'freed_total:pressure'", [], |r| r.get(0)).unwrap();
    assert_eq!(counter, "1");
}

#[test]
fn bad_stores_give_precise_errors_and_stay_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let sets = pool("10.244.1.0/24");

    // A damaged counter row: stats names it.
    let path = dir.path().join("counter.db");
    let mut store = Store::open(&path).unwrap();
    attach(&mut store, &sets, "a");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("INSERT INTO meta VALUES ('freed_total:list', 'lots')", [])
        .unwrap();
    let err = store.stats().unwrap_err();
    assert!(
        err.to_string()
            .ends_with(r#"row "meta freed_total:list" is invalid: counter value "lots" is not a non-negative integer"#),
        "{err}"
    );

    // A row naming an impossible pod: reconcile refuses, writes nothing.
    let path = dir.path().join("row.db");
    let mut store = Store::open(&path).unwrap();
    attach(&mut store, &sets, "a");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("INSERT INTO allocation VALUES ('10.244.1.77', 4, 'Not A Pod', 'eth0', NULL, 'released', 0)", [])
        .unwrap();
    let before = contents(&path);
    let err = store.reconcile(&HashSet::new(), Authority::Authoritative, Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains(r#"row "10.244.1.77" is invalid: bad pod"#), "{err}");
    assert_eq!(contents(&path), before);
    drop(store);

    // Pressure never hands out the address of a damaged row: on a full pool it is skipped.
    let path = dir.path().join("full.db");
    let mut store = Store::open(&path).unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("INSERT INTO allocation VALUES ('10.9.0.2', 4, 'Not A Pod', 'eth0', NULL, 'released', 0)", [])
        .unwrap();
    let before = contents(&path);
    let err = store.allocate_or_reclaim(&pool("10.9.0.0/30"), &pod("default/new"), "c-new", "eth0").unwrap_err();
    assert!(matches!(err, Error::Exhausted { capacity: 1, attached: 0, released: 1, .. }), "{err}");
    assert_eq!(contents(&path), before);
    drop(store);

    // A damaged page: every call fails with SQLite's verdict; the bytes stay as they were.
    let path = dir.path().join("damaged.db");
    let mut store = Store::open(&path).unwrap();
    for i in 0..40 {
        attach(&mut store, &sets, &format!("p{i}"));
    }
    // Everything into the database file: the damage below must hit pages
    // that have no newer copy in the write-ahead log.
    assert!(store.checkpoint().unwrap(), "checkpoint completed");
    assert_eq!(std::fs::metadata(format!("{}-wal", path.display())).unwrap().len(), 0);
    drop(store);
    let mut bytes = std::fs::read(&path).unwrap();
    let page_size = 4096;
    assert!(bytes.len() >= 3 * page_size, "{} bytes", bytes.len());
    for b in &mut bytes[page_size..3 * page_size] {
        *b = 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let outcome = Store::open(&path).and_then(|mut store| {
        store.reconcile(&HashSet::new(), Authority::Authoritative, Duration::ZERO)?;
        store.stats()
    });
    let err = outcome.unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default());
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("malformed") || text.contains("not a database"), "{text}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // A store of a newer format: refused before anything is written.
    let path = dir.path().join("newer.db");
    drop(Store::open(&path).unwrap());
    rusqlite::Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 2").unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("IPAM store {} has format version 2; this netd reads versions up to 1", path.display())
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
