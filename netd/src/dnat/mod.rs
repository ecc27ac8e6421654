//! netd's side of the tunnel DNAT: configuration parsing; the BPF programs and
//! their loader live in `netd_ebpf::dnat`.

pub mod config;
