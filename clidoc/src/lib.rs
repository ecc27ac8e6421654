//! netd's command-line reference, generated from the binaries' clap
//! commands ([`netd::cli::commands`]): a Markdown page per binary for the
//! book (`docs/src/reference/cli/`) and a man page per binary and
//! subcommand (`docs/man/`, with [`clap_mangen`]).
//!
//! [`render`] makes the pages in memory, [`write()`] puts them under a
//! workspace root (removing pages no command makes any more) and [`check`]
//! renders into a temporary directory and lists every committed file that
//! differs, is missing or is left over. `cargo xtask docs-cli [--check]`
//! runs them through this crate's binary.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};

/// Where the Markdown pages go, relative to the workspace root.
pub const MARKDOWN_DIR: &str = "docs/src/reference/cli";

/// Where the man pages go, relative to the workspace root.
pub const MAN_DIR: &str = "docs/man";

/// What can go wrong reading or writing the pages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read, written or removed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing", "reading", …).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// clap_mangen could not render a man page.
    #[error("rendering the man page of {command}: {source}")]
    Man {
        /// The command, as its page is named (`netd-run`).
        command: String,
        /// The underlying error.
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// One generated file: its path relative to the workspace root, and its
/// contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// E.g. `docs/man/netd-run.1`.
    pub path: PathBuf,
    /// The whole file.
    pub contents: Vec<u8>,
}

/// A committed file that is not what the commands make now.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stale {
    /// The file's contents differ from the generated page.
    Differs(PathBuf),
    /// A page is generated but not committed.
    Missing(PathBuf),
    /// A file in a generated directory that no command makes.
    Extra(PathBuf),
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Differs(path) => write!(f, "{}: differs from the generated page", path.display()),
            Stale::Missing(path) => write!(f, "{}: missing", path.display()),
            Stale::Extra(path) => write!(f, "{}: no command generates it", path.display()),
        }
    }
}

/// Every page of `commands` (each a binary's top-level command): the
/// Markdown index and a page per binary, and a man page per binary and
/// subcommand.
pub fn render(commands: &[Command]) -> Result<Vec<Page>, Error> {
    let mut pages = Vec::new();
    let mut built = Vec::new();
    for command in commands {
        let mut command = command.clone().disable_help_subcommand(true);
        command.build();
        built.push(command);
    }
    pages.push(Page { path: Path::new(MARKDOWN_DIR).join("index.md"), contents: index(&built).into_bytes() });
    for command in &built {
        let name = command.get_name();
        pages.push(Page {
            path: Path::new(MARKDOWN_DIR).join(format!("{name}.md")),
            contents: binary_page(command).into_bytes(),
        });
        let source = format!("{name} {}", command.get_version().unwrap_or_default());
        man_pages(command, &source, &mut pages)?;
    }
    Ok(pages)
}

/// Writes `pages` under `root`, and removes every other file in
/// [`MARKDOWN_DIR`] and [`MAN_DIR`]: they hold generated pages only.
pub fn write(root: &Path, pages: &[Page]) -> Result<(), Error> {
    let wanted: BTreeSet<&Path> = pages.iter().map(|page| page.path.as_path()).collect();
    for dir in [MARKDOWN_DIR, MAN_DIR] {
        for file in files_in(root, Path::new(dir))? {
            if !wanted.contains(file.as_path()) {
                let path = root.join(&file);
                fs::remove_file(&path).map_err(io_error("removing", &path))?;
            }
        }
    }
    for page in pages {
        let path = root.join(&page.path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        }
        // Unchanged pages keep their modification time.
        if fs::read(&path).ok().as_deref() != Some(page.contents.as_slice()) {
            fs::write(&path, &page.contents).map_err(io_error("writing", &path))?;
        }
    }
    Ok(())
}

/// Renders `pages` into a temporary directory and compares the generated
/// directories with those under `root`: empty when the committed reference
/// is current.
pub fn check(root: &Path, pages: &[Page]) -> Result<Vec<Stale>, Error> {
    let fresh = tempfile::tempdir().map_err(io_error("creating a temporary directory in", &std::env::temp_dir()))?;
    write(fresh.path(), pages)?;
    let mut stale = Vec::new();
    for dir in [MARKDOWN_DIR, MAN_DIR] {
        let generated: BTreeSet<PathBuf> = files_in(fresh.path(), Path::new(dir))?.into_iter().collect();
        let committed: BTreeSet<PathBuf> = files_in(root, Path::new(dir))?.into_iter().collect();
        for file in generated.union(&committed) {
            match (generated.contains(file), committed.contains(file)) {
                (true, false) => stale.push(Stale::Missing(file.clone())),
                (false, _) => stale.push(Stale::Extra(file.clone())),
                (true, true) => {
                    let read = |base: &Path| {
                        let path = base.join(file);
                        fs::read(&path).map_err(io_error("reading", &path))
                    };
                    if read(fresh.path())? != read(root)? {
                        stale.push(Stale::Differs(file.clone()));
                    }
                }
            }
        }
    }
    stale.sort();
    Ok(stale)
}

/// The files under `root/dir`, recursively, as paths relative to `root`;
/// none when the directory does not exist.
fn files_in(root: &Path, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let path = root.join(&dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("listing", &path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("listing", &path))?;
            let relative = dir.join(entry.file_name());
            if entry.file_type().map_err(io_error("listing", &path))?.is_dir() {
                pending.push(relative);
            } else {
                files.push(relative);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The man page of `command` and of each of its subcommands, named as clap
/// displays them (`netd-registry-token-create.1`).
fn man_pages(command: &Command, source: &str, pages: &mut Vec<Page>) -> Result<(), Error> {
    let man = clap_mangen::Man::new(command.clone()).source(source).manual("netd");
    let mut contents = Vec::new();
    let name = man.get_filename();
    man.render(&mut contents).map_err(|source| Error::Man { command: name.clone(), source })?;
    pages.push(Page { path: Path::new(MAN_DIR).join(name), contents });
    for sub in subcommands(command) {
        man_pages(sub, source, pages)?;
    }
    Ok(())
}

/// The subcommands a user can run (not clap's `help`, nor hidden ones).
fn subcommands(command: &Command) -> impl Iterator<Item = &Command> {
    command.get_subcommands().filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
}

const GENERATED: &str = "<!-- Generated by `cargo xtask docs-cli` from the binaries' clap commands \
(netd/src/cli/): edit those, not this file. -->";

fn index(commands: &[Command]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{GENERATED}\n\n# Command-line reference\n");
    let _ = writeln!(
        out,
        "Every binary netd ships, with each subcommand's options, the environment variable that sets \
         each option and its default, as `--help` prints them. Settings given both ways take the flag. \
         Every command takes `-h`/`--help`; the long-running ones (`netd run`, `netd hub`, \
         `netd tunnel-agent`, `netd-cloud tunnel-server`, `netd-controller run`) take \
         `--log-format json` for one JSON object per log line.\n"
    );
    let _ = writeln!(out, "The same pages ship as man pages in `docs/man/` (`man ./docs/man/netd-run.1`).\n");
    let _ = writeln!(out, "| Binary | What it is |\n| --- | --- |");
    for command in commands {
        let name = command.get_name();
        let about = command.get_about().map(|about| about.to_string()).unwrap_or_default();
        let _ = writeln!(out, "| [`{name}`]({name}.md) | {} |", cell(&about));
    }
    out
}

fn binary_page(command: &Command) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{GENERATED}\n");
    section(command, command.get_name(), 1, &mut out);
    // One trailing newline.
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// `command`'s section of its binary's page, then its subcommands' one
/// level down.
fn section(command: &Command, path: &str, level: usize, out: &mut String) {
    let _ = writeln!(out, "{} {path}\n", "#".repeat(level.min(6)));
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        let _ = writeln!(out, "{}\n", text(&about.to_string()));
    }
    let usage = command.clone().render_usage().to_string();
    let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage);
    let _ = writeln!(out, "```text\n{usage}\n```\n");
    let subs: Vec<&Command> = subcommands(command).collect();
    if !subs.is_empty() {
        let _ = writeln!(out, "| Command | Description |\n| --- | --- |");
        for sub in &subs {
            let sub_path = format!("{path} {}", sub.get_name());
            let about = sub.get_about().map(|about| about.to_string()).unwrap_or_default();
            let _ = writeln!(out, "| [`{}`](#{}) | {} |", sub.get_name(), anchor(&sub_path), cell(&about));
        }
        out.push('\n');
    }
    let args: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set() && !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version))
        .collect();
    if !args.is_empty() {
        let _ = writeln!(out, "| Option | Description | Environment | Default |\n| --- | --- | --- | --- |");
        for arg in args {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                arg_label(arg),
                arg_description(arg),
                arg.get_env()
                    .filter(|_| !arg.is_hide_env_set())
                    .map(|env| code(&env.to_string_lossy()))
                    .unwrap_or_default(),
                arg_default(arg)
            );
        }
        out.push('\n');
    }
    if let Some(after) = command.get_after_long_help().or(command.get_after_help()) {
        let _ = writeln!(out, "```text\n{}\n```\n", after.to_string().trim_end());
    }
    for sub in subs {
        section(sub, &format!("{path} {}", sub.get_name()), level + 1, out);
    }
}

/// `-w, --watch <BOOL>`, `--init [<INIT>]`, `<ID>`, as `--help` shows them.
fn arg_label(arg: &clap::Arg) -> String {
    let takes_values = arg.get_num_args().is_some_and(|range| range.takes_values());
    let optional_value = arg.get_num_args().is_some_and(|range| range.min_values() == 0);
    let names: Vec<String> = match arg.get_value_names() {
        Some(names) => names.iter().map(|name| format!("<{name}>")).collect(),
        None => vec![format!("<{}>", arg.get_id().as_str().to_uppercase())],
    };
    let value = names.join(" ");
    if arg.is_positional() {
        return code(&if arg.is_required_set() { value } else { format!("[{value}]") });
    }
    let mut label = Vec::new();
    if let Some(short) = arg.get_short() {
        label.push(format!("-{short}"));
    }
    if let Some(long) = arg.get_long() {
        label.push(format!("--{long}"));
    }
    let mut label = label.join(", ");
    if takes_values {
        if optional_value {
            let _ = write!(label, " [{value}]");
        } else {
            let _ = write!(label, " {value}");
        }
    }
    code(&label)
}

fn arg_description(arg: &clap::Arg) -> String {
    let mut description =
        arg.get_long_help().or(arg.get_help()).map(|help| cell(&help.to_string())).unwrap_or_default();
    // clap drops a one-line help's final period; the notes below are sentences.
    let sentence = |description: &mut String| {
        if !description.is_empty() && !description.ends_with(['.', '!', '?']) {
            description.push('.');
        }
    };
    if arg.is_required_set() {
        sentence(&mut description);
        description.push_str(" Required.");
    }
    let takes_values = arg.get_num_args().is_some_and(|range| range.takes_values());
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|value| !value.is_hide_set())
        .map(|value| code(value.get_name()))
        .collect();
    if takes_values && !possible.is_empty() {
        sentence(&mut description);
        let _ = write!(description, " One of {}.", possible.join(", "));
    }
    description.trim().to_string()
}

fn arg_default(arg: &clap::Arg) -> String {
    let takes_values = arg.get_num_args().is_some_and(|range| range.takes_values());
    if arg.is_hide_default_value_set() || !takes_values || arg.get_default_values().is_empty() {
        return String::new();
    }
    let values: Vec<String> =
        arg.get_default_values().iter().map(|value| value.to_string_lossy().into_owned()).collect();
    let joined = values.join(",");
    if joined.is_empty() {
        "`\"\"`".to_string()
    } else {
        code(&joined)
    }
}

/// mdBook's heading ids: lower case, spaces as dashes.
fn anchor(path: &str) -> String {
    path.to_lowercase().replace(' ', "-")
}

/// A code span, its pipes escaped for a table cell.
fn code(text: &str) -> String {
    format!("`{}`", text.replace('|', "\\|"))
}

/// Help text as Markdown: what is inside backticks stays code, the rest is
/// escaped so that `<NAME>` is not read as HTML nor `NETD_*` as emphasis.
fn text(help: &str) -> String {
    let mut out = String::new();
    for (i, part) in help.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "`{part}`");
            continue;
        }
        for c in part.chars() {
            match c {
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '*' | '_' | '[' | ']' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c => out.push(c),
            }
        }
    }
    out
}

/// Help text for a table cell: one line, pipes escaped.
fn cell(help: &str) -> String {
    let paragraphs: Vec<String> =
        help.split("\n\n").map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    text(&paragraphs.join("<br><br>")).replace('|', "\\|").replace("&lt;br&gt;", "<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_text_keeps_code_and_escapes_the_rest() {
        assert_eq!(text("system:node:<NAME> and `a <b>` NETD_*"), "system:node:&lt;NAME&gt; and `a <b>` NETD\\_\\*");
        assert_eq!(cell("auto|true\n\nsecond\nline"), "auto\\|true<br><br>second line");
        assert_eq!(anchor("netd registry token create"), "netd-registry-token-create");
    }
}
