//! Brendan Gregg's folded stacks: one line per distinct stack,
//! `process;root;…;leaf count`, the input of `flamegraph.pl` and inferno
//! and the easiest format to diff or grep.
//!
//! The process name is the root frame so a host-wide graph splits by
//! process first. Kernel frames carry the `_[k]` suffix, the convention
//! flame graph tools colour by. Threads are not part of the stack: samples
//! of different threads with the same process name and stack become one
//! line. [`parse`] reads such files back (ours or other tools').

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::ExportError;
use crate::profile::{
    Frame, FrameId, FrameKind, Process, Profile, ProfileBuilder, ProfileMeta, SampleKind,
};

/// Suffix marking kernel frames (flamegraph.pl and inferno colour these).
const KERNEL_SUFFIX: &str = "_[k]";

/// Writes `profile` as folded stacks, sorted, one line per distinct stack.
pub fn write(profile: &Profile, out: &mut dyn Write) -> Result<(), ExportError> {
    for line in lines(profile) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The folded `stack count` lines of `profile` (counts are samples, or
/// nanoseconds for off-CPU and wall-clock profiles), sorted so output is
/// deterministic. Stacks with a zero count are left out: they carry no
/// weight and inferno rejects an input whose counts sum to zero.
pub(crate) fn lines(profile: &Profile) -> Vec<String> {
    // Names are cleaned once per table entry, not once per sample.
    let frames: Vec<Cow<str>> = profile
        .frames
        .iter()
        .map(|f| match f.kind {
            FrameKind::Kernel => Cow::Owned(format!("{}{KERNEL_SUFFIX}", sanitize(&f.function))),
            FrameKind::Native => sanitize(&f.function),
        })
        .collect();
    let processes: Vec<Cow<str>> = profile
        .processes
        .iter()
        .map(|p| sanitize(&p.name))
        .collect();

    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    let mut stack = String::new();
    for sample in profile.samples.iter().filter(|s| s.count > 0) {
        stack.clear();
        stack.push_str(&processes[sample.process as usize]);
        for &f in sample.frames.iter().rev() {
            stack.push(';');
            stack.push_str(&frames[f as usize]);
        }
        // Folded stacks have no labels: the kind of wait becomes the leaf.
        if let Some(reason) = sample.off_cpu {
            stack.push(';');
            stack.push_str(reason.frame_name());
        }
        match stacks.get_mut(stack.as_str()) {
            Some(count) => *count = count.saturating_add(sample.count),
            None => {
                stacks.insert(stack.clone(), sample.count);
            }
        }
    }
    stacks
        .into_iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect()
}

/// `;` separates frames and a newline ends the record, so neither may
/// appear inside a name.
fn sanitize(name: &str) -> Cow<'_, str> {
    if name.contains([';', '\n', '\r']) {
        Cow::Owned(
            name.chars()
                .map(|c| match c {
                    ';' => ':',
                    '\n' | '\r' => ' ',
                    c => c,
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(name)
    }
}

/// Reads folded stacks back into a profile.
///
/// The first frame of each line is the process name; a `_[k]` suffix
/// makes a kernel frame. Folded stacks carry no pids, threads, addresses,
/// mappings or timing, so processes get pid 0, samples tid 0 and an empty
/// thread name, frames address 0 and no mapping, and the meta is a
/// placeholder (epoch start, zero duration, frequency 0, no hostname) for
/// the caller to overwrite when it knows better. Blank lines and `# `
/// comments are skipped; bytes that are not UTF-8 are replaced.
pub fn parse(mut reader: impl BufRead) -> Result<Profile, ExportError> {
    let mut builder = ProfileBuilder::new(ProfileMeta {
        kind: SampleKind::OnCpu,
        start: SystemTime::UNIX_EPOCH,
        duration: Duration::ZERO,
        frequency_hz: 0,
        hostname: String::new(),
    });
    let no_thread: Arc<str> = Arc::from("");
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() || line.starts_with("# ") {
            continue;
        }
        let invalid = |message: String| ExportError::Decode {
            format: "folded stacks",
            message: format!("line {line_no}: {message}"),
        };
        let (stack, count) = line
            .rsplit_once(' ')
            .ok_or_else(|| invalid("no sample count after the stack".into()))?;
        let count: u64 = count
            .parse()
            .map_err(|_| invalid(format!("invalid sample count {count:?}")))?;
        let mut names = stack.trim_end().split(';');
        // `split` always yields at least one item.
        let process_name = names.next().unwrap_or_default();
        let process = builder.intern_process(&Process {
            pid: 0,
            name: process_name.into(),
            executable: None,
            metadata: Default::default(),
        });
        let mut frames: Vec<FrameId> = names.map(|n| builder.intern_frame(&frame(n))).collect();
        frames.reverse();
        builder.add_sample(process, 0, no_thread.clone(), frames, count);
    }
    Ok(builder.build())
}

fn frame(name: &str) -> Frame {
    let (function, kind) = match name.strip_suffix(KERNEL_SUFFIX) {
        Some(stripped) => (stripped, FrameKind::Kernel),
        None => (name, FrameKind::Native),
    };
    Frame::named(function, kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::{meta, native, sample_profile};

    fn to_string(profile: &Profile) -> String {
        let mut out = Vec::new();
        write(profile, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_sorted_lines_with_process_root_and_kernel_suffix() {
        assert_eq!(
            to_string(&sample_profile()),
            "app;main;a 6\napp;main;b 3\napp;main;b;do_syscall_64_[k] 1\n"
        );
    }

    #[test]
    fn threads_and_processes_with_the_same_name_merge() {
        let mut b = ProfileBuilder::new(meta());
        let f = b.intern_frame(&native("work"));
        for pid in [1, 2] {
            let p = b.intern_process(&Process {
                pid,
                name: "sh".into(),
                executable: None,
                metadata: Default::default(),
            });
            b.add_sample(p, pid, "sh".into(), vec![f], 2);
            b.add_sample(p, pid + 100, "sh-worker".into(), vec![f], 1);
        }
        b.add_sample(0, 7, "idle".into(), vec![], 0);
        assert_eq!(to_string(&b.build()), "sh;work 6\n");
    }

    #[test]
    fn off_cpu_reasons_become_the_leaf() {
        let profile = crate::profile::tests::off_cpu_profile();
        assert_eq!(
            to_string(&profile),
            "app;main;a;[off-CPU: waiting] 6000000\napp;main;b;[off-CPU: preempted] 3000000\n"
        );
    }

    #[test]
    fn separators_inside_names_are_replaced() {
        let mut b = ProfileBuilder::new(meta());
        let p = b.intern_process(&Process {
            pid: 1,
            name: "a;b".into(),
            executable: None,
            metadata: Default::default(),
        });
        let f = b.intern_frame(&native("f<[u8; 4]>\nx\r"));
        b.add_sample(p, 1, "t".into(), vec![f], 1);
        assert_eq!(to_string(&b.build()), "a:b;f<[u8: 4]> x  1\n");
    }

    #[test]
    fn parse_reads_back_what_write_wrote() {
        let original = sample_profile();
        let text = to_string(&original);
        let parsed = parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.total_count(), original.total_count());
        assert_eq!(parsed.processes.len(), 1);
        assert_eq!(&*parsed.processes[0].name, "app");
        let stacks: Vec<(Vec<&str>, u64)> = parsed
            .samples
            .iter()
            .map(|s| (parsed.stack_names(s).collect(), s.count))
            .collect();
        assert_eq!(
            stacks,
            [
                (vec!["main", "a"], 6),
                (vec!["main", "b"], 3),
                (vec!["main", "b", "do_syscall_64"], 1)
            ]
        );
        let kinds: Vec<FrameKind> = parsed.samples[2]
            .frames
            .iter()
            .map(|&f| parsed.frame(f).kind)
            .collect();
        assert_eq!(
            kinds,
            [FrameKind::Kernel, FrameKind::Native, FrameKind::Native]
        );
        assert_eq!(to_string(&parsed), text);
    }

    #[test]
    fn parse_skips_blank_lines_and_comments_and_sums_repeats() {
        let text = "# written by hand\n\napp;main 2\r\n  app;main 3  \nother 1";
        let parsed = parse(text.as_bytes()).unwrap();
        assert_eq!(to_string(&parsed), "app;main 5\nother 1\n");
        // A line with only a process name is a sample without frames.
        let other = parsed.samples.iter().find(|s| s.frames.is_empty()).unwrap();
        assert_eq!(&*parsed.process(other.process).name, "other");
    }

    #[test]
    fn parse_rejects_malformed_lines_with_their_number() {
        for (text, want) in [
            ("app;main 1\napp;main\n", "line 2"),
            ("app;main x\n", "\"x\""),
            ("app;main -3\n", "\"-3\""),
            ("app;main 1.5\n", "\"1.5\""),
        ] {
            let err = parse(text.as_bytes()).unwrap_err();
            assert!(
                matches!(err, ExportError::Decode { .. }),
                "{text:?}: {err:?}"
            );
            assert!(err.to_string().contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn parse_of_empty_input_is_an_empty_profile() {
        let parsed = parse(&b""[..]).unwrap();
        assert!(parsed.samples.is_empty());
        assert_eq!(to_string(&parsed), "");
    }
}
