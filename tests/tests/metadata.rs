//! Process metadata end to end (root, real BPF): container ids and pod
//! UIDs from real cgroups shaped like each runtime's, in the v2 and the v1
//! hierarchies; `service.*` from a process's `OTEL_*` environment and host
//! tags on the OTLP resource; Kubernetes attributes from a pod watch
//! against a fake API server, through a pod deletion and an API outage;
//! all of them on short-lived processes gone before the drain.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_integration_tests::cgroups::Cgroups;
use hearth_integration_tests::churn::{self, Churn};
use hearth_integration_tests::daemon::{self, Daemon};
use hearth_integration_tests::kube_api::FakeApi;
use hearth_integration_tests::otlp_check::{check_request, stacks};
use hearth_integration_tests::otlp_receiver::Receiver;
use hearth_integration_tests::*;

/// Container ids of the fixtures (any 64 hex digits: the cgroups are ours).
const ID_A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const ID_B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const ID_C: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";
const ID_D: &str = "d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4";
const ID_E: &str = "e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5";
const ID_F: &str = "f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6";
const UID_A: &str = "1f0e2d3c-4b5a-4697-8877-a6b5c4d3e2f1";
const UID_B: &str = "2a3b4c5d-6e7f-4081-9223-b4c5d6e7f809";
const UID_D: &str = "3c4d5e6f-7081-4293-a4b5-c6d7e8f90a1b";

/// A fixture that burns 20% of a core for `seconds`, with `env` added.
fn spawn_duty(exe: &Path, seconds: u32, env: &[(&str, &str)]) -> Fixture {
    let child = Command::new(exe)
        .args([seconds.to_string().as_str(), "20"])
        .envs(env.iter().copied())
        .spawn()
        .expect("starting duty_cycle");
    Fixture { child }
}

/// The fixture's cgroup file, for failure messages.
fn cgroup_file(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// Resource attributes of every sample of `pid` that arrived, in order.
fn resources_of(receiver: &Receiver, pid: u32) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    for (i, req) in receiver.requests().iter().enumerate() {
        if let Err(e) = check_request(req) {
            panic!("request {i} is invalid: {e}");
        }
        out.extend(
            stacks(req)
                .into_iter()
                .filter(|s| s.resource.get("process.pid") == Some(&pid.to_string()))
                .map(|s| s.resource),
        );
    }
    out
}

/// Waits until the latest resource of `pid` satisfies `check`; returns it.
fn wait_for_resource(
    receiver: &Receiver,
    daemon: &Daemon,
    pid: u32,
    what: &str,
    check: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    // Generous: after a long outage the pod watch retries up to 30 s
    // apart (kube-rs's default backoff); usually this takes a second.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(last) = resources_of(receiver, pid).pop() {
            if check(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: pid {pid}'s latest resource is {last:#?}\ncgroup:\n{}\nlog:\n{}",
                cgroup_file(pid),
                daemon.log()
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "{what}: nothing of pid {pid} arrived\nlog:\n{}",
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn underscored(uid: &str) -> String {
    uid.replace('-', "_")
}

/// A containerd container's cgroup under the kubelet's systemd driver.
fn containerd_systemd_path(uid: &str, id: &str) -> String {
    format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
        underscored(uid)
    )
}

/// A container's cgroup under the kubelet's cgroupfs driver.
fn cgroupfs_path(uid: &str, id: &str) -> String {
    format!("/kubepods/besteffort/pod{uid}/{id}")
}

/// A cgroup layout: (hierarchy, path, then what it should give: container
/// id, runtime, pod UID, systemd unit).
type Layout = (
    &'static str,
    String,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

/// Container ids, runtimes, pod UIDs and systemd units from real cgroups
/// of both hierarchies, on a recorded pprof (labels, as the store keeps
/// them).
#[test]
fn container_ids_from_real_cgroups_of_both_hierarchies() {
    let dir = scratch_dir("metadata-cgroups");
    let exe = build_c_fixture("duty_cycle", FRAME_POINTER_FLAGS, &dir);
    // Declared before the fixtures so it drops after they are killed.
    let mut cgroups = Cgroups::new("cgroups");
    // (hierarchy, path, container id, runtime, pod uid, systemd unit)
    let layouts: Vec<Layout> = vec![
        // v2, kubepods with the cgroupfs driver.
        ("unified", format!("/kubepods/burstable/pod{UID_A}/{ID_A}"), Some(ID_A), None, Some(UID_A), None),
        // v2, kubepods with the systemd driver and containerd.
        (
            "unified",
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID_B}.scope",
                underscored(UID_B)
            ),
            Some(ID_B),
            Some("containerd"),
            Some(UID_B),
            None,
        ),
        // v2, Docker with the systemd driver.
        ("unified", format!("/system.slice/docker-{ID_C}.scope"), Some(ID_C), Some("docker"), None, None),
        // v1 only (v2 at the root): Docker with cgroupfs, in the pids
        // controller; CRI-O under kubepods in the systemd hierarchy.
        ("pids", format!("/docker/{ID_D}"), Some(ID_D), Some("docker"), None, None),
        (
            "systemd",
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{ID_E}.scope",
                underscored(UID_D)
            ),
            Some(ID_E),
            Some("cri-o"),
            Some(UID_D),
            None,
        ),
        // A systemd service (v1 systemd hierarchy): no container.
        ("systemd", "/system.slice/hearth-fixture.service".into(), None, None, None, Some("hearth-fixture.service")),
        // The conmon monitor beside a container is not in it.
        ("unified", format!("/machine.slice/libpod-conmon-{ID_F}.scope"), None, None, None, None),
    ];
    let mut fixtures = Vec::new();
    for (hierarchy, path, ..) in &layouts {
        let cg = cgroups.create(hierarchy, path);
        let fixture = spawn_duty(&exe, 30, &[]);
        Cgroups::enter(&cg, fixture.pid());
        let shown = cgroup_file(fixture.pid());
        assert!(
            shown.contains(&Cgroups::path_of(&cg)),
            "{} not in\n{shown}",
            Cgroups::path_of(&cg)
        );
        fixtures.push(fixture);
    }
    let out = dir.join("profile.pb.gz");
    let mut args = vec![
        "record",
        "-d",
        "3s",
        "-F",
        "99",
        "-o",
        out.to_str().unwrap(),
    ];
    let pids: Vec<String> = fixtures.iter().map(|f| f.pid().to_string()).collect();
    for pid in &pids {
        args.extend(["--pid", pid]);
    }
    let output = hearth(&args);
    assert_exit(&output, 0);
    let profile = read_pprof(&out);
    for ((hierarchy, path, id, runtime, uid, unit), fixture) in layouts.iter().zip(&fixtures) {
        let pid = fixture.pid();
        let processes: Vec<_> = profile.processes.iter().filter(|p| p.pid == pid).collect();
        assert!(
            !processes.is_empty(),
            "no samples of pid {pid} ({hierarchy} {path})"
        );
        for p in processes {
            let m = &p.metadata;
            let what = format!("{hierarchy} {path}: {m:?}");
            assert_eq!(m.get_str("container.id"), *id, "{what}");
            assert_eq!(m.get_str("container.runtime"), *runtime, "{what}");
            assert_eq!(m.get_str("k8s.pod.uid"), *uid, "{what}");
            assert_eq!(m.get_str("hearth.systemd.unit"), *unit, "{what}");
            assert_eq!(m.get_str("service.name"), Some("duty_cycle"), "{what}");
            assert_eq!(
                m.get("process.parent_pid").map(ToString::to_string),
                Some(std::process::id().to_string()),
                "{what}"
            );
            let build_id = m.get_str("process.executable.build_id.gnu").unwrap_or("");
            assert!(
                build_id.len() >= 16 && build_id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{what}"
            );
            assert!(
                m.get("process.command_line").is_none(),
                "off by default: {what}"
            );
        }
    }
    drop(fixtures);
    drop(cgroups);
}

/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` of a process, host
/// tags and the command line (when asked for) on the OTLP resource.
#[test]
fn service_attributes_from_the_environment_reach_otlp() {
    let dir = scratch_dir("metadata-service");
    let exe = build_c_fixture("duty_cycle", FRAME_POINTER_FLAGS, &dir);
    let mut cgroups = Cgroups::new("service");
    let named = spawn_duty(
        &exe,
        40,
        &[
            ("OTEL_SERVICE_NAME", "checkout"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=ignored,service.version=2.1.0,\
                 deployment.environment.name=staging%20eu,service.namespace=shop,\
                 k8s.pod.name=spoofed,container.id=spoofed",
            ),
        ],
    );
    let attrs_only = spawn_duty(
        &exe,
        40,
        &[("OTEL_RESOURCE_ATTRIBUTES", "service.name=cart%2Cv2")],
    );
    let cg = cgroups.create("unified", &format!("/docker/{ID_A}"));
    Cgroups::enter(&cg, attrs_only.pid());
    let broken = spawn_duty(
        &exe,
        40,
        &[("OTEL_RESOURCE_ATTRIBUTES", "service.version=1,oops")],
    );
    let receiver = Receiver::start(None, None);
    let endpoint = receiver.endpoint();
    let spool = dir.join("spool");
    let args = daemon::otlp_args(
        &endpoint,
        &spool,
        &[
            "--tag",
            "region=eu-1",
            "--tag",
            "deployment.environment.name=tag-env",
            "--command-line",
            "--kubernetes=false",
        ],
    );
    let mut daemon = Daemon::start(&dir, &args, &[]);
    daemon.wait_ready(Duration::from_secs(20));
    let has_samples = |r: &HashMap<String, String>| r.contains_key("service.name");
    let a = wait_for_resource(&receiver, &daemon, named.pid(), "named", has_samples);
    let b = wait_for_resource(&receiver, &daemon, attrs_only.pid(), "attrs", has_samples);
    let c = wait_for_resource(&receiver, &daemon, broken.pid(), "broken", has_samples);
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);

    assert_eq!(a["service.name"], "checkout", "{a:#?}");
    assert_eq!(a["service.version"], "2.1.0");
    assert_eq!(a["service.namespace"], "shop");
    assert_eq!(a["deployment.environment.name"], "staging eu");
    assert_eq!(a["region"], "eu-1");
    assert_eq!(a["process.executable.name"], "duty_cycle");
    assert!(
        !a.contains_key("k8s.pod.name"),
        "not taken from a process: {a:#?}"
    );
    assert!(!a.contains_key("container.id"), "{a:#?}");
    assert_eq!(a["process.parent_pid"], std::process::id().to_string());
    assert!(
        a["process.command_line"].ends_with("duty_cycle 40 20"),
        "{a:#?}"
    );
    assert!(a["process.executable.build_id.gnu"].len() >= 16, "{a:#?}");

    assert_eq!(b["service.name"], "cart,v2", "{b:#?}");
    assert_eq!(b["container.id"], ID_A);
    assert_eq!(b["container.runtime"], "docker");
    assert_eq!(b["deployment.environment.name"], "tag-env");
    assert!(!b.contains_key("service.version"), "{b:#?}");

    // A malformed value is discarded whole.
    assert_eq!(c["service.name"], "duty_cycle", "{c:#?}");
    assert!(!c.contains_key("service.version"), "{c:#?}");
    assert_eq!(c["deployment.environment.name"], "tag-env");
    drop((named, attrs_only, broken));
    drop(cgroups);
}

/// Children living about 40 ms each, born in a containerd kubepods cgroup
/// with `OTEL_*` in their environment, recorded with one drain at the end
/// (a 7 s record with a 10 s drain interval, as the daemon drains): every
/// child is gone by the drain, and still tagged from what was read at its
/// first sample, its pod found through a fake API.
#[test]
fn short_lived_processes_keep_container_pod_and_service_attributes() {
    let dir = scratch_dir("metadata-short-lived");
    let mut cgroups = Cgroups::new("short-lived");
    let cg = cgroups.create("unified", &containerd_systemd_path(UID_A, ID_A));
    let node = format!("test-node-{}", std::process::id());
    let api = FakeApi::start(true);
    api.apply(&pod_from_fixture(
        "pod-cart.json",
        &node,
        UID_A,
        &[("${CONTAINER_ID}", ID_A), ("${SIDECAR_ID}", ID_C)],
    ));
    let pb = dir.join("p.pb.gz");
    let url = api.url();
    let args = [
        "record",
        "-d",
        "7s",
        "--drain-interval",
        "10s",
        "-F",
        "99",
        "--kubernetes-api",
        &url,
        "-o",
        pb.to_str().unwrap(),
    ];
    let (mut hearth, log) = start_hearth(&dir, &args, &[("NODE_NAME", &node)]);
    let churn = Churn {
        flags: FRAME_POINTER_FLAGS,
        seconds: 3,
        rate: 20,
        work_ms: 40,
        env: &[
            ("OTEL_SERVICE_NAME", "checkout-batch"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.version=3.1.4"),
        ],
        cgroup: Some(&cg),
        ..Churn::default()
    }
    .start(&dir);
    let parent = churn.id();
    let children = churn::children(churn);
    // Every child has exited and been reaped, and the record's only drain
    // (at its end) is still to come.
    assert!(
        hearth.try_wait().unwrap().is_none(),
        "hearth ended before the children did"
    );
    let status = hearth.wait().unwrap();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "hearth: {status}\n{log}");
    print_process_events(&log);
    let profile = read_pprof(&pb);
    let parent_pid = parent.to_string();
    let (mut total, mut tagged) = (0u64, 0u64);
    let mut wrong = Vec::new();
    for sample in &profile.samples {
        let process = profile.process(sample.process);
        if !children.contains_key(&process.pid) {
            continue;
        }
        let count = sample.count;
        let m = &process.metadata;
        total += count;
        let right = m.get_str("container.id") == Some(ID_A)
            && m.get_str("container.runtime") == Some("containerd")
            && m.get_str("k8s.pod.uid") == Some(UID_A)
            && m.get_str("k8s.pod.name") == Some("cart-7d9f8b6c5d-x2k4p")
            && m.get_str("k8s.namespace.name") == Some("shop")
            && m.get_str("k8s.container.name") == Some("app")
            && m.get_str("service.name") == Some("checkout-batch")
            && m.get_str("service.version") == Some("3.1.4")
            && m.get("process.parent_pid").map(ToString::to_string) == Some(parent_pid.clone());
        if right {
            tagged += count;
        } else if wrong.len() < 5 {
            wrong.push((process.pid, process.name.to_string(), count, m.clone()));
        }
    }
    eprintln!(
        "{} children, {total} samples, {tagged} with their container, pod and service; \
         others: {wrong:#?}",
        children.len()
    );
    // 60 children × 40 ms at 99 Hz: about 240 samples.
    assert!(total >= 100, "{total} samples of the children\n{log}");
    assert!(
        tagged as f64 >= 0.9 * total as f64,
        "{tagged} of {total} samples tagged\n{log}"
    );
    drop(cgroups);
}

/// A malformed tag is a configuration error (exit 2) naming it, for
/// `run` and `record` alike, before anything is loaded.
#[test]
fn malformed_tags_exit_2() {
    let out = hearth(&["run", "--tag", "region", "--metrics-addr", "off"]);
    assert_exit(&out, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tags") && stderr.contains("key=value"),
        "{stderr}"
    );
    let out = hearth(&[
        "run",
        "--tag",
        "a=1",
        "--tag",
        "a=2",
        "--metrics-addr",
        "off",
    ]);
    assert_exit(&out, 2);
    let out = hearth(&["record", "--tag", "=x", "-o", "/tmp/never.svg"]);
    assert_exit(&out, 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty key"));
}

fn pod_from_fixture(name: &str, node: &str, uid: &str, ids: &[(&str, &str)]) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/kubernetes")
        .join(name);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text.replace("${NODE}", node).replace("${UID}", uid);
    for (placeholder, id) in ids {
        text = text.replace(placeholder, id);
    }
    serde_json::from_str(&text).unwrap()
}

/// Kubernetes attributes from a watch on this node's pods, served by a
/// fake API server: the API starts down (profiles flow untagged, then get
/// tagged once it answers), a pod appears and its container starts
/// (MODIFIED fills in its id), a pod is deleted (new processes in its
/// container are no longer tagged, tagged ones keep their tags), and the
/// watch is cut and resumed.
#[test]
fn kubernetes_attributes_from_a_pod_watch() {
    let dir = scratch_dir("metadata-kubernetes");
    let exe = build_c_fixture("duty_cycle", FRAME_POINTER_FLAGS, &dir);
    let mut cgroups = Cgroups::new("kubernetes");
    let node = format!("test-node-{}", std::process::id());
    let cart_cg = cgroups.create("unified", &containerd_systemd_path(UID_A, ID_A));
    let agent_cg = cgroups.create("unified", &cgroupfs_path(UID_B, ID_B));
    let late_cg = cgroups.create("unified", &cgroupfs_path(UID_D, ID_D));
    let cart_pod = pod_from_fixture(
        "pod-cart.json",
        &node,
        UID_A,
        &[("${CONTAINER_ID}", ID_A), ("${SIDECAR_ID}", ID_C)],
    );
    let api = FakeApi::start(false);
    api.apply(&cart_pod);

    let cart = spawn_duty(&exe, 60, &[]);
    Cgroups::enter(&cart_cg, cart.pid());
    let receiver = Receiver::start(None, None);
    let endpoint = receiver.endpoint();
    let spool = dir.join("spool");
    let url = api.url();
    let args = daemon::otlp_args(
        &endpoint,
        &spool,
        &[
            "--kubernetes-api",
            &url,
            "--pod-label",
            "app.kubernetes.io/team",
        ],
    );
    let mut daemon = Daemon::start(&dir, &args, &[("NODE_NAME", &node)]);
    daemon.wait_ready(Duration::from_secs(20));

    // 1. The API answers 500: profiles flow, with the container id and pod
    // UID from the cgroup but nothing from the API.
    let untagged = wait_for_resource(&receiver, &daemon, cart.pid(), "API down", |r| {
        r.contains_key("container.id")
    });
    assert_eq!(untagged["container.id"], ID_A);
    assert_eq!(untagged["k8s.pod.uid"], UID_A);
    assert!(!untagged.contains_key("k8s.pod.name"), "{untagged:#?}");
    assert_eq!(untagged["service.name"], "duty_cycle");

    // 2. The API comes back: the same process gets its pod's attributes.
    api.set_up(true);
    let tagged = wait_for_resource(&receiver, &daemon, cart.pid(), "API back", |r| {
        r.contains_key("k8s.pod.name")
    });
    let want = [
        ("k8s.namespace.name", "shop"),
        ("k8s.pod.name", "cart-7d9f8b6c5d-x2k4p"),
        ("k8s.pod.uid", UID_A),
        ("k8s.container.name", "app"),
        ("k8s.node.name", &node),
        ("k8s.replicaset.name", "cart-7d9f8b6c5d"),
        ("k8s.deployment.name", "cart"),
        ("k8s.pod.label.app.kubernetes.io/team", "payments"),
        ("container.id", ID_A),
        ("container.runtime", "containerd"),
        ("container.image.name", "registry.example.com/shop/cart"),
        ("service.name", "cart"),
        ("service.version", "1.4.2"),
    ];
    for (key, value) in want {
        assert_eq!(
            tagged.get(key).map(String::as_str),
            Some(value),
            "{key}: {tagged:#?}"
        );
    }
    // Only this node's pods were asked for, by field selector.
    let requests = api.requests();
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    assert!(
        requests.iter().all(|r| r.contains(&selector)),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("watch=true")),
        "{requests:#?}"
    );

    // 3. A DaemonSet pod appears with its container still being created;
    // the container starts (MODIFIED with its id) and its process is
    // tagged.
    let mut agent_pod = pod_from_fixture("pod-node-agent.json", &node, UID_B, &[]);
    api.apply(&agent_pod);
    let agent = spawn_duty(&exe, 60, &[]);
    Cgroups::enter(&agent_cg, agent.pid());
    let before = wait_for_resource(&receiver, &daemon, agent.pid(), "agent pending", |r| {
        r.contains_key("k8s.pod.name")
    });
    // Found by pod UID already (no container id in the status yet).
    assert_eq!(
        before.get("k8s.pod.name").map(String::as_str),
        Some("node-agent-7xk2q")
    );
    assert!(!before.contains_key("k8s.container.name"), "{before:#?}");
    agent_pod["status"]["containerStatuses"][0]["containerID"] =
        serde_json::Value::String(format!("cri-o://{ID_B}"));
    agent_pod["status"]["containerStatuses"][0]["state"] =
        serde_json::json!({"running": {"startedAt": "2026-11-20T09:20:44Z"}});
    api.apply(&agent_pod);
    // The process seen before gets its container now...
    let upgraded = wait_for_resource(&receiver, &daemon, agent.pid(), "agent upgraded", |r| {
        r.contains_key("k8s.container.name")
    });
    assert_eq!(upgraded["k8s.container.name"], "agent");
    // ...and a new process in the running container is matched by its id.
    let agent2 = spawn_duty(&exe, 60, &[]);
    Cgroups::enter(&agent_cg, agent2.pid());
    let running = wait_for_resource(&receiver, &daemon, agent2.pid(), "agent running", |r| {
        r.contains_key("k8s.container.name")
    });
    assert_eq!(running["k8s.container.name"], "agent");
    assert_eq!(running["k8s.daemonset.name"], "node-agent");
    assert_eq!(running["k8s.namespace.name"], "monitoring");
    assert_eq!(running["service.name"], "node-agent");
    assert_eq!(running["service.version"], "v0.9.1", "image tag");
    assert_eq!(
        running["container.runtime"], "cri-o",
        "from the status's id"
    );
    assert!(!running.contains_key("k8s.pod.label.app.kubernetes.io/team"));

    // 4. The cart pod is deleted: a process started in its container
    // afterwards is not tagged; the one tagged before keeps its tags.
    api.delete(UID_A);
    std::thread::sleep(Duration::from_millis(1500));
    let late = spawn_duty(&exe, 60, &[]);
    Cgroups::enter(&cart_cg, late.pid());
    let after_delete = wait_for_resource(&receiver, &daemon, late.pid(), "after delete", |r| {
        r.contains_key("container.id")
    });
    assert_eq!(after_delete["container.id"], ID_A);
    assert!(
        !after_delete.contains_key("k8s.pod.name"),
        "{after_delete:#?}"
    );
    let still = resources_of(&receiver, cart.pid()).pop().unwrap();
    assert_eq!(still["k8s.pod.name"], "cart-7d9f8b6c5d-x2k4p", "{still:#?}");

    // 5. The API goes down again (the watch is cut); a pod appears
    // meanwhile. Its process flows untagged, then is tagged once the
    // watch resumes.
    api.set_up(false);
    let mut late_pod = pod_from_fixture(
        "pod-cart.json",
        &node,
        UID_D,
        &[("${CONTAINER_ID}", ID_D), ("${SIDECAR_ID}", ID_E)],
    );
    late_pod["metadata"]["name"] = serde_json::Value::String("cart-7d9f8b6c5d-q9w8e".into());
    api.apply(&late_pod);
    let resumed = spawn_duty(&exe, 60, &[]);
    Cgroups::enter(&late_cg, resumed.pid());
    let down = wait_for_resource(&receiver, &daemon, resumed.pid(), "down again", |r| {
        r.contains_key("container.id")
    });
    assert!(!down.contains_key("k8s.pod.name"), "{down:#?}");
    api.set_up(true);
    let up = wait_for_resource(&receiver, &daemon, resumed.pid(), "resumed", |r| {
        r.contains_key("k8s.pod.name")
    });
    assert_eq!(up["k8s.pod.name"], "cart-7d9f8b6c5d-q9w8e");
    assert_eq!(up["k8s.container.name"], "app");

    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        stopped.log.contains("Kubernetes pod watch failed"),
        "the outage is logged:\n{}",
        stopped.log
    );
    drop((cart, agent, agent2, late, resumed));
    drop(cgroups);
}

/// Samples of `pid` in a recorded profile.
fn sample_count(profile: &hearth::profile::Profile, pid: u32) -> u64 {
    samples_of_pid(profile, pid).iter().map(|s| s.count).sum()
}

/// Pods of the filter test: ids no other test's cgroups use, so only its
/// own cgroups can match its rules.
const FILTER_UID_CART: &str = "7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a0b";
const FILTER_ID_CART: &str = "7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a";
const FILTER_ID_SIDECAR: &str = "9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c";
const FILTER_UID_AGENT: &str = "8f9a0b1c-2d3e-4f5a-9b6c-7d8e9f0a1b2c";
const FILTER_ID_AGENT: &str = "8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b8b";

/// Pod filters: `--exclude-namespace` leaves a namespace's pods out and
/// `--include-pod-selector` samples only the pods a selector picks. The
/// pods come from a fake API server, their containers are real cgroups
/// (systemd and cgroupfs layouts), and a third process runs in no pod.
/// The kernel leaves the filtered processes out before any stack walk
/// (the filtered counter accounts for their CPU time).
#[test]
fn namespace_and_pod_selector_filters() {
    let dir = scratch_dir("metadata-pod-filter");
    let exe = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &dir);
    let mut cgroups = Cgroups::new("podfilter");
    let node = format!("filter-node-{}", std::process::id());
    let cart_cg = cgroups.create(
        "unified",
        &containerd_systemd_path(FILTER_UID_CART, FILTER_ID_CART),
    );
    let agent_cg = cgroups.create("unified", &cgroupfs_path(FILTER_UID_AGENT, FILTER_ID_AGENT));
    let api = FakeApi::start(true);
    api.apply(&pod_from_fixture(
        "pod-cart.json",
        &node,
        FILTER_UID_CART,
        &[
            ("${CONTAINER_ID}", FILTER_ID_CART),
            ("${SIDECAR_ID}", FILTER_ID_SIDECAR),
        ],
    ));
    let mut agent_pod = pod_from_fixture("pod-node-agent.json", &node, FILTER_UID_AGENT, &[]);
    agent_pod["status"]["containerStatuses"][0]["containerID"] =
        serde_json::Value::String(format!("cri-o://{FILTER_ID_AGENT}"));
    api.apply(&agent_pod);

    let cart = Fixture::spawn(&exe, &["30"]);
    Cgroups::enter(&cart_cg, cart.pid());
    let agent = Fixture::spawn(&exe, &["30"]);
    Cgroups::enter(&agent_cg, agent.pid());
    let outside = Fixture::spawn(&exe, &["30"]);
    let url = api.url();
    let record = |name: &str, rule: &[&str]| {
        let pb = dir.join(format!("{name}.pb.gz"));
        let mut args = vec![
            "record",
            "-d",
            "4s",
            "-F",
            "99",
            "--kubernetes-api",
            &url,
            "-o",
            pb.to_str().unwrap(),
        ];
        args.extend_from_slice(rule);
        let out = Command::new(hearth_bin())
            .args(&args)
            .env("HEARTH_LOG", "info")
            .env("NODE_NAME", &node)
            .output()
            .expect("running hearth");
        assert_exit(&out, 0);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (read_pprof(&pb), filtered_in_kernel(&stderr), stderr)
    };

    // 1. The monitoring namespace (the node agent's pod) is left out.
    let (profile, filtered, stderr) = record("exclude", &["--exclude-namespace", "monitoring"]);
    let (kept_cart, kept_outside) = (
        sample_count(&profile, cart.pid()),
        sample_count(&profile, outside.pid()),
    );
    assert_eq!(
        sample_count(&profile, agent.pid()),
        0,
        "the excluded namespace's process has samples\n{stderr}"
    );
    assert!(
        kept_cart > 20 && kept_outside > 20,
        "{kept_cart} cart, {kept_outside} outside samples\n{stderr}"
    );
    // The three share the CPUs alike: most of the agent's share is
    // counted as filtered in the kernel (the first moments, before the
    // pod list reached the kernel, are dropped at drain).
    assert!(
        filtered as f64 >= 0.5 * kept_cart as f64,
        "{filtered} filtered in the kernel, {kept_cart} cart samples\n{stderr}"
    );

    // 2. Only pods whose team label is payments (the cart pod).
    let (profile, filtered, stderr) = record(
        "include",
        &[
            "--include-pod-selector",
            "app.kubernetes.io/team in (payments,search),app.kubernetes.io/name",
        ],
    );
    let kept_cart = sample_count(&profile, cart.pid());
    assert!(kept_cart > 20, "{kept_cart} cart samples\n{stderr}");
    let sampled_pids: std::collections::BTreeSet<u32> = profile
        .samples
        .iter()
        .map(|s| profile.process(s.process).pid)
        .collect();
    assert_eq!(
        kept_cart,
        profile.total_count(),
        "only the selected pod's process ({}) is sampled, not {sampled_pids:?}\n{stderr}",
        cart.pid()
    );
    assert!(
        filtered as f64 >= kept_cart as f64,
        "{filtered} filtered in the kernel (agent and outside), {kept_cart} cart samples\n{stderr}"
    );

    // 3. Pod rules without Kubernetes metadata, and bad rules, are usage
    // errors.
    let out_path = dir.join("never.folded");
    for (rule, says) in [
        (
            vec!["--include-namespace", "shop"],
            "needs Kubernetes metadata",
        ),
        (
            vec![
                "--kubernetes-api",
                &url,
                "--exclude-namespace",
                "Not_A_Namespace",
            ],
            "not a Kubernetes namespace name",
        ),
        (
            vec![
                "--kubernetes-api",
                &url,
                "--include-pod-selector",
                "app in (web",
            ],
            "--include-pod-selector",
        ),
    ] {
        let mut args = vec!["record", "-d", "1s", "-o", out_path.to_str().unwrap()];
        args.extend(rule.iter());
        let out = hearth(&args);
        assert_exit(&out, 2);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{rule:?}: {stderr}");
    }
    drop((cart, agent, outside));
    drop(cgroups);
}
