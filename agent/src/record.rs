//! `hearth record`: a one-shot profile of the host or of some processes.
//!
//! Everything that can be checked before sampling is (outputs, pids,
//! privileges, BTF), so a mistake costs no recording time. While recording,
//! windows are drained and symbolized every `--drain-interval` so processes
//! that exit mid-record are still symbolized.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::bpf::{self, BpfError, BpfStats, SampleSource, Sampler, SamplerOptions};
use crate::cli::RecordArgs;
use crate::export::{self, ExportError, OutputFormat};
use crate::pipeline::{hostname, WindowProcessor};
use crate::profile::{Profile, ProfileBuilder, ProfileMeta, SampleKind};
use crate::symbolize::{BlazeSymbolizer, Symbolize, SymbolizerConfig};

/// Why a record failed. Each kind has its own exit code (see README).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
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
}

impl RecordError {
    /// Process exit code for this error; documented in README.
    pub fn exit_code(&self) -> u8 {
        match self {
            RecordError::UnknownFormat(_) => 2,
            RecordError::Bpf(BpfError::Privileges { .. }) => 3,
            RecordError::Bpf(BpfError::NoBtf { .. }) => 4,
            RecordError::NoSuchProcess(_) => 5,
            RecordError::Unwritable { .. } | RecordError::Write(_) => 6,
            RecordError::Bpf(_) => 1,
        }
    }
}

/// What a finished record produced.
#[derive(Debug)]
pub struct RecordSummary {
    pub samples: u64,
    pub stats: BpfStats,
    pub outputs: Vec<PathBuf>,
}

pub async fn record(args: &RecordArgs) -> Result<RecordSummary, RecordError> {
    check_outputs(&args.outputs)?;
    for &pid in &args.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(RecordError::NoSuchProcess(pid));
        }
    }
    bpf::check_privileges()?;
    bpf::check_btf(&args.kernel_btf)?;

    let mut sampler = Sampler::start(&SamplerOptions {
        frequency_hz: args.frequency,
        pids: args.pids.clone(),
        ..SamplerOptions::default()
    })?;
    let started = Instant::now();
    info!(
        frequency_hz = args.frequency,
        duration = ?args.duration,
        pids = ?args.pids,
        "recording"
    );

    let mut processor = WindowProcessor::new(BlazeSymbolizer::with_config(SymbolizerConfig {
        debug_syms: args.debuginfo,
        ..SymbolizerConfig::default()
    }));
    let mut merged = ProfileBuilder::new(ProfileMeta {
        kind: SampleKind::OnCpu,
        start: SystemTime::now(),
        duration: Duration::ZERO,
        frequency_hz: args.frequency,
        hostname: hostname(),
    });
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
                if !args.pids.is_empty() && args.pids.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists()) {
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
    drop(sampler);
    let elapsed = started.elapsed();

    let mut profile = merged.build();
    profile.meta.duration = elapsed;
    if stats.lost() > 0 {
        warn!(
            lost = stats.lost(),
            "samples lost in the kernel (maps full)"
        );
    }
    write_outputs(&profile, &args.outputs)?;
    let sym = processor.symbolizer().stats();
    info!(
        samples = profile.total_count(),
        stacks = profile.samples.len(),
        symbol_cache_hits = sym.cache_hits,
        symbol_cache_misses = sym.cache_misses,
        "recorded"
    );
    Ok(RecordSummary {
        samples: profile.total_count(),
        stats,
        outputs: args.outputs.clone(),
    })
}

fn drain_into<S: Symbolize>(
    sampler: &mut Sampler,
    processor: &mut WindowProcessor<S>,
    merged: &mut ProfileBuilder,
    stats: &mut BpfStats,
) -> Result<(), RecordError> {
    let window = sampler.drain()?;
    stats.add(&window.stats);
    let profile = processor.process(&window, sampler.frequency_hz());
    merged.merge(&profile);
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
