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
    /// Starts `command` in a new detached session. The command runs under `sh`, which prints
    /// its exit code when it ends (tmux does not always record a pane's exit status), and then
    /// keeps the pane open.
    pub fn new(session: &str, command: &str) -> Tmux {
        let wrapped = format!("sh -c '{command}; echo {EXIT_MARK}$?; sleep 600'");
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", session, "-x", "110", "-y", "36", &wrapped])
            .status()
            .expect("tmux");
        assert!(st.success(), "tmux new-session");
        Tmux { session: session.to_owned() }
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

    /// The program's exit code, once it has exited (read from the line its shell prints).
    pub fn exit_status(&self, within: Duration) -> i32 {
        let screen = self.wait_for(&[EXIT_MARK], within);
        screen
            .lines()
            .find_map(|l| l.trim().strip_prefix(EXIT_MARK))
            .and_then(|code| code.trim().parse().ok())
            .unwrap_or_else(|| panic!("no exit code on screen:\n{screen}"))
    }

    /// The pid of the program (the child of the pane's shell).
    pub fn program_pid(&self, within: Duration) -> String {
        let shell = self.tmux(&["display-message", "-p", "-t", &self.session, "#{pane_pid}"]);
        let end = Instant::now() + within;
        loop {
            let out = Command::new("pgrep").args(["-P", shell.trim()]).output().expect("pgrep");
            let pid = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_owned();
            if !pid.is_empty() {
                return pid;
            }
            assert!(Instant::now() < end, "the program did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What the wrapping shell prints before the program's exit code.
const EXIT_MARK: &str = "program-exit=";

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).status();
    }
}
