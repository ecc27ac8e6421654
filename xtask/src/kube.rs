//! A real `kube-apiserver` for the Kubernetes registry tests, built once from
//! Debian's source package and cached outside the repository.
//!
//! Debian 12 ships Kubernetes 1.20.2 as source only (its binary package is
//! `kubernetes-client`, i.e. kubectl), so [`ensure_kube_apiserver`] builds the
//! server from that source with Debian's Go, offline (`GOPROXY=off`, the
//! vendored modules). One fix is needed: the vendored
//! `github.com/modern-go/reflect2` crashes the server when built with Go 1.19,
//! so Debian's packaged reflect2 replaces it. The build takes about six
//! minutes on two cores; afterwards the cached binary is reused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

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

/// Returns the cached `kube-apiserver`, building it first when it is missing
/// (root; needs Debian's package mirrors). Idempotent.
pub fn ensure_kube_apiserver() -> Result<PathBuf> {
    let bin = PathBuf::from(KUBE_APISERVER_BIN);
    if let Some(version) = binary_version(&bin) {
        println!("kube: {} already built ({version})", bin.display());
        return Ok(bin);
    }
    if !is_root() {
        bail!("kube: {} is missing; run `sudo cargo xtask setup` to build it (about 6 minutes)", bin.display());
    }
    let started = Instant::now();
    println!("kube: building kube-apiserver {KUBE_VERSION} from Debian's source package into {}", bin.display());
    ensure_deb_src()?;
    println!("kube: installing build tools {}", BUILD_PACKAGES.join(" "));
    apt(&["-qq", "install", "-y", "--no-install-recommends"], BUILD_PACKAGES)?;

    let work = Path::new(BUILD_DIR);
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let source = match source_dir(work)? {
        Some(dir) => {
            println!("kube: reusing unpacked source {}", dir.display());
            dir
        }
        None => {
            println!("kube: apt-get source kubernetes (into {})", work.display());
            run(Command::new("apt-get").args(["-qq", "source", "kubernetes"]).current_dir(work))?;
            source_dir(work)?
                .with_context(|| format!("apt-get source left no kubernetes-*{KUBE_VERSION} in {BUILD_DIR}"))?
        }
    };

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

    println!("kube: make WHAT=cmd/kube-apiserver (offline, vendored modules; several minutes)");
    run(Command::new("make")
        .arg("WHAT=cmd/kube-apiserver")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=vendor")
        .env("CGO_ENABLED", "0")
        .env("KUBE_GIT_VERSION_FILE", &version_file)
        .current_dir(&source))?;

    let built = source.join("_output/bin/kube-apiserver");
    let partial = bin.with_extension("partial");
    std::fs::copy(&built, &partial).with_context(|| format!("copying {} to {}", built.display(), partial.display()))?;
    std::fs::rename(&partial, &bin).with_context(|| format!("renaming {} to {}", partial.display(), bin.display()))?;
    let version = binary_version(&bin).with_context(|| format!("{} does not run `--version`", bin.display()))?;
    println!("kube: built {} ({version}) in {:.0}s", bin.display(), started.elapsed().as_secs_f64());
    Ok(bin)
}

/// `kube-apiserver --version` output (`Kubernetes v1.20.2`) when the binary runs.
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
    println!("kube: apt-get update");
    apt(&["-qq", "update"], &[])
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0").unwrap_or(false)
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
