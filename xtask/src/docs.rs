//! `cargo xtask docs`: builds the book in `docs/` with a pinned mdBook
//! (installed into `target/tools` on first use) and checks its links, and
//! README's, without the network.
//!
//! The link check is ours, not a crate's or mdBook's: CI reaches crates.io
//! and Debian and nothing else, so external URLs cannot be fetched there
//! (they are counted and reported as not checked), and mdBook itself only
//! warns about a few of the broken links it renders. Every relative
//! `href`/`src` of every generated page must name a file that exists, and
//! every `#fragment` an `id` (or `name`) in the page it points to.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The mdBook release the book is built with: a plain HTML build with
/// search (`--no-default-features --features search`: no file watcher, no
/// web server) compiles in about two minutes of two cores, once.
pub const MDBOOK_VERSION: &str = "0.5.4";

/// README's hard limit: what netd is, the picture, the two commands, the
/// crate map and where the book is. Everything else belongs in the book.
pub const README_MAX_LINES: usize = 200;

/// Builds the book into `<target>/book` and checks its links and README's.
pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    let readme = root.join("README.md");
    let readme_text = std::fs::read_to_string(&readme).with_context(|| format!("reading {}", readme.display()))?;
    let lines = readme_text.lines().count();
    if lines > README_MAX_LINES {
        bail!("README.md has {lines} lines, more than {README_MAX_LINES}: move the rest into the book (docs/src/)");
    }
    println!("docs: README.md has {lines} lines (at most {README_MAX_LINES})");
    let readme_broken = check_markdown_links(&readme, &readme_text)?;
    for broken in &readme_broken {
        println!("broken link: {broken}");
    }

    let mdbook = ensure_mdbook()?;
    let dest = crate::target_dir().join("book");
    let started = Instant::now();
    let status = Command::new(&mdbook)
        .arg("build")
        .arg(root.join("docs"))
        .arg("--dest-dir")
        .arg(&dest)
        .status()
        .with_context(|| format!("running {}", mdbook.display()))?;
    if !status.success() {
        bail!("`mdbook build docs` failed ({status})");
    }
    println!("docs: book built in {:.1}s: {}", started.elapsed().as_secs_f64(), dest.join("index.html").display());
    report_orphans(&root.join("docs/src"))?;

    let report = check_site(&dest)?;
    for broken in &report.broken {
        println!("broken link: {broken}");
    }
    println!(
        "docs: {} pages, {} relative links checked ({} with an anchor); {} external links not fetched \
         (CI has no network beyond crates.io and Debian)",
        report.pages, report.checked, report.anchors, report.external
    );
    let total = report.broken.len() + readme_broken.len();
    if total > 0 {
        bail!("{total} broken link(s) in the book and README.md");
    }
    Ok(())
}

/// `target/tools/bin/mdbook` at [`MDBOOK_VERSION`], installed with
/// `cargo install --locked` when missing or another version.
fn ensure_mdbook() -> Result<PathBuf> {
    let tools = crate::target_dir().join("tools");
    let mdbook = tools.join("bin/mdbook");
    let installed = Command::new(&mdbook)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    let wanted = format!("mdbook v{MDBOOK_VERSION}");
    if installed.as_deref() == Some(wanted.as_str()) {
        return Ok(mdbook);
    }
    println!(
        "docs: installing mdbook {MDBOOK_VERSION} into {} (once; about two minutes on two cores)",
        tools.display()
    );
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["install", "--locked", "--no-default-features", "--features", "search", "--root"])
        .arg(&tools)
        .arg(format!("mdbook@{MDBOOK_VERSION}"))
        // Built in cargo's own temporary directory, not in the workspace's
        // target directory, whose artifacts it would only add to.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .status()
        .with_context(|| format!("running {cargo} install mdbook"))?;
    if !status.success() {
        bail!("`cargo install mdbook@{MDBOOK_VERSION}` failed ({status})");
    }
    println!("docs: mdbook installed in {:.1}s", started.elapsed().as_secs_f64());
    Ok(mdbook)
}

/// Markdown files under `src` that SUMMARY.md does not reach: mdBook does
/// not render them, so their text is in no page. Said, not failed: a page
/// being written may not be listed yet.
fn report_orphans(src: &Path) -> Result<()> {
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).context("reading docs/src/SUMMARY.md")?;
    let mut files = Vec::new();
    collect_files(src, "md", &mut files)?;
    for file in files {
        let Ok(rel) = file.strip_prefix(src) else { continue };
        let rel = rel.to_string_lossy().replace('\\', "/");
        if rel != "SUMMARY.md" && !summary.contains(&format!("({rel})")) {
            println!("docs: note: docs/src/{rel} is not in SUMMARY.md, so the book does not include it");
        }
    }
    Ok(())
}

/// One link that leads nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The page (or Markdown file) holding the link, as given to the check.
    pub page: String,
    /// The link as written.
    pub link: String,
    /// What is missing.
    pub reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.page, self.link, self.reason)
    }
}

/// What [`check_site`] found.
#[derive(Debug, Default)]
pub struct SiteReport {
    /// HTML pages read.
    pub pages: usize,
    /// Relative links checked.
    pub checked: usize,
    /// Of those, links with a fragment checked against the target's ids.
    pub anchors: usize,
    /// Links with a scheme (`https:`, `mailto:`, …), not followed.
    pub external: usize,
    /// Links to a missing file or anchor.
    pub broken: Vec<Broken>,
}

/// What one HTML page holds: the links it makes and the anchors it offers.
#[derive(Debug, Default)]
struct Page {
    links: Vec<String>,
    ids: BTreeSet<String>,
}

/// Checks every `href` and `src` of every `.html` file under `site`.
pub fn check_site(site: &Path) -> Result<SiteReport> {
    let mut files = Vec::new();
    collect_files(site, "html", &mut files)?;
    files.sort();
    let mut pages = HashMap::new();
    for file in &files {
        let html = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        pages.insert(file.clone(), scan_html(&html));
    }
    let mut report = SiteReport { pages: files.len(), ..SiteReport::default() };
    for file in &files {
        let page_name = file.strip_prefix(site).unwrap_or(file).display().to_string();
        let Some(page) = pages.get(file) else { continue };
        for link in &page.links {
            if is_external(link) {
                report.external += 1;
                continue;
            }
            report.checked += 1;
            let (path, fragment) = split_link(link);
            let broken = |reason: String| Broken { page: page_name.clone(), link: link.clone(), reason };
            let target = if path.is_empty() {
                file.clone()
            } else {
                let Some(dir) = file.parent() else { continue };
                let mut target = normalize(&dir.join(percent_decode(path)));
                if target.is_dir() {
                    target = target.join("index.html");
                }
                if !target.starts_with(site) {
                    report.broken.push(broken("points outside the book".into()));
                    continue;
                }
                if !target.is_file() {
                    report.broken.push(broken(format!("no file {}", target.display())));
                    continue;
                }
                target
            };
            let Some(fragment) = fragment.filter(|f| !f.is_empty()) else { continue };
            // Fragments of non-HTML files (a line of a source file, say)
            // are not anchors we can check.
            if target.extension().and_then(|e| e.to_str()) != Some("html") {
                continue;
            }
            report.anchors += 1;
            let fragment = percent_decode(fragment);
            match pages.get(&target) {
                Some(target_page) if target_page.ids.contains(&fragment) => {}
                Some(_) => report.broken.push(broken(format!("no id \"{fragment}\" in {}", target.display()))),
                None => report.broken.push(broken(format!("{} was not read", target.display()))),
            }
        }
    }
    Ok(report)
}

/// The links (`href`, `src`) and anchors (`id`, `name`) of one page. A
/// small scanner, not a parser: it skips comments and the bodies of
/// `<script>` and `<style>`, whose text is not markup.
fn scan_html(html: &str) -> Page {
    let mut page = Page::default();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        if let Some(comment) = rest.strip_prefix("!--") {
            rest = comment.find("-->").map_or("", |end| &comment[end + 3..]);
            continue;
        }
        let end = tag_end(rest);
        let tag = &rest[..end];
        rest = &rest[(end + 1).min(rest.len())..];
        let name: String =
            tag.chars().take_while(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        for (attr, value) in attributes(&tag[name.len()..]) {
            match attr.as_str() {
                "href" | "src" => page.links.push(value),
                "id" | "name" if name != "meta" => {
                    page.ids.insert(value);
                }
                _ => {}
            }
        }
        if name == "script" || name == "style" {
            let close = format!("</{name}");
            rest = rest.find(&close).map_or("", |at| &rest[at..]);
        }
    }
    page
}

/// Where the tag that `s` starts ends (the index of its `>`), quotes
/// respected; `s.len()` when it never does.
fn tag_end(s: &str) -> usize {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return i,
            _ => {}
        }
    }
    s.len()
}

/// The attributes of a tag's text after its name, values unescaped.
fn attributes(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
        let name_len = s.find(|c: char| c.is_whitespace() || c == '=' || c == '>' || c == '/').unwrap_or(s.len());
        if name_len == 0 {
            return out;
        }
        let name = s[..name_len].to_ascii_lowercase();
        s = s[name_len..].trim_start();
        let Some(after_eq) = s.strip_prefix('=') else {
            // A bare attribute (`async`, `hidden`): no value.
            continue;
        };
        let after_eq = after_eq.trim_start();
        let (value, rest) = match after_eq.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let body = &after_eq[1..];
                let end = body.find(q).unwrap_or(body.len());
                (&body[..end], &body[(end + 1).min(body.len())..])
            }
            _ => {
                let end = after_eq.find(char::is_whitespace).unwrap_or(after_eq.len());
                (&after_eq[..end], &after_eq[end..])
            }
        };
        out.push((name, unescape(value)));
        s = rest;
    }
}

/// The few character references mdBook writes into attribute values.
fn unescape(value: &str) -> String {
    value
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// A link with a scheme (`https:`, `mailto:`) or protocol-relative (`//`).
fn is_external(link: &str) -> bool {
    if link.starts_with("//") {
        return true;
    }
    let scheme_len = link.find(':').unwrap_or(0);
    scheme_len > 0 && link[..scheme_len].chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// `path?query#fragment` into the path and the fragment.
fn split_link(link: &str) -> (&str, Option<&str>) {
    let (rest, fragment) = match link.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (link, None),
    };
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (path, fragment)
}

/// `%XX` sequences decoded (mdBook percent-encodes non-ASCII in links).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a/./b/../c` as `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Every file under `dir` whose name ends in `.ext`.
fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, ext, out)?;
        } else if path.extension().and_then(|e| e.to_str()) == Some(ext) {
            out.push(path);
        }
    }
    Ok(())
}

/// The relative links of a Markdown file (`[text](target)` and `[label]:
/// target` definitions, outside code blocks and code spans): each target
/// must exist beside it, and each `#fragment` into a Markdown file must be
/// one of its headings as GitHub anchors them.
pub fn check_markdown_links(file: &Path, text: &str) -> Result<Vec<Broken>> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let page = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
    let mut broken = Vec::new();
    for link in markdown_links(text) {
        if is_external(&link) {
            continue;
        }
        let (path, fragment) = split_link(&link);
        let target = if path.is_empty() { file.to_path_buf() } else { normalize(&dir.join(percent_decode(path))) };
        let fail = |reason: String| Broken { page: page.clone(), link: link.clone(), reason };
        if !target.exists() {
            broken.push(fail(format!("no file {}", target.display())));
            continue;
        }
        let Some(fragment) = fragment.filter(|f| !f.is_empty()) else { continue };
        if target.extension().and_then(|e| e.to_str()) != Some("md") {
            continue;
        }
        let target_text = if path.is_empty() {
            text.to_string()
        } else {
            std::fs::read_to_string(&target).with_context(|| format!("reading {}", target.display()))?
        };
        if !markdown_anchors(&target_text).contains(&percent_decode(fragment)) {
            broken.push(fail(format!("no heading \"{fragment}\" in {}", target.display())));
        }
    }
    Ok(broken)
}

/// The link targets of Markdown text, code blocks and code spans skipped.
fn markdown_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut in_code_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code_block = !in_code_block;
            continue;
        }
        if in_code_block {
            continue;
        }
        // A reference definition: `[label]: target`.
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix('[') {
            if let Some((_, target)) = rest.split_once("]:") {
                if let Some(target) = target.split_whitespace().next() {
                    links.push(target.trim_matches(['<', '>']).to_string());
                }
                continue;
            }
        }
        let outside_code: String =
            line.split('`').enumerate().filter(|(i, _)| i % 2 == 0).map(|(_, part)| part).collect::<Vec<_>>().join(" ");
        let mut rest = outside_code.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("");
            if !target.is_empty() {
                links.push(target.trim_matches(['<', '>']).to_string());
            }
            rest = &after[end..];
        }
    }
    links
}

/// The anchors GitHub gives a Markdown file's headings: lower case, spaces
/// as `-`, punctuation other than `-` and `_` dropped, repeats numbered.
fn markdown_anchors(text: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut in_code_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code_block = !in_code_block;
            continue;
        }
        if in_code_block || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        let anchor = if *count == 0 { slug.clone() } else { format!("{slug}-{count}") };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn broken_files_and_anchors_are_found_and_good_links_pass() {
        let site = tempfile::tempdir().unwrap();
        let site = site.path();
        write(
            site,
            "index.html",
            r##"<html><head><link rel="stylesheet" href="css/book.css"><script src="book.js"></script>
<script>var x = '<a href="nowhere.html">'; if (a < b) {}</script></head>
<body><h1 id="top">Top</h1><!-- <a href="commented.html"> -->
<a href="concepts/tunnel.html">good</a>
<a href="concepts/tunnel.html#the-doors">good anchor</a>
<a href='#top'>self</a> <a href="#">page top</a>
<a href="concepts/tunnel.html#no-such-heading">broken anchor</a>
<a href="concepts/missing.html">broken file</a>
<a href="https://example.com/x.html#y">external</a> <a href="mailto:a@b">mail</a>
<a href="concepts/">directory index</a>
<a href="concepts/tunnel.html?x=1&amp;y=2#the-doors">query</a>
</body></html>"##,
        );
        write(site, "css/book.css", "body {}");
        write(site, "book.js", "");
        write(
            site,
            "concepts/tunnel.html",
            r#"<h2 id="the-doors">The doors</h2><a href="../index.html#top">up</a><a href="../index.html#gone">up, broken</a>
<a href="../../outside.html">outside</a>"#,
        );
        write(site, "concepts/index.html", "<p>index</p>");

        let report = check_site(site).unwrap();
        let mut found: Vec<(String, String)> = report.broken.iter().map(|b| (b.page.clone(), b.link.clone())).collect();
        found.sort();
        assert_eq!(
            found,
            [
                ("concepts/tunnel.html".to_string(), "../../outside.html".to_string()),
                ("concepts/tunnel.html".to_string(), "../index.html#gone".to_string()),
                ("index.html".to_string(), "concepts/missing.html".to_string()),
                ("index.html".to_string(), "concepts/tunnel.html#no-such-heading".to_string()),
            ]
        );
        assert_eq!(report.pages, 3);
        assert_eq!(report.external, 2);
        // index.html: 2 assets + 8 relative links; tunnel.html: 3.
        assert_eq!(report.checked, 13);
        assert!(report.broken.iter().any(|b| b.reason.contains("no id \"gone\"")), "{:?}", report.broken);
    }

    #[test]
    fn readme_links_are_checked_against_files_and_headings() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "docs/src/intro.md", "# Intro\n\n## The two commands\n");
        let readme = "# netd\n\n## The book's pages\n\n\
            [intro](docs/src/intro.md), [commands](docs/src/intro.md#the-two-commands), [self](#the-books-pages), \
            [site](https://example.com), `[code](nowhere.md)`\n\
            [missing](docs/src/gone.md) [bad anchor](docs/src/intro.md#no-such) [bad self](#nope)\n\
            [def]: docs/\n[baddef]: docs/none/\n\
            ```text\n[in a block](nowhere.md)\n```\n";
        write(root, "README.md", readme);
        let broken = check_markdown_links(&root.join("README.md"), readme).unwrap();
        let links: Vec<&str> = broken.iter().map(|b| b.link.as_str()).collect();
        assert_eq!(links, ["docs/src/gone.md", "docs/src/intro.md#no-such", "#nope", "docs/none/"]);
    }

    #[test]
    fn links_are_split_and_decoded() {
        assert_eq!(split_link("a.html?x#y"), ("a.html", Some("y")));
        assert_eq!(split_link("#y"), ("", Some("y")));
        assert_eq!(percent_decode("caf%C3%A9%20x%2"), "café x%2");
        assert!(is_external("https://x") && is_external("//cdn/x") && !is_external("a/b.html") && !is_external("#x"));
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), PathBuf::from("/a/c/d"));
    }
}
