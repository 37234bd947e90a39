//! Where finished windows go: the export thread hands each profile to every
//! configured [`Exporter`]. Exporters do local work only (encode and
//! enqueue, or write a file), so the collector is never held up by a slow
//! or absent backend; network delivery runs in the delivery queue's own task.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use tracing::{debug, warn};

use crate::export::delivery::DeliveryQueue;
use crate::export::otlp::encode::{encode_window, EncodeOptions};
use crate::export::store::Store;
use crate::metrics::Metrics;
use crate::profile::{Profile, SampleKind};

/// A destination for finished windows. Implementations must not block on
/// the network.
pub trait Exporter: Send {
    /// For logs.
    fn name(&self) -> &'static str;
    /// Takes one window. Failures are the exporter's to count and log: one
    /// sink failing must not stop the others.
    fn export(&mut self, window: &Profile);
}

/// Encodes windows as OTLP requests and queues them for delivery.
pub struct OtlpSink {
    pub options: EncodeOptions,
    pub queue: DeliveryQueue,
}

impl Exporter for OtlpSink {
    fn name(&self) -> &'static str {
        "otlp"
    }

    fn export(&mut self, window: &Profile) {
        let requests = encode_window(window, &self.options);
        debug!(requests = requests.len(), "window encoded for OTLP");
        for request in requests {
            self.queue.push(request);
        }
    }
}

/// Writes windows into the local store: on-CPU windows in its directory,
/// off-CPU and wall-clock windows in the subdirectories
/// [`OFF_CPU_SUBDIR`] and [`WALL_SUBDIR`], so a reader of one directory
/// never mixes kinds of time.
pub struct StoreSink {
    pub on_cpu: Store,
    pub off_cpu: Option<Store>,
    pub wall: Option<Store>,
    pub metrics: Arc<Metrics>,
}

/// Store subdirectory of off-CPU windows.
pub const OFF_CPU_SUBDIR: &str = "off-cpu";
/// Store subdirectory of wall-clock windows.
pub const WALL_SUBDIR: &str = "wall";

impl Exporter for StoreSink {
    fn name(&self) -> &'static str {
        "store"
    }

    fn export(&mut self, window: &Profile) {
        let store = match window.meta.kind {
            SampleKind::OnCpu => Some(&mut self.on_cpu),
            SampleKind::OffCpu(_) => self.off_cpu.as_mut(),
            SampleKind::Wall(_) => self.wall.as_mut(),
        };
        let Some(store) = store else {
            warn!(kind = %window.meta.kind.describe(), "no store for this kind of profile");
            return;
        };
        match store.write(window) {
            Ok(outcome) => {
                Metrics::add(&self.metrics.store_windows_written, 1);
                Metrics::add(&self.metrics.store_files_removed, outcome.removed_files);
                debug!(path = %outcome.path.display(), bytes = outcome.bytes, "window stored");
            }
            Err(e) => {
                Metrics::add(&self.metrics.store_write_errors, 1);
                warn!(error = %e, "cannot store the window");
            }
        }
    }
}

/// The export thread's loop: runs until the collector hangs up after its
/// last window.
pub fn run_exports(windows: Receiver<Profile>, mut exporters: Vec<Box<dyn Exporter>>) {
    for window in windows {
        for exporter in &mut exporters {
            debug!(exporter = exporter.name(), "exporting window");
            exporter.export(&window);
        }
    }
}
