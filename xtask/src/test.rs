//! `cargo xtask test`: every test, privileged ones included, then a check
//! that the run left no namespace, link or cgroup behind.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cargo;

/// What the kernel holds that tests could leak.
#[derive(Debug, PartialEq, Eq)]
struct KernelObjects {
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    cgroups: BTreeSet<String>,
}

fn netns_names() -> Result<BTreeSet<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output().context("running `ip netns list`")?;
    if !out.status.success() {
        bail!("`ip netns list` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect())
}

fn link_names() -> Result<BTreeSet<String>> {
    let out = Command::new("ip").args(["-o", "link", "show"]).output().context("running `ip -o link show`")?;
    if !out.status.success() {
        bail!("`ip -o link show` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // "3: eth0@if2: <...>" -> "eth0"
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_string())
        .collect())
}

fn cgroup2_root() -> Option<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| fields.get(1).map(|s| s.to_string()))?
    })
}

fn cgroup_dirs(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.insert(path.strip_prefix(root).unwrap_or(&path).display().to_string());
            cgroup_dirs(&path, root, out);
        }
    }
}

fn snapshot() -> Result<KernelObjects> {
    let mut cgroups = BTreeSet::new();
    if let Some(root) = cgroup2_root() {
        cgroup_dirs(Path::new(&root), Path::new(&root), &mut cgroups);
    }
    Ok(KernelObjects { netns: netns_names()?, links: link_names()?, cgroups })
}

fn describe(kind: &str, before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    let mut lines = Vec::new();
    for added in after.difference(before) {
        lines.push(format!("  {kind} left behind: {added}"));
    }
    for removed in before.difference(after) {
        lines.push(format!("  {kind} removed: {removed}"));
    }
    lines
}

/// Runs the whole test suite and the leak check.
pub fn run() -> Result<()> {
    // The real-cluster tests run netd's image, made from the programs this
    // run tests (the debug build; `cargo xtask image` ships release).
    crate::image::write_netd_images(crate::image::Build::Test)?;
    let before = snapshot()?;
    // Privileged tests must fail, not skip, when they cannot run.
    let mut envs = vec![("NETD_REQUIRE_PRIVILEGED", "1")];
    envs.extend(crate::kube::test_env());
    // The image `cargo xtask image` wrote (under a user's CARGO_TARGET_DIR too).
    let image = crate::target_dir().join("image/netd.tar");
    let image = image.to_string_lossy().into_owned();
    envs.push(("NETD_IMAGE", &image));
    let result = cargo(&["test", "--workspace", "--all-features"], &envs)
        // The criterion benchmarks in their test mode (each benchmark run
        // once, its assertions checked): a broken benchmark fails here, not
        // in someone's measuring run.
        .and_then(|()| cargo(&["test", "--workspace", "--all-features", "--bench", "*"], &envs));
    let after = snapshot()?;
    result?;
    if before != after {
        let mut report = Vec::new();
        report.extend(describe("network namespace", &before.netns, &after.netns));
        report.extend(describe("link", &before.links, &after.links));
        report.extend(describe("cgroup", &before.cgroups, &after.cgroups));
        bail!("the test run changed kernel state:\n{}", report.join("\n"));
    }
    println!(
        "test: kernel state unchanged ({} namespaces, {} links, {} cgroups before and after)",
        after.netns.len(),
        after.links.len(),
        after.cgroups.len()
    );
    Ok(())
}
