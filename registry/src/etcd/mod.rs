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
//! | `<prefix>/tunnel-replicas/<id>` | a [`ReplicaRecord`](super::ReplicaRecord) (JSON) | until it expires | no |
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
//!   free, else the first free subnet ([`pick_subnet`](super::pick_subnet)) that no autonomous
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
//!
//! # Code
//!
//! One submodule per job, as the jobs share only the client and the key
//! layout. [`EtcdRegistry`], connecting and the [`Registry`] impl stay
//! here: a trait impl cannot be split across files, so each of its methods
//! hands over to the submodule of its job.
//!
//! - `keys`: the key layout: every key's name, and what a key read back is.
//! - `config`: the network config key: reading it, writing it once, and the
//!   errors naming it.
//! - `lease`: this node's own lease: acquire (compare-and-swap rounds, stale
//!   copies removed), renew, and the etcd leases under it.
//! - `reservation`: the `reserved/<node>` value, which lease and autonomy
//!   both read and write.
//! - `autonomy`: a node's autonomy flag and bound, and the look-ups by node
//!   name they need.
//! - `view`: the peer view: resync, then the watch turned into
//!   [`PeerEvent`]s.
//! - `tokens`: bootstrap tokens under `bootstrap-tokens/`.
//! - `replicas`: tunnel server replicas' announcements under
//!   `tunnel-replicas/`.
//! - `rpc`: one request under the deadline, etcd's errors sorted, and the
//!   listing of the prefix.

mod autonomy;
mod config;
mod keys;
mod lease;
mod replicas;
mod reservation;
mod rpc;
mod tokens;
mod view;

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient, LeaseClient, WatchClient};
use ipnet::Ipv4Net;
use netd_model::autonomy::Autonomy;

use super::{AutonomyChange, LeaseRequest, NetworkConfig, NodeAutonomy, OwnLease, PeerEvent, Registry, RegistryError};
use keys::Keys;
use rpc::rpc;

pub use keys::DEFAULT_PREFIX;

/// Deadline of every etcd request (and of connecting).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive ping interval and timeout (etcd refuses pings more
/// often than every 5 s).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Largest response accepted: a full listing of many thousand nodes.
const MAX_MESSAGE: usize = 256 << 20;

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
    watch: Option<view::Watching>,
    /// Peer events decoded but not yet returned.
    pending: VecDeque<PeerEvent>,
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
}

impl Registry for EtcdRegistry {
    fn describe(&self) -> String {
        format!("etcd {} (prefix {})", self.endpoints, self.keys.prefix)
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, RegistryError> {
        self.read_network_config().await
    }

    async fn acquire_lease(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
    ) -> Result<OwnLease, RegistryError> {
        self.acquire(config, request).await
    }

    async fn renew_lease(&mut self, lease: &OwnLease) -> Result<OwnLease, RegistryError> {
        self.renew(lease).await
    }

    async fn next_event(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        self.next_peer_event(own_subnet).await
    }

    async fn set_autonomy(&mut self, node: &str, autonomy: Autonomy) -> Result<Vec<AutonomyChange>, RegistryError> {
        self.write_autonomy(node, autonomy).await
    }

    async fn node_autonomy(&mut self, node: &str) -> Result<NodeAutonomy, RegistryError> {
        self.read_node_autonomy(node).await
    }
}
