//! Process incarnations: which process image a drained sample belongs to.
//!
//! Samples carry a pid only, and a pid names different processes over
//! time: it is reused after an exit, and one process runs several images
//! when it execs. The exec and exit events of the kernel's process-event
//! program carry their time (`bpf_ktime_get_ns`), as do samples (the time
//! each stack was last seen), so a sample of pid P at time T belongs to the
//! latest image of P begun before T, unless P's exit came between. An
//! image begins at its exec, or, for a process that forked and was not
//! seen exec'ing, at its first on-CPU sample (every sample of it since
//! comes later). That image's [`Capture`], taken at the image's first
//! on-CPU sample, has its mappings, its open mapped files, its name and
//! the facts its metadata is composed from (container, service
//! environment, parent), so it is symbolized and tagged even when it is
//! gone from /proc at drain time.
//!
//! Processes not captured (running before the agent started, an event
//! lost to a full ring buffer) are read from /proc at drain, keyed by
//! their start time, so a reused pid never shares an entry with the
//! process it replaced.
//!
//! Every cache keyed by process ([`crate::process::ProcessTable`], the
//! symbolizer's map cache) uses [`ProcessKey`]; the [`Tracker`] tells them
//! when an incarnation ended (no more /proc reads for it) and when it can
//! be forgotten (its samples are all drained).

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use crate::metadata::Facts;
use crate::symbolize::maps::{FileKey, ProcMaps};

/// Which image of a process a cache entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Image {
    /// The image begun by the exec reported at this time
    /// (`bpf_ktime_get_ns`).
    Exec(u64),
    /// A process not seen exec'ing (it forked, or its exec event was
    /// lost), captured at its first on-CPU sample, at this time
    /// (`bpf_ktime_get_ns`).
    Forked(u64),
    /// A process whose exec was not seen, as /proc has it at drain: its
    /// start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    Started(u64),
    /// Nothing known: gone before it was looked at, or sampled before the
    /// exec that was captured (a child between fork and exec).
    Unknown,
}

impl Image {
    /// When a captured image began (`bpf_ktime_get_ns`).
    pub fn begin_ns(&self) -> Option<u64> {
        match *self {
            Image::Exec(ns) | Image::Forked(ns) => Some(ns),
            Image::Started(_) | Image::Unknown => None,
        }
    }
}

/// A process image: pid and which of its incarnations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey {
    pub pid: u32,
    pub image: Image,
}

impl ProcessKey {
    pub fn new(pid: u32, image: Image) -> Self {
        Self { pid, image }
    }

    /// Whether /proc/<pid> may describe this image: only for started
    /// processes whose start time still matches, and exec'd images not
    /// yet ended (the caller knows).
    pub fn start_ticks_match(&self, ticks: Option<u64>) -> bool {
        match self.image {
            Image::Started(t) => ticks == Some(t),
            _ => false,
        }
    }
}

/// What was read of a process image at its first on-CPU sample, while it
/// lived.
#[derive(Debug)]
pub struct Capture {
    pub pid: u32,
    /// Which image: [`Image::Exec`] or [`Image::Forked`], with the time it
    /// began.
    pub image: Image,
    /// Start time in clock ticks since boot, when it could be read.
    pub start_ticks: Option<u64>,
    /// Process name after the exec (the kernel's `comm`), or as
    /// `/proc/<pid>/comm` had it at capture.
    pub name: String,
    /// `/proc/<pid>/exe`.
    pub executable: Option<Arc<str>>,
    /// Executable mappings; `None` when the process was gone before they
    /// could be read.
    pub(crate) maps: Option<ProcMaps>,
    /// Open handles to the mapped files, shared with other captures of the
    /// same files.
    pub(crate) files: Vec<(FileKey, Arc<File>)>,
    /// What the metadata is composed from (parent, cgroup, service
    /// environment, build ID), read with the rest; `None` when the
    /// capture does not read them (the drain reads /proc then, if the
    /// process still lives).
    pub facts: Option<Arc<Facts>>,
}

impl Capture {
    pub fn key(&self) -> ProcessKey {
        ProcessKey::new(self.pid, self.image)
    }

    /// When the image began (`bpf_ktime_get_ns`).
    pub fn begin_ns(&self) -> u64 {
        self.image.begin_ns().unwrap_or(0)
    }

    /// The open handle of a mapped file.
    pub(crate) fn file(&self, key: &FileKey) -> Option<&Arc<File>> {
        self.files.iter().find(|(k, _)| k == key).map(|(_, f)| f)
    }
}

/// What the process-event program reported, as userspace delivers it to
/// the pipeline (with each window).
#[derive(Debug, Clone)]
pub enum ProcessEvent {
    /// A new image (an exec, or a process not seen exec'ing), with what
    /// was captured of it. A second capture of the same image (taken a
    /// little later, once the dynamic loader has mapped the libraries)
    /// replaces the first.
    Captured(Arc<Capture>),
    /// The process's last thread exited at `time_ns`.
    Exit { pid: u32, time_ns: u64 },
}

/// An incarnation known from its capture.
#[derive(Debug)]
struct Tracked {
    capture: Arc<Capture>,
    /// When it ended: its exit, or the next image of the same pid.
    ended_ns: Option<u64>,
}

/// Changes the caches keyed by [`ProcessKey`] must apply.
#[derive(Debug, Default)]
pub struct Changes {
    /// New or re-captured images.
    pub adopted: Vec<Arc<Capture>>,
    /// Images that ended: /proc/<pid> no longer describes them.
    pub ended: Vec<ProcessKey>,
    /// Images whose samples are all drained: drop them.
    pub forgotten: Vec<ProcessKey>,
}

/// Most incarnations tracked at once; the oldest are dropped beyond.
pub const MAX_TRACKED: usize = 32 * 1024;

/// The incarnations known from captures, by pid.
#[derive(Debug, Default)]
pub struct Tracker {
    by_pid: HashMap<u32, Vec<Tracked>>,
    tracked: usize,
    /// `now_ns` of the previous [`Tracker::end_window`].
    last_end_ns: u64,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.tracked
    }

    pub fn is_empty(&self) -> bool {
        self.tracked == 0
    }

    /// Applies a window's events, in the order they happened.
    pub fn ingest(&mut self, events: &[ProcessEvent], changes: &mut Changes) {
        for event in events {
            match event {
                ProcessEvent::Captured(capture) => {
                    let list = self.by_pid.entry(capture.pid).or_default();
                    if let Some(same) = list.iter_mut().find(|t| t.capture.image == capture.image) {
                        same.capture = capture.clone();
                    } else {
                        if let Some(previous) = list.last_mut() {
                            if previous.ended_ns.is_none() {
                                previous.ended_ns = Some(capture.begin_ns());
                                changes.ended.push(previous.capture.key());
                            }
                        }
                        list.push(Tracked {
                            capture: capture.clone(),
                            ended_ns: None,
                        });
                        self.tracked += 1;
                    }
                    changes.adopted.push(capture.clone());
                }
                ProcessEvent::Exit { pid, time_ns } => {
                    if let Some(last) = self.by_pid.get_mut(pid).and_then(|l| l.last_mut()) {
                        if last.ended_ns.is_none() && last.capture.begin_ns() <= *time_ns {
                            last.ended_ns = Some(*time_ns);
                            changes.ended.push(last.capture.key());
                        }
                    }
                }
            }
        }
        if self.tracked > MAX_TRACKED {
            self.drop_oldest(self.tracked - MAX_TRACKED, changes);
        }
    }

    /// The captured incarnation of `pid` a sample last seen at `time_ns`
    /// belongs to; `None` when nothing tracked covers it (ask /proc, and
    /// [`Tracker::before_first`]).
    pub fn resolve(&self, pid: u32, time_ns: u64) -> Option<(ProcessKey, &Arc<Capture>)> {
        let list = self.by_pid.get(&pid)?;
        let tracked = list
            .iter()
            .rev()
            .find(|t| t.capture.begin_ns() <= time_ns)?;
        if tracked.ended_ns.is_some_and(|end| end < time_ns) {
            // Sampled after that image ended: another process, not
            // captured, holds the pid now.
            return None;
        }
        Some((tracked.capture.key(), &tracked.capture))
    }

    /// The first capture of `pid`, when a sample at `time_ns` precedes
    /// it and it is of the process /proc shows with `live_ticks` now. If
    /// it is an exec, the sample ran the image before it, never captured
    /// (a child between fork and exec); if it is a forked image, the
    /// sample is that image's (taken off the CPU before its first on-CPU
    /// sample).
    pub fn before_first(
        &self,
        pid: u32,
        time_ns: u64,
        live_ticks: Option<u64>,
    ) -> Option<&Arc<Capture>> {
        let first = &self.by_pid.get(&pid)?.first()?.capture;
        (time_ns < first.begin_ns()
            && first.start_ticks.is_some()
            && first.start_ticks == live_ticks)
            .then_some(first)
    }

    /// After a window is processed: forgets incarnations that ended before
    /// the previous call, whose samples are all drained by now (the one
    /// window of slack covers off-CPU waits counted a window late).
    pub fn end_window(&mut self, now_ns: u64, changes: &mut Changes) {
        let horizon = self.last_end_ns;
        self.last_end_ns = now_ns;
        let mut dropped = 0;
        self.by_pid.retain(|_, list| {
            list.retain(|t| {
                let keep = t.ended_ns.is_none_or(|end| end >= horizon);
                if !keep {
                    changes.forgotten.push(t.capture.key());
                    dropped += 1;
                }
                keep
            });
            !list.is_empty()
        });
        self.tracked -= dropped;
    }

    fn drop_oldest(&mut self, n: usize, changes: &mut Changes) {
        let mut all: Vec<(bool, u64, u32, Image)> = self
            .by_pid
            .iter()
            .flat_map(|(&pid, l)| {
                l.iter().map(move |t| {
                    (
                        t.ended_ns.is_none(),
                        t.capture.begin_ns(),
                        pid,
                        t.capture.image,
                    )
                })
            })
            .collect();
        // Ended ones first, oldest first.
        all.sort_unstable();
        for &(_, _, pid, image) in all.iter().take(n) {
            if let Some(list) = self.by_pid.get_mut(&pid) {
                list.retain(|t| t.capture.image != image);
                changes.forgotten.push(ProcessKey::new(pid, image));
                self.tracked -= 1;
                if list.is_empty() {
                    self.by_pid.remove(&pid);
                }
            }
        }
    }
}

/// CLOCK_MONOTONIC now, in the kernel programs' `bpf_ktime_get_ns` units.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
pub(crate) fn fake_capture(pid: u32, exec_ns: u64, name: &str) -> Arc<Capture> {
    fake_image(pid, Image::Exec(exec_ns), name)
}

#[cfg(test)]
pub(crate) fn fake_image(pid: u32, image: Image, name: &str) -> Arc<Capture> {
    Arc::new(Capture {
        pid,
        image,
        start_ticks: image.begin_ns().map(|ns| ns / 10_000_000),
        name: name.into(),
        executable: Some(Arc::from(format!("/usr/bin/{name}"))),
        maps: Some(ProcMaps::default()),
        files: Vec::new(),
        facts: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(pid: u32, ns: u64, name: &str) -> ProcessEvent {
        ProcessEvent::Captured(fake_capture(pid, ns, name))
    }

    fn fork(pid: u32, ns: u64, name: &str) -> ProcessEvent {
        ProcessEvent::Captured(fake_image(pid, Image::Forked(ns), name))
    }

    fn exit(pid: u32, time_ns: u64) -> ProcessEvent {
        ProcessEvent::Exit { pid, time_ns }
    }

    #[test]
    fn samples_go_to_the_image_running_at_their_time() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        t.ingest(
            &[
                exec(7, 100, "first"),
                ProcessEvent::Exit {
                    pid: 7,
                    time_ns: 200,
                },
                exec(7, 300, "second"),
                exec(7, 400, "third"),
            ],
            &mut changes,
        );
        let name = |ns| t.resolve(7, ns).map(|(_, c)| c.name.as_str());
        assert_eq!(name(150), Some("first"));
        assert_eq!(name(250), None, "between an exit and the next exec");
        assert_eq!(name(350), Some("second"));
        assert_eq!(name(1_000), Some("third"));
        assert_eq!(name(50), None);
        assert!(t.resolve(8, 150).is_none());
        assert_eq!(changes.adopted.len(), 3);
        // first by its exit, second by the exec of third.
        let ended: Vec<_> = changes.ended.iter().map(|k| k.image).collect();
        assert_eq!(ended, vec![Image::Exec(100), Image::Exec(300)]);
    }

    #[test]
    fn ended_images_are_forgotten_a_window_later() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        t.ingest(
            &[
                exec(7, 100, "a"),
                ProcessEvent::Exit {
                    pid: 7,
                    time_ns: 200,
                },
                exec(8, 150, "b"),
            ],
            &mut changes,
        );
        let mut changes = Changes::default();
        t.end_window(1_000, &mut changes);
        assert!(changes.forgotten.is_empty(), "kept one more window");
        t.end_window(2_000, &mut changes);
        assert_eq!(
            changes.forgotten,
            vec![ProcessKey::new(7, Image::Exec(100))]
        );
        assert_eq!(t.len(), 1, "the running one stays");
    }

    #[test]
    fn a_recapture_replaces_the_first() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        t.ingest(&[exec(7, 100, "early"), exec(7, 100, "late")], &mut changes);
        assert_eq!(t.len(), 1);
        assert_eq!(t.resolve(7, 150).unwrap().1.name, "late");
        assert!(changes.ended.is_empty());
    }

    #[test]
    fn a_forked_child_gone_before_the_drain_resolves_to_its_capture() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        // Captured at its first sample (1_000), exited at 30_000: at drain
        // /proc no longer has it.
        t.ingest(&[fork(9, 1_000, "worker"), exit(9, 30_000)], &mut changes);
        let (key, capture) = t.resolve(9, 20_000).expect("resolved to the capture");
        assert_eq!(key, ProcessKey::new(9, Image::Forked(1_000)));
        assert_eq!(capture.name, "worker");
        assert_eq!(changes.adopted.len(), 1);
        assert_eq!(changes.ended, vec![key]);
        // After its exit the pid is another (uncaptured) process's.
        assert!(t.resolve(9, 30_001).is_none());
    }

    #[test]
    fn a_reused_pid_never_gets_another_process_capture() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        t.ingest(
            &[
                fork(9, 1_000, "first"),
                exit(9, 2_000),
                // The pid reused by another forked child, then by an
                // exec'd process whose fork-to-exec part was sampled too.
                fork(9, 3_000, "second"),
                exit(9, 4_000),
                fork(9, 5_000, "third-before-exec"),
                ProcessEvent::Captured(fake_capture(9, 6_000, "third")),
            ],
            &mut changes,
        );
        let name = |ns| t.resolve(9, ns).map(|(_, c)| c.name.as_str());
        assert_eq!(name(1_500), Some("first"));
        assert_eq!(name(2_500), None, "between an exit and the next capture");
        assert_eq!(name(3_500), Some("second"));
        assert_eq!(name(4_500), None);
        assert_eq!(name(5_500), Some("third-before-exec"));
        assert_eq!(name(7_000), Some("third"));
        let keys: Vec<Image> = [1_500, 3_500, 5_500, 7_000]
            .into_iter()
            .map(|ns| t.resolve(9, ns).unwrap().0.image)
            .collect();
        assert_eq!(
            keys,
            vec![
                Image::Forked(1_000),
                Image::Forked(3_000),
                Image::Forked(5_000),
                Image::Exec(6_000)
            ],
            "one key per process image"
        );
        // The fork-to-exec image ended at the exec.
        assert!(changes
            .ended
            .contains(&ProcessKey::new(9, Image::Forked(5_000))));
    }

    #[test]
    fn samples_before_a_forked_capture_are_its_own_while_it_lives() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        let forked = fake_image(9, Image::Forked(1_000_000_000), "worker");
        let ticks = forked.start_ticks;
        t.ingest(&[ProcessEvent::Captured(forked)], &mut changes);
        // An off-CPU sample from before its first on-CPU sample.
        let first = t.before_first(9, 500, ticks).expect("the same process");
        assert_eq!(first.image, Image::Forked(1_000_000_000));
        // Another process on that pid now: not that capture's.
        assert!(t.before_first(9, 500, Some(12345)).is_none());
        assert!(t.before_first(9, 500, None).is_none());
        // Not before it: resolve covers that.
        assert!(t.before_first(9, 2_000_000_000, ticks).is_none());
    }

    #[test]
    fn a_second_capture_of_a_forked_image_replaces_the_first() {
        let mut t = Tracker::new();
        let mut changes = Changes::default();
        t.ingest(&[fork(9, 1_000, "a"), fork(9, 1_000, "b")], &mut changes);
        assert_eq!(t.len(), 1);
        assert_eq!(t.resolve(9, 1_500).unwrap().1.name, "b");
        assert!(changes.ended.is_empty());
    }
}
