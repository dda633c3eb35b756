//! The control plane's request handling: the gateway's `Authenticate` and `PingSession` handlers,
//! called directly (no TLS, no HTTP/2) with arbitrary field values and an arbitrary, registered,
//! revoked or missing peer identity, and the protobuf decoding of both request messages.
//!
//! The TLS layer is what attaches a [`PeerIdentity`] to a request; here the harness attaches one
//! itself, which is exactly what a verified client certificate amounts to. Besides "never panics",
//! each answer is checked against a small model of the documented rules:
//! - no identity, or one the registry does not admit (unknown name, revoked, other certificate):
//!   `UNAUTHENTICATED`; a `client_version` over 64 bytes: `INVALID_ARGUMENT`;
//! - an admitted client gets its registered address, the gateway's, a 32-byte key and a fresh
//!   non-zero session id;
//! - PingSession answers OK exactly for the caller's own current or immediately previous session
//!   while it is admitted and names itself in `client_id`; SESSION_EXPIRED otherwise; never an
//!   error for an identified caller.

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use holdfast::control::pb::control_server::Control;
use holdfast::control::pb::{AuthenticateRequest, AuthenticateResponse, PingSessionRequest, PingStatus};
use holdfast::gateway::PeerIdentity;
use holdfast::gateway::live::LiveRegistry;
use holdfast::gateway::registry::Registry;
use holdfast::gateway::service::{ControlService, ControlState, MAX_CLIENT_VERSION};
use holdfast::gateway::sessions::{Clock, SessionLimits, SessionTable};
use holdfast::pki::CertFingerprint;
use ipnet::Ipv4Net;
use prost::Message;
use tonic::{Code, Request, Response, Status};

use super::input::Reader;

/// The registered clients of the fixture: (name, pinned certificate, active).
pub const CLIENTS: [(&str, [u8; 32], bool); 3] =
    [("alice", [1; 32], true), ("bob", [2; 32], false), ("carol", [3; 32], true)];
const SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 24);
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const DATA_PORT: u16 = 51820;
/// Long enough that no session expires during a run, so the model needs no clock: what is
/// checked is which session ids are honoured, not the expiry arithmetic (unit-tested in
/// `sessions.rs` with a clock passed in).
const LIMITS: SessionLimits = SessionLimits { idle_ms: 3_600_000, max_lifetime_ms: 86_400_000, grace_ms: 3_600_000 };

/// The registry file the service reads, written once per process.
struct Fixture {
    _dir: tempfile::TempDir,
    registry: PathBuf,
    ips: HashMap<&'static str, Ipv4Addr>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // Log lines are formatted (to a sink) so that attacker-chosen fields go through the
        // service's log formatting too; `try_init` because a test binary may have one already.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .try_init();
        let dir = tempfile::tempdir().expect("a temporary dir for the fixture registry");
        let registry = dir.path().join("clients.toml");
        let mut reg = Registry::empty(&registry, SUBNET, GATEWAY_IP, None);
        let mut ips = HashMap::new();
        for (name, cert, active) in CLIENTS {
            let plan = reg.plan_add(name, None).expect("fixture names are valid and fit");
            reg.commit_add(name, plan, CertFingerprint(cert), "2025-01-01T00:00:00Z");
            if !active {
                reg.revoke(name, "2025-01-01T00:00:00Z").expect("registered just above");
            }
            ips.insert(name, plan.ip);
        }
        reg.save().expect("the fixture registry is writable");
        Fixture { _dir: dir, registry, ips }
    })
}

/// A gateway control service with an empty session table, as after a restart.
fn service() -> ControlService {
    let f = fixture();
    let registry = LiveRegistry::open(&f.registry, SUBNET, GATEWAY_IP, None).expect("the fixture registry loads");
    ControlService::new(Arc::new(ControlState {
        registry,
        sessions: Arc::new(SessionTable::new(LIMITS)),
        clock: Clock::new(),
        subnet: SUBNET,
        gateway_ip: GATEWAY_IP,
        v6: None,
        data_port: DATA_PORT,
        dns: Default::default(),
        dns_counters: Default::default(),
        counters: Default::default(),
        partial_checksums: true,
    }))
}

/// Polls a handler's future once. The handlers never await (registry and session lookups are
/// synchronous by design: PingSession must not wait on anything), so one poll must finish it.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a control handler suspended; it must answer without waiting"),
    }
}

fn with_peer<T>(msg: T, peer: &Option<PeerIdentity>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(p) = peer {
        req.extensions_mut().insert(p.clone());
    }
    req
}

/// Reads a caller: none (a request without a verified certificate), a fixture client, a fixture
/// name with another certificate, or any name and certificate.
fn peer(r: &mut Reader<'_>) -> Option<PeerIdentity> {
    let identity = |name: &str, cert: [u8; 32]| PeerIdentity {
        name: Arc::from(name),
        cert: CertFingerprint(cert),
        remote_addr: None,
    };
    let cert = |r: &mut Reader<'_>| {
        let mut c = [0u8; 32];
        let got = r.take(32);
        c[..got.len()].copy_from_slice(got);
        c
    };
    match r.u8() % 6 {
        0 => None,
        i @ 1..=3 => {
            let (name, cert, _) = CLIENTS[usize::from(i - 1)];
            Some(identity(name, cert))
        }
        4 => {
            let c = cert(r);
            Some(identity(CLIENTS[usize::from(r.u8()) % CLIENTS.len()].0, c))
        }
        _ => {
            let c = cert(r);
            Some(identity(&r.string(), c))
        }
    }
}

/// What the harness expects of the service: the rules in the module doc.
#[derive(Debug, Default)]
pub struct Model {
    /// Session ids handed out, per client, oldest first.
    by_client: HashMap<String, Vec<u64>>,
    /// Every id handed out, in order (PingSession picks from these).
    issued: Vec<u64>,
}

impl Model {
    /// The address the registry admits `p` with, if it does.
    fn admitted(p: &PeerIdentity) -> Option<Ipv4Addr> {
        CLIENTS
            .iter()
            .find(|(name, cert, active)| *name == &*p.name && *active && p.cert.0 == *cert)
            .map(|(name, _, _)| fixture().ips[name])
    }

    fn expect_code(got: &Result<impl std::fmt::Debug, Status>, code: Code) {
        match got {
            Err(s) => assert_eq!(s.code(), code, "{s:?}"),
            Ok(v) => panic!("expected {code:?}, got {v:?}"),
        }
    }

    /// Calls Authenticate and checks the answer.
    pub fn authenticate(&mut self, svc: &ControlService, p: &Option<PeerIdentity>, req: AuthenticateRequest) {
        let too_long = req.client_version.len() > MAX_CLIENT_VERSION;
        let got = ready(svc.authenticate(with_peer(req, p)));
        let Some(p) = p else {
            return Self::expect_code(&got, Code::Unauthenticated);
        };
        if too_long {
            return Self::expect_code(&got, Code::InvalidArgument);
        }
        let Some(ip) = Self::admitted(p) else {
            return Self::expect_code(&got, Code::Unauthenticated);
        };
        let resp: AuthenticateResponse = got.map(Response::into_inner).expect("an admitted client authenticates");
        assert_eq!(resp.assigned_ip, ip.octets());
        assert_eq!(resp.gateway_ip, GATEWAY_IP.octets());
        assert_eq!(resp.prefix_len, u32::from(SUBNET.prefix_len()));
        assert_eq!(resp.session_key.len(), 32);
        assert_eq!(resp.data_port, u32::from(DATA_PORT));
        assert_eq!(resp.session_idle_timeout_ms, LIMITS.idle_ms);
        assert_ne!(resp.session_id, 0, "session id 0 handed out");
        assert!(!self.issued.contains(&resp.session_id), "session id {:x} handed out twice", resp.session_id);
        self.issued.push(resp.session_id);
        self.by_client.entry(p.name.to_string()).or_default().push(resp.session_id);
    }

    /// Calls PingSession and checks the answer.
    pub fn ping(&mut self, svc: &ControlService, p: &Option<PeerIdentity>, req: PingSessionRequest) {
        let valid = p.as_ref().is_some_and(|p| {
            let held = self.by_client.get(&*p.name).map_or(&[][..], |ids| &ids[ids.len().saturating_sub(2)..]);
            req.client_id == *p.name && Self::admitted(p).is_some() && held.contains(&req.session_id)
        });
        let got = ready(svc.ping_session(with_peer(req, p)));
        if p.is_none() {
            return Self::expect_code(&got, Code::Unauthenticated);
        }
        let status = got.expect("PingSession answers an identified caller").into_inner().status;
        let want = if valid { PingStatus::Ok } else { PingStatus::SessionExpired };
        assert_eq!(PingStatus::try_from(status), Ok(want));
    }

    /// A session id: any value, or one handed out earlier in this run (to anyone).
    fn session_id(&self, r: &mut Reader<'_>) -> u64 {
        match (r.u8() % 2, self.issued.len()) {
            (1, n) if n > 0 => self.issued[usize::from(r.u8()) % n],
            _ => r.u64(),
        }
    }
}

/// Op codes of `control_handlers` (an op's first byte, modulo 2).
pub mod op {
    /// caller, then `client_version` (length-prefixed).
    pub const AUTHENTICATE: u8 = 0;
    /// caller, `client_id` choice (u8: 0 = the caller's own name, else a length-prefixed string
    /// follows), session id choice (u8: 1 = index u8 into the ids handed out, else a u64).
    pub const PING: u8 = 1;
}

/// Target `control_handlers`: a sequence of Authenticate and PingSession calls against one
/// gateway, from callers the input chooses.
pub fn control_handlers(data: &[u8]) {
    let svc = service();
    let mut model = Model::default();
    let mut r = Reader::new(data);
    while !r.is_empty() {
        let kind = r.u8() % 2;
        let who = peer(&mut r);
        if kind == op::AUTHENTICATE {
            // The flag only changes what the data plane sends later, not the answer's shape.
            let req = AuthenticateRequest { client_version: r.string(), accepts_partial_checksums: true };
            model.authenticate(&svc, &who, req);
        } else {
            let client_id = match (r.u8(), &who) {
                (0, Some(p)) => p.name.to_string(),
                _ => r.string(),
            };
            let session_id = model.session_id(&mut r);
            model.ping(&svc, &who, PingSessionRequest { client_id, session_id });
        }
    }
}

/// Decodes `bytes` as `M`, and if that works checks that encoding and decoding again is lossless.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("prost decodes what it encoded");
    assert_eq!(again, m, "protobuf round trip changed the message");
    Some(m)
}

/// Target `control_decode`: byte 0 picks the message (even: AuthenticateRequest, odd:
/// PingSessionRequest); the rest is its protobuf encoding, as the gRPC layer would hand it over.
/// A message that decodes is then served to alice, a registered client, who already holds a
/// session (so a decoded Authenticate replaces one, as a reconnecting client's does).
pub fn control_decode(data: &[u8]) {
    let mut r = Reader::new(data);
    let which = r.u8();
    let body = r.rest();
    let svc = service();
    let mut model = Model::default();
    let (name, cert, _) = CLIENTS[0];
    let alice = Some(PeerIdentity { name: Arc::from(name), cert: CertFingerprint(cert), remote_addr: None });
    model.authenticate(&svc, &alice, AuthenticateRequest::default());
    if which.is_multiple_of(2) {
        if let Some(req) = decode::<AuthenticateRequest>(body) {
            model.authenticate(&svc, &alice, req);
        }
    } else if let Some(req) = decode::<PingSessionRequest>(body) {
        model.ping(&svc, &alice, req);
    }
}

/// The oracle's own reading of the IPv6 fields, on bytes (independent of `snapshot_from`).
fn usable_v6(a: &AuthenticateResponse) -> bool {
    if a.assigned_ip6.is_empty() && a.gateway_ip6.is_empty() && a.prefix_len6 == 0 {
        return true;
    }
    let (Ok(ip), Ok(gw)) =
        (<[u8; 16]>::try_from(a.assigned_ip6.as_slice()), <[u8; 16]>::try_from(a.gateway_ip6.as_slice()))
    else {
        return false;
    };
    let unicast = |b: &[u8; 16]| {
        let zero_head = b[..15].iter().all(|x| *x == 0);
        let v4_mapped = b[..10].iter().all(|x| *x == 0) && b[10] == 0xff && b[11] == 0xff;
        b[0] != 0xff && !(zero_head && b[15] <= 1) && !v4_mapped
    };
    let p = a.prefix_len6;
    let same_prefix = (48..=128).contains(&p) && {
        let shift = 128 - p;
        let (i, g) = (u128::from_be_bytes(ip), u128::from_be_bytes(gw));
        shift == 128 || (i >> shift) == (g >> shift)
    };
    unicast(&ip) && unicast(&gw) && ip != gw && same_prefix
}

/// Target `gateway_answer`: protobuf bytes of an `AuthenticateResponse` as a buggy or hostile
/// gateway could send them, through the client's check of the answer (`snapshot_from`).
/// Oracles: never panics; an answer is accepted exactly when every field is usable (IPv4
/// addresses of 4 bytes, a prefix length 1..=32, a non-zero session id, a 32-byte key, a data port
/// 1..=65535; the IPv6 fields either all absent or two distinct unicast 16-byte addresses in one
/// prefix of length 48..=128); what is accepted carries those values unchanged, builds its cipher and renders for
/// the status feed; neither the accepted snapshot's summary nor a refusal ever shows the key.
/// The oracle's own reading of the DNS fields: counts bounded, addresses 4 or 16 bytes and
/// unicast, names of letters, digits, '-', '_' and dots only.
fn dns_usable(a: &AuthenticateResponse) -> bool {
    let servers_ok = a.dns_servers.len() <= 8
        && a.dns_servers.iter().all(|b| {
            let ip: Option<std::net::IpAddr> = match b.len() {
                4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(Into::into),
                16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(Into::into),
                _ => None,
            };
            ip.is_some_and(|ip| {
                !ip.is_unspecified() && !ip.is_multicast() && ip != std::net::IpAddr::from([255, 255, 255, 255])
            })
        });
    let names_ok = a.search_domains.len() <= 6
        && a.search_domains.iter().all(|d| holdfast::config::check_search_domain(d).is_ok())
        && a.search_domains.iter().all(|d| d.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)));
    servers_ok && names_ok && (!a.dns_servers.is_empty() || a.search_domains.is_empty())
}

pub fn gateway_answer(data: &[u8]) {
    let Ok(answer) = AuthenticateResponse::decode(data) else {
        return;
    };
    let usable = answer.assigned_ip.len() == 4
        && answer.gateway_ip.len() == 4
        && (1..=32).contains(&answer.prefix_len)
        && answer.session_id != 0
        && answer.session_key.len() == 32
        && (1..=u32::from(u16::MAX)).contains(&answer.data_port)
        && usable_v6(&answer)
        && dns_usable(&answer);
    // Only a full-length key's hex is distinctive enough to look for in text.
    let key_hex = (answer.session_key.len() == 32)
        .then(|| answer.session_key.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let shows_key = |text: &str| key_hex.as_ref().is_some_and(|k| text.to_lowercase().contains(k));
    match holdfast::client::control::snapshot_from(answer.clone()) {
        Ok(snap) => {
            assert!(usable, "accepted an unusable answer: {answer:?}");
            assert_eq!(snap.assigned_ip.octets().as_slice(), answer.assigned_ip.as_slice());
            assert_eq!(snap.gateway_ip.octets().as_slice(), answer.gateway_ip.as_slice());
            assert_eq!(u32::from(snap.prefix_len), answer.prefix_len);
            assert_eq!(snap.session_id.0, answer.session_id);
            assert_eq!(u32::from(snap.data_port), answer.data_port);
            assert_eq!(snap.session_key.expose().as_slice(), answer.session_key.as_slice());
            let octets = |ip: Option<std::net::Ipv6Addr>| ip.map(|ip| ip.octets().to_vec()).unwrap_or_default();
            assert_eq!(octets(snap.assigned_ip6), answer.assigned_ip6);
            assert_eq!(octets(snap.gateway_ip6), answer.gateway_ip6);
            assert_eq!(u32::from(snap.prefix_len6), answer.prefix_len6);
            assert_eq!(snap.dns_servers.len(), answer.dns_servers.len());
            assert_eq!(snap.search_domains, answer.search_domains);
            // What a hostile gateway could do with an accepted answer: the resolv.conf written
            // from it has exactly one line per server, one search line, and comments.
            let text = holdfast::client::dns::render_resolv_conf(
                &snap.dns_servers,
                &snap.search_domains,
                &holdfast::client::dns::Original::Absent,
            )
            .expect("renders");
            let directives: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
            let want = snap.dns_servers.len() + usize::from(!snap.search_domains.is_empty());
            assert_eq!(directives.len(), want, "injected lines: {text}");
            for l in directives {
                assert!(l.starts_with("nameserver ") || l.starts_with("search "), "{l}");
            }
            let _ = snap.crypto();
            let view = holdfast::client::status::SnapshotView::of(&snap);
            assert!(!shows_key(&snap.summary()), "summary shows the key");
            assert!(!shows_key(&format!("{view:?}")), "status view shows the key");
        }
        Err(e) => {
            assert!(!usable, "refused a usable answer ({e}): {answer:?}");
            assert!(!shows_key(&e), "refusal shows the key: {e}");
        }
    }
}
