//! The client's path MTU prober: the shell around [`crate::sansio::pmtud`] for both directions
//! of the path to the gateway. One task per data plane, started with the loops, once.
//!
//! - **Up** (client to gateway): probes padded to the size under test; the gateway answers
//!   each with a minimal ack that says how long the probe was when it arrived. The result is
//!   the discovered bound of [`PathMtu`], which the engine reads per batch: a packet that no
//!   longer fits is answered "too big" into the TUN, so the inner TCP lowers its segment size
//!   within a round trip.
//! - **Down** (gateway to client): minimal probes asking for acks padded to the size under
//!   test. Every probe carries the size confirmed this way (`down_ok`), which the gateway keeps
//!   per session and sizes its packets to this client by; a change is sent at once.
//! - **Hints**: the socket has `IP_RECVERR`; an ICMP "fragmentation needed"/"packet too big"
//!   for a datagram to the gateway (read from the error queue by the engine, which waits on the
//!   socket) lowers the up size at once. (Our own link's size is the
//!   underlay watcher's: the search's max follows [`PathMtu::link`].)
//!
//! Sizes inside the search are outer packet sizes (IP and UDP headers included), like
//! [`PathMtu`]'s. Probes are rare (one per round trip while searching, one per
//! [`crate::sansio::pmtud::DEFAULT_CONFIRM_INTERVAL`] otherwise), so the buffer is allocated
//! once and nothing here is on the per-packet path. Logged: one line per change of the path's
//! size, nothing per probe.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use std::net::UdpSocket;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::path_mtu::PathMtu;
use crate::sansio::pmtud::{PmtudConfig, Search};
use crate::sansio::seal::Direction;
use crate::sansio::wire::{self, ProbeAckBody, ProbeBody, ProbeKind};
use crate::snapshot::GetAuth;
use crate::tunnel::stop_requested;

const TARGET: &str = "holdfast::pmtu";

/// An authenticated probe ack, as the engine hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub body: ProbeAckBody,
    /// The ack datagram's length as it arrived (UDP payload bytes).
    pub len: usize,
}

/// How many acks may wait for the prober (it has at most two probes in flight; more are
/// stale or duplicated and may be dropped).
pub const ACK_QUEUE: usize = 8;

/// A path MTU error from the socket's error queue (see [`crate::tunnel::read_mtu_errors`]),
/// as the engine reads it: the datagram's destination and the MTU of the hop that refused it.
#[derive(Debug, Clone, Copy)]
pub struct Hint {
    pub dest: SocketAddr,
    pub mtu: u16,
}

/// How many hints may wait for the prober (a burst of ICMP says the same thing many times).
pub const HINT_QUEUE: usize = 16;

/// What the prober needs.
pub struct Prober {
    pub sock: Arc<UdpSocket>,
    pub get_auth: GetAuth,
    /// The configured gateway; datagrams go to the snapshot's ([`crate::snapshot::VpnAuthResponse::gateway_ip_or`]).
    pub gateway: IpAddr,
    pub path: Arc<PathMtu>,
    pub acks: mpsc::Receiver<Ack>,
    pub hints: mpsc::Receiver<Hint>,
    pub stop: watch::Receiver<bool>,
    /// RFC 8899's PMTU_RAISE_TIMER (`[network] pmtu_raise`).
    pub raise_interval: Duration,
}

impl Prober {
    /// Runs until a stop.
    pub async fn run(mut self) {
        // Wakes the loop when the path goes to another gateway (a failover): what was found on
        // the old path is no bound on the new one, which is searched from scratch. Subscribed
        // before the first search reads the path, so no change falls in between.
        let mut gateways = self.path.gateway_changes();
        gateways.mark_unchanged();
        let mut s = PathSearch::new(&self.path, self.raise_interval);
        let mut buf = vec![0u8; wire::MAX_PROBE_LEN];
        let mut next_id = 0u32;
        let mut announce_down = false;
        // Wakes the loop when the usable size changes, a change of the link among them (the
        // underlay watcher's `set_link`): the searches then follow the new max at once.
        let mut changes = self.path.changes();
        loop {
            let now = Instant::now().into_std();
            // The link's MTU followed at run time (the underlay watcher): search below it.
            if self.path.link() != s.link {
                s.link = self.path.link();
                s.up.set_max(s.link, now);
                s.down.set_max(s.link, now);
            }
            let sends = [
                (ProbeKind::Up, s.up.poll_probe(now)),
                (ProbeKind::Down, s.down.poll_probe(now)),
                // A new down size is told to the gateway at once, not at the next probe.
                (ProbeKind::Up, announce_down.then_some(s.up.config().base)),
            ];
            announce_down = false;
            for (kind, size) in sends {
                if let Some(size) = size {
                    next_id = next_id.wrapping_add(1);
                    self.send(kind, size, s.hdr, next_id, s.down_ok, &mut buf).await;
                }
            }
            let wake = match (s.up.next_wakeup(), s.down.next_wakeup()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wake = wake.map(Instant::from_std);
            tokio::select! {
                biased;
                _ = stop_requested(&mut self.stop) => return,
                r = gateways.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let gateway = *gateways.borrow_and_update();
                    s = PathSearch::new(&self.path, self.raise_interval);
                    tracing::info!(
                        target: TARGET,
                        "path MTU: a new path, to {gateway}: searching it from the link's {}",
                        s.link
                    );
                }
                ack = self.acks.recv() => {
                    let Some(ack) = ack else { return };
                    let now = Instant::now().into_std();
                    match ack.body.kind {
                        ProbeKind::Up => { s.up.on_ack(ack.body.probe_len.saturating_add(s.hdr), now); }
                        ProbeKind::Down => {
                            let len = u16::try_from(ack.len).unwrap_or(u16::MAX);
                            s.down.on_ack(len.saturating_add(s.hdr), now);
                        }
                    }
                }
                hint = self.hints.recv() => {
                    let Some(hint) = hint else { return };
                    let now = Instant::now().into_std();
                    // Only what concerns the path to the gateway; the hint is validated by the
                    // search (never below the base, never a raise).
                    let gateway = (self.get_auth)().map(|a| a.gateway_ip_or(self.gateway));
                    if gateway.is_some_and(|g| same_host(hint.dest.ip(), g)) {
                        s.up.on_too_big(hint.mtu, now);
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = sleep_until(wake) => {}
            }
            self.publish(&s.up);
            // The size in use, not only a bound below the link: the gateway does not know our
            // link (it may be `underlay_mtu` or a small access link), so it is told always.
            let ok = s.down.current().saturating_sub(s.hdr);
            if ok != s.down_ok {
                s.down_ok = ok;
                announce_down = true;
            }
            if s.down.bound() != s.down_bound {
                s.down_bound = s.down.bound();
                match s.down_bound {
                    Some(b) => {
                        tracing::info!(target: TARGET, "path MTU from the gateway: {b} (a smaller hop on the way)")
                    }
                    None => {
                        tracing::info!(target: TARGET, "path MTU from the gateway: the link's {} again", self.path.link())
                    }
                }
            }
        }
    }

    /// Writes the up result into the shared path MTU; one log line when it changes.
    fn publish(&self, up: &Search) {
        if self.path.discovered() == up.bound() {
            return;
        }
        self.path.set_discovered(up.bound());
        match up.bound() {
            Some(b) => tracing::info!(
                target: TARGET,
                "path MTU to the gateway: {b} (a smaller hop on the way; inner MTU {})",
                self.path.inner()
            ),
            None => tracing::info!(
                target: TARGET,
                "path MTU to the gateway: the link's {} again (inner MTU {})",
                self.path.link(),
                self.path.inner()
            ),
        }
    }

    /// Seals and sends one probe: `size` is the outer size under test (up: this datagram's,
    /// down: the ack's). A failure is a lost probe, which the search counts as such.
    async fn send(&self, kind: ProbeKind, size: u16, hdr: u16, id: u32, down_ok: u16, buf: &mut [u8]) {
        let Some(auth) = (self.get_auth)() else { return };
        let datagram = usize::from(size.saturating_sub(hdr)).clamp(wire::MIN_PROBE_LEN, buf.len());
        let (len, ack_len) = match kind {
            ProbeKind::Up => (datagram, 0),
            // Fits u16: at most MAX_PROBE_LEN.
            ProbeKind::Down => (wire::MIN_PROBE_LEN, datagram as u16),
        };
        let body = ProbeBody { id, kind, ack_len, down_ok };
        let payload = len - wire::OVERHEAD;
        if body.write(&mut buf[wire::HEADER_LEN..wire::HEADER_LEN + payload]).is_err() {
            return;
        }
        let crypto = auth.crypto();
        let sealed = crypto.tx.next().and_then(|counter| {
            crypto.cipher.seal_probe(Direction::ClientToGateway, false, auth.session_id, counter, buf, payload)
        });
        let Ok(n) = sealed else { return };
        let dest = SocketAddr::from((auth.gateway_ip_or(self.gateway), auth.data_port));
        if let Err(e) = crate::tunnel::send_to_now(&*self.sock, &buf[..n], dest) {
            // EMSGSIZE: larger than the local link, which just shrank: the search's max follows
            // it at the next wake-up; the probe counts as lost meanwhile.
            tracing::trace!(target: TARGET, "probe of {size} not sent: {e}");
        }
    }
}

/// The search state of one path (to one gateway), both directions: started afresh for each
/// new path, since nothing learnt on another path holds on it.
struct PathSearch {
    /// The underlay's IP and UDP header bytes (the gateway's family).
    hdr: u16,
    /// The link's MTU the searches' max follows.
    link: u16,
    up: Search,
    down: Search,
    /// The gateway-to-client size confirmed (UDP payload bytes), told to the gateway in every
    /// probe.
    down_ok: u16,
    /// The down search's bound last logged.
    down_bound: Option<u16>,
}

impl PathSearch {
    fn new(path: &PathMtu, raise_interval: Duration) -> Self {
        let hdr = wire::underlay_headers(path.underlay());
        let link = path.link();
        let cfg = PmtudConfig { raise_interval, ..PmtudConfig::new(link) };
        Self {
            hdr,
            link,
            up: Search::new(cfg),
            down: Search::new(cfg),
            down_ok: link.saturating_sub(hdr),
            down_bound: None,
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Whether two addresses name the same host: an IPv4 gateway reached through a dual-stack socket
/// is named as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) in the socket's error queue.
fn same_host(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_mapped_address_names_the_ipv4_gateway() {
        let v4: IpAddr = "198.18.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.0.2".parse().unwrap();
        assert!(same_host(mapped, v4) && same_host(v4, mapped) && same_host(v4, v4));
        assert!(!same_host("::ffff:198.18.0.3".parse().unwrap(), v4));
        assert!(!same_host("2001:db8::2".parse().unwrap(), v4));
    }
}
