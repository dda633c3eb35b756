//! The supervisor's part of "recovers within 2 s of the gateway's return, however long the
//! outage", on a virtual clock: the real machine in the resilience bench's modelled world
//! (`benches/resilience/sim.rs`), with fixed latencies. The real-process version of the same
//! measurement is the bench; this keeps the property under `cargo test`.

#[path = "../benches/resilience/sim.rs"]
mod sim;

use std::time::Duration;

use holdfast::sansio::supervisor::Timings;

const GOAL: Duration = Duration::from_secs(2);

fn model(nudges: bool) -> sim::Model {
    sim::Model {
        nudges,
        one_way: Duration::from_micros(120),
        rpc: Duration::from_micros(100),
        cold_rpc: Duration::from_millis(1),
        refused: Duration::from_micros(200),
        traffic_every: Duration::from_millis(10),
    }
}

#[test]
fn recovery_after_any_outage_is_within_two_seconds_with_default_timings() {
    for outage in [1, 30, 360, 3600, 86_400].map(Duration::from_secs) {
        for seed in 0..5 {
            let r = sim::recovery(&model(true), &Timings::default(), outage, seed);
            assert!(
                r.is_some_and(|r| r < GOAL),
                "outage {outage:?}, seed {seed}: first packet {r:?} after the gateway returned"
            );
        }
    }
}

#[test]
fn without_data_plane_nudges_a_long_outage_waits_for_the_backoff_timer() {
    // The control: no nudges, so only the retry timer notices the gateway's return. After six
    // minutes of doubling, that is far beyond the goal, which is what the nudge path saves.
    let slow = (0..5)
        .filter_map(|seed| sim::recovery(&model(false), &Timings::default(), Duration::from_secs(360), seed))
        .max()
        .expect("recovers eventually");
    assert!(slow > GOAL * 5, "timer-only recovery took {slow:?}");
}
