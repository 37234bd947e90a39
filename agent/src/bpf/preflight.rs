//! Checks made before loading anything, so a missing privilege or kernel
//! feature is a clear message instead of an EPERM from deep inside a load.

use std::path::Path;

use super::BpfError;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process, from `/proc/self/status`.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Loading and attaching needs CAP_BPF and CAP_PERFMON (Linux 5.8+), or
/// CAP_SYS_ADMIN which implies both.
pub fn check_privileges() -> Result<(), BpfError> {
    missing_privileges(effective_caps())
}

fn missing_privileges(caps: u64) -> Result<(), BpfError> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BpfError::Privileges {
            missing: missing.join(" and "),
        })
    }
}

/// The programs read kernel structures through BTF-typed helpers
/// (`bpf_get_current_task_btf`), which need the kernel's BTF.
pub fn check_btf(path: &Path) -> Result<(), BpfError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(BpfError::NoBtf {
            path: path.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability() {
        let err = missing_privileges(0).unwrap_err().to_string();
        assert!(err.contains("CAP_BPF and CAP_PERFMON"), "{err}");
        let err = missing_privileges(1 << CAP_BPF).unwrap_err().to_string();
        assert!(
            err.contains("CAP_PERFMON") && !err.contains("CAP_BPF "),
            "{err}"
        );
        assert!(missing_privileges((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_ok());
        assert!(missing_privileges(1 << CAP_SYS_ADMIN).is_ok());
    }

    #[test]
    fn missing_btf_is_a_clear_error() {
        let err = check_btf(Path::new("/nonexistent/vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BTF") && err.contains("/nonexistent/vmlinux"),
            "{err}"
        );
    }
}
