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

impl TableSummary {
    /// See [`UnwindTable::has_frame_pointers`].
    pub fn has_frame_pointers(&self) -> bool {
        self.framed_fdes > 0 && self.frame_pointer_fdes * 2 >= self.framed_fdes
    }
}

/// What building within a row budget gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Built {
    /// The table: at most the budget's rows.
    Table(UnwindTable),
    /// More rows than the budget: counted (exactly, as the table would
    /// have them), not kept.
    TooBig {
        rows: usize,
        /// The most rows held at once while counting (at most the budget).
        held: usize,
        summary: TableSummary,
    },
}

impl From<UnwindTable> for Built {
    fn from(table: UnwindTable) -> Built {
        Built::Table(table)
    }
}

/// Bytes of call frame information per row, about: 5 to 6 in glibc,
/// libstdc++, libcrypto, bash, librustc_driver and libLLVM (0.17 to 0.20
/// rows a byte); 4 makes the estimate a little above most files' count.
const CFI_BYTES_PER_ROW: usize = 4;

/// Estimated rows (8 MiB of them) from which a table is counted before it
/// is built, to be held in one allocation of its size: a few files
/// (libLLVM, librustc_driver, browsers) whose build sets the agent's peak
/// memory (libLLVM: 30.2 → 23.7 MiB with the sort in place and 24-byte
/// FDE references), at the cost of a second pass (about +60% of its
/// build time, once per file).
const BIG_TABLE_ROWS: usize = 1 << 20;

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
    pub fn from_elf(data: &[u8]) -> Result<UnwindTable, TableError> {
        match UnwindTable::from_elf_within(data, UNWIND_MAX_FILE_ROWS as usize)? {
            Built::Table(table) => Ok(table),
            // Past the per-file limit is an error before it is too big.
            Built::TooBig { rows, .. } => Err(TableError::TooManyRows(rows)),
        }
    }

    /// Builds the table of an ELF image if it has at most `budget` rows;
    /// a larger one is only counted ([`Built::TooBig`]), holding at most
    /// `budget` rows at any time, and none at all when the size of its
    /// call frame information says it is likely too big.
    ///
    /// Two passes keep memory at the size of the result: the FDEs' address
    /// ranges are listed and sorted first, then each FDE is evaluated in
    /// address order and its rows appended.
    pub fn from_elf_within(data: &[u8], budget: usize) -> Result<Built, TableError> {
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
        let mut cfi_bytes = 0;
        let eh_frame = section_data(".eh_frame").map(|(address, data)| {
            cfi_bytes += data.len();
            let mut section = EhFrame::new(data, LittleEndian);
            section.set_address_size(8);
            (section, bases.clone().set_eh_frame(address))
        });
        let debug_frame = section_data(".debug_frame").map(|(_, data)| {
            cfi_bytes += data.len();
            let mut section = DebugFrame::new(data, LittleEndian);
            section.set_address_size(8);
            section
        });

        let mut listed = TableSummary::default();
        let mut fdes = Vec::new();
        if let Some((section, bases)) = &eh_frame {
            list_fdes(section, bases, Source::EhFrame, &mut fdes, &mut listed);
        }
        if let Some(section) = &debug_frame {
            // Only for code .eh_frame does not cover.
            let mut covered: Vec<(u64, u64)> = fdes.iter().map(|f| (f.start, f.end)).collect();
            covered.sort_unstable();
            let mut debug = Vec::new();
            list_fdes(section, &bases, Source::DebugFrame, &mut debug, &mut listed);
            debug.retain(|f| {
                let i = covered.partition_point(|&(_, e)| e <= f.start);
                covered.get(i).is_none_or(|&(s, _)| s >= f.end)
            });
            fdes.extend(debug);
        }
        // As a stable sort by start (at equal starts the first listed,
        // .eh_frame, wins: each section is listed in offset order), in
        // place.
        fdes.sort_unstable_by_key(|f| (f.start, f.source, f.offset));
        let (Some(first), Some(end)) = (fdes.first(), fdes.iter().map(|f| f.end).max()) else {
            return Err(TableError::NoUnwindInfo);
        };
        if end - first.start > u64::from(u32::MAX) {
            return Err(TableError::TooLarge(end - first.start));
        }
        let sections = Sections {
            eh_frame: eh_frame.as_ref(),
            debug_frame: debug_frame.as_ref(),
            bases: &bases,
        };
        let pass = |budget, reserve| sections.evaluate(&fdes, first.start, budget, reserve, listed);
        // Likely too big: counted first, so that a table that does not
        // fit never has its rows in memory (and one that does is built
        // twice, which the estimate keeps rare). A big one is counted
        // first too, to hold its rows in one allocation of their size
        // rather than in a doubling vector (up to twice that, and three
        // times while it moves).
        let estimate = cfi_bytes / CFI_BYTES_PER_ROW;
        if estimate > budget || estimate > BIG_TABLE_ROWS {
            let counted = pass(0, 0);
            if counted.count > budget || counted.count <= 1 {
                return counted.finish(first.start);
            }
            return pass(budget, counted.count).finish(first.start);
        }
        pass(budget, 0).finish(first.start)
    }

    #[cfg(test)]
    fn from_spans(mut spans: Vec<Span>, summary: TableSummary) -> Result<UnwindTable, TableError> {
        spans.sort_by_key(|s| s.start);
        let base = spans[0].start;
        let mut writer = RowWriter::new(base, usize::MAX);
        for span in &spans {
            writer.span(span.start, span.end, span.rule.encode());
        }
        let (rows, _, _) = writer.finish();
        let rows = rows.unwrap_or_default();
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
        self.summary.has_frame_pointers()
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

/// The sections a table is built from.
struct Sections<'s, 'a> {
    eh_frame: Option<&'s (EhFrame<Slice<'a>>, BaseAddresses)>,
    debug_frame: Option<&'s DebugFrame<Slice<'a>>>,
    bases: &'s BaseAddresses,
}

/// One pass over the FDEs.
struct Pass {
    /// The rows, when there are at most the budget's.
    rows: Option<Vec<UnwindRow>>,
    count: usize,
    held: usize,
    summary: TableSummary,
}

impl Sections<'_, '_> {
    /// Evaluates `fdes` (sorted) in address order, keeping the rows while
    /// there are at most `budget` (room for `reserve` made at once).
    fn evaluate(
        &self,
        fdes: &[FdeRef],
        base: u64,
        budget: usize,
        reserve: usize,
        listed: TableSummary,
    ) -> Pass {
        let mut summary = listed;
        let mut writer = RowWriter::new(base, budget);
        writer.rows.reserve_exact(reserve.min(budget));
        let mut eh_cies = HashMap::new();
        let mut debug_cies = HashMap::new();
        let mut ctx = Box::new(UnwindContext::new());
        for fde in fdes {
            let evaluated = match (fde.source, self.eh_frame, self.debug_frame) {
                (Source::EhFrame, Some((section, bases)), _) => {
                    evaluate(section, bases, fde, &mut eh_cies, &mut ctx, &mut writer)
                }
                (Source::DebugFrame, _, Some(section)) => evaluate(
                    section,
                    self.bases,
                    fde,
                    &mut debug_cies,
                    &mut ctx,
                    &mut writer,
                ),
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
        let (rows, count, held) = writer.finish();
        Pass {
            rows,
            count,
            held,
            summary,
        }
    }
}

impl Pass {
    fn finish(self, base: u64) -> Result<Built, TableError> {
        if self.count > UNWIND_MAX_FILE_ROWS as usize {
            return Err(TableError::TooManyRows(self.count));
        }
        if self.count <= 1 {
            return Err(TableError::NoUnwindInfo);
        }
        Ok(match self.rows {
            Some(rows) => Built::Table(UnwindTable {
                base,
                pages: page_index(&rows),
                rows,
                summary: self.summary,
            }),
            None => Built::TooBig {
                rows: self.count,
                held: self.held,
                summary: self.summary,
            },
        })
    }
}

/// Which section an FDE is in (`.eh_frame` first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    EhFrame,
    DebugFrame,
}

/// An FDE's address range and where to find it again (24 bytes: a large
/// library has 100 000s).
#[derive(Debug, Clone, Copy)]
struct FdeRef {
    start: u64,
    end: u64,
    offset: u32,
    source: Source,
}

const _: () = assert!(std::mem::size_of::<FdeRef>() == 24);

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
        let Ok(offset) = u32::try_from(partial.offset()) else {
            summary.bad_fdes += 1;
            continue;
        };
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
        .partial_fde_from_offset(bases, S::Offset::from(fde.offset as usize))?
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
/// Past `budget` rows it only counts them.
struct RowWriter {
    base: u64,
    /// The rows, while there are at most `budget`.
    rows: Vec<UnwindRow>,
    budget: usize,
    /// Rows appended so far, kept or not.
    count: usize,
    /// The most rows held at once.
    held: usize,
    /// The last row appended, kept or not.
    last: Option<UnwindRow>,
    covered_to: Option<u64>,
}

const GAP: (u16, u8, i8) = (0, UNWIND_CFA_NONE, 0);

impl RowWriter {
    fn new(base: u64, budget: usize) -> Self {
        RowWriter {
            base,
            rows: Vec::new(),
            budget,
            count: 0,
            held: 0,
            last: None,
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
        match self.last {
            // Same rule as the row before: redundant.
            Some(last) if same_rule(&last, &row) => return,
            // Same address (a zero-length range before): replaced.
            Some(last) if last.pc == row.pc => {
                if let Some(kept) = self.rows.last_mut() {
                    *kept = row;
                }
            }
            _ => self.append(row),
        }
        self.last = Some(row);
    }

    fn append(&mut self, row: UnwindRow) {
        self.count += 1;
        if self.count > self.budget {
            // Over the budget: the rest is only counted.
            if self.rows.capacity() > 0 {
                self.rows = Vec::new();
            }
            return;
        }
        if self.rows.len() == self.rows.capacity() {
            // Doubling, but never past the budget.
            let more = self.rows.len().max(1024).min(self.budget - self.rows.len());
            self.rows.reserve_exact(more);
        }
        self.rows.push(row);
        self.held = self.rows.len();
    }

    /// The rows (unless past the budget), how many there are and the
    /// most held at once.
    fn finish(mut self) -> (Option<Vec<UnwindRow>>, usize, usize) {
        if let Some(c) = self.covered_to {
            self.push(c, GAP);
        }
        if self.count > self.budget {
            return (None, self.count, self.held);
        }
        self.rows.shrink_to_fit();
        (Some(self.rows), self.count, self.held)
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

    fn libc() -> Vec<u8> {
        std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("libc")
    }

    #[test]
    fn a_table_within_its_budget_is_built_as_without_one() {
        let data = libc();
        let full = UnwindTable::from_elf(&data).unwrap();
        let rows = full.rows.len();
        let file = object::File::parse(&*data).unwrap();
        let eh_frame = file.section_by_name(".eh_frame").unwrap().size() as usize;
        let estimate = eh_frame / CFI_BYTES_PER_ROW;
        // At its row count it is counted first (the estimate is above),
        // above the estimate built at once: the same table either way.
        assert!(estimate > rows, "{estimate} {rows}");
        for budget in [rows, estimate + 1, usize::MAX] {
            let built = UnwindTable::from_elf_within(&data, budget).unwrap();
            assert!(built == Built::Table(full.clone()), "budget {budget}");
        }
    }

    #[test]
    fn a_table_over_its_budget_is_counted_without_holding_its_rows() {
        let data = libc();
        let full = UnwindTable::from_elf(&data).unwrap();
        for budget in [0, 100, full.rows.len() - 1] {
            let built = UnwindTable::from_elf_within(&data, budget).unwrap();
            let Built::TooBig {
                rows,
                held,
                summary,
            } = built
            else {
                panic!("budget {budget}: built");
            };
            assert_eq!(rows, full.rows.len(), "budget {budget}");
            assert_eq!(summary, full.summary);
            // The size of its call frame information gave it away.
            assert_eq!(held, 0, "budget {budget}");
        }
    }

    #[test]
    fn a_writer_past_its_budget_drops_its_rows_and_keeps_counting() {
        let spans: Vec<Span> = (0..500u64)
            .map(|i| {
                let cfa = match i % 3 {
                    0 => Cfa::Sp(8),
                    1 => Cfa::Sp(16),
                    _ => Cfa::Fp(16),
                };
                // Every fifth function is followed by a gap.
                span(i * 16, i * 16 + 12 + 4 * u64::from(i % 5 != 0), cfa)
            })
            .collect();
        let write = |budget| {
            let mut writer = RowWriter::new(0, budget);
            for s in &spans {
                writer.span(s.start, s.end, s.rule.encode());
            }
            writer.finish()
        };
        let (Some(all), count, held) = write(usize::MAX) else {
            panic!("no rows without a budget");
        };
        assert_eq!((all.len(), held), (count, count));
        assert!(count > 500, "{count}");
        assert_eq!(write(count), (Some(all.clone()), count, count));
        assert_eq!(write(count - 1), (None, count, count - 1));
        assert_eq!(write(10), (None, count, 10));
        assert_eq!(write(0), (None, count, 0));
    }

    #[test]
    fn libc_table_is_sorted_and_covers_its_functions() {
        let table = UnwindTable::from_elf(&libc()).unwrap();
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
