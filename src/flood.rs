//! Shedding a flood at the data-plane sockets: the shell around [`crate::sansio::filter`] (the
//! kernel socket filter) and [`crate::sansio::budget`] (per-source budgets, the flood watch).
//!
//! - [`guard_socket`] attaches the filter to a data-plane socket, so junk is dropped in the
//!   kernel before it wakes a loop, and keeps a handle to read the kernel's drop count.
//! - [`Shedder`] is the receive loop's per-source budget table (allocated once): called only in
//!   the loop's failure branches, plus one comparison before opening a datagram.
//! - [`watch`] samples the totals once a second and logs one line when a flood starts being
//!   shed and one when it ends, with the counts. Nothing here logs per packet.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch as tokio_watch;
use tokio::time::Instant;

use crate::sansio::budget::{
    BudgetLimits, Charge, DEFAULT_CAPACITY, FloodEvent, FloodThresholds, FloodTotals, FloodWatch, SourceBudgets,
};
use crate::sansio::filter::{FilterSpec, Insn, KnownSessions, Side};
use crate::sansio::session::SessionId;
use crate::tunnel::bump;

const TARGET: &str = "holdfast::flood";

/// What the gateway sheds. Always [`ShedMode::Full`] but for benchmarks, which measure each
/// step in one run by starting the gateway with `HOLDFAST_SHED=off|filter|full` in its
/// environment (read once; a value it does not know is named in a warning and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedMode {
    /// No socket filter, no budgets: what the data plane did before.
    Off,
    /// The socket filter only.
    Filter,
    /// The socket filter and the per-source budgets.
    Full,
}

impl ShedMode {
    pub fn from_env() -> ShedMode {
        static MODE: std::sync::OnceLock<ShedMode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("HOLDFAST_SHED").as_deref() {
            Err(_) | Ok("full") => ShedMode::Full,
            Ok("filter") => ShedMode::Filter,
            Ok("off") => ShedMode::Off,
            Ok(other) => {
                tracing::warn!(target: TARGET, "HOLDFAST_SHED={other:?} is not off, filter or full: ignored (full)");
                ShedMode::Full
            }
        })
    }
}

/// Attaches the socket filter for `spec` to `sock` (`SO_ATTACH_FILTER`; replaces any before).
pub fn attach_filter(sock: &impl AsRawFd, spec: FilterSpec) -> io::Result<()> {
    attach_program(sock, &spec.program())
}

/// Attaches `program` (`SO_ATTACH_FILTER`; the kernel swaps it in atomically).
fn attach_program(sock: &impl AsRawFd, program: &[Insn]) -> io::Result<()> {
    let len = u16::try_from(program.len()).map_err(|_| io::Error::other("filter too long"))?;
    // `Insn` is `#[repr(C)]` with the kernel's `sock_filter` layout (u16, u8, u8, u32).
    let fprog = libc::sock_fprog { len, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: a valid fd, and a sock_fprog pointing at `program`, alive for the call (the kernel
    // copies the instructions).
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Datagrams the kernel dropped for this socket: refused by its filter, or no room in its
/// receive buffer (the kernel counts both in one `sk_drops`). `None` if it cannot be read.
pub fn kernel_drops(sock: &impl AsRawFd) -> Option<u64> {
    // SK_MEMINFO_VARS (9 on current kernels; the kernel writes at most `len`).
    let mut info = [0u32; 16];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: a valid fd and a buffer of `len` bytes the kernel writes at most `len` of.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MEMINFO, info.as_mut_ptr().cast(), &mut len)
    };
    (rc == 0).then(|| u64::from(info[libc::SK_MEMINFO_DROPS as usize]))
}

/// UDP datagrams this network namespace dropped for a full receive buffer (`RcvbufErrors` of
/// IPv4 and IPv6; a v4-mapped datagram on a dual-stack socket counts under IPv4). The socket's
/// own drop count cannot tell those from the filter's, so the flood watch subtracts these:
/// a heavy upload that overruns the socket is not a flood.
pub fn receive_buffer_errors() -> Option<u64> {
    // Read into a buffer kept per thread: the watch asks every tick, from the loops' runtime,
    // where nothing should allocate after warm-up (the allocation tests count that thread).
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(16 << 10));
    }
    fn read<T>(path: &str, buf: &mut Vec<u8>, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
        use std::io::Read;
        buf.clear();
        std::fs::File::open(path).ok()?.read_to_end(buf).ok()?;
        parse(std::str::from_utf8(buf).ok()?)
    }
    BUF.with_borrow_mut(|buf| {
        let v4 = read("/proc/net/snmp", buf, |t| {
            let mut udp = t.lines().filter(|l| l.starts_with("Udp: "));
            let (names, values) = (udp.next()?, udp.next()?);
            let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
            values.split_whitespace().nth(at)?.parse::<u64>().ok()
        })?;
        let v6 = read("/proc/net/snmp6", buf, |t| {
            t.lines().find_map(|l| l.strip_prefix("Udp6RcvbufErrors")).and_then(|v| v.trim().parse::<u64>().ok())
        });
        Some(v4 + v6.unwrap_or(0))
    })
}

/// Attaches the filter for `side` to a data-plane socket (`coalesced`: it has UDP GRO on) and
/// returns the shedding counters of that socket. A kernel that refuses the filter costs
/// throughput under a flood, not correctness: logged once, the loop's parser still checks all.
pub fn guard_socket(sock: &impl AsRawFd, side: Side, coalesced: bool) -> Arc<ShedCounters> {
    let mode = ShedMode::from_env();
    if mode != ShedMode::Full {
        tracing::warn!(target: TARGET, "HOLDFAST_SHED: flood shedding reduced to {mode:?} (a benchmark setting)");
    }
    let filtered = match mode {
        ShedMode::Off => false,
        _ => match attach_filter(sock, FilterSpec { side, coalesced }) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(target: TARGET, "no socket filter on the data-plane socket ({e}): junk reaches user space");
                false
            }
        },
    };
    // A duplicate of the socket's fd, only ever read from (its drop count): the socket itself
    // stays with the loops.
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own, or -1.
    let dup = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    let kernel = (dup >= 0).then(|| {
        // SAFETY: `dup` is a fresh fd owned by nothing else.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) }
    });
    let base = kernel.as_ref().and_then(kernel_drops).unwrap_or(0);
    let overflow_base = receive_buffer_errors().unwrap_or(0);
    Arc::new(ShedCounters {
        filtered,
        spec: FilterSpec { side, coalesced },
        budgets: mode == ShedMode::Full,
        kernel,
        kernel_base: base,
        overflow_base,
        overflows_at: OverflowsAt::default(),
        ..Default::default()
    })
}

/// What the gateway's data plane shed, read by the status socket, the metrics and the watch.
/// `Default`: no socket behind it (no kernel count), budgets on.
#[derive(Debug)]
pub struct ShedCounters {
    /// Whether the socket filter is attached, and whether the budgets apply.
    filtered: bool,
    spec: FilterSpec,
    budgets: bool,
    kernel: Option<OwnedFd>,
    /// The socket's drop count when the filter was attached, and the namespace's receive
    /// buffer errors then.
    kernel_base: u64,
    overflow_base: u64,
    /// The namespace's overflows as last read, for the socket drop count they were read at.
    overflows_at: OverflowsAt,
    /// Datagrams that failed in user space (bad header, unknown session, bad tag, replay),
    /// shed ones included.
    pub failed: AtomicU64,
    /// Datagrams from an over-budget source, not from their session's endpoint, dropped
    /// without the AES work.
    pub shed: AtomicU64,
    /// Unknown-session notices not sent because the source was over budget.
    pub notices_withheld: AtomicU64,
    /// Floods seen (the watch's start lines), and whether one is being shed now.
    pub floods: AtomicU64,
    pub flooded: AtomicBool,
}

impl Default for ShedCounters {
    fn default() -> Self {
        Self {
            filtered: false,
            spec: FilterSpec { side: Side::Gateway, coalesced: true },
            budgets: true,
            kernel: None,
            kernel_base: 0,
            overflow_base: 0,
            overflows_at: OverflowsAt::default(),
            failed: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            notices_withheld: AtomicU64::new(0),
            floods: AtomicU64::new(0),
            flooded: AtomicBool::new(false),
        }
    }
}

impl ShedCounters {
    /// Datagrams dropped for a full receive buffer since start, in this network namespace
    /// (all UDP sockets; see [`receive_buffer_errors`]).
    pub fn buffer_overflows(&self) -> u64 {
        receive_buffer_errors().map_or(0, |n| n.saturating_sub(self.overflow_base))
    }

    /// The totals; `kernel_dropped` without the receive-buffer overflows (as far as the
    /// namespace's counters can tell them apart): what the filter refused.
    pub fn totals(&self) -> FloodTotals {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let socket_drops =
            self.kernel.as_ref().and_then(kernel_drops).map_or(0, |d| d.saturating_sub(self.kernel_base));
        let overflows = self.overflows_at.get(socket_drops, || self.buffer_overflows());
        FloodTotals {
            kernel_dropped: socket_drops.saturating_sub(overflows),
            failed: r(&self.failed),
            shed: r(&self.shed),
            notices_withheld: r(&self.notices_withheld),
        }
    }

    pub fn report(&self) -> ShedReport {
        let t = self.totals();
        ShedReport {
            filter: self.filtered,
            kernel_dropped: t.kernel_dropped,
            buffer_overflows: self.buffer_overflows(),
            failed: t.failed,
            shed: t.shed,
            notices_withheld: t.notices_withheld,
            floods: self.floods.load(Ordering::Relaxed),
            flooded: self.flooded.load(Ordering::Relaxed),
        }
    }
}

/// The namespace's receive-buffer overflows, read again only when the socket's drop count has
/// moved since the last read. Why: the watch asks four times a second, and reading them means
/// the kernel formatting all of `/proc/net/snmp` and `/proc/net/snmp6`, about a hundred
/// counters, for a figure that matters only when the socket dropped something. While the drop
/// count stands still, nothing was dropped, by the filter or for want of room, so the last
/// split still holds.
#[derive(Debug, Default)]
struct OverflowsAt(std::sync::Mutex<Option<(u64, u64)>>);

impl OverflowsAt {
    /// The overflows for `socket_drops`: the last reading if it was taken at this drop count,
    /// else `read()` (remembered).
    fn get(&self, socket_drops: u64, read: impl FnOnce() -> u64) -> u64 {
        // A poisoned lock only means a reader panicked between two plain stores: the pair is
        // still whole.
        let mut last = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some((drops, overflows)) if drops == socket_drops => overflows,
            _ => {
                let overflows = read();
                *last = Some((socket_drops, overflows));
                overflows
            }
        }
    }
}

/// The shedding figures in `gateway status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShedReport {
    /// The socket filter is attached.
    pub filter: bool,
    /// Dropped in the kernel by the socket filter (the socket's drops less the namespace's
    /// receive-buffer overflows).
    pub kernel_dropped: u64,
    /// UDP datagrams the namespace dropped for a full receive buffer (a loop that fell behind).
    #[serde(default)]
    pub buffer_overflows: u64,
    /// Failed in user space: bad header, unknown session, bad tag, replay.
    pub failed: u64,
    /// Of those, dropped without the AES work (over-budget source, not the session's endpoint).
    pub shed: u64,
    pub notices_withheld: u64,
    pub floods: u64,
    /// A flood is being shed now.
    pub flooded: bool,
}

/// The receive loop's side of the budgets. Allocated once per loop; nothing per packet.
pub struct Shedder {
    /// Off only in a benchmark's "before" runs ([`ShedMode`]).
    on: bool,
    budgets: SourceBudgets,
    epoch: Instant,
    /// The batch's clock in milliseconds since `epoch` (from 1 on), set once per batch by
    /// [`Shedder::at`]: every datagram of a batch is charged at the same moment.
    now_ms: u64,
    counters: Arc<ShedCounters>,
}

impl Shedder {
    pub fn new(counters: Arc<ShedCounters>) -> Self {
        let epoch = Instant::now();
        Self {
            on: counters.budgets,
            budgets: SourceBudgets::new(DEFAULT_CAPACITY, rand::random(), BudgetLimits::default()),
            epoch,
            now_ms: 1,
            counters,
        }
    }

    /// Sets the clock for the batch about to be handled (read once per batch by the loop).
    #[inline]
    pub fn at(&mut self, now: Instant) {
        self.now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
    }

    /// A datagram from `from` failed (bad header, bad tag, replay): charged to its source.
    pub fn failed(&mut self, from: SocketAddr) {
        bump(&self.counters.failed);
        if self.on {
            self.budgets.charge(from.ip(), self.now_ms);
        }
    }

    /// A datagram from `from` named an unknown session: charged to its source. Returns whether
    /// a notice may go out (the source is within its budget; the global limit still applies).
    pub fn unknown_session(&mut self, from: SocketAddr) -> bool {
        bump(&self.counters.failed);
        let within = !self.on || self.budgets.charge(from.ip(), self.now_ms) == Charge::Within;
        if !within {
            bump(&self.counters.notices_withheld);
        }
        within
    }

    /// Whether to open a datagram from `from` for a session whose established endpoint is
    /// `endpoint`. Always yes from the endpoint itself, for a session without one yet, and
    /// while no source is over budget (one comparison); otherwise no for an over-budget
    /// source, counted as shed.
    #[inline]
    pub fn admit(&mut self, from: SocketAddr, endpoint: impl FnOnce() -> Option<SocketAddr>) -> bool {
        let ms = self.now_ms;
        if !self.budgets.shedding(ms) {
            return true; // also when off: nothing is ever charged then
        }
        match endpoint() {
            None => true,
            Some(e) if e == from => true,
            Some(_) if !self.budgets.is_over(from.ip(), ms) => true,
            Some(_) => {
                bump(&self.counters.failed);
                bump(&self.counters.shed);
                false
            }
        }
    }
}

/// How often the watch samples the totals (and, during a flood, the live session ids: a session
/// opened meanwhile waits at most this long to be let through by the kernel).
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// During a flood, datagrams for unknown session ids reach the gateway one in this many (drawn
/// by the kernel): enough for a client of a restarted gateway to draw its notice soon, few
/// enough that a flood of made-up ids costs the gateway next to nothing.
const UNKNOWN_SAMPLE: u32 = 64;

/// The flood-time socket filter: while a flood is being shed (with budgets on), only datagrams
/// of live sessions (and a sample of the rest) pass the kernel; refreshed when the sessions
/// change, back to the plain filter when the flood ends.
struct SessionFilter {
    /// The ids the attached program lets through, sorted; `None` = the plain program.
    attached: Option<Vec<SessionId>>,
    scratch: Vec<SessionId>,
}

impl SessionFilter {
    /// Brings the socket's program in line with `flooded` and the live ids.
    fn update(&mut self, counters: &ShedCounters, flooded: bool, live_ids: &impl Fn(&mut Vec<SessionId>) -> bool) {
        let Some(fd) = counters.kernel.as_ref().filter(|_| counters.filtered && counters.budgets) else {
            return;
        };
        self.scratch.clear();
        let narrow = flooded && live_ids(&mut self.scratch);
        if !narrow {
            if self.attached.take().is_some()
                && let Err(e) = attach_filter(fd, counters.spec)
            {
                tracing::warn!(target: TARGET, "cannot restore the socket filter: {e}");
            }
            return;
        }
        self.scratch.sort_unstable();
        self.scratch.dedup();
        if self.attached.as_ref() == Some(&self.scratch) {
            return;
        }
        let ids: Vec<u64> = self.scratch.iter().map(|id| id.0).collect();
        let known = KnownSessions { ids: &ids, one_in: UNKNOWN_SAMPLE };
        let Some(program) = counters.spec.program_with_sessions(known) else {
            // More sessions than a classic BPF program can list: the plain filter stays.
            return;
        };
        match attach_program(fd, &program) {
            Ok(()) => {
                if self.attached.is_none() {
                    tracing::info!(target: TARGET, "socket filter narrowed to the {} live session(s) while the flood lasts", ids.len());
                }
                self.attached = Some(self.scratch.clone());
            }
            Err(e) => tracing::warn!(target: TARGET, "cannot narrow the socket filter: {e}"),
        }
    }
}

/// Logs one line when a flood starts being shed and one when it ends, until `stop`; while it
/// lasts, narrows the socket filter to the sessions `live_ids` lists (see `SessionFilter`).
pub async fn watch(
    counters: Arc<ShedCounters>,
    live_ids: impl Fn(&mut Vec<SessionId>) -> bool + Send + 'static,
    mut stop: tokio_watch::Receiver<bool>,
) {
    let mut narrowed = SessionFilter { attached: None, scratch: Vec::new() };
    let mut w = FloodWatch::new(FloodThresholds::default());
    let epoch = Instant::now();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = crate::tunnel::stop_requested(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let ms = epoch.elapsed().as_millis() as u64;
        match w.observe(ms, counters.totals()) {
            Some(FloodEvent::Started { per_second }) => {
                bump(&counters.floods);
                counters.flooded.store(true, Ordering::Relaxed);
                tracing::warn!(
                    target: TARGET,
                    "flood on the data port: {per_second} rejected datagrams/s, shedding (kernel filter, per-source budgets)"
                );
            }
            Some(FloodEvent::Ended { duration_ms, totals: t }) => {
                counters.flooded.store(false, Ordering::Relaxed);
                tracing::info!(
                    target: TARGET,
                    "flood over after {:.1} s: {} dropped by the socket filter, {} failed in the gateway ({} shed, {} notices withheld)",
                    duration_ms as f64 / 1000.0,
                    t.kernel_dropped,
                    t.failed,
                    t.shed,
                    t.notices_withheld
                );
            }
            None => {}
        }
        narrowed.update(&counters, w.flooded(), &live_ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overflows_are_read_again_only_when_the_socket_drop_count_moves() {
        let at = OverflowsAt::default();
        let reads = std::cell::Cell::new(0);
        let read = |value: u64| {
            let reads = &reads;
            move || {
                reads.set(reads.get() + 1);
                value
            }
        };
        assert_eq!(at.get(0, read(3)), 3, "the first call reads");
        assert_eq!(at.get(0, read(9)), 3, "same drop count: the last reading");
        assert_eq!(reads.get(), 1);
        assert_eq!(at.get(5, read(4)), 4, "the count moved: read again");
        assert_eq!(at.get(5, read(7)), 4);
        assert_eq!(reads.get(), 2);
    }

    proptest! {
        /// Whatever fails, from wherever (the client's own address included, as a spoofer would
        /// send), a datagram from its session's established endpoint, or for a session with no
        /// endpoint yet, is always opened; only over-budget sources elsewhere are shed.
        #[test]
        fn budgets_never_drop_a_live_sessions_datagrams(
            failures in proptest::collection::vec((0u8..4, 0u8..3, 0u64..5000), 1..3000),
        ) {
            let counters = Arc::new(ShedCounters::default());
            let mut shed = Shedder::new(counters.clone());
            let t0 = shed.epoch;
            let endpoint: SocketAddr = "198.18.0.1:51000".parse().unwrap();
            let source = |n: u8| match n {
                0 => endpoint,
                1 => "198.18.0.1:40000".parse().unwrap(), // the client's address, another port
                n => SocketAddr::from(([198, 19, 0, n], 9)),
            };
            for (src, kind, ms) in failures {
                shed.at(t0 + Duration::from_millis(ms));
                let from = source(src);
                match kind {
                    0 => shed.failed(from),
                    1 => { shed.unknown_session(from); }
                    _ => { shed.admit(from, || Some(endpoint)); }
                }
                prop_assert!(shed.admit(endpoint, || Some(endpoint)));
                prop_assert!(shed.admit(from, || None), "a session without an endpoint yet");
            }
        }
    }

    #[test]
    fn an_over_budget_source_is_shed_and_notices_withheld_and_counted() {
        let counters = Arc::new(ShedCounters::default());
        let mut shed = Shedder::new(counters.clone());
        shed.at(shed.epoch + Duration::from_millis(10));
        let endpoint: SocketAddr = "198.18.0.1:51000".parse().unwrap();
        let noisy: SocketAddr = "198.18.9.9:53".parse().unwrap();
        let within = (0..200).filter(|_| shed.unknown_session(noisy)).count() as u64;
        let burst = BudgetLimits::default().burst as u64;
        assert_eq!(within, burst - 1, "notices until the budget is spent");
        assert!(!shed.admit(noisy, || Some(endpoint)), "forgeries from it are shed");
        assert!(shed.admit(endpoint, || Some(endpoint)));
        let other: SocketAddr = "198.18.7.7:53".parse().unwrap();
        assert!(shed.admit(other, || Some(endpoint)), "another source is not");
        let t = counters.totals();
        assert_eq!((t.failed, t.shed, t.notices_withheld), (201, 1, 200 - within));
    }
}
