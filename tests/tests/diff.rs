//! `hearth diff` end to end: two hand-written folded profiles where one
//! function's share grows on purpose, the real binary, its report and
//! differential flame graph, and a real browser rendering that SVG.
//!
//! The browser check needs `/usr/bin/chromium`, which `cargo xtask test`
//! installs; without it the test fails rather than skip, so a missing
//! browser cannot pass for a working graph.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_integration_tests::{assert_exit, hearth, scratch_dir};

const CHROMIUM: &str = "/usr/bin/chromium";

/// BASE, 100 samples: `hot` 20%, `steady` 30%, `cold` and `cool` 25% each.
const BASE: &str = "app;main;hot 20\napp;main;steady 30\napp;main;cold 25\napp;main;cool 25\n";
/// NEW, 400 samples (a run four times as long): `hot` 50%, `steady` still
/// 30%, `cold` and `cool` 10% each.
const NEW: &str = "app;main;hot 200\napp;main;steady 120\napp;main;cold 40\napp;main;cool 40\n";

#[test]
fn diff_reports_the_changed_function_and_draws_it_red_in_a_browser() {
    let dir = scratch_dir("diff");
    let (base, new) = (dir.join("base.folded"), dir.join("new.folded"));
    fs::write(&base, BASE).unwrap();
    fs::write(&new, NEW).unwrap();
    let (svg_path, txt_path) = (dir.join("d.svg"), dir.join("d.txt"));
    let output = hearth(&[
        "diff",
        base.to_str().unwrap(),
        new.to_str().unwrap(),
        "-o",
        svg_path.to_str().unwrap(),
        "-o",
        txt_path.to_str().unwrap(),
    ]);
    assert_exit(&output, 0);

    // The report: on stdout and in the .txt file.
    let report = fs::read_to_string(&txt_path).unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), report);
    assert!(report.contains("BASE: 100 samples"), "{report}");
    assert!(report.contains("NEW:  400 samples"), "{report}");
    assert_eq!(
        row(&report, "hot"),
        ["20.00%", "50.00%", "+30.00", "20.00%", "50.00%", "+30.00"],
        "{report}"
    );
    let steady = row(&report, "steady");
    assert_eq!(&steady[..2], ["30.00%", "30.00%"], "{report}");
    assert!(points(&steady[2]).abs() < 0.01, "{report}");
    assert!(points(&steady[5]).abs() < 0.01, "{report}");
    assert_eq!(
        row(&report, "cold")[..3],
        ["25.00%", "10.00%", "-15.00"],
        "{report}"
    );

    // The SVG: well-formed, the grown function red, the steady one neutral.
    let svg = fs::read_to_string(&svg_path).unwrap();
    if let Err(e) = check_well_formed(&svg) {
        panic!("{svg_path:?} is not well-formed XML: {e}");
    }
    let (r, g, b) = fill_of(&svg, "hot");
    assert!(r == 255 && g == b && g < 200, "hot is rgb({r},{g},{b})");
    assert_eq!(fill_of(&svg, "steady"), (250, 250, 250));
    let (r, g, b) = fill_of(&svg, "cold");
    assert!(b == 255 && r == g && r < 250, "cold is rgb({r},{g},{b})");
    assert!(svg.contains("<title>hot (200 samples, 50.00%; +30.00%)</title>"));

    browser_check(&dir, &svg_path);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn diff_needs_base_and_a_known_output_format() {
    let dir = scratch_dir("diff-usage");
    let new = dir.join("new.folded");
    fs::write(&new, NEW).unwrap();
    let new = new.to_str().unwrap();
    let output = hearth(&["diff", new]);
    assert_exit(&output, 2);
    let out = dir.join("d.png");
    let output = hearth(&["diff", new, new, "-o", out.to_str().unwrap()]);
    assert_exit(&output, 2);
    let output = hearth(&["diff", new, new, "-o", "/nonexistent-dir/d.svg"]);
    assert_exit(&output, 6);
    fs::remove_dir_all(&dir).unwrap();
}

/// The six numbers of `name`'s report row.
fn row(report: &str, name: &str) -> Vec<String> {
    let line = report
        .lines()
        .find(|l| l.split_whitespace().last() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name}:\n{report}"));
    let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    fields[..fields.len() - 1].to_vec()
}

fn points(text: &str) -> f64 {
    text.trim_end_matches('%').parse().unwrap()
}

/// The `fill="rgb(r,g,b)"` of the frame whose tooltip starts with `name`.
fn fill_of(svg: &str, name: &str) -> (u8, u8, u8) {
    let at = svg
        .find(&format!("<title>{name} ("))
        .unwrap_or_else(|| panic!("no frame {name}"));
    let rest = &svg[at..];
    let fill = &rest[rest.find("fill=\"rgb(").unwrap() + 10..];
    let rgb: Vec<u8> = fill[..fill.find(')').unwrap()]
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    (rgb[0], rgb[1], rgb[2])
}

/// Enough of an XML check for a generated SVG: every element closed in
/// order, one root, and comments, CDATA (the embedded script) and the
/// declaration skipped.
fn check_well_formed(xml: &str) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = xml;
    while let Some(at) = rest.find('<') {
        rest = &rest[at..];
        let skip = |end: &str| rest.find(end).map(|i| i + end.len());
        let len = if rest.starts_with("<![CDATA[") {
            skip("]]>")
        } else if rest.starts_with("<!--") {
            skip("-->")
        } else if rest.starts_with("<?") {
            skip("?>")
        } else {
            let end = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[1..end];
            if tag.starts_with('!') {
                // DOCTYPE
            } else if let Some(name) = tag.strip_prefix('/') {
                match open.pop() {
                    Some(top) if top == name.trim() => {}
                    top => return Err(format!("</{name}> closes {top:?}")),
                }
            } else {
                let name = tag
                    .split(|c: char| c.is_whitespace() || c == '/')
                    .next()
                    .unwrap_or_default();
                if open.is_empty() {
                    roots += 1;
                }
                if !tag.ends_with('/') {
                    open.push(name);
                }
            }
            Some(end + 1)
        };
        rest = &rest[len.ok_or("unterminated comment, CDATA or declaration")?..];
    }
    match (open.as_slice(), roots) {
        ([], 1) => Ok(()),
        ([], n) => Err(format!("{n} root elements")),
        (open, _) => Err(format!("unclosed elements {open:?}")),
    }
}

/// Renders `svg` in headless chromium and checks the screenshot is a
/// 1200×800 PNG with a drawing in it: much larger than the screenshot of a
/// blank SVG taken the same way (PNG compresses a uniform page to almost
/// nothing).
fn browser_check(dir: &Path, svg: &Path) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the flame graph browser check needs it; \
         `cargo xtask test` installs it (apt-get install chromium)"
    );
    let blank = dir.join("blank.svg");
    fs::write(
        &blank,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="1200" height="800"></svg>"#,
    )
    .unwrap();
    let blank_png = screenshot(dir, &blank);
    let graph_png = screenshot(dir, svg);
    let (blank_size, graph_size) = (blank_png.len(), graph_png.len());
    assert!(
        graph_size > 3 * blank_size && graph_size > 10_000,
        "the flame graph screenshot ({graph_size} bytes) is not much larger than a blank \
         page's ({blank_size} bytes): nothing was drawn?"
    );
}

/// Screenshot of `page` at 1200×800, checked to be a PNG of that size.
fn screenshot(dir: &Path, page: &Path) -> Vec<u8> {
    let png = page.with_extension("png");
    let _ = fs::remove_file(&png);
    let mut child = Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,800")
        // Its own profile: no interference with another browser or run.
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish the screenshot of {page:?} in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = child
        .wait_with_output()
        .map(|o| o.stderr)
        .unwrap_or_default();
    let bytes = fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot of {page:?} ({e}); chromium {status}:\n{}",
            String::from_utf8_lossy(&stderr)
        )
    });
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png:?} is not a PNG");
    // The first chunk is IHDR: length, type, then width and height.
    assert_eq!(&bytes[12..16], b"IHDR", "{png:?} has no IHDR first");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (1200, 800), "{png:?} size");
    bytes
}

/// Two real recordings of the fixture (root, BPF): BASE with the 60/30/10
/// split for 3 s, NEW with leaf_a and leaf_b swapped (30/60/10) for 5 s.
/// The report shows the swap in points of share whatever the lengths, and
/// the graph paints leaf_b red, leaf_a blue and leaf_c about neutral.
#[test]
fn diff_of_two_fixture_recordings_shows_the_swapped_shares() {
    let dir = scratch_dir("diff-fixture");
    let exe = hearth_integration_tests::build_c_fixture(
        "cpu_split",
        hearth_integration_tests::FRAME_POINTER_FLAGS,
        &dir,
    );
    let record = |out: &Path, seconds: &str, units: [&str; 3]| {
        let fixture = hearth_integration_tests::Fixture::spawn_favoured(
            &exe,
            &["30", units[0], units[1], units[2]],
        );
        let pid = fixture.pid().to_string();
        let output = hearth(&[
            "record",
            "-d",
            seconds,
            "--pid",
            &pid,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_exit(&output, 0);
    };
    let (base, new) = (dir.join("base.pb.gz"), dir.join("new.pb.gz"));
    record(&base, "3s", ["6", "3", "1"]);
    record(&new, "5s", ["3", "6", "1"]);
    let (svg_path, txt_path) = (dir.join("d.svg"), dir.join("d.txt"));
    let output = hearth(&[
        "diff",
        base.to_str().unwrap(),
        new.to_str().unwrap(),
        "-o",
        svg_path.to_str().unwrap(),
        "-o",
        txt_path.to_str().unwrap(),
    ]);
    assert_exit(&output, 0);
    let report = fs::read_to_string(&txt_path).unwrap();
    let share = |name: &str| {
        let r = row(&report, name);
        (points(&r[0]), points(&r[1]), points(&r[2]))
    };
    let (a_before, a_after, a_delta) = share("leaf_a");
    let (b_before, b_after, b_delta) = share("leaf_b");
    let (_, _, c_delta) = share("leaf_c");
    eprintln!("leaf_a {a_before} -> {a_after}, leaf_b {b_before} -> {b_after}, leaf_c {c_delta:+}");
    assert!(
        (a_before - 60.0).abs() < 8.0 && (a_after - 30.0).abs() < 8.0,
        "{report}"
    );
    assert!(
        (b_before - 30.0).abs() < 8.0 && (b_after - 60.0).abs() < 8.0,
        "{report}"
    );
    assert!(a_delta < -20.0 && b_delta > 20.0, "{report}");
    // leaf_c keeps 10% in both; a few hundred samples carry about 2 points
    // of noise per share.
    assert!(c_delta.abs() < 7.0, "{report}");

    let svg = fs::read_to_string(&svg_path).unwrap();
    let (r, g, b) = fill_of(&svg, "leaf_b");
    assert!(r > b && r > g, "leaf_b grew but is rgb({r},{g},{b})");
    let (r, g, b) = fill_of(&svg, "leaf_a");
    assert!(b > r && b > g, "leaf_a shrank but is rgb({r},{g},{b})");
    let (r, _, b) = fill_of(&svg, "leaf_c");
    assert!(
        (i32::from(r) - i32::from(b)).abs() < 80,
        "leaf_c barely changed but is strongly tinted: r={r} b={b}"
    );
}
