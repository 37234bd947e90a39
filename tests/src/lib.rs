//! Helpers for hearth's end-to-end tests: build fixture programs with gcc,
//! run them, run the real `hearth` binary (as built by `cargo xtask test`),
//! and read what it wrote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use hearth::profile::Profile;

pub mod cgroups;
pub mod churn;
pub mod daemon;
pub mod kube_api;
pub mod otlp_check;
pub mod otlp_receiver;

/// The hearth binary under test; `cargo xtask test` sets `HEARTH_BIN`.
pub fn hearth_bin() -> PathBuf {
    let bin = std::env::var_os("HEARTH_BIN").map(PathBuf::from).expect(
        "HEARTH_BIN is not set: run the integration tests through `cargo xtask test`, \
         which builds the eBPF object and the hearth binary first",
    );
    assert!(bin.is_file(), "HEARTH_BIN={} does not exist", bin.display());
    bin
}

/// A fresh directory for one test's files.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("hearth-tests")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// Compiles `tests/fixtures/<name>.c` with `flags` into `dir`.
pub fn build_c_fixture(name: &str, flags: &[&str], dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("running gcc (install it: apt-get install gcc)");
    assert!(status.success(), "gcc failed for {}", source.display());
    out
}

/// A frame-pointer build with a fixed call chain: no inlining and no tail
/// calls (a tail call replaces the caller's frame, so no unwinder can show
/// it). gcc still emits leaf functions without a frame at -O2.
pub const FRAME_POINTER_FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-fno-omit-frame-pointer",
    "-fno-inline",
    "-fno-optimize-sibling-calls",
];

/// A build without frame pointers, as distributions and release builds
/// ship, with the same fixed call chain as [`FRAME_POINTER_FLAGS`].
pub const NO_FRAME_POINTER_FLAGS: &[&str] = &[
    "-O2",
    "-fomit-frame-pointer",
    "-fno-inline",
    "-fno-optimize-sibling-calls",
];

/// Compiles `tests/fixtures/<name>.rs` as a release build (`rustc -O`: no
/// frame pointers, the default) into `dir`.
pub fn build_rust_fixture(name: &str, dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.rs"));
    let out = dir.join(name);
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args(["-O", "--edition", "2021", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("running rustc");
    assert!(status.success(), "rustc failed for {}", source.display());
    out
}

/// A running fixture, killed when dropped.
pub struct Fixture {
    pub child: Child,
}

impl Fixture {
    pub fn spawn(program: &Path, args: &[&str]) -> Fixture {
        let child = Command::new(program)
            .args(args)
            .spawn()
            .expect("starting fixture");
        Fixture { child }
    }

    /// Like [`Fixture::spawn`], at nice -10: its CPU time is then its wall
    /// time even when other work shares the machine, so "frequency ×
    /// duration" is the true sample count (the tests run as root).
    pub fn spawn_favoured(program: &Path, args: &[&str]) -> Fixture {
        let child = Command::new("nice")
            .args(["-n", "-10"])
            .arg(program)
            .args(args)
            .spawn()
            .expect("starting fixture");
        Fixture { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user + system) the fixture has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("fixture is running");
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 (11 and 12 after the comm).
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hearth <args>` (a `record`) with `env` added and returns once
/// it is sampling, with the file its log goes to.
pub fn start_hearth(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Child, PathBuf) {
    let log = dir.join("hearth.log");
    let child = Command::new(hearth_bin())
        .args(args)
        .env("HEARTH_LOG", "info")
        .envs(env.iter().copied())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting hearth");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("recording")
    {
        assert!(std::time::Instant::now() < deadline, "hearth did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, log)
}

/// Runs `hearth <args>` to completion.
pub fn hearth(args: &[&str]) -> Output {
    Command::new(hearth_bin())
        .args(args)
        .env("HEARTH_LOG", "info")
        .output()
        .expect("running hearth")
}

/// Panics with hearth's stderr unless it exited with `code`.
pub fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "hearth exited {:?}, expected {code}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads a folded-stacks file written by hearth.
pub fn read_folded(path: &Path) -> Profile {
    let file = std::fs::File::open(path).expect("opening folded output");
    hearth::export::folded::parse(std::io::BufReader::new(file)).expect("parsing folded output")
}

/// Reads a gzipped pprof written by hearth.
pub fn read_pprof(path: &Path) -> Profile {
    let bytes = std::fs::read(path).expect("reading pprof output");
    hearth::export::pprof::decode(&bytes).expect("decoding pprof output")
}

/// True when `needle` occurs in `stack` in order (not necessarily adjacent).
pub fn contains_in_order(stack: &[&str], needle: &[&str]) -> bool {
    let mut it = stack.iter();
    needle.iter().all(|want| it.any(|have| have == want))
}

/// What `hearth record` says on `stderr` it left out in the kernel (`N
/// filtered out in the kernel`); 0 when it says nothing of it.
pub fn filtered_in_kernel(stderr: &str) -> u64 {
    let Some(end) = stderr.find(" filtered out in the kernel") else {
        return 0;
    };
    let start = stderr[..end].rfind(' ').map_or(0, |i| i + 1);
    stderr[start..end].parse().unwrap_or(0)
}

/// Prints the `process events` lines of a hearth log (the counts of the
/// process events it handled), for the test's output.
pub fn print_process_events(log: &str) {
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("process events"))
            .collect::<String>()
    );
}

/// Samples of `profile` whose process has this pid.
pub fn samples_of_pid(profile: &Profile, pid: u32) -> Vec<&hearth::profile::Sample> {
    profile
        .samples
        .iter()
        .filter(|s| profile.process(s.process).pid == pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{contains_in_order, filtered_in_kernel};

    #[test]
    fn filtered_count_is_read_from_the_summary() {
        let stderr = "INFO x\nhearth: 0 samples, 0 lost in the kernel (maps full), 1187 filtered out in the kernel (no stack walk); unwind tables: 4 files\n";
        assert_eq!(filtered_in_kernel(stderr), 1187);
        assert_eq!(filtered_in_kernel("hearth: 12 samples, 0 lost\n"), 0);
    }

    #[test]
    fn in_order_subsequence() {
        let stack = ["_start", "main", "run", "x", "dispatch", "leaf_a"];
        assert!(contains_in_order(&stack, &["main", "dispatch", "leaf_a"]));
        assert!(!contains_in_order(&stack, &["dispatch", "main"]));
        assert!(!contains_in_order(&stack, &["main", "leaf_b"]));
    }
}
