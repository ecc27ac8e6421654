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

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use netd::ipam::MacAddr;
use netd::netlink::Handle;
use netd::testing::{self, NetNs};
use netd::vxlan::{Lease, OverlayConfig, Reconciler, FLANNEL_VXLAN_PORT};

const OWN_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);

fn peer(i: u32) -> Lease {
    Lease {
        subnet: ipnet::Ipv4Net::new(Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 0), 24).unwrap(),
        public_ip: Ipv4Addr::from(u32::from(OWN_IP) + 9 + i),
        vtep_mac: MacAddr([0x0e, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        node: None,
    }
}

fn config() -> OverlayConfig {
    OverlayConfig {
        network: "10.0.0.0/8".parse().unwrap(),
        own: Lease {
            subnet: "10.0.0.0/24".parse().unwrap(),
            public_ip: OWN_IP,
            vtep_mac: MacAddr([0x0e, 0xff, 0, 0, 0, 1]),
            node: None,
        },
        vni: 1,
        port: FLANNEL_VXLAN_PORT,
        underlay: "eth0".into(),
        direct_routing: false,
    }
}

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
    let ns = NetNs::new().unwrap();
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    ns.ip(&["addr", "add", &format!("{OWN_IP}/12"), "dev", "eth0"]).unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
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
