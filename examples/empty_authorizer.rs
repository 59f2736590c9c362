//! Bench helper for `benches/load/run.sh`: an EMPTY `arbiter.v1.Authorizer`
//! server. Same proto and generated service as `arbiter serve`, same tokio
//! runtime and tonic transport defaults, but `Check` answers a constant
//! ALLOW without evaluating anything. The load benchmark compares Arbiter's
//! throughput against this ceiling.
//!
//! Usage: `cargo run --release --example empty_authorizer -- 127.0.0.1:50061`

use std::net::SocketAddr;

use arbiter::proto::v1 as pb;
use arbiter::proto::v1::authorizer_server::{Authorizer, AuthorizerServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Answers every check with the same response, shaped like a real one
/// (one reason, a UUID-sized id, both revisions) so both servers send
/// about as many bytes.
#[derive(Debug, Clone)]
struct EmptyAuthorizer {
    response: pb::CheckResponse,
}

impl EmptyAuthorizer {
    fn new() -> Self {
        EmptyAuthorizer {
            response: pb::CheckResponse {
                decision: pb::Decision::Allow as i32,
                reasons: vec!["viewer-can-read".to_owned()],
                errors: Vec::new(),
                decision_id: "00000000-0000-7000-8000-000000000000".to_owned(),
                policy_revision: "0000000000000000".to_owned(),
                data_revision: "0000000000000000".to_owned(),
                data_stale: false,
                explanation: None,
            },
        }
    }
}

#[tonic::async_trait]
impl Authorizer for EmptyAuthorizer {
    async fn check(
        &self,
        _request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        Ok(Response::new(self.response.clone()))
    }

    async fn check_batch(
        &self,
        request: Request<pb::CheckBatchRequest>,
    ) -> Result<Response<pb::CheckBatchResponse>, Status> {
        let results = vec![self.response.clone(); request.get_ref().checks.len()];
        Ok(Response::new(pb::CheckBatchResponse { results }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:50061")
        .parse()?;
    // The same runtime `arbiter serve` builds: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        println!(
            "empty arbiter.v1.Authorizer listening on {}",
            listener.local_addr()?
        );
        tonic::transport::Server::builder()
            .add_service(AuthorizerServer::new(EmptyAuthorizer::new()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
