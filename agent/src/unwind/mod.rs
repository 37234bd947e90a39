//! Unwinding user stacks without frame pointers: unwind tables built from
//! each mapped file's call frame information and loaded into BPF maps,
//! where the kernel walker (`agent-ebpf/src/unwind.rs`) uses them.
//!
//! - [`table`]: one file's `.eh_frame`/`.debug_frame` → sorted compact rows;
//! - [`elf`]: the key a table is shared under (build ID, or a content
//!   hash) and the file's segments, for load biases;
//! - [`cache`]: tables shared across processes under a memory cap, with
//!   eviction of files no live process maps;
//! - `worker`: the background thread that scans processes and publishes
//!   their mappings; `sink`: the BPF maps it writes.
//!
//! All of it runs on its own thread: the sampler hands it process ids
//! ([`Unwinder::observe`]) and never waits on it. Processes whose
//! mappings are not (yet) published are walked through frame pointers.

pub mod cache;
pub mod elf;
mod sink;
pub mod table;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How user stacks are unwound (`--unwind`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum UnwindMode {
    /// Tables for files built without frame pointers; frame pointers for
    /// the others.
    #[default]
    Auto,
    /// Tables for every file that has call frame information.
    Dwarf,
    /// Frame pointers only: no tables, no background work.
    Fp,
}

impl std::fmt::Display for UnwindMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnwindMode::Auto => "auto",
            UnwindMode::Dwarf => "dwarf",
            UnwindMode::Fp => "fp",
        })
    }
}

impl std::str::FromStr for UnwindMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(UnwindMode::Auto),
            "dwarf" => Ok(UnwindMode::Dwarf),
            "fp" => Ok(UnwindMode::Fp),
            _ => Err(format!("{text:?} is not one of auto, dwarf, fp")),
        }
    }
}

/// Default cap on the kernel memory unwind tables take.
pub const DEFAULT_TABLE_MEMORY: u64 = 16 << 20;
/// Largest cap accepted (the verifier test loads the programs with it).
pub const MAX_TABLE_MEMORY: u64 = 256 << 20;
/// Files whose tables can be loaded at once.
pub const FILE_SLOTS: u32 = 4096;

/// Why the unwinder could not start or write its maps.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("mapping {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the unwinder thread: {0}")]
    Thread(std::io::Error),
}

/// The unwinder's counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Counters {
    /// Tables built (files parsed successfully).
    pub files_built: AtomicU64,
    /// Files without usable call frame information (or unreadable).
    pub files_without_table: AtomicU64,
    /// `auto`: files found to keep frame pointers (no table loaded).
    pub frame_pointer_files: AtomicU64,
    /// Nanoseconds spent building tables.
    pub build_ns: AtomicU64,
    /// Tables evicted to make room.
    pub files_evicted: AtomicU64,
    /// Tables that did not fit under the cap.
    pub tables_over_memory: AtomicU64,
    /// Tables loaded now.
    pub files_loaded: AtomicU64,
    /// Bytes of rows loaded now.
    pub table_bytes: AtomicU64,
    /// The cap (bytes of the row array).
    pub capacity_bytes: AtomicU64,
    /// Processes whose mappings are published now.
    pub processes_loaded: AtomicU64,
    /// Process scans (first and repeated).
    pub processes_scanned: AtomicU64,
    /// Mappings left out of a process's entry (over the per-process limit).
    pub mappings_dropped: AtomicU64,
    /// Idle processes that gave up their tables to sampled ones.
    pub processes_demoted: AtomicU64,
    /// Map writes that failed.
    pub write_errors: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindStats {
    pub files_built: u64,
    pub files_without_table: u64,
    pub frame_pointer_files: u64,
    pub build_ns: u64,
    pub files_evicted: u64,
    pub tables_over_memory: u64,
    pub files_loaded: u64,
    pub table_bytes: u64,
    pub capacity_bytes: u64,
    pub processes_loaded: u64,
    pub processes_scanned: u64,
    pub mappings_dropped: u64,
    pub processes_demoted: u64,
    pub write_errors: u64,
}

impl Counters {
    pub fn snapshot(&self) -> UnwindStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UnwindStats {
            files_built: get(&self.files_built),
            files_without_table: get(&self.files_without_table),
            frame_pointer_files: get(&self.frame_pointer_files),
            build_ns: get(&self.build_ns),
            files_evicted: get(&self.files_evicted),
            tables_over_memory: get(&self.tables_over_memory),
            files_loaded: get(&self.files_loaded),
            table_bytes: get(&self.table_bytes),
            capacity_bytes: get(&self.capacity_bytes),
            processes_loaded: get(&self.processes_loaded),
            processes_scanned: get(&self.processes_scanned),
            mappings_dropped: get(&self.mappings_dropped),
            processes_demoted: get(&self.processes_demoted),
            write_errors: get(&self.write_errors),
        }
    }
}

/// Checks a table memory cap: at least one page, at most
/// [`MAX_TABLE_MEMORY`].
pub fn check_table_memory(bytes: u64) -> Result<u64, String> {
    if (4096..=MAX_TABLE_MEMORY).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "{bytes} bytes is outside 4KiB..={}MiB",
            MAX_TABLE_MEMORY >> 20
        ))
    }
}

/// What building one file's table took, for `hearth unwind-table`.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub rows: usize,
    pub bytes: usize,
    pub fdes: usize,
    pub has_frame_pointers: bool,
    pub build: Duration,
    /// Peak resident memory added while building (mapping the file and
    /// the table), KiB; `None` when the kernel cannot say.
    pub peak_kib: Option<u64>,
}

/// Builds `path`'s table as the unwinder does (the file mapped, the table
/// built and dropped) and measures it.
pub fn build_report(path: &std::path::Path) -> Result<BuildReport, table::TableError> {
    // Resetting the high-water mark makes it measure this build alone.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = peak_rss_kib();
    let started = std::time::Instant::now();
    let file = std::fs::File::open(path).map_err(table::TableError::Io)?;
    // SAFETY: read-only private mapping of a file we only read.
    let data = unsafe { memmap2::Mmap::map(&file) }.map_err(table::TableError::Io)?;
    let table = table::UnwindTable::from_elf(&data)?;
    let build = started.elapsed();
    let peak_kib = match (reset, before, peak_rss_kib()) {
        (true, Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    Ok(BuildReport {
        rows: table.rows.len(),
        bytes: table.bytes(),
        fdes: table.summary.fdes,
        has_frame_pointers: table.has_frame_pointers(),
        build,
        peak_kib,
    })
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Entries of the row array and of the page array for a cap of `bytes`:
/// seven eighths for rows, one eighth for page indexes (an index is about
/// 5% of its rows' size; one that does not fit is left out).
pub fn arrays_for_memory(bytes: u64) -> (u32, u32) {
    let bytes = bytes.min(MAX_TABLE_MEMORY);
    let entry = 8; // UnwindRow and UnwindPage
    let rows = (bytes / 8 * 7 / entry).max(1) as u32;
    let pages = (bytes / 8 / entry).max(1) as u32;
    (rows, pages)
}

enum Msg {
    Observe(Vec<u32>),
}

/// Set once the processes alive at start have been scanned.
#[derive(Default)]
struct Ready {
    done: Mutex<bool>,
    cond: Condvar,
}

/// The background unwinder: owns the unwind maps and the thread that fills
/// them. Dropping it stops the thread.
pub struct Unwinder {
    stop: Arc<AtomicBool>,
    tx: Option<mpsc::Sender<Msg>>,
    ready: Arc<Ready>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Unwinder {
    /// Takes the unwind maps out of `ebpf` and starts the thread, which
    /// first scans `initial` (every process when empty).
    pub fn start(
        ebpf: &mut aya::Ebpf,
        mode: UnwindMode,
        initial: Vec<u32>,
    ) -> Result<Unwinder, UnwindError> {
        let counters = Arc::new(Counters::default());
        let sink = sink::BpfSink::take(ebpf)?;
        let (capacity, page_capacity, mapping_capacity) = (
            sink.capacity(),
            sink.page_capacity(),
            sink.mapping_capacity(),
        );
        let cache = cache::TableCache::new(
            sink,
            mode,
            capacity,
            page_capacity,
            FILE_SLOTS,
            counters.clone(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut worker =
            worker::Worker::new(cache, mapping_capacity, counters.clone(), stop.clone());
        let (tx, rx) = mpsc::channel();
        let ready = Arc::new(Ready::default());
        let thread_ready = ready.clone();
        let thread = std::thread::Builder::new()
            .name("hearth-unwind".into())
            .spawn(move || {
                let initial = if initial.is_empty() {
                    worker::all_pids()
                } else {
                    initial
                };
                worker.scan_initial(initial, &rx);
                *thread_ready.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
                thread_ready.cond.notify_all();
                worker.run(rx);
            })
            .map_err(UnwindError::Thread)?;
        Ok(Unwinder {
            stop,
            tx: Some(tx),
            ready,
            counters,
            thread: Some(thread),
        })
    }

    /// Processes seen in samples: scanned if new (or not for a while).
    /// Never blocks.
    pub fn observe(&self, pids: Vec<u32>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Observe(pids));
        }
    }

    /// Waits up to `timeout` for the initial scan; true when it finished.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let done = self.ready.done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .ready
            .cond
            .wait_timeout_while(done, timeout, |d| !*d)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }

    pub fn stats(&self) -> UnwindStats {
        self.counters.snapshot()
    }
}

impl Drop for Unwinder {
    fn drop(&mut self) {
        // The thread checks the flag between processes.
        self.stop.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
