//! `hearth run`: the continuous daemon.
//!
//! Three threads of work, each unable to stall the one before it:
//!
//! ```text
//! collector thread ──Profile──► export thread ──requests──► delivery task ──► OTLP backend
//! (drain, symbolize, tag,        (encode + enqueue,          (retry, backoff,
//!  governor)                      or write the store)         spool on disk)
//! ```
//!
//! Everything that can fail at start-up (config, privileges, BTF, the
//! store and spool directories, TLS files, the metrics address) is checked
//! before sampling starts. On SIGTERM or SIGINT the collector stops the
//! programs and drains the last partial window, the export thread turns it
//! into requests, and delivery gets `--shutdown-timeout` to send what is
//! queued; whatever is left goes to the spool for the next start.

mod collector;
pub mod governor;
mod sinks;

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::bpf::{self, BpfError};
use crate::config::Config;
use crate::export::delivery::{DeliveryConfig, DeliveryError, DeliveryQueue};
use crate::export::otlp::client::{ClientError, OtlpClient, OtlpClientConfig};
use crate::export::otlp::encode::EncodeOptions;
use crate::export::store::{Retention, Store, StoreError};
use crate::filter::{FilterError, FilterSpec};
use crate::metrics::{self, Metrics, MetricsError};
use collector::{CollectorCommand, CollectorOptions};
use governor::GovernorConfig;
use sinks::{Exporter, OtlpSink, StoreSink, OFF_CPU_SUBDIR, WALL_SUBDIR};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("OTLP exporter: {0}")]
    Client(#[from] ClientError),
    #[error("delivery queue: {0}")]
    Delivery(#[from] DeliveryError),
    #[error("metrics endpoint: {0}")]
    Metrics(#[from] MetricsError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("starting a thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error(transparent)]
    Kubernetes(#[from] crate::metadata::kubernetes::KubernetesError),
}

impl DaemonError {
    /// Process exit code; the same scheme as `hearth record` (README).
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Bpf(BpfError::Privileges(_)) => 3,
            DaemonError::Bpf(BpfError::NoBtf { .. }) => 4,
            DaemonError::Store(_)
            | DaemonError::Client(_)
            | DaemonError::Delivery(_)
            | DaemonError::Metrics(_)
            | DaemonError::Filter(_)
            | DaemonError::Kubernetes(_) => 2,
            _ => 1,
        }
    }
}

/// Runs until SIGTERM or SIGINT, then shuts down cleanly.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    bpf::check_privileges()?;
    bpf::check_btf(std::path::Path::new("/sys/kernel/btf/vmlinux"))?;
    let metrics = Arc::new(Metrics::default());
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    // Sinks first: a wrong path or certificate fails before any sampling.
    let mut exporters: Vec<Box<dyn Exporter>> = Vec::new();
    let mut delivery = None;
    if let Some(otlp) = &config.otlp {
        let client = OtlpClient::new(&OtlpClientConfig {
            endpoint: otlp.endpoint.clone(),
            ca_file: otlp.ca.clone(),
            client_cert: otlp.client_cert.clone(),
            client_key: otlp.client_key.clone(),
            insecure_skip_verify: otlp.insecure_skip_verify,
            headers: otlp.headers.clone(),
            timeout: otlp.timeout,
            gzip: true,
        })?;
        let queue = DeliveryQueue::open(
            DeliveryConfig {
                memory_max_bytes: otlp.queue_memory_bytes,
                spool_dir: Some(otlp.spool_dir.clone()),
                spool_max_bytes: otlp.spool_max_bytes,
                ..DeliveryConfig::default()
            },
            metrics.clone(),
        )?;
        exporters.push(Box::new(OtlpSink {
            options: EncodeOptions {
                max_request_bytes: usize::try_from(otlp.max_request_bytes).unwrap_or(usize::MAX),
            },
            queue: queue.clone(),
        }));
        info!(endpoint = %otlp.endpoint, spool = %otlp.spool_dir.display(), "exporting OTLP profiles");
        delivery = Some((queue, client));
    }
    if let Some(store) = &config.store {
        let retention = Retention {
            max_age: store.max_age,
            max_bytes: store.max_bytes,
        };
        let open_sub = |enabled: bool, sub: &str| {
            enabled
                .then(|| Store::open(&store.dir.join(sub), retention))
                .transpose()
        };
        let off_cpu = open_sub(config.off_cpu.is_some(), OFF_CPU_SUBDIR)?;
        let wall = open_sub(config.off_cpu.is_some_and(|o| o.wall), WALL_SUBDIR)?;
        let on_cpu = Store::open(&store.dir, retention)?;
        info!(dir = %store.dir.display(), "writing windows to the local store");
        exporters.push(Box::new(StoreSink {
            on_cpu,
            off_cpu,
            wall,
            metrics: metrics.clone(),
        }));
    }
    if let Some(addr) = config.metrics_addr {
        let listener = metrics::bind(addr).await?;
        info!(%addr, "serving /metrics, /healthz, /readyz");
        tokio::spawn(metrics::serve(listener, metrics.clone()));
    }
    // The pod watch runs on this runtime; the collector reads its index.
    let filter = FilterSpec::new(&config.filter)?;
    let metadata = crate::metadata::start(&config.metadata, &filter.pods)?;
    let (stop_delivery, stop_rx) = tokio::sync::watch::channel(false);
    let delivery_task = delivery.map(|(queue, client)| {
        let task_queue = queue.clone();
        let task = tokio::spawn(async move { task_queue.run(client, stop_rx).await });
        (queue, task)
    });

    let (window_tx, window_rx) = std::sync::mpsc::channel();
    let (command_tx, command_rx) = std::sync::mpsc::channel();
    let export_thread = std::thread::Builder::new()
        .name("hearth-export".into())
        .spawn(move || sinks::run_exports(window_rx, exporters))
        .map_err(DaemonError::Thread)?;
    let collector = collector::spawn(
        CollectorOptions {
            interval: config.interval,
            governor: GovernorConfig {
                target_frequency_hz: config.frequency_hz,
                min_frequency_hz: config.min_frequency_hz,
                max_cpu_percent: config.max_cpu_percent,
                max_host_load_percent: config.max_host_load_percent,
            },
            debuginfo: config.debuginfo,
            off_cpu: config.off_cpu,
            unwind: config.unwind,
            unwind_memory: config.unwind_memory,
            filter,
            metadata,
        },
        metrics.clone(),
        window_tx,
        command_rx,
    )?;

    // The collector only ends on its own when draining fails.
    let collector_done = wait_for_thread(collector);
    tokio::pin!(collector_done);
    let collector_result = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: stopping"); None }
        _ = sigint.recv() => { info!("SIGINT: stopping"); None }
        result = &mut collector_done => Some(result),
    };
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    // Stop the sender loop now; what is queued, and the final window, is
    // flushed below against the deadline.
    let _ = stop_delivery.send(true);
    let collector_result = match collector_result {
        Some(result) => result,
        None => {
            let _ = command_tx.send(CollectorCommand::Stop);
            collector_done.await
        }
    };
    // The collector has sent its last window and hung up, so the export
    // thread ends once it has queued that window.
    wait_for_thread(export_thread)
        .await
        .map_err(|_| DaemonError::Panicked("export"))?;

    if let Some((queue, task)) = delivery_task {
        let mut client = task.await.map_err(|_| DaemonError::Panicked("delivery"))?;
        let flushed = queue.drain(&mut client, deadline).await;
        if flushed.remaining_items > 0 {
            warn!(
                delivered = flushed.delivered,
                remaining = flushed.remaining_items,
                "shutdown timeout reached before everything was delivered"
            );
        } else {
            info!(delivered = flushed.delivered, "queue flushed");
        }
        let persisted = queue.persist()?;
        if persisted.spool_items > 0 {
            info!(
                requests = persisted.spool_items,
                "undelivered requests left in the spool for the next start"
            );
        }
    }
    match collector_result {
        Ok(Ok(())) => {
            info!("stopped");
            Ok(())
        }
        Ok(Err(e)) => Err(DaemonError::Bpf(e)),
        Err(()) => Err(DaemonError::Panicked("collector")),
    }
}

/// Waits for a thread without blocking the runtime (and without polling:
/// a blocking-pool thread parks in `join`).
async fn wait_for_thread<T: Send + 'static>(handle: std::thread::JoinHandle<T>) -> Result<T, ()> {
    match tokio::task::spawn_blocking(move || handle.join()).await {
        Ok(Ok(value)) => Ok(value),
        _ => Err(()),
    }
}
