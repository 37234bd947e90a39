//! Building one file's unwind table from its call frame information
//! (`.eh_frame`, and `.debug_frame` for code `.eh_frame` does not cover).
//!
//! gimli evaluates every FDE's CFI program into rows (an address range
//! and the rules in force there); each row is reduced to the few rules the
//! kernel walker evaluates ([`Rule`]) and encoded as an 8-byte
//! [`UnwindRow`]. Rows are sorted, overlaps dropped (the first FDE to cover
//! an address wins, `.eh_frame` before `.debug_frame`), gaps between
//! functions get an explicit `UNWIND_CFA_NONE` row, and a row that repeats
//! its predecessor's rule is left out. A page index (the rows that can be
//! in force in each KiB of code) bounds the kernel's search. The format is
//! documented in `agent-ebpf/src/lib.rs`.

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, EndianSlice,
    LittleEndian, Register, RegisterRule, UnwindContext, UnwindOffset, UnwindSection,
    UnwindTableRow, X86_64,
};
use hearth_ebpf::UnwindPage;
use hearth_ebpf::{
    UnwindRow, UNWIND_CFA_END, UNWIND_CFA_FP, UNWIND_CFA_MASK, UNWIND_CFA_NONE, UNWIND_CFA_PLT,
    UNWIND_CFA_SIGNAL, UNWIND_CFA_SP, UNWIND_CFA_UNSUPPORTED, UNWIND_FP_LOST, UNWIND_MAX_FILE_ROWS,
    UNWIND_PAGE_SHIFT,
};
use object::{Object, ObjectSection};

/// Why a file has no table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("reading the file: {0}")]
    Io(std::io::Error),
    #[error("not an ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error("unsupported architecture {0:?} (x86-64 only)")]
    Architecture(object::Architecture),
    #[error("no call frame information (.eh_frame or .debug_frame)")]
    NoUnwindInfo,
    #[error("{0} rows: above the per-file limit of {UNWIND_MAX_FILE_ROWS}")]
    TooManyRows(usize),
    #[error("code spans {0:#x} bytes: above the 4 GiB a table can address")]
    TooLarge(u64),
}

/// How the CFA (the stack pointer before the call) is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cfa {
    /// Stack pointer + offset.
    Sp(i64),
    /// Frame pointer (rbp) + offset.
    Fp(i64),
    /// A PLT entry: rsp + 8, + 8 when `(pc & 15) >= threshold`.
    Plt { threshold: u8 },
    /// A signal trampoline: registers from the `ucontext` at rsp.
    Signal,
    /// The outermost frame: the return address is undefined.
    End,
    /// A rule the kernel walker does not evaluate.
    Unsupported,
}

/// Where the caller's frame pointer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SavedFp {
    /// Still in rbp.
    Same,
    /// Saved at CFA + offset.
    At(i64),
    /// Not recoverable.
    Lost,
}

/// What a row says, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    pub cfa: Cfa,
    pub fp: SavedFp,
}

impl Rule {
    /// The kernel's encoding: `(cfa_offset, rule, fp_offset)`. Offsets the
    /// format cannot hold make the rule unsupported.
    fn encode(self) -> (u16, u8, i8) {
        let unsupported = (0, UNWIND_CFA_UNSUPPORTED, UNWIND_FP_LOST);
        let fp = match self.fp {
            SavedFp::Same => 0,
            SavedFp::Lost => UNWIND_FP_LOST,
            SavedFp::At(offset) => match eighths(offset) {
                Some(n) if (-127..0).contains(&n) => n as i8,
                _ => UNWIND_FP_LOST,
            },
        };
        let cfa_units = |offset: i64| eighths(offset).and_then(|n| u16::try_from(n).ok());
        match self.cfa {
            Cfa::Sp(offset) => match cfa_units(offset) {
                Some(n) if n > 0 => (n, UNWIND_CFA_SP, fp),
                _ => unsupported,
            },
            Cfa::Fp(offset) => match cfa_units(offset) {
                Some(n) if n > 0 => (n, UNWIND_CFA_FP, fp),
                _ => unsupported,
            },
            Cfa::Plt { threshold } => (u16::from(threshold), UNWIND_CFA_PLT, fp),
            Cfa::Signal => (0, UNWIND_CFA_SIGNAL, 0),
            Cfa::End => (0, UNWIND_CFA_END, 0),
            Cfa::Unsupported => unsupported,
        }
    }
}

fn eighths(offset: i64) -> Option<i64> {
    (offset % 8 == 0).then_some(offset / 8)
}

/// Decodes a row as the kernel reads it; `None` for a gap row.
pub fn decode(row: &UnwindRow) -> Option<Rule> {
    let fp = match row.fp_offset {
        0 => SavedFp::Same,
        UNWIND_FP_LOST => SavedFp::Lost,
        n => SavedFp::At(i64::from(n) * 8),
    };
    let offset = i64::from(row.cfa_offset);
    let cfa = match row.rule & UNWIND_CFA_MASK {
        UNWIND_CFA_NONE => return None,
        UNWIND_CFA_SP => Cfa::Sp(offset * 8),
        UNWIND_CFA_FP => Cfa::Fp(offset * 8),
        UNWIND_CFA_PLT => Cfa::Plt {
            threshold: row.cfa_offset as u8,
        },
        UNWIND_CFA_SIGNAL => Cfa::Signal,
        UNWIND_CFA_END => Cfa::End,
        _ => Cfa::Unsupported,
    };
    Some(Rule { cfa, fp })
}

/// Counts gathered while building, for logs, tests and the `auto` mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSummary {
    /// FDEs with code, from either section.
    pub fdes: usize,
    /// FDEs taken from `.debug_frame` (not covered by `.eh_frame`).
    pub debug_frame_fdes: usize,
    /// FDEs of functions with a frame: some row has CFA = rbp + n, or
    /// rsp + n above the return address (they push or allocate).
    pub framed_fdes: usize,
    /// FDEs that set up a frame pointer (some row has CFA = rbp + n).
    pub frame_pointer_fdes: usize,
    /// FDEs that could not be parsed or evaluated (skipped).
    pub bad_fdes: usize,
    /// Rows (of gimli's, before compaction) the kernel cannot evaluate.
    pub unsupported_rows: usize,
}

/// One file's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwindTable {
    /// File address the rows' `pc` is relative to.
    pub base: u64,
    /// Sorted by `pc`, strictly increasing; the last row is a gap row.
    pub rows: Vec<UnwindRow>,
    /// Page index: entry `i` holds the rows that can be in force in page
    /// `i` (see `hearth_ebpf::UnwindPage`).
    pub pages: Vec<UnwindPage>,
    pub summary: TableSummary,
}

/// A row of gimli's, reduced to a [`Rule`] (tests build tables from
/// these).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    rule: Rule,
}

type Slice<'a> = EndianSlice<'a, LittleEndian>;

impl UnwindTable {
    /// Builds the table of an ELF image (a file's bytes, or the vDSO).
    ///
    /// Two passes keep memory at the size of the result: the FDEs' address
    /// ranges are listed and sorted first, then each FDE is evaluated in
    /// address order and its rows appended.
    pub fn from_elf(data: &[u8]) -> Result<UnwindTable, TableError> {
        let file = object::File::parse(data)?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(TableError::Architecture(file.architecture()));
        }
        let section_data = |name: &str| {
            file.section_by_name(name)
                .filter(|s| !is_compressed(s))
                .and_then(|s| Some((s.address(), s.data().ok()?)))
        };
        let mut bases = BaseAddresses::default();
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        let eh_frame = section_data(".eh_frame").map(|(address, data)| {
            let mut section = EhFrame::new(data, LittleEndian);
            section.set_address_size(8);
            (section, bases.clone().set_eh_frame(address))
        });
        let debug_frame = section_data(".debug_frame").map(|(_, data)| {
            let mut section = DebugFrame::new(data, LittleEndian);
            section.set_address_size(8);
            section
        });

        let mut summary = TableSummary::default();
        let mut fdes = Vec::new();
        if let Some((section, bases)) = &eh_frame {
            list_fdes(section, bases, Source::EhFrame, &mut fdes, &mut summary);
        }
        if let Some(section) = &debug_frame {
            // Only for code .eh_frame does not cover.
            let mut covered: Vec<(u64, u64)> = fdes.iter().map(|f| (f.start, f.end)).collect();
            covered.sort_unstable();
            let mut debug = Vec::new();
            list_fdes(
                section,
                &bases,
                Source::DebugFrame,
                &mut debug,
                &mut summary,
            );
            debug.retain(|f| {
                let i = covered.partition_point(|&(_, e)| e <= f.start);
                covered.get(i).is_none_or(|&(s, _)| s >= f.end)
            });
            fdes.extend(debug);
        }
        // Stable: at equal starts the first listed (.eh_frame) wins.
        fdes.sort_by_key(|f| f.start);
        let (Some(first), Some(end)) = (fdes.first(), fdes.iter().map(|f| f.end).max()) else {
            return Err(TableError::NoUnwindInfo);
        };
        if end - first.start > u64::from(u32::MAX) {
            return Err(TableError::TooLarge(end - first.start));
        }
        let mut writer = RowWriter::new(first.start);
        let mut eh_cies = HashMap::new();
        let mut debug_cies = HashMap::new();
        let mut ctx = Box::new(UnwindContext::new());
        for fde in &fdes {
            let evaluated = match (fde.source, &eh_frame, &debug_frame) {
                (Source::EhFrame, Some((section, bases)), _) => {
                    evaluate(section, bases, fde, &mut eh_cies, &mut ctx, &mut writer)
                }
                (Source::DebugFrame, _, Some(section)) => {
                    evaluate(section, &bases, fde, &mut debug_cies, &mut ctx, &mut writer)
                }
                _ => continue,
            };
            match evaluated {
                Ok(counts) => {
                    summary.fdes += 1;
                    summary.debug_frame_fdes += usize::from(fde.source == Source::DebugFrame);
                    summary.framed_fdes += usize::from(counts.framed);
                    summary.frame_pointer_fdes += usize::from(counts.frame_pointer);
                    summary.unsupported_rows += counts.unsupported_rows;
                }
                Err(_) => summary.bad_fdes += 1,
            }
        }
        let rows = writer.finish();
        if rows.len() > UNWIND_MAX_FILE_ROWS as usize {
            return Err(TableError::TooManyRows(rows.len()));
        }
        if rows.len() <= 1 {
            return Err(TableError::NoUnwindInfo);
        }
        Ok(UnwindTable {
            base: first.start,
            pages: page_index(&rows),
            rows,
            summary,
        })
    }

    #[cfg(test)]
    fn from_spans(mut spans: Vec<Span>, summary: TableSummary) -> Result<UnwindTable, TableError> {
        spans.sort_by_key(|s| s.start);
        let base = spans[0].start;
        let mut writer = RowWriter::new(base);
        for span in &spans {
            writer.span(span.start, span.end, span.rule.encode());
        }
        let rows = writer.finish();
        Ok(UnwindTable {
            base,
            pages: page_index(&rows),
            rows,
            summary,
        })
    }

    /// The rule in force at file address `address`; `None` in a gap or
    /// outside the table. The same search the kernel does.
    pub fn lookup(&self, address: u64) -> Option<Rule> {
        let relative = u32::try_from(address.checked_sub(self.base)?).ok()?;
        // As the kernel: the page index bounds the search.
        let page = (relative >> UNWIND_PAGE_SHIFT) as usize;
        let (first, end) = match self.pages.get(page) {
            Some(p) => (
                p.first as usize,
                (p.first as usize + p.count as usize).min(self.rows.len()),
            ),
            None => (0, self.rows.len()),
        };
        let rows = self.rows.get(first..end)?;
        let below = rows.partition_point(|r| r.pc <= relative);
        decode(rows.get(below.checked_sub(1)?)?)
    }

    /// Bytes the rows and the page index take in the kernel.
    pub fn bytes(&self) -> usize {
        self.rows.len() * std::mem::size_of::<UnwindRow>()
            + self.pages.len() * std::mem::size_of::<UnwindPage>()
    }

    /// The code was built with frame pointers: most functions that have a
    /// frame at all set one up. (Leaf functions often have none even
    /// then, and code without frame pointers sets one up only for
    /// `alloca` or stack realignment: 2.5% of glibc's framed functions.)
    pub fn has_frame_pointers(&self) -> bool {
        let s = &self.summary;
        s.framed_fdes > 0 && s.frame_pointer_fdes * 2 >= s.framed_fdes
    }
}

/// The page index of `rows` (sorted, starting at pc 0).
fn page_index(rows: &[UnwindRow]) -> Vec<UnwindPage> {
    let Some(last) = rows.last() else {
        return Vec::new();
    };
    let pages = (last.pc >> UNWIND_PAGE_SHIFT) as usize + 1;
    // first[i]: the row in force at the start of page i.
    let mut first = Vec::with_capacity(pages + 1);
    let mut row = 0usize;
    for page in 0..pages {
        let at = (page as u32) << UNWIND_PAGE_SHIFT;
        while row + 1 < rows.len() && rows[row + 1].pc <= at {
            row += 1;
        }
        first.push(row as u32);
    }
    (0..pages)
        .map(|i| {
            // Up to and including the row in force at the next page's
            // start (it may start inside this page).
            let end = first.get(i + 1).map_or(rows.len() as u32, |&next| next + 1);
            UnwindPage {
                first: first[i],
                count: end - first[i],
            }
        })
        .collect()
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    (a.cfa_offset, a.rule, a.fp_offset) == (b.cfa_offset, b.rule, b.fp_offset)
}

fn is_compressed(section: &object::Section<'_, '_>) -> bool {
    match section.flags() {
        object::SectionFlags::Elf { sh_flags } => {
            sh_flags & u64::from(object::elf::SHF_COMPRESSED) != 0
        }
        _ => false,
    }
}

/// Which section an FDE is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    EhFrame,
    DebugFrame,
}

/// An FDE's address range and where to find it again.
#[derive(Debug, Clone, Copy)]
struct FdeRef {
    start: u64,
    end: u64,
    offset: usize,
    source: Source,
}

/// Lists the FDEs (with code) of `section`.
fn list_fdes<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    source: Source,
    fdes: &mut Vec<FdeRef>,
    summary: &mut TableSummary,
) where
    S: UnwindSection<Slice<'a>>,
{
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'a>>> = HashMap::new();
    let mut entries = section.entries(bases);
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            // A malformed entry: its length cannot be trusted, so nothing
            // after it can be found either.
            Err(_) => {
                summary.bad_fdes += 1;
                break;
            }
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let offset = partial.offset();
        match partial.parse(|section, bases, cie| cached_cie(&mut cies, section, bases, cie)) {
            Ok(fde) if fde.end_address() > fde.initial_address() => fdes.push(FdeRef {
                start: fde.initial_address(),
                end: fde.end_address(),
                offset,
                source,
            }),
            Ok(_) => {}
            Err(_) => summary.bad_fdes += 1,
        }
    }
}

fn cached_cie<'a, S: UnwindSection<Slice<'a>>>(
    cies: &mut HashMap<usize, CommonInformationEntry<Slice<'a>>>,
    section: &S,
    bases: &BaseAddresses,
    offset: S::Offset,
) -> gimli::Result<CommonInformationEntry<Slice<'a>>> {
    let key = UnwindOffset::into(offset);
    if let Some(cie) = cies.get(&key) {
        return Ok(cie.clone());
    }
    let cie = section.cie_from_offset(bases, offset)?;
    cies.insert(key, cie.clone());
    Ok(cie)
}

/// What evaluating one FDE found.
#[derive(Debug, Default)]
struct FdeCounts {
    framed: bool,
    frame_pointer: bool,
    unsupported_rows: usize,
}

/// Evaluates one FDE's rows into `writer`.
fn evaluate<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    fde: &FdeRef,
    cies: &mut HashMap<usize, CommonInformationEntry<Slice<'a>>>,
    ctx: &mut UnwindContext<usize>,
    writer: &mut RowWriter,
) -> gimli::Result<FdeCounts>
where
    S: UnwindSection<Slice<'a>>,
{
    let parsed = section
        .partial_fde_from_offset(bases, S::Offset::from(fde.offset))?
        .parse(|section, bases, cie| cached_cie(cies, section, bases, cie))?;
    let signal = parsed.is_signal_trampoline();
    let mut counts = FdeCounts::default();
    // Rows go to a buffer first: an FDE that fails half-way adds none.
    let mut rows = Vec::new();
    let mut table = parsed.rows(section, bases, ctx)?;
    while let Some(row) = table.next_row()? {
        let rule = rule_of(row, section, signal);
        counts.frame_pointer |= matches!(rule.cfa, Cfa::Fp(_));
        counts.framed |= matches!(rule.cfa, Cfa::Fp(_) | Cfa::Sp(9..));
        counts.unsupported_rows += usize::from(rule.cfa == Cfa::Unsupported);
        rows.push((row.start_address(), row.end_address(), rule.encode()));
    }
    for (start, end, encoded) in rows {
        writer.span(start, end, encoded);
    }
    Ok(counts)
}

/// Appends rows in address order: overlaps trimmed (the first to cover an
/// address wins), gaps marked, repeats of the previous rule left out.
struct RowWriter {
    base: u64,
    rows: Vec<UnwindRow>,
    covered_to: Option<u64>,
}

const GAP: (u16, u8, i8) = (0, UNWIND_CFA_NONE, 0);

impl RowWriter {
    fn new(base: u64) -> Self {
        RowWriter {
            base,
            rows: Vec::new(),
            covered_to: None,
        }
    }

    /// `[start, end)` follows `encoded`; `start` is at or after every
    /// earlier span's start.
    fn span(&mut self, start: u64, end: u64, encoded: (u16, u8, i8)) {
        let start = self.covered_to.map_or(start, |c| start.max(c));
        if start >= end {
            return; // overlapped by an earlier FDE
        }
        if let Some(c) = self.covered_to {
            if start > c {
                self.push(c, GAP);
            }
        }
        self.push(start, encoded);
        self.covered_to = Some(end);
    }

    fn push(&mut self, at: u64, (cfa_offset, rule, fp_offset): (u16, u8, i8)) {
        let row = UnwindRow {
            pc: (at - self.base) as u32,
            cfa_offset,
            rule,
            fp_offset,
        };
        match self.rows.last_mut() {
            // Same rule as the row before: redundant.
            Some(last) if same_rule(last, &row) => {}
            // Same address (a zero-length range before): replaced.
            Some(last) if last.pc == row.pc => *last = row,
            _ => self.rows.push(row),
        }
    }

    fn finish(mut self) -> Vec<UnwindRow> {
        if let Some(c) = self.covered_to {
            self.push(c, GAP);
        }
        self.rows.shrink_to_fit();
        self.rows
    }
}

/// `DW_OP_breg7 (rsp) 8; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and;
/// DW_OP_litN; DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus`: the CFA of
/// x86-64 PLT entries (rsp + 8, + 8 once the entry has pushed).
const PLT_PREFIX: [u8; 6] = [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a];
const PLT_SUFFIX: [u8; 4] = [0x2a, 0x33, 0x24, 0x22];
const DW_OP_LIT0: u8 = 0x30;
/// `DW_OP_breg7 (rsp) 160; DW_OP_deref`: glibc's `__restore_rt`, whose CFA
/// is the interrupted rsp saved in the `ucontext` at rsp.
const SIGNAL_CFA: [u8; 4] = [0x77, 0xa0, 0x01, 0x06];

fn rule_of<'a, S: UnwindSection<Slice<'a>>>(
    row: &UnwindTableRow<usize>,
    section: &S,
    signal: bool,
) -> Rule {
    let unsupported = Rule {
        cfa: Cfa::Unsupported,
        fp: SavedFp::Lost,
    };
    let ra = row.register(X86_64::RA);
    if matches!(ra, Some(RegisterRule::Undefined)) {
        return Rule {
            cfa: Cfa::End,
            fp: SavedFp::Same,
        };
    }
    let expression =
        |e: &gimli::UnwindExpression<usize>| e.get(section).ok().map(|e| e.0.slice().to_vec());
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => match *register {
            X86_64::RSP => Cfa::Sp(*offset),
            X86_64::RBP => Cfa::Fp(*offset),
            _ => Cfa::Unsupported,
        },
        CfaRule::Expression(e) => match expression(e) {
            Some(bytes) if signal && bytes == SIGNAL_CFA => {
                return Rule {
                    cfa: Cfa::Signal,
                    fp: SavedFp::Same,
                }
            }
            Some(bytes) => {
                plt_threshold(&bytes).map_or(Cfa::Unsupported, |t| Cfa::Plt { threshold: t })
            }
            None => Cfa::Unsupported,
        },
    };
    if cfa == Cfa::Unsupported {
        return unsupported;
    }
    // The return address must be where the kernel reads it (CFA-8; the
    // default rule on entry is that too).
    match ra {
        Some(RegisterRule::Offset(-8)) => {}
        _ => return unsupported,
    }
    Rule {
        cfa,
        fp: saved_fp(row.register(X86_64::RBP)),
    }
}

fn plt_threshold(bytes: &[u8]) -> Option<u8> {
    let rest = bytes.strip_prefix(&PLT_PREFIX)?;
    let (&lit, rest) = rest.split_first()?;
    (rest == PLT_SUFFIX && (DW_OP_LIT0..DW_OP_LIT0 + 32).contains(&lit)).then(|| lit - DW_OP_LIT0)
}

fn saved_fp(rule: Option<RegisterRule<usize>>) -> SavedFp {
    match rule {
        None | Some(RegisterRule::SameValue) => SavedFp::Same,
        Some(RegisterRule::Offset(offset)) => SavedFp::At(offset),
        Some(RegisterRule::Register(Register(6))) => SavedFp::Same,
        Some(_) => SavedFp::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: u64, end: u64, cfa: Cfa) -> Span {
        Span {
            start,
            end,
            rule: Rule {
                cfa,
                fp: SavedFp::Same,
            },
        }
    }

    #[test]
    fn rows_are_sorted_gapped_and_compact() {
        let spans = vec![
            span(0x1010, 0x1020, Cfa::Sp(16)),
            span(0x1000, 0x1001, Cfa::Sp(8)),
            span(0x1001, 0x1010, Cfa::Sp(16)),
            // Overlaps the first: dropped where it overlaps.
            span(0x1018, 0x1030, Cfa::Fp(16)),
            span(0x1040, 0x1050, Cfa::Plt { threshold: 11 }),
        ];
        let table = UnwindTable::from_spans(spans, TableSummary::default()).unwrap();
        assert_eq!(table.base, 0x1000);
        let pcs: Vec<u32> = table.rows.iter().map(|r| r.pc).collect();
        // 0x1010 repeats 0x1001's rule; 0x1030 starts a gap.
        assert_eq!(pcs, [0x0, 0x1, 0x20, 0x30, 0x40, 0x50]);
        assert_eq!(table.lookup(0x1000).unwrap().cfa, Cfa::Sp(8));
        assert_eq!(table.lookup(0x101f).unwrap().cfa, Cfa::Sp(16));
        assert_eq!(table.lookup(0x1020).unwrap().cfa, Cfa::Fp(16));
        assert_eq!(table.lookup(0x1035), None);
        assert_eq!(
            table.lookup(0x1041).unwrap().cfa,
            Cfa::Plt { threshold: 11 }
        );
        assert_eq!(table.lookup(0x1050), None);
        assert_eq!(table.lookup(0xfff), None);
        assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
    }

    #[test]
    fn offsets_the_format_cannot_hold_are_unsupported() {
        let rule = |cfa, fp| Rule { cfa, fp }.encode();
        assert_eq!(rule(Cfa::Sp(12), SavedFp::Same).1, UNWIND_CFA_UNSUPPORTED);
        assert_eq!(
            rule(Cfa::Sp(8 << 16), SavedFp::Same).1,
            UNWIND_CFA_UNSUPPORTED
        );
        assert_eq!(rule(Cfa::Sp(-8), SavedFp::Same).1, UNWIND_CFA_UNSUPPORTED);
        assert_eq!(rule(Cfa::Sp(8 * 0xffff), SavedFp::Same).0, 0xffff);
        assert_eq!(rule(Cfa::Fp(16), SavedFp::At(-2048)).2, UNWIND_FP_LOST);
        assert_eq!(rule(Cfa::Fp(16), SavedFp::At(-16)).2, -2);
        for r in [
            Rule {
                cfa: Cfa::Sp(0x1238),
                fp: SavedFp::At(-56),
            },
            Rule {
                cfa: Cfa::Plt { threshold: 10 },
                fp: SavedFp::Same,
            },
            Rule {
                cfa: Cfa::End,
                fp: SavedFp::Same,
            },
        ] {
            let (cfa_offset, rule, fp_offset) = r.encode();
            let row = UnwindRow {
                pc: 0,
                cfa_offset,
                rule,
                fp_offset,
            };
            assert_eq!(decode(&row), Some(r));
        }
    }

    #[test]
    fn plt_expression_is_recognized() {
        let mut bytes = PLT_PREFIX.to_vec();
        bytes.push(DW_OP_LIT0 + 11);
        bytes.extend_from_slice(&PLT_SUFFIX);
        assert_eq!(plt_threshold(&bytes), Some(11));
        bytes[2] = 0x81;
        assert_eq!(plt_threshold(&bytes), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            UnwindTable::from_elf(b"\x7fELF garbage"),
            Err(TableError::Elf(_))
        ));
        assert!(UnwindTable::from_elf(&[]).is_err());
    }

    #[test]
    fn libc_table_is_sorted_and_covers_its_functions() {
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("libc");
        let table = UnwindTable::from_elf(&data).unwrap();
        assert!(table.summary.fdes > 1000, "{:?}", table.summary);
        assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(table.rows.windows(2).all(|w| !same_rule(&w[0], &w[1])));
        assert_eq!(table.rows.last().unwrap().rule, UNWIND_CFA_NONE);
        // Page i points at the row in force at i << shift.
        for (i, page) in table.pages.iter().enumerate() {
            let at = (i as u32) << UNWIND_PAGE_SHIFT;
            let r = page.first as usize;
            assert!(table.rows[r].pc <= at);
            assert!(table.rows.get(r + 1).is_none_or(|next| next.pc > at));
            // Every row starting in the page is among its rows.
            let end = r + page.count as usize;
            assert!(table.rows[end..]
                .first()
                .is_none_or(|next| next.pc >= at + (1 << UNWIND_PAGE_SHIFT)));
        }
        // Lookups through the index agree with a search of every row.
        for row in table.rows.iter().step_by(7) {
            for delta in [0u64, 1, 37] {
                let address = table.base + u64::from(row.pc) + delta;
                let relative = (address - table.base) as u32;
                let full = table.rows.partition_point(|r| r.pc <= relative);
                let expected = decode(&table.rows[full - 1]);
                assert_eq!(table.lookup(address), expected, "at {address:#x}");
            }
        }
        // glibc is built without frame pointers.
        assert!(!table.has_frame_pointers(), "{:?}", table.summary);
    }
}
