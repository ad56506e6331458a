//! Accepted connections of the gRPC ports, as tonic serves them: plain TCP, or TLS through the port's
//! `TlsEndpoint`, with the peer's addresses and verified client certificate as tonic connect info.
//!
//! A `Connection` tells h2 it cannot write vectored. That is deliberate: h2 copies a DATA frame's
//! payload into its write buffer only below 256 bytes when the socket takes vectored writes, and chains
//! larger payloads, flushing before it buffers the next frame; without vectored writes it copies
//! payloads up to 1 KiB. An allowed `CheckResponse` is ~0.8 KB (SPEC §2.2 requires its headers,
//! removals and metadata), so with vectored writes every response to concurrent calls on one connection
//! costs its own `writev(2)`; without, they leave together. Measured on plaintext: about 9 µs of server
//! CPU per hot Check (benches/README.md). Under TLS it matters as much: each write becomes at least one
//! TLS record and one system call.
//!
//! TLS handshakes never run on the accept loop: each has its own task, bounded in time and in number,
//! and a failed one is logged and counted, and costs nothing but its own connection.

use crate::tls::TlsEndpoint;
use rustls::pki_types::CertificateDer;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpIncoming};

/// A gRPC port's connection: TCP (Nagle off) or TLS over it; writes not vectored (module comment).
#[derive(Debug)]
pub struct Connection {
    io: Io,
    info: PeerInfo,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Who is on the other end, as handlers see it in the request's extensions
/// (`request.extensions().get::<PeerInfo>()`).
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client's certificate chain, set only when the client presented one and it verified
    /// against the port's client CA (mutual TLS).
    pub client_certificate: Option<Arc<ClientCertificate>>,
}

/// A verified client certificate chain.
#[derive(Debug)]
pub struct ClientCertificate {
    end_entity: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
}

impl ClientCertificate {
    /// The client's own certificate.
    pub fn end_entity(&self) -> &CertificateDer<'static> {
        &self.end_entity
    }

    /// The rest of the chain the client sent, as it sent it.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The start of the leaf's SHA-256, to name the client in logs.
    pub fn fingerprint(&self) -> String {
        crate::tls::fingerprint(self.end_entity().as_ref())
    }
}

impl Connection {
    fn plain(tcp: TcpStream) -> Self {
        let info = PeerInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
            tls: false,
            client_certificate: None,
        };
        Connection {
            io: Io::Plain(tcp),
            info,
        }
    }

    fn tls(tls: TlsStream<TcpStream>) -> Self {
        let (tcp, session) = tls.get_ref();
        let client_certificate = session
            .peer_certificates()
            .and_then(<[CertificateDer<'_>]>::split_first)
            .map(|(end_entity, intermediates)| {
                Arc::new(ClientCertificate {
                    end_entity: end_entity.clone().into_owned(),
                    intermediates: intermediates
                        .iter()
                        .map(|c| c.clone().into_owned())
                        .collect(),
                })
            });
        let info = PeerInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
            tls: true,
            client_certificate,
        };
        Connection {
            io: Io::Tls(Box::new(tls)),
            info,
        }
    }

    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// Forwards everything but `poll_write_vectored`, so `is_write_vectored` keeps its default, `false`.
impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A port's stream of ready connections, plain or TLS.
pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send + 'static>>;

/// Accepted connections with Nagle's algorithm off: a decision is one small response, and with Nagle
/// on it waits for the peer's delayed ACK (about 40 ms per call). tonic's own `tcp_nodelay` setting
/// does not apply to listeners handed to `serve_with_incoming*`, so it is set here.
pub fn plain(listener: TcpListener) -> Incoming {
    Box::pin(
        TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|accepted| accepted.map(Connection::plain)),
    )
}

/// At most this many handshakes at once per port; a connection beyond it is closed at once, so that
/// slow or idle clients cannot pile up tasks and memory.
const MAX_HANDSHAKES: usize = 1024;
/// Handshaken connections waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Connections of a TLS port: the accept loop hands each TCP connection to a handshake task of its own
/// (bounded by `handshake_timeout`) with the endpoint's configuration of that moment, and the stream
/// yields those that complete. The loop ends when the stream is dropped (the server shut down).
pub fn tls(
    listener: TcpListener,
    endpoint: Arc<TlsEndpoint>,
    handshake_timeout: Duration,
) -> Incoming {
    let (ready, connections) = tokio::sync::mpsc::channel(READY_QUEUE);
    tokio::spawn(accept_loop(listener, endpoint, handshake_timeout, ready));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(connections))
}

async fn accept_loop(
    listener: TcpListener,
    endpoint: Arc<TlsEndpoint>,
    handshake_timeout: Duration,
    ready: tokio::sync::mpsc::Sender<io::Result<Connection>>,
) {
    let port = endpoint.port();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning on the error.
                tracing::warn!(port, error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(port, %peer, "too many TLS handshakes in progress: connection closed");
            endpoint.metrics().tls_handshake(port, "busy");
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(endpoint.current());
        let (endpoint, ready) = (endpoint.clone(), ready.clone());
        tokio::spawn(async move {
            // The fallible form hands the connection back on failure, and the timed-out handshake is
            // kept until its outcome is counted and logged: a client sees its connection closed only
            // after the metrics and the log say why.
            let mut handshake = acceptor.accept(tcp).into_fallible();
            let outcome = tokio::time::timeout(handshake_timeout, &mut handshake).await;
            drop(permit);
            match outcome {
                Ok(Ok(tls)) => {
                    endpoint.metrics().tls_handshake(port, "ok");
                    let _ = ready.send(Ok(Connection::tls(tls))).await;
                }
                Ok(Err((e, tcp))) => {
                    endpoint.metrics().tls_handshake(port, "failed");
                    // A connection closed before any TLS (a TCP probe, a port scan) is not news.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        tracing::debug!(port, %peer, error = %e, "TLS handshake: closed by the peer");
                    } else {
                        tracing::warn!(port, %peer, error = %e, "TLS handshake failed");
                    }
                    drop(tcp);
                }
                Err(_) => {
                    endpoint.metrics().tls_handshake(port, "timeout");
                    tracing::warn!(
                        port,
                        %peer,
                        timeout_ms = handshake_timeout.as_millis(),
                        "TLS handshake timed out"
                    );
                    drop(handshake);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_does_not_claim_vectored_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
        assert!(
            server.is_write_vectored(),
            "tokio's TcpStream writes vectored"
        );
        let wrapped = Connection::plain(server);
        assert!(!wrapped.is_write_vectored());
        let info = wrapped.connect_info();
        assert_eq!(info.remote_addr, Some(client.local_addr().unwrap()));
        assert_eq!(info.local_addr, Some(addr));
        assert!(!info.tls && info.client_certificate.is_none());
    }
}
