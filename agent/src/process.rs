//! Process metadata: the name and executable of each sampled process, and
//! what [`MetadataResolver`] adds (container, Kubernetes, service, tags).
//!
//! Entries are keyed by [`ProcessKey`] (pid and which incarnation), so a
//! reused pid never inherits another process's metadata: an image captured
//! at its exec is named from that capture, even once it is gone; a process
//! whose exec was not seen is read from /proc under its start time (the
//! pipeline resolves it once per window). Processes that exited before we
//! looked are named after the thread name the kernel recorded with the
//! sample. Container, environment and ids are read from /proc at drain
//! while the pid still belongs to the same process (never from a reused
//! pid: a process can be moved into its container's cgroup after its
//! capture, so the living process is read again); once it is gone, they
//! come from the capture if it read them (at the image's first sample, so
//! a process that lived less than a drain interval keeps its container,
//! pod and service attributes). Either way the pod is looked up at drain, and again
//! while it is not found ([`MetadataResolver::refresh`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::incarnation::{Capture, Image, ProcessKey};
use crate::metadata::{MetadataResolver, Resolved};
use crate::profile::Process;

#[derive(Debug)]
struct Entry {
    process: Process,
    /// Where `process.metadata` came from, to look its pod up again.
    resolved: Resolved,
    /// Window in which it was last looked up.
    seen_in: u64,
}

/// Cache of [`Process`] metadata by process image.
#[derive(Debug, Default)]
pub struct ProcessTable {
    entries: HashMap<ProcessKey, Entry>,
    window: u64,
    metadata: MetadataResolver,
}

impl ProcessTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table that tags processes with what `metadata` resolves.
    pub fn with_metadata(metadata: MetadataResolver) -> Self {
        Self {
            metadata,
            ..Self::default()
        }
    }

    /// Metadata of `key`. `capture` is what was read of the image at its
    /// exec, if it was; `thread_comm` names the process when nothing else
    /// does.
    pub fn lookup(
        &mut self,
        key: ProcessKey,
        thread_comm: &str,
        capture: Option<&Capture>,
    ) -> Process {
        let window = self.window;
        if let Some(entry) = self.entries.get_mut(&key) {
            if entry.seen_in != window {
                entry.seen_in = window;
                // Its pod may have shown up since.
                if self.metadata.refresh(&mut entry.resolved) {
                    entry.process.metadata = entry.resolved.metadata.clone();
                }
            }
            return entry.process.clone();
        }
        let mut process = match (key.image, capture) {
            (Image::Exec(_) | Image::Forked(_), Some(capture)) => {
                Process::new(key.pid, capture.name.as_str(), capture.executable.clone())
            }
            (Image::Started(_), _) => read_process(key.pid, thread_comm),
            _ => Process::new(key.pid, thread_comm, None),
        };
        let executable = process.executable.clone();
        // /proc/<pid> still shows this process (not a successor on a
        // reused pid) when its start time is the one the key or capture
        // has.
        let now = start_time(key.pid);
        let same_process = now.is_some()
            && match key.image {
                Image::Started(ticks) => now == Some(ticks),
                Image::Exec(_) | Image::Forked(_) => capture.and_then(|c| c.start_ticks) == now,
                Image::Unknown => false,
            };
        let captured = match key.image {
            Image::Exec(_) | Image::Forked(_) => capture.and_then(|c| c.facts.clone()),
            _ => None,
        };
        let resolved = match captured {
            // While it lives, /proc is read now: a process can be moved
            // into its container's cgroup after it started (and after its
            // capture). The facts read at capture serve once it is gone.
            _ if same_process => {
                self.metadata
                    .resolve(key.pid, &process.name, executable.as_deref())
            }
            Some(facts) => self.metadata.compose(facts),
            None => self
                .metadata
                .resolve_gone(&process.name, executable.as_deref()),
        };
        process.metadata = resolved.metadata.clone();
        self.entries.insert(
            key,
            Entry {
                process: process.clone(),
                resolved,
                seen_in: window,
            },
        );
        process
    }

    /// Whether a pod exclude rule picks the pod of `key` (looked up
    /// before): its samples taken before the kernel learned it are dropped.
    pub fn excluded_by_pod(&self, key: ProcessKey) -> bool {
        self.entries
            .get(&key)
            .is_some_and(|e| e.resolved.pod_verdict == crate::filter::PodVerdict::Exclude)
    }

    /// Drops an image whose samples are all drained.
    pub fn forget(&mut self, key: ProcessKey) {
        self.entries.remove(&key);
    }

    /// Forgets processes that were not seen in this window and are gone:
    /// started ones whose pid now has another start time (or none),
    /// unknown ones. Captured images go when the pipeline forgets them.
    pub fn end_window(&mut self) {
        let window = self.window;
        self.entries.retain(|key, e| {
            e.seen_in == window
                || match key.image {
                    Image::Started(_) => key.start_ticks_match(start_time(key.pid)),
                    Image::Exec(_) | Image::Forked(_) => true,
                    Image::Unknown => false,
                }
        });
        self.window += 1;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), or `None` when the process is gone.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields
    // are counted after its closing parenthesis.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn read_process(pid: u32, thread_comm: &str) -> Process {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| thread_comm.to_string());
    let executable = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| Arc::from(p.to_string_lossy().as_ref()));
    Process::new(pid, name, executable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(pid: u32) -> ProcessKey {
        ProcessKey::new(pid, Image::Started(start_time(pid).unwrap()))
    }

    #[test]
    fn looks_up_this_process() {
        let mut table = ProcessTable::new();
        let me = table.lookup(live(std::process::id()), "fallback", None);
        assert_eq!(me.pid, std::process::id());
        assert_ne!(&*me.name, "fallback");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.executable.as_deref(), exe.to_str());
        assert!(start_time(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn exited_process_is_named_after_its_thread() {
        let mut table = ProcessTable::new();
        // Beyond pid_max (at most 2^22), so never a live process.
        let gone = table.lookup(
            ProcessKey::new(u32::MAX - 1, Image::Unknown),
            "short-lived",
            None,
        );
        assert_eq!(&*gone.name, "short-lived");
        assert!(gone.executable.is_none());
        table.end_window();
        table.end_window();
        assert!(table.is_empty());
    }

    #[test]
    fn captured_images_keep_their_names_until_forgotten() {
        let mut table = ProcessTable::new();
        let first = crate::incarnation::fake_capture(4242, 100, "first");
        let second = crate::incarnation::fake_capture(4242, 200, "second");
        let a = table.lookup(first.key(), "x", Some(&first));
        let b = table.lookup(second.key(), "x", Some(&second));
        assert_eq!((&*a.name, &*b.name), ("first", "second"));
        assert_eq!(b.executable.as_deref(), Some("/usr/bin/second"));
        table.end_window();
        table.end_window();
        assert_eq!(table.len(), 2);
        table.forget(first.key());
        assert_eq!(table.len(), 1);
    }

    /// A capture of `pid` carrying `facts`.
    fn captured(
        pid: u32,
        start_ticks: Option<u64>,
        facts: Option<crate::metadata::Facts>,
    ) -> Capture {
        let fake = crate::incarnation::fake_capture(pid, 100, "short");
        Capture {
            start_ticks,
            facts: facts.map(Arc::new),
            ..Arc::try_unwrap(fake).unwrap()
        }
    }

    #[test]
    fn captured_facts_tag_a_process_gone_before_the_drain() {
        use crate::metadata::{FactsReader, ReadOptions};
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("OTEL_SERVICE_NAME", "checkout")
            .spawn()
            .unwrap();
        let pid = child.id();
        crate::metadata::tests::wait_for_environ(pid);
        let ticks = start_time(pid);
        let facts = FactsReader::new(ReadOptions::default()).read(pid, "sleep", None);
        child.kill().unwrap();
        child.wait().unwrap();
        let mut table = ProcessTable::new();
        let with = captured(pid, ticks, Some(facts));
        let m = table.lookup(with.key(), "x", Some(&with)).metadata;
        assert_eq!(m.get_str("service.name"), Some("checkout"));
        assert_eq!(
            m.get("process.parent_pid"),
            Some(&crate::profile::AttrValue::Int(std::process::id().into()))
        );
        // Captured without facts: only what needs no /proc.
        let without = captured(pid, ticks, None);
        table.forget(without.key());
        let m = table.lookup(without.key(), "x", Some(&without)).metadata;
        assert_eq!(m.get_str("service.name"), Some("short"));
        assert!(m.get("process.parent_pid").is_none());
    }

    #[test]
    fn a_gone_process_finds_its_pod_from_captured_facts() {
        use crate::metadata::tests::{facts, ID};
        use crate::metadata::{MetadataOptions, PodIndex};
        let pods = PodIndex::new();
        let mut table = ProcessTable::with_metadata(MetadataResolver::new(MetadataOptions {
            pods: Some(pods.clone()),
            ..MetadataOptions::default()
        }));
        // Beyond pid_max: never a live process.
        let capture = captured(u32::MAX - 1, Some(1), Some(facts(&[], None)));
        let lookup = |table: &mut ProcessTable| {
            table
                .lookup(capture.key(), "x", Some(&capture))
                .metadata
                .clone()
        };
        let m = lookup(&mut table);
        assert_eq!(m.get_str("container.id"), Some(ID));
        assert_eq!(m.get_str("k8s.pod.uid"), Some("uid-1"));
        assert_eq!(m.get_str("k8s.pod.name"), None);
        // The pod shows up after the process is gone: the next window
        // looks it up again.
        let pod = serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
            "spec": {"containers": [{"name": "app", "image": "x:1"}]},
            "status": {"containerStatuses": [{"name": "app",
                "containerID": format!("containerd://{ID}"),
                "image": "x:1", "imageID": "", "ready": true, "restartCount": 0}]}
        });
        pods.apply(
            kube::runtime::watcher::Event::Apply(serde_json::from_value(pod).unwrap()),
            &[],
        );
        table.end_window();
        let m = lookup(&mut table);
        assert_eq!(m.get_str("k8s.pod.name"), Some("p"));
        assert_eq!(m.get_str("k8s.container.name"), Some("app"));
        assert_eq!(m.get_str("service.name"), Some("p"));
    }

    #[test]
    fn start_time_is_gone_once_the_process_exits() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(start_time(pid).is_some());
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(start_time(pid).is_none());
    }
}
