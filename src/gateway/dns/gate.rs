//! The per-client limits of the resolver: a token bucket of queries per second
//! ([`crate::tunnel::RateLimit`], the data planes' bucket) and a cap on queries in flight, per
//! tunnel address. One session flooding spends its own budget, never anyone else's. Time is
//! passed in, so tests and the fuzz harness drive it without a clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::tunnel::RateLimit;

/// See the module doc.
#[derive(Debug)]
pub struct ClientGate {
    rate_per_sec: u32,
    burst: u32,
    max_in_flight: u32,
    clients: HashMap<IpAddr, Client>,
}

#[derive(Debug, Clone)]
struct Client {
    bucket: RateLimit,
    /// The latest query (never earlier than before): when the bucket is full again, so the
    /// entry can be forgotten.
    last: Instant,
    in_flight: u32,
}

/// What [`ClientGate::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; call [`ClientGate::done`] when the query is answered.
    Admitted,
    /// Over the rate, or too many of its queries in flight: dropped (answering a flood would
    /// spend as much as serving it).
    RateLimited,
}

/// Clients remembered at most. Entries exist only for live sessions' addresses (the shell checks
/// that first), so this is a backstop; idle entries go first when it is reached.
const MAX_CLIENTS: usize = 65_536;

impl ClientGate {
    /// `rate_per_sec` queries per second per client, bursts up to `burst`, at most
    /// `max_in_flight` unanswered at once.
    pub fn new(rate_per_sec: u32, burst: u32, max_in_flight: u32) -> Self {
        Self { rate_per_sec, burst: burst.max(1), max_in_flight: max_in_flight.max(1), clients: HashMap::new() }
    }

    /// Whether `client` may have a query answered at `now`.
    pub fn admit(&mut self, client: IpAddr, now: Instant) -> Admission {
        if self.clients.len() >= MAX_CLIENTS && !self.clients.contains_key(&client) {
            self.forget_idle(now);
            if self.clients.len() >= MAX_CLIENTS {
                return Admission::RateLimited;
            }
        }
        let (rate, burst) = (f64::from(self.rate_per_sec), self.burst);
        let c = self.clients.entry(client).or_insert_with(|| Client {
            bucket: RateLimit::new(rate, burst),
            last: now,
            in_flight: 0,
        });
        // A clock going backwards (a caller's mistake) grants nothing.
        c.last = c.last.max(now);
        if c.in_flight >= self.max_in_flight || !c.bucket.allow(tokio::time::Instant::from_std(c.last)) {
            return Admission::RateLimited;
        }
        c.in_flight += 1;
        Admission::Admitted
    }

    /// An admitted query of `client` was answered (or given up on).
    pub fn done(&mut self, client: IpAddr) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    /// Forgets clients with nothing in flight and a full bucket (they would start full again).
    pub fn forget_idle(&mut self, now: Instant) {
        let rate = u64::from(self.rate_per_sec.max(1));
        let full_after = Duration::from_millis(u64::from(self.burst) * 1000 / rate + 1);
        self.clients.retain(|_, c| c.in_flight > 0 || now.saturating_duration_since(c.last) < full_after);
    }

    /// Clients currently remembered.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_limits_each_client_on_its_own() {
        let t0 = Instant::now();
        let mut gate = ClientGate::new(10, 5, 3);
        let (a, b): (IpAddr, IpAddr) = ("100.64.0.2".parse().unwrap(), "100.64.0.3".parse().unwrap());
        // In flight: three at once, the fourth waits for an answer.
        for _ in 0..3 {
            assert_eq!(gate.admit(a, t0), Admission::Admitted);
        }
        assert_eq!(gate.admit(a, t0), Admission::RateLimited);
        // Another client is not affected.
        assert_eq!(gate.admit(b, t0), Admission::Admitted);
        gate.done(b);
        for _ in 0..3 {
            gate.done(a);
        }
        // Burst 5: two tokens left for `a`.
        assert_eq!(gate.admit(a, t0), Admission::Admitted);
        gate.done(a);
        assert_eq!(gate.admit(a, t0), Admission::Admitted);
        gate.done(a);
        assert_eq!(gate.admit(a, t0), Admission::RateLimited);
        // 10/s: one token per 100 ms.
        assert_eq!(gate.admit(a, t0 + Duration::from_millis(99)), Admission::RateLimited);
        assert_eq!(gate.admit(a, t0 + Duration::from_millis(200)), Admission::Admitted);
        gate.done(a);
        // Time going backwards (a caller's mistake) grants nothing and panics nowhere.
        assert_eq!(gate.admit(a, t0), Admission::Admitted);
        gate.done(a);
        assert_eq!(gate.admit(a, t0), Admission::RateLimited);
        // Idle clients are forgotten.
        gate.forget_idle(t0 + Duration::from_secs(10));
        assert!(gate.is_empty());
    }
}
