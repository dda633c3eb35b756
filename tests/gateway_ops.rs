//! Operating a gateway (issue 15), end to end with the real binary: `gateway status` over the
//! status socket, the Prometheus endpoint, and SIGHUP. The gateway and each client run in network
//! namespaces of their own:
//!
//! ```text
//!  client0 (up0 198.18.1.2) ---- (c0 198.18.1.1 = endpoint) gateway
//!  client1 (up0 198.18.2.2) ---- (c1 198.18.2.1)
//! ```

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use holdfast::gateway::status::GatewayReport;
use support::netns::{self, Netns};
use support::{BIN, Proc, edit_client_file, fast_timings, holdfast, holdfast_ok, s, wait_until};

/// Bound on anything that should happen within a second or two; only reached by a failing test.
const T: Duration = Duration::from_secs(20);
const GW_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const CLIENT_TUN: &str = "holdfast0";

macro_rules! require_root {
    () => {
        if !netns::available() {
            eprintln!("SKIPPED: needs root and iproute2 (network namespaces, TUN devices)");
            return;
        }
    };
}

/// A provisioned gateway with `n` clients, each in a namespace of its own.
struct Site {
    gw: Netns,
    clients: Vec<Netns>,
    files: Vec<PathBuf>,
    dir: tempfile::TempDir,
    logs: tempfile::TempDir,
}

impl Site {
    /// `keys` are set in gateway.toml (top-level `key = value` lines, replacing `init`'s);
    /// `metrics` turns the endpoint on at that address.
    fn new(n: u8, keys: &[(&str, &str)], metrics: Option<&str>) -> Site {
        let gw = Netns::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = tempfile::tempdir().expect("tempdir");
        let endpoint = SocketAddr::from((ENDPOINT, 51820)).to_string();
        holdfast_ok(&["gateway", "init", "--dir", s(dir.path()), "--endpoint", &endpoint]);
        let toml = dir.path().join("gateway.toml");
        let mut text = std::fs::read_to_string(&toml).expect("gateway.toml");
        // One interface per client: bound to the endpoint address, replies leave from it.
        let listen = format!("\"{endpoint}\"");
        for (key, value) in [("listen", listen.as_str())].iter().chain(keys) {
            text =
                text.lines().filter(|l| l.split('=').next().map(str::trim) != Some(key)).collect::<Vec<_>>().join("\n");
            text = format!("{key} = {value}\n{text}\n");
        }
        if let Some(m) = metrics {
            let commented = "# listen = \"127.0.0.1:9464\"";
            assert!(text.contains(commented), "init writes a [metrics] section");
            text = text.replace(commented, &format!("listen = \"{m}\""));
        }
        std::fs::write(&toml, text).expect("write gateway.toml");
        let mut site = Site { gw, clients: Vec::new(), files: Vec::new(), dir, logs };
        for i in 0..n {
            let ns = Netns::new();
            let gw_side = Ipv4Addr::new(198, 18, i + 1, 1);
            netns::link(&site.gw, &format!("c{i}"), gw_side, &ns, "up0", Ipv4Addr::new(198, 18, i + 1, 2), 24);
            if gw_side != ENDPOINT {
                ns.ip(&["route", "add", &format!("{ENDPOINT}/32"), "via", &gw_side.to_string()]);
            }
            let file = site.add_client(&format!("client{i}"));
            site.clients.push(ns);
            site.files.push(file);
        }
        site
    }

    /// Registers a client; its file gets test timings and a log folder (and status socket) of
    /// its own.
    fn add_client(&self, name: &str) -> PathBuf {
        let file = self.dir.path().join(format!("{name}.toml"));
        holdfast_ok(&["gateway", "add-client", "--dir", s(self.dir.path()), name, "--out", s(&file)]);
        let logs = self.logs.path().join(name);
        edit_client_file(&file, |f| fast_timings(f, &logs));
        file
    }

    fn gateway(&self) -> Proc {
        self.gateway_logging(Some("info,holdfast=debug"))
    }

    /// The gateway with `RUST_LOG` set to `rust_log`, or unset (then `[log] level` decides).
    fn gateway_logging(&self, rust_log: Option<&str>) -> Proc {
        let mut cmd = self.gw.command(BIN);
        cmd.args(["gateway", "run", "--dir", s(self.dir.path())]).env_remove("RUST_LOG");
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let mut p = Proc::spawn("gateway", cmd);
        p.wait_for(&["control plane listening"], T);
        p
    }

    fn client(&self, i: usize) -> Proc {
        let mut p =
            self.clients[i].spawn(&format!("client{i}"), BIN, &["client", "run", "--config", s(&self.files[i])], &[]);
        p.wait_for(&["data plane on session"], T);
        p
    }

    /// The tunnel address client `i` got (from its TUN device).
    fn tunnel_ip(&self, i: usize) -> String {
        self.tun_addr(i, "-4")
    }

    /// The IPv6 tunnel address of client `i` (the global one on its TUN device).
    fn tunnel_ip6(&self, i: usize) -> String {
        self.tun_addr(i, "-6")
    }

    fn tun_addr(&self, i: usize, family: &str) -> String {
        let addr = self.clients[i].global_addr(CLIENT_TUN, family);
        addr.unwrap_or_else(|| panic!("no {family} address on {CLIENT_TUN}")).to_string()
    }

    /// `holdfast gateway status --dir DIR [--json]`: (exit code, stdout, stderr).
    fn status(&self, json: bool) -> (Option<i32>, String, String) {
        let mut args = vec!["gateway", "status", "--dir", s(self.dir.path())];
        if json {
            args.push("--json");
        }
        let out = holdfast(&args);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    }

    /// The running gateway's report, and the JSON it came as.
    fn report(&self) -> (GatewayReport, String) {
        let (code, out, err) = self.status(true);
        assert_eq!(code, Some(0), "gateway status --json: {err}");
        (serde_json::from_str(&out).expect("gateway status --json parses"), out)
    }

    fn set_config(&self, edit: impl FnOnce(&str) -> String) {
        let toml = self.dir.path().join("gateway.toml");
        let text = std::fs::read_to_string(&toml).expect("gateway.toml");
        std::fs::write(&toml, edit(&text)).expect("write gateway.toml");
    }
}

/// The session key a client gets, obtained the way the client does (Authenticate over mutual
/// TLS, from client0's namespace): the test then knows a live session's key and can look for it.
fn authenticate_as(site: &Site, name: &str) -> [u8; 32] {
    use holdfast::client::control::ControlPlane;
    use holdfast::config::client::ClientFile;
    let file_path = site.add_client(name);
    let ns = &site.clients[0];
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let file = ClientFile::load(&file_path).expect("client file");
                let creds = file.credentials(&file_path).expect("credentials");
                let snap = rt
                    .block_on(async {
                        let cp = ControlPlane::new(&file, &creds).expect("channel");
                        cp.authenticate(Duration::from_secs(5)).await
                    })
                    .unwrap_or_else(|e| panic!("authenticate: {}", e.detail));
                let mut key = [0u8; 32];
                key.copy_from_slice(snap.session_key.expose());
                key
            })
            .join()
            .expect("thread inside client0's namespace")
    })
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The longest run of hex digits in `text`.
fn longest_hex_run(text: &str) -> usize {
    text.split(|c: char| !c.is_ascii_hexdigit()).map(str::len).max().unwrap_or(0)
}

#[test]
fn status_lists_live_sessions_with_counters_and_forgets_an_expired_one() {
    require_root!();
    // A short idle timeout, so a stopped client's session expires within the test.
    let site = Site::new(2, &[("session_idle_timeout", "\"3s\"")], None);

    // No gateway yet: a clear message and the status command's "not running" code.
    let (code, _, err) = site.status(false);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("no holdfast gateway is running"), "{err}");

    let mut gateway = site.gateway();
    let _c0 = site.client(0);
    let mut c1 = site.client(1);
    for i in 0..2 {
        assert!(site.clients[i].ping_until(GW_TUN, T).is_some(), "client{i} pings through the tunnel");
        assert_eq!(site.clients[i].ping_count(GW_TUN, 3), 3);
    }
    let key = authenticate_as(&site, "probe");

    let (report, json) = site.report();
    assert_eq!(report.pid, gateway.pid(), "the gateway's own pid");
    for i in 0..2 {
        let name = format!("client{i}");
        let s = report.sessions.iter().find(|s| s.client == name).unwrap_or_else(|| panic!("{name} listed: {json}"));
        let both = vec![site.tunnel_ip(i), site.tunnel_ip6(i)];
        assert_eq!(s.addresses, both, "{name}'s tunnel addresses, IPv4 then IPv6");
        assert!(s.rx_packets >= 3 && s.rx_bytes > 0, "{name} received: {s:?}");
        assert!(s.tx_packets >= 3 && s.tx_bytes > 0, "{name} sent: {s:?}");
        let endpoint = s.endpoint.as_deref().unwrap_or("");
        assert!(endpoint.starts_with(&format!("198.18.{}.2:", i + 1)), "{name}'s endpoint: {s:?}");
        assert_eq!(s.state, "current");
        assert_eq!(s.key_fingerprint.len(), 16);
        assert!(s.last_packet_ago_ms.is_some());
    }
    assert_eq!(report.totals.clients_connected, 3, "client0, client1 and probe");
    assert!(report.data_plane.rx_packets >= 6 && report.data_plane.tx_packets >= 6);
    assert!(report.totals.authentications.iter().any(|r| r.result == "ok" && r.count >= 3));

    // No key material: the probe's session shows its key's fingerprint, never the key, in any
    // encoding; and no other key can hide in a long hex run (ids and fingerprints are 16 digits).
    let probe = report.sessions.iter().find(|s| s.client == "probe").expect("probe listed");
    let key_obj = holdfast::snapshot::SessionKey::new(key);
    assert_eq!(probe.key_fingerprint, key_obj.fingerprint().to_string());
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let decimal = key.iter().map(u8::to_string).collect::<Vec<_>>().join(",");
    let (_, human, _) = site.status(false);
    for text in [&json, &human] {
        assert!(!text.to_lowercase().contains(&hex), "key in hex");
        assert!(!text.contains(&base64(&key)[..40]), "key in base64");
        assert!(!text.replace([' ', '\n'], "").contains(&decimal), "key as numbers");
        assert!(longest_hex_run(text) <= 16, "no key-sized hex run: {text}");
    }
    eprintln!("{human}\n{json}");
    assert!(human.contains("client0") && human.contains(&format!("fp:{}", probe.key_fingerprint)), "{human}");

    // client1 stops; its session expires (3 s idle) and leaves the list; client0 stays.
    assert_eq!(c1.terminate(T), Some(0));
    gateway.wait_for(&["session expired", "client1"], T);
    let (report, json) = site.report();
    assert!(!report.sessions.iter().any(|s| s.client == "client1"), "client1 gone: {json}");
    assert!(report.sessions.iter().any(|s| s.client == "client0"), "client0 stays: {json}");

    // Metrics are off by default: the control port is the only TCP port listening.
    let listening = site.gw.exec_ok("ss", &["-Htln"]);
    assert_eq!(listening.lines().count(), 1, "only the control plane listens: {listening}");
    assert!(listening.contains(":51820"), "{listening}");
}

/// `GET /metrics` from inside `ns`: (status line and headers, body).
fn scrape(ns: &Netns, addr: SocketAddr) -> std::io::Result<(String, String)> {
    get(ns, addr, "/metrics")
}

/// `GET path` from inside `ns`.
fn get(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread();
                let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
                let mut raw = String::new();
                conn.read_to_string(&mut raw)?;
                let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
                Ok((head.to_owned(), body.to_owned()))
            })
            .join()
            .expect("scrape thread")
    })
}

/// One sample of an exposition: name, labels as written, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// A strict parser of the Prometheus text format (0.0.4) for what we emit: `# HELP` and
/// `# TYPE` lines, then samples of that family (`name{label="value",...} number`). Panics on
/// anything else, so a malformed exposition fails the test.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut typed: Option<(String, String)> = None;
    let mut seen_families = std::collections::HashSet::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(valid_name(name), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE: {line}"));
            assert!(valid_name(name), "{line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            assert!(seen_families.insert(name.to_owned()), "family {name} declared twice");
            typed = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line: {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                for pair in l.split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(valid_name(k), "label name: {line}");
                    assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'), "label value: {line}");
                }
                (n, l)
            }
            None => (series, ""),
        };
        assert!(valid_name(name), "{line}");
        let (family, kind) = typed.as_ref().unwrap_or_else(|| panic!("sample before TYPE: {line}"));
        assert_eq!(name, family, "sample of the declared family");
        if kind == "counter" {
            assert!(value >= 0.0, "counters are non-negative: {line}");
        }
        samples.push(Sample { name: name.to_owned(), labels: labels.to_owned(), value });
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name && s.labels == labels)
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in {samples:?}"))
        .value
}

const METRICS: &str = "127.0.0.1:9464";

#[test]
fn metrics_endpoint_answers_valid_exposition_and_counters_move_with_traffic() {
    require_root!();
    let site = Site::new(1, &[], Some(METRICS));
    let _gateway = site.gateway();
    let _c0 = site.client(0);
    let addr: SocketAddr = METRICS.parse().expect("addr");

    let (head, body) = scrape(&site.gw, addr).expect("scrape");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    eprintln!("{head}\n{body}");
    let before = parse_exposition(&body);
    assert_eq!(value(&before, "holdfast_gateway_sessions", ""), 1.0, "{body}");
    assert!(value(&before, "holdfast_gateway_authentications_total", "result=\"ok\"") >= 1.0);
    assert_eq!(value(&before, "holdfast_gateway_registry_version", ""), 1.0);
    for name in ["holdfast_gateway_pings_total", "holdfast_gateway_drops_total", "holdfast_gateway_bytes_total"] {
        assert!(before.iter().any(|s| s.name == name), "{name} exposed: {body}");
    }
    let rx = |s: &[Sample]| value(s, "holdfast_gateway_packets_total", "direction=\"rx\"");
    let tx = |s: &[Sample]| value(s, "holdfast_gateway_bytes_total", "direction=\"tx\"");

    assert!(site.clients[0].ping_until(GW_TUN, T).is_some());
    assert_eq!(site.clients[0].ping_count(GW_TUN, 5), 5);
    let (_, body) = scrape(&site.gw, addr).expect("scrape");
    let after = parse_exposition(&body);
    assert!(rx(&after) >= rx(&before) + 5.0, "rx packets moved: {} -> {}", rx(&before), rx(&after));
    assert!(tx(&after) > tx(&before), "tx bytes moved");

    // The client's path MTU probes (two at least once its tunnel is up) are counted, and so are
    // the acks that answered them. The endpoint has no event to await: scrape until they show.
    let probes = |s: &[Sample]| value(s, "holdfast_gateway_path_mtu_probes_total", "");
    let acked = |s: &[Sample]| value(s, "holdfast_gateway_path_mtu_probe_acks_total", "result=\"sent\"");
    let end = std::time::Instant::now() + T;
    let probed = loop {
        let (_, body) = scrape(&site.gw, addr).expect("scrape");
        let s = parse_exposition(&body);
        if (probes(&s) >= 1.0 && acked(&s) >= 1.0) || std::time::Instant::now() > end {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(probes(&probed) >= 1.0 && acked(&probed) >= 1.0, "{probed:?}");
    assert!(acked(&probed) <= probes(&probed));
    // Withheld acks are exposed too (none here: one client stays far below the rate limit).
    assert_eq!(value(&probed, "holdfast_gateway_path_mtu_probe_acks_total", "result=\"withheld\""), 0.0);

    // A path other than /metrics is a 404, not an exposition.
    let (head, _) = get(&site.gw, addr, "/admin").expect("get");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[test]
fn sighup_reloads_timeouts_metrics_and_log_level_refuses_a_broken_file_and_never_stops_the_gateway() {
    require_root!();
    let site = Site::new(1, &[], Some(METRICS));
    // No RUST_LOG: `[log] level` (default "info") decides, and SIGHUP can change it.
    let mut gateway = site.gateway_logging(None);
    let _c0 = site.client(0);
    let pid = gateway.pid();
    let pings_ok = |site: &Site| {
        let (report, _) = site.report();
        report.totals.pings.iter().find(|r| r.result == "ok").map_or(0, |r| r.count)
    };
    assert!(wait_until(T, || pings_ok(&site) >= 1), "the client pings");
    assert!(
        !gateway.all_lines().iter().any(|l| l.contains("PingSession")),
        "PingSession is logged at debug: not shown at the default level"
    );
    let client_socket = site.logs.path().join("client0").join("client.sock");

    // A good change: a new idle timeout, the metrics on another port, a debug log level.
    site.set_config(|t| {
        t.replace("session_idle_timeout = \"3m\"", "session_idle_timeout = \"7s\"")
            .replace(METRICS, "127.0.0.1:9465")
            .replace("[metrics]", "[log]\nlevel = \"info,holdfast=debug\"\n\n[metrics]")
    });
    gateway.signal("HUP");
    let line = gateway.wait_for(&["SIGHUP:"], T);
    assert!(line.contains("session_idle_timeout 3m -> 7s"), "{line}");
    assert!(line.contains("metrics 127.0.0.1:9464 -> 127.0.0.1:9465"), "{line}");
    assert!(line.contains("[log] level info -> info,holdfast=debug"), "{line}");
    gateway.wait_for(&["PingSession"], T);
    assert!(gateway.is_alive() && gateway.pid() == pid, "same process");
    let (report, _) = site.report();
    assert_eq!(report.limits.idle_timeout_ms, 7_000);
    assert_eq!(report.pid, pid);
    assert!(scrape(&site.gw, "127.0.0.1:9465".parse().expect("addr")).is_ok(), "new address serves");
    assert!(scrape(&site.gw, METRICS.parse().expect("addr")).is_err(), "old address let go");

    // A broken file: refused, the running configuration stays.
    site.set_config(|t| t.replace("session_idle_timeout = \"7s\"", "session_idle_timeout = \"soon\""));
    gateway.signal("HUP");
    let line = gateway.wait_for(&["SIGHUP:"], T);
    assert!(line.contains("reload refused") && line.contains("session_idle_timeout"), "{line}");
    assert!(gateway.is_alive(), "a broken file never stops the gateway");
    assert_eq!(site.report().0.limits.idle_timeout_ms, 7_000, "old settings in force");

    // Still serving: the client stays Healthy and traffic flows.
    assert_eq!(site.clients[0].ping_count(GW_TUN, 3), 3);
    assert!(
        wait_until(T, || support::status_of(&client_socket).state == "Healthy"),
        "the client is Healthy after the reloads"
    );
    let before = pings_ok(&site);
    assert!(wait_until(T, || pings_ok(&site) > before), "the control plane keeps answering pings");
    assert_eq!(gateway.pid(), pid);
}
