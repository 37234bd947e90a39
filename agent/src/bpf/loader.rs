//! Loads the embedded eBPF object, sizes its maps, and attaches the on-CPU
//! program to the CPU clock of every online CPU and, when asked, the
//! off-CPU programs to the scheduler's context switches and system call
//! exits. Dropping the [`Sampler`] detaches everything.

use std::time::{Duration, SystemTime};

use std::sync::mpsc::{Receiver, Sender};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::perf_event::{
    PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
};
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::{BtfTracePoint, PerfEvent};
use aya::{Btf, Ebpf, EbpfLoader};
use aya_obj::btf::BtfKind;
use hearth_ebpf::{
    names, Stat, CONTROL_ACTIVE_WINDOW, CONTROL_OFF_CPU_EPOCH, CONTROL_OFF_CPU_PENDING,
    FILTER_CGROUPS, FILTER_ENTRY_EXCLUDE, FILTER_ENTRY_INCLUDE, FILTER_PIDS,
};

use super::events::{self, EventCounters, EventMaps, EventThread};
use super::{kfunc, map_error, BpfError};
use crate::filter::{FilterHandle, FilterSpec, FilterUpdate};
use crate::incarnation::ProcessEvent;
use crate::metadata::ReadOptions;
use crate::unwind::{self, UnwindMode, UnwindStats, Unwinder};

/// The kernel programs, built by `cargo xtask` and embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("HEARTH_EBPF_OBJECT_PATH"));

/// What the off-CPU programs record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffCpuOptions {
    /// Waits shorter than this many nanoseconds are counted, not recorded.
    pub min_ns: u64,
    /// Share of context switches followed, in (0, 1].
    pub sample_probability: f64,
    /// Followed switch-outs per second per CPU above which fewer are
    /// followed (and their waits scaled up); 0: no cap.
    pub max_rate: u64,
    /// Take waits in system calls at `sys_exit`, as on a kernel without the
    /// `rseq_update` tracepoint, even where it exists: for tests and the
    /// benchmark of that fallback.
    pub force_syscall_exit: bool,
    /// Finish waits through `rseq_update` even where a BPF task work could
    /// (for tests of that path).
    pub force_rseq: bool,
    /// Attach the programs, but have them return at once: the cost of the
    /// tracepoints alone, for the benchmark.
    pub empty_programs: bool,
}

impl Default for OffCpuOptions {
    fn default() -> Self {
        Self {
            min_ns: 1_000_000,
            sample_probability: 1.0,
            max_rate: crate::config::DEFAULT_OFF_CPU_MAX_RATE,
            force_syscall_exit: false,
            force_rseq: false,
            empty_programs: false,
        }
    }
}

impl OffCpuOptions {
    /// The kernel's comparison value for `bpf_get_prandom_u32()`.
    fn sample_below(&self) -> u32 {
        if self.sample_probability >= 1.0 {
            u32::MAX
        } else {
            (self.sample_probability.max(0.0) * f64::from(u32::MAX)) as u32
        }
    }
}

/// How to load and attach the programs.
#[derive(Debug, Clone)]
pub struct SamplerOptions {
    /// On-CPU sampling frequency; 0 attaches no on-CPU sampling.
    pub frequency_hz: u64,
    /// Follow context switches to record off-CPU time.
    pub off_cpu: Option<OffCpuOptions>,
    /// Sample only these processes; empty samples the whole host. Merged
    /// with `filter`'s include pids.
    pub pids: Vec<u32>,
    /// Include/exclude rules (pids, process names, cgroups).
    pub filter: FilterSpec,
    /// Distinct (thread, stack) pairs one window can hold.
    pub max_sample_keys: u32,
    /// Distinct stacks one window can hold: user stacks, and the kernel
    /// stacks of blocked threads.
    pub max_stacks: u32,
    /// Distinct kernel stacks one window can hold.
    pub max_kernel_stacks: u32,
    /// How user stacks are unwound.
    pub unwind: UnwindMode,
    /// Cap on the kernel memory of unwind tables.
    pub unwind_memory: u64,
    /// How long [`Sampler::start`] waits for the tables of the processes
    /// alive then before it starts sampling (they keep loading in the
    /// background after that).
    pub unwind_wait: Duration,
    /// Read each new process image's metadata facts when it is captured
    /// (at its first sample), so processes gone by the drain are still
    /// tagged; `None` leaves them to the drain.
    pub capture_facts: Option<ReadOptions>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            frequency_hz: 19,
            off_cpu: None,
            pids: Vec::new(),
            filter: FilterSpec::default(),
            max_sample_keys: 16 * 1024,
            max_stacks: 8 * 1024,
            max_kernel_stacks: 4 * 1024,
            unwind: UnwindMode::default(),
            unwind_memory: unwind::DEFAULT_TABLE_MEMORY,
            unwind_wait: Duration::ZERO,
            capture_facts: None,
        }
    }
}

/// The loaded and attached programs, and the drain state.
pub struct Sampler {
    pub(super) ebpf: Ebpf,
    pub(super) frequency_hz: u64,
    /// Window the programs write to now (0 or 1).
    pub(super) active_window: u32,
    pub(super) window_start: SystemTime,
    /// Stats totals at the last drain, to report per-window deltas.
    pub(super) stats_seen: [u64; Stat::COUNT as usize],
    /// The last window's stacks, for off-CPU waits counted a window late.
    pub(super) previous_stacks: std::collections::HashMap<u64, super::RawStack>,
    /// One perf event link per CPU; empty once stopped.
    links: Vec<PerfEventLinkId>,
    /// The off-CPU programs loaded (none without off-CPU profiling).
    off_cpu_programs: Vec<&'static str>,
    /// The off-CPU programs' links; empty once stopped.
    off_cpu_links: Vec<(&'static str, BtfTracePointLinkId)>,
    /// Loads unwind tables in the background (`None` with `--unwind fp`).
    pub(super) unwinder: Option<Unwinder>,
    /// Reads the process-event ring buffer and captures new processes.
    events: EventThread,
    /// Its captures and exits, taken by each drain.
    pub(super) process_events: Receiver<ProcessEvent>,
    /// Runtime filter updates, applied by the event thread.
    filter_updates: Sender<FilterUpdate>,
    /// The process-event programs' links (attached for the sampler's life).
    _process_links: Vec<(&'static str, BtfTracePointLinkId)>,
}

impl Sampler {
    /// Loads and attaches; sampling runs from the moment this returns.
    pub fn start(opts: &SamplerOptions) -> Result<Self, BpfError> {
        let mut filter = opts.filter.clone();
        filter.include_pids.extend(&opts.pids);
        let filter_flags = filter.kernel_flags();
        let cgroup_levels = filter.cgroup_levels();
        let mut loader = EbpfLoader::new();
        // The off-CPU programs keep per-thread state in task storage, which
        // aya creates but offers no userspace handle for; none is needed.
        loader.allow_unsupported_maps();
        for name in names::COUNTS {
            loader.map_max_entries(name, opts.max_sample_keys);
        }
        for name in names::STACKS {
            loader.map_max_entries(name, opts.max_stacks);
        }
        for name in names::KERNEL_STACKS {
            loader.map_max_entries(name, opts.max_kernel_stacks);
        }
        // Name rules add a process's pid when it execs: room for many.
        let pid_entries = if filter.has_names() {
            MAX_FILTER_PIDS
        } else {
            filter.include_pids.len() + filter.exclude_pids.len()
        };
        loader.map_max_entries(names::PID_FILTER, pid_entries.max(1) as u32);
        let cgroup_entries = if filter.runtime_cgroups != (false, false) {
            MAX_FILTER_CGROUPS
        } else {
            filter.include_cgroups.len() + filter.exclude_cgroups.len()
        };
        loader.map_max_entries(names::CGROUP_FILTER, cgroup_entries.max(1) as u32);
        loader.override_global(names::FILTER_FLAGS, &filter_flags, true);
        loader.override_global(names::FILTER_CGROUP_LEVELS, &cgroup_levels, true);
        let off_cpu = opts.off_cpu.unwrap_or_default();
        let sample_below = off_cpu.sample_below();
        loader.override_global(names::OFF_CPU_MIN_NS, &off_cpu.min_ns, true);
        loader.override_global(names::OFF_CPU_SAMPLE_BELOW, &sample_below, true);
        let max_rate = off_cpu.max_rate.min(crate::config::MAX_OFF_CPU_MAX_RATE);
        loader.override_global(names::OFF_CPU_MAX_RATE, &max_rate, true);
        // Threads come back through `rseq_update` where the kernel fires it
        // after every switch; `sys_exit`, which runs on every system call,
        // only elsewhere.
        // A wait's user stack is walked when its thread returns to user
        // mode: by a BPF task work queued for the waits worth recording
        // where the kernel has it (6.18 and later), else by `rseq_update`,
        // which runs after every switch, else by `sys_exit`, which runs on
        // every system call.
        let btf = Btf::from_sys_fs().map_err(BpfError::Btf)?;
        let mut object = kfunc::Object::new(EBPF_OBJECT);
        let use_task_work = opts.off_cpu.is_some()
            && !off_cpu.force_syscall_exit
            && !off_cpu.force_rseq
            && btf
                .id_by_type_name_kind(TASK_WORK_KFUNC, BtfKind::Func)
                .is_ok_and(|id| object.link_task_work(id) > 0);
        let use_rseq = opts.off_cpu.is_some()
            && !off_cpu.force_syscall_exit
            && !use_task_work
            && rseq_update_follows_every_switch(&btf);
        let task_work = u8::from(use_task_work);
        loader.override_global(names::OFF_CPU_TASK_WORK, &task_work, true);
        let syscall_exit = u8::from(!use_rseq && !use_task_work);
        loader.override_global(names::OFF_CPU_SYSCALL_EXIT, &syscall_exit, true);
        let empty = u8::from(off_cpu.empty_programs);
        loader.override_global(names::OFF_CPU_EMPTY, &empty, true);
        let tables = u8::from(opts.unwind != UnwindMode::Fp);
        loader.override_global(names::UNWIND_TABLES, &tables, true);
        if tables != 0 {
            let (rows, pages) = unwind::arrays_for_memory(opts.unwind_memory);
            loader.map_max_entries(names::UNWIND_ROWS, rows);
            loader.map_max_entries(names::UNWIND_PAGES, pages);
        }
        let mut ebpf = loader.load(object.as_bytes())?;

        let mut cgroups: Option<BpfHashMap<MapData, u64, u8>> = None;
        if filter_flags & FILTER_CGROUPS != 0 {
            let map = take_map(&mut ebpf, names::CGROUP_FILTER)?;
            let mut map = BpfHashMap::try_from(map).map_err(map_error(names::CGROUP_FILTER))?;
            for (list, bits) in [
                (&filter.include_cgroups, FILTER_ENTRY_INCLUDE),
                (&filter.exclude_cgroups, FILTER_ENTRY_EXCLUDE),
            ] {
                for cgroup in list {
                    let old = map.get(&cgroup.id, 0).unwrap_or(0);
                    map.insert(cgroup.id, old | bits, 0)
                        .map_err(map_error(names::CGROUP_FILTER))?;
                }
            }
            cgroups = Some(map);
        }
        let pids = if filter_flags & FILTER_PIDS != 0 {
            let map = take_map(&mut ebpf, names::PID_FILTER)?;
            Some(BpfHashMap::try_from(map).map_err(map_error(names::PID_FILTER))?)
        } else {
            None
        };
        let ring = RingBuf::try_from(take_map(&mut ebpf, names::PROCESS_EVENTS)?)
            .map_err(map_error(names::PROCESS_EVENTS))?;
        let reported = BpfHashMap::try_from(take_map(&mut ebpf, names::REPORTED_PROCS)?)
            .map_err(map_error(names::REPORTED_PROCS))?;
        let (events_tx, process_events) = std::sync::mpsc::sync_channel(events::MAX_PENDING);
        let (filter_updates, updates_rx) = std::sync::mpsc::channel();
        let events = EventThread::spawn(
            EventMaps {
                ring,
                pids,
                cgroups,
                reported,
            },
            filter,
            opts.capture_facts,
            events_tx,
            updates_rx,
        )
        .map_err(BpfError::Thread)?;
        set_active_window(&mut ebpf, 0)?;

        // Off-CPU records never sample on CPU: the program is then loaded
        // (and verified) only if a frequency is ever set.
        if opts.frequency_hz > 0 {
            on_cpu_program(&mut ebpf)?.load().map_err(program_error)?;
        }
        let mut process_links = Vec::new();
        for (name, tracepoint) in PROCESS_PROGRAMS {
            let program = btf_tracepoint(&mut ebpf, name)?;
            program
                .load(tracepoint, &btf)
                .map_err(program_error_of(name))?;
            let link = program.attach().map_err(program_error_of(name))?;
            process_links.push((name, link));
        }
        let mut off_cpu_programs = Vec::new();
        if opts.off_cpu.is_some() {
            let (exit_name, exit_tracepoint) = if use_rseq {
                OFF_CPU_RSEQ_PROGRAM
            } else {
                OFF_CPU_SYSCALL_EXIT_PROGRAM
            };
            let programs: &[(&str, &str)] = if use_task_work {
                &[OFF_CPU_SWITCH_PROGRAM]
            } else {
                &[OFF_CPU_SWITCH_PROGRAM, (exit_name, exit_tracepoint)]
            };
            for &(name, tracepoint) in programs {
                let program = btf_tracepoint(&mut ebpf, name)?;
                program
                    .load(tracepoint, &btf)
                    .map_err(program_error_of(name))?;
                off_cpu_programs.push(name);
            }
            if !use_rseq && !use_task_work {
                tracing::info!(
                    "waits in system calls are taken at sys_exit (no rseq_update tracepoint \
                     that follows every switch), preempted threads' stacks are walked when \
                     they leave the CPU"
                );
            }
        }
        for (name, program) in ebpf.programs() {
            if let Some(count) = program
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
            {
                tracing::debug!(program = name, verified_instructions = count, "loaded");
            }
        }
        let unwinder = match opts.unwind {
            UnwindMode::Fp => None,
            mode => {
                let unwinder = Unwinder::start(&mut ebpf, mode, opts.pids.clone())?;
                if !opts.unwind_wait.is_zero() && !unwinder.wait_ready(opts.unwind_wait) {
                    tracing::info!(
                        waited = ?opts.unwind_wait,
                        "unwind tables still loading; sampling starts (frame pointers until they are ready)"
                    );
                }
                Some(unwinder)
            }
        };
        let mut sampler = Self {
            unwinder,
            ebpf,
            frequency_hz: opts.frequency_hz,
            active_window: 0,
            window_start: SystemTime::now(),
            stats_seen: [0; Stat::COUNT as usize],
            previous_stacks: Default::default(),
            links: Vec::new(),
            off_cpu_programs,
            off_cpu_links: Vec::new(),
            events,
            process_events,
            filter_updates,
            _process_links: process_links,
        };
        sampler.resume(opts.frequency_hz)?;
        Ok(sampler)
    }

    /// Instructions the verifier processed, per loaded program.
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let count = p.info().ok()?.verified_instruction_count()?;
                Some((name.to_string(), count))
            })
            .collect()
    }

    /// The unwinder's counters (`None` with `--unwind fp`).
    pub fn unwind_stats(&self) -> Option<UnwindStats> {
        self.unwinder.as_ref().map(Unwinder::stats)
    }

    /// Feeds runtime changes into the kernel filter (see
    /// [`FilterHandle`]).
    pub fn filter_handle(&self) -> FilterHandle {
        FilterHandle {
            updates: self.filter_updates.clone(),
        }
    }

    /// Counters of the process-event thread.
    pub fn event_counters(&self) -> &EventCounters {
        &self.events.counters
    }

    /// The off-CPU programs are attached (or were, before [`stop`](Self::stop)).
    pub fn off_cpu(&self) -> bool {
        !self.off_cpu_programs.is_empty()
    }

    /// Attaches the program to every online CPU at `frequency_hz` (after
    /// [`stop`](Self::stop), or to change the frequency: stop, drain,
    /// resume, so each window has one frequency).
    pub fn resume(&mut self, frequency_hz: u64) -> Result<(), BpfError> {
        if !self.links.is_empty() || !self.off_cpu_links.is_empty() {
            self.stop()?;
        }
        if self.off_cpu() {
            // Waits begun before a stop were never finished: their threads
            // were switched back in while nothing was attached.
            self.next_off_cpu_epoch()?;
            for name in self.off_cpu_programs.clone() {
                let link = btf_tracepoint(&mut self.ebpf, name)?
                    .attach()
                    .map_err(program_error_of(name))?;
                self.off_cpu_links.push((name, link));
            }
        }
        self.frequency_hz = frequency_hz;
        if frequency_hz == 0 {
            return Ok(());
        }
        // The CPU clock counts nanoseconds: a fixed period gives exactly
        // `frequency_hz` samples per second of CPU time, with no adaptive
        // period as in frequency mode.
        let period_ns = 1_000_000_000 / frequency_hz.max(1);
        let cpus = aya::util::online_cpus().map_err(|(_, e)| BpfError::Cpus(e))?;
        let program = on_cpu_program(&mut self.ebpf)?;
        if program.fd().is_err() {
            program.load().map_err(program_error)?;
        }
        for cpu in cpus {
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period_ns),
                    false,
                )
                .map_err(program_error)?;
            self.links.push(link);
        }
        Ok(())
    }

    /// Stops sampling on every CPU but keeps the maps, so a final
    /// [`drain`](super::SampleSource::drain) collects everything recorded.
    pub fn stop(&mut self) -> Result<(), BpfError> {
        let program = on_cpu_program(&mut self.ebpf)?;
        for link in self.links.drain(..) {
            program.detach(link).map_err(program_error)?;
        }
        for (name, link) in std::mem::take(&mut self.off_cpu_links) {
            btf_tracepoint(&mut self.ebpf, name)?
                .detach(link)
                .map_err(program_error_of(name))?;
        }
        Ok(())
    }

    /// Starts a new off-CPU epoch: per-thread state the kernel programs
    /// stored under an earlier one is ignored from now on (it lives in task
    /// storage, which userspace cannot list or clear), and the count of
    /// pending waits starts from 0 again.
    fn next_off_cpu_epoch(&mut self) -> Result<(), BpfError> {
        let map = self
            .ebpf
            .map_mut(names::CONTROL)
            .ok_or(BpfError::Missing(names::CONTROL))?;
        let mut control: Array<_, u32> = Array::try_from(map).map_err(map_error(names::CONTROL))?;
        let epoch = control
            .get(&CONTROL_OFF_CPU_EPOCH, 0)
            .map_err(map_error(names::CONTROL))?;
        // 0 means "no wait" in the kernel's state.
        let next = epoch.wrapping_add(1).max(1);
        control
            .set(CONTROL_OFF_CPU_EPOCH, next, 0)
            .map_err(map_error(names::CONTROL))?;
        control
            .set(CONTROL_OFF_CPU_PENDING, 0, 0)
            .map_err(map_error(names::CONTROL))
    }

    /// Woken threads whose wait is recorded at the exit of their system
    /// call, as the kernel programs count them.
    pub fn off_cpu_pending(&self) -> Result<u64, BpfError> {
        let map = self
            .ebpf
            .map(names::CONTROL)
            .ok_or(BpfError::Missing(names::CONTROL))?;
        let control: Array<_, u32> = Array::try_from(map).map_err(map_error(names::CONTROL))?;
        let pending = control
            .get(&CONTROL_OFF_CPU_PENDING, 0)
            .map_err(map_error(names::CONTROL))?;
        Ok(u64::from(pending))
    }

    /// Threads the off-CPU programs count as having a wait started or
    /// pending, summed over the slots of their switch-in gate.
    pub fn off_cpu_gate_held(&self) -> Result<u64, BpfError> {
        let map = self
            .ebpf
            .map(names::OFF_CPU_GATE)
            .ok_or(BpfError::Missing(names::OFF_CPU_GATE))?;
        let gate: Array<_, u32> = Array::try_from(map).map_err(map_error(names::OFF_CPU_GATE))?;
        let mut held = 0;
        for slot in gate.iter() {
            held += u64::from(slot.map_err(map_error(names::OFF_CPU_GATE))?);
        }
        Ok(held)
    }
}

/// The kfunc that queues a BPF task work for a thread's return to user
/// mode (see agent-ebpf's off_cpu.rs).
const TASK_WORK_KFUNC: &str = "bpf_task_work_schedule_resume_impl";

/// The off-CPU programs and the BTF tracepoints they attach to.
const OFF_CPU_SWITCH_PROGRAM: (&str, &str) = (names::OFF_CPU_SWITCH_PROGRAM, "sched_switch");

/// Exec and exit events, attached for the sampler's whole life.
const PROCESS_PROGRAMS: [(&str, &str); 2] = [
    (names::PROCESS_EXEC_PROGRAM, "sched_process_exec"),
    (names::PROCESS_EXIT_PROGRAM, "sched_process_exit"),
];

/// `PID_FILTER` entries with process-name rules (one per matching process).
const MAX_FILTER_PIDS: usize = 16 * 1024;
/// `CGROUP_FILTER` entries when cgroup ids are fed at runtime.
const MAX_FILTER_CGROUPS: usize = 4 * 1024;

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    ebpf.take_map(name).ok_or(BpfError::Missing(name))
}

/// Where the kernel has it, the hook through which threads that were
/// switched out come back to user mode, their stacks readable again.
const OFF_CPU_RSEQ_PROGRAM: (&str, &str) = (names::OFF_CPU_RSEQ_PROGRAM, "rseq_update");

/// Whether `rseq_update` fires each time a thread with restartable
/// sequences returns to user mode after a context switch. It does from its
/// introduction (4.18) through 6.18: every switch-out of such a thread
/// requests the notify-resume work that emits it. The rework of 6.19
/// (`struct rseq_event` in the task) skips the work when the thread's CPU
/// and concurrency ids are unchanged, so waits parked for it could wait
/// forever; there `sys_exit` is used.
fn rseq_update_follows_every_switch(btf: &Btf) -> bool {
    btf.id_by_type_name_kind("btf_trace_rseq_update", BtfKind::Typedef)
        .is_ok()
        && btf
            .id_by_type_name_kind("rseq_event", BtfKind::Struct)
            .is_err()
}

/// Elsewhere: the exit of every system call.
const OFF_CPU_SYSCALL_EXIT_PROGRAM: (&str, &str) =
    (names::OFF_CPU_SYSCALL_EXIT_PROGRAM, "sys_exit");

fn btf_tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut BtfTracePoint, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(program_error_of(name))
}

fn on_cpu_program(ebpf: &mut Ebpf) -> Result<&mut PerfEvent, BpfError> {
    ebpf.program_mut(names::ON_CPU_PROGRAM)
        .ok_or(BpfError::Missing(names::ON_CPU_PROGRAM))?
        .try_into()
        .map_err(program_error)
}

fn program_error(source: aya::programs::ProgramError) -> BpfError {
    program_error_of(names::ON_CPU_PROGRAM)(source)
}

fn program_error_of(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> BpfError {
    move |source| BpfError::Program { name, source }
}

pub(super) fn set_active_window(ebpf: &mut Ebpf, window: u32) -> Result<(), BpfError> {
    let map = ebpf
        .map_mut(names::CONTROL)
        .ok_or(BpfError::Missing(names::CONTROL))?;
    let mut control: Array<_, u32> = Array::try_from(map).map_err(map_error(names::CONTROL))?;
    control
        .set(CONTROL_ACTIVE_WINDOW, window, 0)
        .map_err(map_error(names::CONTROL))
}
