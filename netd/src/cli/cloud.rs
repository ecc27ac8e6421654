//! `netd-cloud`'s command line: the tunnel server, the eBPF DNAT and the
//! tunnel certificates.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cmd::{CommaList, LogArgs, RuntimeArgs, TunnelCertArgs};
use crate::daemon::config::parse_duration;
use crate::dnat::config::PortRules;
use crate::ebpf::dnat::DEFAULT_PIN_DIR;
use crate::tunnel::run::Listen;

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
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// `netd-cloud`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
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

/// `netd-cloud dnat`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum DnatCommand {
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

/// Where the tunnel DNAT is pinned (`netd-cloud dnat show | detach`).
pub type DnatPinArgs = crate::dnat::PinArgs;

/// `netd-cloud dnat apply`'s options.
#[derive(Debug, Args)]
pub struct DnatApplyArgs {
    /// Where and how the programs attach.
    #[command(flatten)]
    pub attach: crate::dnat::AttachArgs,
    /// Tunnel server address redirected connections go to.
    #[arg(long, env = "NETD_DNAT_TARGET", value_name = "IP")]
    pub target: Ipv4Addr,
    /// Edge node addresses, comma-separated ("" for none).
    #[arg(long, env = "NETD_DNAT_EDGE_NODES", value_name = "IP,...")]
    pub edge_nodes: CommaList<Ipv4Addr>,
    /// Edge pod subnets, comma-separated: connects to pod IPs inside them are redirected too.
    #[arg(long, env = "NETD_DNAT_EDGE_SUBNETS", value_name = "CIDR,...", default_value = "")]
    pub edge_subnets: CommaList<ipnet::Ipv4Net>,
    /// Port rules, dialled=tunnel, comma-separated [default: 10250=10263,10255=10264].
    #[arg(long, env = "NETD_DNAT_PORTS", value_name = "RULES", conflicts_with = "tunnel_config")]
    pub ports: Option<PortRules>,
    /// The rules from ConfigMap edge-tunnel-server-cfg (`kubectl get -o json`, or its data).
    #[arg(long, env = "NETD_DNAT_TUNNEL_CONFIG", value_name = "FILE")]
    pub tunnel_config: Option<PathBuf>,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `netd-cloud dnat show`'s options.
#[derive(Debug, Args)]
pub struct DnatShowArgs {
    /// Where the DNAT is pinned.
    #[command(flatten)]
    pub pins: DnatPinArgs,
    /// One JSON object.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// The counters in Prometheus' text format.
    #[arg(long)]
    pub prometheus: bool,
}

/// `netd-cloud certs`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
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

/// `netd-cloud certs ca`'s options.
#[derive(Debug, Args)]
pub struct CertsCaArgs {
    /// Directory to write ca.crt and ca.key to; an existing CA there is not replaced.
    #[arg(long, env = "NETD_CERTS_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// The CA's common name.
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME", default_value = "netd-tunnel-ca")]
    pub cn: String,
    /// Validity in days.
    #[arg(long, env = "NETD_CERTS_DAYS", value_name = "N", default_value_t = 3650)]
    pub days: u32,
}

/// What every certificate the CA issues needs: the CA, the output directory, the validity.
#[derive(Debug, Args)]
pub struct CertsIssueArgs {
    /// Directory holding the CA's ca.crt and ca.key.
    #[arg(long, env = "NETD_CERTS_CA_DIR", value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// Directory to write the certificate, its key and ca.crt to.
    #[arg(long, env = "NETD_CERTS_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// Validity in days (never beyond the CA's).
    #[arg(long, env = "NETD_CERTS_DAYS", value_name = "N", default_value_t = 365)]
    pub days: u32,
}

/// `netd-cloud certs node`'s options.
#[derive(Debug, Args)]
pub struct CertsNodeArgs {
    /// The CA, the output directory and the validity.
    #[command(flatten)]
    pub issue: CertsIssueArgs,
    /// The Kubernetes node name (with --csr: taken from the request, and checked if given).
    #[arg(long, env = "NETD_CERTS_NODE", value_name = "NODE", required_unless_present = "csr")]
    pub name: Option<String>,
    /// The node's addresses, comma-separated (optional with --csr: the tunnel server also routes by lease).
    #[arg(long, env = "NETD_CERTS_IP", value_name = "IP,...", value_delimiter = ',', required_unless_present = "csr")]
    pub ip: Vec<std::net::IpAddr>,
    /// Sign this node's certificate signing request (netd-join writes it to
    /// /etc/netd/tunnel/node.csr) instead of making a key: writes only
    /// node.crt and ca.crt, the key stays on the node.
    #[arg(long, env = "NETD_CERTS_CSR", value_name = "FILE")]
    pub csr: Option<PathBuf>,
}

/// `netd-cloud certs server`'s options.
#[derive(Debug, Args)]
pub struct CertsServerArgs {
    /// The CA, the output directory and the validity.
    #[command(flatten)]
    pub issue: CertsIssueArgs,
    /// The server's common name.
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME", default_value = "netd-tunnel-server")]
    pub cn: String,
    /// DNS names clients dial it by, comma-separated.
    #[arg(long, env = "NETD_CERTS_DNS", value_name = "NAME,...", value_delimiter = ',')]
    pub dns: Vec<String>,
    /// Addresses clients dial it by, comma-separated.
    #[arg(long, env = "NETD_CERTS_IP", value_name = "IP,...", value_delimiter = ',')]
    pub ip: Vec<std::net::IpAddr>,
}

/// `netd-cloud certs client`'s options.
#[derive(Debug, Args)]
pub struct CertsClientArgs {
    /// The CA, the output directory and the validity.
    #[command(flatten)]
    pub issue: CertsIssueArgs,
    /// The client's common name (its user name to Kubernetes).
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME")]
    pub cn: String,
    /// Its organization (its group to Kubernetes).
    #[arg(long, env = "NETD_CERTS_ORG", value_name = "ORG")]
    pub org: Option<String>,
}

const TUNNEL_SERVER_EXAMPLES: &str = "\
Examples:
  netd-cloud certs server --ca-dir /etc/netd/ca --ip 192.168.0.10 --out /etc/netd/tunnel
  netd-cloud tunnel-server --cert-dir /etc/netd/tunnel --address 192.168.0.10
  netd-cloud tunnel-server --cert-dir /etc/netd/tunnel --connect-clients kube-apiserver,konnectivity-client \\
      --host-routing-sources 192.168.0.0/24 --dnat-listen ''";

/// `netd-cloud tunnel-server`'s options.
#[derive(Debug, Args)]
pub struct TunnelServerArgs {
    /// The server's certificate directory.
    #[command(flatten)]
    pub certs: TunnelCertArgs,
    /// The cloud node's address, which listeners given as a bare PORT bind [default: the default-route interface's].
    #[arg(long, env = "NETD_TUNNEL_ADDRESS", value_name = "IP")]
    pub address: Option<std::net::IpAddr>,
    /// Where agents link in (mutual TLS 1.3): IP:PORT, or PORT on --address.
    #[arg(long, env = "NETD_TUNNEL_AGENTS_LISTEN", value_name = "[IP:]PORT", default_value = "10262")]
    pub agents_listen: Listen,
    /// The HTTP CONNECT door for kube-apiserver's egress selector (TLS, a client certificate of --connect-clients).
    #[arg(long, env = "NETD_TUNNEL_CONNECT_LISTEN", value_name = "[IP:]PORT", default_value = "10265")]
    pub connect_listen: Listen,
    /// Common names of the client certificates the CONNECT door admits (never a node's: O=system:nodes is refused).
    #[arg(
        long,
        env = "NETD_TUNNEL_CONNECT_CLIENTS",
        value_name = "CN,...",
        value_delimiter = ',',
        default_value = crate::tunnel::identity::DEFAULT_CONNECT_CLIENT
    )]
    pub connect_clients: Vec<String>,
    /// The DNAT doors for kubelet's TLS, opened when a tunnel DNAT is pinned ("" for none).
    #[arg(long, env = "NETD_TUNNEL_DNAT_LISTEN", value_name = "[IP:]PORT,...", default_value = "10263")]
    pub dnat_listen: CommaList<Listen>,
    /// The HTTP door: DNAT'd connections (when pinned), and plain HTTP by Host from --host-routing-sources ("" for none).
    #[arg(long, env = "NETD_TUNNEL_HTTP_LISTEN", value_name = "[IP:]PORT", default_value = "10264")]
    pub http_listen: CommaList<Listen>,
    /// Source CIDRs whose plain HTTP the HTTP door routes by Host or absolute URI [default: none: off].
    #[arg(long, env = "NETD_TUNNEL_HOST_ROUTING_SOURCES", value_name = "CIDR,...", default_value = "")]
    pub host_routing_sources: CommaList<ipnet::IpNet>,
    /// Addresses never routed to an agent whatever a lease or certificate claims (cloud nodes), besides this host's own.
    #[arg(long, env = "NETD_TUNNEL_RESERVED", value_name = "CIDR,...", default_value = "")]
    pub reserved: CommaList<ipnet::IpNet>,
    /// Time a client has to finish its TLS handshake.
    #[arg(long, env = "NETD_TUNNEL_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: std::time::Duration,
    /// Time a client has to send a whole request head (CONNECT and HTTP doors).
    #[arg(long, env = "NETD_TUNNEL_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub header_timeout: std::time::Duration,
    /// Connections one door holds at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_CONNECTIONS", value_name = "N", default_value_t = crate::tunnel::limits::DEFAULT_MAX_CONNECTIONS_PER_DOOR)]
    pub max_connections: usize,
    /// Connections one source address holds on one door at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_CONNECTIONS_PER_SOURCE", value_name = "N", default_value_t = crate::tunnel::limits::DEFAULT_MAX_CONNECTIONS_PER_SOURCE)]
    pub max_connections_per_source: usize,
    /// Tunnelled connections one agent link carries at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_STREAMS_PER_AGENT", value_name = "N", default_value_t = crate::tunnel::limits::DEFAULT_MAX_STREAMS_PER_AGENT)]
    pub max_streams_per_agent: usize,
    /// Time an agent has to accept or refuse a stream before the client gets 504.
    #[arg(long, env = "NETD_TUNNEL_OPEN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub open_timeout: std::time::Duration,
    /// This replica's identity, unique among the replicas [default: the host name and the agents' port].
    #[arg(long, env = "NETD_TUNNEL_REPLICA_ID", value_name = "NAME")]
    pub replica_id: Option<String>,
    /// Replicas serving the fleet: every agent keeps a link to this many distinct ones (1-64); with a registry, the live replicas it lists replace this count once read.
    #[arg(long, env = "NETD_TUNNEL_REPLICAS", value_name = "N", default_value_t = 1)]
    pub replicas: u32,
    /// Where peer replicas reach this one's CONNECT door, announced in the registry so replicas forward to each other [default: the CONNECT door's address when it is a specific one].
    #[arg(long, env = "NETD_TUNNEL_PEER_ADDRESS", value_name = "HOST:PORT")]
    pub peer_address: Option<String>,
    /// How long this replica's registry record lives unless renewed (every third of it); peers forget a replica killed without a word this long after (at least 3s).
    #[arg(long, env = "NETD_TUNNEL_REPLICA_TTL", value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    pub replica_ttl: std::time::Duration,
    /// On SIGTERM, how long running streams may take to finish (listeners close at once, agents link elsewhere).
    #[arg(long, env = "NETD_TUNNEL_DRAIN_GRACE", value_name = "DURATION", value_parser = parse_duration, default_value = "25s")]
    pub drain_grace: std::time::Duration,
    /// Where the tunnel DNAT is pinned.
    #[arg(long, env = "NETD_DNAT_PIN_DIR", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub dnat_pin_dir: PathBuf,
    /// /metrics and /healthz (plain HTTP).
    #[arg(long, env = "NETD_TUNNEL_METRICS_LISTEN", value_name = "IP:PORT", default_value = "127.0.0.1:10266")]
    pub metrics_listen: std::net::SocketAddr,
    /// The registry whose leases route node addresses and pod IPs (none: the agents' certificate IPs only).
    #[command(flatten)]
    pub registry: crate::daemon::config::RegistryArgs,
    /// Threads of the async runtime.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Log level and format.
    #[command(flatten)]
    pub log: LogArgs,
}
