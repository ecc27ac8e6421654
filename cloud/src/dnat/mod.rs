//! netd's side of the tunnel DNAT: the port configuration (`config`), and
//! what `netd-cloud dnat apply | show | detach` do with it. The BPF programs and
//! their loader are `netd_ebpf::dnat`.

pub mod config;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use netd_ebpf::dnat::{AttachOptions, Changes, DnatError, DnatStats, LinkOutcome, PinnedLink, Scope, TunnelDnat};

use self::config::{ConfigError, PortRules};

/// Where the tunnel DNAT's links and maps are pinned: the option every
/// command that opens them shares.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct PinArgs {
    /// Where the links and maps are pinned (on bpffs).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_DNAT_PIN_DIR", value_name = "DIR", default_value = netd_ebpf::dnat::DEFAULT_PIN_DIR))]
    pub pin_dir: PathBuf,
}

/// How the tunnel DNAT is attached: the options of `netd-cloud dnat apply` and
/// `netd-controller run` (which drives the same pinned maps).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct AttachArgs {
    /// The pin directory.
    #[cfg_attr(feature = "clap", command(flatten))]
    pub pins: PinArgs,
    /// Also redirect sockets in pod network namespaces; also =true|false.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_DNAT_POD_NAMESPACES", value_name = "BOOL", value_parser = netd_model::parse_bool,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false"))]
    pub pod_namespaces: bool,
    /// The cgroup v2 directory whose sockets are redirected [default: the cgroup v2 root].
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_DNAT_CGROUP", value_name = "DIR"))]
    pub cgroup: Option<PathBuf>,
    /// The tunnel server's cgroup, where getsockopt(SO_ORIGINAL_DST) is answered.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_DNAT_ORIGINAL_DST_CGROUP", value_name = "DIR"))]
    pub original_dst_cgroup: Option<PathBuf>,
}

impl AttachArgs {
    /// The loader's options.
    pub fn attach_options(&self) -> AttachOptions {
        AttachOptions {
            pin_dir: self.pins.pin_dir.clone(),
            cgroup: self.cgroup.clone(),
            original_dst_cgroup: self.original_dst_cgroup.clone(),
        }
    }

    /// Which sockets are redirected.
    pub fn scope(&self) -> Scope {
        if self.pod_namespaces {
            Scope::AllNamespaces
        } else {
            Scope::HostNetwork
        }
    }
}

/// Errors of `netd-cloud dnat`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel side.
    #[error(transparent)]
    Dnat(#[from] DnatError),
    /// A bad port configuration; nothing was changed.
    #[error("{0}; nothing was changed")]
    Config(#[from] ConfigError),
    /// The tunnel configuration file could not be read.
    #[error("reading the tunnel configuration {path} failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tunnel configuration file is not a ConfigMap or its data.
    #[error("tunnel configuration {path}: {reason}; nothing was changed")]
    NotAConfigMap {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the port rules from a file holding ConfigMap
/// `kube-system/edge-tunnel-server-cfg` as `kubectl get -o json` prints it,
/// or just its `data` object.
pub fn rules_from_config_map_file(path: &Path) -> Result<PortRules, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let not = |reason: String| Error::NotAConfigMap { path: path.to_path_buf(), reason };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| not(format!("not JSON ({e})")))?;
    let data = match value.get("data") {
        Some(data) => data,
        None if value.get("kind").is_some() => &serde_json::Value::Object(Default::default()),
        None => &value,
    };
    let object = data.as_object().ok_or_else(|| not("`data` is not an object".into()))?;
    let mut strings = BTreeMap::new();
    for (key, value) in object {
        let text = value.as_str().ok_or_else(|| not(format!("`data.{key}` is not a string")))?;
        strings.insert(key.clone(), text.to_string());
    }
    Ok(config::from_tunnel_config(&strings)?)
}

/// What `netd-cloud dnat apply` asks for: the whole desired state.
#[derive(Debug, Clone)]
pub struct Desired {
    /// Tunnel server address.
    pub target: Ipv4Addr,
    /// Which sockets are redirected.
    pub scope: Scope,
    /// Edge node addresses.
    pub edge_nodes: Vec<Ipv4Addr>,
    /// Edge pod subnets.
    pub edge_subnets: Vec<Ipv4Net>,
    /// Port rules.
    pub rules: PortRules,
}

/// What `apply` changed.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Per program: attached, swapped, re-created, removed.
    pub links: Vec<LinkOutcome>,
    /// Port rule changes.
    pub rules: Changes,
    /// Edge node changes.
    pub edge_nodes: Changes,
    /// Edge subnet changes.
    pub edge_subnets: Changes,
}

/// Makes the kernel state `desired`: programs loaded and their links
/// (re)attached, then target, rules and nodes written as differences.
/// Everything is validated before the first change.
pub fn apply(options: &AttachOptions, desired: &Desired) -> Result<Applied, Error> {
    if desired.target.is_unspecified() {
        return Err(DnatError::UnspecifiedTarget.into());
    }
    if desired.scope == Scope::AllNamespaces && desired.target.is_loopback() {
        return Err(DnatError::LoopbackTargetForPods { target: desired.target }.into());
    }
    let (mut dnat, links) = TunnelDnat::load_or_attach(options)?;
    dnat.set_target(desired.target, desired.scope)?;
    let rules = dnat.set_port_rules(desired.rules.iter())?;
    let edge_nodes = dnat.set_edge_nodes(desired.edge_nodes.iter().copied())?;
    let edge_subnets = dnat.set_edge_subnets(desired.edge_subnets.iter().copied())?;
    Ok(Applied { links, rules, edge_nodes, edge_subnets })
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::HostNetwork => "host-network",
        Scope::AllNamespaces => "all-namespaces",
    }
}

/// One line naming the first 20 of `items`.
fn list_some<T: std::fmt::Display>(out: &mut String, what: &str, items: &[T]) {
    let shown: Vec<String> = items.iter().take(20).map(T::to_string).collect();
    let more = items.len().saturating_sub(shown.len());
    let _ = write!(out, "{what} ({}): {}", items.len(), shown.join(", "));
    if more > 0 {
        let _ = write!(out, " … and {more} more (--json lists all)");
    }
    out.push('\n');
}

/// `netd-cloud dnat show`: for people.
pub fn render_text(pin_dir: &Path, stats: &DnatStats, links: &[PinnedLink]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "tunnel DNAT pinned at {}", pin_dir.display());
    match stats.target {
        Some(target) => {
            let _ = writeln!(out, "target {target}, sockets: {}", scope_name(stats.scope));
        }
        None => out.push_str("target not set: nothing is redirected\n"),
    }
    let _ = writeln!(out, "rules ({}):", stats.rules.len());
    for rule in &stats.rules {
        let _ = writeln!(out, "  :{} -> :{}  redirected {}", rule.port, rule.target_port, rule.redirected);
    }
    list_some(&mut out, "edge nodes", &stats.edge_nodes);
    list_some(&mut out, "edge subnets", &stats.edge_subnets);
    let _ = writeln!(
        out,
        "handshakes pending {}, connections open {}, accepted with their origin {}, not redirected for want of a \
         record {}, handshake map full {}",
        stats.handshakes_pending,
        stats.connections_open,
        stats.accepted_with_origin,
        stats.no_storage,
        stats.handshake_full
    );
    for link in links {
        let cgroup = if link.info.cgroup_id == 0 { " (cgroup gone)".to_string() } else { String::new() };
        let _ = writeln!(out, "link {} id {} prog {}{cgroup}", link.program, link.info.id, link.info.prog_id);
    }
    out
}

/// `netd-cloud dnat show --json`.
pub fn render_json(pin_dir: &Path, stats: &DnatStats, links: &[PinnedLink]) -> serde_json::Value {
    serde_json::json!({
        "pinDir": pin_dir,
        "target": stats.target.map(|t| t.to_string()),
        "scope": scope_name(stats.scope),
        "rules": stats.rules.iter().map(|r| serde_json::json!({
            "port": r.port, "targetPort": r.target_port, "redirected": r.redirected,
        })).collect::<Vec<_>>(),
        "edgeNodes": stats.edge_nodes.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>(),
        "edgeSubnets": stats.edge_subnets.iter().map(Ipv4Net::to_string).collect::<Vec<_>>(),
        "handshakesPending": stats.handshakes_pending,
        "connectionsOpen": stats.connections_open,
        "acceptedWithOrigin": stats.accepted_with_origin,
        "noStorage": stats.no_storage,
        "handshakeFull": stats.handshake_full,
        "links": links.iter().map(|l| serde_json::json!({
            "program": l.program, "id": l.info.id, "progId": l.info.prog_id, "cgroupId": l.info.cgroup_id,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use netd_ebpf::dnat::RuleStats;

    fn stats() -> DnatStats {
        DnatStats {
            target: Some(Ipv4Addr::new(10, 0, 0, 1)),
            scope: Scope::HostNetwork,
            rules: vec![RuleStats { port: 10250, target_port: 10263, redirected: 7 }],
            edge_nodes: vec![Ipv4Addr::new(10, 0, 5, 1)],
            edge_subnets: vec!["10.244.7.0/24".parse().unwrap(), "10.244.8.0/24".parse().unwrap()],
            handshakes_pending: 0,
            connections_open: 0,
            dialled_unsent: 0,
            accepted_with_origin: 7,
            no_storage: 0,
            handshake_full: 0,
        }
    }

    #[test]
    fn prometheus_text_has_one_series_per_rule() {
        let text = stats().render_prometheus();
        assert!(text.contains("netd_dnat_redirected_total{port=\"10250\",target_port=\"10263\"} 7\n"), "{text}");
        assert!(text.contains("# TYPE netd_dnat_edge_nodes gauge\nnetd_dnat_edge_nodes 1\n"), "{text}");
        assert!(text.contains("netd_dnat_edge_subnets 2\n"), "{text}");
        let shown = render_text(Path::new("/sys/fs/bpf/netd"), &stats(), &[]);
        assert!(shown.contains("edge subnets (2): 10.244.7.0/24, 10.244.8.0/24\n"), "{shown}");
    }

    #[test]
    fn config_map_files_in_both_shapes_and_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let whole = write(
            "cm.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"edge-tunnel-server-cfg"},
                "data":{"dnat-ports-pair":"8080=10264"}}"#,
        );
        let rules = rules_from_config_map_file(&whole).unwrap();
        assert_eq!(rules.to_string(), "8080=10264,10250=10263,10255=10264");
        let data_only = write("data.json", r#"{"https-proxy-ports":"9443"}"#);
        assert_eq!(rules_from_config_map_file(&data_only).unwrap().get(9443), Some(10263));
        let no_data = write("empty.json", r#"{"kind":"ConfigMap","metadata":{}}"#);
        assert_eq!(rules_from_config_map_file(&no_data).unwrap().len(), 2);
        for (name, text, needle) in [
            ("garbage.json", "{not json", "not JSON"),
            ("number.json", r#"{"data":{"dnat-ports-pair":8080}}"#, "`data.dnat-ports-pair` is not a string"),
            ("list.json", r#"{"data":[1]}"#, "`data` is not an object"),
            ("bad.json", r#"{"data":{"dnat-ports-pair":"8080=10263"}}"#, "nothing was changed"),
        ] {
            let err = rules_from_config_map_file(&write(name, text)).unwrap_err().to_string();
            assert!(err.contains(needle), "{name}: {err}");
        }
        let missing = rules_from_config_map_file(&dir.path().join("absent.json")).unwrap_err();
        assert!(matches!(missing, Error::Read { .. }));
    }
}
