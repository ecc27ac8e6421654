//! The tunnel DNAT (`netd::ebpf::dnat`) against the real kernel, in
//! namespaces and cgroups this test makes.
//!
//! The stage: a "cloud node" namespace holding the tunnel server's
//! listeners (10263, 10264) and stand-ins for edge kubelets (the edge
//! addresses on its `lo`, so a connect that is *not* redirected lands on a
//! listener that says so instead of leaving the namespace), plus a "pod"
//! namespace behind a veth. Programs attach to a test cgroup T; the server's
//! listeners belong to T/server, clients to T/client (see
//! `Cgroup::join`: sockets keep the cgroup they were made in).
//!
//! Own runner (`harness = false`): joining a cgroup moves the whole
//! process, which libtest's parallel threads would trip over.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netd::ebpf::dnat::{AttachOptions, DnatError, LinkAction, Scope, TunnelDnat};
use netd::testing::{self, Cgroup, NetNs, PinDir, VethPair};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 1);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 2);
const EDGE_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);
const EDGE_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 6);
/// A pod of an edge node whose subnet is 10.244.7.0/24, and one outside it.
const EDGE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 19);
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 8, 19);
const TLS_PORT: u16 = 10263;
const HTTP_PORT: u16 = 10264;
const RULES: [(u16, u16); 3] = [(10250, TLS_PORT), (10255, HTTP_PORT), (8080, HTTP_PORT)];
/// Ports the edge stand-ins listen on (rules plus one no rule names).
const EDGE_PORTS: [u16; 4] = [10250, 10255, 8080, 9999];

/// What the server saw on one accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    local: SocketAddr,
    peer: SocketAddr,
    original_dst: Option<SocketAddrV4>,
    so_original_dst: Option<SocketAddrV4>,
}

impl Seen {
    fn line(&self) -> String {
        let show = |a: Option<SocketAddrV4>| a.map_or("-".to_string(), |a| a.to_string());
        format!("{} {} {}\n", self.local, show(self.original_dst), show(self.so_original_dst))
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, as REDIRECT-era software asks it.
fn so_original_dst(stream: &TcpStream) -> Option<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain integers; all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `addr`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_IP, 80, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len)
    };
    (rc == 0)
        .then(|| SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port)))
}

/// Accepts on every listener, answers each connection with what it saw
/// (one line), records it and closes its end (10 000 client sockets and
/// as many accepted ones would not fit one process's descriptor limit).
struct Server {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(listeners: Vec<TcpListener>, dnat: TunnelDnat) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        for listener in &listeners {
            listener.set_nonblocking(true).unwrap();
        }
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let mut idle = true;
                for listener in &listeners {
                    while let Ok((mut stream, peer)) = listener.accept() {
                        idle = false;
                        stream.set_nonblocking(false).unwrap();
                        let record = Seen {
                            local: stream.local_addr().unwrap(),
                            peer,
                            original_dst: dnat.original_dst(&stream).unwrap(),
                            so_original_dst: so_original_dst(&stream),
                        };
                        // The client may be gone already (it only counts connects).
                        let _ = stream.write_all(record.line().as_bytes());
                        seen2.lock().unwrap().push(record);
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Self { stop, seen, thread: Some(thread) }
    }

    fn take(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().drain(..).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connect as a client sees it.
#[derive(Debug)]
struct Dialled {
    /// getpeername.
    peer: SocketAddr,
    /// The server's line: where it landed, original_dst, SO_ORIGINAL_DST.
    reply: String,
}

fn dial(addr: SocketAddr) -> std::io::Result<Dialled> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    Ok(Dialled { peer: stream.peer_addr()?, reply: reply.trim_end().to_string() })
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn mapped(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), port)
}

/// The namespaces, cgroups and pins of one case.
struct Stage {
    // Field order is drop order: the server and pins go before the cgroups.
    server: Option<Server>,
    pins: PinDir,
    client_cg: Cgroup,
    server_cg: Cgroup,
    root_cg: Cgroup,
    cloud: NetNs,
    pod: NetNs,
    _veth: VethPair,
}

impl Stage {
    fn new() -> Self {
        let cloud = NetNs::new().unwrap();
        let pod = NetNs::new().unwrap();
        let veth = VethPair::new((Some(&cloud), "eth0"), (Some(&pod), "eth0")).unwrap();
        cloud.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"]).unwrap();
        cloud.ip(&["link", "set", "eth0", "up"]).unwrap();
        for edge in [EDGE_A, EDGE_B, EDGE_POD, OTHER_POD] {
            cloud.ip(&["addr", "add", &format!("{edge}/32"), "dev", "lo"]).unwrap();
        }
        pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]).unwrap();
        pod.ip(&["link", "set", "eth0", "up"]).unwrap();
        pod.ip(&["route", "add", "default", "via", &NODE_IP.to_string()]).unwrap();
        let root_cg = Cgroup::new().unwrap();
        let server_cg = root_cg.child("server").unwrap();
        let client_cg = root_cg.child("client").unwrap();
        Self { server: None, pins: PinDir::new().unwrap(), client_cg, server_cg, root_cg, cloud, pod, _veth: veth }
    }

    fn options(&self) -> AttachOptions {
        AttachOptions {
            pin_dir: self.pins.path().to_path_buf(),
            cgroup: Some(self.root_cg.path().to_path_buf()),
            original_dst_cgroup: Some(self.server_cg.path().to_path_buf()),
        }
    }

    /// Attaches, sets the standard rules and edge set, starts the server.
    fn attach(&mut self, scope: Scope) -> TunnelDnat {
        let (mut dnat, outcomes) = TunnelDnat::load_or_attach(&self.options()).unwrap();
        assert_eq!(outcomes.len(), 6, "{outcomes:?}");
        assert!(outcomes.iter().all(|o| o.action == LinkAction::Created), "{outcomes:?}");
        self.cloud.run(|| dnat.set_target(NODE_IP, scope)).unwrap().unwrap();
        dnat.set_port_rules(RULES).unwrap();
        dnat.set_edge_nodes([EDGE_A, EDGE_B]).unwrap();
        self.start_server();
        dnat
    }

    fn start_server(&mut self) {
        // Tunnel listeners belong to T/server (getsockopt answers there);
        // edge stand-ins to no test cgroup at all.
        let tunnel = {
            let _in_server = self.server_cg.join().unwrap();
            self.cloud
                .run(|| {
                    [TLS_PORT, HTTP_PORT]
                        .map(|port| TcpListener::bind(v4(Ipv4Addr::UNSPECIFIED, port)).unwrap())
                        .into_iter()
                        .collect::<Vec<_>>()
                })
                .unwrap()
        };
        let mut listeners = tunnel;
        listeners.extend(
            self.cloud
                .run(|| {
                    let mut stand_ins = Vec::new();
                    for edge in [EDGE_A, EDGE_B, EDGE_POD, OTHER_POD, NODE_IP] {
                        for port in EDGE_PORTS {
                            stand_ins.push(TcpListener::bind(v4(edge, port)).unwrap());
                        }
                    }
                    stand_ins
                })
                .unwrap(),
        );
        let reader = TunnelDnat::open(self.pins.path()).unwrap();
        self.server = Some(Server::start(listeners, reader));
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// A connect from a client in the cloud node's host network.
    fn dial_host(&self, addr: SocketAddr) -> Dialled {
        let _in_client = self.client_cg.join().unwrap();
        self.cloud.run(|| dial(addr)).unwrap().unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// A connect from a client in the pod namespace.
    fn dial_pod(&self, addr: SocketAddr) -> Dialled {
        let _in_client = self.client_cg.join().unwrap();
        self.pod.run(|| dial(addr)).unwrap().unwrap_or_else(|e| panic!("connect from the pod to {addr}: {e}"))
    }
}

/// The reply line of a connection that reached the tunnel server with `orig`.
fn tunnel_reply(port: u16, orig: SocketAddr) -> String {
    let orig = match orig {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(a.ip().to_ipv4_mapped().unwrap(), a.port()),
    };
    format!("{} {orig} {orig}", v4(NODE_IP, port))
}

fn untouched_reply(addr: SocketAddr) -> String {
    format!("{addr} - -")
}

fn redirects_edge_ports_and_keeps_the_original_destination() {
    let mut stage = Stage::new();
    let dnat = stage.attach(Scope::HostNetwork);

    // IPv4, each rule: lands on its tunnel port; the client sees what it dialled.
    for (port, tunnel) in RULES {
        for edge in [EDGE_A, EDGE_B] {
            let addr = v4(edge, port);
            let got = stage.dial_host(addr);
            assert_eq!(got.reply, tunnel_reply(tunnel, addr), "connect to {addr}");
            assert_eq!(got.peer, addr, "getpeername after connecting to {addr}");
        }
    }
    // The same through a dual-stack socket (v4-mapped), getpeername6.
    let addr = mapped(EDGE_A, 10255);
    let got = stage.dial_host(addr);
    assert_eq!(got.reply, tunnel_reply(HTTP_PORT, addr));
    assert_eq!(got.peer, addr);

    // Not redirected: an unlisted port, a cloud node, loopback even when listed.
    for addr in [v4(EDGE_A, 9999), v4(NODE_IP, 10250), v4(NODE_IP, 8080)] {
        let got = stage.dial_host(addr);
        assert_eq!(got.reply, untouched_reply(addr));
        assert_eq!(got.peer, addr);
    }
    // UDP to a redirected edge port: connect() and the datagram go where they were aimed.
    let (peer, datagram) = stage
        .cloud
        .run(|| {
            let server = UdpSocket::bind(v4(EDGE_A, 10250)).unwrap();
            server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _in_client = stage.client_cg.join().unwrap();
            let client = UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            client.connect(v4(EDGE_A, 10250)).unwrap();
            client.send(b"udp").unwrap();
            let mut buf = [0u8; 8];
            let (n, _) = server.recv_from(&mut buf).unwrap();
            (client.peer_addr().unwrap(), buf[..n].to_vec())
        })
        .unwrap();
    assert_eq!(peer, v4(EDGE_A, 10250));
    assert_eq!(datagram, b"udp");

    // A pod's socket is left alone in host-network scope: it reaches the edge stand-in.
    let addr = v4(EDGE_A, 10250);
    assert_eq!(stage.dial_pod(addr).reply, untouched_reply(addr));
    // ...and redirected when pods are covered (to the node IP, reachable from the pod).
    let mut dnat = dnat;
    stage.cloud.run(|| dnat.set_target(NODE_IP, Scope::AllNamespaces)).unwrap().unwrap();
    let got = stage.dial_pod(addr);
    assert_eq!(got.reply, tunnel_reply(TLS_PORT, addr));
    assert_eq!(got.peer, addr);
    // The server saw the pod as the peer, not some rewritten address.
    let seen = stage.server().take();
    assert_eq!(seen.last().unwrap().peer.ip(), IpAddr::V4(POD_IP));

    // Counters: 10250 saw 2 host + 1 pod connects; 10255 2 + 1 mapped; 8080 2.
    let stats = dnat.stats().unwrap();
    let redirected: HashMap<u16, u64> = stats.rules.iter().map(|r| (r.port, r.redirected)).collect();
    assert_eq!(redirected, HashMap::from([(10250, 3), (10255, 3), (8080, 2)]), "{stats:?}");
    assert_eq!(stats.accepted_with_origin, 8);
    assert_eq!(stats.no_storage, 0);
    assert_eq!(stats.handshakes_pending, 0);
    assert_eq!(stats.target, Some(NODE_IP));
    assert_eq!(stats.scope, Scope::AllNamespaces);
    assert_eq!(stats.edge_nodes, vec![EDGE_A, EDGE_B]);
}

fn the_getsockopt_answer_is_only_for_the_tunnel_servers_cgroup_and_loopback_never_redirects() {
    let mut stage = Stage::new();
    let mut dnat = stage.attach(Scope::HostNetwork);
    // A listener on another tunnel port, outside T/server: it learns the
    // original destination through the API, but SO_ORIGINAL_DST is
    // answered only where the getsockopt program is attached.
    // (In T, so sockops covers its accepted sockets, but not in T/server.)
    let outsider = {
        let _in_t = stage.root_cg.join().unwrap();
        stage.cloud.run(|| TcpListener::bind(v4(Ipv4Addr::UNSPECIFIED, 10265)).unwrap()).unwrap()
    };
    dnat.set_port_rules([(10250, 10265)]).unwrap();
    let accept = std::thread::spawn(move || {
        let (stream, _) = outsider.accept().unwrap();
        stream
    });
    let addr = v4(EDGE_B, 10250);
    let client = {
        let _in_client = stage.client_cg.join().unwrap();
        stage.cloud.run(|| TcpStream::connect(addr).unwrap()).unwrap()
    };
    let accepted = accept.join().unwrap();
    assert_eq!(client.peer_addr().unwrap(), addr);
    let reader = TunnelDnat::open(stage.pins.path()).unwrap();
    assert_eq!(reader.original_dst(&accepted).unwrap(), Some(SocketAddrV4::new(EDGE_B, 10250)));
    assert_eq!(so_original_dst(&accepted), None, "answered outside the tunnel server's cgroup");
    // The client socket's own record is what it dialled.
    assert_eq!(reader.original_dst(&client).unwrap(), Some(SocketAddrV4::new(EDGE_B, 10250)));

    // Loopback listed as an edge node still passes untouched.
    dnat.set_edge_nodes([EDGE_A, EDGE_B, Ipv4Addr::LOCALHOST]).unwrap();
    let lo = stage.cloud.run(|| TcpListener::bind("127.0.0.1:10250").unwrap()).unwrap();
    let lo_accept = std::thread::spawn(move || lo.accept().map(|(s, _)| s.local_addr().unwrap()));
    let _in_client = stage.client_cg.join().unwrap();
    let stream = stage.cloud.run(|| TcpStream::connect("127.0.0.1:10250").unwrap()).unwrap();
    assert_eq!(lo_accept.join().unwrap().unwrap(), "127.0.0.1:10250".parse().unwrap());
    assert_eq!(stream.peer_addr().unwrap(), "127.0.0.1:10250".parse().unwrap());
}

fn edge_pod_subnets_redirect_the_pod_ips_inside_them() {
    let mut stage = Stage::new();
    let mut dnat = stage.attach(Scope::AllNamespaces);
    let (pod, other) = (v4(EDGE_POD, 8080), v4(OTHER_POD, 8080));
    assert_eq!(stage.dial_host(pod).reply, untouched_reply(pod), "no subnet yet");
    // Host bits are ignored: the subnet is what the map holds.
    let changes = dnat.set_edge_subnets(["10.244.7.1/24".parse().unwrap()]).unwrap();
    assert_eq!((changes.added, changes.removed), (1, 0));
    assert_eq!(stage.dial_host(pod).reply, tunnel_reply(HTTP_PORT, pod));
    assert_eq!(stage.dial_pod(pod).reply, tunnel_reply(HTTP_PORT, pod), "from a pod namespace");
    assert_eq!(stage.dial_pod(mapped(EDGE_POD, 8080)).reply, tunnel_reply(HTTP_PORT, pod), "v4-mapped");
    assert_eq!(stage.dial_host(other).reply, untouched_reply(other), "outside the subnet");
    let unruled = v4(EDGE_POD, 9999);
    assert_eq!(stage.dial_host(unruled).reply, untouched_reply(unruled), "a port no rule names");
    assert_eq!(stage.dial_host(v4(EDGE_A, 8080)).reply, tunnel_reply(HTTP_PORT, v4(EDGE_A, 8080)), "nodes still");
    let stats = dnat.stats().unwrap();
    assert_eq!(stats.edge_subnets, vec!["10.244.7.0/24".parse().unwrap()]);
    assert_eq!(stats.rules.iter().find(|r| r.port == 8080).unwrap().redirected, 4);
    // Another process's view, and a set that changes nothing.
    assert_eq!(TunnelDnat::open(stage.pins.path()).unwrap().stats().unwrap().edge_subnets, stats.edge_subnets);
    assert_eq!(dnat.set_edge_subnets(["10.244.7.0/24".parse().unwrap()]).unwrap(), Default::default());
    // The incremental calls, as a lease watch makes them.
    let net8: ipnet::Ipv4Net = "10.244.8.0/24".parse().unwrap();
    assert_eq!(dnat.add_edge_subnets([net8, net8]).unwrap().added, 1);
    assert_eq!(stage.dial_host(other).reply, tunnel_reply(HTTP_PORT, other));
    assert_eq!(dnat.remove_edge_subnets(["10.244.7.0/24".parse().unwrap()]).unwrap().removed, 1);
    assert_eq!(stage.dial_host(pod).reply, untouched_reply(pod));
    // Too many: refused whole, nothing changed.
    let many = (0..70_000u32).map(|i| ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (i << 8)), 24).unwrap());
    assert!(matches!(dnat.set_edge_subnets(many), Err(DnatError::TooManyEdgeSubnets { count: 70_000 })));
    assert_eq!(dnat.stats().unwrap().edge_subnets, vec![net8]);
}

fn rule_and_node_changes_apply_to_the_next_connect() {
    let mut stage = Stage::new();
    let mut dnat = stage.attach(Scope::HostNetwork);
    let addr = v4(EDGE_A, 8080);
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(HTTP_PORT, addr));
    // Rule removed: the next connect goes where it was aimed.
    let changes = dnat.set_port_rules([(10250, TLS_PORT), (10255, HTTP_PORT)]).unwrap();
    assert_eq!((changes.added, changes.updated, changes.removed), (0, 0, 1));
    assert_eq!(stage.dial_host(addr).reply, untouched_reply(addr));
    // Rule target changed: 10255 now to the TLS port; its counter carries on.
    let before = dnat.stats().unwrap().rules.iter().find(|r| r.port == 10255).unwrap().redirected;
    let changes = dnat.set_port_rules([(10250, TLS_PORT), (10255, TLS_PORT)]).unwrap();
    assert_eq!((changes.added, changes.updated, changes.removed), (0, 1, 0));
    let addr = v4(EDGE_B, 10255);
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(TLS_PORT, addr));
    let after = dnat.stats().unwrap().rules.iter().find(|r| r.port == 10255).unwrap().redirected;
    assert_eq!(after, before + 1);
    // Node removed: not redirected; added back: redirected.
    let changes = dnat.set_edge_nodes([EDGE_B]).unwrap();
    assert_eq!((changes.added, changes.removed), (0, 1));
    let addr = v4(EDGE_A, 10250);
    assert_eq!(stage.dial_host(addr).reply, untouched_reply(addr));
    let changes = dnat.set_edge_nodes([EDGE_A, EDGE_B]).unwrap();
    assert_eq!((changes.added, changes.removed), (1, 0));
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(TLS_PORT, addr));
    // One node out and back in by the incremental calls (what a watch event does).
    assert_eq!(dnat.remove_edge_nodes([EDGE_A, Ipv4Addr::new(10, 99, 9, 9)]).unwrap().removed, 1);
    assert_eq!(stage.dial_host(addr).reply, untouched_reply(addr));
    assert_eq!(dnat.add_edge_nodes([EDGE_A, EDGE_B]).unwrap().added, 1);
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(TLS_PORT, addr));
    // The same set again writes nothing.
    assert_eq!(dnat.set_edge_nodes([EDGE_B, EDGE_A]).unwrap(), Default::default());
    // Another process's view (a fresh open) sees the same state.
    let fresh = TunnelDnat::open(stage.pins.path()).unwrap();
    assert_eq!(fresh.stats().unwrap().rules, dnat.stats().unwrap().rules);
    // Bad input changes nothing.
    let many = (0..70_000u32).map(|i| Ipv4Addr::from(0x0a00_0000 + i));
    assert!(matches!(dnat.set_edge_nodes(many), Err(DnatError::TooManyEdgeNodes { count: 70_000 })));
    assert!(matches!(dnat.set_port_rules([(0, 10263)]), Err(DnatError::PortZero { .. })));
    assert!(matches!(
        stage.cloud.run(|| dnat.set_target(Ipv4Addr::LOCALHOST, Scope::AllNamespaces)).unwrap(),
        Err(DnatError::LoopbackTargetForPods { .. })
    ));
    assert_eq!(dnat.stats().unwrap().edge_nodes, vec![EDGE_A, EDGE_B]);
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(TLS_PORT, addr));

    // Detach: the next connect is not redirected, and the pins are gone.
    drop(stage.server.take());
    let removed = TunnelDnat::detach(stage.pins.path()).unwrap();
    assert_eq!(removed.len(), 6);
    assert!(!stage.pins.path().exists());
    let probe = stage.cloud.run(|| TcpListener::bind(v4(EDGE_A, 10250)).unwrap()).unwrap();
    let _in_client = stage.client_cg.join().unwrap();
    let stream = stage.cloud.run(|| TcpStream::connect(v4(EDGE_A, 10250)).unwrap()).unwrap();
    assert_eq!(probe.accept().unwrap().0.local_addr().unwrap(), v4(EDGE_A, 10250));
    drop(stream);
    assert!(matches!(TunnelDnat::open(stage.pins.path()), Err(DnatError::NotAttached { .. })));
}

fn connects_never_fail_across_restart_upgrade_and_a_recreated_cgroup() {
    let mut stage = Stage::new();
    let dnat = stage.attach(Scope::HostNetwork);
    let before: Vec<_> = link_infos(&stage);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    // The loop makes sockets all along: the process stays in T/client until it ends.
    let in_client = stage.client_cg.join().unwrap();
    let loop_thread = {
        let (stop, ok_count, failed) = (stop.clone(), ok.clone(), failed.clone());
        let path = stage.cloud.path();
        let handle = std::thread::spawn(move || {
            let ok = ok_count;
            enter_netns(&path);
            let addr = v4(EDGE_A, 10250);
            while !stop.load(Ordering::Relaxed) {
                match dial(addr) {
                    Ok(got) if got.reply == tunnel_reply(TLS_PORT, addr) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(got) => failed.lock().unwrap().push(format!("landed wrong: {}", got.reply)),
                    Err(err) => failed.lock().unwrap().push(err.to_string()),
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        handle
    };

    // "netd restarts": the handle goes away, and load_or_attach runs again.
    drop(dnat);
    let (dnat, outcomes) = TunnelDnat::load_or_attach(&stage.options()).unwrap();
    assert!(outcomes.iter().all(|o| o.action == LinkAction::Updated), "{outcomes:?}");
    // Same links (ids), new programs in them: the upgrade path.
    let after = link_infos(&stage);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.id, new.id);
        assert_ne!(old.prog_id, new.prog_id, "program not replaced");
    }
    // Rules and nodes survived in the pinned maps.
    assert_eq!(dnat.stats().unwrap().edge_nodes, vec![EDGE_A, EDGE_B]);
    let mid = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    // A second upgrade while connects run, by a real `netd-cloud dnat apply` process.
    let options = stage.options();
    let out = netd_dnat(
        stage.cloud.path().to_str().unwrap(),
        &[
            "apply",
            "--pin-dir",
            options.pin_dir.to_str().unwrap(),
            "--cgroup",
            stage.root_cg.path().to_str().unwrap(),
            "--original-dst-cgroup",
            stage.server_cg.path().to_str().unwrap(),
            "--target",
            &NODE_IP.to_string(),
            "--edge-nodes",
            &format!("{EDGE_A},{EDGE_B}"),
            "--ports",
            "10250=10263,10255=10264,8080=10264",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    loop_thread.join().unwrap();
    let failures = failed.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} connects failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(ok.load(Ordering::Relaxed) > mid && mid >= 20, "too few connects to prove anything");
    eprintln!("    {} connects across two program swaps, none failed", ok.load(Ordering::Relaxed));
    drop(in_client);

    // The tunnel server's cgroup is removed and made again (a service
    // restart does that): its getsockopt link is re-created there.
    drop(stage.server.take());
    let server_path = stage.server_cg.path().to_path_buf();
    std::fs::remove_dir(&server_path).unwrap();
    let (_, outcomes) = TunnelDnat::load_or_attach(&AttachOptions {
        original_dst_cgroup: Some(stage.root_cg.path().to_path_buf()),
        ..stage.options()
    })
    .unwrap();
    let getsockopt = outcomes.iter().find(|o| o.program == "dnat_getsockopt").unwrap();
    assert_eq!(getsockopt.action, LinkAction::Recreated, "{outcomes:?}");
    std::fs::create_dir(&server_path).unwrap();
    let (_, outcomes) = TunnelDnat::load_or_attach(&stage.options()).unwrap();
    let getsockopt = outcomes.iter().find(|o| o.program == "dnat_getsockopt").unwrap();
    assert_eq!(getsockopt.action, LinkAction::Recreated, "{outcomes:?}");
    stage.start_server();
    let addr = v4(EDGE_B, 10250);
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(TLS_PORT, addr));
    // No original-dst cgroup: that link goes, the rest stays.
    let (_, outcomes) =
        TunnelDnat::load_or_attach(&AttachOptions { original_dst_cgroup: None, ..stage.options() }).unwrap();
    let getsockopt = outcomes.iter().find(|o| o.program == "dnat_getsockopt").unwrap();
    assert_eq!(getsockopt.action, LinkAction::Removed);
    let got = stage.dial_host(addr);
    assert_eq!(got.reply, format!("{} {} -", v4(NODE_IP, TLS_PORT), SocketAddrV4::new(EDGE_B, 10250)));
}

/// Moves this (dedicated) thread into a namespace for the rest of its life.
fn enter_netns(path: &std::path::Path) {
    let ns = std::fs::File::open(path).unwrap();
    // SAFETY: setns on a namespace file we hold open; affects only this thread.
    assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

fn link_infos(stage: &Stage) -> Vec<netd::ebpf::sys::LinkInfo> {
    let mut infos = Vec::new();
    let mut names: Vec<_> =
        std::fs::read_dir(stage.pins.path().join("links")).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for path in names {
        let fd = netd::ebpf::sys::obj_get(&path).unwrap();
        infos.push(netd::ebpf::sys::link_info(&fd).unwrap());
    }
    infos
}

fn ten_thousand_concurrent_connects_each_keep_their_original_destination() {
    const CONNECTS: usize = 10_000;
    const CLIENTS: usize = 4;
    let mut stage = Stage::new();
    let mut dnat = stage.attach(Scope::HostNetwork);
    // 100 edge nodes, addresses on the cloud node's lo are not needed: every connect is redirected.
    let edges: Vec<Ipv4Addr> = (0..100u32).map(|i| Ipv4Addr::from(0x0a63_0100 + i)).collect();
    dnat.set_edge_nodes(edges.iter().copied()).unwrap();
    let dialled_of = |i: usize| v4(edges[i % edges.len()], if i.is_multiple_of(2) { 10250 } else { 10255 });

    let _in_client = stage.client_cg.join().unwrap();
    let path = stage.cloud.path();
    let per_client = CONNECTS / CLIENTS;
    let results: Vec<Vec<(TcpStream, SocketAddr)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let path = path.clone();
                scope.spawn(move || {
                    enter_netns(&path);
                    (0..per_client)
                        .map(|k| {
                            let dialled = dialled_of(client * per_client + k);
                            let stream = TcpStream::connect(dialled)
                                .unwrap_or_else(|e| panic!("connect {k} of client {client} to {dialled}: {e}"));
                            (stream, dialled)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let streams: Vec<(TcpStream, SocketAddr)> = results.into_iter().flatten().collect();
    assert_eq!(streams.len(), CONNECTS);
    // All open at once; each client's view and the server's agree.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stage.server().seen.lock().unwrap().len() < CONNECTS {
        assert!(Instant::now() < deadline, "server accepted only {}", stage.server().seen.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(10));
    }
    // A 4-tuple names a connection: one client port may serve both tunnel ports.
    let by_tuple: HashMap<(SocketAddr, SocketAddr), Seen> =
        stage.server().seen.lock().unwrap().iter().map(|seen| ((seen.peer, seen.local), seen.clone())).collect();
    assert_eq!(by_tuple.len(), CONNECTS);
    for (stream, dialled) in &streams {
        assert_eq!(stream.peer_addr().unwrap(), *dialled, "getpeername");
        let SocketAddr::V4(want) = dialled else { unreachable!() };
        let tunnel = v4(NODE_IP, if want.port() == 10250 { TLS_PORT } else { HTTP_PORT });
        let seen = &by_tuple[&(stream.local_addr().unwrap(), tunnel)];
        assert_eq!(seen.original_dst, Some(*want));
        assert_eq!(seen.so_original_dst, Some(*want));
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), tunnel_reply(if want.port() == 10250 { TLS_PORT } else { HTTP_PORT }, *dialled));
    }
    let stats = dnat.stats().unwrap();
    assert_eq!(stats.rules.iter().map(|r| r.redirected).sum::<u64>(), CONNECTS as u64);
    assert_eq!(stats.accepted_with_origin, CONNECTS as u64);
    assert_eq!(stats.handshakes_pending, 0, "handshake entries outlived their accept");
    drop(streams);
    stage.server().take();
    assert_eq!(dnat.stats().unwrap().handshakes_pending, 0);
}

fn refused_connects_leave_no_handshake_behind() {
    let mut stage = Stage::new();
    let mut dnat = stage.attach(Scope::HostNetwork);
    // A rule to a tunnel port nobody listens on: every connect is refused
    // (RST), so no server ever takes the handshake entry; the client's
    // close must drop it.
    dnat.set_port_rules([(10250, 10299)]).unwrap();
    let _in_client = stage.client_cg.join().unwrap();
    for _ in 0..200 {
        let err = stage.cloud.run(|| TcpStream::connect(v4(EDGE_A, 10250))).unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    let stats = dnat.stats().unwrap();
    assert_eq!(stats.rules[0].redirected, 200);
    assert_eq!(stats.handshakes_pending, 0, "refused connects left handshake entries");
}

fn without_bpf_capabilities_the_error_names_them() {
    let stage = Stage::new();
    let options = stage.options();
    let outcome = std::thread::spawn(move || {
        // Capabilities are per thread: drop every one on this thread only.
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header { version: 0x2008_0522, pid: 0 };
        let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
        // SAFETY: capset reads a valid v3 header and its two data records.
        assert_eq!(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) }, 0);
        (TunnelDnat::load_or_attach(&options).map(drop), TunnelDnat::open(&options.pin_dir).map(drop))
    })
    .join()
    .unwrap();
    for result in [outcome.0, outcome.1] {
        let err = result.unwrap_err();
        assert!(matches!(err, DnatError::MissingCapability { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("CAP_BPF") && message.contains("CAP_NET_ADMIN"), "{message}");
    }
    assert!(!stage.pins.path().exists(), "a refused attach left pins behind");
    // A child process without them (root, bounding set emptied): `netd-cloud dnat` says the same.
    let pin_dir = stage.pins.path().to_str().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", env!("CARGO_BIN_EXE_netd-cloud"), "dnat", "apply"])
        .args(["--pin-dir", pin_dir, "--target", "10.70.0.1", "--edge-nodes", "10.99.0.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("this thread lacks CAP_BPF and CAP_NET_ADMIN"), "{stderr}");
    assert!(!stage.pins.path().exists());
}

fn a_pinned_map_with_another_layout_is_refused_before_anything_attaches() {
    let stage = Stage::new();
    std::fs::create_dir_all(stage.pins.path()).unwrap();
    let pin = stage.pins.path().join("dnat_ports_v1");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args(["type", "hash", "key", "2", "value", "8", "entries", "16", "name", "dnat_ports_v1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let err = TunnelDnat::load_or_attach(&stage.options()).unwrap_err();
    assert!(matches!(err, DnatError::MapLayout { found_value: 8, value: 4, .. }), "{err:?}");
    assert!(err.to_string().contains("netd-cloud dnat detach"), "{err}");
    assert!(!stage.pins.path().join("links").join("dnat_connect4").exists());
}

/// `netd-cloud dnat …` run in the cloud node's network namespace (where "host
/// network" is). nsenter, not `ip netns exec`: that one remounts /sys, which
/// hides the cgroup v2 and bpffs mounts.
fn netd_dnat(netns_path: &str, args: &[&str]) -> std::process::Output {
    let net = format!("--net={netns_path}");
    let mut full = vec![net.as_str(), env!("CARGO_BIN_EXE_netd-cloud"), "dnat"];
    full.extend_from_slice(args);
    std::process::Command::new("nsenter").args(&full).output().unwrap()
}

fn the_command_line_applies_shows_and_detaches_and_a_bad_config_changes_nothing() {
    let mut stage = Stage::new();
    let pin_dir = stage.pins.path().to_str().unwrap().to_string();
    let cgroup = stage.root_cg.path().to_str().unwrap().to_string();
    let server_cgroup = stage.server_cg.path().to_str().unwrap().to_string();
    let netns = stage.cloud.path().to_str().unwrap().to_string();
    let apply = |extra: &[&str]| {
        let mut args =
            vec!["apply", "--pin-dir", &pin_dir, "--cgroup", &cgroup, "--original-dst-cgroup", &server_cgroup];
        args.extend_from_slice(extra);
        netd_dnat(&netns, &args)
    };
    let edges = format!("{EDGE_A},{EDGE_B}");
    let first =
        apply(&["--target", "10.70.0.1", "--edge-nodes", &edges, "--ports", "10250=10263,8080=10264", "--json"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let outcome: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(outcome["rules"]["added"], 2);
    assert_eq!(outcome["edgeNodes"]["added"], 2);
    assert!(outcome["links"].as_array().unwrap().iter().all(|l| l["action"] == "created"), "{outcome}");
    stage.start_server();
    let addr = v4(EDGE_A, 8080);
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(HTTP_PORT, addr));

    // The same again: links swapped in place, nothing else written.
    let again =
        apply(&["--target", "10.70.0.1", "--edge-nodes", &edges, "--ports", "10250=10263,8080=10264", "--json"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let outcome: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(outcome["rules"], serde_json::json!({ "added": 0, "updated": 0, "removed": 0 }));
    assert_eq!(outcome["edgeNodes"], serde_json::json!({ "added": 0, "updated": 0, "removed": 0 }));
    assert!(outcome["links"].as_array().unwrap().iter().all(|l| l["action"] == "updated"), "{outcome}");

    // A bad ConfigMap: refused with the token named, and the working rules stay.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("cfg.json");
    std::fs::write(&bad, r#"{"kind":"ConfigMap","data":{"dnat-ports-pair":"8080=10264,90x=10264"}}"#).unwrap();
    let refused = apply(&["--target", "10.70.0.1", "--edge-nodes", &edges, "--tunnel-config", bad.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(r#"dnat-ports-pair: token 2 "90x=10264""#) && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(stage.dial_host(addr).reply, tunnel_reply(HTTP_PORT, addr));

    // A good ConfigMap replaces the rules: 8080 goes, 9051 comes, 10255 is implied.
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"data":{"dnat-ports-pair":"9051=10264"}}"#).unwrap();
    let out = apply(&["--target", "10.70.0.1", "--edge-nodes", &edges, "--tunnel-config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let show = netd_dnat(&netns, &["show", "--pin-dir", &pin_dir, "--json"]);
    assert!(show.status.success(), "{}", String::from_utf8_lossy(&show.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let ports: Vec<u64> = shown["rules"].as_array().unwrap().iter().map(|r| r["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, vec![9051, 10250, 10255]);
    assert_eq!(shown["edgeNodes"], serde_json::json!([EDGE_A.to_string(), EDGE_B.to_string()]));
    assert_eq!(shown["target"], "10.70.0.1");
    assert_eq!(shown["links"].as_array().unwrap().len(), 6);
    // Counters, in the text format a textfile collector reads.
    let text = netd_dnat(&netns, &["show", "--pin-dir", &pin_dir, "--prometheus"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(r#"netd_dnat_redirected_total{port="9051",target_port="10264"} 0"#), "{text}");
    assert!(text.contains("netd_dnat_edge_nodes 2"), "{text}");
    // The daemon's /metrics carries the same counters when a DNAT is pinned.
    let daemon_text = netd::daemon::health::dnat_metrics(stage.pins.path());
    assert!(daemon_text.contains(r#"netd_dnat_redirected_total{port="10250",target_port="10263"}"#), "{daemon_text}");
    let human = String::from_utf8_lossy(&netd_dnat(&netns, &["show", "--pin-dir", &pin_dir]).stdout).into_owned();
    assert!(human.contains(":9051 -> :10264") && human.contains("link dnat_connect4"), "{human}");

    // Detach: nothing redirected, pins gone; a second detach is a no-op.
    drop(stage.server.take());
    let out = netd_dnat(&netns, &["detach", "--pin-dir", &pin_dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stage.pins.path().exists());
    let out = netd_dnat(&netns, &["detach", "--pin-dir", &pin_dir]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing pinned"));
    assert_eq!(netd::daemon::health::dnat_metrics(stage.pins.path()), "", "no DNAT, no DNAT metrics");
    let out = netd_dnat(&netns, &["show", "--pin-dir", &pin_dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `netd-cloud dnat apply` first"));
}

type Case = (&'static str, fn());

const CASES: &[Case] = &[
    (
        "redirects_edge_ports_and_keeps_the_original_destination",
        redirects_edge_ports_and_keeps_the_original_destination,
    ),
    (
        "the_getsockopt_answer_is_only_for_the_tunnel_servers_cgroup_and_loopback_never_redirects",
        the_getsockopt_answer_is_only_for_the_tunnel_servers_cgroup_and_loopback_never_redirects,
    ),
    ("rule_and_node_changes_apply_to_the_next_connect", rule_and_node_changes_apply_to_the_next_connect),
    ("edge_pod_subnets_redirect_the_pod_ips_inside_them", edge_pod_subnets_redirect_the_pod_ips_inside_them),
    (
        "connects_never_fail_across_restart_upgrade_and_a_recreated_cgroup",
        connects_never_fail_across_restart_upgrade_and_a_recreated_cgroup,
    ),
    (
        "ten_thousand_concurrent_connects_each_keep_their_original_destination",
        ten_thousand_concurrent_connects_each_keep_their_original_destination,
    ),
    ("refused_connects_leave_no_handshake_behind", refused_connects_leave_no_handshake_behind),
    ("without_bpf_capabilities_the_error_names_them", without_bpf_capabilities_the_error_names_them),
    (
        "the_command_line_applies_shows_and_detaches_and_a_bad_config_changes_nothing",
        the_command_line_applies_shows_and_detaches_and_a_bad_config_changes_nothing,
    ),
    (
        "a_pinned_map_with_another_layout_is_refused_before_anything_attaches",
        a_pinned_map_with_another_layout_is_refused_before_anything_attaches,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in CASES {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(name, _)| {
            filters.is_empty() || filters.iter().any(|f| if exact { name == f } else { name.contains(f.as_str()) })
        })
        .collect();
    // 10 000 client sockets open at once: the soft limit up to the hard one.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read or write one rlimit that outlives the call.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, case) in selected {
        if !cfg!(feature = "privileged-tests") {
            println!("test {name} ... ignored, needs root: cargo xtask test, or --features privileged-tests as root");
            continue;
        }
        let Some(_kernel) = testing::privileged().unwrap() else {
            println!("test {name} ... ignored (not root)");
            continue;
        };
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(case);
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("test {name} ... ok ({took:.2}s)"),
            Err(_) => {
                println!("test {name} ... FAILED ({took:.2}s)");
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        println!("\ntest result: ok");
    } else {
        println!("\nfailures: {failed:?}\ntest result: FAILED");
        std::process::exit(101);
    }
}
