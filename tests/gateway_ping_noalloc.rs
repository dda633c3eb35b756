//! Proves that PingSession's lookup allocates nothing: `SessionTable::check` (hit, miss, another
//! client's session, expired) and the registry admission check it runs first, plus the data
//! plane's lookups by id and address.
//!
//! A counting global allocator counts only on the thread that armed it, so other tests (or
//! the test harness) running in parallel cannot disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::Ipv4Addr;

use holdfast::gateway::live::{LiveRegistry, Refusal};
use holdfast::gateway::registry::Registry;
use holdfast::gateway::sessions::{Expiry, NewSession, PingVerdict, SessionLimits, SessionTable};
use holdfast::pki::CertFingerprint;
use holdfast::snapshot::{SessionId, SessionKey};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc() {
    // `try_with`: never panic inside the allocator, even during thread teardown.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns how many allocations this thread made meanwhile.
fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|n| n.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    ALLOCS.with(|n| n.get())
}

const LIMITS: SessionLimits = SessionLimits {
    idle_ms: 1_000,
    max_lifetime_ms: 100_000,
    grace_ms: 100,
};

fn cert(n: u8) -> CertFingerprint {
    CertFingerprint([n; 32])
}

#[test]
fn ping_lookup_does_not_allocate() {
    // Positive control: the counter does see allocations on this thread.
    assert!(allocations_during(|| drop(std::hint::black_box(Box::new(7u64)))) >= 1);

    let table = SessionTable::new(LIMITS);
    let mut ids = [11u64, 22, 33].into_iter();
    let mut next = || ids.next().unwrap_or(99);
    let alice = |ip: u8| NewSession {
        client: "alice".into(),
        cert: cert(1),
        assigned_ip: Ipv4Addr::new(10, 0, 0, ip),
        key: SessionKey::new([1; 32]),
    };
    table.open(alice(2), 0, &mut next);
    table.open(
        NewSession {
            client: "bob".into(),
            cert: cert(2),
            assigned_ip: Ipv4Addr::new(10, 0, 0, 3),
            key: SessionKey::new([2; 32]),
        },
        0,
        &mut next,
    );
    // Many more sessions, so lookups go through a realistically sized map.
    for i in 0..500u32 {
        let name = format!("c{i}");
        let ip = Ipv4Addr::from(0x0a01_0000 + i);
        table.open(
            NewSession {
                client: name.into(),
                cert: cert(3),
                assigned_ip: ip,
                key: SessionKey::new([3; 32]),
            },
            0,
            || 1000 + u64::from(i),
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clients.toml");
    let subnet = "10.0.0.0/24".parse().unwrap();
    let mut reg = Registry::empty(&path, subnet, Ipv4Addr::new(10, 0, 0, 1));
    let plan = reg.plan_add("alice", None).unwrap();
    reg.commit_add("alice", plan, cert(1), "t");
    reg.save().unwrap();
    let live = LiveRegistry::open(&path, subnet, Ipv4Addr::new(10, 0, 0, 1)).unwrap();

    let probe = || {
        let view = live.view();
        assert!(view.admit("alice", &cert(1)).is_ok());
        assert_eq!(
            view.admit("alice", &cert(9)).err(),
            Some(Refusal::CertificateReplaced)
        );
        assert_eq!(
            view.admit("mallory", &cert(1)).err(),
            Some(Refusal::NotRegistered)
        );
        assert_eq!(table.check("alice", &cert(1), 11, 500), PingVerdict::Ok);
        assert_eq!(
            table.check("alice", &cert(1), 12345, 500),
            PingVerdict::Expired(Expiry::Unknown)
        );
        assert_eq!(
            table.check("alice", &cert(1), 22, 500),
            PingVerdict::Expired(Expiry::OtherClient)
        );
        assert_eq!(
            table.check("bob", &cert(2), 22, 5_000),
            PingVerdict::Expired(Expiry::Idle)
        );
        assert!(table.get(SessionId(11)).is_some());
        assert!(table.get_by_ip(Ipv4Addr::new(10, 0, 0, 2)).is_some());
        assert!(table.get_by_ip(Ipv4Addr::new(10, 0, 0, 200)).is_none());
    };
    // Warm-up: arc-swap registers this thread (one allocation) on its first load.
    probe();
    let n = allocations_during(|| {
        for _ in 0..1_000 {
            probe();
        }
    });
    assert_eq!(n, 0, "PingSession's lookup allocated {n} times");
}
