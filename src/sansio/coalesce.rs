//! TCP receive coalescing for TUN writes (GRO in user space), without allocation per packet.
//!
//! A UDP GRO receive hands the loop a burst of inner packets, most of them consecutive segments
//! of one TCP flow (the peer read them from its TUN device as one TSO super-packet and split
//! them). Writing each to the TUN device costs the kernel a full receive path per 1.4 KB
//! segment; merging them back into one large packet behind a virtio-net header with
//! `GSO_TCPV4` (or `GSO_TCPV6`) lets the kernel handle the burst as one packet, as its own GRO
//! would.
//!
//! The rules follow the kernel's `tcp_gro_receive` / `inet_gro_receive` (and wireguard-go's
//! user-space GRO), made strict enough that the kernel re-segmenting a merged packet gives back
//! exactly the packets that went in:
//! - IPv4: no IP fragments, equal IP header fields (TOS, DF, TTL, options) and IP ids that
//!   increase by one per segment;
//! - IPv6: TCP directly behind the fixed header (any extension header, a fragment header among
//!   them, and a jumbogram's zero payload length pass through unmerged), equal version, traffic
//!   class, flow label and hop limit (IPv6 has no id; `Ip` keeps the family differences in one
//!   place);
//! - TCP with only ACK, or ACK|PSH, set; equal ack number, window and options; the segment's
//!   sequence number continues the merged packet's; payloads of one size, the last one may be
//!   shorter, and nothing after a shorter one or after PSH;
//! - both IP and TCP checksums valid: a merged packet goes to the kernel with `NEEDS_CSUM`,
//!   which it does not verify, so a segment the kernel would have dropped must not be merged.
//!   A segment whose checksum the sender left partial ([`Coalescer::push_with`]) has no sum to
//!   check: it is copied without summing, and goes to the kernel with `NEEDS_CSUM` merged or not.
//!
//! A packet is only ever appended to the most recent packet of its flow in the batch, so the
//! order of packets within a flow is kept; packets of different flows may be written in another
//! interleaving, as GRO does. Anything that does not qualify passes through unchanged.
//!
//! Pure logic: bytes in, bytes out, buffers allocated once in [`Coalescer::new`].

use super::checksum::{copy_sum, fold, pseudo_header, sum};
pub use super::segment::VNET_HDR_LEN;
use super::segment::{
    F_NEEDS_CSUM as VNET_F_NEEDS_CSUM, GSO_TCPV4 as VNET_GSO_TCPV4, GSO_TCPV6 as VNET_GSO_TCPV6, TCP_CSUM_OFFSET,
    finish_partial, tcp_start,
};

/// The largest packet merged or passed through: the largest IPv4 packet (its total-length field
/// is 16 bits). An IPv6 packet could be 40 bytes longer; merged ones stay within this too.
pub const MAX_PACKET: usize = 65535;

/// How many of the most recent items a packet is compared with when looking for its flow. A
/// burst is almost always one flow; a small bound keeps a batch of many flows from costing
/// quadratic time.
const FLOW_LOOKBACK: usize = 8;
/// Bytes per item in [`Coalescer`]'s buffer: a virtio-net header and the largest packet.
const SLOT: usize = VNET_HDR_LEN + MAX_PACKET;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const IPPROTO_TCP: u8 = 6;

/// Why a packet could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Every item slot is taken: write out ([`Coalescer::finish`]) and [`Coalescer::clear`] first.
    #[error("the coalescer is full")]
    Full,
    /// Longer than any IPv4 packet can be.
    #[error("packet longer than {MAX_PACKET} bytes")]
    TooLong,
    /// Flagged with a partial checksum, but not a TCP segment right behind its IP header, the
    /// one place a partial checksum can be finished (see [`super::segment::tcp_start`]).
    #[error("a packet with a partial checksum that is not a plain TCP segment")]
    NotPartialTcp,
}

/// The IP family of a segment: everything that differs between IPv4 and IPv6 is a method here,
/// so the merge rules themselves read the same for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ip {
    V4,
    V6,
}

/// IPv6's fixed header; with TCP right behind it, also its whole header.
const IPV6_HEADER: usize = 40;

impl Ip {
    /// The family and IP header length if `p` is a whole, unfragmented IP packet carrying TCP
    /// directly (no IPv6 extension header) with room for a TCP header.
    fn tcp_packet(p: &[u8]) -> Option<(Ip, usize)> {
        let iph_len = tcp_start(p)?;
        Some((if p[0] >> 4 == 4 { Ip::V4 } else { Ip::V6 }, iph_len))
    }

    /// Where the source and destination addresses sit, back to back (the TCP pseudo-header's).
    fn addrs(self) -> std::ops::Range<usize> {
        match self {
            Ip::V4 => 12..20,
            Ip::V6 => 8..40,
        }
    }

    /// The packet's IP id, and how much it grows per segment. IPv6 has no id: 0, never growing.
    fn id(self, p: &[u8]) -> (u16, u16) {
        match self {
            Ip::V4 => (u16::from_be_bytes([p[4], p[5]]), 1),
            Ip::V6 => (0, 0),
        }
    }

    /// Whether two IP headers of length `iph_len` agree on everything GRO keeps from the first:
    /// IPv4: TOS, the DF and reserved bits, TTL, protocol, addresses and options; IPv6: version,
    /// traffic class, flow label, next header, hop limit and addresses.
    fn headers_match(self, a: &[u8], b: &[u8], iph_len: usize) -> bool {
        match self {
            Ip::V4 => {
                a[1] == b[1] && a[6] >> 5 == b[6] >> 5 && a[8..10] == b[8..10] && a[12..iph_len] == b[12..iph_len]
            }
            Ip::V6 => a[..4] == b[..4] && a[6..IPV6_HEADER] == b[6..IPV6_HEADER],
        }
    }

    /// Whether the IP header's own checksum verifies (IPv6 has none).
    fn header_checksum_valid(self, p: &[u8], iph_len: usize) -> bool {
        match self {
            Ip::V4 => fold(sum(&p[..iph_len])) == 0xffff,
            Ip::V6 => true,
        }
    }

    /// Writes the length field (and IPv4's header checksum) of a merged packet `pkt`.
    fn write_length(self, pkt: &mut [u8], iph_len: usize) {
        match self {
            Ip::V4 => {
                // The merge kept `len <= MAX_PACKET`, so it fits in 16 bits.
                let total = pkt.len() as u16;
                pkt[2..4].copy_from_slice(&total.to_be_bytes());
                pkt[10..12].fill(0);
                let ip_csum = !fold(sum(&pkt[..iph_len]));
                pkt[10..12].copy_from_slice(&ip_csum.to_be_bytes());
            }
            Ip::V6 => {
                let payload = (pkt.len() - IPV6_HEADER) as u16;
                pkt[4..6].copy_from_slice(&payload.to_be_bytes());
            }
        }
    }

    /// The virtio-net GSO type.
    fn gso_type(self) -> u8 {
        match self {
            Ip::V4 => VNET_GSO_TCPV4,
            Ip::V6 => VNET_GSO_TCPV6,
        }
    }
}

/// A TCP flow: source and destination addresses (IPv4 ones in the first word) and ports, as on
/// the wire, and the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    addrs: [u64; 4],
    ports: u32,
    ip: Ip,
}

/// What the coalescer reads from a packet that could be merged.
#[derive(Debug, Clone, Copy)]
struct Segment {
    flow: FlowKey,
    ip: Ip,
    iph_len: usize,
    tcph_len: usize,
    seq: u32,
    ack: u32,
    id: u16,
    /// How much the IP id grows per segment (1 for IPv4, 0 for IPv6, which has none).
    id_step: u16,
    window: u16,
    psh: bool,
    payload_len: usize,
}

/// One output packet: a packet that passed through, or the head of a merged run.
#[derive(Debug, Clone, Copy, Default)]
struct Item {
    /// Bytes of the packet (after the virtio-net header).
    len: usize,
    /// The TCP flow, for any TCP packet (even one that cannot merge, so a later segment of its
    /// flow is never appended to an earlier item past it).
    flow: Option<FlowKey>,
    /// The family (meaningful for a mergeable head).
    ip: Option<Ip>,
    /// Still accepts appended segments.
    open: bool,
    /// The head's checksums were verified (done lazily, when a second segment arrives).
    head_checked: bool,
    iph_len: usize,
    tcph_len: usize,
    ack: u32,
    window: u16,
    next_seq: u32,
    next_id: u16,
    gso_size: usize,
    segments: usize,
}

/// Collects the inner packets of one receive batch and writes them out merged where possible.
///
/// Use: [`push`](Self::push) each packet, then [`finish`](Self::finish) and write every slice
/// it yields (virtio-net header included) to the TUN device, then [`clear`](Self::clear).
pub struct Coalescer {
    /// One slot of [`SLOT`] bytes per item: the virtio-net header, then up to [`MAX_PACKET`]
    /// bytes of packet. One allocation for all of them, zeroed by the allocator: at this size
    /// (4 MiB for 64 items) that is fresh zero pages from the kernel, which cost no memory until
    /// written, so the resident size follows what batches use (a few slots, mostly their first
    /// pages), not the capacity. One allocation per slot put an allocator header on a page of
    /// every slot from the start (measured: the client's private memory under load 0.6 MiB
    /// higher).
    bufs: Box<[u8]>,
    items: Vec<Item>,
    n: usize,
    merge: bool,
    /// The output is written without its virtio-net header (a device without offload), so a
    /// partial checksum is finished here, not by the kernel.
    headerless: bool,
    finished: bool,
    /// Segments appended to an earlier packet since creation (a tally for tests and stats).
    merged: u64,
}

impl Coalescer {
    /// Room for `capacity` output packets. With `merge` false every packet passes through on its
    /// own (behind a zero virtio-net header): for devices without TSO.
    pub fn new(capacity: usize, merge: bool) -> Self {
        let capacity = capacity.max(1);
        Self {
            bufs: vec![0u8; capacity * SLOT].into_boxed_slice(),
            items: vec![Item::default(); capacity],
            n: 0,
            merge,
            headerless: false,
            finished: false,
            merged: 0,
        }
    }

    /// The same coalescer for a device without offload, whose writes have no virtio-net
    /// header (the caller strips it): a packet with a partial checksum gets it finished here.
    pub fn headerless(mut self) -> Self {
        self.headerless = true;
        self.merge = false;
        self
    }

    /// No free item slot: a push may fail with [`PushError::Full`].
    pub fn is_full(&self) -> bool {
        self.n == self.items.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Segments merged into an earlier packet so far.
    pub fn merged(&self) -> u64 {
        self.merged
    }

    /// Queues `packet`: appended to the latest packet of its flow when the rules allow it, else
    /// copied into a new item. Its checksums are complete (checked before it is merged).
    pub fn push(&mut self, packet: &[u8]) -> Result<(), PushError> {
        self.push_with(packet, false)
    }

    /// [`Coalescer::push`] for a packet whose TCP checksum may be partial (`csum_partial`: the
    /// field holds the pseudo-header's sum only, see [`super::wire::FLAG_CSUM_PARTIAL`]). Such a
    /// packet must be a TCP segment right behind its IP header ([`PushError::NotPartialTcp`]
    /// otherwise); it goes to the kernel with `NEEDS_CSUM`, merged or on its own.
    pub fn push_with(&mut self, packet: &[u8], csum_partial: bool) -> Result<(), PushError> {
        if packet.len() > MAX_PACKET {
            return Err(PushError::TooLong);
        }
        let seg = if self.merge { parse_segment(packet) } else { None };
        // A segment that parsed has its TCP header where a partial checksum needs it; only a
        // packet that did not (a FIN, a device without merging) is looked at again.
        let partial_at = match (csum_partial, &seg) {
            (false, _) => None,
            (true, Some(s)) => Some(s.iph_len),
            (true, None) => Some(tcp_start(packet).ok_or(PushError::NotPartialTcp)?),
        };
        if self.finished {
            // Headers of the finished items were rewritten; new packets must not join them.
            self.clear();
        }
        let mut open_new = true;
        if let Some(seg) = &seg
            && let Some(i) = self.latest_of_flow(seg.flow)
        {
            match self.try_append(i, packet, seg, csum_partial) {
                Append::Done => return Ok(()),
                Append::No => {}
                Append::BadChecksum => open_new = false,
            }
        }
        if self.is_full() {
            return Err(PushError::Full);
        }
        let item = &mut self.items[self.n];
        let buf = &mut self.bufs[self.n * SLOT..][..SLOT];
        buf[..VNET_HDR_LEN].fill(0);
        let body = &mut buf[VNET_HDR_LEN..VNET_HDR_LEN + packet.len()];
        body.copy_from_slice(packet);
        if let Some(start) = partial_at {
            if self.headerless {
                // `partial_at` checked the layout, so this finds it.
                let _ = finish_partial(body);
            } else {
                write_partial_header(&mut buf[..VNET_HDR_LEN], start);
            }
        }
        *item = match seg {
            Some(s) => Item {
                len: packet.len(),
                flow: Some(s.flow),
                ip: Some(s.ip),
                // PSH ends a merged run; a bad checksum is never merged with.
                open: open_new && !s.psh,
                // A partial checksum has no sum to check.
                head_checked: csum_partial,
                iph_len: s.iph_len,
                tcph_len: s.tcph_len,
                ack: s.ack,
                window: s.window,
                next_seq: s.seq.wrapping_add(s.payload_len as u32),
                next_id: s.id.wrapping_add(s.id_step),
                gso_size: s.payload_len,
                segments: 1,
            },
            None => Item {
                len: packet.len(),
                flow: if self.merge { tcp_flow(packet) } else { None },
                segments: 1,
                ..Item::default()
            },
        };
        self.n += 1;
        Ok(())
    }

    /// The most recent item of `flow` among the last [`FLOW_LOOKBACK`].
    fn latest_of_flow(&self, flow: FlowKey) -> Option<usize> {
        let from = self.n.saturating_sub(FLOW_LOOKBACK);
        (from..self.n).rev().find(|&i| self.items[i].flow == Some(flow))
    }

    fn try_append(&mut self, i: usize, packet: &[u8], seg: &Segment, csum_partial: bool) -> Append {
        let item = self.items[i];
        let buf = &self.bufs[i * SLOT + VNET_HDR_LEN..][..MAX_PACKET];
        let head = &buf[..item.len];
        let fits = item.open
            && seg.seq == item.next_seq
            && seg.ack == item.ack
            && seg.window == item.window
            && seg.id == item.next_id
            && seg.iph_len == item.iph_len
            && seg.tcph_len == item.tcph_len
            && seg.payload_len <= item.gso_size
            && item.len + seg.payload_len <= MAX_PACKET
            && item.ip == Some(seg.ip)
            && seg.ip.headers_match(head, packet, seg.iph_len)
            && head[seg.iph_len + 20..seg.iph_len + seg.tcph_len]
                == packet[seg.iph_len + 20..seg.iph_len + seg.tcph_len];
        if !fits {
            return Append::No;
        }
        if !item.head_checked {
            if !checksums_valid(seg.ip, head, item.iph_len) {
                self.items[i].open = false;
                return Append::No;
            }
            self.items[i].head_checked = true;
        }
        // The payload is copied and summed in one pass. A segment whose checksums fail leaves
        // its bytes past the item's end, where nothing reads them. A partial checksum has no
        // sum to check: the kernel computes the merged packet's.
        let headers = seg.iph_len + seg.tcph_len;
        let at = i * SLOT + VNET_HDR_LEN + item.len;
        let dst = &mut self.bufs[at..at + seg.payload_len];
        if csum_partial {
            dst.copy_from_slice(&packet[headers..]);
        } else {
            let payload_sum = copy_sum(dst, &packet[headers..]);
            if !checksums_valid_with(seg.ip, &packet[..headers], seg.iph_len, seg.payload_len, payload_sum) {
                return Append::BadChecksum;
            }
        }
        let item = &mut self.items[i];
        item.len += seg.payload_len;
        item.segments += 1;
        item.next_seq = item.next_seq.wrapping_add(seg.payload_len as u32);
        item.next_id = item.next_id.wrapping_add(seg.id_step);
        if seg.psh {
            // PSH belongs to the last segment, and the kernel's segmentation puts it there.
            let flags = i * SLOT + VNET_HDR_LEN + item.iph_len + 13;
            self.bufs[flags] |= TCP_PSH;
        }
        if seg.psh || seg.payload_len < item.gso_size {
            item.open = false;
        }
        self.merged += 1;
        Append::Done
    }

    /// Completes the headers of merged packets and returns every queued packet, in order, each
    /// behind its virtio-net header. The slices stay valid until the next `push` or `clear`.
    pub fn finish(&mut self) -> impl ExactSizeIterator<Item = &[u8]> {
        if !self.finished {
            for (item, buf) in self.items[..self.n].iter().zip(self.bufs.chunks_exact_mut(SLOT)) {
                if item.segments > 1 {
                    write_gso_headers(item, buf);
                }
            }
            self.finished = true;
        }
        self.items[..self.n].iter().zip(self.bufs.chunks_exact(SLOT)).map(|(item, buf)| &buf[..VNET_HDR_LEN + item.len])
    }

    /// Forgets what is queued (buffers are kept).
    pub fn clear(&mut self) {
        self.n = 0;
        self.finished = false;
    }
}

enum Append {
    Done,
    /// Not a continuation of that item: the packet starts a new one.
    No,
    /// The packet's own checksums are wrong: it goes on its own, unmerged, for the kernel to drop.
    BadChecksum,
}

/// The virtio-net header, IP length (and IPv4 checksum) of a merged packet: the TCP checksum
/// field holds the pseudo-header sum only, for the kernel to complete (`NEEDS_CSUM`).
fn write_gso_headers(item: &Item, buf: &mut [u8]) {
    // Only a merged head (which has a family) gets here.
    let Some(ip) = item.ip else { return };
    let (hdr, pkt) = buf.split_at_mut(VNET_HDR_LEN);
    let pkt = &mut pkt[..item.len];
    let iph = item.iph_len;
    // The merge kept `len <= MAX_PACKET`, so this fits in 16 bits.
    let tcp_len = (item.len - iph) as u16;
    ip.write_length(pkt, iph);
    let pseudo = fold(pseudo_header(&pkt[ip.addrs()], IPPROTO_TCP, tcp_len));
    pkt[iph + TCP_CSUM_OFFSET..iph + TCP_CSUM_OFFSET + 2].copy_from_slice(&pseudo.to_be_bytes());
    // struct virtio_net_hdr, in the host's byte order (a TUN device's default).
    hdr[0] = VNET_F_NEEDS_CSUM;
    hdr[1] = ip.gso_type();
    hdr[2..4].copy_from_slice(&((iph + item.tcph_len) as u16).to_ne_bytes());
    hdr[4..6].copy_from_slice(&(item.gso_size as u16).to_ne_bytes());
    hdr[6..8].copy_from_slice(&(iph as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&(TCP_CSUM_OFFSET as u16).to_ne_bytes());
}

/// The virtio-net header of a lone packet whose TCP checksum is partial: `NEEDS_CSUM` from the
/// TCP header at `start`, no GSO (what a merged packet gets from [`write_gso_headers`] instead).
fn write_partial_header(hdr: &mut [u8], start: usize) {
    hdr.fill(0);
    hdr[0] = VNET_F_NEEDS_CSUM;
    // `start` is an IP header's length (at most 60), so it fits in 16 bits.
    hdr[6..8].copy_from_slice(&(start as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&(TCP_CSUM_OFFSET as u16).to_ne_bytes());
}

/// The flow of any whole TCP packet.
fn tcp_flow(p: &[u8]) -> Option<FlowKey> {
    let (ip, iph_len) = Ip::tcp_packet(p)?;
    Some(flow_key(ip, p, iph_len))
}

fn flow_key(ip: Ip, p: &[u8], iph_len: usize) -> FlowKey {
    let mut addrs = [0u64; 4];
    for (word, bytes) in addrs.iter_mut().zip(p[ip.addrs()].chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        *word = u64::from_ne_bytes(b);
    }
    let mut ports = [0u8; 4];
    ports.copy_from_slice(&p[iph_len..iph_len + 4]);
    FlowKey { addrs, ports: u32::from_ne_bytes(ports), ip }
}

/// The segment's fields if `p` is a TCP packet (either family) that may be merged: payload, and
/// only ACK or ACK|PSH set.
fn parse_segment(p: &[u8]) -> Option<Segment> {
    let (ip, iph_len) = Ip::tcp_packet(p)?;
    let t = &p[iph_len..];
    let tcph_len = usize::from(t[12] >> 4) * 4;
    if !(20..=60).contains(&tcph_len) || t.len() <= tcph_len {
        return None;
    }
    let flags = t[13];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (id, id_step) = ip.id(p);
    Some(Segment {
        flow: flow_key(ip, p, iph_len),
        ip,
        iph_len,
        tcph_len,
        seq: be32(&t[4..8]),
        ack: be32(&t[8..12]),
        id,
        id_step,
        window: u16::from_be_bytes([t[14], t[15]]),
        psh: flags & TCP_PSH != 0,
        payload_len: t.len() - tcph_len,
    })
}

/// Whether the IP header checksum (IPv4 only) and the TCP checksum of `p` verify.
fn checksums_valid(ip: Ip, p: &[u8], iph_len: usize) -> bool {
    let headers = p.len().min(iph_len + 20);
    checksums_valid_with(ip, &p[..headers], iph_len, p.len() - headers, sum(&p[headers..]))
}

/// [`checksums_valid`] for a packet given as its `headers` (IP, then TCP, of an even length)
/// and the [`sum`] of the `rest_len` bytes that follow them.
fn checksums_valid_with(ip: Ip, headers: &[u8], iph_len: usize, rest_len: usize, rest_sum: u64) -> bool {
    if !ip.header_checksum_valid(headers, iph_len) {
        return false;
    }
    let Ok(tcp_len) = u16::try_from(headers.len() - iph_len + rest_len) else {
        return false;
    };
    fold(pseudo_header(&headers[ip.addrs()], IPPROTO_TCP, tcp_len) + sum(&headers[iph_len..]) + rest_sum) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference checksum: big-endian words one at a time.
    fn slow_sum(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for w in data.chunks(2) {
            let v = if w.len() == 2 { u16::from_be_bytes([w[0], w[1]]) } else { u16::from(w[0]) << 8 };
            acc += u32::from(v);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn fast_sum_matches_reference() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for len in 0..200 {
            assert_eq!(fold(sum(&data[..len])), slow_sum(&data[..len]), "len {len}");
        }
        assert_eq!(fold(sum(&data)), slow_sum(&data));
        let ones = vec![0xffu8; 65535];
        assert_eq!(fold(sum(&ones)), slow_sum(&ones));
    }
}
