//! The one internal profile model. Every exporter (folded, flame graph,
//! pprof, and later OTLP and the store) writes from a [`Profile`]; every
//! source (the BPF drain, a decoded pprof or folded file) produces one.
//!
//! Frames, mappings and processes are interned in tables and samples refer to
//! them by index, so a profile with millions of samples over a few thousand
//! distinct frames stays small and the encoders can emit their own tables
//! without re-deduplicating.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Index into [`Profile::frames`].
pub type FrameId = u32;
/// Index into [`Profile::mappings`].
pub type MappingId = u32;
/// Index into [`Profile::processes`].
pub type ProcessId = u32;

/// Where a frame's code lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    /// Kernel code, symbolized from kallsyms.
    Kernel,
    /// Native user code (ELF executables and shared libraries).
    Native,
}

impl FrameKind {
    /// The OpenTelemetry `profile.frame.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameKind::Kernel => "kernel",
            FrameKind::Native => "native",
        }
    }
}

/// An executable file whose code appears in a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// Path of the file as the process mapped it (`[kernel.kallsyms]` for the kernel).
    pub path: Arc<str>,
    /// GNU build ID, lower-case hex, when the file has one.
    pub build_id: Option<Arc<str>>,
}

/// One frame of a stack, after symbolization.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name; `[unknown]` style text when symbolization failed.
    pub function: Arc<str>,
    /// Source file, when debug info said so.
    pub file: Option<Arc<str>>,
    /// Source line, when debug info said so.
    pub line: Option<u32>,
    pub kind: FrameKind,
    pub mapping: Option<MappingId>,
    /// For user frames the offset in the mapped file (the same code has the
    /// same address in every process); for kernel frames the kernel address.
    pub address: u64,
    /// True when this frame was inlined into the frame that follows it
    /// (towards the root) at the same address.
    pub inlined: bool,
}

impl Frame {
    /// A frame known only by name: placeholders like `[truncated]`, or
    /// frames read back from formats without addresses.
    pub fn named(function: &str, kind: FrameKind) -> Frame {
        Frame {
            function: Arc::from(function),
            file: None,
            line: None,
            kind,
            mapping: None,
            address: 0,
            inlined: false,
        }
    }
}

/// A process seen in a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Process {
    pub pid: u32,
    /// Short name (comm of the main thread, or the executable's file name).
    pub name: Arc<str>,
    /// Path of the main executable, when it could be read.
    pub executable: Option<Arc<str>>,
    /// Everything else known about it (container, Kubernetes, service,
    /// tags), shared by every window the process appears in.
    pub metadata: Arc<ProcessMetadata>,
}

impl Process {
    /// A process known only by pid, name and executable.
    pub fn new(pid: u32, name: impl Into<Arc<str>>, executable: Option<Arc<str>>) -> Process {
        Process {
            pid,
            name: name.into(),
            executable,
            metadata: Arc::default(),
        }
    }
}

/// The value of a resource attribute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttrValue {
    Str(Arc<str>),
    Int(i64),
}

impl AttrValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            AttrValue::Int(_) => None,
        }
    }
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s),
            AttrValue::Int(n) => write!(f, "{n}"),
        }
    }
}

/// OpenTelemetry resource attributes of a process beyond `process.pid`
/// and its executable (`metadata/` says where each comes from): sorted by
/// key, each key once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ProcessMetadata {
    attributes: Vec<(Arc<str>, AttrValue)>,
}

impl ProcessMetadata {
    /// From attributes in order of precedence: the first value of a key wins.
    pub fn new(attributes: impl IntoIterator<Item = (Arc<str>, AttrValue)>) -> ProcessMetadata {
        let mut attributes: Vec<(Arc<str>, AttrValue)> = attributes.into_iter().collect();
        // Stable: equal keys keep their order, so dedup keeps the first.
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
        attributes.dedup_by(|later, first| later.0 == first.0);
        ProcessMetadata { attributes }
    }

    pub fn get(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &self.attributes[i].1)
    }

    /// The value of `key` when it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(AttrValue::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &AttrValue)> + '_ {
        self.attributes.iter().map(|(k, v)| (&**k, v))
    }

    pub fn len(&self) -> usize {
        self.attributes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty()
    }
}

/// What a profile's sample values measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleKind {
    /// On-CPU samples: the value is a sample count, each worth one period of
    /// CPU time.
    OnCpu,
    /// Off-CPU time: the value is nanoseconds threads spent off CPU
    /// (blocked, or preempted while runnable) in the stack.
    OffCpu(OffCpuSettings),
    /// Wall-clock time per thread: on-CPU samples converted to nanoseconds
    /// plus off-CPU nanoseconds.
    Wall(OffCpuSettings),
}

impl SampleKind {
    /// The unit of [`Sample::count`] in this kind of profile.
    pub fn unit(self) -> &'static str {
        match self {
            SampleKind::OnCpu => "samples",
            SampleKind::OffCpu(_) | SampleKind::Wall(_) => "nanoseconds",
        }
    }

    /// Short description for titles and reports, with the off-CPU
    /// threshold and sampling when they apply.
    pub fn describe(self) -> String {
        match self {
            SampleKind::OnCpu => "on-CPU".to_string(),
            SampleKind::OffCpu(s) => format!("off-CPU time{}", s.describe()),
            SampleKind::Wall(s) => format!("wall-clock time{}", s.describe()),
        }
    }

    /// Values are times in nanoseconds (rather than sample counts).
    pub fn is_time(self) -> bool {
        !matches!(self, SampleKind::OnCpu)
    }
}

/// How off-CPU time was recorded, which says how complete it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct OffCpuSettings {
    /// Waits shorter than this were not recorded; 0 when unknown (a profile
    /// read back from a file).
    pub min_ns: u64,
    /// Context switches followed per million (the sampling probability);
    /// values are already scaled up by its inverse. 0 when unknown.
    pub followed_per_million: u32,
    /// Cap on followed switch-outs per second per CPU; above it, fewer are
    /// followed and values are scaled up for them. 0: none, or unknown.
    pub max_rate: u64,
}

impl OffCpuSettings {
    /// Settings for waits of at least `min`, with `sample_probability` of
    /// the switches followed, at most `max_rate` a second per CPU.
    pub fn new(min: Duration, sample_probability: f64, max_rate: u64) -> OffCpuSettings {
        OffCpuSettings {
            min_ns: u64::try_from(min.as_nanos()).unwrap_or(u64::MAX),
            followed_per_million: (sample_probability * 1e6).round() as u32,
            max_rate,
        }
    }

    fn describe(self) -> String {
        let mut parts = Vec::new();
        if self.min_ns > 0 {
            parts.push(format!(
                "waits ≥ {}",
                crate::config::HumanDuration(Duration::from_nanos(self.min_ns))
            ));
        }
        if self.followed_per_million > 0 && self.followed_per_million < 1_000_000 {
            parts.push(format!(
                "{:.3}% of switches followed, scaled up",
                f64::from(self.followed_per_million) / 1e4
            ));
        }
        if self.max_rate > 0 {
            parts.push(format!(
                "sampled above {} switches/s per CPU, scaled up",
                self.max_rate
            ));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }
}

/// Why a thread was off CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OffCpuReason {
    /// It waited: sleep, I/O, a lock, a pipe.
    Voluntary,
    /// It was preempted while runnable: waiting for a CPU.
    Involuntary,
}

impl OffCpuReason {
    /// Label value in pprof and OTLP.
    pub fn as_str(self) -> &'static str {
        match self {
            OffCpuReason::Voluntary => "voluntary",
            OffCpuReason::Involuntary => "involuntary",
        }
    }

    pub fn parse(s: &str) -> Option<OffCpuReason> {
        match s {
            "voluntary" => Some(OffCpuReason::Voluntary),
            "involuntary" => Some(OffCpuReason::Involuntary),
            _ => None,
        }
    }

    /// The leaf-most frame folded stacks and flame graphs show for it, so
    /// the two kinds of wait stay apart in formats without labels.
    pub fn frame_name(self) -> &'static str {
        match self {
            OffCpuReason::Voluntary => "[off-CPU: waiting]",
            OffCpuReason::Involuntary => "[off-CPU: preempted]",
        }
    }
}

/// One distinct stack of one thread, with how often it was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub process: ProcessId,
    pub tid: u32,
    /// Thread name (comm) at the time of the sample.
    pub thread_name: Arc<str>,
    /// Frames from the leaf (index 0) to the root.
    pub frames: Vec<FrameId>,
    /// The sample's weight, in the unit of the profile's [`SampleKind`]:
    /// samples (on-CPU) or nanoseconds (off-CPU, wall).
    pub count: u64,
    /// Off-CPU time: why the thread was off CPU. `None` for on-CPU samples.
    pub off_cpu: Option<OffCpuReason>,
    /// Wall-clock time (Unix nanoseconds) this stack was last sampled; 0
    /// when the source did not say (folded files, pprof).
    pub last_seen_unix_ns: u64,
}

/// When, where and how a profile was taken.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileMeta {
    pub kind: SampleKind,
    /// Wall-clock start of the first window in the profile.
    pub start: SystemTime,
    /// Wall-clock length covered by the profile.
    pub duration: Duration,
    /// Sampling frequency actually used.
    pub frequency_hz: u64,
    pub hostname: String,
}

impl ProfileMeta {
    /// Nanoseconds of CPU time one on-CPU sample stands for.
    pub fn period_ns(&self) -> u64 {
        1_000_000_000 / self.frequency_hz.max(1)
    }
}

/// A complete profile: interned tables plus samples.
#[derive(Debug, Clone)]
pub struct Profile {
    pub meta: ProfileMeta,
    pub frames: Vec<Frame>,
    pub mappings: Vec<Mapping>,
    pub processes: Vec<Process>,
    pub samples: Vec<Sample>,
}

impl Profile {
    pub fn frame(&self, id: FrameId) -> &Frame {
        &self.frames[id as usize]
    }

    pub fn mapping(&self, id: MappingId) -> &Mapping {
        &self.mappings[id as usize]
    }

    pub fn process(&self, id: ProcessId) -> &Process {
        &self.processes[id as usize]
    }

    /// Sum of all sample counts.
    pub fn total_count(&self) -> u64 {
        self.samples.iter().map(|s| s.count).sum()
    }

    /// Function names of a sample from the root to the leaf.
    pub fn stack_names<'a>(&'a self, sample: &'a Sample) -> impl Iterator<Item = &'a str> + 'a {
        sample
            .frames
            .iter()
            .rev()
            .map(move |&f| &*self.frame(f).function)
    }

    /// The profile with only the samples `keep` accepts. The tables are
    /// rebuilt, so frames, mappings and processes that only dropped samples
    /// used are gone too (a filtered pprof should not list them).
    pub fn retain_samples(self, keep: impl Fn(&Process, &Sample) -> bool) -> Profile {
        let mut kept = ProfileBuilder::new(self.meta.clone());
        // Old id → new id, filled in on first use.
        let mut processes: Vec<Option<ProcessId>> = vec![None; self.processes.len()];
        let mut frames: Vec<Option<FrameId>> = vec![None; self.frames.len()];
        let mut mappings: Vec<Option<MappingId>> = vec![None; self.mappings.len()];
        for sample in &self.samples {
            let process = self.process(sample.process);
            if !keep(process, sample) {
                continue;
            }
            let process_id = *processes[sample.process as usize]
                .get_or_insert_with(|| kept.intern_process(process));
            let stack = sample
                .frames
                .iter()
                .map(|&f| {
                    *frames[f as usize].get_or_insert_with(|| {
                        let mut frame = self.frame(f).clone();
                        frame.mapping = frame.mapping.map(|m| {
                            *mappings[m as usize]
                                .get_or_insert_with(|| kept.intern_mapping(self.mapping(m)))
                        });
                        kept.intern_frame(&frame)
                    })
                })
                .collect();
            kept.add_off_cpu_sample(
                process_id,
                sample.tid,
                sample.thread_name.clone(),
                stack,
                sample.count,
                sample.last_seen_unix_ns,
                sample.off_cpu,
            );
        }
        kept.build()
    }
}

/// Key under which identical samples are merged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SampleKey {
    process: ProcessId,
    tid: u32,
    thread_name: Arc<str>,
    frames: Vec<FrameId>,
    off_cpu: Option<OffCpuReason>,
}

/// Builds a [`Profile`], interning frames, mappings and processes and
/// merging identical samples. Also merges whole profiles (windows of a
/// recording, or several files).
#[derive(Debug)]
pub struct ProfileBuilder {
    meta: ProfileMeta,
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, FrameId>,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<Mapping, MappingId>,
    processes: Vec<Process>,
    process_ids: HashMap<Process, ProcessId>,
    samples: Vec<Sample>,
    sample_ids: HashMap<SampleKey, usize>,
}

impl ProfileBuilder {
    pub fn new(meta: ProfileMeta) -> Self {
        Self {
            meta,
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            mappings: Vec::new(),
            mapping_ids: HashMap::new(),
            processes: Vec::new(),
            process_ids: HashMap::new(),
            samples: Vec::new(),
            sample_ids: HashMap::new(),
        }
    }

    pub fn meta(&self) -> &ProfileMeta {
        &self.meta
    }

    pub fn meta_mut(&mut self) -> &mut ProfileMeta {
        &mut self.meta
    }

    pub fn intern_mapping(&mut self, mapping: &Mapping) -> MappingId {
        intern(&mut self.mappings, &mut self.mapping_ids, mapping)
    }

    pub fn intern_frame(&mut self, frame: &Frame) -> FrameId {
        intern(&mut self.frames, &mut self.frame_ids, frame)
    }

    pub fn intern_process(&mut self, process: &Process) -> ProcessId {
        intern(&mut self.processes, &mut self.process_ids, process)
    }

    /// Adds `count` to the sample with this thread and stack, creating it if
    /// needed. `frames` go from the leaf to the root.
    pub fn add_sample(
        &mut self,
        process: ProcessId,
        tid: u32,
        thread_name: Arc<str>,
        frames: Vec<FrameId>,
        count: u64,
    ) {
        self.add_sample_seen(process, tid, thread_name, frames, count, 0);
    }

    /// [`add_sample`](Self::add_sample) for a source that knows when the
    /// stack was last sampled (Unix nanoseconds); merged samples keep the
    /// latest time.
    pub fn add_sample_seen(
        &mut self,
        process: ProcessId,
        tid: u32,
        thread_name: Arc<str>,
        frames: Vec<FrameId>,
        count: u64,
        last_seen_unix_ns: u64,
    ) {
        self.add_off_cpu_sample(
            process,
            tid,
            thread_name,
            frames,
            count,
            last_seen_unix_ns,
            None,
        );
    }

    /// [`add_sample_seen`](Self::add_sample_seen) with the reason a thread
    /// was off CPU (`None` for on-CPU samples).
    #[allow(clippy::too_many_arguments)]
    pub fn add_off_cpu_sample(
        &mut self,
        process: ProcessId,
        tid: u32,
        thread_name: Arc<str>,
        frames: Vec<FrameId>,
        count: u64,
        last_seen_unix_ns: u64,
        off_cpu: Option<OffCpuReason>,
    ) {
        let key = SampleKey {
            process,
            tid,
            thread_name,
            frames,
            off_cpu,
        };
        if let Some(&i) = self.sample_ids.get(&key) {
            let sample = &mut self.samples[i];
            sample.count += count;
            sample.last_seen_unix_ns = sample.last_seen_unix_ns.max(last_seen_unix_ns);
            return;
        }
        self.samples.push(Sample {
            process: key.process,
            tid: key.tid,
            thread_name: key.thread_name.clone(),
            frames: key.frames.clone(),
            count,
            last_seen_unix_ns,
            off_cpu: key.off_cpu,
        });
        self.sample_ids.insert(key, self.samples.len() - 1);
    }

    /// Adds every sample of `other`, re-interning its tables. The meta of
    /// `self` is widened to cover both time ranges.
    pub fn merge(&mut self, other: &Profile) {
        self.merge_scaled(other, 1);
    }

    /// [`merge`](Self::merge) with every value of `other` multiplied by
    /// `factor` (on-CPU samples into nanoseconds, for wall-clock profiles).
    pub fn merge_scaled(&mut self, other: &Profile, factor: u64) {
        let mapping_ids: Vec<MappingId> = other
            .mappings
            .iter()
            .map(|m| self.intern_mapping(m))
            .collect();
        let frame_ids: Vec<FrameId> = other
            .frames
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f.mapping = f.mapping.map(|m| mapping_ids[m as usize]);
                self.intern_frame(&f)
            })
            .collect();
        let process_ids: Vec<ProcessId> = other
            .processes
            .iter()
            .map(|p| self.intern_process(p))
            .collect();
        for s in &other.samples {
            let frames = s.frames.iter().map(|&f| frame_ids[f as usize]).collect();
            self.add_off_cpu_sample(
                process_ids[s.process as usize],
                s.tid,
                s.thread_name.clone(),
                frames,
                s.count.saturating_mul(factor),
                s.last_seen_unix_ns,
                s.off_cpu,
            );
        }
        let start = self.meta.start.min(other.meta.start);
        let end =
            (self.meta.start + self.meta.duration).max(other.meta.start + other.meta.duration);
        self.meta.start = start;
        self.meta.duration = end.duration_since(start).unwrap_or_default();
    }

    pub fn sample_count(&self) -> usize {
        self.samples.len()
    }

    pub fn build(self) -> Profile {
        Profile {
            meta: self.meta,
            frames: self.frames,
            mappings: self.mappings,
            processes: self.processes,
            samples: self.samples,
        }
    }
}

/// The wall-clock profile of one stretch of time: each on-CPU sample
/// counts as one sampling period of nanoseconds, and off-CPU time is added
/// as it is, so a thread's total is the time it ran plus the time it waited.
pub fn wall_clock(on_cpu: &Profile, off_cpu: &Profile) -> Profile {
    let settings = match off_cpu.meta.kind {
        SampleKind::OffCpu(s) | SampleKind::Wall(s) => s,
        SampleKind::OnCpu => OffCpuSettings::default(),
    };
    let mut builder = ProfileBuilder::new(ProfileMeta {
        kind: SampleKind::Wall(settings),
        ..on_cpu.meta.clone()
    });
    builder.merge_scaled(on_cpu, on_cpu.meta.period_ns());
    builder.merge(off_cpu);
    builder.build()
}

fn intern<T: Clone + Eq + std::hash::Hash>(
    table: &mut Vec<T>,
    ids: &mut HashMap<T, u32>,
    value: &T,
) -> u32 {
    if let Some(&id) = ids.get(value) {
        return id;
    }
    let id = u32::try_from(table.len()).expect("more than 2^32 interned entries");
    table.push(value.clone());
    ids.insert(value.clone(), id);
    id
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn meta() -> ProfileMeta {
        ProfileMeta {
            kind: SampleKind::OnCpu,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(10),
            frequency_hz: 99,
            hostname: "testhost".into(),
        }
    }

    pub(crate) fn native(name: &str) -> Frame {
        Frame::named(name, FrameKind::Native)
    }

    /// A small profile: process "app" with stacks main;a (6), main;b (3),
    /// and a kernel frame under b (1).
    pub(crate) fn sample_profile() -> Profile {
        let mut b = ProfileBuilder::new(meta());
        let exe = b.intern_mapping(&Mapping {
            path: "/usr/bin/app".into(),
            build_id: Some("abcd".into()),
        });
        let p = b.intern_process(&Process {
            pid: 42,
            name: "app".into(),
            executable: Some("/usr/bin/app".into()),
            metadata: Default::default(),
        });
        let f = |b: &mut ProfileBuilder, name: &str, addr: u64| {
            let mut fr = native(name);
            fr.mapping = Some(exe);
            fr.address = addr;
            b.intern_frame(&fr)
        };
        let main = f(&mut b, "main", 0x1000);
        let a = f(&mut b, "a", 0x2000);
        let bb = f(&mut b, "b", 0x3000);
        let k = b.intern_frame(&Frame {
            kind: FrameKind::Kernel,
            address: 0xffff_ffff_8100_0000,
            ..native("do_syscall_64")
        });
        b.add_sample(p, 42, "app".into(), vec![a, main], 6);
        b.add_sample(p, 43, "worker".into(), vec![bb, main], 3);
        b.add_sample(p, 43, "worker".into(), vec![k, bb, main], 1);
        b.build()
    }

    /// The off-CPU version of [`sample_profile`]: main;a waited 6 ms
    /// voluntarily, main;b was preempted for 3 ms.
    pub(crate) fn off_cpu_profile() -> Profile {
        let on = sample_profile();
        let mut b = ProfileBuilder::new(ProfileMeta {
            kind: SampleKind::OffCpu(OffCpuSettings {
                min_ns: 1_000_000,
                followed_per_million: 1_000_000,
                max_rate: 10_000,
            }),
            frequency_hz: 0,
            ..on.meta.clone()
        });
        let p = b.intern_process(on.process(0));
        let main = b.intern_frame(&native("main"));
        let a = b.intern_frame(&native("a"));
        let bb = b.intern_frame(&native("b"));
        let voluntary = Some(OffCpuReason::Voluntary);
        b.add_off_cpu_sample(p, 42, "app".into(), vec![a, main], 6_000_000, 0, voluntary);
        let preempted = Some(OffCpuReason::Involuntary);
        b.add_off_cpu_sample(
            p,
            43,
            "worker".into(),
            vec![bb, main],
            3_000_000,
            0,
            preempted,
        );
        b.build()
    }

    #[test]
    fn wall_clock_adds_on_cpu_time_to_off_cpu_time() {
        let on = sample_profile();
        let off = off_cpu_profile();
        let wall = wall_clock(&on, &off);
        assert!(matches!(wall.meta.kind, SampleKind::Wall(s) if s.min_ns == 1_000_000));
        // 10 on-CPU samples at 99 Hz, plus 9 ms off CPU.
        assert_eq!(wall.total_count(), 10 * on.meta.period_ns() + 9_000_000);
        // main;a on CPU and main;a waiting stay apart.
        let a_samples: Vec<_> = wall
            .samples
            .iter()
            .filter(|s| wall.stack_names(s).last() == Some("a"))
            .map(|s| (s.off_cpu, s.count))
            .collect();
        assert_eq!(a_samples.len(), 2, "{a_samples:?}");
        assert!(a_samples.contains(&(None, 6 * on.meta.period_ns())));
        assert!(a_samples.contains(&(Some(OffCpuReason::Voluntary), 6_000_000)));
    }

    #[test]
    fn kinds_describe_themselves() {
        assert_eq!(SampleKind::OnCpu.describe(), "on-CPU");
        let sampled = OffCpuSettings {
            min_ns: 2_000_000,
            followed_per_million: 100_000,
            max_rate: 0,
        };
        let text = SampleKind::OffCpu(sampled).describe();
        assert!(text.starts_with("off-CPU time (waits ≥ 2ms"), "{text}");
        assert!(text.contains("10.000% of switches followed"), "{text}");
        assert!(!text.contains("per CPU"), "{text}");
        let capped = OffCpuSettings::new(Duration::from_millis(1), 1.0, 10_000);
        let text = SampleKind::Wall(capped).describe();
        assert_eq!(
            text,
            "wall-clock time (waits ≥ 1ms, sampled above 10000 switches/s per CPU, scaled up)"
        );
        assert_eq!(
            SampleKind::Wall(OffCpuSettings::default()).describe(),
            "wall-clock time"
        );
        assert_eq!(SampleKind::OffCpu(sampled).unit(), "nanoseconds");
    }

    #[test]
    fn identical_samples_merge_and_tables_dedupe() {
        let mut b = ProfileBuilder::new(meta());
        let p = b.intern_process(&Process {
            pid: 1,
            name: "x".into(),
            executable: None,
            metadata: Default::default(),
        });
        let a1 = b.intern_frame(&native("a"));
        let a2 = b.intern_frame(&native("a"));
        assert_eq!(a1, a2);
        b.add_sample(p, 1, "x".into(), vec![a1], 2);
        b.add_sample(p, 1, "x".into(), vec![a2], 3);
        b.add_sample(p, 2, "x".into(), vec![a2], 1);
        let prof = b.build();
        assert_eq!(prof.frames.len(), 1);
        assert_eq!(prof.samples.len(), 2);
        assert_eq!(prof.total_count(), 6);
    }

    #[test]
    fn merge_reinterns_and_widens_time_range() {
        let one = sample_profile();
        let mut two = sample_profile();
        two.meta.start += Duration::from_secs(10);
        let mut b = ProfileBuilder::new(one.meta.clone());
        b.merge(&one);
        b.merge(&two);
        let merged = b.build();
        assert_eq!(merged.total_count(), 2 * one.total_count());
        assert_eq!(merged.frames.len(), one.frames.len());
        assert_eq!(merged.samples.len(), one.samples.len());
        assert_eq!(merged.meta.duration, Duration::from_secs(20));
        let names: Vec<&str> = merged.stack_names(&merged.samples[2]).collect();
        assert_eq!(names, ["main", "b", "do_syscall_64"]);
    }
}
