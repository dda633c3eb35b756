//! The control port's TLS: TLS 1.3 only, mutual authentication against the gateway's authority,
//! ALPN `h2`, and each handshake in its own task with a deadline.
//!
//! Why not tonic's `ServerTlsConfig`: it cannot restrict the protocol version to TLS 1.3, has no
//! handshake deadline, and exposes the client certificate only as raw DER per request. Here a
//! handshake that stalls (a silent peer) or fails (garbage, a foreign certificate) costs one task
//! until `handshake_timeout`, never blocks other clients, and a successful one hands tonic a
//! stream whose [`PeerIdentity`] (the verified certificate's name and fingerprint) every request
//! carries in its extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::pki::{self, CertFingerprint};

/// ALPN protocol id of HTTP/2; tonic's client insists on it.
const ALPN_H2: &[u8] = b"h2";

/// Handshakes in progress at once. Beyond this, new connections are closed at once: a flood of
/// silent connections then costs bounded memory and file descriptors, and each slot frees itself
/// after `handshake_timeout`.
const MAX_PENDING_HANDSHAKES: usize = 512;

/// Established connections queued for tonic. Tonic drains this immediately; the bound only
/// matters if the server is shutting down.
const ACCEPT_QUEUE: usize = 64;

/// Rejected-handshake warnings are logged at most this often (the rest at debug, counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// After a failed `accept(2)` (e.g. out of file descriptors), pause before the next one instead
/// of spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The verified client behind a control connection: available to every request on it via
/// `request.extensions().get::<PeerIdentity>()`.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The common name of the verified client certificate: the client's registry name.
    pub name: Arc<str>,
    /// SHA-256 of the verified client certificate.
    pub cert: CertFingerprint,
    pub remote_addr: Option<SocketAddr>,
}

/// A control connection after a successful mutual-TLS handshake.
pub struct ControlStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl ControlStream {
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
}

impl Connected for ControlStream {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for ControlStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Builds the server's TLS config: TLS 1.3 only, ring provider, client certificates required and
/// verified against `ca_pem`, server identity `cert_pem` + `key_pem`, ALPN `h2`.
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in pki::certificates_from_pem(ca_pem)? {
        roots.add(ca).map_err(|e| format!("the authority's certificate is unusable: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("cannot build the client verifier: {e}"))?;
    let chain = pki::certificates_from_pem(cert_pem)?;
    let key = pki::private_key_from_pem(key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3 unavailable: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the server certificate and key do not form a usable identity: {e}"))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Turns accepted TCP connections into authenticated [`ControlStream`]s for
/// `Server::serve_with_incoming`.
///
/// A background task accepts connections and spawns one handshake task per connection; it stops
/// (closing the listener) when the returned stream is dropped, i.e. when the server stops.
pub fn authenticated_incoming(
    tcp: TcpIncoming,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<io::Result<ControlStream>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), handshake_timeout, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    mut tcp: TcpIncoming,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    tx: mpsc::Sender<io::Result<ControlStream>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let warn = Arc::new(Throttle::new(WARN_EVERY));
    loop {
        let next = tokio::select! {
            () = tx.closed() => return,
            next = tcp.next() => next,
        };
        let conn = match next {
            Some(Ok(conn)) => conn,
            Some(Err(e)) => {
                warn.log(format_args!("cannot accept a control connection: {e}"));
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
            None => return,
        };
        let remote = conn.peer_addr().ok();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn.log(format_args!(
                "dropping control connection from {}: {MAX_PENDING_HANDSHAKES} handshakes already in progress",
                show(remote)
            ));
            continue;
        };
        let (acceptor, tx, warn) = (acceptor.clone(), tx.clone(), warn.clone());
        tokio::spawn(async move {
            let result = handshake(&acceptor, conn, remote, handshake_timeout).await;
            drop(slot);
            match result {
                Ok(stream) => {
                    tracing::debug!(client = %stream.peer.name, remote = %show(remote), "control connection established");
                    // Fails only if the server is stopping; the connection is then just closed.
                    let _ = tx.send(Ok(stream)).await;
                }
                Err(e) => warn.log(format_args!("rejected control connection from {}: {e}", show(remote))),
            }
        });
    }
}

/// Why a control connection was refused before any request.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer did not complete the handshake in time.
    #[error("TLS handshake not completed within {0:?}")]
    TimedOut(Duration),
    /// TLS failed: not TLS at all, no or an untrusted client certificate, wrong version, ...
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The certificate verified but carries no usable name (the authority never issues such).
    #[error("the client certificate has no usable common name")]
    NoIdentity,
}

async fn handshake(
    acceptor: &TlsAcceptor,
    conn: TcpStream,
    remote: Option<SocketAddr>,
    deadline: Duration,
) -> Result<ControlStream, HandshakeError> {
    let tls = tokio::time::timeout(deadline, acceptor.accept(conn))
        .await
        .map_err(|_| HandshakeError::TimedOut(deadline))?
        .map_err(HandshakeError::Tls)?;
    let (_, session) = tls.get_ref();
    // The verifier requires a client certificate, so a finished handshake has one; the leaf
    // comes first.
    let leaf = session.peer_certificates().and_then(|c| c.first()).ok_or(HandshakeError::NoIdentity)?;
    let (name, cert) = pki::leaf_identity(leaf).ok_or(HandshakeError::NoIdentity)?;
    Ok(ControlStream { inner: tls, peer: PeerIdentity { name: name.into(), cert, remote_addr: remote } })
}

fn show(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string())
}

/// Logs a warning at most once per interval; the ones in between go to debug and are counted, so
/// a flood of bad connections cannot flood the log.
struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self { every, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let allowed = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let allowed = last.is_none_or(|t| now.duration_since(t) >= self.every);
            if allowed {
                *last = Some(now);
            }
            allowed
        };
        if allowed {
            let n = self.suppressed.swap(0, Ordering::Relaxed);
            if n > 0 {
                tracing::warn!("{msg} (and {n} similar since the last warning)");
            } else {
                tracing::warn!("{msg}");
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{msg}");
        }
    }
}
