//! Off-CPU time: where threads wait, from the scheduler's context switches.
//!
//! Context switches run at hundreds of thousands per second, so a wait
//! shorter than the minimum costs two task-storage lookups and one clock
//! read; no registers, no name, no stack. A wait is followed in three
//! steps:
//!
//! 1. **Switch-out** (`sched_switch`, the outgoing task is current): store
//!    in the thread's own storage when it left and whether it was
//!    preempted while runnable (involuntary) or went to sleep.
//! 2. **Switch-in** (`sched_switch` again, the task is `next`; current is
//!    some other task): the blocked time is known now. Below the minimum
//!    it is counted and forgotten. Otherwise the thread's saved user
//!    registers say where it waits and its kernel stack is read with
//!    `bpf_get_task_stack`. A kernel thread's wait is recorded now; a
//!    thread in a system call, or in user mode, is parked as pending.
//! 3. **Back in the thread's context**, its user stack exactly as when it
//!    left, on its way back to user mode. Where the kernel has BPF task
//!    works (6.18 and later), the switch-in queues one for the thread
//!    ([`walk_on_return`]): only waits worth recording pay for it, and no
//!    other program runs on every switch. Elsewhere the wait is parked in
//!    the thread's storage and taken at `rseq_update`, which the kernel
//!    fires after every switch of a thread using restartable sequences (as
//!    every glibc 2.35+ thread does), and which also marks the thread as
//!    one that will come back through it. Either way the user stack is
//!    walked and the wait recorded then. Against `rseq_update`, the task
//!    work cut the slowdown of the pinned ping-pong in each of 9
//!    interleaved rounds (medians 3.4% against 10.0%).
//!
//! The user stack cannot be walked at switch-in: user memory can only be
//! read in the address space of the current task. (A kprobe or fentry on
//! `finish_task_switch` would run in the woken task's context, but neither
//! is available on every kernel: these machines have no kprobes and refuse
//! fentry.) Without task works, a thread without restartable sequences
//! (Go, musl, older glibc, or a thread before its first `rseq_update`) has
//! its stack walked eagerly when it leaves the CPU, and one asleep in a
//! page fault is recorded with the faulting instruction only.
//!
//! On a kernel without the `rseq_update` tracepoint, `sys_exit` takes the
//! waits of threads blocked in system calls instead (only preemptions are
//! walked eagerly). It runs on every system call of the host, so it first
//! checks a global count of pending waits and mostly returns at once; but
//! even returning at once, its four runs per pipe round trip cost more
//! than the rest of the off-CPU programs, which is why `rseq_update` is
//! preferred wherever it exists.
//!
//! Cost controls. On a CPU switching more than `OFF_CPU_MAX_RATE` times a
//! second, a switch-out is followed only with the probability that keeps
//! to that rate (measured per CPU over [`RATE_WINDOW_NS`]), and the time of
//! each wait followed is scaled up by the inverse of that probability here,
//! so every consumer sees honest totals. A switch not followed costs a
//! random number and a counter: no clock read, no task storage; and the
//! incoming thread's storage is looked up only when its slot in
//! [`OFF_CPU_GATE`] says some thread hashed there has a wait (12% less time
//! per run where neither side is followed). `rseq_update` (and `sys_exit`)
//! look at their thread only when a per-CPU slot names it: the thread last
//! switched in there with a wait pending, or whose use of restartable
//! sequences is not known yet.
//!
//! Per-thread state lives in task storage rather than in a hash map keyed
//! by thread: no hashing, no bucket lock, nothing to delete on wake-up, and
//! the kernel frees it when the thread exits. On the benchmark's VM, where
//! every cache line touched costs tens of nanoseconds, this took the switch
//! program from 1.2 µs to about 0.3 µs per run.

use aya_ebpf::{
    bindings::{task_struct, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_get_prandom_u32, bpf_ktime_get_ns, generated::bpf_get_task_stack,
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{Array, PerCpuArray},
    programs::BtfTracePointContext,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use hearth_ebpf::{
    SampleKey, Stack, Stat, CONTROL_OFF_CPU_EPOCH, CONTROL_OFF_CPU_PENDING, MAX_USER_FRAMES,
    SAMPLE_INVOLUNTARY, SAMPLE_OFF_CPU, STACK_KERNEL, STACK_TRUNCATED,
    TASK_WORK_RESUME_PLACEHOLDER,
};

use crate::maps::{
    add, add_count, control, control_add, count, filtered_out, off_cpu_empty, off_cpu_max_rate,
    off_cpu_min_ns, off_cpu_sample_below, store_stack, store_stack_from, syscall_exit_attached,
    with_window, TaskStorage, Window, SCRATCH_STACK, SCRATCH_SWITCH_KERNEL, SCRATCH_SWITCH_USER,
    SCRATCH_SYSCALL_EXIT,
};
use crate::stack::{
    hash_stack, task_user_regs, walk_user_stack, walk_user_stack_into, UserRegs, KERNEL_SEED,
    USER_SEED,
};

/// `prev_state` of a task leaving the CPU for the last time.
const TASK_DEAD: u64 = 0x80;
/// `prev_state` of a task that is still runnable.
const TASK_RUNNING: u64 = 0;

/// [`Wait::flags`]: the thread was preempted while runnable.
const WAIT_INVOLUNTARY: u32 = 1 << 0;
/// [`Wait::flags`]: the thread blocked inside a system call, so its user
/// stack is walked when that call returns.
const WAIT_IN_SYSCALL: u32 = 1 << 1;
/// [`Wait::flags`]: its saved user registers were examined at switch-out.
const WAIT_REGS_READ: u32 = 1 << 2;
/// [`Wait::flags`]: preempted in user mode, its user stack walked when it
/// returns to user mode (see [`off_cpu_rseq_return`]).
const WAIT_USER_MODE: u32 = 1 << 3;

/// [`ThreadState::thread_flags`]: the thread uses restartable sequences,
/// so `rseq_update` runs each time it returns to user mode after a switch.
const THREAD_RSEQ: u64 = 1 << 0;
/// [`ThreadState::thread_flags`]: [`ThreadState::pending`] holds a wait
/// (kept next to the start, so a switch-in reads one cache line).
const THREAD_PENDING: u64 = 1 << 1;
/// [`ThreadState::thread_flags`]: the thread holds one count in its
/// [`OFF_CPU_GATE`] slot, because it has a wait started or pending.
const THREAD_GATED: u64 = 1 << 2;

/// One wait of a thread.
#[repr(C)]
#[derive(Clone, Copy)]
struct Wait {
    /// Started: `bpf_ktime_get_ns` when the thread left the CPU. Pending:
    /// nanoseconds it was off CPU.
    time_ns: u64,
    /// `CONTROL[CONTROL_OFF_CPU_EPOCH]` when it was stored; 0: no wait.
    epoch: u32,
    /// `WAIT_*` bits.
    flags: u32,
    /// The system call it blocked in (`WAIT_IN_SYSCALL`).
    syscall: i32,
    /// Started: the bound its switch-out was followed under (see
    /// [`sample_switch_out`]); the time is scaled up by its inverse.
    follow_below: u32,
    /// User stack walked when it left the CPU; 0: none.
    user_stack: u64,
    /// Pending: the kernel stack it blocked in; 0: none.
    blocked_stack: u64,
}

/// What the off-CPU programs keep per thread. The fields written on every
/// switch come first: each cache line touched costs more than the rest of
/// the work on a busy host.
#[repr(C)]
struct ThreadState {
    /// The wait in progress (the thread is off CPU).
    started: Wait,
    /// `bpf_get_current_pid_tgid` at switch-out, for a wait recorded at
    /// switch-in (outside a system call), when another task is current.
    pid_tgid: u64,
    /// `THREAD_*` bits.
    thread_flags: u64,
    /// A finished wait recorded at the exit of the system call it blocked
    /// in (the thread is back on CPU, inside that call).
    pending: Wait,
}

#[btf_map]
static OFF_CPU_THREADS: TaskStorage<ThreadState> = TaskStorage::new();

/// How long a CPU's switch-out rate is measured before the share followed
/// is set again.
const RATE_WINDOW_NS: u64 = 100_000_000;
/// Longer windows (a CPU that was idle) count as this long.
const RATE_WINDOW_MAX_NS: u64 = 10_000_000_000;
/// While the cap applies, the clock is read for the window only every this
/// many switch-outs (a power of two) or at a followed one.
const RATE_CHECK_EVERY: u64 = 64;

/// Per CPU: switch-outs that could be followed in the current window, and
/// the share followed, set from the window before.
#[repr(C)]
struct FollowRate {
    window_start_ns: u64,
    switch_outs: u64,
    /// A switch-out is followed when a random u32 is below this; 0: the
    /// cap does not apply, every one is.
    capped_below: u32,
    /// State of [`next_random`]; 0: not seeded yet.
    random: u32,
    /// Scratch for [`gate_slot`].
    task_address: u64,
}

#[map]
static OFF_CPU_RATE: PerCpuArray<FollowRate> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the thread `rseq_update` or `sys_exit` should look at when it
/// runs there next, 0: none. Set when a thread is switched in with a wait
/// pending, or after a wait when it is not known whether it uses
/// restartable sequences. A thread runs on the CPU it was switched in on
/// until it leaves it again, and is named again at its next switch-in, so
/// no wait is missed; and unlike a global count of pending waits, a
/// thread that exits or execs with one pending leaves nothing behind.
#[map]
static OFF_CPU_CHECK_TID: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// log2 of [`OFF_CPU_GATE`]'s entries.
const GATE_BITS: u32 = 14;

/// Per slot: how many threads, of those whose task pointer hashes to it,
/// have a wait started or pending (`THREAD_GATED`). A switch-in whose slot
/// is 0 has nothing to do and skips the thread's storage: above the rate
/// cap most switch-ins are such, and the storage lookup (a helper call and
/// three cache lines) was the largest part of a switch not followed. A
/// count is taken when a wait starts and given back when the thread has
/// neither wait left, at switch-in, at the return to user mode that
/// records its pending wait, or when it leaves the CPU for the last time.
/// Threads sharing a slot only cost one another a lookup; a count never
/// given back (programs detached while a thread waited) costs the same.
#[map]
static OFF_CPU_GATE: Array<u32> = Array::with_max_entries(1 << GATE_BITS, 0);

/// `task`'s slot in [`OFF_CPU_GATE`] (Fibonacci hashing of the pointer,
/// which stays the same for the thread's life).
#[inline(always)]
fn gate_slot(task: *const task_struct) -> u32 {
    let Some(rate) = OFF_CPU_RATE.get_ptr_mut(0) else {
        return 0;
    };
    // The verifier allows no arithmetic on a task pointer, but a program
    // loaded with CAP_PERFMON (which the agent requires) may store it in a
    // map value, and what it reads back is a number. Volatile, so the
    // compiler keeps the round trip.
    // SAFETY: per-CPU slot; the programs do not interrupt one another.
    let address = unsafe {
        core::ptr::write_volatile(&raw mut (*rate).task_address, task as u64);
        core::ptr::read_volatile(&raw const (*rate).task_address)
    };
    (address.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - GATE_BITS)) as u32
}

/// Whether a thread of `task`'s slot may have a wait to look at.
#[inline(always)]
fn gate_open(task: *const task_struct) -> bool {
    OFF_CPU_GATE.get(gate_slot(task)).is_none_or(|n| *n != 0)
}

/// Takes a count in `task`'s slot for a wait it now has, unless it holds
/// one.
#[inline(always)]
fn gate_take(task: *const task_struct, state: &mut ThreadState) {
    if state.thread_flags & THREAD_GATED == 0 {
        state.thread_flags |= THREAD_GATED;
        gate_add(task, 1);
    }
}

/// Gives back `task`'s count once it has no wait left.
#[inline(always)]
fn gate_release(task: *const task_struct, state: &mut ThreadState) {
    if state.thread_flags & (THREAD_GATED | THREAD_PENDING) == THREAD_GATED
        && state.started.epoch == 0
    {
        state.thread_flags &= !THREAD_GATED;
        gate_add(task, u32::MAX);
    }
}

#[inline(always)]
fn gate_add(task: *const task_struct, delta: u32) {
    if let Some(slot) = OFF_CPU_GATE.get_ptr_mut(gate_slot(task)) {
        // SAFETY: a u32 of an array map value, 4-byte aligned; threads on
        // every CPU share slots, so the add is atomic.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(slot, delta) };
    }
}

/// Non-zero: waits are finished by a BPF task work queued for the thread
/// (kernels with `bpf_task_work_schedule_resume_impl`, 6.18 and later),
/// and neither `rseq_update` nor `sys_exit` is attached.
#[unsafe(no_mangle)]
pub static OFF_CPU_TASK_WORK: u8 = 0;

#[inline(always)]
fn task_work() -> bool {
    // SAFETY: a plain read of read-only data userspace set at load.
    unsafe { core::ptr::read_volatile(&OFF_CPU_TASK_WORK) != 0 }
}

/// The kernel's `struct bpf_task_work`: the verifier finds it by name in
/// the BTF of the map value.
#[allow(non_camel_case_types)]
#[repr(C, align(8))]
pub struct bpf_task_work {
    opaque: u64,
}

/// A finished wait whose user stack is walked when the thread returns to
/// user mode, into `stack`: the task work runs preemptible, so another
/// thread's walk may run on the same CPU in the middle of this one, and a
/// per-CPU scratch buffer would be shared between them.
#[repr(C)]
pub struct WalkOnReturn {
    wait: Wait,
    pid_tgid: u64,
    work: bpf_task_work,
    stack: Stack,
}

/// Walks queued, by thread id. Each lives from the thread's switch-in to
/// its return to user mode, so few are queued at once.
#[btf_map]
static OFF_CPU_WALKS: aya_ebpf::btf_maps::HashMap<u32, WalkOnReturn, 1024> =
    aya_ebpf::btf_maps::HashMap::new();

/// Per CPU: an entry for [`OFF_CPU_WALKS`] is filled in here, as it is too
/// big for the BPF stack.
#[map]
static WALK_TEMPLATE: PerCpuArray<WalkOnReturn> = PerCpuArray::with_max_entries(1, 0);

type TaskWorkResume = unsafe extern "C" fn(
    *mut task_struct,
    *mut bpf_task_work,
    *mut core::ffi::c_void,
    *mut core::ffi::c_void,
    *mut core::ffi::c_void,
) -> i64;

/// Hands a finished wait of `next`, a thread in a system call or
/// preempted in user mode, to a task work that walks its user stack when
/// it returns to user mode. A wait already queued for the thread (it
/// blocked again on the way) absorbs this one when both blocked in the
/// same place; otherwise this one is lost, counted.
#[inline(always)]
fn walk_on_return(next: *mut task_struct, wait: &Wait, pid_tgid: u64) -> Result<(), Stat> {
    let tid = pid_tgid as u32;
    if let Some(queued) = OFF_CPU_WALKS.get_ptr_mut(&tid) {
        // SAFETY: a live value of the map.
        let queued = unsafe { &mut (*queued).wait };
        if queued.epoch == wait.epoch
            && queued.syscall == wait.syscall
            && queued.blocked_stack == wait.blocked_stack
        {
            queued.time_ns += wait.time_ns;
            count(Stat::OffCpuPendingMerged);
            return Ok(());
        }
        return Err(Stat::OffCpuTaskWorkFailed);
    }
    let template = WALK_TEMPLATE.get_ptr_mut(0).ok_or(Stat::MapLookupFailed)?;
    // SAFETY: per-CPU slot; sched_switch runs with interrupts off.
    let template = unsafe { &mut *template };
    template.wait = *wait;
    template.pid_tgid = pid_tgid;
    OFF_CPU_WALKS
        .insert(&tid, template, BPF_NOEXIST as u64)
        .map_err(|_| Stat::OffCpuTaskWorkFailed)?;
    let value = OFF_CPU_WALKS
        .get_ptr_mut(&tid)
        .ok_or(Stat::OffCpuTaskWorkFailed)?;
    // SAFETY: userspace rewrites this call into one of the kfunc
    // `bpf_task_work_schedule_resume_impl` (see the loader), whose
    // arguments these are: a trusted task, the work inside a value of the
    // map given, a static callback, and the program's aux (the verifier
    // fills it in).
    let queued = unsafe {
        let schedule: TaskWorkResume = core::mem::transmute(TASK_WORK_RESUME_PLACEHOLDER as usize);
        schedule(
            next,
            &raw mut (*value).work,
            core::ptr::from_ref(&OFF_CPU_WALKS).cast_mut().cast(),
            walk_callback as *const () as *mut core::ffi::c_void,
            core::ptr::null_mut(),
        )
    };
    if queued != 0 {
        let _ = OFF_CPU_WALKS.remove(&tid);
        return Err(Stat::OffCpuTaskWorkFailed);
    }
    control_add(CONTROL_OFF_CPU_PENDING, 1);
    Ok(())
}

/// The task work queued by [`walk_on_return`], run by the kernel in the
/// thread's own context on its way back to user mode: its user stack is
/// the one it blocked with.
unsafe extern "C" fn walk_callback(
    _map: *mut core::ffi::c_void,
    key: *mut core::ffi::c_void,
    value: *mut core::ffi::c_void,
) -> i32 {
    // SAFETY: the kernel passes the key and value of the queued entry.
    let (tid, entry) = unsafe { (*(key as *const u32), &mut *(value as *mut WalkOnReturn)) };
    match record_walked(entry) {
        Ok(()) => count(Stat::OffCpuRecorded),
        Err(stat) => count(stat),
    }
    let _ = OFF_CPU_WALKS.remove(&tid);
    0
}

#[inline(always)]
fn record_walked(entry: &mut WalkOnReturn) -> Result<(), Stat> {
    let mut wait = entry.wait;
    let pid_tgid = entry.pid_tgid;
    if wait.epoch != control(CONTROL_OFF_CPU_EPOCH) {
        // Userspace reset the pending count when it changed the epoch.
        return Err(Stat::OffCpuPendingStale);
    }
    control_add(CONTROL_OFF_CPU_PENDING, u32::MAX);
    // SAFETY: no preconditions; a trusted task pointer.
    let task = unsafe { bpf_get_current_task_btf() };
    // SAFETY: the current task is a valid task pointer.
    let regs = unsafe { task_user_regs(task) }.ok_or(Stat::OffCpuPendingStale)?;
    // At a system call, or preempted in user mode: the thread may be
    // inside a C library wrapper.
    let hash = walk_user_stack_into(&regs, &raw mut entry.stack, regs.orig_ax >= 0);
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let stack = &entry.stack;
    with_window(|w| {
        if hash != 0 && store_stack_from(hash, stack, w.stacks) {
            wait.user_stack = hash;
        } else {
            count(Stat::DropUserStackFull);
        }
        record_wait(&wait, pid_tgid, &comm, now, w)
    })
}

/// `bpf_ktime_get_ns`, read at most once per program run and only when
/// needed: it costs as much as the rest of a skipped switch.
struct Clock(u64);

impl Clock {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.0 == 0 {
            // SAFETY: no preconditions.
            self.0 = unsafe { bpf_ktime_get_ns() };
        }
        self.0
    }
}

/// `sched_switch(bool preempt, struct task_struct *prev,
///               struct task_struct *next, unsigned int prev_state)`
#[btf_tracepoint(function = "sched_switch")]
pub fn off_cpu_switch(ctx: BtfTracePointContext) -> u32 {
    if off_cpu_empty() {
        return 0;
    }
    count(Stat::OffCpuSwitches);
    // One clock read serves both threads: one left the CPU when the other
    // got it.
    let mut clock = Clock(0);
    match try_switch_out(&ctx, &mut clock) {
        Ok(()) => count(Stat::OffCpuStarted),
        Err(stat) => count(stat),
    }
    if let Err(stat) = try_switch_in(&ctx, &mut clock) {
        count(stat);
    }
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`; attached only where
/// `rseq_update` is missing.
#[btf_tracepoint(function = "sys_exit")]
pub fn off_cpu_syscall_exit(_ctx: BtfTracePointContext) -> u32 {
    if off_cpu_empty() || !check_due() {
        return 0;
    }
    match try_record_pending(true) {
        Ok(true) => count(Stat::OffCpuRecorded),
        Ok(false) => {}
        Err(stat) => count(stat),
    }
    0
}

/// `rseq_update(struct task_struct *t)`, t = current: a thread using
/// restartable sequences (glibc 2.35 and later registers every thread)
/// returns to user mode after having been switched out, with the user
/// registers it was switched out with. Where it exists, this is the one
/// point after a preemption in user mode where that thread's stack can be
/// read; elsewhere such threads are walked eagerly when they leave the CPU.
#[btf_tracepoint(function = "rseq_update")]
pub fn off_cpu_rseq_return(_ctx: BtfTracePointContext) -> u32 {
    // Runs after nearly every switch of the host, and most runs have
    // nothing to do.
    if off_cpu_empty() || !check_due() {
        return 0;
    }
    match try_record_pending(false) {
        Ok(true) => count(Stat::OffCpuRecorded),
        Ok(false) => {}
        Err(stat) => count(stat),
    }
    0
}

/// Names `tid` in this CPU's [`OFF_CPU_CHECK_TID`].
#[inline(always)]
fn check_later(tid: u32) {
    if let Some(slot) = OFF_CPU_CHECK_TID.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the programs do not interrupt one another.
        unsafe { *slot = tid };
    }
}

/// Whether the current thread is the one [`OFF_CPU_CHECK_TID`] names
/// here; the slot is cleared then.
#[inline(always)]
fn check_due() -> bool {
    let Some(slot) = OFF_CPU_CHECK_TID.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot; the programs do not interrupt one another.
    let slot = unsafe { &mut *slot };
    if *slot == 0 || *slot != bpf_get_current_pid_tgid() as u32 {
        return false;
    }
    *slot = 0;
    true
}

/// Whether the current switch-out is followed: the bound a random u32
/// fell under (which sets the wait's weight), or `OffCpuUnsampled`. It is
/// decided before anything else, the thread's ids included: a switch not
/// followed should cost no helper call, and each costs more here than the
/// rest of such a switch. So while sampling, the rate counts, and the
/// sample draws from, every switch-out of the CPU, the idle task's and
/// filtered processes' as well.
#[inline(always)]
fn sample_switch_out(clock: &mut Clock) -> Result<u32, Stat> {
    let fixed = off_cpu_sample_below();
    let max_rate = off_cpu_max_rate();
    if max_rate == 0 && fixed == u32::MAX {
        return Ok(u32::MAX);
    }
    let Some(rate) = OFF_CPU_RATE.get_ptr_mut(0) else {
        return Ok(fixed);
    };
    // SAFETY: per-CPU slot; the programs do not interrupt one another.
    let rate = unsafe { &mut *rate };
    let mut below = fixed;
    if max_rate != 0 {
        rate.switch_outs += 1;
        if rate.capped_below == 0 || rate.switch_outs & (RATE_CHECK_EVERY - 1) == 0 {
            next_rate_window(rate, clock.now(), max_rate);
        }
        if rate.capped_below != 0 && rate.capped_below < below {
            below = rate.capped_below;
        }
    }
    if below != u32::MAX && next_random(rate) >= below {
        return Err(Stat::OffCpuUnsampled);
    }
    Ok(below)
}

/// Marsaglia's xorshift32 on the CPU's own state, seeded from the
/// kernel's generator: good enough to pick switches, and no helper call.
#[inline(always)]
fn next_random(rate: &mut FollowRate) -> u32 {
    let mut x = rate.random;
    if x == 0 {
        // SAFETY: no preconditions.
        x = unsafe { bpf_get_prandom_u32() } | 1;
    }
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    rate.random = x;
    x
}

/// Once a window is over, sets the share followed in the next from its
/// switch-out rate: all of them up to `max_rate` a second, fewer above.
#[inline(always)]
fn next_rate_window(rate: &mut FollowRate, now: u64, max_rate: u64) {
    let elapsed = now.wrapping_sub(rate.window_start_ns);
    if elapsed < RATE_WINDOW_NS {
        return;
    }
    // At most 10^7 a second (userspace caps it) × 10^10 ns: no overflow.
    let allowed = max_rate * elapsed.min(RATE_WINDOW_MAX_NS) / 1_000_000_000;
    rate.capped_below = if rate.switch_outs <= allowed || allowed >= 1 << 32 {
        0
    } else {
        // allowed < switch_outs, so the quotient is below 2^32.
        ((allowed << 32) / rate.switch_outs).max(1) as u32
    };
    rate.window_start_ns = now;
    rate.switch_outs = 0;
}

/// `blocked_ns` of a wait followed with probability `follow_below` / 2^32,
/// scaled up by its inverse.
#[inline(always)]
fn scale_up(blocked_ns: u64, follow_below: u32) -> u64 {
    if follow_below == u32::MAX || follow_below == 0 {
        return blocked_ns;
    }
    let below = follow_below as u64;
    let whole = blocked_ns / below;
    if whole >= 1 << 32 {
        return u64::MAX;
    }
    (whole << 32) + ((blocked_ns % below) << 32) / below
}

fn try_switch_out(ctx: &BtfTracePointContext, clock: &mut Clock) -> Result<(), Stat> {
    let prev_state: u64 = ctx.arg(3);
    if prev_state & TASK_DEAD != 0 {
        // Never switched in again: its gate count is given back now.
        let prev: *mut task_struct = ctx.arg(1);
        // SAFETY: `prev` is a trusted task pointer from the tracepoint.
        if let Some(state) = unsafe { OFF_CPU_THREADS.get(prev, false) } {
            if state.thread_flags & THREAD_GATED != 0 {
                state.thread_flags &= !THREAD_GATED;
                gate_add(prev, u32::MAX);
            }
        }
        return Err(Stat::OffCpuExiting);
    }
    let below = sample_switch_out(clock)?;
    let preempt: u64 = ctx.arg(0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return Err(Stat::OffCpuIdle);
    }
    if filtered_out(tgid) {
        return Err(Stat::OffCpuFiltered);
    }
    // SAFETY: no preconditions; a trusted task pointer.
    let task = unsafe { bpf_get_current_task_btf() };
    let mut wait = Wait {
        time_ns: clock.now(),
        epoch: control(CONTROL_OFF_CPU_EPOCH),
        flags: 0,
        syscall: -1,
        follow_below: below,
        user_stack: 0,
        blocked_stack: 0,
    };
    // SAFETY: a trusted task pointer.
    let state = unsafe { OFF_CPU_THREADS.get(task, true) }.ok_or(Stat::OffCpuNoThreadStorage)?;
    // `preempt` is a bool in a 64-bit slot.
    let involuntary = preempt & 0xff != 0 || prev_state == TASK_RUNNING;
    if involuntary {
        wait.flags |= WAIT_INVOLUNTARY;
    }
    // Where the thread is, a system call, user mode (preempted, or a page
    // fault) or nowhere (a kernel thread), its saved registers tell; they
    // stay saved until it returns to user mode, so they are read at
    // switch-in, and only for waits long enough to record: reading them
    // costs more than all the rest of this path. A thread that does not use
    // restartable sequences is the exception when nothing else will run in
    // its context before it resumes (preempted, or without `sys_exit`
    // attached): its stack is walked now.
    if task_work()
        || state.thread_flags & THREAD_RSEQ != 0
        || (!involuntary && syscall_exit_attached())
    {
        state.started = wait;
        state.pid_tgid = pid_tgid;
        gate_take(task, state);
        return Ok(());
    }
    wait.flags |= WAIT_REGS_READ;
    // SAFETY: the current task is a valid task pointer.
    match unsafe { task_user_regs(task) } {
        Some(regs) if regs.ip != 0 && regs.in_syscall() && syscall_exit_attached() => {
            wait.flags |= WAIT_IN_SYSCALL;
            wait.syscall = regs.orig_ax as i32;
        }
        // ip 0: a kernel thread, without user stack.
        Some(regs) if regs.ip != 0 => wait.user_stack = eager_user_stack(&regs),
        _ => {}
    }
    // Fetched again after the walk, so the verifier does not carry the
    // storage pointer through the walk's states.
    // SAFETY: a trusted task pointer.
    let state = unsafe { OFF_CPU_THREADS.get(task, false) }.ok_or(Stat::OffCpuNoThreadStorage)?;
    state.started = wait;
    // A wait outside a system call is recorded at switch-in, when another
    // task is current: the thread's ids are kept now (next to the start
    // time, in the same cache line). Its name is not: copying it costs as
    // much as the rest of this path, and userspace finds it by thread id.
    state.pid_tgid = pid_tgid;
    gate_take(task, state);
    Ok(())
}

/// The user stack of the current thread, leaving the CPU outside a system
/// call, stored in the window; its hash, or 0 (counted).
#[inline(always)]
fn eager_user_stack(regs: &UserRegs) -> u64 {
    count(Stat::OffCpuEagerWalks);
    // Entered through an exception with an error code, or a system call
    // (then the thread may be inside a C library wrapper).
    let hash = walk_user_stack(regs, SCRATCH_SWITCH_USER, regs.orig_ax >= 0);
    let stored = with_window(|w| Ok(store_stack(hash, SCRATCH_SWITCH_USER, w.stacks)));
    if hash != 0 && stored == Ok(true) {
        hash
    } else {
        count(Stat::DropUserStackFull);
        0
    }
}

fn try_switch_in(ctx: &BtfTracePointContext, clock: &mut Clock) -> Result<(), Stat> {
    let next: *mut task_struct = ctx.arg(2);
    if !gate_open(next) {
        return Ok(());
    }
    // SAFETY: `next` is a trusted task pointer from the tracepoint.
    let Some(state) = (unsafe { OFF_CPU_THREADS.get(next, false) }) else {
        return Ok(());
    };
    if state.thread_flags & THREAD_PENDING != 0 {
        // Preempted on its way back to user mode: it gets there from here.
        check_later(state.pid_tgid as u32);
    }
    let ended = if state.started.epoch == 0 {
        Ok(())
    } else {
        end_wait(next, state, clock)
    };
    gate_release(next, state);
    ended
}

/// Ends the wait `next` started: counts it below the minimum, records it,
/// or parks it for the thread's return to user mode.
#[inline(always)]
fn end_wait(
    next: *mut task_struct,
    state: &mut ThreadState,
    clock: &mut Clock,
) -> Result<(), Stat> {
    let mut wait = state.started;
    state.started.epoch = 0;
    if wait.epoch != control(CONTROL_OFF_CPU_EPOCH) {
        return Err(Stat::OffCpuStartStale);
    }
    count(Stat::OffCpuWoken);
    if !task_work() && state.thread_flags & THREAD_RSEQ == 0 {
        // Whether it comes back through `rseq_update` is learnt there.
        check_later(state.pid_tgid as u32);
    }
    let now = clock.now();
    let blocked_ns = now.saturating_sub(wait.time_ns);
    // The minimum is on the wait's own length; the time recorded stands
    // for the waits not followed as well.
    if blocked_ns < off_cpu_min_ns() {
        count(Stat::OffCpuBelowMin);
        add(
            Stat::OffCpuBelowMinNs,
            scale_up(blocked_ns, wait.follow_below),
        );
        return Ok(());
    }
    wait.time_ns = scale_up(blocked_ns, wait.follow_below);
    if wait.flags & WAIT_REGS_READ == 0 {
        // SAFETY: `next` is a trusted task pointer.
        match unsafe { task_user_regs(next) } {
            Some(regs) if regs.ip != 0 && regs.in_syscall() => {
                wait.flags |= WAIT_IN_SYSCALL;
                wait.syscall = regs.orig_ax as i32;
            }
            // In user mode (preempted there, or asleep in a page fault),
            // and back there through `rseq_update`.
            Some(regs)
                if regs.ip != 0 && (task_work() || state.thread_flags & THREAD_RSEQ != 0) =>
            {
                wait.flags |= WAIT_USER_MODE;
            }
            // A page fault of a thread without restartable sequences: its
            // user stack cannot be read from here, and nothing marks the
            // fault's return, so only the faulting instruction is known.
            Some(regs) if regs.ip != 0 => {
                count(Stat::OffCpuUserLeafOnly);
                wait.user_stack = with_window(|w| Ok(leaf_only_stack(regs.ip, w)))?;
            }
            // A kernel thread.
            _ => {}
        }
    }
    if wait.flags & (WAIT_IN_SYSCALL | WAIT_USER_MODE) != 0 {
        wait.blocked_stack = with_window(|w| Ok(blocked_kernel_stack(next, w)))?;
        if task_work() {
            walk_on_return(next, &wait, state.pid_tgid)?;
            count(Stat::OffCpuDeferred);
            return Ok(());
        }
        defer(state, wait);
        count(Stat::OffCpuDeferred);
        return Ok(());
    }
    let pid_tgid = state.pid_tgid;
    with_window(|w| {
        wait.blocked_stack = blocked_kernel_stack(next, w);
        // The name is left for userspace (see `try_switch_out`).
        record_wait(&wait, pid_tgid, &[0; 16], now, w)
    })?;
    count(Stat::OffCpuRecorded);
    Ok(())
}

/// Parks a finished wait until the thread's system call returns. A wait
/// already parked (the thread blocked again inside the same call) is
/// merged with it when both blocked in the same place, and otherwise lost,
/// counted.
#[inline(always)]
fn defer(state: &mut ThreadState, wait: Wait) {
    state.thread_flags |= THREAD_PENDING;
    check_later(state.pid_tgid as u32);
    let parked = state.pending;
    if parked.epoch == wait.epoch {
        if parked.syscall == wait.syscall && parked.blocked_stack == wait.blocked_stack {
            state.pending.time_ns += wait.time_ns;
            count(Stat::OffCpuPendingMerged);
        } else {
            count(Stat::OffCpuPendingReplaced);
            state.pending = wait;
        }
        return;
    }
    if parked.epoch != 0 {
        // Parked before the programs were last attached; the pending count
        // was reset then.
        count(Stat::OffCpuPendingStale);
    }
    state.pending = wait;
    control_add(CONTROL_OFF_CPU_PENDING, 1);
}

/// The current thread is back from a system call (`in_syscall_exit`) or
/// about to return to user mode (`rseq_update`): records its pending wait,
/// walking the user stack now that its memory is readable. True when one
/// was recorded. A wait of a thread preempted in user mode is left for the
/// return to user mode.
#[inline(always)]
fn try_record_pending(in_syscall_exit: bool) -> Result<bool, Stat> {
    // SAFETY: no preconditions; a trusted task pointer.
    let task = unsafe { bpf_get_current_task_btf() };
    // SAFETY: as above.
    let Some(state) = (unsafe { OFF_CPU_THREADS.get(task, false) }) else {
        return Ok(false);
    };
    if !in_syscall_exit && state.thread_flags & THREAD_RSEQ == 0 {
        state.thread_flags |= THREAD_RSEQ;
    }
    if state.pending.epoch == 0 {
        state.thread_flags &= !THREAD_PENDING;
        gate_release(task, state);
        return Ok(false);
    }
    if in_syscall_exit && state.pending.flags & WAIT_IN_SYSCALL == 0 {
        return Ok(false);
    }
    let mut wait = state.pending;
    state.pending.epoch = 0;
    state.thread_flags &= !THREAD_PENDING;
    gate_release(task, state);
    if wait.epoch != control(CONTROL_OFF_CPU_EPOCH) {
        // Userspace reset the count when it changed the epoch.
        return Err(Stat::OffCpuPendingStale);
    }
    control_add(CONTROL_OFF_CPU_PENDING, u32::MAX);
    // SAFETY: the current task is a valid task pointer.
    let regs = unsafe { task_user_regs(task) }.ok_or(Stat::OffCpuPendingStale)?;
    if wait.flags & WAIT_IN_SYSCALL != 0 && regs.orig_ax != i64::from(wait.syscall) {
        return Err(Stat::OffCpuPendingStale);
    }
    // At a system call (or right after one, preempted on the way back):
    // the thread may be inside a C library wrapper.
    let hash = walk_user_stack(&regs, SCRATCH_SYSCALL_EXIT, regs.orig_ax >= 0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    with_window(|w| {
        if hash != 0 && store_stack(hash, SCRATCH_SYSCALL_EXIT, w.stacks) {
            wait.user_stack = hash;
        } else {
            count(Stat::DropUserStackFull);
        }
        record_wait(&wait, pid_tgid, &comm, now, w)
    })?;
    Ok(true)
}

/// A user stack of just `ip` (flagged truncated), stored in the window;
/// its hash, or 0 when the map is full (counted).
#[inline(always)]
fn leaf_only_stack(ip: u64, window: &Window) -> u64 {
    let Some(stack) = SCRATCH_STACK.get_ptr_mut(SCRATCH_SWITCH_USER) else {
        count(Stat::MapLookupFailed);
        return 0;
    };
    // SAFETY: per-CPU scratch slot; sched_switch runs with interrupts off.
    let stack = unsafe { &mut *stack };
    stack.ips[0] = ip;
    stack.len = 1;
    stack.flags = STACK_TRUNCATED;
    let hash = hash_stack(stack, 1, USER_SEED);
    if store_stack(hash, SCRATCH_SWITCH_USER, window.stacks) {
        hash
    } else {
        count(Stat::DropUserStackFull);
        0
    }
}

/// Adds one wait of `wait.time_ns` nanoseconds to the window's counts.
#[inline(always)]
fn record_wait(
    wait: &Wait,
    pid_tgid: u64,
    comm: &[u8; 16],
    now: u64,
    window: &Window,
) -> Result<(), Stat> {
    let mut key = SampleKey {
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        user_stack: wait.user_stack,
        blocked_stack: wait.blocked_stack,
        kernel_stack: -1,
        flags: SAMPLE_OFF_CPU,
        comm: *comm,
    };
    if wait.flags & WAIT_INVOLUNTARY != 0 {
        key.flags |= SAMPLE_INVOLUNTARY;
    }
    add_count(
        window.counts,
        &key,
        now,
        wait.time_ns,
        Stat::OffCpuDropCountsFull,
    )
}

/// The kernel stack `task` (not running) blocked in, stored in the window;
/// its hash, or 0 when it could not be read or stored (counted).
#[inline(always)]
fn blocked_kernel_stack(task: *mut task_struct, window: &Window) -> u64 {
    let Some(stack) = SCRATCH_STACK.get_ptr_mut(SCRATCH_SWITCH_KERNEL) else {
        count(Stat::MapLookupFailed);
        return 0;
    };
    // SAFETY: per-CPU scratch slot; sched_switch runs with interrupts off.
    let stack = unsafe { &mut *stack };
    const BYTES: u32 = (MAX_USER_FRAMES * 8) as u32;
    // SAFETY: `task` is a trusted task pointer from the tracepoint, and the
    // buffer holds BYTES bytes.
    let read =
        unsafe { bpf_get_task_stack(task as *mut _, stack.ips.as_mut_ptr() as *mut _, BYTES, 0) };
    if read <= 0 {
        count(Stat::OffCpuDropKernelStack);
        return 0;
    }
    let len = (read as usize / 8).min(MAX_USER_FRAMES);
    stack.len = len as u32;
    stack.flags = STACK_KERNEL;
    let hash = hash_stack(stack, len, KERNEL_SEED);
    if store_stack(hash, SCRATCH_SWITCH_KERNEL, window.stacks) {
        hash
    } else {
        count(Stat::OffCpuDropKernelStack);
        0
    }
}
