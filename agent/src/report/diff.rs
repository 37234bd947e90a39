//! `hearth diff BASE NEW`: what changed between two profiles (two files, or
//! two time ranges of a store).
//!
//! Outputs, by extension: `.svg` is the differential flame graph (NEW's
//! shape, red where a frame's share grew, blue where it shrank; see
//! [`crate::export::flamegraph`]), `.txt` the text report, which also goes
//! to stdout: the `--limit` functions whose self or total share moved most,
//! before and after in percent of each profile's own samples and the change
//! in percentage points, plus each side's sample total. Shares, not counts,
//! are compared, so a 10 s BASE and a 60 s NEW compare fairly.
//!
//! Arguments and outputs are checked before anything is read, with the
//! exit codes of [`super`]: 2 for usage (no BASE, unknown output
//! extension), 6 for an output that cannot be written.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{check_writable, write_atomically, ReportError, Sources};
use crate::analysis::{compare, FunctionChange, FunctionTable};
use crate::cli::DiffArgs;
use crate::export::flamegraph;
use crate::export::store::show_time;
use crate::profile::Profile;

/// Output extensions, for error messages.
const OUTPUT_FORMATS: &str = ".svg (differential flame graph), .txt (the change report)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    FlameGraph,
    Report,
}

impl Output {
    fn from_path(path: &Path) -> Result<Output, ReportError> {
        let name = crate::export::lower_file_name(path);
        if name.ends_with(".svg") {
            Ok(Output::FlameGraph)
        } else if name.ends_with(".txt") {
            Ok(Output::Report)
        } else {
            Err(ReportError::Usage(format!(
                "{}: unknown output format for hearth diff; supported extensions: {OUTPUT_FORMATS}",
                path.display()
            )))
        }
    }
}

/// Compares BASE and NEW, writes every output and prints the report.
pub fn run(args: &DiffArgs) -> Result<(), ReportError> {
    run_to(args, &mut std::io::stdout().lock())
}

/// [`run`], printing the report to `stdout`.
fn run_to(args: &DiffArgs, stdout: &mut dyn std::io::Write) -> Result<(), ReportError> {
    let (base, new) = args.compare.sources().map_err(ReportError::Usage)?;
    let base = base.ok_or_else(|| {
        ReportError::Usage(
            "hearth diff needs BASE and NEW: two profile files, or --store DIR with \
             --base-since/--base-until for BASE and --since/--until for NEW"
                .into(),
        )
    })?;
    let now = SystemTime::now();
    let base = Sources::new(&base, now)?;
    let new = Sources::new(&new, now)?;
    let outputs = args
        .outputs
        .iter()
        .map(|p| Ok((p.clone(), Output::from_path(p)?)))
        .collect::<Result<Vec<(PathBuf, Output)>, ReportError>>()?;
    for (path, _) in &outputs {
        check_writable(path)?;
    }

    let base_profile = base.read()?;
    let new_profile = new.read()?;
    let report = report(&base_profile, &new_profile, &base, &new, args.limit);
    for (path, output) in &outputs {
        let bytes = match output {
            Output::Report => report.clone().into_bytes(),
            Output::FlameGraph => {
                let mut svg = Vec::new();
                let title = title(&base_profile, &new_profile, &base, &new);
                flamegraph::write_diff(&base_profile, &new_profile, &title, &mut svg).map_err(
                    |error| ReportError::Render {
                        path: path.clone(),
                        error,
                    },
                )?;
                svg
            }
        };
        write_atomically(path, &bytes)?;
    }
    // A closed stdout (`| head`) is not worth failing over: the outputs
    // are written.
    let _ = stdout.write_all(report.as_bytes());
    Ok(())
}

/// `hearth on-CPU diff — BASE a.folded (web1, 10:00 to 10:10) → NEW b.folded`.
fn title(base: &Profile, new: &Profile, base_src: &Sources, new_src: &Sources) -> String {
    let kind = new.meta.kind.describe();
    format!(
        "hearth {kind} diff — BASE {} → NEW {}",
        describe(base, base_src.describe_brief()),
        describe(new, new_src.describe_brief())
    )
}

/// The sources of one side, with the host and time range when known.
fn describe(profile: &Profile, sources: String) -> String {
    let meta = &profile.meta;
    let mut parts = Vec::new();
    if !meta.hostname.is_empty() {
        parts.push(meta.hostname.clone());
    }
    if meta.start != SystemTime::UNIX_EPOCH {
        let end = meta.start.checked_add(meta.duration).unwrap_or(meta.start);
        parts.push(format!("{} to {}", show_time(meta.start), show_time(end)));
    }
    let mut text = sources;
    if !parts.is_empty() {
        text.push_str(&format!(" ({})", parts.join(", ")));
    }
    text
}

/// The text report: both sample totals, then the `limit` functions whose
/// share moved most.
fn report(
    base: &Profile,
    new: &Profile,
    base_src: &Sources,
    new_src: &Sources,
    limit: usize,
) -> String {
    let base_table = FunctionTable::from_profile(base);
    let new_table = FunctionTable::from_profile(new);
    let changes = compare(&base_table, &new_table);
    let mut out = String::new();
    // `fmt::Write` into a String cannot fail.
    let _ = writeln!(
        out,
        "BASE: {} samples, {}",
        base_table.total_samples,
        describe(base, base_src.describe())
    );
    let _ = writeln!(
        out,
        "NEW:  {} samples, {}",
        new_table.total_samples,
        describe(new, new_src.describe())
    );
    let _ = writeln!(
        out,
        "\nFunctions whose share changed most (percent of each profile's samples; \
         change in points):\n"
    );
    let _ = writeln!(
        out,
        "{:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  function",
        "self", "", "", "total", "", ""
    );
    let _ = writeln!(
        out,
        "{:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}",
        "before", "after", "change", "before", "after", "change"
    );
    for change in changes.iter().take(limit) {
        let _ = writeln!(out, "{}", row(change));
    }
    if changes.len() > limit {
        let _ = writeln!(
            out,
            "({} more functions; --limit shows more)",
            changes.len() - limit
        );
    }
    out
}

fn row(c: &FunctionChange) -> String {
    format!(
        "{:>7.2}% {:>7.2}% {:>+8.2}  {:>7.2}% {:>7.2}% {:>+8.2}  {}",
        c.self_before,
        c.self_after,
        points(c.self_delta()),
        c.total_before,
        c.total_after,
        points(c.total_delta()),
        c.name
    )
}

/// A change as printed: no `-0.00` for float noise around zero.
fn points(delta: f64) -> f64 {
    if delta.abs() < 0.005 {
        0.0
    } else {
        delta
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::cli::CompareArgs;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-diff-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn args(files: &[&Path], outputs: &[&Path]) -> DiffArgs {
        DiffArgs {
            compare: CompareArgs {
                files: files.iter().map(|p| p.to_path_buf()).collect(),
                ..CompareArgs::default()
            },
            outputs: outputs.iter().map(|p| p.to_path_buf()).collect(),
            limit: 20,
        }
    }

    /// BASE: 100 samples, `hot` 20% self; NEW: 400 samples, `hot` 50%,
    /// `steady` 30% in both, `cold` and `cool` from 25% to 10% each.
    fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
        let base = dir.join("base.folded");
        let new = dir.join("new.folded");
        fs::write(
            &base,
            "app;main;hot 20\napp;main;steady 30\napp;main;cold 25\napp;main;cool 25\n",
        )
        .unwrap();
        fs::write(
            &new,
            "app;main;hot 200\napp;main;steady 120\napp;main;cold 40\napp;main;cool 40\n",
        )
        .unwrap();
        (base, new)
    }

    #[test]
    fn writes_the_svg_and_the_report() {
        let dir = scratch("outputs");
        let (base, new) = inputs(&dir);
        let (svg, txt) = (dir.join("d.svg"), dir.join("d.txt"));
        let mut stdout = Vec::new();
        run_to(&args(&[&base, &new], &[&svg, &txt]), &mut stdout).unwrap();
        let report = fs::read_to_string(&txt).unwrap();
        assert_eq!(String::from_utf8(stdout).unwrap(), report);
        assert!(report.contains("BASE: 100 samples"), "{report}");
        assert!(report.contains("NEW:  400 samples"), "{report}");
        let line = |name: &str| {
            report
                .lines()
                .find(|l| l.ends_with(&format!("  {name}")))
                .unwrap_or_else(|| panic!("{name} missing:\n{report}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("hot"),
            ["20.00%", "50.00%", "+30.00", "20.00%", "50.00%", "+30.00", "hot"]
        );
        assert_eq!(
            line("steady"),
            ["30.00%", "30.00%", "+0.00", "30.00%", "30.00%", "+0.00", "steady"]
        );
        // Largest change first.
        let hot_at = report.find("  hot").unwrap();
        assert!(hot_at < report.find("  cold").unwrap());
        assert!(hot_at < report.find("  steady").unwrap());

        let svg = fs::read_to_string(&svg).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(
            svg.contains("hearth on-CPU diff — BASE "),
            "{}",
            &svg[..2000]
        );
        assert!(svg.contains("<title>hot (200 samples, 50.00%; +30.00%)</title>"));
        // Only the outputs and inputs: no temporary or probe files.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limit_cuts_the_report() {
        let dir = scratch("limit");
        let (base, new) = inputs(&dir);
        let txt = dir.join("d.txt");
        let mut a = args(&[&base, &new], &[&txt]);
        a.limit = 1;
        run_to(&a, &mut Vec::new()).unwrap();
        let report = fs::read_to_string(&txt).unwrap();
        assert!(report.contains("  hot\n"), "{report}");
        assert!(!report.contains("  steady"), "{report}");
        assert!(report.contains("4 more functions"), "{report}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn usage_and_unwritable_outputs_fail_before_reading() {
        let dir = scratch("usage");
        // Neither input exists: reading them would be exit code 1.
        let (base, new) = (dir.join("a.folded"), dir.join("b.folded"));
        let cases: Vec<(DiffArgs, u8, &str)> = vec![
            (args(&[&new], &[]), 2, "needs BASE and NEW"),
            (args(&[], &[]), 2, "give BASE and NEW"),
            (args(&[&base, &new], &[&dir.join("d.png")]), 2, "d.png"),
            (args(&[&base, &dir.join("b.txt")], &[]), 2, "b.txt"),
            (
                args(&[&base, &new], &[Path::new("/nonexistent-dir/d.svg")]),
                6,
                "/nonexistent-dir/d.svg",
            ),
            (args(&[&base, &new], &[&dir.join("d.txt")]), 1, "a.folded"),
        ];
        for (args, code, want) in cases {
            let err = run(&args).unwrap_err();
            assert_eq!(err.exit_code(), code, "{err}");
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
