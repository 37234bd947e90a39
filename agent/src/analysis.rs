//! Function shares, rankings, differences and budgets: the arithmetic
//! behind `hearth top`, `hearth diff` and `hearth check`.
//!
//! Everything here works on function *names*, not frames: the same function
//! seen at different addresses, in different processes or threads, is one
//! row. Shares are percentages of a profile's own sample total, so profiles
//! of different lengths (or frequencies) compare directly.
//!
//! - *self* samples: the function is the leaf frame (it was on-CPU itself);
//! - *total* samples: the function is anywhere on the stack, counted once
//!   per stack even when it recurses, so a total share never passes 100%.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::cli::RankBy;
use crate::profile::Profile;

/// Shares below this many points apart are treated as equal when checking
/// limits, so `75.00000000000001 > 75` never fails a build.
const EPSILON: f64 = 1e-9;

/// Self and total sample counts of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionStats {
    pub name: Arc<str>,
    /// Samples where the function is the leaf frame.
    pub self_samples: u64,
    /// Samples where the function is anywhere on the stack (once per stack).
    pub total_samples: u64,
}

/// Per-function counts of a whole profile.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FunctionTable {
    /// All samples of the profile (the denominator of every share).
    pub total_samples: u64,
    /// Sorted by name (which [`FunctionTable::get`] relies on).
    pub functions: Vec<FunctionStats>,
}

impl FunctionTable {
    /// Counts every function of `profile` by name.
    pub fn from_profile(profile: &Profile) -> FunctionTable {
        let mut counts: BTreeMap<Arc<str>, (u64, u64)> = BTreeMap::new();
        let mut total_samples = 0u64;
        // Reused per sample: names already counted for this stack.
        let mut seen: HashSet<&str> = HashSet::new();
        for sample in &profile.samples {
            total_samples += sample.count;
            seen.clear();
            for (depth, &frame_id) in sample.frames.iter().enumerate() {
                let name = &profile.frame(frame_id).function;
                let first_in_stack = seen.insert(name);
                if depth > 0 && !first_in_stack {
                    continue;
                }
                let entry = counts.entry(name.clone()).or_default();
                if depth == 0 {
                    entry.0 += sample.count;
                }
                if first_in_stack {
                    entry.1 += sample.count;
                }
            }
        }
        FunctionTable {
            total_samples,
            functions: counts
                .into_iter()
                .map(|(name, (self_samples, total_samples))| FunctionStats {
                    name,
                    self_samples,
                    total_samples,
                })
                .collect(),
        }
    }

    /// The function with this exact name.
    pub fn get(&self, name: &str) -> Option<&FunctionStats> {
        self.functions
            .binary_search_by(|f| (*f.name).cmp(name))
            .ok()
            .map(|i| &self.functions[i])
    }

    /// Self share of `f` in percent of all samples (0 for an empty profile).
    pub fn self_percent(&self, f: &FunctionStats) -> f64 {
        self.percent(f.self_samples)
    }

    /// Total share of `f` in percent of all samples (0 for an empty profile).
    pub fn total_percent(&self, f: &FunctionStats) -> f64 {
        self.percent(f.total_samples)
    }

    fn percent(&self, samples: u64) -> f64 {
        if self.total_samples == 0 {
            0.0
        } else {
            100.0 * samples as f64 / self.total_samples as f64
        }
    }

    /// The `n` functions with the most self (or total) samples, ties broken
    /// by name. Functions with none of the measure are left out: a ranking
    /// by self share should not list every caller at 0%.
    pub fn ranked(&self, by: RankBy, n: usize) -> Vec<&FunctionStats> {
        let measure = |f: &FunctionStats| match by {
            RankBy::SelfShare => f.self_samples,
            RankBy::Total => f.total_samples,
        };
        let mut rows: Vec<&FunctionStats> =
            self.functions.iter().filter(|f| measure(f) > 0).collect();
        rows.sort_by(|a, b| {
            measure(b)
                .cmp(&measure(a))
                .then_with(|| a.name.cmp(&b.name))
        });
        rows.truncate(n);
        rows
    }
}

/// How one function's shares moved between two profiles, in percent of
/// each profile's own total.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionChange {
    pub name: Arc<str>,
    pub self_before: f64,
    pub self_after: f64,
    pub total_before: f64,
    pub total_after: f64,
}

impl FunctionChange {
    /// Change of the self share in percentage points (positive: grew).
    pub fn self_delta(&self) -> f64 {
        self.self_after - self.self_before
    }

    /// Change of the total share in percentage points (positive: grew).
    pub fn total_delta(&self) -> f64 {
        self.total_after - self.total_before
    }

    /// The larger of the two absolute changes, for sorting.
    fn largest_change(&self) -> f64 {
        self.self_delta().abs().max(self.total_delta().abs())
    }
}

/// Every function of either table with its shares before and after, the
/// largest change (self or total, either direction) first, then by name.
pub fn compare(base: &FunctionTable, new: &FunctionTable) -> Vec<FunctionChange> {
    let mut names: Vec<&Arc<str>> = base
        .functions
        .iter()
        .chain(&new.functions)
        .map(|f| &f.name)
        .collect();
    names.sort();
    names.dedup();
    let shares = |table: &FunctionTable, name: &str| {
        table.get(name).map_or((0.0, 0.0), |f| {
            (table.self_percent(f), table.total_percent(f))
        })
    };
    let mut changes: Vec<FunctionChange> = names
        .into_iter()
        .map(|name| {
            let (self_before, total_before) = shares(base, name);
            let (self_after, total_after) = shares(new, name);
            FunctionChange {
                name: name.clone(),
                self_before,
                self_after,
                total_before,
                total_after,
            }
        })
        .collect();
    changes.sort_by(|a, b| {
        b.largest_change()
            .total_cmp(&a.largest_change())
            .then_with(|| a.name.cmp(&b.name))
    });
    changes
}

/// Which share a budget limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Samples where the function is the leaf.
    SelfShare,
    /// Samples where the function is anywhere on the stack.
    Total,
}

impl Measure {
    /// `self` or `total`, as in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::SelfShare => "self",
            Measure::Total => "total",
        }
    }

    /// The share of `f` this measure means, in percent.
    pub fn percent(self, table: &FunctionTable, f: &FunctionStats) -> f64 {
        match self {
            Measure::SelfShare => table.self_percent(f),
            Measure::Total => table.total_percent(f),
        }
    }
}

/// An upper limit on one function's share: `--max FUNCTION=PERCENT`.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub function: String,
    pub measure: Measure,
    pub max_percent: f64,
}

impl Budget {
    /// The share this budget measures in `table` (0 when the function is
    /// absent: a function that never ran is within any budget).
    pub fn measured(&self, table: &FunctionTable) -> f64 {
        table
            .get(&self.function)
            .map_or(0.0, |f| self.measure.percent(table, f))
    }
}

/// Parses `FUNCTION=PERCENT`, `self:FUNCTION=PERCENT` or
/// `total:FUNCTION=PERCENT` (`json_parse=25%`, `total:main=90`).
pub fn parse_budget(text: &str) -> Result<Budget, String> {
    const FORM: &str = "use FUNCTION=PERCENT or total:FUNCTION=PERCENT, e.g. json_parse=25%";
    // The last `=`: C++ names like `operator==` may contain one, a
    // percentage never does.
    let Some((function, percent)) = text.rsplit_once('=') else {
        return Err(format!("invalid budget {text:?}: no `=`; {FORM}"));
    };
    // `total:` but not `total::`, which begins a path like `total::sum`.
    let prefixed = |prefix: &str| {
        function
            .strip_prefix(prefix)
            .filter(|rest| !rest.starts_with(':'))
    };
    let (measure, function) = if let Some(rest) = prefixed("total:") {
        (Measure::Total, rest)
    } else if let Some(rest) = prefixed("self:") {
        (Measure::SelfShare, rest)
    } else {
        (Measure::SelfShare, function)
    };
    let function = function.trim();
    if function.is_empty() {
        return Err(format!("invalid budget {text:?}: no function name; {FORM}"));
    }
    let max_percent =
        parse_percent(percent).map_err(|e| format!("invalid budget {text:?}: {e}"))?;
    Ok(Budget {
        function: function.to_string(),
        measure,
        max_percent,
    })
}

/// Parses a percentage from 0 to 100, with or without `%` (`10%`, `2.5`).
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let number = trimmed.strip_suffix('%').unwrap_or(trimmed).trim();
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage; use e.g. 25% or 25"))?;
    // `parse` accepts `inf` and `NaN`, which no comparison handles sensibly.
    if !value.is_finite() || !(0.0..=100.0).contains(&value) {
        return Err(format!(
            "{text:?} is out of range; a percentage is from 0 to 100"
        ));
    }
    Ok(value)
}

/// One broken budget or regression limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub function: String,
    /// What broke, with the measured and allowed values.
    pub message: String,
}

/// Every budget NEW breaks (share above the maximum), and, with a BASE and
/// `max_regression_points`, every function whose self or total share grew
/// by more than that many percentage points from BASE to NEW. Budgets come
/// first, in the order given; regressions follow, largest change first.
pub fn evaluate(
    base: Option<&FunctionTable>,
    new: &FunctionTable,
    budgets: &[Budget],
    max_regression_points: Option<f64>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    for budget in budgets {
        let measured = budget.measured(new);
        if measured > budget.max_percent + EPSILON {
            violations.push(Violation {
                function: budget.function.clone(),
                message: format!(
                    "{}: {} share {measured:.2}% is over the budget of {:.2}%",
                    budget.function,
                    budget.measure.as_str(),
                    budget.max_percent
                ),
            });
        }
    }
    if let (Some(base), Some(limit)) = (base, max_regression_points) {
        for change in compare(base, new) {
            for (measure, before, after) in [
                (Measure::SelfShare, change.self_before, change.self_after),
                (Measure::Total, change.total_before, change.total_after),
            ] {
                if after - before > limit + EPSILON {
                    violations.push(Violation {
                        function: change.name.to_string(),
                        message: format!(
                            "{}: {} share grew {:.2} points ({before:.2}% → {after:.2}%), \
                             more than the allowed {limit:.2}",
                            change.name,
                            measure.as_str(),
                            after - before
                        ),
                    });
                }
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::folded;

    fn table(folded_text: &str) -> FunctionTable {
        FunctionTable::from_profile(&folded::parse(folded_text.as_bytes()).unwrap())
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    const BASE: &str = "app;main;parse 60\napp;main;render 40\n";
    const NEW: &str = "app;main;parse 90\napp;main;render 30\n";

    #[test]
    fn self_shares_add_up_to_100_and_total_counts_callers() {
        let t = table("app;main;parse;lex 7\napp;main;parse 3\napp;main;render 10\napp;other 5\n");
        assert_eq!(t.total_samples, 25);
        let self_sum: f64 = t.functions.iter().map(|f| t.self_percent(f)).sum();
        assert!(close(self_sum, 100.0), "{self_sum}");
        let main = t.get("main").unwrap();
        assert_eq!((main.self_samples, main.total_samples), (0, 20));
        assert!(close(t.total_percent(main), 80.0));
        let parse = t.get("parse").unwrap();
        assert_eq!((parse.self_samples, parse.total_samples), (3, 10));
        assert!(t.get("app").is_none(), "the process name is not a function");
        assert!(t.get("nope").is_none());
    }

    #[test]
    fn recursion_counts_once_in_total() {
        let t = table("app;main;walk;walk;walk 4\napp;main;walk;visit;walk 6\n");
        let walk = t.get("walk").unwrap();
        assert_eq!((walk.self_samples, walk.total_samples), (10, 10));
        assert!(close(t.total_percent(walk), 100.0));
        let visit = t.get("visit").unwrap();
        assert_eq!((visit.self_samples, visit.total_samples), (0, 6));
    }

    #[test]
    fn empty_profile_has_zero_shares() {
        let t = table("");
        assert_eq!(t.total_samples, 0);
        let f = FunctionStats {
            name: "x".into(),
            self_samples: 0,
            total_samples: 0,
        };
        assert_eq!(t.self_percent(&f), 0.0);
        assert!(t.ranked(RankBy::SelfShare, 10).is_empty());
    }

    #[test]
    fn ranking_by_self_and_total_breaks_ties_by_name() {
        let t = table("app;main;b 5\napp;main;a 5\napp;main;c 2\n");
        let names = |rows: Vec<&FunctionStats>| -> Vec<String> {
            rows.iter().map(|f| f.name.to_string()).collect()
        };
        assert_eq!(names(t.ranked(RankBy::SelfShare, 10)), ["a", "b", "c"]);
        assert_eq!(names(t.ranked(RankBy::SelfShare, 2)), ["a", "b"]);
        assert_eq!(names(t.ranked(RankBy::Total, 2)), ["main", "a"]);
    }

    #[test]
    fn same_shape_at_another_length_does_not_change() {
        let scaled = "app;main;parse 180\napp;main;render 120\n";
        let changes = compare(&table(BASE), &table(scaled));
        assert_eq!(changes.len(), 3);
        for c in &changes {
            assert!(
                close(c.self_delta(), 0.0) && close(c.total_delta(), 0.0),
                "{c:?}"
            );
        }
        assert!(evaluate(Some(&table(BASE)), &table(scaled), &[], Some(0.0)).is_empty());
    }

    #[test]
    fn changed_functions_have_right_before_and_after() {
        let changes = compare(&table(BASE), &table("app;main;parse 90\napp;main;new 30\n"));
        // parse: 60 → 75 (+15); render: 40 → 0 (−40); new: 0 → 25 (+25).
        let names: Vec<&str> = changes.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["render", "new", "parse", "main"]);
        let parse = &changes[2];
        assert!(close(parse.self_before, 60.0) && close(parse.self_after, 75.0));
        assert!(close(parse.total_before, 60.0) && close(parse.total_after, 75.0));
        assert!(close(parse.self_delta(), 15.0));
        assert!(close(changes[0].self_delta(), -40.0));
        assert!(close(changes[1].self_before, 0.0) && close(changes[1].self_after, 25.0));
        let main = &changes[3];
        assert!(close(main.total_before, 100.0) && close(main.total_delta(), 0.0));
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(
            parse_budget("json_parse=25%").unwrap(),
            Budget {
                function: "json_parse".into(),
                measure: Measure::SelfShare,
                max_percent: 25.0
            }
        );
        let b = parse_budget("total:main=90%").unwrap();
        assert_eq!(
            (b.function.as_str(), b.measure, b.max_percent),
            ("main", Measure::Total, 90.0)
        );
        let b = parse_budget("self:x=2.5").unwrap();
        assert_eq!(
            (b.function.as_str(), b.measure, b.max_percent),
            ("x", Measure::SelfShare, 2.5)
        );
        // Paths and operators keep their colons and equals signs.
        let b = parse_budget("total::sum=10").unwrap();
        assert_eq!(
            (b.function.as_str(), b.measure),
            ("total::sum", Measure::SelfShare)
        );
        let b = parse_budget("Foo::operator==<int>=5%").unwrap();
        assert_eq!(b.function, "Foo::operator==<int>");

        for (bad, want) in [
            ("parse", "no `=`"),
            ("=10%", "no function"),
            ("total:=10%", "no function"),
            ("parse=lots", "not a percentage"),
            ("parse=", "not a percentage"),
            ("parse=120%", "out of range"),
            ("parse=-1", "out of range"),
            ("parse=NaN", "out of range"),
        ] {
            let err = parse_budget(bad).unwrap_err();
            assert!(err.contains(want) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn percents_parse() {
        assert_eq!(parse_percent("10%").unwrap(), 10.0);
        assert_eq!(parse_percent(" 10 ").unwrap(), 10.0);
        assert_eq!(parse_percent("0").unwrap(), 0.0);
        assert_eq!(parse_percent("100%").unwrap(), 100.0);
        assert!(parse_percent("%").is_err());
        assert!(parse_percent("inf").is_err());
        assert!(parse_percent("100.5").is_err());
    }

    #[test]
    fn evaluate_budgets_and_regressions() {
        let (base, new) = (table(BASE), table(NEW));
        let budget = |text: &str| parse_budget(text).unwrap();

        // parse is 75% of NEW.
        let v = evaluate(None, &new, &[budget("parse=50%")], None);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].function, "parse");
        assert!(
            v[0].message.contains("75.00%") && v[0].message.contains("50.00%"),
            "{}",
            v[0].message
        );
        assert!(evaluate(None, &new, &[budget("parse=75%")], None).is_empty());
        assert!(evaluate(None, &new, &[budget("total:main=100")], None).is_empty());
        assert_eq!(
            evaluate(None, &new, &[budget("total:main=99")], None).len(),
            1
        );
        // A function that never ran is within budget.
        assert!(evaluate(None, &new, &[budget("missing=0")], None).is_empty());

        // parse grew 15 points (self and total); without a base no regression check.
        assert!(evaluate(None, &new, &[], Some(1.0)).is_empty());
        let v = evaluate(Some(&base), &new, &[], Some(10.0));
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v.iter().all(|v| v.function == "parse"));
        assert!(
            v[0].message.contains("self share grew 15.00 points"),
            "{}",
            v[0].message
        );
        assert!(
            v[1].message.contains("total share grew 15.00"),
            "{}",
            v[1].message
        );
        assert!(evaluate(Some(&base), &new, &[], Some(15.0)).is_empty());
        assert!(evaluate(Some(&base), &new, &[], Some(20.0)).is_empty());
        // Shrinking is never a regression: backwards only render (25 → 40) grew.
        let v = evaluate(Some(&new), &base, &[], Some(0.0));
        assert!(
            !v.is_empty() && v.iter().all(|v| v.function == "render"),
            "{v:?}"
        );
    }
}
