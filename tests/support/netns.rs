//! Network namespaces for end-to-end tests: uniquely named namespaces, veth links between them,
//! commands and long-running processes inside them, nftables rules in them, and cleanup of all of
//! it in `Drop` (also when a test panics).
//!
//! The machine's own (initial) namespace is never changed: every `ip`, `nft` and `sysctl` here runs
//! with `-n NAME` or under `ip netns exec NAME`, and veth pairs are created inside a test namespace
//! with their peer moved straight into another one. Addresses come from 198.18.0.0/15 (the
//! benchmarking range, RFC 2544) for the underlay; tunnels use 100.64.0.0/10.
//!
//! Namespace names are `hf<pid>x<n>`: short, unique per test process, and recognisable, so
//! [`Netns::new`] can sweep namespaces left behind by a test process that was SIGKILLed (whose
//! `Drop` never ran).
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::Proc;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether this process can create namespaces (root, with `ip` available). E2E tests call this
/// first and skip, loudly, when it is false (a developer's unprivileged `cargo test`).
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip").arg("-V").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Runs a command to completion and returns its output; panics if it cannot be started.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"))
}

/// Runs a command and panics with its output if it fails.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One network namespace, deleted (with everything in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up.
    pub fn new() -> Netns {
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("hf{}x{n}", std::process::id());
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // A resolv.conf of its own, which `ip netns exec` mounts over /etc/resolv.conf: a client
        // in here that sets its resolvers (the default, when a gateway pushes them) rewrites this
        // file, never the machine's. No nameserver, so a gateway in here runs no resolver unless
        // a test says otherwise (see `set_resolv_conf`).
        ns.set_resolv_conf("# holdfast test namespace: no resolver\n");
        ns
    }

    /// The namespace's own `/etc/resolv.conf` (`/etc/netns/NAME/resolv.conf`, removed with it).
    pub fn resolv_conf_path(&self) -> std::path::PathBuf {
        std::path::Path::new("/etc/netns").join(&self.name).join("resolv.conf")
    }

    /// Replaces the namespace's `/etc/resolv.conf` (seen by processes started after this).
    pub fn set_resolv_conf(&self, text: &str) {
        let path = self.resolv_conf_path();
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create /etc/netns/NAME");
        std::fs::write(&path, text).expect("write /etc/netns/NAME/resolv.conf");
    }

    /// The namespace's `/etc/resolv.conf` as it is now.
    pub fn resolv_conf(&self) -> String {
        std::fs::read_to_string(self.resolv_conf_path()).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME <args>`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Like [`Netns::exec`], asserting success; returns stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} in {} failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process inside the namespace. It is killed when the returned `Proc`
    /// drops, and in any case when this namespace drops.
    pub fn spawn(&self, tag: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(tag, cmd)
    }

    /// Applies an nftables script inside the namespace (`nft -f -`).
    pub fn nft(&self, script: &str) {
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nft in {}: {e}", self.name));
        child.stdin.take().expect("piped stdin").write_all(script.as_bytes()).expect("write nft script");
        let out = child.wait_with_output().expect("wait nft");
        assert!(
            out.status.success(),
            "nft in {} failed: {}\nscript:\n{script}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The namespace's whole nftables ruleset.
    pub fn nft_ruleset(&self) -> String {
        self.exec_ok("nft", &["list", "ruleset"])
    }

    /// Sets a sysctl of this namespace (only `net.*` keys are per namespace; others would leak to
    /// the host, so they are refused).
    pub fn sysctl(&self, key: &str, value: &str) {
        assert!(key.starts_with("net."), "sysctl {key} is not namespaced; refusing");
        self.exec_ok("sysctl", &["-q", "-w", &format!("{key}={value}")]);
    }

    /// Adds a default route via `gw` (inside this namespace only).
    pub fn default_route(&self, gw: Ipv4Addr) {
        self.ip(&["route", "add", "default", "via", &gw.to_string()]);
    }

    /// Adds `addr/prefix` to `ifname` without duplicate address detection (`nodad`), so it is
    /// usable at once instead of after a second of DAD. Only the test ranges: 2001:db8::/32
    /// (underlay) and fd00::/8 (tunnel).
    pub fn add_addr6(&self, ifname: &str, addr: Ipv6Addr, prefix: u8) {
        let seg = addr.segments();
        assert!(
            (seg[0], seg[1]) == (0x2001, 0x0db8) || seg[0] >> 8 == 0xfd,
            "IPv6 test addresses must be in 2001:db8::/32 or fd00::/8, got {addr}"
        );
        self.ip(&["-6", "addr", "add", &format!("{addr}/{prefix}"), "dev", ifname, "nodad"]);
    }

    /// The first global address of `family` (`"-4"` or `"-6"`) on `ifname`, if it has one.
    pub fn global_addr(&self, ifname: &str, family: &str) -> Option<IpAddr> {
        let out = self.ip(&["-o", family, "addr", "show", "dev", ifname, "scope", "global"]);
        let word = if family == "-6" { "inet6" } else { "inet" };
        out.split_whitespace()
            .skip_while(|w| *w != word)
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
    }

    /// The interface index of `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Option<u32> {
        let out = run("ip", &["-n", &self.name, "-o", "link", "show", "dev", ifname]);
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).split(':').next()?.trim().parse().ok()
    }

    /// The names of this namespace's interfaces whose kind is `tun`.
    pub fn tun_devices(&self) -> Vec<(u32, String)> {
        let out = self.ip(&["-o", "-d", "link", "show"]);
        out.lines()
            .filter(|l| l.contains(" tun "))
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let idx = parts.next()?.trim().parse().ok()?;
                let name = parts.next()?.trim().split('@').next()?.to_owned();
                Some((idx, name))
            })
            .collect()
    }

    /// Pings `addr` from this namespace until one reply arrives or `within` passes; returns the
    /// time to the first reply. Each attempt is one ping with a short wait, so a lost reply costs
    /// little.
    pub fn ping_until(&self, addr: impl Into<IpAddr>, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        // iputils' ping picks ICMPv6 for an IPv6 address by itself.
        let target = addr.into().to_string();
        while start.elapsed() < within {
            let out = self.exec("ping", &["-c", "1", "-n", "-q", "-W", "0.3", "-s", "56", &target]);
            if out.status.success() {
                return Some(start.elapsed());
            }
        }
        None
    }

    /// Sends `count` pings (0.05 s apart) and returns how many were answered.
    pub fn ping_count(&self, addr: impl Into<IpAddr>, count: u32) -> u32 {
        let out = self
            .exec("ping", &["-c", &count.to_string(), "-i", "0.05", "-W", "1", "-n", "-q", &addr.into().to_string()]);
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, ..."
        text.lines()
            .find(|l| l.contains("packets transmitted"))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Moves the calling thread (only it) into this namespace. For in-process tests: sockets and
    /// TUN devices the thread creates afterwards live in the namespace. Use a dedicated thread
    /// (with its own current-thread runtime) and never return it to a pool.
    pub fn enter_current_thread(&self) {
        let f = File::open(format!("/run/netns/{}", self.name)).expect("open netns handle");
        // SAFETY: setns on a valid namespace fd; it affects only the calling thread's network
        // namespace, which this thread owns for the rest of its life.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}: {}", self.name, std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Kills every process still inside namespace `name`, then deletes it (which deletes its
/// interfaces, their routes and its nftables rules).
fn delete(name: &str) {
    // A namespace lives on while a process is in it, so the processes go first.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions; `pid` came from the kernel's
                // list of processes in this test's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
    let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(name));
    // Only when nothing else is in it (another test's namespace, the machine's own).
    let _ = std::fs::remove_dir("/etc/netns");
}

/// Deletes `hf<pid>x<n>` namespaces (and their `/etc/netns` folders) whose test process is gone.
fn sweep_stale() {
    let run = std::fs::read_dir("/run/netns").into_iter().flatten();
    let etc = std::fs::read_dir("/etc/netns").into_iter().flatten();
    for e in run.chain(etc).flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("hf").and_then(|r| r.split('x').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete(&name);
        }
    }
}

/// A veth pair between two namespaces, addressed in a /30 (or any prefix) of 198.18.0.0/15.
/// Deleted with either namespace; nothing to do on drop.
pub struct Veth {
    pub a_if: String,
    pub b_if: String,
    pub a_ip: Ipv4Addr,
    pub b_ip: Ipv4Addr,
}

/// Links `a` and `b` with a veth pair: `a_ip/prefix` on `a`'s end (named `a_if`), `b_ip/prefix` on
/// `b`'s (named `b_if`), both up. Interface names are per namespace, so short fixed names are
/// fine (at most 15 bytes).
pub fn link(a: &Netns, a_if: &str, a_ip: Ipv4Addr, b: &Netns, b_if: &str, b_ip: Ipv4Addr, prefix: u8) -> Veth {
    assert!(a_if.len() <= 15 && b_if.len() <= 15, "interface names are at most 15 bytes");
    for ip in [a_ip, b_ip] {
        assert!(
            ipnet_contains(Ipv4Addr::new(198, 18, 0, 0), 15, ip),
            "underlay addresses must be in 198.18.0.0/15, got {ip}"
        );
    }
    // Created inside `a` with the peer put straight into `b`: neither end ever exists in the
    // machine's own namespace.
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()]);
    a.ip(&["addr", "add", &format!("{a_ip}/{prefix}"), "dev", a_if]);
    b.ip(&["addr", "add", &format!("{b_ip}/{prefix}"), "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
    Veth { a_if: a_if.into(), b_if: b_if.into(), a_ip, b_ip }
}

fn ipnet_contains(net: Ipv4Addr, prefix: u8, ip: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(net) & mask == u32::from(ip) & mask
}
