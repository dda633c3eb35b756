//! Proves that the data path allocates nothing per packet: seal, open, replay window, header
//! parsing and the unknown-session notice, success and failure paths alike, run many times under
//! a counting global allocator that must stay at zero.
//!
//! Counting is per thread (a thread-local switch), so the test harness's other threads and the
//! other test in this file cannot disturb the count.

mod support;

use std::hint::black_box;

use holdfast::sansio::aead::Backend;
use holdfast::sansio::replay::ReplayWindow;
use holdfast::sansio::seal::{Direction, OpenError, SealedKind, SessionCipher, TxCounter};
use holdfast::sansio::wire::{self, HEADER_LEN, MsgType, OVERHEAD, parse_header};
use holdfast::snapshot::{SessionId, SessionKey};

#[global_allocator]
static GLOBAL: support::alloc::Counting = support::alloc::Counting;

use support::alloc::{allocations_in, aws_lc_allocations_in};

#[test]
fn the_counter_sees_allocations() {
    // Positive control: without it, a broken counter would make the real test pass vacuously.
    let n = allocations_in(|| {
        let v: Vec<u8> = Vec::with_capacity(black_box(16));
        black_box(&v);
    });
    assert_eq!(n, 1);
}

#[test]
fn the_counter_sees_the_aead_backends_own_allocations() {
    // The same for AWS-LC's allocations in C (the AES-GCM key schedule lives in one), which do
    // not go through Rust's allocator: without it, the test below could not see them.
    let key = SessionKey::new([0x42; 32]);
    let n = aws_lc_allocations_in(|| drop(black_box(SessionCipher::with_backend(&key, Backend::AwsLc))));
    assert!(n >= 1, "AWS-LC's allocations are counted");
}

#[test]
fn seal_open_replay_allocate_nothing_per_packet() {
    for backend in Backend::ALL {
        seal_open_replay_on(backend);
    }
}

/// The data path's seal, open and window under `backend`'s AES-GCM, counted.
fn seal_open_replay_on(backend: Backend) {
    const PACKETS: u64 = 20_000;
    const SID: SessionId = SessionId(0x0123_4567_89ab_cdef);

    // Setup, outside the counted region: one cipher per session, one window per receive
    // direction, one counter per send direction, one buffer per loop.
    let key = SessionKey::new([0x42; 32]);
    let client = SessionCipher::with_backend(&key, backend);
    let gateway = SessionCipher::with_backend(&key, backend);
    let client_tx = TxCounter::new();
    let gateway_tx = TxCounter::new();
    let mut gateway_rx = ReplayWindow::new();
    let mut client_rx = ReplayWindow::new();
    let mut up = vec![0u8; 2048];
    let mut down = vec![0u8; 2048];
    let mut stale = vec![0u8; 2048];
    let mut stale_len = 0;
    // Warm-up: CPU feature detection and any other first-use work happens here.
    let n = client.seal_keepalive(Direction::ClientToGateway, SID, u64::MAX - 1, &mut up).expect("warm-up");
    gateway.open(Direction::ClientToGateway, &mut up[..n]).expect("warm-up");

    let mut delivered = 0u64;
    let mut dropped = [0u64; OpenError::ALL.len()];
    let allocs = allocations_in(|| {
        for i in 0..PACKETS {
            // Client -> gateway: the TUN read lands at up[HEADER_LEN..].
            let len = [64usize, 1400, 0, 576][(i % 4) as usize];
            up[HEADER_LEN..HEADER_LEN + len].fill(i as u8);
            let ctr = client_tx.next().expect("fresh");
            let n = client.seal_data(Direction::ClientToGateway, SID, ctr, &mut up, len).expect("seal");
            if i % 100 == 0 {
                stale[..n].copy_from_slice(&up[..n]);
                stale_len = n;
            }
            match parse_header(&up[..n]) {
                Ok(h) if h.msg_type == MsgType::Data => {}
                _ => unreachable!("we just sealed it"),
            }
            match gateway.open_checked(Direction::ClientToGateway, &mut up[..n], &mut gateway_rx) {
                Ok(o)
                    if o.kind == SealedKind::Data
                        && o.payload.len() == len
                        && up[o.payload.clone()].iter().all(|&b| b == i as u8) =>
                {
                    delivered += 1
                }
                Ok(_) => unreachable!("wrong kind, length or content"),
                Err(e) => dropped[e.index()] += 1,
            }

            // Gateway -> client, with the two-phase window use (check, open, accept).
            let ctr = gateway_tx.next().expect("fresh");
            let n = if i % 16 == 0 {
                gateway.seal_keepalive(Direction::GatewayToClient, SID, ctr, &mut down).expect("seal")
            } else {
                down[HEADER_LEN..HEADER_LEN + 100].fill(7);
                gateway.seal_data(Direction::GatewayToClient, SID, ctr, &mut down, 100).expect("seal")
            };
            let result = parse_header(&down[..n])
                .map_err(OpenError::from)
                .and_then(|h| client_rx.check(h.counter).map_err(OpenError::from))
                .and_then(|()| client.open(Direction::GatewayToClient, &mut down[..n]))
                .and_then(|o| client_rx.accept(o.counter).map_err(OpenError::from));
            match result {
                Ok(()) => delivered += 1,
                Err(e) => dropped[e.index()] += 1,
            }

            // The failure paths must not allocate either: a replay, a tampered datagram,
            // garbage, and the gateway's notice for an unknown session.
            if i % 100 == 50 {
                let r = gateway.open_checked(Direction::ClientToGateway, &mut stale[..stale_len], &mut gateway_rx);
                if let Err(e) = r {
                    dropped[e.index()] += 1;
                }
                up[HEADER_LEN] ^= 1;
                if let Err(e) = gateway.open(Direction::ClientToGateway, &mut up[..OVERHEAD]) {
                    dropped[e.index()] += 1;
                }
                if let Err(e) = parse_header(&stale[HEADER_LEN..stale_len]) {
                    dropped[OpenError::from(e).index()] += 1;
                }
                let notice = wire::unknown_session_notice(SessionId(i), ctr);
                black_box(parse_header(black_box(&notice)).is_ok());
            }
        }
    });

    assert_eq!(allocs, 0, "the data path allocated {allocs} times with {backend:?}");
    assert_eq!(delivered, 2 * PACKETS, "drops: {dropped:?}");
    // Each failure path really ran (and so was really covered by the zero above).
    let replays = dropped[OpenError::Replayed(holdfast::sansio::replay::ReplayError::Replay).index()];
    assert_eq!(replays, PACKETS / 100);
    assert!(
        dropped[OpenError::Decrypt.index()] + dropped[OpenError::Malformed(wire::WireError::BadLength).index()] > 0
    );
    assert_eq!(dropped.iter().sum::<u64>(), 3 * PACKETS / 100, "{dropped:?}");
}

/// A TCP/IPv4 segment with valid checksums: `payload` bytes at `seq`, IP id `id`.
fn tcp_segment(seq: u32, id: u16, payload: usize) -> Vec<u8> {
    fn csum(data: &[u8], mut acc: u32) -> u16 {
        for w in data.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            acc += hi | w.get(1).copied().map_or(0, u32::from);
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }
    let total = 40 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..20].copy_from_slice(&[100, 64, 0, 2, 100, 64, 0, 1]);
    p[20..24].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x10;
    p[34..36].copy_from_slice(&500u16.to_be_bytes());
    p[40..].fill(seq as u8);
    let ip = !csum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip.to_be_bytes());
    let pseudo = u32::from(csum(&p[12..20], 0)) + 6 + (total - 20) as u32;
    let tcp = !csum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&tcp.to_be_bytes());
    p
}

#[test]
fn tun_write_coalescing_allocates_nothing_per_packet() {
    use holdfast::sansio::coalesce::Coalescer;
    use holdfast::tunnel::TunWriter;

    // One receive batch's worth of inner packets, built outside the counted region: 44 in-order
    // segments of one flow, a shorter one, a segment out of order, a pure ACK and a non-TCP
    // packet, so the merge, pass-through and checksum paths all run.
    let mut batch: Vec<Vec<u8>> = (0..44).map(|i| tcp_segment(i * 1400, i as u16, 1400)).collect();
    batch.push(tcp_segment(44 * 1400, 44, 300));
    batch.push(tcp_segment(99 * 1400, 99, 1400));
    batch.push(tcp_segment(0, 100, 0));
    batch.push(vec![0x60; 60]);
    let mut co = Coalescer::new(64, true);
    let mut writer = TunWriter::with_offload(true, true);
    let (mut written, mut items) = (0usize, 0usize);
    let allocs = allocations_in(|| {
        for _ in 0..500 {
            for p in &batch {
                co.push(black_box(p)).expect("room");
                writer.push(black_box(p), false).expect("room");
            }
            for w in co.finish() {
                written += black_box(w).len();
                items += 1;
            }
            co.clear();
            for w in writer.pending() {
                written += black_box(w).len();
            }
        }
    });
    assert_eq!(allocs, 0, "coalescing allocated {allocs} times");
    // The 45 segments became one packet; the other three went out on their own.
    assert_eq!(items, 500 * 4, "{items} packets written");
    assert_eq!(co.merged(), 500 * 44);
    assert!(written > 0);
}

#[test]
fn flood_shedding_allocates_nothing_per_packet() {
    use holdfast::flood::{ShedCounters, Shedder};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    // Setup outside the counted region: the budget table is allocated here, once.
    let counters = Arc::new(ShedCounters::default());
    let mut shed = Shedder::new(counters.clone());
    let t0 = tokio::time::Instant::now();
    let endpoint: SocketAddr = "198.18.0.1:51000".parse().expect("addr");
    let mut admitted = 0u64;
    let allocs = allocations_in(|| {
        for i in 0..50_000u32 {
            shed.at(t0 + Duration::from_micros(u64::from(i) * 20));
            // Many sources (the table fills and recycles), one very noisy one.
            let from = if i % 2 == 0 {
                SocketAddr::from(([198, 19, (i >> 8) as u8, i as u8], 9))
            } else {
                SocketAddr::from(([198, 18, 9, 9], 53))
            };
            match i % 3 {
                0 => shed.failed(from),
                1 => {
                    black_box(shed.unknown_session(from));
                }
                _ => admitted += u64::from(shed.admit(from, || Some(endpoint))),
            }
            admitted += u64::from(shed.admit(endpoint, || Some(endpoint)));
        }
    });
    assert_eq!(allocs, 0, "shedding allocated {allocs} times");
    let t = counters.totals();
    assert!(t.shed > 0 && t.notices_withheld > 0 && admitted > 50_000, "{t:?}");
}

#[test]
fn too_big_answers_allocate_nothing_per_packet() {
    use holdfast::tunnel::{Counters, DropReason, TooBig};
    use std::net::IpAddr;
    // Setup outside the counted region: the answerer (its buffer), both families' offenders.
    let c = Counters::default();
    let mut tb = TooBig::new();
    let mut v4 = vec![0u8; 1500];
    v4[0] = 0x45;
    v4[6] = 0x40; // DF
    v4[9] = 6;
    v4[12..16].copy_from_slice(&[100, 64, 0, 2]);
    v4[16..20].copy_from_slice(&[198, 18, 0, 9]);
    let mut v6 = vec![0u8; 1500];
    v6[0] = 0x60;
    v6[6] = 6;
    v6[8] = 0xfd;
    v6[23] = 2;
    v6[24] = 0x20;
    let (gw4, gw6): (IpAddr, IpAddr) = ([100, 64, 0, 1].into(), "fd00::1".parse().unwrap());
    let t0 = tokio::time::Instant::now();
    let mut bytes = 0usize;
    let allocs = allocations_in(|| {
        for i in 0..2_000u64 {
            // Spread over time so the rate limit lets most through (100/s).
            let now = t0 + std::time::Duration::from_millis(10 * i);
            for (p, from) in [(&v4, gw4), (&v6, gw6)] {
                if let Some(a) = tb.answer(black_box(p), 1400, from, i % 2 == 0, now, &c) {
                    bytes += a.len();
                }
            }
        }
    });
    assert_eq!(allocs, 0, "too-big answers allocated {allocs} times");
    assert_eq!(c.stats().dropped(DropReason::TooBig), 4_000);
    assert!(bytes > 2_000 * 48, "answers were written: {bytes} bytes");
}
