//! The dashboard as a person sees it: the real `holdfast client run` in a tmux pane (a real
//! terminal), against a real gateway, both inside a namespace of the test's own. Keys are typed
//! with `send-keys`; the screen is read with `capture-pane`. A screen has no event to await, so
//! the test polls it, bounded in time.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(20);

struct Tmux {
    session: String,
}

impl Tmux {
    fn new(session: &str, command: &str) -> Tmux {
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", session, "-x", "110", "-y", "36", command])
            .status()
            .expect("tmux");
        assert!(st.success(), "tmux new-session");
        let t = Tmux { session: session.to_owned() };
        // Keep the pane after the program exits, so its exit status can be read.
        t.tmux(&["set-option", "-t", session, "remain-on-exit", "on"]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    fn keys(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", &self.session, keys]);
    }

    /// Waits until the screen shows every one of `needles`; returns the screen.
    fn wait_for(&self, needles: &[&str], within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let screen = self.screen();
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            assert!(Instant::now() < end, "screen never showed {needles:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pane's program exit status, once it has exited.
    fn exit_status(&self, within: Duration) -> i32 {
        let end = Instant::now() + within;
        loop {
            let out = self.tmux(&["display-message", "-p", "-t", &self.session, "#{pane_dead} #{pane_dead_status}"]);
            let mut words = out.split_whitespace();
            if words.next() == Some("1") {
                return words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
            }
            assert!(Instant::now() < end, "the client did not exit:\n{}", self.screen());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).status();
    }
}

#[test]
fn a_person_sees_the_client_connect_forces_a_reauth_and_quits_with_q() {
    if !netns::available() || Command::new("tmux").arg("-V").output().is_err() {
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
