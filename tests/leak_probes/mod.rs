//! Leak probes and the observer that counts them, shared by `killswitch_netns.rs` and
//! `leak_states.rs`.
//!
//! The observer sits on the far end of the client's physical link (the veth end in the
//! "outside"/gateway namespace): an nftables table whose prerouting chain counts every packet that
//! arrives from the client, by kind. Link noise a host always sends (IPv6 neighbour discovery,
//! router solicitations, MLD) is counted apart as `link`; anything the kinds below do not cover
//! lands in `other`.
//!
//! Probes are sent from the client namespace: TCP (a SYN), UDP, ICMP echo and DNS (UDP and TCP to
//! port 53), each over IPv4 and IPv6, to the gateway's address (on other ports) and to a remote
//! address behind it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::support::netns::Netns;

/// Skips the calling test (with a visible note) when not root: namespaces need CAP_NET_ADMIN.
macro_rules! require_root {
    () => {
        if !crate::support::netns::available() {
            eprintln!("SKIPPED: needs root, iproute2 and nftables (network namespaces)");
            return;
        }
    };
}

/// The client's end of its physical link, and the outside end.
pub const CLIENT_IF: &str = "eth0";
pub const OUTSIDE_IF: &str = "up0";
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const OUTSIDE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
pub const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Addresses behind the outside end (on its loopback), reached through the client's default
/// routes: "the internet".
pub const REMOTE4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 99);
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x99);
/// The port the TCP and UDP probes go to.
pub const PROBE_PORT: u16 = 5555;

/// The kinds of probe; a positive control must see every one of them.
pub const PROBE_KINDS: [&str; 8] = ["tcp4", "udp4", "icmp4", "dns4", "tcp6", "udp6", "icmp6", "dns6"];

/// The kinds counted when they arrive from the tunnel (any interface but the link, from a tunnel
/// subnet): the probes that went where they should, over both families.
pub const TUNNEL_KINDS: [&str; 8] =
    ["tun_tcp4", "tun_udp4", "tun_icmp4", "tun_dns4", "tun_tcp6", "tun_udp6", "tun_icmp6", "tun_dns6"];

/// The tunnel subnet (the gateway's default, within RFC 6598 space).
pub const TUNNEL_SUBNET: &str = "100.64.0.0/10";
/// The IPv6 tunnel subnets: `gateway init` picks a random ULA /64 inside it.
pub const TUNNEL_SUBNET6: &str = "fd00::/8";

/// Runs `f` on a fresh thread moved into `ns` (sockets it opens and processes it starts live
/// there). The thread ends with `f`, so it never goes back to a pool.
pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_current_thread();
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

pub use crate::support::wait_until;

/// Sets its flag when dropped: ends a probe flood however the code around it ends, so a failing
/// step fails its test instead of hanging it on the flood thread.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Joins `client` and `outside` by a veth pair carrying IPv4 and IPv6, puts the remote addresses
/// on the outside's loopback, and gives the client default routes through the outside end.
pub fn wire(client: &Netns, outside: &Netns) {
    // No duplicate address detection: addresses (link-local ones too) are usable, and their
    // routes present, as soon as they are added, so "before" snapshots are complete.
    for ns in [client, outside] {
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
    }
    crate::support::netns::link(client, CLIENT_IF, CLIENT4, outside, OUTSIDE_IF, OUTSIDE4, 24);
    client.ip(&["-6", "addr", "add", &format!("{CLIENT6}/64"), "dev", CLIENT_IF, "nodad"]);
    outside.ip(&["-6", "addr", "add", &format!("{OUTSIDE6}/64"), "dev", OUTSIDE_IF, "nodad"]);
    outside.ip(&["addr", "add", &format!("{REMOTE4}/32"), "dev", "lo"]);
    outside.ip(&["-6", "addr", "add", &format!("{REMOTE6}/128"), "dev", "lo"]);
    client.ip(&["route", "add", "default", "via", &OUTSIDE4.to_string()]);
    client.ip(&["-6", "route", "add", "default", "via", &OUTSIDE6.to_string()]);
    let settled = wait_until(Duration::from_secs(5), || {
        client.ip(&["-6", "addr", "show", "tentative"]).is_empty()
            && outside.ip(&["-6", "addr", "show", "tentative"]).is_empty()
    });
    assert!(settled, "IPv6 addresses still tentative");
}

/// The observer: counters on the outside end of the client's link.
pub struct Observer<'a> {
    ns: &'a Netns,
    script: String,
}

impl<'a> Observer<'a> {
    /// Counts packets arriving on `iface` in `ns`; `gateway` with its TCP `control` and UDP
    /// `data` ports are counted as `gw_control` and `gw_data`.
    pub fn install(ns: &'a Netns, iface: &str, gateway: impl Into<IpAddr>, control: u16, data: u16) -> Self {
        let gateway = gateway.into();
        let ip = if gateway.is_ipv4() { "ip" } else { "ip6" };
        let mut counters = vec!["link", "gw_control", "gw_data", "other"];
        counters.extend(PROBE_KINDS);
        counters.extend(TUNNEL_KINDS);
        let decl: String = counters.iter().map(|c| format!("\tcounter {c} {{}}\n")).collect();
        let script = format!(
            "table inet observe {{}}\n\
             delete table inet observe\n\
             table inet observe {{\n{decl}\
             \tchain pre {{\n\
             \t\ttype filter hook prerouting priority -300; policy accept;\n\
             \t\tiifname != \"{iface}\" ip saddr {TUNNEL_SUBNET} jump tunnel\n\
             \t\tiifname != \"{iface}\" ip6 saddr {TUNNEL_SUBNET6} jump tunnel6\n\
             \t\tiifname != \"{iface}\" accept\n\
             \t\ticmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
                nd-neighbor-advert, mld-listener-report, mld2-listener-report }} counter name link accept\n\
             \t\t{ip} daddr {gateway} tcp dport {control} counter name gw_control accept\n\
             \t\t{ip} daddr {gateway} udp dport {data} counter name gw_data accept\n\
             \t\tmeta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport 53 counter name dns4 accept\n\
             \t\tmeta nfproto ipv6 meta l4proto {{ tcp, udp }} th dport 53 counter name dns6 accept\n\
             \t\tmeta nfproto ipv4 meta l4proto tcp counter name tcp4 accept\n\
             \t\tmeta nfproto ipv4 meta l4proto udp counter name udp4 accept\n\
             \t\tmeta nfproto ipv4 meta l4proto icmp counter name icmp4 accept\n\
             \t\tmeta nfproto ipv6 meta l4proto tcp counter name tcp6 accept\n\
             \t\tmeta nfproto ipv6 meta l4proto udp counter name udp6 accept\n\
             \t\tmeta nfproto ipv6 meta l4proto icmpv6 counter name icmp6 accept\n\
             \t\tcounter name other\n\
             \t}}\n\
             \tchain tunnel {{\n\
             \t\tmeta l4proto {{ tcp, udp }} th dport 53 counter name tun_dns4 return\n\
             \t\tmeta l4proto tcp counter name tun_tcp4 return\n\
             \t\tmeta l4proto udp counter name tun_udp4 return\n\
             \t\tmeta l4proto icmp counter name tun_icmp4 return\n\
             \t}}\n\
             \tchain tunnel6 {{\n\
             \t\tmeta l4proto {{ tcp, udp }} th dport 53 counter name tun_dns6 return\n\
             \t\tmeta l4proto tcp counter name tun_tcp6 return\n\
             \t\tmeta l4proto udp counter name tun_udp6 return\n\
             \t\tmeta l4proto icmpv6 icmpv6 type echo-request counter name tun_icmp6 return\n\
             \t}}\n\
             }}\n"
        );
        let obs = Observer { ns, script };
        obs.reset();
        obs
    }

    /// Zeroes every counter (by replacing the table in one transaction).
    pub fn reset(&self) {
        self.ns.nft(&self.script);
    }

    /// The counters' packet counts by name.
    pub fn counts(&self) -> Counts {
        let json = self.ns.exec_ok("nft", &["-j", "list", "counters", "table", "inet", "observe"]);
        let doc: serde_json::Value = serde_json::from_str(&json).expect("nft -j output");
        let mut map = BTreeMap::new();
        for item in doc["nftables"].as_array().expect("nftables array") {
            if let Some(c) = item.get("counter") {
                let name = c["name"].as_str().expect("counter name").to_owned();
                map.insert(name, c["packets"].as_u64().expect("packets"));
            }
        }
        Counts(map)
    }
}

/// Packet counts by counter name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<String, u64>);

impl Counts {
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// The kinds (probes and `other`) that saw at least one packet: leaks, when the kill-switch
    /// is on.
    pub fn leaks(&self) -> Vec<(String, u64)> {
        PROBE_KINDS.iter().chain(&["other"]).map(|k| (k.to_string(), self.get(k))).filter(|(_, n)| *n > 0).collect()
    }

    /// The tunnel kinds that saw nothing (in a connected state: probes that did not go through).
    pub fn unseen_in_tunnel(&self) -> Vec<&'static str> {
        TUNNEL_KINDS.into_iter().filter(|k| self.get(k) == 0).collect()
    }

    /// The probe kinds that saw nothing: blind spots, in a positive control.
    pub fn unseen(&self) -> Vec<&'static str> {
        PROBE_KINDS.into_iter().filter(|k| self.get(k) == 0).collect()
    }
}

/// What one probe round tried; errors are expected when the kill-switch blocks (EPERM).
#[derive(Debug, Default)]
pub struct ProbeReport {
    pub lines: Vec<String>,
}

/// A DNS query for `example.com. A`, so the DNS probes look like what a resolver sends.
const DNS_QUERY: [u8; 29] = [
    0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, b'e', b'x', b'a', b'm', b'p', b'l',
    b'e', 0x03, b'c', b'o', b'm', 0x00, 0x00, 0x01, 0x00, 0x01,
];

/// An unconnected UDP socket of `to`'s family.
fn udp_for(to: IpAddr) -> UdpSocket {
    let any: IpAddr = if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    UdpSocket::bind(SocketAddr::new(any, 0)).expect("bind probe socket")
}

/// Starts a TCP connection to `to` without waiting for it: the SYN leaves (or is refused by the
/// firewall, EPERM) inside `connect`, so nothing here waits on the network.
fn tcp_syn(to: SocketAddr) -> std::io::Result<()> {
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    match sock.connect(&to.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        other => other,
    }
}

/// Sends one ICMP (or ICMPv6) echo request to `to` on a raw socket.
fn ping(to: IpAddr) -> std::io::Result<usize> {
    let (domain, proto, kind) = match to {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8),
    };
    let sock = Socket::new(domain, Type::from(libc::SOCK_RAW), Some(proto))?;
    let mut msg = [kind, 0, 0, 0, 0x48, 0x46, 0, 1, b'p', b'r', b'o', b'b', b'e', 0, 0, 0];
    if to.is_ipv4() {
        // ICMPv4 carries its own checksum; for ICMPv6 raw sockets the kernel fills it in.
        let sum = internet_checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    sock.send_to(&msg, &SocketAddr::new(to, 0).into())
}

/// The RFC 1071 checksum.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends every kind of probe from `client` to each of `targets`: a TCP SYN and a UDP datagram to
/// [`PROBE_PORT`], a DNS query over UDP and a TCP SYN to port 53, and an echo request. Nothing
/// waits for an answer, so a round takes milliseconds and fits inside short-lived states.
pub fn send_probes(client: &Netns, targets: &[IpAddr]) -> ProbeReport {
    in_ns(client, || {
        let mut r = ProbeReport::default();
        for &ip in targets {
            let udp = udp_for(ip);
            for (port, payload) in [(PROBE_PORT, &b"leak probe"[..]), (53, &DNS_QUERY[..])] {
                let res = udp.send_to(payload, SocketAddr::new(ip, port));
                r.lines.push(format!("udp {ip}:{port}: {res:?}"));
            }
            for port in [PROBE_PORT, 53] {
                r.lines.push(format!("tcp {ip}:{port}: {:?}", tcp_syn(SocketAddr::new(ip, port))));
            }
            r.lines.push(format!("ping {ip}: {:?}", ping(ip)));
        }
        r
    })
}

/// The probe targets: the outside end of the link (also the gateway's address in the kill-switch
/// tests) and the remote addresses, over IPv4 and IPv6.
pub fn all_targets() -> Vec<IpAddr> {
    vec![OUTSIDE4.into(), REMOTE4.into(), OUTSIDE6.into(), REMOTE6.into()]
}

/// Sends one TCP connect to `control` and one UDP datagram to `data` at `gateway`: the traffic
/// the kill-switch must let through.
pub fn send_gateway_probes(client: &Netns, gateway: IpAddr, control: u16, data: u16) {
    in_ns(client, || {
        udp_for(gateway).send_to(b"gateway data", SocketAddr::new(gateway, data)).expect("udp to the gateway");
        tcp_syn(SocketAddr::new(gateway, control)).expect("tcp to the gateway");
    });
}

/// One probe round from a clean observer: every probe kind to `targets`, then the gateway probes;
/// waits until those have arrived (the kill-switch lets them through in every state, so they mark
/// the end of the round), then returns the counts.
pub fn probe_round(
    client: &Netns,
    obs: &Observer,
    targets: &[IpAddr],
    gateway: IpAddr,
    control: u16,
    data: u16,
) -> Counts {
    obs.reset();
    let report = send_probes(client, targets);
    send_gateway_probes(client, gateway, control, data);
    let arrived = wait_until(Duration::from_secs(5), || {
        let c = obs.counts();
        c.get("gw_control") >= 1 && c.get("gw_data") >= 1
    });
    assert!(arrived, "the gateway probes never arrived: {:?}\n{:#?}", obs.counts(), report.lines);
    obs.counts()
}

/// Waits until every probe kind has been seen (the positive control).
pub fn assert_all_seen(obs: &Observer) {
    let all = wait_until(Duration::from_secs(5), || obs.counts().unseen().is_empty());
    assert!(all, "positive control: probes {:?} never arrived", obs.counts().unseen());
}

/// `ip route` lines (all tables, both families) of `ns`.
pub fn route_table(ns: &Netns) -> String {
    ns.ip(&["-4", "route", "show", "table", "all"]) + &ns.ip(&["-6", "route", "show", "table", "all"])
}

/// The whole nftables ruleset of `ns`, without counter values.
pub fn ruleset(ns: &Netns) -> String {
    ns.exec_ok("nft", &["-s", "list", "ruleset"])
}

/// The resolver file `ip netns exec` bind-mounts over /etc/resolv.conf for a namespace; removed
/// (with /etc/netns if it is then empty) on drop.
pub struct NetnsEtc {
    dir: PathBuf,
}

impl NetnsEtc {
    pub fn new(ns: &Netns, resolv: &str) -> NetnsEtc {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        let etc = NetnsEtc { dir };
        std::fs::write(etc.resolv(), resolv).expect("write resolv.conf");
        etc
    }

    pub fn resolv(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }

    pub fn read_resolv(&self) -> String {
        std::fs::read_to_string(self.resolv()).expect("read resolv.conf")
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

/// What a client may change in its namespace, and must give back on an explicit stop (or
/// `unblock` after a kill): the ruleset, the routes, the resolver file.
#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    pub ruleset: String,
    pub routes: String,
    pub resolv: String,
}

impl HostState {
    pub fn of(ns: &Netns, etc: &NetnsEtc) -> HostState {
        HostState { ruleset: ruleset(ns), routes: route_table(ns), resolv: etc.read_resolv() }
    }
}
