//! Path MTU discovery by probing (DPLPMTUD, RFC 8899 in spirit, as QUIC does it): the pure core
//! of one direction of one path. No IO and no clock: the shell passes `now` in, sends the probe
//! sizes [`Search::poll_probe`] returns, and feeds acks ([`Search::on_ack`]) and "packet too big"
//! hints from the socket's error queue ([`Search::on_too_big`]) back.
//!
//! Sizes are whatever unit the shell chooses, as long as it is the same everywhere (the client
//! uses outer packet sizes, IP header included). The search keeps:
//! - `confirmed`: the largest size a probe got through with (the base until one did);
//! - `too_big`: the smallest size known not to get through (`MAX_PROBES` probes of it lost, or a
//!   hint said so), if any;
//! - `limited`: whether the path is known to be smaller than the link's max. Until then the link
//!   decides ([`Search::bound`] is `None`): a path is trusted to be as large as its link until a
//!   probe says otherwise, so a healthy path pays nothing.
//!
//! What it does:
//! - **search**: one probe in flight at a time; first the base (it gives a round-trip sample,
//!   which sizes the loss timeout), then the link's max (the common case: the path is as large as
//!   its link), then a binary search between the confirmed size and the smallest too-big one,
//!   down to [`PmtudConfig::granularity`]. An ack raises `confirmed` at once; a size is too big
//!   after [`PmtudConfig::max_probes`] losses in a row.
//! - **black holes**: data loss is invisible to the tunnel, so a periodic confirmation probe of
//!   the size in use ([`PmtudConfig::confirm_interval`]) stands in for it. If it is lost
//!   `max_probes` times, a probe of the base tells a black hole from an outage: if the base gets
//!   through, the path shrank without telling, the size falls back to the base at once and a new
//!   search starts from there; if the base is lost too, the path is down, not small, and nothing
//!   is concluded (probing pauses for a confirmation interval). An outage therefore never
//!   lowers the size.
//! - **hints**: an ICMP "fragmentation needed"/"packet too big" (read from the socket's error
//!   queue) lowers the size at once, validated: never below the base, never at or above the size
//!   in use (a stale or forged hint can only lower us to what the next confirmation re-checks).
//! - **raise**: a path found smaller than its link is re-probed upwards after
//!   [`PmtudConfig::raise_interval`] (RFC 8899's `PMTU_RAISE_TIMER`, 600 s by default), so a
//!   path that grows back regains its size.

use std::time::{Duration, Instant};

/// The settings of one search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmtudConfig {
    /// The size assumed to work on any path (RFC 8899's `BASE_PLPMTU`): never gone below.
    pub base: u16,
    /// The largest size worth probing: the link's.
    pub max: u16,
    /// Losses in a row of one size that make it too big (RFC 8899's `MAX_PROBES`).
    pub max_probes: u8,
    /// A path found smaller than its link is probed upwards again this long after the search
    /// ended (RFC 8899's `PMTU_RAISE_TIMER`).
    pub raise_interval: Duration,
    /// How often the size in use is confirmed by a probe of that size (the black-hole detector).
    pub confirm_interval: Duration,
    /// The loss timeout before any round trip was measured.
    pub initial_timeout: Duration,
    /// Bounds of the loss timeout (three smoothed round trips).
    pub min_timeout: Duration,
    pub max_timeout: Duration,
    /// The search stops when the confirmed and the too-big size are this close.
    pub granularity: u16,
}

/// RFC 8899's `MAX_PROBES`.
pub const MAX_PROBES: u8 = 3;

/// RFC 8899's `PMTU_RAISE_TIMER`.
pub const DEFAULT_RAISE_INTERVAL: Duration = Duration::from_secs(600);

/// A full-size probe every few seconds costs nothing next to a transfer and bounds how long a
/// path that shrank silently (no ICMP) can black-hole the tunnel: this plus `max_probes` loss
/// timeouts.
pub const DEFAULT_CONFIRM_INTERVAL: Duration = Duration::from_secs(5);

/// IPv6's minimum link MTU (RFC 8200), which every IPv4 path in practice carries too: the base
/// of both families, as QUIC uses it.
pub const DEFAULT_BASE: u16 = super::icmp::IPV6_MIN_MTU as u16;

impl PmtudConfig {
    /// The defaults for a link of `max` (floored at the base).
    pub fn new(max: u16) -> Self {
        Self {
            base: DEFAULT_BASE,
            max: max.max(DEFAULT_BASE),
            max_probes: MAX_PROBES,
            raise_interval: DEFAULT_RAISE_INTERVAL,
            confirm_interval: DEFAULT_CONFIRM_INTERVAL,
            initial_timeout: Duration::from_secs(1),
            min_timeout: Duration::from_millis(100),
            max_timeout: Duration::from_secs(3),
            granularity: 8,
        }
    }
}

/// The probe in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    size: u16,
    sent: Instant,
    /// How many probes of this size were sent in a row (the first is 1).
    attempt: u8,
    role: Role,
}

/// Why a probe is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A step of a search.
    Search,
    /// The periodic confirmation of the size in use.
    Confirm,
    /// The size in use (the value) failed its confirmation: does the base still get through?
    Verify(u16),
    /// A search step of this size was lost: does the base still get through? Only then is the
    /// size too big; a path that went down meanwhile must not leave the search believing so.
    VerifyStep(u16),
}

/// The discovery state of one direction of one path.
#[derive(Debug, Clone)]
pub struct Search {
    cfg: PmtudConfig,
    confirmed: u16,
    /// The smallest size known too big; `None`: none known.
    too_big: Option<u16>,
    limited: bool,
    /// A round trip was measured on this path (the base got through at least once).
    srtt: Option<Duration>,
    in_flight: Option<InFlight>,
    searching: bool,
    next_raise: Option<Instant>,
    next_confirm: Option<Instant>,
    /// After an outage (not even the base got through): no probe before this.
    paused_until: Option<Instant>,
}

impl Search {
    /// A search that starts at once (the first [`Search::poll_probe`] sends the base).
    pub fn new(cfg: PmtudConfig) -> Self {
        let cfg = PmtudConfig { max: cfg.max.max(cfg.base), max_probes: cfg.max_probes.max(1), ..cfg };
        Self {
            cfg,
            confirmed: cfg.base,
            too_big: None,
            limited: false,
            srtt: None,
            in_flight: None,
            searching: true,
            next_raise: None,
            next_confirm: None,
            paused_until: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &PmtudConfig {
        &self.cfg
    }

    /// The size in use: the link's max until the path is known to be smaller.
    pub fn current(&self) -> u16 {
        if self.limited { self.confirmed } else { self.cfg.max }
    }

    /// The path's bound below the link, if one is known (what `PathMtu::set_discovered` takes).
    pub fn bound(&self) -> Option<u16> {
        self.limited.then_some(self.confirmed)
    }

    /// The largest size a probe got through with (or the base).
    pub fn confirmed(&self) -> u16 {
        self.confirmed
    }

    /// Whether a search is under way (not waiting for a timer).
    pub fn is_searching(&self) -> bool {
        self.searching
    }

    /// The loss timeout: three smoothed round trips, bounded.
    pub fn timeout(&self) -> Duration {
        match self.srtt {
            Some(rtt) => (rtt * 3).clamp(self.cfg.min_timeout, self.cfg.max_timeout),
            None => self.cfg.initial_timeout,
        }
    }

    /// When [`Search::poll_probe`] has something to do next (`None`: nothing until an input).
    pub fn next_wakeup(&self) -> Option<Instant> {
        if let Some(f) = self.in_flight {
            return Some(f.sent + self.timeout());
        }
        if let Some(p) = self.paused_until {
            return Some(p);
        }
        if self.searching {
            // A search with nothing in flight sends at the next poll; the shell polls after
            // every input, so this is only a guard.
            return None;
        }
        match (self.next_raise, self.next_confirm) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The link's max changed (the shell saw its MTU change): the search starts over below it.
    pub fn set_max(&mut self, max: u16, now: Instant) {
        let max = max.max(self.cfg.base);
        if max == self.cfg.max {
            return;
        }
        self.cfg.max = max;
        self.confirmed = self.confirmed.min(max);
        self.too_big = self.too_big.filter(|&t| t <= max);
        if self.confirmed == max {
            self.limited = false;
        }
        self.in_flight = None;
        self.restart(now);
    }

    /// What to send now, if anything: the size of a probe. Call after every input and at
    /// [`Search::next_wakeup`]. A returned size is in flight from `now`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<u16> {
        if let Some(f) = self.in_flight {
            if now < f.sent + self.timeout() {
                return None;
            }
            if f.attempt < self.cfg.max_probes {
                self.in_flight = Some(InFlight { sent: now, attempt: f.attempt + 1, ..f });
                return Some(f.size);
            }
            self.in_flight = None;
            if let Some(verify) = self.lost(f, now) {
                self.in_flight = Some(verify);
                return Some(verify.size);
            }
        }
        if let Some(p) = self.paused_until {
            if now < p {
                return None;
            }
            self.paused_until = None;
        }
        if !self.searching {
            if self.next_raise.is_some_and(|t| now >= t) {
                // Forget what was too big: the path may have grown back. `limited` stays, so
                // the size in use stays what is confirmed until a probe confirms more.
                self.too_big = None;
                self.restart(now);
            } else if self.next_confirm.is_some_and(|t| now >= t) {
                self.next_confirm = None;
                let size = self.current();
                self.in_flight = Some(InFlight { size, sent: now, attempt: 1, role: Role::Confirm });
                return Some(size);
            } else {
                return None;
            }
        }
        match self.candidate() {
            Some(size) => {
                self.in_flight = Some(InFlight { size, sent: now, attempt: 1, role: Role::Search });
                Some(size)
            }
            None => {
                self.searching = false;
                self.next_raise = self.limited.then(|| now + self.cfg.raise_interval);
                self.next_confirm = Some(now + self.cfg.confirm_interval);
                None
            }
        }
    }

    /// A probe of `size` was acknowledged at `now`: the path carries it. Returns whether the
    /// size in use changed.
    pub fn on_ack(&mut self, size: u16, now: Instant) -> bool {
        if size < self.cfg.base || size > self.cfg.max {
            // Not a size this search sends: a stale ack from before a change of the link.
            return false;
        }
        let before = self.current();
        if let Some(f) = self.in_flight.filter(|f| f.size == size) {
            // Karn: only a first transmission's ack is an unambiguous round trip.
            if f.attempt == 1 {
                let sample = now.saturating_duration_since(f.sent);
                self.srtt = Some(match self.srtt {
                    Some(s) => (s * 7 + sample) / 8,
                    None => sample,
                });
            }
            self.in_flight = None;
            match f.role {
                Role::Search => {}
                Role::Confirm => self.next_confirm = Some(now + self.cfg.confirm_interval),
                Role::Verify(suspect) => {
                    // The base gets through, the size in use does not: a black hole. Back to
                    // the base, and a new search below the size that failed.
                    self.confirmed = self.cfg.base;
                    self.limited = true;
                    self.too_big = Some(suspect);
                    self.restart(now);
                }
                Role::VerifyStep(suspect) => {
                    // The base gets through, the step did not: the step is too big, and so
                    // (the first step being the link's max) the path is smaller than its link.
                    self.too_big = Some(self.too_big.map_or(suspect, |t| t.min(suspect)));
                    self.limited = true;
                }
            }
        }
        if size > self.confirmed {
            self.confirmed = size;
        }
        // An ack of a size once too big: the path grew.
        if self.too_big.is_some_and(|t| t <= size) {
            self.too_big = None;
        }
        if self.confirmed >= self.cfg.max {
            self.limited = false;
            self.next_raise = None;
        }
        self.current() != before
    }

    /// The network said a packet of more than `mtu` does not fit (ICMP frag-needed / packet too
    /// big, or a local EMSGSIZE). Lowers the size in use at once; ignored if it would not lower
    /// it. Returns whether the size in use changed.
    pub fn on_too_big(&mut self, mtu: u16, now: Instant) -> bool {
        let current = self.current();
        if mtu >= current {
            return false;
        }
        let m = mtu.max(self.cfg.base);
        self.too_big = Some(self.too_big.map_or(m + 1, |t| t.min(m + 1)));
        // The hint names the next hop's MTU: taken as confirmed (as the kernel does); the next
        // confirmation probe checks it.
        self.confirmed = m;
        self.limited = true;
        if self.in_flight.is_some_and(|f| f.size > m) {
            self.in_flight = None;
        }
        self.restart(now);
        self.current() != current
    }

    fn restart(&mut self, _now: Instant) {
        self.searching = true;
        self.next_raise = None;
        self.next_confirm = None;
    }

    /// `f` was lost `max_probes` times in a row. Returns the probe to send now, if any (the
    /// base, to tell a black hole from an outage).
    fn lost(&mut self, f: InFlight, now: Instant) -> Option<InFlight> {
        let outage = matches!(f.role, Role::Verify(_) | Role::VerifyStep(_)) || f.size <= self.cfg.base;
        if outage {
            // Not even the base gets through: the path is down, not small. Nothing changes;
            // probing resumes (a confirmation, or the search where it was) after a while.
            self.paused_until = Some(now + self.cfg.confirm_interval);
            if !self.searching {
                self.next_confirm = Some(now + self.cfg.confirm_interval);
            }
            return None;
        }
        let role = match f.role {
            Role::Confirm => Role::Verify(f.size),
            _ => Role::VerifyStep(f.size),
        };
        Some(InFlight { size: self.cfg.base, sent: now, attempt: 1, role })
    }

    /// The next size a search probes, or `None` when it is done.
    fn candidate(&self) -> Option<u16> {
        if self.srtt.is_none() && self.confirmed == self.cfg.base && self.too_big.is_none_or(|t| t > self.cfg.base) {
            // First the base: it measures the round trip the loss timeout is sized from.
            return Some(self.cfg.base);
        }
        let lo = self.confirmed;
        let hi = match self.too_big {
            None if lo < self.cfg.max => return Some(self.cfg.max),
            None => return None,
            Some(t) => t,
        };
        if hi <= lo || hi - lo <= self.cfg.granularity {
            return None;
        }
        Some(lo + (hi - lo) / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A simulated path: a probe of `size` gets through iff `size <= mtu`; an ack takes `rtt`.
    /// Runs the search's events in time order and returns the virtual time.
    struct Sim {
        search: Search,
        now: Instant,
        rtt: Duration,
        /// Probes sent so far (for convergence bounds).
        probes: usize,
    }

    impl Sim {
        fn new(cfg: PmtudConfig) -> Self {
            Self { search: Search::new(cfg), now: Instant::now(), rtt: Duration::from_millis(20), probes: 0 }
        }

        /// Runs for `dur` of virtual time over a path of `mtu`.
        fn run(&mut self, mtu: u16, dur: Duration) {
            let end = self.now + dur;
            while self.now < end {
                if let Some(size) = self.search.poll_probe(self.now) {
                    self.probes += 1;
                    if size <= mtu {
                        self.now += self.rtt;
                        self.search.on_ack(size, self.now);
                    }
                    continue;
                }
                match self.search.next_wakeup() {
                    Some(t) if t > self.now => self.now = t.min(end),
                    Some(_) => {}
                    None => self.now = end,
                }
            }
        }
    }

    fn cfg(max: u16) -> PmtudConfig {
        PmtudConfig { raise_interval: Duration::from_secs(60), ..PmtudConfig::new(max) }
    }

    #[test]
    fn a_path_as_large_as_its_link_is_never_limited() {
        let mut sim = Sim::new(cfg(1500));
        sim.run(1500, Duration::from_secs(1));
        assert_eq!(sim.search.bound(), None);
        assert_eq!(sim.search.current(), 1500);
        assert_eq!(sim.search.confirmed(), 1500);
        assert!(!sim.search.is_searching());
        assert!(sim.probes <= 2, "base, then max: {}", sim.probes);
    }

    #[test]
    fn a_smaller_hop_is_found_without_any_icmp() {
        let mut sim = Sim::new(cfg(1500));
        sim.run(1280 + 100, Duration::from_secs(10));
        let b = sim.search.bound().expect("limited");
        assert!(b <= 1380 && b + 8 >= 1380, "{b}");
        assert!(!sim.search.is_searching());
    }

    #[test]
    fn a_hint_lowers_at_once_but_only_between_base_and_current() {
        let t = Instant::now();
        let mut s = Search::new(cfg(1500));
        assert!(!s.on_too_big(1500, t), "not below the size in use");
        assert!(s.on_too_big(1400, t));
        assert_eq!(s.bound(), Some(1400));
        assert!(!s.on_too_big(1450, t), "never raises");
        assert!(s.on_too_big(500, t));
        assert_eq!(s.bound(), Some(1280), "never below the base");
    }

    #[test]
    fn a_black_hole_falls_back_to_the_base_then_finds_the_new_size() {
        let mut sim = Sim::new(cfg(1500));
        sim.run(1500, Duration::from_secs(1));
        assert_eq!(sim.search.bound(), None);
        // The path shrinks silently: the next confirmation probe is lost.
        let mut sim2 = sim;
        sim2.run(1300, DEFAULT_CONFIRM_INTERVAL + Duration::from_secs(2));
        let b = sim2.search.bound().expect("limited");
        assert!(b <= 1300 && b + 8 >= 1300, "{b}");
    }

    #[test]
    fn a_path_that_grows_back_is_raised_after_the_raise_interval() {
        let mut sim = Sim::new(cfg(1500));
        sim.run(1300, Duration::from_secs(5));
        assert!(sim.search.bound().is_some());
        sim.run(1500, Duration::from_secs(30));
        assert!(sim.search.bound().is_some(), "not before the raise interval");
        sim.run(1500, Duration::from_secs(40));
        assert_eq!(sim.search.bound(), None, "raised after it");
    }

    #[test]
    fn an_outage_is_not_a_black_hole() {
        let mut sim = Sim::new(cfg(1500));
        sim.run(1500, Duration::from_secs(1));
        assert_eq!(sim.search.bound(), None);
        // Nothing gets through for a minute (mtu 0: every probe is lost).
        sim.run(0, Duration::from_secs(60));
        assert_eq!(sim.search.bound(), None, "an outage lowers nothing");
        assert_eq!(sim.search.current(), 1500);
        // And when the path is back, it is confirmed again.
        sim.run(1500, Duration::from_secs(20));
        assert_eq!(sim.search.bound(), None);
        // An outage from the start concludes nothing either.
        let mut sim = Sim::new(cfg(1500));
        sim.run(0, Duration::from_secs(30));
        assert_eq!(sim.search.bound(), None);
        sim.run(1500, Duration::from_secs(20));
        assert_eq!((sim.search.bound(), sim.search.confirmed()), (None, 1500));
    }

    #[test]
    fn an_outage_in_the_middle_of_a_search_concludes_nothing() {
        // The path goes down right after the base got through: every step of the search that
        // follows is lost, and so is the base that verifies it.
        let mut sim = Sim::new(cfg(1500));
        let t = sim.now;
        assert_eq!(sim.search.poll_probe(t), Some(1280));
        sim.now += sim.rtt;
        sim.search.on_ack(1280, sim.now);
        sim.run(0, Duration::from_secs(60));
        assert_eq!(sim.search.bound(), None, "an outage lowers nothing");
        // Back up: the search goes on where it was and finds the link's size.
        sim.run(1500, Duration::from_secs(20));
        assert_eq!((sim.search.bound(), sim.search.confirmed()), (None, 1500));
    }

    #[test]
    fn stale_and_foreign_acks_change_nothing_they_should_not() {
        let t = Instant::now();
        let mut s = Search::new(cfg(1500));
        assert!(!s.on_ack(60000, t));
        assert!(!s.on_ack(100, t));
        assert_eq!(s.current(), 1500);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the path: once converged, the bound never exceeds it and is within the
        /// granularity of it; convergence takes a bounded number of probes; and the search
        /// follows a path that shrinks and one that grows back.
        #[test]
        fn converges_below_the_true_path_and_follows_it(
            max in 1280u16..9000,
            // Paths carry the base (below it, a path cannot be told from an outage: see
            // `an_outage_is_not_a_black_hole`).
            first in 1280u16..9000,
            second in 1280u16..9000,
            rtt_ms in 1u64..300,
        ) {
            let mut sim = Sim::new(cfg(max));
            sim.rtt = Duration::from_millis(rtt_ms);
            let check = |s: &Search, mtu: u16| -> Result<(), TestCaseError> {
                let truth = mtu.clamp(1280, max);
                prop_assert!(s.confirmed() <= truth.max(1280), "confirmed {} over {}", s.confirmed(), truth);
                match s.bound() {
                    None => prop_assert!(truth >= max),
                    Some(b) => {
                        prop_assert!(b <= truth, "bound {} over {}", b, truth);
                        prop_assert!(b + 8 >= truth, "bound {} far below {}", b, truth);
                    }
                }
                Ok(())
            };
            sim.run(first, Duration::from_secs(40));
            check(&sim.search, first)?;
            // Base, max, then a binary search over at most 7720 bytes down to 8: ~10 steps of
            // up to MAX_PROBES probes each.
            prop_assert!(sim.probes <= 2 + 12 * 3 + 8 * 3, "{} probes", sim.probes);
            // The path changes: shrinking is found by the confirmation probes, growing by the
            // raise timer (60 s here).
            sim.run(second, Duration::from_secs(120));
            check(&sim.search, second)?;
            sim.run(first, Duration::from_secs(120));
            check(&sim.search, first)?;
        }
    }
}
