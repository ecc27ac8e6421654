//! The `netd-ipam` CNI IPAM plugin: ADD, DEL, CHECK, VERSION, STATUS, GC.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::{Error as IpamError, PodRef, Reclaimed, State, Store};

use super::config::{self, IpamConfig, Needs};
use super::error::{chain, code, CniError};
use super::result;
use super::version;

/// The plugin's inputs from the environment (CNI_* variables).
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS` (`K=V;K=V`).
    pub args: Option<String>,
}

impl Invocation {
    /// Reads the CNI_* variables of this process.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }
}

fn env_error(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENVIRONMENT, msg, details)
}

/// Container IDs as the CNI spec allows them: non-empty, alphanumerics,
/// `_`, `.`, `-`, starting with an alphanumeric.
fn container_id(inv: &Invocation) -> Result<&str, CniError> {
    let id = inv.container_id.as_deref().ok_or_else(|| env_error("CNI_CONTAINERID is not set", ""))?;
    let valid = id.len() <= 256
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(env_error(
            "CNI_CONTAINERID is invalid",
            "it must start with a letter or digit and hold only letters, digits, '_', '.', '-' (at most 256)",
        ));
    }
    Ok(id)
}

/// Interface names as Linux allows them.
fn ifname(inv: &Invocation) -> Result<&str, CniError> {
    let name = inv.ifname.as_deref().ok_or_else(|| env_error("CNI_IFNAME is not set", ""))?;
    let valid = name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if !valid {
        return Err(env_error(
            format!("CNI_IFNAME {:?} is not a valid interface name", name.chars().take(20).collect::<String>()),
            "at most 15 bytes, no '/', ':' or whitespace",
        ));
    }
    Ok(name)
}

/// The pod identity from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
pub fn pod_from_args(args: Option<&str>) -> Result<PodRef, CniError> {
    let lookup = |key: &str| {
        args.unwrap_or_default()
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .filter(|v| !v.is_empty())
    };
    let missing = |key: &str| {
        env_error(
            format!("missing pod identity: CNI_ARGS has no {key}"),
            "netd-ipam pins addresses to pods; the runtime must pass K8S_POD_NAMESPACE and K8S_POD_NAME",
        )
    };
    let namespace = lookup("K8S_POD_NAMESPACE").ok_or_else(|| missing("K8S_POD_NAMESPACE"))?;
    let name = lookup("K8S_POD_NAME").ok_or_else(|| missing("K8S_POD_NAME"))?;
    PodRef::new(namespace, name).map_err(|e| env_error(format!("invalid pod identity in CNI_ARGS: {e}"), ""))
}

/// Maps a store error to the CNI code a runtime acts on.
fn store_error(err: &IpamError) -> CniError {
    let code = match err {
        IpamError::Exhausted { .. } => code::POOL_EXHAUSTED,
        IpamError::Pool(_) | IpamError::DuplicateFamily(_) => code::INVALID_NETWORK_CONFIG,
        IpamError::Sql { source: rusqlite_err, .. } if is_busy(rusqlite_err) => code::TRY_AGAIN_LATER,
        IpamError::MacSpaceExhausted { .. } => code::INTERNAL,
        _ => code::IO_FAILURE,
    };
    CniError::new(code, err.to_string(), chain(err))
}

fn is_busy(err: &(dyn std::error::Error + 'static)) -> bool {
    let text = err.to_string();
    text.contains("database is locked") || text.contains("database is busy")
}

fn open_store(config: &IpamConfig) -> Result<Store, CniError> {
    let mut store = Store::open(config.store_path()).map_err(|e| store_error(&e))?;
    // Migration from host-local: adopt its reservations once, on first use.
    if !config.range_sets.is_empty() {
        store.import_host_local_once(&config.network_dir, &config.range_sets).map_err(|e| store_error(&e))?;
    }
    Ok(store)
}

/// Runs one plugin invocation; `Ok` holds what to print on stdout. Log
/// lines (a pin reclaimed under pressure) go to this process's stderr, as
/// CNI plugins log; see [`run_with_log`].
pub fn run(inv: &Invocation, stdin: &[u8]) -> Result<String, CniError> {
    run_with_log(inv, stdin, &mut std::io::stderr())
}

/// [`run`], writing log lines to `log` instead of stderr.
pub fn run_with_log(inv: &Invocation, stdin: &[u8], log: &mut dyn Write) -> Result<String, CniError> {
    let version = config::sniff_version(stdin).unwrap_or_else(|| version::NEWEST.to_string());
    run_inner(inv, stdin, log).map_err(|e| if e.cni_version == version::NEWEST { e.in_version(&version) } else { e })
}

fn run_inner(inv: &Invocation, stdin: &[u8], log: &mut dyn Write) -> Result<String, CniError> {
    let command = inv.command.as_deref().ok_or_else(|| env_error("CNI_COMMAND is not set", ""))?;
    match command {
        "VERSION" => Ok(version::version_json()),
        "ADD" => add(inv, stdin, log),
        "DEL" => del(inv, stdin),
        "CHECK" => check(inv, stdin),
        "STATUS" => status(stdin),
        "GC" => gc(stdin),
        other => Err(env_error(
            format!("unknown CNI_COMMAND {:?}", other.chars().take(20).collect::<String>()),
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    }
}

fn add(inv: &Invocation, stdin: &[u8], log: &mut dyn Write) -> Result<String, CniError> {
    let config = config::parse(stdin, Needs::RangesWaiting)?;
    let container = container_id(inv)?;
    let ifname = ifname(inv)?;
    let pod = pod_from_args(inv.args.as_deref())?;
    let mut store = open_store(&config)?;
    let done = store.allocate_or_reclaim(&config.range_sets, &pod, container, ifname).map_err(|e| store_error(&e))?;
    for reclaimed in &done.reclaimed {
        // The runtime shows a plugin's stderr in its logs; a failed write
        // there must not fail an ADD that has already committed.
        let _ = writeln!(log, "{}", reclaim_log_line(&config.name, &pod, reclaimed));
    }
    Ok(result::render(config.version, &config.range_sets, &done.allocations, &config.routes, &config.dns))
}

/// The stderr line saying which pod lost its pin, and why.
pub fn reclaim_log_line(network: &str, new_pod: &PodRef, reclaimed: &Reclaimed) -> String {
    format!(
        "netd-ipam: network {network}: pool {} is full: reclaimed {} from pod {} ({}), released {} ago, the \
         longest-released pin, for new pod {new_pod}; {} now gets a new address when it comes back",
        reclaimed.range_set,
        reclaimed.ip,
        reclaimed.pod,
        reclaimed.ifname,
        human_duration(reclaimed.released_for),
        reclaimed.pod,
    )
}

/// `3d4h`, `2h5m`, `4m12s`, `850ms`: short enough for a log line.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

fn del(inv: &Invocation, stdin: &[u8]) -> Result<String, CniError> {
    let config = config::parse(stdin, Needs::StoreOnly)?;
    let container = container_id(inv)?;
    let ifname = ifname(inv)?;
    // Nothing was ever allocated on this network: nothing to release, and no
    // reason to create directories.
    if !Path::new(&config.store_path()).exists() {
        return Ok(String::new());
    }
    let mut store = Store::open(config.store_path()).map_err(|e| store_error(&e))?;
    store.release(container, ifname).map_err(|e| store_error(&e))?;
    Ok(String::new())
}

fn check(inv: &Invocation, stdin: &[u8]) -> Result<String, CniError> {
    let config = config::parse(stdin, Needs::Ranges)?;
    if !config.version.has_check() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CHECK is not defined for cniVersion {}", config.version.as_str()),
            "CHECK exists from 0.4.0 on",
        ));
    }
    let container = container_id(inv)?;
    let ifname = ifname(inv)?;
    let store = open_store(&config)?;
    let held: Vec<_> = store
        .allocations()
        .map_err(|e| store_error(&e))?
        .into_iter()
        .filter(|a| a.state == State::Attached && a.container_id.as_deref() == Some(container) && a.ifname == ifname)
        .map(|a| a.ip)
        .collect();
    if held.is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("container {container} ({ifname}) holds no address on network {}", config.name),
            "",
        ));
    }
    for addr in &config.prev_ips {
        let ip = addr.addr();
        let ours = config.range_sets.iter().any(|set| set.contains(ip));
        if ours && !held.contains(&ip) {
            return Err(CniError::new(
                code::ADDRESS_NOT_ATTACHED,
                format!("prevResult address {ip} is not allocated to container {container} ({ifname})"),
                format!("it holds {held:?}"),
            ));
        }
    }
    Ok(String::new())
}

fn status(stdin: &[u8]) -> Result<String, CniError> {
    let config = config::parse(stdin, Needs::Ranges)?;
    let store = open_store(&config).map_err(|e| CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg, e.details))?;
    let used = store.allocations().map_err(|e| store_error(&e))?;
    for set in &config.range_sets {
        // Released pins do not count: an ADD reclaims the oldest of them.
        let attached = used.iter().filter(|a| a.state == State::Attached && set.contains(a.ip)).count();
        if u128::try_from(attached).unwrap_or(u128::MAX) >= set.capacity() {
            return Err(CniError::new(
                code::PLUGIN_NOT_AVAILABLE,
                format!("no free address in {set}"),
                "every address is attached to a running container; an ADD would fail",
            ));
        }
    }
    Ok(String::new())
}

fn gc(stdin: &[u8]) -> Result<String, CniError> {
    let config = config::parse(stdin, Needs::StoreOnly)?;
    let Some(valid) = &config.valid_attachments else {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "GC needs cni.dev/valid-attachments",
            "without the list every attachment would look stale",
        ));
    };
    if !config.store_path().exists() {
        return Ok(String::new());
    }
    let valid: HashSet<(String, String)> = valid.iter().cloned().collect();
    let mut store = Store::open(config.store_path()).map_err(|e| store_error(&e))?;
    store.release_all_except(&valid).map_err(|e| store_error(&e))?;
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_identity_comes_from_cni_args() {
        let pod = pod_from_args(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc",
        ))
        .unwrap();
        assert_eq!(pod.to_string(), "default/web-0");
        let err = pod_from_args(Some("K8S_POD_NAMESPACE=default")).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        assert!(err.msg.contains("K8S_POD_NAME"), "{}", err.msg);
        assert_eq!(pod_from_args(None).unwrap_err().code, code::INVALID_ENVIRONMENT);
    }
}
