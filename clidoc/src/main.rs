//! `netd-clidoc [--check] [ROOT]`: writes netd's CLI reference and man
//! pages under the workspace ROOT, or with `--check` fails listing every
//! committed page that is not what the binaries' commands make now.
//! `cargo xtask docs-cli [--check]` runs it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

/// Generates netd's CLI reference (docs/src/reference/cli/) and man pages
/// (docs/man/) from the binaries' clap commands.
#[derive(Debug, Parser)]
#[command(name = "netd-clidoc")]
struct Cli {
    /// Write nothing: render into a temporary directory and fail, listing them, if committed pages differ.
    #[arg(long)]
    check: bool,
    /// The workspace root.
    #[arg(value_name = "ROOT", default_value = ".")]
    root: PathBuf,
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let pages = netd_clidoc::render(&netd::cli::commands())?;
    if !cli.check {
        netd_clidoc::write(&cli.root, &pages)?;
        println!("wrote {} pages to {} and {}", pages.len(), netd_clidoc::MARKDOWN_DIR, netd_clidoc::MAN_DIR);
        return Ok(ExitCode::SUCCESS);
    }
    let stale = netd_clidoc::check(&cli.root, &pages)?;
    if stale.is_empty() {
        println!("the CLI reference is current ({} pages)", pages.len());
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("the CLI reference is stale (run `cargo xtask docs-cli` and commit the result):");
    for file in &stale {
        eprintln!("  {file}");
    }
    Ok(ExitCode::FAILURE)
}
