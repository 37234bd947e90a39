//! `hearth check`: a CI gate on function shares.
//!
//! `--max FUNCTION=PERCENT` budgets limit a function's share of NEW (self
//! share, or total share with `total:FUNCTION=PERCENT`); `--max-regression
//! PERCENT` limits how many percentage points any function's self or total
//! share may grow from BASE to NEW. Shares are of each profile's own total,
//! so runs of different length compare.
//!
//! The report goes to stdout: one PASS or FAIL line per budget and for the
//! regression limit, with the measured values, and a summary. [`run`]
//! returns whether everything held (`main` exits 1 otherwise); bad
//! arguments are usage errors (exit 2) reported before anything is read.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use super::{ReportError, Sources};
use crate::analysis::{self, Budget, FunctionTable};
use crate::cli::CheckArgs;

/// Whether every budget held.
pub fn run(args: &CheckArgs) -> Result<bool, ReportError> {
    let budgets = args
        .budgets
        .iter()
        .map(|b| analysis::parse_budget(b).map_err(|e| ReportError::Usage(format!("--max: {e}"))))
        .collect::<Result<Vec<Budget>, _>>()?;
    let max_regression = args
        .max_regression
        .as_deref()
        .map(|p| {
            analysis::parse_percent(p)
                .map_err(|e| ReportError::Usage(format!("--max-regression: {e}")))
        })
        .transpose()?;
    if budgets.is_empty() && max_regression.is_none() {
        return Err(ReportError::Usage(
            "nothing to check: give --max FUNCTION=PERCENT (repeatable) and/or \
             --max-regression PERCENT"
                .into(),
        ));
    }
    let (base, new) = args.compare.sources().map_err(ReportError::Usage)?;
    if max_regression.is_some() && base.is_none() {
        return Err(ReportError::Usage(
            "--max-regression compares BASE with NEW: give two files, or \
             --base-since/--base-until with --store"
                .into(),
        ));
    }
    let now = SystemTime::now();
    // Every argument is checked before either side is read.
    let base = base.map(|b| Sources::new(&b, now)).transpose()?;
    let new = Sources::new(&new, now)?;
    let base_table = match &base {
        Some(sources) => Some(FunctionTable::from_profile(&sources.read()?)),
        None => None,
    };
    let new_table = FunctionTable::from_profile(&new.read()?);

    let base_side = base
        .as_ref()
        .zip(base_table.as_ref())
        .map(|(sources, table)| (sources.describe(), table));
    let (text, passed) = report(
        base_side.as_ref().map(|(d, t)| (d.as_str(), *t)),
        (&new.describe(), &new_table),
        &budgets,
        max_regression,
    );
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|error| ReportError::Unwritable {
            path: "standard output".into(),
            error,
        })?;
    Ok(passed)
}

/// The report text and whether every check held. `base` and `new` are a
/// description of the source and its table.
pub fn report(
    base: Option<(&str, &FunctionTable)>,
    new: (&str, &FunctionTable),
    budgets: &[Budget],
    max_regression: Option<f64>,
) -> (String, bool) {
    let (new_name, new_table) = new;
    let mut out = String::new();
    let mut failed = 0usize;
    let mut checks = 0usize;
    if let Some((name, table)) = base {
        let _ = writeln!(out, "BASE: {name} ({} samples)", table.total_samples);
    }
    let _ = writeln!(
        out,
        "NEW:  {new_name} ({} samples)",
        new_table.total_samples
    );

    for budget in budgets {
        checks += 1;
        let violations = analysis::evaluate(None, new_table, std::slice::from_ref(budget), None);
        match violations.first() {
            Some(v) => {
                failed += 1;
                let _ = writeln!(out, "FAIL  {}", v.message);
            }
            None => {
                let _ = writeln!(
                    out,
                    "PASS  {}: {} share {:.2}% is within the budget of {:.2}%",
                    budget.function,
                    budget.measure.as_str(),
                    budget.measured(new_table),
                    budget.max_percent
                );
            }
        }
    }

    if let (Some((_, base_table)), Some(limit)) = (base, max_regression) {
        checks += 1;
        let violations = analysis::evaluate(Some(base_table), new_table, &[], Some(limit));
        for v in &violations {
            let _ = writeln!(out, "FAIL  {}", v.message);
        }
        if violations.is_empty() {
            let _ = writeln!(
                out,
                "PASS  no function's share grew more than {limit:.2} points{}",
                largest_growth(base_table, new_table)
            );
        } else {
            failed += 1;
        }
    }

    let passed = failed == 0;
    if passed {
        let _ = writeln!(out, "check passed: {checks} of {checks} checks held");
    } else {
        let _ = writeln!(out, "check FAILED: {failed} of {checks} checks broke");
    }
    (out, passed)
}

/// ` (largest growth: parse self +4.00)`, or nothing when nothing grew.
fn largest_growth(base: &FunctionTable, new: &FunctionTable) -> String {
    analysis::compare(base, new)
        .iter()
        .flat_map(|c| {
            [
                (c.self_delta(), "self", &c.name),
                (c.total_delta(), "total", &c.name),
            ]
        })
        // The first of equal growths (self before total, the larger change
        // first), which `max_by` would not keep.
        .fold(
            None,
            |best: Option<(f64, &str, &Arc<str>)>, candidate| match best {
                Some(best) if best.0 >= candidate.0 => Some(best),
                _ if candidate.0 > 0.0 => Some(candidate),
                _ => best,
            },
        )
        .map(|(delta, measure, name)| format!(" (largest growth: {name} {measure} {delta:+.2})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::CompareArgs;
    use crate::export::folded;

    fn table(text: &str) -> FunctionTable {
        FunctionTable::from_profile(&folded::parse(text.as_bytes()).unwrap())
    }

    const BASE: &str = "app;main;parse 60\napp;main;render 40\n";
    const NEW: &str = "app;main;parse 90\napp;main;render 30\n";

    fn budgets(texts: &[&str]) -> Vec<Budget> {
        texts
            .iter()
            .map(|t| analysis::parse_budget(t).unwrap())
            .collect()
    }

    #[test]
    fn report_lists_every_check_with_measured_values() {
        let (base, new) = (table(BASE), table(NEW));
        let (text, passed) = report(
            Some(("base.folded", &base)),
            ("new.folded", &new),
            &budgets(&["parse=50%", "total:main=100", "render=30%"]),
            Some(10.0),
        );
        assert!(!passed);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "BASE: base.folded (100 samples)",
                "NEW:  new.folded (120 samples)",
                "FAIL  parse: self share 75.00% is over the budget of 50.00%",
                "PASS  main: total share 100.00% is within the budget of 100.00%",
                "PASS  render: self share 25.00% is within the budget of 30.00%",
                "FAIL  parse: self share grew 15.00 points (60.00% → 75.00%), more than the allowed 10.00",
                "FAIL  parse: total share grew 15.00 points (60.00% → 75.00%), more than the allowed 10.00",
                "check FAILED: 2 of 4 checks broke",
            ],
            "{text}"
        );
    }

    #[test]
    fn passing_report_names_the_largest_growth() {
        let (base, new) = (table(BASE), table(NEW));
        let (text, passed) = report(
            Some(("b", &base)),
            ("n", &new),
            &budgets(&["parse=80%"]),
            Some(20.0),
        );
        assert!(passed, "{text}");
        assert!(
            text.contains(
                "PASS  no function's share grew more than 20.00 points \
                 (largest growth: parse self +15.00)"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("check passed: 2 of 2 checks held\n"),
            "{text}"
        );
    }

    fn check_args(files: &[&str], budgets: &[&str], max_regression: Option<&str>) -> CheckArgs {
        CheckArgs {
            compare: CompareArgs {
                files: files.iter().map(Into::into).collect(),
                ..CompareArgs::default()
            },
            budgets: budgets.iter().map(|b| b.to_string()).collect(),
            max_regression: max_regression.map(Into::into),
        }
    }

    #[test]
    fn bad_arguments_are_usage_errors_before_reading() {
        // The files do not exist: reading them would be exit code 1.
        let missing = ["/nonexistent/base.folded", "/nonexistent/new.folded"];
        for (args, want) in [
            (check_args(&missing, &["parse"], None), "no `=`"),
            (check_args(&missing, &["parse=200%"], None), "out of range"),
            (check_args(&missing, &[], Some("lots")), "--max-regression"),
            (check_args(&missing, &[], None), "nothing to check"),
            (check_args(&[], &["parse=5"], None), "BASE and NEW"),
            (
                check_args(&missing[1..], &[], Some("5%")),
                "--max-regression compares BASE",
            ),
        ] {
            let err = run(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        let err = run(&check_args(&missing, &["parse=5"], None)).unwrap_err();
        assert_eq!(err.exit_code(), 1, "{err}");
    }
}
