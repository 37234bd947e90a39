//! A real OTLP/gRPC profiles receiver for the tests, so delivery is checked
//! against the generated tonic server rather than a hand-written fake.
//!
//! The receiver records every accepted request and its metadata in arrival
//! order, can answer the next requests with a chosen status or a partial
//! success, and can be stopped (the port then refuses connections and open
//! connections are cut) and restarted on the same port to simulate an
//! outage. It runs on its own tokio runtime, one per start, so it works from
//! plain `#[test]` functions and from async tests alike; stopping discards
//! that runtime, which is what cuts the open connections.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
    ProfilesService, ProfilesServiceServer,
};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesPartialSuccess, ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

/// The receiver's certificate, and the CA its clients must present
/// certificates from (mutual TLS) if set.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

/// One accepted request.
#[derive(Debug, Clone)]
pub struct Received {
    pub request: ExportProfilesServiceRequest,
    /// The request's gRPC metadata (HTTP/2 headers), names lower-case.
    pub metadata: Vec<(String, String)>,
}

impl Received {
    /// The value of metadata `name`, if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer for an upcoming request.
enum Scripted {
    Fail(Code, String),
    Partial(i64, String),
}

#[derive(Default)]
struct Log {
    received: Vec<Received>,
    /// Requests that reached the service, answered or not.
    attempts: usize,
    script: VecDeque<Scripted>,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Log>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl ProfilesService for Service {
    async fn export(
        &self,
        request: Request<ExportProfilesServiceRequest>,
    ) -> Result<Response<ExportProfilesServiceResponse>, Status> {
        let metadata = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let request = request.into_inner();
        let mut log = self.shared.lock();
        log.attempts += 1;
        let answer = match log.script.pop_front() {
            Some(Scripted::Fail(code, message)) => Err(Status::new(code, message)),
            Some(Scripted::Partial(rejected, message)) => Ok(ExportProfilesServiceResponse {
                partial_success: Some(ExportProfilesPartialSuccess {
                    rejected_profiles: rejected,
                    error_message: message,
                }),
            }),
            None => Ok(ExportProfilesServiceResponse::default()),
        };
        if answer.is_ok() {
            log.received.push(Received { request, metadata });
        }
        drop(log);
        self.shared.changed.notify_all();
        answer.map(Response::new)
    }
}

/// One start of the server: its runtime and its shutdown switch.
struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: tokio::sync::oneshot::Sender<()>,
}

/// A running (or stopped) OTLP profiles receiver.
pub struct Receiver {
    addr: SocketAddr,
    tls: Option<ServerTls>,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

impl Receiver {
    /// Starts a receiver on `addr` (default: a free port on 127.0.0.1),
    /// speaking TLS if `tls` is given. Panics if it cannot.
    pub fn start(addr: Option<SocketAddr>, tls: Option<ServerTls>) -> Receiver {
        let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = bind(addr);
        let addr = listener.local_addr().expect("receiver address");
        let receiver = Receiver {
            addr,
            tls,
            shared: Arc::new(Shared::default()),
            running: Mutex::new(None),
        };
        receiver.serve(listener);
        receiver
    }

    /// The address it listens on (also while stopped).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`, or `https://…` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Accepted requests, in arrival order.
    pub fn requests(&self) -> Vec<ExportProfilesServiceRequest> {
        self.shared
            .lock()
            .received
            .iter()
            .map(|r| r.request.clone())
            .collect()
    }

    /// Accepted requests with their metadata, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// The metadata of each accepted request, in arrival order.
    pub fn metadata(&self) -> Vec<Vec<(String, String)>> {
        self.shared
            .lock()
            .received
            .iter()
            .map(|r| r.metadata.clone())
            .collect()
    }

    /// Requests that reached the service, including those answered with a
    /// scripted error.
    pub fn attempts(&self) -> usize {
        self.shared.lock().attempts
    }

    /// Answers the next `n` requests with `code` and `message` (after any
    /// answers scripted before); they are not recorded as received.
    pub fn fail_next(&self, n: usize, code: Code, message: &str) {
        let mut log = self.shared.lock();
        for _ in 0..n {
            log.script
                .push_back(Scripted::Fail(code, message.to_string()));
        }
    }

    /// Accepts the next `n` requests with a partial success saying
    /// `rejected` profiles were rejected.
    pub fn partial_success_next(&self, n: usize, rejected: i64, message: &str) {
        let mut log = self.shared.lock();
        for _ in 0..n {
            log.script
                .push_back(Scripted::Partial(rejected, message.to_string()));
        }
    }

    /// Waits until at least `n` requests were accepted; false on timeout.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |log| log.received.len() >= n)
    }

    /// Waits until at least `n` requests reached the service (accepted or
    /// not); false on timeout.
    pub fn wait_for_attempts(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |log| log.attempts >= n)
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(&Log) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut log = self.shared.lock();
        while !done(&log) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            log = self
                .shared
                .changed
                .wait_timeout(log, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Stops serving: when this returns the port refuses connections and
    /// open connections are being closed. Recorded requests are kept.
    pub fn stop(&self) {
        let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let _ = running.shutdown.send(());
        // tonic closes the listener as soon as it sees the signal.
        let deadline = Instant::now() + Duration::from_secs(5);
        while StdStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "receiver on {} still accepts connections after stop",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Cuts connections still open (a graceful close would wait for the
        // clients).
        running.runtime.shutdown_background();
    }

    /// Serves again on the same port after [`Receiver::stop`].
    pub fn restart(&self) {
        self.stop();
        self.serve(bind(self.addr));
    }

    fn serve(&self, listener: StdListener) {
        listener
            .set_nonblocking(true)
            .expect("making the receiver's listener non-blocking");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .expect("starting the receiver's runtime");
        let mut builder = Server::builder();
        if let Some(tls) = &self.tls {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder
                .tls_config(config)
                .expect("configuring the receiver's TLS");
        }
        let service = ProfilesServiceServer::new(Service {
            shared: self.shared.clone(),
        })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = self.addr;
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)
                .expect("registering the receiver's listener");
            let served = builder
                .add_service(service)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("otlp receiver on {addr}: {e}");
            }
        });
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Running { runtime, shutdown });
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = running.shutdown.send(());
            running.runtime.shutdown_background();
        }
    }
}

/// Binds `addr`, retrying a while if the port is still held (a restart
/// right after a stop).
fn bind(addr: SocketAddr) -> StdListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match StdListener::bind(addr) {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("binding the OTLP receiver to {addr}: {e}"),
        }
    }
}
