//! Short-lived processes, pid reuse and process filters, end to end with
//! the real kernel programs (root, BPF).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_integration_tests::churn::{self, Churn};
use hearth_integration_tests::*;

/// Checks the children's samples: at least 95% symbolized with their own
/// names (their work function, or, for the moments around it, the start-up
/// and exit code of their own executable, or the kernel's exec and exit
/// paths where no user stack is left), and at least 90% in their work
/// function; none with another process's code. `fork_only`: the children
/// did not exec (they run the parent's code, under its name).
fn check_churn(
    profile: &hearth::profile::Profile,
    children: &HashMap<u32, String>,
    parent: u32,
    fork_only: bool,
) {
    let (mut total, mut own, mut edges) = (0u64, 0u64, 0u64);
    let mut wrong = Vec::new();
    for sample in &profile.samples {
        let process = profile.process(sample.process);
        let names: Vec<&str> = sample
            .frames
            .iter()
            .map(|&f| &*profile.frame(f).function)
            .collect();
        if process.pid == parent {
            assert!(
                !names.iter().any(|n| n.starts_with("churn_work_")),
                "a child's work under the parent's pid: {names:?}"
            );
            continue;
        }
        let Some(work) = children.get(&process.pid) else {
            continue;
        };
        total += sample.count;
        // A forked child returns from fork into parent_loop: a child that
        // does not exec calls its work from there, one that does runs it
        // only on its way to exec (its pre-exec image, captured at its
        // first sample if it has one there).
        let foreign: &[&str] = if fork_only || names.contains(&"execl") {
            &["calibration_spin"]
        } else {
            &["parent_loop", "calibration_spin"]
        };
        assert!(
            !names
                .iter()
                .any(|n| foreign.contains(n) || n.starts_with("churn_work_") && *n != work),
            "pid {} ({work}) has another process's code: {names:?}",
            process.pid
        );
        // Between fork and exec a child still runs the parent's image, and
        // is named after it; in its work it is named after its own.
        let own_name = if fork_only {
            churn::PARENT_NAME
        } else {
            churn::CHILD_NAME
        };
        if names.contains(&work.as_str()) {
            assert_eq!(&*process.name, own_name, "pid {}", process.pid);
        } else {
            assert!(
                [churn::PARENT_NAME, churn::CHILD_NAME].contains(&&*process.name),
                "pid {}: {}",
                process.pid,
                process.name
            );
        }
        let user_leaf = sample
            .frames
            .iter()
            .map(|&f| profile.frame(f))
            .find(|f| f.kind != hearth::profile::FrameKind::Kernel);
        let lifecycle = ["do_exit", "bprm_execve", "ret_from_fork"];
        if names.contains(&work.as_str()) {
            own += sample.count;
        } else if user_leaf.is_some_and(|f| !f.function.starts_with('['))
            || names.iter().any(|n| lifecycle.contains(n))
        {
            edges += sample.count;
        } else if wrong.len() < 10 {
            wrong.push((process.pid, work.clone(), names.join(";")));
        }
    }
    let share = own as f64 / total.max(1) as f64;
    let named = (own + edges) as f64 / total.max(1) as f64;
    eprintln!(
        "{} children, {total} samples, {own} in their own work function ({:.1}%), \
         {:.1}% symbolized with their own names; others: {wrong:#?}",
        children.len(),
        100.0 * share,
        100.0 * named
    );
    // 120 children × 20 ms at 99 Hz: about 240 samples.
    assert!(total >= 120, "{total} samples of the children");
    assert!(
        named >= 0.95,
        "{:.1}% symbolized as their own",
        100.0 * named
    );
    assert!(
        share >= 0.90,
        "{:.1}% in their work function",
        100.0 * share
    );
}

fn record_churn(test: &str, flags: &[&str], extra: &[&str], fork_only: bool) {
    let dir = scratch_dir(test);
    let pb = dir.join("p.pb.gz");
    let mut args = vec!["record", "-d", "7s", "-F", "99", "-o", pb.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (mut hearth, log) = start_hearth(&dir, &args, &[]);
    let churn = Churn {
        flags,
        fork_only,
        ..Churn::default()
    }
    .start(&dir);
    let parent = churn.id();
    let children = churn::children(churn);
    let status = hearth.wait().unwrap();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "hearth: {status}\n{log}");
    print_process_events(&log);
    check_churn(&read_pprof(&pb), &children, parent, fork_only);
}

/// Children living 20 ms each, sampled host-wide and drained every second
/// (after most of them are gone): symbolized from what was captured at
/// their exec.
#[test]
fn short_lived_processes_are_symbolized_with_frame_pointers() {
    record_churn("churn-fp", FRAME_POINTER_FLAGS, &[], false);
}

/// The same without frame pointers, drained every 10 s as the daemon does
/// (every child is long gone by then).
#[test]
fn short_lived_processes_are_symbolized_at_a_ten_second_drain() {
    record_churn(
        "churn-nofp",
        NO_FRAME_POINTER_FLAGS,
        &["--drain-interval", "10s"],
        false,
    );
}

/// Children that fork without exec'ing (prefork workers, subshells), each
/// working 20 ms in its own function and exiting, drained every 10 s
/// (every child long gone): symbolized from what was captured at their
/// first sample, under their own pids.
#[test]
fn forked_short_lived_processes_are_symbolized_at_a_ten_second_drain() {
    record_churn(
        "churn-fork",
        FRAME_POINTER_FLAGS,
        &["--drain-interval", "10s"],
        true,
    );
}

/// A copy of the cpu_split fixture under another name, running.
fn spinner(dir: &Path, exe: &Path, name: &str) -> Fixture {
    let copy = dir.join(name);
    std::fs::copy(exe, &copy).unwrap();
    Fixture::spawn(&copy, &["20"])
}

/// Excluded processes (by name and by pid) have no samples, and the
/// kernel left them out before any stack walk: the filtered counter
/// accounts for their CPU time.
#[test]
fn excluded_processes_are_not_sampled_and_cost_no_walk() {
    let dir = scratch_dir("exclude");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let keep = spinner(&dir, &exe, "spin_keep");
    let by_name = spinner(&dir, &exe, "spin_drop");
    let by_pid = spinner(&dir, &exe, "spin_other");
    std::thread::sleep(Duration::from_millis(200));
    let pb = dir.join("p.pb.gz");
    let pid = by_pid.pid().to_string();
    let out = hearth(&[
        "record",
        "-d",
        "3s",
        "-F",
        "99",
        "--exclude-name",
        "^spin_drop$",
        "--exclude-pid",
        &pid,
        "-o",
        pb.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    let profile = read_pprof(&pb);
    let count = |pid| -> u64 { samples_of_pid(&profile, pid).iter().map(|s| s.count).sum() };
    let kept = count(keep.pid());
    assert!(kept > 20, "{kept} samples kept");
    assert_eq!(count(by_name.pid()), 0, "excluded by name");
    assert_eq!(count(by_pid.pid()), 0, "excluded by pid");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let filtered = filtered_in_kernel(&stderr);
    // The three spinners share the CPUs alike: the two excluded ones had
    // about twice the kept one's samples, all counted as filtered.
    eprintln!("{filtered} filtered, {kept} kept");
    assert!(
        filtered as f64 >= 1.2 * kept as f64,
        "{filtered} samples filtered in the kernel, {kept} of the kept spinner\n{stderr}"
    );
}

/// A cgroup made for the test, removed (its processes moved back to the
/// root) when dropped.
struct TestCgroup {
    dir: PathBuf,
    root: PathBuf,
}

impl TestCgroup {
    fn create(name: &str) -> TestCgroup {
        let root = hearth::filter::cgroup2_mount().expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).expect("creating the test cgroup");
        TestCgroup { dir, root }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("inner/cgroup.procs"), pid.to_string())
            .expect("moving the fixture into the test cgroup");
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in [self.dir.join("inner"), self.dir.clone()] {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Only the processes of the included cgroup's subtree are sampled; the
/// others are left out in the kernel.
#[test]
fn include_cgroup_samples_only_its_subtree() {
    let dir = scratch_dir("cgroup");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let inside = Fixture::spawn(&exe, &["20"]);
    let outside = Fixture::spawn(&exe, &["20"]);
    let cgroup = TestCgroup::create("hearth-test");
    cgroup.add(inside.pid());
    let pb = dir.join("p.pb.gz");
    let name = cgroup
        .dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let out = hearth(&[
        "record",
        "-d",
        "3s",
        "-F",
        "99",
        "--include-cgroup",
        &name,
        "-o",
        pb.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    let profile = read_pprof(&pb);
    let inside_samples: u64 = samples_of_pid(&profile, inside.pid())
        .iter()
        .map(|s| s.count)
        .sum();
    assert!(
        inside_samples > 20,
        "{inside_samples} samples in the cgroup"
    );
    assert_eq!(
        inside_samples,
        profile.total_count(),
        "only the cgroup's process is sampled"
    );
    let filtered = filtered_in_kernel(&String::from_utf8_lossy(&out.stderr));
    assert!(
        filtered > inside_samples / 2,
        "{filtered} samples of the outside process filtered, {inside_samples} inside"
    );
    drop(outside);
}

/// Bad filters are usage errors (exit 2) that say what is wrong.
#[test]
fn bad_filters_are_usage_errors() {
    let dir = scratch_dir("bad-filter");
    let out_path = dir.join("x.folded");
    let out = out_path.to_str().unwrap();
    for (args, says) in [
        (vec!["--include-name", "("], "regular expression"),
        (
            vec!["--exclude-cgroup", "/no/such/cgroup-hearth"],
            "no such cgroup",
        ),
        (vec!["--include-cgroup", "/sys/fs/cgroup/cpu"], "cgroup v1"),
    ] {
        let mut all = vec!["record", "-d", "1s", "-o", out];
        all.extend(args.iter());
        let output = hearth(&all);
        assert_exit(&output, 2);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
