//! Kubernetes filter rules: include or exclude the pods of namespaces, or
//! the pods a label selector picks, and the thread that turns them into
//! kernel filter entries.
//!
//! The pod watch ([`PodIndex`]) decides each pod's [`PodVerdict`] when a
//! pod is listed or changes. The kernel knows processes by cgroup, not by
//! pod, so [`spawn_feeder`] finds the cgroups of the pods with a verdict
//! in the cgroup v2 hierarchy (every container runtime nests a pod's
//! containers in a directory named after the pod's UID, and names each
//! container's directory after its id; see [`crate::metadata::container`])
//! and feeds their ids to the kernel filter through a [`FilterHandle`]:
//! from then on an excluded pod's processes cost no stack walk, and with
//! include rules only included pods are sampled.
//!
//! Timing: a new pod's cgroups are found within about a second of the
//! watch reporting it (scans are at most one a second, and again every
//! [`RESCAN`] in case a cgroup appeared after its pod's last event).
//! Samples an excluded pod's processes give before that are dropped at
//! drain, where each process's pod is known ([`PodVerdict`] on its
//! metadata); an included pod's processes are missed for that moment.
//!
//! Only processes directly in a fed cgroup match (the kernel checks the
//! task's own cgroup for runtime entries), which is where runtimes put a
//! container's processes. Containers whose cgroups are not in the v2
//! hierarchy (hybrid hosts with the cgroupfs driver) cannot be filtered in
//! the kernel: excludes still apply at drain, includes cannot select them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::core::{Expression, Selector, SelectorExt};
use tracing::{debug, info, warn};

use super::{FilterError, FilterHandle, FilterUpdate};
use crate::metadata::container::parse_cgroup_path;
use crate::metadata::PodIndex;

/// How often the feeder looks at the pod index for changes.
const POLL: Duration = Duration::from_millis(250);
/// Least time between two cgroup scans.
const MIN_SCAN_GAP: Duration = Duration::from_secs(1);
/// Scans again this often even without pod changes.
const RESCAN: Duration = Duration::from_secs(10);
/// A scan stops descending below this depth...
const MAX_SCAN_DEPTH: usize = 12;
/// ...and after this many directories.
const MAX_SCAN_DIRS: usize = 100_000;

/// What the pod rules say about one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodVerdict {
    /// An include rule picks it and no exclude rule does.
    Include,
    /// An exclude rule picks it.
    Exclude,
    /// No pod rule picks it (also: no pod rules at all).
    #[default]
    Neither,
}

/// A label selector as Kubernetes writes them
/// (`app=web,tier!=db,env in (prod,staging),!canary`).
#[derive(Debug, Clone)]
pub struct PodSelector {
    /// As given.
    pub text: String,
    selector: Selector,
}

impl PodSelector {
    /// Parses the Kubernetes label selector syntax: requirements joined by
    /// commas, each `key`, `!key`, `key=value` (or `==`), `key!=value`,
    /// `key in (v1,v2)` or `key notin (v1,v2)`.
    pub fn parse(text: &str) -> Result<PodSelector, String> {
        let mut expressions = Vec::new();
        for requirement in split_requirements(text)? {
            expressions.push(parse_requirement(requirement)?);
        }
        if expressions.is_empty() {
            return Err("an empty selector would pick every pod".into());
        }
        Ok(PodSelector {
            text: text.to_string(),
            selector: expressions.into_iter().collect(),
        })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

/// Splits at the commas outside parentheses.
fn split_requirements(text: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' at byte {i}"))?
            }
            ',' if depth == 0 => {
                out.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    out.push(text[start..].trim());
    if out.len() > 1 && out.iter().any(|r| r.is_empty()) {
        return Err("an empty requirement between commas".into());
    }
    Ok(out.into_iter().filter(|r| !r.is_empty()).collect())
}

fn parse_requirement(requirement: &str) -> Result<Expression, String> {
    if let Some(key) = requirement.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(label_key(key.trim())?));
    }
    if let Some((key, value)) = requirement.split_once("!=") {
        return Ok(Expression::NotEqual(
            label_key(key.trim())?,
            label_value(value.trim())?,
        ));
    }
    if let Some((key, value)) = requirement
        .split_once("==")
        .or_else(|| requirement.split_once('='))
    {
        return Ok(Expression::Equal(
            label_key(key.trim())?,
            label_value(value.trim())?,
        ));
    }
    if let Some(open) = requirement.find('(') {
        let (head, rest) = requirement.split_at(open);
        let values = rest
            .strip_prefix('(')
            .and_then(|r| r.trim_end().strip_suffix(')'))
            .ok_or_else(|| format!("{requirement:?}: expected `key in (v1,v2)`"))?;
        let mut words = head.split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{requirement:?}: expected `key in (…)` or `key notin (…)`"
            ));
        };
        let set = values
            .split(',')
            .map(|v| label_value(v.trim()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let key = label_key(key)?;
        return match op {
            "in" => Ok(Expression::In(key, set)),
            "notin" => Ok(Expression::NotIn(key, set)),
            other => Err(format!(
                "{requirement:?}: unknown operator {other:?} (in, notin)"
            )),
        };
    }
    Ok(Expression::Exists(label_key(requirement)?))
}

fn label_key(key: &str) -> Result<String, String> {
    crate::config::check_label_key(key)?;
    Ok(key.to_string())
}

/// A label value: at most 63 characters of letters, digits, `-_.`,
/// starting and ending with a letter or digit (or empty).
fn label_value(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let valid = value.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_none_or(u8::is_ascii_alphanumeric)
        && bytes.last().is_none_or(u8::is_ascii_alphanumeric);
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!("{value:?} is not a Kubernetes label value"))
    }
}

/// A namespace name: a DNS label (lower-case letters, digits, `-`).
fn check_namespace(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let valid = !name.is_empty()
        && name.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?} is not a Kubernetes namespace name"))
    }
}

/// Validated pod rules. Includes add up (a pod in an included namespace
/// or picked by an include selector is included); excludes win.
#[derive(Debug, Clone, Default)]
pub struct PodRules {
    pub include_namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    pub include_selectors: Vec<PodSelector>,
    pub exclude_selectors: Vec<PodSelector>,
}

impl PodRules {
    pub fn new(
        include_namespaces: &[String],
        exclude_namespaces: &[String],
        include_selectors: &[String],
        exclude_selectors: &[String],
    ) -> Result<PodRules, FilterError> {
        let namespaces = |flag: &'static str, names: &[String]| {
            names
                .iter()
                .map(|n| {
                    check_namespace(n)
                        .map(|()| n.clone())
                        .map_err(|message| FilterError::BadPodRule { flag, message })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let selectors = |flag: &'static str, texts: &[String]| {
            texts
                .iter()
                .map(|t| {
                    PodSelector::parse(t).map_err(|message| FilterError::BadPodRule {
                        flag,
                        message: format!("selector {t:?}: {message}"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(PodRules {
            include_namespaces: namespaces("include-namespace", include_namespaces)?,
            exclude_namespaces: namespaces("exclude-namespace", exclude_namespaces)?,
            include_selectors: selectors("include-pod-selector", include_selectors)?,
            exclude_selectors: selectors("exclude-pod-selector", exclude_selectors)?,
        })
    }

    pub fn has_includes(&self) -> bool {
        !self.include_namespaces.is_empty() || !self.include_selectors.is_empty()
    }

    pub fn has_excludes(&self) -> bool {
        !self.exclude_namespaces.is_empty() || !self.exclude_selectors.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        !self.has_includes() && !self.has_excludes()
    }

    /// The verdict for a pod of `namespace` with `labels`.
    pub fn verdict(&self, namespace: &str, labels: &BTreeMap<String, String>) -> PodVerdict {
        let picks = |namespaces: &[String], selectors: &[PodSelector]| {
            namespaces.iter().any(|n| n == namespace) || selectors.iter().any(|s| s.matches(labels))
        };
        if picks(&self.exclude_namespaces, &self.exclude_selectors) {
            PodVerdict::Exclude
        } else if picks(&self.include_namespaces, &self.include_selectors) {
            PodVerdict::Include
        } else {
            PodVerdict::Neither
        }
    }

    /// For logs and titles, in the style of [`super::FilterSpec::describe`].
    pub fn describe(&self) -> Vec<String> {
        let mut parts = Vec::new();
        let mut add = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                parts.push(format!("{what} {}", items.join(";")));
            }
        };
        add("namespace", self.include_namespaces.clone());
        add("-namespace", self.exclude_namespaces.clone());
        add(
            "pods",
            self.include_selectors
                .iter()
                .map(|s| s.text.clone())
                .collect(),
        );
        add(
            "-pods",
            self.exclude_selectors
                .iter()
                .map(|s| s.text.clone())
                .collect(),
        );
        parts
    }
}

/// Verdicts of the pods the rules pick, as the pod index knows them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodVerdicts {
    /// By pod UID.
    pub pods: HashMap<Arc<str>, PodVerdict>,
    /// By container id, for layouts that do not name the pod.
    pub containers: HashMap<String, PodVerdict>,
}

impl PodVerdicts {
    /// The verdict for a cgroup directory at `path` (relative to the
    /// hierarchy's root, `/`-separated).
    fn of_cgroup(&self, path: &str) -> Option<PodVerdict> {
        let info = parse_cgroup_path(path);
        info.container_id
            .as_ref()
            .and_then(|id| self.containers.get(id))
            .or_else(|| info.pod_uid.as_deref().and_then(|uid| self.pods.get(uid)))
            .copied()
    }
}

/// The cgroup v2 ids of the directories below `mount` that belong to a pod
/// (or container) with a verdict: what the kernel filter should hold.
pub fn cgroups_to_feed(mount: &Path, verdicts: &PodVerdicts) -> HashMap<u64, PodVerdict> {
    let mut out = HashMap::new();
    if verdicts.pods.is_empty() && verdicts.containers.is_empty() {
        return out;
    }
    let mut stack: Vec<(PathBuf, usize)> = vec![(mount.to_path_buf(), 0)];
    let mut visited = 0;
    while let Some((dir, depth)) = stack.pop() {
        visited += 1;
        if visited > MAX_SCAN_DIRS {
            warn!(
                dirs = MAX_SCAN_DIRS,
                "cgroup scan for pod filters stopped early"
            );
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // Cgroup files are regular files; directories are cgroups.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if let Some(verdict) = path
                .strip_prefix(mount)
                .ok()
                .and_then(|rel| rel.to_str())
                .and_then(|rel| verdicts.of_cgroup(&format!("/{rel}")))
            {
                if let Ok(meta) = entry.metadata() {
                    out.insert(meta.ino(), verdict);
                }
            }
            if depth + 1 < MAX_SCAN_DEPTH {
                stack.push((path, depth + 1));
            }
        }
    }
    out
}

/// The updates that take the kernel filter from `fed` to `wanted`.
pub fn updates(
    fed: &HashMap<u64, PodVerdict>,
    wanted: &HashMap<u64, PodVerdict>,
) -> Vec<FilterUpdate> {
    let mut out = Vec::new();
    for (&id, &verdict) in wanted {
        if fed.get(&id) != Some(&verdict) {
            match verdict {
                PodVerdict::Include => out.push(FilterUpdate::IncludeCgroup(id)),
                PodVerdict::Exclude => out.push(FilterUpdate::ExcludeCgroup(id)),
                PodVerdict::Neither => {}
            }
        }
    }
    for &id in fed.keys() {
        if !wanted.contains_key(&id) {
            out.push(FilterUpdate::RemoveCgroup(id));
        }
    }
    out
}

/// Starts the thread that keeps the kernel filter in step with the pod
/// index, when there are pod rules (and so a pod index: the rules need
/// Kubernetes metadata, checked with the configuration). It ends when the
/// sampler behind `handle` has stopped.
pub fn start_feeder(rules: &PodRules, index: Option<&PodIndex>, handle: FilterHandle) {
    let Some(index) = index.filter(|_| !rules.is_empty()).cloned() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("hearth-podfilter".into())
        .spawn(move || feed(index, handle));
    if let Err(error) = spawned {
        warn!(%error, "cannot start the pod filter thread: pod rules apply at drain only");
    }
}

fn feed(index: PodIndex, handle: FilterHandle) {
    let Some(mount) = super::cgroup2_mount() else {
        warn!("no cgroup v2 hierarchy: pod filters apply at drain only (excludes), and include rules select nothing");
        return;
    };
    let mut fed: HashMap<u64, PodVerdict> = HashMap::new();
    let mut seen_generation = None;
    let mut last_scan: Option<Instant> = None;
    loop {
        let generation = index.generation();
        let due = match last_scan {
            None => true,
            Some(at) => {
                (Some(generation) != seen_generation && at.elapsed() >= MIN_SCAN_GAP)
                    || at.elapsed() >= RESCAN
            }
        };
        if due {
            seen_generation = Some(generation);
            last_scan = Some(Instant::now());
            let verdicts = index.verdicts();
            let wanted = cgroups_to_feed(&mount, &verdicts);
            let changes = updates(&fed, &wanted);
            if !changes.is_empty() {
                debug!(
                    pods = verdicts.pods.len(),
                    cgroups = wanted.len(),
                    changes = changes.len(),
                    "pod filter: kernel cgroup entries updated"
                );
                if fed.is_empty() {
                    info!(
                        cgroups = wanted.len(),
                        "pod filter: first cgroups fed to the kernel"
                    );
                }
            }
            for update in changes {
                if !handle.send(update) {
                    return;
                }
            }
            fed = wanted;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_parse_every_operator() {
        let s = PodSelector::parse(
            "app=web, tier!=db,env in (prod, staging),team notin (x),canary,!legacy,app.kubernetes.io/name==cart",
        )
        .unwrap();
        let good = labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("env", "prod"),
            ("canary", ""),
            ("app.kubernetes.io/name", "cart"),
        ]);
        assert!(s.matches(&good));
        for (key, value) in [
            ("tier", "db"),
            ("env", "dev"),
            ("team", "x"),
            ("legacy", "1"),
        ] {
            let mut bad = good.clone();
            bad.insert(key.into(), value.into());
            assert!(!s.matches(&bad), "{key}={value}");
        }
        let mut missing = good.clone();
        missing.remove("canary");
        assert!(!s.matches(&missing));
    }

    #[test]
    fn bad_selectors_are_errors() {
        for bad in [
            "",
            "app=web,,x",
            "env in (a,b",
            "env in a,b)",
            "env within (a)",
            "a b",
            "app=bad value",
            "-key",
        ] {
            assert!(PodSelector::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn excludes_win_and_includes_add_up() {
        let rules = PodRules::new(
            &["shop".into()],
            &["kube-system".into()],
            &["app=web".into()],
            &["noisy".into()],
        )
        .unwrap();
        assert_eq!(rules.verdict("shop", &labels(&[])), PodVerdict::Include);
        assert_eq!(
            rules.verdict("other", &labels(&[("app", "web")])),
            PodVerdict::Include
        );
        assert_eq!(
            rules.verdict("shop", &labels(&[("noisy", "1")])),
            PodVerdict::Exclude
        );
        assert_eq!(
            rules.verdict("kube-system", &labels(&[("app", "web")])),
            PodVerdict::Exclude
        );
        assert_eq!(rules.verdict("other", &labels(&[])), PodVerdict::Neither);
        let err = PodRules::new(&["Bad_NS".into()], &[], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("--include-namespace"), "{err}");
        let err = PodRules::new(&[], &[], &[], &["x in (".into()]).unwrap_err();
        assert!(err.to_string().contains("--exclude-pod-selector"), "{err}");
    }

    #[test]
    fn cgroups_of_pods_are_found_by_pod_uid_or_container_id() {
        let root = std::env::temp_dir().join(format!("hearth-podscan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "1f0e2d3c-4b5a-4697-8877-a6b5c4d3e2f1";
        let cid = "ab".repeat(32);
        let other = "cd".repeat(32);
        let pod_dir = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        let container = pod_dir.join(format!("cri-containerd-{cid}.scope"));
        let docker = root.join(format!("system.slice/docker-{other}.scope"));
        let unrelated = root.join("system.slice/sshd.service");
        for d in [&container, &docker, &unrelated] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let verdicts = PodVerdicts {
            pods: HashMap::from([(Arc::from(uid), PodVerdict::Exclude)]),
            containers: HashMap::from([(other.clone(), PodVerdict::Include)]),
        };
        let found = cgroups_to_feed(&root, &verdicts);
        assert_eq!(found.get(&ino(&pod_dir)), Some(&PodVerdict::Exclude));
        assert_eq!(found.get(&ino(&container)), Some(&PodVerdict::Exclude));
        assert_eq!(found.get(&ino(&docker)), Some(&PodVerdict::Include));
        assert!(!found.contains_key(&ino(&unrelated)));
        assert_eq!(found.len(), 3, "{found:?}");

        let fed = HashMap::from([
            (ino(&container), PodVerdict::Include),
            (42, PodVerdict::Exclude),
        ]);
        let mut changes = updates(&fed, &found);
        changes.sort_by_key(|u| format!("{u:?}"));
        assert_eq!(changes, {
            let mut want = vec![
                FilterUpdate::ExcludeCgroup(ino(&pod_dir)),
                FilterUpdate::ExcludeCgroup(ino(&container)),
                FilterUpdate::IncludeCgroup(ino(&docker)),
                FilterUpdate::RemoveCgroup(42),
            ];
            want.sort_by_key(|u| format!("{u:?}"));
            want
        });
        assert!(updates(&found, &found).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
