//! Commands that read profiles back: `hearth flamegraph` (here), `hearth
//! diff`, `hearth top` and `hearth check` (submodules).
//!
//! Sources are profile files given as arguments (gzipped pprof `.pb.gz` /
//! `.pprof`, or `.folded` stacks, told apart by extension) and/or the
//! windows of a local store (`--store DIR`, selected with `--since` and
//! `--until`; see [`crate::export::store`]). Everything read is merged;
//! `--pid` and `--process` keep only the samples of processes matching
//! either. Each output's format comes from its extension, as for `hearth
//! record`.
//!
//! Every argument is checked, and every output proven writable, before
//! anything is read, so a typo costs no time on a large store.
//!
//! `--since` and `--until` take a duration back from now (`10m`, `2h`,
//! `90` seconds) or an RFC 3339 time in UTC (`2026-11-21T10:00:00Z`; the
//! `Z` may be left out and a space may replace the `T`; other offsets are
//! not accepted).
//!
//! Exit codes (`main` turns [`ReportError::exit_code`] into the process's):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | every output written |
//! | 1 | anything else: an input or the store directory cannot be read, an input or every selected window is damaged, rendering failed |
//! | 2 | usage: no source, unknown input or output extension, `--since`/`--until` invalid, without `--store`, or in the wrong order |
//! | 3 | `top --live`: missing privileges |
//! | 4 | `top --live`: the kernel has no BTF |
//! | 5 | `top --live --pid`: no such process |
//! | 6 | an output cannot be written |
//! | 7 | nothing matched: the store is empty, has no windows in the time range, or no samples remain after the process filter |

pub mod check;
pub mod diff;
pub mod top;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::{debug, warn};

use crate::cli::{parse_duration, FlamegraphArgs, SourceArgs};
use crate::export::store::{self, show_time, Selection, StoreError};
use crate::export::{self, flamegraph as svg, folded, pprof, ExportError, OutputFormat};
use crate::profile::{Profile, SampleKind};

/// Input extensions, for error messages.
const INPUT_FORMATS: &str = ".pb.gz or .pprof (gzipped pprof), .folded (folded stacks)";
const WHEN_FORMS: &str =
    "use a duration back from now (10m, 2h) or an RFC 3339 time (2026-11-21T10:00:00Z)";

/// Why `hearth flamegraph` failed. Messages name the file or argument at
/// fault and carry their cause inline (no `source()` chain), so `main`'s
/// `{:#}` prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Arguments that cannot work together.
    #[error("{0}")]
    Usage(String),
    /// The export error names the output and the supported extensions.
    #[error("{0}")]
    UnknownOutput(ExportError),
    #[error("{}: unknown input format; supported extensions: {INPUT_FORMATS}", path.display())]
    UnknownInput { path: PathBuf },
    #[error("invalid --{flag} {value:?}: {WHEN_FORMS}")]
    BadTime { flag: &'static str, value: String },
    #[error("cannot write {}: {error}", path.display())]
    Unwritable { path: PathBuf, error: io::Error },
    #[error("cannot read {}: {error}", path.display())]
    ReadInput { path: PathBuf, error: io::Error },
    #[error("{}: {error}", path.display())]
    DecodeInput { path: PathBuf, error: ExportError },
    #[error("rendering {}: {error}", path.display())]
    Render { path: PathBuf, error: ExportError },
    #[error(transparent)]
    Store(StoreError),
    /// Sources were read but no sample is left.
    #[error("{0}")]
    NoSamples(String),
    /// `hearth top --live` could not sample (privileges, BTF, loading).
    #[error(transparent)]
    Bpf(crate::bpf::BpfError),
    /// `hearth top --live --pid` named a process that does not exist.
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
}

impl ReportError {
    /// Process exit code for this error; see the module documentation.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReportError::Usage(_)
            | ReportError::UnknownOutput(_)
            | ReportError::UnknownInput { .. }
            | ReportError::BadTime { .. } => 2,
            ReportError::Unwritable { .. } => 6,
            ReportError::NoSamples(_) => 7,
            // The same codes as `hearth record`.
            ReportError::Bpf(crate::bpf::BpfError::Privileges(_)) => 3,
            ReportError::Bpf(crate::bpf::BpfError::NoBtf { .. }) => 4,
            ReportError::NoSuchProcess(_) => 5,
            ReportError::Store(e) if e.is_nothing_matched() => 7,
            ReportError::Store(_)
            | ReportError::ReadInput { .. }
            | ReportError::DecodeInput { .. }
            | ReportError::Render { .. }
            | ReportError::Bpf(_) => 1,
        }
    }
}

/// What `hearth flamegraph` produced.
#[derive(Debug)]
pub struct FlamegraphSummary {
    /// Samples in the outputs.
    pub samples: u64,
    pub outputs: Vec<PathBuf>,
}

/// Reads the sources `args` names, merges and filters them, and writes
/// every output.
pub fn flamegraph(args: &FlamegraphArgs) -> Result<FlamegraphSummary, ReportError> {
    let plan = Plan::new(args, SystemTime::now())?;
    check_outputs(&plan.outputs)?;
    let profile = plan.sources.read()?;
    let title = match &args.title {
        Some(title) => title.clone(),
        None => default_title(&profile, &plan),
    };
    for (path, format) in &plan.outputs {
        write_output(&profile, &title, path, *format)?;
    }
    // `main` reports the sample count and outputs; this adds detail.
    debug!(
        samples = profile.total_count(),
        stacks = profile.samples.len(),
        "outputs written"
    );
    Ok(FlamegraphSummary {
        samples: profile.total_count(),
        outputs: args.outputs.clone(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputFormat {
    Pprof,
    Folded,
}

impl InputFormat {
    fn from_path(path: &Path) -> Result<InputFormat, ReportError> {
        let name = export::lower_file_name(path);
        if name.ends_with(".pb.gz") || name.ends_with(".pprof") {
            Ok(InputFormat::Pprof)
        } else if name.ends_with(".folded") {
            Ok(InputFormat::Folded)
        } else {
            Err(ReportError::UnknownInput {
                path: path.to_path_buf(),
            })
        }
    }
}

/// [`SourceArgs`], checked and resolved: what to read.
#[derive(Debug)]
pub struct Sources {
    inputs: Vec<(PathBuf, InputFormat)>,
    store: Option<PathBuf>,
    /// Times (with `--store`) and the process filter (for every source).
    selection: Selection,
}

/// The `flamegraph` arguments, checked and resolved.
#[derive(Debug)]
struct Plan {
    sources: Sources,
    outputs: Vec<(PathBuf, OutputFormat)>,
}

impl Plan {
    fn new(args: &FlamegraphArgs, now: SystemTime) -> Result<Plan, ReportError> {
        let sources = Sources::new(&args.source, now)?;
        let outputs = args
            .outputs
            .iter()
            .map(|p| {
                let format = OutputFormat::from_path(p).map_err(ReportError::UnknownOutput)?;
                Ok((p.clone(), format))
            })
            .collect::<Result<_, ReportError>>()?;
        Ok(Plan { sources, outputs })
    }
}

impl Sources {
    /// Checks the arguments; `now` anchors relative times like `10m`.
    pub fn new(args: &SourceArgs, now: SystemTime) -> Result<Sources, ReportError> {
        if args.inputs.is_empty() && args.store.is_none() {
            return Err(ReportError::Usage(
                "nothing to read: give profile files (.pb.gz, .pprof, .folded) or --store DIR"
                    .into(),
            ));
        }
        if args.store.is_none() && (args.since.is_some() || args.until.is_some()) {
            return Err(ReportError::Usage(
                "--since and --until select windows of a store: add --store DIR".into(),
            ));
        }
        let inputs = args
            .inputs
            .iter()
            .map(|p| Ok((p.clone(), InputFormat::from_path(p)?)))
            .collect::<Result<_, ReportError>>()?;
        let since = args
            .since
            .as_deref()
            .map(|t| parse_when("since", t, now))
            .transpose()?;
        let until = args
            .until
            .as_deref()
            .map(|t| parse_when("until", t, now))
            .transpose()?;
        if let (Some(since), Some(until)) = (since, until) {
            if since >= until {
                return Err(ReportError::Usage(format!(
                    "--since ({}) must be before --until ({})",
                    show_time(since),
                    show_time(until)
                )));
            }
        }
        Ok(Sources {
            inputs,
            store: args.store.clone(),
            selection: Selection {
                since,
                until,
                pids: args.pids.clone(),
                processes: args.processes.clone(),
            },
        })
    }

    /// Reads, filters and merges every source; an error when no sample is
    /// left.
    pub fn read(&self) -> Result<Profile, ReportError> {
        read(self)
    }

    /// The files and store read, for messages and titles.
    pub fn describe(&self) -> String {
        describe_sources(self)
    }

    /// Like [`describe`](Self::describe) with file names instead of paths.
    pub fn describe_brief(&self) -> String {
        describe_sources_brief(self)
    }
}

/// `--since`/`--until`: a duration back from `now`, or an RFC 3339 time.
fn parse_when(flag: &'static str, text: &str, now: SystemTime) -> Result<SystemTime, ReportError> {
    let text = text.trim();
    if let Ok(back) = parse_duration(text) {
        // Further back than the epoch means "from the beginning"; nothing
        // is stored before it.
        return Ok(now
            .checked_sub(back)
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .max(SystemTime::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| ReportError::BadTime {
        flag,
        value: text.to_owned(),
    })
}

/// Proves each output can be created, before anything is read.
fn check_outputs(outputs: &[(PathBuf, OutputFormat)]) -> Result<(), ReportError> {
    for (path, _) in outputs {
        check_writable(path)?;
    }
    Ok(())
}

/// [`export::check_writable`] with the report's error.
pub(super) fn check_writable(path: &Path) -> Result<(), ReportError> {
    export::check_writable(path).map_err(|error| ReportError::Unwritable {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads, filters and merges every source.
fn read(plan: &Sources) -> Result<Profile, ReportError> {
    let selection = &plan.selection;
    let mut profiles = Vec::new();
    for (path, format) in &plan.inputs {
        let profile = read_input(path, *format)?;
        profiles.push(
            if selection.pids.is_empty() && selection.processes.is_empty() {
                profile
            } else {
                profile.retain_samples(|process, _| {
                    selection.pids.contains(&process.pid)
                        || selection.processes.iter().any(|n| **n == *process.name)
                })
            },
        );
    }
    if let Some(dir) = &plan.store {
        match store::load(dir, selection) {
            Ok(profile) => profiles.push(profile),
            // With files to show as well, an empty store range is worth a
            // warning, not a failure.
            Err(e) if e.is_nothing_matched() && !plan.inputs.is_empty() => warn!("{e}"),
            Err(e) => return Err(ReportError::Store(e)),
        }
    }
    match store::merge(profiles) {
        Some(profile) if profile.total_count() > 0 => Ok(profile),
        _ => Err(ReportError::NoSamples(no_samples_message(plan))),
    }
}

fn read_input(path: &Path, format: InputFormat) -> Result<Profile, ReportError> {
    let bytes = fs::read(path).map_err(|error| ReportError::ReadInput {
        path: path.to_path_buf(),
        error,
    })?;
    let decoded = match format {
        InputFormat::Pprof => pprof::decode(&bytes),
        InputFormat::Folded => folded::parse(&bytes[..]),
    };
    decoded.map_err(|error| ReportError::DecodeInput {
        path: path.to_path_buf(),
        error,
    })
}

fn no_samples_message(plan: &Sources) -> String {
    let filter = plan.selection.describe_processes();
    let mut message = String::from("no samples");
    if !filter.is_empty() {
        message.push_str(" of ");
        message.push_str(&filter);
    }
    message.push_str(" in ");
    message.push_str(&describe_sources(plan));
    let folded_only_pids = !plan.selection.pids.is_empty()
        && plan.inputs.iter().any(|(_, f)| *f == InputFormat::Folded);
    if folded_only_pids {
        message.push_str(" (folded stacks carry no process ids; use --process)");
    }
    message
}

/// The files (up to three by name) and store read.
fn describe_sources(plan: &Sources) -> String {
    describe_sources_with(plan, |p| p.display().to_string())
}

/// [`describe_sources`] with file names only, for graph titles, which a
/// long path would push past the graph's width.
fn describe_sources_brief(plan: &Sources) -> String {
    describe_sources_with(plan, |p| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    })
}

fn describe_sources_with(plan: &Sources, show: impl Fn(&Path) -> String) -> String {
    let mut parts = Vec::new();
    match plan.inputs.as_slice() {
        [] => {}
        inputs if inputs.len() <= 3 => {
            parts.extend(inputs.iter().map(|(p, _)| show(p)).collect::<Vec<_>>())
        }
        inputs => parts.push(format!("{} files", inputs.len())),
    }
    if let Some(dir) = &plan.store {
        parts.push(format!("store {}", show(dir)));
    }
    parts.join(", ")
}

/// What, where, when and which processes, e.g. `hearth on-CPU profile —
/// myhost, 2026-11-21T10:00:00Z to 2026-11-21T10:10:00Z, 19 Hz, pid 42`.
/// Parts nobody knows (folded files have no host or time) are left out.
fn default_title(profile: &Profile, plan: &Plan) -> String {
    let meta = &profile.meta;
    let kind = meta.kind.describe();
    let mut parts = Vec::new();
    if !meta.hostname.is_empty() {
        parts.push(meta.hostname.clone());
    }
    if meta.start != SystemTime::UNIX_EPOCH {
        let end = meta.start.checked_add(meta.duration).unwrap_or(meta.start);
        parts.push(format!("{} to {}", show_time(meta.start), show_time(end)));
    }
    if meta.frequency_hz > 0 && !matches!(meta.kind, SampleKind::OffCpu(_)) {
        parts.push(format!("{} Hz", meta.frequency_hz));
    }
    let filter = plan.sources.selection.describe_processes();
    if !filter.is_empty() {
        parts.push(filter);
    }
    if plan.sources.store.is_none() || !plan.sources.inputs.is_empty() {
        parts.push(describe_sources_brief(&plan.sources));
    }
    let mut title = format!("hearth {kind} profile");
    if !parts.is_empty() {
        title.push_str(" — ");
        title.push_str(&parts.join(", "));
    }
    title
}

/// Renders `profile` and puts it at `path` atomically (temporary file,
/// sync, rename), so an interrupted run never leaves half a file.
fn write_output(
    profile: &Profile,
    title: &str,
    path: &Path,
    format: OutputFormat,
) -> Result<(), ReportError> {
    // `export::write_profile_to_path` would pick the default title, so the
    // bytes are rendered here.
    let mut bytes = Vec::new();
    let rendered = match format {
        OutputFormat::FlameGraph => svg::write(profile, title, &mut bytes),
        other => export::write_profile(profile, other, &mut bytes),
    };
    rendered.map_err(|error| ReportError::Render {
        path: path.to_path_buf(),
        error,
    })?;
    write_atomically(path, &bytes)
}

/// Puts `bytes` at `path` through a temporary file, synced and renamed.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    export::write_atomically(path, bytes).map_err(|error| ReportError::Unwritable {
        path: path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::export::store::{Retention, Store};
    use crate::profile::tests::native;
    use crate::profile::{Process, ProfileBuilder, ProfileMeta};

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-report-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `args` with its sources changed by `change`.
    fn with_source(
        args: FlamegraphArgs,
        change: impl FnOnce(SourceArgs) -> SourceArgs,
    ) -> FlamegraphArgs {
        FlamegraphArgs {
            source: change(args.source),
            ..args
        }
    }

    fn args(inputs: &[&Path], outputs: &[&Path]) -> FlamegraphArgs {
        FlamegraphArgs {
            source: SourceArgs {
                inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
                ..SourceArgs::default()
            },
            outputs: outputs.iter().map(|p| p.to_path_buf()).collect(),
            title: None,
        }
    }

    /// A 10 s window at `start`: pid 1 "api" in `serve` (3) and pid 2 "db"
    /// in `query` (5).
    fn window(start: SystemTime) -> Profile {
        let mut b = ProfileBuilder::new(ProfileMeta {
            kind: SampleKind::OnCpu,
            start,
            duration: Duration::from_secs(10),
            frequency_hz: 19,
            hostname: "web1".into(),
        });
        let main = b.intern_frame(&native("main"));
        for (pid, name, leaf, count) in [(1, "api", "serve", 3), (2, "db", "query", 5)] {
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

    fn store_with_two_windows(dir: &Path) -> PathBuf {
        let store_dir = dir.join("store");
        let mut store = Store::open(
            &store_dir,
            Retention {
                max_age: Duration::MAX,
                max_bytes: u64::MAX,
            },
        )
        .unwrap();
        store.write(&window(at(T0))).unwrap();
        store.write(&window(at(T0 + 10))).unwrap();
        store_dir
    }

    #[test]
    fn when_accepts_durations_back_from_now_and_rfc3339() {
        let now = at(T0);
        assert_eq!(parse_when("since", "10m", now).unwrap(), at(T0 - 600));
        assert_eq!(parse_when("since", " 90 ", now).unwrap(), at(T0 - 90));
        assert_eq!(
            parse_when("since", "2023-11-14T22:13:20Z", now).unwrap(),
            at(T0)
        );
        assert_eq!(
            parse_when("until", "2023-11-14 22:13:20", now).unwrap(),
            at(T0)
        );
        assert_eq!(
            parse_when("since", "100000y", now).unwrap(),
            SystemTime::UNIX_EPOCH
        );
        for bad in ["yesterday", "", "-5m", "2023-13-01T00:00:00Z"] {
            let err = parse_when("since", bad, now).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            let msg = err.to_string();
            assert!(msg.contains("--since") && msg.contains("10m"), "{msg}");
        }
    }

    #[test]
    fn usage_errors_come_before_anything_is_touched() {
        let dir = scratch("usage");
        let out = dir.join("out.svg");
        let cases: Vec<(FlamegraphArgs, &str)> = vec![
            (args(&[], &[&out]), "nothing to read"),
            (
                with_source(args(&[Path::new("a.folded")], &[&out]), |s| SourceArgs {
                    since: Some("10m".into()),
                    ..s
                }),
                "--store",
            ),
            (args(&[Path::new("a.svg")], &[&out]), "a.svg"),
            (
                args(&[Path::new("a.folded")], &[Path::new("out.png")]),
                "out.png",
            ),
            (
                with_source(args(&[], &[&out]), |s| SourceArgs {
                    store: Some(dir.join("store")),
                    since: Some("whenever".into()),
                    ..s
                }),
                "whenever",
            ),
            (
                with_source(args(&[], &[&out]), |s| SourceArgs {
                    store: Some(dir.join("store")),
                    since: Some("1m".into()),
                    until: Some("2m".into()),
                    ..s
                }),
                "must be before --until",
            ),
        ];
        for (args, want) in cases {
            let err = flamegraph(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        // Nothing was created: not the output, not the store.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_output_is_reported_before_reading() {
        let dir = scratch("unwritable");
        // The input does not exist: reading it would be exit code 1.
        let missing = dir.join("missing.pb.gz");
        // A directory with an output's name.
        let taken = dir.join("taken.svg");
        fs::create_dir(&taken).unwrap();
        for out in [Path::new("/nonexistent-dir/out.svg"), taken.as_path()] {
            let err = flamegraph(&args(&[&missing], &[out])).unwrap_err();
            assert_eq!(err.exit_code(), 6, "{err}");
            assert!(err.to_string().contains(out.to_str().unwrap()), "{err}");
        }
        let err = flamegraph(&args(&[&missing], &[&dir.join("out.svg")])).unwrap_err();
        assert_eq!(err.exit_code(), 1, "{err}");
        assert!(err.to_string().contains("missing.pb.gz"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn store_windows_render_to_every_format_with_a_descriptive_title() {
        let dir = scratch("store");
        let store = store_with_two_windows(&dir);
        let (svg_out, folded_out, pb_out) = (
            dir.join("out.svg"),
            dir.join("out.folded"),
            dir.join("out.pb.gz"),
        );
        let summary = flamegraph(&with_source(
            args(&[], &[&svg_out, &folded_out, &pb_out]),
            |s| SourceArgs {
                store: Some(store),
                pids: vec![2],
                ..s
            },
        ))
        .unwrap();
        assert_eq!(summary.samples, 10);
        assert_eq!(
            summary.outputs,
            [svg_out.clone(), folded_out.clone(), pb_out.clone()]
        );
        assert_eq!(
            fs::read_to_string(&folded_out).unwrap(),
            "db;main;query 10\n"
        );
        let pb = pprof::decode(&fs::read(&pb_out).unwrap()).unwrap();
        assert_eq!(pb.total_count(), 10);
        assert!(pb.processes.iter().all(|p| p.pid == 2));
        let svg_text = fs::read_to_string(&svg_out).unwrap();
        assert!(
            svg_text.contains(
                "hearth on-CPU profile — web1, 2023-11-14T22:13:20Z to \
                 2023-11-14T22:13:40Z, 19 Hz, pid 2"
            ),
            "{}",
            &svg_text[..svg_text.len().min(3000)]
        );
        // Only the outputs and the store: no temporary or probe files.
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["out.folded", "out.pb.gz", "out.svg", "store"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_and_store_merge_and_the_title_can_be_set() {
        let dir = scratch("files");
        let store = store_with_two_windows(&dir);
        let folded_in = dir.join("in.folded");
        fs::write(&folded_in, "api;main;serve 4\nother;x 9\n").unwrap();
        let pb_in = dir.join("in.pb.gz");
        fs::write(&pb_in, pprof::encode(&window(at(T0 + 100)))).unwrap();
        let out = dir.join("out.folded");
        let svg_out = dir.join("out.svg");
        let mut with_title = with_source(args(&[&folded_in, &pb_in], &[&out, &svg_out]), |s| {
            SourceArgs {
                store: Some(store.clone()),
                processes: vec!["api".into()],
                ..s
            }
        });
        with_title.title = Some("my <title>".into());
        let summary = flamegraph(&with_title).unwrap();
        // 3 + 3 from the store, 3 from the pprof file, 4 from the folded one.
        assert_eq!(summary.samples, 13);
        assert_eq!(fs::read_to_string(&out).unwrap(), "api;main;serve 13\n");
        assert!(fs::read_to_string(&svg_out)
            .unwrap()
            .contains("my &lt;title&gt;"));

        // A store range with nothing in it does not hide the files.
        let summary = flamegraph(&with_source(args(&[&folded_in], &[&out]), |s| SourceArgs {
            store: Some(store),
            since: Some("1m".into()),
            ..s
        }))
        .unwrap();
        assert_eq!(summary.samples, 13);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_matched_is_exit_code_7() {
        let dir = scratch("nothing");
        let store = store_with_two_windows(&dir);
        let out = dir.join("out.svg");

        let err = flamegraph(&with_source(args(&[], &[&out]), |s| SourceArgs {
            store: Some(store.clone()),
            since: Some("1h".into()),
            ..s
        }))
        .unwrap_err();
        assert_eq!(err.exit_code(), 7, "{err}");
        assert!(
            err.to_string()
                .contains("2 window(s) from 2023-11-14T22:13:20Z"),
            "{err}"
        );

        let err = flamegraph(&with_source(args(&[], &[&out]), |s| SourceArgs {
            store: Some(store),
            processes: vec!["nginx".into()],
            ..s
        }))
        .unwrap_err();
        assert_eq!(err.exit_code(), 7, "{err}");
        assert!(err.to_string().contains("process nginx"), "{err}");

        let empty_store = dir.join("empty");
        fs::create_dir(&empty_store).unwrap();
        let err = flamegraph(&with_source(args(&[], &[&out]), |s| SourceArgs {
            store: Some(empty_store),
            ..s
        }))
        .unwrap_err();
        assert_eq!(err.exit_code(), 7, "{err}");

        let folded_in = dir.join("in.folded");
        fs::write(&folded_in, "api;main 4\n").unwrap();
        let err = flamegraph(&with_source(args(&[&folded_in], &[&out]), |s| SourceArgs {
            pids: vec![1],
            ..s
        }))
        .unwrap_err();
        assert_eq!(err.exit_code(), 7, "{err}");
        assert!(err.to_string().contains("use --process"), "{err}");
        assert!(!out.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_input_and_missing_store_are_exit_code_1() {
        let dir = scratch("damaged");
        let bad = dir.join("bad.pb.gz");
        fs::write(&bad, "not a profile").unwrap();
        let out = dir.join("out.svg");
        let err = flamegraph(&args(&[&bad], &[&out])).unwrap_err();
        assert_eq!(err.exit_code(), 1, "{err}");
        assert!(err.to_string().contains("bad.pb.gz"), "{err}");

        let missing = dir.join("no-store");
        let err = flamegraph(&with_source(args(&[], &[&out]), |s| SourceArgs {
            store: Some(missing.clone()),
            ..s
        }))
        .unwrap_err();
        assert_eq!(err.exit_code(), 1, "{err}");
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_title_without_a_store_names_the_files() {
        let dir = scratch("title");
        let folded_in = dir.join("in.folded");
        fs::write(&folded_in, "api;main 4\n").unwrap();
        let plan = Plan::new(&args(&[&folded_in], &[&dir.join("o.svg")]), at(T0)).unwrap();
        let profile = plan.sources.read().unwrap();
        // File names, not paths: a long path would not fit the graph.
        assert_eq!(
            default_title(&profile, &plan),
            "hearth on-CPU profile — in.folded"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
