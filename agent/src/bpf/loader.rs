//! Loads the embedded eBPF object, sizes its maps, and attaches the on-CPU
//! program to the CPU clock of every online CPU. Dropping the [`Sampler`]
//! detaches everything.

use std::time::SystemTime;

use aya::maps::{Array, HashMap as BpfHashMap};
use aya::programs::perf_event::{
    PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
};
use aya::programs::PerfEvent;
use aya::{Ebpf, EbpfLoader};
use hearth_ebpf::{names, Stat, CONTROL_ACTIVE_WINDOW};

use super::{map_error, BpfError};

/// The kernel programs, built by `cargo xtask` and embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("HEARTH_EBPF_OBJECT_PATH"));

/// How to load and attach the programs.
#[derive(Debug, Clone)]
pub struct SamplerOptions {
    pub frequency_hz: u64,
    /// Sample only these processes; empty samples the whole host.
    pub pids: Vec<u32>,
    /// Distinct (thread, stack) pairs one window can hold.
    pub max_sample_keys: u32,
    /// Distinct user stacks one window can hold.
    pub max_user_stacks: u32,
    /// Distinct kernel stacks one window can hold.
    pub max_kernel_stacks: u32,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            frequency_hz: 19,
            pids: Vec::new(),
            max_sample_keys: 16 * 1024,
            max_user_stacks: 8 * 1024,
            max_kernel_stacks: 4 * 1024,
        }
    }
}

/// The loaded and attached programs, and the drain state.
pub struct Sampler {
    pub(super) ebpf: Ebpf,
    pub(super) frequency_hz: u64,
    /// Window the programs write to now (0 or 1).
    pub(super) active_window: u32,
    pub(super) window_start: SystemTime,
    /// Stats totals at the last drain, to report per-window deltas.
    pub(super) stats_seen: [u64; Stat::COUNT as usize],
    /// One perf event link per CPU; empty once stopped.
    links: Vec<PerfEventLinkId>,
}

impl Sampler {
    /// Loads and attaches; sampling runs from the moment this returns.
    pub fn start(opts: &SamplerOptions) -> Result<Self, BpfError> {
        let filter_by_pid = u8::from(!opts.pids.is_empty());
        let mut loader = EbpfLoader::new();
        for name in names::COUNTS {
            loader.map_max_entries(name, opts.max_sample_keys);
        }
        for name in names::USER_STACKS {
            loader.map_max_entries(name, opts.max_user_stacks);
        }
        for name in names::KERNEL_STACKS {
            loader.map_max_entries(name, opts.max_kernel_stacks);
        }
        loader.map_max_entries(names::PID_FILTER, opts.pids.len().max(1) as u32);
        loader.override_global(names::FILTER_BY_PID, &filter_by_pid, true);
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        {
            let map = ebpf
                .map_mut(names::PID_FILTER)
                .ok_or(BpfError::Missing(names::PID_FILTER))?;
            let mut filter: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(map).map_err(map_error(names::PID_FILTER))?;
            for &pid in &opts.pids {
                filter
                    .insert(pid, 1, 0)
                    .map_err(map_error(names::PID_FILTER))?;
            }
        }
        set_active_window(&mut ebpf, 0)?;

        on_cpu_program(&mut ebpf)?.load().map_err(program_error)?;
        let mut sampler = Self {
            ebpf,
            frequency_hz: opts.frequency_hz,
            active_window: 0,
            window_start: SystemTime::now(),
            stats_seen: [0; Stat::COUNT as usize],
            links: Vec::new(),
        };
        sampler.resume(opts.frequency_hz)?;
        Ok(sampler)
    }

    /// Attaches the program to every online CPU at `frequency_hz` (after
    /// [`stop`](Self::stop), or to change the frequency: stop, drain,
    /// resume, so each window has one frequency).
    pub fn resume(&mut self, frequency_hz: u64) -> Result<(), BpfError> {
        if !self.links.is_empty() {
            self.stop()?;
        }
        // The CPU clock counts nanoseconds: a fixed period gives exactly
        // `frequency_hz` samples per second of CPU time, with no adaptive
        // period as in frequency mode.
        let period_ns = 1_000_000_000 / frequency_hz.max(1);
        let cpus = aya::util::online_cpus().map_err(|(_, e)| BpfError::Cpus(e))?;
        let program = on_cpu_program(&mut self.ebpf)?;
        for cpu in cpus {
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period_ns),
                    false,
                )
                .map_err(program_error)?;
            self.links.push(link);
        }
        self.frequency_hz = frequency_hz;
        Ok(())
    }

    /// Stops sampling on every CPU but keeps the maps, so a final
    /// [`drain`](super::SampleSource::drain) collects everything recorded.
    pub fn stop(&mut self) -> Result<(), BpfError> {
        let program = on_cpu_program(&mut self.ebpf)?;
        for link in self.links.drain(..) {
            program.detach(link).map_err(program_error)?;
        }
        Ok(())
    }
}

fn on_cpu_program(ebpf: &mut Ebpf) -> Result<&mut PerfEvent, BpfError> {
    ebpf.program_mut(names::ON_CPU_PROGRAM)
        .ok_or(BpfError::Missing(names::ON_CPU_PROGRAM))?
        .try_into()
        .map_err(program_error)
}

fn program_error(source: aya::programs::ProgramError) -> BpfError {
    BpfError::Program {
        name: names::ON_CPU_PROGRAM,
        source,
    }
}

pub(super) fn set_active_window(ebpf: &mut Ebpf, window: u32) -> Result<(), BpfError> {
    let map = ebpf
        .map_mut(names::CONTROL)
        .ok_or(BpfError::Missing(names::CONTROL))?;
    let mut control: Array<_, u32> = Array::try_from(map).map_err(map_error(names::CONTROL))?;
    control
        .set(CONTROL_ACTIVE_WINDOW, window, 0)
        .map_err(map_error(names::CONTROL))
}
