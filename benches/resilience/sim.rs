//! Outages too long to wait for, on a virtual clock: the real, pure supervisor ([`Supervisor`])
//! driven by a discrete-event model of the gateway, the control plane and the data plane, with
//! round trips measured on this machine in the same run.
//!
//! What the model keeps from reality: the supervisor's decisions, timers and jitter, exactly
//! (it is the production machine); a restarted gateway forgets every session; while it is down,
//! an RPC is refused at once (the gateway's host is up, its port closed), a data packet is lost;
//! once it is back, a packet of a forgotten session draws an "unknown session" notice, which the
//! client's data plane turns into a nudge, rate-limited as the real one is. What it simplifies:
//! fixed latencies (the medians measured in the same run) and traffic at a fixed interval.
//!
//! The real rows of the same table (1 s, 30 s, 6 min with real processes) check the model.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use holdfast::sansio::supervisor::{Effect, Event, PingFailure, StateName, Supervisor, Timer, Timings};
use holdfast::snapshot::VpnAuthResponse;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Latencies of the modelled world.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    /// One-way delay through the tunnel (half the measured tunnel ping).
    pub one_way: Duration,
    /// An RPC on an established connection (the measured PingSession median).
    pub rpc: Duration,
    /// The first RPC after the gateway restarted: TCP + TLS 1.3 handshake + the call (measured).
    pub cold_rpc: Duration,
    /// A connection attempt to a gateway that is down (refused by its host).
    pub refused: Duration,
    /// How often the user's traffic sends a packet (the real rows ping every 10 ms).
    pub traffic_every: Duration,
    /// Whether the data plane turns "unknown session" notices into nudges (it does; `false` is
    /// the counterfactual that shows what the nudges save).
    pub nudges: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Happening {
    /// The user's traffic sends one packet.
    Packet,
    /// An "unknown session" notice reaches the client.
    Notice,
    /// An RPC result reaches the driver (index into `results`).
    Result(usize),
}

/// Runs one outage: the client authenticates at t=0, the gateway dies at `down_at` and comes back
/// (with an empty session table) `outage` later. Returns the time from its return to the first
/// packet delivered through the tunnel, or `None` if nothing got through within `give_up`.
pub fn recovery(model: &Model, timings: &Timings, outage: Duration, seed: u64) -> Option<Duration> {
    let give_up = Duration::from_secs(600);
    let mut rng = StdRng::seed_from_u64(seed);
    let down_at = Duration::from_secs(60);
    // The gateway returns at a random moment between two of the user's packets.
    let up_at = down_at + outage + model.traffic_every.mul_f64(rng.random::<f64>());
    let gateway_up = |t: Duration| t < down_at || t >= up_at;
    // Sessions the gateway knows: before the outage every one; after it, only those it handed
    // out after it came back.
    let mut issued_after_restart: Vec<u64> = Vec::new();
    let mut next_session = 1u64;

    let mut machine = Supervisor::new(timings.clone());
    let mut queue: BinaryHeap<Reverse<(Duration, Happening)>> = BinaryHeap::new();
    let mut results: Vec<Event> = Vec::new();
    let mut timer: Option<(Duration, Timer)> = None;
    let mut installed: Option<u64> = None;
    let mut last_nudge: Option<Duration> = None;
    let mut cold = false; // the client's connection died with the gateway
    let mut now = Duration::ZERO;
    queue.push(Reverse((Duration::ZERO, Happening::Packet)));

    let mut pending = vec![Event::Started];
    loop {
        for event in pending.drain(..) {
            for effect in machine.handle(event, now, &mut rng) {
                match effect {
                    Effect::CallAuthenticate { attempt, .. } => {
                        let (at, ev) = if gateway_up(now) {
                            let at = now + if std::mem::take(&mut cold) { model.cold_rpc } else { model.rpc };
                            let id = next_session;
                            next_session += 1;
                            if now >= up_at {
                                issued_after_restart.push(id);
                            }
                            (
                                at,
                                Event::AuthSucceeded { attempt, auth: Arc::new(VpnAuthResponse::fixture(id, [7; 32])) },
                            )
                        } else {
                            cold = true;
                            let failure = holdfast::sansio::supervisor::AuthFailure::Unreachable;
                            (now + model.refused, Event::AuthFailed { attempt, failure })
                        };
                        results.push(ev);
                        queue.push(Reverse((at, Happening::Result(results.len() - 1))));
                    }
                    Effect::CallPing { attempt, session_id, .. } => {
                        let (at, ev) = if gateway_up(now) {
                            let at = now + if std::mem::take(&mut cold) { model.cold_rpc } else { model.rpc };
                            let known = now < down_at || issued_after_restart.contains(&session_id.0);
                            let ev = if known {
                                Event::PingSucceeded { attempt, rtt: model.rpc }
                            } else {
                                Event::SessionExpired { attempt }
                            };
                            (at, ev)
                        } else {
                            cold = true;
                            (now + model.refused, Event::PingFailed { attempt, failure: PingFailure::Unreachable })
                        };
                        results.push(ev);
                        queue.push(Reverse((at, Happening::Result(results.len() - 1))));
                    }
                    Effect::ArmTimer { at, timer: t } => timer = Some((at, t)),
                    Effect::CancelTimer => timer = None,
                    Effect::SwapSnapshot(auth) => installed = Some(auth.session_id.0),
                    // One gateway here: the machine is never told of others, so it never switches.
                    Effect::Log(_) | Effect::Exit | Effect::SwitchGateway => {}
                }
            }
        }
        // The next thing to happen: the armed timer or the head of the queue.
        let head = queue.peek().map(|Reverse((at, _))| *at);
        match (timer, head) {
            (Some((at, t)), h) if h.is_none_or(|h| at <= h) => {
                now = at;
                timer = None;
                pending.push(Event::TimerFired(t));
            }
            (_, Some(_)) => {
                let Some(Reverse((at, what))) = queue.pop() else { unreachable!("peeked") };
                now = at;
                match what {
                    Happening::Result(i) => pending.push(results[i].clone()),
                    Happening::Packet => {
                        queue.push(Reverse((now + model.traffic_every, Happening::Packet)));
                        let arrives = now + model.one_way;
                        let Some(session) = installed else { continue };
                        if !gateway_up(arrives) {
                            continue; // lost with the gateway
                        }
                        if arrives < down_at || issued_after_restart.contains(&session) {
                            if arrives >= up_at {
                                return Some(arrives - up_at);
                            }
                        } else {
                            queue.push(Reverse((arrives + model.one_way, Happening::Notice)));
                        }
                    }
                    Happening::Notice => {
                        // The data plane's own rate limit, then the machine's (both 1 s by default).
                        if model.nudges && last_nudge.is_none_or(|t| now - t >= timings.nudge_min_interval) {
                            last_nudge = Some(now);
                            pending.push(Event::Nudged);
                        }
                    }
                }
            }
            (None, None) => return None,
            (Some(_), None) => unreachable!("covered by the first arm"),
        }
        if now > up_at + give_up {
            return None;
        }
        debug_assert!(machine.state() != StateName::Stopped);
    }
}
