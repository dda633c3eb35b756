//! The dashboard as a person sees it: the real `holdfast client run` in a tmux pane (a real
//! terminal), against a real gateway, both inside a namespace of the test's own. Keys are typed
//! with `send-keys`; the screen is read with `capture-pane`. A screen has no event to await, so
//! the test polls it, bounded in time.

mod support;

use std::time::Duration;

use support::tmux::Tmux;
use support::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_person_sees_the_client_connect_forces_a_reauth_and_quits_with_q() {
    if !netns::available() || !support::tmux::available() {
        eprintln!("SKIPPED: needs root, ip and tmux");
        return;
    }
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("dash", |f| fast_timings(f, logs.path()));
    let _gateway = gw.run("gateway");
    let session = format!("hf-tui-{}", std::process::id());
    let cmd = format!("ip netns exec {} {BIN} client run --config {}", gw.ns.name(), s(&file));
    let tmux = Tmux::new(&session, &cmd);

    // Connected: the state, the assigned address and the key's fingerprint, never a log line.
    let screen = tmux.wait_for(&["Healthy", "100.64.0.2"], T);
    assert!(screen.contains("fp") || screen.to_lowercase().contains("fingerprint"), "{screen}");
    assert!(!screen.contains(" INFO "), "logs must not be drawn over the dashboard:\n{screen}");

    // Help, then back.
    tmux.keys("?");
    tmux.wait_for(&["re-auth"], T);
    tmux.keys("Escape");

    // A forced re-authentication shows up as a transition with its cause, and comes back Healthy.
    tmux.keys("r");
    tmux.wait_for(&["ReauthRequested"], T);
    tmux.wait_for(&["Healthy"], T);

    // q is an explicit stop: exit 0, and the terminal is given back.
    tmux.keys("q");
    assert_eq!(tmux.exit_status(T), 0, "q exits 0:\n{}", tmux.screen());
}
