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
        let cfg = GatewayDataPlaneConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], PORT)),
            subnet: "100.64.0.0/24".parse().expect("subnet"),
            gateway_ip: GW_TUN,
            tun_name: Some("hfgw".into()),
            underlay_mtu: 1500,
            nat_uplink: None,
        };
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
        let mut cfg = ClientDataPlaneConfig::new(gw_underlay);
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
