//! The local profile store: where `hearth run` keeps its windows when there
//! is no OTLP backend, and what `hearth flamegraph --store` reads back.
//!
//! # Layout
//!
//! One directory, one file per window, each a gzipped pprof exactly as
//! [`pprof::write`] produces it (so `go tool pprof` reads any of them).
//! The file name carries the window's start and end in UTC, to the
//! millisecond:
//!
//! ```text
//! 2026-11-21T100000.000Z_2026-11-21T100010.000Z.pb.gz
//! 2026-11-21T100000.000Z_2026-11-21T100010.000Z.1.pb.gz   (same times again)
//! ```
//!
//! That is RFC 3339 without the colons (which some tools treat as host
//! separators). Names sort chronologically, `ls` shows what a file covers,
//! and listing or selecting windows never opens a file. Times are truncated
//! to whole milliseconds. A second window with the same start and end (the
//! clock was set back) gets a `.N` counter instead of replacing the first;
//! the store assumes one writer at a time.
//!
//! Files whose names do not have this form (temporary files of a write in
//! progress, which start with a dot, or anything an operator put there) are
//! ignored and never deleted.
//!
//! # Writing
//!
//! [`Store::write`] writes a temporary file, syncs it, renames it into place
//! and syncs the directory, so a reader or a crash never sees half a
//! window. Windows without samples are written too: they are a few hundred
//! bytes and show that the agent was running and saw nothing, which a gap
//! would not. Retention then removes the oldest windows (by start): every
//! window that ended more than [`Retention::max_age`] ago, then the oldest
//! ones while the store is over [`Retention::max_bytes`]. The newest window
//! is never removed for size, so a too-small limit still leaves the latest
//! state on disk.
//!
//! The store keeps an index of its windows in memory (built by
//! [`Store::open`]) instead of listing the directory every ten seconds;
//! windows someone else deleted are dropped from the index when retention
//! reaches them.
//!
//! # Reading
//!
//! [`load`] merges the windows a [`Selection`] names. Whole windows are
//! selected (a window is in if any part of it is in the time range);
//! samples are filtered by process. A selected window that cannot be
//! decoded is skipped with a warning naming it, because one damaged file
//! should not hide a week of profiles; only when every selected window is
//! damaged is that an error. A window removed by retention between listing
//! and reading is skipped quietly.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use super::{pprof, ExportError};
use crate::profile::{Profile, ProfileBuilder};

/// Suffix of every window file.
const EXTENSION: &str = ".pb.gz";
/// Length of one timestamp in a file name: `2026-11-21T100000.000Z`.
const STAMP_LEN: usize = 22;
/// Collisions beyond this many windows with identical times are an error:
/// something is writing in a loop.
const MAX_COUNTER: u32 = 1000;
/// humantime formats years up to 9999; later times have no name.
const LAST_NAMEABLE_SECOND: u64 = 253_402_300_799;

/// How long and how much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Windows that ended longer ago than this are removed.
    pub max_age: Duration,
    /// The oldest windows are removed while all windows together are larger.
    pub max_bytes: u64,
}

impl Default for Retention {
    /// 7 days, 1 GiB.
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

/// One window file in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWindow {
    pub path: PathBuf,
    /// Start of the window, from the file name (whole milliseconds).
    pub start: SystemTime,
    /// End of the window, from the file name (whole milliseconds).
    pub end: SystemTime,
    /// Size of the file.
    pub bytes: u64,
}

/// What one [`Store::write`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The window's file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Windows retention removed afterwards, and their total size.
    pub removed_files: u64,
    pub removed_bytes: u64,
}

/// Which windows and samples [`load`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only windows that end after this.
    pub since: Option<SystemTime>,
    /// Only windows that start before this.
    pub until: Option<SystemTime>,
    /// Only samples of these process ids…
    pub pids: Vec<u32>,
    /// …or of processes with one of these names (exact match). Empty
    /// `pids` and `processes`: every sample.
    pub processes: Vec<String>,
}

impl Selection {
    fn filters_processes(&self) -> bool {
        !self.pids.is_empty() || !self.processes.is_empty()
    }

    fn selects_window(&self, w: &StoredWindow) -> bool {
        self.since.is_none_or(|since| w.end > since)
            && self.until.is_none_or(|until| w.start < until)
    }

    /// The process filter in words, e.g. `pid 42 or 43, or process nginx`.
    pub fn describe_processes(&self) -> String {
        let mut parts = Vec::new();
        if !self.pids.is_empty() {
            let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
            parts.push(format!("pid {}", pids.join(" or ")));
        }
        if !self.processes.is_empty() {
            parts.push(format!("process {}", self.processes.join(" or ")));
        }
        parts.join(", or ")
    }
}

/// Why the store could not be opened, written or read. Each message names
/// the directory or file. Causes are part of the message rather than a
/// `source()` chain, so `{:#}` printing does not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create store directory {}: {error}", path.display())]
    CreateDir { path: PathBuf, error: io::Error },
    #[error("store directory {} is not writable: {error}", path.display())]
    NotWritable { path: PathBuf, error: io::Error },
    #[error("cannot read store directory {}: {error}", path.display())]
    ReadDir { path: PathBuf, error: io::Error },
    #[error("cannot write window {}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
    #[error(
        "cannot store a window starting at {start:?} and lasting {duration:?}: \
         only windows between 1970 and 9999 can be named"
    )]
    Unnameable {
        start: SystemTime,
        duration: Duration,
    },
    #[error("cannot remove old window {} ({failed} removal(s) failed): {error}", path.display())]
    Remove {
        path: PathBuf,
        failed: usize,
        error: io::Error,
    },
    #[error("cannot read window {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("window {} is damaged: {error}", path.display())]
    Corrupt { path: PathBuf, error: ExportError },
    #[error("store {} holds no profile windows", dir.display())]
    Empty { dir: PathBuf },
    #[error(
        "no windows from {} to {} in store {}; it holds {held}",
        show_bound(*since, "the beginning"), show_bound(*until, "now"), dir.display()
    )]
    NoWindows {
        dir: PathBuf,
        since: Option<SystemTime>,
        until: Option<SystemTime>,
        /// What the store does hold, in words.
        held: String,
    },
    #[error(
        "{windows} window(s) from {} to {} in store {} hold no samples{}",
        show_time(*first), show_time(*last), dir.display(),
        if filter.is_empty() { String::new() } else { format!(" of {filter}") }
    )]
    NoSamples {
        dir: PathBuf,
        windows: usize,
        first: SystemTime,
        last: SystemTime,
        /// The process filter in words; empty without one.
        filter: String,
    },
}

impl StoreError {
    /// True for the errors that mean "nothing there to show" rather than a
    /// failure: an empty store, a time range without windows, or windows
    /// without matching samples.
    pub fn is_nothing_matched(&self) -> bool {
        matches!(
            self,
            StoreError::Empty { .. } | StoreError::NoWindows { .. } | StoreError::NoSamples { .. }
        )
    }
}

/// A store directory open for writing windows.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    retention: Retention,
    /// Every window file, sorted by (start, end, path).
    windows: Vec<StoredWindow>,
    /// Sum of `windows[..].bytes`.
    total_bytes: u64,
}

impl Store {
    /// Opens `dir`, creating it (mode 0755, parents too) if needed, and
    /// checks now that windows can be written there, so a wrong path or
    /// missing permission fails at start-up rather than ten seconds later.
    pub fn open(dir: &Path, retention: Retention) -> Result<Store, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|error| StoreError::CreateDir {
                path: dir.to_path_buf(),
                error,
            })?;
        let probe = dir.join(format!(".hearth-probe-{}", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|error| StoreError::NotWritable {
                path: dir.to_path_buf(),
                error,
            })?;
        let windows = list(dir)?;
        let total_bytes = windows.iter().map(|w| w.bytes).sum();
        info!(
            dir = %dir.display(),
            windows = windows.len(),
            bytes = total_bytes,
            "opened the local profile store"
        );
        Ok(Store {
            dir: dir.to_path_buf(),
            retention,
            windows,
            total_bytes,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The windows the store holds, oldest first.
    pub fn windows(&self) -> &[StoredWindow] {
        &self.windows
    }

    /// Total size of the window files.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Writes `window` as one file, then applies retention. A failure to
    /// remove old windows is logged, not returned: the window itself was
    /// written, and the next write retries the removal.
    pub fn write(&mut self, window: &Profile) -> Result<WriteOutcome, StoreError> {
        let start = window.meta.start;
        let unnameable = || StoreError::Unnameable {
            start,
            duration: window.meta.duration,
        };
        let end = start
            .checked_add(window.meta.duration)
            .ok_or_else(unnameable)?;
        let (start, end) = match (truncate_to_millis(start), truncate_to_millis(end)) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(unnameable()),
        };
        let path = self.free_name(start, end)?;
        let bytes = write_atomically(&self.dir, &path, window)?;
        let stored = StoredWindow {
            path: path.clone(),
            start,
            end,
            bytes,
        };
        // Windows arrive in order, so this is nearly always the end.
        let at = self
            .windows
            .partition_point(|w| window_order(w) <= window_order(&stored));
        self.windows.insert(at, stored);
        self.total_bytes += bytes;
        debug!(path = %path.display(), bytes, samples = window.total_count(), "stored window");

        let (removed_files, removed_bytes, failure) = self.apply_retention(SystemTime::now());
        if let Some(e) = failure {
            warn!("{e}");
        }
        Ok(WriteOutcome {
            path,
            bytes,
            removed_files,
            removed_bytes,
        })
    }

    /// Removes windows past the retention limits as of `now` and returns how
    /// many files and bytes went. Windows that could not be removed stay in
    /// the index (and are retried next time); the first such failure is
    /// returned after every other removal was tried.
    pub fn enforce_retention(&mut self, now: SystemTime) -> Result<(u64, u64), StoreError> {
        match self.apply_retention(now) {
            (_, _, Some(e)) => Err(e),
            (files, bytes, None) => Ok((files, bytes)),
        }
    }

    fn apply_retention(&mut self, now: SystemTime) -> (u64, u64, Option<StoreError>) {
        // `None` when max_age reaches back before the epoch: nothing is that old.
        let cutoff = now.checked_sub(self.retention.max_age);
        let mut doomed = vec![false; self.windows.len()];
        let mut remaining = self.total_bytes;
        for (i, w) in self.windows.iter().enumerate() {
            if cutoff.is_some_and(|cutoff| w.end < cutoff) {
                doomed[i] = true;
                remaining -= w.bytes;
            }
        }
        // Oldest first; the newest window always stays.
        for (i, w) in self
            .windows
            .iter()
            .enumerate()
            .take(self.windows.len().saturating_sub(1))
        {
            if remaining <= self.retention.max_bytes {
                break;
            }
            if !doomed[i] {
                doomed[i] = true;
                remaining -= w.bytes;
            }
        }

        let (mut files, mut bytes, mut failed) = (0, 0, 0);
        let mut first_failure = None;
        let mut kept = Vec::with_capacity(self.windows.len());
        for (w, doomed) in self.windows.drain(..).zip(doomed) {
            if !doomed {
                kept.push(w);
                continue;
            }
            match fs::remove_file(&w.path) {
                Ok(()) => {
                    files += 1;
                    bytes += w.bytes;
                    self.total_bytes -= w.bytes;
                }
                // Someone else removed it: it is gone either way.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.total_bytes -= w.bytes;
                }
                Err(error) => {
                    failed += 1;
                    first_failure.get_or_insert((w.path.clone(), error));
                    kept.push(w);
                }
            }
        }
        self.windows = kept;
        if files > 0 {
            debug!(files, bytes, "retention removed old windows");
        }
        let failure = first_failure.map(|(path, error)| StoreError::Remove {
            path,
            failed,
            error,
        });
        (files, bytes, failure)
    }

    /// The first unused name for a window from `start` to `end`.
    fn free_name(&self, start: SystemTime, end: SystemTime) -> Result<PathBuf, StoreError> {
        for counter in 0..MAX_COUNTER {
            let name = window_name(start, end, counter).ok_or_else(|| StoreError::Unnameable {
                start,
                duration: end.duration_since(start).unwrap_or_default(),
            })?;
            let path = self.dir.join(name);
            match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(path),
                Err(error) => return Err(StoreError::Write { path, error }),
                Ok(_) => {}
            }
        }
        Err(StoreError::Write {
            path: self
                .dir
                .join(window_name(start, end, 0).unwrap_or_default()),
            error: io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{MAX_COUNTER} windows with these times already exist"),
            ),
        })
    }
}

/// Sort key of windows: oldest first, and a stable order for equal times.
fn window_order(w: &StoredWindow) -> (SystemTime, SystemTime, &Path) {
    (w.start, w.end, &w.path)
}

/// Writes `window` to a temporary file in `dir`, syncs it, renames it to
/// `path` and syncs `dir`. Returns the file's size.
fn write_atomically(dir: &Path, path: &Path, window: &Profile) -> Result<u64, StoreError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A leading dot keeps it out of listings (and out of `ls`).
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let err = |error| StoreError::Write {
        path: path.to_path_buf(),
        error,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(err)?;
    let written = write_synced(file, window).and_then(|bytes| {
        fs::rename(&tmp, path)?;
        Ok(bytes)
    });
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(error) => {
            // Best effort: the write error is the one worth reporting.
            let _ = fs::remove_file(&tmp);
            return Err(err(error));
        }
    };
    // Makes the rename itself durable. Some file systems cannot sync a
    // directory; the window is still there, just less certain to survive
    // a power cut.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        debug!(dir = %dir.display(), "cannot sync the store directory: {e}");
    }
    Ok(bytes)
}

fn write_synced(file: File, window: &Profile) -> io::Result<u64> {
    let mut out = BufWriter::new(file);
    pprof::write(window, &mut out).map_err(|e| match e {
        ExportError::Stream(e) => e,
        e => io::Error::other(e.to_string()),
    })?;
    let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// `t` without its sub-millisecond part; `None` outside 1970..=9999.
fn truncate_to_millis(t: SystemTime) -> Option<SystemTime> {
    let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    if since_epoch.as_secs() > LAST_NAMEABLE_SECOND {
        return None;
    }
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::new(
                since_epoch.as_secs(),
                since_epoch.subsec_millis() * 1_000_000,
            ),
    )
}

/// `2026-11-21T100000.000Z`, or `None` when `t` cannot be named.
fn stamp(t: SystemTime) -> Option<String> {
    truncate_to_millis(t)?;
    Some(
        humantime::format_rfc3339_millis(t)
            .to_string()
            .replace(':', ""),
    )
}

/// The file name of a window; `counter` > 0 tells apart windows with the
/// same times.
fn window_name(start: SystemTime, end: SystemTime, counter: u32) -> Option<String> {
    let (start, end) = (stamp(start)?, stamp(end)?);
    Some(if counter == 0 {
        format!("{start}_{end}{EXTENSION}")
    } else {
        format!("{start}_{end}.{counter}{EXTENSION}")
    })
}

/// Reads a stamp written by [`stamp`]; only the exact form is accepted.
fn parse_stamp(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() != STAMP_LEN || bytes[10] != b'T' {
        return None;
    }
    let rfc3339 = format!("{}:{}:{}", &text[..13], &text[13..15], &text[15..]);
    let t = humantime::parse_rfc3339(&rfc3339).ok()?;
    // Rejects near misses (other precisions, out-of-range fields) that
    // the parser would accept or normalize.
    (stamp(t)? == text).then_some(t)
}

/// Start and end of a window from its file name; `None` for other files.
fn parse_window_name(name: &str) -> Option<(SystemTime, SystemTime)> {
    let stem = name.strip_suffix(EXTENSION)?;
    let (start, rest) = stem.split_once('_')?;
    let end = rest.get(..STAMP_LEN)?;
    let counter = &rest[STAMP_LEN..];
    if !counter.is_empty() {
        let digits = counter.strip_prefix('.')?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let (start, end) = (parse_stamp(start)?, parse_stamp(end)?);
    (start <= end).then_some((start, end))
}

/// Every window file in `dir`, sorted by start (then end). Other files are
/// ignored.
pub fn list(dir: &Path) -> Result<Vec<StoredWindow>, StoreError> {
    let read_err = |error| StoreError::ReadDir {
        path: dir.to_path_buf(),
        error,
    };
    let mut windows = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some((start, end)) = name.to_str().and_then(parse_window_name) else {
            continue;
        };
        let metadata = match entry.metadata() {
            Ok(m) => m,
            // Removed by retention since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(StoreError::Read {
                    path: entry.path(),
                    error,
                })
            }
        };
        if !metadata.is_file() {
            continue;
        }
        windows.push(StoredWindow {
            path: entry.path(),
            start,
            end,
            bytes: metadata.len(),
        });
    }
    windows.sort_by(|a, b| window_order(a).cmp(&window_order(b)));
    Ok(windows)
}

/// The windows of `dir` that `selection` names, merged into one profile
/// with only the selected processes' samples. Nothing selected (no
/// windows, or no samples in them) is an error saying what the store does
/// hold; see [`StoreError::is_nothing_matched`].
pub fn load(dir: &Path, selection: &Selection) -> Result<Profile, StoreError> {
    let loaded = load_windows(dir, selection)?;
    for (path, error) in &loaded.skipped {
        warn!(path = %path.display(), "skipping a damaged window: {error}");
    }
    Ok(loaded.profile)
}

/// What [`load`] found, with the windows it had to skip.
struct Loaded {
    profile: Profile,
    skipped: Vec<(PathBuf, ExportError)>,
}

fn load_windows(dir: &Path, selection: &Selection) -> Result<Loaded, StoreError> {
    let all = list(dir)?;
    let (Some(first), Some(last)) = (all.first(), all.iter().map(|w| w.end).max()) else {
        return Err(StoreError::Empty {
            dir: dir.to_path_buf(),
        });
    };
    let selected: Vec<&StoredWindow> = all.iter().filter(|w| selection.selects_window(w)).collect();
    if selected.is_empty() {
        return Err(StoreError::NoWindows {
            dir: dir.to_path_buf(),
            since: selection.since,
            until: selection.until,
            held: format!(
                "{} window(s) from {} to {}",
                all.len(),
                show_time(first.start),
                show_time(last)
            ),
        });
    }

    let mut profiles = Vec::with_capacity(selected.len());
    let mut skipped = Vec::new();
    for w in &selected {
        let bytes = match fs::read(&w.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!(path = %w.path.display(), "window removed while reading");
                continue;
            }
            Err(error) => {
                return Err(StoreError::Read {
                    path: w.path.clone(),
                    error,
                })
            }
        };
        let window = match pprof::decode(&bytes) {
            Ok(p) => p,
            Err(error) => {
                skipped.push((w.path.clone(), error));
                continue;
            }
        };
        profiles.push(if selection.filters_processes() {
            window.retain_samples(|process, _| {
                selection.pids.contains(&process.pid)
                    || selection.processes.iter().any(|n| **n == *process.name)
            })
        } else {
            window
        });
    }
    if profiles.is_empty() && !skipped.is_empty() {
        let (path, error) = skipped.swap_remove(0);
        for (path, error) in &skipped {
            warn!(path = %path.display(), "damaged window: {error}");
        }
        return Err(StoreError::Corrupt { path, error });
    }

    let first = selected[0].start;
    let last = selected.iter().map(|w| w.end).max().unwrap_or(first);
    let no_samples = || StoreError::NoSamples {
        dir: dir.to_path_buf(),
        windows: selected.len(),
        first,
        last,
        filter: selection.describe_processes(),
    };
    let profile = merge(profiles).ok_or_else(no_samples)?;
    if profile.total_count() == 0 {
        return Err(no_samples());
    }
    Ok(Loaded { profile, skipped })
}

/// Merges profiles (windows, or files) into one; `None` when there are none.
///
/// Windows may have been sampled at different frequencies (the daemon
/// lowers it under load). A sample then stands for different amounts of
/// CPU time, so counts are rescaled to the highest frequency, rounded,
/// before merging; otherwise a flame graph would under-weight the
/// low-frequency windows. Profiles without a known frequency (folded
/// files) are merged as they are. The merged meta covers every profile's
/// time range (ignoring profiles with no start time) and names every host.
pub fn merge(profiles: Vec<Profile>) -> Option<Profile> {
    let first = profiles.first()?;
    let frequency_hz = profiles.iter().map(|p| p.meta.frequency_hz).max()?;
    let timed = || {
        profiles
            .iter()
            .filter(|p| p.meta.start != SystemTime::UNIX_EPOCH)
    };
    let start = timed().map(|p| p.meta.start).min();
    let end = timed()
        .filter_map(|p| p.meta.start.checked_add(p.meta.duration))
        .max();
    let hosts: BTreeSet<&str> = profiles
        .iter()
        .map(|p| p.meta.hostname.as_str())
        .filter(|h| !h.is_empty())
        .collect();
    let mut meta = first.meta.clone();
    meta.frequency_hz = frequency_hz;
    meta.start = start.unwrap_or(SystemTime::UNIX_EPOCH);
    meta.duration = match (start, end) {
        (Some(s), Some(e)) => e.duration_since(s).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    meta.hostname = hosts.into_iter().collect::<Vec<_>>().join(", ");

    let mut builder = ProfileBuilder::new(meta.clone());
    let mut rescaled = 0;
    for mut p in profiles {
        let hz = p.meta.frequency_hz;
        if hz > 0 && hz != frequency_hz {
            rescaled += 1;
            for s in &mut p.samples {
                s.count = rescale(s.count, hz, frequency_hz);
            }
        }
        builder.merge(&p);
    }
    if rescaled > 0 {
        info!(
            profiles = rescaled,
            frequency_hz, "rescaled sample counts of profiles taken at a lower frequency"
        );
    }
    // `merge` widened the meta from the first profile's; the one computed
    // above is the one that holds.
    *builder.meta_mut() = meta;
    Some(builder.build())
}

/// `count` samples at `from` Hz as samples at `to` Hz, rounded to nearest.
fn rescale(count: u64, from: u64, to: u64) -> u64 {
    let scaled = (u128::from(count) * u128::from(to) + u128::from(from) / 2) / u128::from(from);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// RFC 3339 to the second, or a plain description for times humantime
/// cannot format (it panics on them).
pub(crate) fn show_time(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= LAST_NAMEABLE_SECOND => {
            humantime::format_rfc3339_seconds(t).to_string()
        }
        Ok(d) => format!("{}s after 1970", d.as_secs()),
        Err(_) => "before 1970".to_owned(),
    }
}

fn show_bound(t: Option<SystemTime>, open: &str) -> String {
    t.map_or_else(|| open.to_owned(), show_time)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::profile::tests::native;
    use crate::profile::{Process, ProfileMeta, SampleKind};

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A fresh, empty directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-store-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// Never removes anything by itself.
    fn keep_all() -> Retention {
        Retention {
            max_age: Duration::MAX,
            max_bytes: u64::MAX,
        }
    }

    /// A 10 s window starting at `start` with `samples` of (pid, name, leaf, count).
    fn window(start: SystemTime, samples: &[(u32, &str, &str, u64)]) -> Profile {
        let mut b = ProfileBuilder::new(ProfileMeta {
            kind: SampleKind::OnCpu,
            start,
            duration: Duration::from_secs(10),
            frequency_hz: 19,
            hostname: "testhost".into(),
        });
        let main = b.intern_frame(&native("main"));
        for &(pid, name, leaf, count) in samples {
            let p = b.intern_process(&Process {
                pid,
                name: name.into(),
                executable: None,
                metadata: Default::default(),
            });
            let leaf = b.intern_frame(&native(leaf));
            b.add_sample(p, pid, Arc::from(name), vec![leaf, main], count);
        }
        b.build()
    }

    /// (pid, name, leaf, count) of every sample, sorted.
    fn contents(p: &Profile) -> Vec<(u32, String, String, u64)> {
        let mut out: Vec<_> = p
            .samples
            .iter()
            .map(|s| {
                let proc = p.process(s.process);
                let leaf = p.frame(s.frames[0]).function.to_string();
                (proc.pid, proc.name.to_string(), leaf, s.count)
            })
            .collect();
        out.sort();
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn file_names_round_trip() {
        let start = at(T0) + Duration::from_nanos(123_456_789);
        let end = start + Duration::from_secs(10);
        let name = window_name(start, end, 0).unwrap();
        assert_eq!(name, "2023-11-14T221320.123Z_2023-11-14T221330.123Z.pb.gz");
        let (s, e) = parse_window_name(&name).unwrap();
        assert_eq!(s, at(T0) + Duration::from_millis(123));
        assert_eq!(e, at(T0 + 10) + Duration::from_millis(123));

        let again = window_name(start, end, 3).unwrap();
        assert_eq!(
            again,
            "2023-11-14T221320.123Z_2023-11-14T221330.123Z.3.pb.gz"
        );
        assert_eq!(parse_window_name(&again), Some((s, e)));

        // Names sort like times.
        let later = window_name(at(T0 + 86_400), at(T0 + 86_410), 0).unwrap();
        assert!(later > name);

        for other in [
            "notes.txt",
            "x.pb.gz",
            ".2023-11-14T221320.123Z_2023-11-14T221330.123Z.pb.gz.tmp-1-0",
            "2023-11-14T221320.123Z_2023-11-14T221330.123Z.pb",
            "2023-11-14T221320.123Z_2023-11-14T221330.123Z..pb.gz",
            "2023-11-14T221320.123Z_2023-11-14T221330.123Z.x.pb.gz",
            "2023-11-14T221320Z_2023-11-14T221330Z.pb.gz",
            "2023-11-14T221320.123Z-2023-11-14T221330.123Z.pb.gz",
            "2023-13-14T221320.123Z_2023-13-14T221330.123Z.pb.gz",
            // Ends before it starts.
            "2023-11-14T221330.123Z_2023-11-14T221320.123Z.pb.gz",
        ] {
            assert_eq!(parse_window_name(other), None, "{other}");
        }
        assert_eq!(
            window_name(SystemTime::UNIX_EPOCH - Duration::from_secs(1), at(T0), 0),
            None
        );
        assert_eq!(window_name(at(T0), at(LAST_NAMEABLE_SECOND + 1), 0), None);
    }

    #[test]
    fn write_is_atomic_and_list_reads_names_only() {
        let dir = scratch("write");
        let mut store = Store::open(&dir, keep_all()).unwrap();
        let w1 = window(at(T0 + 10), &[(1, "a", "fa", 2)]);
        let w0 = window(at(T0), &[]);
        let out1 = store.write(&w1).unwrap();
        let out0 = store.write(&w0).unwrap();
        assert_eq!(out1.bytes, fs::metadata(&out1.path).unwrap().len());
        assert_eq!((out1.removed_files, out1.removed_bytes), (0, 0));
        // No temporary or probe file is left behind; an empty window is stored.
        assert_eq!(
            names(&dir),
            [
                "2023-11-14T221320.000Z_2023-11-14T221330.000Z.pb.gz",
                "2023-11-14T221330.000Z_2023-11-14T221340.000Z.pb.gz",
            ]
        );
        // Plain gzipped pprof, readable on its own.
        let decoded = pprof::decode(&fs::read(&out1.path).unwrap()).unwrap();
        assert_eq!(contents(&decoded), contents(&w1));

        let listed = list(&dir).unwrap();
        assert_eq!(listed, store.windows());
        assert_eq!(listed[0].path, out0.path);
        assert_eq!((listed[0].start, listed[0].end), (at(T0), at(T0 + 10)));
        assert_eq!(store.total_bytes(), out0.bytes + out1.bytes);

        // A second window with the same times does not replace the first.
        let dup = store.write(&w1).unwrap();
        assert_ne!(dup.path, out1.path);
        assert!(dup.path.to_str().unwrap().ends_with(".1.pb.gz"));
        assert_eq!(list(&dir).unwrap().len(), 3);

        // Listing never opens files: a file with a window name but garbage
        // inside is listed; only decoding finds out.
        fs::write(
            dir.join("2023-11-14T221400.000Z_2023-11-14T221410.000Z.pb.gz"),
            "x",
        )
        .unwrap();
        assert_eq!(list(&dir).unwrap().len(), 4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_creates_the_directory_and_reports_unusable_ones() {
        let dir = scratch("open").join("a/b");
        Store::open(&dir, keep_all()).unwrap();
        assert!(dir.is_dir());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );

        // A file where the directory should be.
        let file = dir.join("file");
        fs::write(&file, "").unwrap();
        let err = Store::open(&file, keep_all()).unwrap_err();
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains(file.to_str().unwrap()), "{err}");

        let err = list(&dir.join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        fs::remove_dir_all(dir.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn open_reports_a_read_only_directory() {
        // The tests run as root, which ignores permission bits; procfs
        // refuses new files to everyone.
        let dir = Path::new("/proc/self");
        let err = Store::open(dir, keep_all()).unwrap_err();
        assert!(matches!(err, StoreError::NotWritable { .. }), "{err:?}");
        assert!(err.to_string().contains("/proc/self"), "{err}");
    }

    #[test]
    fn retention_by_age_is_relative_to_the_window_end() {
        let dir = scratch("age");
        let mut store = Store::open(
            &dir,
            Retention {
                max_age: Duration::from_secs(60),
                max_bytes: u64::MAX,
            },
        )
        .unwrap();
        // `write` applies retention as of the real clock, which is far past
        // these windows; write with a generous policy, then tighten it.
        store.retention.max_age = Duration::MAX;
        for i in 0..4 {
            store
                .write(&window(at(T0 + 10 * i), &[(1, "a", "f", 1)]))
                .unwrap();
        }
        store.retention.max_age = Duration::from_secs(60);
        let bytes: Vec<u64> = store.windows().iter().map(|w| w.bytes).collect();

        // Window 0 ends at T0+10: 60 s old at T0+70, not yet past the limit.
        assert_eq!(store.enforce_retention(at(T0 + 70)).unwrap(), (0, 0));
        // Past it by then: windows 0 and 1 (ends T0+10, T0+20).
        assert_eq!(
            store.enforce_retention(at(T0 + 81)).unwrap(),
            (2, bytes[0] + bytes[1])
        );
        let left: Vec<SystemTime> = list(&dir).unwrap().iter().map(|w| w.start).collect();
        assert_eq!(left, [at(T0 + 20), at(T0 + 30)]);
        assert_eq!(store.windows().len(), 2);
        assert_eq!(store.total_bytes(), bytes[2] + bytes[3]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retention_by_size_removes_oldest_first_and_keeps_the_newest() {
        let dir = scratch("size");
        let mut store = Store::open(&dir, keep_all()).unwrap();
        // Written out of order: the order is by time, not by writing.
        for i in [2, 0, 3, 1] {
            store
                .write(&window(at(T0 + 10 * i), &[(1, "a", "f", i + 1)]))
                .unwrap();
        }
        let bytes: Vec<u64> = store.windows().iter().map(|w| w.bytes).collect();
        let total: u64 = bytes.iter().sum();

        // One byte over: exactly the oldest goes.
        store.retention.max_bytes = total - 1;
        assert_eq!(store.enforce_retention(at(T0)).unwrap(), (1, bytes[0]));
        let starts = |store: &Store| -> Vec<SystemTime> {
            store.windows().iter().map(|w| w.start).collect()
        };
        assert_eq!(starts(&store), [at(T0 + 10), at(T0 + 20), at(T0 + 30)]);

        // Room for less than one window: only the newest stays.
        store.retention.max_bytes = 1;
        assert_eq!(
            store.enforce_retention(at(T0)).unwrap(),
            (2, bytes[1] + bytes[2])
        );
        assert_eq!(starts(&store), [at(T0 + 30)]);
        assert_eq!(list(&dir).unwrap(), store.windows());

        // The next write applies retention on its own.
        let out = store.write(&window(at(T0 + 40), &[])).unwrap();
        assert_eq!((out.removed_files, out.removed_bytes), (1, bytes[3]));
        assert_eq!(starts(&store), [at(T0 + 40)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retention_ignores_foreign_files_and_windows_removed_by_others() {
        let dir = scratch("foreign");
        let mut store = Store::open(&dir, keep_all()).unwrap();
        let a = store.write(&window(at(T0), &[])).unwrap();
        store.write(&window(at(T0 + 10), &[])).unwrap();
        fs::write(dir.join("README"), "operator notes").unwrap();
        fs::write(dir.join(".x.pb.gz.tmp-1-1"), "half a window").unwrap();
        fs::remove_file(&a.path).unwrap();

        store.retention.max_age = Duration::ZERO;
        // The one someone else removed counts as gone, not as removed here.
        let (files, _) = store.enforce_retention(at(T0 + 1000)).unwrap();
        assert_eq!(files, 1);
        assert_eq!(store.total_bytes(), 0);
        assert_eq!(names(&dir), [".x.pb.gz.tmp-1-1", "README"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Three windows: pid 1 "api" throughout, pid 2 "db" in the middle one,
    /// pid 3 "api" (a second process with the same name) in the last.
    fn populated(test: &str) -> PathBuf {
        let dir = scratch(test);
        let mut store = Store::open(&dir, keep_all()).unwrap();
        store
            .write(&window(at(T0), &[(1, "api", "serve", 5)]))
            .unwrap();
        store
            .write(&window(
                at(T0 + 10),
                &[(1, "api", "serve", 3), (2, "db", "query", 7)],
            ))
            .unwrap();
        store
            .write(&window(
                at(T0 + 20),
                &[(1, "api", "parse", 2), (3, "api", "serve", 1)],
            ))
            .unwrap();
        dir
    }

    fn sample(pid: u32, name: &str, leaf: &str, count: u64) -> (u32, String, String, u64) {
        (pid, name.into(), leaf.into(), count)
    }

    #[test]
    fn load_merges_everything_by_default() {
        let dir = populated("load-all");
        let p = load(&dir, &Selection::default()).unwrap();
        assert_eq!(
            contents(&p),
            [
                sample(1, "api", "parse", 2),
                sample(1, "api", "serve", 8),
                sample(2, "db", "query", 7),
                sample(3, "api", "serve", 1),
            ]
        );
        assert_eq!(
            (p.meta.start, p.meta.duration),
            (at(T0), Duration::from_secs(30))
        );
        assert_eq!(p.meta.hostname, "testhost");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_selects_whole_windows_by_time() {
        let dir = populated("load-time");
        let select = |since: Option<u64>, until: Option<u64>| {
            let p = load(
                &dir,
                &Selection {
                    since: since.map(at),
                    until: until.map(at),
                    ..Selection::default()
                },
            )
            .unwrap();
            (p.total_count(), p.meta.start, p.meta.duration)
        };
        // Windows that end after `since`: the first ends at T0+10, exactly.
        assert_eq!(
            select(Some(T0 + 10), None),
            (13, at(T0 + 10), Duration::from_secs(20))
        );
        // Any overlap selects the whole window.
        assert_eq!(
            select(Some(T0 + 9), None),
            (18, at(T0), Duration::from_secs(30))
        );
        // Windows that start before `until`: the last starts at T0+20.
        assert_eq!(
            select(None, Some(T0 + 20)),
            (15, at(T0), Duration::from_secs(20))
        );
        assert_eq!(
            select(Some(T0 + 12), Some(T0 + 13)),
            (10, at(T0 + 10), Duration::from_secs(10))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_filters_samples_by_pid_or_process_name() {
        let dir = populated("load-proc");
        let select = |pids: &[u32], processes: &[&str]| {
            let p = load(
                &dir,
                &Selection {
                    pids: pids.to_vec(),
                    processes: processes.iter().map(|s| s.to_string()).collect(),
                    ..Selection::default()
                },
            )
            .unwrap();
            // Filtered processes are gone from the tables, not just the samples.
            for (id, process) in p.processes.iter().enumerate() {
                assert!(
                    p.samples.iter().any(|s| s.process as usize == id),
                    "{process:?} has no samples"
                );
            }
            contents(&p)
        };
        assert_eq!(select(&[2], &[]), [sample(2, "db", "query", 7)]);
        assert_eq!(
            select(&[], &["api"]),
            [
                sample(1, "api", "parse", 2),
                sample(1, "api", "serve", 8),
                sample(3, "api", "serve", 1),
            ]
        );
        // Either filter matching is enough.
        assert_eq!(
            select(&[3], &["db"]),
            [sample(2, "db", "query", 7), sample(3, "api", "serve", 1)]
        );
        let p = load(
            &dir,
            &Selection {
                pids: vec![2],
                ..Selection::default()
            },
        )
        .unwrap();
        assert!(p.frames.iter().all(|f| &*f.function != "serve"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_selected_says_what_the_store_holds() {
        let dir = scratch("nothing");
        fs::create_dir_all(&dir).unwrap();
        let err = load(&dir, &Selection::default()).unwrap_err();
        assert!(matches!(err, StoreError::Empty { .. }), "{err:?}");
        assert!(err.is_nothing_matched());
        assert!(err.to_string().contains(dir.to_str().unwrap()), "{err}");
        fs::remove_dir_all(&dir).unwrap();

        let dir = populated("nothing");
        let err = load(
            &dir,
            &Selection {
                since: Some(at(T0 + 3600)),
                ..Selection::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::NoWindows { .. }), "{err:?}");
        assert!(err.is_nothing_matched());
        let msg = err.to_string();
        assert!(
            msg.contains("from 2023-11-14T23:13:20Z to now")
                && msg.contains("3 window(s) from 2023-11-14T22:13:20Z to 2023-11-14T22:13:50Z"),
            "{msg}"
        );

        let err = load(
            &dir,
            &Selection {
                pids: vec![99],
                processes: vec!["nginx".into()],
                ..Selection::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::NoSamples { .. }), "{err:?}");
        assert!(err.is_nothing_matched());
        assert!(
            err.to_string()
                .ends_with("hold no samples of pid 99, or process nginx"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_windows_alone_are_nothing_matched() {
        let dir = scratch("empty-windows");
        let mut store = Store::open(&dir, keep_all()).unwrap();
        store.write(&window(at(T0), &[])).unwrap();
        let err = load(&dir, &Selection::default()).unwrap_err();
        assert!(
            matches!(err, StoreError::NoSamples { windows: 1, .. }),
            "{err:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_windows_are_skipped_unless_all_are_damaged() {
        let dir = populated("damaged");
        let bad = dir.join("2023-11-14T221400.000Z_2023-11-14T221410.000Z.pb.gz");
        fs::write(&bad, b"\x1f\x8b garbage").unwrap();
        fs::write(dir.join("unrelated.pb.gz"), b"also garbage").unwrap();

        let loaded = load_windows(&dir, &Selection::default()).unwrap();
        assert_eq!(loaded.profile.total_count(), 18);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].0, bad);

        // Only the damaged window selected: an error naming it.
        let err = load(
            &dir,
            &Selection {
                since: Some(at(T0 + 35)),
                ..Selection::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(!err.is_nothing_matched());
        assert!(err.to_string().contains(bad.to_str().unwrap()), "{err}");
        // Nothing was deleted.
        assert!(bad.exists() && dir.join("unrelated.pb.gz").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn merge_rescales_lower_frequency_windows() {
        let mut slow = window(at(T0), &[(1, "a", "f", 3)]);
        slow.meta.frequency_hz = 10;
        let mut fast = window(at(T0 + 10), &[(1, "a", "f", 20)]);
        fast.meta.frequency_hz = 40;
        fast.meta.hostname = "otherhost".into();
        let merged = merge(vec![slow, fast]).unwrap();
        assert_eq!(merged.meta.frequency_hz, 40);
        // 3 samples at 10 Hz are as much CPU time as 12 at 40 Hz.
        assert_eq!(merged.total_count(), 32);
        assert_eq!(
            (merged.meta.start, merged.meta.duration),
            (at(T0), Duration::from_secs(20))
        );
        assert_eq!(merged.meta.hostname, "otherhost, testhost");
        assert_eq!(rescale(1, 3, 4), 1);
        assert_eq!(rescale(u64::MAX, 1, 2), u64::MAX);
        assert!(merge(Vec::new()).is_none());
    }

    #[test]
    fn show_time_never_panics() {
        assert_eq!(show_time(at(T0)), "2023-11-14T22:13:20Z");
        assert_eq!(
            show_time(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            "before 1970"
        );
        assert!(show_time(at(LAST_NAMEABLE_SECOND + 1)).contains("after 1970"));
    }
}
