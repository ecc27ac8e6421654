//! The etcd registry: flannel's v3 layout exactly, so netd nodes and flannel
//! nodes can share one etcd (3.4 or later) and see each other as peers.
//!
//! # Layout
//!
//! Under a prefix, `/coreos.com/network` by default (flannel's
//! `-etcd-prefix`; see [`EtcdRegistry::with_prefix`]):
//!
//! | key | value | etcd lease | read by flannel |
//! |---|---|---|---|
//! | `<prefix>/config` | `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}` | none | yes |
//! | `<prefix>/subnets/10.244.3.0-24` | `{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"…"}}` | 24 h | yes |
//! | `<prefix>/nodes/10.244.3.0-24` | the node name, e.g. `edge-7` | the subnet key's | no |
//! | `<prefix>/autonomy/<node>` | `true` or `false` | none | no |
//! | `<prefix>/autonomy-duration/<node>` | a Go duration, e.g. `2h0m0s` | none | no |
//! | `<prefix>/reserved/<node>` | `{"version":1,"subnet":"10.244.3.0/24","renewedAt":1764636000}` | none | no |
//! | `<prefix>/bootstrap-tokens/<id>` | a [`TokenRecord`](super::TokenRecord) (JSON) | until it expires | no |
//!
//! The first two are flannel's own and byte-exact (netd writes no other
//! fields, and reads flannel's additional ones, e.g. `"PublicIPv6":null`).
//! The others are netd's: flannel reads only `config` and `subnets/`, so
//! they are invisible to it. flannel's lease carries no node name, so netd
//! stores its node name beside the lease in `nodes/<subnet>`, attached to the
//! same etcd lease so both vanish together; peers that are flannel nodes
//! (no `nodes/` key) have `Lease::node == None` and are never autonomous.
//! `autonomy/<node>` holds the flag [`Registry::set_autonomy`] sets; it has
//! no etcd lease, as autonomy must outlive a node's silence.
//!
//! Layout versions of netd's keys: version 1 had `nodes/` and `autonomy/`;
//! version 2 (this netd) adds `autonomy-duration/<node>`, which bounds an
//! autonomy that `autonomy/<node>` switches on (OpenYurt's
//! `node.openyurt.io/autonomy-duration`; `0` or no key: no time limit). The
//! flag keeps its version 1 values, so netd builds that know only version
//! 1 read it as before (they see a bounded node as autonomous with no
//! limit, which is how every netd keeps peers' routes anyway). The bound
//! alone does not switch autonomy on, and turning autonomy off writes
//! `false` and deletes the bound in one transaction. Version 3 adds
//! `reserved/<node>` (below); older netd builds ignore it, so they may give a
//! lapsed autonomous node's subnet away as before.
//!
//! An autonomous node cut off for more than 24 h loses its lease key (etcd
//! deletes it with its etcd lease), yet it keeps serving its pods from that
//! subnet. So while a node is autonomous netd also keeps `reserved/<node>`:
//! the subnet and when the node last renewed (unix seconds), with no etcd
//! lease. It is written with every acquire and renewal of an autonomous
//! node and by [`Registry::set_autonomy`] (for the subnet the node holds),
//! and deleted when autonomy is turned off. Acquiring never picks a subnet
//! reserved for another node whose autonomy still holds
//! ([`Autonomy::holds_at`]: always, or until its bound has run from
//! `renewedAt`), and the node itself, back, takes its reserved subnet first.
//! flannel nodes do not read it.
//!
//! # Semantics
//!
//! - **Acquire** (flannel's order): a lease already held by this public IP
//!   (as flannel reuses it) or by this node name (`nodes/` key) is kept and
//!   re-published; other leases held by either are stale copies and removed;
//!   otherwise `previous_subnet` (or the subnet reserved for this node) if
//!   free, else the first free subnet ([`pick_subnet`]) that no autonomous
//!   node has reserved. A new key is created in a transaction that compares
//!   the key's version with 0 (compare-and-swap); losing the race to another
//!   node means reading again and trying another subnet.
//! - **Renew**: the key's etcd lease gets a keep-alive (back to 24 h) and the
//!   value is re-put in a transaction that checks the key was not changed
//!   meanwhile; a lease that is not a 24 h one is replaced by a fresh one. A
//!   key that vanished (expired while the node was cut off) is acquired
//!   again, preferring the same subnet.
//! - **Watch**: a prefix Get gives the full peer set and a revision R
//!   ([`PeerEvent::Resync`]); a watch from R + 1 then turns puts into
//!   [`PeerEvent::Upsert`] and deletes — lease expiry included — into
//!   [`PeerEvent::Remove`]. Any error, a closed stream or a watch etcd
//!   cancels (its history was compacted) is returned as
//!   [`RegistryError::Unreachable`] and makes the next call a resync.
//!   [`Registry::next_event`] is cancel-safe: dropping it (as a `select!`
//!   does) loses no event.
//! - **Bad data** (garbage JSON, wrong types, a non-vxlan backend, a key that
//!   is not `<ip>-<len>`, a subnet that is not a `/SubnetLen` of the network)
//!   is skipped with a `tracing::warn!` naming the key and the reason; a peer
//!   whose value turns bad is removed. Our own subnet is never a peer.
//! - Every request has a deadline of [`REQUEST_TIMEOUT`]; HTTP/2 keep-alive
//!   pings notice a silently lost etcd while watching. The client reconnects
//!   by itself once etcd is back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netd_model::MacAddr;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, LeaseClient, PutOptions, Txn, TxnOp,
    WatchClient, WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;

use super::{
    pick_subnet, AutonomyChange, LeaseRequest, NetworkConfig, NodeAutonomy, NodeLeaseState, OwnLease, PeerEvent,
    PeerLease, Registry, RegistryError, LEASE_TTL,
};
use netd_model::autonomy::{self, format_go_duration, parse_go_duration, Autonomy};
use netd_model::flannel::{self, LeaseAttrs, CONFIG_KEY, SUBNETS_PREFIX};
use netd_model::Lease;

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Deadline of every etcd request (and of connecting).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive ping interval and timeout (etcd refuses pings more
/// often than every 5 s).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Largest response accepted: a full listing of many thousand nodes.
const MAX_MESSAGE: usize = 256 << 20;
/// Compare-and-swap rounds lost in a row before acquiring gives up.
const CAS_ATTEMPTS: usize = 16;

/// The format of a `reserved/<node>` value this netd writes and reads.
const RESERVATION_VERSION: u32 = 1;

/// `reserved/<node>` (layout version 3): the subnet kept for an autonomous
/// node whose lease may lapse, and when the node last renewed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Reservation {
    version: u32,
    subnet: Ipv4Net,
    /// Unix seconds of the node's last acquire or renewal.
    #[serde(rename = "renewedAt")]
    renewed_at: u64,
}

impl Reservation {
    fn new(subnet: Ipv4Net, renewed_at: SystemTime) -> Self {
        let renewed_at = renewed_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { version: RESERVATION_VERSION, subnet, renewed_at }
    }

    fn to_json(&self) -> String {
        // A struct of a number, a subnet and a number always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn parse(value: &[u8]) -> Result<Self, String> {
        let reservation: Self = serde_json::from_slice(value).map_err(|e| format!("not a reservation: {e}"))?;
        if reservation.version != RESERVATION_VERSION {
            return Err(format!("format version {}, this netd reads {RESERVATION_VERSION}", reservation.version));
        }
        Ok(reservation)
    }

    fn renewed_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.renewed_at)
    }
}

/// `node`'s autonomy from the texts of its `autonomy/` and
/// `autonomy-duration/` keys (`None`: no key), and what was wrong with
/// them, naming the key: an unreadable flag is off, an unreadable bound no
/// time limit.
fn read_autonomy(keys: &Keys, node: &str, flag: Option<&str>, bound: Option<&str>) -> (Autonomy, Option<String>) {
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

/// The keys of one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    /// `<prefix>/`: everything the watch covers.
    root: String,
    config: String,
    subnets: String,
    nodes: String,
    autonomy: String,
    autonomy_duration: String,
    reserved: String,
    tokens: String,
}

/// What a key under the prefix is.
enum KeyKind<'k> {
    Config,
    Subnet(&'k str),
    Node(&'k str),
    Autonomy(&'k str),
    AutonomyDuration(&'k str),
    Reserved(&'k str),
    Other,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/').to_string();
        // flannel's constants, moved under another prefix.
        let rebase = |key: &str| format!("{prefix}{}", key.strip_prefix(DEFAULT_PREFIX).unwrap_or(key));
        Self {
            root: format!("{prefix}/"),
            config: rebase(CONFIG_KEY),
            subnets: rebase(SUBNETS_PREFIX),
            nodes: format!("{prefix}/nodes/"),
            autonomy: format!("{prefix}/autonomy/"),
            autonomy_duration: format!("{prefix}/autonomy-duration/"),
            reserved: format!("{prefix}/reserved/"),
            tokens: format!("{prefix}/bootstrap-tokens/"),
            prefix,
        }
    }

    fn subnet(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets, flannel::subnet_key(subnet))
    }

    fn node(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.nodes, flannel::subnet_key(subnet))
    }

    fn autonomy(&self, node: &str) -> String {
        format!("{}{node}", self.autonomy)
    }

    fn autonomy_duration(&self, node: &str) -> String {
        format!("{}{node}", self.autonomy_duration)
    }

    fn reserved(&self, node: &str) -> String {
        format!("{}{node}", self.reserved)
    }

    fn classify<'k>(&self, key: &'k str) -> KeyKind<'k> {
        if key == self.config {
            KeyKind::Config
        } else if let Some(rest) = key.strip_prefix(&self.subnets) {
            KeyKind::Subnet(rest)
        } else if let Some(rest) = key.strip_prefix(&self.nodes) {
            KeyKind::Node(rest)
        } else if let Some(rest) = key.strip_prefix(&self.autonomy) {
            KeyKind::Autonomy(rest)
        } else if let Some(rest) = key.strip_prefix(&self.autonomy_duration) {
            KeyKind::AutonomyDuration(rest)
        } else if let Some(rest) = key.strip_prefix(&self.reserved) {
            KeyKind::Reserved(rest)
        } else {
            KeyKind::Other
        }
    }
}

/// A registry in etcd, in flannel's v3 layout (see the module docs).
pub struct EtcdRegistry {
    /// The endpoints, for messages.
    endpoints: String,
    kv: KvClient,
    leases: LeaseClient,
    watcher: WatchClient,
    keys: Keys,
    /// The network config last read.
    config: Option<NetworkConfig>,
    /// The running watch; `None`: the next event is a resync.
    watch: Option<Watching>,
    /// Peer events decoded but not yet returned.
    pending: VecDeque<PeerEvent>,
}

struct Watching {
    stream: WatchStream,
    view: View,
}

impl EtcdRegistry {
    /// Connects to etcd at `endpoints` (`http://host:port`, or `host:port`)
    /// and checks that it answers. An etcd that does not answer within
    /// [`REQUEST_TIMEOUT`] is [`RegistryError::Unreachable`]; malformed
    /// endpoints are [`RegistryError::BadConfig`].
    pub async fn connect(endpoints: &[String]) -> Result<Self, RegistryError> {
        let mut registry = Self::connect_lazy(endpoints).await?;
        let key = registry.keys.config.clone();
        let what = format!("reading {key}");
        rpc(&registry.endpoints, &what, registry.kv.get(key, Some(GetOptions::new().with_count_only()))).await?;
        Ok(registry)
    }

    /// Like [`connect`](Self::connect) without the check: nothing is sent
    /// until the first call, which reports [`RegistryError::Unreachable`] while
    /// etcd is away. For a daemon that must start while the cloud is down.
    pub async fn connect_lazy(endpoints: &[String]) -> Result<Self, RegistryError> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(RegistryError::BadConfig("no etcd endpoint given".into()));
        }
        let options = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT).with_keep_alive(KEEPALIVE, KEEPALIVE);
        let client = Client::connect(endpoints, Some(options)).await.map_err(|e| match e {
            etcd_client::Error::InvalidUri(_) | etcd_client::Error::InvalidArgs(_) => {
                RegistryError::BadConfig(format!("etcd endpoints {joined:?}: {e}"))
            }
            other => RegistryError::Unreachable(format!("connecting to etcd at {joined}: {other}")),
        })?;
        Ok(Self {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            leases: client.lease_client(),
            watcher: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            endpoints: joined,
            keys: Keys::new(DEFAULT_PREFIX),
            config: None,
            watch: None,
            pending: VecDeque::new(),
        })
    }

    /// Uses `prefix` instead of [`DEFAULT_PREFIX`] (flannel's `-etcd-prefix`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.keys = Keys::new(prefix);
        self.watch = None;
        self.pending.clear();
        self.config = None;
        self
    }

    /// Writes the network config unless one is there: an equal one (parsed,
    /// whatever its spelling) is fine, a different one is
    /// [`RegistryError::BadConfig`]. flannel's operators write this key by
    /// hand; this is the `netd registry init` of the etcd backend.
    pub async fn put_network_config(&mut self, config: &NetworkConfig) -> Result<(), RegistryError> {
        config.check()?;
        let key = self.keys.config.clone();
        let json = flannel::network_config_json(config);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), json.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let what = format!("writing {key}");
        let response = rpc(&self.endpoints, &what, self.kv.txn(txn)).await?;
        if response.succeeded() {
            self.config = Some(*config);
            return Ok(());
        }
        let existing = self.network_config().await?;
        if existing != *config {
            return Err(RegistryError::BadConfig(format!(
                "{key} already holds {}, not {json}",
                flannel::network_config_json(&existing)
            )));
        }
        Ok(())
    }

    /// Drops the watch: the next event is a resync.
    fn lose_watch(&mut self) {
        self.watch = None;
        self.pending.clear();
    }

    /// Every key under the prefix, and the revision of the listing.
    async fn list(&mut self) -> Result<(i64, Vec<etcd_client::KeyValue>), RegistryError> {
        let root = self.keys.root.clone();
        let what = format!("listing {root}");
        let mut response =
            rpc(&self.endpoints, &what, self.kv.get(root.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = response.header().map(|h| h.revision()).ok_or_else(|| {
            RegistryError::Unreachable(format!("{what}: etcd at {} answered without a revision", self.endpoints))
        })?;
        Ok((revision, response.take_kvs()))
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

impl Registry for EtcdRegistry {
    fn describe(&self) -> String {
        format!("etcd {} (prefix {})", self.endpoints, self.keys.prefix)
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, RegistryError> {
        let key = self.keys.config.clone();
        let what = format!("reading {key}");
        let response = rpc(&self.endpoints, &what, self.kv.get(key.clone(), None)).await?;
        let kv = response.kvs().first().ok_or_else(|| missing_config(&key, &self.endpoints))?;
        let config = flannel::parse_network_config(kv.value()).map_err(|e| config_error(&key, e.into()))?;
        self.config = Some(config);
        Ok(config)
    }

    async fn acquire_lease(
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

    async fn renew_lease(&mut self, lease: &OwnLease) -> Result<OwnLease, RegistryError> {
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

    async fn next_event(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
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

    async fn set_autonomy(&mut self, node: &str, autonomy: Autonomy) -> Result<Vec<AutonomyChange>, RegistryError> {
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

    async fn node_autonomy(&mut self, node: &str) -> Result<NodeAutonomy, RegistryError> {
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
        let reason = super::known_names(&what, &names)
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

impl EtcdRegistry {
    fn token_key(&self, id: &str) -> Result<String, RegistryError> {
        if id.is_empty() || id.contains('/') {
            return Err(RegistryError::Refused {
                what: format!("naming bootstrap token {id:?}"),
                reason: "a token id must be non-empty and without '/'".into(),
            });
        }
        Ok(format!("{}{id}", self.keys.tokens))
    }
}

impl super::TokenStore for EtcdRegistry {
    async fn put_token(&mut self, record: &super::TokenRecord) -> Result<(), RegistryError> {
        let key = self.token_key(&record.id)?;
        let what = format!("writing {key}");
        let options = match record.expires_at {
            None => None,
            Some(at) => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let ttl = i64::try_from(at.saturating_sub(now).max(1)).unwrap_or(i64::MAX);
                let lease = rpc(&self.endpoints, &what, self.leases.grant(ttl, None)).await?;
                Some(PutOptions::new().with_lease(lease.id()))
            }
        };
        rpc(&self.endpoints, &what, self.kv.put(key.clone(), record.to_json(), options)).await?;
        Ok(())
    }

    async fn token(&mut self, id: &str) -> Result<Option<super::TokenRecord>, RegistryError> {
        let key = self.token_key(id)?;
        let what = format!("reading {key}");
        let response = rpc(&self.endpoints, &what, self.kv.get(key.clone(), None)).await?;
        response
            .kvs()
            .first()
            .map(|kv| super::TokenRecord::from_json(id, kv.value()).map_err(super::tokens::bad_record))
            .transpose()
    }

    async fn tokens(&mut self) -> Result<Vec<super::TokenRecord>, RegistryError> {
        let prefix = self.keys.tokens.clone();
        let what = format!("listing {prefix}");
        let response =
            rpc(&self.endpoints, &what, self.kv.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let mut records = Vec::new();
        for kv in response.kvs() {
            let id = String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).unwrap_or_default().to_string();
            match super::TokenRecord::from_json(&id, kv.value()) {
                Ok(record) => records.push(record),
                Err(error) => tracing::warn!("etcd at {}: skipping: {error}", self.endpoints),
            }
        }
        Ok(records)
    }

    async fn delete_token(&mut self, id: &str) -> Result<bool, RegistryError> {
        let key = self.token_key(id)?;
        let what = format!("deleting {key}");
        let response = rpc(&self.endpoints, &what, self.kv.delete(key.clone(), None)).await?;
        Ok(response.deleted() > 0)
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

fn ttl_secs() -> i64 {
    LEASE_TTL.as_secs() as i64
}

fn own_lease(subnet: Ipv4Net, request: &LeaseRequest, granted_at: SystemTime, ttl: i64) -> OwnLease {
    OwnLease { lease: request.lease_for(subnet), expires_at: Some(granted_at + Duration::from_secs(ttl.max(0) as u64)) }
}

fn missing_config(key: &str, endpoints: &str) -> RegistryError {
    RegistryError::BadConfig(format!(
        "etcd {endpoints} holds no {key}; write flannel's network config there, e.g. \
         {{\"Network\":\"10.244.0.0/16\",\"SubnetLen\":24,\"Backend\":{{\"Type\":\"vxlan\",\"VNI\":1}}}}"
    ))
}

fn config_error(key: &str, error: RegistryError) -> RegistryError {
    match error {
        RegistryError::BadConfig(reason) => RegistryError::BadConfig(format!("{key}: {reason}")),
        other => other,
    }
}

/// Runs one etcd request with the [`REQUEST_TIMEOUT`] deadline.
async fn rpc<T>(
    endpoints: &str,
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(map_error(endpoints, what, e)),
        Err(_) => Err(timed_out(endpoints, what)),
    }
}

fn timed_out(endpoints: &str, what: &str) -> RegistryError {
    RegistryError::Unreachable(format!(
        "{what}: etcd at {endpoints} did not answer within {} s",
        REQUEST_TIMEOUT.as_secs()
    ))
}

/// etcd's answers that retrying will not change are refusals; everything
/// else (connection refused or lost, no leader, timeouts) is transient.
fn map_error(endpoints: &str, what: &str, error: etcd_client::Error) -> RegistryError {
    // gRPC codes: INVALID_ARGUMENT 3, NOT_FOUND 5, ALREADY_EXISTS 6,
    // PERMISSION_DENIED 7, RESOURCE_EXHAUSTED 8, FAILED_PRECONDITION 9,
    // OUT_OF_RANGE 11, UNIMPLEMENTED 12, UNAUTHENTICATED 16.
    const REFUSALS: [i32; 9] = [3, 5, 6, 7, 8, 9, 11, 12, 16];
    match error {
        etcd_client::Error::GRpcStatus(status) if REFUSALS.contains(&i32::from(status.code())) => {
            RegistryError::Refused {
                what: format!("{what} (etcd {endpoints})"),
                reason: format!("{:?}: {}", status.code(), status.message()),
            }
        }
        etcd_client::Error::GRpcStatus(status) => RegistryError::Unreachable(format!(
            "{what}: etcd at {endpoints}: {:?}: {}",
            status.code(),
            status.message()
        )),
        other => RegistryError::Unreachable(format!("{what}: etcd at {endpoints}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_is_exact_json_and_refuses_what_it_cannot_read() {
        const EXAMPLE: &str = r#"{"version":1,"subnet":"10.244.3.0/24","renewedAt":1764636000}"#;
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap_or_default();
        let reservation = Reservation::new(subnet, UNIX_EPOCH + Duration::from_secs(1_764_636_000));
        assert_eq!(reservation.to_json(), EXAMPLE);
        assert_eq!(Reservation::parse(EXAMPLE.as_bytes()), Ok(reservation.clone()));
        assert_eq!(reservation.renewed_at(), UNIX_EPOCH + Duration::from_secs(1_764_636_000));
        let newer = EXAMPLE.replace("\"version\":1", "\"version\":2");
        assert_eq!(Reservation::parse(newer.as_bytes()), Err("format version 2, this netd reads 1".into()));
        for bad in ["", "{", "[]", r#"{"version":1,"subnet":"10.244.3.0/33","renewedAt":1}"#, r#"{"version":1}"#] {
            let err = Reservation::parse(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("not a reservation: "), "{bad}: {err}");
        }
        let key = Keys::new(DEFAULT_PREFIX).reserved("edge-7");
        assert_eq!(key, "/coreos.com/network/reserved/edge-7");
        assert!(matches!(Keys::new(DEFAULT_PREFIX).classify(&key), KeyKind::Reserved("edge-7")));
    }

    #[test]
    fn keys_follow_flannels_layout_under_any_prefix() {
        let keys = Keys::new(DEFAULT_PREFIX);
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(keys.config, CONFIG_KEY);
        assert_eq!(keys.subnet(subnet), "/coreos.com/network/subnets/10.244.3.0-24");
        assert_eq!(keys.node(subnet), "/coreos.com/network/nodes/10.244.3.0-24");
        assert_eq!(keys.autonomy("edge-1"), "/coreos.com/network/autonomy/edge-1");
        let other = Keys::new("/acme/net/");
        assert_eq!(other.config, "/acme/net/config");
        assert_eq!(other.subnet(subnet), "/acme/net/subnets/10.244.3.0-24");
        assert!(matches!(other.classify("/acme/net/subnets/x"), KeyKind::Subnet("x")));
        assert!(matches!(other.classify("/acme/net/autonomy/n"), KeyKind::Autonomy("n")));
        assert!(matches!(other.classify("/coreos.com/network/config"), KeyKind::Other));
    }

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
