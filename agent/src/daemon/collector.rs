//! The collector thread: owns the loaded programs, drains a window every
//! interval (±10% jitter), symbolizes and tags it, and hands the profile to
//! the export thread. It never waits on an exporter: the hand-off is an
//! unbounded channel that the export thread empties with local work only.
//!
//! The symbolizer is not `Send` (blazesym keeps `Rc`s), which is why this is
//! a thread of its own rather than a task.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::governor::{ChangeReason, CpuMeter, Governor, GovernorConfig};
use super::DaemonError;
use crate::bpf::{BpfError, OffCpuOptions, SampleSource, Sampler, SamplerOptions, Stat};
use crate::config::OffCpuConfig;
use crate::filter::FilterSpec;
use crate::metadata::{MetadataOptions, MetadataResolver};
use crate::metrics::Metrics;
use crate::pipeline::WindowProcessor;
use crate::profile::{wall_clock, OffCpuSettings, Profile};
use crate::symbolize::{BlazeSymbolizer, Symbolize, SymbolizerConfig};
use crate::unwind::UnwindMode;

/// Commands from the daemon to the collector thread.
#[derive(Debug)]
pub enum CollectorCommand {
    /// Stop sampling, drain the last partial window, hand it over and exit.
    Stop,
}

/// Windows after start-up during which the governor only watches.
const GOVERNOR_WARMUP_WINDOWS: u32 = 2;

/// What the collector thread needs to start.
#[derive(Debug, Clone)]
pub struct CollectorOptions {
    pub interval: Duration,
    pub governor: GovernorConfig,
    pub debuginfo: bool,
    pub off_cpu: Option<OffCpuConfig>,
    pub unwind: UnwindMode,
    pub unwind_memory: u64,
    pub filter: FilterSpec,
    pub metadata: MetadataOptions,
}

/// Starts sampling on a new thread. Returns once the programs are attached
/// (or failed to attach), so start-up errors reach the caller.
pub fn spawn(
    options: CollectorOptions,
    metrics: Arc<Metrics>,
    windows: Sender<Profile>,
    commands: Receiver<CollectorCommand>,
) -> Result<std::thread::JoinHandle<Result<(), BpfError>>, DaemonError> {
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name("hearth-collector".into())
        .spawn(move || run(options, metrics, windows, commands, started_tx))
        .map_err(DaemonError::Thread)?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(DaemonError::Bpf(e))
        }
        Err(_) => Err(DaemonError::Thread(std::io::Error::other(
            "the collector thread exited during start-up",
        ))),
    }
}

fn run(
    options: CollectorOptions,
    metrics: Arc<Metrics>,
    windows: Sender<Profile>,
    commands: Receiver<CollectorCommand>,
    started: SyncSender<Result<(), BpfError>>,
) -> Result<(), BpfError> {
    let mut governor = Governor::new(options.governor);
    let sampler = Sampler::start(&SamplerOptions {
        frequency_hz: governor.frequency_hz(),
        off_cpu: options.off_cpu.map(|o| OffCpuOptions {
            min_ns: o.settings().min_ns,
            sample_probability: o.sample_probability,
            max_rate: o.max_rate,
            ..OffCpuOptions::default()
        }),
        unwind: options.unwind,
        unwind_memory: options.unwind_memory,
        filter: options.filter.clone(),
        capture_facts: Some(options.metadata.read_options()),
        ..SamplerOptions::default()
    });
    let mut sampler = match sampler {
        Ok(s) => s,
        Err(e) => {
            // Reported through the channel; the caller gives up.
            let _ = started.send(Err(e));
            return Ok(());
        }
    };
    let _ = started.send(Ok(()));
    crate::filter::pods::start_feeder(
        &options.filter.pods,
        options.metadata.pods.as_ref(),
        sampler.filter_handle(),
    );
    Metrics::set(&metrics.frequency_hz, sampler.frequency_hz());
    info!(
        frequency_hz = sampler.frequency_hz(),
        interval = ?options.interval,
        filter = options.filter.describe(),
        "sampling"
    );

    let mut collector = Collector {
        processor: WindowProcessor::with_metadata(
            BlazeSymbolizer::with_config(SymbolizerConfig {
                debug_syms: options.debuginfo,
                ..SymbolizerConfig::default()
            }),
            MetadataResolver::new(options.metadata.clone()),
        )
        .with_filter(options.filter.clone()),
        metrics,
        windows,
        off_cpu: options.off_cpu,
        off_cpu_settings: options.off_cpu.map(|o| o.settings()),
        pods: options.metadata.pods.clone(),
    };
    let mut meter = match CpuMeter::new() {
        Ok(m) => Some(m),
        Err(e) => {
            warn!(error = %e, "cannot measure CPU use; the overhead governor is off");
            None
        }
    };
    // The first windows symbolize every process on the host from cold
    // caches; that one-off cost says nothing about the steady state the
    // governor budgets for.
    let mut warmup_windows = GOVERNOR_WARMUP_WINDOWS;
    let jitter = Jitter::new();
    let mut next_drain = Instant::now() + jitter.apply(options.interval);
    loop {
        let wait = next_drain.saturating_duration_since(Instant::now());
        match commands.recv_timeout(wait) {
            Ok(CollectorCommand::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        next_drain += jitter.apply(options.interval);

        let change = meter.as_mut().and_then(|m| match m.observe() {
            Ok(_) if warmup_windows > 0 => {
                warmup_windows -= 1;
                None
            }
            Ok(observation) => governor.observe(observation),
            Err(e) => {
                debug!(error = %e, "CPU reading failed; governor skips this window");
                None
            }
        });
        match change {
            None => collector.drain(&mut sampler)?,
            Some(change) => {
                // Stop, drain, resume: the drained window was sampled at
                // the old frequency only, the next at the new one.
                sampler.stop()?;
                collector.drain(&mut sampler)?;
                sampler.resume(change.to_hz)?;
                match change.reason {
                    ChangeReason::Lowered(pressure) => warn!(
                        from_hz = change.from_hz,
                        to_hz = change.to_hz,
                        ?pressure,
                        "overhead governor lowered the sampling frequency"
                    ),
                    ChangeReason::Restored => info!(
                        from_hz = change.from_hz,
                        to_hz = change.to_hz,
                        "overhead governor raised the sampling frequency"
                    ),
                }
                Metrics::add(&collector.metrics.frequency_changes, 1);
                Metrics::set(&collector.metrics.frequency_hz, change.to_hz);
            }
        }
    }
    // Stop first so the final drain holds everything sampled.
    sampler.stop()?;
    collector.drain(&mut sampler)?;
    info!("sampling stopped; programs detached");
    Ok(())
}

/// The per-window work after the drain.
struct Collector {
    processor: WindowProcessor<BlazeSymbolizer>,
    metrics: Arc<Metrics>,
    windows: Sender<Profile>,
    off_cpu: Option<OffCpuConfig>,
    /// How off-CPU windows describe their recording.
    off_cpu_settings: Option<OffCpuSettings>,
    /// The pod watch's index, for its metrics.
    pods: Option<crate::metadata::PodIndex>,
}

impl Collector {
    fn drain(&mut self, sampler: &mut Sampler) -> Result<(), BpfError> {
        let window = sampler.drain()?;
        let profiles =
            self.processor
                .process(&window, sampler.frequency_hz(), self.off_cpu_settings);
        let profile = &profiles.on_cpu;
        let m = &self.metrics;
        for stat in Stat::ALL {
            Metrics::add(&m.bpf_events[stat as usize], window.stats.get(stat));
        }
        if window.stats.lost() > 0 {
            warn!(
                lost = window.stats.lost(),
                "samples lost in the kernel this window (maps full)"
            );
        }
        Metrics::add(&m.windows_collected, 1);
        Metrics::add(&m.samples_collected, profile.total_count());
        if let Some(u) = sampler.unwind_stats() {
            Metrics::set(&m.unwind_files_built, u.files_built);
            Metrics::set(&m.unwind_files_evicted, u.files_evicted);
            Metrics::set(&m.unwind_tables_over_memory, u.tables_over_memory);
            Metrics::set(&m.unwind_files_loaded, u.files_loaded);
            Metrics::set(&m.unwind_table_bytes, u.table_bytes);
            Metrics::set(&m.unwind_processes, u.processes_loaded);
        }
        if let Some(pods) = &self.pods {
            m.kubernetes_enabled.store(true, Ordering::Relaxed);
            Metrics::set(&m.kubernetes_pods, pods.len() as u64);
            Metrics::set(&m.kubernetes_watch_errors, pods.watch_errors());
        }
        let sym = self.processor.symbolizer().stats();
        Metrics::set(&m.symbol_cache_hits, sym.cache_hits);
        Metrics::set(&m.symbol_cache_misses, sym.cache_misses);
        m.ready.store(true, Ordering::Relaxed);
        debug!(
            samples = profile.total_count(),
            stacks = profile.samples.len(),
            processes = profile.processes.len(),
            "window drained"
        );
        if window.stats.off_cpu_lost() > 0 {
            warn!(
                lost = window.stats.off_cpu_lost(),
                "off-CPU waits lost in the kernel this window (maps full)"
            );
        }
        let wall = match (&profiles.off_cpu, self.off_cpu) {
            (Some(off), Some(config)) if config.wall => Some(wall_clock(profile, off)),
            _ => None,
        };
        // The export thread only goes away when the daemon is stopping, and
        // then this is the last window anyway.
        for profile in [Some(profiles.on_cpu), profiles.off_cpu, wall]
            .into_iter()
            .flatten()
        {
            if self.windows.send(profile).is_err() {
                warn!("export thread gone; window dropped");
            }
        }
        Ok(())
    }
}

/// ±10% random jitter, so a fleet started at once does not report in
/// lock-step.
struct Jitter(RandomState);

impl Jitter {
    fn new() -> Self {
        Jitter(RandomState::new())
    }

    fn apply(&self, interval: Duration) -> Duration {
        // RandomState is seeded randomly per process; hashing the time
        // gives a fresh value per call without a random-number crate.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let unit = (self.0.hash_one(nanos) >> 11) as f64 / (1u64 << 53) as f64;
        interval.mul_f64(0.9 + 0.2 * unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_and_varies() {
        let jitter = Jitter::new();
        let interval = Duration::from_secs(10);
        let values: Vec<Duration> = (0..200).map(|_| jitter.apply(interval)).collect();
        for v in &values {
            assert!(
                *v >= Duration::from_secs(9) && *v <= Duration::from_secs(11),
                "{v:?}"
            );
        }
        let distinct: std::collections::HashSet<_> = values.iter().collect();
        assert!(
            distinct.len() > 100,
            "jitter barely varies: {}",
            distinct.len()
        );
    }
}
