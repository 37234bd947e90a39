//! Turns drained windows into profiles: symbolizes every stack once per
//! window and attaches process metadata. The one place where the raw
//! kernel view becomes the [`Profile`] model.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::bpf::RawWindow;
use crate::process::ProcessTable;
use crate::profile::{Frame, FrameId, FrameKind, Profile, ProfileBuilder, ProfileMeta, SampleKind};
use crate::symbolize::Symbolize;

/// Converts windows to profiles; owns the caches that live across windows.
pub struct WindowProcessor<S> {
    symbolizer: S,
    processes: ProcessTable,
    hostname: String,
}

impl<S: Symbolize> WindowProcessor<S> {
    pub fn new(symbolizer: S) -> Self {
        Self {
            symbolizer,
            processes: ProcessTable::new(),
            hostname: hostname(),
        }
    }

    pub fn symbolizer(&self) -> &S {
        &self.symbolizer
    }

    /// Symbolizes and tags one window.
    pub fn process(&mut self, window: &RawWindow, frequency_hz: u64) -> Profile {
        let mut builder = ProfileBuilder::new(ProfileMeta {
            kind: SampleKind::OnCpu,
            start: window.start,
            duration: window.end.duration_since(window.start).unwrap_or_default(),
            frequency_hz,
            hostname: self.hostname.clone(),
        });
        // Each distinct stack is symbolized once per window, however many
        // threads share it.
        let mut kernel_frames: HashMap<u32, Vec<FrameId>> = HashMap::new();
        let mut user_frames: HashMap<(u32, u64), Vec<FrameId>> = HashMap::new();
        let mut frames = Vec::new();
        for sample in &window.samples {
            frames.clear();
            if let Some(id) = sample.kernel_stack {
                let stack =
                    kernel_frames.entry(id).or_insert_with(|| {
                        let mut out = Vec::new();
                        match window.kernel_stacks.get(&id) {
                            Some(ips) => self.symbolizer.kernel_stack(ips, &mut builder, &mut out),
                            None => out.push(builder.intern_frame(&Frame::named(
                                "[lost kernel stack]",
                                FrameKind::Kernel,
                            ))),
                        }
                        out
                    });
                frames.extend_from_slice(stack);
            } else if sample.in_kernel {
                frames.push(
                    builder.intern_frame(&Frame::named("[lost kernel stack]", FrameKind::Kernel)),
                );
            }
            if sample.user_stack != 0 {
                let stack = user_frames
                    .entry((sample.tgid, sample.user_stack))
                    .or_insert_with(|| {
                        let mut out = Vec::new();
                        match window.user_stacks.get(&sample.user_stack) {
                            Some(raw) => {
                                self.symbolizer.user_stack(
                                    sample.tgid,
                                    &raw.ips,
                                    &mut builder,
                                    &mut out,
                                );
                                if raw.truncated {
                                    out.push(builder.intern_frame(&Frame::named(
                                        "[truncated]",
                                        FrameKind::Native,
                                    )));
                                }
                            }
                            None => out.push(builder.intern_frame(&Frame::named(
                                "[lost user stack]",
                                FrameKind::Native,
                            ))),
                        }
                        out
                    });
                frames.extend_from_slice(stack);
            }
            let process = self.processes.lookup(sample.tgid, &sample.comm);
            let process = builder.intern_process(&process);
            let last_seen_unix_ns = sample
                .last_seen
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            builder.add_sample_seen(
                process,
                sample.tid,
                Arc::from(sample.comm.as_str()),
                frames.clone(),
                sample.count,
                last_seen_unix_ns,
            );
        }
        self.symbolizer.end_window();
        self.processes.end_window();
        builder.build()
    }
}

/// This host's name, for profile titles and resource attributes.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
