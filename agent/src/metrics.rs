//! Self-metrics: what the agent did and what it cost, served as Prometheus
//! text on `/metrics` next to `/healthz` and `/readyz`.
//!
//! Components share one [`Metrics`] (`Arc<Metrics>`) and bump its atomics
//! directly; nothing is registered per component. Values that are cheaper to
//! read than to keep current (agent CPU and RSS) are read at scrape time.
//!
//! The format is the Prometheus text format 0.0.4, written by hand (see
//! [`render`] for why not prometheus-client): every scraper and tool reads
//! it, and the set of metrics is fixed, so there is no registry to keep.
//! Binding ([`bind`]) is separate from serving ([`serve`]) so the caller
//! can bind before anything else starts and make a taken port a start-up
//! error; each connection runs in its own task so a stuck scraper cannot
//! stall anything else.

use std::convert::Infallible;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hearth_ebpf::Stat;
use http::header::{self, HeaderValue};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// One counter per [`Stat`] (more than `Default` derives for arrays).
#[derive(Debug)]
pub struct BpfEventCounters(pub [AtomicU64; Stat::COUNT as usize]);

impl Default for BpfEventCounters {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl std::ops::Deref for BpfEventCounters {
    type Target = [AtomicU64; Stat::COUNT as usize];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Every counter and gauge the agent exports. Counters only grow; gauges
/// are set to the current value.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Kernel-side outcomes per sampling event, indexed by [`Stat`]
    /// (`hearth_bpf_events_total{event}`): recorded, idle, filtered and
    /// every drop reason.
    pub bpf_events: BpfEventCounters,
    /// Windows drained from the kernel maps.
    pub windows_collected: AtomicU64,
    /// Samples (sum of counts) in drained windows.
    pub samples_collected: AtomicU64,

    /// Export requests the backend accepted.
    pub requests_exported: AtomicU64,
    /// Samples in accepted requests.
    pub samples_exported: AtomicU64,
    /// Encoded (uncompressed protobuf) bytes of accepted requests.
    pub bytes_exported: AtomicU64,
    /// Send attempts that failed with a retryable error and were retried.
    pub requests_retried: AtomicU64,
    /// Requests the backend rejected with a non-retryable error.
    pub requests_failed: AtomicU64,
    /// Requests dropped because the queue and spool were full (oldest first).
    pub requests_dropped: AtomicU64,
    /// Requests waiting in memory.
    pub queue_depth: AtomicU64,
    /// Requests waiting in the spool directory.
    pub spool_depth: AtomicU64,
    /// Bytes in the spool directory.
    pub spool_bytes: AtomicU64,

    /// Windows written to the local store.
    pub store_windows_written: AtomicU64,
    /// Store files removed by retention.
    pub store_files_removed: AtomicU64,
    /// Windows the store failed to write.
    pub store_write_errors: AtomicU64,

    /// Symbolizer cache hits and misses (cumulative).
    pub symbol_cache_hits: AtomicU64,
    pub symbol_cache_misses: AtomicU64,

    /// Sampling frequency in use now (Hz per CPU).
    pub frequency_hz: AtomicU64,
    /// Times the governor changed the frequency.
    pub frequency_changes: AtomicU64,

    /// Set once the programs are attached and the first drain succeeded
    /// (`/readyz`).
    pub ready: AtomicBool,

    /// Profiles the backend said it rejected in otherwise accepted export
    /// requests (OTLP partial success).
    pub profiles_rejected: AtomicU64,
    /// Spool files that could not be read back (bad header, checksum or
    /// protobuf); each is logged and removed, and its request is lost.
    pub spool_corrupt: AtomicU64,

    /// Unwind tables (cumulative counters and gauges, copied from the
    /// unwinder at each window).
    pub unwind_files_built: AtomicU64,
    pub unwind_files_evicted: AtomicU64,
    pub unwind_tables_over_memory: AtomicU64,
    pub unwind_files_loaded: AtomicU64,
    pub unwind_table_bytes: AtomicU64,
    pub unwind_processes: AtomicU64,

    /// The Kubernetes pod watch (copied from the pod index at each window;
    /// absent from the exposition without `--kubernetes`).
    pub kubernetes_pods: AtomicU64,
    pub kubernetes_watch_errors: AtomicU64,
    pub kubernetes_enabled: AtomicBool,
}

impl Metrics {
    /// Adds `value` to a counter.
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }
}

/// Content type of [`render`]'s output: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest a client may take to send a request's headers; a stalled
/// client must not hold a connection (and its task) for ever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. Scrapers open one or two; the limit only
/// bounds what a misbehaving client can make the agent hold.
const MAX_CONNECTIONS: usize = 32;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {addr} is already in use (another hearth, or another exporter?)")]
    AddrInUse {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "no permission to listen on metrics address {addr} \
         (ports below 1024 need CAP_NET_BIND_SERVICE)"
    )]
    PermissionDenied {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("metrics address {addr} is not an address of this host")]
    AddrNotAvailable {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on metrics address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds the metrics listener. Done before anything else starts so a taken
/// port fails the start-up with a message naming the address, instead of a
/// daemon that runs without the endpoint its operator configured.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => MetricsError::AddrInUse { addr, source },
            io::ErrorKind::PermissionDenied => MetricsError::PermissionDenied { addr, source },
            io::ErrorKind::AddrNotAvailable => MetricsError::AddrNotAvailable { addr, source },
            _ => MetricsError::Bind { addr, source },
        })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// returned future is dropped (the caller selects it against shutdown).
///
/// Each connection runs in its own task on the caller's runtime, so a slow
/// scraper never delays another one or the agent; the tasks are owned by
/// this future and aborted with it.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        // Wait for a free slot before accepting: excess clients queue in the
        // kernel's backlog rather than in agent memory.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                match err.kind() {
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset => {
                        tracing::debug!("metrics endpoint: accept: {err}");
                    }
                    _ => {
                        tracing::warn!("metrics endpoint: accept failed: {err}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
                continue;
            }
        };
        // Reap finished connections so the set only holds live ones.
        while connections.try_join_next().is_some() {}
        let metrics = Arc::clone(&metrics);
        connections.spawn(async move {
            serve_connection(stream, metrics).await;
            drop(slot);
        });
    }
}

async fn serve_connection(stream: TcpStream, metrics: Arc<Metrics>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &metrics);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(err) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!("metrics endpoint: connection: {err}");
    }
}

/// Routes one request. The bodies are tiny and built in memory, so there is
/// nothing to stream and no error path.
fn respond(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(render(metrics))));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => plain(StatusCode::OK, "ready"),
        "/readyz" => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        _ => plain(StatusCode::OK, "ok"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Renders every metric in the Prometheus text format 0.0.4.
///
/// Hand-rendered rather than through prometheus-client: its text encoder
/// only writes OpenMetrics 1.0, where a counter's `# TYPE` line names the
/// family without `_total` and the document ends in `# EOF`. Served as
/// `text/plain; version=0.0.4` that would be mislabelled (a 0.0.4 parser
/// sees typed families without samples and untyped `_total` samples), and
/// the metrics are a fixed set of atomics, so a registry adds nothing.
pub fn render(metrics: &Metrics) -> String {
    let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
    let mut out = Exposition::default();

    out.family(
        "hearth_build_info",
        Kind::Gauge,
        "Version of the running agent; always 1.",
    );
    out.sample(&[("version", env!("CARGO_PKG_VERSION"))], 1u64);
    out.single(
        "hearth_ready",
        Kind::Gauge,
        "1 once the programs are attached and the first window was drained.",
        u64::from(metrics.ready.load(Ordering::Relaxed)),
    );

    out.family(
        "hearth_bpf_events_total",
        Kind::Counter,
        "Outcomes of the kernel-side sampling program, by event.",
    );
    for stat in Stat::ALL {
        out.sample(
            &[("event", stat.name())],
            load(&metrics.bpf_events[stat as usize]),
        );
    }
    out.single(
        "hearth_windows_collected_total",
        Kind::Counter,
        "Windows drained from the kernel maps.",
        load(&metrics.windows_collected),
    );
    out.single(
        "hearth_samples_collected_total",
        Kind::Counter,
        "Samples in drained windows.",
        load(&metrics.samples_collected),
    );

    out.family(
        "hearth_export_requests_total",
        Kind::Counter,
        "Export requests by outcome: exported (accepted), retried (attempts \
         retried after a retryable error), failed (rejected for good), \
         dropped (queue and spool full).",
    );
    for (outcome, counter) in [
        ("exported", &metrics.requests_exported),
        ("retried", &metrics.requests_retried),
        ("failed", &metrics.requests_failed),
        ("dropped", &metrics.requests_dropped),
    ] {
        out.sample(&[("outcome", outcome)], load(counter));
    }
    out.single(
        "hearth_export_samples_total",
        Kind::Counter,
        "Samples in export requests the backend accepted.",
        load(&metrics.samples_exported),
    );
    out.single(
        "hearth_export_bytes_total",
        Kind::Counter,
        "Encoded (uncompressed) bytes of export requests the backend accepted.",
        load(&metrics.bytes_exported),
    );
    out.single(
        "hearth_export_profiles_rejected_total",
        Kind::Counter,
        "Profiles the backend rejected inside accepted requests (OTLP partial success).",
        load(&metrics.profiles_rejected),
    );
    out.single(
        "hearth_export_spool_corrupt_total",
        Kind::Counter,
        "Spool files that failed their checks when read and were removed.",
        load(&metrics.spool_corrupt),
    );
    out.single(
        "hearth_export_queue_requests",
        Kind::Gauge,
        "Export requests waiting in memory.",
        load(&metrics.queue_depth),
    );
    out.single(
        "hearth_export_spool_requests",
        Kind::Gauge,
        "Export requests waiting in the spool directory.",
        load(&metrics.spool_depth),
    );
    out.single(
        "hearth_export_spool_bytes",
        Kind::Gauge,
        "Bytes in the spool directory.",
        load(&metrics.spool_bytes),
    );

    out.single(
        "hearth_store_windows_written_total",
        Kind::Counter,
        "Windows written to the local store.",
        load(&metrics.store_windows_written),
    );
    out.single(
        "hearth_store_files_removed_total",
        Kind::Counter,
        "Local store files removed by retention.",
        load(&metrics.store_files_removed),
    );
    out.single(
        "hearth_store_write_errors_total",
        Kind::Counter,
        "Windows the local store failed to write.",
        load(&metrics.store_write_errors),
    );

    out.single(
        "hearth_unwind_files_built_total",
        Kind::Counter,
        "Unwind tables built from files' call frame information.",
        load(&metrics.unwind_files_built),
    );
    out.single(
        "hearth_unwind_files_evicted_total",
        Kind::Counter,
        "Unwind tables evicted (no live process mapped them) to make room.",
        load(&metrics.unwind_files_evicted),
    );
    out.single(
        "hearth_unwind_tables_over_memory_total",
        Kind::Counter,
        "Unwind tables not loaded for lack of room under --unwind-memory.",
        load(&metrics.unwind_tables_over_memory),
    );
    out.single(
        "hearth_unwind_files_loaded",
        Kind::Gauge,
        "Unwind tables loaded in the kernel now.",
        load(&metrics.unwind_files_loaded),
    );
    out.single(
        "hearth_unwind_table_bytes",
        Kind::Gauge,
        "Kernel memory the loaded unwind tables take.",
        load(&metrics.unwind_table_bytes),
    );
    out.single(
        "hearth_unwind_processes",
        Kind::Gauge,
        "Processes walked with unwind tables now.",
        load(&metrics.unwind_processes),
    );

    if metrics.kubernetes_enabled.load(Ordering::Relaxed) {
        out.single(
            "hearth_kubernetes_pods",
            Kind::Gauge,
            "Pods of this node the pod watch knows.",
            load(&metrics.kubernetes_pods),
        );
        out.single(
            "hearth_kubernetes_watch_errors_total",
            Kind::Counter,
            "Errors of the Kubernetes pod watch (each retried with backoff; profiles flow untagged meanwhile).",
            load(&metrics.kubernetes_watch_errors),
        );
    }

    out.single(
        "hearth_symbol_cache_hits_total",
        Kind::Counter,
        "Symbolizer cache hits.",
        load(&metrics.symbol_cache_hits),
    );
    out.single(
        "hearth_symbol_cache_misses_total",
        Kind::Counter,
        "Symbolizer cache misses.",
        load(&metrics.symbol_cache_misses),
    );

    out.single(
        "hearth_sampling_frequency_hz",
        Kind::Gauge,
        "Sampling frequency in use, per CPU.",
        load(&metrics.frequency_hz),
    );
    out.single(
        "hearth_frequency_changes_total",
        Kind::Counter,
        "Times the overhead governor changed the sampling frequency.",
        load(&metrics.frequency_changes),
    );

    // Read at scrape time. A failed read (no /proc?) leaves the series out
    // rather than reporting a wrong zero.
    match process_cpu_time() {
        Ok(cpu) => out.single(
            "hearth_process_cpu_seconds_total",
            Kind::Counter,
            "User and system CPU time of the agent, all threads.",
            cpu.as_secs_f64(),
        ),
        Err(err) => tracing::debug!("metrics: agent CPU time: {err}"),
    }
    match process_resident_bytes() {
        Ok(bytes) => out.single(
            "hearth_process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the agent.",
            bytes,
        ),
        Err(err) => tracing::debug!("metrics: agent resident memory: {err}"),
    }

    out.text
}

/// User plus system CPU time of this process (all threads) so far.
///
/// `getrusage` rather than `/proc/self/stat`: microseconds instead of clock
/// ticks, which matters when the budget is 1% of a core (10 ms a second).
pub(crate) fn process_cpu_time() -> io::Result<Duration> {
    let mut usage = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage`; the kernel fills it in.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid `rusage`, and getrusage succeeded.
    let usage = unsafe { usage.assume_init() };
    let duration = |tv: libc::timeval| {
        Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0))
    };
    Ok(duration(usage.ru_utime) + duration(usage.ru_stime))
}

/// Resident set size of this process, from `/proc/self/statm`.
pub(crate) fn process_resident_bytes() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages = parse_statm_resident(&statm).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/self/statm: {statm:?}"),
        )
    })?;
    Ok(pages.saturating_mul(procfs::page_size()))
}

/// The second field of `statm` (resident pages).
fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

/// Writes text-format families: HELP and TYPE once, then the samples, all
/// named exactly like the family (0.0.4 has no suffix rules for counters).
#[derive(Default)]
struct Exposition {
    text: String,
    /// Name of the family being written.
    family: &'static str,
}

impl Exposition {
    fn family(&mut self, name: &'static str, kind: Kind, help: &str) {
        self.family = name;
        self.text.push_str("# HELP ");
        self.text.push_str(name);
        self.text.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.text.push_str("\\\\"),
                '\n' => self.text.push_str("\\n"),
                c => self.text.push(c),
            }
        }
        self.text.push_str("\n# TYPE ");
        self.text.push_str(name);
        self.text.push_str(match kind {
            Kind::Counter => " counter\n",
            Kind::Gauge => " gauge\n",
        });
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.text.push_str(self.family);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(key);
                self.text.push_str("=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        match value.into() {
            Value::Int(v) => self.text.push_str(&v.to_string()),
            Value::Float(v) if v.is_nan() => self.text.push_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => self.text.push_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => self.text.push_str("-Inf"),
            Value::Float(v) => self.text.push_str(&v.to_string()),
        }
        self.text.push('\n');
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &'static str, kind: Kind, help: &str, value: impl Into<Value>) {
        self.family(name, kind, help);
        self.sample(&[], value);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn bumped() -> Metrics {
        let m = Metrics::default();
        Metrics::add(&m.bpf_events[Stat::Recorded as usize], 7);
        Metrics::add(&m.bpf_events[Stat::MapLookupFailed as usize], 2);
        Metrics::add(&m.windows_collected, 3);
        Metrics::add(&m.samples_collected, 1234);
        Metrics::add(&m.requests_exported, 5);
        Metrics::add(&m.requests_retried, 4);
        Metrics::add(&m.requests_failed, 1);
        Metrics::add(&m.requests_dropped, 6);
        Metrics::add(&m.samples_exported, 1200);
        Metrics::add(&m.bytes_exported, 99_000);
        Metrics::set(&m.queue_depth, 8);
        Metrics::set(&m.spool_depth, 9);
        Metrics::set(&m.spool_bytes, 4096);
        Metrics::add(&m.store_windows_written, 11);
        Metrics::add(&m.store_files_removed, 12);
        Metrics::add(&m.store_write_errors, 13);
        Metrics::add(&m.symbol_cache_hits, 100);
        Metrics::add(&m.symbol_cache_misses, 10);
        Metrics::set(&m.frequency_hz, 19);
        Metrics::add(&m.frequency_changes, 2);
        m.ready.store(true, Ordering::Relaxed);
        m
    }

    #[test]
    fn render_reports_the_current_values() {
        let text = render(&bumped());
        let lines: HashSet<&str> = text.lines().collect();
        for expected in [
            r#"hearth_bpf_events_total{event="recorded"} 7"#,
            r#"hearth_bpf_events_total{event="map_lookup_failed"} 2"#,
            r#"hearth_bpf_events_total{event="idle"} 0"#,
            "hearth_windows_collected_total 3",
            "hearth_samples_collected_total 1234",
            r#"hearth_export_requests_total{outcome="exported"} 5"#,
            r#"hearth_export_requests_total{outcome="retried"} 4"#,
            r#"hearth_export_requests_total{outcome="failed"} 1"#,
            r#"hearth_export_requests_total{outcome="dropped"} 6"#,
            "hearth_export_samples_total 1200",
            "hearth_export_bytes_total 99000",
            "hearth_export_queue_requests 8",
            "hearth_export_spool_requests 9",
            "hearth_export_spool_bytes 4096",
            "hearth_store_windows_written_total 11",
            "hearth_store_files_removed_total 12",
            "hearth_store_write_errors_total 13",
            "hearth_symbol_cache_hits_total 100",
            "hearth_symbol_cache_misses_total 10",
            "hearth_sampling_frequency_hz 19",
            "hearth_frequency_changes_total 2",
            "hearth_ready 1",
            "# TYPE hearth_bpf_events_total counter",
            "# TYPE hearth_sampling_frequency_hz gauge",
        ] {
            assert!(lines.contains(expected), "missing {expected:?} in\n{text}");
        }
        for stat in Stat::ALL {
            let prefix = format!("hearth_bpf_events_total{{event=\"{}\"}} ", stat.name());
            assert_eq!(
                text.lines().filter(|l| l.starts_with(&prefix)).count(),
                1,
                "{prefix}"
            );
        }

        let sample = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap()
        };
        // This test process has used some CPU and memory.
        assert!(sample("hearth_process_cpu_seconds_total") > 0.0);
        assert!(sample("hearth_process_resident_memory_bytes") > 1_000_000.0);
    }

    /// A minimal 0.0.4 parser: every line is HELP, TYPE or a sample of the
    /// family announced just before, each family once, each series once.
    #[test]
    fn render_is_valid_exposition() {
        let text = render(&bumped());
        assert!(text.ends_with('\n'));

        fn valid_name(name: &str) -> bool {
            let mut chars = name.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        }

        let mut help = HashSet::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut series = HashSet::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').expect(line);
                assert!(valid_name(name) && !doc.is_empty(), "{line}");
                assert!(help.insert(name.to_owned()), "duplicate HELP: {line}");
                assert!(!types.contains_key(name), "HELP after TYPE: {line}");
                current = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert_eq!(Some(name), current.as_deref(), "TYPE without HELP: {line}");
                assert!(matches!(kind, "counter" | "gauge"), "{line}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "duplicate TYPE: {line}"
                );
                assert!(name.starts_with("hearth_"), "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            } else {
                assert!(!line.starts_with('#'), "stray comment: {line}");
                let (series_id, value) = line.rsplit_once(' ').expect(line);
                value.parse::<f64>().expect(line);
                let name = match series_id.split_once('{') {
                    Some((name, labels)) => {
                        let labels = labels.strip_suffix('}').expect(line);
                        for pair in labels.split(',') {
                            let (key, value) = pair.split_once('=').expect(line);
                            assert!(valid_name(key), "{line}");
                            let inner = value
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .expect(line);
                            assert!(!inner.contains('"'), "{line}");
                        }
                        name
                    }
                    None => series_id,
                };
                assert_eq!(
                    Some(name),
                    current.as_deref(),
                    "sample outside family: {line}"
                );
                assert!(types.contains_key(name), "sample before TYPE: {line}");
                assert!(
                    series.insert(series_id.to_owned()),
                    "duplicate series: {line}"
                );
            }
        }
        for name in [
            "hearth_bpf_events_total",
            "hearth_export_requests_total",
            "hearth_process_cpu_seconds_total",
            "hearth_process_resident_memory_bytes",
            "hearth_sampling_frequency_hz",
        ] {
            assert!(types.contains_key(name), "no family {name}");
        }
    }

    #[test]
    fn exposition_escapes_label_values_and_help() {
        let mut out = Exposition::default();
        out.family("x", Kind::Gauge, "a \\ b\nc");
        out.sample(&[("l", "q\"\\\n")], f64::INFINITY);
        out.sample(&[("l", "n")], f64::NAN);
        assert_eq!(
            out.text,
            "# HELP x a \\\\ b\\nc\n# TYPE x gauge\nx{l=\"q\\\"\\\\\\n\"} +Inf\nx{l=\"n\"} NaN\n"
        );
    }

    #[test]
    fn statm_resident_is_the_second_field() {
        assert_eq!(parse_statm_resident("2516 851 650 1 0 251 0\n"), Some(851));
        assert_eq!(parse_statm_resident("2516\n"), None);
    }

    /// Sends one HTTP/1.1 request on a fresh connection and returns the
    /// status code, the headers (lowercased names) and the body.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect(&raw);
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect(head);
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        Metrics::add(&metrics.bpf_events[Stat::Recorded as usize], 42);
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics)));

        let (status, head, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            body.contains("hearth_bpf_events_total{event=\"recorded\"} 42\n"),
            "{body}"
        );

        assert_eq!(request(addr, "GET", "/healthz").await.0, 200);
        assert_eq!(request(addr, "GET", "/healthz").await.2, "ok");
        let (status, _, body) = request(addr, "HEAD", "/healthz").await;
        assert_eq!((status, body.as_str()), (200, ""));

        let (status, _, body) = request(addr, "GET", "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready"));
        metrics.ready.store(true, Ordering::Relaxed);
        let (status, _, body) = request(addr, "GET", "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready"));

        assert_eq!(request(addr, "GET", "/").await.0, 404);
        assert_eq!(request(addr, "GET", "/metrics/x").await.0, 404);
        let (status, head, _) = request(addr, "POST", "/metrics").await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"), "{head}");

        server.abort();
    }

    #[tokio::test]
    async fn a_stalled_client_does_not_block_others() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Metrics::default())));

        // Half a request line, then nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET /metr").await.unwrap();

        let answered =
            tokio::time::timeout(Duration::from_secs(5), request(addr, "GET", "/healthz"))
                .await
                .expect("second client blocked by the first");
        assert_eq!(answered.0, 200);

        drop(stalled);
        server.abort();
    }

    #[tokio::test]
    async fn bind_names_the_address_in_use() {
        let taken = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        assert!(matches!(err, MetricsError::AddrInUse { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("in use"), "{message}");
    }
}
