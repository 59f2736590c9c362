//! Sink `stdout`: one JSON object per line on standard output.

use tokio::io::AsyncWriteExt;

use super::SinkError;
use crate::decision_log::spool::Frame;

#[derive(Debug)]
pub struct StdoutSink {
    out: tokio::io::Stdout,
    buf: Vec<u8>,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            out: tokio::io::stdout(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        self.buf.clear();
        for frame in frames {
            self.buf.extend_from_slice(&frame.payload);
            self.buf.push(b'\n');
        }
        self.out.write_all(&self.buf).await?;
        self.out.flush().await?;
        Ok(())
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}
