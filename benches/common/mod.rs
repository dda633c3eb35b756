//! Measurements shared by the benches: `start()` latency and the control plane's round trips.
//! Each bench prints its own view; `resilience` folds them into its one table.
#![allow(dead_code)] // each bench uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::client::control::{ControlPlane as ClientControl, PingAnswer};
use holdfast::client::killswitch::LoggingNoopKillSwitch;
use holdfast::client::{self, ClientSettings};
use holdfast::config::gateway::GatewayConfig;
use holdfast::gateway::ControlPlane as Gateway;

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const DEADLINE: Duration = Duration::from_secs(5);

/// A gateway directory provisioned with the real binary (endpoint `endpoint`) and one client
/// file, in a temp dir removed on drop.
pub struct Provisioned {
    pub dir: tempfile::TempDir,
    pub gateway: PathBuf,
    pub client_file: PathBuf,
}

pub fn provision(endpoint: &str) -> Provisioned {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = dir.path().join("gw");
    let client_file = dir.path().join("bench.toml");
    run(&["gateway", "init", "--dir", s(&gateway), "--endpoint", endpoint]);
    run(&["gateway", "add-client", "--dir", s(&gateway), "bench", "--out", s(&client_file)]);
    Provisioned { dir, gateway, client_file }
}

fn run(args: &[&str]) {
    let st = Command::new(BIN).args(args).output().expect("run holdfast");
    assert!(st.status.success(), "{args:?}: {}", String::from_utf8_lossy(&st.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Times `client::start()` `runs` times (sorted). The client file is loaded outside the timed
/// part (that is where start-up failures are reported); the no-op kill-switch keeps the machine's
/// own namespace untouched. No gateway listens on the endpoint, so the supervisors only fail to
/// connect on loopback before each is stopped again.
pub fn start_times(runs: usize) -> Vec<Duration> {
    let p = provision("127.0.0.1:9");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut samples = Vec::with_capacity(runs);
    rt.block_on(async {
        for _ in 0..runs {
            let settings = ClientSettings::load(p.client_file.clone()).expect("client file loads");
            let t0 = Instant::now();
            let handle = client::start(settings, Arc::new(LoggingNoopKillSwitch), None).expect("start");
            samples.push(t0.elapsed());
            handle.stop().await.expect("stop");
        }
    });
    samples.sort();
    samples
}

/// Control-plane round trips, each list sorted.
pub struct ControlTimes {
    /// `PingSession` on an established connection.
    pub ping: Vec<Duration>,
    /// The empty `Probe` on the same connection.
    pub probe: Vec<Duration>,
    /// A fresh channel's first `Authenticate`: TCP connect, TLS 1.3 handshake and the call (what
    /// a client pays after the gateway restarted). Median of [`COLD_RUNS`].
    pub cold_auth: Duration,
}

const COLD_RUNS: usize = 21;

/// Round trips on one mutual-TLS 1.3 connection on loopback to the real gateway service run
/// in-process: `PingSession` and the empty `Probe`, interleaved so that machine noise hits both
/// alike, after a warm-up; and the cold `Authenticate` of fresh channels.
pub fn control_rtts(rounds: usize) -> ControlTimes {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let p = provision(&format!("127.0.0.1:{port}"));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let config = GatewayConfig::load_dir(&p.gateway).expect("gateway config");
        let gateway = Gateway::bind(&config).expect("bind");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(gateway.serve(async move {
            let _ = stop_rx.await;
        }));

        let settings = ClientSettings::load(p.client_file.clone()).expect("client file");
        let mut cold = Vec::with_capacity(COLD_RUNS);
        for _ in 0..COLD_RUNS {
            let fresh = ClientControl::new(&settings.file, &settings.creds).expect("channel");
            let t = Instant::now();
            fresh.authenticate(DEADLINE).await.expect("authenticate");
            cold.push(t.elapsed());
        }
        cold.sort();
        let client = ClientControl::new(&settings.file, &settings.creds).expect("channel");
        let auth = client.authenticate(DEADLINE).await.expect("authenticate");
        // Warm-up: connection, TLS session, HTTP/2 windows, allocator.
        for _ in 0..200 {
            client.probe(DEADLINE).await.expect("probe");
            client.ping(auth.session_id, DEADLINE).await.expect("ping");
        }
        let (mut ping, mut probe) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        for _ in 0..rounds {
            let t = Instant::now();
            client.probe(DEADLINE).await.expect("probe");
            probe.push(t.elapsed());
            let t = Instant::now();
            let answer = client.ping(auth.session_id, DEADLINE).await.expect("ping");
            ping.push(t.elapsed());
            assert_eq!(answer, PingAnswer::Ok);
        }
        let _ = stop_tx.send(());
        let _ = server.await;
        ping.sort();
        probe.sort();
        ControlTimes { ping, probe, cold_auth: cold[COLD_RUNS / 2] }
    })
}

/// The `p` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
