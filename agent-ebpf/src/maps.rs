//! Maps shared by the kernel programs, and the stats counter helper.
//!
//! Sizes here are defaults; userspace sets the real ones at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
};
use hearth_ebpf::{SampleCount, SampleKey, Stat, UserStack, CONTROL_ENTRIES};

/// `CONTROL[CONTROL_ACTIVE_WINDOW]`: the window (0 or 1) programs write to.
#[map]
pub static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_ENTRIES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Process ids to sample when `FILTER_BY_PID` is set; the value is unused.
#[map]
pub static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Per-CPU buffer the frame walker fills before the stack is deduplicated
/// into a `USER_STACKS_*` map (a stack does not fit the 512-byte BPF stack).
#[map]
pub static SCRATCH_STACK: PerCpuArray<UserStack> = PerCpuArray::with_max_entries(1, 0);

// Double-buffered per-window maps: programs write to the window named by
// CONTROL while userspace drains and clears the other one, so a drain
// neither loses nor double-counts samples.
#[map]
pub static COUNTS_0: PerCpuHashMap<SampleKey, SampleCount> =
    PerCpuHashMap::with_max_entries(16384, 0);
#[map]
pub static COUNTS_1: PerCpuHashMap<SampleKey, SampleCount> =
    PerCpuHashMap::with_max_entries(16384, 0);
#[map]
pub static USER_STACKS_0: HashMap<u64, UserStack> = HashMap::with_max_entries(8192, 0);
#[map]
pub static USER_STACKS_1: HashMap<u64, UserStack> = HashMap::with_max_entries(8192, 0);
#[map]
pub static KERNEL_STACKS_0: StackTrace = StackTrace::with_max_entries(4096, 0);
#[map]
pub static KERNEL_STACKS_1: StackTrace = StackTrace::with_max_entries(4096, 0);

/// Non-zero: sample only the processes in `PID_FILTER`. Set by userspace at
/// load time (read-only data, so the verifier prunes the check when zero).
#[unsafe(no_mangle)]
pub static FILTER_BY_PID: u8 = 0;

#[inline(always)]
pub fn filter_by_pid() -> bool {
    // Volatile: otherwise the compiler folds the initial value into the code.
    unsafe { core::ptr::read_volatile(&FILTER_BY_PID) != 0 }
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot and programs do not nest on one CPU for this event:
        // a plain add suffices.
        unsafe { *slot += 1 };
    }
}
