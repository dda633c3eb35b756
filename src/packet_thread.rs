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
}

/// What one registered descriptor reported: its token and the `EPOLL*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub token: u64,
    pub events: u32,
}

impl Ready {
    /// Data to read, or a condition (an error, a hang-up) a read reports.
    pub fn readable(&self) -> bool {
        self.events & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
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
        Ok(Self { epoll, events: vec![libc::epoll_event { events: 0, u64: 0 }; Self::EVENTS] })
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
    pub fn wait(&mut self, timeout: Option<std::time::Duration>) -> std::io::Result<&[libc::epoll_event]> {
        use std::os::fd::AsRawFd;
        let ms = match timeout {
            None => -1,
            // In u64 (a u128 division is a library call, here on every wait).
            Some(t) => {
                let ms = t.as_secs().saturating_mul(1000).saturating_add(u64::from(t.subsec_nanos().div_ceil(1_000_000)));
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `events` holds `EVENTS` entries the kernel may write; the epoll fd is valid.
        let n = unsafe {
            libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), Self::EVENTS as libc::c_int, ms)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(&[]) } else { Err(e) };
        }
        Ok(&self.events[..n as usize])
    }
}

/// One [`Poller`] entry as a [`Ready`].
pub fn ready(ev: &libc::epoll_event) -> Ready {
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

/// A side of an engine (its TUN device, its socket) that rests after failing IO (see
/// [`crate::tunnel::ErrorBackoff`]): the engine reads it again only once the rest is over, and
/// its wait ends then at the latest.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rest(Option<tokio::time::Instant>);

impl Rest {
    /// Rests for `d` from now (a zero rest is none: the first retries are free).
    pub fn start(&mut self, d: std::time::Duration) {
        self.0 = (!d.is_zero()).then(|| tokio::time::Instant::now() + d);
    }

    /// Whether the side may go on at `now` (and, if so, rests no more).
    pub fn over(&mut self, now: tokio::time::Instant) -> bool {
        match self.0 {
            Some(t) if now < t => false,
            _ => {
                self.0 = None;
                true
            }
        }
    }

    /// When the rest ends; `None` when not resting.
    pub fn until(&self) -> Option<tokio::time::Instant> {
        self.0
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

/// How long an engine's next wait may sleep: not at all while a side is known readable and not
/// resting (or `more` says there is other work left), else until the first resting readable
/// side may go on or `deadline` (the engine's own timer), whichever is first.
pub fn wait_for(more: bool, sides: [(bool, Rest); 2], deadline: tokio::time::Instant) -> std::time::Duration {
    if more || sides.iter().any(|(ready, rest)| *ready && rest.until().is_none()) {
        return std::time::Duration::ZERO;
    }
    let until = sides.iter().filter(|(ready, _)| *ready).filter_map(|(_, rest)| rest.until()).fold(deadline, |a, b| a.min(b));
    until.saturating_duration_since(tokio::time::Instant::now())
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
        assert!(p.wait(Some(std::time::Duration::from_millis(20))).unwrap().is_empty());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(20), "never woken early");
        // Two rings from another thread: one wake-up, taken once.
        let ringer = std::thread::spawn(move || {
            w.ring();
            w.ring();
            w
        });
        let w = ringer.join().unwrap();
        let got: Vec<Ready> = p.wait(None).unwrap().iter().map(ready).collect();
        assert_eq!(got.iter().map(|r| r.token).collect::<Vec<_>>(), [7]);
        assert!(w.take() && !w.take(), "taken once");
        // Edge-triggered: a datagram reports once, not again while it stays unread.
        b.send(b"x").unwrap();
        let got: Vec<Ready> = p.wait(None).unwrap().iter().map(ready).collect();
        assert!(got.len() == 1 && got[0].token == 9 && got[0].readable() && !got[0].error());
        assert!(p.wait(Some(std::time::Duration::ZERO)).unwrap().is_empty(), "edge-triggered");
        p.remove(&a).unwrap();
        b.send(b"y").unwrap();
        assert!(p.wait(Some(std::time::Duration::ZERO)).unwrap().is_empty(), "removed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rest_ends_on_time_and_the_wait_follows_the_first_deadline() {
        use std::time::Duration;
        use tokio::time::Instant;
        let t0 = Instant::now();
        let mut rest = Rest::default();
        assert!(rest.over(t0), "not resting");
        rest.start(Duration::ZERO);
        assert!(rest.until().is_none(), "a zero rest is none");
        rest.start(Duration::from_millis(30));
        assert!(!rest.over(t0 + Duration::from_millis(29)));
        assert!(rest.over(t0 + Duration::from_millis(30)) && rest.until().is_none(), "over, and forgotten");
        let deadline = t0 + Duration::from_secs(15);
        let mut resting = Rest::default();
        resting.start(Duration::from_millis(40));
        // A side with data left and no rest: no sleep at all.
        assert_eq!(wait_for(false, [(true, Rest::default()), (false, resting)], deadline), Duration::ZERO);
        assert_eq!(wait_for(true, [(false, resting), (false, resting)], deadline), Duration::ZERO, "more work");
        // Only resting sides with data: until the rest ends; a resting side without data counts not.
        assert_eq!(wait_for(false, [(true, resting), (false, Rest::default())], deadline), Duration::from_millis(40));
        assert_eq!(wait_for(false, [(false, resting), (false, Rest::default())], deadline), Duration::from_secs(15));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(wait_for(false, [(true, resting), (false, resting)], deadline), Duration::ZERO, "overdue");
    }
}
