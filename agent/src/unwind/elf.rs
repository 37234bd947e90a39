//! What the unwinder needs to know of an ELF file besides its table: the
//! key its table is cached under, and how its segments are laid out, to
//! turn a mapping's address into a file address.

use std::hash::{Hash, Hasher};

use object::{Object, ObjectSection, ObjectSegment};

/// The key a file's table is cached and shared under: the GNU build ID, or
/// without one a hash of what the table is built from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKey {
    BuildId(Box<[u8]>),
    /// Hash of the call frame sections, their addresses and the program
    /// headers: files that agree on those have the same table.
    Content(u64),
}

impl std::fmt::Display for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileKey::BuildId(id) => {
                for b in id.iter() {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
            FileKey::Content(h) => write!(f, "content:{h:016x}"),
        }
    }
}

/// A loadable segment: `size` bytes at file `offset` map to `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub offset: u64,
    pub vaddr: u64,
    pub size: u64,
    pub executable: bool,
}

/// Key and segments of one ELF image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfFacts {
    pub key: FileKey,
    pub loads: Vec<Load>,
}

impl ElfFacts {
    pub fn of(file: &object::File<'_>) -> ElfFacts {
        let loads: Vec<Load> = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                let executable = match s.flags() {
                    object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                    _ => false,
                };
                Load {
                    offset,
                    vaddr: s.address(),
                    size,
                    executable,
                }
            })
            .collect();
        let key = match file.build_id() {
            Ok(Some(id)) if !id.is_empty() => FileKey::BuildId(id.into()),
            _ => {
                // SipHash with fixed keys: stable within and across runs.
                #[allow(deprecated)]
                let mut hasher = std::hash::SipHasher::new();
                for name in [".eh_frame", ".debug_frame"] {
                    if let Some(section) = file.section_by_name(name) {
                        section.address().hash(&mut hasher);
                        section.data().unwrap_or_default().hash(&mut hasher);
                    }
                }
                for load in &loads {
                    (load.offset, load.vaddr, load.size).hash(&mut hasher);
                }
                FileKey::Content(hasher.finish())
            }
        };
        ElfFacts { key, loads }
    }

    /// Load bias (runtime address − file address) of an executable
    /// mapping of this file that starts at `start` with file offset
    /// `offset`.
    pub fn load_bias(&self, start: u64, offset: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        // The mapping's first page can hold the end of the segment before
        // (offsets need not be page aligned): the executable segment whose
        // pages it covers is the one.
        let load = self
            .loads
            .iter()
            .filter(|l| {
                let first = l.offset & !(PAGE - 1);
                first <= offset && offset < l.offset + l.size.max(1)
            })
            .max_by_key(|l| (l.executable, l.offset))?;
        // start maps `offset`; the segment maps l.offset at l.vaddr + bias.
        Some(
            start
                .wrapping_sub(offset)
                .wrapping_add(load.offset)
                .wrapping_sub(load.vaddr),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_bias_of_pie_and_fixed_address_layouts() {
        // A PIE's text segment: file offset 0x1000 at vaddr 0x1000.
        let pie = ElfFacts {
            key: FileKey::Content(1),
            loads: vec![
                Load {
                    offset: 0,
                    vaddr: 0,
                    size: 0x600,
                    executable: false,
                },
                Load {
                    offset: 0x1000,
                    vaddr: 0x1000,
                    size: 0x400,
                    executable: true,
                },
            ],
        };
        assert_eq!(
            pie.load_bias(0x5555_5555_5000, 0x1000),
            Some(0x5555_5555_4000)
        );
        // A fixed-address executable: vaddr 0x401000 at offset 0x1000,
        // mapped where it was linked.
        let fixed = ElfFacts {
            key: FileKey::Content(2),
            loads: vec![Load {
                offset: 0x1000,
                vaddr: 0x401000,
                size: 0x2000,
                executable: true,
            }],
        };
        assert_eq!(fixed.load_bias(0x401000, 0x1000), Some(0));
        // Segments whose offset is not page aligned (lld, Rust): the
        // executable mapping's first page also holds the end of the
        // read-only segment before it.
        let odd = ElfFacts {
            key: FileKey::Content(3),
            loads: vec![
                Load {
                    offset: 0,
                    vaddr: 0,
                    size: 0x1a00,
                    executable: false,
                },
                Load {
                    offset: 0x1e50,
                    vaddr: 0x2e50,
                    size: 0x300,
                    executable: true,
                },
            ],
        };
        assert_eq!(
            odd.load_bias(0x7000_0000_1000, 0x1000),
            Some(0x7000_0000_0000 - 0x1000)
        );
        assert_eq!(odd.load_bias(0x7000_0000_1000, 0x9000), None);
    }

    #[test]
    fn keys_print_as_hex() {
        assert_eq!(
            FileKey::BuildId(vec![0xab, 0x01].into()).to_string(),
            "ab01"
        );
        assert_eq!(
            FileKey::Content(0x1f).to_string(),
            "content:000000000000001f"
        );
    }
}
