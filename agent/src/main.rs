//! The `hearth` binary: parses the command line, runs the command, and
//! turns errors into a message and a documented exit code.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use hearth::cli::{Cli, Command};
use hearth::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    // Flags, file and environment are merged before anything starts, so a
    // bad value is reported at once.
    let config = match (&cli.command, matches.subcommand_matches("run")) {
        (Command::Run(args), Some(run_matches)) => match Config::load(args, run_matches) {
            Ok(config) if args.print_config => {
                print!("{}", config.to_toml());
                return ExitCode::SUCCESS;
            }
            Ok(config) => Some(config),
            Err(e) => {
                eprintln!("hearth: error: {:#}", anyhow::Error::new(e));
                return ExitCode::from(2);
            }
        },
        _ => None,
    };

    raise_fd_limit();
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
                eprintln!("hearth: {}", summary.describe());
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
        Command::Run(_) => {
            let config = config.expect("`run` always has a config");
            match runtime.block_on(hearth::daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let code = e.exit_code();
                    eprintln!("hearth: error: {:#}", anyhow::Error::new(e));
                    ExitCode::from(code)
                }
            }
        }
        Command::Diff(args) => report_exit(hearth::report::diff::run(&args)),
        Command::Top(args) => report_exit(runtime.block_on(hearth::report::top::run(&args))),
        Command::Check(args) => match hearth::report::check::run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            // The report, on stdout, says which budget broke.
            Ok(false) => ExitCode::from(1),
            Err(e) => report_exit::<()>(Err(e)),
        },
        Command::UnwindTable(args) => {
            let mut code = ExitCode::SUCCESS;
            for path in &args.files {
                match hearth::unwind::build_report(path) {
                    Ok(r) => println!(
                        "{} rows={} bytes={} fdes={} frame_pointers={} build_ms={:.1} peak_kib={}",
                        path.display(),
                        r.rows,
                        r.bytes,
                        r.fdes,
                        r.has_frame_pointers,
                        r.build.as_secs_f64() * 1e3,
                        r.peak_kib.map_or("?".to_string(), |k| k.to_string()),
                    ),
                    Err(e) => {
                        eprintln!("hearth: error: {}: {e}", path.display());
                        code = ExitCode::from(1);
                    }
                }
            }
            code
        }
        Command::Flamegraph(args) => match hearth::report::flamegraph(&args) {
            Ok(summary) => {
                eprintln!("hearth: {} samples", summary.samples);
                for path in &summary.outputs {
                    eprintln!("hearth: wrote {}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                let code = e.exit_code();
                eprintln!("hearth: error: {:#}", anyhow::Error::new(e));
                ExitCode::from(code)
            }
        },
    }
}

/// Exit code for a report command: 0, or the error's code after printing it.
fn report_exit<T>(result: Result<T, hearth::report::ReportError>) -> ExitCode {
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("hearth: error: {:#}", anyhow::Error::new(e));
            ExitCode::from(code)
        }
    }
}

/// The symbolizer keeps mapped files open (two descriptors each) next to one
/// perf event per CPU; the usual soft limit of 1024 is tight on big hosts.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
