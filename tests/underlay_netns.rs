//! The client follows its underlay (root only; skipped otherwise): the real gateway and the real
//! `holdfast client run` in namespaces, with the link taken down, the default route moved to
//! another router, and the client's address changed under a running client.
//!
//! ```text
//!  direct world                               gateway ns
//!  hfc 198.18.0.1/24 (roams to .3) ---------- hfg 198.18.0.2/24 (endpoint 198.18.0.2:51820)
//!
//!  routed world                               gateway ns (both routers, endpoint on lo)
//!  hfa 198.18.1.2/24 ------------------------ up1 198.18.1.1/24
//!  hfb 198.18.2.2/24 ------------------------ up2 198.18.2.1/24
//!  default via 198.18.1.1 (moves to .2.1)     lo 198.19.0.1 (endpoint 198.19.0.1:51820)
//!
//!  routed IPv6 world: the same, with 2001:db8:1::/64 and 2001:db8:2::/64 on the links and the
//!  endpoint [2001:db8:ff::1]:51820 (the pin and fallback are /128s)
//! ```
//!
//! Asserted: the gateway's address never resolves into the TUN (sampled `ip route get` all along,
//! and an nftables counter on packets to the gateway leaving through the TUN, with a positive
//! control); the host route follows the new router; traffic through the tunnel and the control
//! plane recover within bounds, in the same client process; and an explicit stop gives the
//! routing tables back exactly. Every wait is on a condition, bounded.

#[macro_use]
mod leak_probes;
mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use holdfast::client::status_socket::StatusReport;
use leak_probes::{StopOnDrop, route_table};
use support::netns::{self, Netns};
use support::{GatewayDir, Proc, fast_timings, holdfast_ok, s, status_of, wait_until};

const PORT: u16 = 51820;
const TUN: &str = "holdfast0";
const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// Bound on waits for start-up events.
const T: Duration = Duration::from_secs(20);
/// Traffic through the tunnel flows again within this after the underlay is back.
const TRAFFIC_BOUND: Duration = Duration::from_secs(5);
/// The control plane is Healthy again, with a check answered after the change, within this.
/// The old client kept using its dead TCP connection until HTTP/2 keepalive gave up on it:
/// about 11 s with these timings (10 s keepalive interval + 1 s timeout).
const CONTROL_BOUND: Duration = Duration::from_secs(4);

/// A provisioned gateway whose namespaces the caller built.
fn gateway_dir(gw_ns: Netns, client_ns: Netns, endpoint: impl Into<IpAddr>) -> GatewayDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = SocketAddr::new(endpoint.into(), PORT).to_string();
    holdfast_ok(&["gateway", "init", "--dir", s(dir.path()), "--endpoint", &endpoint]);
    let gw = GatewayDir { dir, port: PORT, ns: gw_ns, client_ns: Some(client_ns) };
    // Replies leave from the endpoint address on every link: the only source the client's
    // kill-switch accepts.
    gw.set("listen", &format!("\"{endpoint}\""));
    gw
}

/// A running gateway and client, with the client's logs and status socket.
struct Running {
    gateway: Proc,
    client: Proc,
    logs: tempfile::TempDir,
    file: PathBuf,
}

impl Running {
    fn start(gw: &GatewayDir, health: Option<Duration>) -> Running {
        let mut gateway = gw.run("gateway");
        gateway.wait_for(&["data plane up"], T);
        let logs = tempfile::tempdir().expect("tempdir");
        let file = gw.add_client("roamer", |f| {
            fast_timings(f, logs.path());
            if let Some(h) = health {
                // No jitter: when the health timer fires says when it was armed.
                f.timing.health_min = Some(h);
                f.timing.health_max = Some(h);
            }
            // The data plane sends often, so a misrouted keepalive would show at once.
            f.network.keepalive = Some(Duration::from_millis(200));
        });
        let mut client = gw.run_client("client", &file);
        client.wait_for(&["routes up"], T);
        Running { gateway, client, logs, file }
    }

    fn socket(&self) -> PathBuf {
        self.logs.path().join("client.sock")
    }

    fn status(&self) -> StatusReport {
        status_of(&self.socket())
    }

    fn wait_state(&self, state: &str, within: Duration) -> bool {
        wait_until(within, || self.status().state == state)
    }

    /// Stops the client explicitly: it is the process that was started, and exits 0.
    fn stop_client(&mut self) {
        assert!(self.client.is_alive(), "the client died:\n{}", self.client.all_lines().join("\n"));
        assert_eq!(self.status().pid, self.client.pid(), "the status socket is our process's");
        assert_eq!(self.client.terminate(T), Some(0), "{}", self.client.all_lines().join("\n"));
    }

    /// After the faults: nothing to the gateway `gw` went into the TUN (neither in the sampled
    /// routes nor on the counter, whose positive control then runs), the control plane is
    /// Healthy in the same process, and an explicit stop gives back the routes as `before`.
    fn finish(&mut self, ns: &Netns, gw: IpAddr, sampled: (usize, Vec<String>), before: &str) {
        let (samples, into_tun) = sampled;
        eprintln!("{samples} route samples");
        assert!(into_tun.is_empty(), "the gateway resolved into the TUN: {into_tun:?}");
        assert_eq!(tun_counter(ns), 0, "packets to the gateway went into the TUN");
        assert!(self.wait_state("Healthy", T), "the control plane recovers");
        assert_counter_sees_tun_traffic(ns, gw);
        ns.nft("delete table inet hfprobe\n");
        self.stop_client();
        assert_eq!(route_table(ns), before, "routes after an explicit stop");
        assert!(self.gateway.is_alive(), "the gateway exited:\n{}", self.gateway.all_lines().join("\n"));
    }
}

/// `ip route get DST` in `ns`: the kernel's answer, or its error.
fn route_get(ns: &Netns, dst: IpAddr) -> String {
    let out = ns.exec("ip", &["route", "get", &dst.to_string()]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What the route sampler has done so far; the body of [`sampling`] waits on it.
struct Samples {
    taken: AtomicUsize,
    stop: AtomicBool,
}

impl Samples {
    /// Waits (bounded) until the sampler has looked a few more times: each phase of the body
    /// is observed, however quickly the client reacts.
    fn observe(&self) {
        let from = self.taken.load(Ordering::Relaxed);
        assert!(wait_until(T, || self.taken.load(Ordering::Relaxed) >= from + 3), "sampler stalled");
    }
}

/// Runs `body` while a thread samples `ip route get GW` in `ns`; returns the number of samples
/// and the answers that went through the TUN.
fn sampling(ns: &Netns, gw: IpAddr, body: impl FnOnce(&Samples)) -> (usize, Vec<String>) {
    let samples = Samples { taken: AtomicUsize::new(0), stop: AtomicBool::new(false) };
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut bad = Vec::new();
            while !samples.stop.load(Ordering::Relaxed) {
                let answer = route_get(ns, gw);
                if answer.contains(TUN) {
                    bad.push(answer);
                }
                samples.taken.fetch_add(1, Ordering::Relaxed);
            }
            bad
        });
        let stop = StopOnDrop(&samples.stop);
        body(&samples);
        drop(stop);
        let bad = sampler.join().expect("sampler");
        (samples.taken.load(Ordering::Relaxed), bad)
    })
}

/// Counts, in `ns`, packets to `gw` that leave through the TUN (they must never).
fn install_tun_counter(ns: &Netns, gw: IpAddr) {
    let ip = if gw.is_ipv4() { "ip" } else { "ip6" };
    ns.nft(&format!(
        "table inet hfprobe {{\n chain out {{ type filter hook output priority -300; \
         oifname \"{TUN}\" {ip} daddr {gw} counter; }}\n}}\n"
    ));
}

fn tun_counter(ns: &Netns) -> u64 {
    let listing = ns.exec_ok("nft", &["list", "table", "inet", "hfprobe"]);
    listing
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listing}"))
}

/// Positive control: a packet to `gw` forced out through the TUN is counted.
fn assert_counter_sees_tun_traffic(ns: &Netns, gw: IpAddr) {
    let before = tun_counter(ns);
    // The reply does not matter; the packet leaving through the TUN does.
    let _ = ns.exec("ping", &["-c", "1", "-W", "0.3", "-I", TUN, &gw.to_string()]);
    assert!(tun_counter(ns) > before, "positive control: the counter sees packets in the TUN");
}

/// Two fresh namespaces without IPv6: these tests are about IPv4 routes, and link-local
/// addresses that come and go with the links (after duplicate address detection) would make
/// the "routes restored exactly" comparison racy.
fn namespaces() -> (Netns, Netns) {
    let pair = (Netns::new(), Netns::new());
    for ns in [&pair.0, &pair.1] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    }
    pair
}

/// Two fresh namespaces with IPv6, without duplicate address detection (addresses, and the
/// routes of link-local ones, are there as soon as a link is) and keeping addresses on a link
/// taken down (as IPv4 does; IPv6 would drop them, and a roam back would find none).
fn namespaces6() -> (Netns, Netns) {
    let pair = (Netns::new(), Netns::new());
    for ns in [&pair.0, &pair.1] {
        for key in ["accept_dad=0", "keep_addr_on_down=1"] {
            let (k, v) = key.split_once('=').unwrap_or_default();
            ns.sysctl(&format!("net.ipv6.conf.all.{k}"), v);
            ns.sysctl(&format!("net.ipv6.conf.default.{k}"), v);
        }
    }
    pair
}

fn direct_world() -> (GatewayDir, IpAddr) {
    let (gw_ns, client_ns) = namespaces();
    let gw = Ipv4Addr::new(198, 18, 0, 2);
    netns::link(&client_ns, "hfc", Ipv4Addr::new(198, 18, 0, 1), &gw_ns, "hfg", gw, 24);
    (gateway_dir(gw_ns, client_ns, gw), gw.into())
}

/// Which end of the client's link goes down.
#[derive(Clone, Copy)]
enum Outage {
    /// `ip link set hfc down` in the client: the kernel deletes every route through the device.
    Admin,
    /// The gateway's end goes down: the client's device loses its carrier, and its routes stay,
    /// flagged `linkdown`.
    Carrier,
}

/// A directly connected gateway, its link down for a while, then up: nothing to the gateway
/// enters the TUN at any time, and traffic recovers.
fn link_outage(outage: Outage) {
    let (gw, gw_ip) = direct_world();
    let ns = gw.clients_ns();
    let before = route_table(ns);
    let mut run = Running::start(&gw, None);
    assert!(ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    assert!(route_get(ns, gw_ip).contains("dev hfc"), "{}", route_get(ns, gw_ip));
    install_tun_counter(ns, gw_ip);
    let set_link = |state: &str| match outage {
        Outage::Admin => ns.ip(&["link", "set", "hfc", state]),
        Outage::Carrier => gw.ns.ip(&["link", "set", "hfg", state]),
    };

    let sampled = sampling(ns, gw_ip, |sampled| {
        set_link("down");
        sampled.observe();
        // Down until the client has tried the gateway and noticed: pings through the tunnel
        // (the data plane sends them on to the gateway) and its health checks.
        assert_eq!(ns.ping_count(GW_TUN, 10), 0, "the link is down");
        assert!(run.wait_state("Degraded", T), "the client notices the link is gone");
        assert_eq!(tun_counter(ns), 0, "packets to the gateway went into the TUN");
        set_link("up");
        sampled.observe();
        assert!(
            wait_until(TRAFFIC_BOUND, || route_get(ns, gw_ip).contains("dev hfc")),
            "the gateway is routed on the link again: {}",
            route_get(ns, gw_ip)
        );
        let back = ns.ping_until(GW_TUN, TRAFFIC_BOUND);
        assert!(back.is_some(), "traffic recovers within {TRAFFIC_BOUND:?} of the link coming back");
        sampled.observe();
    });
    run.finish(ns, gw_ip, sampled, &before);
}

#[test]
fn a_directly_connected_gateway_never_routes_into_the_tunnel_while_the_link_is_down() {
    require_root!();
    link_outage(Outage::Admin);
}

#[test]
fn a_directly_connected_gateway_never_routes_into_the_tunnel_while_the_carrier_is_lost() {
    require_root!();
    link_outage(Outage::Carrier);
}

/// One of the client's uplinks in the routed world.
struct Uplink {
    dev: &'static str,
    addr: IpAddr,
    router: IpAddr,
}

/// Moves the default route from `from` to `to` and takes `from` down, as a laptop leaving one
/// network for another does; asserts the gateway's host route, the tunnel's traffic and the
/// control plane (a new connection from `to`'s address) follow.
fn roam(ns: &Netns, run: &mut Running, sampled: &Samples, endpoint: IpAddr, to: &Uplink, from: &Uplink) {
    ns.ip(&["link", "set", to.dev, "up"]);
    let family = if to.router.is_ipv4() { "-4" } else { "-6" };
    ns.ip(&[family, "route", "replace", "default", "via", &to.router.to_string(), "dev", to.dev]);
    sampled.observe();
    let via = format!("via {} dev {}", to.router, to.dev);
    assert!(
        wait_until(TRAFFIC_BOUND, || route_get(ns, endpoint).contains(&via)),
        "the host route follows the new router ({via}): {}",
        route_get(ns, endpoint)
    );
    ns.ip(&["link", "set", from.dev, "down"]);
    sampled.observe();
    let back = ns.ping_until(GW_TUN, TRAFFIC_BOUND);
    assert!(back.is_some(), "traffic through the tunnel recovers over {}", to.dev);
    // "remote=198.18.2.2:" or "remote=[2001:db8:2::2]:", whatever the port.
    let remote = match to.addr {
        IpAddr::V4(a) => format!("remote={a}:"),
        IpAddr::V6(a) => format!("remote=[{a}]:"),
    };
    run.gateway.wait_for(&["control connection established", &remote], T);
}

#[test]
fn the_host_route_follows_the_default_route_to_another_router() {
    require_root!();
    let (gw_ns, ns) = namespaces();
    let endpoint: IpAddr = Ipv4Addr::new(198, 19, 0, 1).into();
    let (a4, ra4) = (Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 1, 1));
    let (b4, rb4) = (Ipv4Addr::new(198, 18, 2, 2), Ipv4Addr::new(198, 18, 2, 1));
    let a = Uplink { dev: "hfa", addr: a4.into(), router: ra4.into() };
    let b = Uplink { dev: "hfb", addr: b4.into(), router: rb4.into() };
    netns::link(&ns, a.dev, a4, &gw_ns, "up1", ra4, 24);
    netns::link(&ns, b.dev, b4, &gw_ns, "up2", rb4, 24);
    gw_ns.ip(&["addr", "add", &format!("{endpoint}/32"), "dev", "lo"]);
    ns.default_route(ra4);
    roam_back_and_forth(gateway_dir(gw_ns, ns, endpoint), endpoint, &a, &b, |_| {});
}

/// With the client on uplink `a` (its default route there), starts gateway and client, checks
/// the pin (and `extra` on the client's namespace), then roams to `b` and back while sampling
/// that nothing to the gateway ever enters the tunnel.
fn roam_back_and_forth(gw: GatewayDir, endpoint: IpAddr, a: &Uplink, b: &Uplink, extra: impl Fn(&Netns)) {
    let ns = gw.clients_ns();
    let before = route_table(ns);

    let mut run = Running::start(&gw, None);
    assert!(ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    let first = format!("via {} dev {}", a.router, a.dev);
    assert!(route_get(ns, endpoint).contains(&first), "{}", route_get(ns, endpoint));
    extra(ns);
    install_tun_counter(ns, endpoint);

    let sampled = sampling(ns, endpoint, |sampled| {
        roam(ns, &mut run, sampled, endpoint, b, a);
        roam(ns, &mut run, sampled, endpoint, a, b);
        ns.ip(&["link", "set", b.dev, "up"]);
        sampled.observe();
    });
    run.finish(ns, endpoint, sampled, &before);
}

/// The same roam with the gateway reached over IPv6: the watcher keeps the /128 pin on the
/// current router (a global next hop), and nothing to the gateway ever enters the tunnel, whose
/// `::/1` and `8000::/1` would capture it.
#[test]
fn the_ipv6_host_route_follows_the_default_route_to_another_router() {
    require_root!();
    let (gw_ns, ns) = namespaces6();
    let v6 = |net: u16, host: u16| Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host);
    let endpoint: IpAddr = v6(0xff, 1).into();
    let a = Uplink { dev: "hfa", addr: v6(1, 2).into(), router: v6(1, 1).into() };
    let b = Uplink { dev: "hfb", addr: v6(2, 2).into(), router: v6(2, 1).into() };
    netns::link(&ns, a.dev, Ipv4Addr::new(198, 18, 1, 2), &gw_ns, "up1", Ipv4Addr::new(198, 18, 1, 1), 24);
    netns::link(&ns, b.dev, Ipv4Addr::new(198, 18, 2, 2), &gw_ns, "up2", Ipv4Addr::new(198, 18, 2, 1), 24);
    for (u, gw_dev, net) in [(&a, "up1", 1), (&b, "up2", 2)] {
        ns.add_addr6(u.dev, v6(net, 2), 64);
        gw_ns.add_addr6(gw_dev, v6(net, 1), 64);
    }
    gw_ns.ip(&["-6", "addr", "add", &format!("{endpoint}/128"), "dev", "lo", "nodad"]);
    ns.ip(&["-6", "route", "add", "default", "via", &a.router.to_string(), "dev", a.dev]);
    roam_back_and_forth(gateway_dir(gw_ns, ns, endpoint), endpoint, &a, &b, |ns| {
        let ours = ns.ip(&["-6", "route", "show", "proto", "207"]);
        assert!(ours.contains(&format!("unreachable {endpoint} ")), "the /128 fallback: {ours}");
        assert!(ours.contains("::/1 dev holdfast0") && ours.contains("8000::/1 dev holdfast0"), "{ours}");
    });
}

#[test]
fn the_control_plane_is_healthy_again_soon_after_the_address_changes() {
    require_root!();
    let (gw, gw_ip) = direct_world();
    let ns = gw.clients_ns();
    let health = Duration::from_secs(1);
    let mut run = Running::start(&gw, Some(health));
    assert!(ns.ping_until(GW_TUN, T).is_some(), "tunnel up");
    assert!(run.wait_state("Healthy", T));
    run.gateway.wait_for(&["control connection established", "198.18.0.1"], T);

    // Roam: the client's address on its link changes.
    ns.ip(&["addr", "del", "198.18.0.1/24", "dev", "hfc"]);
    ns.ip(&["addr", "add", "198.18.0.3/24", "dev", "hfc"]);
    let roamed = Instant::now();
    let roamed_at_ms = run.status().uptime_ms;

    // Healthy, with a health check answered after the roam: without jitter, the armed check's
    // time minus the interval is when the last success (or the entry into Healthy) armed it.
    let healthy_again = wait_until(CONTROL_BOUND, || {
        let r = run.status();
        let armed_at = r
            .next_timer
            .as_ref()
            .filter(|t| t.purpose == "health check")
            .map(|t| (r.uptime_ms + t.in_ms).saturating_sub(health.as_millis() as u64));
        r.state == "Healthy" && armed_at.is_some_and(|at| at >= roamed_at_ms)
    });
    assert!(
        healthy_again,
        "Healthy with a check answered after the roam within {CONTROL_BOUND:?}: {:?}\n{}",
        run.status(),
        run.client.all_lines().join("\n")
    );
    // The gateway saw the control plane come from the new address.
    let left = CONTROL_BOUND.saturating_sub(roamed.elapsed()) + Duration::from_millis(500);
    run.gateway.wait_for(&["control connection established", "198.18.0.3"], left);
    assert!(ns.ping_until(GW_TUN, TRAFFIC_BOUND).is_some(), "traffic flows from the new address");
    assert!(route_get(ns, gw_ip).contains("src 198.18.0.3"), "{}", route_get(ns, gw_ip));
    run.stop_client();
}

#[test]
fn a_killed_clients_gateway_routes_are_cleaned_up_by_the_next_start() {
    require_root!();
    let (gw, gw_ip) = direct_world();
    let ns = gw.clients_ns();
    let before = route_table(ns);
    let mut run = Running::start(&gw, None);
    let ours = || ns.ip(&["route", "show", "proto", "207"]);
    assert!(ours().contains(&format!("unreachable {gw_ip} ")), "the fallback is in place: {}", ours());
    assert!(ours().contains(&format!("{gw_ip} dev hfc ")), "the on-link pin is in place: {}", ours());

    // Killed: the TUN and its routes go; the gateway's pin and fallback stay (fail closed).
    run.client.kill();
    assert!(wait_until(T, || ns.tun_devices().is_empty()), "the TUN goes with the process");
    assert!(ours().contains(&format!("unreachable {gw_ip} ")), "{}", ours());

    // The next start removes them with any other leftover, and its stop restores exactly.
    run.client = gw.run_client("client-again", &run.file);
    run.client.wait_for(&["routes up"], T);
    assert!(ns.ping_until(GW_TUN, T).is_some(), "tunnel up again");
    assert_eq!(ours().matches(&format!("unreachable {gw_ip} ")).count(), 1, "{}", ours());
    run.stop_client();
    assert_eq!(route_table(ns), before, "routes after an explicit stop");
}
