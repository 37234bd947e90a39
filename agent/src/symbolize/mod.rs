//! Turns raw addresses into frames.
//!
//! The BPF programs record, per stack, the interrupted instruction pointer
//! followed by return addresses, leaf first. [`Symbolize`] turns such a
//! stack into [`Frame`](crate::profile::Frame)s interned into a
//! [`ProfileBuilder`]; it is the boundary the pipeline is written against,
//! so the pipeline can be tested with [`fake::MapSymbolizer`].
//!
//! [`BlazeSymbolizer`] is the real one, built on blazesym:
//!
//! * **User stacks.** Each address is placed in its process's executable
//!   mappings (from `/proc/<pid>/maps`), turned into an offset in the mapped
//!   file and symbolized against that file (ELF symbols, and DWARF lines and
//!   inlined functions when present). Names are demangled (Rust, C++).
//!   Files are opened through `/proc/<pid>/map_files/` (or
//!   `/proc/<pid>/root/`), so processes in other mount namespaces
//!   (containers) and deleted-but-mapped files work; the profile records
//!   the path as the process sees it and the file's GNU build ID. vDSO
//!   frames are symbolized against the agent's own vDSO (the same image
//!   for every process of the same ABI).
//! * **Kernel stacks** are symbolized from `/proc/kallsyms` (names only:
//!   no lines, no inlining), under the mapping `[kernel.kallsyms]` with the
//!   running kernel's build ID. With `kptr_restrict` (all addresses read
//!   as zero) every kernel frame is `[unknown]`.
//! * **Return addresses** (every address after the first) are looked up at
//!   `address - 1`: the return address is the instruction *after* the
//!   call, which may belong to the next line, the next inlined function, or
//!   (after a call to a `noreturn` function at the end of a function) the
//!   next function altogether.
//! * **Frame addresses** are the looked-up address (so `ip - 1` for return
//!   addresses, which pprof allows: "a non-leaf address may be in the
//!   middle of a call instruction"); for user frames as an offset in the
//!   mapped file, so the same code has the same address in every process;
//!   for kernel frames the kernel address.
//! * **Nothing is dropped.** An address in a known file that does not
//!   resolve becomes `[<file name>+0x<offset>]`; an address in no file
//!   (JIT code, anonymous memory, garbage from a broken frame-pointer
//!   chain), or of a process that exited before we read its mappings,
//!   becomes `[unknown]`, keeping its raw address (user or kernel), with
//!   no mapping for user frames. Counted in
//!   [`SymbolizerStats::unknown_frames`].
//!
//! # Caches
//!
//! Symbolization runs on every drain window over thousands of stacks, so
//! steady state does no file parsing and no `/proc` reads:
//!
//! * per process, its executable mappings: read when the process is first
//!   seen, re-read when an address falls outside them (a `dlopen`) at most
//!   once per window, and every `maps_max_age_windows` windows (a library
//!   replaced at the same address, a reused pid);
//! * per mapped file, keyed by `(device, inode)` so a library shared by
//!   many processes (and containers sharing an image layer) is parsed
//!   once: an open handle, the build ID, and the symbolized frames per file
//!   offset (`Arc`s: a cache hit clones pointers, it never allocates
//!   strings). The parsed ELF/DWARF data lives in one long-lived blazesym
//!   `Symbolizer`;
//! * kernel names per address.
//!
//! Every cache is bounded (see [`SymbolizerConfig`]); [`Symbolize::end_window`]
//! drops processes that exited or went idle and the least recently used
//! files beyond the bounds.

mod blaze;
pub mod fake;
mod kernel;
pub(crate) mod maps;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::incarnation::{Capture, ProcessKey};
use crate::profile::{FrameId, ProfileBuilder};

pub use blaze::{BlazeSymbolizer, SymbolizerConfig};
pub use kernel::KERNEL_MAPPING_PATH;

/// Function name of frames nothing is known about.
pub const UNKNOWN: &str = "[unknown]";

/// Turns stacks of raw addresses into interned frames.
pub trait Symbolize {
    /// Symbolizes a user stack of `process` (its pid is a tgid, as the host
    /// sees it; its image says which incarnation of the pid, see
    /// [`crate::incarnation`]).
    ///
    /// `ips[0]` is the interrupted instruction pointer, the rest are return
    /// addresses (leaf first). Appends the frames (leaf first, inlined
    /// frames expanded: innermost first, with `inlined: true` on all but
    /// the outermost of a chain) interned into `builder`, to `out`.
    /// Every address yields at least one frame.
    fn user_stack(
        &mut self,
        process: ProcessKey,
        ips: &[u64],
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    );

    /// A process image captured while it ran: its mappings and open files
    /// serve its stacks even after it is gone from /proc. A second capture
    /// of the same image replaces the first.
    fn adopt(&mut self, _capture: &Arc<Capture>) {}

    /// The image ended (exited, or exec'd another): /proc/<pid> no longer
    /// describes it, so it is never read for it again.
    fn ended(&mut self, _process: ProcessKey) {}

    /// Every sample of the image is symbolized: drop what is cached for it.
    fn forget(&mut self, _process: ProcessKey) {}

    /// Symbolizes a kernel stack; same conventions as [`Self::user_stack`].
    fn kernel_stack(&mut self, ips: &[u64], builder: &mut ProfileBuilder, out: &mut Vec<FrameId>);

    /// Called once per drain window, after all stacks of the window: drop
    /// cache entries of processes that have exited, enforce cache bounds.
    fn end_window(&mut self);

    /// Counters since creation (cache hits/misses, unknown frames, files
    /// opened, errors) and current cache sizes.
    fn stats(&self) -> SymbolizerStats;
}

/// What a symbolizer did, for logs and self-monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SymbolizerStats {
    /// Addresses answered from a cache.
    pub cache_hits: u64,
    /// Addresses that had to be symbolized (or found unresolvable) anew.
    pub cache_misses: u64,
    /// Frames emitted without a function name: `[unknown]` and
    /// `[file+0x…]` placeholders.
    pub unknown_frames: u64,
    /// Reads of `/proc/<pid>/maps`.
    pub process_maps_reads: u64,
    /// Mapped files opened (each is then parsed once).
    pub files_opened: u64,
    /// Failures other than "this address has no symbol": files that could
    /// not be opened, unreadable maps, blazesym errors.
    pub errors: u64,
    /// Cached processes dropped because they exited.
    pub exited_processes: u64,
    /// Other cache evictions (idle processes and files, size bounds).
    pub evictions: u64,
    /// Currently cached processes.
    pub cached_processes: u64,
    /// Currently cached files.
    pub cached_files: u64,
    /// Currently cached symbolized addresses (user file offsets and kernel
    /// addresses).
    pub cached_addresses: u64,
}

/// Returns the shared copy of `s`, adding it to `strings` if new. Many
/// cached addresses share a function and file name; sharing keeps the
/// caches small.
fn intern(strings: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(shared) = strings.get(s) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(s);
    strings.insert(shared.clone());
    shared
}

/// Hasher for the integer keys of the caches (pids, file offsets, kernel
/// addresses, file identities), which are looked up several times per
/// frame: one multiply per word (the FxHash scheme) instead of SipHash.
/// Keys come from the kernel and from where profiled code runs, not from
/// input crafted to collide.
#[derive(Debug, Default, Clone, Copy)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_ne_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply mixes upwards only: fold the high half into the low
        // bits the table indexes with, or keys that differ only in high
        // bits (page-aligned addresses) would collide.
        self.0 ^ (self.0 >> 32)
    }
}

/// A `HashMap` with integer-like keys.
type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// Lower-case hex, as build IDs are written.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(hex(&[0x00, 0x0a, 0xff]), "000aff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn int_hasher_spreads_nearby_keys() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IntHasher>::default();
        // Consecutive offsets, page-aligned addresses, kernel addresses:
        // about as spread as random (~647 of 1024).
        for (base, stride) in [(0u64, 1u64), (0, 4096), (0xffff_ffff_8100_0000, 16)] {
            let buckets: HashSet<u64> = (0..1024u64)
                .map(|k| build.hash_one(base + k * stride) & 1023)
                .collect();
            assert!(buckets.len() > 600, "{base:#x}/{stride}: {}", buckets.len());
        }
    }

    #[test]
    fn intern_shares() {
        let mut strings = HashSet::new();
        let a = intern(&mut strings, "main");
        let b = intern(&mut strings, "main");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(strings.len(), 1);
    }
}
