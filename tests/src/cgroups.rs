//! Real cgroups shaped like container runtimes' (kubepods, Docker,
//! systemd), in the v2 hierarchy and the v1 ones, for the metadata tests.
//! Every directory is created under a test-unique prefix and removed
//! again when the [`Cgroups`] guard drops, also when the test fails: its
//! processes are moved back to the root first.

use std::path::{Path, PathBuf};

/// Where the hierarchies are mounted on these machines (hybrid: v1
/// controllers plus v2 at `unified`).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Cgroups created by one test; removed on drop.
pub struct Cgroups {
    prefix: String,
    /// Every directory created, parents before children.
    created: Vec<PathBuf>,
}

impl Cgroups {
    /// A guard whose cgroups live under `<hierarchy>/<prefix>/…`.
    pub fn new(test: &str) -> Cgroups {
        Cgroups {
            prefix: format!("hearth-test-{test}-{}", std::process::id()),
            created: Vec::new(),
        }
    }

    /// Creates `<root>/<hierarchy>/<prefix><path>` (with parents) and
    /// returns the cgroup path a process in it shows in
    /// `/proc/<pid>/cgroup`. `hierarchy` is `unified` (v2), a controller
    /// such as `pids` (v1), or `systemd` (v1 `name=systemd`).
    pub fn create(&mut self, hierarchy: &str, path: &str) -> PathBuf {
        let base = Path::new(CGROUP_ROOT).join(hierarchy);
        assert!(
            base.join("cgroup.procs").exists(),
            "{} is not a mounted cgroup hierarchy",
            base.display()
        );
        let mut dir = base.join(&self.prefix);
        self.make(&dir);
        for component in path.split('/').filter(|c| !c.is_empty()) {
            dir = dir.join(component);
            self.make(&dir);
        }
        dir
    }

    fn make(&mut self, dir: &Path) {
        if self.created.iter().any(|d| d == dir) {
            return;
        }
        match std::fs::create_dir(dir) {
            Ok(()) => self.created.push(dir.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Left over by an earlier run of this test (same pid is
                // unlikely but possible); still ours to remove.
                self.created.push(dir.to_path_buf());
            }
            Err(e) => panic!(
                "creating cgroup {}: {e} (the tests run as root)",
                dir.display()
            ),
        }
    }

    /// Moves `pid` into the cgroup directory `dir`.
    pub fn enter(dir: &Path, pid: u32) {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
    }

    /// The cgroup path of `dir` as `/proc/<pid>/cgroup` shows it.
    pub fn path_of(dir: &Path) -> String {
        let rel = dir
            .strip_prefix(CGROUP_ROOT)
            .expect("a cgroup directory under /sys/fs/cgroup");
        // Drop the hierarchy's own directory name.
        let mut components = rel.components();
        components.next();
        format!("/{}", components.as_path().display())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // Processes still inside (a fixture that outlived the test) go
            // back to the root of the hierarchy, or rmdir fails with EBUSY.
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                let root = dir
                    .ancestors()
                    .find(|a| a.parent() == Some(Path::new(CGROUP_ROOT)))
                    .map(Path::to_path_buf);
                for pid in procs.split_whitespace() {
                    if let Some(root) = &root {
                        let _ = std::fs::write(root.join("cgroup.procs"), pid);
                    }
                }
            }
            // A process that just exited can keep the cgroup busy for a
            // moment.
            for attempt in 0..20 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 19 => {
                        eprintln!("warning: cannot remove cgroup {}: {e}", dir.display())
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            }
        }
    }
}
