//! How long `client::start()` takes to return (issue 2: under 1 ms). It must only enable the
//! kill-switch, set the snapshot to None and spawn the supervisor: no authentication, no IO on
//! the control plane, no tunnel.
//!
//! Run: `cargo bench --bench start`. Provisions a gateway directory with the real binary, loads the
//! client file (outside the timed part: that is where start-up failures are reported), then times
//! `start()` repeatedly with the no-op kill-switch and stops each client again. No gateway listens
//! on the endpoint, so the supervisors it spawns only fail to connect on loopback.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::client::killswitch::LoggingNoopKillSwitch;
use holdfast::client::{self, ClientSettings};

const RUNS: usize = 300;
const BUDGET: Duration = Duration::from_millis(1);

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_holdfast");
    let gw = dir.path().join("gw");
    let file = dir.path().join("bench.toml");
    let run = |args: &[&str]| {
        let st = Command::new(bin).args(args).output().expect("run holdfast");
        assert!(st.status.success(), "{args:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    let gws = gw.to_str().expect("utf-8");
    run(&["gateway", "init", "--dir", gws, "--endpoint", "127.0.0.1:9"]);
    run(&["gateway", "add-client", "--dir", gws, "bench", "--out", file.to_str().expect("utf-8")]);

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut samples = Vec::with_capacity(RUNS);
    rt.block_on(async {
        for _ in 0..RUNS {
            let settings = ClientSettings::load(file.clone()).expect("client file loads");
            let t0 = Instant::now();
            let handle = client::start(settings, Arc::new(LoggingNoopKillSwitch), None).expect("start");
            samples.push(t0.elapsed());
            handle.stop().await.expect("stop");
        }
    });
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("start() over {RUNS} runs (no-op kill-switch):");
    println!("  median {:>8.1} us   ({:.3} of the 1 ms budget)", us(pct(0.5)), pct(0.5).as_secs_f64() / BUDGET.as_secs_f64());
    println!("  p99    {:>8.1} us   ({:.3} of the 1 ms budget)", us(pct(0.99)), pct(0.99).as_secs_f64() / BUDGET.as_secs_f64());
    println!("  max    {:>8.1} us", us(pct(1.0)));
}
