//! `cargo xtask bench unwind`: what unwinding with tables costs.
//!
//! 1. BPF time per sample, tables against frame pointers on the same
//!    fixture in the same run: two `hearth record --pid` run at the same
//!    time on the same two busy fixture processes (one per CPU), one with
//!    `--unwind dwarf`, one with `--unwind fp`; each samples every fixture
//!    sample, and `run_time_ns / run_cnt` of each one's on-CPU program
//!    (with `kernel.bpf_stats_enabled=1`) is its cost per sample. Done on
//!    the cpu_split fixture built with frame pointers (both walkers reach
//!    the C library; tables also unwind the library down to `_start`) and
//!    built without (frame pointers stop at the leaf). Three rounds each;
//!    the frames per sample come from the folded outputs.
//! 2. Time and memory to build a table: libc and a large binary (hearth
//!    itself), with `hearth unwind-table`, median of three.
//! 3. Table memory with the busy workload running: a host-wide
//!    `hearth record` per mode, with the fixtures above plus the qsort and
//!    Rust fixtures running; the tables it loaded, its max RSS.
//!
//! Results go to `target/bench/unwind.md`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::record::{bpf_prog_stats, build_workload, Cleanup};
use crate::util::{run, workspace_root};

const SECONDS: u64 = 10;
const HZ: u64 = 499;
const ROUNDS: usize = 3;

pub fn bench(hearth: &Path, dir: &Path) -> Result<()> {
    let with_fp = build_workload(dir)?;
    let no_fp = build_c(dir, "cpu_split", "cpu_split_nofp")?;
    let qsort = build_c(dir, "qsort_cmp", "qsort_cmp")?;
    let rust = build_rust(dir, "rust_chain")?;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "## BPF time per sample: tables (`--unwind dwarf`) against frame pointers (`--unwind fp`)\n\n\
         Two records at {HZ} Hz for {SECONDS} s at the same time, on the same two busy \
         processes of one fixture (one per CPU).\n"
    );
    let _ = writeln!(
        text,
        "| fixture | round | fp ns/sample | fp frames/sample | dwarf ns/sample | dwarf frames/sample | dwarf / fp |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|---|---|");
    for (label, fixture) in [
        ("cpu_split, frame pointers", &with_fp),
        ("cpu_split, no frame pointers", &no_fp),
    ] {
        // Dropping the cleanup turns bpf_stats off again.
        let mut cleanup = Cleanup(Vec::new());
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
            .context("enabling kernel.bpf_stats_enabled (needs root)")?;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..cpus {
            cleanup.0.push(Command::new(fixture).arg("3600").spawn()?);
        }
        std::thread::sleep(Duration::from_millis(300));
        let pids: Vec<u32> = cleanup.0.iter().map(Child::id).collect();
        for round in 1..=ROUNDS {
            eprintln!("bench unwind: {label}, round {round}/{ROUNDS}");
            let results = measure_together(hearth, dir, &pids)?;
            let (fp, dwarf) = (&results[0], &results[1]);
            let _ = writeln!(
                text,
                "| {label} | {round} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2}× |",
                fp.ns_per_run,
                fp.frames,
                dwarf.ns_per_run,
                dwarf.frames,
                dwarf.ns_per_run / fp.ns_per_run
            );
        }
        drop(cleanup);
    }

    let _ = writeln!(
        text,
        "\n## Building a table (`hearth unwind-table`, median of 3)\n\n\
         | file | rows | table KiB | build ms | peak extra RSS KiB |\n|---|---|---|---|---|"
    );
    for file in [
        PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
        hearth.to_path_buf(),
    ] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(table_build(hearth, &file)?);
        }
        runs.sort_by(|a, b| a.build_ms.total_cmp(&b.build_ms));
        let m = &runs[1];
        let _ = writeln!(
            text,
            "| {} | {} | {} | {:.1} | {} |",
            file.display(),
            m.rows,
            m.bytes / 1024,
            m.build_ms,
            m.peak_kib
        );
    }

    let _ = writeln!(
        text,
        "\n## Table memory, host-wide, busy workload ({SECONDS} s)\n\n\
         Running: two cpu_split with frame pointers, one without, qsort_cmp, rust_chain, \
         and whatever else the host runs.\n\n\
         | mode | summary | max RSS MiB |\n|---|---|---|"
    );
    let mut cleanup = Cleanup(Vec::new());
    for exe in [&with_fp, &with_fp, &no_fp, &qsort, &rust] {
        cleanup.0.push(Command::new(exe).arg("3600").spawn()?);
    }
    std::thread::sleep(Duration::from_millis(300));
    for mode in ["fp", "auto", "dwarf"] {
        eprintln!("bench unwind: host-wide --unwind {mode}");
        let (summary, rss_mib) = host_wide(hearth, dir, mode)?;
        let _ = writeln!(text, "| {mode} | {summary} | {rss_mib:.1} |");
    }
    drop(cleanup);

    println!("{text}");
    std::fs::write(dir.join("unwind.md"), &text)?;
    Ok(())
}

fn build_c(dir: &Path, source: &str, out: &str) -> Result<PathBuf> {
    let out = dir.join(out);
    run(Command::new("gcc")
        .args([
            "-O2",
            "-fomit-frame-pointer",
            "-fno-inline",
            "-fno-optimize-sibling-calls",
            "-o",
        ])
        .arg(&out)
        .arg(workspace_root().join(format!("tests/fixtures/{source}.c"))))?;
    Ok(out)
}

fn build_rust(dir: &Path, source: &str) -> Result<PathBuf> {
    let out = dir.join(source);
    run(Command::new("rustc")
        .args(["-O", "--edition", "2021", "-o"])
        .arg(&out)
        .arg(workspace_root().join(format!("tests/fixtures/{source}.rs"))))?;
    Ok(out)
}

struct PerSample {
    ns_per_run: f64,
    /// Mean user frames per sample in the record's output.
    frames: f64,
}

/// Runs an `fp` and a `dwarf` record of `pids` at the same time.
fn measure_together(hearth: &Path, dir: &Path, pids: &[u32]) -> Result<Vec<PerSample>> {
    let modes = ["fp", "dwarf"];
    let mut children = Vec::new();
    for mode in modes {
        let mut cmd = Command::new(hearth);
        cmd.args([
            "record",
            "-d",
            &format!("{SECONDS}s"),
            "-F",
            &HZ.to_string(),
        ])
        .args(["--unwind", mode, "-o"])
        .arg(dir.join(format!("unwind-{mode}.folded")))
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for pid in pids {
            cmd.args(["--pid", &pid.to_string()]);
        }
        children.push(Running {
            child: cmd
                .spawn()
                .with_context(|| format!("starting hearth --unwind {mode}"))?,
            stats: HashMap::new(),
            done: false,
        });
    }
    let started = Instant::now();
    while children.iter().any(|c| !c.done) {
        for c in children.iter_mut().filter(|c| !c.done) {
            // Keep the latest counters: they vanish with the process.
            c.stats.extend(bpf_prog_stats(c.child.id() as i32));
            if let Some(status) = c.child.try_wait()? {
                if !status.success() {
                    let mut stderr = String::new();
                    if let Some(mut e) = c.child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut stderr);
                    }
                    bail!("hearth record failed ({status}): {stderr}");
                }
                c.done = true;
            }
        }
        if started.elapsed() > Duration::from_secs(SECONDS * 6) {
            for c in &mut children {
                let _ = c.child.kill();
            }
            bail!("the records did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut out = Vec::new();
    for (mode, c) in modes.iter().zip(&children) {
        let (ns, runs) = c
            .stats
            .values()
            .fold((0u64, 0u64), |a, b| (a.0 + b.0, a.1 + b.1));
        if runs == 0 {
            bail!("no BPF runs counted for --unwind {mode}");
        }
        out.push(PerSample {
            ns_per_run: ns as f64 / runs as f64,
            frames: mean_user_frames(&dir.join(format!("unwind-{mode}.folded")))?,
        });
    }
    Ok(out)
}

struct Running {
    child: Child,
    stats: HashMap<u64, (u64, u64)>,
    done: bool,
}

/// Mean user frames per sample of a folded file (the root is the process
/// name; kernel frames end in `_[k]`).
fn mean_user_frames(path: &Path) -> Result<f64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut frames, mut samples) = (0u64, 0u64);
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        let user = stack
            .split(';')
            .skip(1)
            .filter(|f| !f.ends_with("_[k]"))
            .count() as u64;
        frames += user * count;
        samples += count;
    }
    Ok(frames as f64 / samples.max(1) as f64)
}

struct TableBuild {
    rows: u64,
    bytes: u64,
    build_ms: f64,
    peak_kib: String,
}

fn table_build(hearth: &Path, file: &Path) -> Result<TableBuild> {
    let out = Command::new(hearth)
        .arg("unwind-table")
        .arg(file)
        .output()
        .context("running hearth unwind-table")?;
    if !out.status.success() {
        bail!(
            "hearth unwind-table failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
            .with_context(|| format!("no {name} in {text:?}"))
    };
    Ok(TableBuild {
        rows: field("rows")?.parse()?,
        bytes: field("bytes")?.parse()?,
        build_ms: field("build_ms")?.parse()?,
        peak_kib: field("peak_kib")?,
    })
}

/// A host-wide record in `mode`: its unwind summary line and max RSS.
fn host_wide(hearth: &Path, dir: &Path, mode: &str) -> Result<(String, f64)> {
    let mut child = Command::new(hearth)
        .args([
            "record",
            "-d",
            &format!("{SECONDS}s"),
            "--unwind",
            mode,
            "-o",
        ])
        .arg(dir.join(format!("unwind-host-{mode}.folded")))
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        e.read_to_string(&mut stderr)?;
    }
    let pid = child.id() as i32;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain wait4 on our own child.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid
        || !libc::WIFEXITED(status)
        || libc::WEXITSTATUS(status) != 0
    {
        bail!("hearth record --unwind {mode} failed: {stderr}");
    }
    let summary = stderr
        .lines()
        .find_map(|l| {
            l.split_once("unwind tables: ")
                .map(|(_, rest)| rest.to_string())
        })
        .unwrap_or_else(|| "no tables (frame pointers only)".to_string());
    Ok((summary, usage.ru_maxrss as f64 / 1024.0))
}
