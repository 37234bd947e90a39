//! `cargo xtask bench daemon`: `hearth run` in steady state on a busy host.
//!
//! Both CPUs are kept busy by many processes (a dozen long-running fixture
//! processes with a fixed call chain, plus a shell loop that starts a new
//! short-lived process all the time, so symbolization never settles). For
//! each configuration the daemon warms up, then is measured over a
//! steady-state span:
//!
//! - agent CPU: user + system time of the process, as % of one core;
//! - BPF CPU: run time of its programs (fdinfo, `bpf_stats_enabled`), which
//!   the kernel charges to the interrupted tasks, not to the agent;
//! - RSS now and peak (VmRSS, VmHWM), BPF map memory (fdinfo `memlock`);
//! - bytes exported per sample, from the agent's own metrics.
//!
//! The overhead governor is switched off (the host is saturated on purpose,
//! which would make it lower the frequency) so each row is measured at its
//! stated frequency. Results go to `target/bench/daemon.md`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::record::{bpf_prog_stats, build_workload, Cleanup};
use crate::util::{cargo, run, workspace_root};

const WARMUP: Duration = Duration::from_secs(25);
const STEADY: Duration = Duration::from_secs(60);
/// Long-running busy processes in the workload.
const BUSY_PROCESSES: usize = 12;

/// Where a configuration sends its windows.
#[derive(Clone, Copy)]
enum Mode {
    Otlp,
    Store,
}

struct Result1 {
    label: String,
    agent_cpu_percent: f64,
    bpf_cpu_percent: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    map_mib: f64,
    bytes_per_sample: Option<f64>,
    samples_per_second: f64,
    frequency_end: f64,
    frequency_changes: f64,
}

pub fn bench(hearth: &Path, dir: &Path) -> Result<()> {
    let workload = build_workload(dir)?;
    let sink = build_sink()?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled (needs root)")?;
    let mut cleanup = Cleanup(Vec::new());
    for _ in 0..BUSY_PROCESSES {
        cleanup.0.push(Command::new(&workload).arg("3600").spawn()?);
    }
    cleanup.0.push(
        Command::new("sh")
            .args(["-c", "while :; do ls /usr/bin > /dev/null; done"])
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(1));

    let mut results = Vec::new();
    for (mode, hz) in [(Mode::Otlp, 19), (Mode::Otlp, 99), (Mode::Store, 19)] {
        let label = match mode {
            Mode::Otlp => format!("OTLP, {hz} Hz"),
            Mode::Store => format!("local store, {hz} Hz"),
        };
        eprintln!(
            "bench: hearth run ({label}): {}s warm-up, {}s measured",
            WARMUP.as_secs(),
            STEADY.as_secs()
        );
        results.push(measure(hearth, &sink, dir, mode, hz, label)?);
    }
    drop(cleanup);

    let text = report(&results);
    println!("{text}");
    std::fs::write(dir.join("daemon.md"), &text)?;
    Ok(())
}

fn report(results: &[Result1]) -> String {
    let mut out = format!(
        "`hearth run` steady state over {} s after {} s warm-up; 2 CPUs busy with {} \
         fixture processes and a process-spawning shell loop.\n\n",
        STEADY.as_secs(),
        WARMUP.as_secs(),
        BUSY_PROCESSES
    );
    let _ = writeln!(
        out,
        "| config | agent CPU (% of a core) | BPF CPU (% of a core) | RSS MiB (peak) | BPF maps MiB | samples/s | bytes exported / sample | frequency at end (changes) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {:.3}% | {:.3}% | {:.1} ({:.1}) | {:.1} | {:.0} | {} | {} Hz ({}) |",
            r.label,
            r.agent_cpu_percent,
            r.bpf_cpu_percent,
            r.rss_mib,
            r.peak_rss_mib,
            r.map_mib,
            r.samples_per_second,
            r.bytes_per_sample
                .map_or_else(|| "—".to_string(), |b| format!("{b:.1}")),
            r.frequency_end,
            r.frequency_changes
        );
    }
    out
}

/// The discard-everything OTLP receiver from the tests crate.
fn build_sink() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "hearth-integration-tests",
        "--bin",
        "otlp-sink",
    ]))?;
    Ok(workspace_root().join("target/release/otlp-sink"))
}

/// Kills the wrapped child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure(
    hearth: &Path,
    sink: &Path,
    dir: &Path,
    mode: Mode,
    hz: u64,
    label: String,
) -> Result<Result1> {
    let metrics_addr = free_addr()?;
    let mut cmd = Command::new(hearth);
    // The governor would (rightly) lower the frequency on this saturated
    // host; the bench measures the cost at the stated frequency.
    cmd.args(["run", "-F", &hz.to_string(), "--interval", "10s"])
        .args(["--max-host-load-percent", "100", "--max-cpu-percent", "100"])
        .args(["--metrics-addr", &metrics_addr.to_string()])
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null());
    let _sink = match mode {
        Mode::Otlp => {
            let sink_addr = free_addr()?;
            let child = Command::new(sink).arg(sink_addr.to_string()).spawn()?;
            let spool = dir.join("daemon-spool");
            let _ = std::fs::remove_dir_all(&spool);
            cmd.args(["--otlp-endpoint", &format!("http://{sink_addr}")])
                .arg("--spool-dir")
                .arg(spool);
            Some(Killed(child))
        }
        Mode::Store => {
            let store = dir.join("daemon-store");
            let _ = std::fs::remove_dir_all(&store);
            cmd.arg("--store").arg(store);
            None
        }
    };
    let daemon = Killed(cmd.spawn().context("starting hearth run")?);
    let pid = daemon.0.id() as i32;
    std::thread::sleep(WARMUP);
    let before = Snapshot::take(pid, metrics_addr)?;
    std::thread::sleep(STEADY);
    let after = Snapshot::take(pid, metrics_addr)?;
    let (rss_mib, peak_rss_mib) = rss(pid)?;
    let map_mib = map_memlock(pid) as f64 / (1 << 20) as f64;

    let mut daemon = daemon;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.0.try_wait()? {
            if !status.success() {
                bail!("hearth run exited with {status}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("hearth run did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let secs = after.at.duration_since(before.at).as_secs_f64();
    let delta = |name: &str| after.metric(name).unwrap_or(0.0) - before.metric(name).unwrap_or(0.0);
    let exported_samples = delta("hearth_export_samples_total");
    let exported_bytes = delta("hearth_export_bytes_total");
    Ok(Result1 {
        label,
        agent_cpu_percent: 100.0 * (after.cpu_seconds - before.cpu_seconds) / secs,
        bpf_cpu_percent: 100.0 * (after.bpf_ns - before.bpf_ns) as f64 / 1e9 / secs,
        rss_mib,
        peak_rss_mib,
        map_mib,
        bytes_per_sample: (exported_samples > 0.0).then(|| exported_bytes / exported_samples),
        samples_per_second: delta("hearth_samples_collected_total") / secs,
        frequency_end: after.metric("hearth_sampling_frequency_hz").unwrap_or(0.0),
        frequency_changes: after
            .metric("hearth_frequency_changes_total")
            .unwrap_or(0.0),
    })
}

/// Counters of the daemon at one moment.
struct Snapshot {
    at: Instant,
    cpu_seconds: f64,
    bpf_ns: u64,
    metrics: String,
}

impl Snapshot {
    fn take(pid: i32, metrics_addr: SocketAddr) -> Result<Snapshot> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .context("hearth run exited during the bench")?;
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap_or(0) + 1..]
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(Snapshot {
            at: Instant::now(),
            cpu_seconds: ticks as f64 / hz,
            bpf_ns: bpf_prog_stats(pid).values().map(|(ns, _)| ns).sum(),
            metrics: http_get(metrics_addr, "/metrics")?,
        })
    }

    fn metric(&self, series: &str) -> Option<f64> {
        self.metrics.lines().find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

fn rss(pid: i32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0))
}

/// Memory the kernel charges for the BPF maps `pid` holds.
fn map_memlock(pid: i32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let mut total = 0;
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if info.lines().any(|l| l.starts_with("map_id:")) {
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}
