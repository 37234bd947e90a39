//! `hearth run --otlp-endpoint` end to end: the real kernel programs (root,
//! BPF), a fixture program, and the in-repo OTLP receiver decoding what the
//! daemon sends. Validity of every request, tags, and no data loss through
//! an outage, an agent restart and a full spool.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_integration_tests::daemon::{otlp_args, Daemon};
use hearth_integration_tests::otlp_check::{check_request, stacks, DecodedSample};
use hearth_integration_tests::otlp_receiver::Receiver;
use hearth_integration_tests::*;

/// Every request is valid; returns the fixture's samples in arrival order.
fn fixture_samples(receiver: &Receiver, pid: u32) -> Vec<DecodedSample> {
    let requests = receiver.requests();
    assert!(!requests.is_empty(), "nothing arrived");
    let mut out = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        if let Err(e) = check_request(req) {
            panic!("request {i} is invalid: {e}");
        }
        out.extend(
            stacks(req)
                .into_iter()
                .filter(|s| s.resource.get("process.pid") == Some(&pid.to_string())),
        );
    }
    out
}

/// The fixture's windows as (start, duration) in arrival order, one entry
/// per profile (a window's samples share one profile id).
fn windows(samples: &[DecodedSample]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for s in samples {
        if seen.insert(s.profile_id.clone()) {
            out.push((s.time_unix_nano, s.duration_nano, s.profile_id.clone()));
        }
    }
    out
}

/// Consecutive windows touch: each starts where the previous ended. A gap
/// would be a lost window, an overlap or a repeat a duplicate.
fn assert_contiguous(windows: &[(u64, u64, Vec<u8>)]) {
    for pair in windows.windows(2) {
        let (start, duration, _) = &pair[0];
        let (next, _, _) = &pair[1];
        assert_eq!(
            start + duration,
            *next,
            "window at {next} does not follow the one at {start}+{duration}: {:?}",
            windows.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>()
        );
    }
}

fn total(samples: &[DecodedSample]) -> i64 {
    samples.iter().map(|s| s.count).sum()
}

/// Valid OTLP with the fixture symbolized and tagged by the semantic
/// conventions; gzip and extra headers reach the receiver.
#[test]
fn otlp_export_is_valid_symbolized_and_tagged() {
    let dir = scratch_dir("otlp-valid");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["120"]);
    let receiver = Receiver::start(None, None);
    let endpoint = receiver.endpoint();
    let spool = dir.join("spool");
    let mut daemon = Daemon::start(
        &dir,
        &otlp_args(&endpoint, &spool, &["--otlp-header", "x-tenant=team-a"]),
        &[],
    );
    daemon.wait_ready(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(3000));
    let signalled = unix_nanos(SystemTime::now());
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);

    assert_eq!(
        receiver.received()[0].header("x-tenant"),
        Some("team-a"),
        "extra header"
    );
    let samples = fixture_samples(&receiver, fixture.pid());
    assert!(total(&samples) > 150, "{} fixture samples", total(&samples));
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut leaf = [0i64; 3];
    for s in &samples {
        assert_eq!(s.sample_type, ("samples".into(), "count".into()));
        assert_eq!(s.period_type, ("cpu".into(), "nanoseconds".into()));
        assert_eq!(s.period, 1_000_000_000 / 99);
        assert_eq!(s.resource["process.executable.name"], "cpu_split");
        assert_eq!(s.resource["service.name"], "cpu_split");
        assert_eq!(s.resource["host.name"], hostname.trim());
        assert!(
            s.resource["process.executable.path"].ends_with("/cpu_split"),
            "{:?}",
            s.resource
        );
        assert_eq!(s.sample_attrs["thread.id"], fixture.pid().to_string());
        assert_eq!(s.sample_attrs["thread.name"], "cpu_split");
        assert_eq!(s.timestamps.len(), 1, "one last-seen time per sample");
        let frames: Vec<&str> = s.frames.iter().map(String::as_str).collect();
        for (i, l) in ["leaf_a", "leaf_b", "leaf_c"].iter().enumerate() {
            if contains_in_order(&frames, &["main", "run", "dispatch", l]) {
                leaf[i] += s.count;
            }
        }
    }
    let all = total(&samples);
    let share = |n: i64| 100.0 * n as f64 / all as f64;
    eprintln!(
        "leaf shares {:.1} {:.1} {:.1} of {all}",
        share(leaf[0]),
        share(leaf[1]),
        share(leaf[2])
    );
    assert!((share(leaf[0]) - 60.0).abs() < 10.0, "{leaf:?} of {all}");
    assert!((share(leaf[1]) - 30.0).abs() < 10.0, "{leaf:?} of {all}");
    assert!(leaf.iter().sum::<i64>() as f64 >= 0.95 * all as f64);
    let windows = windows(&samples);
    assert_contiguous(&windows);
    // Shutdown flush: the last partial window, drained after the signal,
    // was delivered.
    let (start, duration, _) = windows.last().unwrap();
    assert!(
        start + duration >= signalled,
        "the last window ends before SIGTERM was sent"
    );
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// The backend is down for three windows, then up: every window arrives,
/// in order, none twice.
#[test]
fn outage_then_recovery_loses_nothing() {
    let dir = scratch_dir("otlp-outage");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["120"]);
    let receiver = Receiver::start(None, None);
    receiver.stop();
    let endpoint = receiver.endpoint();
    let spool = dir.join("spool");
    let cpu_before = fixture.cpu_time();
    let mut daemon = Daemon::start(&dir, &otlp_args(&endpoint, &spool, &[]), &[]);
    daemon.wait_ready(Duration::from_secs(20));
    daemon.wait_metric(
        "hearth_export_queue_requests",
        Duration::from_secs(20),
        |queued| queued >= 3.0,
    );
    assert!(
        daemon
            .metric("hearth_export_requests_total{outcome=\"retried\"}")
            .unwrap()
            >= 1.0
    );
    receiver.restart();
    daemon.wait_metric(
        "hearth_export_queue_requests",
        Duration::from_secs(30),
        |q| q == 0.0,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = daemon.stop();
    let cpu_used = fixture.cpu_time() - cpu_before;
    assert!(stopped.status.success(), "{}", stopped.log);

    let samples = fixture_samples(&receiver, fixture.pid());
    let windows = windows(&samples);
    assert!(windows.len() >= 5, "{} windows arrived", windows.len());
    assert_contiguous(&windows);
    let expected = 99.0 * cpu_used.as_secs_f64();
    let got = total(&samples) as f64;
    eprintln!("{got} samples delivered, at most {expected:.0} possible");
    assert!(
        got <= expected * 1.05 && got >= expected * 0.6,
        "{got} vs {expected:.0}"
    );
}

/// Undelivered windows survive an agent restart in the spool and are sent
/// first, in order, none twice.
#[test]
fn spool_survives_an_agent_restart() {
    let dir = scratch_dir("otlp-restart");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["120"]);
    let receiver = Receiver::start(None, None);
    receiver.stop();
    let endpoint = receiver.endpoint();
    let spool = dir.join("spool");

    let mut first = Daemon::start(&dir, &otlp_args(&endpoint, &spool, &[]), &[]);
    first.wait_ready(Duration::from_secs(20));
    first.wait_metric(
        "hearth_windows_collected_total",
        Duration::from_secs(20),
        |w| w >= 3.0,
    );
    let stopped = first.stop_with(libc::SIGTERM, Duration::from_secs(30));
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(stopped.log.contains("left in the spool"), "{}", stopped.log);
    let spooled = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "pb")
        })
        .count();
    assert!(spooled >= 3, "{spooled} requests spooled");

    receiver.restart();
    let mut second = Daemon::start(&dir, &otlp_args(&endpoint, &spool, &[]), &[]);
    second.wait_ready(Duration::from_secs(20));
    second.wait_metric(
        "hearth_windows_collected_total",
        Duration::from_secs(20),
        |w| w >= 2.0,
    );
    let stopped = second.stop();
    assert!(stopped.status.success(), "{}", stopped.log);

    let samples = fixture_samples(&receiver, fixture.pid());
    let windows = windows(&samples);
    // Two contiguous runs (one per agent), the first run's windows first.
    let split = windows
        .windows(2)
        .position(|p| p[0].0 + p[0].1 != p[1].0)
        .expect("a gap between the two agents' runs")
        + 1;
    let (before, after) = windows.split_at(split);
    assert_contiguous(before);
    assert_contiguous(after);
    assert!(
        before.len() >= 3,
        "{} windows from the first run",
        before.len()
    );
    assert!(!after.is_empty());
    assert!(
        before.last().unwrap().0 < after[0].0,
        "spooled windows go first"
    );
    let ids: HashSet<_> = windows.iter().map(|w| &w.2).collect();
    assert_eq!(ids.len(), windows.len(), "a window arrived twice");
}

/// Past the spool cap the oldest requests are dropped, and every drop is
/// counted and logged; what does arrive is still in order.
#[test]
fn full_spool_drops_the_oldest_and_counts_it() {
    let dir = scratch_dir("otlp-cap");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["120"]);
    let receiver = Receiver::start(None, None);
    receiver.stop();
    let endpoint = receiver.endpoint();
    let spool = dir.join("spool");
    let mut daemon = Daemon::start(
        &dir,
        &otlp_args(
            &endpoint,
            &spool,
            // A window's request is a few KiB to a few tens of KiB on a
            // busy host (one resource with its metadata per process): a
            // spool of a few requests.
            &["--queue-memory", "1KiB", "--spool-max-size", "64KiB"],
        ),
        &[],
    );
    daemon.wait_ready(Duration::from_secs(20));
    let dropped = daemon.wait_metric(
        "hearth_export_requests_total{outcome=\"dropped\"}",
        Duration::from_secs(30),
        |d| d >= 2.0,
    );
    receiver.restart();
    daemon.wait_metric(
        "hearth_export_queue_requests",
        Duration::from_secs(30),
        |q| q == 0.0,
    );
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        stopped.log.contains("dropped"),
        "drops are logged:\n{}",
        stopped.log
    );
    eprintln!("{dropped} requests dropped");

    let samples = fixture_samples(&receiver, fixture.pid());
    let windows = windows(&samples);
    assert!(!windows.is_empty());
    for pair in windows.windows(2) {
        assert!(pair[0].0 < pair[1].0, "out of order: {windows:?}");
    }
}
