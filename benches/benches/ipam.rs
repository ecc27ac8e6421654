//! IPAM store costs, each a durable (fsynced) SQLite transaction:
//! - `allocate_new`: a new pod gets a free address;
//! - `allocate_pin_hit`: a known pod (released pin) gets its address back;
//! - `release`: CNI DEL of an attached pod;
//! - `reconcile_250_unchanged`: an authoritative reconcile of a store holding
//!   250 pins (200 attached, 50 released), every pod live: nothing to free,
//!   and nothing may be written (checked: `Store::changes()` and the files'
//!   size and mtime stay the same over every run);
//! - `reconcile_250_free_25`: the same store size with 25 released pins of
//!   pods gone from the list: they are freed in one durable transaction.
//!
//! Run: `cargo bench -p netd-benches --bench ipam`; medians land in
//! `target/criterion/ipam/*/new/estimates.json`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use netd_ipam::{Authority, PodRef, Range, RangeSet, Store};

fn pool() -> Vec<RangeSet> {
    vec![RangeSet::single(Range::new("10.128.0.0/16".parse().unwrap(), None, None, None).unwrap())]
}

/// A store already holding `n` pods, like a busy node.
fn populated(dir: &std::path::Path, n: usize) -> Store {
    let mut store = Store::open(dir.join("bench.db")).unwrap();
    for i in 0..n {
        let pod: PodRef = format!("default/resident-{i}").parse().unwrap();
        store.allocate(&pool(), &pod, &format!("resident-{i}"), "eth0").unwrap();
    }
    store
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ipam");
    group.measurement_time(Duration::from_secs(5));
    let sets = pool();

    let dir = tempfile::tempdir().unwrap();
    let mut store = populated(dir.path(), 100);
    let mut serial = 0u64;
    group.bench_function("allocate_new", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                serial += 1;
                let pod: PodRef = format!("default/new-{serial}").parse().unwrap();
                let started = Instant::now();
                store.allocate(&sets, &pod, &format!("c{serial}"), "eth0").unwrap();
                total += started.elapsed();
                // Keep the store at a steady size (untimed).
                store.forget(&pod).unwrap();
            }
            total
        })
    });

    let pinned: PodRef = "default/pinned".parse().unwrap();
    store.allocate(&sets, &pinned, "p0", "eth0").unwrap();
    store.release("p0", "eth0").unwrap();
    group.bench_function("allocate_pin_hit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                serial += 1;
                let container = format!("p{serial}");
                let started = Instant::now();
                store.allocate(&sets, &pinned, &container, "eth0").unwrap();
                total += started.elapsed();
                store.release(&container, "eth0").unwrap();
            }
            total
        })
    });

    group.bench_function("release", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                serial += 1;
                let container = format!("r{serial}");
                store.allocate(&sets, &pinned, &container, "eth0").unwrap();
                let started = Instant::now();
                store.release(&container, "eth0").unwrap();
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
    reconcile(c);
}

/// Size and mtime of the store and its write-ahead log (where every commit
/// lands first): a write changes one of them. The log must exist, or the
/// check would pass for a write that went elsewhere.
fn file_marks(path: &Path) -> Vec<(u64, SystemTime)> {
    [path.to_path_buf(), PathBuf::from(format!("{}-wal", path.display()))]
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display())).unwrap();
            (meta.len(), meta.modified().unwrap())
        })
        .collect()
}

/// `n` pins like a busy node: 4 in 5 running pods, 1 in 5 released (between sandboxes).
fn store_of(dir: &Path, n: usize) -> (Store, HashSet<PodRef>) {
    let mut store = Store::open(dir.join("bench.db")).unwrap();
    let mut live = HashSet::new();
    for i in 0..n {
        let pod: PodRef = format!("default/pod-{i}").parse().unwrap();
        store.allocate(&pool(), &pod, &format!("c{i}"), "eth0").unwrap();
        if i % 5 == 0 {
            store.release(&format!("c{i}"), "eth0").unwrap();
        }
        live.insert(pod);
    }
    (store, live)
}

fn reconcile(c: &mut Criterion) {
    let mut group = c.benchmark_group("ipam");
    group.measurement_time(Duration::from_secs(5));

    let dir = tempfile::tempdir().unwrap();
    let (mut store, live) = store_of(dir.path(), 250);
    let path = store.path().to_path_buf();
    std::thread::sleep(Duration::from_millis(20));
    let (changes, marks) = (store.changes(), file_marks(&path));
    let mut runs = 0u64;
    group.bench_function("reconcile_250_unchanged", |b| {
        b.iter(|| {
            runs += 1;
            let report = store.reconcile(&live, Authority::Authoritative, Duration::ZERO).unwrap();
            assert!(report.freed.is_empty());
        })
    });
    assert_eq!(store.changes() - changes, 0, "reconcile with nothing to free wrote rows");
    assert_eq!(file_marks(&path), marks, "reconcile with nothing to free touched the store files");
    eprintln!("reconcile_250_unchanged: {runs} reconciles, 0 rows written, store and write-ahead log untouched");

    // 225 live pins, and 25 released pins of pods missing from the list,
    // re-created before every run (untimed, one transaction through SQLite
    // directly: 25 fsynced CNI ADD+DELs per run would make the bench take minutes).
    let dir = tempfile::tempdir().unwrap();
    let (mut store, live) = store_of(dir.path(), 225);
    let raw = rusqlite::Connection::open(store.path()).unwrap();
    let repin = || {
        let hour_ago = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64 - 3_600_000;
        let tx = raw.unchecked_transaction().unwrap();
        for i in 0..25 {
            // The rows a CNI DEL leaves behind, released an hour ago (past any grace).
            tx.execute(
                "INSERT INTO allocation (ip, family, pod, ifname, container_id, state, since_ms)
                 VALUES (?1, 4, ?2, 'eth0', ?3, 'released', ?4)",
                rusqlite::params![
                    format!("10.128.200.{}", i + 1),
                    format!("default/gone-{i}"),
                    format!("gone-{i}"),
                    hour_ago
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    };
    let mut rows_written = Vec::new();
    group.bench_function("reconcile_250_free_25", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                repin();
                let before = store.changes();
                let started = Instant::now();
                let report = store.reconcile(&live, Authority::Authoritative, Duration::from_secs(60)).unwrap();
                total += started.elapsed();
                assert_eq!(report.freed.len(), 25);
                rows_written.push(store.changes() - before);
            }
            total
        })
    });
    rows_written.sort_unstable();
    rows_written.dedup();
    // 25 deletes and the `freed_total:list` counter, in one transaction.
    assert_eq!(rows_written, [26], "rows written per reconcile");
    eprintln!("reconcile_250_free_25: 26 rows written per reconcile (25 pins freed + 1 counter), one commit");
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
