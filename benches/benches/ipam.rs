//! IPAM store costs, each a durable (fsynced) SQLite transaction:
//! - `allocate_new`: a new pod gets a free address;
//! - `allocate_pin_hit`: a known pod (released pin) gets its address back;
//! - `release`: CNI DEL of an attached pod.
//!
//! Run: `cargo bench -p netd-benches --bench ipam`; medians land in
//! `target/criterion/ipam/*/new/estimates.json`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use netd_ipam::{PodRef, Range, RangeSet, Store};

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
