//! Developer and CI tasks: `cargo xtask <setup|test|bench|ci|demo>`.
//!
//! xtask itself depends on nothing that needs a system package to build, so
//! `cargo xtask setup` works on a fresh machine; the demo and the
//! side-by-side benchmarks live in the `netd-lab` crate (which builds on
//! `netd::testing`) and run after setup.

mod kube;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  demo    the main job: a 3-node cluster in network namespaces, pods across nodes, a node
          reboot with the registry stopped (root; installs what it needs; leaves nothing behind)
  setup   install (idempotently) the Debian packages netd needs to build, test and demo
  test    run every test, unprivileged and privileged (root; network namespaces),
          and check that no namespace, link or cgroup is left behind
  bench [cni|vxlan|events|rss|scenario|all]
          side-by-side benchmarks needing namespaces or external tools (root)
  ci      setup, fmt check, clippy, build, test, bench --no-run, doc: what CI runs
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprint!("{USAGE}");
        bail!("no task given");
    };
    match task.as_str() {
        "setup" => setup::run(),
        "test" => test::run(),
        "ci" => ci(),
        "demo" => demo(),
        "bench" => bench(args.get(1).map(String::as_str).unwrap_or("all")),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("{USAGE}");
            bail!("unknown task `{other}`")
        }
    }
}

/// The workspace root (the parent of xtask's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `cargo <args…>` in the workspace root with extra environment; fails on a non-zero exit.
pub fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs one named step and prints how long it took.
pub fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {name}");
    let started = Instant::now();
    f().with_context(|| format!("step `{name}` failed"))?;
    println!("<== {name}: ok in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Release builds of the daemon and the IPAM plugin, then `netd-lab` with
/// `args` and `--bin-dir` pointing at them.
fn lab(args: &[&str]) -> Result<()> {
    println!("building netd and netd-ipam (release)…");
    cargo(&["build", "--release", "--quiet", "-p", "netd", "--bin", "netd", "--bin", "netd-ipam"], &[])?;
    let bin_dir = workspace_root().join("target/release");
    let bin_dir = bin_dir.to_string_lossy();
    let mut full = vec!["run", "--release", "--quiet", "-p", "netd-lab", "--"];
    full.extend_from_slice(args);
    full.extend(["--bin-dir", &bin_dir]);
    cargo(&full, &[("NETD_KUBE_APISERVER", kube::KUBE_APISERVER_BIN)])
}

fn demo() -> Result<()> {
    setup::packages()?;
    lab(&["demo"])
}

fn bench(which: &str) -> Result<()> {
    const KNOWN: [&str; 6] = ["cni", "vxlan", "events", "rss", "scenario", "all"];
    if !KNOWN.contains(&which) {
        eprint!("{USAGE}");
        bail!("unknown benchmark `{which}` (known: {})", KNOWN.join(", "));
    }
    if matches!(which, "scenario" | "all") {
        // The scenario runs on a kube-apiserver too.
        setup::run()?;
    } else {
        setup::packages()?;
    }
    lab(&["bench", which])
}

fn ci() -> Result<()> {
    let started = Instant::now();
    step("setup", setup::run)?;
    step("fmt", || cargo(&["fmt", "--all", "--check"], &[]))?;
    step("clippy", || {
        cargo(&["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"], &[])
    })?;
    step("build", || cargo(&["build", "--workspace", "--all-targets"], &[]))?;
    step("test", test::run)?;
    step("bench --no-run", || cargo(&["bench", "--workspace", "--no-run"], &[]))?;
    step("doc", || cargo(&["doc", "--workspace", "--no-deps", "--all-features"], &[("RUSTDOCFLAGS", "-D warnings")]))?;
    println!("ci: all steps passed in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
