//! The gRPC service `envoy.service.auth.v3.Authorization`, served with a
//! codec that hands the handler the request message's bytes (read in place
//! by [`super::wire`]) and sends the answer's bytes (written by
//! [`super::answer`]).
//!
//! It replaces `envoy_types`' generated `AuthorizationServer` only to change
//! the messages' coding (see `wire` and `answer` for why); the route, the
//! status for other methods (`UNIMPLEMENTED`) and tonic's limits (4 MiB
//! messages) are the generated server's.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::{Request, Response, Status};

use super::answer::Answer;
use super::wire::CheckView;
use super::{ExtAuthzService, SERVICE_NAME};
use crate::decision_log::Caller;

/// The one method of the service.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// `envoy.service.auth.v3.Authorization`, for tonic's router.
#[derive(Debug, Clone)]
pub struct AuthorizationServer {
    service: Arc<ExtAuthzService>,
    /// `max_message_bytes`; `None` is tonic's default.
    max_decoding_message_size: Option<usize>,
}

impl AuthorizationServer {
    pub fn new(service: ExtAuthzService) -> Self {
        AuthorizationServer {
            service: Arc::new(service),
            max_decoding_message_size: None,
        }
    }

    /// Requests larger than `limit` bytes are refused (`OUT_OF_RANGE`).
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl tonic::server::NamedService for AuthorizationServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for AuthorizationServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            let status = Status::unimplemented(format!(
                "{} has no method {}",
                SERVICE_NAME,
                request.uri().path()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let method = CheckMethod(self.service.clone());
        let max_decoding_message_size = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(CheckCodec)
                .apply_max_message_size_config(max_decoding_message_size, None);
            Ok(grpc.unary(method, request).await)
        })
    }
}

struct CheckMethod(Arc<ExtAuthzService>);

impl tonic::server::UnaryService<Bytes> for CheckMethod {
    type Response = Answer;
    type Future = BoxFuture<Response<Answer>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            // Not a well-formed `CheckRequest`: the one case answered with a
            // gRPC error (Envoy then applies `failure_mode_allow: false`).
            let view = CheckView::parse(request.get_ref()).map_err(|error| {
                Status::invalid_argument(format!("malformed CheckRequest: {error}"))
            })?;
            let transport = if service.log.is_enabled() {
                crate::adapter::caller::of(request.extensions())
            } else {
                Caller::default()
            };
            Ok(Response::new(service.answer(&view, &transport).await))
        })
    }
}

/// Requests and answers as their bytes.
#[derive(Debug, Clone, Copy)]
struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = Answer;
    type Decode = Bytes;
    type Encoder = CheckCodec;
    type Decoder = CheckCodec;

    fn encoder(&mut self) -> Self::Encoder {
        CheckCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckCodec
    }
}

impl Encoder for CheckCodec {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, item: Answer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.bytes());
        Ok(())
    }
}

impl Decoder for CheckCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // The frame's bytes, split off tonic's buffer without a copy.
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
