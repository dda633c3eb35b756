//! The local status socket: how `holdfast status` asks a running client what it is doing.
//!
//! - [`serve`] binds a Unix socket (mode 0600; its folder is created 0700 if missing) and answers
//!   every connection with one JSON document, a [`StatusReport`], then closes it. There is no
//!   request: connecting is the question, so there is nothing for a peer to send us to parse.
//! - [`query`] is the other end (`holdfast status`), [`format_human`] prints a report the way
//!   `wg show` does, and [`default_socket_path`] is where both meet without configuration.
//!
//! The report is built from the same status feed the dashboard reads (never the machine itself)
//! plus a plain sample of the data-plane counters ([`DataPlaneSample`], taken through a
//! [`Sampler`]). It carries the session key's fingerprint and never the key: [`SnapshotView`]
//! has no key to give.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::status::{ClientStatus, SnapshotView};
use crate::sansio::supervisor::{Now, StateName, Timer};

/// The data-plane counters as the dashboard and the status socket see them: a plain value the
/// data plane's own counters are mapped into, so neither observer depends on its internals. It
/// is also the `data_plane` part of a [`StatusReport`], as is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPlaneSample {
    /// The TUN device, once it is up.
    pub tun: Option<TunInfo>,
    /// How many times the UDP/TUN loops were started (the spec: exactly once).
    pub loop_starts: u32,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped packets by reason, in the order to show them (e.g. "no session",
    /// "decrypt failure", "replay", "socket error").
    pub drops: Vec<DropCount>,
    /// The path MTU in use, once the data plane found it.
    #[serde(default)]
    pub path_mtu: Option<PathMtuInfo>,
    /// Which library's AES-256-GCM seals and opens the packets on this CPU ("ring" or
    /// "aws-lc-rs"; empty from a client older than this field).
    #[serde(default)]
    pub aead: String,
}

/// The size of the path to the gateway and of the tunnel over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathMtuInfo {
    /// The usable outer (underlay) packet size, IP header included.
    pub outer: u16,
    /// The TUN device's MTU (at least 1280 while it carries IPv6, whatever the path).
    pub tun_mtu: u16,
    /// What bounds `outer`: "link" (the route or interface toward the gateway), "configured"
    /// (`underlay_mtu`) or "discovered" (a smaller hop further along).
    pub bound: String,
}

impl PathMtuInfo {
    /// As `holdfast status` and the dashboard say it: "1280 (link), TUN MTU 1216".
    pub fn describe(&self) -> String {
        format!("{} ({}), TUN MTU {}", self.outer, self.bound, self.tun_mtu)
    }
}

/// Packets dropped for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub reason: String,
    pub count: u64,
}

impl DropCount {
    pub fn new(reason: &str, count: u64) -> Self {
        Self { reason: reason.to_owned(), count }
    }

    /// The non-zero drop counters of `stats`, in counter order.
    pub fn nonzero(stats: &crate::tunnel::Stats) -> Vec<DropCount> {
        crate::tunnel::DropReason::ALL
            .iter()
            .map(|r| DropCount::new(r.name(), stats.dropped(*r)))
            .filter(|d| d.count > 0)
            .collect()
    }
}

/// The TUN device's name and interface index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunInfo {
    pub name: String,
    pub ifindex: u32,
}

/// Takes a [`DataPlaneSample`] now; `None` while there is no data plane yet. Called a few times a
/// second by the dashboard and once per `holdfast status`: it must be cheap and never block
/// (relaxed atomic loads).
pub type Sampler = Arc<dyn Fn() -> Option<DataPlaneSample> + Send + Sync>;

/// Maps the supervisor's machine time ([`Now`]: time since the driver started) to this process's
/// clock, so an observer can say "for 12 s" and "in 3 s".
///
/// The status feed does not carry the driver's epoch, so it is estimated: an observer created
/// when the client starts is within a scheduling delay of it, and each status whose `since` is
/// seen gives an upper bound (`observed at - since`), of which the earliest is kept. The error is
/// milliseconds for an observer that starts with the client, which is how both observers are used.
#[derive(Debug, Clone, Copy)]
pub struct StatusClock {
    epoch: Instant,
}

impl StatusClock {
    /// A clock whose epoch is at most `at` (create it right after `client::start`).
    pub fn new(at: Instant) -> Self {
        Self { epoch: at }
    }

    /// Tightens the epoch estimate with a status observed at `at`.
    pub fn observe(&mut self, status: &ClientStatus, at: Instant) {
        if let Some(bound) = at.checked_sub(status.supervisor.since) {
            self.epoch = self.epoch.min(bound);
        }
    }

    /// Machine time at `at`.
    pub fn now(&self, at: Instant) -> Now {
        at.saturating_duration_since(self.epoch)
    }
}

/// Format version of [`StatusReport`]; bumped when a field changes meaning.
pub const REPORT_VERSION: u32 = 1;

/// What `holdfast status` shows, as one JSON document. Durations are whole milliseconds, times
/// are relative to the moment the report was built (`*_ago_ms`, `in_ms`), so a reader needs no
/// clock of the client's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: u32,
    /// The client process.
    pub pid: u32,
    /// Time since the supervisor started.
    pub uptime_ms: u64,
    /// The leaf state (`Unauthed`, `Authing`, `Healthy`, `Degraded`, `Backoff`, `Stopped`).
    pub state: String,
    /// The superstates enclosing it, outermost first (e.g. `["Running", "Connected"]`).
    pub superstates: Vec<String>,
    /// How long the client has been in `state`.
    pub in_state_ms: u64,
    /// What caused the last transition.
    pub last_cause: String,
    /// The one armed timer: what it is for and when it fires.
    pub next_timer: Option<TimerReport>,
    /// The un-jittered retry delay of the current failure streak (0 without failures).
    pub backoff_ms: u64,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Last measured control-plane round trip, in microseconds.
    pub last_rtt_us: Option<u64>,
    /// The installed session, without its key.
    pub snapshot: Option<SnapshotReport>,
    /// The kill-switch, as it describes itself.
    pub killswitch: String,
    /// The data plane's counters; `None` while it is not up.
    pub data_plane: Option<DataPlaneSample>,
    /// Recent transitions, newest first.
    pub recent: Vec<TransitionReport>,
}

/// The armed timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerReport {
    /// `health check`, `ping retry` or `auth retry`.
    pub purpose: String,
    pub in_ms: u64,
}

/// An installed session: everything but the key, which only appears as its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub assigned_ip: String,
    pub prefix_len: u8,
    pub gateway_ip: String,
    /// The IPv6 tunnel address, its prefix length and the gateway's: absent (and 0) when the
    /// session is IPv4 only. Defaulted when reading a report of a client from before IPv6.
    #[serde(default)]
    pub assigned_ip6: Option<String>,
    #[serde(default)]
    pub prefix_len6: u8,
    #[serde(default)]
    pub gateway_ip6: Option<String>,
    /// Hex, as in the logs.
    pub session_id: String,
    pub key_fingerprint: String,
    /// Time since the client received it (wall clock).
    pub age_ms: u64,
    pub idle_timeout_ms: u64,
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionReport {
    /// Machine time of the transition (since the supervisor started).
    pub at_ms: u64,
    pub ago_ms: u64,
    pub from: String,
    pub to: String,
    pub cause: String,
}

/// What the armed timer is for, in words. The same [`Timer::Health`] is a routine health check in
/// Healthy and a retry of a failed ping in Degraded.
pub fn timer_purpose(state: StateName, timer: Timer) -> &'static str {
    match (timer, state) {
        (Timer::Retry, _) => "auth retry",
        (Timer::Health, StateName::Degraded) => "ping retry",
        (Timer::Health, _) => "health check",
    }
}

/// The superstates enclosing a leaf, outermost first. (`StateName::superstate` gives only the
/// innermost; the chart's nesting is Running ⊃ {Establishing, Connected}.)
pub fn superstates(state: StateName) -> Vec<&'static str> {
    match state.superstate() {
        None => Vec::new(),
        Some("Running") => vec!["Running"],
        Some(inner) => vec!["Running", inner],
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl StatusReport {
    /// Builds a report at machine time `now` and wall time `wall` (both passed in, so tests can
    /// pin them).
    pub fn build(
        status: &ClientStatus,
        sample: Option<&DataPlaneSample>,
        killswitch: &str,
        now: Now,
        wall: SystemTime,
    ) -> Self {
        let s = &status.supervisor;
        StatusReport {
            version: REPORT_VERSION,
            pid: std::process::id(),
            uptime_ms: ms(now),
            state: s.state.to_string(),
            superstates: superstates(s.state).into_iter().map(String::from).collect(),
            in_state_ms: ms(now.saturating_sub(s.since)),
            last_cause: s.last_cause.clone(),
            next_timer: s.next_timer.map(|(timer, at)| TimerReport {
                purpose: timer_purpose(s.state, timer).into(),
                in_ms: ms(at.saturating_sub(now)),
            }),
            backoff_ms: ms(s.backoff),
            failures: s.failures,
            last_rtt_us: s.last_rtt.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            snapshot: status.snapshot.as_ref().map(|v| SnapshotReport::of(v, wall)),
            killswitch: killswitch.to_owned(),
            data_plane: sample.cloned(),
            recent: status
                .recent
                .iter()
                .rev()
                .map(|t| TransitionReport {
                    at_ms: ms(t.at),
                    ago_ms: ms(now.saturating_sub(t.at)),
                    from: t.from.to_string(),
                    to: t.to.to_string(),
                    cause: t.cause.clone(),
                })
                .collect(),
        }
    }
}

impl SnapshotReport {
    fn of(v: &SnapshotView, wall: SystemTime) -> Self {
        SnapshotReport {
            assigned_ip: v.assigned_ip.to_string(),
            prefix_len: v.prefix_len,
            gateway_ip: v.gateway_ip.to_string(),
            assigned_ip6: v.assigned_ip6.map(|ip| ip.to_string()),
            prefix_len6: v.prefix_len6,
            gateway_ip6: v.gateway_ip6.map(|ip| ip.to_string()),
            session_id: v.session_id.to_string(),
            key_fingerprint: v.key_fingerprint.to_string(),
            age_ms: ms(wall.duration_since(v.received_at).unwrap_or_default()),
            idle_timeout_ms: ms(v.idle_timeout),
        }
    }
}

/// Short human forms shared by `holdfast status` and the dashboard.
pub mod human {
    use std::time::Duration;

    /// `850ms`, `12s`, `4m05s`, `2h03m`, `3d04h`: two units at most, the way people read uptimes.
    pub fn duration(d: Duration) -> String {
        let s = d.as_secs();
        match s {
            0 => format!("{}ms", d.subsec_millis()),
            1..60 => format!("{s}s"),
            60..3600 => format!("{}m{:02}s", s / 60, s % 60),
            3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
            _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
        }
    }

    /// A duration given in milliseconds.
    pub fn millis(ms: u64) -> String {
        duration(Duration::from_millis(ms))
    }

    /// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `3.2 GiB`.
    pub fn bytes(n: u64) -> String {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if n < 1024 {
            return format!("{n} B");
        }
        let mut v = n as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        format!("{v:.1} {}", UNITS[unit])
    }

    /// A round trip: `850us`, `3.2ms`, `1.20s`.
    pub fn rtt(us: u64) -> String {
        match us {
            0..1000 => format!("{us}us"),
            1000..1_000_000 => format!("{:.1}ms", us as f64 / 1000.0),
            _ => format!("{:.2}s", us as f64 / 1e6),
        }
    }
}

/// Prints a report for people, in the manner of `wg show` / `tailscale status`.
pub fn format_human(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let path = if r.superstates.is_empty() { String::new() } else { format!(" ({})", r.superstates.join(" > ")) };
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(o, "holdfast client: {}{path} for {}", r.state, human::millis(r.in_state_ms));
    let _ = writeln!(o, "  pid:          {} (up {})", r.pid, human::millis(r.uptime_ms));
    if !r.last_cause.is_empty() {
        let _ = writeln!(o, "  last cause:   {}", r.last_cause);
    }
    let next = match (&r.next_timer, r.state.as_str()) {
        (Some(t), _) => format!("{} in {}", t.purpose, human::millis(t.in_ms)),
        (None, "Authing") => "authentication in flight".into(),
        (None, _) => "nothing scheduled".into(),
    };
    let _ = writeln!(o, "  next:         {next}");
    let backoff = if r.failures == 0 {
        "none".to_string()
    } else {
        format!("{} after {} failure(s)", human::millis(r.backoff_ms), r.failures)
    };
    let _ = writeln!(o, "  backoff:      {backoff}");
    let rtt = r.last_rtt_us.map(human::rtt).unwrap_or_else(|| "-".into());
    let _ = writeln!(o, "  last rtt:     {rtt}");
    let _ = writeln!(o, "  kill-switch:  {}", r.killswitch);

    match &r.snapshot {
        Some(s) => {
            let _ = writeln!(o, "\nsession {}", s.session_id);
            let _ = writeln!(o, "  address:      {}/{}", s.assigned_ip, s.prefix_len);
            if let Some(ip6) = &s.assigned_ip6 {
                let _ = writeln!(o, "  address6:     {ip6}/{}", s.prefix_len6);
            }
            let _ = writeln!(o, "  gateway:      {}", s.gateway_ip);
            if let Some(gw6) = &s.gateway_ip6 {
                let _ = writeln!(o, "  gateway6:     {gw6}");
            }
            let _ = writeln!(o, "  key:          fp:{}", s.key_fingerprint);
            let _ = writeln!(
                o,
                "  age:          {} (gateway idle timeout {})",
                human::millis(s.age_ms),
                human::millis(s.idle_timeout_ms)
            );
        }
        None => {
            let _ = writeln!(o, "\nsession: none yet");
        }
    }

    match &r.data_plane {
        Some(d) => {
            let tun = match &d.tun {
                Some(t) => format!("tunnel {} (ifindex {})", t.name, t.ifindex),
                None => "tunnel: not up".into(),
            };
            let _ = writeln!(o, "\n{tun}, loops started {} time(s)", d.loop_starts);
            let _ = writeln!(o, "  received:     {} ({} packets)", human::bytes(d.rx_bytes), d.rx_packets);
            let _ = writeln!(o, "  sent:         {} ({} packets)", human::bytes(d.tx_bytes), d.tx_packets);
            if let Some(p) = &d.path_mtu {
                let _ = writeln!(o, "  path MTU:     {}", p.describe());
            }
            if !d.aead.is_empty() {
                let _ = writeln!(o, "  cipher:       {}", crate::sansio::aead::describe(&d.aead));
            }
            if !d.drops.is_empty() {
                let drops: Vec<String> = d.drops.iter().map(|c| format!("{} {}", c.reason, c.count)).collect();
                let _ = writeln!(o, "  drops:        {}", drops.join(", "));
            }
        }
        None => {
            let _ = writeln!(o, "\ndata plane: not up");
        }
    }

    if !r.recent.is_empty() {
        let _ = writeln!(o, "\nrecent transitions (newest first):");
        for t in &r.recent {
            let _ = writeln!(o, "  {:>8} ago  {:<8} -> {:<8}  {}", human::millis(t.ago_ms), t.from, t.to, t.cause);
        }
    }
    o
}

/// The default socket: `/run/holdfast/client.sock` as root, else `holdfast/client.sock` in the
/// per-user runtime dir (`$XDG_RUNTIME_DIR`), else `/tmp/holdfast-<uid>/client.sock`.
pub fn default_socket_path() -> PathBuf {
    if crate::config::running_as_root() {
        return PathBuf::from("/run/holdfast/client.sock");
    }
    if let Some(dir) = directories::BaseDirs::new().and_then(|b| b.runtime_dir().map(Path::to_owned)) {
        return dir.join("holdfast").join("client.sock");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    PathBuf::from(format!("/tmp/holdfast-{uid}/client.sock"))
}

/// The socket a client file names, or the default.
pub fn socket_path(file: &crate::config::client::ClientFile) -> PathBuf {
    file.status.socket.clone().unwrap_or_else(default_socket_path)
}

/// The socket `holdfast status` should ask: `--socket` if given, else the `[status] socket` of the
/// client file if it can be read (as root it usually can; a user reading a root-only file cannot,
/// and then the default is right anyway), else the default.
pub fn resolve_socket_path(explicit: Option<PathBuf>, config: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    let config = config.map(Path::to_owned).unwrap_or_else(crate::config::default_client_file);
    match crate::config::client::ClientFile::load(&config) {
        Ok(file) => socket_path(&file),
        Err(_) => default_socket_path(),
    }
}

/// `holdfast status [--json] [--socket PATH] [--config FILE]`: asks the running client and prints
/// its status (for people, or as pretty JSON with `json`). Returns the process exit code: 0, or
/// [`StatusQueryError::exit_code`] after a one-line message on stderr.
pub fn status_command(json: bool, socket: Option<PathBuf>, config: Option<&Path>) -> i32 {
    local_socket::print_or_exit("holdfast status", status_text(json, socket, config))
}

/// What [`status_command`] prints: the report of the client at the resolved socket, as
/// [`format_human`] or as pretty JSON.
pub fn status_text(json: bool, socket: Option<PathBuf>, config: Option<&Path>) -> Result<String, StatusQueryError> {
    let path = resolve_socket_path(socket, config);
    let report = query(&path)?;
    if !json {
        return Ok(format_human(&report));
    }
    serde_json::to_string_pretty(&report).map(|t| t + "\n").map_err(|e| StatusQueryError::Malformed {
        who: Speaker::Client,
        path,
        reason: e.to_string(),
    })
}

use crate::local_socket::{self, Speaker};
pub use crate::local_socket::{ServeGuard, StatusQueryError};

/// Serves the status at `path` until the guard is dropped. Must be called inside a tokio runtime.
///
/// The socket is bound by [`local_socket::bind`]: mode 0600 in a folder created 0700 if missing
/// (which must belong to us or root); a socket left by a killed client is replaced, a live one is
/// an error (two clients must not share a socket), and so is a path that is not a socket.
pub fn serve(
    path: &Path,
    status: watch::Receiver<ClientStatus>,
    sampler: Option<Sampler>,
    killswitch: String,
) -> io::Result<ServeGuard> {
    let clock = StatusClock::new(status.borrow().epoch);
    let (listener, guard) = local_socket::bind(path, Speaker::Client)?;
    let task = tokio::spawn(accept_loop(listener, status, sampler, killswitch, clock));
    Ok(guard.with_task(task))
}

async fn accept_loop(
    listener: UnixListener,
    mut status: watch::Receiver<ClientStatus>,
    sampler: Option<Sampler>,
    killswitch: String,
    mut clock: StatusClock,
) {
    let mut feed_open = true;
    loop {
        tokio::select! {
            stream = local_socket::accept(&listener) => {
                let at = Instant::now();
                let current = status.borrow().clone();
                clock.observe(&current, at);
                let sample = sampler.as_ref().and_then(|s| s());
                let report = StatusReport::build(&current, sample.as_ref(), &killswitch, clock.now(at), SystemTime::now());
                let mut doc = match serde_json::to_vec(&report) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::debug!(target: "holdfast::status", "status report not serialisable: {e}");
                        continue;
                    }
                };
                doc.push(b'\n');
                local_socket::reply(stream, doc);
            }
            changed = status.changed(), if feed_open => {
                match changed {
                    Ok(()) => {
                        let current = status.borrow_and_update();
                        clock.observe(&current, Instant::now());
                    }
                    // The client is gone; keep answering with its last status until dropped.
                    Err(_) => feed_open = false,
                }
            }
        }
    }
}

/// Asks the client at `path` for its status (blocking, bounded by a 5 s timeout).
pub fn query(path: &Path) -> Result<StatusReport, StatusQueryError> {
    local_socket::query(path, Speaker::Client)
}

/// The raw JSON document the client at `path` answers with (for `holdfast status --json`, which
/// prints it as sent).
pub fn query_raw(path: &Path) -> Result<String, StatusQueryError> {
    local_socket::query_raw(path, Speaker::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_forms() {
        assert_eq!(human::duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human::duration(Duration::from_secs(12)), "12s");
        assert_eq!(human::duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(human::duration(Duration::from_secs(2 * 3600 + 180)), "2h03m");
        assert_eq!(human::duration(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d04h");
        assert_eq!(human::bytes(512), "512 B");
        assert_eq!(human::bytes(1536), "1.5 KiB");
        assert_eq!(human::bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human::rtt(850), "850us");
        assert_eq!(human::rtt(3200), "3.2ms");
        assert_eq!(human::rtt(1_200_000), "1.20s");
    }

    #[test]
    fn clock_keeps_the_earliest_bound() {
        let t0 = Instant::now();
        let mut clock = StatusClock::new(t0 + Duration::from_secs(5));
        let mut st = ClientStatus::initial(std::time::Instant::now());
        st.supervisor.since = Duration::from_secs(3);
        // Observed 10 s after t0 with since = 3 s: the epoch is at most t0 + 7 s (no change).
        clock.observe(&st, t0 + Duration::from_secs(10));
        assert_eq!(clock.now(t0 + Duration::from_secs(10)), Duration::from_secs(5));
        // Observed 4 s after t0 with since = 3 s: at most t0 + 1 s.
        clock.observe(&st, t0 + Duration::from_secs(4));
        assert_eq!(clock.now(t0 + Duration::from_secs(10)), Duration::from_secs(9));
        assert_eq!(clock.now(t0), Duration::ZERO, "never negative");
    }

    #[test]
    fn superstates_nest_outermost_first() {
        assert_eq!(superstates(StateName::Unauthed), vec!["Running"]);
        assert_eq!(superstates(StateName::Backoff), vec!["Running", "Establishing"]);
        assert_eq!(superstates(StateName::Degraded), vec!["Running", "Connected"]);
        assert!(superstates(StateName::Stopped).is_empty());
        assert_eq!(timer_purpose(StateName::Degraded, Timer::Health), "ping retry");
        assert_eq!(timer_purpose(StateName::Healthy, Timer::Health), "health check");
        assert_eq!(timer_purpose(StateName::Backoff, Timer::Retry), "auth retry");
    }
}
