//! Turns drained windows into profiles: symbolizes every stack once per
//! window and attaches process metadata. The one place where the raw
//! kernel view becomes the [`Profile`] model.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::bpf::{RawSample, RawWindow};
use crate::filter::FilterSpec;
use crate::incarnation::{monotonic_ns, Capture, Changes, Image, ProcessKey, Tracker};
use crate::metadata::MetadataResolver;
use crate::process::{start_time, ProcessTable};
use crate::profile::{
    Frame, FrameId, FrameKind, OffCpuReason, OffCpuSettings, Profile, ProfileBuilder, ProfileMeta,
    SampleKind,
};
use crate::symbolize::Symbolize;

/// The profiles of one window.
#[derive(Debug, Clone)]
pub struct WindowProfiles {
    /// On-CPU samples (empty when on-CPU sampling was off).
    pub on_cpu: Profile,
    /// Off-CPU time, when it was recorded.
    pub off_cpu: Option<Profile>,
}

/// Converts windows to profiles; owns the caches that live across windows.
pub struct WindowProcessor<S> {
    symbolizer: S,
    processes: ProcessTable,
    /// Which incarnation of a pid each sample belongs to.
    tracker: Tracker,
    /// Process-name exclusions applied again at drain (samples taken
    /// between an exec and the kernel learning its verdict).
    filter: FilterSpec,
    hostname: String,
    /// Samples dropped by the name filter at drain, in all.
    pub filtered_at_drain: u64,
}

/// Symbolized stacks of one window, each distinct stack symbolized once
/// however many threads share it.
#[derive(Default)]
struct StackCache {
    kernel: HashMap<u32, Vec<FrameId>>,
    blocked: HashMap<u64, Vec<FrameId>>,
    user: HashMap<(ProcessKey, u64), Vec<FrameId>>,
}

impl<S: Symbolize> WindowProcessor<S> {
    pub fn new(symbolizer: S) -> Self {
        Self {
            symbolizer,
            processes: ProcessTable::new(),
            tracker: Tracker::new(),
            filter: FilterSpec::default(),
            hostname: hostname(),
            filtered_at_drain: 0,
        }
    }

    /// A processor that tags processes with what `metadata` resolves
    /// (container, Kubernetes, service, tags).
    pub fn with_metadata(symbolizer: S, metadata: MetadataResolver) -> Self {
        Self {
            processes: ProcessTable::with_metadata(metadata),
            ..Self::new(symbolizer)
        }
    }

    /// Applies `filter`'s process-name exclusions to drained samples too.
    pub fn with_filter(mut self, filter: FilterSpec) -> Self {
        self.filter = filter;
        self
    }

    /// Incarnations currently tracked from exec events.
    pub fn tracked_processes(&self) -> usize {
        self.tracker.len()
    }

    fn apply(&mut self, changes: Changes) {
        for capture in &changes.adopted {
            self.symbolizer.adopt(capture);
        }
        for &key in &changes.ended {
            self.symbolizer.ended(key);
        }
        for &key in &changes.forgotten {
            self.symbolizer.forget(key);
            self.processes.forget(key);
        }
    }

    /// The incarnation a sample belongs to, and its capture if it has one.
    /// `live` caches /proc start times for this window.
    fn resolve(
        &self,
        sample: &RawSample,
        live: &mut HashMap<u32, Option<u64>>,
    ) -> (ProcessKey, Option<Arc<Capture>>) {
        let pid = sample.tgid;
        if let Some((key, capture)) = self.tracker.resolve(pid, sample.last_seen_ns) {
            return (key, Some(capture.clone()));
        }
        let ticks = *live.entry(pid).or_insert_with(|| start_time(pid));
        if let Some(first) = self.tracker.before_first(pid, sample.last_seen_ns, ticks) {
            return match first.image {
                // A forked image's own sample, from before its first
                // on-CPU one.
                Image::Forked(_) => (first.key(), Some(first.clone())),
                // /proc shows a process whose captured exec came after
                // the sample: the sample ran the image before it, never
                // captured.
                _ => (ProcessKey::new(pid, Image::Unknown), None),
            };
        }
        let image = match ticks {
            Some(ticks) => Image::Started(ticks),
            None => Image::Unknown,
        };
        (ProcessKey::new(pid, image), None)
    }

    pub fn symbolizer(&self) -> &S {
        &self.symbolizer
    }

    /// Symbolizes and tags one window. `off_cpu` says how off-CPU time was
    /// recorded; `None` when it was not.
    pub fn process(
        &mut self,
        window: &RawWindow,
        frequency_hz: u64,
        off_cpu: Option<OffCpuSettings>,
    ) -> WindowProfiles {
        let meta = |kind, frequency_hz| ProfileMeta {
            kind,
            start: window.start,
            duration: window.end.duration_since(window.start).unwrap_or_default(),
            frequency_hz,
            hostname: self.hostname.clone(),
        };
        let mut on_cpu = ProfileBuilder::new(meta(SampleKind::OnCpu, frequency_hz));
        // Off-CPU time is not sampled at a frequency.
        let mut off = off_cpu.map(|s| (s, ProfileBuilder::new(meta(SampleKind::OffCpu(s), 0))));
        let mut changes = Changes::default();
        self.tracker.ingest(&window.process_events, &mut changes);
        self.apply(changes);
        let mut live = HashMap::new();
        let mut on_cpu_stacks = StackCache::default();
        let mut off_cpu_stacks = StackCache::default();
        let mut frames = Vec::new();
        for sample in &window.samples {
            let (builder, stacks, count, reason) = match (&sample.off_cpu, &mut off) {
                (None, _) => (&mut on_cpu, &mut on_cpu_stacks, sample.count, None),
                // Times come scaled up for the switches not followed.
                (Some(wait), Some((_, builder))) => (
                    builder,
                    &mut off_cpu_stacks,
                    wait.blocked_ns,
                    Some(if wait.involuntary {
                        OffCpuReason::Involuntary
                    } else {
                        OffCpuReason::Voluntary
                    }),
                ),
                // Off-CPU samples without off-CPU settings cannot happen:
                // the programs are attached only with them.
                (Some(_), None) => continue,
            };
            let (key, capture) = self.resolve(sample, &mut live);
            let process = self.processes.lookup(key, &sample.comm, capture.as_deref());
            if !self
                .filter
                .allows_name(&process.name, process.executable.as_deref())
                || self.processes.excluded_by_pod(key)
            {
                self.filtered_at_drain += sample.count;
                continue;
            }
            frames.clear();
            self.stack_frames(window, sample, key, builder, stacks, &mut frames);
            let process = builder.intern_process(&process);
            let last_seen_unix_ns = sample
                .last_seen
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            builder.add_off_cpu_sample(
                process,
                sample.tid,
                Arc::from(sample.comm.as_str()),
                frames.clone(),
                count,
                last_seen_unix_ns,
                reason,
            );
        }
        self.symbolizer.end_window();
        self.processes.end_window();
        let mut changes = Changes::default();
        self.tracker.end_window(monotonic_ns(), &mut changes);
        self.apply(changes);
        WindowProfiles {
            on_cpu: on_cpu.build(),
            off_cpu: off.map(|(_, builder)| builder.build()),
        }
    }

    /// Appends the sample's frames, leaf first: its kernel stack (where it
    /// was interrupted, or where it blocked), then its user stack.
    fn stack_frames(
        &mut self,
        window: &RawWindow,
        sample: &RawSample,
        process: ProcessKey,
        builder: &mut ProfileBuilder,
        cache: &mut StackCache,
        frames: &mut Vec<FrameId>,
    ) {
        let lost_kernel = |b: &mut ProfileBuilder| {
            vec![b.intern_frame(&Frame::named("[lost kernel stack]", FrameKind::Kernel))]
        };
        if let Some(wait) = &sample.off_cpu {
            if wait.blocked_stack != 0 {
                let stack = cache
                    .blocked
                    .entry(wait.blocked_stack)
                    .or_insert_with(|| match window.stacks.get(&wait.blocked_stack) {
                        Some(raw) => {
                            let mut out = Vec::new();
                            self.symbolizer.kernel_stack(&raw.ips, builder, &mut out);
                            out
                        }
                        None => lost_kernel(builder),
                    });
                frames.extend_from_slice(stack);
            }
        } else if let Some(id) = sample.kernel_stack {
            let stack =
                cache
                    .kernel
                    .entry(id)
                    .or_insert_with(|| match window.kernel_stacks.get(&id) {
                        Some(ips) => {
                            let mut out = Vec::new();
                            self.symbolizer.kernel_stack(ips, builder, &mut out);
                            out
                        }
                        None => lost_kernel(builder),
                    });
            frames.extend_from_slice(stack);
        } else if sample.in_kernel {
            frames.extend(lost_kernel(builder));
        }
        if sample.user_stack != 0 {
            let stack =
                cache
                    .user
                    .entry((process, sample.user_stack))
                    .or_insert_with(|| {
                        let mut out = Vec::new();
                        match window.stacks.get(&sample.user_stack) {
                            Some(raw) => {
                                self.symbolizer
                                    .user_stack(process, &raw.ips, builder, &mut out);
                                if raw.truncated {
                                    out.push(builder.intern_frame(&Frame::named(
                                        "[truncated]",
                                        FrameKind::Native,
                                    )));
                                }
                            }
                            None => out.push(builder.intern_frame(&Frame::named(
                                "[lost user stack]",
                                FrameKind::Native,
                            ))),
                        }
                        out
                    });
            frames.extend_from_slice(stack);
        }
    }
}

/// This host's name, for profile titles and resource attributes.
///
/// In a Kubernetes pod without the host's network, the kernel's hostname
/// is the pod's name; the DaemonSet passes the node's name in `NODE_NAME`
/// (from `spec.nodeName`), which is then the host's name.
pub fn hostname() -> String {
    choose_hostname(
        std::env::var("NODE_NAME").ok(),
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
    )
}

fn choose_hostname(node_name: Option<String>, kernel_hostname: Option<String>) -> String {
    [node_name, kernel_hostname]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_string())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_name_wins_over_the_pods_hostname() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            choose_hostname(some("node-7"), some("hearth-x2k\n")),
            "node-7"
        );
        assert_eq!(choose_hostname(None, some("web1\n")), "web1");
        assert_eq!(choose_hostname(some(" "), some("web1\n")), "web1");
        assert_eq!(choose_hostname(None, None), "unknown");
    }

    use std::time::{Duration, SystemTime};

    use crate::bpf::{BpfStats, RawStack};
    use crate::incarnation::{fake_capture, ProcessEvent};
    use crate::symbolize::fake::MapSymbolizer;

    fn sample(pid: u32, stack: u64, at_ns: u64) -> RawSample {
        RawSample {
            tgid: pid,
            tid: pid,
            comm: "thread".into(),
            user_stack: stack,
            kernel_stack: None,
            in_kernel: false,
            count: 1,
            last_seen: SystemTime::now(),
            last_seen_ns: at_ns,
            off_cpu: None,
        }
    }

    fn window(samples: Vec<RawSample>, events: Vec<ProcessEvent>) -> RawWindow {
        let stack = |ip| RawStack {
            ips: vec![ip],
            truncated: false,
            kernel: false,
        };
        RawWindow {
            start: SystemTime::now() - Duration::from_secs(1),
            end: SystemTime::now(),
            samples,
            stacks: [(1, stack(0x10)), (2, stack(0x20))].into_iter().collect(),
            kernel_stacks: HashMap::new(),
            stats: BpfStats::default(),
            process_events: events,
        }
    }

    fn leaves(profile: &Profile) -> Vec<(u32, String, String)> {
        let mut out: Vec<_> = profile
            .samples
            .iter()
            .map(|s| {
                let p = profile.process(s.process);
                let leaf = profile.frame(s.frames[0]).function.to_string();
                (p.pid, p.name.to_string(), leaf)
            })
            .collect();
        out.sort();
        out
    }

    /// A pid reused within one window, by two short-lived processes gone
    /// before the drain: each sample gets its own process's symbols and
    /// name, matched by time to the exec and exit events; the images are
    /// forgotten once their samples are drained.
    #[test]
    fn a_reused_pid_gets_the_new_processs_symbols_and_name() {
        let pid = 4_000_000; // beyond pid_max: never in /proc
        let symbolizer = MapSymbolizer::new()
            .with_image("first", 0x10, "first_main")
            .with_image("second", 0x10, "second_main")
            .with(0x20, "shared");
        let mut processor = WindowProcessor::new(symbolizer);
        let events = vec![
            ProcessEvent::Captured(fake_capture(pid, 1_000, "first")),
            ProcessEvent::Exit {
                pid,
                time_ns: 2_000,
            },
            ProcessEvent::Captured(fake_capture(pid, 3_000, "second")),
            ProcessEvent::Exit {
                pid,
                time_ns: 4_000,
            },
        ];
        let samples = vec![
            sample(pid, 1, 1_500),
            sample(pid, 1, 3_500),
            // Same stack, same pid, after both exited (a fork that did not
            // exec, unknown): neither image's symbols.
            sample(pid, 1, 4_500),
        ];
        let profiles = processor.process(&window(samples, events), 99, None);
        assert_eq!(
            leaves(&profiles.on_cpu),
            [
                (pid, "first".into(), "first_main".into()),
                (pid, "second".into(), "second_main".into()),
                (pid, "thread".into(), "[unknown]".into()),
            ]
        );
        // One more window and the ended images are forgotten.
        assert_eq!(processor.tracked_processes(), 2);
        processor.process(&window(Vec::new(), Vec::new()), 99, None);
        assert_eq!(processor.tracked_processes(), 0);
        let forgotten = &processor.symbolizer().forgotten;
        assert_eq!(forgotten.len(), 2, "{forgotten:?}");
    }

    /// Forked children (no exec) gone before the drain, one after another
    /// on the same pid: each sample gets the capture taken at its own
    /// process's first sample, never the other's, and none is unknown.
    #[test]
    fn forked_children_gone_before_the_drain_keep_their_own_capture() {
        use crate::incarnation::{fake_image, Image};
        let pid = 4_000_003; // beyond pid_max: never in /proc
        let symbolizer = MapSymbolizer::new()
            .with_image("worker_a", 0x10, "work_a")
            .with_image("worker_b", 0x10, "work_b");
        let mut processor = WindowProcessor::new(symbolizer);
        let events = vec![
            ProcessEvent::Captured(fake_image(pid, Image::Forked(1_000), "worker_a")),
            ProcessEvent::Exit {
                pid,
                time_ns: 2_000,
            },
            ProcessEvent::Captured(fake_image(pid, Image::Forked(3_000), "worker_b")),
            ProcessEvent::Exit {
                pid,
                time_ns: 4_000,
            },
        ];
        let samples = vec![
            sample(pid, 1, 1_000),
            sample(pid, 1, 1_900),
            sample(pid, 1, 3_100),
        ];
        let profiles = processor.process(&window(samples, events), 99, None);
        assert_eq!(
            leaves(&profiles.on_cpu),
            [
                (pid, "worker_a".into(), "work_a".into()),
                (pid, "worker_b".into(), "work_b".into()),
            ]
        );
        assert_eq!(profiles.on_cpu.total_count(), 3);
        let asked = &processor.symbolizer().asked;
        assert!(
            asked.iter().all(|k| matches!(k.image, Image::Forked(_))),
            "{asked:?}"
        );
    }

    /// Samples of a process a name rule excludes, taken before the kernel
    /// learned the verdict, are dropped at drain.
    #[test]
    fn excluded_names_are_dropped_at_drain() {
        let filter = FilterSpec::new(&crate::filter::FilterRules {
            exclude_names: vec!["^noisy$".into()],
            ..Default::default()
        })
        .unwrap();
        let mut processor = WindowProcessor::new(MapSymbolizer::new()).with_filter(filter);
        let events = vec![
            ProcessEvent::Captured(fake_capture(4_000_001, 1_000, "noisy")),
            ProcessEvent::Captured(fake_capture(4_000_002, 1_000, "quiet")),
        ];
        let samples = vec![sample(4_000_001, 1, 1_500), sample(4_000_002, 2, 1_500)];
        let profiles = processor.process(&window(samples, events), 99, None);
        let names: Vec<String> = leaves(&profiles.on_cpu).into_iter().map(|l| l.1).collect();
        assert_eq!(names, ["quiet"]);
        assert_eq!(processor.filtered_at_drain, 1);
    }
}
