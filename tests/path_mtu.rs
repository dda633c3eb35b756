//! The client's TUN MTU follows the path to the gateway (root only; skipped otherwise): the real
//! gateway and the real `holdfast client run` in namespaces, joined by one veth link whose MTU
//! the tests set at both ends, as a PPPoE, mobile or nested-VPN link would have it.
//!
//! ```text
//!  client ns                                  gateway ns
//!  hfc 198.18.0.1/30 ------------------------ hfg 198.18.0.2/30 (endpoint 198.18.0.2:51820)
//!  holdfast0 (TUN)                            iperf3 server, TUN 100.64.0.1 / fdXX::1
//! ```
//!
//! - At bring-up: with the link at 1280 and at 1420, TCP through the tunnel (iperf3, both
//!   directions) with the default client file (TUN MTU from the path) reaches at least half of
//!   what it reaches with `underlay_mtu` set by hand to the link's MTU, and the TUN MTU is the
//!   path's minus the tunnel's overhead.
//! - At run time: the link drops from 1500 to 1280 and comes back during one transfer; the TUN
//!   MTU follows both ways in place (same ifindex, loops started once), the transfer never stalls
//!   for a second and completes, and the TUN's IPv6 address (dropped by the kernel below 1280)
//!   comes back with its routes. A route's `mtu` metric changing under the pinned gateway is
//!   followed the same way.
//!
//! Every wait is on a condition, bounded.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use holdfast::client::status_socket::StatusReport;
use support::{GatewayDir, Proc, fast_timings, status_of, wait_until};

const TUN: &str = "holdfast0";
const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The two ends of the link (see `GatewayDir::init_split`).
const CLIENT_LINK: &str = "hfc";
const GATEWAY_LINK: &str = "hfg";
/// Bound on waits for start-up events.
const T: Duration = Duration::from_secs(20);
/// The tunnel's overhead over an IPv4 underlay: 20 (IPv4) + 8 (UDP) + 36 (header and tag).
const OVERHEAD_V4: u16 = 64;

macro_rules! require_root {
    () => {
        if !support::netns::available() {
            eprintln!("skipped: needs root and network namespaces");
            return;
        }
    };
}

/// The tests of this file run one at a time: each compares throughput or counts seconds of a
/// transfer, which the others' iperf3 runs on the same cores would skew.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the link's MTU at both ends.
fn set_link_mtu(gw: &GatewayDir, mtu: u16) {
    let mtu = mtu.to_string();
    gw.clients_ns().ip(&["link", "set", "dev", CLIENT_LINK, "mtu", &mtu]);
    gw.ns.ip(&["link", "set", "dev", GATEWAY_LINK, "mtu", &mtu]);
}

/// The MTU `ip link` shows for the client's TUN device.
fn tun_mtu(gw: &GatewayDir) -> Option<u16> {
    let out = gw.clients_ns().exec("ip", &["-o", "link", "show", "dev", TUN]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().skip_while(|w| *w != "mtu").nth(1).and_then(|m| m.parse().ok())
}

/// Waits (bounded) until the client's TUN MTU is `mtu`: the change is applied asynchronously.
fn await_tun_mtu(gw: &GatewayDir, mtu: u16, what: &str) {
    assert!(wait_until(T, || tun_mtu(gw) == Some(mtu)), "{what}: TUN MTU {:?}, want {mtu}", tun_mtu(gw));
}

/// A gateway and one client in split namespaces, the link at `link_mtu` before either starts.
struct World {
    gw: GatewayDir,
    gateway: Proc,
    _logs: tempfile::TempDir,
    logs_path: PathBuf,
}

impl World {
    fn new(link_mtu: u16) -> World {
        let gw = GatewayDir::init_split();
        gw.set("listen", "\"198.18.0.2:51820\"");
        set_link_mtu(&gw, link_mtu);
        let mut gateway = gw.run("gateway");
        gateway.wait_for(&["data plane up"], T);
        let logs = tempfile::tempdir().expect("tempdir");
        let logs_path = logs.path().to_owned();
        World { gw, gateway, _logs: logs, logs_path }
    }

    /// Starts a client (its file edited by `edit`) and waits until its tunnel carries traffic.
    fn client(&self, name: &str, underlay_mtu: Option<u16>) -> Proc {
        let logs = self.logs_path.join(name);
        std::fs::create_dir_all(&logs).expect("log dir");
        let file = self.gw.add_client(name, |f| {
            fast_timings(f, &logs);
            f.network.underlay_mtu = underlay_mtu;
        });
        let mut client = self.gw.run_client(name, &file);
        client.wait_for(&["routes up"], T);
        assert!(self.gw.clients_ns().ping_until(GW_TUN, T).is_some(), "tunnel up:\n{}", client.all_lines().join("\n"));
        client
    }

    fn status(&self, name: &str) -> StatusReport {
        status_of(&self.logs_path.join(name).join("client.sock"))
    }

    /// TCP throughput through the tunnel, client -> gateway (or back with `reverse`), in bit/s:
    /// iperf3 for `secs` seconds, the first one omitted (slow start).
    fn iperf(&self, reverse: bool, secs: u32) -> f64 {
        let report = self.gw.iperf_json(reverse, secs, &["-O", "1"]);
        let end = &report["end"]["sum_received"]["bits_per_second"];
        end.as_f64().unwrap_or_else(|| panic!("no throughput in the iperf3 report: {report}"))
    }

    /// A world with the link at `link` and a default client `name` in it, its TUN sized from
    /// the link; returns them and the TUN's interface index.
    fn with_client(link: u16, name: &str) -> (World, Proc, u32) {
        let w = World::new(link);
        let client = w.client(name, None);
        assert_eq!(tun_mtu(&w.gw), Some(link - OVERHEAD_V4), "TUN MTU from a {link}-byte link");
        let ifindex = w.gw.clients_ns().ifindex(TUN).expect("TUN");
        (w, client, ifindex)
    }

    fn stop(mut self, mut client: Proc) {
        assert_eq!(client.terminate(T), Some(0), "{}", client.all_lines().join("\n"));
        assert!(self.gateway.is_alive(), "the gateway exited");
        let _ = self.gateway.terminate(T);
    }
}

/// With the link at `link`: the default client sizes its TUN from the path and reaches at least
/// half the throughput of a client with `underlay_mtu = link`, both directions.
fn default_keeps_up_with_hand_tuned(link: u16) {
    let w = World::new(link);
    let want = link - OVERHEAD_V4;

    let tuned = w.client("tuned", Some(link));
    assert_eq!(tun_mtu(&w.gw), Some(want), "underlay_mtu = {link}");
    let tuned_up = w.iperf(false, 3);
    let tuned_down = w.iperf(true, 3);
    assert_eq!(w.status("tuned").data_plane.and_then(|d| d.path_mtu).map(|p| p.bound), Some("configured".into()));
    let mut tuned = tuned;
    assert_eq!(tuned.terminate(T), Some(0));

    let client = w.client("default", None);
    assert_eq!(tun_mtu(&w.gw), Some(want), "TUN MTU from a {link}-byte path");
    let p = w.status("default").data_plane.and_then(|d| d.path_mtu).expect("path MTU in the status");
    assert_eq!((p.outer, p.tun_mtu, p.bound.as_str()), (link, want, "link"));
    // The best of up to three runs: the machine's cores are shared with other work, so one run
    // may land on a busy moment; a black hole (the issue's 0.25 against 4500 Mbit/s) never
    // reaches half in any.
    let best = |reverse: bool, tuned: f64| {
        let mut best = 0f64;
        for _ in 0..3 {
            best = best.max(w.iperf(reverse, 3));
            if best >= tuned / 2.0 {
                break;
            }
        }
        best
    };
    let up = best(false, tuned_up);
    let down = best(true, tuned_down);
    eprintln!(
        "link {link}: default up {:.0} / down {:.0} Mbit/s, hand-tuned up {:.0} / down {:.0} Mbit/s",
        up / 1e6,
        down / 1e6,
        tuned_up / 1e6,
        tuned_down / 1e6
    );
    assert!(up >= tuned_up / 2.0, "client -> gateway: {up} bit/s against {tuned_up} hand-tuned");
    assert!(down >= tuned_down / 2.0, "gateway -> client: {down} bit/s against {tuned_down} hand-tuned");
    w.stop(client);
}

#[test]
fn a_1280_link_gets_a_1216_tun_and_full_speed_both_ways() {
    require_root!();
    let _one = one_at_a_time();
    default_keeps_up_with_hand_tuned(1280);
}

#[test]
fn a_1420_link_gets_a_1356_tun_and_full_speed_both_ways() {
    require_root!();
    let _one = one_at_a_time();
    default_keeps_up_with_hand_tuned(1420);
}

/// The gateway's IPv6 tunnel address (from gateway.toml, as `init` chose it).
fn gateway_ip6(gw: &GatewayDir) -> Ipv6Addr {
    let c = holdfast::config::gateway::GatewayConfig::load_dir(gw.path()).expect("config");
    c.v6.expect("an IPv6 plan").gateway_ip
}

#[test]
fn the_tun_follows_the_link_down_and_up_during_a_transfer_without_being_recreated() {
    require_root!();
    let _one = one_at_a_time();
    let (w, client, ifindex) = World::with_client(1500, "roamer");
    let ns = w.gw.clients_ns();
    let gw6 = gateway_ip6(&w.gw);
    assert!(ns.ping_until(gw6, T).is_some(), "IPv6 through the tunnel before");

    // One transfer across both changes: 15 s, reported per second.
    let transfer = std::thread::scope(|scope| {
        let gw = &w.gw;
        let run = scope.spawn(move || gw.iperf_json(false, 15, &["-i", "1"]));
        let sent = || w.status("roamer").data_plane.map_or(0, |d| d.tx_bytes);
        let t0 = std::time::Instant::now();
        let moving = |from: u64| {
            let ok = wait_until(T, || sent() > from + 2 * 1024 * 1024);
            eprintln!("{:?}: sent {} (from {from})", t0.elapsed(), sent());
            ok
        };
        assert!(moving(sent()), "the transfer is under way");

        set_link_mtu(&w.gw, 1280);
        await_tun_mtu(&w.gw, 1280 - OVERHEAD_V4, "TUN MTU follows down");
        let p = w.status("roamer").data_plane.and_then(|d| d.path_mtu).expect("path MTU");
        assert_eq!((p.outer, p.tun_mtu, p.bound.as_str()), (1280, 1216, "link"));
        // Below 1280 the kernel takes the device's IPv6 away.
        assert_eq!(ns.global_addr(TUN, "-6"), None, "no IPv6 on a 1216-byte device");
        assert!(moving(sent()), "the transfer goes on over the smaller path");

        set_link_mtu(&w.gw, 1500);
        await_tun_mtu(&w.gw, 1500 - OVERHEAD_V4, "TUN MTU follows up");
        assert!(moving(sent()), "the transfer goes on over the larger path");
        run.join().expect("iperf3 thread")
    });

    // Every second of the transfer moved data, and it completed.
    let intervals = transfer["intervals"].as_array().expect("intervals");
    assert!(intervals.len() >= 14, "{} intervals", intervals.len());
    let per_second: Vec<u64> = intervals.iter().map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0)).collect();
    eprintln!("bytes per second: {per_second:?}");
    // Nothing was lost at the socket in the moment between the link shrinking and the TUN
    // following it: the datagrams too big for the new link were fragmented, not dropped.
    let drops = w.status("roamer").data_plane.map(|d| d.drops).unwrap_or_default();
    // On a failure, the client's own account of it (which error the sends met; its send
    // failures are logged, rate-limited) says which race it was.
    assert!(
        !drops.iter().any(|d| d.reason == "socket_error"),
        "{drops:?}\nthe client's send failures: {:?}",
        client.all_lines().iter().filter(|l| l.contains("sending to the gateway")).collect::<Vec<_>>()
    );
    assert!(per_second.iter().all(|b| *b > 0), "a second without progress: {per_second:?}");
    let received = transfer["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(received > 0, "the transfer completed");

    // Same device, same loops; its IPv6 address and routes are back.
    assert_eq!(ns.ifindex(TUN), Some(ifindex), "the TUN device was not re-created");
    let d = w.status("roamer").data_plane.expect("data plane");
    assert_eq!(d.loop_starts, 1, "the loops started once");
    assert!(wait_until(T, || ns.global_addr(TUN, "-6").is_some()), "the IPv6 address is back on the TUN");
    assert!(ns.ping_until(IpAddr::V6(gw6), T).is_some(), "IPv6 through the tunnel after");
    let lines = client.all_lines();
    let changes: Vec<&String> =
        lines.iter().filter(|l| l.contains("path MTU 1500 -> 1280 (link): TUN MTU 1436 -> 1216")).collect();
    assert_eq!(changes.len(), 1, "one line for the change down:\n{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("path MTU 1280 -> 1500 (link): TUN MTU 1216 -> 1436")),
        "{}",
        lines.join("\n")
    );
    w.stop(client);
}

/// A route's MTU metric changing at run time is followed too, although the gateway is pinned
/// (our pin, a host route without metrics, is not what says how big the path is).
#[test]
fn the_tun_follows_a_route_mtu_metric_changing_under_the_pin() {
    require_root!();
    let _one = one_at_a_time();
    let (w, client, ifindex) = World::with_client(1500, "metric");
    let ns = w.gw.clients_ns();
    let connected = ["198.18.0.0/30", "dev", CLIENT_LINK, "proto", "kernel", "scope", "link", "src", "198.18.0.1"];
    let with_mtu = |mtu: Option<&str>| {
        let mut args = vec!["route", "replace"];
        args.extend_from_slice(&connected);
        if let Some(m) = mtu {
            args.extend_from_slice(&["mtu", m]);
        }
        ns.ip(&args);
    };

    with_mtu(Some("1400"));
    await_tun_mtu(&w.gw, 1400 - OVERHEAD_V4, "follows the metric");
    let p = w.status("metric").data_plane.and_then(|d| d.path_mtu).expect("path MTU");
    assert_eq!((p.outer, p.tun_mtu, p.bound.as_str()), (1400, 1336, "link"));
    // The status also names the library the cipher runs on, as this CPU chose it.
    let aead = w.status("metric").data_plane.map(|d| d.aead);
    assert_eq!(aead.as_deref(), Some(holdfast::sansio::aead::Backend::for_this_cpu().name()));
    // A full-size packet for the new size crosses with DF set; one byte more is refused.
    let ping = |size: &str| {
        ns.exec("ping", &["-c", "1", "-M", "do", "-s", size, "-W", "2", &GW_TUN.to_string()]).status.success()
    };
    assert!(ping("1308"), "1336 = 20 + 8 + 1308 fits");
    assert!(!ping("1309"), "one byte more does not");

    with_mtu(None);
    await_tun_mtu(&w.gw, 1500 - OVERHEAD_V4, "back to the link's");
    assert_eq!(ns.ifindex(TUN), Some(ifindex), "the TUN device was not re-created");
    assert_eq!(w.status("metric").data_plane.map(|d| d.loop_starts), Some(1));
    w.stop(client);
}

/// A client that starts on a path below IPv6's minimum starts IPv4-only and gains IPv6 (address
/// and routes, on the same device) when the path grows.
#[test]
fn a_client_started_below_1280_gains_ipv6_when_the_path_grows() {
    require_root!();
    let _one = one_at_a_time();
    let (w, client, ifindex) = World::with_client(1280, "small");
    let ns = w.gw.clients_ns();
    assert_eq!(ns.global_addr(TUN, "-6"), None, "no IPv6 on a 1216-byte device");
    let gw6 = gateway_ip6(&w.gw);

    set_link_mtu(&w.gw, 1500);
    await_tun_mtu(&w.gw, 1500 - OVERHEAD_V4, "TUN MTU follows up");
    assert!(wait_until(T, || ns.global_addr(TUN, "-6").is_some()), "the IPv6 address comes");
    assert!(ns.ping_until(IpAddr::V6(gw6), T).is_some(), "IPv6 through the tunnel (its routes came too)");
    assert_eq!(ns.ifindex(TUN), Some(ifindex), "the TUN device was not re-created");
    let lines = client.all_lines();
    assert!(
        lines.iter().any(|l| l.contains("TUN MTU 1216 -> 1436; IPv6 ") && l.contains("back on the tunnel")),
        "{}",
        lines.join("\n")
    );
    w.stop(client);
}
