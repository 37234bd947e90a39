//! Linux capabilities: which feature needs which, and the start-up check
//! that names what is missing before anything is loaded.
//!
//! hearth does not need to be root. Sampling (`hearth record`, `hearth run`,
//! `hearth top --live`) needs [`REQUIRED`]: without one of them it would
//! either fail deep inside a BPF load with a bare EPERM or, for
//! CAP_SYS_PTRACE, record stacks it cannot name, so it stops at once with
//! a message that lists each missing capability and what it is for. The
//! [`OPTIONAL`] ones each unlock a part of symbolization; without them the
//! agent runs and says, once, what will be missing. The table in README
//! ("Capabilities") is the same list; the tests run the binary as a
//! non-root user with exactly these sets.

use std::fmt;

use tracing::warn;

/// A Linux capability hearth cares about, by its number in
/// `linux/capability.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    DacReadSearch = 2,
    SysPtrace = 19,
    SysAdmin = 21,
    Syslog = 34,
    Perfmon = 38,
    Bpf = 39,
    CheckpointRestore = 40,
}

impl Capability {
    /// The name as in capabilities(7), e.g. `CAP_BPF`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Syslog => "CAP_SYSLOG",
            Capability::Perfmon => "CAP_PERFMON",
            Capability::Bpf => "CAP_BPF",
            Capability::CheckpointRestore => "CAP_CHECKPOINT_RESTORE",
        }
    }

    fn bit(self) -> u64 {
        1 << (self as u32)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A capability and what hearth uses it for.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub cap: Capability,
    /// What it is for, phrased to follow the capability's name.
    pub purpose: &'static str,
    /// What a run without it (optional ones only) cannot do.
    pub without: &'static str,
}

/// Needed to sample at all.
pub const REQUIRED: &[Need] = &[
    Need {
        cap: Capability::Bpf,
        purpose: "load the eBPF programs and create and read their maps",
        without: "",
    },
    Need {
        cap: Capability::Perfmon,
        purpose: "open a CPU-clock perf event on every CPU and attach the sched_switch and \
                  sys_exit tracing programs that read stacks",
        without: "",
    },
    Need {
        cap: Capability::SysPtrace,
        purpose: "read /proc/<pid>/maps, exe and root of other users' processes, to name \
                  their executables and functions",
        without: "",
    },
];

/// Each makes symbolization more complete; the agent runs without them.
pub const OPTIONAL: &[Need] = &[
    Need {
        cap: Capability::Syslog,
        purpose: "read the real kernel addresses in /proc/kallsyms",
        without: "kernel frames show as [unknown] (when kernel.kptr_restrict or \
                  kernel.perf_event_paranoid >= 2 hide the addresses, as here)",
    },
    Need {
        cap: Capability::CheckpointRestore,
        purpose: "open mapped files through /proc/<pid>/map_files",
        without: "binaries deleted or replaced since their process started (upgraded \
                  packages, rebuilt programs) are not symbolized",
    },
    Need {
        cap: Capability::DacReadSearch,
        purpose: "read executables and libraries whatever their file permissions",
        without: "executables and libraries the agent's user may not read are not symbolized",
    },
];

/// A set of capabilities, as the `CapEff` mask of `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// The effective set of this process. An unreadable status file reads
    /// as no capabilities, so the check fails with names, not a panic.
    pub fn current() -> CapSet {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| CapSet::from_status(&status))
            .unwrap_or(CapSet(0))
    }

    /// The `CapEff:` line of a `/proc/<pid>/status` text.
    pub fn from_status(status: &str) -> Option<CapSet> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .map(CapSet)
    }

    /// Whether the kernel would grant what `cap` guards. CAP_SYS_ADMIN
    /// also passes the checks for CAP_BPF and CAP_PERFMON (the kernel's
    /// `bpf_capable`/`perfmon_capable`, and the only way on kernels before
    /// 5.8, which lack those two) and for CAP_CHECKPOINT_RESTORE.
    pub fn allows(self, cap: Capability) -> bool {
        let implied_by_admin = matches!(
            cap,
            Capability::Bpf | Capability::Perfmon | Capability::CheckpointRestore
        );
        self.0 & cap.bit() != 0 || (implied_by_admin && self.0 & Capability::SysAdmin.bit() != 0)
    }
}

/// Required capabilities the process lacks; the message names each one
/// and what it is for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct MissingCapabilities {
    pub missing: Vec<Capability>,
}

impl fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "missing capabilities: ")?;
        for (i, cap) in self.missing.iter().enumerate() {
            let purpose = REQUIRED
                .iter()
                .find(|n| n.cap == *cap)
                .map_or("", |n| n.purpose);
            let sep = if i == 0 { "" } else { "; " };
            write!(f, "{sep}{cap} (to {purpose})")?;
        }
        let all: Vec<&str> = REQUIRED.iter().map(|n| n.cap.name()).collect();
        write!(
            f,
            ". Sampling needs {}: run as root, or grant them (kernels before 5.8 have no \
             CAP_BPF/CAP_PERFMON: CAP_SYS_ADMIN stands in for both). See README, \"Capabilities\"",
            all.join(", ")
        )
    }
}

/// Checks `caps` against [`REQUIRED`]; on success returns the
/// [`OPTIONAL`] needs it does not meet.
pub fn check(caps: CapSet) -> Result<Vec<&'static Need>, MissingCapabilities> {
    let missing: Vec<Capability> = REQUIRED
        .iter()
        .filter(|n| !caps.allows(n.cap))
        .map(|n| n.cap)
        .collect();
    if !missing.is_empty() {
        return Err(MissingCapabilities { missing });
    }
    Ok(OPTIONAL.iter().filter(|n| !caps.allows(n.cap)).collect())
}

/// The start-up check of every sampling command: fails on a missing
/// required capability and warns once per missing optional one that would
/// change the result here.
pub fn check_current() -> Result<(), MissingCapabilities> {
    for need in check(CapSet::current())? {
        if need.cap == Capability::Syslog && kallsyms_shows_addresses() {
            // This kernel shows kallsyms addresses to everyone.
            continue;
        }
        warn!(
            capability = need.cap.name(),
            "without {} (to {}): {}", need.cap, need.purpose, need.without
        );
    }
    Ok(())
}

/// Whether /proc/kallsyms shows real addresses to this process.
fn kallsyms_shows_addresses() -> bool {
    use std::io::BufRead;
    let Ok(file) = std::fs::File::open("/proc/kallsyms") else {
        return false;
    };
    let mut line = String::new();
    if std::io::BufReader::new(file).read_line(&mut line).is_err() {
        return false;
    }
    line.split_ascii_whitespace()
        .next()
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .is_some_and(|a| a != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(caps: &[Capability]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, c| m | c.bit()))
    }

    const ALL_REQUIRED: [Capability; 3] =
        [Capability::Bpf, Capability::Perfmon, Capability::SysPtrace];

    #[test]
    fn names_each_missing_capability_and_its_purpose() {
        let err = check(CapSet(0)).unwrap_err();
        assert_eq!(err.missing, ALL_REQUIRED);
        let text = err.to_string();
        for cap in [
            "CAP_BPF (to load",
            "CAP_PERFMON (to open",
            "CAP_SYS_PTRACE (to read",
        ] {
            assert!(text.contains(cap), "{text}");
        }

        let err = check(set(&[Capability::Bpf, Capability::Perfmon])).unwrap_err();
        assert_eq!(err.missing, [Capability::SysPtrace]);
        let text = err.to_string();
        assert!(
            text.starts_with("missing capabilities: CAP_SYS_PTRACE (to read /proc/<pid>/maps"),
            "{text}"
        );
        assert!(!text.contains("CAP_BPF (to"), "{text}");
    }

    #[test]
    fn required_set_passes_and_reports_the_optional_ones() {
        let optional = check(set(&ALL_REQUIRED)).unwrap();
        let names: Vec<Capability> = optional.iter().map(|n| n.cap).collect();
        assert_eq!(
            names,
            [
                Capability::Syslog,
                Capability::CheckpointRestore,
                Capability::DacReadSearch
            ]
        );
        let mut everything = ALL_REQUIRED.to_vec();
        everything.extend(OPTIONAL.iter().map(|n| n.cap));
        assert!(check(set(&everything)).unwrap().is_empty());
        // Root's full set (all 41 bits, as CapEff shows on 5.9+ kernels).
        assert!(check(CapSet((1 << 41) - 1)).unwrap().is_empty());
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_perfmon_and_checkpoint_restore() {
        let optional = check(set(&[Capability::SysAdmin, Capability::SysPtrace])).unwrap();
        assert!(optional
            .iter()
            .all(|n| n.cap != Capability::CheckpointRestore));
        // ...but not for CAP_SYS_PTRACE.
        let err = check(set(&[Capability::SysAdmin])).unwrap_err();
        assert_eq!(err.missing, [Capability::SysPtrace]);
    }

    #[test]
    fn reads_the_effective_set_from_status() {
        let status = "Name:\thearth\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000000c000080000\nCapBnd:\t000001ffffffffff\n";
        let caps = CapSet::from_status(status).unwrap();
        assert_eq!(caps, set(&ALL_REQUIRED));
        assert!(CapSet::from_status("Name:\tx\n").is_none());
        // This process's own set parses (whatever it holds).
        assert!(
            CapSet::from_status(&std::fs::read_to_string("/proc/self/status").unwrap()).is_some()
        );
    }
}
