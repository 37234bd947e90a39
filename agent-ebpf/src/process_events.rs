//! Process lifecycle: execs and exits, sent to userspace through the
//! `PROCESS_EVENTS` ring buffer.
//!
//! A process that lives less than a drain interval is gone from /proc by
//! the time its samples are symbolized. The first on-CPU sample of a
//! process not in `REPORTED_PROCS` (one that forked, or exec'd, since it
//! was last reported) sends a sampled event that lets userspace read its
//! mappings (and open the mapped files) while it runs; the exec event
//! tells userspace that image is a new one, and the exit event when
//! caches keyed by that process can go. Both fire at process rate, not
//! sample rate, and do no more than one ring-buffer reservation; a full
//! buffer is counted (`ProcessEventsLost`), never waited on. Execs and
//! exits are submitted without waking the reader (see [`send`]).
//!
//! The exit program also deletes the process's `PID_FILTER` entry, so a
//! reused pid never inherits a filter decision made for another process.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use hearth_ebpf::{
    ProcessEvent, Stat, FILTER_NAMES, FILTER_PIDS, PROCESS_EVENT_EXEC, PROCESS_EVENT_EXIT,
    PROCESS_EVENT_SAMPLED,
};

use crate::maps::{count, filter_flags, filtered_out, PID_FILTER, PROCESS_EVENTS, REPORTED_PROCS};

/// `sched_process_exec(struct task_struct *p, pid_t old_pid,
/// struct linux_binprm *bprm)`, in the context of the process, after its
/// new image is mapped (the executable and its interpreter; libraries
/// follow when the interpreter runs).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn process_exec(_ctx: BtfTracePointContext) -> u32 {
    count(Stat::ProcessExecs);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A new image: its first sample is reported again. Userspace reads
    // the mappings then, not now: most short-lived processes are never
    // sampled. (Before the filter check: a cgroup's verdict can change.)
    let _ = REPORTED_PROCS.remove(&tgid);
    // Without name rules, the filter's verdict cannot change at exec:
    // processes it leaves out need no early capture.
    if filter_flags() & FILTER_NAMES == 0 && filtered_out(tgid) {
        return 0;
    }
    let _ = send(PROCESS_EVENT_EXEC, tgid);
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
    let _ = REPORTED_PROCS.remove(&tgid);
    let _ = send(PROCESS_EVENT_EXIT, tgid);
    0
}

/// Called for every on-CPU sample: the first one of a process since its
/// exec or fork asks userspace to read the process's mappings while it
/// runs. One lookup per sample; the rest once per process image.
#[inline(always)]
pub fn note_sampled(tgid: u32) {
    if REPORTED_PROCS.get_ptr(&tgid).is_some() {
        return;
    }
    // BPF_NOEXIST: of two CPUs sampling threads of the process at once,
    // one reports it.
    if REPORTED_PROCS.insert(&tgid, &1, BPF_NOEXIST as u64).is_ok()
        && !send(PROCESS_EVENT_SAMPLED, tgid)
    {
        // Lost (counted): the next sample tries again.
        let _ = REPORTED_PROCS.remove(&tgid);
    }
}

/// Whether the event was written (a full ring is counted).
#[inline(always)]
fn send(kind: u32, pid: u32) -> bool {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<ProcessEvent>(0) else {
        count(Stat::ProcessEventsLost);
        return false;
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
    true
}
