//! `netd-cloud`: what runs on cloud nodes around the edge tunnel, and
//! nothing an edge node needs.
//!
//! Subcommands:
//! - `netd-cloud tunnel-server …`: the edge tunnel's server (see
//!   `netd::tunnel`): agents link in; kube-apiserver (HTTP CONNECT),
//!   DNAT'd clients and plain HTTP reach edge kubelets and pods through it.
//! - `netd-cloud dnat apply | show | detach`: the eBPF tunnel DNAT on a
//!   cloud node (see `netd::dnat`).
//! - `netd-cloud certs ca | node | server | client`: edge tunnel
//!   certificates as PEM files (see `netd::tunnel::certs`).
//!
//! Edge nodes run `netd` (daemon, CNI, hub, tunnel agent), which links none
//! of this: no tunnel server, no BPF loader, no certificate authority.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use netd::cmd::{init_logging, until_terminated, CommaList, LogArgs, TunnelCertArgs};
use netd::daemon::config::{parse_command_line, parse_duration};
use netd::dnat::config::PortRules;
use netd::ebpf::dnat::{TunnelDnat, DEFAULT_PIN_DIR};
use netd::tunnel::run::Listen;

const EXAMPLES: &str = "\
Examples:
  netd-cloud certs ca --out /etc/netd/tunnel-ca
  netd-cloud tunnel-server --cert-dir /etc/netd/tunnel --address 192.168.0.10
  netd-cloud dnat apply --target 192.168.0.10 --edge-nodes 10.0.5.7,10.0.5.8

`netd-cloud <COMMAND> --help` for a command's options.";

/// netd's cloud side: the edge tunnel's server, its eBPF DNAT, and the
/// certificates edge nodes and the API server present to it.
#[derive(Debug, Parser)]
#[command(name = "netd-cloud", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The eBPF tunnel DNAT of a cloud node.
    #[command(subcommand)]
    Dnat(DnatCommand),
    /// Edge tunnel certificates: a CA, and node, server and client certificates it issues.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The edge tunnel's server on a cloud node: agents link in, kube-apiserver and DNAT'd clients reach kubelets.
    #[command(after_help = TUNNEL_SERVER_EXAMPLES)]
    TunnelServer(Box<TunnelServerArgs>),
}

const DNAT_APPLY_EXAMPLES: &str = "\
Makes the kernel state exactly this: rules and edge nodes not named are removed.
Idempotent; only differences are written; live links get the new program code
atomically, so redirection never pauses.

Examples:
  netd-cloud dnat apply --target 192.168.0.10 --edge-nodes 10.0.5.7,10.0.5.8
  netd-cloud dnat apply --target 192.168.0.10 --edge-nodes 10.0.5.7 \\
      --ports 10250=10263,10255=10264,8080=10264 --pod-namespaces
  kubectl -n kube-system get cm edge-tunnel-server-cfg -o json > cfg.json
  netd-cloud dnat apply --target 192.168.0.10 --edge-nodes \"$EDGES\" --tunnel-config cfg.json \\
      --original-dst-cgroup /sys/fs/cgroup/system.slice/tunnel-server.service";

#[derive(Debug, Subcommand)]
enum DnatCommand {
    /// Attach (or upgrade) the programs; make target, rules and edge nodes exactly these.
    #[command(after_help = DNAT_APPLY_EXAMPLES)]
    Apply(DnatApplyArgs),
    /// Target, rules, edge nodes, counters and links.
    #[command(
        after_help = "Examples:\n  netd-cloud dnat show\n  netd-cloud dnat show --json\n  netd-cloud dnat show --prometheus"
    )]
    Show(DnatShowArgs),
    /// Detach the programs and remove their pins: nothing is redirected any more.
    Detach(DnatPinArgs),
}

type DnatPinArgs = netd::dnat::PinArgs;

#[derive(Debug, Args)]
struct DnatApplyArgs {
    #[command(flatten)]
    attach: netd::dnat::AttachArgs,
    /// Tunnel server address redirected connections go to.
    #[arg(long, env = "NETD_DNAT_TARGET", value_name = "IP")]
    target: Ipv4Addr,
    /// Edge node addresses, comma-separated ("" for none).
    #[arg(long, env = "NETD_DNAT_EDGE_NODES", value_name = "IP,...")]
    edge_nodes: CommaList<Ipv4Addr>,
    /// Edge pod subnets, comma-separated: connects to pod IPs inside them are redirected too.
    #[arg(long, env = "NETD_DNAT_EDGE_SUBNETS", value_name = "CIDR,...", default_value = "")]
    edge_subnets: CommaList<ipnet::Ipv4Net>,
    /// Port rules, dialled=tunnel, comma-separated [default: 10250=10263,10255=10264].
    #[arg(long, env = "NETD_DNAT_PORTS", value_name = "RULES", conflicts_with = "tunnel_config")]
    ports: Option<PortRules>,
    /// The rules from ConfigMap edge-tunnel-server-cfg (`kubectl get -o json`, or its data).
    #[arg(long, env = "NETD_DNAT_TUNNEL_CONFIG", value_name = "FILE")]
    tunnel_config: Option<PathBuf>,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DnatShowArgs {
    #[command(flatten)]
    pins: DnatPinArgs,
    /// One JSON object.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// The counters in Prometheus' text format.
    #[arg(long)]
    prometheus: bool,
}

fn dnat_apply(args: DnatApplyArgs) -> Result<()> {
    let rules = match (&args.ports, &args.tunnel_config) {
        (Some(rules), _) => rules.clone(),
        (None, Some(file)) => netd::dnat::rules_from_config_map_file(file)?,
        (None, None) => netd::dnat::config::from_tunnel_config(&Default::default())?,
    };
    let options = args.attach.attach_options();
    let desired = netd::dnat::Desired {
        target: args.target,
        scope: args.attach.scope(),
        edge_nodes: args.edge_nodes.0,
        edge_subnets: args.edge_subnets.0,
        rules,
    };
    let applied = netd::dnat::apply(&options, &desired)?;
    let changes = |c: netd::ebpf::dnat::Changes| format!("+{} ~{} -{}", c.added, c.updated, c.removed);
    if args.json {
        let outcome = serde_json::json!({
            "links": applied.links.iter().map(|l| serde_json::json!({
                "program": l.program, "action": l.action.as_str(), "id": l.link_id,
            })).collect::<Vec<_>>(),
            "rules": { "added": applied.rules.added, "updated": applied.rules.updated, "removed": applied.rules.removed },
            "edgeNodes": {
                "added": applied.edge_nodes.added, "updated": applied.edge_nodes.updated,
                "removed": applied.edge_nodes.removed,
            },
            "edgeSubnets": {
                "added": applied.edge_subnets.added, "updated": applied.edge_subnets.updated,
                "removed": applied.edge_subnets.removed,
            },
        });
        println!("{outcome}");
    } else {
        for link in &applied.links {
            println!("{}: {:?} (link {})", link.program, link.action, link.link_id);
        }
        println!(
            "rules {} ({}), edge nodes {} ({}), edge subnets {} ({}), target {} ({})",
            desired.rules,
            changes(applied.rules),
            desired.edge_nodes.len(),
            changes(applied.edge_nodes),
            desired.edge_subnets.len(),
            changes(applied.edge_subnets),
            desired.target,
            if args.attach.pod_namespaces { "all namespaces" } else { "host network" }
        );
    }
    Ok(())
}

fn dnat_show(args: DnatShowArgs) -> Result<()> {
    let dnat = TunnelDnat::open(&args.pins.pin_dir)?;
    let stats = dnat.stats()?;
    if args.prometheus {
        print!("{}", stats.render_prometheus());
    } else if args.json {
        println!("{}", netd::dnat::render_json(dnat.pin_dir(), &stats, &dnat.links()?));
    } else {
        print!("{}", netd::dnat::render_text(dnat.pin_dir(), &stats, &dnat.links()?));
    }
    Ok(())
}

fn dnat_detach(args: DnatPinArgs) -> Result<()> {
    let removed = TunnelDnat::detach(&args.pin_dir)?;
    if removed.is_empty() {
        println!("nothing pinned at {}", args.pin_dir.display());
    } else {
        println!("detached {} programs; {} removed", removed.len(), args.pin_dir.display());
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a new CA: DIR/ca.crt and DIR/ca.key (0600).
    #[command(
        after_help = "Example:\n  netd-cloud certs ca --out /etc/netd/tunnel-ca --cn netd-tunnel-ca --days 3650"
    )]
    Ca(CertsCaArgs),
    /// An edge node's tunnel agent certificate: CN=system:node:NAME, O=system:nodes, IP SANs.
    #[command(after_help = "Writes DIR/node.crt, DIR/node.key (0600) and DIR/ca.crt.\n\nExample:\n  \
        netd-cloud certs node --ca-dir /etc/netd/tunnel-ca --name edge-1 --ip 10.0.5.7 --out /etc/netd/tunnel")]
    Node(CertsNodeArgs),
    /// The tunnel server's certificate, with DNS and IP SANs.
    #[command(after_help = "Writes DIR/server.crt, DIR/server.key (0600) and DIR/ca.crt.\n\nExample:\n  \
        netd-cloud certs server --ca-dir /etc/netd/tunnel-ca --dns tunnel.kube-system.svc --ip 192.168.0.10 --out srv")]
    Server(CertsServerArgs),
    /// A client certificate, such as kube-apiserver's for its egress selector.
    #[command(after_help = "Writes DIR/client.crt, DIR/client.key (0600) and DIR/ca.crt.\n\nExample:\n  \
        netd-cloud certs client --ca-dir /etc/netd/tunnel-ca --cn kube-apiserver --out /etc/kubernetes/tunnel")]
    Client(CertsClientArgs),
}

#[derive(Debug, Args)]
struct CertsCaArgs {
    /// Directory to write ca.crt and ca.key to; an existing CA there is not replaced.
    #[arg(long, env = "NETD_CERTS_OUT", value_name = "DIR")]
    out: PathBuf,
    /// The CA's common name.
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME", default_value = "netd-tunnel-ca")]
    cn: String,
    /// Validity in days.
    #[arg(long, env = "NETD_CERTS_DAYS", value_name = "N", default_value_t = 3650)]
    days: u32,
}

#[derive(Debug, Args)]
struct CertsIssueArgs {
    /// Directory holding the CA's ca.crt and ca.key.
    #[arg(long, env = "NETD_CERTS_CA_DIR", value_name = "DIR")]
    ca_dir: PathBuf,
    /// Directory to write the certificate, its key and ca.crt to.
    #[arg(long, env = "NETD_CERTS_OUT", value_name = "DIR")]
    out: PathBuf,
    /// Validity in days (never beyond the CA's).
    #[arg(long, env = "NETD_CERTS_DAYS", value_name = "N", default_value_t = 365)]
    days: u32,
}

#[derive(Debug, Args)]
struct CertsNodeArgs {
    #[command(flatten)]
    issue: CertsIssueArgs,
    /// The Kubernetes node name (with --csr: taken from the request, and checked if given).
    #[arg(long, env = "NETD_CERTS_NODE", value_name = "NODE", required_unless_present = "csr")]
    name: Option<String>,
    /// The node's addresses, comma-separated (optional with --csr: the tunnel server also routes by lease).
    #[arg(long, env = "NETD_CERTS_IP", value_name = "IP,...", value_delimiter = ',', required_unless_present = "csr")]
    ip: Vec<std::net::IpAddr>,
    /// Sign this node's certificate signing request (netd-join writes it to
    /// /etc/netd/tunnel/node.csr) instead of making a key: writes only
    /// node.crt and ca.crt, the key stays on the node.
    #[arg(long, env = "NETD_CERTS_CSR", value_name = "FILE")]
    csr: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CertsServerArgs {
    #[command(flatten)]
    issue: CertsIssueArgs,
    /// The server's common name.
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME", default_value = "netd-tunnel-server")]
    cn: String,
    /// DNS names clients dial it by, comma-separated.
    #[arg(long, env = "NETD_CERTS_DNS", value_name = "NAME,...", value_delimiter = ',')]
    dns: Vec<String>,
    /// Addresses clients dial it by, comma-separated.
    #[arg(long, env = "NETD_CERTS_IP", value_name = "IP,...", value_delimiter = ',')]
    ip: Vec<std::net::IpAddr>,
}

#[derive(Debug, Args)]
struct CertsClientArgs {
    #[command(flatten)]
    issue: CertsIssueArgs,
    /// The client's common name (its user name to Kubernetes).
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME")]
    cn: String,
    /// Its organization (its group to Kubernetes).
    #[arg(long, env = "NETD_CERTS_ORG", value_name = "ORG")]
    org: Option<String>,
}

fn certs(command: CertsCommand) -> Result<()> {
    use netd::tunnel::certs::{CertificateAuthority, CA_KEY_FILE};
    let days = |n: u32| std::time::Duration::from_secs(u64::from(n) * 86_400);
    let (issue, stem, ca, cert) = match command {
        CertsCommand::Ca(args) => {
            if args.out.join(CA_KEY_FILE).exists() {
                bail!(
                    "{} exists: not replacing a CA (what it issued would stop verifying); remove it first",
                    args.out.join(CA_KEY_FILE).display()
                );
            }
            CertificateAuthority::generate(&args.cn, days(args.days))?.write(&args.out)?;
            println!("wrote {0}/ca.crt and {0}/ca.key: CN={1}, {2} days", args.out.display(), args.cn, args.days);
            return Ok(());
        }
        CertsCommand::Node(a) => {
            let ca = CertificateAuthority::load_dir(&a.issue.ca_dir)?;
            if let Some(csr) = &a.csr {
                return sign_node_csr(&ca, csr, &a, days(a.issue.days));
            }
            let Some(name) = &a.name else { bail!("--name is required without --csr") };
            let cert = ca.issue_node(name, &a.ip, days(a.issue.days))?;
            (a.issue, "node", ca, cert)
        }
        CertsCommand::Server(a) => {
            let ca = CertificateAuthority::load_dir(&a.issue.ca_dir)?;
            let cert = ca.issue_server(&a.cn, &a.dns, &a.ip, days(a.issue.days))?;
            (a.issue, "server", ca, cert)
        }
        CertsCommand::Client(a) => {
            let ca = CertificateAuthority::load_dir(&a.issue.ca_dir)?;
            let cert = ca.issue_client(&a.cn, a.org.as_deref(), days(a.issue.days))?;
            (a.issue, "client", ca, cert)
        }
    };
    let (cert_path, key_path) = cert.write(&issue.out, stem)?;
    ca.write_cert(&issue.out)?;
    println!("wrote {}, {} and {}/ca.crt", cert_path.display(), key_path.display(), issue.out.display());
    Ok(())
}

/// `netd-cloud certs node --csr`: signs what the node asked for; the key stays there.
fn sign_node_csr(
    ca: &netd::tunnel::certs::CertificateAuthority,
    csr: &std::path::Path,
    args: &CertsNodeArgs,
    validity: std::time::Duration,
) -> Result<()> {
    let text = std::fs::read_to_string(csr).with_context(|| format!("reading {}", csr.display()))?;
    let (node, cert_pem) = ca.sign_node_csr(&text, &args.ip, validity).with_context(|| csr.display().to_string())?;
    if let Some(name) = args.name.as_deref().filter(|name| *name != node) {
        bail!("{} asks for node {node:?}, not {name:?}: nothing written", csr.display());
    }
    let cert_path = args.issue.out.join("node.crt");
    netd::tunnel::certs::write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    ca.write_cert(&args.issue.out)?;
    println!(
        "signed {} for node {node}: wrote {} and {}/ca.crt",
        csr.display(),
        cert_path.display(),
        args.issue.out.display()
    );
    Ok(())
}

const TUNNEL_SERVER_EXAMPLES: &str = "\
Examples:
  netd-cloud certs server --ca-dir /etc/netd/ca --ip 192.168.0.10 --out /etc/netd/tunnel
  netd-cloud tunnel-server --cert-dir /etc/netd/tunnel --address 192.168.0.10
  netd-cloud tunnel-server --cert-dir /etc/netd/tunnel --connect-clients kube-apiserver,konnectivity-client \\
      --host-routing-sources 192.168.0.0/24 --dnat-listen ''";

#[derive(Debug, Args)]
struct TunnelServerArgs {
    #[command(flatten)]
    certs: TunnelCertArgs,
    /// The cloud node's address, which listeners given as a bare PORT bind [default: the default-route interface's].
    #[arg(long, env = "NETD_TUNNEL_ADDRESS", value_name = "IP")]
    address: Option<std::net::IpAddr>,
    /// Where agents link in (mutual TLS 1.3): IP:PORT, or PORT on --address.
    #[arg(long, env = "NETD_TUNNEL_AGENTS_LISTEN", value_name = "[IP:]PORT", default_value = "10262")]
    agents_listen: Listen,
    /// The HTTP CONNECT door for kube-apiserver's egress selector (TLS, a client certificate of --connect-clients).
    #[arg(long, env = "NETD_TUNNEL_CONNECT_LISTEN", value_name = "[IP:]PORT", default_value = "10265")]
    connect_listen: Listen,
    /// Common names of the client certificates the CONNECT door admits (never a node's: O=system:nodes is refused).
    #[arg(
        long,
        env = "NETD_TUNNEL_CONNECT_CLIENTS",
        value_name = "CN,...",
        value_delimiter = ',',
        default_value = netd::tunnel::identity::DEFAULT_CONNECT_CLIENT
    )]
    connect_clients: Vec<String>,
    /// The DNAT doors for kubelet's TLS, opened when a tunnel DNAT is pinned ("" for none).
    #[arg(long, env = "NETD_TUNNEL_DNAT_LISTEN", value_name = "[IP:]PORT,...", default_value = "10263")]
    dnat_listen: CommaList<Listen>,
    /// The HTTP door: DNAT'd connections (when pinned), and plain HTTP by Host from --host-routing-sources ("" for none).
    #[arg(long, env = "NETD_TUNNEL_HTTP_LISTEN", value_name = "[IP:]PORT", default_value = "10264")]
    http_listen: CommaList<Listen>,
    /// Source CIDRs whose plain HTTP the HTTP door routes by Host or absolute URI [default: none: off].
    #[arg(long, env = "NETD_TUNNEL_HOST_ROUTING_SOURCES", value_name = "CIDR,...", default_value = "")]
    host_routing_sources: CommaList<ipnet::IpNet>,
    /// Addresses never routed to an agent whatever a lease or certificate claims (cloud nodes), besides this host's own.
    #[arg(long, env = "NETD_TUNNEL_RESERVED", value_name = "CIDR,...", default_value = "")]
    reserved: CommaList<ipnet::IpNet>,
    /// Time a client has to finish its TLS handshake.
    #[arg(long, env = "NETD_TUNNEL_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    handshake_timeout: std::time::Duration,
    /// Time a client has to send a whole request head (CONNECT and HTTP doors).
    #[arg(long, env = "NETD_TUNNEL_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    header_timeout: std::time::Duration,
    /// Connections one door holds at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_CONNECTIONS", value_name = "N", default_value_t = netd::tunnel::limits::DEFAULT_MAX_CONNECTIONS_PER_DOOR)]
    max_connections: usize,
    /// Connections one source address holds on one door at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_CONNECTIONS_PER_SOURCE", value_name = "N", default_value_t = netd::tunnel::limits::DEFAULT_MAX_CONNECTIONS_PER_SOURCE)]
    max_connections_per_source: usize,
    /// Tunnelled connections one agent link carries at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_STREAMS_PER_AGENT", value_name = "N", default_value_t = netd::tunnel::limits::DEFAULT_MAX_STREAMS_PER_AGENT)]
    max_streams_per_agent: usize,
    /// Time an agent has to accept or refuse a stream before the client gets 504.
    #[arg(long, env = "NETD_TUNNEL_OPEN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    open_timeout: std::time::Duration,
    /// This replica's identity, unique among the replicas [default: the host name and the agents' port].
    #[arg(long, env = "NETD_TUNNEL_REPLICA_ID", value_name = "NAME")]
    replica_id: Option<String>,
    /// Replicas serving the fleet: every agent keeps a link to this many distinct ones (1-64); with a registry, the live replicas it lists replace this count once read.
    #[arg(long, env = "NETD_TUNNEL_REPLICAS", value_name = "N", default_value_t = 1)]
    replicas: u32,
    /// Where peer replicas reach this one's CONNECT door, announced in the registry so replicas forward to each other [default: the CONNECT door's address when it is a specific one].
    #[arg(long, env = "NETD_TUNNEL_PEER_ADDRESS", value_name = "HOST:PORT")]
    peer_address: Option<String>,
    /// How long this replica's registry record lives unless renewed (every third of it); peers forget a replica killed without a word this long after (at least 3s).
    #[arg(long, env = "NETD_TUNNEL_REPLICA_TTL", value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    replica_ttl: std::time::Duration,
    /// On SIGTERM, how long running streams may take to finish (listeners close at once, agents link elsewhere).
    #[arg(long, env = "NETD_TUNNEL_DRAIN_GRACE", value_name = "DURATION", value_parser = parse_duration, default_value = "25s")]
    drain_grace: std::time::Duration,
    /// Where the tunnel DNAT is pinned.
    #[arg(long, env = "NETD_DNAT_PIN_DIR", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    dnat_pin_dir: PathBuf,
    /// /metrics and /healthz (plain HTTP).
    #[arg(long, env = "NETD_TUNNEL_METRICS_LISTEN", value_name = "IP:PORT", default_value = "127.0.0.1:10266")]
    metrics_listen: std::net::SocketAddr,
    /// The registry whose leases route node addresses and pod IPs (none: the agents' certificate IPs only).
    #[command(flatten)]
    registry: netd::daemon::config::RegistryArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn tunnel_server(args: TunnelServerArgs) -> Result<()> {
    init_logging(args.log.log);
    raise_open_files_limit();
    let mut listens = vec![args.agents_listen, args.connect_listen];
    listens.extend(&args.dnat_listen.0);
    listens.extend(&args.http_listen.0);
    let address = match args.address {
        Some(address) => address,
        None if listens.iter().any(|l| l.is_port_only()) => {
            let underlay = netd::daemon::underlay::resolve_underlay(None, None).context(
                "the doors bind the cloud node's address, which comes from the default-route interface: \
                 there is none usable, so name it (--address IP) or give every listener as IP:PORT",
            )?;
            std::net::IpAddr::V4(underlay.public_ip)
        }
        // Every listener names its own address: this one is never used.
        None => std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    // This host's own addresses are never an edge node's, whatever a lease says.
    let mut reserved = args.reserved.0;
    let own = netd::netlink::Handle::new()
        .and_then(|mut handle| handle.address().list_all())
        .context("listing this host's addresses (they are never routed to an agent)")?;
    reserved.extend(own.into_iter().map(|a| ipnet::IpNet::from(std::net::IpAddr::V4(a.local))));
    let policy = netd::tunnel::server::ServerPolicy {
        connect_clients: netd::tunnel::identity::ConnectClients::new(args.connect_clients),
        host_routing_sources: args.host_routing_sources.0,
        reserved,
        limits: netd::tunnel::limits::Limits {
            handshake_timeout: args.handshake_timeout,
            header_timeout: args.header_timeout,
            max_connections_per_door: args.max_connections,
            max_connections_per_source: args.max_connections_per_source,
            max_streams_per_agent: args.max_streams_per_agent,
            open_timeout: args.open_timeout,
        },
        replica: netd::tunnel::server::ReplicaIdentity {
            id: match args.replica_id {
                Some(id) => id,
                None => default_replica_id(args.agents_listen.on(address).port())?,
            },
            replicas: args.replicas,
        },
    };
    let settings = netd::tunnel::run::ServerSettings {
        agents_listen: args.agents_listen.on(address),
        connect_listen: Some(args.connect_listen.on(address)),
        dnat_listen: args.dnat_listen.0.iter().map(|l| l.on(address)).collect(),
        http_listen: match args.http_listen.0.as_slice() {
            [] => None,
            [listen] => Some(listen.on(address)),
            more => bail!("--http-listen takes one [IP:]PORT, not {}", more.len()),
        },
        dnat_pin_dir: args.dnat_pin_dir,
        certs: netd::tunnel::certs::CertFiles::in_dir(&args.certs.cert_dir, "server"),
        metrics_listen: Some(args.metrics_listen),
        registry: tunnel_registry(args.registry)?,
        policy,
        drain_grace: args.drain_grace,
        peer_address: args.peer_address,
        replica_ttl: args.replica_ttl,
    };
    until_terminated("tunnel server", |stop| async move {
        Ok::<(), anyhow::Error>(netd::tunnel::run::run_server(settings, stop).await?)
    })
}

/// `<host name>-<agents' port>`: unique per host and port, which is what a
/// replica per cloud node (host network) or per pod (its own host name) is.
fn default_replica_id(agents_port: u16) -> Result<String> {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name for --replica-id")?;
    Ok(format!("{}-{agents_port}", host.trim()))
}

/// Raises this process's open-file limit to its hard limit: every door
/// connection and every agent link is a descriptor, and the doors' own caps
/// (not a default soft limit of 1 024) should be what bounds them.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads the struct we pass; raising the soft limit up
    // to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!("could not raise the open-file limit to {}", limit.rlim_max);
    }
}

/// The tunnel server's registry, if one is named.
fn tunnel_registry(
    args: netd::daemon::config::RegistryArgs,
) -> Result<Option<(netd::registry::RegistrySpec, netd::registry::OpenSettings)>> {
    let Some(spec) = args.registry else { return Ok(None) };
    if matches!(spec, netd::registry::RegistrySpec::Kubernetes(_)) && args.network.is_none() {
        netd::daemon::config::kubernetes_network_source().map_err(anyhow::Error::msg)?;
    }
    // The Kubernetes registry needs a node name (its own Node is never a
    // route); in a pod it is NODE_NAME, as for `netd run`, else the host name.
    let node_name = std::env::var("NODE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_lowercase())
        .unwrap_or_default();
    let open = netd::registry::OpenSettings {
        node_name,
        network: args.network,
        client_cert: args.client_cert.map(|cert| netd::kube::ClientCertFiles { cert, key: args.client_key }),
        token_file: args.token_file,
        ca_file: args.ca_file,
        poll: netd::registry::embedded::DEFAULT_POLL,
    };
    Ok(Some((spec, open)))
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = match cli.command {
        Command::Dnat(DnatCommand::Apply(args)) => dnat_apply(args),
        Command::Dnat(DnatCommand::Show(args)) => dnat_show(args),
        Command::Dnat(DnatCommand::Detach(args)) => dnat_detach(args),
        Command::Certs(command) => certs(command),
        Command::TunnelServer(args) => tunnel_server(*args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("netd-cloud: {error:#}");
            ExitCode::FAILURE
        }
    }
}
