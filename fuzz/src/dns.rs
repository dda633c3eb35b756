//! The gateway resolver's request handling (`holdfast::sansio::dns`, and the per-client gate of
//! `holdfast::gateway::dns`): what a tunnel client (or a hostile upstream) can send it.
//!
//! Input: `u16` upstream id, a length-prefixed query, a length-prefixed upstream reply, then the
//! rest drives the per-client gate (each byte: client `b & 7`, `b >> 3` ms later, admit; a high
//! bit set on the next byte means "answered" first).
//!
//! Oracles:
//! - nothing panics (truncated messages, compression loops, oversized input, any bytes);
//! - a local reply (FORMERR/NOTIMP/REFUSED) is a response to the query's id, never larger than a
//!   message may be; a query that is not one (too short, a response) gets no reply at all;
//! - a forwarded query carries the upstream id and is at most `MAX_MESSAGE` bytes; its SERVFAIL
//!   carries the client's id and rcode 2;
//! - an upstream reply is passed on only under the client's id and as a response, and the query
//!   itself echoed back is never taken for an answer;
//! - the gate never has more of one client's queries in flight than its cap.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use holdfast::gateway::dns::{Admission, ClientGate};
use holdfast::sansio::dns::{MAX_MESSAGE, Verdict, check_query, check_reply, servfail};

use super::input::Reader;

/// The gate's settings in the harness: small, so the limits are reached.
pub const RATE: u32 = 5;
pub const BURST: u32 = 10;
pub const IN_FLIGHT: u32 = 3;

fn id_of(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn is_response(b: &[u8]) -> bool {
    b.len() >= 12 && b[2] & 0x80 != 0
}

pub fn dns_query(data: &[u8]) {
    let mut r = Reader::new(data);
    let upstream_id = r.u16();
    let query = r.bytes();
    let reply = r.bytes();
    let gate_ops = r.rest();

    match check_query(query, upstream_id) {
        Verdict::Drop(_) => {}
        Verdict::Reply(bytes) => {
            assert!(query.len() >= 12 && query.len() <= MAX_MESSAGE, "replied to a non-query");
            assert!(query[2] & 0x80 == 0, "replied to a response (reflection)");
            assert!(is_response(&bytes), "local reply is not a response: {bytes:?}");
            assert_eq!(id_of(&bytes), id_of(query), "local reply under another id");
            assert!(bytes.len() <= MAX_MESSAGE);
        }
        Verdict::Forward(f) => {
            assert!(f.wire.len() <= MAX_MESSAGE && f.wire.len() >= 12);
            assert_eq!(id_of(&f.wire), upstream_id, "forwarded under another id");
            assert!(!is_response(&f.wire), "forwarded a response");
            assert_eq!(f.client_id, id_of(query));
            let sf = servfail(&f);
            assert!(is_response(&sf) && id_of(&sf) == f.client_id && sf[3] & 0x0f == 2, "{sf:?}");
            assert!(check_reply(&f, &f.wire).is_err(), "the query echoed back was taken as an answer");
            if let Ok(answer) = check_reply(&f, reply) {
                assert!(is_response(&answer), "passed on a non-response");
                assert_eq!(id_of(&answer), f.client_id, "answer under another id");
                assert!(answer.len() <= MAX_MESSAGE.max(reply.len()) + 512);
            }
        }
    }

    let mut gate = ClientGate::new(RATE, BURST, IN_FLIGHT);
    let t0 = Instant::now();
    let mut now = t0;
    let mut in_flight = [0u32; 8];
    for b in gate_ops {
        let client = usize::from(b & 7);
        let ip = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2 + (b & 7)));
        if b & 0x80 != 0 && in_flight[client] > 0 {
            gate.done(ip);
            in_flight[client] -= 1;
            continue;
        }
        now += Duration::from_millis(u64::from(b >> 3));
        if gate.admit(ip, now) == Admission::Admitted {
            in_flight[client] += 1;
            assert!(in_flight[client] <= IN_FLIGHT, "client {client} over its in-flight cap");
        }
    }
    gate.forget_idle(now + Duration::from_secs(3600));
    assert!(in_flight.iter().sum::<u32>() > 0 || gate.is_empty(), "an idle client was kept");
}
