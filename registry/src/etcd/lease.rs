//! This node's own lease (`subnets/<subnet>` and `nodes/<subnet>` on one
//! 24 h etcd lease): acquiring it in compare-and-swap rounds, removing
//! stale copies, renewing it, and the etcd leases under it (granted, kept
//! alive, or given back when unused). Nothing here releases a held lease:
//! [`Registry`] has no such call, so a node that stops lets it expire.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;
use netd_model::flannel::{self, LeaseAttrs};

use super::autonomy::read_autonomy;
use super::keys::{KeyKind, Keys};
use super::reservation::Reservation;
use super::rpc::{map_error, rpc, timed_out};
use super::{EtcdRegistry, REQUEST_TIMEOUT};
use crate::{pick_subnet, LeaseRequest, NetworkConfig, OwnLease, Registry, RegistryError, LEASE_TTL};

/// Compare-and-swap rounds lost in a row before acquiring gives up.
const CAS_ATTEMPTS: usize = 16;

impl EtcdRegistry {
    /// [`Registry::acquire_lease`]: acquire rounds until one wins its
    /// compare-and-swap, at most [`CAS_ATTEMPTS`].
    pub(super) async fn acquire(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
    ) -> Result<OwnLease, RegistryError> {
        config.check()?;
        let attrs = LeaseAttrs::vxlan(request.public_ip, config.vni, request.vtep_mac).to_json();
        let mut spare = None;
        let mut outcome = Err(RegistryError::Refused {
            what: format!("acquiring a lease under {}", self.keys.subnets),
            reason: format!("lost the compare-and-swap to other writers {CAS_ATTEMPTS} times in a row"),
        });
        for _ in 0..CAS_ATTEMPTS {
            match self.try_acquire(config, request, &attrs, &mut spare).await {
                Ok(None) => continue,
                Ok(Some(own)) => {
                    outcome = Ok(own);
                    break;
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if let Some((id, _)) = spare {
            // Granted but not used: give it back (it would expire anyway).
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, self.leases.revoke(id)).await;
        }
        outcome
    }

    /// [`Registry::renew_lease`]: an acquire that prefers the lease held.
    pub(super) async fn renew(&mut self, lease: &OwnLease) -> Result<OwnLease, RegistryError> {
        let config = match self.config {
            Some(config) => config,
            None => self.network_config().await?,
        };
        // Acquiring finds the key by node name (or by public IP when
        // flannel wrote it), keeps its etcd
        // lease alive and re-puts the value; a vanished key is taken again,
        // the same subnet first.
        let request = LeaseRequest {
            node: lease.lease.node.clone().unwrap_or_default(),
            public_ip: lease.lease.public_ip,
            vtep_mac: lease.lease.vtep_mac,
            previous_subnet: Some(lease.lease.subnet),
        };
        self.acquire_lease(&config, &request).await
    }

    /// A lease on `id` that lives on for 24 h (keep-alive sent), or `None`
    /// when `id` is gone or not a 24 h lease.
    async fn refresh(&mut self, id: i64) -> Result<Option<i64>, RegistryError> {
        let what = format!("reading etcd lease {id:x}");
        let status = rpc(&self.endpoints, &what, self.leases.time_to_live(id, None)).await?;
        if status.ttl() <= 0 || status.granted_ttl() < ttl_secs() {
            return Ok(None);
        }
        let what = format!("keeping etcd lease {id:x} alive");
        match tokio::time::timeout(REQUEST_TIMEOUT, self.leases.keep_alive(id)).await {
            Ok(Ok(_keeper)) => Ok(Some(status.granted_ttl())),
            // Expired between the two requests.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Ok(None),
            Ok(Err(e)) => Err(map_error(&self.endpoints, &what, e)),
            Err(_) => Err(timed_out(&self.endpoints, &what)),
        }
    }

    /// A fresh 24 h etcd lease: `(id, ttl)`.
    async fn grant(&mut self) -> Result<(i64, i64), RegistryError> {
        let what = format!("granting a {} s etcd lease", ttl_secs());
        let granted = rpc(&self.endpoints, &what, self.leases.grant(ttl_secs(), None)).await?;
        Ok((granted.id(), granted.ttl()))
    }

    /// The lease-key puts of `subnet` on etcd lease `id`, and the name key.
    fn lease_puts(&self, subnet: Ipv4Net, attrs: &str, node: &str, id: i64) -> Vec<TxnOp> {
        let mut ops = vec![TxnOp::put(self.keys.subnet(subnet), attrs, Some(PutOptions::new().with_lease(id)))];
        if !node.is_empty() {
            ops.push(TxnOp::put(self.keys.node(subnet), node, Some(PutOptions::new().with_lease(id))));
        }
        ops
    }

    /// One acquire round: `Ok(None)` when a compare-and-swap was lost.
    /// `spare` is a granted etcd lease not attached to anything yet.
    async fn try_acquire(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
        attrs: &str,
        spare: &mut Option<(i64, i64)>,
    ) -> Result<Option<OwnLease>, RegistryError> {
        let (_, kvs) = self.list().await?;
        let mut names: BTreeMap<Ipv4Net, String> = BTreeMap::new();
        // (subnet, mod revision, etcd lease id, public IP when parseable)
        let mut held: Vec<(Ipv4Net, i64, i64, Option<Ipv4Addr>)> = Vec::new();
        let (mut flags, mut bounds) = (BTreeMap::new(), BTreeMap::new());
        let mut reservations: BTreeMap<&str, Reservation> = BTreeMap::new();
        for kv in &kvs {
            let Ok(key) = std::str::from_utf8(kv.key()) else { continue };
            match self.keys.classify(key) {
                KeyKind::Subnet(rest) => {
                    let Ok(subnet) = flannel::parse_subnet_key(rest) else { continue };
                    let ip = LeaseAttrs::parse(kv.value()).ok().map(|a| a.public_ip);
                    held.push((subnet, kv.mod_revision(), kv.lease(), ip));
                }
                KeyKind::Node(rest) => {
                    if let (Ok(subnet), Ok(name)) = (flannel::parse_subnet_key(rest), std::str::from_utf8(kv.value())) {
                        names.insert(subnet, name.to_string());
                    }
                }
                KeyKind::Autonomy(node) => {
                    flags.insert(node, String::from_utf8_lossy(kv.value()));
                }
                KeyKind::AutonomyDuration(node) => {
                    bounds.insert(node, String::from_utf8_lossy(kv.value()));
                }
                KeyKind::Reserved(node) => match Reservation::parse(kv.value()) {
                    Ok(reservation) => {
                        reservations.insert(node, reservation);
                    }
                    Err(reason) => tracing::warn!(%key, %reason, "skipping an unreadable subnet reservation"),
                },
                _ => {}
            }
        }
        let now = SystemTime::now();
        let autonomy_of = |node: &str| {
            let (flag, bound) = (flags.get(node).map(|t| t.as_ref()), bounds.get(node).map(|t| t.as_ref()));
            read_autonomy(&self.keys, node, flag, bound).0
        };
        // Subnets of autonomous nodes cut off long enough for etcd to have
        // dropped their lease keys: still theirs.
        let reserved_elsewhere: BTreeSet<Ipv4Net> = reservations
            .iter()
            .filter(|(node, r)| **node != request.node && autonomy_of(node).holds_at(r.renewed_at(), now))
            .map(|(_, r)| r.subnet)
            .collect();
        let own_reservation = reservations.get(request.node.as_str()).filter(|_| !request.node.is_empty());
        let reserve = !request.node.is_empty() && autonomy_of(&request.node).is_on();
        let reservation_ops = |keys: &Keys, subnet: Ipv4Net| match (reserve, own_reservation) {
            (true, _) => vec![TxnOp::put(keys.reserved(&request.node), Reservation::new(subnet, now).to_json(), None)],
            (false, Some(_)) => vec![TxnOp::delete(keys.reserved(&request.node), None)],
            (false, None) => Vec::new(),
        };
        // A lease that names its node is that node's alone: claiming its
        // public IP does not make it ours (SPEC §3b: no node takes another's
        // subnet or address). A lease without a name is flannel's own, which
        // flannel finds by public IP: a node taking over from flannel keeps
        // its subnet that way.
        let is_ours = |subnet: &Ipv4Net, ip: Option<Ipv4Addr>| match names.get(subnet) {
            Some(name) => !request.node.is_empty() && *name == request.node,
            None => ip == Some(request.public_ip),
        };
        let usable = |s: &Ipv4Net| config.network.contains(s) && s.prefix_len() == config.subnet_len;
        let ours: Vec<_> = held.iter().filter(|(s, _, _, ip)| is_ours(s, *ip)).copied().collect();
        let keep = ours
            .iter()
            .filter(|(s, ..)| usable(s))
            .find(|(s, ..)| Some(*s) == request.previous_subnet.map(|p| p.trunc()))
            .or_else(|| ours.iter().find(|(s, ..)| usable(s)))
            .copied();
        for &(subnet, revision, _, _) in ours.iter().filter(|o| Some(**o) != keep) {
            self.remove_stale(subnet, revision).await?;
        }
        if let Some((subnet, revision, id, _)) = keep {
            let refreshed = if id != 0 { self.refresh(id).await? } else { None };
            let (id, ttl) = match refreshed {
                Some(ttl) => (id, ttl),
                None => match spare.take() {
                    Some(granted) => granted,
                    None => self.grant().await?,
                },
            };
            let key = self.keys.subnet(subnet);
            let mut ops = self.lease_puts(subnet, attrs, &request.node, id);
            ops.extend(reservation_ops(&self.keys, subnet));
            let txn = Txn::new().when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)]).and_then(ops);
            let what = format!("re-publishing {key}");
            if !rpc(&self.endpoints, &what, self.kv.txn(txn)).await?.succeeded() {
                if refreshed.is_none() {
                    *spare = Some((id, ttl));
                }
                return Ok(None);
            }
            return Ok(Some(own_lease(subnet, request, now, ttl)));
        }
        let mut taken: BTreeSet<Ipv4Net> = held.iter().filter(|h| !ours.contains(*h)).map(|h| h.0).collect();
        taken.extend(reserved_elsewhere);
        let preferred = request.previous_subnet.or(own_reservation.map(|r| r.subnet));
        let subnet = pick_subnet(config, &taken, preferred)?;
        let (id, ttl) = match spare.take() {
            Some(granted) => granted,
            None => self.grant().await?,
        };
        let key = self.keys.subnet(subnet);
        let mut ops = self.lease_puts(subnet, attrs, &request.node, id);
        ops.extend(reservation_ops(&self.keys, subnet));
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then(ops);
        let what = format!("creating {key}");
        if !rpc(&self.endpoints, &what, self.kv.txn(txn)).await?.succeeded() {
            *spare = Some((id, ttl));
            tracing::info!(%key, "another node took the subnet first; trying another");
            return Ok(None);
        }
        Ok(Some(own_lease(subnet, request, now, ttl)))
    }

    /// Deletes a lease of ours that is not the one kept (and its name key),
    /// unless it changed since it was read.
    async fn remove_stale(&mut self, subnet: Ipv4Net, revision: i64) -> Result<(), RegistryError> {
        let key = self.keys.subnet(subnet);
        tracing::info!(%key, "removing a stale lease of this node");
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key.clone(), None), TxnOp::delete(self.keys.node(subnet), None)]);
        let what = format!("deleting stale {key}");
        rpc(&self.endpoints, &what, self.kv.txn(txn)).await?;
        Ok(())
    }
}

fn ttl_secs() -> i64 {
    LEASE_TTL.as_secs() as i64
}

fn own_lease(subnet: Ipv4Net, request: &LeaseRequest, granted_at: SystemTime, ttl: i64) -> OwnLease {
    OwnLease { lease: request.lease_for(subnet), expires_at: Some(granted_at + Duration::from_secs(ttl.max(0) as u64)) }
}
