//! Types shared between hearth's kernel programs and its userspace agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the
//! layout the BPF program writes is exactly the layout userspace reads. With
//! the `user` feature they implement `aya::Pod` for use as map keys/values.
#![no_std]

/// Deepest stack recorded (user stacks by the frame walker, kernel stacks of
/// blocked threads by `bpf_get_task_stack`). Deeper stacks keep their
/// leaf-most frames and are flagged [`STACK_TRUNCATED`].
pub const MAX_USER_FRAMES: usize = 127;

/// Helper id the kernel programs call in place of the kfunc
/// `bpf_task_work_schedule_resume_impl` (aya cannot emit kfunc calls yet);
/// userspace rewrites those calls before loading.
pub const TASK_WORK_RESUME_PLACEHOLDER: u32 = 0x7e57_0001;

/// Names of the maps and globals, so userspace never spells them twice.
pub mod names {
    pub const ON_CPU_PROGRAM: &str = "on_cpu_sample";
    pub const OFF_CPU_SWITCH_PROGRAM: &str = "off_cpu_switch";
    pub const OFF_CPU_SYSCALL_EXIT_PROGRAM: &str = "off_cpu_syscall_exit";
    pub const OFF_CPU_RSEQ_PROGRAM: &str = "off_cpu_rseq_return";
    /// Per-thread off-CPU state (task storage, kernel-private).
    pub const OFF_CPU_THREADS: &str = "OFF_CPU_THREADS";
    /// Array of u32: per slot, the threads hashed there that have a wait
    /// started or pending (see agent-ebpf's off_cpu.rs).
    pub const OFF_CPU_GATE: &str = "OFF_CPU_GATE";
    /// Global: blocked time below this many nanoseconds is not recorded.
    pub const OFF_CPU_MIN_NS: &str = "OFF_CPU_MIN_NS";
    /// Global: a switch-out is followed when `bpf_get_prandom_u32()` is
    /// below this; `u32::MAX` follows every switch.
    pub const OFF_CPU_SAMPLE_BELOW: &str = "OFF_CPU_SAMPLE_BELOW";
    /// Global: the cap on followed switch-outs per second per CPU; 0: none.
    pub const OFF_CPU_MAX_RATE: &str = "OFF_CPU_MAX_RATE";
    /// Global: non-zero when `off_cpu_syscall_exit` is attached (the
    /// kernel has no `rseq_update` tracepoint); see agent-ebpf's off_cpu.rs.
    pub const OFF_CPU_SYSCALL_EXIT: &str = "OFF_CPU_SYSCALL_EXIT";
    /// Global: non-zero makes the off-CPU programs return at once (the
    /// benchmark's floor: the cost of the tracepoints alone).
    pub const OFF_CPU_EMPTY: &str = "OFF_CPU_EMPTY";
    /// Global: non-zero when waits are finished by a BPF task work on the
    /// thread's return to user mode (no `rseq_update`/`sys_exit` program).
    pub const OFF_CPU_TASK_WORK: &str = "OFF_CPU_TASK_WORK";
    pub const CONTROL: &str = "CONTROL";
    pub const STATS: &str = "STATS";
    pub const PID_FILTER: &str = "PID_FILTER";
    /// Filter entries by cgroup v2 id ([`crate::FILTER_ENTRY_INCLUDE`] /
    /// [`crate::FILTER_ENTRY_EXCLUDE`]).
    pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
    /// Global (read-only data): `FILTER_*` bits, which filter checks run.
    pub const FILTER_FLAGS: &str = "FILTER_FLAGS";
    /// Global (read-only data): bit L set: the cgroup filter also checks
    /// the task's ancestor cgroup at level L (the levels of the paths
    /// given), so a cgroup's whole subtree matches.
    pub const FILTER_CGROUP_LEVELS: &str = "FILTER_CGROUP_LEVELS";
    pub const PROCESS_EXEC_PROGRAM: &str = "process_exec";
    pub const PROCESS_EXIT_PROGRAM: &str = "process_exit";
    /// Ring buffer of [`crate::ProcessEvent`]s.
    pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
    /// LRU hash, tgid → 1: processes whose image was reported sampled
    /// (userspace adds those running at start).
    pub const REPORTED_PROCS: &str = "REPORTED_PROCS";
    pub const SCRATCH_STACK: &str = "SCRATCH_STACK";
    /// Per-window maps: index 0 and 1 of the double buffer.
    pub const COUNTS: [&str; 2] = ["COUNTS_0", "COUNTS_1"];
    /// User stacks, and the kernel stacks of blocked threads, by hash.
    pub const STACKS: [&str; 2] = ["STACKS_0", "STACKS_1"];
    pub const KERNEL_STACKS: [&str; 2] = ["KERNEL_STACKS_0", "KERNEL_STACKS_1"];
    /// Unwind tables: rows of every loaded file, [`crate::UnwindRow`].
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// Unwind tables: page indexes of every loaded file, [`crate::UnwindPage`].
    pub const UNWIND_PAGES: &str = "UNWIND_PAGES";
    /// Unwind tables: where each file's rows are, [`crate::UnwindFile`].
    pub const UNWIND_FILES: &str = "UNWIND_FILES";
    /// Unwind tables: executable mappings of every loaded process, one
    /// process after another, [`crate::UnwindMapping`].
    pub const UNWIND_MAPPINGS: &str = "UNWIND_MAPPINGS";
    /// Unwind tables: where each process's mappings are, by tgid,
    /// [`crate::UnwindProc`].
    pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
    /// Global (read-only data): non-zero when unwind tables may be used.
    pub const UNWIND_TABLES: &str = "UNWIND_TABLES";
}

/// Index into the `CONTROL` array map: which of the two windows the
/// programs currently write to (0 or 1). Userspace flips it, waits for
/// in-flight programs to finish, then drains the other window.
pub const CONTROL_ACTIVE_WINDOW: u32 = 0;
/// Index into `CONTROL`: the off-CPU epoch, bumped by userspace each time
/// the off-CPU programs are attached. Per-thread state written under
/// another epoch (before a stop) is ignored, so no wait spans a detach.
pub const CONTROL_OFF_CPU_EPOCH: u32 = 1;
/// Index into `CONTROL`: woken threads whose wait is recorded when they
/// return to user mode or from their system call (kept by the kernel
/// programs, for the accounting of waits; a thread that exits or execs
/// first leaves its wait counted). Userspace resets it with the epoch.
pub const CONTROL_OFF_CPU_PENDING: u32 = 2;
pub const CONTROL_ENTRIES: u32 = 3;

/// `FILTER_FLAGS`: some include rule exists; a task matching none is
/// filtered out.
pub const FILTER_INCLUDE: u8 = 1 << 0;
/// `FILTER_FLAGS`: `PID_FILTER` holds entries (pid rules, or process-name
/// rules evaluated in userspace); exits delete them in the kernel.
pub const FILTER_PIDS: u8 = 1 << 1;
/// `FILTER_FLAGS`: `CGROUP_FILTER` holds entries.
pub const FILTER_CGROUPS: u8 = 1 << 2;
/// `FILTER_FLAGS`: process-name rules exist, so every exec is reported to
/// userspace (otherwise only those of processes the filter lets through).
pub const FILTER_NAMES: u8 = 1 << 3;
/// Value bit of a `PID_FILTER`/`CGROUP_FILTER` entry: included.
pub const FILTER_ENTRY_INCLUDE: u8 = 1 << 0;
/// Value bit of a filter entry: excluded (wins over included).
pub const FILTER_ENTRY_EXCLUDE: u8 = 1 << 1;
/// Deepest cgroup level `FILTER_CGROUP_LEVELS` can name.
pub const FILTER_MAX_CGROUP_LEVEL: u32 = 15;

/// [`ProcessEvent::kind`]: a process image began (`sched_process_exec`).
pub const PROCESS_EVENT_EXEC: u32 = 1;
/// [`ProcessEvent::kind`]: the last thread of a process exited
/// (`sched_process_exit` with `group_dead`).
pub const PROCESS_EVENT_EXIT: u32 = 2;
/// [`ProcessEvent::kind`]: the first on-CPU sample of a process since its
/// exec, or since it forked (a process never seen exec'ing); userspace
/// reads its mappings now (`time_ns` is the sample's).
pub const PROCESS_EVENT_SAMPLED: u32 = 3;
/// Entries of the `REPORTED_PROCS` LRU map.
pub const REPORTED_PROCS_ENTRIES: u32 = 16 * 1024;
/// Size of the `PROCESS_EVENTS` ring buffer (a power of two of pages).
pub const PROCESS_EVENTS_BYTES: u32 = 256 * 1024;

/// One exec or exit, as the process-event programs send it to userspace.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessEvent {
    /// `PROCESS_EVENT_*`.
    pub kind: u32,
    /// Process id (tgid).
    pub pid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the event.
    pub time_ns: u64,
    /// The process name after the exec (the exiting thread's at exit).
    pub comm: [u8; 16],
}

/// [`SampleKey::flags`]: the sample interrupted kernel mode.
pub const SAMPLE_IN_KERNEL: u32 = 1 << 0;
/// [`SampleKey::flags`]: an off-CPU sample; the value holds blocked time.
pub const SAMPLE_OFF_CPU: u32 = 1 << 1;
/// [`SampleKey::flags`]: off CPU while runnable (preempted), as opposed to
/// a voluntary wait (sleep, I/O, lock).
pub const SAMPLE_INVOLUNTARY: u32 = 1 << 2;
/// [`Stack::flags`]: the walk stopped at [`MAX_USER_FRAMES`].
pub const STACK_TRUNCATED: u32 = 1 << 0;
/// [`Stack::flags`]: a kernel stack (of a blocked thread).
pub const STACK_KERNEL: u32 = 1 << 1;

/// Key of the per-window count maps: one entry per distinct thread and
/// stack pair (and, for off-CPU samples, kind of wait).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Process id (kernel tgid).
    pub tgid: u32,
    /// Thread id (kernel pid).
    pub tid: u32,
    /// Key into the window's `STACKS` map; 0 when there is no user
    /// stack (kernel threads).
    pub user_stack: u64,
    /// Off-CPU samples: key into the window's `STACKS` map of the kernel
    /// stack the thread blocked in; 0 when there is none.
    pub blocked_stack: u64,
    /// Id in the window's `KERNEL_STACKS` map, or -1 when the sample
    /// interrupted user mode (no kernel stack is walked then).
    pub kernel_stack: i32,
    /// `SAMPLE_*` bits.
    pub flags: u32,
    /// Thread name at sample time (so exited threads still have a name).
    pub comm: [u8; 16],
}

/// A stack, leaf first. For user stacks `ips[0]` is the interrupted
/// instruction pointer and the others are return addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Stack {
    pub len: u32,
    /// `STACK_*` bits.
    pub flags: u32,
    pub ips: [u64; MAX_USER_FRAMES],
}

/// Counters the kernel programs keep in the per-CPU `STATS` array, one
/// slot per variant. Userspace sums them over CPUs and reports them.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// Every time the on-CPU program ran.
    Samples = 0,
    /// Samples of an idle CPU (pid 0): dropped without any stack work.
    Idle,
    /// Samples of processes left out by the filter (pid, process name or
    /// cgroup): no stack walk.
    Filtered,
    /// Samples recorded into a count map.
    Recorded,
    /// Count map full: the sample was lost.
    DropCountsFull,
    /// User stack map full: the sample was recorded without user stack.
    DropUserStackFull,
    /// `bpf_get_stackid` failed for the kernel stack (map full or hash
    /// collision): the sample was recorded without kernel stack.
    DropKernelStack,
    /// User stack walk hit [`MAX_USER_FRAMES`].
    UserStackTruncated,
    /// User stack walk ended on an unreadable frame (often the normal end
    /// of a stack whose outermost frame has no frame pointer).
    UserStackReadFault,
    /// Could not read the user registers of a thread interrupted in kernel mode.
    UserRegsUnavailable,
    /// The interrupted function had no frame of its own (a frameless leaf,
    /// or a prologue) and its caller was recovered from the stack top.
    FramelessCallerRecovered,
    /// Internal error: a map lookup that cannot fail did.
    MapLookupFailed,
    /// Every run of the off-CPU switch program (one per context switch).
    OffCpuSwitches,
    /// The outgoing task was a CPU's idle task: never followed.
    OffCpuIdle,
    /// The outgoing process is excluded by the pid filter.
    OffCpuFiltered,
    /// The outgoing thread was left out by the sampling probability or the
    /// rate cap (the waits followed are scaled up for it).
    OffCpuUnsampled,
    /// The outgoing task was exiting (its last switch).
    OffCpuExiting,
    /// A thread left the CPU and its start time was stored.
    OffCpuStarted,
    /// No per-thread storage could be had (out of memory): the wait is not
    /// followed.
    OffCpuNoThreadStorage,
    /// A followed thread came back on CPU.
    OffCpuWoken,
    /// A thread came back whose start was stored before the programs were
    /// last attached: ignored.
    OffCpuStartStale,
    /// Woken after less than the minimum blocked time: not recorded.
    OffCpuBelowMin,
    /// Nanoseconds of the waits counted in `OffCpuBelowMin`.
    OffCpuBelowMinNs,
    /// Woken inside a system call: recorded when the call returns.
    OffCpuDeferred,
    /// A thread blocked again, long enough, before the system call of its
    /// deferred wait returned, with another kernel stack: the earlier wait
    /// was lost. (With the same kernel stack the two waits are merged.)
    OffCpuPendingReplaced,
    /// A thread blocked again, long enough, in the same place before the
    /// system call of its deferred wait returned: the two waits are
    /// recorded as one (time summed).
    OffCpuPendingMerged,
    /// A wait was added to a count map.
    OffCpuRecorded,
    /// Count map full: a wait was lost.
    OffCpuDropCountsFull,
    /// Stack map full or `bpf_get_task_stack` failed: the wait was recorded
    /// without its kernel stack.
    OffCpuDropKernelStack,
    /// A thread slept in a page fault: its wait is recorded with the
    /// faulting instruction only as user stack.
    OffCpuUserLeafOnly,
    /// User stacks walked when a thread left the CPU outside a system call
    /// (preempted in user mode, or a page fault), before the wait's length
    /// is known.
    OffCpuEagerWalks,
    /// A deferred wait reached a system call exit of another call (the
    /// programs were re-attached in between): dropped.
    OffCpuPendingStale,
    /// A finished wait could not be handed to a task work for its thread's
    /// return to user mode (one already queued for the thread, a full map,
    /// or the kernel refused): lost.
    OffCpuTaskWorkFailed,
    /// User stacks walked with unwind tables (the process's mappings are
    /// loaded); the others are walked through frame pointers only. The
    /// `Unwind*` counters below count walks with tables on (`--unwind
    /// auto|dwarf`), loaded processes or not.
    UnwindTableWalks,
    /// A walk ended cleanly: the outermost frame (return address
    /// undefined), a zero return address or a null frame pointer.
    UnwindEndOfStack,
    /// A walk stopped at anonymous executable memory (JIT code).
    UnwindStopAnonymous,
    /// A pc outside every mapping loaded for its process (mapped after the
    /// process was scanned): the frame was walked through frame pointers.
    UnwindNoMapping,
    /// A pc that no row covers: the frame was walked through frame
    /// pointers.
    UnwindNoRow,
    /// Frames of files without a table walked through frame pointers.
    UnwindFramePointerFrames,
    /// Signal frames unwound (through the `ucontext` on the stack).
    UnwindSignalFrames,
    /// A walk could not read the stack where a rule (or rbp) pointed.
    UnwindReadFault,
    /// A walk stopped at a rule it cannot evaluate, a CFA that does not
    /// move up the stack, or a lost frame pointer.
    UnwindBadFrame,
    /// Execs reported by the process-event program.
    ProcessExecs,
    /// Process exits (last thread) seen by the process-event program.
    ProcessExits,
    /// Process events lost because the ring buffer was full (userspace did
    /// not keep up): those processes are symbolized from /proc at drain.
    ProcessEventsLost,
}

impl Stat {
    pub const COUNT: u32 = Stat::ProcessEventsLost as u32 + 1;
    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::Samples,
        Stat::Idle,
        Stat::Filtered,
        Stat::Recorded,
        Stat::DropCountsFull,
        Stat::DropUserStackFull,
        Stat::DropKernelStack,
        Stat::UserStackTruncated,
        Stat::UserStackReadFault,
        Stat::UserRegsUnavailable,
        Stat::FramelessCallerRecovered,
        Stat::MapLookupFailed,
        Stat::OffCpuSwitches,
        Stat::OffCpuIdle,
        Stat::OffCpuFiltered,
        Stat::OffCpuUnsampled,
        Stat::OffCpuExiting,
        Stat::OffCpuStarted,
        Stat::OffCpuNoThreadStorage,
        Stat::OffCpuWoken,
        Stat::OffCpuStartStale,
        Stat::OffCpuBelowMin,
        Stat::OffCpuBelowMinNs,
        Stat::OffCpuDeferred,
        Stat::OffCpuPendingReplaced,
        Stat::OffCpuPendingMerged,
        Stat::OffCpuRecorded,
        Stat::OffCpuDropCountsFull,
        Stat::OffCpuDropKernelStack,
        Stat::OffCpuUserLeafOnly,
        Stat::OffCpuEagerWalks,
        Stat::OffCpuPendingStale,
        Stat::OffCpuTaskWorkFailed,
        Stat::UnwindTableWalks,
        Stat::UnwindEndOfStack,
        Stat::UnwindStopAnonymous,
        Stat::UnwindNoMapping,
        Stat::UnwindNoRow,
        Stat::UnwindFramePointerFrames,
        Stat::UnwindSignalFrames,
        Stat::UnwindReadFault,
        Stat::UnwindBadFrame,
        Stat::ProcessExecs,
        Stat::ProcessExits,
        Stat::ProcessEventsLost,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Samples => "samples",
            Stat::Idle => "idle",
            Stat::Filtered => "filtered",
            Stat::Recorded => "recorded",
            Stat::DropCountsFull => "drop_counts_full",
            Stat::DropUserStackFull => "drop_user_stack_full",
            Stat::DropKernelStack => "drop_kernel_stack",
            Stat::UserStackTruncated => "user_stack_truncated",
            Stat::UserStackReadFault => "user_stack_read_fault",
            Stat::UserRegsUnavailable => "user_regs_unavailable",
            Stat::FramelessCallerRecovered => "frameless_caller_recovered",
            Stat::MapLookupFailed => "map_lookup_failed",
            Stat::OffCpuSwitches => "off_cpu_switches",
            Stat::OffCpuIdle => "off_cpu_idle",
            Stat::OffCpuFiltered => "off_cpu_filtered",
            Stat::OffCpuUnsampled => "off_cpu_unsampled",
            Stat::OffCpuExiting => "off_cpu_exiting",
            Stat::OffCpuStarted => "off_cpu_started",
            Stat::OffCpuNoThreadStorage => "off_cpu_no_thread_storage",
            Stat::OffCpuWoken => "off_cpu_woken",
            Stat::OffCpuStartStale => "off_cpu_start_stale",
            Stat::OffCpuBelowMin => "off_cpu_below_min",
            Stat::OffCpuBelowMinNs => "off_cpu_below_min_ns",
            Stat::OffCpuDeferred => "off_cpu_deferred",
            Stat::OffCpuPendingReplaced => "off_cpu_pending_replaced",
            Stat::OffCpuPendingMerged => "off_cpu_pending_merged",
            Stat::OffCpuRecorded => "off_cpu_recorded",
            Stat::OffCpuDropCountsFull => "off_cpu_drop_counts_full",
            Stat::OffCpuDropKernelStack => "off_cpu_drop_kernel_stack",
            Stat::OffCpuUserLeafOnly => "off_cpu_user_leaf_only",
            Stat::OffCpuEagerWalks => "off_cpu_eager_walks",
            Stat::OffCpuPendingStale => "off_cpu_pending_stale",
            Stat::OffCpuTaskWorkFailed => "off_cpu_task_work_failed",
            Stat::UnwindTableWalks => "unwind_table_walks",
            Stat::UnwindEndOfStack => "unwind_end_of_stack",
            Stat::UnwindStopAnonymous => "unwind_stop_anonymous",
            Stat::UnwindNoMapping => "unwind_no_mapping",
            Stat::UnwindNoRow => "unwind_no_row",
            Stat::UnwindFramePointerFrames => "unwind_frame_pointer_frames",
            Stat::UnwindSignalFrames => "unwind_signal_frames",
            Stat::UnwindReadFault => "unwind_read_fault",
            Stat::UnwindBadFrame => "unwind_bad_frame",
            Stat::ProcessExecs => "process_execs",
            Stat::ProcessExits => "process_exits",
            Stat::ProcessEventsLost => "process_events_lost",
        }
    }
}

/// The value of a `COUNTS` entry on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCount {
    /// Samples (on-CPU) or waits (off-CPU) of this key on this CPU in the
    /// window.
    pub count: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the latest one, so exporters
    /// can say when a stack was last seen within the window.
    pub last_seen_ns: u64,
    /// Off-CPU samples: nanoseconds blocked, summed over the waits.
    pub off_cpu_ns: u64,
}

// ---------------------------------------------------------------------------
// Table-driven unwinding (.eh_frame / .debug_frame)
//
// Userspace turns each executable file's call frame information into a
// sorted array of `UnwindRow`s: from a row's `pc` up to the next row's, the
// rule it holds says how to find the caller's frame. Every loaded file's
// rows sit in one shared array map (`UNWIND_ROWS`), at the place the file's
// `UnwindFile` names, with a page index (`UNWIND_PAGES`, one `UnwindPage`
// per KiB of code) that narrows the search to a few rows; a process's executable mappings, sorted, each with
// the file it maps and its load bias, sit likewise in `UNWIND_MAPPINGS`
// where its `UnwindProc` says. The kernel walker binary-searches the
// mapping, then the rows, per frame. Both searches go through array map
// lookups rather than pointer arithmetic: the verifier needs no exact
// index then, which keeps the number of states it explores small.
//
// Row format (8 bytes): `pc` (u32, file address minus the table's base, so
// a table covers 4 GiB of code), `cfa_offset` (u16), `rule` (u8: low nibble
// the CFA rule, high nibble the return-address rule) and `fp_offset` (i8,
// where the caller's frame pointer was saved, in 8-byte units from the
// CFA; 0: unchanged). A row whose rule is `UNWIND_CFA_NONE` ends the
// previous range (a gap between functions).
//
// arm64 plan: the same row. The CFA register is sp or x29 (`UNWIND_CFA_SP`,
// `UNWIND_CFA_FP`); the return address is either still in x30 (leaf
// functions and prologues: `UNWIND_RA_LINK_REGISTER`) or saved in the frame
// record at CFA-8 (`UNWIND_RA_AT_CFA`, as on x86-64), with x29 at CFA-16
// (`fp_offset` -2). PLT and signal rules are per architecture.
// ---------------------------------------------------------------------------

/// Most executable mappings one process's [`UnwindProc`] holds; the rest
/// fall back to frame pointers.
pub const UNWIND_MAX_MAPPINGS: usize = 128;
/// Entries of `UNWIND_MAPPINGS`: all loaded processes' mappings.
pub const UNWIND_MAPPING_ENTRIES: u32 = 64 * 1024;
/// Binary-search steps over a process's mappings (2^7 = 128).
pub const UNWIND_MAPPING_SEARCH_STEPS: usize = 7;
/// Most rows one file's table may have; the kernel's binary search over
/// rows takes this many steps' log2.
pub const UNWIND_MAX_FILE_ROWS: u32 = 1 << UNWIND_ROW_SEARCH_STEPS;
pub const UNWIND_ROW_SEARCH_STEPS: usize = 22;
/// Code bytes per page index entry: 2^10, a few rows each.
pub const UNWIND_PAGE_SHIFT: u32 = 10;

/// [`UnwindRow::rule`] low nibble: no call frame information covers this
/// address (a gap between functions); frame pointers are tried.
pub const UNWIND_CFA_NONE: u8 = 0;
/// CFA = stack pointer + 8 × `cfa_offset`.
pub const UNWIND_CFA_SP: u8 = 1;
/// CFA = frame pointer (rbp) + 8 × `cfa_offset`.
pub const UNWIND_CFA_FP: u8 = 2;
/// x86-64 PLT entries: CFA = rsp + 8, + 8 more when `(pc & 15) >=
/// cfa_offset` (the expression every linker emits for `.plt`).
pub const UNWIND_CFA_PLT: u8 = 3;
/// A signal trampoline (`__restore_rt`): the interrupted registers are in
/// the `ucontext` at the stack pointer.
pub const UNWIND_CFA_SIGNAL: u8 = 4;
/// The return address is undefined: the outermost frame (`_start`, a
/// thread's start routine).
pub const UNWIND_CFA_END: u8 = 5;
/// A rule the kernel cannot evaluate (other DWARF expressions, register
/// rules): the walk stops there, counted.
pub const UNWIND_CFA_UNSUPPORTED: u8 = 6;
/// Mask of the CFA rule in [`UnwindRow::rule`].
pub const UNWIND_CFA_MASK: u8 = 0x0f;
/// [`UnwindRow::rule`] high nibble: the return address is at CFA-8
/// (always on x86-64).
pub const UNWIND_RA_AT_CFA: u8 = 0x00;
/// arm64 (not used on x86-64): the return address is still in the link
/// register.
pub const UNWIND_RA_LINK_REGISTER: u8 = 0x10;
/// [`UnwindRow::fp_offset`]: the caller's frame pointer cannot be
/// recovered (saved where a row cannot say); CFA rules based on it fail.
pub const UNWIND_FP_LOST: i8 = i8::MIN;

/// [`UnwindMapping::kind`]: the mapped file has a table.
pub const UNWIND_MAPPING_TABLE: u32 = 1;
/// A file without a table (`--unwind fp`, a file built with frame
/// pointers under `auto`, no call frame information, or over the memory
/// cap): frame pointers.
pub const UNWIND_MAPPING_FP: u32 = 2;
/// Anonymous executable memory (JIT code): the walk stops there.
pub const UNWIND_MAPPING_ANONYMOUS: u32 = 3;

/// One row of a file's unwind table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// First address the row covers, relative to the table's base.
    pub pc: u32,
    /// In 8-byte units (`UNWIND_CFA_SP`/`FP`), or the PLT threshold.
    pub cfa_offset: u16,
    /// `UNWIND_CFA_*` | `UNWIND_RA_*`.
    pub rule: u8,
    /// The caller's frame pointer is at CFA + 8 × this (negative); 0: the
    /// register keeps its value; [`UNWIND_FP_LOST`]: unknown.
    pub fp_offset: i8,
}

/// Where one file's rows are in `UNWIND_ROWS`, and its page index in
/// `UNWIND_PAGES`.
///
/// The page index narrows the binary search to the few rows that can be in
/// force in one page of code (see [`UnwindPage`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindFile {
    pub rows_start: u32,
    pub rows_len: u32,
    pub pages_start: u32,
    /// 0: no index; the search covers every row.
    pub pages_len: u32,
}

/// Page index entry `i` of a file: the rows that can be in force in its
/// table-relative addresses `[i << UNWIND_PAGE_SHIFT, (i + 1) <<
/// UNWIND_PAGE_SHIFT)`, `count` rows from row `first` (the row in force at
/// the page's start, and those starting in the page). Eight bytes, as array
/// map elements are.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindPage {
    pub first: u32,
    pub count: u32,
}

/// One executable mapping of a process.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    /// Address range `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// Address − `bias` = the table-relative pc of [`UnwindRow::pc`].
    pub bias: u64,
    /// Index into `UNWIND_FILES` (`UNWIND_MAPPING_TABLE` only).
    pub file: u32,
    /// `UNWIND_MAPPING_*`.
    pub kind: u32,
}

/// Where one process's executable mappings are in `UNWIND_MAPPINGS`:
/// `len` entries from `start`, sorted by address.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindProc {
    pub start: u32,
    pub len: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no implicit padding (checked below).
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::Stack {}
    unsafe impl aya::Pod for super::SampleCount {}
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindFile {}
    unsafe impl aya::Pod for super::UnwindPage {}
    unsafe impl aya::Pod for super::UnwindMapping {}
    unsafe impl aya::Pod for super::UnwindProc {}
    unsafe impl aya::Pod for super::ProcessEvent {}
}

// The layouts must have no implicit padding: a padding byte would carry
// garbage into hash keys and make identical samples different keys.
const _: () = assert!(core::mem::size_of::<SampleKey>() == 4 + 4 + 8 + 8 + 4 + 4 + 16);
const _: () = assert!(core::mem::size_of::<Stack>() == 4 + 4 + 8 * MAX_USER_FRAMES);
const _: () = assert!(core::mem::size_of::<SampleCount>() == 8 + 8 + 8);
const _: () = assert!(core::mem::size_of::<UnwindRow>() == 8);
const _: () = assert!(core::mem::size_of::<UnwindFile>() == 16);
const _: () = assert!(core::mem::size_of::<UnwindPage>() == 8);
const _: () = assert!(core::mem::size_of::<UnwindMapping>() == 8 * 3 + 4 * 2);
const _: () = assert!(core::mem::size_of::<UnwindProc>() == 8);
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 4 + 4 + 8 + 16);
const _: () = assert!(1 << UNWIND_MAPPING_SEARCH_STEPS == UNWIND_MAX_MAPPINGS);
