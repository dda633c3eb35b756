//! `holdfast gateway status`: what a running gateway is doing, like `wg show` on a server.
//!
//! The running gateway serves a [`GatewayReport`] on its status socket (`status_socket` in
//! gateway.toml, default `DIR/gateway.sock`; mode 0600, so root-only for a gateway run as root),
//! through the same [`local_socket`] the client's `holdfast status` uses: connecting is the
//! question, one JSON document is the answer.
//!
//! The report is built from [`Observed`]: the live session table, each session's data-plane
//! state (endpoint, last packet, its own counters), the gateway-wide data-plane counters and the
//! control plane's tallies. Observers only read; nothing here changes the gateway. Sessions show
//! their key's fingerprint, never the key.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::dataplane::ControlSessions;
use super::service::ControlState;
use super::sessions::Millis;
use crate::client::status_socket::{DropCount, human};
use crate::config::gateway::{DEFAULT_STATUS_SOCKET, GATEWAY_FILE};
use crate::flood::{ShedCounters, ShedReport};
use crate::local_socket::{self, ServeGuard, Speaker, StatusQueryError};
use crate::tunnel::{Counters, Stats};

/// Everything of the running gateway that observers (`gateway status`, the metrics endpoint)
/// read. Built once by `gateway run`; every figure is read live at each query.
pub struct Observed {
    pub name: String,
    pub endpoint: SocketAddr,
    /// The control plane's bound address (TCP) and the data plane's (UDP).
    pub control_listen: SocketAddr,
    pub data_listen: SocketAddr,
    pub tun: String,
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    pub started: Instant,
    pub control: Arc<ControlState>,
    pub data: Arc<ControlSessions>,
    pub counters: Arc<Counters>,
    /// What the socket filter and the per-source budgets shed.
    pub shedding: Arc<ShedCounters>,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Format version of [`GatewayReport`]; bumped when a field changes meaning.
pub const REPORT_VERSION: u32 = 1;

/// What `holdfast gateway status` shows, as one JSON document. Durations are whole
/// milliseconds; times are ages at the moment the report was built, so a reader needs no clock
/// of the gateway's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayReport {
    pub version: u32,
    pub pid: u32,
    pub name: String,
    pub uptime_ms: u64,
    pub endpoint: String,
    pub control_listen: String,
    pub data_listen: String,
    pub tun: String,
    /// The tunnel subnets and the gateway's addresses in them (IPv4, then IPv6 when served).
    pub subnets: Vec<String>,
    pub gateway_addresses: Vec<String>,
    pub registry: RegistryReport,
    pub limits: LimitsReport,
    pub totals: Totals,
    pub data_plane: DataPlaneReport,
    /// The resolver on the tunnel address(es) (`[dns]`): `None` when it is off.
    #[serde(default)]
    pub resolver: Option<ResolverReport>,
    /// Live sessions, by client name, then oldest first.
    pub sessions: Vec<SessionReport>,
}

/// The client registry in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryReport {
    /// Registered clients, active or revoked.
    pub clients: usize,
    /// A file's: 1 for the version loaded at start, one more per reload. A shared registry's:
    /// the database's version.
    pub version: u64,
    /// The shared registry's database is unreachable: this gateway serves its last good view.
    #[serde(default)]
    pub degraded: bool,
}

/// The session expiry settings in force (they change on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsReport {
    pub idle_timeout_ms: u64,
    pub max_lifetime_ms: u64,
    pub reauth_grace_ms: u64,
}

/// The control plane's totals since start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub sessions: usize,
    /// Distinct clients with a session.
    pub clients_connected: usize,
    /// Authenticate calls by result (`ok`, `revoked`, ...), every result listed.
    pub authentications: Vec<ResultCount>,
    /// PingSession calls by result (`ok`, `expired_idle`, ...), every result listed.
    pub pings: Vec<ResultCount>,
}

/// How many calls ended with one result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultCount {
    pub result: String,
    pub count: u64,
}

/// The gateway-wide data-plane counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPlaneReport {
    /// Inner packets from clients (delivered to the TUN device or another client).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Inner packets sealed and sent to clients.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub keepalives_rx: u64,
    pub unknown_session_notices_tx: u64,
    pub roams: u64,
    /// Path MTU probes received from clients, acks sent, acks withheld by the rate limit
    /// (absent from a gateway older than these counters: 0).
    #[serde(default)]
    pub probes_rx: u64,
    #[serde(default)]
    pub probe_acks_tx: u64,
    #[serde(default)]
    pub probe_acks_withheld: u64,
    pub rx_coalesced: u64,
    /// Loop starts (tx, rx): one each for the life of the process.
    pub loop_starts: [u64; 2],
    /// Drops by reason, non-zero ones only.
    pub drops: Vec<DropCount>,
    /// Flood shedding: the socket filter, per-source budgets (absent in older reports).
    #[serde(default)]
    pub shedding: ShedReport,
    /// Which library's AES-256-GCM seals and opens the packets on this CPU ("ring" or
    /// "aws-lc-rs"; empty from a gateway older than this field).
    #[serde(default)]
    pub aead: String,
}

/// The gateway's resolver: where it answers (the addresses pushed to clients) and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverReport {
    pub addresses: Vec<String>,
    pub search_domains: Vec<String>,
    pub stats: super::dns::DnsStats,
}

/// One live session. Never the key: its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    pub client: String,
    /// The client's tunnel addresses (one IPv4 address today; a list so that a second family
    /// joins it without a format change).
    pub addresses: Vec<String>,
    /// Hex, as in the logs.
    pub session_id: String,
    pub key_fingerprint: String,
    /// `current`, or `superseded` while a replaced session lasts out its grace period.
    pub state: String,
    /// The client's last authenticated UDP endpoint; `None` until it has sent a datagram.
    pub endpoint: Option<String>,
    pub age_ms: u64,
    /// Since the last sign of life (a ping or authenticated traffic).
    pub last_seen_ago_ms: u64,
    /// Since the last authenticated datagram; `None` if none came yet.
    pub last_packet_ago_ms: Option<u64>,
    /// Inner packets received from this client and delivered, and their bytes.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Inner packets sent to this client, and their bytes.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub keepalives_rx: u64,
    /// This session's drops by reason, non-zero ones only.
    pub drops: Vec<DropCount>,
    /// The largest inner packet the path to this client carries, as its path MTU probes report
    /// it (`None`: no probe yet, the gateway's TUN MTU applies; the smaller of the two is used).
    #[serde(default)]
    pub path_mtu: Option<u16>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn results(counts: Vec<(&'static str, u64)>) -> Vec<ResultCount> {
    counts.into_iter().map(|(r, count)| ResultCount { result: r.to_owned(), count }).collect()
}

impl DataPlaneReport {
    fn of(s: &Stats, shedding: ShedReport) -> Self {
        Self {
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            keepalives_rx: s.keepalives_rx,
            unknown_session_notices_tx: s.notices_tx,
            roams: s.roams,
            probes_rx: s.probes_rx,
            probe_acks_tx: s.probe_acks_tx,
            probe_acks_withheld: s.probe_acks_withheld,
            rx_coalesced: s.rx_coalesced,
            loop_starts: [s.tx_loop_starts, s.rx_loop_starts],
            drops: DropCount::nonzero(s),
            shedding,
            aead: crate::sansio::aead::Backend::for_this_cpu().name().into(),
        }
    }
}

impl Observed {
    /// The report now.
    pub fn report(&self) -> GatewayReport {
        let control = &*self.control;
        let table = &control.sessions;
        let now: Millis = control.clock.now();
        let ago = |t: Millis| now.saturating_sub(t);
        let mut sessions: Vec<SessionReport> = table
            .all()
            .iter()
            .filter(|s| table.validity(s, now).is_ok())
            .map(|s| {
                let data = self.data.existing(s.id);
                let traffic = data.as_ref().map(|d| d.traffic.stats()).unwrap_or_default();
                SessionReport {
                    client: s.client.to_string(),
                    addresses: std::iter::once(s.assigned_ip.to_string())
                        .chain(s.assigned_ip6.map(|ip| ip.to_string()))
                        .collect(),
                    session_id: s.id.to_string(),
                    key_fingerprint: s.key.fingerprint().to_string(),
                    state: if s.superseded_at().is_some() { "superseded" } else { "current" }.into(),
                    endpoint: data.as_ref().and_then(|d| d.endpoint()).map(|e| e.to_string()),
                    age_ms: ago(s.opened_at),
                    last_seen_ago_ms: ago(s.last_seen()),
                    last_packet_ago_ms: data.as_ref().and_then(|d| d.last_seen()).map(|t| ms(t.elapsed())),
                    rx_packets: traffic.rx_packets,
                    rx_bytes: traffic.rx_bytes,
                    tx_packets: traffic.tx_packets,
                    tx_bytes: traffic.tx_bytes,
                    keepalives_rx: traffic.keepalives_rx,
                    drops: DropCount::nonzero(&traffic),
                    path_mtu: data.as_ref().and_then(|d| d.path_mtu()),
                }
            })
            .collect();
        sessions.sort_by(|a, b| (&a.client, b.age_ms).cmp(&(&b.client, a.age_ms)));
        let mut clients: Vec<&str> = sessions.iter().map(|s| s.client.as_str()).collect();
        clients.dedup();
        let limits = table.limits();
        GatewayReport {
            version: REPORT_VERSION,
            pid: std::process::id(),
            name: self.name.clone(),
            uptime_ms: ms(self.started.elapsed()),
            endpoint: self.endpoint.to_string(),
            control_listen: self.control_listen.to_string(),
            data_listen: self.data_listen.to_string(),
            tun: self.tun.clone(),
            // The IPv6 side as served (absent on a host with IPv6 disabled).
            subnets: std::iter::once(self.subnet.to_string())
                .chain(control.v6.map(|v6| v6.subnet.to_string()))
                .collect(),
            gateway_addresses: std::iter::once(self.gateway_ip.to_string())
                .chain(control.v6.map(|v6| v6.gateway_ip.to_string()))
                .collect(),
            registry: RegistryReport {
                clients: control.registry.view().len(),
                version: control.registry.view().version(),
                degraded: control.registry.degraded(),
            },
            limits: LimitsReport {
                idle_timeout_ms: limits.idle_ms,
                max_lifetime_ms: limits.max_lifetime_ms,
                reauth_grace_ms: limits.grace_ms,
            },
            totals: Totals {
                sessions: sessions.len(),
                clients_connected: clients.len(),
                authentications: results(control.counters.authentications()),
                pings: results(control.counters.pings()),
            },
            data_plane: DataPlaneReport::of(&self.counters.stats(), self.shedding.report()),
            resolver: (!control.dns.servers.is_empty()).then(|| ResolverReport {
                addresses: control.dns.servers.iter().map(ToString::to_string).collect(),
                search_domains: control.dns.search_domains.clone(),
                stats: control.dns_counters.stats(),
            }),
            sessions,
        }
    }
}

/// Serves the status of `observed` at `path` until the guard is dropped. Must be called inside
/// a tokio runtime.
pub fn serve(path: &Path, observed: Arc<Observed>) -> std::io::Result<ServeGuard> {
    let (listener, guard) = local_socket::bind(path, Speaker::Gateway)?;
    let task = tokio::spawn(async move {
        loop {
            let stream = local_socket::accept(&listener).await;
            let mut doc = match serde_json::to_vec(&observed.report()) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(target: "holdfast::status", "gateway report not serialisable: {e}");
                    continue;
                }
            };
            doc.push(b'\n');
            local_socket::reply(stream, doc);
        }
    });
    Ok(guard.with_task(task))
}

/// Asks the gateway serving at `path` (blocking, bounded by a 5 s timeout).
pub fn query(path: &Path) -> Result<GatewayReport, StatusQueryError> {
    local_socket::query(path, Speaker::Gateway)
}

/// The socket `gateway status` asks: `--socket` if given, else `status_socket` of DIR's
/// gateway.toml, else the default `DIR/gateway.sock`. Only that one key is read, leniently: an
/// operator asks for the status precisely while the file is being edited, and a file another
/// key of which is broken must not hide a running gateway.
pub fn socket_of(dir: &Path, explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    let named = std::fs::read_to_string(dir.join(GATEWAY_FILE))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("status_socket")?.as_str().map(PathBuf::from));
    let path = named.unwrap_or_else(|| PathBuf::from(DEFAULT_STATUS_SOCKET));
    if path.is_absolute() { path } else { dir.join(path) }
}

/// What `gateway status` prints: the report for people, or as pretty JSON.
pub fn status_text(path: &Path, json: bool) -> Result<String, StatusQueryError> {
    let report = query(path)?;
    if !json {
        return Ok(format_human(&report));
    }
    serde_json::to_string_pretty(&report).map(|t| t + "\n").map_err(|e| StatusQueryError::Malformed {
        who: Speaker::Gateway,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn counts(c: &[ResultCount]) -> String {
    let shown: Vec<String> = c.iter().filter(|r| r.count > 0).map(|r| format!("{} {}", r.result, r.count)).collect();
    if shown.is_empty() { "none".into() } else { shown.join(", ") }
}

fn drops(d: &[DropCount]) -> String {
    let shown: Vec<String> = d.iter().map(|c| format!("{} {}", c.reason, c.count)).collect();
    if shown.is_empty() { "none".into() } else { shown.join(", ") }
}

/// Prints a report for people, in the manner of `wg show`.
pub fn format_human(r: &GatewayReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(o, "holdfast gateway '{}': up {}, pid {}", r.name, human::millis(r.uptime_ms), r.pid);
    let _ = writeln!(o, "  endpoint:     {} (control {}, data {})", r.endpoint, r.control_listen, r.data_listen);
    let _ =
        writeln!(o, "  tunnel:       {} in {} (tun {})", r.gateway_addresses.join(", "), r.subnets.join(", "), r.tun);
    let _ = writeln!(
        o,
        "  registry:     {} client(s), version {}{}",
        r.registry.clients,
        r.registry.version,
        if r.registry.degraded { " (DATABASE UNREACHABLE: serving the last good view)" } else { "" }
    );
    let _ = writeln!(
        o,
        "  sessions:     {} ({} client(s)); idle timeout {}, lifetime {}, re-auth grace {}",
        r.totals.sessions,
        r.totals.clients_connected,
        human::millis(r.limits.idle_timeout_ms),
        human::millis(r.limits.max_lifetime_ms),
        human::millis(r.limits.reauth_grace_ms)
    );
    let _ = writeln!(o, "  auth:         {}", counts(&r.totals.authentications));
    let _ = writeln!(o, "  pings:        {}", counts(&r.totals.pings));
    let d = &r.data_plane;
    let _ = writeln!(o, "\ndata plane");
    if !d.aead.is_empty() {
        let _ = writeln!(o, "  cipher:       {}", crate::sansio::aead::describe(&d.aead));
    }
    let _ = writeln!(o, "  received:     {} ({} packets)", human::bytes(d.rx_bytes), d.rx_packets);
    let _ = writeln!(o, "  sent:         {} ({} packets)", human::bytes(d.tx_bytes), d.tx_packets);
    let _ = writeln!(
        o,
        "  keepalives:   {} received; {} unknown-session notices sent; {} roams",
        d.keepalives_rx, d.unknown_session_notices_tx, d.roams
    );
    let _ = writeln!(
        o,
        "  MTU probes:   {} received; {} acks sent, {} withheld",
        d.probes_rx, d.probe_acks_tx, d.probe_acks_withheld
    );
    let _ = writeln!(o, "  drops:        {}", drops(&d.drops));
    let f = &d.shedding;
    let _ = writeln!(
        o,
        "  shedding:     {}{}; {} dropped by the filter, {} failed ({} shed), {} notices withheld, {} flood(s); {} receive-buffer overflows",
        if f.filter { "socket filter on" } else { "no socket filter" },
        if f.flooded { ", FLOOD being shed now" } else { "" },
        f.kernel_dropped,
        f.failed,
        f.shed,
        f.notices_withheld,
        f.floods,
        f.buffer_overflows
    );
    match &r.resolver {
        Some(dns) => {
            let _ = writeln!(o, "\nresolver on {}", dns.addresses.join(", "));
            let _ = writeln!(o, "  queries:      {}", dns.stats);
        }
        None => {
            let _ = writeln!(o, "\nresolver off");
        }
    }
    for s in &r.sessions {
        let _ = writeln!(o, "\nsession {} (client {}, {})", s.session_id, s.client, s.state);
        let _ = writeln!(o, "  addresses:    {}", s.addresses.join(", "));
        let _ = writeln!(o, "  endpoint:     {}", s.endpoint.as_deref().unwrap_or("(none yet)"));
        let _ = writeln!(o, "  key:          fp:{}", s.key_fingerprint);
        let packet =
            s.last_packet_ago_ms.map(|t| format!("{} ago", human::millis(t))).unwrap_or_else(|| "none yet".into());
        let _ = writeln!(
            o,
            "  age:          {} (last seen {} ago, last packet {packet})",
            human::millis(s.age_ms),
            human::millis(s.last_seen_ago_ms)
        );
        let _ = writeln!(o, "  received:     {} ({} packets)", human::bytes(s.rx_bytes), s.rx_packets);
        let _ = writeln!(o, "  sent:         {} ({} packets)", human::bytes(s.tx_bytes), s.tx_packets);
        match s.path_mtu {
            Some(m) => {
                let _ = writeln!(o, "  path MTU:     {m} (inner, as the client's probes found the path)");
            }
            None => {
                let _ = writeln!(o, "  path MTU:     the tunnel's (no probe yet)");
            }
        }
        if !s.drops.is_empty() {
            let _ = writeln!(o, "  drops:        {}", drops(&s.drops));
        }
    }
    if r.sessions.is_empty() {
        let _ = writeln!(o, "\nno live sessions");
    }
    o
}
