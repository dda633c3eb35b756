//! The gateway's data plane: one TUN device (the gateway's tunnel address), one UDP socket (the
//! control plane's port number), one engine for both directions started once (on a thread of its
//! own, see `engine`), and the outbound NAT rule.
//!
//! From clients (UDP -> TUN): parse the header, find the session by id (lock-free, through
//! [`SessionLookup`]), check the replay window, open, check that the inner source is the
//! session's assigned address (no spoofing). Only then does the session's endpoint follow the
//! packet's source (roaming, from authenticated, non-replayed packets only) and its last-seen
//! time move. Then deliver: to the TUN device, or straight to another client when the
//! destination is another session's address (re-sealed in place, no copy, and no dependence on
//! the host's IP forwarding). A datagram for an unknown session id gets a small, rate-limited
//! "unknown session" notice back.
//!
//! To clients (TUN -> UDP): route by inner destination to the session that owns the address,
//! seal with that session's counter, send to its last authenticated endpoint.
//!
//! Per-session state the loops need ([`DataSession`]: cipher, counter, window, endpoint,
//! last-seen) lives in the session table's entries, not in the loops; the loops hold buffers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ControlPlane;
use super::sessions::{Changes, Clock, Session, SessionTable};
use crate::config::gateway::{GatewayConfig, Tunnel6};
use crate::flood::{self, ShedCounters};
use crate::packet_thread::Wakeup;
use crate::sansio::filter::Side;
use crate::sansio::inner::IpFamily;
use crate::sansio::seal::SealError;
use crate::sansio::wire;
use crate::snapshot::{SessionCrypto, SessionId, SessionKey};
use crate::tunnel::{self, Counters, DropReason, Stats, TunSpec, bump};

const TARGET: &str = "holdfast::gateway::dataplane";

mod engine;

/// The engine thread's name (shown by `top -H`, read by `benches/hops.sh`).
pub const ENGINE_THREAD: &str = "hf-gw-pkts";

/// "Unknown session" notices: sustained rate and burst, for the whole gateway. After a restart
/// every active client triggers one; clients that miss theirs still recover through their own
/// periodic health check. A notice (20 bytes) is smaller than any datagram that triggers it
/// (at least 36), so it cannot amplify a spoofed flood.
const NOTICES_PER_SECOND: f64 = 100.0;
const NOTICE_BURST: u32 = 200;

/// Probe acks, for the whole gateway: a client's search sends one probe per round trip at most
/// and a few dozen per search, so this only bounds what misbehaving (authenticated) clients can
/// make the gateway send, padded acks included.
const ACKS_PER_SECOND: f64 = 500.0;
const ACK_BURST: u32 = 100;

/// How long start-up waits for a TUN name still held by a previous gateway's device.
const TUN_BUSY_WAIT: Duration = Duration::from_secs(3);

/// The nftables table holding the NAT rule; the gateway owns it whole, so removal is one command.
pub const NAT_TABLE: &str = "holdfast_nat";

/// One session as the data plane sees it. The session table creates one per Authenticate and
/// keeps it (in an `Arc`) in its lock-free indexes by id and by assigned address.
#[derive(Debug)]
pub struct DataSession {
    pub session_id: SessionId,
    pub assigned_ip: Ipv4Addr,
    /// The client's IPv6 tunnel address, if its session has one.
    pub assigned_ip6: Option<Ipv6Addr>,
    /// Cipher, the gateway-to-client counter and the client-to-gateway replay window.
    pub crypto: SessionCrypto,
    /// The client takes Data with a partial inner TCP checksum
    /// ([`crate::sansio::wire::FLAG_CSUM_PARTIAL`]); without, the gateway finishes each one.
    pub partial_checksums: bool,
    /// Where the client was last seen; written by the receive loop only.
    path: SessionPath,
    /// This session's own traffic and drops (`gateway status`), bumped by the loops beside the
    /// gateway-wide counters: relaxed atomics, no lock and no allocation per packet. `rx` counts
    /// inner packets received from the client and delivered, `tx` those sent to it.
    pub traffic: Counters,
}

impl DataSession {
    pub fn new(session_id: SessionId, assigned_ip: Ipv4Addr, key: &SessionKey) -> Self {
        Self {
            session_id,
            assigned_ip,
            assigned_ip6: None,
            crypto: SessionCrypto::new(key),
            partial_checksums: false,
            path: SessionPath::default(),
            traffic: Counters::default(),
        }
    }

    /// The same session for a client that takes partial checksums (or not).
    pub fn with_partial_checksums(mut self, on: bool) -> Self {
        self.partial_checksums = on;
        self
    }

    /// The same session with an IPv6 tunnel address too.
    pub fn with_ip6(mut self, ip6: Option<Ipv6Addr>) -> Self {
        self.assigned_ip6 = ip6;
        self
    }

    /// Whether `ip` is one of this session's tunnel addresses: the anti-spoofing check, for
    /// either family.
    #[inline]
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4 == self.assigned_ip,
            IpAddr::V6(v6) => Some(v6) == self.assigned_ip6,
        }
    }

    /// Counts a drop of this session's packet, on the session and on the gateway.
    #[inline]
    fn drop_packet(&self, c: &Counters, why: DropReason) {
        c.count_drop(why);
        self.traffic.count_drop(why);
    }

    /// The client's last authenticated UDP endpoint, if it has sent anything yet.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.path.endpoint.load().as_deref().copied()
    }

    /// When the last authenticated datagram of this session arrived.
    pub fn last_seen(&self) -> Option<Instant> {
        match self.path.last_seen_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch() + Duration::from_millis(ms - 1)),
        }
    }

    /// The largest inner packet the path to this client carries, as its probes report it (what
    /// the to-clients loop answers "too big" with, when smaller than the TUN MTU).
    pub fn path_mtu(&self) -> Option<u16> {
        match self.path.down_ok.load(Ordering::Relaxed) {
            0 => None,
            d => Some(d.saturating_sub(wire::OVERHEAD as u16)),
        }
    }

    /// The largest inner packet that may be sent to this client, given the TUN's `mtu`.
    #[inline]
    fn mtu_within(&self, mtu: u16) -> u16 {
        self.path_mtu().map_or(mtu, |p| p.min(mtu))
    }

    /// Records what the client's probe says fits the path to it (`down_ok`, datagram bytes; 0:
    /// unknown). Returns the old and the new value if it changed (0 is never stored over a
    /// known value). Bounded below: a datagram shorter than a minimal probe ack cannot be what
    /// got through, and the tunnel is never sized below IPv4's 576-byte minimum.
    fn set_down_ok(&self, down_ok: u16) -> Option<(u16, u16)> {
        if down_ok == 0 {
            return None;
        }
        let v = down_ok.max(wire::MIN_INNER_MTU + wire::OVERHEAD as u16);
        let before = self.path.down_ok.swap(v, Ordering::Relaxed);
        (before != v).then_some((before, v))
    }

    /// Records an authenticated datagram from `from` at `now`. Returns whether the endpoint
    /// changed (a roam: the session's first endpoint is not one) and whether the session is due
    /// for a [`SessionLookup::touch`].
    fn seen(&self, from: SocketAddr, now: Instant) -> Seen {
        // Stored +1 so that 0 can mean "never".
        let ms = now.saturating_duration_since(epoch()).as_millis() as u64 + 1;
        self.path.last_seen_ms.store(ms, Ordering::Relaxed);
        let touched = self.path.touched_ms.load(Ordering::Relaxed);
        let touch = (touched == 0 || ms.saturating_sub(touched) >= TOUCH_EVERY.as_millis() as u64)
            && self.path.touched_ms.compare_exchange(touched, ms, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        let before = self.path.endpoint.load().as_deref().copied();
        if before == Some(from) {
            return Seen { roamed: false, touch, family_changed: false };
        }
        // Allocates, but only when the endpoint changes (roaming), never per packet.
        self.path.endpoint.store(Some(Arc::new(from)));
        let family_changed = before.is_some_and(|b| b.is_ipv4() != from.is_ipv4());
        Seen { roamed: before.is_some(), touch, family_changed }
    }
}

/// What [`DataSession::seen`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    roamed: bool,
    touch: bool,
    /// The new endpoint is of the other IP family than the previous one.
    family_changed: bool,
}

#[derive(Debug, Default)]
struct SessionPath {
    endpoint: ArcSwapOption<SocketAddr>,
    /// Milliseconds since [`epoch`] plus one; 0 = never.
    last_seen_ms: AtomicU64,
    /// When the session table was last told the session is in use (same scale).
    touched_ms: AtomicU64,
    /// The largest datagram (UDP payload bytes) the path to the client carries, as its probes
    /// report it; 0: unknown (no probe yet), the gateway's own link decides.
    down_ok: AtomicU16,
}

/// The time base of `last_seen` (the first call; any fixed instant would do).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The session table as the data plane needs it: two lookups that never block on a writer (an
/// Authenticate in progress must not stall packets).
pub trait SessionLookup: Send + Sync + 'static {
    /// The session with this id, if it may carry traffic now, and for how long from now that
    /// answer holds while [`SessionLookup::changes`] does not move (zero: ask again next time).
    fn by_id_held(&self, id: SessionId) -> Option<(Arc<DataSession>, Duration)>;
    /// The session that carries traffic to this tunnel address (IPv4 or IPv6): its client's
    /// newest, or the one before it while the client has not used the newest yet; with how long
    /// the answer holds, as [`SessionLookup::by_id_held`].
    fn by_ip_held(&self, ip: IpAddr) -> Option<(Arc<DataSession>, Duration)>;
    /// [`SessionLookup::by_id_held`] without the hold.
    fn by_id(&self, id: SessionId) -> Option<Arc<DataSession>> {
        self.by_id_held(id).map(|(s, _)| s)
    }
    /// [`SessionLookup::by_ip_held`] without the hold.
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<DataSession>> {
        self.by_ip_held(ip).map(|(s, _)| s)
    }
    /// The session carried authenticated traffic just now (so it is not idle). Called at most
    /// once per [`TOUCH_EVERY`] per session.
    fn touch(&self, _session: &DataSession) {}
    /// The table's change count; `None` if it keeps none (then no answer is held).
    fn changes(&self) -> Option<Changes> {
        None
    }
    /// Puts the ids of every session that may carry traffic now into `out` and returns true;
    /// false if this table cannot say (then no flood-time filter narrows traffic to them).
    fn live_ids(&self, _out: &mut Vec<SessionId>) -> bool {
        false
    }
}

/// How often the data plane reports a busy session as used (see [`SessionLookup::touch`]): often
/// enough for idle timeouts of seconds, rarely enough to cost nothing per packet.
pub const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// The longest a looked-up session is held without asking the table again, however long it
/// stays valid: limits changed on SIGHUP move no [`Changes`], and apply within this (as the
/// housekeeping's prune does, every second).
pub const HOLD_AT_MOST: Duration = Duration::from_secs(1);

/// The sessions the engine looked up last, by id (a datagram's) and by tunnel address (a TUN
/// packet's), held while the table has not changed and they stay valid.
///
/// Why: a lone packet after a quiet spell meets a cold CPU, where cost follows the memory
/// touched; the table's lookups (two atomic loads and two hash maps per direction) took about
/// 8 µs of the gateway's 22 µs from receive to TUN write in timestamp probes (README, "Ping,
/// session 21"). Held, a lookup reads the engine's own memory, the change count and the session.
/// A held session outlives its removal from the table by at most the engine's next lookup, as
/// the table's data map keeps it until its next sweep.
#[derive(Default)]
pub(super) struct Recent {
    changes: Option<Changes>,
    by_id: Option<Held<SessionId>>,
    by_ip: Option<Held<IpAddr>>,
}

struct Held<K> {
    key: K,
    /// The change count read before the lookup that found it.
    count: u64,
    until: Instant,
    session: Arc<DataSession>,
}

impl Recent {
    pub(super) fn new(sessions: &dyn SessionLookup) -> Self {
        Self { changes: sessions.changes(), ..Self::default() }
    }

    /// The session with this id (as [`SessionLookup::by_id`]) at `now`.
    pub(super) fn by_id(
        &mut self,
        sessions: &dyn SessionLookup,
        id: SessionId,
        now: Instant,
    ) -> Option<Arc<DataSession>> {
        held(&mut self.by_id, self.changes.as_ref(), id, now, || sessions.by_id_held(id))
    }

    /// The session that carries traffic to `ip` (as [`SessionLookup::by_ip`]) at `now`.
    pub(super) fn by_ip(&mut self, sessions: &dyn SessionLookup, ip: IpAddr, now: Instant) -> Option<Arc<DataSession>> {
        held(&mut self.by_ip, self.changes.as_ref(), ip, now, || sessions.by_ip_held(ip))
    }
}

/// The held answer for `key` if it still holds, else `ask`'s, held in `slot` as long as it says.
fn held<K: Copy + PartialEq>(
    slot: &mut Option<Held<K>>,
    changes: Option<&Changes>,
    key: K,
    now: Instant,
    ask: impl FnOnce() -> Option<(Arc<DataSession>, Duration)>,
) -> Option<Arc<DataSession>> {
    let Some(changes) = changes else { return ask().map(|(s, _)| s) };
    // Read before asking: a change during the lookup leaves the answer held under the old count,
    // so the next lookup asks again.
    let count = changes.count();
    if let Some(h) = slot.as_ref()
        && h.key == key
        && h.count == count
        && now < h.until
    {
        return Some(h.session.clone());
    }
    let found = ask();
    *slot = match &found {
        Some((session, hold)) if !hold.is_zero() => {
            Some(Held { key, count, until: now + *hold, session: session.clone() })
        }
        _ => None,
    };
    found.map(|(s, _)| s)
}

/// The control plane's [`SessionTable`] seen through [`SessionLookup`].
///
/// The table's sessions hold the key; the data plane's per-session state (expanded cipher,
/// counter, replay window, endpoint) is kept beside them in a map with the same shape as the
/// table (an immutable map behind an `ArcSwap`): readers do one atomic load and a hash lookup and
/// never wait; an entry is built once per session, on its first packet, under a mutex only
/// writers take, and entries of sessions the table dropped are swept at that moment.
pub struct ControlSessions {
    table: Arc<SessionTable>,
    clock: Clock,
    data: ArcSwap<HashMap<SessionId, Arc<DataSession>>>,
    writer: Mutex<()>,
}

impl ControlSessions {
    pub fn new(table: Arc<SessionTable>, clock: Clock) -> Self {
        Self { table, clock, data: ArcSwap::default(), writer: Mutex::new(()) }
    }

    /// On the control plane's session table and clock.
    pub fn of(control: &ControlPlane) -> Self {
        Self::new(control.sessions(), control.clock())
    }

    /// The data-plane state of session `id` if the data plane has built it (its first packet
    /// came), for observers: one atomic load and a lookup, never creates one.
    pub fn existing(&self, id: SessionId) -> Option<Arc<DataSession>> {
        self.data.load().get(&id).cloned()
    }

    /// The data-plane state of `s`, if `s` may carry traffic now, and for how long it may be
    /// held (until it would expire unused, one millisecond early for the clocks' rounding, and
    /// at most [`HOLD_AT_MOST`]).
    fn data_for(&self, s: &Session) -> Option<(Arc<DataSession>, Duration)> {
        // Expired but not yet pruned (housekeeping runs every second): no traffic.
        let now = self.clock.now();
        let until = self.table.valid_until(s, now).ok()?;
        let hold = Duration::from_millis((until - now).saturating_sub(1)).min(HOLD_AT_MOST);
        Some((self.data_of(s)?, hold))
    }

    /// The data-plane state of `s`, built on its first use.
    fn data_of(&self, s: &Session) -> Option<Arc<DataSession>> {
        if let Some(d) = self.data.load().get(&s.id) {
            return Some(d.clone());
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.data.load_full();
        if let Some(d) = current.get(&s.id) {
            return Some(d.clone());
        }
        let mut next: HashMap<_, _> =
            current.iter().filter(|(id, _)| self.table.get(**id).is_some()).map(|(id, d)| (*id, d.clone())).collect();
        let d = Arc::new(
            DataSession::new(s.id, s.assigned_ip, &s.key)
                .with_ip6(s.assigned_ip6)
                .with_partial_checksums(s.partial_checksums),
        );
        next.insert(s.id, d.clone());
        self.data.store(Arc::new(next));
        Some(d)
    }
}

impl SessionLookup for ControlSessions {
    fn by_id_held(&self, id: SessionId) -> Option<(Arc<DataSession>, Duration)> {
        self.data_for(&*self.table.get(id)?)
    }

    fn by_ip_held(&self, ip: IpAddr) -> Option<(Arc<DataSession>, Duration)> {
        let newest = self.data_for(&*self.table.get_by_ip(ip)?);
        if newest.as_ref().is_some_and(|(d, _)| d.endpoint().is_some()) {
            return newest;
        }
        // Make-before-break for the downlink: right after a re-auth the client may still be on
        // its previous session and has not sent on the new one, so the gateway does not know
        // where it is on it. Until it does, the previous session (in its grace period) carries
        // the client's traffic; the client announces a new session at once, so this lasts a
        // round trip.
        let previous = self.table.previous_by_ip(ip).and_then(|s| self.data_for(&s));
        // Neither answer is held: the newest session takes over when its client first sends on
        // it, which changes no table.
        match previous {
            Some((p, _)) if p.endpoint().is_some() => Some((p, Duration::ZERO)),
            _ => newest.map(|(d, _)| (d, Duration::ZERO)),
        }
    }

    fn changes(&self) -> Option<Changes> {
        Some(self.table.changes())
    }

    fn touch(&self, session: &DataSession) {
        if let Some(s) = self.table.get(session.session_id) {
            s.touch(self.clock.now());
        }
    }

    fn live_ids(&self, out: &mut Vec<SessionId>) -> bool {
        let now = self.clock.now();
        out.extend(self.table.all().iter().filter(|s| self.table.validity(s, now).is_ok()).map(|s| s.id));
        true
    }
}

/// Settings of the gateway data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayDataPlaneConfig {
    /// Where the UDP socket binds: the control plane's listen address (same port number).
    pub listen: SocketAddr,
    /// The tunnel subnet and the gateway's address in it.
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    /// The IPv6 tunnel subnet and the gateway's address in it, if the gateway has IPv6.
    pub v6: Option<Tunnel6>,
    /// The TUN device's name; `None` lets the kernel choose.
    pub tun_name: Option<String>,
    pub underlay_mtu: u16,
    /// Masquerade the tunnel subnet out of this interface (`[nat]`), or no NAT.
    pub nat_uplink: Option<String>,
    /// TUN offload (TSO): 64 KiB reads, split in user space, instead of one packet per read.
    pub offload: bool,
    /// Merge consecutive TCP segments into large packets when writing to the TUN device (GRO
    /// in user space, see [`tunnel::TunWriter`]); needs `offload`. On by default: the kernel's
    /// receive path then runs once per burst instead of once per segment.
    pub coalesce_writes: bool,
}

/// The IPv6 plan this gateway serves: `subnet6` from gateway.toml, unless IPv6 is disabled on
/// the host, where the kernel would refuse the TUN device's IPv6 address. Then clients get
/// IPv4-only sessions, as from a gateway without `subnet6`, while the registry (still checked
/// against `subnet6`) keeps their IPv6 addresses for when IPv6 is back. The one place that
/// decides it: the control service and the data plane both ask here.
pub fn served_v6(config: &GatewayConfig) -> Option<Tunnel6> {
    config.v6.filter(|_| !tunnel::ipv6_disabled())
}

impl GatewayDataPlaneConfig {
    /// From `gateway.toml`: the UDP socket on the control plane's listen address, the TUN on the
    /// gateway's tunnel address, NAT on `[nat] uplink` when `[nat] enabled`.
    pub fn from_config(config: &GatewayConfig) -> Self {
        Self {
            listen: config.listen,
            subnet: config.subnet,
            gateway_ip: config.gateway_ip,
            v6: served_v6(config),
            tun_name: None,
            underlay_mtu: tunnel::DEFAULT_UNDERLAY_MTU,
            nat_uplink: config.nat.enabled.then(|| config.nat.uplink.clone()),
            offload: config.dataplane.offload,
            coalesce_writes: config.dataplane.coalesce_writes,
        }
    }
}

impl GatewayDataPlaneConfig {
    /// Whether `dst` is a client's tunnel address (in a tunnel subnet, not the gateway's own):
    /// the only destinations worth a session lookup.
    #[inline]
    fn is_client_address(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(ip) => ip != self.gateway_ip && self.subnet.contains(&ip),
            IpAddr::V6(ip) => self.v6.is_some_and(|v6| ip != v6.gateway_ip && v6.subnet.contains(&ip)),
        }
    }
}

/// Why the gateway's data plane could not start. All are start-up failures of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayDataPlaneError {
    #[error(transparent)]
    Tun(#[from] tunnel::TunError),
    #[error("cannot bind the data-plane UDP socket on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot install the NAT rule on {uplink}: {reason}")]
    Nat { uplink: String, reason: String },
    #[error("cannot start the data plane's packet thread: {0}")]
    Thread(std::io::Error),
}

impl GatewayDataPlaneError {
    /// Whether the cause is a missing privilege (CAP_NET_ADMIN for the TUN device or the NAT
    /// rule, or a privileged port), which the binary reports with its own exit code.
    pub fn not_permitted(&self) -> bool {
        match self {
            Self::Tun(tunnel::TunError::Create { source, .. }) | Self::Bind { source, .. } => {
                source.kind() == std::io::ErrorKind::PermissionDenied
            }
            _ => false,
        }
    }
}

/// Starts the data plane of `gateway run`: configured from `gateway.toml`, on the control
/// plane's session table and clock. Also logs the counters on SIGUSR1.
pub async fn start_for(
    config: &GatewayConfig,
    sessions: Arc<ControlSessions>,
) -> Result<GatewayDataPlane, GatewayDataPlaneError> {
    let data = GatewayDataPlane::start(GatewayDataPlaneConfig::from_config(config), sessions).await?;
    tokio::spawn(tunnel::log_stats_on_sigusr1("gateway data plane", data.counters()));
    Ok(data)
}

/// A running gateway data plane. [`GatewayDataPlane::stop`] ends it and removes the NAT rule.
pub struct GatewayDataPlane {
    counters: Arc<Counters>,
    shedding: Arc<ShedCounters>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    nat: Option<Nat>,
    /// The engine's thread (see [`engine`]); it ends with the data plane.
    engine: Option<std::thread::JoinHandle<()>>,
    /// Rung on a stop: the engine waits on nothing else that says so.
    wakeup: Arc<Wakeup>,
    pub tun_name: String,
    pub local: SocketAddr,
}

impl GatewayDataPlane {
    /// Creates the TUN device and the socket, installs the NAT rule if configured, and starts the
    /// loops. Must run inside a tokio runtime.
    pub async fn start(
        cfg: GatewayDataPlaneConfig,
        sessions: Arc<dyn SessionLookup>,
    ) -> Result<Self, GatewayDataPlaneError> {
        // A dual-stack socket carries IPv6 clients too: size the tunnel for the costlier family.
        let underlay = IpFamily::of_addr(cfg.listen.ip());
        let spec = TunSpec {
            name: cfg.tun_name.clone(),
            address: cfg.gateway_ip,
            prefix_len: cfg.subnet.prefix_len(),
            address6: cfg.v6.map(|v6| (v6.gateway_ip, v6.subnet.prefix_len())),
            mtu: tunnel::tun_mtu(cfg.underlay_mtu, underlay)?,
            offload: cfg.offload,
        };
        let tun = tunnel::create_tun_retrying(&spec, TUN_BUSY_WAIT).await?;
        let sock =
            tunnel::bind_udp(cfg.listen).map_err(|source| GatewayDataPlaneError::Bind { addr: cfg.listen, source })?;
        let local = sock.local_addr().unwrap_or(cfg.listen);
        let nat = match &cfg.nat_uplink {
            Some(uplink) => Some(
                Nat::install(cfg.subnet, cfg.v6.map(|v6| v6.subnet), uplink)
                    .await
                    .map_err(|reason| GatewayDataPlaneError::Nat { uplink: uplink.clone(), reason })?,
            ),
            None => None,
        };
        let counters = Arc::new(Counters::default());
        counters.tun_ifindex.store(tun.ifindex, Ordering::Relaxed);
        tracing::info!(
            target: TARGET,
            "data plane up: tun {} (ifindex {}, {}/{}{}, mtu {}), UDP {local}{}; AES-GCM: {}",
            tun.name,
            tun.ifindex,
            cfg.gateway_ip,
            cfg.subnet.prefix_len(),
            cfg.v6.map(|v6| format!(" and {}/{}", v6.gateway_ip, v6.subnet.prefix_len())).unwrap_or_default(),
            tun.mtu,
            match (&cfg.nat_uplink, cfg.v6) {
                (Some(u), Some(v6)) => format!(", NAT {} and {} -> {u}", cfg.subnet, v6.subnet),
                (Some(u), None) => format!(", NAT {} -> {u}", cfg.subnet),
                (None, _) => String::new(),
            },
            crate::sansio::aead::Backend::for_this_cpu().name(),
        );
        let (stop, _) = watch::channel(false);
        let device = Arc::new(tun.device);
        // DF on every datagram, whatever the kernel cached: a probe ack must test the path, not
        // be fragmented (which would confirm a size the path does not carry). What fits each
        // client comes from its probes (see `answer_probe`). No error queue here: a hint could
        // not be told apart per session cheaply, and the client's probes find the same.
        if let Err(e) = tunnel::set_path_mtu_probing(&sock, false) {
            tracing::warn!(target: TARGET, "cannot set path MTU probing on the data-plane socket ({e}): probe acks may be fragmented");
        }
        let sock = Arc::new(sock);
        let gro = tunnel::enable_udp_gro(&sock);
        if !gro {
            tracing::debug!(target: TARGET, "no UDP GRO on this kernel: one datagram per receive");
        }
        let shedding = flood::guard_socket(&*sock, Side::Gateway, gro);
        let table = sessions.clone();
        let live_ids = move |out: &mut Vec<SessionId>| table.live_ids(out);
        let ctx = Arc::new(Loops { cfg, sessions, counters: counters.clone(), shedding: shedding.clone() });
        let wakeup = Arc::new(Wakeup::new().map_err(GatewayDataPlaneError::Thread)?);
        let engine = engine::Engine::new(ctx, device, sock, wakeup.clone(), stop.subscribe(), tun.mtu)
            .map_err(GatewayDataPlaneError::Thread)?;
        // The thread inherits the caller's network namespace, like the descriptors it uses.
        let engine = std::thread::Builder::new()
            .name(ENGINE_THREAD.into())
            .spawn(move || engine.run())
            .map_err(GatewayDataPlaneError::Thread)?;
        let tasks = vec![tokio::spawn(flood::watch(shedding.clone(), live_ids, stop.subscribe()))];
        Ok(Self { counters, shedding, stop, tasks, nat, engine: Some(engine), wakeup, tun_name: tun.name, local })
    }

    pub fn stats(&self) -> Stats {
        self.counters.stats()
    }

    /// The live counters, for a status feed that outlives a borrow of the data plane.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// What the socket filter and the per-source budgets shed (see [`crate::flood`]).
    pub fn shedding(&self) -> Arc<ShedCounters> {
        self.shedding.clone()
    }

    /// Ends the engine, removes the NAT rule and the TUN device.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        self.wakeup.ring();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(engine) = self.engine.take() {
            let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        }
        if let Some(nat) = self.nat.take() {
            nat.remove().await;
        }
        tracing::info!(target: TARGET, "data plane stopped; {}", self.counters.stats());
    }
}

impl Drop for GatewayDataPlane {
    /// A data plane dropped without [`GatewayDataPlane::stop`] (a failed start further on, a test)
    /// still ends its engine: woken, it finds the stop (or its sender gone) and returns, closing
    /// the TUN device and the socket. Nothing here waits for it.
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.wakeup.ring();
    }
}

/// What both directions of the engine share.
struct Loops {
    cfg: GatewayDataPlaneConfig,
    sessions: Arc<dyn SessionLookup>,
    counters: Arc<Counters>,
    shedding: Arc<ShedCounters>,
}

/// Moves the session's endpoint and last-seen after an authenticated, non-replayed datagram.
fn note_seen(sessions: &dyn SessionLookup, session: &DataSession, from: SocketAddr, now: Instant, c: &Counters) {
    let seen = session.seen(from, now);
    if seen.touch {
        sessions.touch(session);
    }
    if seen.family_changed {
        // Roaming between an IPv4 and an IPv6 underlay is not a supported setup (a client keeps
        // one gateway address); it works as any roam does, and is said once per change.
        tracing::info!(target: TARGET, "session {} changed underlay family: now at {from}", session.session_id);
    }
    if seen.roamed {
        bump(&c.roams);
        // One line per endpoint change of a session: bounded by what the client does.
        tracing::debug!(target: TARGET, "session {} now at {from}", session.session_id);
    }
}

fn seal_drop(e: SealError) -> DropReason {
    match e {
        SealError::CounterExhausted => DropReason::CounterExhausted,
        // A TUN read is bounded by its slot, so the datagram always fits; counted, not assumed.
        SealError::BufferTooSmall => DropReason::Malformed,
    }
}

/// The outbound NAT rule: one nftables table the gateway owns, so that install is idempotent (a
/// gateway killed with SIGKILL left it behind) and removal cannot touch anyone else's rules.
struct Nat;

impl Nat {
    async fn install(subnet: Ipv4Net, subnet6: Option<ipnet::Ipv6Net>, uplink: &str) -> Result<Nat, String> {
        if !uplink.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.@".contains(ch)) || uplink.is_empty() {
            return Err(format!("invalid interface name {uplink:?}"));
        }
        // `table` then `delete table` makes the delete succeed whether or not it existed; the
        // whole script is one atomic nftables transaction. One `inet` table masquerades both
        // families (NAT66 for the IPv6 subnet); the `ip` one is what releases before IPv6
        // installed, removed in case a killed one left it behind.
        let nat66 =
            subnet6.map(|s6| format!("\t\tip6 saddr {s6} oifname \"{uplink}\" masquerade\n")).unwrap_or_default();
        let script = format!(
            "table ip {NAT_TABLE}\n\
             delete table ip {NAT_TABLE}\n\
             table inet {NAT_TABLE}\n\
             delete table inet {NAT_TABLE}\n\
             table inet {NAT_TABLE} {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} oifname \"{uplink}\" masquerade\n\
             {nat66}\
             \t}}\n\
             }}\n"
        );
        nft(&script).await?;
        if subnet6.is_some()
            && std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").is_ok_and(|v| v.trim() == "0")
        {
            tracing::warn!(
                target: TARGET,
                "NAT is on but IPv6 forwarding is off (net.ipv6.conf.all.forwarding = 0): clients' IPv6 will not reach beyond the gateway"
            );
        }
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                target: TARGET,
                "NAT is on but IP forwarding is off (net.ipv4.ip_forward = 0): clients will not reach beyond the gateway"
            );
        }
        Ok(Nat)
    }

    async fn remove(self) {
        if let Err(e) = nft(&format!("delete table inet {NAT_TABLE}\n")).await {
            tracing::warn!(target: TARGET, "could not remove the NAT rule: {e}");
        }
    }
}

/// Runs `nft -f -` with `script`.
async fn nft(script: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await.map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child.wait_with_output().await.map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_tracks_endpoint_changes_and_last_seen() {
        let s = DataSession::new(SessionId(7), Ipv4Addr::new(100, 64, 0, 2), &SessionKey::new([1; 32]));
        assert_eq!(s.endpoint(), None);
        assert_eq!(s.last_seen(), None);
        let a: SocketAddr = "198.18.0.2:4000".parse().expect("addr");
        let b: SocketAddr = "198.18.0.2:4001".parse().expect("addr");
        let t = epoch() + Duration::from_secs(5);
        let first = Seen { roamed: false, touch: true, family_changed: false };
        assert_eq!(s.seen(a, t), first, "a first endpoint is no roam");
        assert_eq!(s.endpoint(), Some(a));
        assert!(!s.seen(a, t + Duration::from_millis(1)).touch, "touches are spaced");
        let again = Seen { roamed: false, touch: true, family_changed: false };
        assert_eq!(s.seen(a, t + Duration::from_secs(1)), again);
        assert_eq!(s.endpoint(), Some(a));
        let roam = s.seen(b, t + Duration::from_secs(2));
        assert!(roam.roamed && !roam.family_changed);
        assert_eq!(s.endpoint(), Some(b));
        let seen = s.last_seen().expect("seen");
        assert!(seen >= t + Duration::from_millis(1999) && seen <= t + Duration::from_millis(2001));
        // Over to an IPv6 underlay and back: each a change of family.
        let c: SocketAddr = "[2001:db8::2]:4000".parse().expect("addr");
        assert!(s.seen(c, t + Duration::from_secs(3)).family_changed);
        assert!(!s.seen(c, t + Duration::from_secs(4)).family_changed);
        assert!(s.seen(a, t + Duration::from_secs(5)).family_changed);
    }

    #[test]
    fn downlink_stays_on_the_previous_session_until_the_client_uses_the_new_one() {
        use crate::gateway::sessions::{NewSession, SessionLimits};
        use crate::pki::CertFingerprint;
        let hour = Duration::from_secs(3600);
        let table = Arc::new(SessionTable::new(SessionLimits::new(hour, hour, hour)));
        let sessions = ControlSessions::new(table.clone(), Clock::new());
        let ip = Ipv4Addr::new(100, 64, 0, 2);
        let open = |id: u64| {
            let new = NewSession {
                client: "alice".into(),
                cert: CertFingerprint([1; 32]),
                assigned_ip: ip,
                assigned_ip6: None,
                key: SessionKey::new([id as u8; 32]),
                partial_checksums: true,
            };
            table.open(new, 0, || id).session.id
        };
        let from: SocketAddr = "198.18.0.1:5000".parse().expect("addr");
        let first = open(11);
        assert_eq!(sessions.by_ip(ip.into()).map(|d| d.session_id), Some(first), "the only session");
        sessions.by_id(first).expect("valid").seen(from, Instant::now());

        let second = open(22);
        assert_eq!(
            sessions.by_ip(ip.into()).map(|d| d.session_id),
            Some(first),
            "the client has not sent on the new session yet: no endpoint to send it to"
        );
        sessions.by_id(second).expect("valid").seen(from, Instant::now());
        assert_eq!(sessions.by_ip(ip.into()).map(|d| d.session_id), Some(second), "switched on first use");
    }

    /// One session behind a table that counts the lookups it is asked for.
    struct Counting {
        session: Arc<DataSession>,
        hold: Duration,
        changes: Option<Changes>,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Counting {
        fn new(hold: Duration, changes: Option<Changes>) -> Self {
            let session =
                Arc::new(DataSession::new(SessionId(7), Ipv4Addr::new(100, 64, 0, 2), &SessionKey::new([1; 32])));
            Self { session, hold, changes, asked: Default::default() }
        }

        fn asked(&self) -> usize {
            self.asked.load(Ordering::Relaxed)
        }
    }

    impl SessionLookup for Counting {
        fn by_id_held(&self, id: SessionId) -> Option<(Arc<DataSession>, Duration)> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            (id == self.session.session_id).then(|| (self.session.clone(), self.hold))
        }
        fn by_ip_held(&self, ip: IpAddr) -> Option<(Arc<DataSession>, Duration)> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            self.session.owns(ip).then(|| (self.session.clone(), self.hold))
        }
        fn changes(&self) -> Option<Changes> {
            self.changes.clone()
        }
    }

    #[test]
    fn recent_lookups_are_held_until_the_table_changes_or_the_hold_ends() {
        let changes = Changes::default();
        let table = Counting::new(Duration::from_millis(500), Some(changes.clone()));
        let (id, ip) = (SessionId(7), IpAddr::from(Ipv4Addr::new(100, 64, 0, 2)));
        let mut recent = Recent::new(&table);
        let t = Instant::now();
        let ms = Duration::from_millis;
        let found = recent.by_id(&table, id, t).expect("found");
        assert!(Arc::ptr_eq(&found, &table.session));
        assert_eq!(table.asked(), 1);
        assert!(recent.by_id(&table, id, t + ms(499)).is_some());
        assert_eq!(table.asked(), 1, "held");
        assert!(recent.by_ip(&table, ip, t).is_some());
        assert!(recent.by_ip(&table, ip, t + ms(100)).is_some());
        assert_eq!(table.asked(), 2, "the address's answer is held on its own");

        changes.bump();
        assert!(recent.by_id(&table, id, t + ms(200)).is_some());
        assert!(recent.by_ip(&table, ip, t + ms(200)).is_some());
        assert_eq!(table.asked(), 4, "a change of the table: both asked again");
        assert!(recent.by_id(&table, id, t + ms(699)).is_some());
        assert_eq!(table.asked(), 4);
        assert!(recent.by_id(&table, id, t + ms(700)).is_some());
        assert_eq!(table.asked(), 5, "the hold ended");

        assert!(recent.by_id(&table, SessionId(8), t + ms(701)).is_none());
        assert!(recent.by_ip(&table, Ipv4Addr::new(100, 64, 0, 3).into(), t + ms(701)).is_none());
        assert_eq!(table.asked(), 7, "another key is asked for");
        assert!(recent.by_id(&table, id, t + ms(702)).is_some());
        assert_eq!(table.asked(), 8, "a miss replaced what was held");
    }

    #[test]
    fn nothing_is_held_without_a_change_count_or_a_hold() {
        let t = Instant::now();
        for table in
            [Counting::new(Duration::ZERO, Some(Changes::default())), Counting::new(Duration::from_secs(1), None)]
        {
            let mut recent = Recent::new(&table);
            for _ in 0..3 {
                assert!(recent.by_id(&table, SessionId(7), t).is_some());
            }
            assert_eq!(table.asked(), 3);
        }
    }

    #[test]
    fn the_control_table_holds_a_session_no_longer_than_it_stays_valid() {
        use crate::gateway::sessions::{NewSession, SessionLimits};
        use crate::pki::CertFingerprint;
        let (idle, hour) = (Duration::from_millis(800), Duration::from_secs(3600));
        let table = Arc::new(SessionTable::new(SessionLimits::new(idle, hour, hour)));
        let sessions = ControlSessions::new(table.clone(), Clock::new());
        let changes = sessions.changes().expect("the control table counts its changes");
        let ip = Ipv4Addr::new(100, 64, 0, 2);
        let new = NewSession {
            client: "alice".into(),
            cert: CertFingerprint([1; 32]),
            assigned_ip: ip,
            assigned_ip6: None,
            key: SessionKey::new([3; 32]),
            partial_checksums: true,
        };
        let before = changes.count();
        let id = table.open(new, sessions.clock.now(), || 11).session.id;
        assert_eq!(changes.count(), before + 1);
        let (d, hold) = sessions.by_id_held(id).expect("valid");
        assert!(hold > Duration::ZERO && hold < idle, "held until it would idle out: {hold:?}");
        // No endpoint yet: the downlink may move to it without a change of the table.
        assert_eq!(sessions.by_ip_held(ip.into()).map(|(_, h)| h), Some(Duration::ZERO));
        d.seen("198.18.0.1:5000".parse().expect("addr"), Instant::now());
        let (_, hold) = sessions.by_ip_held(ip.into()).expect("valid");
        assert!(hold > Duration::ZERO && hold < idle, "{hold:?}");
        // A long idle limit: held at most HOLD_AT_MOST.
        table.set_limits(SessionLimits::new(hour, hour, hour));
        assert_eq!(sessions.by_id_held(id).map(|(_, h)| h), Some(HOLD_AT_MOST));
    }

    #[tokio::test]
    async fn nat_refuses_interface_names_that_could_inject_rules() {
        let net: Ipv4Net = "100.64.0.0/24".parse().expect("net");
        for bad in ["", "eth0\" accept", "a;b", "x y"] {
            assert!(Nat::install(net, None, bad).await.is_err(), "{bad:?}");
        }
    }
}
