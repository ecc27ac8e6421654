//! Desired peers vs kernel state: read what the device holds, write only the
//! difference, in one batch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::netlink::{Change, EthAddr, FdbEntry, Handle, Neighbour, NetlinkError, Nexthop, Route, RouteVia};
use ipnet::Ipv4Net;

use super::device::{self, Device};
use super::peers::{nexthop_id, validate, Rejected};
use super::{Lease, OverlayConfig, VxlanError};

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
    device: Option<Device>,
    /// Second socket for the parallel dumps.
    aux: Option<Handle>,
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
        Ok(Self { handle: Handle::new()?, config, programmed: BTreeMap::new(), device: None, aux: None })
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

    /// Makes the kernel match `peers`: device first (created, repaired), then
    /// per accepted peer neighbour, FDB, nexthop and route (flannel's order),
    /// after removing entries no peer wants (reverse order). Writes nothing
    /// when the kernel already matches.
    pub fn reconcile(&mut self, peers: &[Lease]) -> Result<ReconcileReport, VxlanError> {
        let started = Instant::now();
        let device = device::ensure(&mut self.handle, &self.config)?;
        let validated = validate(&self.config, peers, &self.programmed);
        let direct_nets = if self.config.direct_routing {
            self.handle
                .address()
                .list(device.underlay_index)?
                .into_iter()
                .filter_map(|a| Ipv4Net::new(a.local, a.prefix_len).ok())
                .collect()
        } else {
            Vec::new()
        };
        let wanted = self.wanted(&device, &validated.accepted, &direct_nets);
        let mut changes = if device.created { Vec::new() } else { self.removals_and_updates(&device, &wanted)? };
        let removed = changes.iter().filter(|c| is_removal(c)).count();
        if device.created {
            self.additions_from_empty(&device, &validated.accepted, &wanted, &mut changes);
        }
        let failures = self.handle.apply(&changes)?.into_iter().map(|(_, error)| error.to_string()).collect();
        self.programmed = validated.accepted;
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
        Ok(report)
    }

    fn wanted(&self, device: &Device, accepted: &BTreeMap<Ipv4Net, Lease>, direct_nets: &[Ipv4Net]) -> Wanted {
        let n = accepted.len();
        let mut wanted = Wanted {
            neighbours: HashMap::with_capacity(n),
            fdb: HashMap::with_capacity(n),
            nexthops: HashMap::with_capacity(n),
            routes: HashMap::with_capacity(n),
        };
        for peer in accepted.values() {
            let id = nexthop_id(peer.subnet);
            let direct = direct_nets.iter().any(|net| net.contains(&peer.public_ip));
            let nexthop = if direct {
                Nexthop { id, gateway: peer.public_ip, oif: device.underlay_index, onlink: false }
            } else {
                wanted.neighbours.insert(peer.subnet.network(), peer.vtep_mac.0);
                wanted.fdb.insert(peer.vtep_mac.0, peer.public_ip);
                Nexthop { id, gateway: peer.subnet.network(), oif: device.index, onlink: true }
            };
            wanted.nexthops.insert(id, nexthop);
            wanted.routes.insert(peer.subnet, id);
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
        let (aux, neighbours, fdb) = l2.map_err(|_| VxlanError::Dump {
            device: self.config.device_name(),
            source: NetlinkError::Malformed("dump thread panicked".into()),
        })?;
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

fn is_removal(change: &Change) -> bool {
    matches!(
        change,
        Change::DeleteRoute(_) | Change::DeleteNexthop(_) | Change::DeleteFdb(_) | Change::DeleteNeighbour(_)
    )
}
