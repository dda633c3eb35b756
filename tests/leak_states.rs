//! Leak tests across the supervisor's states (issue 4), with real namespaces, real nftables, the
//! real gateway binary and the client's real kill-switch, data plane, routes and resolver (root
//! only; skipped otherwise).
//!
//! ```text
//!  client ns                                   gateway ns ("outside")
//!  eth0 198.18.0.2/24, 2001:db8::2/64  ------  up0 198.18.0.1/24, 2001:db8::1/64   (router)
//!  default routes via the router               lo: 198.19.0.1 or 2001:db8:ff::1 (gateway endpoint)
//!  holdfast0 (TUN, once connected)                 198.19.0.99, 2001:db8:ff::99 (remote hosts)
//! ```
//!
//! The observer counts, on `up0`, every packet that leaves the client namespace over its physical
//! link (by kind), and separately what arrives from the tunnel. In each state the client
//! namespace sends TCP, UDP, ICMP and DNS probes over IPv4 and IPv6 to the router, the gateway's
//! address (other ports) and the remote hosts. Nothing but the gateway's two ports may show on the
//! link; in Healthy the IPv4 and IPv6 probes to the remote host arrive through the tunnel. A
//! positive control (no client) first proves the observer sees every probe. The whole run is
//! done twice: with the gateway's endpoint an IPv4 address, and an IPv6 one.
//!
//! The client is the real `holdfast client run --no-tui` under `ip netns exec` (kill-switch first,
//! data plane, routes and resolver when the TUN is up, teardown in reverse on SIGTERM); states are
//! awaited on its transition log lines, and `holdfast client unblock` is the real command too.

#[macro_use]
mod leak_probes;
mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use holdfast::config::client::{ClientFile, DnsChoice};
use leak_probes::*;
use support::netns::Netns;
use support::{BIN, Proc, edit_client_file, fast_timings, holdfast_ok, s};

const PORT: u16 = 51820;
const GATEWAY4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
/// The resolver the client sets while connected: the gateway's tunnel address.
const TUNNEL_DNS: &str = "100.64.0.1";
/// How long any state change may take to show.
const T: Duration = Duration::from_secs(20);

struct World {
    /// The gateway's endpoint address (IPv4 or IPv6).
    gateway: IpAddr,
    client: Netns,
    gw: Netns,
    dir: tempfile::TempDir,
    logs: tempfile::TempDir,
    file: PathBuf,
    etc: NetnsEtc,
}

fn world() -> World {
    world_at(GATEWAY4.into())
}

/// The world with the gateway's endpoint at `gateway` (on the gateway namespace's loopback).
fn world_at(gateway: IpAddr) -> World {
    let client = Netns::new();
    let gw = Netns::new();
    wire(&client, &gw);
    match gateway {
        IpAddr::V4(v4) => gw.ip(&["addr", "add", &format!("{v4}/32"), "dev", "lo"]),
        IpAddr::V6(v6) => gw.ip(&["-6", "addr", "add", &format!("{v6}/128"), "dev", "lo", "nodad"]),
    };
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let endpoint = SocketAddr::new(gateway, PORT).to_string();
    holdfast_ok(&["gateway", "init", "--dir", s(dir.path()), "--endpoint", &endpoint]);
    let file = dir.path().join("leaky.toml");
    holdfast_ok(&["gateway", "add-client", "--dir", s(dir.path()), "leaky", "--out", s(&file)]);
    edit_client_file(&file, |f: &mut ClientFile| {
        fast_timings(f, logs.path());
        // Long enough to probe inside one Authing attempt and one Backoff wait.
        f.timing.rpc_deadline = Some(Duration::from_secs(4));
        f.timing.backoff_initial = Some(Duration::from_secs(3));
        f.timing.backoff_max = Some(Duration::from_secs(3));
        f.network.dns = DnsChoice::Servers(vec![TUNNEL_DNS.parse().unwrap()]);
    });
    let etc = NetnsEtc::new(&client, "nameserver 198.18.0.1\nsearch lan\n");
    World { gateway, client, gw, dir, logs, file, etc }
}

impl World {
    fn observer(&self) -> Observer<'_> {
        Observer::install(&self.gw, OUTSIDE_IF, self.gateway, PORT, PORT)
    }

    fn gateway(&self) -> Proc {
        let mut p = self.gw.spawn(
            "gateway",
            BIN,
            &["gateway", "run", "--dir", s(self.dir.path())],
            &[("RUST_LOG", "info,holdfast=debug")],
        );
        p.wait_for(&["data plane up"], T);
        p
    }

    /// The client, as the `child` helper in the client namespace.
    /// The real `holdfast client run`, headless, in the client's namespace.
    fn spawn_client(&self) -> Proc {
        self.spawn_client_with(&[])
    }

    /// [`World::spawn_client`] with extra environment variables.
    fn spawn_client_with(&self, env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.client.command(BIN);
        cmd.args(["client", "run", "--no-tui", "--config", s(&self.file)]).env_remove("RUST_LOG");
        cmd.envs(env.iter().copied());
        Proc::spawn("client", cmd)
    }

    /// The running client's `holdfast status --json`.
    fn status(&self) -> holdfast::client::status_socket::StatusReport {
        support::status_of(&self.logs.path().join("client.sock"))
    }

    /// The real `holdfast client unblock` in the client's namespace; returns what it printed.
    fn unblock(&self) -> String {
        let out = self.client.exec(BIN, &["client", "unblock"]);
        assert!(out.status.success(), "unblock: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Drops TCP to the gateway's control port in the gateway namespace (counted by the observer
    /// first: it hooks earlier).
    fn blackhole_control(&self, on: bool) {
        let rule = if on {
            format!(
                "table inet blackhole {{\n\tchain in {{\n\t\ttype filter hook input priority -10;\n\
                 \t\ttcp dport {PORT} drop\n\t}}\n}}\n"
            )
        } else {
            "table inet blackhole {}\ndelete table inet blackhole\n".to_owned()
        };
        self.gw.nft(&rule);
    }

    fn targets(&self) -> Vec<IpAddr> {
        let mut t = all_targets();
        t.push(self.gateway);
        t
    }

    /// A probe round; asserts nothing but the gateway's ports left over the link. Returns the
    /// counts (with what came through the tunnel).
    fn assert_no_leak(&self, obs: &Observer, state: &str) -> Counts {
        let c = probe_round(&self.client, obs, &self.targets(), self.gateway, PORT, PORT);
        assert!(c.leaks().is_empty(), "{state}: leaked over the physical link: {:?}", c.leaks());
        c
    }
}

/// Waits for the client's transition into `state` (its `From -> To (cause)` log lines).
fn wait_state(client: &mut Proc, state: &str) -> String {
    client.wait_for(&["holdfast::supervisor", &format!("-> {state} (")], T)
}

/// The state of the client's last transition line.
fn last_state(client: &Proc) -> String {
    let lines = client.all_lines();
    let last = lines
        .iter()
        .rev()
        .filter(|l| l.contains("holdfast::supervisor"))
        .find_map(|l| l.split(" -> ").nth(1))
        .unwrap_or_default();
    last.split(' ').next().unwrap_or_default().to_owned()
}

#[test]
fn no_leak_in_any_state() {
    require_root!();
    no_leak_in_any_state_with(world());
}

/// The same with the gateway reached over IPv6: its pin and fallback are /128s, the kill-switch
/// lets IPv6 out to it alone, and the tunnel carries both families.
#[test]
fn no_leak_in_any_state_with_an_ipv6_gateway() {
    require_root!();
    no_leak_in_any_state_with(world_at(GATEWAY6.into()));
}

fn no_leak_in_any_state_with(w: World) {
    let obs = w.observer();
    let before = HostState::of(&w.client, &w.etc);

    // Positive control: no client, so every probe reaches the link.
    probe_round(&w.client, &obs, &w.targets(), w.gateway, PORT, PORT);
    assert_all_seen(&obs);

    // Gateway down, its control port blackholed: the client starts (Unauthed) and sits in its
    // first authentication attempt (Authing) until the deadline.
    w.blackhole_control(true);
    let mut c = w.spawn_client();
    c.wait_for(&["kill-switch on"], T);
    wait_state(&mut c, "Authing");
    w.assert_no_leak(&obs, "Authing, gateway down");
    assert_eq!(last_state(&c), "Authing", "the probes ran in Authing");

    // The attempt times out: Backoff.
    wait_state(&mut c, "Backoff");
    w.assert_no_leak(&obs, "Backoff after a timed-out auth");
    assert_eq!(last_state(&c), "Backoff", "the probes ran in Backoff");

    // The gateway comes up: Healthy, with the tunnel, its routes and its resolver.
    w.blackhole_control(false);
    let _gateway = w.gateway();
    wait_state(&mut c, "Healthy");
    c.wait_for(&["routes up"], T);
    assert!(w.etc.read_resolv().contains(&format!("\nnameserver {TUNNEL_DNS}\n")));
    let counts = w.assert_no_leak(&obs, "Healthy");
    // The IPv4 and IPv6 probes to the remote host went through the tunnel, but for DNS: with
    // resolvers named in the file, port 53 through the tunnel goes to them only (issue 11).
    assert!(
        wait_until(T, || obs.counts().unseen_in_tunnel() == ["tun_dns4", "tun_dns6"]),
        "Healthy: probes not seen through the tunnel: {:?} ({counts:?})",
        obs.counts().unseen_in_tunnel()
    );
    assert_eq!(obs.counts().get("tun_dns4"), 0, "DNS to another resolver went through the tunnel");
    assert_eq!(obs.counts().get("tun_dns6"), 0, "DNS to another resolver went through the tunnel");

    // The control port blackholed while connected: Degraded (snapshot, tunnel and permits kept).
    w.blackhole_control(true);
    wait_state(&mut c, "Degraded");
    w.assert_no_leak(&obs, "Degraded");
    w.blackhole_control(false);
    wait_state(&mut c, "Healthy");

    // An explicit stop gives back the ruleset, routes and resolver exactly as they were.
    c.signal("TERM");
    assert_eq!(c.wait_exit(T), Some(0));
    assert_eq!(HostState::of(&w.client, &w.etc), before, "state after an explicit stop");
    probe_round(&w.client, &obs, &w.targets(), w.gateway, PORT, PORT);
    assert_all_seen(&obs);

    // Connected again, then revoked: the session ends, re-auth is rejected: Backoff.
    let mut c = w.spawn_client();
    wait_state(&mut c, "Healthy");
    c.wait_for(&["routes up"], T);
    holdfast_ok(&["gateway", "revoke", "--dir", s(w.dir.path()), "leaky"]);
    let line = wait_state(&mut c, "Backoff");
    assert!(line.to_lowercase().contains("reject"), "{line}");
    w.assert_no_leak(&obs, "Backoff after a rejected auth");

    // SIGKILL: the rules stay (fail closed), the TUN and its routes are gone.
    c.kill();
    assert!(wait_until(T, || w.client.tun_devices().is_empty()));
    w.assert_no_leak(&obs, "after SIGKILL");

    // `unblock` gives the namespace back.
    let msg = w.unblock();
    assert!(msg.contains("removed the kill-switch"), "{msg}");
    assert!(msg.contains("restored /etc/resolv.conf"), "{msg}");
    assert_eq!(HostState::of(&w.client, &w.etc), before, "state after unblock");
    probe_round(&w.client, &obs, &w.targets(), w.gateway, PORT, PORT);
    assert_all_seen(&obs);
}

#[test]
fn start_fails_with_77_when_the_kill_switch_cannot_be_applied() {
    require_root!();
    let w = world();
    // A tunnel name nft cannot take: the plan is refused before anything runs.
    edit_client_file(&w.file, |f| f.network.tun_name = Some("bad name".into()));
    let mut c = w.spawn_client();
    let line = c.wait_for(&["holdfast client:"], T);
    assert!(line.contains("kill-switch"), "{line}");
    assert_eq!(c.wait_exit(T), Some(77));
    assert!(!ruleset(&w.client).contains("holdfast"));
}

/// What other programs do to the firewall, as `nft` arguments or a script for `nft -f`.
enum Attack {
    Flush,
    DeleteTable,
    /// Another program's ruleset, loaded the way such programs do: flush everything, then theirs.
    LoadRuleset,
}

const OTHER_RULESET: &str = "flush ruleset\ntable inet otherfw {\n\tchain output {\n\t\t\
    type filter hook output priority 10; policy accept;\n\t\tcounter\n\t}\n}\n";

impl Attack {
    const ALL: [Attack; 3] = [Attack::Flush, Attack::DeleteTable, Attack::LoadRuleset];

    /// Runs the attack in `ns`; returns whether `nft` succeeded.
    fn run(&self, ns: &Netns) -> bool {
        match self {
            Attack::Flush => ns.exec("nft", &["flush", "ruleset"]).status.success(),
            Attack::DeleteTable => ns.exec("nft", &["delete", "table", "inet", "holdfast"]).status.success(),
            Attack::LoadRuleset => {
                let mut child = ns
                    .command("nft")
                    .args(["-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("nft");
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(OTHER_RULESET.as_bytes()).unwrap();
                child.wait().unwrap().success()
            }
        }
    }
}

/// Whether the kill-switch table exists in `ns` (asked over netlink, no process start).
fn table_present(ns: &Netns) -> bool {
    in_ns(ns, holdfast::client::killswitch::table_present).expect("ask nf_tables")
}

/// The attacks of issue 13 against a running client, in Healthy and in Backoff: after each, no
/// probe leaks, and the other program's own rules loaded. In the watched mode the table is back
/// within 100 ms of each attack (measured from the moment `nft` returned).
fn other_programs_cannot_open_the_kill_switch(fallback: bool) {
    let w = world();
    let obs = w.observer();
    // Positive control: no client, so every probe reaches the link.
    probe_round(&w.client, &obs, &w.targets(), GATEWAY4.into(), PORT, PORT);
    assert_all_seen(&obs);

    let _gateway = w.gateway();
    let env: &[(&str, &str)] = if fallback { &[(holdfast::client::killswitch::FORCE_FALLBACK_ENV, "1")] } else { &[] };
    let mut c = w.spawn_client_with(env);
    let mode = if fallback { "watched" } else { "owned" };
    c.wait_for(&["kill-switch on", &format!("({mode}:")], T);
    wait_state(&mut c, "Healthy");
    c.wait_for(&["routes up"], T);
    assert!(w.status().killswitch.contains(&format!("[{mode}]")), "{}", w.status().killswitch);

    for state in ["Healthy", "Backoff"] {
        if state == "Backoff" {
            holdfast_ok(&["gateway", "revoke", "--dir", s(w.dir.path()), "leaky"]);
            wait_state(&mut c, "Backoff");
        }
        for attack in Attack::ALL {
            let ok = attack.run(&w.client);
            let done = std::time::Instant::now();
            match (&attack, fallback) {
                // Nobody but the owner may delete an owned table.
                (Attack::DeleteTable, false) => assert!(!ok, "{state}: deleting the owned table succeeded"),
                _ => assert!(ok, "{state}: the other program's nft failed"),
            }
            if fallback {
                assert!(wait_until(Duration::from_secs(2), || table_present(&w.client)), "{state}: not restored");
                let restored_in = done.elapsed();
                assert!(
                    restored_in <= Duration::from_millis(100),
                    "{state}: the table came back after {restored_in:?} (bound: 100 ms)"
                );
            } else {
                assert!(table_present(&w.client), "{state}: the owned table went away");
            }
            if let Attack::LoadRuleset = attack {
                let theirs = w.client.exec("nft", &["list", "table", "inet", "otherfw"]);
                assert!(theirs.status.success(), "{state}: the other program's ruleset did not load");
                w.client.exec_ok("nft", &["delete", "table", "inet", "otherfw"]);
            }
            w.assert_no_leak(&obs, state);
            assert_eq!(last_state(&c), state, "the probes ran in {state}");
        }
    }
    assert!(c.is_alive(), "the client died");
    c.signal("TERM");
    assert_eq!(c.wait_exit(T), Some(0));
    assert!(!table_present(&w.client), "an explicit stop removes the table");
}

#[test]
fn other_programs_cannot_open_the_owned_kill_switch() {
    require_root!();
    other_programs_cannot_open_the_kill_switch(false);
}

#[test]
fn the_watched_fallback_restores_the_kill_switch_within_100ms() {
    require_root!();
    other_programs_cannot_open_the_kill_switch(true);
}

/// Sends UDP to a remote host from `ns` as fast as it can until `stop`, counting in `sent`.
fn flood(ns: &Netns, stop: &std::sync::atomic::AtomicBool, sent: &std::sync::atomic::AtomicU64) {
    in_ns(ns, || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = sock.send_to(b"gap probe", (REMOTE4, PROBE_PORT));
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
}

#[test]
fn a_killed_clients_table_blocks_is_adopted_without_a_gap_and_unblock_removes_it() {
    require_root!();
    let w = world();
    let obs = w.observer();
    let _gateway = w.gateway();
    let mut c = w.spawn_client();
    wait_state(&mut c, "Healthy");
    c.kill();
    assert!(wait_until(T, || w.client.tun_devices().is_empty()));
    // The table outlived its owner and still blocks; nobody owns it now.
    assert!(table_present(&w.client));
    w.assert_no_leak(&obs, "after SIGKILL");

    // The next start adopts it while a flood probes for a gap.
    obs.reset();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sent = std::sync::atomic::AtomicU64::new(0);
    let sent = std::thread::scope(|sc| {
        let f = sc.spawn(|| flood(&w.client, &stop, &sent));
        let guard = StopOnDrop(&stop);
        // The flood runs before the client starts, so the whole start is under fire.
        assert!(wait_until(T, || sent.load(std::sync::atomic::Ordering::Relaxed) > 100));
        let mut c = w.spawn_client();
        c.wait_for(&["kill-switch on (owned"], T);
        wait_state(&mut c, "Healthy");
        drop(guard);
        f.join().unwrap();
        let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        // Adopted: it is this client's now, so another program still cannot delete it.
        assert!(!w.client.exec("nft", &["delete", "table", "inet", "holdfast"]).status.success());
        c.kill();
        sent
    });
    assert!(sent > 100, "the flood barely ran ({sent})");
    // What went through the tunnel once it was up is fine; nothing may show on the link.
    let counts = obs.counts();
    assert_eq!(counts.get("udp4"), 0, "flood probes leaked around the restart: {counts:?}");
    w.assert_no_leak(&obs, "after the second kill");

    let msg = w.unblock();
    assert!(msg.contains("removed the kill-switch"), "{msg}");
    assert!(!table_present(&w.client));
}

#[test]
fn a_deleted_tun_comes_back_while_traffic_flows() {
    require_root!();
    let w = world();
    // The gateway is multi-homed here (its endpoint on lo): its data plane must answer from the
    // endpoint address, the only one the kill-switch lets in.
    let toml = w.dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("listen = \"{GATEWAY4}:{PORT}\"\n{text}")).unwrap();
    let obs = w.observer();
    let _gateway = w.gateway();
    let mut c = w.spawn_client();
    wait_state(&mut c, "Healthy");
    c.wait_for(&["routes up"], T);
    let before = w.status();
    let dp = before.data_plane.clone().expect("data plane up");
    let old_ifindex = dp.tun.as_ref().expect("tun").ifindex;
    assert_eq!(dp.loop_starts, 1);

    // A ping through the tunnel to the gateway's tunnel address.
    let mut ping = support::Pinger::start(&w.client, "ping", Ipv4Addr::new(100, 64, 0, 1), "0.05");
    assert!(
        ping.first_reply_after(&w.client, support::unix_now(), T).is_some(),
        "no traffic before: {:?} {:?} {:?} {}",
        ping.replies(),
        w.client.exec("ping", &["-c", "2", "-W", "1", "100.64.0.1"]),
        w.status().data_plane,
        w.client.ip(&["addr"]),
    );

    let cut = support::unix_now();
    w.client.ip(&["link", "del", "holdfast0"]);
    let back = ping.first_reply_after(&w.client, cut, Duration::from_secs(10)).expect("traffic never came back");
    assert!(back <= Duration::from_secs(2), "traffic came back after {back:?} (bound: 2 s)");
    c.wait_for(&["re-created it (ifindex"], T);

    // The same process, the same loops, a new device, the snapshot untouched.
    assert!(c.is_alive());
    let after = w.status();
    let dp = after.data_plane.clone().expect("data plane up");
    assert_eq!(dp.loop_starts, 1, "the loops were restarted");
    assert_ne!(dp.tun.expect("tun").ifindex, old_ifindex, "no new device");
    assert_eq!(
        after.snapshot.as_ref().map(|s| &s.session_id),
        before.snapshot.as_ref().map(|s| &s.session_id),
        "the snapshot changed"
    );
    assert_eq!(last_state(&c), "Healthy");
    // The full-tunnel routes are back on the new device.
    assert!(
        wait_until(T, || w.client.ip(&["route", "get", &REMOTE4.to_string()]).contains("dev holdfast0")),
        "{}",
        w.client.ip(&["route", "show"])
    );
    w.assert_no_leak(&obs, "after the TUN came back");
    // One log line for the incident.
    let lines = c.all_lines();
    assert_eq!(lines.iter().filter(|l| l.contains("removed by another program")).count(), 1, "{lines:#?}");
    drop(ping);
    c.signal("TERM");
    assert_eq!(c.wait_exit(T), Some(0));
}
