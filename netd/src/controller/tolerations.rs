//! Pod tolerations of autonomous nodes (being built).
