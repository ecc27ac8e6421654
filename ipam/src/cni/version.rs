//! The CNI spec versions this plugin speaks.

/// Newest version, used when the config's version is unknown.
pub const NEWEST: &str = "1.1.0";

/// Versions whose result format this plugin writes. 0.1.0/0.2.0 used a
/// different result shape (`ip4`/`ip6`) that no current runtime sends.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A supported CNI version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    /// 0.3.0
    V0_3_0,
    /// 0.3.1
    V0_3_1,
    /// 0.4.0 (adds CHECK)
    V0_4_0,
    /// 1.0.0 (drops `version` from IP entries)
    V1_0_0,
    /// 1.1.0 (adds STATUS and GC)
    V1_1_0,
}

impl CniVersion {
    /// Parses a version string, `None` when unsupported.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            _ => return None,
        })
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether IP entries carry `"version": "4"|"6"` (before 1.0.0).
    pub fn ip_entries_have_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// Whether the CHECK command exists in this version.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }
}

/// The VERSION command's answer.
pub fn version_json() -> String {
    let list: Vec<String> = SUPPORTED.iter().map(|v| format!("\"{v}\"")).collect();
    format!("{{\"cniVersion\":\"{NEWEST}\",\"supportedVersions\":[{}]}}", list.join(","))
}
