//! Turns drained windows into profiles: symbolizes every stack once per
//! window and attaches process metadata. The one place where the raw
//! kernel view becomes the [`Profile`] model.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::bpf::{RawSample, RawWindow};
use crate::metadata::MetadataResolver;
use crate::process::ProcessTable;
use crate::profile::{
    Frame, FrameId, FrameKind, OffCpuReason, OffCpuSettings, Profile, ProfileBuilder, ProfileMeta,
    SampleKind,
};
use crate::symbolize::Symbolize;

/// The profiles of one window.
#[derive(Debug, Clone)]
pub struct WindowProfiles {
    /// On-CPU samples (empty when on-CPU sampling was off).
    pub on_cpu: Profile,
    /// Off-CPU time, when it was recorded.
    pub off_cpu: Option<Profile>,
}

/// Converts windows to profiles; owns the caches that live across windows.
pub struct WindowProcessor<S> {
    symbolizer: S,
    processes: ProcessTable,
    hostname: String,
}

/// Symbolized stacks of one window, each distinct stack symbolized once
/// however many threads share it.
#[derive(Default)]
struct StackCache {
    kernel: HashMap<u32, Vec<FrameId>>,
    blocked: HashMap<u64, Vec<FrameId>>,
    user: HashMap<(u32, u64), Vec<FrameId>>,
}

impl<S: Symbolize> WindowProcessor<S> {
    pub fn new(symbolizer: S) -> Self {
        Self {
            symbolizer,
            processes: ProcessTable::new(),
            hostname: hostname(),
        }
    }

    /// A processor that tags processes with what `metadata` resolves
    /// (container, Kubernetes, service, tags).
    pub fn with_metadata(symbolizer: S, metadata: MetadataResolver) -> Self {
        Self {
            symbolizer,
            processes: ProcessTable::with_metadata(metadata),
            hostname: hostname(),
        }
    }

    pub fn symbolizer(&self) -> &S {
        &self.symbolizer
    }

    /// Symbolizes and tags one window. `off_cpu` says how off-CPU time was
    /// recorded; `None` when it was not.
    pub fn process(
        &mut self,
        window: &RawWindow,
        frequency_hz: u64,
        off_cpu: Option<OffCpuSettings>,
    ) -> WindowProfiles {
        let meta = |kind, frequency_hz| ProfileMeta {
            kind,
            start: window.start,
            duration: window.end.duration_since(window.start).unwrap_or_default(),
            frequency_hz,
            hostname: self.hostname.clone(),
        };
        let mut on_cpu = ProfileBuilder::new(meta(SampleKind::OnCpu, frequency_hz));
        // Off-CPU time is not sampled at a frequency.
        let mut off = off_cpu.map(|s| (s, ProfileBuilder::new(meta(SampleKind::OffCpu(s), 0))));
        let mut on_cpu_stacks = StackCache::default();
        let mut off_cpu_stacks = StackCache::default();
        let mut frames = Vec::new();
        for sample in &window.samples {
            let (builder, stacks, count, reason) = match (&sample.off_cpu, &mut off) {
                (None, _) => (&mut on_cpu, &mut on_cpu_stacks, sample.count, None),
                (Some(wait), Some((settings, builder))) => (
                    builder,
                    &mut off_cpu_stacks,
                    scale_up(wait.blocked_ns, settings.followed_per_million),
                    Some(if wait.involuntary {
                        OffCpuReason::Involuntary
                    } else {
                        OffCpuReason::Voluntary
                    }),
                ),
                // Off-CPU samples without off-CPU settings cannot happen:
                // the programs are attached only with them.
                (Some(_), None) => continue,
            };
            frames.clear();
            self.stack_frames(window, sample, builder, stacks, &mut frames);
            let process = self.processes.lookup(sample.tgid, &sample.comm);
            let process = builder.intern_process(&process);
            let last_seen_unix_ns = sample
                .last_seen
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            builder.add_off_cpu_sample(
                process,
                sample.tid,
                Arc::from(sample.comm.as_str()),
                frames.clone(),
                count,
                last_seen_unix_ns,
                reason,
            );
        }
        self.symbolizer.end_window();
        self.processes.end_window();
        WindowProfiles {
            on_cpu: on_cpu.build(),
            off_cpu: off.map(|(_, builder)| builder.build()),
        }
    }

    /// Appends the sample's frames, leaf first: its kernel stack (where it
    /// was interrupted, or where it blocked), then its user stack.
    fn stack_frames(
        &mut self,
        window: &RawWindow,
        sample: &RawSample,
        builder: &mut ProfileBuilder,
        cache: &mut StackCache,
        frames: &mut Vec<FrameId>,
    ) {
        let lost_kernel = |b: &mut ProfileBuilder| {
            vec![b.intern_frame(&Frame::named("[lost kernel stack]", FrameKind::Kernel))]
        };
        if let Some(wait) = &sample.off_cpu {
            if wait.blocked_stack != 0 {
                let stack = cache
                    .blocked
                    .entry(wait.blocked_stack)
                    .or_insert_with(|| match window.stacks.get(&wait.blocked_stack) {
                        Some(raw) => {
                            let mut out = Vec::new();
                            self.symbolizer.kernel_stack(&raw.ips, builder, &mut out);
                            out
                        }
                        None => lost_kernel(builder),
                    });
                frames.extend_from_slice(stack);
            }
        } else if let Some(id) = sample.kernel_stack {
            let stack =
                cache
                    .kernel
                    .entry(id)
                    .or_insert_with(|| match window.kernel_stacks.get(&id) {
                        Some(ips) => {
                            let mut out = Vec::new();
                            self.symbolizer.kernel_stack(ips, builder, &mut out);
                            out
                        }
                        None => lost_kernel(builder),
                    });
            frames.extend_from_slice(stack);
        } else if sample.in_kernel {
            frames.extend(lost_kernel(builder));
        }
        if sample.user_stack != 0 {
            let stack = cache
                .user
                .entry((sample.tgid, sample.user_stack))
                .or_insert_with(|| {
                    let mut out = Vec::new();
                    match window.stacks.get(&sample.user_stack) {
                        Some(raw) => {
                            self.symbolizer
                                .user_stack(sample.tgid, &raw.ips, builder, &mut out);
                            if raw.truncated {
                                out.push(
                                    builder.intern_frame(&Frame::named(
                                        "[truncated]",
                                        FrameKind::Native,
                                    )),
                                );
                            }
                        }
                        None => {
                            out.push(builder.intern_frame(&Frame::named(
                                "[lost user stack]",
                                FrameKind::Native,
                            )))
                        }
                    }
                    out
                });
            frames.extend_from_slice(stack);
        }
    }
}

/// Undoes the sampling of context switches: a wait followed with
/// probability p stands for 1/p such waits.
fn scale_up(blocked_ns: u64, followed_per_million: u32) -> u64 {
    if followed_per_million == 0 || followed_per_million >= 1_000_000 {
        return blocked_ns;
    }
    let scaled = u128::from(blocked_ns) * 1_000_000 / u128::from(followed_per_million);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

/// This host's name, for profile titles and resource attributes.
///
/// In a Kubernetes pod without the host's network, the kernel's hostname
/// is the pod's name; the DaemonSet passes the node's name in `NODE_NAME`
/// (from `spec.nodeName`), which is then the host's name.
pub fn hostname() -> String {
    choose_hostname(
        std::env::var("NODE_NAME").ok(),
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
    )
}

fn choose_hostname(node_name: Option<String>, kernel_hostname: Option<String>) -> String {
    [node_name, kernel_hostname]
        .into_iter()
        .flatten()
        .map(|name| name.trim().to_string())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_name_wins_over_the_pods_hostname() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            choose_hostname(some("node-7"), some("hearth-x2k\n")),
            "node-7"
        );
        assert_eq!(choose_hostname(None, some("web1\n")), "web1");
        assert_eq!(choose_hostname(some(" "), some("web1\n")), "web1");
        assert_eq!(choose_hostname(None, None), "unknown");
    }

    #[test]
    fn sampled_waits_scale_up_by_the_inverse_probability() {
        assert_eq!(scale_up(1_000, 0), 1_000);
        assert_eq!(scale_up(1_000, 1_000_000), 1_000);
        assert_eq!(scale_up(1_000, 100_000), 10_000);
        assert_eq!(scale_up(u64::MAX, 1), u64::MAX);
    }
}
