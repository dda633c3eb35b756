//! End-to-end tests of the data plane between network namespaces (root only; skipped otherwise).
//!
//! Two layers:
//! - `inproc_*`: the real client and gateway data planes (TUN devices, UDP sockets, loops) in this
//!   test process, each on a thread moved into its own namespace, with the snapshot and the
//!   session table driven by the test. They pin the data-plane behaviour without the control
//!   plane: re-auth after a gateway "restart", loop starts, TUN identity, hostile datagrams.
//! - `bin_*`: the real `holdfast` binaries (gateway, clients) in namespaces, provisioned with the
//!   CLI, through the control plane: ping and TCP through the tunnel, NAT to an outside host, a
//!   gateway killed mid-transfer and restarted, client to client.
//!
//! Every wait is on an event (a counter moving, a log line, a ping reply), bounded in time.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use holdfast::client::dataplane::{ClientDataPlane, ClientDataPlaneConfig};
use holdfast::client::driver::Command;
use holdfast::gateway::dataplane::{DataSession, GatewayDataPlane, GatewayDataPlaneConfig, SessionLookup};
use holdfast::sansio::seal::{Direction, SessionCipher};
use holdfast::sansio::wire::{self, HEADER_LEN};
use holdfast::snapshot::{AuthCell, SessionId, SessionKey, VpnAuthResponse};
use holdfast::tunnel::{Counters, DropReason, Stats};
use support::netns::{self, Netns};
use support::wait_until;

const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The gateway's IPv6 tunnel address; clients get fd00:64::<last octet of their IPv4 one>.
const GW_TUN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 51820;

/// Skips (with a visible note) when not root: namespaces and TUN devices need CAP_NET_ADMIN.
macro_rules! require_root {
    () => {
        if !netns::available() {
            eprintln!("SKIPPED: needs root and iproute2 (network namespaces, TUN devices)");
            return;
        }
    };
}

/// A UDP socket bound inside `ns` (a socket keeps the namespace it was created in).
fn udp_in(ns: &Netns, bind: &str) -> UdpSocket {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_current_thread();
            UdpSocket::bind(bind).expect("bind probe socket")
        })
        .join()
        .expect("probe thread")
    })
}

/// A session table for the in-process gateway: what the control plane would fill.
#[derive(Default)]
struct Table {
    by_id: RwLock<HashMap<SessionId, Arc<DataSession>>>,
}

impl Table {
    fn install(&self, s: Arc<DataSession>) {
        let mut map = self.by_id.write().expect("lock");
        map.retain(|_, old| old.assigned_ip != s.assigned_ip);
        map.insert(s.session_id, s);
    }
    fn clear(&self) {
        self.by_id.write().expect("lock").clear();
    }
}

// Keeps no change count, so no answer is held: every lookup sees `install` and `clear` at once.
impl SessionLookup for Table {
    fn by_id_held(&self, id: SessionId) -> Option<(Arc<DataSession>, Duration)> {
        self.by_id.read().expect("lock").get(&id).map(|s| (s.clone(), Duration::ZERO))
    }
    fn by_ip_held(&self, ip: IpAddr) -> Option<(Arc<DataSession>, Duration)> {
        self.by_id.read().expect("lock").values().find(|s| s.owns(ip)).map(|s| (s.clone(), Duration::ZERO))
    }
}

/// The IPv6 tunnel address that goes with an in-process client's IPv4 one.
fn ip6_of(ip: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, u16::from(ip.octets()[3]))
}

fn snapshot(id: u64, ip: Ipv4Addr, key: [u8; 32]) -> Arc<VpnAuthResponse> {
    Arc::new(VpnAuthResponse {
        assigned_ip: ip,
        gateway_ip: GW_TUN,
        assigned_ip6: Some(ip6_of(ip)),
        gateway_ip6: Some(GW_TUN6),
        prefix_len6: 64,
        data_port: PORT,
        received_at: SystemTime::now(),
        ..VpnAuthResponse::fixture(id, key)
    })
}

/// Runs a current-thread tokio runtime on a thread inside `ns` until the returned guard drops.
struct NsRuntime {
    handle: tokio::runtime::Handle,
    done: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    fn new(ns: &Netns) -> NsRuntime {
        let name = ns.name().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{name}")).expect("netns handle");
            // SAFETY: setns on a valid namespace fd, for this thread only.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            tx.send(rt.handle().clone()).expect("send handle");
            rt.block_on(async {
                let _ = done_rx.await;
            });
        });
        let handle = rx.recv().expect("runtime handle");
        NsRuntime { handle, done: Some(done), thread: Some(thread) }
    }

    /// Runs `f` on the namespace's runtime and waits for its result.
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        self.try_run(f).expect("task on namespace runtime")
    }

    /// [`NsRuntime::run`] without the panic, for `Drop` (a panic while unwinding would abort
    /// the test process before the namespaces are deleted).
    fn try_run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv_timeout(Duration::from_secs(20)).ok()
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            let _ = d.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One in-process client: its namespace, runtime, data plane, snapshot cell and nudge queue.
struct InprocClient {
    ns: Netns,
    rt: NsRuntime,
    dp: ClientDataPlane,
    auth: AuthCell,
    nudges: tokio::sync::mpsc::Receiver<Command>,
    ip: Ipv4Addr,
    hook: Arc<std::sync::Mutex<holdfast::client::driver::OnSwap>>,
}

impl InprocClient {
    /// What the supervisor driver does on `SwapSnapshot`: swap, then call the hook.
    fn swap(&self, snap: Arc<VpnAuthResponse>) {
        self.auth.swap_in(snap.clone());
        let hook = self.hook.clone();
        self.rt.run(async move {
            let mut h = hook.lock().expect("hook");
            (*h)(&snap);
        });
    }

    fn stats(&self) -> Stats {
        self.dp.stats()
    }
}

/// The in-process world: a gateway namespace with its data plane, and clients linked to it.
struct Inproc {
    gw_ns: Netns,
    gw_rt: NsRuntime,
    table: Arc<Table>,
    gw: Option<GatewayDataPlane>,
    gw_counters: Arc<Counters>,
    /// Per client: its underlay address (the gateway's side is 198.18.<n>.1).
    next_link: u8,
    /// TUN IO mode of every data plane here: (offload, coalesce_writes).
    io: (bool, bool),
}

impl Inproc {
    fn new() -> Inproc {
        Self::with_io(true, true)
    }

    /// A world whose data planes use the given TUN IO mode.
    fn with_io(offload: bool, coalesce_writes: bool) -> Inproc {
        let gw_ns = Netns::new();
        let gw_rt = NsRuntime::new(&gw_ns);
        let table = Arc::new(Table::default());
        let lookup: Arc<dyn SessionLookup> = table.clone();
        let cfg = GatewayDataPlaneConfig { offload, coalesce_writes, ..gateway_config() };
        let gw = gw_rt.run(async move { GatewayDataPlane::start(cfg, lookup).await }).expect("gateway data plane");
        let gw_counters = gw.counters();
        Inproc { gw_ns, gw_rt, table, gw: Some(gw), gw_counters, next_link: 0, io: (offload, coalesce_writes) }
    }

    fn gw_stats(&self) -> Stats {
        self.gw_counters.stats()
    }

    /// A client namespace linked to the gateway's, with its data plane created (not yet up).
    fn client(&mut self, ip: Ipv4Addr) -> InprocClient {
        self.client_over(ip, false)
    }

    /// [`Inproc::client`], reaching the gateway over an IPv6 underlay (2001:db8:<n>::1) when
    /// `ipv6_underlay`; the gateway's one dual-stack socket serves both kinds.
    fn client_over(&mut self, ip: Ipv4Addr, ipv6_underlay: bool) -> InprocClient {
        let n = self.next_link;
        self.next_link += 1;
        let ns = Netns::new();
        let gw_underlay = Ipv4Addr::new(198, 18, n, 1);
        let link = format!("c{n}");
        netns::link(&self.gw_ns, &link, gw_underlay, &ns, "up0", Ipv4Addr::new(198, 18, n, 2), 24);
        let gateway: IpAddr = if ipv6_underlay {
            let gw6 = Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 1);
            self.gw_ns.add_addr6(&link, gw6, 64);
            ns.add_addr6("up0", Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 2), 64);
            gw6.into()
        } else {
            gw_underlay.into()
        };
        let rt = NsRuntime::new(&ns);
        let mut cfg = ClientDataPlaneConfig::new(gateway);
        cfg.tun_name = Some("hf0".into());
        cfg.keepalive = Duration::from_secs(1);
        cfg.nudge_min_interval = Duration::from_millis(100);
        (cfg.offload, cfg.coalesce_writes) = self.io;
        let dp = ClientDataPlane::new(cfg);
        let auth = AuthCell::new();
        let (tx, nudges) = tokio::sync::mpsc::channel(16);
        dp.bind(auth.getter(), tx);
        let hook = Arc::new(std::sync::Mutex::new(dp.on_swap_hook()));
        InprocClient { ns, rt, dp, auth, nudges, ip, hook }
    }

    /// Registers a session on the gateway and hands the same snapshot to the client; each
    /// side takes partial checksums when its TUN device has offload, as `Authenticate` tells them.
    fn authenticate(&self, c: &InprocClient, id: u64, key: [u8; 32]) {
        self.authenticate_with(c, id, key, (self.io.0, self.io.0));
    }

    /// [`Inproc::authenticate`] with what each side says of partial checksums: (the client
    /// takes them, the gateway takes them).
    fn authenticate_with(&self, c: &InprocClient, id: u64, key: [u8; 32], partial: (bool, bool)) {
        let s = DataSession::new(SessionId(id), c.ip, &SessionKey::new(key)).with_partial_checksums(partial.0);
        self.table.install(Arc::new(s.with_ip6(Some(ip6_of(c.ip)))));
        c.swap(Arc::new(VpnAuthResponse {
            partial_checksums: partial.1,
            ..Arc::into_inner(snapshot(id, c.ip, key)).expect("a fresh snapshot")
        }));
    }
}

impl Drop for Inproc {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.take() {
            let _ = self.gw_rt.try_run(async move { gw.stop().await });
        }
    }
}

fn gateway_config() -> GatewayDataPlaneConfig {
    GatewayDataPlaneConfig {
        // One dual-stack socket: IPv4 clients arrive on it as well as IPv6 ones.
        listen: SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT)),
        subnet: "100.64.0.0/24".parse().expect("subnet"),
        gateway_ip: GW_TUN,
        v6: Some(holdfast::config::gateway::Tunnel6 {
            subnet: "fd00:64::/64".parse().expect("subnet6"),
            gateway_ip: GW_TUN6,
        }),
        tun_name: Some("hfgw".into()),
        underlay_mtu: 1500,
        nat_uplink: None,
        offload: true,
        coalesce_writes: true,
    }
}

/// A minimal IPv4/UDP packet from `src` to `dst` with a valid header checksum.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&9u16.to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// A minimal IPv6/UDP packet from `src` to `dst` (UDP checksum left zero: the receivers here only
/// count or route it).
fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = vec![0u8; 40 + udp_len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&9u16.to_be_bytes());
    p[42..44].copy_from_slice(&9u16.to_be_bytes());
    p[44..46].copy_from_slice(&(udp_len as u16).to_be_bytes());
    p[48..].copy_from_slice(payload);
    p
}

/// Seals `inner` as a Data datagram the way a peer would.
fn seal(key: [u8; 32], dir: Direction, id: u64, counter: u64, inner: &[u8]) -> Vec<u8> {
    let cipher = SessionCipher::new(&SessionKey::new(key));
    let mut buf = vec![0u8; inner.len() + wire::OVERHEAD];
    buf[HEADER_LEN..HEADER_LEN + inner.len()].copy_from_slice(inner);
    let n = cipher.seal_data(dir, SessionId(id), counter, &mut buf, inner.len()).expect("seal");
    buf.truncate(n);
    buf
}

#[test]
fn inproc_ping_both_ways_and_counters() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    assert_eq!(c.stats().tx_loop_starts, 0, "nothing starts before the first snapshot");
    w.authenticate(&c, 0x1111, [1; 32]);
    assert!(wait_until(Duration::from_secs(5), || c.stats().rx_loop_starts == 1), "loops start");
    // The announcement keepalive tells the gateway where the client is before any traffic.
    assert!(wait_until(Duration::from_secs(5), || w.gw_stats().keepalives_rx >= 1), "{}", w.gw_stats());

    assert_eq!(c.ns.ping_count(GW_TUN, 5), 5, "client -> gateway tunnel address");
    assert_eq!(w.gw_ns.ping_count(c.ip, 5), 5, "gateway -> client");
    // A loop counts a packet once its send returned, which may be after the peer already
    // delivered it: wait for the counters to settle rather than read them at once.
    let settled = |s: &Stats| s.tx_packets >= 10 && s.rx_packets >= 10;
    wait_until(Duration::from_secs(5), || settled(&c.stats()) && settled(&w.gw_stats()));
    let cs = c.stats();
    let gs = w.gw_stats();
    assert!(settled(&cs), "{cs}");
    assert!(settled(&gs), "{gs}");
    assert_eq!((cs.tx_loop_starts, cs.rx_loop_starts), (1, 1));
    let tun = c.ns.ifindex("hf0").expect("client tun exists");
    assert_eq!(cs.tun_ifindex, tun);
    // The kernels' own link-scope chatter on the TUN devices is dropped (not_carried); nothing
    // else is.
    let drops = |s: &Stats| {
        DropReason::ALL.iter().filter(|&&r| r != DropReason::NotCarried).map(|&r| s.dropped(r)).sum::<u64>()
    };
    assert_eq!(drops(&cs) + drops(&gs), 0, "no drops on a clean path: {cs} / {gs}");
}

impl Inproc {
    /// Stops the gateway's data plane and starts a fresh one with an empty session table: what a
    /// gateway restart looks like to the data plane (new TUN device, new socket, no sessions).
    fn restart_gateway(&mut self) {
        if let Some(gw) = self.gw.take() {
            self.gw_rt.run(async move { gw.stop().await });
        }
        self.table.clear();
        let lookup: Arc<dyn SessionLookup> = self.table.clone();
        let cfg = GatewayDataPlaneConfig { offload: self.io.0, coalesce_writes: self.io.1, ..gateway_config() };
        let gw = self
            .gw_rt
            .run(async move { GatewayDataPlane::start(cfg, lookup).await })
            .expect("gateway data plane restarts");
        self.gw_counters = gw.counters();
        self.gw = Some(gw);
    }
}

#[test]
fn inproc_gateway_restart_nudges_and_resumes_on_the_same_loops() {
    require_root!();
    let mut w = Inproc::new();
    let mut c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    w.authenticate(&c, 0xa1, [2; 32]);
    assert!(c.ns.ping_until(GW_TUN, Duration::from_secs(5)).is_some(), "tunnel up");
    let before = c.stats();
    let tun_before = c.ns.ifindex("hf0").expect("tun");

    w.restart_gateway();
    // The client keeps sending on its old session; the gateway no longer knows it and says so.
    assert_eq!(c.ns.ping_count(GW_TUN, 3), 0, "no traffic on a session the gateway forgot");
    let nudged = wait_until(Duration::from_secs(5), || matches!(c.nudges.try_recv(), Ok(Command::Nudge)));
    assert!(nudged, "an unknown-session notice becomes a nudge: {}", c.stats());
    assert!(w.gw_stats().notices_tx >= 1 && c.stats().notices_rx >= 1);

    // The supervisor re-authenticates (here: the test) and swaps the snapshot in.
    let t0 = Instant::now();
    w.authenticate(&c, 0xa2, [3; 32]);
    let resumed = c.ns.ping_until(GW_TUN, Duration::from_secs(5)).expect("traffic resumes");
    assert!(resumed < Duration::from_secs(2), "resumed after {resumed:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    let after = c.stats();
    assert_eq!((after.tx_loop_starts, after.rx_loop_starts), (1, 1), "loops never restart");
    assert_eq!(after.tun_ifindex, before.tun_ifindex);
    assert_eq!(c.ns.ifindex("hf0"), Some(tun_before), "same TUN device");
    assert_eq!(c.ns.tun_devices().len(), 1, "and no second one");
}

#[test]
fn inproc_two_clients_reach_each_other_through_the_gateway() {
    require_root!();
    let mut w = Inproc::new();
    let a = w.client(Ipv4Addr::new(100, 64, 0, 2));
    let b = w.client(Ipv4Addr::new(100, 64, 0, 3));
    w.authenticate(&a, 0xb1, [4; 32]);
    w.authenticate(&b, 0xb2, [5; 32]);
    assert!(a.ns.ping_until(b.ip, Duration::from_secs(5)).is_some(), "a -> b");
    assert_eq!(b.ns.ping_count(a.ip, 5), 5, "b -> a");
    // Re-sealed in place by the gateway, never handed to its kernel.
    assert!(w.gw_stats().tx_packets >= 10, "{}", w.gw_stats());
}

#[test]
fn inproc_tcp_between_clients_with_and_without_partial_checksums() {
    require_root!();
    // `a` takes partial checksums, `b` is a client from before them: the gateway passes a's
    // TSO segments on to b with their checksums finished, and b's on to a as they came. Passed
    // on one datagram at a time, they reach each client's device unmerged: b's kernel checks
    // every finished checksum (a wrong one would stall the stream), a's is handed them partial.
    let mut w = Inproc::with_io(true, true);
    let a = w.client(Ipv4Addr::new(100, 64, 0, 2));
    let b = w.client(Ipv4Addr::new(100, 64, 0, 3));
    w.authenticate_with(&a, 0xc1, [6; 32], (true, true));
    w.authenticate_with(&b, 0xc2, [7; 32], (false, true));
    assert!(a.ns.ping_until(b.ip, Duration::from_secs(5)).is_some(), "a -> b");
    transfer(&a.ns, &b.ns, SocketAddr::from((b.ip, 5030)), 1 << 20);
    transfer(&b.ns, &a.ns, SocketAddr::from((a.ip, 5031)), 1 << 20);
    let gs = w.gw_stats();
    assert_eq!(gs.dropped(DropReason::Malformed), 0, "{gs}");
    assert!(gs.tx_packets >= 2 * 700, "both streams went through the gateway: {gs}");
}

#[test]
fn inproc_a_client_whose_path_is_smaller_gets_packets_sized_to_it_and_its_peers_hear_too_big() {
    require_root!();
    let mut w = Inproc::new();
    let a = w.client(Ipv4Addr::new(100, 64, 0, 2));
    let b = w.client(Ipv4Addr::new(100, 64, 0, 3));
    // b's access link is 1280 (the gateway's end of it stays 1500: what is larger vanishes).
    b.ns.ip(&["link", "set", "up0", "mtu", "1280"]);
    w.authenticate(&a, 0xd1, [7; 32]);
    w.authenticate(&b, 0xd2, [8; 32]);
    assert!(a.ns.ping_until(b.ip, Duration::from_secs(5)).is_some(), "a -> b");
    // b's probes tell the gateway what fits the path to b: 1280 - 28 - 36 inner bytes.
    let b_session = w.table.by_id(SessionId(0xd2)).expect("b's session");
    assert!(wait_until(Duration::from_secs(5), || b_session.path_mtu() == Some(1216)), "{:?}", b_session.path_mtu());
    // a sends b more than that with DF: a hears "fragmentation needed, mtu 1216" from b's
    // address, as from a router, instead of the packet vanishing.
    let out = a.ns.exec("ping", &["-c", "2", "-W", "1", "-M", "do", "-s", "1300", "-n", &b.ip.to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("mtu = 1216") || text.contains("mtu=1216"), "{text}");
    // What fits goes through.
    let out = a.ns.exec("ping", &["-c", "2", "-W", "2", "-M", "do", "-s", "1180", "-n", &b.ip.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(w.gw_stats().dropped(DropReason::TooBig) >= 1, "{}", w.gw_stats());
    // What told the gateway is counted: the probes, and the acks that answered them.
    let g = w.gw_stats();
    assert!(g.probes_rx >= 1 && g.probe_acks_tx >= 1, "{g}");
    assert!(g.probe_acks_tx + g.probe_acks_withheld <= g.probes_rx, "{g}");
}

#[test]
fn inproc_hostile_datagrams_are_dropped_and_counted_and_traffic_continues() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    let key = [6; 32];
    let id = 0xc1;
    w.authenticate(&c, id, key);
    assert!(c.ns.ping_until(GW_TUN, Duration::from_secs(5)).is_some(), "tunnel up");
    let gw_addr = SocketAddr::from(([198, 18, 0, 1], PORT));
    let client_ep = w.table.by_id(SessionId(id)).and_then(|s| s.endpoint()).expect("endpoint");

    // --- at the gateway, from a socket in the client's namespace ---
    let probe = udp_in(&c.ns, "0.0.0.0:0");
    let g0 = w.gw_stats();
    let reserve_c2g = || c.auth.get_auth().expect("snapshot").crypto().tx.next().expect("counter");
    let inner = ipv4_udp(c.ip, GW_TUN, b"probe");
    let valid = seal(key, Direction::ClientToGateway, id, reserve_c2g(), &inner);
    let mut bad_tag = seal(key, Direction::ClientToGateway, id, reserve_c2g(), &inner);
    let last = bad_tag.len() - 1;
    bad_tag[last] ^= 1;
    let spoofed = seal(
        key,
        Direction::ClientToGateway,
        id,
        reserve_c2g(),
        &ipv4_udp(Ipv4Addr::new(100, 64, 0, 99), GW_TUN, b"x"),
    );
    let other_session = seal([9; 32], Direction::ClientToGateway, 0xdead, 0, &inner);
    for d in [
        &[0x55u8; 64][..], // garbage
        &valid[..10],      // truncated
        &valid[..],        // accepted once ...
        &valid[..],        // ... then a replay
        &bad_tag[..],
        &spoofed[..],
        &other_session[..],
    ] {
        probe.send_to(d, gw_addr).expect("send to gateway");
    }
    let shedding = w.gw.as_ref().expect("gateway").shedding();
    // Garbage and the truncated datagram never reach user space: the socket filter drops them
    // in the kernel (tests/flood.rs), where the socket's drop count sees them.
    let counted = wait_until(Duration::from_secs(5), || {
        let g = w.gw_stats();
        let d = |r| g.dropped(r) - g0.dropped(r);
        d(DropReason::Malformed) == 0
            && shedding.totals().kernel_dropped >= 2
            && d(DropReason::Replay) == 1
            && d(DropReason::Decrypt) == 1
            && d(DropReason::Spoofed) == 1
            && d(DropReason::UnknownSession) == 1
    });
    assert!(counted, "gateway drops: before {g0}\nafter {}", w.gw_stats());
    assert_eq!(w.gw_stats().rx_packets - g0.rx_packets, 1, "only the first copy was delivered");
    // The accepted probe moved the session's endpoint (it is authentic); the client's next
    // packet moves it back. A forged or replayed one never does.
    let probe_ep = w.table.by_id(SessionId(id)).and_then(|s| s.endpoint()).expect("endpoint");
    assert_eq!(probe_ep.port(), probe.local_addr().expect("addr").port());
    // The notice for the unknown session came back to the probe.
    let mut notice = [0u8; 64];
    probe.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    // (The gateway's kernel answered the accepted probe packet, too: skip that datagram.)
    let notice = (0..4)
        .filter_map(|_| {
            let (n, _) = probe.recv_from(&mut notice).expect("datagrams for the probe");
            wire::parse_header(&notice[..n]).ok()
        })
        .find(|h| h.msg_type == wire::MsgType::UnknownSession)
        .expect("an unknown-session notice");
    assert_eq!(notice.session_id, SessionId(0xdead));

    // --- at the client, from a socket in the gateway's namespace ---
    assert_eq!(c.ns.ping_count(GW_TUN, 2), 2, "client traffic moved the endpoint back");
    assert_eq!(w.table.by_id(SessionId(id)).and_then(|s| s.endpoint()), Some(client_ep));
    let probe = udp_in(&w.gw_ns, "0.0.0.0:0");
    let c0 = c.stats();
    let session = w.table.by_id(SessionId(id)).expect("session");
    let reserve_g2c = || session.crypto.tx.next().expect("counter");
    let inner = ipv4_udp(GW_TUN, c.ip, b"probe");
    let valid = seal(key, Direction::GatewayToClient, id, reserve_g2c(), &inner);
    let mut bad_tag = seal(key, Direction::GatewayToClient, id, reserve_g2c(), &inner);
    bad_tag[HEADER_LEN] ^= 1;
    let wrong_session = seal(key, Direction::GatewayToClient, id + 1, reserve_g2c(), &inner);
    let wrong_direction = seal(key, Direction::ClientToGateway, id, reserve_g2c(), &inner);
    for d in [
        &[0x55u8; 64][..],
        &valid[..30],
        &valid[..],
        &valid[..],
        &bad_tag[..],
        &wrong_session[..],
        &wrong_direction[..],
    ] {
        probe.send_to(d, client_ep).expect("send to client");
    }
    let counted = wait_until(Duration::from_secs(5), || {
        let s = c.stats();
        let d = |r| s.dropped(r) - c0.dropped(r);
        // Garbage and the truncated one: dropped by the client socket's filter, in the kernel.
        d(DropReason::Malformed) == 0
            && d(DropReason::Replay) == 1
            && d(DropReason::Decrypt) == 2
            && d(DropReason::WrongSession) == 1
    });
    assert!(counted, "client drops: before {c0}\nafter {}", c.stats());
    assert_eq!(c.stats().rx_packets - c0.rx_packets, 1, "only the first copy was delivered");

    // And traffic continues.
    assert_eq!(c.ns.ping_count(GW_TUN, 5), 5);
    let s = c.stats();
    assert_eq!((s.tx_loop_starts, s.rx_loop_starts), (1, 1));
}

#[test]
fn inproc_ipv6_inside_the_tunnel_over_both_underlays_and_client_to_client() {
    require_root!();
    let mut w = Inproc::new();
    let a = w.client(Ipv4Addr::new(100, 64, 0, 2));
    let b = w.client_over(Ipv4Addr::new(100, 64, 0, 3), true);
    w.authenticate(&a, 0x61, [21; 32]);
    w.authenticate(&b, 0x62, [22; 32]);
    let (a6, b6) = (ip6_of(a.ip), ip6_of(b.ip));
    // Both TUN devices carry both addresses, once their bring-up (a task of its own, started by
    // the swap) has run.
    for (c, ip6) in [(&a, a6), (&b, b6)] {
        let (v4, v6) = (format!("inet {}/24", c.ip), format!("inet6 {ip6}/64"));
        let addrs =
            || String::from_utf8_lossy(&c.ns.exec("ip", &["-o", "addr", "show", "dev", "hf0"]).stdout).into_owned();
        wait_until(T, || addrs().contains(&v4) && addrs().contains(&v6));
        let addrs = addrs();
        assert!(addrs.contains(&v4), "{addrs}");
        assert!(addrs.contains(&v6), "{addrs}");
    }
    // Over an IPv4 underlay (a) and an IPv6 one (b): ping6 both ways, then IPv4 too on b.
    for (c, ip6) in [(&a, a6), (&b, b6)] {
        assert!(c.ns.ping_until(GW_TUN6, T).is_some(), "client {ip6} -> gateway over IPv6");
        assert_eq!(c.ns.ping_count(GW_TUN6, 5), 5);
        assert_eq!(w.gw_ns.ping_count(ip6, 5), 5, "gateway -> client {ip6}");
    }
    assert_eq!(b.ns.ping_count(GW_TUN, 3), 3, "IPv4 inside an IPv6 underlay");
    let ep = w.table.by_id(SessionId(0x62)).and_then(|s| s.endpoint()).expect("endpoint");
    assert!(ep.is_ipv6(), "b reached the gateway over IPv6: {ep}");
    let ep = w.table.by_id(SessionId(0x61)).and_then(|s| s.endpoint()).expect("endpoint");
    assert!(ep.is_ipv4(), "a's endpoint is an IPv4 address, not a mapped one: {ep}");
    // Client to client by inner IPv6 destination, re-sealed at the gateway.
    assert!(a.ns.ping_until(b6, T).is_some(), "a -> b over IPv6");
    assert_eq!(a.ns.ping_count(b6, 5), 5, "a -> b over IPv6");
    assert!(b.ns.ping_until(a6, T).is_some(), "b -> a over IPv6");
    assert_eq!(b.ns.ping_count(a6, 5), 5, "b -> a over IPv6");
    // Content-checked TCP over IPv6 both ways, across the IPv6 underlay.
    let peer = transfer(&b.ns, &w.gw_ns, SocketAddr::from((GW_TUN6, 5060)), 1 << 20);
    assert_eq!(peer.ip(), IpAddr::V6(b6), "the gateway sees the client's IPv6 tunnel address");
    transfer(&w.gw_ns, &b.ns, SocketAddr::from((b6, 5061)), 1 << 20);
    transfer(&a.ns, &b.ns, SocketAddr::from((b6, 5062)), 256 * 1024);
    let (gs, as_, bs) = (w.gw_stats(), a.stats(), b.stats());
    let bad = |s: &Stats| {
        [DropReason::Decrypt, DropReason::Replay, DropReason::Spoofed, DropReason::Malformed]
            .iter()
            .map(|r| s.dropped(*r))
            .sum::<u64>()
    };
    assert_eq!(bad(&gs) + bad(&as_) + bad(&bs), 0, "{gs}\n{as_}\n{bs}");
    // Only the IPv6 TCP streams can have merged here (pings never do): both receivers wrote
    // GSO_TCPV6 packets, and the kernel's re-segmentation of them gave the checked streams
    // above back intact.
    assert!(gs.rx_coalesced > 0 && bs.rx_coalesced > 0, "TCPv6 merged: {gs}\n{bs}");
}

#[test]
fn inproc_spoofed_and_hostile_inner_ipv6_is_dropped_and_counted() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    let (key, id) = ([23; 32], 0x63);
    w.authenticate(&c, id, key);
    assert!(c.ns.ping_until(GW_TUN6, T).is_some(), "tunnel up");
    let gw_addr = SocketAddr::from(([198, 18, 0, 1], PORT));
    let probe = udp_in(&c.ns, "0.0.0.0:0");
    let reserve = || c.auth.get_auth().expect("snapshot").crypto().tx.next().expect("counter");
    let own = ip6_of(c.ip);
    let other = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0x99);
    let g0 = w.gw_stats();
    let sealed = |inner: &[u8]| seal(key, Direction::ClientToGateway, id, reserve(), inner);
    let good = ipv6_udp(own, GW_TUN6, b"fine");
    let spoofed = ipv6_udp(other, GW_TUN6, b"not mine");
    // Another session's address is as foreign as an unassigned one.
    let mut b_as_src = ipv6_udp(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 3), GW_TUN6, b"x");
    b_as_src.truncate(40);
    let truncated = &good[..39];
    // A payload length (jumbo: 0 with no hop-by-hop header) and a next-header chain that do not
    // fit the packet: the gateway still reads only the fixed header, and the kernel drops it.
    let mut jumbo = ipv6_udp(own, GW_TUN6, b"jumbo");
    jumbo[4..6].copy_from_slice(&0u16.to_be_bytes());
    let mut bad_chain = ipv6_udp(own, GW_TUN6, b"chain");
    bad_chain[6] = 0; // hop-by-hop options header that is not there
    for inner in [&good[..], &spoofed[..], &b_as_src[..], truncated, &jumbo[..], &bad_chain[..]] {
        probe.send_to(&sealed(inner), gw_addr).expect("send");
    }
    let counted = wait_until(T, || {
        let g = w.gw_stats();
        let d = |r| g.dropped(r) - g0.dropped(r);
        // The last two datagrams sent are own ones: wait for them too, not just the drops.
        d(DropReason::Spoofed) == 2 && d(DropReason::Malformed) == 1 && g.rx_packets - g0.rx_packets >= 3
    });
    assert!(counted, "before {g0}\nafter {}", w.gw_stats());
    // The good one and the two malformed-but-own ones went to the kernel, which judges them.
    assert_eq!(w.gw_stats().rx_packets - g0.rx_packets, 3, "{}", w.gw_stats());
    // And traffic continues, both families.
    assert_eq!(c.ns.ping_count(GW_TUN6, 3), 3);
    assert_eq!(c.ns.ping_count(GW_TUN, 3), 3);
}

/// A client of `w` with session `id`, once its TUN device is up.
fn client_with_tun(w: &mut Inproc, id: u64) -> InprocClient {
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    w.authenticate(&c, id, [7; 32]);
    assert!(wait_until(Duration::from_secs(5), || c.ns.ifindex("hf0").is_some()), "tun up");
    c
}

#[test]
fn inproc_stop_removes_the_tun_device() {
    require_root!();
    let mut w = Inproc::new();
    let c = client_with_tun(&mut w, 0xd1);
    let dp = c.dp.clone();
    c.rt.run(async move { dp.stop().await });
    assert_eq!(c.ns.ifindex("hf0"), None, "the TUN device goes with the data plane");
}

/// A client data plane whose every clone is dropped without `stop` ends its engine as the
/// gateway's does: the thread is woken, returns, and the TUN device goes, while the runtime and
/// the driver's swap hook live on.
#[test]
fn inproc_a_dropped_client_data_plane_removes_its_tun_device() {
    require_root!();
    let mut w = Inproc::new();
    let c = client_with_tun(&mut w, 0xd2);
    let InprocClient { ns, rt, dp, hook, .. } = c;
    drop(dp);
    assert!(wait_until(Duration::from_secs(1), || ns.ifindex("hf0").is_none()), "the TUN device goes with the engine");
    drop((hook, rt));
}

/// A gateway data plane dropped without `stop` (a start that failed further on) still ends its
/// engine: the thread is woken, returns, and closes the TUN device, which the kernel then removes.
#[test]
fn inproc_a_dropped_gateway_data_plane_removes_its_tun_device() {
    require_root!();
    let mut w = Inproc::new();
    let name = w.gw.as_ref().expect("the gateway's data plane").tun_name.clone();
    assert!(w.gw_ns.ifindex(&name).is_some(), "tun up");
    drop(w.gw.take());
    // At once: woken by the drop, not by whatever traffic comes next (the kernel's own chatter on
    // the device, seconds later).
    assert!(
        wait_until(Duration::from_secs(1), || w.gw_ns.ifindex(&name).is_none()),
        "the TUN device goes with the engine"
    );
}

// ---------------------------------------------------------------------------------------------
// The real binaries in namespaces.
// ---------------------------------------------------------------------------------------------

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

use holdfast::config::client::ClientFile;
use support::{BIN, CLIENT_BIN, Proc, edit_client_file, fast_timings, holdfast_ok, s};

/// Bound on every wait for a process event.
const T: Duration = Duration::from_secs(20);
/// The gateway's underlay address on client 0's link (the endpoint in every client file).
const GW_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The outside host, behind the gateway's uplink.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// The gateway's IPv6 underlay address on client 0's link (the endpoint of an IPv6 world).
const GW_UNDERLAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The outside host's and the gateway uplink's IPv6 addresses.
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
const UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const UPLINK: &str = "out0";
const CLIENT_TUN: &str = "holdfast0";

/// Gateway, clients and an outside host, each in its own namespace:
///
/// ```text
///  client0 (up0 198.18.1.2) ---- (c0 198.18.1.1) gateway (out0 198.19.0.1) ---- outside (up0 198.19.0.2)
///  client1 (up0 198.18.2.2) ---- (c1 198.18.2.1)
/// ```
struct World {
    gw_ns: Netns,
    outside: Netns,
    clients: Vec<Netns>,
    files: Vec<std::path::PathBuf>,
    dir: tempfile::TempDir,
    _logs: tempfile::TempDir,
}

impl World {
    fn new(clients: usize, nat: bool) -> World {
        Self::with_timings(clients, nat, |_| {})
    }

    /// Like [`World::new`], with `tweak` applied to each client file after the fast test timings.
    fn with_timings(clients: usize, nat: bool, tweak: impl Fn(&mut ClientFile)) -> World {
        Self::build(clients, nat, false, tweak)
    }

    /// A world whose links are dual-stack (2001:db8:<n>::/64 beside 198.18.<n>.0/24, and
    /// 2001:db8:ff::/64 to the outside host) and whose gateway endpoint is its IPv6 address.
    fn ipv6_underlay(clients: usize, nat: bool) -> World {
        Self::build(clients, nat, true, |_| {})
    }

    fn build(clients: usize, nat: bool, ipv6: bool, tweak: impl Fn(&mut ClientFile)) -> World {
        let gw_ns = Netns::new();
        let outside = Netns::new();
        netns::link(&gw_ns, UPLINK, Ipv4Addr::new(198, 19, 0, 1), &outside, "up0", OUTSIDE, 24);
        gw_ns.sysctl("net.ipv4.ip_forward", "1");
        if ipv6 {
            gw_ns.add_addr6(UPLINK, UPLINK6, 64);
            outside.add_addr6("up0", OUTSIDE6, 64);
            gw_ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = tempfile::tempdir().expect("tempdir");
        let endpoint =
            if ipv6 { SocketAddr::from((GW_UNDERLAY6, PORT)).to_string() } else { format!("{GW_UNDERLAY}:{PORT}") };
        holdfast_ok(&["gateway", "init", "--dir", s(dir.path()), "--endpoint", &endpoint]);
        // The gateway has an interface per client here: bound to its endpoint address, its
        // replies leave from that address, the only one the clients' kill-switch accepts.
        let toml = dir.path().join("gateway.toml");
        let text = std::fs::read_to_string(&toml).expect("gateway.toml");
        std::fs::write(&toml, format!("listen = \"{endpoint}\"\n{text}")).expect("write gateway.toml");
        if nat {
            let toml = dir.path().join("gateway.toml");
            let text = std::fs::read_to_string(&toml).expect("gateway.toml");
            let text = text.replace(
                "[nat]\nenabled = false\nuplink = \"\"",
                &format!("[nat]\nenabled = true\nuplink = \"{UPLINK}\""),
            );
            assert!(text.contains("enabled = true"), "[nat] section as written by init");
            std::fs::write(&toml, text).expect("write gateway.toml");
        }
        let mut nss = Vec::new();
        let mut files = Vec::new();
        for i in 0..clients {
            let n = u8::try_from(i + 1).expect("few clients");
            let ns = Netns::new();
            let gw_side = Ipv4Addr::new(198, 18, n, 1);
            netns::link(&gw_ns, &format!("c{i}"), gw_side, &ns, "up0", Ipv4Addr::new(198, 18, n, 2), 24);
            if gw_side != GW_UNDERLAY {
                // Every client file names the same endpoint; the gateway owns that address.
                ns.ip(&["route", "add", &format!("{GW_UNDERLAY}/32"), "via", &gw_side.to_string()]);
            }
            if ipv6 {
                let gw6 = Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 1);
                gw_ns.add_addr6(&format!("c{i}"), gw6, 64);
                ns.add_addr6("up0", Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 2), 64);
                if gw6 != GW_UNDERLAY6 {
                    ns.ip(&["-6", "route", "add", &format!("{GW_UNDERLAY6}/128"), "via", &gw6.to_string()]);
                }
            }
            let file = dir.path().join(format!("client{i}.toml"));
            holdfast_ok(&["gateway", "add-client", "--dir", s(dir.path()), &format!("client{i}"), "--out", s(&file)]);
            edit_client_file(&file, |f| {
                fast_timings(f, logs.path());
                tweak(f);
            });
            nss.push(ns);
            files.push(file);
        }
        World { gw_ns, outside, clients: nss, files, dir, _logs: logs }
    }

    /// Starts `holdfast gateway run` in the gateway's namespace and waits until its data plane is
    /// up.
    fn gateway(&self, tag: &str) -> Proc {
        let mut p = self.gw_ns.spawn(
            tag,
            BIN,
            &["gateway", "run", "--dir", s(self.dir.path())],
            &[("RUST_LOG", "info,holdfast=debug")],
        );
        p.wait_for(&["data plane up"], T);
        p
    }

    /// Starts `holdfast client run` for client `i` in its namespace; waits until its data plane
    /// carries its first session. Returns the process and that log line.
    fn client(&self, i: usize) -> (Proc, String) {
        self.client_with(i, BIN, &["client", "run"])
    }

    /// [`World::client`] with another binary and command: `holdfast-client run`, the client alone.
    fn client_with(&self, i: usize, bin: &str, run: &[&str]) -> (Proc, String) {
        let args: Vec<&str> = run.iter().copied().chain(["--config", s(&self.files[i])]).collect();
        let mut p = self.clients[i].spawn(&format!("client{i}"), bin, &args, &[]);
        let line = p.wait_for(&["data plane on session"], T);
        (p, line)
    }

    /// The end of a clean run: the gateway dropped nothing as forged, replayed or spoofed, and
    /// an explicit stop removes its NAT rule.
    fn clean_stop(&self, mut gateway: Proc) {
        let g = dump_stats(&mut gateway);
        assert_eq!((stat(&g, "drop_decrypt"), stat(&g, "drop_replay"), stat(&g, "drop_spoofed")), (0, 0, 0));
        assert_eq!(gateway.terminate(T), Some(0));
        assert!(!self.gw_ns.nft_ruleset().contains("holdfast_nat"), "NAT rule removed on stop");
    }

    /// The IPv6 tunnel address the gateway gave client `i` (from its TUN device).
    fn tunnel_ip6(&self, i: usize) -> Ipv6Addr {
        match self.clients[i].global_addr(CLIENT_TUN, "-6") {
            Some(IpAddr::V6(ip)) => ip,
            other => panic!("no IPv6 address on {CLIENT_TUN}: {other:?}"),
        }
    }

    /// The gateway's IPv6 tunnel address (from gateway.toml, as `init` chose it).
    fn gateway_ip6(&self) -> Ipv6Addr {
        let c = holdfast::config::gateway::GatewayConfig::load_dir(self.dir.path()).expect("config");
        c.v6.expect("an IPv6 plan").gateway_ip
    }

    /// The tunnel address the gateway gave client `i` (from its TUN device).
    fn tunnel_ip(&self, i: usize) -> Ipv4Addr {
        match self.clients[i].global_addr(CLIENT_TUN, "-4") {
            Some(IpAddr::V4(ip)) => ip,
            other => panic!("no address on {CLIENT_TUN}: {other:?}"),
        }
    }
}

/// The `key=value` pairs of a stats line (`tunnel::Stats`'s `Display`).
fn stats_of(line: &str) -> HashMap<String, String> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn stat(stats: &HashMap<String, String>, key: &str) -> u64 {
    stats.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {stats:?}"))
}

/// Asks a process for its data-plane counters (SIGUSR1) and returns them.
fn dump_stats(p: &mut Proc) -> HashMap<String, String> {
    p.signal("USR1");
    stats_of(&p.wait_for(&["data plane stats:"], T))
}

/// The byte at offset `i` of the checked stream: a sequence with a long period, so a lost,
/// duplicated or reordered segment shows.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A TCP server in `ns` on `bind` that accepts one connection and checks the stream. `ready`
/// is signalled once it listens. Returns (bytes received, first mismatch, peer address).
fn checked_server(ns: &Netns, bind: SocketAddr) -> std::thread::JoinHandle<(u64, Option<u64>, SocketAddr)> {
    let name = ns.name().to_owned();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        enter(&name);
        let l = TcpListener::bind(bind).expect("listen");
        ready_tx.send(()).expect("ready");
        let (mut c, peer) = l.accept().expect("accept");
        c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut buf = [0u8; 16384];
        let (mut total, mut bad) = (0u64, None);
        loop {
            let n = match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for (k, b) in buf[..n].iter().enumerate() {
                let at = total + k as u64;
                if bad.is_none() && *b != pattern(at) {
                    bad = Some(at);
                }
            }
            total += n as u64;
        }
        let _ = c.write_all(&total.to_be_bytes());
        (total, bad, peer)
    });
    ready.recv_timeout(T).expect("server listening");
    h
}

/// Connects from `ns` to `dest` and sends `total` bytes of the pattern, publishing progress in
/// `sent`; returns what the server says it received.
fn checked_send(
    ns: &Netns,
    dest: SocketAddr,
    total: u64,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<std::io::Result<u64>> {
    checked_send_held(ns, dest, total, sent, None)
}

/// [`checked_send`], holding once `hold.0` bytes are written until `hold.1` receives (or its
/// sender is dropped; at most 30 s): a transfer a test can be sure is unfinished at a given moment,
/// however fast the tunnel.
fn checked_send_held(
    ns: &Netns,
    dest: SocketAddr,
    total: u64,
    sent: Arc<AtomicU64>,
    mut hold: Option<(u64, std::sync::mpsc::Receiver<()>)>,
) -> std::thread::JoinHandle<std::io::Result<u64>> {
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        enter(&name);
        let mut c = TcpStream::connect_timeout(&dest, Duration::from_secs(10))?;
        c.set_write_timeout(Some(Duration::from_secs(30)))?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut chunk = vec![0u8; 8192];
        let mut at = 0u64;
        while at < total {
            if let Some((held_at, release)) = &hold
                && at >= *held_at
            {
                let _ = release.recv_timeout(Duration::from_secs(30));
                hold = None;
            }
            let n = chunk.len().min((total - at) as usize);
            for (k, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(at + k as u64);
            }
            c.write_all(&chunk[..n])?;
            at += n as u64;
            sent.store(at, Ordering::Relaxed);
        }
        c.shutdown(std::net::Shutdown::Write)?;
        let mut ack = [0u8; 8];
        c.read_exact(&mut ack)?;
        Ok(u64::from_be_bytes(ack))
    })
}

/// Moves the calling thread into namespace `name`.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).expect("netns handle");
    // SAFETY: setns on a valid namespace fd, for this thread only.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}");
}

/// A checked TCP transfer of `total` bytes from `from` to `to_ns` listening on `dest`; returns
/// the address the server saw the connection come from.
fn transfer(from: &Netns, to_ns: &Netns, dest: SocketAddr, total: u64) -> SocketAddr {
    let server = checked_server(to_ns, dest);
    let acked = checked_send(from, dest, total, Arc::default()).join().expect("sender");
    let (got, bad, peer) = server.join().expect("server");
    assert_eq!(acked.expect("transfer completes"), total);
    assert_eq!((got, bad), (total, None), "every byte arrives, in order, intact");
    peer
}

#[test]
fn bin_ping_tcp_nat_and_client_to_client() {
    require_root!();
    let w = World::new(2, true);
    let gateway = w.gateway("gateway");
    assert!(w.gw_ns.nft_ruleset().contains("masquerade"), "NAT rule installed on start");
    let (_c0, _) = w.client(0);
    // The second client runs the client-only binary (what a client machine installs).
    let (_c1, _) = w.client_with(1, CLIENT_BIN, &["run"]);
    let (ip0, ip1) = (w.tunnel_ip(0), w.tunnel_ip(1));

    // Client -> gateway's tunnel address: ping and a checked TCP stream.
    assert!(w.clients[0].ping_until(GW_TUN, T).is_some(), "ping through the tunnel");
    assert_eq!(w.clients[0].ping_count(GW_TUN, 5), 5);
    let peer = transfer(&w.clients[0], &w.gw_ns, SocketAddr::from((GW_TUN, 5001)), 512 * 1024);
    assert_eq!(peer.ip(), std::net::IpAddr::V4(ip0), "the gateway sees the client's tunnel address");

    // Client -> outside host, masqueraded behind the gateway's uplink address.
    w.clients[0].ip(&["route", "add", "198.19.0.0/24", "dev", CLIENT_TUN]);
    assert_eq!(w.clients[0].ping_count(OUTSIDE, 3), 3, "ping the outside host through NAT");
    let peer = transfer(&w.clients[0], &w.outside, SocketAddr::from((OUTSIDE, 5002)), 256 * 1024);
    assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1)), "masqueraded");

    // Client to client, through the gateway.
    assert!(w.clients[1].ping_until(ip0, T).is_some(), "client1 -> client0");
    assert_eq!(w.clients[0].ping_count(ip1, 3), 3, "client0 -> client1");

    w.clean_stop(gateway);
}

/// The IPv6 counterpart of `bin_ping_tcp_nat_and_client_to_client`, over an IPv6 underlay (the
/// endpoint is `[2001:db8:1::1]:51820`, the gateway listens on its default `[::]`... here on the
/// endpoint address, as the other worlds do): ping6 and checked TCP over IPv6 inside the tunnel
/// both ways, IPv4 inside the same IPv6 underlay, NAT66 to an outside host, client to client
/// over IPv6.
#[test]
fn bin_ipv6_underlay_ping6_tcp_nat66_and_client_to_client() {
    require_root!();
    let w = World::ipv6_underlay(2, true);
    let gateway = w.gateway("gateway");
    let rules = w.gw_ns.nft_ruleset();
    assert!(rules.contains("ip6 saddr fd") && rules.contains("masquerade"), "NAT66 rule: {rules}");
    let (_c0, _) = w.client(0);
    let (_c1, _) = w.client(1);
    let (a6, b6, gw6) = (w.tunnel_ip6(0), w.tunnel_ip6(1), w.gateway_ip6());
    assert_ne!(a6, b6);

    assert!(w.clients[0].ping_until(gw6, T).is_some(), "ping6 through the tunnel");
    assert_eq!(w.clients[0].ping_count(gw6, 5), 5);
    assert_eq!(w.gw_ns.ping_count(a6, 5), 5, "gateway -> client over IPv6");
    let peer = transfer(&w.clients[0], &w.gw_ns, SocketAddr::from((gw6, 5101)), 512 * 1024);
    assert_eq!(peer.ip(), IpAddr::V6(a6), "the gateway sees the client's IPv6 tunnel address");
    transfer(&w.gw_ns, &w.clients[0], SocketAddr::from((a6, 5102)), 512 * 1024);
    // IPv4 inside the same IPv6 underlay.
    assert_eq!(w.clients[0].ping_count(GW_TUN, 3), 3);

    // NAT66: the full tunnel's ::/1 and 8000::/1 carry it; the outside host sees the uplink.
    assert_eq!(w.clients[0].ping_count(OUTSIDE6, 3), 3, "ping6 the outside host through NAT66");
    let peer = transfer(&w.clients[0], &w.outside, SocketAddr::from((OUTSIDE6, 5103)), 256 * 1024);
    assert_eq!(peer.ip(), IpAddr::V6(UPLINK6), "masqueraded behind the uplink's IPv6 address");

    // Client to client over IPv6.
    assert!(w.clients[1].ping_until(a6, T).is_some(), "client1 -> client0");
    assert_eq!(w.clients[0].ping_count(b6, 3), 3, "client0 -> client1");
    transfer(&w.clients[1], &w.clients[0], SocketAddr::from((a6, 5104)), 256 * 1024);

    w.clean_stop(gateway);
}

#[test]
fn bin_gateway_killed_mid_transfer_then_restarted_traffic_resumes_on_the_same_loops() {
    require_root!();
    // Production timings (health checks every 15-30 s, backoff up to 5 min, nudges at most one a
    // second; only the RPC deadline is short): resuming within 2 s of the gateway's return
    // then depends on the data plane's nudge (unknown-session notice -> immediate check), not on
    // a health check that happens to fall in the window.
    let w = World::with_timings(1, true, |f| {
        f.timing.health_min = None;
        f.timing.health_max = None;
        f.timing.backoff_initial = None;
        f.timing.backoff_max = None;
        f.timing.nudge_min_interval = None;
    });
    let mut gateway = w.gateway("gateway");
    let (mut client, _) = w.client(0);
    let tun_before = w.clients[0].ifindex(CLIENT_TUN).expect("client TUN");
    assert!(w.clients[0].ping_until(GW_TUN, T).is_some(), "tunnel up");
    let s1 = dump_stats(&mut client);
    assert_eq!(s1.get("loop_starts").map(String::as_str), Some("tx:1,rx:1"), "{s1:?}");

    // A transfer in flight when the gateway dies.
    let total = 2 * 1024 * 1024;
    let dest = SocketAddr::from((GW_TUN, 5003));
    let server = checked_server(&w.gw_ns, dest);
    let sent = Arc::new(AtomicU64::new(0));
    // Held at 512 KiB until the gateway is dead, so the transfer is unfinished when it dies
    // however fast the tunnel; the rest is written while it is down.
    let (release, held) = std::sync::mpsc::channel();
    let sender = checked_send_held(&w.clients[0], dest, total, sent.clone(), Some((512 * 1024, held)));
    assert!(wait_until(T, || sent.load(Ordering::Relaxed) >= 256 * 1024), "transfer under way");
    gateway.signal("KILL");
    gateway.wait_exit(T);
    let at_kill = sent.load(Ordering::Relaxed);
    assert!(at_kill < total, "killed mid-transfer ({at_kill} of {total} bytes sent)");
    release.send(()).expect("the sender waits");

    // Back again (its TUN device, socket, sessions and NAT rule are new; the old NAT table,
    // left behind by SIGKILL, is replaced, not doubled).
    let _gateway = w.gateway("gateway-restarted");
    let back = Instant::now();
    let resumed = w.clients[0].ping_until(GW_TUN, Duration::from_secs(10)).expect("traffic resumes");
    eprintln!("traffic resumed {resumed:?} after the gateway came back");
    assert!(resumed < Duration::from_secs(2), "resumed after {resumed:?}");
    assert_eq!(w.gw_ns.nft_ruleset().matches("table inet holdfast_nat").count(), 1);

    // The transfer completes, every byte checked, over the client's same loops and TUN.
    let acked = sender.join().expect("sender");
    let (got, bad, _) = server.join().expect("server");
    assert_eq!(acked.expect("transfer completes after the restart"), total);
    assert_eq!((got, bad), (total, None));
    assert!(back.elapsed() < T);

    assert!(client.is_alive(), "the client process never restarts");
    // The data plane moved to the new session (one line per session change) ...
    let sessions = client.all_lines().iter().filter(|l| l.contains("data plane on session")).count();
    assert!(sessions >= 2, "announced the new session");
    // ... on the loops and the TUN device it started with.
    let s2 = dump_stats(&mut client);
    assert_eq!(s2.get("loop_starts").map(String::as_str), Some("tx:1,rx:1"), "{s2:?}");
    assert_eq!(s2.get("tun_ifindex"), s1.get("tun_ifindex"), "same TUN device");
    assert_eq!(stat(&s2, "tun_ifindex"), u64::from(tun_before));
    assert_eq!(w.clients[0].ifindex(CLIENT_TUN), Some(tun_before));
    assert!(stat(&s2, "notices_rx") >= 1 && stat(&s2, "nudges") >= 1, "{s2:?}");
    assert_eq!(stat(&s2, "tun_failures"), 0);
    let ups = client.all_lines().iter().filter(|l| l.contains("data plane up")).count();
    assert_eq!(ups, 1, "the data plane came up once");
}

#[test]
fn bin_hostile_datagrams_at_both_ends_are_dropped_and_counted() {
    require_root!();
    // The client's kill-switch would drop junk from anywhere but the gateway before it reaches
    // the socket; this test is about the data plane's own checks, so it is off here.
    let w = World::with_timings(1, false, |f| f.network.killswitch = Some(false));
    let mut gateway = w.gateway("gateway");
    let (mut client, _) = w.client(0);
    assert!(w.clients[0].ping_until(GW_TUN, T).is_some(), "tunnel up");
    // Both ends name the AES-GCM backend they chose for this CPU (README, "AES-GCM crate").
    let aead = format!("AES-GCM: {}", holdfast::sansio::aead::Backend::for_this_cpu().name());
    for p in [&client, &gateway] {
        assert!(p.all_lines().iter().any(|l| l.contains("data plane up") && l.contains(&aead)), "{aead}");
    }
    let client_port: u16 = client
        .all_lines()
        .iter()
        .find(|l| l.contains("data plane up"))
        .and_then(|l| l.split("UDP ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port())
        .expect("client's UDP port in its log");
    let client_ep = SocketAddr::from(([198, 18, 1, 2], client_port));
    let gw_ep = SocketAddr::from((GW_UNDERLAY, PORT));
    let g0 = dump_stats(&mut gateway);
    let c0 = dump_stats(&mut client);

    // Garbage, truncated, and a well-formed datagram of a session nobody has.
    let mut stranger =
        wire::Header { msg_type: wire::MsgType::Data, csum_partial: false, session_id: SessionId(0x5eed), counter: 1 }
            .to_bytes()
            .to_vec();
    stranger.extend_from_slice(&[0xaa; 48]);
    let garbage = [0x55u8; 64];
    let truncated = &stranger[..12];
    let to_gw = udp_in(&w.clients[0], "0.0.0.0:0");
    let to_client = udp_in(&w.gw_ns, "0.0.0.0:0");
    for d in [&garbage[..], truncated, &stranger[..]] {
        to_gw.send_to(d, gw_ep).expect("send to gateway");
        to_client.send_to(d, client_ep).expect("send to client");
    }
    // Replays: every datagram each side sends is duplicated on the wire by nftables.
    w.clients[0].nft(&format!(
        "table ip hfdup {{\n chain post {{\n  type filter hook postrouting priority 0;\n  udp dport {PORT} dup to {GW_UNDERLAY}\n }}\n}}\n"
    ));
    w.gw_ns.nft(&format!(
        "table ip hfdup {{\n chain post {{\n  type filter hook postrouting priority 0;\n  udp sport {PORT} dup to 198.18.1.2\n }}\n}}\n"
    ));
    let out = w.clients[0].exec("ping", &["-c", "5", "-i", "0.05", "-W", "1", "-n", &GW_TUN.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("5 received"), "traffic continues: {text}");
    assert!(!text.contains("duplicates"), "replayed datagrams never reach the TUN: {text}");

    let g = dump_stats(&mut gateway);
    let c = dump_stats(&mut client);
    let d = |a: &HashMap<String, String>, b: &HashMap<String, String>, k: &str| stat(b, k) - stat(a, k);
    // Garbage and truncated: dropped in the kernel by the socket filters (tests/flood.rs).
    assert_eq!(d(&g0, &g, "drop_malformed"), 0, "gateway: garbage and truncated");
    assert_eq!(d(&g0, &g, "drop_unknown_session"), 1, "gateway: unknown session");
    assert!(d(&g0, &g, "notices_tx") >= 1);
    assert!(d(&g0, &g, "drop_replay") >= 5, "gateway: replays {g:?}");
    assert_eq!(d(&c0, &c, "drop_malformed"), 0, "client: garbage and truncated");
    assert_eq!(d(&c0, &c, "drop_wrong_session"), 1, "client: another session's datagram");
    assert!(d(&c0, &c, "drop_replay") >= 5, "client: replays {c:?}");
    // The stranger's notice went back to the probe, not to the client.
    assert_eq!(d(&c0, &c, "notices_rx"), 0);
    assert!(client.is_alive() && gateway.is_alive());
}

#[test]
fn bin_after_a_long_outage_in_backoff_traffic_resumes_within_2s_of_the_gateway() {
    require_root!();
    // Quick health checks so the outage is noticed, and the production backoff (1 s doubling
    // up to 5 min), so that by the time the gateway returns the next scheduled retry is seconds
    // away: only the nudge can make the 2 s.
    let w = World::with_timings(1, false, |f| {
        f.timing.backoff_initial = None;
        f.timing.backoff_max = None;
        f.timing.nudge_min_interval = None;
    });
    let mut gateway = w.gateway("gateway");
    let (mut client, _) = w.client(0);
    assert!(w.clients[0].ping_until(GW_TUN, T).is_some(), "tunnel up");
    gateway.signal("KILL");
    gateway.wait_exit(T);
    let line = client.wait_for(&["(failure 3)"], T);
    eprintln!("client in backoff: {line}");

    let _gateway = w.gateway("gateway-restarted");
    let resumed = w.clients[0].ping_until(GW_TUN, Duration::from_secs(10)).expect("traffic resumes");
    eprintln!("traffic resumed {resumed:?} after the gateway came back");
    assert!(resumed < Duration::from_secs(2), "resumed after {resumed:?}");
    let s = dump_stats(&mut client);
    assert_eq!(s.get("loop_starts").map(String::as_str), Some("tx:1,rx:1"), "{s:?}");
}

#[test]
fn inproc_tun_creation_failure_is_retried_until_it_works() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    // The name the data plane wants is taken by a device of another kind: creation fails.
    c.ns.ip(&["link", "add", "hf0", "type", "veth", "peer", "name", "hf0peer"]);
    w.authenticate(&c, 0xe1, [8; 32]);
    assert!(wait_until(T, || c.stats().tun_failures >= 2), "retried: {}", c.stats());
    assert_eq!(c.stats().tx_loop_starts, 0, "no loops without a TUN device");
    // The obstacle goes away; the next retry (backoff doubles from 0.5 s) brings it up.
    c.ns.ip(&["link", "del", "hf0"]);
    assert!(c.ns.ping_until(GW_TUN, T).is_some(), "up after the retry");
    let s = c.stats();
    assert_eq!((s.tx_loop_starts, s.rx_loop_starts), (1, 1), "{s}");
    assert_eq!(Some(s.tun_ifindex), c.ns.ifindex("hf0"));
}

#[test]
fn inproc_tun_mtu_fits_one_sealed_packet_in_the_underlay() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    w.authenticate(&c, 0xf1, [9; 32]);
    assert!(c.ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    let mtu = link_mtu;
    // 1500 (veth) - 20 (IPv4) - 8 (UDP) - 36 (datagram header + tag) = 1436.
    assert_eq!(mtu(&c.ns, "hf0").as_deref(), Some("1436"));
    // The gateway's dual-stack socket serves IPv6 clients too, whose underlay header is 20
    // bytes longer: 1500 - 40 - 8 - 36 = 1416 (what it sends fits either kind of client).
    assert_eq!(mtu(&w.gw_ns, "hfgw").as_deref(), Some("1416"));
    let c6 = w.client_over(Ipv4Addr::new(100, 64, 0, 3), true);
    w.authenticate(&c6, 0xf2, [8; 32]);
    assert!(c6.ns.ping_until(GW_TUN6, T).is_some(), "tunnel up over IPv6");
    assert_eq!(mtu(&c6.ns, "hf0").as_deref(), Some("1416"), "a client over IPv6 sizes for it");
    // A full-size inner IPv6 packet (1416 = 40 IPv6 + 8 ICMPv6 + 1368) crosses, DF being implied.
    let out = c6.ns.exec("ping", &["-c", "2", "-s", "1368", "-W", "1", &GW_TUN6.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // A full-size inner packet (1436 = 20 IP + 8 ICMP + 1408), DF set, crosses both ways.
    let out = c.ns.exec("ping", &["-c", "2", "-M", "do", "-s", "1408", "-W", "1", &GW_TUN.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = c.ns.exec("ping", &["-c", "1", "-M", "do", "-s", "1409", "-W", "1", &GW_TUN.to_string()]);
    assert!(!out.status.success(), "one byte more does not fit the TUN MTU");
}

/// The MTU `ip link` shows for `dev` in `ns`.
fn link_mtu(ns: &Netns, dev: &str) -> Option<String> {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]);
    out.split_whitespace().skip_while(|w| *w != "mtu").nth(1).map(str::to_owned)
}

#[test]
fn inproc_tun_mtu_starts_from_the_path_to_the_gateway() {
    require_root!();
    let mut w = Inproc::new();
    // A client whose own link is 1280 (PPPoE, mobile, a nested VPN), set before the TUN exists.
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    c.ns.ip(&["link", "set", "up0", "mtu", "1280"]);
    w.authenticate(&c, 0xe1, [7; 32]);
    assert!(c.ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    // 1280 - 20 (IPv4) - 8 (UDP) - 36 (datagram header + tag) = 1216.
    assert_eq!(link_mtu(&c.ns, "hf0").as_deref(), Some("1216"));
    // The largest inner packet with DF set (1216 = 20 IP + 8 ICMP + 1188) crosses both ways...
    let ping = |size: &str| {
        let out = c.ns.exec("ping", &["-c", "2", "-M", "do", "-s", size, "-W", "1", &GW_TUN.to_string()]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let (ok, out) = ping("1188");
    assert!(ok, "a full-size packet fits the path: {out}");
    // ... and one byte more is refused with the MTU, not lost on the way.
    let (ok, out) = ping("1189");
    assert!(!ok, "one byte more does not fit: {out}");
    assert!(out.contains("message too long") || out.contains("Frag needed"), "the sender is told why: {out}");
    assert_eq!(c.stats().dropped(DropReason::SocketError), 0, "{}", c.stats());

    // The route's MTU metric wins over the link's (a narrower path behind a 1500 link).
    let c2 = w.client(Ipv4Addr::new(100, 64, 0, 3));
    c2.ns.ip(&["route", "add", "198.18.1.1/32", "dev", "up0", "mtu", "1400"]);
    w.authenticate(&c2, 0xe2, [6; 32]);
    assert!(c2.ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    assert_eq!(link_mtu(&c2.ns, "hf0").as_deref(), Some("1336"), "1400 - 64");

    // Over an IPv6 underlay the header is 20 bytes longer: 1280 - 84 = 1196.
    let c6 = w.client_over(Ipv4Addr::new(100, 64, 0, 4), true);
    c6.ns.ip(&["link", "set", "up0", "mtu", "1280"]);
    w.authenticate(&c6, 0xe3, [5; 32]);
    assert!(c6.ns.ping_until(GW_TUN, T).is_some(), "tunnel up over IPv6");
    assert_eq!(link_mtu(&c6.ns, "hf0").as_deref(), Some("1196"));
    let out = c6.ns.exec("ping", &["-c", "2", "-M", "do", "-s", "1168", "-W", "1", &GW_TUN.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A TUN device `name` at 100.64.0.2/24 (and `address6`), MTU 1436.
fn test_tun(name: &str, address6: Option<(Ipv6Addr, u8)>, offload: bool) -> holdfast::tunnel::TunSpec {
    holdfast::tunnel::TunSpec {
        name: Some(name.into()),
        address: Ipv4Addr::new(100, 64, 0, 2),
        prefix_len: 24,
        address6,
        mtu: 1436,
        offload,
    }
}

/// A TUN device with offload takes TSO packets no larger than one GSO send's worth of its segments
/// (`gso_max_size`, see `tunnel::tso_limit`), from its creation and after its MTU changes; one
/// without offload keeps the kernel's default.
#[test]
fn a_tun_device_with_offload_takes_tso_packets_of_one_gso_send() {
    require_root!();
    let gso_max_size = |ns: &Netns| -> u32 {
        let json = ns.ip(&["-d", "-j", "link", "show", "hft0"]);
        let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        links[0]["gso_max_size"].as_u64().expect("gso_max_size in ip -d -j link") as u32
    };
    for offload in [true, false] {
        let ns = Netns::new();
        let rt = NsRuntime::new(&ns);
        let spec = test_tun("hft0", None, offload);
        let tun = rt.run(async move { holdfast::tunnel::create_tun(&spec).map(|t| t.device) }).expect("TUN device");
        let default = 65536;
        let want = |mtu| if offload { holdfast::tunnel::tso_limit(mtu) } else { default };
        assert_eq!(gso_max_size(&ns), want(1436), "offload {offload}: at creation");
        let tun = rt.run(async move { holdfast::tunnel::set_tun_mtu(&tun, 1280).map(|()| tun) }).expect("MTU set");
        assert_eq!(gso_max_size(&ns), want(1280), "offload {offload}: after the MTU fell");
        drop(tun);
    }
}

/// The "too big" answer as the data planes write it (`TooBig::send`, from the gateway's tunnel
/// address) is accepted by a real kernel, for both families: the sender's ping is told "Frag
/// needed" / "Packet too big" with our MTU, and the kernel caches that MTU for the destination.
/// With and without TUN offload (the answer then goes behind a virtio-net header).
#[test]
fn too_big_answers_are_taken_by_the_kernel() {
    require_root!();
    let gw6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    for (offload, v6) in [(false, false), (true, false), (false, true), (true, true)] {
        let ns = Netns::new();
        let rt = NsRuntime::new(&ns);
        let spec = test_tun("hft0", Some((Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), 64)), offload);
        let tun = rt.run(async move { holdfast::tunnel::create_tun(&spec).map(|t| Arc::new(t.device)) });
        let tun = tun.expect("TUN device");
        let (dst, from, request, said) = if v6 {
            ns.ip(&["-6", "route", "add", "2001:db8:9::/64", "dev", "hft0"]);
            ("2001:db8:9::9", IpAddr::V6(gw6), 40 + 8 + 1380, "Packet too big")
        } else {
            ns.ip(&["route", "add", "198.18.9.0/24", "dev", "hft0"]);
            ("198.18.9.9", IpAddr::V4(GW_TUN), 20 + 8 + 1380, "Frag needed")
        };
        let mut ping = ns.command("ping");
        // 1428 bytes: fits the TUN (1436), not the 1300 we claim.
        ping.args(["-c", "1", "-M", "do", "-s", "1380", "-W", "2", dst]);
        let pinger = std::thread::spawn(move || ping.output());
        let c = Arc::new(Counters::default());
        let counters = c.clone();
        // The device comes back too: closing it would remove it, and the route with it.
        let (answered, _tun) = rt.run(async move {
            let mut buf = vec![0u8; 65536];
            let mut too_big = holdfast::tunnel::TooBig::new();
            let skip = if offload { holdfast::sansio::coalesce::VNET_HDR_LEN } else { 0 };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            // The echo request, past whatever else the kernel sends first (MLD, ...).
            while support::readable(&*tun, deadline.saturating_duration_since(tokio::time::Instant::now())) {
                let n = match tun.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                };
                let packet = &buf[skip..n];
                if packet.len() == request {
                    too_big.send(&tun, packet, 1300, from, &counters);
                    return (true, tun);
                }
            }
            (false, tun)
        });
        let case = format!("offload {offload}, IPv6 {v6}");
        let out = pinger.join().expect("ping thread").expect("ping runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(answered, "{case}: the oversized echo request reached the TUN: {text}");
        assert_eq!(c.stats().dropped(DropReason::TooBig), 1, "{case}");
        assert_eq!(c.stats().dropped(DropReason::TunError), 0, "{case}: the answer was written");
        assert!(text.contains(said) && text.contains("1300"), "{case}: {text}");
        let route = ns.ip(&["route", "get", dst]);
        assert!(route.contains("mtu 1300"), "{case}: the kernel took the MTU: {route}");
    }
}

/// Packets already queued on the TUN device when a loop reads are taken into the same batch (so
/// a burst of small packets, such as the ACKs of a bulk transfer, leaves in one GSO send), with
/// and without offload; what does not fit a batch's free slots waits for the next read.
#[test]
fn a_tun_read_takes_the_packets_already_queued() {
    require_root!();
    use holdfast::tunnel::{BATCH, READ_SLOTS, TunReader};
    for offload in [false, true] {
        let ns = Netns::new();
        let rt = NsRuntime::new(&ns);
        let spec = test_tun("hft0", None, offload);
        let tun = rt.run(async move { holdfast::tunnel::create_tun(&spec).map(|t| Arc::new(t.device)) });
        let tun = tun.expect("TUN device");
        ns.ip(&["route", "add", "198.18.9.0/24", "dev", "hft0"]);
        let burst = READ_SLOTS + 10;
        let (batches, _tun) = rt.run(async move {
            let sock = UdpSocket::bind("100.64.0.2:0").expect("bind in the namespace");
            // Busy for the rest of the test: a read within an hour of the last counts (1 ms by
            // default). A fresh reader's first read is not busy: it takes one packet alone
            // (what a lone ping gets), though two are queued; the next is busy and takes the
            // rest.
            let mut reader = TunReader::new(1436).busy_within(Duration::from_secs(3600));
            for _ in 0..2 {
                sock.send_to(&[0xee; 12], "198.18.9.9:9").expect("send the warm-up");
            }
            // A read once the device has something (the engines wait in epoll_wait instead).
            let read = |reader: &mut TunReader| loop {
                assert!(support::readable(&*tun, Duration::from_secs(5)), "queued");
                match reader.try_read(&tun) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return r.expect("read"),
                }
            };
            assert_eq!(read(&mut reader), 1, "an idle device: one packet");
            assert!(read(&mut reader) >= 1, "the other one, and what else is queued");
            // All of them are in the device's queue before the next read: a send to a route
            // through a TUN device queues the packet there before it returns.
            for i in 0..burst {
                sock.send_to(&[i as u8; 40], "198.18.9.9:9").expect("send into the TUN");
            }
            let mut batches = Vec::new();
            let mut seen = 0;
            while seen < burst {
                let n = read(&mut reader);
                // Only the burst's UDP packets (20 + 8 + 40 bytes to 198.18.9.9) count: the
                // kernel may send its own first.
                let ours = (0..n)
                    .filter(|&i| {
                        let p = reader.packet(i);
                        p.len() == 68 && p[9] == 17 && p[16..20] == [198, 18, 9, 9] && p[28] == seen as u8 && {
                            seen += 1;
                            true
                        }
                    })
                    .count();
                batches.push((n, ours));
            }
            (batches, tun)
        });
        let case = format!("offload {offload}: batches (packets, of the burst) {batches:?}");
        assert!(batches.len() >= 2, "{case}: a batch never holds more than its slots allow");
        assert!(
            batches[0].0 > BATCH && batches[0].1 >= BATCH,
            "{case}: the first batch took what was queued, not one packet"
        );
        assert!(batches.iter().all(|&(n, _)| n <= READ_SLOTS), "{case}");
        assert_eq!(batches.iter().map(|b| b.1).sum::<usize>(), burst, "{case}: none lost, in order");
    }
}

/// A namespace whose loopback carries 198.18.0.1, and a runtime in it.
fn loopback_ns() -> (Netns, NsRuntime) {
    let ns = Netns::new();
    let rt = NsRuntime::new(&ns);
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["addr", "add", "198.18.0.1/32", "dev", "lo"]);
    (ns, rt)
}

/// A receiving socket on 198.18.0.1 (call inside a [`loopback_ns`]), reads bounded to 2 s.
fn loopback_receiver() -> (UdpSocket, SocketAddr) {
    let to = UdpSocket::bind("198.18.0.1:0").expect("bind the receiver");
    to.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let dest = to.local_addr().expect("address");
    (to, dest)
}

/// A run of more datagrams than one GSO send may carry (the kernel refuses more than 64 on older
/// kernels, 128 on newer ones) is split into several sends: GSO stays on, and all arrive.
#[test]
fn a_long_run_of_small_datagrams_is_split_into_gso_sends() {
    require_root!();
    let (_ns, rt) = loopback_ns();
    let (gso, sent, got) = rt.run(async move {
        let (to, dest) = loopback_receiver();
        let from = holdfast::tunnel::bind_udp("198.18.0.1:0".parse().expect("addr")).expect("bind the sender");
        // 200 sealed-sized slots of 60 bytes each: 12 000 bytes, far under 64 KiB.
        let (stride, count) = (100usize, 200usize);
        let mut big = vec![0u8; stride * count];
        for (i, slot) in big.chunks_mut(stride).enumerate() {
            slot[..60].fill(i as u8);
        }
        let lens = vec![60usize; count];
        let mut gso = true;
        let sent = holdfast::tunnel::send_datagrams(
            &from,
            &mut gso,
            &mut big,
            stride,
            &lens,
            dest,
            holdfast::tunnel::Unreachable::Settle,
        );
        let mut buf = [0u8; 128];
        let mut got = Vec::new();
        while got.len() < count {
            match to.recv(&mut buf) {
                Ok(n) => got.push((n, buf[0])),
                Err(_) => break,
            }
        }
        (gso, sent, got)
    });
    assert!(gso, "GSO stays on: {sent:?}");
    assert_eq!((sent.datagrams, sent.failed), (200, 0), "{sent:?}");
    assert_eq!(got.len(), 200);
    assert!(got.iter().enumerate().all(|(i, &(n, b))| n == 60 && b == i as u8), "in order, whole");
}

/// A GSO send whose segments no longer fit the link (it just shrank; the TUN MTU follows a moment
/// later) is refused whole: EMSGSIZE on this kernel (6.18), EINVAL on older ones, the errno a kernel
/// without UDP GSO refuses it with. The run goes one by one, fragmented where too big, and GSO
/// stays on for the runs after it.
#[test]
fn a_link_that_shrinks_under_a_gso_run_does_not_turn_gso_off() {
    require_root!();
    let (gso, sent, got) = two_gso_runs(Some("1280"), false);
    assert!(gso, "GSO stays on: {sent:?}");
    assert!(sent.iter().all(|s| (s.datagrams, s.failed) == (10, 0)), "{sent:?}");
    assert_eq!(got, two_runs_in_order(), "all arrive, whole and in order");
}

/// A socket whose kernel refuses GSO (here: UDP checksums off, which GSO needs; EINVAL) turns it
/// off for good, and every datagram still arrives, sent one by one.
#[test]
fn a_socket_that_refuses_gso_sends_one_by_one() {
    require_root!();
    let (gso, sent, got) = two_gso_runs(None, true);
    assert!(!gso, "GSO turned off: {sent:?}");
    assert!(sent.iter().all(|s| (s.datagrams, s.failed) == (10, 0)), "{sent:?}");
    assert_eq!(got, two_runs_in_order(), "all arrive, whole and in order");
}

const TWO_RUNS: [usize; 2] = [1400, 1000];

/// What [`two_gso_runs`] sends: per run, 10 datagrams of the run's length, the i-th filled with i.
fn two_runs_in_order() -> Vec<(usize, u8)> {
    TWO_RUNS.iter().flat_map(|&len| (0..10u8).map(move |i| (len, i))).collect()
}

/// Two runs of 10 datagrams ([`TWO_RUNS`]: 1400 bytes, then 1000) through `send_datagrams` on a
/// socket set up as the data plane's (DF set, too big refused with EMSGSIZE), in a loopback
/// namespace whose `lo` has MTU `lo_mtu`; `no_check` turns the socket's UDP checksums off. Returns
/// the GSO flag after both, what each send reported, and what arrived (length, first byte).
fn two_gso_runs(lo_mtu: Option<&str>, no_check: bool) -> (bool, Vec<holdfast::tunnel::Sent>, Vec<(usize, u8)>) {
    let (ns, rt) = loopback_ns();
    if let Some(mtu) = lo_mtu {
        ns.ip(&["link", "set", "lo", "mtu", mtu]);
    }
    rt.run(async move {
        let (to, dest) = loopback_receiver();
        let from = holdfast::tunnel::bind_udp("198.18.0.1:0".parse().expect("addr")).expect("bind the sender");
        holdfast::tunnel::set_path_mtu_probing(&from, true).expect("path MTU probing");
        if no_check {
            holdfast::tunnel::setsockopt_int(&from, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).expect("SO_NO_CHECK");
        }
        let (stride, count) = (1500usize, 10usize);
        let mut big = vec![0u8; stride * count];
        let mut gso = true;
        let mut sent = Vec::new();
        for len in TWO_RUNS {
            // (A send moves the datagrams together in place: filled afresh for each run.)
            for (i, slot) in big.chunks_mut(stride).enumerate() {
                slot[..len].fill(i as u8);
            }
            let lens = vec![len; count];
            sent.push(holdfast::tunnel::send_datagrams(
                &from,
                &mut gso,
                &mut big,
                stride,
                &lens,
                dest,
                holdfast::tunnel::Unreachable::Settle,
            ));
        }
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while got.len() < 2 * count {
            match to.recv(&mut buf) {
                Ok(n) => got.push((n, buf[0])),
                Err(_) => break,
            }
        }
        (gso, sent, got)
    })
}

/// An ICMP error an earlier datagram drew (here a port unreachable) is returned by the next send on
/// a socket with `IP_RECVERR`, instead of sending: the data plane's sends try once more, so a GSO
/// run and a lone datagram after it both arrive, none counted failed.
#[test]
fn an_earlier_datagrams_icmp_error_does_not_cost_the_next_send() {
    require_root!();
    let (_ns, rt) = loopback_ns();
    let (runs, got) = rt.run(async move {
        let (to, dest) = loopback_receiver();
        let closed = {
            let s = std::net::UdpSocket::bind("198.18.0.1:0").expect("bind");
            s.local_addr().expect("address")
        }; // dropped: nothing listens there now
        let from = holdfast::tunnel::bind_udp("198.18.0.1:0".parse().expect("addr")).expect("bind the sender");
        holdfast::tunnel::set_path_mtu_probing(&from, true).expect("IP_RECVERR");
        let (stride, count) = (100usize, 10usize);
        let big = vec![7u8; stride * count];
        let mut runs = Vec::new();
        // A GSO run of ten, then a lone datagram, each after a datagram to the closed port.
        for lens in [vec![60usize; count], vec![60usize]] {
            from.send_to(&[1], closed).expect("to the closed port");
            // The port unreachable is back on the socket (loopback answers at once; waited
            // for all the same: poll reports POLLERR for a queued error).
            let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&from), events: 0, revents: 0 };
            // SAFETY: one valid pollfd for the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, 2000) };
            assert!(ready == 1 && pfd.revents & libc::POLLERR != 0, "the ICMP error is queued");
            let mut gso = true;
            let mut big = big.clone();
            let sent = holdfast::tunnel::send_datagrams(
                &from,
                &mut gso,
                &mut big,
                stride,
                &lens,
                dest,
                holdfast::tunnel::Unreachable::Settle,
            );
            runs.push((sent.datagrams, sent.failed, sent.error.map(|e| e.to_string())));
        }
        let mut buf = [0u8; 128];
        let mut got = 0;
        while got < count + 1 && to.recv(&mut buf).is_ok() {
            got += 1;
        }
        (runs, got)
    });
    assert_eq!(runs, [(10, 0, None), (1, 0, None)], "nothing failed");
    assert_eq!(got, 11, "all arrived");
}

// ---------------------------------------------------------------------------------------------
// No heap allocation per packet in the loops.
// ---------------------------------------------------------------------------------------------

#[global_allocator]
static COUNTING: support::alloc::Counting = support::alloc::Counting;

/// Turns counting on or off on a runtime's thread. The flag changes as the task's last step, so
/// the runtime's own bookkeeping for this task is not counted.
fn count_on(rt: &NsRuntime, on: bool) {
    rt.run(async move { support::alloc::count_here(on) });
}

#[test]
fn inproc_loops_do_not_allocate_per_packet() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    w.authenticate(&c, 0x0a, [10; 32]);
    assert!(c.ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    assert_eq!(c.ns.ping_count(GW_TUN, 5), 5, "warm-up: every lazy structure exists");
    // Warm-up of the batched paths too (TSO reads, GSO sends, GRO receives, coalesced writes).
    transfer(&c.ns, &w.gw_ns, SocketAddr::from((GW_TUN, 5010)), 1 << 20);

    // Positive control: an allocation on a counted thread is seen.
    count_on(&c.rt, true);
    let before = support::alloc::allocations();
    c.rt.run(async {
        std::hint::black_box(Box::new(7u64));
    });
    assert!(support::alloc::allocations() > before, "the counter counts");

    count_on(&w.gw_rt, true);
    let before = support::alloc::allocations();
    let sent = c.stats().tx_packets;
    let out = c.ns.exec("ping", &["-c", "200", "-i", "0.005", "-W", "1", "-q", &GW_TUN.to_string()]);
    let allocations = support::alloc::allocations() - before;
    count_on(&c.rt, false);
    count_on(&w.gw_rt, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{allocations} allocations on the loops' threads for 200 pings");
    // And a bulk TCP stream, which takes the batched paths.
    count_on(&c.rt, true);
    count_on(&w.gw_rt, true);
    let before_bulk = support::alloc::allocations();
    transfer(&c.ns, &w.gw_ns, SocketAddr::from((GW_TUN, 5011)), 4 << 20);
    let bulk = support::alloc::allocations() - before_bulk;
    count_on(&c.rt, false);
    count_on(&w.gw_rt, false);
    eprintln!("{bulk} allocations on the loops' threads for a 4 MiB TCP stream");
    // About 3000 packets each way: one allocation per packet (or per batch) would show as
    // thousands (or hundreds). Under heavy load (a parallel build, say) the runtime itself
    // occasionally grows a queue; a handful of those is tolerated, never one per batch.
    assert!(bulk <= 4, "{bulk} allocations in the batched paths");
    let packets = c.stats().tx_packets - sent;
    assert!(packets >= 200);
    // 800 packet traversals (client and gateway, each way), keepalives and timers included.
    assert!(allocations <= 1, "{allocations} allocations for {packets} packets each way");

    // The same over IPv6 inside the tunnel (its own warm-up first: the GSO_TCPV6 merge path).
    transfer(&c.ns, &w.gw_ns, SocketAddr::from((GW_TUN6, 5012)), 1 << 20);
    count_on(&c.rt, true);
    count_on(&w.gw_rt, true);
    let before6 = support::alloc::allocations();
    let out = c.ns.exec("ping", &["-c", "200", "-i", "0.005", "-W", "1", "-q", &GW_TUN6.to_string()]);
    transfer(&c.ns, &w.gw_ns, SocketAddr::from((GW_TUN6, 5013)), 4 << 20);
    let v6 = support::alloc::allocations() - before6;
    count_on(&c.rt, false);
    count_on(&w.gw_rt, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{v6} allocations on the loops' threads for 200 pings and a 4 MiB stream over IPv6");
    assert!(v6 <= 5, "{v6} allocations over IPv6");
}

#[test]
fn inproc_checked_streams_both_ways_in_every_tun_io_mode() {
    require_root!();
    // Plain single-packet IO, TSO reads with plain writes, and TSO reads with GRO-coalesced
    // writes (the default): the same bytes arrive, in order, both ways. With offload, TSO
    // segments travel with partial checksums, unless the side they go to does not take them
    // (a peer from before the flag): then the sender finishes each, and the receiver's
    // coalescer checks them (a wrong one would be left unmerged and dropped by the kernel).
    let modes = [
        (false, false, (false, false)),
        (true, false, (true, true)),
        (true, true, (true, true)),
        (true, true, (false, true)),
        (true, true, (true, false)),
    ];
    for (offload, coalesce, partial) in modes {
        let mut w = Inproc::with_io(offload, coalesce);
        let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
        w.authenticate_with(&c, 0x10, [11; 32], partial);
        assert!(c.ns.ping_until(GW_TUN, T).is_some(), "tunnel up ({offload}, {coalesce}, {partial:?})");
        transfer(&c.ns, &w.gw_ns, SocketAddr::from((GW_TUN, 5020)), 1 << 20);
        transfer(&w.gw_ns, &c.ns, SocketAddr::from((c.ip, 5021)), 1 << 20);
        let (cs, gs) = (c.stats(), w.gw_stats());
        let bad = |s: &Stats| s.dropped(DropReason::Decrypt) + s.dropped(DropReason::Replay);
        assert_eq!(bad(&cs) + bad(&gs), 0, "({offload}, {coalesce}, {partial:?}): {cs} / {gs}");
        // With coalescing, both receivers really merged segments (and the kernel took the
        // merged packets: the checked streams above arrived intact); without it, none.
        eprintln!(
            "({offload}, {coalesce}, {partial:?}): merged {}/{} packets at the client, {}/{} at the gateway",
            cs.rx_coalesced, cs.rx_packets, gs.rx_coalesced, gs.rx_packets
        );
        let merged = (cs.rx_coalesced > 0, gs.rx_coalesced > 0);
        assert_eq!(merged, (coalesce, coalesce), "({offload}, {coalesce}, {partial:?}): {cs} / {gs}");
    }
}
