//! The client's hot path: both directions (TUN -> gateway, gateway -> TUN) as one loop on an OS
//! thread of its own, waiting in its own `epoll_wait` on the TUN device, the socket and a
//! [`Wakeup`] (see [`crate::packet_thread::Poller`] for why not tokio).
//!
//! Nothing on this thread awaits. What waits for time or for other parts stays on the main
//! runtime and talks to the engine through the wake-up and shared state: device re-creation
//! ([`super::keep_tun`], through the `device` channel), path MTU following, the prober (acks go
//! to it through a channel, and so do the ICMP hints this thread reads from the socket's error
//! queue), and the supervisor (nudges). The engine keeps only its own timing: the keepalive,
//! and the pauses after failing IO, as deadlines of its wait.
//!
//! Fairness: each turn takes at most [`TURN`] batches from the TUN device, then as many
//! receives from the socket, then waits without sleeping if either still has data
//! (edge-triggered registration: a side is known readable until a read says `WouldBlock`).
//!
//! The spec's rules hold as in the async loops this replaced: every batch calls the getter and
//! uses only the snapshot it returns, errors are counted and survived with rate-limited logs,
//! and the engine starts once and ends only on a stop.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tun_rs::SyncDevice;

use super::{Binding, IoLog, NO_SESSION_BACKOFF, Shared, TARGET, device_gone, gateway_of, seal_drop};
use crate::client::driver::Command;
use crate::client::path_mtu::PathMtu;
use crate::client::prober::{Ack, Hint};
use crate::packet_thread::{Handoff, Poller, Side, TURN, Wakeup, wait_for};
use crate::sansio::inner::{InnerPacket, IpFamily};
use crate::sansio::seal::{Direction, SealedKind};
use crate::sansio::segment::Checksums;
use crate::sansio::wire::{self, MsgType, ProbeAckBody};
use crate::snapshot::VpnAuthResponse;
use crate::tunnel::{
    self, Counters, DropReason, ErrorBackoff, RateLimit, TooBig, TunReader, TunWriter, Unreachable, bump, stopped,
};

/// The poller's tokens.
const WAKE: u64 = 0;
const TUN: u64 = 1;
const SOCK: u64 = 2;

/// Everything the engine is started with.
pub(super) struct Start {
    pub shared: Arc<Shared>,
    pub binding: Binding,
    pub sock: Arc<UdpSocket>,
    pub wakeup: Arc<Wakeup>,
    pub poller: Poller,
    /// The address the TUN device was created with: the device's, not the session's.
    pub tun_ip: Option<(Ipv4Addr, Option<Ipv6Addr>)>,
    pub tun_mtu: u16,
    pub path: Arc<PathMtu>,
    pub acks: mpsc::Sender<Ack>,
    pub hints: mpsc::Sender<Hint>,
}

pub(super) struct Engine {
    shared: Arc<Shared>,
    binding: Binding,
    sock: Arc<UdpSocket>,
    wakeup: Arc<Wakeup>,
    poller: Poller,
    tun_ip: Option<(Ipv4Addr, Option<Ipv6Addr>)>,
    path: Arc<PathMtu>,
    acks: mpsc::Sender<Ack>,
    hints: mpsc::Sender<Hint>,
    stop: watch::Receiver<bool>,
    devices: watch::Receiver<Option<(u64, Arc<SyncDevice>)>>,
    path_changes: watch::Receiver<u16>,
    /// The device in use and its generation; `None` while a lost one is being re-created.
    tun: Option<Arc<SyncDevice>>,
    generation: u64,
    /// Reading the TUN device (not readable while it is being re-created) and the socket.
    tun_side: Side,
    sock_side: Side,
    // The send side.
    reader: TunReader,
    lens: [usize; tunnel::READ_SLOTS],
    gso: bool,
    keepalive_buf: [u8; wire::OVERHEAD],
    too_big: TooBig,
    last_sent: Instant,
    no_session: ErrorBackoff,
    send_log: IoLog,
    read_log: IoLog,
    // The receive side.
    buf: Vec<u8>,
    writer: TunWriter,
    nudges: RateLimit,
    recv_log: IoLog,
    write_log: IoLog,
    /// Yields the CPU once per exchange after a quiet spell, before the sleep that follows its
    /// lone reply written into the TUN device.
    handoff: Handoff,
}

impl Engine {
    /// Registers the wake-up and the socket with the poller (the device follows in the first
    /// turn). Allocates every buffer the engine uses.
    pub(super) fn new(s: Start) -> io::Result<Self> {
        s.poller.add(&*s.wakeup, WAKE)?;
        s.poller.add(&*s.sock, SOCK)?;
        let reader = TunReader::new(s.path.inner().max(s.tun_mtu));
        s.shared.reader_room.send_replace(reader.capacity());
        let mut path_changes = s.path.changes();
        path_changes.mark_unchanged();
        Ok(Self {
            stop: s.shared.stop.subscribe(),
            devices: s.shared.device.subscribe(),
            path_changes,
            tun: None,
            generation: 0,
            // Readable once `control` has adopted the first device.
            tun_side: {
                let mut side = Side::new(Duration::from_millis(10), Duration::from_secs(1));
                side.set_ready(false);
                side
            },
            sock_side: Side::new(Duration::from_millis(10), Duration::from_secs(1)),
            reader,
            lens: [0; tunnel::READ_SLOTS],
            gso: true,
            keepalive_buf: [0; wire::OVERHEAD],
            too_big: TooBig::new(),
            last_sent: Instant::now(),
            no_session: ErrorBackoff::new(NO_SESSION_BACKOFF.0, NO_SESSION_BACKOFF.1),
            send_log: IoLog::new("sending to the gateway"),
            read_log: IoLog::new("reading from the TUN device"),
            // One receive may hold many coalesced datagrams (UDP GRO), up to 64 KiB.
            buf: vec![0u8; 65535],
            // Replaced for each device (`adopt`), which it needs to know.
            writer: TunWriter::with_offload(false, false),
            nudges: RateLimit::every(s.shared.cfg.nudge_min_interval),
            recv_log: IoLog::new("receiving from the gateway"),
            write_log: IoLog::new("writing to the TUN device"),
            handoff: Handoff::default(),
            shared: s.shared,
            binding: s.binding,
            sock: s.sock,
            wakeup: s.wakeup,
            poller: s.poller,
            tun_ip: s.tun_ip,
            path: s.path,
            acks: s.acks,
            hints: s.hints,
        })
    }

    /// Runs until a stop.
    pub(super) fn run(mut self) {
        let c = self.shared.counters.clone();
        bump(&c.tx_loop_starts);
        bump(&c.rx_loop_starts);
        // The first turn looks at everything: the device, and a session swapped in before the
        // engine ran (its announce).
        let mut control = true;
        let mut errors = false;
        loop {
            if control && !self.control() {
                return;
            }
            if errors {
                errors = self.read_errors();
            }
            let now = Instant::now();
            for _ in 0..TURN {
                if !self.tun_side.go(now) {
                    break;
                }
                self.send_batch(now);
            }
            for _ in 0..TURN {
                if !self.sock_side.go(now) {
                    break;
                }
                self.receive_batch(now);
            }
            if now >= self.last_sent + self.shared.cfg.keepalive {
                self.keepalive(false);
            }
            let timeout = self.timeout(errors);
            self.handoff.yield_before(timeout);
            control = false;
            for r in self.poller.next(timeout) {
                match r.token {
                    WAKE => control = true,
                    TUN => self.tun_side.set_ready(true),
                    _ => {
                        errors |= r.error();
                        if r.input() {
                            self.sock_side.set_ready(true);
                        }
                    }
                }
            }
            if control {
                self.wakeup.take();
            }
        }
    }

    /// How long the next wait may sleep: not at all while a side has data left (or the error
    /// queue has more), else until the keepalive is due or a resting side may go on.
    fn timeout(&self, errors: bool) -> Duration {
        let keepalive = self.last_sent + self.shared.cfg.keepalive;
        wait_for(errors, [&self.tun_side, &self.sock_side], keepalive)
    }

    /// Acts on what the wake-up announced (relayed by `ring_bells`, or rung by the swap hook):
    /// a stop (returns false), a re-created device, a larger path, a new session.
    fn control(&mut self) -> bool {
        if stopped(&self.stop) || self.devices.has_changed().is_err() {
            return false;
        }
        let newer = self.devices.borrow_and_update().clone().filter(|(g, _)| *g > self.generation);
        if let Some((g, device)) = newer {
            self.adopt(g, device);
        }
        // A larger path: room in the read slots before the TUN MTU grows (see
        // `follow_path_mtu`).
        if self.path_changes.has_changed().unwrap_or(false) {
            self.reader.fit(*self.path_changes.borrow_and_update());
            self.shared.reader_room.send_replace(self.reader.capacity());
        }
        if self.shared.announce.swap(false, Ordering::AcqRel) {
            self.keepalive(true);
        }
        true
    }

    /// Takes `device` (generation `g`) into use: the first, or one re-created after a loss.
    fn adopt(&mut self, g: u64, device: Arc<SyncDevice>) {
        if let Some(old) = self.tun.take() {
            let _ = self.poller.remove(&*old);
        }
        if let Err(e) = self.poller.add(&*device, TUN) {
            // Cannot happen for a device just opened; said rather than assumed. Its packets are
            // then read whenever the socket or a timer wakes the engine.
            tracing::error!(target: TARGET, "cannot watch the TUN device for packets: {e}");
        }
        self.writer = TunWriter::new(&device, self.shared.cfg.coalesce_writes);
        self.tun = Some(device);
        self.generation = g;
        // Whatever it queued before the registration.
        self.tun_side.set_ready(true);
    }

    /// The device was found gone (EBADFD): the keeper re-creates it and `control` takes the new
    /// one. The incident is the keeper's log line.
    fn device_lost(&mut self) {
        self.shared.counters.count_drop(DropReason::TunError);
        self.shared.lost.send_replace(self.generation);
        if let Some(old) = self.tun.take() {
            let _ = self.poller.remove(&*old);
        }
        self.tun_side.set_ready(false);
    }

    /// Reads the socket's error queue, passing path MTU hints to the prober; whether more is
    /// left (the read stopped at its bound).
    fn read_errors(&mut self) -> bool {
        let hints = &self.hints;
        let n = tunnel::read_mtu_errors(&*self.sock, |dest, mtu| {
            // A full queue: the prober is behind, and the next hint says the same.
            let _ = hints.try_send(Hint { dest, mtu });
        });
        n >= tunnel::MAX_ERRORS_PER_READ
    }

    /// TUN -> gateway: one batch read, sealed and sent (`now`: the turn's start).
    fn send_batch(&mut self, now: Instant) {
        let c = &*self.shared.counters;
        let Some(tun) = &self.tun else {
            self.tun_side.set_ready(false);
            return;
        };
        let n = match self.tun_side.read(self.reader.try_read(tun)) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) if device_gone(&e) => return self.device_lost(),
            Err(e) => {
                c.count_drop(DropReason::TunError);
                self.read_log.failed(&e);
                self.tun_side.failed();
                return;
            }
        };
        self.handoff.moved(n, now);
        // One snapshot for the whole batch.
        let Some(auth) = (self.binding.get_auth)() else {
            c.count_drops(DropReason::NoSession, n);
            self.tun_side.rest_for(self.no_session.failed());
            return;
        };
        self.no_session.reset();
        // The next reads leave a TSO packet's checksums partial if this gateway takes them.
        self.reader.checksums(if auth.partial_checksums { Checksums::Partial } else { Checksums::Complete });
        let crypto = auth.crypto();
        let mtu = self.path.inner();
        for (i, sealed_len) in self.lens.iter_mut().enumerate().take(n) {
            *sealed_len = 0;
            // Neither IP, nor the host's own link-scope chatter, nor a family this session has
            // no address in (IPv6 with a gateway that has none) goes to the gateway; what is
            // spoofed is the gateway's call (it drops and counts it).
            let Some(family) = InnerPacket::parse(self.reader.packet(i))
                .filter(|p| !p.is_link_chatter() && auth.carries(p.family()))
                .map(|p| p.family())
            else {
                c.count_drop(DropReason::NotCarried);
                continue;
            };
            let len = self.reader.len(i);
            if len > usize::from(mtu) {
                // Answered from the gateway's tunnel address: the tunnel's far end is what is
                // too small, and an address of this host would be dropped by its own kernel as
                // martian.
                let from = match family {
                    IpFamily::V6 => auth.gateway_ip6.map(IpAddr::V6),
                    IpFamily::V4 => Some(IpAddr::V4(auth.gateway_ip)),
                };
                match from {
                    Some(from) => self.too_big.send(tun, self.reader.packet(i), mtu, from, c),
                    None => c.count_drop(DropReason::TooBig),
                }
                continue;
            }
            let Some(partial) = self.reader.seal_flag(i, auth.partial_checksums) else {
                c.count_drop(DropReason::Malformed);
                continue;
            };
            let sealed = crypto.tx.next().and_then(|counter| {
                let slot = self.reader.slot(i);
                crypto.cipher.seal_data_with(Direction::ClientToGateway, auth.session_id, counter, slot, len, partial)
            });
            match sealed {
                Ok(d) => *sealed_len = d,
                Err(e) => c.count_drop(seal_drop(e)),
            }
        }
        let dest = SocketAddr::from((gateway_of(&auth, &self.shared.cfg), auth.data_port));
        let sent = self.reader.send(&*self.sock, &mut self.gso, 0, &self.lens[..n], dest, Unreachable::Settle);
        Counters::add(&c.tx_packets, sent.datagrams);
        Counters::add(&c.tx_bytes, sent.inner_bytes);
        c.count_drops(DropReason::SocketError, sent.failed);
        match &sent.error {
            // An ICMP "too big" reported once more through a send (IP_RECVERR sets the socket's
            // error until the error queue is read): the path's size changing is the prober's
            // news, not a failing socket. Still counted.
            Some(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
            Some(e) => self.send_log.failed(e),
            None => self.send_log.ok(),
        }
        self.last_sent = Instant::now();
    }

    /// Gateway -> TUN: one (possibly coalesced) receive, opened and written. Datagrams are taken
    /// from any source: authenticity comes from the AEAD, and a multi-homed gateway may answer
    /// from another address than the one we send to. `now`: the turn's start.
    fn receive_batch(&mut self, now: Instant) {
        let c = &*self.shared.counters;
        let (len, segment) = match self.sock_side.read(tunnel::recv_gro(&*self.sock, &mut self.buf)) {
            Ok(Some((n, segment, _from))) => (n, segment),
            Ok(None) => return,
            // An ICMP error one of our sends drew, reported once more through the receive call
            // (IP_RECVERR sets the socket's error): nothing was received, so nothing was lost.
            // A path MTU error is the prober's, from the error queue.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) || tunnel::reported_for_earlier(&e) => return,
            Err(e) => {
                c.count_drop(DropReason::SocketError);
                self.recv_log.failed(&e);
                self.sock_side.failed();
                return;
            }
        };
        // One snapshot for the whole batch.
        let auth = (self.binding.get_auth)();
        let mut gone = false;
        for datagram in self.buf[..len].chunks_mut(segment) {
            let Ok(header) = wire::parse_header(datagram) else {
                c.count_drop(DropReason::Malformed);
                continue;
            };
            let Some(auth) = auth.as_deref() else {
                c.count_drop(DropReason::NoSession);
                continue;
            };
            if header.session_id != auth.session_id {
                c.count_drop(DropReason::WrongSession);
                continue;
            }
            if header.msg_type == MsgType::UnknownSession {
                // Unauthenticated by nature: only ever a reason to ask the supervisor to check.
                bump(&c.notices_rx);
                if self.nudges.allow(Instant::now()) && self.binding.commands.try_send(Command::Nudge).is_ok() {
                    bump(&c.nudges);
                }
                continue;
            }
            let opened = match auth.crypto().open(Direction::GatewayToClient, datagram) {
                Ok(o) => o,
                Err(e) => {
                    c.count_drop(DropReason::of_open(e));
                    continue;
                }
            };
            match opened.kind {
                SealedKind::Keepalive => bump(&c.keepalives_rx),
                // Clients never receive probes; the gateway never sends one.
                SealedKind::Probe => c.count_drop(DropReason::Malformed),
                SealedKind::ProbeAck => match ProbeAckBody::parse(&datagram[opened.payload]) {
                    // A full queue: the prober is behind, and a probe it waits for counts as
                    // lost, which a search tolerates.
                    Ok(body) => {
                        let _ = self.acks.try_send(Ack { body, len: datagram.len() });
                    }
                    Err(_) => c.count_drop(DropReason::Malformed),
                },
                SealedKind::Data if opened.payload.is_empty() => c.count_drop(DropReason::Malformed),
                // Being re-created: nowhere to write it.
                SealedKind::Data if self.tun.is_none() => c.count_drop(DropReason::TunError),
                SealedKind::Data => {
                    if self.writer.is_full() {
                        gone |= write_tun(
                            &mut self.writer,
                            self.tun.as_deref(),
                            c,
                            &mut self.write_log,
                            &mut self.handoff,
                            now,
                        );
                    }
                    // Cannot fail (room was made above, and a payload is shorter than 64 KiB);
                    // counted rather than assumed.
                    if self.writer.push(&datagram[opened.payload], opened.csum_partial).is_err() {
                        c.count_drop(DropReason::Malformed);
                    }
                }
            }
        }
        gone |= write_tun(&mut self.writer, self.tun.as_deref(), c, &mut self.write_log, &mut self.handoff, now);
        if gone {
            self.device_lost();
        }
    }

    /// A keepalive: on a new snapshot (`announce`), or after `keepalive` without sending.
    fn keepalive(&mut self, announce: bool) {
        let c = &*self.shared.counters;
        self.last_sent = Instant::now();
        let Some(auth) = (self.binding.get_auth)() else { return };
        let cfg = &self.shared.cfg;
        if announce {
            tracing::info!(
                target: TARGET,
                "data plane on session {} (gateway {}:{}); {}",
                auth.session_id,
                gateway_of(&auth, cfg),
                auth.data_port,
                c.stats()
            );
            if self.tun_ip.is_some_and(|ip| ip != (auth.assigned_ip, auth.assigned_ip6)) {
                // The spec promises a stable address per client, so the device is never
                // readdressed; say so once per session rather than fail silently.
                tracing::warn!(
                    target: TARGET,
                    "the gateway assigned {} but the tunnel keeps {}: traffic from the new address will be refused",
                    auth.assigned_ip,
                    self.tun_ip
                        .map(|(ip, ip6)| match ip6 {
                            Some(ip6) => format!("{ip} and {ip6}"),
                            None => ip.to_string(),
                        })
                        .unwrap_or_default()
                );
            }
        }
        if send_keepalive(&auth, gateway_of(&auth, cfg), &self.sock, &mut self.keepalive_buf, c) {
            self.send_log.ok();
        } else {
            self.send_log.failed_silently();
        }
    }
}

/// Writes the queued inner packets to the TUN device, counting them (and telling `handoff` what
/// was written at `now`); whether the device was found gone (the caller reports it to the keeper).
fn write_tun(
    writer: &mut TunWriter,
    tun: Option<&SyncDevice>,
    c: &Counters,
    log: &mut IoLog,
    handoff: &mut Handoff,
    now: Instant,
) -> bool {
    let Some(tun) = tun else { return false };
    match writer.flush(tun, c) {
        Ok(0) => false,
        Ok(n) => {
            handoff.wrote(n, now);
            log.ok();
            false
        }
        Err(e) if device_gone(&e) => true,
        Err(e) => {
            c.count_drop(DropReason::TunError);
            log.failed(&e);
            false
        }
    }
}

/// Sends one keepalive for `auth`'s session; returns whether the send succeeded.
fn send_keepalive(auth: &VpnAuthResponse, gateway: IpAddr, sock: &UdpSocket, buf: &mut [u8], c: &Counters) -> bool {
    let crypto = auth.crypto();
    let counter = match crypto.tx.next() {
        Ok(n) => n,
        Err(_) => {
            c.count_drop(DropReason::CounterExhausted);
            return false;
        }
    };
    let n = match crypto.cipher.seal_keepalive(Direction::ClientToGateway, auth.session_id, counter, buf) {
        Ok(n) => n,
        Err(e) => {
            c.count_drop(seal_drop(e));
            return false;
        }
    };
    match tunnel::send_to_now(sock, &buf[..n], SocketAddr::from((gateway, auth.data_port))) {
        Ok(_) => {
            bump(&c.keepalives_tx);
            true
        }
        Err(_) => {
            c.count_drop(DropReason::SocketError);
            false
        }
    }
}
