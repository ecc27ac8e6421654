//! `netd-ipam`, described for the reference and its man page.
//!
//! A CNI plugin takes no arguments: the container runtime runs it with the
//! `CNI_*` variables ([`crate::cni::Invocation::from_env`]) and the network
//! configuration on stdin, and reads its result from stdout. The binary
//! parses nothing with clap, so that nothing a runtime passes can change
//! what it does; [`command`] only describes it.

/// The variables the plugin reads, with what each means to it.
pub const ENVIRONMENT: [(&str, &str); 4] = [
    ("CNI_COMMAND", "ADD, DEL, CHECK, VERSION, STATUS or GC (VERSION needs no stdin)."),
    ("CNI_CONTAINERID", "The container's ID: the allocation's owner (ADD, DEL, CHECK)."),
    ("CNI_IFNAME", "The interface name inside the container (ADD, DEL, CHECK)."),
    ("CNI_ARGS", "K=V;K=V pairs; K8S_POD_NAMESPACE and K8S_POD_NAME name the pod whose IP is pinned (ADD)."),
];

const ABOUT: &str = "CNI IPAM plugin pinning pod IPs to pod names";

const LONG_ABOUT: &str = "\
CNI IPAM plugin pinning pod IPs to pod names: a pod that comes back (same namespace and
name) gets its address again; a full pool reclaims the longest-released pin.

The container runtime runs it from the CNI bin directory (/opt/cni/bin, as `netd install-cni`
installs it) with the network configuration on stdin, as the conflist's
\"ipam\": {\"type\": \"netd-ipam\", ...}; the result (or a CNI error object) goes to stdout,
log lines to stderr. It takes no arguments.";

/// The plugin as a [`clap::Command`] with no arguments: its name, version,
/// what it does and its environment, for the generated reference. The
/// binary never parses with it.
pub fn command() -> clap::Command {
    let mut environment = String::from("Environment:\n");
    for (name, meaning) in ENVIRONMENT {
        environment.push_str(&format!("  {name}\n          {meaning}\n"));
    }
    environment.push_str("\nExample:\n  CNI_COMMAND=VERSION netd-ipam");
    clap::Command::new("netd-ipam")
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .long_about(LONG_ABOUT)
        .after_help(environment)
        .disable_help_flag(true)
        .disable_version_flag(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The described variables are exactly the ones the plugin reads: set
    /// in this process, each one reaches its field of `Invocation`, and the
    /// rendered help names every one.
    #[test]
    fn environment_names_the_variables_the_plugin_reads() {
        // No other test in this crate reads or sets CNI_* variables.
        for (name, _) in ENVIRONMENT {
            std::env::set_var(name, format!("value-of-{name}"));
        }
        let invocation = crate::cni::Invocation::from_env();
        for (name, _) in ENVIRONMENT {
            std::env::remove_var(name);
        }
        let read = [invocation.command, invocation.container_id, invocation.ifname, invocation.args];
        let expected: Vec<Option<String>> =
            ENVIRONMENT.iter().map(|(name, _)| Some(format!("value-of-{name}"))).collect();
        assert_eq!(read.to_vec(), expected);
        let help = command().render_long_help().to_string();
        for (name, _) in ENVIRONMENT {
            assert!(help.contains(name), "{name} missing from:\n{help}");
        }
    }
}
