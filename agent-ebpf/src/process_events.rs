//! Process lifecycle: execs and exits, sent to userspace through the
//! `PROCESS_EVENTS` ring buffer.
//!
//! A process that lives less than a drain interval is gone from /proc by
//! the time its samples are symbolized. The exec event marks it fresh; its
//! first on-CPU sample then sends a sampled event that lets userspace read
//! its mappings (and open the mapped files) while it runs, and the exit
//! event tells it when caches keyed by that process can go. Both fire at
//! process rate, not sample rate, and do no more than one ring-buffer
//! reservation; a full buffer is counted (`ProcessEventsLost`), never
//! waited on. Events are submitted without waking the reader (see
//! [`send`]).
//!
//! The exit program also deletes the process's `PID_FILTER` entry, so a
//! reused pid never inherits a filter decision made for another process.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use hearth_ebpf::{
    ProcessEvent, Stat, FILTER_NAMES, FILTER_PIDS, PROCESS_EVENT_EXEC, PROCESS_EVENT_EXIT,
    PROCESS_EVENT_SAMPLED,
};

use crate::maps::{count, filter_flags, filtered_out, FRESH_EXECS, PID_FILTER, PROCESS_EVENTS};

/// `sched_process_exec(struct task_struct *p, pid_t old_pid,
/// struct linux_binprm *bprm)`, in the context of the process, after its
/// new image is mapped (the executable and its interpreter; libraries
/// follow when the interpreter runs).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn process_exec(_ctx: BtfTracePointContext) -> u32 {
    count(Stat::ProcessExecs);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Without name rules, the filter's verdict cannot change at exec:
    // processes it leaves out need no early capture.
    if filter_flags() & FILTER_NAMES == 0 && filtered_out(tgid) {
        return 0;
    }
    // Userspace reads the mappings at the first sample, not now: most
    // short-lived processes are never sampled.
    let _ = FRESH_EXECS.insert(&tgid, &1, 0);
    send(PROCESS_EVENT_EXEC, tgid);
    0
}

/// `sched_process_exit(struct task_struct *p, bool group_dead)`, in the
/// context of the exiting thread.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn process_exit(ctx: BtfTracePointContext) -> u32 {
    let group_dead: u64 = ctx.arg(1);
    // A bool in a 64-bit slot: other threads' exits are not the process's.
    if group_dead & 0xff == 0 {
        return 0;
    }
    count(Stat::ProcessExits);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if filter_flags() & FILTER_PIDS != 0 {
        // Missing entries are the common case; the result does not matter.
        let _ = PID_FILTER.remove(&tgid);
    }
    let _ = FRESH_EXECS.remove(&tgid);
    send(PROCESS_EVENT_EXIT, tgid);
    0
}

/// Called for every on-CPU sample: the first one of a process since its
/// exec asks userspace to read the process's mappings while it runs.
#[inline(always)]
pub fn note_sampled(tgid: u32) {
    if FRESH_EXECS.get_ptr(&tgid).is_some() && FRESH_EXECS.remove(&tgid).is_ok() {
        send(PROCESS_EVENT_SAMPLED, tgid);
    }
}

#[inline(always)]
fn send(kind: u32, pid: u32) {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<ProcessEvent>(0) else {
        count(Stat::ProcessEventsLost);
        return;
    };
    entry.write(ProcessEvent {
        kind,
        pid,
        // SAFETY: no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    // Execs and exits do not wake the reader: waking it raises an
    // interrupt (an APIC write), which in a VM is an exit costing some
    // 20 µs per event, measured; userspace reads them when it next looks.
    // A first sample does: the process may live only milliseconds more,
    // and these come at most at the sampling rate of new processes.
    let flags = if kind == PROCESS_EVENT_SAMPLED {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}
