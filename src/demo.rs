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
//! Where PostgreSQL's server binaries are installed (`/usr/lib/postgresql/*/bin`), the demo also
//! starts a throw-away cluster (unix socket only, in the demo's work folder) and runs two gateways
//! on it: A as above, and B at 198.18.0.6 in a third namespace, linked to the client by
//! 198.18.0.5/30. The client file lists both; `k` then kills the gateway the client is on, so you
//! watch it fail over with its address unchanged, and starts it again on the next press.
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
use crate::gateway::cli::{AddClientArgs, InitArgs, JoinArgs};
use crate::logging::{self, LogSettings};
use crate::tui::ExtraKey;

const PORT: u16 = 51820;
const CLIENT_UNDERLAY: &str = "198.18.0.1";
const GATEWAY_UNDERLAY: &str = "198.18.0.2";
/// The second gateway (with PostgreSQL) and the client's end of its link.
const GATEWAY_B_UNDERLAY: &str = "198.18.0.6";
const CLIENT_B_UNDERLAY: &str = "198.18.0.5";
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
pub fn run(one_gateway: bool) -> Result<i32, DemoError> {
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
    let pg = if one_gateway { None } else { pg_bin_dir() };
    let lab = Lab::create(pg.is_some())?;
    // Declared after the lab, so it stops before the lab's folder (its data) is removed.
    let db = match pg {
        Some(bin) => Some(DemoDb::start(&bin, &lab.dir)?),
        None => None,
    };
    let settings = lab.provision(db.as_ref())?;
    let mut gateways = vec![GatewayProc::new(&lab.gw_ns, lab.dir.join("gateway"), "A")];
    if let Some(ns) = &lab.gwb_ns {
        gateways.push(GatewayProc::new(ns, lab.dir.join("gateway-b"), "B"));
    }
    let gateway = Arc::new(Mutex::new(gateways));
    // Stops the gateways however this function ends (a panic included), before the database
    // and the lab go.
    let stop_gateways = StopGateways(gateway.clone());
    if let Ok(mut gws) = gateway.lock() {
        for g in gws.iter_mut() {
            g.start(&lab.dir).map_err(|e| setup("starting a gateway", e))?;
        }
        // The client starts once every gateway serves: with two, a client that found the first
        // not yet listening would fail over at once, and `k` would kill the wrong one.
        for g in gws.iter() {
            g.wait_serving().map_err(|e| setup("starting a gateway", e))?;
        }
    }

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
    let killswitch =
        crate::client::killswitch::for_client(&settings.file).map_err(|e| setup("the kill-switch plan", e))?;
    let opts = RunOptions { dashboard, extra_keys, hangup_stops: true };
    let code = rt.block_on(app::run(settings, killswitch, opts));
    drop(stop_gateways);
    drop(db);
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
    /// Gateway B's namespace, with two gateways.
    gwb_ns: Option<String>,
    client_ns: String,
    dir: PathBuf,
}

impl Lab {
    fn create(two_gateways: bool) -> Result<Lab, DemoError> {
        let id = std::process::id();
        let dir = std::env::temp_dir().join(format!("holdfast-demo-{id}"));
        let lab = Lab {
            gw_ns: format!("{PREFIX}{id}g"),
            gwb_ns: two_gateways.then(|| format!("{PREFIX}{id}b")),
            client_ns: format!("{PREFIX}{id}c"),
            dir,
        };
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
        if let Some(b) = &lab.gwb_ns {
            let (vc, vg) = (format!("{PREFIX}{id}wc"), format!("{PREFIX}{id}wg"));
            let (client_addr, gw_addr) = (format!("{CLIENT_B_UNDERLAY}/30"), format!("{GATEWAY_B_UNDERLAY}/30"));
            let steps: Vec<Vec<&str>> = vec![
                vec!["netns", "add", b],
                vec!["link", "add", &vc, "type", "veth", "peer", "name", &vg],
                vec!["link", "set", &vc, "netns", &lab.client_ns],
                vec!["link", "set", &vg, "netns", b],
                vec!["-n", &lab.client_ns, "addr", "add", &client_addr, "dev", &vc],
                vec!["-n", b, "addr", "add", &gw_addr, "dev", &vg],
                vec!["-n", &lab.client_ns, "link", "set", &vc, "up"],
                vec!["-n", b, "link", "set", &vg, "up"],
                vec!["-n", b, "link", "set", "lo", "up"],
            ];
            for args in steps {
                exec("ip", &args)?;
            }
        }
        Ok(lab)
    }

    /// Gateway identity, one client, and a client file with demo timings (health checks every
    /// 3–5 s and short backoffs, so recoveries happen while you watch).
    fn provision(&self, db: Option<&DemoDb>) -> Result<ClientSettings, DemoError> {
        let gw_dir = self.dir.join("gateway");
        let client_file = self.dir.join("demo-client.toml");
        let init = InitArgs {
            dir: gw_dir.clone(),
            endpoint: format!("{GATEWAY_UNDERLAY}:{PORT}").parse().map_err(|e| setup("endpoint", e))?,
            subnet: crate::config::gateway::DEFAULT_SUBNET,
            subnet6: None,
            name: "demo".into(),
            server_name: crate::config::gateway::DEFAULT_SERVER_NAME.into(),
        };
        match db {
            None => crate::gateway::cli::init(&init).map(drop),
            // Two gateways on the shared registry (a short-lived runtime: no thread may outlive
            // this step, the process enters the client's namespace next).
            Some(db) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| setup("starting a runtime", e))?;
                let join = JoinArgs {
                    dir: self.dir.join("gateway-b"),
                    from: gw_dir.clone(),
                    endpoint: format!("{GATEWAY_B_UNDERLAY}:{PORT}").parse().map_err(|e| setup("endpoint", e))?,
                    name: Some("demo-b".into()),
                };
                let done = rt.block_on(async {
                    crate::gateway::cli::init_shared(&init, &db.url()).await?;
                    crate::gateway::cli::join(&join).await
                });
                rt.shutdown_timeout(Duration::from_secs(1));
                done.map(drop)
            }
        }
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
        for ns in [Some(&self.client_ns), Some(&self.gw_ns), self.gwb_ns.as_ref()].into_iter().flatten() {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One gateway process of the demo, started and killed by the `k` key.
struct GatewayProc {
    ns: String,
    dir: PathBuf,
    name: &'static str,
    child: Option<Child>,
}

impl GatewayProc {
    fn new(ns: &str, dir: PathBuf, name: &'static str) -> Self {
        Self { ns: ns.to_owned(), dir, name, child: None }
    }

    /// Waits (up to 20 s) until the gateway answers on its status socket: by then its control
    /// port is bound. The socket is a file, reachable from this namespace.
    fn wait_serving(&self) -> Result<(), String> {
        let socket = crate::gateway::status::socket_of(&self.dir, None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match crate::gateway::status::query(&socket) {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(format!("gateway {} did not come up within 20 s: {e}", self.name));
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    /// Starts `holdfast gateway run` in the gateway's namespace, logging to `lab/gateway-NAME.log`.
    fn start(&mut self, lab: &Path) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(lab.join(format!("gateway-{}.log", self.name)))
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| format!("gateway log: {e}"))?;
        let child = gateway_command(&exe, &self.ns, &self.dir, log.0, log.1)
            .spawn()
            .map_err(|e| format!("cannot start gateway {}: {e}", self.name))?;
        self.child = Some(child);
        Ok(())
    }
}

/// The demo's fault keys: each toggles one fault and says what it did.
fn fault_keys(lab: &Lab, gateway: Arc<Mutex<Vec<GatewayProc>>>) -> Vec<ExtraKey> {
    let dir = lab.dir.clone();
    let gw = gateway.clone();
    // With two gateways, `k` cycles: kill A (the client's first; it fails over to B), start A
    // (the client stays on B), kill B (it fails over to A), start B. Each kill hits the gateway
    // the client is on. With one gateway it toggles it.
    let presses = Arc::new(Mutex::new(0usize));
    let kill_restart = move || -> String {
        let (Ok(mut gws), Ok(mut n)) = (gw.lock(), presses.lock()) else {
            return "gateway: lock poisoned".into();
        };
        let count = gws.len();
        let two = count > 1;
        let g = &mut gws[(*n / 2) % count];
        *n += 1;
        match g.child.take() {
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                if two {
                    format!(
                        "gateway {} killed (SIGKILL): the client fails over, same address; k starts it again",
                        g.name
                    )
                } else {
                    "gateway killed (SIGKILL); press k to start it again".into()
                }
            }
            None => match g.start(&dir) {
                Ok(()) if two => format!("gateway {} started again", g.name),
                Ok(()) => "gateway restarted: it knows no session; the client re-authenticates".into(),
                Err(e) => e,
            },
        }
    };
    let gw = gateway;
    let expire = move || -> String {
        let Ok(gws) = gw.lock() else { return "gateway: lock poisoned".into() };
        let mut signalled = 0;
        for child in gws.iter().filter_map(|g| g.child.as_ref()) {
            // SAFETY: kill(2) with a pid we own (our child) and a valid signal number.
            let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR2) };
            if rc != 0 {
                return format!("cannot signal the gateway: {}", std::io::Error::last_os_error());
            }
            signalled += 1;
        }
        if signalled == 0 {
            "no gateway is running (press k)".into()
        } else {
            "every session ended (SIGUSR2): SessionExpired, then re-authentication".into()
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
        ExtraKey {
            key: 'u',
            label: "block UDP".into(),
            action: Arc::new(blackhole("holdfast_demo_udp", "udp", "UDP data plane")),
        },
        ExtraKey {
            key: 'c',
            label: "block control".into(),
            action: Arc::new(blackhole("holdfast_demo_ctl", "tcp", "control port")),
        },
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
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()) }
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
fn gateway_command(exe: &Path, gw_ns: &str, gateway_dir: &Path, out: File, err: File) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", gw_ns])
        .arg(exe)
        .args(["gateway", "run", "--dir"])
        .arg(gateway_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd
}

/// Kills (and reaps) the gateways that run, when dropped.
struct StopGateways(Arc<Mutex<Vec<GatewayProc>>>);

impl Drop for StopGateways {
    fn drop(&mut self) {
        let mut gws = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for child in gws.iter_mut().filter_map(|g| g.child.take()) {
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
        Err(setup(&format!("{program} {}", args.join(" ")), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Debian's PostgreSQL server binaries, if installed: then the demo runs two gateways.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

/// The demo's throw-away PostgreSQL cluster: in the work folder, owned by the postgres user,
/// unix socket only. Stopped on drop.
struct DemoDb {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
}

impl DemoDb {
    fn start(bin: &Path, lab: &Path) -> Result<DemoDb, DemoError> {
        let root = lab.join("pg");
        let (data, sock) = (root.join("data"), root.join("s"));
        std::fs::create_dir_all(&sock).map_err(|e| setup("creating the database folder", e))?;
        exec("chown", &["-R", "postgres:postgres", &root.to_string_lossy()])?;
        let db = DemoDb { bin: bin.to_owned(), data, sock };
        let data = db.data.to_string_lossy().into_owned();
        let sock = db.sock.to_string_lossy().into_owned();
        db.as_postgres("initdb", &["-A", "trust", "-U", "postgres", "--no-sync", "-D", &data])?;
        let opts = format!("-k {sock} -c listen_addresses=''");
        let log = root.join("log").to_string_lossy().into_owned();
        db.as_postgres("pg_ctl", &["-D", &data, "-o", &opts, "-l", &log, "-w", "start"])?;
        db.as_postgres("createdb", &["-h", &sock, "-U", "postgres", "holdfast"])?;
        Ok(db)
    }

    fn as_postgres(&self, program: &str, args: &[&str]) -> Result<(), DemoError> {
        let program = self.bin.join(program).to_string_lossy().into_owned();
        let mut all = vec!["-u", "postgres", "--", &program];
        all.extend_from_slice(args);
        exec("runuser", &all)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@localhost/holdfast?host={}", self.sock.display())
    }
}

impl Drop for DemoDb {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self.as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
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
