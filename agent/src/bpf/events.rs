//! The `hearth-procs` thread: reads the process-event ring buffer, captures
//! what symbolization needs of each new process image while it lives, and
//! keeps the kernel filter maps up to date.
//!
//! An exec is remembered (pid, time, name); the capture is taken when the
//! kernel reports the image's first on-CPU sample (`PROCESS_EVENT_SAMPLED`),
//! so the many short-lived processes of a busy host that are never sampled
//! (a shell loop of `ls` runs hundreds a second) cost no /proc reads: reading
//! every exec's maps took 2.5% of a core at 19 Hz in the daemon benchmark.
//! The kernel reports the first sample of a process that forked without
//! exec'ing too (prefork workers, subshells, multiprocessing): with no exec
//! remembered for it, it is captured as an [`Image::Forked`] image that
//! began at that sample. The processes running at start are marked
//! reported in the kernel's `REPORTED_PROCS` (they are read from /proc at
//! drain); a process reported again (its entry evicted from that LRU map)
//! whose capture is still current is not captured twice. Of the events
//! of one ring read, every new image's mappings are read first and their
//! facts afterwards; captures and exits go out in the events' order.
//! A capture is `/proc/<pid>/stat` (start time), `/proc/<pid>/exe`,
//! `/proc/<pid>/maps`, and an open handle to each mapped file not already
//! held (through `/proc/<pid>/map_files`, else the process's root), shared
//! with other captures by device and inode; and, for the daemon and
//! `record`, the metadata [`Facts`] (parent, cgroup, `OTEL_*` environment,
//! build ID, the command line with `--command-line`), so a process gone
//! before the drain keeps its container and service attributes. The facts
//! cost about as much again as the rest of a capture (see
//! [`EventCounters::facts_ns`]). A process sampled before the
//! dynamic loader has run holds only the executable and its interpreter,
//! so such a capture is taken again [`RECAPTURE_AFTER`] later if the
//! process still lives (with the facts of the first: they do not change
//! with the loader). Captures go to the drain through a bounded
//! channel ([`MAX_PENDING`]); beyond it they are dropped and counted, and
//! those processes are read from /proc at drain like any other.
//!
//! With process-name rules, each exec is matched and the verdict written
//! into `PID_FILTER` (the kernel deletes the entry at exit).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use hearth_ebpf::{
    ProcessEvent as RawEvent, FILTER_ENTRY_EXCLUDE, FILTER_ENTRY_INCLUDE, PROCESS_EVENT_EXEC,
    PROCESS_EVENT_EXIT, PROCESS_EVENT_SAMPLED,
};
use tracing::{debug, warn};

use crate::filter::{FilterSpec, FilterUpdate, NameVerdict};
use crate::incarnation::{Capture, Image, ProcessEvent};
use crate::metadata::{Facts, FactsReader, ReadOptions};
use crate::process::start_time;
use crate::symbolize::maps::{Backing, FileKey, ProcMaps};

/// Captures waiting for a drain; more are dropped (counted).
pub const MAX_PENDING: usize = 16 * 1024;
/// Second look at a process whose first capture came before its
/// libraries were mapped.
pub const RECAPTURE_AFTER: Duration = Duration::from_millis(20);
/// Execs remembered until their first sample, and processes remembered
/// as captured (the kernel's `REPORTED_PROCS` holds as many).
const MAX_FRESH: usize = 16 * 1024;
/// Open mapped files kept for captures; beyond it those no capture holds
/// are closed.
const MAX_OPEN_FILES: usize = 1024;
/// How long the reader waits for the ring between looks. A first sample
/// of an exec'd image wakes it at once; execs and exits do not (waking
/// costs the kernel programs ~20 µs per event in a VM), they only need
/// reading before the ring fills: 256 KiB holds 8192 events. Polling every
/// 5 ms instead cost the agent about 0.1% of a CPU.
const POLL: Duration = Duration::from_millis(200);
/// With process-name rules, execs are read this often, so the kernel
/// learns an exec'd process's verdict quickly (until then it is sampled,
/// and the sample dropped at drain).
const POLL_NAME_RULES: Duration = Duration::from_millis(5);

/// Counters of the thread, read by the drain.
#[derive(Debug, Default)]
pub struct EventCounters {
    pub execs: AtomicU64,
    pub exits: AtomicU64,
    /// Images gone (or exited, as a later event of the same read says)
    /// before their mappings could be read.
    pub captures_too_late: AtomicU64,
    /// Images not captured because the process exec'd again before it
    /// could be read (/proc shows the later image).
    pub captures_superseded: AtomicU64,
    /// First samples reported again of a process whose capture is still
    /// current (its entry evicted from the kernel's LRU map): skipped.
    pub captures_repeated: AtomicU64,
    /// Of the captures, those of processes not seen exec'ing (forked).
    pub forks_captured: AtomicU64,
    /// Captures dropped because the drain did not take them in time.
    pub captures_dropped: AtomicU64,
    /// Second captures taken once the libraries were mapped.
    pub recaptures: AtomicU64,
    /// First captures taken (not counting recaptures).
    pub captures: AtomicU64,
    /// Time spent capturing, nanoseconds (facts included).
    pub capture_ns: AtomicU64,
    /// Of which reading the metadata facts, nanoseconds.
    pub facts_ns: AtomicU64,
}

/// The maps the thread owns.
pub struct EventMaps {
    pub ring: RingBuf<MapData>,
    pub pids: Option<BpfHashMap<MapData, u32, u8>>,
    pub cgroups: Option<BpfHashMap<MapData, u64, u8>>,
    /// `REPORTED_PROCS`: the processes running at start are added.
    pub reported: BpfHashMap<MapData, u32, u8>,
}

pub struct EventThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub counters: Arc<EventCounters>,
}

impl EventThread {
    /// `facts`: read each image's metadata facts at its capture, with
    /// these options; `None` leaves them to the drain.
    pub fn spawn(
        maps: EventMaps,
        spec: FilterSpec,
        facts: Option<ReadOptions>,
        events: SyncSender<ProcessEvent>,
        updates: Receiver<FilterUpdate>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(EventCounters::default());
        let mut state = State {
            maps,
            spec,
            events,
            updates,
            counters: counters.clone(),
            files: HashMap::new(),
            facts: facts.map(FactsReader::new),
            recapture: Vec::new(),
            fresh: HashMap::new(),
            captured: HashMap::new(),
            outbox: Vec::new(),
            name_entries: HashMap::new(),
            explicit: HashMap::new(),
        };
        state.initial_filter();
        state.mark_running();
        let stop_flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("hearth-procs".into())
            .spawn(move || state.run(&stop_flag))?;
        Ok(Self {
            stop,
            handle: Some(handle),
            counters,
        })
    }
}

impl Drop for EventThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

struct State {
    maps: EventMaps,
    spec: FilterSpec,
    events: SyncSender<ProcessEvent>,
    updates: Receiver<FilterUpdate>,
    counters: Arc<EventCounters>,
    /// Open mapped files by identity.
    files: HashMap<FileKey, Arc<File>>,
    /// Reads the metadata facts of captured processes, if asked to.
    facts: Option<FactsReader>,
    /// (due, pid, image, facts of the first capture) of second captures.
    recapture: Vec<(Instant, u32, Image, Option<Arc<Facts>>)>,
    /// Execs not sampled yet: pid → (exec time, name after the exec).
    fresh: HashMap<u32, (u64, String)>,
    /// Processes captured since their last exec: pid → start time, to
    /// tell a report repeated for the same process from a new one.
    captured: HashMap<u32, Option<u64>>,
    /// Captures (their facts not read yet) and exits of the events read
    /// last, in order; see [`State::flush`].
    outbox: Vec<ProcessEvent>,
    /// `PID_FILTER` bits set from name rules, by pid.
    name_entries: HashMap<u32, u8>,
    /// Pid rules: pid → (bits, start time of the process it named).
    explicit: HashMap<u32, (u8, Option<u64>)>,
}

impl State {
    /// Pid rules, and name rules for the processes alive now.
    fn initial_filter(&mut self) {
        for (pids, bits) in [
            (&self.spec.include_pids, FILTER_ENTRY_INCLUDE),
            (&self.spec.exclude_pids, FILTER_ENTRY_EXCLUDE),
        ] {
            for &pid in pids {
                let entry = self.explicit.entry(pid).or_insert((0, start_time(pid)));
                entry.0 |= bits;
            }
        }
        let explicit: Vec<(u32, u8)> = self.explicit.iter().map(|(&p, &(b, _))| (p, b)).collect();
        for (pid, bits) in explicit {
            self.write_pid(pid, bits);
        }
        if self.spec.has_names() {
            for pid in running_pids() {
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_default();
                self.apply_names(pid, &name);
            }
        }
    }

    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let poll = if self.spec.has_names() {
                POLL_NAME_RULES
            } else {
                POLL
            };
            let timeout = self
                .recapture
                .iter()
                .map(|&(due, ..)| due.saturating_duration_since(now))
                .min()
                .unwrap_or(poll)
                .min(poll);
            wait_readable(self.maps.ring.as_raw_fd(), timeout);
            let mut raw = Vec::new();
            while let Some(item) = self.maps.ring.next() {
                if item.len() >= std::mem::size_of::<RawEvent>() {
                    // SAFETY: the kernel wrote a ProcessEvent there; the
                    // read is unaligned-safe.
                    raw.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RawEvent>()) });
                }
            }
            for (i, event) in raw.iter().enumerate() {
                match event.kind {
                    PROCESS_EVENT_EXEC => self.exec(event),
                    PROCESS_EVENT_SAMPLED => self.sampled(event, &raw[i + 1..]),
                    PROCESS_EVENT_EXIT => self.exit(event),
                    _ => {}
                }
            }
            self.flush();
            while let Ok(update) = self.updates.try_recv() {
                self.update(update);
            }
            let now = Instant::now();
            let (due, later) = std::mem::take(&mut self.recapture)
                .into_iter()
                .partition(|(when, ..)| *when <= now);
            self.recapture = later;
            for (_, pid, image, facts) in due {
                if let Some(capture) = self.capture(pid, image, None, facts, false) {
                    self.counters.recaptures.fetch_add(1, Ordering::Relaxed);
                    self.send(capture);
                }
            }
        }
    }

    fn exec(&mut self, event: &RawEvent) {
        self.counters.execs.fetch_add(1, Ordering::Relaxed);
        let pid = event.pid;
        let comm = comm(&event.comm);
        // A pid rule names the process it named at start, not a later one
        // with the same pid.
        if let Some(&(bits, ticks)) = self.explicit.get(&pid) {
            if ticks.is_some() && start_time(pid) != ticks {
                self.explicit.remove(&pid);
            } else {
                self.write_pid(
                    pid,
                    bits | self.name_entries.get(&pid).copied().unwrap_or(0),
                );
            }
        }
        self.captured.remove(&pid);
        let verdict = self.apply_names(pid, &comm);
        if verdict == NameVerdict::Exclude {
            return;
        }
        if self.fresh.len() >= MAX_FRESH {
            // Exits missed (a full ring): start over rather than grow.
            self.fresh.clear();
        }
        self.fresh.insert(pid, (event.time_ns, comm));
    }

    /// The first on-CPU sample of an image since its exec, or since the
    /// process forked: capture it now, while it runs. `later`: the events
    /// read after it.
    fn sampled(&mut self, event: &RawEvent, later: &[RawEvent]) {
        let pid = event.pid;
        let exec = self.fresh.remove(&pid);
        // Already gone, or running another image: /proc no longer shows
        // this one.
        match next_change(pid, later) {
            Some(PROCESS_EVENT_EXEC) => {
                self.counters
                    .captures_superseded
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(PROCESS_EVENT_EXIT) => {
                self.counters
                    .captures_too_late
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ => {}
        }
        let (image, comm) = match exec {
            Some((exec_ns, comm)) => (Image::Exec(exec_ns), Some(comm)),
            None => {
                // Not seen exec'ing: it forked (or its exec event was lost,
                // or the kernel's LRU map forgot it was reported).
                if let Some(&ticks) = self.captured.get(&pid) {
                    if ticks.is_some() && start_time(pid) == ticks {
                        self.counters
                            .captures_repeated
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                let mut comm = None;
                if self.spec.has_names() {
                    // A child inherits its parent's name, which no exec
                    // changed: its verdict, in the kernel from now on.
                    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|s| s.trim_end().to_string())
                        .unwrap_or_default();
                    if self.apply_names(pid, &name) == NameVerdict::Exclude {
                        return;
                    }
                    comm = Some(name);
                }
                (Image::Forked(event.time_ns), comm)
            }
        };
        let excluded = |bits: Option<u8>| bits.is_some_and(|b| b & FILTER_ENTRY_EXCLUDE != 0);
        if excluded(self.name_entries.get(&pid).copied())
            || excluded(self.explicit.get(&pid).map(|&(b, _)| b))
        {
            // Sampled before the kernel learned its verdict: its samples
            // are dropped at drain, nothing to capture.
            return;
        }
        let started = Instant::now();
        let capture = self.capture(pid, image, comm, None, true);
        self.counters
            .capture_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match capture {
            Some(capture) => {
                self.counters.captures.fetch_add(1, Ordering::Relaxed);
                if matches!(image, Image::Forked(_)) {
                    self.counters.forks_captured.fetch_add(1, Ordering::Relaxed);
                }
                if self.captured.len() >= MAX_FRESH {
                    // Exits missed (a full ring): start over rather than grow.
                    self.captured.clear();
                }
                self.captured.insert(pid, capture.start_ticks);
                if capture.maps.as_ref().is_some_and(loader_only) {
                    self.recapture.push((
                        Instant::now() + RECAPTURE_AFTER,
                        pid,
                        image,
                        capture.facts.clone(),
                    ));
                }
                self.outbox.push(ProcessEvent::Captured(Arc::new(capture)));
            }
            None => {
                self.counters
                    .captures_too_late
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn exit(&mut self, event: &RawEvent) {
        self.counters.exits.fetch_add(1, Ordering::Relaxed);
        // The kernel deleted the PID_FILTER entry.
        self.name_entries.remove(&event.pid);
        self.explicit.remove(&event.pid);
        self.recapture.retain(|&(_, pid, ..)| pid != event.pid);
        self.fresh.remove(&event.pid);
        self.captured.remove(&event.pid);
        // After the captures of the same read, in order.
        self.outbox.push(ProcessEvent::Exit {
            pid: event.pid,
            time_ns: event.time_ns,
        });
    }

    fn send(&self, capture: Capture) {
        self.deliver(ProcessEvent::Captured(Arc::new(capture)));
    }

    fn deliver(&self, event: ProcessEvent) {
        if let Err(TrySendError::Full(_)) = self.events.try_send(event) {
            self.counters
                .captures_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Matches the name rules and writes the verdict for `pid`.
    fn apply_names(&mut self, pid: u32, name: &str) -> NameVerdict {
        if !self.spec.has_names() {
            return NameVerdict::Neither;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let verdict = self.spec.name_verdict(name, exe.as_deref());
        let bits = match verdict {
            NameVerdict::Include => FILTER_ENTRY_INCLUDE,
            NameVerdict::Exclude => FILTER_ENTRY_EXCLUDE,
            NameVerdict::Neither => 0,
        };
        let explicit = self.explicit.get(&pid).map_or(0, |&(b, _)| b);
        let previous = self.name_entries.get(&pid).copied().unwrap_or(0);
        if bits != previous {
            let ticks = start_time(pid);
            self.write_pid(pid, bits | explicit);
            if bits == 0 {
                self.name_entries.remove(&pid);
            } else {
                self.name_entries.insert(pid, bits);
            }
            // Exited meanwhile: the kernel's delete at exit may have come
            // before our write, which must not outlive the process.
            if ticks.is_none() || start_time(pid) != ticks {
                self.write_pid(pid, explicit);
                self.name_entries.remove(&pid);
            }
        }
        verdict
    }

    fn write_pid(&mut self, pid: u32, bits: u8) {
        let Some(map) = &mut self.maps.pids else {
            return;
        };
        let result = if bits == 0 {
            map.remove(&pid)
        } else {
            map.insert(pid, bits, 0)
        };
        if let Err(error) = result {
            if bits != 0 {
                warn!(pid, %error, "cannot update the pid filter");
            }
        }
    }

    fn update(&mut self, update: FilterUpdate) {
        let Some(map) = &mut self.maps.cgroups else {
            warn!(
                ?update,
                "cgroup filter update without a cgroup filter loaded"
            );
            return;
        };
        let result = match update {
            FilterUpdate::IncludeCgroup(id) => map.insert(id, FILTER_ENTRY_INCLUDE, 0),
            FilterUpdate::ExcludeCgroup(id) => map.insert(id, FILTER_ENTRY_EXCLUDE, 0),
            FilterUpdate::RemoveCgroup(id) => map.remove(&id),
        };
        if let Err(error) = result {
            warn!(?update, %error, "cannot update the cgroup filter");
        }
    }

    /// Reads what symbolization needs of `pid`, and the metadata facts
    /// unless `facts` has them already or `facts_later` (then
    /// [`State::flush`] reads them); `None` when it is gone. `comm`: the
    /// name, if known (else read from /proc).
    fn capture(
        &mut self,
        pid: u32,
        image: Image,
        comm: Option<String>,
        facts: Option<Arc<Facts>>,
        facts_later: bool,
    ) -> Option<Capture> {
        let start_ticks = start_time(pid);
        let maps = ProcMaps::read(pid).ok().filter(|m| !m.is_empty())?;
        let name = match comm {
            Some(c) => c,
            None => std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_default(),
        };
        let executable = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| Arc::from(p.to_string_lossy().as_ref()));
        let mut files = Vec::new();
        for entry in maps.entries() {
            let Backing::File { key, path, deleted } = &entry.backing else {
                continue;
            };
            if files.iter().any(|(k, _)| k == key) {
                continue;
            }
            let file = match self.files.get(key) {
                Some(f) => f.clone(),
                None => {
                    let opened = File::open(format!(
                        "/proc/{pid}/map_files/{:x}-{:x}",
                        entry.start, entry.end
                    ))
                    .or_else(|e| {
                        if *deleted || !path.starts_with('/') {
                            return Err(e);
                        }
                        File::open(format!("/proc/{pid}/root{path}"))
                    });
                    match opened {
                        Ok(f) => {
                            let f = Arc::new(f);
                            self.keep_file(*key, f.clone());
                            f
                        }
                        Err(error) => {
                            debug!(pid, path = &**path, %error, "cannot open mapped file");
                            continue;
                        }
                    }
                }
            };
            files.push((*key, file));
        }
        let mut capture = Capture {
            pid,
            image,
            start_ticks,
            name,
            executable,
            maps: Some(maps),
            files,
            facts,
        };
        if !facts_later {
            self.read_facts(&mut capture);
        }
        Some(capture)
    }

    /// Reads the metadata facts of `capture` if it has none and they are
    /// asked for.
    fn read_facts(&mut self, capture: &mut Capture) {
        let Some(reader) = &mut self.facts else {
            return;
        };
        if capture.facts.is_some() {
            return;
        }
        let started = Instant::now();
        let facts = reader.read(capture.pid, &capture.name, capture.executable.as_deref());
        capture.facts = Some(Arc::new(facts));
        self.counters
            .facts_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// After the events of one read: the metadata facts of the captures
    /// taken for them, read once every new image's mappings are (a burst
    /// of short-lived processes can exit while earlier captures read
    /// their facts, ~100 µs each), then the captures and exits sent in
    /// the order their events came.
    fn flush(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let mut outbox = std::mem::take(&mut self.outbox);
        for out in &mut outbox {
            let ProcessEvent::Captured(capture) = out else {
                continue;
            };
            let Some(capture) = Arc::get_mut(capture) else {
                continue;
            };
            if capture.facts.is_some() || self.facts.is_none() {
                continue;
            }
            let started = Instant::now();
            self.read_facts(capture);
            self.counters
                .capture_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            // A second capture keeps the first's facts.
            for (_, pid, image, facts) in &mut self.recapture {
                if *pid == capture.pid && *image == capture.image && facts.is_none() {
                    facts.clone_from(&capture.facts);
                }
            }
        }
        for out in outbox {
            self.deliver(out);
        }
    }

    /// Marks the processes running now as reported in the kernel: they
    /// are read from /proc at drain, not captured at their first sample.
    fn mark_running(&mut self) {
        let started = Instant::now();
        let mut marked = 0usize;
        for pid in running_pids() {
            match self.maps.reported.insert(pid, 1, 0) {
                Ok(()) => marked += 1,
                Err(error) => {
                    debug!(pid, %error, "cannot mark a running process reported");
                    break;
                }
            }
        }
        debug!(marked, took = ?started.elapsed(), "running processes marked reported");
    }

    fn keep_file(&mut self, key: FileKey, file: Arc<File>) {
        if self.files.len() >= MAX_OPEN_FILES {
            // Close those no pending or tracked capture holds.
            self.files.retain(|_, f| Arc::strong_count(f) > 1);
        }
        if self.files.len() < MAX_OPEN_FILES {
            self.files.insert(key, file);
        }
    }
}

/// The kind of the first exec or exit of `pid` among `later` events.
fn next_change(pid: u32, later: &[RawEvent]) -> Option<u32> {
    later
        .iter()
        .find(|e| e.pid == pid && e.kind != PROCESS_EVENT_SAMPLED)
        .map(|e| e.kind)
}

/// The pids of /proc.
fn running_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Waits until the ring has data the kernel woke us for, or `timeout`.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd; an error (EINTR) just ends the wait early.
    unsafe { libc::poll(&mut pollfd, 1, ms) };
}

/// Only the executable, its interpreter and the vDSO are mapped: the
/// dynamic loader has not mapped the libraries yet.
fn loader_only(maps: &ProcMaps) -> bool {
    let mut files = maps.entries().iter().filter_map(|e| match &e.backing {
        Backing::File { path, .. } => Some(path),
        _ => None,
    });
    let interpreter = files
        .clone()
        .any(|p| p.contains("/ld-") || p.contains("ld.so"));
    let mut distinct: Vec<&Arc<str>> = files.by_ref().collect();
    distinct.dedup();
    interpreter && distinct.len() <= 2
}

fn comm(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_is_skipped_when_a_later_event_of_the_read_changes_the_process() {
        let event = |kind, pid| RawEvent {
            kind,
            pid,
            time_ns: 0,
            comm: [0; 16],
        };
        let later = [
            event(PROCESS_EVENT_SAMPLED, 7),
            event(PROCESS_EVENT_EXIT, 8),
            event(PROCESS_EVENT_EXEC, 7),
            event(PROCESS_EVENT_EXIT, 7),
        ];
        assert_eq!(next_change(7, &later), Some(PROCESS_EVENT_EXEC));
        assert_eq!(next_change(8, &later), Some(PROCESS_EVENT_EXIT));
        assert_eq!(next_change(9, &later), None);
        assert_eq!(next_change(7, &later[..2]), None);
    }

    #[test]
    fn a_process_with_only_its_loader_is_captured_again() {
        let early = ProcMaps::parse(
            b"55d0c5a28000-55d0c5b00000 r-xp 00028000 08:01 1311 /usr/bin/app\n\
              7f00ab000000-7f00ab200000 r-xp 00010000 08:01 77 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n\
              7ffd1b1f0000-7ffd1b1f2000 r-xp 00000000 00:00 0 [vdso]\n",
        );
        assert!(loader_only(&early));
        let later = ProcMaps::parse(
            b"55d0c5a28000-55d0c5b00000 r-xp 00028000 08:01 1311 /usr/bin/app\n\
              7f00aa000000-7f00aa200000 r-xp 00010000 08:01 78 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
              7f00ab000000-7f00ab200000 r-xp 00010000 08:01 77 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n",
        );
        assert!(!loader_only(&later));
        let static_binary =
            ProcMaps::parse(b"55d0c5a28000-55d0c5b00000 r-xp 00028000 08:01 1311 /usr/bin/app\n");
        assert!(!loader_only(&static_binary));
    }
}
