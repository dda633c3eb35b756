//! Proves that the data path allocates nothing per packet: seal, open, replay window, header
//! parsing and the unknown-session notice, success and failure paths alike, run many times under
//! a counting global allocator that must stay at zero.
//!
//! Counting is per thread (a thread-local switch), so the test harness's other threads and the
//! other test in this file cannot disturb the count.

mod support;

use std::hint::black_box;

use holdfast::sansio::replay::ReplayWindow;
use holdfast::sansio::seal::{Direction, OpenError, SealedKind, SessionCipher, TxCounter};
use holdfast::sansio::wire::{self, HEADER_LEN, MsgType, OVERHEAD, parse_header};
use holdfast::snapshot::{SessionId, SessionKey};

#[global_allocator]
static GLOBAL: support::alloc::Counting = support::alloc::Counting;

use support::alloc::allocations_in;

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
fn seal_open_replay_allocate_nothing_per_packet() {
    const PACKETS: u64 = 20_000;
    const SID: SessionId = SessionId(0x0123_4567_89ab_cdef);

    // Setup, outside the counted region: one cipher per session, one window per receive
    // direction, one counter per send direction, one buffer per loop.
    let key = SessionKey::new([0x42; 32]);
    let client = SessionCipher::new(&key);
    let gateway = SessionCipher::new(&key);
    let client_tx = TxCounter::new();
    let gateway_tx = TxCounter::new();
    let mut gateway_rx = ReplayWindow::new();
    let mut client_rx = ReplayWindow::new();
    let mut up = vec![0u8; 2048];
    let mut down = vec![0u8; 2048];
    let mut stale = vec![0u8; 2048];
    let mut stale_len = 0;
    // Warm-up: CPU feature detection and any other first-use work happens here.
    let n = client
        .seal_keepalive(Direction::ClientToGateway, SID, u64::MAX - 1, &mut up)
        .expect("warm-up");
    gateway
        .open(Direction::ClientToGateway, &mut up[..n])
        .expect("warm-up");

    let mut delivered = 0u64;
    let mut dropped = [0u64; OpenError::ALL.len()];
    let allocs = allocations_in(|| {
        for i in 0..PACKETS {
            // Client -> gateway: the TUN read lands at up[HEADER_LEN..].
            let len = [64usize, 1400, 0, 576][(i % 4) as usize];
            up[HEADER_LEN..HEADER_LEN + len].fill(i as u8);
            let ctr = client_tx.next().expect("fresh");
            let n = client
                .seal_data(Direction::ClientToGateway, SID, ctr, &mut up, len)
                .expect("seal");
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
                gateway
                    .seal_keepalive(Direction::GatewayToClient, SID, ctr, &mut down)
                    .expect("seal")
            } else {
                down[HEADER_LEN..HEADER_LEN + 100].fill(7);
                gateway
                    .seal_data(Direction::GatewayToClient, SID, ctr, &mut down, 100)
                    .expect("seal")
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
                let r = gateway.open_checked(
                    Direction::ClientToGateway,
                    &mut stale[..stale_len],
                    &mut gateway_rx,
                );
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

    assert_eq!(allocs, 0, "the data path allocated {allocs} times");
    assert_eq!(delivered, 2 * PACKETS, "drops: {dropped:?}");
    // Each failure path really ran (and so was really covered by the zero above).
    let replays =
        dropped[OpenError::Replayed(holdfast::sansio::replay::ReplayError::Replay).index()];
    assert_eq!(replays, PACKETS / 100);
    assert!(
        dropped[OpenError::Decrypt.index()]
            + dropped[OpenError::Malformed(wire::WireError::BadLength).index()]
            > 0
    );
    assert_eq!(
        dropped.iter().sum::<u64>(),
        3 * PACKETS / 100,
        "{dropped:?}"
    );
}
