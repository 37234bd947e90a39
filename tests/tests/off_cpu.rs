//! Off-CPU and wall-clock profiling end to end: the real kernel programs
//! (root, BPF), a fixture that computes ~10 ms then blocks ~30 ms, and
//! what `hearth record` and `hearth run` make of it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth::profile::{OffCpuReason, Profile, SampleKind};
use hearth_integration_tests::daemon::Daemon;
use hearth_integration_tests::otlp_check::{check_request, stacks};
use hearth_integration_tests::otlp_receiver::Receiver;
use hearth_integration_tests::*;

/// Rounds of 10 ms compute + 30 ms block: about 2 s of blocking.
const ROUNDS: &str = "50";

fn fixture(dir: &Path) -> std::path::PathBuf {
    let mut flags = FRAME_POINTER_FLAGS.to_vec();
    flags.push("-pthread");
    build_c_fixture("off_cpu", &flags, dir)
}

/// Runs the fixture in `mode` under `hearth record <extra> --pid` and
/// returns the recorded profile (from pprof, which keeps labels and the
/// kind) and the blocked nanoseconds the fixture measured itself.
fn record_fixture(test: &str, mode: &str, extra: &[&str]) -> (Profile, u64, u32, String) {
    let dir = scratch_dir(test);
    let program = fixture(&dir);
    let mut child = Command::new(&program)
        .args([mode, ROUNDS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the fixture");
    let pid = child.id();
    let out = dir.join("out.pb.gz");
    let pid_text = pid.to_string();
    // The record ends when the fixture exits.
    let mut args = vec!["record", "--pid", &pid_text, "-d", "60s", "-o"];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    let recorder = Command::new(hearth_bin())
        .args(&args)
        .env("HEARTH_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting hearth");
    // The fixture waits on stdin until the programs are attached, so every
    // wait it measures is one hearth could see.
    let output = release_when_recording(recorder, child.stdin.take().unwrap());
    assert_exit(&output, 0);
    let fixture_out = child.wait_with_output().expect("fixture output");
    assert!(fixture_out.status.success(), "fixture failed");
    let text = String::from_utf8_lossy(&fixture_out.stdout).into_owned();
    let blocked_ns: u64 = text
        .split_whitespace()
        .skip_while(|w| *w != "blocked_ns")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("fixture printed no blocked_ns: {text:?}"));
    (
        read_pprof(&out),
        blocked_ns,
        pid,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits for hearth's "recording" log line, then lets the fixture go by
/// closing its stdin; returns hearth's finished output.
fn release_when_recording(
    mut recorder: std::process::Child,
    fixture_stdin: std::process::ChildStdin,
) -> std::process::Output {
    use std::io::{BufRead, BufReader, Read};
    let mut stderr = BufReader::new(recorder.stderr.take().unwrap());
    let mut log = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        log.push_str(&line);
        let started = line.contains("recording");
        line.clear();
        if started {
            break;
        }
    }
    drop(fixture_stdin);
    stderr
        .read_to_string(&mut log)
        .expect("reading hearth's log");
    let status = recorder.wait().expect("hearth");
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: log.into_bytes(),
    }
}

/// A stack, root first, and why it was off CPU.
type ReasonedStack = (Vec<String>, Option<OffCpuReason>);

/// Nanoseconds of the fixture's samples whose stack has `function`, and
/// those stacks (root first, with the reason).
fn time_in(profile: &Profile, pid: u32, function: &str) -> (u64, Vec<ReasonedStack>) {
    let mut total = 0;
    let mut stacks = Vec::new();
    for sample in samples_of_pid(profile, pid) {
        let names: Vec<String> = profile.stack_names(sample).map(str::to_owned).collect();
        if names.iter().any(|n| n == function) {
            total += sample.count;
            stacks.push((names, sample.off_cpu));
        }
    }
    (total, stacks)
}

fn assert_blocking_attributed(mode: &str, function: &str, syscall_frames: &[&str]) {
    let (profile, true_ns, pid, stderr) =
        record_fixture(&format!("off-cpu-{mode}"), mode, &["--off-cpu"]);
    assert!(
        matches!(profile.meta.kind, SampleKind::OffCpu(s) if s.min_ns == 1_000_000),
        "{:?}",
        profile.meta.kind
    );
    let (recorded_ns, stacks) = time_in(&profile, pid, function);
    let ratio = recorded_ns as f64 / true_ns as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{function}: recorded {recorded_ns} ns vs {true_ns} ns measured by the fixture \
         ({ratio:.3}); stacks {stacks:#?}\n{stderr}"
    );
    for (stack, reason) in &stacks {
        let names: Vec<&str> = stack.iter().map(String::as_str).collect();
        assert!(
            contains_in_order(&names, &["main", "run", function]),
            "stack does not reach main: {names:?}"
        );
        assert!(
            reason.is_some(),
            "off-CPU samples carry a reason: {names:?}"
        );
        // A busy machine can also preempt the thread inside the function
        // (on its way back from write(), say): then the kernel part is the
        // preemption path, not the wait.
        if *reason == Some(OffCpuReason::Involuntary) {
            continue;
        }
        assert!(
            syscall_frames.iter().any(|f| names.contains(f)),
            "kernel part names no {syscall_frames:?}: {names:?}"
        );
        let leaf_user = names.iter().position(|n| *n == function).unwrap();
        assert!(
            names[leaf_user..]
                .iter()
                .any(|n| syscall_frames.contains(n)),
            "the kernel frames come after (leafward of) {function}: {names:?}"
        );
    }
    // Nearly all of it is waiting, not preemption.
    let voluntary: u64 = samples_of_pid(&profile, pid)
        .iter()
        .filter(|s| s.off_cpu == Some(OffCpuReason::Voluntary))
        .filter(|s| profile.stack_names(s).any(|n| n == function))
        .map(|s| s.count)
        .sum();
    assert!(
        voluntary * 10 >= recorded_ns * 9,
        "{voluntary} of {recorded_ns} voluntary"
    );
    // compute() never waits: any off-CPU time it has is preemption (a lot
    // of it when the machine is busy).
    let computing_voluntary: u64 = samples_of_pid(&profile, pid)
        .iter()
        .filter(|s| s.off_cpu != Some(OffCpuReason::Involuntary))
        .filter(|s| profile.stack_names(s).any(|n| n == "compute"))
        .map(|s| s.count)
        .sum();
    assert_eq!(computing_voluntary, 0, "compute() waited voluntarily");
}

#[test]
fn sleeping_is_attributed_to_the_sleeping_stack_with_its_true_time() {
    assert_blocking_attributed(
        "sleep",
        "block_in_sleep",
        &[
            "hrtimer_nanosleep",
            "__x64_sys_clock_nanosleep",
            "do_nanosleep",
        ],
    );
}

#[test]
fn a_late_pipe_write_is_attributed_to_the_reading_stack() {
    assert_blocking_attributed(
        "pipe",
        "block_in_pipe_read",
        &["anon_pipe_read", "pipe_read", "ksys_read", "vfs_read"],
    );
}

/// Waits of 30 ms are not recorded at a 50 ms minimum, and the summary
/// counts them as skipped, among the switch-outs followed.
#[test]
fn waits_below_the_minimum_are_counted_not_recorded() {
    let (profile, true_blocked, pid, stderr) = record_fixture(
        "off-cpu-min",
        "sleep",
        &["--off-cpu", "--off-cpu-min", "50ms"],
    );
    // A loaded machine can keep a woken thread waiting for a CPU past the
    // minimum (a wait really that long); a minimum not applied would
    // record all of them.
    let (recorded, stacks) = time_in(&profile, pid, "block_in_sleep");
    assert!(
        recorded * 10 <= true_blocked,
        "30 ms waits under a 50 ms minimum: {recorded} of {true_blocked} ns recorded: {stacks:?}"
    );
    let skipped: u64 = stderr
        .split(" shorter waits")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skipped count in: {stderr}"));
    assert!(
        skipped >= 40,
        "{skipped} waits counted as skipped\n{stderr}"
    );
    // "F of N switch-outs followed, ... and U unsampled switches skipped":
    // the followed and the sampled-out are parts of all switch-outs.
    let number_before = |marker: &str| -> u64 {
        stderr
            .split(marker)
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {marker:?} in: {stderr}"))
    };
    let all = number_before(" switch-outs followed");
    let followed = stderr
        .split(" switch-outs followed")
        .next()
        .and_then(|s| s.rsplit(' ').nth(2))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no followed count in: {stderr}"));
    let unsampled = number_before(" unsampled switches");
    assert!(
        followed >= skipped && followed + unsampled <= all,
        "{followed} of {all} followed, {unsampled} unsampled\n{stderr}"
    );
}

/// A wall-clock profile holds both the computing (on-CPU samples as time)
/// and the blocking, in about their true proportions (10 ms : 30 ms).
#[test]
fn wall_clock_profile_has_compute_and_blocking_in_proportion() {
    let (profile, true_blocked, pid, stderr) =
        record_fixture("off-cpu-wall", "sleep", &["--wall", "-F", "499"]);
    assert!(
        matches!(profile.meta.kind, SampleKind::Wall(_)),
        "{:?}",
        profile.meta.kind
    );
    let (blocked, _) = time_in(&profile, pid, "block_in_sleep");
    let (computing, _) = time_in(&profile, pid, "compute");
    let ratio = blocked as f64 / true_blocked as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "blocked {blocked} vs {true_blocked}\n{stderr}"
    );
    // 50 rounds of 10 ms: 0.5 s of compute, from samples at 499 Hz.
    let compute_share = computing as f64 / (computing + blocked) as f64;
    assert!(
        (0.15..=0.35).contains(&compute_share),
        "compute is {compute_share:.2} of compute + blocked (expected about 0.25)\n{stderr}"
    );
}

/// The daemon exports off-CPU time as its own OTLP profile type and writes
/// it to its own store directory, next to the on-CPU windows.
#[test]
fn daemon_exports_off_cpu_profiles_over_otlp_and_to_the_store() {
    let dir = scratch_dir("off-cpu-daemon");
    let program = fixture(&dir);
    let receiver = Receiver::start(None, None);
    let endpoint = receiver.endpoint();
    let store = dir.join("store");
    let spool = dir.join("spool");
    let mut daemon = Daemon::start(
        &dir,
        &[
            "--otlp-endpoint",
            &endpoint,
            "--spool-dir",
            spool.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--interval",
            "1s",
            "--off-cpu",
            "--max-cpu-percent",
            "100",
            "--max-host-load-percent",
            "100",
        ],
        &[],
    );
    daemon.wait_ready(Duration::from_secs(30));
    let child = Command::new(&program)
        .args(["sleep", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the fixture");
    let pid = child.id();
    let status = child.wait_with_output().expect("fixture").status;
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = daemon.stop();
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.log);

    let mut off_cpu_ns = 0i64;
    let mut kinds = std::collections::HashSet::new();
    for (i, req) in receiver.requests().iter().enumerate() {
        if let Err(e) = check_request(req) {
            panic!("request {i} is invalid: {e}");
        }
        for s in stacks(req) {
            kinds.insert(s.sample_type.clone());
            if s.resource.get("process.pid") != Some(&pid.to_string()) {
                continue;
            }
            if s.sample_type == ("off_cpu".to_string(), "nanoseconds".to_string()) {
                let names: Vec<&str> = s.frames.iter().map(String::as_str).collect();
                if contains_in_order(&names, &["main", "run", "block_in_sleep"]) {
                    assert_eq!(
                        s.sample_attrs
                            .get("hearth.off_cpu.reason")
                            .map(String::as_str),
                        Some("voluntary"),
                        "{s:?}"
                    );
                    off_cpu_ns += s.count;
                }
            }
        }
    }
    assert!(
        kinds.contains(&("samples".to_string(), "count".to_string())),
        "on-CPU profiles still flow: {kinds:?}"
    );
    // 40 rounds of 30 ms: 1.2 s of sleeping (nanosleep may oversleep a bit).
    let blocked = Duration::from_nanos(off_cpu_ns as u64);
    assert!(
        blocked >= Duration::from_millis(1080) && blocked <= Duration::from_millis(1500),
        "OTLP carried {blocked:?} of sleeping for 1.2 s of sleeps"
    );

    // The store keeps off-CPU windows apart, and the flame graph command
    // reads them with their unit.
    let off_store = store.join("off-cpu");
    let folded = dir.join("off.folded");
    let output = hearth(&[
        "flamegraph",
        "--store",
        off_store.to_str().unwrap(),
        "--pid",
        &pid.to_string(),
        "-o",
        folded.to_str().unwrap(),
    ]);
    assert_exit(&output, 0);
    let text = std::fs::read_to_string(&folded).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("block_in_sleep") && l.contains("[off-CPU: waiting]")),
        "{text}"
    );
}
