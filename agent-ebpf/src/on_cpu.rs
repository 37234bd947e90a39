//! On-CPU sampling: a perf_event program on the CPU clock of every CPU.
//!
//! Per sample it records the user stack (walked here through frame
//! pointers, deduplicated by hash into the window's `USER_STACKS` map) and,
//! only when the sample interrupted kernel mode, the kernel stack. Counts
//! are aggregated in the window's `COUNTS` map, so the common case sends
//! nothing to userspace.
//!
//! The user stack is walked by hand instead of `bpf_get_stackid(USER)`:
//! on these VMs the helper costs tens of µs per call, while a frame walk is
//! one `bpf_probe_read_user` of 16 bytes per frame.

use aya_ebpf::{
    bindings::{pt_regs, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_task_pt_regs,
    },
    macros::perf_event,
    maps::{HashMap, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext, PerfEventContext},
};
use hearth_ebpf::{
    SampleCount, SampleKey, Stat, UserStack, CONTROL_ACTIVE_WINDOW, MAX_USER_FRAMES,
    SAMPLE_IN_KERNEL, USER_STACK_TRUNCATED,
};

use crate::maps::{
    count, filter_by_pid, CONTROL, COUNTS_0, COUNTS_1, KERNEL_STACKS_0, KERNEL_STACKS_1,
    PID_FILTER, SCRATCH_STACK, USER_STACKS_0, USER_STACKS_1,
};

const EEXIST: i32 = 17;

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    count(Stat::Samples);
    match try_on_cpu_sample(&ctx) {
        Ok(()) => count(Stat::Recorded),
        Err(stat) => count(stat),
    }
    0
}

/// The window's maps, chosen once per sample. Two monomorphic calls rather
/// than one call with a map pointer picked at run time: the verifier tracks
/// map pointers per instruction.
struct Window<'a> {
    counts: &'a PerCpuHashMap<SampleKey, SampleCount>,
    user_stacks: &'a HashMap<u64, UserStack>,
    kernel_stacks: &'a StackTrace,
}

fn try_on_cpu_sample(ctx: &PerfEventContext) -> Result<(), Stat> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return Err(Stat::Idle);
    }
    if filter_by_pid() && PID_FILTER.get_ptr(tgid).is_none() {
        return Err(Stat::Filtered);
    }
    let window = CONTROL
        .get(CONTROL_ACTIVE_WINDOW)
        .copied()
        .ok_or(Stat::MapLookupFailed)?;
    if window == 0 {
        record(
            ctx,
            tgid,
            tid,
            &Window {
                counts: &COUNTS_0,
                user_stacks: &USER_STACKS_0,
                kernel_stacks: &KERNEL_STACKS_0,
            },
        )
    } else {
        record(
            ctx,
            tgid,
            tid,
            &Window {
                counts: &COUNTS_1,
                user_stacks: &USER_STACKS_1,
                kernel_stacks: &KERNEL_STACKS_1,
            },
        )
    }
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
            },
        )
    };
    let in_kernel = cs & 3 == 0;

    let mut key = SampleKey {
        tgid,
        tid,
        user_stack: 0,
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
        current_user_regs()
    } else {
        Some(interrupted)
    };
    match user_regs {
        // ip 0: a kernel thread, which has no user stack.
        Some(UserRegs { ip: 0, .. }) => {}
        Some(regs) => key.user_stack = walk_user_stack(&regs),
        None => count(Stat::UserRegsUnavailable),
    }

    // A thread on the same stack as before in this window: its stack is
    // stored already, one lookup does it all.
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(value) = window.counts.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot; the program does not nest on a CPU.
        unsafe {
            (*value).count += 1;
            (*value).last_seen_ns = now;
        }
        return Ok(());
    }
    if key.user_stack != 0 && !store_user_stack(key.user_stack, window.user_stacks) {
        key.user_stack = 0;
    }
    insert_count(window.counts, &key, now)
}

/// The user registers a stack walk starts from.
struct UserRegs {
    ip: u64,
    fp: u64,
    sp: u64,
}

/// User-mode registers of the current task, saved at its last entry into
/// the kernel.
#[inline(always)]
fn current_user_regs() -> Option<UserRegs> {
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        Some(UserRegs {
            ip: bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rip)).ok()?,
            fp: bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rbp)).ok()?,
            sp: bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rsp)).ok()?,
        })
    }
}

/// The return address of an interrupted function that has no frame of its
/// own, or `None`.
///
/// Compilers omit the frame in leaf functions even with
/// `-fno-omit-frame-pointer` (gcc does at -O2), and every function lacks it
/// for its first instruction. Then `rbp` still holds the caller's frame and
/// a frame-pointer walk skips the caller. Its return address is at `[rsp]`
/// in that case; we take `[rsp]` when it points far from the stack and the
/// bytes before it encode a call (`call rel32`, `call *disp32(%rip)`, or
/// `call *%reg`), which a saved `rbp` or ordinary data almost never does.
#[inline(always)]
fn frameless_return_address(sp: u64) -> Option<u64> {
    if sp == 0 || sp & 7 != 0 {
        return None;
    }
    let candidate: u64 = unsafe { bpf_probe_read_user(sp as *const u64) }.ok()?;
    const USER_TOP: u64 = 1 << 47;
    if candidate < 0x1000 || candidate >= USER_TOP || candidate.abs_diff(sp) < (1 << 24) {
        return None;
    }
    // before[k] is the byte at candidate - 8 + k.
    let before: [u8; 8] = unsafe { bpf_probe_read_user((candidate - 8) as *const [u8; 8]) }.ok()?;
    let call_rel32 = before[3] == 0xe8;
    let call_rip_indirect = before[2] == 0xff && before[3] == 0x15;
    let call_register = before[6] == 0xff && before[7] & 0xf8 == 0xd0;
    (call_rel32 || call_rip_indirect || call_register).then_some(candidate)
}

/// Walks frame pointers from `regs` into the per-CPU scratch stack and
/// returns its hash, which is never 0 (0 means no stack: only when the
/// scratch slot is missing).
#[inline(always)]
fn walk_user_stack(regs: &UserRegs) -> u64 {
    let Some(stack) = SCRATCH_STACK.get_ptr_mut(0) else {
        count(Stat::MapLookupFailed);
        return 0;
    };
    // SAFETY: per-CPU scratch slot, not shared with anyone while we run.
    let stack = unsafe { &mut *stack };
    stack.ips[0] = regs.ip;
    stack.flags = 0;
    let mut hash = mix(0x9e37_79b9_7f4a_7c15 ^ regs.ip);
    let mut len = 1usize;
    let mut fp = regs.fp;
    let mut leaf_return = frameless_return_address(regs.sp);
    let mut ended = false;
    for _ in 1..MAX_USER_FRAMES {
        // The frame chain ends at a null or misaligned pointer.
        if fp == 0 || fp & 7 != 0 {
            ended = true;
            break;
        }
        // [fp] = caller's frame pointer, [fp + 8] = return address.
        let frame: [u64; 2] = match unsafe { bpf_probe_read_user(fp as *const [u64; 2]) } {
            Ok(frame) => frame,
            Err(_) => {
                count(Stat::UserStackReadFault);
                ended = true;
                break;
            }
        };
        let (next_fp, ret) = (frame[0], frame[1]);
        if ret == 0 {
            ended = true;
            break;
        }
        // The first frame: if the interrupted function had no frame, its
        // own return address comes before the one `rbp` leads to.
        if let Some(leaf) = leaf_return.take() {
            if leaf != ret && len < MAX_USER_FRAMES {
                stack.ips[len] = leaf;
                hash = mix(hash ^ leaf);
                len += 1;
                count(Stat::FramelessCallerRecovered);
            }
        }
        if len >= MAX_USER_FRAMES {
            break;
        }
        stack.ips[len] = ret;
        hash = mix(hash ^ ret);
        len += 1;
        // Callers' frames live at higher addresses; anything else is a
        // corrupt chain (and would let a cycle run to the depth limit).
        if next_fp <= fp {
            ended = true;
            break;
        }
        fp = next_fp;
    }
    if !ended {
        stack.flags |= USER_STACK_TRUNCATED;
        count(Stat::UserStackTruncated);
    }
    stack.len = len as u32;
    // 0 means "no user stack" in SampleKey.
    if hash == 0 {
        1
    } else {
        hash
    }
}

/// Stores the scratch stack under `hash` unless the window has it already.
/// False when the map is full.
#[inline(always)]
fn store_user_stack(hash: u64, user_stacks: &HashMap<u64, UserStack>) -> bool {
    if user_stacks.get_ptr(hash).is_some() {
        return true;
    }
    let Some(stack) = SCRATCH_STACK.get_ptr(0) else {
        count(Stat::MapLookupFailed);
        return false;
    };
    // SAFETY: per-CPU scratch slot filled by walk_user_stack on this run.
    match user_stacks.insert(hash, unsafe { &*stack }, BPF_NOEXIST as u64) {
        Ok(()) => true,
        // EEXIST: another CPU stored the same stack meanwhile.
        Err(e) if e == -EEXIST => true,
        Err(_) => {
            count(Stat::DropUserStackFull);
            false
        }
    }
}

/// Starts the count of a key not yet in the window. The count map is
/// per-CPU, so adds need no atomics (the BPF target has no atomic
/// read-modify-write in `core`) and CPUs never contend on a hot key;
/// userspace sums the CPUs.
#[inline(always)]
fn insert_count(
    counts: &PerCpuHashMap<SampleKey, SampleCount>,
    key: &SampleKey,
    now: u64,
) -> Result<(), Stat> {
    let first = SampleCount {
        count: 1,
        last_seen_ns: now,
    };
    match counts.insert(key, first, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        // Another CPU inserted the same key between our lookup and insert.
        Err(e) if e == -EEXIST => match counts.get_ptr_mut(key) {
            Some(value) => {
                // SAFETY: this CPU's slot, as above.
                unsafe {
                    (*value).count += 1;
                    (*value).last_seen_ns = now;
                }
                Ok(())
            }
            None => Err(Stat::MapLookupFailed),
        },
        Err(_) => Err(Stat::DropCountsFull),
    }
}

/// 64-bit finalizer (from SplitMix64): cheap, and every input bit affects
/// every output bit, so stacks that differ in one frame do not collide.
#[inline(always)]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
