//! Checks made before loading anything, so a missing privilege or kernel
//! feature is a clear message instead of an EPERM from deep inside a load.

use std::path::Path;

use super::BpfError;

/// Sampling needs the capabilities in [`crate::caps::REQUIRED`]; the error
/// names each missing one and what it is for. Missing optional ones are
/// logged.
pub fn check_privileges() -> Result<(), BpfError> {
    crate::caps::check_current().map_err(BpfError::Privileges)
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
