//! The data plane under a flood (root only; skipped otherwise):
//! - the socket filter on real sockets: a malformed datagram is dropped in the kernel, every
//!   valid kind is delivered (Data, Keepalive; UnknownSession on the client's socket), with and
//!   without UDP GRO, and what the filter sees of a GRO-coalesced batch;
//! - the real gateway and client while a third namespace floods the data port (bounded in count
//!   and time): the client's traffic keeps flowing, the budgets shed, and the gateway logs the
//!   flood once when it starts and once when it ends.

mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use holdfast::flood::{attach_filter, kernel_drops};
use holdfast::gateway::status::GatewayReport;
use holdfast::sansio::filter::{FilterSpec, Side};
use holdfast::sansio::seal::{Direction, SessionCipher};
use holdfast::sansio::wire::{self, HEADER_LEN, OVERHEAD};
use holdfast::snapshot::{SessionId, SessionKey};
use support::netns::{self, Netns};
use support::{GatewayDir, fast_timings, holdfast_ok, s};

const T: Duration = Duration::from_secs(20);

macro_rules! require_root {
    () => {
        if !netns::available() {
            eprintln!("SKIPPED: needs root and iproute2 (network namespaces)");
            return;
        }
    };
}

fn sealed(kind: &str, payload: usize) -> Vec<u8> {
    let cipher = SessionCipher::new(&SessionKey::new([3; 32]));
    let mut buf = vec![0x45u8; payload + OVERHEAD];
    let n = match kind {
        "keepalive" => cipher.seal_keepalive(Direction::GatewayToClient, SessionId(9), 1, &mut buf),
        _ => cipher.seal_data(Direction::GatewayToClient, SessionId(9), 1, &mut buf, payload),
    }
    .expect("seal");
    buf.truncate(n);
    buf
}

/// Sends `datagrams` one by one from a fresh socket to a fresh socket with `spec`'s filter
/// (and UDP GRO when `spec.coalesced`), on the loopback of a test namespace; returns what
/// arrived (lengths) and the receiver's kernel drop count.
fn through_filter(ns: &Netns, spec: FilterSpec, datagrams: &[Vec<u8>]) -> (Vec<usize>, u64) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread();
                let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
                attach_filter(&rx, spec).expect("SO_ATTACH_FILTER");
                let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
                for d in datagrams {
                    tx.send_to(d, rx.local_addr().expect("addr")).expect("send");
                }
                // A last valid marker: once it is in, everything before it was decided.
                let marker = sealed("data", 7);
                tx.send_to(&marker, rx.local_addr().expect("addr")).expect("send");
                rx.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                loop {
                    let (n, _) = rx.recv_from(&mut buf).expect("the marker arrives");
                    if buf[..n] == marker[..] {
                        break;
                    }
                    got.push(n);
                }
                (got, kernel_drops(&rx).expect("SO_MEMINFO"))
            })
            .join()
            .expect("namespace thread")
    })
}

#[test]
fn the_filter_drops_malformed_datagrams_and_delivers_every_valid_kind() {
    require_root!();
    let ns = Netns::new();
    let data = sealed("data", 100);
    let empty_data = sealed("data", 0);
    let keepalive = sealed("keepalive", 0);
    let notice = wire::unknown_session_notice(SessionId(9), 1).to_vec();
    let mut bad_reserved = data.clone();
    bad_reserved[3] = 1;
    let mut bad_version = data.clone();
    bad_version[0] = 0x21;
    let mut long_keepalive = keepalive.clone();
    long_keepalive.push(0);
    let junk: Vec<Vec<u8>> = vec![
        vec![0x55; 64],
        vec![],
        data[..HEADER_LEN].to_vec(),
        data[..OVERHEAD - 1].to_vec(),
        bad_reserved,
        bad_version,
        keepalive[..30].to_vec(),
    ];
    for side in [Side::Gateway, Side::Client] {
        let spec = FilterSpec { side, coalesced: false };
        let mut all = junk.clone();
        all.push(long_keepalive.clone());
        all.extend([data.clone(), empty_data.clone(), keepalive.clone(), notice.clone()]);
        let (got, dropped) = through_filter(&ns, spec, &all);
        let mut want = vec![data.len(), empty_data.len(), keepalive.len()];
        if side == Side::Client {
            want.push(notice.len());
        }
        assert_eq!(got, want, "{side:?}: only the valid kinds arrive");
        let notice_dropped = u64::from(side == Side::Gateway);
        assert_eq!(dropped, junk.len() as u64 + 1 + notice_dropped, "{side:?}: counted by the kernel");
    }
}

/// What the kernel shows the filter of a socket with UDP GRO: one run per coalesced batch, with
/// the batch's total length. Two keepalives sent in one GSO call reach a GRO socket as one
/// 72-byte batch; the exact-length program drops it (so it must not be used with GRO), the
/// coalesced one delivers it.
#[test]
fn with_udp_gro_the_filter_sees_whole_batches_and_the_gro_program_lets_them_through() {
    require_root!();
    let ns = Netns::new();
    let keepalive = sealed("keepalive", 0);
    let pair = [keepalive.clone(), keepalive.clone()].concat();
    let run = |coalesced: bool| -> (Vec<(usize, usize)>, u64) {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    ns.enter_current_thread();
                    let rx = holdfast::tunnel::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
                    assert!(holdfast::tunnel::enable_udp_gro(&rx), "UDP GRO");
                    attach_filter(&rx, FilterSpec { side: Side::Client, coalesced }).expect("filter");
                    let tx = holdfast::tunnel::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
                    let to = rx.local_addr().expect("addr");
                    let mut gso = true;
                    holdfast::tunnel::send_gso(
                        &tx,
                        &mut gso,
                        &pair,
                        OVERHEAD,
                        to,
                        holdfast::tunnel::Unreachable::Settle,
                    )
                    .expect("GSO send");
                    assert!(gso, "the kernel took the GSO send");
                    let marker = sealed("data", 7);
                    tx.send_to(&marker, to).expect("marker");
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 65535];
                    loop {
                        assert!(support::readable(&rx, Duration::from_secs(5)), "the marker arrives");
                        let (n, seg, _) = match holdfast::tunnel::recv_gro(&rx, &mut buf) {
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                            r => r.expect("recv"),
                        };
                        if buf[..n] == marker[..] {
                            break;
                        }
                        got.push((n, seg));
                    }
                    (got, kernel_drops(&rx).expect("SO_MEMINFO"))
                })
                .join()
                .expect("namespace thread")
        })
    };
    let (got, dropped) = run(true);
    assert_eq!(got, vec![(72, 36)], "one batch of two keepalives");
    assert_eq!(dropped, 0);
    let (got, dropped) = run(false);
    assert_eq!(got, vec![], "the exact program saw 72 bytes: the filter runs once per batch");
    assert_eq!(dropped, 1);
}

/// Floods `to` from a thread inside `ns` for `secs` seconds (at most `max` datagrams): random
/// junk, well-formed Data headers with random session ids, and forgeries (bad tags) for
/// `victim`'s session id, from one source. Returns how many went out.
fn flood(ns: &Netns, to: SocketAddr, victim: u64, secs: u64, max: u64) -> std::thread::JoinHandle<u64> {
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("netns handle");
        // SAFETY: setns on a valid namespace fd, for this thread only.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let end = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        let mut d = [0u8; 120];
        while sent < max && Instant::now() < end {
            for chunk in d.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_be_bytes()[..chunk.len()]);
            }
            match sent % 3 {
                0 => {}                                        // random junk
                1 => d[..4].copy_from_slice(&[0x11, 0, 0, 0]), // a random session id
                _ => {
                    d[..4].copy_from_slice(&[0x11, 0, 0, 0]);
                    d[4..12].copy_from_slice(&victim.to_be_bytes()); // a forgery for a live one
                }
            }
            let _ = sock.send_to(&d, to);
            sent += 1;
            // Paced (at most ~64 k/s): the test is about what the gateway does with a flood,
            // not about how much a debug build on a shared machine can take.
            if sent.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    })
}

fn gateway_status(gw: &GatewayDir) -> GatewayReport {
    let out = holdfast_ok(&["gateway", "status", "--dir", s(gw.path()), "--json"]);
    serde_json::from_str(&out).expect("gateway status --json parses")
}

#[test]
fn a_client_keeps_working_while_a_flood_runs_and_the_flood_is_logged_once() {
    require_root!();
    let gw = GatewayDir::init_split();
    let attacker = Netns::new();
    netns::link(&gw.ns, "hfa", Ipv4Addr::new(198, 18, 2, 1), &attacker, "hfx", Ipv4Addr::new(198, 18, 2, 2), 30);
    attacker.default_route(Ipv4Addr::new(198, 18, 2, 1));
    let logs = tempfile::tempdir().expect("tempdir");
    let file = gw.add_client("alice", |f| fast_timings(f, logs.path()));
    let mut gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);
    client.wait_for(&["-> Healthy"], T);
    let tunnel = Ipv4Addr::new(100, 64, 0, 1);
    assert!(gw.clients_ns().ping_until(tunnel, T).is_some(), "tunnel up");
    let before = gateway_status(&gw);
    assert!(before.data_plane.shedding.filter, "the socket filter is attached");
    let victim = u64::from_str_radix(&before.sessions[0].session_id, 16).expect("session id");

    let flooder = flood(&attacker, SocketAddr::from(([198, 18, 0, 2], gw.port)), victim, 6, 3_000_000);
    // Wait until the flood is on, then ping through it.
    gateway.wait_for(&["flood on the data port"], T);
    let answered = gw.clients_ns().ping_count(tunnel, 40);
    let sent = flooder.join().expect("flooder");
    // On a shared 2-core machine a debug-build gateway may let a reply take longer than ping's
    // one-second wait; the flood itself must not stop the traffic.
    assert!(
        answered >= 36,
        "{answered}/40 pings answered during the flood ({sent} datagrams sent): {:?}",
        gateway_status(&gw).data_plane
    );

    gateway.wait_for(&["flood over after"], T);
    let after = gateway_status(&gw);
    let f = &after.data_plane.shedding;
    eprintln!("flood of {sent} datagrams: {f:?}");
    assert!(f.kernel_dropped > 0, "junk dropped in the kernel: {f:?}");
    assert!(f.failed > 0 && f.shed > 0 && f.notices_withheld > 0, "budgets spent: {f:?}");
    assert!(f.notices_withheld + after.data_plane.unknown_session_notices_tx > 0);
    assert_eq!((f.floods, f.flooded), (1, false), "one flood, over");
    // One start line and one end line, whatever the flood's size.
    let lines = gateway.all_lines();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!((count("flood on the data port"), count("flood over after")), (1, 1));
    // While it lasted, the kernel let only the live session's ids through (and a sample).
    assert_eq!(count("socket filter narrowed to the 1 live session(s)"), 1, "{lines:#?}");
    // And after it, the plain filter is back: a stranger's datagram reaches the gateway again
    // and draws its notice.
    let stranger = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                gw.clients_ns().enter_current_thread();
                let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
                let mut d = wire::Header {
                    msg_type: wire::MsgType::Data,
                    csum_partial: false,
                    session_id: SessionId(0x5eed),
                    counter: 1,
                }
                .to_bytes()
                .to_vec();
                d.extend_from_slice(&[0xaa; 48]);
                sock.send_to(&d, SocketAddr::from(([198, 18, 0, 2], gw.port))).expect("send");
                let mut buf = [0u8; 64];
                sock.recv_from(&mut buf).ok().and_then(|(n, _)| wire::parse_header(&buf[..n]).ok())
            })
            .join()
            .expect("thread")
    });
    assert_eq!(stranger.map(|h| (h.msg_type, h.session_id)), Some((wire::MsgType::UnknownSession, SessionId(0x5eed))));
    // The live session was never shed: it still carries traffic, and its drops are the
    // forgeries (decrypt) only, never its own datagrams.
    assert_eq!(gw.clients_ns().ping_count(tunnel, 5), 5);
    let session = &after.sessions[0];
    assert!(session.rx_packets >= before.sessions[0].rx_packets + u64::from(answered), "{session:?}");
    assert!(client.is_alive() && gateway.is_alive());
}
