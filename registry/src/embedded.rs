//! The embedded registry: one SQLite file shared by the netd processes of a
//! host — single-host installs and the demo's cluster of namespaces. No
//! server to run.
//!
//! Each operation opens the file, works in one transaction and closes it:
//! processes never hold it open, so concurrent daemons serialise on SQLite's
//! lock, and a file that vanishes (unmounted, moved away) makes the registry
//! *unreachable* at once, exactly like a network registry going down. The
//! file is created only by [`EmbeddedRegistry::create`], never implicitly.
//!
//! Leases store flannel's lease JSON (the etcd value) so the same parser
//! reads every backend; watching is a poll of the lease table, diffed
//! against what was seen.
//!
//! # Format
//!
//! The version is SQLite's `PRAGMA user_version`.
//!
//! - **Version 2** (this netd): `meta(key, value)` with the network config
//!   JSON under `config`; `lease(subnet PK '10.244.3.0-24', node UNIQUE,
//!   attrs, expires_at unix seconds)`; `autonomy(node PK, autonomous 0|1,
//!   bound_ns)`, where `bound_ns` bounds the autonomy (nanoseconds after
//!   the node is cut off, as OpenYurt's `node.openyurt.io/autonomy-duration`)
//!   and `NULL` means no time limit.
//! - **Version 1**: the same without `autonomy.bound_ns`. The first open by
//!   this netd upgrades such a file in place (one immediate transaction
//!   adds the column, every row keeping its flag with no time limit). netd
//!   builds that read only version 1 refuse the upgraded file ("format
//!   version 2"): upgrade every netd sharing a file together.
//!
//! A file of a later version is refused, never downgraded. Either
//! version may also hold tables that older netds ignore, each created by
//! the first write that needs it (so none changes `user_version`):
//!
//! - `bootstrap_token(id PK, record)`, by the first token stored (see
//!   [`super::tokens`]);
//! - `tunnel_replica(id PK, record, expires_at unix seconds)`, by the first
//!   tunnel server replica announcement (see [`super::replicas`]): the
//!   [`ReplicaRecord`](super::ReplicaRecord) JSON, and its `expiresAt` again
//!   so that expired rows are skipped and deleted without parsing them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::{
    pick_subnet, AutonomyChange, LeaseRequest, NetworkConfig, NodeAutonomy, NodeLeaseState, OwnLease, PeerEvent,
    PeerLease, Registry, RegistryError, LEASE_TTL,
};
use netd_model::autonomy::{format_go_duration, Autonomy};
use netd_model::flannel::{self, LeaseAttrs};
use netd_model::Lease;

/// Where the daemon looks for the embedded registry by default.
pub const DEFAULT_PATH: &str = "/var/lib/netd/registry.db";
/// How often an embedded registry's readers look for changes: a change
/// reaches peers within this, at one small SQLite read per interval.
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_millis(250);
const FORMAT_VERSION: i64 = 2;

/// A registry in a local SQLite file.
pub struct EmbeddedRegistry {
    path: PathBuf,
    poll: Duration,
    /// Peers as last reported; `None` until a resync was delivered.
    known: Option<BTreeMap<Ipv4Net, PeerLease>>,
    pending: VecDeque<PeerEvent>,
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl EmbeddedRegistry {
    /// Creates the registry file with `config` (idempotent: an existing file
    /// with the same config is fine; a different config is an error).
    pub fn create(path: &Path, config: &NetworkConfig) -> Result<(), RegistryError> {
        config.check()?;
        let unusable = |reason: String| RegistryError::Store { path: path.to_path_buf(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| RegistryError::StoreDir {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(|e| store_err(path, e))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(|e| store_err(path, e))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| store_err(path, e))?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| store_err(path, e))?;
        match version {
            0 => {
                tx.execute_batch(
                    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                     CREATE TABLE IF NOT EXISTS lease(subnet TEXT PRIMARY KEY, node TEXT NOT NULL UNIQUE,
                                                      attrs TEXT NOT NULL, expires_at INTEGER NOT NULL);
                     CREATE TABLE IF NOT EXISTS autonomy(node TEXT PRIMARY KEY, autonomous INTEGER NOT NULL,
                                                         bound_ns INTEGER);",
                )
                .map_err(|e| store_err(path, e))?;
                tx.pragma_update(None, "user_version", FORMAT_VERSION).map_err(|e| store_err(path, e))?;
            }
            1 => upgrade_v1(&tx).map_err(|e| store_err(path, e))?,
            FORMAT_VERSION => {}
            later => return Err(unusable(format!("format version {later}, this netd reads {FORMAT_VERSION}"))),
        }
        let want = flannel::network_config_json(config);
        let stored: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'config'", [], |r| r.get(0))
            .optional()
            .map_err(|e| store_err(path, e))?;
        match stored {
            Some(existing) if existing != want => {
                return Err(RegistryError::BadConfig(format!(
                    "{} already holds network config {existing}, not {want}",
                    path.display()
                )))
            }
            Some(_) => {}
            None => {
                tx.execute("INSERT INTO meta(key, value) VALUES('config', ?1)", [&want])
                    .map_err(|e| store_err(path, e))?;
            }
        }
        tx.commit().map_err(|e| store_err(path, e))
    }

    /// A handle on the registry at `path`; nothing is opened until used.
    /// `poll` is how often the watch looks for changes.
    pub fn open(path: impl Into<PathBuf>, poll: Duration) -> Self {
        Self { path: path.into(), poll, known: None, pending: VecDeque::new() }
    }

    fn connect(&self) -> Result<Connection, RegistryError> {
        connect(&self.path)
    }
}

/// Runs SQLite work on the blocking pool: a locked file makes a call wait
/// up to the 10 s busy timeout, which must never stall the daemon's runtime
/// thread (health checks, signals).
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce(&Path) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    let path = path.to_path_buf();
    let shown = path.clone();
    tokio::task::spawn_blocking(move || f(&path))
        .await
        .map_err(|source| RegistryError::StoreTask { path: shown, source })?
}

fn store_err(path: &Path, e: rusqlite::Error) -> RegistryError {
    RegistryError::Sqlite { path: path.to_path_buf(), source: e }
}

fn connect(path: &Path) -> Result<Connection, RegistryError> {
    if !path.exists() {
        return Err(RegistryError::Unreachable(format!(
            "embedded registry {} is not there (create it with `netd registry init`)",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| RegistryError::Unreachable(format!("opening {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(|e| store_err(path, e))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| store_err(path, e))?;
    match version {
        FORMAT_VERSION => Ok(conn),
        1 => upgrade(path, conn),
        other => Err(RegistryError::Store {
            path: path.to_path_buf(),
            reason: format!("format version {other}, this netd reads {FORMAT_VERSION} (and upgrades 1)"),
        }),
    }
}

/// Upgrades a version 1 file to this version (see the module docs). Other
/// processes may race to do the same: the version is read again under the
/// write lock.
fn upgrade(path: &Path, mut conn: Connection) -> Result<Connection, RegistryError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| store_err(path, e))?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| store_err(path, e))?;
    if version == 1 {
        upgrade_v1(&tx).map_err(|e| store_err(path, e))?;
        tx.commit().map_err(|e| store_err(path, e))?;
        tracing::info!(path = %path.display(), "upgraded the embedded registry from format version 1 to {FORMAT_VERSION}");
    } else {
        drop(tx);
    }
    Ok(conn)
}

/// Version 1 to 2: autonomy gains its time bound.
fn upgrade_v1(tx: &rusqlite::Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute_batch("ALTER TABLE autonomy ADD COLUMN bound_ns INTEGER;")?;
    tx.pragma_update(None, "user_version", FORMAT_VERSION)
}

/// Every live lease but `own_subnet`'s, with its autonomy; bad rows skipped
/// with a logged reason.
fn read_peers(path: &Path, own_subnet: Ipv4Net) -> Result<BTreeMap<Ipv4Net, PeerLease>, RegistryError> {
    let conn = connect(path)?;
    let mut stmt = conn
        .prepare(
            "SELECT l.subnet, l.node, l.attrs, COALESCE(a.autonomous, 0) FROM lease l
                 LEFT JOIN autonomy a ON a.node = l.node WHERE l.expires_at > ?1",
        )
        .map_err(|e| store_err(path, e))?;
    let rows = stmt
        .query_map([now_secs()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
        })
        .map_err(|e| store_err(path, e))?;
    let mut peers = BTreeMap::new();
    for row in rows {
        let (key, node, attrs, autonomous) = row.map_err(|e| store_err(path, e))?;
        match peer_from_row(&key, &node, attrs.as_bytes()) {
            Ok(lease) if lease.subnet == own_subnet => {}
            Ok(lease) => {
                peers.insert(lease.subnet, PeerLease { lease, autonomous: autonomous != 0, cloud: false });
            }
            Err(reason) => tracing::warn!(key = %key, node = %node, %reason, "skipping bad lease"),
        }
    }
    Ok(peers)
}

fn peer_from_row(key: &str, node: &str, attrs: &[u8]) -> Result<Lease, String> {
    let subnet = flannel::parse_subnet_key(key)?;
    let attrs = LeaseAttrs::parse(attrs)?;
    let data = attrs.vxlan_data()?;
    Ok(Lease { subnet, public_ip: attrs.public_ip, vtep_mac: data.vtep_mac, node: Some(node.to_string()) })
}

impl Registry for EmbeddedRegistry {
    fn describe(&self) -> String {
        format!("embedded {}", self.path.display())
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, RegistryError> {
        blocking(&self.path, read_network_config).await
    }

    async fn acquire_lease(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
    ) -> Result<OwnLease, RegistryError> {
        let (config, request) = (*config, request.clone());
        blocking(&self.path, move |path| acquire(path, &config, &request)).await
    }

    async fn renew_lease(&mut self, lease: &OwnLease) -> Result<OwnLease, RegistryError> {
        let own = lease.clone();
        let renewed = blocking(&self.path, move |path| {
            let conn = connect(path)?;
            let node = own.lease.node.clone().unwrap_or_default();
            let expires = now_secs() + LEASE_TTL.as_secs() as i64;
            let updated = conn
                .execute(
                    "UPDATE lease SET expires_at = ?1 WHERE subnet = ?2 AND node = ?3",
                    params![expires, flannel::subnet_key(own.lease.subnet), node],
                )
                .map_err(|e| store_err(path, e))?;
            Ok((updated == 1).then(|| OwnLease {
                lease: own.lease.clone(),
                expires_at: Some(UNIX_EPOCH + Duration::from_secs(expires as u64)),
            }))
        })
        .await?;
        if let Some(renewed) = renewed {
            return Ok(renewed);
        }
        // Lapsed and removed: take it again, preferring the same subnet.
        let config = self.network_config().await?;
        let request = LeaseRequest {
            node: lease.lease.node.clone().unwrap_or_default(),
            public_ip: lease.lease.public_ip,
            vtep_mac: lease.lease.vtep_mac,
            previous_subnet: Some(lease.lease.subnet),
        };
        self.acquire_lease(&config, &request).await
    }

    async fn next_event(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if self.known.is_none() {
                let peers = blocking(&self.path, move |path| read_peers(path, own_subnet)).await?;
                let event = PeerEvent::Resync(peers.values().cloned().collect());
                self.known = Some(peers);
                return Ok(event);
            }
            tokio::time::sleep(self.poll).await;
            // Cancel-safe: nothing changes until the read is back.
            let current = match blocking(&self.path, move |path| read_peers(path, own_subnet)).await {
                Ok(current) => current,
                Err(e) => {
                    // The next success must be a full resync.
                    self.known = None;
                    return Err(e);
                }
            };
            let known = self.known.get_or_insert_with(BTreeMap::new);
            for (subnet, peer) in &current {
                if known.get(subnet) != Some(peer) {
                    self.pending.push_back(PeerEvent::Upsert(peer.clone()));
                }
            }
            for subnet in known.keys() {
                if !current.contains_key(subnet) {
                    self.pending.push_back(PeerEvent::Remove(*subnet));
                }
            }
            *known = current;
        }
    }

    async fn set_autonomy(&mut self, node: &str, autonomy: Autonomy) -> Result<Vec<AutonomyChange>, RegistryError> {
        let (node, registry) = (node.to_string(), self.describe());
        let bound_ns: Option<i64> = match autonomy {
            Autonomy::For(bound) => Some(i64::try_from(bound.as_nanos()).map_err(|_| RegistryError::Refused {
                what: format!("setting the autonomy of node {node}"),
                reason: format!(
                    "{} is longer than a Go duration can be (use 0 for no time limit)",
                    format_go_duration(bound)
                ),
            })?),
            Autonomy::Off | Autonomy::Forever => None,
        };
        blocking(&self.path, move |path| {
            let mut conn = connect(path)?;
            let err = |e: rusqlite::Error| store_err(path, e);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            if !known_node(&tx, &node).map_err(err)? {
                return Err(unknown_node(&tx, &node, registry).map_err(err)?);
            }
            tx.execute(
                "INSERT INTO autonomy(node, autonomous, bound_ns) VALUES(?1, ?2, ?3)
                 ON CONFLICT(node) DO UPDATE SET autonomous = ?2, bound_ns = ?3",
                params![node, i64::from(autonomy.is_on()), bound_ns],
            )
            .map_err(err)?;
            tx.commit().map_err(err)?;
            let row = format!("autonomy row of {node}");
            Ok(vec![
                AutonomyChange {
                    field: format!("{row}: autonomous"),
                    value: Some(i64::from(autonomy.is_on()).to_string()),
                },
                AutonomyChange {
                    field: format!("{row}: bound_ns"),
                    value: Some(bound_ns.map_or_else(|| "NULL".to_string(), |ns| ns.to_string())),
                },
            ])
        })
        .await
    }

    async fn node_autonomy(&mut self, node: &str) -> Result<NodeAutonomy, RegistryError> {
        let (node, registry) = (node.to_string(), self.describe());
        blocking(&self.path, move |path| read_node_autonomy(path, &node, registry)).await
    }
}

/// True when `node` holds a lease (live or lapsed) or has an autonomy row.
fn known_node(conn: &Connection, node: &str) -> Result<bool, rusqlite::Error> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM lease WHERE node = ?1) OR EXISTS(SELECT 1 FROM autonomy WHERE node = ?1)",
        [node],
        |r| r.get(0),
    )
}

/// The error for a node that is not there, naming the nodes that are.
fn unknown_node(conn: &Connection, node: &str, registry: String) -> Result<RegistryError, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT node FROM lease UNION SELECT node FROM autonomy ORDER BY 1 LIMIT ?1")?;
    let names =
        stmt.query_map([super::NAMES_SHOWN as i64 + 1], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(RegistryError::UnknownNode {
        node: node.to_string(),
        registry,
        reason: super::known_names("no lease and no autonomy row", &names),
    })
}

fn read_node_autonomy(path: &Path, node: &str, registry: String) -> Result<NodeAutonomy, RegistryError> {
    let conn = connect(path)?;
    let err = |e: rusqlite::Error| store_err(path, e);
    let row: Option<(i64, Option<i64>)> = conn
        .query_row("SELECT autonomous, bound_ns FROM autonomy WHERE node = ?1", [node], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(err)?;
    let lease: Option<(String, String, i64)> = conn
        .query_row("SELECT subnet, attrs, expires_at FROM lease WHERE node = ?1", [node], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
        .map_err(err)?;
    if row.is_none() && lease.is_none() {
        return Err(unknown_node(&conn, node, registry).map_err(err)?);
    }
    let source = format!("the autonomy row of {node} in {}", path.display());
    let mut problem = None;
    let autonomy = match row {
        None | Some((0, _)) => Autonomy::Off,
        Some((_, None)) => Autonomy::Forever,
        Some((_, Some(ns))) if ns > 0 => Autonomy::For(Duration::from_nanos(ns as u64)),
        Some((_, Some(0))) => Autonomy::Forever,
        Some((_, Some(ns))) => {
            problem = Some(format!("{source}: bound_ns {ns} is negative; taken as no time limit"));
            Autonomy::Forever
        }
    };
    let sources = if autonomy.is_on() { vec![source] } else { Vec::new() };
    let lease = match lease {
        None => None,
        Some((key, attrs, expires_at)) => match flannel::parse_subnet_key(&key) {
            Ok(subnet) => Some(NodeLeaseState {
                subnet,
                public_ip: LeaseAttrs::parse(attrs.as_bytes()).ok().map(|a| a.public_ip),
                expires_at: Some(UNIX_EPOCH + Duration::from_secs(expires_at.max(0) as u64)),
                // What `acquire` keeps: the bound runs from the last renewal.
                kept_while_autonomous: autonomy.holds_at(
                    UNIX_EPOCH + Duration::from_secs((expires_at - LEASE_TTL.as_secs() as i64).max(0) as u64),
                    SystemTime::now(),
                ),
            }),
            Err(reason) => {
                tracing::warn!(%key, %node, %reason, "the node's lease row is unreadable");
                None
            }
        },
    };
    Ok(NodeAutonomy { node: node.to_string(), autonomy, sources, problem, lease, kubernetes: None })
}

fn read_network_config(path: &Path) -> Result<NetworkConfig, RegistryError> {
    let conn = connect(path)?;
    let text: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'config'", [], |r| r.get(0))
        .optional()
        .map_err(|e| store_err(path, e))?;
    let text = text.ok_or_else(|| RegistryError::BadConfig(format!("{} holds no network config", path.display())))?;
    Ok(flannel::parse_network_config(text.as_bytes())?)
}

/// The lease for `request`, in one immediate transaction: the one held for
/// this node (by name, or by public IP as flannel reuses), else the
/// preferred or first free subnet.
fn acquire(path: &Path, config: &NetworkConfig, request: &LeaseRequest) -> Result<OwnLease, RegistryError> {
    let mut conn = connect(path)?;
    let err = |e: rusqlite::Error| store_err(path, e);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
    let now = now_secs();
    // A lapsed lease is reclaimed, except an autonomous node's (SPEC §4: its
    // subnet is its own while it serves from local state, cut off): kept
    // for ever, or for its bound after the last renewal.
    tx.execute(
        "DELETE FROM lease WHERE expires_at <= ?1 AND NOT EXISTS (
             SELECT 1 FROM autonomy a WHERE a.node = lease.node AND a.autonomous = 1
               AND (a.bound_ns IS NULL OR lease.expires_at - ?2 + a.bound_ns / 1000000000 > ?1))",
        params![now, LEASE_TTL.as_secs() as i64],
    )
    .map_err(err)?;
    let mut held: Option<Ipv4Net> = None;
    let mut taken = BTreeSet::new();
    {
        let mut stmt = tx.prepare("SELECT subnet, node FROM lease").map_err(err)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(err)?;
        for row in rows {
            let (key, node) = row.map_err(err)?;
            let Ok(subnet) = flannel::parse_subnet_key(&key) else { continue };
            // A lease is the node's by name only. flannel also hands a lease
            // to whoever claims its public IP (a renamed host); here that
            // would let any node take another's subnet and address by
            // claiming its IP (SPEC §3b), so a renamed node gets a new
            // subnet and its old lease lapses with its TTL.
            if node == request.node {
                if held.is_none() && config.network.contains(&subnet) && subnet.prefix_len() == config.subnet_len {
                    held = Some(subnet);
                    continue;
                }
                tx.execute("DELETE FROM lease WHERE subnet = ?1", [&key]).map_err(err)?;
                continue;
            }
            taken.insert(subnet);
        }
    }
    let subnet = match held {
        Some(subnet) => subnet,
        None => pick_subnet(config, &taken, request.previous_subnet)?,
    };
    let expires = now + LEASE_TTL.as_secs() as i64;
    let attrs = LeaseAttrs::vxlan(request.public_ip, config.vni, request.vtep_mac).to_json();
    tx.execute(
        "INSERT INTO lease(subnet, node, attrs, expires_at) VALUES(?1, ?2, ?3, ?4)
         ON CONFLICT(subnet) DO UPDATE SET node = ?2, attrs = ?3, expires_at = ?4",
        params![flannel::subnet_key(subnet), request.node, attrs, expires],
    )
    .map_err(err)?;
    tx.commit().map_err(err)?;
    Ok(OwnLease {
        lease: request.lease_for(subnet),
        expires_at: Some(UNIX_EPOCH + Duration::from_secs(expires as u64)),
    })
}

/// The token table: created by the first token written, so a registry
/// without tokens is byte-for-byte what `netd registry init` made and
/// older netds read it unchanged (they never look at this table).
const TOKEN_TABLE: &str = "CREATE TABLE IF NOT EXISTS bootstrap_token(id TEXT PRIMARY KEY, record TEXT NOT NULL)";

fn has_token_table(conn: &Connection, path: &Path) -> Result<bool, RegistryError> {
    has_table(conn, path, "bootstrap_token")
}

/// Whether the file holds table `name` (one of those created on first use).
fn has_table(conn: &Connection, path: &Path, name: &str) -> Result<bool, RegistryError> {
    conn.query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
        .map_err(|e| store_err(path, e))
}

impl super::TokenStore for EmbeddedRegistry {
    async fn put_token(&mut self, record: &super::TokenRecord) -> Result<(), RegistryError> {
        let (id, json) = (record.id.clone(), record.to_json());
        blocking(&self.path, move |path| {
            let conn = connect(path)?;
            conn.execute(TOKEN_TABLE, []).map_err(|e| store_err(path, e))?;
            conn.execute(
                "INSERT INTO bootstrap_token(id, record) VALUES(?1, ?2) ON CONFLICT(id) DO UPDATE SET record = ?2",
                params![id, json],
            )
            .map_err(|e| store_err(path, e))?;
            Ok(())
        })
        .await
    }

    async fn token(&mut self, id: &str) -> Result<Option<super::TokenRecord>, RegistryError> {
        let id = id.to_string();
        blocking(&self.path, move |path| {
            let conn = connect(path)?;
            if !has_token_table(&conn, path)? {
                return Ok(None);
            }
            let text: Option<String> = conn
                .query_row("SELECT record FROM bootstrap_token WHERE id = ?1", [&id], |r| r.get(0))
                .optional()
                .map_err(|e| store_err(path, e))?;
            text.map(|t| super::TokenRecord::from_json(&id, t.as_bytes()).map_err(super::tokens::bad_record))
                .transpose()
        })
        .await
    }

    async fn tokens(&mut self) -> Result<Vec<super::TokenRecord>, RegistryError> {
        blocking(&self.path, move |path| {
            let conn = connect(path)?;
            if !has_token_table(&conn, path)? {
                return Ok(Vec::new());
            }
            let mut statement =
                conn.prepare("SELECT id, record FROM bootstrap_token ORDER BY id").map_err(|e| store_err(path, e))?;
            let rows = statement
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| store_err(path, e))?;
            let mut records = Vec::new();
            for row in rows {
                let (id, text) = row.map_err(|e| store_err(path, e))?;
                match super::TokenRecord::from_json(&id, text.as_bytes()) {
                    Ok(record) => records.push(record),
                    Err(error) => tracing::warn!("{}: skipping: {error}", path.display()),
                }
            }
            Ok(records)
        })
        .await
    }

    async fn delete_token(&mut self, id: &str) -> Result<bool, RegistryError> {
        let id = id.to_string();
        blocking(&self.path, move |path| {
            let conn = connect(path)?;
            if !has_token_table(&conn, path)? {
                return Ok(false);
            }
            let n = conn.execute("DELETE FROM bootstrap_token WHERE id = ?1", [&id]).map_err(|e| store_err(path, e))?;
            Ok(n > 0)
        })
        .await
    }
}

/// The replica table: created by the first announcement, as the token
/// table is, so a file without tunnel replicas is unchanged and older
/// netds never look at it.
const REPLICA_TABLE: &str = "CREATE TABLE IF NOT EXISTS tunnel_replica(
    id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at INTEGER NOT NULL)";

/// Unix seconds of `at` as SQLite stores them (0 before the epoch, as
/// [`ReplicaRecord`](super::ReplicaRecord) counts).
fn sql_seconds(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

impl super::ReplicaStore for EmbeddedRegistry {
    async fn announce_replica(&mut self, record: &super::ReplicaRecord) -> Result<(), RegistryError> {
        super::replicas::check_replica_id(&record.id)?;
        let (id, json) = (record.id.clone(), record.to_json());
        let expires_at = i64::try_from(record.expires_at).unwrap_or(i64::MAX);
        blocking(&self.path, move |path| {
            let mut conn = connect(path)?;
            let err = |e: rusqlite::Error| store_err(path, e);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
            tx.execute(REPLICA_TABLE, []).map_err(err)?;
            // Replicas killed without a word leave rows behind that no
            // reader returns any more; announcements clear them, so the
            // table stays as small as the set of live replicas.
            tx.execute("DELETE FROM tunnel_replica WHERE expires_at <= ?1", [now_secs()]).map_err(err)?;
            tx.execute(
                "INSERT INTO tunnel_replica(id, record, expires_at) VALUES(?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET record = ?2, expires_at = ?3",
                params![id, json, expires_at],
            )
            .map_err(err)?;
            tx.commit().map_err(err)
        })
        .await
    }

    async fn replicas(&mut self, now: SystemTime) -> Result<Vec<super::ReplicaRecord>, RegistryError> {
        blocking(&self.path, move |path| {
            let conn = connect(path)?;
            if !has_table(&conn, path, "tunnel_replica")? {
                return Ok(Vec::new());
            }
            let err = |e: rusqlite::Error| store_err(path, e);
            // The column skips expired rows unread (garbage included, so it
            // is not warned about for ever); the record itself decides for
            // the rest, as it is what every backend believes.
            let mut statement =
                conn.prepare("SELECT id, record FROM tunnel_replica WHERE expires_at > ?1 ORDER BY id").map_err(err)?;
            let rows = statement
                .query_map([sql_seconds(now)], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(err)?;
            let mut records = Vec::new();
            for row in rows {
                let (id, text) = row.map_err(err)?;
                match super::ReplicaRecord::from_json(&id, text.as_bytes()) {
                    Ok(record) if record.is_live(now) => records.push(record),
                    Ok(_) => {}
                    Err(error) => tracing::warn!("{}: skipping: {error}", path.display()),
                }
            }
            Ok(records)
        })
        .await
    }

    async fn withdraw_replica(&mut self, id: &str) -> Result<bool, RegistryError> {
        super::replicas::check_replica_id(id)?;
        let id = id.to_string();
        blocking(&self.path, move |path| {
            let conn = connect(path)?;
            if !has_table(&conn, path, "tunnel_replica")? {
                return Ok(false);
            }
            let n = conn.execute("DELETE FROM tunnel_replica WHERE id = ?1", [&id]).map_err(|e| store_err(path, e))?;
            Ok(n > 0)
        })
        .await
    }
}

impl EmbeddedRegistry {
    /// Writes a raw lease row — for tools and tests that inject what another
    /// (possibly broken) writer would store.
    pub fn put_raw_lease(&self, key: &str, node: &str, attrs: &str, ttl: Duration) -> Result<(), RegistryError> {
        let conn = self.connect()?;
        conn.execute(
            "INSERT INTO lease(subnet, node, attrs, expires_at) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(subnet) DO UPDATE SET node = ?2, attrs = ?3, expires_at = ?4",
            params![key, node, attrs, now_secs() + ttl.as_secs() as i64],
        )
        .map_err(|e| store_err(&self.path, e))?;
        Ok(())
    }

    /// Deletes a node's lease (the node left the cluster).
    pub fn delete_lease(&self, node: &str) -> Result<bool, RegistryError> {
        let conn = self.connect()?;
        let n = conn.execute("DELETE FROM lease WHERE node = ?1", [node]).map_err(|e| store_err(&self.path, e))?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_expiry_is_counted_as_records_count_it() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = super::super::ReplicaRecord::new("r", "h:1", false, Duration::from_secs(15), now);
        assert_eq!(sql_seconds(now), 1_800_000_000);
        // The column and the record agree on the last live second.
        let last = now + Duration::from_secs(14);
        assert!(record.is_live(last) && (record.expires_at as i64) > sql_seconds(last));
        let over = now + Duration::from_secs(15);
        assert!(!record.is_live(over) && (record.expires_at as i64) <= sql_seconds(over));
        assert_eq!(sql_seconds(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
