//! Draining the double-buffered window maps.
//!
//! The programs write to the window named in `CONTROL`. A drain flips it,
//! waits for programs that already read the old value to finish (they run
//! with preemption off and take microseconds), then reads and clears the old
//! window's maps, which nothing writes to any more. So no sample is lost
//! and none is counted twice.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aya::maps::{HashMap as BpfHashMap, Map, PerCpuArray, PerCpuHashMap, StackTraceMap};
use hearth_ebpf::{
    names, SampleCount, SampleKey, Stack, Stat, SAMPLE_INVOLUNTARY, SAMPLE_IN_KERNEL,
    SAMPLE_OFF_CPU, STACK_KERNEL, STACK_TRUNCATED,
};

use super::loader::{set_active_window, Sampler};
use super::{map_error, BpfError, SampleSource};
use crate::incarnation::ProcessEvent;

/// Longer than any program run by orders of magnitude.
const FLIP_GRACE: Duration = Duration::from_millis(5);

/// What an off-CPU sample adds to its stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawOffCpu {
    /// Nanoseconds off CPU, summed over the sample's waits.
    pub blocked_ns: u64,
    /// Preempted while runnable, rather than a voluntary wait.
    pub involuntary: bool,
    /// Key into [`RawWindow::stacks`] of the kernel stack the thread
    /// blocked in; 0 when it could not be read.
    pub blocked_stack: u64,
}

/// One distinct (thread, stacks) pair of a window and its sample count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    pub tgid: u32,
    pub tid: u32,
    /// Thread name at sample time.
    pub comm: String,
    /// Key into [`RawWindow::stacks`]; 0 when the thread had no user
    /// stack (a kernel thread).
    pub user_stack: u64,
    /// Key into [`RawWindow::kernel_stacks`]; `None` when the sample
    /// interrupted user mode.
    pub kernel_stack: Option<u32>,
    /// The sample interrupted kernel mode.
    pub in_kernel: bool,
    /// On-CPU samples, or off-CPU waits.
    pub count: u64,
    /// Wall-clock time of the latest of these samples.
    pub last_seen: SystemTime,
    /// The same as `bpf_ktime_get_ns` (CLOCK_MONOTONIC), the clock of
    /// process events: which incarnation of the pid the sample belongs to.
    pub last_seen_ns: u64,
    /// Set for off-CPU samples.
    pub off_cpu: Option<RawOffCpu>,
}

/// A stack as the kernel recorded it: a user stack it walked, or the
/// kernel stack of a blocked thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawStack {
    /// Leaf first: for user stacks the interrupted ip, then return
    /// addresses.
    pub ips: Vec<u64>,
    /// The walk stopped at the depth limit.
    pub truncated: bool,
    /// Kernel addresses.
    pub kernel: bool,
}

/// Kernel-side counters, as deltas over one window (or totals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfStats {
    pub counts: [u64; Stat::COUNT as usize],
}

impl Default for BpfStats {
    fn default() -> Self {
        Self {
            counts: [0; Stat::COUNT as usize],
        }
    }
}

impl BpfStats {
    pub fn get(&self, stat: Stat) -> u64 {
        self.counts[stat as usize]
    }

    pub fn add(&mut self, other: &BpfStats) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
    }

    /// Samples lost entirely (no count recorded).
    pub fn lost(&self) -> u64 {
        self.get(Stat::DropCountsFull) + self.get(Stat::MapLookupFailed)
    }

    /// Off-CPU waits that ended but were not recorded because of a full map
    /// or an inconsistency (not because of the minimum or sampling).
    pub fn off_cpu_lost(&self) -> u64 {
        self.get(Stat::OffCpuPendingReplaced)
            + self.get(Stat::OffCpuDropCountsFull)
            + self.get(Stat::OffCpuPendingStale)
            + self.get(Stat::OffCpuTaskWorkFailed)
    }

    /// (name, value) for every counter.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Stat::ALL.iter().map(|&s| (s.name(), self.get(s)))
    }
}

/// Everything sampled in one window.
#[derive(Debug, Clone)]
pub struct RawWindow {
    pub start: SystemTime,
    pub end: SystemTime,
    pub samples: Vec<RawSample>,
    /// User stacks, and the kernel stacks of blocked threads, by hash.
    pub stacks: HashMap<u64, RawStack>,
    /// Leaf first.
    pub kernel_stacks: HashMap<u32, Vec<u64>>,
    pub stats: BpfStats,
    /// Execs (with what was captured of each process) and exits since the
    /// previous window, in order.
    pub process_events: Vec<ProcessEvent>,
}

impl SampleSource for Sampler {
    fn drain(&mut self) -> Result<RawWindow, BpfError> {
        let drained = self.active_window as usize;
        self.active_window ^= 1;
        set_active_window(&mut self.ebpf, self.active_window)?;
        let end = SystemTime::now();
        std::thread::sleep(FLIP_GRACE);

        let samples = self.take_counts(names::COUNTS[drained])?;
        let mut stacks = self.take_stacks(names::STACKS[drained])?;
        let kernel_stacks = self.take_kernel_stacks(names::KERNEL_STACKS[drained])?;
        let stats = self.stats_delta()?;
        // After the grace: the exec of every process sampled in the window
        // was reported before its samples; its capture is in the channel
        // unless the event thread is still reading it.
        let process_events: Vec<ProcessEvent> = self.process_events.try_iter().collect();
        if self.off_cpu() {
            self.carry_stacks_over(&samples, &mut stacks);
        }
        if let Some(unwinder) = &self.unwinder {
            // Processes first seen now get their tables for the windows
            // to come.
            let mut pids: Vec<u32> = samples.iter().map(|s| s.tgid).collect();
            pids.sort_unstable();
            pids.dedup();
            unwinder.observe(pids);
        }

        let start = std::mem::replace(&mut self.window_start, end);
        Ok(RawWindow {
            start,
            end,
            samples,
            stacks,
            kernel_stacks,
            stats,
            process_events,
        })
    }

    fn frequency_hz(&self) -> u64 {
        self.frequency_hz
    }
}

impl Sampler {
    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, BpfError> {
        self.ebpf.map_mut(name).ok_or(BpfError::Missing(name))
    }

    /// An off-CPU wait can be stored in the window after the one its stacks
    /// went to: the user stack of a preempted thread is walked when it
    /// leaves the CPU, the kernel stack of a blocked one when it comes back,
    /// and the wait is counted later still. Such stacks are taken from the
    /// previous window. Stacks are keyed by content hash, so this cannot
    /// pick a wrong one.
    fn carry_stacks_over(&mut self, samples: &[RawSample], stacks: &mut HashMap<u64, RawStack>) {
        for sample in samples {
            let blocked = sample.off_cpu.map_or(0, |o| o.blocked_stack);
            for hash in [sample.user_stack, blocked] {
                if hash != 0 && !stacks.contains_key(&hash) {
                    if let Some(stack) = self.previous_stacks.get(&hash) {
                        stacks.insert(hash, stack.clone());
                    }
                }
            }
        }
        self.previous_stacks = stacks.clone();
    }

    /// Reads and empties a count map, summing each key's per-CPU counts.
    fn take_counts(&mut self, name: &'static str) -> Result<Vec<RawSample>, BpfError> {
        let mut map: PerCpuHashMap<_, SampleKey, SampleCount> =
            PerCpuHashMap::try_from(self.map_mut(name)?).map_err(map_error(name))?;
        let mut entries = Vec::new();
        for item in map.iter() {
            let (key, per_cpu) = item.map_err(map_error(name))?;
            let count = per_cpu.iter().map(|c| c.count).sum::<u64>();
            let last_seen_ns = per_cpu.iter().map(|c| c.last_seen_ns).max().unwrap_or(0);
            let off_cpu_ns = per_cpu.iter().map(|c| c.off_cpu_ns).sum::<u64>();
            entries.push((key, count, last_seen_ns, off_cpu_ns));
        }
        for (key, ..) in &entries {
            map.remove(key).map_err(map_error(name))?;
        }
        let clock = MonotonicClock::now();
        Ok(entries
            .into_iter()
            .filter(|&(_, count, ..)| count > 0)
            .map(|(key, count, last_seen_ns, off_cpu_ns)| RawSample {
                tgid: key.tgid,
                tid: key.tid,
                comm: thread_name(&key),
                user_stack: key.user_stack,
                kernel_stack: u32::try_from(key.kernel_stack).ok(),
                in_kernel: key.flags & SAMPLE_IN_KERNEL != 0,
                count,
                last_seen: clock.to_wall(last_seen_ns),
                last_seen_ns,
                off_cpu: (key.flags & SAMPLE_OFF_CPU != 0).then_some(RawOffCpu {
                    blocked_ns: off_cpu_ns,
                    involuntary: key.flags & SAMPLE_INVOLUNTARY != 0,
                    blocked_stack: key.blocked_stack,
                }),
            })
            .collect())
    }

    fn take_stacks(&mut self, name: &'static str) -> Result<HashMap<u64, RawStack>, BpfError> {
        let mut map: BpfHashMap<_, u64, Stack> =
            BpfHashMap::try_from(self.map_mut(name)?).map_err(map_error(name))?;
        let mut stacks = HashMap::new();
        for item in map.iter() {
            let (hash, stack) = item.map_err(map_error(name))?;
            let len = (stack.len as usize).min(stack.ips.len());
            stacks.insert(
                hash,
                RawStack {
                    ips: stack.ips[..len].to_vec(),
                    truncated: stack.flags & STACK_TRUNCATED != 0,
                    kernel: stack.flags & STACK_KERNEL != 0,
                },
            );
        }
        for hash in stacks.keys() {
            map.remove(hash).map_err(map_error(name))?;
        }
        Ok(stacks)
    }

    fn take_kernel_stacks(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<u32, Vec<u64>>, BpfError> {
        let mut map = StackTraceMap::try_from(self.map_mut(name)?).map_err(map_error(name))?;
        let mut stacks = HashMap::new();
        for item in map.iter() {
            let (id, trace) = item.map_err(map_error(name))?;
            stacks.insert(id, trace.frames().iter().map(|f| f.ip).collect::<Vec<_>>());
        }
        for id in stacks.keys() {
            map.remove(id).map_err(map_error(name))?;
        }
        Ok(stacks)
    }

    /// Counter deltas since the previous drain.
    fn stats_delta(&mut self) -> Result<BpfStats, BpfError> {
        let name = names::STATS;
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(name).ok_or(BpfError::Missing(name))?)
                .map_err(map_error(name))?;
        let mut delta = BpfStats::default();
        for stat in Stat::ALL {
            let total: u64 = map
                .get(&(stat as u32), 0)
                .map_err(map_error(name))?
                .iter()
                .sum();
            let seen = &mut self.stats_seen[stat as usize];
            delta.counts[stat as usize] = total.saturating_sub(*seen);
            *seen = total;
        }
        Ok(delta)
    }
}

/// The thread's name as the kernel program read it, or, where it left it
/// out (off-CPU waits recorded while another task was current, where
/// copying it would cost the hot path), as /proc has it now; empty if the
/// thread is gone.
fn thread_name(key: &SampleKey) -> String {
    let name = comm_to_string(&key.comm);
    if !name.is_empty() {
        return name;
    }
    std::fs::read_to_string(format!("/proc/{}/task/{}/comm", key.tgid, key.tid))
        .map(|comm| comm.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

fn comm_to_string(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// Converts `bpf_ktime_get_ns` readings (CLOCK_MONOTONIC) to wall-clock
/// time, using both clocks read at one moment.
struct MonotonicClock {
    wall: SystemTime,
    monotonic_ns: u64,
}

impl MonotonicClock {
    fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a local timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Self {
            wall: SystemTime::now(),
            monotonic_ns: (ts.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(ts.tv_nsec as u64),
        }
    }

    fn to_wall(&self, monotonic_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.monotonic_ns.saturating_sub(monotonic_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_nul_and_survives_bad_utf8() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        assert_eq!(comm_to_string(&comm), "bash");
        let full = [b'x'; 16];
        assert_eq!(comm_to_string(&full).len(), 16);
        comm[0] = 0xff;
        assert!(comm_to_string(&comm).ends_with("ash"));
    }

    #[test]
    fn a_name_left_out_by_the_kernel_comes_from_proc() {
        let me = std::process::id();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let expected = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
        let mut key = SampleKey {
            tgid: me,
            tid,
            user_stack: 0,
            blocked_stack: 0,
            kernel_stack: -1,
            flags: 0,
            comm: [0; 16],
        };
        assert_eq!(thread_name(&key), expected.trim_end());
        key.comm[..4].copy_from_slice(b"kept");
        assert_eq!(thread_name(&key), "kept");
        key.comm = [0; 16];
        key.tid = u32::MAX;
        assert_eq!(thread_name(&key), "", "a thread that is gone has no name");
    }

    #[test]
    fn stats_lost_and_add() {
        let mut a = BpfStats::default();
        a.counts[Stat::DropCountsFull as usize] = 2;
        let mut b = BpfStats::default();
        b.counts[Stat::Samples as usize] = 5;
        b.counts[Stat::MapLookupFailed as usize] = 1;
        a.add(&b);
        assert_eq!(a.lost(), 3);
        assert_eq!(a.get(Stat::Samples), 5);
        assert_eq!(a.iter().count(), Stat::COUNT as usize);
    }
}
