//! `cargo xtask bench off-cpu`: what host-wide `hearth record --off-cpu`
//! costs a context-switch-heavy load.
//!
//! The load is the ping_pong fixture (two threads bouncing a byte over two
//! pipes as fast as they can, so every hop is a context switch) next to two
//! busy cpu_split processes, which keep the other CPUs busy (on a single
//! CPU they share it). ping_pong is pinned to one CPU (see [`pinned`]).
//! Each round runs ping_pong once per
//! configuration:
//!
//! - no profiler;
//! - `--off-cpu` with the default threshold and rate cap, bpf_stats off:
//!   what a user gets, and what the <5% target is judged on;
//! - the same with `kernel.bpf_stats_enabled`, which times every BPF run
//!   (two clock reads per run, so it adds a little cost of its own);
//! - `--off-cpu --off-cpu-max-rate 0`: every switch followed, as before
//!   the rate cap, bpf_stats off;
//! - `--off-cpu --off-cpu-min 0` (every wait recorded), bpf_stats on;
//! - `--off-cpu` with waits in system calls taken at `sys_exit`, as on
//!   kernels without the `rseq_update` tracepoint, bpf_stats on;
//! - the floor: the same tracepoints attached, with programs that return
//!   at once (hidden `--off-cpu-empty-programs`), bpf_stats off: what
//!   hooking every switch costs before the programs do anything.
//!
//! This VM is shared and its speed drifts within a minute, so rounds are
//! interleaved, the order rotates from round to round, and the slowdown of
//! a configuration is the median over rounds of its ping-pong throughput
//! relative to the unprofiled run of the same round.
//!
//! Measured over each ping_pong run: its round trips per second; host-wide
//! context switches per second (`ctxt` in /proc/stat); run time and run
//! count of the off-CPU programs, told apart by the tracepoint their
//! link is attached to (BPF time is charged to the switching tasks, not to
//! the agent); and the agent's own user + system CPU time. BPF time per
//! round trip, set against an unprofiled round trip, is a second estimate
//! of the slowdown that the VM's drift hardly touches. The agent is
//! started before ping_pong, waited for until its programs are attached
//! plus a second, and stopped with SIGINT after. Results go to
//! `target/bench/off-cpu.md`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::record::{bpf_prog_stats, build_workload, Cleanup};
use crate::util::{run, workspace_root};

/// Length of one ping_pong run.
const ROUND: Duration = Duration::from_secs(8);
const ROUNDS: usize = 6;
/// cpu_split processes keeping the CPUs busy (one per CPU here).
const BUSY_PROCESSES: usize = 2;
/// How long the agent runs, once attached, before ping_pong starts, so its
/// start-up work is not charged to the measured run.
const AGENT_LEAD: Duration = Duration::from_secs(1);
/// Loading and verifying the programs takes a few seconds on a busy host.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The target of the issue, for the default threshold.
const TARGET_SLOWDOWN_PERCENT: f64 = 5.0;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One way of running ping_pong.
struct Config {
    label: &'static str,
    /// Arguments of `hearth record --off-cpu` beyond the duration and
    /// output; `None`: no profiler runs.
    record_args: Option<&'static [&'static str]>,
    /// Whether the kernel times BPF runs during the round.
    bpf_stats: bool,
    /// Whether the agent records anything (the floor's programs do not).
    records: bool,
}

const CONFIGS: [Config; 7] = [
    Config {
        label: "off",
        record_args: None,
        bpf_stats: false,
        records: true,
    },
    Config {
        label: "`--off-cpu` (min 1ms), bpf_stats off",
        record_args: Some(&[]),
        bpf_stats: false,
        records: true,
    },
    Config {
        label: "`--off-cpu` (min 1ms), bpf_stats on",
        record_args: Some(&[]),
        bpf_stats: true,
        records: true,
    },
    Config {
        label: "`--off-cpu --off-cpu-max-rate 0` (every switch followed), bpf_stats off",
        record_args: Some(&["--off-cpu-max-rate", "0"]),
        bpf_stats: false,
        records: true,
    },
    Config {
        label: "`--off-cpu --off-cpu-min 0`, bpf_stats on",
        record_args: Some(&["--off-cpu-min", "0"]),
        bpf_stats: true,
        records: true,
    },
    Config {
        label:
            "`--off-cpu` with the `sys_exit` fallback (kernels without `rseq_update`), bpf_stats on",
        record_args: Some(&["--off-cpu-syscall-exit"]),
        bpf_stats: true,
        records: true,
    },
    Config {
        label: "floor: `--off-cpu` programs attached but returning at once, bpf_stats off",
        record_args: Some(&["--off-cpu-empty-programs"]),
        bpf_stats: false,
        records: false,
    },
];
/// Index in `CONFIGS` of the unprofiled baseline.
const BASELINE: usize = 0;
/// Index in `CONFIGS` of the configuration the target is judged on.
const TARGET_CONFIG: usize = 1;
/// Index in `CONFIGS` of the same configuration with BPF runs timed.
const TARGET_CONFIG_TIMED: usize = 2;
/// Index in `CONFIGS` of the empty programs.
const FLOOR_CONFIG: usize = 6;

/// Run time and run count of one BPF program.
#[derive(Debug, Default, Clone, Copy)]
struct BpfRuns {
    ns: u64,
    runs: u64,
}

impl BpfRuns {
    fn since(self, before: BpfRuns) -> BpfRuns {
        BpfRuns {
            ns: self.ns.saturating_sub(before.ns),
            runs: self.runs.saturating_sub(before.runs),
        }
    }

    fn add(self, other: BpfRuns) -> BpfRuns {
        BpfRuns {
            ns: self.ns + other.ns,
            runs: self.runs + other.runs,
        }
    }
}

/// What one ping_pong run measured.
struct RoundResult {
    round_trips: u64,
    round_trips_per_second: f64,
    /// Wall time between the snapshots around the ping_pong run.
    seconds: f64,
    switches_per_second: f64,
    profiler: Option<ProfilerCost>,
}

/// The profiler's cost over one ping_pong run.
struct ProfilerCost {
    agent_cpu_seconds: f64,
    /// Share of the host's switch-outs the agent followed over its run
    /// (the rest skipped by the rate cap, idle or filtered).
    followed_share: Option<f64>,
    /// The `sched_switch` program: one run per context switch.
    switch: BpfRuns,
    /// The `sys_exit` program: one run per system call.
    sys_exit: BpfRuns,
    /// The `rseq_update` program (where the kernel has the tracepoint): one
    /// run per return to user mode after a switch, of threads using
    /// restartable sequences.
    rseq: BpfRuns,
}

pub fn bench(hearth: &Path, dir: &Path) -> Result<()> {
    let workload = build_workload(dir)?;
    let ping_pong = build_ping_pong(dir)?;

    // Whatever happens below, the workload is killed and bpf_stats put back.
    let mut cleanup = Cleanup(Vec::new());
    let (cpus, ping_pong_cpu) = cpu_plan()?;
    let others: Vec<usize> = cpus
        .iter()
        .copied()
        .filter(|&c| c != ping_pong_cpu)
        .collect();
    // On a single CPU the workload shares it with ping_pong.
    let busy_cpus = if others.is_empty() {
        cpus.clone()
    } else {
        others
    };
    for _ in 0..BUSY_PROCESSES {
        cleanup.0.push(
            pinned(&workload, &busy_cpus)
                .arg("3600")
                .spawn()
                .context("starting the cpu_split workload")?,
        );
    }
    std::thread::sleep(Duration::from_secs(1));

    // results[config][round]
    let mut results: Vec<Vec<RoundResult>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        // Rotate the order so no configuration always runs first (right
        // after the previous agent exits) or last.
        for offset in 0..CONFIGS.len() {
            let index = (round + offset) % CONFIGS.len();
            let config = &CONFIGS[index];
            eprintln!(
                "bench: off-cpu round {}/{ROUNDS}: ping_pong for {}s, profiler: {}",
                round + 1,
                ROUND.as_secs(),
                config.label
            );
            let result = measure_round(hearth, &ping_pong, dir, config)
                .with_context(|| format!("round {} ({})", round + 1, config.label))?;
            results[index].push(result);
        }
    }
    drop(cleanup);

    let text = report(&results);
    println!("{text}");
    std::fs::write(dir.join("off-cpu.md"), &text)?;
    Ok(())
}

fn build_ping_pong(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("ping_pong");
    // Frame pointers so the off-CPU stacks of the fixture are readable in
    // the scratch profiles.
    run(Command::new("gcc")
        .args(["-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&out)
        .arg(workspace_root().join("tests/fixtures/ping_pong.c")))
    .context("building the ping_pong fixture")?;
    Ok(out)
}

/// Runs ping_pong once under `config` and measures it.
fn measure_round(
    hearth: &Path,
    ping_pong: &Path,
    dir: &Path,
    config: &Config,
) -> Result<RoundResult> {
    std::fs::write(BPF_STATS, if config.bpf_stats { "1" } else { "0" })
        .context("setting kernel.bpf_stats_enabled (needs root)")?;
    let agent = match config.record_args {
        Some(args) => {
            let mut agent = Agent::start(hearth, dir, args)?;
            agent.wait_until_attached()?;
            std::thread::sleep(AGENT_LEAD);
            Some(agent)
        }
        None => None,
    };

    let before = Snapshot::take(agent.as_ref())?;
    let (_, ping_pong_cpu) = cpu_plan()?;
    let output = pinned(ping_pong, &[ping_pong_cpu])
        .arg(ROUND.as_secs_f64().to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running ping_pong")?;
    let after = Snapshot::take(agent.as_ref())?;
    if !output.status.success() {
        bail!("ping_pong failed: {}", output.status);
    }
    let (round_trips, ping_pong_seconds) =
        parse_ping_pong(&String::from_utf8_lossy(&output.stdout))?;

    let followed_share = match agent {
        Some(agent) => agent.stop(config.records)?,
        None => None,
    };
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let profiler = match (before.agent, after.agent) {
        (Some(b), Some(a)) => Some(ProfilerCost {
            agent_cpu_seconds: a.cpu_seconds - b.cpu_seconds,
            followed_share,
            switch: a.switch.since(b.switch),
            sys_exit: a.sys_exit.since(b.sys_exit),
            rseq: a.rseq.since(b.rseq),
        }),
        _ => None,
    };
    Ok(RoundResult {
        round_trips,
        round_trips_per_second: round_trips as f64 / ping_pong_seconds,
        seconds,
        switches_per_second: after
            .context_switches
            .saturating_sub(before.context_switches) as f64
            / seconds,
        profiler,
    })
}

/// The CPUs this process may run on, and the one ping_pong gets (the last).
fn cpu_plan() -> Result<(Vec<usize>, usize)> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `allowed` is a writable set of `size` bytes.
    if unsafe { libc::sched_getaffinity(0, size, &mut allowed) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading this process's CPU affinity");
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the capacity of the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .collect();
    let last = *cpus.last().context("this process may run on no CPU")?;
    Ok((cpus, last))
}

/// A command running `program` on `cpus` only.
///
/// ping_pong runs on one CPU so that both its threads share it and every
/// hop is a direct switch between them. Left to the scheduler, whether they
/// share a CPU changes from run to run, and the throughput by 2–3× with it,
/// which pairing rounds cannot cancel. The busy workload runs on the other
/// CPUs: sharing ping_pong's CPU with it made each run's throughput depend
/// on how the scheduler split that CPU (±40% from round to round), which
/// drowned the profiler's few percent.
fn pinned(program: &Path, cpus: &[usize]) -> Command {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: as in `cpu_plan`.
    let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPUs from `cpu_plan` are below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut only) };
    }
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec the closure only makes one system call,
    // which is async-signal-safe, on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, size, &only) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// "F of N switch-outs followed" from `hearth record`'s summary line, as
/// F / N.
fn followed_share(log: &str) -> Option<f64> {
    let before = log.split(" switch-outs followed").next()?;
    let mut words = before.rsplit(' ');
    let all: f64 = words.next()?.parse().ok()?;
    let _of = words.next()?;
    let followed: f64 = words.next()?.parse().ok()?;
    (all > 0.0).then(|| followed / all)
}

/// `round_trips <N>` and `seconds <S>` from ping_pong's output.
fn parse_ping_pong(stdout: &str) -> Result<(u64, f64)> {
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
            .map(str::trim)
            .with_context(|| format!("no `{key}` line in ping_pong's output: {stdout:?}"))
    };
    let round_trips: u64 = value("round_trips")?
        .parse()
        .context("parsing ping_pong's round_trips")?;
    let seconds: f64 = value("seconds")?
        .parse()
        .context("parsing ping_pong's seconds")?;
    if round_trips == 0 || seconds <= 0.0 {
        bail!("ping_pong did no work: {stdout:?}");
    }
    Ok((round_trips, seconds))
}

/// A running `hearth record --off-cpu`, killed on drop unless stopped.
struct Agent {
    child: Child,
    log: PathBuf,
    output: PathBuf,
    /// Program ids of the attached off-CPU programs, once known.
    programs: Option<OffCpuPrograms>,
    reaped: bool,
}

#[derive(Clone, Copy)]
struct OffCpuPrograms {
    switch: u64,
    /// Attached only where the kernel lacks `rseq_update`, or when asked.
    sys_exit: Option<u64>,
    rseq: Option<u64>,
}

impl Agent {
    fn start(hearth: &Path, dir: &Path, extra_args: &[&str]) -> Result<Agent> {
        let log = dir.join("off-cpu-agent.log");
        let output = dir.join("off-cpu-scratch.folded");
        let _ = std::fs::remove_file(&output);
        // Long enough never to end on its own: it is stopped after the round.
        let duration = format!("{}s", ROUND.as_secs() + 60);
        let child = Command::new(hearth)
            .args(["record", "--off-cpu", "-d", &duration])
            .args(extra_args)
            .arg("-o")
            .arg(&output)
            .env("HEARTH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .context("starting hearth record --off-cpu")?;
        Ok(Agent {
            child,
            log,
            output,
            programs: None,
            reaped: false,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until the off-CPU programs are attached (their links exist:
    /// `sched_switch`, with `rseq_update` or `sys_exit` on kernels without
    /// BPF task works), and notes which program is which.
    fn wait_until_attached(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.reaped = true;
                bail!(
                    "hearth record exited with {status} before attaching: {}",
                    self.log_text()
                );
            }
            if tracepoint_links(self.pid()).contains_key("sched_switch") {
                // The agent attaches its off-CPU programs together; where
                // the kernel has BPF task works, `sched_switch` is the only
                // one.
                std::thread::sleep(Duration::from_millis(500));
                let links = tracepoint_links(self.pid());
                if let Some(&switch) = links.get("sched_switch") {
                    self.programs = Some(OffCpuPrograms {
                        switch,
                        sys_exit: links.get("sys_exit").copied(),
                        rseq: links.get("rseq_update").copied(),
                    });
                    return Ok(());
                }
            }
            if started.elapsed() > ATTACH_TIMEOUT {
                bail!(
                    "hearth record did not attach to sched_switch within {}s: {}",
                    ATTACH_TIMEOUT.as_secs(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn counters(&self) -> Result<AgentCounters> {
        let programs = self
            .programs
            .context("the agent's programs are not attached yet")?;
        let stats = bpf_prog_stats(self.pid());
        let runs = |id: u64| {
            stats
                .get(&id)
                .map(|&(ns, runs)| BpfRuns { ns, runs })
                .with_context(|| format!("hearth record no longer holds BPF program {id}"))
        };
        Ok(AgentCounters {
            cpu_seconds: cpu_seconds(self.pid())?,
            switch: runs(programs.switch)?,
            sys_exit: programs.sys_exit.map(runs).transpose()?.unwrap_or_default(),
            rseq: programs.rseq.map(runs).transpose()?.unwrap_or_default(),
        })
    }

    /// Stops the agent with SIGINT, as Ctrl-C would; it must exit 0 and,
    /// when it `records`, write a profile. Returns the share of
    /// switch-outs it followed over its whole run, from its summary line,
    /// if it printed one.
    fn stop(mut self, records: bool) -> Result<Option<f64>> {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.pid(), libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                self.reaped = true;
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "hearth record did not stop within {}s of SIGINT",
                    STOP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.success() {
            bail!("hearth record exited with {status}: {}", self.log_text());
        }
        let written = std::fs::metadata(&self.output).map_or(0, |m| m.len());
        if records && written == 0 {
            bail!(
                "hearth record wrote no profile to {}: {}",
                self.output.display(),
                self.log_text()
            );
        }
        Ok(followed_share(&self.log_text()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Cumulative counters of the agent at one moment.
#[derive(Clone, Copy)]
struct AgentCounters {
    cpu_seconds: f64,
    switch: BpfRuns,
    sys_exit: BpfRuns,
    rseq: BpfRuns,
}

/// Cumulative host and agent counters at one moment.
struct Snapshot {
    at: Instant,
    context_switches: u64,
    agent: Option<AgentCounters>,
}

impl Snapshot {
    fn take(agent: Option<&Agent>) -> Result<Snapshot> {
        Ok(Snapshot {
            agent: agent.map(|a| a.counters()).transpose()?,
            context_switches: context_switches()?,
            at: Instant::now(),
        })
    }
}

/// Context switches on the host since boot.
fn context_switches() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    stat.lines()
        .find_map(|line| line.strip_prefix("ctxt "))
        .context("no ctxt line in /proc/stat")?
        .trim()
        .parse()
        .context("parsing ctxt in /proc/stat")
}

/// User + system CPU time of process `pid` (all its threads), in seconds.
fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (did hearth record exit?)"))?;
    // The command name may hold spaces and parentheses; fields resume after
    // the last ')'. utime and stime are fields 14 and 15 of the line.
    let after_comm = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("short /proc/{pid}/stat: {stat:?}"))?
            .parse()
            .with_context(|| format!("parsing /proc/{pid}/stat: {stat:?}"))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(total as f64 / ticks_per_second)
}

/// Tracepoint name → program id, for every BPF tracepoint link `pid` holds
/// (link fdinfo names the tracepoint, program fdinfo names nothing).
fn tracepoint_links(pid: i32) -> HashMap<String, u64> {
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
                .map(str::trim)
        };
        if let (Some(tracepoint), Some(Ok(prog_id))) =
            (field("tp_name:"), field("prog_id:").map(str::parse::<u64>))
        {
            out.insert(tracepoint.to_string(), prog_id);
        }
    }
    out
}

/// Summary of one configuration over all rounds.
struct Summary {
    round_trips_per_second: f64,
    /// Slowdown in each round against the baseline of the same round, in
    /// %; empty for the baseline itself.
    slowdowns_percent: Vec<f64>,
    switches_per_second: f64,
    /// Totals over all rounds.
    switch: BpfRuns,
    sys_exit: BpfRuns,
    rseq: BpfRuns,
    seconds: f64,
    round_trips: u64,
    agent_cpu_percent: Option<f64>,
    /// Median share of switch-outs followed.
    followed_share: Option<f64>,
}

impl Summary {
    /// Nanoseconds of every off-CPU program over all rounds.
    fn bpf_ns(&self) -> u64 {
        self.switch.ns + self.sys_exit.ns + self.rseq.ns
    }

    /// Median, lowest and highest slowdown, or `None` for the baseline.
    fn slowdown_range(&self) -> Option<(f64, f64, f64)> {
        if self.slowdowns_percent.is_empty() {
            return None;
        }
        let s = &self.slowdowns_percent;
        Some((
            median(s.iter().copied()),
            s.iter().copied().fold(f64::INFINITY, f64::min),
            s.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ))
    }
}

fn summarize(results: &[Vec<RoundResult>], index: usize) -> Summary {
    let rounds = &results[index];
    let slowdowns_percent = if index == BASELINE {
        Vec::new()
    } else {
        rounds
            .iter()
            .zip(&results[BASELINE])
            .map(|(on, off)| 100.0 * (1.0 - on.round_trips_per_second / off.round_trips_per_second))
            .collect()
    };
    let costs: Vec<&ProfilerCost> = rounds.iter().filter_map(|r| r.profiler.as_ref()).collect();
    let agent_cpu: Vec<f64> = rounds
        .iter()
        .filter_map(|r| Some(100.0 * r.profiler.as_ref()?.agent_cpu_seconds / r.seconds))
        .collect();
    Summary {
        round_trips_per_second: median(rounds.iter().map(|r| r.round_trips_per_second)),
        slowdowns_percent,
        switches_per_second: median(rounds.iter().map(|r| r.switches_per_second)),
        switch: costs
            .iter()
            .fold(BpfRuns::default(), |t, c| t.add(c.switch)),
        sys_exit: costs
            .iter()
            .fold(BpfRuns::default(), |t, c| t.add(c.sys_exit)),
        rseq: costs.iter().fold(BpfRuns::default(), |t, c| t.add(c.rseq)),
        seconds: rounds.iter().map(|r| r.seconds).sum(),
        round_trips: rounds.iter().map(|r| r.round_trips).sum(),
        agent_cpu_percent: (!agent_cpu.is_empty()).then(|| median(agent_cpu.into_iter())),
        followed_share: {
            let shares: Vec<f64> = costs.iter().filter_map(|c| c.followed_share).collect();
            (!shares.is_empty()).then(|| median(shares.into_iter()))
        },
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn report(results: &[Vec<RoundResult>]) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "Host-wide `hearth record --off-cpu` against a pipe ping-pong (ping_pong fixture: two \
         threads of one process bouncing a byte over two pipes as fast as they can) on {cpus} \
         CPUs, with {BUSY_PROCESSES} cpu_split processes busy on the CPUs other than \
         ping_pong's; kernel {}. ping_pong is pinned to one CPU, so every hop is a direct \
         switch between its two threads (left to the scheduler, whether they share a CPU \
         varies from run to run and changes the throughput 2–3×; sharing its CPU with the \
         busy processes made it swing ±40% from round to round).\n\n\
         - {ROUNDS} rounds, each running ping_pong for {} s once per configuration, in an \
         order rotating from round to round. The agent attaches, runs {} s, then ping_pong \
         runs; the agent is stopped with SIGINT after.\n\
         - Slowdown: median over rounds of 1 − (round trips/s ÷ round trips/s unprofiled in \
         the same round); in parentheses the lowest and highest round.\n\
         - Context switches: host-wide, from `ctxt` in /proc/stat.\n\
         - BPF ns per run: run_time_ns ÷ run_cnt of the `sched_switch` program (one run per \
         switch), of the `sys_exit` program (one run per system call) and of the \
         `rseq_update` program (one run per return to user mode after a switch), totals over all \
         rounds, with kernel.bpf_stats_enabled, which itself adds two clock reads per run \
         (hence the row without it). \"Per switch\" charges both programs to the switches, \
         \"per round trip\" to the ping-pong round trips (nearly all switches and system \
         calls on the host are ping_pong's): what the programs alone add to a round trip, \
         and the throughput drop that alone implies against the median unprofiled round \
         trip, measured by the kernel and so less noisy than the throughput. \
         BPF CPU is charged to the switching tasks, agent CPU (user + system) to the agent.\n\
         - Switch-outs followed: the share of the host's switch-outs the agent followed over \
         its whole run (the others skipped by the rate cap, or the idle task's).\n\
         - Other columns: medians over rounds.\n\n",
        kernel.trim(),
        ROUND.as_secs(),
        AGENT_LEAD.as_secs(),
    );
    let _ = writeln!(
        out,
        "| profiler | ping-pong round trips/s | slowdown vs off (range) | context switches/s | BPF ns / sched_switch run | BPF ns / sys_exit run | BPF ns / rseq_update run | BPF ns per switch (all) | BPF µs per round trip (slowdown it alone implies) | BPF CPU (% of a core) | agent CPU (% of a core) | switch-outs followed |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let summaries: Vec<Summary> = (0..CONFIGS.len()).map(|i| summarize(results, i)).collect();
    let unprofiled_round_trip_ns = 1e9 / summaries[BASELINE].round_trips_per_second;
    for (config, s) in CONFIGS.iter().zip(&summaries) {
        let dash = || "—".to_string();
        let per_run = |r: BpfRuns| {
            if r.runs > 0 {
                format!("{:.0}", r.ns as f64 / r.runs as f64)
            } else {
                dash()
            }
        };
        let timed = config.bpf_stats && s.switch.runs > 0;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            config.label,
            s.round_trips_per_second,
            s.slowdown_range()
                .map_or_else(dash, |(median, low, high)| format!(
                    "{median:.1}% ({low:.1}% … {high:.1}%)"
                )),
            s.switches_per_second,
            if timed { per_run(s.switch) } else { dash() },
            if timed { per_run(s.sys_exit) } else { dash() },
            if timed { per_run(s.rseq) } else { dash() },
            if timed {
                format!("{:.0}", s.bpf_ns() as f64 / s.switch.runs as f64)
            } else {
                dash()
            },
            if timed && s.round_trips > 0 {
                // Every BPF run on the host, charged to the round trips:
                // here nearly all switches and system calls are ping_pong's.
                let ns = s.bpf_ns() as f64 / s.round_trips as f64;
                format!(
                    "{:.2} ({:.1}%)",
                    ns / 1e3,
                    implied_slowdown_percent(ns, unprofiled_round_trip_ns)
                )
            } else {
                dash()
            },
            if timed {
                format!("{:.2}%", 100.0 * s.bpf_ns() as f64 / 1e9 / s.seconds)
            } else {
                dash()
            },
            s.agent_cpu_percent
                .map_or_else(dash, |p| format!("{p:.2}%")),
            s.followed_share
                .map_or_else(dash, |f| format!("{:.1}%", 100.0 * f)),
        );
    }

    let _ = write!(out, "\nPing-pong round trips/s per round:\n\n| round |");
    for config in &CONFIGS {
        let _ = write!(out, " {} |", config.label);
    }
    let _ = write!(out, "\n|---|");
    for _ in &CONFIGS {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    for round in 0..results[BASELINE].len() {
        let _ = write!(out, "| {} |", round + 1);
        for rounds in results {
            match rounds.get(round) {
                Some(r) => {
                    let _ = write!(out, " {:.0} |", r.round_trips_per_second);
                }
                None => out.push_str(" — |"),
            }
        }
        out.push('\n');
    }

    out.push('\n');
    out.push_str(&verdict(
        &summaries[TARGET_CONFIG],
        &summaries[TARGET_CONFIG_TIMED],
        &summaries[FLOOR_CONFIG],
        unprofiled_round_trip_ns,
    ));
    out.push('\n');
    out
}

/// The throughput drop, in %, when each round trip of `round_trip_ns` gets
/// `added_ns` longer.
fn implied_slowdown_percent(added_ns: f64, round_trip_ns: f64) -> f64 {
    100.0 * added_ns / (round_trip_ns + added_ns)
}

/// Whether the default threshold met the target, said plainly, with what
/// the BPF programs alone add to a round trip as a less noisy check, and
/// what hooking the switches costs by itself.
fn verdict(
    target: &Summary,
    timed: &Summary,
    floor: &Summary,
    unprofiled_round_trip_ns: f64,
) -> String {
    let Some((median, low, high)) = target.slowdown_range() else {
        return "Target not evaluated: no slowdown measured.".to_string();
    };
    let rounds = target.slowdowns_percent.len();
    let rounds_below_target = target
        .slowdowns_percent
        .iter()
        .filter(|&&s| s < TARGET_SLOWDOWN_PERCENT)
        .count();
    let mut text = format!(
        "Target (ping-pong throughput drops by less than {TARGET_SLOWDOWN_PERCENT:.0}% with \
         the default threshold, bpf_stats off): **{}**: median slowdown {median:.1}% (per \
         round {low:.1}% … {high:.1}%; {rounds_below_target} of {rounds} rounds below \
         {TARGET_SLOWDOWN_PERCENT:.0}%).",
        if median < TARGET_SLOWDOWN_PERCENT {
            "met"
        } else {
            "not met"
        }
    );
    if timed.round_trips > 0 && timed.switch.runs > 0 {
        let bpf_ns = timed.bpf_ns() as f64 / timed.round_trips as f64;
        let _ = write!(
            text,
            " The BPF programs alone, timed by the kernel, add {:.2} µs to each round trip at \
             the default threshold (an unprofiled one takes {:.2} µs), which by itself means a \
             {:.1}% slowdown.",
            bpf_ns / 1e3,
            unprofiled_round_trip_ns / 1e3,
            implied_slowdown_percent(bpf_ns, unprofiled_round_trip_ns)
        );
    }
    if let Some((floor_median, floor_low, floor_high)) = floor.slowdown_range() {
        let _ = write!(
            text,
            " The same tracepoints with programs that return at once cost {floor_median:.1}% \
             (per round {floor_low:.1}% … {floor_high:.1}%): the floor of hooking every \
             context switch on this machine, before the programs do any work."
        );
    }
    text
}
