//! Maps shared by the kernel programs, the window they write to, and the
//! stats counter helper.
//!
//! Sizes here are defaults; userspace sets the real ones at load time.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE, task_struct, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC,
        BPF_LOCAL_STORAGE_GET_F_CREATE, BPF_NOEXIST,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_task_storage_get,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
};
use hearth_ebpf::{
    SampleCount, SampleKey, Stack, Stat, UnwindFile, UnwindMapping, UnwindPage, UnwindProc,
    UnwindRow, CONTROL_ACTIVE_WINDOW, CONTROL_ENTRIES, FILTER_CGROUPS, FILTER_ENTRY_EXCLUDE,
    FILTER_ENTRY_INCLUDE, FILTER_INCLUDE, FILTER_MAX_CGROUP_LEVEL, FILTER_PIDS,
    PROCESS_EVENTS_BYTES, REPORTED_PROCS_ENTRIES, UNWIND_MAPPING_ENTRIES,
};

/// `CONTROL[CONTROL_ACTIVE_WINDOW]`: the window (0 or 1) programs write to.
#[map]
pub static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_ENTRIES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Filter entries by process id (tgid): `FILTER_ENTRY_*` bits. Written by
/// userspace (pid rules, process names it matched); the exit program
/// deletes a process's entry so a reused pid never inherits it.
#[map]
pub static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Filter entries by cgroup v2 id (the inode number of the cgroup's
/// directory): `FILTER_ENTRY_*` bits.
#[map]
pub static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Execs and exits for userspace, which reads what symbolization needs
/// while the process still lives. Sized by userspace.
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(PROCESS_EVENTS_BYTES, 0);

/// Processes whose current image was reported to userspace (tgid → 1):
/// the first on-CPU sample of a process not in it, since its exec or
/// since it forked, inserts it and asks userspace to read its mappings (a
/// `PROCESS_EVENT_SAMPLED`), so processes never sampled, most of the
/// short-lived ones of a busy host, cost no /proc reads. The exec and exit
/// programs delete the entry; userspace fills it at start with the
/// processes already running (read from /proc at drain instead). One
/// lookup per sample, as a map of fresh execs would cost. LRU: an entry
/// evicted is reported again, and userspace skips the process it already
/// captured.
#[map]
pub static REPORTED_PROCS: LruHashMap<u32, u8> =
    LruHashMap::with_max_entries(REPORTED_PROCS_ENTRIES, 0);

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

/// `FILTER_*` bits: which filter checks run. Set by userspace at load time
/// (read-only data, so the verifier prunes the checks that are off).
#[unsafe(no_mangle)]
pub static FILTER_FLAGS: u8 = 0;

/// Bit L: the cgroup filter checks the ancestor at level L (read-only data).
#[unsafe(no_mangle)]
pub static FILTER_CGROUP_LEVELS: u32 = 0;

/// Waits shorter than this are counted but not recorded.
#[unsafe(no_mangle)]
pub static OFF_CPU_MIN_NS: u64 = 1_000_000;

/// Follow a switch-out when a random u32 is below this; `u32::MAX`: all.
#[unsafe(no_mangle)]
pub static OFF_CPU_SAMPLE_BELOW: u32 = u32::MAX;

/// Above this many followed switch-outs per second on a CPU, switch-outs
/// there are followed with the probability that keeps to it, and each wait
/// followed stands for the inverse of that probability; 0: no cap.
#[unsafe(no_mangle)]
pub static OFF_CPU_MAX_RATE: u64 = 0;

/// Non-zero when `sys_exit` is attached to record the waits of threads
/// blocked in system calls; zero when they all come back through
/// `rseq_update` or are walked eagerly (see off_cpu.rs).
#[unsafe(no_mangle)]
pub static OFF_CPU_SYSCALL_EXIT: u8 = 1;

/// Non-zero: the off-CPU programs return at once (the benchmark's floor);
/// the verifier then drops their bodies.
#[unsafe(no_mangle)]
pub static OFF_CPU_EMPTY: u8 = 0;

// Volatile reads: otherwise the compiler folds the initial values into the
// code and userspace's overrides have no effect.
#[inline(always)]
pub fn filter_flags() -> u8 {
    unsafe { core::ptr::read_volatile(&FILTER_FLAGS) }
}

/// Whether the current task's process `tgid` is left out by the filter.
/// With no filter this is one constant test the verifier removes; with a
/// pid filter one hash lookup; with a cgroup filter one lookup for the
/// task's own cgroup and one per level of the paths given.
#[inline(always)]
pub fn filtered_out(tgid: u32) -> bool {
    let flags = filter_flags();
    if flags == 0 {
        return false;
    }
    let mut included = flags & FILTER_INCLUDE == 0;
    if flags & FILTER_PIDS != 0 {
        if let Some(entry) = unsafe { PID_FILTER.get(&tgid) } {
            if *entry & FILTER_ENTRY_EXCLUDE != 0 {
                return true;
            }
            included |= *entry & FILTER_ENTRY_INCLUDE != 0;
        }
    }
    if flags & FILTER_CGROUPS != 0 {
        // SAFETY: no preconditions.
        let own = unsafe { bpf_get_current_cgroup_id() };
        match cgroup_entry(own) {
            CGROUP_EXCLUDED => return true,
            CGROUP_INCLUDED => included = true,
            _ => {}
        }
        let levels = unsafe { core::ptr::read_volatile(&FILTER_CGROUP_LEVELS) };
        let mut level = 1;
        while level <= FILTER_MAX_CGROUP_LEVEL {
            if levels & (1 << level) != 0 {
                // SAFETY: no preconditions; 0 above the task's own level.
                let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
                match cgroup_entry(id) {
                    CGROUP_EXCLUDED => return true,
                    CGROUP_INCLUDED => included = true,
                    _ => {}
                }
            }
            level += 1;
        }
    }
    !included
}

const CGROUP_NONE: u8 = 0;
const CGROUP_INCLUDED: u8 = 1;
const CGROUP_EXCLUDED: u8 = 2;

#[inline(always)]
fn cgroup_entry(id: u64) -> u8 {
    if id == 0 {
        return CGROUP_NONE;
    }
    match unsafe { CGROUP_FILTER.get(&id) } {
        Some(entry) if *entry & FILTER_ENTRY_EXCLUDE != 0 => CGROUP_EXCLUDED,
        Some(entry) if *entry & FILTER_ENTRY_INCLUDE != 0 => CGROUP_INCLUDED,
        _ => CGROUP_NONE,
    }
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
pub fn off_cpu_max_rate() -> u64 {
    unsafe { core::ptr::read_volatile(&OFF_CPU_MAX_RATE) }
}

#[inline(always)]
pub fn off_cpu_empty() -> bool {
    unsafe { core::ptr::read_volatile(&OFF_CPU_EMPTY) != 0 }
}

#[inline(always)]
pub fn syscall_exit_attached() -> bool {
    unsafe { core::ptr::read_volatile(&OFF_CPU_SYSCALL_EXIT) != 0 }
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

/// `CONTROL[index]`, 0 if missing.
#[inline(always)]
pub fn control(index: u32) -> u32 {
    CONTROL.get(index).copied().unwrap_or(0)
}

/// Adds `delta` (wrapping) to `CONTROL[index]`, atomically: every CPU
/// shares the array.
#[inline(always)]
pub fn control_add(index: u32, delta: u32) {
    if let Some(slot) = CONTROL.get_ptr_mut(index) {
        // SAFETY: a u32 slot of an array map value, valid while we run and
        // 4-byte aligned. The result is not used, so this compiles to BPF's
        // atomic add, which every BPF CPU version has (`core` offers no
        // atomic types on this target).
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(slot, delta) };
    }
}

/// A task-local storage map (`BPF_MAP_TYPE_TASK_STORAGE`): one `T` per
/// thread, found through the task itself (no hash, no lock, no eviction),
/// freed by the kernel when the thread exits. aya-ebpf 0.2 has no such
/// type, so it is declared here in the BTF map layout its loader reads
/// (see aya-ebpf's `btf_maps`); the kernel requires BTF for these maps.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; they are
// never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// `task`'s value, zero-filled on first use when `create` is set.
    /// `None` when it has none (or, with `create`, out of memory).
    ///
    /// # Safety
    /// `task` must be a task pointer the verifier trusts (a BTF task
    /// pointer from `bpf_get_current_task_btf` or a tracepoint argument).
    #[inline(always)]
    pub unsafe fn get(&self, task: *mut task_struct, create: bool) -> Option<&mut T> {
        let flags = if create {
            BPF_LOCAL_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: see the function's contract.
        let value = unsafe { bpf_task_storage_get(map, task.cast(), core::ptr::null_mut(), flags) };
        // SAFETY: a live map value of type T (the kernel sized it from BTF).
        unsafe { value.cast::<T>().as_mut() }
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
    store_stack_from(hash, unsafe { &*stack }, stacks)
}

/// Stores `stack` under `hash` unless the window has it already. False
/// when the map is full.
#[inline(always)]
pub fn store_stack_from(hash: u64, stack: &Stack, stacks: &HashMap<u64, Stack>) -> bool {
    if stacks.get_ptr(hash).is_some() {
        return true;
    }
    match stacks.insert(hash, stack, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // EEXIST: another CPU stored the same stack meanwhile.
        Err(e) if e == -EEXIST => true,
        Err(_) => false,
    }
}
