//! The unwind maps, taken out of the loaded object: the row and mapping
//! arrays (written through shared memory mappings, so loading a table of
//! 100 000 rows is a copy, not 100 000 syscalls), the file slots and the
//! per-process entries.
//!
//! Only the pages a write covers are mapped, and only while it is
//! written: the kernel maps every page of a BPF array mapping at once, so
//! mapping a whole array (16 MiB of rows) for each write cost a page-table
//! entry per page both ways, and pages of a mapping we kept would count in
//! the agent's resident memory although they are the kernel's map memory
//! (already counted as such).

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, HashMap, Map, MapData};
use hearth_ebpf::{names, UnwindFile, UnwindMapping, UnwindPage, UnwindProc, UnwindRow};

use super::cache::TableSink;
use super::UnwindError;

pub struct BpfSink {
    rows: Mapped<UnwindRow>,
    pages: Mapped<UnwindPage>,
    mappings: Mapped<UnwindMapping>,
    files: Array<MapData, UnwindFile>,
    processes: HashMap<MapData, u32, UnwindProc>,
}

impl BpfSink {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, UnwindError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(UnwindError::Missing(name));
        let rows = Mapped::new(take(names::UNWIND_ROWS)?, names::UNWIND_ROWS)?;
        let pages = Mapped::new(take(names::UNWIND_PAGES)?, names::UNWIND_PAGES)?;
        let mappings = Mapped::new(take(names::UNWIND_MAPPINGS)?, names::UNWIND_MAPPINGS)?;
        let files =
            Array::try_from(take(names::UNWIND_FILES)?).map_err(map(names::UNWIND_FILES))?;
        let processes =
            HashMap::try_from(take(names::UNWIND_PROCS)?).map_err(map(names::UNWIND_PROCS))?;
        Ok(BpfSink {
            rows,
            pages,
            mappings,
            files,
            processes,
        })
    }

    /// Rows the row array holds.
    pub fn capacity(&self) -> u32 {
        self.rows.len
    }

    /// Entries the page array holds.
    pub fn page_capacity(&self) -> u32 {
        self.pages.len
    }

    /// Entries the mapping array holds.
    pub fn mapping_capacity(&self) -> u32 {
        self.mappings.len
    }
}

fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> UnwindError {
    move |source| UnwindError::Map { name, source }
}

impl TableSink for BpfSink {
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), UnwindError> {
        self.rows.write(start, rows)
    }

    fn set_file(&mut self, slot: u32, file: UnwindFile) -> Result<(), UnwindError> {
        self.files
            .set(slot, file, 0)
            .map_err(map(names::UNWIND_FILES))
    }

    fn write_pages(&mut self, start: u32, pages: &[UnwindPage]) -> Result<(), UnwindError> {
        self.pages.write(start, pages)
    }

    fn write_mappings(
        &mut self,
        start: u32,
        mappings: &[UnwindMapping],
    ) -> Result<(), UnwindError> {
        self.mappings.write(start, mappings)
    }

    fn set_process(&mut self, pid: u32, process: UnwindProc) -> Result<(), UnwindError> {
        self.processes
            .insert(pid, process, 0)
            .map_err(map(names::UNWIND_PROCS))
    }

    fn remove_process(&mut self, pid: u32) -> Result<(), UnwindError> {
        match self.processes.remove(&pid) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(map(names::UNWIND_PROCS)(e)),
        }
    }
}

/// An array map created with `BPF_F_MMAPABLE`, the pages of each write
/// mapped into our memory for that write.
struct Mapped<T> {
    len: u32,
    name: &'static str,
    map: MapData,
    _rows: std::marker::PhantomData<T>,
}

impl<T: Copy> Mapped<T> {
    fn new(map: Map, name: &'static str) -> Result<Self, UnwindError> {
        let Map::Array(data) = map else {
            return Err(UnwindError::Missing(name));
        };
        let info = data.info().map_err(map_error(name))?;
        let len = info.max_entries();
        let row = std::mem::size_of::<T>();
        // The kernel lays array elements out every round_up(size, 8)
        // bytes; the types written here are multiples of 8.
        if info.value_size() as usize != row || !row.is_multiple_of(8) {
            return Err(UnwindError::Missing(name));
        }
        Ok(Mapped {
            len,
            name,
            map: data,
            _rows: std::marker::PhantomData,
        })
    }

    fn write(&mut self, start: u32, rows: &[T]) -> Result<(), UnwindError> {
        let end = u64::from(start) + rows.len() as u64;
        if end > u64::from(self.len) {
            return Err(UnwindError::Mmap {
                name: self.name,
                source: std::io::Error::other(format!(
                    "entries {start}..{end} beyond the array's {}",
                    self.len
                )),
            });
        }
        if rows.is_empty() {
            return Ok(());
        }
        let (offset, bytes, skip) =
            window(start, rows.len(), std::mem::size_of::<T>(), page_size());
        // SAFETY: mapping a BPF array map fd shared and writable is how the
        // kernel exposes BPF_F_MMAPABLE arrays; the window is page-aligned
        // and inside the array (checked above).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map.fd().as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(UnwindError::Mmap {
                name: self.name,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the entries lie `skip` bytes into the mapping just made,
        // which covers them (see `window`); they are plain data, copied as
        // bytes. Unmapped right after.
        unsafe {
            std::ptr::copy_nonoverlapping(
                rows.as_ptr().cast::<u8>(),
                ptr.cast::<u8>().add(skip),
                std::mem::size_of_val(rows),
            );
            libc::munmap(ptr, bytes);
        }
        Ok(())
    }
}

/// The page-aligned part of an array that holds `count` entries of `size`
/// bytes from entry `start`: (file offset, length, offset of the first
/// entry in it).
fn window(start: u32, count: usize, size: usize, page: usize) -> (usize, usize, usize) {
    let first = start as usize * size;
    let end = first + count * size;
    let offset = first - first % page;
    (
        offset,
        (end - offset).next_multiple_of(page),
        first - offset,
    )
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> UnwindError {
    move |source| UnwindError::Map { name, source }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::window;

    #[test]
    fn a_write_maps_only_the_pages_it_covers() {
        // Entries 0..3 of 8 bytes: the first page.
        assert_eq!(window(0, 3, 8, 4096), (0, 4096, 0));
        // Entry 512 starts the second page.
        assert_eq!(window(512, 1, 8, 4096), (4096, 4096, 0));
        // Straddling a page boundary takes both pages.
        assert_eq!(window(510, 4, 8, 4096), (0, 8192, 4080));
        // 32-byte entries: entry 130 is 64 bytes into the second page.
        assert_eq!(window(130, 200, 32, 4096), (4096, 8192, 64));
    }
}
