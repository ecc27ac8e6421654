//! `netd-lab bench scenario`: the demo's scenario (`netd::testing::Scenario`)
//! repeated on each registry backend with the release binaries; medians of
//! what a node operator waits for.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use netd::testing::{
    self, Cluster, EmbeddedScenarioRegistry, EtcdScenarioRegistry, KubeScenarioRegistry, Scenario, ScenarioRegistry,
    ScenarioReport,
};

use crate::bench::{machine, ms, percentile};

fn once<R: ScenarioRegistry>(bin_dir: &Path, make: impl FnOnce(&Cluster) -> Result<R>) -> Result<ScenarioReport> {
    let state = tempfile::tempdir()?;
    let cluster = Cluster::bare(3)?;
    let registry = make(&cluster)?;
    Ok(Scenario::new(cluster, registry, bin_dir, state.path(), |_| {})?.run()?)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    percentile(&values, 0.5)
}

fn row(label: &str, reports: &[ScenarioReport]) {
    let pick = |f: fn(&ScenarioReport) -> Duration| median(reports.iter().map(f).collect());
    let ready = median(reports.iter().flat_map(|r| r.node_ready.iter().copied()).collect());
    let (registry_start, resynced) = (pick(|r| r.registry_start), pick(|r| r.resynced));
    // The registry's own restart is the floor of the resync: netd cannot
    // resync before its registry serves.
    let ratio = if registry_start >= Duration::from_millis(1) {
        format!("{:.3}×", resynced.as_secs_f64() / registry_start.as_secs_f64())
    } else {
        "— (nothing to wait for: netd's backoff)".into()
    };
    println!(
        "| {label} | {} | {} | {} | {} | {} | {} | {ratio} |",
        ms(ready),
        ms(pick(|r| r.restored)),
        ms(pick(|r| r.pod_reattached)),
        ms(pick(|r| r.traffic_back)),
        ms(registry_start),
        ms(resynced),
    );
}

/// Runs the scenario `reps` times per registry and prints the book's table.
pub fn run(reps: usize, bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the scenario benchmark needs root") };
    println!("machine: {}", machine());
    println!("\nthe demo scenario, median of {reps} runs per registry (ms):\n");
    println!("| registry | netd start → ready | reboot: netd start → ready from snapshot | → pod re-attached (same IP) | → cross-node ping works | registry restart until healthy (floor) | registry restart → node resynced | resync ÷ floor |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut embedded = Vec::new();
    let mut etcd = Vec::new();
    let mut kube = Vec::new();
    for _ in 0..reps {
        let dir = tempfile::tempdir()?;
        embedded.push(once(bin_dir, |_| Ok(EmbeddedScenarioRegistry::create(&dir.path().join("registry.db"))?))?);
        etcd.push(once(bin_dir, |c| Ok(EtcdScenarioRegistry::start_on(c)?))?);
        kube.push(once(bin_dir, |c| Ok(KubeScenarioRegistry::start_on(c)?))?);
    }
    row("embedded (SQLite file)", &embedded);
    row("etcd 3.4 (Debian)", &etcd);
    row("kube-apiserver 1.20.2", &kube);
    Ok(())
}
