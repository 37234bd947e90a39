//! User stack walking through frame pointers, shared by the on-CPU and
//! off-CPU programs, and the stack hash.
//!
//! The user stack is walked by hand instead of `bpf_get_stackid(USER)`:
//! on these VMs the helper costs tens of µs per call, while a frame walk is
//! one `bpf_probe_read_user` of 16 bytes per frame.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_loop, bpf_task_pt_regs},
    },
};
use hearth_ebpf::{Stack, Stat, MAX_USER_FRAMES, STACK_TRUNCATED};

use crate::maps::{count, unwind_tables, SCRATCH_STACK, UNWIND_PROCS};

/// The user registers a stack walk starts from.
pub struct UserRegs {
    pub ip: u64,
    pub fp: u64,
    pub sp: u64,
    /// The system call number while in one, else -1 (or an exception's
    /// error code).
    pub orig_ax: i64,
    pub ax: u64,
}

/// x86-64 entry code stores `-ENOSYS` in `ax` on system call entry; it
/// stays there until the call returns.
const ENOSYS_IN_AX: u64 = (-38i64) as u64;

impl UserRegs {
    /// The task entered the kernel through a system call that has not
    /// returned yet (rather than an interrupt or exception).
    #[inline(always)]
    pub fn in_syscall(&self) -> bool {
        self.orig_ax >= 0 && self.ax == ENOSYS_IN_AX
    }
}

/// User-mode registers of `task`, saved at its last entry into the kernel.
///
/// The registers are read with plain loads: `bpf_task_pt_regs` returns a
/// BTF pointer, which the verifier turns into faulting-safe loads, several
/// times cheaper than one `bpf_probe_read_kernel` call each. This runs on
/// every followed context switch.
///
/// # Safety
/// `task` must be a valid task pointer the verifier accepts as one.
#[inline(always)]
pub unsafe fn task_user_regs(task: *mut aya_ebpf::bindings::task_struct) -> Option<UserRegs> {
    unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        Some(UserRegs {
            ip: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rip)),
            fp: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rbp)),
            sp: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rsp)),
            orig_ax: core::ptr::read_volatile(core::ptr::addr_of!((*regs).orig_rax)) as i64,
            ax: core::ptr::read_volatile(core::ptr::addr_of!((*regs).rax)),
        })
    }
}

/// The return address of an interrupted function that has no frame of its
/// own, or 0.
///
/// These scans return 0 for none rather than an `Option`: an unset
/// Option's payload is undefined, and LLVM may copy it from a register
/// never written, which the verifier rejects as an uninitialized read.
///
/// Compilers omit the frame in leaf functions even with
/// `-fno-omit-frame-pointer` (gcc does at -O2), and every function lacks it
/// for its first instruction. Then `rbp` still holds the caller's frame and
/// a frame-pointer walk skips the caller. Its return address is at `[rsp]`
/// in that case; we take `[rsp]` when it points far from the stack and the
/// bytes before it encode a call (`call rel32`, `call *disp32(%rip)`, or
/// `call *%reg`), which a saved `rbp` or ordinary data almost never does.
#[inline(always)]
pub(crate) fn frameless_return_address(sp: u64) -> u64 {
    if sp == 0 || sp & 7 != 0 {
        return 0;
    }
    match unsafe { bpf_probe_read_user(sp as *const u64) } {
        Ok(candidate) => follows_call(candidate, sp),
        Err(_) => 0,
    }
}

/// Slots scanned above the stack pointer at a system call.
const SYSCALL_SCAN_CHUNKS: usize = 4;
const SYSCALL_SCAN_CHUNK: usize = 8;

/// The return address into the function that owns `fp`, for a thread
/// stopped in a system call wrapper, or 0.
///
/// C libraries are built without frame pointers, so their wrappers (often
/// a few calls deep: `nanosleep` → `clock_nanosleep`) leave `rbp` pointing
/// at the frame of the program's own function that called into the
/// library. The frame walk would start at that function's caller and lose
/// the function itself. Its return address was pushed just below the
/// library's frames, so the highest slot under `fp` that holds a return
/// address (the bytes before it encode a call) is taken.
///
/// The chunks are scanned by a `bpf_loop` callback: unrolled, each slot's
/// bounds checks narrow `sp` and `fp` differently on every path, and the
/// verifier, unable to merge those states, took 400 k to 700 k instructions
/// for the scan alone in the off-CPU programs.
#[inline(always)]
pub(crate) fn syscall_caller(sp: u64, fp: u64) -> u64 {
    if sp == 0 || sp & 7 != 0 || fp <= sp {
        return 0;
    }
    let mut scan = SyscallScan { sp, fp, found: 0 };
    // SAFETY: `scan_chunk` has the callback signature bpf_loop expects and
    // only touches `scan`, which outlives the call.
    unsafe {
        bpf_loop(
            SYSCALL_SCAN_CHUNKS as u32,
            scan_chunk as *const () as *mut c_void,
            &mut scan as *mut SyscallScan as *mut c_void,
            0,
        );
    }
    scan.found
}

/// The state of a [`syscall_caller`] scan; `found` is 0 for none.
#[repr(C)]
struct SyscallScan {
    sp: u64,
    fp: u64,
    found: u64,
}

/// Scans chunk `index` above the stack pointer; 0 continues, 1 ends.
#[inline(never)]
unsafe extern "C" fn scan_chunk(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `SyscallScan` given to it.
    let scan = unsafe { &mut *(ctx as *mut SyscallScan) };
    let base = scan.sp + u64::from(index) * (SYSCALL_SCAN_CHUNK * 8) as u64;
    if base >= scan.fp {
        return 1;
    }
    let Ok(slots) = (unsafe { bpf_probe_read_user(base as *const [u64; SYSCALL_SCAN_CHUNK]) })
    else {
        return 1;
    };
    for (i, &value) in slots.iter().enumerate() {
        if base + (i as u64) * 8 >= scan.fp {
            return 1;
        }
        let ret = follows_call(value, scan.sp);
        if ret != 0 {
            scan.found = ret;
        }
    }
    0
}

/// `candidate` if it can be a return address (in user space, far from the
/// stack, and right after a call instruction), else 0.
#[inline(always)]
fn follows_call(candidate: u64, sp: u64) -> u64 {
    const USER_TOP: u64 = 1 << 47;
    if candidate < 0x1000 || candidate >= USER_TOP || candidate.abs_diff(sp) < (1 << 24) {
        return 0;
    }
    // before[k] is the byte at candidate - 8 + k.
    let Ok(before) = (unsafe { bpf_probe_read_user((candidate - 8) as *const [u8; 8]) }) else {
        return 0;
    };
    let call_rel32 = before[3] == 0xe8;
    let call_rip_indirect = before[2] == 0xff && before[3] == 0x15;
    let call_register = before[6] == 0xff && before[7] & 0xf8 == 0xd0;
    if call_rel32 || call_rip_indirect || call_register {
        candidate
    } else {
        0
    }
}

/// Walks the user stack from `regs` (of the current task) into scratch slot
/// `slot` and returns the stack's hash, which is never 0 (0 means no stack:
/// only when the scratch slot is missing). `at_syscall`: the thread is
/// stopped at a system call instruction, usually inside a C library
/// wrapper (see [`syscall_caller`]).
///
/// With unwind tables on (`--unwind auto|dwarf`), every stack goes through
/// the table walker (`unwind.rs`), which walks the frames of code without
/// a table through frame pointers; with `--unwind fp`, through the
/// frame-pointer walker below.
#[inline(always)]
pub fn walk_user_stack(regs: &UserRegs, slot: u32, at_syscall: bool) -> u64 {
    let Some(stack) = SCRATCH_STACK.get_ptr_mut(slot) else {
        count(Stat::MapLookupFailed);
        return 0;
    };
    walk_user_stack_into(regs, stack, at_syscall)
}

/// [`walk_user_stack`] into a buffer of the caller's own, for a walk that
/// may be preempted by another using the same scratch slot (a task work).
#[inline(always)]
pub fn walk_user_stack_into(regs: &UserRegs, stack: *mut Stack, at_syscall: bool) -> u64 {
    if unwind_tables() {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // SAFETY: a plain-data value the map returned, copied at once.
        let process = unsafe { UNWIND_PROCS.get(&tgid) }
            .copied()
            .unwrap_or_default();
        // The library's table unwinds its wrapper when the process is
        // loaded; without tables the scan is the best guess.
        let mut leaf_hint = 0;
        if at_syscall && process.len == 0 {
            leaf_hint = syscall_caller(regs.sp, regs.fp);
            if leaf_hint == 0 {
                leaf_hint = frameless_return_address(regs.sp);
            }
        }
        return crate::unwind::walk_with_tables(regs, stack, process, leaf_hint);
    }
    walk_frame_pointers(regs, stack, at_syscall)
}

/// Walks frame pointers; see [`walk_user_stack`].
#[inline(always)]
fn walk_frame_pointers(regs: &UserRegs, stack: *mut Stack, at_syscall: bool) -> u64 {
    // SAFETY: the caller's buffer, not shared with anyone while we run.
    let stack = unsafe { &mut *stack };
    stack.ips[0] = regs.ip;
    stack.flags = 0;
    let mut hash = mix(USER_SEED ^ regs.ip);
    let mut len = 1usize;
    let mut fp = regs.fp;
    let mut leaf_return = if at_syscall {
        syscall_caller(regs.sp, regs.fp)
    } else {
        0
    };
    if leaf_return == 0 {
        leaf_return = frameless_return_address(regs.sp);
    }
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
        let leaf = core::mem::take(&mut leaf_return);
        if leaf != 0 {
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
        stack.flags |= STACK_TRUNCATED;
        count(Stat::UserStackTruncated);
    }
    stack.len = len as u32;
    nonzero(hash)
}

/// Seeds that keep a user stack and a kernel stack with the same addresses
/// apart in the shared stack maps.
pub const USER_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
pub const KERNEL_SEED: u64 = 0x6a09_e667_f3bc_c908;

/// Hash of the first `len` addresses of `stack`, never 0.
#[inline(always)]
pub fn hash_stack(stack: &Stack, len: usize, seed: u64) -> u64 {
    let mut hash = seed;
    for i in 0..MAX_USER_FRAMES {
        if i >= len {
            break;
        }
        hash = mix(hash ^ stack.ips[i]);
    }
    nonzero(hash)
}

/// 0 means "no stack" in keys.
#[inline(always)]
pub(crate) fn nonzero(hash: u64) -> u64 {
    if hash == 0 {
        1
    } else {
        hash
    }
}

/// 64-bit finalizer (from SplitMix64): cheap, and every input bit affects
/// every output bit, so stacks that differ in one frame do not collide.
#[inline(always)]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
