//! `holdfast demo`: a gateway and a client on this machine, each in a network namespace of its
//! own joined by a veth pair, with the client's dashboard, a steady ping through the tunnel, and
//! keys that inject faults so a person can watch the statechart recover.
//!
//! Topology (198.18.0.0/15 underlay, 100.64.0.0/24 tunnel):
//!
//! ```text
//!  [client ns]  holdfast0 100.64.0.2 --tunnel--> 100.64.0.1 holdfast0  [gateway ns]
//!               veth 198.18.0.1/30 <------------------> veth 198.18.0.2/30 (:51820 tcp+udp)
//! ```
//!
//! The machine's own namespace is never changed: the namespaces, the veth pair and everything in
//! them are removed on exit (SIGINT, SIGTERM, SIGHUP — its terminal closed —, `q`, or an error). This process moves its own
//! network namespace into the client's before it starts any thread, so the client it runs — the
//! same code as `holdfast client run` — lives there entirely.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::ClientSettings;
use crate::client::app::{self, RunOptions};
use crate::config::client::{ClientFile, LogSection, StatusSection, TimingSection};
use crate::config::exit;
use crate::gateway::cli::{AddClientArgs, InitArgs};
use crate::logging::{self, LogSettings};
use crate::tui::ExtraKey;

const PORT: u16 = 51820;
const CLIENT_UNDERLAY: &str = "198.18.0.1";
const GATEWAY_UNDERLAY: &str = "198.18.0.2";
const GATEWAY_TUNNEL: &str = "100.64.0.1";
/// Prefix of every namespace and link the demo creates (plus the pid), so a demo that was
/// SIGKILLed can be swept by the next one.
const PREFIX: &str = "hfdemo";

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo needs root (it creates network namespaces); run it with sudo")]
    NotRoot,
    #[error("`{0}` is missing; install it (e.g. apt-get install iproute2 nftables iputils-ping)")]
    MissingTool(&'static str),
    #[error("{what} failed: {detail}")]
    Setup { what: String, detail: String },
}

impl DemoError {
    pub fn exit_code(&self) -> i32 {
        match self {
            DemoError::NotRoot => exit::NOT_PERMITTED,
            DemoError::MissingTool(_) | DemoError::Setup { .. } => exit::FAILURE,
        }
    }
}

/// Runs the demo until the user quits. Must be called before any tokio runtime or other thread
/// exists (it moves the process into the client's namespace).
pub fn run() -> Result<i32, DemoError> {
    if !crate::config::running_as_root() {
        return Err(DemoError::NotRoot);
    }
    for tool in ["ip", "nft", "ping"] {
        if Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err(DemoError::MissingTool(tool));
        }
    }
    // A hangup (the terminal closed) before the client's handler is in place must not kill us
    // with namespaces half made: ignored until then (the dashboard then sees its terminal gone,
    // which stops the demo the same way).
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    sweep_stale();
    let lab = Lab::create()?;
    let settings = lab.provision()?;
    let gateway = Arc::new(Mutex::new(Some(lab.start_gateway()?)));
    // Stops the gateway however this function ends (a panic included), before the lab goes.
    let _stop_gateway = StopGateway(gateway.clone());

    // From here on this process lives in the client's namespace; the gateway, already started,
    // stays in its own. Every thread and child created later inherits the client's namespace.
    lab.enter_client_ns()?;
    let dashboard = crate::tui::should_use_dashboard(false);
    let _log = logging::init(&LogSettings {
        dir: Some(lab.dir.join("logs")),
        prefix: "holdfast-demo",
        filter: "info".into(),
        keep_files: 1,
        stderr: !dashboard,
    });
    let _pinger = Pinger::start();

    let extra_keys = fault_keys(&lab, gateway.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| setup("starting the async runtime", e))?;
    let killswitch = crate::client::killswitch::for_client(&settings.file)
        .map_err(|e| setup("the kill-switch plan", e))?;
    let opts = RunOptions { dashboard, extra_keys, hangup_stops: true };
    let code = rt.block_on(app::run(settings, killswitch, opts));
    drop(_stop_gateway);
    // Not eprintln!: after a hangup the terminal is gone, and a failed write must not panic.
    let _ = writeln!(std::io::stderr(), "holdfast demo: logs were in {} (removed now)", lab.dir.display());
    Ok(code)
}

fn setup(what: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup { what: what.to_owned(), detail: e.to_string() }
}

/// The namespaces, the veth pair and the work folder; all removed on drop.
struct Lab {
    gw_ns: String,
    client_ns: String,
    dir: PathBuf,
}

impl Lab {
    fn create() -> Result<Lab, DemoError> {
        let id = std::process::id();
        let dir = std::env::temp_dir().join(format!("holdfast-demo-{id}"));
        let lab = Lab { gw_ns: format!("{PREFIX}{id}g"), client_ns: format!("{PREFIX}{id}c"), dir };
        std::fs::create_dir_all(&lab.dir).map_err(|e| setup("creating the work folder", e))?;
        let (vc, vg) = (format!("{PREFIX}{id}vc"), format!("{PREFIX}{id}vg"));
        let (client_addr, gw_addr) = (format!("{CLIENT_UNDERLAY}/30"), format!("{GATEWAY_UNDERLAY}/30"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &lab.gw_ns],
            vec!["netns", "add", &lab.client_ns],
            vec!["link", "add", &vc, "type", "veth", "peer", "name", &vg],
            vec!["link", "set", &vc, "netns", &lab.client_ns],
            vec!["link", "set", &vg, "netns", &lab.gw_ns],
            vec!["-n", &lab.client_ns, "addr", "add", &client_addr, "dev", &vc],
            vec!["-n", &lab.gw_ns, "addr", "add", &gw_addr, "dev", &vg],
            vec!["-n", &lab.client_ns, "link", "set", &vc, "up"],
            vec!["-n", &lab.gw_ns, "link", "set", &vg, "up"],
            vec!["-n", &lab.client_ns, "link", "set", "lo", "up"],
            vec!["-n", &lab.gw_ns, "link", "set", "lo", "up"],
        ];
        for args in steps {
            exec("ip", &args)?;
        }
        Ok(lab)
    }

    /// Gateway identity, one client, and a client file with demo timings (health checks every
    /// 3–5 s and short backoffs, so recoveries happen while you watch).
    fn provision(&self) -> Result<ClientSettings, DemoError> {
        let gw_dir = self.dir.join("gateway");
        let client_file = self.dir.join("demo-client.toml");
        crate::gateway::cli::init(&InitArgs {
            dir: gw_dir.clone(),
            endpoint: format!("{GATEWAY_UNDERLAY}:{PORT}").parse().map_err(|e| setup("endpoint", e))?,
            subnet: crate::config::gateway::DEFAULT_SUBNET,
            subnet6: None,
            name: "demo".into(),
            server_name: crate::config::gateway::DEFAULT_SERVER_NAME.into(),
        })
        .map_err(|e| setup("gateway init", e))?;
        crate::gateway::cli::add_client(&AddClientArgs {
            dir: gw_dir,
            name: "demo-client".into(),
            ip: None,
            out: Some(client_file.clone()),
        })
        .map_err(|e| setup("gateway add-client", e))?;
        let mut file = ClientFile::load(&client_file).map_err(|e| setup("reading the client file", e))?;
        let secs = |s| Some(Duration::from_secs(s));
        file.timing = TimingSection {
            health_min: secs(3),
            health_max: secs(5),
            rpc_deadline: secs(2),
            backoff_initial: secs(1),
            backoff_max: secs(10),
            repeat_log_every: None,
            nudge_min_interval: None,
        };
        file.log = LogSection { dir: Some(self.dir.join("logs")), level: None, keep_files: Some(1) };
        file.status = StatusSection { socket: Some(self.dir.join("client.sock")) };
        // The demo's client joins its namespace with setns only (no mount namespace of its own),
        // so /etc/resolv.conf is the machine's: it must not set the resolvers the gateway pushes.
        file.network.dns = crate::config::client::DnsChoice::System;
        let text = toml::to_string(&file).map_err(|e| setup("writing the client file", e))?;
        std::fs::write(&client_file, text).map_err(|e| setup("writing the client file", e))?;
        ClientSettings::load(client_file).map_err(|e| setup("loading the client file", e))
    }

    fn start_gateway(&self) -> Result<Child, DemoError> {
        let exe = std::env::current_exe().map_err(|e| setup("finding this program", e))?;
        let log = File::create(self.dir.join("gateway.log")).map_err(|e| setup("gateway log", e))?;
        let err = log.try_clone().map_err(|e| setup("gateway log", e))?;
        gateway_command(&exe, &self.gw_ns, &self.dir, log, err)
            .spawn()
            .map_err(|e| setup("starting the gateway", e))
    }

    fn enter_client_ns(&self) -> Result<(), DemoError> {
        let handle = File::open(Path::new("/run/netns").join(&self.client_ns))
            .map_err(|e| setup("opening the client namespace", e))?;
        // SAFETY: setns with a valid namespace fd; no other thread exists yet, so the whole
        // process (and everything it starts later) ends up in the client's namespace.
        let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(setup("entering the client namespace", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        for ns in [&self.client_ns, &self.gw_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The demo's fault keys: each toggles one fault and says what it did.
fn fault_keys(lab: &Lab, gateway: Arc<Mutex<Option<Child>>>) -> Vec<ExtraKey> {
    let exe = std::env::current_exe().ok();
    let gw_ns = lab.gw_ns.clone();
    let dir = lab.dir.clone();
    let gw = gateway.clone();
    let kill_restart = move || -> String {
        let Ok(mut slot) = gw.lock() else { return "gateway: lock poisoned".into() };
        match slot.take() {
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                "gateway killed (SIGKILL); press k to start it again".into()
            }
            None => {
                let Some(exe) = exe.as_ref() else { return "cannot find this program".into() };
                let log = File::options().append(true).open(dir.join("gateway.log"));
                let (out, err) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
                    Ok(pair) => pair,
                    Err(e) => return format!("gateway log: {e}"),
                };
                match gateway_command(exe, &gw_ns, &dir, out, err).spawn() {
                    Ok(child) => {
                        *slot = Some(child);
                        "gateway restarted: it knows no session; the client re-authenticates".into()
                    }
                    Err(e) => format!("cannot restart the gateway: {e}"),
                }
            }
        }
    };
    let gw = gateway;
    let expire = move || -> String {
        let Ok(slot) = gw.lock() else { return "gateway: lock poisoned".into() };
        match slot.as_ref() {
            Some(child) => {
                // SAFETY: kill(2) with a pid we own (our child) and a valid signal number.
                let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR2) };
                if rc == 0 {
                    "every session ended (SIGUSR2): SessionExpired, then re-authentication".into()
                } else {
                    format!("cannot signal the gateway: {}", std::io::Error::last_os_error())
                }
            }
            None => "the gateway is not running (press k)".into(),
        }
    };
    let blackhole = |table: &'static str, proto: &'static str, what: &'static str| {
        let lab_ns = lab.gw_ns.clone();
        let on = Arc::new(Mutex::new(false));
        move || -> String {
            let lab = LabNs(lab_ns.clone());
            let Ok(mut on) = on.lock() else { return "lock poisoned".into() };
            let result = if *on {
                lab.nft(&["delete", "table", "inet", table])
            } else {
                let rules = format!(
                    "table inet {table} {{\n\
                     chain i {{ type filter hook input priority -10; {proto} dport {PORT} drop; }}\n\
                     chain o {{ type filter hook output priority -10; {proto} sport {PORT} drop; }}\n\
                     }}\n"
                );
                lab.nft_script(&rules)
            };
            match result {
                Ok(()) => {
                    *on = !*on;
                    format!("{what} {}", if *on { "blackholed (nftables drop)" } else { "restored" })
                }
                Err(e) => format!("{what}: nft failed: {e}"),
            }
        }
    };
    vec![
        ExtraKey { key: 'k', label: "gateway kill/start".into(), action: Arc::new(kill_restart) },
        ExtraKey { key: 'e', label: "expire".into(), action: Arc::new(expire) },
        ExtraKey { key: 'u', label: "block UDP".into(), action: Arc::new(blackhole("holdfast_demo_udp", "udp", "UDP data plane")) },
        ExtraKey { key: 'c', label: "block control".into(), action: Arc::new(blackhole("holdfast_demo_ctl", "tcp", "control port")) },
    ]
}

/// A namespace name with the nft helpers the fault keys need.
struct LabNs(String);

impl LabNs {
    fn nft(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.0, "nft"];
        all.extend_from_slice(args);
        exec("ip", &all).map_err(|e| e.to_string())
    }

    fn nft_script(&self, script: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

/// A steady ping through the tunnel, so the dashboard's graphs move. `ping` gives up when the
/// tunnel is not there yet (no route) or goes away; the pinger starts it again, once a second,
/// until the demo ends.
struct Pinger {
    stop: Arc<std::sync::atomic::AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pinger {
    fn start() -> Pinger {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let (stop2, child2) = (stop.clone(), child.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let spawned = Command::new("ping")
                    .args(["-i", "0.2", GATEWAY_TUNNEL])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                if let (Ok(c), Ok(mut slot)) = (spawned, child2.lock()) {
                    *slot = Some(c);
                }
                // Wait for this ping to end (or for the stop), polling the child.
                loop {
                    let done = match child2.lock() {
                        Ok(mut slot) => match slot.as_mut() {
                            Some(c) => !matches!(c.try_wait(), Ok(None)),
                            None => true,
                        },
                        Err(_) => true,
                    };
                    if done || stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Pinger { stop, child, thread: Some(thread) }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let kill = |slot: &Mutex<Option<Child>>| {
            if let Some(c) = slot.lock().ok().and_then(|mut s| s.take()) {
                drop(KillOnDrop(c));
            }
        };
        kill(&self.child);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The thread may have started one more ping between its last check and the stop.
        kill(&self.child);
    }
}

/// The demo's gateway in its namespace, logging to `out`/`err`. In a process group of its own:
/// the terminal's SIGHUP goes to the foreground group, and the gateway must outlive it until the
/// demo has cleaned up (the demo stops it then).
fn gateway_command(exe: &Path, gw_ns: &str, dir: &Path, out: File, err: File) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", gw_ns])
        .arg(exe)
        .args(["gateway", "run", "--dir"])
        .arg(dir.join("gateway"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd
}

/// Kills (and reaps) the gateway, if it runs, when dropped.
struct StopGateway(Arc<Mutex<Option<Child>>>);

impl Drop for StopGateway {
    fn drop(&mut self) {
        let child = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(child) = child {
            drop(KillOnDrop(child));
        }
    }
}

/// Kills (and reaps) a child when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exec(program: &str, args: &[&str]) -> Result<(), DemoError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| setup(&format!("{program} {}", args.join(" ")), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(setup(
            &format!("{program} {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim(),
        ))
    }
}

/// Removes namespaces left by a demo that was SIGKILLed (its pid no longer exists).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let alive = !pid.is_empty() && Path::new("/proc").join(&pid).exists();
        if !alive {
            let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        }
    }
}
