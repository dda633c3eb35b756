//! The session registry: every live session, by id and by tunnel address.
//!
//! Shape: an immutable pair of maps behind an `ArcSwap`. Readers (PingSession, the data plane's
//! lookups by id and by address) do one atomic load and a hash lookup: no lock, no
//! allocation, never blocked by a writer. Writers (Authenticate, revocation, the pruner) are
//! rare; they copy the maps under a mutex that readers never touch, edit the copy and swap it in.
//! The only per-session mutable state is `last_seen` and `superseded_at`, both atomics, so a
//! ping (or the data plane, once a second for a session in use) refreshes a session without a
//! write to the maps.
//!
//! Time is milliseconds on the gateway's monotonic [`Clock`], passed in as an argument, so every
//! expiry rule is tested without waiting.
//!
//! Expiry rules (checked in [`SessionTable::validity`]):
//! - idle: not pinged (or used) for `session_idle_timeout`;
//! - lifetime: opened more than `session_max_lifetime` ago;
//! - superseded: the client authenticated again more than `reauth_grace` ago. Only the client's
//!   previous session gets this grace: any older one is dropped when a new one opens, so a client
//!   holds at most two sessions however often it authenticates.
//!
//! A revoked client's sessions are removed when the registry reload shows the revocation
//! ([`SessionTable::retain`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::pki::CertFingerprint;
use crate::snapshot::{SessionId, SessionKey};

/// Milliseconds on the gateway's [`Clock`].
pub type Millis = u64;

/// `superseded_at` of a session that is its client's current one.
const CURRENT: Millis = u64::MAX;

/// The gateway's monotonic clock: milliseconds since the control plane started. The session table
/// and the data plane's lookups (`ControlSessions`) read the same clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }

    pub fn now(&self) -> Millis {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The expiry settings, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub idle_ms: Millis,
    pub max_lifetime_ms: Millis,
    pub grace_ms: Millis,
}

impl SessionLimits {
    pub fn new(idle: Duration, max_lifetime: Duration, grace: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self { idle_ms: ms(idle), max_lifetime_ms: ms(max_lifetime), grace_ms: ms(grace) }
    }
}

/// One session: what the data plane needs to handle the client's packets.
pub struct Session {
    pub id: SessionId,
    /// The client's name (its certificate's common name).
    pub client: Arc<str>,
    /// The certificate the client authenticated with.
    pub cert: CertFingerprint,
    /// The client's tunnel address.
    pub assigned_ip: Ipv4Addr,
    /// The client's IPv6 tunnel address, if the gateway and its registry entry have one.
    pub assigned_ip6: Option<Ipv6Addr>,
    pub key: SessionKey,
    /// The client takes Data with a partial inner TCP checksum (it said so in Authenticate).
    pub partial_checksums: bool,
    pub opened_at: Millis,
    last_seen: AtomicU64,
    superseded_at: AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("client", &self.client)
            .field("assigned_ip", &self.assigned_ip)
            .field("assigned_ip6", &self.assigned_ip6)
            .field("key_fp", &self.key.fingerprint())
            .field("opened_at", &self.opened_at)
            .field("last_seen", &self.last_seen())
            .field("superseded_at", &self.superseded_at())
            .finish()
    }
}

impl Session {
    /// Whether `ip` is one of this session's tunnel addresses: the anti-spoofing check of the
    /// data plane, for either family.
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4 == self.assigned_ip,
            IpAddr::V6(v6) => Some(v6) == self.assigned_ip6,
        }
    }

    /// Records activity at `now` (a ping, or later a valid data packet). Never moves backwards.
    pub fn touch(&self, now: Millis) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    pub fn last_seen(&self) -> Millis {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// When the client's next session replaced this one, if it did.
    pub fn superseded_at(&self) -> Option<Millis> {
        Some(self.superseded_at.load(Ordering::Relaxed)).filter(|t| *t != CURRENT)
    }
}

/// Why a session is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No such session (never existed, pruned, revoked client, or before a gateway restart).
    Unknown,
    /// The session belongs to another client (or another certificate of the same name).
    OtherClient,
    Idle,
    Lifetime,
    Superseded,
    /// The caller's registry entry does not admit it any more (decided by the service).
    Revoked,
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expiry::Unknown => "unknown session",
            Expiry::OtherClient => "session of another client",
            Expiry::Idle => "idle",
            Expiry::Lifetime => "lifetime reached",
            Expiry::Superseded => "superseded",
            Expiry::Revoked => "client no longer admitted",
        })
    }
}

/// The answer to a PingSession.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingVerdict {
    Ok,
    Expired(Expiry),
}

impl std::fmt::Display for PingVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PingVerdict::Ok => f.write_str("ok"),
            PingVerdict::Expired(why) => write!(f, "expired ({why})"),
        }
    }
}

/// What opening a session did.
#[derive(Debug)]
pub struct Opened {
    pub session: Arc<Session>,
    /// The client's previous session, now in its grace period.
    pub replaced: Option<Arc<Session>>,
}

/// What Authenticate passes to [`SessionTable::open`].
pub struct NewSession {
    pub client: Arc<str>,
    pub cert: CertFingerprint,
    pub assigned_ip: Ipv4Addr,
    pub assigned_ip6: Option<Ipv6Addr>,
    pub key: SessionKey,
    /// The client takes Data with a partial inner TCP checksum (it said so in Authenticate).
    pub partial_checksums: bool,
}

#[derive(Default, Clone)]
struct Tables {
    by_id: HashMap<u64, Arc<Session>>,
    /// The newest session of the client holding each address (IPv4 and IPv6: a session is
    /// indexed under both of its addresses).
    by_ip: HashMap<IpAddr, Arc<Session>>,
    /// The session before it, while its grace period lasts.
    previous_by_ip: HashMap<IpAddr, Arc<Session>>,
}

/// How many times a [`SessionTable`] has changed (a session opened, which may supersede another,
/// or removed), shared with whoever keeps a looked-up session between lookups (the data plane's
/// engine: `dataplane::Recent`) and must ask again after any change.
#[derive(Debug, Clone, Default)]
pub struct Changes(Arc<AtomicU64>);

impl Changes {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// After the new tables are stored: a reader that sees the old count for an instant longer
    /// uses its session as if its packet had come that instant earlier. Public for other tables
    /// behind `dataplane::SessionLookup` (tests' own).
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// The gateway's live sessions.
pub struct SessionTable {
    tables: ArcSwap<Tables>,
    changes: Changes,
    /// Serialises writers (copy, edit, swap). Readers never take it.
    writer: Mutex<()>,
    /// Atomics rather than a plain value: `gateway run` changes them on SIGHUP, and every
    /// validity check (per ping, per packet batch) reads them without a lock.
    limits: LimitCell,
}

/// [`SessionLimits`] that can be replaced while readers use them (three relaxed atomics: a
/// reader may see a mix of the old and new limits for an instant, which is harmless).
#[derive(Debug)]
struct LimitCell {
    idle_ms: AtomicU64,
    max_lifetime_ms: AtomicU64,
    grace_ms: AtomicU64,
}

impl LimitCell {
    fn new(l: SessionLimits) -> Self {
        Self {
            idle_ms: AtomicU64::new(l.idle_ms),
            max_lifetime_ms: AtomicU64::new(l.max_lifetime_ms),
            grace_ms: AtomicU64::new(l.grace_ms),
        }
    }

    fn get(&self) -> SessionLimits {
        SessionLimits {
            idle_ms: self.idle_ms.load(Ordering::Relaxed),
            max_lifetime_ms: self.max_lifetime_ms.load(Ordering::Relaxed),
            grace_ms: self.grace_ms.load(Ordering::Relaxed),
        }
    }

    fn set(&self, l: SessionLimits) {
        self.idle_ms.store(l.idle_ms, Ordering::Relaxed);
        self.max_lifetime_ms.store(l.max_lifetime_ms, Ordering::Relaxed);
        self.grace_ms.store(l.grace_ms, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable").field("len", &self.len()).field("limits", &self.limits.get()).finish()
    }
}

impl SessionTable {
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            tables: ArcSwap::from_pointee(Tables::default()),
            changes: Changes::default(),
            writer: Mutex::new(()),
            limits: LimitCell::new(limits),
        }
    }

    pub fn limits(&self) -> SessionLimits {
        self.limits.get()
    }

    /// Replaces the expiry settings (`gateway run` on SIGHUP). They apply to every session from
    /// the next check on, the ones already open included.
    pub fn set_limits(&self, limits: SessionLimits) {
        self.limits.set(limits);
    }

    /// Every session held (valid or not yet pruned), for observers (`gateway status`). A copy of
    /// the list; one atomic load, no lock.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.tables.load().by_id.values().cloned().collect()
    }

    /// Number of sessions held (valid or not yet pruned).
    pub fn len(&self) -> usize {
        self.tables.load().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table's change count (see [`Changes`]).
    pub fn changes(&self) -> Changes {
        self.changes.clone()
    }

    /// Whether `s` is valid at `now`, and if not, why.
    pub fn validity(&self, s: &Session, now: Millis) -> Result<(), Expiry> {
        self.valid_until(s, now).map(|_| ())
    }

    /// When `s`, valid at `now`, expires unless it is used again (its idle end moves with
    /// use) or the limits change; if it is not valid at `now`, why.
    pub fn valid_until(&self, s: &Session, now: Millis) -> Result<Millis, Expiry> {
        let l = &self.limits.get();
        let superseded = s.superseded_at.load(Ordering::Relaxed);
        let ends = [
            (superseded != CURRENT).then(|| (superseded.saturating_add(l.grace_ms), Expiry::Superseded)),
            Some((s.opened_at.saturating_add(l.max_lifetime_ms), Expiry::Lifetime)),
            Some((s.last_seen().saturating_add(l.idle_ms), Expiry::Idle)),
        ];
        let mut until = Millis::MAX;
        for (end, why) in ends.into_iter().flatten() {
            if now >= end {
                return Err(why);
            }
            until = until.min(end);
        }
        Ok(until)
    }

    /// PingSession's lookup: is `session_id` a valid session of the client `client` holding the
    /// certificate `cert`? A valid session is refreshed (its idle timer restarts at `now`).
    ///
    /// No lock and no heap allocation (proved by `tests/gateway_ping_noalloc.rs`): one atomic
    /// load, one hash lookup, a few comparisons.
    pub fn check(&self, client: &str, cert: &CertFingerprint, session_id: u64, now: Millis) -> PingVerdict {
        let tables = self.tables.load();
        let Some(s) = tables.by_id.get(&session_id) else {
            return PingVerdict::Expired(Expiry::Unknown);
        };
        if *s.client != *client || s.cert != *cert {
            return PingVerdict::Expired(Expiry::OtherClient);
        }
        match self.validity(s, now) {
            Ok(()) => {
                s.touch(now);
                PingVerdict::Ok
            }
            Err(why) => PingVerdict::Expired(why),
        }
    }

    /// The session with this id, valid or not (the data plane checks [`Self::validity`]).
    /// Lock-free and allocation-free.
    pub fn get(&self, id: SessionId) -> Option<Arc<Session>> {
        self.tables.load().by_id.get(&id.0).cloned()
    }

    /// The newest session of the client whose tunnel address (of either family) is `ip`.
    /// Lock-free, no allocation.
    pub fn get_by_ip(&self, ip: impl Into<IpAddr>) -> Option<Arc<Session>> {
        self.tables.load().by_ip.get(&ip.into()).cloned()
    }

    /// The session the newest one of `ip`'s client replaced, while the table still holds it (its
    /// grace period). The data plane sends on it until the client has used the new one: until
    /// then the gateway does not know where the client is on the new session. Lock-free, no
    /// allocation.
    pub fn previous_by_ip(&self, ip: impl Into<IpAddr>) -> Option<Arc<Session>> {
        self.tables.load().previous_by_ip.get(&ip.into()).cloned()
    }

    /// Opens a new session for a client, replacing its current one (which keeps `grace_ms`).
    ///
    /// `next_id` supplies random candidates; zero and ids of sessions still held are skipped, so
    /// the new id is unique among everything a client could still present.
    pub fn open(&self, new: NewSession, now: Millis, mut next_id: impl FnMut() -> u64) -> Opened {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.tables.load_full();
        let mut id = next_id();
        while id == 0 || old.by_id.contains_key(&id) {
            id = next_id();
        }
        let mut replaced = None;
        let mut next = Tables::default();
        for (sid, s) in &old.by_id {
            if self.validity(s, now).is_err() {
                continue; // prune while copying
            }
            if s.client == new.client {
                if s.superseded_at().is_some() {
                    continue; // only the immediately previous session gets a grace period
                }
                s.superseded_at.store(now, Ordering::Relaxed);
                replaced = Some(s.clone());
            }
            next.by_id.insert(*sid, s.clone());
        }
        let session = Arc::new(Session {
            id: SessionId(id),
            client: new.client,
            cert: new.cert,
            assigned_ip: new.assigned_ip,
            assigned_ip6: new.assigned_ip6,
            key: new.key,
            partial_checksums: new.partial_checksums,
            opened_at: now,
            last_seen: AtomicU64::new(now),
            superseded_at: AtomicU64::new(CURRENT),
        });
        next.by_id.insert(id, session.clone());
        (next.by_ip, next.previous_by_ip) = index_by_ip(&next.by_id);
        self.tables.store(Arc::new(next));
        self.changes.bump();
        Opened { session, replaced }
    }

    /// Keeps only the sessions `keep` accepts (e.g. those whose client the registry still
    /// admits). Returns the removed sessions. Cheap when all stay: a read-only scan, no lock.
    pub fn retain(&self, keep: impl Fn(&Session) -> bool) -> Vec<Arc<Session>> {
        if self.tables.load().by_id.values().all(|s| keep(s)) {
            return Vec::new();
        }
        self.rewrite(keep)
    }

    /// Drops every session that is no longer valid at `now`. Returns the removed sessions.
    /// Cheap when nothing expired: a read-only scan, no lock.
    pub fn prune(&self, now: Millis) -> Vec<Arc<Session>> {
        self.retain(|s| self.validity(s, now).is_ok())
    }

    fn rewrite(&self, keep: impl Fn(&Session) -> bool) -> Vec<Arc<Session>> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.tables.load_full();
        let (kept, removed): (HashMap<_, _>, HashMap<_, _>) =
            old.by_id.iter().map(|(k, v)| (*k, v.clone())).partition(|(_, s)| keep(s));
        if !removed.is_empty() {
            let (by_ip, previous_by_ip) = index_by_ip(&kept);
            self.tables.store(Arc::new(Tables { by_id: kept, by_ip, previous_by_ip }));
            self.changes.bump();
        }
        removed.into_values().collect()
    }
}

/// For each address, the client's newest session (its current one, or its superseded one while
/// the current one is gone), and the one before that, if the table still holds it.
fn index_by_ip(by_id: &HashMap<u64, Arc<Session>>) -> (HashMap<IpAddr, Arc<Session>>, HashMap<IpAddr, Arc<Session>>) {
    // A current session outranks a superseded one whatever their opening times (two sessions
    // of one client may open within the same millisecond); among equals, the later one wins.
    let rank = |s: &Session| (s.superseded_at().is_none(), s.opened_at, s.id.0);
    let better = |a: &Session, b: Option<&Arc<Session>>| b.is_none_or(|b| rank(a) > rank(b));
    let mut newest: HashMap<IpAddr, Arc<Session>> = HashMap::with_capacity(2 * by_id.len());
    let mut previous: HashMap<IpAddr, Arc<Session>> = HashMap::new();
    let addresses = by_id.values().flat_map(|s| {
        let v6 = s.assigned_ip6.map(|ip| (IpAddr::V6(ip), s));
        std::iter::once((IpAddr::V4(s.assigned_ip), s)).chain(v6)
    });
    for (ip, s) in addresses {
        let runner_up = if better(s, newest.get(&ip)) { newest.insert(ip, s.clone()) } else { Some(s.clone()) };
        if let Some(r) = runner_up
            && better(&r, previous.get(&ip))
        {
            previous.insert(ip, r);
        }
    }
    (newest, previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SessionLimits = SessionLimits { idle_ms: 1_000, max_lifetime_ms: 10_000, grace_ms: 200 };
    const ALICE_CERT: CertFingerprint = CertFingerprint([1; 32]);

    fn new(name: &str, ip: u8) -> NewSession {
        NewSession {
            client: name.into(),
            cert: CertFingerprint([ip; 32]),
            assigned_ip: Ipv4Addr::new(10, 0, 0, ip),
            assigned_ip6: Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(ip))),
            key: SessionKey::new([ip; 32]),
            partial_checksums: true,
        }
    }

    fn ids(seq: &[u64]) -> impl FnMut() -> u64 + '_ {
        let mut it = seq.iter().copied();
        move || it.next().expect("test ran out of ids")
    }

    #[test]
    fn valid_until_is_the_first_end_and_every_change_is_counted() {
        let t = SessionTable::new(LIMITS);
        let changes = t.changes();
        let s = t.open(new("alice", 1), 0, ids(&[7])).session;
        assert_eq!(changes.count(), 1, "an open");
        // Idle (1 s after last use) comes before the lifetime's end (10 s).
        assert_eq!(t.valid_until(&s, 0), Ok(1_000));
        s.touch(9_500);
        assert_eq!(t.valid_until(&s, 9_600), Ok(10_000), "now the lifetime ends first");
        assert_eq!(t.valid_until(&s, 10_000), Err(Expiry::Lifetime));
        assert_eq!(t.validity(&s, 10_000), Err(Expiry::Lifetime));
        // Superseded at 100: its grace (200 ms) ends first.
        let t = SessionTable::new(LIMITS);
        let changes = t.changes();
        let old = t.open(new("alice", 1), 0, ids(&[7])).session;
        t.open(new("alice", 1), 100, ids(&[8]));
        assert_eq!(changes.count(), 2, "two opens");
        assert_eq!(t.valid_until(&old, 150), Ok(300));
        assert_eq!(t.valid_until(&old, 300), Err(Expiry::Superseded));
        assert_eq!(t.prune(300).len(), 1);
        assert_eq!(changes.count(), 3, "a removal");
        assert!(t.prune(300).is_empty());
        assert_eq!(changes.count(), 3, "nothing removed, nothing changed");
        let idle = t.get(SessionId(8)).expect("current");
        assert_eq!(t.valid_until(&idle, 1_100), Err(Expiry::Idle));
    }

    #[test]
    fn ping_ok_refreshes_idle_timer() {
        let t = SessionTable::new(LIMITS);
        let s = t.open(new("alice", 1), 0, ids(&[7])).session;
        assert_eq!(t.check("alice", &ALICE_CERT, 7, 900), PingVerdict::Ok);
        assert_eq!(t.check("alice", &ALICE_CERT, 7, 1_800), PingVerdict::Ok, "refreshed at 900");
        assert_eq!(s.last_seen(), 1_800);
        assert_eq!(t.check("alice", &ALICE_CERT, 7, 2_800), PingVerdict::Expired(Expiry::Idle));
    }

    #[test]
    fn unknown_and_foreign_ids_expire() {
        let t = SessionTable::new(LIMITS);
        t.open(new("alice", 1), 0, ids(&[7]));
        t.open(new("bob", 2), 0, ids(&[8]));
        assert_eq!(t.check("alice", &ALICE_CERT, 9, 1), PingVerdict::Expired(Expiry::Unknown));
        assert_eq!(t.check("alice", &ALICE_CERT, 8, 1), PingVerdict::Expired(Expiry::OtherClient));
        // Right name, wrong certificate (a replaced client file).
        assert_eq!(t.check("alice", &CertFingerprint([9; 32]), 7, 1), PingVerdict::Expired(Expiry::OtherClient));
    }

    #[test]
    fn lifetime_caps_even_an_active_session() {
        let t = SessionTable::new(LIMITS);
        t.open(new("alice", 1), 0, ids(&[7]));
        for now in (500..10_000).step_by(500) {
            assert_eq!(t.check("alice", &ALICE_CERT, 7, now), PingVerdict::Ok);
        }
        assert_eq!(t.check("alice", &ALICE_CERT, 7, 10_000), PingVerdict::Expired(Expiry::Lifetime));
    }

    #[test]
    fn reauth_keeps_previous_for_grace_only_and_drops_older() {
        let t = SessionTable::new(LIMITS);
        t.open(new("alice", 1), 0, ids(&[1]));
        let o = t.open(new("alice", 1), 100, ids(&[2]));
        assert_eq!(o.replaced.as_ref().map(|s| s.id), Some(SessionId(1)));
        assert_eq!(t.check("alice", &ALICE_CERT, 1, 299), PingVerdict::Ok, "in grace");
        assert_eq!(t.check("alice", &ALICE_CERT, 1, 300), PingVerdict::Expired(Expiry::Superseded));
        assert_eq!(t.check("alice", &ALICE_CERT, 2, 300), PingVerdict::Ok);
        // A third session drops the first at once and gives the second its grace.
        let o = t.open(new("alice", 1), 150, ids(&[3]));
        assert_eq!(o.replaced.map(|s| s.id), Some(SessionId(2)));
        assert_eq!(t.len(), 2);
        assert!(t.get(SessionId(1)).is_none());
        assert_eq!(t.get_by_ip(Ipv4Addr::new(10, 0, 0, 1)).map(|s| s.id), Some(SessionId(3)));
        assert_eq!(
            t.previous_by_ip(Ipv4Addr::new(10, 0, 0, 1)).map(|s| s.id),
            Some(SessionId(2)),
            "the replaced session stays reachable by address for its grace"
        );
        // The same by the IPv6 address.
        let ip6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        assert_eq!(t.get_by_ip(ip6).map(|s| s.id), Some(SessionId(3)));
        assert_eq!(t.previous_by_ip(ip6).map(|s| s.id), Some(SessionId(2)));
        assert!(t.get_by_ip(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)).is_none());
        let s = t.get_by_ip(ip6).unwrap();
        assert!(s.owns(ip6.into()) && s.owns(Ipv4Addr::new(10, 0, 0, 1).into()));
        assert!(!s.owns(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into()));
        t.prune(350);
        assert!(t.previous_by_ip(Ipv4Addr::new(10, 0, 0, 1)).is_none(), "grace over");
        assert_eq!(t.get_by_ip(Ipv4Addr::new(10, 0, 0, 1)).map(|s| s.id), Some(SessionId(3)));
    }

    #[test]
    fn a_reauth_within_the_same_millisecond_still_makes_the_new_session_newest() {
        let t = SessionTable::new(LIMITS);
        // Ids chosen so that the old session would win on id alone.
        t.open(new("alice", 1), 40, ids(&[9]));
        t.open(new("alice", 1), 40, ids(&[4]));
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(t.get_by_ip(ip).map(|s| s.id), Some(SessionId(4)));
        assert_eq!(t.previous_by_ip(ip).map(|s| s.id), Some(SessionId(9)));
        assert!(t.previous_by_ip(Ipv4Addr::new(10, 0, 0, 2)).is_none());
    }

    #[test]
    fn ids_skip_zero_and_live_collisions() {
        let t = SessionTable::new(LIMITS);
        t.open(new("alice", 1), 0, ids(&[5]));
        let s = t.open(new("bob", 2), 0, ids(&[0, 5, 6])).session;
        assert_eq!(s.id, SessionId(6));
    }

    #[test]
    fn prune_and_retain_remove_from_both_indexes() {
        let t = SessionTable::new(LIMITS);
        t.open(new("alice", 1), 0, ids(&[1]));
        t.open(new("bob", 2), 500, ids(&[2]));
        assert!(t.prune(999).is_empty());
        let gone = t.prune(1_000);
        assert_eq!(gone.iter().map(|s| s.id).collect::<Vec<_>>(), vec![SessionId(1)]);
        assert!(t.get_by_ip(Ipv4Addr::new(10, 0, 0, 1)).is_none());
        assert!(t.get_by_ip(Ipv4Addr::new(10, 0, 0, 2)).is_some());
        let gone = t.retain(|s| &*s.client != "bob");
        assert_eq!(gone.len(), 1);
        assert!(t.is_empty());
        assert!(t.get_by_ip(Ipv4Addr::new(10, 0, 0, 2)).is_none());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let t = SessionTable::new(LIMITS);
        let s = t.open(new("alice", 0x5a), 0, ids(&[1])).session;
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("90, 90") && !dbg.contains(&"5a".repeat(32)), "{dbg}");
        assert!(dbg.contains(&s.key.fingerprint().to_string()));
    }
}
