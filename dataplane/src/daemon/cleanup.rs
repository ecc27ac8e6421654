//! `netd cleanup`: remove what netd made in this network namespace.

use std::net::Ipv4Addr;
use std::path::Path;

use super::DaemonConfig;
use crate::masquerade::Masquerade;
use crate::vxlan::snapshot::{journal_path, Snapshot};
use netd_netlink::{Handle, NetlinkError};

/// Why cleanup stopped (what was removed before stays removed).
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A kernel request failed.
    #[error("cannot remove {what}: {source}")]
    Netlink {
        /// What was being removed or listed.
        what: &'static str,
        /// The netlink failure.
        #[source]
        source: NetlinkError,
    },
}

/// Removes everything netd made in this network namespace: the VXLAN
/// device (its neighbours, FDB entries, nexthops and routes go with it),
/// direct-routing nexthops and routes to cluster subnets, the masquerade
/// table and subnet.env. The snapshot, its journal and the VTEP MAC store
/// are kept unless `purge_state` (they are what makes a re-install keep its
/// MAC). Returns what was done, a line each.
pub fn cleanup(config: &DaemonConfig, purge_state: bool) -> Result<Vec<String>, CleanupError> {
    let netlink = |what| move |source| CleanupError::Netlink { what, source };
    let mut done = Vec::new();
    let snapshot = Snapshot::load(&config.snapshot_path()).ok().flatten();
    let vni = snapshot.as_ref().map_or(1, |s| s.config.vni);
    let mut handle = Handle::new().map_err(netlink("anything (no netlink socket)"))?;
    let device = format!("flannel.{vni}");
    if let Some(link) = handle.link().get(&device).map_err(netlink("the VXLAN device"))? {
        handle.link().delete(link.index).execute().map_err(netlink("the VXLAN device"))?;
        done.push(format!("deleted {device} with its neighbours, FDB entries, nexthops and routes"));
    }
    if let Some(network) = snapshot.as_ref().map(|s| s.config.network) {
        let ours: Vec<_> = handle
            .nexthop()
            .list()
            .map_err(netlink("direct-routing nexthops"))?
            .into_iter()
            .filter(|nh| network.contains(&Ipv4Addr::from(nh.id)))
            .collect();
        for nh in &ours {
            handle.nexthop().delete(*nh).execute().map_err(netlink("direct-routing nexthops"))?;
        }
        if !ours.is_empty() {
            done.push(format!("deleted {} direct-routing nexthops and their routes", ours.len()));
        }
    }
    match Masquerade::remove() {
        Ok(()) => done.push("removed nftables table ip netd-masq (if present)".into()),
        Err(e) => done.push(format!("masquerade not removed: {e}")),
    }
    remove_file(&config.subnet_env, &mut done);
    if purge_state {
        remove_file(&config.snapshot_path(), &mut done);
        remove_file(&journal_path(&config.snapshot_path()), &mut done);
        remove_file(&config.mac_store_path(), &mut done);
    }
    Ok(done)
}

fn remove_file(path: &Path, done: &mut Vec<String>) {
    if std::fs::remove_file(path).is_ok() {
        done.push(format!("removed {}", path.display()));
    }
}
