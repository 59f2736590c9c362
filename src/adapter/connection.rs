//! Accepted connections as the gRPC server sees them.
//!
//! [`Unvectored`] reports that a connection does not take vectored writes.
//! Why: h2 copies a DATA payload into its write buffer only below a
//! threshold (256 bytes when the connection takes vectored writes, 1,024
//! when it does not); a larger payload is written on its own, which ends
//! the batch: one write per response. An ext_authz `CheckResponse` with its
//! headers and dynamic metadata is ~280 bytes, so on a vectored connection
//! every answer cost its own `writev` (1.8 per request under load against
//! 0.8 for the 98-byte own-API answer, `strace -c`). Unvectored, answers
//! below 1,024 bytes share writes again; larger ones (big `BatchCheck`
//! answers) take two plain writes instead of one `writev`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A connection that does not advertise vectored writes; otherwise the
/// connection itself.
#[derive(Debug)]
pub struct Unvectored<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Unvectored<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unvectored<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<S: Connected> Connected for Unvectored<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn passes_bytes_both_ways_and_reports_no_vectored_writes() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = Unvectored(server);
        let mut client = Unvectored(client);
        assert!(!server.is_write_vectored());
        server.write_all(b"hello").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // A vectored write still writes (the first non-empty buffer).
        let written = client
            .write_vectored(&[io::IoSlice::new(b""), io::IoSlice::new(b"back")])
            .await
            .unwrap();
        assert_eq!(written, 4);
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"back");
    }
}
