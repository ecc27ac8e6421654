//! `cargo xtask instructions [check|update|release]`: the instruction-count
//! guard of netd's hot paths.
//!
//! Each case of `netd-hotpaths` (`hotpaths/`) runs once under Valgrind's
//! callgrind, which counts the instructions of the hot path alone
//! (`--toggle-collect` on the one function that runs it). `check` compares
//! the counts with the committed baseline, `hotpaths/baseline.json`, and
//! fails when any case grew by more than [`LIMIT`]; `update` rewrites the
//! baseline, which is how a deliberate change of cost is recorded (the diff
//! of the baseline shows up in review beside the code that changed it).
//!
//! Counts are made on the debug build of the workspace that CI's build and
//! test steps already compiled (every target, every feature): an optimised
//! build of the crates these paths run through costs 11.5 CPU-minutes more
//! (opt-level 3, no LTO; measured on this machine), which CI's time budget
//! does not hold. Unoptimised counts weigh abstractions more than release
//! code would, so a refactor can move them with no cost in release; what
//! they do catch is more work per call: extra passes, allocations, copies,
//! syscalls, a lookup that turned linear. Counts are compared only with
//! counts made by the same compiler: the baseline records the `rustc` and
//! Valgrind versions it was made with, and a check says so when they differ.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// The largest rise a case may show before the check fails: 5 %.
const LIMIT: f64 = 0.05;

/// Where the committed baseline lives, under the workspace root.
const BASELINE: &str = "hotpaths/baseline.json";

/// The function whose instructions callgrind collects (and all it calls).
const MEASURED: &str = "netd_hotpaths::measured*";

/// The cases that program the kernel: they run as root, in a network
/// namespace or a cgroup of their own that the case makes.
fn needs_root(case: &str) -> bool {
    case.starts_with("vxlan-") || case.starts_with("dnat-")
}

/// `cargo xtask instructions [check|update|release]`.
pub fn run(args: &[String]) -> Result<()> {
    let update = match args.first().map(String::as_str) {
        None | Some("check") => false,
        Some("update") => true,
        Some("release") => return release(),
        Some(other) => bail!("unknown `instructions` mode `{other}` (known: check, update, release)"),
    };
    crate::setup::packages()?;
    // The same selection and features as `ci`'s build step: nothing to
    // build after it.
    println!("==> building the workspace (debug, every target and feature)");
    crate::cargo(&["build", "--workspace", "--all-targets", "--all-features"], &[])?;
    let binary = crate::target_dir().join("debug/netd-hotpaths");
    let counts = count_all(&binary)?;
    let baseline_path = crate::workspace_root().join(BASELINE);
    let versions = Versions::now()?;
    if update {
        write_baseline(&baseline_path, &versions, &counts)?;
        println!("instructions: wrote {} ({} cases)", baseline_path.display(), counts.len());
        return Ok(());
    }
    let baseline = read_baseline(&baseline_path)?;
    compare(&baseline, &versions, &counts)
}

/// `release`: every case counted on an optimised build, what the shipped
/// binaries run (the book's cost breakdowns quote these). Not a guard: CI
/// does not build it (see the module's note), and no baseline is kept.
fn release() -> Result<()> {
    crate::setup::packages()?;
    println!("==> building netd-hotpaths (release)");
    crate::cargo(&["build", "--release", "-p", "netd-hotpaths"], &[])?;
    let counts = count_all(&crate::target_dir().join("release/netd-hotpaths"))?;
    println!("\n| case | instructions (release) |");
    println!("| --- | ---: |");
    for (case, count) in &counts {
        println!("| {case} | {count} |");
    }
    Ok(())
}

/// Every case's instruction count, in the order `netd-hotpaths list` gives.
fn count_all(binary: &Path) -> Result<BTreeMap<String, u64>> {
    let listed = Command::new(binary).arg("list").output().with_context(|| format!("running {}", binary.display()))?;
    ensure!(listed.status.success(), "{} list failed: {}", binary.display(), String::from_utf8_lossy(&listed.stderr));
    let cases: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|line| line.split('\t').next())
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect();
    let root = crate::setup::is_root();
    let scratch = tempfile_dir()?;
    let mut counts = BTreeMap::new();
    for case in &cases {
        if needs_root(case) && !root {
            if std::env::var_os("NETD_REQUIRE_PRIVILEGED").is_some() {
                bail!("instructions: case {case} needs root (a network namespace) and NETD_REQUIRE_PRIVILEGED is set");
            }
            println!("instructions: {case}: skipped (needs root for a network namespace of its own)");
            continue;
        }
        let out = scratch.join(format!("callgrind.{case}.out"));
        let count = count_one(binary, case, &out)?;
        println!("instructions: {case}: {count}");
        counts.insert(case.clone(), count);
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(counts)
}

/// One case under callgrind; the instructions collected.
fn count_one(binary: &Path, case: &str, out: &Path) -> Result<u64> {
    let mut command = Command::new("valgrind");
    command
        .args(["--tool=callgrind", "--collect-atstart=no"])
        .arg(format!("--toggle-collect={MEASURED}"))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(binary)
        .arg(case);
    let output = command.output().with_context(|| format!("running callgrind on {case} (is valgrind installed?)"))?;
    ensure!(
        output.status.success(),
        "callgrind run of {case} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let profile = fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let count = profile
        .lines()
        .find_map(|line| line.strip_prefix("totals:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("no `totals:` line in {}", out.display()))?;
    ensure!(count > 0, "callgrind collected no instructions for {case}: is `{MEASURED}` still the measured function?");
    Ok(count)
}

/// The tools a count depends on.
#[derive(Debug, PartialEq, Eq)]
struct Versions {
    rustc: String,
    valgrind: String,
}

impl Versions {
    fn now() -> Result<Self> {
        let version = |program: &str| -> Result<String> {
            let output = Command::new(program)
                .arg("--version")
                .output()
                .with_context(|| format!("running {program} --version"))?;
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        };
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        Ok(Self { rustc: version(&rustc)?, valgrind: version("valgrind")? })
    }
}

struct Baseline {
    versions: Versions,
    counts: BTreeMap<String, u64>,
}

fn write_baseline(path: &Path, versions: &Versions, counts: &BTreeMap<String, u64>) -> Result<()> {
    let document = json!({
        "version": 1,
        "profile": "dev",
        "rustc": versions.rustc,
        "valgrind": versions.valgrind,
        "instructions": counts,
    });
    let text = serde_json::to_string_pretty(&document)? + "\n";
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read_baseline(path: &Path) -> Result<Baseline> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading {} (make it with `cargo xtask instructions update`)", path.display()))?;
    let document: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    ensure!(
        document.get("version") == Some(&json!(1)),
        "{}: version {:?}, this xtask reads version 1",
        path.display(),
        document.get("version")
    );
    let text_field = |name: &str| -> Result<String> {
        document
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("{}: `{name}` missing or not a string", path.display()))
    };
    let counts = document
        .get("instructions")
        .and_then(Value::as_object)
        .with_context(|| format!("{}: `instructions` missing or not an object", path.display()))?
        .iter()
        .map(|(case, count)| {
            count
                .as_u64()
                .map(|count| (case.clone(), count))
                .with_context(|| format!("{}: the count of {case} is not a whole number", path.display()))
        })
        .collect::<Result<_>>()?;
    Ok(Baseline { versions: Versions { rustc: text_field("rustc")?, valgrind: text_field("valgrind")? }, counts })
}

/// The table of both counts, then the verdict.
fn compare(baseline: &Baseline, versions: &Versions, counts: &BTreeMap<String, u64>) -> Result<()> {
    println!("\n| case | baseline | now | change |");
    println!("| --- | ---: | ---: | ---: |");
    let mut risen = Vec::new();
    let mut missing = Vec::new();
    let mut fallen = Vec::new();
    for (case, &now) in counts {
        let Some(&before) = baseline.counts.get(case) else {
            println!("| {case} | — | {now} | new |");
            missing.push(case.clone());
            continue;
        };
        let change = now as f64 / before.max(1) as f64 - 1.0;
        println!("| {case} | {before} | {now} | {:+.2} % |", change * 100.0);
        if change > LIMIT {
            risen.push(format!("{case} {:+.1} %", change * 100.0));
        } else if change < -LIMIT {
            fallen.push(format!("{case} {:+.1} %", change * 100.0));
        }
    }
    let gone: Vec<&String> = baseline.counts.keys().filter(|case| !counts.contains_key(*case)).collect();
    if &baseline.versions != versions {
        println!(
            "\nnote: the baseline was made with {} and {}; this run used {} and {} (a new compiler moves counts)",
            baseline.versions.rustc, baseline.versions.valgrind, versions.rustc, versions.valgrind
        );
    }
    if !fallen.is_empty() {
        println!(
            "\nfewer instructions than the baseline by more than {:.0} %: {} (record it with `cargo xtask instructions update`)",
            LIMIT * 100.0,
            fallen.join(", ")
        );
    }
    if !risen.is_empty() {
        bail!(
            "instructions: {} rose by more than {:.0} % over {BASELINE}; if the cost is meant, record it with \
             `cargo xtask instructions update` and commit the baseline with the change",
            risen.join(", "),
            LIMIT * 100.0
        );
    }
    ensure!(
        missing.is_empty(),
        "instructions: {} not in {BASELINE}: add it with `cargo xtask instructions update`",
        missing.join(", ")
    );
    let skipped_root = gone.iter().all(|case| needs_root(case)) && !crate::setup::is_root();
    if !gone.is_empty() && !skipped_root {
        bail!(
            "instructions: {BASELINE} has cases netd-hotpaths no longer runs: {}; update the baseline",
            gone.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    println!("\ninstructions: every case within {:.0} % of {BASELINE}", LIMIT * 100.0);
    Ok(())
}

/// A scratch directory for the profiles (removed after the run).
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("netd-instructions-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions() -> Versions {
        Versions { rustc: "rustc 1.95.0".into(), valgrind: "valgrind-3.19.0".into() }
    }

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(case, n)| (case.to_string(), *n)).collect()
    }

    fn baseline(pairs: &[(&str, u64)]) -> Baseline {
        Baseline { versions: versions(), counts: counts(pairs) }
    }

    #[test]
    fn a_rise_over_the_limit_fails_and_one_under_it_passes() {
        let before = baseline(&[("ipam-allocate", 1_000_000), ("tunnel-splice", 2_000_000)]);
        assert!(compare(&before, &versions(), &counts(&[("ipam-allocate", 1_049_000), ("tunnel-splice", 2_000_000)]))
            .is_ok());
        let error = compare(&before, &versions(), &counts(&[("ipam-allocate", 1_051_000), ("tunnel-splice", 1_000)]))
            .expect_err("a 5.1 % rise must fail");
        let message = error.to_string();
        assert!(message.contains("ipam-allocate +5.1 %"), "{message}");
        assert!(message.contains("cargo xtask instructions update"), "{message}");
    }

    #[test]
    fn a_fall_passes_and_a_case_missing_from_either_side_fails() {
        let before = baseline(&[("ipam-allocate", 1_000_000)]);
        assert!(compare(&before, &versions(), &counts(&[("ipam-allocate", 500_000)])).is_ok());
        let new_case = compare(&before, &versions(), &counts(&[("ipam-allocate", 1_000_000), ("tunnel-splice", 1)]));
        assert!(new_case.expect_err("a case without a baseline").to_string().contains("tunnel-splice not in"));
        let gone = compare(
            &baseline(&[("ipam-allocate", 1), ("ipam-release", 1)]),
            &versions(),
            &counts(&[("ipam-allocate", 1)]),
        );
        assert!(gone.expect_err("a baseline case no longer run").to_string().contains("ipam-release"));
    }

    #[test]
    fn a_baseline_is_read_back_and_bad_ones_say_why() {
        let dir = std::env::temp_dir().join(format!("netd-instructions-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch directory");
        let path = dir.join("baseline.json");
        let written = counts(&[("ipam-allocate", 1_798_185), ("vxlan-peer-event", 170_355)]);
        write_baseline(&path, &versions(), &written).expect("write");
        let read = read_baseline(&path).expect("read back");
        assert_eq!((read.counts, read.versions), (written, versions()));

        let cases = [
            ("{", "is not JSON"),
            (r#"{"version":2,"rustc":"r","valgrind":"v","instructions":{}}"#, "this xtask reads version 1"),
            (r#"{"version":1,"valgrind":"v","instructions":{}}"#, "`rustc` missing"),
            (
                r#"{"version":1,"rustc":"r","valgrind":"v","instructions":[]}"#,
                "`instructions` missing or not an object",
            ),
            (
                r#"{"version":1,"rustc":"r","valgrind":"v","instructions":{"a":-1}}"#,
                "the count of a is not a whole number",
            ),
            (
                r#"{"version":1,"rustc":"r","valgrind":"v","instructions":{"a":"12"}}"#,
                "the count of a is not a whole number",
            ),
        ];
        for (text, expected) in cases {
            fs::write(&path, text).expect("write");
            let error = read_baseline(&path).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
