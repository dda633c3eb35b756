//! Asking the upstream resolvers: one fresh socket per query (a random source port as well as a
//! random id, so an off-path spoofer has both to guess), the upstreams tried in order, the whole
//! attempt bounded by one deadline.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use crate::sansio::dns::{Forward, MAX_MESSAGE, Transport, check_reply};

/// The answer to `fwd` from the first upstream that gives one, or `None` when none did before
/// `timeout` (then the caller sends SERVFAIL). Each upstream but the last gets an equal share of
/// the time, so one dead upstream does not use it all; one that refuses at once (ICMP port
/// unreachable) hands over to the next at once.
pub async fn ask(upstreams: &[SocketAddr], timeout: Duration, fwd: &Forward, transport: Transport) -> Option<Vec<u8>> {
    let start = Instant::now();
    let deadline = start + timeout;
    let share = timeout / u32::try_from(upstreams.len().max(1)).unwrap_or(u32::MAX);
    for (i, up) in upstreams.iter().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let until = if i + 1 == upstreams.len() { deadline } else { (now + share).min(deadline) };
        let attempt = async {
            match transport {
                Transport::Udp => ask_udp(*up, fwd).await,
                Transport::Tcp => ask_tcp(*up, fwd).await,
            }
        };
        match tokio::time::timeout_at(until, attempt).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => tracing::trace!(target: "holdfast::dns", "upstream {up}: {e}"),
            Err(_) => tracing::trace!(target: "holdfast::dns", "upstream {up}: no answer in time"),
        }
    }
    None
}

fn any_for(up: SocketAddr) -> SocketAddr {
    let ip: IpAddr = match up {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

/// Over UDP: answers for another id or question are ignored (a late answer, a spoof) and the wait
/// goes on until the right one or the deadline.
async fn ask_udp(up: SocketAddr, fwd: &Forward) -> io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(any_for(up)).await?;
    sock.connect(up).await?;
    sock.send(&fwd.wire).await?;
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Ok(answer) = check_reply(fwd, &buf[..n]) {
            return Ok(answer);
        }
    }
}

/// Over TCP (the client asked over TCP, typically after a truncated UDP answer).
async fn ask_tcp(up: SocketAddr, fwd: &Forward) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(up).await?;
    super::write_framed(&mut stream, &fwd.wire).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let len = super::read_framed(&mut stream, &mut buf).await?;
    check_reply(fwd, &buf[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
