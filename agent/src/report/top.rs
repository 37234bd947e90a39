//! `hearth top`: functions ranked by self or total share.
//!
//! Static mode reads profile files and/or a store (like `hearth
//! flamegraph`) and prints one table; `--compare-with FILE`, or
//! `--compare-since`/`--compare-until` on the same store, adds a trend
//! column: how many percentage points the ranked share moved since the
//! earlier profile (shares, not counts, so ranges of different length
//! compare).
//!
//! `--live` samples the host (or `--pid`s) like `perf top`: every
//! `--refresh` the kernel maps are drained and symbolized, the window is
//! merged into the running profile, and the table is redrawn (in place on a
//! terminal; one table after another, blank-line separated, otherwise)
//! until Ctrl-C.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::{ReportError, Sources};
use crate::analysis::FunctionTable;
use crate::bpf::{self, SampleSource, Sampler, SamplerOptions};
use crate::cli::{RankBy, SourceArgs, TopArgs};
use crate::pipeline::{hostname, WindowProcessor};
use crate::profile::{Profile, ProfileBuilder, ProfileMeta, SampleKind};
use crate::symbolize::{BlazeSymbolizer, SymbolizerConfig};

/// Moves the cursor home and clears the screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Where BTF is checked before `--live` loads its programs.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

pub async fn run(args: &TopArgs) -> Result<(), ReportError> {
    if args.live {
        return live(args).await;
    }
    let now = SystemTime::now();
    // Both sources are checked before either is read, so a typo in the
    // comparison costs no read of a large store.
    let sources = Sources::new(&args.source, now)?;
    let earlier = match earlier_source(args)? {
        Some((source, description)) => Some((Sources::new(&source, now)?, description)),
        None => None,
    };
    let table = FunctionTable::from_profile(&sources.read()?);
    let earlier = match earlier {
        Some((sources, description)) => {
            Some((FunctionTable::from_profile(&sources.read()?), description))
        }
        None => None,
    };
    let mut header = format!(
        "hearth top — {}: {} samples, ranked by {} share",
        sources.describe(),
        table.total_samples,
        by_name(args.by)
    );
    if let Some((_, description)) = &earlier {
        let _ = write!(header, "; trend in points since {description}");
    }
    let text = format_table(
        &header,
        &table,
        earlier.as_ref().map(|(t, _)| t),
        args.by,
        args.limit,
    );
    print_stdout(&text)
}

/// The earlier profile the trend column compares against, and how to name
/// it in the header.
fn earlier_source(args: &TopArgs) -> Result<Option<(SourceArgs, String)>, ReportError> {
    let filter = |source: SourceArgs| SourceArgs {
        pids: args.source.pids.clone(),
        processes: args.source.processes.clone(),
        ..source
    };
    if let Some(file) = &args.compare_with {
        return Ok(Some((
            filter(SourceArgs {
                inputs: vec![file.clone()],
                ..SourceArgs::default()
            }),
            file.display().to_string(),
        )));
    }
    if args.compare_since.is_none() && args.compare_until.is_none() {
        return Ok(None);
    }
    let Some(store) = &args.source.store else {
        return Err(ReportError::Usage(
            "--compare-since and --compare-until select an earlier range of a store: \
             add --store DIR (or compare with a file: --compare-with FILE)"
                .into(),
        ));
    };
    let range = match (&args.compare_since, &args.compare_until) {
        (Some(since), Some(until)) => format!("{since} to {until}"),
        (Some(since), None) => format!("since {since}"),
        (None, Some(until)) => format!("until {until}"),
        (None, None) => unreachable!("checked above"),
    };
    Ok(Some((
        filter(SourceArgs {
            store: Some(store.clone()),
            since: args.compare_since.clone(),
            until: args.compare_until.clone(),
            ..SourceArgs::default()
        }),
        format!("the store range {range}"),
    )))
}

fn by_name(by: RankBy) -> &'static str {
    match by {
        RankBy::SelfShare => "self",
        RankBy::Total => "total",
    }
}

/// The ranking as text: a header line, column titles, and one row per
/// function: rank, self %, total %, samples (self or total, per `by`), the
/// trend (points the `by` share moved since `earlier`, `new` when it was
/// absent) when there is an earlier table, and the function name last so
/// long names do not push the numbers around.
pub fn format_table(
    header: &str,
    table: &FunctionTable,
    earlier: Option<&FunctionTable>,
    by: RankBy,
    limit: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let _ = write!(
        out,
        "{:>4}  {:>7}  {:>7}  {:>9}",
        "RANK", "SELF", "TOTAL", "SAMPLES"
    );
    if earlier.is_some() {
        let _ = write!(out, "  {:>7}", "TREND");
    }
    let _ = writeln!(out, "  FUNCTION");
    let rows = table.ranked(by, limit);
    if rows.is_empty() {
        let _ = writeln!(out, "(no samples)");
    }
    for (i, f) in rows.iter().enumerate() {
        let samples = match by {
            RankBy::SelfShare => f.self_samples,
            RankBy::Total => f.total_samples,
        };
        let _ = write!(
            out,
            "{:>4}  {:>6.2}%  {:>6.2}%  {:>9}",
            i + 1,
            table.self_percent(f),
            table.total_percent(f),
            samples
        );
        if let Some(earlier) = earlier {
            let share = |t: &FunctionTable, f| match by {
                RankBy::SelfShare => t.self_percent(f),
                RankBy::Total => t.total_percent(f),
            };
            let trend = match earlier.get(&f.name) {
                Some(before) => format_points(share(table, f) - share(earlier, before)),
                None => "new".to_string(),
            };
            let _ = write!(out, "  {trend:>7}");
        }
        let _ = writeln!(out, "  {}", f.name);
    }
    out
}

/// Signed points with two decimals; `0.00` rather than `+0.00` or `-0.00`
/// for no change.
fn format_points(points: f64) -> String {
    if points.abs() < 0.005 {
        "0.00".to_string()
    } else {
        format!("{points:+.2}")
    }
}

fn print_stdout(text: &str) -> Result<(), ReportError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|error| ReportError::Unwritable {
            path: "standard output".into(),
            error,
        })
}

/// `--live`: sample, and redraw every `--refresh` until Ctrl-C.
async fn live(args: &TopArgs) -> Result<(), ReportError> {
    let source = &args.source;
    if source.since.is_some()
        || source.until.is_some()
        || args.compare_since.is_some()
        || args.compare_until.is_some()
    {
        return Err(ReportError::Usage(
            "--live samples now: --since, --until, --compare-since and --compare-until \
             select stored windows and do not apply"
                .into(),
        ));
    }
    for &pid in &source.pids {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(ReportError::NoSuchProcess(pid));
        }
    }
    bpf::check_privileges().map_err(ReportError::Bpf)?;
    bpf::check_btf(Path::new(KERNEL_BTF)).map_err(ReportError::Bpf)?;

    let mut sampler = Sampler::start(&SamplerOptions {
        frequency_hz: args.frequency,
        pids: source.pids.clone(),
        ..SamplerOptions::default()
    })
    .map_err(ReportError::Bpf)?;
    // One processor for the whole session: its symbol and process caches
    // are what makes a refresh cheap after the first.
    let mut processor =
        WindowProcessor::new(BlazeSymbolizer::with_config(SymbolizerConfig::default()));
    let meta = ProfileMeta {
        kind: SampleKind::OnCpu,
        start: SystemTime::now(),
        duration: Duration::ZERO,
        frequency_hz: args.frequency,
        hostname: hostname(),
    };
    let mut running = ProfileBuilder::new(meta.clone()).build();
    let started = Instant::now();
    let terminal = std::io::stdout().is_terminal();
    let scope = if source.pids.is_empty() {
        "host-wide".to_string()
    } else {
        let pids: Vec<String> = source.pids.iter().map(u32::to_string).collect();
        format!("pid {}", pids.join(","))
    };

    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + args.refresh, args.refresh);
    let mut first = true;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = refresh.tick() => {}
        }
        let window = sampler.drain().map_err(ReportError::Bpf)?;
        let mut window = processor
            .process(&window, sampler.frequency_hz(), None)
            .on_cpu;
        if !source.processes.is_empty() {
            window = window.retain_samples(|p, _| source.processes.iter().any(|n| *n == *p.name));
        }
        running = merged(&meta, &running, &window);

        let table = FunctionTable::from_profile(&running);
        let header = format!(
            "hearth top — live, {scope}, {} Hz, {}s: {} samples, ranked by {} share (Ctrl-C ends)",
            args.frequency,
            started.elapsed().as_secs(),
            table.total_samples,
            by_name(args.by)
        );
        let text = format_table(&header, &table, None, args.by, args.limit);
        let text = if terminal {
            format!("{CLEAR_SCREEN}{text}")
        } else if first {
            text
        } else {
            format!("\n{text}")
        };
        first = false;
        print_stdout(&text)?;

        if !source.pids.is_empty()
            && source
                .pids
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            eprintln!("hearth: every target process exited");
            break;
        }
    }
    sampler.stop().map_err(ReportError::Bpf)?;
    Ok(())
}

/// `running` with `window` added. Rebuilt rather than kept in a builder
/// because the table is read after every window; the profile holds one
/// entry per distinct stack, so this stays cheap.
fn merged(meta: &ProfileMeta, running: &Profile, window: &Profile) -> Profile {
    let mut builder = ProfileBuilder::new(meta.clone());
    builder.merge(running);
    builder.merge(window);
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::folded;

    fn table(text: &str) -> FunctionTable {
        FunctionTable::from_profile(&folded::parse(text.as_bytes()).unwrap())
    }

    #[test]
    fn table_by_self_lists_shares_and_samples() {
        let t = table("app;main;parse 90\napp;main;render 30\n");
        let text = format_table("head", &t, None, RankBy::SelfShare, 20);
        assert_eq!(
            text,
            "head\n\
             RANK     SELF    TOTAL    SAMPLES  FUNCTION\n   \
             1   75.00%   75.00%         90  parse\n   \
             2   25.00%   25.00%         30  render\n"
        );
    }

    #[test]
    fn table_by_total_counts_callers_and_respects_the_limit() {
        let t = table("app;main;parse 90\napp;main;render 30\n");
        let text = format_table("head", &t, None, RankBy::Total, 2);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(rows[0].ends_with("120  main"), "{text}");
        assert!(rows[0].contains("  0.00%  100.00%"), "{text}");
        assert!(rows[1].ends_with("90  parse"), "{text}");
    }

    #[test]
    fn trend_is_the_change_in_points_of_the_ranked_share() {
        let before = table("app;main;parse 60\napp;main;render 40\napp;main;gone 100\n");
        let now = table("app;main;parse 90\napp;main;render 30\napp;main;fresh 30\n");
        let text = format_table("head", &now, Some(&before), RankBy::SelfShare, 20);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("TREND"), "{text}");
        // parse: 30% → 60%; render and fresh: 20%.
        assert!(lines[2].contains(" +30.00  parse"), "{text}");
        assert!(lines[3].contains("new  fresh"), "{text}");
        assert!(lines[4].contains("0.00  render"), "{text}");
        assert_eq!(lines.len(), 5, "{text}");
    }

    #[test]
    fn empty_table_says_so() {
        let text = format_table("head", &table(""), None, RankBy::SelfShare, 5);
        assert!(text.ends_with("(no samples)\n"), "{text}");
    }

    #[test]
    fn points_are_signed_and_zero_is_plain() {
        assert_eq!(format_points(15.0), "+15.00");
        assert_eq!(format_points(-2.5), "-2.50");
        assert_eq!(format_points(-0.001), "0.00");
    }

    #[test]
    fn running_profile_accumulates_windows() {
        let a = folded::parse("app;main;parse 2\n".as_bytes()).unwrap();
        let b = folded::parse("app;main;parse 3\napp;main;x 1\n".as_bytes()).unwrap();
        let meta = a.meta.clone();
        let running = merged(&meta, &ProfileBuilder::new(meta.clone()).build(), &a);
        let running = merged(&meta, &running, &b);
        let t = FunctionTable::from_profile(&running);
        assert_eq!(t.total_samples, 6);
        assert_eq!(t.get("parse").unwrap().self_samples, 5);
    }

    fn top_args(source: SourceArgs) -> TopArgs {
        TopArgs {
            source,
            by: RankBy::SelfShare,
            limit: 20,
            compare_with: None,
            compare_since: None,
            compare_until: None,
            live: false,
            frequency: 99,
            refresh: Duration::from_secs(1),
        }
    }

    #[test]
    fn compare_range_needs_a_store() {
        let mut args = top_args(SourceArgs {
            inputs: vec!["a.folded".into()],
            ..SourceArgs::default()
        });
        args.compare_since = Some("1h".into());
        let err = earlier_source(&args).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--store"), "{err}");

        args.source.store = Some("/s".into());
        args.source.processes = vec!["app".into()];
        let (earlier, description) = earlier_source(&args).unwrap().unwrap();
        assert_eq!(earlier.store.as_deref(), Some(Path::new("/s")));
        assert_eq!(earlier.since.as_deref(), Some("1h"));
        assert!(earlier.inputs.is_empty());
        assert_eq!(earlier.processes, ["app"]);
        assert_eq!(description, "the store range since 1h");
    }

    #[test]
    fn live_rejects_store_time_ranges_before_sampling() {
        let mut args = top_args(SourceArgs {
            since: Some("10m".into()),
            ..SourceArgs::default()
        });
        args.live = true;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(run(&args)).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
    }
}
