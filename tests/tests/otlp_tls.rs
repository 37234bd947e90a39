//! The OTLP client and delivery queue against a real gRPC receiver, over
//! TLS with a throwaway CA (server certificate for 127.0.0.1/localhost,
//! client certificate for mutual TLS) and over plain HTTP/2. No BPF and no
//! hearth binary needed:
//!
//! ```text
//! cargo test -p hearth-integration-tests --test otlp_tls
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth::export::delivery::{DeliveryConfig, DeliveryQueue, SendError, Transport};
use hearth::export::otlp::client::{OtlpClient, OtlpClientConfig};
use hearth::metrics::Metrics;
use hearth_integration_tests::otlp_receiver::{Receiver, ServerTls};
use hearth_integration_tests::scratch_dir;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::profiles::v1development::ResourceProfiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use tonic::Code;

/// A CA and what it issued, as PEM.
struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut server =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "otlp receiver");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();

        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "hearth agent");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().unwrap();
        let client_cert = client.signed_by(&client_key, &issuer).unwrap();

        Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    fn server_tls(&self, require_client_cert: bool) -> ServerTls {
        ServerTls {
            cert_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
            client_ca_pem: require_client_cert.then(|| self.ca_pem.clone()),
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn request(id: u64) -> ExportProfilesServiceRequest {
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            schema_url: format!("req-{id}"),
            ..Default::default()
        }],
        dictionary: None,
    }
}

fn ids(requests: &[ExportProfilesServiceRequest]) -> Vec<String> {
    requests
        .iter()
        .map(|r| r.resource_profiles[0].schema_url.clone())
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config(endpoint: String) -> OtlpClientConfig {
    OtlpClientConfig {
        timeout: Duration::from_secs(5),
        ..OtlpClientConfig::new(endpoint)
    }
}

/// Sends one request directly through a fresh client.
fn send_once(cfg: &OtlpClientConfig) -> Result<(), SendError> {
    let mut client = OtlpClient::new(cfg).unwrap();
    runtime()
        .block_on(client.send(&request(0)))
        .map(|_accepted| ())
}

fn fast_queue(metrics: Arc<Metrics>) -> DeliveryQueue {
    DeliveryQueue::open(
        DeliveryConfig {
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..DeliveryConfig::default()
        },
        metrics,
    )
    .unwrap()
}

/// Waits (up to 30 s) until `done`.
fn wait_for(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the queue's sender with `client` until `done`, then stops it.
fn deliver_until(queue: &DeliveryQueue, client: OtlpClient, done: impl Fn() -> bool) {
    let rt = runtime();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sender = rt.spawn({
        let queue = queue.clone();
        async move { queue.run(client, stop_rx).await }
    });
    wait_for(done);
    stop_tx.send(true).unwrap();
    rt.block_on(sender).unwrap();
}

#[test]
fn tls_with_ca_file_delivers_in_order_with_headers() {
    let dir = scratch_dir("otlp-tls-ca");
    let pki = Pki::new("ca");
    let receiver = Receiver::start(None, Some(pki.server_tls(false)));
    let mut cfg = config(receiver.endpoint());
    cfg.ca_file = Some(write(&dir, "ca.pem", &pki.ca_pem));
    cfg.headers = vec![
        ("authorization".to_string(), "Bearer x".to_string()),
        ("x-scope".to_string(), "hearth".to_string()),
    ];
    let client = OtlpClient::new(&cfg).unwrap();

    let metrics = Arc::new(Metrics::default());
    let queue = fast_queue(metrics.clone());
    for id in 0..3 {
        queue.push(request(id));
    }
    deliver_until(&queue, client, || {
        metrics.requests_exported.load(Ordering::Relaxed) == 3
    });

    assert_eq!(ids(&receiver.requests()), ["req-0", "req-1", "req-2"]);
    for received in receiver.received() {
        assert_eq!(received.header("authorization"), Some("Bearer x"));
        assert_eq!(received.header("x-scope"), Some("hearth"));
        assert_eq!(received.header("grpc-encoding"), Some("gzip"));
        assert!(
            received
                .header("user-agent")
                .is_some_and(|ua| ua.starts_with("hearth/")),
            "{:?}",
            received.metadata
        );
    }
    assert_eq!(metrics.requests_exported.load(Ordering::Relaxed), 3);
    assert_eq!(queue.depth(), (0, 0));

    // The name in the certificate works as well as the address.
    let mut by_name = cfg.clone();
    by_name.endpoint = format!("https://localhost:{}", receiver.addr().port());
    by_name.gzip = false;
    send_once(&by_name).unwrap();
    assert_eq!(receiver.requests().len(), 4);
    assert_eq!(receiver.received()[3].header("grpc-encoding"), None);
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let dir = scratch_dir("otlp-mtls");
    let pki = Pki::new("mtls");
    let receiver = Receiver::start(None, Some(pki.server_tls(true)));
    let mut cfg = config(receiver.endpoint());
    cfg.ca_file = Some(write(&dir, "ca.pem", &pki.ca_pem));

    // Without a client certificate the server refuses the connection.
    match send_once(&cfg) {
        Err(SendError::Retryable(message)) => {
            assert!(message.contains("client certificate"), "{message}");
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    assert_eq!(receiver.attempts(), 0);

    cfg.client_cert = Some(write(&dir, "client.pem", &pki.client_cert_pem));
    cfg.client_key = Some(write(&dir, "client.key", &pki.client_key_pem));
    send_once(&cfg).unwrap();
    assert_eq!(ids(&receiver.requests()), ["req-0"]);

    // A key that does not belong to the certificate is caught up front.
    let other = Pki::new("other");
    cfg.client_key = Some(write(&dir, "other.key", &other.client_key_pem));
    let err = OtlpClient::new(&cfg).unwrap_err().to_string();
    assert!(err.contains("--otlp-client-key"), "{err}");
}

#[test]
fn an_unknown_ca_fails_with_a_certificate_error() {
    let dir = scratch_dir("otlp-wrong-ca");
    let pki = Pki::new("right");
    let wrong = Pki::new("wrong");
    let receiver = Receiver::start(None, Some(pki.server_tls(false)));
    let mut cfg = config(receiver.endpoint());
    cfg.ca_file = Some(write(&dir, "wrong-ca.pem", &wrong.ca_pem));
    match send_once(&cfg) {
        Err(SendError::Retryable(message)) => {
            assert!(message.contains("certificate"), "{message}");
            assert!(message.contains("--otlp-ca"), "{message}");
        }
        other => panic!("expected a retryable certificate failure, got {other:?}"),
    }
    assert_eq!(receiver.attempts(), 0);
}

#[test]
fn insecure_skip_verify_accepts_an_unknown_ca() {
    let pki = Pki::new("unknown");
    let receiver = Receiver::start(None, Some(pki.server_tls(false)));
    let mut cfg = config(receiver.endpoint());
    cfg.insecure_skip_verify = true;
    send_once(&cfg).unwrap();
    assert_eq!(ids(&receiver.requests()), ["req-0"]);
}

#[test]
fn outage_rejections_and_partial_success_over_plain_grpc() {
    let receiver = Receiver::start(None, None);
    let client = OtlpClient::new(&config(receiver.endpoint())).unwrap();
    let metrics = Arc::new(Metrics::default());
    let queue = fast_queue(metrics.clone());

    // Unavailable twice (retried), then InvalidArgument (dropped), then a
    // partial success (delivered, counted).
    receiver.fail_next(2, Code::Unavailable, "busy");
    receiver.fail_next(1, Code::InvalidArgument, "bad profile");
    receiver.partial_success_next(1, 3, "unknown attribute");
    for id in 0..3 {
        queue.push(request(id));
    }
    let rt = runtime();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sender = rt.spawn({
        let queue = queue.clone();
        async move { queue.run(client, stop_rx).await }
    });
    // The queue books a delivery when the answer arrives, just after the
    // receiver recorded the request.
    wait_for(|| metrics.requests_exported.load(Ordering::Relaxed) == 2);
    assert_eq!(ids(&receiver.requests()), ["req-1", "req-2"]);
    assert_eq!(receiver.attempts(), 5);
    assert_eq!(metrics.requests_retried.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.requests_failed.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.profiles_rejected.load(Ordering::Relaxed), 3);

    // The receiver goes away; what is pushed meanwhile arrives in order
    // once it is back.
    receiver.stop();
    for id in 3..6 {
        queue.push(request(id));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(metrics.requests_retried.load(Ordering::Relaxed) > 2);
    receiver.restart();
    wait_for(|| metrics.requests_exported.load(Ordering::Relaxed) == 5);
    stop_tx.send(true).unwrap();
    rt.block_on(sender).unwrap();
    assert_eq!(
        ids(&receiver.requests()),
        ["req-1", "req-2", "req-3", "req-4", "req-5"]
    );
    assert_eq!(metrics.requests_exported.load(Ordering::Relaxed), 5);
    assert_eq!(queue.depth(), (0, 0));
}
