//! CNI: netd's IPAM plugin (`netd-ipam`), a drop-in for host-local that pins
//! each pod's address to its name.
//!
//! It speaks CNI 0.3.0–1.1.0 (ADD, DEL, CHECK, VERSION, STATUS, GC), takes
//! host-local's configuration keys (`ranges`, `subnet`, `rangeStart`,
//! `rangeEnd`, `gateway`, `routes`, `dataDir`, `resolvConf`), and falls back to
//! `FLANNEL_SUBNET` from `/run/flannel/subnet.env` when no range is given, so
//! replacing `"type": "host-local"` by `"type": "netd-ipam"` is the whole
//! migration: the first ADD imports host-local's reservations.
//!
//! An ADD that finds the pool full takes the pin released longest ago
//! ([`crate::Store::allocate_or_reclaim`]) and logs on stderr which pod
//! lost it; it fails with error 100 only when every address is attached.
//! `ipam.dataDir`, when given, must be an absolute path (error 7 otherwise).
//!
//! [`install`] puts the plugin and the conflist on a host (`netd install-cni`).
//!
//! ```no_run
//! use netd_ipam::cni::{ipam_plugin, Invocation};
//! let inv = Invocation {
//!     command: Some("ADD".into()),
//!     container_id: Some("0123abcd".into()),
//!     ifname: Some("eth0".into()),
//!     args: Some("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0".into()),
//! };
//! let conf = br#"{"cniVersion":"1.0.0","name":"cbr0","ipam":{"type":"netd-ipam","subnet":"10.244.3.0/24"}}"#;
//! match ipam_plugin::run(&inv, conf) {
//!     Ok(result) => println!("{result}"),
//!     Err(err) => println!("{}", err.to_json()),
//! }
//! ```

pub mod config;
pub mod discover;
mod error;
pub mod install;
pub mod ipam_plugin;
mod result;
pub mod version;

pub use error::{code, CniError};
pub use ipam_plugin::Invocation;
