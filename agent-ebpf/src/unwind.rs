//! Table-driven user stack unwinding: the walker for processes whose
//! executable mappings userspace has loaded (`UNWIND_PROCS`), with the
//! unwind tables it built from `.eh_frame`/`.debug_frame`.
//!
//! Per frame: find the mapping of the pc (binary search over the process's
//! sorted mappings), then the row of the file's table that covers it
//! (binary search over the file's rows), compute the CFA from the row's
//! rule, and read the return address (CFA-8) and, when the function saved
//! it, the caller's frame pointer. A pc in a file without a table, outside
//! every known mapping, or in a gap between functions is walked through
//! frame pointers instead; anonymous executable memory (JIT code) ends the
//! walk. Every way a walk ends is counted.
//!
//! The frames are iterated with `bpf_loop`: the verifier checks the
//! per-frame callback once instead of every unrolled iteration, which keeps
//! the two nested binary searches within its limits at any table size.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_probe_read_user, generated::bpf_loop};
use hearth_ebpf::{
    Stack, Stat, UnwindMapping, UnwindProc, UnwindRow, MAX_USER_FRAMES, STACK_TRUNCATED,
    UNWIND_CFA_END, UNWIND_CFA_FP, UNWIND_CFA_MASK, UNWIND_CFA_NONE, UNWIND_CFA_PLT,
    UNWIND_CFA_SIGNAL, UNWIND_CFA_SP, UNWIND_MAPPING_ANONYMOUS, UNWIND_MAPPING_SEARCH_STEPS,
    UNWIND_MAPPING_TABLE, UNWIND_MAX_MAPPINGS, UNWIND_PAGE_SHIFT, UNWIND_ROW_SEARCH_STEPS,
};

use crate::maps::{count, UNWIND_FILES, UNWIND_MAPPINGS, UNWIND_PAGES, UNWIND_ROWS};
use crate::stack::{frameless_return_address, mix, nonzero, UserRegs, USER_SEED};

/// The walk's registers and output, shared with the per-frame callback.
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    fp: u64,
    hash: u64,
    process: UnwindProc,
    /// The frames so far. Their count lives in the map value (`len`), not
    /// here: the verifier does not track map memory, so a count it cannot
    /// see grow lets it find the loop's states equal after one frame,
    /// instead of verifying every depth.
    stack: *mut Stack,
    /// The interrupted function's caller, if known before the walk (0:
    /// not).
    leaf_hint: u64,
    /// `pc` is the address of the next instruction to run (the interrupted
    /// pc, or one a signal frame restored), not a return address: look it
    /// up as it is rather than the call instruction before it.
    exact: u32,
    /// The walk ended (cleanly or on an error), rather than at the depth
    /// limit.
    ended: u32,
}

/// Walks the current task's user stack from `regs` with the tables of
/// `process` into `stack`; returns the stack's hash (never 0).
///
/// A process without tables (`process.len` 0: not loaded yet, or nothing
/// a table helps with) is walked the same way, every frame through its
/// frame pointer; the program then holds one walker, which the verifier
/// checks in a fraction of the time the unrolled frame-pointer walker
/// takes. `leaf_hint`: the interrupted function's caller, when the
/// caller found it (see `syscall_caller`), else 0.
#[inline(always)]
pub fn walk_with_tables(
    regs: &UserRegs,
    stack: *mut Stack,
    process: UnwindProc,
    leaf_hint: u64,
) -> u64 {
    if process.len != 0 {
        count(Stat::UnwindTableWalks);
    }
    // SAFETY: the caller's buffer, not shared with anyone while we run.
    unsafe {
        (*stack).ips[0] = regs.ip;
        (*stack).flags = 0;
        (*stack).len = 1;
    }
    let mut walk = Walk {
        pc: regs.ip,
        sp: regs.sp,
        fp: regs.fp,
        hash: mix(USER_SEED ^ regs.ip),
        process,
        stack,
        leaf_hint,
        exact: 1,
        ended: 0,
    };
    // SAFETY: `step` has the callback signature bpf_loop expects and only
    // touches `walk`, which outlives the call.
    unsafe {
        bpf_loop(
            MAX_USER_FRAMES as u32,
            step as *const () as *mut c_void,
            &mut walk as *mut Walk as *mut c_void,
            0,
        );
    }
    // SAFETY: as above.
    unsafe {
        if walk.ended == 0 {
            (*stack).flags |= STACK_TRUNCATED;
            count(Stat::UserStackTruncated);
        }
    }
    nonzero(walk.hash)
}

/// One frame; 0 continues the loop, 1 ends it.
#[inline(never)]
unsafe extern "C" fn step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Walk` given to it.
    let walk = unsafe { &mut *(ctx as *mut Walk) };
    match unwind_frame(walk) {
        Next::Continue => 0,
        Next::Ended => {
            walk.ended = 1;
            1
        }
        Next::Full => 1,
    }
}

enum Next {
    Continue,
    /// The walk is over: end of the stack, or a frame it cannot unwind.
    Ended,
    /// The stack buffer is full.
    Full,
}

#[inline(always)]
fn unwind_frame(walk: &mut Walk) -> Next {
    // A return address points after the call; the call itself (and the
    // rules in force there) is one byte earlier.
    let lookup = if walk.exact != 0 {
        walk.pc
    } else {
        walk.pc.wrapping_sub(1)
    };
    // One call site per kind of step keeps the code (and what the
    // verifier walks through) small.
    let row = match find_mapping(&walk.process, lookup) {
        None if walk.process.len == 0 => None,
        None => {
            count(Stat::UnwindNoMapping);
            None
        }
        Some(mapping) => match mapping.kind {
            UNWIND_MAPPING_TABLE => {
                let row = find_row(&mapping, lookup);
                if row.is_none() {
                    count(Stat::UnwindNoRow);
                }
                row
            }
            UNWIND_MAPPING_ANONYMOUS => {
                count(Stat::UnwindStopAnonymous);
                return Next::Ended;
            }
            _ => {
                count(Stat::UnwindFramePointerFrames);
                None
            }
        },
    };
    match row {
        Some(row) => table_step(walk, &row),
        None => frame_pointer_step(walk),
    }
}

/// A binary search's state, kept in memory between `bpf_loop` steps. Each
/// search is its own loop: the verifier then checks one step, instead of
/// every path through an unrolled search nested in the frame loop.
#[repr(C)]
struct Search {
    /// Entries before `lo` start at or below `pc`, those from `hi` above.
    lo: u32,
    hi: u32,
    /// First entry of the searched range in its array map.
    first: u32,
    _pad: u32,
    pc: u64,
}

/// One step over `UNWIND_MAPPINGS`; 1 ends the loop.
#[inline(never)]
unsafe extern "C" fn mapping_search_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Search` given to it.
    let search = unsafe { &mut *(ctx as *mut Search) };
    if search.lo >= search.hi {
        return 1;
    }
    let mid = search.lo + (search.hi - search.lo) / 2;
    let Some(mapping) = UNWIND_MAPPINGS.get(search.first.wrapping_add(mid)) else {
        search.lo = 0;
        return 1;
    };
    if mapping.start <= search.pc {
        search.lo = mid + 1;
    } else {
        search.hi = mid;
    }
    0
}

/// One step over `UNWIND_ROWS`; 1 ends the loop.
#[inline(never)]
unsafe extern "C" fn row_search_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Search` given to it.
    let search = unsafe { &mut *(ctx as *mut Search) };
    if search.lo >= search.hi {
        return 1;
    }
    let mid = search.lo + (search.hi - search.lo) / 2;
    let Some(row) = UNWIND_ROWS.get(search.first.wrapping_add(mid)) else {
        search.lo = 0;
        return 1;
    };
    if u64::from(row.pc) <= search.pc {
        search.lo = mid + 1;
    } else {
        search.hi = mid;
    }
    0
}

/// Runs a search with `step`; the number of entries at or below `pc`
/// (0 when none, or on a failed lookup).
#[inline(always)]
fn search(
    step: unsafe extern "C" fn(u32, *mut c_void) -> i64,
    first: u32,
    len: u32,
    pc: u64,
    steps: usize,
) -> u32 {
    let mut search = Search {
        lo: 0,
        hi: len,
        first,
        _pad: 0,
        pc,
    };
    // SAFETY: `step` has the callback signature bpf_loop expects and only
    // touches `search`, which outlives the call.
    unsafe {
        bpf_loop(
            steps as u32 + 1,
            step as *const () as *mut c_void,
            &mut search as *mut Search as *mut c_void,
            0,
        );
    }
    search.lo
}

/// The mapping holding `pc`: the last one starting at or below it, if it
/// ends above it.
#[inline(always)]
fn find_mapping(process: &UnwindProc, pc: u64) -> Option<UnwindMapping> {
    let n = process.len.min(UNWIND_MAX_MAPPINGS as u32);
    if n == 0 {
        return None;
    }
    let below = search(
        mapping_search_step,
        process.start,
        n,
        pc,
        UNWIND_MAPPING_SEARCH_STEPS,
    );
    if below == 0 {
        return None;
    }
    let mapping = *UNWIND_MAPPINGS.get(process.start.wrapping_add(below - 1))?;
    (pc < mapping.end).then_some(mapping)
}

/// The row of `mapping`'s table in force at `pc`, unless `pc` is in a gap.
#[inline(always)]
fn find_row(mapping: &UnwindMapping, pc: u64) -> Option<UnwindRow> {
    let file = UNWIND_FILES.get(mapping.file)?;
    let relative = pc.checked_sub(mapping.bias)?;
    if relative > u32::MAX as u64 {
        return None;
    }
    // The page index narrows the search to the rows of this page.
    let page = (relative >> UNWIND_PAGE_SHIFT) as u32;
    let (first, end) = if page < file.pages_len {
        let entry = UNWIND_PAGES.get(file.pages_start.wrapping_add(page))?;
        (
            entry.first,
            entry.first.wrapping_add(entry.count).min(file.rows_len),
        )
    } else {
        (0, file.rows_len)
    };
    if first >= end {
        return None;
    }
    let below = search(
        row_search_step,
        file.rows_start.wrapping_add(first),
        end - first,
        relative,
        UNWIND_ROW_SEARCH_STEPS,
    );
    if below == 0 {
        return None;
    }
    let below = first + below;
    let row = *UNWIND_ROWS.get(file.rows_start.wrapping_add(below - 1))?;
    (row.rule & UNWIND_CFA_MASK != UNWIND_CFA_NONE).then_some(row)
}

/// Applies `row` to the frame of `walk.pc`.
#[inline(always)]
fn table_step(walk: &mut Walk, row: &UnwindRow) -> Next {
    let offset = row.cfa_offset as u64;
    let cfa = match row.rule & UNWIND_CFA_MASK {
        UNWIND_CFA_SP => walk.sp.wrapping_add(offset * 8),
        UNWIND_CFA_FP => {
            if walk.fp == 0 {
                // The caller's frame pointer was lost: nothing to base on.
                count(Stat::UnwindBadFrame);
                return Next::Ended;
            }
            walk.fp.wrapping_add(offset * 8)
        }
        UNWIND_CFA_PLT => {
            let pushed = if walk.pc & 15 >= offset { 8 } else { 0 };
            walk.sp.wrapping_add(8 + pushed)
        }
        UNWIND_CFA_SIGNAL => return signal_step(walk),
        UNWIND_CFA_END => {
            count(Stat::UnwindEndOfStack);
            return Next::Ended;
        }
        _ => {
            count(Stat::UnwindBadFrame);
            return Next::Ended;
        }
    };
    // The caller's frame is above this one, and the return address is
    // below the CFA: anything else is a wrong rule or a corrupt stack.
    if cfa <= walk.sp || cfa & 7 != 0 {
        count(Stat::UnwindBadFrame);
        return Next::Ended;
    }
    let (ra, fp) = if row.fp_offset == -2 {
        // The common prologue (`push rbp` first): one read for both.
        let Ok(pair) = (unsafe { bpf_probe_read_user((cfa - 16) as *const [u64; 2]) }) else {
            count(Stat::UnwindReadFault);
            return Next::Ended;
        };
        (pair[1], pair[0])
    } else {
        let Ok(ra) = (unsafe { bpf_probe_read_user((cfa - 8) as *const u64) }) else {
            count(Stat::UnwindReadFault);
            return Next::Ended;
        };
        let fp = match row.fp_offset {
            0 => walk.fp,
            hearth_ebpf::UNWIND_FP_LOST => 0,
            n => {
                let at = cfa.wrapping_add((n as i64 * 8) as u64);
                match unsafe { bpf_probe_read_user(at as *const u64) } {
                    Ok(fp) => fp,
                    Err(_) => {
                        count(Stat::UnwindReadFault);
                        return Next::Ended;
                    }
                }
            }
        };
        (ra, fp)
    };
    if ra == 0 {
        count(Stat::UnwindEndOfStack);
        return Next::Ended;
    }
    walk.sp = cfa;
    walk.fp = fp;
    walk.exact = 0;
    push(walk, ra)
}

/// Offsets in the `ucontext` a signal handler returns over (x86-64
/// `struct rt_sigframe` without its return address: `uc_mcontext` at 40,
/// then `gregs` in the order of `REG_R8`…`REG_RIP`).
const UC_RBP: u64 = 40 + 10 * 8;
const UC_REGS_FROM_RBP: usize = 7; // rbp, rbx, rdx, rax, rcx, rsp, rip

/// The frame of a signal trampoline: the interrupted registers are in the
/// `ucontext` at the stack pointer.
#[inline(always)]
fn signal_step(walk: &mut Walk) -> Next {
    let Ok(regs) =
        (unsafe { bpf_probe_read_user((walk.sp + UC_RBP) as *const [u64; UC_REGS_FROM_RBP]) })
    else {
        count(Stat::UnwindReadFault);
        return Next::Ended;
    };
    count(Stat::UnwindSignalFrames);
    let (fp, sp, pc) = (regs[0], regs[5], regs[6]);
    if pc == 0 {
        count(Stat::UnwindEndOfStack);
        return Next::Ended;
    }
    walk.fp = fp;
    walk.sp = sp;
    // Interrupted anywhere, not at a call: look the pc up as it is.
    walk.exact = 1;
    push(walk, pc)
}

/// A frame through its frame pointer, for code without a table.
#[inline(always)]
fn frame_pointer_step(walk: &mut Walk) -> Next {
    let fp = walk.fp;
    // The frame chain ends at a null or misaligned pointer, and the
    // caller's frame is above the stack pointer.
    if fp == 0 || fp & 7 != 0 {
        count(Stat::UnwindEndOfStack);
        return Next::Ended;
    }
    if fp < walk.sp {
        count(Stat::UnwindBadFrame);
        return Next::Ended;
    }
    // [fp] = caller's frame pointer, [fp + 8] = return address.
    let Ok(frame) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
        count(Stat::UnwindReadFault);
        return Next::Ended;
    };
    let (next_fp, ret) = (frame[0], frame[1]);
    if ret == 0 {
        count(Stat::UnwindEndOfStack);
        return Next::Ended;
    }
    // The interrupted function: if it had no frame of its own, its return
    // address comes before the one `rbp` leads to (see stack.rs).
    // SAFETY: the per-CPU scratch stack the walk was given.
    if unsafe { (*walk.stack).len } == 1 {
        let leaf = if walk.leaf_hint != 0 {
            walk.leaf_hint
        } else {
            frameless_return_address(walk.sp)
        };
        if leaf != 0 {
            if leaf != ret {
                count(Stat::FramelessCallerRecovered);
                if let Next::Full = push(walk, leaf) {
                    return Next::Full;
                }
            }
        }
    }
    walk.sp = fp + 16;
    walk.fp = next_fp;
    walk.exact = 0;
    push(walk, ret)
}

/// Records the caller's pc as the next frame.
#[inline(always)]
fn push(walk: &mut Walk, pc: u64) -> Next {
    // SAFETY: the per-CPU scratch stack the walk was given.
    let stack = unsafe { &mut *walk.stack };
    let len = stack.len as usize;
    if len >= MAX_USER_FRAMES {
        return Next::Full;
    }
    stack.ips[len] = pc;
    stack.len = len as u32 + 1;
    walk.hash = mix(walk.hash ^ pc);
    walk.pc = pc;
    Next::Continue
}
