//! The store's promises, on real files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use netd_ipam::{derive_vtep_mac, Authority, Error, PodRef, State, Store};

mod common;

use common::{ip, pod, pool};

fn open(dir: &Path) -> Store {
    Store::open(dir.join("ipam.db")).unwrap()
}

#[test]
fn same_pod_gets_same_ip_after_sandbox_recreation_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool("10.244.1.0/24");
    let first = {
        let mut store = open(dir.path());
        let a = store.allocate(&pool, &pod("default/web-0"), "c1", "eth0").unwrap()[0].ip;
        store.release("c1", "eth0").unwrap();
        a
    };
    // "Reboot": a new process opens the same file.
    let mut store = open(dir.path());
    let pins = store.pins_of(&pod("default/web-0")).unwrap();
    assert_eq!(pins.len(), 1);
    assert_eq!(pins[0].state, State::Released);
    let again = store.allocate(&pool, &pod("default/web-0"), "c2", "eth0").unwrap()[0].ip;
    assert_eq!(again, first);
    let other = store.allocate(&pool, &pod("default/web-1"), "c3", "eth0").unwrap()[0].ip;
    assert_ne!(other, first);
}

#[test]
fn new_sandbox_without_del_takes_over_the_pin() {
    // Node rebooted: the old container never got a DEL.
    let dir = tempfile::tempdir().unwrap();
    let pool = pool("10.244.1.0/24");
    let mut store = open(dir.path());
    let a = store.allocate(&pool, &pod("default/web-0"), "old", "eth0").unwrap()[0].ip;
    let b = store.allocate(&pool, &pod("default/web-0"), "new", "eth0").unwrap()[0].ip;
    assert_eq!(a, b);
    let all = store.allocations().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].container_id.as_deref(), Some("new"));
    // A late DEL of the old sandbox must not release the new one.
    assert!(store.release("old", "eth0").unwrap().is_empty());
    assert_eq!(store.allocations().unwrap()[0].state, State::Attached);
}

#[test]
fn retried_add_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool("10.244.1.0/24");
    let mut store = open(dir.path());
    let a = store.allocate(&pool, &pod("default/a"), "c1", "eth0").unwrap();
    let b = store.allocate(&pool, &pod("default/a"), "c1", "eth0").unwrap();
    assert_eq!(a[0].ip, b[0].ip);
    assert_eq!(store.allocations().unwrap().len(), 1);
}

#[test]
fn forget_frees_the_ip_for_reuse() {
    let dir = tempfile::tempdir().unwrap();
    // /30: exactly one allocatable address.
    let pool = pool("10.9.0.0/30");
    let mut store = open(dir.path());
    let a = store.allocate(&pool, &pod("default/a"), "c1", "eth0").unwrap()[0].ip;
    assert_eq!(a, ip("10.9.0.2"));
    store.release("c1", "eth0").unwrap();
    match store.allocate(&pool, &pod("default/b"), "c2", "eth0") {
        Err(Error::Exhausted { capacity: 1, attached: 0, released: 1, .. }) => {}
        other => panic!("expected exhaustion held by a released pin, got {other:?}"),
    }
    assert_eq!(store.forget(&pod("default/a")).unwrap(), vec![a]);
    assert_eq!(store.allocate(&pool, &pod("default/b"), "c2", "eth0").unwrap()[0].ip, a);
}

#[test]
fn exhaustion_leaves_the_store_intact() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool("10.9.0.0/29"); // .2-.6
    let mut store = open(dir.path());
    for i in 0..5 {
        store.allocate(&pool, &pod(&format!("default/p{i}")), &format!("c{i}"), "eth0").unwrap();
    }
    let before = store.allocations().unwrap();
    let err = store.allocate(&pool, &pod("default/late"), "cx", "eth0").unwrap_err();
    assert!(err.to_string().contains("all 5 are taken (5 attached, 0 held"), "{err}");
    assert_eq!(store.allocations().unwrap(), before);
}

#[test]
fn round_robin_does_not_reuse_a_just_freed_address() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool("10.9.0.0/24");
    let mut store = open(dir.path());
    let a = store.allocate(&pool, &pod("default/a"), "c1", "eth0").unwrap()[0].ip;
    store.forget(&pod("default/a")).unwrap();
    let b = store.allocate(&pool, &pod("default/b"), "c2", "eth0").unwrap()[0].ip;
    assert_eq!(a, ip("10.9.0.2"));
    assert_eq!(b, ip("10.9.0.3"), "host-local order: continue after the last reserved");
}

#[test]
fn reconcile_frees_only_on_authoritative_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool("10.244.1.0/24");
    let mut store = open(dir.path());
    let live = pod("default/live");
    let gone = pod("default/gone");
    store.allocate(&pool, &live, "c1", "eth0").unwrap();
    let gone_ip = store.allocate(&pool, &gone, "c2", "eth0").unwrap()[0].ip;
    store.release("c2", "eth0").unwrap();
    let live_set: HashSet<PodRef> = [live.clone()].into();

    let report = store.reconcile(&live_set, Authority::Unverified, Duration::ZERO).unwrap();
    assert_eq!((report.freed.len(), report.kept_unverified), (0, 1));
    let report = store.reconcile(&live_set, Authority::Authoritative, Duration::from_secs(3600)).unwrap();
    assert_eq!((report.freed.len(), report.kept_in_grace), (0, 1));
    assert_eq!(store.allocations().unwrap().len(), 2);

    let report = store.reconcile(&live_set, Authority::Authoritative, Duration::ZERO).unwrap();
    assert_eq!(report.freed, vec![(gone, gone_ip)]);
    let left = store.allocations().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].pod.as_ref(), Some(&live));
}

#[test]
fn pin_moves_when_the_node_subnet_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let p = pod("default/a");
    store.allocate(&pool("10.244.1.0/24"), &p, "c1", "eth0").unwrap();
    store.release("c1", "eth0").unwrap();
    let moved = store.allocate(&pool("10.244.7.0/24"), &p, "c2", "eth0").unwrap()[0].ip;
    assert_eq!(moved, ip("10.244.7.2"));
    let pins = store.pins_of(&p).unwrap();
    assert_eq!(pins.len(), 1, "old pin outside the pool is dropped: {pins:?}");
}

#[test]
fn dual_stack_gets_one_address_per_family() {
    let dir = tempfile::tempdir().unwrap();
    let mut sets = pool("10.244.1.0/24");
    sets.extend(pool("fd00:10:244:1::/120"));
    let mut store = open(dir.path());
    let got = store.allocate(&sets, &pod("default/a"), "c1", "eth0").unwrap();
    assert_eq!(got.iter().map(|a| a.ip.to_string()).collect::<Vec<_>>(), ["10.244.1.2", "fd00:10:244:1::2"]);
    store.release("c1", "eth0").unwrap();
    let again = store.allocate(&sets, &pod("default/a"), "c9", "eth0").unwrap();
    assert_eq!(got.iter().map(|a| a.ip).collect::<Vec<_>>(), again.iter().map(|a| a.ip).collect::<Vec<_>>());
    let mut twice_v4 = pool("10.244.1.0/24");
    twice_v4.extend(pool("10.244.2.0/24"));
    assert!(matches!(store.allocate(&twice_v4, &pod("default/b"), "c2", "eth0"), Err(Error::DuplicateFamily(_))));
}

#[test]
fn garbage_foreign_and_newer_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"this is not a database, just some text that is long enough to matter").unwrap();
    let before = std::fs::read(&garbage).unwrap();
    assert!(matches!(Store::open(&garbage), Err(Error::Unreadable { .. })));
    assert_eq!(std::fs::read(&garbage).unwrap(), before);

    let foreign = dir.path().join("foreign.db");
    rusqlite_like::create(&foreign, "PRAGMA application_id = 42; CREATE TABLE t (x);");
    assert!(matches!(Store::open(&foreign), Err(Error::Foreign { found: 42, .. })));
    let unmarked = dir.path().join("unmarked.db");
    rusqlite_like::create(&unmarked, "CREATE TABLE t (x);");
    assert!(matches!(Store::open(&unmarked), Err(Error::Foreign { found: 0, .. })));

    let newer = dir.path().join("newer.db");
    drop(Store::open(&newer).unwrap());
    rusqlite_like::create(&newer, "PRAGMA user_version = 9;");
    let err = Store::open(&newer).unwrap_err();
    assert!(err.to_string().contains("format version 9; this netd reads versions up to 1"), "{err}");
}

#[test]
fn vtep_mac_is_persisted_and_collisions_resolve_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let first = store.vtep_mac("edge-b", &[]).unwrap();
    assert_eq!(first.mac, derive_vtep_mac("edge-b", 0));
    assert!(!first.from_store && first.collisions.is_empty());
    drop(store);
    let mut store = open(dir.path());
    let again = store.vtep_mac("edge-b", &[]).unwrap();
    assert!(again.from_store);
    assert_eq!(again.mac, first.mac);

    // A peer whose name sorts first claims our MAC: we move, and say so.
    let clash = vec![("edge-a".to_string(), first.mac)];
    let moved = store.vtep_mac("edge-b", &clash).unwrap();
    assert_eq!(moved.mac, derive_vtep_mac("edge-b", 1));
    assert_eq!(moved.collisions.len(), 1);
    assert!(!moved.collisions[0].kept);
    // The move is persisted.
    assert_eq!(store.vtep_mac("edge-b", &[]).unwrap().mac, moved.mac);

    // The peer that sorts first keeps its MAC and reports the clash.
    let mut other = Store::open(dir.path().join("other.db")).unwrap();
    let a_mac = other.vtep_mac("edge-a", &[]).unwrap().mac;
    let kept = other.vtep_mac("edge-a", &[("edge-z".to_string(), a_mac)]).unwrap();
    assert_eq!(kept.mac, a_mac);
    assert!(kept.collisions[0].kept);

    // Re-install: a wiped store derives the same MAC again.
    let fresh = Store::open(dir.path().join("fresh.db")).unwrap().vtep_mac("edge-b", &[]).unwrap();
    assert_eq!(fresh.mac, first.mac);
}

#[test]
fn host_local_directory_import_keeps_every_ip() {
    let dir = tempfile::tempdir().unwrap();
    let hl = dir.path().join("cbr0");
    std::fs::create_dir(&hl).unwrap();
    std::fs::write(hl.join("10.244.1.2"), "aaaa\r\neth0").unwrap();
    std::fs::write(hl.join("10.244.1.3"), "bbbb\r\neth0").unwrap();
    std::fs::write(hl.join("10.244.1.9"), "cccc").unwrap(); // pre-0.7 format
    std::fs::write(hl.join("10.244.1.10_default_pinned"), "").unwrap();
    std::fs::write(hl.join("10.244.1.3_kube-system_dns"), "").unwrap();
    std::fs::write(hl.join("last_reserved_ip.0"), "10.244.1.9").unwrap();
    std::fs::write(hl.join("lock"), "").unwrap();
    std::fs::write(hl.join("README"), "stray").unwrap();
    let pool = pool("10.244.1.0/24");

    let mut store = open(dir.path());
    let report = store.import_host_local(&hl, &pool).unwrap();
    assert_eq!((report.attached, report.pinned, report.cursors), (3, 2, 1));
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    // Importing twice changes nothing.
    let again = store.import_host_local(&hl, &pool).unwrap();
    assert_eq!((again.attached, again.pinned), (3, 2));

    let all = store.allocations().unwrap();
    let ips: Vec<String> = all.iter().map(|a| a.ip.to_string()).collect();
    assert_eq!(ips, ["10.244.1.10", "10.244.1.2", "10.244.1.3", "10.244.1.9"]);
    // The marker named the pod of host-local's 10.244.1.3 reservation.
    let dns = store.pins_of(&pod("kube-system/dns")).unwrap();
    assert_eq!((dns[0].ip, dns[0].container_id.as_deref()), (ip("10.244.1.3"), Some("bbbb")));
    // The running container's next ADD (CNI CHECK/ADD retry) keeps its address and records its pod.
    assert_eq!(store.allocate(&pool, &pod("default/x"), "aaaa", "eth0").unwrap()[0].ip, ip("10.244.1.2"));
    // The pinned pod comes back to its address.
    assert_eq!(store.allocate(&pool, &pod("default/pinned"), "dddd", "eth0").unwrap()[0].ip, ip("10.244.1.10"));
    // New pods continue after host-local's cursor and avoid every imported address.
    assert_eq!(store.allocate(&pool, &pod("default/new"), "eeee", "eth0").unwrap()[0].ip, ip("10.244.1.11"));
    // DEL of an import that never learned its pod frees it (nothing to pin it to).
    store.release("cccc", "eth0").unwrap();
    assert!(store.allocations().unwrap().iter().all(|a| a.ip != ip("10.244.1.9")));
}

/// Writes raw SQL into a file, standing in for another program's database.
mod rusqlite_like {
    use std::path::Path;

    pub fn create(path: &Path, sql: &str) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(sql).unwrap();
    }
}
