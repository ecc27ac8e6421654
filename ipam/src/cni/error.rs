//! CNI error results: `{"cniVersion","code","msg","details"}` on stdout.

use std::fmt;

use serde::Serialize;

/// Well-known CNI error codes (spec 1.0/1.1 §"Error") and netd's own (≥ 100).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID,
    /// CNI_IFNAME, pod identity in CNI_ARGS).
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure (the store cannot be read or written).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (not JSON, truncated JSON).
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration (wrong types, bad CIDRs, bad ranges).
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later (the store stayed locked by others).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// netd: no free address left in the pool.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// netd: CHECK found an address not held by this container.
    pub const ADDRESS_NOT_ATTACHED: u32 = 101;
    /// netd: unexpected internal error.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    /// The config's `cniVersion` when known, else the newest we speak.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// One of [`code`].
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation (the cause chain).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with a code, message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { cni_version: super::version::NEWEST.to_string(), code, msg: msg.into(), details: details.into() }
    }

    /// Sets the version the error is reported in.
    pub fn in_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        self
    }

    /// The JSON printed on stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"{}\"}}", self.code, self.code))
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// Renders an error and its sources as `a: b: c`.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
