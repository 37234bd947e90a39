//! `cargo xtask bench record`: overhead of a host-wide `hearth record` against
//! `perf record` and bpftrace on the same busy workload. The three run at
//! the same time, so each round compares them under identical conditions
//! (this VM's speed drifts by 2× within a minute); three rounds.
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

pub fn bench(hearth: &Path, dir: &Path) -> Result<()> {
    ensure_tools()?;
    let workload = build_workload(dir)?;

    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled (needs root)")?;
    // Whatever happens below, the workload and bpf_stats are put back.
    let mut cleanup = Cleanup(Vec::new());
    // One busy process per CPU, with a fixed call chain.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..cpus {
        cleanup.0.push(Command::new(&workload).arg("3600").spawn()?);
    }
    std::thread::sleep(Duration::from_secs(1));

    let mut report_text = String::new();
    for round in 1..=ROUNDS {
        eprintln!("bench: round {round}/{ROUNDS}: hearth, perf and bpftrace together for {SECONDS}s at {HZ} Hz, {cpus} busy CPUs");
        let results = measure_together(tool_commands(hearth, dir))?;
        report_text.push_str(&format!("Round {round}:\n\n{}\n", report(&results)));
    }
    drop(cleanup);

    let header = format!(
        "Host-wide {HZ} Hz for {SECONDS} s, {cpus} CPUs busy with the cpu_split fixture; \
         the three tools run at the same time.\n\n"
    );
    let text = header + &report_text;
    println!("{text}");
    std::fs::write(dir.join("record.md"), &text)?;
    Ok(())
}

const ROUNDS: u32 = 3;

/// Processes to kill (and bpf_stats to switch off) when the bench ends, on
/// success or error.
pub(super) struct Cleanup(pub(super) Vec<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
}

fn tool_commands(hearth: &Path, dir: &Path) -> Vec<(&'static str, Command)> {
    let secs = SECONDS.to_string();
    let hz = HZ.to_string();
    let mut hearth_cmd = Command::new(hearth);
    hearth_cmd
        .args(["record", "-d", &format!("{SECONDS}s"), "-F", &hz, "-o"])
        .arg(dir.join("hearth.pb.gz"))
        .env("HEARTH_LOG", "warn");
    let mut perf = Command::new("perf");
    perf.args(["record", "-F", &hz, "-a", "-g", "-q", "-o"])
        .arg(dir.join("perf.data"))
        .args(["--", "sleep", &secs]);
    let mut bpftrace = Command::new("bpftrace");
    bpftrace.arg("-e").arg(format!(
        "profile:hz:{HZ} {{ @[kstack, ustack, pid] = count(); }} interval:s:{SECONDS} {{ exit(); }}"
    ));
    vec![
        ("hearth record", hearth_cmd),
        ("perf record -F99 -a -g", perf),
        ("bpftrace kstack+ustack", bpftrace),
    ]
}

fn report(results: &[Measurement]) -> String {
    let mut out = String::new();
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

/// A tool being measured.
struct Running {
    tool: &'static str,
    child: Child,
    bpf: HashMap<u64, (u64, u64)>,
    done: Option<Measurement>,
}

/// Starts every tool at once and measures each until all have exited; on
/// error the tools still running are killed.
fn measure_together(tools: Vec<(&'static str, Command)>) -> Result<Vec<Measurement>> {
    let mut running = Vec::new();
    let result = poll_until_done(tools, &mut running);
    for r in running.iter_mut().filter(|r| r.done.is_none()) {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
    result?;
    Ok(running.into_iter().filter_map(|r| r.done).collect())
}

fn poll_until_done(tools: Vec<(&'static str, Command)>, running: &mut Vec<Running>) -> Result<()> {
    for (tool, mut cmd) in tools {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {tool}"))?;
        running.push(Running {
            tool,
            child,
            bpf: HashMap::new(),
            done: None,
        });
    }
    let started = Instant::now();
    while running.iter().any(|r| r.done.is_none()) {
        for r in running.iter_mut().filter(|r| r.done.is_none()) {
            let pid = r.child.id() as i32;
            // Keep the latest counters per program: they vanish with the
            // process.
            r.bpf.extend(bpf_prog_stats(pid));
            let mut status = 0;
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: plain wait4 on our own child.
            if unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) } != pid {
                continue;
            }
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                let mut stderr = String::new();
                if let Some(mut e) = r.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                bail!("{} failed (status {status}): {stderr}", r.tool);
            }
            let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            let total = r.bpf.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            r.done = Some(Measurement {
                tool: r.tool,
                cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
                max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
                bpf: (!r.bpf.is_empty()).then_some(total),
            });
        }
        if started.elapsed() > Duration::from_secs(SECONDS * 6) {
            bail!("the tools did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// (prog id → (run_time_ns, run_cnt)) for every BPF program fd `pid` holds.
pub(super) fn bpf_prog_stats(pid: i32) -> HashMap<u64, (u64, u64)> {
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

pub(super) fn build_workload(dir: &Path) -> Result<std::path::PathBuf> {
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
