//! The gateway's config file, `DIR/gateway.toml`, written by `gateway init` and read by every other
//! `gateway` command.
//!
//! Every key and its default (only `endpoint` is required):
//!
//! ```toml
//! name = "holdfast"                   # this gateway's name, for logs and the authority's certificate
//! endpoint = "198.18.0.1:51820"       # REQUIRED. The address clients connect to: TCP control plane
//!                                     # and UDP data plane share the port number. Goes into client files.
//! listen = "[::]:51820"               # where the control and data planes listen; default
//!                                     # [::]:<endpoint port> (one dual-stack socket). An IPv4
//!                                     # `listen` with an IPv6 `endpoint` is refused.
//! subnet = "100.64.0.0/24"            # the tunnel subnet (IPv4, prefix /8 to /30, no host bits set)
//! gateway_ip = "100.64.0.1"           # the gateway's tunnel address; default: first host of `subnet`
//! subnet6 = "fd12:3456:789a:1::/64"   # the IPv6 tunnel subnet (/48 to /120); `gateway init` picks a
//!                                     # random RFC 4193 ULA /64. Missing (a dir from before IPv6):
//!                                     # `gateway run`/`add-client` pick one and write it here.
//! gateway_ip6 = "fd12:3456:789a:1::1" # the gateway's IPv6 tunnel address; default: first host
//! server_name = "holdfast-gateway"    # the DNS name (or IP) in the gateway's TLS certificate
//! ca_cert = "ca.pem"                  # the authority's certificate (paths relative to this file's dir)
//! ca_key = "ca.key"                   # the authority's private key (mode 0600)
//! cert = "server.pem"                 # the gateway's TLS certificate, signed by the authority
//! key = "server.key"                  # the gateway's TLS private key (mode 0600)
//! registry = "clients.toml"           # the client registry, rewritten atomically by add-client/revoke
//! # Or, for several gateways on one shared registry in PostgreSQL, instead of `registry`:
//! #   e.g. database = "postgres://holdfast@localhost/holdfast?host=/run/postgresql"
//! clients_dir = "clients"             # where add-client writes client files by default
//! session_idle_timeout = "3m"         # a session neither pinged nor carrying traffic this long expires
//! session_max_lifetime = "24h"        # a session expires this long after Authenticate, used or not
//! reauth_grace = "10s"                # a replaced session stays valid this long (packets in flight)
//! handshake_timeout = "10s"           # a TLS handshake not finished in this time is dropped
//! status_socket = "gateway.sock"      # `gateway status` asks here (mode 0600; relative to this dir)
//!
//! [nat]                               # masquerading of client traffic out of the uplink (nftables)
//! enabled = false
//! uplink = ""                         # the uplink interface, required when enabled
//!
//! [dns]                             # the resolver on the tunnel address(es), pushed to clients
//! enabled = true
//! upstreams = ["198.18.1.2"]          # default: the nameservers of this host's /etc/resolv.conf
//! timeout = "2s"                      # no upstream answer in this time: SERVFAIL (100ms to 30s)
//! rate_limit = 100                    # queries per second per client (bursts of twice that)
//! search_domains = []                 # pushed to clients with the servers, e.g. ["corp.example"]
//!
//! [dataplane]
//! offload = true                      # TUN offload (TSO/GRO): 64 KiB reads, merged writes
//! coalesce_writes = true              # merge TCP segments written to the TUN device (needs offload)
//!
//! [metrics]                           # Prometheus text exposition over HTTP, at /metrics
//! enabled = false                     # default: on when `listen` is given, else off
//! listen = "127.0.0.1:9464"           # a non-loopback address is allowed (with a warning)
//!
//! [log]
//! level = "info"                      # a tracing filter, e.g. "info,holdfast=debug"; RUST_LOG wins
//! ```
//!
//! Durations are humantime strings ("90s", "3m", "1h 30m").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// File name of the gateway's config inside its directory.
pub const GATEWAY_FILE: &str = "gateway.toml";

/// Default tunnel subnet: the start of the shared address space (RFC 6598), rarely used on LANs.
/// (`new_assert` runs at compile time here, so it cannot panic at run time.)
pub const DEFAULT_SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 24);
/// Default TLS server name of the gateway.
pub const DEFAULT_SERVER_NAME: &str = "holdfast-gateway";
/// Default gateway name.
pub const DEFAULT_NAME: &str = "holdfast";
/// Default status socket, relative to the gateway's directory: one per gateway however many run
/// on a machine (names need not differ), and in the one folder a hardened unit may write to.
pub const DEFAULT_STATUS_SOCKET: &str = "gateway.sock";
/// Default `[log] level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default metrics address: loopback, the port commonly used for a VPN exporter.
pub const DEFAULT_METRICS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);
/// The longest socket path Linux accepts (`sun_path` is 108 bytes with its NUL), less room for
/// the temporary name the socket is bound under before it is renamed into place.
const MAX_SOCKET_PATH: usize = 107 - 16;

const DEFAULT_IDLE: Duration = Duration::from_secs(180);
const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);

/// Upper bound on every duration: keeps millisecond arithmetic far from overflow and catches a
/// unit typo ("24d" for "24h" is fine; "24y" is not).
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// The file as written (serde), before defaults that depend on other keys are resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayFile {
    #[serde(default = "default_name")]
    name: String,
    endpoint: SocketAddr,
    #[serde(default)]
    listen: Option<SocketAddr>,
    #[serde(default = "default_subnet")]
    subnet: Ipv4Net,
    #[serde(default)]
    gateway_ip: Option<Ipv4Addr>,
    #[serde(default)]
    subnet6: Option<Ipv6Net>,
    #[serde(default)]
    gateway_ip6: Option<Ipv6Addr>,
    #[serde(default = "default_server_name")]
    server_name: String,
    #[serde(default = "default_ca_cert")]
    ca_cert: PathBuf,
    #[serde(default = "default_ca_key")]
    ca_key: PathBuf,
    #[serde(default = "default_cert")]
    cert: PathBuf,
    #[serde(default = "default_key")]
    key: PathBuf,
    #[serde(default)]
    registry: Option<PathBuf>,
    #[serde(default)]
    database: Option<String>,
    #[serde(default = "default_clients_dir")]
    clients_dir: PathBuf,
    #[serde(default = "default_idle", with = "humantime_serde")]
    session_idle_timeout: Duration,
    #[serde(default = "default_max_lifetime", with = "humantime_serde")]
    session_max_lifetime: Duration,
    #[serde(default = "default_grace", with = "humantime_serde")]
    reauth_grace: Duration,
    #[serde(default = "default_handshake", with = "humantime_serde")]
    handshake_timeout: Duration,
    #[serde(default)]
    nat: NatSection,
    #[serde(default)]
    dataplane: DataPlaneSection,
    #[serde(default)]
    dns: DnsSection,
    #[serde(default = "default_status_socket")]
    status_socket: PathBuf,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    log: LogSection,
}

/// `[log]` as written. The gateway logs to stderr (the journal), so only the level is here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    /// A tracing filter. Default "info".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    level: Option<String>,
}

fn default_name() -> String {
    DEFAULT_NAME.into()
}
fn default_subnet() -> Ipv4Net {
    DEFAULT_SUBNET
}
fn default_server_name() -> String {
    DEFAULT_SERVER_NAME.into()
}
fn default_ca_cert() -> PathBuf {
    "ca.pem".into()
}
fn default_ca_key() -> PathBuf {
    "ca.key".into()
}
fn default_cert() -> PathBuf {
    "server.pem".into()
}
fn default_key() -> PathBuf {
    "server.key".into()
}
fn default_registry() -> PathBuf {
    "clients.toml".into()
}
fn default_clients_dir() -> PathBuf {
    "clients".into()
}
fn default_status_socket() -> PathBuf {
    DEFAULT_STATUS_SOCKET.into()
}
fn default_idle() -> Duration {
    DEFAULT_IDLE
}
fn default_max_lifetime() -> Duration {
    DEFAULT_MAX_LIFETIME
}
fn default_grace() -> Duration {
    DEFAULT_GRACE
}
fn default_handshake() -> Duration {
    DEFAULT_HANDSHAKE
}

/// `[nat]`: outbound masquerading of client traffic (one nftables table the gateway owns, see
/// `gateway::dataplane`); a change needs a restart (`gateway::reload`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// Masquerade client traffic leaving through `uplink`. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// The uplink interface name. Default empty; required when `enabled`.
    #[serde(default)]
    pub uplink: String,
}

/// Default `[dns] timeout`: a healthy upstream answers in milliseconds, a recursive lookup of a
/// slow zone in well under a second; glibc's own retry comes after 5 s, so the SERVFAIL arrives
/// before the client gives up on us.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `[dns] rate_limit` (queries per second per client): a browser opening a busy page
/// makes a few dozen lookups at once; the burst (twice the rate) covers that.
pub const DEFAULT_DNS_RATE: u32 = 100;
const DNS_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));
const DNS_RATE_MAX: u32 = 100_000;

/// `[dns]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstreams: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    search_domains: Vec<String>,
}

/// `[dns]` with its defaults applied: the gateway's resolver on its tunnel address(es).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Run the resolver and push it to clients. Default true.
    pub enabled: bool,
    /// Where queries go; `None`: the nameservers of the host's `/etc/resolv.conf`, read when the
    /// gateway starts.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// No answer from any upstream within this time: SERVFAIL.
    pub timeout: Duration,
    /// Queries per second per client (bursts of twice that).
    pub rate_limit: u32,
    /// Search domains pushed to clients with the servers.
    pub search_domains: Vec<String>,
}

/// Parses an upstream: `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let addr = s
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .or_else(|_| s.parse::<SocketAddr>())
        .map_err(|_| format!("{s:?} is not an address (IP or IP:PORT)"))?;
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
        return Err(format!("{s:?} is not a unicast address and port"));
    }
    Ok(addr)
}

impl DnsSection {
    fn resolve(&self, own: &[IpAddr]) -> Result<DnsSettings, String> {
        let timeout = self.timeout.unwrap_or(DEFAULT_DNS_TIMEOUT);
        if timeout < DNS_TIMEOUT_RANGE.0 || timeout > DNS_TIMEOUT_RANGE.1 {
            return Err(format!(
                "[dns] `timeout` = {} is out of range (100ms to 30s)",
                humantime::format_duration(timeout)
            ));
        }
        let rate_limit = self.rate_limit.unwrap_or(DEFAULT_DNS_RATE);
        if !(1..=DNS_RATE_MAX).contains(&rate_limit) {
            return Err(format!(
                "[dns] `rate_limit` = {rate_limit} is out of range (1 to {DNS_RATE_MAX} queries per second)"
            ));
        }
        let upstreams = match &self.upstreams {
            None => None,
            Some(list) => {
                if list.is_empty() || list.len() > super::MAX_DNS_SERVERS {
                    return Err(format!(
                        "[dns] `upstreams` needs 1 to {} addresses (leave it out to use this host's /etc/resolv.conf)",
                        super::MAX_DNS_SERVERS
                    ));
                }
                let mut out = Vec::with_capacity(list.len());
                for s in list {
                    let a = parse_upstream(s).map_err(|r| format!("[dns] `upstreams`: {r}"))?;
                    check_not_own(a, own).map_err(|r| format!("[dns] `upstreams`: {r}"))?;
                    out.push(a);
                }
                Some(out)
            }
        };
        if self.search_domains.len() > super::MAX_SEARCH_DOMAINS {
            return Err(format!(
                "[dns] `search_domains` has {} entries; at most {}",
                self.search_domains.len(),
                super::MAX_SEARCH_DOMAINS
            ));
        }
        for d in &self.search_domains {
            super::check_search_domain(d).map_err(|r| format!("[dns] `search_domains`: {r}"))?;
        }
        Ok(DnsSettings {
            enabled: self.enabled.unwrap_or(true),
            upstreams,
            timeout,
            rate_limit,
            search_domains: self.search_domains.clone(),
        })
    }
}

/// Refuses an upstream that is one of the gateway's own tunnel addresses (the resolver would ask
/// itself, forever).
pub fn check_not_own(upstream: SocketAddr, own: &[IpAddr]) -> Result<(), String> {
    if own.contains(&upstream.ip()) {
        return Err(format!("{upstream} is this gateway's own tunnel address (the resolver would forward to itself)"));
    }
    Ok(())
}

/// `[dataplane]` as written: how the data plane talks to its TUN device. Both default to on,
/// the fastest setting; they exist to turn offload off on a kernel where it misbehaves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataPlaneSection {
    /// TUN offload: 64 KiB TSO reads split in user space, and merged writes. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offload: Option<bool>,
    /// Merge consecutive TCP segments into large packets when writing to the TUN device.
    /// Default true when offload is on; needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    coalesce_writes: Option<bool>,
}

/// `[metrics]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    /// Serve metrics. Default: on when `listen` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    /// Where to serve them. Default 127.0.0.1:9464.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
}

/// `[metrics]` resolved: where the metrics endpoint listens, if it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSettings {
    /// `None`: off (the default; nothing listens).
    pub listen: Option<SocketAddr>,
}

/// `[dataplane]` with its defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlaneSettings {
    /// TUN offload: 64 KiB TSO reads split in user space, and merged writes.
    pub offload: bool,
    /// Merge TCP segments written to the TUN device; never on without `offload`.
    pub coalesce_writes: bool,
}

impl DataPlaneSection {
    /// The defaults applied: offload on; merging on whenever offload is, unless turned off.
    fn resolve(&self) -> DataPlaneSettings {
        let offload = self.offload.unwrap_or(true);
        DataPlaneSettings { offload, coalesce_writes: offload && self.coalesce_writes.unwrap_or(true) }
    }
}

/// The gateway's configuration, validated, with every default resolved and every path absolute
/// (or relative to the working directory if the config dir was given relative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The directory holding `gateway.toml`.
    pub dir: PathBuf,
    pub name: String,
    pub endpoint: SocketAddr,
    pub listen: SocketAddr,
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    /// The IPv6 tunnel plan; `None` only for a directory written before IPv6 (see
    /// [`upgrade_text`]: the commands that serve or add clients give it one first).
    pub v6: Option<Tunnel6>,
    pub server_name: String,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The registry file (used when `database` is not set).
    pub registry: PathBuf,
    /// The shared registry's PostgreSQL URL, when the registry lives in a database (see
    /// `gateway::registry::RegistryStore`, the one place that picks the store).
    pub database: Option<String>,
    pub clients_dir: PathBuf,
    pub session_idle_timeout: Duration,
    pub session_max_lifetime: Duration,
    pub reauth_grace: Duration,
    pub handshake_timeout: Duration,
    pub nat: NatSection,
    pub dataplane: DataPlaneSettings,
    pub dns: DnsSettings,
    /// Where `gateway status` finds the running gateway (absolute, or relative to the working
    /// directory like every other path here).
    pub status_socket: PathBuf,
    pub metrics: MetricsSettings,
    /// `[log] level`: the tracing filter (`RUST_LOG`, when set, wins over it).
    pub log_level: String,
}

impl GatewayConfig {
    /// Loads `DIR/gateway.toml`.
    pub fn load_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::load(&dir.join(GATEWAY_FILE))
    }

    /// Loads and validates a gateway config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = super::read_config_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawGatewayFile = toml::from_str(text)
            .map_err(|e| ConfigError::Malformed { path: path.to_owned(), reason: super::toml_reason(text, &e) })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        resolve(raw, dir).map_err(|reason| ConfigError::Malformed { path: path.to_owned(), reason })
    }

    /// The prefix length of the tunnel subnet.
    pub fn prefix_len(&self) -> u8 {
        self.subnet.prefix_len()
    }
}

fn resolve(raw: RawGatewayFile, dir: PathBuf) -> Result<GatewayConfig, String> {
    super::check_name(&raw.name).map_err(|r| format!("`name`: {r}"))?;
    if raw.endpoint.port() == 0 {
        return Err(format!("`endpoint` {} needs a port (clients connect to it)", raw.endpoint));
    }
    if raw.endpoint.ip().is_unspecified() {
        return Err(format!(
            "`endpoint` {} is not an address clients can reach; use the gateway's public address",
            raw.endpoint
        ));
    }
    let subnet = check_subnet(raw.subnet)?;
    let gateway_ip = match raw.gateway_ip {
        Some(ip) => {
            check_host_in(subnet, ip).map_err(|r| format!("`gateway_ip` {ip}: {r}"))?;
            ip
        }
        None => first_host(subnet),
    };
    if let Some(listen) = raw.listen {
        // A socket bound to an IPv4 address never sees an IPv6 client (and the reverse, but for
        // `[::]`, which takes both): clients would sit in Backoff with "connection refused".
        let reachable =
            listen.is_ipv4() == raw.endpoint.is_ipv4() || (listen.is_ipv6() && listen.ip().is_unspecified());
        if !reachable {
            return Err(format!(
                "`listen` {listen} cannot receive clients connecting to `endpoint` {} (another \
                 address family); use [::]:{} or an address of the endpoint's family",
                raw.endpoint,
                listen.port()
            ));
        }
    }
    let v6 = match (raw.subnet6, raw.gateway_ip6) {
        (Some(subnet6), gw6) => {
            let subnet = check_subnet6(subnet6)?;
            let gateway_ip = match gw6 {
                Some(ip) => {
                    check_host6_in(subnet, ip).map_err(|r| format!("`gateway_ip6` {ip}: {r}"))?;
                    ip
                }
                None => first_host6(subnet),
            };
            Some(Tunnel6 { subnet, gateway_ip })
        }
        (None, Some(_)) => return Err("`gateway_ip6` needs `subnet6`".into()),
        (None, None) => None,
    };
    check_server_name(&raw.server_name)?;
    let durations = [
        ("session_idle_timeout", raw.session_idle_timeout, Duration::from_secs(1)),
        ("session_max_lifetime", raw.session_max_lifetime, Duration::from_secs(1)),
        ("reauth_grace", raw.reauth_grace, Duration::ZERO),
        ("handshake_timeout", raw.handshake_timeout, Duration::from_millis(100)),
    ];
    for (key, value, min) in durations {
        if value < min || value > MAX_DURATION {
            return Err(format!(
                "`{key}` = {} is out of range ({} to {})",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(MAX_DURATION)
            ));
        }
    }
    check_nat(&raw.nat)?;
    if raw.dataplane.coalesce_writes == Some(true) && raw.dataplane.offload == Some(false) {
        return Err("[dataplane] coalesce_writes = true needs offload = true (merged packets go \
                    to the TUN device with a virtio-net header)"
            .into());
    }
    let dns = raw.dns.resolve(&[IpAddr::V4(gateway_ip)])?;
    let metrics = check_metrics(&raw.metrics, raw.listen, raw.endpoint)?;
    let log_level = raw.log.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into());
    crate::logging::check_filter(&log_level)
        .map_err(|e| format!("[log] `level` '{log_level}' is not a valid filter: {e}"))?;
    if let Some(url) = &raw.database {
        if raw.registry.is_some() {
            return Err("`registry` and `database` are both set: the registry lives either in a \
                        file or in the database; remove one"
                .into());
        }
        check_database_url(url).map_err(|r| format!("`database`: {r}"))?;
    }
    let abs = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
    let status_socket = abs(raw.status_socket);
    if status_socket.as_os_str().len() > MAX_SOCKET_PATH || status_socket.file_name().is_none() {
        return Err(format!(
            "`status_socket` {} is not a usable socket path (a file name, at most {MAX_SOCKET_PATH} bytes)",
            status_socket.display()
        ));
    }
    Ok(GatewayConfig {
        name: raw.name,
        endpoint: raw.endpoint,
        listen: raw.listen.unwrap_or_else(|| default_listen(raw.endpoint)),
        subnet,
        gateway_ip,
        v6,
        server_name: raw.server_name,
        ca_cert: abs(raw.ca_cert),
        ca_key: abs(raw.ca_key),
        cert: abs(raw.cert),
        key: abs(raw.key),
        registry: abs(raw.registry.unwrap_or_else(default_registry)),
        database: raw.database,
        clients_dir: abs(raw.clients_dir),
        session_idle_timeout: raw.session_idle_timeout,
        session_max_lifetime: raw.session_max_lifetime,
        reauth_grace: raw.reauth_grace,
        handshake_timeout: raw.handshake_timeout,
        nat: raw.nat,
        dataplane: raw.dataplane.resolve(),
        dns,
        status_socket,
        metrics,
        log_level,
        dir,
    })
}

/// Checks a tunnel subnet: prefix /8 to /30 (room for the gateway and at least one client, and
/// not absurdly large), written as its network address.
pub fn check_subnet(subnet: Ipv4Net) -> Result<Ipv4Net, String> {
    if !(8..=30).contains(&subnet.prefix_len()) {
        return Err(format!("`subnet` {subnet}: the prefix must be /8 to /30"));
    }
    if subnet.addr() != subnet.network() {
        return Err(format!("`subnet` {subnet} has host bits set; did you mean {}?", subnet.trunc()));
    }
    Ok(subnet)
}

/// The first usable host of a subnet (the network address + 1): the gateway's default address.
pub fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
}

/// Checks that `ip` is a usable host address of `subnet` (inside it, neither the network nor the
/// broadcast address).
pub fn check_host_in(subnet: Ipv4Net, ip: Ipv4Addr) -> Result<(), String> {
    if !subnet.contains(&ip) {
        return Err(format!("outside the subnet {subnet}"));
    }
    if ip == subnet.network() {
        return Err(format!("the network address of {subnet}"));
    }
    if ip == subnet.broadcast() {
        return Err(format!("the broadcast address of {subnet}"));
    }
    Ok(())
}

/// The IPv6 side of the tunnel plan: the subnet clients get their IPv6 addresses from and the
/// gateway's own address in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel6 {
    pub subnet: Ipv6Net,
    pub gateway_ip: Ipv6Addr,
}

/// Where a gateway listens by default: `[::]` (one dual-stack socket takes IPv4 and IPv6 clients)
/// on the endpoint's port. An operator whose host has IPv6 turned off sets `listen` explicitly.
pub fn default_listen(endpoint: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), endpoint.port())
}

/// Checks an IPv6 tunnel subnet: prefix /48 to /120 (a /64 is the norm; longer ones are for
/// operators who carve a small range out of a routed prefix), written as its network address.
pub fn check_subnet6(subnet: Ipv6Net) -> Result<Ipv6Net, String> {
    if !(48..=120).contains(&subnet.prefix_len()) {
        return Err(format!("`subnet6` {subnet}: the prefix must be /48 to /120"));
    }
    if subnet.addr() != subnet.network() {
        return Err(format!("`subnet6` {subnet} has host bits set; did you mean {}?", subnet.trunc()));
    }
    if subnet.addr().is_multicast() || subnet.addr().is_loopback() || subnet.addr().is_unspecified() {
        return Err(format!("`subnet6` {subnet} is not a unicast range"));
    }
    Ok(subnet)
}

/// The first host of an IPv6 subnet (network + 1): the gateway's default IPv6 address. (The
/// network address itself is the subnet-router anycast address, never a host's.)
pub fn first_host6(subnet: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()).saturating_add(1))
}

/// Checks that `ip` is a usable host address of `subnet` (inside it, not the subnet-router
/// anycast address).
pub fn check_host6_in(subnet: Ipv6Net, ip: Ipv6Addr) -> Result<(), String> {
    if !subnet.contains(&ip) {
        return Err(format!("outside the subnet {subnet}"));
    }
    if ip == subnet.network() {
        return Err(format!("the subnet-router anycast address of {subnet}"));
    }
    Ok(())
}

/// A random RFC 4193 unique local /64: `fd` + a 40-bit global id + subnet id 0. `random` gives
/// the 40 bits (the caller's RNG: this module does no IO).
pub fn random_ula64(random: [u8; 5]) -> Ipv6Net {
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[1..6].copy_from_slice(&random);
    // new_assert cannot fail: 64 is a valid IPv6 prefix length.
    Ipv6Net::new_assert(Ipv6Addr::from(o), 64)
}

/// The in-place upgrade of a `gateway.toml` written before IPv6: the same text with a
/// `subnet6 = "<subnet>"` line (and a comment) inserted before the first table, so it stays a
/// top-level key and the operator's layout and comments are kept. `None` if the file already has
/// `subnet6`.
pub fn upgrade_text(text: &str, subnet6: Ipv6Net) -> Option<String> {
    let parsed: toml::Table = toml::from_str(text).ok()?;
    if parsed.contains_key("subnet6") {
        return None;
    }
    let insert = format!(
        "# The IPv6 tunnel subnet, added when this gateway was upgraded to dual stack.\n\
         subnet6 = \"{subnet6}\"\n"
    );
    // The first line that opens a table ends the top level. A `[` inside a multi-line string
    // cannot start a line in the files we write, and the result is parsed back by the caller.
    let mut at = text.len();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            at = offset;
            break;
        }
        offset += line.len();
    }
    let mut out = String::with_capacity(text.len() + insert.len() + 1);
    out.push_str(&text[..at]);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&insert);
    out.push_str(&text[at..]);
    Some(out)
}

/// Checks that a server name is something a TLS client can verify (a DNS name or an IP address)
/// and that rcgen can put in a certificate.
pub fn check_server_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && rustls::pki_types::ServerName::try_from(name).is_ok()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
    if ok { Ok(()) } else { Err(format!("`server_name` '{name}' is not a valid DNS name or IP address")) }
}

/// Resolves `[metrics]`: on when enabled, or when `listen` is given and `enabled` is not. The
/// address needs a port and must not be the control plane's own TCP port.
fn check_metrics(
    m: &MetricsSection,
    control_listen: Option<SocketAddr>,
    endpoint: SocketAddr,
) -> Result<MetricsSettings, String> {
    let on = m.enabled.unwrap_or(m.listen.is_some());
    let addr = m.listen.unwrap_or(DEFAULT_METRICS_LISTEN);
    if !on {
        return Ok(MetricsSettings { listen: None });
    }
    if addr.port() == 0 {
        return Err(format!("[metrics] `listen` {addr} needs a port (scrapers connect to it)"));
    }
    let control = control_listen.unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), endpoint.port()));
    let overlaps = addr.ip() == control.ip() || addr.ip().is_unspecified() || control.ip().is_unspecified();
    if addr.port() == control.port() && overlaps {
        return Err(format!(
            "[metrics] `listen` {addr} is the control plane's own port ({control}); choose another port"
        ));
    }
    Ok(MetricsSettings { listen: Some(addr) })
}

fn check_nat(nat: &NatSection) -> Result<(), String> {
    if nat.enabled && nat.uplink.is_empty() {
        return Err("[nat] enabled = true needs `uplink` (the uplink interface)".into());
    }
    let bad_char = |c: char| c == '/' || c.is_whitespace() || c.is_control();
    if nat.uplink.len() > MAX_IFNAME || nat.uplink.contains(bad_char) {
        return Err(format!("[nat] `uplink` '{}' is not a valid interface name", nat.uplink));
    }
    Ok(())
}

/// Checks the form of `database` (the connection itself is tried by the store, which names the
/// problem: unreachable, credentials, schema).
pub fn check_database_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("not a PostgreSQL URL (postgres://USER@HOST/DB, or postgres://USER@/DB?host=/SOCKET/DIR)".into());
    }
    Ok(())
}

/// A database URL fit for a log line or an error: any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The values `gateway init` chooses; everything else is left at its documented default.
#[derive(Debug, Clone)]
pub struct InitialValues {
    pub name: String,
    pub endpoint: SocketAddr,
    pub subnet: Ipv4Net,
    pub subnet6: Ipv6Net,
    pub server_name: String,
}

/// Renders the `gateway.toml` that `gateway init` writes: the chosen values plus every other key
/// at its default, commented, so the operator sees what can be tuned.
pub fn render_initial(v: &InitialValues) -> String {
    render_with(v, &SharedValues::default())
}

/// What a gateway of a deployment with a shared registry adds to [`InitialValues`]: the
/// database, and (for `gateway join`) the deployment's tunnel address when it is not the
/// subnet's first host.
#[derive(Debug, Clone, Default)]
pub struct SharedValues {
    pub database: Option<String>,
    pub gateway_ip: Option<Ipv4Addr>,
    /// The deployment's IPv6 tunnel address, for `gateway join` (default: first host of subnet6).
    pub gateway_ip6: Option<Ipv6Addr>,
}

/// [`render_initial`] with the shared-registry keys: `database` replaces `registry`.
pub fn render_with(v: &InitialValues, shared: &SharedValues) -> String {
    // toml's own string encoding, so any value round-trips whatever it contains.
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let registry = match &shared.database {
        Some(url) => format!(
            "# The shared client registry of this deployment (every gateway of it names the same).\n\
             database = {}",
            q(url)
        ),
        None => "registry = \"clients.toml\"".to_owned(),
    };
    let gateway_ip = shared.gateway_ip.unwrap_or_else(|| first_host(v.subnet));
    format!(
        "# Holdfast gateway configuration. Paths are relative to this file's directory.\n\
         # Every key but `endpoint` is optional; the values shown are the defaults.\n\
         \n\
         # This gateway's name (logs, the authority's certificate).\n\
         name = {name}\n\
         # The address clients connect to (TCP control plane, UDP data plane; same port).\n\
         endpoint = {endpoint}\n\
         # Where the control and data planes listen. Default: [::]:<endpoint port> (dual-stack).\n\
         # listen = {listen}\n\
         # The tunnel subnet; the gateway takes `gateway_ip` (default: its first host).\n\
         subnet = {subnet}\n\
         gateway_ip = {gateway_ip}\n\
         # The IPv6 tunnel subnet (a random RFC 4193 ULA /64 chosen at init) and the gateway's\n\
         # IPv6 tunnel address (default: its first host).\n\
         subnet6 = {subnet6}\n\
         gateway_ip6 = {gateway_ip6}\n\
         # The name in the gateway's TLS certificate; clients check it.\n\
         server_name = {server_name}\n\
         \n\
         ca_cert = \"ca.pem\"\n\
         ca_key = \"ca.key\"\n\
         cert = \"server.pem\"\n\
         key = \"server.key\"\n\
         {registry}\n\
         clients_dir = \"clients\"\n\
         \n\
         # A session not pinged for this long expires (clients ping every 15-30 s).\n\
         session_idle_timeout = \"{idle}\"\n\
         # A session expires this long after it was opened; the client then re-authenticates.\n\
         session_max_lifetime = \"{life}\"\n\
         # After a re-authentication the previous session stays valid this long.\n\
         reauth_grace = \"{grace}\"\n\
         # A TLS handshake on the control port must finish within this time.\n\
         handshake_timeout = \"{handshake}\"\n\
         # `holdfast gateway status` asks the running gateway on this socket (mode 0600).\n\
         # status_socket = \"gateway.sock\"\n\
         \n\
         [nat]\n\
         enabled = false\n\
         uplink = \"\"\n\
         \n\
         # The resolver clients use while connected: answers on the tunnel address, only to\n\
         # clients with a live session, and is pushed to them when they connect.\n\
         [dns]\n\
         enabled = true\n\
         # Where it forwards to. Default: the nameservers of this host's /etc/resolv.conf.\n\
         # upstreams = [\"198.18.1.2\", \"198.18.1.3:5353\"]\n\
         # timeout = \"2s\"          # no upstream answer: SERVFAIL after this long\n\
         # rate_limit = 100          # queries per second per client\n\
         # search_domains = []       # pushed to clients, e.g. [\"corp.example\"]\n\
         \n\
         # Prometheus metrics at http://LISTEN/metrics; off unless `listen` is set.\n\
         [metrics]\n\
         # listen = \"127.0.0.1:9464\"\n",
        name = q(&v.name),
        endpoint = q(&v.endpoint.to_string()),
        listen = q(&default_listen(v.endpoint).to_string()),
        subnet = q(&v.subnet.to_string()),
        gateway_ip = q(&gateway_ip.to_string()),
        subnet6 = q(&v.subnet6.to_string()),
        gateway_ip6 = q(&shared.gateway_ip6.unwrap_or_else(|| first_host6(v.subnet6)).to_string()),
        server_name = q(&v.server_name),
        // Written the way an operator would (humantime would print "1day" for 24h); the test
        // `rendered_initial_file_parses_back` checks they equal the defaults.
        idle = "3m",
        life = "24h",
        grace = "10s",
        handshake = "10s",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(text, Path::new("/etc/hf/gateway.toml"))
    }

    fn reason(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Malformed { reason, .. }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn minimal_file_takes_every_default() {
        let c = parse("endpoint = \"198.18.0.1:51820\"").unwrap();
        assert_eq!(c.name, "holdfast");
        assert_eq!(c.listen, "[::]:51820".parse().unwrap());
        assert_eq!(c.v6, None);
        assert_eq!(c.subnet.to_string(), "100.64.0.0/24");
        assert_eq!(c.gateway_ip, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(c.server_name, "holdfast-gateway");
        assert_eq!(c.ca_key, PathBuf::from("/etc/hf/ca.key"));
        assert_eq!(c.registry, PathBuf::from("/etc/hf/clients.toml"));
        assert_eq!(c.session_idle_timeout, Duration::from_secs(180));
        assert_eq!(c.session_max_lifetime, Duration::from_secs(86400));
        assert_eq!(c.reauth_grace, Duration::from_secs(10));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.nat, NatSection::default());
        assert_eq!(c.dataplane, DataPlaneSettings { offload: true, coalesce_writes: true });
        assert_eq!(
            c.dns,
            DnsSettings {
                enabled: true,
                upstreams: None,
                timeout: DEFAULT_DNS_TIMEOUT,
                rate_limit: DEFAULT_DNS_RATE,
                search_domains: vec![],
            }
        );
        assert_eq!(c.status_socket, PathBuf::from("/etc/hf/gateway.sock"));
        assert_eq!(c.metrics, MetricsSettings { listen: None }, "metrics are off by default");
    }

    #[test]
    fn dns_keys_parse() {
        let c = parse(
            "endpoint = \"198.18.0.1:51820\"\n[dns]\nenabled = false\n\
             upstreams = [\"198.18.1.2\", \"198.18.1.3:5353\", \"2001:db8::53\", \"[2001:db8::54]:5353\"]\n\
             timeout = \"500ms\"\nrate_limit = 7\nsearch_domains = [\"corp.example\"]",
        )
        .unwrap();
        assert!(!c.dns.enabled);
        let ups: Vec<String> = c.dns.upstreams.unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(ups, ["198.18.1.2:53", "198.18.1.3:5353", "[2001:db8::53]:53", "[2001:db8::54]:5353"]);
        assert_eq!(c.dns.timeout, Duration::from_millis(500));
        assert_eq!(c.dns.rate_limit, 7);
        assert_eq!(c.dns.search_domains, ["corp.example"]);
    }

    #[test]
    fn metrics_are_on_when_asked_for_and_bad_values_name_the_key() {
        let ep = "endpoint = \"198.18.0.1:51820\"\n";
        let listen = |extra: &str| parse(&format!("{ep}{extra}")).unwrap().metrics.listen;
        assert_eq!(listen("[metrics]\nenabled = true"), Some(DEFAULT_METRICS_LISTEN));
        assert_eq!(
            listen("[metrics]\nlisten = \"127.0.0.1:9500\""),
            Some("127.0.0.1:9500".parse().unwrap()),
            "a listen address alone turns them on"
        );
        assert_eq!(listen("[metrics]\nenabled = false\nlisten = \"127.0.0.1:9500\""), None);
        assert_eq!(
            listen("[metrics]\nlisten = \"0.0.0.0:9464\""),
            Some("0.0.0.0:9464".parse().unwrap()),
            "non-loopback is allowed (gateway run warns)"
        );
        assert!(reason(&format!("{ep}[metrics]\nlisten = \"127.0.0.1:0\"")).contains("[metrics] `listen`"));
        assert!(reason(&format!("{ep}[metrics]\nlisten = \"127.0.0.1:51820\"")).contains("control plane's own port"));
        assert!(reason(&format!("{ep}[metrics]\nlisten = \"nope\"")).contains("listen"));
        assert!(reason(&format!("{ep}[metrics]\nport = 1")).contains("unknown field `port`"));
        assert!(reason(&format!("{ep}[log]\nlevel = \"holdfast=loud\"")).contains("[log] `level`"));
        assert_eq!(
            parse(&format!("{ep}[log]\nlevel = \"info,holdfast=debug\"")).unwrap().log_level,
            "info,holdfast=debug"
        );
        let long = format!("status_socket = \"/{}\"\n{ep}", "x".repeat(120));
        assert!(reason(&long).contains("`status_socket`"));
    }

    #[test]
    fn dataplane_keys_parse_and_coalescing_needs_offload() {
        let base = "endpoint = \"198.18.0.1:51820\"\n[dataplane]\n";
        let modes = |text: &str| {
            let d = parse(&format!("{base}{text}")).unwrap().dataplane;
            (d.offload, d.coalesce_writes)
        };
        assert_eq!(modes("coalesce_writes = false"), (true, false));
        // Offload off turns merging off with it...
        assert_eq!(modes("offload = false"), (false, false));
        assert_eq!(modes("offload = false\ncoalesce_writes = false"), (false, false));
        // ...but asking for both "on" and "off" is refused, naming the key.
        let why = reason(&format!("{base}offload = false\ncoalesce_writes = true"));
        assert!(why.contains("coalesce_writes"), "{why}");
        assert!(reason(&format!("{base}gro = true")).contains("gro"));
    }

    #[test]
    fn rendered_initial_file_parses_back() {
        let v = InitialValues {
            name: "gw-1".into(),
            endpoint: "203.0.113.7:4433".parse().unwrap(),
            subnet: "10.9.0.0/16".parse().unwrap(),
            subnet6: random_ula64([1, 2, 3, 4, 5]),
            server_name: "vpn.example.org".into(),
        };
        let c = parse(&render_initial(&v)).unwrap();
        assert_eq!(
            c.v6,
            Some(Tunnel6 {
                subnet: "fd01:203:405::/64".parse().unwrap(),
                gateway_ip: "fd01:203:405::1".parse().unwrap()
            })
        );
        assert_eq!(c.name, "gw-1");
        assert_eq!(c.endpoint, v.endpoint);
        assert_eq!(c.listen, "[::]:4433".parse().unwrap());
        assert_eq!(c.subnet, v.subnet);
        assert_eq!(c.gateway_ip, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(c.server_name, "vpn.example.org");
        assert_eq!(c.session_idle_timeout, DEFAULT_IDLE);
        assert_eq!(c.session_max_lifetime, DEFAULT_MAX_LIFETIME);
        assert_eq!(c.reauth_grace, DEFAULT_GRACE);
        assert_eq!(c.handshake_timeout, DEFAULT_HANDSHAKE);
    }

    #[test]
    fn every_bad_value_is_a_clear_error() {
        let ep = "endpoint = \"198.18.0.1:51820\"\n";
        let cases: &[(&str, &str)] = &[
            ("", "missing field `endpoint`"),
            ("endpoint = \"nope\"", "invalid socket address"),
            ("endpoint = \"198.18.0.1:0\"", "needs a port"),
            ("endpoint = \"0.0.0.0:1\"", "not an address clients can reach"),
            ("subnet = \"100.64.0.0/31\"", "/8 to /30"),
            ("subnet = \"100.64.0.9/24\"", "did you mean 100.64.0.0/24"),
            ("subnet = \"fd00::/64\"", "invalid IP address"),
            ("gateway_ip = \"10.0.0.1\"", "outside the subnet"),
            ("gateway_ip = \"100.64.0.255\"", "broadcast"),
            ("gateway_ip = \"100.64.0.0\"", "network address"),
            ("subnet6 = \"fd00::/32\"", "/48 to /120"),
            ("subnet6 = \"fd00::1/64\"", "did you mean fd00::/64"),
            ("subnet6 = \"100.64.0.0/24\"", "subnet6"),
            ("subnet6 = \"ff00::/64\"", "not a unicast range"),
            ("subnet6 = \"fd00::/64\"\ngateway_ip6 = \"fd01::1\"", "`gateway_ip6` fd01::1: outside"),
            ("subnet6 = \"fd00::/64\"\ngateway_ip6 = \"fd00::\"", "subnet-router anycast"),
            ("gateway_ip6 = \"fd00::1\"", "needs `subnet6`"),
            ("endpoint = \"[2001:db8::1]:51820\"\nlisten = \"0.0.0.0:51820\"", "`listen` 0.0.0.0:51820 cannot receive"),
            ("server_name = \"bad name\"", "not a valid DNS name"),
            ("server_name = \"\"", "not a valid DNS name"),
            ("name = \"a/b\"", "`name`"),
            ("session_idle_timeout = \"0s\"", "`session_idle_timeout` = 0s is out of range"),
            ("session_idle_timeout = \"ten\"", "session_idle_timeout"),
            ("session_max_lifetime = \"1000y\"", "out of range"),
            ("handshake_timeout = \"1ms\"", "`handshake_timeout`"),
            ("[nat]\nenabled = true", "needs `uplink`"),
            ("[nat]\nuplink = \"a very long interface\"", "not a valid interface name"),
            ("[nat]\nmasq = 1", "unknown field `masq`"),
            ("[dns]\ntimeout = \"10ms\"", "[dns] `timeout`"),
            ("[dns]\ntimeout = \"1m\"", "[dns] `timeout`"),
            ("[dns]\nrate_limit = 0", "[dns] `rate_limit`"),
            ("[dns]\nupstreams = []", "[dns] `upstreams` needs 1 to 8"),
            ("[dns]\nupstreams = [\"resolver\"]", "[dns] `upstreams`: \"resolver\" is not an address"),
            ("[dns]\nupstreams = [\"0.0.0.0\"]", "not a unicast"),
            ("[dns]\nupstreams = [\"198.18.1.2:0\"]", "not a unicast"),
            ("[dns]\nupstreams = [\"100.64.0.1\"]", "own tunnel address"),
            ("[dns]\nsearch_domains = [\"a b\"]", "[dns] `search_domains`"),
            ("[dns]\nsearch_domains = [\"x\\nnameserver 1.2.3.4\"]", "[dns] `search_domains`"),
            ("[dns]\nsearch_domains = [\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\"]", "at most 6"),
            ("[dns]\nforward = 1", "unknown field `forward`"),
            ("colour = \"blue\"", "unknown field `colour`"),
        ];
        for (extra, want) in cases {
            let text = if extra.starts_with("endpoint") || extra.is_empty() {
                extra.to_string()
            } else if extra.starts_with('[') {
                format!("{ep}{extra}")
            } else {
                format!("{extra}\n{ep}")
            };
            let r = reason(&text);
            assert!(r.contains(want), "for {extra:?}: expected {want:?} in {r:?}");
        }
    }

    #[test]
    fn upgrade_inserts_subnet6_at_top_level_and_keeps_the_rest() {
        let old = "# mine\nendpoint = \"198.18.0.1:51820\"\nsubnet = \"100.64.9.0/24\"\n\n[nat]\nenabled = false\n";
        let net = random_ula64([9, 8, 7, 6, 5]);
        let new = upgrade_text(old, net).unwrap();
        assert!(new.starts_with("# mine\n"), "{new}");
        assert!(new.ends_with("[nat]\nenabled = false\n"), "{new}");
        let c = parse(&new).unwrap();
        assert_eq!(c.subnet.to_string(), "100.64.9.0/24");
        assert_eq!(c.v6.unwrap().subnet, net);
        assert_eq!(c.v6.unwrap().gateway_ip, first_host6(net));
        // Idempotent: an upgraded file is left alone.
        assert_eq!(upgrade_text(&new, random_ula64([0; 5])), None);
        // No table at all, no final newline.
        let c = parse(&upgrade_text("endpoint = \"198.18.0.1:1\"", net).unwrap()).unwrap();
        assert_eq!(c.v6.unwrap().subnet, net);
    }

    #[test]
    fn ula_is_fd_plus_40_random_bits() {
        let n = random_ula64([0xab, 0xcd, 0xef, 0x01, 0x23]);
        assert_eq!(n.to_string(), "fdab:cdef:123::/64");
        assert!(check_subnet6(n).is_ok());
    }

    #[test]
    fn missing_file_is_missing_not_malformed() {
        let err = GatewayConfig::load(Path::new("/nonexistent/holdfast/gateway.toml")).unwrap_err();
        assert_eq!(err.exit_code(), crate::config::exit::CONFIG_MISSING);
        assert!(err.to_string().contains("/nonexistent/holdfast/gateway.toml"));
    }
}
