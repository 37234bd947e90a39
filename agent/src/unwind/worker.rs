//! The unwinder's thread: scans a process's executable mappings, gets each
//! mapped file's table from the cache (building it on first use), and
//! publishes the process's mappings for the kernel walker.
//!
//! A process is scanned when the unwinder starts (if alive then; the
//! processes that used the most CPU first) and when it shows up in a
//! drained window, at most every [`RESCAN_AFTER`], so libraries it loads
//! later are picked up. A rescan that finds the same mappings as the
//! last one, all of whose files got what they could, stops there: its
//! files and published entry are still right. Processes seen in samples come before the rest of
//! the start-up scan. Exited processes (and reused pids) are found every
//! [`REAP_EVERY`] and their references dropped, which lets their files'
//! tables be evicted. A reap lists /proc once rather than reading the
//! start time of every tracked process (10 µs each): a pid missing from
//! the list is gone, and only pids the kernel may have handed out again
//! since the previous reap (those the allocation cursor, the last field of
//! `/proc/loadavg`, went past) have their start times read, all of them
//! every [`FULL_REAP_EVERY`] in case the cursor went round entirely.
//!
//! When a sampled process's table does not fit under the cap even after
//! evicting the tables no process maps, processes not sampled for
//! [`IDLE_AFTER`] (or never: found by the start-up scan only) give theirs
//! up, least recently sampled first; they are scanned again if they show up
//! in a window.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hearth_ebpf::{
    UnwindMapping, UnwindProc, UNWIND_MAPPING_ANONYMOUS, UNWIND_MAPPING_FP, UNWIND_MAPPING_TABLE,
    UNWIND_MAX_MAPPINGS,
};

use super::cache::{Extents, FileUse, TableCache, TableSink};
use super::elf::{ElfFacts, FileKey};
use super::table::{Built, TableError, UnwindTable};
use super::{Counters, Msg};
use crate::process::start_time;
use crate::symbolize::maps::{Backing, MapEntry, ProcMaps};

/// A process seen again is rescanned after this long (new libraries).
pub const RESCAN_AFTER: Duration = Duration::from_secs(10);
/// How often exited processes are looked for.
pub const REAP_EVERY: Duration = Duration::from_secs(2);
/// How often every tracked process's start time is read at a reap.
pub const FULL_REAP_EVERY: Duration = Duration::from_secs(30);
/// A process not sampled for this long may give up its tables to one that
/// is.
pub const IDLE_AFTER: Duration = Duration::from_secs(30);
/// File identities remembered before the memo is cleared.
const MAX_IDENTITIES: usize = 64 * 1024;

/// A file as `stat` sees it: a changed file is a different file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ns: i128,
}

struct Process {
    start_time: u64,
    /// Files whose tables it holds references to.
    files: Vec<FileKey>,
    scanned: Instant,
    /// Last time it showed up in samples; `None`: only found by the
    /// start-up scan.
    sampled: Option<Instant>,
    /// Where its mappings are, when they are published.
    published: Option<UnwindProc>,
    /// A hash of the mappings scanned, and whether every file got its
    /// table (or needs none): when both hold at a rescan, nothing changes.
    maps: u64,
    complete: bool,
}

/// This machine's vDSO: the same image in every 64-bit process.
struct Vdso {
    facts: ElfFacts,
    image: Vec<u8>,
}

pub struct Worker<S> {
    cache: TableCache<S>,
    counters: Arc<Counters>,
    processes: HashMap<u32, Process>,
    identities: HashMap<FileId, ElfFacts>,
    vdso: Option<Vdso>,
    /// Room in the mapping array.
    mapping_space: Extents,
    /// Mapping extents given up since the last reap: a walk may still be
    /// reading one, so they are reused only after that.
    retired: Vec<UnwindProc>,
    /// The pid allocation cursor at the previous reap, and when every
    /// start time was last read; `None`: read them all at the next one.
    reaped: Option<(u32, Instant)>,
    /// Set during a scan when a file got no table for want of room, or a
    /// write failed.
    incomplete: bool,
    stop: Arc<AtomicBool>,
}

impl<S: TableSink> Worker<S> {
    /// `mapping_capacity`: entries of the kernel's mapping array.
    pub fn new(
        cache: TableCache<S>,
        mapping_capacity: u32,
        counters: Arc<Counters>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let vdso = own_vdso().and_then(|image| {
            let facts = ElfFacts::of(&object::File::parse(&*image).ok()?);
            Some(Vdso { facts, image })
        });
        Worker {
            cache,
            counters,
            processes: HashMap::new(),
            identities: HashMap::new(),
            vdso,
            mapping_space: Extents::new(mapping_capacity),
            retired: Vec::new(),
            reaped: None,
            incomplete: false,
            stop,
        }
    }

    /// The start-up scan of `pids` (busiest first), handling processes
    /// seen in samples as they come in between.
    pub(super) fn scan_initial(&mut self, mut pids: Vec<u32>, rx: &mpsc::Receiver<Msg>) {
        let cpu: HashMap<u32, u64> = pids.iter().map(|&p| (p, cpu_ticks(p))).collect();
        pids.sort_by_key(|p| std::cmp::Reverse(cpu[p]));
        for pid in pids {
            while let Ok(Msg::Observe(sampled)) = rx.try_recv() {
                self.observe_all(&sampled);
            }
            if self.stopped() {
                return;
            }
            self.observe(pid, false);
        }
    }

    /// Handles messages until the channel closes or `stop` is set.
    pub(super) fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let mut reaped = Instant::now();
        while !self.stopped() {
            match rx.recv_timeout(REAP_EVERY) {
                Ok(Msg::Observe(pids)) => self.observe_all(&pids),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if reaped.elapsed() >= REAP_EVERY {
                self.reap();
                reaped = Instant::now();
            }
        }
    }

    fn observe_all(&mut self, sampled: &[u32]) {
        for &pid in sampled {
            if self.stopped() {
                return;
            }
            self.observe(pid, true);
        }
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Scans `pid` unless it was scanned recently. `sampled`: it showed up
    /// in samples (rather than in the start-up scan).
    pub fn observe(&mut self, pid: u32, sampled: bool) {
        if pid == 0 {
            return;
        }
        if let Some(p) = self.processes.get_mut(&pid) {
            if sampled {
                p.sampled = Some(Instant::now());
            }
            if p.scanned.elapsed() < RESCAN_AFTER {
                return;
            }
        }
        self.scan(pid, sampled);
    }

    /// Drops processes that exited (or whose pid now names another).
    pub fn reap(&mut self) {
        // The cursor before the list: a pid handed out again after the
        // list was read is past this cursor, so checked at the next reap.
        let cursor = last_pid();
        let live = live_pids();
        let full = match (self.reaped, cursor) {
            (Some((_, full_at)), Some(_)) => full_at.elapsed() >= FULL_REAP_EVERY,
            _ => true,
        };
        let since = self.reaped.map(|(c, _)| c);
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(&pid, p)| {
                if live.as_ref().is_some_and(|l| !l.contains(&pid)) {
                    return true;
                }
                let maybe_reused = full
                    || live.is_none()
                    || matches!((since, cursor), (Some(s), Some(c)) if handed_out(pid, s, c));
                maybe_reused && start_time(pid) != Some(p.start_time)
            })
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            self.forget(pid);
        }
        self.reaped = cursor.map(|c| {
            let full_at = match self.reaped {
                Some((_, at)) if !full => at,
                _ => Instant::now(),
            };
            (c, full_at)
        });
        for extent in std::mem::take(&mut self.retired) {
            self.mapping_space.free(extent.start, extent.len);
        }
    }

    fn forget(&mut self, pid: u32) {
        if let Some(old) = self.processes.remove(&pid) {
            if let Some(extent) = old.published {
                self.counters
                    .processes_loaded
                    .fetch_sub(1, Ordering::Relaxed);
                if self.cache.sink_mut().remove_process(pid).is_err() {
                    self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                }
                self.retired.push(extent);
            }
            for key in &old.files {
                self.cache.release(key);
            }
        }
    }

    fn scan(&mut self, pid: u32, sampled: bool) {
        let (Some(start_time), Ok(maps)) = (start_time(pid), ProcMaps::read(pid)) else {
            self.forget(pid);
            return;
        };
        let fingerprint = fingerprint(&maps);
        if let Some(p) = self.processes.get_mut(&pid) {
            if p.start_time == start_time && p.maps == fingerprint && p.complete {
                let now = Instant::now();
                p.scanned = now;
                if sampled {
                    p.sampled = Some(now);
                }
                return;
            }
        }
        self.counters
            .processes_scanned
            .fetch_add(1, Ordering::Relaxed);
        self.incomplete = false;
        let mut files = Vec::new();
        let mut mappings: Vec<UnwindMapping> = Vec::new();
        for entry in maps.entries() {
            let mapping = match &entry.backing {
                Backing::Anonymous => UnwindMapping {
                    start: entry.start,
                    end: entry.end,
                    kind: UNWIND_MAPPING_ANONYMOUS,
                    ..UnwindMapping::default()
                },
                Backing::Vdso => self.vdso_mapping(pid, sampled, entry, &mut files),
                Backing::File { path, deleted, .. } => {
                    self.file_mapping(pid, sampled, entry, path, *deleted, &mut files)
                }
            };
            match mappings.last_mut() {
                // JIT code comes in many adjacent pieces: one is enough.
                Some(last)
                    if last.kind == UNWIND_MAPPING_ANONYMOUS
                        && mapping.kind == UNWIND_MAPPING_ANONYMOUS
                        && last.end == mapping.start =>
                {
                    last.end = mapping.end
                }
                _ => mappings.push(mapping),
            }
        }
        if mappings.len() > UNWIND_MAX_MAPPINGS {
            self.counters.mappings_dropped.fetch_add(
                (mappings.len() - UNWIND_MAX_MAPPINGS) as u64,
                Ordering::Relaxed,
            );
            mappings = keep_most_useful(mappings);
        }
        let published = if mappings.iter().any(|m| m.kind == UNWIND_MAPPING_TABLE) {
            self.publish(pid, &mappings)
        } else {
            // Nothing a table helps with: the frame-pointer walker does
            // the same work without the lookups.
            if self.cache.sink_mut().remove_process(pid).is_err() {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            None
        };
        let was_published = self
            .processes
            .get(&pid)
            .is_some_and(|p| p.published.is_some());
        match (was_published, published.is_some()) {
            (false, true) => {
                self.counters
                    .processes_loaded
                    .fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.counters
                    .processes_loaded
                    .fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // A file without room, or a failed write, is tried again at the
        // next rescan.
        let complete = !self.incomplete
            && (published.is_some() || !mappings.iter().any(|m| m.kind == UNWIND_MAPPING_TABLE));
        let now = Instant::now();
        let last_sampled = match self.processes.get(&pid) {
            Some(p) if p.start_time == start_time => p.sampled,
            _ => None,
        };
        let old = self.processes.insert(
            pid,
            Process {
                start_time,
                files,
                scanned: now,
                sampled: if sampled { Some(now) } else { last_sampled },
                published,
                maps: fingerprint,
                complete,
            },
        );
        // Released after the new references were taken, so a file both
        // scans use is never evicted in between.
        if let Some(old) = old {
            for key in &old.files {
                self.cache.release(key);
            }
            self.retired.extend(old.published);
        }
    }

    /// Writes `mappings` to a fresh extent and points `pid`'s entry at it;
    /// where they are, or `None` when they could not be written (counted).
    fn publish(&mut self, pid: u32, mappings: &[UnwindMapping]) -> Option<UnwindProc> {
        let len = mappings.len() as u32;
        let Some(start) = self.mapping_space.allocate(len) else {
            self.counters
                .mappings_dropped
                .fetch_add(u64::from(len), Ordering::Relaxed);
            tracing::info!(
                pid,
                "unwind mapping array full: frame pointers for this process"
            );
            return None;
        };
        let extent = UnwindProc { start, len };
        let sink = self.cache.sink_mut();
        let written = sink
            .write_mappings(start, mappings)
            .and_then(|()| sink.set_process(pid, extent));
        if written.is_err() {
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            self.mapping_space.free(start, len);
            return None;
        }
        Some(extent)
    }

    fn vdso_mapping(
        &mut self,
        pid: u32,
        sampled: bool,
        entry: &MapEntry,
        files: &mut Vec<FileKey>,
    ) -> UnwindMapping {
        let mut mapping = frame_pointers(entry);
        // Taken out while the cache is borrowed; put back below.
        let Some(vdso) = self.vdso.take() else {
            return mapping;
        };
        // A 32-bit process has another vDSO.
        if (entry.end - entry.start) as usize == vdso.image.len() {
            if let Some(bias) = vdso.facts.load_bias(entry.start, entry.offset) {
                let key = vdso.facts.key.clone();
                let mut build = |budget| UnwindTable::from_elf_within(&vdso.image, budget);
                if let Some(file_use) = self.acquire(pid, sampled, &key, &mut build) {
                    files.push(key);
                    set_use(&mut mapping, file_use, bias);
                }
            }
        }
        self.vdso = Some(vdso);
        mapping
    }

    /// The cache's [`TableCache::acquire`], making room for a sampled
    /// process's table at the expense of idle processes; `None` when the
    /// maps could not be written (counted).
    fn acquire(
        &mut self,
        pid: u32,
        sampled: bool,
        key: &FileKey,
        build: &mut dyn FnMut(usize) -> Result<Built, TableError>,
    ) -> Option<FileUse> {
        loop {
            let file_use = match self.cache.acquire(key, &mut *build) {
                Ok(file_use) => file_use,
                Err(_) => {
                    self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    self.incomplete = true;
                    return None;
                }
            };
            if file_use == FileUse::NoRoom {
                self.incomplete = true;
            }
            if file_use != FileUse::NoRoom || !sampled {
                return Some(file_use);
            }
            let Some(rows) = self.cache.rows_needed(key) else {
                return Some(file_use);
            };
            // Idle processes give up their tables until it would fit.
            let mut demoted = false;
            while !self.cache.could_fit(rows) {
                let Some(victim) = self.idle_process(pid) else {
                    break;
                };
                self.forget(victim);
                self.counters
                    .processes_demoted
                    .fetch_add(1, Ordering::Relaxed);
                demoted = true;
            }
            if !demoted || !self.cache.could_fit(rows) {
                return Some(file_use);
            }
            // Try again (the reference just taken is given back first).
            self.cache.release(key);
        }
    }

    /// The published process, other than `except`, least worth keeping:
    /// never sampled, or sampled longest ago (and not within
    /// [`IDLE_AFTER`]).
    fn idle_process(&self, except: u32) -> Option<u32> {
        self.processes
            .iter()
            .filter(|&(&pid, p)| {
                pid != except
                    && p.published.is_some()
                    && p.sampled.is_none_or(|t| t.elapsed() >= IDLE_AFTER)
            })
            .min_by_key(|(_, p)| p.sampled)
            .map(|(&pid, _)| pid)
    }

    fn file_mapping(
        &mut self,
        pid: u32,
        sampled: bool,
        entry: &MapEntry,
        path: &str,
        deleted: bool,
        files: &mut Vec<FileKey>,
    ) -> UnwindMapping {
        let mut mapping = frame_pointers(entry);
        // Through map_files: exactly the mapped file, wherever it is and
        // whether or not it is still linked; else through the process's
        // root (its mount namespace), unless it was deleted.
        let map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", entry.start, entry.end);
        let root_path =
            (!deleted && path.starts_with('/')).then(|| format!("/proc/{pid}/root{path}"));
        let candidates = [Some(map_files), root_path];
        let Some((open_path, meta)) = candidates
            .into_iter()
            .flatten()
            .find_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m)))
        else {
            return mapping;
        };
        let id = FileId {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        };
        let mut opened = None;
        let facts = match self.identities.get(&id) {
            Some(facts) => facts.clone(),
            None => {
                let Ok(data) = map_file(&open_path) else {
                    return mapping;
                };
                let Ok(file) = object::File::parse(&*data) else {
                    return mapping;
                };
                let facts = ElfFacts::of(&file);
                tracing::debug!(pid, path, file = %facts.key, "mapped file");
                if self.identities.len() >= MAX_IDENTITIES {
                    self.identities.clear();
                }
                self.identities.insert(id, facts.clone());
                opened = Some(data);
                facts
            }
        };
        let Some(bias) = facts.load_bias(entry.start, entry.offset) else {
            return mapping;
        };
        let mut build = |budget| {
            let data = match opened.take() {
                Some(data) => data,
                None => map_file(&open_path).map_err(TableError::Io)?,
            };
            UnwindTable::from_elf_within(&data, budget)
        };
        if let Some(file_use) = self.acquire(pid, sampled, &facts.key, &mut build) {
            files.push(facts.key);
            set_use(&mut mapping, file_use, bias);
        }
        mapping
    }
}

fn frame_pointers(entry: &MapEntry) -> UnwindMapping {
    UnwindMapping {
        start: entry.start,
        end: entry.end,
        kind: UNWIND_MAPPING_FP,
        ..UnwindMapping::default()
    }
}

fn set_use(mapping: &mut UnwindMapping, file_use: FileUse, load_bias: u64) {
    if let FileUse::Table { slot, base } = file_use {
        mapping.kind = UNWIND_MAPPING_TABLE;
        mapping.file = slot;
        // pc − bias = file address − table base.
        mapping.bias = load_bias.wrapping_add(base);
    }
}

/// The [`UNWIND_MAX_MAPPINGS`] mappings that matter most, sorted: tables
/// first, then anonymous code (where walks stop); a left-out
/// frame-pointer mapping changes nothing but which counter a frame in it
/// bumps.
fn keep_most_useful(mut mappings: Vec<UnwindMapping>) -> Vec<UnwindMapping> {
    let rank = |m: &UnwindMapping| match m.kind {
        UNWIND_MAPPING_TABLE => 0,
        UNWIND_MAPPING_ANONYMOUS => 1,
        _ => 2,
    };
    mappings.sort_by_key(|m| (rank(m), m.start));
    mappings.truncate(UNWIND_MAX_MAPPINGS);
    mappings.sort_by_key(|m| m.start);
    mappings
}

fn map_file(path: &str) -> std::io::Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)?;
    // SAFETY: read-only private mapping; a file truncated under us can
    // fault, which executables and libraries in use are not (the kernel
    // refuses writes to running executables, and truncating a mapped
    // library crashes its users first).
    unsafe { memmap2::Mmap::map(&file) }
}

/// CPU time (user + system, clock ticks) `pid` has used; 0 when unknown.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let mut fields = after_comm.split_whitespace().skip(11);
    let mut next = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    next() + next()
}

/// A hash of what a scan uses of `maps`: where each mapping is and what
/// backs it (a file by device and inode).
fn fingerprint(maps: &ProcMaps) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in maps.entries() {
        (e.start, e.end, e.offset).hash(&mut h);
        match &e.backing {
            Backing::File { key, deleted, .. } => (0u8, key.dev, key.inode, *deleted).hash(&mut h),
            Backing::Vdso => 1u8.hash(&mut h),
            Backing::Anonymous => 2u8.hash(&mut h),
        }
    }
    h.finish()
}

/// Every process id in /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The process ids in /proc now; `None` when it cannot be listed.
fn live_pids() -> Option<HashSet<u32>> {
    let dir = std::fs::read_dir("/proc").ok()?;
    Some(
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
    )
}

/// The pid the kernel handed out last (in our pid namespace), from the
/// last field of `/proc/loadavg`: "0.12 0.70 1.76 1/118 17407".
fn last_pid() -> Option<u32> {
    parse_last_pid(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_last_pid(loadavg: &str) -> Option<u32> {
    loadavg.split_whitespace().nth(4)?.parse().ok()
}

/// True when `pid` may have been handed out while the allocation cursor
/// moved from `from` to `to`: pids are allocated upwards from the cursor,
/// wrapping round at `pid_max`, so those handed out lie in `from+1..=to`,
/// or above `from` and up to `to` across the wrap. (A cursor that went
/// round entirely is not seen here: [`FULL_REAP_EVERY`] covers it.)
fn handed_out(pid: u32, from: u32, to: u32) -> bool {
    if from <= to {
        from < pid && pid <= to
    } else {
        pid > from || pid <= to
    }
}

/// A copy of this process's vDSO image.
fn own_vdso() -> Option<Vec<u8>> {
    // SAFETY: getauxval has no preconditions.
    let start = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if start == 0 {
        return None;
    }
    let maps = ProcMaps::read(std::process::id()).ok()?;
    let entry = maps
        .entries()
        .iter()
        .find(|e| e.backing == Backing::Vdso && e.start == start)?;
    let len = (entry.end - entry.start) as usize;
    // SAFETY: the vDSO is mapped readable at `start` for `len` bytes for
    // the life of the process.
    Some(unsafe { std::slice::from_raw_parts(start as *const u8, len) }.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind::cache::tests::FakeSink;
    use crate::unwind::UnwindMode;

    fn worker(mode: UnwindMode) -> Worker<FakeSink> {
        let counters = Arc::new(Counters::default());
        let cache = TableCache::new(
            FakeSink::default(),
            mode,
            1 << 22,
            1 << 20,
            64,
            counters.clone(),
        );
        Worker::new(cache, 1024, counters, Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn own_process_is_published_with_libc_and_the_vdso() {
        let mut w = worker(UnwindMode::Dwarf);
        let me = std::process::id();
        w.observe(me, true);
        let mappings = w.cache.sink_mut().process_mappings(me).expect("published");
        assert!(mappings.windows(2).all(|p| p[0].end <= p[1].start));
        // The address of a libc function is in a table mapping, and the
        // table has a rule for it.
        let libc_fn = libc::getpid as *const () as u64;
        let m = mappings
            .iter()
            .find(|m| m.start <= libc_fn && libc_fn < m.end)
            .expect("libc mapped");
        assert_eq!(m.kind, UNWIND_MAPPING_TABLE);
        let vdso_start = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
        let vdso = mappings
            .iter()
            .find(|m| m.start == vdso_start)
            .expect("vdso listed");
        assert_eq!(vdso.kind, UNWIND_MAPPING_TABLE);
        let stats = w.counters.snapshot();
        assert!(stats.files_built >= 2, "{stats:?}");
        assert_eq!(stats.processes_loaded, 1);
        // A second scan soon after is skipped; a forced one reuses tables.
        w.observe(me, true);
        assert_eq!(w.counters.snapshot().processes_scanned, 1);
        w.scan(me, true);
        assert_eq!(w.counters.snapshot().files_built, stats.files_built);
        assert_eq!(w.counters.snapshot().processes_loaded, 1);
        // Unless a library was loaded meanwhile, a rescan stops at the
        // unchanged mappings; a changed process is scanned through.
        let scans = w.counters.snapshot().processes_scanned;
        assert!(w.processes[&me].complete);
        w.scan(me, true);
        assert!(w.counters.snapshot().processes_scanned <= scans + 1);
        w.processes.get_mut(&me).unwrap().maps ^= 1;
        w.scan(me, true);
        assert!(w.counters.snapshot().processes_scanned > scans);
        assert_eq!(w.counters.snapshot().processes_loaded, 1);
    }

    /// A child process that sleeps for longer than any test runs.
    fn sleep_child() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep(1) runs")
    }

    #[test]
    fn exited_processes_are_forgotten() {
        let mut w = worker(UnwindMode::Dwarf);
        let mut child = sleep_child();
        let pid = child.id();
        // Scanned once it runs `sleep`, not half-way through exec.
        let comm = format!("/proc/{pid}/comm");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        w.observe(pid, false);
        assert!(w.cache.sink_mut().processes.contains_key(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
        w.reap();
        assert!(!w.cache.sink_mut().processes.contains_key(&pid));
        assert_eq!(w.counters.snapshot().processes_loaded, 0);
        assert!(w.processes.is_empty());
    }

    #[test]
    fn pids_past_the_allocation_cursor_are_checked() {
        assert!(handed_out(105, 100, 110));
        assert!(handed_out(110, 100, 110));
        assert!(!handed_out(100, 100, 110));
        assert!(!handed_out(50, 100, 110));
        assert!(!handed_out(105, 100, 100));
        // Across the wrap at pid_max.
        assert!(handed_out(32_000, 31_000, 400));
        assert!(handed_out(350, 31_000, 400));
        assert!(!handed_out(500, 31_000, 400));
        assert_eq!(parse_last_pid("0.12 0.70 1.76 1/118 17407\n"), Some(17407));
        assert_eq!(parse_last_pid("garbage"), None);
        assert!(last_pid().is_some_and(|p| p > 0));
    }

    #[test]
    fn a_reap_after_the_first_finds_exits_from_the_pid_list() {
        let mut w = worker(UnwindMode::Dwarf);
        let mut child = sleep_child();
        let pid = child.id();
        // Tracked under a start time it does not have: only a full reap
        // (the first) reads it and drops it.
        let me = std::process::id();
        w.observe(me, true);
        w.processes.insert(
            pid,
            Process {
                start_time: 1,
                files: Vec::new(),
                scanned: Instant::now(),
                sampled: None,
                published: None,
                maps: 0,
                complete: false,
            },
        );
        w.reaped = Some((last_pid().unwrap(), Instant::now()));
        w.reap();
        assert!(w.processes.contains_key(&pid), "not read: not handed out");
        w.reaped = None;
        w.reap();
        assert!(!w.processes.contains_key(&pid), "read at a full reap");
        // An exit is found from the list alone.
        let mut other = sleep_child();
        let other_pid = other.id();
        w.observe(other_pid, false);
        assert!(w.processes.contains_key(&other_pid));
        assert!(w.reaped.is_some());
        other.kill().unwrap();
        other.wait().unwrap();
        w.reap();
        assert!(!w.processes.contains_key(&other_pid));
        assert!(w.processes.contains_key(&me));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn most_useful_mappings_are_kept() {
        let m = |start: u64, kind| UnwindMapping {
            start,
            end: start + 1,
            kind,
            ..UnwindMapping::default()
        };
        let mut many: Vec<_> = (0..UNWIND_MAX_MAPPINGS as u64)
            .map(|i| m(i * 10, UNWIND_MAPPING_FP))
            .collect();
        many.push(m(5, UNWIND_MAPPING_TABLE));
        many.push(m(7, UNWIND_MAPPING_ANONYMOUS));
        let kept = keep_most_useful(many);
        assert_eq!(kept.len(), UNWIND_MAX_MAPPINGS);
        assert!(kept.windows(2).all(|p| p[0].start < p[1].start));
        assert!(kept.iter().any(|m| m.kind == UNWIND_MAPPING_TABLE));
        assert!(kept.iter().any(|m| m.kind == UNWIND_MAPPING_ANONYMOUS));
    }
}
