//! Kubernetes metadata: a watch on the pods of this node
//! (`spec.nodeName=<node>`, kube-rs's watcher with its default backoff)
//! kept as a small index from container id and pod UID to what profiles
//! are tagged with. Only pods get/list/watch is used (the chart's
//! ClusterRole grants nothing else), so the owning workload comes from
//! the pod's `ownerReferences`: a ReplicaSet's name minus the
//! `pod-template-hash` label is its Deployment; a Job named
//! `<name>-<8+ digits>` was made by the CronJob `<name>` (the name the
//! CronJob controller gives its Jobs).
//!
//! The index keeps extracted facts, never whole `Pod` objects. A pod
//! deleted from the API leaves the index at once: processes resolved
//! after that do not get its attributes, while processes already tagged
//! keep theirs (the process table holds them) until they exit. API
//! errors are retried with the watcher's backoff (0.8 s doubling to 30 s);
//! meanwhile profiles flow untagged, and processes still waiting for a
//! pod are looked up again each time the index changes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tracing::{debug, info, warn};

use crate::filter::pods::{PodRules, PodVerdict, PodVerdicts};

/// Where the API server is and which node's pods to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// `None`: in-cluster (service account token, `KUBERNETES_SERVICE_HOST`);
    /// else a plain URL without authentication (tests, `kubectl proxy`).
    pub api: Option<String>,
    /// This node's name (`NODE_NAME`, from the downward API).
    pub node: String,
    /// Pod labels copied to `k8s.pod.label.<key>`.
    pub pod_labels: Vec<String>,
}

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("Kubernetes API URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("in-cluster Kubernetes configuration (is the service account token mounted?): {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: Arc<str>,
    /// Its current id (64 hex digits), once it has started.
    pub id: Option<String>,
    /// `containerd`, `cri-o` or `docker`, from the id's scheme.
    pub runtime: Option<&'static str>,
    /// The image as the pod spec names it.
    pub image: Option<Arc<str>>,
}

/// What profiles are tagged with for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
    pub node: Option<Arc<str>>,
    /// `(attribute, name)` of the owning workload, e.g.
    /// `("k8s.deployment.name", "cart")` and `("k8s.replicaset.name", …)`.
    pub workload: Vec<(&'static str, Arc<str>)>,
    /// `(k8s.pod.label.<key>, value)` of the configured labels it has.
    pub labels: Vec<(Arc<str>, Arc<str>)>,
    /// `app.kubernetes.io/name` and `app.kubernetes.io/version`.
    pub app_name: Option<Arc<str>>,
    pub app_version: Option<Arc<str>>,
    /// `resource.opentelemetry.io/<key>` annotations with `service.*` or
    /// `deployment.*` keys: `(key, value)`.
    pub resource_annotations: Vec<(Arc<str>, Arc<str>)>,
    pub containers: Vec<ContainerInfo>,
    /// What the pod filter rules say about it.
    pub verdict: PodVerdict,
}

impl PodInfo {
    /// The workload name for `service.name`, in the order OpenTelemetry's
    /// Kubernetes conventions give.
    pub fn workload_name(&self) -> Option<&str> {
        [
            "k8s.deployment.name",
            "k8s.replicaset.name",
            "k8s.statefulset.name",
            "k8s.daemonset.name",
            "k8s.cronjob.name",
            "k8s.job.name",
        ]
        .iter()
        .find_map(|key| {
            self.workload
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| &**v)
        })
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.resource_annotations
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}

/// A process's pod, and its container when the container id matched.
#[derive(Debug, Clone)]
pub struct PodMatch {
    pub pod: Arc<PodInfo>,
    pub container: Option<usize>,
}

impl PodMatch {
    pub fn container(&self) -> Option<&ContainerInfo> {
        self.container.map(|i| &self.pod.containers[i])
    }
}

#[derive(Debug, Default)]
struct Index {
    /// Bumped on every change, so waiting processes are looked up again
    /// only when something changed.
    generation: u64,
    synced: bool,
    /// Watch errors so far (each retried with backoff).
    errors: u64,
    pods: HashMap<Arc<str>, Arc<PodInfo>>,
    /// Container id → (pod UID, index in its containers).
    containers: HashMap<String, (Arc<str>, usize)>,
    /// Pods of a relist in progress (`Init` … `InitDone`).
    staging: Option<Vec<Arc<PodInfo>>>,
}

impl Index {
    fn insert(&mut self, pod: Arc<PodInfo>) {
        self.remove(&pod.uid);
        for (i, c) in pod.containers.iter().enumerate() {
            if let Some(id) = &c.id {
                self.containers.insert(id.clone(), (pod.uid.clone(), i));
            }
        }
        self.pods.insert(pod.uid.clone(), pod);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for c in &old.containers {
                if let Some(id) = &c.id {
                    // Only if it still points at this pod.
                    if self.containers.get(id).is_some_and(|(u, _)| **u == *uid) {
                        self.containers.remove(id);
                    }
                }
            }
        }
    }
}

/// The pods of this node, shared between the watch task (writer) and the
/// process table (reader). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PodIndex {
    inner: Arc<RwLock<Index>>,
    /// Decide each pod's [`PodInfo::verdict`].
    rules: Arc<PodRules>,
}

impl PodIndex {
    pub fn new() -> PodIndex {
        PodIndex::default()
    }

    /// An index that judges every pod by the filter's pod `rules`.
    pub fn with_rules(rules: PodRules) -> PodIndex {
        PodIndex {
            rules: Arc::new(rules),
            ..PodIndex::default()
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // A writer that panicked left a consistent map (every update is
        // a few map operations); keep serving it.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The pod (and container) of a process, by its container id, else
    /// by the pod UID of its cgroup (the pod's sandbox, or a container the
    /// API has not reported yet).
    pub fn lookup(&self, container_id: Option<&str>, pod_uid: Option<&str>) -> Option<PodMatch> {
        let index = self.read();
        if let Some((uid, i)) = container_id.and_then(|id| index.containers.get(id)) {
            if let Some(pod) = index.pods.get(uid) {
                return Some(PodMatch {
                    pod: pod.clone(),
                    container: Some(*i),
                });
            }
        }
        let pod = index.pods.get(pod_uid?)?;
        Some(PodMatch {
            pod: pod.clone(),
            container: None,
        })
    }

    /// Changes so far; a lookup that failed can only succeed once this
    /// moved on.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Whether the first list has completed.
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// The pods (and their containers) the filter rules pick.
    pub fn verdicts(&self) -> PodVerdicts {
        let index = self.read();
        let mut out = PodVerdicts::default();
        for pod in index.pods.values() {
            if pod.verdict == PodVerdict::Neither {
                continue;
            }
            out.pods.insert(pod.uid.clone(), pod.verdict);
            for id in pod.containers.iter().filter_map(|c| c.id.clone()) {
                out.containers.insert(id, pod.verdict);
            }
        }
        out
    }

    /// Watch errors so far.
    pub fn watch_errors(&self) -> u64 {
        self.read().errors
    }

    fn note_error(&self) {
        self.write().errors += 1;
    }

    /// Pods indexed.
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one watch event.
    pub fn apply(&self, event: Event<Pod>, pod_labels: &[String]) {
        let info = |pod: &Pod| {
            let mut info = pod_info(pod, pod_labels)?;
            if !self.rules.is_empty() {
                let empty = std::collections::BTreeMap::new();
                let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
                info.verdict = self.rules.verdict(&info.namespace, labels);
            }
            Some(info)
        };
        let mut index = self.write();
        match event {
            Event::Init => index.staging = Some(Vec::new()),
            Event::InitApply(pod) => {
                if let Some(info) = info(&pod) {
                    index
                        .staging
                        .get_or_insert_with(Vec::new)
                        .push(Arc::new(info));
                }
            }
            Event::InitDone => {
                let pods = index.staging.take().unwrap_or_default();
                index.pods.clear();
                index.containers.clear();
                for pod in pods {
                    index.insert(pod);
                }
                index.synced = true;
                index.generation += 1;
            }
            Event::Apply(pod) => {
                if let Some(info) = info(&pod) {
                    index.insert(Arc::new(info));
                    index.generation += 1;
                }
            }
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    index.remove(uid);
                    index.generation += 1;
                }
            }
        }
    }
}

/// Builds the client and starts watching this node's pods on the current
/// tokio runtime. The index fills once the first list arrives.
pub fn spawn_watch(
    config: &KubernetesConfig,
    index: PodIndex,
) -> Result<tokio::task::JoinHandle<()>, KubernetesError> {
    let client_config = match &config.api {
        None => kube::Config::incluster().map_err(KubernetesError::InCluster)?,
        Some(url) => {
            let uri: http::Uri =
                url.parse()
                    .map_err(|e: http::uri::InvalidUri| KubernetesError::Url {
                        url: url.clone(),
                        message: e.to_string(),
                    })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(KubernetesError::Url {
                    url: url.clone(),
                    message: "expected http://host:port or https://host:port".into(),
                });
            }
            kube::Config::new(uri)
        }
    };
    let client = Client::try_from(client_config).map_err(KubernetesError::Client)?;
    let node = config.node.clone();
    let labels = config.pod_labels.clone();
    info!(node = %node, "watching this node's pods for Kubernetes metadata");
    Ok(tokio::spawn(watch(client, node, labels, index)))
}

async fn watch(client: Client, node: String, labels: Vec<String>, index: PodIndex) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if failing && matches!(event, Event::InitDone | Event::Apply(_) | Event::Delete(_))
                {
                    info!("Kubernetes pod watch recovered");
                    failing = false;
                }
                let done = matches!(event, Event::InitDone);
                index.apply(event, &labels);
                if done {
                    debug!(pods = index.len(), "pod list synced");
                }
            }
            Err(e) if !failing => {
                index.note_error();
                warn!(error = %e, "Kubernetes pod watch failed; retrying with backoff, profiles go without Kubernetes attributes meanwhile");
                failing = true;
            }
            Err(e) => {
                index.note_error();
                debug!(error = %e, "Kubernetes pod watch still failing");
            }
        }
    }
}

/// The facts of a pod profiles are tagged with; `None` without a UID.
pub fn pod_info(pod: &Pod, pod_labels: &[String]) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let uid: Arc<str> = meta.uid.as_deref().filter(|u| !u.is_empty())?.into();
    let empty = std::collections::BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let mut workload = Vec::new();
    if let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        workload = workload_of(
            &owner.kind,
            &owner.name,
            labels.get("pod-template-hash").map(String::as_str),
        );
    }
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let statuses: Vec<&ContainerStatus> = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .chain(s.ephemeral_container_statuses.iter().flatten())
        })
        .collect();
    let mut containers: Vec<ContainerInfo> = Vec::new();
    let specified = spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .map(|c| (&c.name, c.image.as_ref()))
            .chain(
                s.init_containers
                    .iter()
                    .flatten()
                    .map(|c| (&c.name, c.image.as_ref())),
            )
            .chain(
                s.ephemeral_containers
                    .iter()
                    .flatten()
                    .map(|c| (&c.name, c.image.as_ref())),
            )
    });
    for (name, image) in specified {
        let status = statuses.iter().find(|s| s.name == *name);
        let (id, runtime) = status
            .and_then(|s| s.container_id.as_deref())
            .and_then(parse_container_id)
            .map_or((None, None), |(id, rt)| (Some(id.to_string()), rt));
        containers.push(ContainerInfo {
            name: name.as_str().into(),
            id,
            runtime,
            image: image
                .or(status.map(|s| &s.image))
                .filter(|i| !i.is_empty())
                .map(|i| i.as_str().into()),
        });
    }
    // Statuses of containers the spec does not list (should not happen).
    for s in &statuses {
        if containers.iter().any(|c| *c.name == *s.name) {
            continue;
        }
        if let Some((id, runtime)) = s.container_id.as_deref().and_then(parse_container_id) {
            containers.push(ContainerInfo {
                name: s.name.as_str().into(),
                id: Some(id.to_string()),
                runtime,
                image: Some(s.image.as_str().into()).filter(|i: &Arc<str>| !i.is_empty()),
            });
        }
    }
    let label = |key: &str| {
        labels
            .get(key)
            .filter(|v| !v.is_empty())
            .map(|v| Arc::from(v.as_str()))
    };
    Some(PodInfo {
        namespace: meta.namespace.as_deref().unwrap_or("").into(),
        name: meta.name.as_deref().unwrap_or("").into(),
        uid,
        node: spec.and_then(|s| s.node_name.as_deref()).map(Arc::from),
        workload,
        labels: pod_labels
            .iter()
            .filter_map(|key| {
                let value = labels.get(key)?;
                Some((
                    Arc::from(format!("k8s.pod.label.{key}")),
                    Arc::from(value.as_str()),
                ))
            })
            .collect(),
        app_name: label("app.kubernetes.io/name"),
        app_version: label("app.kubernetes.io/version"),
        resource_annotations: annotations
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("resource.opentelemetry.io/")?;
                (super::service::is_passed_through(key) && !v.is_empty())
                    .then(|| (Arc::from(key), Arc::from(v.as_str())))
            })
            .collect(),
        containers,
        verdict: PodVerdict::Neither,
    })
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → the id (64 hex
/// digits) and the runtime.
pub fn parse_container_id(text: &str) -> Option<(&str, Option<&'static str>)> {
    let (scheme, id) = text.split_once("://")?;
    let runtime = match scheme {
        "containerd" => Some("containerd"),
        "cri-o" => Some("cri-o"),
        "docker" => Some("docker"),
        _ => None,
    };
    let valid = id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    valid.then_some((id, runtime))
}

/// The workload attributes of a pod's controlling owner.
pub fn workload_of(
    kind: &str,
    name: &str,
    pod_template_hash: Option<&str>,
) -> Vec<(&'static str, Arc<str>)> {
    let name_arc = || Arc::from(name);
    match kind {
        "ReplicaSet" => {
            let mut out = vec![("k8s.replicaset.name", name_arc())];
            if let Some(deployment) = pod_template_hash
                .filter(|h| !h.is_empty())
                .and_then(|hash| name.strip_suffix(hash))
                .and_then(|rest| rest.strip_suffix('-'))
                .filter(|d| !d.is_empty())
            {
                out.push(("k8s.deployment.name", Arc::from(deployment)));
            }
            out
        }
        "DaemonSet" => vec![("k8s.daemonset.name", name_arc())],
        "StatefulSet" => vec![("k8s.statefulset.name", name_arc())],
        "Job" => {
            let mut out = vec![("k8s.job.name", name_arc())];
            if let Some((cronjob, suffix)) = name.rsplit_once('-') {
                if suffix.len() >= 8
                    && suffix.bytes().all(|b| b.is_ascii_digit())
                    && !cronjob.is_empty()
                {
                    out.push(("k8s.cronjob.name", Arc::from(cronjob)));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f8a9b2c1d0e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn names(w: &[(&'static str, Arc<str>)]) -> Vec<(&'static str, String)> {
        w.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn owner_references_give_the_workload() {
        assert_eq!(
            names(&workload_of(
                "ReplicaSet",
                "cart-7d9f8b6c5d",
                Some("7d9f8b6c5d")
            )),
            [
                ("k8s.replicaset.name", "cart-7d9f8b6c5d".into()),
                ("k8s.deployment.name", "cart".into())
            ]
        );
        // Dashes in the deployment's name.
        assert_eq!(
            names(&workload_of("ReplicaSet", "my-web-app-5f4d", Some("5f4d")))[1],
            ("k8s.deployment.name", "my-web-app".into())
        );
        // A ReplicaSet without a Deployment: no hash label, or one that
        // is not the name's suffix.
        assert_eq!(workload_of("ReplicaSet", "bare-rs", None).len(), 1);
        assert_eq!(workload_of("ReplicaSet", "bare-rs", Some("abc")).len(), 1);
        assert_eq!(workload_of("ReplicaSet", "abc", Some("abc")).len(), 1);
        assert_eq!(
            names(&workload_of("DaemonSet", "node-exporter", None)),
            [("k8s.daemonset.name", "node-exporter".into())]
        );
        assert_eq!(
            names(&workload_of("StatefulSet", "postgres", None)),
            [("k8s.statefulset.name", "postgres".into())]
        );
        assert_eq!(
            names(&workload_of("Job", "backup-29345678", None)),
            [
                ("k8s.job.name", "backup-29345678".into()),
                ("k8s.cronjob.name", "backup".into())
            ]
        );
        // A Job not made by a CronJob.
        assert_eq!(workload_of("Job", "migrate-2", None).len(), 1);
        assert_eq!(workload_of("Job", "db-migrate", None).len(), 1);
        assert!(workload_of("Node", "x", None).is_empty());
        assert!(workload_of("SomeOperatorKind", "x", None).is_empty());
    }

    #[test]
    fn container_ids_of_each_runtime() {
        assert_eq!(
            parse_container_id(&format!("containerd://{ID}")),
            Some((ID, Some("containerd")))
        );
        assert_eq!(
            parse_container_id(&format!("cri-o://{ID}")),
            Some((ID, Some("cri-o")))
        );
        assert_eq!(
            parse_container_id(&format!("docker://{ID}")),
            Some((ID, Some("docker")))
        );
        assert_eq!(
            parse_container_id(&format!("other://{ID}")),
            Some((ID, None))
        );
        assert_eq!(parse_container_id(ID), None);
        assert_eq!(parse_container_id("containerd://abc"), None);
        assert_eq!(parse_container_id(""), None);
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn cart_pod(uid: &str, id: &str) -> Pod {
        pod(serde_json::json!({
            "metadata": {
                "name": "cart-7d9f8b6c5d-x2k4p", "namespace": "shop", "uid": uid,
                "labels": {"app.kubernetes.io/name": "cart", "app.kubernetes.io/version": "1.4.2",
                           "pod-template-hash": "7d9f8b6c5d", "team": "payments"},
                "annotations": {"resource.opentelemetry.io/deployment.environment.name": "prod",
                                "resource.opentelemetry.io/k8s.pod.name": "spoof"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "cart-7d9f8b6c5d", "uid": "u", "controller": true}]
            },
            "spec": {"nodeName": "node-1",
                     "containers": [{"name": "app", "image": "registry.example/cart:1.4.2"},
                                    {"name": "sidecar", "image": "envoy:v1"}],
                     "initContainers": [{"name": "migrate", "image": "cart-migrate:7"}]},
            "status": {"containerStatuses": [
                          {"name": "app", "containerID": format!("containerd://{id}"), "image": "registry.example/cart:1.4.2",
                           "imageID": "", "ready": true, "restartCount": 0},
                          {"name": "sidecar", "image": "envoy:v1", "imageID": "", "ready": false, "restartCount": 0}],
                       "initContainerStatuses": [
                          {"name": "migrate", "containerID": format!("containerd://{ID2}"), "image": "cart-migrate:7",
                           "imageID": "", "ready": false, "restartCount": 0}]}
        }))
    }

    #[test]
    fn pods_become_index_entries() {
        let info = pod_info(
            &cart_pod("uid-1", ID),
            &["team".to_string(), "absent".to_string()],
        )
        .unwrap();
        assert_eq!(&*info.namespace, "shop");
        assert_eq!(&*info.name, "cart-7d9f8b6c5d-x2k4p");
        assert_eq!(info.node.as_deref(), Some("node-1"));
        assert_eq!(info.workload_name(), Some("cart"));
        assert_eq!(
            info.labels,
            [(Arc::from("k8s.pod.label.team"), Arc::from("payments"))]
        );
        assert_eq!(info.app_version.as_deref(), Some("1.4.2"));
        assert_eq!(info.annotation("deployment.environment.name"), Some("prod"));
        assert_eq!(info.annotation("k8s.pod.name"), None);
        let names: Vec<&str> = info.containers.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["app", "sidecar", "migrate"]);
        assert_eq!(info.containers[0].id.as_deref(), Some(ID));
        assert_eq!(info.containers[0].runtime, Some("containerd"));
        assert_eq!(info.containers[1].id, None, "not started yet");
        assert_eq!(info.containers[2].id.as_deref(), Some(ID2));
        // No UID: not indexable.
        assert!(pod_info(&pod(serde_json::json!({"metadata": {"name": "x"}})), &[]).is_none());
        // A minimal pod.
        let bare = pod_info(
            &pod(serde_json::json!({"metadata": {"name": "x", "uid": "u"}})),
            &[],
        )
        .unwrap();
        assert!(bare.containers.is_empty() && bare.workload.is_empty());
    }

    #[test]
    fn index_follows_lists_updates_and_deletions() {
        let index = PodIndex::new();
        assert!(!index.is_synced());
        index.apply(Event::Init, &[]);
        index.apply(Event::InitApply(cart_pod("uid-1", ID)), &[]);
        assert!(
            index.lookup(Some(ID), None).is_none(),
            "not before InitDone"
        );
        index.apply(Event::InitDone, &[]);
        assert!(index.is_synced());
        let g = index.generation();
        let m = index.lookup(Some(ID), None).unwrap();
        assert_eq!(m.container().unwrap().name.as_ref(), "app");
        let m = index.lookup(Some(ID2), None).unwrap();
        assert_eq!(m.container().unwrap().name.as_ref(), "migrate");
        // By pod UID only (a sandbox): the pod without a container.
        let m = index.lookup(Some(&"e".repeat(64)), Some("uid-1")).unwrap();
        assert!(m.container.is_none());
        assert!(index.lookup(None, Some("uid-2")).is_none());
        // The container restarts under a new id.
        let new_id = "f".repeat(64);
        index.apply(Event::Apply(cart_pod("uid-1", &new_id)), &[]);
        assert!(index.generation() > g);
        assert!(index.lookup(Some(ID), None).is_none());
        assert!(index.lookup(Some(&new_id), None).is_some());
        // Deleted: gone for new lookups.
        index.apply(Event::Delete(cart_pod("uid-1", &new_id)), &[]);
        assert!(index.lookup(Some(&new_id), Some("uid-1")).is_none());
        assert!(index.is_empty());
        // A relist replaces everything: pods missing from it are gone.
        index.apply(Event::Apply(cart_pod("uid-1", ID)), &[]);
        index.apply(Event::Init, &[]);
        index.apply(Event::InitApply(cart_pod("uid-2", ID2)), &[]);
        index.apply(Event::InitDone, &[]);
        assert_eq!(index.len(), 1);
        assert!(index.lookup(Some(ID), Some("uid-1")).is_none());
        assert!(index.lookup(Some(ID2), None).is_some());
    }

    #[test]
    fn bad_api_urls_are_errors() {
        let config = |api: &str| KubernetesConfig {
            api: Some(api.into()),
            node: "n".into(),
            pod_labels: vec![],
        };
        for bad in ["not a url", "ftp://x", "/path"] {
            let err = spawn_watch(&config(bad), PodIndex::new()).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
