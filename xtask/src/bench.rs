//! `cargo xtask bench`: overhead of a host-wide `hearth record` against
//! `perf record` and bpftrace on the same busy workload, in the same run.
//!
//! For each tool: CPU seconds (user + system, from wait4), max RSS, and for
//! BPF tools the average BPF run time per program invocation (from the
//! program fds' fdinfo with `kernel.bpf_stats_enabled=1`). Results are
//! printed and written to `target/bench/record.md`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::build::build_all;
use crate::util::{run, workspace_root};

const SECONDS: u64 = 20;
const HZ: u64 = 99;

struct Measurement {
    tool: &'static str,
    cpu_seconds: f64,
    max_rss_mib: f64,
    /// (total run ns, invocations) of the tool's BPF programs.
    bpf: Option<(u64, u64)>,
}

pub fn bench() -> Result<()> {
    ensure_tools()?;
    let hearth = build_all()?;
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let workload = build_workload(&dir)?;

    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled (needs root)")?;
    // One busy process per CPU, with a fixed call chain.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut load: Vec<Child> = (0..cpus)
        .map(|_| Command::new(&workload).arg("3600").spawn())
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(1));

    let secs = SECONDS.to_string();
    let hz = HZ.to_string();
    let runs: Vec<(&'static str, Command)> = vec![
        ("hearth record", {
            let mut c = Command::new(&hearth);
            c.args(["record", "-d", &format!("{SECONDS}s"), "-F", &hz, "-o"])
                .arg(dir.join("hearth.pb.gz"))
                .env("HEARTH_LOG", "warn");
            c
        }),
        ("perf record -F99 -a -g", {
            let mut c = Command::new("perf");
            c.args(["record", "-F", &hz, "-a", "-g", "-q", "-o"])
                .arg(dir.join("perf.data"))
                .args(["--", "sleep", &secs]);
            c
        }),
        ("bpftrace kstack+ustack", {
            let mut c = Command::new("bpftrace");
            c.arg("-e").arg(format!(
                "profile:hz:{HZ} {{ @[kstack, ustack, pid] = count(); }} interval:s:{SECONDS} {{ exit(); }}"
            ));
            c
        }),
    ];
    let mut results = Vec::new();
    for (tool, cmd) in runs {
        eprintln!("bench: {tool} for {SECONDS}s at {HZ} Hz, {cpus} busy CPUs");
        results.push(measure(tool, cmd)?);
    }
    for child in &mut load {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");

    let report = report(&results, cpus);
    println!("{report}");
    std::fs::write(dir.join("record.md"), &report)?;
    Ok(())
}

fn report(results: &[Measurement], cpus: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Host-wide {HZ} Hz for {SECONDS} s, {cpus} CPUs busy with the cpu_split fixture.\n"
    );
    let _ = writeln!(
        out,
        "| tool | CPU s (user+sys) | % of one core | max RSS MiB | BPF ns / run | BPF runs |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for m in results {
        let (per_run, runs) = match m.bpf {
            Some((ns, cnt)) if cnt > 0 => (format!("{}", ns / cnt), cnt.to_string()),
            _ => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2}% | {:.1} | {} | {} |",
            m.tool,
            m.cpu_seconds,
            100.0 * m.cpu_seconds / SECONDS as f64,
            m.max_rss_mib,
            per_run,
            runs
        );
    }
    out
}

fn measure(tool: &'static str, mut cmd: Command) -> Result<Measurement> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    let pid = child.id() as i32;
    let started = Instant::now();
    let mut bpf: HashMap<u64, (u64, u64)> = HashMap::new();
    loop {
        // Poll the tool's program fds until it exits; keep the latest
        // counters per program (they vanish with the process).
        for (id, stats) in bpf_prog_stats(pid) {
            bpf.insert(id, stats);
        }
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: plain wait4 on our own child.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                bail!("{tool} failed (status {status}): {stderr}");
            }
            let total = bpf.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            return Ok(Measurement {
                tool,
                cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
                max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
                bpf: (!bpf.is_empty()).then_some(total),
            });
        }
        if started.elapsed() > Duration::from_secs(SECONDS * 6) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!("{tool} did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (prog id → (run_time_ns, run_cnt)) for every BPF program fd `pid` holds.
fn bpf_prog_stats(pid: i32) -> HashMap<u64, (u64, u64)> {
    let mut out = HashMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(ns), Some(cnt)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        {
            out.insert(id, (ns, cnt));
        }
    }
    out
}

fn build_workload(dir: &Path) -> Result<std::path::PathBuf> {
    let out = dir.join("cpu_split");
    run(Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-inline",
            "-fno-optimize-sibling-calls",
            "-o",
        ])
        .arg(&out)
        .arg(workspace_root().join("tests/fixtures/cpu_split.c")))?;
    Ok(out)
}

/// perf and bpftrace come from Debian packages.
fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = [("perf", "linux-perf"), ("bpftrace", "bpftrace")]
        .into_iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
