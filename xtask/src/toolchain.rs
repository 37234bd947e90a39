//! Installs what the kernel crate needs, idempotently and cached per
//! machine: the nightly `rust-src` component and a bpf-linker built against
//! the nightly's own libLLVM (no matching LLVM comes from Debian).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{run, run_output};

/// The nightly toolchain the machine image ships (rustc 1.97, LLVM 22).
pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the eBPF build needs on PATH and in its environment.
pub struct EbpfToolchain {
    /// Directory holding the `bpf-linker` wrapper.
    pub bin_dir: PathBuf,
}

struct NightlyInfo {
    commit: String,
    llvm_major: String,
    sysroot: PathBuf,
}

fn nightly_info() -> Result<NightlyInfo> {
    let vv = run_output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"])).context(
        "the nightly toolchain is needed for the kernel programs (rustup toolchain list)",
    )?;
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let commit = field("commit-hash:").context("rustc -vV: no commit-hash")?;
    let llvm = field("LLVM version:").context("rustc -vV: no LLVM version")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_string();
    let sysroot =
        run_output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
    Ok(NightlyInfo {
        commit,
        llvm_major,
        sysroot: PathBuf::from(sysroot.trim()),
    })
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    base.join("hearth-tools")
}

/// Makes sure rust-src and bpf-linker are installed; cheap when they are.
pub fn ensure() -> Result<EbpfToolchain> {
    let info = nightly_info()?;
    ensure_rust_src(&info)?;
    let bin_dir = ensure_bpf_linker(&info)?;
    Ok(EbpfToolchain { bin_dir })
}

fn ensure_rust_src(info: &NightlyInfo) -> Result<()> {
    let src = info.sysroot.join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// Builds bpf-linker against the nightly's libLLVM into a directory keyed
/// by the nightly's commit, and writes a wrapper that finds that libLLVM at
/// run time. Returns the directory holding the wrapper.
fn ensure_bpf_linker(info: &NightlyInfo) -> Result<PathBuf> {
    let root = cache_root().join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-llvm{}-{}",
        info.llvm_major,
        &info.commit[..12.min(info.commit.len())]
    ));
    let wrapper_dir = root.join("wrapper");
    let wrapper = wrapper_dir.join("bpf-linker");
    if wrapper.is_file() && root.join("bin/bpf-linker").is_file() {
        return Ok(wrapper_dir);
    }

    let sysroot_lib = info.sysroot.join("lib");
    let libllvm = find_libllvm(&sysroot_lib)?;
    let prefix = root.join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute, once per machine)",
        libllvm.display()
    );
    let feature = format!("llvm-{}", info.llvm_major);
    run(Command::new("cargo")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "--locked", "bpf-linker", "--version"])
        .arg(format!("={BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", &feature, "--root"])
        .arg(&root))
    .context("building bpf-linker")?;

    std::fs::create_dir_all(&wrapper_dir)?;
    // The linker is dynamically linked to the nightly's libLLVM, which is
    // not on the loader's path.
    let script = format!(
        "#!/bin/sh\nLD_LIBRARY_PATH='{}'${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} exec '{}' \"$@\"\n",
        sysroot_lib.display(),
        root.join("bin/bpf-linker").display()
    );
    let tmp = wrapper.with_extension("tmp");
    std::fs::write(&tmp, script)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&tmp, &wrapper)?;
    run(Command::new(&wrapper).arg("--version"))
        .context("the bpf-linker just built does not run")?;
    Ok(wrapper_dir)
}

fn find_libllvm(dir: &Path) -> Result<PathBuf> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // libLLVM.so.<ver>-rust-<ver>-nightly (the real file, not the -<major> alias)
        if name.starts_with("libLLVM.so.") {
            return Ok(path);
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libLLVM") && name.contains(".so") {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM in {}: the nightly toolchain looks incomplete",
        dir.display()
    )
}
