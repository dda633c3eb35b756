//! The control service: `Authenticate` and `PingSession`.
//!
//! The caller's identity is the [`PeerIdentity`] of its connection (the verified client
//! certificate), never a request field. The registry decides whether that identity is admitted;
//! the session table holds what Authenticate handed out.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rand::RngCore;
use tonic::{Request, Response, Status};

use super::live::{LiveRegistry, Refusal, RegistryView, Wait};
use super::metrics::{AuthResult, ControlCounters};
use super::sessions::{Clock, Expiry, NewSession, PingVerdict, Session, SessionTable};
use super::tls::PeerIdentity;
use crate::config::gateway::Tunnel6;
use crate::control::pb::control_server::Control;
use crate::control::pb::{
    AuthenticateRequest, AuthenticateResponse, PingSessionRequest, PingSessionResponse, PingStatus, ProbeRequest,
    ProbeResponse,
};
use crate::snapshot::SessionKey;

/// The longest `client_version` accepted (it only goes into a log line).
pub const MAX_CLIENT_VERSION: usize = 64;

/// Everything the control service shares with the housekeeping task (and later the data plane).
#[derive(Debug)]
pub struct ControlState {
    pub registry: LiveRegistry,
    pub sessions: Arc<SessionTable>,
    pub clock: Clock,
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    /// The IPv6 side of the tunnel, if the gateway has one.
    pub v6: Option<Tunnel6>,
    /// The UDP data port announced to clients (the endpoint's port).
    pub data_port: u16,
    /// The resolver announced to clients (empty when the gateway runs none).
    pub dns: super::dns::DnsPush,
    /// The resolver's counters (status, metrics); they stay at zero when it runs none.
    pub dns_counters: Arc<super::dns::DnsCounters>,
    /// Results of Authenticate and PingSession, registry reloads (`gateway status`, metrics).
    pub counters: ControlCounters,
    /// Told to every client in Authenticate: the gateway's TUN device takes packets whose TCP
    /// checksum is partial (it has offload on), so clients may send them.
    pub partial_checksums: bool,
}

impl ControlState {
    /// Reloads the registry if it changed, and closes the sessions of every client the new
    /// version no longer admits (revoked, removed, or given a new certificate).
    pub fn refresh_registry(&self, wait: Wait) {
        if let Some(view) = self.registry.refresh(wait) {
            self.enforce_registry(&view);
        }
    }

    /// Closes the sessions of clients `view` does not admit. Besides following a reload, the
    /// housekeeping task runs it every tick: an Authenticate that checked the previous version
    /// just before a revocation landed may insert a session after the reload's sweep.
    pub fn enforce_registry(&self, view: &RegistryView) {
        for s in self.sessions.retain(|s| view.admit(&s.client, &s.cert).is_ok()) {
            let why = view.admit(&s.client, &s.cert).err().map_or("", refusal_word);
            tracing::info!(client = %s.client, session = %s.id, key_fp = %s.key.fingerprint(), "session closed: client {why}");
        }
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct ControlService {
    state: Arc<ControlState>,
}

impl ControlService {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

fn peer<T>(req: &Request<T>) -> Result<&PeerIdentity, Status> {
    // Every connection reaching the service went through the mutual-TLS handshake, which attaches
    // the identity; its absence would be a wiring bug, answered as "not authenticated".
    req.extensions()
        .get::<PeerIdentity>()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate on this connection"))
}

fn refusal_word(r: Refusal) -> &'static str {
    match r {
        Refusal::NotRegistered => "not registered",
        Refusal::Revoked => "revoked",
        Refusal::CertificateReplaced => "certificate replaced",
    }
}

fn refusal_status(name: &str, r: Refusal) -> Status {
    Status::unauthenticated(match r {
        Refusal::NotRegistered => format!("client '{name}' is not registered with this gateway"),
        Refusal::Revoked => format!("client '{name}' is revoked"),
        Refusal::CertificateReplaced => {
            format!("the certificate of client '{name}' was replaced; use the new client file")
        }
    })
}

fn ip_bytes(ip: &std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn fresh_key() -> SessionKey {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    SessionKey::new(bytes)
}

impl ControlService {
    fn ping_verdict(&self, who: &PeerIdentity, view: &RegistryView, req: &PingSessionRequest) -> PingVerdict {
        if req.client_id.as_str() != &*who.name {
            return PingVerdict::Expired(Expiry::OtherClient);
        }
        if view.admit(&who.name, &who.cert).is_err() {
            return PingVerdict::Expired(Expiry::Revoked);
        }
        self.state.sessions.check(&who.name, &who.cert, req.session_id, self.state.clock.now())
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let who = peer(&request)?;
        let version = &request.get_ref().client_version;
        if version.len() > MAX_CLIENT_VERSION {
            self.state.counters.auth(AuthResult::InvalidRequest);
            return Err(Status::invalid_argument(format!(
                "client_version is {} bytes long; at most {MAX_CLIENT_VERSION} are accepted",
                version.len()
            )));
        }
        tracing::debug!(client = %who.name, version = %version.escape_debug(), "Authenticate");
        let state = &self.state;
        state.refresh_registry(Wait::Yes);
        let view = state.registry.view();
        let record = view.admit(&who.name, &who.cert).map_err(|r| {
            state.counters.auth(match r {
                Refusal::NotRegistered => AuthResult::NotRegistered,
                Refusal::Revoked => AuthResult::Revoked,
                Refusal::CertificateReplaced => AuthResult::CertificateReplaced,
            });
            tracing::info!(client = %who.name, remote = ?who.remote_addr, "authentication refused: {}", refusal_word(r));
            refusal_status(&who.name, r)
        })?;
        let new = NewSession {
            client: who.name.clone(),
            cert: who.cert,
            assigned_ip: record.ip,
            // Only with a plan to route it by: a registry entry's ip6 is checked against it.
            assigned_ip6: state.v6.and(record.ip6),
            key: fresh_key(),
            partial_checksums: request.get_ref().accepts_partial_checksums,
        };
        let mut rng = rand::rng();
        let opened = state.sessions.open(new, state.clock.now(), || rng.next_u64());
        let s: &Session = &opened.session;
        state.counters.auth(AuthResult::Ok);
        // With a shared registry, the other gateways end this client's session there (one
        // live session per client across gateways).
        state.registry.session_opened(&s.client, s.id);
        match &opened.replaced {
            Some(old) => tracing::info!(
                client = %s.client, ip = %s.assigned_ip, ip6 = ?s.assigned_ip6, session = %s.id, key_fp = %s.key.fingerprint(),
                replaced = %old.id, "session opened (previous one in its grace period)"
            ),
            None => tracing::info!(
                client = %s.client, ip = %s.assigned_ip, ip6 = ?s.assigned_ip6, session = %s.id, key_fp = %s.key.fingerprint(),
                "session opened"
            ),
        }
        let (assigned_ip6, gateway_ip6, prefix_len6) = match (s.assigned_ip6, state.v6) {
            (Some(ip6), Some(v6)) => {
                (ip6.octets().to_vec(), v6.gateway_ip.octets().to_vec(), u32::from(v6.subnet.prefix_len()))
            }
            _ => (Vec::new(), Vec::new(), 0),
        };
        Ok(Response::new(AuthenticateResponse {
            assigned_ip6,
            gateway_ip6,
            prefix_len6,
            assigned_ip: s.assigned_ip.octets().to_vec(),
            gateway_ip: state.gateway_ip.octets().to_vec(),
            prefix_len: u32::from(state.subnet.prefix_len()),
            session_id: s.id.0,
            session_key: s.key.expose().to_vec(),
            data_port: u32::from(state.data_port),
            session_idle_timeout_ms: state.sessions.limits().idle_ms,
            dns_servers: state.dns.servers.iter().map(ip_bytes).collect(),
            search_domains: state.dns.search_domains.clone(),
            endpoints: view.endpoints().to_vec(),
            accepts_partial_checksums: state.partial_checksums,
        }))
    }

    async fn ping_session(
        &self,
        request: Request<PingSessionRequest>,
    ) -> Result<Response<PingSessionResponse>, Status> {
        let who = peer(&request)?;
        // Never waits for a reload in progress; the next ping sees its result.
        self.state.refresh_registry(Wait::No);
        let view = self.state.registry.view();
        let verdict = self.ping_verdict(who, &view, request.get_ref());
        self.state.counters.ping(verdict);
        tracing::debug!(client = %who.name, session = %crate::snapshot::SessionId(request.get_ref().session_id), "PingSession: {verdict}");
        let status = match verdict {
            PingVerdict::Ok => PingStatus::Ok,
            PingVerdict::Expired(_) => PingStatus::SessionExpired,
        };
        Ok(Response::new(PingSessionResponse { status: status as i32 }))
    }

    async fn probe(&self, request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // Only an authenticated peer gets an answer, like every other call.
        peer(&request)?;
        Ok(Response::new(ProbeResponse {}))
    }
}
