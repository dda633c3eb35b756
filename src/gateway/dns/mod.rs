//! The gateway's resolver: DNS over UDP and TCP on port 53 of the gateway's tunnel address(es),
//! forwarded to upstream resolvers, for clients with a live session only. Its address goes to
//! every client in `AuthenticateResponse.dns_servers`, so a client on a home network resolves
//! names through the tunnel from its first connect.
//!
//! Not an open resolver: each socket is bound to a tunnel address *and* to the TUN device
//! (`SO_BINDTODEVICE`), so only packets that came in through the tunnel reach it (a query sent to
//! the underlay address, or to the tunnel address over the underlay, finds no socket), and a
//! query is served only if its source is the assigned address of a live session (the data plane
//! already drops packets whose inner source is not their session's address).
//!
//! Bounds, so no client can stall the others or grow the gateway's memory:
//! - per client: a token bucket ([`ClientGate`], `[dns] rate_limit`) and at
//!   most [`PER_CLIENT_IN_FLIGHT`] queries in flight; excess queries are dropped and counted;
//! - overall: at most [`MAX_IN_FLIGHT`] forwarded queries and [`MAX_TCP_CONNECTIONS`] TCP
//!   connections, each closed after [`TCP_IDLE`] without a query;
//! - every forwarded query is answered within `[dns] timeout`: the upstream's answer, or SERVFAIL.
//!
//! What is decided about a query is pure ([`crate::sansio::dns`]); this module moves bytes.

mod gate;
mod upstream;

pub use gate::{Admission, ClientGate};

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use super::sessions::{Clock, SessionTable};
use crate::config::gateway::{GatewayConfig, check_not_own};
use crate::sansio::dns::{self as core, MAX_MESSAGE, Transport, Verdict};

const TARGET: &str = "holdfast::dns";

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// Forwarded queries in flight at once, over all clients. Each holds one upstream socket and a
/// 4 KiB buffer for at most `[dns] timeout`, so this bounds the resolver's memory and descriptors.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Queries of one client in flight at once: a client flooding waits for its own answers.
pub const PER_CLIENT_IN_FLIGHT: u32 = 64;
/// Open TCP connections at once, over all clients.
pub const MAX_TCP_CONNECTIONS: usize = 128;
/// A TCP connection with no complete query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// The system resolver file whose nameservers are the default upstreams.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Why the resolver could not start (a start-up failure of the gateway).
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A socket on a tunnel address could not be set up.
    #[error(
        "cannot listen for DNS on {addr} ({proto}) on {tun}: {source} (another DNS server bound to \
         every address? set [dns] enabled = false in gateway.toml to run without the resolver)"
    )]
    Bind { addr: SocketAddr, proto: &'static str, tun: String, source: io::Error },
}

impl DnsError {
    /// Whether a missing privilege is the cause (port 53 needs CAP_NET_BIND_SERVICE).
    pub fn not_permitted(&self) -> bool {
        match self {
            DnsError::Bind { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
        }
    }
}

/// What the gateway tells clients about its resolver (`AuthenticateResponse` fields 11 and 12).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsPush {
    /// The resolver's addresses: the gateway's tunnel address(es). Empty: no resolver.
    pub servers: Vec<IpAddr>,
    /// `[dns] search_domains`.
    pub search_domains: Vec<String>,
}

/// The resolver to run, decided from gateway.toml and the host's resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverPlan {
    /// Where it answers: the gateway's tunnel addresses (one per address family in use).
    pub listen: Vec<IpAddr>,
    /// Where it forwards to, tried in order.
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    /// Queries per second per client; bursts of twice that.
    pub rate_limit: u32,
    pub search_domains: Vec<String>,
}

impl ResolverPlan {
    /// The plan for `config`: `None` when `[dns] enabled = false`, or when no upstream is
    /// configured and the host's resolv.conf names none usable — then a warning says so and the
    /// gateway runs without a resolver (clients keep their own DNS settings). A gateway that
    /// cannot resolve names itself should not stop serving its tunnel for it.
    pub fn for_gateway(config: &GatewayConfig) -> Option<Self> {
        Self::with_resolv_conf(config, Path::new(HOST_RESOLV_CONF))
    }

    /// [`ResolverPlan::for_gateway`] with another resolv.conf (tests).
    pub fn with_resolv_conf(config: &GatewayConfig, resolv_conf: &Path) -> Option<Self> {
        let dns = &config.dns;
        if !dns.enabled {
            tracing::info!(target: TARGET, "resolver off ([dns] enabled = false): clients keep their own DNS");
            return None;
        }
        // One entry per tunnel address the gateway serves (IPv6 when this host has it on).
        let mut listen = vec![IpAddr::V4(config.gateway_ip)];
        if let Some(v6) = crate::gateway::dataplane::served_v6(config) {
            listen.push(IpAddr::V6(v6.gateway_ip));
        }
        let upstreams = match &dns.upstreams {
            Some(list) => list.clone(),
            None => {
                let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
                let found = nameservers(&text);
                let usable: Vec<SocketAddr> =
                    found.iter().copied().filter(|a| check_not_own(*a, &listen).is_ok()).collect();
                if usable.is_empty() {
                    tracing::warn!(
                        target: TARGET,
                        "resolver off: [dns] upstreams is not set and {} names no usable nameserver; \
                         set [dns] upstreams (or enabled = false to silence this)",
                        resolv_conf.display()
                    );
                    return None;
                }
                usable
            }
        };
        Some(Self {
            listen,
            upstreams,
            timeout: dns.timeout,
            rate_limit: dns.rate_limit,
            search_domains: dns.search_domains.clone(),
        })
    }

    /// What clients are told.
    pub fn push(&self) -> DnsPush {
        DnsPush { servers: self.listen.clone(), search_domains: self.search_domains.clone() }
    }
}

/// The `nameserver` addresses of a resolv.conf (port 53), in order, at most
/// [`crate::config::MAX_DNS_SERVERS`]. Lines that do not parse are skipped, like the C library
/// does; link-local IPv6 with a `%scope` is skipped too (it names an interface of the host).
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            (!ip.is_unspecified() && !ip.is_multicast()).then_some(SocketAddr::new(ip, DNS_PORT))
        })
        .take(crate::config::MAX_DNS_SERVERS)
        .collect()
}

/// The resolver's counters: plain atomics, read with [`DnsCounters::stats`] (for `SIGUSR1`, the
/// status and metrics).
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Queries received (UDP datagrams and TCP messages), whatever became of them.
    pub queries: AtomicU64,
    /// Answers from an upstream passed on to the client.
    pub answered: AtomicU64,
    /// SERVFAIL sent: no upstream answered in time, or every one failed.
    pub servfail: AtomicU64,
    /// Not from a live session's address: dropped unanswered (UDP) or the connection closed (TCP).
    pub refused: AtomicU64,
    /// Malformed or not forwardable (FORMERR, NOTIMP, REFUSED sent, or dropped when not even a
    /// header).
    pub malformed: AtomicU64,
    /// Over the client's rate or in-flight limit: dropped.
    pub rate_limited: AtomicU64,
}

/// A snapshot of [`DnsCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsStats {
    pub queries: u64,
    pub answered: u64,
    pub servfail: u64,
    pub refused: u64,
    pub malformed: u64,
    pub rate_limited: u64,
}

impl DnsCounters {
    pub fn stats(&self) -> DnsStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DnsStats {
            queries: l(&self.queries),
            answered: l(&self.answered),
            servfail: l(&self.servfail),
            refused: l(&self.refused),
            malformed: l(&self.malformed),
            rate_limited: l(&self.rate_limited),
        }
    }
}

impl fmt::Display for DnsStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queries {} answered {} servfail {} refused {} malformed {} rate-limited {}",
            self.queries, self.answered, self.servfail, self.refused, self.malformed, self.rate_limited
        )
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Who may ask: the tunnel addresses of live sessions.
pub trait LiveClients: Send + Sync {
    fn is_live(&self, ip: IpAddr) -> bool;
}

/// [`LiveClients`] from the control plane's session table.
pub struct LiveSessions {
    pub table: Arc<SessionTable>,
    pub clock: Clock,
}

impl LiveClients for LiveSessions {
    fn is_live(&self, ip: IpAddr) -> bool {
        self.table.get_by_ip(ip).is_some_and(|s| self.table.validity(&s, self.clock.now()).is_ok())
    }
}

/// What every task of the resolver shares.
struct Shared {
    plan: ResolverPlan,
    live: Arc<dyn LiveClients>,
    gate: Mutex<ClientGate>,
    in_flight: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
    counters: Arc<DnsCounters>,
}

impl Shared {
    fn gate(&self) -> std::sync::MutexGuard<'_, ClientGate> {
        // The gate's methods do not panic; a poisoned lock still holds consistent buckets.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The common front of both transports: a live client within its limits gets a verdict.
    /// `None`: counted and dropped.
    fn admit(&self, client: IpAddr, bytes: &[u8]) -> Option<Verdict> {
        bump(&self.counters.queries);
        if !self.live.is_live(client) {
            bump(&self.counters.refused);
            return None;
        }
        if self.gate().admit(client, Instant::now()) == Admission::RateLimited {
            bump(&self.counters.rate_limited);
            return None;
        }
        let verdict = core::check_query(bytes, rand::random());
        if !matches!(verdict, Verdict::Forward(_)) {
            bump(&self.counters.malformed);
            self.gate().done(client);
        }
        Some(verdict)
    }

    /// Asks the upstreams; the answer or SERVFAIL, within the plan's timeout.
    async fn resolve(&self, fwd: &core::Forward, transport: Transport) -> Vec<u8> {
        match upstream::ask(&self.plan.upstreams, self.plan.timeout, fwd, transport).await {
            Some(answer) => {
                bump(&self.counters.answered);
                answer
            }
            None => {
                bump(&self.counters.servfail);
                core::servfail(fwd)
            }
        }
    }

    /// Takes one of the [`MAX_IN_FLIGHT`] forwarding slots for an admitted query of `client`.
    /// When all are taken the resolver is saturated and says so at once rather than queue: the
    /// query is over (counted, its client's gate told) and `Err` holds the SERVFAIL to send.
    fn slot(&self, client: IpAddr, fwd: &core::Forward) -> Result<OwnedSemaphorePermit, Vec<u8>> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            bump(&self.counters.servfail);
            self.gate().done(client);
            core::servfail(fwd)
        })
    }

    /// Forwards a query that holds `slot`: the answer or SERVFAIL. The query is over afterwards
    /// (its client's gate told, the slot freed).
    async fn forward(
        &self,
        client: IpAddr,
        fwd: &core::Forward,
        transport: Transport,
        slot: OwnedSemaphorePermit,
    ) -> Vec<u8> {
        let answer = self.resolve(fwd, transport).await;
        self.gate().done(client);
        drop(slot);
        answer
    }
}

/// The running resolver. [`GatewayResolver::stop`] ends it.
pub struct GatewayResolver {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The addresses (UDP and TCP) it answers on.
    pub local: Vec<SocketAddr>,
}

impl GatewayResolver {
    /// Binds UDP and TCP port 53 on each of `plan.listen`, on the TUN device `tun`, and starts
    /// serving, counting into `counters` (the control plane's, see
    /// [`super::ControlPlane::dns_counters`], so `gateway status` and the metrics show them). The
    /// TUN device must exist with those addresses. Must run inside a tokio runtime.
    pub fn start(
        plan: ResolverPlan,
        tun: &str,
        live: Arc<dyn LiveClients>,
        counters: Arc<DnsCounters>,
    ) -> Result<Self, DnsError> {
        Self::start_on_port(plan, tun, DNS_PORT, live, counters)
    }

    /// [`GatewayResolver::start`] on another port (tests without CAP_NET_BIND_SERVICE).
    pub fn start_on_port(
        plan: ResolverPlan,
        tun: &str,
        port: u16,
        live: Arc<dyn LiveClients>,
        counters: Arc<DnsCounters>,
    ) -> Result<Self, DnsError> {
        let rate = plan.rate_limit;
        let shared = Arc::new(Shared {
            gate: Mutex::new(ClientGate::new(rate, rate.saturating_mul(2), PER_CLIENT_IN_FLIGHT)),
            plan,
            live,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tcp_slots: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            counters,
        });
        let (stop, _) = watch::channel(false);
        let mut sockets = Vec::new();
        for ip in &shared.plan.listen {
            let addr = SocketAddr::new(*ip, port);
            let err = |proto, source| DnsError::Bind { addr, proto, tun: tun.to_owned(), source };
            let udp = bind_udp_on(addr, tun).map_err(|e| err("udp", e))?;
            // TCP on the port UDP got (the same unless `port` was 0).
            let bound = udp.local_addr().map_err(|e| err("udp", e))?;
            let tcp = bind_tcp_on(bound, tun).map_err(|e| err("tcp", e))?;
            sockets.push((udp, tcp));
        }
        let mut tasks = Vec::new();
        let mut local = Vec::new();
        for (udp, tcp) in sockets {
            local.extend(udp.local_addr().ok());
            tasks.push(tokio::spawn(serve_udp(shared.clone(), Arc::new(udp), stop.subscribe())));
            tasks.push(tokio::spawn(serve_tcp(shared.clone(), tcp, stop.subscribe())));
        }
        tasks.push(tokio::spawn(tidy_gate(shared.clone(), stop.subscribe())));
        let ups: Vec<String> = shared.plan.upstreams.iter().map(ToString::to_string).collect();
        let on: Vec<String> = local.iter().map(ToString::to_string).collect();
        tracing::info!(
            target: TARGET,
            "resolver up on {} (udp+tcp, {tun} only), forwarding to {}",
            on.join(" "),
            ups.join(" ")
        );
        Ok(Self { shared, stop, tasks, local })
    }

    /// The live counters.
    pub fn counters(&self) -> Arc<DnsCounters> {
        self.shared.counters.clone()
    }

    pub fn stats(&self) -> DnsStats {
        self.shared.counters.stats()
    }

    /// Stops answering. Queries being forwarded finish on their own within the timeout.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        tracing::info!(target: TARGET, "resolver stopped; {}", self.stats());
    }
}

/// Logs the resolver's counters on every SIGUSR1 (beside the data plane's): see
/// [`crate::logging::stats_on_sigusr1`].
pub fn log_stats_on_sigusr1(counters: Arc<DnsCounters>) -> impl std::future::Future<Output = ()> + Send + 'static {
    crate::logging::stats_on_sigusr1("resolver", move || counters.stats())
}

/// The tunnel addresses may still be settling when the resolver starts (an IPv6 address on a
/// fresh device is not usable at once): binding them "free" lets the socket take the address
/// the TUN device is given, instead of failing the start on a race with the kernel.
fn set_freebind(sock: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => sock.set_freebind_v4(true),
        SocketAddr::V6(_) => sock.set_freebind_v6(true),
    }
}

/// Receive buffer of the resolver's UDP sockets: room for a burst of about 4000 small queries (the
/// kernel charges about 1 KiB of buffer per datagram). With the default (about 200 KiB) a burst
/// of a thousand queries from one client, which the data plane delivers in GSO runs within
/// milliseconds, filled it, and the kernel dropped the other clients' queries too (UDP
/// `RcvbufErrors`) before the per-client gate could tell them apart.
const UDP_RECV_BUFFER: usize = 4 << 20;

fn bind_udp_on(addr: SocketAddr, tun: &str) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Only what came in through the tunnel: see the module doc.
    sock.bind_device(Some(tun.as_bytes()))?;
    crate::tunnel::grow_buffer(&sock, crate::tunnel::Buffer::Recv, UDP_RECV_BUFFER);
    set_freebind(&sock, addr)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

fn bind_tcp_on(addr: SocketAddr, tun: &str) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.bind_device(Some(tun.as_bytes()))?;
    set_freebind(&sock, addr)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(64)?;
    TcpListener::from_std(sock.into())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Forgets idle clients now and then, so the gate holds only recent askers.
async fn tidy_gate(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => shared.gate().forget_idle(Instant::now()),
        }
    }
}

async fn serve_udp(shared: Arc<Shared>, sock: Arc<UdpSocket>, mut stop: watch::Receiver<bool>) {
    // One more than the largest message: a datagram that fills it is oversized.
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let (len, from) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP errors about earlier replies surface here; nothing to do about them but
                // not to spin if the error persists.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let client = from.ip();
        match shared.admit(client, &buf[..len]) {
            None | Some(Verdict::Drop(_)) => {}
            Some(Verdict::Reply(bytes)) => {
                let _ = sock.send_to(&bytes, from).await;
            }
            Some(Verdict::Forward(fwd)) => match shared.slot(client, &fwd) {
                Err(servfail) => {
                    let _ = sock.send_to(&servfail, from).await;
                }
                Ok(slot) => {
                    let (shared, sock) = (shared.clone(), sock.clone());
                    tokio::spawn(async move {
                        let answer = shared.forward(client, &fwd, Transport::Udp, slot).await;
                        let _ = sock.send_to(&answer, from).await;
                    });
                }
            },
        }
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, from) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(_) => {
                    // Out of descriptors, say: wait a little instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !shared.live.is_live(from.ip()) {
            bump(&shared.counters.refused);
            continue;
        }
        let Ok(slot) = shared.tcp_slots.clone().try_acquire_owned() else {
            bump(&shared.counters.rate_limited);
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            serve_tcp_connection(&shared, stream, from.ip(), stop).await;
            drop(slot);
        });
    }
}

/// One TCP connection: length-prefixed queries (RFC 1035 4.2.2), answered in order, closed after
/// [`TCP_IDLE`] without a complete query, on an oversized one, or on a stop.
async fn serve_tcp_connection(shared: &Shared, mut stream: TcpStream, client: IpAddr, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream, &mut buf)) => match r {
                Ok(Ok(len)) => len,
                Ok(Err(e)) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        bump(&shared.counters.queries);
                        bump(&shared.counters.malformed);
                    }
                    return;
                }
                Err(_) => return,
            },
        };
        let answer = match shared.admit(client, &buf[..len]) {
            None | Some(Verdict::Drop(_)) => return,
            Some(Verdict::Reply(bytes)) => bytes,
            Some(Verdict::Forward(fwd)) => match shared.slot(client, &fwd) {
                Err(servfail) => servfail,
                Ok(slot) => shared.forward(client, &fwd, Transport::Tcp, slot).await,
            },
        };
        // Within TCP_IDLE: a client that stops reading does not hold the connection forever.
        match tokio::time::timeout(TCP_IDLE, write_framed(&mut stream, &answer)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Writes one DNS message over TCP with its two-byte length in front (RFC 1035 4.2.2), in one
/// write: to a client, and to an upstream.
async fn write_framed(stream: &mut (impl AsyncWrite + Unpin), msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await
}

/// Reads one length-prefixed DNS message into `buf` (room for [`MAX_MESSAGE`]) and returns its
/// length; a longer one is `InvalidData`. From a client, and from an upstream.
async fn read_framed(stream: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> io::Result<usize> {
    let len = usize::from(stream.read_u16().await?);
    let Some(msg) = buf.get_mut(..len).filter(|_| len <= MAX_MESSAGE) else {
        return Err(io::Error::from(io::ErrorKind::InvalidData));
    };
    stream.read_exact(msg).await?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_of_a_resolv_conf() {
        let text = "# comment\nsearch lan\nnameserver 198.18.1.2\nnameserver  2001:db8::53 \n\
                    nameserver fe80::1%eth0\nnameserver 0.0.0.0\nnameserver bogus\noptions x\n";
        let got: Vec<String> = nameservers(text).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["198.18.1.2:53", "[2001:db8::53]:53"]);
        assert!(nameservers("").is_empty());
    }

    #[test]
    fn plan_follows_the_config_and_the_hosts_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let conf = |extra: &str| {
            let text = format!("endpoint = \"198.18.0.1:51820\"\n{extra}");
            GatewayConfig::parse(&text, &dir.path().join("gateway.toml")).unwrap()
        };
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 198.18.1.2\nnameserver 100.64.0.1\n").unwrap();
        let plan = ResolverPlan::with_resolv_conf(&conf(""), &resolv).unwrap();
        assert_eq!(plan.listen, vec![IpAddr::from([100, 64, 0, 1])]);
        // The gateway's own tunnel address is never an upstream.
        assert_eq!(plan.upstreams, vec!["198.18.1.2:53".parse().unwrap()]);
        assert_eq!(plan.push().servers, plan.listen);

        let explicit = conf("[dns]\nupstreams = [\"198.18.1.9:5353\"]\nsearch_domains = [\"lan\"]");
        let plan = ResolverPlan::with_resolv_conf(&explicit, &resolv).unwrap();
        assert_eq!(plan.upstreams, vec!["198.18.1.9:5353".parse().unwrap()]);
        assert_eq!(plan.push().search_domains, ["lan"]);

        assert_eq!(ResolverPlan::with_resolv_conf(&conf("[dns]\nenabled = false"), &resolv), None);
        // Nothing usable in resolv.conf (or no file): off, with a warning, not a failure.
        std::fs::write(&resolv, "nameserver 100.64.0.1\n").unwrap();
        assert_eq!(ResolverPlan::with_resolv_conf(&conf(""), &resolv), None);
        assert_eq!(ResolverPlan::with_resolv_conf(&conf(""), &dir.path().join("none")), None);
    }

    // The shell on loopback ("lo" standing in for the TUN device), with a fake upstream. Needs
    // CAP_NET_RAW for SO_BINDTODEVICE: skipped without it.

    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    struct Only(IpAddr);
    impl LiveClients for Only {
        fn is_live(&self, ip: IpAddr) -> bool {
            ip == self.0
        }
    }

    fn query(id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_str("www.example.test.").unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    /// An upstream on loopback answering every query with 198.18.7.7, or saying nothing.
    async fn fake_upstream(answer: bool) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Ok(mut m) = Message::from_vec(&buf[..n]) else { continue };
                if !answer {
                    continue;
                }
                m.metadata.message_type = MessageType::Response;
                let name = m.queries[0].name().clone();
                m.add_answer(Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::new(198, 18, 7, 7)))));
                let _ = sock.send_to(&m.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    fn plan(upstreams: Vec<SocketAddr>) -> ResolverPlan {
        ResolverPlan {
            listen: vec![IpAddr::from([127, 0, 0, 1])],
            upstreams,
            timeout: Duration::from_millis(300),
            rate_limit: 100,
            search_domains: vec![],
        }
    }

    async fn ask(from: &str, to: SocketAddr, wait: Duration) -> Option<Message> {
        let sock = UdpSocket::bind(from).await.unwrap();
        sock.send_to(&query(77), to).await.unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await.ok()?.ok()?;
        Message::from_vec(&buf[..n]).ok()
    }

    fn start(plan: ResolverPlan, live: IpAddr) -> Option<GatewayResolver> {
        match GatewayResolver::start_on_port(plan, "lo", 0, Arc::new(Only(live)), Arc::default()) {
            Ok(r) => Some(r),
            Err(e) if e.not_permitted() => {
                eprintln!("SKIPPED: SO_BINDTODEVICE needs CAP_NET_RAW");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn answers_live_clients_and_nobody_else() {
        let up = fake_upstream(true).await;
        let Some(r) = start(plan(vec![up]), IpAddr::from([127, 0, 0, 1])) else { return };
        let at = r.local[0];
        let m = ask("127.0.0.1:0", at, Duration::from_secs(5)).await.expect("an answer");
        assert_eq!((m.metadata.id, m.metadata.response_code), (77, ResponseCode::NoError));
        assert_eq!(m.answers.len(), 1);
        // TCP, length-prefixed.
        let mut s = TcpStream::connect(at).await.unwrap();
        let q = query(78);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        s.read_exact(&mut buf).await.unwrap();
        // Forwarded over TCP too, where this upstream does not listen: SERVFAIL at once.
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (78, ResponseCode::ServFail));
        // Another source address (not a live session): silence, counted.
        assert!(ask("127.0.0.2:0", at, Duration::from_millis(300)).await.is_none());
        let st = r.stats();
        assert_eq!((st.queries, st.answered, st.servfail, st.refused), (3, 1, 1, 1), "{st}");
        r.stop().await;
    }

    #[tokio::test]
    async fn a_silent_upstream_gives_servfail_within_the_bound() {
        let (silent, answering) = (fake_upstream(false).await, fake_upstream(true).await);
        let Some(r) = start(plan(vec![silent]), IpAddr::from([127, 0, 0, 1])) else { return };
        let t0 = Instant::now();
        let m = ask("127.0.0.1:0", r.local[0], Duration::from_secs(5)).await.expect("an answer");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "{took:?}");
        assert_eq!(r.stats().servfail, 1);
        r.stop().await;
        // A silent first upstream hands over to the next within its share of the time.
        let Some(r) = start(plan(vec![silent, answering]), IpAddr::from([127, 0, 0, 1])) else { return };
        let m = ask("127.0.0.1:0", r.local[0], Duration::from_secs(5)).await.expect("an answer");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        r.stop().await;
    }
}
