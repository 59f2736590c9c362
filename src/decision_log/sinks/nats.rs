//! Sink `nats`: NATS JetStream. Records are published to `subject` packed
//! as JSON lines, up to `records_per_message` records and
//! `max_message_bytes` per message (1 = one record per message). A batch is
//! published pipelined and counts as delivered once the stream has
//! acknowledged every message in it.
//!
//! Why pack: on a sidecar the stream's per-message work (store, duplicate
//! check, acknowledgement) is paid on the same cores as the decisions
//! (`benches/load/decision_log.sh` with `NATS_SINK_EXTRA='records_per_message
//! = 1'` compares, and prints nats-server's CPU ticks).
//!
//! `Nats-Msg-Id` is the decision id of a one-record message, and
//! `<first decision id>..<last decision id>` of a packed one. Spool order is
//! fixed, so a retried message carries the same id and the same records,
//! and the stream's duplicate window (2 minutes by default) drops it;
//! consumers see each record once unless an outage outlasts the window or a
//! restart cuts the batch elsewhere. `Arbiter-Records` holds the count.

use std::time::Duration;

use async_nats::jetstream;

use super::SinkError;
use crate::decision_log::spool::Frame;

pub struct NatsSink {
    client: async_nats::Client,
    context: jetstream::Context,
    subject: String,
    stream: String,
    create_stream: bool,
    stream_ready: bool,
    records_per_message: usize,
    max_message_bytes: usize,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("subject", &self.subject)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

fn nats_error(error: impl std::fmt::Display) -> SinkError {
    SinkError::Nats(error.to_string())
}

impl NatsSink {
    /// Connects in the background: returns at once even if the server is down.
    pub async fn connect(
        url: &str,
        subject: &str,
        stream: &str,
        create_stream: bool,
        records_per_message: usize,
        max_message_bytes: usize,
    ) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .name("arbiter-decision-log")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).clamp(100, 1000))
            })
            .connect(url)
            .await
            .map_err(nats_error)?;
        Ok(NatsSink {
            context: jetstream::new(client.clone()),
            client,
            subject: subject.to_owned(),
            stream: stream.to_owned(),
            create_stream,
            stream_ready: !create_stream,
            records_per_message: records_per_message.max(1),
            max_message_bytes,
        })
    }

    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        // While disconnected the client would buffer publishes and send
        // them on reconnect, behind the driver's back: fail fast instead,
        // the records wait in the spool.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(SinkError::Nats("not connected".into()));
        }
        if !self.stream_ready {
            self.context
                .get_or_create_stream(jetstream::stream::Config {
                    name: self.stream.clone(),
                    subjects: vec![self.subject.clone()],
                    ..Default::default()
                })
                .await
                .map_err(nats_error)?;
            self.stream_ready = true;
        }
        // The server refuses a message over its `max_payload`; leave room
        // for the headers.
        let limit = match self.client.server_info().max_payload {
            0 => usize::MAX,
            max_payload => max_payload.saturating_sub(4096).max(1024),
        };
        let max_bytes = self.max_message_bytes.min(limit).max(1);
        let mut acks = Vec::new();
        let mut rest = frames;
        while !rest.is_empty() {
            let (id, payload, count) = pack(rest, self.records_per_message, max_bytes, limit);
            let message = jetstream::message::PublishMessage::build()
                .message_id(id)
                .header("Arbiter-Records", count.to_string().as_str())
                .payload(payload);
            let ack = self
                .context
                .send_publish(self.subject.clone(), message)
                .await
                .map_err(|e| self.failed(e))?;
            acks.push(ack);
            rest = rest.get(count..).unwrap_or_default();
        }
        for ack in acks {
            ack.await.map_err(|e| self.failed(e))?;
        }
        Ok(())
    }

    fn failed(&mut self, error: impl std::fmt::Display) -> SinkError {
        // The stream may have been deleted with the server's store.
        self.stream_ready = !self.create_stream;
        nats_error(error)
    }
}

/// The next message's id and payload: the first `count` frames, at least
/// one, as JSON lines.
/// A single record larger than `max_bytes` goes alone; one larger than
/// `limit` (what the server accepts) goes [`shrink`]ed, so that one huge
/// record can never stall the sink.
fn pack(
    frames: &[Frame],
    records_per_message: usize,
    max_bytes: usize,
    limit: usize,
) -> (String, bytes::Bytes, usize) {
    let mut count = 0;
    let mut bytes = 0;
    for frame in frames.iter().take(records_per_message) {
        let size = frame.payload.len() + 1;
        if count > 0 && bytes + size > max_bytes {
            break;
        }
        count += 1;
        bytes += size;
    }
    let packed = frames.get(..count).unwrap_or_default();
    let (first, last) = match (packed.first(), packed.last()) {
        (Some(first), Some(last)) => (first.id(), last.id()),
        _ => ("", ""),
    };
    let (id, payload) = if count == 1 {
        let payload = packed
            .first()
            .map(|f| f.payload.clone())
            .unwrap_or_default();
        let payload = if payload.len() > limit {
            shrink(first, &payload, limit)
        } else {
            payload
        };
        (first.to_owned(), payload)
    } else {
        let mut payload = bytes::BytesMut::with_capacity(bytes);
        for frame in packed {
            payload.extend_from_slice(&frame.payload);
            payload.extend_from_slice(b"\n");
        }
        (format!("{first}..{last}"), payload.freeze())
    };
    (id, payload, count)
}

/// A record too large for the server, cut to what an audit trail needs: it
/// loses `context`, `headers` (and if still too large everything but its
/// identity and outcome) and says so with `"truncated": true` and
/// `"original_bytes"`.
fn shrink(decision_id: &str, payload: &[u8], limit: usize) -> bytes::Bytes {
    use serde_json::{Value, json};
    let mut record = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    tracing::warn!(
        decision_id,
        bytes = payload.len(),
        limit,
        "decision record larger than the NATS server accepts; sent truncated"
    );
    record.remove("context");
    record.remove("headers");
    record.insert("truncated".into(), Value::Bool(true));
    record.insert("original_bytes".into(), json!(payload.len()));
    let mut text = serde_json::to_vec(&record).unwrap_or_default();
    if text.len() > limit {
        let keep = [
            "decision_id",
            "timestamp",
            "transport",
            "decision",
            "policy_revision",
            "data_revision",
            "truncated",
            "original_bytes",
        ];
        record.retain(|key, _| keep.contains(&key.as_str()));
        record.insert("decision_id".into(), json!(decision_id));
        text = serde_json::to_vec(&record).unwrap_or_default();
    }
    bytes::Bytes::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize, size: usize) -> Vec<Frame> {
        (0..n)
            .map(|i| Frame {
                seq: i as u64,
                id: format!("d{i}").into(),
                payload: bytes::Bytes::from(vec![b'x'; size]),
            })
            .collect()
    }

    #[test]
    fn packs_up_to_the_record_and_byte_limits() {
        let batch = frames(10, 99);
        assert_eq!(pack(&batch, 4, 1 << 20, 1 << 20).2, 4);
        // 100 bytes a line: three fit in 350.
        let (id, payload, count) = pack(&batch, 100, 350, 1 << 20);
        assert_eq!((id.as_str(), count, payload.len()), ("d0..d2", 3, 300));
        // A record over the byte limit still goes, alone, whole.
        let (id, payload, count) = pack(&batch, 100, 10, 1 << 20);
        assert_eq!((id.as_str(), count, payload.len()), ("d0", 1, 99));
        assert_eq!(pack(&batch, 1, 1 << 20, 1 << 20).2, 1);
    }

    #[test]
    fn a_record_over_the_server_limit_is_sent_truncated_not_retried_forever() {
        let huge = serde_json::json!({
            "decision_id": "d0",
            "decision": "deny",
            "principal": {"type": "User", "id": "u"},
            "context": {"blob": "x".repeat(10_000)},
        });
        let text = serde_json::to_vec(&huge).unwrap();
        let shrunk: serde_json::Value = serde_json::from_slice(&shrink("d0", &text, 1000)).unwrap();
        assert_eq!(
            shrunk,
            serde_json::json!({
                "decision_id": "d0",
                "decision": "deny",
                "principal": {"type": "User", "id": "u"},
                "truncated": true,
                "original_bytes": text.len(),
            })
        );
        // Too large even without its context: identity and outcome remain.
        let shrunk: serde_json::Value = serde_json::from_slice(&shrink("d0", &text, 10)).unwrap();
        assert_eq!(shrunk["decision_id"], "d0");
        assert_eq!(shrunk["decision"], "deny");
        assert!(shrunk.get("principal").is_none());
        // Not JSON at all: still a record of the decision.
        let shrunk: serde_json::Value =
            serde_json::from_slice(&shrink("d0", b"garbage", 10)).unwrap();
        assert_eq!(shrunk["decision_id"], "d0");
        assert_eq!(shrunk["truncated"], true);
        // `pack` applies it to a lone record over the limit.
        let batch = vec![Frame {
            seq: 0,
            id: "d0".into(),
            payload: bytes::Bytes::from(text.clone()),
        }];
        let (id, payload, count) = pack(&batch, 128, 1000, 1000);
        assert_eq!((id.as_str(), count), ("d0", 1));
        assert!(payload.len() <= 1000, "{}", payload.len());
        let sent: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(sent["truncated"], true);
    }
}
