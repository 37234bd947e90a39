//! Overhead governor: keeps what profiling costs inside its budget.
//!
//! A continuous profiler runs on every host all the time, so its cost has
//! to stay small and predictable: it must never be the reason a busy host
//! gets slower. Two budgets bound it. The agent's own CPU (% of one core)
//! is what it promises to cost; the host's busy % is when it backs off
//! because the workloads need the CPUs more than anyone needs profiles.
//! Sampling frequency is the one knob: kernel-side work, map sizes and
//! symbolization all scale with it.
//!
//! The policy ([`Governor`]) is pure: observations in, at most one
//! frequency change out, so it can be tested without a kernel or a clock.
//! [`CpuMeter`] produces the observations from `getrusage` and
//! `/proc/stat`. Neither logs; the caller applies and logs changes.
//!
//! The shape of the policy, and why:
//! - Lower at once, by halving, when a budget is crossed: being over budget
//!   is the failure this exists to prevent, and halving reaches the floor
//!   in a few windows from any frequency. A spurious lowering (a burst of
//!   symbolizing a new binary) only costs a few windows at half rate.
//! - Restore slowly, by doubling (capped at the target), only after several
//!   consecutive calm observations, where calm means both budgets hold with
//!   a margin: the agent's CPU *predicted at the doubled frequency* (cost
//!   scales roughly linearly with frequency; the fixed part makes the
//!   prediction pessimistic, which is the safe side) stays well under its
//!   budget, and the host is well under its threshold. A reading between
//!   "calm" and "over" changes nothing, so a load hovering at a threshold
//!   cannot flap the frequency.
//! - When a restore is followed by a lowering within a few windows, it was
//!   a mistake (the cost grew faster than predicted, or the host load
//!   swings); the number of calm observations needed doubles each time, so
//!   repeated mistakes become rare instead of periodic.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::time::{Duration, Instant};

use crate::metrics::process_cpu_time;

/// Consecutive calm observations needed before a step up.
const CALM_OBSERVATIONS: u32 = 3;
/// Upper bound of the calm streak required after failed restores.
const MAX_CALM_OBSERVATIONS: u32 = 48;
/// Observations after a restore during which a lowering counts against it.
const PROBATION_OBSERVATIONS: u32 = 3;
/// A step up must keep the agent's predicted CPU under this share of its
/// budget.
const AGENT_RESTORE_HEADROOM: f64 = 0.8;
/// A step up needs the host under this share of its threshold (76.5% busy
/// for the default 90%): a wide band in which nothing changes.
const HOST_RESTORE_HEADROOM: f64 = 0.85;

/// Budgets and bounds of the governor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GovernorConfig {
    /// The configured frequency: where the governor starts and the most it
    /// restores to.
    pub target_frequency_hz: u64,
    /// The floor: never lowered below this.
    pub min_frequency_hz: u64,
    /// Agent CPU budget, % of one core.
    pub max_cpu_percent: f64,
    /// Host busy % (of all CPUs) above which the frequency is lowered.
    pub max_host_load_percent: f64,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        GovernorConfig {
            target_frequency_hz: 19,
            min_frequency_hz: 1,
            max_cpu_percent: 1.0,
            max_host_load_percent: 90.0,
        }
    }
}

/// CPU use over one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Agent CPU (all threads), % of one core: 250 is two and a half cores.
    pub agent_cpu_percent: f64,
    /// Busy % of all CPUs of the host, not counting the agent itself
    /// ([`CpuMeter`] subtracts it), 0..=100.
    pub host_busy_percent: f64,
}

/// Why the frequency was lowered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// The agent used more CPU than its budget.
    AgentCpu,
    /// The host was busier than its threshold.
    HostLoad,
}

impl fmt::Display for Pressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pressure::AgentCpu => "agent CPU over budget",
            Pressure::HostLoad => "host load over threshold",
        })
    }
}

/// Why the frequency changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeReason {
    Lowered(Pressure),
    /// Calm long enough to step back up towards the target.
    Restored,
}

impl fmt::Display for ChangeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeReason::Lowered(pressure) => write!(f, "lowered: {pressure}"),
            ChangeReason::Restored => f.write_str("restored: calm"),
        }
    }
}

/// A decision to resample at `to_hz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyChange {
    pub from_hz: u64,
    pub to_hz: u64,
    pub reason: ChangeReason,
}

/// The frequency policy. Feed it one [`Observation`] per interval.
#[derive(Debug, Clone)]
pub struct Governor {
    cfg: GovernorConfig,
    frequency_hz: u64,
    /// Consecutive calm observations so far.
    calm_streak: u32,
    /// Calm observations needed for the next step up.
    calm_required: u32,
    /// Observations since the last restore, while it is on probation.
    since_restore: Option<u32>,
}

impl Governor {
    /// Starts at the target frequency. A target of 0 is taken as 1 and the
    /// floor is kept within `1..=target`.
    pub fn new(cfg: GovernorConfig) -> Self {
        let target = cfg.target_frequency_hz.max(1);
        let cfg = GovernorConfig {
            target_frequency_hz: target,
            min_frequency_hz: cfg.min_frequency_hz.clamp(1, target),
            ..cfg
        };
        Governor {
            cfg,
            frequency_hz: target,
            calm_streak: 0,
            calm_required: CALM_OBSERVATIONS,
            since_restore: None,
        }
    }

    /// The frequency to sample at now.
    pub fn frequency_hz(&self) -> u64 {
        self.frequency_hz
    }

    /// Takes one interval's observation; returns the change to apply, if
    /// any (at most one step per call). Observations that are not finite
    /// numbers carry no information and are ignored.
    pub fn observe(&mut self, obs: Observation) -> Option<FrequencyChange> {
        if !obs.agent_cpu_percent.is_finite() || !obs.host_busy_percent.is_finite() {
            return None;
        }

        if let Some(pressure) = self.pressure(&obs) {
            self.calm_streak = 0;
            if self.since_restore.take().is_some() {
                self.calm_required = (self.calm_required * 2).min(MAX_CALM_OBSERVATIONS);
            }
            let to_hz = (self.frequency_hz / 2).max(self.cfg.min_frequency_hz);
            return self.change(to_hz, ChangeReason::Lowered(pressure));
        }

        if let Some(n) = self.since_restore.as_mut() {
            *n += 1;
            if *n >= PROBATION_OBSERVATIONS {
                // The last step up held: stop paying for earlier mistakes.
                self.since_restore = None;
                self.calm_required = CALM_OBSERVATIONS;
            }
        }

        if self.frequency_hz >= self.cfg.target_frequency_hz {
            self.calm_streak = 0;
            return None;
        }
        let to_hz = self
            .frequency_hz
            .saturating_mul(2)
            .min(self.cfg.target_frequency_hz);
        if !self.calm(&obs, to_hz) {
            // Consecutive means consecutive: anything short of calm starts
            // the count again.
            self.calm_streak = 0;
            return None;
        }
        self.calm_streak += 1;
        if self.calm_streak < self.calm_required {
            return None;
        }
        self.calm_streak = 0;
        self.since_restore = Some(0);
        self.change(to_hz, ChangeReason::Restored)
    }

    /// The budget crossed, if any. The agent's own budget is checked first:
    /// it is the promise, and it is the one lowering surely helps.
    ///
    /// The host figure excludes the agent ([`CpuMeter`] subtracts its CPU),
    /// so the agent cannot keep the host "overloaded" by itself and a
    /// lowering for host load is always about the workloads. Even a figure
    /// that includes the agent would only be off by its share, at most its
    /// budget over the CPU count (1 point on one CPU by default), and the
    /// restore margin (13.5 points by default) is far wider than that.
    fn pressure(&self, obs: &Observation) -> Option<Pressure> {
        if obs.agent_cpu_percent > self.cfg.max_cpu_percent {
            Some(Pressure::AgentCpu)
        } else if obs.host_busy_percent > self.cfg.max_host_load_percent {
            Some(Pressure::HostLoad)
        } else {
            None
        }
    }

    /// Whether stepping up to `to_hz` fits both budgets with a margin.
    fn calm(&self, obs: &Observation, to_hz: u64) -> bool {
        let scale = to_hz as f64 / self.frequency_hz.max(1) as f64;
        let predicted_agent = obs.agent_cpu_percent * scale;
        predicted_agent <= self.cfg.max_cpu_percent * AGENT_RESTORE_HEADROOM
            && obs.host_busy_percent <= self.cfg.max_host_load_percent * HOST_RESTORE_HEADROOM
    }

    fn change(&mut self, to_hz: u64, reason: ChangeReason) -> Option<FrequencyChange> {
        let from_hz = self.frequency_hz;
        if to_hz == from_hz {
            return None;
        }
        self.frequency_hz = to_hz;
        Some(FrequencyChange {
            from_hz,
            to_hz,
            reason,
        })
    }
}

/// Busy and total time of all CPUs, in clock ticks (`/proc/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostTimes {
    busy: u64,
    total: u64,
}

/// Measures agent and host CPU use between calls.
#[derive(Debug)]
pub struct CpuMeter {
    at: Instant,
    agent: Duration,
    host: HostTimes,
    ticks_per_second: f64,
}

impl CpuMeter {
    /// Takes the first reading; the first [`observe`](Self::observe)
    /// covers the time since.
    pub fn new() -> io::Result<Self> {
        Ok(CpuMeter {
            at: Instant::now(),
            agent: process_cpu_time()?,
            host: read_host_times()?,
            ticks_per_second: procfs::ticks_per_second().max(1) as f64,
        })
    }

    /// CPU use since the last call (or [`new`](Self::new)).
    pub fn observe(&mut self) -> io::Result<Observation> {
        let at = Instant::now();
        let agent = process_cpu_time()?;
        let host = read_host_times()?;

        let wall = at.saturating_duration_since(self.at).as_secs_f64();
        let agent_delta = agent.saturating_sub(self.agent).as_secs_f64();
        let agent_cpu_percent = if wall > 0.0 {
            agent_delta / wall * 100.0
        } else {
            0.0
        };

        // iowait (in `total`) can go backwards; saturate and clamp.
        let busy = host.busy.saturating_sub(self.host.busy) as f64;
        let total = host.total.saturating_sub(self.host.total) as f64;
        let others = busy - agent_delta * self.ticks_per_second;
        let host_busy_percent = if total > 0.0 {
            (others / total * 100.0).clamp(0.0, 100.0)
        } else {
            0.0
        };

        self.at = at;
        self.agent = agent;
        self.host = host;
        Ok(Observation {
            agent_cpu_percent,
            host_busy_percent,
        })
    }
}

fn read_host_times() -> io::Result<HostTimes> {
    let mut line = String::new();
    BufReader::new(File::open("/proc/stat")?).read_line(&mut line)?;
    parse_host_times(&line).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected first line of /proc/stat: {line:?}"),
        )
    })
}

/// Parses the aggregate `cpu` line of `/proc/stat`: user nice system idle
/// iowait irq softirq steal guest guest_nice. Guest time is already part
/// of user and nice, so it is not added again. Busy is everything but idle
/// and iowait (a CPU waiting for I/O is free to run something else).
fn parse_host_times(line: &str) -> Option<HostTimes> {
    let mut fields = line.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let mut ticks = [0u64; 8];
    let mut count = 0;
    for (slot, field) in ticks.iter_mut().zip(fields) {
        *slot = field.parse().ok()?;
        count += 1;
    }
    if count < 4 {
        return None;
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks;
    let busy = user + nice + system + irq + softirq + steal;
    Some(HostTimes {
        busy,
        total: busy + idle + iowait,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GovernorConfig {
        GovernorConfig {
            target_frequency_hz: 19,
            min_frequency_hz: 1,
            max_cpu_percent: 1.0,
            max_host_load_percent: 90.0,
        }
    }

    fn obs(agent_cpu_percent: f64, host_busy_percent: f64) -> Observation {
        Observation {
            agent_cpu_percent,
            host_busy_percent,
        }
    }

    const CALM: Observation = Observation {
        agent_cpu_percent: 0.01,
        host_busy_percent: 10.0,
    };

    fn lowered(from_hz: u64, to_hz: u64, pressure: Pressure) -> Option<FrequencyChange> {
        Some(FrequencyChange {
            from_hz,
            to_hz,
            reason: ChangeReason::Lowered(pressure),
        })
    }

    fn restored(from_hz: u64, to_hz: u64) -> Option<FrequencyChange> {
        Some(FrequencyChange {
            from_hz,
            to_hz,
            reason: ChangeReason::Restored,
        })
    }

    /// Drives the governor to its floor.
    fn at_floor() -> Governor {
        let mut g = Governor::new(cfg());
        while g.observe(obs(5.0, 10.0)).is_some() {}
        assert_eq!(g.frequency_hz(), 1);
        g
    }

    #[test]
    fn lowers_under_agent_cpu_pressure_down_to_the_floor() {
        let mut g = Governor::new(cfg());
        assert_eq!(g.frequency_hz(), 19);
        let over = obs(1.5, 10.0);
        assert_eq!(g.observe(over), lowered(19, 9, Pressure::AgentCpu));
        assert_eq!(g.observe(over), lowered(9, 4, Pressure::AgentCpu));
        assert_eq!(g.observe(over), lowered(4, 2, Pressure::AgentCpu));
        assert_eq!(g.observe(over), lowered(2, 1, Pressure::AgentCpu));
        for _ in 0..10 {
            assert_eq!(g.observe(over), None);
        }
        assert_eq!(g.frequency_hz(), 1);
    }

    #[test]
    fn lowers_under_host_load_down_to_the_floor() {
        let mut g = Governor::new(GovernorConfig {
            min_frequency_hz: 3,
            ..cfg()
        });
        let busy = obs(0.1, 97.0);
        assert_eq!(g.observe(busy), lowered(19, 9, Pressure::HostLoad));
        assert_eq!(g.observe(busy), lowered(9, 4, Pressure::HostLoad));
        assert_eq!(g.observe(busy), lowered(4, 3, Pressure::HostLoad));
        for _ in 0..10 {
            assert_eq!(g.observe(busy), None);
        }
        assert_eq!(g.frequency_hz(), 3);
    }

    #[test]
    fn agent_budget_is_named_first_when_both_are_crossed() {
        let mut g = Governor::new(cfg());
        assert_eq!(
            g.observe(obs(2.0, 99.0)),
            lowered(19, 9, Pressure::AgentCpu)
        );
    }

    #[test]
    fn restores_after_calm_periods_up_to_the_target() {
        let mut g = at_floor();
        let mut changes = Vec::new();
        for _ in 0..100 {
            changes.push(g.observe(CALM));
        }
        let expected_steps = [(1, 2), (2, 4), (4, 8), (8, 16), (16, 19)];
        for (i, (from, to)) in expected_steps.into_iter().enumerate() {
            // Exactly CALM_OBSERVATIONS per step: the last one changes.
            let step = i * CALM_OBSERVATIONS as usize;
            for quiet in &changes[step..step + CALM_OBSERVATIONS as usize - 1] {
                assert_eq!(*quiet, None);
            }
            assert_eq!(
                changes[step + CALM_OBSERVATIONS as usize - 1],
                restored(from, to)
            );
        }
        let done = expected_steps.len() * CALM_OBSERVATIONS as usize;
        assert!(changes[done..].iter().all(Option::is_none));
        assert_eq!(g.frequency_hz(), 19);
    }

    #[test]
    fn a_non_calm_observation_restarts_the_count() {
        let mut g = at_floor();
        assert_eq!(g.observe(CALM), None);
        assert_eq!(g.observe(CALM), None);
        // Under both budgets, but not by the margin.
        assert_eq!(g.observe(obs(0.01, 85.0)), None);
        assert_eq!(g.observe(CALM), None);
        assert_eq!(g.observe(CALM), None);
        assert_eq!(g.observe(CALM), restored(1, 2));
    }

    #[test]
    fn restores_only_when_the_predicted_cpu_fits_the_budget() {
        let mut g = Governor::new(cfg());
        assert_eq!(
            g.observe(obs(1.2, 10.0)),
            lowered(19, 9, Pressure::AgentCpu)
        );
        // 0.5% at 9 Hz predicts 1.0% at 18 Hz: over 80% of the budget.
        for _ in 0..50 {
            assert_eq!(g.observe(obs(0.5, 10.0)), None);
        }
        // 0.4% predicts 0.8%: fits.
        assert_eq!(g.observe(obs(0.4, 10.0)), None);
        assert_eq!(g.observe(obs(0.4, 10.0)), None);
        assert_eq!(g.observe(obs(0.4, 10.0)), restored(9, 18));
    }

    #[test]
    fn host_just_under_the_threshold_is_not_calm() {
        let mut g = at_floor();
        for _ in 0..50 {
            assert_eq!(g.observe(obs(0.01, 80.0)), None);
        }
        assert_eq!(g.frequency_hz(), 1);
    }

    /// Host load alternating slightly above and below the threshold: the
    /// frequency only goes down, and never changes on consecutive windows
    /// in opposite directions.
    #[test]
    fn no_flapping_around_the_host_threshold() {
        let mut g = Governor::new(cfg());
        let mut restores = 0;
        for i in 0..100 {
            let host = if i % 2 == 0 { 91.0 } else { 89.0 };
            if let Some(change) = g.observe(obs(0.1, host)) {
                assert!(change.to_hz < change.from_hz, "{change:?}");
                restores += usize::from(change.reason == ChangeReason::Restored);
            }
        }
        assert_eq!(restores, 0);
    }

    /// An agent whose cost scales with frequency and reads slightly above,
    /// then noisily around, its budget: one step down, then it stays.
    #[test]
    fn no_flapping_around_the_agent_budget() {
        let mut g = Governor::new(cfg());
        let mut changes = Vec::new();
        for i in 0..100 {
            let noise = if i % 2 == 0 { 1.05 } else { 0.95 };
            let cpu = 1.02 * g.frequency_hz() as f64 / 19.0 * noise;
            if let Some(change) = g.observe(obs(cpu, 10.0)) {
                changes.push(change);
            }
        }
        assert_eq!(changes, [lowered(19, 9, Pressure::AgentCpu).unwrap()]);
    }

    /// A cost that grows faster than the linear prediction: each step back
    /// up fails. The retries back off instead of repeating every few
    /// windows.
    #[test]
    fn failed_restores_back_off() {
        let mut g = Governor::new(cfg());
        let cost = |hz: u64| if hz <= 9 { 0.3 } else { 1.5 };
        let mut restore_windows = Vec::new();
        let mut changes = 0;
        for i in 0..300 {
            if let Some(change) = g.observe(obs(cost(g.frequency_hz()), 10.0)) {
                changes += 1;
                if change.reason == ChangeReason::Restored {
                    assert_eq!((change.from_hz, change.to_hz), (9, 18));
                    restore_windows.push(i);
                }
            }
        }
        let gaps: Vec<_> = restore_windows.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|w| w[0] <= w[1]), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&(MAX_CALM_OBSERVATIONS as usize + 1)));
        // Without backoff: a lowering and a restore every 4 windows.
        assert!(changes < 30, "{changes} changes");
    }

    #[test]
    fn a_restore_that_holds_resets_the_backoff() {
        let mut g = Governor::new(cfg());
        // Fail a restore once: 6 calm observations needed next.
        assert_eq!(
            g.observe(obs(2.0, 10.0)),
            lowered(19, 9, Pressure::AgentCpu)
        );
        for _ in 0..2 {
            assert_eq!(g.observe(CALM), None);
        }
        assert_eq!(g.observe(CALM), restored(9, 18));
        assert_eq!(
            g.observe(obs(2.0, 10.0)),
            lowered(18, 9, Pressure::AgentCpu)
        );
        for _ in 0..5 {
            assert_eq!(g.observe(CALM), None);
        }
        assert_eq!(g.observe(CALM), restored(9, 18));
        // Survive probation (under budget, but too close to step up), then
        // fail later: back to the normal streak.
        for _ in 0..PROBATION_OBSERVATIONS {
            assert_eq!(g.observe(obs(0.9, 10.0)), None);
        }
        assert_eq!(
            g.observe(obs(2.0, 10.0)),
            lowered(18, 9, Pressure::AgentCpu)
        );
        for _ in 0..2 {
            assert_eq!(g.observe(CALM), None);
        }
        assert_eq!(g.observe(CALM), restored(9, 18));
    }

    #[test]
    fn config_is_normalized() {
        let g = Governor::new(GovernorConfig {
            target_frequency_hz: 0,
            min_frequency_hz: 0,
            ..cfg()
        });
        assert_eq!(g.frequency_hz(), 1);
        let mut g = Governor::new(GovernorConfig {
            target_frequency_hz: 10,
            min_frequency_hz: 50,
            ..cfg()
        });
        assert_eq!(g.observe(obs(50.0, 99.0)), None);
        assert_eq!(g.frequency_hz(), 10);
    }

    #[test]
    fn non_finite_observations_are_ignored() {
        let mut g = Governor::new(cfg());
        assert_eq!(g.observe(obs(f64::NAN, 99.0)), None);
        assert_eq!(g.observe(obs(f64::INFINITY, 10.0)), None);
        assert_eq!(g.frequency_hz(), 19);
    }

    #[test]
    fn parses_the_cpu_line_of_proc_stat() {
        assert_eq!(
            parse_host_times("cpu  100 5 50 1000 20 3 2 1 40 0\n"),
            Some(HostTimes {
                busy: 161,
                total: 1181
            })
        );
        // Old kernels have fewer columns.
        assert_eq!(
            parse_host_times("cpu 1 2 3 4"),
            Some(HostTimes { busy: 6, total: 10 })
        );
        assert_eq!(parse_host_times("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_host_times("cpu 1 2"), None);
        assert_eq!(parse_host_times("cpu 1 x 3 4"), None);
    }

    #[test]
    fn cpu_meter_reports_sane_numbers() {
        let online_cpus = std::fs::read_to_string("/proc/stat")
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count() as f64;
        let mut meter = CpuMeter::new().unwrap();

        // Burn at least 100 ms of CPU (bounded in wall time on a busy box).
        let start = process_cpu_time().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while process_cpu_time().unwrap() - start < Duration::from_millis(100)
            && Instant::now() < deadline
        {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }

        let o = meter.observe().unwrap();
        // Other test threads of this process count too, so up to every CPU.
        // The kernel brings a running thread's CPU time up to date only at
        // its next tick or switch, so a busy thread on another CPU can be
        // counted a few ms late at the first reading and early at the
        // second: allow a quarter over. A unit mistake (ticks, µs) is far
        // outside this.
        assert!(
            o.agent_cpu_percent > 0.0 && o.agent_cpu_percent <= 125.0 * online_cpus + 5.0,
            "{o:?}"
        );
        assert!((0.0..=100.0).contains(&o.host_busy_percent), "{o:?}");

        // An immediate second reading covers almost no time: still sane.
        let o = meter.observe().unwrap();
        assert!(o.agent_cpu_percent >= 0.0, "{o:?}");
        assert!((0.0..=100.0).contains(&o.host_busy_percent), "{o:?}");
    }
}
