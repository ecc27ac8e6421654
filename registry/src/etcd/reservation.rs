//! The `reserved/<node>` value (layout version 3): its JSON format and
//! version check. Both the lease (acquire writes it and avoids others') and
//! autonomy (setting it writes it, reading it reports it) use it, so the
//! format lives in neither.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;

/// The format of a `reserved/<node>` value this netd writes and reads.
const RESERVATION_VERSION: u32 = 1;

/// `reserved/<node>` (layout version 3): the subnet kept for an autonomous
/// node whose lease may lapse, and when the node last renewed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Reservation {
    version: u32,
    pub(super) subnet: Ipv4Net,
    /// Unix seconds of the node's last acquire or renewal.
    #[serde(rename = "renewedAt")]
    renewed_at: u64,
}

impl Reservation {
    pub(super) fn new(subnet: Ipv4Net, renewed_at: SystemTime) -> Self {
        let renewed_at = renewed_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { version: RESERVATION_VERSION, subnet, renewed_at }
    }

    pub(super) fn to_json(&self) -> String {
        // A struct of a number, a subnet and a number always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub(super) fn parse(value: &[u8]) -> Result<Self, String> {
        let reservation: Self = serde_json::from_slice(value).map_err(|e| format!("not a reservation: {e}"))?;
        if reservation.version != RESERVATION_VERSION {
            return Err(format!("format version {}, this netd reads {RESERVATION_VERSION}", reservation.version));
        }
        Ok(reservation)
    }

    pub(super) fn renewed_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.renewed_at)
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::{KeyKind, Keys, DEFAULT_PREFIX};
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
}
