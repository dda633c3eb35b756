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
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use holdfast::client::dataplane::{ClientDataPlane, ClientDataPlaneConfig};
use holdfast::client::driver::Command;
use holdfast::gateway::dataplane::{
    DataSession, GatewayDataPlane, GatewayDataPlaneConfig, SessionLookup,
};
use holdfast::sansio::seal::{Direction, SessionCipher};
use holdfast::sansio::wire::{self, HEADER_LEN};
use holdfast::snapshot::{AuthCell, SessionId, SessionKey, VpnAuthResponse};
use holdfast::tunnel::{Counters, DropReason, Stats};
use support::netns::{self, Netns};

const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
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

/// Polls `cond` every 10 ms until it holds or `within` passes; returns whether it held.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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

impl SessionLookup for Table {
    fn by_id(&self, id: SessionId) -> Option<Arc<DataSession>> {
        self.by_id.read().expect("lock").get(&id).cloned()
    }
    fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<DataSession>> {
        self.by_id.read().expect("lock").values().find(|s| s.assigned_ip == ip).cloned()
    }
}

fn snapshot(id: u64, ip: Ipv4Addr, key: [u8; 32]) -> Arc<VpnAuthResponse> {
    Arc::new(VpnAuthResponse {
        assigned_ip: ip,
        gateway_ip: GW_TUN,
        prefix_len: 24,
        session_id: SessionId(id),
        session_key: SessionKey::new(key),
        data_port: PORT,
        idle_timeout: Duration::from_secs(180),
        received_at: SystemTime::now(),
        crypto: Default::default(),
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
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
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
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv_timeout(Duration::from_secs(20)).expect("task on namespace runtime")
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
}

impl Inproc {
    fn new() -> Inproc {
        let gw_ns = Netns::new();
        let gw_rt = NsRuntime::new(&gw_ns);
        let table = Arc::new(Table::default());
        let lookup: Arc<dyn SessionLookup> = table.clone();
        let cfg = gateway_config();
        let gw = gw_rt
            .run(async move { GatewayDataPlane::start(cfg, lookup).await })
            .expect("gateway data plane");
        let gw_counters = gw.counters();
        Inproc { gw_ns, gw_rt, table, gw: Some(gw), gw_counters, next_link: 0 }
    }

    fn gw_stats(&self) -> Stats {
        self.gw_counters.stats()
    }

    /// A client namespace linked to the gateway's, with its data plane created (not yet up).
    fn client(&mut self, ip: Ipv4Addr) -> InprocClient {
        let n = self.next_link;
        self.next_link += 1;
        let ns = Netns::new();
        let gw_underlay = Ipv4Addr::new(198, 18, n, 1);
        netns::link(
            &self.gw_ns,
            &format!("c{n}"),
            gw_underlay,
            &ns,
            "up0",
            Ipv4Addr::new(198, 18, n, 2),
            24,
        );
        let rt = NsRuntime::new(&ns);
        let mut cfg = ClientDataPlaneConfig::new(gw_underlay.into());
        cfg.tun_name = Some("hf0".into());
        cfg.keepalive = Duration::from_secs(1);
        cfg.nudge_min_interval = Duration::from_millis(100);
        let dp = ClientDataPlane::new(cfg);
        let auth = AuthCell::new();
        let (tx, nudges) = tokio::sync::mpsc::channel(16);
        dp.bind(auth.getter(), tx);
        let hook = Arc::new(std::sync::Mutex::new(dp.on_swap_hook()));
        InprocClient { ns, rt, dp, auth, nudges, ip, hook }
    }

    /// Registers a session on the gateway and hands the same snapshot to the client.
    fn authenticate(&self, c: &InprocClient, id: u64, key: [u8; 32]) {
        self.table.install(Arc::new(DataSession::new(SessionId(id), c.ip, &SessionKey::new(key))));
        c.swap(snapshot(id, c.ip, key));
    }
}

impl Drop for Inproc {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.take() {
            self.gw_rt.run(async move { gw.stop().await });
        }
    }
}

fn gateway_config() -> GatewayDataPlaneConfig {
    GatewayDataPlaneConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], PORT)),
        subnet: "100.64.0.0/24".parse().expect("subnet"),
        gateway_ip: GW_TUN,
        tun_name: Some("hfgw".into()),
        underlay_mtu: 1500,
        nat_uplink: None,
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
    assert!(
        wait_until(Duration::from_secs(5), || w.gw_stats().keepalives_rx >= 1),
        "{}",
        w.gw_stats()
    );

    assert_eq!(c.ns.ping_count(GW_TUN, 5), 5, "client -> gateway tunnel address");
    assert_eq!(w.gw_ns.ping_count(c.ip, 5), 5, "gateway -> client");
    let cs = c.stats();
    let gs = w.gw_stats();
    assert!(cs.tx_packets >= 10 && cs.rx_packets >= 10, "{cs}");
    assert!(gs.tx_packets >= 10 && gs.rx_packets >= 10, "{gs}");
    assert_eq!((cs.tx_loop_starts, cs.rx_loop_starts), (1, 1));
    let tun = c.ns.ifindex("hf0").expect("client tun exists");
    assert_eq!(cs.tun_ifindex, tun);
    // The kernels' own IPv6 chatter on the TUN devices is dropped (not_ipv4); nothing else is.
    let drops = |s: &Stats| {
        DropReason::ALL
            .iter()
            .filter(|&&r| r != DropReason::NotIpv4)
            .map(|&r| s.dropped(r))
            .sum::<u64>()
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
        let cfg = gateway_config();
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
    let nudged =
        wait_until(Duration::from_secs(5), || matches!(c.nudges.try_recv(), Ok(Command::Nudge)));
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
    let counted = wait_until(Duration::from_secs(5), || {
        let g = w.gw_stats();
        let d = |r| g.dropped(r) - g0.dropped(r);
        d(DropReason::Malformed) == 2
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
        d(DropReason::Malformed) == 2
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
fn inproc_stop_removes_the_tun_device() {
    require_root!();
    let mut w = Inproc::new();
    let c = w.client(Ipv4Addr::new(100, 64, 0, 2));
    w.authenticate(&c, 0xd1, [7; 32]);
    assert!(wait_until(Duration::from_secs(5), || c.ns.ifindex("hf0").is_some()), "tun up");
    let dp = c.dp.clone();
    c.rt.run(async move { dp.stop().await });
    assert_eq!(c.ns.ifindex("hf0"), None, "the TUN device goes with the data plane");
}
