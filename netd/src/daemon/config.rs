//! Daemon settings: defaults, then a JSON config file, then `NETD_*`
//! environment variables, then command-line flags (later wins).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

pub use crate::registry::RegistrySpec;

/// Everything the daemon needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// This node's name.
    pub node_name: String,
    /// The registry.
    pub registry: RegistrySpec,
    /// Underlay interface; `None`: the default-route interface.
    pub iface: Option<String>,
    /// Public IP; `None`: the first IPv4 address of the interface.
    pub public_ip: Option<Ipv4Addr>,
    /// Cluster network, required for the Kubernetes registry (flannel's
    /// net-conf) and for creating an embedded registry.
    pub network: Option<Ipv4Net>,
    /// Install flannel's masquerade rules.
    pub masquerade: bool,
    /// Route peers on the same L2 directly.
    pub direct_routing: bool,
    /// Directory for the snapshot and the VTEP MAC store.
    pub state_dir: PathBuf,
    /// Where to write flannel's subnet.env.
    pub subnet_env: PathBuf,
    /// Health, readiness and metrics listener.
    pub health_addr: SocketAddr,
    /// Bearer token file for the Kubernetes registry.
    pub token_file: Option<PathBuf>,
    /// CA bundle for the Kubernetes registry.
    pub ca_file: Option<PathBuf>,
}

/// The config file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileConfig {
    node_name: Option<String>,
    registry: Option<String>,
    iface: Option<String>,
    public_ip: Option<Ipv4Addr>,
    network: Option<Ipv4Net>,
    masquerade: Option<bool>,
    direct_routing: Option<bool>,
    state_dir: Option<PathBuf>,
    subnet_env: Option<PathBuf>,
    health_addr: Option<SocketAddr>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

/// Usage text of `netd run`.
pub const RUN_USAGE: &str = "\
netd run [options]            run the per-node daemon (also: NETD_<OPTION> env, --config FILE)
  --config FILE               JSON file with any of the keys below in camelCase
  --node-name NAME            node name (default: NODE_NAME env, else the hostname)
  --registry SPEC             embedded[:PATH] | etcd:URL[,URL…] | kubernetes[:URL]
                              (default: embedded:/var/lib/netd/registry.db)
  --iface NAME                underlay interface (default: the default-route interface)
  --public-ip IP              public IP (default: the interface's first IPv4 address)
  --network CIDR              cluster network (required with kubernetes)
  --masquerade                install flannel's masquerade rules (nftables)
  --direct-routing            route peers on the same L2 without VXLAN
  --state-dir DIR             snapshot and VTEP MAC store (default: /var/lib/netd)
  --subnet-env FILE           flannel's subnet.env (default: /run/flannel/subnet.env)
  --health-addr ADDR          /healthz, /readyz, /metrics (default: 127.0.0.1:9617)
  --token-file FILE           bearer token for kubernetes:URL
  --ca-file FILE              CA bundle for kubernetes:URL
";

impl DaemonConfig {
    /// Built from `args` (after `run`), the environment and the config file.
    pub fn from_args(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut flags: Vec<(String, Option<String>)> = Vec::new();
        let mut config_file = env("NETD_CONFIG").map(PathBuf::from);
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg.strip_prefix("--").ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            let is_switch = matches!(name, "masquerade" | "direct-routing");
            let value = if is_switch || inline.is_some() {
                inline
            } else {
                Some(it.next().ok_or_else(|| format!("--{name} needs a value"))?.clone())
            };
            if name == "config" {
                config_file = value.map(PathBuf::from);
            } else {
                flags.push((name.to_string(), value));
            }
        }
        let file = match &config_file {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut c = Self {
            node_name: file.node_name.unwrap_or_default(),
            registry: match file.registry {
                Some(r) => r.parse()?,
                None => RegistrySpec::Embedded(crate::registry::embedded::DEFAULT_PATH.into()),
            },
            iface: file.iface,
            public_ip: file.public_ip,
            network: file.network,
            masquerade: file.masquerade.unwrap_or(false),
            direct_routing: file.direct_routing.unwrap_or(false),
            state_dir: file.state_dir.unwrap_or_else(|| "/var/lib/netd".into()),
            subnet_env: file.subnet_env.unwrap_or_else(|| crate::subnet_env::DEFAULT_PATH.into()),
            health_addr: file.health_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9617))),
            token_file: file.token_file,
            ca_file: file.ca_file,
        };
        let names = [
            "node-name",
            "registry",
            "iface",
            "public-ip",
            "network",
            "masquerade",
            "direct-routing",
            "state-dir",
            "subnet-env",
            "health-addr",
            "token-file",
            "ca-file",
        ];
        for name in names {
            let var = format!("NETD_{}", name.to_uppercase().replace('-', "_"));
            if let Some(value) = env(&var) {
                c.set(name, Some(value)).map_err(|e| format!("{var}: {e}"))?;
            }
        }
        for (name, value) in flags {
            if !names.contains(&name.as_str()) {
                return Err(format!("unknown option --{name}"));
            }
            c.set(&name, value).map_err(|e| format!("--{name}: {e}"))?;
        }
        if c.node_name.is_empty() {
            c.node_name = env("NODE_NAME").filter(|n| !n.is_empty()).unwrap_or_else(hostname);
        }
        c.check()?;
        Ok(c)
    }

    fn set(&mut self, name: &str, value: Option<String>) -> Result<(), String> {
        let text = value.clone().unwrap_or_default();
        let flag = |v: Option<String>| match v.as_deref() {
            None | Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(format!("{other:?} is not a boolean")),
        };
        match name {
            "node-name" => self.node_name = text,
            "registry" => self.registry = text.parse()?,
            "iface" => self.iface = Some(text),
            "public-ip" => self.public_ip = Some(text.parse().map_err(|_| format!("{text:?} is not an IPv4 address"))?),
            "network" => self.network = Some(text.parse().map_err(|_| format!("{text:?} is not an IPv4 CIDR"))?),
            "masquerade" => self.masquerade = flag(value)?,
            "direct-routing" => self.direct_routing = flag(value)?,
            "state-dir" => self.state_dir = text.into(),
            "subnet-env" => self.subnet_env = text.into(),
            "health-addr" => self.health_addr = text.parse().map_err(|_| format!("{text:?} is not ADDR:PORT"))?,
            "token-file" => self.token_file = Some(text.into()),
            "ca-file" => self.ca_file = Some(text.into()),
            _ => return Err(format!("unknown option {name}")),
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return Err(format!("node name {:?} must be 1-253 characters", self.node_name));
        }
        if let Some(iface) = &self.iface {
            if iface.is_empty() || iface.len() > 15 {
                return Err(format!("interface name {iface:?} must be 1-15 bytes"));
            }
        }
        if matches!(self.registry, RegistrySpec::Kubernetes(_)) && self.network.is_none() {
            return Err("the kubernetes registry needs --network (flannel's net-conf Network)".into());
        }
        Ok(())
    }

    /// The offline snapshot's path.
    pub fn snapshot_path(&self) -> PathBuf {
        self.state_dir.join("snapshot.json")
    }

    /// The VTEP MAC store's path.
    pub fn mac_store_path(&self) -> PathBuf {
        self.state_dir.join("vtep-mac.db")
    }
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_slice(&text);
    serde_path_to_error::deserialize(de)
        .map_err(|e| format!("config file {}: at `{}`: {}", path.display(), e.path(), e.inner()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_override_env_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("netd.json");
        std::fs::write(&file, r#"{"nodeName":"from-file","iface":"eth9","masquerade":true,"futureKey":1}"#).unwrap();
        let env = |k: &str| match k {
            "NETD_IFACE" => Some("eth1".to_string()),
            "NETD_CONFIG" => Some(file.display().to_string()),
            _ => None,
        };
        let c =
            DaemonConfig::from_args(&args(&["--iface", "eth2", "--registry=etcd:http://127.0.0.1:2379"]), env).unwrap();
        assert_eq!(c.node_name, "from-file");
        assert_eq!(c.iface.as_deref(), Some("eth2"));
        assert!(c.masquerade);
        assert_eq!(c.registry, RegistrySpec::Etcd(vec!["http://127.0.0.1:2379".into()]));
        let c = DaemonConfig::from_args(&[], env).unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth1"));
    }

    #[test]
    fn bad_settings_get_precise_errors() {
        let none = |_: &str| None;
        let err = |a: &[&str]| DaemonConfig::from_args(&args(a), none).unwrap_err();
        assert!(err(&["--bogus", "1"]).contains("unknown option --bogus"));
        assert!(err(&["--public-ip", "300.1.1.1"]).contains("not an IPv4 address"));
        assert!(err(&["--registry", "zookeeper:x"]).contains("unknown registry"));
        assert!(err(&["--registry", "kubernetes"]).contains("needs --network"));
        assert!(err(&["--iface"]).contains("needs a value"));
        assert!(err(&["--masquerade=maybe"]).contains("not a boolean"));
        assert!(err(&["--iface", "a-very-long-interface-name"]).contains("1-15 bytes"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.json");
        std::fs::write(&file, r#"{"masquerade":"yes"}"#).unwrap();
        assert!(err(&["--config", file.to_str().unwrap()]).contains("at `masquerade`"));
    }
}
