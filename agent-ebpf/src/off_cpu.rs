//! Off-CPU time: where threads wait, from the scheduler's context switches.
//!
//! A thread's wait is followed in three steps, so that waits shorter than
//! the minimum cost two map operations and no stack walk:
//!
//! 1. **Switch-out** (`sched_switch`, the outgoing task is current): store
//!    when it left, and why (voluntary wait, or preempted while runnable).
//!    Its user stack is walked now only if it is not inside a system call
//!    (preempted in user mode, or a page fault), because nothing else runs
//!    in its context before its user code resumes.
//! 2. **Switch-in** (`sched_switch` again, the task is `next`; current is
//!    some other task): the blocked time is known now. Below the minimum it
//!    is counted and forgotten. Otherwise the task's kernel stack, where it
//!    blocked, is read with `bpf_get_task_stack`, and the wait is recorded,
//!    or, if the task blocked in a system call, kept pending.
//! 3. **System call exit** (`sys_exit`, the task is current again, its user
//!    stack exactly as when it blocked): walk the user stack and record.
//!
//! The user stack cannot be walked at switch-in: user memory can only be
//! read in the address space of the current task. (A kprobe or fentry on
//! `finish_task_switch` would run in the woken task's context, but neither
//! is available on every kernel: these machines have no kprobes and refuse
//! fentry.)

use aya_ebpf::{
    bindings::task_struct,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_get_prandom_u32, bpf_ktime_get_ns, generated::bpf_get_task_stack,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use hearth_ebpf::{
    BlockedThread, SampleKey, Stat, BLOCKED_INVOLUNTARY, BLOCKED_IN_SYSCALL, BLOCKED_NO_USER,
    MAX_USER_FRAMES, SAMPLE_INVOLUNTARY, SAMPLE_OFF_CPU, STACK_KERNEL,
};

use crate::maps::{
    add, add_count, count, filter_by_pid, off_cpu_min_ns, off_cpu_sample_below, store_stack,
    with_window, Window, OFF_CPU_PENDING, OFF_CPU_START, PID_FILTER, SCRATCH_STACK,
    SCRATCH_SWITCH_KERNEL, SCRATCH_SWITCH_USER, SCRATCH_SYSCALL_EXIT,
};
use crate::stack::{hash_stack, task_user_regs, walk_user_stack, KERNEL_SEED};

/// `prev_state` of a task leaving the CPU for the last time.
const TASK_DEAD: u64 = 0x80;
/// `prev_state` of a task that is still runnable.
const TASK_RUNNING: u64 = 0;

/// `sched_switch(bool preempt, struct task_struct *prev,
///               struct task_struct *next, unsigned int prev_state)`
#[btf_tracepoint(function = "sched_switch")]
pub fn off_cpu_switch(ctx: BtfTracePointContext) -> u32 {
    count(Stat::OffCpuSwitches);
    match try_switch_out(&ctx) {
        Ok(()) => count(Stat::OffCpuStarted),
        Err(stat) => count(stat),
    }
    if let Err(stat) = try_switch_in(&ctx) {
        count(stat);
    }
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`
#[btf_tracepoint(function = "sys_exit")]
pub fn off_cpu_syscall_exit(_ctx: BtfTracePointContext) -> u32 {
    match try_syscall_exit() {
        Ok(true) => count(Stat::OffCpuRecorded),
        Ok(false) => {}
        Err(stat) => count(stat),
    }
    0
}

fn try_switch_out(ctx: &BtfTracePointContext) -> Result<(), Stat> {
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return Err(Stat::OffCpuIdle);
    }
    if prev_state & TASK_DEAD != 0 {
        return Err(Stat::OffCpuExiting);
    }
    if filter_by_pid() && PID_FILTER.get_ptr(tgid).is_none() {
        return Err(Stat::OffCpuFiltered);
    }
    let below = off_cpu_sample_below();
    // SAFETY: no preconditions.
    if below != u32::MAX && unsafe { bpf_get_prandom_u32() } >= below {
        return Err(Stat::OffCpuUnsampled);
    }
    // SAFETY: no preconditions.
    let task = unsafe { bpf_get_current_task_btf() };
    let mut blocked = BlockedThread {
        // SAFETY: no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        tid,
        syscall: -1,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        ..BlockedThread::default()
    };
    // `preempt` is a bool in a 64-bit slot.
    if preempt & 0xff != 0 || prev_state == TASK_RUNNING {
        blocked.flags |= BLOCKED_INVOLUNTARY;
    }
    // SAFETY: the current task is a valid task pointer.
    match unsafe { task_user_regs(task) } {
        // ip 0: a kernel thread, which has no user stack.
        None => blocked.flags |= BLOCKED_NO_USER,
        Some(regs) if regs.ip == 0 => blocked.flags |= BLOCKED_NO_USER,
        Some(regs) if regs.in_syscall() => {
            blocked.flags |= BLOCKED_IN_SYSCALL;
            blocked.syscall = regs.orig_ax;
        }
        Some(regs) => {
            count(Stat::OffCpuEagerWalks);
            // Entered through a system call (or an exception with an error
            // code): the thread may be inside a C library wrapper.
            let hash = walk_user_stack(&regs, SCRATCH_SWITCH_USER, regs.orig_ax >= 0);
            let stored = with_window(|w| Ok(store_stack(hash, SCRATCH_SWITCH_USER, w.stacks)));
            if hash != 0 && stored == Ok(true) {
                blocked.user_stack = hash;
            } else {
                count(Stat::DropUserStackFull);
            }
        }
    }
    OFF_CPU_START
        .insert(&(task as u64), &blocked, 0)
        .map_err(|_| Stat::OffCpuStartFull)
}

fn try_switch_in(ctx: &BtfTracePointContext) -> Result<(), Stat> {
    let next: *mut task_struct = ctx.arg(2);
    let key = next as u64;
    let Some(start) = OFF_CPU_START.get_ptr(&key) else {
        return Ok(());
    };
    // SAFETY: a value the map returned; copied before the entry is removed.
    let mut blocked = unsafe { *start };
    let _ = OFF_CPU_START.remove(&key);
    count(Stat::OffCpuWoken);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let blocked_ns = now.saturating_sub(blocked.time_ns);
    if blocked_ns < off_cpu_min_ns() {
        count(Stat::OffCpuBelowMin);
        add(Stat::OffCpuBelowMinNs, blocked_ns);
        return Ok(());
    }
    blocked.time_ns = blocked_ns;
    if blocked.flags & BLOCKED_IN_SYSCALL != 0 {
        blocked.blocked_stack = with_window(|w| Ok(blocked_kernel_stack(next, w)))?;
        OFF_CPU_PENDING
            .insert(&blocked.tid, &blocked, 0)
            .map_err(|_| Stat::OffCpuPendingFull)?;
        count(Stat::OffCpuDeferred);
        return Ok(());
    }
    with_window(|w| {
        blocked.blocked_stack = blocked_kernel_stack(next, w);
        record_wait(&blocked, now, w)
    })?;
    count(Stat::OffCpuRecorded);
    Ok(())
}

/// True when a pending wait of the current thread was recorded.
fn try_syscall_exit() -> Result<bool, Stat> {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(pending) = OFF_CPU_PENDING.get_ptr(&tid) else {
        return Ok(false);
    };
    // SAFETY: a value the map returned; copied before the entry is removed.
    let mut blocked = unsafe { *pending };
    let _ = OFF_CPU_PENDING.remove(&tid);
    // SAFETY: the current task is a valid task pointer.
    let regs =
        unsafe { task_user_regs(bpf_get_current_task_btf()) }.ok_or(Stat::OffCpuPendingStale)?;
    if regs.orig_ax != blocked.syscall {
        return Err(Stat::OffCpuPendingStale);
    }
    let hash = walk_user_stack(&regs, SCRATCH_SYSCALL_EXIT, true);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    with_window(|w| {
        if hash != 0 && store_stack(hash, SCRATCH_SYSCALL_EXIT, w.stacks) {
            blocked.user_stack = hash;
        } else {
            count(Stat::DropUserStackFull);
        }
        record_wait(&blocked, now, w)
    })?;
    Ok(true)
}

/// Adds one wait of `blocked.time_ns` to the window's counts.
#[inline(always)]
fn record_wait(blocked: &BlockedThread, now: u64, window: &Window) -> Result<(), Stat> {
    let mut key = SampleKey {
        tgid: blocked.tgid,
        tid: blocked.tid,
        user_stack: blocked.user_stack,
        blocked_stack: blocked.blocked_stack,
        kernel_stack: -1,
        flags: SAMPLE_OFF_CPU,
        comm: blocked.comm,
    };
    if blocked.flags & BLOCKED_INVOLUNTARY != 0 {
        key.flags |= SAMPLE_INVOLUNTARY;
    }
    add_count(
        window.counts,
        &key,
        now,
        blocked.time_ns,
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
