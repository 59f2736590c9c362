//! Where records go. Each sink receives batches of spooled [`Frame`]s in
//! spool order from its own driver task and acknowledges a batch by
//! returning `Ok`; an error makes the driver retry the same batch, so a
//! sink sees every record at least once and in order. Sinks own their wire
//! protocol (a NATS client, a file); nothing else in the crate talks to them.

pub mod file;
pub mod grpc;
pub mod nats;
pub mod stdout;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::spool::Frame;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("nats: {0}")]
    Nats(String),
    #[error("grpc collector: {0}")]
    Grpc(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// One `[[decision_log.sinks]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout {
        /// Unique sink name (names the spool cursor) [default: `stdout`].
        name: Option<String>,
    },
    /// JSON lines appended to a file, rotated by size.
    File {
        name: Option<String>,
        path: PathBuf,
        /// Rotate when the file reaches this size [default: 100 MiB].
        max_bytes: Option<u64>,
        /// Rotated files kept: `path.1` (newest) .. `path.N` [default: 5].
        max_files: Option<u32>,
    },
    /// NATS JetStream: records packed as JSON lines, several per message,
    /// each message acknowledged by the stream; `Nats-Msg-Id` names the
    /// records (see [`nats`]), so the stream's duplicate window drops
    /// redeliveries.
    Nats {
        name: Option<String>,
        /// [default: `nats://127.0.0.1:4222`]
        url: Option<String>,
        /// [default: `arbiter.decisions`]
        subject: Option<String>,
        /// [default: `ARBITER_DECISIONS`]
        stream: Option<String>,
        /// Create the stream (capturing `subject`) when missing [default: true].
        create_stream: Option<bool>,
        /// Time to wait for a batch's acknowledgements [default: 5000].
        ack_timeout_ms: Option<u64>,
        /// Records packed in one message, as JSON lines; 1 sends each
        /// record alone [default: 128].
        records_per_message: Option<usize>,
        /// Bytes in one message, at most the server's `max_payload`
        /// [default: 262144].
        max_message_bytes: Option<usize>,
    },
    /// An audit collector serving `arbiter.v1.DecisionLogCollector/Publish`:
    /// one client-streaming call per batch, acknowledged by the collector.
    Grpc {
        name: Option<String>,
        /// e.g. `http://collector:50070`
        url: String,
        /// Time to wait for a batch's acknowledgement [default: 5000].
        ack_timeout_ms: Option<u64>,
    },
}

impl SinkConfig {
    pub fn name(&self) -> String {
        match self {
            SinkConfig::Stdout { name } => name.clone().unwrap_or_else(|| "stdout".into()),
            SinkConfig::File { name, .. } => name.clone().unwrap_or_else(|| "file".into()),
            SinkConfig::Nats { name, .. } => name.clone().unwrap_or_else(|| "nats".into()),
            SinkConfig::Grpc { name, .. } => name.clone().unwrap_or_else(|| "grpc".into()),
        }
    }

    /// How long one batch may take before it counts as failed.
    pub fn timeout(&self) -> Duration {
        match self {
            SinkConfig::Nats { ack_timeout_ms, .. } | SinkConfig::Grpc { ack_timeout_ms, .. } => {
                Duration::from_millis(ack_timeout_ms.unwrap_or(5000))
            }
            _ => Duration::from_secs(10),
        }
    }

    /// Builds the sink. Never waits for a remote end: a sink that is down
    /// at start is a sink whose records wait in the spool.
    pub async fn build(&self) -> Result<Sink, SinkError> {
        Ok(match self {
            SinkConfig::Stdout { .. } => Sink::Stdout(stdout::StdoutSink::new()),
            SinkConfig::Grpc { url, .. } => Sink::Grpc(grpc::GrpcSink::new(url)?),
            SinkConfig::File {
                path,
                max_bytes,
                max_files,
                ..
            } => Sink::File(file::FileSink::new(
                path.clone(),
                max_bytes.unwrap_or(100 * 1024 * 1024),
                max_files.unwrap_or(5),
            )),
            SinkConfig::Nats {
                url,
                subject,
                stream,
                create_stream,
                records_per_message,
                max_message_bytes,
                ..
            } => Sink::Nats(Box::new(
                nats::NatsSink::connect(
                    url.as_deref().unwrap_or("nats://127.0.0.1:4222"),
                    subject.as_deref().unwrap_or("arbiter.decisions"),
                    stream.as_deref().unwrap_or("ARBITER_DECISIONS"),
                    create_stream.unwrap_or(true),
                    records_per_message.unwrap_or(128),
                    max_message_bytes.unwrap_or(256 * 1024),
                )
                .await?,
            )),
        })
    }
}

/// A running sink.
#[derive(Debug)]
pub enum Sink {
    Stdout(stdout::StdoutSink),
    File(file::FileSink),
    Nats(Box<nats::NatsSink>),
    Grpc(grpc::GrpcSink),
}

impl Sink {
    /// Delivers a batch; `Ok` means every record in it is acknowledged.
    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        match self {
            Sink::Stdout(sink) => sink.send(frames).await,
            Sink::File(sink) => sink.send(frames).await,
            Sink::Nats(sink) => sink.send(frames).await,
            Sink::Grpc(sink) => sink.send(frames).await,
        }
    }
}
