//! Command-line interface: `hearth <command>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::unwind::UnwindMode;

#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    about = "Host-wide continuous profiler (eBPF)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Profile the host (or some processes) once and write flame graph,
    /// pprof or folded files.
    Record(Box<RecordArgs>),
    /// Run continuously: sample every process, export each window over OTLP
    /// (`--otlp-endpoint`) or into the local store.
    Run(Box<crate::config::RunArgs>),
    /// Render a flame graph (or folded/pprof file) from the local store or
    /// from profile files.
    Flamegraph(FlamegraphArgs),
    /// Compare two profiles: a differential flame graph (red grew, blue
    /// shrank) and the functions whose share changed most.
    Diff(DiffArgs),
    /// Rank functions by self or total share; `--live` samples the host and
    /// refreshes like `perf top`.
    Top(TopArgs),
    /// CI gate: exit 1 when a function's share passes its budget or grows
    /// more than allowed between BASE and NEW.
    Check(CheckArgs),
    /// Build the unwind table of ELF files and print its size, the time it
    /// took and the memory it needed (diagnostics and benchmarks).
    #[command(hide = true)]
    UnwindTable(UnwindTableArgs),
}

#[derive(Debug, Args)]
pub struct UnwindTableArgs {
    /// ELF executables or shared libraries.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// How long to record: 500ms, 10s, 2m... Ctrl-C ends earlier and still
    /// writes every output.
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Samples per second per CPU.
    #[arg(short = 'F', long, default_value_t = 99,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub frequency: u64,

    /// Profile only this process (repeatable; also `--include-pid`);
    /// default: every process. Its children are not included.
    #[arg(short, long = "pid", visible_alias = "include-pid", value_name = "PID")]
    pub pids: Vec<u32>,

    #[command(flatten)]
    pub filter: FilterArgs,

    /// Output file, format by extension: .svg (flame graph), .folded
    /// (folded stacks), .pb.gz (gzipped pprof). Repeatable.
    #[arg(short, long = "output", value_name = "FILE", required = true)]
    pub outputs: Vec<PathBuf>,

    /// Symbolize with DWARF debug info too: inlined functions and source
    /// lines, at the cost of memory (about 30 MiB more RSS when a large
    /// binary with debug info is on-CPU). Default: ELF symbol tables.
    #[arg(long)]
    pub debuginfo: bool,

    /// How user stacks are unwound: `dwarf` uses unwind tables built from
    /// each file's .eh_frame (complete stacks for code built without frame
    /// pointers), `fp` frame pointers only, `auto` tables for the files
    /// that lack frame pointers and frame pointers for the others.
    #[arg(long, value_enum, default_value_t = UnwindMode::Auto, value_name = "MODE")]
    pub unwind: UnwindMode,

    /// Cap on the kernel memory unwind tables take; tables of files no
    /// live process maps are evicted to stay under it.
    #[arg(long, default_value = "16MiB", value_name = "SIZE",
          value_parser = parse_unwind_memory)]
    pub unwind_memory: u64,

    /// How often the kernel maps are drained and symbolized while
    /// recording (short-lived processes are symbolized while they live).
    #[arg(long, default_value = "1s", value_parser = parse_duration, hide = true)]
    pub drain_interval: Duration,

    /// Kernel BTF file checked before loading (tests point it elsewhere).
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux", hide = true)]
    pub kernel_btf: PathBuf,

    #[command(flatten)]
    pub off_cpu: OffCpuArgs,

    #[command(flatten)]
    pub metadata: MetadataArgs,
}

/// What `hearth record` tags processes with beyond /proc (as `hearth run`).
#[derive(Debug, Clone, Default, Args)]
pub struct MetadataArgs {
    /// Tag processes with Kubernetes metadata from a watch on this node's
    /// pods (NODE_NAME). Default: on when KUBERNETES_SERVICE_HOST is set.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub kubernetes: Option<bool>,

    /// Kubernetes API server URL, plain and without authentication
    /// (default: in-cluster, with the service account).
    #[arg(long, env = "HEARTH_KUBERNETES_API", value_name = "URL")]
    pub kubernetes_api: Option<String>,

    /// Pod label copied to `k8s.pod.label.<KEY>` (repeatable).
    #[arg(long = "pod-label", value_name = "KEY")]
    pub pod_labels: Vec<String>,

    /// Resource attribute `key=value` on every process (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE",
          value_parser = crate::metadata::service::parse_tag)]
    pub tags: Vec<(String, String)>,

    /// Tag processes with their command line (`process.command_line`);
    /// off by default, command lines can hold secrets.
    #[arg(long)]
    pub command_line: bool,
}

impl MetadataArgs {
    /// The checked settings, as `hearth run` resolves them.
    pub fn config(&self) -> Result<crate::config::MetadataConfig, crate::config::ConfigError> {
        let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        crate::config::MetadataConfig::resolve(
            self.kubernetes,
            self.kubernetes_api.clone(),
            &self.pod_labels,
            &tags,
            self.command_line,
        )
    }
}

/// Process filters besides `--pid` (shared by `record`; `run` has the same
/// as configuration keys). Includes add up, excludes win.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Leave this process out (repeatable).
    #[arg(long = "exclude-pid", value_name = "PID")]
    pub exclude_pids: Vec<u32>,

    /// Profile processes whose name or executable file name matches this
    /// regular expression (repeatable; matched at exec).
    #[arg(long = "include-name", value_name = "REGEX")]
    pub include_names: Vec<String>,

    /// Leave out processes whose name or executable file name matches
    /// (repeatable).
    #[arg(long = "exclude-name", value_name = "REGEX")]
    pub exclude_names: Vec<String>,

    /// Profile processes in this cgroup v2 subtree: a directory of the
    /// unified hierarchy or a path relative to it, as in /proc/PID/cgroup
    /// (repeatable).
    #[arg(long = "include-cgroup", value_name = "PATH")]
    pub include_cgroups: Vec<String>,

    /// Leave out processes in this cgroup v2 subtree (repeatable).
    #[arg(long = "exclude-cgroup", value_name = "PATH")]
    pub exclude_cgroups: Vec<String>,

    /// Profile the pods of this Kubernetes namespace (repeatable; needs
    /// Kubernetes metadata).
    #[arg(long = "include-namespace", value_name = "NAMESPACE")]
    pub include_namespaces: Vec<String>,

    /// Leave out the pods of this Kubernetes namespace (repeatable).
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
    pub exclude_namespaces: Vec<String>,

    /// Profile the pods this label selector picks, e.g.
    /// `app=web,tier!=db` or `env in (prod,staging)` (repeatable).
    #[arg(long = "include-pod-selector", value_name = "SELECTOR")]
    pub include_pod_selectors: Vec<String>,

    /// Leave out the pods this label selector picks (repeatable).
    #[arg(long = "exclude-pod-selector", value_name = "SELECTOR")]
    pub exclude_pod_selectors: Vec<String>,
}

impl FilterArgs {
    /// The rules; `--pid` targets are added by `record` itself.
    pub fn rules(&self) -> crate::filter::FilterRules {
        crate::filter::FilterRules {
            include_pids: Vec::new(),
            exclude_pids: self.exclude_pids.clone(),
            include_names: self.include_names.clone(),
            exclude_names: self.exclude_names.clone(),
            include_cgroups: self.include_cgroups.clone(),
            exclude_cgroups: self.exclude_cgroups.clone(),
            include_namespaces: self.include_namespaces.clone(),
            exclude_namespaces: self.exclude_namespaces.clone(),
            include_pod_selectors: self.include_pod_selectors.clone(),
            exclude_pod_selectors: self.exclude_pod_selectors.clone(),
        }
    }
}

/// What kind of time a record measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordMode {
    OnCpu,
    OffCpu,
    Wall,
}

/// Off-CPU and wall-clock profiling flags of `hearth record`.
#[derive(Debug, Clone, Args)]
pub struct OffCpuArgs {
    /// Record off-CPU time instead of CPU samples: where threads wait
    /// (sleep, I/O, locks, pipes) or stand preempted, weighted by the time.
    #[arg(long, conflicts_with = "wall")]
    pub off_cpu: bool,

    /// Record wall-clock time per thread: CPU samples converted to time,
    /// plus off-CPU time. What to look at when a request is slow.
    #[arg(long)]
    pub wall: bool,

    /// With --off-cpu/--wall: waits shorter than this are counted but not
    /// recorded (they are the bulk of context switches and cost).
    #[arg(long, default_value = "1ms", value_name = "DURATION",
          value_parser = parse_off_cpu_min)]
    pub off_cpu_min: Duration,

    /// With --off-cpu/--wall: share of context switches followed, in
    /// (0, 1]; recorded times are scaled up by its inverse.
    #[arg(long, default_value_t = 1.0, value_name = "PROBABILITY",
          value_parser = parse_probability)]
    pub off_cpu_sample: f64,

    /// With --off-cpu/--wall: on a CPU switching more often than this per
    /// second, fewer switches are followed, at random, to keep to it, and
    /// recorded times are scaled up for the others; 0: no cap.
    #[arg(long, default_value_t = crate::config::DEFAULT_OFF_CPU_MAX_RATE,
          value_name = "PER_SECOND", value_parser = parse_off_cpu_max_rate)]
    pub off_cpu_max_rate: u64,

    /// Take waits in system calls at `sys_exit`, as on kernels without the
    /// `rseq_update` tracepoint (for the benchmark of that fallback).
    #[arg(long, hide = true)]
    pub off_cpu_syscall_exit: bool,

    /// Attach the off-CPU programs but have them return at once: what the
    /// tracepoints alone cost (for the benchmark's floor; records nothing).
    #[arg(long, hide = true)]
    pub off_cpu_empty_programs: bool,
}

impl OffCpuArgs {
    pub fn mode(&self) -> RecordMode {
        if self.wall {
            RecordMode::Wall
        } else if self.off_cpu {
            RecordMode::OffCpu
        } else {
            RecordMode::OnCpu
        }
    }
}

/// A minimum blocked time: a duration, or 0 to record every wait.
pub fn parse_off_cpu_min(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// A table memory cap: a size up to the largest the loader accepts.
pub fn parse_unwind_memory(text: &str) -> Result<u64, String> {
    let size: crate::config::ByteSize = text.parse()?;
    crate::unwind::check_table_memory(size.0)
}

/// A probability in (0, 1].
/// A cap on followed context switches per second per CPU; 0 for none.
pub fn parse_off_cpu_max_rate(text: &str) -> Result<u64, String> {
    let rate: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number of switches per second"))?;
    if rate > crate::config::MAX_OFF_CPU_MAX_RATE {
        return Err(format!(
            "{rate} is above {} (0 turns the cap off)",
            crate::config::MAX_OFF_CPU_MAX_RATE
        ));
    }
    Ok(rate)
}

pub fn parse_probability(text: &str) -> Result<f64, String> {
    let p: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number; use e.g. 0.1 for 10%"))?;
    if p > 0.0 && p <= 1.0 {
        Ok(p)
    } else {
        Err(format!("{p} is outside (0, 1]"))
    }
}

/// Where profiles are read from: files and/or a local store selection,
/// filtered by process. Shared by the commands that read profiles back.
#[derive(Debug, Clone, Default, Args)]
pub struct SourceArgs {
    /// Profile files to merge (.pb.gz/.pprof or .folded).
    #[arg(value_name = "FILE")]
    pub inputs: Vec<PathBuf>,

    /// Read the windows of this local store directory (as written by
    /// `hearth run`).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// With --store: only windows that end after this: a duration back from
    /// now (10m, 2h) or an RFC 3339 time (2026-11-21T10:00:00Z).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,

    /// With --store: only windows that start before this (same forms as
    /// --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,

    /// Only samples of this process id (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Only samples of processes with this name (repeatable).
    #[arg(long = "process", value_name = "NAME")]
    pub processes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct FlamegraphArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Output file, format by extension: .svg, .folded, .pb.gz. Repeatable.
    #[arg(short, long = "output", value_name = "FILE", required = true)]
    pub outputs: Vec<PathBuf>,

    /// Flame graph title (default: what, when and where).
    #[arg(long)]
    pub title: Option<String>,
}

/// Two profiles to compare: `BASE NEW` files (pprof or folded), or two
/// time ranges of one store, with the same process filter for both.
#[derive(Debug, Clone, Default, Args)]
pub struct CompareArgs {
    /// BASE and NEW profile files (.pb.gz/.pprof or .folded). With --store,
    /// leave them out.
    #[arg(value_name = "FILE", num_args = 0..=2)]
    pub files: Vec<PathBuf>,

    /// Compare two time ranges of this local store instead.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// With --store: start of the BASE range (10m, 2h, or an RFC 3339 time).
    #[arg(long, value_name = "WHEN")]
    pub base_since: Option<String>,

    /// With --store: end of the BASE range.
    #[arg(long, value_name = "WHEN")]
    pub base_until: Option<String>,

    /// With --store: start of the NEW range.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,

    /// With --store: end of the NEW range (default: now).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,

    /// Only samples of this process id (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Only samples of processes with this name (repeatable).
    #[arg(long = "process", value_name = "NAME")]
    pub processes: Vec<String>,
}

impl CompareArgs {
    /// The BASE and NEW sources. BASE is `None` when only NEW was given
    /// (one file, or a store without a BASE range), which `check` accepts
    /// for budgets alone.
    pub fn sources(&self) -> Result<(Option<SourceArgs>, SourceArgs), String> {
        let source =
            |inputs: Vec<PathBuf>, since: &Option<String>, until: &Option<String>| SourceArgs {
                inputs,
                store: self
                    .store
                    .clone()
                    .filter(|_| since.is_some() || until.is_some()),
                since: since.clone(),
                until: until.clone(),
                pids: self.pids.clone(),
                processes: self.processes.clone(),
            };
        match (&self.store, self.files.as_slice()) {
            (None, [base, new]) => Ok((
                Some(source(vec![base.clone()], &None, &None)),
                source(vec![new.clone()], &None, &None),
            )),
            (None, [new]) => Ok((None, source(vec![new.clone()], &None, &None))),
            (None, []) => Err("give BASE and NEW profile files, or --store DIR with \
                 --base-since/--base-until and --since/--until"
                .into()),
            (None, _) => Err("at most two files: BASE and NEW".into()),
            (Some(_), [_, ..]) => Err("with --store, select BASE and NEW with \
                 --base-since/--base-until and --since/--until instead of files"
                .into()),
            (Some(dir), []) => {
                let base = (self.base_since.is_some() || self.base_until.is_some())
                    .then(|| source(Vec::new(), &self.base_since, &self.base_until));
                // NEW without a range: the whole store from its start.
                let mut new = source(Vec::new(), &self.since, &self.until);
                new.store = Some(dir.clone());
                Ok((base, new))
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub compare: CompareArgs,

    /// Output, by extension: .svg (differential flame graph) or .txt (the
    /// change report). Repeatable; the report also goes to stdout.
    #[arg(short, long = "output", value_name = "FILE")]
    pub outputs: Vec<PathBuf>,

    /// Functions listed in the report.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub limit: usize,
}

/// What `hearth top` ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RankBy {
    /// Samples where the function is the leaf.
    #[value(name = "self")]
    SelfShare,
    /// Samples where the function is anywhere on the stack.
    Total,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Rank by self or total share.
    #[arg(long, value_enum, default_value = "self")]
    pub by: RankBy,

    /// Rows to show.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub limit: usize,

    /// An earlier profile file to show the trend against.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["compare_since", "compare_until"])]
    pub compare_with: Option<PathBuf>,

    /// With --store: start of the earlier range to show the trend against.
    #[arg(long, value_name = "WHEN")]
    pub compare_since: Option<String>,

    /// With --store: end of the earlier range.
    #[arg(long, value_name = "WHEN")]
    pub compare_until: Option<String>,

    /// Sample the host now and refresh the table every --refresh, like
    /// `perf top` (Ctrl-C ends).
    #[arg(long, conflicts_with_all = ["inputs", "store", "compare_with"])]
    pub live: bool,

    /// With --live: samples per second per CPU.
    #[arg(short = 'F', long, default_value_t = 99,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub frequency: u64,

    /// With --live: how often the table is redrawn.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub refresh: Duration,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub compare: CompareArgs,

    /// Budget `FUNCTION=PERCENT` of total samples (self share by default;
    /// `total:FUNCTION=PERCENT` for the total share). Repeatable.
    #[arg(long = "max", value_name = "FUNCTION=PERCENT")]
    pub budgets: Vec<String>,

    /// Largest allowed growth of any function's share from BASE to NEW, in
    /// percentage points (`10%` = 10 points).
    #[arg(long, value_name = "PERCENT")]
    pub max_regression: Option<String>,
}

/// Parses `500ms`, `10s`, `2m`, `1h`; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?} ({e}); use e.g. 500ms, 10s, 2m"))?;
    if d.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").unwrap_err().contains("500ms"));
        assert_eq!(parse_off_cpu_min("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_off_cpu_min("2ms").unwrap(), Duration::from_millis(2));
    }

    #[test]
    fn probabilities() {
        assert_eq!(parse_probability("0.25").unwrap(), 0.25);
        assert_eq!(parse_probability("1").unwrap(), 1.0);
        assert!(parse_probability("0").unwrap_err().contains("(0, 1]"));
        assert!(parse_probability("1.5").is_err());
        assert!(parse_probability("lots").unwrap_err().contains("0.1"));
    }

    #[test]
    fn record_needs_an_output_and_a_sane_frequency() {
        assert!(Cli::try_parse_from(["hearth", "record"]).is_err());
        assert!(Cli::try_parse_from(["hearth", "record", "-o", "x.svg", "-F", "0"]).is_err());
        let cli = Cli::try_parse_from([
            "hearth", "record", "-d", "2s", "-o", "a.svg", "-o", "b.pb.gz", "--pid", "1",
        ])
        .unwrap();
        let Command::Record(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.outputs.len(), 2);
        assert_eq!(args.pids, [1]);
        assert_eq!(args.duration, Duration::from_secs(2));
    }
}
