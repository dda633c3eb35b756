//! `gateway run`: loads the gateway's identity and registry, listens, serves the control service
//! over mutual TLS 1.3, and keeps the session table tidy.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use super::GatewayError;
use super::live::{LiveRegistry, Wait};
use super::service::{ControlService, ControlState};
use super::sessions::{Clock, Expiry, SessionLimits, SessionTable};
use super::tls;
use crate::config::ConfigError;
use crate::config::gateway::GatewayConfig;
use crate::control::pb::control_server::ControlServer;

/// How often the housekeeping task looks for registry changes and expired sessions. Revocations
/// also apply at once on the next RPC; this bounds the delay when no RPC comes.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// Largest request accepted. Ours are a few dozen bytes; tonic's default (4 MiB) would let any
/// authenticated peer make the gateway buffer megabytes.
const MAX_REQUEST_BYTES: usize = 4096;

/// Server-side bound on one RPC. Both RPCs are in-memory lookups; this only cuts off a peer that
/// opens a stream and never finishes the request.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 keepalive: finds connections of vanished clients so their resources are freed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent RPCs per connection; a client needs one at a time.
const STREAMS_PER_CONNECTION: usize = 16;

/// How long a stop waits for open connections to finish their RPCs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP keepalive on control connections, for peers that vanish without a FIN.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A bound, ready-to-serve control plane.
pub struct ControlPlane {
    state: Arc<ControlState>,
    tls: Arc<ServerConfig>,
    tcp: TcpIncoming,
    local_addr: SocketAddr,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

fn read_pem(path: &Path, what: &'static str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::MissingKey {
        path: path.to_owned(),
        what,
        reason: e.to_string(),
    })
}

/// The control port's listener: `[::]` dual-stack (see [`crate::tunnel::dual_stack`]), address
/// reuse as std sets it, non-blocking, registered with the current runtime.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    crate::tunnel::dual_stack(&sock, addr)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(sock.into())
}

impl ControlPlane {
    /// Loads the credentials and the registry file and binds `config.listen`. Must run inside a
    /// tokio runtime (the listener registers with it). A gateway on a shared registry is bound
    /// with [`ControlPlane::bind_with`] (see `gateway run`).
    pub fn bind(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let registry = LiveRegistry::open(&config.registry, config.subnet, config.gateway_ip, config.v6)?;
        Self::bind_with(config, registry, super::dns::DnsPush::default())
    }

    /// [`ControlPlane::bind`] on a registry already opened (a file's or a shared one's),
    /// announcing the resolver `dns` to every client that authenticates (what `gateway run` does
    /// when its resolver is on).
    pub fn bind_with(
        config: &GatewayConfig,
        registry: LiveRegistry,
        dns: super::dns::DnsPush,
    ) -> Result<Self, GatewayError> {
        let ca = read_pem(&config.ca_cert, "authority certificate")?;
        let cert = read_pem(&config.cert, "server certificate")?;
        let key = read_pem(&config.key, "server key")?;
        let bad = |path: &Path, what, reason| ConfigError::BadKey { path: path.to_owned(), what, reason };
        crate::pki::check_certificate_pem(&ca).map_err(|r| bad(&config.ca_cert, "authority certificate", r))?;
        crate::pki::check_pair(&cert, &key).map_err(|r| bad(&config.cert, "server certificate", r))?;
        let tls = tls::server_config(&ca, &cert, &key).map_err(|r| bad(&config.cert, "TLS identity", r))?;

        let limits = SessionLimits::new(config.session_idle_timeout, config.session_max_lifetime, config.reauth_grace);
        let state = Arc::new(ControlState {
            registry,
            sessions: Arc::new(SessionTable::new(limits)),
            clock: Clock::new(),
            subnet: config.subnet,
            gateway_ip: config.gateway_ip,
            v6: super::dataplane::served_v6(config),
            data_port: config.endpoint.port(),
            dns,
            dns_counters: Default::default(),
            counters: Default::default(),
            partial_checksums: config.dataplane.offload,
        });

        let tcp = TcpIncoming::from(
            bind_tcp(config.listen).map_err(|source| GatewayError::Bind { addr: config.listen, source })?,
        )
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
        let local_addr = tcp.local_addr().map_err(|source| GatewayError::Bind { addr: config.listen, source })?;
        Ok(Self { state, tls, tcp, local_addr, handshake_timeout: config.handshake_timeout })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The session table, for the data plane: lock-free lookups by session id and by address.
    pub fn sessions(&self) -> Arc<SessionTable> {
        self.state.sessions.clone()
    }

    /// What the control service shares (sessions, registry, counters), for observers.
    pub fn state(&self) -> Arc<ControlState> {
        self.state.clone()
    }

    /// The counters the resolver counts into (shared with `gateway status` and the metrics).
    pub fn dns_counters(&self) -> Arc<super::dns::DnsCounters> {
        self.state.dns_counters.clone()
    }

    /// The running gateway's view of the registry.
    pub fn registry(&self) -> LiveRegistry {
        self.state.registry.clone()
    }

    /// The clock the session table's times are measured on.
    pub fn clock(&self) -> Clock {
        self.state.clock
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight RPCs finish, and
    /// returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), GatewayError> {
        let Self { state, tls, tcp, local_addr, handshake_timeout } = self;
        let registered = state.registry.view().len();
        tracing::info!(%local_addr, clients = registered, "control plane listening (mutual TLS 1.3)");
        let incoming = tls::authenticated_incoming(tcp, tls, handshake_timeout);
        let housekeeping = tokio::spawn(housekeeping(state.clone()));
        let service = ControlServer::new(ControlService::new(state)).max_decoding_message_size(MAX_REQUEST_BYTES);
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
        };
        let server = Server::builder()
            .timeout(RPC_TIMEOUT)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .concurrency_limit_per_connection(STREAMS_PER_CONNECTION)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, signal);
        // After the stop signal, tonic waits for every connection to close. A peer that never
        // finishes (an authenticated connection that never sent the HTTP/2 preface, say) would
        // hold the stop forever, so the drain has a deadline.
        let drain_deadline = async {
            if stopping.wait_for(|stop| *stop).await.is_ok() {
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            result = server => result,
            () = drain_deadline => {
                tracing::warn!("connections still open {DRAIN_TIMEOUT:?} after the stop request; stopping anyway");
                Ok(())
            }
        };
        housekeeping.abort();
        tracing::info!(%local_addr, "control plane stopped");
        result.map_err(GatewayError::Serve)
    }
}

/// Picks up registry changes when no RPC arrives, closes sessions the registry no longer admits,
/// and drops expired sessions (logging each).
async fn housekeeping(state: Arc<ControlState>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A view pushed by a shared registry's follower is enforced at once (a revocation ends
        // sessions within a second everywhere); a file is looked at every tick.
        tokio::select! {
            _ = tick.tick() => {}
            () = state.registry.changed() => {}
        }
        state.refresh_registry(Wait::Yes);
        state.enforce_registry(&state.registry.view());
        let now = state.clock.now();
        for s in state.sessions.prune(now) {
            // The replacement of a superseded session was logged when it opened.
            match state.sessions.validity(&s, now) {
                Err(Expiry::Superseded) => {
                    tracing::debug!(client = %s.client, session = %s.id, "superseded session ended (grace over)")
                }
                Err(why) => {
                    tracing::info!(client = %s.client, session = %s.id, key_fp = %s.key.fingerprint(), "session expired: {why}")
                }
                Ok(()) => {}
            }
        }
    }
}
