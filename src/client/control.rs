//! The client's side of the control plane: one lazily connected mutual-TLS gRPC channel, and the two
//! calls the supervisor needs, each with a hard deadline and each failure classified for the machine.
//!
//! Why a lazy channel: `start()` must not block, and the gateway may be down when the client starts.
//! tonic reconnects a lazy channel by itself on the next call after a failure, so a gateway restart
//! needs nothing from us but the next call.
//!
//! What tonic cannot see is a connection that died silently: the client's address changed
//! (roaming), or a middlebox forgot the flow. Its calls then hang until their deadline and the
//! channel keeps using the dead connection until HTTP/2 keepalive gives up on it (the interval
//! plus the timeout, about 15 s). [`ControlPlane::reconnected`] gives the driver a fresh channel
//! on the same endpoint, at no cost until the next call, for when it knows or suspects that.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::client::{ClientFile, Credentials};
use crate::control::pb;
use crate::control::pb::control_client::ControlClient;
use crate::sansio::supervisor::{AuthFailure, PingFailure};
use crate::snapshot::{SessionId, SessionKey, VpnAuthResponse};

/// The answer of a successful `PingSession`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingAnswer {
    Ok,
    SessionExpired,
}

/// Why the channel could not be built from the credentials.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The endpoint or TLS settings were refused by tonic.
    #[error("cannot set up the control channel to {endpoint}: {reason}")]
    Setup { endpoint: String, reason: String },
}

/// A failed call, classified, with a human-readable detail for the log.
#[derive(Debug, Clone)]
pub struct CallError<K> {
    pub kind: K,
    pub detail: String,
}

/// The control-plane client.
#[derive(Clone)]
pub struct ControlPlane {
    client: ControlClient<Channel>,
    /// Where `client` connects, kept to build a fresh channel (see [`ControlPlane::reconnected`]).
    endpoint: Endpoint,
    /// The caller's own identity, sent in `PingSession` (the gateway checks it against the cert).
    client_id: Arc<str>,
    /// The gateway this channel talks to (recorded in each snapshot it hands out).
    gateway: SocketAddr,
    /// Told to the gateway in `Authenticate`: this client's TUN device takes a packet whose TCP
    /// checksum is partial (it has offload on), so the gateway may send such packets.
    accepts_partial_checksums: bool,
}

impl ControlPlane {
    /// Builds a lazily connecting channel to the file's `endpoint`; performs no IO.
    pub fn new(file: &ClientFile, creds: &Credentials) -> Result<Self, ChannelError> {
        Self::to_gateway(file, creds, file.endpoint)
    }

    /// Builds a lazily connecting channel to the gateway at `gateway` (one of the deployment's:
    /// same authority, same server name); performs no IO.
    pub fn to_gateway(file: &ClientFile, creds: &Credentials, gateway: SocketAddr) -> Result<Self, ChannelError> {
        let endpoint = format!("https://{gateway}");
        let setup = |reason: String| ChannelError::Setup { endpoint: endpoint.clone(), reason };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&creds.gateway_ca_pem))
            .identity(Identity::from_pem(&creds.certificate_pem, &creds.key_pem))
            .domain_name(file.server_name.clone());
        let rpc_deadline = file.timings().rpc_deadline;
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| setup(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| setup(error_chain(&e)))?
            .tcp_nodelay(true)
            .connect_timeout(rpc_deadline)
            // HTTP/2 keepalive lets a dead TCP connection (gateway vanished without FIN) be noticed
            // and replaced instead of every call waiting out its deadline on a corpse.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(rpc_deadline)
            .keep_alive_while_idle(true);
        Ok(Self {
            client: ControlClient::new(channel.connect_lazy()),
            endpoint: channel,
            client_id: Arc::from(file.name.as_str()),
            gateway,
            accepts_partial_checksums: file.network.offload.unwrap_or(true),
        })
    }

    /// The same control plane on a new, lazily connecting channel; performs no IO. Calls in
    /// flight finish on the old channel, whose connection closes when the last of them ends; the
    /// next call opens a new connection (from whatever address the client has now).
    pub fn reconnected(&self) -> Self {
        Self {
            client: ControlClient::new(self.endpoint.connect_lazy()),
            endpoint: self.endpoint.clone(),
            client_id: Arc::clone(&self.client_id),
            gateway: self.gateway,
            accepts_partial_checksums: self.accepts_partial_checksums,
        }
    }

    /// `Authenticate` with a deadline. The response is validated before it becomes a snapshot.
    pub async fn authenticate(&self, deadline: Duration) -> Result<Arc<VpnAuthResponse>, CallError<AuthFailure>> {
        let mut req = tonic::Request::new(pb::AuthenticateRequest {
            client_version: concat!("holdfast/", env!("CARGO_PKG_VERSION")).to_owned(),
            accepts_partial_checksums: self.accepts_partial_checksums,
        });
        req.set_timeout(deadline);
        let mut client = self.client.clone();
        let call = client.authenticate(req);
        let resp = match tokio::time::timeout(deadline, call).await {
            Err(_) => return Err(CallError { kind: AuthFailure::TimedOut, detail: timed_out(deadline) }),
            Ok(Err(status)) => return Err(classify_auth(&status)),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        snapshot_from_gateway(resp, Some(self.gateway))
            .map_err(|detail| CallError { kind: AuthFailure::GatewayError, detail })
    }

    /// `PingSession` with a deadline.
    pub async fn ping(&self, session_id: SessionId, deadline: Duration) -> Result<PingAnswer, CallError<PingFailure>> {
        let mut req = tonic::Request::new(pb::PingSessionRequest {
            client_id: self.client_id.to_string(),
            session_id: session_id.0,
        });
        req.set_timeout(deadline);
        let mut client = self.client.clone();
        let call = client.ping_session(req);
        let resp = match tokio::time::timeout(deadline, call).await {
            Err(_) => return Err(CallError { kind: PingFailure::TimedOut, detail: timed_out(deadline) }),
            Ok(Err(status)) => return Err(classify_ping(&status)),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        match pb::PingStatus::try_from(resp.status) {
            Ok(pb::PingStatus::Ok) => Ok(PingAnswer::Ok),
            Ok(pb::PingStatus::SessionExpired) => Ok(PingAnswer::SessionExpired),
            _ => Err(CallError {
                kind: PingFailure::GatewayError,
                detail: format!("gateway sent an unknown ping status {}", resp.status),
            }),
        }
    }
}

impl ControlPlane {
    /// The empty `Probe` call: what one round trip on this connection costs with no registry
    /// work (liveness checks; the control-plane benchmark's baseline).
    pub async fn probe(&self, deadline: Duration) -> Result<(), CallError<PingFailure>> {
        let mut req = tonic::Request::new(pb::ProbeRequest {});
        req.set_timeout(deadline);
        let mut client = self.client.clone();
        match tokio::time::timeout(deadline, client.probe(req)).await {
            Err(_) => Err(CallError { kind: PingFailure::TimedOut, detail: timed_out(deadline) }),
            Ok(Err(status)) => Err(classify_ping(&status)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

fn timed_out(deadline: Duration) -> String {
    format!("no answer within {} ms", deadline.as_millis())
}

/// Turns an `AuthenticateResponse` into a snapshot. Every field is checked: a gateway bug (or a
/// hostile gateway) must not become a client crash or a half-usable session. Public for the
/// `gateway_answer` fuzz target; the error is a sentence for the log, never containing the key.
pub fn snapshot_from(r: pb::AuthenticateResponse) -> Result<Arc<VpnAuthResponse>, String> {
    snapshot_from_gateway(r, None)
}

/// [`snapshot_from`] for an answer of the gateway at `gateway`.
pub fn snapshot_from_gateway(
    r: pb::AuthenticateResponse,
    gateway: Option<SocketAddr>,
) -> Result<Arc<VpnAuthResponse>, String> {
    let ip = |b: &[u8], what: &str| {
        <[u8; 4]>::try_from(b)
            .map(Ipv4Addr::from)
            .map_err(|_| format!("gateway sent a {what} of {} bytes, expected an IPv4 address", b.len()))
    };
    let assigned_ip = ip(&r.assigned_ip, "assigned_ip")?;
    let gateway_ip = ip(&r.gateway_ip, "gateway_ip")?;
    let prefix_len = u8::try_from(r.prefix_len)
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("gateway sent an invalid prefix length {}", r.prefix_len))?;
    let (assigned_ip6, gateway_ip6, prefix_len6) = v6_fields(&r)?;
    let session_key = SessionKey::from_slice(&r.session_key)
        .ok_or_else(|| format!("gateway sent a session key of {} bytes, expected 32", r.session_key.len()))?;
    if r.session_id == 0 {
        return Err("gateway sent session id 0".into());
    }
    let data_port = u16::try_from(r.data_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("gateway sent an invalid data port {}", r.data_port))?;
    let (dns_servers, search_domains) = dns_from(&r.dns_servers, &r.search_domains)?;
    if r.endpoints.len() > crate::config::client::MAX_ENDPOINTS {
        return Err(format!(
            "gateway listed {} gateways; at most {} are accepted",
            r.endpoints.len(),
            crate::config::client::MAX_ENDPOINTS
        ));
    }
    let endpoints = r
        .endpoints
        .iter()
        .map(|e| {
            e.parse::<SocketAddr>()
                .ok()
                .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
                .ok_or_else(|| format!("gateway listed an invalid endpoint {:?}", e.escape_debug().to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(VpnAuthResponse {
        assigned_ip,
        gateway_ip,
        prefix_len,
        assigned_ip6,
        gateway_ip6,
        prefix_len6,
        session_id: SessionId(r.session_id),
        session_key,
        data_port,
        idle_timeout: Duration::from_millis(r.session_idle_timeout_ms),
        dns_servers,
        search_domains,
        received_at: SystemTime::now(),
        gateway_addr: gateway,
        endpoints,
        partial_checksums: r.accepts_partial_checksums,
        crypto: Default::default(),
    }))
}

/// The IPv6 fields of an answer: all three empty (a gateway without IPv6, or one from before it:
/// the session runs IPv4 only) or all three valid. Anything in between is refused: half an IPv6
/// configuration would give a TUN address with no route, or a route with no address.
fn v6_fields(r: &pb::AuthenticateResponse) -> Result<(Option<Ipv6Addr>, Option<Ipv6Addr>, u8), String> {
    if r.assigned_ip6.is_empty() && r.gateway_ip6.is_empty() && r.prefix_len6 == 0 {
        return Ok((None, None, 0));
    }
    let ip6 = |b: &[u8], what: &str| {
        <[u8; 16]>::try_from(b)
            .map(Ipv6Addr::from)
            .map_err(|_| format!("gateway sent a {what} of {} bytes, expected an IPv6 address", b.len()))
    };
    let assigned = ip6(&r.assigned_ip6, "assigned_ip6")?;
    let gateway = ip6(&r.gateway_ip6, "gateway_ip6")?;
    let prefix_len6 = u8::try_from(r.prefix_len6)
        .ok()
        .filter(|p| (48..=128).contains(p))
        .ok_or_else(|| format!("gateway sent an invalid IPv6 prefix length {}", r.prefix_len6))?;
    let unicast =
        |ip: Ipv6Addr| !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.to_ipv4_mapped().is_some());
    if !unicast(assigned) || !unicast(gateway) || assigned == gateway {
        return Err(format!("gateway sent unusable IPv6 tunnel addresses {assigned} and {gateway}"));
    }
    let net = ipnet::Ipv6Net::new(gateway, prefix_len6).map_err(|e| e.to_string())?;
    if !net.contains(&assigned) {
        return Err(format!("gateway sent IPv6 address {assigned} outside its own subnet {}", net.trunc()));
    }
    Ok((Some(assigned), Some(gateway), prefix_len6))
}

/// Checks the resolvers and search domains a gateway pushes. They end up in `/etc/resolv.conf` or
/// in `resolvectl` arguments, so a hostile gateway must not get anything but addresses and plain
/// domain names there: bounded counts, exact address lengths, unicast addresses, and names made
/// only of letters, digits, `-`, `_` and dots (no spaces, line breaks or comment characters).
fn dns_from(servers: &[Vec<u8>], search: &[String]) -> Result<(Vec<IpAddr>, Vec<String>), String> {
    use crate::config::{MAX_DNS_SERVERS, MAX_SEARCH_DOMAINS, check_search_domain};
    if servers.len() > MAX_DNS_SERVERS {
        return Err(format!("gateway sent {} dns_servers; at most {MAX_DNS_SERVERS} are accepted", servers.len()));
    }
    let ips = servers
        .iter()
        .map(|b| {
            let ip = match b.len() {
                4 => <[u8; 4]>::try_from(b.as_slice()).map(IpAddr::from).ok(),
                16 => <[u8; 16]>::try_from(b.as_slice()).map(IpAddr::from).ok(),
                _ => None,
            }
            .ok_or_else(|| format!("gateway sent a dns_servers entry of {} bytes, expected 4 or 16", b.len()))?;
            let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if ip.is_unspecified() || ip.is_multicast() || broadcast {
                return Err(format!("gateway sent dns_servers entry {ip}, not a unicast address"));
            }
            Ok(ip)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if search.len() > MAX_SEARCH_DOMAINS {
        return Err(format!("gateway sent {} search_domains; at most {MAX_SEARCH_DOMAINS} are accepted", search.len()));
    }
    for d in search {
        check_search_domain(d).map_err(|r| format!("gateway sent an invalid search_domains entry: {r}"))?;
    }
    if ips.is_empty() && !search.is_empty() {
        return Err("gateway sent search_domains without dns_servers".into());
    }
    Ok((ips, search.to_vec()))
}

/// Renders an error and its sources on one line (tonic's transport errors hide the useful part,
/// e.g. the rustls alert, several sources deep).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

fn status_detail(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut s = format!("{:?}: {}", status.code(), status.message());
    if let Some(src) = status.source() {
        s.push_str(": ");
        s.push_str(&error_chain(src));
    }
    s
}

/// Whether a transport failure is a TLS certificate problem (either side refusing the other).
/// Under TLS 1.3 the gateway's refusal of our certificate arrives as an alert at the first call.
fn is_certificate_problem(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    d.contains("certificate")
        || d.contains("unknownca")
        || d.contains("unknown ca")
        || d.contains("decrypterror")
        || d.contains("received fatal alert")
}

fn classify_auth(status: &tonic::Status) -> CallError<AuthFailure> {
    use tonic::Code;
    let detail = status_detail(status);
    let kind = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => AuthFailure::Rejected,
        Code::DeadlineExceeded => AuthFailure::TimedOut,
        _ if is_certificate_problem(&detail) => AuthFailure::CertificateRefused,
        Code::Unavailable | Code::Cancelled | Code::Unknown => AuthFailure::Unreachable,
        _ => AuthFailure::GatewayError,
    };
    let detail = match kind {
        AuthFailure::CertificateRefused => format!(
            "TLS refused (the gateway does not accept this client's certificate, or its certificate \
             is not the one this client file pins): {detail}"
        ),
        AuthFailure::Rejected => format!("gateway rejected this client: {}", status.message()),
        _ => detail,
    };
    CallError { kind, detail }
}

fn classify_ping(status: &tonic::Status) -> CallError<PingFailure> {
    use tonic::Code;
    let kind = match status.code() {
        Code::DeadlineExceeded => PingFailure::TimedOut,
        Code::Unavailable | Code::Cancelled | Code::Unknown => PingFailure::Unreachable,
        _ => PingFailure::GatewayError,
    };
    CallError { kind, detail: status_detail(status) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::AuthenticateResponse {
        pb::AuthenticateResponse {
            assigned_ip: vec![100, 64, 0, 2],
            gateway_ip: vec![100, 64, 0, 1],
            prefix_len: 24,
            session_id: 42,
            session_key: vec![7; 32],
            data_port: 51820,
            session_idle_timeout_ms: 180_000,
            assigned_ip6: "fd00:64::2".parse::<Ipv6Addr>().unwrap().octets().to_vec(),
            gateway_ip6: "fd00:64::1".parse::<Ipv6Addr>().unwrap().octets().to_vec(),
            prefix_len6: 64,
            dns_servers: vec![vec![100, 64, 0, 1]],
            search_domains: vec!["corp.example".into()],
            ..Default::default()
        }
    }

    #[test]
    fn valid_response_becomes_a_snapshot() {
        let s = snapshot_from(good()).expect("valid");
        assert_eq!(s.assigned_ip, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(s.session_id, SessionId(42));
        assert_eq!(s.idle_timeout, Duration::from_secs(180));
        assert_eq!(s.assigned_ip6, Some("fd00:64::2".parse().unwrap()));
        assert_eq!(s.gateway_ip6, Some("fd00:64::1".parse().unwrap()));
        assert_eq!(s.prefix_len6, 64);
    }

    #[test]
    fn a_gateway_without_ipv6_gives_an_ipv4_only_session() {
        let mut r = good();
        r.assigned_ip6.clear();
        r.gateway_ip6.clear();
        r.prefix_len6 = 0;
        let s = snapshot_from(r).expect("an old gateway's answer is valid");
        assert_eq!((s.assigned_ip6, s.gateway_ip6, s.prefix_len6), (None, None, 0));
    }

    #[test]
    fn pushed_resolvers_are_kept() {
        let s = snapshot_from(good()).expect("valid");
        assert_eq!(s.dns_servers, vec![IpAddr::from([100, 64, 0, 1])]);
        assert_eq!(s.search_domains, ["corp.example"]);
        let mut none = good();
        none.dns_servers.clear();
        none.search_domains.clear();
        assert!(snapshot_from(none).unwrap().dns_servers.is_empty());
    }

    #[test]
    fn invalid_responses_are_errors_not_panics() {
        type Mutation = fn(&mut pb::AuthenticateResponse);
        let cases: Vec<(Mutation, &str)> = vec![
            (|r| r.assigned_ip = vec![1, 2, 3], "assigned_ip"),
            (|r| r.gateway_ip = vec![0; 16], "gateway_ip"),
            (|r| r.prefix_len = 0, "prefix"),
            (|r| r.prefix_len = 33, "prefix"),
            (|r| r.session_key = vec![1; 31], "session key"),
            (|r| r.session_id = 0, "session id"),
            (|r| r.data_port = 70_000, "data port"),
            (|r| r.data_port = 0, "data port"),
            (|r| r.assigned_ip6 = vec![0xfd; 4], "assigned_ip6"),
            (|r| r.assigned_ip6.clear(), "assigned_ip6"),
            (|r| r.gateway_ip6 = vec![0xfd; 17], "gateway_ip6"),
            (|r| r.prefix_len6 = 0, "IPv6 prefix"),
            (|r| r.prefix_len6 = 129, "IPv6 prefix"),
            (|r| r.prefix_len6 = 8, "IPv6 prefix"),
            (|r| r.assigned_ip6 = r.gateway_ip6.clone(), "unusable IPv6"),
            (|r| r.assigned_ip6 = Ipv6Addr::UNSPECIFIED.octets().to_vec(), "unusable IPv6"),
            (|r| r.gateway_ip6 = Ipv6Addr::LOCALHOST.octets().to_vec(), "unusable IPv6"),
            (|r| r.assigned_ip6 = "ff02::1".parse::<Ipv6Addr>().unwrap().octets().to_vec(), "unusable IPv6"),
            (|r| r.assigned_ip6 = "fd01::2".parse::<Ipv6Addr>().unwrap().octets().to_vec(), "outside"),
            (|r| r.dns_servers = vec![vec![1, 2, 3]], "dns_servers entry of 3 bytes"),
            (|r| r.dns_servers = vec![vec![0; 4]], "not a unicast"),
            (|r| r.dns_servers = vec![vec![255; 4]], "not a unicast"),
            (|r| r.dns_servers = vec![vec![224, 0, 0, 1]], "not a unicast"),
            (|r| r.dns_servers = vec![vec![100, 64, 0, 1]; 9], "at most 8"),
            (|r| r.search_domains = vec!["lan\nnameserver 198.18.9.9".into()], "search_domains entry"),
            (|r| r.search_domains = vec!["a b".into()], "search_domains entry"),
            (|r| r.search_domains = vec!["x".into(); 7], "at most 6"),
            (|r| r.dns_servers.clear(), "without dns_servers"),
        ];
        for (mutate, expect) in cases {
            let mut r = good();
            mutate(&mut r);
            let err = snapshot_from(r).expect_err(expect);
            assert!(err.contains(expect), "{err} should mention {expect}");
        }
    }

    #[test]
    fn statuses_are_classified() {
        let s = tonic::Status::unauthenticated("client 'x' is revoked");
        let e = classify_auth(&s);
        assert_eq!(e.kind, AuthFailure::Rejected);
        assert!(e.detail.contains("revoked"));
        assert_eq!(classify_auth(&tonic::Status::unavailable("tcp connect error")).kind, AuthFailure::Unreachable);
        assert_eq!(
            classify_auth(&tonic::Status::unavailable("received fatal alert: UnknownCA")).kind,
            AuthFailure::CertificateRefused
        );
        assert_eq!(classify_auth(&tonic::Status::deadline_exceeded("x")).kind, AuthFailure::TimedOut);
        assert_eq!(classify_auth(&tonic::Status::internal("x")).kind, AuthFailure::GatewayError);
        assert_eq!(classify_ping(&tonic::Status::unavailable("x")).kind, PingFailure::Unreachable);
        assert_eq!(classify_ping(&tonic::Status::deadline_exceeded("x")).kind, PingFailure::TimedOut);
    }
}
