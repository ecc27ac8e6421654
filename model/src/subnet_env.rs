//! `/run/flannel/subnet.env`: flannel's hand-off file to CNI, in its exact
//! format, parsed tolerantly and written atomically.
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.3.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::atomic_file::{self, AtomicFileError};

/// Where flannel (and netd) write it.
pub const DEFAULT_PATH: &str = "/run/flannel/subnet.env";

/// Its permissions: world-readable, as flannel leaves it under the usual
/// umask (CNI plugins and operators read it; it holds no secret).
pub const MODE: u32 = 0o644;

/// Errors reading or writing `subnet.env`.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// The file could not be read.
    #[error("{path}: {action} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was attempted.
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file could not be written.
    #[error(transparent)]
    Write(#[from] AtomicFileError),
    /// A required key is absent.
    #[error("{path}: {key} is missing")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// A value does not parse.
    #[error("{path}: {key}={value:?} is invalid: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The value (truncated).
        value: String,
        /// What is wrong.
        why: String,
    },
}

/// The contents of `subnet.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the whole cluster network.
    pub network: IpNet,
    /// `FLANNEL_SUBNET`: this node's gateway address with the subnet's prefix
    /// (`10.244.3.1/24`); the network address of it is the node's subnet.
    pub subnet: IpNet,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// Parses the file's text. Unknown keys (flannel's IPv6 ones, comments)
    /// are ignored; the four keys above are required.
    ///
    /// ```
    /// let env = netd_model::subnet_env::SubnetEnv::parse(
    ///     "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    ///     std::path::Path::new("subnet.env"),
    /// ).unwrap();
    /// assert_eq!(env.subnet.trunc().to_string(), "10.244.3.0/24");
    /// ```
    pub fn parse(text: &str, path: &Path) -> Result<Self, SubnetEnvError> {
        let get = |key: &'static str| -> Result<&str, SubnetEnvError> {
            text.lines()
                .filter_map(|line| line.trim().split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"'))
                .ok_or(SubnetEnvError::Missing { path: path.to_path_buf(), key })
        };
        let invalid = |key: &'static str, value: &str, why: String| SubnetEnvError::Invalid {
            path: path.to_path_buf(),
            key,
            value: value.chars().take(60).collect(),
            why,
        };
        let cidr = |key: &'static str| -> Result<IpNet, SubnetEnvError> {
            let value = get(key)?;
            value.parse::<IpNet>().map_err(|e| invalid(key, value, e.to_string()))
        };
        let network = cidr("FLANNEL_NETWORK")?;
        let subnet = cidr("FLANNEL_SUBNET")?;
        let mtu_text = get("FLANNEL_MTU")?;
        let mtu = mtu_text.parse::<u32>().map_err(|e| invalid("FLANNEL_MTU", mtu_text, e.to_string()))?;
        let masq_text = get("FLANNEL_IPMASQ")?;
        let ipmasq = match masq_text {
            "true" => true,
            "false" => false,
            other => return Err(invalid("FLANNEL_IPMASQ", other, "expected true or false".into())),
        };
        if !network.contains(&subnet.network()) {
            return Err(invalid(
                "FLANNEL_SUBNET",
                &subnet.to_string(),
                format!("not inside FLANNEL_NETWORK {network}"),
            ));
        }
        Ok(Self { network, subnet, mtu, ipmasq })
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self, SubnetEnvError> {
        let text = fs::read_to_string(path).map_err(|source| SubnetEnvError::Io {
            path: path.to_path_buf(),
            action: "reading",
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The node's gateway address (the address part of `FLANNEL_SUBNET`).
    pub fn gateway(&self) -> IpAddr {
        self.subnet.addr()
    }

    /// The file's text, byte for byte as flannel writes it.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet, self.mtu, self.ipmasq
        )
    }

    /// Writes the file atomically with [`crate::atomic_file`] (mode
    /// [`MODE`], its directory created if missing): readers see the old or
    /// the new content, never a mix.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        Ok(atomic_file::write_creating_dirs(path, self.render().as_bytes(), MODE, 0o755)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn round_trips_flannel_bytes() {
        let env = SubnetEnv::parse(FLANNEL, Path::new("x")).unwrap();
        assert_eq!(env.gateway().to_string(), "10.244.3.1");
        assert_eq!(env.render(), FLANNEL);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        env.write(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), FLANNEL);
        assert_eq!(SubnetEnv::read(&path).unwrap(), env);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary left");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, MODE);
    }

    #[test]
    fn tolerates_extra_keys_and_reports_bad_ones() {
        let extra = format!("# written by flannel\nFLANNEL_IPV6_NETWORK=fd00::/56\n{FLANNEL}");
        assert!(SubnetEnv::parse(&extra, Path::new("x")).is_ok());
        let missing = FLANNEL.replace("FLANNEL_MTU=1450\n", "");
        assert!(matches!(
            SubnetEnv::parse(&missing, Path::new("x")),
            Err(SubnetEnvError::Missing { key: "FLANNEL_MTU", .. })
        ));
        let bad = FLANNEL.replace("10.244.3.1/24", "10.244.3/24");
        assert!(matches!(
            SubnetEnv::parse(&bad, Path::new("x")),
            Err(SubnetEnvError::Invalid { key: "FLANNEL_SUBNET", .. })
        ));
        let outside = FLANNEL.replace("10.244.3.1/24", "10.9.3.1/24");
        assert!(SubnetEnv::parse(&outside, Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("not inside FLANNEL_NETWORK"));
        let masq = FLANNEL.replace("=true", "=yes");
        assert!(matches!(
            SubnetEnv::parse(&masq, Path::new("x")),
            Err(SubnetEnvError::Invalid { key: "FLANNEL_IPMASQ", .. })
        ));
    }
}
