//! The executable mappings of a process, parsed from `/proc/<pid>/maps`.
//!
//! Only what symbolization needs is kept: executable mappings, sorted by
//! address, each with the identity of the file behind it (device and inode
//! as the kernel reports them) and the path as the process sees it.

use std::io;
use std::sync::Arc;

/// Identity of a mapped file: `(device, inode)` from `/proc/<pid>/maps`.
///
/// The same file mapped by many processes (libc, a container image layer
/// shared by several containers) has one key, so its symbols are cached once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    pub dev: u64,
    pub inode: u64,
}

/// What backs an executable mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backing {
    /// A file. `path` is the path the process mapped, without the
    /// ` (deleted)` suffix the kernel adds for unlinked files; `deleted`
    /// says whether it had one (the path may now name another file).
    File {
        key: FileKey,
        path: Arc<str>,
        deleted: bool,
    },
    /// The vDSO.
    Vdso,
    /// Anonymous memory (JIT code) or a pseudo mapping such as
    /// `[vsyscall]`: nothing to symbolize against.
    Anonymous,
}

/// One executable mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub backing: Backing,
}

impl MapEntry {
    /// File offset of `addr`, which must lie in `start..end`.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// The executable mappings of one process, sorted by start address.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProcMaps {
    entries: Vec<MapEntry>,
}

impl ProcMaps {
    /// Reads `/proc/<pid>/maps`.
    pub fn read(pid: u32) -> io::Result<Self> {
        if pid == 0 {
            // pid 0 is the idle task: no /proc entry, no user space.
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let text = std::fs::read(format!("/proc/{pid}/maps"))?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a maps file; lines that do not parse are skipped
    /// (the format is the kernel's, but a truncated read must not fail the
    /// whole process).
    pub fn parse(text: &[u8]) -> Self {
        let mut entries: Vec<MapEntry> =
            text.split(|&b| b == b'\n').filter_map(parse_line).collect();
        // The kernel prints mappings in address order; sort anyway so the
        // binary search in `find` never depends on it.
        entries.sort_by_key(|e| e.start);
        Self { entries }
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&MapEntry> {
        let i = self.entries.partition_point(|e| e.start <= addr);
        let entry = self.entries.get(i.checked_sub(1)?)?;
        (addr < entry.end).then_some(entry)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[MapEntry] {
        &self.entries
    }
}

/// Splits off the next space-separated field of `rest`.
fn next_field<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let start = rest.iter().position(|&b| b != b' ')?;
    let tail = &rest[start..];
    let len = tail.iter().position(|&b| b == b' ').unwrap_or(tail.len());
    let (field, remainder) = tail.split_at(len);
    *rest = remainder;
    Some(field)
}

fn hex(field: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok()
}

/// Parses `start-end perms offset major:minor inode [path]`; `None` for
/// lines that do not parse and for mappings that are not executable.
fn parse_line(line: &[u8]) -> Option<MapEntry> {
    let mut rest = line;
    let range = next_field(&mut rest)?;
    let perms = next_field(&mut rest)?;
    let offset = next_field(&mut rest)?;
    let dev = next_field(&mut rest)?;
    let inode = next_field(&mut rest)?;
    if perms.get(2) != Some(&b'x') {
        return None;
    }
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    let offset = hex(offset)?;
    let colon = dev.iter().position(|&b| b == b':')?;
    let dev = (hex(&dev[..colon])? << 32) | hex(&dev[colon + 1..])?;
    let inode: u64 = std::str::from_utf8(inode).ok()?.parse().ok()?;
    let path = rest.trim_ascii();

    let backing = if path == b"[vdso]" {
        Backing::Vdso
    } else if inode == 0 || path.is_empty() || path.starts_with(b"[") {
        Backing::Anonymous
    } else {
        let stripped = path.strip_suffix(b" (deleted)");
        Backing::File {
            key: FileKey { dev, inode },
            path: Arc::from(String::from_utf8_lossy(stripped.unwrap_or(path))),
            deleted: stripped.is_some(),
        }
    };
    Some(MapEntry {
        start,
        end,
        offset,
        backing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c5a00000-55d0c5a28000 r--p 00000000 08:01 1311 /usr/bin/app
55d0c5a28000-55d0c5b00000 r-xp 00028000 08:01 1311 /usr/bin/app
7f00aa000000-7f00aa100000 rwxp 00000000 00:00 0
7f00ab000000-7f00ab200000 r-xp 00010000 fd:02 77 /opt/my lib/libx.so (deleted)
7ffd1b1f0000-7ffd1b1f2000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
garbage line
";

    #[test]
    fn keeps_executable_mappings_with_identity_and_path() {
        let maps = ProcMaps::parse(MAPS.as_bytes());
        let e = maps.entries();
        assert_eq!(e.len(), 5, "{e:#?}");
        assert_eq!(
            e[0],
            MapEntry {
                start: 0x55d0c5a28000,
                end: 0x55d0c5b00000,
                offset: 0x28000,
                backing: Backing::File {
                    key: FileKey {
                        dev: 8 << 32 | 1,
                        inode: 1311
                    },
                    path: "/usr/bin/app".into(),
                    deleted: false,
                },
            }
        );
        assert_eq!(e[1].backing, Backing::Anonymous);
        // Spaces in the path survive, the (deleted) marker does not.
        assert!(matches!(&e[2].backing,
            Backing::File { key, path, deleted: true } if &**path == "/opt/my lib/libx.so" && key.dev == 0xfd << 32 | 2));
        assert_eq!(e[3].backing, Backing::Vdso);
        assert_eq!(e[4].backing, Backing::Anonymous);
    }

    #[test]
    fn find_is_exact_at_the_edges() {
        let maps = ProcMaps::parse(MAPS.as_bytes());
        assert_eq!(
            maps.find(0x55d0c5a28000).map(|e| e.start),
            Some(0x55d0c5a28000)
        );
        assert_eq!(
            maps.find(0x55d0c5afffff).map(|e| e.start),
            Some(0x55d0c5a28000)
        );
        assert_eq!(maps.find(0x55d0c5b00000), None);
        // Not executable, so not kept.
        assert_eq!(maps.find(0x55d0c5a00000), None);
        assert_eq!(maps.find(0), None);
        assert_eq!(maps.find(u64::MAX), None);
        let e = maps
            .find(0x7f00ab000010)
            .map(|e| e.file_offset(0x7f00ab000010));
        assert_eq!(e, Some(0x10010));
    }

    #[test]
    fn reads_own_maps() {
        let maps = ProcMaps::read(std::process::id()).expect("own maps");
        let here = reads_own_maps as *const () as usize as u64;
        let entry = maps.find(here).expect("own code is mapped");
        assert!(matches!(entry.backing, Backing::File { .. }));
        assert!(ProcMaps::read(0).is_err());
    }
}
