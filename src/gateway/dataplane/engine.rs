//! The gateway's hot path: both directions (clients -> TUN or another client, TUN -> clients)
//! as one loop on an OS thread of its own, waiting in its own `epoll_wait` on the TUN device, the
//! socket and a [`Wakeup`] rung on a stop (see [`crate::packet_thread::Poller`] for why not
//! tokio).
//!
//! Nothing on this thread awaits: sends that find no room wait in `poll` for a moment
//! ([`tunnel::writable_now`]), failing IO rests its side as a deadline of the wait. Each turn
//! takes at most [`TURN`] receives from the socket and as many batches from the TUN device,
//! so a flood on one side never holds the other for long. The loops' rules are unchanged: per-session state lives in
//! the session table, the engine holds buffers and rate limits only.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tun_rs::SyncDevice;

use super::{
    ACK_BURST, ACKS_PER_SECOND, DataSession, Loops, NOTICE_BURST, NOTICES_PER_SECOND, Recent, TARGET, note_seen,
    seal_drop,
};
use crate::flood::Shedder;
use crate::packet_thread::{Poller, Side, TURN, Wakeup, wait_for};
use crate::sansio::inner::InnerPacket;
use crate::sansio::seal::{Direction, SealedKind};
use crate::sansio::segment::{self, Checksums};
use crate::sansio::wire::{self, MsgType, ProbeAckBody, ProbeBody};
use crate::snapshot::SessionId;
use crate::tunnel::{self, Counters, DropReason, RateLimit, TooBig, TunReader, TunWriter, Unreachable, bump, stopped};

/// The poller's tokens.
const WAKE: u64 = 0;
const TUN: u64 = 1;
const SOCK: u64 = 2;

/// The engine has no timer of its own: without data or a rest it sleeps until woken.
const IDLE: Duration = Duration::from_secs(3600);

pub(super) struct Engine {
    ctx: Arc<Loops>,
    tun: Arc<SyncDevice>,
    sock: Arc<UdpSocket>,
    wakeup: Arc<Wakeup>,
    poller: Poller,
    stop: watch::Receiver<bool>,
    /// Reading the TUN device and the socket.
    tun_side: Side,
    sock_side: Side,
    // From clients.
    buf: Vec<u8>,
    writer: TunWriter,
    notices: RateLimit,
    acks: RateLimit,
    /// "Too big" answers to a client whose packet does not fit the path to its peer client.
    peer_too_big_rate: RateLimit,
    /// Probe acks are built here, not in `buf`: the rest of a GRO batch still lies there.
    ack_buf: Vec<u8>,
    /// Per-source budgets of failures (see crate::flood): consulted only when a datagram fails.
    shed: Shedder,
    // To clients.
    reader: TunReader,
    /// The TUN's MTU: the usable inner MTU, or less for a session whose path is smaller.
    mtu: u16,
    too_big: TooBig,
    lens: [usize; tunnel::READ_SLOTS],
    routes: [Option<Arc<DataSession>>; tunnel::READ_SLOTS],
    gso: bool,
    /// Both directions' last lookups, held while the session table stands still.
    recent: Recent,
}

impl Engine {
    /// Registers the three descriptors and allocates every buffer the engine uses.
    pub(super) fn new(
        ctx: Arc<Loops>,
        tun: Arc<SyncDevice>,
        sock: Arc<UdpSocket>,
        wakeup: Arc<Wakeup>,
        stop: watch::Receiver<bool>,
        mtu: u16,
    ) -> io::Result<Self> {
        let poller = Poller::new()?;
        poller.add(&*wakeup, WAKE)?;
        poller.add(&*tun, TUN)?;
        poller.add(&*sock, SOCK)?;
        // TSO segments leave with partial checksums: nearly every client takes them, and the
        // few from before the flag get theirs finished at the seal (`TunReader::seal_flag`).
        let mut reader = TunReader::new(mtu);
        reader.checksums(Checksums::Partial);
        Ok(Self {
            // One receive may hold many coalesced datagrams of one client (UDP GRO), up to 64 KiB.
            buf: vec![0u8; 65535],
            writer: TunWriter::new(&tun, ctx.cfg.coalesce_writes),
            notices: RateLimit::new(NOTICES_PER_SECOND, NOTICE_BURST),
            acks: RateLimit::new(ACKS_PER_SECOND, ACK_BURST),
            peer_too_big_rate: RateLimit::new(tunnel::TOO_BIG_PER_SECOND, tunnel::TOO_BIG_BURST),
            ack_buf: vec![0u8; wire::MAX_PROBE_LEN],
            shed: Shedder::new(ctx.shedding.clone()),
            reader,
            mtu,
            too_big: TooBig::new(),
            lens: [0; tunnel::READ_SLOTS],
            routes: std::array::from_fn(|_| None),
            gso: true,
            recent: Recent::new(&*ctx.sessions),
            // Whatever arrived before the registration is read at once.
            tun_side: Side::new(Duration::from_millis(10), Duration::from_secs(1)),
            sock_side: Side::new(Duration::from_millis(10), Duration::from_secs(1)),
            ctx,
            tun,
            sock,
            wakeup,
            poller,
            stop,
        })
    }

    /// Runs until a stop.
    pub(super) fn run(mut self) {
        let c = self.ctx.counters.clone();
        bump(&c.rx_loop_starts);
        bump(&c.tx_loop_starts);
        loop {
            if stopped(&self.stop) {
                return;
            }
            let now = Instant::now();
            for _ in 0..TURN {
                if !self.sock_side.go(now) {
                    break;
                }
                self.receive(now);
            }
            for _ in 0..TURN {
                if !self.tun_side.go(now) {
                    break;
                }
                self.send(now);
            }
            let timeout = wait_for(false, [&self.tun_side, &self.sock_side], Instant::now() + IDLE);
            let mut woken = false;
            for r in self.poller.next(timeout) {
                match r.token {
                    WAKE => woken = true,
                    TUN => self.tun_side.set_ready(true),
                    _ => self.sock_side.set_ready(true),
                }
            }
            if woken {
                self.wakeup.take();
            }
        }
    }

    /// UDP -> TUN (or -> another client): one (possibly coalesced) receive.
    fn receive(&mut self, now: Instant) {
        let ctx = &*self.ctx;
        let c = &*ctx.counters;
        let received = tunnel::recv_gro(&*self.sock, &mut self.buf);
        let Some((len, segment, from)) = read_side(&mut self.sock_side, received, c, DropReason::SocketError) else {
            return;
        };
        let sock = &*self.sock;
        self.shed.at(now);
        // A GRO batch comes from one sender, so one lookup usually serves all its datagrams. A
        // session removed while the batch is handled is used for the rest of it, as if the
        // batch had arrived a few microseconds earlier.
        let mut session: Option<Arc<DataSession>> = None;
        // The session whose arrival this batch has recorded: a GRO batch has one source and one
        // clock reading, so recording it again for every datagram would change nothing.
        let mut noted: Option<SessionId> = None;
        for datagram in self.buf[..len].chunks_mut(segment) {
            let header = match wire::parse_header(datagram) {
                Ok(h) if h.msg_type != MsgType::UnknownSession => h,
                // Clients never send notices; answering one could ping-pong with a gateway.
                _ => {
                    c.count_drop(DropReason::Malformed);
                    self.shed.failed(from);
                    continue;
                }
            };
            if session.as_ref().is_none_or(|s| s.session_id != header.session_id) {
                session = self.recent.by_id(&*ctx.sessions, header.session_id, now);
            }
            let Some(session) = session.as_deref() else {
                c.count_drop(DropReason::UnknownSession);
                if self.shed.unknown_session(from) && self.notices.allow(now) {
                    let notice = wire::unknown_session_notice(header.session_id, header.counter);
                    match tunnel::send_to_now(sock, &notice, from) {
                        Ok(_) => bump(&c.notices_tx),
                        Err(_) => c.count_drop(DropReason::SocketError),
                    }
                }
                continue;
            };
            // Established sessions first: from its endpoint a datagram is always opened.
            if !self.shed.admit(from, || session.endpoint()) {
                continue;
            }
            let opened = match session.crypto.open(Direction::ClientToGateway, datagram) {
                Ok(o) => o,
                Err(e) => {
                    session.drop_packet(c, DropReason::of_open(e));
                    self.shed.failed(from);
                    continue;
                }
            };
            let payload = opened.payload;
            match opened.kind {
                SealedKind::Keepalive => {
                    bump(&c.keepalives_rx);
                    bump(&session.traffic.keepalives_rx);
                    note_seen(&*ctx.sessions, session, from, now, c);
                    continue;
                }
                SealedKind::Probe => {
                    note_seen(&*ctx.sessions, session, from, now, c);
                    let probe_len = datagram.len();
                    match ProbeBody::parse(&datagram[payload]) {
                        Ok(probe) => {
                            let ack = Ack { probe: &probe, probe_len, from, now };
                            answer_probe(session, sock, &mut self.ack_buf, ack, &mut self.acks, c)
                        }
                        Err(_) => session.drop_packet(c, DropReason::Malformed),
                    }
                    continue;
                }
                // Clients never send acks.
                SealedKind::ProbeAck => {
                    session.drop_packet(c, DropReason::Malformed);
                    continue;
                }
                SealedKind::Data => {}
            }
            let Some(inner) = InnerPacket::parse(&datagram[payload.clone()]) else {
                session.drop_packet(c, DropReason::Malformed);
                continue;
            };
            if !session.owns(inner.src) {
                session.drop_packet(c, DropReason::Spoofed);
                continue;
            }
            // Before delivery, not after: the answer to this packet may be on its way back
            // before the engine's next turn, and must go to where the client is now.
            if noted != Some(session.session_id) {
                note_seen(&*ctx.sessions, session, from, now, c);
                noted = Some(session.session_id);
            }
            Counters::packet(&session.traffic.rx_packets, &session.traffic.rx_bytes, payload.len());
            // Only tunnel addresses belong to sessions: traffic for the gateway itself or for
            // the outside (NAT) needs no lookup.
            let to_peer = ctx.cfg.is_client_address(inner.dst);
            let peer = if to_peer { ctx.sessions.by_ip(inner.dst) } else { None };
            match peer {
                // Client to client: re-seal in place (the inner packet already sits at
                // HEADER_LEN, and the tag room behind it is the one the datagram had).
                // ... unless the path to the peer is smaller: then the sender hears "too big"
                // from the peer's address, through its own session, as from a router.
                Some(peer) if let Some(mtu) = peer.path_mtu().filter(|&m| payload.len() > usize::from(m)) => {
                    let too_big = TooBigToPeer { packet: &datagram[payload], mtu, from: inner.dst, now };
                    peer_too_big(session, sock, too_big, &mut self.ack_buf, &mut self.peer_too_big_rate, c);
                }
                Some(peer) => {
                    Counters::packet(&c.rx_packets, &c.rx_bytes, payload.len());
                    let Some(partial) = hairpin_flag(&mut datagram[payload.clone()], opened.csum_partial, &peer) else {
                        session.drop_packet(c, DropReason::Malformed);
                        continue;
                    };
                    send_to_session(&peer, sock, datagram, payload.len(), partial, c);
                }
                None => {
                    if self.writer.is_full() {
                        write_tun(&mut self.writer, &self.tun, c);
                    }
                    // Cannot fail (room was made above, and a payload is shorter than
                    // 64 KiB); counted rather than assumed.
                    if self.writer.push(&datagram[payload], opened.csum_partial).is_err() {
                        c.count_drop(DropReason::Malformed);
                    }
                }
            }
        }
        write_tun(&mut self.writer, &self.tun, c);
    }

    /// TUN -> UDP: one batch (one TSO super-packet, usually), routed packet by packet; runs of
    /// consecutive packets for one session go out in one GSO send.
    fn send(&mut self, now: Instant) {
        let ctx = &*self.ctx;
        let c = &*ctx.counters;
        let read = self.reader.try_read(&self.tun);
        let Some(n) = read_side(&mut self.tun_side, read, c, DropReason::TunError) else { return };
        let (lens, routes) = (&mut self.lens, &mut self.routes);
        let mut last: Option<(IpAddr, Option<Arc<DataSession>>)> = None;
        for i in 0..n {
            lens[i] = 0;
            routes[i] = None;
            // Not IP at all, or the kernel's own link-scope chatter on the device (MLD reports,
            // router solicitations): nothing a client could use.
            let inner = InnerPacket::parse(self.reader.packet(i)).filter(|p| !p.is_link_chatter());
            let Some(inner) = inner else {
                c.count_drop(DropReason::NotCarried);
                continue;
            };
            // No session owns the address, or its client has not told us where it is yet. One
            // lookup per run of packets to one address (the segments of a TSO packet, most of a
            // batch): two map lookups, a clock read and an endpoint load each, which cost more
            // than the rest of a packet's routing. The batch is microseconds long, so a session
            // looked up at its start is as valid at its end.
            let session = match &last {
                Some((dst, session)) if *dst == inner.dst => session.clone(),
                _ => {
                    let session = self.recent.by_ip(&*ctx.sessions, inner.dst, now).filter(|s| s.endpoint().is_some());
                    last = Some((inner.dst, session.clone()));
                    session
                }
            };
            let Some(session) = session else {
                c.count_drop(DropReason::NoRoute);
                continue;
            };
            let len = self.reader.len(i);
            // What fits the path to this client: its probes may have found a hop smaller than
            // the links at either end.
            let fits = session.mtu_within(self.mtu);
            if len > usize::from(fits) {
                // Answered from the client's tunnel address, as a router at the tunnel's far
                // end would: the gateway's own address would be dropped by its own kernel as
                // martian (a local source arriving on the TUN device).
                self.too_big.send(&self.tun, self.reader.packet(i), fits, inner.dst, c);
                continue;
            }
            let Some(partial) = self.reader.seal_flag(i, session.partial_checksums) else {
                session.drop_packet(c, DropReason::Malformed);
                continue;
            };
            let sealed = session.crypto.tx.next().and_then(|counter| {
                let slot = self.reader.slot(i);
                let id = session.session_id;
                session.crypto.cipher.seal_data_with(Direction::GatewayToClient, id, counter, slot, len, partial)
            });
            match sealed {
                Ok(d) => {
                    lens[i] = d;
                    routes[i] = Some(session);
                }
                Err(e) => session.drop_packet(c, seal_drop(e)),
            }
        }
        let mut i = 0;
        while i < n {
            let Some(session) = routes[i].take() else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < n && routes[j].as_ref().is_some_and(|r| Arc::ptr_eq(r, &session)) {
                routes[j] = None;
                j += 1;
            }
            if let Some(endpoint) = session.endpoint() {
                let sent = self.reader.send(&*self.sock, &mut self.gso, i, &lens[i..j], endpoint, Unreachable::Fail);
                Counters::add(&c.tx_packets, sent.datagrams);
                Counters::add(&c.tx_bytes, sent.inner_bytes);
                c.count_drops(DropReason::SocketError, sent.failed);
                let t = &session.traffic;
                Counters::add(&t.tx_packets, sent.datagrams);
                Counters::add(&t.tx_bytes, sent.inner_bytes);
                t.count_drops(DropReason::SocketError, sent.failed);
            }
            i = j;
        }
    }
}

/// A side's read as the engine takes it: the value; `None` when nothing was queued, or when the
/// read failed, which is counted as `reason` and rests the side by its backoff.
fn read_side<T>(side: &mut Side, r: io::Result<T>, c: &Counters, reason: DropReason) -> Option<T> {
    side.read(r).unwrap_or_else(|_| {
        c.count_drop(reason);
        side.failed();
        None
    })
}

/// Writes the queued inner packets to the TUN device, counting them.
fn write_tun(writer: &mut TunWriter, tun: &SyncDevice, c: &Counters) {
    if writer.flush(tun, c).is_err() {
        c.count_drop(DropReason::TunError);
    }
}

/// An authenticated probe of `probe_len` bytes from `from`, to be answered.
struct Ack<'a> {
    probe: &'a ProbeBody,
    probe_len: usize,
    from: SocketAddr,
    now: Instant,
}

/// Answers a probe: records what it says fits the path to the client, and sends the ack it
/// asked for (rate-limited for the whole gateway; never longer than asked, never longer than
/// [`wire::MAX_PROBE_LEN`]).
fn answer_probe(
    session: &DataSession,
    sock: &UdpSocket,
    buf: &mut [u8],
    ack: Ack<'_>,
    acks: &mut RateLimit,
    c: &Counters,
) {
    let probe = ack.probe;
    bump(&c.probes_rx);
    if let Some((before, v)) = session.set_down_ok(probe.down_ok) {
        // A transition of this session's path, bounded by what its (authenticated) client does.
        // The first value (the client's link, usually) is routine: debug.
        let inner = v.saturating_sub(wire::OVERHEAD as u16);
        if before == 0 {
            tracing::debug!(target: TARGET, "session {}: the path to the client carries {v}-byte datagrams (inner MTU {inner})", session.session_id);
        } else {
            tracing::info!(target: TARGET, "session {}: the path to the client now carries {v}-byte datagrams (inner MTU {inner}; was {before})", session.session_id);
        }
    }
    if !acks.allow(ack.now) {
        // Withheld: the client sees a lost probe and sends it again (a search tolerates
        // MAX_PROBES - 1 losses of a size).
        bump(&c.probe_acks_withheld);
        return;
    }
    let len = wire::ack_len_for(probe).min(buf.len());
    let body =
        ProbeAckBody { id: probe.id, kind: probe.kind, probe_len: u16::try_from(ack.probe_len).unwrap_or(u16::MAX) };
    let payload_len = len - wire::OVERHEAD;
    if body.write(&mut buf[wire::HEADER_LEN..wire::HEADER_LEN + payload_len]).is_err() {
        session.drop_packet(c, DropReason::Malformed);
        return;
    }
    let sealed = session.crypto.tx.next().and_then(|counter| {
        session.crypto.cipher.seal_probe(
            Direction::GatewayToClient,
            true,
            session.session_id,
            counter,
            buf,
            payload_len,
        )
    });
    match sealed {
        // An ack larger than the path carries is lost on the way: that loss is the answer.
        Ok(n) => match tunnel::send_to_now(sock, &buf[..n], ack.from) {
            Ok(_) => bump(&c.probe_acks_tx),
            Err(_) => session.drop_packet(c, DropReason::SocketError),
        },
        Err(e) => session.drop_packet(c, seal_drop(e)),
    }
}

/// A sender's inner `packet` that does not fit the path to its peer client (`mtu`), to be
/// answered from the peer's address `from`.
struct TooBigToPeer<'a> {
    packet: &'a [u8],
    mtu: u16,
    from: IpAddr,
    now: Instant,
}

/// Answers `sender` with an ICMP "fragmentation needed" / "packet too big", sealed to its own
/// session (rate-limited; `buf` is scratch room).
fn peer_too_big(
    sender: &DataSession,
    sock: &UdpSocket,
    t: TooBigToPeer<'_>,
    buf: &mut [u8],
    rate: &mut RateLimit,
    c: &Counters,
) {
    sender.drop_packet(c, DropReason::TooBig);
    let end = buf.len().saturating_sub(wire::TAG_LEN);
    let Some(room) = buf.get_mut(wire::HEADER_LEN..end) else { return };
    // The rules first (DF clear, ICMP errors, ...), so refused packets do not use up the rate.
    let Ok(n) = crate::sansio::icmp::too_big(t.packet, t.mtu, t.from, room) else { return };
    if rate.allow(t.now) {
        send_to_session(sender, sock, buf, n, false, c);
    }
}

/// The partial-checksum flag a packet from one client goes on to another with: as it came if
/// the peer takes partial checksums, else finished here. `None`: flagged, but not a TCP segment
/// a checksum could be finished in (refused here as the peer's writer would refuse it).
fn hairpin_flag(packet: &mut [u8], csum_partial: bool, peer: &DataSession) -> Option<bool> {
    if !csum_partial {
        return Some(false);
    }
    if peer.partial_checksums {
        return segment::tcp_start(packet).map(|_| true);
    }
    segment::finish_partial(packet).map(|()| false)
}

/// Seals the inner packet at `buf[HEADER_LEN..HEADER_LEN + len]` for `session` (flagged as
/// `csum_partial`) and sends it to the session's endpoint, counting the outcome.
fn send_to_session(
    session: &DataSession,
    sock: &UdpSocket,
    buf: &mut [u8],
    len: usize,
    csum_partial: bool,
    c: &Counters,
) {
    let Some(endpoint) = session.endpoint() else {
        // The client has not sent anything on this session yet, so we don't know where it is.
        session.drop_packet(c, DropReason::NoRoute);
        return;
    };
    let sealed = session.crypto.tx.next().and_then(|counter| {
        session.crypto.cipher.seal_data_with(
            Direction::GatewayToClient,
            session.session_id,
            counter,
            buf,
            len,
            csum_partial,
        )
    });
    let n = match sealed {
        Ok(n) => n,
        Err(e) => {
            session.drop_packet(c, seal_drop(e));
            return;
        }
    };
    match tunnel::send_to_now(sock, &buf[..n], endpoint) {
        Ok(_) => {
            Counters::packet(&c.tx_packets, &c.tx_bytes, len);
            Counters::packet(&session.traffic.tx_packets, &session.traffic.tx_bytes, len);
        }
        Err(_) => session.drop_packet(c, DropReason::SocketError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sansio::checksum::{fold, pseudo_header, sum};
    use crate::sansio::segment::tests::tso4;
    use crate::sansio::session::SessionKey;

    fn session(partial_checksums: bool) -> DataSession {
        DataSession::new(SessionId(1), [100, 64, 0, 3].into(), &SessionKey::new([1; 32]))
            .with_partial_checksums(partial_checksums)
    }

    #[test]
    fn a_partial_checksum_goes_on_to_a_client_as_that_client_takes_it() {
        // 20 + 20 bytes of headers, 30 of payload: one segment, its checksum left partial.
        let p = tso4(30);
        // To a client that takes partial checksums: flagged, as it came.
        let mut q = p.clone();
        assert_eq!(hairpin_flag(&mut q, true, &session(true)), Some(true));
        assert_eq!(q, p);
        // To one from before them: finished here, then sent unflagged.
        let mut q = p.clone();
        assert_eq!(hairpin_flag(&mut q, true, &session(false)), Some(false));
        assert_ne!(q[36..38], p[36..38]);
        assert_eq!(fold(pseudo_header(&q[12..20], 6, 50) + sum(&q[20..])), 0xffff, "a valid checksum");
        // A complete one passes as it is, to either.
        for takes in [true, false] {
            let mut q = p.clone();
            assert_eq!(hairpin_flag(&mut q, false, &session(takes)), Some(false));
            assert_eq!(q, p);
        }
        // Flagged but not TCP: refused, whichever the peer.
        let mut udp = p.clone();
        udp[9] = 17;
        for takes in [true, false] {
            assert_eq!(hairpin_flag(&mut udp.clone(), true, &session(takes)), None);
        }
    }
}
