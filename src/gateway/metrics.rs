//! The gateway's metrics: the control plane's counters ([`ControlCounters`]) and the opt-in
//! Prometheus endpoint (`[metrics] listen` in gateway.toml) that exposes them with the data plane's.
//!
//! Nothing is counted twice: the endpoint owns no counters of its own. Each scrape reads the live
//! atomics (the data plane's [`Counters`](crate::tunnel::Counters), the control plane's [`ControlCounters`], the session
//! table) through [`Collector`]s and encodes them with `prometheus-client`'s Prometheus text
//! encoder (format 0.0.4). Per-session figures are in `gateway status`, not here: a label per
//! session would be an unbounded number of series.
//!
//! **Adding metrics** (e.g. the DNS resolver's counters): implement [`Collector`] over the
//! subsystem's own atomics, make them reachable from [`Observed`], and add the collector in
//! [`collectors`]: the one list the endpoint serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::sessions::{Expiry, PingVerdict};
use super::status::Observed;
use crate::tunnel::DropReason;

const TARGET: &str = "holdfast::gateway::metrics";

/// Prefix of every metric name.
pub const PREFIX: &str = "holdfast_gateway";

/// How Authenticate ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    Ok,
    NotRegistered,
    Revoked,
    CertificateReplaced,
    /// The request itself was refused (an over-long `client_version`).
    InvalidRequest,
}

impl AuthResult {
    pub const ALL: [AuthResult; 5] = [
        AuthResult::Ok,
        AuthResult::NotRegistered,
        AuthResult::Revoked,
        AuthResult::CertificateReplaced,
        AuthResult::InvalidRequest,
    ];

    /// The `result` label.
    pub const fn name(self) -> &'static str {
        match self {
            AuthResult::Ok => "ok",
            AuthResult::NotRegistered => "not_registered",
            AuthResult::Revoked => "revoked",
            AuthResult::CertificateReplaced => "certificate_replaced",
            AuthResult::InvalidRequest => "invalid_request",
        }
    }
}

/// The `result` labels of PingSession: `ok`, or why the session counts as expired.
const PING_RESULTS: [PingVerdict; 7] = [
    PingVerdict::Ok,
    PingVerdict::Expired(Expiry::Unknown),
    PingVerdict::Expired(Expiry::OtherClient),
    PingVerdict::Expired(Expiry::Idle),
    PingVerdict::Expired(Expiry::Lifetime),
    PingVerdict::Expired(Expiry::Superseded),
    PingVerdict::Expired(Expiry::Revoked),
];

const fn ping_index(v: PingVerdict) -> usize {
    match v {
        PingVerdict::Ok => 0,
        PingVerdict::Expired(Expiry::Unknown) => 1,
        PingVerdict::Expired(Expiry::OtherClient) => 2,
        PingVerdict::Expired(Expiry::Idle) => 3,
        PingVerdict::Expired(Expiry::Lifetime) => 4,
        PingVerdict::Expired(Expiry::Superseded) => 5,
        PingVerdict::Expired(Expiry::Revoked) => 6,
    }
}

/// The `result` label of a PingSession verdict.
pub const fn ping_result_name(v: PingVerdict) -> &'static str {
    match v {
        PingVerdict::Ok => "ok",
        PingVerdict::Expired(Expiry::Unknown) => "expired_unknown",
        PingVerdict::Expired(Expiry::OtherClient) => "expired_other_client",
        PingVerdict::Expired(Expiry::Idle) => "expired_idle",
        PingVerdict::Expired(Expiry::Lifetime) => "expired_lifetime",
        PingVerdict::Expired(Expiry::Superseded) => "expired_superseded",
        PingVerdict::Expired(Expiry::Revoked) => "expired_revoked",
    }
}

/// The control plane's tallies, bumped by the control service (relaxed atomics: independent
/// counts read for display; a PingSession still neither locks nor allocates).
#[derive(Debug, Default)]
pub struct ControlCounters {
    auth: [AtomicU64; AuthResult::ALL.len()],
    pings: [AtomicU64; PING_RESULTS.len()],
}

impl ControlCounters {
    pub fn auth(&self, r: AuthResult) {
        self.auth[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn ping(&self, v: PingVerdict) {
        self.pings[ping_index(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// Authentications by result, every result listed.
    pub fn authentications(&self) -> Vec<(&'static str, u64)> {
        AuthResult::ALL.iter().map(|r| (r.name(), self.auth[*r as usize].load(Ordering::Relaxed))).collect()
    }

    /// PingSession calls by result, every result listed.
    pub fn pings(&self) -> Vec<(&'static str, u64)> {
        PING_RESULTS
            .iter()
            .map(|v| (ping_result_name(*v), self.pings[ping_index(*v)].load(Ordering::Relaxed)))
            .collect()
    }
}

/// Every collector the endpoint serves: **the one place to register new metrics**.
pub fn collectors(observed: &Arc<Observed>) -> Vec<Box<dyn Collector>> {
    vec![Box::new(GatewayCollector { observed: observed.clone() })]
}

/// The registry a scrape encodes.
pub fn registry(observed: &Arc<Observed>) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    for c in collectors(observed) {
        registry.register_collector(c);
    }
    registry
}

/// The registry encoded in the Prometheus text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// The gateway's own figures: sessions, control-plane results, data-plane traffic and drops.
#[derive(Debug)]
struct GatewayCollector {
    observed: Arc<Observed>,
}

/// One metric: a descriptor and its samples (no labels, or one label with several values).
fn metric(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    samples: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    let value = |m: &mut prometheus_client::encoding::MetricEncoder, v: u64| match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, u64, f64>(&v, None),
        _ => m.encode_gauge(&v),
    };
    if label.is_empty() {
        for (_, v) in samples {
            value(&mut m, *v)?;
        }
        return Ok(());
    }
    for (l, v) in samples {
        value(&mut m.encode_family(&[(label, *l)])?, *v)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let o = &*self.observed;
        let control = &o.control;
        let s = o.counters.stats();
        let sessions = control.sessions.len() as u64;
        metric(
            &mut e,
            "sessions",
            "Sessions held (current and in their re-auth grace).",
            Gauge,
            "",
            &[("", sessions)],
        )?;
        // The resolver (`[dns]`): zero when it is off.
        let d = control.dns_counters.stats();
        metric(
            &mut e,
            "dns_queries",
            "DNS queries received by the resolver on the tunnel address.",
            Counter,
            "",
            &[("", d.queries)],
        )?;
        metric(
            &mut e,
            "dns_results",
            "DNS queries by outcome: answered (by an upstream), servfail, refused (not a live session), malformed, rate_limited.",
            Counter,
            "result",
            &[
                ("answered", d.answered),
                ("servfail", d.servfail),
                ("refused", d.refused),
                ("malformed", d.malformed),
                ("rate_limited", d.rate_limited),
            ],
        )?;
        let registered = control.registry.view().len() as u64;
        metric(
            &mut e,
            "registered_clients",
            "Clients in the registry (active or revoked).",
            Gauge,
            "",
            &[("", registered)],
        )?;
        let version = control.registry.view().version();
        metric(
            &mut e,
            "registry_version",
            "Version of the client registry in force: a file's is 1 at start, +1 per reload; a shared registry's is the database's.",
            Gauge,
            "",
            &[("", version)],
        )?;
        let degraded = u64::from(control.registry.degraded());
        metric(
            &mut e,
            "registry_degraded",
            "1 while the shared registry's database is unreachable (serving the last good view).",
            Gauge,
            "",
            &[("", degraded)],
        )?;
        let uptime = o.started.elapsed().as_secs();
        metric(&mut e, "uptime_seconds", "Seconds since the gateway started.", Gauge, "", &[("", uptime)])?;
        metric(
            &mut e,
            "authentications",
            "Authenticate calls by result.",
            Counter,
            "result",
            &control.counters.authentications(),
        )?;
        metric(&mut e, "pings", "PingSession calls by result.", Counter, "result", &control.counters.pings())?;
        metric(
            &mut e,
            "bytes",
            "Inner bytes through the data plane: rx from clients, tx to clients.",
            Counter,
            "direction",
            &[("rx", s.rx_bytes), ("tx", s.tx_bytes)],
        )?;
        metric(
            &mut e,
            "packets",
            "Inner packets through the data plane: rx from clients, tx to clients.",
            Counter,
            "direction",
            &[("rx", s.rx_packets), ("tx", s.tx_packets)],
        )?;
        let drops: Vec<(&str, u64)> = DropReason::ALL.iter().map(|r| (r.name(), s.dropped(*r))).collect();
        metric(
            &mut e,
            "drops",
            "Packets and datagrams dropped by the data plane, by reason.",
            Counter,
            "reason",
            &drops,
        )?;
        metric(
            &mut e,
            "keepalives_received",
            "Keepalives received from clients.",
            Counter,
            "",
            &[("", s.keepalives_rx)],
        )?;
        metric(
            &mut e,
            "unknown_session_notices",
            "Unknown-session notices sent to clients.",
            Counter,
            "",
            &[("", s.notices_tx)],
        )?;
        metric(&mut e, "roams", "Authenticated datagrams from a new client endpoint.", Counter, "", &[("", s.roams)])?;
        metric(
            &mut e,
            "path_mtu_probes",
            "Authenticated path MTU probes received from clients.",
            Counter,
            "",
            &[("", s.probes_rx)],
        )?;
        metric(
            &mut e,
            "path_mtu_probe_acks",
            "Acks to path MTU probes: sent, or withheld by the gateway-wide rate limit (the client probes again).",
            Counter,
            "result",
            &[("sent", s.probe_acks_tx), ("withheld", s.probe_acks_withheld)],
        )?;
        let f = o.shedding.report();
        metric(
            &mut e,
            "shed_datagrams",
            "Datagrams rejected at the data port: kernel (by the socket filter), failed (in the gateway: bad header, unknown session, bad tag, replay), shed (of those, dropped without AES work: over-budget source).",
            Counter,
            "stage",
            &[("kernel", f.kernel_dropped), ("failed", f.failed), ("shed", f.shed)],
        )?;
        metric(
            &mut e,
            "receive_buffer_overflows",
            "UDP datagrams the gateway's network namespace dropped for a full receive buffer.",
            Counter,
            "",
            &[("", f.buffer_overflows)],
        )?;
        metric(
            &mut e,
            "notices_withheld",
            "Unknown-session notices not sent: the source was over its failure budget.",
            Counter,
            "",
            &[("", f.notices_withheld)],
        )?;
        metric(
            &mut e,
            "floods",
            "Floods at the data port seen (one per start line in the log).",
            Counter,
            "",
            &[("", f.floods)],
        )?;
        metric(
            &mut e,
            "flooded",
            "1 while a flood at the data port is being shed.",
            Gauge,
            "",
            &[("", u64::from(f.flooded))],
        )?;
        Ok(())
    }
}

/// At most this many scrapes are served at once; more connections are closed at once. A scraper
/// needs one; the bound keeps a flood on an exposed address from costing more than that.
const MAX_CONNECTIONS: usize = 16;

/// A connection must finish its request and read the answer within this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The running endpoint; dropping it stops serving.
#[derive(Debug)]
pub struct MetricsServer {
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `GET /metrics` from `registry` until the returned server is dropped.
/// A non-loopback address is served, with a warning: the metrics show how busy the gateway is
/// and which clients' results move, which is not for everyone to read.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(target: TARGET, "metrics served on non-loopback address {local}: anyone who can reach it can read them");
    }
    let task = tokio::spawn(accept_loop(listener, registry));
    tracing::info!(target: TARGET, "metrics at http://{local}/metrics");
    Ok(MetricsServer { local, task })
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: transient; a pause keeps a persistent error from spinning.
                tracing::debug!(target: TARGET, "metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closes the connection
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
    }
    match req.uri().path() {
        "/metrics" => match encode(registry) {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n".into()),
        },
        "/" => text(StatusCode::OK, "Holdfast gateway: metrics at /metrics\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ping_verdict_has_its_own_counter() {
        let c = ControlCounters::default();
        for (i, v) in PING_RESULTS.iter().enumerate() {
            assert_eq!(ping_index(*v), i);
            for _ in 0..=i {
                c.ping(*v);
            }
        }
        let counts: Vec<u64> = c.pings().iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![1, 2, 3, 4, 5, 6, 7]);
        c.auth(AuthResult::Revoked);
        assert!(c.authentications().contains(&("revoked", 1)));
    }
}
