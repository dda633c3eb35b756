//! Properties of the TUN-write coalescer (`holdfast::sansio::coalesce`): what it writes, once
//! the kernel re-segments it the way TSO does, is exactly what went in (per flow, in order);
//! anything it cannot merge passes through byte for byte; hostile bytes never panic it. Traffic
//! mixes TCP over IPv4 and over IPv6 flows. Segments whose checksum the sender left partial
//! (the pseudo-header's sum only) come out the same once the kernel has finished them.

use holdfast::sansio::coalesce::{Coalescer, MAX_PACKET, PushError, VNET_HDR_LEN};
use proptest::prelude::*;

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;

#[path = "support/csum.rs"]
mod reference;
use reference::csum;

fn is_v6(p: &[u8]) -> bool {
    p[0] >> 4 == 6
}

fn pseudo(p: &[u8], tcp_len: usize) -> u32 {
    let addrs = if is_v6(p) { &p[8..40] } else { &p[12..20] };
    u32::from(csum(addrs, 0)) + 6 + tcp_len as u32
}

/// Writes correct IPv4 header (IPv6 has none) and TCP checksums into `p` (IP header length
/// `iph`).
fn fix_checksums(p: &mut [u8], iph: usize) {
    if !is_v6(p) {
        p[10..12].fill(0);
        let ip = !csum(&p[..iph], 0);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
    }
    p[iph + 16..iph + 18].fill(0);
    let tcp = !csum(&p[iph..], pseudo(p, p.len() - iph));
    p[iph + 16..iph + 18].copy_from_slice(&tcp.to_be_bytes());
}

#[derive(Debug, Clone)]
struct Flow {
    /// IPv4 flows use the first 4 bytes.
    src: [u8; 16],
    dst: [u8; 16],
    v6: bool,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    id: u16,
    window: u16,
    /// TCP options (a multiple of 4 bytes), e.g. a timestamp.
    options: Vec<u8>,
    ttl: u8,
}

impl Flow {
    fn packet(&mut self, payload_len: usize, flags: u8) -> Vec<u8> {
        let tcph = 20 + self.options.len();
        let iph = if self.v6 { 40 } else { 20 };
        let total = iph + tcph + payload_len;
        let mut p = vec![0u8; total];
        if self.v6 {
            // Version 6, traffic class 0x0a, flow label 0xbcdef.
            p[..4].copy_from_slice(&[0x60, 0xab, 0xcd, 0xef]);
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = self.ttl;
            p[8..24].copy_from_slice(&self.src);
            p[24..40].copy_from_slice(&self.dst);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&self.id.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = self.ttl;
            p[9] = 6;
            p[12..16].copy_from_slice(&self.src[..4]);
            p[16..20].copy_from_slice(&self.dst[..4]);
        }
        let t = &mut p[iph..];
        t[0..2].copy_from_slice(&self.sport.to_be_bytes());
        t[2..4].copy_from_slice(&self.dport.to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = ((tcph / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&self.window.to_be_bytes());
        t[20..tcph].copy_from_slice(&self.options);
        for (i, b) in t[tcph..].iter_mut().enumerate() {
            *b = (self.seq as usize).wrapping_add(i).wrapping_mul(31) as u8;
        }
        fix_checksums(&mut p, iph);
        self.seq = self.seq.wrapping_add(payload_len as u32);
        self.id = self.id.wrapping_add(1);
        p
    }
}

/// What a packet's flow is, for comparing per-flow order: the TCP 4-tuple (of either family), or
/// "other".
fn flow_of(p: &[u8]) -> Option<Vec<u8>> {
    if p.len() >= 60 && p[0] >> 4 == 6 && p[6] == 6 {
        return Some([&p[8..40], &p[40..44]].concat());
    }
    if p.len() < 40 || p[0] != 0x45 || p[9] != 6 {
        return None;
    }
    Some([&p[12..20], &p[20..24]].concat())
}

/// The kernel's side: a written packet (virtio-net header first) as the packets TSO would make
/// of it. Also checks the header is one the kernel accepts.
fn resegment(written: &[u8]) -> Vec<Vec<u8>> {
    let (hdr, p) = written.split_at(VNET_HDR_LEN);
    if hdr.iter().all(|&b| b == 0) {
        return vec![p.to_vec()];
    }
    let u16n = |b: &[u8]| u16::from_ne_bytes([b[0], b[1]]) as usize;
    let v6 = is_v6(p);
    assert_eq!(hdr[0], 1, "NEEDS_CSUM");
    if hdr[1] == 0 {
        // A lone packet whose TCP checksum the kernel finishes: from the TCP header on.
        let iph = if v6 { 40 } else { usize::from(p[0] & 0xf) * 4 };
        assert_eq!((u16n(&hdr[2..]), u16n(&hdr[4..]), u16n(&hdr[6..]), u16n(&hdr[8..])), (0, 0, iph, 16));
        let partial = u16::from_be_bytes([p[iph + 16], p[iph + 17]]);
        assert_eq!(u32::from(partial), u32::from(csum(&[], pseudo(p, p.len() - iph))), "pseudo sum");
        let mut s = p.to_vec();
        fix_checksums(&mut s, iph);
        return vec![s];
    }
    assert_eq!(hdr[1], if v6 { 4 } else { 1 }, "GSO_TCPV6 or GSO_TCPV4");
    let (hdr_len, gso, csum_start, csum_off) = (u16n(&hdr[2..]), u16n(&hdr[4..]), u16n(&hdr[6..]), u16n(&hdr[8..]));
    let iph = if v6 { 40 } else { usize::from(p[0] & 0xf) * 4 };
    let tcph = usize::from(p[iph + 12] >> 4) * 4;
    assert_eq!((hdr_len, csum_start, csum_off), (iph + tcph, iph, 16));
    if v6 {
        assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, p.len() - 40, "IPv6 payload length");
    } else {
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len(), "IPv4 total length");
        assert_eq!(csum(&p[..iph], 0), 0xffff, "IPv4 header checksum");
    }
    let partial = u16::from_be_bytes([p[iph + 16], p[iph + 17]]);
    assert_eq!(u32::from(partial), u32::from(csum(&[], pseudo(p, p.len() - iph))), "pseudo sum");
    let payload = &p[hdr_len..];
    assert!(payload.len() > gso, "a merged packet has more than one segment");
    let id0 = u16::from_be_bytes([p[4], p[5]]);
    let seq0 = u32::from_be_bytes([p[iph + 4], p[iph + 5], p[iph + 6], p[iph + 7]]);
    let chunks: Vec<&[u8]> = payload.chunks(gso).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut s = p[..hdr_len].to_vec();
            s.extend_from_slice(chunk);
            if v6 {
                let payload = (s.len() - 40) as u16;
                s[4..6].copy_from_slice(&payload.to_be_bytes());
            } else {
                let total = s.len() as u16;
                s[2..4].copy_from_slice(&total.to_be_bytes());
                s[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            }
            let seq = seq0.wrapping_add((i * gso) as u32);
            s[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
            if i != last {
                s[iph + 13] &= !(PSH | FIN);
            }
            fix_checksums(&mut s, iph);
            s
        })
        .collect()
}

/// Runs `input` through a coalescer of `capacity` items, flushing when full, as the loops do.
fn run(input: &[Vec<u8>], capacity: usize, merge: bool) -> Vec<Vec<u8>> {
    let mut co = Coalescer::new(capacity, merge);
    let mut out = Vec::new();
    for p in input {
        match co.push(p) {
            Ok(()) => {}
            Err(PushError::Full) => {
                out.extend(co.finish().map(<[u8]>::to_vec));
                co.clear();
                co.push(p).expect("room after a flush");
            }
            Err(e) => panic!("{e}"),
        }
    }
    out.extend(co.finish().map(<[u8]>::to_vec));
    out
}

/// [`run`] with each packet pushed as partial (`true`) or complete.
fn run_with(input: &[(Vec<u8>, bool)], capacity: usize, merge: bool) -> Vec<Vec<u8>> {
    let mut co = Coalescer::new(capacity, merge);
    let mut out = Vec::new();
    for (p, partial) in input {
        match co.push_with(p, *partial) {
            Ok(()) => {}
            Err(PushError::Full) => {
                out.extend(co.finish().map(<[u8]>::to_vec));
                co.clear();
                co.push_with(p, *partial).expect("room after a flush");
            }
            Err(e) => panic!("{e}"),
        }
    }
    out.extend(co.finish().map(<[u8]>::to_vec));
    out
}

/// What a sender leaving `p`'s TCP checksum partial sends instead of it: the field holding the
/// pseudo-header's sum, flagged. Anything but a TCP segment goes as it is, unflagged.
fn as_partial(p: &[u8]) -> (Vec<u8>, bool) {
    let Some(iph) = holdfast::sansio::segment::tcp_start(p) else { return (p.to_vec(), false) };
    let mut s = p.to_vec();
    let sum = csum(&[], pseudo(p, p.len() - iph));
    s[iph + 16..iph + 18].copy_from_slice(&sum.to_be_bytes());
    (s, true)
}

fn per_flow(packets: &[Vec<u8>]) -> std::collections::BTreeMap<Option<Vec<u8>>, Vec<Vec<u8>>> {
    let mut m = std::collections::BTreeMap::<_, Vec<_>>::new();
    for p in packets {
        m.entry(flow_of(p)).or_default().push(p.clone());
    }
    m
}

/// Flows 0 to 2 are TCP over IPv4, 3 and 4 over IPv6.
const FLOWS: usize = 5;

fn flow(n: u8) -> Flow {
    let v6 = n >= 3;
    let addr = |host: u8| {
        let mut a = [0u8; 16];
        if v6 {
            a[..4].copy_from_slice(&[0xfd, 0, 0, 0x64]);
            a[15] = host;
        } else {
            a[..4].copy_from_slice(&[100, 64, 0, host]);
        }
        a
    };
    Flow {
        src: addr(2 + n),
        dst: addr(1),
        v6,
        sport: 40000 + u16::from(n),
        dport: 5201,
        seq: 0xffff_f000u32.wrapping_add(u32::from(n) * 77), // wraps during a run
        ack: 1000,
        id: 0xfff0,
        window: 500,
        options: if n.is_multiple_of(2) { vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2] } else { vec![] },
        ttl: 64,
    }
}

/// One step of traffic.
#[derive(Debug, Clone)]
enum Step {
    /// A data segment on flow `f`: full-sized, or shorter, maybe with PSH.
    Data {
        f: usize,
        short: Option<usize>,
        psh: bool,
    },
    /// A segment whose TCP checksum is wrong.
    BadChecksum {
        f: usize,
    },
    /// Sequence gap (a lost segment), new ack number, new window, new TTL (hop limit),
    /// non-consecutive id (IPv4 only: IPv6 has none, the step changes nothing there).
    Gap(usize),
    NewAck(usize),
    NewWindow(usize),
    NewTtl(usize),
    IdJump(usize),
    /// A pure ACK or a FIN: TCP that never merges.
    PureAck(usize),
    Fin(usize),
    /// Anything else: a UDP packet, an IPv6 header, garbage.
    Other(Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let f = 0usize..FLOWS;
    prop_oneof![
        12 => (f.clone(), proptest::option::weighted(0.15, 1usize..1400), proptest::bool::weighted(0.1))
            .prop_map(|(f, short, psh)| Step::Data { f, short, psh }),
        1 => f.clone().prop_map(|f| Step::BadChecksum { f }),
        1 => f.clone().prop_map(Step::Gap),
        1 => f.clone().prop_map(Step::NewAck),
        1 => f.clone().prop_map(Step::NewWindow),
        1 => f.clone().prop_map(Step::NewTtl),
        1 => f.clone().prop_map(Step::IdJump),
        1 => f.clone().prop_map(Step::PureAck),
        1 => f.prop_map(Step::Fin),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Step::Other),
    ]
}

const MSS: usize = 1400;

fn traffic(steps: &[Step]) -> Vec<Vec<u8>> {
    let mut flows: Vec<Flow> = (0..FLOWS as u8).map(flow).collect();
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Data { f, short, psh } => {
                let flags = if *psh { ACK | PSH } else { ACK };
                out.push(flows[*f].packet(short.unwrap_or(MSS), flags));
            }
            Step::BadChecksum { f } => {
                let mut p = flows[*f].packet(MSS, ACK);
                let at = p.len() - 1;
                p[at] ^= 0x5a;
                out.push(p);
            }
            Step::Gap(f) => flows[*f].seq = flows[*f].seq.wrapping_add(MSS as u32),
            Step::NewAck(f) => flows[*f].ack = flows[*f].ack.wrapping_add(2896),
            Step::NewWindow(f) => flows[*f].window ^= 0x100,
            Step::NewTtl(f) => flows[*f].ttl ^= 1,
            Step::IdJump(f) => flows[*f].id = flows[*f].id.wrapping_add(3),
            Step::PureAck(f) => out.push(flows[*f].packet(0, ACK)),
            Step::Fin(f) => out.push(flows[*f].packet(0, ACK | FIN)),
            Step::Other(bytes) => out.push(bytes.clone()),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn resegmented_output_equals_input_per_flow(
        steps in proptest::collection::vec(step(), 0..160),
        capacity in 1usize..70,
    ) {
        let input = traffic(&steps);
        let out = run(&input, capacity, true);
        let back: Vec<Vec<u8>> = out.iter().flat_map(|w| resegment(w)).collect();
        prop_assert_eq!(back.len(), input.len());
        prop_assert_eq!(per_flow(&back), per_flow(&input));
        // Packets of no TCP flow keep their order among everything: compare positions.
        let others = |v: &[Vec<u8>]| v.iter().filter(|p| flow_of(p).is_none()).cloned().collect::<Vec<_>>();
        prop_assert_eq!(others(&back), others(&input));
    }

    /// The same traffic with every TCP segment's checksum left partial, but for those whose
    /// checksum is wrong (sent complete, so the coalescer checks them): once the kernel has
    /// finished the checksums it was left, each flow gets exactly the complete segments.
    #[test]
    fn partial_segments_come_out_as_the_complete_ones(
        steps in proptest::collection::vec(step(), 0..160),
        capacity in 1usize..70,
        merge in proptest::bool::weighted(0.8),
    ) {
        let input = traffic(&steps);
        let valid = |p: &[u8]| {
            let Some(iph) = holdfast::sansio::segment::tcp_start(p) else { return false };
            csum(&p[iph..], pseudo(p, p.len() - iph)) == 0xffff
        };
        let sent: Vec<(Vec<u8>, bool)> = input.iter().map(|p| if valid(p) { as_partial(p) } else { (p.clone(), false) }).collect();
        let out = run_with(&sent, capacity, merge);
        let back: Vec<Vec<u8>> = out.iter().flat_map(|w| resegment(w)).collect();
        prop_assert_eq!(back.len(), input.len());
        prop_assert_eq!(per_flow(&back), per_flow(&input));
    }

    #[test]
    fn without_merging_everything_passes_through_in_order(
        steps in proptest::collection::vec(step(), 0..100),
    ) {
        let input = traffic(&steps);
        let out = run(&input, 64, false);
        prop_assert_eq!(out.len(), input.len());
        for (w, p) in out.iter().zip(&input) {
            prop_assert!(w[..VNET_HDR_LEN].iter().all(|&b| b == 0));
            prop_assert_eq!(&w[VNET_HDR_LEN..], &p[..]);
        }
    }

    #[test]
    fn hostile_bytes_pass_through_unchanged(
        packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..40),
        tcp_like in 0u8..3,
    ) {
        // Garbage, and garbage dressed as TCP/IPv4 or TCP/IPv6 (version, protocol and length
        // right): never a panic, and unless it really is a valid segment, back out byte for byte.
        let input: Vec<Vec<u8>> = packets.into_iter().map(|mut p| {
            if tcp_like == 1 && p.len() >= 40 {
                p[0] = 0x45;
                p[9] = 6;
                let n = p.len() as u16;
                p[2..4].copy_from_slice(&n.to_be_bytes());
                p[6] &= 0x40;
                p[7] = 0;
            }
            if tcp_like == 2 && p.len() >= 60 {
                p[0] = 0x60 | (p[0] & 0x0f);
                p[6] = 6;
                let n = (p.len() - 40) as u16;
                p[4..6].copy_from_slice(&n.to_be_bytes());
            }
            p
        }).collect();
        let out = run(&input, 64, true);
        let back: Vec<Vec<u8>> = out.iter().flat_map(|w| resegment(w)).collect();
        prop_assert_eq!(per_flow(&back), per_flow(&input));
    }
}

#[test]
fn a_burst_of_one_flow_becomes_one_packet() {
    let mut f = flow(0);
    let input: Vec<Vec<u8>> =
        (0..45).map(|i| f.packet(if i == 44 { 300 } else { MSS }, if i == 44 { ACK | PSH } else { ACK })).collect();
    let out = run(&input, 64, true);
    assert_eq!(out.len(), 1);
    let w = &out[0];
    assert_eq!(u16::from_ne_bytes([w[4], w[5]]) as usize, MSS, "gso_size");
    assert_eq!(w.len(), VNET_HDR_LEN + 20 + 32 + 44 * MSS + 300);
    assert_eq!(resegment(w), input);
    // PSH rides on the merged packet (it belongs to its last segment).
    assert_eq!(w[VNET_HDR_LEN + 20 + 13], ACK | PSH);
}

#[test]
fn merged_packets_stay_within_an_ipv4_packet() {
    let mut f = flow(1);
    let input: Vec<Vec<u8>> = (0..120).map(|_| f.packet(MSS, ACK)).collect();
    let out = run(&input, 64, true);
    assert!(out.len() >= 3, "{} packets", out.len());
    assert!(out.iter().all(|w| w.len() - VNET_HDR_LEN <= MAX_PACKET));
    let back: Vec<Vec<u8>> = out.iter().flat_map(|w| resegment(w)).collect();
    assert_eq!(back, input);
}

#[test]
fn a_bad_checksum_is_never_merged() {
    let mut f = flow(1);
    let mut input: Vec<Vec<u8>> = (0..6).map(|_| f.packet(MSS, ACK)).collect();
    input[3][100] ^= 1;
    // The head's own checksum is checked too.
    let mut g = flow(2);
    let mut second: Vec<Vec<u8>> = (0..3).map(|_| g.packet(MSS, ACK)).collect();
    second[0][60] ^= 1;
    input.extend(second);
    let out = run(&input, 64, true);
    let bad: Vec<&Vec<u8>> = [&input[3], &input[6]].into();
    for b in bad {
        let alone = out.iter().any(|w| w[..VNET_HDR_LEN] == [0; VNET_HDR_LEN] && w[VNET_HDR_LEN..] == b[..]);
        assert!(alone, "a corrupted segment went out on its own, unchanged");
    }
    // 0..3 merged, 3 alone, 4..6 merged; flow 2: 0 alone, 1..3 merged.
    assert_eq!(out.len(), 5);
}

#[test]
fn an_ipv6_burst_becomes_one_tcpv6_packet() {
    // Flow 4: IPv6 with a 12-byte timestamp option (a 32-byte TCP header).
    let mut f = flow(4);
    assert!(f.v6);
    let input: Vec<Vec<u8>> =
        (0..40).map(|i| f.packet(if i == 39 { 77 } else { MSS }, if i == 39 { ACK | PSH } else { ACK })).collect();
    let out = run(&input, 64, true);
    assert_eq!(out.len(), 1);
    let w = &out[0];
    assert_eq!(w[1], 4, "GSO_TCPV6");
    assert_eq!(u16::from_ne_bytes([w[4], w[5]]) as usize, MSS, "gso_size");
    assert_eq!(w.len(), VNET_HDR_LEN + 40 + 32 + 39 * MSS + 77);
    assert_eq!(resegment(w), input);
}

#[test]
fn hostile_ipv6_is_never_merged() {
    // A valid IPv6 run, each packet then spoiled one way: truncated below its payload length, a
    // next-header chain that does not lead straight to TCP (hop-by-hop, routing, fragment), a
    // jumbogram's zero payload length, a payload length beyond the packet. None may merge,
    // each passes through byte for byte.
    let spoil: [fn(&mut Vec<u8>); 7] = [
        |p| p.truncate(p.len() - 1),
        |p| p[6] = 0,
        |p| p[6] = 43,
        |p| p[6] = 44,
        |p| p[4..6].copy_from_slice(&[0, 0]),
        |p| p[4..6].copy_from_slice(&[0xff, 0xff]),
        |p| p.truncate(39),
    ];
    for (k, s) in spoil.iter().enumerate() {
        let mut f = flow(4);
        let mut input: Vec<Vec<u8>> = (0..6).map(|_| f.packet(MSS, ACK)).collect();
        for p in &mut input {
            s(p);
        }
        let out = run(&input, 64, true);
        assert_eq!(out.len(), input.len(), "case {k}: nothing merged");
        for (w, p) in out.iter().zip(&input) {
            assert_eq!(&w[..VNET_HDR_LEN], &[0; VNET_HDR_LEN], "case {k}");
            assert_eq!(&w[VNET_HDR_LEN..], &p[..], "case {k}");
        }
    }
    // An IPv4 and an IPv6 flow with the same ports never mix.
    let (mut a, mut b) = (flow(0), flow(3));
    b.sport = a.sport;
    b.seq = a.seq;
    let input = vec![a.packet(MSS, ACK), b.packet(MSS, ACK), a.packet(MSS, ACK), b.packet(MSS, ACK)];
    let out = run(&input, 64, true);
    assert_eq!(out.len(), 2);
    let back: Vec<Vec<u8>> = out.iter().flat_map(|w| resegment(w)).collect();
    assert_eq!(per_flow(&back), per_flow(&input));
}

#[test]
fn a_partial_checksum_is_refused_outside_a_tcp_segment_and_finished_without_a_header() {
    let mut co = Coalescer::new(4, true);
    // UDP, and TCP behind an IPv6 extension header: no place the kernel could finish it.
    let mut udp = flow(0).packet(100, ACK);
    udp[9] = 17;
    let mut ext = flow(3).packet(100, ACK);
    ext[6] = 0;
    for p in [&udp, &ext] {
        assert_eq!(co.push_with(p, true), Err(PushError::NotPartialTcp));
    }
    assert!(co.is_empty(), "nothing queued");
    // A device without offload: the writer strips the header, so the coalescer finishes it.
    let mut f = flow(1);
    let input: Vec<Vec<u8>> = (0..3).map(|_| f.packet(MSS, ACK)).collect();
    let mut co = Coalescer::new(4, true).headerless();
    for p in &input {
        co.push_with(&as_partial(p).0, true).expect("room");
    }
    let out: Vec<Vec<u8>> = co.finish().map(|w| w[VNET_HDR_LEN..].to_vec()).collect();
    assert_eq!(out, input, "each finished, none merged");
}

#[test]
fn partial_segments_merge_into_the_packet_complete_ones_make() {
    let mut f = flow(4);
    let input: Vec<Vec<u8>> = (0..20).map(|_| f.packet(MSS, ACK)).collect();
    let complete = run(&input, 64, true);
    let partial: Vec<(Vec<u8>, bool)> = input.iter().map(|p| as_partial(p)).collect();
    assert!(partial.iter().all(|(p, flagged)| *flagged && !input.contains(p)), "the sums differ");
    assert_eq!(run_with(&partial, 64, true), complete);
    assert_eq!(complete.len(), 1);
}

#[test]
fn too_long_is_refused() {
    let mut co = Coalescer::new(4, true);
    assert_eq!(co.push(&vec![0u8; MAX_PACKET + 1]), Err(PushError::TooLong));
    assert!(co.is_empty());
    for _ in 0..4 {
        co.push(&[0x60; 40]).expect("room");
    }
    assert!(co.is_full());
    assert_eq!(co.push(&[0x60; 40]), Err(PushError::Full));
}
