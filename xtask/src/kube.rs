//! A real `kube-apiserver` (and `kube-controller-manager`) for the Kubernetes
//! tests, built once from Debian's source package and cached outside the
//! repository.
//!
//! Debian 12 ships Kubernetes 1.20.2 as source only (its binary package is
//! `kubernetes-client`, i.e. kubectl), so [`ensure_kube_apiserver`] builds the
//! server from that source with Debian's Go, offline (`GOPROXY=off`, the
//! vendored modules). One fix is needed: the vendored
//! `github.com/modern-go/reflect2` crashes the server when built with Go 1.19,
//! so Debian's packaged reflect2 replaces it. The API server takes about six
//! minutes to build on two cores; the controller-manager, built from the same
//! tree afterwards, two to four more. Cached binaries are reused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::progress::{elapsed, long_step};

macro_rules! kube_version {
    () => {
        "1.20.2"
    };
}

/// Kubernetes version of the cached server (Debian 12's `kubernetes` source).
pub const KUBE_VERSION: &str = kube_version!();
/// Where the built binary is cached. The test harness has the same default
/// (`netd::testing::KUBE_APISERVER_BIN`); `cargo xtask test` and the lab
/// runs also hand this path over in `NETD_KUBE_APISERVER`, so the two cannot
/// drift.
pub const KUBE_APISERVER_BIN: &str = concat!("/var/cache/netd/kube-apiserver-", kube_version!());
/// Where the built controller-manager is cached; handed over in
/// `NETD_KUBE_CONTROLLER_MANAGER` like the API server
/// (`netd::testing::KUBE_CONTROLLER_MANAGER_BIN` is the harness's default).
pub const KUBE_CONTROLLER_MANAGER_BIN: &str = concat!("/var/cache/netd/kube-controller-manager-", kube_version!());
/// Where the built kubelet is cached (the real-cluster harness's default,
/// `netd::testing::KUBELET_BIN`; handed over in `NETD_KUBELET`).
pub const KUBELET_BIN: &str = concat!("/var/cache/netd/kubelet-", kube_version!());
/// Where the built scheduler is cached (`NETD_KUBE_SCHEDULER`).
pub const KUBE_SCHEDULER_BIN: &str = concat!("/var/cache/netd/kube-scheduler-", kube_version!());
/// Work directory: the unpacked source and the build.
const BUILD_DIR: &str = "/var/cache/netd/build";
/// The deb-src entry `apt-get source` needs (Debian 12 images ship without one).
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/netd-bookworm-src.sources";
const DEB_SRC: &str = "Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
/// Build tools: Go, rsync (used by the Kubernetes build scripts), dpkg-dev
/// (unpacks source packages) and the reflect2 that works with Go 1.19.
const BUILD_PACKAGES: &[&str] = &["golang-go", "rsync", "dpkg-dev", "golang-github-modern-go-reflect2-dev"];
const REFLECT2_PACKAGED: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2/";

/// A Kubernetes program built from the Debian source tree and cached.
struct Component {
    /// The `cmd/<name>` directory and the binary's name.
    name: &'static str,
    /// Where the binary is cached.
    bin: &'static str,
    /// Roughly how long a build takes on two cores, for the messages.
    build_time: &'static str,
}

const KUBE_APISERVER: Component =
    Component { name: "kube-apiserver", bin: KUBE_APISERVER_BIN, build_time: "about 6 minutes" };
/// The controller-manager shares most packages with the API server, so once
/// the API server is built it takes 2-4 minutes (measured: 226 s wall, 110 s
/// CPU, on two busy cores).
const KUBE_CONTROLLER_MANAGER: Component = Component {
    name: "kube-controller-manager",
    bin: KUBE_CONTROLLER_MANAGER_BIN,
    build_time: "2-4 minutes after kube-apiserver, else about 6",
};

/// kubelet and kube-scheduler share most packages with the API server: both
/// together took 53 s once it was built.
const KUBELET: Component =
    Component { name: "kubelet", bin: KUBELET_BIN, build_time: "under a minute after kube-apiserver" };
const KUBE_SCHEDULER: Component =
    Component { name: "kube-scheduler", bin: KUBE_SCHEDULER_BIN, build_time: "under a minute after kube-apiserver" };

/// Returns the cached `kube-apiserver`, building it first when it is missing
/// (root; needs Debian's package mirrors). Idempotent.
pub fn ensure_kube_apiserver() -> Result<PathBuf> {
    ensure_built(&KUBE_APISERVER)
}

/// Returns the cached `kube-controller-manager` (CSR signing, node
/// lifecycle, node IPAM, the DaemonSet controller for the join, autonomy and
/// rollout tests), built from the same source tree as the API server when
/// missing. Idempotent.
pub fn ensure_kube_controller_manager() -> Result<PathBuf> {
    ensure_built(&KUBE_CONTROLLER_MANAGER)
}

/// Returns the cached kubelet and kube-scheduler (the real-cluster harness's
/// nodes and scheduler), built from the same source tree when missing.
pub fn ensure_node_components() -> Result<()> {
    ensure_built(&KUBELET)?;
    ensure_built(&KUBE_SCHEDULER).map(|_| ())
}

/// The environment that hands the cached binaries to tests and the lab
/// (read by `netd::testing`, which defaults to the same paths).
pub fn test_env() -> [(&'static str, &'static str); 4] {
    [
        ("NETD_KUBE_APISERVER", KUBE_APISERVER_BIN),
        ("NETD_KUBE_CONTROLLER_MANAGER", KUBE_CONTROLLER_MANAGER_BIN),
        ("NETD_KUBELET", KUBELET_BIN),
        ("NETD_KUBE_SCHEDULER", KUBE_SCHEDULER_BIN),
    ]
}

/// The cached binary of `component` when it runs and reports [`KUBE_VERSION`];
/// otherwise `make WHAT=cmd/<name>` in the (prepared) Debian source tree, then
/// the binary copied into the cache atomically.
fn ensure_built(component: &Component) -> Result<PathBuf> {
    let name = component.name;
    let bin = PathBuf::from(component.bin);
    if let Some(version) = binary_version(&bin) {
        println!("kube: {} already built ({version})", bin.display());
        return Ok(bin);
    }
    if !crate::setup::is_root() {
        bail!(
            "kube: {} is missing; run `sudo cargo xtask setup` to build it ({})",
            bin.display(),
            component.build_time
        );
    }
    let started = Instant::now();
    println!("kube: building {name} {KUBE_VERSION} from Debian's source package into {}", bin.display());
    let (source, version_file) = prepare_source()?;

    println!("kube: make WHAT=cmd/{name} (offline, vendored modules; {})", component.build_time);
    long_step(&format!("building {name}"), || {
        run(Command::new("make")
            .arg(format!("WHAT=cmd/{name}"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=vendor")
            .env("CGO_ENABLED", "0")
            .env("KUBE_GIT_VERSION_FILE", &version_file)
            .current_dir(&source))
    })?;

    let built = source.join("_output/bin").join(name);
    let partial = bin.with_extension("partial");
    std::fs::copy(&built, &partial).with_context(|| format!("copying {} to {}", built.display(), partial.display()))?;
    std::fs::rename(&partial, &bin).with_context(|| format!("renaming {} to {}", partial.display(), bin.display()))?;
    let version = binary_version(&bin).with_context(|| format!("{} does not run `--version`", bin.display()))?;
    println!("kube: built {} ({version}) in {}", bin.display(), elapsed(started.elapsed()));
    Ok(bin)
}

/// Makes the source tree buildable, reusing what an earlier build left:
/// build tools installed, `kubernetes` unpacked in [`BUILD_DIR`], the
/// reflect2 fix applied, the version file written. Returns the source
/// directory and the version file.
fn prepare_source() -> Result<(PathBuf, PathBuf)> {
    ensure_deb_src()?;
    println!("kube: build tools: {}", BUILD_PACKAGES.join(" "));
    long_step("installing the build tools", || {
        apt(&["-qq", "install", "-y", "--no-install-recommends"], BUILD_PACKAGES)
    })?;

    let work = Path::new(BUILD_DIR);
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let source = match source_dir(work)? {
        Some(dir) => {
            println!("kube: reusing unpacked source {}", dir.display());
            dir
        }
        None => {
            println!("kube: Kubernetes' Debian source package into {}", work.display());
            long_step("apt-get source kubernetes", || {
                run(Command::new("apt-get").args(["-qq", "source", "kubernetes"]).current_dir(work))
            })?;
            source_dir(work)?
                .with_context(|| format!("apt-get source left no kubernetes-*{KUBE_VERSION} in {BUILD_DIR}"))?
        }
    };

    // Idempotent (rsync of the same tree), so a reused source gets it too.
    println!("kube: replacing vendored reflect2 with Debian's (the vendored one crashes under Go 1.19)");
    let vendored = source.join("vendor/github.com/modern-go/reflect2/");
    run(Command::new("rsync").args(["-a", "--delete", REFLECT2_PACKAGED]).arg(&vendored))?;

    // Not a git checkout: tell the build its version, or it reports v0.0.0.
    let version_file = work.join(format!("kube-version-{KUBE_VERSION}.env"));
    let (major, minor) =
        KUBE_VERSION.split_once('.').map(|(a, rest)| (a, rest.split('.').next().unwrap_or(""))).unwrap_or(("", ""));
    let defs = format!(
        "KUBE_GIT_VERSION='v{KUBE_VERSION}'\nKUBE_GIT_MAJOR='{major}'\nKUBE_GIT_MINOR='{minor}'\nKUBE_GIT_TREE_STATE='clean'\n"
    );
    std::fs::write(&version_file, defs).with_context(|| format!("writing {}", version_file.display()))?;
    Ok((source, version_file))
}

/// `<binary> --version` output (`Kubernetes v1.20.2`) when the binary runs.
fn binary_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && text.contains(&format!("v{KUBE_VERSION}"))).then_some(text)
}

/// The unpacked `kubernetes-<version>` directory (Debian names it
/// `kubernetes-1.20.5+really1.20.2`), if there.
fn source_dir(work: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(work).with_context(|| format!("reading {}", work.display()))?;
    Ok(entries.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.starts_with("kubernetes-") && name.ends_with(KUBE_VERSION) && p.join("Makefile").is_file()
    }))
}

/// Adds a bookworm deb-src entry when apt has none, then refreshes the lists.
fn ensure_deb_src() -> Result<()> {
    if !Path::new(DEB_SRC_FILE).exists() {
        println!("kube: adding deb-src for bookworm in {DEB_SRC_FILE}");
        std::fs::write(DEB_SRC_FILE, DEB_SRC).with_context(|| format!("writing {DEB_SRC_FILE}"))?;
    }
    long_step("apt-get update", || apt(&["-qq", "update"], &[]))
}

fn apt(args: &[&str], packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get").args(args).args(packages).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
