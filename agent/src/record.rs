//! `hearth record`: a one-shot profile of the host or of some processes.
//!
//! Everything that can be checked before sampling is (outputs, pids,
//! privileges, BTF), so a mistake costs no recording time. While recording,
//! windows are drained and symbolized every `--drain-interval` so processes
//! that exit mid-record are still symbolized.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::bpf::{
    self, BpfError, BpfStats, OffCpuOptions, SampleSource, Sampler, SamplerOptions, Stat,
};
use crate::cli::{RecordArgs, RecordMode};
use crate::export::{self, ExportError, OutputFormat};
use crate::filter::{FilterError, FilterSpec};
use crate::pipeline::{hostname, WindowProcessor};
use crate::profile::{
    wall_clock, OffCpuSettings, Profile, ProfileBuilder, ProfileMeta, SampleKind,
};
use crate::symbolize::{BlazeSymbolizer, Symbolize, SymbolizerConfig};
use crate::unwind::UnwindStats;

/// Why a record failed. Each kind has its own exit code (see README).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{0}")]
    UnknownFormat(ExportError),
    #[error("cannot write {path}: {source}")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The export error names the file.
    #[error(transparent)]
    Write(ExportError),
    #[error(transparent)]
    Metadata(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Kubernetes(#[from] crate::metadata::kubernetes::KubernetesError),
}

impl RecordError {
    /// Process exit code for this error; documented in README.
    pub fn exit_code(&self) -> u8 {
        match self {
            RecordError::UnknownFormat(_)
            | RecordError::Filter(_)
            | RecordError::Metadata(_)
            | RecordError::Kubernetes(_) => 2,
            RecordError::Bpf(BpfError::Privileges(_)) => 3,
            RecordError::Bpf(BpfError::NoBtf { .. }) => 4,
            RecordError::NoSuchProcess(_) => 5,
            RecordError::Unwritable { .. } | RecordError::Write(_) => 6,
            RecordError::Bpf(_) => 1,
        }
    }
}

/// Longest a record of given processes waits, before sampling, for their
/// unwind tables: a short record would otherwise spend its first moments
/// with frame-pointer stacks only. Tables still loading after that keep
/// loading in the background.
const UNWIND_WAIT: Duration = Duration::from_secs(3);
/// The same for a host-wide record, which scans every process (the
/// busiest first) and should not hold sampling back for long.
const UNWIND_WAIT_HOST: Duration = Duration::from_secs(1);
/// Longest a record waits for the first pod list with `--kubernetes`.
const KUBERNETES_WAIT: Duration = Duration::from_secs(3);

/// What a finished record produced.
#[derive(Debug)]
pub struct RecordSummary {
    pub kind: SampleKind,
    /// Total of the profile's values: samples, or nanoseconds for off-CPU
    /// and wall-clock profiles.
    pub samples: u64,
    pub stats: BpfStats,
    pub outputs: Vec<PathBuf>,
    /// The unwinder's counters at the end (`None` with `--unwind fp`).
    pub unwind: Option<UnwindStats>,
}

impl RecordSummary {
    /// One line for the terminal: what was recorded and what was skipped.
    pub fn describe(&self) -> String {
        let stats = &self.stats;
        let mut line = match self.kind {
            SampleKind::OnCpu => format!("{} samples", self.samples),
            kind => format!(
                "{} of {}",
                crate::config::HumanDuration(Duration::from_nanos(self.samples)),
                kind.describe()
            ),
        };
        if self.kind != SampleKind::OnCpu || stats.get(Stat::Samples) > 0 {
            line += &format!(
                ", {} lost in the kernel (maps full), {} idle-CPU samples skipped",
                stats.lost(),
                stats.get(Stat::Idle)
            );
        }
        let filtered = stats.get(Stat::Filtered) + stats.get(Stat::OffCpuFiltered);
        if filtered > 0 {
            line += &format!(", {filtered} filtered out in the kernel (no stack walk)");
        }
        if stats.get(Stat::ProcessEventsLost) > 0 {
            line += &format!(
                ", {} process events lost (ring buffer full)",
                stats.get(Stat::ProcessEventsLost)
            );
        }
        if let Some(u) = &self.unwind {
            line += &format!(
                "; unwind tables: {} files ({} KiB) for {} processes",
                u.files_loaded,
                u.table_bytes.div_ceil(1024),
                u.processes_loaded
            );
            if u.tables_over_memory > 0 {
                line += &format!(", {} did not fit --unwind-memory", u.tables_over_memory);
            }
        }
        if self.kind.is_time() {
            line += &format!(
                "; {} of {} switch-outs followed, {} waits recorded, {} shorter waits ({} in \
                 all) and {} unsampled switches skipped, {} lost",
                stats.get(Stat::OffCpuStarted),
                stats.get(Stat::OffCpuSwitches),
                stats.get(Stat::OffCpuRecorded),
                stats.get(Stat::OffCpuBelowMin),
                crate::config::HumanDuration(Duration::from_nanos(
                    stats.get(Stat::OffCpuBelowMinNs)
                )),
                stats.get(Stat::OffCpuUnsampled),
                stats.off_cpu_lost(),
            );
        }
        line
    }
}

pub async fn record(args: &RecordArgs) -> Result<RecordSummary, RecordError> {
    check_outputs(&args.outputs)?;
    let metadata_config = args.metadata.config()?;
    for &pid in &args.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(RecordError::NoSuchProcess(pid));
        }
    }
    let rules = args.filter.rules();
    rules.check_kubernetes(metadata_config.kubernetes)?;
    let filter = FilterSpec::new(&rules)?;
    // Stop when every --pid target exited, unless other rules include more.
    let only_pids = !args.pids.is_empty()
        && filter.include_names.is_empty()
        && filter.include_cgroups.is_empty()
        && !filter.pods.has_includes();
    bpf::check_privileges()?;
    bpf::check_btf(&args.kernel_btf)?;

    let metadata = crate::metadata::start(&metadata_config, &filter.pods)?;
    if let Some(pods) = &metadata.pods {
        // A record is short: give the first pod list a moment, so the
        // first windows are tagged (later ones are in any case).
        let deadline = Instant::now() + KUBERNETES_WAIT;
        while !pods.is_synced() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !pods.is_synced() {
            warn!("no pod list from the Kubernetes API yet; processes are tagged once it arrives");
        }
    }
    let mode = args.off_cpu.mode();
    let off_cpu = (mode != RecordMode::OnCpu).then(|| {
        OffCpuSettings::new(
            args.off_cpu.off_cpu_min,
            args.off_cpu.off_cpu_sample,
            args.off_cpu.off_cpu_max_rate,
        )
    });
    let frequency_hz = if mode == RecordMode::OffCpu {
        0
    } else {
        args.frequency
    };
    let mut sampler = Sampler::start(&SamplerOptions {
        frequency_hz,
        off_cpu: off_cpu.map(|settings| OffCpuOptions {
            min_ns: settings.min_ns,
            sample_probability: args.off_cpu.off_cpu_sample,
            max_rate: settings.max_rate,
            force_syscall_exit: args.off_cpu.off_cpu_syscall_exit,
            empty_programs: args.off_cpu.off_cpu_empty_programs,
            ..OffCpuOptions::default()
        }),
        pids: args.pids.clone(),
        filter: filter.clone(),
        unwind: args.unwind,
        unwind_memory: args.unwind_memory,
        unwind_wait: if args.pids.is_empty() {
            UNWIND_WAIT_HOST
        } else {
            UNWIND_WAIT
        },
        capture_facts: Some(metadata.read_options()),
        ..SamplerOptions::default()
    })?;
    crate::filter::pods::start_feeder(
        &filter.pods,
        metadata.pods.as_ref(),
        sampler.filter_handle(),
    );
    let started = Instant::now();
    info!(
        frequency_hz,
        ?mode,
        duration = ?args.duration,
        pids = ?args.pids,
        filter = filter.describe(),
        "recording"
    );

    let mut processor = WindowProcessor::with_metadata(
        BlazeSymbolizer::with_config(SymbolizerConfig {
            debug_syms: args.debuginfo,
            ..SymbolizerConfig::default()
        }),
        crate::metadata::MetadataResolver::new(metadata),
    )
    .with_filter(filter);
    let meta = |kind| ProfileMeta {
        kind,
        start: SystemTime::now(),
        duration: Duration::ZERO,
        frequency_hz,
        hostname: hostname(),
    };
    let mut merged = Merged {
        on_cpu: ProfileBuilder::new(meta(SampleKind::OnCpu)),
        off_cpu: off_cpu.map(|s| ProfileBuilder::new(meta(SampleKind::OffCpu(s)))),
        settings: off_cpu,
    };
    let mut stats = BpfStats::default();
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut next_drain = tokio::time::Instant::now() + args.drain_interval;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c => {
                info!("interrupted: writing what was recorded");
                break;
            }
            _ = poll.tick() => {
                if only_pids && args.pids.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    info!("every target process exited");
                    break;
                }
                if tokio::time::Instant::now() >= next_drain {
                    drain_into(&mut sampler, &mut processor, &mut merged, &mut stats)?;
                    next_drain += args.drain_interval;
                }
            }
        }
    }
    // Stop first so the final drain holds everything sampled.
    sampler.stop()?;
    drain_into(&mut sampler, &mut processor, &mut merged, &mut stats)?;
    let unwind = sampler.unwind_stats();
    if let Some(u) = &unwind {
        info!(
            files_loaded = u.files_loaded,
            table_bytes = u.table_bytes,
            files_built = u.files_built,
            build_ms = u.build_ns / 1_000_000,
            frame_pointer_files = u.frame_pointer_files,
            files_without_table = u.files_without_table,
            evicted = u.files_evicted,
            over_memory = u.tables_over_memory,
            processes = u.processes_loaded,
            "unwind tables"
        );
    }
    let events = sampler.event_counters();
    info!(
        execs = events.execs.load(Ordering::Relaxed),
        exits = events.exits.load(Ordering::Relaxed),
        captures_too_late = events.captures_too_late.load(Ordering::Relaxed),
        captures_superseded = events.captures_superseded.load(Ordering::Relaxed),
        captures_repeated = events.captures_repeated.load(Ordering::Relaxed),
        captures_dropped = events.captures_dropped.load(Ordering::Relaxed),
        recaptures = events.recaptures.load(Ordering::Relaxed),
        captures = events.captures.load(Ordering::Relaxed),
        forks_captured = events.forks_captured.load(Ordering::Relaxed),
        capture_us = events.capture_ns.load(Ordering::Relaxed) / 1_000,
        facts_us = events.facts_ns.load(Ordering::Relaxed) / 1_000,
        filtered_at_drain = processor.filtered_at_drain,
        "process events"
    );
    drop(sampler);
    let elapsed = started.elapsed();

    let on_cpu = merged.on_cpu.build();
    let off_cpu = merged.off_cpu.map(ProfileBuilder::build);
    let mut profile = match (mode, off_cpu) {
        (RecordMode::OffCpu, Some(off)) => off,
        (RecordMode::Wall, Some(off)) => wall_clock(&on_cpu, &off),
        _ => on_cpu,
    };
    profile.meta.duration = elapsed;
    if stats.lost() > 0 {
        warn!(
            lost = stats.lost(),
            "samples lost in the kernel (maps full)"
        );
    }
    if stats.off_cpu_lost() > 0 {
        warn!(
            lost = stats.off_cpu_lost(),
            "off-CPU waits lost in the kernel (maps full)"
        );
    }
    write_outputs(&profile, &args.outputs)?;
    let sym = processor.symbolizer().stats();
    // Off-CPU and wall-clock profiles weigh in nanoseconds, not samples.
    let (samples, nanoseconds) = match profile.meta.kind {
        SampleKind::OnCpu => (profile.total_count(), 0),
        _ => (0, profile.total_count()),
    };
    info!(
        samples,
        nanoseconds,
        stacks = profile.samples.len(),
        symbol_cache_hits = sym.cache_hits,
        symbol_cache_misses = sym.cache_misses,
        "recorded"
    );
    Ok(RecordSummary {
        kind: profile.meta.kind,
        samples: profile.total_count(),
        stats,
        outputs: args.outputs.clone(),
        unwind,
    })
}

/// The record so far, one profile per kind of time.
struct Merged {
    on_cpu: ProfileBuilder,
    off_cpu: Option<ProfileBuilder>,
    settings: Option<OffCpuSettings>,
}

fn drain_into<S: Symbolize>(
    sampler: &mut Sampler,
    processor: &mut WindowProcessor<S>,
    merged: &mut Merged,
    stats: &mut BpfStats,
) -> Result<(), RecordError> {
    let window = sampler.drain()?;
    stats.add(&window.stats);
    let profiles = processor.process(&window, sampler.frequency_hz(), merged.settings);
    merged.on_cpu.merge(&profiles.on_cpu);
    if let (Some(into), Some(off)) = (&mut merged.off_cpu, &profiles.off_cpu) {
        into.merge(off);
    }
    Ok(())
}

/// Checks each output has a known format and can be created, before any
/// sampling.
fn check_outputs(paths: &[PathBuf]) -> Result<(), RecordError> {
    for path in paths {
        OutputFormat::from_path(path).map_err(RecordError::UnknownFormat)?;
        export::check_writable(path).map_err(|source| RecordError::Unwritable {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn write_outputs(profile: &Profile, outputs: &[PathBuf]) -> Result<(), RecordError> {
    for path in outputs {
        export::write_profile_to_path(profile, path).map_err(RecordError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_extension_is_a_usage_error() {
        let err = check_outputs(&[PathBuf::from("/tmp/out.png")]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(".svg"), "{err}");
    }

    #[test]
    fn unwritable_directory_is_reported_before_sampling() {
        let err = check_outputs(&[PathBuf::from("/nonexistent-dir/out.svg")]).unwrap_err();
        assert_eq!(err.exit_code(), 6);
        assert!(
            err.to_string().contains("/nonexistent-dir/out.svg"),
            "{err}"
        );
    }

    #[test]
    fn writable_output_leaves_no_probe_behind() {
        let dir = std::env::temp_dir().join(format!("hearth-record-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("x.folded");
        check_outputs(std::slice::from_ref(&out)).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
