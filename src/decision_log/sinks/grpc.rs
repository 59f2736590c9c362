//! Sink `grpc`: `arbiter.v1.DecisionLogCollector/Publish` on an audit
//! collector. One client-streaming call per batch; the batch is delivered
//! when the collector's acknowledgement counts every record of it.

use tonic::transport::{Channel, Endpoint};

use super::SinkError;
use crate::decision_log::spool::Frame;
use crate::proto::v1 as pb;
use crate::proto::v1::decision_log_collector_client::DecisionLogCollectorClient;

#[derive(Debug)]
pub struct GrpcSink {
    client: DecisionLogCollectorClient<Channel>,
}

impl GrpcSink {
    /// Connects lazily: a collector that is down at start is retried.
    pub fn new(url: &str) -> Result<Self, SinkError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| SinkError::Grpc(format!("`{url}` is not a URL: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(2));
        Ok(GrpcSink {
            client: DecisionLogCollectorClient::new(endpoint.connect_lazy()),
        })
    }

    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        let records: Vec<pb::PublishRecord> = frames
            .iter()
            .map(|frame| pb::PublishRecord {
                decision_id: frame.id().to_owned(),
                record_json: String::from_utf8_lossy(&frame.payload).into_owned(),
                sequence: frame.seq,
            })
            .collect();
        let sent = records.len() as u64;
        let ack = self
            .client
            .publish(tokio_stream::iter(records))
            .await
            .map_err(|status| {
                SinkError::Grpc(format!("{:?}: {}", status.code(), status.message()))
            })?
            .into_inner();
        if ack.accepted == sent {
            Ok(())
        } else {
            Err(SinkError::Grpc(format!(
                "the collector accepted {} of {sent} records",
                ack.accepted
            )))
        }
    }
}
