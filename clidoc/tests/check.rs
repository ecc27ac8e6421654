//! `check` catches a stale reference: a changed page, a missing one and a
//! left-over one, each listed; a fresh `write` passes.

use std::fs;
use std::path::Path;

use netd_clidoc::{check, render, write, Stale, MAN_DIR, MARKDOWN_DIR};

#[test]
fn check_lists_every_stale_file() {
    let pages = render(&netd::cli::commands()).unwrap();
    let root = tempfile::tempdir().unwrap();
    write(root.path(), &pages).unwrap();
    assert_eq!(check(root.path(), &pages).unwrap(), Vec::new());

    // An option's help changed in the code but not in the committed page.
    let netd_md = Path::new(MARKDOWN_DIR).join("netd.md");
    let text = fs::read_to_string(root.path().join(&netd_md)).unwrap();
    assert!(text.contains("--log-format"), "netd.md documents --log-format:\n{text}");
    fs::write(root.path().join(&netd_md), text.replace("Log level.", "Log level (old text).")).unwrap();
    // A subcommand's man page was never committed.
    let run_man = Path::new(MAN_DIR).join("netd-run.1");
    fs::remove_file(root.path().join(&run_man)).unwrap();
    // A page of a subcommand that no longer exists.
    let gone = Path::new(MAN_DIR).join("netd-gone.1");
    fs::write(root.path().join(&gone), "old").unwrap();

    let stale = check(root.path(), &pages).unwrap();
    assert_eq!(stale, vec![Stale::Differs(netd_md), Stale::Missing(run_man), Stale::Extra(gone)]);

    // Writing again repairs all three.
    write(root.path(), &pages).unwrap();
    assert_eq!(check(root.path(), &pages).unwrap(), Vec::new());
}

#[test]
fn every_binary_and_subcommand_has_its_pages() {
    let pages = render(&netd::cli::commands()).unwrap();
    let paths: Vec<String> = pages.iter().map(|page| page.path.display().to_string()).collect();
    for name in ["netd", "netd-cloud", "netd-controller", "netd-join", "netd-autonomy", "netd-ipam"] {
        assert!(paths.contains(&format!("{MARKDOWN_DIR}/{name}.md")), "{name}.md missing: {paths:?}");
        assert!(paths.contains(&format!("{MAN_DIR}/{name}.1")), "{name}.1 missing: {paths:?}");
    }
    for man in ["netd-registry-token-create.1", "netd-cloud-tunnel-server.1", "netd-controller-rollout-status.1"] {
        assert!(paths.contains(&format!("{MAN_DIR}/{man}")), "{man} missing: {paths:?}");
    }
    assert!(!paths.iter().any(|path| path.ends_with("-help.1")), "clap's help subcommand has no page: {paths:?}");
    let page = |name: &str| {
        let path = format!("{MARKDOWN_DIR}/{name}.md");
        let page = pages.iter().find(|page| page.path.display().to_string() == path);
        String::from_utf8_lossy(&page.unwrap_or_else(|| panic!("{path}")).contents).into_owned()
    };
    // Environment and defaults are in the options' rows.
    let cloud = page("netd-cloud");
    assert!(cloud.contains("| `NETD_TUNNEL_AGENTS_LISTEN` | `10262` |"), "{cloud}");
    // netd-ipam's page names the CNI variables it reads.
    let ipam = page("netd-ipam");
    assert!(ipam.contains("CNI_CONTAINERID"), "{ipam}");
}
