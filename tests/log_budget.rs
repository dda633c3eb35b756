//! The spec's logging rules, measured on the real client's log file: a long gateway outage writes
//! a handful of lines, traffic writes none, and every transition is one line with its cause.
//!
//! Ten minutes of real time is too long for CI, so every timing of the client is scaled down
//! 60x (health checks 250–500 ms instead of 15–30 s, backoff cap 5 s instead of 5 min, repeats
//! logged at most every 10 s instead of 10 min) and the outage lasts 10 s: the same number of
//! retries, backoff doublings and repeat windows as a 10-minute outage with the defaults.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(20);

/// Lines at info level or above in the client's log files.
fn visible_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("holdfast-client") && name.ends_with(".log") {
            let text = std::fs::read_to_string(entry.path()).expect("read log");
            lines.extend(text.lines().map(str::to_owned));
        }
    }
    lines
}

/// Waits (bounded) until a line containing `needle` is in the log files. The files have no
/// event to await, so this polls.
fn wait_for_file_line(dir: &Path, needle: &str) {
    let end = std::time::Instant::now() + T;
    while !visible_lines(dir).iter().any(|l| l.contains(needle)) {
        assert!(std::time::Instant::now() < end, "no `{needle}` in the log file");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_ten_minute_outage_scaled_60x_writes_at_most_a_dozen_lines_and_traffic_writes_none() {
    if !netns::available() {
        eprintln!("SKIPPED: needs root and ip");
        return;
    }
    let gw = GatewayDir::init_split();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("quiet", |f| {
        fast_timings(f, logs.path());
        let ms = |n| Some(Duration::from_millis(n));
        f.timing.health_min = ms(250);
        f.timing.health_max = ms(500);
        f.timing.rpc_deadline = ms(500);
        f.timing.backoff_initial = ms(100);
        f.timing.backoff_max = ms(5_000);
        f.timing.repeat_log_every = ms(10_000);
        // The default level, as an operator runs it.
        f.log.level = Some("info".into());
    });
    let mut gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);
    client.wait_for(&["-> Healthy"], T);

    // Traffic through the tunnel: 200 pings must not add a single line. (The file is written by
    // a background writer: first wait for the last start-up lines to land in it: the data
    // plane's announcement and the routes', which race each other.)
    wait_for_file_line(logs.path(), "data plane on session");
    wait_for_file_line(logs.path(), "routes up:");
    let before = visible_lines(logs.path()).len();
    let out = gw.clients_ns().exec("ping", &["-c", "200", "-i", "0.002", "-q", "100.64.0.1"]);
    assert!(out.status.success(), "ping through the tunnel: {}", String::from_utf8_lossy(&out.stdout));
    // Health checks keep running meanwhile; they log nothing either.
    let after = visible_lines(logs.path());
    assert_eq!(after.len(), before, "traffic or health checks wrote lines:\n{}", after[before..].join("\n"));

    // The outage: the gateway is gone for the scaled ten minutes. Lines are counted from before
    // the kill: the client may see the connection drop and log it before `kill` has returned.
    let outage_start = visible_lines(logs.path()).len();
    gateway.kill();
    std::thread::sleep(Duration::from_secs(10)); // the outage itself is the thing measured
    let during = visible_lines(logs.path());
    let outage_lines = &during[outage_start..];
    assert!(client.is_alive());
    assert!(
        outage_lines.len() <= 12,
        "{} lines during a (scaled) 10-minute outage:\n{}",
        outage_lines.len(),
        outage_lines.join("\n")
    );
    assert!(!outage_lines.is_empty(), "the outage must be logged once");
    eprintln!("{} lines during the scaled 10-minute outage:\n{}", outage_lines.len(), outage_lines.join("\n"));

    // Every transition line names its cause: `From -> To (Cause...)`.
    for line in during.iter().filter(|l| l.contains("holdfast::supervisor") && l.contains(" -> ")) {
        assert!(line.contains(" ("), "a transition without its cause: {line}");
    }

    let _gateway = gw.run("gateway-back");
    client.wait_for(&["-> Healthy"], T);
    assert_eq!(client.terminate(T), Some(0));
}
