//! How the data plane's engines wait: each side (client, gateway) runs its hot path as one loop
//! on an OS thread of its own (`hf-client-pkts`, `hf-gw-pkts`), blocked in an `epoll_wait` of
//! its own ([`Poller`]) on its TUN device, its UDP socket and a [`Wakeup`] for control events.
//! Nothing on that thread awaits; what waits for time or for other parts (device re-creation,
//! path MTU following, the prober, the supervisor) stays on the main tokio runtime and talks to
//! the engine through the wake-up and shared state.
//!
//! Why (measured on a 2-vCPU machine with `benches/hops.sh`, the ping ratio against boringtun,
//! and `benches/throughput.sh`):
//! - On tokio's multi-threaded runtime a packet's arrival woke one worker while another was woken
//!   to look for work: one thread of the data plane's own was 6.4-6.6 against 6.1-6.2 Gbit/s and a
//!   ping of 0.26 against 0.30 ms.
//! - That thread was a current-thread tokio runtime until 2026-11-30; on it a lone packet went
//!   through the reactor's event dispatch, the waker, the scheduler and the timer wheel before a
//!   loop saw it. The engines on their own `epoll_wait` brought the ping ratio from 1.44-1.55x to
//!   1.24-1.31x, and the CPU per GB down by a few per cent (with [`TURN`]).
//! - One thread per direction was worse than one for both: each direction also writes to the
//!   other's descriptor, and every batch then woke the other thread.
//!
//! The cost: one core's worth of packet work per process (see the README's known limits).

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use crate::tunnel::{ErrorBackoff, RateLimit};

const TARGET: &str = "holdfast::dataplane";

/// How long an engine pauses before its next wait when one failed (it cannot, short of a bug):
/// no spinning, and the tunnel carries on once it works again.
const POLL_RETRY: Duration = Duration::from_millis(100);

/// A thread's own `epoll` set: what the client's engine waits on instead of a tokio reactor (its
/// TUN device, its socket and a [`Wakeup`] for control events).
///
/// Why not tokio for that thread: a packet there went through tokio's driver (the reactor's
/// event dispatch, the waker, the scheduler, the timer wheel's check) before the loop saw it.
/// Measured with `benches/hops.sh` (the ping ratio against boringtun): a minimal loop on a bare
/// `epoll_wait` at 1.16-1.18x, the same loop as a tokio task at 1.29-1.37x. Edge-triggered: the
/// engine reads until `WouldBlock` and remembers what is still readable, so one side's burst
/// never holds the other.
#[derive(Debug)]
pub struct Poller {
    epoll: std::os::fd::OwnedFd,
    events: Vec<libc::epoll_event>,
    /// The log line of a failing wait ([`Poller::next`]), at most once a minute.
    failures: RateLimit,
}

/// What one registered descriptor reported: its token and the `EPOLL*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub token: u64,
    pub events: u32,
}

impl Ready {
    /// Data to read (not only an error condition).
    pub fn input(&self) -> bool {
        self.events & libc::EPOLLIN as u32 != 0
    }

    /// An error condition (a socket's error queue has entries, a TUN device was deleted).
    pub fn error(&self) -> bool {
        self.events & libc::EPOLLERR as u32 != 0
    }
}

impl Poller {
    /// At most this many descriptors report per wait (the engine has three).
    const EVENTS: usize = 8;

    pub fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: epoll_create1 has no memory preconditions; a non-negative result is a new fd
        // we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nothing else owns.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; Self::EVENTS],
            failures: RateLimit::every(Duration::from_secs(60)),
        })
    }

    /// Watches `fd` for reading (edge-triggered), reported with `token`.
    pub fn add(&self, fd: &impl std::os::fd::AsRawFd, token: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: token };
        // SAFETY: both descriptors are valid; `ev` is alive for the call.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Stops watching `fd` (closing it does too, once no other descriptor shares its file).
    pub fn remove(&self, fd: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd.as_raw_fd(), &mut ev) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Waits up to `timeout` (`None`: until something is ready; rounded up to whole
    /// milliseconds, so a deadline is never woken for early) and returns what is ready. An
    /// interrupted wait returns nothing.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<impl Iterator<Item = Ready> + '_> {
        let n = self.epoll_wait(timeout)?;
        Ok(self.events[..n].iter().map(ready))
    }

    /// [`Poller::wait`] for an engine, which survives everything: a failed wait (it cannot
    /// fail, short of a bug) is logged at most once a minute and returns nothing after a pause
    /// of `POLL_RETRY`, so the engine neither spins nor stops.
    pub fn next(&mut self, timeout: Duration) -> impl Iterator<Item = Ready> + '_ {
        let n = self.epoll_wait(Some(timeout)).unwrap_or_else(|e| {
            if self.failures.allow(Instant::now()) {
                tracing::error!(target: TARGET, "the data plane cannot wait for packets: {e}; retrying");
            }
            std::thread::sleep(POLL_RETRY);
            0
        });
        self.events[..n].iter().map(ready)
    }

    /// How many entries of `events` the kernel filled.
    fn epoll_wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let ms = match timeout {
            None => -1,
            // In u64 (a u128 division is a library call, here on every wait).
            Some(t) => {
                let ms =
                    t.as_secs().saturating_mul(1000).saturating_add(u64::from(t.subsec_nanos().div_ceil(1_000_000)));
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `events` holds `EVENTS` entries the kernel may write; the epoll fd is valid.
        let n = unsafe {
            libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), Self::EVENTS as libc::c_int, ms)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) }
    }
}

/// One [`Poller`] entry as a [`Ready`].
fn ready(ev: &libc::epoll_event) -> Ready {
    // Copied out: the kernel's struct is packed.
    let (token, events) = (ev.u64, ev.events);
    Ready { token, events }
}

/// An `eventfd` that wakes a [`Poller`] from any thread: an engine's bell for control events.
/// Ringing it twice before the engine looks wakes it once.
#[derive(Debug)]
pub struct Wakeup {
    fd: std::os::fd::OwnedFd,
}

impl Wakeup {
    pub fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd has no memory preconditions; a non-negative result is ours.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Self { fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) } })
    }

    /// Wakes the poller the eventfd is registered with. Never blocks (a counter at its
    /// maximum is already a pending wake-up).
    pub fn ring(&self) {
        use std::os::fd::AsRawFd;
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Takes the rings so far (the next wait sleeps unless rung again); whether there were any.
    pub fn take(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut n: u64 = 0;
        // SAFETY: an 8-byte read into a live u64 from our eventfd.
        let rc = unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        rc == 8 && n > 0
    }
}

impl std::os::fd::AsRawFd for Wakeup {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// One side of an engine (its TUN device, its socket): whether it is known readable, and its
/// rest after failing IO. Registration is edge-triggered, so a side stays readable until a read
/// says `WouldBlock`; a failing side rests (see [`ErrorBackoff`]), the engine reads it again only
/// once the rest is over, and its wait ends then at the latest ([`wait_for`]).
#[derive(Debug, Clone)]
pub struct Side {
    ready: bool,
    rest: Option<Instant>,
    errors: ErrorBackoff,
}

impl Side {
    /// Readable at first (whatever was queued before the registration), resting after failures
    /// from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { ready: true, rest: None, errors: ErrorBackoff::new(min, max) }
    }

    /// The poller reported the side readable (`true`), or it has nothing to read from (`false`:
    /// a device being re-created).
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    /// Whether to read the side at `now`: known readable and not resting (a rest that is over
    /// ends here).
    pub fn go(&mut self, now: Instant) -> bool {
        if self.rest.is_some_and(|t| now < t) {
            return false;
        }
        self.rest = None;
        self.ready
    }

    /// A read's outcome: its value (the failure streak ends), `None` for `WouldBlock` (the side
    /// is then not readable until the poller says so), or the error, for the caller to count and
    /// then to call [`Side::failed`] unless it is no failure of the side.
    pub fn read<T>(&mut self, r: io::Result<T>) -> io::Result<Option<T>> {
        match r {
            Ok(v) => {
                self.errors.reset();
                Ok(Some(v))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.ready = false;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A read failed: the side rests as its backoff says (not at all for the first few).
    pub fn failed(&mut self) {
        let d = self.errors.failed();
        self.rest_for(d);
    }

    /// Rests for `d` from now, on another account than a failed read (zero: no rest).
    pub fn rest_for(&mut self, d: Duration) {
        self.rest = (!d.is_zero()).then(|| Instant::now() + d);
    }
}

/// How many reads one side of an engine (its socket, its TUN device) makes per turn, at most,
/// before the other side's: a side is read until `WouldBlock` or this. One read per side and
/// turn cost 8-15 % more CPU per GB (`/tmp`-measured with iperf3, both ways): a receive's
/// inner packets make the kernel queue TCP ACKs on the TUN device, and the TUN side then read
/// them one per batch, sent one datagram each, and woke the peer for each. As a tokio task ran
/// until its descriptor said `WouldBlock` (up to its budget of 128), a burst of receives now
/// makes one batch of ACKs. Small enough that one side's flood holds the other for well under a
/// millisecond.
pub const TURN: usize = 16;

/// Whether the client's engine yields its CPU before it sleeps: it does once per exchange that
/// begins after a quiet spell, before the sleep that follows the lone packet it writes into its
/// TUN device (the reply an application waits for: a ping's, a DNS answer, a keystroke's echo).
///
/// Why: a TUN write wakes the packet's reader on this CPU as a "sync" wake-up: the kernel expects
/// the writer to sleep soon and lets the reader wait for that. A `sched_yield` hands the CPU over
/// at once, and it changes which CPU the threads of the next round trip are woken on: with it the
/// application and the client's thread (and in the bench, on the same machine, the gateway's
/// thread) run one after the other on one CPU, each woken onto its waker's CPU and run at once,
/// with warm caches; without it a thread of the next round trip is often woken onto the other,
/// idle vCPU, which takes tens of microseconds to wake, and runs there cold. Measured with
/// `benches/ab.sh` and `benches/hops.sh`, see the README's "Ping": a ping 0.75-0.85x of the
/// build without it where the client shares its CPUs with the rest of the path (the bench's one
/// machine), and no change where the gateway runs on a CPU of its own.
///
/// Only the first exchange after [`Handoff::QUIET`] without any packet: a yield changes where
/// threads run, and an earlier rule that yielded after every lone packet in traffic without
/// batches yielded through a TCP connection's whole handshake and first exchanges, which left
/// uploads started right after it slower more often (README, "Ping, session 18"); a batch or a
/// second exchange soon after the first is traffic that has its own pace. In a transfer it costs
/// at most one system call at its start; in a stream of requests spaced wider than `QUIET`, one
/// per request.
///
/// A new one (`Handoff::default()`) has moved nothing yet: its first packet begins an exchange
/// after a quiet spell.
#[derive(Debug, Default)]
pub struct Handoff {
    /// Packets written into the TUN device since the last sleep.
    written: usize,
    /// When a packet last moved either way (`None`: not yet).
    last_moved: Option<Instant>,
    /// The current exchange began after a quiet spell, and has not yielded yet.
    fresh: bool,
}

impl Handoff {
    /// At most this many packets written since the last sleep make a lone packet.
    pub const LONE: usize = 1;
    /// How long without any packet makes the next one begin an exchange after a quiet spell.
    pub const QUIET: Duration = Duration::from_millis(10);

    /// `packets` were written into the TUN device at `now`.
    pub fn wrote(&mut self, packets: usize, now: Instant) {
        self.written = self.written.saturating_add(packets);
        self.moved(packets, now);
    }

    /// `packets` were moved at `now`, in either direction. The first after a quiet spell begins
    /// a fresh exchange; a batch (more than a lone packet) ends it.
    pub fn moved(&mut self, packets: usize, now: Instant) {
        if packets == 0 {
            return;
        }
        if self.last_moved.is_none_or(|t| now.saturating_duration_since(t) >= Self::QUIET) {
            self.fresh = true;
        }
        if packets > Self::LONE {
            self.fresh = false;
        }
        self.last_moved = Some(now);
    }

    /// Before a wait of `timeout`: whether to yield now (a sleep follows a lone packet written in
    /// a fresh exchange). A sleep starts the count of packets written again; a wait that does
    /// not sleep keeps it.
    pub fn before_wait(&mut self, timeout: Duration) -> bool {
        if timeout.is_zero() {
            return false;
        }
        let n = std::mem::take(&mut self.written);
        let handoff = (1..=Self::LONE).contains(&n) && self.fresh;
        if handoff {
            self.fresh = false;
        }
        handoff
    }

    /// [`Handoff::before_wait`], yielding the CPU when it says so.
    pub fn yield_before(&mut self, timeout: Duration) {
        if self.before_wait(timeout) {
            // SAFETY: no arguments; it cannot fail on Linux.
            unsafe { libc::sched_yield() };
        }
    }
}

/// How long an engine's next wait may sleep: not at all while a side is known readable and not
/// resting (or `more` says there is other work left), else until the first resting readable
/// side may go on or `deadline` (the engine's own timer), whichever is first.
pub fn wait_for(more: bool, sides: [&Side; 2], deadline: Instant) -> Duration {
    if more || sides.iter().any(|s| s.ready && s.rest.is_none()) {
        return Duration::ZERO;
    }
    let until = sides.iter().filter(|s| s.ready).filter_map(|s| s.rest).fold(deadline, |a, b| a.min(b));
    until.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poller_reports_a_wakeup_and_a_datagram_by_token_and_times_out_otherwise() {
        let mut p = Poller::new().unwrap();
        let w = Wakeup::new().unwrap();
        p.add(&w, 7).unwrap();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        p.add(&a, 9).unwrap();
        let t0 = std::time::Instant::now();
        assert!(p.wait(Some(std::time::Duration::from_millis(20))).unwrap().next().is_none());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(20), "never woken early");
        // Two rings from another thread: one wake-up, taken once.
        let ringer = std::thread::spawn(move || {
            w.ring();
            w.ring();
            w
        });
        let w = ringer.join().unwrap();
        let got: Vec<Ready> = p.wait(None).unwrap().collect();
        assert_eq!(got.iter().map(|r| r.token).collect::<Vec<_>>(), [7]);
        assert!(w.take() && !w.take(), "taken once");
        // Edge-triggered: a datagram reports once, not again while it stays unread.
        b.send(b"x").unwrap();
        let got: Vec<Ready> = p.wait(None).unwrap().collect();
        assert!(got.len() == 1 && got[0].token == 9 && got[0].input() && !got[0].error());
        assert!(p.wait(Some(std::time::Duration::ZERO)).unwrap().next().is_none(), "edge-triggered");
        p.remove(&a).unwrap();
        b.send(b"y").unwrap();
        assert!(p.next(std::time::Duration::ZERO).next().is_none(), "removed");
    }

    #[test]
    fn the_client_yields_once_per_exchange_that_begins_after_a_quiet_spell() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut h = Handoff::default();
        let (sleep, busy) = (ms(5), Duration::ZERO);
        assert!(!h.before_wait(sleep), "nothing written: no yield");
        h.wrote(0, t0);
        assert!(!h.before_wait(sleep), "an empty flush woke no reader");

        // A ping: the request read from the device, a sleep, the reply written, a sleep.
        h.moved(1, t0);
        assert!(!h.before_wait(sleep), "nothing written yet: the request alone does not yield");
        h.wrote(1, t0 + ms(1));
        assert!(!h.before_wait(busy), "work left: the wait does not sleep, so no yield");
        assert!(h.before_wait(sleep), "the sleep after the reply yields");
        assert!(!h.before_wait(sleep), "once: a sleep starts the count again");
        h.wrote(1, t0 + ms(2));
        assert!(!h.before_wait(sleep), "once per exchange: a second reply soon after does not");

        // The next ping, QUIET later: a fresh exchange again.
        let t1 = t0 + ms(2) + Handoff::QUIET;
        h.moved(1, t1);
        h.wrote(1, t1 + ms(1));
        assert!(h.before_wait(sleep), "an exchange after a quiet spell yields");

        // Packets closer together than QUIET never begin a fresh exchange.
        let mut t = t1 + ms(1);
        for _ in 0..20 {
            t += Handoff::QUIET - ms(1);
            h.moved(1, t);
            h.wrote(1, t);
            assert!(!h.before_wait(sleep), "no quiet spell before it");
        }

        // Two packets written before one sleep are a batch, not a lone packet.
        let t2 = t + Handoff::QUIET;
        h.moved(1, t2);
        h.wrote(1, t2);
        assert!(!h.before_wait(busy));
        h.wrote(1, t2);
        assert!(!h.before_wait(sleep), "two packets before the sleep");

        // A batch in either direction ends a fresh exchange.
        let t3 = t2 + ms(1) + Handoff::QUIET;
        h.moved(5, t3);
        h.wrote(1, t3);
        assert!(!h.before_wait(sleep), "a batch read from the device");
        let t4 = t3 + Handoff::QUIET;
        h.wrote(40, t4);
        assert!(!h.before_wait(sleep), "a batch written");
        h.wrote(1, t4 + ms(1));
        assert!(!h.before_wait(sleep), "a lone packet right after a batch");

        // The very first packet begins a fresh exchange; the count of written packets saturates.
        let mut h = Handoff::default();
        h.wrote(1, t0);
        assert!(h.before_wait(sleep), "the first exchange after start");
        let t5 = t0 + Handoff::QUIET;
        h.wrote(usize::MAX, t5);
        h.wrote(1, t5);
        assert!(!h.before_wait(sleep), "the count saturates, never wraps to a lone packet");
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_rests_on_time_and_the_wait_follows_the_first_deadline() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(40));
        let t0 = Instant::now();
        let mut side = Side::new(min, max);
        assert!(side.go(t0), "readable at first, not resting");
        side.rest_for(Duration::ZERO);
        assert!(side.go(t0), "a zero rest is none");
        side.rest_for(Duration::from_millis(30));
        assert!(!side.go(t0 + Duration::from_millis(29)));
        assert!(side.go(t0 + Duration::from_millis(30)) && side.rest.is_none(), "over, and forgotten");
        // A read that would block: not readable until the poller says so again.
        assert_eq!(side.read::<u8>(Err(io::ErrorKind::WouldBlock.into())).unwrap(), None);
        assert!(!side.go(t0));
        side.set_ready(true);
        // A failed read comes back to the caller; the first failures are retried at once, then
        // the side rests as the backoff says, and a success ends the streak.
        assert!(side.read::<u8>(Err(io::Error::from_raw_os_error(libc::EIO))).is_err());
        for _ in 0..8 {
            side.failed();
            assert!(side.go(t0), "free retries");
        }
        side.failed();
        assert!(!side.go(t0) && side.go(t0 + min), "then the backoff's first rest");
        assert_eq!(side.read(Ok(7u8)).unwrap(), Some(7));
        side.failed();
        assert!(side.go(t0), "a success starts the free retries again");

        let deadline = t0 + Duration::from_secs(15);
        let idle = {
            let mut s = Side::new(min, max);
            s.set_ready(false);
            s
        };
        let mut resting = Side::new(min, max);
        resting.rest_for(Duration::from_millis(40));
        let mut resting_idle = resting.clone();
        resting_idle.set_ready(false);
        // A side with data left and no rest: no sleep at all.
        assert_eq!(wait_for(false, [&Side::new(min, max), &resting_idle], deadline), Duration::ZERO);
        assert_eq!(wait_for(true, [&resting_idle, &resting_idle], deadline), Duration::ZERO, "more work");
        // Only resting sides with data: until the rest ends; a resting side without data counts not.
        assert_eq!(wait_for(false, [&resting, &idle], deadline), Duration::from_millis(40));
        assert_eq!(wait_for(false, [&resting_idle, &idle], deadline), Duration::from_secs(15));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(wait_for(false, [&resting, &resting_idle], deadline), Duration::ZERO, "overdue");
    }
}
