//! The table cache: one table per file (by [`FileKey`]), shared by every
//! process that maps the file, placed in the kernel's row array under a
//! memory cap.
//!
//! The row array is carved into extents, first fit. A file's table stays
//! loaded while no one needs the room, even after the last process mapping
//! it exits, so short-lived processes that run again and again (shell
//! loops, cron jobs) reuse it. When a new table does not fit, tables no
//! live process maps are evicted, least recently used first; if it still
//! does not fit it is not loaded (counted) and its mappings fall back to
//! frame pointers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hearth_ebpf::{UnwindFile, UnwindMapping, UnwindPage, UnwindProc, UnwindRow};

use super::elf::FileKey;
use super::table::{Built, TableError};
use super::{Counters, UnwindError, UnwindMode};

/// Where the cache writes: the BPF maps, or a fake in tests.
pub trait TableSink {
    /// Writes `rows` at index `start` of the row array.
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), UnwindError>;
    /// Writes a page index at index `start` of the page array.
    fn write_pages(&mut self, start: u32, pages: &[UnwindPage]) -> Result<(), UnwindError>;
    /// Points file slot `slot` at its rows.
    fn set_file(&mut self, slot: u32, file: UnwindFile) -> Result<(), UnwindError>;
    /// Writes process mappings at index `start` of the mapping array.
    fn write_mappings(&mut self, start: u32, mappings: &[UnwindMapping])
        -> Result<(), UnwindError>;
    /// Publishes a process's mappings.
    fn set_process(&mut self, pid: u32, process: UnwindProc) -> Result<(), UnwindError>;
    /// Withdraws a process's mappings (gone, or nothing to unwind).
    fn remove_process(&mut self, pid: u32) -> Result<(), UnwindError>;
}

/// How a process's mappings of a file are walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileUse {
    /// With the table in file slot `slot`, whose rows are relative to file
    /// address `base`.
    Table { slot: u32, base: u64 },
    /// Through frame pointers: the file has no table or was built with
    /// frame pointers (`auto`).
    FramePointers,
    /// Through frame pointers for now: its table did not fit under the cap.
    NoRoom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Loaded {
        slot: u32,
        start: u32,
        len: u32,
        /// Its page index: `pages` entries from `pages_start` (0: none).
        pages_start: u32,
        pages: u32,
        base: u64,
    },
    /// Its code keeps frame pointers (`auto` mode): no rows loaded.
    FramePointers,
    /// No usable call frame information.
    NoTable,
    /// Its `rows` did not fit under the cap; tried again when they may.
    DidNotFit { rows: u32 },
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Published processes whose mappings refer to it.
    users: u32,
    last_used: u64,
}

/// Entries kept for files nobody maps before the bookkeeping of those
/// without rows (a few bytes each) is pruned, least recently used first,
/// down to half: a pruned file is built again when mapped again (a table
/// that did not fit only to find it still does not), so only the oldest
/// go, and pruning every entry at each release past the limit would make
/// every release a pass over all of them.
const MAX_IDLE_ENTRIES: usize = 16 * 1024;

/// Free extents of an array map, first fit, coalescing.
#[derive(Debug, Clone, Default)]
pub struct Extents {
    /// start → length.
    free: BTreeMap<u32, u32>,
}

impl Extents {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Extents { free }
    }

    /// The start of `len` free entries, now taken.
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        let (&start, &free_len) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&start);
        if free_len > len {
            self.free.insert(start + len, free_len - len);
        }
        Some(start)
    }

    /// Gives back `len` entries from `start`.
    pub fn free(&mut self, mut start: u32, mut len: u32) {
        if len == 0 {
            return;
        }
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
            if prev + prev_len == start {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }

    /// Free entries in all.
    pub fn free_total(&self) -> u64 {
        self.free.values().map(|&l| u64::from(l)).sum()
    }

    /// Number of separate free extents.
    pub fn pieces(&self) -> usize {
        self.free.len()
    }
}

pub struct TableCache<S> {
    sink: S,
    mode: UnwindMode,
    capacity: u32,
    free: Extents,
    /// Room in the page array; a table whose index does not fit is loaded
    /// without one (searches then cover all its rows).
    free_pages: Extents,
    free_slots: Vec<u32>,
    entries: HashMap<FileKey, Entry>,
    /// Entries past which idle ones are pruned.
    prune_above: usize,
    tick: u64,
    counters: Arc<Counters>,
}

impl<S: TableSink> TableCache<S> {
    /// A cache over a row array of `capacity` rows, a page array of
    /// `page_capacity` entries and `slots` file slots.
    pub fn new(
        sink: S,
        mode: UnwindMode,
        capacity: u32,
        page_capacity: u32,
        slots: u32,
        counters: Arc<Counters>,
    ) -> Self {
        let free = Extents::new(capacity);
        counters
            .capacity_bytes
            .store(loaded_bytes(capacity, page_capacity), Ordering::Relaxed);
        TableCache {
            sink,
            mode,
            capacity,
            free,
            free_pages: Extents::new(page_capacity),
            // Popped from the back: lowest slot first.
            free_slots: (0..slots).rev().collect(),
            entries: HashMap::new(),
            prune_above: MAX_IDLE_ENTRIES,
            tick: 0,
            counters,
        }
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// How `key`'s mappings are walked, building and loading its table
    /// with `build` if needed. Takes a reference for a process, which
    /// [`release`](Self::release) gives back; a file with references is
    /// never evicted.
    ///
    /// `build` is given the most rows that could be loaded: a table with
    /// more need only be counted (`UnwindTable::from_elf_within`).
    pub fn acquire(
        &mut self,
        key: &FileKey,
        build: impl FnOnce(usize) -> Result<Built, TableError>,
    ) -> Result<FileUse, UnwindError> {
        self.tick += 1;
        let tick = self.tick;
        let retry = match self.entries.get(key).map(|e| e.state) {
            None => true,
            Some(State::DidNotFit { rows }) => self.could_fit(rows),
            Some(_) => false,
        };
        if retry {
            let state = self.build_and_load(key, build)?;
            let entry = self.entries.entry(key.clone()).or_insert(Entry {
                state,
                users: 0,
                last_used: tick,
            });
            entry.state = state;
        }
        let entry = self.entries.get_mut(key).expect("inserted above");
        entry.users += 1;
        entry.last_used = tick;
        Ok(match entry.state {
            State::Loaded { slot, base, .. } => FileUse::Table { slot, base },
            State::DidNotFit { .. } => FileUse::NoRoom,
            State::FramePointers | State::NoTable => FileUse::FramePointers,
        })
    }

    /// Gives back a reference taken by [`acquire`](Self::acquire).
    pub fn release(&mut self, key: &FileKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.users = entry.users.saturating_sub(1);
        }
        if self.entries.len() > self.prune_above {
            self.prune(MAX_IDLE_ENTRIES / 2);
        }
    }

    /// Drops the least recently used entries nobody maps and without rows
    /// until `keep` are left (or none of those are).
    fn prune(&mut self, keep: usize) {
        let idle = |e: &Entry| e.users == 0 && !matches!(e.state, State::Loaded { .. });
        let mut ages: Vec<u64> = self
            .entries
            .values()
            .filter(|e| idle(e))
            .map(|e| e.last_used)
            .collect();
        let excess = self.entries.len().saturating_sub(keep).min(ages.len());
        if excess > 0 {
            let (_, &mut cutoff, _) = ages.select_nth_unstable(excess - 1);
            self.entries
                .retain(|_, e| !(idle(e) && e.last_used <= cutoff));
        }
        // Entries that cannot be pruned do not make every release try.
        self.prune_above = MAX_IDLE_ENTRIES.max(2 * self.entries.len());
    }

    fn build_and_load(
        &mut self,
        key: &FileKey,
        build: impl FnOnce(usize) -> Result<Built, TableError>,
    ) -> Result<State, UnwindError> {
        let started = Instant::now();
        // More than this cannot be allocated below: no need to hold it.
        let budget = self.room().min(u64::from(self.capacity));
        let built = build(usize::try_from(budget).unwrap_or(usize::MAX));
        release_freed_memory();
        let c = self.counters.clone();
        c.build_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let built = match built {
            Ok(built) => built,
            Err(error) => {
                tracing::debug!(file = %key, %error, "no unwind table");
                c.files_without_table.fetch_add(1, Ordering::Relaxed);
                return Ok(State::NoTable);
            }
        };
        c.files_built.fetch_add(1, Ordering::Relaxed);
        let summary = match &built {
            Built::Table(table) => &table.summary,
            Built::TooBig { summary, .. } => summary,
        };
        if self.mode == UnwindMode::Auto && summary.has_frame_pointers() {
            c.frame_pointer_files.fetch_add(1, Ordering::Relaxed);
            return Ok(State::FramePointers);
        }
        let (table, slot, start) = match built {
            Built::Table(table) => {
                let len = table.rows.len() as u32;
                match self.allocate(len) {
                    Some((slot, start)) => (table, slot, start),
                    None => return Ok(self.did_not_fit(key, len, len as usize, started)),
                }
            }
            Built::TooBig { rows, held, .. } => {
                let rows = u32::try_from(rows).unwrap_or(u32::MAX);
                return Ok(self.did_not_fit(key, rows, held, started));
            }
        };
        let len = table.rows.len() as u32;
        let pages = table.pages.len() as u32;
        let pages_start = match self.free_pages.allocate(pages) {
            Some(at) if pages > 0 => Some(at),
            _ => None,
        };
        let (pages_start, pages) = pages_start.map_or((0, 0), |at| (at, pages));
        let written = self
            .sink
            .write_rows(start, &table.rows)
            .and_then(|()| match pages {
                0 => Ok(()),
                _ => self.sink.write_pages(pages_start, &table.pages),
            })
            .and_then(|()| {
                self.sink.set_file(
                    slot,
                    UnwindFile {
                        rows_start: start,
                        rows_len: len,
                        pages_start,
                        pages_len: pages,
                    },
                )
            });
        if let Err(e) = written {
            self.free.free(start, len);
            self.free_pages.free(pages_start, pages);
            self.free_slots.push(slot);
            return Err(e);
        }
        tracing::debug!(file = %key, rows = len, pages, "unwind table loaded");
        c.files_loaded.fetch_add(1, Ordering::Relaxed);
        c.table_bytes
            .fetch_add(loaded_bytes(len, pages), Ordering::Relaxed);
        Ok(State::Loaded {
            slot,
            start,
            len,
            pages_start,
            pages,
            base: table.base,
        })
    }

    /// Counts and logs a table of `rows` rows that did not fit (of which
    /// `held` were built at most at once), built or counted from `started`.
    fn did_not_fit(&self, key: &FileKey, rows: u32, held: usize, started: Instant) -> State {
        self.counters
            .tables_over_memory
            .fetch_add(1, Ordering::Relaxed);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(file = %key, rows, held, ms, "unwind table memory full: frame pointers for this file");
        State::DidNotFit { rows }
    }

    /// A file slot and `len` rows, evicting unused tables as needed.
    fn allocate(&mut self, len: u32) -> Option<(u32, u32)> {
        // Evicting is only worth it when it makes enough room.
        if len > self.capacity || !self.could_fit(len) {
            return None;
        }
        loop {
            if !self.free_slots.is_empty() {
                if let Some(start) = self.free.allocate(len) {
                    let slot = self.free_slots.pop().expect("checked non-empty");
                    return Some((slot, start));
                }
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    /// Rows `key`'s table needs, when it did not fit.
    pub fn rows_needed(&self, key: &FileKey) -> Option<u32> {
        match self.entries.get(key)?.state {
            State::DidNotFit { rows } => Some(rows),
            _ => None,
        }
    }

    /// True when `rows` would fit if every unused table were evicted.
    pub fn could_fit(&self, rows: u32) -> bool {
        self.room() >= u64::from(rows)
    }

    /// Rows free once every unused table is evicted.
    fn room(&self) -> u64 {
        let free = self.free.free_total();
        let evictable: u64 = self
            .entries
            .values()
            .filter(|e| e.users == 0)
            .map(|e| match e.state {
                State::Loaded { len, .. } => u64::from(len),
                _ => 0,
            })
            .sum();
        free + evictable
    }

    /// Evicts the least recently used loaded table no process maps.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.users == 0 && matches!(e.state, State::Loaded { .. }))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        let Some(key) = victim else {
            return false;
        };
        let entry = self.entries.remove(&key).expect("found above");
        if let State::Loaded {
            slot,
            start,
            len,
            pages_start,
            pages,
            ..
        } = entry.state
        {
            // No published process refers to the slot; clearing it only
            // makes a stale reference harmless.
            let _ = self.sink.set_file(slot, UnwindFile::default());
            self.free.free(start, len);
            self.free_pages.free(pages_start, pages);
            self.free_slots.push(slot);
            let c = &self.counters;
            c.files_evicted.fetch_add(1, Ordering::Relaxed);
            c.files_loaded.fetch_sub(1, Ordering::Relaxed);
            c.table_bytes
                .fetch_sub(loaded_bytes(len, pages), Ordering::Relaxed);
            tracing::debug!(file = %key, rows = len, "unwind table evicted");
        }
        true
    }

    /// Rows in use and free (for tests and checks).
    #[cfg(test)]
    fn rows_accounted(&self) -> u64 {
        let free = self.free.free_total();
        let used: u64 = self
            .entries
            .values()
            .map(|e| match e.state {
                State::Loaded { len, .. } => u64::from(len),
                _ => 0,
            })
            .sum();
        free + used
    }
}

const ROW_BYTES: u64 = std::mem::size_of::<UnwindRow>() as u64;

/// Kernel bytes of a loaded table: its rows and its page index.
fn loaded_bytes(rows: u32, pages: u32) -> u64 {
    u64::from(rows) * ROW_BYTES + u64::from(pages) * std::mem::size_of::<UnwindPage>() as u64
}

/// Gives memory freed after a build back to the system: building a large
/// table allocates tens of MiB for a moment, which glibc would otherwise
/// keep in this thread's arena (and in the agent's resident memory).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::unwind::table::{TableSummary, UnwindTable};

    /// Records what the cache wrote.
    #[derive(Default)]
    pub struct FakeSink {
        pub rows: HashMap<u32, UnwindRow>,
        pub pages: HashMap<u32, UnwindPage>,
        pub files: HashMap<u32, UnwindFile>,
        pub mappings: HashMap<u32, UnwindMapping>,
        pub processes: HashMap<u32, UnwindProc>,
    }

    impl FakeSink {
        /// The mappings published for `pid`.
        pub fn process_mappings(&self, pid: u32) -> Option<Vec<UnwindMapping>> {
            let p = self.processes.get(&pid)?;
            Some(
                (p.start..p.start + p.len)
                    .map(|i| self.mappings[&i])
                    .collect(),
            )
        }
    }

    impl TableSink for FakeSink {
        fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> Result<(), UnwindError> {
            for (i, row) in rows.iter().enumerate() {
                self.rows.insert(start + i as u32, *row);
            }
            Ok(())
        }
        fn write_pages(&mut self, start: u32, pages: &[UnwindPage]) -> Result<(), UnwindError> {
            for (i, page) in pages.iter().enumerate() {
                self.pages.insert(start + i as u32, *page);
            }
            Ok(())
        }
        fn set_file(&mut self, slot: u32, file: UnwindFile) -> Result<(), UnwindError> {
            self.files.insert(slot, file);
            Ok(())
        }
        fn write_mappings(
            &mut self,
            start: u32,
            mappings: &[UnwindMapping],
        ) -> Result<(), UnwindError> {
            for (i, m) in mappings.iter().enumerate() {
                self.mappings.insert(start + i as u32, *m);
            }
            Ok(())
        }
        fn set_process(&mut self, pid: u32, process: UnwindProc) -> Result<(), UnwindError> {
            self.processes.insert(pid, process);
            Ok(())
        }
        fn remove_process(&mut self, pid: u32) -> Result<(), UnwindError> {
            self.processes.remove(&pid);
            Ok(())
        }
    }

    fn table(rows: u32, tag: u8, frame_pointers: bool) -> Built {
        Built::Table(UnwindTable {
            base: 0x1000,
            pages: vec![UnwindPage::default(); rows.div_ceil(256) as usize],
            rows: (0..rows)
                .map(|i| UnwindRow {
                    pc: i * 4,
                    cfa_offset: u16::from(tag),
                    rule: 1,
                    fp_offset: 0,
                })
                .collect(),
            summary: TableSummary {
                fdes: 10,
                framed_fdes: 10,
                frame_pointer_fdes: if frame_pointers { 10 } else { 0 },
                ..TableSummary::default()
            },
        })
    }

    fn key(n: u64) -> FileKey {
        FileKey::Content(n)
    }

    fn cache(mode: UnwindMode, capacity: u32) -> (TableCache<FakeSink>, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        (
            TableCache::new(
                FakeSink::default(),
                mode,
                capacity,
                capacity,
                8,
                counters.clone(),
            ),
            counters,
        )
    }

    #[test]
    fn a_file_is_built_once_and_shared() {
        let (mut cache, counters) = cache(UnwindMode::Dwarf, 100);
        let first = cache.acquire(&key(1), |_| Ok(table(10, 1, false))).unwrap();
        let second = cache.acquire(&key(1), |_| panic!("built twice")).unwrap();
        assert_eq!(first, second);
        let FileUse::Table { slot, base } = first else {
            panic!("{first:?}")
        };
        assert_eq!(base, 0x1000);
        let file = cache.sink.files[&slot];
        assert_eq!(file.rows_len, 10);
        assert_eq!(cache.sink.rows[&(file.rows_start + 3)].pc, 12);
        assert_eq!(counters.files_built.load(Ordering::Relaxed), 1);
        // 10 rows and a one-entry page index.
        assert_eq!(counters.table_bytes.load(Ordering::Relaxed), 88);
        assert_eq!(file.pages_len, 1);
    }

    #[test]
    fn unused_tables_are_evicted_least_recently_used_first() {
        let (mut cache, counters) = cache(UnwindMode::Dwarf, 30);
        for n in 1..=3 {
            cache
                .acquire(&key(n), |_| Ok(table(10, n as u8, false)))
                .unwrap();
        }
        // 1 and 3 are unused now, 1 the longer.
        cache.release(&key(1));
        cache.release(&key(3));
        let fourth = cache.acquire(&key(4), |_| Ok(table(10, 4, false))).unwrap();
        assert!(matches!(fourth, FileUse::Table { .. }));
        assert_eq!(counters.files_evicted.load(Ordering::Relaxed), 1);
        assert!(!cache.entries.contains_key(&key(1)));
        assert!(cache.entries.contains_key(&key(3)));
        // 2 and 4 are in use, 3 is not: 15 rows need both 3 and... no
        // more room; nothing in use is evicted.
        let big = cache.acquire(&key(5), |_| Ok(table(15, 5, false))).unwrap();
        assert_eq!(big, FileUse::NoRoom);
        assert_eq!(counters.tables_over_memory.load(Ordering::Relaxed), 1);
        assert!(cache.entries.contains_key(&key(2)));
        assert!(cache.entries.contains_key(&key(4)));
        assert_eq!(cache.rows_accounted(), 30);
        // Once 2 is unused, the big one fits (after evicting 2 and 3).
        cache.release(&key(2));
        let big = cache.acquire(&key(5), |_| Ok(table(15, 5, false))).unwrap();
        assert!(matches!(big, FileUse::Table { .. }), "{big:?}");
        assert_eq!(cache.rows_accounted(), 30);
    }

    #[test]
    fn a_table_that_cannot_fit_is_only_counted() {
        let (mut cache, counters) = cache(UnwindMode::Dwarf, 30);
        cache.acquire(&key(1), |_| Ok(table(10, 1, false))).unwrap();
        cache.acquire(&key(2), |_| Ok(table(10, 2, false))).unwrap();
        cache.release(&key(2));
        // 10 rows free and 10 evictable: the builder is told 20.
        let mut budgets = Vec::new();
        let mut too_big = |budget| {
            budgets.push(budget);
            Ok(Built::TooBig {
                rows: 25,
                held: 0,
                summary: TableSummary::default(),
            })
        };
        let big = cache.acquire(&key(3), &mut too_big).unwrap();
        assert_eq!(big, FileUse::NoRoom);
        assert_eq!(budgets, [20]);
        assert_eq!(cache.rows_needed(&key(3)), Some(25));
        assert_eq!(counters.tables_over_memory.load(Ordering::Relaxed), 1);
        // Nothing evicted or written for it.
        assert!(cache.entries.contains_key(&key(2)));
        assert_eq!(cache.sink.rows.len(), 20);
        // Not built again while it still cannot fit.
        cache.acquire(&key(3), |_| panic!("rebuilt")).unwrap();
        // Once it can, it is.
        cache.release(&key(1));
        let loaded = cache.acquire(&key(3), |budget| {
            assert_eq!(budget, 30);
            Ok(table(25, 3, false))
        });
        assert!(matches!(loaded, Ok(FileUse::Table { .. })), "{loaded:?}");
    }

    #[test]
    fn a_real_table_loads_whole_or_not_at_all() {
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("libc");
        let full = UnwindTable::from_elf(&data).unwrap();
        let rows = full.rows.len() as u32;
        let build = |budget| UnwindTable::from_elf_within(&data, budget);
        // Room for it: exactly the rows built without a budget.
        let (mut roomy, _) = cache(UnwindMode::Dwarf, rows);
        let FileUse::Table { slot, base } = roomy.acquire(&key(1), build).unwrap() else {
            panic!("not loaded");
        };
        assert_eq!(base, full.base);
        let file = roomy.sink.files[&slot];
        assert_eq!(file.rows_len, rows);
        let written: Vec<UnwindRow> = (file.rows_start..file.rows_start + rows)
            .map(|i| roomy.sink.rows[&i])
            .collect();
        assert!(written == full.rows);
        // One row short: counted, not loaded, and retried only once there
        // is room for all of it.
        let (mut tight, counters) = cache(UnwindMode::Dwarf, rows - 1);
        let refused = tight.acquire(&key(1), build).unwrap();
        assert_eq!(refused, FileUse::NoRoom);
        assert_eq!(tight.rows_needed(&key(1)), Some(rows));
        assert!(tight.sink.rows.is_empty());
        assert_eq!(counters.files_built.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn free_extents_coalesce() {
        let (mut cache, _) = cache(UnwindMode::Dwarf, 30);
        for n in 1..=3 {
            cache
                .acquire(&key(n), |_| Ok(table(10, n as u8, false)))
                .unwrap();
            cache.release(&key(n));
        }
        // All three evicted to make one contiguous 30-row extent.
        let all = cache.acquire(&key(9), |_| Ok(table(30, 9, false))).unwrap();
        assert!(matches!(all, FileUse::Table { .. }));
        assert_eq!(cache.free.pieces(), 0);
    }

    #[test]
    fn auto_mode_leaves_frame_pointer_files_out() {
        let (mut cache, counters) = cache(UnwindMode::Auto, 100);
        let fp = cache.acquire(&key(1), |_| Ok(table(10, 1, true))).unwrap();
        assert_eq!(fp, FileUse::FramePointers);
        let no_fp = cache.acquire(&key(2), |_| Ok(table(10, 2, false))).unwrap();
        assert!(matches!(no_fp, FileUse::Table { .. }));
        assert_eq!(counters.frame_pointer_files.load(Ordering::Relaxed), 1);
        let (mut cache, _) = super::tests::cache(UnwindMode::Dwarf, 100);
        let fp = cache.acquire(&key(1), |_| Ok(table(10, 1, true))).unwrap();
        assert!(matches!(fp, FileUse::Table { .. }));
    }

    #[test]
    fn files_without_table_are_remembered() {
        let (mut cache, counters) = cache(UnwindMode::Dwarf, 100);
        let none = cache
            .acquire(&key(1), |_| Err(TableError::NoUnwindInfo))
            .unwrap();
        assert_eq!(none, FileUse::FramePointers);
        cache.acquire(&key(1), |_| panic!("retried")).unwrap();
        assert_eq!(counters.files_without_table.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn idle_entries_are_pruned_oldest_first() {
        let (mut cache, counters) = cache(UnwindMode::Dwarf, 1000);
        let loaded = cache.acquire(&key(0), |_| Ok(table(10, 1, false))).unwrap();
        assert!(matches!(loaded, FileUse::Table { .. }));
        cache.release(&key(0));
        for n in 1..=10 {
            cache
                .acquire(&key(n), |_| Err(TableError::NoUnwindInfo))
                .unwrap();
            cache.release(&key(n));
        }
        // One still mapped.
        cache
            .acquire(&key(11), |_| Err(TableError::NoUnwindInfo))
            .unwrap();
        cache.prune(5);
        // The loaded table and the mapped file stay; of the idle ones, the
        // most recently used.
        assert!(cache.entries.contains_key(&key(0)));
        assert!(cache.entries.contains_key(&key(11)));
        assert_eq!(cache.entries.len(), 5);
        for n in 8..=10 {
            assert!(cache.entries.contains_key(&key(n)), "{n}");
        }
        assert_eq!(cache.prune_above, MAX_IDLE_ENTRIES);
        // A kept one is not built again.
        cache.acquire(&key(10), |_| panic!("rebuilt")).unwrap();
        assert_eq!(counters.files_without_table.load(Ordering::Relaxed), 11);
    }

    #[test]
    fn slots_run_out_before_rows() {
        let (mut cache, _) = cache(UnwindMode::Dwarf, 1000);
        for n in 0..8 {
            let use_ = cache.acquire(&key(n), |_| Ok(table(1, 1, false))).unwrap();
            assert!(matches!(use_, FileUse::Table { .. }));
        }
        let ninth = cache.acquire(&key(8), |_| Ok(table(1, 1, false))).unwrap();
        assert_eq!(ninth, FileUse::NoRoom);
        cache.release(&key(0));
        let again = cache.acquire(&key(9), |_| Ok(table(1, 1, false))).unwrap();
        assert_eq!(
            again,
            FileUse::Table {
                slot: 0,
                base: 0x1000
            }
        );
    }
}
