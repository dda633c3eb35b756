//! Configuration parsing: the client file (`ClientFile::parse`), `gateway.toml`
//! (`GatewayConfig::parse`) and the client registry `clients.toml` (`Registry::parse`, which the
//! running gateway reloads whenever the file changes).
//!
//! These are operator input, not attacker input, but the spec's promise is that a client never
//! dies after start-up, so besides "never panics" the harnesses check that whatever a parser
//! accepts is usable by the code that consumes it:
//! - a client file reads back after `add-client`'s serialisation, its inline credentials load or
//!   fail cleanly, and the supervisor's timers built from its `[timing]` can be armed and its
//!   RPC deadlines sent, exactly as the client's driver does it;
//! - a gateway config is internally consistent, and `gateway init` with its values writes a file
//!   that reads back the same, with a server name the authority can certify;
//! - a registry's entries are consistent, survive being written back, and `add-client` can plan
//!   on it.

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use holdfast::config::client::ClientFile;
use holdfast::config::gateway::{GatewayConfig, InitialValues, Tunnel6, check_host_in, first_host, render_initial};
use holdfast::config::{ConfigError, exit};
use holdfast::gateway::registry::{ClientEntry, ClientState, Registry, RegistryError, check_name};
use holdfast::pki::{Authority, CertFingerprint};
use holdfast::sansio::supervisor::{AuthFailure, Effect, Event, PingFailure, Supervisor, Timings};
use holdfast::sansio::wire;
use holdfast::snapshot::VpnAuthResponse;
use ipnet::{Ipv4Net, Ipv6Net};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Where the harnesses pretend the files live (errors must name it).
const CLIENT_PATH: &str = "/etc/holdfast/client.toml";
const GATEWAY_PATH: &str = "/etc/holdfast/gateway.toml";
const REGISTRY_PATH: &str = "/etc/holdfast/clients.toml";
/// The registry target's gateway: `gateway init`'s defaults, as in the seeds.
const SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 24);
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const V6: Tunnel6 = Tunnel6 {
    subnet: Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0), 64),
    gateway_ip: Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1),
};

/// A config error must name its file and map to a configuration exit code.
fn assert_config_error(e: &ConfigError, path: &str) {
    let msg = e.to_string();
    assert!(msg.contains(path), "error does not name {path}: {msg}");
    assert!([exit::CONFIG_INVALID, exit::BAD_KEYS, exit::CONFIG_MISSING].contains(&e.exit_code()), "{e:?}");
}

/// Target `config_client`: any bytes as a client file.
pub fn config_client(data: &[u8]) {
    // `read_config_text` refuses non-UTF-8 before the parser sees anything.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new(CLIENT_PATH);
    let file = match ClientFile::parse(text, path) {
        Ok(f) => f,
        Err(e) => return assert_config_error(&e, CLIENT_PATH),
    };
    // `gateway add-client` writes client files with `toml::to_string` and insists on reading
    // them back; any file the parser accepts must survive the same trip unchanged.
    let written = toml::to_string(&file).expect("a parsed client file serialises");
    let again = ClientFile::parse(&written, path)
        .unwrap_or_else(|e| panic!("a valid client file does not read back once written: {e}"));
    assert_eq!(format!("{again:?}"), format!("{file:?}"), "the client file changed on a write and read");

    // Credentials: only when all three are inline, so the fuzzer never makes us read files.
    let tls = &file.tls;
    let inline = [&tls.gateway_ca_file, &tls.certificate_file, &tls.key_file].iter().all(|f| f.is_none());
    if inline && let Err(e) = file.credentials(path) {
        assert_config_error(&e, CLIENT_PATH);
    }
    if let Some(mtu) = file.network.underlay_mtu {
        let _ = wire::tun_mtu_for(mtu);
    }
    drive_supervisor(file.timings());
}

fn snapshot() -> Arc<VpnAuthResponse> {
    Arc::new(VpnAuthResponse { gateway_ip: GATEWAY_IP, ..VpnAuthResponse::fixture(1, [7; 32]) })
}

/// Runs the supervisor on `timings` through failures, backoff, success and health checks, and
/// does with each effect's time what the client's tokio shell does with it:
/// - `ArmTimer { at }`: `epoch + at` on a `tokio::time::Instant` (client/driver.rs);
/// - `Call* { deadline }`: `Request::set_timeout(deadline - now)` (client/control.rs).
///
/// A file the parser accepts must not make either panic: that would kill a running client.
fn drive_supervisor(timings: Timings) {
    let mut sup = Supervisor::new(timings);
    let mut rng = StdRng::seed_from_u64(0);
    let epoch = tokio::time::Instant::now();
    let mut now = Duration::ZERO;
    let mut events = VecDeque::from([Event::Started]);
    let mut armed = None;
    let (mut auths, mut pings) = (0u32, 0u32);
    // Two failed authentications (backoff doubles), success, then pings alternating failure and
    // success: every kind of timer the machine arms.
    for _ in 0..24 {
        let Some(event) = events.pop_front().or_else(|| {
            armed.take().map(|(at, timer)| {
                now = now.max(at);
                Event::TimerFired(timer)
            })
        }) else {
            break;
        };
        for effect in sup.handle(event, now, &mut rng) {
            match effect {
                Effect::CallAuthenticate { attempt, deadline } => {
                    tonic::Request::new(()).set_timeout(deadline.saturating_sub(now));
                    auths += 1;
                    events.push_back(if auths < 3 {
                        Event::AuthFailed { attempt, failure: AuthFailure::Unreachable }
                    } else {
                        Event::AuthSucceeded { attempt, auth: snapshot() }
                    });
                }
                Effect::CallPing { attempt, deadline, .. } => {
                    tonic::Request::new(()).set_timeout(deadline.saturating_sub(now));
                    pings += 1;
                    events.push_back(if pings % 2 == 1 {
                        Event::PingFailed { attempt, failure: PingFailure::TimedOut }
                    } else {
                        Event::PingSucceeded { attempt, rtt: Duration::from_millis(1) }
                    });
                }
                Effect::ArmTimer { at, timer } => {
                    let _fires_at = epoch + at;
                    armed = Some((at, timer));
                }
                Effect::CancelTimer => armed = None,
                _ => {}
            }
        }
    }
}

/// Target `config_gateway`: any bytes as `gateway.toml`, once in an absolute and once in a
/// relative directory.
pub fn config_gateway(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for path in [GATEWAY_PATH, "gateway.toml"] {
        match GatewayConfig::parse(text, Path::new(path)) {
            Ok(c) => check_gateway(&c, Path::new(path)),
            Err(e) => assert_config_error(&e, path),
        }
    }
}

/// The authority that certifies server names in `check_gateway` (key generation is the slow
/// part, so once per process).
fn authority() -> &'static Authority {
    static A: OnceLock<Authority> = OnceLock::new();
    A.get_or_init(|| Authority::generate("fuzz").expect("an authority for a plain name"))
}

fn check_gateway(c: &GatewayConfig, path: &Path) {
    assert!((8..=30).contains(&c.subnet.prefix_len()), "{}", c.subnet);
    assert_eq!(c.subnet, c.subnet.trunc(), "subnet with host bits");
    check_host_in(c.subnet, c.gateway_ip).expect("gateway_ip is a host of the subnet");
    assert!(c.endpoint.port() != 0 && !c.endpoint.ip().is_unspecified());
    check_name(&c.name).expect("the gateway name follows the naming rule");
    if path.is_absolute() {
        for p in [&c.ca_cert, &c.ca_key, &c.cert, &c.key, &c.registry, &c.clients_dir] {
            assert!(p.is_absolute(), "{} is relative", p.display());
        }
    }
    // `gateway init` with these values: the file it writes reads back as the same config.
    let v = InitialValues {
        name: c.name.clone(),
        endpoint: c.endpoint,
        subnet: c.subnet,
        subnet6: c.v6.map_or(V6.subnet, |v6| v6.subnet),
        server_name: c.server_name.clone(),
    };
    let back = GatewayConfig::parse(&render_initial(&v), path)
        .unwrap_or_else(|e| panic!("`gateway init` would write a file it cannot read: {e}"));
    assert_eq!(
        (&back.name, back.endpoint, back.subnet, &back.server_name, back.gateway_ip),
        (&c.name, c.endpoint, c.subnet, &c.server_name, first_host(c.subnet))
    );
    // `check_server_name` promises a name the authority can put in a certificate.
    if let Err(e) = authority().issue_server(&c.server_name, Some(c.endpoint.ip())) {
        panic!("server_name {:?} passed validation but cannot be certified: {e}", c.server_name);
    }
}

/// The registry file as `Registry::save` writes it (its own type is private): the entries as
/// `[[client]]` tables.
#[derive(serde::Serialize)]
struct RegistryFile<'a> {
    #[serde(rename = "client")]
    clients: &'a [ClientEntry],
}

/// Target `config_registry`: any bytes as `clients.toml` of a gateway on 100.64.0.0/24 and
/// fd00:64::/64.
pub fn config_registry(data: &[u8]) {
    let path = Path::new(REGISTRY_PATH);
    let reg = match Registry::parse(data, path, SUBNET, GATEWAY_IP, Some(V6)) {
        Ok(r) => r,
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, RegistryError::Malformed { .. }) && msg.contains(REGISTRY_PATH), "{msg}");
            return;
        }
    };
    let (mut names, mut ips, mut ip6s) = (HashSet::new(), HashSet::new(), HashSet::new());
    for c in reg.clients() {
        if let Some(ip6) = c.ip6 {
            assert!(ip6s.insert(ip6), "IPv6 address {ip6} twice");
            assert!(V6.subnet.contains(&ip6) && ip6 != V6.gateway_ip && ip6 != V6.subnet.network());
        }
        check_name(&c.name).expect("registered names follow the naming rule");
        assert!(names.insert(c.name.as_str()), "name {} twice", c.name);
        assert!(ips.insert(c.ip), "address {} twice", c.ip);
        check_host_in(SUBNET, c.ip).expect("addresses are hosts of the subnet");
        assert_ne!(c.ip, GATEWAY_IP);
        assert_eq!(CertFingerprint::from_hex(&c.cert_sha256.to_string()), Some(c.cert_sha256));
    }
    // Written back the way `save` does, it reads back the same.
    let text = toml::to_string(&RegistryFile { clients: reg.clients() }).expect("entries serialise");
    let again = Registry::parse(text.as_bytes(), path, SUBNET, GATEWAY_IP, Some(V6))
        .unwrap_or_else(|e| panic!("a valid registry does not read back once written: {e}"));
    assert_eq!(again.clients(), reg.clients());
    // What `add-client` would do next.
    match reg.plan_add("fuzz-new", None) {
        Ok(plan) => {
            assert!(!plan.reenable);
            assert!(plan.ip != GATEWAY_IP && !ips.contains(&plan.ip) && SUBNET.contains(&plan.ip));
            // A fresh IPv6 address too, in the subnet, taken by nobody (a /64 never fills here).
            let ip6 = plan.ip6.expect("a gateway with subnet6 gives an IPv6 address");
            assert!(V6.subnet.contains(&ip6) && ip6 != V6.gateway_ip && !ip6s.contains(&ip6));
        }
        Err(RegistryError::SubnetFull { .. }) => {
            assert!(reg.next_free().is_none());
            // 253 usable hosts in a /24 after the gateway.
            assert_eq!(ips.len(), 253, "subnet called full with {} clients", ips.len());
        }
        Err(e) => panic!("plan_add of a new valid name failed: {e}"),
    }
    for c in reg.clients() {
        match (c.state, reg.plan_add(&c.name, None)) {
            (ClientState::Active, Err(RegistryError::AlreadyActive { ip, .. })) => {
                assert_eq!(ip, c.ip)
            }
            (ClientState::Revoked, Ok(plan)) => assert!(plan.reenable && plan.ip == c.ip),
            (state, other) => panic!("plan_add({}) in state {state:?}: {other:?}", c.name),
        }
    }
}
