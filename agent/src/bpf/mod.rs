//! The kernel side seen from userspace: preflight checks, loading and
//! attaching the embedded programs, and draining their maps into
//! [`RawWindow`]s.
//!
//! [`SampleSource`] is the boundary the rest of the pipeline sees, so it can
//! be fed a fake in tests.

mod drain;
mod events;
mod kfunc;
mod loader;
mod preflight;

pub use drain::{BpfStats, RawOffCpu, RawSample, RawStack, RawWindow};
pub use events::EventCounters;
pub use hearth_ebpf::Stat;
pub use loader::{OffCpuOptions, Sampler, SamplerOptions};
pub use preflight::{check_btf, check_privileges};

/// Why the kernel side could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The process lacks capabilities it needs; names each and what it is
    /// for.
    #[error(transparent)]
    Privileges(#[from] crate::caps::MissingCapabilities),
    /// The kernel exposes no BTF (`/sys/kernel/btf/vmlinux`).
    #[error(
        "this kernel has no BTF ({path} is missing): hearth needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux 5.8+ distributions ship it)"
    )]
    NoBtf { path: String },
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading the kernel's BTF: {0}")]
    Btf(#[source] aya::BtfError),
    #[error("reading the online CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("starting the process-event thread: {0}")]
    Thread(std::io::Error),
    #[error("unwind tables: {0}")]
    Unwind(#[from] crate::unwind::UnwindError),
}

/// Where windows of raw samples come from: the real kernel maps, or a fake
/// in tests.
pub trait SampleSource {
    /// Returns everything sampled since the previous call. Never returns a
    /// sample twice, never loses one that was recorded.
    fn drain(&mut self) -> Result<RawWindow, BpfError>;

    /// Sampling frequency in use.
    fn frequency_hz(&self) -> u64;
}

/// Adapter for `map_err` on aya map operations.
fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// These load the real programs: they need root and BPF (as CI has), and
/// fail, never skip, without them.
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use hearth_ebpf::Stat;

    use super::*;

    /// Burns `d` of this thread's CPU time (not wall time: on a loaded
    /// host the thread gets less than a whole CPU, and samples follow CPU
    /// time), giving up after 20 times `d` of wall time.
    fn burn(d: Duration) {
        let cpu_time = || {
            // SAFETY: a valid clock id and a zeroed timespec to write into.
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        };
        let end = cpu_time() + d;
        let give_up = Instant::now() + d * 20;
        let mut x = 1u64;
        while cpu_time() < end && Instant::now() < give_up {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    }

    /// Every sample the program recorded shows up in exactly one drained
    /// window: nothing lost or double-counted across flips.
    #[test]
    fn drains_account_for_every_recorded_sample() {
        let mut sampler = Sampler::start(&SamplerOptions {
            frequency_hz: 997,
            ..SamplerOptions::default()
        })
        .expect("loading the eBPF programs (needs root and BPF)");
        let mut counted = 0u64;
        let mut stats = BpfStats::default();
        for round in 0..7 {
            if round < 6 {
                burn(Duration::from_millis(150));
            } else {
                // The last window: stop first, so nothing arrives after it.
                sampler.stop().unwrap();
            }
            let window = sampler.drain().unwrap();
            counted += window.samples.iter().map(|s| s.count).sum::<u64>();
            stats.add(&window.stats);
            for s in &window.samples {
                if s.user_stack != 0 {
                    assert!(window.stacks.contains_key(&s.user_stack));
                }
                if let Some(id) = s.kernel_stack {
                    assert!(window.kernel_stacks.contains_key(&id));
                }
                // Last-seen times fall inside the window (clock conversion
                // error is microseconds; allow a little).
                let slack = Duration::from_millis(20);
                assert!(
                    s.last_seen + slack >= window.start && s.last_seen <= window.end + slack,
                    "last seen {:?} outside {:?}..{:?}",
                    s.last_seen,
                    window.start,
                    window.end
                );
            }
        }
        drop(sampler);
        assert!(stats.get(Stat::Recorded) > 100, "{stats:?}");
        assert_eq!(counted, stats.get(Stat::Recorded), "{stats:?}");
        assert_eq!(
            stats.get(Stat::Samples),
            stats.get(Stat::Idle)
                + stats.get(Stat::Filtered)
                + stats.get(Stat::Recorded)
                + stats.lost(),
            "every sample is accounted for: {stats:?}"
        );
    }

    /// Changing the frequency between windows (stop, drain, resume) keeps
    /// sampling at the new rate.
    #[test]
    fn resume_changes_the_frequency() {
        let me = std::process::id();
        let mut sampler = Sampler::start(&SamplerOptions {
            frequency_hz: 997,
            pids: vec![me],
            ..SamplerOptions::default()
        })
        .expect("loading the eBPF programs (needs root and BPF)");
        let own = |sampler: &mut Sampler| {
            burn(Duration::from_millis(400));
            sampler.stop().unwrap();
            let window = sampler.drain().unwrap();
            window.samples.iter().map(|s| s.count).sum::<u64>()
        };
        let fast = own(&mut sampler);
        sampler.resume(97).unwrap();
        assert_eq!(sampler.frequency_hz(), 97);
        let slow = own(&mut sampler);
        // 400 ms of CPU: about 400 vs 40 samples.
        assert!(fast > 250, "{fast} samples at 997 Hz");
        assert!(
            slow > 10 && slow * 4 < fast,
            "{slow} at 97 Hz vs {fast} at 997 Hz"
        );
    }

    /// With a pid filter only that process is recorded, and the others are
    /// counted as filtered without any stack work.
    #[test]
    fn pid_filter_records_only_that_process() {
        let me = std::process::id();
        let mut sampler = Sampler::start(&SamplerOptions {
            frequency_hz: 997,
            pids: vec![me],
            ..SamplerOptions::default()
        })
        .expect("loading the eBPF programs (needs root and BPF)");
        burn(Duration::from_millis(300));
        let window = sampler.drain().unwrap();
        assert!(!window.samples.is_empty());
        assert!(window.samples.iter().all(|s| s.tgid == me));
        let own: u64 = window.samples.iter().map(|s| s.count).sum();
        // 300 ms at 997 Hz on one CPU: about 300 samples.
        assert!(own > 200, "{own} samples of our own process");
        assert!(window.stacks.values().all(|s| !s.ips.is_empty()));
    }

    fn sleeper(rounds: u32, each: Duration) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            for _ in 0..rounds {
                std::thread::sleep(each);
            }
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() as u32 }
        })
    }

    /// The programs load (the verifier accepts them) with the largest
    /// unwind table memory accepted and the off-CPU programs too; the
    /// table walker's per-frame steps are `bpf_loop` callbacks, so what
    /// the verifier checks does not grow with table sizes. This test
    /// process (a Rust build without frame pointers) is then walked with
    /// tables, deeper than frame pointers get.
    #[test]
    fn programs_load_with_the_largest_unwind_tables() {
        use crate::unwind::{UnwindMode, MAX_TABLE_MEMORY};
        // With tables, waits finished at rseq_update; with frame pointers,
        // the off-CPU programs of kernels without the rseq_update
        // tracepoint (the task-work path is checked by the other tests).
        let start = |unwind| {
            Sampler::start(&SamplerOptions {
                frequency_hz: 997,
                off_cpu: Some(OffCpuOptions {
                    force_syscall_exit: unwind == UnwindMode::Fp,
                    force_rseq: unwind == UnwindMode::Dwarf,
                    ..OffCpuOptions::default()
                }),
                pids: vec![std::process::id()],
                unwind,
                unwind_memory: MAX_TABLE_MEMORY,
                unwind_wait: Duration::from_secs(10),
                ..SamplerOptions::default()
            })
            .expect("loading the eBPF programs (needs root and BPF)")
        };
        let mut depths = Vec::new();
        for unwind in [UnwindMode::Dwarf, UnwindMode::Fp] {
            let mut sampler = start(unwind);
            let verified = sampler.verified_instructions();
            eprintln!("{unwind}: verified instructions {verified:?}");
            let loaded: Vec<&str> = verified.iter().map(|(name, _)| name.as_str()).collect();
            // The rseq_update program loads where the kernel has it,
            // sys_exit's where it does not.
            let return_program = if unwind == UnwindMode::Fp {
                hearth_ebpf::names::OFF_CPU_SYSCALL_EXIT_PROGRAM
            } else if loaded.contains(&hearth_ebpf::names::OFF_CPU_RSEQ_PROGRAM) {
                hearth_ebpf::names::OFF_CPU_RSEQ_PROGRAM
            } else {
                hearth_ebpf::names::OFF_CPU_SYSCALL_EXIT_PROGRAM
            };
            for required in [
                hearth_ebpf::names::ON_CPU_PROGRAM,
                hearth_ebpf::names::OFF_CPU_SWITCH_PROGRAM,
                return_program,
            ] {
                assert!(loaded.contains(&required), "{verified:?}");
            }
            // The verifier's limit is 1 M instructions; a program that comes
            // within a few times of it here can fail on a kernel whose
            // verifier prunes less (these took 36 k to 72 k when written).
            assert!(
                verified.iter().all(|&(_, n)| n > 0 && n < 300_000),
                "{verified:?}"
            );
            if unwind == UnwindMode::Dwarf {
                let u = sampler.unwind_stats().unwrap();
                // Rows and page indexes share the cap (up to rounding).
                assert!(u.capacity_bytes <= MAX_TABLE_MEMORY);
                assert!(u.capacity_bytes > MAX_TABLE_MEMORY - 64, "{u:?}");
                assert_eq!(u.processes_loaded, 1, "{u:?}");
            } else {
                assert!(sampler.unwind_stats().is_none());
            }
            burn(Duration::from_millis(300));
            sampler.stop().unwrap();
            let window = sampler.drain().unwrap();
            let walks = window.stats.get(Stat::UnwindTableWalks);
            match unwind {
                UnwindMode::Fp => assert_eq!(walks, 0),
                _ => assert!(walks > 0, "{:?}", window.stats),
            }
            let me = std::process::id();
            let (frames, samples) = window
                .samples
                .iter()
                .filter(|s| s.tgid == me && s.user_stack != 0)
                .fold((0, 0), |(f, n), s| {
                    (
                        f + s.count as usize * window.stacks[&s.user_stack].ips.len(),
                        n + s.count,
                    )
                });
            assert!(samples > 50, "{samples} samples");
            depths.push(frames as f64 / samples as f64);
        }
        eprintln!(
            "mean user stack depth: dwarf {:.1}, fp {:.1}",
            depths[0], depths[1]
        );
        assert!(depths[0] > depths[1] + 3.0, "{depths:?}");
    }

    /// Waits recorded for thread `tid` in `window`, and their nanoseconds.
    fn thread_off_cpu(window: &RawWindow, tid: u32) -> (u64, u64) {
        window
            .samples
            .iter()
            .filter(|s| s.tid == tid)
            .filter_map(|s| s.off_cpu.map(|o| (s.count, o.blocked_ns)))
            .fold((0, 0), |(n, ns), (c, b)| (n + c, ns + b))
    }

    /// Every switch-out has exactly one outcome.
    fn assert_switch_outs_accounted_for(st: &BpfStats) {
        assert_eq!(
            st.get(Stat::OffCpuSwitches),
            st.get(Stat::OffCpuIdle)
                + st.get(Stat::OffCpuExiting)
                + st.get(Stat::OffCpuFiltered)
                + st.get(Stat::OffCpuUnsampled)
                + st.get(Stat::OffCpuStarted)
                + st.get(Stat::OffCpuNoThreadStorage),
            "every switch-out is accounted for: {st:?}"
        );
    }

    /// How the off-CPU programs finish a wait on its thread's return to
    /// user mode.
    #[derive(Clone, Copy, PartialEq)]
    enum ReturnPath {
        /// The kernel's best: a BPF task work where it has the kfunc.
        Auto,
        /// `rseq_update`, as on kernels before 6.18.
        Rseq,
        /// `sys_exit`, as on kernels without the `rseq_update` tracepoint.
        SyscallExit,
    }

    fn off_cpu_sampler(min: Duration, sample_probability: f64) -> Sampler {
        off_cpu_sampler_with(min, sample_probability, ReturnPath::Auto)
    }

    fn off_cpu_sampler_with(min: Duration, sample_probability: f64, path: ReturnPath) -> Sampler {
        off_cpu_sampler_capped(min, sample_probability, 0, path)
    }

    /// Off-CPU programs for this process only. `max_rate` 0: no rate cap,
    /// so the tests of the other controls see every switch.
    fn off_cpu_sampler_capped(
        min: Duration,
        sample_probability: f64,
        max_rate: u64,
        path: ReturnPath,
    ) -> Sampler {
        Sampler::start(&SamplerOptions {
            frequency_hz: 0,
            off_cpu: Some(OffCpuOptions {
                min_ns: min.as_nanos() as u64,
                sample_probability,
                max_rate,
                force_syscall_exit: path == ReturnPath::SyscallExit,
                force_rseq: path == ReturnPath::Rseq,
                ..OffCpuOptions::default()
            }),
            pids: vec![std::process::id()],
            ..SamplerOptions::default()
        })
        .expect("loading the eBPF programs (needs root and BPF)")
    }

    /// The benchmark's floor: the programs attach, and count and record
    /// nothing.
    #[test]
    fn empty_off_cpu_programs_record_nothing() {
        let mut sampler = Sampler::start(&SamplerOptions {
            frequency_hz: 0,
            off_cpu: Some(OffCpuOptions {
                min_ns: 0,
                max_rate: 0,
                empty_programs: true,
                ..OffCpuOptions::default()
            }),
            pids: vec![std::process::id()],
            ..SamplerOptions::default()
        })
        .expect("loading the eBPF programs (needs root and BPF)");
        assert!(sampler.off_cpu(), "the off-CPU programs are loaded");
        sleeper(20, Duration::from_millis(2)).join().unwrap();
        let window = sampler.drain().unwrap();
        assert_eq!(
            window.stats.get(Stat::OffCpuSwitches),
            0,
            "{:?}",
            window.stats
        );
        assert!(window.samples.is_empty());
    }

    /// A thread with a wait started holds a count in the switch-in gate
    /// (the switch-in of a thread without one skips its storage), and gives
    /// it back once the wait is recorded or the thread exits.
    #[test]
    fn off_cpu_gate_counts_waiting_threads_and_gives_them_back() {
        const THREADS: u64 = 40;
        let mut sampler = off_cpu_sampler(Duration::from_millis(1), 1.0);
        let threads_alive = || std::fs::read_dir("/proc/self/task").unwrap().count() as u64;
        let sleepers: Vec<_> = (0..THREADS)
            .map(|_| sleeper(1, Duration::from_millis(400)))
            .collect();
        std::thread::sleep(Duration::from_millis(150));
        let held_while_asleep = sampler.off_cpu_gate_held().unwrap();
        for sleeper in sleepers {
            sleeper.join().unwrap();
        }
        let alive_before = threads_alive();
        let held_after = sampler.off_cpu_gate_held().unwrap();
        let alive = alive_before.max(threads_alive());
        // Other tests' threads of this process are followed too: each holds
        // at most one count.
        assert!(
            held_while_asleep >= THREADS,
            "{held_while_asleep} held while {THREADS} threads slept"
        );
        assert!(
            held_after <= alive,
            "{held_after} held after the sleepers exited, {alive} threads alive"
        );
        assert_switch_outs_accounted_for(&sampler.drain().unwrap().stats);
    }

    /// Every followed switch is accounted for: short waits are counted and
    /// not recorded, long ones are recorded with their time, and the
    /// counters add up with what is still in flight. Waits in system calls
    /// are finished the kernel's best way (a BPF task work on 6.18+).
    #[test]
    fn off_cpu_counters_add_up_and_the_minimum_applies() {
        check_off_cpu_counters(ReturnPath::Auto);
    }

    /// The same where waits are finished at `rseq_update`, as on kernels
    /// without BPF task works.
    #[test]
    fn off_cpu_counters_add_up_through_rseq_update() {
        check_off_cpu_counters(ReturnPath::Rseq);
    }

    /// The same where waits in system calls are taken at `sys_exit`, as on
    /// kernels without the `rseq_update` tracepoint.
    #[test]
    fn off_cpu_counters_add_up_with_the_syscall_exit_fallback() {
        check_off_cpu_counters(ReturnPath::SyscallExit);
    }

    fn check_off_cpu_counters(path: ReturnPath) {
        let mut sampler = off_cpu_sampler_with(Duration::from_millis(10), 1.0, path);
        let short = sleeper(40, Duration::from_millis(2));
        let long = sleeper(15, Duration::from_millis(20));
        let (short, long) = (short.join().unwrap(), long.join().unwrap());
        // Threads of the test harness (other tests run in parallel) may be
        // off CPU at the stop and exit right after: count every thread
        // alive just before or just after it.
        let tids = || -> std::collections::HashSet<String> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        };
        let before_stop = tids();
        sampler.stop().unwrap();
        let alive_at_stop = before_stop.union(&tids()).count() as u64;
        let window = sampler.drain().unwrap();
        let in_pending = sampler.off_cpu_pending().unwrap();
        let st = window.stats;
        assert_switch_outs_accounted_for(&st);
        // Every followed thread woke, or is off CPU still: at most one wait
        // per thread of this process (the pid filter) is open at the stop.
        let started = st.get(Stat::OffCpuStarted);
        let woken = st.get(Stat::OffCpuWoken) + st.get(Stat::OffCpuStartStale);
        let threads = alive_at_stop;
        assert!(
            woken <= started && started - woken <= threads,
            "{started} started, {woken} woke, {threads} threads: {st:?}"
        );
        assert_eq!(
            st.get(Stat::OffCpuWoken),
            st.get(Stat::OffCpuBelowMin)
                + st.get(Stat::OffCpuRecorded)
                + st.get(Stat::OffCpuPendingMerged)
                + st.off_cpu_lost()
                + in_pending,
            "every wake-up is skipped, recorded, lost or pending: {st:?}"
        );
        assert!(st.get(Stat::OffCpuBelowMin) >= 40, "{st:?}");
        let blocked = |tid: u32| thread_off_cpu(&window, tid);
        // A 2 ms sleep is under the 10 ms minimum, unless a busy machine
        // keeps the woken thread off CPU past it: then the wait really was
        // that long. Every recorded wait is at least the minimum.
        let (short_waits, short_ns) = blocked(short);
        assert!(
            short_waits <= 4 && short_ns >= short_waits * 10_000_000,
            "2 ms waits recorded: {short_waits} waits, {short_ns} ns: {st:?}"
        );
        // 15 sleeps; on a loaded machine one may come back preempted for
        // longer than the minimum (one more wait), or block again inside
        // the same call before its first wait is recorded (merged).
        let (waits, ns) = blocked(long);
        assert!((14..=16).contains(&waits), "{waits} waits of 15: {st:?}");
        let ms = ns / 1_000_000;
        assert!(
            (300..=400).contains(&ms),
            "15 sleeps of 20 ms recorded as {ms} ms"
        );
        for sample in window.samples.iter().filter(|s| s.tid == long) {
            let wait = sample.off_cpu.unwrap();
            assert!(!wait.involuntary);
            let kernel = window
                .stacks
                .get(&wait.blocked_stack)
                .expect("blocked stack");
            assert!(kernel.kernel && !kernel.ips.is_empty());
            // This test binary has no frame pointers, so the walk may stop
            // after the system call's address; the fixture tests check
            // whole stacks.
            let user = window.stacks.get(&sample.user_stack).expect("user stack");
            assert!(!user.kernel && !user.ips.is_empty(), "{user:?}");
        }
    }

    /// Two threads spinning on one CPU preempt each other in user mode. Their
    /// waits are recorded as involuntary, with user stacks, which (glibc
    /// registers restartable sequences for every thread) are walked when
    /// each thread returns to user mode rather than every time it leaves
    /// the CPU.
    #[test]
    fn preempted_threads_are_recorded_with_their_user_stacks() {
        let mut sampler = off_cpu_sampler(Duration::ZERO, 1.0);
        // SAFETY: no preconditions.
        let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
        let spinner = move || {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    assert_eq!(
                        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
                        0
                    );
                }
                burn(Duration::from_millis(400));
                // SAFETY: gettid has no preconditions.
                unsafe { libc::gettid() as u32 }
            })
        };
        let (a, b) = (spinner(), spinner());
        let spinners = [a.join().unwrap(), b.join().unwrap()];
        sampler.stop().unwrap();
        let window = sampler.drain().unwrap();
        let st = window.stats;
        let preempted: Vec<_> = window
            .samples
            .iter()
            .filter(|s| spinners.contains(&s.tid))
            .filter(|s| s.off_cpu.is_some_and(|o| o.involuntary))
            .collect();
        let waits: u64 = preempted.iter().map(|s| s.count).sum();
        let ms: u64 = preempted
            .iter()
            .map(|s| s.off_cpu.unwrap().blocked_ns)
            .sum::<u64>()
            / 1_000_000;
        // Each spins for 400 ms of wall time sharing one CPU: each waits
        // a good part of it while the other runs.
        assert!(waits >= 10 && ms >= 150, "{waits} waits, {ms} ms: {st:?}");
        for sample in &preempted {
            let user = window
                .stacks
                .get(&sample.user_stack)
                .unwrap_or_else(|| panic!("no user stack: {sample:?}"));
            assert!(!user.kernel && !user.ips.is_empty(), "{user:?}");
        }
        // Only a thread's first switch, before it ever returned through
        // `rseq_update`, is walked eagerly (the spinners', and those of the
        // other threads of this process, which other tests keep starting).
        // Without it, every preemption would be.
        assert!(
            st.get(Stat::OffCpuEagerWalks) * 2 < waits,
            "{} eager walks for {waits} preemptions: {st:?}",
            st.get(Stat::OffCpuEagerWalks)
        );
    }

    /// Above the rate cap a CPU's switch-outs are followed at random, the
    /// skipped ones counted, and each wait followed is scaled up in the
    /// kernel so the total stays an honest estimate of the true time.
    #[test]
    fn off_cpu_rate_cap_samples_a_busy_cpu_and_scales_up() {
        const CAP: u64 = 300;
        let mut sampler =
            off_cpu_sampler_capped(Duration::from_micros(200), 1.0, CAP, ReturnPath::Auto);
        // SAFETY: no preconditions.
        let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
        // About 1,000 switch-outs a second of this thread alone on its CPU:
        // three times the cap. Its own clock says how long it really slept.
        let sleeper = std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
                    0
                );
            }
            let mut slept = Duration::ZERO;
            for _ in 0..1_500 {
                let start = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                slept += start.elapsed();
            }
            // SAFETY: gettid has no preconditions.
            (unsafe { libc::gettid() as u32 }, slept)
        });
        let (tid, slept) = sleeper.join().unwrap();
        sampler.stop().unwrap();
        let window = sampler.drain().unwrap();
        let st = window.stats;
        assert_switch_outs_accounted_for(&st);
        let followed = st.get(Stat::OffCpuStarted) + st.get(Stat::OffCpuNoThreadStorage);
        let skipped = st.get(Stat::OffCpuUnsampled);
        // The first 100 ms of each CPU follow everything; after that about
        // a third of the sleeper's switch-outs.
        let share = followed as f64 / (followed + skipped) as f64;
        assert!(
            skipped >= 500 && share < 0.6,
            "{followed} followed, {skipped} skipped: {st:?}"
        );
        let (waits, ns) = thread_off_cpu(&window, tid);
        // 1 ms sleeps are all above the minimum: every wait followed is
        // recorded.
        let ratio = ns as f64 / slept.as_nanos() as f64;
        eprintln!(
            "rate cap: {followed} followed, {skipped} skipped, {waits} waits of the sleeper, \
             estimate/slept {ratio:.3}"
        );
        // Each wait stands for 1/p of them: the estimate's relative error
        // is about 1/sqrt(waits followed) (p is lower on a loaded host,
        // whose other switches count towards the cap).
        let tolerance = (4.0 / (waits.max(1) as f64).sqrt()).max(0.2);
        assert!(
            waits >= 50 && (ratio - 1.0).abs() <= tolerance,
            "{waits} waits recorded, estimate {:.0} ms for {} ms slept: {st:?}",
            ns as f64 / 1e6,
            slept.as_millis()
        );
    }

    /// Following half the switches skips about half, counted, and the
    /// recorded time, scaled up by 2 in the kernel, estimates the true time.
    #[test]
    fn off_cpu_sampling_skips_a_share_of_switches() {
        let mut sampler = off_cpu_sampler(Duration::from_millis(5), 0.5);
        let tid = sleeper(100, Duration::from_millis(10)).join().unwrap();
        sampler.stop().unwrap();
        let window = sampler.drain().unwrap();
        let st = window.stats;
        // Sampling is decided first, for every switch-out of the host.
        let skipped = st.get(Stat::OffCpuUnsampled);
        let share = skipped as f64 / st.get(Stat::OffCpuSwitches) as f64;
        assert!((0.35..=0.65).contains(&share), "{share:.2} skipped: {st:?}");
        let (_, ns) = thread_off_cpu(&window, tid);
        // The kernel scaled each followed wait up by 2.
        let estimate_ms = ns / 1_000_000;
        assert!(
            (650..=1450).contains(&estimate_ms),
            "100 sleeps of 10 ms estimated as {estimate_ms} ms"
        );
    }
}
