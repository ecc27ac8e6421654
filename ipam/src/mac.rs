//! The VTEP MAC pinned to a node name: derived from the name, persisted.

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::{now_ms, Store};

pub use netd_model::{MacAddr, MacParseError};

/// How many derivation attempts a node may use to avoid its peers' MACs.
const MAX_ATTEMPTS: u32 = 1024;

/// The MAC `node` gets on derivation attempt `attempt`: the first six bytes
/// of SHA-256 over a versioned label, the name and the attempt, made
/// locally administered unicast. Pure: every host computes the same value.
///
/// ```
/// let mac = netd_ipam::derive_vtep_mac("edge-node-1", 0);
/// assert!(mac.is_local_unicast());
/// assert_eq!(mac, netd_ipam::derive_vtep_mac("edge-node-1", 0));
/// ```
pub fn derive_vtep_mac(node: &str, attempt: u32) -> MacAddr {
    let mut hasher = Sha256::new();
    hasher.update(b"netd/vtep-mac/v1\0");
    hasher.update(node.as_bytes());
    hasher.update(b"\0");
    hasher.update(attempt.to_be_bytes());
    let digest = hasher.finalize();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0b1111_1100) | 0b10;
    MacAddr(mac)
}

/// A MAC clash with a known peer and how it was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacCollision {
    /// The peer node holding the same MAC.
    pub peer: String,
    /// The clashing MAC.
    pub mac: MacAddr,
    /// `true`: we keep it (our name sorts first) and the peer must move;
    /// `false`: we moved to another derivation attempt.
    pub kept: bool,
}

/// The node's VTEP MAC and any collisions met on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtepMac {
    /// The MAC to program on `flannel.<VNI>` and publish.
    pub mac: MacAddr,
    /// Collisions with known peers (empty in the normal case).
    pub collisions: Vec<MacCollision>,
    /// `true` when the MAC was read back from the store rather than derived now.
    pub from_store: bool,
}

impl Store {
    /// The VTEP MAC of `node`: the persisted one if any, else derived from
    /// the name and persisted. `peers` are other nodes' names and published
    /// MACs. On a clash the node whose name sorts first keeps the MAC and the
    /// other moves to its next derivation attempt — both sides compute the
    /// same outcome without talking to each other. Every clash is reported.
    pub fn vtep_mac(&mut self, node: &str, peers: &[(String, MacAddr)]) -> Result<VtepMac> {
        let path = self.path().to_path_buf();
        let sql = |action| crate::error::sql_err(&path, action);
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting a write transaction"))?;
        let stored: Option<(String, u32)> = tx
            .query_row("SELECT mac, attempt FROM vtep_mac WHERE node = ?1", params![node], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sql("reading the VTEP MAC"))?;
        let (mut mac, mut attempt, from_store) = match stored {
            Some((text, attempt)) => {
                let mac = text.parse::<MacAddr>().map_err(|source| Error::CorruptMac {
                    path: self_path(&tx),
                    row: format!("vtep_mac/{node}"),
                    source,
                })?;
                (mac, attempt, true)
            }
            None => (derive_vtep_mac(node, 0), 0, false),
        };
        let initial = (mac, attempt);
        let mut collisions = Vec::new();
        loop {
            let clash = peers.iter().find(|(peer, peer_mac)| peer != node && *peer_mac == mac);
            match clash {
                None => break,
                Some((peer, _)) if node < peer.as_str() => {
                    collisions.push(MacCollision { peer: peer.clone(), mac, kept: true });
                    break;
                }
                Some((peer, _)) => {
                    collisions.push(MacCollision { peer: peer.clone(), mac, kept: false });
                    attempt += 1;
                    if attempt >= MAX_ATTEMPTS {
                        return Err(Error::MacSpaceExhausted { node: node.to_string(), peers: peers.len() });
                    }
                    mac = derive_vtep_mac(node, attempt);
                }
            }
        }
        if !from_store || (mac, attempt) != initial {
            tx.execute(
                "INSERT INTO vtep_mac (node, mac, attempt, since_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (node) DO UPDATE SET mac = excluded.mac, attempt = excluded.attempt, since_ms = excluded.since_ms",
                params![node, mac.to_string(), attempt, now_ms()],
            )
            .map_err(sql("persisting the VTEP MAC"))?;
        }
        tx.commit().map_err(sql("committing the VTEP MAC"))?;
        Ok(VtepMac { mac, collisions, from_store: from_store && (mac, attempt) == initial })
    }
}

fn self_path(tx: &rusqlite::Transaction<'_>) -> std::path::PathBuf {
    tx.path().map(std::path::PathBuf::from).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_serde_is_the_colon_string() {
        let mac: MacAddr = "6e:6d:70:09:3e:38".parse().unwrap();
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, r#""6e:6d:70:09:3e:38""#);
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        let err = serde_json::from_str::<MacAddr>(r#""6e:6d:70""#).unwrap_err().to_string();
        assert!(err.contains("not a MAC address"), "{err}");
        assert!(serde_json::from_str::<MacAddr>("42").is_err());
    }

    #[test]
    fn mac_text_round_trips() {
        let mac: MacAddr = "0a:1B:2c:3d:4e:5f".parse().unwrap();
        assert_eq!(mac.to_string(), "0a:1b:2c:3d:4e:5f");
        for bad in [
            "",
            "0a:1b:2c:3d:4e",
            "0a:1b:2c:3d:4e:5f:00",
            "0a-1b-2c-3d-4e-5f",
            "zz:1b:2c:3d:4e:5f",
            "a:1b:2c:3d:4e:5f0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derivation_is_stable_and_spreads() {
        // Pinned value: changing the derivation would change every node's MAC.
        assert_eq!(derive_vtep_mac("node-a", 0).to_string(), "6e:6d:70:09:3e:38");
        assert_ne!(derive_vtep_mac("node-a", 0), derive_vtep_mac("node-b", 0));
        assert_ne!(derive_vtep_mac("node-a", 0), derive_vtep_mac("node-a", 1));
        let macs: std::collections::HashSet<_> = (0..10_000).map(|i| derive_vtep_mac(&format!("n{i}"), 0)).collect();
        assert_eq!(macs.len(), 10_000);
        assert!(macs.iter().all(MacAddr::is_local_unicast));
    }
}
