//! An independent reader of OTLP profiles export requests
//! (`v1development`), for tests that look at what a receiver got from
//! hearth.
//!
//! [`check_request`] says whether a request keeps the rules of the profiles
//! proto: a dictionary whose tables start with their zero values, every
//! index in range, consistent sample shapes. It also holds hearth to the
//! "SHOULD" rules (no duplicate or orphaned dictionary entries, unique
//! attribute keys per reference list) so encoder slips show up in tests.
//! [`stacks`] resolves every sample into plain strings so tests can assert
//! on stacks and attributes without knowing the dictionary.
//!
//! It is written from the proto's documentation, not from hearth's
//! encoder, so the two do not share mistakes. Everything in a request is
//! untrusted: bad indices are errors (or placeholders in [`stacks`]), never
//! panics.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development::{Profile, ProfilesDictionary, ValueType};
use prost::Message;

/// One sample of a request with every reference resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSample {
    /// Resource attributes, values rendered as strings.
    pub resource: HashMap<String, String>,
    /// Sample attributes (from the attribute table), values as strings.
    pub sample_attrs: HashMap<String, String>,
    /// Function names, root first; inlined functions included, a location
    /// without lines is `[unknown]`.
    pub frames: Vec<String>,
    /// Sum of the values, or the number of timestamps when there are no
    /// values (each then counts one, as the proto says).
    pub count: i64,
    pub timestamps: Vec<u64>,
    pub period: i64,
    pub sample_type: (String, String),
    pub period_type: (String, String),
    pub time_unix_nano: u64,
    pub duration_nano: u64,
    pub profile_id: Vec<u8>,
}

/// Placeholder for a location without lines.
const UNKNOWN_FRAME: &str = "[unknown]";

/// Checks `req` against the profiles proto's rules; the error names the
/// first broken one and where.
pub fn check_request(req: &ExportProfilesServiceRequest) -> Result<(), String> {
    let dict = req
        .dictionary
        .as_ref()
        .ok_or("the request has no dictionary")?;
    let mut c = Checker {
        d: dict,
        used: Used::default(),
    };
    c.zero_values()?;
    c.no_duplicates()?;
    c.dictionary_references()?;
    for (r, rp) in req.resource_profiles.iter().enumerate() {
        let at = format!("resource_profiles[{r}]");
        if let Some(resource) = &rp.resource {
            c.key_values(&resource.attributes, &format!("{at}.resource"))?;
        }
        for (s, sp) in rp.scope_profiles.iter().enumerate() {
            let at = format!("{at}.scope_profiles[{s}]");
            if let Some(scope) = &sp.scope {
                c.key_values(&scope.attributes, &format!("{at}.scope"))?;
            }
            for (p, profile) in sp.profiles.iter().enumerate() {
                c.profile(profile, &format!("{at}.profiles[{p}]"))?;
            }
        }
    }
    c.no_orphans()
}

/// Every sample of `req`, resolved. Meant for requests that passed
/// [`check_request`]; references that do not resolve become placeholders
/// such as `<bad string 7>` rather than panics.
pub fn stacks(req: &ExportProfilesServiceRequest) -> Vec<DecodedSample> {
    let empty = ProfilesDictionary::default();
    let d = req.dictionary.as_ref().unwrap_or(&empty);
    let r = Resolver { d };
    let mut out = Vec::new();
    for rp in &req.resource_profiles {
        let resource: HashMap<String, String> = rp
            .resource
            .iter()
            .flat_map(|res| &res.attributes)
            .map(|kv| (r.key_value_key(kv), r.any_value(kv.value.as_ref())))
            .collect();
        for sp in &rp.scope_profiles {
            for p in &sp.profiles {
                let sample_type = r.value_type(p.sample_type.as_ref());
                let period_type = r.value_type(p.period_type.as_ref());
                for sample in &p.samples {
                    let count = if sample.values.is_empty() {
                        i64::try_from(sample.timestamps_unix_nano.len()).unwrap_or(i64::MAX)
                    } else {
                        sample.values.iter().fold(0i64, |a, &v| a.saturating_add(v))
                    };
                    out.push(DecodedSample {
                        resource: resource.clone(),
                        sample_attrs: r.attributes(&sample.attribute_indices),
                        frames: r.frames(sample.stack_index),
                        count,
                        timestamps: sample.timestamps_unix_nano.clone(),
                        period: p.period,
                        sample_type: sample_type.clone(),
                        period_type: period_type.clone(),
                        time_unix_nano: p.time_unix_nano,
                        duration_nano: p.duration_nano,
                        profile_id: p.profile_id.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Dictionary entries something refers to, for the orphan check.
#[derive(Default)]
struct Used {
    mappings: HashSet<usize>,
    locations: HashSet<usize>,
    functions: HashSet<usize>,
    links: HashSet<usize>,
    strings: HashSet<usize>,
    attributes: HashSet<usize>,
    stacks: HashSet<usize>,
}

struct Checker<'d> {
    d: &'d ProfilesDictionary,
    used: Used,
}

/// Checks that `i` indexes a table of `len` entries and records it.
fn index(
    used: &mut HashSet<usize>,
    i: i32,
    len: usize,
    table: &str,
    at: &str,
) -> Result<usize, String> {
    match usize::try_from(i) {
        Ok(u) if u < len => {
            used.insert(u);
            Ok(u)
        }
        _ => Err(format!(
            "{at}: index {i} out of range ({table} has {len} entries)"
        )),
    }
}

impl Checker<'_> {
    fn string(&mut self, i: i32, at: &str) -> Result<usize, String> {
        let len = self.d.string_table.len();
        index(&mut self.used.strings, i, len, "string_table", at)
    }

    fn attribute_list(&mut self, indices: &[i32], at: &str) -> Result<(), String> {
        let mut keys = HashSet::new();
        for (n, &i) in indices.iter().enumerate() {
            let len = self.d.attribute_table.len();
            let a = index(
                &mut self.used.attributes,
                i,
                len,
                "attribute_table",
                &format!("{at}.attribute_indices[{n}]"),
            )?;
            let key = &self.d.attribute_table[a].key_strindex;
            // The key index itself is checked with the attribute table.
            let key = usize::try_from(*key)
                .ok()
                .and_then(|k| self.d.string_table.get(k));
            if let Some(key) = key {
                if !keys.insert(key) {
                    return Err(format!("{at}: attribute key {key:?} appears twice"));
                }
            }
        }
        Ok(())
    }

    fn any_value(&mut self, value: Option<&AnyValue>, at: &str) -> Result<(), String> {
        match value.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValueStrindex(i)) => {
                self.string(*i, at)?;
            }
            Some(any_value::Value::ArrayValue(a)) => {
                for (n, v) in a.values.iter().enumerate() {
                    self.any_value(Some(v), &format!("{at}[{n}]"))?;
                }
            }
            Some(any_value::Value::KvlistValue(l)) => {
                self.key_values(&l.values, at)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Inline key/value lists (resource, scope): a key by name or by string
    /// index, never both, and no key twice.
    fn key_values(&mut self, kvs: &[KeyValue], at: &str) -> Result<(), String> {
        let mut keys = HashSet::new();
        for (n, kv) in kvs.iter().enumerate() {
            let at = format!("{at}.attributes[{n}]");
            let key = if kv.key_strindex != 0 {
                if !kv.key.is_empty() {
                    return Err(format!("{at}: both key and key_strindex are set"));
                }
                let k = self.string(kv.key_strindex, &at)?;
                self.d.string_table[k].clone()
            } else {
                kv.key.clone()
            };
            if key.is_empty() {
                return Err(format!("{at}: empty key"));
            }
            if !keys.insert(key.clone()) {
                return Err(format!("{at}: key {key:?} appears twice"));
            }
            self.any_value(kv.value.as_ref(), &at)?;
        }
        Ok(())
    }

    fn value_type(&mut self, vt: Option<&ValueType>, at: &str) -> Result<(), String> {
        let vt = vt.ok_or_else(|| format!("{at} is missing"))?;
        let t = self.string(vt.type_strindex, &format!("{at}.type_strindex"))?;
        self.string(vt.unit_strindex, &format!("{at}.unit_strindex"))?;
        if self.d.string_table[t].is_empty() {
            return Err(format!("{at}: empty type"));
        }
        Ok(())
    }

    fn zero_values(&self) -> Result<(), String> {
        fn first<T: PartialEq + Default>(table: &[T], name: &str) -> Result<(), String> {
            match table.first() {
                None => Err(format!("{name} is empty; index 0 must hold the zero value")),
                Some(v) if *v != T::default() => Err(format!("{name}[0] is not the zero value")),
                Some(_) => Ok(()),
            }
        }
        first(&self.d.mapping_table, "mapping_table")?;
        first(&self.d.location_table, "location_table")?;
        first(&self.d.function_table, "function_table")?;
        first(&self.d.link_table, "link_table")?;
        first(&self.d.string_table, "string_table")?;
        first(&self.d.attribute_table, "attribute_table")?;
        first(&self.d.stack_table, "stack_table")
    }

    fn no_duplicates(&self) -> Result<(), String> {
        fn unique<T: Message>(table: &[T], name: &str) -> Result<(), String> {
            let mut seen = HashMap::new();
            for (i, entry) in table.iter().enumerate() {
                if let Some(j) = seen.insert(entry.encode_to_vec(), i) {
                    return Err(format!("{name}[{i}] duplicates {name}[{j}]"));
                }
            }
            Ok(())
        }
        unique(&self.d.mapping_table, "mapping_table")?;
        unique(&self.d.location_table, "location_table")?;
        unique(&self.d.function_table, "function_table")?;
        unique(&self.d.link_table, "link_table")?;
        unique(&self.d.attribute_table, "attribute_table")?;
        unique(&self.d.stack_table, "stack_table")?;
        let mut seen = HashMap::new();
        for (i, s) in self.d.string_table.iter().enumerate() {
            if let Some(j) = seen.insert(s, i) {
                return Err(format!("string_table[{i}] duplicates string_table[{j}]"));
            }
        }
        Ok(())
    }

    fn dictionary_references(&mut self) -> Result<(), String> {
        let d = self.d;
        for (i, m) in d.mapping_table.iter().enumerate() {
            let at = format!("mapping_table[{i}]");
            self.string(m.filename_strindex, &format!("{at}.filename_strindex"))?;
            self.attribute_list(&m.attribute_indices, &at)?;
        }
        for (i, l) in d.location_table.iter().enumerate() {
            let at = format!("location_table[{i}]");
            index(
                &mut self.used.mappings,
                l.mapping_index,
                d.mapping_table.len(),
                "mapping_table",
                &format!("{at}.mapping_index"),
            )?;
            for (n, line) in l.lines.iter().enumerate() {
                index(
                    &mut self.used.functions,
                    line.function_index,
                    d.function_table.len(),
                    "function_table",
                    &format!("{at}.lines[{n}].function_index"),
                )?;
            }
            self.attribute_list(&l.attribute_indices, &at)?;
        }
        for (i, f) in d.function_table.iter().enumerate() {
            let at = format!("function_table[{i}]");
            self.string(f.name_strindex, &format!("{at}.name_strindex"))?;
            self.string(
                f.system_name_strindex,
                &format!("{at}.system_name_strindex"),
            )?;
            self.string(f.filename_strindex, &format!("{at}.filename_strindex"))?;
        }
        for (i, link) in d.link_table.iter().enumerate().skip(1) {
            if link.trace_id.len() != 16 || link.span_id.len() != 8 {
                return Err(format!(
                    "link_table[{i}]: trace_id must be 16 bytes and span_id 8"
                ));
            }
        }
        for (i, a) in d.attribute_table.iter().enumerate() {
            let at = format!("attribute_table[{i}]");
            let key = self.string(a.key_strindex, &format!("{at}.key_strindex"))?;
            self.string(a.unit_strindex, &format!("{at}.unit_strindex"))?;
            if i > 0 && d.string_table[key].is_empty() {
                return Err(format!("{at}: empty key"));
            }
            self.any_value(a.value.as_ref(), &format!("{at}.value"))?;
        }
        for (i, s) in d.stack_table.iter().enumerate() {
            for (n, &l) in s.location_indices.iter().enumerate() {
                index(
                    &mut self.used.locations,
                    l,
                    d.location_table.len(),
                    "location_table",
                    &format!("stack_table[{i}].location_indices[{n}]"),
                )?;
            }
        }
        Ok(())
    }

    fn profile(&mut self, p: &Profile, at: &str) -> Result<(), String> {
        self.value_type(p.sample_type.as_ref(), &format!("{at}.sample_type"))?;
        // Counted samples need a period to mean an amount; values that are
        // amounts already (off-CPU nanoseconds) may go without.
        let counted = p.sample_type.as_ref().is_some_and(|t| {
            self.d
                .string_table
                .get(t.unit_strindex as usize)
                .map(String::as_str)
                == Some("count")
        });
        if counted || p.period_type.is_some() {
            self.value_type(p.period_type.as_ref(), &format!("{at}.period_type"))?;
        }
        match p.profile_id.len() {
            0 => {}
            16 if p.profile_id.iter().any(|&b| b != 0) => {}
            16 => return Err(format!("{at}.profile_id is all zeroes")),
            n => return Err(format!("{at}.profile_id has {n} bytes, not 16")),
        }
        if p.original_payload_format.is_empty() != p.original_payload.is_empty() {
            return Err(format!(
                "{at}: original_payload and its format must be set together"
            ));
        }
        self.attribute_list(&p.attribute_indices, at)?;
        // A zero-length profile has no instant inside [start, start + 0);
        // allow its start.
        let end = p.time_unix_nano.saturating_add(p.duration_nano.max(1));
        let mut shape = None;
        for (n, s) in p.samples.iter().enumerate() {
            let at = format!("{at}.samples[{n}]");
            let d = self.d;
            index(
                &mut self.used.stacks,
                s.stack_index,
                d.stack_table.len(),
                "stack_table",
                &format!("{at}.stack_index"),
            )?;
            index(
                &mut self.used.links,
                s.link_index,
                d.link_table.len(),
                "link_table",
                &format!("{at}.link_index"),
            )?;
            self.attribute_list(&s.attribute_indices, &at)?;
            let (values, stamps) = (s.values.len(), s.timestamps_unix_nano.len());
            if values == 0 && stamps == 0 {
                return Err(format!("{at}: neither values nor timestamps"));
            }
            if values != 0 && stamps != 0 && values != stamps {
                return Err(format!("{at}: {values} values but {stamps} timestamps"));
            }
            let this = (values != 0, stamps != 0);
            if *shape.get_or_insert(this) != this {
                return Err(format!(
                    "{at}: shape differs from the profile's first sample"
                ));
            }
            if let Some(t) = s
                .timestamps_unix_nano
                .iter()
                .find(|&&t| t < p.time_unix_nano || t >= end)
            {
                return Err(format!(
                    "{at}: timestamp {t} outside [{}, {end})",
                    p.time_unix_nano
                ));
            }
        }
        Ok(())
    }

    /// Entries past index 0 that nothing refers to.
    fn no_orphans(&self) -> Result<(), String> {
        let d = self.d;
        let u = &self.used;
        for (used, len, name) in [
            (&u.mappings, d.mapping_table.len(), "mapping_table"),
            (&u.locations, d.location_table.len(), "location_table"),
            (&u.functions, d.function_table.len(), "function_table"),
            (&u.links, d.link_table.len(), "link_table"),
            (&u.strings, d.string_table.len(), "string_table"),
            (&u.attributes, d.attribute_table.len(), "attribute_table"),
            (&u.stacks, d.stack_table.len(), "stack_table"),
        ] {
            if let Some(i) = (1..len).find(|i| !used.contains(i)) {
                return Err(format!("{name}[{i}] is not referred to"));
            }
        }
        Ok(())
    }
}

/// Looks things up for [`stacks`], with placeholders for what is missing.
struct Resolver<'d> {
    d: &'d ProfilesDictionary,
}

fn get<T>(table: &[T], i: i32) -> Option<&T> {
    usize::try_from(i).ok().and_then(|i| table.get(i))
}

impl Resolver<'_> {
    fn string(&self, i: i32) -> String {
        get(&self.d.string_table, i).map_or_else(|| format!("<bad string {i}>"), Clone::clone)
    }

    fn value_type(&self, vt: Option<&ValueType>) -> (String, String) {
        vt.map_or_else(Default::default, |vt| {
            (self.string(vt.type_strindex), self.string(vt.unit_strindex))
        })
    }

    fn key_value_key(&self, kv: &KeyValue) -> String {
        if kv.key_strindex != 0 {
            self.string(kv.key_strindex)
        } else {
            kv.key.clone()
        }
    }

    fn any_value(&self, value: Option<&AnyValue>) -> String {
        use any_value::Value;
        match value.and_then(|v| v.value.as_ref()) {
            None => String::new(),
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::StringValueStrindex(i)) => self.string(*i),
            Some(Value::IntValue(n)) => n.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(x)) => x.to_string(),
            Some(Value::BytesValue(b)) => b.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            }),
            Some(Value::ArrayValue(a)) => {
                let items: Vec<String> = a.values.iter().map(|v| self.any_value(Some(v))).collect();
                format!("[{}]", items.join(","))
            }
            Some(Value::KvlistValue(l)) => {
                let items: Vec<String> = l
                    .values
                    .iter()
                    .map(|kv| {
                        format!(
                            "{}={}",
                            self.key_value_key(kv),
                            self.any_value(kv.value.as_ref())
                        )
                    })
                    .collect();
                format!("{{{}}}", items.join(","))
            }
        }
    }

    fn attributes(&self, indices: &[i32]) -> HashMap<String, String> {
        indices
            .iter()
            .map(|&i| match get(&self.d.attribute_table, i) {
                Some(a) => (
                    self.string(a.key_strindex),
                    self.any_value(a.value.as_ref()),
                ),
                None => (format!("<bad attribute {i}>"), String::new()),
            })
            .collect()
    }

    /// Function names of a stack, root first. A stack lists locations leaf
    /// first and a location lists its lines innermost first, so the
    /// flattened lines are leaf first.
    fn frames(&self, stack: i32) -> Vec<String> {
        let Some(stack) = get(&self.d.stack_table, stack) else {
            return vec![format!("<bad stack {stack}>")];
        };
        let mut frames = Vec::new();
        for &l in &stack.location_indices {
            let Some(location) = get(&self.d.location_table, l) else {
                frames.push(format!("<bad location {l}>"));
                continue;
            };
            if location.lines.is_empty() {
                frames.push(UNKNOWN_FRAME.to_owned());
            }
            for line in &location.lines {
                frames.push(match get(&self.d.function_table, line.function_index) {
                    Some(f) => self.string(f.name_strindex),
                    None => format!("<bad function {}>", line.function_index),
                });
            }
        }
        frames.reverse();
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::profiles::v1development::{
        Function, KeyValueAndUnit, Line, Link, Location, Mapping, ResourceProfiles, Sample,
        ScopeProfiles, Stack,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn string_value(s: &str) -> Option<AnyValue> {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s.into())),
        })
    }

    /// A valid request: one process, stacks main;work;inl (inl inlined
    /// into work) and main.
    fn good() -> ExportProfilesServiceRequest {
        let strings = [
            "",
            "samples",
            "count",
            "cpu",
            "nanoseconds",
            "main",
            "work",
            "inl",
            "/bin/app",
            "thread.name",
            "t1",
        ];
        let dictionary = ProfilesDictionary {
            mapping_table: vec![
                Mapping::default(),
                Mapping {
                    filename_strindex: 8,
                    ..Default::default()
                },
            ],
            location_table: vec![
                Location::default(),
                Location {
                    mapping_index: 1,
                    address: 0x10,
                    lines: vec![Line {
                        function_index: 1,
                        line: 3,
                        column: 0,
                    }],
                    attribute_indices: vec![],
                },
                Location {
                    mapping_index: 1,
                    address: 0x20,
                    lines: vec![
                        Line {
                            function_index: 3,
                            line: 0,
                            column: 0,
                        },
                        Line {
                            function_index: 2,
                            line: 0,
                            column: 0,
                        },
                    ],
                    attribute_indices: vec![],
                },
            ],
            function_table: vec![
                Function::default(),
                Function {
                    name_strindex: 5,
                    ..Default::default()
                },
                Function {
                    name_strindex: 6,
                    ..Default::default()
                },
                Function {
                    name_strindex: 7,
                    ..Default::default()
                },
            ],
            link_table: vec![Link::default()],
            string_table: strings.map(String::from).to_vec(),
            attribute_table: vec![
                KeyValueAndUnit::default(),
                KeyValueAndUnit {
                    key_strindex: 9,
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValueStrindex(10)),
                    }),
                    unit_strindex: 0,
                },
            ],
            stack_table: vec![
                Stack::default(),
                Stack {
                    location_indices: vec![2, 1],
                },
                Stack {
                    location_indices: vec![1],
                },
            ],
        };
        let sample = |stack_index, value, t| Sample {
            stack_index,
            attribute_indices: vec![1],
            link_index: 0,
            values: vec![value],
            timestamps_unix_nano: vec![t],
        };
        let profile = Profile {
            sample_type: Some(ValueType {
                type_strindex: 1,
                unit_strindex: 2,
            }),
            samples: vec![sample(1, 5, 1_000), sample(2, 2, 1_999)],
            time_unix_nano: 1_000,
            duration_nano: 1_000,
            period_type: Some(ValueType {
                type_strindex: 3,
                unit_strindex: 4,
            }),
            period: 10,
            profile_id: vec![7; 16],
            ..Default::default()
        };
        ExportProfilesServiceRequest {
            resource_profiles: vec![ResourceProfiles {
                resource: Some(Resource {
                    attributes: vec![
                        KeyValue {
                            key: "service.name".into(),
                            value: string_value("app"),
                            key_strindex: 0,
                        },
                        KeyValue {
                            key: "process.pid".into(),
                            value: Some(AnyValue {
                                value: Some(any_value::Value::IntValue(42)),
                            }),
                            key_strindex: 0,
                        },
                    ],
                    ..Default::default()
                }),
                scope_profiles: vec![ScopeProfiles {
                    profiles: vec![profile],
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
            dictionary: Some(dictionary),
        }
    }

    fn profile_mut(req: &mut ExportProfilesServiceRequest) -> &mut Profile {
        &mut req.resource_profiles[0].scope_profiles[0].profiles[0]
    }

    fn dict_mut(req: &mut ExportProfilesServiceRequest) -> &mut ProfilesDictionary {
        req.dictionary.as_mut().unwrap()
    }

    #[test]
    fn a_valid_request_passes_and_resolves() {
        let req = good();
        check_request(&req).unwrap();
        let samples = stacks(&req);
        assert_eq!(samples.len(), 2);
        let s = &samples[0];
        assert_eq!(s.frames, ["main", "work", "inl"]);
        assert_eq!(s.count, 5);
        assert_eq!(s.timestamps, [1_000]);
        assert_eq!(s.resource["service.name"], "app");
        assert_eq!(s.resource["process.pid"], "42");
        assert_eq!(s.sample_attrs["thread.name"], "t1");
        assert_eq!(s.sample_type, ("samples".into(), "count".into()));
        assert_eq!(s.period_type, ("cpu".into(), "nanoseconds".into()));
        assert_eq!(
            (s.period, s.time_unix_nano, s.duration_nano),
            (10, 1_000, 1_000)
        );
        assert_eq!(s.profile_id, [7; 16]);
        assert_eq!(samples[1].frames, ["main"]);
    }

    #[test]
    fn broken_requests_are_rejected() {
        type Breaker = fn(&mut ExportProfilesServiceRequest);
        let cases: Vec<(&str, Breaker)> = vec![
            ("no dictionary", |r| r.dictionary = None),
            ("stack out of range", |r| {
                profile_mut(r).samples[0].stack_index = 3
            }),
            ("negative stack", |r| {
                profile_mut(r).samples[0].stack_index = -1
            }),
            ("string 0 not empty", |r| {
                dict_mut(r).string_table[0] = "x".into()
            }),
            ("no zero mapping", |r| {
                dict_mut(r).mapping_table.remove(0);
            }),
            ("empty link table", |r| dict_mut(r).link_table.clear()),
            ("location out of range", |r| {
                dict_mut(r).stack_table[1].location_indices.push(9)
            }),
            ("function out of range", |r| {
                dict_mut(r).location_table[1].lines[0].function_index = 4
            }),
            ("mapping out of range", |r| {
                dict_mut(r).location_table[1].mapping_index = 2
            }),
            ("string out of range", |r| {
                dict_mut(r).function_table[1].name_strindex = 99
            }),
            ("string value index out of range", |r| {
                dict_mut(r).attribute_table[1].value = Some(AnyValue {
                    value: Some(any_value::Value::StringValueStrindex(11)),
                })
            }),
            ("attribute out of range", |r| {
                profile_mut(r).samples[0].attribute_indices = vec![2]
            }),
            ("attribute key twice", |r| {
                profile_mut(r).samples[0].attribute_indices = vec![1, 1]
            }),
            ("values and timestamps differ", |r| {
                profile_mut(r).samples[0].values.push(1)
            }),
            ("empty sample", |r| {
                let s = &mut profile_mut(r).samples[0];
                s.values.clear();
                s.timestamps_unix_nano.clear();
            }),
            ("mixed shapes", |r| {
                profile_mut(r).samples[1].timestamps_unix_nano.clear()
            }),
            ("timestamp after the profile", |r| {
                profile_mut(r).samples[1].timestamps_unix_nano[0] = 2_000
            }),
            ("timestamp before the profile", |r| {
                profile_mut(r).samples[1].timestamps_unix_nano[0] = 999
            }),
            ("no sample type", |r| profile_mut(r).sample_type = None),
            ("no period type for counted samples", |r| {
                profile_mut(r).period_type = None
            }),
            ("zero profile id", |r| {
                profile_mut(r).profile_id = vec![0; 16]
            }),
            ("short profile id", |r| {
                profile_mut(r).profile_id = vec![1; 8]
            }),
            ("duplicate function", |r| {
                let f = dict_mut(r).function_table[1];
                dict_mut(r).function_table.push(f);
            }),
            ("duplicate string", |r| {
                dict_mut(r).string_table.push("main".into())
            }),
            ("orphan stack", |r| {
                dict_mut(r).stack_table.push(Stack {
                    location_indices: vec![2],
                })
            }),
            ("orphan string", |r| {
                dict_mut(r).string_table.push("unused".into())
            }),
            ("duplicate resource key", |r| {
                let res = r.resource_profiles[0].resource.as_mut().unwrap();
                let kv = res.attributes[0].clone();
                res.attributes.push(kv);
            }),
            ("resource key index out of range", |r| {
                let res = r.resource_profiles[0].resource.as_mut().unwrap();
                res.attributes[0].key.clear();
                res.attributes[0].key_strindex = 50;
            }),
        ];
        for (what, brk) in cases {
            let mut req = good();
            brk(&mut req);
            match check_request(&req) {
                Err(e) => eprintln!("{what}: {e}"),
                Ok(()) => panic!("{what}: accepted"),
            }
            // Resolving what was rejected must not panic either.
            let _ = stacks(&req);
        }
    }

    #[test]
    fn bad_references_resolve_to_placeholders() {
        let mut req = good();
        profile_mut(&mut req).samples[0].stack_index = 40;
        dict_mut(&mut req).stack_table[2].location_indices = vec![-3];
        let samples = stacks(&req);
        assert_eq!(samples[0].frames, ["<bad stack 40>"]);
        assert_eq!(samples[1].frames, ["<bad location -3>"]);
    }

    /// The validator agrees with hearth's encoder (test only: the checks
    /// above stay independent of it), also when a window is split.
    #[test]
    fn hearth_requests_pass() {
        use hearth::export::otlp::encode::{encode_window, EncodeOptions};
        use hearth::profile::{Frame, FrameKind, Mapping as M, Process, ProfileBuilder};
        use hearth::profile::{ProfileMeta, SampleKind};
        use std::time::{Duration, SystemTime};

        let mut b = ProfileBuilder::new(ProfileMeta {
            kind: SampleKind::OnCpu,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(1),
            frequency_hz: 19,
            hostname: "h".into(),
        });
        let exe = b.intern_mapping(&M {
            path: "/bin/app".into(),
            build_id: Some("ab".into()),
        });
        let mut want = Vec::new();
        for pid in 1..=4u32 {
            let p = b.intern_process(&Process {
                pid,
                name: "app".into(),
                executable: Some("/bin/app".into()),
                metadata: Default::default(),
            });
            for k in 0..10u32 {
                let frame = |name: String, inlined| Frame {
                    mapping: Some(exe),
                    address: u64::from(k),
                    inlined,
                    ..Frame::named(&name, FrameKind::Native)
                };
                let leaf = b.intern_frame(&frame(format!("leaf{k}"), true));
                let mid = b.intern_frame(&frame(format!("mid{}", k % 3), false));
                let root = b.intern_frame(&Frame::named("main", FrameKind::Native));
                b.add_sample(p, pid, "t".into(), vec![leaf, mid, root], u64::from(k + 1));
                let frames = vec![
                    "main".to_owned(),
                    format!("mid{}", k % 3),
                    format!("leaf{k}"),
                ];
                want.push((pid.to_string(), frames, i64::from(k + 1)));
            }
        }
        let profile = b.build();
        want.sort();
        for limit in [usize::MAX, 3_000, 1] {
            let requests = encode_window(
                &profile,
                &EncodeOptions {
                    max_request_bytes: limit,
                },
            );
            let mut got = Vec::new();
            for req in &requests {
                check_request(req).unwrap_or_else(|e| panic!("limit {limit}: {e}"));
                for s in stacks(req) {
                    assert_eq!(s.sample_attrs["thread.id"], s.resource["process.pid"]);
                    got.push((s.resource["process.pid"].clone(), s.frames, s.count));
                }
            }
            got.sort();
            assert_eq!(got, want, "limit {limit}");
        }
    }
}
