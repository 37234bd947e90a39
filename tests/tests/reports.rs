//! `hearth top` and `hearth check` end to end on hand-written folded files.
//! No BPF or privileges involved.
//!
//! BASE has 100 samples: parse 60 (60%), render 40 (40%). NEW has 120:
//! parse 90 (75%), render 30 (25%). So parse's share grew 15 points and
//! render's shrank 15, although both runs differ in length.

use std::fs;
use std::path::{Path, PathBuf};

use hearth_integration_tests::*;

struct Files {
    dir: PathBuf,
    base: String,
    new: String,
}

impl Files {
    fn new(test: &str) -> Files {
        let dir = scratch_dir(test);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let base = write("base.folded", "app;main;parse 60\napp;main;render 40\n");
        let new = write("new.folded", "app;main;parse 90\napp;main;render 30\n");
        Files { dir, base, new }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The table rows (after the header and column titles), split on spaces.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(2)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn percent(cell: &str) -> f64 {
    cell.trim_end_matches('%').parse().unwrap()
}

#[test]
fn top_by_self_shares_add_up_to_the_hand_computation() {
    let files = Files::new("top-self");
    let out = hearth(&["top", &files.new, "--by", "self"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("120 samples, ranked by self share"), "{text}");
    let rows = rows(&text);
    // RANK SELF TOTAL SAMPLES FUNCTION
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0], ["1", "75.00%", "75.00%", "90", "parse"], "{text}");
    assert_eq!(rows[1], ["2", "25.00%", "25.00%", "30", "render"], "{text}");
    let sum: f64 = rows.iter().map(|r| percent(&r[1])).sum();
    assert!((sum - 100.0).abs() < 0.01, "{text}");
}

#[test]
fn top_by_total_puts_the_caller_first() {
    let files = Files::new("top-total");
    let out = hearth(&["top", &files.new, "--by", "total", "-n", "1"]);
    assert_exit(&out, 0);
    let rows = rows(&stdout(&out));
    assert_eq!(rows, [["1", "0.00%", "100.00%", "120", "main"]]);
}

#[test]
fn top_shows_the_trend_against_an_earlier_file() {
    let files = Files::new("top-trend");
    let out = hearth(&["top", &files.new, "--compare-with", &files.base]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("trend in points since"), "{text}");
    let rows = rows(&text);
    // RANK SELF TOTAL SAMPLES TREND FUNCTION
    assert_eq!(
        rows[0],
        ["1", "75.00%", "75.00%", "90", "+15.00", "parse"],
        "{text}"
    );
    assert_eq!(
        rows[1],
        ["2", "25.00%", "25.00%", "30", "-15.00", "render"],
        "{text}"
    );
}

#[test]
fn top_usage_errors_exit_2() {
    let files = Files::new("top-usage");
    assert_exit(&hearth(&["top"]), 2);
    assert_exit(&hearth(&["top", &files.new, "--compare-since", "1h"]), 2);
    let missing = files.dir.join("missing.folded");
    assert_exit(&hearth(&["top", missing.to_str().unwrap()]), 1);
}

#[test]
fn check_budget_fails_over_and_passes_under() {
    let files = Files::new("check-budget");
    let out = hearth(&["check", "--max", "parse=50%", &files.base, &files.new]);
    assert_exit(&out, 1);
    let text = stdout(&out);
    assert!(
        text.contains("FAIL  parse: self share 75.00% is over the budget of 50.00%"),
        "{text}"
    );
    assert!(text.contains("check FAILED"), "{text}");

    let out = hearth(&["check", "--max", "parse=80%", &files.base, &files.new]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains("PASS  parse: self share 75.00% is within the budget of 80.00%"),
        "{text}"
    );
    assert!(text.contains("check passed"), "{text}");

    // Budgets alone need no BASE; the total share of main is 100%.
    let out = hearth(&["check", "--max", "total:main=99", &files.new]);
    assert_exit(&out, 1);
    assert!(stdout(&out).contains("main: total share 100.00%"));
}

#[test]
fn check_regression_limit_is_in_points_of_share() {
    let files = Files::new("check-regression");
    let out = hearth(&["check", "--max-regression", "10%", &files.base, &files.new]);
    assert_exit(&out, 1);
    let text = stdout(&out);
    assert!(
        text.contains("FAIL  parse: self share grew 15.00 points (60.00% → 75.00%)"),
        "{text}"
    );
    // render shrank: not a regression.
    assert!(!text.contains("render"), "{text}");

    let out = hearth(&["check", "--max-regression", "20%", &files.base, &files.new]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("largest growth: parse self +15.00"),
        "{}",
        stdout(&out)
    );
    // Exactly at the limit holds.
    let out = hearth(&["check", "--max-regression", "15", &files.base, &files.new]);
    assert_exit(&out, 0);
}

#[test]
fn check_bad_arguments_exit_2() {
    let files = Files::new("check-usage");
    for args in [
        vec!["check", "--max", "parse", &files.base, &files.new],
        vec!["check", "--max", "parse=150%", &files.base, &files.new],
        vec!["check", "--max-regression", "ten", &files.base, &files.new],
        vec!["check", "--max-regression", "10%", &files.new],
        vec!["check", &files.base, &files.new],
        vec!["check", "--max", "parse=5"],
    ] {
        let out = hearth(&args);
        assert_exit(&out, 2);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(Path::new(&files.base).exists());
}

/// `top --live` samples the fixture with the real programs (root, BPF) and
/// redraws its table; piped, each refresh is printed in full. The leaf
/// shares follow the fixture's 60/30/10 split.
#[test]
fn top_live_ranks_the_fixture_leaves() {
    let dir = scratch_dir("top-live");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["60"]);
    let pid = fixture.pid().to_string();
    let child = std::process::Command::new(hearth_bin())
        .args([
            "top",
            "--live",
            "--pid",
            &pid,
            "--refresh",
            "500ms",
            "-n",
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_exit(&out, 0);
    let text = stdout(&out);
    let tables: Vec<&str> = text.split("\n\n").filter(|t| t.contains("RANK")).collect();
    assert!(tables.len() >= 3, "{} refreshes:\n{text}", tables.len());
    // The last table covers the whole run.
    let last = rows(tables.last().unwrap());
    let share = |name: &str| {
        last.iter()
            .find(|r| r.last().map(String::as_str) == Some(name))
            .map(|r| percent(&r[1]))
            .unwrap_or_else(|| panic!("{name} missing from:\n{}", tables.last().unwrap()))
    };
    assert!((share("leaf_a") - 60.0).abs() < 12.0, "{text}");
    assert!((share("leaf_b") - 30.0).abs() < 12.0, "{text}");
    assert_eq!(last[0].last().map(String::as_str), Some("leaf_a"), "{text}");
}
