//! `cargo xtask image`: container images assembled with no daemon and no
//! registry, as docker-save archives (`manifest.json` with `RepoTags`, the
//! config JSON named by its sha256, one `<sha256>/layer.tar`), the format
//! `docker load`, `podman load` and `ctr images import` all take.
//!
//! [`ImageBuilder`] collects the files of one layer and writes the archive
//! deterministically: entries sorted by path, every parent directory
//! emitted, mtime 0, uid/gid 0, no user or group names, fixed modes, no
//! creation time in the config. The same inputs give the same bytes, so the
//! same image ID; a rebuild that changed nothing is recognisable by its
//! digest alone. An ELF file added from the host brings the shared
//! libraries `ldd` resolves for it (transitively, the dynamic loader
//! included), each at the path `ldd` names, as a regular file.
//!
//! Four images are made here: netd's two, the node image every node runs
//! ([`NETD_IMAGE`]: [`NODE_BINARIES`] and `nft`) and the cloud image only
//! cloud nodes run ([`CLOUD_IMAGE`]: [`CLOUD_BINARIES`]), so an edge node
//! holds no tunnel server, BPF loader or certificate authority; and for test
//! nodes a static pause ([`PAUSE_IMAGE`], [`pause_image`]) and a busybox
//! workload ([`WORKLOAD_IMAGE`], [`workload_image`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::progress::long_step;

/// netd's node image reference: `netd:<workspace version>` (xtask shares
/// the workspace's version, so this is netd's too). deploy/ names this
/// image for what runs on every node.
pub const NETD_IMAGE: &str = concat!("netd:", env!("CARGO_PKG_VERSION"));

/// netd's cloud image reference: `netd-cloud:<workspace version>`, for the
/// tunnel server and the controller (cloud nodes only).
pub const CLOUD_IMAGE: &str = concat!("netd-cloud:", env!("CARGO_PKG_VERSION"));

/// The test nodes' sandbox image (containerd's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "netd.test/pause:1";

/// The test nodes' workload image: busybox with every applet under /bin.
pub const WORKLOAD_IMAGE: &str = "netd.test/busybox:1";

/// Where setup keeps the test images' archives ([`PAUSE_ARCHIVE`],
/// [`WORKLOAD_ARCHIVE`]) for the nodes' containerd to import.
pub const IMAGE_DIR: &str = "/var/cache/netd/images";

/// The pause image's archive in [`IMAGE_DIR`].
pub const PAUSE_ARCHIVE: &str = "pause.tar";

/// The workload image's archive in [`IMAGE_DIR`].
pub const WORKLOAD_ARCHIVE: &str = "busybox.tar";

/// The programs the node image holds in /usr/local/bin (the netd crate's):
/// the daemon, hub and tunnel agent; the CNI IPAM plugin; the join command.
pub const NODE_BINARIES: [&str; 3] = ["netd", "netd-ipam", "netd-join"];

/// The programs the cloud image holds in /usr/local/bin: tunnel server,
/// DNAT and certificates; the controller; the autonomy switch.
pub const CLOUD_BINARIES: [&str; 3] = ["netd-cloud", "netd-controller", "netd-autonomy"];

/// nftables' command line, which netd runs for the masquerade rules.
const NFT: &str = "/usr/sbin/nft";

/// Debian's busybox-static installs its one binary here.
const BUSYBOX: &str = "/bin/busybox";

/// The search path every image's processes start with.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The pause program, compiled when its image is made.
const PAUSE_C: &str = include_str!("pause.c");

/// root alone: enough for tools that look the current user up.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const GROUP: &str = "root:x:0:\n";

const MIB: f64 = 1024.0 * 1024.0;

const USAGE: &str = "\
usage: cargo xtask image [netd | test | pause [OUT] | busybox [OUT]]
  netd     (default) build netd release binaries and write target/image/netd.tar
           (node image) and target/image/netd-cloud.tar (cloud image)
  test     the same two archives from the debug build the tests use (what
           `cargo xtask test` writes before the real-cluster tests)
  pause    compile xtask/src/pause.c statically and write OUT [default: /var/cache/netd/images/pause.tar]
  busybox  busybox-static with its applets and write OUT [default: /var/cache/netd/images/busybox.tar]";

/// `cargo xtask image [netd | test | pause [OUT] | busybox [OUT]]`.
pub fn run(args: &[String]) -> Result<()> {
    let which = args.first().map(String::as_str).unwrap_or("netd");
    let out = args.get(1).map(PathBuf::from);
    if args.len() > 2 || (matches!(which, "netd" | "test") && out.is_some()) {
        eprintln!("{USAGE}");
        bail!("too many arguments to `image`");
    }
    match which {
        "netd" => write_netd_images(Build::Release),
        "test" => write_netd_images(Build::Test),
        "pause" => pause_image(&out.unwrap_or_else(|| Path::new(IMAGE_DIR).join(PAUSE_ARCHIVE))),
        "busybox" => workload_image(&out.unwrap_or_else(|| Path::new(IMAGE_DIR).join(WORKLOAD_ARCHIVE))),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("{USAGE}");
            bail!("unknown image `{other}` (known: netd, test, pause, busybox)")
        }
    }
}

/// Which build of netd's programs an image carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// `cargo build --release`: what `cargo xtask image` ships.
    Release,
    /// The debug build of the whole workspace with every feature, exactly
    /// what `cargo xtask ci`'s build step and the test step compile: the
    /// real-cluster tests run the programs the rest of the suite tests,
    /// and CI compiles netd once instead of a second time in release mode
    /// (about ten minutes of a fresh machine's run).
    Test,
}

impl Build {
    /// The cargo arguments that build the programs, and the directory (under the
    /// target directory) they land in.
    fn cargo_args(self) -> (Vec<&'static str>, &'static str) {
        match self {
            Build::Release => {
                let mut args = vec!["build", "--release", "-p", "netd"];
                for bin in NODE_BINARIES.iter().chain(&CLOUD_BINARIES) {
                    args.extend(["--bin", bin]);
                }
                (args, "release")
            }
            // The same selection and features as `cargo xtask ci`'s build
            // step: anything narrower resolves dependency features
            // differently and rebuilds them.
            Build::Test => (vec!["build", "--workspace", "--all-targets", "--all-features"], "debug"),
        }
    }
}

/// Writes both images into `<target>/image` from `build` and prints what
/// they hold.
pub fn write_netd_images(build: Build) -> Result<()> {
    let dir = crate::target_dir().join("image");
    for (summary, reference) in netd_images(&dir, build)? {
        for (path, size) in &summary.files {
            println!("  {:>9.2} MiB  {path}", *size as f64 / MIB);
        }
        println!("{}", summary.line(reference, &netd_groups(&summary)));
    }
    println!(
        "wrote {} and {} (each with its .digest)",
        dir.join("netd.tar").display(),
        dir.join("netd-cloud.tar").display()
    );
    Ok(())
}

/// Builds netd's binaries once (`build`) and writes both images into `dir`:
/// [`NETD_IMAGE`] as `netd.tar` (/usr/local/bin/{[`NODE_BINARIES`]},
/// /usr/sbin/nft; entrypoint /usr/local/bin/netd) and [`CLOUD_IMAGE`] as
/// `netd-cloud.tar` (/usr/local/bin/{[`CLOUD_BINARIES`]}; entrypoint
/// /usr/local/bin/netd-cloud). Programs are stripped of their symbol
/// tables; each image has the libraries its programs load, /tmp,
/// /etc/passwd and /etc/group. Each archive's digest goes beside it in
/// `<name>.tar.digest`.
pub fn netd_images(dir: &Path, build: Build) -> Result<[(ImageSummary, &'static str); 2]> {
    let all: Vec<&str> = NODE_BINARIES.iter().chain(&CLOUD_BINARIES).copied().collect();
    let (args, profile_dir) = build.cargo_args();
    println!("image: {} from the {profile_dir} build (the first build takes a few minutes)", all.join(", "));
    long_step(&format!("building netd's programs ({profile_dir})"), || crate::cargo(&args, &[]))?;
    let bin_dir = crate::target_dir().join(profile_dir);
    let stripped = dir.join("stripped");
    fs::create_dir_all(&stripped).with_context(|| format!("creating {}", stripped.display()))?;
    let image = |binaries: &[&str], extra: &[&str], reference: &'static str, file: &str| -> Result<ImageSummary> {
        long_step(&format!("writing {reference} to {}", dir.join(file).display()), || {
            let mut image = ImageBuilder::new();
            for bin in binaries {
                let copy = stripped.join(bin);
                strip(&bin_dir.join(bin), &copy)?;
                image.add_file(&format!("/usr/local/bin/{bin}"), &copy, 0o755)?;
            }
            for host in extra {
                ensure!(Path::new(host).is_file(), "{host} not found: install it (cargo xtask setup does)");
                image.add_file(host, Path::new(host), 0o755)?;
            }
            add_base(&mut image)?;
            let out = dir.join(file);
            let entrypoint = format!("/usr/local/bin/{}", binaries[0]);
            let summary = image.write_docker_archive(&out, reference, &[entrypoint.as_str()], &[])?;
            let digest_file = out.with_extension("tar.digest");
            fs::write(&digest_file, format!("{}\n", summary.digest))
                .with_context(|| format!("writing {}", digest_file.display()))?;
            Ok(summary)
        })
    };
    // nftables' command line: netd runs it for the masquerade rules.
    let node = image(&NODE_BINARIES, &[NFT], NETD_IMAGE, "netd.tar")?;
    let cloud = image(&CLOUD_BINARIES, &[], CLOUD_IMAGE, "netd-cloud.tar")?;
    Ok([(node, NETD_IMAGE), (cloud, CLOUD_IMAGE)])
}

/// `strip --strip-all -o copy program`: release builds keep their symbol
/// tables (a fifth of each binary); the image goes without, as distribution
/// packages do. Stripping the same program gives the same bytes.
fn strip(program: &Path, copy: &Path) -> Result<()> {
    let output =
        Command::new("strip").arg("--strip-all").arg("-o").arg(copy).arg(program).output().map_err(|e| {
            match e.kind() {
                io::ErrorKind::NotFound => anyhow::anyhow!("strip not found: install Debian's binutils"),
                _ => anyhow::anyhow!("running strip: {e}"),
            }
        })?;
    ensure!(
        output.status.success(),
        "strip --strip-all {} failed ({}): {}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Compiles `pause.c` with `gcc -static` and writes [`PAUSE_IMAGE`] (just
/// `/pause`, its entrypoint) to the archive `out`, creating its directory.
/// Needs gcc and glibc's static library (Debian's gcc and libc6-dev).
pub fn pause_image(out: &Path) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("netd-pause-build-{}", std::process::id()));
    let built = compile_pause(&scratch);
    let summary = built.and_then(|pause| {
        let mut image = ImageBuilder::new();
        image.add_file("/pause", &pause, 0o755)?;
        ensure!(
            image.entries.len() == 1,
            "{} is not static: gcc -static linked it against shared libraries",
            pause.display()
        );
        image.write_docker_archive(out, PAUSE_IMAGE, &["/pause"], &[])
    });
    // The scratch directory goes whatever happened; only its path is ours.
    let _ = fs::remove_dir_all(&scratch);
    let summary = summary?;
    println!("{} -> {}", summary.line(PAUSE_IMAGE, &[]), out.display());
    Ok(())
}

/// `gcc -static -O2 -o pause pause.c` in `scratch`; the path of the program.
fn compile_pause(scratch: &Path) -> Result<PathBuf> {
    fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    fs::write(scratch.join("pause.c"), PAUSE_C).with_context(|| format!("writing {}/pause.c", scratch.display()))?;
    // Relative names in the scratch directory: the temporary path never
    // reaches the binary, so the same gcc makes the same bytes every time.
    let output =
        Command::new("gcc").args(["-static", "-O2", "-o", "pause", "pause.c"]).current_dir(scratch).output().map_err(
            |e| match e.kind() {
                io::ErrorKind::NotFound => anyhow::anyhow!("gcc not found: install Debian's gcc and libc6-dev"),
                _ => anyhow::anyhow!("running gcc: {e}"),
            },
        )?;
    if !output.status.success() {
        bail!(
            "gcc -static -O2 -o pause pause.c failed ({}; the static libc is Debian's libc6-dev): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(scratch.join("pause"))
}

/// Writes [`WORKLOAD_IMAGE`] to the archive `out`, creating its directory:
/// Debian busybox-static's `/bin/busybox`, a symlink `/bin/<applet>` for
/// every applet `busybox --list` names, /tmp and /etc/passwd; command
/// `/bin/sh` (pods give their own).
pub fn workload_image(out: &Path) -> Result<()> {
    let busybox = Path::new(BUSYBOX);
    ensure!(busybox.is_file(), "{BUSYBOX} not found: install Debian's busybox-static");
    let libraries = shared_libraries(busybox)?;
    ensure!(
        libraries.is_empty(),
        "{BUSYBOX} is dynamically linked (Debian's busybox, not busybox-static): install busybox-static"
    );
    let listed = Command::new(busybox).arg("--list").output().with_context(|| format!("running {BUSYBOX} --list"))?;
    ensure!(listed.status.success(), "{BUSYBOX} --list failed ({})", listed.status);
    let listed = String::from_utf8(listed.stdout).context("busybox --list printed something not UTF-8")?;
    let mut image = ImageBuilder::new();
    image.add_file("/bin/busybox", busybox, 0o755)?;
    let mut applets = 0;
    for applet in listed.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox") {
        ensure!(!applet.contains('/') && applet != "." && applet != "..", "busybox lists an odd applet {applet:?}");
        image.add_symlink(&format!("/bin/{applet}"), "busybox")?;
        applets += 1;
    }
    ensure!(applets > 0, "{BUSYBOX} --list named no applet");
    add_base(&mut image)?;
    let summary = image.write_docker_archive(out, WORKLOAD_IMAGE, &[], &["/bin/sh"])?;
    println!("{} -> {} ({applets} applets)", summary.line(WORKLOAD_IMAGE, &[]), out.display());
    Ok(())
}

/// What every image but pause has: a world-writable sticky /tmp, and root
/// in /etc/passwd and /etc/group.
fn add_base(image: &mut ImageBuilder) -> Result<()> {
    image.add_dir("/tmp", 0o1777)?;
    image.add_bytes("/etc/passwd", PASSWD.as_bytes().to_vec(), 0o644)?;
    image.add_bytes("/etc/group", GROUP.as_bytes().to_vec(), 0o644)
}

/// netd's image in the summary line: each program, then the libraries.
fn netd_groups(summary: &ImageSummary) -> Vec<(String, u64)> {
    let mut programs: Vec<(String, u64)> = Vec::new();
    let mut rest = 0;
    for (path, size) in &summary.files {
        match path.strip_prefix("/usr/local/bin/").or_else(|| (path == NFT).then_some("nft")) {
            Some(name) => programs.push((name.to_owned(), *size)),
            None => rest += size,
        }
    }
    programs.push(("libraries and /etc".to_owned(), rest));
    programs
}

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file on this machine, read (through symlinks) when the archive is written.
    Host(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

impl Source {
    fn read(&self) -> Result<Vec<u8>> {
        match self {
            Self::Host(path) => fs::read(path).with_context(|| format!("reading {}", path.display())),
            Self::Bytes(bytes) => Ok(bytes.clone()),
        }
    }
}

/// One path of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File { source: Source, mode: u32 },
    Symlink { target: String },
    Dir { mode: u32 },
}

/// The files of a one-layer image, written as a docker-save archive by
/// [`ImageBuilder::write_docker_archive`]. Paths are absolute image paths
/// (`/usr/local/bin/netd`); parents need not be added (they become 0755
/// directories). Adding a path twice is allowed only with the same entry.
#[derive(Debug, Default)]
pub struct ImageBuilder {
    /// Keyed by the path without its leading `/`, as the layer names it;
    /// the map's order is the archive's.
    entries: BTreeMap<String, Node>,
}

/// Regular files as `/path` and size in bytes, in archive order.
pub type FileSizes = Vec<(String, u64)>;

/// What [`ImageBuilder::write_docker_archive`] wrote.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    /// `sha256:<hex>` of the config JSON: the image ID `docker images` shows.
    pub digest: String,
    /// Bytes of the (uncompressed) layer tar.
    pub layer_size: u64,
    /// Every regular file, `/path` and its size in bytes, in archive order.
    pub files: FileSizes,
}

impl ImageSummary {
    /// `image: TAG sha256:… 23.4 MiB (name 14.0, …)`, sizes in MiB.
    pub fn line(&self, tag: &str, groups: &[(String, u64)]) -> String {
        let mut line = format!("image: {tag} {} {:.1} MiB", self.digest, self.layer_size as f64 / MIB);
        if !groups.is_empty() {
            let parts: Vec<String> =
                groups.iter().map(|(name, size)| format!("{name} {:.1}", *size as f64 / MIB)).collect();
            line.push_str(&format!(" ({})", parts.join(", ")));
        }
        line
    }
}

impl ImageBuilder {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the host file `host` at `path` with `mode`. An ELF file brings
    /// every shared library `ldd` resolves for it, transitively, each as a
    /// regular 0755 file at the path `ldd` names (symlinks followed), the
    /// dynamic loader included; a library `ldd` cannot find is an error.
    pub fn add_file(&mut self, path: &str, host: &Path, mode: u32) -> Result<()> {
        ensure!(host.is_file(), "{} (for {path}) is not a file", host.display());
        self.insert(path, Node::File { source: Source::Host(host.to_path_buf()), mode })?;
        if !is_elf(host)? {
            return Ok(());
        }
        let mut seen = BTreeSet::new();
        let mut pending = shared_libraries(host)?;
        while let Some(library) = pending.pop() {
            if !seen.insert(library.clone()) {
                continue;
            }
            let image_path = library
                .to_str()
                .with_context(|| format!("library path {} is not UTF-8", library.display()))?
                .to_owned();
            self.insert(&image_path, Node::File { source: Source::Host(library.clone()), mode: 0o755 })?;
            pending.extend(shared_libraries(&library)?);
        }
        Ok(())
    }

    /// Adds a file holding `bytes` at `path` with `mode`.
    pub fn add_bytes(&mut self, path: &str, bytes: Vec<u8>, mode: u32) -> Result<()> {
        self.insert(path, Node::File { source: Source::Bytes(bytes), mode })
    }

    /// Adds a symlink at `path` pointing to `target` (as given: relative
    /// targets resolve from `path`'s directory).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        ensure!(!target.is_empty() && !target.contains('\0'), "symlink {path}: bad target {target:?}");
        self.insert(path, Node::Symlink { target: target.to_owned() })
    }

    /// Adds a directory at `path` with `mode` (e.g. 0o1777 for /tmp).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.insert(path, Node::Dir { mode })
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let key = layer_key(path)?;
        match self.entries.get(&key) {
            Some(existing) if *existing == node => Ok(()),
            Some(existing) => bail!("{path} is added twice, differently: {existing:?} and {node:?}"),
            None => {
                self.entries.insert(key, node);
                Ok(())
            }
        }
    }

    /// The entries with every missing parent as a 0755 directory; a parent
    /// that is a file or symlink is an error (the layer could not hold both).
    fn with_parents(&self) -> Result<BTreeMap<String, Node>> {
        let mut all = self.entries.clone();
        for key in self.entries.keys() {
            let mut parent = key.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                match all.get(dir) {
                    Some(Node::Dir { .. }) => {}
                    Some(other) => bail!("/{key} is inside /{dir}, which is not a directory but {other:?}"),
                    None => {
                        all.insert(dir.to_owned(), Node::Dir { mode: 0o755 });
                    }
                }
                parent = dir;
            }
        }
        Ok(all)
    }

    /// The layer tar: every entry in path order (parents first), with
    /// nothing of the machine that wrote it.
    fn layer(&self) -> Result<(Vec<u8>, FileSizes)> {
        let mut layer = tar::Builder::new(Vec::new());
        let mut files = Vec::new();
        for (key, node) in self.with_parents()? {
            match node {
                Node::Dir { mode } => {
                    append(&mut layer, &format!("{key}/"), tar::EntryType::Directory, mode, None, &[])?;
                }
                Node::File { source, mode } => {
                    let data = source.read()?;
                    files.push((format!("/{key}"), data.len() as u64));
                    append(&mut layer, &key, tar::EntryType::Regular, mode, None, &data)?;
                }
                Node::Symlink { target } => {
                    append(&mut layer, &key, tar::EntryType::Symlink, 0o777, Some(&target), &[])?;
                }
            }
        }
        let layer = layer.into_inner().context("finishing the layer tar")?;
        Ok((layer, files))
    }

    /// Writes the image as a docker-save archive at `out` (its directory
    /// created; written beside it and renamed over it) tagged `tag`, with
    /// `entrypoint` and `cmd` (either may be empty: left unset), `Env`
    /// PATH, amd64/linux. The same entries always give the same bytes.
    pub fn write_docker_archive(
        &self,
        out: &Path,
        tag: &str,
        entrypoint: &[&str],
        cmd: &[&str],
    ) -> Result<ImageSummary> {
        let (layer, files) = self.layer()?;
        let layer_hex = sha256_hex(&layer);
        let config = ConfigFile {
            architecture: "amd64",
            os: "linux",
            config: ContainerConfig {
                env: vec![PATH_ENV.to_owned()],
                entrypoint: (!entrypoint.is_empty()).then(|| entrypoint.iter().map(|s| (*s).to_owned()).collect()),
                cmd: (!cmd.is_empty()).then(|| cmd.iter().map(|s| (*s).to_owned()).collect()),
                working_dir: "/",
            },
            rootfs: RootFs { kind: "layers", diff_ids: vec![format!("sha256:{layer_hex}")] },
        };
        let config = serde_json::to_vec(&config).context("serializing the image config")?;
        let config_hex = sha256_hex(&config);
        let config_name = format!("{config_hex}.json");
        let layer_name = format!("{layer_hex}/layer.tar");
        let manifest = [ManifestEntry {
            config: config_name.clone(),
            repo_tags: vec![tag.to_owned()],
            layers: vec![layer_name.clone()],
        }];
        let manifest = serde_json::to_vec(&manifest).context("serializing manifest.json")?;

        let dir = match out.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = out.file_name().with_context(|| format!("{} names no file", out.display()))?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let temp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let written = (|| -> Result<()> {
            // A leftover of a crashed run with this pid goes; a new file
            // is made (never one written through a planted symlink).
            let _ = fs::remove_file(&temp);
            let file = File::options()
                .write(true)
                .create_new(true)
                .open(&temp)
                .with_context(|| format!("creating {}", temp.display()))?;
            let mut archive = tar::Builder::new(BufWriter::new(file));
            append(&mut archive, &format!("{layer_hex}/"), tar::EntryType::Directory, 0o755, None, &[])?;
            append(&mut archive, &layer_name, tar::EntryType::Regular, 0o644, None, &layer)?;
            append(&mut archive, &config_name, tar::EntryType::Regular, 0o644, None, &config)?;
            append(&mut archive, "manifest.json", tar::EntryType::Regular, 0o644, None, &manifest)?;
            let mut writer = archive.into_inner().context("finishing the archive")?;
            writer.flush().with_context(|| format!("writing {}", temp.display()))?;
            let file = writer.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {}", temp.display(), e.error()))?;
            file.sync_all().with_context(|| format!("syncing {}", temp.display()))?;
            fs::rename(&temp, out).with_context(|| format!("renaming {} to {}", temp.display(), out.display()))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written?;
        Ok(ImageSummary { digest: format!("sha256:{config_hex}"), layer_size: layer.len() as u64, files })
    }
}

/// `/a/b` → `a/b`; refuses relative paths, `.`/`..`/empty components and
/// a trailing slash, which would make two spellings of one entry.
fn layer_key(path: &str) -> Result<String> {
    let Some(rest) = path.strip_prefix('/') else { bail!("image path {path:?} is not absolute") };
    ensure!(
        !rest.is_empty() && rest.split('/').all(|c| !c.is_empty() && c != "." && c != ".."),
        "image path {path:?} is not a plain absolute path (no `.`, `..`, `//` or trailing `/`)"
    );
    ensure!(!rest.contains('\0'), "image path {path:?} holds a NUL byte");
    Ok(rest.to_owned())
}

/// Appends one entry with owner 0:0, mtime 0 and no names: nothing of the
/// machine or the moment that wrote it.
fn append<W: io::Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    link: Option<&str>,
    data: &[u8],
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path).with_context(|| format!("tar entry {path}"))?;
    if let Some(link) = link {
        header.set_link_name(link).with_context(|| format!("tar entry {path} -> {link}"))?;
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    header.set_device_major(0).with_context(|| format!("tar entry {path}"))?;
    header.set_device_minor(0).with_context(|| format!("tar entry {path}"))?;
    header.set_cksum();
    archive.append(&header, data).with_context(|| format!("writing tar entry {path}"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `path` starts with the ELF magic.
fn is_elf(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == *b"\x7fELF"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The shared libraries `ldd` resolves for `elf` (none for a static one).
fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(elf).output().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => anyhow::anyhow!("ldd not found (glibc's libc-bin)"),
        _ => anyhow::anyhow!("running ldd {}: {e}", elf.display()),
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // glibc's ldd fails with this for a static executable.
        if stderr.contains("not a dynamic executable") || stdout.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed ({}): {}", elf.display(), output.status, stderr.trim());
    }
    parse_ldd(&stdout).with_context(|| format!("ldd {}", elf.display()))
}

/// The library paths in `ldd`'s output: `name => /path (addr)` and the
/// loader's `/path (addr)`; the vDSO (no file) is skipped, `not found` is
/// an error naming the library.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "statically linked" {
            continue;
        }
        let resolved = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                ensure!(rest != "not found", "library {} not found", name.trim());
                rest
            }
            None => line,
        };
        // `/path (0x…)`, or `(0x…)` alone for a vDSO given as `name => (0x…)`.
        let path = resolved.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        } else if !(path.is_empty()
            || path.starts_with('(')
            || line.starts_with("linux-vdso")
            || line.starts_with("linux-gate"))
        {
            bail!("unexpected line {line:?}");
        }
    }
    Ok(libraries)
}

/// The image config (docker's and OCI's field names), fields in a fixed order.
#[derive(Serialize)]
struct ConfigFile {
    architecture: &'static str,
    os: &'static str,
    config: ContainerConfig,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct ContainerConfig {
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "Entrypoint", skip_serializing_if = "Option::is_none")]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", skip_serializing_if = "Option::is_none")]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir")]
    working_dir: &'static str,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

/// One image of `manifest.json` (docker save's shape).
#[derive(Serialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tar entry as read back.
    struct Seen {
        path: String,
        kind: tar::EntryType,
        mode: u32,
        owner: (u64, u64),
        mtime: u64,
        data: Vec<u8>,
    }

    /// Every entry of a tar, in order; user or group names are an error.
    fn entries(tar_bytes: &[u8]) -> Result<Vec<Seen>> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut all = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let header = entry.header().clone();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            let path = String::from_utf8(header.path_bytes().into_owned())?;
            ensure!(header.username_bytes().is_none_or(<[u8]>::is_empty), "{path} has a user name");
            ensure!(header.groupname_bytes().is_none_or(<[u8]>::is_empty), "{path} has a group name");
            all.push(Seen {
                path,
                kind: header.entry_type(),
                mode: header.mode()?,
                owner: (header.uid()?, header.gid()?),
                mtime: header.mtime()?,
                data,
            });
        }
        Ok(all)
    }

    fn sample() -> Result<ImageBuilder> {
        let mut image = ImageBuilder::new();
        // Added out of order: the archive sorts them.
        image.add_bytes("/usr/local/bin/tool", b"#!/bin/sh\necho tool\n".to_vec(), 0o755)?;
        image.add_symlink("/bin/sh", "busybox")?;
        image.add_bytes("/bin/busybox", b"not really busybox".to_vec(), 0o755)?;
        image.add_dir("/tmp", 0o1777)?;
        image.add_bytes("/etc/passwd", PASSWD.as_bytes().to_vec(), 0o644)?;
        Ok(image)
    }

    /// `(manifest, config, layer)` read back from an archive.
    fn read_archive(path: &Path) -> Result<(serde_json::Value, serde_json::Value, Vec<u8>)> {
        let bytes = fs::read(path)?;
        let all = entries(&bytes)?;
        let file = |name: &str| -> Result<Vec<u8>> {
            all.iter().find(|e| e.path == name).map(|e| e.data.clone()).with_context(|| format!("no {name} in archive"))
        };
        let manifest: serde_json::Value = serde_json::from_slice(&file("manifest.json")?)?;
        let config_name = manifest[0]["Config"].as_str().context("no Config")?.to_owned();
        let config_bytes = file(&config_name)?;
        ensure!(config_name == format!("{}.json", sha256_hex(&config_bytes)), "config not named by its sha256");
        let layer_name = manifest[0]["Layers"][0].as_str().context("no layer")?.to_owned();
        let layer = file(&layer_name)?;
        ensure!(layer_name == format!("{}/layer.tar", sha256_hex(&layer)), "layer not named by its sha256");
        Ok((manifest, serde_json::from_slice(&config_bytes)?, layer))
    }

    #[test]
    fn the_same_entries_give_the_same_bytes_and_digest() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("sub/b.tar"));
        let first = sample()?.write_docker_archive(&a, "x.test/img:1", &["/usr/local/bin/tool"], &[])?;
        let second = sample()?.write_docker_archive(&b, "x.test/img:1", &["/usr/local/bin/tool"], &[])?;
        assert_eq!(fs::read(&a)?, fs::read(&b)?);
        assert_eq!(first.digest, second.digest);
        assert!(first.digest.starts_with("sha256:") && first.digest.len() == 7 + 64, "{}", first.digest);
        // Nothing but the archives is left in their directories.
        let mut names: Vec<_> =
            fs::read_dir(dir.path())?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        assert_eq!(names, ["a.tar", "sub"]);
        // Another tag is another archive but the same image.
        let c = dir.path().join("c.tar");
        let third = sample()?.write_docker_archive(&c, "x.test/other:2", &["/usr/local/bin/tool"], &[])?;
        assert_eq!(third.digest, first.digest);
        assert_ne!(fs::read(&a)?, fs::read(&c)?);
        Ok(())
    }

    #[test]
    fn the_manifest_and_config_have_docker_saves_shape() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("img.tar");
        let summary = sample()?.write_docker_archive(&out, "x.test/img:1", &["/usr/local/bin/tool"], &["--help"])?;
        let (manifest, config, layer) = read_archive(&out)?;
        assert_eq!(manifest.as_array().map(Vec::len), Some(1));
        assert_eq!(manifest[0]["RepoTags"], serde_json::json!(["x.test/img:1"]));
        assert_eq!(format!("sha256:{}", manifest[0]["Config"].as_str().unwrap_or_default()), summary.digest + ".json");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/tool"]));
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["--help"]));
        assert_eq!(config["config"]["Env"], serde_json::json!([PATH_ENV]));
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([format!("sha256:{}", sha256_hex(&layer))]));
        assert!(config.get("created").is_none(), "no creation time: it would change the digest");
        assert_eq!(summary.layer_size, layer.len() as u64);
        // No entrypoint, no cmd: both left out.
        let bare = dir.path().join("bare.tar");
        sample()?.write_docker_archive(&bare, "x.test/bare:1", &[], &[])?;
        let (_, config, _) = read_archive(&bare)?;
        assert!(config["config"].get("Entrypoint").is_none() && config["config"].get("Cmd").is_none(), "{config}");
        Ok(())
    }

    #[test]
    fn the_layer_is_sorted_with_parents_and_nothing_of_the_host() -> Result<()> {
        let (layer, files) = sample()?.layer()?;
        let all = entries(&layer)?;
        let paths: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin/",
                "bin/busybox",
                "bin/sh",
                "etc/",
                "etc/passwd",
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/tool"
            ]
        );
        for Seen { path, kind, mode, owner, mtime, .. } in &all {
            assert_eq!((*owner, *mtime), ((0, 0), 0), "{path}");
            let expected = match path.as_str() {
                "tmp/" => (tar::EntryType::Directory, 0o1777),
                p if p.ends_with('/') => (tar::EntryType::Directory, 0o755),
                "bin/sh" => (tar::EntryType::Symlink, 0o777),
                "etc/passwd" => (tar::EntryType::Regular, 0o644),
                _ => (tar::EntryType::Regular, 0o755),
            };
            assert_eq!((*kind, *mode), expected, "{path}");
        }
        let mut archive = tar::Archive::new(layer.as_slice());
        let link = archive
            .entries()?
            .filter_map(Result::ok)
            .find(|e| e.path().is_ok_and(|p| p == Path::new("bin/sh")))
            .context("no bin/sh")?
            .link_name()?
            .map(|l| l.into_owned());
        assert_eq!(link, Some(PathBuf::from("busybox")));
        assert_eq!(
            files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
            ["/bin/busybox", "/etc/passwd", "/usr/local/bin/tool"]
        );
        Ok(())
    }

    #[test]
    fn paths_are_plain_absolute_and_never_added_twice_differently() -> Result<()> {
        let mut image = ImageBuilder::new();
        for bad in ["relative", "/", "/a//b", "/a/./b", "/a/../b", "/a/"] {
            assert!(image.add_dir(bad, 0o755).is_err(), "{bad} was taken");
        }
        image.add_bytes("/etc/passwd", b"root".to_vec(), 0o644)?;
        image.add_bytes("/etc/passwd", b"root".to_vec(), 0o644)?;
        let err = image.add_bytes("/etc/passwd", b"other".to_vec(), 0o644).err().context("a conflict was taken")?;
        assert!(err.to_string().contains("/etc/passwd is added twice"), "{err}");
        // A file where a directory must be.
        image.add_bytes("/etc/passwd/inside", b"x".to_vec(), 0o644)?;
        let err = image.layer().err().context("a file under a file was written")?;
        assert!(err.to_string().contains("/etc/passwd/inside is inside /etc/passwd"), "{err}");
        Ok(())
    }

    #[test]
    fn ldd_output_is_parsed_into_library_paths() -> Result<()> {
        let output = "\tlinux-vdso.so.1 (0x00007ffd1c1f0000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1c000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1be00000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1c2c0000)
";
        assert_eq!(
            parse_ldd(output)?,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tstatically linked\n")?.is_empty());
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").err().context("not found was taken")?;
        assert_eq!(err.to_string(), "library libfoo.so.1 not found");
        assert!(parse_ldd("garbage\n").is_err());
        Ok(())
    }

    #[test]
    fn a_dynamic_host_program_brings_its_libraries_and_loader() -> Result<()> {
        // /bin/sh is dash, dynamically linked, on every Debian.
        let sh = Path::new("/bin/sh");
        if shared_libraries(sh)?.is_empty() {
            return Ok(());
        }
        let mut image = ImageBuilder::new();
        image.add_file("/bin/sh", sh, 0o755)?;
        let (_, files) = image.layer()?;
        assert!(files.iter().any(|f| f.0.contains("/ld-linux")), "no loader in {files:?}");
        assert!(files.iter().any(|f| f.0.contains("/libc.so")), "no libc in {files:?}");
        Ok(())
    }
}
