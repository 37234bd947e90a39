//! OpenTelemetry profiles (OTLP, `v1development`) export: [`encode`] turns a
//! window's [`crate::profile::Profile`] into export requests, [`client`]
//! sends them over gRPC (tonic, gzip, TLS via rustls).

pub mod client;
pub mod encode;
