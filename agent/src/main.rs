//! The `hearth` binary: parses the command line, runs the command, and
//! turns errors into a message and a documented exit code.

use std::process::ExitCode;

use clap::Parser;
use hearth::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Record(args) => match runtime.block_on(hearth::record::record(&args)) {
            Ok(summary) => {
                for path in &summary.outputs {
                    eprintln!("hearth: wrote {}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                let code = e.exit_code();
                // `{:#}` prints the whole cause chain on one line.
                eprintln!("hearth: error: {:#}", anyhow::Error::new(e));
                ExitCode::from(code)
            }
        },
    }
}
