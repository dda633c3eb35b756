//! Control-plane cost: `PingSession` round trip against the empty `Probe` call on the same
//! mutual-TLS connection, as a ratio. The ratio is what the health check adds over the transport
//! itself (a registry lookup, by design). Both run against the real gateway service in-process on
//! loopback, interleaved so that machine noise hits both alike.
//!
//! Run: `cargo bench --bench control`.

use std::process::Command;
use std::time::{Duration, Instant};

use holdfast::client::ClientSettings;
use holdfast::client::control::{ControlPlane as ClientControl, PingAnswer};
use holdfast::config::gateway::GatewayConfig;
use holdfast::gateway::ControlPlane as Gateway;

const ROUNDS: usize = 3000;
const DEADLINE: Duration = Duration::from_secs(5);

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_holdfast");
    let gw = dir.path().join("gw");
    let file = dir.path().join("bench.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let run = |args: &[&str]| {
        let st = Command::new(bin).args(args).output().expect("run holdfast");
        assert!(st.status.success(), "{args:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    let gws = gw.to_str().expect("utf-8");
    run(&["gateway", "init", "--dir", gws, "--endpoint", &format!("127.0.0.1:{port}")]);
    run(&["gateway", "add-client", "--dir", gws, "bench", "--out", file.to_str().expect("utf-8")]);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let config = GatewayConfig::load_dir(&gw).expect("gateway config");
        let gateway = Gateway::bind(&config).expect("bind");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(gateway.serve(async move {
            let _ = stop_rx.await;
        }));

        let settings = ClientSettings::load(file.clone()).expect("client file");
        let client = ClientControl::new(&settings.file, &settings.creds).expect("channel");
        let auth = client.authenticate(DEADLINE).await.expect("authenticate");
        // Warm-up: connection, TLS session, HTTP/2 windows, allocator.
        for _ in 0..200 {
            client.probe(DEADLINE).await.expect("probe");
            client.ping(auth.session_id, DEADLINE).await.expect("ping");
        }
        let (mut ping, mut probe) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
        for _ in 0..ROUNDS {
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

        let med = |v: &mut Vec<Duration>| {
            v.sort();
            (v[v.len() / 2], v[v.len() * 99 / 100])
        };
        let ((pm, p99), (em, e99)) = (med(&mut ping), med(&mut probe));
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!("control plane over {ROUNDS} interleaved rounds, one mutual-TLS 1.3 connection on loopback:");
        println!("  PingSession  median {:>7.1} us   p99 {:>7.1} us", us(pm), us(p99));
        println!("  Probe (empty) median {:>6.1} us   p99 {:>7.1} us", us(em), us(e99));
        println!("  PingSession / Probe  {:.3} (median)", pm.as_secs_f64() / em.as_secs_f64());
    });
}
