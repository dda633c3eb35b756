//! Control-plane cost: `PingSession` round trip against the empty `Probe` call on the same
//! mutual-TLS connection, as a ratio. The ratio is what the health check adds over the transport
//! itself (a registry lookup, by design). Both run against the real gateway service in-process on
//! loopback, interleaved so that machine noise hits both alike.
//!
//! Run: `cargo bench --bench control` (also a row of `cargo bench --bench resilience`).

mod common;

use common::{quantile, us};

const ROUNDS: usize = 3000;

fn main() {
    let common::ControlTimes { ping, probe, cold_auth } = common::control_rtts(ROUNDS);
    println!("control plane over {ROUNDS} interleaved rounds, one mutual-TLS 1.3 connection on loopback:");
    for (name, v) in [("PingSession  ", &ping), ("Probe (empty)", &probe)] {
        println!("  {name} median {:>7.1} us   p99 {:>7.1} us", us(quantile(v, 0.5)), us(quantile(v, 0.99)));
    }
    println!("  cold Authenticate (connect + TLS 1.3 + call) median {:.1} us", us(cold_auth));
    println!(
        "  PingSession / Probe  {:.3} (median)",
        quantile(&ping, 0.5).as_secs_f64() / quantile(&probe, 0.5).as_secs_f64()
    );
}
