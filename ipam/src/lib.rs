//! Persistent IP address management for netd.
