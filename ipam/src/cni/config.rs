//! The network configuration on stdin, with host-local's IPAM keys.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Range, RangeSet};
use ipnet::IpNet;
use serde::Deserialize;

use super::error::{code, CniError};
use super::version::{CniVersion, SUPPORTED};
use netd_model::subnet_env::{self, SubnetEnv, SubnetEnvError};

/// host-local's default data directory; netd's store sits beside
/// host-local's files (`<dataDir>/<network>/netd-ipam.db`) so the first ADD
/// after swapping `"type"` imports them.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// The store file inside `<dataDir>/<network>/`.
pub const STORE_FILE: &str = "netd-ipam.db";

#[derive(Debug, Deserialize)]
struct RawNetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    name: String,
    #[serde(default)]
    ipam: Option<RawIpam>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<RawPrevResult>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<RawAttachment>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    _type: String,
    subnet: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
    ranges: Option<Vec<Vec<RawRange>>>,
    routes: Option<Vec<RawRoute>>,
    data_dir: Option<String>,
    resolv_conf: Option<String>,
    /// netd: where to read `FLANNEL_SUBNET` when no range is configured.
    subnet_file: Option<String>,
    /// netd: seconds an ADD waits for a subnet file that does not exist yet.
    subnet_file_wait: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: String,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRoute {
    dst: String,
    gw: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawPrevResult {
    #[serde(default)]
    ips: Vec<RawPrevIp>,
}

#[derive(Debug, Deserialize)]
struct RawPrevIp {
    address: String,
}

#[derive(Debug, Deserialize)]
struct RawAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// A route handed back in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Gateway, or none for the interface's default.
    pub gw: Option<IpAddr>,
}

/// DNS settings read from `resolvConf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    /// `nameserver` lines.
    pub nameservers: Vec<String>,
    /// `domain`.
    pub domain: Option<String>,
    /// `search`.
    pub search: Vec<String>,
    /// `options`.
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set (the result then carries `"dns":{}`).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_none() && self.search.is_empty() && self.options.is_empty()
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    /// The config's `cniVersion`.
    pub version: CniVersion,
    /// The network name.
    pub name: String,
    /// `<dataDir>/<name>`: holds the store and, on migrated nodes, host-local's files.
    pub network_dir: PathBuf,
    /// One address is taken from each set.
    pub range_sets: Vec<RangeSet>,
    /// Routes for the result.
    pub routes: Vec<Route>,
    /// DNS for the result.
    pub dns: Dns,
    /// Addresses of `prevResult` (CHECK).
    pub prev_ips: Vec<IpNet>,
    /// `cni.dev/valid-attachments` (GC), if given.
    pub valid_attachments: Option<Vec<(String, String)>>,
}

impl IpamConfig {
    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.network_dir.join(STORE_FILE)
    }
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_NETWORK_CONFIG, msg, details)
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, CniError> {
    text.parse().map_err(|e| invalid(format!("{field}: {text:?} is not an IP address"), format!("{e}")))
}

fn parse_cidr(field: &str, text: &str) -> Result<IpNet, CniError> {
    text.parse().map_err(|e| invalid(format!("{field}: {text:?} is not a CIDR"), format!("{e}")))
}

/// Only the version, for reporting errors in the caller's version even when
/// the rest of the config is bad.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Sniff {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<Sniff>(stdin).ok().map(|s| s.cni_version).filter(|v| SUPPORTED.contains(&v.as_str()))
}

/// How long an ADD waits for a subnet file that does not exist yet, unless
/// `ipam.subnetFileWait` (seconds) says otherwise.
///
/// After a boot the kubelet starts every pod at once, before netd (a pod
/// itself) has written `/run/flannel/subnet.env`. flannel's plugin fails
/// such an ADD at once; the kubelet then retries the pod only after its
/// 10–15 s back-off, and the failed ADD leaves `cni0` without ports, whose
/// all-zero MAC fails the bridge plugin's next try too (two back-offs, ~30 s
/// of a reboot). Waiting here starts the pod as soon as netd has written
/// the file. A file that exists but is wrong still fails at once.
pub const SUBNET_FILE_WAIT: Duration = Duration::from_secs(20);

/// The longest `ipam.subnetFileWait`: below the kubelet's default
/// `--runtime-request-timeout` (2 min), which would otherwise abandon the
/// sandbox first.
pub const SUBNET_FILE_WAIT_MAX: Duration = Duration::from_secs(90);

/// How often a missing subnet file is looked for again.
const SUBNET_FILE_POLL: Duration = Duration::from_millis(50);

/// Which parts of the config a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// ADD: ranges must be valid; a subnet file not written yet is waited
    /// for (see [`SUBNET_FILE_WAIT`]).
    RangesWaiting,
    /// CHECK, STATUS: ranges must be valid now.
    Ranges,
    /// DEL, GC: only where the store is (a broken range must not block cleanup).
    StoreOnly,
}

/// Parses and validates the config on stdin.
pub fn parse(stdin: &[u8], needs: Needs) -> Result<IpamConfig, CniError> {
    let mut de = serde_json::Deserializer::from_slice(stdin);
    let raw: RawNetConf = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = if path == "." { String::new() } else { format!("{path}: ") };
        if inner.is_syntax() || inner.is_eof() {
            CniError::new(code::DECODING_FAILURE, "network configuration is not valid JSON", format!("{inner}"))
        } else {
            invalid(format!("{at}{inner}"), "network configuration has a field of the wrong type or is missing one")
        }
    })?;
    let version = CniVersion::parse(&raw.cni_version).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {:?}", raw.cni_version.chars().take(20).collect::<String>()),
            format!("this plugin supports {}", SUPPORTED.join(", ")),
        )
    })?;
    let err_version = version.as_str();
    let with_version = |e: CniError| e.in_version(err_version);
    if raw.name.is_empty() || raw.name.contains('/') || raw.name == "." || raw.name == ".." || raw.name.len() > 128 {
        return Err(with_version(invalid(
            format!("name: {:?} cannot name a network directory", raw.name.chars().take(40).collect::<String>()),
            "it must be non-empty, at most 128 bytes, without '/'",
        )));
    }
    let ipam = raw.ipam.ok_or_else(|| with_version(invalid("ipam: missing", "the IPAM section names the ranges")))?;
    let data_dir = data_dir(ipam.data_dir.as_deref()).map_err(with_version)?;
    let network_dir = data_dir.join(&raw.name);
    let prev_ips = raw
        .prev_result
        .map(|prev| {
            prev.ips
                .iter()
                .enumerate()
                .map(|(i, ip)| parse_cidr(&format!("prevResult.ips[{i}].address"), &ip.address))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(with_version)?
        .unwrap_or_default();
    let valid_attachments =
        raw.valid_attachments.map(|list| list.into_iter().map(|a| (a.container_id, a.ifname)).collect());
    let mut config = IpamConfig {
        version,
        name: raw.name,
        network_dir,
        range_sets: Vec::new(),
        routes: Vec::new(),
        dns: Dns::default(),
        prev_ips,
        valid_attachments,
    };
    if needs == Needs::StoreOnly {
        return Ok(config);
    }
    let wait = match needs {
        Needs::RangesWaiting => subnet_file_wait(ipam.subnet_file_wait).map_err(with_version)?,
        Needs::Ranges | Needs::StoreOnly => Duration::ZERO,
    };
    let (range_sets, flannel_network) = range_sets(&ipam, wait).map_err(with_version)?;
    config.range_sets = range_sets;
    config.routes = match &ipam.routes {
        Some(routes) => routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Ok(Route {
                    dst: parse_cidr(&format!("ipam.routes[{i}].dst"), &r.dst)?,
                    gw: r.gw.as_deref().map(|gw| parse_ip(&format!("ipam.routes[{i}].gw"), gw)).transpose()?,
                })
            })
            .collect::<Result<_, CniError>>()
            .map_err(with_version)?,
        // flannel's CNI plugin gives pods a route to the cluster network.
        None => flannel_network.map(|dst| vec![Route { dst, gw: None }]).unwrap_or_default(),
    };
    if let Some(path) = &ipam.resolv_conf {
        config.dns = read_resolv_conf(Path::new(path)).map_err(with_version)?;
    }
    Ok(config)
}

/// `ipam.dataDir`: absent means host-local's default; present, it must be
/// an absolute path. An empty or relative one would resolve against the
/// runtime's working directory (`"dataDir": ""` used to put the store in
/// `./<network>/`), which differs between kubelet, containerd and a shell,
/// so pods would silently lose their pins; it is refused instead.
pub(crate) fn data_dir(configured: Option<&str>) -> Result<PathBuf, CniError> {
    let Some(text) = configured else {
        return Ok(PathBuf::from(DEFAULT_DATA_DIR));
    };
    let shown = text.chars().take(80).collect::<String>();
    if text.trim().is_empty() {
        return Err(invalid(
            format!("ipam.dataDir: {shown:?} is empty"),
            format!(
                "give an absolute directory such as {DEFAULT_DATA_DIR:?}, or omit ipam.dataDir for that default; \
                 an empty path would put the store in the runtime's working directory"
            ),
        ));
    }
    let path = PathBuf::from(text);
    if !path.is_absolute() {
        return Err(invalid(
            format!("ipam.dataDir: {shown:?} is a relative path; it must be absolute"),
            "a relative path resolves against the runtime's working directory, which differs between callers",
        ));
    }
    Ok(path)
}

fn range_of(
    field: &str,
    subnet: &str,
    start: Option<&str>,
    end: Option<&str>,
    gw: Option<&str>,
) -> Result<Range, CniError> {
    let subnet = parse_cidr(&format!("{field}.subnet"), subnet)?;
    let start = start.map(|s| parse_ip(&format!("{field}.rangeStart"), s)).transpose()?;
    let end = end.map(|s| parse_ip(&format!("{field}.rangeEnd"), s)).transpose()?;
    let gw = gw.map(|s| parse_ip(&format!("{field}.gateway"), s)).transpose()?;
    Range::new(subnet, start, end, gw)
        .map_err(|e| invalid(format!("{field}: {e}"), "fix the range in the IPAM configuration"))
}

/// The range sets, and the flannel network when they came from subnet.env.
fn range_sets(ipam: &RawIpam, wait: Duration) -> Result<(Vec<RangeSet>, Option<IpNet>), CniError> {
    if let Some(ranges) = &ipam.ranges {
        if ipam.subnet.is_some() {
            return Err(CniError::new(
                code::INVALID_NETWORK_CONFIG,
                "ipam: both `ranges` and `subnet` are set",
                "use one of them (host-local refuses this too)",
            ));
        }
        if ranges.is_empty() {
            return Err(invalid("ipam.ranges: empty", "give at least one range set"));
        }
        let sets = ranges
            .iter()
            .enumerate()
            .map(|(i, set)| {
                let list = set
                    .iter()
                    .enumerate()
                    .map(|(j, r)| {
                        range_of(
                            &format!("ipam.ranges[{i}][{j}]"),
                            &r.subnet,
                            r.range_start.as_deref(),
                            r.range_end.as_deref(),
                            r.gateway.as_deref(),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                RangeSet::new(list).map_err(|e| invalid(format!("ipam.ranges[{i}]: {e}"), "fix the range set"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((sets, None));
    }
    if let Some(subnet) = &ipam.subnet {
        let range =
            range_of("ipam", subnet, ipam.range_start.as_deref(), ipam.range_end.as_deref(), ipam.gateway.as_deref())?;
        return Ok((vec![RangeSet::single(range)], None));
    }
    let path = PathBuf::from(ipam.subnet_file.as_deref().unwrap_or(subnet_env::DEFAULT_PATH));
    let env = read_subnet_file(&path, wait).map_err(|e| {
        invalid("ipam: no `ranges` or `subnet`, and the flannel subnet file cannot be used", super::error::chain(&e))
    })?;
    let range = Range::new(env.subnet.trunc(), None, None, Some(env.gateway()))
        .map_err(|e| invalid(format!("{}: FLANNEL_SUBNET: {e}", path.display()), "fix subnet.env"))?;
    Ok((vec![RangeSet::single(range)], Some(env.network)))
}

/// `ipam.subnetFileWait`: seconds, from 0 to [`SUBNET_FILE_WAIT_MAX`].
fn subnet_file_wait(configured: Option<f64>) -> Result<Duration, CniError> {
    let Some(seconds) = configured else { return Ok(SUBNET_FILE_WAIT) };
    if !(0.0..=SUBNET_FILE_WAIT_MAX.as_secs_f64()).contains(&seconds) {
        return Err(invalid(
            format!("ipam.subnetFileWait: {seconds} is out of range"),
            format!("give seconds from 0 to {}", SUBNET_FILE_WAIT_MAX.as_secs()),
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Reads the subnet file, waiting up to `wait` while it does not exist.
fn read_subnet_file(path: &Path, wait: Duration) -> Result<SubnetEnv, SubnetEnvError> {
    let deadline = Instant::now() + wait;
    loop {
        match SubnetEnv::read(path) {
            Err(SubnetEnvError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline =>
            {
                std::thread::sleep(SUBNET_FILE_POLL);
            }
            Err(SubnetEnvError::Io { path, action, source }) if source.kind() == std::io::ErrorKind::NotFound => {
                let action = if wait.is_zero() { action } else { "reading, after waiting for netd to write it," };
                return Err(SubnetEnvError::Io { path, action, source });
            }
            done => return done,
        }
    }
}

fn read_resolv_conf(path: &Path) -> Result<Dns, CniError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("ipam.resolvConf: cannot read {}", path.display()), e.to_string()))?;
    let mut dns = Dns::default();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with(';')) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(str::to_string)),
            Some("domain") => dns.domain = words.next().map(str::to_string),
            Some("search") => dns.search = words.map(str::to_string).collect(),
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    Ok(dns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ipam(ipam: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"1.0.0","name":"cbr0","ipam":{{"type":"netd-ipam"{ipam}}}}}"#).into_bytes()
    }

    #[test]
    fn data_dir_defaults_when_missing_and_must_be_absolute_when_given() {
        let missing = parse(&with_ipam(""), Needs::StoreOnly).unwrap();
        assert_eq!(missing.store_path(), Path::new("/var/lib/cni/networks/cbr0/netd-ipam.db"));
        let absolute = parse(&with_ipam(r#","dataDir":"/srv/cni""#), Needs::StoreOnly).unwrap();
        assert_eq!(absolute.store_path(), Path::new("/srv/cni/cbr0/netd-ipam.db"));
        for (value, needle) in [("", "is empty"), ("rel/dir", "is a relative path"), (".", "is a relative path")] {
            let err = parse(&with_ipam(&format!(r#","dataDir":"{value}""#)), Needs::StoreOnly).unwrap_err();
            assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
            assert_eq!(err.cni_version, "1.0.0");
            assert!(err.msg.starts_with(&format!("ipam.dataDir: {value:?} {needle}")), "{}", err.msg);
        }
    }
}
