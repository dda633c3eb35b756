//! Fault-injection soak (issue 6): a real gateway and two real clients in network namespaces,
//! steady pings through the tunnel, and a seeded random schedule of faults, some overlapping.
//! Root only (skipped otherwise).
//!
//! ```text
//!  client0 ns                                  gateway ns
//!  hfc 198.18.0.1/24 (roams to .3) ---------- hfg  198.18.0.2/24  (endpoint 198.18.0.2:51820)
//!  client1 ns
//!  hfc 198.18.1.2/24 ------------------------ hfg2 198.18.1.1/24
//!  (host route to 198.18.0.2 via .1.1)
//! ```
//!
//! Environment: `HOLDFAST_SOAK_SEED` (default 42) and `HOLDFAST_SOAK_SECS` (default 120) for
//! longer runs by hand. Whatever the duration, every fault kind is injected at least once.
//!
//! Asserted: both client processes are the ones started; their loops and TUN devices were started
//! once (`holdfast status --json`); after every episode of faults clears, ping replies flow again
//! on both clients within [`RECOVERY_BOUND`]; the observer on client0's physical link saw nothing
//! but the gateway's two ports (also under active leak probes sent during every episode);
//! client0's RSS at the end is within [`RSS_MARGIN_KIB`] of its RSS after warm-up; its log
//! lines at info and above stay within a budget per fault; the gateway only ever exited when we
//! killed it, and both the gateway and the clients stop cleanly (exit 0) at the end.
//!
//! The hold times and gaps between faults are the schedule itself (what is being tested), not
//! synchronisation: every wait for an *effect* is on an event (a ping reply, a log line) and
//! bounded.

#[macro_use]
mod leak_probes;
mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use holdfast::client::status_socket::StatusReport;
use leak_probes::{Counts, Observer, in_ns, probe_round, send_probes};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use support::netns::{self, Netns};
use support::{BIN, GatewayDir, Pinger, Proc, edit_client_file, fast_timings, holdfast_ok, s, unix_now};

const PORT: u16 = 51820;
const GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// client0's two addresses on its link: it roams between them.
const HOME: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 3)];
const CLIENT_IF: &str = "hfc";
const GW_IF: &str = "hfg";
/// Bound on each wait for a process event.
const T: Duration = Duration::from_secs(20);
/// After every episode of faults clears, ping replies must flow again within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// Client RSS growth allowed over the run.
const RSS_MARGIN_KIB: u64 = 20 * 1024;
/// Log lines (info and above) allowed: a start-up allowance plus this many per fault.
const LOG_BASE: usize = 20;
const LOG_PER_FAULT: usize = 6;
/// No new episode starts this close to the end of the run (one episode takes up to ~12 s).
const TAIL: Duration = Duration::from_secs(8);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    GatewayKill,
    GatewayStop,
    Revoke,
    Expire,
    ControlBlackhole,
    UdpBlackhole,
    UdpLoss,
    LinkDown,
    Garbage,
    Roam,
}

impl Fault {
    const ALL: [Fault; 10] = [
        Fault::GatewayKill,
        Fault::GatewayStop,
        Fault::Revoke,
        Fault::Expire,
        Fault::ControlBlackhole,
        Fault::UdpBlackhole,
        Fault::UdpLoss,
        Fault::LinkDown,
        Fault::Garbage,
        Fault::Roam,
    ];

    /// Faults that act on the gateway process: at most one of them at a time (a SIGCONT or a
    /// SIGUSR2 must reach the process it was meant for).
    fn on_gateway_process(self) -> bool {
        matches!(self, Fault::GatewayKill | Fault::GatewayStop | Fault::Expire)
    }

    /// The nftables table this fault uses in the gateway namespace, if any.
    fn gw_table(self) -> Option<&'static str> {
        match self {
            Fault::ControlBlackhole => Some("soak_ctl"),
            Fault::UdpBlackhole => Some("soak_udp"),
            Fault::UdpLoss => Some("soak_loss"),
            Fault::Garbage => Some("soak_dup"),
            _ => None,
        }
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One client: its namespace, file, logs, process and pinger.
struct Client {
    name: String,
    file: PathBuf,
    logs: tempfile::TempDir,
    proc: Proc,
    pinger: Pinger,
}

impl Client {
    fn socket(&self) -> PathBuf {
        self.logs.path().join("client.sock")
    }

    fn status(&self) -> StatusReport {
        support::status_of(&self.socket())
    }

    /// (loop starts, TUN ifindex) from the status report.
    fn data_plane_identity(&self) -> (u32, u32) {
        let r = self.status();
        assert_eq!(r.pid, self.proc.pid(), "{}: the status socket answers for our process", self.name);
        let Some(dp) = r.data_plane.clone() else { panic!("{}: no data plane in {r:?}", self.name) };
        let tun = dp.tun.unwrap_or_else(|| panic!("{}: no TUN in the status", self.name));
        (dp.loop_starts, tun.ifindex)
    }
}

fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Lines at info level or above in a client's log files.
fn visible_log_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("holdfast-client") && name.ends_with(".log") {
            let text = std::fs::read_to_string(entry.path()).expect("read log");
            lines.extend(
                text.lines()
                    .filter(|l| [" INFO ", " WARN ", " ERROR "].iter().any(|lv| l.contains(lv)))
                    .map(str::to_owned),
            );
        }
    }
    lines
}

struct Soak<'a> {
    gw: &'a GatewayDir,
    /// client1's namespace (client0 runs in `gw.client_ns`).
    ns1: &'a Netns,
    gateway: Proc,
    gateway_runs: u32,
    clients: Vec<Client>,
    rng: StdRng,
    /// client0's current address (index into [`HOME`]).
    home: usize,
    injected: BTreeMap<Fault, u32>,
    recoveries: Vec<(String, Duration)>,
    probe_rounds: u32,
    log: Vec<String>,
}

impl Soak<'_> {
    fn ns(&self, i: usize) -> &Netns {
        if i == 0 { self.gw.clients_ns() } else { self.ns1 }
    }

    fn start_gateway(gw: &GatewayDir, n: u32) -> Proc {
        let mut p = gw.run(&format!("gateway#{n}"));
        p.wait_for(&["data plane up"], T);
        p
    }

    /// The gateway exits only when we kill it.
    fn assert_gateway_alive(&mut self, when: &str) {
        assert!(
            self.gateway.is_alive(),
            "the gateway exited on its own ({when}):\n{}",
            self.gateway.all_lines().join("\n")
        );
    }

    fn assert_clients_alive(&mut self, when: &str) {
        for c in &mut self.clients {
            assert!(c.proc.is_alive(), "{} died ({when}):\n{}", c.name, c.proc.all_lines().join("\n"));
        }
    }

    /// Records a schedule event (printed as it happens, so a failing CI log shows the schedule).
    fn note(&mut self, what: String) {
        let line = format!("[{:.3}] {what}", unix_now());
        eprintln!("soak: {line}");
        self.log.push(line);
    }

    fn gw_table(&self, table: &str, body: Option<String>) {
        let script = match body {
            Some(chains) => format!("table ip {table} {{\n{chains}}}\n"),
            None => format!("table ip {table} {{}}\ndelete table ip {table}\n"),
        };
        self.gw.ns.nft(&script);
    }

    fn begin(&mut self, f: Fault) {
        *self.injected.entry(f).or_default() += 1;
        self.note(format!("+ {f:?}"));
        let addr = HOME[self.home];
        match f {
            Fault::GatewayKill => {
                self.assert_gateway_alive("before SIGKILL");
                self.gateway.signal("KILL");
                self.gateway.wait_exit(T);
            }
            Fault::GatewayStop => {
                self.assert_gateway_alive("before SIGSTOP");
                self.gateway.signal("STOP");
            }
            Fault::Expire => {
                self.assert_gateway_alive("before SIGUSR2");
                self.gateway.signal("USR2");
            }
            Fault::Revoke => {
                holdfast_ok(&["gateway", "revoke", "--dir", s(self.gw.path()), &self.clients[0].name]);
            }
            Fault::ControlBlackhole => self.gw_table(
                "soak_ctl",
                Some(format!(
                    "chain in {{ type filter hook input priority -10; tcp dport {PORT} drop; }}\n\
                     chain out {{ type filter hook output priority -10; tcp sport {PORT} drop; }}\n"
                )),
            ),
            Fault::UdpBlackhole => self.gw_table(
                "soak_udp",
                Some(format!(
                    "chain in {{ type filter hook input priority -10; udp dport {PORT} drop; }}\n\
                     chain out {{ type filter hook output priority -10; udp sport {PORT} drop; }}\n"
                )),
            ),
            Fault::UdpLoss => self.gw_table(
                "soak_loss",
                Some(format!(
                    "chain in {{ type filter hook input priority -10; \
                     udp dport {PORT} numgen random mod 100 < 30 drop; }}\n\
                     chain out {{ type filter hook output priority -10; \
                     udp sport {PORT} numgen random mod 100 < 30 drop; }}\n"
                )),
            ),
            Fault::LinkDown => {
                self.ns(0).ip(&["link", "set", CLIENT_IF, "down"]);
            }
            Fault::Garbage => {
                // Replays both ways for the hold: every datagram the gateway sends to client0 is
                // duplicated on the wire, and so is every one client0 sends (in its namespace).
                self.gw_table(
                    "soak_dup",
                    Some(format!(
                        "chain post {{ type filter hook postrouting priority 0; \
                         ip daddr {addr} udp sport {PORT} dup to {addr}; }}\n"
                    )),
                );
                self.ns(0).nft(&format!(
                    "table ip soak_dup {{\n chain post {{ type filter hook postrouting priority 0; \
                     udp dport {PORT} dup to {GW}; }}\n}}\n"
                ));
                self.garbage_burst();
            }
            Fault::Roam => {
                let next = 1 - self.home;
                let ns = self.ns(0);
                ns.ip(&["addr", "del", &format!("{}/24", HOME[self.home]), "dev", CLIENT_IF]);
                ns.ip(&["addr", "add", &format!("{}/24", HOME[next]), "dev", CLIENT_IF]);
                self.home = next;
            }
        }
    }

    fn end(&mut self, f: Fault) {
        self.note(format!("- {f:?}"));
        match f {
            Fault::GatewayKill => {
                self.gateway_runs += 1;
                self.gateway = Self::start_gateway(self.gw, self.gateway_runs);
            }
            Fault::GatewayStop => self.gateway.signal("CONT"),
            Fault::Revoke => self.re_add(),
            Fault::LinkDown => {
                self.ns(0).ip(&["link", "set", CLIENT_IF, "up"]);
            }
            Fault::Garbage => {
                self.gw_table("soak_dup", None);
                self.ns(0).nft("table ip soak_dup {}\ndelete table ip soak_dup\n");
            }
            Fault::Expire | Fault::Roam => {}
            Fault::ControlBlackhole | Fault::UdpBlackhole | Fault::UdpLoss => {
                self.gw_table(f.gw_table().expect("a table"), None);
            }
        }
    }

    /// Re-adds the revoked client: new credentials, written to a temporary file first and
    /// renamed over the client's file, so the client never reads a half-written one.
    fn re_add(&mut self) {
        let c = &self.clients[0];
        let tmp = self.gw.path().join(format!("{}.readd.toml", c.name));
        holdfast_ok(&["gateway", "add-client", "--dir", s(self.gw.path()), &c.name, "--out", s(&tmp)]);
        let logs = c.logs.path().to_owned();
        edit_client_file(&tmp, |f| fast_timings(f, &logs));
        std::fs::rename(&tmp, &c.file).expect("replace the client file");
    }

    /// Garbage, truncated and stranger datagrams at the gateway's data port, from client0's
    /// namespace (the kill-switch lets UDP to the gateway's port out).
    fn garbage_burst(&mut self) {
        let mut datagrams: Vec<Vec<u8>> = Vec::new();
        for _ in 0..100 {
            let len = self.rng.random_range(0..1400);
            datagrams.push((0..len).map(|_| self.rng.random()).collect());
        }
        for id in 0..20u64 {
            let mut d = holdfast::sansio::wire::Header {
                msg_type: holdfast::sansio::wire::MsgType::Data,
                csum_partial: false,
                session_id: holdfast::snapshot::SessionId(0x5eed_0000 + id),
                counter: id,
            }
            .to_bytes()
            .to_vec();
            d.extend_from_slice(&[0xaa; 48]);
            datagrams.push(d);
        }
        let to = SocketAddr::from((GW, PORT));
        in_ns(self.ns(0), || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind garbage socket");
            for d in &datagrams {
                // A send may fail while the link is down: that is part of the schedule.
                let _ = sock.send_to(d, to);
            }
        });
    }

    /// Leak probes from client0's namespace while faults are active (nothing waits on them).
    fn probe(&mut self) {
        let targets: Vec<IpAddr> = vec![GW.into(), Ipv4Addr::new(198, 19, 0, 99).into()];
        send_probes(self.ns(0), &targets);
        self.probe_rounds += 1;
    }

    /// One episode: one fault, or two overlapping; returns when all have cleared and both
    /// clients' traffic has recovered.
    fn episode(&mut self, first: Fault, deck: &mut Vec<Fault>) {
        let mut faults = vec![first];
        if self.rng.random_bool(0.35)
            && let Some(i) =
                deck.iter().position(|&g| !(g.on_gateway_process() && first.on_gateway_process()) && g != first)
        {
            faults.push(deck.remove(i));
        }
        // (offset, is_start, fault), offsets in ms from the episode's start.
        let mut events = Vec::new();
        let mut at = 0u64;
        for &f in &faults {
            let hold = self.rng.random_range(500..4000);
            events.push((at, true, f));
            events.push((at + hold, false, f));
            // The second fault starts while the first is held.
            at += self.rng.random_range(0..hold);
        }
        events.sort_by_key(|&(t, start, _)| (t, !start));
        let t0 = Instant::now();
        let mut active = 0;
        for (t, start, f) in events {
            let due = t0 + Duration::from_millis(t);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if start {
                self.begin(f);
                active += 1;
                self.probe();
            } else {
                self.end(f);
                active -= 1;
            }
            self.assert_clients_alive(&format!("after {} {f:?}", if start { "+" } else { "-" }));
        }
        assert_eq!(active, 0);
        self.assert_gateway_alive("after the episode");
        let cleared = unix_now();
        for i in 0..self.clients.len() {
            let ns = if i == 0 { self.gw.clients_ns() } else { self.ns1 };
            let c = &mut self.clients[i];
            let Some(took) = c.pinger.first_reply_after(ns, cleared, RECOVERY_BOUND) else {
                panic!(
                    "{}: no ping reply within {RECOVERY_BOUND:?} after {faults:?} cleared\n\
                     schedule so far: {:?}\nclient output:\n{}\ngateway output (tail):\n{}",
                    c.name,
                    self.log,
                    c.proc.all_lines().join("\n"),
                    tail(&self.gateway.all_lines(), 60),
                );
            };
            let label = faults.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join("+");
            let what = format!("{}:{label}", c.name);
            self.recoveries.push((what.clone(), took));
            self.note(format!("recovered {what} in {took:?}"));
        }
    }
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Two namespaces joined to the gateway's, the gateway provisioned with two clients.
fn world() -> (GatewayDir, Netns) {
    let gw_ns = Netns::new();
    let ns0 = Netns::new();
    let ns1 = Netns::new();
    netns::link(&ns0, CLIENT_IF, HOME[0], &gw_ns, GW_IF, GW, 24);
    let gw1 = Ipv4Addr::new(198, 18, 1, 1);
    netns::link(&ns1, CLIENT_IF, Ipv4Addr::new(198, 18, 1, 2), &gw_ns, "hfg2", gw1, 24);
    // Every client file names the same endpoint; client1 reaches it through its link.
    ns1.ip(&["route", "add", &format!("{GW}/32"), "via", &gw1.to_string()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("{GW}:{PORT}");
    holdfast_ok(&["gateway", "init", "--dir", s(dir.path()), "--endpoint", &endpoint]);
    let gw = GatewayDir { dir, port: PORT, ns: gw_ns, client_ns: Some(ns0) };
    // Bound to the endpoint address, the gateway's replies leave from it on both links: the
    // only source the clients' kill-switch accepts.
    gw.set("listen", &format!("\"{endpoint}\""));
    (gw, ns1)
}

#[test]
fn soak_under_a_seeded_fault_schedule() {
    require_root!();
    let seed: u64 = env_or("HOLDFAST_SOAK_SEED", 42);
    let secs: u64 = env_or("HOLDFAST_SOAK_SECS", 120);
    eprintln!("soak: seed {seed}, {secs} s (HOLDFAST_SOAK_SEED / HOLDFAST_SOAK_SECS)");
    let (gw, ns1) = world();

    // The observer on client0's physical link, proven to see probes before any client runs.
    let obs = Observer::install(&gw.ns, GW_IF, GW, PORT, PORT);
    let targets: Vec<IpAddr> = vec![GW.into(), Ipv4Addr::new(198, 19, 0, 99).into()];
    let control = probe_round(gw.clients_ns(), &obs, &targets, GW.into(), PORT, PORT);
    assert!(!control.leaks().is_empty(), "positive control: the observer sees probes: {control:?}");
    obs.reset();

    let gateway = Soak::start_gateway(&gw, 0);
    let mut clients = Vec::new();
    for i in 0..2 {
        let name = format!("client{i}");
        let logs = tempfile::tempdir().expect("tempdir");
        let file = gw.add_client(&name, |f| fast_timings(f, logs.path()));
        let ns = if i == 0 { gw.clients_ns() } else { &ns1 };
        let mut cmd = ns.command(BIN);
        cmd.args(["client", "run", "--no-tui", "--config", s(&file)]).env_remove("RUST_LOG");
        let mut proc = Proc::spawn(&name, cmd);
        proc.wait_for(&["data plane on session"], T);
        let pinger = Pinger::start(ns, &format!("ping{i}"), GW_TUN, "0.1");
        clients.push(Client { name, file, logs, proc, pinger });
    }
    let mut soak = Soak {
        gw: &gw,
        ns1: &ns1,
        gateway,
        gateway_runs: 0,
        clients,
        rng: StdRng::seed_from_u64(seed),
        home: 0,
        injected: BTreeMap::new(),
        recoveries: Vec::new(),
        probe_rounds: 0,
        log: Vec::new(),
    };

    // Warm-up: traffic flows on both clients; then the baseline.
    for i in 0..2 {
        let since = unix_now();
        let ns = if i == 0 { soak.gw.clients_ns() } else { soak.ns1 };
        let c = &mut soak.clients[i];
        assert!(c.pinger.first_reply_after(ns, since, T).is_some(), "{}: tunnel up", c.name);
    }
    let ns0 = soak.gw.clients_ns();
    assert!(ns0.ping_count(GW_TUN, 10) >= 9, "warm-up traffic");
    let identity: Vec<(u32, u32)> = soak.clients.iter().map(Client::data_plane_identity).collect();
    for (c, (loops, _)) in soak.clients.iter().zip(&identity) {
        assert_eq!(*loops, 1, "{}: loops started once", c.name);
    }
    let pids: Vec<u32> = soak.clients.iter().map(|c| c.proc.pid()).collect();
    let rss_start = rss_kib(pids[0]);
    let logs_start = visible_log_lines(soak.clients[0].logs.path()).len();

    // The schedule: decks of every fault kind, shuffled; episodes until the time is up (and
    // at least one full deck).
    let start = Instant::now();
    let budget = Duration::from_secs(secs);
    let mut deck: Vec<Fault> = Vec::new();
    let mut decks = 0;
    loop {
        let first_deck_done = decks > 1 || (decks == 1 && deck.is_empty());
        if first_deck_done && start.elapsed() + TAIL >= budget {
            break;
        }
        if deck.is_empty() {
            deck = Fault::ALL.to_vec();
            deck.shuffle(&mut soak.rng);
            decks += 1;
        }
        let f = deck.remove(0);
        soak.episode(f, &mut deck);
        // The process, its loops and its TUN device are the same ones after every episode.
        for (c, id) in soak.clients.iter().zip(&identity) {
            assert_eq!(&c.data_plane_identity(), id, "{}: loops restarted or TUN replaced", c.name);
        }
        let gap = soak.rng.random_range(300..1200);
        std::thread::sleep(Duration::from_millis(gap));
    }
    let run_time = start.elapsed();

    // Steady state again: a clean burst of pings on both clients.
    for i in 0..2 {
        let ns = if i == 0 { soak.gw.clients_ns() } else { soak.ns1 };
        assert!(ns.ping_count(GW_TUN, 10) >= 9, "client{i}: steady traffic at the end");
    }
    let rss_end = rss_kib(pids[0]);
    let status0 = soak.clients[0].status();
    let leaks: Counts = obs.counts();
    let log_lines = visible_log_lines(soak.clients[0].logs.path());
    let run_lines = log_lines.len() - logs_start;
    let faults: u32 = soak.injected.values().sum();

    // The summary table.
    let mut rec: Vec<Duration> = soak.recoveries.iter().map(|(_, d)| *d).collect();
    rec.sort();
    let mut table = format!(
        "\n=== soak summary: seed {seed}, {:.0} s of faults ===\n{:<18} {:>5}\n",
        run_time.as_secs_f64(),
        "fault",
        "count"
    );
    for (f, n) in &soak.injected {
        table += &format!("{:<18} {n:>5}\n", format!("{f:?}"));
    }
    table += &format!(
        "{:<18} {faults:>5}\nepisodes           {:>5}\nrecoveries         {:>5} (both clients)\n\
         recovery p50/p99/max  {:?} / {:?} / {:?}\n\
         leak probes rounds {:>5}\nleaks on the link  {:?}\ngateway port pkts  ctl {} data {}\n\
         client0 RSS        {} KiB -> {} KiB\nclient0 log lines  {run_lines} (budget {})\n\
         gateway runs       {:>5}\nclient0 drops      {:?}\n",
        "total",
        soak.recoveries.len() / 2,
        soak.recoveries.len(),
        percentile(&rec, 50.0),
        percentile(&rec, 99.0),
        rec.last().copied().unwrap_or_default(),
        soak.probe_rounds,
        leaks.leaks(),
        leaks.get("gw_control"),
        leaks.get("gw_data"),
        rss_start,
        rss_end,
        LOG_BASE + LOG_PER_FAULT * faults as usize,
        soak.gateway_runs + 1,
        status0.data_plane.as_ref().map(|d| d.drops.clone()),
    );
    let slowest: Vec<_> = {
        let mut r = soak.recoveries.clone();
        r.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        r.into_iter().take(5).collect()
    };
    table += &format!("slowest recoveries {slowest:?}\n");
    eprintln!("{table}");

    // The assertions the table reports on.
    assert!(Fault::ALL.iter().all(|f| soak.injected.contains_key(f)), "every kind injected");
    assert!(leaks.leaks().is_empty(), "leaked over the physical link: {:?}", leaks.leaks());
    assert!(rss_end <= rss_start + RSS_MARGIN_KIB, "client0 RSS grew from {rss_start} KiB to {rss_end} KiB");
    assert!(
        run_lines <= LOG_BASE + LOG_PER_FAULT * faults as usize,
        "{run_lines} log lines for {faults} faults:\n{}",
        log_lines[logs_start..].join("\n")
    );
    for (c, pid) in soak.clients.iter_mut().zip(&pids) {
        assert_eq!(c.proc.pid(), *pid);
        assert!(c.proc.is_alive(), "{} is alive at the end", c.name);
    }
    soak.assert_gateway_alive("at the end");
    for c in &mut soak.clients {
        assert_eq!(c.proc.terminate(T), Some(0), "{}: explicit stop exits 0", c.name);
    }
    assert_eq!(soak.gateway.terminate(T), Some(0), "the gateway stops cleanly");
}
