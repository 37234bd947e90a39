//! `cargo xtask bench [record|daemon|off-cpu|unwind]`: overhead
//! measurements (as root).
//! Each writes a Markdown table to `target/bench/<name>.md`; README quotes
//! them.

mod daemon;
mod off_cpu;
mod record;
mod unwind;

use anyhow::Result;

use crate::build::build_all;
use crate::util::workspace_root;

/// Which benchmark to run; all of them by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// `hearth record` against perf and bpftrace, run together.
    Record,
    /// `hearth run` in steady state: CPU, RSS, map memory, bytes per sample.
    Daemon,
    /// `hearth record --off-cpu` on a context-switch-heavy load: slowdown of
    /// a pipe ping-pong, BPF time per switch, agent CPU.
    #[value(name = "off-cpu")]
    OffCpu,
    /// Unwind tables: BPF time per sample against frame pointers, table
    /// build time and memory, table memory under a busy workload.
    Unwind,
}

pub fn bench(which: Option<Which>) -> Result<()> {
    let hearth = build_all()?;
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    if which.is_none_or(|w| w == Which::Daemon) {
        daemon::bench(&hearth, &dir)?;
    }
    if which.is_none_or(|w| w == Which::OffCpu) {
        off_cpu::bench(&hearth, &dir)?;
    }
    if which.is_none_or(|w| w == Which::Record) {
        record::bench(&hearth, &dir)?;
    }
    if which.is_none_or(|w| w == Which::Unwind) {
        unwind::bench(&hearth, &dir)?;
    }
    Ok(())
}
