//! Desired peers vs kernel state: read what the device holds, write only the
//! difference, in one batch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use netd_netlink::{Change, EthAddr, FdbEntry, Handle, Neighbour, Nexthop, Route, RouteVia};

use super::device::{self, Device};
use super::peers::{conflict, lone_defect, nexthop_id, validate, Rejected};
use super::{Lease, OverlayConfig, PeerChange, VxlanError};
use netd_model::MacAddr;

/// What one [`Reconciler::reconcile`] pass did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    /// The device was (re-)created in this pass.
    pub device_created: bool,
    /// Device drift found and fixed, in words.
    pub repairs: Vec<String>,
    /// Peers programmed after this pass.
    pub peers: usize,
    /// Kernel writes sent (0 when nothing differed).
    pub writes: usize,
    /// Stale kernel entries removed (part of `writes`).
    pub removed: usize,
    /// Writes the kernel refused, spelled as commands with the reason.
    pub failures: Vec<String>,
    /// Peers refused by validation.
    pub rejected: Vec<Rejected>,
    /// Wall time of the pass.
    pub elapsed: Duration,
}

/// Programs one node's overlay from a peer list; keeps the last accepted
/// set so conflicts resolve in favour of what is already in the kernel.
pub struct Reconciler {
    handle: Handle,
    config: OverlayConfig,
    programmed: BTreeMap<Ipv4Net, Lease>,
    /// The VtepMACs of `programmed`, for O(1) conflict checks.
    by_mac: HashMap<MacAddr, Ipv4Net>,
    /// Wanted peers refused for a conflict with a programmed one: removing
    /// or changing a programmed peer may let one of them in, which only a
    /// full pass decides (with the full precedence rules).
    conflict_losers: HashSet<Ipv4Net>,
    /// The underlay's networks as of the last pass (direct routing).
    direct_nets: Vec<Ipv4Net>,
    device: Option<Device>,
    /// Second socket for the parallel dumps.
    aux: Option<Handle>,
    /// What the last pass or apply wrote.
    last_writes: Vec<Change>,
}

/// The kernel objects of one peer: neighbour and FDB entry on the VXLAN
/// device (none for a direct-routed peer), its nexthop and its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerObjects {
    neighbour: Option<Neighbour>,
    fdb: Option<FdbEntry>,
    nexthop: Nexthop,
    route: Route,
}

/// The outcome of [`Reconciler::apply`].
#[derive(Debug)]
pub enum Applied {
    /// The changes were written; the report counts only their writes.
    Done(ReconcileReport),
    /// Nothing was written: the changes need a full pass, for this reason.
    NeedsFullPass(&'static str),
}

/// The kernel objects one pass wants, keyed as the kernel identifies them.
struct Wanted {
    neighbours: HashMap<Ipv4Addr, EthAddr>,
    fdb: HashMap<EthAddr, Ipv4Addr>,
    nexthops: HashMap<u32, Nexthop>,
    routes: HashMap<Ipv4Net, u32>,
}

impl Reconciler {
    /// A reconciler for `config`, working in the calling thread's network
    /// namespace.
    pub fn new(config: OverlayConfig) -> Result<Self, VxlanError> {
        config.check()?;
        Ok(Self {
            handle: Handle::new()?,
            config,
            programmed: BTreeMap::new(),
            by_mac: HashMap::new(),
            conflict_losers: HashSet::new(),
            direct_nets: Vec::new(),
            device: None,
            aux: None,
            last_writes: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OverlayConfig {
        &self.config
    }

    /// The device as of the last pass.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    /// The peers accepted in the last pass.
    pub fn programmed(&self) -> &BTreeMap<Ipv4Net, Lease> {
        &self.programmed
    }

    /// What the last [`Reconciler::reconcile`] or [`Reconciler::apply`]
    /// wrote, in order.
    pub fn last_writes(&self) -> &[Change] {
        &self.last_writes
    }

    /// Takes what the last pass or apply wrote, leaving nothing behind (a
    /// from-empty pass at 10 000 peers wrote 40 000 changes: not worth
    /// keeping once read).
    pub fn take_last_writes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.last_writes)
    }

    /// What the kernel holds for `peer` when it is programmed.
    fn objects(&self, device: &Device, peer: &Lease) -> PeerObjects {
        let id = nexthop_id(peer.subnet);
        let route = Route::via_nexthop(peer.subnet, id);
        if self.direct_nets.iter().any(|net| net.contains(&peer.public_ip)) {
            let nexthop = Nexthop { id, gateway: peer.public_ip, oif: device.underlay_index, onlink: false };
            return PeerObjects { neighbour: None, fdb: None, nexthop, route };
        }
        let gateway = peer.subnet.network();
        PeerObjects {
            neighbour: Some(Neighbour::permanent(device.index, gateway, peer.vtep_mac.0)),
            fdb: Some(FdbEntry { ifindex: device.index, mac: peer.vtep_mac.0, dst: peer.public_ip }),
            nexthop: Nexthop { id, gateway, oif: device.index, onlink: true },
            route,
        }
    }

    /// Applies per-peer changes with only the kernel writes they need — no
    /// dumps, work proportional to the change — on the state the last full
    /// pass established. Validation matches [`Reconciler::reconcile`]'s: a
    /// peer conflicting with a programmed one is refused. When a change
    /// could let a previously refused peer in (a programmed peer removed or
    /// changed while conflicts exist), or no pass ran yet, nothing is
    /// written and [`Applied::NeedsFullPass`] says why.
    ///
    /// The writes assume the kernel still holds what was programmed; a
    /// write the kernel refuses (someone removed an entry, say) shows in
    /// the report's failures and calls for a full pass.
    pub fn apply(&mut self, changes: &[PeerChange]) -> Result<Applied, VxlanError> {
        let started = Instant::now();
        let Some(device) = self.device.clone() else { return Ok(Applied::NeedsFullPass("no full pass yet")) };
        let frees_a_slot =
            |subnet: &Ipv4Net, lease: Option<&Lease>| self.programmed.get(subnet).is_some_and(|old| Some(old) != lease);
        if !self.conflict_losers.is_empty()
            && changes.iter().any(|c| match c {
                PeerChange::Upsert { lease, .. } => frees_a_slot(&lease.subnet, Some(lease)),
                PeerChange::Remove(subnet) => frees_a_slot(subnet, None),
            })
        {
            return Ok(Applied::NeedsFullPass("a refused peer may now fit"));
        }
        let mut writes = Vec::new();
        let mut rejected = Vec::new();
        for change in changes {
            let (subnet, lease) = match change {
                PeerChange::Upsert { lease, .. } => (lease.subnet, Some(lease)),
                PeerChange::Remove(subnet) => (*subnet, None),
            };
            if lease.is_some() && self.programmed.get(&subnet) == lease {
                continue;
            }
            self.conflict_losers.remove(&subnet);
            let old = self.programmed.remove(&subnet);
            if let Some(old) = &old {
                self.by_mac.remove(&old.vtep_mac);
            }
            let refusal = lease.and_then(|lease| match lone_defect(&self.config, lease) {
                Some(reason) => Some(Rejected { peer: lease.clone(), reason, conflict_with: None }),
                None => conflict(&self.programmed, &self.by_mac, lease),
            });
            let new = match (lease, refusal) {
                (Some(_), Some(refused)) => {
                    if refused.conflict_with.is_some() {
                        self.conflict_losers.insert(subnet);
                    }
                    rejected.push(refused);
                    None
                }
                (lease, _) => lease,
            };
            let old_objects = old.as_ref().map(|p| self.objects(&device, p));
            let new_objects = new.map(|p| self.objects(&device, p));
            changed_objects(old_objects, new_objects, &mut writes);
            if let Some(new) = new {
                self.by_mac.insert(new.vtep_mac, new.subnet);
                self.programmed.insert(new.subnet, new.clone());
            }
        }
        let failures = self.handle.apply(&writes)?.into_iter().map(|(_, error)| error.to_string()).collect();
        let report = ReconcileReport {
            device_created: false,
            repairs: Vec::new(),
            peers: self.programmed.len(),
            writes: writes.len(),
            removed: writes.iter().filter(|c| is_removal(c)).count(),
            failures,
            rejected,
            elapsed: started.elapsed(),
        };
        self.last_writes = writes;
        Ok(Applied::Done(report))
    }

    /// Makes the kernel match `peers`: device first (created, repaired), then
    /// per accepted peer neighbour, FDB, nexthop and route (flannel's order),
    /// after removing entries no peer wants (reverse order). Writes nothing
    /// when the kernel already matches.
    pub fn reconcile<'a>(&mut self, peers: impl IntoIterator<Item = &'a Lease>) -> Result<ReconcileReport, VxlanError> {
        let started = Instant::now();
        let device = device::ensure(&mut self.handle, &self.config)?;
        let validated = validate(&self.config, peers, &self.programmed);
        self.direct_nets = if self.config.direct_routing {
            self.handle
                .address()
                .list(device.underlay_index)?
                .into_iter()
                .filter_map(|a| Ipv4Net::new(a.local, a.prefix_len).ok())
                .collect()
        } else {
            Vec::new()
        };
        let wanted = self.wanted(&device, &validated.accepted);
        let mut changes = if device.created { Vec::new() } else { self.removals_and_updates(&device, &wanted)? };
        let removed = changes.iter().filter(|c| is_removal(c)).count();
        if device.created {
            self.additions_from_empty(&device, &validated.accepted, &wanted, &mut changes);
        }
        let failures = self.handle.apply(&changes)?.into_iter().map(|(_, error)| error.to_string()).collect();
        self.programmed = validated.accepted;
        self.by_mac = self.programmed.values().map(|p| (p.vtep_mac, p.subnet)).collect();
        self.conflict_losers =
            validated.rejected.iter().filter(|r| r.conflict_with.is_some()).map(|r| r.peer.subnet).collect();
        let report = ReconcileReport {
            device_created: device.created,
            repairs: device.repairs.clone(),
            peers: self.programmed.len(),
            writes: changes.len(),
            removed,
            failures,
            rejected: validated.rejected,
            elapsed: started.elapsed(),
        };
        self.device = Some(Device { created: false, repairs: Vec::new(), ..device });
        self.last_writes = changes;
        Ok(report)
    }

    fn wanted(&self, device: &Device, accepted: &BTreeMap<Ipv4Net, Lease>) -> Wanted {
        let n = accepted.len();
        let mut wanted = Wanted {
            neighbours: HashMap::with_capacity(n),
            fdb: HashMap::with_capacity(n),
            nexthops: HashMap::with_capacity(n),
            routes: HashMap::with_capacity(n),
        };
        for peer in accepted.values() {
            let objects = self.objects(device, peer);
            if let Some(neighbour) = objects.neighbour {
                wanted.neighbours.insert(neighbour.ip, peer.vtep_mac.0);
            }
            if let Some(fdb) = objects.fdb {
                wanted.fdb.insert(fdb.mac, fdb.dst);
            }
            wanted.nexthops.insert(objects.nexthop.id, objects.nexthop);
            wanted.routes.insert(peer.subnet, objects.nexthop.id);
        }
        wanted
    }

    /// From an empty device: everything, grouped by kind in flannel's order
    /// (all neighbours and FDB entries exist before any route uses them).
    fn additions_from_empty(
        &self,
        device: &Device,
        accepted: &BTreeMap<Ipv4Net, Lease>,
        wanted: &Wanted,
        changes: &mut Vec<Change>,
    ) {
        changes.reserve(accepted.len() * 4);
        let vxlan_peers = || accepted.values().filter(|p| wanted.neighbours.contains_key(&p.subnet.network()));
        changes.extend(
            vxlan_peers()
                .map(|p| Change::SetNeighbour(Neighbour::permanent(device.index, p.subnet.network(), p.vtep_mac.0))),
        );
        changes.extend(
            vxlan_peers()
                .map(|p| Change::SetFdb(FdbEntry { ifindex: device.index, mac: p.vtep_mac.0, dst: p.public_ip })),
        );
        changes.extend(
            accepted
                .values()
                .filter_map(|p| wanted.nexthops.get(&nexthop_id(p.subnet)))
                .map(|nh| Change::SetNexthop(*nh)),
        );
        changes.extend(accepted.values().map(|p| Change::SetRoute(Route::via_nexthop(p.subnet, nexthop_id(p.subnet)))));
    }

    /// Dumps what the device holds and lists the writes that make it match:
    /// removals first (routes, nexthops, FDB, neighbours), then additions and
    /// corrections (neighbours, FDB, nexthops, routes).
    fn removals_and_updates(&mut self, device: &Device, wanted: &Wanted) -> Result<Vec<Change>, VxlanError> {
        let dump_err = |source| VxlanError::Dump { device: self.config.device_name(), source };
        let network = self.config.network;
        let own_subnet = self.config.own.subnet;
        // Two sockets, two threads: a dump's kernel work runs in the reading
        // thread, so the L2 and L3 dumps overlap on two cores. The helper
        // thread inherits this thread's network namespace.
        let index = device.index;
        let aux = match self.aux.take() {
            Some(handle) => handle,
            None => Handle::new()?,
        };
        let (l2, nexthops, routes) = std::thread::scope(|scope| {
            let l2 = scope.spawn(move || {
                let mut aux = aux;
                let neighbours = aux.neighbour().list(index);
                let fdb = aux.fdb().list(index);
                (aux, neighbours, fdb)
            });
            let nexthops = self.handle.nexthop().list();
            let routes = self.handle.route().list();
            (l2.join(), nexthops, routes)
        });
        let (aux, neighbours, fdb) =
            l2.map_err(|_| VxlanError::DumpThreadPanicked { device: self.config.device_name() })?;
        self.aux = Some(aux);
        let (neighbours, fdb) = (neighbours.map_err(dump_err)?, fdb.map_err(dump_err)?);
        let (nexthops, routes) = (nexthops.map_err(dump_err)?, routes.map_err(dump_err)?);

        // Ownership: anything on the VXLAN device; on the underlay only the
        // nexthops whose id names a cluster subnet (direct routing) and the
        // gateway routes to cluster subnets.
        let owned_nexthop = |nh: &Nexthop| {
            nh.oif == device.index || (nh.oif == device.underlay_index && network.contains(&Ipv4Addr::from(nh.id)))
        };
        let owned_ids: HashSet<u32> = nexthops.iter().filter(|nh| owned_nexthop(nh)).map(|nh| nh.id).collect();
        let owned_route = |r: &Route| {
            r.dst != own_subnet
                && (r.oif == Some(device.index)
                    || matches!(r.via, RouteVia::Nexthop(id) if owned_ids.contains(&id))
                    || (network.contains(&r.dst)
                        && matches!(r.via, RouteVia::Gateway { oif, .. } if oif == device.underlay_index)))
        };

        let mut remove = Vec::new();
        let mut add = Vec::new();

        let mut route_ok = HashSet::with_capacity(wanted.routes.len());
        for route in routes.iter().filter(|r| owned_route(r)) {
            match wanted.routes.get(&route.dst) {
                Some(id) if route.via == RouteVia::Nexthop(*id) => {
                    route_ok.insert(route.dst);
                }
                // Wrong form (e.g. flannel's gateway route): replaced below.
                Some(_) => {}
                None => remove.push(Change::DeleteRoute(*route)),
            }
        }
        let mut nexthop_ok = HashSet::with_capacity(wanted.nexthops.len());
        for nexthop in nexthops.iter().filter(|nh| owned_nexthop(nh)) {
            match wanted.nexthops.get(&nexthop.id) {
                Some(want) if want == nexthop => {
                    nexthop_ok.insert(nexthop.id);
                }
                Some(_) => {}
                None => remove.push(Change::DeleteNexthop(*nexthop)),
            }
        }
        let mut fdb_ok = HashSet::with_capacity(wanted.fdb.len());
        for entry in &fdb {
            if wanted.fdb.get(&entry.mac) == Some(&entry.dst) {
                fdb_ok.insert(entry.mac);
            } else {
                // A stale peer, a moved peer's old address, or an extra remote.
                remove.push(Change::DeleteFdb(*entry));
            }
        }
        let mut neighbour_ok = HashSet::with_capacity(wanted.neighbours.len());
        for neighbour in neighbours.iter().filter(|n| network.contains(&n.ip)) {
            match wanted.neighbours.get(&neighbour.ip) {
                Some(mac) if neighbour.mac == Some(*mac) && neighbour.is_permanent() => {
                    neighbour_ok.insert(neighbour.ip);
                }
                Some(_) => {}
                None => remove.push(Change::DeleteNeighbour(*neighbour)),
            }
        }

        for (ip, mac) in &wanted.neighbours {
            if !neighbour_ok.contains(ip) {
                add.push(Change::SetNeighbour(Neighbour::permanent(device.index, *ip, *mac)));
            }
        }
        for (mac, dst) in &wanted.fdb {
            if !fdb_ok.contains(mac) {
                add.push(Change::SetFdb(FdbEntry { ifindex: device.index, mac: *mac, dst: *dst }));
            }
        }
        for (id, nexthop) in &wanted.nexthops {
            if !nexthop_ok.contains(id) {
                add.push(Change::SetNexthop(*nexthop));
            }
        }
        for (dst, id) in &wanted.routes {
            if !route_ok.contains(dst) {
                add.push(Change::SetRoute(Route::via_nexthop(*dst, *id)));
            }
        }
        // Removals in reverse order of creation; kinds are already grouped.
        remove.extend(add);
        Ok(remove)
    }
}

/// The writes that turn one peer's kernel objects from `old` into `new`
/// (either may be absent): additions and replacements in flannel's order
/// (neighbour, FDB, nexthop, route) before anything the old form no longer
/// needs is removed; a removed peer goes in reverse order (route, nexthop,
/// FDB, neighbour).
fn changed_objects(old: Option<PeerObjects>, new: Option<PeerObjects>, writes: &mut Vec<Change>) {
    match (old, new) {
        (None, None) => {}
        (Some(old), None) => {
            writes.push(Change::DeleteRoute(old.route));
            writes.push(Change::DeleteNexthop(old.nexthop));
            writes.extend(old.fdb.map(Change::DeleteFdb));
            writes.extend(old.neighbour.map(Change::DeleteNeighbour));
        }
        (old, Some(new)) => {
            let old_neighbour = old.and_then(|o| o.neighbour);
            let old_fdb = old.and_then(|o| o.fdb);
            if new.neighbour.is_some() && new.neighbour != old_neighbour {
                writes.extend(new.neighbour.map(Change::SetNeighbour));
            }
            if new.fdb.is_some() && new.fdb != old_fdb {
                // A same-MAC entry is replaced in place (its remote changes).
                writes.extend(new.fdb.map(Change::SetFdb));
            }
            if old.map(|o| o.nexthop) != Some(new.nexthop) {
                writes.push(Change::SetNexthop(new.nexthop));
            }
            if old.map(|o| o.route) != Some(new.route) {
                writes.push(Change::SetRoute(new.route));
            }
            if let Some(fdb) = old_fdb.filter(|fdb| new.fdb.is_none_or(|n| n.mac != fdb.mac)) {
                writes.push(Change::DeleteFdb(fdb));
            }
            if let Some(neighbour) = old_neighbour.filter(|_| new.neighbour.is_none()) {
                writes.push(Change::DeleteNeighbour(neighbour));
            }
        }
    }
}

fn is_removal(change: &Change) -> bool {
    matches!(
        change,
        Change::DeleteRoute(_) | Change::DeleteNexthop(_) | Change::DeleteFdb(_) | Change::DeleteNeighbour(_)
    )
}
