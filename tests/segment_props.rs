//! Properties of the TSO/USO split (`holdfast::sansio::segment`): for any TCP or UDP packet over
//! IPv4 or IPv6 that the kernel could hand over with a GSO header, the segments are byte for
//! byte those of tun-rs's `gso_split` (the split the engines used before); a lone packet whose
//! checksum was left undone comes out with a valid one; hostile headers and bytes are errors,
//! never panics.

use holdfast::sansio::segment::{
    Checksums, Offload, Slots, SplitError, VNET_HDR_LEN, finish_partial, largest_segment, split, split_with, tcp_start,
};
use proptest::prelude::*;

const OFFSET: usize = 20;
// Room for the largest segment: 40 + 60 bytes of headers and 1440 of payload.
const STRIDE: usize = OFFSET + 1540 + 16;
const SLOTS: usize = 128;

#[path = "support/csum.rs"]
mod reference;
use reference::csum;

/// The pseudo-header's sum of `p` (IP header length `iph`) for a transport part of `l4_len`.
fn pseudo(p: &[u8], proto: u8, l4_len: usize) -> u32 {
    let addrs = if p[0] >> 4 == 6 { &p[8..40] } else { &p[12..20] };
    u32::from(csum(addrs, 0)) + u32::from(proto) + l4_len as u32
}

/// A packet as the kernel hands one over with TSO/USO: headers of the first segment, all the
/// payload, the transport checksum field holding the pseudo-header's sum.
#[derive(Debug, Clone)]
struct Super {
    v6: bool,
    udp: bool,
    tcp_options: usize,
    flags: u8,
    seq: u32,
    id: u16,
    addrs: [u8; 32],
    payload: Vec<u8>,
    gso_size: u16,
    ecn: bool,
}

impl Super {
    fn iph(&self) -> usize {
        if self.v6 { 40 } else { 20 }
    }

    fn l4h(&self) -> usize {
        if self.udp { 8 } else { 20 + self.tcp_options }
    }

    fn bytes(&self) -> Vec<u8> {
        let (iph, l4h) = (self.iph(), self.l4h());
        let total = iph + l4h + self.payload.len();
        let proto = if self.udp { 17 } else { 6 };
        let mut p = vec![0u8; total];
        if self.v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = proto;
            p[7] = 64;
            p[8..40].copy_from_slice(&self.addrs);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&self.id.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = proto;
            p[12..20].copy_from_slice(&self.addrs[..8]);
            let c = !csum(&p[..20], 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = &mut p[iph..];
        t[0..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        if self.udp {
            t[4..6].copy_from_slice(&((l4h + self.payload.len()) as u16).to_be_bytes());
        } else {
            t[4..8].copy_from_slice(&self.seq.to_be_bytes());
            t[8..12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
            t[12] = ((l4h / 4) as u8) << 4;
            t[13] = self.flags;
            t[14..16].copy_from_slice(&0xfaf0u16.to_be_bytes());
            for (i, b) in t[20..l4h].iter_mut().enumerate() {
                *b = i as u8 | 1;
            }
        }
        t[l4h..].copy_from_slice(&self.payload);
        let at = iph + if self.udp { 6 } else { 16 };
        let ps = csum(&[], pseudo(&p, proto, l4h + self.payload.len()));
        p[at..at + 2].copy_from_slice(&ps.to_be_bytes());
        p
    }

    fn offload(&self) -> Offload {
        let gso_type = match (self.udp, self.v6) {
            (true, _) => 5,
            (false, false) => 1,
            (false, true) => 4,
        } | if self.ecn && !self.udp { 0x80 } else { 0 };
        Offload {
            needs_csum: true,
            gso_type,
            gso_size: self.gso_size,
            csum_start: self.iph() as u16,
            csum_offset: if self.udp { 6 } else { 16 },
        }
    }
}

fn supers() -> impl Strategy<Value = Super> {
    (
        any::<bool>(),
        prop_oneof![3 => Just(false), 1 => Just(true)],
        0usize..=10,
        any::<u8>(),
        any::<u32>(),
        any::<u16>(),
        any::<[u8; 32]>(),
        // Enough segments of at least 512 bytes fit the 128 slots.
        (0usize..=65_000, any::<u64>()),
        512u16..=1440,
        any::<bool>(),
    )
        .prop_map(|(v6, udp, opt_words, flags, seq, id, addrs, (len, seed), gso_size, ecn)| {
            let payload = (0..len as u64)
                .map(|i| (seed.wrapping_add(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
                .collect();
            let mut s = Super { v6, udp, tcp_options: opt_words * 4, flags, seq, id, addrs, payload, gso_size, ecn };
            // The IPv4 total length is 16 bits.
            let max = 65_535 - s.iph() - s.l4h();
            s.payload.truncate(max);
            s
        })
}

fn slots() -> (Vec<u8>, [usize; SLOTS]) {
    (vec![0u8; STRIDE * SLOTS], [0usize; SLOTS])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn segments_are_tun_rs_segments_byte_for_byte(s in supers()) {
        let packet = s.bytes();
        let off = s.offload();
        let (mut ours, mut our_sizes) = slots();
        let n = split(off, &packet, &mut Slots { slots: &mut ours, stride: STRIDE, offset: OFFSET, sizes: &mut our_sizes }).unwrap();
        // What a reader lays the segments apart by (see `TunReader`): exactly the largest.
        prop_assert_eq!(largest_segment(off, &packet), our_sizes[..n].iter().max().copied().or(Some(s.iph() + s.l4h())));

        let hdr = tun_rs::VirtioNetHdr {
            flags: 1,
            gso_type: off.gso_type,
            hdr_len: (s.iph() + s.l4h()) as u16,
            gso_size: off.gso_size,
            csum_start: off.csum_start,
            csum_offset: off.csum_offset,
        };
        let mut input = packet.clone();
        let (mut theirs, mut their_sizes) = slots();
        let m = {
            let mut bufs: Vec<&mut [u8]> = theirs.chunks_mut(STRIDE).collect();
            tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut their_sizes, OFFSET, s.v6).unwrap()
        };
        prop_assert_eq!(n, m);
        prop_assert_eq!(n, s.payload.len().div_ceil(usize::from(s.gso_size)));
        for i in 0..n {
            prop_assert_eq!(our_sizes[i], their_sizes[i], "segment {}", i);
            let at = i * STRIDE + OFFSET;
            prop_assert_eq!(&ours[at..at + our_sizes[i]], &theirs[at..at + their_sizes[i]], "segment {}", i);
            // And valid on their own: the transport checksum verifies.
            let seg = &ours[at..at + our_sizes[i]];
            let l4 = &seg[s.iph()..];
            prop_assert_eq!(csum(l4, pseudo(seg, if s.udp { 17 } else { 6 }, l4.len())), 0xffff);
        }
        // Nothing written outside the packets.
        for (i, slot) in ours.chunks(STRIDE).enumerate() {
            let end = if i < n { OFFSET + our_sizes[i] } else { 0 };
            prop_assert!(slot[..OFFSET].iter().chain(&slot[end..]).all(|&b| b == 0), "slot {}", i);
        }
    }

    /// Asked for partial checksums, a TCP packet's segments are the complete ones but for the
    /// checksum field, which holds the pseudo-header's sum (what the peer's kernel finishes);
    /// finished here they are the complete ones byte for byte. A UDP packet's stay complete.
    #[test]
    fn partial_segments_finished_are_the_complete_ones(s in supers()) {
        let packet = s.bytes();
        let off = s.offload();
        let (mut full, mut full_sizes) = slots();
        let n = split(off, &packet, &mut Slots { slots: &mut full, stride: STRIDE, offset: OFFSET, sizes: &mut full_sizes }).unwrap();
        let (mut part, mut part_sizes) = slots();
        let cut = split_with(off, &packet, &mut Slots { slots: &mut part, stride: STRIDE, offset: OFFSET, sizes: &mut part_sizes }, Checksums::Partial).unwrap();
        prop_assert_eq!(cut.packets, n);
        prop_assert_eq!(cut.csum_partial, !s.udp && n > 0);
        prop_assert_eq!(&part_sizes[..n], &full_sizes[..n]);
        for i in 0..n {
            let at = i * STRIDE + OFFSET;
            let seg = &mut part[at..at + part_sizes[i]];
            let want = &full[at..at + full_sizes[i]];
            if cut.csum_partial {
                prop_assert_eq!(tcp_start(seg), Some(s.iph()));
                let field = s.iph() + 16;
                prop_assert_eq!(&seg[..field], &want[..field], "segment {}", i);
                prop_assert_eq!(&seg[field + 2..], &want[field + 2..], "segment {}", i);
                let l4_len = seg.len() - s.iph();
                let mut p = pseudo(seg, 6, l4_len);
                while p > 0xffff {
                    p = (p & 0xffff) + (p >> 16);
                }
                let field_value = u16::from_be_bytes([seg[field], seg[field + 1]]);
                prop_assert_eq!(u32::from(field_value), p, "segment {}: the pseudo-header's sum", i);
                prop_assert_eq!(finish_partial(seg), Some(()));
            }
            prop_assert_eq!(&*seg, want, "segment {}", i);
        }
    }

    /// A packet without GSO whose checksum the kernel left undone (the field holding the
    /// pseudo-header's sum) is copied with the checksum finished; one with its checksum done
    /// is copied as it is.
    #[test]
    fn a_lone_packet_gets_its_checksum_finished(mut s in supers(), done in any::<bool>()) {
        s.payload.truncate(1400);
        let packet = s.bytes();
        let mut off = s.offload();
        off.gso_type = 0;
        off.needs_csum = !done;
        let (mut out, mut sizes) = slots();
        let n = split(off, &packet, &mut Slots { slots: &mut out, stride: STRIDE, offset: OFFSET, sizes: &mut sizes }).unwrap();
        prop_assert_eq!((n, sizes[0]), (1, packet.len()));
        let seg = &out[OFFSET..OFFSET + packet.len()];
        let at = s.iph() + if s.udp { 6 } else { 16 };
        prop_assert_eq!(&seg[..at], &packet[..at]);
        prop_assert_eq!(&seg[at + 2..], &packet[at + 2..]);
        if done {
            prop_assert_eq!(seg, &packet[..]);
        } else {
            let l4 = &seg[s.iph()..];
            prop_assert_eq!(csum(l4, pseudo(seg, if s.udp { 17 } else { 6 }, l4.len())), 0xffff);
            prop_assert_ne!(&seg[at..at + 2], &[0, 0], "0 is written as 0xffff");
        }
    }

    /// Any header over any bytes: an error or packets that fit their slots, never a panic.
    #[test]
    fn hostile_headers_and_bytes_never_panic(
        mut head in any::<[u8; VNET_HDR_LEN]>(),
        gso_type in prop_oneof![Just(0u8), Just(1), Just(4), Just(5), Just(0x81), any::<u8>()],
        // Offsets near the headers' real ones, and anywhere.
        csum_start in prop_oneof![0u16..200, any::<u16>()],
        csum_offset in prop_oneof![Just(6u16), Just(16), any::<u16>()],
        body in proptest::collection::vec(any::<u8>(), 0..3000),
        version in prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()],
        stride in 1usize..2000,
    ) {
        head[1] = gso_type;
        head[6..8].copy_from_slice(&csum_start.to_ne_bytes());
        head[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
        let mut read = head.to_vec();
        read.extend_from_slice(&body);
        if read.len() > VNET_HDR_LEN {
            read[VNET_HDR_LEN] = version;
        }
        let off = Offload::parse(&read).unwrap();
        let mut slots = vec![0u8; stride * 8];
        let mut sizes = [0usize; 8];
        let offset = stride / 3;
        // What a reader lays the segments apart by: the largest the split then makes.
        let largest = largest_segment(off, &read[VNET_HDR_LEN..]);
        match split(off, &read[VNET_HDR_LEN..], &mut Slots { slots: &mut slots, stride, offset, sizes: &mut sizes }) {
            Ok(n) => {
                prop_assert!(n <= 8);
                prop_assert!(sizes[..n].iter().all(|&l| offset + l <= stride));
                if n > 0 && off.gso_type != 0 {
                    prop_assert_eq!(largest, sizes[..n].iter().max().copied());
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        // Asked for partial checksums: the same packets, or the same error; each one marked
        // partial finishes (the layout a receiver finds the checksum in).
        let full = sizes;
        let cut = split_with(off, &read[VNET_HDR_LEN..], &mut Slots { slots: &mut slots, stride, offset, sizes: &mut sizes }, Checksums::Partial);
        let again = split(off, &read[VNET_HDR_LEN..], &mut Slots { slots: &mut vec![0u8; stride * 8], stride, offset, sizes: &mut [0usize; 8] });
        prop_assert_eq!(cut.map(|c| c.packets), again);
        if let Ok(cut) = cut {
            prop_assert_eq!(&sizes[..cut.packets], &full[..cut.packets]);
            for i in 0..cut.packets {
                let seg = &mut slots[i * stride + offset..][..sizes[i]];
                prop_assert!(!cut.csum_partial || finish_partial(seg).is_some(), "segment {}", i);
            }
        }
        prop_assert_eq!(Offload::parse(&read[..read.len().min(VNET_HDR_LEN - 1)]).err(), Some(SplitError::Short(read.len().min(VNET_HDR_LEN - 1))));
    }
}
