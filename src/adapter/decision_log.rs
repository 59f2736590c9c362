//! `arbiter.v1.DecisionLog`: `Tail`, live decision records (redacted, as
//! spooled) with filters, for debugging. Filtering parses each record's
//! JSON on the streaming task, only while someone is tailing.

use std::pin::Pin;

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};

use crate::decision_log::TailSource;
use crate::proto::v1 as pb;
use crate::proto::v1::decision_log_server::DecisionLog;

#[derive(Debug, Clone)]
pub struct DecisionLogService {
    source: TailSource,
    stop: watch::Receiver<bool>,
}

impl DecisionLogService {
    /// Streams end when `stop` turns true, so open tails never hold the
    /// drain open.
    pub fn new(source: TailSource, stop: watch::Receiver<bool>) -> Self {
        DecisionLogService { source, stop }
    }
}

/// The filters of one `Tail` call.
#[derive(Debug, Clone, Default)]
struct Filter {
    principal: String,
    action: String,
    resource: String,
    decision: Option<&'static str>,
    transport: String,
}

fn uid_matches(filter: &str, uid: &serde_json::Value) -> bool {
    if filter.is_empty() {
        return true;
    }
    let (Some(type_name), Some(id)) = (uid["type"].as_str(), uid["id"].as_str()) else {
        return false;
    };
    filter == id || filter == format!("{type_name}::\"{id}\"")
}

impl Filter {
    fn matches(&self, record: &serde_json::Value) -> bool {
        uid_matches(&self.principal, &record["principal"])
            && uid_matches(&self.action, &record["action"])
            && uid_matches(&self.resource, &record["resource"])
            && self
                .decision
                .is_none_or(|d| record["decision"].as_str() == Some(d))
            && (self.transport.is_empty()
                || record["transport"].as_str() == Some(self.transport.as_str()))
    }
}

type TailStream = Pin<Box<dyn Stream<Item = Result<pb::TailRecord, Status>> + Send>>;

#[tonic::async_trait]
impl DecisionLog for DecisionLogService {
    type TailStream = TailStream;

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let request = request.into_inner();
        let filter = Filter {
            decision: match request.decision() {
                pb::Decision::Unspecified => None,
                pb::Decision::Allow => Some("allow"),
                pb::Decision::Deny => Some("deny"),
            },
            principal: request.principal,
            action: request.action,
            resource: request.resource,
            transport: request.transport,
        };
        let Some(receiver) = self.source.subscribe() else {
            return Err(Status::failed_precondition(
                "decision logging is off (`[decision_log] enabled = false`)",
            ));
        };
        let mut skipped = 0u64;
        let stream = BroadcastStream::new(receiver).filter_map(move |item| match item {
            Ok(payload) => {
                let record: serde_json::Value = serde_json::from_slice(&payload).ok()?;
                if !filter.matches(&record) {
                    return None;
                }
                let out = pb::TailRecord {
                    record_json: String::from_utf8_lossy(&payload).into_owned(),
                    skipped,
                };
                skipped = 0;
                Some(Ok(out))
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                skipped += n;
                None
            }
        });
        let mut stop = self.stop.clone();
        let stopped = async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        };
        let stream = futures_util::StreamExt::take_until(stream, stopped);
        Ok(Response::new(Box::pin(stream)))
    }
}
