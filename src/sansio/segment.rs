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
/// left it); a GSO packet without payload makes none, as in tun-rs.
pub fn split(off: Offload, packet: &[u8], out: &mut Slots<'_>) -> Result<usize, SplitError> {
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
        return Ok(1);
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
        let payload_sum = copy_sum(&mut dst[hdr_len..total], &packet[data]);
        let s = pseudo + u64::from(l4_len) + l4_base + own + payload_sum;
        let c = if protocol == IPPROTO_UDP { nonzero(!fold(s)) } else { !fold(s) };
        dst[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        out.sizes[i] = total;
    }
    Ok(segments)
}

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
mod tests {
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
}
