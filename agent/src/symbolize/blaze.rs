//! [`BlazeSymbolizer`]: the [`Symbolize`] used in production, on blazesym.
//!
//! How files reach blazesym: blazesym's `Symbolizer` caches parsed files
//! keyed by *path* (and, with auto-reload, re-`stat`s that path on every
//! lookup to notice changes). The paths a process's files can be opened by
//! (`/proc/<pid>/map_files/...`) die with the process and can come back
//! naming a different file once the pid is reused, so they make poor cache
//! keys. Instead each cached file holds an open handle and blazesym is given
//! `/proc/self/fd/<fd>`: unique while the handle is open, valid whatever
//! happens to the process that mapped the file, and — because the open
//! handle keeps the inode alive — the `(device, inode)` key we cache by
//! cannot be reused for another file while the entry exists. Auto-reload is
//! off (the file behind a handle never changes); when an entry is evicted
//! its path is evicted from blazesym before the handle is closed, so a
//! recycled fd number starts fresh. The cost is one extra descriptor per
//! cached file (blazesym holds its own), bounded by
//! [`SymbolizerConfig::max_files`].

use std::collections::hash_map::Entry;
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Process, Source};
use blazesym::symbolize::{evict, CodeInfo, Input, Sym, Symbolized, Symbolizer};
use blazesym::Pid;
use tracing::{debug, warn};

use crate::incarnation::{Capture, Image, ProcessKey};
use crate::process::start_time;
use crate::profile::{Frame, FrameId, FrameKind, Mapping, MappingId, ProfileBuilder};

use super::kernel::KernelSymbols;
use super::maps::{Backing, FileKey, MapEntry, ProcMaps};
use super::{hex, intern, IntMap, Symbolize, SymbolizerStats, UNKNOWN};

/// Bounds and policies of [`BlazeSymbolizer`]'s caches. Windows are drain
/// windows (calls to [`Symbolize::end_window`]).
#[derive(Debug, Clone)]
pub struct SymbolizerConfig {
    /// Use DWARF (source lines, inlined functions) when a file has it.
    pub debug_syms: bool,
    /// Processes whose mappings are cached; least recently sampled go first.
    pub max_processes: usize,
    /// A process not sampled for this many windows is forgotten.
    pub process_idle_windows: u64,
    /// A process's mappings are re-read when older than this many windows
    /// (catches a library replaced at the same address and reused pids).
    pub maps_max_age_windows: u64,
    /// Files kept open and parsed; each costs two descriptors and its
    /// parsed symbols. Least recently used go first.
    pub max_files: usize,
    /// A file not used for this many windows is closed.
    pub file_idle_windows: u64,
    /// Symbolized offsets cached per file; the file's cache restarts empty
    /// when full.
    pub max_offsets_per_file: usize,
    /// Symbolized offsets cached over all files; least recently used files
    /// are dropped beyond it.
    pub max_cached_offsets: usize,
    /// Kernel addresses cached; the cache restarts empty when full.
    pub max_kernel_addresses: usize,
}

impl Default for SymbolizerConfig {
    fn default() -> Self {
        Self {
            debug_syms: true,
            max_processes: 4096,
            process_idle_windows: 60,
            maps_max_age_windows: 30,
            max_files: 256,
            file_idle_windows: 600,
            max_offsets_per_file: 32 * 1024,
            max_cached_offsets: 256 * 1024,
            max_kernel_addresses: 64 * 1024,
        }
    }
}

/// A file whose symbolization failed this many times without ever
/// succeeding is not handed to blazesym again (not an ELF file, corrupt
/// debug info): its addresses become placeholders.
const MAX_FAILURES_WITHOUT_SUCCESS: u32 = 8;

/// The profile-independent part of a symbolized [`Frame`].
#[derive(Debug, Clone)]
struct CachedFrame {
    function: Arc<str>,
    file: Option<Arc<str>>,
    line: Option<u32>,
    inlined: bool,
    /// False for `[file+0x…]` placeholders.
    symbolized: bool,
}

/// The frames of one address: inlined ones innermost first, then the
/// function they were inlined into.
type Frames = Arc<[CachedFrame]>;

/// What we know of one process image.
#[derive(Debug)]
struct ProcessEntry {
    maps: ProcMaps,
    /// What was captured while it ran (exec'd images): its mappings and
    /// open handles to its files.
    capture: Option<Arc<Capture>>,
    /// `/proc/<pid>` still describes this image: its maps may be re-read
    /// and its files opened through `map_files`. False once it ended.
    live: bool,
    /// False when the mappings could not be read when the process was
    /// first seen (it had already exited): all its frames are `[unknown]`.
    readable: bool,
    /// Window of the last read of `/proc/<pid>/maps`.
    read_window: u64,
    last_used: u64,
    /// Files this process's `map_files` could not open since the last
    /// read of its maps; not retried for every frame.
    unopenable: Vec<FileKey>,
}

impl ProcessEntry {
    fn load(process: ProcessKey, window: u64, stats: &mut SymbolizerStats) -> Self {
        // Images not known from /proc (captured ones are adopted, not
        // loaded) have nothing to read.
        let live = matches!(process.image, Image::Started(_));
        let maps = if live {
            read_maps(process.pid, stats).unwrap_or_default()
        } else {
            ProcMaps::default()
        };
        Self {
            // A zombie's maps read as empty: as good as gone.
            readable: !maps.is_empty(),
            maps,
            capture: None,
            live,
            read_window: window,
            last_used: window,
            unopenable: Vec::new(),
        }
    }

    /// Re-reads the mappings; keeps the old ones if the process has exited
    /// meanwhile (they still describe its samples).
    fn refresh(&mut self, pid: u32, window: u64, stats: &mut SymbolizerStats) {
        self.read_window = window;
        if !self.live {
            return;
        }
        if let Some(maps) = read_maps(pid, stats).filter(|m| !m.is_empty()) {
            self.maps = maps;
            self.unopenable.clear();
        }
    }
}

fn read_maps(pid: u32, stats: &mut SymbolizerStats) -> Option<ProcMaps> {
    stats.process_maps_reads += 1;
    match ProcMaps::read(pid) {
        Ok(maps) => Some(maps),
        Err(err) => {
            // Gone (or going) is normal; anything else is worth counting.
            let gone =
                err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ESRCH);
            if !gone {
                stats.errors += 1;
                debug!(pid, %err, "cannot read /proc/<pid>/maps");
            }
            None
        }
    }
}

/// Where blazesym reads a file's symbols from.
#[derive(Debug)]
enum FileSource {
    /// An ELF file: our handle to it and its `/proc/self/fd/` path.
    Elf { _handle: File, path: PathBuf },
    /// The vDSO, read from our own process (it is the same image in every
    /// process of the same ABI).
    Vdso,
}

/// One mapped file and what was learned about it.
#[derive(Debug)]
struct FileEntry {
    source: FileSource,
    build_id: Option<Arc<str>>,
    /// File name for placeholder frames.
    name: Arc<str>,
    offsets: IntMap<u64, Frames>,
    /// Names shared by the frames in `offsets`.
    strings: HashSet<Arc<str>>,
    last_used: u64,
    failures: u32,
    successes: u64,
}

impl FileEntry {
    fn new(source: FileSource, build_id: Option<Arc<str>>, name: &str, window: u64) -> Self {
        Self {
            source,
            build_id,
            name: Arc::from(name),
            offsets: IntMap::default(),
            strings: HashSet::new(),
            last_used: window,
            failures: 0,
            successes: 0,
        }
    }

    /// Opens the file behind `entry` of process `pid`: through `map_files`
    /// (exactly the mapped file, wherever and whether or not it is still
    /// linked), else through the process's root (its mount namespace),
    /// unless the file was deleted (the path may now name another file).
    #[allow(clippy::too_many_arguments)]
    fn open(
        pid: u32,
        entry: &MapEntry,
        path: &str,
        deleted: bool,
        captured: Option<&Arc<File>>,
        live: bool,
        window: u64,
        stats: &mut SymbolizerStats,
    ) -> Option<Self> {
        let handle = match captured {
            // Our own descriptor: the capture's may outlive this entry or
            // not, and blazesym is given a path naming the descriptor.
            Some(file) => file.try_clone(),
            None if !live => Err(io::Error::from(io::ErrorKind::NotFound)),
            None => {
                let map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", entry.start, entry.end);
                File::open(&map_files).or_else(|err| {
                    if deleted || !path.starts_with('/') {
                        return Err(err);
                    }
                    File::open(format!("/proc/{pid}/root{path}"))
                })
            }
        };
        let handle = match handle {
            Ok(handle) => handle,
            Err(err) => {
                stats.errors += 1;
                debug!(pid, path, %err, "cannot open mapped file");
                return None;
            }
        };
        stats.files_opened += 1;
        let fd_path = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
        let build_id = match blazesym::helper::read_elf_build_id(&fd_path) {
            Ok(id) => id.filter(|id| !id.is_empty()).map(|id| Arc::from(hex(&id))),
            Err(err) => {
                debug!(path, %err, "cannot read build id");
                None
            }
        };
        debug!(
            pid,
            path,
            build_id = build_id.as_deref(),
            "opened mapped file"
        );
        let name = path.rsplit('/').next().unwrap_or(path);
        Some(Self::new(
            FileSource::Elf {
                _handle: handle,
                path: fd_path,
            },
            build_id,
            name,
            window,
        ))
    }

    /// The frames at `offset`, from the cache or symbolized now.
    /// `own_addr` locates the offset in our own vDSO, for vDSO entries.
    fn lookup(
        &mut self,
        offset: u64,
        own_addr: Option<u64>,
        symbolizer: &Symbolizer,
        config: &SymbolizerConfig,
        stats: &mut SymbolizerStats,
    ) -> Frames {
        if let Some(frames) = self.offsets.get(&offset) {
            stats.cache_hits += 1;
            return frames.clone();
        }
        stats.cache_misses += 1;
        let frames: Frames = match self.resolve(offset, own_addr, symbolizer, config, stats) {
            Some(sym) => frames_from_sym(&sym, &mut self.strings).into(),
            None => Arc::new([placeholder(&self.name, offset)]),
        };
        if self.offsets.len() >= config.max_offsets_per_file {
            // Restart rather than track recency per offset: hot offsets
            // come back within a window.
            self.offsets.clear();
            self.strings.clear();
            stats.evictions += 1;
        }
        self.offsets.insert(offset, frames.clone());
        frames
    }

    fn resolve<'s>(
        &mut self,
        offset: u64,
        own_addr: Option<u64>,
        symbolizer: &'s Symbolizer,
        config: &SymbolizerConfig,
        stats: &mut SymbolizerStats,
    ) -> Option<Sym<'s>> {
        if self.successes == 0 && self.failures >= MAX_FAILURES_WITHOUT_SUCCESS {
            return None;
        }
        let result = match &self.source {
            FileSource::Elf { path, .. } => {
                let mut elf = Elf::new(path.clone());
                elf.debug_syms = config.debug_syms;
                symbolizer.symbolize_single(&Source::Elf(elf), Input::FileOffset(offset))
            }
            FileSource::Vdso => {
                let own_addr = own_addr?;
                let mut own = Process::new(Pid::Slf);
                own.perf_map = false;
                own.debug_syms = false;
                symbolizer.symbolize_single(&Source::Process(own), Input::AbsAddr(own_addr))
            }
        };
        match result {
            Ok(Symbolized::Sym(sym)) => {
                self.successes += 1;
                Some(sym)
            }
            Ok(Symbolized::Unknown(_)) => None,
            Err(err) => {
                stats.errors += 1;
                self.failures += 1;
                if self.successes == 0 && self.failures == MAX_FAILURES_WITHOUT_SUCCESS {
                    warn!(file = %self.name, %err, "cannot symbolize file; its frames will be placeholders");
                }
                None
            }
        }
    }

    /// Drops blazesym's data for this file, before our handle is closed
    /// (see the module docs).
    fn release(self, symbolizer: &mut Symbolizer) {
        if let FileSource::Elf { path, .. } = &self.source {
            if let Err(err) = symbolizer.evict(&evict::Evict::Elf(evict::Elf::new(path.clone()))) {
                debug!(%err, "blazesym evict failed");
            }
        }
    }
}

/// `[libc.so.6+0x1234]`.
fn placeholder(file_name: &str, offset: u64) -> CachedFrame {
    CachedFrame {
        function: Arc::from(format!("[{file_name}+{offset:#x}]")),
        file: None,
        line: None,
        inlined: false,
        symbolized: false,
    }
}

/// blazesym reports the outer function with the location of the first
/// inlined call in it, and the inlined functions outermost first, each with
/// the location inside it; we want innermost first.
fn frames_from_sym(sym: &Sym<'_>, strings: &mut HashSet<Arc<str>>) -> Vec<CachedFrame> {
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = location(inlined.code_info.as_ref(), strings);
        let name: &str = if inlined.name.is_empty() {
            "[inlined]"
        } else {
            &inlined.name
        };
        frames.push(CachedFrame {
            function: intern(strings, name),
            file,
            line,
            inlined: true,
            symbolized: true,
        });
    }
    let (file, line) = location(sym.code_info.as_deref(), strings);
    frames.push(CachedFrame {
        function: intern(strings, &sym.name),
        file,
        line,
        inlined: false,
        symbolized: true,
    });
    frames
}

fn location(
    info: Option<&CodeInfo<'_>>,
    strings: &mut HashSet<Arc<str>>,
) -> (Option<Arc<str>>, Option<u32>) {
    match info {
        Some(info) => (
            Some(intern(strings, &info.to_path().to_string_lossy())),
            info.line,
        ),
        None => (None, None),
    }
}

/// Our own vDSO: where it is and how large (a process whose vDSO has
/// another size is of another ABI, e.g. 32-bit, and is not symbolized
/// against ours).
#[derive(Debug, Clone, Copy)]
struct OwnVdso {
    start: u64,
    size: u64,
}

fn find_own_vdso() -> Option<OwnVdso> {
    let maps = ProcMaps::read(std::process::id()).ok()?;
    maps.entries()
        .iter()
        .find(|e| e.backing == Backing::Vdso)
        .map(|e| OwnVdso {
            start: e.start,
            size: e.end - e.start,
        })
}

/// Cache key of the vDSO "file": no device has `u64::MAX`, and the size
/// tells ABIs apart.
fn vdso_key(size: u64) -> FileKey {
    FileKey {
        dev: u64::MAX,
        inode: size,
    }
}

/// Mapping path of the vDSO (as in `/proc/<pid>/maps`).
const VDSO_PATH: &str = "[vdso]";
/// Its name in placeholders: `[vdso+0x…]`.
const VDSO_NAME: &str = "vdso";

/// The production [`Symbolize`]: blazesym with caches (see the
/// [module docs](super)).
///
/// Not `Send`: blazesym's `Symbolizer` uses `Rc` internally.
pub struct BlazeSymbolizer {
    config: SymbolizerConfig,
    symbolizer: Symbolizer,
    processes: IntMap<ProcessKey, ProcessEntry>,
    files: IntMap<FileKey, FileEntry>,
    kernel: KernelSymbols,
    /// `None` until first needed; then our vDSO, if we found it.
    own_vdso: Option<Option<OwnVdso>>,
    vdso_path: Arc<str>,
    unknown: Arc<str>,
    window: u64,
    stats: SymbolizerStats,
}

impl Default for BlazeSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BlazeSymbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlazeSymbolizer")
            .field("window", &self.window)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl BlazeSymbolizer {
    /// With the default [`SymbolizerConfig`]. Cheap: nothing is read until
    /// the first stack.
    pub fn new() -> Self {
        Self::with_config(SymbolizerConfig::default())
    }

    pub fn with_config(config: SymbolizerConfig) -> Self {
        let symbolizer = Symbolizer::builder()
            // Each file reaches blazesym through a path of its own that
            // always names the same file (see the module docs): no need
            // to stat it on every lookup.
            .enable_auto_reload(false)
            .enable_code_info(config.debug_syms)
            .enable_inlined_fns(config.debug_syms)
            .enable_demangling(true)
            .build();
        Self {
            config,
            symbolizer,
            processes: IntMap::default(),
            files: IntMap::default(),
            kernel: KernelSymbols::new(),
            own_vdso: None,
            vdso_path: Arc::from(VDSO_PATH),
            unknown: Arc::from(UNKNOWN),
            window: 0,
            stats: SymbolizerStats::default(),
        }
    }

    fn unknown_frame(&self, kind: FrameKind, mapping: Option<MappingId>, address: u64) -> Frame {
        Frame {
            function: self.unknown.clone(),
            file: None,
            line: None,
            kind,
            mapping,
            address,
            inlined: false,
        }
    }

    fn push_unknown(&mut self, ip: u64, builder: &mut ProfileBuilder, out: &mut Vec<FrameId>) {
        self.stats.unknown_frames += 1;
        out.push(builder.intern_frame(&self.unknown_frame(FrameKind::Native, None, ip)));
    }

    /// Emits the frames of one user address.
    fn push_user_address(
        &mut self,
        key: ProcessKey,
        ip: u64,
        addr: u64,
        memo: &mut MappingMemo,
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    ) {
        let window = self.window;
        let pid = key.pid;
        let Some(process) = self.processes.get_mut(&key) else {
            return self.push_unknown(ip, builder, out);
        };
        if process.maps.find(addr).is_none() && process.read_window != window {
            // Maybe mapped since we read the maps (dlopen).
            process.refresh(pid, window, &mut self.stats);
        }
        let Some(entry) = process.maps.find(addr) else {
            return self.push_unknown(ip, builder, out);
        };
        let offset = entry.file_offset(addr);
        let (file, path, own_addr) = match &entry.backing {
            Backing::Anonymous => return self.push_unknown(ip, builder, out),
            Backing::File { key, path, deleted } => {
                let file = match self.files.entry(*key) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        let opened = if process.unopenable.contains(key) {
                            None
                        } else {
                            let captured = process.capture.as_ref().and_then(|c| c.file(key));
                            FileEntry::open(
                                pid,
                                entry,
                                path,
                                *deleted,
                                captured,
                                process.live,
                                window,
                                &mut self.stats,
                            )
                        };
                        match opened {
                            Some(file) => e.insert(file),
                            None => {
                                if !process.unopenable.contains(key) {
                                    process.unopenable.push(*key);
                                }
                                return push_placeholder(
                                    path,
                                    offset,
                                    &mut self.stats,
                                    builder,
                                    out,
                                );
                            }
                        }
                    }
                };
                (file, path, None)
            }
            Backing::Vdso => {
                let size = entry.end - entry.start;
                let own = *self.own_vdso.get_or_insert_with(find_own_vdso);
                let own_addr = own
                    .filter(|own| own.size == size)
                    .map(|own| own.start + offset);
                let file = self
                    .files
                    .entry(vdso_key(size))
                    .or_insert_with(|| FileEntry::new(FileSource::Vdso, None, VDSO_NAME, window));
                (file, &self.vdso_path, own_addr)
            }
        };
        file.last_used = window;
        let frames = file.lookup(
            offset,
            own_addr,
            &self.symbolizer,
            &self.config,
            &mut self.stats,
        );
        let mapping = memo.intern(path, &file.build_id, builder);
        emit(
            &frames,
            FrameKind::Native,
            Some(mapping),
            offset,
            &mut self.stats,
            builder,
            out,
        );
    }
}

/// A placeholder for a file we could not open; not cached (another
/// process may be able to open it).
fn push_placeholder(
    path: &Arc<str>,
    offset: u64,
    stats: &mut SymbolizerStats,
    builder: &mut ProfileBuilder,
    out: &mut Vec<FrameId>,
) {
    let name = path.rsplit('/').next().unwrap_or(path);
    let mapping = builder.intern_mapping(&Mapping {
        path: path.clone(),
        build_id: None,
    });
    emit(
        &[placeholder(name, offset)],
        FrameKind::Native,
        Some(mapping),
        offset,
        stats,
        builder,
        out,
    );
}

/// Interns each stack's mappings once per run of frames from the same file
/// (the builder hashes the whole path on every intern).
#[derive(Default)]
struct MappingMemo {
    /// The last mapping interned, by identity of its strings (holding them
    /// keeps the pointers from being reused).
    last: Option<(Arc<str>, Option<Arc<str>>, MappingId)>,
}

impl MappingMemo {
    fn intern(
        &mut self,
        path: &Arc<str>,
        build_id: &Option<Arc<str>>,
        builder: &mut ProfileBuilder,
    ) -> MappingId {
        if let Some((p, b, id)) = &self.last {
            let same_build_id = match (b, build_id) {
                (Some(b), Some(build_id)) => Arc::ptr_eq(b, build_id),
                (None, None) => true,
                _ => false,
            };
            if Arc::ptr_eq(p, path) && same_build_id {
                return *id;
            }
        }
        let mapping = Mapping {
            path: path.clone(),
            build_id: build_id.clone(),
        };
        let id = builder.intern_mapping(&mapping);
        self.last = Some((mapping.path, mapping.build_id, id));
        id
    }
}

fn emit(
    frames: &[CachedFrame],
    kind: FrameKind,
    mapping: Option<MappingId>,
    address: u64,
    stats: &mut SymbolizerStats,
    builder: &mut ProfileBuilder,
    out: &mut Vec<FrameId>,
) {
    for f in frames {
        if !f.symbolized {
            stats.unknown_frames += 1;
        }
        out.push(builder.intern_frame(&Frame {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            kind,
            mapping,
            address,
            inlined: f.inlined,
        }));
    }
}

/// The address to look up for `ips[i]`: return addresses point after the
/// call, so step back into it.
fn lookup_address(i: usize, ip: u64) -> u64 {
    if i == 0 {
        ip
    } else {
        ip.saturating_sub(1)
    }
}

impl Symbolize for BlazeSymbolizer {
    fn user_stack(
        &mut self,
        key: ProcessKey,
        ips: &[u64],
        builder: &mut ProfileBuilder,
        out: &mut Vec<FrameId>,
    ) {
        if ips.is_empty() {
            return;
        }
        let window = self.window;
        let process = match self.processes.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(ProcessEntry::load(key, window, &mut self.stats)),
        };
        if process.readable && window >= process.read_window + self.config.maps_max_age_windows {
            process.refresh(key.pid, window, &mut self.stats);
        }
        process.last_used = window;
        if !process.readable {
            // Exited before we could look: nothing to go on.
            for &ip in ips {
                self.push_unknown(ip, builder, out);
            }
            return;
        }
        let mut memo = MappingMemo::default();
        for (i, &ip) in ips.iter().enumerate() {
            self.push_user_address(key, ip, lookup_address(i, ip), &mut memo, builder, out);
        }
    }

    fn adopt(&mut self, capture: &Arc<Capture>) {
        let window = self.window;
        let entry = self
            .processes
            .entry(capture.key())
            .or_insert_with(|| ProcessEntry {
                maps: ProcMaps::default(),
                capture: None,
                live: true,
                readable: false,
                read_window: window,
                last_used: window,
                unopenable: Vec::new(),
            });
        if let Some(maps) = capture.maps.as_ref().filter(|m| !m.is_empty()) {
            entry.maps = maps.clone();
            entry.readable = true;
            entry.unopenable.clear();
        }
        entry.capture = Some(capture.clone());
    }

    fn ended(&mut self, process: ProcessKey) {
        if let Some(entry) = self.processes.get_mut(&process) {
            entry.live = false;
        }
    }

    fn forget(&mut self, process: ProcessKey) {
        if self.processes.remove(&process).is_some() {
            self.stats.exited_processes += 1;
        }
    }

    fn kernel_stack(&mut self, ips: &[u64], builder: &mut ProfileBuilder, out: &mut Vec<FrameId>) {
        if ips.is_empty() {
            return;
        }
        let mapping = Some(builder.intern_mapping(self.kernel.mapping()));
        for (i, &ip) in ips.iter().enumerate() {
            let addr = lookup_address(i, ip);
            let found = self
                .kernel
                .lookup(addr, self.window, self.config.max_kernel_addresses);
            if found.cache_hit {
                self.stats.cache_hits += 1;
            } else {
                self.stats.cache_misses += 1;
            }
            if found.error {
                self.stats.errors += 1;
            }
            let frame = match found.name {
                Some(function) => Frame {
                    function,
                    file: None,
                    line: None,
                    kind: FrameKind::Kernel,
                    mapping,
                    address: addr,
                    inlined: false,
                },
                None => {
                    self.stats.unknown_frames += 1;
                    // Like user `[unknown]`s, it keeps the raw address.
                    self.unknown_frame(FrameKind::Kernel, mapping, ip)
                }
            };
            out.push(builder.intern_frame(&frame));
        }
    }

    fn end_window(&mut self) {
        let window = self.window;
        let config = &self.config;
        let stats = &mut self.stats;

        // Processes: exited, never readable, or idle. Captured images go
        // when the pipeline forgets them (their samples may still come).
        self.processes.retain(|&key, p| {
            let idle = window.saturating_sub(p.last_used) >= config.process_idle_windows;
            if idle || (!p.readable && p.capture.is_none()) {
                stats.evictions += 1;
                return false;
            }
            let alive = match key.image {
                Image::Started(_) => key.start_ticks_match(start_time(key.pid)),
                _ => true,
            };
            if !alive {
                stats.exited_processes += 1;
            }
            alive
        });
        if self.processes.len() > config.max_processes {
            let mut by_age: Vec<(u64, ProcessKey)> = self
                .processes
                .iter()
                .map(|(&key, p)| (p.last_used, key))
                .collect();
            by_age.sort_unstable();
            let excess = self.processes.len() - config.max_processes;
            for &(_, pid) in &by_age[..excess] {
                self.processes.remove(&pid);
            }
            stats.evictions += excess as u64;
        }

        // Files: idle ones, then least recently used beyond the bounds.
        let mut by_age: Vec<(u64, FileKey, usize)> = self
            .files
            .iter()
            .map(|(&k, f)| (f.last_used, k, f.offsets.len()))
            .collect();
        by_age.sort_unstable_by_key(|&(last_used, _, _)| last_used);
        let mut files = self.files.len();
        let mut offsets: usize = by_age.iter().map(|&(_, _, n)| n).sum();
        for (last_used, key, n) in by_age {
            let idle = window.saturating_sub(last_used) >= config.file_idle_windows;
            if !idle && files <= config.max_files && offsets <= config.max_cached_offsets {
                break;
            }
            if let Some(file) = self.files.remove(&key) {
                file.release(&mut self.symbolizer);
                stats.evictions += 1;
            }
            files -= 1;
            offsets -= n;
        }

        self.kernel.end_window(window);
        self.window += 1;
    }

    fn stats(&self) -> SymbolizerStats {
        SymbolizerStats {
            cached_processes: self.processes.len() as u64,
            cached_files: self.files.len() as u64,
            cached_addresses: (self.files.values().map(|f| f.offsets.len()).sum::<usize>()
                + self.kernel.cached_addresses()) as u64,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::profile::tests::meta;
    use crate::profile::Profile;
    use crate::symbolize::KERNEL_MAPPING_PATH;

    // Functions of the test binary itself, to symbolize. Not mangled, so
    // their names are known; big enough that +8 is still inside.
    #[no_mangle]
    #[inline(never)]
    pub extern "C" fn hearth_symbolize_marker_a(n: u64) -> u64 {
        let mut s = n;
        for i in 0..black_box(n) {
            s = s.wrapping_mul(31) ^ i;
        }
        black_box(s)
    }

    #[no_mangle]
    #[inline(never)]
    pub extern "C" fn hearth_symbolize_marker_b(n: u64) -> u64 {
        let mut s = n;
        for i in 0..black_box(n) {
            s = s.wrapping_add(17) ^ i;
        }
        black_box(s)
    }

    /// Inlined even without optimizations (rustc honours `always`).
    #[inline(always)]
    fn hearth_inlined_helper(x: u64) -> u64 {
        let mut s = x;
        for i in 0..black_box(x) {
            s = s.rotate_left(3) ^ i;
        }
        s
    }

    #[no_mangle]
    #[inline(never)]
    pub extern "C" fn hearth_symbolize_marker_inline(x: u64) -> u64 {
        black_box(hearth_inlined_helper(x)) + 1
    }

    fn addr_of(f: extern "C" fn(u64) -> u64) -> u64 {
        f as usize as u64
    }

    fn me() -> u32 {
        std::process::id()
    }

    /// The key the pipeline gives a process it has no capture of.
    fn live(pid: u32) -> ProcessKey {
        match start_time(pid) {
            Some(ticks) => ProcessKey::new(pid, Image::Started(ticks)),
            None => ProcessKey::new(pid, Image::Unknown),
        }
    }

    /// Symbolizes one user stack into a fresh profile.
    fn user(s: &mut BlazeSymbolizer, pid: u32, ips: &[u64]) -> (Profile, Vec<FrameId>) {
        let mut b = ProfileBuilder::new(meta());
        let mut out = Vec::new();
        s.user_stack(live(pid), ips, &mut b, &mut out);
        (b.build(), out)
    }

    fn kernel(s: &mut BlazeSymbolizer, ips: &[u64]) -> (Profile, Vec<FrameId>) {
        let mut b = ProfileBuilder::new(meta());
        let mut out = Vec::new();
        s.kernel_stack(ips, &mut b, &mut out);
        (b.build(), out)
    }

    fn names<'a>(p: &'a Profile, frames: &[FrameId]) -> Vec<&'a str> {
        frames.iter().map(|&f| &*p.frame(f).function).collect()
    }

    /// The frames that are not inlined into another: one per address.
    /// (Optimized builds inline e.g. `black_box` into the markers.)
    fn outer<'a>(p: &'a Profile, frames: &[FrameId]) -> Vec<&'a Frame> {
        frames
            .iter()
            .map(|&f| p.frame(f))
            .filter(|f| !f.inlined)
            .collect()
    }

    fn outer_names<'a>(p: &'a Profile, frames: &[FrameId]) -> Vec<&'a str> {
        outer(p, frames).iter().map(|f| &*f.function).collect()
    }

    /// Build ID of `path` as `readelf -n` prints it, when readelf exists.
    fn readelf_build_id(path: &Path) -> Option<String> {
        let out = std::process::Command::new("readelf")
            .arg("-n")
            .arg(path)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("Build ID:"))?;
        Some(
            line.trim_start()
                .trim_start_matches("Build ID:")
                .trim()
                .to_string(),
        )
    }

    #[test]
    fn own_functions_resolve_with_mapping_and_build_id() {
        let mut s = BlazeSymbolizer::new();
        let a = addr_of(hearth_symbolize_marker_a);
        let b = addr_of(hearth_symbolize_marker_b);
        // Leaf at the start of a; return address 8 bytes into b.
        let (p, frames) = user(&mut s, me(), &[a, b + 8]);
        assert_eq!(
            outer_names(&p, &frames),
            ["hearth_symbolize_marker_a", "hearth_symbolize_marker_b"]
        );

        let outer = outer(&p, &frames);
        let (leaf, caller) = (outer[0], outer[1]);
        assert_eq!(leaf.kind, FrameKind::Native);
        // Addresses are file offsets: same distance apart as in memory,
        // with the return address stepped back into the call.
        assert_eq!(caller.address - leaf.address, b + 7 - a);
        assert_ne!(leaf.address, a, "a file offset, not the virtual address");
        // Debug info gives the source file and line.
        assert!(
            leaf.file
                .as_deref()
                .is_some_and(|f| f.ends_with("blaze.rs")),
            "{leaf:?}"
        );
        assert!(leaf.line.is_some());

        let mapping = p.mapping(leaf.mapping.expect("a mapping"));
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(&*mapping.path, exe.to_str().expect("utf-8 exe path"));
        let build_id = mapping
            .build_id
            .as_deref()
            .expect("test binary has a GNU build id");
        assert!(
            build_id.len() >= 16
                && build_id
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{build_id}"
        );
        if let Some(expected) = readelf_build_id(&exe) {
            assert_eq!(build_id, expected);
        }
        assert_eq!(s.stats().errors, 0, "{:?}", s.stats());
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_back() {
        let mut s = BlazeSymbolizer::new();
        let a = addr_of(hearth_symbolize_marker_a);
        // As a leaf, the first byte of a is a. As a return address it is
        // the end of a call in whatever precedes a (a call to a noreturn
        // function as the last instruction looks exactly like this).
        let (p, frames) = user(&mut s, me(), &[a, a]);
        let outer = outer(&p, &frames);
        assert_eq!(&*outer[0].function, "hearth_symbolize_marker_a");
        assert_ne!(&*outer[1].function, "hearth_symbolize_marker_a");
        assert_eq!(outer[0].address, outer[1].address + 1);
    }

    #[test]
    fn inlined_frames_are_expanded_innermost_first() {
        let mut s = BlazeSymbolizer::new();
        let f = addr_of(hearth_symbolize_marker_inline);
        let mut found = false;
        for off in 0..512 {
            let (p, frames) = user(&mut s, me(), &[f + off]);
            let names = names(&p, &frames);
            let outer = *names.last().expect("at least one frame");
            if outer != "hearth_symbolize_marker_inline" {
                break; // past the end of the function
            }
            let helper = names
                .iter()
                .position(|n| n.ends_with("hearth_inlined_helper"));
            if let Some(helper) = helper {
                found = true;
                let last = frames.len() - 1;
                for (i, &id) in frames.iter().enumerate() {
                    let frame = p.frame(id);
                    assert_eq!(frame.inlined, i != last, "{names:?}");
                    assert_eq!(frame.address, p.frame(frames[0]).address);
                }
                assert!(helper < last);
                // The outer frame's line is the call site of the helper.
                assert!(p.frame(frames[last]).line.is_some());
            }
        }
        assert!(found, "no address of the inlined helper was found");
    }

    #[test]
    fn unmapped_addresses_are_unknown_with_their_address() {
        let mut s = BlazeSymbolizer::new();
        let a = addr_of(hearth_symbolize_marker_a);
        let (p, frames) = user(&mut s, me(), &[0x10, a + 8, 0x20]);
        assert_eq!(
            outer_names(&p, &frames),
            [UNKNOWN, "hearth_symbolize_marker_a", UNKNOWN]
        );
        let outer = outer(&p, &frames);
        assert_eq!(outer[0].address, 0x10);
        assert_eq!(outer[0].mapping, None);
        // The raw address is kept, even for a return address.
        assert_eq!(outer[2].address, 0x20);
        assert_eq!(s.stats().unknown_frames, 2);
        // The maps were read this window: unmapped addresses do not make
        // us read them again until the next window (then once: a dlopen?).
        assert_eq!(s.stats().process_maps_reads, 1);
        s.end_window();
        user(&mut s, me(), &[0x30]);
        assert_eq!(s.stats().process_maps_reads, 2);
        user(&mut s, me(), &[0x40, 0x50]);
        assert_eq!(s.stats().process_maps_reads, 2);
    }

    #[test]
    fn repeated_lookups_are_cache_hits() {
        let mut s = BlazeSymbolizer::new();
        let ips = [
            addr_of(hearth_symbolize_marker_a),
            addr_of(hearth_symbolize_marker_b) + 8,
        ];
        let (p1, f1) = user(&mut s, me(), &ips);
        let first = s.stats();
        assert_eq!(first.cache_misses, 2);
        assert_eq!(first.files_opened, 1);
        let (p2, f2) = user(&mut s, me(), &ips);
        let second = s.stats();
        assert_eq!(second.cache_misses, 2);
        assert_eq!(second.cache_hits, first.cache_hits + 2);
        assert_eq!(second.files_opened, 1);
        assert_eq!(second.process_maps_reads, 1);
        // Same frames, sharing the cached strings.
        assert_eq!(names(&p1, &f1), names(&p2, &f2));
        assert!(Arc::ptr_eq(
            &p1.frame(f1[0]).function,
            &p2.frame(f2[0]).function
        ));
        assert_eq!(second.cached_files, 1);
        assert_eq!(second.cached_addresses, 2);
    }

    #[test]
    fn evicted_files_are_reopened_correctly() {
        let mut s = BlazeSymbolizer::with_config(SymbolizerConfig {
            max_files: 0,
            ..SymbolizerConfig::default()
        });
        let a = addr_of(hearth_symbolize_marker_a);
        for round in 1..=3 {
            let (p, frames) = user(&mut s, me(), &[a]);
            assert_eq!(outer_names(&p, &frames), ["hearth_symbolize_marker_a"]);
            assert_eq!(s.stats().files_opened, round);
            s.end_window();
            assert_eq!(s.stats().cached_files, 0);
        }
    }

    #[test]
    fn per_file_offset_cache_is_bounded() {
        let mut s = BlazeSymbolizer::with_config(SymbolizerConfig {
            max_offsets_per_file: 4,
            ..SymbolizerConfig::default()
        });
        let a = addr_of(hearth_symbolize_marker_a);
        let ips: Vec<u64> = (0..10).map(|i| a + i).collect();
        user(&mut s, me(), &ips[..1]);
        for ip in &ips {
            user(&mut s, me(), &[*ip]);
        }
        assert!(s.stats().cached_addresses <= 4, "{:?}", s.stats());
        assert!(s.stats().evictions > 0);
    }

    #[test]
    fn vdso_addresses_resolve() {
        let Some(vdso) = find_own_vdso() else {
            return; // no vDSO on this machine
        };
        let mut s = BlazeSymbolizer::new();
        let mut named = Vec::new();
        for off in (0..vdso.size).step_by(16) {
            let (p, frames) = user(&mut s, me(), &[vdso.start + off]);
            let frame = p.frame(frames[0]);
            assert_eq!(&*p.mapping(frame.mapping.expect("mapped")).path, "[vdso]");
            assert_eq!(frame.address, off);
            if !frame.function.starts_with('[') {
                named.push(frame.function.to_string());
            }
        }
        assert!(
            named
                .iter()
                .any(|n| n.contains("gettime") || n.contains("time")),
            "{named:?}"
        );
    }

    #[test]
    fn processes_that_are_gone_give_unknown_frames() {
        let mut s = BlazeSymbolizer::new();
        // Beyond any pid_max.
        let (p, frames) = user(&mut s, 0x7fff_fff0, &[0x1000, 0x2000, 0x3000]);
        assert_eq!(names(&p, &frames), [UNKNOWN; 3]);
        assert_eq!(p.frame(frames[1]).address, 0x2000);
        let (p, frames) = user(&mut s, 0, &[0x1000]);
        assert_eq!(names(&p, &frames), [UNKNOWN]);

        // A real process that exited.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        let (p, frames) = user(&mut s, pid, &[addr_of(hearth_symbolize_marker_a)]);
        assert_eq!(names(&p, &frames), [UNKNOWN]);
        assert_eq!(s.stats().unknown_frames, 5);
        s.end_window();
        assert_eq!(s.stats().cached_processes, 0);
    }

    #[test]
    fn exited_processes_are_evicted_at_end_of_window() {
        let mut s = BlazeSymbolizer::new();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Any address: what matters is that its maps were read.
        user(&mut s, pid, &[0x10]);
        s.end_window();
        assert_eq!(s.stats().cached_processes, 1);
        child.kill().expect("kill");
        child.wait().expect("wait");
        s.end_window();
        let stats = s.stats();
        assert_eq!(stats.cached_processes, 0);
        assert_eq!(stats.exited_processes, 1);
    }

    /// `schedule` from /proc/kallsyms, when addresses are visible.
    fn kallsyms_schedule() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
        text.lines().find_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let addr = f.next()?;
            let kind = f.next()?;
            let name = f.next()?;
            (name == "schedule" && kind.eq_ignore_ascii_case("t") && f.next().is_none())
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
    }

    #[test]
    fn kernel_addresses_resolve_from_kallsyms() {
        let mut s = BlazeSymbolizer::new();
        let Some(schedule) = kallsyms_schedule() else {
            return; // no kallsyms at all
        };
        let (p, frames) = kernel(&mut s, &[schedule, schedule + 1]);
        let frame = p.frame(frames[0]);
        assert_eq!(frame.kind, FrameKind::Kernel);
        let mapping = p.mapping(frame.mapping.expect("kernel mapping"));
        assert_eq!(&*mapping.path, KERNEL_MAPPING_PATH);
        if schedule == 0 {
            // kptr_restrict: no addresses, so no names, but frames.
            assert_eq!(names(&p, &frames), [UNKNOWN; 2]);
            assert_eq!(s.stats().unknown_frames, 2);
            return;
        }
        // The return address schedule+1 is looked up at schedule.
        assert_eq!(names(&p, &frames), ["schedule", "schedule"]);
        assert_eq!(frame.address, schedule);
        assert_eq!(p.frame(frames[1]).address, schedule);
        let before = s.stats();
        kernel(&mut s, &[schedule]);
        assert_eq!(s.stats().cache_hits, before.cache_hits + 1);
        // Not a kernel address at all.
        let (p, frames) = kernel(&mut s, &[0x10]);
        assert_eq!(names(&p, &frames), [UNKNOWN]);
    }

    /// Not a benchmark, but gives the order of magnitude of the hot path
    /// (run with `--nocapture`); in debug builds.
    #[test]
    fn cached_lookups_are_cheap() {
        let mut s = BlazeSymbolizer::new();
        let ips: Vec<u64> = (0..10)
            .map(|i| {
                addr_of(if i % 2 == 0 {
                    hearth_symbolize_marker_a
                } else {
                    hearth_symbolize_marker_b
                }) + i
            })
            .collect();
        user(&mut s, me(), &ips);
        let mut b = ProfileBuilder::new(meta());
        let mut out = Vec::with_capacity(10_000);
        let start = Instant::now();
        let key = live(me());
        for _ in 0..1000 {
            s.user_stack(key, &ips, &mut b, &mut out);
        }
        let elapsed = start.elapsed();
        eprintln!(
            "10k cached user addresses: {elapsed:?} ({:?} each)",
            elapsed / 10_000
        );
        assert!(out.len() >= 10_000);
        assert_eq!(s.stats().cache_misses, 10);
    }
}
