//! The gateway's resolver and pushed DNS (issue 11), end to end with real processes in namespaces
//! of their own (root only; skipped otherwise).
//!
//! ```text
//!  client ns ("home")                gateway ns                          outside ns
//!  hfc 198.18.0.1/30  ------------  hfg 198.18.0.2/30
//!  resolv.conf: its LAN router       up1 198.18.1.1/30  --------------  dn1 198.18.1.2/30
//!  holdfast0 (TUN, connected)        holdfast TUN 100.64.0.1             dnsmasq: example.test
//!                                    resolv.conf: 198.18.1.2             -> 198.18.7.7
//! ```
//!
//! The client file is exactly what `gateway add-client` writes (plus test timings, log folder and
//! status socket): nothing about DNS. The gateway's upstream comes from its own resolv.conf.

#[macro_use]
mod leak_probes;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use leak_probes::{Observer, in_ns, probe_round};
use support::netns::{self, Netns};
use support::*;

const T: Duration = Duration::from_secs(20);
const GW_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const GW_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const TUNNEL_DNS: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const ANSWER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 7);
const NAME: &str = "www.example.test.";
/// The client namespace's resolv.conf before connecting: its home router.
const HOME_RESOLV: &str = "# from DHCP\nnameserver 198.18.0.2\nsearch lan\n";
/// `[dns] timeout` in these tests.
const DNS_TIMEOUT: Duration = Duration::from_secs(1);

struct World {
    gw: GatewayDir,
    outside: Netns,
    logs: tempfile::TempDir,
}

fn world() -> World {
    let gw = GatewayDir::init_split();
    let outside = Netns::new();
    netns::link(&gw.ns, "up1", GW_UPLINK, &outside, "dn1", UPSTREAM, 30);
    // Replies to tunnel addresses (for the "not an open resolver" probes) go back to the gateway.
    outside.ip(&["route", "add", "100.64.0.0/10", "via", &GW_UPLINK.to_string()]);
    // The gateway host's own resolver: the default upstream.
    gw.ns.set_resolv_conf(&format!("nameserver {UPSTREAM}\n"));
    gw.clients_ns().set_resolv_conf(HOME_RESOLV);
    // A bound small enough for the test to wait it out.
    let text = std::fs::read_to_string(gw.config()).unwrap();
    let text = text.replace("# timeout = \"2s\"", &format!("timeout = \"{}ms\"", DNS_TIMEOUT.as_millis()));
    assert!(text.contains("\ntimeout = \"1000ms\""), "gateway.toml has no [dns] timeout line");
    std::fs::write(gw.config(), text).unwrap();
    World { gw, outside, logs: tempfile::tempdir().unwrap() }
}

impl World {
    /// dnsmasq as the upstream, answering `example.test` names itself and nothing else.
    fn upstream(&self) -> Proc {
        let pid = self.logs.path().join("dnsmasq.pid");
        let mut p = self.outside.spawn(
            "dnsmasq",
            "dnsmasq",
            &[
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--log-queries",
                "--address=/example.test/198.18.7.7",
                &format!("--listen-address={UPSTREAM}"),
                "--bind-interfaces",
                "--user=root",
                &format!("--pid-file={}", pid.display()),
            ],
            &[],
        );
        p.wait_for(&["started"], T);
        p
    }

    fn gateway(&self) -> Proc {
        let mut g = self.gw.run("gateway");
        g.wait_for(&["resolver up on 100.64.0.1:53"], T);
        g
    }

    /// The client file exactly as `add-client` writes it, with test timings.
    fn client_file(&self) -> std::path::PathBuf {
        let logs = self.logs.path().to_owned();
        let file = self.gw.add_client("home", |f| fast_timings(f, &logs));
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("dns"), "the default client file says nothing about DNS: {text}");
        file
    }

    fn socket(&self) -> std::path::PathBuf {
        self.logs.path().join("client.sock")
    }

    fn client_resolv(&self) -> String {
        self.gw.clients_ns().resolv_conf()
    }
}

/// A DNS query for `name` over UDP from a thread inside `ns` to `to`; the parsed reply, or `None`
/// if nothing came back within `wait` (or the send was refused).
fn ask_udp(ns: &Netns, to: SocketAddr, name: &str, wait: Duration) -> Option<(Message, Duration)> {
    let mut q = Message::new(0x5151, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let wire = q.to_vec().unwrap();
    in_ns(ns, || {
        let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let sock = UdpSocket::bind(any).unwrap();
        sock.set_read_timeout(Some(wait)).unwrap();
        let start = Instant::now();
        sock.send_to(&wire, to).ok()?;
        let mut buf = [0u8; 4096];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        Some((Message::from_vec(&buf[..n]).expect("the resolver answers DNS"), start.elapsed()))
    })
}

/// The same over TCP (length-prefixed).
fn ask_tcp(ns: &Netns, to: SocketAddr, name: &str) -> Option<Message> {
    use std::io::{Read, Write};
    let mut q = Message::new(0x5252, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let wire = q.to_vec().unwrap();
    in_ns(ns, || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&(wire.len() as u16).to_be_bytes()).ok()?;
        s.write_all(&wire).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).ok()?;
        Message::from_vec(&buf).ok()
    })
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn tunnel_dns() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(TUNNEL_DNS), 53)
}

/// `getent hosts NAME` in the client namespace: the system resolver (glibc, reading the
/// namespace's /etc/resolv.conf), as any program would resolve.
fn system_lookup(ns: &Netns, name: &str) -> String {
    let out = ns.exec("getent", &["hosts", name]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn home_network_resolves_through_the_tunnel_and_gets_its_resolver_back() {
    require_root!();
    let w = world();
    let _dnsmasq = w.upstream();
    let mut gateway = w.gateway();
    let file = w.client_file();
    let cns = w.gw.clients_ns();

    // Connected: the system resolver is the gateway's, over the tunnel, and names resolve.
    let mut client = w.gw.run_client("client", &file);
    client.wait_for(&["resolver set to 100.64.0.1"], T);
    let during = w.client_resolv();
    assert!(during.contains("\nnameserver 100.64.0.1\n"), "{during}");
    assert!(!during.contains("\nnameserver 198.18.0.2"), "the router is still a resolver: {during}");
    let found = system_lookup(cns, "www.example.test");
    assert!(found.contains("198.18.7.7"), "getent hosts www.example.test: {found:?}");
    // TCP too, and straight to the tunnel address.
    let tcp = ask_tcp(cns, tunnel_dns(), NAME).expect("an answer over TCP");
    assert_eq!(a_records(&tcp), [ANSWER]);
    // The kill-switch now lets DNS through the tunnel go to the pushed resolvers only.
    client.wait_for(&["DNS through the tunnel only to", "100.64.0.1"], T);
    let table = cns.exec_ok("nft", &["list", "table", "inet", "holdfast"]);
    for rule in [
        "oifname \"holdfast0\" ip daddr 100.64.0.1 udp dport 53 accept",
        "oifname \"holdfast0\" ip daddr 100.64.0.1 tcp dport 53 accept",
        "oifname \"holdfast0\" udp dport 53 drop comment \"dns in the tunnel to other resolvers\"",
        "oifname \"holdfast0\" tcp dport 53 drop comment \"dns in the tunnel to other resolvers\"",
    ] {
        assert!(table.contains(rule), "missing `{rule}` in\n{table}");
    }
    // A query through the tunnel to another resolver (the upstream itself) gets no answer, while
    // the tunnel resolver still answers.
    assert!(ask_udp(cns, SocketAddr::from((UPSTREAM, 53)), NAME, Duration::from_secs(2)).is_none());
    assert!(ask_udp(cns, tunnel_dns(), NAME, Duration::from_secs(5)).is_some());
    // The resolver answers on the gateway's IPv6 tunnel address too (pushed beside the IPv4 one).
    let v6 = w
        .client_resolv()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .find_map(|a| a.parse::<std::net::Ipv6Addr>().ok())
        .expect("an IPv6 tunnel resolver in resolv.conf");
    let m = ask_udp(cns, SocketAddr::from((v6, 53)), NAME, Duration::from_secs(5)).expect("an answer over IPv6");
    assert_eq!(a_records(&m.0), [ANSWER]);

    // The gateway restarts pushing a search domain: the client's next snapshot carries it, and
    // the resolver follows without a restart of the client.
    gateway.kill();
    let text = std::fs::read_to_string(w.gw.config()).unwrap();
    let text = text.replace("# search_domains = []", "search_domains = [\"example.test\"]");
    std::fs::write(w.gw.config(), text).unwrap();
    let _gateway = w.gateway();
    client.wait_for(&["resolvers follow the new session", "example.test"], T);
    let during = w.client_resolv();
    assert!(during.contains("\nsearch example.test\n"), "{during}");
    // A short name now resolves through the search domain.
    assert!(system_lookup(cns, "www").contains("198.18.7.7"));

    // An explicit stop gives the original back, byte for byte.
    assert_eq!(client.terminate(T), Some(0));
    assert_eq!(w.client_resolv(), HOME_RESOLV);

    // SIGKILL leaves ours; `client unblock` puts the original back.
    let mut client = w.gw.run_client("client-again", &file);
    client.wait_for(&["resolver set to 100.64.0.1"], T);
    client.kill();
    assert!(w.client_resolv().contains("nameserver 100.64.0.1"));
    let out = cns.exec(BIN, &["client", "unblock"]);
    assert!(out.status.success(), "unblock: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(w.client_resolv(), HOME_RESOLV);
}

#[test]
fn answers_only_through_the_tunnel_and_servfails_in_time_when_the_upstream_is_down() {
    require_root!();
    let w = world();
    let mut dnsmasq = w.upstream();
    let mut gateway = w.gateway();
    let file = w.client_file();
    let cns = w.gw.clients_ns();
    let obs = Observer::install(&w.gw.ns, "hfg", GW_UNDERLAY, w.gw.port, w.gw.port);
    let targets = [IpAddr::V4(GW_UNDERLAY)];

    // Positive control, before the client (and its kill-switch) runs: DNS probes on the link
    // are seen, and the gateway's underlay address does not answer DNS.
    let c = probe_round(cns, &obs, &targets, GW_UNDERLAY.into(), w.gw.port, w.gw.port);
    assert!(c.get("dns4") > 0, "positive control: DNS probes not seen: {c:?}");
    let underlay = SocketAddr::new(GW_UNDERLAY.into(), 53);
    assert!(ask_udp(cns, underlay, NAME, Duration::from_secs(2)).is_none(), "the underlay answered DNS");

    // Not an open resolver: from the outside, neither the gateway's address nor its tunnel
    // address (routed to it) answers, though the upstream is right there.
    assert!(ask_udp(&w.outside, SocketAddr::new(GW_UPLINK.into(), 53), NAME, Duration::from_secs(2)).is_none());
    assert!(ask_udp(&w.outside, tunnel_dns(), NAME, Duration::from_secs(2)).is_none());
    assert!(ask_tcp(&w.outside, tunnel_dns(), NAME).is_none());

    let mut client = w.gw.run_client("client", &file);
    client.wait_for(&["resolver set to 100.64.0.1"], T);
    // From the tunnel it answers.
    let (m, _) = ask_udp(cns, tunnel_dns(), NAME, Duration::from_secs(5)).expect("an answer through the tunnel");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&m), [ANSWER]);
    // Connected: nothing on port 53 (or anything else) leaves over the link.
    let c = probe_round(cns, &obs, &targets, GW_UNDERLAY.into(), w.gw.port, w.gw.port);
    assert!(c.leaks().is_empty(), "leaked over the physical link while connected: {:?}", c.leaks());

    // The upstream goes silent (its port blackholed): SERVFAIL once the bound has passed, not
    // before and not much after; the client stays Healthy.
    w.outside.nft(
        "table inet silent {\n\tchain in {\n\t\ttype filter hook input priority -10;\n\
         \t\tmeta l4proto { tcp, udp } th dport 53 drop\n\t}\n}\n",
    );
    let (m, took) = ask_udp(cns, tunnel_dns(), "slow.example.test.", Duration::from_secs(10))
        .expect("an answer while the upstream is silent");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(took >= DNS_TIMEOUT.mul_f32(0.9), "SERVFAIL before the bound: {took:?}");
    assert!(took < DNS_TIMEOUT + Duration::from_secs(3), "SERVFAIL took {took:?}");
    w.outside.nft("table inet silent {}\ndelete table inet silent\n");
    // The upstream dies: refused at once, so SERVFAIL well within the bound.
    dnsmasq.kill();
    let (m, took) = ask_udp(cns, tunnel_dns(), "other.example.test.", Duration::from_secs(10))
        .expect("an answer while the upstream is down");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(took < DNS_TIMEOUT + Duration::from_secs(3), "SERVFAIL took {took:?}");
    assert_eq!(status_of(&w.socket()).state, "Healthy");
    let c = probe_round(cns, &obs, &targets, GW_UNDERLAY.into(), w.gw.port, w.gw.port);
    assert!(c.leaks().is_empty(), "leaked over the physical link with the upstream down: {:?}", c.leaks());

    // The counters saw it all (SIGUSR1 logs them beside the data plane's).
    gateway.signal("USR1");
    let stats = gateway.wait_for(&["resolver stats"], T);
    assert!(stats.contains("servfail 2"), "{stats}");
    assert!(!stats.contains("answered 0"), "{stats}");
    // `gateway status` shows the same counters, and the addresses pushed to clients.
    let json = holdfast_ok(&["gateway", "status", "--dir", s(w.gw.path()), "--json"]);
    let report: holdfast::gateway::status::GatewayReport = serde_json::from_str(&json).unwrap();
    let dns = report.resolver.expect("the resolver is on");
    // Both tunnel addresses: the IPv4 one and the gateway's IPv6 one (its random ULA's first host).
    assert_eq!(dns.addresses.len(), 2, "{:?}", dns.addresses);
    assert_eq!(dns.addresses[0], "100.64.0.1");
    let v6: std::net::Ipv6Addr = dns.addresses[1].parse().expect("an IPv6 address");
    assert!(v6.segments()[0] & 0xff00 == 0xfd00 && v6.segments()[7] == 1, "{v6}");
    assert_eq!(dns.stats.servfail, 2);
    assert!(dns.stats.answered >= 1 && dns.stats.queries >= 3, "{:?}", dns.stats);
    assert_eq!(client.terminate(T), Some(0));
}

#[test]
fn a_flood_from_one_session_does_not_stall_another() {
    require_root!();
    let w = world();
    // A low rate, so the flood is over it at once.
    let text = std::fs::read_to_string(w.gw.config()).unwrap();
    std::fs::write(w.gw.config(), text.replace("# rate_limit = 100", "rate_limit = 20")).unwrap();
    let _dnsmasq = w.upstream();
    // The second client gets a namespace of its own (one kill-switch table, one resolv.conf and
    // one set of tunnel routes per namespace), joined to the gateway's by another link.
    let calm_ns = Netns::new();
    // Two links make the gateway multi-homed: its data plane must answer from the endpoint.
    w.gw.set("listen", &format!("\"{GW_UNDERLAY}:{}\"", w.gw.port));
    netns::link(&calm_ns, "hfc", Ipv4Addr::new(198, 18, 2, 1), &w.gw.ns, "hfg2", Ipv4Addr::new(198, 18, 2, 2), 30);
    calm_ns.ip(&["route", "add", &format!("{GW_UNDERLAY}/32"), "via", "198.18.2.2"]);
    let mut gateway = w.gateway();
    let (flood_logs, calm_logs) = (w.logs.path().join("flood"), w.logs.path().join("calm"));
    let flood_file = w.gw.add_client("flood", |f| fast_timings(f, &flood_logs));
    let calm_file = w.gw.add_client("calm", |f| fast_timings(f, &calm_logs));
    let mut flood = w.gw.run_client("flood", &flood_file);
    flood.wait_for(&["resolver set to 100.64.0.1"], T);
    let mut cmd = calm_ns.command(BIN);
    cmd.args(["client", "run", "--no-tui", "--config", s(&calm_file)]).env_remove("RUST_LOG");
    let mut calm = Proc::spawn("calm", cmd);
    calm.wait_for(&["resolver set to 100.64.0.1"], T);

    // Hostile and excessive queries from the flooding session, through its tunnel: garbage, a
    // truncated header, a compression loop, then 3000 valid queries as fast as they go out.
    in_ns(w.gw.clients_ns(), || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut looped = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        for bad in [&[0u8; 3][..], &[0xff; 600][..], &looped[..], &vec![0u8; 5000][..]] {
            let _ = sock.send_to(bad, tunnel_dns());
        }
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(Name::from_str(NAME).unwrap(), RecordType::A));
        let wire = q.to_vec().unwrap();
        for _ in 0..3000 {
            let _ = sock.send_to(&wire, tunnel_dns());
        }
    });
    // The other session still gets its answers at once, over UDP and TCP.
    let (m, took) = ask_udp(&calm_ns, tunnel_dns(), NAME, Duration::from_secs(5))
        .expect("the calm client got no answer after the flood");
    assert_eq!(a_records(&m), [ANSWER]);
    assert!(took < Duration::from_secs(2), "the calm client waited {took:?}");
    assert_eq!(a_records(&ask_tcp(&calm_ns, tunnel_dns(), NAME).expect("TCP answer")), [ANSWER]);
    // The burst fit the resolver's socket: the kernel dropped none of it for want of buffer, so
    // every query met the per-client gate. (With the default buffer it dropped hundreds, the
    // calm client's query among them one run in three.)
    assert_eq!(udp_counter(&w.gw.ns, "RcvbufErrors"), 0, "the resolver's socket overflowed");

    gateway.signal("USR1");
    let stats = gateway.wait_for(&["resolver stats"], T);
    assert!(!stats.contains("rate-limited 0"), "the flood was not limited: {stats}");
    assert!(!stats.contains("malformed 0"), "the hostile queries were not counted: {stats}");
    assert!(gateway.is_alive(), "the gateway died");
    assert_eq!(calm.terminate(T), Some(0));
    assert_eq!(flood.terminate(T), Some(0));
}

/// A counter of the `Udp:` lines of `/proc/net/snmp` in `ns` (a header line, then the values).
fn udp_counter(ns: &Netns, name: &str) -> u64 {
    let out = ns.exec("cat", &["/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().expect("Udp header"), udp.next().expect("Udp values"));
    let at = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no {name} in {names}"));
    values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).expect("a number")
}
