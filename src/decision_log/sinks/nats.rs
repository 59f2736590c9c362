//! Sink `nats`: NATS JetStream. Every record is published to `subject` with
//! `Nats-Msg-Id` = decision id; a batch is published pipelined and counts as
//! delivered once the stream has acknowledged every message in it. A retried
//! batch is de-duplicated by the stream's duplicate window (2 minutes by
//! default), so consumers see each record once unless an outage outlasts it.

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
        let mut acks = Vec::with_capacity(frames.len());
        for frame in frames {
            let publish = jetstream::message::PublishMessage::build()
                .message_id(&frame.id)
                .payload(frame.payload.clone());
            let ack = self
                .context
                .send_publish(self.subject.clone(), publish)
                .await
                .map_err(|e| self.failed(e))?;
            acks.push(ack);
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
