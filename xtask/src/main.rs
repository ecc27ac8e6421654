//! Developer and CI tasks: `cargo xtask <setup|test|bench|ci|demo|image>`.
//!
//! xtask itself depends on nothing that needs a system package to build, so
//! `cargo xtask setup` works on a fresh machine; the demo and the
//! side-by-side benchmarks live in the `netd-lab` crate (which builds on
//! `netd::testing`) and run after setup.

mod docs;
mod image;
mod instructions;
mod kube;
mod progress;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  demo [cluster]
          the main job: a 3-node cluster in network namespaces, pods across nodes, a node
          reboot with the registry stopped, a rollout, the cloud reaching an edge kubelet and
          pod through the tunnel alone (root; installs what it needs; leaves nothing behind);
          `cluster`: netd as deployed, on real kubelets and containerd (kubectl apply -f deploy/,
          pods across edge nodes, logs/exec/port-forward through the tunnel); builds what it
          needs first (Kubernetes 1.20.2 components, netd's image)
  setup   install (idempotently) the Debian packages netd needs to build, test and demo
  test    run every test, unprivileged and privileged (root; network namespaces),
          and check that no namespace, link or cgroup is left behind
  docs    build the book (docs/) into target/book with a pinned mdBook (installed into
          target/tools on first use), check its links and README's (no network), and
          that README has at most 200 lines; a step of `ci`
  bench [cni|vxlan|events|rss|scenario|dnat|tunnel|tunnel-scale|doors|tunnel-config|autonomy|pods|hub|reboot|all|smoke]
          side-by-side benchmarks needing namespaces or external tools (root); `pods`
          and `reboot` (a real cluster, netd's image) are not part of `all`; `smoke`
          runs every one once at tiny sizes on the debug build (what CI runs; no figures);
          `--plot DIR` (after the name) writes SVG charts of the cni, vxlan, dnat and tunnel
          tables into DIR (the book's are in docs/src/benchmarks/img)
  instructions [check|update|release]
          the hot paths' instruction counts (callgrind) against hotpaths/baseline.json:
          `check` fails on a rise over 5 %; `update` records the counts as the new baseline;
          `release` counts an optimised build (what the binaries run; no baseline)
  docs-cli [--check]
          the CLI reference (docs/src/reference/cli/) and man pages (docs/man/) from the
          binaries' clap commands; `--check` writes nothing and fails listing stale files
  ci      setup, fmt check, clippy, build (benches included), cli reference check, test,
          bench smoke, the demo (debug build), instructions check, doc: what CI runs
  image [netd|test|pause [OUT]|busybox [OUT]]
          netd's container image (release binaries, nft and their libraries) as a
          docker-save archive, target/image/netd.tar, tagged netd:<version>; no daemon
          needed; `test`: the same from the debug build the tests use; or the test
          nodes' pause and busybox images
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
        "docs" => docs::run(),
        "ci" => ci(),
        "demo" => match args.get(1).map(String::as_str) {
            None => demo(),
            Some("cluster") => demo_cluster(),
            Some(other) => {
                eprint!("{USAGE}");
                bail!("unknown demo `{other}` (known: cluster)")
            }
        },
        "image" => image::run(&args[1..]),
        "instructions" => instructions::run(&args[1..]),
        "docs-cli" => docs_cli(&args[1..]),
        "bench" => bench(&args[1..]),
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
    let mut command = Command::new(&cargo);
    // `cargo run` gave xtask the package variables of xtask itself. Passed
    // on, they reach build scripts that track them (ring's tracks
    // CARGO_MANIFEST_DIR), so every build from here would rebuild ring and
    // all that depends on it, and so would the next plain `cargo build`.
    for (name, _) in std::env::vars_os() {
        let is_package_var = name.to_str().is_some_and(|n| {
            n.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&n)
        });
        if is_package_var {
            command.env_remove(name);
        }
    }
    if let Some(dir) = target_dir_override() {
        // Absolute, so the cargo below (started in the workspace root) builds
        // where the user's relative path pointed.
        command.env("CARGO_TARGET_DIR", dir);
    }
    let status = command
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

/// The target directory the user chose with `CARGO_TARGET_DIR` (or
/// `CARGO_BUILD_TARGET_DIR`), made absolute against the directory xtask was
/// started in, as cargo reads it.
fn target_dir_override() -> Option<PathBuf> {
    let dir = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .find_map(|var| std::env::var_os(var).filter(|v| !v.is_empty()))
        .map(PathBuf::from)?;
    if dir.is_absolute() {
        return Some(dir);
    }
    Some(std::env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or(dir))
}

/// Where cargo puts build output: the user's choice, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    target_dir_override().unwrap_or_else(|| workspace_root().join("target"))
}

/// Release builds of the daemon, the IPAM plugin and the cloud side's
/// binary (tunnel server, DNAT, certificates), then `netd-lab` with
/// `args` and `--bin-dir` pointing at them. The builds show cargo's own
/// progress: a first build takes minutes, and silence looks like a hang.
fn lab(args: &[&str]) -> Result<()> {
    println!("==> building netd, netd-ipam and netd-cloud (release; the first build takes a few minutes)");
    cargo(&["build", "--release", "-p", "netd", "--bin", "netd", "--bin", "netd-ipam", "--bin", "netd-cloud"], &[])?;
    // Release: the lab measures netd's library in its own process too.
    println!("==> building netd-lab (release)");
    cargo(&["build", "--release", "-p", "netd-lab"], &[])?;
    println!("==> running netd-lab {}", args.join(" "));
    let bin_dir = target_dir().join("release");
    let bin_dir = bin_dir.to_string_lossy();
    // Built just above, so `run --quiet` only runs it.
    let mut full = vec!["run", "--release", "--quiet", "-p", "netd-lab", "--"];
    full.extend_from_slice(args);
    full.extend(["--bin-dir", &bin_dir]);
    let mut envs = kube::test_env().to_vec();
    // The real-cluster bench imports netd's image from where `cargo xtask
    // image` wrote it (under a user's CARGO_TARGET_DIR too).
    let image = target_dir().join("image/netd.tar");
    let image = image.to_string_lossy();
    envs.push(("NETD_IMAGE", &image));
    cargo(&full, &envs)
}

fn demo() -> Result<()> {
    setup::packages()?;
    lab(&["demo"])
}

fn demo_cluster() -> Result<()> {
    // Real kubelets: the Kubernetes builds and test images, then netd's
    // image from this tree.
    setup::run()?;
    image::run(&[])?;
    lab(&["demo", "cluster"])
}

/// Every lab benchmark once at tiny sizes (`netd-lab bench smoke`), on the
/// debug build of the whole workspace that `ci`'s build and test steps
/// made (the real-cluster ones on the test image `test` wrote): so CI
/// fails when a benchmark breaks, without a release build. Nothing it
/// prints is a figure to quote.
fn bench_smoke() -> Result<()> {
    setup::run()?;
    // Builds the workspace in the test configuration and writes the image
    // the real-cluster benches run.
    image::write_netd_images(image::Build::Test)?;
    run_smoke()
}

/// `netd-lab bench smoke` on the debug build and test image already made
/// (`ci` runs it right after the test step, which made both).
fn run_smoke() -> Result<()> {
    let bin_dir = target_dir().join("debug");
    let mut envs: Vec<(&str, &str)> = kube::test_env().to_vec();
    let image = target_dir().join("image/netd.tar");
    let image = image.to_string_lossy();
    envs.push(("NETD_IMAGE", &image));
    let lab = bin_dir.join("netd-lab");
    println!("==> running {} bench smoke", lab.display());
    let status = Command::new(&lab)
        .args(["bench", "smoke", "--bin-dir"])
        .arg(&bin_dir)
        .envs(envs.iter().copied())
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", lab.display()))?;
    if !status.success() {
        bail!("`netd-lab bench smoke` failed ({status})");
    }
    Ok(())
}

/// `netd-lab demo` on the debug build `ci`'s build step made (a few
/// seconds): the README's main command keeps working, and leaves nothing
/// behind (it fails if it does).
fn run_demo() -> Result<()> {
    let bin_dir = target_dir().join("debug");
    let lab = bin_dir.join("netd-lab");
    let status = Command::new(&lab)
        .args(["demo", "--bin-dir"])
        .arg(&bin_dir)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", lab.display()))?;
    if !status.success() {
        bail!("`netd-lab demo` failed ({status})");
    }
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let (which, plot) = match args {
        [] => ("all", None),
        [which] => (which.as_str(), None),
        [which, flag, dir] if flag == "--plot" && which != "smoke" => (which.as_str(), Some(dir)),
        _ => {
            eprint!("{USAGE}");
            bail!("bench takes a benchmark's name and optionally --plot DIR (not with smoke, which checks its charts in a temporary directory)")
        }
    };
    if which == "smoke" {
        return bench_smoke();
    }
    const KNOWN: [&str; 15] = [
        "cni",
        "vxlan",
        "events",
        "rss",
        "scenario",
        "dnat",
        "tunnel",
        "tunnel-scale",
        "doors",
        "tunnel-config",
        "autonomy",
        "pods",
        "hub",
        "reboot",
        "all",
    ];
    if !KNOWN.contains(&which) {
        eprint!("{USAGE}");
        bail!("unknown benchmark `{which}` (known: {}, smoke)", KNOWN.join(", "));
    }
    if matches!(which, "scenario" | "tunnel-config" | "autonomy" | "pods" | "hub" | "reboot" | "all") {
        // These run on a kube-apiserver too (pods: kubelets and the
        // scheduler as well, and the test images).
        setup::run()?;
    } else {
        setup::packages()?;
        if which == "tunnel" {
            setup::rathole()?;
        }
    }
    if matches!(which, "autonomy" | "all") {
        // The autonomy bench measures the real controller's memory.
        println!("==> building netd-controller (release)");
        cargo(&["build", "--release", "-p", "netd", "--bin", "netd-controller"], &[])?;
    }
    if matches!(which, "pods" | "reboot") {
        // The real cluster runs netd's image, from this tree's release build.
        image::run(&[])?;
    }
    match plot {
        // Absolute: the lab runs through `cargo run`, whose directory need not be ours.
        Some(dir) => {
            let dir = std::path::absolute(dir).with_context(|| format!("--plot {dir}"))?;
            lab(&["bench", which, "--plot", &dir.to_string_lossy()])
        }
        None => lab(&["bench", which]),
    }
}

/// `cargo xtask docs-cli [--check]`: netd-clidoc (built with `cargo
/// build`: it links netd, which xtask must not depend on) writes the CLI
/// reference and man pages, or checks the committed ones.
fn docs_cli(args: &[String]) -> Result<()> {
    let check = match args {
        [] => false,
        [flag] if flag == "--check" => true,
        _ => {
            eprint!("{USAGE}");
            bail!("docs-cli takes only --check")
        }
    };
    cargo(&["build", "-p", "netd-clidoc"], &[])?;
    run_clidoc(&target_dir().join("debug/netd-clidoc"), check)
}

/// Runs the netd-clidoc binary at `program` on the workspace root.
fn run_clidoc(program: &Path, check: bool) -> Result<()> {
    let mut command = Command::new(program);
    if check {
        command.arg("--check");
    }
    let status = command
        .arg(workspace_root())
        .status()
        .with_context(|| format!("running {} (built by `cargo build -p netd-clidoc`)", program.display()))?;
    if !status.success() {
        bail!("`netd-clidoc{}` failed ({status})", if check { " --check" } else { "" });
    }
    Ok(())
}

fn ci() -> Result<()> {
    let started = Instant::now();
    // A clean clone builds once: incremental caches would only add
    // gigabytes to a disk that CI machines do not always have.
    std::env::set_var("CARGO_INCREMENTAL", "0");
    step("setup", setup::run)?;
    step("fmt", || cargo(&["fmt", "--all", "--check"], &[]))?;
    step("clippy", || {
        cargo(&["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"], &[])
    })?;
    // The same features as the test step, so that step reuses these
    // artifacts instead of building every test binary a second time.
    // `--all-targets` compiles and links the criterion benches too; their
    // release build (thin LTO, 15 minutes of a clean CI run) is left to
    // `cargo xtask bench`, which measures with it.
    step("build", || cargo(&["build", "--workspace", "--all-targets", "--all-features"], &[]))?;
    // The generator the build step just made: `cargo run` would build it
    // again with other features (and netd with it).
    step("cli reference", || run_clidoc(&target_dir().join("debug/netd-clidoc"), true))?;
    step("test", test::run)?;
    // The test step set up the machine and wrote the test image.
    step("bench smoke", run_smoke)?;
    step("demo", run_demo)?;
    step("instructions", || instructions::run(&[]))?;
    step("doc", || cargo(&["doc", "--workspace", "--no-deps", "--all-features"], &[("RUSTDOCFLAGS", "-D warnings")]))?;
    step("docs", docs::run)?;
    println!("ci: all steps passed in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
