//! A node's autonomy (`autonomy/<node>`, `autonomy-duration/<node>`):
//! reading and writing the flag and its bound, with the reservation that
//! goes with them, and the look-ups by node name they need (flannel's
//! layout keys leases by subnet, so a node is found through `nodes/`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use etcd_client::{GetOptions, Txn, TxnOp};
use ipnet::Ipv4Net;
use netd_model::autonomy::{format_go_duration, parse_go_duration, Autonomy};
use netd_model::flannel::{self, LeaseAttrs};

use super::keys::{KeyKind, Keys};
use super::reservation::Reservation;
use super::rpc::rpc;
use super::EtcdRegistry;
use crate::{AutonomyChange, NodeAutonomy, NodeLeaseState, Registry, RegistryError, LEASE_TTL};

/// `node`'s autonomy from the texts of its `autonomy/` and
/// `autonomy-duration/` keys (`None`: no key), and what was wrong with
/// them, naming the key: an unreadable flag is off, an unreadable bound no
/// time limit.
pub(super) fn read_autonomy(
    keys: &Keys,
    node: &str,
    flag: Option<&str>,
    bound: Option<&str>,
) -> (Autonomy, Option<String>) {
    let on = match flag.map(str::trim) {
        None => false,
        Some(text) if text.eq_ignore_ascii_case("true") => true,
        Some(text) if text.eq_ignore_ascii_case("false") => false,
        Some(text) => {
            let key = keys.autonomy(node);
            return (Autonomy::Off, Some(format!("{key}={text:?} is neither true nor false; taken as false")));
        }
    };
    if !on {
        return (Autonomy::Off, None);
    }
    match bound.map(parse_go_duration) {
        None => (Autonomy::Forever, None),
        Some(Ok(d)) if d.is_zero() => (Autonomy::Forever, None),
        Some(Ok(d)) => (Autonomy::For(d), None),
        Some(Err(reason)) => {
            let key = keys.autonomy_duration(node);
            let text = bound.unwrap_or_default();
            (Autonomy::Forever, Some(format!("{key}={text:?} is not a duration ({reason}); taken as no time limit")))
        }
    }
}

impl EtcdRegistry {
    /// [`Registry::set_autonomy`]: the flag, its bound and the reservation
    /// in one transaction.
    pub(super) async fn write_autonomy(
        &mut self,
        node: &str,
        autonomy: Autonomy,
    ) -> Result<Vec<AutonomyChange>, RegistryError> {
        check_node(node, "setting the autonomy")?;
        self.check_known(node).await?;
        let (flag, bound) = (self.keys.autonomy(node), self.keys.autonomy_duration(node));
        let value = if autonomy.is_on() { "true" } else { "false" };
        let mut ops = vec![TxnOp::put(flag.clone(), value, None)];
        let mut changes = vec![AutonomyChange { field: flag.clone(), value: Some(value.into()) }];
        match autonomy {
            Autonomy::For(duration) => {
                let text = format_go_duration(duration);
                ops.push(TxnOp::put(bound.clone(), text.clone(), None));
                changes.push(AutonomyChange { field: bound, value: Some(text) });
            }
            Autonomy::Off | Autonomy::Forever => {
                ops.push(TxnOp::delete(bound.clone(), None));
                changes.push(AutonomyChange { field: bound, value: None });
            }
        }
        // The subnet the node holds is reserved from now on (renewed at what
        // its lease says), so it survives the lease lapsing; a node holding
        // none keeps the reservation it has, and its next acquire writes one.
        let reserved = self.keys.reserved(node);
        if !autonomy.is_on() {
            ops.push(TxnOp::delete(reserved.clone(), None));
            changes.push(AutonomyChange { field: reserved, value: None });
        } else if let Some(subnet) = self.subnet_of(node).await? {
            let renewed_at = match self.lease_state(subnet).await? {
                Some(NodeLeaseState { expires_at: Some(at), .. }) => at.checked_sub(LEASE_TTL).unwrap_or(at),
                _ => SystemTime::now(),
            };
            let json = Reservation::new(subnet, renewed_at).to_json();
            ops.push(TxnOp::put(reserved.clone(), json.clone(), None));
            changes.push(AutonomyChange { field: reserved, value: Some(json) });
        }
        let what = format!("writing {flag}");
        rpc(&self.endpoints, &what, self.kv.txn(Txn::new().and_then(ops))).await?;
        Ok(changes)
    }

    /// [`Registry::node_autonomy`]: the flag, its bound, and the lease or
    /// the reservation standing in for it.
    pub(super) async fn read_node_autonomy(&mut self, node: &str) -> Result<NodeAutonomy, RegistryError> {
        check_node(node, "reading the autonomy")?;
        let (flag_key, bound_key) = (self.keys.autonomy(node), self.keys.autonomy_duration(node));
        let what = format!("reading {flag_key}");
        let flag = rpc(&self.endpoints, &what, self.kv.get(flag_key.clone(), None)).await?;
        let flag = flag.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        let what = format!("reading {bound_key}");
        let bound = rpc(&self.endpoints, &what, self.kv.get(bound_key.clone(), None)).await?;
        let bound = bound.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        let reserved_key = self.keys.reserved(node);
        let what = format!("reading {reserved_key}");
        let reserved = rpc(&self.endpoints, &what, self.kv.get(reserved_key.clone(), None)).await?;
        let reservation = match reserved.kvs().first().map(|kv| Reservation::parse(kv.value())) {
            None => None,
            Some(Ok(reservation)) => Some(reservation),
            Some(Err(reason)) => {
                tracing::warn!(key = %reserved_key, %reason, "the node's subnet reservation is unreadable");
                None
            }
        };
        let held = self.subnet_of(node).await?;
        if flag.is_none() && held.is_none() {
            return Err(self.unknown(node).await?);
        }
        let (autonomy, problem) = read_autonomy(&self.keys, node, flag.as_deref(), bound.as_deref());
        let mut sources = Vec::new();
        if autonomy.is_on() {
            sources.push(flag_key);
            if bound.is_some() {
                sources.push(bound_key);
            }
        }
        let now = SystemTime::now();
        let kept = |subnet: Ipv4Net| {
            reservation.as_ref().is_some_and(|r| r.subnet == subnet && autonomy.holds_at(r.renewed_at(), now))
        };
        let lease = match (held, &reservation) {
            (Some(subnet), _) => self
                .lease_state(subnet)
                .await?
                .map(|state| NodeLeaseState { kept_while_autonomous: kept(subnet), ..state }),
            // Lapsed (or deleted), and etcd dropped the key: the reservation
            // still says which subnet is the node's.
            (None, Some(r)) if kept(r.subnet) => Some(NodeLeaseState {
                subnet: r.subnet,
                public_ip: None,
                expires_at: Some((r.renewed_at() + LEASE_TTL).min(now)),
                kept_while_autonomous: true,
            }),
            (None, _) => None,
        };
        Ok(NodeAutonomy { node: node.to_string(), autonomy, sources, problem, lease, kubernetes: None })
    }
}

/// netd's keys put the node name in a key: it must be one path segment.
fn check_node(node: &str, what: &str) -> Result<(), RegistryError> {
    if node.is_empty() || node.contains('/') {
        return Err(RegistryError::Refused {
            what: format!("{what} of node {node:?}"),
            reason: "a node name must be non-empty and without '/'".into(),
        });
    }
    Ok(())
}

impl EtcdRegistry {
    /// The node names of `nodes/` by subnet.
    async fn names(&mut self) -> Result<BTreeMap<Ipv4Net, String>, RegistryError> {
        let prefix = self.keys.nodes.clone();
        let what = format!("listing {prefix}");
        let response = rpc(&self.endpoints, &what, self.kv.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let mut names = BTreeMap::new();
        for kv in response.kvs() {
            let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
            let KeyKind::Node(rest) = self.keys.classify(key) else { continue };
            if let (Ok(subnet), Ok(name)) = (flannel::parse_subnet_key(rest), std::str::from_utf8(kv.value())) {
                names.insert(subnet, name.to_string());
            }
        }
        Ok(names)
    }

    /// The subnet whose lease `node` holds, by its `nodes/` key.
    async fn subnet_of(&mut self, node: &str) -> Result<Option<Ipv4Net>, RegistryError> {
        Ok(self.names().await?.into_iter().find(|(_, name)| name == node).map(|(subnet, _)| subnet))
    }

    /// `Ok` when `node` holds a lease or has an autonomy flag.
    async fn check_known(&mut self, node: &str) -> Result<(), RegistryError> {
        let flag = self.keys.autonomy(node);
        let what = format!("reading {flag}");
        let response =
            rpc(&self.endpoints, &what, self.kv.get(flag, Some(GetOptions::new().with_count_only()))).await?;
        if response.count() > 0 || self.subnet_of(node).await?.is_some() {
            return Ok(());
        }
        Err(self.unknown(node).await?)
    }

    /// The error for a node that is not there, naming the nodes that are.
    async fn unknown(&mut self, node: &str) -> Result<RegistryError, RegistryError> {
        let mut names: BTreeSet<String> = self.names().await?.into_values().collect();
        let prefix = self.keys.autonomy.clone();
        let what = format!("listing {prefix}");
        let options = GetOptions::new().with_prefix().with_keys_only();
        let response = rpc(&self.endpoints, &what, self.kv.get(prefix.clone(), Some(options))).await?;
        names.extend(
            response
                .kvs()
                .iter()
                .filter_map(|kv| std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix).map(String::from)),
        );
        let names: Vec<String> = names.into_iter().collect();
        let what = format!("no {} key names it and there is no {}", self.keys.nodes, self.keys.autonomy(node));
        let reason = crate::known_names(&what, &names)
            + "; flannel nodes carry no name in etcd, so only netd nodes are known by name";
        Ok(RegistryError::UnknownNode { node: node.to_string(), registry: self.describe(), reason })
    }

    /// The lease on `subnet` now: its public IP and when its etcd lease ends.
    async fn lease_state(&mut self, subnet: Ipv4Net) -> Result<Option<NodeLeaseState>, RegistryError> {
        let key = self.keys.subnet(subnet);
        let what = format!("reading {key}");
        let response = rpc(&self.endpoints, &what, self.kv.get(key.clone(), None)).await?;
        let Some(kv) = response.kvs().first() else { return Ok(None) };
        let public_ip = LeaseAttrs::parse(kv.value()).ok().map(|a| a.public_ip);
        let expires_at = match kv.lease() {
            0 => None,
            id => {
                let what = format!("reading etcd lease {id:x}");
                let status = rpc(&self.endpoints, &what, self.leases.time_to_live(id, None)).await?;
                Some(SystemTime::now() + Duration::from_secs(status.ttl().max(0) as u64))
            }
        };
        Ok(Some(NodeLeaseState { subnet, public_ip, expires_at, kept_while_autonomous: false }))
    }
}
