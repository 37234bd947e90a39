//! The `churn` fixture (`tests/fixtures/churn.c`): a parent that starts
//! short-lived children, each burning a few tens of milliseconds of CPU in
//! its own work function and exiting, for the tests of processes gone
//! before the drain (symbolization, metadata).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::build_c_fixture;

/// How to run churn.
#[derive(Debug, Clone)]
pub struct Churn<'a> {
    /// gcc flags (`-static` is added).
    pub flags: &'a [&'a str],
    /// How long the parent starts children.
    pub seconds: u32,
    /// Children started per second.
    pub rate: u32,
    /// CPU time each child burns in its work function.
    pub work_ms: u32,
    /// Added to the parent's environment, which the children inherit.
    pub env: &'a [(&'a str, &'a str)],
    /// A cgroup directory the parent enters before it starts (its
    /// children are born in it).
    pub cgroup: Option<&'a Path>,
    /// The children work in the forked copy of the parent, without
    /// exec'ing (named like it: [`PARENT_NAME`]); else they exec a copy
    /// of it ([`CHILD_NAME`]).
    pub fork_only: bool,
}

/// The parent's process name, and the forked-only children's.
pub const PARENT_NAME: &str = "churn";
/// The exec'd children's process name.
pub const CHILD_NAME: &str = "churn_child";

impl Default for Churn<'_> {
    fn default() -> Self {
        Churn {
            flags: &[],
            seconds: 4,
            rate: 30,
            work_ms: 20,
            env: &[],
            cgroup: None,
            fork_only: false,
        }
    }
}

impl Churn<'_> {
    /// Builds churn into `dir` and starts it; returns the running parent
    /// (its stdout piped for [`children`]). The children are a copy of it
    /// (another file, so nothing of the parent's is reused for them).
    /// Linked statically: a dynamic loader's start-up (about a millisecond
    /// of a 20 ms life, in a stripped ld.so) would be samples no profiler
    /// can name. At nice -10, so the children get their CPU time while the
    /// profiler runs even on a busy machine.
    pub fn start(&self, dir: &Path) -> Child {
        let mut flags = self.flags.to_vec();
        flags.push("-static");
        let exe = build_c_fixture(PARENT_NAME, &flags, dir);
        let child_exe = dir.join(CHILD_NAME);
        std::fs::copy(&exe, &child_exe).expect("copying the child executable");
        let child = if self.fork_only {
            "fork".to_string()
        } else {
            child_exe.to_str().unwrap().to_string()
        };
        let mut command = match self.cgroup {
            // `echo 0` moves the writing shell itself, which then execs.
            Some(cgroup) => {
                let mut c = Command::new("sh");
                c.args(["-c", "echo 0 > \"$0/cgroup.procs\" && exec \"$@\""])
                    .arg(cgroup)
                    .arg("nice");
                c
            }
            None => Command::new("nice"),
        };
        command
            .args(["-n", "-10"])
            .arg(&exe)
            .args([
                self.seconds.to_string(),
                self.rate.to_string(),
                child,
                self.work_ms.to_string(),
            ])
            .envs(self.env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting churn")
    }
}

/// Waits for churn (every child is reaped once it returns) and returns
/// each child's pid → its work function.
pub fn children(mut churn: Child) -> HashMap<u32, String> {
    let mut out = String::new();
    churn
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(churn.wait().unwrap().success());
    assert!(out.ends_with("done\n"), "{out}");
    out.lines()
        .filter_map(|l| {
            let (pid, k) = l.split_once(' ')?;
            Some((pid.parse().ok()?, format!("churn_work_{k}")))
        })
        .collect()
}
