//! The real-process rows: a gateway and a client (both `holdfast` binaries, the client with its
//! default timings) in two network namespaces joined by a veth pair (198.18.0.1 client,
//! 198.18.0.2 gateway; tunnel 100.64.0.0/24), traffic through the tunnel, and faults on the
//! gateway process.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use holdfast::client::status_socket::StatusReport;
use holdfast::config::client::LogSection;

use crate::support::{GatewayDir, Pinger, Proc, edit_client_file, unix_now, wait_until};

const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// Bound on every wait for a process event.
const T: Duration = Duration::from_secs(30);
/// The traffic that measures recovery: one ping every 10 ms.
pub const PING_EVERY: &str = "0.01";

pub struct World {
    gw: GatewayDir,
    gateway: Proc,
    gateway_runs: u32,
    client: Proc,
    logs: tempfile::TempDir,
    pinger: Pinger,
}

/// One outage: when the gateway came back, and how long until the first packet went through.
pub struct Outage {
    /// From spawning the new gateway process to its control plane listening.
    pub gateway_start: Duration,
    /// From the gateway listening again to the first ping reply through the tunnel.
    pub to_first_packet: Duration,
}

/// Datagrams lost in one UDP load run.
pub struct Loss {
    pub lost: u64,
    pub sent: u64,
}

/// What forces the re-authentication in a loss run.
#[derive(Clone, Copy)]
pub enum Trigger {
    /// Nothing: the ambient loss of the load itself.
    None,
    /// `SIGHUP` to the client: it re-authenticates, the gateway keeps the old session for a grace
    /// period (make-before-break).
    ClientReauth,
    /// `SIGUSR2` to the gateway: it ends every session at once; the client finds out from the data
    /// plane and re-authenticates (break-before-make).
    GatewayEndsSessions,
}

impl World {
    pub fn up() -> World {
        let gw = GatewayDir::init_split();
        let logs = tempfile::tempdir().expect("tempdir");
        let file = gw.add_client("bench", |_| {});
        // The default client file, except where its logs and status socket go.
        edit_client_file(&file, |f| {
            f.log = LogSection { dir: Some(logs.path().to_owned()), level: None, keep_files: None };
            f.status.socket = Some(logs.path().join("client.sock"));
        });
        let gateway = start_gateway(&gw, 0);
        let client = gw.run_client("client", &file);
        let pinger = Pinger::start(gw.clients_ns(), "ping", GW_TUN, PING_EVERY);
        let mut w = World { gw, gateway, gateway_runs: 1, client, logs, pinger };
        let since = unix_now();
        let first = w.pinger.first_reply_after(w.gw.clients_ns(), since, T);
        assert!(first.is_some(), "no traffic through the tunnel after start-up:\n{}", w.client_lines());
        w
    }

    fn client_lines(&self) -> String {
        self.client.all_lines().join("\n")
    }

    fn socket(&self) -> PathBuf {
        self.logs.path().join("client.sock")
    }

    pub fn status(&self) -> StatusReport {
        crate::support::status_of(&self.socket())
    }

    fn session(&self) -> Option<String> {
        self.status().snapshot.map(|s| s.session_id)
    }

    /// Median round trip of 100 pings through the tunnel, 10 ms apart.
    pub fn tunnel_rtt(&self) -> Duration {
        let out = self.gw.clients_ns().exec_ok("ping", &["-n", "-c", "100", "-i", "0.01", &GW_TUN.to_string()]);
        let mut ms: Vec<f64> =
            out.lines().filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
        assert!(ms.len() > 50, "tunnel ping answered {} of 100", ms.len());
        ms.sort_by(f64::total_cmp);
        Duration::from_secs_f64(ms[ms.len() / 2] / 1e3)
    }

    /// Kills the gateway (SIGKILL: it forgets every session), keeps it down for `down`, starts it
    /// again and waits for the first ping reply through the tunnel.
    pub fn outage(&mut self, down: Duration) -> Outage {
        let pid = self.client.pid();
        self.gateway.kill();
        // The outage itself: this sleep *is* the fault being measured, not a synchronisation.
        std::thread::sleep(down);
        let spawned = Instant::now();
        self.gateway = start_gateway(&self.gw, self.gateway_runs);
        self.gateway_runs += 1;
        let gateway_start = spawned.elapsed();
        let ready = unix_now();
        let Some(to_first_packet) = self.pinger.first_reply_after(self.gw.clients_ns(), ready, T) else {
            panic!("no traffic within {T:?} after a {down:?} outage:\n{}", self.client_lines())
        };
        assert!(self.client.is_alive() && self.client.pid() == pid, "the client process survived");
        Outage { gateway_start, to_first_packet }
    }

    /// Sends UDP at `mbps` for `secs` through the tunnel (client to gateway, or back with
    /// `reverse`), forces a re-authentication by `trigger` in the middle, and counts what the
    /// receiving iperf3 missed.
    pub fn reauth_loss(&mut self, trigger: Trigger, reverse: bool, mbps: u32, secs: u32) -> Loss {
        let gw_tun = GW_TUN.to_string();
        let mut server = self.gw.ns.spawn("iperf3-s", "iperf3", &["-s", "-1", "-B", &gw_tun], &[]);
        // iperf3 buffers its output when piped: wait for the socket instead of its banner.
        let listening = wait_until(T, || {
            String::from_utf8_lossy(&self.gw.ns.exec("ss", &["-Hltn", "sport = :5201"]).stdout).contains("5201")
        });
        assert!(listening && server.is_alive(), "iperf3 server: {}", server.all_lines().join("\n"));
        let before = self.session();
        let rate = format!("{mbps}M");
        let t = secs.to_string();
        let mut args = vec!["-c", gw_tun.as_str(), "-u", "-b", rate.as_str(), "-l", "1200", "-t", t.as_str(), "-J"];
        if reverse {
            args.push("-R");
        }
        let out = std::thread::scope(|scope| {
            let load = scope.spawn(|| self.gw.clients_ns().exec("iperf3", &args));
            // Mid-run: the trigger's moment is the schedule of the measurement.
            std::thread::sleep(Duration::from_secs(u64::from(secs) / 2));
            match trigger {
                Trigger::None => {}
                Trigger::ClientReauth => self.client.signal("HUP"),
                Trigger::GatewayEndsSessions => self.gateway.signal("USR2"),
            }
            if !matches!(trigger, Trigger::None) {
                let swapped = wait_until(Duration::from_secs(5), || self.session() != before);
                assert!(swapped, "no new session after the re-auth trigger:\n{}", self.client_lines());
            }
            load.join().expect("iperf3 thread")
        });
        let _ = server.wait_exit(T);
        assert!(
            out.status.success(),
            "iperf3: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J parses");
        let sum = &json["end"]["sum"];
        let field = |k: &str| sum[k].as_u64().unwrap_or_else(|| panic!("iperf3 end.sum.{k} in {sum}"));
        Loss { lost: field("lost_packets"), sent: field("packets") }
    }

    /// Stops both processes cleanly; asserts the client was never restarted.
    pub fn down(mut self) {
        let loops = self.status().data_plane.map(|d| d.loop_starts);
        assert_eq!(loops, Some(1), "the client's UDP loops started once");
        assert_eq!(self.client.terminate(T), Some(0), "client exits 0 on SIGTERM");
        assert_eq!(self.gateway.terminate(T), Some(0), "gateway exits 0 on SIGTERM");
    }
}

/// Times `client::start()` with the real nftables kill-switch, `runs` times (sorted), in a
/// namespace of its own (an empty one: the endpoint leads nowhere, which `start()` does not
/// care about). The difference to the no-op kill-switch's figure is the cost of enabling the
/// kill-switch: a netlink socket, a look at the table, one atomic batch and a check.
pub fn start_times_with_killswitch(runs: usize) -> Vec<Duration> {
    let ns = crate::support::netns::Netns::new();
    let p = crate::common::provision("198.18.0.2:9");
    let file = p.client_file.clone();
    let samples = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // The kill-switch's netlink socket opens in this thread's namespace, never the host's.
                ns.enter_current_thread();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async {
                    let mut samples = Vec::with_capacity(runs);
                    for _ in 0..runs {
                        let settings = holdfast::client::ClientSettings::load(file.clone()).expect("client file");
                        let ks = holdfast::client::killswitch::for_client(&settings.file).expect("kill-switch plan");
                        let t0 = Instant::now();
                        let handle = holdfast::client::start(settings, ks, None).expect("start");
                        samples.push(t0.elapsed());
                        handle.stop().await.expect("stop");
                    }
                    samples
                })
            })
            .join()
            .expect("start() thread")
    });
    let left = ns.exec_ok("nft", &["list", "ruleset"]);
    assert!(!left.contains("holdfast"), "every stop removed the kill-switch:\n{left}");
    let mut samples = samples;
    samples.sort();
    samples
}

fn start_gateway(gw: &GatewayDir, n: u32) -> Proc {
    let mut p = gw.run(&format!("gateway#{n}"));
    p.wait_for(&["control plane listening"], T);
    p
}
