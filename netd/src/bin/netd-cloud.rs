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

//!
//! The command line is `netd::cli::cloud` (clap; the CLI reference and man
//! pages are generated from it).

use std::net::Ipv4Addr;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use netd::cli::cloud::{
    CertsCommand, CertsNodeArgs, Cli, Command, DnatApplyArgs, DnatCommand, DnatPinArgs, DnatShowArgs, TunnelServerArgs,
};
use netd::cmd::{init_logging, until_terminated};
use netd::daemon::config::parse_command_line;
use netd::ebpf::dnat::TunnelDnat;

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

fn tunnel_server(args: TunnelServerArgs) -> Result<()> {
    init_logging(args.log.log, args.log.format.log_format);
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
    until_terminated("tunnel server", args.runtime, |stop| async move {
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
