//! Which processes are profiled: include and exclude rules by process id,
//! process name (regular expression) and cgroup.
//!
//! Semantics: a process is profiled when it matches some include rule (or
//! there are none) and no exclude rule. Excludes win.
//!
//! Where each rule is applied:
//!
//! * **pids and cgroups: in the kernel**, before any stack work. Pids are
//!   entries of the `PID_FILTER` hash map; cgroups of `CGROUP_FILTER`, keyed
//!   by cgroup v2 id (the inode number of the cgroup's directory in the
//!   unified hierarchy). A cgroup rule covers the whole subtree: the kernel
//!   checks the task's ancestor at each level a rule's path is at
//!   (`bpf_get_current_ancestor_cgroup_id`) and the task's own cgroup (for
//!   ids fed at runtime). Load-time flags let the verifier drop the checks
//!   that are not used, so without a filter nothing is paid.
//! * **process names: in userspace**, when a process is first seen (the
//!   processes alive at start, then every exec), and the verdict is pushed
//!   into `PID_FILTER` so from then on the kernel skips those processes
//!   too. Between an exec and that update (about a millisecond) an
//!   excluded process may be sampled; the pipeline drops those samples by
//!   name at drain. An included one is missed for that moment. A name is
//!   the process name (`/proc/<pid>/comm`, at most 15 bytes) or the file
//!   name of its executable: a rule matches if either matches.
//!
//! Pid rules do not follow children: a child has its own pid. To profile a
//! process tree, put it in a cgroup (`systemd-run --scope`) or name it.
//!
//! cgroup v1: the kernel keys processes by their cgroup v2 id only, so a
//! path must be a directory of the v2 (unified) hierarchy; a v1 controller
//! directory is refused with a message saying so. On hybrid hosts (v1
//! controllers plus `/sys/fs/cgroup/unified`) systemd mirrors its tree in
//! the unified hierarchy, so the same unit is found there.
//!
//! * **Kubernetes namespaces and pod label selectors: in the kernel too**,
//!   once the pod watch has listed a pod: [`pods`] finds the pod's cgroups
//!   and feeds their ids at runtime through a [`FilterHandle`] (the spec
//!   says at load time whether runtime includes or excludes will come,
//!   [`FilterSpec::runtime_cgroups`]). Excluded pods' samples taken before
//!   that are dropped at drain. They need Kubernetes metadata on.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use hearth_ebpf::{
    FILTER_CGROUPS, FILTER_INCLUDE, FILTER_MAX_CGROUP_LEVEL, FILTER_NAMES, FILTER_PIDS,
};
use regex::Regex;

pub mod pods;
pub use pods::{PodRules, PodVerdict};

/// `statfs` magic of cgroup v2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `statfs` magic of cgroup v1 hierarchies (`CGROUP_SUPER_MAGIC`).
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// A filter rule that cannot be used. Usage errors: exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("--{flag} {pattern:?} is not a valid regular expression: {source}")]
    BadRegex {
        flag: &'static str,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("--{flag} {path}: no such cgroup (give a directory of the cgroup v2 hierarchy{mount}, or a path relative to it)")]
    NoSuchCgroup {
        flag: &'static str,
        path: String,
        mount: String,
    },
    #[error(
        "--{flag} {path}: a cgroup v1 directory; the kernel identifies processes by their \
         cgroup v2 id only: name the same cgroup under {mount}"
    )]
    CgroupV1 {
        flag: &'static str,
        path: String,
        mount: String,
    },
    #[error("--{flag} {path}: not a cgroup directory")]
    NotCgroup { flag: &'static str, path: String },
    #[error("--{flag} {path}: this host has no cgroup v2 hierarchy mounted")]
    NoCgroupV2 { flag: &'static str, path: String },
    #[error("--{flag} {path}: the root cgroup holds every process; name a cgroup below it")]
    RootCgroup { flag: &'static str, path: String },
    #[error("--{flag}: {message}")]
    BadPodRule { flag: &'static str, message: String },
    #[error(
        "--{flag} needs Kubernetes metadata: run in a cluster (KUBERNETES_SERVICE_HOST), \
         or give --kubernetes or --kubernetes-api"
    )]
    NeedsKubernetes { flag: &'static str },
    #[error("--{flag} {path}: {depth} levels deep, the kernel filter checks at most {max}")]
    TooDeep {
        flag: &'static str,
        path: String,
        depth: u32,
        max: u32,
    },
}

impl FilterError {
    /// The option the error is about, without dashes.
    pub fn flag(&self) -> &'static str {
        match self {
            FilterError::BadRegex { flag, .. }
            | FilterError::NoSuchCgroup { flag, .. }
            | FilterError::CgroupV1 { flag, .. }
            | FilterError::NotCgroup { flag, .. }
            | FilterError::NoCgroupV2 { flag, .. }
            | FilterError::RootCgroup { flag, .. }
            | FilterError::TooDeep { flag, .. }
            | FilterError::BadPodRule { flag, .. }
            | FilterError::NeedsKubernetes { flag } => flag,
        }
    }
}

/// The rules as given (flags, TOML or environment), before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterRules {
    pub include_pids: Vec<u32>,
    pub exclude_pids: Vec<u32>,
    pub include_names: Vec<String>,
    pub exclude_names: Vec<String>,
    pub include_cgroups: Vec<String>,
    pub exclude_cgroups: Vec<String>,
    /// Kubernetes namespaces.
    pub include_namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    /// Kubernetes label selectors on pods (`app=web,tier!=db`).
    pub include_pod_selectors: Vec<String>,
    pub exclude_pod_selectors: Vec<String>,
}

impl FilterRules {
    pub fn is_empty(&self) -> bool {
        self == &FilterRules::default()
    }

    /// The first pod rule's option, if any is given.
    pub fn first_pod_flag(&self) -> Option<&'static str> {
        [
            ("include-namespace", &self.include_namespaces),
            ("exclude-namespace", &self.exclude_namespaces),
            ("include-pod-selector", &self.include_pod_selectors),
            ("exclude-pod-selector", &self.exclude_pod_selectors),
        ]
        .into_iter()
        .find(|(_, rules)| !rules.is_empty())
        .map(|(flag, _)| flag)
    }

    /// Pod rules select on what the pod watch reports.
    pub fn check_kubernetes(&self, kubernetes: bool) -> Result<(), FilterError> {
        match self.first_pod_flag() {
            Some(flag) if !kubernetes => Err(FilterError::NeedsKubernetes { flag }),
            _ => Ok(()),
        }
    }
}

/// A cgroup of the v2 hierarchy, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// As given.
    pub path: String,
    /// Its directory.
    pub dir: PathBuf,
    /// cgroup v2 id: the directory's inode number.
    pub id: u64,
    /// Depth below the root (the root is level 0).
    pub level: u32,
}

/// Validated rules (regexes compiled, cgroups resolved to ids).
#[derive(Debug, Clone, Default)]
pub struct FilterSpec {
    pub include_pids: Vec<u32>,
    pub exclude_pids: Vec<u32>,
    pub include_names: Vec<Regex>,
    pub exclude_names: Vec<Regex>,
    pub include_cgroups: Vec<Cgroup>,
    pub exclude_cgroups: Vec<Cgroup>,
    /// Kubernetes namespace and pod selector rules, applied through cgroup
    /// ids fed at runtime.
    pub pods: PodRules,
    /// (include, exclude): cgroup ids of these kinds will be fed at
    /// runtime through a [`FilterHandle`], so the kernel checks must be
    /// loaded even without rules now.
    pub runtime_cgroups: (bool, bool),
}

/// What the name rules say about one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    Include,
    Exclude,
    /// No name rule matches.
    Neither,
}

impl FilterSpec {
    pub fn new(rules: &FilterRules) -> Result<Self, FilterError> {
        let regexes = |flag: &'static str, patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    Regex::new(p).map_err(|source| FilterError::BadRegex {
                        flag,
                        pattern: p.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mount = cgroup2_mount();
        let cgroups = |flag: &'static str, paths: &[String]| {
            paths
                .iter()
                .map(|p| resolve_cgroup(flag, p, mount.as_deref()))
                .collect::<Result<Vec<_>, _>>()
        };
        let pods = PodRules::new(
            &rules.include_namespaces,
            &rules.exclude_namespaces,
            &rules.include_pod_selectors,
            &rules.exclude_pod_selectors,
        )?;
        Ok(Self {
            include_pids: rules.include_pids.clone(),
            exclude_pids: rules.exclude_pids.clone(),
            include_names: regexes("include-name", &rules.include_names)?,
            exclude_names: regexes("exclude-name", &rules.exclude_names)?,
            include_cgroups: cgroups("include-cgroup", &rules.include_cgroups)?,
            exclude_cgroups: cgroups("exclude-cgroup", &rules.exclude_cgroups)?,
            runtime_cgroups: (pods.has_includes(), pods.has_excludes()),
            pods,
        })
    }

    /// Only these pids: the `--pid` of `hearth record`.
    pub fn pids(pids: &[u32]) -> Self {
        Self {
            include_pids: pids.to_vec(),
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.kernel_flags() == 0
    }

    pub fn has_names(&self) -> bool {
        !self.include_names.is_empty() || !self.exclude_names.is_empty()
    }

    /// `FILTER_FLAGS` for the kernel programs.
    pub fn kernel_flags(&self) -> u8 {
        let mut flags = 0;
        if !self.include_pids.is_empty()
            || !self.include_names.is_empty()
            || !self.include_cgroups.is_empty()
            || self.runtime_cgroups.0
        {
            flags |= FILTER_INCLUDE;
        }
        if !self.include_pids.is_empty() || !self.exclude_pids.is_empty() || self.has_names() {
            flags |= FILTER_PIDS;
        }
        if !self.include_cgroups.is_empty()
            || !self.exclude_cgroups.is_empty()
            || self.runtime_cgroups.0
            || self.runtime_cgroups.1
        {
            flags |= FILTER_CGROUPS;
        }
        if self.has_names() {
            flags |= FILTER_NAMES;
        }
        flags
    }

    /// `FILTER_CGROUP_LEVELS`: the levels of the cgroup paths given.
    pub fn cgroup_levels(&self) -> u32 {
        self.include_cgroups
            .iter()
            .chain(&self.exclude_cgroups)
            .fold(0, |mask, c| mask | 1 << c.level)
    }

    /// What the name rules say about a process named `name` running
    /// `executable` (a path; its file name is matched).
    pub fn name_verdict(&self, name: &str, executable: Option<&str>) -> NameVerdict {
        let file = executable.map(|e| e.rsplit('/').next().unwrap_or(e));
        let matches = |rules: &[Regex]| {
            rules
                .iter()
                .any(|r| r.is_match(name) || file.is_some_and(|f| r.is_match(f)))
        };
        if matches(&self.exclude_names) {
            NameVerdict::Exclude
        } else if matches(&self.include_names) {
            NameVerdict::Include
        } else {
            NameVerdict::Neither
        }
    }

    /// False for a process an exclude-name rule matches (applied again at
    /// drain, for samples taken before the kernel learned the verdict).
    pub fn allows_name(&self, name: &str, executable: Option<&str>) -> bool {
        self.exclude_names.is_empty() || self.name_verdict(name, executable) != NameVerdict::Exclude
    }

    /// A short description for logs and titles.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                parts.push(format!("{what} {}", items.join(",")));
            }
        };
        add(
            "pid",
            self.include_pids.iter().map(u32::to_string).collect(),
        );
        add(
            "-pid",
            self.exclude_pids.iter().map(u32::to_string).collect(),
        );
        add(
            "name",
            self.include_names.iter().map(|r| r.to_string()).collect(),
        );
        add(
            "-name",
            self.exclude_names.iter().map(|r| r.to_string()).collect(),
        );
        add(
            "cgroup",
            self.include_cgroups
                .iter()
                .map(|c| c.path.clone())
                .collect(),
        );
        add(
            "-cgroup",
            self.exclude_cgroups
                .iter()
                .map(|c| c.path.clone())
                .collect(),
        );
        parts.extend(self.pods.describe());
        parts.join(" ")
    }
}

/// A change to the kernel filter at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterUpdate {
    /// Profile processes in this cgroup (v2 id; its own processes, not its
    /// subtree). Needs `runtime_cgroups.0` at load.
    IncludeCgroup(u64),
    /// Leave out processes in this cgroup. Needs `runtime_cgroups.1`.
    ExcludeCgroup(u64),
    /// Forget a cgroup fed earlier.
    RemoveCgroup(u64),
}

/// Feeds [`FilterUpdate`]s to the running sampler (applied within about
/// 100 ms by the process-event thread). Cloneable and `Send`.
#[derive(Debug, Clone)]
pub struct FilterHandle {
    pub(crate) updates: Sender<FilterUpdate>,
}

impl FilterHandle {
    /// False when the sampler has stopped.
    pub fn send(&self, update: FilterUpdate) -> bool {
        self.updates.send(update).is_ok()
    }
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        // ... mount-point ... - fstype source options
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Resolves a cgroup given as a directory of the v2 hierarchy or a path
/// relative to its mount (`system.slice/x.service`, or `/system.slice/...`
/// as in `/proc/<pid>/cgroup`).
fn resolve_cgroup(
    flag: &'static str,
    path: &str,
    mount: Option<&Path>,
) -> Result<Cgroup, FilterError> {
    let mount_text = mount.map_or(String::new(), |m| format!(" mounted at {}", m.display()));
    let given = Path::new(path);
    let mut candidates = Vec::new();
    if given.is_absolute() {
        candidates.push(given.to_path_buf());
    }
    if let Some(m) = mount.filter(|m| !given.starts_with(m)) {
        candidates.push(m.join(path.trim_start_matches('/')));
    }
    // A v2 directory first; else any directory, for the error message.
    let found = candidates
        .iter()
        .find(|c| c.is_dir() && fs_magic(c) == Some(CGROUP2_SUPER_MAGIC))
        .or_else(|| candidates.iter().find(|c| c.is_dir()));
    let Some(dir) = found.cloned() else {
        return Err(FilterError::NoSuchCgroup {
            flag,
            path: path.into(),
            mount: mount_text,
        });
    };
    match fs_magic(&dir) {
        Some(CGROUP2_SUPER_MAGIC) => {}
        Some(CGROUP_SUPER_MAGIC) => {
            return Err(match mount {
                Some(m) => FilterError::CgroupV1 {
                    flag,
                    path: path.into(),
                    mount: m.display().to_string(),
                },
                None => FilterError::NoCgroupV2 {
                    flag,
                    path: path.into(),
                },
            })
        }
        _ => {
            return Err(FilterError::NotCgroup {
                flag,
                path: path.into(),
            })
        }
    }
    let dir = dir.canonicalize().unwrap_or(dir);
    let level = match mount.and_then(|m| dir.strip_prefix(m).ok()) {
        Some(rel) => rel.components().count() as u32,
        // A cgroup2 mount other than the one we know (a container's own):
        // levels cannot be told; count from the first cgroup2 ancestor.
        None => dir
            .ancestors()
            .skip(1)
            .take_while(|a| fs_magic(a) == Some(CGROUP2_SUPER_MAGIC))
            .count() as u32,
    };
    if level == 0 {
        return Err(FilterError::RootCgroup {
            flag,
            path: path.into(),
        });
    }
    if level > FILTER_MAX_CGROUP_LEVEL {
        return Err(FilterError::TooDeep {
            flag,
            path: path.into(),
            depth: level,
            max: FILTER_MAX_CGROUP_LEVEL,
        });
    }
    let id = std::fs::metadata(&dir)
        .map_err(|_| FilterError::NoSuchCgroup {
            flag,
            path: path.into(),
            mount: mount_text,
        })?
        .ino();
    Ok(Cgroup {
        path: path.into(),
        dir,
        id,
        level,
    })
}

fn fs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid C string and a zeroed statfs to write into.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// The cgroup v2 path of `pid` relative to the hierarchy's root (the
/// `0::` line of `/proc/<pid>/cgroup`), if it has one.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(f: impl FnOnce(&mut FilterRules)) -> FilterRules {
        let mut r = FilterRules::default();
        f(&mut r);
        r
    }

    #[test]
    fn no_rules_no_kernel_checks() {
        let spec = FilterSpec::new(&FilterRules::default()).unwrap();
        assert!(spec.is_empty());
        assert_eq!(spec.kernel_flags(), 0);
        assert!(spec.allows_name("anything", None));
    }

    #[test]
    fn names_match_comm_or_executable_file_and_excludes_win() {
        let spec = FilterSpec::new(&rules(|r| {
            r.include_names = vec!["^post".into()];
            r.exclude_names = vec!["^postgres-bench$".into()];
        }))
        .unwrap();
        assert_eq!(spec.name_verdict("postgres", None), NameVerdict::Include);
        assert_eq!(
            spec.name_verdict("x", Some("/usr/lib/postgresql/bin/postmaster")),
            NameVerdict::Include
        );
        assert_eq!(
            spec.name_verdict("postgres-bench", None),
            NameVerdict::Exclude
        );
        assert_eq!(spec.name_verdict("nginx", None), NameVerdict::Neither);
        assert!(!spec.allows_name("postgres-bench", None));
        assert!(spec.allows_name("nginx", None));
        let flags = spec.kernel_flags();
        assert_eq!(flags, FILTER_INCLUDE | FILTER_PIDS | FILTER_NAMES);
    }

    #[test]
    fn a_bad_regex_names_the_flag() {
        let err = FilterSpec::new(&rules(|r| r.exclude_names = vec!["(".into()])).unwrap_err();
        assert!(err.to_string().contains("--exclude-name \"(\""), "{err}");
    }

    #[test]
    fn cgroups_resolve_relative_or_absolute_and_bad_paths_are_errors() {
        let Some(mount) = cgroup2_mount() else {
            panic!("no cgroup2 mount on this host");
        };
        let own = cgroup_of(std::process::id()).expect("own cgroup v2 path");
        let err = FilterSpec::new(&rules(|r| {
            r.include_cgroups = vec!["/no/such/hearth-cgroup".into()]
        }))
        .unwrap_err();
        assert!(matches!(err, FilterError::NoSuchCgroup { .. }), "{err}");
        let err = FilterSpec::new(&rules(|r| r.include_cgroups = vec!["/tmp".into()])).unwrap_err();
        assert!(matches!(err, FilterError::NotCgroup { .. }), "{err}");
        let err = FilterSpec::new(&rules(|r| {
            r.include_cgroups = vec![mount.display().to_string()]
        }))
        .unwrap_err();
        assert!(matches!(err, FilterError::RootCgroup { .. }), "{err}");
        // A v1 controller directory, where the host has one.
        if let Some(v1) = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"]
            .into_iter()
            .find(|p| fs_magic(Path::new(p)) == Some(CGROUP_SUPER_MAGIC))
        {
            let err = FilterSpec::new(&rules(|r| r.exclude_cgroups = vec![v1.into()])).unwrap_err();
            assert!(matches!(err, FilterError::CgroupV1 { .. }), "{err}");
        }
        if own != "/" {
            let relative =
                FilterSpec::new(&rules(|r| r.include_cgroups = vec![own.clone()])).unwrap();
            let absolute = mount.join(own.trim_start_matches('/'));
            let c = &relative.include_cgroups[0];
            assert_eq!(c.dir, absolute.canonicalize().unwrap());
            assert_eq!(c.level as usize, Path::new(&own).components().count() - 1);
            assert_eq!(relative.cgroup_levels(), 1 << c.level);
        }
    }
}
