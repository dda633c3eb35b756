//! The supervisor driver: the thin tokio shell around the pure [`Supervisor`].
//!
//! It owns what the machine must not: the clock, the RNG, the control-plane channel, the one timer
//! and the RPC tasks. It feeds every observation to the machine and executes the effects that come
//! back, in order. It never decides anything itself — with exceptions that are about IO, not
//! policy:
//! - after a rejection it re-reads the client file, so credentials re-issued by the gateway
//!   operator take effect without a restart;
//! - it replaces the control channel with a fresh one ([`ControlPlane::reconnected`]) when the
//!   connection is likely dead: a call on the current channel failed as unreachable or timed
//!   out, or the underlay changed ([`Command::UnderlayChanged`], from the route watcher). A TCP
//!   connection from an address the client no longer has never recovers, and HTTP/2 keepalive
//!   would take ~15 s to give up on it; a fresh channel connects from the current address on the
//!   next call. An underlay change is also fed to the machine as a nudge, so it checks at once
//!   (the machine rate-limits nudges and decides what a check is in each state).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::control::{ControlPlane, PingAnswer};
use super::status::{ClientStatus, TransitionRecord};
use crate::config::client::{ClientFile, Credentials};
use crate::sansio::supervisor::{AuthFailure, Effect, Event, Level, PingFailure, Supervisor, Timer};
use crate::snapshot::{AuthCell, VpnAuthResponse};

/// Commands from the handle (the dashboard, signal handlers, the data plane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Explicit stop.
    Stop,
    /// Force a re-authentication.
    Reauth,
    /// The data plane saw an "unknown session" notice: check now.
    Nudge,
    /// The path to the gateway or the client's address on it changed (roaming, a link came
    /// back): reconnect the control channel and check now.
    UnderlayChanged,
}

/// Called with each snapshot the machine installs, after the swap (the data plane uses it to come
/// up on the first one).
pub type OnSwap = Box<dyn FnMut(&Arc<VpnAuthResponse>) + Send>;

/// Everything the driver needs, moved into its task by `start()`.
pub struct DriverParts {
    pub file: ClientFile,
    pub path: PathBuf,
    pub creds: Credentials,
    pub auth: AuthCell,
    pub commands: mpsc::Receiver<Command>,
    pub status: watch::Sender<ClientStatus>,
    pub on_swap: Option<OnSwap>,
    /// Seed for the jitter RNG; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Machine time zero (also published in every status).
    pub epoch: Instant,
}

/// How many recent transitions the status feed keeps.
const RECENT_TRANSITIONS: usize = 32;

/// Runs the supervisor until an explicit stop.
pub async fn run(parts: DriverParts) {
    let DriverParts { file, path, mut creds, auth, mut commands, status, mut on_swap, seed, epoch } = parts;
    let now = || epoch.elapsed();
    let mut rng = match seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_os_rng(),
    };
    let mut machine = Supervisor::new(file.timings());
    // Every gateway of the deployment, the one in use at `current`. Starts with the client
    // file's list; each Authenticate answer that lists the gateways replaces it.
    let mut gateways = file.all_endpoints();
    let mut current = 0usize;
    let mut control = build_control(&file, &creds, gateways[current]);
    // Counts channel replacements: a failure only condemns the channel it happened on.
    let mut channel: u64 = 0;

    // RPC results come back through this channel, tagged with the attempt the machine gave them
    // and the channel they ran on.
    let (results_tx, mut results) = mpsc::unbounded_channel::<(Event, String, u64)>();
    let mut rpcs: JoinSet<()> = JoinSet::new();
    // What each RPC task reports if it dies instead of answering (a panic in a library): the
    // machine waits for every RPC's result, so a lost one would stall it for good.
    let mut if_lost: HashMap<tokio::task::Id, Event> = HashMap::new();
    let mut timer: Option<(Instant, Timer)> = None;
    let mut pending: VecDeque<(Event, String)> = VecDeque::from([
        (Event::GatewaysChanged { count: gateways.len() }, String::new()),
        (Event::Started, String::new()),
    ]);
    let mut recent: VecDeque<TransitionRecord> = VecDeque::with_capacity(RECENT_TRANSITIONS);

    loop {
        while let Some((event, detail)) = pending.pop_front() {
            let rejected = matches!(
                event,
                Event::AuthFailed { failure: AuthFailure::Rejected | AuthFailure::CertificateRefused, .. }
            );
            let before = machine.state();
            let effects = machine.handle(event, now(), &mut rng);
            let mut exit = false;
            for effect in effects {
                match effect {
                    Effect::CallAuthenticate { attempt, deadline } => {
                        let Some(cp) = control.clone() else {
                            let failure = AuthFailure::GatewayError;
                            let why = "control channel could not be set up (see the earlier error)";
                            pending.push_back((Event::AuthFailed { attempt, failure }, why.into()));
                            continue;
                        };
                        let budget = deadline.saturating_sub(now());
                        let tx = results_tx.clone();
                        let lost = Event::AuthFailed { attempt, failure: AuthFailure::GatewayError };
                        let task = rpcs.spawn(async move {
                            let (ev, detail) = match cp.authenticate(budget).await {
                                Ok(auth) => (Event::AuthSucceeded { attempt, auth }, String::new()),
                                Err(e) => (Event::AuthFailed { attempt, failure: e.kind }, e.detail),
                            };
                            let _ = tx.send((ev, detail, channel));
                        });
                        if_lost.insert(task.id(), lost);
                    }
                    Effect::CallPing { attempt, session_id, deadline } => {
                        // The machine requires every RPC to be reported exactly once.
                        let Some(cp) = control.clone() else {
                            let failure = PingFailure::GatewayError;
                            let why = "control channel could not be set up (see the earlier error)";
                            pending.push_back((Event::PingFailed { attempt, failure }, why.into()));
                            continue;
                        };
                        let budget = deadline.saturating_sub(now());
                        let tx = results_tx.clone();
                        let lost = Event::PingFailed { attempt, failure: PingFailure::GatewayError };
                        let task = rpcs.spawn(async move {
                            let sent = Instant::now();
                            let (ev, detail) = match cp.ping(session_id, budget).await {
                                Ok(PingAnswer::Ok) => {
                                    (Event::PingSucceeded { attempt, rtt: sent.elapsed() }, String::new())
                                }
                                Ok(PingAnswer::SessionExpired) => (Event::SessionExpired { attempt }, String::new()),
                                Err(e) => (Event::PingFailed { attempt, failure: e.kind }, e.detail),
                            };
                            let _ = tx.send((ev, detail, channel));
                        });
                        if_lost.insert(task.id(), lost);
                    }
                    Effect::ArmTimer { at, timer: which } => timer = Some((deadline_of(epoch, at), which)),
                    Effect::CancelTimer => timer = None,
                    Effect::SwapSnapshot(next) => {
                        // The gateway's current list of the deployment's gateways, if it sent one.
                        if !next.endpoints.is_empty() && next.endpoints != gateways {
                            let using = gateways[current];
                            gateways = next.endpoints.clone();
                            current = gateways.iter().position(|g| *g == using).unwrap_or_else(|| {
                                gateways.insert(0, using);
                                0
                            });
                            pending.push_back((Event::GatewaysChanged { count: gateways.len() }, String::new()));
                        }
                        auth.swap_in(next.clone());
                        if let Some(hook) = on_swap.as_mut() {
                            hook(&next);
                        }
                    }
                    Effect::SwitchGateway => {
                        current = (current + 1) % gateways.len();
                        tracing::debug!(target: "holdfast::supervisor", "moving to gateway {}", gateways[current]);
                        control = build_control(&file, &creds, gateways[current]);
                        channel = channel.wrapping_add(1);
                        pending.push_back((Event::GatewaySwitched, String::new()));
                    }
                    Effect::Log(line) => emit(line.level, &line.message, &detail),
                    Effect::Exit => exit = true,
                }
            }
            let st = machine.status();
            if st.state != before {
                if recent.len() == RECENT_TRANSITIONS {
                    recent.pop_front();
                }
                recent.push_back(TransitionRecord {
                    at: st.since,
                    from: before,
                    to: st.state,
                    cause: st.last_cause.clone(),
                });
            }
            status.send_replace(ClientStatus {
                epoch: epoch.into_std(),
                supervisor: st,
                snapshot: auth.get_auth().map(|a| super::status::SnapshotView::of(&a)),
                recent: recent.iter().cloned().collect(),
            });
            if exit {
                rpcs.abort_all();
                return;
            }
            if rejected && reload_credentials(&file, &path, &mut creds, &mut control, gateways[current]) {
                channel = channel.wrapping_add(1);
            }
        }

        let sleep_until = timer.map(|(at, _)| at);
        tokio::select! {
            Some((event, detail, on)) = results.recv() => {
                if on == channel && suggests_dead_connection(&event) {
                    reconnect(&mut control, &mut channel);
                }
                pending.push_back((event, detail));
            }
            cmd = commands.recv() => {
                let event = match cmd {
                    // All handles gone means nobody can stop us any more: treat it as a stop.
                    Some(Command::Stop) | None => Event::Stop,
                    Some(Command::Reauth) => Event::ReauthRequested,
                    Some(Command::Nudge) => Event::Nudged,
                    Some(Command::UnderlayChanged) => {
                        reconnect(&mut control, &mut channel);
                        Event::UnderlayChanged
                    }
                };
                pending.push_back((event, String::new()));
            }
            _ = sleep(sleep_until), if sleep_until.is_some() => {
                if let Some((_, which)) = timer.take() {
                    pending.push_back((Event::TimerFired(which), String::new()));
                }
            }
            // Reap finished RPC tasks so the set does not grow; a task that died reports its
            // failure, so the machine never waits for an answer that cannot come.
            Some(done) = rpcs.join_next_with_id(), if !rpcs.is_empty() => match done {
                Ok((id, ())) => {
                    if_lost.remove(&id);
                }
                Err(e) => {
                    if let Some(event) = if_lost.remove(&e.id()) {
                        tracing::error!(target: "holdfast::supervisor", "an RPC task died ({e}); reported as a failure");
                        pending.push_back((event, "the call's task died".into()));
                    }
                }
            }
        }
    }
}

/// The instant of machine time `at`. Saturates far in the future rather than overflowing the
/// clock: a timer that far out is one that never fires, not a crash of the supervisor.
fn deadline_of(epoch: Instant, at: std::time::Duration) -> Instant {
    const FAR: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    epoch.checked_add(at).unwrap_or_else(|| epoch + FAR)
}

async fn sleep(until: Option<Instant>) {
    if let Some(at) = until {
        tokio::time::sleep_until(at).await;
    }
}

/// Whether a failed call suggests that the channel's connection is dead (rather than that the
/// gateway answered with an error): then the next call should not wait on it.
fn suggests_dead_connection(event: &Event) -> bool {
    matches!(
        event,
        Event::PingFailed { failure: PingFailure::Unreachable | PingFailure::TimedOut, .. }
            | Event::AuthFailed { failure: AuthFailure::Unreachable | AuthFailure::TimedOut, .. }
    )
}

/// Replaces the control channel with a fresh one on the same endpoint (no IO until the next
/// call; calls in flight finish on the old one).
fn reconnect(control: &mut Option<ControlPlane>, channel: &mut u64) {
    if let Some(cp) = control.as_ref() {
        *control = Some(cp.reconnected());
        *channel = channel.wrapping_add(1);
    }
}

fn build_control(file: &ClientFile, creds: &Credentials, gateway: std::net::SocketAddr) -> Option<ControlPlane> {
    match ControlPlane::to_gateway(file, creds, gateway) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(target: "holdfast::supervisor", "{e}");
            None
        }
    }
}

/// After a rejection, picks up credentials the operator re-issued into the same client file. A file
/// that became unreadable or invalid meanwhile is not fatal after start-up: we keep what we have.
/// Returns whether the channel was replaced.
fn reload_credentials(
    file: &ClientFile,
    path: &std::path::Path,
    creds: &mut Credentials,
    control: &mut Option<ControlPlane>,
    gateway: std::net::SocketAddr,
) -> bool {
    let fresh = ClientFile::load(path).and_then(|f| {
        let c = f.credentials(path)?;
        Ok((f, c))
    });
    match fresh {
        Ok((f, c)) => {
            let changed = c.certificate_pem != creds.certificate_pem
                || c.key_pem != creds.key_pem
                || c.gateway_ca_pem != creds.gateway_ca_pem;
            if changed && f.endpoint == file.endpoint && f.server_name == file.server_name {
                tracing::info!(
                    target: "holdfast::supervisor",
                    "client file {} has new credentials; using them from the next attempt",
                    path.display()
                );
                *control = build_control(file, &c, gateway);
                *creds = c;
                return true;
            }
            false
        }
        Err(e) => {
            tracing::debug!(target: "holdfast::supervisor", "not reloading credentials: {e}");
            false
        }
    }
}

/// Forwards a machine-decided log line to tracing, with the failure detail the driver observed.
fn emit(level: Level, message: &str, detail: &str) {
    let sep = if detail.is_empty() { "" } else { ": " };
    match level {
        Level::Warn => tracing::warn!(target: "holdfast::supervisor", "{message}{sep}{detail}"),
        Level::Info => tracing::info!(target: "holdfast::supervisor", "{message}{sep}{detail}"),
        Level::Debug => tracing::debug!(target: "holdfast::supervisor", "{message}{sep}{detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_failures_condemn_the_connection() {
        let ping = |failure| Event::PingFailed { attempt: 1, failure };
        let auth = |failure| Event::AuthFailed { attempt: 1, failure };
        assert!(suggests_dead_connection(&ping(PingFailure::Unreachable)));
        assert!(suggests_dead_connection(&ping(PingFailure::TimedOut)));
        assert!(suggests_dead_connection(&auth(AuthFailure::Unreachable)));
        assert!(suggests_dead_connection(&auth(AuthFailure::TimedOut)));
        // The gateway answered: the connection works.
        assert!(!suggests_dead_connection(&ping(PingFailure::GatewayError)));
        assert!(!suggests_dead_connection(&auth(AuthFailure::Rejected)));
        assert!(!suggests_dead_connection(&auth(AuthFailure::CertificateRefused)));
        assert!(!suggests_dead_connection(&auth(AuthFailure::GatewayError)));
        assert!(!suggests_dead_connection(&Event::SessionExpired { attempt: 1 }));
        assert!(!suggests_dead_connection(&Event::Nudged));
    }
}
