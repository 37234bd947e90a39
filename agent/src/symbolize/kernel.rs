//! Kernel addresses → names, from `/proc/kallsyms` through blazesym.
//!
//! kallsyms has no sizes, no lines and no inlining, so a kernel address
//! resolves to one name; names are cached per address. The blazesym
//! instance that holds the parsed kallsyms is our own (not the one used
//! for user files) so it can be thrown away and rebuilt when the set of
//! loaded modules changes: kallsyms read before a module was loaded would
//! attribute the module's addresses to whatever symbol precedes them.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::sync::Arc;

use blazesym::symbolize::source::{Kernel, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use blazesym::MaybeDefault;
use tracing::{debug, warn};

use crate::profile::Mapping;

use super::{intern, IntMap};

/// Path of the kernel's mapping in profiles (what perf calls it).
pub const KERNEL_MAPPING_PATH: &str = "[kernel.kallsyms]";

/// If kallsyms could not be used, it is tried again after this many
/// windows (an administrator may lower `kptr_restrict`), and at once if the
/// module list changes.
const RETRY_UNAVAILABLE_WINDOWS: u64 = 64;

enum State {
    /// Not needed yet: nothing read.
    Unprobed,
    Ready(Box<Symbolizer>),
    /// kallsyms unreadable or all zeros (`kptr_restrict`); since `window`.
    Unavailable {
        since: u64,
    },
}

pub(crate) struct KernelSymbols {
    state: State,
    /// Name per looked-up address; `None` when it did not resolve.
    cache: IntMap<u64, Option<Arc<str>>>,
    /// Names shared between cache entries.
    strings: HashSet<Arc<str>>,
    mapping: Mapping,
    /// Fingerprint of the module list the current state was built for.
    modules: Option<u64>,
}

/// Result of one kernel lookup.
pub(crate) struct KernelLookup {
    pub name: Option<Arc<str>>,
    pub cache_hit: bool,
    pub error: bool,
}

impl KernelSymbols {
    pub fn new() -> Self {
        Self {
            state: State::Unprobed,
            cache: IntMap::default(),
            strings: HashSet::new(),
            mapping: Mapping {
                path: Arc::from(KERNEL_MAPPING_PATH),
                build_id: read_kernel_build_id().map(Arc::from),
            },
            modules: None,
        }
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    pub fn cached_addresses(&self) -> usize {
        self.cache.len()
    }

    /// The name of the kernel function containing `addr`.
    pub fn lookup(&mut self, addr: u64, window: u64, max_cached: usize) -> KernelLookup {
        if let Some(name) = self.cache.get(&addr) {
            return KernelLookup {
                name: name.clone(),
                cache_hit: true,
                error: false,
            };
        }
        if matches!(self.state, State::Unprobed) {
            self.state = load(window);
            self.modules = modules_fingerprint();
        }
        let mut error = false;
        let name = match &self.state {
            State::Ready(symbolizer) => {
                let src = Source::Kernel(kernel_source());
                match symbolizer.symbolize_single(&src, Input::AbsAddr(addr)) {
                    Ok(Symbolized::Sym(sym)) => Some(intern(&mut self.strings, &sym.name)),
                    Ok(Symbolized::Unknown(_)) => None,
                    Err(err) => {
                        debug!(addr = format_args!("{addr:#x}"), %err, "kernel symbolization failed");
                        error = true;
                        None
                    }
                }
            }
            State::Unavailable { .. } | State::Unprobed => None,
        };
        if self.cache.len() >= max_cached {
            // A bound, not an LRU: kernel stacks revisit a small set of
            // addresses, so refilling after a rare reset is cheap.
            self.cache.clear();
            self.strings.clear();
        }
        self.cache.insert(addr, name.clone());
        KernelLookup {
            name,
            cache_hit: false,
            error,
        }
    }

    /// Rebuilds from a fresh kallsyms when modules were loaded or unloaded,
    /// and retries an unavailable kallsyms now and then.
    pub fn end_window(&mut self, window: u64) {
        let stale = match self.state {
            State::Unprobed => return,
            State::Ready(_) => false,
            State::Unavailable { since } => window >= since + RETRY_UNAVAILABLE_WINDOWS,
        };
        let modules = modules_fingerprint();
        if stale || modules != self.modules {
            debug!("kernel modules changed: kallsyms will be re-read");
            self.state = State::Unprobed;
            self.cache.clear();
            self.strings.clear();
        }
    }
}

fn kernel_source() -> Kernel {
    Kernel {
        kallsyms: MaybeDefault::Default,
        // A vmlinux with DWARF would add lines, at the cost of hundreds of
        // MB and seconds of parsing; function names are what we need.
        vmlinux: MaybeDefault::None,
        kaslr_offset: None,
        debug_syms: false,
        ..Kernel::default()
    }
}

/// Checks that kallsyms shows real addresses (with `kptr_restrict` or
/// without privileges every address reads as zero) and builds the
/// symbolizer that will parse it on first use.
fn load(window: u64) -> State {
    let first_line = std::fs::File::open("/proc/kallsyms").and_then(|f| {
        let mut line = String::new();
        BufReader::new(f).read_line(&mut line)?;
        Ok(line)
    });
    let usable = match &first_line {
        Ok(line) => line
            .split_ascii_whitespace()
            .next()
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .is_some_and(|a| a != 0),
        Err(_) => false,
    };
    if !usable {
        warn!(
            error = first_line.err().map(|e| e.to_string()),
            "/proc/kallsyms is unreadable or shows zero addresses (kptr_restrict?): kernel frames will be [unknown]"
        );
        return State::Unavailable { since: window };
    }
    let symbolizer = Symbolizer::builder()
        // We decide when kallsyms is re-read (see `end_window`).
        .enable_auto_reload(false)
        .build();
    State::Ready(Box::new(symbolizer))
}

/// Identity of the loaded module set: names, sizes and load addresses
/// (not the use counts, which change all the time).
fn modules_fingerprint() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/modules").ok()?;
    let mut hasher = DefaultHasher::new();
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        fields.next().hash(&mut hasher);
        fields.next().hash(&mut hasher);
        fields.next_back().hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// GNU build ID of the running kernel, from its ELF notes.
fn read_kernel_build_id() -> Option<String> {
    let notes = std::fs::read("/sys/kernel/notes").ok()?;
    gnu_build_id_from_notes(&notes)
}

/// Finds the `NT_GNU_BUILD_ID` note in a sequence of ELF notes (native
/// endianness) and returns it as lower-case hex.
pub(crate) fn gnu_build_id_from_notes(mut notes: &[u8]) -> Option<String> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let kind = word(notes, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = align4(name_end)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = notes.get(12..name_end)?;
        let desc = notes.get(desc_start..desc_end)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" && !desc.is_empty() {
            return Some(super::hex(desc));
        }
        notes = notes.get(align4(desc_end)?.min(notes.len())..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend_from_slice(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn finds_gnu_build_id_among_notes() {
        let mut notes = note(b"Xen\0", 3, &[1, 2, 3]);
        notes.extend(note(b"GNU\0", 1, &[0; 16]));
        notes.extend(note(b"GNU\0", 3, &[0xde, 0xad, 0x0b, 0xef]));
        assert_eq!(gnu_build_id_from_notes(&notes).as_deref(), Some("dead0bef"));
        assert_eq!(gnu_build_id_from_notes(&notes[..notes.len() - 8]), None);
        assert_eq!(gnu_build_id_from_notes(&[0xff; 40]), None);
        assert_eq!(gnu_build_id_from_notes(&[]), None);
    }

    #[test]
    fn running_kernel_build_id_is_hex_when_present() {
        if let Some(id) = read_kernel_build_id() {
            assert!(
                id.len() >= 16
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id}"
            );
        }
    }
}
