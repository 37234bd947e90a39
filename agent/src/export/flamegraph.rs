//! Interactive flame graph SVGs (zoom, search, tooltips), rendered by
//! inferno from the [folded](super::folded) lines.
//!
//! Colours come from inferno's "perl" palette: kernel frames (`_[k]`, the
//! suffix is not displayed) are orange, names containing `::` (C++, Rust)
//! yellow and other native code red. The "java" palette would also tell
//! kernel frames apart, but it paints any capitalised or dotted name green
//! as "Java", which misleads for native code. Colours are derived from a
//! hash of the name, not a random generator, so the same profile always
//! renders to the same bytes and a function keeps its colour across graphs.

use std::io::Write;
use std::time::{Duration, SystemTime};

use inferno::flamegraph::color::{MultiPalette, Palette};
use inferno::flamegraph::{self as inferno_fg, Options};

use super::{folded, ExportError};
use crate::profile::{Profile, ProfileMeta, SampleKind};

/// Writes `profile` as a flame graph SVG titled `title`. A profile without
/// samples gives a small SVG saying so (inferno refuses empty input).
pub fn write(profile: &Profile, title: &str, out: &mut dyn Write) -> Result<(), ExportError> {
    let lines = folded::lines(profile);
    if lines.is_empty() {
        return Ok(write_empty(title, out)?);
    }
    let mut options = Options::default();
    options.title = title.to_owned();
    options.count_name = "samples".to_owned();
    options.colors = Palette::Multi(MultiPalette::Perl);
    options.hash = true;
    // inferno writes as it renders; buffering means a rendering error
    // cannot leave half an SVG in `out`.
    let mut svg = Vec::new();
    inferno_fg::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .map_err(ExportError::FlameGraph)?;
    out.write_all(&svg)?;
    Ok(())
}

/// The title [`super::write_profile`] uses, e.g. `hearth on-CPU profile —
/// myhost, 2026-01-02T03:04:05Z, 10s, 99 Hz`. Parts the meta does not know
/// (a parsed folded file has no host, start or frequency) are left out.
pub fn default_title(meta: &ProfileMeta) -> String {
    let kind = match meta.kind {
        SampleKind::OnCpu => "on-CPU",
    };
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
    if meta.frequency_hz > 0 {
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

fn write_empty(title: &str, out: &mut dyn Write) -> std::io::Result<()> {
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
            r#"<text x="600" y="60" text-anchor="middle" font-family="Verdana" font-size="12">No samples were recorded.</text>"#,
            "\n</svg>\n"
        ),
        xml_escape(title)
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
    use crate::profile::tests::{meta, sample_profile};
    use crate::profile::ProfileBuilder;

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
