//! `netd-lab demo` (`cargo xtask demo`): the scenario of
//! `netd::testing::Scenario` narrated on the embedded registry — a 3-node
//! cluster in network namespaces, pods attached through Debian's `bridge`
//! plugin with netd-ipam, then a node reboot with the registry stopped, then
//! a rollout of a new netd binary over the nodes under a ping loop, then
//! the cloud reaching an edge node's kubelet and a pod's metrics through the
//! tunnel alone ([`tunnel`]).

mod tunnel;

use std::path::Path;

use anyhow::{bail, Result};
use netd::testing::{self, Cluster, EmbeddedScenarioRegistry, Scenario};

/// Runs the demo with the release binaries in `bin_dir`.
pub fn run(bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the demo needs root (network namespaces)") };
    let story = story(bin_dir);
    // Every guard has dropped by now, on failure too: nothing may be left.
    let left = testing::leftovers();
    if !left.is_empty() {
        let left = format!("the demo left behind: {}", left.join(", "));
        return Err(match story {
            Err(err) => err.context(left),
            Ok(()) => anyhow::anyhow!(left),
        });
    }
    story?;
    println!("[ done  ] nothing left behind: no network namespace, link, cgroup or BPF pin of the demo remains");
    Ok(())
}

fn story(bin_dir: &Path) -> Result<()> {
    let state = tempfile::Builder::new().prefix("netd-demo-").tempdir()?;
    let registry = EmbeddedScenarioRegistry::create(&state.path().join("registry.db"))?;
    println!();
    // The "new version" of the rollout chapter: this build's netd installed
    // under another path, as a package upgrade would put it.
    let next = state.path().join("netd-next");
    std::fs::copy(bin_dir.join("netd"), &next)?;
    let scenario = Scenario::new(Cluster::bare(3)?, registry, bin_dir, state.path(), |line| println!("{line}"))?
        .with_rollout(&next)
        .with_chapter(|stage| tunnel::chapter(stage, bin_dir).map_err(Into::into));
    scenario.run()?;
    Ok(())
}
