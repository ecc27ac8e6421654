//! The peer view: a full listing ([`PeerEvent::Resync`]), then a watch
//! from just after it whose key events the [`View`] turns into
//! [`PeerEvent::Upsert`] and [`PeerEvent::Remove`]. Kept apart from the
//! lease because it only reads, and must stay cancel-safe.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use etcd_client::{EventType, WatchOptions, WatchStream};
use ipnet::Ipv4Net;
use netd_model::autonomy;
use netd_model::flannel::{self, LeaseAttrs};
use netd_model::{Lease, MacAddr};

use super::config::{config_error, missing_config};
use super::keys::{KeyKind, Keys};
use super::rpc::{map_error, rpc};
use super::EtcdRegistry;
use crate::{NetworkConfig, PeerEvent, PeerLease, RegistryError};

pub(super) struct Watching {
    stream: WatchStream,
    view: View,
}

impl EtcdRegistry {
    /// [`Registry::next_event`](crate::Registry::next_event): pending
    /// events first, else a resync when there is no watch, else the next
    /// watch message.
    pub(super) async fn next_peer_event(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        if self.watch.as_ref().is_some_and(|w| w.view.own != own_subnet) {
            // Our lease moved: what is a peer changed.
            self.lose_watch();
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let Some(watching) = self.watch.as_mut() else {
                return self.resync(own_subnet).await;
            };
            // Cancel-safe: a message is either still in the stream or fully
            // decoded into `pending` below without another await.
            let message = watching.stream.message().await;
            let root = &self.keys.root;
            let failure = match message {
                Ok(Some(response)) if response.canceled() => {
                    let why = if response.compact_revision() > 0 {
                        format!("its history was compacted up to revision {}", response.compact_revision())
                    } else {
                        format!("etcd cancelled it ({})", response.cancel_reason())
                    };
                    RegistryError::Unreachable(format!(
                        "the watch of {root} on etcd {} ended: {why}; the next call resyncs",
                        self.endpoints
                    ))
                }
                Ok(Some(response)) => {
                    let mut affected = BTreeSet::new();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let value = match event.event_type() {
                            EventType::Put => Some(kv.value()),
                            EventType::Delete => None,
                        };
                        affected.extend(watching.view.apply(&self.keys, kv.key(), value));
                    }
                    self.pending.extend(watching.view.settle(affected));
                    continue;
                }
                Ok(None) => RegistryError::Unreachable(format!(
                    "etcd {} closed the watch of {root}; the next call resyncs",
                    self.endpoints
                )),
                Err(e) => map_error(&self.endpoints, &format!("watching {root}"), e),
            };
            self.lose_watch();
            return Err(failure);
        }
    }

    /// Drops the watch: the next event is a resync.
    fn lose_watch(&mut self) {
        self.watch = None;
        self.pending.clear();
    }

    /// The full peer set, and a watch from just after it.
    async fn resync(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        let (revision, kvs) = self.list().await?;
        let config_kv = kvs.iter().find(|kv| kv.key() == self.keys.config.as_bytes());
        let config = match (config_kv.map(|kv| flannel::parse_network_config(kv.value())), self.config) {
            (Some(Ok(config)), _) => config,
            (Some(Err(error)), Some(known)) => {
                tracing::warn!(key = %self.keys.config, %error, "network config unreadable; keeping the one read before");
                known
            }
            (None, Some(known)) => {
                tracing::warn!(key = %self.keys.config, "network config gone; keeping the one read before");
                known
            }
            (Some(Err(error)), None) => return Err(config_error(&self.keys.config, error.into())),
            (None, None) => return Err(missing_config(&self.keys.config, &self.endpoints)),
        };
        self.config = Some(config);
        let mut view = View::new(config, own_subnet);
        for kv in &kvs {
            view.apply(&self.keys, kv.key(), Some(kv.value()));
        }
        view.known = view.peers();
        let root = self.keys.root.clone();
        let what = format!("watching {root}");
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let stream = rpc(&self.endpoints, &what, self.watcher.watch(root, Some(options))).await?;
        let peers = view.known.values().cloned().collect();
        self.watch = Some(Watching { stream, view });
        self.pending.clear();
        Ok(PeerEvent::Resync(peers))
    }
}

/// What the watch has seen, turned into peers.
struct View {
    config: NetworkConfig,
    own: Ipv4Net,
    /// Valid vxlan leases: public IP and VTEP MAC.
    leases: BTreeMap<Ipv4Net, (Ipv4Addr, MacAddr)>,
    /// Node names from `nodes/`.
    names: BTreeMap<Ipv4Net, String>,
    /// Flags from `autonomy/`.
    autonomy: BTreeMap<String, bool>,
    /// The peers as last reported.
    known: BTreeMap<Ipv4Net, PeerLease>,
}

impl View {
    fn new(config: NetworkConfig, own: Ipv4Net) -> Self {
        Self {
            config,
            own,
            leases: BTreeMap::new(),
            names: BTreeMap::new(),
            autonomy: BTreeMap::new(),
            known: BTreeMap::new(),
        }
    }

    /// Records a put (`Some(value)`) or delete of `key`; returns the subnets
    /// whose peer may have changed.
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<&[u8]>) -> Vec<Ipv4Net> {
        let Ok(key) = std::str::from_utf8(key) else {
            tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a key that is not UTF-8");
            return Vec::new();
        };
        match keys.classify(key) {
            KeyKind::Config => {
                let changed = value.map(flannel::parse_network_config).is_some_and(|c| c.ok() != Some(self.config));
                if changed || value.is_none() {
                    tracing::warn!(%key, "network config changed in etcd; restart netd to apply it");
                }
                Vec::new()
            }
            KeyKind::Subnet(rest) => {
                let subnet = match flannel::parse_subnet_key(rest) {
                    Ok(subnet) => subnet,
                    Err(reason) => {
                        if value.is_some() {
                            tracing::warn!(%key, %reason, "skipping bad lease");
                        }
                        return Vec::new();
                    }
                };
                match value.map(|v| self.parse_lease(subnet, v)) {
                    Some(Ok(lease)) => {
                        self.leases.insert(subnet, lease);
                    }
                    Some(Err(reason)) => {
                        tracing::warn!(%key, %reason, "skipping bad lease");
                        self.leases.remove(&subnet);
                    }
                    None => {
                        self.leases.remove(&subnet);
                    }
                }
                vec![subnet]
            }
            KeyKind::Node(rest) => {
                let Ok(subnet) = flannel::parse_subnet_key(rest) else {
                    tracing::debug!(%key, "ignoring a node-name key that names no subnet");
                    return Vec::new();
                };
                match value.map(std::str::from_utf8) {
                    Some(Ok(name)) if !name.is_empty() => {
                        self.names.insert(subnet, name.to_string());
                    }
                    Some(_) => {
                        tracing::warn!(%key, "ignoring a node name that is empty or not UTF-8");
                        self.names.remove(&subnet);
                    }
                    None => {
                        self.names.remove(&subnet);
                    }
                }
                vec![subnet]
            }
            KeyKind::Autonomy(node) => {
                match value {
                    Some(v) => {
                        let on = autonomy::autonomy_on(std::str::from_utf8(v).ok());
                        self.autonomy.insert(node.to_string(), on);
                    }
                    None => {
                        self.autonomy.remove(node);
                    }
                }
                self.names.iter().filter(|(_, name)| *name == node).map(|(subnet, _)| *subnet).collect()
            }
            KeyKind::AutonomyDuration(_) | KeyKind::Reserved(_) | KeyKind::Other => Vec::new(),
        }
    }

    fn parse_lease(&self, subnet: Ipv4Net, value: &[u8]) -> Result<(Ipv4Addr, MacAddr), String> {
        let network = self.config.network;
        if !network.contains(&subnet) || subnet.prefix_len() != self.config.subnet_len {
            return Err(format!("subnet {subnet} is not a /{} of the network {network}", self.config.subnet_len));
        }
        let attrs = LeaseAttrs::parse(value)?;
        let data = attrs.vxlan_data()?;
        Ok((attrs.public_ip, data.vtep_mac))
    }

    fn peer(&self, subnet: Ipv4Net) -> Option<PeerLease> {
        if subnet == self.own {
            return None;
        }
        let &(public_ip, vtep_mac) = self.leases.get(&subnet)?;
        let node = self.names.get(&subnet).cloned();
        let autonomous = node.as_ref().and_then(|n| self.autonomy.get(n)).copied().unwrap_or(false);
        Some(PeerLease { lease: Lease { subnet, public_ip, vtep_mac, node }, autonomous, cloud: false })
    }

    fn peers(&self) -> BTreeMap<Ipv4Net, PeerLease> {
        self.leases.keys().filter_map(|s| self.peer(*s).map(|p| (*s, p))).collect()
    }

    /// The events that bring `known` up to date for `affected`.
    fn settle(&mut self, affected: BTreeSet<Ipv4Net>) -> Vec<PeerEvent> {
        let mut events = Vec::new();
        for subnet in affected {
            match self.peer(subnet) {
                Some(peer) if self.known.get(&subnet) != Some(&peer) => {
                    self.known.insert(subnet, peer.clone());
                    events.push(PeerEvent::Upsert(peer));
                }
                Some(_) => {}
                None => {
                    if self.known.remove(&subnet).is_some() {
                        events.push(PeerEvent::Remove(subnet));
                    }
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::DEFAULT_PREFIX;
    use super::*;

    #[test]
    fn view_turns_key_events_into_peer_events() {
        let keys = Keys::new(DEFAULT_PREFIX);
        let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
        let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let mut view = View::new(config, own);
        let value =
            br#"{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:07"}}"#;
        let key = b"/coreos.com/network/subnets/10.244.7.0-24";
        let peer: Ipv4Net = "10.244.7.0/24".parse().unwrap();
        let settle = |view: &mut View, affected: Vec<Ipv4Net>| view.settle(affected.into_iter().collect());

        let affected = view.apply(&keys, b"/coreos.com/network/subnets/10.244.1.0-24", Some(value));
        assert!(settle(&mut view, affected).is_empty(), "own subnet is never a peer");
        let affected = view.apply(&keys, key, Some(value));
        let events = settle(&mut view, affected);
        assert!(matches!(&events[..], [PeerEvent::Upsert(p)] if p.lease.subnet == peer && p.lease.node.is_none()));
        let affected = view.apply(&keys, b"/coreos.com/network/nodes/10.244.7.0-24", Some(b"edge-7"));
        let events = settle(&mut view, affected);
        assert!(matches!(&events[..], [PeerEvent::Upsert(p)] if p.lease.node.as_deref() == Some("edge-7")));
        let affected = view.apply(&keys, b"/coreos.com/network/autonomy/edge-7", Some(b"true"));
        let events = settle(&mut view, affected);
        assert!(matches!(&events[..], [PeerEvent::Upsert(p)] if p.autonomous));
        // Same value again: nothing to report.
        let affected = view.apply(&keys, key, Some(value));
        assert!(settle(&mut view, affected).is_empty());
        // Turned to garbage: the peer is gone.
        let affected = view.apply(&keys, key, Some(b"{"));
        assert_eq!(settle(&mut view, affected), vec![PeerEvent::Remove(peer)]);
        let affected = view.apply(&keys, key, None);
        assert!(settle(&mut view, affected).is_empty());
        // Outside the network, or of the wrong size: skipped.
        let affected = view.apply(&keys, b"/coreos.com/network/subnets/10.9.0.0-24", Some(value));
        assert!(settle(&mut view, affected).is_empty());
        let affected = view.apply(&keys, b"/coreos.com/network/subnets/10.244.8.0-25", Some(value));
        assert!(settle(&mut view, affected).is_empty());
    }
}
