//! Interactive flame graph SVGs (zoom, search, tooltips), rendered by
//! inferno from the [folded](super::folded) lines: [`write`] for one
//! profile, [`write_diff`] for the differential graph of two.
//!
//! # Colours of a regular graph: where the code lives
//!
//! The folded lines only carry names, so the kind of each frame is handed
//! to inferno as a pre-filled palette map (function name → colour), built
//! from the profile's frame kinds, mappings and process executables:
//!
//! * **orange**: kernel (`_[k]` frames; the suffix is not displayed),
//! * **red**: user code of the process's main executable,
//! * **yellow**: shared libraries (any other mapped file: `libc.so.6`,
//!   `ld-linux`, `[vdso]`…).
//!
//! When the process's executable is unknown (a decoded pprof file), a
//! mapping whose file name contains `.so` counts as a shared library and
//! any other as the executable. Frames without a mapping (a parsed folded
//! file, `[unknown]`) and the process root frames fall back to inferno's
//! "perl" palette, which colours by name: `_[k]` orange, names with `::`
//! yellow, anything else red. A name seen in both the executable and a
//! library (a statically linked copy of `memcpy`) takes the colour of the
//! kind that has more samples. Shades within a family come from a hash of
//! the name, not a random generator, so the same profile always renders to
//! the same bytes and a function keeps its colour across graphs.
//!
//! # Differential graphs
//!
//! [`write_diff`] follows Brendan Gregg's convention: the graph has the
//! shape of NEW (frame widths are NEW's samples); a frame is red where its
//! share grew since BASE and blue where it shrank, the deeper the colour the
//! larger the change relative to the largest one in the graph; unchanged
//! frames are near-white (`rgb(250,250,250)`). BASE's counts are first
//! scaled to NEW's total (inferno's differential folding with
//! normalisation), so runs of different lengths compare by share, not by
//! raw count. Scaled counts are truncated to whole samples, so a frame may
//! show a change of under one sample where none happened. The tooltip adds
//! the change in points of NEW's total, e.g. `main (40 samples, 40.00%;
//! +20.00%)`. Stacks only BASE has are zero wide in NEW's shape and so not
//! drawn; the text report of `hearth diff` lists them.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use inferno::differential;
use inferno::flamegraph::color::{Color, MultiPalette, Palette, PaletteMap};
use inferno::flamegraph::{self as inferno_fg, Options};

use super::{folded, ExportError};
use crate::profile::{FrameKind, Profile, ProfileMeta, SampleKind};

/// The suffix [`folded`] gives kernel frames.
const KERNEL_SUFFIX: &str = "_[k]";

/// Writes `profile` as a flame graph SVG titled `title`, coloured by where
/// the code lives (see the module documentation). A profile without
/// samples gives a small SVG saying so (inferno refuses empty input).
pub fn write(profile: &Profile, title: &str, out: &mut dyn Write) -> Result<(), ExportError> {
    let lines = folded::lines(profile);
    if lines.is_empty() {
        return Ok(write_empty(title, "No samples were recorded.", out)?);
    }
    let mut palette = kind_palette(profile);
    let mut options = base_options(title);
    if profile.meta.kind.is_time() {
        options.count_name = "ns".to_owned();
    }
    options.palette_map = Some(&mut palette);
    render(&mut options, lines.iter().map(String::as_str), out)
}

/// Writes the differential flame graph of `base` → `new` titled `title`:
/// NEW's shape, red where a frame's share of the samples grew, blue where
/// it shrank (see the module documentation). When NEW has no samples there
/// is no shape to draw and a small SVG says so.
pub fn write_diff(
    base: &Profile,
    new: &Profile,
    title: &str,
    out: &mut dyn Write,
) -> Result<(), ExportError> {
    let new_lines = folded::lines(new);
    if new_lines.is_empty() {
        return Ok(write_empty(title, "NEW has no samples.", out)?);
    }
    let base_lines = folded::lines(base);
    let mut folded_diff = Vec::new();
    differential::from_readers(
        differential::Options {
            normalize: true,
            strip_hex: false,
        },
        join_lines(&base_lines).as_bytes(),
        join_lines(&new_lines).as_bytes(),
        &mut folded_diff,
    )
    .map_err(ExportError::FlameGraph)?;
    // inferno writes the merged stacks in hash order; sorted, the same
    // inputs always give the same bytes.
    let folded_diff = String::from_utf8_lossy(&folded_diff);
    let mut diff_lines: Vec<&str> = folded_diff.lines().collect();
    diff_lines.sort_unstable();

    let mut options = base_options(title);
    options.subtitle = Some(format!(
        "NEW's shape ({} samples); red: share grew since BASE ({} samples, scaled to NEW's total), \
         blue: share shrank",
        new.total_count(),
        base.total_count()
    ));
    render(&mut options, diff_lines, out)
}

/// What both kinds of graph share: title, unit, deterministic colours.
fn base_options(title: &str) -> Options<'static> {
    let mut options = Options::default();
    options.title = title.to_owned();
    options.count_name = "samples".to_owned();
    options.colors = Palette::Multi(MultiPalette::Perl);
    options.hash = true;
    options
}

fn render<'a>(
    options: &mut Options<'_>,
    lines: impl IntoIterator<Item = &'a str>,
    out: &mut dyn Write,
) -> Result<(), ExportError> {
    // inferno writes as it renders; buffering means a rendering error
    // cannot leave half an SVG in `out`.
    let mut svg = Vec::new();
    inferno_fg::from_lines(options, lines, &mut svg).map_err(ExportError::FlameGraph)?;
    out.write_all(&svg)?;
    Ok(())
}

fn join_lines(lines: &[String]) -> String {
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Where a frame's code lives, as far as colouring is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CodeKind {
    Executable,
    Library,
    Kernel,
}

impl CodeKind {
    /// The colour of `name` in this kind's family: a hue per kind, the
    /// shade from a hash of the name so neighbours tell apart.
    fn color(self, name: &str) -> Color {
        let (a, b) = name_hash(name);
        let shade = |low: u8, span: u8, v: f32| low + (f32::from(span) * v) as u8;
        match self {
            CodeKind::Kernel => Color {
                r: shade(200, 55, a),
                g: shade(100, 60, b),
                b: 0,
            },
            CodeKind::Executable => {
                let gb = shade(50, 80, b);
                Color {
                    r: shade(200, 55, a),
                    g: gb,
                    b: gb,
                }
            }
            CodeKind::Library => {
                let rg = shade(175, 55, a);
                Color {
                    r: rg,
                    g: rg,
                    b: shade(50, 40, b),
                }
            }
        }
    }
}

/// Two numbers in `[0, 1)` from `name` (FNV-1a), stable across runs and
/// machines, unlike the standard library's hasher.
fn name_hash(name: &str) -> (f32, f32) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let unit = |bits: u64| (bits & 0xffff) as f32 / 65536.0;
    (unit(hash >> 16), unit(hash >> 40))
}

/// The colour of every frame name (as the folded lines spell it) whose
/// kind the profile knows; names it cannot place are left to the palette.
fn kind_palette(profile: &Profile) -> PaletteMap {
    // Samples per name and kind: executable, library, kernel.
    let mut weights: HashMap<String, [u64; 3]> = HashMap::new();
    let mut kinds: Vec<Option<(String, CodeKind)>> = vec![None; profile.frames.len()];
    for sample in &profile.samples {
        let process = profile.process(sample.process);
        for &id in &sample.frames {
            let frame = profile.frame(id);
            let kind = match (frame.kind, frame.mapping) {
                (FrameKind::Kernel, _) => CodeKind::Kernel,
                (FrameKind::Native, None) => continue,
                (FrameKind::Native, Some(m)) => {
                    let path = &*profile.mapping(m).path;
                    let is_exe = match &process.executable {
                        Some(exe) => **exe == *path,
                        // `[vdso]` and the like are the kernel's libraries.
                        None => !(path.starts_with('[') || file_name(path).contains(".so")),
                    };
                    if is_exe {
                        CodeKind::Executable
                    } else {
                        CodeKind::Library
                    }
                }
            };
            // The name is the same for every sample of this frame id, but
            // the kind can differ by process (its executable).
            let name = match &kinds[id as usize] {
                Some((name, _)) => name.clone(),
                None => {
                    let name = folded_name(&frame.function, frame.kind);
                    kinds[id as usize] = Some((name.clone(), kind));
                    name
                }
            };
            let slot = match kind {
                CodeKind::Executable => 0,
                CodeKind::Library => 1,
                CodeKind::Kernel => 2,
            };
            let w = weights.entry(name).or_default();
            w[slot] = w[slot].saturating_add(sample.count);
        }
    }
    let mut palette = PaletteMap::default();
    for (name, w) in weights {
        // Ties go to the executable: the code its authors own.
        let kind = if w[2] > 0 {
            CodeKind::Kernel
        } else if w[1] > w[0] {
            CodeKind::Library
        } else {
            CodeKind::Executable
        };
        let color = kind.color(&name);
        palette.insert(name, color);
    }
    palette
}

/// `name` as [`folded::lines`] writes it: `;` and line breaks replaced,
/// kernel frames suffixed.
fn folded_name(function: &str, kind: FrameKind) -> String {
    let mut name: String = function
        .chars()
        .map(|c| match c {
            ';' => ':',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect();
    if kind == FrameKind::Kernel {
        name.push_str(KERNEL_SUFFIX);
    }
    name
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The title [`super::write_profile`] uses, e.g. `hearth on-CPU profile —
/// myhost, 2026-01-02T03:04:05Z, 10s, 99 Hz`. Parts the meta does not know
/// (a parsed folded file has no host, start or frequency) are left out.
pub fn default_title(meta: &ProfileMeta) -> String {
    let kind = meta.kind.describe();
    let mut parts = Vec::new();
    if !meta.hostname.is_empty() {
        parts.push(meta.hostname.clone());
    }
    if meta.start != SystemTime::UNIX_EPOCH {
        parts.push(humantime::format_rfc3339_seconds(meta.start).to_string());
    }
    if !meta.duration.is_zero() {
        parts.push(humantime::format_duration(round_duration(meta.duration)).to_string());
    }
    if meta.frequency_hz > 0 && !matches!(meta.kind, SampleKind::OffCpu(_)) {
        parts.push(format!("{} Hz", meta.frequency_hz));
    }
    let mut title = format!("hearth {kind} profile");
    if !parts.is_empty() {
        title.push_str(" — ");
        title.push_str(&parts.join(", "));
    }
    title
}

/// Whole seconds, or milliseconds under a second: a title reading
/// `10s 2ms 113us 5ns` says less than `10s`.
fn round_duration(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs() + u64::from(d.subsec_millis() >= 500))
    } else {
        Duration::from_millis(u64::from(d.subsec_millis()).max(1))
    }
}

fn write_empty(title: &str, note: &str, out: &mut dyn Write) -> std::io::Result<()> {
    write!(
        out,
        concat!(
            r#"<?xml version="1.0" standalone="no"?>"#,
            "\n",
            r#"<svg version="1.1" width="1200" height="90" viewBox="0 0 1200 90" xmlns="http://www.w3.org/2000/svg">"#,
            "\n",
            r#"<rect x="0" y="0" width="100%" height="100%" fill="rgb(238,238,238)"/>"#,
            "\n",
            r#"<text x="600" y="24" text-anchor="middle" font-family="Verdana" font-size="17">{}</text>"#,
            "\n",
            r#"<text x="600" y="60" text-anchor="middle" font-family="Verdana" font-size="12">{}</text>"#,
            "\n</svg>\n"
        ),
        xml_escape(title),
        xml_escape(note)
    )
}

fn xml_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::native;
    use crate::profile::tests::{meta, sample_profile};
    use crate::profile::{Frame, Mapping, Process, ProfileBuilder};

    fn render(profile: &Profile, title: &str) -> String {
        let mut out = Vec::new();
        write(profile, title, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The `fill="rgb(r,g,b)"` of the first frame whose tooltip starts with `name`.
    fn fill_of(svg: &str, name: &str) -> (u8, u8, u8) {
        let at = svg.find(&format!("<title>{name} (")).unwrap();
        let fill = &svg[at..][svg[at..].find("fill=\"rgb(").unwrap() + 10..];
        let rgb: Vec<u8> = fill[..fill.find(')').unwrap()]
            .split(',')
            .map(|c| c.trim().parse().unwrap())
            .collect();
        (rgb[0], rgb[1], rgb[2])
    }

    #[test]
    fn svg_is_complete_and_names_every_frame() {
        let svg = render(&sample_profile(), "test & <title>");
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("test &amp; &lt;title&gt;"));
        for name in ["app", "main", "a", "b", "do_syscall_64"] {
            assert!(svg.contains(&format!("<title>{name} (")), "{name} missing");
        }
        // The annotation only drives colour; it is not shown.
        assert!(!svg.contains("_[k]"));
        assert!(svg.contains("samples"));
    }

    #[test]
    fn kernel_frames_are_coloured_apart_and_output_is_deterministic() {
        let svg = render(&sample_profile(), "t");
        // Orange (kernel) has no blue component; red (native) always has.
        assert_eq!(fill_of(&svg, "do_syscall_64").2, 0);
        assert!(fill_of(&svg, "main").2 > 0);
        assert_eq!(render(&sample_profile(), "t"), svg);
    }

    fn parse(text: &str) -> Profile {
        folded::parse(text.as_bytes()).unwrap()
    }

    fn render_diff(base: &str, new: &str) -> String {
        let mut out = Vec::new();
        write_diff(&parse(base), &parse(new), "diff <t>", &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The tooltip text of the first frame named `name`.
    fn title_of<'a>(svg: &'a str, name: &str) -> &'a str {
        let at = svg.find(&format!("<title>{name} (")).unwrap() + 7;
        &svg[at..at + svg[at..].find("</title>").unwrap()]
    }

    const NEUTRAL: (u8, u8, u8) = (250, 250, 250);

    /// BASE (100 samples): a 30%, b 50%, c 20%.
    const BASE: &str = "app;main;a 30\napp;main;b 50\napp;main;c 20\n";

    #[test]
    fn diff_colours_growth_red_shrinkage_blue_and_no_change_neutral() {
        // NEW (200 samples): a 50% (+20), b 30% (-20), c 20% (unchanged).
        let svg = render_diff(BASE, "app;main;a 100\napp;main;b 60\napp;main;c 40\n");
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("diff &lt;t&gt;"));
        assert_eq!(
            fill_of(&svg, "a"),
            (255, 100, 100),
            "{}",
            title_of(&svg, "a")
        );
        assert_eq!(
            fill_of(&svg, "b"),
            (100, 100, 255),
            "{}",
            title_of(&svg, "b")
        );
        assert_eq!(fill_of(&svg, "c"), NEUTRAL);
        // BASE was scaled to NEW's total: the parents did not change share.
        assert_eq!(fill_of(&svg, "main"), NEUTRAL);
        assert_eq!(fill_of(&svg, "app"), NEUTRAL);
        // Widths are NEW's, the change is in points of NEW's total.
        assert_eq!(title_of(&svg, "a"), "a (100 samples, 50.00%; +20.00%)");
        assert_eq!(title_of(&svg, "b"), "b (60 samples, 30.00%; -20.00%)");
        assert_eq!(title_of(&svg, "c"), "c (40 samples, 20.00%; 0.00%)");
        assert_eq!(
            render_diff(BASE, "app;main;a 100\napp;main;b 60\napp;main;c 40\n"),
            svg,
            "not deterministic"
        );
    }

    #[test]
    fn diff_compares_shares_whatever_the_run_lengths() {
        let changed = |scale: u64| {
            format!(
                "app;main;a {}\napp;main;b {}\napp;main;c {}\n",
                50 * scale,
                30 * scale,
                20 * scale
            )
        };
        // NEW as long as BASE (scale 1) or longer: same shares, same colours.
        let reference = render_diff(BASE, &changed(1));
        for scale in [2, 3] {
            let svg = render_diff(BASE, &changed(scale));
            for name in ["app", "main", "a", "b", "c"] {
                assert_eq!(
                    fill_of(&svg, name),
                    fill_of(&reference, name),
                    "{name} x{scale}"
                );
            }
        }
        // A longer BASE (300 samples, the same shares as BASE) than NEW.
        let long_base = "app;main;a 90\napp;main;b 150\napp;main;c 60\n";
        let svg = render_diff(long_base, &changed(1));
        assert_eq!(fill_of(&svg, "a"), (255, 100, 100));
        assert_eq!(fill_of(&svg, "c"), NEUTRAL);
        assert_eq!(fill_of(&svg, "main"), NEUTRAL);
        // The same shares at different lengths: nothing changed.
        let same = render_diff(&changed(1), &changed(4));
        for name in ["app", "main", "a", "b", "c"] {
            assert_eq!(fill_of(&same, name), NEUTRAL, "{name}");
        }
    }

    #[test]
    fn diff_draws_new_stacks_red_and_needs_samples_in_new() {
        let svg = render_diff("app;main;a 10\n", "app;main;a 10\napp;main;fresh 10\n");
        let fresh = fill_of(&svg, "fresh");
        assert_eq!((fresh.0, fresh.1 == fresh.2), (255, true));
        assert!(fresh.1 < 250);
        // Gone from NEW: no width, not drawn.
        let svg = render_diff("app;main;gone 10\napp;main;a 10\n", "app;main;a 10\n");
        assert!(!svg.contains("<title>gone ("));
        let empty = ProfileBuilder::new(meta()).build();
        let mut out = Vec::new();
        write_diff(&sample_profile(), &empty, "t", &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.contains("NEW has no samples") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn frames_are_coloured_by_kernel_executable_and_library() {
        let mut b = ProfileBuilder::new(meta());
        let exe = b.intern_mapping(&Mapping {
            path: "/usr/bin/app".into(),
            build_id: None,
        });
        let libc = b.intern_mapping(&Mapping {
            path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            build_id: None,
        });
        let in_map = |b: &mut ProfileBuilder, name: &str, m| {
            b.intern_frame(&Frame {
                mapping: Some(m),
                ..native(name)
            })
        };
        let main = in_map(&mut b, "main", exe);
        let parse_args = in_map(&mut b, "app::parse_args", exe);
        let memcpy = in_map(&mut b, "memcpy", libc);
        let k = b.intern_frame(&Frame {
            kind: FrameKind::Kernel,
            ..native("do_syscall_64")
        });
        let unknown = b.intern_frame(&native("[unknown]"));
        let p = b.intern_process(&Process {
            pid: 1,
            name: "app".into(),
            executable: Some("/usr/bin/app".into()),
            metadata: Default::default(),
        });
        b.add_sample(p, 1, "app".into(), vec![k, memcpy, parse_args, main], 5);
        b.add_sample(p, 1, "app".into(), vec![unknown, main], 5);
        let profile = b.build();
        let svg = render(&profile, "t");
        let is_red = |(r, g, b): (u8, u8, u8)| r >= 200 && g == b && g < 140;
        let is_yellow = |(r, g, b): (u8, u8, u8)| r == g && r >= 175 && b < 100;
        let is_orange = |(r, g, b): (u8, u8, u8)| r >= 200 && (100..170).contains(&g) && b == 0;
        assert!(is_red(fill_of(&svg, "main")), "{:?}", fill_of(&svg, "main"));
        // `::` would make it yellow by name; it is the executable's code.
        let parse = fill_of(&svg, "app::parse_args");
        assert!(is_red(parse), "{parse:?}");
        assert!(
            is_yellow(fill_of(&svg, "memcpy")),
            "{:?}",
            fill_of(&svg, "memcpy")
        );
        let kernel = fill_of(&svg, "do_syscall_64");
        assert!(is_orange(kernel), "{kernel:?}");
        assert!(svg.contains("<title>[unknown] ("));

        // Without the process's executable, `.so` files are the libraries.
        let mut anonymous = profile;
        anonymous.processes[0].executable = None;
        let svg = render(&anonymous, "t");
        assert!(is_red(fill_of(&svg, "main")));
        assert!(is_yellow(fill_of(&svg, "memcpy")));
    }

    #[test]
    fn empty_profile_gives_a_valid_svg_saying_so() {
        let empty = ProfileBuilder::new(meta()).build();
        let svg = render(&empty, "nothing <here>");
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("No samples"));
        assert!(svg.contains("nothing &lt;here&gt;"));
    }

    #[test]
    fn default_title_describes_the_recording() {
        let title = default_title(&meta());
        assert_eq!(
            title,
            "hearth on-CPU profile — testhost, 2023-11-14T22:13:20Z, 10s, 99 Hz"
        );
        let unknown = ProfileMeta {
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            frequency_hz: 0,
            hostname: String::new(),
            ..meta()
        };
        assert_eq!(default_title(&unknown), "hearth on-CPU profile");
        let short = ProfileMeta {
            duration: Duration::from_micros(1500),
            ..meta()
        };
        assert!(default_title(&short).contains(", 1ms,"));
    }
}
