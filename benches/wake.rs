//! The cost of waking a thread for one datagram, by how the thread waits: what a lone packet pays
//! at each hop through the tunnel (see `benches/hops.sh`), apart from the packet work itself.
//!
//! A UDP echo thread answers a pinger on loopback, one datagram at a time, with a pause between
//! them (20 ms: the thread has slept and its caches have gone cold, as between a user's pings; 1 ms:
//! still warm). The echo thread waits in one of three ways:
//! - `tokio`: a current-thread runtime on a thread of its own, a `select!` of a stop signal and the
//!   socket, as the packet loops ran until 2026-11-30;
//! - `epoll`: the engines' [`Poller`] (a plain `epoll_wait` on the non-blocking socket), as they
//!   wait now, and as boringtun waits;
//! - `blocking`: a blocking `recv_from`, the least a wake-up can cost.
//!
//! The variants take turns, round after round, so a change in the machine's load hits all three
//! alike; medians of the round-trip times (both wake-ups, the pinger's and the echo's, are in each).
//!
//! `cargo bench --bench wake` (about 30 s). `WAKE_PINGS=N` pings per variant and pause (default 300).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use holdfast::packet_thread::Poller;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiter {
    Tokio,
    Epoll,
    Blocking,
}

const WAITERS: [Waiter; 3] = [Waiter::Tokio, Waiter::Epoll, Waiter::Blocking];

/// Starts an echo thread waiting the given way; returns its address. It answers until the
/// process ends (the bench is one process; each thread is bounded by it).
fn echo(waiter: Waiter) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the echo socket");
    let addr = sock.local_addr().expect("echo address");
    std::thread::Builder::new()
        .name(format!("echo-{waiter:?}"))
        .spawn(move || {
            let mut buf = [0u8; 2048];
            match waiter {
                Waiter::Tokio => {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    rt.block_on(async move {
                        sock.set_nonblocking(true).expect("non-blocking");
                        let sock = tokio::net::UdpSocket::from_std(sock).expect("register the socket");
                        let (_keep, mut stop) = tokio::sync::watch::channel(false);
                        loop {
                            tokio::select! {
                                biased;
                                _ = stop.changed() => return,
                                r = sock.recv_from(&mut buf) => {
                                    let (n, from) = r.expect("receive");
                                    sock.send_to(&buf[..n], from).await.expect("send");
                                }
                            }
                        }
                    });
                }
                Waiter::Epoll => {
                    sock.set_nonblocking(true).expect("non-blocking");
                    let mut poller = Poller::new().expect("epoll");
                    poller.add(&sock, 1).expect("watch the socket");
                    loop {
                        let _ready = poller.wait(None).expect("epoll_wait");
                        while let Ok((n, from)) = sock.recv_from(&mut buf) {
                            sock.send_to(&buf[..n], from).expect("send");
                        }
                    }
                }
                Waiter::Blocking => loop {
                    let (n, from) = sock.recv_from(&mut buf).expect("receive");
                    sock.send_to(&buf[..n], from).expect("send");
                },
            }
        })
        .expect("spawn the echo thread");
    addr
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let pings: usize = std::env::var("WAKE_PINGS").ok().and_then(|s| s.parse().ok()).unwrap_or(300).clamp(10, 5000);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("wake-up cost of one UDP echo on loopback, by how the echo thread waits ({pings} round trips each)");
    println!("cpu: {cpu}  nproc={}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    let targets: Vec<(Waiter, SocketAddr)> = WAITERS.iter().map(|&w| (w, echo(w))).collect();
    let pinger = UdpSocket::bind("127.0.0.1:0").expect("bind the pinger");
    pinger.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let payload = [7u8; 84];
    let mut reply = [0u8; 128];
    for pause in [Duration::from_millis(20), Duration::from_millis(1)] {
        let mut rtts: Vec<Vec<f64>> = vec![Vec::with_capacity(pings); WAITERS.len()];
        for _ in 0..pings {
            for (i, (_, addr)) in targets.iter().enumerate() {
                std::thread::sleep(pause);
                let t = Instant::now();
                pinger.send_to(&payload, addr).expect("ping");
                let (n, _) = pinger.recv_from(&mut reply).expect("a reply within 2 s");
                assert_eq!(n, payload.len());
                rtts[i].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let medians: Vec<f64> = rtts.iter_mut().map(|v| median(v)).collect();
        let blocking = medians[2];
        print!("  pause {:>2} ms:", pause.as_millis());
        for ((w, _), m) in targets.iter().zip(&medians) {
            print!("  {:?} {:.1} us ({:+.1})", w, m, m - blocking);
        }
        println!();
    }
    println!("  (in brackets: more than the blocking receive; a round trip holds two wake-ups)");
}
