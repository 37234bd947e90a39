//! `hearth run` end to end without a backend: the local store, shutdown,
//! configuration, metrics and the overhead governor. Loads the real kernel
//! programs (root, BPF).

use std::path::Path;
use std::time::Duration;

use hearth_integration_tests::daemon::{http_get, Daemon, NO_GOVERNOR};
use hearth_integration_tests::*;

fn stored_windows(store: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(store)
        .expect("reading the store")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .collect();
    files.sort();
    files
}

/// With no endpoint, windows land in the store; SIGTERM drains the last
/// partial window; `hearth flamegraph --store` renders the fixture's stacks.
#[test]
fn run_fills_the_store_and_flamegraph_renders_it() {
    let dir = scratch_dir("daemon-store");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["120"]);
    let store = dir.join("store");
    let cpu_before = fixture.cpu_time();
    let mut daemon = Daemon::start(
        &dir,
        &[
            &[
                "--store",
                store.to_str().unwrap(),
                "--interval",
                "1s",
                "-F",
                "99",
            ][..],
            NO_GOVERNOR,
        ]
        .concat(),
        &[],
    );
    daemon.wait_ready(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(2500));
    let signalled = std::time::SystemTime::now();
    let stopped = daemon.stop();
    let cpu_used = fixture.cpu_time() - cpu_before;
    assert!(
        stopped.status.success(),
        "{:?}\n{}",
        stopped.status,
        stopped.log
    );
    assert!(stopped.log.contains("programs detached"), "{}", stopped.log);

    let windows = stored_windows(&store);
    assert!(windows.len() >= 3, "{} windows stored", windows.len());
    for w in &windows {
        let p = read_pprof(w);
        assert_eq!(p.meta.frequency_hz, 99, "{}", w.display());
    }
    // Shutdown flush: the last partial window, drained after the signal,
    // was stored.
    let last = read_pprof(windows.last().unwrap());
    assert!(
        last.meta.start + last.meta.duration >= signalled,
        "the last stored window ends before SIGTERM was sent"
    );

    let pid = fixture.pid().to_string();
    let folded = dir.join("fixture.folded");
    let svg = dir.join("fixture.svg");
    let out = hearth(&[
        "flamegraph",
        "--store",
        store.to_str().unwrap(),
        "--pid",
        &pid,
        "-o",
        folded.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert_exit(&out, 0);
    let profile = read_folded(&folded);
    let total = profile.total_count();
    // Every sample the fixture earned while the daemon ran, including the
    // last partial window drained at SIGTERM: the daemon ran for a part of
    // the fixture's CPU time (start-up takes a moment), never more.
    let expected = 99.0 * cpu_used.as_secs_f64();
    eprintln!("{total} samples stored, at most {expected:.0} possible");
    assert!(
        total as f64 <= expected * 1.05 && total as f64 >= expected * 0.6,
        "{total} samples vs {expected:.0} expected from the fixture's CPU time"
    );
    let mut leaf = [0u64; 3];
    for s in &profile.samples {
        let names: Vec<&str> = profile.stack_names(s).collect();
        for (i, l) in ["leaf_a", "leaf_b", "leaf_c"].iter().enumerate() {
            if contains_in_order(&names, &["main", "run", "dispatch", l]) {
                leaf[i] += s.count;
            }
        }
    }
    let share = |n: u64| 100.0 * n as f64 / total as f64;
    eprintln!(
        "leaf shares {:.1} {:.1} {:.1}",
        share(leaf[0]),
        share(leaf[1]),
        share(leaf[2])
    );
    assert!((share(leaf[0]) - 60.0).abs() < 10.0, "{leaf:?} of {total}");
    assert!((share(leaf[1]) - 30.0).abs() < 10.0, "{leaf:?} of {total}");
    assert!(leaf.iter().sum::<u64>() as f64 >= 0.95 * total as f64);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg") && svg_text.contains("leaf_a"));
}

/// Metrics, health and readiness are served while running.
#[test]
fn run_serves_metrics() {
    let dir = scratch_dir("daemon-metrics");
    let store = dir.join("store");
    let mut daemon = Daemon::start(
        &dir,
        &[
            &["--store", store.to_str().unwrap(), "--interval", "1s"][..],
            NO_GOVERNOR,
        ]
        .concat(),
        &[],
    );
    daemon.wait_ready(Duration::from_secs(20));
    assert_eq!(http_get(daemon.metrics_addr, "/healthz").unwrap().0, 200);
    let (status, body) = http_get(daemon.metrics_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "hearth_sampling_frequency_hz",
        "hearth_process_cpu_seconds_total",
        "hearth_process_resident_memory_bytes",
        "hearth_bpf_events_total",
        "hearth_symbol_cache_hits_total",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert_eq!(daemon.metric("hearth_sampling_frequency_hz"), Some(19.0));
    daemon.wait_metric(
        "hearth_windows_collected_total",
        Duration::from_secs(10),
        |v| v >= 2.0,
    );
    let rss = daemon
        .metric("hearth_process_resident_memory_bytes")
        .unwrap();
    assert!(rss > 1e6 && rss < 200e6, "RSS {rss}");
    assert_eq!(http_get(daemon.metrics_addr, "/nope").unwrap().0, 404);
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
}

/// Flags beat the file, the file beats `HEARTH_*`; `--print-config` shows
/// the result and exits without sampling.
#[test]
fn print_config_shows_the_merged_configuration() {
    let dir = scratch_dir("daemon-config");
    let file = dir.join("hearth.toml");
    std::fs::write(
        &file,
        "frequency = 50\ninterval = \"20s\"\nmax-cpu-percent = 2.5\n",
    )
    .unwrap();
    let out = std::process::Command::new(hearth_bin())
        .args([
            "run",
            "--print-config",
            "--config",
            file.to_str().unwrap(),
            "-F",
            "29",
        ])
        .env("HEARTH_INTERVAL", "3s")
        .env("HEARTH_MIN_FREQUENCY", "4")
        .env("HEARTH_OTLP_ENDPOINT", "https://collector.example:4317")
        .env("HEARTH_OTLP_HEADERS", "authorization=Bearer s3cret")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("frequency = 29"), "{printed}");
    assert!(printed.contains("interval = \"20s\""), "{printed}");
    assert!(printed.contains("min-frequency = 4"), "{printed}");
    assert!(printed.contains("max-cpu-percent = 2.5"), "{printed}");
    assert!(
        printed.contains("https://collector.example:4317"),
        "{printed}"
    );
    assert!(
        !printed.contains("s3cret"),
        "secrets must be redacted:\n{printed}"
    );
}

/// Mistakes are reported at start-up with the offending key or path, before
/// any sampling.
#[test]
fn bad_configuration_fails_at_start() {
    let dir = scratch_dir("daemon-badconfig");
    let file = dir.join("typo.toml");
    std::fs::write(&file, "frequncy = 19\n").unwrap();
    let out = hearth(&["run", "--config", file.to_str().unwrap()]);
    assert_exit(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("frequncy") && err.contains("typo.toml"),
        "{err}"
    );

    let out = hearth(&["run", "--otlp-endpoint", "collector:4317"]);
    assert_exit(&out, 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("otlp-endpoint"));

    let out = hearth(&["run", "--interval", "0s"]);
    assert_exit(&out, 2);

    // TLS material is read and checked before sampling.
    let missing_ca = dir.join("missing-ca.pem");
    let out = hearth(&[
        "run",
        "--otlp-endpoint",
        "https://127.0.0.1:4317",
        "--otlp-ca",
        missing_ca.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    assert_exit(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing-ca.pem") && !err.contains("sampling every process"),
        "{err}"
    );

    // A store that cannot be created: a path under a regular file.
    let blocker = dir.join("file");
    std::fs::write(&blocker, "").unwrap();
    let bad_store = blocker.join("store");
    let out = hearth(&[
        "run",
        "--store",
        bad_store.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    assert_exit(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(bad_store.to_str().unwrap()), "{err}");
}

/// Under host load above the threshold the governor lowers the frequency
/// step by step to the floor, and restores it once the load is gone; the
/// stored windows carry the frequency each was sampled at.
#[test]
fn governor_lowers_and_restores_the_frequency() {
    let dir = scratch_dir("daemon-governor");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let store = dir.join("store");
    let mut daemon = Daemon::start(
        &dir,
        &[
            "--store",
            store.to_str().unwrap(),
            "--interval",
            "1s",
            "-F",
            "99",
            "--min-frequency",
            "12",
            "--max-cpu-percent",
            "100",
            "--max-host-load-percent",
            "60",
        ],
        &[],
    );
    daemon.wait_ready(Duration::from_secs(20));
    // Both CPUs busy: host load ~100% > 60%.
    let load: Vec<Fixture> = (0..2).map(|_| Fixture::spawn(&exe, &["120"])).collect();
    let lowered = daemon.wait_metric(
        "hearth_sampling_frequency_hz",
        Duration::from_secs(20),
        |hz| hz <= 12.0,
    );
    assert_eq!(lowered, 12.0, "never below the floor");
    drop(load);
    daemon.wait_metric(
        "hearth_sampling_frequency_hz",
        Duration::from_secs(60),
        |hz| hz == 99.0,
    );
    let changes = daemon.metric("hearth_frequency_changes_total").unwrap();
    assert!(
        changes >= 4.0,
        "{changes} changes: down to the floor in steps and back"
    );
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        stopped.log.contains("lowered the sampling frequency"),
        "{}",
        stopped.log
    );
    assert!(
        stopped.log.contains("raised the sampling frequency"),
        "{}",
        stopped.log
    );

    let frequencies: std::collections::BTreeSet<u64> = stored_windows(&store)
        .iter()
        .map(|w| read_pprof(w).meta.frequency_hz)
        .collect();
    assert!(
        frequencies.contains(&99) && frequencies.contains(&12),
        "windows at {frequencies:?}"
    );
}
