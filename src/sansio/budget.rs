//! Per-source budgets for datagrams that fail (unknown session, bad tag, bad header), and the
//! watch that says when a flood starts and ends. Pure: time comes in as milliseconds, the hash
//! seed as a number; nothing here allocates after construction.
//!
//! Why per source: the gateway's notices ("unknown session") share one global rate limit, and
//! a bad tag costs an AES-GCM open. One noisy source would otherwise use up the notices other
//! clients need after a gateway restart, and could make the gateway spend its time opening
//! forgeries. Each source (an IPv4 address, or an IPv6 /64) gets a token bucket of failures;
//! a source that has spent it gets no notices and no more AES work for datagrams that do not
//! come from their session's established endpoint, until the bucket refills.
//!
//! What budgets never do: touch a datagram from a session's established endpoint (the caller
//! asks [`SourceBudgets::is_over`] only for datagrams from elsewhere), or cost anything on the
//! success path beyond one comparison ([`SourceBudgets::shedding`]). A flood from spoofed random
//! sources spreads over many buckets and is not shed by them; the kernel filter and the global
//! notice limit bound what it costs.

use std::net::IpAddr;

/// Budget of one source: `burst` failures at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetLimits {
    pub burst: f32,
    pub per_second: f32,
}

impl Default for BudgetLimits {
    /// Generous for a client that meets a restarted gateway (its first datagrams all fail, and
    /// one notice is all it needs), tight for a source that does nothing but fail.
    fn default() -> Self {
        Self { burst: 64.0, per_second: 8.0 }
    }
}

/// Slots in the table (a power of two) and how many a key may probe.
pub const DEFAULT_CAPACITY: usize = 4096;
const PROBES: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The source, 0 = empty (no source maps to 0: see [`key`]).
    key: u128,
    tokens: f32,
    /// When the bucket was last charged (ms).
    last_ms: u64,
}

/// A bounded table of per-source failure budgets, allocated once.
#[derive(Debug)]
pub struct SourceBudgets {
    slots: Box<[Slot]>,
    mask: usize,
    seed: u64,
    limits: BudgetLimits,
    /// When a charge last found its source over budget; 0 = never.
    last_over_ms: u64,
}

/// What [`SourceBudgets::charge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The source is within its budget: a notice may go out.
    Within,
    /// This failure used up the source's budget (the first one over).
    WentOver,
    /// The source was already over budget.
    Over,
}

impl Charge {
    pub fn within(self) -> bool {
        self == Charge::Within
    }
}

/// The table key of a source: IPv4 (and v4-mapped IPv6) addresses whole, IPv6 by /64 (one
/// host usually owns a /64, and may pick any address in it). Never 0 (the empty slot).
fn key(src: IpAddr) -> u128 {
    match src {
        // ::ffff:a.b.c.d: never 0.
        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => v6.to_bits(),
        // The /64 with its lowest bit set: never 0, never a v4-mapped address (whose /64 is 0
        // and whose low bits carry 0xffff).
        IpAddr::V6(v6) => v6.to_bits() & !u128::from(u64::MAX) | 1,
    }
}

impl SourceBudgets {
    /// `capacity` slots (rounded up to a power of two); `seed` keys the hash, so a sender
    /// cannot choose addresses that collide.
    pub fn new(capacity: usize, seed: u64, limits: BudgetLimits) -> Self {
        let n = capacity.max(PROBES).next_power_of_two();
        Self { slots: vec![Slot::default(); n].into_boxed_slice(), mask: n - 1, seed, limits, last_over_ms: 0 }
    }

    fn home(&self, k: u128) -> usize {
        let x = (k as u64) ^ ((k >> 64) as u64).rotate_left(29) ^ self.seed;
        let x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        let x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        (x ^ (x >> 33)) as usize & self.mask
    }

    /// The slot of `k`: its own, or a fresh one (an empty slot in its probe window, else the
    /// one charged longest ago, whose source starts over with a full bucket).
    fn slot(&mut self, k: u128) -> &mut Slot {
        let home = self.home(k);
        let mut victim = home;
        for i in 0..PROBES {
            let at = (home + i) & self.mask;
            let s = &self.slots[at];
            if s.key == k {
                return &mut self.slots[at];
            }
            if s.key == 0 {
                victim = at;
                break;
            }
            if s.last_ms < self.slots[victim].last_ms {
                victim = at;
            }
        }
        let burst = self.limits.burst;
        let s = &mut self.slots[victim];
        *s = Slot { key: k, tokens: burst, last_ms: 0 };
        s
    }

    fn refill(limits: BudgetLimits, s: &mut Slot, now_ms: u64) {
        if s.last_ms != 0 {
            let secs = now_ms.saturating_sub(s.last_ms) as f32 / 1000.0;
            s.tokens = (s.tokens + secs * limits.per_second).min(limits.burst);
        }
        // Stored +1 so that 0 stays "never" even at time 0.
        s.last_ms = now_ms.max(1);
    }

    /// Charges one failed datagram from `src` at `now_ms`.
    pub fn charge(&mut self, src: IpAddr, now_ms: u64) -> Charge {
        let limits = self.limits;
        let s = self.slot(key(src));
        Self::refill(limits, s, now_ms);
        let charge = if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            if s.tokens >= 1.0 { Charge::Within } else { Charge::WentOver }
        } else {
            Charge::Over
        };
        if charge != Charge::Within {
            self.last_over_ms = now_ms.max(1);
        }
        charge
    }

    /// Whether some source was over budget within the last second: the one comparison the
    /// success path pays; [`SourceBudgets::is_over`] is asked only then.
    #[inline]
    pub fn shedding(&self, now_ms: u64) -> bool {
        self.last_over_ms != 0 && now_ms.saturating_sub(self.last_over_ms) < 1000
    }

    /// Whether `src` has no budget left at `now_ms` (without charging it).
    pub fn is_over(&mut self, src: IpAddr, now_ms: u64) -> bool {
        let k = key(src);
        let home = self.home(k);
        let limits = self.limits;
        for i in 0..PROBES {
            let s = &mut self.slots[(home + i) & self.mask];
            if s.key == k {
                Self::refill(limits, s, now_ms);
                return s.tokens < 1.0;
            }
            if s.key == 0 {
                break;
            }
        }
        false
    }
}

/// Totals the flood watch reads once per tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodTotals {
    /// Datagrams the kernel's socket filter dropped.
    pub kernel_dropped: u64,
    /// Datagrams that failed in user space (unknown session, bad tag, bad header, replay).
    pub failed: u64,
    /// Of those, how many were shed without the AES work, and notices withheld.
    pub shed: u64,
    pub notices_withheld: u64,
}

impl FloodTotals {
    fn since(&self, start: &FloodTotals) -> FloodTotals {
        FloodTotals {
            kernel_dropped: self.kernel_dropped.saturating_sub(start.kernel_dropped),
            failed: self.failed.saturating_sub(start.failed),
            shed: self.shed.saturating_sub(start.shed),
            notices_withheld: self.notices_withheld.saturating_sub(start.notices_withheld),
        }
    }

    fn rejected(&self) -> u64 {
        self.kernel_dropped + self.failed
    }
}

/// What the flood watch has to say (one log line each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloodEvent {
    /// Rejected datagrams came at `per_second` over the last tick.
    Started { per_second: u64 },
    /// The flood is over: how long it lasted and what it cost.
    Ended { duration_ms: u64, totals: FloodTotals },
}

/// Thresholds of the flood watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodThresholds {
    /// Rejected datagrams per second at which a flood starts.
    pub start_per_second: u64,
    /// Below this rate for `quiet_ms`, it has ended.
    pub end_per_second: u64,
    pub quiet_ms: u64,
}

impl Default for FloodThresholds {
    fn default() -> Self {
        Self { start_per_second: 1000, end_per_second: 100, quiet_ms: 5000 }
    }
}

/// Decides, from totals sampled now and then, when a flood starts and ends: two log lines per
/// flood whatever its size.
#[derive(Debug, Clone)]
pub struct FloodWatch {
    limits: FloodThresholds,
    last: Option<(u64, FloodTotals)>,
    /// While flooded: when it started, the totals then, and since when it has been quiet.
    flood: Option<(u64, FloodTotals, Option<u64>)>,
}

impl FloodWatch {
    pub fn new(limits: FloodThresholds) -> Self {
        Self { limits, last: None, flood: None }
    }

    pub fn flooded(&self) -> bool {
        self.flood.is_some()
    }

    /// Takes the totals at `now_ms`.
    pub fn observe(&mut self, now_ms: u64, totals: FloodTotals) -> Option<FloodEvent> {
        let (then, before) = self.last.replace((now_ms, totals))?;
        let elapsed = now_ms.saturating_sub(then).max(1);
        let rate = totals.since(&before).rejected() * 1000 / elapsed;
        match &mut self.flood {
            None if rate >= self.limits.start_per_second => {
                self.flood = Some((then, before, None));
                Some(FloodEvent::Started { per_second: rate })
            }
            None => None,
            Some((_, _, quiet)) if rate >= self.limits.end_per_second => {
                *quiet = None;
                None
            }
            Some((start, at_start, quiet)) => {
                let since = *quiet.get_or_insert(then);
                if now_ms.saturating_sub(since) < self.limits.quiet_ms {
                    return None;
                }
                let event =
                    FloodEvent::Ended { duration_ms: since.saturating_sub(*start), totals: totals.since(at_start) };
                self.flood = None;
                Some(event)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xc612_0000 | n))
    }

    #[test]
    fn a_source_spends_its_burst_then_refills() {
        let limits = BudgetLimits { burst: 4.0, per_second: 2.0 };
        let mut b = SourceBudgets::new(64, 1, limits);
        let t = 1000;
        let charges: Vec<Charge> = (0..6).map(|_| b.charge(v4(1), t)).collect();
        use Charge::*;
        assert_eq!(charges, [Within, Within, Within, WentOver, Over, Over]);
        assert!(b.is_over(v4(1), t) && b.shedding(t));
        assert!(!b.is_over(v4(2), t), "another source is unaffected");
        assert!(b.charge(v4(2), t).within());
        // 2 per second: after a second, two more.
        assert!(!b.is_over(v4(1), t + 1000));
        assert_eq!(b.charge(v4(1), t + 1000), Within);
        assert!(!b.shedding(t + 2500), "nobody over budget for a second");
    }

    #[test]
    fn ipv6_sources_are_keyed_by_their_64_and_mapped_v4_as_v4() {
        let mut b = SourceBudgets::new(64, 7, BudgetLimits { burst: 2.0, per_second: 0.0 });
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(b.charge(a, 5).within());
        assert!(!b.charge(same64, 5).within(), "one /64, one budget");
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 9).to_ipv6_mapped());
        assert!(b.charge(mapped, 5).within());
        assert!(!b.charge(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)), 5).within());
        assert_ne!(key(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), 0);
        assert_ne!(key(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), 0);
    }

    #[test]
    fn the_table_is_bounded_and_recycles_the_stalest_slot() {
        let mut b = SourceBudgets::new(16, 3, BudgetLimits { burst: 1.0, per_second: 0.0 });
        for i in 0..10_000u32 {
            b.charge(v4(i), u64::from(i) + 1);
        }
        assert_eq!(b.slots.len(), 16);
        // A recent source still has its (spent) bucket; the table did not grow.
        assert!(b.is_over(v4(9_999), 20_000));
    }

    #[test]
    fn flood_watch_starts_once_and_ends_after_quiet_with_counts() {
        let mut w = FloodWatch::new(FloodThresholds::default());
        let mut t = FloodTotals::default();
        assert_eq!(w.observe(0, t), None);
        t.failed += 50;
        assert_eq!(w.observe(1000, t), None, "50/s is not a flood");
        t.kernel_dropped += 300_000;
        t.failed += 20_000;
        t.shed += 1000;
        assert_eq!(w.observe(2000, t), Some(FloodEvent::Started { per_second: 320_000 }));
        for s in 3..=10 {
            t.kernel_dropped += 300_000;
            assert_eq!(w.observe(s * 1000, t), None, "one line per flood");
        }
        let mut ended = None;
        for s in 11..=20 {
            t.failed += 10;
            if let Some(e) = w.observe(s * 1000, t) {
                ended = Some((s, e));
                break;
            }
        }
        let (at, e) = ended.expect("the flood ends");
        assert_eq!(at, 15, "5 s of quiet");
        let FloodEvent::Ended { duration_ms, totals } = e else { panic!("{e:?}") };
        assert_eq!(duration_ms, 9000);
        assert_eq!(totals.kernel_dropped, 9 * 300_000);
        assert_eq!(totals.failed, 20_000 + 50);
        assert!(!w.flooded());
    }

    proptest! {
        /// Whatever else fails, a source's budget depends only on its own failures: a source
        /// that failed at most `burst - 1` times is never over, however busy the rest is.
        #[test]
        fn one_noisy_source_does_not_spend_another_ones_budget(
            noise in proptest::collection::vec((0u32..64, 0u64..3000), 0..2000),
            quiet_failures in 0u32..63,
        ) {
            let mut b = SourceBudgets::new(DEFAULT_CAPACITY, 99, BudgetLimits::default());
            let quiet = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));
            for (i, (src, t)) in noise.iter().enumerate() {
                b.charge(v4(*src), *t);
                if (i as u32) < quiet_failures {
                    prop_assert!(b.charge(quiet, *t).within());
                }
            }
            prop_assert!(!b.is_over(quiet, 3000));
        }
    }
}
