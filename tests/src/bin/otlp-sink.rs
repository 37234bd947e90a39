//! `otlp-sink ADDR`: an OTLP profiles receiver that accepts and discards
//! everything, for `cargo xtask bench daemon` (the agent's own metrics
//! count what it sent).

use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
    ProfilesService, ProfilesServiceServer,
};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

struct Discard;

#[tonic::async_trait]
impl ProfilesService for Discard {
    async fn export(
        &self,
        _request: Request<ExportProfilesServiceRequest>,
    ) -> Result<Response<ExportProfilesServiceResponse>, Status> {
        Ok(Response::new(ExportProfilesServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(addr) = std::env::args().nth(1).and_then(|a| a.parse().ok()) else {
        eprintln!("usage: otlp-sink HOST:PORT");
        std::process::exit(2);
    };
    let service = ProfilesServiceServer::new(Discard)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(service)
        .serve(addr)
        .await
    {
        eprintln!("otlp-sink: {e}");
        std::process::exit(1);
    }
}
