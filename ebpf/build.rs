//! Compiles every `bpf/*.bpf.c` (and, with the `test-programs` feature,
//! `bpf/testing/*.bpf.c`) with clang into `OUT_DIR/<stem>.bpf.o`, where
//! `src/lib.rs` embeds them. No compiled object is ever committed.
//!
//! A missing tool or header stops the build with the Debian package to install.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Clang binaries tried in order when `NETD_CLANG` is not set.
const CLANG_CANDIDATES: &[&str] = &["clang-19", "clang"];

fn fail(message: &str) -> ! {
    eprintln!("error: netd-ebpf build: {message}");
    exit(1);
}

fn find_clang() -> String {
    if let Ok(clang) = env::var("NETD_CLANG") {
        return clang;
    }
    for candidate in CLANG_CANDIDATES {
        if Command::new(candidate).arg("--version").output().map(|out| out.status.success()).unwrap_or(false) {
            return (*candidate).to_string();
        }
    }
    fail(
        "no clang found (tried clang-19, clang; or set NETD_CLANG). \
         Install the Debian package `clang-19` (or run `cargo xtask setup`).",
    )
}

/// Debian multiarch directory holding `asm/types.h` for the target.
fn multiarch_include(target_arch: &str) -> PathBuf {
    let triple = match target_arch {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => fail(&format!("unsupported target architecture `{other}` (netd supports x86_64 and aarch64)")),
    };
    PathBuf::from("/usr/include").join(triple)
}

fn require_header(path: &Path, package: &str) {
    if !path.exists() {
        fail(&format!(
            "missing {}. Install the Debian package `{package}` (or run `cargo xtask setup`).",
            path.display()
        ));
    }
}

fn bpf_sources(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sources: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    sources
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR not set")));
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let test_programs = env::var_os("CARGO_FEATURE_TEST_PROGRAMS").is_some();

    let include_dir = manifest_dir.join("include");
    let bpf_dir = manifest_dir.join("bpf");
    println!("cargo:rerun-if-changed={}", include_dir.display());
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-env-changed=NETD_CLANG");

    let mut sources = bpf_sources(&bpf_dir);
    if test_programs {
        sources.extend(bpf_sources(&bpf_dir.join("testing")));
    }
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
    }

    let multiarch = multiarch_include(&target_arch);
    require_header(&multiarch.join("asm/types.h"), "linux-libc-dev");
    require_header(Path::new("/usr/include/linux/bpf.h"), "linux-libc-dev");
    require_header(Path::new("/usr/include/bpf/bpf_helpers.h"), "libbpf-dev");
    let clang = find_clang();
    let arch_define = if target_arch == "aarch64" { "-D__TARGET_ARCH_arm64" } else { "-D__TARGET_ARCH_x86" };

    for source in &sources {
        let file_name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = file_name.trim_end_matches(".bpf.c");
        let object = out_dir.join(format!("{stem}.bpf.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", arch_define])
            .arg("-I")
            .arg(&include_dir)
            .arg("-I")
            .arg(&multiarch)
            .arg("-c")
            .arg(source)
            .arg("-o")
            .arg(&object)
            .output()
            .unwrap_or_else(|err| fail(&format!("could not run {clang}: {err}")));
        if !output.status.success() {
            fail(&format!("{clang} failed on {}:\n{}", source.display(), String::from_utf8_lossy(&output.stderr)));
        }
    }
}
