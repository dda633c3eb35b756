//! The client's data plane: one TUN device and one UDP socket, and the engine between them (both
//! directions on a thread of its own, see `engine`).
//!
//! How it follows the spec:
//! - *Started by the first snapshot, once*: [`ClientDataPlane::on_swap_hook`] is the driver's
//!   `OnSwap`. On the first call it spawns the bring-up task, which creates the TUN device (with
//!   the snapshot's address) and the socket, retrying with backoff while that fails (logged, never
//!   fatal, never blocking the supervisor), then starts the engine. Later swaps only wake the
//!   engine so it announces the new session; nothing is recreated.
//! - *No session data in the loops*: every batch calls the getter and uses only the snapshot it
//!   returns. The per-session counter and replay window live in that snapshot
//!   ([`VpnAuthResponse::crypto`]), so they change exactly when the key does.
//! - *Survives everything*: socket and TUN errors are counted in [`Counters`] and survived; at most
//!   one log line per [`ERROR_LOG_EVERY`] per direction. When another program deletes the TUN
//!   device, a keeper task brings up a new one with the same name and address and the current MTU
//!   (retrying with backoff) and hands it to the engine, which carries on with it: it is not
//!   restarted. The routes and DNS follow through [`ClientDataPlane::tun_changes`]; the
//!   kill-switch names the tunnel by name, so it holds throughout. An "unknown session" notice
//!   from the gateway is passed on as a rate-limited nudge: a hint to the supervisor, which
//!   still decides.
//! - *Follows the path*: the TUN MTU is set in place whenever the path's size changes
//!   ([`PathMtu::changes`], see `follow_path_mtu`), without re-creating the device or restarting
//!   the engine.
//!
//! Buffers are allocated once; the per-packet path does not allocate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::UdpSocket;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tun_rs::SyncDevice;

use super::driver::{Command, OnSwap};
use super::path_mtu::{Ipv6Step, PathMtu, ipv6_step};
use super::prober::{self, Prober};
use super::routes;
use crate::config::client::ClientFile;
use crate::packet_thread::{Poller, Wakeup};
use crate::sansio::filter::{FilterSpec, Side};
use crate::sansio::inner::IpFamily;
use crate::sansio::seal::SealError;
use crate::snapshot::{GetAuth, VpnAuthResponse};
use crate::tunnel::{
    self, Backoff, Counters, DropReason, RateLimit, Stats, TunSpec, bump, describe_io, stop_requested,
};

mod engine;

const TARGET: &str = "holdfast::dataplane";

/// Default keepalive interval: well under the 30 s that common NAT boxes keep an idle UDP
/// mapping, and the gateway's idle timeout.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);

/// The TUN device's name when the client file names none.
pub const DEFAULT_TUN_NAME: &str = "holdfast0";

/// At most one log line per loop per this interval about failing socket or TUN IO.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// Bring-up retry delays (TUN or socket creation failing): first, and cap.
const BRINGUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Retry delays when a deleted TUN device cannot be re-created at once: first, and cap. Short at
/// first: the tunnel is down until it is back.
const TUN_RECREATE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// While there is no snapshot, the engine drops what the TUN offers and sleeps this long
/// (doubling up to the cap) between reads, so it does not spin.
const NO_SESSION_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(500));

/// Settings of the client data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDataPlaneConfig {
    /// The gateway's address; the UDP port comes from each snapshot (`data_port`).
    pub gateway: IpAddr,
    /// Some gateway the client may fail over to is on IPv6: the data-plane socket is then one
    /// dual-stack IPv6 socket, which reaches gateways of both families (see `data_socket`).
    pub ipv6_gateways: bool,
    /// The TUN device's name; `None` lets the kernel choose.
    pub tun_name: Option<String>,
    /// The MTU of the path to the gateway, which the TUN MTU is derived from; `None` (the
    /// default): found at bring-up from the route toward the gateway ([`routes::path_mtu`]).
    pub underlay_mtu: Option<u16>,
    /// Send a keepalive when nothing was sent for this long.
    pub keepalive: Duration,
    /// Path MTU discovery re-probes a path found smaller than its link after this long.
    pub pmtu_raise: Duration,
    /// Minimum spacing of nudges to the supervisor.
    pub nudge_min_interval: Duration,
    /// TUN offload (TSO): 64 KiB reads, split in user space, instead of one packet per read.
    pub offload: bool,
    /// Merge consecutive TCP segments into large packets when writing to the TUN device (GRO
    /// in user space, see [`tunnel::TunWriter`]); needs `offload`. On by default: the kernel's
    /// receive path then runs once per burst instead of once per segment.
    pub coalesce_writes: bool,
}

impl ClientDataPlaneConfig {
    /// Defaults for a gateway at `gateway`.
    pub fn new(gateway: IpAddr) -> Self {
        Self {
            gateway,
            ipv6_gateways: gateway.is_ipv6(),
            tun_name: None,
            underlay_mtu: None,
            keepalive: DEFAULT_KEEPALIVE,
            pmtu_raise: crate::sansio::pmtud::DEFAULT_RAISE_INTERVAL,
            nudge_min_interval: Duration::from_secs(1),
            offload: true,
            coalesce_writes: true,
        }
    }
}

impl ClientDataPlaneConfig {
    /// From the client file: the gateway's address from `endpoint`, the rest from `[network]`.
    pub fn from_file(file: &ClientFile) -> Self {
        let net = &file.network;
        Self {
            gateway: file.endpoint.ip(),
            ipv6_gateways: file.all_endpoints().iter().any(SocketAddr::is_ipv6),
            tun_name: Some(net.tun_name.clone().unwrap_or_else(|| DEFAULT_TUN_NAME.into())),
            underlay_mtu: net.underlay_mtu,
            keepalive: net.keepalive.unwrap_or(DEFAULT_KEEPALIVE),
            pmtu_raise: net.pmtu_raise.unwrap_or(crate::sansio::pmtud::DEFAULT_RAISE_INTERVAL),
            nudge_min_interval: file.timings().nudge_min_interval,
            offload: net.offload.unwrap_or(true),
            // Merging needs offload; without it the key is moot (the file check refuses asking
            // for both "on" and "off").
            coalesce_writes: net.coalesce_writes.unwrap_or(true) && net.offload.unwrap_or(true),
        }
    }
}

/// What the data plane needs from the running client: the snapshot getter and a way to nudge the
/// supervisor. Given after `client::start()` (see [`ClientDataPlane::bind`]).
#[derive(Clone)]
struct Binding {
    get_auth: GetAuth,
    commands: mpsc::Sender<Command>,
}

struct Shared {
    cfg: ClientDataPlaneConfig,
    binding: watch::Sender<Option<Binding>>,
    counters: Arc<Counters>,
    /// Set by the first snapshot: the bring-up runs once per process.
    started: AtomicBool,
    /// Set on every snapshot swap (and the engine woken): the engine announces the new session
    /// at once, so the gateway learns our endpoint before it has anything to send us.
    announce: AtomicBool,
    stop: watch::Sender<bool>,
    /// The engine's wake-up for control events: a stop, a re-created device, a new path MTU (all
    /// relayed by [`ring_bells`]) and a new session (rung by the swap hook). Set by the
    /// bring-up, before the engine starts.
    wakeup: std::sync::OnceLock<Arc<Wakeup>>,
    /// The current TUN device and its generation (1 for the first, +1 per re-creation); `None`
    /// until the first exists. The engine reads from and writes to whatever this holds.
    device: watch::Sender<Option<(u64, Arc<SyncDevice>)>>,
    /// The generation of a device a loop found gone (EBADFD): the keeper re-creates it.
    lost: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The path MTU, known once the bring-up found it; the engine and the status read it.
    path: std::sync::OnceLock<Arc<PathMtu>>,
    /// The TUN device's MTU (0 until it exists): what the path asks for, set on the device in
    /// place by [`follow_path_mtu`] and given to a re-created device.
    tun_mtu: watch::Sender<u16>,
    /// The largest inner packet the engine's read slots hold (0 until it runs): the TUN MTU
    /// is raised only once they hold it, so no read is ever cut short.
    reader_room: watch::Sender<u16>,
    /// Bumped when the TUN device got its IPv6 address back in place (the path grew past
    /// IPv6's minimum again): its IPv6 routes must be put back too.
    readdressed: watch::Sender<u64>,
    /// The engine's thread (see [`engine`]), once started; joined by [`ClientDataPlane::stop`].
    engine: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The client's data plane. Cheap to clone; all clones are the same data plane.
///
/// When the last clone goes without [`ClientDataPlane::stop`] (a start that failed further on, a
/// test), the engine and the control tasks are told to stop and the device is let go, as the
/// gateway's data plane does: otherwise the engine's thread, which holds the shared state, would
/// run on with the TUN device open.
#[derive(Clone)]
pub struct ClientDataPlane {
    shared: Arc<Shared>,
    /// Held by the clones alone (the engine, the tasks and the swap hook hold `shared`), so its
    /// drop is the last clone's.
    _owner: Arc<Owner>,
}

struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.stop.send_replace(true);
        // Woken at once: `ring_bells` would relay the stop too, but only while a runtime runs.
        if let Some(wakeup) = self.0.wakeup.get() {
            wakeup.ring();
        }
        // The engine closes its own reference when it ends.
        self.0.device.send_replace(None);
    }
}

impl ClientDataPlane {
    /// A data plane that will come up on the first snapshot. Nothing happens until then.
    pub fn new(cfg: ClientDataPlaneConfig) -> Self {
        let (binding, _) = watch::channel(None);
        let (device, _) = watch::channel(None);
        let (lost, _) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            binding,
            counters: Arc::default(),
            started: AtomicBool::new(false),
            announce: AtomicBool::new(false),
            wakeup: std::sync::OnceLock::new(),
            stop,
            device,
            lost,
            tasks: Mutex::new(Vec::new()),
            path: std::sync::OnceLock::new(),
            tun_mtu: watch::channel(0).0,
            reader_room: watch::channel(0).0,
            readdressed: watch::channel(0).0,
            engine: Mutex::new(None),
        });
        Self { _owner: Arc::new(Owner(shared.clone())), shared }
    }

    /// Hands over the snapshot getter and the supervisor's command queue. `client::start()`
    /// wants the hook before it returns the handle these come from, hence a separate step; the
    /// bring-up waits for it.
    pub fn bind(&self, get_auth: GetAuth, commands: mpsc::Sender<Command>) {
        self.shared.binding.send_replace(Some(Binding { get_auth, commands }));
    }

    /// The driver's `OnSwap` hook. Never blocks: the first call spawns the bring-up task, every
    /// call wakes the engine. Must be called inside a tokio runtime (the driver's task is).
    pub fn on_swap_hook(&self) -> OnSwap {
        let shared = self.shared.clone();
        Box::new(move |_snapshot: &Arc<VpnAuthResponse>| {
            if !shared.started.swap(true, Ordering::AcqRel) {
                let task = tokio::spawn(bring_up(shared.clone()));
                lock(&shared.tasks).push(task);
            }
            shared.announce.store(true, Ordering::Release);
            // Before the engine runs there is no wake-up yet: it looks at `announce` first.
            if let Some(wakeup) = shared.wakeup.get() {
                wakeup.ring();
            }
        })
    }

    /// The counters (for the status feed and the dashboard).
    pub fn stats(&self) -> Stats {
        self.shared.counters.stats()
    }

    /// The path MTU in use, once the data plane is up.
    pub fn path_mtu(&self) -> Option<Arc<PathMtu>> {
        self.shared.path.get().cloned()
    }

    /// The TUN device's MTU now (`None` before the device exists). It follows the path
    /// ([`ClientDataPlane::path_mtu`]) without re-creating the device.
    pub fn tun_mtu(&self) -> Option<u16> {
        Some(*self.shared.tun_mtu.borrow()).filter(|m| *m != 0)
    }

    /// The live counters, for a status feed or a stats dump that outlives a borrow.
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// Completes once the TUN device exists (it is created once, on the first snapshot); `false`
    /// if the data plane was stopped first.
    pub async fn tun_up(&self) -> bool {
        let mut up = self.shared.device.subscribe();
        let mut stop = self.shared.stop.subscribe();
        tokio::select! {
            r = up.wait_for(Option::is_some) => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Changes whenever the TUN device got its IPv6 address back without being re-created (the
    /// path grew past IPv6's 1280-byte minimum again): its IPv6 routes must be put back.
    pub fn tun_readdressed(&self) -> watch::Receiver<u64> {
        self.shared.readdressed.subscribe()
    }

    /// Changes whenever the TUN device is re-created (after another program deleted it): the
    /// routes and per-link DNS must be put back on the new device.
    pub fn tun_changes(&self) -> watch::Receiver<Option<(u64, Arc<SyncDevice>)>> {
        self.shared.device.subscribe()
    }

    /// Explicit stop: ends the engine (and a bring-up still retrying) and removes the TUN device.
    pub async fn stop(&self) {
        // The engine hears it through `ring_bells`.
        self.shared.stop.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for t in tasks {
            let _ = t.await;
        }
        // The engine ends at its next turn (`ring_bells` woke it); its thread holds a reference
        // to the device until then.
        let engine = lock(&self.shared.engine).take();
        if let Some(engine) = engine {
            let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        }
        // The last reference to the device: closing it removes it.
        self.shared.device.send_replace(None);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The task list stays valid whatever panicked while it was held.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates the TUN device, the socket and the engine's poller (retrying with backoff until all
/// exist or a stop), then starts the engine on its thread and the control tasks beside it, once.
async fn bring_up(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let mut binding_rx = shared.binding.subscribe();
    let binding = tokio::select! {
        b = binding_rx.wait_for(|b| b.is_some()) => match b {
            Ok(b) => b.clone(),
            Err(_) => return,
        },
        _ = stop_requested(&mut stop) => return,
    };
    let Some(binding) = binding else { return };
    let cfg = &shared.cfg;
    let underlay_mtu = match cfg.underlay_mtu {
        Some(mtu) => mtu,
        None => match routes::path_mtu(cfg.gateway).await {
            Ok(mtu) => mtu,
            Err(e) => {
                // No path right now (link down, only the fail-closed route): Ethernet's is the
                // likeliest once it is back. Too-big packets are then answered, not lost.
                tracing::warn!(
                    target: TARGET,
                    "cannot find the MTU of the path to the gateway ({e}); assuming {} (set underlay_mtu to choose)",
                    tunnel::DEFAULT_UNDERLAY_MTU
                );
                tunnel::DEFAULT_UNDERLAY_MTU
            }
        },
    };
    let underlay = IpFamily::of_addr(cfg.gateway);
    if cfg.underlay_mtu.is_some()
        && let Err(e) = tunnel::tun_mtu(underlay_mtu, underlay)
    {
        // A configuration error, not a transient one: retrying cannot help. Still not fatal:
        // the control plane keeps running, and the status shows the data plane down. (A path
        // read from the system is floored instead: it may grow again.)
        tracing::error!(target: TARGET, "data plane not started: {e}");
        return;
    }
    // The path to the file's gateway until the underlay watcher follows the one in use (and
    // each one failed over to: `PathMtu::set_gateway`).
    let path = shared
        .path
        .get_or_init(|| Arc::new(PathMtu::new(underlay_mtu, cfg.gateway, cfg.underlay_mtu.is_some())))
        .clone();
    let mut backoff = Backoff::new(BRINGUP_BACKOFF.0, BRINGUP_BACKOFF.1);
    let mut attempt = 0u32;
    let (tun, sock, (poller, wakeup)) = loop {
        attempt += 1;
        // Each attempt takes the address from the current snapshot; it is stable per client.
        let Some(auth) = (binding.get_auth)() else {
            // Cannot happen (we were started by a snapshot and snapshots are never cleared);
            // handled anyway rather than assumed.
            if !backoff.pause_unless_stopped(&mut stop).await {
                return;
            }
            continue;
        };
        let spec = tun_spec(cfg, cfg.tun_name.clone(), &auth, path.inner());
        if attempt == 1 {
            match address6_for(&auth) {
                (_, Some(why)) => tracing::warn!(target: TARGET, "{why}: the tunnel carries IPv4 only"),
                (Some(_), None) if spec.address6.is_none() => tracing::warn!(
                    target: TARGET,
                    "TUN MTU {} is below the IPv6 minimum of 1280: the tunnel carries IPv4 only until the path grows",
                    spec.mtu
                ),
                _ => {}
            }
        }
        let result = tunnel::create_tun(&spec).map_err(|e| e.to_string()).and_then(|t| {
            let s = data_socket(cfg).map_err(|e| format!("cannot open the UDP socket: {e}"))?;
            let p = Poller::new()
                .and_then(|p| Wakeup::new().map(|w| (p, w)))
                .map_err(|e| format!("cannot set up waiting for packets: {e}"))?;
            Ok((t, s, p))
        });
        match result {
            Ok(up) => break up,
            Err(e) => {
                bump(&shared.counters.tun_failures);
                // Warn on the first failure, then info: the backoff caps the rate of lines.
                if attempt == 1 {
                    tracing::warn!(target: TARGET, "data plane not up yet, retrying in {:?}: {e}", backoff.upcoming());
                } else {
                    tracing::info!(
                        target: TARGET,
                        "data plane still not up (attempt {attempt}), retrying in {:?}: {e}",
                        backoff.upcoming()
                    );
                }
                if !backoff.pause_unless_stopped(&mut stop).await {
                    return;
                }
            }
        }
    };
    shared.counters.tun_ifindex.store(tun.ifindex, Ordering::Relaxed);
    tracing::info!(
        target: TARGET,
        "data plane up: tun {} (ifindex {}, mtu {} for a path MTU of {underlay_mtu}{}), UDP {} -> gateway {}; AES-GCM: {}",
        tun.name,
        tun.ifindex,
        tun.mtu,
        if cfg.underlay_mtu.is_some() { ", underlay_mtu" } else { "" },
        sock.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into()),
        cfg.gateway,
        crate::sansio::aead::Backend::for_this_cpu().name(),
    );
    shared.tun_mtu.send_replace(tun.mtu);
    let gro = tunnel::enable_udp_gro(&sock);
    if !gro {
        tracing::debug!(target: TARGET, "no UDP GRO on this kernel: one datagram per receive");
    }
    // Junk dropped in the kernel (see crate::sansio::filter); the engine still checks all.
    if let Err(e) = crate::flood::attach_filter(&sock, FilterSpec { side: Side::Client, coalesced: gro }) {
        tracing::debug!(target: TARGET, "no socket filter on the data-plane socket: {e}");
    }
    // DF set and the kernel's cached path MTU ignored (probes must test the path), ICMP
    // "too big" queued for the prober as a hint.
    if let Err(e) = tunnel::set_path_mtu_probing(&sock, true) {
        tracing::warn!(target: TARGET, "cannot set path MTU probing on the data-plane socket ({e}): only probes find a smaller hop");
    }
    let device = Arc::new(tun.device);
    let sock = Arc::new(sock);
    // The device keeps the address it was created with; a re-created one gets the same.
    let created_with = (binding.get_auth)();
    let tun_ip = created_with.as_ref().map(|a| (a.assigned_ip, a.assigned_ip6));
    shared.device.send_replace(Some((1, device)));
    let wakeup = shared.wakeup.get_or_init(|| Arc::new(wakeup)).clone();
    let (ack_tx, ack_rx) = mpsc::channel(prober::ACK_QUEUE);
    let (hint_tx, hint_rx) = mpsc::channel(prober::HINT_QUEUE);
    let gateway = cfg.gateway;
    let prober = Prober {
        sock: sock.clone(),
        get_auth: binding.get_auth.clone(),
        gateway,
        path: path.clone(),
        acks: ack_rx,
        hints: hint_rx,
        stop: shared.stop.subscribe(),
        raise_interval: cfg.pmtu_raise,
    };
    let start = engine::Start {
        shared: shared.clone(),
        binding,
        sock,
        wakeup,
        poller,
        tun_ip,
        tun_mtu: tun.mtu,
        path: path.clone(),
        acks: ack_tx,
        hints: hint_tx,
    };
    let engine = match engine::Engine::new(start) {
        Ok(e) => e,
        Err(e) => {
            // A fresh epoll set refusing two fresh descriptors: not something a retry mends.
            tracing::error!(target: TARGET, "data plane not started: cannot watch its socket: {e}");
            return;
        }
    };
    // The thread inherits the caller's network namespace (a test's, a demo's), like the
    // descriptors it uses.
    let thread = std::thread::Builder::new().name(ENGINE_THREAD.into()).spawn(move || engine.run());
    match thread {
        Ok(t) => *lock(&shared.engine) = Some(t),
        Err(e) => {
            tracing::error!(target: TARGET, "data plane not started: cannot start its thread: {e}");
            return;
        }
    }
    let mut tasks = vec![tokio::spawn(ring_bells(shared.clone(), path.clone())), tokio::spawn(prober.run())];
    if let Some(auth) = created_with {
        tasks.push(tokio::spawn(keep_tun(shared.clone(), tun.name, auth.clone())));
        tasks.push(tokio::spawn(follow_path_mtu(shared.clone(), path, address6_for(&auth).0)));
    }
    lock(&shared.tasks).extend(tasks);
}

/// The engine thread's name (shown by `top -H`, read by `benches/hops.sh`).
pub const ENGINE_THREAD: &str = "hf-client-pkts";

/// The data plane's UDP socket: the one place that chooses its family. IPv4 alone when every
/// gateway of the file is on IPv4; else one dual-stack IPv6 socket (`[::]`, IPv4 gateways
/// reached as IPv4-mapped addresses), so that a client can fail over between gateways of either
/// family without a second socket. A host without IPv6 gets an IPv4 socket if its first gateway
/// is on IPv4: its IPv6 gateways are then out of reach, and it says so once.
fn data_socket(cfg: &ClientDataPlaneConfig) -> std::io::Result<UdpSocket> {
    if !cfg.ipv6_gateways {
        return tunnel::bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    }
    match tunnel::bind_udp(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))) {
        Err(e) if cfg.gateway.is_ipv4() => {
            tracing::warn!(target: TARGET, "no IPv6 socket on this host ({e}): the client's IPv6 gateways are out of reach");
            tunnel::bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        }
        r => r,
    }
}

/// How the TUN device is brought up, with its addresses, for a TUN MTU of `mtu` (the path's
/// usable inner MTU): the one place that says so, for the first device and every re-created one.
/// Below IPv6's minimum the device gets no IPv6 address (the kernel would refuse it); see
/// [`Ipv6Step`] for how it comes back.
fn tun_spec(cfg: &ClientDataPlaneConfig, name: Option<String>, auth: &VpnAuthResponse, mtu: u16) -> TunSpec {
    TunSpec {
        name,
        address: auth.assigned_ip,
        prefix_len: auth.prefix_len,
        address6: address6_for(auth).0.filter(|_| mtu >= tunnel::MIN_IPV6_MTU),
        mtu,
        offload: cfg.offload,
    }
}

/// The IPv6 address and prefix length the TUN device should have: the session's, unless this
/// host has IPv6 disabled (then `None` and why). Whether the MTU allows it is [`tun_spec`]'s call.
fn address6_for(auth: &VpnAuthResponse) -> (Option<(Ipv6Addr, u8)>, Option<String>) {
    match auth.assigned_ip6 {
        Some(_) if tunnel::ipv6_disabled() => (None, Some("IPv6 is disabled on this host".into())),
        Some(ip6) => (Some((ip6, auth.prefix_len6)), None),
        None => (None, None),
    }
}

/// How long the MTU follower waits for the engine to make room for a larger MTU before it
/// raises the device's anyway (the loop makes room as soon as it is between two batches).
const READER_ROOM_WAIT: Duration = Duration::from_secs(2);

/// Sets the TUN device's MTU in place each time the usable path MTU changes (the underlay
/// watcher or discovery moved it), so the host's TCP sizes its segments for the path at once
/// (and advertises segments the path carries back). The device is not re-created and the loops
/// are not restarted: the engine reads the limit per batch and grows its read slots before
/// a larger MTU is set (it publishes them in `reader_room`). Across IPv6's 1280-byte minimum,
/// the device's IPv6 address `address6` goes (the kernel's doing) and comes back (ours; the
/// routes follow through `readdressed`). One log line per change.
async fn follow_path_mtu(shared: Arc<Shared>, path: Arc<PathMtu>, address6: Option<(Ipv6Addr, u8)>) {
    let mut changes = path.changes();
    // A change between the device's creation and now is applied at once.
    changes.mark_changed();
    let mut stop = shared.stop.subscribe();
    let mut outer = path.outer();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = stop_requested(&mut stop) => return,
        }
        let want = *changes.borrow_and_update();
        let was = *shared.tun_mtu.borrow();
        if want == was {
            continue;
        }
        let (was_outer, now_outer) = (outer, path.outer());
        outer = now_outer;
        if want > *shared.reader_room.borrow() {
            let mut room = shared.reader_room.subscribe();
            let made = tokio::time::timeout(READER_ROOM_WAIT, room.wait_for(|r| *r >= want)).await;
            if !matches!(made, Ok(Ok(_))) {
                tracing::debug!(target: TARGET, "the engine has not made room for MTU {want}; raising it anyway");
            }
        }
        // A device re-created from now on gets this MTU too.
        shared.tun_mtu.send_replace(want);
        let device = shared.device.borrow().clone();
        let applied = match &device {
            Some((_, tun)) => tunnel::set_tun_mtu(tun, want).map_err(|e| describe_io(&e)),
            // Being re-created: the keeper uses `want`.
            None => Ok(()),
        };
        let bound = path.bound().as_str();
        let ipv6 = match (&applied, ipv6_step(was, want, address6.is_some()), address6, &device) {
            (Ok(()), Ipv6Step::Lost, _, _) => {
                "; IPv6 through the tunnel paused (below its 1280-byte minimum)".to_string()
            }
            (Ok(()), Ipv6Step::Restore, Some((ip6, len)), Some((_, tun))) => match tun.add_address_v6(ip6, len) {
                Ok(()) => {
                    shared.readdressed.send_modify(|n| *n += 1);
                    format!("; IPv6 {ip6} back on the tunnel")
                }
                Err(e) => format!("; IPv6 stays off the tunnel: cannot re-add {ip6}: {}", describe_io(&e)),
            },
            _ => String::new(),
        };
        match applied {
            Ok(()) => tracing::info!(
                target: TARGET,
                "path MTU {was_outer} -> {now_outer} ({bound}): TUN MTU {was} -> {want}{ipv6}"
            ),
            Err(e) => tracing::warn!(
                target: TARGET,
                "path MTU {was_outer} -> {now_outer} ({bound}) but the TUN MTU cannot be set to {want} \
                 (it was {was}): {e}; packets above {want} are answered too big"
            ),
        }
    }
}

/// Whether a TUN read or write failed because the device is gone (deleted by another program):
/// the kernel detaches the file from the device and answers EBADFD from then on.
fn device_gone(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBADFD)
}

/// Re-creates the TUN device (same name, address, offload; the current MTU) each time a loop reports it
/// gone, retrying with backoff, and hands the new one to the engine. One log line per incident.
async fn keep_tun(shared: Arc<Shared>, name: String, auth: Arc<VpnAuthResponse>) {
    let mut lost = shared.lost.subscribe();
    let mut stop = shared.stop.subscribe();
    let mut generation = 1u64;
    loop {
        tokio::select! {
            r = lost.wait_for(|g| *g == generation) => if r.is_err() { return },
            _ = stop_requested(&mut stop) => return,
        }
        // The MTU the path asks for now, not the first device's (and IPv6 if that allows it).
        let spec = tun_spec(&shared.cfg, Some(name.clone()), &auth, *shared.tun_mtu.borrow());
        let since = Instant::now();
        let mut backoff = Backoff::new(TUN_RECREATE_BACKOFF.0, TUN_RECREATE_BACKOFF.1);
        let mut attempts = 0u32;
        let tun = loop {
            attempts += 1;
            // The old device's name is released asynchronously: EBUSY for a moment.
            match tunnel::create_tun_retrying(&spec, Duration::from_millis(500)).await {
                Ok(t) => break t,
                Err(e) => {
                    bump(&shared.counters.tun_failures);
                    if attempts == 1 {
                        // The incident's line, when the first attempt does not settle it.
                        tracing::warn!(target: TARGET, "the TUN device was removed and cannot be re-created yet (retrying): {e}");
                    }
                    if !backoff.pause_unless_stopped(&mut stop).await {
                        return;
                    }
                }
            }
        };
        // The path may have moved while it was being created.
        let now = *shared.tun_mtu.borrow();
        if now != spec.mtu
            && let Err(e) = tunnel::set_tun_mtu(&tun.device, now)
        {
            tracing::warn!(target: TARGET, "cannot set the re-created TUN device's MTU to {now}: {}", describe_io(&e));
        }
        generation += 1;
        shared.counters.tun_ifindex.store(tun.ifindex, Ordering::Relaxed);
        if attempts == 1 {
            tracing::warn!(
                target: TARGET,
                "the TUN device {} was removed by another program; re-created it (ifindex {}) in {:?}",
                tun.name,
                tun.ifindex,
                since.elapsed()
            );
        } else {
            tracing::info!(target: TARGET, "TUN device {} re-created after {attempts} attempts", tun.name);
        }
        shared.device.send_replace(Some((generation, Arc::new(tun.device))));
    }
}

/// Relays the control events the engine acts on to its wake-up: a re-created device, a new path
/// MTU, a stop. Ends on a stop.
async fn ring_bells(shared: Arc<Shared>, path: Arc<PathMtu>) {
    let Some(wakeup) = shared.wakeup.get().cloned() else { return };
    let mut stop = shared.stop.subscribe();
    let mut devices = shared.device.subscribe();
    let mut path_changes = path.changes();
    // A channel whose sender is gone has nothing more to say (both live as long as the engine).
    let (mut devices_open, mut path_open) = (true, true);
    loop {
        tokio::select! {
            _ = stop_requested(&mut stop) => break,
            r = devices.changed(), if devices_open => devices_open = r.is_ok(),
            r = path_changes.changed(), if path_open => path_open = r.is_ok(),
        }
        wakeup.ring();
    }
    wakeup.ring();
}

/// Where `auth`'s datagrams go ([`VpnAuthResponse::gateway_ip_or`] the configured gateway).
fn gateway_of(auth: &VpnAuthResponse, cfg: &ClientDataPlaneConfig) -> IpAddr {
    auth.gateway_ip_or(cfg.gateway)
}

fn seal_drop(e: SealError) -> DropReason {
    match e {
        SealError::CounterExhausted => DropReason::CounterExhausted,
        // A TUN read is bounded by its slot, so the datagram always fits; counted, not assumed.
        SealError::BufferTooSmall => DropReason::Malformed,
    }
}

/// The log policy of one loop's failing IO: one warning when it starts failing, then at most one
/// line per [`ERROR_LOG_EVERY`] with the count, and one line when it works again.
struct IoLog {
    what: &'static str,
    failing: bool,
    since_log: u64,
    limit: RateLimit,
}

impl IoLog {
    fn new(what: &'static str) -> Self {
        Self { what, failing: false, since_log: 0, limit: RateLimit::every(ERROR_LOG_EVERY) }
    }

    fn failed(&mut self, e: &std::io::Error) {
        self.since_log += 1;
        if self.limit.allow(Instant::now()) {
            let how = describe_io(e);
            if self.failing {
                tracing::info!(target: TARGET, "{} still failing ({} errors): {how}", self.what, self.since_log);
            } else {
                tracing::warn!(target: TARGET, "{} failing: {how} (counted, not logged per packet)", self.what);
            }
            self.since_log = 0;
        }
        self.failing = true;
    }

    fn failed_silently(&mut self) {
        self.since_log += 1;
        self.failing = true;
    }

    fn ok(&mut self) {
        if self.failing {
            self.failing = false;
            if self.limit.allow(Instant::now()) {
                tracing::info!(target: TARGET, "{} works again", self.what);
            }
        }
    }
}
