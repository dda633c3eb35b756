//! The kill-switch, routes and DNS on real namespaces with real nftables and rtnetlink (root only;
//! skipped otherwise).
//!
//! Topology per test: a client namespace and an "outside" namespace (the gateway's side) joined by
//! a veth pair on 198.18.0.0/24 and 2001:db8::/64, remote addresses behind the outside end, and the
//! observer of `leak_probes` counting what arrives there. The kill-switch is applied by the
//! library code on a thread moved into the client namespace (the `nft` it runs inherits that
//! namespace), or by this test binary re-run under `ip netns exec` (for the resolver file, which
//! `ip netns exec` bind-mounts from /etc/netns/<ns>/). Everything is deleted on drop, also when a
//! test panics; the machine's own namespace is never touched.

#[macro_use]
mod leak_probes;
mod support;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use holdfast::client::dns::{self, Dns};
use holdfast::client::killswitch::{self, KillSwitch, KillSwitchPlan, NftKillSwitch};
use holdfast::client::routes::{self, RouteSpec, Routes, RoutesError};
use leak_probes::*;
use support::netns::Netns;

const CONTROL_PORT: u16 = 7443;
const DATA_PORT: u16 = 7444;
const TUN: &str = "hf0";

struct World {
    client: Netns,
    outside: Netns,
}

fn world() -> World {
    let w = World { client: Netns::new(), outside: Netns::new() };
    wire(&w.client, &w.outside);
    w
}

/// The kill-switch plan of these tests: the gateway is the outside end of the link, with distinct
/// control and data ports so a wrong protocol on either port shows.
fn plan() -> KillSwitchPlan {
    KillSwitchPlan::new(OUTSIDE4.into(), CONTROL_PORT, DATA_PORT, TUN).unwrap()
}

/// A probe round against this test's gateway (the outside end, [`plan`]'s ports).
fn round(w: &World, obs: &Observer) -> Counts {
    probe_round(&w.client, obs, &all_targets(), OUTSIDE4.into(), CONTROL_PORT, DATA_PORT)
}

#[test]
fn only_the_gateway_ports_pass_and_disable_restores_the_ruleset() {
    require_root!();
    let w = world();
    let obs = Observer::install(&w.outside, OUTSIDE_IF, OUTSIDE4, CONTROL_PORT, DATA_PORT);
    // Someone else's table in the client namespace: it must survive untouched.
    w.client.nft(
        "table ip unrelated {\n\tchain out {\n\t\ttype filter hook output priority 10; policy accept;\n\
         \t\tcounter\n\t}\n}\n",
    );
    // Stateless (`-s`): the counter in that table moves with the probes.
    let before = ruleset(&w.client);

    // Positive control: without the kill-switch, every probe arrives.
    round(&w, &obs);
    assert_all_seen(&obs);

    let ks = NftKillSwitch::new(plan());
    in_ns(&w.client, || ks.enable()).expect("enable");
    assert!(in_ns(&w.client, || ks.table_present()).unwrap());
    let counts = round(&w, &obs);
    assert!(counts.leaks().is_empty(), "leaked past the kill-switch: {:?}", counts.leaks());
    assert!(counts.get("gw_control") >= 1 && counts.get("gw_data") >= 1, "{counts:?}");

    // A second enable (a restart after SIGKILL) replaces the table: still exactly one.
    in_ns(&w.client, || ks.enable()).expect("enable again");
    let tables = w.client.exec_ok("nft", &["list", "tables"]);
    assert_eq!(tables.matches("holdfast").count(), 1, "{tables}");

    in_ns(&w.client, || ks.disable()).expect("disable");
    assert_eq!(ruleset(&w.client), before, "disable changed something besides our table");
    // Disabling twice is harmless (a stop after an unblock).
    in_ns(&w.client, || ks.disable()).expect("disable again");

    // And the probes flow again.
    round(&w, &obs);
    assert_all_seen(&obs);
}

#[test]
fn ipv6_gateway_and_allow_lan() {
    require_root!();
    let w = world();
    // The LAN as discovered in the client namespace: its link's subnets, both families
    // (link-local included), never loopback.
    let lan = in_ns(&w.client, || killswitch::lan_subnets(TUN)).unwrap();
    let expected: Vec<ipnet::IpNet> =
        ["198.18.0.0/24", "2001:db8::/64", "fe80::/64"].iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(lan, expected);
    // The gateway over IPv6.
    let ks =
        NftKillSwitch::new(KillSwitchPlan::new(OUTSIDE6.into(), CONTROL_PORT, DATA_PORT, TUN).unwrap().allow_lan(&lan));
    let obs = Observer::install(&w.outside, OUTSIDE_IF, OUTSIDE4, CONTROL_PORT, DATA_PORT);
    in_ns(&w.client, || ks.enable()).expect("enable");

    // LAN hosts are reachable (not DNS); the remote addresses are not.
    obs.reset();
    send_probes(&w.client, &[OUTSIDE4.into(), OUTSIDE6.into()]);
    assert!(wait_until(Duration::from_secs(5), || {
        let c = obs.counts();
        ["tcp4", "udp4", "icmp4", "tcp6", "udp6", "icmp6"].iter().all(|k| c.get(k) >= 1)
    }));
    let c = obs.counts();
    assert_eq!((c.get("dns4"), c.get("dns6")), (0, 0), "DNS to the LAN must not pass: {c:?}");

    obs.reset();
    send_probes(&w.client, &[REMOTE4.into(), REMOTE6.into()]);
    // The gateway over IPv6 passes; use it as the barrier.
    send_gateway_probes(&w.client, OUTSIDE6.into(), CONTROL_PORT, DATA_PORT);
    assert!(wait_until(Duration::from_secs(5), || {
        let c = obs.counts();
        c.get("udp6") >= 1 && c.get("tcp6") >= 1
    }));
    let c = obs.counts();
    assert_eq!(c.leaks(), vec![("tcp6".to_owned(), 1), ("udp6".to_owned(), 1)], "{c:?}");
    in_ns(&w.client, || ks.disable()).expect("disable");
}

/// A TCP connection from `from` to `to` in `ns`: whether it opened within 1 s.
fn tcp_opens(ns: &Netns, from: std::net::SocketAddr, to: std::net::SocketAddr) -> bool {
    in_ns(ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&from.into()).unwrap();
        s.connect_timeout(&to.into(), Duration::from_secs(1)).is_ok()
    })
}

/// The conntrack entries of `ns` (none where conntrack never ran there).
fn conntrack_entries(ns: &Netns) -> u64 {
    let out = ns.exec("sh", &["-c", "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0"]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_gateway_answers_on_its_control_port_but_opens_nothing_and_conntrack_stays_out() {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    require_root!();
    let w = world();
    let ks = NftKillSwitch::new(plan());
    in_ns(&w.client, || ks.enable()).expect("enable");
    let control: SocketAddr = (OUTSIDE4, CONTROL_PORT).into();

    // The gateway's side opening a connection to a service of the client: dropped.
    let service = in_ns(&w.client, || TcpListener::bind((CLIENT4, 9000))).unwrap();
    let to_client: SocketAddr = (CLIENT4, 9000).into();
    assert!(!tcp_opens(&w.outside, control, to_client), "the gateway opened a connection through the kill-switch");

    // The client's own connection to the control port: its replies come in, both ways.
    let server = in_ns(&w.outside, || TcpListener::bind(control)).unwrap();
    server.set_nonblocking(true).unwrap();
    let mut conn = in_ns(&w.client, || TcpStream::connect_timeout(&control, Duration::from_secs(2)))
        .expect("the client's connection to the gateway's control port");
    assert!(wait_until(Duration::from_secs(2), || server
        .accept()
        .is_ok_and(|(mut s, _)| { s.set_nonblocking(false).is_ok() && s.write_all(b"hello").is_ok() })));
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = [0u8; 5];
    conn.read_exact(&mut got).expect("the gateway's answer");
    assert_eq!(&got, b"hello");

    // No rule needs connection tracking, so none ran in the client's namespace.
    assert_eq!(conntrack_entries(&w.client), 0, "the kill-switch loaded conntrack");

    // Positive control: without the kill-switch, the same opening goes through.
    drop((conn, server));
    in_ns(&w.client, || ks.disable()).expect("disable");
    assert!(tcp_opens(&w.outside, control, to_client), "the opening fails even without the kill-switch");
    drop(service);
}

/// Sends UDP probes to a remote address from the client namespace until `stop` is set; returns
/// how many sends were attempted.
fn udp_flood(client: &Netns, stop: &AtomicBool) -> u64 {
    in_ns(client, || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let _ = sock.send_to(b"gap probe", (REMOTE4, PROBE_PORT));
            n += 1;
        }
        n
    })
}

/// Replaces the kill-switch `rounds` times with `replace` while probes stream out; returns the
/// counts on the outside and the number of probes sent.
fn replace_under_fire(w: &World, obs: &Observer, rounds: usize, replace: impl Fn(usize) + Sync) -> (Counts, u64) {
    obs.reset();
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let flood = s.spawn(|| udp_flood(&w.client, &stop));
        let guard = StopOnDrop(&stop);
        for i in 0..rounds {
            replace(i);
        }
        drop(guard);
        flood.join().expect("flood thread")
    });
    send_gateway_probes(&w.client, OUTSIDE4.into(), CONTROL_PORT, DATA_PORT);
    assert!(wait_until(Duration::from_secs(5), || obs.counts().get("gw_data") >= 1));
    (obs.counts(), sent)
}

#[test]
fn a_leftover_table_is_replaced_without_a_gap() {
    require_root!();
    let w = world();
    let obs = Observer::install(&w.outside, OUTSIDE_IF, OUTSIDE4, CONTROL_PORT, DATA_PORT);
    // Plan B differs (another tunnel name), so every enable really swaps the rules.
    let plan_b = KillSwitchPlan::new(OUTSIDE4.into(), CONTROL_PORT, DATA_PORT, "hf1").unwrap();
    // A "killed" run left its table: its owner (socket) is gone, the table stays, orphaned.
    in_ns(&w.client, || NftKillSwitch::new(plan()).enable()).unwrap();
    assert!(in_ns(&w.client, killswitch::table_present).unwrap());

    // Each round is a new run that adopts the table its killed predecessor left, and dies in
    // turn (its kill-switch dropped without disable).
    let (counts, sent) = replace_under_fire(&w, &obs, 30, |i| {
        let p = if i % 2 == 0 { plan_b.clone() } else { plan() };
        in_ns(&w.client, || NftKillSwitch::new(p).enable()).expect("adopt");
    });
    assert!(sent > 100, "the flood barely ran ({sent} sends)");
    assert_eq!(counts.get("udp4"), 0, "a probe slipped through while the table was adopted");
    // The last run was plan A's (i = 29): the kernel's table is plan A's.
    assert_listing(&w.client, &plan());

    // Positive control of this test's sensitivity: removing and re-adding in two steps (what the
    // single batch avoids) does leave gaps the flood finds.
    let a = NftKillSwitch::new(plan());
    let (counts, _) = replace_under_fire(&w, &obs, 30, |_| {
        in_ns(&w.client, || {
            a.disable().unwrap();
            a.enable().unwrap();
        });
    });
    assert!(counts.get("udp4") > 0, "the flood would not have seen a gap: {counts:?}");
    in_ns(&w.client, || a.disable()).unwrap();
}

/// The kernel's table, printed by the real `nft`, is exactly the plan's rules (text, comments,
/// order), and `nft -j` agrees chain by chain.
fn assert_listing(ns: &Netns, plan: &KillSwitchPlan) {
    let listed = ns.exec_ok("nft", &["-s", "list", "table", "inet", "holdfast"]);
    let body: String = listed
        .lines()
        .filter(|l| l.starts_with("\t\t") || l.starts_with("\tchain") || *l == "\t}")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(body, killswitch::rules::listing(&killswitch::rules::chains(plan)), "{listed}");
    let json = ns.exec_ok("nft", &["-j", "list", "table", "inet", "holdfast"]);
    killswitch::check_listing(&json, plan).expect("nft -j listing");
}

#[test]
fn a_foreign_table_of_our_name_is_rebuilt_to_the_plan() {
    require_root!();
    let w = world();
    let ks = NftKillSwitch::new(plan());
    let expected = {
        in_ns(&w.client, || ks.enable()).unwrap();
        let listed = w.client.exec_ok("nft", &["-s", "list", "table", "inet", "holdfast"]);
        in_ns(&w.client, || ks.disable()).unwrap();
        listed
    };
    let foreign = [
        // A plain table (no owner flags) with an extra accepting chain.
        "chain forward {\n\t\ttype filter hook forward priority 0; policy accept;",
        // A chain of ours on another priority.
        "chain output {\n\t\ttype filter hook output priority 10; policy accept;",
    ];
    for chain in foreign {
        w.client.nft(&format!("table inet holdfast {{\n\t{chain}\n\t}}\n}}\n"));
        in_ns(&w.client, || ks.enable()).expect("rebuilt");
        let listed = w.client.exec_ok("nft", &["-s", "list", "table", "inet", "holdfast"]);
        assert_eq!(listed, expected, "after a table with {chain:?}");
        in_ns(&w.client, || ks.disable()).unwrap();
    }
}

#[test]
fn unblock_refuses_a_running_clients_table_but_restores_the_resolver_and_routes() {
    require_root!();
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.168.1.1\n").unwrap();
    std::mem::forget(Dns::apply_resolv_conf(&resolv, &["100.64.0.1".parse().unwrap()], &[]).unwrap());
    w.client.ip(&["route", "add", "198.19.0.99/32", "via", &OUTSIDE4.to_string(), "proto", "207"]);
    // A live owner: the table is its, only it may remove it.
    let running = NftKillSwitch::new(plan());
    in_ns(&w.client, || running.enable()).unwrap();

    let err = in_ns(&w.client, || killswitch::unblock_with(&resolv)).unwrap_err().to_string();
    assert!(err.contains(&format!("restored {}", resolv.display())), "{err}");
    assert!(err.contains("removed 1 leftover route(s)"), "{err}");
    assert!(err.contains("failed: ") && err.contains("another running process"), "{err}");
    assert_eq!(std::fs::read_to_string(&resolv).unwrap(), "nameserver 192.168.1.1\n");
    assert_eq!(w.client.ip(&["route", "show", "proto", "207"]), "");
    assert!(in_ns(&w.client, killswitch::table_present).unwrap(), "the running client's table went");

    // A second client in the same namespace is refused the same way, with a clear message.
    let err = in_ns(&w.client, || NftKillSwitch::new(plan()).enable()).unwrap_err().to_string();
    assert!(err.contains("another holdfast client running"), "{err}");
    in_ns(&w.client, || running.disable()).unwrap();
}

/// A device standing in for the TUN: routes only need an interface that is up with a carrier.
/// (A veth pair with both ends in the namespace; deleting `TUN` deletes its peer too.)
fn fake_tun(ns: &Netns) {
    ns.ip(&["link", "add", TUN, "type", "veth", "peer", "name", "hf0peer"]);
    ns.ip(&["link", "set", "hf0peer", "up"]);
    ns.ip(&["link", "set", TUN, "up"]);
}

/// Runs `fut` on a current-thread runtime on a thread inside `ns` (netlink sockets are opened in
/// the namespace of the thread that opens them).
fn block_on_in<T: Send>(ns: &Netns, fut: impl Future<Output = T> + Send) -> T {
    in_ns(ns, || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(fut))
}

#[test]
fn routes_pin_the_gateway_and_restore_exactly() {
    require_root!();
    let w = world();
    fake_tun(&w.client);
    let before = route_table(&w.client);
    // The gateway is "on the internet": reached through the router at the outside end.
    let gw: IpAddr = REMOTE4.into();
    let dns: Vec<IpAddr> = vec!["100.64.0.1".parse().unwrap()];
    let cidrs = routes::tunnel_cidrs(None, &dns);

    let guard = block_on_in(&w.client, Routes::install(TUN, gw, &cidrs)).expect("install");
    assert!(matches!(guard.routes()[0], RouteSpec::Host { via, .. } if via == IpAddr::from(OUTSIDE4)));
    // The host route and both families' halves.
    assert_eq!(guard.routes().len(), 5, "{:?}", guard.routes());
    let get = |dst: &str| w.client.ip(&["route", "get", dst]);
    assert!(get("198.19.0.99").contains(&format!("via {OUTSIDE4} dev {CLIENT_IF}")), "{}", get("198.19.0.99"));
    for dst in ["8.8.8.8", "100.64.0.1", "203.0.113.1"] {
        assert!(get(dst).contains(&format!("dev {TUN}")), "{dst}: {}", get(dst));
    }
    // The LAN stays on the link (connected routes are more specific than the halves).
    assert!(get("198.18.0.1").contains(&format!("dev {CLIENT_IF}")));
    let ours = w.client.ip(&["route", "show", "proto", "207"]);
    assert_eq!(ours.lines().count(), 3, "{ours}");
    // IPv6 goes into the tunnel too, but the link's own /64 stays on the link.
    for dst in ["2001:db8:ff::99", "2001:db8:77::1"] {
        assert!(get(dst).contains(&format!("dev {TUN}")), "{dst}: {}", get(dst));
    }
    assert!(get("2001:db8::1").contains(&format!("dev {CLIENT_IF}")));
    let ours6 = w.client.ip(&["-6", "route", "show", "proto", "207"]);
    assert_eq!(ours6.lines().count(), 2, "{ours6}");

    block_on_in(&w.client, guard.restore()).expect("restore");
    assert_eq!(route_table(&w.client), before);
}

#[test]
fn routes_skip_the_host_route_when_not_needed_and_recover_leftovers() {
    require_root!();
    let w = world();
    fake_tun(&w.client);
    let before = route_table(&w.client);
    let full = routes::tunnel_cidrs(None, &[]);

    // A gateway on the directly connected subnet: no host route.
    let g = block_on_in(&w.client, Routes::install(TUN, OUTSIDE4.into(), &full)).unwrap();
    assert!(g.routes().iter().all(|r| matches!(r, RouteSpec::Tunnel { .. })), "{:?}", g.routes());
    block_on_in(&w.client, g.restore()).unwrap();
    // A split tunnel that does not cover the gateway: no host route either.
    let split = routes::tunnel_cidrs(Some(&["10.0.0.0/8".parse().unwrap()]), &[]);
    let g = block_on_in(&w.client, Routes::install(TUN, REMOTE4.into(), &split)).unwrap();
    assert_eq!(g.routes().len(), 1);
    block_on_in(&w.client, g.restore()).unwrap();
    assert_eq!(route_table(&w.client), before);

    // A run killed while connected: its guard is never restored and its TUN disappears; the host
    // route stays behind, tagged.
    let g = block_on_in(&w.client, Routes::install(TUN, REMOTE4.into(), &full)).unwrap();
    std::mem::forget(g);
    w.client.ip(&["link", "del", TUN]);
    assert_eq!(w.client.ip(&["route", "show", "proto", "207"]).lines().count(), 1);
    // The next start installs cleanly over it.
    fake_tun(&w.client);
    let g = block_on_in(&w.client, Routes::install(TUN, REMOTE4.into(), &full)).unwrap();
    assert_eq!(w.client.ip(&["route", "show", "proto", "207"]).lines().count(), 3);
    // Restoring after the TUN is already gone (data plane stopped first) is fine.
    w.client.ip(&["link", "del", TUN]);
    block_on_in(&w.client, g.restore()).unwrap();
    assert_eq!(w.client.ip(&["route", "show", "proto", "207"]), "");

    // No TUN: a clear error, nothing added.
    let err = block_on_in(&w.client, Routes::install(TUN, REMOTE4.into(), &full)).unwrap_err();
    assert!(matches!(err, RoutesError::NoInterface(_)), "{err}");
}

/// Set by the parent test when it re-runs this binary as a helper inside a namespace.
const CHILD_ENV: &str = "HOLDFAST_KILLSWITCH_CHILD";

/// Starts this test binary's `child` helper inside `ns` under `ip netns exec` (so it sees the
/// namespace's resolv.conf at /etc/resolv.conf), in `mode`.
fn spawn_child(ns: &Netns, mode: &str) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    ns.command(exe.to_str().unwrap())
        .args(["--exact", "child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the child's stdout until a line containing `prefix`; returns the line from there (the
/// test harness prints `test child ... ` before the child's first line).
fn read_until(child: &mut std::process::Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "child ended before printing {prefix:?}");
        if let Some(at) = line.find(prefix) {
            return line[at..].trim_end().to_owned();
        }
    }
}

/// The helper the DNS test runs inside a namespace (does nothing when run normally).
#[test]
#[ignore = "helper: run by dns_in_a_namespace_and_unblock_after_a_kill"]
fn child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    match mode.as_str() {
        "dns" => {
            let guard = Dns::apply(TUN, &["100.64.0.1".parse().unwrap()], &[]).unwrap();
            println!("applied");
            // Holds the change until the parent closes our stdin (or kills us).
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
            guard.restore().unwrap();
            println!("restored");
        }
        "unblock" => match killswitch::unblock() {
            Ok(msg) => println!("unblock ok: {msg}"),
            Err(e) => println!("unblock failed: {e}"),
        },
        other => panic!("unknown child mode {other}"),
    }
}

/// Files directly in /etc: the rewrite must not leave temporaries there.
fn etc_listing() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/etc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "netns")
        .collect();
    v.sort();
    v
}

#[test]
fn dns_in_a_namespace_and_unblock_after_a_kill() {
    require_root!();
    let w = world();
    let original = "nameserver 198.18.0.53\nsearch example\n";
    let etc = NetnsEtc::new(&w.client, original);
    let host_resolv = std::fs::read("/etc/resolv.conf").ok();
    let host_etc = etc_listing();

    // A clean stop: applied, then restored exactly.
    let mut c = spawn_child(&w.client, "dns");
    read_until(&mut c, "applied");
    let during = std::fs::read_to_string(etc.resolv()).unwrap();
    assert!(during.contains("\nnameserver 100.64.0.1\n"), "{during}");
    assert_eq!(dns::parse_ours(&during), Some(dns::Original::File(original.into())));
    drop(c.stdin.take());
    read_until(&mut c, "restored");
    assert!(c.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(etc.resolv()).unwrap(), original);

    // A client killed while connected: kill-switch, resolver and host route stay behind...
    let mut c = spawn_child(&w.client, "dns");
    read_until(&mut c, "applied");
    c.kill().unwrap();
    c.wait().unwrap();
    in_ns(&w.client, || NftKillSwitch::new(plan()).enable()).unwrap();
    w.client.ip(&["route", "add", "198.19.0.99/32", "via", &OUTSIDE4.to_string(), "proto", "207"]);
    assert!(dns::parse_ours(&std::fs::read_to_string(etc.resolv()).unwrap()).is_some());

    // ... and `unblock` removes all three.
    let mut u = spawn_child(&w.client, "unblock");
    let line = read_until(&mut u, "unblock");
    assert!(u.wait().unwrap().success());
    assert_eq!(
        line,
        "unblock ok: removed the kill-switch (table inet holdfast); restored /etc/resolv.conf; \
         removed 1 leftover route(s)"
    );
    assert_eq!(std::fs::read_to_string(etc.resolv()).unwrap(), original);
    assert!(!w.client.nft_ruleset().contains("holdfast"));
    assert_eq!(w.client.ip(&["route", "show", "proto", "207"]), "");

    // With nothing left, unblock says so.
    let mut u = spawn_child(&w.client, "unblock");
    assert_eq!(read_until(&mut u, "unblock"), "unblock ok: no kill-switch was active");
    assert!(u.wait().unwrap().success());

    // The machine's own resolver and /etc were never touched.
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_resolv);
    assert_eq!(etc_listing(), host_etc);
}
