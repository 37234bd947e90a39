//! Command-line interface: `hearth <command>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    Record(RecordArgs),
    /// Run continuously: sample every process, export each window over OTLP
    /// (`--otlp-endpoint`) or into the local store.
    Run(Box<crate::config::RunArgs>),
    /// Render a flame graph (or folded/pprof file) from the local store or
    /// from profile files.
    Flamegraph(FlamegraphArgs),
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

    /// Profile only this process (repeatable); default: every process.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Output file, format by extension: .svg (flame graph), .folded
    /// (folded stacks), .pb.gz (gzipped pprof). Repeatable.
    #[arg(short, long = "output", value_name = "FILE", required = true)]
    pub outputs: Vec<PathBuf>,

    /// Symbolize with DWARF debug info too: inlined functions and source
    /// lines, at the cost of memory (about 30 MiB more RSS when a large
    /// binary with debug info is on-CPU). Default: ELF symbol tables.
    #[arg(long)]
    pub debuginfo: bool,

    /// How often the kernel maps are drained and symbolized while
    /// recording (short-lived processes are symbolized while they live).
    #[arg(long, default_value = "1s", value_parser = parse_duration, hide = true)]
    pub drain_interval: Duration,

    /// Kernel BTF file checked before loading (tests point it elsewhere).
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux", hide = true)]
    pub kernel_btf: PathBuf,
}

#[derive(Debug, Args)]
pub struct FlamegraphArgs {
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

    /// Output file, format by extension: .svg, .folded, .pb.gz. Repeatable.
    #[arg(short, long = "output", value_name = "FILE", required = true)]
    pub outputs: Vec<PathBuf>,

    /// Flame graph title (default: what, when and where).
    #[arg(long)]
    pub title: Option<String>,
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
