//! Cutting what a TUN device with offloads (`IFF_VNET_HDR`) hands over into the packets it
//! stands for: a TCP (TSO) or UDP (USO) packet of up to 64 KiB becomes segments of the size the
//! kernel asked for, each with its own headers and checksums; a lone packet whose checksum the
//! kernel left undone gets it.
//!
//! Why our own and not tun-rs's `recv_multiple`: its split copies each segment's payload, then
//! sums it in a second pass, with a checksum loop that runs at half the speed of
//! [`super::checksum::sum`]. Here the payload is copied and summed in one pass
//! ([`super::checksum::copy_sum`]). The output is the same byte for byte (`tests/segment_props.rs`
//! checks it against tun-rs's `gso_split`), and so are the rules about which headers to trust:
//! the kernel's `hdr_len` is not (on a forwarding path it may cover the whole first packet), the
//! transport header's own length field is.
//!
//! **Partial checksums.** Asked for them ([`Checksums::Partial`]), the segments of a TCP TSO
//! packet keep only the pseudo-header's sum in their checksum field, as the kernel handed the
//! whole packet over, and their payload is copied without being summed: the peer's kernel
//! finishes each checksum (see [`super::wire::FLAG_CSUM_PARTIAL`]). [`finish_partial`] finishes
//! one here instead, for a peer that does not take them.

use thiserror::Error;

use super::checksum::{copy_sum, fold, pseudo_header, sum};

/// Bytes of the virtio-net header in front of every packet read from or written to a TUN device
/// with offloads (the coalescer writes them too).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum is left for the other side to finish.
pub(super) const F_NEEDS_CSUM: u8 = 1;
/// The GSO types (`VIRTIO_NET_HDR_GSO_*`), and the ECN bit that may come with TCP.
const GSO_NONE: u8 = 0;
pub(super) const GSO_TCPV4: u8 = 1;
pub(super) const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// TCP's flags byte, and the flags a segment may not keep from the packet it was cut from.
const TCP_FLAGS: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// What the virtio-net header says about the packet behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// The transport checksum is left undone: it covers `csum_start..` and goes at
    /// `csum_start + csum_offset`, where the pseudo-header's sum already sits.
    pub needs_csum: bool,
    /// `VIRTIO_NET_HDR_GSO_*`, with the ECN bit.
    pub gso_type: u8,
    /// The payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Why a read could not be cut into packets. The kernel writes these headers, so none of them
/// happens short of a kernel bug; each is an error, never a panic or a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SplitError {
    #[error("a read shorter than its virtio-net header ({0} bytes)")]
    Short(usize),
    #[error("unsupported GSO type {0:#04x} for an IPv{1} packet")]
    GsoType(u8, u8),
    #[error("a GSO packet with a segment size of 0")]
    NoSegmentSize,
    #[error("the transport header does not fit: csum_start {start}, csum_offset {offset}, packet {len} bytes")]
    Headers { start: u16, offset: u16, len: usize },
    #[error("a packet of {0} bytes, longer than an IP length field can say")]
    TooLong(usize),
    #[error("{segments} segments of up to {segment_len} bytes do not fit the read slots")]
    Capacity { segments: usize, segment_len: usize },
}

impl Offload {
    /// Parses the header at the start of a read (its fields in the host's byte order, as the
    /// kernel writes them for a device without `TUNSETVNETLE`/`BE`).
    pub fn parse(read: &[u8]) -> Result<Self, SplitError> {
        let h = read.get(..VNET_HDR_LEN).ok_or(SplitError::Short(read.len()))?;
        let u16_at = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        Ok(Self {
            needs_csum: h[0] & F_NEEDS_CSUM != 0,
            gso_type: h[1],
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }
}

/// How [`split_with`] leaves the TCP checksums of the segments it cuts from a TSO packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksums {
    /// Every checksum complete, as a receiver from before partial checksums needs them.
    Complete,
    /// The pseudo-header's sum only, for the peer's kernel to finish; the payload is not summed.
    Partial,
}

/// What [`split_with`] made of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// How many packets.
    pub packets: usize,
    /// Their TCP checksums are partial: asked for, and the read was a TCP TSO packet whose TCP
    /// header follows its IP header directly (see [`tcp_start`]), the one layout a receiver
    /// finishes a checksum in.
    pub csum_partial: bool,
}

/// Where the packets of one read go: slot `i` is `slots[i * stride..][..stride]`, a packet is
/// written at `offset` in its slot and its length into `sizes[i]`; `sizes.len()` slots at most.
pub struct Slots<'a> {
    pub slots: &'a mut [u8],
    pub stride: usize,
    pub offset: usize,
    pub sizes: &'a mut [usize],
}

impl Slots<'_> {
    /// How many slots there are and the bytes a packet may take in each.
    fn room(&self) -> (usize, usize) {
        let n = self.sizes.len().min(self.slots.len() / self.stride.max(1));
        (n, self.stride.saturating_sub(self.offset))
    }

    /// Slot `i`'s packet room.
    fn packet(&mut self, i: usize) -> &mut [u8] {
        &mut self.slots[i * self.stride + self.offset..(i + 1) * self.stride]
    }
}

/// The length of the largest segment [`split`] cuts a GSO `packet` into (its headers and one
/// `gso_size` of payload, or all of a shorter payload); `None` for a packet without GSO and for
/// one whose headers do not parse (which `split` refuses). A reader lays the segments of one
/// packet this far apart (plus what it wraps around each), so that, wrapped, the equal ones lie
/// end to end as one GSO send takes them.
pub fn largest_segment(off: Offload, packet: &[u8]) -> Option<usize> {
    let protocol = match off.gso_type & !GSO_ECN {
        GSO_NONE => return None,
        GSO_TCPV4 | GSO_TCPV6 => IPPROTO_TCP,
        GSO_UDP_L4 => IPPROTO_UDP,
        _ => return None,
    };
    let hdr_len = usize::from(off.csum_start) + l4_header_len(protocol, packet, usize::from(off.csum_start))?;
    let payload = packet.len().checked_sub(hdr_len)?;
    Some(hdr_len + payload.min(usize::from(off.gso_size)))
}

/// The transport header's length: TCP's data offset (at least 20), UDP's 8; `None` when the
/// TCP header's data offset lies past the packet or is too small.
fn l4_header_len(protocol: u8, packet: &[u8], iph: usize) -> Option<usize> {
    if protocol != IPPROTO_TCP {
        return Some(8);
    }
    let thl = usize::from(packet.get(iph + 12)? >> 4) * 4;
    (thl >= 20).then_some(thl)
}

/// Cuts `packet` (what followed the virtio-net header `off`) into `out`; returns how many
/// packets it made. A packet without GSO is copied as it is (its checksum finished if the kernel
/// left it); a GSO packet without payload makes none, as in tun-rs. Every checksum complete.
pub fn split(off: Offload, packet: &[u8], out: &mut Slots<'_>) -> Result<usize, SplitError> {
    split_with(off, packet, out, Checksums::Complete).map(|cut| cut.packets)
}

/// [`split`], with the TCP checksums of a TSO packet's segments left as `want` says.
pub fn split_with(off: Offload, packet: &[u8], out: &mut Slots<'_>, want: Checksums) -> Result<Cut, SplitError> {
    // A TUN read is at most 64 KiB; bounding it here keeps every length below in 16 bits.
    if packet.len() > usize::from(u16::MAX) {
        return Err(SplitError::TooLong(packet.len()));
    }
    let (slots, room) = out.room();
    if off.gso_type == GSO_NONE {
        if slots == 0 || packet.len() > room {
            return Err(SplitError::Capacity { segments: 1, segment_len: packet.len() });
        }
        let dst = out.packet(0);
        if off.needs_csum {
            let (start, at) = checksum_range(off, packet)?;
            dst[..start].copy_from_slice(&packet[..start]);
            // The field holds the pseudo-header's sum: summed with the rest, as it lies.
            let s = copy_sum(&mut dst[start..], &packet[start..]);
            // 0 as 0xffff for any protocol, as the kernel's own software checksum does.
            dst[at..at + 2].copy_from_slice(&nonzero(!fold(s)).to_be_bytes());
        } else {
            dst[..packet.len()].copy_from_slice(packet);
        }
        out.sizes[0] = packet.len();
        return Ok(Cut { packets: 1, csum_partial: false });
    }
    let version = packet.first().map_or(0, |b| b >> 4);
    let v6 = match version {
        4 => false,
        6 => true,
        v => return Err(SplitError::GsoType(off.gso_type, v)),
    };
    let protocol = match (off.gso_type & !GSO_ECN, v6, off.gso_type & GSO_ECN != 0) {
        (GSO_TCPV4, false, _) | (GSO_TCPV6, true, _) => IPPROTO_TCP,
        (GSO_UDP_L4, _, false) => IPPROTO_UDP,
        _ => return Err(SplitError::GsoType(off.gso_type, version)),
    };
    if off.gso_size == 0 {
        return Err(SplitError::NoSegmentSize);
    }
    let bad = || SplitError::Headers { start: off.csum_start, offset: off.csum_offset, len: packet.len() };
    let iph = usize::from(off.csum_start);
    let expected_offset = if protocol == IPPROTO_TCP { 16 } else { 6 };
    if off.csum_offset != expected_offset || iph < if v6 { 40 } else { 20 } {
        return Err(bad());
    }
    // The transport header's own length, not the kernel's hdr_len (see the module's comment).
    let l4h = l4_header_len(protocol, packet, iph).ok_or_else(bad)?;
    let hdr_len = iph + l4h;
    if packet.len() < hdr_len {
        return Err(bad());
    }
    let gso_size = usize::from(off.gso_size);
    let payload = packet.len() - hdr_len;
    let segments = payload.div_ceil(gso_size);
    let largest = hdr_len + payload.min(gso_size);
    if segments > slots || largest > room {
        return Err(SplitError::Capacity { segments, segment_len: largest });
    }
    // Only where the receiver finds the checksum by itself: right behind the IP header.
    let partial = want == Checksums::Partial && protocol == IPPROTO_TCP && ip_header_len(packet) == Some(iph);
    // What every segment's checksums share, summed once: the addresses and protocol, and the
    // headers without the fields that differ per segment (lengths, IPv4 id, TCP sequence number
    // and flags) and without the checksum fields. Each segment adds its own fields to these.
    let addrs = if v6 { &packet[8..40] } else { &packet[12..20] };
    // The length differs per segment: added there.
    let pseudo = pseudo_header(addrs, protocol, 0);
    let csum_at = iph + usize::from(off.csum_offset);
    let varying: &[usize] = match protocol {
        // The checksum, the sequence number, the data offset and flags.
        IPPROTO_TCP => &[csum_at, iph + 4, iph + 6, iph + 12],
        // The checksum and the length.
        _ => &[csum_at, iph + 4],
    };
    let l4_base = sum(&packet[iph..hdr_len]) + without(packet, varying);
    // The length, the id and the checksum.
    let ip_base = if v6 { 0 } else { sum(&packet[..iph]) + without(packet, &[2, 4, 10]) };
    let first_seq = u32::from_be_bytes([packet[iph + 4], packet[iph + 5], packet[iph + 6], packet[iph + 7]]);
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    for i in 0..segments {
        let data = hdr_len + i * gso_size..(hdr_len + (i + 1) * gso_size).min(packet.len());
        let last = data.end == packet.len();
        // Every length is bounded by the packet's (at most 65535, checked first): the casts
        // cannot truncate.
        let l4_len = (l4h + data.len()) as u16;
        let total = hdr_len + data.len();
        let dst = out.packet(i);
        dst[..hdr_len].copy_from_slice(&packet[..hdr_len]);
        if v6 {
            // Extension headers, if any, count as payload.
            dst[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            let id = first_id.wrapping_add(i as u16);
            dst[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            dst[4..6].copy_from_slice(&id.to_be_bytes());
            let c = !fold(ip_base + total as u64 + u64::from(id));
            dst[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let own = if protocol == IPPROTO_TCP {
            let seq = first_seq.wrapping_add((gso_size * i) as u32);
            dst[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
            let flags = &mut dst[iph + TCP_FLAGS];
            if i > 0 {
                // As Linux's own TCP ECN segmentation: CWR on the first segment only.
                *flags &= !TCP_CWR;
            }
            if !last {
                *flags &= !(TCP_FIN | TCP_PSH);
            }
            u64::from(seq >> 16)
                + u64::from(seq & 0xffff)
                + u64::from(u16::from_be_bytes([dst[iph + 12], dst[iph + 13]]))
        } else {
            dst[iph + 4..iph + 6].copy_from_slice(&l4_len.to_be_bytes());
            u64::from(l4_len)
        };
        let c = if partial {
            dst[hdr_len..total].copy_from_slice(&packet[data]);
            // What the kernel leaves for NEEDS_CSUM: the pseudo-header's sum, not complemented.
            fold(pseudo + u64::from(l4_len))
        } else {
            let payload_sum = copy_sum(&mut dst[hdr_len..total], &packet[data]);
            let s = pseudo + u64::from(l4_len) + l4_base + own + payload_sum;
            if protocol == IPPROTO_UDP { nonzero(!fold(s)) } else { !fold(s) }
        };
        dst[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        out.sizes[i] = total;
    }
    Ok(Cut { packets: segments, csum_partial: partial && segments > 0 })
}

/// The IP header's length as a TCP segment's checksum would start behind it: IPv4's IHL, or 40
/// for IPv6, each when the protocol is TCP (`None` with IPv6 extension headers, for an IPv4
/// fragment, which the segments would copy, or for another version). What [`tcp_start`] finds
/// in each segment.
fn ip_header_len(p: &[u8]) -> Option<usize> {
    match p.first()? >> 4 {
        4 => {
            let h = p.get(..20)?;
            let fragment = h[6] & 0x3f != 0 || h[7] != 0;
            (h[9] == IPPROTO_TCP && !fragment).then_some(usize::from(h[0] & 0x0f) * 4)
        }
        6 => (*p.get(6)? == IPPROTO_TCP).then_some(IPV6_HEADER),
        _ => None,
    }
}

const IPV6_HEADER: usize = 40;

/// Where the TCP header starts if `p` is a whole, unfragmented IPv4 or IPv6 packet carrying TCP
/// right behind its IP header (no IPv6 extension header; not a jumbogram) with room for a TCP
/// header; `None` for anything else. The layout a partial checksum travels in: a receiver
/// derives `csum_start` from it, and refuses a flagged packet without it.
pub fn tcp_start(p: &[u8]) -> Option<usize> {
    match p.first()? >> 4 {
        4 => {
            let h = p.get(..20)?;
            if h[9] != IPPROTO_TCP {
                return None;
            }
            let iph_len = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            // More-fragments flag or a fragment offset: a fragment.
            let fragment = h[6] & 0x3f != 0 || h[7] != 0;
            (iph_len >= 20 && total == p.len() && !fragment && p.len() >= iph_len + 20).then_some(iph_len)
        }
        6 => {
            let h = p.get(..IPV6_HEADER)?;
            // The payload length covers everything after the fixed header; 0 would be a
            // jumbogram, whose real length sits in a hop-by-hop option.
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            (h[6] == IPPROTO_TCP && payload != 0 && IPV6_HEADER + payload == p.len() && p.len() >= IPV6_HEADER + 20)
                .then_some(IPV6_HEADER)
        }
        _ => None,
    }
}

/// Finishes the partial TCP checksum of `packet` in place (what the receiver's kernel would
/// do): for a peer that does not take partial checksums, or a device without offload. `None`
/// (and `packet` unchanged) when it is not a TCP segment in the layout of [`tcp_start`].
pub fn finish_partial(packet: &mut [u8]) -> Option<()> {
    let start = tcp_start(packet)?;
    let at = start + TCP_CSUM_OFFSET;
    // The field holds the pseudo-header's sum: summed with the rest, as it lies.
    let c = !fold(sum(&packet[start..]));
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Some(())
}

/// The TCP checksum's offset in the TCP header.
pub(super) const TCP_CSUM_OFFSET: usize = 16;

/// Where a lone packet's checksum starts and where it goes (`csum_start`, and the field's
/// offset in the packet), checked against the packet: the field's 2 bytes must fit.
fn checksum_range(off: Offload, packet: &[u8]) -> Result<(usize, usize), SplitError> {
    let start = usize::from(off.csum_start);
    let at = start + usize::from(off.csum_offset);
    if at + 2 > packet.len() {
        return Err(SplitError::Headers { start: off.csum_start, offset: off.csum_offset, len: packet.len() });
    }
    Ok((start, at))
}

/// What takes the 16-bit words at `at` out of a sum of `packet`: their ones' complements (in
/// ones' complement arithmetic, adding `!x` subtracts `x`).
fn without(packet: &[u8], at: &[usize]) -> u64 {
    at.iter().map(|&i| u64::from(!u16::from_be_bytes([packet[i], packet[i + 1]]))).sum()
}

/// A checksum of 0 written as 0xffff, which means the same in ones' complement and is what UDP
/// requires (0 there says "no checksum").
fn nonzero(c: u16) -> u16 {
    if c == 0 { 0xffff } else { c }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn header(needs_csum: bool, gso_type: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = u8::from(needs_csum);
        h[1] = gso_type;
        h[4..6].copy_from_slice(&gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
        h
    }

    #[test]
    fn the_header_parses_in_host_order_and_a_short_read_is_an_error() {
        let off = Offload::parse(&header(true, GSO_TCPV4 | GSO_ECN, 1400, 20, 16)).unwrap();
        assert_eq!(off, Offload { needs_csum: true, gso_type: 0x81, gso_size: 1400, csum_start: 20, csum_offset: 16 });
        assert_eq!(Offload::parse(&[0; 9]), Err(SplitError::Short(9)));
    }

    #[test]
    fn bad_headers_are_errors_and_write_nothing_beyond_the_slots() {
        let mut slots = vec![0u8; 4 * 100];
        let mut sizes = [0usize; 4];
        let mut out = Slots { slots: &mut slots, stride: 100, offset: 20, sizes: &mut sizes };
        let mut p = vec![0u8; 60];
        p[0] = 0x45;
        p[32] = 0x50;
        let off = |gso_type, gso_size, csum_start, csum_offset| Offload {
            needs_csum: true,
            gso_type,
            gso_size,
            csum_start,
            csum_offset,
        };
        assert_eq!(split(off(GSO_TCPV6, 8, 20, 16), &p, &mut out), Err(SplitError::GsoType(GSO_TCPV6, 4)));
        assert_eq!(split(off(GSO_UDP_L4 | GSO_ECN, 8, 20, 6), &p, &mut out), Err(SplitError::GsoType(0x85, 4)));
        assert_eq!(split(off(GSO_TCPV4, 0, 20, 16), &p, &mut out), Err(SplitError::NoSegmentSize));
        assert!(matches!(split(off(GSO_TCPV4, 8, 20, 6), &p, &mut out), Err(SplitError::Headers { .. })));
        assert!(matches!(split(off(GSO_TCPV4, 8, 12, 16), &p, &mut out), Err(SplitError::Headers { .. })));
        assert!(matches!(split(off(GSO_TCPV4, 8, 60, 16), &p, &mut out), Err(SplitError::Headers { .. })));
        // 20 bytes of payload: 3 segments of 8 fit the 4 slots, 5 of 4 do not.
        assert_eq!(split(off(GSO_TCPV4, 8, 20, 16), &p, &mut out), Ok(3));
        assert_eq!(
            split(off(GSO_TCPV4, 4, 20, 16), &p, &mut out),
            Err(SplitError::Capacity { segments: 5, segment_len: 44 })
        );
        // A lone packet whose checksum field lies beyond it.
        assert!(matches!(split(off(GSO_NONE, 0, 50, 16), &p, &mut out), Err(SplitError::Headers { .. })));
        let big = vec![0x45u8; 81];
        assert_eq!(
            split(off(GSO_NONE, 0, 20, 16), &big, &mut out),
            Err(SplitError::Capacity { segments: 1, segment_len: 81 })
        );
        let huge = vec![0x45u8; 65536];
        assert_eq!(split(off(GSO_TCPV4, 1400, 20, 16), &huge, &mut out), Err(SplitError::TooLong(65536)));
    }

    /// A TCP TSO packet over IPv4 (20-byte header, 20-byte TCP header, `payload` bytes), its
    /// checksum field holding the pseudo-header's sum as the kernel leaves it. With a payload
    /// of one segment or less, also a lone segment as a sender leaves it partial.
    pub(crate) fn tso4(payload: usize) -> Vec<u8> {
        let total = 40 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = IPPROTO_TCP;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[32] = 0x50;
        p[33] = 0x10;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let pseudo = fold(pseudo_header(&p[12..20], IPPROTO_TCP, (total - 20) as u16));
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        p
    }

    #[test]
    fn partial_checksums_only_where_the_receiver_finds_them() {
        let off = Offload { needs_csum: true, gso_type: GSO_TCPV4, gso_size: 100, csum_start: 20, csum_offset: 16 };
        let cut = |p: &[u8], want| {
            let mut slots = vec![0u8; 4 * 200];
            let mut sizes = [0usize; 4];
            split_with(off, p, &mut Slots { slots: &mut slots, stride: 200, offset: 20, sizes: &mut sizes }, want)
        };
        let p = tso4(250);
        assert_eq!(cut(&p, Checksums::Partial), Ok(Cut { packets: 3, csum_partial: true }));
        assert_eq!(cut(&p, Checksums::Complete), Ok(Cut { packets: 3, csum_partial: false }));
        // A fragment's segments would be fragments, and a protocol byte that is not TCP would
        // be copied too: neither is a layout a receiver finishes, so their sums are done here.
        let mut frag = p.clone();
        frag[6] = 0x20;
        assert_eq!(cut(&frag, Checksums::Partial), Ok(Cut { packets: 3, csum_partial: false }));
        let mut udp = p.clone();
        udp[9] = IPPROTO_UDP;
        assert_eq!(cut(&udp, Checksums::Partial), Ok(Cut { packets: 3, csum_partial: false }));
        // No payload: no segments, nothing partial.
        assert_eq!(cut(&tso4(0), Checksums::Partial), Ok(Cut { packets: 0, csum_partial: false }));
    }

    #[test]
    fn finishing_a_partial_checksum_is_the_kernels_sum() {
        // A lone segment as the kernel leaves it (pseudo-header sum in the field), finished
        // here, verifies; and the split of the same packet with its checksum done agrees.
        let mut p = tso4(30);
        let mut slots = vec![0u8; 200];
        let mut sizes = [0usize; 1];
        let lone = Offload { needs_csum: true, gso_type: GSO_NONE, gso_size: 0, csum_start: 20, csum_offset: 16 };
        split(lone, &p, &mut Slots { slots: &mut slots, stride: 200, offset: 0, sizes: &mut sizes }).unwrap();
        assert_eq!(finish_partial(&mut p), Some(()));
        assert_eq!(&p[..], &slots[..sizes[0]]);
        assert_eq!(fold(pseudo_header(&p[12..20], IPPROTO_TCP, 50) + sum(&p[20..])), 0xffff);
        // Not TCP right behind the IP header: left as it is.
        let mut not_tcp = tso4(30);
        not_tcp[9] = IPPROTO_UDP;
        let before = not_tcp.clone();
        assert_eq!(finish_partial(&mut not_tcp), None);
        assert_eq!(not_tcp, before);
        assert_eq!(finish_partial(&mut [0x45; 10]), None);
        assert_eq!(finish_partial(&mut []), None);
    }
}
