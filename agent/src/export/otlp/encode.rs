//! One drained window ([`Profile`]) as OpenTelemetry profiles export
//! requests (`opentelemetry.proto.profiles.v1development`, as shipped by
//! opentelemetry-proto 0.33).
//!
//! Layout of a request:
//!
//! * one [`ProfilesDictionary`] shared by everything in the request: every
//!   table starts with its zero value (so index 0 means "none"), entries are
//!   deduplicated by value and only what the request refers to is in it;
//! * one `ResourceProfiles` per process, its resource built by [`resource`]
//!   (`host.name`, `process.pid`, `process.executable.name`,
//!   `process.executable.path`, `service.name`, and every attribute of the
//!   process's metadata: container, Kubernetes, service, tags; see
//!   [`crate::metadata`]), with one `ScopeProfiles`
//!   (scope `hearth`, the crate version) holding one `Profile`;
//! * a Profile has sample type `samples`/`count`, period type
//!   `cpu`/`nanoseconds` and the sampling period (on-CPU), or sample type
//!   `off_cpu`/`nanoseconds` or `wall`/`nanoseconds` without a period
//!   (off-CPU and wall-clock time), and covers the window
//!   (`time_unix_nano`, `duration_nano`);
//! * a Sample is one aggregated observation: `values = [count]` and
//!   `timestamps_unix_nano = [when the stack was last seen]` (the window's
//!   last nanosecond when unknown), clamped into the profile's time range,
//!   with `thread.id` and `thread.name` attributes, and for off-CPU time
//!   `hearth.off_cpu.reason` (`voluntary` or `involuntary`);
//! * a Location is a machine address of a stack: a frame plus the frames
//!   inlined into it (one Line each, innermost first, the caller last),
//!   tagged with `profile.frame.type` (`native` or `kernel`); its Mapping
//!   names the file and carries its GNU build ID as
//!   `process.executable.build_id.gnu`, the key the profiles spec requires
//!   on mappings (`htlhash` needs the file's bytes, which the model does not
//!   keep). User addresses are file offsets, so mappings have start,
//!   limit and offset 0 and `address - memory_start + file_offset` is still
//!   the file offset. Kernel frames without a mapping get `[kernel.kallsyms]`,
//!   as in the pprof writer.
//!
//! Collectors cap message sizes (gRPC's default is 4 MiB), so a window is cut
//! into requests of at most [`EncodeOptions::max_request_bytes`]: processes are
//! packed whole while they fit, a process that fits no request alone is
//! split between samples, and a single sample larger than the limit travels
//! alone rather than being dropped. Sizes are tracked exactly as entries are
//! added (protobuf lengths are additive), so nothing is encoded twice to
//! measure it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile as OtlpProfile,
    ProfilesDictionary, ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::encoding::encoded_len_varint;
use prost::Message;

use crate::profile::{
    AttrValue as ModelAttrValue, Frame, FrameId, FrameKind, Process, ProcessId, Profile,
    ProfileMeta, Sample as ModelSample, SampleKind,
};
use crate::symbolize::KERNEL_MAPPING_PATH;

/// Resource attribute: the host's name.
pub const HOST_NAME: &str = "host.name";
/// Resource attribute: the profiled process's id (int).
pub const PROCESS_PID: &str = "process.pid";
/// Resource attribute: file name of the process's executable.
pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
/// Resource attribute: full path of the process's executable.
pub const PROCESS_EXECUTABLE_PATH: &str = "process.executable.path";
/// Resource attribute: the logical service (the process's metadata says
/// which; else the executable's name).
pub const SERVICE_NAME: &str = "service.name";
/// Sample attribute: the thread id (int).
pub const THREAD_ID: &str = "thread.id";
/// Sample attribute: the thread's name (comm).
pub const THREAD_NAME: &str = "thread.name";
/// Sample attribute of off-CPU and wall-clock samples: `voluntary` (a
/// wait) or `involuntary` (preempted while runnable).
pub const OFF_CPU_REASON: &str = "hearth.off_cpu.reason";
/// Location attribute: `native` or `kernel`.
pub const FRAME_TYPE: &str = "profile.frame.type";
/// Mapping attribute: the file's GNU build ID, lower-case hex.
pub const BUILD_ID_GNU: &str = "process.executable.build_id.gnu";
/// Instrumentation scope name of every profile hearth sends.
pub const SCOPE_NAME: &str = "hearth";
/// `service.name` when not even an executable name is known (the
/// semantic conventions' default).
const UNKNOWN_SERVICE: &str = "unknown_service";

/// How requests are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Upper bound of one encoded request; only a single sample larger than
    /// this is sent anyway (alone).
    pub max_request_bytes: usize,
}

impl Default for EncodeOptions {
    /// 4 MiB, gRPC's default maximum receive size (and the collector's).
    fn default() -> Self {
        Self {
            max_request_bytes: 4 << 20,
        }
    }
}

/// One drained window → one or more export requests, each at most
/// `opts.max_request_bytes` encoded (unless one sample alone is bigger).
/// Every sample is in exactly one request; processes without samples get
/// no resource, so an empty profile gives no request at all.
pub fn encode_window(profile: &Profile, opts: &EncodeOptions) -> Vec<ExportProfilesServiceRequest> {
    let limit = opts.max_request_bytes;
    let mut by_process: Vec<Vec<&ModelSample>> = vec![Vec::new(); profile.processes.len()];
    for sample in &profile.samples {
        by_process[sample.process as usize].push(sample);
    }
    let mut out = Vec::new();
    let mut batch = Batch::new(profile);
    for (process, samples) in by_process.iter().enumerate() {
        let process = process as ProcessId;
        batch.close_resource();
        let process_start = batch.checkpoint();
        // Whether other processes already fill part of the request: then a
        // process that overflows it moves whole to the next one instead of
        // being split.
        let mut shared = !batch.is_empty();
        let mut i = 0;
        while i < samples.len() {
            let before = batch.checkpoint();
            batch.add_sample(process, samples[i]);
            if batch.encoded_len() <= limit {
                i += 1;
                continue;
            }
            let full = std::mem::replace(&mut batch, Batch::new(profile));
            if shared {
                out.push(full.rollback_and_finish(&process_start));
                shared = false;
                i = 0;
            } else if full.samples > 1 {
                // Retry this sample in the fresh request.
                out.push(full.rollback_and_finish(&before));
            } else {
                // This sample alone is over the limit: send it by itself.
                out.push(full.finish());
                i += 1;
            }
        }
    }
    if !batch.is_empty() {
        out.push(batch.finish());
    }
    out
}

/// The resource describing `process` on the host of `meta`. Everything that
/// identifies where samples come from goes here, so container or
/// Kubernetes attributes can be added in one place.
pub fn resource(meta: &ProfileMeta, process: &Process) -> Resource {
    Resource {
        attributes: resource_attributes(meta, process),
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    }
}

fn resource_attributes(meta: &ProfileMeta, process: &Process) -> Vec<KeyValue> {
    let exe_name = executable_name(process);
    let mut attributes = Vec::with_capacity(5 + process.metadata.len());
    if !meta.hostname.is_empty() {
        attributes.push(key_value(HOST_NAME, string_value(&meta.hostname)));
    }
    attributes.push(key_value(PROCESS_PID, int_value(process.pid.into())));
    if !exe_name.is_empty() {
        attributes.push(key_value(PROCESS_EXECUTABLE_NAME, string_value(exe_name)));
    }
    if let Some(path) = process.executable.as_deref().filter(|p| !p.is_empty()) {
        attributes.push(key_value(PROCESS_EXECUTABLE_PATH, string_value(path)));
    }
    // The metadata's service.name (environment, pod, tags) when it has
    // one; else the executable.
    if process.metadata.get_str(SERVICE_NAME).is_none() {
        let service = if exe_name.is_empty() {
            UNKNOWN_SERVICE
        } else {
            exe_name
        };
        attributes.push(key_value(SERVICE_NAME, string_value(service)));
    }
    for (key, value) in process.metadata.iter() {
        // The ones above are the model's own fields.
        if matches!(
            key,
            HOST_NAME | PROCESS_PID | PROCESS_EXECUTABLE_NAME | PROCESS_EXECUTABLE_PATH
        ) {
            continue;
        }
        let value = match value {
            ModelAttrValue::Str(s) => string_value(s),
            ModelAttrValue::Int(n) => int_value(*n),
        };
        attributes.push(key_value(key, value));
    }
    attributes
}

/// The executable's file name, or the process name when the executable is
/// unknown (kernel threads, processes that exited before being looked at).
fn executable_name(process: &Process) -> &str {
    process
        .executable
        .as_deref()
        .and_then(|exe| Path::new(exe).file_name())
        .and_then(|name| name.to_str())
        .filter(|name| !name.is_empty())
        .unwrap_or(&process.name)
}

fn key_value(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
        key_strindex: 0,
    }
}

fn string_value(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    }
}

fn int_value(n: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(n)),
    }
}

/// A 16-byte profile id: the window's start, the pid and a per-run counter
/// mixed with a per-run random salt, so two agents starting at once on
/// different hosts do not produce the same ids.
fn profile_id(start_unix_ns: u64, pid: u32) -> Vec<u8> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SALT: OnceLock<u32> = OnceLock::new();
    // RandomState is seeded from the OS, which is all the randomness
    // needed here without a new dependency.
    let salt = *SALT.get_or_init(|| RandomState::new().hash_one(std::process::id()) as u32);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) ^ salt;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&start_unix_ns.to_be_bytes());
    id[8..12].copy_from_slice(&pid.to_be_bytes());
    id[12..].copy_from_slice(&n.to_be_bytes());
    // An all-zero id means "invalid" in the spec.
    if id == [0; 16] {
        id[15] = 1;
    }
    id.to_vec()
}

/// The window's time range in the units the profile uses.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: u64,
    duration: u64,
    period: i64,
}

impl Window {
    fn new(meta: &ProfileMeta) -> Window {
        Window {
            start: meta
                .start
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| saturate(d.as_nanos())),
            duration: saturate(meta.duration.as_nanos()),
            period: saturate(meta.period_ns()),
        }
    }

    /// The sample's time, inside `[start, start + duration)` as the spec
    /// asks; a zero-length window has only `start` to offer.
    fn timestamp(&self, last_seen_unix_ns: u64) -> u64 {
        let end = self.start.saturating_add(self.duration);
        if end <= self.start {
            return self.start;
        }
        let t = if last_seen_unix_ns == 0 {
            end - 1
        } else {
            last_seen_unix_ns
        };
        t.clamp(self.start, end - 1)
    }
}

/// Unsigned model quantities into the proto's signed or narrower fields,
/// clamped instead of wrapped.
fn saturate<T: TryFrom<U> + Bounded, U>(n: U) -> T {
    T::try_from(n).unwrap_or(T::MAX)
}

trait Bounded {
    const MAX: Self;
}

impl Bounded for i64 {
    const MAX: i64 = i64::MAX;
}

impl Bounded for u64 {
    const MAX: u64 = u64::MAX;
}

/// Bytes a length-delimited field (message, string) of `len` bytes adds to
/// its parent. Every field used here has a number below 16, so its key is
/// one byte.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A dictionary index for the next entry of a table of `len` entries.
fn next_index(len: usize) -> i32 {
    // Each entry takes at least two bytes, so a table this long would need
    // a 4 GiB request; no profile gets there.
    i32::try_from(len).expect("a dictionary table outgrew i32 indices")
}

/// Appends `entry` to `table`, accounting for its encoded size.
fn push_entry<T: Message>(table: &mut Vec<T>, dict_len: &mut usize, entry: T) -> i32 {
    let index = next_index(table.len());
    *dict_len += field_len(entry.encoded_len());
    table.push(entry);
    index
}

/// An attribute value as the dictionary deduplicates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AttrValue<'a> {
    Int(i64),
    Str(&'a str),
}

/// The process whose samples are being added, kept as separate messages
/// so its encoded size can be computed from the sizes of its parts.
struct OpenResource {
    process: ProcessId,
    /// Without scope profiles.
    resource: ResourceProfiles,
    /// Without profiles.
    scope: ScopeProfiles,
    profile: OtlpProfile,
    resource_len: usize,
    scope_len: usize,
    /// Of `profile` without samples.
    profile_len: usize,
    samples_len: usize,
}

impl OpenResource {
    /// Bytes this resource adds to the request.
    fn field_len(&self) -> usize {
        let profile = self.profile_len + self.samples_len;
        let scope = self.scope_len + field_len(profile);
        field_len(self.resource_len + field_len(scope))
    }

    fn into_message(self) -> ResourceProfiles {
        let mut scope = self.scope;
        scope.profiles.push(self.profile);
        let mut resource = self.resource;
        resource.scope_profiles.push(scope);
        resource
    }
}

/// The state of a [`Batch`] to return to when the last additions made it
/// too big.
struct Checkpoint {
    /// Lengths of the mapping, location, function, string, attribute and
    /// stack tables.
    tables: [usize; 6],
    dict_len: usize,
    /// Sample count and their size in the open resource; `None` when no
    /// resource was open.
    open: Option<(usize, usize)>,
    samples: usize,
}

/// One request under construction: its dictionary with lookup maps and
/// its resources, with the encoded size kept up to date.
struct Batch<'a> {
    profile: &'a Profile,
    window: Window,
    dict: ProfilesDictionary,
    /// Encoded size of `dict`.
    dict_len: usize,
    strings: HashMap<&'a str, i32>,
    attributes: HashMap<(i32, AttrValue<'a>), i32>,
    mappings: HashMap<(&'a str, Option<&'a str>), i32>,
    functions: HashMap<(&'a str, Option<&'a str>), i32>,
    /// Location of an inline chain of model frames: the fast path.
    chains: HashMap<&'a [FrameId], i32>,
    /// Location by encoded value: different chains can encode the same
    /// location (inlined frames' own addresses are not part of it), and the
    /// table must not hold duplicates.
    locations: HashMap<Vec<u8>, i32>,
    /// Stack of a model sample's frames: the fast path.
    sample_stacks: HashMap<&'a [FrameId], i32>,
    stacks: HashMap<Vec<i32>, i32>,
    closed: Vec<ResourceProfiles>,
    /// Encoded size of `closed` as request fields.
    closed_len: usize,
    open: Option<OpenResource>,
    samples: usize,
}

impl<'a> Batch<'a> {
    fn new(profile: &'a Profile) -> Batch<'a> {
        let mut batch = Batch {
            profile,
            window: Window::new(&profile.meta),
            dict: ProfilesDictionary::default(),
            dict_len: 0,
            strings: HashMap::new(),
            attributes: HashMap::new(),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            chains: HashMap::new(),
            locations: HashMap::new(),
            sample_stacks: HashMap::new(),
            stacks: HashMap::new(),
            closed: Vec::new(),
            closed_len: 0,
            open: None,
            samples: 0,
        };
        // Every table's index 0 is its zero value.
        let d = &mut batch.dict;
        let len = &mut batch.dict_len;
        push_entry(&mut d.mapping_table, len, Mapping::default());
        push_entry(&mut d.location_table, len, Location::default());
        push_entry(&mut d.function_table, len, Function::default());
        push_entry(&mut d.link_table, len, Link::default());
        push_entry(&mut d.attribute_table, len, KeyValueAndUnit::default());
        push_entry(&mut d.stack_table, len, Stack::default());
        d.string_table.push(String::new());
        *len += field_len(0);
        batch
    }

    fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Exact encoded size of the request [`finish`](Self::finish) would
    /// return now.
    fn encoded_len(&self) -> usize {
        field_len(self.dict_len)
            + self.closed_len
            + self.open.as_ref().map_or(0, OpenResource::field_len)
    }

    fn checkpoint(&self) -> Checkpoint {
        let d = &self.dict;
        Checkpoint {
            tables: [
                d.mapping_table.len(),
                d.location_table.len(),
                d.function_table.len(),
                d.string_table.len(),
                d.attribute_table.len(),
                d.stack_table.len(),
            ],
            dict_len: self.dict_len,
            open: self
                .open
                .as_ref()
                .map(|o| (o.profile.samples.len(), o.samples_len)),
            samples: self.samples,
        }
    }

    /// The request as it was at `checkpoint`. Entries added since are all
    /// at the ends of the tables and nothing older refers to them, so
    /// truncating restores the dictionary exactly. The lookup maps would be
    /// stale afterwards, which is why this consumes the batch.
    fn rollback_and_finish(mut self, checkpoint: &Checkpoint) -> ExportProfilesServiceRequest {
        let d = &mut self.dict;
        let [mappings, locations, functions, strings, attributes, stacks] = checkpoint.tables;
        d.mapping_table.truncate(mappings);
        d.location_table.truncate(locations);
        d.function_table.truncate(functions);
        d.string_table.truncate(strings);
        d.attribute_table.truncate(attributes);
        d.stack_table.truncate(stacks);
        self.dict_len = checkpoint.dict_len;
        match (checkpoint.open, self.open.as_mut()) {
            (Some((samples, samples_len)), Some(open)) => {
                open.profile.samples.truncate(samples);
                open.samples_len = samples_len;
            }
            _ => self.open = None,
        }
        self.samples = checkpoint.samples;
        self.finish()
    }

    fn finish(mut self) -> ExportProfilesServiceRequest {
        self.close_resource();
        let estimate = self.encoded_len();
        let request = ExportProfilesServiceRequest {
            resource_profiles: self.closed,
            dictionary: Some(self.dict),
        };
        debug_assert_eq!(request.encoded_len(), estimate, "size bookkeeping is off");
        request
    }

    fn close_resource(&mut self) {
        if let Some(open) = self.open.take() {
            self.closed_len += open.field_len();
            self.closed.push(open.into_message());
        }
    }

    fn open_resource(&mut self, process: ProcessId) {
        let meta = &self.profile.meta;
        let p = self.profile.process(process);
        // On-CPU values are sample counts, each one period of CPU time;
        // off-CPU and wall-clock values are nanoseconds and have no period.
        let (sample_type, period_type, period) = match meta.kind {
            SampleKind::OnCpu => (
                ("samples", "count"),
                Some(("cpu", "nanoseconds")),
                self.window.period,
            ),
            SampleKind::OffCpu(_) => (("off_cpu", "nanoseconds"), None, 0),
            SampleKind::Wall(_) => (("wall", "nanoseconds"), None, 0),
        };
        let sample_type = ValueType {
            type_strindex: self.string(sample_type.0),
            unit_strindex: self.string(sample_type.1),
        };
        let period_type = period_type.map(|(kind, unit)| ValueType {
            type_strindex: self.string(kind),
            unit_strindex: self.string(unit),
        });
        let profile = OtlpProfile {
            sample_type: Some(sample_type),
            samples: Vec::new(),
            time_unix_nano: self.window.start,
            duration_nano: self.window.duration,
            period_type,
            period,
            profile_id: profile_id(self.window.start, p.pid),
            dropped_attributes_count: 0,
            original_payload_format: String::new(),
            original_payload: Vec::new(),
            attribute_indices: Vec::new(),
        };
        let scope = ScopeProfiles {
            scope: Some(InstrumentationScope {
                name: SCOPE_NAME.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                attributes: Vec::new(),
                dropped_attributes_count: 0,
            }),
            profiles: Vec::new(),
            schema_url: String::new(),
        };
        let resource = ResourceProfiles {
            resource: Some(resource(meta, p)),
            scope_profiles: Vec::new(),
            schema_url: String::new(),
        };
        self.open = Some(OpenResource {
            process,
            resource_len: resource.encoded_len(),
            scope_len: scope.encoded_len(),
            profile_len: profile.encoded_len(),
            resource,
            scope,
            profile,
            samples_len: 0,
        });
    }

    fn add_sample(&mut self, process: ProcessId, sample: &'a ModelSample) {
        if self.open.as_ref().map(|o| o.process) != Some(process) {
            self.close_resource();
            self.open_resource(process);
        }
        let stack_index = self.stack(&sample.frames);
        let mut attribute_indices = vec![
            self.attribute(THREAD_ID, AttrValue::Int(sample.tid.into())),
            self.attribute(THREAD_NAME, AttrValue::Str(&sample.thread_name)),
        ];
        if let Some(reason) = sample.off_cpu {
            attribute_indices.push(self.attribute(OFF_CPU_REASON, AttrValue::Str(reason.as_str())));
        }
        let message = Sample {
            stack_index,
            attribute_indices,
            link_index: 0,
            values: vec![saturate(sample.count)],
            timestamps_unix_nano: vec![self.window.timestamp(sample.last_seen_unix_ns)],
        };
        let Some(open) = self.open.as_mut() else {
            unreachable!("a resource was opened above");
        };
        open.samples_len += field_len(message.encoded_len());
        open.profile.samples.push(message);
        self.samples += 1;
    }

    fn string(&mut self, s: &'a str) -> i32 {
        if s.is_empty() {
            return 0;
        }
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = next_index(self.dict.string_table.len());
        self.dict_len += field_len(s.len());
        self.dict.string_table.push(s.to_owned());
        self.strings.insert(s, i);
        i
    }

    fn attribute(&mut self, key: &'a str, value: AttrValue<'a>) -> i32 {
        let key = self.string(key);
        if let Some(&i) = self.attributes.get(&(key, value)) {
            return i;
        }
        let any = match value {
            AttrValue::Int(n) => int_value(n),
            AttrValue::Str(s) => string_value(s),
        };
        let entry = KeyValueAndUnit {
            key_strindex: key,
            value: Some(any),
            unit_strindex: 0,
        };
        let i = push_entry(&mut self.dict.attribute_table, &mut self.dict_len, entry);
        self.attributes.insert((key, value), i);
        i
    }

    /// The mapping of `frame`'s code; 0 for user frames whose file is
    /// unknown.
    fn mapping(&mut self, frame: &'a Frame) -> i32 {
        let profile = self.profile;
        let key = match (frame.mapping.map(|m| profile.mapping(m)), frame.kind) {
            (Some(m), _) => (&*m.path, m.build_id.as_deref()),
            (None, FrameKind::Kernel) => (KERNEL_MAPPING_PATH, None),
            (None, FrameKind::Native) => return 0,
        };
        if let Some(&i) = self.mappings.get(&key) {
            return i;
        }
        let filename_strindex = self.string(key.0);
        let attribute_indices = match key.1.filter(|b| !b.is_empty()) {
            Some(build_id) => vec![self.attribute(BUILD_ID_GNU, AttrValue::Str(build_id))],
            None => Vec::new(),
        };
        let entry = Mapping {
            memory_start: 0,
            memory_limit: 0,
            file_offset: 0,
            filename_strindex,
            attribute_indices,
        };
        // A nameless mapping without a build ID is the zero value itself.
        let i = if entry == Mapping::default() {
            0
        } else {
            push_entry(&mut self.dict.mapping_table, &mut self.dict_len, entry)
        };
        self.mappings.insert(key, i);
        i
    }

    fn function(&mut self, frame: &'a Frame) -> i32 {
        let key = (&*frame.function, frame.file.as_deref());
        if let Some(&i) = self.functions.get(&key) {
            return i;
        }
        let name = self.string(key.0);
        let entry = Function {
            name_strindex: name,
            // Names are demangled before they reach the model; the
            // mangled form is gone.
            system_name_strindex: name,
            filename_strindex: key.1.map_or(0, |f| self.string(f)),
            start_line: 0,
        };
        let i = if entry == Function::default() {
            0
        } else {
            push_entry(&mut self.dict.function_table, &mut self.dict_len, entry)
        };
        self.functions.insert(key, i);
        i
    }

    /// The location of an inline chain: frames innermost first, the last
    /// one the real (not inlined) frame whose address and mapping count.
    fn location(&mut self, chain: &'a [FrameId]) -> i32 {
        if let Some(&i) = self.chains.get(chain) {
            return i;
        }
        let profile = self.profile;
        let Some(&outer) = chain.last() else {
            return 0;
        };
        let outer = profile.frame(outer);
        let mapping_index = self.mapping(outer);
        let mut lines = Vec::with_capacity(chain.len());
        for &f in chain {
            let frame = profile.frame(f);
            lines.push(Line {
                function_index: self.function(frame),
                line: frame.line.map_or(0, i64::from),
                column: 0,
            });
        }
        let attribute_indices =
            vec![self.attribute(FRAME_TYPE, AttrValue::Str(outer.kind.as_str()))];
        let entry = Location {
            mapping_index,
            address: outer.address,
            lines,
            attribute_indices,
        };
        let value = entry.encode_to_vec();
        let i = match self.locations.get(&value) {
            Some(&i) => i,
            None => {
                let i = push_entry(&mut self.dict.location_table, &mut self.dict_len, entry);
                self.locations.insert(value, i);
                i
            }
        };
        self.chains.insert(chain, i);
        i
    }

    /// The stack of a sample's frames (leaf first), one location per
    /// address; an empty stack is the zero value at index 0.
    fn stack(&mut self, frames: &'a [FrameId]) -> i32 {
        if let Some(&i) = self.sample_stacks.get(frames) {
            return i;
        }
        let profile = self.profile;
        // A frame and the frames inlined into it end at the first frame
        // that is not itself inlined.
        let location_indices: Vec<i32> = frames
            .split_inclusive(|&f| !profile.frame(f).inlined)
            .map(|chain| self.location(chain))
            .collect();
        let i = if location_indices.is_empty() {
            0
        } else if let Some(&i) = self.stacks.get(&location_indices) {
            i
        } else {
            let entry = Stack {
                location_indices: location_indices.clone(),
            };
            let i = push_entry(&mut self.dict.stack_table, &mut self.dict_len, entry);
            self.stacks.insert(location_indices, i);
            i
        };
        self.sample_stacks.insert(frames, i);
        i
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::profile::tests::{meta, native, sample_profile};
    use crate::profile::{Mapping as ModelMapping, ProfileBuilder};

    fn encode_one(profile: &Profile) -> ExportProfilesServiceRequest {
        let mut requests = encode_window(profile, &EncodeOptions::default());
        assert_eq!(requests.len(), 1);
        requests.pop().unwrap()
    }

    fn dict(req: &ExportProfilesServiceRequest) -> &ProfilesDictionary {
        req.dictionary.as_ref().unwrap()
    }

    fn s(req: &ExportProfilesServiceRequest, i: i32) -> &str {
        &dict(req).string_table[i as usize]
    }

    fn render(req: &ExportProfilesServiceRequest, value: &Option<AnyValue>) -> String {
        match value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::IntValue(n)) => n.to_string(),
            Some(any_value::Value::StringValueStrindex(i)) => s(req, *i).to_owned(),
            other => panic!("unexpected value {other:?}"),
        }
    }

    fn attrs(req: &ExportProfilesServiceRequest, indices: &[i32]) -> HashMap<String, String> {
        indices
            .iter()
            .map(|&i| {
                let kv = &dict(req).attribute_table[i as usize];
                (s(req, kv.key_strindex).to_owned(), render(req, &kv.value))
            })
            .collect()
    }

    fn resource_attrs(rp: &ResourceProfiles) -> HashMap<String, String> {
        rp.resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    Some(any_value::Value::IntValue(n)) => n.to_string(),
                    other => panic!("unexpected value {other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect()
    }

    /// Function names of a sample, root first.
    fn names(req: &ExportProfilesServiceRequest, sample: &Sample) -> Vec<String> {
        let d = dict(req);
        let mut names: Vec<String> = d.stack_table[sample.stack_index as usize]
            .location_indices
            .iter()
            .flat_map(|&l| &d.location_table[l as usize].lines)
            .map(|line| {
                let f = &d.function_table[line.function_index as usize];
                s(req, f.name_strindex).to_owned()
            })
            .collect();
        names.reverse();
        names
    }

    /// The dictionary rules of the spec: zero values first, references in
    /// range, no duplicates, no orphans.
    fn check_dictionary(req: &ExportProfilesServiceRequest) {
        let d = dict(req);
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], Mapping::default());
        assert_eq!(d.location_table[0], Location::default());
        assert_eq!(d.function_table[0], Function::default());
        assert_eq!(d.link_table, [Link::default()]);
        assert_eq!(d.attribute_table[0], KeyValueAndUnit::default());
        assert_eq!(d.stack_table[0], Stack::default());

        fn unique<T: Message>(table: &[T], what: &str) {
            let mut seen = HashSet::new();
            for entry in table {
                assert!(seen.insert(entry.encode_to_vec()), "duplicate {what}");
            }
        }
        unique(&d.mapping_table, "mapping");
        unique(&d.location_table, "location");
        unique(&d.function_table, "function");
        unique(&d.attribute_table, "attribute");
        unique(&d.stack_table, "stack");
        let strings: HashSet<&String> = d.string_table.iter().collect();
        assert_eq!(strings.len(), d.string_table.len(), "duplicate string");

        #[derive(Default)]
        struct Used {
            strings: HashSet<i32>,
            attributes: HashSet<i32>,
            mappings: HashSet<i32>,
            locations: HashSet<i32>,
            functions: HashSet<i32>,
            stacks: HashSet<i32>,
        }
        fn mark(set: &mut HashSet<i32>, i: i32, len: usize, what: &str) {
            assert!(i >= 0 && (i as usize) < len, "{what} index {i} of {len}");
            set.insert(i);
        }
        let mut used = Used::default();
        let n_str = d.string_table.len();
        for rp in &req.resource_profiles {
            for sp in &rp.scope_profiles {
                for p in &sp.profiles {
                    for vt in p.sample_type.iter().chain(&p.period_type) {
                        mark(&mut used.strings, vt.type_strindex, n_str, "string");
                        mark(&mut used.strings, vt.unit_strindex, n_str, "string");
                    }
                    for sample in &p.samples {
                        mark(
                            &mut used.stacks,
                            sample.stack_index,
                            d.stack_table.len(),
                            "stack",
                        );
                        for &a in &sample.attribute_indices {
                            mark(&mut used.attributes, a, d.attribute_table.len(), "attr");
                        }
                        assert_eq!(sample.link_index, 0);
                    }
                }
            }
        }
        for stack in &d.stack_table {
            for &l in &stack.location_indices {
                mark(&mut used.locations, l, d.location_table.len(), "location");
            }
        }
        for loc in &d.location_table {
            mark(
                &mut used.mappings,
                loc.mapping_index,
                d.mapping_table.len(),
                "mapping",
            );
            for line in &loc.lines {
                mark(
                    &mut used.functions,
                    line.function_index,
                    d.function_table.len(),
                    "function",
                );
            }
            for &a in &loc.attribute_indices {
                mark(&mut used.attributes, a, d.attribute_table.len(), "attr");
            }
        }
        for m in &d.mapping_table {
            mark(&mut used.strings, m.filename_strindex, n_str, "string");
            for &a in &m.attribute_indices {
                mark(&mut used.attributes, a, d.attribute_table.len(), "attr");
            }
        }
        for f in &d.function_table {
            for i in [f.name_strindex, f.system_name_strindex, f.filename_strindex] {
                mark(&mut used.strings, i, n_str, "string");
            }
        }
        for a in &d.attribute_table {
            mark(&mut used.strings, a.key_strindex, n_str, "string");
            mark(&mut used.strings, a.unit_strindex, n_str, "string");
        }
        // Index 0 is always present; everything else must be referenced.
        for (set, len, what) in [
            (&used.strings, n_str, "string"),
            (&used.attributes, d.attribute_table.len(), "attribute"),
            (&used.mappings, d.mapping_table.len(), "mapping"),
            (&used.locations, d.location_table.len(), "location"),
            (&used.functions, d.function_table.len(), "function"),
            (&used.stacks, d.stack_table.len(), "stack"),
        ] {
            for i in 1..len {
                assert!(set.contains(&(i as i32)), "orphan {what} {i}");
            }
        }
    }

    fn all_samples(
        req: &ExportProfilesServiceRequest,
    ) -> impl Iterator<Item = (&ResourceProfiles, &OtlpProfile, &Sample)> {
        req.resource_profiles.iter().flat_map(|rp| {
            rp.scope_profiles.iter().flat_map(move |sp| {
                sp.profiles
                    .iter()
                    .flat_map(move |p| p.samples.iter().map(move |s| (rp, p, s)))
            })
        })
    }

    /// Many processes with many distinct stacks over shared functions.
    fn big_profile(processes: u32, stacks: u32) -> Profile {
        let mut b = ProfileBuilder::new(meta());
        let lib = b.intern_mapping(&ModelMapping {
            path: "/usr/lib/libc.so.6".into(),
            build_id: Some("0123456789abcdef".into()),
        });
        for pid in 0..processes {
            let p = b.intern_process(&Process {
                pid: 1000 + pid,
                name: format!("proc{pid}").into(),
                executable: Some(format!("/opt/bin/proc{pid}").into()),
                metadata: Default::default(),
            });
            for k in 0..stacks {
                let frames = (0..(3 + k % 5))
                    .map(|d| {
                        b.intern_frame(&Frame {
                            mapping: Some(lib),
                            address: u64::from(d * 16 + k % 7),
                            ..native(&format!("fn_{d}_{}", k % 11))
                        })
                    })
                    .collect();
                b.add_sample_seen(
                    p,
                    1000 + pid + k % 3,
                    format!("t{}", k % 3).into(),
                    frames,
                    u64::from(k + 1),
                    0,
                );
            }
        }
        b.build()
    }

    /// (pid, tid, thread name, stack root first, count) of every sample.
    fn model_samples(profile: &Profile) -> Vec<(String, String, String, Vec<String>, i64)> {
        let mut v: Vec<_> = profile
            .samples
            .iter()
            .map(|s| {
                (
                    profile.process(s.process).pid.to_string(),
                    s.tid.to_string(),
                    s.thread_name.to_string(),
                    profile.stack_names(s).map(String::from).collect(),
                    s.count as i64,
                )
            })
            .collect();
        v.sort();
        v
    }

    fn encoded_samples(
        requests: &[ExportProfilesServiceRequest],
    ) -> Vec<(String, String, String, Vec<String>, i64)> {
        let mut v: Vec<_> = requests
            .iter()
            .flat_map(|req| {
                all_samples(req).map(move |(rp, _, sample)| {
                    let a = attrs(req, &sample.attribute_indices);
                    (
                        resource_attrs(rp)[PROCESS_PID].clone(),
                        a[THREAD_ID].clone(),
                        a[THREAD_NAME].clone(),
                        names(req, sample),
                        sample.values[0],
                    )
                })
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn dictionary_follows_the_spec_rules() {
        let profile = sample_profile();
        let req = encode_one(&profile);
        check_dictionary(&req);
        check_dictionary(&encode_one(&big_profile(3, 40)));
        // main, a, b, do_syscall_64: shared frames are shared entries.
        assert_eq!(dict(&req).function_table.len(), 5);
        assert_eq!(dict(&req).location_table.len(), 5);
        assert_eq!(dict(&req).stack_table.len(), 4);
    }

    #[test]
    fn resource_scope_and_profile_fields() {
        let profile = sample_profile();
        let req = encode_one(&profile);
        assert_eq!(req.resource_profiles.len(), 1);
        let rp = &req.resource_profiles[0];
        let want: HashMap<String, String> = [
            (HOST_NAME, "testhost"),
            (PROCESS_PID, "42"),
            (PROCESS_EXECUTABLE_NAME, "app"),
            (PROCESS_EXECUTABLE_PATH, "/usr/bin/app"),
            (SERVICE_NAME, "app"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(resource_attrs(rp), want);
        let pid = &rp.resource.as_ref().unwrap().attributes[1];
        assert_eq!(
            pid.value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(42))
        );
        assert_eq!(rp.scope_profiles.len(), 1);
        let scope = rp.scope_profiles[0].scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("hearth", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(rp.scope_profiles[0].profiles.len(), 1);
        let p = &rp.scope_profiles[0].profiles[0];
        let vt = |v: Option<ValueType>| {
            let v = v.unwrap();
            (s(&req, v.type_strindex), s(&req, v.unit_strindex))
        };
        assert_eq!(vt(p.sample_type), ("samples", "count"));
        assert_eq!(vt(p.period_type), ("cpu", "nanoseconds"));
        assert_eq!(p.period, 1_000_000_000 / 99);
        assert_eq!(p.time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(p.duration_nano, 10_000_000_000);
        assert_eq!(p.profile_id.len(), 16);
        assert_ne!(p.profile_id, [0; 16]);
        assert_eq!(p.samples.len(), 3);
    }

    #[test]
    fn off_cpu_profiles_carry_nanoseconds_and_the_reason() {
        let profile = crate::profile::tests::off_cpu_profile();
        let req = encode_one(&profile);
        check_dictionary(&req);
        let p = &req.resource_profiles[0].scope_profiles[0].profiles[0];
        let t = p.sample_type.unwrap();
        assert_eq!(
            (s(&req, t.type_strindex), s(&req, t.unit_strindex)),
            ("off_cpu", "nanoseconds")
        );
        assert!(p.period_type.is_none());
        assert_eq!(p.period, 0);
        let mut seen: Vec<(i64, String)> = all_samples(&req)
            .map(|(_, _, sample)| {
                let a = attrs(&req, &sample.attribute_indices);
                (sample.values[0], a[OFF_CPU_REASON].clone())
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                (3_000_000, "involuntary".to_string()),
                (6_000_000, "voluntary".to_string())
            ]
        );
    }

    #[test]
    fn executable_name_falls_back_to_the_process_name() {
        let m = meta();
        let process = |exe: Option<&str>, name: &str| Process {
            pid: 7,
            name: name.into(),
            executable: exe.map(Arc::from),
            metadata: Default::default(),
        };
        let attrs = |p: &Process| -> HashMap<String, String> {
            resource_attrs(&ResourceProfiles {
                resource: Some(resource(&m, p)),
                ..Default::default()
            })
        };
        let a = attrs(&process(None, "kworker/0:1"));
        assert_eq!(a[PROCESS_EXECUTABLE_NAME], "kworker/0:1");
        assert_eq!(a[SERVICE_NAME], "kworker/0:1");
        assert!(!a.contains_key(PROCESS_EXECUTABLE_PATH));
        let a = attrs(&process(Some("/srv/api-server"), "api"));
        assert_eq!(a[PROCESS_EXECUTABLE_NAME], "api-server");
        assert_eq!(a[SERVICE_NAME], "api-server");
        let a = attrs(&process(None, ""));
        assert!(!a.contains_key(PROCESS_EXECUTABLE_NAME));
        assert_eq!(a[SERVICE_NAME], UNKNOWN_SERVICE);
    }

    #[test]
    fn process_metadata_goes_on_the_resource() {
        let metadata = crate::profile::ProcessMetadata::new([
            (
                Arc::from("service.name"),
                ModelAttrValue::Str("checkout".into()),
            ),
            (
                Arc::from("container.id"),
                ModelAttrValue::Str("c0ffee".into()),
            ),
            (Arc::from("process.parent_pid"), ModelAttrValue::Int(1)),
            // The model's own fields win over metadata with their keys.
            (Arc::from(PROCESS_PID), ModelAttrValue::Int(99)),
        ]);
        let process = Process {
            metadata: Arc::new(metadata),
            ..Process::new(7, "app", Some("/usr/bin/app".into()))
        };
        let r = resource(&meta(), &process);
        let a = resource_attrs(&ResourceProfiles {
            resource: Some(r.clone()),
            ..Default::default()
        });
        assert_eq!(a[SERVICE_NAME], "checkout");
        assert_eq!(a["container.id"], "c0ffee");
        assert_eq!(a[PROCESS_PID], "7");
        let keys: Vec<&str> = r.attributes.iter().map(|kv| kv.key.as_str()).collect();
        let unique: std::collections::HashSet<&str> = keys.iter().copied().collect();
        assert_eq!(keys.len(), unique.len(), "each key once: {keys:?}");
        let ppid = r
            .attributes
            .iter()
            .find(|kv| kv.key == "process.parent_pid")
            .unwrap();
        assert_eq!(
            ppid.value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(1))
        );
    }

    #[test]
    fn sample_values_attributes_and_timestamps() {
        let mut b = ProfileBuilder::new(meta());
        let p = b.intern_process(&Process {
            pid: 5,
            name: "x".into(),
            executable: None,
            metadata: Default::default(),
        });
        let start = 1_700_000_000_000_000_000u64;
        let end = start + 10_000_000_000;
        let cases = [
            (0, end - 1),
            (start + 123, start + 123),
            (start, start),
            (end, end - 1),
            (end + 5_000_000_000, end - 1),
            (start - 1, start),
        ];
        for (i, &(seen, _)) in cases.iter().enumerate() {
            let f = b.intern_frame(&native(&format!("f{i}")));
            b.add_sample_seen(
                p,
                100 + i as u32,
                format!("t{i}").into(),
                vec![f],
                i as u64 + 1,
                seen,
            );
        }
        let req = encode_one(&b.build());
        check_dictionary(&req);
        let samples: Vec<_> = all_samples(&req).collect();
        assert_eq!(samples.len(), cases.len());
        for (i, (_, _, sample)) in samples.into_iter().enumerate() {
            assert_eq!(sample.values, [i as i64 + 1]);
            assert_eq!(sample.timestamps_unix_nano, [cases[i].1], "case {i}");
            let a = attrs(&req, &sample.attribute_indices);
            assert_eq!(a[THREAD_ID], (100 + i).to_string());
            assert_eq!(a[THREAD_NAME], format!("t{i}"));
            assert_eq!(names(&req, sample), [format!("f{i}")]);
        }
        let tid = dict(&req)
            .attribute_table
            .iter()
            .find(|kv| s(&req, kv.key_strindex) == THREAD_ID)
            .unwrap();
        assert!(matches!(
            tid.value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(100))
        ));
    }

    #[test]
    fn zero_length_window_stamps_its_start() {
        let mut profile = sample_profile();
        profile.meta.duration = Duration::ZERO;
        profile.samples[0].last_seen_unix_ns = 1_800_000_000_000_000_000;
        let req = encode_one(&profile);
        for (_, p, sample) in all_samples(&req) {
            assert_eq!(sample.timestamps_unix_nano, [p.time_unix_nano]);
        }
    }

    #[test]
    fn inlined_frames_share_a_location_innermost_first() {
        let mut b = ProfileBuilder::new(meta());
        let p = b.intern_process(&Process {
            pid: 1,
            name: "x".into(),
            executable: None,
            metadata: Default::default(),
        });
        let exe = b.intern_mapping(&ModelMapping {
            path: "/bin/x".into(),
            build_id: Some("beef".into()),
        });
        let frame = |name: &str, inlined: bool, line: u32, address: u64| Frame {
            file: Some("x.c".into()),
            line: Some(line),
            address,
            inlined,
            mapping: Some(exe),
            ..native(name)
        };
        let inner = b.intern_frame(&frame("inner", true, 3, 0x40));
        let middle = b.intern_frame(&frame("middle", true, 7, 0x40));
        let outer = b.intern_frame(&frame("outer", false, 12, 0x40));
        let main = b.intern_frame(&frame("main", false, 20, 0x80));
        // The same chain with another address on an inlined frame encodes
        // to the same location and must not be a duplicate.
        let inner2 = b.intern_frame(&frame("inner", true, 3, 0x44));
        b.add_sample(p, 1, "x".into(), vec![inner, middle, outer, main], 5);
        b.add_sample(p, 2, "x".into(), vec![inner2, middle, outer, main], 1);
        let req = encode_one(&b.build());
        check_dictionary(&req);
        let d = dict(&req);
        assert_eq!(d.location_table.len(), 3);
        assert_eq!(d.stack_table.len(), 2);
        let stack = &d.stack_table[1];
        assert_eq!(stack.location_indices.len(), 2);
        let loc = &d.location_table[stack.location_indices[0] as usize];
        assert_eq!(loc.address, 0x40);
        let lines: Vec<(&str, i64)> = loc
            .lines
            .iter()
            .map(|l| {
                (
                    s(
                        &req,
                        d.function_table[l.function_index as usize].name_strindex,
                    ),
                    l.line,
                )
            })
            .collect();
        assert_eq!(lines, [("inner", 3), ("middle", 7), ("outer", 12)]);
        let f = &d.function_table[loc.lines[0].function_index as usize];
        assert_eq!(s(&req, f.filename_strindex), "x.c");
        assert_eq!(s(&req, f.system_name_strindex), "inner");
        assert_eq!(attrs(&req, &loc.attribute_indices)[FRAME_TYPE], "native");
        let mapping = &d.mapping_table[loc.mapping_index as usize];
        assert_eq!(s(&req, mapping.filename_strindex), "/bin/x");
        assert_eq!(
            attrs(&req, &mapping.attribute_indices)[BUILD_ID_GNU],
            "beef"
        );
        let samples: Vec<_> = all_samples(&req).collect();
        for (_, _, sample) in samples {
            assert_eq!(names(&req, sample), ["main", "outer", "middle", "inner"]);
        }
    }

    #[test]
    fn kernel_frames_are_typed_and_mapped() {
        let req = encode_one(&sample_profile());
        let d = dict(&req);
        let kernel: Vec<&Location> = d
            .location_table
            .iter()
            .filter(|l| {
                l.attribute_indices
                    .iter()
                    .any(|&a| render(&req, &d.attribute_table[a as usize].value) == "kernel")
            })
            .collect();
        assert_eq!(kernel.len(), 1);
        assert_eq!(kernel[0].address, 0xffff_ffff_8100_0000);
        let mapping = &d.mapping_table[kernel[0].mapping_index as usize];
        assert_eq!(s(&req, mapping.filename_strindex), KERNEL_MAPPING_PATH);
        assert!(mapping.attribute_indices.is_empty());
    }

    #[test]
    fn function_names_round_trip_per_stack() {
        for profile in [sample_profile(), big_profile(4, 30)] {
            let requests = encode_window(&profile, &EncodeOptions::default());
            assert_eq!(encoded_samples(&requests), model_samples(&profile));
        }
    }

    #[test]
    fn empty_profile_gives_no_requests() {
        let empty = ProfileBuilder::new(meta()).build();
        assert!(encode_window(&empty, &EncodeOptions::default()).is_empty());
    }

    #[test]
    fn empty_stack_is_the_zero_stack() {
        let mut b = ProfileBuilder::new(meta());
        let p = b.intern_process(&Process {
            pid: 3,
            name: "x".into(),
            executable: None,
            metadata: Default::default(),
        });
        b.add_sample(p, 3, "x".into(), Vec::new(), 2);
        let req = encode_one(&b.build());
        check_dictionary(&req);
        let (_, _, sample) = all_samples(&req).next().unwrap();
        assert_eq!(sample.stack_index, 0);
        assert_eq!(sample.values, [2]);
    }

    #[test]
    fn splitting_keeps_every_sample_exactly_once() {
        let profile = big_profile(6, 60);
        let whole = encode_one(&profile).encoded_len();
        for limit in [1, 600, 2_000, 5_000, whole / 3, whole - 1] {
            let opts = EncodeOptions {
                max_request_bytes: limit,
            };
            let requests = encode_window(&profile, &opts);
            assert!(requests.len() > 1, "limit {limit}");
            let mut ids = HashSet::new();
            for req in &requests {
                check_dictionary(req);
                let n = all_samples(req).count();
                assert!(n > 0);
                assert!(
                    req.encoded_len() <= limit || n == 1,
                    "limit {limit}: {} bytes, {n} samples",
                    req.encoded_len()
                );
                for (_, p, _) in all_samples(req) {
                    ids.insert(p.profile_id.clone());
                }
            }
            let profiles: usize = requests
                .iter()
                .flat_map(|r| &r.resource_profiles)
                .map(|rp| rp.scope_profiles[0].profiles.len())
                .sum();
            assert_eq!(ids.len(), profiles, "profile ids are unique");
            assert_eq!(
                encoded_samples(&requests),
                model_samples(&profile),
                "limit {limit}"
            );
        }
    }

    #[test]
    fn processes_stay_whole_when_they_fit_a_request() {
        let profile = big_profile(6, 20);
        // The six processes have the same shape, so any two of them take
        // as many bytes as the first two.
        let mut two = profile.clone();
        two.samples.retain(|s| s.process < 2);
        let opts = EncodeOptions {
            max_request_bytes: encode_one(&two).encoded_len(),
        };
        let requests = encode_window(&profile, &opts);
        assert_eq!(requests.len(), 3);
        for req in &requests {
            assert!(req.encoded_len() <= opts.max_request_bytes);
            assert_eq!(req.resource_profiles.len(), 2);
            for rp in &req.resource_profiles {
                assert_eq!(rp.scope_profiles[0].profiles[0].samples.len(), 20);
            }
        }
    }

    #[test]
    fn oversized_samples_travel_alone() {
        let profile = sample_profile();
        let requests = encode_window(
            &profile,
            &EncodeOptions {
                max_request_bytes: 1,
            },
        );
        assert_eq!(requests.len(), profile.samples.len());
        for req in &requests {
            check_dictionary(req);
            assert_eq!(all_samples(req).count(), 1);
        }
        assert_eq!(encoded_samples(&requests), model_samples(&profile));
    }

    #[test]
    fn profile_ids_are_unique_and_never_zero() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let id = profile_id(0, 0);
            assert_ne!(id, [0; 16]);
            assert!(seen.insert(id));
        }
        let a = encode_one(&sample_profile());
        let b = encode_one(&sample_profile());
        let id = |r: &ExportProfilesServiceRequest| {
            r.resource_profiles[0].scope_profiles[0].profiles[0]
                .profile_id
                .clone()
        };
        assert_ne!(id(&a), id(&b));
    }
}
