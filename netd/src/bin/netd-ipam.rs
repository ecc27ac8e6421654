//! `netd-ipam`: CNI IPAM plugin pinning pod IPs to pod names.
//! Install into the CNI bin dir (`/opt/cni/bin`, `/usr/lib/cni`) and set
//! `"ipam": {"type": "netd-ipam", ...}`. See `netd::cni`.

use std::io::{Read, Write};
use std::process::ExitCode;

use netd::cni::{ipam_plugin, CniError, Invocation};

fn main() -> ExitCode {
    let invocation = Invocation::from_env();
    let mut stdin = Vec::new();
    // VERSION may come without stdin; every other command needs it and
    // reports a decode error if it is empty.
    let outcome = if invocation.command.as_deref() == Some("VERSION") {
        ipam_plugin::run(&invocation, b"{}")
    } else {
        match std::io::stdin().read_to_end(&mut stdin) {
            Ok(_) => ipam_plugin::run(&invocation, &stdin),
            Err(e) => Err(CniError::new(5, "cannot read the network configuration from stdin", e.to_string())),
        }
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(text) => {
            if !text.is_empty() && writeln!(stdout, "{text}").is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            let _ = writeln!(stdout, "{}", err.to_json());
            eprintln!("netd-ipam: {err}");
            ExitCode::FAILURE
        }
    }
}
