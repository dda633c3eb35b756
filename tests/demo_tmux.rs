//! `holdfast demo` as a person runs it: in a tmux pane, as root. The demo builds its own
//! namespaces; the test watches the dashboard come up Healthy with traffic moving, presses each
//! fault key and watches the client recover, then quits with `q` and checks that everything the
//! demo created is gone.

mod support;

use std::process::Command;
use std::time::Duration;

use support::tmux::Tmux;
use support::*;

const T: Duration = Duration::from_secs(30);

fn demo_namespaces(pid_hint: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("hfdemo") && n.contains(pid_hint))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_recovers_from_every_fault_key_and_cleans_up() {
    if !netns::available() || !support::tmux::available() {
        eprintln!("SKIPPED: needs root, ip and tmux");
        return;
    }
    let session = format!("hf-demo-{}", std::process::id());
    let tmux = Tmux::new(&session, &format!("{BIN} demo"));
    let pid = tmux.program_pid(T);

    tmux.wait_for(&["Healthy", "100.64.0.2", "gateway kill/start"], T);
    // The steady ping moves the counters.
    tmux.wait_for(&["pkt"], T);
    assert_eq!(demo_namespaces(&pid).len(), 2, "a gateway and a client namespace");

    // Kill the gateway: Degraded. Start it again: the new gateway knows no session, the client
    // re-authenticates by itself.
    tmux.keys("k");
    tmux.wait_for(&["Degraded in"], T);
    tmux.keys("k");
    tmux.wait_for(&["Degraded -> Authing", "SessionExpired"], T);
    tmux.wait_for(&["Healthy in"], T);

    // Expire every session on the gateway: SessionExpired from Healthy.
    tmux.keys("e");
    tmux.wait_for(&["Healthy  -> Authing   SessionExpired"], T);
    tmux.wait_for(&["Healthy in"], T);

    // Blackhole the control port: health checks fail, Degraded; lift it: Healthy.
    tmux.keys("c");
    tmux.wait_for(&["Degraded in"], T);
    tmux.keys("c");
    tmux.wait_for(&["Degraded -> Healthy"], T);

    // q: explicit stop, exit 0, and everything the demo made is gone.
    tmux.keys("q");
    assert_eq!(tmux.exit_status(T), 0, "{}", tmux.screen());
    assert!(demo_namespaces(&pid).is_empty(), "namespaces left: {:?}", demo_namespaces(&pid));
}
