//! Getting export requests to the backend without losing them.
//!
//! The daemon encodes a window every few seconds whether or not the backend
//! is reachable, and it must never stall on the network. So the window
//! thread only [`DeliveryQueue::push`]es (synchronously, no network), and a
//! single sender task ([`DeliveryQueue::run`]) delivers the queue strictly in
//! order, one request at a time, through a [`Transport`].
//!
//! # Ordering and duplicates
//!
//! Every pushed request gets the next sequence number. The sender always
//! sends the oldest undelivered request (the *head*); a retryable failure
//! retries that same head after an exponential backoff with jitter, so
//! nothing overtakes it. A request leaves the queue only after the backend
//! acknowledged it, or rejected it permanently, or it was dropped to keep the
//! queue within its bounds. Delivery is therefore at-least-once, and in
//! practice exactly-once, except in these windows where a request the
//! backend already has is sent again:
//!
//! - the process dies between the acknowledgement and the removal of the
//!   spool file (the request is resent after the restart);
//! - the answer is lost (timeout, connection reset) after the backend
//!   processed the request;
//! - a send is abandoned because [`run`](DeliveryQueue::run) was stopped or
//!   the [`drain`](DeliveryQueue::drain) deadline passed.
//!
//! # Memory and spool
//!
//! Requests wait in memory as encoded protobuf, up to `memory_max_bytes`.
//! Past that the *oldest* memory requests move to the spool directory, so
//! the spool always holds an older prefix of the queue and the head is read
//! from the spool first. Past `spool_max_bytes` the oldest spooled requests
//! are dropped (counted in `requests_dropped` and logged); without a spool
//! directory the oldest memory requests are dropped instead. The request
//! being sent at that moment is never dropped or lost by this; it moves
//! from memory to the spool at most.
//!
//! Spool files are named by the zero-padded sequence number
//! (`00000000000000000042.pb`) and hold a 20-byte header — the magic
//! `HRTHSPL1`, the payload length (u64 little-endian) and the CRC-32 of the
//! payload (u32 little-endian) — followed by one prost-encoded
//! `ExportProfilesServiceRequest`. They are written under a temporary name,
//! fsynced, renamed and the directory fsynced, so a crash leaves either the
//! whole file or none. A `.lock` file (`flock`) keeps two agents from
//! sharing one spool. [`DeliveryQueue::open`] loads what a previous run
//! left in sequence order (they are sent first) and continues the numbering;
//! a file that fails its checks when read is logged, counted in
//! `spool_corrupt` and removed.
//!
//! # Shutdown
//!
//! 1. Set the `stop` watch to `true`: [`run`](DeliveryQueue::run) returns at
//!    once (abandoning a backoff wait or a send in progress) and hands the
//!    transport back.
//! 2. Push what is left (the final window).
//! 3. [`drain`](DeliveryQueue::drain) with a deadline delivers what it can
//!    before the deadline.
//! 4. [`persist`](DeliveryQueue::persist) writes what is still in memory to
//!    the spool, so the next start sends it.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use prost::Message;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;

/// Sends one export request to the backend.
///
/// Implemented by [`crate::export::otlp::client::OtlpClient`] and by fakes
/// in tests. The queue calls it for one request at a time and waits for the
/// answer before sending anything else.
pub trait Transport {
    /// Delivers `request`; `Ok` means the backend acknowledged it.
    fn send(
        &mut self,
        request: &ExportProfilesServiceRequest,
    ) -> impl Future<Output = Result<Accepted, SendError>> + Send;
}

/// The backend's acknowledgement of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Profiles the backend rejected although it accepted the request
    /// (OTLP partial success); 0 when it took everything.
    pub rejected_profiles: u64,
    /// The backend's explanation or warning; empty when it gave none.
    pub message: String,
}

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later (backend down or overloaded, network or TLS
    /// problem, timeout).
    #[error("{0}")]
    Retryable(String),
    /// The backend will never accept this request (bad data, bad
    /// credentials, unsupported): sending it again is pointless.
    #[error("rejected with {code}: {message}")]
    Permanent { code: String, message: String },
}

/// Bounds and backoff of a [`DeliveryQueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Encoded bytes kept in memory before the oldest move to the spool.
    pub memory_max_bytes: u64,
    /// Where requests wait when memory is full and across restarts; `None`
    /// drops the oldest requests past `memory_max_bytes`.
    pub spool_dir: Option<PathBuf>,
    /// Bytes of spool files (headers included) before the oldest are
    /// dropped.
    pub spool_max_bytes: u64,
    /// First retry delay (at least 1 ms); doubles per failure.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            memory_max_bytes: 16 << 20,
            spool_dir: None,
            spool_max_bytes: 256 << 20,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Why the queue could not be opened or persisted.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The spool directory cannot be created, listed or written.
    #[error("spool directory {}: {source}", path.display())]
    SpoolDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process holds the spool directory's lock.
    #[error(
        "spool directory {} is in use by another hearth process \
         (each agent needs its own --spool-dir)",
        path.display()
    )]
    SpoolLocked { path: PathBuf },
    /// Writing a spool file failed.
    #[error("writing spool file {}: {source}", path.display())]
    SpoolWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`DeliveryQueue::persist`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistOutcome {
    /// Memory requests written to the spool.
    pub persisted: u64,
    /// Requests lost instead: no spool directory, or the spool was full
    /// (then the oldest spooled ones went).
    pub dropped: u64,
    /// Requests in the spool afterwards.
    pub spool_items: u64,
    /// Bytes in the spool afterwards.
    pub spool_bytes: u64,
}

/// What [`DeliveryQueue::drain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Requests the backend acknowledged during the drain.
    pub delivered: u64,
    /// Requests still queued (memory and spool) when it returned.
    pub remaining_items: u64,
    /// Their bytes.
    pub remaining_bytes: u64,
}

/// The ordered, bounded queue of export requests between the window thread
/// and the backend. Cheap to clone; clones share the queue.
#[derive(Clone)]
pub struct DeliveryQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DeliveryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (items, bytes) = self.depth();
        f.debug_struct("DeliveryQueue")
            .field("config", &self.inner.cfg)
            .field("items", &items)
            .field("bytes", &bytes)
            .finish()
    }
}

struct Inner {
    cfg: DeliveryConfig,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Wakes an idle sender after a push.
    wake: Notify,
    /// Held by the one sender ([`DeliveryQueue::run`] or
    /// [`DeliveryQueue::drain`]); two senders would send the head twice.
    sender: tokio::sync::Mutex<()>,
    /// Holds the spool directory's `flock` while the queue exists.
    _lock: Option<File>,
    /// Backoff delays chosen, for tests.
    #[cfg(test)]
    backoff_log: Mutex<Vec<Duration>>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Spooled requests, oldest first; all older than `memory`.
    spool: VecDeque<SpoolEntry>,
    spool_bytes: u64,
    /// Requests in memory, oldest first.
    memory: VecDeque<Item>,
    memory_bytes: u64,
    /// The head while it is being read or sent: never dropped for space.
    in_flight: Option<u64>,
    /// Number of spool files that were dropped or failed, for log pacing.
    dropped_total: u64,
}

struct Item {
    seq: u64,
    bytes: Arc<Vec<u8>>,
}

struct SpoolEntry {
    seq: u64,
    /// File size, header included.
    size: u64,
}

/// The head of the queue, decoded for sending.
struct Head {
    seq: u64,
    request: ExportProfilesServiceRequest,
    encoded_len: u64,
    samples: u64,
}

/// What finishing an attempt means for the sender loop.
enum Step {
    /// The head was acknowledged and removed.
    Delivered,
    /// The head was rejected (or vanished) and removed.
    Removed,
    /// Send the same head again after this delay.
    Retry(Duration),
}

/// Result of moving one memory request to the spool.
enum Spill {
    Written,
    Dropped,
    Failed(Item, DeliveryError),
}

const SPOOL_MAGIC: &[u8; 8] = b"HRTHSPL1";
const HEADER_LEN: u64 = 20;
const SPOOL_SUFFIX: &str = ".pb";
const SEQ_DIGITS: usize = 20;
const LOCK_FILE: &str = ".lock";
const MIN_BACKOFF: Duration = Duration::from_millis(1);

impl DeliveryQueue {
    /// Opens the queue: creates (mode 0700) and locks the spool directory
    /// if there is one, removes temporary files a crash left, and loads
    /// the spooled requests of a previous run, which are sent first.
    /// Sequence numbers continue after the highest one found.
    pub fn open(cfg: DeliveryConfig, metrics: Arc<Metrics>) -> Result<Self, DeliveryError> {
        let mut state = State::default();
        let mut lock = None;
        if let Some(dir) = &cfg.spool_dir {
            let dir_err = |source| DeliveryError::SpoolDir {
                path: dir.clone(),
                source,
            };
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(dir_err)?;
            if !fs::metadata(dir).map_err(dir_err)?.is_dir() {
                return Err(dir_err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "not a directory",
                )));
            }
            lock = Some(lock_spool_dir(dir)?);
            let entries = scan_spool(dir).map_err(dir_err)?;
            for entry in entries {
                state.spool_bytes += entry.size;
                state.next_seq = entry.seq + 1;
                state.spool.push_back(entry);
            }
        }
        let queue = DeliveryQueue {
            inner: Arc::new(Inner {
                cfg,
                metrics,
                state: Mutex::new(state),
                wake: Notify::new(),
                sender: tokio::sync::Mutex::new(()),
                _lock: lock,
                #[cfg(test)]
                backoff_log: Mutex::new(Vec::new()),
            }),
        };
        {
            let mut st = queue.lock();
            if !st.spool.is_empty() {
                info!(
                    requests = st.spool.len(),
                    bytes = st.spool_bytes,
                    "sending the requests a previous run left in the spool first"
                );
            }
            queue.make_spool_room(&mut st, 0);
            queue.update_gauges(&st);
        }
        Ok(queue)
    }

    /// Queues `request` for delivery after everything pushed before it.
    ///
    /// Never waits on the network. It may write (and fsync) spool files
    /// when memory is full, and drops the oldest requests when the spool is
    /// full too.
    pub fn push(&self, request: ExportProfilesServiceRequest) {
        let bytes = Arc::new(request.encode_to_vec());
        drop(request);
        let len = bytes.len() as u64;
        {
            let mut st = self.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.memory.push_back(Item { seq, bytes });
            st.memory_bytes += len;
            self.enforce_memory_cap(&mut st);
            self.update_gauges(&st);
        }
        self.inner.wake.notify_one();
    }

    /// Requests waiting (memory and spool) and their encoded bytes.
    pub fn depth(&self) -> (u64, u64) {
        let st = self.lock();
        (
            (st.memory.len() + st.spool.len()) as u64,
            st.memory_bytes + st.spool_bytes,
        )
    }

    /// Delivers the queue until `stop` is `true` (or its sender is
    /// dropped), then returns the transport.
    ///
    /// Stopping is immediate: a backoff wait is cut short and a send in
    /// progress is abandoned (its request stays queued and is sent again by
    /// [`drain`](Self::drain) or after a restart). Only one sender runs at a
    /// time; a second `run` or `drain` waits for the first to return.
    pub async fn run<T: Transport>(&self, mut transport: T, mut stop: watch::Receiver<bool>) -> T {
        let _sender = self.inner.sender.lock().await;
        let mut backoff = self.backoff();
        let mut cached = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let Some(head) = self.take_head(cached.take()) else {
                tokio::select! {
                    _ = self.inner.wake.notified() => continue,
                    _ = stopped(&mut stop) => break,
                }
            };
            let guard = InFlight {
                queue: self,
                seq: head.seq,
            };
            let result = tokio::select! {
                result = transport.send(&head.request) => result,
                _ = stopped(&mut stop) => break,
            };
            let step = self.complete(&head, result, &mut backoff);
            drop(guard);
            if let Step::Retry(delay) = step {
                cached = Some(head);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut stop) => break,
                }
            }
        }
        transport
    }

    /// Delivers what is queued — including what was pushed after
    /// [`run`](Self::run) stopped — until the queue is empty or `deadline`
    /// passes, whichever comes first. Retries back off as in `run` but
    /// never wait past the deadline; a send still in progress at the
    /// deadline is abandoned (its request stays queued).
    pub async fn drain<T: Transport>(&self, transport: &mut T, deadline: Instant) -> DrainOutcome {
        let mut outcome = DrainOutcome::default();
        if let Ok(_sender) = tokio::time::timeout_at(deadline, self.inner.sender.lock()).await {
            let mut backoff = self.backoff();
            let mut cached = None;
            while let Some(head) = self.take_head(cached.take()) {
                let guard = InFlight {
                    queue: self,
                    seq: head.seq,
                };
                let Ok(result) =
                    tokio::time::timeout_at(deadline, transport.send(&head.request)).await
                else {
                    break;
                };
                let step = self.complete(&head, result, &mut backoff);
                drop(guard);
                match step {
                    Step::Delivered => outcome.delivered += 1,
                    Step::Removed => {}
                    Step::Retry(delay) => {
                        if Instant::now() + delay >= deadline {
                            break;
                        }
                        cached = Some(head);
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        (outcome.remaining_items, outcome.remaining_bytes) = self.depth();
        outcome
    }

    /// Writes every request still in memory to the spool (oldest first) so
    /// the next start sends it; call it at shutdown after
    /// [`drain`](Self::drain). Can be called again after more pushes.
    ///
    /// Without a spool directory the memory requests are dropped, counted
    /// and logged. A full spool drops its oldest requests as usual. On a
    /// write error the requests not yet written stay in memory and the
    /// error is returned.
    pub fn persist(&self) -> Result<PersistOutcome, DeliveryError> {
        let mut st = self.lock();
        let mut outcome = PersistOutcome::default();
        let result = if self.inner_spool_dir().is_none() {
            let lost = st.memory.len() as u64;
            if lost > 0 {
                warn!(
                    requests = lost,
                    bytes = st.memory_bytes,
                    "no spool directory: undelivered export requests are lost at shutdown"
                );
                st.memory.clear();
                st.memory_bytes = 0;
                Metrics::add(&self.inner.metrics.requests_dropped, lost);
            }
            outcome.dropped = lost;
            Ok(())
        } else {
            let mut result = Ok(());
            while let Some(item) = st.memory.pop_front() {
                st.memory_bytes -= item.bytes.len() as u64;
                match self.spill(&mut st, item) {
                    Spill::Written => outcome.persisted += 1,
                    Spill::Dropped => outcome.dropped += 1,
                    Spill::Failed(item, err) => {
                        st.memory_bytes += item.bytes.len() as u64;
                        st.memory.push_front(item);
                        result = Err(err);
                        break;
                    }
                }
            }
            result
        };
        outcome.spool_items = st.spool.len() as u64;
        outcome.spool_bytes = st.spool_bytes;
        self.update_gauges(&st);
        result.map(|()| outcome)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a panic
        // elsewhere while holding the lock does not make it unusable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn inner_spool_dir(&self) -> Option<&Path> {
        self.inner.cfg.spool_dir.as_deref()
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.inner.cfg.backoff_initial, self.inner.cfg.backoff_max)
    }

    fn update_gauges(&self, st: &State) {
        let m = &self.inner.metrics;
        Metrics::set(&m.queue_depth, st.memory.len() as u64);
        Metrics::set(&m.spool_depth, st.spool.len() as u64);
        Metrics::set(&m.spool_bytes, st.spool_bytes);
    }

    /// Moves (or, without a spool, drops) the oldest memory requests until
    /// memory is within its bound.
    fn enforce_memory_cap(&self, st: &mut State) {
        while st.memory_bytes > self.inner.cfg.memory_max_bytes {
            if self.inner_spool_dir().is_some() {
                // The in-flight head may move too: the spool is empty when
                // the head is in memory, so it becomes the spool's head.
                let Some(item) = st.memory.pop_front() else {
                    break;
                };
                st.memory_bytes -= item.bytes.len() as u64;
                if let Spill::Failed(item, err) = self.spill(st, item) {
                    error!(
                        seq = item.seq,
                        "cannot spool an export request, dropping it: {err}"
                    );
                    Metrics::add(&self.inner.metrics.requests_dropped, 1);
                }
            } else {
                let Some(index) = oldest_droppable(&st.memory, st.in_flight, |i| i.seq) else {
                    break;
                };
                let Some(item) = st.memory.remove(index) else {
                    break;
                };
                st.memory_bytes -= item.bytes.len() as u64;
                st.dropped_total += 1;
                Metrics::add(&self.inner.metrics.requests_dropped, 1);
                self.log_drop(
                    st,
                    item.seq,
                    "memory queue full and no spool directory: dropped the oldest export request",
                );
            }
        }
    }

    /// Writes `item` to the spool, dropping the oldest spooled requests to
    /// make room.
    fn spill(&self, st: &mut State, item: Item) -> Spill {
        let Some(dir) = self.inner_spool_dir() else {
            return Spill::Dropped;
        };
        let size = HEADER_LEN + item.bytes.len() as u64;
        if size > self.inner.cfg.spool_max_bytes || !self.make_spool_room(st, size) {
            st.dropped_total += 1;
            Metrics::add(&self.inner.metrics.requests_dropped, 1);
            warn!(
                seq = item.seq,
                bytes = size,
                spool_max_bytes = self.inner.cfg.spool_max_bytes,
                "export request does not fit in the spool: dropped"
            );
            return Spill::Dropped;
        }
        match write_spool_file(dir, item.seq, &item.bytes) {
            Ok(()) => {
                st.spool.push_back(SpoolEntry {
                    seq: item.seq,
                    size,
                });
                st.spool_bytes += size;
                Spill::Written
            }
            Err(err) => Spill::Failed(item, err),
        }
    }

    /// Drops the oldest spooled requests (never the one in flight) until
    /// `extra` more bytes fit; false if they cannot.
    fn make_spool_room(&self, st: &mut State, extra: u64) -> bool {
        while st.spool_bytes + extra > self.inner.cfg.spool_max_bytes {
            let Some(index) = oldest_droppable(&st.spool, st.in_flight, |e| e.seq) else {
                return false;
            };
            let Some(entry) = st.spool.remove(index) else {
                return false;
            };
            st.spool_bytes -= entry.size;
            self.remove_spool_file(entry.seq);
            st.dropped_total += 1;
            Metrics::add(&self.inner.metrics.requests_dropped, 1);
            self.log_drop(
                st,
                entry.seq,
                "spool full: dropped the oldest undelivered export request",
            );
        }
        true
    }

    /// Drops are logged at warn the first few times and then sparsely, so
    /// a long outage does not flood the log.
    fn log_drop(&self, st: &State, seq: u64, what: &str) {
        let n = st.dropped_total;
        if n <= 10 || n.is_power_of_two() {
            warn!(
                seq,
                dropped_total = n,
                memory_max_bytes = self.inner.cfg.memory_max_bytes,
                spool_max_bytes = self.inner.cfg.spool_max_bytes,
                "{what}"
            );
        } else {
            debug!(seq, dropped_total = n, "{what}");
        }
    }

    fn remove_spool_file(&self, seq: u64) {
        let Some(dir) = self.inner_spool_dir() else {
            return;
        };
        let path = dir.join(spool_file_name(seq));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // The request may be sent again after a restart.
            Err(e) => error!("removing spool file {}: {e}", path.display()),
        }
    }

    /// The head of the queue, decoded, marked in flight. `cached` is
    /// reused when it still is the head (a retry). Unreadable spool files
    /// on the way are logged, counted and removed.
    fn take_head(&self, mut cached: Option<Head>) -> Option<Head> {
        loop {
            let (seq, memory_bytes) = {
                let mut st = self.lock();
                let (seq, bytes) = match (st.spool.front(), st.memory.front()) {
                    (Some(entry), _) => (entry.seq, None),
                    (None, Some(item)) => (item.seq, Some(item.bytes.clone())),
                    (None, None) => return None,
                };
                st.in_flight = Some(seq);
                if let Some(head) = cached.take().filter(|h| h.seq == seq) {
                    return Some(head);
                }
                (seq, bytes)
            };
            let decoded = match memory_bytes {
                Some(bytes) => decode_request(&bytes).map(|r| (r, bytes.len() as u64)),
                None => match self.inner_spool_dir() {
                    Some(dir) => {
                        read_spool_file(&dir.join(spool_file_name(seq))).and_then(|payload| {
                            decode_request(&payload).map(|r| (r, payload.len() as u64))
                        })
                    }
                    None => Err("spooled without a spool directory".to_string()),
                },
            };
            match decoded {
                Ok((request, encoded_len)) => {
                    return Some(Head {
                        seq,
                        samples: samples_in(&request),
                        encoded_len,
                        request,
                    })
                }
                Err(problem) => self.discard_unreadable(seq, &problem),
            }
        }
    }

    fn discard_unreadable(&self, seq: u64, problem: &str) {
        let mut st = self.lock();
        st.in_flight = None;
        if let Some(index) = st.spool.iter().position(|e| e.seq == seq) {
            if let Some(entry) = st.spool.remove(index) {
                st.spool_bytes -= entry.size;
            }
            self.remove_spool_file(seq);
            Metrics::add(&self.inner.metrics.spool_corrupt, 1);
            error!(
                seq,
                "spool file {} is unreadable and was removed (its export request is lost): {problem}",
                spool_file_name(seq)
            );
        } else if let Some(index) = st.memory.iter().position(|i| i.seq == seq) {
            if let Some(item) = st.memory.remove(index) {
                st.memory_bytes -= item.bytes.len() as u64;
            }
            Metrics::add(&self.inner.metrics.requests_failed, 1);
            error!(
                seq,
                "queued export request cannot be decoded, dropping it: {problem}"
            );
        }
        self.update_gauges(&st);
    }

    /// Removes the head with this sequence number from wherever it is now.
    fn remove(&self, st: &mut State, seq: u64) -> bool {
        if let Some(index) = st.spool.iter().position(|e| e.seq == seq) {
            if let Some(entry) = st.spool.remove(index) {
                st.spool_bytes -= entry.size;
            }
            self.remove_spool_file(seq);
        } else if let Some(index) = st.memory.iter().position(|i| i.seq == seq) {
            if let Some(item) = st.memory.remove(index) {
                st.memory_bytes -= item.bytes.len() as u64;
            }
        } else {
            return false;
        }
        self.update_gauges(st);
        true
    }

    /// Books the result of sending `head`.
    fn complete(
        &self,
        head: &Head,
        result: Result<Accepted, SendError>,
        backoff: &mut Backoff,
    ) -> Step {
        let m = &self.inner.metrics;
        match result {
            Ok(accepted) => {
                if backoff.failures > 0 {
                    info!(
                        seq = head.seq,
                        failed_attempts = backoff.failures,
                        "export delivered again after failed attempts"
                    );
                }
                backoff.reset();
                let removed = self.remove(&mut self.lock(), head.seq);
                Metrics::add(&m.requests_exported, 1);
                Metrics::add(&m.samples_exported, head.samples);
                Metrics::add(&m.bytes_exported, head.encoded_len);
                if accepted.rejected_profiles > 0 {
                    Metrics::add(&m.profiles_rejected, accepted.rejected_profiles);
                    warn!(
                        seq = head.seq,
                        rejected_profiles = accepted.rejected_profiles,
                        "the backend rejected part of an export request: {}",
                        accepted.message
                    );
                } else if !accepted.message.is_empty() {
                    info!(seq = head.seq, "the backend says: {}", accepted.message);
                }
                if !removed {
                    debug!(
                        seq = head.seq,
                        "delivered request had already left the queue"
                    );
                }
                Step::Delivered
            }
            Err(SendError::Permanent { code, message }) => {
                backoff.reset();
                self.remove(&mut self.lock(), head.seq);
                Metrics::add(&m.requests_failed, 1);
                warn!(
                    seq = head.seq,
                    %code,
                    "the backend rejected an export request, dropping it: {message}"
                );
                Step::Removed
            }
            Err(SendError::Retryable(message)) => {
                Metrics::add(&m.requests_retried, 1);
                let delay = backoff.next(head.seq);
                #[cfg(test)]
                self.inner
                    .backoff_log
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(delay);
                let failures = backoff.failures;
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(
                        seq = head.seq,
                        failed_attempts = failures,
                        "export failed, retrying in {delay:?}: {message}"
                    );
                } else {
                    debug!(
                        seq = head.seq,
                        failed_attempts = failures,
                        "export failed, retrying in {delay:?}: {message}"
                    );
                }
                Step::Retry(delay)
            }
        }
    }
}

/// Clears the in-flight mark when an attempt ends, however it ends.
struct InFlight<'a> {
    queue: &'a DeliveryQueue,
    seq: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        if st.in_flight == Some(self.seq) {
            st.in_flight = None;
        }
    }
}

/// Resolves once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Index of the oldest entry that is not in flight (the in-flight one can
/// only be the first).
fn oldest_droppable<T>(
    queue: &VecDeque<T>,
    in_flight: Option<u64>,
    seq: impl Fn(&T) -> u64,
) -> Option<usize> {
    let first = queue.front()?;
    if Some(seq(first)) != in_flight {
        Some(0)
    } else if queue.len() > 1 {
        Some(1)
    } else {
        None
    }
}

/// Exponential backoff with jitter: the n-th consecutive failure waits
/// between 75% and 100% of `initial × 2ⁿ⁻¹`, capped at `max`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(MIN_BACKOFF);
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    fn nominal(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    fn next(&mut self, seq: u64) -> Duration {
        let nominal = self.nominal();
        self.failures = self.failures.saturating_add(1);
        nominal.mul_f64(1.0 - 0.25 * jitter(seq, self.failures))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in [0, 1) that differs between agents and attempts, so agents
/// that lost the same backend do not all retry in step. `RandomState` is
/// seeded randomly per process; the clock and the attempt vary it further.
fn jitter(seq: u64, attempt: u32) -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    seq.hash(&mut hasher);
    attempt.hash(&mut hasher);
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        now.as_nanos().hash(&mut hasher);
    }
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Samples in a request: each sample's first value (its count), or its
/// timestamps when it carries no values.
pub fn samples_in(request: &ExportProfilesServiceRequest) -> u64 {
    request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .flat_map(|s| &s.profiles)
        .flat_map(|p| &p.samples)
        .map(|s| match s.values.first() {
            Some(&count) => count.max(0) as u64,
            None => s.timestamps_unix_nano.len() as u64,
        })
        .sum()
}

fn decode_request(bytes: &[u8]) -> Result<ExportProfilesServiceRequest, String> {
    ExportProfilesServiceRequest::decode(bytes).map_err(|e| format!("invalid protobuf: {e}"))
}

fn spool_file_name(seq: u64) -> String {
    format!("{seq:0width$}{SPOOL_SUFFIX}", width = SEQ_DIGITS)
}

/// The sequence number of a spool file name, `None` for other names.
fn parse_spool_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SPOOL_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn lock_spool_dir(dir: &Path) -> Result<File, DeliveryError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| DeliveryError::SpoolDir {
            path: dir.to_path_buf(),
            source,
        })?;
    // SAFETY: flock only uses the descriptor, which `file` keeps open; the
    // lock lives as long as the returned file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DeliveryError::SpoolLocked {
                path: dir.to_path_buf(),
            });
        }
        return Err(DeliveryError::SpoolDir {
            path: dir.to_path_buf(),
            source: err,
        });
    }
    Ok(file)
}

/// The spool files in `dir`, in sequence order. Temporary files of an
/// interrupted write are removed; other foreign files are left alone.
fn scan_spool(dir: &Path) -> io::Result<Vec<SpoolEntry>> {
    let mut entries = Vec::new();
    let mut foreign = Vec::new();
    for dirent in fs::read_dir(dir)? {
        let dirent = dirent?;
        let name = dirent.file_name();
        let name = name.to_string_lossy();
        if name == LOCK_FILE {
            continue;
        }
        if name.starts_with('.') && name.ends_with(".tmp") {
            debug!("removing {name}, left by an interrupted spool write");
            if let Err(e) = fs::remove_file(dirent.path()) {
                warn!("removing {}: {e}", dirent.path().display());
            }
            continue;
        }
        match parse_spool_file_name(&name) {
            Some(seq) if dirent.file_type()?.is_file() => entries.push(SpoolEntry {
                seq,
                size: dirent.metadata()?.len(),
            }),
            _ => foreign.push(name.into_owned()),
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        warn!(
            count = foreign.len(),
            first = %foreign[0],
            "ignoring files in the spool directory {} that hearth did not write",
            dir.display()
        );
    }
    entries.sort_by_key(|e| e.seq);
    Ok(entries)
}

fn write_spool_file(dir: &Path, seq: u64, payload: &[u8]) -> Result<(), DeliveryError> {
    let name = spool_file_name(seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut crc = flate2::Crc::new();
        crc.update(payload);
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(SPOOL_MAGIC);
        header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        header[16..20].copy_from_slice(&crc.sum().to_le_bytes());
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&header)?;
        file.write_all(payload)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)?;
        // Makes the rename itself survive a crash.
        File::open(dir)?.sync_all()
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        DeliveryError::SpoolWrite { path, source }
    })
}

/// The payload of a spool file, after checking its header and checksum.
fn read_spool_file(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = fs::read(path).map_err(|e| format!("reading: {e}"))?;
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != SPOOL_MAGIC {
        return Err("not a hearth spool file (bad header)".to_string());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let mut sum = [0u8; 4];
    sum.copy_from_slice(&bytes[16..20]);
    let payload = &bytes[HEADER_LEN as usize..];
    if u64::from_le_bytes(len) != payload.len() as u64 {
        return Err(format!(
            "truncated: header says {} payload bytes, file has {}",
            u64::from_le_bytes(len),
            payload.len()
        ));
    }
    let mut crc = flate2::Crc::new();
    crc.update(payload);
    if crc.sum() != u32::from_le_bytes(sum) {
        return Err("checksum mismatch".to_string());
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    use opentelemetry_proto::tonic::profiles::v1development::{
        Profile, ResourceProfiles, Sample, ScopeProfiles,
    };

    /// A request that identifies itself by `id` and is about `pad` bytes
    /// long; it carries `id + 1` samples.
    fn request(id: u64, pad: usize) -> ExportProfilesServiceRequest {
        ExportProfilesServiceRequest {
            resource_profiles: vec![ResourceProfiles {
                schema_url: format!("req-{id}"),
                scope_profiles: vec![ScopeProfiles {
                    profiles: vec![Profile {
                        samples: vec![Sample {
                            values: vec![id as i64 + 1],
                            ..Default::default()
                        }],
                        original_payload: vec![0xab; pad],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            dictionary: None,
        }
    }

    fn id_of(request: &ExportProfilesServiceRequest) -> u64 {
        request.resource_profiles[0]
            .schema_url
            .strip_prefix("req-")
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Encoded size of `request(id, pad)` for ids below 10.
    fn size(pad: usize) -> u64 {
        request(0, pad).encoded_len() as u64
    }

    type Scripted = Result<Accepted, SendError>;

    #[derive(Default)]
    struct FakeState {
        /// Answers to give, in order; `Ok` once empty.
        script: VecDeque<Scripted>,
        /// Every attempt: the request's id and when.
        attempts: Vec<(u64, std::time::Instant)>,
        /// Ids of requests answered with `Ok`.
        delivered: Vec<u64>,
    }

    /// Records what it is sent and answers from a script.
    #[derive(Clone, Default)]
    struct Fake {
        state: Arc<Mutex<FakeState>>,
        /// When set, every attempt first waits for a permit.
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Fake {
        fn scripted(script: impl IntoIterator<Item = Scripted>) -> Fake {
            let fake = Fake::default();
            fake.state.lock().unwrap().script = script.into_iter().collect();
            fake
        }
        fn delivered(&self) -> Vec<u64> {
            self.state.lock().unwrap().delivered.clone()
        }
        fn attempts(&self) -> Vec<u64> {
            let st = self.state.lock().unwrap();
            st.attempts.iter().map(|a| a.0).collect()
        }
        fn attempt_times(&self) -> Vec<std::time::Instant> {
            let st = self.state.lock().unwrap();
            st.attempts.iter().map(|a| a.1).collect()
        }
    }

    impl Transport for Fake {
        async fn send(&mut self, request: &ExportProfilesServiceRequest) -> Scripted {
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let id = id_of(request);
            let mut st = self.state.lock().unwrap();
            st.attempts.push((id, std::time::Instant::now()));
            let answer = st.script.pop_front().unwrap_or(Ok(Accepted::default()));
            if answer.is_ok() {
                st.delivered.push(id);
            }
            answer
        }
    }

    fn retryable() -> Scripted {
        Err(SendError::Retryable("unavailable".into()))
    }

    fn fast(spool_dir: Option<PathBuf>) -> DeliveryConfig {
        DeliveryConfig {
            spool_dir,
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(8),
            ..DeliveryConfig::default()
        }
    }

    fn spool_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hearth-delivery-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn spool_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != LOCK_FILE)
            .collect();
        names.sort();
        names
    }

    /// Runs the sender until `done` holds for the fake (or 10 s pass),
    /// then stops it.
    async fn run_until(queue: &DeliveryQueue, fake: &Fake, done: impl Fn(&Fake) -> bool) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn({
            let queue = queue.clone();
            let fake = fake.clone();
            async move { queue.run(fake, stop_rx).await }
        });
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while !done(fake) {
            assert!(std::time::Instant::now() < give_up, "timed out");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn outage_then_recovery_delivers_everything_in_order_once() {
        let metrics = Arc::new(Metrics::default());
        let queue = DeliveryQueue::open(fast(None), metrics.clone()).unwrap();
        for id in 0..5 {
            queue.push(request(id, 10));
        }
        let fake = Fake::scripted([retryable(), retryable(), retryable(), retryable()]);
        // More arrive during the outage.
        let pusher = {
            let queue = queue.clone();
            tokio::spawn(async move {
                for id in 5..8 {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    queue.push(request(id, 10));
                }
            })
        };
        run_until(&queue, &fake, |f| f.delivered().len() == 8).await;
        pusher.await.unwrap();
        assert_eq!(fake.delivered(), (0..8).collect::<Vec<_>>());
        let attempts = fake.attempts();
        assert_eq!(&attempts[..5], &[0, 0, 0, 0, 0], "{attempts:?}");
        assert_eq!(&attempts[5..], &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(metrics.requests_exported.load(Ordering::Relaxed), 8);
        assert_eq!(metrics.requests_retried.load(Ordering::Relaxed), 4);
        assert_eq!(metrics.samples_exported.load(Ordering::Relaxed), 36);
        assert_eq!(metrics.bytes_exported.load(Ordering::Relaxed), 8 * size(10));
        assert_eq!(metrics.queue_depth.load(Ordering::Relaxed), 0);
        assert_eq!(queue.depth(), (0, 0));
    }

    #[test]
    fn backoff_doubles_with_jitter_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut nominal = 500.0;
        for _ in 0..12 {
            let d = b.next(7).as_secs_f64() * 1000.0;
            let want: f64 = f64::min(nominal, 30_000.0);
            assert!(d > want * 0.75 - 1e-6 && d <= want + 1e-6, "{d} vs {want}");
            nominal *= 2.0;
        }
        b.reset();
        let d = b.next(8);
        assert!(d <= Duration::from_millis(500) && d >= Duration::from_millis(375));
        // Many failures do not overflow.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            assert!(b.next(1) <= Duration::from_secs(30));
        }
        // A zero initial delay would spin.
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next(1) >= Duration::from_micros(750));
    }

    #[tokio::test]
    async fn backoff_grows_while_failing_and_resets_after_success() {
        let cfg = DeliveryConfig {
            backoff_initial: Duration::from_millis(4),
            backoff_max: Duration::from_millis(20),
            ..DeliveryConfig::default()
        };
        let queue = DeliveryQueue::open(cfg, Arc::new(Metrics::default())).unwrap();
        queue.push(request(0, 1));
        queue.push(request(1, 1));
        let mut script = vec![retryable(); 5];
        script.push(Ok(Accepted::default()));
        script.extend([retryable(), retryable()]);
        let fake = Fake::scripted(script);
        run_until(&queue, &fake, |f| f.delivered().len() == 2).await;
        let log: Vec<f64> = queue
            .inner
            .backoff_log
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        let nominal = [4.0, 8.0, 16.0, 20.0, 20.0, 4.0, 8.0];
        assert_eq!(log.len(), nominal.len(), "{log:?}");
        for (d, want) in log.iter().zip(nominal) {
            assert!(*d > want * 0.75 - 1e-6 && *d <= want + 1e-6, "{log:?}");
        }
        // The waits really happened.
        let times = fake.attempt_times();
        assert_eq!(fake.attempts(), [0, 0, 0, 0, 0, 0, 1, 1, 1]);
        for (i, d) in log.iter().enumerate() {
            let slot = if i < 5 { i } else { i + 1 };
            let waited = times[slot + 1] - times[slot];
            assert!(waited.as_secs_f64() * 1000.0 >= d - 0.5, "{i}: {waited:?}");
        }
    }

    #[tokio::test]
    async fn permanent_error_drops_only_that_request() {
        let metrics = Arc::new(Metrics::default());
        let queue = DeliveryQueue::open(fast(None), metrics.clone()).unwrap();
        for id in 0..4 {
            queue.push(request(id, 1));
        }
        let fake = Fake::scripted([
            Ok(Accepted::default()),
            Err(SendError::Permanent {
                code: "InvalidArgument".into(),
                message: "bad profile".into(),
            }),
        ]);
        run_until(&queue, &fake, |f| f.attempts().len() == 4).await;
        assert_eq!(fake.attempts(), [0, 1, 2, 3]);
        assert_eq!(fake.delivered(), [0, 2, 3]);
        assert_eq!(metrics.requests_failed.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.requests_exported.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.requests_retried.load(Ordering::Relaxed), 0);
        assert_eq!(queue.depth(), (0, 0));
    }

    #[tokio::test]
    async fn partial_success_is_delivered_and_counted() {
        let metrics = Arc::new(Metrics::default());
        let queue = DeliveryQueue::open(fast(None), metrics.clone()).unwrap();
        queue.push(request(0, 1));
        let fake = Fake::scripted([Ok(Accepted {
            rejected_profiles: 2,
            message: "unknown attribute".into(),
        })]);
        run_until(&queue, &fake, |f| f.delivered().len() == 1).await;
        assert_eq!(metrics.profiles_rejected.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.requests_exported.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.requests_failed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn memory_overflow_spills_oldest_to_spool_and_keeps_order() {
        let dir = spool_dir("spill");
        let metrics = Arc::new(Metrics::default());
        let cfg = DeliveryConfig {
            memory_max_bytes: 3 * size(100),
            ..fast(Some(dir.clone()))
        };
        let queue = DeliveryQueue::open(cfg, metrics.clone()).unwrap();
        for id in 0..10 {
            queue.push(request(id, 100));
        }
        assert_eq!(metrics.queue_depth.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.spool_depth.load(Ordering::Relaxed), 7);
        assert_eq!(
            metrics.spool_bytes.load(Ordering::Relaxed),
            7 * (size(100) + HEADER_LEN)
        );
        let files = spool_files(&dir);
        let want: Vec<String> = (0..7).map(spool_file_name).collect();
        assert_eq!(files, want);
        assert_eq!(
            queue.depth(),
            (10, 3 * size(100) + 7 * (size(100) + HEADER_LEN))
        );

        let fake = Fake::default();
        run_until(&queue, &fake, |f| f.delivered().len() == 10).await;
        assert_eq!(fake.attempts(), (0..10).collect::<Vec<_>>());
        assert!(spool_files(&dir).is_empty());
        assert_eq!(metrics.spool_depth.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.spool_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.requests_dropped.load(Ordering::Relaxed), 0);
        drop(queue);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn full_spool_drops_the_oldest_and_counts_them() {
        let dir = spool_dir("spoolcap");
        let metrics = Arc::new(Metrics::default());
        let cfg = DeliveryConfig {
            memory_max_bytes: size(100),
            spool_max_bytes: 3 * (size(100) + HEADER_LEN),
            ..fast(Some(dir.clone()))
        };
        let queue = DeliveryQueue::open(cfg, metrics.clone()).unwrap();
        for id in 0..10 {
            queue.push(request(id, 100));
        }
        // One in memory, three in the spool, six dropped.
        assert_eq!(metrics.requests_dropped.load(Ordering::Relaxed), 6);
        assert_eq!(spool_files(&dir), [6, 7, 8].map(spool_file_name));
        let fake = Fake::default();
        run_until(&queue, &fake, |f| f.delivered().len() == 4).await;
        assert_eq!(fake.attempts(), [6, 7, 8, 9]);
        drop(queue);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn without_spool_the_oldest_are_dropped_past_the_memory_cap() {
        let metrics = Arc::new(Metrics::default());
        let cfg = DeliveryConfig {
            memory_max_bytes: 3 * size(100),
            ..fast(None)
        };
        let queue = DeliveryQueue::open(cfg, metrics.clone()).unwrap();
        for id in 0..5 {
            queue.push(request(id, 100));
        }
        assert_eq!(metrics.requests_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(queue.depth(), (3, 3 * size(100)));
        let fake = Fake::default();
        run_until(&queue, &fake, |f| f.delivered().len() == 3).await;
        assert_eq!(fake.attempts(), [2, 3, 4]);
    }

    #[tokio::test]
    async fn the_request_being_sent_is_not_lost_when_it_spills() {
        let dir = spool_dir("inflight");
        let metrics = Arc::new(Metrics::default());
        let cfg = DeliveryConfig {
            memory_max_bytes: 0,
            spool_max_bytes: 2 * (size(100) + HEADER_LEN),
            ..fast(Some(dir.clone()))
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fake = Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
        };
        let queue = DeliveryQueue::open(cfg, metrics.clone()).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn({
            let (queue, fake) = (queue.clone(), fake.clone());
            async move { queue.run(fake, stop_rx).await }
        });
        queue.push(request(0, 100));
        // Wait until request 0 is in flight (the fake waits at the gate).
        while queue.lock().in_flight != Some(0) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The spool holds two: 0 (in flight) stays, 1 and 2 go.
        for id in 1..4 {
            queue.push(request(id, 100));
        }
        assert_eq!(spool_files(&dir), [spool_file_name(0), spool_file_name(3)]);
        assert_eq!(metrics.requests_dropped.load(Ordering::Relaxed), 2);
        gate.add_permits(10);
        while fake.delivered().len() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(fake.attempts(), [0, 3]);
        assert!(spool_files(&dir).is_empty());
        drop(queue);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn persist_and_reopen_delivers_the_rest_in_order_without_duplicates() {
        let dir = spool_dir("restart");
        let first = Fake::scripted(
            [Ok(Accepted::default()), Ok(Accepted::default())]
                .into_iter()
                .chain(std::iter::repeat_n(retryable(), 1000)),
        );
        {
            let metrics = Arc::new(Metrics::default());
            let queue = DeliveryQueue::open(fast(Some(dir.clone())), metrics.clone()).unwrap();
            for id in 0..5 {
                queue.push(request(id, 10));
            }
            run_until(&queue, &first, |f| f.attempts().len() >= 4).await;
            // The daemon pushes its last window after stopping the sender.
            queue.push(request(5, 10));
            let outcome = queue.persist().unwrap();
            assert_eq!(
                outcome,
                PersistOutcome {
                    persisted: 4,
                    dropped: 0,
                    spool_items: 4,
                    spool_bytes: 4 * (size(10) + HEADER_LEN),
                }
            );
            assert_eq!(metrics.queue_depth.load(Ordering::Relaxed), 0);
            assert_eq!(metrics.spool_depth.load(Ordering::Relaxed), 4);
        }
        assert_eq!(first.delivered(), [0, 1]);
        assert_eq!(spool_files(&dir), [2, 3, 4, 5].map(spool_file_name));

        // The restart.
        let metrics = Arc::new(Metrics::default());
        let queue = DeliveryQueue::open(fast(Some(dir.clone())), metrics.clone()).unwrap();
        assert_eq!(queue.depth(), (4, 4 * (size(10) + HEADER_LEN)));
        assert_eq!(metrics.spool_depth.load(Ordering::Relaxed), 4);
        queue.push(request(6, 10));
        queue.push(request(7, 10));
        // Numbering continues after the spooled requests.
        assert_eq!(
            queue
                .lock()
                .memory
                .iter()
                .map(|i| i.seq)
                .collect::<Vec<_>>(),
            [6, 7]
        );
        let second = Fake::default();
        run_until(&queue, &second, |f| f.delivered().len() == 6).await;
        assert_eq!(second.attempts(), [2, 3, 4, 5, 6, 7]);
        assert!(spool_files(&dir).is_empty());
        drop(queue);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn unreadable_spool_files_are_removed_and_counted() {
        let dir = spool_dir("corrupt");
        {
            // A zero memory cap sends every push straight to the spool.
            let cfg = DeliveryConfig {
                memory_max_bytes: 0,
                ..fast(Some(dir.clone()))
            };
            let queue = DeliveryQueue::open(cfg, Arc::new(Metrics::default())).unwrap();
            for id in 0..5 {
                queue.push(request(id, 10));
            }
        }
        // 1: garbage; 2: truncated; 3: valid header and checksum but not
        // protobuf; plus a foreign file and a temporary file.
        fs::write(dir.join(spool_file_name(1)), b"garbage").unwrap();
        let two = fs::read(dir.join(spool_file_name(2))).unwrap();
        fs::write(dir.join(spool_file_name(2)), &two[..two.len() - 3]).unwrap();
        write_spool_file(&dir, 3, &[0xff, 0xff, 0xff]).unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        fs::write(dir.join(".00000000000000000009.pb.tmp"), b"half").unwrap();

        let metrics = Arc::new(Metrics::default());
        let queue = DeliveryQueue::open(fast(Some(dir.clone())), metrics.clone()).unwrap();
        assert_eq!(queue.depth().0, 5);
        assert!(!dir.join(".00000000000000000009.pb.tmp").exists());
        let fake = Fake::default();
        run_until(&queue, &fake, |f| f.delivered().len() == 2).await;
        assert_eq!(fake.attempts(), [0, 4]);
        assert_eq!(metrics.spool_corrupt.load(Ordering::Relaxed), 3);
        assert_eq!(spool_files(&dir), ["notes.txt"]);
        assert_eq!(queue.depth(), (0, 0));
        drop(queue);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn drain_delivers_what_is_left_until_the_deadline() {
        let metrics = Arc::new(Metrics::default());
        let queue = DeliveryQueue::open(fast(None), metrics.clone()).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        stop_tx.send(true).unwrap();
        let mut fake = queue.run(Fake::default(), stop_rx).await;
        for id in 0..3 {
            queue.push(request(id, 10));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = queue.drain(&mut fake, deadline).await;
        assert_eq!(
            outcome,
            DrainOutcome {
                delivered: 3,
                remaining_items: 0,
                remaining_bytes: 0
            }
        );
        assert_eq!(fake.delivered(), [0, 1, 2]);

        // A backend that stays down: drain gives up at the deadline.
        let mut down = Fake::scripted(std::iter::repeat_n(retryable(), 1000));
        queue.push(request(3, 10));
        let started = Instant::now();
        let outcome = queue
            .drain(&mut down, started + Duration::from_millis(50))
            .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(outcome.delivered, 0);
        assert_eq!(
            (outcome.remaining_items, outcome.remaining_bytes),
            (1, size(10))
        );
        // Without a spool directory persisting loses it, counted.
        let outcome = queue.persist().unwrap();
        assert_eq!(outcome.dropped, 1);
        assert_eq!(metrics.requests_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(queue.depth(), (0, 0));
    }

    #[tokio::test]
    async fn stop_interrupts_a_send_in_progress() {
        let queue = DeliveryQueue::open(fast(None), Arc::new(Metrics::default())).unwrap();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fake = Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
        };
        queue.push(request(0, 10));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn({
            let (queue, fake) = (queue.clone(), fake.clone());
            async move { queue.run(fake, stop_rx).await }
        });
        while queue.lock().in_flight.is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop_tx.send(true).unwrap();
        let mut fake = task.await.unwrap();
        assert_eq!(queue.lock().in_flight, None);
        assert_eq!(queue.depth().0, 1);
        gate.add_permits(10);
        let outcome = queue
            .drain(&mut fake, Instant::now() + Duration::from_secs(10))
            .await;
        assert_eq!(outcome.delivered, 1);
        assert_eq!(fake.delivered(), [0]);
    }

    #[test]
    fn a_spool_directory_serves_one_queue_at_a_time() {
        let dir = spool_dir("locked");
        let first =
            DeliveryQueue::open(fast(Some(dir.clone())), Arc::new(Metrics::default())).unwrap();
        let err =
            DeliveryQueue::open(fast(Some(dir.clone())), Arc::new(Metrics::default())).unwrap_err();
        assert!(matches!(err, DeliveryError::SpoolLocked { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        drop(first);
        DeliveryQueue::open(fast(Some(dir.clone())), Arc::new(Metrics::default())).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_spool_path_that_is_a_file_is_a_clear_error() {
        let dir = spool_dir("notadir");
        fs::write(&dir, b"x").unwrap();
        let err =
            DeliveryQueue::open(fast(Some(dir.clone())), Arc::new(Metrics::default())).unwrap_err();
        assert!(matches!(err, DeliveryError::SpoolDir { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn spool_file_names_round_trip() {
        assert_eq!(spool_file_name(42), "00000000000000000042.pb");
        assert_eq!(parse_spool_file_name("00000000000000000042.pb"), Some(42));
        assert_eq!(
            parse_spool_file_name(&spool_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for name in [
            "42.pb",
            "0000000000000000004x.pb",
            "00000000000000000042.pbx",
            ".lock",
        ] {
            assert_eq!(parse_spool_file_name(name), None, "{name}");
        }
    }
}
