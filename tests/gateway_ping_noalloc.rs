//! Proves that PingSession's lookup allocates nothing: `SessionTable::check` (hit, miss, another
//! client's session, expired) and the registry admission check it runs first, plus the data
//! plane's lookups by id and address.
//!
//! A counting global allocator counts only on the thread that armed it, so other tests (or
//! the test harness) running in parallel cannot disturb the count.

mod support;

use std::net::Ipv4Addr;

use holdfast::gateway::live::{LiveRegistry, Refusal};
use holdfast::gateway::registry::Registry;
use holdfast::gateway::sessions::{Expiry, NewSession, PingVerdict, SessionLimits, SessionTable};
use holdfast::pki::CertFingerprint;
use holdfast::snapshot::{SessionId, SessionKey};

#[global_allocator]
static GLOBAL: support::alloc::Counting = support::alloc::Counting;

use support::alloc::allocations_in as allocations_during;

const LIMITS: SessionLimits = SessionLimits { idle_ms: 1_000, max_lifetime_ms: 100_000, grace_ms: 100 };

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
        assigned_ip6: None,
        key: SessionKey::new([1; 32]),
        partial_checksums: true,
    };
    table.open(alice(2), 0, &mut next);
    table.open(
        NewSession {
            client: "bob".into(),
            cert: cert(2),
            assigned_ip: Ipv4Addr::new(10, 0, 0, 3),
            assigned_ip6: None,
            key: SessionKey::new([2; 32]),
            partial_checksums: true,
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
                assigned_ip6: None,
                key: SessionKey::new([3; 32]),
                partial_checksums: true,
            },
            0,
            || 1000 + u64::from(i),
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clients.toml");
    let subnet = "10.0.0.0/24".parse().unwrap();
    let mut reg = Registry::empty(&path, subnet, Ipv4Addr::new(10, 0, 0, 1), None);
    let plan = reg.plan_add("alice", None).unwrap();
    reg.commit_add("alice", plan, cert(1), "t");
    reg.save().unwrap();
    let live = LiveRegistry::open(&path, subnet, Ipv4Addr::new(10, 0, 0, 1), None).unwrap();

    let probe = || {
        let view = live.view();
        assert!(view.admit("alice", &cert(1)).is_ok());
        assert_eq!(view.admit("alice", &cert(9)).err(), Some(Refusal::CertificateReplaced));
        assert_eq!(view.admit("mallory", &cert(1)).err(), Some(Refusal::NotRegistered));
        assert_eq!(table.check("alice", &cert(1), 11, 500), PingVerdict::Ok);
        assert_eq!(table.check("alice", &cert(1), 12345, 500), PingVerdict::Expired(Expiry::Unknown));
        assert_eq!(table.check("alice", &cert(1), 22, 500), PingVerdict::Expired(Expiry::OtherClient));
        assert_eq!(table.check("bob", &cert(2), 22, 5_000), PingVerdict::Expired(Expiry::Idle));
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
