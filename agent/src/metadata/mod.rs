//! Process metadata at the source: the OpenTelemetry resource attributes
//! of each profiled process, read once per process (the process table
//! keys processes by pid and start time) and shared by all its samples.
//!
//! | attributes | from |
//! |---|---|
//! | `process.parent_pid`, `process.executable.build_id.gnu`, `process.command_line` (`--command-line` only) | `/proc/<pid>/stat`, the ELF notes of `/proc/<pid>/exe`, `/proc/<pid>/cmdline` |
//! | `container.id`, `container.runtime`, `k8s.pod.uid`, `hearth.systemd.unit` | `/proc/<pid>/cgroup` ([`container`]) |
//! | `k8s.*`, `container.image.name` | the pod watch ([`kubernetes`]) |
//! | `service.name`, `service.version`, `deployment.*` | [`service`]: the environment, then the pod, then the executable |
//! | tags (`--tag key=value`) | configuration |
//!
//! Precedence, first wins: what hearth derives itself (process, container,
//! Kubernetes) cannot be overridden; `service.name` comes from
//! `OTEL_SERVICE_NAME`, then `service.name` in `OTEL_RESOURCE_ATTRIBUTES`,
//! the pod's `resource.opentelemetry.io/service.name` annotation, its
//! `app.kubernetes.io/name` label, its workload (Deployment, ReplicaSet,
//! StatefulSet, DaemonSet, CronJob, Job), the pod's name, the container's
//! name, a `service.name` tag, and last the executable's name;
//! `service.version` from the environment, the annotation, the
//! `app.kubernetes.io/version` label, the container image's tag, a tag;
//! other `service.*`/`deployment.*` keys (`deployment.environment.name`)
//! from the environment, the annotations, then tags. Tags fill in any key
//! nothing else set.
//!
//! The /proc part ([`FactsReader`]) runs where the process is first seen:
//! for an image exec'd while hearth runs, on the process-event thread at
//! its first sample ([`crate::incarnation::Capture::facts`]), so a process
//! gone before the drain keeps its parent, container and service
//! attributes; for the others, at the drain. The composing part
//! ([`MetadataResolver::compose`], with the pod lookup) always runs at the
//! drain.
//!
//! A process in a container whose pod is not known (yet: the API is
//! unreachable, or the watch has not listed the pod), or whose pod is
//! known but does not list its container id yet (a container starting, a
//! pod's sandbox), is looked up again each time the pod index changes,
//! until its container is found; a process tagged with its container
//! keeps its tags while it lives.
//!
//! Hook for filtering: [`PodIndex::lookup`] answers "which pod is this
//! container id (or pod UID) in", and a resolved [`ProcessMetadata`] holds
//! every attribute by key, so a filter can select on either.

pub mod container;
pub mod kubernetes;
pub mod service;

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::filter::PodVerdict;
use crate::profile::{AttrValue, ProcessMetadata};
pub use container::CgroupInfo;
pub use kubernetes::{KubernetesConfig, PodIndex, PodMatch};
use service::ServiceEnv;

/// Resource attribute: the parent's pid (int).
pub const PROCESS_PARENT_PID: &str = "process.parent_pid";
/// Resource attribute: GNU build ID of the main executable (hex).
pub const PROCESS_BUILD_ID: &str = "process.executable.build_id.gnu";
/// Resource attribute: the command line, arguments joined by spaces.
pub const PROCESS_COMMAND_LINE: &str = "process.command_line";
pub const CONTAINER_ID: &str = "container.id";
pub const CONTAINER_RUNTIME: &str = "container.runtime";
pub const CONTAINER_IMAGE_NAME: &str = "container.image.name";
/// Resource attribute: the systemd service of a process in no container.
pub const SYSTEMD_UNIT: &str = "hearth.systemd.unit";
pub const K8S_NAMESPACE: &str = "k8s.namespace.name";
pub const K8S_POD_NAME: &str = "k8s.pod.name";
pub const K8S_POD_UID: &str = "k8s.pod.uid";
pub const K8S_CONTAINER_NAME: &str = "k8s.container.name";
pub const K8S_NODE_NAME: &str = "k8s.node.name";
pub const SERVICE_NAME: &str = "service.name";
pub const SERVICE_VERSION: &str = "service.version";

/// Longest command line kept (bytes); longer ones are cut.
const COMMAND_LINE_LIMIT: u64 = 4096;
/// Executables whose build ID is remembered; past it the cache restarts.
const BUILD_ID_CACHE_MAX: usize = 4096;

/// What the resolver adds beyond what it reads from /proc. Cheap to clone
/// and `Send`, so it can be handed to the collector thread.
#[derive(Debug, Clone, Default)]
pub struct MetadataOptions {
    /// Read `process.command_line` (off by default: command lines can hold
    /// secrets).
    pub command_line: bool,
    /// Host tags, lowest precedence.
    pub tags: Vec<(String, String)>,
    /// The pod index when Kubernetes metadata is on.
    pub pods: Option<PodIndex>,
}

/// Starts what `config` asks for (the pod watch, on the current tokio
/// runtime) and returns what the resolver needs.
pub fn start(
    config: &crate::config::MetadataConfig,
    pod_rules: &crate::filter::PodRules,
) -> Result<MetadataOptions, kubernetes::KubernetesError> {
    let pods = if config.kubernetes {
        let index = PodIndex::with_rules(pod_rules.clone());
        kubernetes::spawn_watch(
            &KubernetesConfig {
                api: config.kubernetes_api.clone(),
                node: crate::pipeline::hostname(),
                pod_labels: config.pod_labels.clone(),
            },
            index.clone(),
        )?;
        Some(index)
    } else {
        None
    };
    Ok(MetadataOptions {
        command_line: config.command_line,
        tags: config.tags.clone(),
        pods,
    })
}

/// What is read of a process from /proc besides its name and executable:
/// the ids, cgroup and environment its attributes are composed from. Kept
/// so they can be composed again when its pod shows up, and taken while
/// the process lives (by [`FactsReader`], at its first sample) so a
/// process that is gone by the drain is still tagged.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    ppid: Option<u32>,
    build_id: Option<Arc<str>>,
    command_line: Option<Arc<str>>,
    cgroup: CgroupInfo,
    env: ServiceEnv,
    /// File name of the executable, else the process name.
    exe_name: Arc<str>,
}

impl Facts {
    /// Only what needs no /proc read: for a process already gone.
    fn named(name: &str, executable: Option<&str>) -> Facts {
        Facts {
            exe_name: exe_name(name, executable).into(),
            ..Facts::default()
        }
    }
}

/// Which of the optional facts are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// `/proc/<pid>/cmdline` (off by default: command lines can hold
    /// secrets).
    pub command_line: bool,
}

/// Reads the [`Facts`] of live processes: `/proc/<pid>/stat` (parent),
/// `/proc/<pid>/cgroup`, `/proc/<pid>/environ`, the ELF notes of
/// `/proc/<pid>/exe` (cached by device and inode), `/proc/<pid>/cmdline`
/// when asked. Used by the resolver at drain and by the process-event
/// thread at each image's first sample.
#[derive(Debug, Default)]
pub struct FactsReader {
    options: ReadOptions,
    /// Build IDs by (device, inode) of the executable.
    build_ids: HashMap<(u64, u64), Option<Arc<str>>>,
}

impl FactsReader {
    pub fn new(options: ReadOptions) -> FactsReader {
        FactsReader {
            options,
            build_ids: HashMap::new(),
        }
    }

    /// Reads what there is of `pid`; what cannot be read (the process
    /// exited meanwhile) is left out. `name` and `executable` are what
    /// the caller already read.
    pub fn read(&mut self, pid: u32, name: &str, executable: Option<&str>) -> Facts {
        Facts {
            ppid: parent_pid(pid),
            build_id: self.build_id(pid),
            command_line: self
                .options
                .command_line
                .then(|| command_line(pid))
                .flatten(),
            cgroup: container::read(pid).unwrap_or_default(),
            env: service::read_env(pid),
            exe_name: exe_name(name, executable).into(),
        }
    }

    fn build_id(&mut self, pid: u32) -> Option<Arc<str>> {
        let exe = format!("/proc/{pid}/exe");
        let stat = std::fs::metadata(&exe).ok()?;
        let key = (stat.dev(), stat.ino());
        if let Some(id) = self.build_ids.get(&key) {
            return id.clone();
        }
        let id = blazesym::helper::read_elf_build_id(std::path::Path::new(&exe))
            .ok()
            .flatten()
            .filter(|id| !id.is_empty())
            .map(|id| Arc::from(hex(&id)));
        if self.build_ids.len() >= BUILD_ID_CACHE_MAX {
            self.build_ids.clear();
        }
        self.build_ids.insert(key, id.clone());
        id
    }
}

/// The file name of the executable, else the process name.
fn exe_name<'a>(name: &'a str, executable: Option<&'a str>) -> &'a str {
    executable
        .and_then(|e| e.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .unwrap_or(name)
}

/// The metadata of one process, and whether it still waits for its pod.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub metadata: Arc<ProcessMetadata>,
    facts: Arc<Facts>,
    /// The pod index generation of the last failed pod lookup; `None`
    /// when no lookup is needed (found, not in a container, or no
    /// Kubernetes).
    waiting_since: Option<u64>,
    /// What the pod filter rules say about its pod (`Neither` when its
    /// pod is not known).
    pub pod_verdict: PodVerdict,
}

/// Reads and composes process metadata; owned by the process table.
#[derive(Debug, Default)]
pub struct MetadataResolver {
    options: MetadataOptions,
    reader: FactsReader,
}

impl MetadataOptions {
    /// What to read of each process.
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            command_line: self.command_line,
        }
    }
}

impl MetadataResolver {
    pub fn new(options: MetadataOptions) -> MetadataResolver {
        MetadataResolver {
            reader: FactsReader::new(options.read_options()),
            options,
        }
    }

    /// Reads everything about `pid` once. `name` and `executable` are what
    /// the process table already read.
    pub fn resolve(&mut self, pid: u32, name: &str, executable: Option<&str>) -> Resolved {
        let facts = self.reader.read(pid, name, executable);
        self.compose(Arc::new(facts))
    }

    /// What can be known of a process whose /proc entry is gone or now
    /// belongs to another process (a reused pid), and whose facts were
    /// not captured: no ids, cgroup or environment, never another
    /// process's.
    pub fn resolve_gone(&mut self, name: &str, executable: Option<&str>) -> Resolved {
        self.compose(Arc::new(Facts::named(name, executable)))
    }

    /// Looks the pod of a waiting process up again if the pod index
    /// changed since; true when the metadata changed.
    pub fn refresh(&mut self, resolved: &mut Resolved) -> bool {
        let (Some(since), Some(pods)) = (resolved.waiting_since, &self.options.pods) else {
            return false;
        };
        if pods.generation() == since {
            return false;
        }
        let again = self.compose(resolved.facts.clone());
        let changed = again.metadata != resolved.metadata;
        *resolved = again;
        changed
    }

    /// The attributes of a process from its facts (read now, or captured
    /// earlier while it lived), its pod and the tags.
    pub fn compose(&self, facts: Arc<Facts>) -> Resolved {
        let cgroup = &facts.cgroup;
        let in_pod = cgroup.container_id.is_some() || cgroup.pod_uid.is_some();
        let (pod, waiting_since) = match &self.options.pods {
            Some(pods) if in_pod => {
                // Read the generation first: a change after it makes the
                // next refresh look again.
                let generation = pods.generation();
                match pods.lookup(cgroup.container_id.as_deref(), cgroup.pod_uid.as_deref()) {
                    // The pod, but not (yet) the container: its status
                    // may not name the container id yet; keep looking.
                    Some(found) if found.container.is_none() && cgroup.container_id.is_some() => {
                        (Some(found), Some(generation))
                    }
                    Some(found) => (Some(found), None),
                    None => (None, Some(generation)),
                }
            }
            _ => (None, None),
        };
        let metadata = compose(&facts, pod.as_ref(), &self.options.tags);
        Resolved {
            metadata: Arc::new(metadata),
            facts,
            waiting_since,
            pod_verdict: pod.map_or(PodVerdict::Neither, |p| p.pod.verdict),
        }
    }
}

/// The attributes of a process from what was read and its pod.
fn compose(facts: &Facts, pod: Option<&PodMatch>, tags: &[(String, String)]) -> ProcessMetadata {
    let mut out: Vec<(Arc<str>, AttrValue)> = Vec::new();
    let mut put = |key: &str, value: &str| {
        if !value.is_empty() {
            out.push((Arc::from(key), AttrValue::Str(Arc::from(value))));
        }
    };
    if let Some(id) = &facts.build_id {
        put(PROCESS_BUILD_ID, id);
    }
    if let Some(cmd) = &facts.command_line {
        put(PROCESS_COMMAND_LINE, cmd);
    }
    let cgroup = &facts.cgroup;
    let container = pod.and_then(PodMatch::container);
    if let Some(id) = &cgroup.container_id {
        put(CONTAINER_ID, id);
    }
    if let Some(runtime) = cgroup.runtime.or(container.and_then(|c| c.runtime)) {
        put(CONTAINER_RUNTIME, runtime);
    }
    if let Some(unit) = &cgroup.systemd_unit {
        put(SYSTEMD_UNIT, unit);
    }
    if let Some(uid) = &cgroup.pod_uid {
        put(K8S_POD_UID, uid);
    }
    let image = container
        .and_then(|c| c.image.as_deref())
        .map(service::split_image);
    if let Some(m) = pod {
        let p = &m.pod;
        put(K8S_POD_UID, &p.uid);
        put(K8S_NAMESPACE, &p.namespace);
        put(K8S_POD_NAME, &p.name);
        if let Some(node) = &p.node {
            put(K8S_NODE_NAME, node);
        }
        if let Some(c) = container {
            put(K8S_CONTAINER_NAME, &c.name);
        }
        for (key, value) in &p.workload {
            put(key, value);
        }
        for (key, value) in &p.labels {
            put(key, value);
        }
        if let Some((name, _)) = image.filter(|(name, _)| !name.is_empty()) {
            put(CONTAINER_IMAGE_NAME, name);
        }
    }
    let env = service::env_map(&facts.env);
    let tag = |key: &str| tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let p = pod.map(|m| &*m.pod);
    let service_name = service::first([
        facts.env.service_name.as_deref(),
        env.get(SERVICE_NAME).copied(),
        p.and_then(|p| p.annotation(SERVICE_NAME)),
        p.and_then(|p| p.app_name.as_deref()),
        p.and_then(|p| p.workload_name()),
        p.map(|p| &*p.name),
        container.map(|c| &*c.name),
        tag(SERVICE_NAME),
        Some(&*facts.exe_name),
    ]);
    if let Some(name) = service_name {
        put(SERVICE_NAME, name);
    }
    let service_version = service::first([
        env.get(SERVICE_VERSION).copied(),
        p.and_then(|p| p.annotation(SERVICE_VERSION)),
        p.and_then(|p| p.app_version.as_deref()),
        image.and_then(|(_, tag)| tag),
        tag(SERVICE_VERSION),
    ]);
    if let Some(version) = service_version {
        put(SERVICE_VERSION, version);
    }
    for (key, value) in &facts.env.attributes {
        put(key, value);
    }
    for (key, value) in p.iter().flat_map(|p| &p.resource_annotations) {
        put(key, value);
    }
    for (key, value) in tags {
        put(key, value);
    }
    if let Some(ppid) = facts.ppid {
        out.push((Arc::from(PROCESS_PARENT_PID), AttrValue::Int(ppid.into())));
    }
    ProcessMetadata::new(out)
}

/// Field 4 of `/proc/<pid>/stat`.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// `/proc/<pid>/cmdline` with the arguments joined by spaces; `None` for
/// kernel threads (empty) and unreadable ones.
fn command_line(pid: u32) -> Option<Arc<str>> {
    let mut bytes = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|f| f.take(COMMAND_LINE_LIMIT).read_to_end(&mut bytes))
        .ok()?;
    let args: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| Arc::from(args.join(" ")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::kubernetes::{ContainerInfo, PodInfo};
    use super::*;

    pub(crate) const ID: &str = "3f8a9b2c1d0e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";

    /// Facts of a process in container [`ID`] of pod `uid-1`.
    pub(crate) fn facts(env: &[(&str, &str)], service_name: Option<&str>) -> Facts {
        Facts {
            ppid: Some(1),
            exe_name: "app-bin".into(),
            cgroup: CgroupInfo {
                container_id: Some(ID.into()),
                runtime: None,
                pod_uid: Some("uid-1".into()),
                systemd_unit: None,
            },
            env: ServiceEnv {
                service_name: service_name.map(String::from),
                attributes: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            ..Facts::default()
        }
    }

    fn pod() -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: "cart-abc-x".into(),
            uid: "uid-1".into(),
            node: Some("node-1".into()),
            workload: vec![("k8s.deployment.name", "cart-deploy".into())],
            labels: vec![("k8s.pod.label.team".into(), "payments".into())],
            app_name: Some("cart-label".into()),
            app_version: Some("1.0-label".into()),
            resource_annotations: vec![],
            containers: vec![ContainerInfo {
                name: "app".into(),
                id: Some(ID.into()),
                runtime: Some("containerd"),
                image: Some("registry.example:5000/cart:2.0-image".into()),
            }],
            verdict: PodVerdict::Neither,
        }
    }

    fn get(m: &ProcessMetadata, key: &str) -> Option<String> {
        m.get(key).map(|v| v.to_string())
    }

    fn matched(p: PodInfo) -> PodMatch {
        PodMatch {
            pod: Arc::new(p),
            container: Some(0),
        }
    }

    #[test]
    fn service_name_and_version_precedence() {
        let tags = vec![
            ("service.name".to_string(), "tag-name".to_string()),
            ("service.version".to_string(), "tag-version".to_string()),
            (
                "deployment.environment.name".to_string(),
                "tag-env".to_string(),
            ),
            ("region".to_string(), "eu-1".to_string()),
        ];
        let env_all = [
            ("service.name", "env-attrs"),
            ("service.version", "9.9"),
            ("deployment.environment.name", "staging"),
        ];
        // Everything known: the environment wins, OTEL_SERVICE_NAME first.
        let m = compose(
            &facts(&env_all, Some("otel-name")),
            Some(&matched(pod())),
            &tags,
        );
        assert_eq!(get(&m, "service.name").as_deref(), Some("otel-name"));
        assert_eq!(get(&m, "service.version").as_deref(), Some("9.9"));
        assert_eq!(
            get(&m, "deployment.environment.name").as_deref(),
            Some("staging")
        );
        assert_eq!(get(&m, "region").as_deref(), Some("eu-1"));
        let m = compose(&facts(&env_all, None), Some(&matched(pod())), &tags);
        assert_eq!(get(&m, "service.name").as_deref(), Some("env-attrs"));
        // No environment: annotations, then labels, then the workload...
        let mut annotated = pod();
        annotated.resource_annotations = vec![
            ("service.name".into(), "annotated".into()),
            ("deployment.environment.name".into(), "annotated-env".into()),
        ];
        let m = compose(&facts(&[], None), Some(&matched(annotated)), &tags);
        assert_eq!(get(&m, "service.name").as_deref(), Some("annotated"));
        assert_eq!(
            get(&m, "deployment.environment.name").as_deref(),
            Some("annotated-env")
        );
        let m = compose(&facts(&[], None), Some(&matched(pod())), &tags);
        assert_eq!(get(&m, "service.name").as_deref(), Some("cart-label"));
        assert_eq!(get(&m, "service.version").as_deref(), Some("1.0-label"));
        assert_eq!(
            get(&m, "deployment.environment.name").as_deref(),
            Some("tag-env")
        );
        let mut unlabelled = pod();
        unlabelled.app_name = None;
        unlabelled.app_version = None;
        let m = compose(&facts(&[], None), Some(&matched(unlabelled.clone())), &tags);
        assert_eq!(get(&m, "service.name").as_deref(), Some("cart-deploy"));
        assert_eq!(get(&m, "service.version").as_deref(), Some("2.0-image"));
        assert_eq!(
            get(&m, "container.image.name").as_deref(),
            Some("registry.example:5000/cart")
        );
        // A bare pod: its name.
        unlabelled.workload.clear();
        let m = compose(&facts(&[], None), Some(&matched(unlabelled)), &tags);
        assert_eq!(get(&m, "service.name").as_deref(), Some("cart-abc-x"));
        // No pod: the tag, then the executable.
        let m = compose(&facts(&[], None), None, &tags);
        assert_eq!(get(&m, "service.name").as_deref(), Some("tag-name"));
        assert_eq!(get(&m, "service.version").as_deref(), Some("tag-version"));
        let m = compose(&facts(&[], None), None, &[]);
        assert_eq!(get(&m, "service.name").as_deref(), Some("app-bin"));
        assert_eq!(get(&m, "service.version"), None);
    }

    #[test]
    fn derived_attributes_cannot_be_overridden() {
        let tags = vec![
            ("k8s.pod.name".to_string(), "tag".to_string()),
            ("container.id".to_string(), "tag".to_string()),
        ];
        let m = compose(&facts(&[], None), Some(&matched(pod())), &tags);
        assert_eq!(get(&m, "k8s.pod.name").as_deref(), Some("cart-abc-x"));
        assert_eq!(get(&m, "container.id").as_deref(), Some(ID));
        assert_eq!(get(&m, "k8s.namespace.name").as_deref(), Some("shop"));
        assert_eq!(get(&m, "k8s.pod.uid").as_deref(), Some("uid-1"));
        assert_eq!(get(&m, "k8s.container.name").as_deref(), Some("app"));
        assert_eq!(get(&m, "k8s.node.name").as_deref(), Some("node-1"));
        assert_eq!(
            get(&m, "k8s.deployment.name").as_deref(),
            Some("cart-deploy")
        );
        assert_eq!(get(&m, "k8s.pod.label.team").as_deref(), Some("payments"));
        assert_eq!(get(&m, "container.runtime").as_deref(), Some("containerd"));
        assert_eq!(m.get("process.parent_pid"), Some(&AttrValue::Int(1)));
    }

    #[test]
    fn waiting_processes_find_their_pod_later() {
        let pods = PodIndex::new();
        let mut resolver = MetadataResolver::new(MetadataOptions {
            pods: Some(pods.clone()),
            ..MetadataOptions::default()
        });
        let mut resolved = resolver.compose(Arc::new(facts(&[], None)));
        assert!(resolved.waiting_since.is_some());
        assert_eq!(
            get(&resolved.metadata, "k8s.pod.uid").as_deref(),
            Some("uid-1")
        );
        assert_eq!(get(&resolved.metadata, "k8s.pod.name"), None);
        // Nothing changed: no work.
        assert!(!resolver.refresh(&mut resolved));
        let pod = serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
            "spec": {"containers": [{"name": "app", "image": "x:1"}]},
            "status": {"containerStatuses": [{"name": "app", "containerID": format!("containerd://{ID}"),
                "image": "x:1", "imageID": "", "ready": true, "restartCount": 0}]}
        });
        pods.apply(
            kube::runtime::watcher::Event::Apply(serde_json::from_value(pod).unwrap()),
            &[],
        );
        assert!(resolver.refresh(&mut resolved));
        assert_eq!(
            get(&resolved.metadata, "k8s.pod.name").as_deref(),
            Some("p")
        );
        assert_eq!(
            get(&resolved.metadata, "k8s.container.name").as_deref(),
            Some("app")
        );
        assert!(resolved.waiting_since.is_none(), "found: sticky");
        assert!(!resolver.refresh(&mut resolved));
    }

    #[test]
    fn a_known_pod_without_the_container_yet_keeps_looking() {
        let pods = PodIndex::new();
        let mut resolver = MetadataResolver::new(MetadataOptions {
            pods: Some(pods.clone()),
            ..MetadataOptions::default()
        });
        let status = |id: Option<&str>| {
            let mut s = serde_json::json!({"name": "side", "image": "y:2", "imageID": "",
                "ready": true, "restartCount": 0});
            if let Some(id) = id {
                s["containerID"] = serde_json::Value::String(format!("containerd://{id}"));
            }
            let pod = serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
                "spec": {"containers": [{"name": "side", "image": "y:2"}]},
                "status": {"containerStatuses": [s]}
            });
            kube::runtime::watcher::Event::Apply(serde_json::from_value(pod).unwrap())
        };
        pods.apply(status(None), &[]);
        let mut starting = resolver.compose(Arc::new(facts(&[], None)));
        assert_eq!(
            get(&starting.metadata, "k8s.pod.name").as_deref(),
            Some("p")
        );
        assert_eq!(get(&starting.metadata, "k8s.container.name"), None);
        assert!(starting.waiting_since.is_some());
        pods.apply(status(Some(ID)), &[]);
        assert!(resolver.refresh(&mut starting));
        assert_eq!(
            get(&starting.metadata, "k8s.container.name").as_deref(),
            Some("side")
        );
        assert!(starting.waiting_since.is_none());
        // A process with no container id (the pod's own cgroup) is done
        // once its pod is found.
        let mut pod_level = resolver.compose(Arc::new(Facts {
            cgroup: CgroupInfo {
                pod_uid: Some("uid-1".into()),
                ..CgroupInfo::default()
            },
            ..facts(&[], None)
        }));
        assert!(pod_level.waiting_since.is_none());
        assert!(!resolver.refresh(&mut pod_level));
    }

    /// Waits until `pid`'s exec has set up its environment: a vfork
    /// parent (`Command::spawn`) resumes before the new image's stack is.
    pub(crate) fn wait_for_environ(pid: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| e.is_empty()) {
            assert!(std::time::Instant::now() < deadline, "no environment");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn facts_read_while_a_process_lives_outlast_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("OTEL_SERVICE_NAME", "short")
            .env("OTEL_RESOURCE_ATTRIBUTES", "service.version=3.2")
            .spawn()
            .unwrap();
        let pid = child.id();
        wait_for_environ(pid);
        let mut reader = FactsReader::new(ReadOptions { command_line: true });
        let started = std::time::Instant::now();
        let facts = reader.read(pid, "sleep", Some("/usr/bin/sleep"));
        eprintln!("facts of a live process read in {:?}", started.elapsed());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(crate::process::start_time(pid).is_none());
        let resolver = MetadataResolver::default();
        let m = resolver.compose(Arc::new(facts)).metadata;
        assert_eq!(m.get_str(SERVICE_NAME), Some("short"));
        assert_eq!(m.get_str(SERVICE_VERSION), Some("3.2"));
        assert_eq!(m.get_str(PROCESS_COMMAND_LINE), Some("sleep 30"));
        assert_eq!(
            m.get(PROCESS_PARENT_PID),
            Some(&AttrValue::Int(std::process::id().into()))
        );
        // Read now, the process is gone: nothing but the executable.
        let mut late = MetadataResolver::default();
        let m = late.resolve(pid, "sleep", Some("/usr/bin/sleep")).metadata;
        assert_eq!(m.get_str(SERVICE_NAME), Some("sleep"));
        assert!(m.get(PROCESS_PARENT_PID).is_none());
        // Without --command-line none is read.
        let mut plain = FactsReader::new(ReadOptions::default());
        let me = plain.read(std::process::id(), "me", None);
        assert!(me.command_line.is_none() && me.ppid.is_some());
    }

    #[test]
    fn resolves_this_process() {
        let mut resolver = MetadataResolver::new(MetadataOptions {
            command_line: true,
            ..MetadataOptions::default()
        });
        let exe = std::env::current_exe().unwrap();
        let r = resolver.resolve(std::process::id(), "me", exe.to_str());
        let m = &r.metadata;
        let ppid = std::os::unix::process::parent_id();
        assert_eq!(
            m.get(PROCESS_PARENT_PID),
            Some(&AttrValue::Int(ppid.into()))
        );
        let cmd = m.get_str(PROCESS_COMMAND_LINE).unwrap();
        assert!(
            cmd.contains(exe.file_name().unwrap().to_str().unwrap()),
            "{cmd}"
        );
        // Rust test binaries carry a GNU build ID.
        let id = m.get_str(PROCESS_BUILD_ID).unwrap();
        assert!(
            id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        // Without --command-line, no command line.
        let mut plain = MetadataResolver::default();
        let r = plain.resolve(std::process::id(), "me", exe.to_str());
        assert!(r.metadata.get(PROCESS_COMMAND_LINE).is_none());
        assert!(r.metadata.get(SERVICE_NAME).is_some());
        // Gone: nothing but the name.
        let r = plain.resolve(u32::MAX - 1, "gone", None);
        assert_eq!(r.metadata.get_str(SERVICE_NAME), Some("gone"));
        assert!(r.metadata.get(PROCESS_PARENT_PID).is_none());
    }
}
