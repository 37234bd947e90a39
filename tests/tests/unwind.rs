//! Unwinding without frame pointers, end to end: fixtures built the way
//! distributions and release builds are (no frame pointers) are recorded
//! with `--unwind dwarf`/`auto` and their stacks must reach `main` whole;
//! and the unwind tables are checked row by row against gimli's own
//! evaluation of the call frame information.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, EndianSlice, EvaluationResult, LittleEndian,
    Location, Register, RegisterRule, UnwindContext, UnwindSection, Value, X86_64,
};
use hearth::profile::{FrameKind, Profile, Sample};
use hearth::unwind::table::{decode, Cfa, SavedFp, UnwindTable};
use hearth_integration_tests::*;
use object::{Object, ObjectSection};

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// Records `pids` for `seconds` with `--unwind mode` into a pprof.
fn record(dir: &Path, name: &str, mode: &str, pids: &[u32], seconds: u32) -> Profile {
    let pb = dir.join(format!("{name}.pb.gz"));
    let duration = format!("{seconds}s");
    let mut args = vec![
        "record",
        "-d",
        &duration,
        "-F",
        "99",
        "--unwind",
        mode,
        "-o",
        pb.to_str().unwrap(),
    ];
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    for pid in &pids {
        args.extend(["--pid", pid]);
    }
    let out = hearth(&args);
    assert_exit(&out, 0);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    read_pprof(&pb)
}

/// The user frames of a sample, root first: (function, mapped file).
fn user_frames<'a>(profile: &'a Profile, sample: &'a Sample) -> Vec<(&'a str, &'a str)> {
    sample
        .frames
        .iter()
        .rev()
        .map(|&f| profile.frame(f))
        .filter(|f| f.kind == FrameKind::Native)
        .map(|f| {
            let file = f.mapping.map_or("", |m| &*profile.mapping(m).path);
            (&*f.function, file)
        })
        .collect()
}

/// Share (percent) of `pid`'s samples that `complete` accepts, and the
/// sample count. Prints the stacks it rejects, for diagnosis.
fn complete_share(
    profile: &Profile,
    pid: u32,
    complete: impl Fn(&[(&str, &str)]) -> bool,
) -> (f64, u64) {
    let samples = samples_of_pid(profile, pid);
    let total: u64 = samples.iter().map(|s| s.count).sum();
    let mut good = 0;
    for sample in &samples {
        let frames = user_frames(profile, sample);
        if complete(&frames) {
            good += sample.count;
        } else {
            let names: Vec<&str> = frames.iter().map(|f| f.0).collect();
            eprintln!("incomplete ({}): {}", sample.count, names.join(";"));
        }
    }
    (100.0 * good as f64 / total.max(1) as f64, total)
}

/// The frames from `main` to the leaf are exactly `chain` (any of
/// `leaves` last): nothing unknown, missing or extra in between.
fn exact_chain(frames: &[(&str, &str)], chain: &[&str], leaves: &[&str]) -> bool {
    let names: Vec<&str> = frames.iter().map(|f| f.0).collect();
    let Some(main) = names.iter().position(|&n| n == chain[0]) else {
        return false;
    };
    let rest = &names[main..];
    rest.len() == chain.len() + 1
        && rest[..chain.len()] == *chain
        && leaves.contains(&rest[chain.len()])
}

fn is_unknown(name: &str) -> bool {
    name.is_empty() || name.starts_with("[unknown") || name.starts_with("0x")
}

/// C at -O2 without frame pointers (PIE and fixed-address builds): with
/// tables, the whole chain main → run → dispatch → leaf in ≥ 95% of
/// samples; with frame pointers only, almost never (the test would pass
/// for nothing otherwise).
#[test]
fn unwind_c_without_frame_pointers() {
    let dir = scratch_dir("unwind-c");
    let pie = build_c_fixture("cpu_split", NO_FRAME_POINTER_FLAGS, &dir);
    let fixed_dir = dir.join("no-pie");
    std::fs::create_dir_all(&fixed_dir).unwrap();
    let mut fixed_flags = NO_FRAME_POINTER_FLAGS.to_vec();
    fixed_flags.push("-no-pie");
    let fixed = build_c_fixture("cpu_split", &fixed_flags, &fixed_dir);
    let a = Fixture::spawn(&pie, &["30"]);
    let b = Fixture::spawn(&fixed, &["30"]);
    std::thread::sleep(Duration::from_millis(200));
    let leaves = ["leaf_a", "leaf_b", "leaf_c"];
    let chain = ["main", "run", "dispatch"];

    let profile = record(&dir, "dwarf", "dwarf", &[a.pid(), b.pid()], 4);
    for (what, pid) in [("PIE", a.pid()), ("fixed-address", b.pid())] {
        let (share, total) = complete_share(&profile, pid, |f| exact_chain(f, &chain, &leaves));
        eprintln!("{what}: {share:.1}% of {total} samples complete");
        assert!(total > 100, "{what}: only {total} samples");
        assert!(share >= 95.0, "{what}: only {share:.1}% complete");
    }

    let fp = record(&dir, "fp", "fp", &[a.pid()], 2);
    let (share, total) = complete_share(&fp, a.pid(), |f| exact_chain(f, &chain, &leaves));
    eprintln!("--unwind fp: {share:.1}% of {total} samples complete");
    assert!(total > 50);
    assert!(
        share < 50.0,
        "frame pointers alone should not unwind this build ({share:.1}%)"
    );
}

/// `auto`: tables for the build without frame pointers, frame pointers for
/// the build with them; both complete.
#[test]
fn unwind_auto_mixes_tables_and_frame_pointers() {
    let dir = scratch_dir("unwind-auto");
    let no_fp = build_c_fixture("cpu_split", NO_FRAME_POINTER_FLAGS, &dir);
    let fp_dir = dir.join("fp");
    std::fs::create_dir_all(&fp_dir).unwrap();
    let with_fp = build_c_fixture("cpu_split", FRAME_POINTER_FLAGS, &fp_dir);
    let a = Fixture::spawn(&no_fp, &["30"]);
    let b = Fixture::spawn(&with_fp, &["30"]);
    std::thread::sleep(Duration::from_millis(200));
    let profile = record(&dir, "auto", "auto", &[a.pid(), b.pid()], 4);
    for (what, pid) in [("without", a.pid()), ("with", b.pid())] {
        let (share, total) = complete_share(&profile, pid, |f| {
            exact_chain(
                f,
                &["main", "run", "dispatch"],
                &["leaf_a", "leaf_b", "leaf_c"],
            )
        });
        eprintln!("{what} frame pointers: {share:.1}% of {total} samples complete");
        assert!(total > 100);
        assert!(share >= 95.0, "{what} frame pointers: {share:.1}% complete");
    }
}

/// A chain through libc: main → run → sort_round → qsort (libc) →
/// compare → weigh. Frames below and above libc both unwind: ≥ 95% of
/// samples reach main with only fixture or libc frames in between, and
/// most of them cross libc into the comparator.
#[test]
fn unwind_through_libc() {
    let dir = scratch_dir("unwind-libc");
    let exe = build_c_fixture("qsort_cmp", NO_FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn(&exe, &["30"]);
    std::thread::sleep(Duration::from_millis(200));
    let profile = record(&dir, "libc", "dwarf", &[fixture.pid()], 4);
    let own = ["main", "run", "sort_round", "compare", "weigh"];
    let clean = |frames: &[(&str, &str)]| {
        let Some(main) = frames.iter().position(|f| f.0 == "main") else {
            return false;
        };
        frames[main..].iter().all(|&(name, file)| {
            own.contains(&name) || (file.contains("libc") && !is_unknown(name))
        }) && contains_in_order(
            &frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            &["main", "run", "sort_round"],
        )
    };
    let (share, total) = complete_share(&profile, fixture.pid(), clean);
    eprintln!("{share:.1}% of {total} samples complete");
    assert!(total > 100);
    assert!(share >= 95.0, "only {share:.1}% complete");

    // Through libc and back: sort_round, then libc frames, then compare.
    let (across, _) = complete_share(&profile, fixture.pid(), |frames| {
        let at = |name: &str| frames.iter().position(|f| f.0 == name);
        match (at("sort_round"), at("compare")) {
            (Some(s), Some(c)) if s + 1 < c => {
                clean(frames) && frames[s + 1..c].iter().all(|f| f.1.contains("libc"))
            }
            _ => false,
        }
    });
    eprintln!("{across:.1}% of samples go through libc into compare");
    assert!(across >= 50.0, "only {across:.1}% reach the comparator");
}

/// A Rust release build (no frame pointers): main (the C entry the
/// standard library provides) → … → rust_chain::main → run → dispatch →
/// leaf → spin.
#[test]
fn unwind_rust_release_build() {
    let dir = scratch_dir("unwind-rust");
    let exe = build_rust_fixture("rust_chain", &dir);
    let fixture = Fixture::spawn(&exe, &["30"]);
    std::thread::sleep(Duration::from_millis(200));
    let profile = record(&dir, "rust", "dwarf", &[fixture.pid()], 4);
    let leaves = [
        "rust_chain::leaf_a",
        "rust_chain::leaf_b",
        "rust_chain::leaf_c",
    ];
    let (share, total) = complete_share(&profile, fixture.pid(), |frames| {
        let names: Vec<&str> = frames.iter().map(|f| f.0).collect();
        let Some(main) = names.iter().position(|&n| n == "main") else {
            return false;
        };
        let Some(own) = names.iter().position(|&n| n == "rust_chain::main") else {
            return false;
        };
        // The standard library's frames between the two, then exactly
        // the fixture's chain.
        main < own
            && names[main..own].iter().all(|n| !is_unknown(n))
            && names[own..].len() >= 5
            && names[own..own + 3]
                == [
                    "rust_chain::main",
                    "rust_chain::run",
                    "rust_chain::dispatch",
                ]
            && leaves.contains(&names[own + 3])
            && names[own + 4..].iter().all(|&n| n == "rust_chain::spin")
    });
    eprintln!("{share:.1}% of {total} samples complete");
    assert!(total > 100);
    assert!(share >= 95.0, "only {share:.1}% complete");
}

/// A signal handler's stack continues, through the signal frame, into the
/// interrupted code: main → run → … → (signal) → on_signal → in_handler.
#[test]
fn unwind_through_signal_frames() {
    let dir = scratch_dir("unwind-signal");
    let exe = build_c_fixture("signal_chain", NO_FRAME_POINTER_FLAGS, &dir);
    let fixture = Fixture::spawn(&exe, &["30"]);
    std::thread::sleep(Duration::from_millis(200));
    let profile = record(&dir, "signal", "dwarf", &[fixture.pid()], 4);
    let in_handler: Vec<&Sample> = samples_of_pid(&profile, fixture.pid())
        .into_iter()
        .filter(|s| user_frames(&profile, s).iter().any(|f| f.0 == "in_handler"))
        .collect();
    let total: u64 = in_handler.iter().map(|s| s.count).sum();
    let good: u64 = in_handler
        .iter()
        .filter(|s| {
            let frames = user_frames(&profile, s);
            let names: Vec<&str> = frames.iter().map(|f| f.0).collect();
            let main = names.iter().position(|&n| n == "main");
            let handler = names.iter().position(|&n| n == "on_signal");
            match (main, handler) {
                (Some(m), Some(h)) if m < h => {
                    names[m..=m + 1] == ["main", "run"]
                        // The trampoline is libc's (or the vDSO's).
                        && frames[h - 1].1.contains("libc")
                        && frames[m..].iter().all(|f| !is_unknown(f.0))
                        && names[h..] == ["on_signal", "in_handler"]
                }
                _ => false,
            }
        })
        .map(|s| s.count)
        .sum();
    let share = 100.0 * good as f64 / total.max(1) as f64;
    eprintln!("{share:.1}% of {total} samples in the handler complete");
    assert!(total > 30, "only {total} samples in the signal handler");
    assert!(share >= 95.0, "only {share:.1}% complete");
}

// --- Table correctness against gimli ---------------------------------------

/// Register values the comparison evaluates rules with.
const SP: u64 = 0x7ffd_0000_1000;
const FP: u64 = 0x7ffd_0000_9000;

/// What memory holds, for expressions that dereference.
fn memory(address: u64) -> u64 {
    address ^ 0x0000_5a5a_0000_0008
}

/// One unwind step: where the CFA is, where the return address is saved
/// (`None`: undefined, the outermost frame) and where the caller's frame
/// pointer is (`None`: unchanged; `Some(None)`: lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    cfa: u64,
    ra_at: Option<u64>,
    fp_at: Option<Option<u64>>,
}

fn evaluate(bytes: &[u8], pc: u64) -> Option<u64> {
    let expression = gimli::Expression(EndianSlice::new(bytes, LittleEndian));
    let encoding = gimli::Encoding {
        format: gimli::Format::Dwarf32,
        version: 4,
        address_size: 8,
    };
    let mut evaluation = expression.evaluation(encoding);
    let mut result = evaluation.evaluate().ok()?;
    loop {
        result = match result {
            EvaluationResult::Complete => break,
            EvaluationResult::RequiresRegister { register, .. } => {
                let value = match register {
                    X86_64::RSP => SP,
                    X86_64::RBP => FP,
                    X86_64::RA => pc,
                    _ => return None,
                };
                evaluation
                    .resume_with_register(Value::Generic(value))
                    .ok()?
            }
            EvaluationResult::RequiresMemory { address, .. } => evaluation
                .resume_with_memory(Value::Generic(memory(address)))
                .ok()?,
            _ => return None,
        };
    }
    match evaluation.result().first()?.location {
        Location::Address { address } => Some(address),
        Location::Value { value } => value.to_u64(u64::MAX).ok(),
        _ => None,
    }
}

/// The step gimli's evaluation of a row gives at `pc`; `None` when it
/// uses something beyond registers sp, rbp, rip and memory.
fn gimli_step(
    row: &gimli::UnwindTableRow<usize>,
    section: &EhFrame<EndianSlice<LittleEndian>>,
    pc: u64,
) -> Option<Step> {
    let bytes = |e: &gimli::UnwindExpression<usize>| e.get(section).ok().map(|e| e.0.slice());
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let base = match *register {
                X86_64::RSP => SP,
                X86_64::RBP => FP,
                _ => return None,
            };
            base.wrapping_add(*offset as u64)
        }
        CfaRule::Expression(e) => evaluate(bytes(e)?, pc)?,
    };
    let location = |rule: Option<RegisterRule<usize>>| -> Option<Option<u64>> {
        match rule {
            None | Some(RegisterRule::SameValue) => Some(None),
            Some(RegisterRule::Register(Register(6))) => Some(None),
            Some(RegisterRule::Offset(n)) => Some(Some(cfa.wrapping_add(n as u64))),
            Some(RegisterRule::Expression(e)) => Some(Some(evaluate(bytes(&e)?, pc)?)),
            _ => None,
        }
    };
    let ra_at = match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return Some(Step {
                cfa: 0,
                ra_at: None,
                fp_at: None,
            })
        }
        rule => location(rule)?,
    };
    let fp_at = match row.register(X86_64::RBP) {
        Some(RegisterRule::Undefined) => Some(None),
        rule => location(rule)?.map(Some),
    };
    Some(Step { cfa, ra_at, fp_at })
}

/// The step our table gives at `pc`, evaluated as the kernel does; `None`
/// for rows the kernel does not evaluate.
fn table_step(table: &UnwindTable, pc: u64) -> Option<Option<Step>> {
    let rule = table.lookup(pc)?;
    let cfa = match rule.cfa {
        Cfa::Sp(o) => SP.wrapping_add(o as u64),
        Cfa::Fp(o) => FP.wrapping_add(o as u64),
        Cfa::Plt { threshold } => {
            SP + 8
                + if pc & 15 >= u64::from(threshold) {
                    8
                } else {
                    0
                }
        }
        Cfa::Signal => {
            // The kernel reads rbp, rsp and rip from the ucontext at sp.
            return Some(Some(Step {
                cfa: memory(SP + 160),
                ra_at: Some(SP + 168),
                fp_at: Some(Some(SP + 120)),
            }));
        }
        Cfa::End => {
            return Some(Some(Step {
                cfa: 0,
                ra_at: None,
                fp_at: None,
            }))
        }
        Cfa::Unsupported => return Some(None),
    };
    let fp_at = match rule.fp {
        SavedFp::Same => None,
        SavedFp::At(o) => Some(cfa.wrapping_add(o as u64)),
        SavedFp::Lost => return Some(None),
    };
    Some(Some(Step {
        cfa,
        ra_at: Some(cfa - 8),
        fp_at: fp_at.map(Some),
    }))
}

#[derive(Debug, Default)]
struct Comparison {
    rows: usize,
    checked: usize,
    /// Rows the table marks unsupported (the kernel stops there).
    unsupported: usize,
    /// Rows of FDEs that overlap an earlier one (the first wins).
    overlapped: usize,
    gaps_checked: usize,
}

/// Compares `path`'s table with gimli's evaluation of every row of its
/// `.eh_frame`, at the first and last address of each row, and checks the
/// table's own properties.
fn compare_with_gimli(path: &Path) -> Comparison {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let table = UnwindTable::from_elf(&data).unwrap();

    // Properties: strictly sorted, no row repeating the one before, a gap
    // row last.
    assert!(
        table.rows.windows(2).all(|w| w[0].pc < w[1].pc),
        "not sorted"
    );
    assert!(
        table
            .rows
            .windows(2)
            .all(|w| (w[0].cfa_offset, w[0].rule, w[0].fp_offset)
                != (w[1].cfa_offset, w[1].rule, w[1].fp_offset)),
        "redundant rows"
    );
    assert!(decode(table.rows.last().unwrap()).is_none(), "no final gap");

    let file = object::File::parse(&*data).unwrap();
    let section = file.section_by_name(".eh_frame").unwrap();
    let eh_frame = EhFrame::new(section.data().unwrap(), LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let mut fdes = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    while let Some(entry) = entries.next().unwrap() {
        if let CieOrFde::Fde(partial) = entry {
            let fde = partial.parse(EhFrame::cie_from_offset).unwrap();
            if fde.len() > 0 {
                fdes.push(fde);
            }
        }
    }
    fdes.sort_by_key(|f| f.initial_address());
    assert!(fdes.iter().all(|f| f.initial_address() >= table.base));
    let mut result = Comparison::default();
    let mut ctx = Box::new(UnwindContext::new());
    let mut covered_to = 0;
    let starts: HashSet<u64> = fdes.iter().map(|f| f.initial_address()).collect();
    for fde in &fdes {
        let overlaps = fde.initial_address() < covered_to;
        let mut rows = fde.rows(&eh_frame, &bases, &mut ctx).unwrap();
        while let Some(row) = rows.next_row().unwrap() {
            result.rows += 1;
            if overlaps {
                result.overlapped += 1;
                continue;
            }
            for pc in [row.start_address(), row.end_address() - 1] {
                let ours = table
                    .lookup(pc)
                    .map(|_| table_step(&table, pc).unwrap())
                    .unwrap_or_else(|| panic!("{}: no row at {pc:#x}", path.display()));
                let Some(ours) = ours else {
                    result.unsupported += 1;
                    break;
                };
                let theirs = gimli_step(row, &eh_frame, pc);
                assert_eq!(
                    Some(ours),
                    theirs,
                    "{}: at {pc:#x}: table {:?}, gimli row cfa {:?} ra {:?} rbp {:?}",
                    path.display(),
                    table.lookup(pc),
                    row.cfa(),
                    row.register(X86_64::RA),
                    row.register(X86_64::RBP),
                );
                result.checked += 1;
            }
        }
        // Right after the FDE, unless another starts there: a gap.
        let end = fde.end_address();
        if !starts.contains(&end)
            && fdes
                .iter()
                .all(|f| !(f.initial_address() <= end && end < f.end_address()))
        {
            assert!(
                table.lookup(end).is_none(),
                "{}: {end:#x} should be a gap",
                path.display()
            );
            result.gaps_checked += 1;
        }
        covered_to = covered_to.max(fde.end_address());
    }
    result
}

fn check(path: &Path) {
    let c = compare_with_gimli(path);
    eprintln!("{}: {c:?}", path.display());
    assert!(c.rows > 0 && c.checked > 0);
    // The kernel gives up on very few rows (hand-written assembly).
    assert!(
        c.unsupported * 100 <= c.rows,
        "{}: {} of {} rows unsupported",
        path.display(),
        c.unsupported,
        c.rows
    );
}

#[test]
fn unwind_table_of_libc_matches_gimli() {
    check(Path::new(LIBC));
    check(Path::new("/lib64/ld-linux-x86-64.so.2"));
}

#[test]
fn unwind_tables_of_fixtures_match_gimli() {
    let dir = scratch_dir("unwind-tables");
    check(&build_c_fixture("cpu_split", NO_FRAME_POINTER_FLAGS, &dir));
    check(&build_c_fixture("qsort_cmp", NO_FRAME_POINTER_FLAGS, &dir));
    check(&build_c_fixture(
        "signal_chain",
        NO_FRAME_POINTER_FLAGS,
        &dir,
    ));
    check(&build_rust_fixture("rust_chain", &dir));
    // A large Rust binary: hearth itself.
    check(&hearth_bin());
}
