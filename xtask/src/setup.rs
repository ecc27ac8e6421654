//! `cargo xtask setup`: idempotent install of the Debian packages netd needs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::progress::long_step;

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
    ("openssh-server", "sshd, the `ssh -R` anchor of the tunnel benchmark"),
    ("openssh-client", "ssh -R and ssh-keygen for the tunnel benchmark"),
    ("curl", "real HTTP client in tests"),
    ("openssl", "the test kube-apiserver's service-account key"),
    ("iputils-ping", "ping between test namespaces"),
    ("containerd", "the container runtime of the real-cluster harness's nodes (CRI for kubelet)"),
    ("runc", "the OCI runtime containerd starts pods with"),
    ("busybox-static", "the workload image of the real-cluster tests (sh, ping, httpd, nc)"),
    ("gcc", "builds the static pause program of the pause image"),
    ("libc6-dev", "libc.a for the static pause program"),
    ("binutils", "strip: the netd image carries its binaries without symbol tables"),
    ("valgrind", "callgrind: the hot paths' instruction counts (`cargo xtask instructions`)"),
    ("strace", "counts the IPAM store's fsyncs per CNI call (ipam/tests/durability.rs)"),
    // 19 MB download, 96 MB installed (its web UI's JavaScript libraries
    // come along); its postinst only adds the prometheus user: without
    // systemd or a runlevel nothing starts, and where systemd starts it on
    // :9090 the test's own Prometheus is unaffected (it runs in a test
    // namespace). Built without Kubernetes discovery, hence static targets.
    (
        "prometheus",
        "prometheus and promtool: the monitoring test scrapes netd and checks deploy/monitoring/ (netd/tests/prometheus.rs)",
    ),
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

/// Everything the tests and benchmarks need: the Debian packages, rathole,
/// then the cached kube-apiserver (Kubernetes registry tests),
/// kube-controller-manager (join, node lifecycle and rollout tests), kubelet
/// and kube-scheduler (the real-cluster tests), built from one source tree.
pub fn run() -> Result<()> {
    packages()?;
    rathole()?;
    crate::kube::ensure_kube_apiserver()?;
    crate::kube::ensure_kube_controller_manager()?;
    crate::kube::ensure_node_components()?;
    test_images()
}

/// The pause and workload images of the real-cluster tests, built when
/// missing (`cargo xtask image pause|busybox` rebuilds them).
pub fn test_images() -> Result<()> {
    let dir = std::path::Path::new(crate::image::IMAGE_DIR);
    let pause = dir.join(crate::image::PAUSE_ARCHIVE);
    if pause.is_file() {
        println!("setup: pause image already built ({})", pause.display());
    } else {
        crate::image::pause_image(&pause)?;
    }
    let workload = dir.join(crate::image::WORKLOAD_ARCHIVE);
    if workload.is_file() {
        println!("setup: workload image already built ({})", workload.display());
    } else {
        crate::image::workload_image(&workload)?;
    }
    Ok(())
}

/// The rathole release the tunnel benchmark compares against.
pub const RATHOLE_VERSION: &str = "0.5.0";

/// `rathole` on PATH or in cargo's bin directory, where `cargo install` puts it.
pub fn rathole_path() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("rathole")).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    on_path.into_iter().chain(cargo_home.map(|home| home.join("bin/rathole"))).find(|p| p.is_file())
}

/// Installs rathole (the tunnel benchmark's anchor; Debian has no package)
/// with `cargo install` unless it is there already: a few minutes, once.
pub fn rathole() -> Result<()> {
    if let Some(path) = rathole_path() {
        println!("setup: rathole already installed ({})", path.display());
        return Ok(());
    }
    // Not --locked: rathole 0.5.0's lockfile pins a `time` 0.3 release that
    // current compilers reject (E0282 in time's own code); the newest
    // semver-compatible dependencies build.
    println!("setup: rathole, the tunnel benchmark's anchor (a few minutes, once)");
    long_step(&format!("cargo install rathole {RATHOLE_VERSION}"), || {
        crate::cargo(&["install", "rathole", "--version", RATHOLE_VERSION], &[])
    })
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
    long_step("apt-get update", || apt(&["-qq", "update"]))?;
    long_step(&format!("installing {} Debian packages", missing.len()), || {
        let mut args = vec!["-qq", "install", "-y", "--no-install-recommends"];
        args.extend_from_slice(&missing);
        apt(&args)
    })?;
    let still: Vec<&str> = missing.iter().copied().filter(|name| !installed(name)).collect();
    if !still.is_empty() {
        bail!("setup: apt-get reported success but {still:?} are still not installed");
    }
    println!("setup: installed {}", missing.join(" "));
    Ok(())
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0").unwrap_or(false)
}
