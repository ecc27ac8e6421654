//! The tunnel DNAT configuration from node sets and the ConfigMap (being built).
