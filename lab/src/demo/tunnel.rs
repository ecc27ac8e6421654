//! The demo's last chapter: the cloud reaches an edge node it has no route
//! to. A "cloud" namespace is linked to node-3 only as an edge node's uplink
//! is (192.168.61.1 ↔ 192.168.61.2, the tunnel benchmarks' stage,
//! [`crate::tunnel_lab`]): it has no route to node-3's address or to any pod
//! subnet, which a direct connect shows. Then, as on a cloud node: the
//! eBPF tunnel DNAT (node-3's address and pod subnet; 10250 → the DNAT door
//! 10263, the pods' metrics port → the HTTP door 10264) and the real
//! `netd-cloud tunnel-server`, which routes the pod subnet by node-3's
//! lease in the registry the nodes use; on node-3 the real `netd
//! tunnel-agent`, which dials out. `curl` in the cloud, in the DNAT's
//! cgroup, then fetches `/healthz` from a kubelet stand-in on node-3's
//! 10250 (TLS, its certificate verified end to end across the tunnel) and
//! `/metrics` from pod web-3 by the pod's IP.
//!
//! Everything the chapter makes is a guard dropped when it returns, on
//! failure too: processes, listeners, the DNAT's programs and pins, its
//! cgroups, the link and the cloud namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd::testing::{http_get, ChapterStage, NetNs, VethPair, WORKLOAD_METRICS_PORT};
use netd::tunnel::certs::{CertificateAuthority, IssuedCert};

use crate::bench::Listener;
use crate::tunnel_lab::{
    agent_args_for, client, server_args_for, start, v4, CloudDnat, TunnelCerts, AGENTS_PORT, AGENT_METRICS, CLOUD_IP,
    DNAT_PORT, EDGE_LINK_IP, HTTP_PORT, SERVER_METRICS,
};

/// The edge node of the chapter.
const EDGE: u8 = 3;
const KUBELET_PORT: u16 = 10250;
/// How long the tunnel may take to carry the first request (agent link,
/// the server reading the leases).
const READY: Duration = Duration::from_secs(15);

/// Runs the chapter on `stage` with the release binaries of `bin_dir`, then
/// says what it removed.
pub(super) fn chapter(stage: &mut ChapterStage<'_>, bin_dir: &Path) -> Result<()> {
    // Everything `run` makes drops when it returns, whatever it returns.
    run(stage, bin_dir)?;
    stage.say("tunnel processes stopped; the DNAT's programs, pins and cgroups and the cloud namespace removed");
    Ok(())
}

fn run(stage: &mut ChapterStage<'_>, bin_dir: &Path) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("netd-demo-tunnel-").tempdir()?;
    let d = dir.path();
    let netd = bin_dir.join("netd").to_string_lossy().into_owned();
    let netd_cloud = bin_dir.join("netd-cloud").to_string_lossy().into_owned();
    let (name, node_ip, subnet) = {
        let node = stage.node(EDGE)?;
        (node.name.clone(), node.public_ip(), node.subnet())
    };
    let (pod_name, pod_ip) = {
        let (pod, _, ip) = stage.pod(EDGE)?;
        (pod.to_string(), ip)
    };

    let cloud = NetNs::new()?;
    let _uplink = VethPair::new((Some(&cloud), "eth0"), (Some(&stage.node(EDGE)?.ns), "eth1"))?;
    cloud.ip(&["addr", "add", &format!("{CLOUD_IP}/24"), "dev", "eth0"])?;
    stage.node(EDGE)?.ns.ip(&["addr", "add", &format!("{EDGE_LINK_IP}/24"), "dev", "eth1"])?;
    stage.say(&format!(
        "the cloud: a namespace of its own, linked to {name} only as an edge uplink is ({CLOUD_IP} <-> {EDGE_LINK_IP})"
    ));
    stage.say("cloud$ ip route");
    stage.show(&cloud.ip(&["route"])?);

    // The edge's services: a kubelet stand-in on the node's address (TLS,
    // as kubelets serve 10250) and the pod's metrics on its own address.
    let certs = TunnelCerts::issue(&netd_cloud, d, &name, node_ip)?;
    let kubelet_cert = CertificateAuthority::load_dir(&certs.ca)?.issue_server(
        &name,
        &[],
        &[IpAddr::V4(node_ip)],
        Duration::from_secs(86_400),
    )?;
    let kubelet_addr = v4(node_ip, KUBELET_PORT);
    let _kubelet = kubelet_stand_in(&stage.node(EDGE)?.ns, kubelet_addr, &kubelet_cert)?;
    let pod_addr = v4(pod_ip, WORKLOAD_METRICS_PORT);
    let metrics = PodMetrics::default();
    let _pod_metrics = {
        let metrics = metrics.clone();
        let pod = pod_name.clone();
        Listener::start(stage.pod(EDGE)?.1, v4(Ipv4Addr::UNSPECIFIED, WORKLOAD_METRICS_PORT), move |stream| {
            metrics.serve(&pod, stream)
        })?
    };
    for (what, addr) in [(format!("{name}'s kubelet"), kubelet_addr), (format!("pod {pod_name}"), pod_addr)] {
        match cloud.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))? {
            Ok(_) => bail!("the cloud reached {addr} ({what}) without the tunnel: the demo's stage is wrong"),
            Err(err) => stage.say(&format!("cloud: connect {addr} ({what}) directly: {err}")),
        }
    }

    // The cloud side, as netd-controller and the tunnel server's DaemonSet
    // set it up on a cloud node.
    let rules = [(KUBELET_PORT, DNAT_PORT), (10255, HTTP_PORT), (WORKLOAD_METRICS_PORT, HTTP_PORT)];
    let mut dnat = CloudDnat::attach(&cloud, rules, [node_ip])?;
    dnat.dnat.set_edge_subnets([subnet])?;
    stage.say(&format!(
        "cloud: eBPF tunnel DNAT for {name} {node_ip} and its pod subnet {subnet}: \
         connects to :{KUBELET_PORT} go to the DNAT door :{DNAT_PORT}, to :{WORKLOAD_METRICS_PORT} to the HTTP door :{HTTP_PORT}"
    ));
    let mut server_args = server_args_for(&certs, &dnat.pins);
    server_args.extend(["--registry".to_string(), stage.registry_spec().to_string()]);
    let server = start(&cloud, Some(&dnat.server), d, "netd-tunnel-server", &netd_cloud, &server_args)?;
    // Listening before the agent dials: a refused first dial would cost
    // the agent its backoff (0.5 s) and say nothing about the tunnel.
    let up = Instant::now();
    while !http_get(&cloud, SERVER_METRICS, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        if up.elapsed() > READY {
            bail!("the tunnel server did not come up within {READY:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stage.say(&format!(
        "cloud: netd-cloud tunnel-server up in {} (agents :{AGENTS_PORT}; pod subnets routed by the leases in the nodes' registry)",
        ms(up.elapsed())
    ));
    let mut agent_args = agent_args_for(&certs, &[WORKLOAD_METRICS_PORT]);
    agent_args.extend(["--pod-subnet".to_string(), subnet.to_string()]);
    let started = Instant::now();
    let agent = start(&stage.node(EDGE)?.ns, None, d, "netd-tunnel-agent", &netd, &agent_args)?;
    let logs = || {
        let log = |file: &str| std::fs::read_to_string(d.join(file)).unwrap_or_default();
        format!(
            "tunnel server log:\n{}\ntunnel agent log:\n{}",
            log("netd-tunnel-server.log"),
            log("netd-tunnel-agent.log")
        )
    };
    let agent_metric = |name: &str| -> Option<f64> {
        let body = http_get(&stage.node(EDGE).ok()?.ns, AGENT_METRICS, "/metrics")?;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    while agent_metric("netd_tunnel_agent_links_up") != Some(1.0) {
        if started.elapsed() > READY {
            bail!("{name}'s tunnel agent did not link within {READY:?}\n{}", logs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stage.say(&format!(
        "{name}: netd tunnel-agent dialled out to {} and linked in {} (its certificate: CN=system:node:{name}, IP {node_ip})",
        v4(CLOUD_IP, AGENTS_PORT),
        ms(started.elapsed())
    ));

    // curl in the DNAT's client cgroup: its connects are redirected.
    let curl = |args: &[&str]| -> Result<String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        client(&cloud, &dnat.client, "curl", &args)
    };
    let ca = certs.ca.join("ca.crt").to_string_lossy().into_owned();
    let kubelet_url = format!("https://{kubelet_addr}/healthz");
    let (healthz, took) =
        retry(READY, || curl(&["-sS", "--max-time", "5", "--cacert", &ca, &kubelet_url])).with_context(logs)?;
    stage.say(&format!(
        "cloud$ curl --cacert ca.crt {kubelet_url}   ->  {:?} in {} (TLS to the stand-in, its certificate verified across the tunnel)",
        healthz.trim(),
        ms(took)
    ));
    let pod_url = format!("http://{pod_addr}/metrics");
    let (body, took) = retry(READY, || curl(&["-sS", "--max-time", "5", &pod_url])).with_context(logs)?;
    stage.say(&format!("cloud$ curl {pod_url}   ({pod_name} by its pod IP, fetched in {})", ms(took)));
    stage.show(&body);
    if !body.contains(&format!("pod=\"{pod_name}\"")) {
        bail!("{pod_url} answered something else than {pod_name}'s metrics: {body}");
    }

    let mut rules = dnat.dnat.stats()?.rules;
    rules.sort_by_key(|rule| rule.port);
    let redirected: Vec<String> = rules
        .iter()
        .filter(|rule| rule.redirected > 0)
        .map(|rule| format!(":{} -> :{} {}", rule.port, rule.target_port, rule.redirected))
        .collect();
    let streams = http_get(&cloud, SERVER_METRICS, "/metrics")
        .and_then(|body| {
            body.lines().find_map(|l| l.strip_prefix("netd_tunnel_streams_total ")?.trim().parse::<f64>().ok())
        })
        .unwrap_or(-1.0);
    stage.say(&format!(
        "connects the DNAT redirected: {}; streams the tunnel server opened on {name}'s link: {streams}",
        redirected.join(", ")
    ));
    drop((agent, server));
    Ok(())
}

/// Retries `attempt` until it succeeds or `limit` passes (the agent links
/// before the server has read the leases); its output and how long it took.
fn retry(limit: Duration, mut attempt: impl FnMut() -> Result<String>) -> Result<(String, Duration)> {
    let started = Instant::now();
    loop {
        let tried = Instant::now();
        match attempt() {
            Ok(out) => return Ok((out, tried.elapsed())),
            Err(err) if started.elapsed() > limit => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// A kubelet stand-in on `addr` in `ns`: TLS with `cert`, `GET /healthz`
/// answers `ok`, anything else 404; a thread per connection.
fn kubelet_stand_in(ns: &NetNs, addr: SocketAddr, cert: &IssuedCert) -> Result<Listener> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert_der().clone()], cert.key_der())?,
    );
    Listener::start(ns, addr, move |tcp| {
        let config = config.clone();
        std::thread::spawn(move || {
            let _ = serve_tls(config, tcp);
        });
    })
}

fn serve_tls(config: Arc<rustls::ServerConfig>, tcp: TcpStream) -> Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, tcp);
    let path = request_path(&mut tls)?;
    let (status, body) = if path == "/healthz" { ("200 OK", "ok") } else { ("404 Not Found", "404 page not found\n") };
    respond(&mut tls, status, body)?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

/// Reads a request head; its path.
fn request_path(stream: &mut impl std::io::Read) -> Result<String> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).context("no request line")?.to_string();
    while line.trim_end() != "" {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
    }
    Ok(path)
}

fn respond(stream: &mut impl Write, status: &str, body: &str) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(format!("{head}{body}").as_bytes())?;
    Ok(())
}

/// What pod web-3 serves on `/metrics`: its requests, and where this one
/// came from (the agent on its node dials the pod from the node's side of
/// the pod network, not from the cloud).
#[derive(Clone, Default)]
struct PodMetrics {
    requests: Arc<AtomicU64>,
}

impl PodMetrics {
    fn serve(&self, pod: &str, mut stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let client = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        let Ok(path) = request_path(&mut stream) else { return };
        if path != "/metrics" {
            let _ = respond(&mut stream, "404 Not Found", "404 page not found\n");
            return;
        }
        let requests = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let body = format!(
            "# HELP web_requests_total Requests for /metrics this pod has served.\n\
             # TYPE web_requests_total counter\n\
             web_requests_total{{pod=\"{pod}\"}} {requests}\n\
             # HELP web_client_info Where this request came from.\n\
             # TYPE web_client_info gauge\n\
             web_client_info{{pod=\"{pod}\",client=\"{client}\"}} 1\n"
        );
        let _ = respond(&mut stream, "200 OK", &body);
    }
}
