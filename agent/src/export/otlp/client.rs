//! The OTLP/gRPC [`Transport`]: sends one `ExportProfilesServiceRequest`
//! per call to a collector and says whether trying again makes sense.
//!
//! Everything that can be checked without the network (URL, PEM files, key
//! pairs, header syntax) is checked in [`OtlpClient::new`], so a typo stops
//! the agent at startup with a message naming the flag or file, while the
//! connection itself is made lazily: the agent starts and spools while the
//! backend is down.
//!
//! TLS is done here with rustls (ring, explicitly, so no process-wide
//! provider is needed) through a custom connector rather than tonic's TLS
//! features: that gives us the system roots or `--otlp-ca`, mutual TLS,
//! `--otlp-insecure-skip-verify`, and TLS errors we can explain (an unknown
//! CA says "certificate verification failed" rather than "transport
//! error"). The endpoint handed to tonic is always `http://` with an
//! `https://` origin, so tonic never tries TLS of its own.
//!
//! Errors are sorted the way the OTLP specification asks: codes that mean
//! "later" (Unavailable, DeadlineExceeded, ResourceExhausted, Aborted,
//! Cancelled, OutOfRange, DataLoss) and every failure to reach the backend
//! (connection refused, TLS handshake, timeout, broken stream) are
//! retryable; anything else the server answered (InvalidArgument,
//! Unauthenticated, PermissionDenied, Unimplemented, …) is permanent and
//! keeps the server's message. A certificate problem is retryable too: the
//! backend's certificate may get fixed, and the queue keeps the data.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_client::ProfilesServiceClient;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::warn;

use crate::export::delivery::{Accepted, SendError, Transport};

/// Where and how to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpClientConfig {
    /// `http://host:port` or `https://host:port` (the port defaults to 80
    /// or 443); no path.
    pub endpoint: String,
    /// CA certificates (PEM) to trust instead of the system store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
    /// Accept any server certificate (testing only).
    pub insecure_skip_verify: bool,
    /// gRPC metadata sent with every request, e.g. `authorization`.
    pub headers: Vec<(String, String)>,
    /// Limit for connecting and for each request.
    pub timeout: Duration,
    /// Compress requests with gzip.
    pub gzip: bool,
}

impl OtlpClientConfig {
    /// Plain defaults for `endpoint`: 10 s timeout, gzip, no TLS options,
    /// no headers.
    pub fn new(endpoint: impl Into<String>) -> OtlpClientConfig {
        OtlpClientConfig {
            endpoint: endpoint.into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            insecure_skip_verify: false,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            gzip: true,
        }
    }
}

/// A configuration the client cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--otlp-endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    /// A file named by `flag` cannot be read or holds no usable PEM.
    #[error("{flag} {}: {message}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    /// Options that do not fit together.
    #[error("{flag}: {message}")]
    Option { flag: &'static str, message: String },
    /// A header name or value gRPC cannot carry (the value is not shown).
    #[error("--otlp-header {name:?}: {message}")]
    Header { name: String, message: String },
    /// Setting up TLS failed (no system roots, unusable key…).
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Sends export requests over one lazily (re)connected gRPC channel.
pub struct OtlpClient {
    endpoint: Endpoint,
    tls: Option<Arc<TlsTarget>>,
    /// Built on the first send: a channel needs a running tokio runtime.
    client: Option<ProfilesServiceClient<Channel>>,
    metadata: MetadataMap,
    timeout: Duration,
    gzip: bool,
    /// `host:port`, for messages.
    target: String,
}

impl fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be secrets.
        f.debug_struct("OtlpClient")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .field("headers", &self.metadata.len())
            .field("timeout", &self.timeout)
            .field("gzip", &self.gzip)
            .finish()
    }
}

/// Where and how to open TLS connections.
struct TlsTarget {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// Host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// `host:port`, for messages.
    target: String,
    /// The last TLS error seen on an established connection.
    last_error: Mutex<Option<String>>,
}

impl OtlpClient {
    /// Checks `cfg` and prepares the client; connects on the first send.
    /// Needs no tokio runtime.
    pub fn new(cfg: &OtlpClientConfig) -> Result<OtlpClient, ClientError> {
        let endpoint_err = |message: &str| ClientError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            message: message.to_string(),
        };
        let raw = cfg.endpoint.trim();
        let uri: Uri = raw
            .parse()
            .map_err(|e| endpoint_err(&format!("not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(endpoint_err(
                    "must start with http:// or https:// (like http://collector:4317)",
                ))
            }
        };
        let host = match uri.host() {
            Some(host) if !host.is_empty() => host.to_string(),
            _ => return Err(endpoint_err("has no host")),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(endpoint_err(
                "OTLP/gRPC endpoints have no path (give just scheme://host:port)",
            ));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = format!("{host}:{port}");

        if !https {
            let tls_flags = [
                ("--otlp-ca", cfg.ca_file.is_some()),
                ("--otlp-client-cert", cfg.client_cert.is_some()),
                ("--otlp-client-key", cfg.client_key.is_some()),
                ("--otlp-insecure-skip-verify", cfg.insecure_skip_verify),
            ];
            if let Some((flag, _)) = tls_flags.iter().find(|(_, set)| *set) {
                return Err(ClientError::Option {
                    flag,
                    message: "needs an https:// endpoint".to_string(),
                });
            }
        }
        let metadata = build_metadata(&cfg.headers)?;

        let base = format!("http://{target}");
        let mut endpoint = Endpoint::from_shared(base)
            .map_err(|e| endpoint_err(&e.to_string()))?
            .connect_timeout(cfg.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(cfg.timeout)
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| endpoint_err(&e.to_string()))?;
        let tls = if https {
            let origin: Uri = format!("https://{target}")
                .parse()
                .map_err(|e| endpoint_err(&format!("not a URL: {e}")))?;
            endpoint = endpoint.origin(origin);
            let bare_host = host.trim_start_matches('[').trim_end_matches(']');
            let server_name = ServerName::try_from(bare_host.to_string())
                .map_err(|e| endpoint_err(&format!("host is not a valid TLS name: {e}")))?;
            Some(Arc::new(TlsTarget {
                connector: TlsConnector::from(Arc::new(tls_config(cfg)?)),
                server_name,
                host: bare_host.to_string(),
                port,
                target: target.clone(),
                last_error: Mutex::new(None),
            }))
        } else {
            None
        };
        Ok(OtlpClient {
            endpoint,
            tls,
            client: None,
            metadata,
            timeout: cfg.timeout,
            gzip: cfg.gzip,
            target,
        })
    }

    fn client(&mut self) -> &mut ProfilesServiceClient<Channel> {
        self.client.get_or_insert_with(|| {
            let channel = match &self.tls {
                None => self.endpoint.connect_lazy(),
                Some(tls) => {
                    let tls = tls.clone();
                    self.endpoint
                        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                            tls.clone().connect()
                        }))
                }
            };
            let client = ProfilesServiceClient::new(channel)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_encoding_message_size(usize::MAX);
            if self.gzip {
                client.send_compressed(CompressionEncoding::Gzip)
            } else {
                client
            }
        })
    }
}

impl Transport for OtlpClient {
    async fn send(
        &mut self,
        request: &ExportProfilesServiceRequest,
    ) -> Result<Accepted, SendError> {
        let mut req = tonic::Request::new(request.clone());
        *req.metadata_mut() = self.metadata.clone();
        // Tells the server our deadline (grpc-timeout).
        req.set_timeout(self.timeout);
        let timeout = self.timeout;
        let target = self.target.clone();
        let call = self.client().export(req);
        let result = tokio::time::timeout(timeout, call).await;
        // A TLS error that surfaced on an established connection (the
        // server refusing our client certificate arrives after the TLS 1.3
        // handshake) is not in tonic's error; the connection noted it.
        let tls_error = self.tls.as_ref().and_then(|tls| tls.take_error());
        match result {
            Err(_) => Err(SendError::Retryable(format!(
                "no answer from {target} within {timeout:?}"
            ))),
            Ok(Err(status)) => Err(classify(&status, &target, tls_error.as_deref())),
            Ok(Ok(response)) => Ok(match response.into_inner().partial_success {
                Some(partial) => Accepted {
                    rejected_profiles: partial.rejected_profiles.max(0) as u64,
                    message: partial.error_message,
                },
                None => Accepted::default(),
            }),
        }
    }
}

impl TlsTarget {
    async fn connect(self: Arc<Self>) -> Result<TokioIo<Watched>, ConnectFailure> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ConnectFailure(format!("connecting to {}: {e}", self.target)))?;
        // Only latency suffers if this fails.
        let _ = tcp.set_nodelay(true);
        let stream = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ConnectFailure(describe_handshake_error(&self.target, &e)))?;
        if let Some(protocol) = stream.get_ref().1.alpn_protocol() {
            if protocol != b"h2" {
                return Err(ConnectFailure(format!(
                    "{} offered {} instead of HTTP/2 (is it a gRPC endpoint?)",
                    self.target,
                    String::from_utf8_lossy(protocol)
                )));
            }
        }
        Ok(TokioIo::new(Watched {
            inner: stream,
            target: self.clone(),
            heard_from_server: false,
        }))
    }

    fn note_error(&self, err: &io::Error, heard_from_server: bool) {
        let note = match tls_cause(err) {
            Some(tls) => tls,
            // With TLS 1.3 the server checks our certificate after our side
            // of the handshake is done; its alert is often lost to the
            // connection reset that follows.
            None if !heard_from_server => format!(
                "the server closed the connection right after the TLS handshake ({err}); \
                 it may require a client certificate (--otlp-client-cert and \
                 --otlp-client-key) or refuse ours"
            ),
            None => return,
        };
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(note);
    }

    fn take_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A TLS connection that notes TLS errors met after the handshake.
struct Watched {
    inner: TlsStream<TcpStream>,
    target: Arc<TlsTarget>,
    /// Whether the server sent anything after the handshake.
    heard_from_server: bool,
}

impl Watched {
    fn watch<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(err)) = &poll {
            self.target.note_error(err, self.heard_from_server);
        }
        poll
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard_from_server = true;
        }
        self.watch(poll)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(poll)
    }
}

/// Why a connection could not be set up; its text becomes the status
/// message (tonic reports it as Unavailable).
#[derive(Debug)]
struct ConnectFailure(String);

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for ConnectFailure {}

fn describe_handshake_error(target: &str, err: &io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("TLS handshake with {target} failed: {}", describe_tls(tls)),
        None => format!("TLS handshake with {target} failed: {err}"),
    }
}

/// Plain words for the TLS failures people run into.
fn describe_tls(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "certificate verification failed: the server's certificate is not signed by a \
             trusted CA (set --otlp-ca to the CA that issued it)"
                .to_string()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "certificate verification failed: the server's certificate is not valid for this \
              host name (use the name the certificate was issued for)"
            .to_string(),
        rustls::Error::InvalidCertificate(cert) => {
            format!("certificate verification failed: {cert}")
        }
        rustls::Error::AlertReceived(alert) => {
            use rustls::AlertDescription as A;
            match alert {
                A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::AccessDenied => format!(
                    "the server refused the client certificate ({alert:?}); it may require \
                     mutual TLS (--otlp-client-cert and --otlp-client-key)"
                ),
                _ => format!("the server aborted the handshake ({alert:?})"),
            }
        }
        other => other.to_string(),
    }
}

/// The first rustls error in `err`'s source chain (possibly inside an I/O
/// error), described.
fn tls_cause(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_tls(tls));
        }
        if let Some(tls) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(describe_tls(tls));
        }
        current = e.source();
    }
    None
}

/// Retryable or permanent, per the OTLP specification (see the module
/// docs).
fn classify(status: &Status, target: &str, tls_error: Option<&str>) -> SendError {
    let mut message = status.message().to_string();
    let local = StdError::source(status).is_some();
    let tls = tls_cause(status).or_else(|| tls_error.filter(|_| local).map(str::to_string));
    if let Some(tls) = tls {
        if !message.contains(&tls) {
            message = format!("{message}: TLS: {tls}");
        }
    }
    let retryable = match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::OutOfRange
        | Code::DataLoss => true,
        Code::Unknown | Code::Internal => local,
        _ => false,
    };
    if retryable {
        SendError::Retryable(format!("{target}: {:?}: {message}", status.code()))
    } else {
        SendError::Permanent {
            code: format!("{:?}", status.code()),
            message,
        }
    }
}

/// Headers gRPC would drop or that tonic sets itself.
fn reserved_header(name: &str) -> bool {
    matches!(name, "te" | "content-type" | "user-agent") || name.starts_with("grpc-")
}

fn build_metadata(headers: &[(String, String)]) -> Result<MetadataMap, ClientError> {
    let mut map = MetadataMap::new();
    for (name, value) in headers {
        let err = |message: &str| ClientError::Header {
            name: name.clone(),
            message: message.to_string(),
        };
        let lower = name.trim().to_ascii_lowercase();
        if reserved_header(&lower) {
            return Err(err("reserved by gRPC; cannot be set"));
        }
        let key = MetadataKey::<Ascii>::from_bytes(lower.as_bytes()).map_err(|_| {
            err("not a valid gRPC metadata name (lower-case letters, digits, - _ .; no -bin suffix)")
        })?;
        // gRPC ASCII values are 0x20..=0x7E; `MetadataValue` alone lets
        // other bytes through.
        let value = value.trim();
        if !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(err("the value must be printable ASCII"));
        }
        let value = MetadataValue::<Ascii>::try_from(value)
            .map_err(|_| err("the value must be printable ASCII"))?;
        map.append(key, value);
    }
    Ok(map)
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::File {
        flag,
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let bytes = read_file(flag, path)?;
    let file_err = |message: String| ClientError::File {
        flag,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err("contains no PEM certificate".to_string()));
    }
    Ok(certs)
}

fn tls_config(cfg: &OtlpClientConfig) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let builder = if cfg.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert::new(&provider)))
    } else {
        builder.with_root_certificates(root_store(cfg)?)
    };
    let mut config = match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certificates("--otlp-client-cert", cert)?;
            let key_bytes = read_file("--otlp-client-key", key)?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| ClientError::File {
                    flag: "--otlp-client-key",
                    path: key.clone(),
                    message: match e {
                        rustls::pki_types::pem::Error::NoItemsFound => {
                            "contains no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string()
                        }
                        e => format!("invalid PEM: {e}"),
                    },
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ClientError::Option {
                    flag: "--otlp-client-key",
                    message: format!("unusable with --otlp-client-cert {}: {e}", cert.display()),
                })?
        }
        (Some(_), None) => {
            return Err(ClientError::Option {
                flag: "--otlp-client-cert",
                message: "mutual TLS also needs --otlp-client-key".to_string(),
            })
        }
        (None, Some(_)) => {
            return Err(ClientError::Option {
                flag: "--otlp-client-key",
                message: "mutual TLS also needs --otlp-client-cert".to_string(),
            })
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn root_store(cfg: &OtlpClientConfig) -> Result<RootCertStore, ClientError> {
    let mut roots = RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            for cert in read_certificates("--otlp-ca", path)? {
                roots.add(cert).map_err(|e| ClientError::File {
                    flag: "--otlp-ca",
                    path: path.clone(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
                return Err(ClientError::Tls(format!(
                    "no CA certificates found in the system store{}; install the system CA \
                     bundle or set --otlp-ca",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                )));
            }
        }
    }
    Ok(roots)
}

/// `--otlp-insecure-skip-verify`: accepts any server certificate (the
/// handshake signatures are still checked, so the connection is encrypted
/// to whoever holds that certificate's key). Warns on first use.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
    warned: AtomicBool,
}

impl AcceptAnyServerCert {
    fn new(provider: &CryptoProvider) -> AcceptAnyServerCert {
        AcceptAnyServerCert {
            algorithms: provider.signature_verification_algorithms,
            warned: AtomicBool::new(false),
        }
    }
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                server = %server_name.to_str(),
                "--otlp-insecure-skip-verify: accepting the server's certificate without \
                 verifying it; anyone on the path can read and change the exported profiles"
            );
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hearth-otlp-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn err(cfg: &OtlpClientConfig) -> String {
        OtlpClient::new(cfg).expect_err("should fail").to_string()
    }

    #[test]
    fn bad_endpoints_are_rejected_with_the_reason() {
        for (endpoint, want) in [
            ("collector:4317", "http://"),
            ("ftp://collector:4317", "http://"),
            ("http://", "not a URL"),
            ("http://collector:4317/v1/profiles", "no path"),
            ("http://collector:4317?x=1", "no path"),
            ("not a url", "not a URL"),
        ] {
            let msg = err(&OtlpClientConfig::new(endpoint));
            assert!(msg.contains("--otlp-endpoint"), "{endpoint}: {msg}");
            assert!(msg.contains(want), "{endpoint}: {msg}");
        }
        for endpoint in [
            "http://collector:4317",
            "http://collector:4317/",
            "http://127.0.0.1:4317",
            "http://[::1]:4317",
            "  http://collector  ",
        ] {
            OtlpClient::new(&OtlpClientConfig::new(endpoint)).unwrap();
        }
    }

    #[test]
    fn tls_options_need_https() {
        let mut cfg = OtlpClientConfig::new("http://collector:4317");
        cfg.insecure_skip_verify = true;
        let msg = err(&cfg);
        assert!(
            msg.contains("--otlp-insecure-skip-verify") && msg.contains("https"),
            "{msg}"
        );
        let mut cfg = OtlpClientConfig::new("http://collector:4317");
        cfg.ca_file = Some("/etc/ca.pem".into());
        assert!(err(&cfg).contains("--otlp-ca"));
    }

    #[test]
    fn client_cert_and_key_go_together() {
        let mut cfg = OtlpClientConfig::new("https://collector:4317");
        cfg.insecure_skip_verify = true;
        cfg.client_cert = Some("/x/cert.pem".into());
        let msg = err(&cfg);
        assert!(msg.contains("--otlp-client-key"), "{msg}");
        cfg.client_cert = None;
        cfg.client_key = Some("/x/key.pem".into());
        let msg = err(&cfg);
        assert!(msg.contains("--otlp-client-cert"), "{msg}");
    }

    #[test]
    fn unreadable_or_invalid_pem_files_are_named() {
        let dir = scratch("pem");
        let missing = dir.join("missing.pem");
        let mut cfg = OtlpClientConfig::new("https://collector:4317");
        cfg.ca_file = Some(missing.clone());
        let msg = err(&cfg);
        assert!(
            msg.contains("--otlp-ca") && msg.contains("missing.pem"),
            "{msg}"
        );

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        cfg.ca_file = Some(empty.clone());
        let msg = err(&cfg);
        assert!(
            msg.contains("empty.pem") && msg.contains("no PEM certificate"),
            "{msg}"
        );

        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        cfg.ca_file = Some(broken);
        let msg = err(&cfg);
        assert!(msg.contains("broken.pem"), "{msg}");

        // A syntactically fine PEM block that is not a certificate.
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        cfg.ca_file = Some(junk);
        let msg = err(&cfg);
        assert!(
            msg.contains("junk.pem") && msg.contains("CA certificate"),
            "{msg}"
        );

        // The key file is checked too.
        let mut cfg = OtlpClientConfig::new("https://collector:4317");
        cfg.insecure_skip_verify = true;
        cfg.client_cert = Some(missing.clone());
        cfg.client_key = Some(empty.clone());
        let msg = err(&cfg);
        assert!(
            msg.contains("--otlp-client-cert") && msg.contains("missing.pem"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn header_names_and_values_are_checked_without_echoing_values() {
        for (name, value, want) in [
            ("bad name", "x", "metadata name"),
            ("x-bin", "x", "metadata name"),
            ("grpc-timeout", "1S", "reserved"),
            ("content-type", "x", "reserved"),
            ("authorization", "Bearer s3cr\net", "printable ASCII"),
            ("authorization", "Bearer s3crét", "printable ASCII"),
        ] {
            let mut cfg = OtlpClientConfig::new("http://collector:4317");
            cfg.headers = vec![(name.to_string(), value.to_string())];
            let msg = OtlpClient::new(&cfg)
                .err()
                .unwrap_or_else(|| panic!("{name}={value:?} accepted"))
                .to_string();
            assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
            assert!(!msg.contains("s3cr"), "{msg}");
        }
        let mut cfg = OtlpClientConfig::new("http://collector:4317");
        cfg.headers = vec![
            ("Authorization".into(), "Bearer x".into()),
            ("x-tenant".into(), "a".into()),
            ("x-tenant".into(), "b".into()),
        ];
        let client = OtlpClient::new(&cfg).unwrap();
        assert_eq!(
            client
                .metadata
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap(),
            "Bearer x"
        );
        assert_eq!(client.metadata.get_all("x-tenant").iter().count(), 2);
        assert!(!format!("{client:?}").contains("Bearer"));
    }

    #[test]
    fn statuses_are_classified_per_the_otlp_spec() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Cancelled,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            let e = classify(&Status::new(code, "later"), "c:4317", None);
            assert!(
                matches!(&e, SendError::Retryable(m) if m.contains("later")),
                "{code:?}: {e:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::NotFound,
            Code::Unknown,
            Code::Internal,
            Code::FailedPrecondition,
        ] {
            let e = classify(&Status::new(code, "server says no"), "c:4317", Some("TLS"));
            assert_eq!(
                e,
                SendError::Permanent {
                    code: format!("{code:?}"),
                    message: "server says no".into()
                }
            );
        }
        // Unknown caused by a local (transport) error is retryable.
        let local = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        assert_eq!(local.code(), Code::Unknown);
        assert!(matches!(
            classify(&local, "c:4317", None),
            SendError::Retryable(_)
        ));
        // So is a broken connection, with the TLS error the connection
        // noted.
        let closed = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "connection closed",
        )));
        match classify(
            &closed,
            "c:4317",
            Some("the server refused the client certificate"),
        ) {
            SendError::Retryable(m) => assert!(m.contains("client certificate"), "{m}"),
            e => panic!("{e:?}"),
        }
        // TLS trouble in the source chain is spelled out.
        let tls = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        )));
        match classify(&tls, "c:4317", None) {
            SendError::Retryable(m) => {
                assert!(m.contains("certificate verification failed"), "{m}")
            }
            e => panic!("{e:?}"),
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_retryable_connection_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        for scheme in ["http", "https"] {
            let mut cfg = OtlpClientConfig::new(format!("{scheme}://{addr}"));
            cfg.timeout = Duration::from_secs(5);
            cfg.insecure_skip_verify = scheme == "https";
            let mut client = OtlpClient::new(&cfg).unwrap();
            let err = client
                .send(&ExportProfilesServiceRequest::default())
                .await
                .unwrap_err();
            match err {
                SendError::Retryable(m) => {
                    assert!(m.contains(&addr.to_string()), "{m}");
                    assert!(m.contains("Unavailable"), "{m}");
                }
                e => panic!("{e:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_times_out() {
        // Accepts the connection and then says nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut cfg = OtlpClientConfig::new(format!("http://{addr}"));
        cfg.timeout = Duration::from_millis(300);
        let mut client = OtlpClient::new(&cfg).unwrap();
        let err = client
            .send(&ExportProfilesServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(&err, SendError::Retryable(_)), "{err:?}");
        server.abort();
    }

    #[tokio::test]
    async fn a_tls_handshake_with_a_non_tls_server_fails_clearly() {
        // Answers the ClientHello with garbage.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let mut cfg = OtlpClientConfig::new(format!("https://{addr}"));
        cfg.insecure_skip_verify = true;
        cfg.timeout = Duration::from_secs(5);
        let mut client = OtlpClient::new(&cfg).unwrap();
        match client.send(&ExportProfilesServiceRequest::default()).await {
            Err(SendError::Retryable(m)) => assert!(m.contains("TLS handshake"), "{m}"),
            other => panic!("{other:?}"),
        }
        server.abort();
    }
}
