//! The command lines of netd's binaries, declared once with clap: each
//! binary parses its [`clap::Parser`] from here, and the CLI reference and
//! man pages (`cargo xtask docs-cli`) are generated from the same types
//! through [`commands`].
//!
//! The doc comments of the options are their `--help` text: they are
//! written for the terminal, not for rustdoc.

// `--help` says <NAME> and <cache-dir> as clap does; rustdoc would take
// them for HTML tags.
#![allow(rustdoc::invalid_html_tags)]

pub mod autonomy;
pub mod cloud;
pub mod controller;
pub mod ipam;
pub mod join;
pub mod netd;

use clap::CommandFactory as _;

/// Every binary's command, in the order the reference lists them: the node
/// agent, the cloud side, the controller, joining, autonomy, the CNI plugin.
/// `netd-ipam`'s is a description only ([`ipam::command`]).
pub fn commands() -> Vec<clap::Command> {
    vec![
        netd::Cli::command(),
        cloud::Cli::command(),
        controller::Cli::command(),
        join::Cli::command(),
        autonomy::Cli::command(),
        ipam::command(),
    ]
}
