//! Developer commands for hearth: `cargo xtask <command>`.
//!
//! `run` and `test` do all of their own set-up (nightly rust-src, a
//! bpf-linker matching the nightly's LLVM, the eBPF object), idempotently,
//! so the two README commands work on a fresh machine.

mod bench;
mod build;
mod toolchain;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "hearth developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the kernel-crate toolchain (rust-src, bpf-linker) if missing.
    Setup,
    /// Build the eBPF object and the hearth binary (release).
    Build,
    /// Build only the eBPF object.
    BuildEbpf,
    /// Build, then run hearth as root with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Overhead benchmarks (as root): `record` against perf and bpftrace,
    /// `daemon` in steady state, `off-cpu` on a context-switch-heavy load,
    /// `unwind` tables against frame pointers; all by default.
    Bench { which: Option<bench::Which> },
    /// Formatting, lints, unit and integration tests (as root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => toolchain::ensure().map(drop),
        Cmd::Build => build::build_all().map(drop),
        Cmd::BuildEbpf => build::build_ebpf().map(|p| println!("{}", p.display())),
        Cmd::Run { args } => build::run_hearth(&args),
        Cmd::Test { filter } => build::test(filter.as_deref()),
        Cmd::Bench { which } => bench::bench(which),
    }
}
