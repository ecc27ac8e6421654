//! The privileged test harness itself: guards clean up (also on panic),
//! code runs inside namespaces, veth and bridges carry traffic.

// Test helpers outside #[test] fns fail the test the same way an assertion would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use netd::testing::{self, Bridge, NetNs, VethPair};

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn namespace_is_removed_when_a_test_panics() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let mut created = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = NetNs::new().unwrap();
        let _veth = VethPair::new((Some(&ns), "a0"), (Some(&ns), "b0")).unwrap();
        created = Some(ns.path());
        assert!(ns.path().exists());
        panic!("simulated test failure");
    }));
    assert!(outcome.is_err());
    let path = created.unwrap();
    assert!(!path.exists(), "{} survived the panic", path.display());
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn root_namespace_links_are_removed_on_drop() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let ns = NetNs::new().unwrap();
    let host_end = testing::unique_ifname();
    {
        let _veth = VethPair::new((None, &host_end), (Some(&ns), "eth0")).unwrap();
        assert!(Path::new("/sys/class/net").join(&host_end).exists());
        assert!(ns.ip(&["link", "show", "eth0"]).unwrap().contains("eth0"));
    }
    assert!(!Path::new("/sys/class/net").join(&host_end).exists());
    assert!(ns.ip(&["link", "show", "eth0"]).is_err());
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn run_enters_the_namespace_only_on_its_thread() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let ns = NetNs::new().unwrap();
    let inside = ns.run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap()).unwrap();
    let outside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let expected = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(ns.path()).unwrap().ino()
    };
    assert_eq!(inside.to_string_lossy(), format!("net:[{expected}]"));
    assert_ne!(inside, outside);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn tcp_crosses_a_bridge_between_namespaces() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let switch = NetNs::new().unwrap();
    let left = NetNs::new().unwrap();
    let right = NetNs::new().unwrap();
    let bridge = Bridge::new(Some(&switch), "br0").unwrap();
    let _l = VethPair::new((Some(&switch), "p-left"), (Some(&left), "eth0")).unwrap();
    let _r = VethPair::new((Some(&switch), "p-right"), (Some(&right), "eth0")).unwrap();
    bridge.attach("p-left").unwrap();
    bridge.attach("p-right").unwrap();
    left.ip(&["addr", "add", "10.201.0.1/24", "dev", "eth0"]).unwrap();
    right.ip(&["addr", "add", "10.201.0.2/24", "dev", "eth0"]).unwrap();

    let listener = left.run(|| TcpListener::bind("10.201.0.1:0").unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(b"pong!").unwrap();
        (buf, peer)
    });
    // The socket belongs to `right` because it was created on right's thread;
    // it keeps that namespace wherever it is used afterwards.
    let reply = right
        .run(move || {
            let mut stream = TcpStream::connect(("10.201.0.1", port)).unwrap();
            stream.write_all(b"ping!").unwrap();
            let mut reply = [0u8; 5];
            stream.read_exact(&mut reply).unwrap();
            reply
        })
        .unwrap();
    let (request, peer) = server.join().unwrap();
    assert_eq!(&request, b"ping!");
    assert_eq!(&reply, b"pong!");
    assert_eq!(peer.ip().to_string(), "10.201.0.2");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn block_on_runs_async_io_inside_the_namespace() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let ns = NetNs::new().unwrap();
    ns.ip(&["addr", "add", "10.202.0.1/24", "dev", "lo"]).unwrap();
    // 10.202.0.1 exists only inside `ns`: binding it proves where the runtime runs.
    let echoed = ns
        .block_on(|| async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("10.202.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = async {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4];
                conn.read_exact(&mut buf).await.unwrap();
                buf
            };
            let connect = async {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.write_all(b"netd").await.unwrap();
            };
            let (buf, ()) = tokio::join!(accept, connect);
            buf
        })
        .unwrap();
    assert_eq!(&echoed, b"netd");
    assert!(std::net::TcpListener::bind("10.202.0.1:0").is_err(), "address leaked into the root namespace");
}
