//! Maps shared by the kernel programs, the window they write to, and the
//! stats counter helper.
//!
//! Sizes here are defaults; userspace sets the real ones at load time.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, StackTrace},
};
use hearth_ebpf::{
    BlockedThread, SampleCount, SampleKey, Stack, Stat, UnwindFile, UnwindMapping, UnwindPage,
    UnwindProc, UnwindRow, CONTROL_ACTIVE_WINDOW, CONTROL_ENTRIES, UNWIND_MAPPING_ENTRIES,
};

/// `CONTROL[CONTROL_ACTIVE_WINDOW]`: the window (0 or 1) programs write to.
#[map]
pub static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_ENTRIES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Process ids to sample when `FILTER_BY_PID` is set; the value is unused.
#[map]
pub static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Per-CPU buffers a stack is built in before it is deduplicated into a
/// `STACKS_*` map (a stack does not fit the 512-byte BPF stack). One slot
/// per use: the on-CPU program can interrupt the system-call-exit program
/// (the kernel keeps perf_event programs from nesting only in kprobes and
/// classic tracepoints), so they must not share a buffer.
#[map]
pub static SCRATCH_STACK: PerCpuArray<Stack> = PerCpuArray::with_max_entries(4, 0);
pub const SCRATCH_ON_CPU: u32 = 0;
pub const SCRATCH_SWITCH_USER: u32 = 1;
pub const SCRATCH_SWITCH_KERNEL: u32 = 2;
pub const SCRATCH_SYSCALL_EXIT: u32 = 3;

/// Threads off CPU, keyed by task pointer. Not per window: a wait may span
/// a drain. A thread that never runs again (blocked for good) keeps its
/// entry; a full map is counted (`OffCpuStartFull`) rather than evicting.
#[map]
pub static OFF_CPU_START: HashMap<u64, BlockedThread> = HashMap::with_max_entries(32768, 0);

/// Woken threads whose user stack is walked at their system call's exit,
/// keyed by thread id.
#[map]
pub static OFF_CPU_PENDING: HashMap<u32, BlockedThread> = HashMap::with_max_entries(8192, 0);

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
pub static STACKS_0: HashMap<u64, Stack> = HashMap::with_max_entries(8192, 0);
#[map]
pub static STACKS_1: HashMap<u64, Stack> = HashMap::with_max_entries(8192, 0);
#[map]
pub static KERNEL_STACKS_0: StackTrace = StackTrace::with_max_entries(4096, 0);
#[map]
pub static KERNEL_STACKS_1: StackTrace = StackTrace::with_max_entries(4096, 0);

/// Unwind tables of every loaded file, one after another (see
/// `hearth_ebpf::UnwindRow`). Userspace writes them through a memory
/// mapping of the array (no syscall per row) and sizes it: the table
/// memory cap.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Page indexes of the loaded files (see `hearth_ebpf::UnwindFile`),
/// written like `UNWIND_ROWS`; userspace sizes it.
#[map]
pub static UNWIND_PAGES: Array<UnwindPage> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Where each loaded file's rows are in `UNWIND_ROWS`.
#[map]
pub static UNWIND_FILES: Array<UnwindFile> = Array::with_max_entries(4096, 0);
/// Executable mappings of the processes whose tables are loaded.
#[map]
pub static UNWIND_MAPPINGS: Array<UnwindMapping> =
    Array::with_max_entries(UNWIND_MAPPING_ENTRIES, BPF_F_MMAPABLE);
/// Where each loaded process's mappings are in `UNWIND_MAPPINGS`, by tgid.
#[map]
pub static UNWIND_PROCS: HashMap<u32, UnwindProc> = HashMap::with_max_entries(8192, 0);

/// Non-zero: unwind tables may be loaded (`--unwind auto|dwarf`); zero
/// lets the verifier drop the table walker.
#[unsafe(no_mangle)]
pub static UNWIND_TABLES: u8 = 0;

#[inline(always)]
pub fn unwind_tables() -> bool {
    unsafe { core::ptr::read_volatile(&UNWIND_TABLES) != 0 }
}

/// Non-zero: sample only the processes in `PID_FILTER`. Set by userspace at
/// load time (read-only data, so the verifier prunes the check when zero).
#[unsafe(no_mangle)]
pub static FILTER_BY_PID: u8 = 0;

/// Waits shorter than this are counted but not recorded.
#[unsafe(no_mangle)]
pub static OFF_CPU_MIN_NS: u64 = 1_000_000;

/// Follow a switch-out when a random u32 is below this; `u32::MAX`: all.
#[unsafe(no_mangle)]
pub static OFF_CPU_SAMPLE_BELOW: u32 = u32::MAX;

// Volatile reads: otherwise the compiler folds the initial values into the
// code and userspace's overrides have no effect.
#[inline(always)]
pub fn filter_by_pid() -> bool {
    unsafe { core::ptr::read_volatile(&FILTER_BY_PID) != 0 }
}

#[inline(always)]
pub fn off_cpu_min_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&OFF_CPU_MIN_NS) }
}

#[inline(always)]
pub fn off_cpu_sample_below() -> u32 {
    unsafe { core::ptr::read_volatile(&OFF_CPU_SAMPLE_BELOW) }
}

#[inline(always)]
pub fn count(stat: Stat) {
    add(stat, 1);
}

#[inline(always)]
pub fn add(stat: Stat, n: u64) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot, and the programs that count do not interrupt one
        // another on a CPU (perf_event programs do not run while a tracing
        // program runs): a plain add suffices.
        unsafe { *slot += n };
    }
}

/// The maps of one window. Chosen once per run, and the code using them is
/// instantiated twice (see [`with_window`]): the verifier tracks map
/// pointers per instruction.
pub struct Window<'a> {
    pub counts: &'a PerCpuHashMap<SampleKey, SampleCount>,
    pub stacks: &'a HashMap<u64, Stack>,
    pub kernel_stacks: &'a StackTrace,
}

/// Calls `f` with the window programs write to now.
#[inline(always)]
pub fn with_window<T>(mut f: impl FnMut(&Window) -> Result<T, Stat>) -> Result<T, Stat> {
    let window = CONTROL
        .get(CONTROL_ACTIVE_WINDOW)
        .copied()
        .ok_or(Stat::MapLookupFailed)?;
    if window == 0 {
        f(&Window {
            counts: &COUNTS_0,
            stacks: &STACKS_0,
            kernel_stacks: &KERNEL_STACKS_0,
        })
    } else {
        f(&Window {
            counts: &COUNTS_1,
            stacks: &STACKS_1,
            kernel_stacks: &KERNEL_STACKS_1,
        })
    }
}

const EEXIST: i32 = 17;

/// Adds `count` events and `off_cpu_ns` to `key`'s count on this CPU,
/// creating it if needed. The count map is per-CPU, so adds need no
/// atomics (the BPF target has no atomic read-modify-write in `core`) and
/// CPUs never contend on a hot key; userspace sums the CPUs.
#[inline(always)]
pub fn add_count(
    counts: &PerCpuHashMap<SampleKey, SampleCount>,
    key: &SampleKey,
    now: u64,
    off_cpu_ns: u64,
    full: Stat,
) -> Result<(), Stat> {
    if let Some(value) = counts.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a value the map returned.
        unsafe { bump(value, now, off_cpu_ns) };
        return Ok(());
    }
    let first = SampleCount {
        count: 1,
        last_seen_ns: now,
        off_cpu_ns,
    };
    match counts.insert(key, first, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        // Another CPU inserted the same key between our lookup and insert.
        Err(e) if e == -EEXIST => match counts.get_ptr_mut(key) {
            Some(value) => {
                // SAFETY: as above.
                unsafe { bump(value, now, off_cpu_ns) };
                Ok(())
            }
            None => Err(Stat::MapLookupFailed),
        },
        Err(_) => Err(full),
    }
}

/// Adds one event to a count.
///
/// # Safety
/// `value` must be this CPU's slot of a `COUNTS` entry. The programs that
/// write counts do not nest on a CPU, except that the on-CPU program may
/// interrupt the system-call-exit program; such a race can lose one add.
#[inline(always)]
pub unsafe fn bump(value: *mut SampleCount, now: u64, off_cpu_ns: u64) {
    unsafe {
        (*value).count += 1;
        (*value).last_seen_ns = now;
        (*value).off_cpu_ns += off_cpu_ns;
    }
}

/// Stores scratch slot `slot` under `hash` unless the window has it already.
/// False when the map is full.
#[inline(always)]
pub fn store_stack(hash: u64, slot: u32, stacks: &HashMap<u64, Stack>) -> bool {
    if stacks.get_ptr(hash).is_some() {
        return true;
    }
    let Some(stack) = SCRATCH_STACK.get_ptr(slot) else {
        count(Stat::MapLookupFailed);
        return false;
    };
    // SAFETY: per-CPU scratch slot filled on this run.
    match stacks.insert(hash, unsafe { &*stack }, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // EEXIST: another CPU stored the same stack meanwhile.
        Err(e) if e == -EEXIST => true,
        Err(_) => false,
    }
}
