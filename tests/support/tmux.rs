//! A tmux pane as a test terminal: start a program in it, type with `send-keys`, read the screen
//! with `capture-pane`. A screen has no event to await, so waits poll it, bounded in time.

use std::process::Command;
use std::time::{Duration, Instant};

/// Whether tmux is installed.
pub fn available() -> bool {
    Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success())
}

pub struct Tmux {
    session: String,
}

impl Tmux {
    pub fn new(session: &str, command: &str) -> Tmux {
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

    pub fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    pub fn keys(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", &self.session, keys]);
    }

    /// Waits until the screen shows every one of `needles`; returns the screen.
    pub fn wait_for(&self, needles: &[&str], within: Duration) -> String {
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

    /// Waits until the screen no longer shows `needle`.
    pub fn wait_gone(&self, needle: &str, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let screen = self.screen();
            if !screen.contains(needle) {
                return;
            }
            assert!(Instant::now() < end, "screen still shows {needle:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pane's program exit status, once it has exited.
    pub fn exit_status(&self, within: Duration) -> i32 {
        let end = Instant::now() + within;
        loop {
            let out = self.tmux(&[
                "display-message",
                "-p",
                "-t",
                &self.session,
                "#{pane_dead} #{pane_dead_status}",
            ]);
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
