//! `netd-lab demo` (`cargo xtask demo`): the scenario of
//! `netd::testing::Scenario` narrated on the embedded registry — a 3-node
//! cluster in network namespaces, pods attached through Debian's `bridge`
//! plugin with netd-ipam, then a node reboot with the registry stopped, then
//! a rollout of a new netd binary over the nodes under a ping loop.

use std::path::Path;

use anyhow::{bail, Result};
use netd::testing::{self, Cluster, EmbeddedScenarioRegistry, Scenario};

/// Runs the demo with the release binaries in `bin_dir`.
pub fn run(bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the demo needs root (network namespaces)") };
    let state = tempfile::Builder::new().prefix("netd-demo-").tempdir()?;
    let registry = EmbeddedScenarioRegistry::create(&state.path().join("registry.db"))?;
    println!();
    // The "new version" of the rollout chapter: this build's netd installed
    // under another path, as a package upgrade would put it.
    let next = state.path().join("netd-next");
    std::fs::copy(bin_dir.join("netd"), &next)?;
    let scenario = Scenario::new(Cluster::bare(3)?, registry, bin_dir, state.path(), |line| println!("{line}"))?
        .with_rollout(&next);
    scenario.run()?;
    Ok(())
}
