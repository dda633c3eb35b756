//! The plan as nf_tables rules: the one place that says which rules the kill-switch holds (pure).
//!
//! Each [`Rule`] carries two renderings built by the same calls, so they cannot drift apart: the
//! expressions the kernel runs ([`Expr`], encoded by [`super::nfnl`]) and the text `nft list`
//! prints for them (the golden tests below read it; `tests/killswitch_netns.rs` checks that the
//! kernel's table, listed by the real `nft`, prints exactly this text). A plan element that needs
//! a second rule (one per protocol, per ND type, per gateway) is a second [`Rule`] with the same
//! `why`; `nft list ruleset` shows `why` as the rule's comment.
//!
//! Adding a plan element is one change in [`chains`].

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::KillSwitchPlan;

/// Linux's IFNAMSIZ: interface names are compared as 16 NUL-padded bytes.
const IFNAMSIZ: usize = 16;

/// The verdict that ends a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// What a `meta` expression loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    /// The packet's network family (NFPROTO_IPV4 or NFPROTO_IPV6) in an `inet` table.
    NfProto,
    /// The transport protocol number, for both families (after IPv6 extension headers).
    L4Proto,
    IifName,
    OifName,
}

/// Where a `payload` expression reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Network,
    Transport,
}

/// One nf_tables expression. Every load goes to register 1 (16 bytes, enough for an IPv6
/// address or an interface name); a rule is a sequence of load + compare pairs and a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta(MetaKey),
    Payload {
        base: Base,
        offset: u32,
        len: u32,
    },
    /// `reg1 = reg1 & mask` (XOR 0).
    Mask(Vec<u8>),
    /// Compare register 1 with `data`; the rule stops here unless it holds.
    Cmp {
        eq: bool,
        data: Vec<u8>,
    },
    Verdict(Verdict),
}

/// One kernel rule: its expressions, its text as `nft list` prints it, and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub exprs: Vec<Expr>,
    pub text: String,
    pub why: &'static str,
}

/// The two base chains of the table and their rules, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub output: Vec<Rule>,
    pub input: Vec<Rule>,
}

impl Ruleset {
    /// The chains by name, in the order they are created.
    pub fn chains(&self) -> [(&'static str, &[Rule]); 2] {
        [("output", &self.output), ("input", &self.input)]
    }
}

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// TCP header flag bits.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Which end of a packet a match is about.
#[derive(Clone, Copy)]
enum Dir {
    Src,
    Dst,
}

/// Builds one rule: each call appends both the expressions and the words `nft` prints for them.
struct R {
    exprs: Vec<Expr>,
    words: Vec<String>,
    /// The transport protocol already checked, so a second port match does not check it again
    /// (nft would print a repeated check).
    proto: Option<u8>,
}

fn r() -> R {
    R { exprs: Vec::new(), words: Vec::new(), proto: None }
}

impl R {
    fn load_cmp(mut self, load: Expr, data: Vec<u8>, words: String) -> Self {
        self.exprs.push(load);
        self.exprs.push(Expr::Cmp { eq: true, data });
        self.words.push(words);
        self
    }

    fn iface(self, dir: Dir, name: &str) -> Self {
        let mut data = [0u8; IFNAMSIZ];
        // The plan checked the name is 1-15 ASCII bytes.
        data[..name.len()].copy_from_slice(name.as_bytes());
        let (key, word) = match dir {
            Dir::Dst => (MetaKey::OifName, "oifname"),
            Dir::Src => (MetaKey::IifName, "iifname"),
        };
        self.load_cmp(Expr::Meta(key), data.to_vec(), format!("{word} \"{name}\""))
    }

    /// The family check nft adds in front of an `ip`/`ip6` match in an `inet` table. `nft`
    /// prints it only when nothing after it implies it, so no words.
    fn family(mut self, v6: bool) -> Self {
        self.exprs.push(Expr::Meta(MetaKey::NfProto));
        self.exprs.push(Expr::Cmp { eq: true, data: vec![if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }] });
        self
    }

    /// `ip daddr ADDR` / `ip6 saddr NET` and so on: one address or a prefix, family-aware.
    fn addr(self, dir: Dir, net: IpNet) -> Self {
        let (v6, offset, len) = match (net.addr(), dir) {
            (IpAddr::V4(_), Dir::Src) => (false, 12, 4),
            (IpAddr::V4(_), Dir::Dst) => (false, 16, 4),
            (IpAddr::V6(_), Dir::Src) => (true, 8, 16),
            (IpAddr::V6(_), Dir::Dst) => (true, 24, 16),
        };
        let octets = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let word = format!(
            "{} {}",
            if v6 { "ip6" } else { "ip" },
            match dir {
                Dir::Src => "saddr",
                Dir::Dst => "daddr",
            }
        );
        let mut me = self.family(v6);
        me.exprs.push(Expr::Payload { base: Base::Network, offset, len });
        let host = net.prefix_len() == net.max_prefix_len();
        if host {
            me.exprs.push(Expr::Cmp { eq: true, data: octets(net.addr()) });
            me.words.push(format!("{word} {}", net.addr()));
        } else {
            me.exprs.push(Expr::Mask(octets(net.netmask())));
            me.exprs.push(Expr::Cmp { eq: true, data: octets(net.network()) });
            me.words.push(format!("{word} {}", net.trunc()));
        }
        me
    }

    /// `tcp dport 53` and the like: the protocol check and the port, as nft prints them.
    fn port(mut self, proto: u8, dir: Dir, port: u16) -> Self {
        let name = if proto == TCP { "tcp" } else { "udp" };
        if self.proto != Some(proto) {
            self.exprs.push(Expr::Meta(MetaKey::L4Proto));
            self.exprs.push(Expr::Cmp { eq: true, data: vec![proto] });
            self.proto = Some(proto);
        }
        let (offset, word) = match dir {
            Dir::Src => (0, "sport"),
            Dir::Dst => (2, "dport"),
        };
        self.load_cmp(
            Expr::Payload { base: Base::Transport, offset, len: 2 },
            port.to_be_bytes().to_vec(),
            format!("{name} {word} {port}"),
        )
    }

    /// `icmp type T` / `icmpv6 type T`.
    fn icmp_type(mut self, v6: bool, ty: u8, name: &str) -> Self {
        let proto = if v6 { ICMPV6 } else { ICMP };
        self = self.family(v6);
        self.proto = Some(proto);
        self.exprs.push(Expr::Meta(MetaKey::L4Proto));
        self.exprs.push(Expr::Cmp { eq: true, data: vec![proto] });
        self.load_cmp(
            Expr::Payload { base: Base::Transport, offset: 0, len: 1 },
            vec![ty],
            format!("{} type {name}", if v6 { "icmpv6" } else { "icmp" }),
        )
    }

    /// `icmpv6 type T ip6 hoplimit 255`: neighbour discovery that never left the link.
    fn nd(self, ty: u8, name: &str) -> Self {
        self.icmp_type(true, ty, name).load_cmp(
            Expr::Payload { base: Base::Network, offset: 7, len: 1 },
            vec![255],
            "ip6 hoplimit 255".into(),
        )
    }

    /// `tcp flags != syn / syn,ack`: anything but the opening of a connection (a SYN without
    /// ACK), after a TCP port match.
    fn not_tcp_open(mut self) -> Self {
        // The flags byte is TCP's only after a protocol check, which `port` makes.
        debug_assert_eq!(self.proto, Some(TCP), "tcp flags without a TCP match");
        self.exprs.push(Expr::Payload { base: Base::Transport, offset: 13, len: 1 });
        self.exprs.push(Expr::Mask(vec![TCP_SYN | TCP_ACK]));
        self.exprs.push(Expr::Cmp { eq: false, data: vec![TCP_SYN] });
        self.words.push("tcp flags != syn / syn,ack".into());
        self
    }

    fn verdict(mut self, v: Verdict, why: &'static str) -> Rule {
        self.exprs.push(Expr::Verdict(v));
        self.words.push(match v {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
        });
        Rule { exprs: self.exprs, text: self.words.join(" "), why }
    }

    fn accept(self, why: &'static str) -> Rule {
        self.verdict(Verdict::Accept, why)
    }

    fn drop(self, why: &'static str) -> Rule {
        self.verdict(Verdict::Drop, why)
    }
}

/// Neighbour discovery the client sends (router solicitation, neighbour solicitation and
/// advertisement) and receives (plus router advertisement and redirect).
const ND_OUT: [(u8, &str); 3] = [(133, "nd-router-solicit"), (135, "nd-neighbor-solicit"), (136, "nd-neighbor-advert")];
const ND_IN: [(u8, &str); 4] =
    [(134, "nd-router-advert"), (135, "nd-neighbor-solicit"), (136, "nd-neighbor-advert"), (137, "nd-redirect")];

/// ICMP errors the client takes in: what path-MTU discovery and failing connections need.
const ICMP_ERRORS: [(u8, &str); 3] = [(3, "destination-unreachable"), (11, "time-exceeded"), (12, "parameter-problem")];
const ICMPV6_ERRORS: [(u8, &str); 4] =
    [(1, "destination-unreachable"), (2, "packet-too-big"), (3, "time-exceeded"), (4, "parameter-problem")];

/// The rules of the `output` and `input` chains, in order. Order matters: the DNS drop comes after
/// the tunnel and gateway accepts (a gateway on port 53 keeps working) and before the DHCP, ND
/// and LAN accepts (a LAN resolver is never reachable outside the tunnel).
pub fn chains(plan: &KillSwitchPlan) -> Ruleset {
    use Dir::{Dst, Src};
    let tun = plan.tun_name();
    let mut output = vec![r().iface(Dst, "lo").accept("loopback")];
    // DNS in the tunnel only to the plan's resolvers (when it names them), before the tunnel's
    // accept: each resolver's port 53, then every other port 53 through the tunnel dropped.
    if !plan.tunnel_dns().is_empty() {
        for resolver in plan.tunnel_dns() {
            for proto in [TCP, UDP] {
                output.push(
                    r().iface(Dst, tun)
                        .addr(Dst, IpNet::from(*resolver))
                        .port(proto, Dst, 53)
                        .accept("dns in the tunnel to its resolvers"),
                );
            }
        }
        for proto in [TCP, UDP] {
            output.push(r().iface(Dst, tun).port(proto, Dst, 53).drop("dns in the tunnel to other resolvers"));
        }
    }
    output.push(r().iface(Dst, tun).accept("tunnel"));
    let mut input = vec![r().iface(Src, "lo").accept("loopback"), r().iface(Src, tun).accept("tunnel")];
    for gw in plan.gateways() {
        let host = IpNet::from(gw.addr);
        output.push(r().addr(Dst, host).port(TCP, Dst, gw.control_port).accept("gateway control"));
        output.push(r().addr(Dst, host).port(UDP, Dst, gw.data_port).accept("gateway data"));
        // Only replies: the client opens the control connection, never the gateway. Told by
        // the flags, not by conntrack: no rule here loads conntrack into the namespace (it cost
        // a lone packet about 3 % of a round trip), and a flow conntrack forgot or judged out
        // of its window (a long partition) is never cut off by the kill-switch.
        input.push(r().addr(Src, host).port(TCP, Src, gw.control_port).not_tcp_open().accept("gateway control"));
        // Not tied to conntrack state: every datagram is authenticated by the data plane, and the
        // gateway may answer after conntrack forgot the flow (a long outage, a flushed table).
        input.push(r().addr(Src, host).port(UDP, Src, gw.data_port).accept("gateway data"));
    }
    // Path-MTU and unreachable errors. By type, not by conntrack's "related": an error is
    // not data, and the kernel acts only on one whose quoted header matches a socket of its
    // own, which is the check conntrack's tuple match would make.
    for (ty, name) in ICMP_ERRORS {
        input.push(r().icmp_type(false, ty, name).accept("icmp errors"));
    }
    for (ty, name) in ICMPV6_ERRORS {
        input.push(r().icmp_type(true, ty, name).accept("icmp errors"));
    }
    for proto in [TCP, UDP] {
        output.push(r().port(proto, Dst, 53).drop("dns outside the tunnel"));
        input.push(r().port(proto, Src, 53).drop("dns outside the tunnel"));
    }
    output.push(r().port(UDP, Src, 68).port(UDP, Dst, 67).accept("dhcpv4"));
    input.push(r().port(UDP, Src, 67).port(UDP, Dst, 68).accept("dhcpv4"));
    output.push(r().port(UDP, Src, 546).port(UDP, Dst, 547).accept("dhcpv6"));
    input.push(r().port(UDP, Src, 547).port(UDP, Dst, 546).accept("dhcpv6"));
    // Hop limit 255: neighbour discovery never leaves the link (RFC 4861).
    for (ty, name) in ND_OUT {
        output.push(r().nd(ty, name).accept("ipv6 neighbour discovery"));
    }
    for (ty, name) in ND_IN {
        input.push(r().nd(ty, name).accept("ipv6 neighbour discovery"));
    }
    if let Some(lan) = plan.lan() {
        for net in lan {
            output.push(r().addr(Dst, *net).accept("lan"));
            input.push(r().addr(Src, *net).accept("lan"));
        }
    }
    Ruleset { output, input }
}

/// The rules as the body of `nft list table inet holdfast` prints them (chains, hooks, rules
/// with comments), for golden tests and the integration test's comparison with the real `nft`.
pub fn listing(rules: &Ruleset) -> String {
    let mut s = String::new();
    for (name, chain) in rules.chains() {
        // Writing to a String cannot fail.
        let _ = writeln!(s, "\tchain {name} {{");
        let _ = writeln!(s, "\t\ttype filter hook {name} priority filter; policy drop;");
        for rule in chain {
            let _ = writeln!(s, "\t\t{} comment \"{}\"", rule.text, rule.why);
        }
        s.push_str("\t}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan4() -> KillSwitchPlan {
        KillSwitchPlan::new("198.18.0.1".parse().unwrap(), 51820, 51820, "holdfast0").unwrap()
    }

    const GOLDEN_FULL: &str = r#"	chain output {
		type filter hook output priority filter; policy drop;
		oifname "lo" accept comment "loopback"
		oifname "holdfast0" accept comment "tunnel"
		ip daddr 198.18.0.1 tcp dport 51820 accept comment "gateway control"
		ip daddr 198.18.0.1 udp dport 51820 accept comment "gateway data"
		tcp dport 53 drop comment "dns outside the tunnel"
		udp dport 53 drop comment "dns outside the tunnel"
		udp sport 68 udp dport 67 accept comment "dhcpv4"
		udp sport 546 udp dport 547 accept comment "dhcpv6"
		icmpv6 type nd-router-solicit ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
		icmpv6 type nd-neighbor-solicit ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
		icmpv6 type nd-neighbor-advert ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
	}
	chain input {
		type filter hook input priority filter; policy drop;
		iifname "lo" accept comment "loopback"
		iifname "holdfast0" accept comment "tunnel"
		ip saddr 198.18.0.1 tcp sport 51820 tcp flags != syn / syn,ack accept comment "gateway control"
		ip saddr 198.18.0.1 udp sport 51820 accept comment "gateway data"
		icmp type destination-unreachable accept comment "icmp errors"
		icmp type time-exceeded accept comment "icmp errors"
		icmp type parameter-problem accept comment "icmp errors"
		icmpv6 type destination-unreachable accept comment "icmp errors"
		icmpv6 type packet-too-big accept comment "icmp errors"
		icmpv6 type time-exceeded accept comment "icmp errors"
		icmpv6 type parameter-problem accept comment "icmp errors"
		tcp sport 53 drop comment "dns outside the tunnel"
		udp sport 53 drop comment "dns outside the tunnel"
		udp sport 67 udp dport 68 accept comment "dhcpv4"
		udp sport 547 udp dport 546 accept comment "dhcpv6"
		icmpv6 type nd-router-advert ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
		icmpv6 type nd-neighbor-solicit ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
		icmpv6 type nd-neighbor-advert ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
		icmpv6 type nd-redirect ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
	}
"#;

    #[test]
    fn golden_full_tunnel() {
        assert_eq!(listing(&chains(&plan4())), GOLDEN_FULL);
    }

    #[test]
    fn tunnel_dns_goes_only_to_the_named_resolvers_when_the_plan_names_them() {
        // Not restricted by default: the golden full tunnel above has no such rule.
        assert!(plan4().tunnel_dns().is_empty());
        let plan = plan4().tunnel_dns_only(&[
            "100.64.0.1".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            "100.64.0.1".parse().unwrap(),
        ]);
        assert_eq!(plan.tunnel_dns().len(), 2, "deduplicated");
        let text = listing(&chains(&plan));
        let want = concat!(
            "\t\toifname \"lo\" accept comment \"loopback\"\n",
            "\t\toifname \"holdfast0\" ip daddr 100.64.0.1 tcp dport 53 accept comment \"dns in the tunnel to its resolvers\"\n",
            "\t\toifname \"holdfast0\" ip daddr 100.64.0.1 udp dport 53 accept comment \"dns in the tunnel to its resolvers\"\n",
            "\t\toifname \"holdfast0\" ip6 daddr fd00::1 tcp dport 53 accept comment \"dns in the tunnel to its resolvers\"\n",
            "\t\toifname \"holdfast0\" ip6 daddr fd00::1 udp dport 53 accept comment \"dns in the tunnel to its resolvers\"\n",
            "\t\toifname \"holdfast0\" tcp dport 53 drop comment \"dns in the tunnel to other resolvers\"\n",
            "\t\toifname \"holdfast0\" udp dport 53 drop comment \"dns in the tunnel to other resolvers\"\n",
            "\t\toifname \"holdfast0\" accept comment \"tunnel\"\n",
        );
        assert!(text.contains(want), "{text}");
    }

    #[test]
    fn ipv6_gateway_lan_and_a_second_gateway() {
        let plan = KillSwitchPlan::new("2001:2::1".parse().unwrap(), 443, 4443, "wg-x_1.2")
            .unwrap()
            .with_gateway("198.18.0.9".parse().unwrap(), 7, 8)
            .unwrap()
            .allow_lan(&[
                "192.168.1.77/24".parse().unwrap(),
                "fe80::1234/64".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
            ]);
        let rules = chains(&plan);
        let texts = |chain: &[Rule]| chain.iter().map(|r| r.text.clone()).collect::<Vec<_>>();
        let out = texts(&rules.output);
        assert_eq!(
            out[2..6],
            [
                "ip6 daddr 2001:2::1 tcp dport 443 accept",
                "ip6 daddr 2001:2::1 udp dport 4443 accept",
                "ip daddr 198.18.0.9 tcp dport 7 accept",
                "ip daddr 198.18.0.9 udp dport 8 accept",
            ]
        );
        assert_eq!(out[out.len() - 2..], ["ip daddr 192.168.1.0/24 accept", "ip6 daddr fe80::/64 accept"]);
        let inp = texts(&rules.input);
        assert!(inp.contains(&"ip6 saddr 2001:2::1 tcp sport 443 tcp flags != syn / syn,ack accept".into()));
        assert!(inp.contains(&"ip6 saddr 2001:2::1 udp sport 4443 accept".into()));
        assert_eq!(inp[inp.len() - 2..], ["ip saddr 192.168.1.0/24 accept", "ip6 saddr fe80::/64 accept"]);
        // The IPv6 gateway's match checks the family first, then 16 bytes at the destination.
        let gw = &rules.output[2].exprs;
        assert_eq!(gw[0], Expr::Meta(MetaKey::NfProto));
        assert_eq!(gw[1], Expr::Cmp { eq: true, data: vec![NFPROTO_IPV6] });
        assert_eq!(gw[2], Expr::Payload { base: Base::Network, offset: 24, len: 16 });
        // A prefix is masked before the compare.
        let lan = &rules.output[rules.output.len() - 2].exprs;
        assert_eq!(lan[3], Expr::Mask(vec![255, 255, 255, 0]));
        assert_eq!(lan[4], Expr::Cmp { eq: true, data: vec![192, 168, 1, 0] });
    }

    #[test]
    fn dns_drop_precedes_dhcp_nd_and_lan_but_follows_tunnel_and_gateway() {
        let plan = plan4().allow_lan(&["10.0.0.0/8".parse().unwrap()]);
        let rules = chains(&plan);
        for chain in [&rules.output, &rules.input] {
            let first = |why: &str| chain.iter().position(|r| r.why == why).unwrap();
            let last = |why: &str| chain.iter().rposition(|r| r.why == why).unwrap();
            let dns = (first("dns outside the tunnel"), last("dns outside the tunnel"));
            for before in ["loopback", "tunnel", "gateway control", "gateway data"] {
                assert!(last(before) < dns.0, "{before} must precede the DNS drop");
            }
            for after in ["dhcpv4", "dhcpv6", "ipv6 neighbour discovery", "lan"] {
                assert!(first(after) > dns.1, "{after} must follow the DNS drop");
            }
        }
    }

    #[test]
    fn every_rule_ends_in_its_verdict_and_loads_before_compares() {
        let rules = chains(&plan4().allow_lan(&["10.0.0.0/8".parse().unwrap()]));
        for (_, chain) in rules.chains() {
            for rule in chain {
                assert!(matches!(rule.exprs.last(), Some(Expr::Verdict(_))), "{}", rule.text);
                assert_eq!(rule.text.ends_with("drop"), rule.exprs.last() == Some(&Expr::Verdict(Verdict::Drop)));
                // A compare always follows a load (or a mask of one).
                for w in rule.exprs.windows(2) {
                    if let Expr::Cmp { .. } = w[1] {
                        assert!(!matches!(w[0], Expr::Cmp { .. } | Expr::Verdict(_)), "{}", rule.text);
                    }
                }
            }
        }
    }
}
