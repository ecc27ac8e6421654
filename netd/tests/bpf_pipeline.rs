//! End to end: the test-only connect counter is compiled by build.rs,
//! embedded, loaded, attached to a temporary cgroup, exercised over loopback,
//! and its map read back.

// Test helpers outside #[test] fns fail the test the same way an assertion would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};

use netd::ebpf::testing::ConnectCounter;
use netd::testing::{self, Cgroup};

/// Connects `times` times to `addr:port` from a shell that runs in `cgroup`.
fn connect_from_cgroup(cgroup: &Cgroup, addr: &str, port: u16, times: usize) {
    let script = format!("for i in $(seq {times}); do exec 3<>/dev/tcp/{addr}/{port} || exit 1; exec 3>&-; done");
    let child = cgroup.spawn("bash", &["-c", &script]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "connects failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn connect4_counter_counts_only_its_cgroup_and_address() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let cgroup = Cgroup::new().unwrap();
    let mut counter = ConnectCounter::load(Some(Ipv4Addr::LOCALHOST)).unwrap();
    counter.attach(cgroup.path()).unwrap();

    let watched = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = TcpListener::bind("127.0.0.2:0").unwrap();
    let watched_port = watched.local_addr().unwrap().port();
    let other_port = other_addr.local_addr().unwrap().port();

    assert_eq!(counter.count(watched_port).unwrap(), 0);
    connect_from_cgroup(&cgroup, "127.0.0.1", watched_port, 3);
    // Filtered out by the `count_only_addr4` global set at load time.
    connect_from_cgroup(&cgroup, "127.0.0.2", other_port, 2);
    // This process is outside the cgroup: not counted.
    drop(TcpStream::connect(("127.0.0.1", watched_port)).unwrap());

    assert_eq!(counter.count(watched_port).unwrap(), 3);
    assert_eq!(counter.count(other_port).unwrap(), 0);
    drop(counter);
    // Detached on drop: further connects from the cgroup still succeed.
    connect_from_cgroup(&cgroup, "127.0.0.1", watched_port, 1);
}
