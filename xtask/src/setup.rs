//! `cargo xtask setup`: idempotent install of the Debian packages netd needs.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Every Debian package the build, the tests and the demo use, with why.
pub const PACKAGES: &[(&str, &str)] = &[
    ("clang-19", "compiles ebpf/bpf/*.bpf.c"),
    ("libbpf-dev", "bpf_helpers.h for the BPF programs"),
    ("linux-libc-dev", "kernel UAPI headers (linux/bpf.h, asm/types.h)"),
    ("iproute2", "ip/bridge: test namespaces and side-by-side baselines"),
    ("bpftool", "inspecting loaded BPF programs and maps"),
    ("containernetworking-plugins", "CNI bridge and host-local plugins (/usr/lib/cni)"),
    ("etcd-server", "real etcd for registry tests"),
    ("etcd-client", "etcdctl for registry tests"),
    ("protobuf-compiler", "protoc, needed to build the etcd client"),
    ("libprotobuf-dev", "google/protobuf/*.proto, which protoc needs for the etcd client"),
    ("nftables", "masquerade rules and their checks"),
    ("iperf3", "throughput benchmarks across namespaces"),
    ("wrk", "HTTP load for tunnel benchmarks"),
    ("curl", "real HTTP client in tests"),
    ("openssl", "the test kube-apiserver's service-account key"),
    ("iputils-ping", "ping between test namespaces"),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running apt-get {}", args.join(" ")))?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Everything the tests need: the Debian packages, then the cached
/// kube-apiserver (Kubernetes registry tests) and kube-controller-manager
/// (join, node lifecycle and rollout tests), built from one source tree.
pub fn run() -> Result<()> {
    packages()?;
    crate::kube::ensure_kube_apiserver()?;
    crate::kube::ensure_kube_controller_manager().map(|_| ())
}

/// Installs the missing Debian packages and says which (all the demo needs).
pub fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).filter(|name| !installed(name)).collect();
    if missing.is_empty() {
        println!("setup: all {} Debian packages already installed", PACKAGES.len());
        return Ok(());
    }
    // apt needs root: say so plainly instead of failing deep inside apt.
    if !is_root() {
        bail!("setup: missing packages {missing:?}; run `sudo cargo xtask setup` to install them");
    }
    println!("setup: installing {}", missing.join(" "));
    apt(&["-qq", "update"])?;
    let mut args = vec!["-qq", "install", "-y", "--no-install-recommends"];
    args.extend_from_slice(&missing);
    apt(&args)?;
    let still: Vec<&str> = missing.iter().copied().filter(|name| !installed(name)).collect();
    if !still.is_empty() {
        bail!("setup: apt-get reported success but {still:?} are still not installed");
    }
    println!("setup: installed {}", missing.join(" "));
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0").unwrap_or(false)
}
