//! Types shared between hearth's kernel programs and its userspace agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the
//! layout the BPF program writes is exactly the layout userspace reads. With
//! the `user` feature they implement `aya::Pod` for use as map keys/values.
#![no_std]

/// Deepest user stack the frame walker records. Deeper stacks keep their
/// leaf-most frames and are flagged [`USER_STACK_TRUNCATED`].
pub const MAX_USER_FRAMES: usize = 127;

/// Names of the maps and globals, so userspace never spells them twice.
pub mod names {
    pub const ON_CPU_PROGRAM: &str = "on_cpu_sample";
    pub const CONTROL: &str = "CONTROL";
    pub const STATS: &str = "STATS";
    pub const PID_FILTER: &str = "PID_FILTER";
    pub const SCRATCH_STACK: &str = "SCRATCH_STACK";
    /// Per-window maps: index 0 and 1 of the double buffer.
    pub const COUNTS: [&str; 2] = ["COUNTS_0", "COUNTS_1"];
    pub const USER_STACKS: [&str; 2] = ["USER_STACKS_0", "USER_STACKS_1"];
    pub const KERNEL_STACKS: [&str; 2] = ["KERNEL_STACKS_0", "KERNEL_STACKS_1"];
    /// Global (read-only data): non-zero when only pids in `PID_FILTER` are sampled.
    pub const FILTER_BY_PID: &str = "FILTER_BY_PID";
}

/// Index into the `CONTROL` array map: which of the two windows the
/// programs currently write to (0 or 1). Userspace flips it, waits for
/// in-flight programs to finish, then drains the other window.
pub const CONTROL_ACTIVE_WINDOW: u32 = 0;
pub const CONTROL_ENTRIES: u32 = 1;

/// [`SampleKey::flags`]: the sample interrupted kernel mode.
pub const SAMPLE_IN_KERNEL: u32 = 1 << 0;
/// [`UserStack::flags`]: the walk stopped at [`MAX_USER_FRAMES`].
pub const USER_STACK_TRUNCATED: u32 = 1 << 0;

/// Key of the per-window count maps: one entry per distinct thread and
/// stack pair; the value is a per-CPU `u64` sample count.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Process id (kernel tgid).
    pub tgid: u32,
    /// Thread id (kernel pid).
    pub tid: u32,
    /// Key into the window's `USER_STACKS` map; 0 when there is no user
    /// stack (kernel threads).
    pub user_stack: u64,
    /// Id in the window's `KERNEL_STACKS` map, or -1 when the sample
    /// interrupted user mode (no kernel stack is walked then).
    pub kernel_stack: i32,
    /// `SAMPLE_*` bits.
    pub flags: u32,
    /// Thread name at sample time (so exited threads still have a name).
    pub comm: [u8; 16],
}

/// A user stack as walked by the kernel program, leaf first. `ips[0]` is
/// the interrupted instruction pointer, the others are return addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UserStack {
    pub len: u32,
    /// `USER_STACK_*` bits.
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
    /// Samples of processes excluded by the pid filter.
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
}

impl Stat {
    pub const COUNT: u32 = Stat::MapLookupFailed as u32 + 1;
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
        }
    }
}

/// The value of a `COUNTS` entry on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCount {
    /// Samples of this key on this CPU in the window.
    pub count: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the latest one, so exporters
    /// can say when a stack was last seen within the window.
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no implicit padding (checked below).
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::UserStack {}
    unsafe impl aya::Pod for super::SampleCount {}
}

// The layouts must have no implicit padding: a padding byte would carry
// garbage into hash keys and make identical samples different keys.
const _: () = assert!(core::mem::size_of::<SampleKey>() == 4 + 4 + 8 + 4 + 4 + 16);
const _: () = assert!(core::mem::size_of::<UserStack>() == 4 + 4 + 8 * MAX_USER_FRAMES);
const _: () = assert!(core::mem::size_of::<SampleCount>() == 8 + 8);
