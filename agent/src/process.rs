//! Process metadata: the name and executable of each sampled process.
//!
//! Entries are keyed by pid and checked against the process start time once
//! per window, so a reused pid never inherits another process's metadata.
//! Processes that exited before we looked are named after the thread name
//! the kernel recorded with the sample.

use std::collections::HashMap;
use std::sync::Arc;

use crate::metadata::{MetadataResolver, Resolved};
use crate::profile::Process;

#[derive(Debug)]
struct Entry {
    start_time: u64,
    process: Process,
    /// Where `process.metadata` came from, to look its pod up again.
    resolved: Resolved,
    /// Window in which the start time was last confirmed.
    checked_in: u64,
}

/// Cache of [`Process`] metadata by pid.
#[derive(Debug, Default)]
pub struct ProcessTable {
    entries: HashMap<u32, Entry>,
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

    /// Metadata of `pid`. `thread_comm` names the process when /proc no
    /// longer has it.
    pub fn lookup(&mut self, pid: u32, thread_comm: &str) -> Process {
        if let Some(entry) = self.entries.get(&pid) {
            if entry.checked_in == self.window {
                return entry.process.clone();
            }
        }
        let Some(start_time) = start_time(pid) else {
            // Exited: keep what we knew, else fall back to the thread name.
            return match self.entries.get(&pid) {
                Some(entry) => entry.process.clone(),
                None => Process {
                    pid,
                    name: thread_comm.into(),
                    executable: None,
                    metadata: Default::default(),
                },
            };
        };
        let window = self.window;
        if let Some(entry) = self.entries.get_mut(&pid) {
            if entry.start_time == start_time {
                entry.checked_in = window;
                if self.metadata.refresh(&mut entry.resolved) {
                    entry.process.metadata = entry.resolved.metadata.clone();
                }
                return entry.process.clone();
            }
        }
        let mut process = read_process(pid, thread_comm);
        let resolved = self
            .metadata
            .resolve(pid, &process.name, process.executable.as_deref());
        process.metadata = resolved.metadata.clone();
        self.entries.insert(
            pid,
            Entry {
                start_time,
                process: process.clone(),
                resolved,
                checked_in: window,
            },
        );
        process
    }

    /// Forgets processes that were not seen in this window and have exited.
    pub fn end_window(&mut self) {
        let window = self.window;
        self.entries
            .retain(|&pid, e| e.checked_in == window || start_time(pid).is_some());
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
    Process {
        pid,
        name: name.into(),
        executable,
        metadata: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_this_process() {
        let mut table = ProcessTable::new();
        let me = table.lookup(std::process::id(), "fallback");
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
        let gone = table.lookup(u32::MAX - 1, "short-lived");
        assert_eq!(&*gone.name, "short-lived");
        assert!(gone.executable.is_none());
        table.end_window();
        assert!(table.is_empty());
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
