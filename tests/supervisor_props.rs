//! Property tests of the supervisor against a reference model (proptest-state-machine).
//!
//! Random sequences of events (auth and ping results with current and stale attempt numbers,
//! SESSION_EXPIRED, timer firings, re-auth requests, nudges, Stop) and time steps are applied to
//! both the model and the machine. The model says, for each step, which effects the machine
//! must produce; the test checks every effect against that, plus the spec's properties directly:
//! - the snapshot changes only on AuthSucceeded for the awaited attempt, as the exact `Arc`
//!   the driver handed in; nothing else changes or clears it;
//! - SESSION_EXPIRED leads to Authing and a CallAuthenticate with the snapshot unchanged;
//! - Exit appears only in answer to Stop (and last);
//! - every wait is within bounds: health checks in [health_min, health_max], retries in
//!   [base/2, base] with base = backoff_initial doubled per consecutive failure, capped at
//!   backoff_max, non-decreasing over a failure streak and reset by a success;
//! - a repeated failure of a kind already warned about never warns again;
//! - every RPC effect carries a fresh attempt and deadline == now + rpc_deadline.
//!
//! Jitter comes from a `StdRng` seeded by the generated initial state, so failures replay.

use std::sync::Arc;
use std::time::Duration;

use holdfast::sansio::supervisor::{
    AuthFailure, Effect, Event, FAILOVER_AFTER, Level, PingFailure, StateName, Supervisor, Timer, Timings,
};
use holdfast::snapshot::{SessionId, VpnAuthResponse};
use proptest::prelude::*;
use proptest::sample::select;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use rand::SeedableRng;
use rand::rngs::StdRng;

const S: Duration = Duration::from_secs(1);

fn timings() -> Timings {
    Timings {
        health_min: 15 * S,
        health_max: 30 * S,
        rpc_deadline: 5 * S,
        backoff_initial: S,
        backoff_max: 300 * S,
        // Short, so that generated time steps cross it and the repeat rule is exercised.
        repeat_log_every: 60 * S,
        nudge_min_interval: S,
    }
}

/// Which RPC an attempt belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Auth,
    Ping,
}

/// A failure kind, for the warn-once rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Auth(AuthFailure),
    Ping(PingFailure),
}

/// How long an armed timer may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// A health check: in [health_min, health_max].
    Health,
    /// A retry: in [base/2, base].
    Retry { base: Duration },
}

/// What the machine must emit for the last step.
#[derive(Debug, Clone, Default)]
struct Expect {
    transition: Option<(StateName, StateName)>,
    level: Option<Level>,
    /// The failure's kind had already been warned about since the last success.
    repeated_failure: bool,
    swap: bool,
    call: Option<(Rpc, u64)>,
    arm: Option<(Timer, Wait)>,
    cancel: bool,
    exit: bool,
    /// The machine asks the driver to move to the next gateway.
    switch: bool,
}

/// The reference model: the spec's rules, written plainly.
#[derive(Debug, Clone)]
struct Model {
    seed: u64,
    now: Duration,
    state: StateName,
    last_attempt: u64,
    pending: Option<(u64, Rpc)>,
    timer: Option<Timer>,
    failures: u32,
    installed: Option<SessionId>,
    warned: Vec<Kind>,
    last_loud: Option<Duration>,
    last_nudge: Option<Duration>,
    /// Gateways known (GatewaysChanged), and moves to another since the last success/backoff.
    gateways: usize,
    switches: usize,
    expect: Expect,
}

/// One generated step.
#[derive(Debug, Clone)]
enum Step {
    Advance(Duration),
    Deliver(Event),
}

impl Model {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            now: Duration::ZERO,
            state: StateName::Unauthed,
            last_attempt: 0,
            pending: None,
            timer: None,
            failures: 0,
            installed: None,
            warned: Vec::new(),
            last_loud: None,
            last_nudge: None,
            gateways: 1,
            switches: 0,
            expect: Expect::default(),
        }
    }

    fn awaits(&self, attempt: u64, rpc: Rpc) -> bool {
        self.pending == Some((attempt, rpc))
    }

    fn nudge_ok(&self) -> bool {
        self.last_nudge.is_none_or(|t| self.now - t >= timings().nudge_min_interval)
    }

    /// backoff_initial * 2^(failures-1), capped; zero without failures.
    fn base(&self) -> Duration {
        let t = timings();
        match self.failures {
            0 => Duration::ZERO,
            n => {
                let mut d = t.backoff_initial;
                for _ in 1..n {
                    d = (d * 2).min(t.backoff_max);
                }
                d.min(t.backoff_max)
            }
        }
    }

    fn begin(&mut self, rpc: Rpc) {
        self.last_attempt += 1;
        self.pending = Some((self.last_attempt, rpc));
        self.expect.call = Some((rpc, self.last_attempt));
    }

    fn settle(&mut self) {
        self.pending = None;
    }

    fn fail(&mut self) {
        self.pending = None;
        self.failures += 1;
    }

    fn arm(&mut self, timer: Timer, wait: Wait) {
        self.timer = Some(timer);
        self.expect.arm = Some((timer, wait));
    }

    fn deliver(&mut self, ev: &Event) {
        use StateName::*;
        let from = self.state;
        let connected = matches!(from, Healthy | Degraded);
        let to = match ev {
            _ if from == Stopped => None,
            Event::Stop => Some(Stopped),
            Event::Started if from == Unauthed => Some(Authing),
            Event::AuthSucceeded { attempt, auth } if from == Authing && self.awaits(*attempt, Rpc::Auth) => {
                self.settle();
                self.installed = Some(auth.session_id);
                self.expect.swap = true;
                Some(Healthy)
            }
            Event::GatewaysChanged { count } => {
                self.gateways = (*count).max(1);
                None
            }
            Event::GatewaySwitched if from == Failover => Some(Authing),
            Event::AuthFailed { attempt, failure } if from == Authing && self.awaits(*attempt, Rpc::Auth) => {
                self.fail();
                // Unreachable or silent: try the next gateway, once each per round.
                let transport = matches!(failure, AuthFailure::Unreachable | AuthFailure::TimedOut);
                if transport && self.switches + 1 < self.gateways { Some(Failover) } else { Some(Backoff) }
            }
            Event::TimerFired(Timer::Retry) if from == Backoff && self.timer == Some(Timer::Retry) => {
                self.timer = None;
                Some(Authing)
            }
            Event::Nudged | Event::UnderlayChanged if from == Backoff && self.nudge_ok() => {
                self.last_nudge = Some(self.now);
                Some(Authing)
            }
            Event::UnderlayChanged if from == Authing && self.nudge_ok() => {
                // A fresh attempt: re-entry sends it, the one in flight becomes stale.
                self.last_nudge = Some(self.now);
                self.settle();
                Some(Authing)
            }
            Event::ReauthRequested if from == Backoff || connected => Some(Authing),
            Event::TimerFired(Timer::Health) if connected && self.timer == Some(Timer::Health) => {
                self.timer = None;
                self.begin(Rpc::Ping);
                None
            }
            Event::Nudged | Event::UnderlayChanged if connected && self.nudge_ok() => {
                self.last_nudge = Some(self.now);
                self.begin(Rpc::Ping);
                None
            }
            Event::SessionExpired { attempt } if connected && self.awaits(*attempt, Rpc::Ping) => {
                self.settle();
                Some(Authing)
            }
            Event::PingSucceeded { attempt, .. } if connected && self.awaits(*attempt, Rpc::Ping) => {
                self.settle();
                if from == Healthy {
                    self.arm(Timer::Health, Wait::Health);
                    None
                } else {
                    Some(Healthy)
                }
            }
            Event::PingFailed { attempt, failure } if connected && self.awaits(*attempt, Rpc::Ping) => {
                self.fail();
                // The FAILOVER_AFTER-th transport failure in a row moves to another gateway.
                let transport = matches!(failure, PingFailure::Unreachable | PingFailure::TimedOut);
                if from == Degraded && transport && self.failures >= FAILOVER_AFTER && self.switches + 1 < self.gateways
                {
                    Some(Failover)
                } else {
                    Some(Degraded)
                }
            }
            _ => None,
        };
        if let Some(to) = to {
            self.enter(to);
            self.state = to;
            self.expect.transition = Some((from, to));
            self.expect.level = Some(self.level(ev));
        }
    }

    fn enter(&mut self, to: StateName) {
        match to {
            StateName::Authing => {
                self.expect.cancel = self.timer.take().is_some();
                self.begin(Rpc::Auth);
            }
            StateName::Backoff => {
                self.switches = 0;
                self.arm(Timer::Retry, Wait::Retry { base: self.base() })
            }
            StateName::Failover => {
                self.switches += 1;
                self.expect.cancel = self.timer.take().is_some();
                self.expect.switch = true;
            }
            StateName::Degraded => self.arm(Timer::Health, Wait::Retry { base: self.base() }),
            StateName::Healthy => {
                self.failures = 0;
                self.switches = 0;
                self.warned.clear();
                self.last_loud = None;
                self.arm(Timer::Health, Wait::Health);
            }
            StateName::Stopped => {
                self.pending = None;
                self.timer = None;
                self.expect.cancel = true;
                self.expect.exit = true;
            }
            StateName::Unauthed => unreachable!("nothing leads back to Unauthed"),
        }
    }

    /// Failures: warn the first time per kind since the last success, then info once per
    /// repeat_log_every, else debug. Retries by timer or nudge: debug. The rest: info.
    fn level(&mut self, ev: &Event) -> Level {
        let kind = match ev {
            Event::AuthFailed { failure, .. } => Kind::Auth(*failure),
            Event::PingFailed { failure, .. } => Kind::Ping(*failure),
            Event::TimerFired(_) | Event::Nudged | Event::UnderlayChanged => return Level::Debug,
            _ => return Level::Info,
        };
        if !self.warned.contains(&kind) {
            self.warned.push(kind);
            self.last_loud = Some(self.now);
            return Level::Warn;
        }
        self.expect.repeated_failure = true;
        if self.last_loud.is_none_or(|t| self.now - t >= timings().repeat_log_every) {
            self.last_loud = Some(self.now);
            Level::Info
        } else {
            Level::Debug
        }
    }
}

fn snap(id: u64) -> Arc<VpnAuthResponse> {
    Arc::new(VpnAuthResponse::fixture(id, [(id % 251) as u8; 32]))
}

struct SupervisorModel;

impl ReferenceStateMachine for SupervisorModel {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        any::<u64>().prop_map(Model::new).boxed()
    }

    fn transitions(m: &Model) -> BoxedStrategy<Step> {
        // Mostly the awaited attempt, sometimes a stale or future one.
        let current = m.pending.map_or(m.last_attempt, |(a, _)| a);
        let attempt = prop_oneof![4 => Just(current), 1 => 0..current + 3].boxed();
        let auth_failure = select(vec![
            AuthFailure::Rejected,
            AuthFailure::CertificateRefused,
            AuthFailure::Unreachable,
            AuthFailure::TimedOut,
            AuthFailure::GatewayError,
        ]);
        let ping_failure = select(vec![PingFailure::Unreachable, PingFailure::TimedOut, PingFailure::GatewayError]);
        // Mostly the armed timer: a real driver only fires what was armed.
        let timer = match m.timer {
            Some(t) => prop_oneof![4 => Just(t), 1 => select(vec![Timer::Health, Timer::Retry])].boxed(),
            None => select(vec![Timer::Health, Timer::Retry]).boxed(),
        };
        let deliver = |s: BoxedStrategy<Event>| s.prop_map(Step::Deliver).boxed();
        // Weights depend on the state, so that sequences go somewhere (long failure streaks
        // that reach the backoff cap, recoveries, re-auths) while every event still arrives
        // in every state now and then. Failures outweigh successes to make streaks long.
        use StateName::*;
        let w = |weights: [(StateName, u32); 2], otherwise: u32| {
            weights.iter().find(|(st, _)| *st == m.state).map_or(otherwise, |(_, w)| *w)
        };
        let connected = matches!(m.state, Healthy | Degraded);
        let choices: Vec<(u32, BoxedStrategy<Step>)> = vec![
            (
                8,
                prop_oneof![(0u64..2_000).prop_map(Duration::from_millis), (0u64..200).prop_map(Duration::from_secs)]
                    .prop_map(Step::Advance)
                    .boxed(),
            ),
            (w([(Unauthed, 12), (Stopped, 2)], 1), Just(Step::Deliver(Event::Started)).boxed()),
            (
                w([(Authing, 4), (Stopped, 2)], 1),
                deliver(
                    (attempt.clone(), any::<u64>())
                        .prop_map(|(attempt, id)| Event::AuthSucceeded { attempt, auth: snap(id) })
                        .boxed(),
                ),
            ),
            (
                w([(Authing, 12), (Stopped, 2)], 1),
                deliver(
                    (attempt.clone(), auth_failure)
                        .prop_map(|(attempt, failure)| Event::AuthFailed { attempt, failure })
                        .boxed(),
                ),
            ),
            (
                if connected { 4 } else { 1 },
                deliver(
                    (attempt.clone(), 1u64..500)
                        .prop_map(|(attempt, ms)| Event::PingSucceeded { attempt, rtt: Duration::from_millis(ms) })
                        .boxed(),
                ),
            ),
            (
                if connected { 8 } else { 1 },
                deliver(
                    (attempt.clone(), ping_failure)
                        .prop_map(|(attempt, failure)| Event::PingFailed { attempt, failure })
                        .boxed(),
                ),
            ),
            (
                if connected { 2 } else { 1 },
                deliver(attempt.prop_map(|attempt| Event::SessionExpired { attempt }).boxed()),
            ),
            (if connected || m.state == Backoff { 12 } else { 2 }, deliver(timer.prop_map(Event::TimerFired).boxed())),
            (2, Just(Step::Deliver(Event::ReauthRequested)).boxed()),
            (2, (1usize..4).prop_map(|count| Step::Deliver(Event::GatewaysChanged { count })).boxed()),
            (if m.state == Failover { 12 } else { 1 }, Just(Step::Deliver(Event::GatewaySwitched)).boxed()),
            (3, Just(Step::Deliver(Event::Nudged)).boxed()),
            (2, Just(Step::Deliver(Event::UnderlayChanged)).boxed()),
            (1, Just(Step::Deliver(Event::Stop)).boxed()),
        ];
        proptest::strategy::Union::new_weighted(choices).boxed()
    }

    fn apply(mut m: Model, step: &Step) -> Model {
        m.expect = Expect::default();
        match step {
            Step::Advance(d) => m.now += *d,
            Step::Deliver(ev) => m.deliver(ev),
        }
        m
    }
}

/// The machine under test, with the driver-side bookkeeping a test needs.
struct Sut {
    sup: Supervisor,
    rng: StdRng,
    now: Duration,
    /// The highest attempt number seen in an RPC effect.
    max_attempt: u64,
}

/// The effects of one step, sorted by kind.
#[derive(Default)]
struct Sorted<'a> {
    swaps: Vec<&'a Arc<VpnAuthResponse>>,
    calls: Vec<(Rpc, u64, Duration, Option<SessionId>)>,
    arms: Vec<(Timer, Duration)>,
    cancels: usize,
    logs: Vec<(Level, &'a str)>,
    exits: usize,
    switches: usize,
}

fn sort(fx: &[Effect]) -> Sorted<'_> {
    let mut s = Sorted::default();
    for e in fx {
        match e {
            Effect::SwapSnapshot(a) => s.swaps.push(a),
            Effect::CallAuthenticate { attempt, deadline } => s.calls.push((Rpc::Auth, *attempt, *deadline, None)),
            Effect::CallPing { attempt, session_id, deadline } => {
                s.calls.push((Rpc::Ping, *attempt, *deadline, Some(*session_id)))
            }
            Effect::ArmTimer { at, timer } => s.arms.push((*timer, *at)),
            Effect::CancelTimer => s.cancels += 1,
            Effect::Log(l) => s.logs.push((l.level, l.message.as_str())),
            Effect::Exit => s.exits += 1,
            Effect::SwitchGateway => s.switches += 1,
        }
    }
    s
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = SupervisorModel;

    fn init_test(m: &Model) -> Sut {
        Sut { sup: Supervisor::new(timings()), rng: StdRng::seed_from_u64(m.seed), now: m.now, max_attempt: 0 }
    }

    fn apply(mut sut: Sut, m: &Model, step: Step) -> Sut {
        let ev = match step {
            Step::Advance(d) => {
                sut.now += d;
                return sut;
            }
            Step::Deliver(ev) => ev,
        };
        let t = timings();
        let x = &m.expect;
        let sent = match &ev {
            Event::AuthSucceeded { auth, .. } => Some(Arc::clone(auth)),
            _ => None,
        };
        let is_stop = matches!(ev, Event::Stop);
        let is_expired = matches!(ev, Event::SessionExpired { .. });
        let installed_before = sut.sup.installed().cloned();
        let backoff_before = sut.sup.status().backoff;
        let failures_before = sut.sup.status().failures;
        let name = ev.name();

        let fx = sut.sup.handle(ev, sut.now, &mut sut.rng);
        let s = sort(&fx);

        // The snapshot: swapped only when the model says so, as the exact Arc sent in.
        if x.swap {
            let sent = sent.as_ref().expect("a swap answers an AuthSucceeded");
            assert_eq!(s.swaps.len(), 1, "{fx:?}");
            assert!(Arc::ptr_eq(s.swaps[0], sent), "SwapSnapshot must carry the Arc it was given");
            assert!(Arc::ptr_eq(sut.sup.installed().expect("installed"), sent));
        } else {
            assert!(s.swaps.is_empty(), "unexpected swap: {fx:?}");
            match (&installed_before, sut.sup.installed()) {
                (Some(a), Some(b)) => assert!(Arc::ptr_eq(a, b), "snapshot changed without a swap"),
                (None, None) => {}
                (a, b) => panic!("snapshot changed without a swap: {a:?} -> {b:?}"),
            }
        }

        // RPCs: fresh attempt, deadline now + rpc_deadline, the installed session for pings.
        match x.call {
            Some((rpc, attempt)) => {
                assert_eq!(s.calls.len(), 1, "{fx:?}");
                let (got_rpc, got_attempt, deadline, session) = s.calls[0];
                assert_eq!((got_rpc, got_attempt), (rpc, attempt), "{fx:?}");
                assert!(got_attempt > sut.max_attempt, "attempt {got_attempt} is not fresh");
                sut.max_attempt = got_attempt;
                assert_eq!(deadline, sut.now + t.rpc_deadline);
                if rpc == Rpc::Ping {
                    assert_eq!(session, m.installed, "ping for the installed session");
                }
            }
            None => assert!(s.calls.is_empty(), "unexpected RPC: {fx:?}"),
        }

        // Timers: within bounds.
        match x.arm {
            Some((timer, wait)) => {
                assert_eq!(s.arms.len(), 1, "{fx:?}");
                let (got, at) = s.arms[0];
                assert_eq!(got, timer);
                let after = at - sut.now;
                match wait {
                    Wait::Health => {
                        assert!(after >= t.health_min && after <= t.health_max, "health check in {after:?}")
                    }
                    Wait::Retry { base } => {
                        assert!(base <= t.backoff_max && base >= t.backoff_initial, "base {base:?}");
                        assert!(after >= base / 2 && after <= base, "retry in {after:?}, base {base:?}");
                        assert_eq!(sut.sup.status().backoff, base, "status shows the un-jittered base");
                    }
                }
            }
            None => assert!(s.arms.is_empty(), "unexpected timer: {fx:?}"),
        }
        let status = sut.sup.status();
        if status.failures > failures_before {
            assert!(status.backoff >= backoff_before, "backoff shrank within a failure streak");
        }
        if matches!(x.transition, Some((_, StateName::Healthy))) {
            assert_eq!((status.failures, status.backoff), (0, Duration::ZERO), "reset on success");
        }

        assert_eq!(s.cancels, usize::from(x.cancel), "{fx:?}");
        assert_eq!(s.switches, usize::from(x.switch), "{fx:?}");
        // Exit: only in answer to Stop, once, last.
        assert_eq!(s.exits, usize::from(x.exit), "{fx:?}");
        if s.exits > 0 {
            assert!(is_stop);
            assert!(matches!(fx.last(), Some(Effect::Exit)), "Exit must be last: {fx:?}");
        }

        // Logs: one line per transition, naming it, at the model's level; repeats never warn.
        match x.transition {
            Some((from, to)) => {
                assert_eq!(s.logs.len(), 1, "{fx:?}");
                let (level, message) = s.logs[0];
                assert!(message.starts_with(&format!("{from:?} -> {to:?} ({name}")), "{message}");
                assert_eq!(Some(level), x.level, "{message}");
                if x.repeated_failure {
                    assert_ne!(level, Level::Warn, "a repeated failure warned again: {message}");
                }
                if let Some(auth) = sut.sup.installed() {
                    let key_hex: String = auth.session_key.expose().iter().map(|b| format!("{b:02x}")).collect();
                    assert!(!message.contains(&key_hex), "the key leaked into a log line");
                }
            }
            None => assert!(s.logs.is_empty(), "log line without a transition: {fx:?}"),
        }

        // SESSION_EXPIRED: re-auth, snapshot untouched (checked above), no swap.
        if is_expired && x.transition.is_some() {
            assert_eq!(sut.sup.state(), StateName::Authing);
            assert!(matches!(s.calls.first(), Some((Rpc::Auth, ..))));
            assert!(s.swaps.is_empty() && installed_before.is_some());
        }
        sut
    }

    fn check_invariants(sut: &Sut, m: &Model) {
        let status = sut.sup.status();
        assert_eq!(sut.sup.state(), m.state);
        assert_eq!(status.state, m.state);
        assert_eq!(status.failures, m.failures);
        assert_eq!(status.backoff, m.base());
        assert_eq!(status.next_timer.map(|(timer, _)| timer), m.timer);
        assert_eq!(sut.sup.installed().map(|a| a.session_id), m.installed);
        // Nothing but Stop stops it.
        assert_eq!(m.state == StateName::Stopped, sut.sup.last_transition().is_some_and(|t| t.event == "Stop"));
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn supervisor_matches_the_model(sequential 1..120 => Sut);
}
