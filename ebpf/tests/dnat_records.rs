//! The tunnel DNAT keeps a redirected connection's original destination in
//! two hash maps, not in socket storage, so nothing frees the entries but
//! the programs themselves: this test holds them to that. Every entry goes
//! when its connection's client socket closes, however the connection ends;
//! connections the DNAT did not redirect (to the tunnel server's own
//! address, another port, or its port directly) never get one.
//!
//! Privileged: as root they run in a namespace and cgroup of their own, with
//! traffic only on that namespace's loopback; as a user they skip. One test
//! in this file: joining a cgroup moves the whole process, which a second
//! test on libtest's parallel threads would trip over.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netd_ebpf::dnat::{AttachOptions, DnatStats, Scope, TunnelDnat};
use netd_testing::{self as testing, Cgroup, NetNs, PinDir};

/// The tunnel server's address, on the namespace's loopback.
const TARGET: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 1);
const KUBELET: u16 = 10250;
const TUNNEL: u16 = 10263;
/// A port no rule names, on the tunnel server's address.
const OTHER: u16 = 8000;
/// Connections per way of ending them.
const ROUNDS: u32 = 100;

fn edge(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 1)) + i % 50)
}

/// How a connection ends: who closes first, and whether with an RST.
#[derive(Debug, Clone, Copy)]
enum Ending {
    ClientFirst,
    ServerFirst,
    ClientReset,
}

fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads one linger, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// Ends a connection the way `ending` says, waiting for the peer's close
/// where a real client or server would.
fn end(client: TcpStream, accepted: TcpStream, ending: Ending) {
    let mut byte = [0u8; 1];
    match ending {
        Ending::ClientFirst => {
            drop(client);
            let mut accepted = accepted;
            assert_eq!(accepted.read(&mut byte).unwrap(), 0);
        }
        Ending::ServerFirst => {
            accepted.shutdown(Shutdown::Write).unwrap();
            let mut client = client;
            assert_eq!(client.read(&mut byte).unwrap(), 0);
            drop(client);
        }
        Ending::ClientReset => reset_on_close(&client),
    }
}

/// The stats once the entries of closed connections are gone (a client
/// socket reaches CLOSE when the last packet of its connection is handled).
fn settled(dnat: &TunnelDnat) -> DnatStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = dnat.stats().unwrap();
        if stats.connections_open == 0 || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_record_goes_with_its_connection_and_unrelated_connections_make_none() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let ns = NetNs::new().unwrap();
    ns.ip(&["addr", "add", &format!("{TARGET}/32"), "dev", "lo"]).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let pins = PinDir::new().unwrap();
    let (mut dnat, _) = TunnelDnat::load_or_attach(&AttachOptions {
        pin_dir: pins.path().to_path_buf(),
        cgroup: Some(cgroup.path().to_path_buf()),
        original_dst_cgroup: Some(cgroup.path().to_path_buf()),
    })
    .unwrap();
    ns.run(|| dnat.set_target(TARGET, Scope::HostNetwork)).unwrap().unwrap();
    dnat.set_port_rules([(KUBELET, TUNNEL)]).unwrap();
    dnat.set_edge_nodes((0..50).map(edge)).unwrap();
    let _joined = cgroup.join().unwrap();

    let dnat = ns
        .run(move || {
            let tunnel = TcpListener::bind((TARGET, TUNNEL)).unwrap();
            let other = TcpListener::bind((TARGET, OTHER)).unwrap();
            let mut i = 0;
            for ending in [Ending::ClientFirst, Ending::ServerFirst, Ending::ClientReset] {
                for _ in 0..ROUNDS {
                    let dialled = SocketAddrV4::new(edge(i), KUBELET);
                    i += 1;
                    let client = TcpStream::connect(dialled).unwrap();
                    let (accepted, _) = tunnel.accept().unwrap();
                    assert_eq!(client.peer_addr().unwrap(), SocketAddr::V4(dialled), "getpeername");
                    assert_eq!(dnat.original_dst(&accepted).unwrap(), Some(dialled), "accepted socket");
                    assert_eq!(dnat.original_dst(&client).unwrap(), Some(dialled), "client socket");
                    // Not redirected: the tunnel server's address on another
                    // port, and its tunnel port dialled directly.
                    for (listener, port) in [(&other, OTHER), (&tunnel, TUNNEL)] {
                        let direct = TcpStream::connect((TARGET, port)).unwrap();
                        let (direct_accepted, _) = listener.accept().unwrap();
                        assert_eq!(dnat.original_dst(&direct_accepted).unwrap(), None, "direct to :{port}");
                        assert_eq!(dnat.original_dst(&direct).unwrap(), None, "direct to :{port}");
                        assert_eq!(direct.peer_addr().unwrap(), SocketAddr::from((TARGET, port)));
                    }
                    // Exactly one entry while it is open: the redirected one.
                    let stats = dnat.stats().unwrap();
                    assert_eq!((stats.connections_open, stats.handshakes_pending), (1, 0), "{ending:?}");
                    assert_eq!(stats.dialled_unsent, 0, "the cookie record outlived the SYN");
                    end(client, accepted, ending);
                }
                let stats = settled(&dnat);
                assert_eq!(stats.connections_open, 0, "entries left after {ending:?}");
            }
            dnat
        })
        .unwrap();
    let stats = settled(&dnat);
    assert_eq!(stats.accepted_with_origin, 3 * u64::from(ROUNDS));
    assert_eq!(stats.rules[0].redirected, 3 * u64::from(ROUNDS));
    assert_eq!((stats.connections_open, stats.handshakes_pending, stats.dialled_unsent), (0, 0, 0));
    assert_eq!((stats.no_storage, stats.handshake_full), (0, 0));
}
