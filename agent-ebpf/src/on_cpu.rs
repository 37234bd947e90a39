//! On-CPU sampling: a perf_event program on the CPU clock of every CPU.
//!
//! Per sample it records the user stack (walked with unwind tables or
//! frame pointers, see `stack.rs`; deduplicated by hash into the window's
//! `STACKS` map) and, only when the sample interrupted kernel mode, the
//! kernel stack. Counts are aggregated
//! in the window's `COUNTS` map, so the common case sends nothing to
//! userspace.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
    },
    macros::perf_event,
    programs::{tracing::StackIdContext, PerfEventContext},
};
use hearth_ebpf::{SampleKey, Stat, SAMPLE_IN_KERNEL};

use crate::maps::{
    add_count, bump, count, filtered_out, store_stack, with_window, Window, SCRATCH_ON_CPU,
};
use crate::stack::{task_user_regs, walk_user_stack, UserRegs};

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    count(Stat::Samples);
    match try_on_cpu_sample(&ctx) {
        Ok(()) => count(Stat::Recorded),
        Err(stat) => count(stat),
    }
    0
}

fn try_on_cpu_sample(ctx: &PerfEventContext) -> Result<(), Stat> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return Err(Stat::Idle);
    }
    if filtered_out(tgid) {
        return Err(Stat::Filtered);
    }
    crate::process_events::note_sampled(tgid);
    with_window(|window| record(ctx, tgid, tid, window))
}

#[inline(always)]
fn record(ctx: &PerfEventContext, tgid: u32, tid: u32, window: &Window) -> Result<(), Stat> {
    // SAFETY: perf_event programs may read the pt_regs at the start of
    // their context directly.
    let (cs, interrupted) = unsafe {
        let regs = core::ptr::addr_of!((*ctx.ctx).regs);
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*regs).cs)),
            UserRegs {
                ip: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rip)),
                fp: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rbp)),
                sp: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rsp)),
                orig_ax: -1,
                ax: 0,
            },
        )
    };
    let in_kernel = cs & 3 == 0;

    let mut key = SampleKey {
        tgid,
        tid,
        user_stack: 0,
        blocked_stack: 0,
        kernel_stack: -1,
        flags: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };

    if in_kernel {
        key.flags |= SAMPLE_IN_KERNEL;
        match ctx.get_stackid(window.kernel_stacks, 0) {
            Ok(id) => key.kernel_stack = id as i32,
            Err(_) => count(Stat::DropKernelStack),
        }
    }

    let user_regs = if in_kernel {
        // SAFETY: the current task is a valid task pointer.
        unsafe { task_user_regs(bpf_get_current_task_btf()) }
    } else {
        Some(interrupted)
    };
    match user_regs {
        // ip 0: a kernel thread, which has no user stack.
        Some(UserRegs { ip: 0, .. }) => {}
        Some(regs) => key.user_stack = walk_user_stack(&regs, SCRATCH_ON_CPU, false),
        None => count(Stat::UserRegsUnavailable),
    }

    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // A thread on the same stack as before in this window: its stack is
    // stored already, and the one count lookup does it all.
    if let Some(value) = window.counts.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a value the map returned.
        unsafe { bump(value, now, 0) };
        return Ok(());
    }
    if key.user_stack != 0 && !store_stack(key.user_stack, SCRATCH_ON_CPU, window.stacks) {
        count(Stat::DropUserStackFull);
        key.user_stack = 0;
    }
    add_count(window.counts, &key, now, 0, Stat::DropCountsFull)
}
