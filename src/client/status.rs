//! The client's status feed: what the dashboard, `holdfast status` and tests observe. Published by
//! the driver after every event; observers only read it, they never drive the machine.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use crate::sansio::supervisor::{Now, StateName, Status};
use crate::snapshot::{KeyFingerprint, SessionId, VpnAuthResponse};

/// One transition, for the "recent transitions" list.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionRecord {
    pub at: Now,
    pub from: StateName,
    pub to: StateName,
    pub cause: String,
}

/// What may be shown of a snapshot: never the key, only its fingerprint.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotView {
    pub assigned_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway_ip: Ipv4Addr,
    /// The IPv6 side, when the session has one.
    pub assigned_ip6: Option<Ipv6Addr>,
    pub prefix_len6: u8,
    pub gateway_ip6: Option<Ipv6Addr>,
    pub session_id: SessionId,
    pub key_fingerprint: KeyFingerprint,
    pub received_at: SystemTime,
    pub idle_timeout: Duration,
}

impl SnapshotView {
    pub fn of(a: &VpnAuthResponse) -> Self {
        Self {
            assigned_ip: a.assigned_ip,
            prefix_len: a.prefix_len,
            gateway_ip: a.gateway_ip,
            assigned_ip6: a.assigned_ip6,
            prefix_len6: a.prefix_len6,
            gateway_ip6: a.gateway_ip6,
            session_id: a.session_id,
            key_fingerprint: a.session_key.fingerprint(),
            received_at: a.received_at,
            idle_timeout: a.idle_timeout,
        }
    }
}

/// The whole published status.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientStatus {
    /// The supervisor's time zero: machine time `t` is `epoch + t`. Lets an observer started at
    /// any moment turn `since` and timer deadlines into ages and countdowns exactly.
    pub epoch: std::time::Instant,
    pub supervisor: Status,
    pub snapshot: Option<SnapshotView>,
    pub recent: Vec<TransitionRecord>,
}

impl ClientStatus {
    /// The status before the supervisor has handled anything.
    pub fn initial(epoch: std::time::Instant) -> Self {
        Self {
            epoch,
            supervisor: Status {
                state: StateName::Unauthed,
                superstate: None,
                since: Duration::ZERO,
                last_cause: String::new(),
                next_timer: None,
                backoff: Duration::ZERO,
                failures: 0,
                last_rtt: None,
            },
            snapshot: None,
            recent: Vec::new(),
        }
    }
}
