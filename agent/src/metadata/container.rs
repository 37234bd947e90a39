//! Which container (and Kubernetes pod, or systemd unit) a process runs
//! in, from its cgroup paths (`/proc/<pid>/cgroup`).
//!
//! Every container runtime puts a container's processes into a cgroup
//! named after the container's id; the name's shape says which runtime:
//!
//! | runtime, cgroup driver | path (last components) |
//! |---|---|
//! | Docker, cgroupfs | `/docker/<id>` |
//! | Docker, systemd | `/system.slice/docker-<id>.scope` |
//! | Kubernetes, cgroupfs (containerd, CRI-O, dockershim) | `/kubepods/burstable/pod<uid>/<id>` |
//! | Kubernetes, systemd, containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | Kubernetes, systemd, CRI-O | `…/kubepods-besteffort-pod<uid_>.slice/crio-<id>.scope` |
//! | containerd nested in a container (kind) | `/system.slice/containerd.service/kubepods-burstable-pod<uid_>.slice:cri-containerd:<id>` |
//! | Podman | `/machine.slice/libpod-<id>.scope[/container]`, `/libpod_parent/libpod-<id>` |
//!
//! (`<id>` is 64 lower-case hex digits; `<uid_>` a pod UID with `_` for
//! `-`.) The deepest component that names a container wins, so nested
//! runtimes (Docker in Docker, systemd in a Podman container) give the
//! innermost container. A bare 64-hex component counts only under
//! `docker` or a kubepods `pod<uid>` directory; monitor processes
//! (`crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`) are not in the
//! container. Anything else gives no container id: a wrong id would be
//! worse than none.
//!
//! With cgroup v1 a process has one line per hierarchy, and on hybrid
//! hosts (v1 controllers plus v2 at `/sys/fs/cgroup/unified`) also a v2
//! line `0::/path`; they usually agree. The v2 line is read first, then
//! `name=systemd`, then the controllers in file order; the first line that
//! names a container decides. Paths relative to a cgroup namespace
//! (`/../../kubepods/…`) are read the same way.

/// What the cgroup paths of a process say about where it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The container's id (64 hex digits).
    pub container_id: Option<String>,
    /// `docker`, `containerd`, `cri-o` or `podman` (OpenTelemetry's
    /// `container.runtime`), when the path tells.
    pub runtime: Option<&'static str>,
    /// The Kubernetes pod's UID (with dashes), from a kubepods path.
    pub pod_uid: Option<String>,
    /// The systemd service of a process in no container
    /// (`system.slice/nginx.service` → `nginx.service`).
    pub systemd_unit: Option<String>,
}

/// Reads the cgroup file of `pid`; `None` when the process is gone or the
/// file cannot be read.
pub fn read(pid: u32) -> Option<CgroupInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    Some(parse_cgroup_file(&text))
}

/// Parses the text of a `/proc/<pid>/cgroup` file.
pub fn parse_cgroup_file(text: &str) -> CgroupInfo {
    // (priority, path): v2 first, then the systemd hierarchy, then the
    // controllers in file order.
    let mut paths: Vec<(u8, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let id = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || !path.starts_with('/') {
                return None;
            }
            let priority = match controllers {
                "" => 0,
                "name=systemd" => 1,
                _ => 2,
            };
            Some((priority, path))
        })
        .collect();
    paths.sort_by_key(|&(priority, _)| priority);
    let parsed: Vec<(u8, CgroupInfo)> = paths
        .iter()
        .map(|&(priority, path)| (priority, parse_cgroup_path(path)))
        .collect();
    if let Some((_, info)) = parsed.iter().find(|(_, i)| i.container_id.is_some()) {
        return info.clone();
    }
    CgroupInfo {
        container_id: None,
        runtime: None,
        pod_uid: parsed.iter().find_map(|(_, i)| i.pod_uid.clone()),
        // Controllers other than systemd's may be grouped differently.
        systemd_unit: parsed
            .iter()
            .filter(|(priority, _)| *priority < 2)
            .find_map(|(_, i)| i.systemd_unit.clone()),
    }
}

/// Parses one cgroup path.
pub fn parse_cgroup_path(path: &str) -> CgroupInfo {
    let components: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    let in_kubepods = components
        .iter()
        .any(|c| *c == "kubepods" || c.starts_with("kubepods.") || c.starts_with("kubepods-"));
    let mut info = CgroupInfo::default();
    for (i, component) in components.iter().enumerate().rev() {
        if info.container_id.is_none() {
            let parent = i.checked_sub(1).map(|p| components[p]);
            if let Some((id, runtime)) = container_of(component, parent, in_kubepods) {
                info.container_id = Some(id.to_string());
                info.runtime = runtime;
            }
        }
        if info.pod_uid.is_none() && in_kubepods {
            info.pod_uid = pod_uid_of(component);
        }
    }
    if info.container_id.is_none() {
        info.systemd_unit = components
            .last()
            .filter(|c| c.len() > ".service".len() && c.ends_with(".service"))
            .map(|c| c.to_string());
    }
    info
}

/// The container id a path component names, and the runtime it tells.
fn container_of<'a>(
    component: &'a str,
    parent: Option<&str>,
    in_kubepods: bool,
) -> Option<(&'a str, Option<&'static str>)> {
    // `<slice>:<prefix>:<id>`: containerd's systemd driver when nested.
    if let Some((_, rest)) = component.split_once(':') {
        let (prefix, id) = rest.split_once(':')?;
        let runtime = match prefix {
            "cri-containerd" => "containerd",
            "crio" => "cri-o",
            "docker" => "docker",
            _ => return None,
        };
        return is_container_id(id).then_some((id, Some(runtime)));
    }
    if let Some(unit) = component.strip_suffix(".scope") {
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = unit.strip_prefix(prefix) {
                // `crio-conmon-<id>`, `libpod-conmon-<id>`: the monitor,
                // outside the container; not 64 hex digits, so refused.
                return is_container_id(id).then_some((id, Some(runtime)));
            }
        }
        return None;
    }
    if let Some(id) = component.strip_prefix("libpod-") {
        return is_container_id(id).then_some((id, Some("podman")));
    }
    if is_container_id(component) {
        return match parent {
            Some("docker") => Some((component, Some("docker"))),
            // The runtime behind the cgroupfs driver is not in the path.
            Some(p) if in_kubepods && pod_uid_of(p).is_some() => Some((component, None)),
            _ => None,
        };
    }
    None
}

/// The pod UID of a kubepods component: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_>.slice` (systemd, `_` for `-`).
fn pod_uid_of(component: &str) -> Option<String> {
    let raw = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => component
            .strip_prefix("pod")
            // kind: `kubepods-…-pod<uid_>.slice:cri-containerd:<id>`.
            .or_else(|| {
                component
                    .split_once(':')
                    .and_then(|(slice, _)| slice.strip_suffix(".slice"))
                    .and_then(|slice| slice.rsplit_once("-pod"))
                    .map(|(_, uid)| uid)
            })?,
    };
    let uid = raw.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// 64 lower-case hex digits, as Docker, containerd, CRI-O and Podman name
/// containers.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A UUID in its 8-4-4-4-12 form.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f8a9b2c1d0e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "9d1f4c2e-7a3b-4e5f-8a6b-1c2d3e4f5a6b";
    const UID_: &str = "9d1f4c2e_7a3b_4e5f_8a6b_1c2d3e4f5a6b";

    /// (path, container id, runtime, pod uid present, systemd unit)
    type Case = (
        String,
        Option<&'static str>,
        Option<&'static str>,
        bool,
        Option<&'static str>,
    );

    fn cases() -> Vec<Case> {
        let s = |t: &str| {
            t.replace("{ID}", ID)
                .replace("{ID2}", ID2)
                .replace("{UID}", UID)
                .replace("{UID_}", UID_)
        };
        vec![
            // Docker, cgroupfs driver (v1 and v2).
            (s("/docker/{ID}"), Some(ID), Some("docker"), false, None),
            // Docker, systemd driver.
            (s("/system.slice/docker-{ID}.scope"), Some(ID), Some("docker"), false, None),
            (s("/system.slice/docker-{ID}.scope/init.scope"), Some(ID), Some("docker"), false, None),
            // Docker in Docker: the inner container.
            (s("/docker/{ID2}/docker/{ID}"), Some(ID), Some("docker"), false, None),
            // Kubernetes, cgroupfs: runtime unknown from the path.
            (s("/kubepods/burstable/pod{UID}/{ID}"), Some(ID), None, true, None),
            (s("/kubepods/besteffort/pod{UID}/{ID}"), Some(ID), None, true, None),
            (s("/kubepods/pod{UID}/{ID}"), Some(ID), None, true, None),
            // The pod's own cgroup: the pod, no container.
            (s("/kubepods/burstable/pod{UID}"), None, None, true, None),
            // Kubernetes, systemd driver, containerd and CRI-O.
            (s("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"), Some(ID), Some("containerd"), true, None),
            (s("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"), Some(ID), Some("cri-o"), true, None),
            (s("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"), Some(ID), Some("containerd"), true, None),
            (s("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"), None, None, true, None),
            // kind: containerd nested under a systemd service.
            (s("/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}"), Some(ID), Some("containerd"), true, None),
            // Inside a cgroup namespace.
            (s("/../../kubepods/burstable/pod{UID}/{ID}"), Some(ID), None, true, None),
            // Podman: systemd (root and rootless) and cgroupfs.
            (s("/machine.slice/libpod-{ID}.scope"), Some(ID), Some("podman"), false, None),
            (s("/machine.slice/libpod-{ID}.scope/container"), Some(ID), Some("podman"), false, None),
            (s("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"), Some(ID), Some("podman"), false, None),
            (s("/libpod_parent/libpod-{ID}"), Some(ID), Some("podman"), false, None),
            (s("/machine.slice/libpod-conmon-{ID}.scope"), None, None, false, None),
            // systemd inside a Podman container: still the container.
            (s("/machine.slice/libpod-{ID}.scope/container/system.slice/foo.service"), Some(ID), Some("podman"), false, None),
            // systemd services: no container.
            ("/system.slice/nginx.service".into(), None, None, false, Some("nginx.service")),
            ("/system.slice/containerd.service".into(), None, None, false, Some("containerd.service")),
            ("/user.slice/user-1000.slice/session-3.scope".into(), None, None, false, None),
            ("/".into(), None, None, false, None),
            ("/init.scope".into(), None, None, false, None),
            (".service".into(), None, None, false, None),
            // Unknown layouts: no id, never a wrong one.
            (s("/ecs/8c3e4a9f1b2d4e6f8a0b1c2d3e4f5a6b/{ID}"), None, None, false, None),
            (s("/{ID}"), None, None, false, None),
            ("/process_api/806bba0143f5994d8e83298e84a80d38".into(), None, None, false, None),
            // Almost ids: too short, upper case, not hex.
            (s("/docker/{ID}").replace(&ID[60..], ""), None, None, false, None),
            (s("/docker/{ID}").to_uppercase(), None, None, false, None),
            (s("/system.slice/docker-{ID}.scope").replace('3', "g"), None, None, false, None),
            // pod<uid> outside kubepods, or with a malformed uid.
            (s("/pods/pod{UID}/{ID}"), None, None, false, None),
            (s("/kubepods/burstable/pod{UID}x/{ID}"), None, None, false, None),
        ]
    }

    #[test]
    fn paths_of_every_runtime() {
        for (path, id, runtime, has_pod, unit) in cases() {
            let info = parse_cgroup_path(&path);
            assert_eq!(info.container_id.as_deref(), id, "{path}");
            assert_eq!(info.runtime, runtime, "{path}");
            assert_eq!(info.pod_uid.as_deref(), has_pod.then_some(UID), "{path}");
            assert_eq!(info.systemd_unit.as_deref(), unit, "{path}");
        }
    }

    #[test]
    fn cgroup_v2_files() {
        let info = parse_cgroup_file(&format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        ));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.pod_uid.as_deref(), Some(UID));
        let info = parse_cgroup_file("0::/system.slice/sshd.service\n");
        assert_eq!(info.systemd_unit.as_deref(), Some("sshd.service"));
        assert_eq!(info.container_id, None);
    }

    #[test]
    fn cgroup_v1_and_hybrid_files() {
        // Docker on cgroup v1: every controller says the same.
        let v1 = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n2:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n"
        );
        assert_eq!(parse_cgroup_file(&v1).container_id.as_deref(), Some(ID));
        // Hybrid, the container only in the v1 hierarchies (v2 at the root).
        let hybrid = format!("{v1}0::/\n");
        let info = parse_cgroup_file(&hybrid);
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.runtime, Some("docker"));
        // Hybrid, only the v2 line names it.
        let info = parse_cgroup_file(&format!(
            "9:name=systemd:/\n4:memory:/\n0::/kubepods/burstable/pod{UID}/{ID}\n"
        ));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.pod_uid.as_deref(), Some(UID));
        // Disagreement: v2 wins, then name=systemd, then the controllers.
        let info = parse_cgroup_file(&format!("4:memory:/docker/{ID2}\n0::/docker/{ID}\n"));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        let info = parse_cgroup_file(&format!(
            "4:memory:/docker/{ID2}\n1:name=systemd:/system.slice/docker-{ID}.scope\n0::/\n"
        ));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        // systemd units only from the v2 or systemd hierarchy.
        let info = parse_cgroup_file(
            "5:cpu:/system.slice/other.service\n1:name=systemd:/system.slice/cron.service\n0::/\n",
        );
        assert_eq!(info.systemd_unit.as_deref(), Some("cron.service"));
        let info = parse_cgroup_file("5:cpu:/system.slice/other.service\n0::/\n");
        assert_eq!(info.systemd_unit, None);
        // This sandbox's own layout: nothing.
        let info = parse_cgroup_file(
            "9:name=systemd:/\n4:memory:/process_api/806bba0143f5994d8e83298e84a80d38\n1:cpu:/\n0::/\n",
        );
        assert_eq!(info, CgroupInfo::default());
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let text = format!(
            "garbage\n\n::\nx:memory:/docker/{ID2}\n7:pids\n3:cpu:relative/docker/{ID2}\n\u{0}\u{1}:::\n0::/docker/{ID}\n"
        );
        assert_eq!(parse_cgroup_file(&text).container_id.as_deref(), Some(ID));
        assert_eq!(
            parse_cgroup_file("not a cgroup file"),
            CgroupInfo::default()
        );
        assert_eq!(parse_cgroup_file(""), CgroupInfo::default());
    }

    #[test]
    fn this_process_reads_without_error() {
        assert!(read(std::process::id()).is_some());
        assert!(read(u32::MAX - 1).is_none());
    }
}
