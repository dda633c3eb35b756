//! IO pieces the client's and the gateway's data planes share: the TUN device, the UDP socket,
//! the counters and the small helpers of a hot loop (inner-header peeks, rate limits, error
//! backoff). The per-side loops live in `client::dataplane` and `gateway::dataplane`.
//!
//! Nothing here logs per packet. Failures on the data path are counted in [`Counters`] and
//! surfaced by [`Stats`] (the status feed, a stats log line), never as one log line per packet.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::sansio::seal::OpenError;
use crate::sansio::wire;

/// The underlay MTU assumed when none is configured: Ethernet.
pub const DEFAULT_UNDERLAY_MTU: u16 = 1500;

/// Socket buffer size we ask for. Bursts from a TUN (a TCP window's worth of segments) arrive
/// faster than one loop drains them; the default 208 KiB overflows at a few hundred Mbit/s. The
/// kernel caps the request at `net.core.[rw]mem_max` unless we are root (`*BUFFORCE`).
const SOCKET_BUFFER: usize = 4 << 20;

/// Why a packet or datagram was dropped. One counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No session snapshot yet (client), so nothing can be sealed or opened.
    NoSession,
    /// The datagram's header or length is invalid, or a packet is not IPv4 or is empty.
    Malformed,
    /// The tag did not verify: wrong key, tampering, or garbage with a valid-looking header.
    Decrypt,
    /// A replayed, duplicated or too-old counter.
    Replay,
    /// A sealed datagram for a session other than the current one (client), or an
    /// "unknown session" notice for a session we are not on.
    WrongSession,
    /// Gateway: a datagram for a session id it does not know.
    UnknownSession,
    /// Gateway: the inner source address is not the sending session's assigned address.
    Spoofed,
    /// Gateway: no session owns the inner destination address, or it has no endpoint yet.
    NoRoute,
    /// A UDP send or receive failed (ENETUNREACH, EPERM, ECONNREFUSED, ENOBUFS, ...).
    SocketError,
    /// Reading from or writing to the TUN device failed.
    TunError,
    /// The session's send counter is exhausted: it needs a re-authentication.
    CounterExhausted,
    /// The TUN device offered a packet that is not IPv4 (the kernel's own IPv6 chatter): the
    /// tunnel carries IPv4 only.
    NotIpv4,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 12] = [
        DropReason::NoSession,
        DropReason::Malformed,
        DropReason::Decrypt,
        DropReason::Replay,
        DropReason::WrongSession,
        DropReason::UnknownSession,
        DropReason::Spoofed,
        DropReason::NoRoute,
        DropReason::SocketError,
        DropReason::TunError,
        DropReason::CounterExhausted,
        DropReason::NotIpv4,
    ];

    /// Short stable name, for logs and the dashboard.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoSession => "no_session",
            DropReason::Malformed => "malformed",
            DropReason::Decrypt => "decrypt",
            DropReason::Replay => "replay",
            DropReason::WrongSession => "wrong_session",
            DropReason::UnknownSession => "unknown_session",
            DropReason::Spoofed => "spoofed",
            DropReason::NoRoute => "no_route",
            DropReason::SocketError => "socket_error",
            DropReason::TunError => "tun_error",
            DropReason::CounterExhausted => "counter_exhausted",
            DropReason::NotIpv4 => "not_ipv4",
        }
    }

    /// The reason an open failure is counted under.
    pub const fn of_open(e: OpenError) -> DropReason {
        match e {
            OpenError::Malformed(_) | OpenError::NotSealed => DropReason::Malformed,
            OpenError::Decrypt => DropReason::Decrypt,
            OpenError::Replayed(_) => DropReason::Replay,
        }
    }
}

/// The data plane's counters, shared by its loops and read by the status feed. Relaxed atomics:
/// each is an independent tally, read for display.
#[derive(Debug, Default)]
pub struct Counters {
    /// Inner packets received from the peer and written to the TUN device, and their bytes.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Inner packets read from the TUN device, sealed and sent, and their bytes.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub keepalives_tx: AtomicU64,
    pub keepalives_rx: AtomicU64,
    /// "Unknown session" notices sent (gateway) or received (client).
    pub notices_tx: AtomicU64,
    pub notices_rx: AtomicU64,
    /// Nudges handed to the supervisor (client).
    pub nudges: AtomicU64,
    /// Authenticated datagrams that came from a new endpoint (gateway: roaming).
    pub roams: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// How many times each loop started. The spec wants exactly one start each per process.
    pub tx_loop_starts: AtomicU64,
    pub rx_loop_starts: AtomicU64,
    /// Failed attempts to create the TUN device.
    pub tun_failures: AtomicU64,
    /// The TUN device's interface index, 0 until it exists.
    pub tun_ifindex: AtomicU32,
}

/// Adds one to a counter.
#[inline]
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Counts one drop.
    #[inline]
    pub fn count_drop(&self, why: DropReason) {
        bump(&self.drops[why as usize]);
    }

    /// Counts one packet of `len` bytes on a (packets, bytes) pair.
    #[inline]
    pub fn packet(packets: &AtomicU64, bytes: &AtomicU64, len: usize) {
        bump(packets);
        bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// A consistent-enough copy for display (each counter read once).
    pub fn stats(&self) -> Stats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            tx_packets: r(&self.tx_packets),
            tx_bytes: r(&self.tx_bytes),
            keepalives_tx: r(&self.keepalives_tx),
            keepalives_rx: r(&self.keepalives_rx),
            notices_tx: r(&self.notices_tx),
            notices_rx: r(&self.notices_rx),
            nudges: r(&self.nudges),
            roams: r(&self.roams),
            drops: std::array::from_fn(|i| r(&self.drops[i])),
            tx_loop_starts: r(&self.tx_loop_starts),
            rx_loop_starts: r(&self.rx_loop_starts),
            tun_failures: r(&self.tun_failures),
            tun_ifindex: self.tun_ifindex.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub keepalives_tx: u64,
    pub keepalives_rx: u64,
    pub notices_tx: u64,
    pub notices_rx: u64,
    pub nudges: u64,
    pub roams: u64,
    pub drops: [u64; DropReason::ALL.len()],
    pub tx_loop_starts: u64,
    pub rx_loop_starts: u64,
    pub tun_failures: u64,
    pub tun_ifindex: u32,
}

impl Stats {
    /// The count of drops for one reason.
    pub fn dropped(&self, why: DropReason) -> u64 {
        self.drops[why as usize]
    }
}

/// One line, `key=value` pairs, stable so tests and scripts can parse it.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loop_starts=tx:{},rx:{} tun_ifindex={} rx_packets={} rx_bytes={} tx_packets={} \
             tx_bytes={} keepalives_tx={} keepalives_rx={} notices_tx={} notices_rx={} nudges={} \
             roams={} tun_failures={}",
            self.tx_loop_starts,
            self.rx_loop_starts,
            self.tun_ifindex,
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            self.keepalives_tx,
            self.keepalives_rx,
            self.notices_tx,
            self.notices_rx,
            self.nudges,
            self.roams,
            self.tun_failures
        )?;
        for why in DropReason::ALL {
            write!(f, " drop_{}={}", why.name(), self.dropped(why))?;
        }
        Ok(())
    }
}

/// What the TUN device is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunSpec {
    /// Interface name; `None` lets the kernel pick (`tun0`, `tun1`, ...).
    pub name: Option<String>,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u16,
}

/// A TUN device that is up, and what the logs and the status feed show of it.
pub struct Tun {
    pub device: AsyncDevice,
    pub name: String,
    pub ifindex: u32,
    pub mtu: u16,
}

/// The TUN MTU for an underlay MTU: one sealed inner packet fits one underlay IPv4/UDP packet.
pub fn tun_mtu(underlay_mtu: u16) -> Result<u16, TunError> {
    wire::tun_mtu_for(underlay_mtu).ok_or(TunError::UnderlayMtu(underlay_mtu))
}

/// Why a TUN device could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The underlay MTU leaves less than the IPv4 minimum for inner packets.
    #[error("underlay MTU {0} is too small for the tunnel overhead")]
    UnderlayMtu(u16),
    /// The kernel refused (no /dev/net/tun, no CAP_NET_ADMIN, name taken, ...).
    #[error("cannot create TUN device {name} ({address}/{prefix_len}): {source}")]
    Create { name: String, address: Ipv4Addr, prefix_len: u8, source: io::Error },
}

/// Creates, addresses and brings up a TUN device. Blocking ioctls (a few microseconds): fine to
/// call from a task that does nothing else meanwhile.
pub fn create_tun(spec: &TunSpec) -> Result<Tun, TunError> {
    let fail = |source: io::Error| TunError::Create {
        name: spec.name.clone().unwrap_or_else(|| "(kernel-chosen)".into()),
        address: spec.address,
        prefix_len: spec.prefix_len,
        source,
    };
    let mut builder = DeviceBuilder::new().ipv4(spec.address, spec.prefix_len, None).mtu(spec.mtu);
    if let Some(name) = &spec.name {
        builder = builder.name(name.clone());
    }
    let device = builder.build_async().map_err(fail)?;
    let name = device.name().map_err(fail)?;
    let ifindex = device.if_index().map_err(fail)?;
    let mtu = device.mtu().map_err(fail)?;
    Ok(Tun { device, name, ifindex, mtu })
}

/// [`create_tun`], retrying for up to `within` while the name is busy: a device of the same name
/// that its previous owner just closed (a restart) is unregistered by the kernel asynchronously.
pub async fn create_tun_retrying(spec: &TunSpec, within: Duration) -> Result<Tun, TunError> {
    let end = Instant::now() + within;
    loop {
        match create_tun(spec) {
            Err(TunError::Create { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Binds a UDP socket with large buffers. Non-blocking, registered with the current runtime.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer costs throughput, not correctness.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// The largest inner packet a loop's buffer holds. Inner packets are at most the TUN MTU, which
/// is at most 65535; a buffer for the maximum costs 64 KiB once per loop and removes every "what
/// if the MTU changed" case.
pub const MAX_INNER: usize = 65535;

/// One loop's reusable datagram buffer: header room in front, tag room behind.
pub fn datagram_buffer() -> Vec<u8> {
    vec![0u8; wire::OVERHEAD + MAX_INNER]
}

/// Whether `packet` starts like an IPv4 packet (version nibble 4, room for a header).
#[inline]
pub fn is_ipv4(packet: &[u8]) -> bool {
    packet.len() >= 20 && packet[0] >> 4 == 4
}

/// The source and destination of an IPv4 packet, or `None` if it is not one (IPv6, garbage,
/// shorter than a header).
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let h = packet.get(..20)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    Some((src, dst))
}

/// A token bucket: `burst` events at once, refilled at `per_second`. Time is passed in, so tests
/// drive it without a clock.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimit {
    pub fn new(per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { per_second, burst, tokens: burst, last: None }
    }

    /// At most one event per `interval` (a bucket of one).
    pub fn every(interval: Duration) -> Self {
        let per_second =
            if interval.is_zero() { f64::INFINITY } else { 1.0 / interval.as_secs_f64() };
        Self::new(per_second, 1)
    }

    /// Whether an event may happen at `now`; takes a token if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Doubling delay for a loop whose IO keeps failing, so a persistent error (a deleted device, a
/// socket in a bad state) costs a few wake-ups per second instead of a spinning core.
#[derive(Debug, Clone)]
pub struct ErrorBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// Consecutive failures; the first few retry at once (a transient ENOBUFS, say).
    streak: u32,
}

impl ErrorBackoff {
    /// Failures retried immediately before the backoff starts.
    const FREE_RETRIES: u32 = 8;

    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min, streak: 0 }
    }

    /// Call after a success.
    pub fn reset(&mut self) {
        self.streak = 0;
        self.next = self.min;
    }

    /// Call after a failure; returns how long to wait before the next attempt (zero at first).
    pub fn failed(&mut self) -> Duration {
        self.streak = self.streak.saturating_add(1);
        if self.streak <= Self::FREE_RETRIES {
            return Duration::ZERO;
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// Resolves when a stop was requested (or the stop sender is gone). The `Ref` that `wait_for`
/// returns is not `Send`, so it must not live across the caller's `select!`.
pub async fn stop_requested(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Sleeps for `d`, without touching the timer when `d` is zero.
pub async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// The environment variable that turns the data plane off (`HOLDFAST_DATAPLANE=off`): the
/// binary then runs the control plane only, creating no TUN device, socket or NAT rule. For
/// tests that run on the machine's own loopback, where a TUN device would change the machine's
/// routes, and for debugging the control plane alone.
pub const DISABLE_ENV: &str = "HOLDFAST_DATAPLANE";

/// Whether [`DISABLE_ENV`] turns the data plane off.
pub fn disabled_by_env() -> bool {
    std::env::var(DISABLE_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

/// Logs `what`'s counters (one info line) on every SIGUSR1, for operators and tests: the data
/// plane never logs per packet, so this is how its drop counts are read from outside. Runs until
/// the process ends; without a signal handler it does nothing.
pub async fn log_stats_on_sigusr1(what: &'static str, counters: std::sync::Arc<Counters>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        tracing::debug!("no SIGUSR1 handler: {what} counters are not dumped on demand");
        return;
    };
    while usr1.recv().await.is_some() {
        tracing::info!(target: "holdfast::dataplane", "{what} stats: {}", counters.stats());
    }
}

/// Describes a failing socket operation for the one log line it may get: the errno name when
/// there is one (what an operator greps for), else the error text.
pub fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => "ENETUNREACH (network unreachable)".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH (host unreachable)".into(),
        Some(libc::EPERM) => "EPERM (refused by a firewall rule)".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED (port unreachable)".into(),
        Some(libc::ENOBUFS) => "ENOBUFS (queue full)".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_burst_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10.0, 3);
        assert!(r.allow(t0) && r.allow(t0) && r.allow(t0));
        assert!(!r.allow(t0));
        assert!(!r.allow(t0 + Duration::from_millis(50)));
        assert!(r.allow(t0 + Duration::from_millis(160)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| r.allow(later)));
        assert!(!r.allow(later));
    }

    #[test]
    fn rate_limit_every_spaces_events() {
        let t0 = Instant::now();
        let mut r = RateLimit::every(Duration::from_secs(1));
        assert!(r.allow(t0));
        assert!(!r.allow(t0 + Duration::from_millis(999)));
        assert!(r.allow(t0 + Duration::from_millis(2000)));
    }

    #[test]
    fn error_backoff_retries_free_then_doubles_to_cap_and_resets() {
        let mut b = ErrorBackoff::new(Duration::from_millis(10), Duration::from_millis(40));
        for _ in 0..ErrorBackoff::FREE_RETRIES {
            assert_eq!(b.failed(), Duration::ZERO);
        }
        let waits: Vec<_> = (0..4).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 40]);
        b.reset();
        assert_eq!(b.failed(), Duration::ZERO);
    }

    #[test]
    fn ipv4_addrs_reads_only_ipv4_headers() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[100, 64, 0, 1]);
        assert_eq!(
            ipv4_addrs(&p),
            Some((Ipv4Addr::new(100, 64, 0, 2), Ipv4Addr::new(100, 64, 0, 1)))
        );
        assert_eq!(ipv4_addrs(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_addrs(&p), None);
        assert_eq!(ipv4_addrs(&[]), None);
    }

    #[test]
    fn stats_line_names_every_drop_reason_once() {
        let c = Counters::default();
        c.count_drop(DropReason::Replay);
        c.count_drop(DropReason::Replay);
        let s = c.stats();
        assert_eq!(s.dropped(DropReason::Replay), 2);
        let line = s.to_string();
        for why in DropReason::ALL {
            assert_eq!(line.matches(&format!(" drop_{}=", why.name())).count(), 1, "{line}");
        }
        assert!(line.contains("drop_replay=2"), "{line}");
        assert!(line.starts_with("loop_starts=tx:0,rx:0 "), "{line}");
    }

    #[test]
    fn drop_indices_match_all() {
        for (i, d) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
    }
}
