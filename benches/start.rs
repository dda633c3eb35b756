//! How long `client::start()` takes to return (issue 2: under 1 ms). It must only enable the
//! kill-switch, set the snapshot to None and spawn the supervisor: no authentication, no IO on
//! the control plane, no tunnel.
//!
//! Run: `cargo bench --bench start` (also a row of `cargo bench --bench resilience`).

mod common;

use std::time::Duration;

use common::{quantile, us};

const RUNS: usize = 300;
const BUDGET: Duration = Duration::from_millis(1);

fn main() {
    let samples = common::start_times(RUNS);
    let of_budget = |d: Duration| d.as_secs_f64() / BUDGET.as_secs_f64();
    println!("start() over {RUNS} runs (no-op kill-switch):");
    for (name, p) in [("median", 0.5), ("p99", 0.99)] {
        let d = quantile(&samples, p);
        println!("  {name:<6} {:>8.1} us   ({:.3} of the 1 ms budget)", us(d), of_budget(d));
    }
    println!("  max    {:>8.1} us", us(quantile(&samples, 1.0)));
}
