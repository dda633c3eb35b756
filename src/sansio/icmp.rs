//! "Too big" answers, written back into the TUN device: ICMP "fragmentation needed" (IPv4, type 3
//! code 4, RFC 792/1191) and ICMPv6 "packet too big" (type 2, RFC 4443), as a kernel tunnel sends
//! when an inner packet does not fit its path. Without one, a sender whose packets are too big
//! for the tunnel never learns it: its TCP retransmits into a black hole.
//!
//! [`too_big`] is the one entry point for both families (it reads the family from the offending
//! packet). It writes into a buffer the caller owns and never allocates, so the data planes can
//! call it per packet. The offending packet comes from the TUN device, i.e. from whatever the
//! host routes into the tunnel: every malformed or truncated input is an error, never a panic.
//!
//! Which source address the answer carries is the caller's choice (see the data planes): it must
//! be an address the receiving host does not own, or its kernel discards the answer as martian.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::checksum;
use super::inner::{IPV4_HEADER, IPV6_HEADER, IpFamily};

/// ICMP header (type, code, checksum, 4 bytes of type-specific data) of either family.
pub const ICMP_HEADER: usize = 8;

/// IPv6's minimum MTU: an ICMPv6 error, quote included, must not exceed it (RFC 4443, 2.4(c)).
pub const IPV6_MIN_MTU: usize = 1280;

/// The longest answer [`too_big`] writes: an IPv6 one of the minimum MTU. An `out` buffer of this
/// size always suffices.
pub const MAX_ANSWER: usize = IPV6_MIN_MTU;

/// The hop limit / TTL of our answers: the Linux default, nothing special about ICMP here.
const HOP_LIMIT: u8 = 64;

const PROTO_ICMP: u8 = 1;
const NEXT_HEADER_ICMPV6: u8 = 58;

/// Why no answer was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IcmpError {
    /// The offending packet is neither IPv4 nor IPv6.
    #[error("not an IP packet")]
    NotIp,
    /// The offending packet is shorter than its own header says (or than a fixed header).
    #[error("truncated packet")]
    Truncated,
    /// The source address given is not of the offending packet's family.
    #[error("answer source of the wrong family")]
    FamilyMismatch,
    /// The MTU to report is below the family's minimum (68 for IPv4, 1280 for IPv6).
    #[error("MTU {0} below the family's minimum")]
    MtuTooSmall(u16),
    /// The caller's buffer cannot hold the answer.
    #[error("answer buffer too small")]
    BufferTooSmall,
    /// The rules forbid an answer to this packet: an IPv4 packet that may be fragmented (DF
    /// clear) or is not a first fragment, an ICMP error itself (no error about an error), or a
    /// source that names no single host (unspecified, multicast, broadcast, loopback).
    #[error("no ICMP error may be sent about this packet")]
    NotAnswerable,
}

/// Writes into `out` the ICMP answer telling the sender of `packet` that it is bigger than `mtu`:
/// from `from`, to the packet's source, quoting the packet as the family's RFC asks (IPv4: its
/// header and the first 8 bytes of its payload; IPv6: as much as fits in 1280 bytes). Returns the
/// answer's length.
pub fn too_big(packet: &[u8], mtu: u16, from: IpAddr, out: &mut [u8]) -> Result<usize, IcmpError> {
    match (IpFamily::of(packet).ok_or(IcmpError::NotIp)?, from) {
        (IpFamily::V4, IpAddr::V4(from)) => frag_needed_v4(packet, mtu, from, out),
        (IpFamily::V6, IpAddr::V6(from)) => packet_too_big_v6(packet, mtu, from, out),
        _ => Err(IcmpError::FamilyMismatch),
    }
}

fn frag_needed_v4(packet: &[u8], mtu: u16, from: Ipv4Addr, out: &mut [u8]) -> Result<usize, IcmpError> {
    let header = packet.get(..IPV4_HEADER).ok_or(IcmpError::Truncated)?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    if ihl < IPV4_HEADER || packet.len() < ihl {
        return Err(IcmpError::Truncated);
    }
    if mtu < 68 {
        return Err(IcmpError::MtuTooSmall(mtu));
    }
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let df = flags_offset & 0x4000 != 0;
    let first_fragment = flags_offset & 0x1fff == 0;
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    // RFC 1122 3.2.2 / RFC 1812 4.3.2.7: never about a non-first fragment, an ICMP error, a
    // broadcast or multicast, or a source that is not one host.
    let icmp_error = header[9] == PROTO_ICMP && packet.get(ihl).is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    let no_host = src.is_unspecified()
        || src.is_multicast()
        || src.is_broadcast()
        || src.is_loopback()
        || dst.is_multicast()
        || dst.is_broadcast();
    if !df || !first_fragment || icmp_error || no_host {
        return Err(IcmpError::NotAnswerable);
    }
    let quote = &packet[..ihl + (packet.len() - ihl).min(8)];
    let total = IPV4_HEADER + ICMP_HEADER + quote.len();
    let out = out.get_mut(..total).ok_or(IcmpError::BufferTooSmall)?;
    let (ip, rest) = out.split_at_mut(IPV4_HEADER);
    // Total length fits: at most 20 + 8 + 60 + 8.
    let total16 = total as u16;
    ip.fill(0); // id, flags, fragment offset, checksum (for now): zero
    ip[0] = 0x45;
    // Precedence "internetwork control", as the kernel marks its own ICMP errors.
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&total16.to_be_bytes());
    ip[8] = HOP_LIMIT;
    ip[9] = PROTO_ICMP;
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&src.octets());
    let sum = checksum::internet(0, ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let (icmp, body) = rest.split_at_mut(ICMP_HEADER);
    let [m0, m1] = mtu.to_be_bytes();
    icmp.copy_from_slice(&[3, 4, 0, 0, 0, 0, m0, m1]);
    body.copy_from_slice(quote);
    let sum = checksum::internet(0, rest);
    rest[2..4].copy_from_slice(&sum.to_be_bytes());
    Ok(total)
}

fn packet_too_big_v6(packet: &[u8], mtu: u16, from: Ipv6Addr, out: &mut [u8]) -> Result<usize, IcmpError> {
    let header = packet.get(..IPV6_HEADER).ok_or(IcmpError::Truncated)?;
    if usize::from(mtu) < IPV6_MIN_MTU {
        return Err(IcmpError::MtuTooSmall(mtu));
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    let src = Ipv6Addr::from(src);
    // RFC 4443 2.4(e): never about an ICMPv6 error (types below 128) or from a source that is
    // not one host. Unlike other errors, "packet too big" is sent for multicast destinations
    // too (2.4(e.2)), so that multicast path MTU discovery works. An error behind extension
    // headers is not looked for: a TUN sees none in practice, and the receiver checks again.
    let icmp_error = header[6] == NEXT_HEADER_ICMPV6 && packet.get(IPV6_HEADER).is_some_and(|t| *t < 128);
    if icmp_error || src.is_unspecified() || src.is_multicast() || src.is_loopback() {
        return Err(IcmpError::NotAnswerable);
    }
    let quote = &packet[..packet.len().min(IPV6_MIN_MTU - IPV6_HEADER - ICMP_HEADER)];
    let payload = ICMP_HEADER + quote.len();
    let total = IPV6_HEADER + payload;
    let out = out.get_mut(..total).ok_or(IcmpError::BufferTooSmall)?;
    let (ip, rest) = out.split_at_mut(IPV6_HEADER);
    // At most 1240: fits.
    let payload16 = payload as u16;
    ip[..4].copy_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class, no flow label
    ip[4..6].copy_from_slice(&payload16.to_be_bytes());
    ip[6] = NEXT_HEADER_ICMPV6;
    ip[7] = HOP_LIMIT;
    ip[8..24].copy_from_slice(&from.octets());
    ip[24..40].copy_from_slice(&src.octets());
    let (icmp, body) = rest.split_at_mut(ICMP_HEADER);
    let [m0, m1] = mtu.to_be_bytes();
    icmp.copy_from_slice(&[2, 0, 0, 0, 0, 0, m0, m1]);
    body.copy_from_slice(quote);
    let sum = checksum::internet(checksum::pseudo_header(&ip[8..40], NEXT_HEADER_ICMPV6, payload16), rest);
    rest[2..4].copy_from_slice(&sum.to_be_bytes());
    Ok(total)
}

/// Whether `data` (with a pseudo-header sum `initial`) carries a valid Internet checksum.
#[cfg(test)]
fn verifies(initial: u64, data: &[u8]) -> bool {
    checksum::internet(initial, data) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GW4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

    /// An IPv4 packet of `len` bytes (header with `options` bytes of options), DF set, TCP.
    fn v4(len: usize, options: usize, fill: u8) -> Vec<u8> {
        let ihl = 20 + options;
        let mut p = vec![fill; len.max(ihl)];
        p[0] = 0x40 | (ihl / 4) as u8;
        p[1] = 0;
        let total = (p.len() as u16).to_be_bytes();
        p[2..4].copy_from_slice(&total);
        p[6] = 0x40;
        p[7] = 0;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[198, 18, 0, 9]);
        p
    }

    fn v6(len: usize, next: u8, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; len.max(40)];
        p[0] = 0x60;
        let payload = ((p.len() - 40) as u16).to_be_bytes();
        p[4..6].copy_from_slice(&payload);
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    fn check_v4(packet: &[u8], mtu: u16, answer: &[u8]) {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let quote = ihl + (packet.len() - ihl).min(8);
        assert_eq!(answer.len(), 20 + 8 + quote);
        assert!(verifies(0, &answer[..20]), "IP header checksum");
        assert!(verifies(0, &answer[20..]), "ICMP checksum");
        assert_eq!(usize::from(u16::from_be_bytes([answer[2], answer[3]])), answer.len());
        assert_eq!(answer[9], 1);
        assert_eq!(&answer[12..16], &GW4.octets());
        assert_eq!(&answer[16..20], &packet[12..16], "to the offender's source");
        assert_eq!(&answer[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([answer[26], answer[27]]), mtu);
        assert_eq!(&answer[28..], &packet[..quote], "quote: header + 8 bytes");
    }

    fn check_v6(packet: &[u8], mtu: u16, answer: &[u8]) {
        let quote = packet.len().min(1280 - 48);
        assert_eq!(answer.len(), 48 + quote);
        assert!(answer.len() <= 1280);
        assert_eq!(usize::from(u16::from_be_bytes([answer[4], answer[5]])), answer.len() - 40);
        assert_eq!(answer[6], 58);
        assert_eq!(&answer[8..24], &GW6.octets());
        assert_eq!(&answer[24..40], &packet[8..24], "to the offender's source");
        let pseudo = checksum::pseudo_header(&answer[8..40], NEXT_HEADER_ICMPV6, (answer.len() - 40) as u16);
        assert!(verifies(pseudo, &answer[40..]), "ICMPv6 checksum with the pseudo-header");
        assert_eq!(&answer[40..42], &[2, 0]);
        assert_eq!(u32::from_be_bytes([answer[44], answer[45], answer[46], answer[47]]), u32::from(mtu));
        assert_eq!(&answer[48..], &packet[..quote]);
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071, 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (complement 220d).
        assert_eq!(checksum::internet(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0x220d);
        // A real header (Wikipedia's IPv4 example): checksum b861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum::internet(0, &h), 0xb861);
    }

    #[test]
    fn ipv4_frag_needed_quotes_header_and_eight_bytes() {
        let mut out = [0u8; MAX_ANSWER];
        for (len, options) in [(1500, 0), (1437, 12), (24, 0), (20, 0), (1500, 40)] {
            let p = v4(len, options, 0xab);
            let n = too_big(&p, 1436, GW4.into(), &mut out).unwrap();
            check_v4(&p, 1436, &out[..n]);
        }
    }

    #[test]
    fn ipv6_packet_too_big_quotes_what_fits_in_1280() {
        let mut out = [0u8; MAX_ANSWER];
        for len in [1500, 1416 + 1, 1232, 1233, 60, 40, 9000] {
            let p = v6(len, 6, 0xcd);
            let n = too_big(&p, 1416, GW6.into(), &mut out).unwrap();
            check_v6(&p, 1416, &out[..n]);
        }
    }

    #[test]
    fn forbidden_answers_are_refused() {
        let mut out = [0u8; MAX_ANSWER];
        let mut p = v4(1500, 0, 0);
        p[6] = 0; // DF clear: fragment instead
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::NotAnswerable));
        let mut p = v4(1500, 0, 0);
        p[7] = 1; // not the first fragment
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::NotAnswerable));
        let mut p = v4(1500, 0, 0);
        p[9] = 1;
        p[20] = 3; // an ICMP error about something else
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::NotAnswerable));
        p[20] = 8; // an echo request is answered
        assert!(too_big(&p, 1400, GW4.into(), &mut out).is_ok());
        let mut p = v4(1500, 0, 0);
        p[16..20].copy_from_slice(&[224, 0, 0, 9]);
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::NotAnswerable));
        let mut p = v6(1500, 58, 0);
        p[40] = 1; // ICMPv6 destination unreachable
        assert_eq!(too_big(&p, 1400, GW6.into(), &mut out), Err(IcmpError::NotAnswerable));
        p[40] = 128; // echo request
        assert!(too_big(&p, 1400, GW6.into(), &mut out).is_ok());
        let mut p = v6(1500, 6, 0);
        p[8..24].copy_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
        assert_eq!(too_big(&p, 1400, GW6.into(), &mut out), Err(IcmpError::NotAnswerable));
        let p = v6(1500, 6, 0);
        assert_eq!(too_big(&p, 1279, GW6.into(), &mut out), Err(IcmpError::MtuTooSmall(1279)));
        assert_eq!(too_big(&v4(1500, 0, 0), 67, GW4.into(), &mut out), Err(IcmpError::MtuTooSmall(67)));
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::FamilyMismatch));
        assert_eq!(too_big(&p, 1400, GW6.into(), &mut out[..100]), Err(IcmpError::BufferTooSmall));
        assert_eq!(too_big(&[], 1400, GW6.into(), &mut out), Err(IcmpError::NotIp));
        assert_eq!(too_big(&p[..39], 1400, GW6.into(), &mut out), Err(IcmpError::Truncated));
        let mut p = v4(30, 0, 0);
        p[0] = 0x4f; // claims 60 bytes of header
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::Truncated));
        p[0] = 0x44; // claims fewer than 20
        assert_eq!(too_big(&p, 1400, GW4.into(), &mut out), Err(IcmpError::Truncated));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1600),
            mtu in any::<u16>(),
            out_len in 0usize..=MAX_ANSWER,
        ) {
            let mut out = vec![0u8; out_len];
            for from in [IpAddr::from(GW4), IpAddr::from(GW6)] {
                if let Ok(n) = too_big(&bytes, mtu, from, &mut out) {
                    prop_assert!(n <= out_len);
                    match from {
                        IpAddr::V4(_) => check_v4(&bytes, mtu, &out[..n]),
                        IpAddr::V6(_) => check_v6(&bytes, mtu, &out[..n]),
                    }
                }
            }
        }

        #[test]
        fn every_valid_packet_gets_a_verifying_exact_answer(
            len in 20usize..9000,
            options in 0usize..=10,
            fill in any::<u8>(),
            mtu4 in 68u16..,
            mtu6 in 1280u16..,
        ) {
            let mut out = [0u8; MAX_ANSWER];
            let p = v4(len, options * 4, fill);
            let n = too_big(&p, mtu4, GW4.into(), &mut out).unwrap();
            check_v4(&p, mtu4, &out[..n]);
            let p = v6(len, 17, fill);
            let n = too_big(&p, mtu6, GW6.into(), &mut out).unwrap();
            check_v6(&p, mtu6, &out[..n]);
        }
    }
}
