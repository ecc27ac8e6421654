//! VXLAN data-plane costs, in-process, in a fresh network namespace (root;
//! skipped otherwise):
//! - `program_from_empty/N`: device and N peers (neighbour, FDB, nexthop,
//!   route each) from nothing, as after a reboot;
//! - `noop_reconcile/5000`: a full pass over 5 000 programmed peers that
//!   finds nothing to change (dumps + diff, zero writes).
//!
//! Run: `cargo bench -p netd-benches --bench vxlan`. The side-by-side run
//! against `ip -batch` is `cargo xtask bench vxlan`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use netd::netlink::Handle;
use netd::testing::{self, synthetic_config as config, synthetic_node, synthetic_peer as peer};
use netd::vxlan::{Lease, Reconciler};

fn delete_device(handle: &mut Handle) {
    if let Some(link) = handle.link().get("flannel.1").unwrap() {
        handle.link().delete(link.index).execute().unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let Some(_kernel) = testing::privileged().unwrap() else {
        eprintln!("vxlan benchmarks need root (network namespaces); skipped");
        return;
    };
    let ns = synthetic_node().unwrap();
    let _inside = ns.enter().unwrap();
    let mut handle = Handle::new().unwrap();

    let mut group = c.benchmark_group("vxlan");
    group.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(1));
    for n in [1_000u32, 5_000, 10_000] {
        let peers: Vec<Lease> = (1..=n).map(peer).collect();
        let mut reconciler = Reconciler::new(config()).unwrap();
        group.bench_function(BenchmarkId::new("program_from_empty", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    delete_device(&mut handle);
                    let started = Instant::now();
                    let report = reconciler.reconcile(&peers).unwrap();
                    total += started.elapsed();
                    assert_eq!((report.writes, report.failures.len()), (4 * n as usize, 0));
                }
                total
            })
        });
    }

    let peers: Vec<Lease> = (1..=5_000).map(peer).collect();
    let mut reconciler = Reconciler::new(config()).unwrap();
    delete_device(&mut handle);
    reconciler.reconcile(&peers).unwrap();
    group.bench_function(BenchmarkId::new("noop_reconcile", 5_000), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let report = reconciler.reconcile(&peers).unwrap();
                total += started.elapsed();
                assert_eq!(report.writes, 0);
            }
            total
        })
    });
    group.finish();
    delete_device(&mut handle);
}

criterion_group!(benches, bench);
criterion_main!(benches);
