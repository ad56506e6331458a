//! Accepted connections of the gRPC ports, as tonic serves them.
//!
//! `DecisionStream` is a TCP stream that tells h2 it cannot write vectored. That is deliberate: h2
//! copies a DATA frame's payload into its write buffer only below 256 bytes when the socket takes
//! vectored writes, and chains larger payloads, flushing before it buffers the next frame; without
//! vectored writes it copies payloads up to 1 KiB. An allowed `CheckResponse` is ~0.8 KB (SPEC §2.2
//! requires its headers, removals and metadata), so with vectored writes every response to concurrent
//! calls on one connection costs its own `writev(2)`; without, they leave together. Measured: about
//! 9 µs of server CPU per hot Check (benches/README.md).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// A decision-port connection: TCP, Nagle off, writes not vectored (see the module comment).
#[derive(Debug)]
pub struct DecisionStream(TcpStream);

impl Connected for DecisionStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.connect_info()
    }
}

impl AsyncRead for DecisionStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Forwards everything but `poll_write_vectored`, so `is_write_vectored` keeps its default, `false`.
impl AsyncWrite for DecisionStream {
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
}

/// Accepted connections with Nagle's algorithm off: a decision is one small response, and with Nagle
/// on it waits for the peer's delayed ACK (about 40 ms per call). tonic's own `tcp_nodelay` setting
/// does not apply to listeners handed to `serve_with_incoming*`, so it is set here.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The decision port's connections: `incoming`, each wrapped in `DecisionStream`.
pub fn decision_incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<DecisionStream>> + Send + 'static {
    incoming(listener).map(|accepted| accepted.map(DecisionStream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_decision_stream_does_not_claim_vectored_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, (server, _)) = (client.unwrap(), accepted.unwrap());
        assert!(
            server.is_write_vectored(),
            "tokio's TcpStream writes vectored"
        );
        let wrapped = DecisionStream(server);
        assert!(!wrapped.is_write_vectored());
        assert_eq!(
            wrapped.connect_info().remote_addr(),
            Some(_client.local_addr().unwrap())
        );
    }
}
