//! Gzipped pprof (`profile.proto` from github.com/google/pprof), read by
//! `go tool pprof`, Pyroscope, Parca, Grafana and most profiling UIs.
//!
//! Encoding of the model:
//!
//! * sample types `samples`/`count` and `cpu`/`nanoseconds` (count × the
//!   sampling period), period type `cpu`/`nanoseconds`;
//! * one pprof Mapping per distinct executable file (path and build ID);
//!   every kernel frame gets the `[kernel.kallsyms]` mapping, which is how
//!   kernel frames are told apart when decoding;
//! * one Location per machine address of a stack: a frame and the frames
//!   inlined into it (`inlined: true`, innermost first) share one Location
//!   with one Line each, innermost first, as profile.proto specifies;
//! * one Function per distinct (name, source file);
//! * sample labels `pid` and `tid` (numeric), `thread_name` and
//!   `process_name` (strings), so per-process and per-thread views work,
//!   plus one label per attribute of the process's metadata under its
//!   OpenTelemetry key (`container.id`, `k8s.pod.name`, `service.name`,
//!   tags…; `process.parent_pid` numeric). Labels rather than comments:
//!   a profile holds many processes, and `go tool pprof -tagfocus`,
//!   Pyroscope and the local store's readers can select on labels;
//! * the hostname as a comment (pprof has no field for it).
//!
//! [`decode`] reverses this for our files and reads other tools' pprof
//! files as well as the model allows.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use prost::Message;

use super::ExportError;
use crate::profile::{
    AttrValue, Frame, FrameId, FrameKind, MappingId, OffCpuReason, OffCpuSettings, Process,
    ProcessMetadata, Profile, ProfileBuilder, ProfileMeta, SampleKind,
};
use crate::symbolize::{KERNEL_MAPPING_PATH, UNKNOWN};

/// The messages of profile.proto (package `perftools.profiles`), written
/// out by hand so the build needs no protoc. Field numbers and types follow
/// the .proto exactly, and fields hearth does not use are declared too, so
/// each struct can be checked against the spec line by line.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// Innermost inlined function first, the caller they were inlined
        /// into last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

const PID: &str = "pid";
const TID: &str = "tid";
const THREAD_NAME: &str = "thread_name";
const PROCESS_NAME: &str = "process_name";
/// Prefix of the comment carrying the hostname; [`decode`] looks for it.
const HOST_COMMENT: &str = "host: ";
/// Comments that keep how off-CPU time was recorded.
const OFF_CPU_MIN_COMMENT: &str = "off_cpu_min_ns: ";
const OFF_CPU_FOLLOWED_COMMENT: &str = "off_cpu_followed_per_million: ";
const OFF_CPU_MAX_RATE_COMMENT: &str = "off_cpu_max_rate_per_cpu: ";
/// Label of off-CPU samples: `voluntary` or `involuntary`.
const OFF_CPU_REASON: &str = "off_cpu_reason";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Writes `profile` to `out` as gzipped pprof.
pub fn write(profile: &Profile, out: &mut dyn Write) -> Result<(), ExportError> {
    let raw = to_proto(profile).encode_to_vec();
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&raw)?;
    gz.finish()?;
    Ok(())
}

/// `profile` as gzipped pprof bytes.
pub fn encode(profile: &Profile) -> Vec<u8> {
    let mut out = Vec::new();
    // Only the writer can fail, and a Vec never does.
    write(profile, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Builds the pprof message, interning strings, mappings, functions and
/// locations as it goes. Ids are 1-based positions in their tables.
struct Encoder<'a> {
    profile: &'a Profile,
    out: proto::Profile,
    strings: HashMap<Cow<'a, str>, i64>,
    mappings: HashMap<(&'a str, Option<&'a str>), u64>,
    functions: HashMap<(&'a str, Option<&'a str>), u64>,
    locations: HashMap<&'a [FrameId], u64>,
}

fn to_proto(profile: &Profile) -> proto::Profile {
    let mut enc = Encoder {
        profile,
        out: proto::Profile::default(),
        strings: HashMap::new(),
        mappings: HashMap::new(),
        functions: HashMap::new(),
        locations: HashMap::new(),
    };
    // profile.proto requires string_table[0] == "".
    enc.string("");
    let meta = &profile.meta;
    let period = saturate(meta.period_ns());
    // On-CPU: a count and its CPU time. Off-CPU and wall-clock: the time
    // itself, with no period.
    let time_type = match meta.kind {
        SampleKind::OnCpu => {
            enc.out.sample_type = vec![
                enc.value_type("samples", "count"),
                enc.value_type("cpu", "nanoseconds"),
            ];
            enc.out.period_type = Some(enc.value_type("cpu", "nanoseconds"));
            enc.out.period = period;
            None
        }
        SampleKind::OffCpu(settings) => Some(("off_cpu", settings)),
        SampleKind::Wall(settings) => Some(("wall", settings)),
    };
    if let Some((name, settings)) = time_type {
        enc.out.sample_type = vec![enc.value_type(name, "nanoseconds")];
        for (prefix, value) in [
            (OFF_CPU_MIN_COMMENT, settings.min_ns),
            (
                OFF_CPU_FOLLOWED_COMMENT,
                settings.followed_per_million.into(),
            ),
            (OFF_CPU_MAX_RATE_COMMENT, settings.max_rate),
        ] {
            let comment = enc.string(format!("{prefix}{value}"));
            enc.out.comment.push(comment);
        }
    }
    enc.out.time_nanos = meta
        .start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| saturate(d.as_nanos()));
    enc.out.duration_nanos = saturate(meta.duration.as_nanos());
    if !meta.hostname.is_empty() {
        let comment = enc.string(format!("{HOST_COMMENT}{}", meta.hostname));
        enc.out.comment.push(comment);
    }
    let labels = [PID, TID, THREAD_NAME, PROCESS_NAME, OFF_CPU_REASON].map(|k| enc.string(k));
    // Each process's metadata labels, built on first use.
    let mut metadata_labels: Vec<Option<Vec<proto::Label>>> = vec![None; profile.processes.len()];
    for sample in &profile.samples {
        // A frame and the frames inlined into it end at the first frame
        // that is not itself inlined.
        let location_id = sample
            .frames
            .split_inclusive(|&f| !profile.frame(f).inlined)
            .map(|chain| enc.location(chain))
            .collect();
        let process = profile.process(sample.process);
        let count = saturate(sample.count);
        let mut label = vec![
            num_label(labels[0], process.pid.into()),
            num_label(labels[1], sample.tid.into()),
            str_label(labels[2], enc.string(&*sample.thread_name)),
            str_label(labels[3], enc.string(&*process.name)),
        ];
        if let Some(reason) = sample.off_cpu {
            label.push(str_label(labels[4], enc.string(reason.as_str())));
        }
        let metadata = metadata_labels[sample.process as usize].get_or_insert_with(|| {
            process
                .metadata
                .iter()
                .map(|(key, value)| {
                    let key = enc.string(key.to_string());
                    match value {
                        AttrValue::Str(s) => str_label(key, enc.string(s.to_string())),
                        AttrValue::Int(n) => num_label(key, *n),
                    }
                })
                .collect()
        });
        label.extend_from_slice(metadata);
        let value = match time_type {
            None => vec![count, count.saturating_mul(period)],
            Some(_) => vec![count],
        };
        enc.out.sample.push(proto::Sample {
            location_id,
            value,
            label,
        });
    }
    enc.out
}

impl<'a> Encoder<'a> {
    fn string(&mut self, s: impl Into<Cow<'a, str>>) -> i64 {
        let s = s.into();
        if let Some(&i) = self.strings.get(&s) {
            return i;
        }
        let i = self.out.string_table.len() as i64;
        self.out.string_table.push(s.clone().into_owned());
        self.strings.insert(s, i);
        i
    }

    fn value_type(&mut self, r#type: &'static str, unit: &'static str) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(r#type),
            unit: self.string(unit),
        }
    }

    /// The mapping of `frame`'s code; 0 (none) for user frames whose file
    /// is unknown.
    fn mapping(&mut self, frame: &'a Frame) -> u64 {
        let mapping = frame.mapping.map(|m| self.profile.mapping(m));
        let key = match (frame.kind, mapping) {
            (FrameKind::Kernel, m) => (KERNEL_MAPPING_PATH, m.and_then(|m| m.build_id.as_deref())),
            (FrameKind::Native, Some(m)) => (&*m.path, m.build_id.as_deref()),
            (FrameKind::Native, None) => return 0,
        };
        if let Some(&id) = self.mappings.get(&key) {
            return id;
        }
        let id = self.out.mapping.len() as u64 + 1;
        let mapping = proto::Mapping {
            id,
            filename: self.string(key.0),
            build_id: key.1.map_or(0, |b| self.string(b)),
            // Symbolized already: pprof must not try to symbolize again.
            has_functions: true,
            ..Default::default()
        };
        self.out.mapping.push(mapping);
        self.mappings.insert(key, id);
        id
    }

    fn function(&mut self, frame: &'a Frame) -> u64 {
        let key = (&*frame.function, frame.file.as_deref());
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.out.function.len() as u64 + 1;
        let name = self.string(key.0);
        let function = proto::Function {
            id,
            name,
            // Names are demangled before they reach the model; the
            // mangled form is gone.
            system_name: name,
            filename: key.1.map_or(0, |f| self.string(f)),
            start_line: 0,
        };
        self.out.function.push(function);
        self.functions.insert(key, id);
        id
    }

    /// The location of an inline chain: frames innermost first, the last
    /// one the real (not inlined) frame whose address and mapping count.
    fn location(&mut self, chain: &'a [FrameId]) -> u64 {
        if let Some(&id) = self.locations.get(chain) {
            return id;
        }
        let profile = self.profile;
        let outer = profile.frame(
            *chain
                .last()
                .expect("split_inclusive yields no empty chunks"),
        );
        let mapping_id = self.mapping(outer);
        let mut line = Vec::with_capacity(chain.len());
        for &f in chain {
            let frame = profile.frame(f);
            line.push(proto::Line {
                function_id: self.function(frame),
                line: frame.line.map_or(0, i64::from),
                column: 0,
            });
            if mapping_id != 0 {
                let m = &mut self.out.mapping[mapping_id as usize - 1];
                m.has_filenames |= frame.file.is_some();
                m.has_line_numbers |= frame.line.is_some();
                m.has_inline_frames |= chain.len() > 1;
            }
        }
        let id = self.out.location.len() as u64 + 1;
        self.out.location.push(proto::Location {
            id,
            mapping_id,
            address: outer.address,
            line,
            is_folded: false,
        });
        self.locations.insert(chain, id);
        id
    }
}

fn num_label(key: i64, num: i64) -> proto::Label {
    proto::Label {
        key,
        num,
        ..Default::default()
    }
}

fn str_label(key: i64, str: i64) -> proto::Label {
    proto::Label {
        key,
        str,
        ..Default::default()
    }
}

/// pprof stores unsigned quantities as int64; clamp instead of wrapping.
fn saturate(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Reads a pprof profile, gzipped (as on disk) or not.
///
/// Processes come from the `pid` and `process_name` labels, threads from
/// `tid` and `thread_name` (0 or empty when absent), frames from the
/// locations' lines (a location without lines becomes an `[unknown]`
/// frame), and frames of the `[kernel.kallsyms]` mapping are kernel frames.
/// The sample count is the `count` value (`cpu` nanoseconds ÷ period when
/// there is none). Malformed input (bad gzip or protobuf, dangling ids,
/// string indexes out of range) is an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<Profile, ExportError> {
    let raw: Cow<[u8]> = if bytes.starts_with(&GZIP_MAGIC) {
        let mut raw = Vec::new();
        GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .map_err(|e| invalid(format!("gzip: {e}")))?;
        Cow::Owned(raw)
    } else {
        Cow::Borrowed(bytes)
    };
    let message = proto::Profile::decode(&*raw).map_err(|e| invalid(format!("protobuf: {e}")))?;
    Decoder::new(&message)?.profile()
}

fn invalid(message: String) -> ExportError {
    ExportError::Decode {
        format: "pprof",
        message,
    }
}

struct Decoder<'p> {
    p: &'p proto::Profile,
    /// The string table, shared so every frame or process naming the same
    /// string points to one allocation.
    strings: Vec<Arc<str>>,
    builder: ProfileBuilder,
}

impl<'p> Decoder<'p> {
    fn new(p: &'p proto::Profile) -> Result<Self, ExportError> {
        let strings: Vec<Arc<str>> = p
            .string_table
            .iter()
            .map(|s| Arc::from(s.as_str()))
            .collect();
        let mut dec = Decoder {
            p,
            strings,
            builder: ProfileBuilder::new(ProfileMeta {
                kind: SampleKind::OnCpu,
                start: SystemTime::UNIX_EPOCH,
                duration: Duration::ZERO,
                frequency_hz: 0,
                hostname: String::new(),
            }),
        };
        let mut hostname = String::new();
        let mut settings = OffCpuSettings::default();
        for &c in &p.comment {
            let comment = dec.string(c)?;
            if let Some(host) = comment.strip_prefix(HOST_COMMENT) {
                hostname = host.to_owned();
            } else if let Some(n) = comment.strip_prefix(OFF_CPU_MIN_COMMENT) {
                settings.min_ns = n.parse().unwrap_or(0);
            } else if let Some(n) = comment.strip_prefix(OFF_CPU_FOLLOWED_COMMENT) {
                settings.followed_per_million = n.parse().unwrap_or(0);
            } else if let Some(n) = comment.strip_prefix(OFF_CPU_MAX_RATE_COMMENT) {
                settings.max_rate = n.parse().unwrap_or(0);
            }
        }
        let mut kind = SampleKind::OnCpu;
        for t in &p.sample_type {
            match &*dec.string(t.r#type)? {
                "off_cpu" => kind = SampleKind::OffCpu(settings),
                "wall" => kind = SampleKind::Wall(settings),
                _ => {}
            }
        }
        let period_in_ns = match p.period_type {
            Some(t) => &*dec.string(t.unit)? == "nanoseconds",
            None => false,
        };
        let meta = dec.builder.meta_mut();
        meta.kind = kind;
        meta.start = SystemTime::UNIX_EPOCH + nanos(p.time_nanos);
        meta.duration = nanos(p.duration_nanos);
        meta.hostname = hostname;
        if period_in_ns && p.period > 0 {
            // Rounded: the period is 1e9 / Hz rounded down.
            let period = p.period.unsigned_abs();
            meta.frequency_hz = (1_000_000_000 + period / 2) / period;
        }
        Ok(dec)
    }

    fn string(&self, index: i64) -> Result<Arc<str>, ExportError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.strings.get(i))
            .cloned()
            .ok_or_else(|| invalid(format!("string index {index} out of range")))
    }

    /// The string at `index`, or `None` for the empty string.
    fn opt_string(&self, index: i64) -> Result<Option<Arc<str>>, ExportError> {
        Ok(Some(self.string(index)?).filter(|s| !s.is_empty()))
    }

    fn profile(mut self) -> Result<Profile, ExportError> {
        let p = self.p;
        let count_of = self.count_of()?;

        // Model mapping and frame kind per pprof mapping id.
        let mut mappings: HashMap<u64, (Option<MappingId>, FrameKind)> = HashMap::new();
        for m in &p.mapping {
            let path = self.string(m.filename)?;
            let build_id = self.opt_string(m.build_id)?;
            let kind = if &*path == KERNEL_MAPPING_PATH {
                FrameKind::Kernel
            } else {
                FrameKind::Native
            };
            let id = self
                .builder
                .intern_mapping(&crate::profile::Mapping { path, build_id });
            mappings.insert(m.id, (Some(id), kind));
        }
        let functions: HashMap<u64, &proto::Function> =
            p.function.iter().map(|f| (f.id, f)).collect();

        // Frames of each location, innermost first.
        let unknown: Arc<str> = Arc::from(UNKNOWN);
        let mut locations: HashMap<u64, Vec<FrameId>> = HashMap::new();
        for loc in &p.location {
            let (mapping, kind) = match loc.mapping_id {
                0 => (None, FrameKind::Native),
                id => *mappings.get(&id).ok_or_else(|| {
                    invalid(format!("location {} has unknown mapping {id}", loc.id))
                })?,
            };
            let mut frame = Frame {
                function: unknown.clone(),
                file: None,
                line: None,
                kind,
                mapping,
                address: loc.address,
                inlined: false,
            };
            let mut frames = Vec::with_capacity(loc.line.len().max(1));
            if loc.line.is_empty() {
                frames.push(self.builder.intern_frame(&frame));
            }
            for (i, line) in loc.line.iter().enumerate() {
                let f = functions.get(&line.function_id).ok_or_else(|| {
                    invalid(format!(
                        "location {} has unknown function {}",
                        loc.id, line.function_id
                    ))
                })?;
                frame.function = match self.opt_string(f.name)? {
                    Some(name) => name,
                    None => self
                        .opt_string(f.system_name)?
                        .unwrap_or_else(|| unknown.clone()),
                };
                frame.file = self.opt_string(f.filename)?;
                frame.line = u32::try_from(line.line).ok().filter(|&l| l > 0);
                frame.inlined = i + 1 < loc.line.len();
                frames.push(self.builder.intern_frame(&frame));
            }
            locations.insert(loc.id, frames);
        }

        let empty: Arc<str> = Arc::from("");
        let to_u32 =
            |n: i64| u32::try_from(n).map_err(|_| invalid(format!("pid or tid {n} out of range")));
        for s in &p.sample {
            let (mut pid, mut tid) = (0, 0);
            let (mut thread_name, mut process_name) = (empty.clone(), empty.clone());
            let mut off_cpu = None;
            let mut attributes = Vec::new();
            for label in &s.label {
                let key = self.string(label.key)?;
                match &*key {
                    PID => pid = to_u32(label.num)?,
                    TID => tid = to_u32(label.num)?,
                    THREAD_NAME => thread_name = self.string(label.str)?,
                    PROCESS_NAME => process_name = self.string(label.str)?,
                    OFF_CPU_REASON => off_cpu = OffCpuReason::parse(&self.string(label.str)?),
                    // Any other label describes the process (our files
                    // write its metadata this way).
                    _ if label.str != 0 => {
                        attributes.push((key, AttrValue::Str(self.string(label.str)?)))
                    }
                    _ => attributes.push((key, AttrValue::Int(label.num))),
                }
            }
            let process = self.builder.intern_process(&Process {
                pid,
                name: process_name,
                executable: None,
                metadata: Arc::new(ProcessMetadata::new(attributes)),
            });
            let mut frames = Vec::new();
            for id in &s.location_id {
                let loc = locations
                    .get(id)
                    .ok_or_else(|| invalid(format!("sample refers to unknown location {id}")))?;
                frames.extend_from_slice(loc);
            }
            self.builder.add_off_cpu_sample(
                process,
                tid,
                thread_name,
                frames,
                count_of(&s.value)?,
                0,
                off_cpu,
            );
        }
        Ok(self.builder.build())
    }

    /// How to get a sample count from a sample's values: the first value
    /// whose unit is `count`, else nanoseconds ÷ period, else the first.
    fn count_of(
        &self,
    ) -> Result<impl Fn(&[i64]) -> Result<u64, ExportError> + 'static, ExportError> {
        let p = self.p;
        let mut units = Vec::with_capacity(p.sample_type.len());
        for t in &p.sample_type {
            units.push(self.string(t.unit)?);
        }
        let count = units.iter().position(|u| &**u == "count");
        let nanos = units.iter().position(|u| &**u == "nanoseconds");
        let (index, divisor) = match (count, nanos) {
            (Some(i), _) => (i, 1),
            (None, Some(i)) if p.period > 0 => (i, p.period.unsigned_abs()),
            _ => (0, 1),
        };
        let expected = p.sample_type.len();
        Ok(move |values: &[i64]| {
            let value = values
                .get(index)
                .filter(|_| values.len() == expected)
                .ok_or_else(|| {
                    invalid(format!(
                        "sample has {} values for {expected} sample types",
                        values.len()
                    ))
                })?;
            u64::try_from(*value)
                .map(|v| v / divisor)
                .map_err(|_| invalid(format!("negative sample value {value}")))
        })
    }
}

fn nanos(n: i64) -> Duration {
    Duration::from_nanos(n.max(0).unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::{meta, native, sample_profile};
    use crate::profile::Mapping;

    #[test]
    fn off_cpu_profiles_keep_kind_settings_and_reasons() {
        let profile = crate::profile::tests::off_cpu_profile();
        let bytes = encode(&profile);
        let raw = gunzip(&bytes);
        let s = |i: i64| raw.string_table[i as usize].clone();
        let types: Vec<_> = raw
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(types, [("off_cpu".to_string(), "nanoseconds".to_string())]);
        assert!(raw.period_type.is_none());
        let back = decode(&bytes).unwrap();
        assert_eq!(back.meta.kind, profile.meta.kind);
        assert_eq!(back.total_count(), 9_000_000);
        let mut reasons: Vec<_> = back.samples.iter().map(|s| (s.tid, s.off_cpu)).collect();
        reasons.sort();
        assert_eq!(
            reasons,
            [
                (42, Some(crate::profile::OffCpuReason::Voluntary)),
                (43, Some(crate::profile::OffCpuReason::Involuntary))
            ]
        );
    }

    /// Everything a sample says, resolved through the tables.
    type Resolved = (
        u32,
        String,
        u32,
        String,
        Vec<(String, FrameKind, u64, bool)>,
        u64,
    );

    fn resolved(p: &Profile) -> Vec<Resolved> {
        let mut out: Vec<Resolved> = p
            .samples
            .iter()
            .map(|s| {
                let proc = p.process(s.process);
                let frames = s
                    .frames
                    .iter()
                    .rev()
                    .map(|&f| {
                        let f = p.frame(f);
                        (f.function.to_string(), f.kind, f.address, f.inlined)
                    })
                    .collect();
                (
                    proc.pid,
                    proc.name.to_string(),
                    s.tid,
                    s.thread_name.to_string(),
                    frames,
                    s.count,
                )
            })
            .collect();
        out.sort();
        out
    }

    fn assert_ids_in_range(p: &Profile) {
        for s in &p.samples {
            assert!((s.process as usize) < p.processes.len());
            assert!(s.frames.iter().all(|&f| (f as usize) < p.frames.len()));
        }
        for f in &p.frames {
            assert!(f.mapping.is_none_or(|m| (m as usize) < p.mappings.len()));
        }
    }

    fn gunzip(bytes: &[u8]) -> proto::Profile {
        let mut raw = Vec::new();
        GzDecoder::new(bytes).read_to_end(&mut raw).unwrap();
        proto::Profile::decode(&*raw).unwrap()
    }

    /// sample_profile plus a second process with the same name.
    fn two_process_profile() -> Profile {
        let mut b = ProfileBuilder::new(meta());
        b.merge(&sample_profile());
        let p = b.intern_process(&Process {
            pid: 7,
            name: "app".into(),
            executable: None,
            metadata: Default::default(),
        });
        let main = b.intern_frame(&native("main"));
        b.add_sample(p, 8, "app".into(), vec![main], 4);
        b.build()
    }

    #[test]
    fn process_metadata_round_trips_as_labels() {
        let metadata = Arc::new(ProcessMetadata::new([
            (Arc::from("container.id"), AttrValue::Str("c0ffee".into())),
            (Arc::from("k8s.pod.name"), AttrValue::Str("cart-x".into())),
            (Arc::from("process.parent_pid"), AttrValue::Int(1)),
            (Arc::from("region"), AttrValue::Str("eu-1".into())),
        ]));
        let mut b = ProfileBuilder::new(meta());
        let tagged = b.intern_process(&Process {
            metadata: metadata.clone(),
            ..Process::new(9, "cart", None)
        });
        let plain = b.intern_process(&Process::new(10, "other", None));
        let main = b.intern_frame(&native("main"));
        b.add_sample(tagged, 9, "cart".into(), vec![main], 3);
        b.add_sample(plain, 10, "other".into(), vec![main], 2);
        let original = b.build();
        let bytes = encode(&original);
        // The labels are there for other tools too.
        let raw = gunzip(&bytes);
        let s = |i: i64| raw.string_table[i as usize].as_str();
        let first: Vec<(&str, &str, i64)> = raw.sample[0]
            .label
            .iter()
            .map(|l| (s(l.key), s(l.str), l.num))
            .collect();
        assert!(first.contains(&("container.id", "c0ffee", 0)), "{first:?}");
        assert!(first.contains(&("process.parent_pid", "", 1)), "{first:?}");
        let decoded = decode(&bytes).unwrap();
        let by_pid = |pid: u32| decoded.processes.iter().find(|p| p.pid == pid).unwrap();
        assert_eq!(by_pid(9).metadata, metadata);
        assert!(by_pid(10).metadata.is_empty());
    }

    #[test]
    fn round_trip_preserves_stacks_counts_processes_and_meta() {
        let original = two_process_profile();
        let decoded = decode(&encode(&original)).unwrap();
        assert_ids_in_range(&decoded);
        assert_eq!(resolved(&decoded), resolved(&original));
        assert_eq!(decoded.processes.len(), 2);
        assert_eq!(decoded.meta, original.meta);
        // Mappings survive: the user frames keep their file and build ID,
        // the kernel frame gets the kernel's mapping.
        let mapping_of = |name: &str| {
            let f = decoded
                .frames
                .iter()
                .find(|f| &*f.function == name)
                .unwrap();
            decoded.mapping(f.mapping.unwrap()).clone()
        };
        assert_eq!(
            mapping_of("a"),
            Mapping {
                path: "/usr/bin/app".into(),
                build_id: Some("abcd".into())
            }
        );
        assert_eq!(&*mapping_of("do_syscall_64").path, KERNEL_MAPPING_PATH);
        // Re-encoding the decoded profile describes the same thing again.
        assert_eq!(
            resolved(&decode(&encode(&decoded)).unwrap()),
            resolved(&original)
        );
    }

    #[test]
    fn encoding_follows_profile_proto() {
        let profile = sample_profile();
        let p = gunzip(&encode(&profile));
        let s = |i: i64| p.string_table[usize::try_from(i).unwrap()].as_str();
        assert_eq!(s(0), "");
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        let period_type = p.period_type.unwrap();
        assert_eq!(
            (s(period_type.r#type), s(period_type.unit)),
            ("cpu", "nanoseconds")
        );
        assert_eq!(p.period, 1_000_000_000 / 99);
        assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(p.duration_nanos, 10_000_000_000);
        assert_eq!(
            p.comment.iter().map(|&c| s(c)).collect::<Vec<_>>(),
            ["host: testhost"]
        );

        let location_ids: Vec<u64> = p.location.iter().map(|l| l.id).collect();
        let mapping_ids: Vec<u64> = p.mapping.iter().map(|m| m.id).collect();
        let function_ids: Vec<u64> = p.function.iter().map(|f| f.id).collect();
        let mut total = 0;
        for sample in &p.sample {
            assert!(sample
                .location_id
                .iter()
                .all(|id| location_ids.contains(id)));
            assert_eq!(sample.value[1], sample.value[0] * p.period);
            total += sample.value[0];
            let labels: Vec<(&str, i64, &str)> = sample
                .label
                .iter()
                .map(|l| (s(l.key), l.num, s(l.str)))
                .collect();
            assert!(labels.contains(&("pid", 42, "")));
            assert!(labels.contains(&("process_name", 0, "app")));
            assert!(
                labels.iter().any(|l| l.0 == "tid") && labels.iter().any(|l| l.0 == "thread_name")
            );
        }
        assert_eq!(total, 10);
        for loc in &p.location {
            assert!(loc.mapping_id == 0 || mapping_ids.contains(&loc.mapping_id));
            assert!(loc
                .line
                .iter()
                .all(|l| function_ids.contains(&l.function_id)));
        }
        let mappings: Vec<(&str, &str, bool)> = p
            .mapping
            .iter()
            .map(|m| (s(m.filename), s(m.build_id), m.has_functions))
            .collect();
        assert_eq!(
            mappings,
            [
                ("/usr/bin/app", "abcd", true),
                ("[kernel.kallsyms]", "", true)
            ]
        );
        for f in &p.function {
            s(f.name);
            s(f.system_name);
            s(f.filename);
        }
    }

    #[test]
    fn inline_chains_share_a_location_innermost_first() {
        let mut b = ProfileBuilder::new(meta());
        let p = b.intern_process(&Process {
            pid: 1,
            name: "x".into(),
            executable: None,
            metadata: Default::default(),
        });
        let frame = |name: &str, inlined: bool, line: u32| Frame {
            file: Some("x.c".into()),
            line: Some(line),
            address: 0x40,
            inlined,
            ..native(name)
        };
        let inner = b.intern_frame(&frame("inner", true, 3));
        let middle = b.intern_frame(&frame("middle", true, 7));
        let outer = b.intern_frame(&frame("outer", false, 12));
        let main = b.intern_frame(&native("main"));
        b.add_sample(p, 1, "x".into(), vec![inner, middle, outer, main], 5);
        let original = b.build();

        let p = gunzip(&encode(&original));
        assert_eq!(p.location.len(), 2);
        let lines: Vec<i64> = p.location[0].line.iter().map(|l| l.line).collect();
        assert_eq!(lines, [3, 7, 12]);
        assert_eq!(p.location[0].address, 0x40);

        let decoded = decode(&encode(&original)).unwrap();
        assert_eq!(resolved(&decoded), resolved(&original));
        let f = decoded
            .frames
            .iter()
            .find(|f| &*f.function == "middle")
            .unwrap();
        assert_eq!((f.file.as_deref(), f.line), (Some("x.c"), Some(7)));
    }

    #[test]
    fn decode_accepts_uncompressed_protobuf() {
        let profile = sample_profile();
        let raw = to_proto(&profile).encode_to_vec();
        assert_eq!(resolved(&decode(&raw).unwrap()), resolved(&profile));
    }

    #[test]
    fn empty_profile_round_trips() {
        let empty = ProfileBuilder::new(meta()).build();
        let decoded = decode(&encode(&empty)).unwrap();
        assert!(decoded.samples.is_empty());
        assert_eq!(decoded.meta, empty.meta);
    }

    #[test]
    fn decode_reads_other_tools_conventions() {
        // Only cpu/nanoseconds values, a location without lines (not
        // symbolized), no labels.
        let strings = ["", "cpu", "nanoseconds", "/bin/x"];
        let p = proto::Profile {
            sample_type: vec![proto::ValueType { r#type: 1, unit: 2 }],
            sample: vec![proto::Sample {
                location_id: vec![9],
                value: vec![30_000_000],
                label: vec![],
            }],
            mapping: vec![proto::Mapping {
                id: 3,
                filename: 3,
                ..Default::default()
            }],
            location: vec![proto::Location {
                id: 9,
                mapping_id: 3,
                address: 0x1234,
                ..Default::default()
            }],
            string_table: strings.map(String::from).to_vec(),
            period_type: Some(proto::ValueType { r#type: 1, unit: 2 }),
            period: 10_000_000,
            ..Default::default()
        };
        let decoded = decode(&p.encode_to_vec()).unwrap();
        assert_ids_in_range(&decoded);
        assert_eq!(decoded.meta.frequency_hz, 100);
        assert_eq!(decoded.total_count(), 3);
        let frame = decoded.frame(decoded.samples[0].frames[0]);
        assert_eq!((&*frame.function, frame.address), (UNKNOWN, 0x1234));
        assert_eq!(&*decoded.mapping(frame.mapping.unwrap()).path, "/bin/x");
        assert_eq!(decoded.process(decoded.samples[0].process).pid, 0);
    }

    #[test]
    fn garbage_and_dangling_references_are_errors() {
        let good = to_proto(&sample_profile());
        let broken = |f: &dyn Fn(&mut proto::Profile)| {
            let mut p = good.clone();
            f(&mut p);
            p.encode_to_vec()
        };
        let encoded = encode(&sample_profile());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("text", b"not a profile".to_vec()),
            ("bad gzip", vec![0x1f, 0x8b, 1, 2, 3]),
            ("truncated gzip", encoded[..encoded.len() / 2].to_vec()),
            ("truncated protobuf", {
                let raw = good.encode_to_vec();
                raw[..raw.len() - 1].to_vec()
            }),
            (
                "unknown location",
                broken(&|p| p.sample[0].location_id.push(99)),
            ),
            (
                "unknown mapping",
                broken(&|p| p.location[0].mapping_id = 99),
            ),
            (
                "unknown function",
                broken(&|p| p.location[0].line[0].function_id = 99),
            ),
            ("string index", broken(&|p| p.function[0].name = 1000)),
            (
                "negative string index",
                broken(&|p| p.sample[0].label[0].key = -1),
            ),
            ("negative value", broken(&|p| p.sample[0].value[0] = -5)),
            (
                "missing value",
                broken(&|p| {
                    p.sample[0].value.pop();
                }),
            ),
            (
                "pid out of range",
                broken(&|p| p.sample[0].label[0].num = -1),
            ),
        ];
        for (what, bytes) in cases {
            match decode(&bytes) {
                Err(e @ ExportError::Decode { .. }) => eprintln!("{what}: {e}"),
                other => panic!("{what}: expected a decode error, got {other:?}"),
            }
        }
    }
}
