//! The supervisor statechart: a pure machine (statig, blocking API). Events in, effects out.
//!
//! The tokio driver in `client::driver` owns the sockets, the clock and the RNG. It feeds every
//! observation to [`Supervisor::handle`] together with the current time and a random source, and
//! executes the [`Effect`]s that come back, in order. Nothing in here sleeps, spawns, reads a clock
//! or draws randomness by itself, so a property test can replay any run exactly.
//!
//! The types at the top ([`Timings`], [`Event`], [`Effect`], [`Status`], ...) are the contract
//! between the machine and the driver; [`Supervisor`] wraps the statig `#[state_machine]` below
//! them. The chart it implements is `statecharts/supervisor.mmd` (checked against this code by
//! `tests/supervisor_chart.rs`).
//!
//! What the driver must do for the machine to stay alive:
//! - report every RPC it was asked for exactly once, with the effect's `attempt`: a result, a
//!   failure, or `TimedOut` once the effect's `deadline` has passed (the machine arms no timer
//!   of its own while an RPC is in flight);
//! - fire the one timer at its `at`, re-arming on every `ArmTimer` and disarming on
//!   `CancelTimer`. A late or duplicate firing is harmless: the machine ignores a `TimerFired`
//!   for a timer it does not have armed, and results for attempts it no longer awaits.
//!
//! Logging: every transition produces exactly one [`Effect::Log`] (written by statig's
//! `after_transition` hook), e.g. `Healthy -> Degraded (PingFailed: TimedOut); retry in 2s`.
//! A failure warns the first time its kind is seen since the last success; repeats are info at
//! most once per [`Timings::repeat_log_every`] and debug otherwise, so an outage of any length
//! shows a handful of lines at the default filter. Internal events log nothing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngCore};
use statig::prelude::*;

use super::session::{SessionId, VpnAuthResponse};

/// Machine time: the time elapsed since the driver started, passed in by the shell.
/// (A `Duration` rather than an `Instant` so tests can construct any point in time.)
pub type Now = Duration;

/// Every timing the supervisor uses. Defaults follow the spec; the client config can override each
/// so tests can use short ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Timings {
    /// Health checks run every `health_min..=health_max`, uniformly jittered (spec: 15–30 s).
    pub health_min: Duration,
    pub health_max: Duration,
    /// Deadline of every control-plane RPC (default 5 s).
    pub rpc_deadline: Duration,
    /// First retry delay after a failure; doubles on each further failure.
    pub backoff_initial: Duration,
    /// Cap of the retry delay (spec: up to 5 minutes).
    pub backoff_max: Duration,
    /// After the first warning of a repeated failure, repeat it (at info) at most this often.
    pub repeat_log_every: Duration,
    /// Minimum spacing of data-plane nudges that trigger an immediate health check or retry.
    pub nudge_min_interval: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            health_min: Duration::from_secs(15),
            health_max: Duration::from_secs(30),
            rpc_deadline: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            repeat_log_every: Duration::from_secs(600),
            nudge_min_interval: Duration::from_secs(1),
        }
    }
}

/// Why an `Authenticate` failed, as the driver classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// The gateway answered `Unauthenticated` (unknown or revoked client).
    Rejected,
    /// The TLS handshake refused our certificate, or we refused the gateway's (wrong authority).
    CertificateRefused,
    /// No connection (refused, no route, reset).
    Unreachable,
    /// The RPC deadline passed.
    TimedOut,
    /// The gateway answered with another error, or an invalid response.
    GatewayError,
}

/// Why a `PingSession` failed transiently. (SESSION_EXPIRED is not a failure: it is its own event.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PingFailure {
    Unreachable,
    TimedOut,
    GatewayError,
}

/// Which timer fired. There is one timer slot: arming a timer replaces the armed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Time for the next health check (Healthy) or ping retry (Degraded).
    Health,
    /// Time for the next authentication attempt (Backoff).
    Retry,
}

/// Inputs to the machine. Past tense for observations, imperative for commands.
#[derive(Debug, Clone)]
pub enum Event {
    /// `start()` was called: begin authenticating.
    Started,
    /// `Authenticate` succeeded for attempt `attempt`.
    AuthSucceeded { attempt: u64, auth: Arc<VpnAuthResponse> },
    /// `Authenticate` failed for attempt `attempt`.
    AuthFailed { attempt: u64, failure: AuthFailure },
    /// `PingSession` answered OK for attempt `attempt`; `rtt` as measured by the driver.
    PingSucceeded { attempt: u64, rtt: Duration },
    /// `PingSession` answered SESSION_EXPIRED for attempt `attempt`.
    SessionExpired { attempt: u64 },
    /// `PingSession` failed transiently for attempt `attempt`.
    PingFailed { attempt: u64, failure: PingFailure },
    /// The armed timer fired.
    TimerFired(Timer),
    /// The user asked for a fresh session (dashboard `r`).
    ReauthRequested,
    /// The data plane saw a sign that the gateway lost our session (an "unknown session" notice):
    /// check now instead of waiting for the timer. Rate-limited by `nudge_min_interval`.
    Nudged,
    /// The client's own network path changed (another router, interface or address): the
    /// connection an RPC in flight uses may be dead. Like `Nudged` (and rate-limited with it),
    /// and in Authing it also restarts the attempt, on the driver's fresh connection, instead of
    /// waiting out a deadline on the old one.
    UnderlayChanged,
    /// The deployment's gateway list changed size (from the client file at start, then from each
    /// `Authenticate` answer): `count` gateways are known. Internal: no transition.
    GatewaysChanged { count: usize },
    /// The driver moved its control channel to the next gateway (after `SwitchGateway`).
    GatewaySwitched,
    /// Explicit stop.
    Stop,
}

/// Failed health checks in a row (the last one a transport failure: unreachable, timed out)
/// after which a client that knows other gateways moves to the next one. Two, so a single lost
/// ping does not move a client; with the test timings that is about a second.
pub const FAILOVER_AFTER: u32 = 2;

/// Outputs of the machine, executed by the driver in order.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Call `Authenticate` with this deadline (absolute machine time); report back with `attempt`.
    CallAuthenticate { attempt: u64, deadline: Now },
    /// Call `PingSession` for this session with this deadline; report back with `attempt`.
    CallPing { attempt: u64, session_id: SessionId, deadline: Now },
    /// Arm the one timer to fire `timer` at `at` (absolute machine time), replacing any armed one.
    ArmTimer { at: Now, timer: Timer },
    /// Disarm the timer.
    CancelTimer,
    /// Install this snapshot in the one `AuthCell` (a single atomic swap).
    SwapSnapshot(Arc<VpnAuthResponse>),
    /// Move the control channel to the next known gateway, then report `GatewaySwitched`. The
    /// installed snapshot stays until the new gateway's answer swaps in.
    SwitchGateway,
    /// Emit this log line (the only routine log lines of the client come from here).
    Log(LogLine),
    /// The machine has stopped: the driver tears down and returns.
    Exit,
}

/// Severity of a [`LogLine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// A log line decided by the machine; the driver forwards it to `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub message: String,
}

/// The leaf states, by name (for the status feed, the chart test and the dashboard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateName {
    Unauthed,
    Authing,
    Healthy,
    Degraded,
    Backoff,
    Failover,
    Stopped,
}

/// A read-only view of the machine for the status feed.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub state: StateName,
    /// Name of the enclosing superstate, if any (for the dashboard).
    pub superstate: Option<&'static str>,
    /// When the current state was entered.
    pub since: Now,
    /// What caused the last transition (an event name, e.g. "PingFailed(TimedOut)").
    pub last_cause: String,
    /// The armed timer and when it fires.
    pub next_timer: Option<(Timer, Now)>,
    /// The un-jittered retry delay of the current failure streak (0 without failures); the
    /// armed retry waits between half of it and all of it.
    pub backoff: Duration,
    /// Consecutive failures (auth or ping, any kind) since the last success.
    pub failures: u32,
    /// Last measured ping round trip.
    pub last_rtt: Option<Duration>,
}

impl StateName {
    /// The innermost superstate enclosing this leaf in the chart, if any.
    pub fn superstate(self) -> Option<&'static str> {
        match self {
            StateName::Unauthed => Some("Running"),
            StateName::Authing | StateName::Backoff | StateName::Failover => Some("Establishing"),
            StateName::Healthy | StateName::Degraded => Some("Connected"),
            StateName::Stopped => None,
        }
    }
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Event {
    /// The event's name as it appears on the edges of `statecharts/supervisor.mmd`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Started => "Started",
            Event::AuthSucceeded { .. } => "AuthSucceeded",
            Event::AuthFailed { .. } => "AuthFailed",
            Event::PingSucceeded { .. } => "PingSucceeded",
            Event::SessionExpired { .. } => "SessionExpired",
            Event::PingFailed { .. } => "PingFailed",
            Event::TimerFired(_) => "TimerFired",
            Event::ReauthRequested => "ReauthRequested",
            Event::Nudged => "Nudged",
            Event::UnderlayChanged => "UnderlayChanged",
            Event::GatewaysChanged { .. } => "GatewaysChanged",
            Event::GatewaySwitched => "GatewaySwitched",
            Event::Stop => "Stop",
        }
    }

    /// What distinguishes two events of the same name, for logs and `Status::last_cause`.
    /// Never the snapshot itself: its summary is logged separately, and only on success.
    fn detail(&self) -> Option<String> {
        match self {
            Event::AuthFailed { failure, .. } => Some(format!("{failure:?}")),
            Event::PingFailed { failure, .. } => Some(format!("{failure:?}")),
            Event::PingSucceeded { rtt, .. } => Some(format!("rtt {}", ms(*rtt))),
            Event::TimerFired(timer) => Some(format!("{timer:?}")),
            _ => None,
        }
    }
}

/// One transition the machine took, recorded by its `after_transition` hook (the same place
/// that writes the transition's log line), so observers see exactly what the machine did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionTaken {
    /// 1 for the first transition, counting up, so two equal transitions in a row are told apart.
    pub seq: u64,
    pub from: StateName,
    pub to: StateName,
    /// [`Event::name`] of the event that caused it.
    pub event: &'static str,
    pub at: Now,
}

/// The supervisor: the statig machine plus the bookkeeping it carries between events.
///
/// Inputs: [`Supervisor::handle`]. Getters: [`Supervisor::status`], [`Supervisor::state`],
/// [`Supervisor::installed`], [`Supervisor::last_transition`]. There are no other mutators:
/// everything that changes goes through an event, so a replayed event sequence (with the same
/// times and random source) reproduces the same effects.
#[derive(Clone)]
pub struct Supervisor {
    machine: StateMachine<Machine>,
}

impl Supervisor {
    /// A supervisor in `Unauthed`. It emits nothing until it sees `Started`.
    pub fn new(timings: Timings) -> Self {
        Self { machine: Machine::new(timings).state_machine() }
    }

    /// Feeds one event observed at `now`; returns the effects to execute, in order.
    ///
    /// Jitter is drawn from `rng`. Events that do not apply in the current state, RPC results
    /// whose `attempt` is not the one awaited, and timer firings for a timer that is not armed
    /// are ignored: they return no effects and change nothing.
    pub fn handle(&mut self, event: Event, now: Now, rng: &mut dyn RngCore) -> Vec<Effect> {
        let was_stopped = self.state() == StateName::Stopped;
        let mut ctx = Ctx { now, rng, event: &event, effects: Vec::new() };
        self.machine.handle_with_context(&event, &mut ctx);
        let mut effects = ctx.effects;
        // Exit goes last, after the transition's log line, so a driver that returns as soon as
        // it sees Exit has already executed everything else.
        if !was_stopped && self.state() == StateName::Stopped {
            effects.push(Effect::Exit);
        }
        effects
    }

    /// The current leaf state.
    pub fn state(&self) -> StateName {
        self.machine.state().name()
    }

    /// A read-only view for the status feed.
    pub fn status(&self) -> Status {
        let m = self.machine.inner();
        let state = self.state();
        Status {
            state,
            superstate: state.superstate(),
            since: m.since,
            last_cause: m.last_cause.clone(),
            next_timer: m.next_timer,
            backoff: m.backoff_base(),
            failures: m.failures,
            last_rtt: m.last_rtt,
        }
    }

    /// The last snapshot this machine told the driver to swap in (with [`Effect::SwapSnapshot`]).
    pub fn installed(&self) -> Option<&Arc<VpnAuthResponse>> {
        self.machine.inner().installed.as_ref()
    }

    /// The last transition taken, if any.
    pub fn last_transition(&self) -> Option<&TransitionTaken> {
        self.machine.inner().last_transition.as_ref()
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor").field("status", &self.status()).finish()
    }
}

/// Per-call context: what one `handle` call brings in (time, randomness, the event) and
/// collects (effects). Nothing in it outlives the call.
struct Ctx<'a> {
    now: Now,
    rng: &'a mut dyn RngCore,
    /// The event being handled, for `after_transition` (statig does not pass it the event).
    event: &'a Event,
    effects: Vec<Effect>,
}

/// Which RPC an attempt number belongs to, so a ping result cannot answer an auth attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Authenticate,
    Ping,
}

/// The one RPC whose result the machine is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    attempt: u64,
    rpc: Rpc,
}

/// A failure kind, for the "warn once per kind since the last success" log rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    Auth(AuthFailure),
    Ping(PingFailure),
}

/// The statig shared storage: everything the machine remembers between events.
#[derive(Debug, Clone)]
struct Machine {
    timings: Timings,
    /// The last attempt number handed out; every RPC effect takes the next one.
    last_attempt: u64,
    /// The RPC in flight whose result we accept; any other result is stale.
    pending: Option<Pending>,
    /// The snapshot last sent out in `SwapSnapshot`. Only `authing` writes it, never to `None`.
    installed: Option<Arc<VpnAuthResponse>>,
    /// Consecutive failures (auth or ping) since the last success; drives the backoff.
    failures: u32,
    /// What we asked the driver to arm; a `TimerFired` for anything else is stale.
    next_timer: Option<(Timer, Now)>,
    since: Now,
    last_cause: String,
    last_rtt: Option<Duration>,
    /// When a nudge last caused an action (rate limit).
    last_nudge: Option<Now>,
    /// Failure kinds already warned about since the last success (at most 8 kinds exist).
    warned: Vec<FailureKind>,
    /// When a failure was last logged at warn or info, to space out the repeats.
    last_loud: Option<Now>,
    last_transition: Option<TransitionTaken>,
    /// How many gateways the client knows (at least 1).
    gateways: usize,
    /// Gateways moved to since the last success or backoff: a round tries each once.
    switches: usize,
}

/// The chart (`statecharts/supervisor.mmd`):
///
/// ```text
/// Running                      Stop -> Stopped; anything unhandled below is ignored
/// ├── Unauthed                 Started -> Authing
/// ├── Establishing
/// │   ├── Authing              AuthSucceeded -> Healthy, AuthFailed -> Backoff,
/// │   │                        AuthFailed (unreachable, an untried gateway left) -> Failover,
/// │   │                        UnderlayChanged -> Authing (a fresh attempt)
/// │   ├── Backoff              TimerFired(Retry) | Nudged | UnderlayChanged
/// │   │                        | ReauthRequested -> Authing
/// │   └── Failover             GatewaySwitched -> Authing
/// └── Connected                SessionExpired | ReauthRequested -> Authing
///     ├── Healthy              PingFailed -> Degraded
///     └── Degraded             PingSucceeded -> Healthy, PingFailed -> Degraded,
///                              PingFailed (FAILOVER_AFTER-th unreachable, other gateways) -> Failover
/// Stopped                      ignores everything
/// ```
#[state_machine(
    initial = "State::unauthed()",
    state(derive(Debug, Clone, Copy, PartialEq, Eq)),
    superstate(derive(Debug)),
    after_transition = "Self::after_transition",
    visibility = "pub(crate)"
)]
impl Machine {
    /// Every state but `Stopped`. Outgoing: `Stop` -> Stopped. Internal: `GatewaysChanged`
    /// records how many gateways there are. Events no state below handles end here and are
    /// ignored: nothing but `Stop` ever stops the machine.
    #[superstate]
    fn running(&mut self, event: &Event) -> Outcome<State> {
        match event {
            Event::Stop => Transition(State::stopped()),
            Event::GatewaysChanged { count } => {
                self.gateways = (*count).max(1);
                Handled
            }
            _ => Handled,
        }
    }

    /// Not started yet. Outgoing: `Started` -> Authing.
    #[state(superstate = "running")]
    fn unauthed(event: &Event) -> Outcome<State> {
        match event {
            Event::Started => Transition(State::authing()),
            _ => Super,
        }
    }

    /// Working towards a session: authenticating or waiting to retry. A previously installed
    /// snapshot (re-auth from Connected) stays installed, so the data plane keeps running on it.
    #[superstate(superstate = "running")]
    fn establishing() -> Outcome<State> {
        Super
    }

    /// An `Authenticate` is in flight (entry sends it). Outgoing: `AuthSucceeded` -> Healthy
    /// (swapping the snapshot in), `AuthFailed` -> Backoff, `UnderlayChanged` (rate-limited) ->
    /// Authing, whose re-entry sends a fresh attempt and makes the old one stale. A plain
    /// `Nudged` does not restart it: the data plane nudges on every "unknown session" notice
    /// while a re-auth is under way, and restarting then could starve a slow gateway's answer.
    #[state(superstate = "establishing", entry_action = "enter_authing")]
    fn authing(&mut self, context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        match event {
            Event::AuthSucceeded { attempt, auth } if self.awaits(*attempt, Rpc::Authenticate) => {
                self.pending = None;
                // The only place the snapshot changes: whole, as the Arc the driver handed us.
                self.installed = Some(Arc::clone(auth));
                context.effects.push(Effect::SwapSnapshot(Arc::clone(auth)));
                Transition(State::healthy())
            }
            Event::AuthFailed { attempt, failure } if self.awaits(*attempt, Rpc::Authenticate) => {
                self.settle_failure();
                let transport = matches!(failure, AuthFailure::Unreachable | AuthFailure::TimedOut);
                if transport && self.untried_gateway() {
                    Transition(State::failover())
                } else {
                    Transition(State::backoff())
                }
            }
            Event::UnderlayChanged if self.nudge_allowed(context.now) => {
                // Re-entry begins a fresh attempt, which makes the one in flight stale.
                self.last_nudge = Some(context.now);
                Transition(State::authing())
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_authing(&mut self, context: &mut Ctx<'_>) {
        // A timer left from Backoff or Connected means nothing here; disarm it so the status
        // shows no timer and a late firing finds nothing armed.
        if self.next_timer.take().is_some() {
            context.effects.push(Effect::CancelTimer);
        }
        let attempt = self.begin(Rpc::Authenticate);
        let deadline = self.deadline(context.now);
        context.effects.push(Effect::CallAuthenticate { attempt, deadline });
    }

    /// Waiting to retry authentication (entry arms the retry timer). Outgoing:
    /// `TimerFired(Retry)`, `Nudged` and `UnderlayChanged` (rate-limited), `ReauthRequested` ->
    /// Authing.
    #[state(superstate = "establishing", entry_action = "enter_backoff")]
    fn backoff(&mut self, context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        match event {
            Event::TimerFired(timer) if self.armed(*timer) => {
                self.next_timer = None;
                Transition(State::authing())
            }
            Event::Nudged | Event::UnderlayChanged if self.nudge_allowed(context.now) => {
                self.last_nudge = Some(context.now);
                Transition(State::authing())
            }
            Event::ReauthRequested => Transition(State::authing()),
            _ => Super,
        }
    }

    #[action]
    fn enter_backoff(&mut self, context: &mut Ctx<'_>) {
        // A new round: after the wait, every gateway may be tried once more.
        self.switches = 0;
        self.arm_retry(Timer::Retry, context);
    }

    /// The current gateway stopped answering and another is known (entry asks the driver to
    /// move to it). Outgoing: `GatewaySwitched` -> Authing. The snapshot stays installed, so the
    /// data plane keeps trying the old gateway until the new one's session swaps in.
    #[state(superstate = "establishing", entry_action = "enter_failover")]
    fn failover(event: &Event) -> Outcome<State> {
        match event {
            Event::GatewaySwitched => Transition(State::authing()),
            _ => Super,
        }
    }

    #[action]
    fn enter_failover(&mut self, context: &mut Ctx<'_>) {
        self.switches = self.switches.saturating_add(1);
        if self.next_timer.take().is_some() {
            context.effects.push(Effect::CancelTimer);
        }
        context.effects.push(Effect::SwitchGateway);
    }

    /// A snapshot is installed and the gateway knows our session. Internal: `TimerFired(Health)`
    /// and `Nudged` / `UnderlayChanged` (rate-limited) send a ping. Outgoing: `SessionExpired`, `ReauthRequested`
    /// -> Authing, keeping the snapshot until the new one swaps in.
    #[superstate(superstate = "running")]
    fn connected(&mut self, context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        match event {
            Event::TimerFired(timer) if self.armed(*timer) => {
                self.next_timer = None;
                self.call_ping(context);
                Handled
            }
            Event::Nudged | Event::UnderlayChanged if self.nudge_allowed(context.now) => {
                self.last_nudge = Some(context.now);
                self.call_ping(context);
                Handled
            }
            Event::SessionExpired { attempt } if self.awaits(*attempt, Rpc::Ping) => {
                self.pending = None;
                Transition(State::authing())
            }
            Event::ReauthRequested => Transition(State::authing()),
            _ => Super,
        }
    }

    /// Pinging every `health_min..=health_max` (entry arms the timer). Internal:
    /// `PingSucceeded` re-arms. Outgoing: `PingFailed` -> Degraded (snapshot kept).
    #[state(superstate = "connected", entry_action = "enter_healthy")]
    fn healthy(&mut self, context: &mut Ctx<'_>, event: &Event) -> Outcome<State> {
        match event {
            Event::PingSucceeded { attempt, rtt } if self.awaits(*attempt, Rpc::Ping) => {
                self.settle_ping_ok(*rtt);
                self.arm_health(context);
                Handled
            }
            Event::PingFailed { attempt, .. } if self.awaits(*attempt, Rpc::Ping) => {
                self.settle_failure();
                Transition(State::degraded())
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_healthy(&mut self, context: &mut Ctx<'_>) {
        // Every way into Healthy is a success: the failure streak and its log bookkeeping end.
        self.failures = 0;
        self.switches = 0;
        self.warned.clear();
        self.last_loud = None;
        self.arm_health(context);
    }

    /// Pings fail transiently; the snapshot stays and pings are retried with backoff (entry arms
    /// the timer). Outgoing: `PingSucceeded` -> Healthy, `PingFailed` -> Degraded (a
    /// self-transition, so each retry is one logged transition and re-entry grows the backoff).
    #[state(superstate = "connected", entry_action = "enter_degraded")]
    fn degraded(&mut self, event: &Event) -> Outcome<State> {
        match event {
            Event::PingSucceeded { attempt, rtt } if self.awaits(*attempt, Rpc::Ping) => {
                self.settle_ping_ok(*rtt);
                Transition(State::healthy())
            }
            Event::PingFailed { attempt, failure } if self.awaits(*attempt, Rpc::Ping) => {
                self.settle_failure();
                let transport = matches!(failure, PingFailure::Unreachable | PingFailure::TimedOut);
                if transport && self.failures >= FAILOVER_AFTER && self.untried_gateway() {
                    Transition(State::failover())
                } else {
                    Transition(State::degraded())
                }
            }
            _ => Super,
        }
    }

    #[action]
    fn enter_degraded(&mut self, context: &mut Ctx<'_>) {
        self.arm_retry(Timer::Health, context);
    }

    /// Final: every event is ignored.
    #[state(entry_action = "enter_stopped")]
    fn stopped() -> Outcome<State> {
        Handled
    }

    #[action]
    fn enter_stopped(&mut self, context: &mut Ctx<'_>) {
        self.pending = None;
        self.next_timer = None;
        context.effects.push(Effect::CancelTimer);
    }
}

impl State {
    fn name(&self) -> StateName {
        match self {
            State::Unauthed { .. } => StateName::Unauthed,
            State::Authing { .. } => StateName::Authing,
            State::Backoff { .. } => StateName::Backoff,
            State::Healthy { .. } => StateName::Healthy,
            State::Degraded { .. } => StateName::Degraded,
            State::Failover { .. } => StateName::Failover,
            State::Stopped { .. } => StateName::Stopped,
        }
    }
}

impl Machine {
    fn new(timings: Timings) -> Self {
        Self {
            timings,
            last_attempt: 0,
            pending: None,
            installed: None,
            failures: 0,
            next_timer: None,
            since: Duration::ZERO,
            last_cause: String::new(),
            last_rtt: None,
            last_nudge: None,
            warned: Vec::new(),
            last_loud: None,
            last_transition: None,
            gateways: 1,
            switches: 0,
        }
    }

    /// Whether this round of failovers has a gateway left to try.
    fn untried_gateway(&self) -> bool {
        self.switches.saturating_add(1) < self.gateways
    }

    /// Starts an RPC: a fresh attempt number, which makes every earlier one stale.
    fn begin(&mut self, rpc: Rpc) -> u64 {
        self.last_attempt = self.last_attempt.wrapping_add(1);
        self.pending = Some(Pending { attempt: self.last_attempt, rpc });
        self.last_attempt
    }

    fn awaits(&self, attempt: u64, rpc: Rpc) -> bool {
        self.pending == Some(Pending { attempt, rpc })
    }

    /// The awaited RPC failed: it is settled and the failure streak grows.
    fn settle_failure(&mut self) {
        self.pending = None;
        self.failures = self.failures.saturating_add(1);
    }

    /// The awaited ping answered OK.
    fn settle_ping_ok(&mut self, rtt: Duration) {
        self.pending = None;
        self.last_rtt = Some(rtt);
    }

    fn armed(&self, timer: Timer) -> bool {
        matches!(self.next_timer, Some((t, _)) if t == timer)
    }

    fn deadline(&self, now: Now) -> Now {
        now.saturating_add(self.timings.rpc_deadline)
    }

    fn nudge_allowed(&self, now: Now) -> bool {
        self.last_nudge.is_none_or(|t| now.saturating_sub(t) >= self.timings.nudge_min_interval)
    }

    fn call_ping(&mut self, context: &mut Ctx<'_>) {
        // Invariant: Connected is only entered through AuthSucceeded, which installs a
        // snapshot, and nothing removes it. Without one there is no session to ping.
        let Some(session_id) = self.installed.as_ref().map(|a| a.session_id) else {
            return;
        };
        let attempt = self.begin(Rpc::Ping);
        let deadline = self.deadline(context.now);
        context.effects.push(Effect::CallPing { attempt, session_id, deadline });
    }

    fn arm(&mut self, timer: Timer, after: Duration, context: &mut Ctx<'_>) {
        let at = context.now.saturating_add(after);
        self.next_timer = Some((timer, at));
        context.effects.push(Effect::ArmTimer { at, timer });
    }

    fn arm_health(&mut self, context: &mut Ctx<'_>) {
        let (lo, hi) = ordered(self.timings.health_min, self.timings.health_max);
        let after = uniform(context.rng, lo, hi);
        self.arm(Timer::Health, after, context);
    }

    /// Arms `timer` for a jittered retry after the current failure streak.
    fn arm_retry(&mut self, timer: Timer, context: &mut Ctx<'_>) {
        let base = self.backoff_base();
        // Uniform in [base/2, base]: spreads out clients that failed together, and never
        // exceeds the base, which never exceeds `backoff_max`.
        let after = uniform(context.rng, base / 2, base);
        self.arm(timer, after, context);
    }

    /// The un-jittered retry delay after `failures` consecutive failures: `backoff_initial`,
    /// doubled per further failure, capped at `backoff_max`; zero without failures.
    fn backoff_base(&self) -> Duration {
        let Some(doublings) = self.failures.checked_sub(1) else {
            return Duration::ZERO;
        };
        let max = self.timings.backoff_max;
        2u32.checked_pow(doublings)
            .and_then(|factor| self.timings.backoff_initial.checked_mul(factor))
            .map_or(max, |d| d.min(max))
    }

    /// The one log line per transition, plus the transition record and status fields.
    fn after_transition(&mut self, source: &State, target: &State, context: &mut Ctx<'_>) {
        let (from, to, now, event) = (source.name(), target.name(), context.now, context.event);
        let cause = match event.detail() {
            Some(detail) => format!("{}: {detail}", event.name()),
            None => event.name().to_owned(),
        };
        let level = self.transition_level(event, now);
        let mut message = format!("{from} -> {to} ({cause})");
        self.describe_target(to, event, now, &mut message);
        context.effects.push(Effect::Log(LogLine { level, message }));

        self.since = now;
        self.last_cause = match event.detail() {
            Some(detail) => format!("{}({detail})", event.name()),
            None => event.name().to_owned(),
        };
        let seq = self.last_transition.as_ref().map_or(1, |t| t.seq.wrapping_add(1));
        self.last_transition = Some(TransitionTaken { seq, from, to, event: event.name(), at: now });
    }

    /// The tail of a transition's log line: what the new state is about to do.
    fn describe_target(&self, to: StateName, event: &Event, now: Now, out: &mut String) {
        use fmt::Write as _;
        let wait = self.next_timer.map(|(_, at)| ms(at.saturating_sub(now)));
        // Writing to a String cannot fail.
        let _ = match (to, wait) {
            (StateName::Authing, _) => write!(out, "; attempt {}", self.last_attempt),
            (StateName::Healthy, Some(wait)) => {
                if let (Event::AuthSucceeded { .. }, Some(auth)) = (event, &self.installed) {
                    // summary() shows the key's fingerprint, never the key.
                    let _ = write!(out, "; {}", auth.summary());
                }
                write!(out, "; next check in {wait}")
            }
            (StateName::Failover, _) => write!(out, "; trying the next of {} gateways", self.gateways),
            (StateName::Backoff | StateName::Degraded, Some(wait)) => {
                write!(out, "; retry in {wait} (failure {})", self.failures)
            }
            _ => Ok(()),
        };
    }

    /// Level of a transition's log line. Failures: warn the first time a kind is seen since
    /// the last success, then info at most once per `repeat_log_every`, debug otherwise. So an
    /// outage of any length yields a handful of visible lines, while each retry still leaves
    /// one (debug) line. Successes and user actions: info. Routine retries: debug.
    fn transition_level(&mut self, event: &Event, now: Now) -> Level {
        match event {
            Event::AuthFailed { failure, .. } => self.failure_level(FailureKind::Auth(*failure), now),
            Event::PingFailed { failure, .. } => self.failure_level(FailureKind::Ping(*failure), now),
            // The underlay watcher logs the change itself, once.
            Event::TimerFired(_) | Event::Nudged | Event::UnderlayChanged => Level::Debug,
            _ => Level::Info,
        }
    }

    fn failure_level(&mut self, kind: FailureKind, now: Now) -> Level {
        if !self.warned.contains(&kind) {
            self.warned.push(kind);
            self.last_loud = Some(now);
            Level::Warn
        } else if self.last_loud.is_none_or(|t| now.saturating_sub(t) >= self.timings.repeat_log_every) {
            self.last_loud = Some(now);
            Level::Info
        } else {
            Level::Debug
        }
    }
}

/// `(a, b)` sorted, so a misconfigured `health_min > health_max` cannot make a range empty.
fn ordered(a: Duration, b: Duration) -> (Duration, Duration) {
    if a <= b { (a, b) } else { (b, a) }
}

/// A duration uniformly drawn from `lo..=hi` (nanosecond resolution); `lo` if the range is
/// empty or a single point, so no configuration can make the draw panic.
fn uniform(rng: &mut dyn RngCore, lo: Duration, hi: Duration) -> Duration {
    let lo_ns = u64::try_from(lo.as_nanos()).unwrap_or(u64::MAX);
    let hi_ns = u64::try_from(hi.as_nanos()).unwrap_or(u64::MAX);
    if lo_ns >= hi_ns {
        return lo;
    }
    Duration::from_nanos(rng.random_range(lo_ns..=hi_ns))
}

/// A duration for log lines, rounded to milliseconds ("2s 500ms", not nanoseconds).
fn ms(d: Duration) -> String {
    let rounded = Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    humantime::format_duration(rounded).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const S: Duration = Duration::from_secs(1);

    fn snap(id: u64) -> Arc<VpnAuthResponse> {
        Arc::new(VpnAuthResponse::fixture(id, [0x5a; 32]))
    }

    /// A supervisor with default timings, a clock the test moves and a seeded rng.
    struct Harness {
        sup: Supervisor,
        now: Now,
        rng: StdRng,
        /// The attempt of the last RPC effect seen.
        attempt: u64,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                sup: Supervisor::new(Timings::default()),
                now: Duration::ZERO,
                rng: StdRng::seed_from_u64(7),
                attempt: 0,
            }
        }

        fn send(&mut self, event: Event) -> Vec<Effect> {
            let effects = self.sup.handle(event, self.now, &mut self.rng);
            for e in &effects {
                if let Effect::CallAuthenticate { attempt, .. } | Effect::CallPing { attempt, .. } = e {
                    self.attempt = *attempt;
                }
            }
            effects
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
        }

        /// Started + AuthSucceeded: Healthy with snapshot `id`.
        fn healthy(&mut self, id: u64) -> Arc<VpnAuthResponse> {
            self.send(Event::Started);
            let auth = snap(id);
            self.send(Event::AuthSucceeded { attempt: self.attempt, auth: Arc::clone(&auth) });
            assert_eq!(self.sup.state(), StateName::Healthy);
            auth
        }

        /// Fires the health timer and fails the resulting ping.
        fn fail_ping(&mut self, failure: PingFailure) -> Vec<Effect> {
            let fx = self.send(Event::TimerFired(Timer::Health));
            assert!(fx.iter().any(|e| matches!(e, Effect::CallPing { .. })), "{fx:?}");
            self.send(Event::PingFailed { attempt: self.attempt, failure })
        }

        fn fail_auth(&mut self, failure: AuthFailure) -> Vec<Effect> {
            self.send(Event::AuthFailed { attempt: self.attempt, failure })
        }
    }

    fn switches(fx: &[Effect]) -> usize {
        fx.iter().filter(|e| matches!(e, Effect::SwitchGateway)).count()
    }

    #[test]
    fn an_unreachable_gateway_fails_over_keeping_the_snapshot_and_each_gateway_once_per_round() {
        let mut h = Harness::new();
        h.send(Event::GatewaysChanged { count: 2 });
        let first = h.healthy(1);
        // One failed check is not enough to leave a gateway.
        h.fail_ping(PingFailure::Unreachable);
        assert_eq!(h.sup.state(), StateName::Degraded);
        // A gateway that answers with an error is not gone either.
        let fx = h.fail_ping(PingFailure::GatewayError);
        assert_eq!((h.sup.state(), switches(&fx)), (StateName::Degraded, 0));
        let fx = h.fail_ping(PingFailure::TimedOut);
        assert_eq!((h.sup.state(), switches(&fx)), (StateName::Failover, 1));
        assert!(Arc::ptr_eq(h.sup.installed().unwrap(), &first), "snapshot kept");
        let fx = h.send(Event::GatewaySwitched);
        assert_eq!(h.sup.state(), StateName::Authing);
        assert!(fx.iter().any(|e| matches!(e, Effect::CallAuthenticate { .. })));
        // The other gateway is unreachable too: the round is over, back off (no third switch).
        let fx = h.fail_auth(AuthFailure::Unreachable);
        assert_eq!((h.sup.state(), switches(&fx)), (StateName::Backoff, 0));
        // The next round starts at the current gateway and may switch once more.
        h.advance(10 * S);
        h.send(Event::TimerFired(Timer::Retry));
        let fx = h.fail_auth(AuthFailure::TimedOut);
        assert_eq!((h.sup.state(), switches(&fx)), (StateName::Failover, 1));
        // A rejection is an answer: no failover on it.
        h.send(Event::GatewaySwitched);
        let fx = h.fail_auth(AuthFailure::Rejected);
        assert_eq!((h.sup.state(), switches(&fx)), (StateName::Backoff, 0));
    }

    #[test]
    fn a_single_gateway_never_fails_over() {
        let mut h = Harness::new();
        h.healthy(1);
        for _ in 0..5 {
            let fx = h.fail_ping(PingFailure::Unreachable);
            assert_eq!((h.sup.state(), switches(&fx)), (StateName::Degraded, 0));
            h.advance(400 * S);
        }
    }

    fn logs(fx: &[Effect]) -> Vec<&LogLine> {
        fx.iter().filter_map(|e| if let Effect::Log(l) = e { Some(l) } else { None }).collect()
    }

    fn one_log(fx: &[Effect]) -> &LogLine {
        let l = logs(fx);
        assert_eq!(l.len(), 1, "{fx:?}");
        l[0]
    }

    fn armed(fx: &[Effect]) -> Option<(Timer, Now)> {
        fx.iter().find_map(|e| if let Effect::ArmTimer { at, timer } = e { Some((*timer, *at)) } else { None })
    }

    #[test]
    fn new_is_unauthed_and_quiet_until_started() {
        let mut h = Harness::new();
        assert_eq!(h.sup.state(), StateName::Unauthed);
        assert!(h.sup.installed().is_none());
        for ev in [
            Event::Nudged,
            Event::UnderlayChanged,
            Event::ReauthRequested,
            Event::TimerFired(Timer::Retry),
            Event::PingFailed { attempt: 0, failure: PingFailure::TimedOut },
        ] {
            assert!(h.send(ev).is_empty());
        }
        assert_eq!(h.sup.status().state, StateName::Unauthed);
        assert_eq!(h.sup.status().superstate, Some("Running"));
        assert!(h.sup.last_transition().is_none());
    }

    #[test]
    fn started_calls_authenticate_with_deadline() {
        let mut h = Harness::new();
        h.advance(3 * S);
        let fx = h.send(Event::Started);
        assert!(matches!(fx[0], Effect::CallAuthenticate { attempt: 1, deadline } if deadline == 8 * S), "{fx:?}");
        let log = one_log(&fx);
        assert_eq!(log.level, Level::Info);
        assert!(log.message.starts_with("Unauthed -> Authing (Started)"), "{}", log.message);
        assert_eq!(h.sup.state(), StateName::Authing);
        let t = h.sup.last_transition().expect("recorded");
        assert_eq!(
            (t.from, t.to, t.event, t.at, t.seq),
            (StateName::Unauthed, StateName::Authing, "Started", 3 * S, 1)
        );
        // A second Started is ignored.
        assert!(h.send(Event::Started).is_empty());
    }

    #[test]
    fn auth_success_swaps_the_exact_snapshot_and_arms_health() {
        let mut h = Harness::new();
        h.send(Event::Started);
        let auth = snap(0xfeed);
        let fx = h.send(Event::AuthSucceeded { attempt: h.attempt, auth: Arc::clone(&auth) });
        match &fx[0] {
            Effect::SwapSnapshot(a) => assert!(Arc::ptr_eq(a, &auth)),
            other => panic!("expected SwapSnapshot first, got {other:?}"),
        }
        let (timer, at) = armed(&fx).expect("health armed");
        assert_eq!(timer, Timer::Health);
        assert!((15 * S..=30 * S).contains(&at), "{at:?}");
        let log = one_log(&fx);
        assert_eq!(log.level, Level::Info);
        assert!(log.message.contains(&auth.summary()), "{}", log.message);
        assert!(!log.message.contains(&"5a".repeat(32)));
        assert!(Arc::ptr_eq(h.sup.installed().expect("installed"), &auth));
        let st = h.sup.status();
        assert_eq!(
            (st.state, st.superstate, st.next_timer),
            (StateName::Healthy, Some("Connected"), Some((Timer::Health, at)))
        );
        assert_eq!(st.last_cause, "AuthSucceeded");
    }

    #[test]
    fn auth_failures_back_off_doubling_capped_and_reset_on_success() {
        let mut h = Harness::new();
        h.send(Event::Started);
        let mut bases = Vec::new();
        for _ in 0..12 {
            let fx = h.fail_auth(AuthFailure::Unreachable);
            assert_eq!(h.sup.state(), StateName::Backoff);
            let (timer, at) = armed(&fx).expect("retry armed");
            let base = h.sup.status().backoff;
            assert_eq!(timer, Timer::Retry);
            let wait = at - h.now;
            assert!(wait >= base / 2 && wait <= base && base <= 300 * S, "{wait:?} vs {base:?}");
            bases.push(base.as_secs());
            h.advance(wait);
            let fx = h.send(Event::TimerFired(Timer::Retry));
            assert_eq!(h.sup.state(), StateName::Authing);
            assert!(matches!(fx[0], Effect::CallAuthenticate { .. }), "{fx:?}");
        }
        assert_eq!(bases, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        h.send(Event::AuthSucceeded { attempt: h.attempt, auth: snap(1) });
        assert_eq!((h.sup.status().failures, h.sup.status().backoff), (0, Duration::ZERO));
        // The next streak starts from backoff_initial again.
        h.fail_ping(PingFailure::Unreachable);
        assert_eq!(h.sup.status().backoff, S);
    }

    #[test]
    fn backoff_ignores_a_timer_that_is_not_armed() {
        let mut h = Harness::new();
        h.send(Event::Started);
        h.fail_auth(AuthFailure::Rejected);
        assert!(h.send(Event::TimerFired(Timer::Health)).is_empty());
        assert!(matches!(h.sup.state(), StateName::Backoff | StateName::Authing));
    }

    #[test]
    fn healthy_pings_on_timer_and_rearms_on_success_without_logging() {
        let mut h = Harness::new();
        let auth = h.healthy(42);
        h.advance(20 * S);
        let fx = h.send(Event::TimerFired(Timer::Health));
        assert!(
            matches!(fx.as_slice(), [Effect::CallPing { session_id, deadline, .. }] if *session_id == auth.session_id && *deadline == 25 * S),
            "{fx:?}"
        );
        assert_eq!(h.sup.status().next_timer, None);
        // The timer fired once; a duplicate firing is stale.
        assert!(h.send(Event::TimerFired(Timer::Health)).is_empty());
        h.advance(S / 10);
        let fx = h.send(Event::PingSucceeded { attempt: h.attempt, rtt: Duration::from_millis(12) });
        assert!(logs(&fx).is_empty(), "{fx:?}");
        let (_, at) = armed(&fx).expect("re-armed");
        assert!(at >= h.now + 15 * S && at <= h.now + 30 * S);
        assert_eq!(h.sup.status().last_rtt, Some(Duration::from_millis(12)));
        assert_eq!(h.sup.state(), StateName::Healthy);
        // The same result twice is stale the second time.
        assert!(h.send(Event::PingSucceeded { attempt: h.attempt, rtt: S }).is_empty());
    }

    #[test]
    fn ping_failure_degrades_keeps_snapshot_and_logs_sparingly() {
        let mut h = Harness::new();
        let auth = h.healthy(1);
        let fx = h.fail_ping(PingFailure::TimedOut);
        assert_eq!(h.sup.state(), StateName::Degraded);
        assert!(!fx.iter().any(|e| matches!(e, Effect::SwapSnapshot(_))));
        let log = one_log(&fx);
        assert_eq!(log.level, Level::Warn);
        assert!(log.message.starts_with("Healthy -> Degraded (PingFailed: TimedOut); retry in "), "{}", log.message);
        assert!(Arc::ptr_eq(h.sup.installed().expect("kept"), &auth));

        // Repeats: one line each; info when 600 s (repeat_log_every) have passed since the last
        // warn/info line, debug otherwise; never warn.
        let mut last_loud = h.now;
        let mut infos = 0;
        for _ in 0..20 {
            let wait = h.sup.status().next_timer.expect("armed").1 - h.now;
            h.advance(wait);
            let fx = h.fail_ping(PingFailure::TimedOut);
            assert_eq!(h.sup.state(), StateName::Degraded);
            let t = h.sup.last_transition().expect("self-transition recorded");
            assert_eq!((t.from, t.to, t.event), (StateName::Degraded, StateName::Degraded, "PingFailed"));
            let level = one_log(&fx).level;
            if h.now - last_loud >= 600 * S {
                assert_eq!(level, Level::Info);
                last_loud = h.now;
                infos += 1;
            } else {
                assert_eq!(level, Level::Debug);
            }
            assert!(h.sup.status().backoff <= 300 * S);
        }
        // 20 retries span well over 20 minutes (backoff reaches the 5-minute cap), so some
        // info lines were due, but far fewer than one per retry.
        assert!(h.now > 1200 * S && (2..=6).contains(&infos), "{infos} over {:?}", h.now);
        // A different kind warns once.
        h.advance(h.sup.status().next_timer.expect("armed").1 - h.now);
        assert_eq!(one_log(&h.fail_ping(PingFailure::Unreachable)).level, Level::Warn);
        assert!(Arc::ptr_eq(h.sup.installed().expect("kept"), &auth));

        // Recovery: info, Healthy, health timer, and the next failure warns again.
        h.send(Event::TimerFired(Timer::Health));
        let fx = h.send(Event::PingSucceeded { attempt: h.attempt, rtt: S });
        assert_eq!(h.sup.state(), StateName::Healthy);
        assert_eq!(one_log(&fx).level, Level::Info);
        assert_eq!(armed(&fx).map(|a| a.0), Some(Timer::Health));
        assert_eq!(one_log(&h.fail_ping(PingFailure::TimedOut)).level, Level::Warn);
    }

    #[test]
    fn session_expired_reauthenticates_keeping_the_snapshot_until_the_new_one() {
        for degrade_first in [false, true] {
            let mut h = Harness::new();
            let old = h.healthy(1);
            if degrade_first {
                h.fail_ping(PingFailure::Unreachable);
            }
            h.send(Event::TimerFired(Timer::Health));
            let fx = h.send(Event::SessionExpired { attempt: h.attempt });
            assert_eq!(h.sup.state(), StateName::Authing);
            assert!(fx.iter().any(|e| matches!(e, Effect::CallAuthenticate { .. })), "{fx:?}");
            assert!(!fx.iter().any(|e| matches!(e, Effect::SwapSnapshot(_))));
            assert!(Arc::ptr_eq(h.sup.installed().expect("kept"), &old));
            // A failed re-auth still keeps it.
            h.fail_auth(AuthFailure::Unreachable);
            assert!(Arc::ptr_eq(h.sup.installed().expect("kept"), &old));
            h.send(Event::TimerFired(Timer::Retry));
            let new = snap(2);
            h.send(Event::AuthSucceeded { attempt: h.attempt, auth: Arc::clone(&new) });
            assert!(Arc::ptr_eq(h.sup.installed().expect("new"), &new));
        }
    }

    #[test]
    fn reauth_requested_applies_in_connected_and_backoff_only() {
        let mut h = Harness::new();
        assert!(h.send(Event::ReauthRequested).is_empty());
        h.send(Event::Started);
        assert!(h.send(Event::ReauthRequested).is_empty(), "ignored while Authing");
        h.fail_auth(AuthFailure::TimedOut);
        let fx = h.send(Event::ReauthRequested);
        assert_eq!(h.sup.state(), StateName::Authing);
        // The retry timer left from Backoff is disarmed.
        assert!(matches!(fx[0], Effect::CancelTimer), "{fx:?}");
        assert_eq!(h.sup.status().next_timer, None);
        h.send(Event::AuthSucceeded { attempt: h.attempt, auth: snap(1) });
        h.send(Event::ReauthRequested);
        assert_eq!(h.sup.state(), StateName::Authing);
        h.send(Event::AuthSucceeded { attempt: h.attempt, auth: snap(2) });
        h.fail_ping(PingFailure::GatewayError);
        let fx = h.send(Event::ReauthRequested);
        assert_eq!(h.sup.state(), StateName::Authing);
        assert_eq!(one_log(&fx).level, Level::Info);
    }

    #[test]
    fn nudges_are_rate_limited_and_act_per_state() {
        let mut h = Harness::new();
        h.send(Event::Started);
        assert!(h.send(Event::Nudged).is_empty(), "ignored while Authing");
        h.fail_auth(AuthFailure::Unreachable);
        let fx = h.send(Event::Nudged);
        assert_eq!(h.sup.state(), StateName::Authing, "{fx:?}");
        h.fail_auth(AuthFailure::Unreachable);
        assert!(h.send(Event::Nudged).is_empty(), "within nudge_min_interval");
        h.advance(S);
        h.send(Event::Nudged);
        assert_eq!(h.sup.state(), StateName::Authing);
        h.send(Event::AuthSucceeded { attempt: h.attempt, auth: snap(1) });
        h.advance(S);
        let fx = h.send(Event::Nudged);
        assert!(matches!(fx.as_slice(), [Effect::CallPing { .. }]), "{fx:?}");
        // The health timer stays armed.
        assert_eq!(h.sup.status().next_timer.map(|t| t.0), Some(Timer::Health));
        assert!(h.send(Event::Nudged).is_empty());
        h.advance(S);
        let fx = h.send(Event::PingFailed { attempt: h.attempt, failure: PingFailure::TimedOut });
        assert_eq!(h.sup.state(), StateName::Degraded, "{fx:?}");
        let fx = h.send(Event::Nudged);
        assert!(matches!(fx.as_slice(), [Effect::CallPing { .. }]), "{fx:?}");
    }

    #[test]
    fn an_underlay_change_restarts_a_pending_auth_and_otherwise_acts_like_a_nudge() {
        let mut h = Harness::new();
        h.send(Event::Started);
        let stuck = h.attempt;
        assert!(h.send(Event::Nudged).is_empty(), "a nudge does not restart an auth in flight");
        let fx = h.send(Event::UnderlayChanged);
        assert_eq!(h.sup.state(), StateName::Authing);
        let fresh = fx
            .iter()
            .find_map(|e| match e {
                Effect::CallAuthenticate { attempt, .. } => Some(*attempt),
                _ => None,
            })
            .expect("a fresh Authenticate");
        assert_ne!(fresh, stuck);
        assert_eq!(one_log(&fx).level, Level::Debug, "the watcher logs the change, not the machine");
        assert!(h.send(Event::UnderlayChanged).is_empty(), "rate-limited with nudges");
        // The old attempt's answer is stale now; the fresh one counts.
        assert!(h.send(Event::AuthFailed { attempt: stuck, failure: AuthFailure::TimedOut }).is_empty());
        h.send(Event::AuthSucceeded { attempt: fresh, auth: snap(1) });
        assert_eq!(h.sup.state(), StateName::Healthy);
        h.advance(S);
        let fx = h.send(Event::UnderlayChanged);
        assert!(matches!(fx.as_slice(), [Effect::CallPing { .. }]), "{fx:?}");
        assert_eq!(h.sup.state(), StateName::Healthy);
    }

    #[test]
    fn stale_and_mismatched_results_are_ignored() {
        let mut h = Harness::new();
        h.send(Event::Started);
        let first = h.attempt;
        h.fail_auth(AuthFailure::Rejected);
        h.send(Event::TimerFired(Timer::Retry));
        // Results for the first attempt, or a ping result for an auth attempt: no effect.
        for ev in [
            Event::AuthSucceeded { attempt: first, auth: snap(9) },
            Event::AuthFailed { attempt: first, failure: AuthFailure::Rejected },
            Event::PingSucceeded { attempt: h.attempt, rtt: S },
            Event::SessionExpired { attempt: h.attempt },
            Event::AuthSucceeded { attempt: h.attempt + 1, auth: snap(9) },
        ] {
            assert!(h.send(ev).is_empty());
            assert_eq!(h.sup.state(), StateName::Authing);
        }
        assert!(h.sup.installed().is_none());
        h.send(Event::AuthSucceeded { attempt: h.attempt, auth: snap(1) });
        let auth_attempt = h.attempt;
        h.send(Event::TimerFired(Timer::Health));
        for ev in [
            Event::AuthSucceeded { attempt: auth_attempt, auth: snap(9) },
            Event::PingFailed { attempt: auth_attempt, failure: PingFailure::TimedOut },
            Event::SessionExpired { attempt: auth_attempt },
        ] {
            assert!(h.send(ev).is_empty());
        }
        assert_eq!(h.sup.installed().map(|a| a.session_id), Some(SessionId(1)));
        assert_eq!(h.sup.state(), StateName::Healthy);
    }

    #[test]
    fn stop_from_every_state_exits_last_and_then_ignores_everything() {
        let setups: [fn(&mut Harness); 5] = [
            |_| {},
            |h| {
                h.send(Event::Started);
            },
            |h| {
                h.send(Event::Started);
                h.fail_auth(AuthFailure::Unreachable);
            },
            |h| {
                h.healthy(1);
            },
            |h| {
                h.healthy(1);
                h.fail_ping(PingFailure::TimedOut);
            },
        ];
        let mut seen = Vec::new();
        for setup in setups {
            let mut h = Harness::new();
            setup(&mut h);
            let from = h.sup.state();
            seen.push(from);
            let fx = h.send(Event::Stop);
            assert_eq!(h.sup.state(), StateName::Stopped);
            assert!(matches!(fx.first(), Some(Effect::CancelTimer)), "{fx:?}");
            assert!(matches!(fx.last(), Some(Effect::Exit)), "{fx:?}");
            assert_eq!(fx.iter().filter(|e| matches!(e, Effect::Exit)).count(), 1);
            assert!(one_log(&fx).message.starts_with(&format!("{from} -> Stopped (Stop)")));
            assert_eq!(h.sup.status().superstate, None);
            for ev in [
                Event::Started,
                Event::Stop,
                Event::ReauthRequested,
                Event::TimerFired(Timer::Health),
                Event::AuthSucceeded { attempt: h.attempt, auth: snap(5) },
            ] {
                assert!(h.send(ev).is_empty());
            }
        }
        assert_eq!(
            seen,
            [StateName::Unauthed, StateName::Authing, StateName::Backoff, StateName::Healthy, StateName::Degraded]
        );
    }

    /// A simulated driver: fires the armed timer on time and answers each RPC with
    /// `answer(now, is_auth, attempt)` after `delay`. Returns the log lines of `span`.
    fn drive(
        h: &mut Harness,
        span: Duration,
        delay: Duration,
        mut answer: impl FnMut(Now, bool, u64) -> Event,
    ) -> Vec<LogLine> {
        let end = h.now + span;
        let mut replies: Vec<(Now, Event)> = Vec::new();
        let mut lines = Vec::new();
        while h.now < end {
            let timer = h.sup.status().next_timer;
            let reply_at = replies.iter().map(|(at, _)| *at).min();
            let ev = match (timer, reply_at) {
                (Some((timer, at)), reply) if reply.is_none_or(|r| at < r) => {
                    h.now = h.now.max(at);
                    Event::TimerFired(timer)
                }
                (_, Some(at)) => {
                    let i = replies.iter().position(|(t, _)| *t == at).expect("present");
                    h.now = h.now.max(at);
                    replies.remove(i).1
                }
                (None, None) => panic!("the machine stalled in {:?}", h.sup.state()),
                (Some(_), None) => unreachable!("covered by the first arm"),
            };
            for e in h.send(ev) {
                match e {
                    Effect::CallAuthenticate { attempt, .. } => {
                        replies.push((h.now + delay, answer(h.now, true, attempt)))
                    }
                    Effect::CallPing { attempt, .. } => replies.push((h.now + delay, answer(h.now, false, attempt))),
                    Effect::Log(l) => lines.push(l),
                    _ => {}
                }
            }
        }
        lines
    }

    fn visible(lines: &[LogLine]) -> Vec<&str> {
        lines.iter().filter(|l| l.level >= Level::Info).map(|l| l.message.as_str()).collect()
    }

    #[test]
    fn ten_minute_outages_show_a_handful_of_lines() {
        let ten_min = 600 * S;
        // The gateway stops answering while the client is Healthy, for ten minutes, then
        // comes back without our session: pings time out, then SESSION_EXPIRED, then re-auth.
        let mut h = Harness::new();
        h.healthy(1);
        let outage_end = h.now + ten_min;
        let mut reauthed = false;
        let lines = drive(&mut h, ten_min + 120 * S, 5 * S, |now, is_auth, attempt| {
            match (is_auth, now < outage_end, reauthed) {
                (false, true, _) => Event::PingFailed { attempt, failure: PingFailure::TimedOut },
                (false, false, false) => Event::SessionExpired { attempt },
                (false, false, true) => Event::PingSucceeded { attempt, rtt: S / 100 },
                (true, _, _) => {
                    reauthed = true;
                    Event::AuthSucceeded { attempt, auth: snap(2) }
                }
            }
        });
        let shown = visible(&lines);
        // Warn once; maybe one info repeat; SessionExpired re-auth; back to Healthy.
        assert!((3..=4).contains(&shown.len()), "{shown:#?}");
        assert!(lines.len() > 10, "each retry still leaves a debug line: {lines:#?}");
        assert_eq!(h.sup.state(), StateName::Healthy);
        assert_eq!(h.sup.installed().map(|a| a.session_id), Some(SessionId(2)));

        // A revoked client, from start-up: rejected on every attempt for fifteen minutes.
        // Retries are at most 300 s apart, so one falls in [600 s, 900 s]: exactly one info.
        let mut h = Harness::new();
        let mut lines: Vec<LogLine> = Vec::new();
        let collect = |fx: Vec<Effect>, lines: &mut Vec<LogLine>| {
            lines.extend(fx.into_iter().filter_map(|e| if let Effect::Log(l) = e { Some(l) } else { None }))
        };
        collect(h.send(Event::Started), &mut lines);
        let first = h.attempt;
        collect(h.fail_auth(AuthFailure::Rejected), &mut lines);
        lines.extend(drive(&mut h, ten_min + 300 * S, S / 10, |_, _, attempt| Event::AuthFailed {
            attempt,
            failure: AuthFailure::Rejected,
        }));
        let shown = visible(&lines);
        // Started, the first rejection (warn), one info repeat after 600 s.
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(h.attempt > first + 8, "kept retrying: {} attempts", h.attempt - first);
        assert!(matches!(h.sup.state(), StateName::Backoff | StateName::Authing));
    }

    #[test]
    fn misconfigured_ranges_do_not_panic() {
        let timings = Timings {
            health_min: 30 * S,
            health_max: 15 * S,
            backoff_initial: 500 * S,
            backoff_max: 300 * S,
            ..Timings::default()
        };
        let mut sup = Supervisor::new(timings);
        let mut rng = StdRng::seed_from_u64(1);
        sup.handle(Event::Started, Duration::MAX, &mut rng);
        let fx = sup.handle(Event::AuthFailed { attempt: 1, failure: AuthFailure::TimedOut }, Duration::MAX, &mut rng);
        assert_eq!(sup.state(), StateName::Backoff);
        assert!(matches!(armed(&fx), Some((Timer::Retry, at)) if at == Duration::MAX));
        assert_eq!(sup.status().backoff, 300 * S);
    }

    #[test]
    fn supervisor_can_move_into_a_tokio_task() {
        fn is_send<T: Send + 'static>() {}
        is_send::<Supervisor>();
    }

    #[test]
    fn event_names_match_the_variants() {
        let evs = [
            (Event::Started, "Started"),
            (Event::AuthSucceeded { attempt: 0, auth: snap(0) }, "AuthSucceeded"),
            (Event::AuthFailed { attempt: 0, failure: AuthFailure::Rejected }, "AuthFailed"),
            (Event::PingSucceeded { attempt: 0, rtt: S }, "PingSucceeded"),
            (Event::SessionExpired { attempt: 0 }, "SessionExpired"),
            (Event::PingFailed { attempt: 0, failure: PingFailure::TimedOut }, "PingFailed"),
            (Event::TimerFired(Timer::Retry), "TimerFired"),
            (Event::ReauthRequested, "ReauthRequested"),
            (Event::Nudged, "Nudged"),
            (Event::UnderlayChanged, "UnderlayChanged"),
            (Event::Stop, "Stop"),
        ];
        for (ev, name) in evs {
            assert_eq!(ev.name(), name);
            assert!(format!("{ev:?}").starts_with(name));
        }
    }
}
