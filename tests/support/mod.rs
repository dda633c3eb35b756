//! Test support: real `holdfast` processes whose log lines are awaited as events, temp dirs with a
//! provisioned gateway, and free loopback ports. Everything started here is killed on drop, also
//! when a test panics.
#![allow(dead_code)]

pub mod alloc;
pub mod netns;
pub mod pg;
pub mod tmux;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use holdfast::config::client::{ClientFile, LogSection, TimingSection};

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// The client-only binary: `holdfast-client run|unblock|status`.
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_holdfast-client");

/// Runs `holdfast <args>` to completion.
pub fn holdfast(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run holdfast")
}

/// Runs `holdfast-client <args>` to completion.
pub fn holdfast_client(args: &[&str]) -> Output {
    Command::new(CLIENT_BIN).args(args).output().expect("run holdfast-client")
}

/// Runs `holdfast <args>` and asserts success.
pub fn holdfast_ok(args: &[&str]) -> String {
    let out = holdfast(args);
    assert!(
        out.status.success(),
        "holdfast {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running process whose stderr (and stdout) lines are collected and can be awaited.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let streams: Vec<Box<dyn std::io::Read + Send>> =
            vec![Box::new(child.stderr.take().expect("stderr")), Box::new(child.stdout.take().expect("stdout"))];
        for stream in streams {
            let tx = tx.clone();
            let seen = seen.clone();
            let tag = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("HOLDFAST_TEST_ECHO").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    seen.lock().expect("lock").push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Proc { name: name.to_owned(), child, lines: rx, seen }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the next line containing every one of `needles`; returns it. Lines that
    /// do not match are skipped (they stay in `all_lines`).
    pub fn wait_for(&mut self, needles: &[&str], within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    let alive = self.is_alive();
                    panic!(
                        "{}: no line with {needles:?} within {within:?}; alive={alive}; output:\n{}",
                        self.name,
                        self.all_lines().join("\n")
                    )
                }
            }
        }
    }

    /// Waits (bounded) until each of `needles` was in some line from now on, in any order (two
    /// tasks logging independently may log in either order). Returns the matching lines in
    /// the order of `needles`.
    pub fn wait_for_each(&mut self, needles: &[&str], within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        while found.iter().any(Option::is_none) {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    for (n, f) in needles.iter().zip(found.iter_mut()) {
                        if f.is_none() && line.contains(n) {
                            *f = Some(line.clone());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    let alive = self.is_alive();
                    let missing: Vec<&str> =
                        needles.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(n, _)| *n).collect();
                    panic!(
                        "{}: no line with {missing:?} within {within:?}; alive={alive}; output:\n{}",
                        self.name,
                        self.all_lines().join("\n")
                    )
                }
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Every line seen so far.
    pub fn all_lines(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
        assert!(st.map(|s| s.success()).unwrap_or(false), "kill -{sig} {}", self.pid());
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns the exit code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.signal("TERM");
        self.wait_exit(within)
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not exit within {within:?}", self.name);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A provisioned gateway directory and a network namespace of its own: the gateway and its
/// clients run inside that namespace, on its loopback, so the client's TUN device, routes and
/// kill-switch never touch the machine's own namespace. With [`GatewayDir::init_split`] the
/// clients get a namespace of their own instead, joined to the gateway's by a veth pair, so their
/// traffic really crosses the tunnel. Everything is removed on drop.
pub struct GatewayDir {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The gateway's namespace.
    pub ns: netns::Netns,
    /// The clients' namespace, when split from the gateway's.
    pub client_ns: Option<netns::Netns>,
}

impl GatewayDir {
    /// Gateway and clients in one namespace, on its loopback.
    pub fn init() -> GatewayDir {
        Self::provision("127.0.0.1", netns::Netns::new(), None)
    }

    /// Gateway at 198.18.0.2 in its namespace, clients at 198.18.0.1 in theirs.
    pub fn init_split() -> GatewayDir {
        let (gw, client) = (netns::Netns::new(), netns::Netns::new());
        let ips = (std::net::Ipv4Addr::new(198, 18, 0, 1), std::net::Ipv4Addr::new(198, 18, 0, 2));
        netns::link(&client, "hfc", ips.0, &gw, "hfg", ips.1, 30);
        Self::provision("198.18.0.2", gw, Some(client))
    }

    fn provision(addr: &str, ns: netns::Netns, client_ns: Option<netns::Netns>) -> GatewayDir {
        let dir = tempfile::tempdir().expect("tempdir");
        // The namespaces are new and empty: any port is free in them.
        let port = 51820;
        let endpoint = format!("{addr}:{port}");
        holdfast_ok(&["gateway", "init", "--dir", s(dir.path()), "--endpoint", &endpoint]);
        GatewayDir { dir, port, ns, client_ns }
    }

    /// Where the clients run.
    pub fn clients_ns(&self) -> &netns::Netns {
        self.client_ns.as_ref().unwrap_or(&self.ns)
    }

    /// One iperf3 run of `secs` seconds from the clients' namespace through the tunnel to a
    /// one-off server on the gateway's tunnel address (`reverse`: gateway to client), with the
    /// client's `extra` arguments; its JSON report. A server of its own per run: a shared one
    /// may still hold the previous test (busy for minutes when that test's client vanished).
    pub fn iperf_json(&self, reverse: bool, secs: u32, extra: &[&str]) -> serde_json::Value {
        const GW_TUN: &str = "100.64.0.1";
        let mut server = self.ns.spawn("iperf3-server", "iperf3", &["-s", "-1", "--forceflush", "-B", GW_TUN], &[]);
        server.wait_for(&["Server listening"], Duration::from_secs(10));
        let secs = secs.to_string();
        let mut args = vec!["-c", GW_TUN, "-t", &secs, "-J", "--connect-timeout", "5000"];
        args.extend_from_slice(extra);
        if reverse {
            args.push("-R");
        }
        let out = self.clients_ns().exec("iperf3", &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "iperf3 {args:?} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("iperf3 JSON ({e}): {text}"))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("gateway.toml")
    }

    /// Sets a top-level `key = value` in gateway.toml, replacing the key's line if present.
    pub fn set(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(self.config()).expect("read gateway.toml");
        let line = format!("{key} = {value}");
        let mut replaced = false;
        let mut out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.split('=').next().map(str::trim) == Some(key) {
                    replaced = true;
                    line.clone()
                } else {
                    l.to_owned()
                }
            })
            .collect();
        if !replaced {
            let at = out.iter().position(|l| l.starts_with('[')).unwrap_or(out.len());
            out.insert(at, line);
        }
        std::fs::write(self.config(), out.join("\n") + "\n").expect("write gateway.toml");
    }

    /// Registers a client and returns the path of its client file, after `edit` changed it (timing
    /// overrides, log settings).
    pub fn add_client(&self, name: &str, edit: impl FnOnce(&mut ClientFile)) -> PathBuf {
        let out = self.path().join(format!("{name}.toml"));
        holdfast_ok(&["gateway", "add-client", "--dir", s(self.path()), name, "--out", s(&out)]);
        let on_loopback = self.client_ns.is_none();
        edit_client_file(&out, |f| {
            // A gateway on loopback is refused by the kill-switch on purpose (it would block
            // everything but loopback); these tests are about the control plane, and the
            // kill-switch has tests of its own in split namespaces.
            if on_loopback {
                f.network.killswitch = Some(false);
            }
            edit(f)
        });
        out
    }

    /// Runs the gateway inside this namespace.
    pub fn run(&self, tag: &str) -> Proc {
        let mut cmd = self.ns.command(BIN);
        cmd.args(["gateway", "run", "--dir", s(self.path())]).env("RUST_LOG", "info,holdfast=debug");
        Proc::spawn(tag, cmd)
    }

    /// Runs a client inside the clients' namespace, headless.
    pub fn run_client(&self, tag: &str, file: &Path) -> Proc {
        let mut cmd = self.clients_ns().command(BIN);
        cmd.args(["client", "run", "--no-tui", "--config", s(file)]).env_remove("RUST_LOG");
        Proc::spawn(tag, cmd)
    }

    /// Runs `f` on a thread inside this namespace (e.g. to connect to the gateway).
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.ns.enter_current_thread();
                    f()
                })
                .join()
                .expect("thread inside the namespace")
        })
    }
}

/// Rewrites a client file through its parser.
pub fn edit_client_file(path: &Path, edit: impl FnOnce(&mut ClientFile)) {
    let mut file = ClientFile::load(path).expect("client file parses");
    edit(&mut file);
    std::fs::write(path, toml::to_string(&file).expect("serialise")).expect("write client file");
}

/// Timings short enough for tests, with the log folder `log_dir`.
pub fn fast_timings(file: &mut ClientFile, log_dir: &Path) {
    let ms = |n| Some(Duration::from_millis(n));
    file.timing = TimingSection {
        health_min: ms(500),
        health_max: ms(1000),
        rpc_deadline: ms(1000),
        backoff_initial: ms(200),
        backoff_max: ms(1000),
        repeat_log_every: None,
        nudge_min_interval: ms(100),
    };
    file.log =
        LogSection { dir: Some(log_dir.to_owned()), level: Some("info,holdfast=debug".into()), keep_files: None };
    // Tests run clients in parallel: each gets its own status socket.
    file.status.socket = Some(log_dir.join("client.sock"));
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Polls `cond` (every 10 ms) until it holds or `within` passes; returns whether it held. For
/// conditions with no event to await (a counter, a device appearing).
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wall-clock time as Unix seconds (what `ping -D` stamps its replies with).
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// A `ping -D` running in a namespace for as long as it is needed; restarted if it ever exits (it
/// should not, but a dead pinger must not read as a dead tunnel).
pub struct Pinger {
    tag: String,
    target: std::net::Ipv4Addr,
    interval: &'static str,
    runs: Vec<Proc>,
}

impl Pinger {
    /// Pings `target` every `interval` seconds (ping's `-i`; below 0.2 needs root).
    pub fn start(ns: &netns::Netns, tag: &str, target: std::net::Ipv4Addr, interval: &'static str) -> Pinger {
        let mut p = Pinger { tag: tag.to_owned(), target, interval, runs: Vec::new() };
        p.spawn(ns);
        p
    }

    fn spawn(&mut self, ns: &netns::Netns) {
        let args = ["-D", "-n", "-i", self.interval, "-W", "1", &self.target.to_string()];
        self.runs.push(ns.spawn(&self.tag, "ping", &args, &[]));
    }

    pub fn keep_alive(&mut self, ns: &netns::Netns) {
        if !self.runs.last_mut().is_some_and(Proc::is_alive) {
            self.spawn(ns);
        }
    }

    /// Unix times of every reply so far.
    pub fn replies(&self) -> Vec<f64> {
        self.runs
            .iter()
            .flat_map(|p| p.all_lines())
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect()
    }

    /// Waits (bounded) for the first reply stamped after `since`; returns how long after.
    pub fn first_reply_after(&mut self, ns: &netns::Netns, since: f64, within: Duration) -> Option<Duration> {
        let end = Instant::now() + within;
        loop {
            self.keep_alive(ns);
            if let Some(t) = self.replies().into_iter().find(|&t| t > since) {
                return Some(Duration::from_secs_f64(t - since));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Asks the client whose status socket is `socket` (`holdfast status --json`), asserting it
/// answers.
pub fn status_of(socket: &Path) -> holdfast::client::status_socket::StatusReport {
    let out =
        Command::new(BIN).args(["status", "--json", "--socket", s(socket)]).output().expect("run holdfast status");
    assert!(out.status.success(), "holdfast status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json parses")
}

/// Waits up to `within` for `fd` (a non-blocking socket or TUN device, as the engines use them) to
/// have something to read; whether it has.
pub fn readable(fd: &impl std::os::fd::AsRawFd, within: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(within.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, alive for the call.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}
