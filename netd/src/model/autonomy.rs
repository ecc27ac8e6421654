//! The node annotations that declare autonomy (SPEC §4): an autonomous edge
//! node cut off from the cloud keeps its subnet, its peers keep its routes.

/// The autonomy annotation (Alibaba Cloud edge).
pub const ANNOTATION_AUTONOMY: &str = "node.beta.alibabacloud.com/autonomy";
/// The autonomy annotation (OpenYurt), also honoured.
pub const ANNOTATION_AUTONOMY_OPENYURT: &str = "node.beta.openyurt.io/autonomy";
/// OpenYurt's bounded autonomy: how long the node stays autonomous once cut
/// off (a Go duration; `0` means forever).
pub const ANNOTATION_AUTONOMY_DURATION: &str = "node.openyurt.io/autonomy-duration";

/// True for an autonomy annotation value that means "on".
pub fn autonomy_on(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}
