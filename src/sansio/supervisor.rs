//! The supervisor statechart: a pure machine (statig, blocking API). Events in, effects out.
//!
//! The tokio driver in `client::driver` owns the sockets, the clock and the RNG. It feeds every
//! observation to [`Supervisor::handle`] together with the current time and a random source, and
//! executes the [`Effect`]s that come back, in order. Nothing in here sleeps, spawns, reads a clock
//! or draws randomness by itself, so a property test can replay any run exactly.
//!
//! INTERFACE FILE: the types below are the contract between the machine and the driver.
//! The machine itself (the statig `#[state_machine]`) is implemented further down.

use std::sync::Arc;
use std::time::Duration;

use crate::snapshot::{SessionId, VpnAuthResponse};

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
    /// Explicit stop.
    Stop,
}

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
    /// The current retry delay (0 when not backing off).
    pub backoff: Duration,
    /// Consecutive failures of the current kind.
    pub failures: u32,
    /// Last measured ping round trip.
    pub last_rtt: Option<Duration>,
}
