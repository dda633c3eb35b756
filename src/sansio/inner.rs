//! The inner packet's addresses, for either IP family: the one place that knows where an IPv4 and
//! an IPv6 header keep their source and destination. The data planes ask [`InnerPacket::parse`]
//! and then work with `IpAddr` (anti-spoofing, routing, the client's filter of the kernel's own
//! chatter), so no caller has an `if v4 { .. } else { .. }` of its own.
//!
//! Only the fixed headers are read: addresses sit at fixed offsets in both families, so
//! extension headers never matter here (they matter to the coalescer, which has its own, stricter
//! parse). No allocation; a slice too short for its family's header is `None`, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 header without options.
pub const IPV4_HEADER: usize = 20;
/// IPv6 fixed header.
pub const IPV6_HEADER: usize = 40;

/// The IP family of an inner packet (the version nibble of its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family `packet` claims, from its version nibble; `None` for anything else.
    #[inline]
    pub fn of(packet: &[u8]) -> Option<IpFamily> {
        match packet.first()? >> 4 {
            4 => Some(IpFamily::V4),
            6 => Some(IpFamily::V6),
            _ => None,
        }
    }

    /// The family of an address.
    pub fn of_addr(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// The source and destination of an inner IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
}

impl InnerPacket {
    /// Reads the addresses of an IPv4 or IPv6 packet; `None` if `packet` is neither or is
    /// shorter than its family's fixed header.
    #[inline]
    pub fn parse(packet: &[u8]) -> Option<InnerPacket> {
        match IpFamily::of(packet)? {
            IpFamily::V4 => {
                let h = packet.get(..IPV4_HEADER)?;
                let at = |i: usize| Ipv4Addr::new(h[i], h[i + 1], h[i + 2], h[i + 3]);
                Some(InnerPacket { src: at(12).into(), dst: at(16).into() })
            }
            IpFamily::V6 => {
                let h = packet.get(..IPV6_HEADER)?;
                let at = |i: usize| {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&h[i..i + 16]);
                    Ipv6Addr::from(o)
                };
                Some(InnerPacket { src: at(8).into(), dst: at(24).into() })
            }
        }
    }

    /// The packet's family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of_addr(self.src)
    }

    /// Whether this is the host's own link-scope chatter, which never belongs in a tunnel: an
    /// unspecified or link-local source (IPv6 router solicitations and MLD reports the kernel
    /// sends on any interface that has IPv6), or a link-local multicast destination. The client
    /// drops these before sealing; anything else goes to the gateway, which alone decides what is
    /// spoofed.
    pub fn is_link_chatter(&self) -> bool {
        let link_src = match self.src {
            IpAddr::V4(ip) => ip.is_unspecified() || ip.is_link_local(),
            IpAddr::V6(ip) => ip.is_unspecified() || ip.is_unicast_link_local(),
        };
        let link_dst = match self.dst {
            // 224.0.0.0/24: local network control block, never forwarded.
            IpAddr::V4(ip) => ip.octets()[..3] == [224, 0, 0],
            // ff02::/16 and ff01::/16: link- and interface-local multicast scopes.
            IpAddr::V6(ip) => ip.is_multicast() && (ip.segments()[0] & 0x000f) <= 2,
        };
        link_src || link_dst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(src: &str, dst: &str, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    #[test]
    fn both_families_parse_and_short_or_foreign_packets_do_not() {
        let p = v6("fd00::2", "fd00::1", 48);
        let i = InnerPacket::parse(&p).unwrap();
        assert_eq!(i.src, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(i.dst, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(i.family(), IpFamily::V6);
        assert_eq!(InnerPacket::parse(&p[..39]), None, "truncated IPv6 header");
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[100, 64, 0, 2]);
        v4[16..20].copy_from_slice(&[100, 64, 0, 1]);
        let i = InnerPacket::parse(&v4).unwrap();
        assert_eq!((i.src, i.dst), ([100, 64, 0, 2].into(), [100, 64, 0, 1].into()));
        assert_eq!(i.family(), IpFamily::V4);
        assert_eq!(InnerPacket::parse(&v4[..19]), None);
        for junk in [&[][..], &[0x50; 60][..], &[0x00; 60][..], &[0xf6; 60][..]] {
            assert_eq!(InnerPacket::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn kernel_chatter_is_recognised_and_real_traffic_is_not() {
        let chatter = [
            v6("fe80::1", "ff02::2", 40), // router solicitation
            v6("::", "ff02::16", 40),     // MLD report before an address exists
            v6("fd00::2", "ff02::1", 40), // link-scope multicast from a real address
        ];
        for p in chatter {
            assert!(InnerPacket::parse(&p).unwrap().is_link_chatter(), "{p:?}");
        }
        for (s, d) in [("fd00::2", "fd00::1"), ("fd00::2", "2001:db8::5"), ("fd00::2", "ff05::1")] {
            assert!(!InnerPacket::parse(&v6(s, d, 40)).unwrap().is_link_chatter(), "{s} -> {d}");
        }
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[100, 64, 0, 2]);
        v4[16..20].copy_from_slice(&[8, 8, 8, 8]);
        assert!(!InnerPacket::parse(&v4).unwrap().is_link_chatter());
        v4[16..20].copy_from_slice(&[224, 0, 0, 251]);
        assert!(InnerPacket::parse(&v4).unwrap().is_link_chatter());
    }
}
