//! The client file: one self-contained TOML file per client, written by `gateway add-client` with
//! mode 0600, read by `client run`.
//!
//! ```toml
//! name = "alice"                      # the client's identity (also the name in its certificate)
//! endpoint = "198.18.0.1:51820"       # gateway control (TCP) and data (UDP) port
//! endpoints = ["198.18.0.1:51820", "198.18.0.5:51820"]
//!                                     # optional: every gateway of the deployment, tried in turn
//!                                     # when the current one stops answering
//! server_name = "holdfast-gateway"    # the name the gateway's certificate is checked against
//! tunnel_ip = "100.64.0.2"            # informational: the gateway assigns it and always the same
//!
//! [tls]
//! gateway_ca = "-----BEGIN CERTIFICATE-----..."   # the authority to pin (inline PEM) ...
//! # gateway_ca_file = "/etc/holdfast/ca.pem"      # ... or a path to it
//! certificate = "-----BEGIN CERTIFICATE-----..."  # or certificate_file
//! key = "-----BEGIN PRIVATE KEY-----..."          # or key_file
//!
//! [timing]          # every key optional; defaults shown
//! health_min = "15s"
//! health_max = "30s"
//! rpc_deadline = "5s"
//! backoff_initial = "1s"
//! backoff_max = "5m"
//! repeat_log_every = "10m"
//! nudge_min_interval = "1s"
//!
//! [log]
//! dir = "/var/log/holdfast"     # default: the per-user state dir, or /var/log/holdfast as root
//! level = "info"                # a tracing filter, e.g. "info,holdfast=debug"
//! keep_files = 7                # rolling daily files kept
//!
//! [network]         # every key optional; defaults shown
//! tun_name = "holdfast0"
//! underlay_mtu = 1500           # default: the MTU of the path to the gateway (route, else link);
//!                               # TUN MTU = underlay_mtu - 64 (IPv4/UDP headers + datagram overhead)
//! keepalive = "15s"
//! pmtu_raise = "10m"            # a path found smaller than its link (a smaller hop further
//!                               # along) is probed upwards again after this long
//! offload = true                # TUN offload (TSO/GRO): 64 KiB reads, merged writes; off = one packet per syscall
//! coalesce_writes = true        # merge TCP segments written to the TUN device (needs offload)
//! routes = ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]   # full tunnel (both families);
//!                               # list CIDRs of either family for a split tunnel
//! dns = "gateway"               # resolvers while connected: "gateway" (those it pushes),
//!                               # "system" (leave the system's alone), or ["100.64.0.1", ...]
//! allow_lan = false
//! killswitch = true
//!
//! [status]
//! socket = "/run/holdfast/client.sock"    # default as root; per-user runtime dir otherwise
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::sansio::supervisor::Timings;

/// The longest any `[timing]` value may be. Far above any sensible setting (the spec's longest
/// wait is 5 minutes); it catches unit typos and keeps every deadline inside the clock's range.
const MAX_TIMING: Duration = Duration::from_secs(24 * 3600);

/// The most gateways a client file (or an `Authenticate` answer) may list.
pub const MAX_ENDPOINTS: usize = 32;

/// The parsed client file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The client's name; the gateway identifies the client by its certificate, which carries it.
    pub name: String,
    /// Gateway endpoint: the control plane (TCP) and the data plane (UDP) share the port number.
    pub endpoint: SocketAddr,
    /// Every gateway of the deployment (several gateways on one shared registry). Optional: a
    /// file with `endpoint` alone names one gateway. The client also keeps the list each
    /// `Authenticate` answer carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<SocketAddr>,
    /// The name in the gateway's certificate (TLS server name).
    pub server_name: String,
    /// The tunnel address this client was registered with.
    pub tunnel_ip: Ipv4Addr,
    pub tls: TlsSection,
    #[serde(default)]
    pub timing: TimingSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub status: StatusSection,
}

/// The tunnel, routes, DNS and kill-switch settings; every key optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Name of the TUN device (default `holdfast0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tun_name: Option<String>,
    /// MTU of the path to the gateway, which the TUN MTU is derived from. Default: found when the
    /// TUN comes up, from the route toward the gateway (its MTU, else its interface's), and
    /// followed at run time; set, it is used as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_mtu: Option<u16>,
    /// Keepalive interval while idle, so NAT mappings survive (default 15 s).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Duration>,
    /// Path MTU discovery: a path found smaller than its link is probed upwards again after this
    /// long (default 10 min, RFC 8899's PMTU_RAISE_TIMER), so a path that grows back regains
    /// its size.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub pmtu_raise: Option<Duration>,
    /// TUN offload (default true): the device hands over 64 KiB TSO super-packets and accepts
    /// merged ones. Off: one packet per read and write (for a kernel whose offload misbehaves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<bool>,
    /// Merge consecutive TCP segments into large packets when writing to the TUN device
    /// (default true; needs `offload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce_writes: Option<bool>,
    /// Routes through the tunnel. Default: everything (`0.0.0.0/1`, `128.0.0.0/1`, `::/1` and
    /// `8000::/1`, a full tunnel of both families); a list of CIDRs (IPv4 or IPv6) makes a split
    /// tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<ipnet::IpNet>>,
    /// Resolvers to use while connected: `"gateway"` (default: those the gateway pushes),
    /// `"system"` (leave the system's resolver alone; the kill-switch still allows DNS only
    /// through the tunnel), or a list of addresses.
    #[serde(default, skip_serializing_if = "DnsChoice::is_gateway")]
    pub dns: DnsChoice,
    /// Allow traffic to the local LAN (the directly connected subnets) outside the tunnel
    /// (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_lan: Option<bool>,
    /// Turn the kill-switch off (default: on). Only for debugging; the client then warns that
    /// traffic can leak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killswitch: Option<bool>,
}

/// `[network] dns`: which resolvers the system uses while connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DnsChoice {
    /// Those the gateway pushes when the client authenticates (its own resolver, on its tunnel
    /// address). If it pushes none, the system's resolver is left alone. `dns = "gateway"` or no
    /// key.
    #[default]
    Gateway,
    /// Leave the system's resolver alone whatever the gateway pushes: `dns = "system"`. An empty
    /// list (`dns = []`, what this key meant before the gateway pushed resolvers) reads the same.
    System,
    /// These resolvers, whatever the gateway pushes: `dns = ["100.64.0.1"]`.
    Servers(Vec<std::net::IpAddr>),
}

impl DnsChoice {
    pub fn is_gateway(&self) -> bool {
        *self == DnsChoice::Gateway
    }

    /// The resolvers named in the file (empty unless [`DnsChoice::Servers`]): known before any
    /// answer from the gateway (routes of a split tunnel, the kill-switch plan).
    pub fn configured(&self) -> &[std::net::IpAddr] {
        match self {
            DnsChoice::Servers(s) => s,
            _ => &[],
        }
    }

    /// The resolvers and search domains to set, given what the gateway pushed.
    pub fn effective(
        &self,
        pushed: &[std::net::IpAddr],
        pushed_search: &[String],
    ) -> (Vec<std::net::IpAddr>, Vec<String>) {
        match self {
            DnsChoice::Gateway => (pushed.to_vec(), pushed_search.to_vec()),
            DnsChoice::System => (Vec::new(), Vec::new()),
            DnsChoice::Servers(s) => (s.clone(), Vec::new()),
        }
    }
}

impl Serialize for DnsChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DnsChoice::Gateway => s.serialize_str("gateway"),
            DnsChoice::System => s.serialize_str("system"),
            DnsChoice::Servers(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DnsChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DnsChoice;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"gateway\", \"system\" or a list of IP addresses")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DnsChoice, E> {
                match v {
                    "gateway" => Ok(DnsChoice::Gateway),
                    "system" => Ok(DnsChoice::System),
                    other => Err(E::custom(format!(
                        "`dns` = {other:?}: expected \"gateway\", \"system\" or a list of IP addresses"
                    ))),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<DnsChoice, A::Error> {
                let mut list = Vec::new();
                while let Some(ip) = seq.next_element::<std::net::IpAddr>()? {
                    if list.len() == super::MAX_DNS_SERVERS {
                        return Err(serde::de::Error::custom(format!(
                            "`dns`: at most {} resolvers",
                            super::MAX_DNS_SERVERS
                        )));
                    }
                    list.push(ip);
                }
                Ok(if list.is_empty() { DnsChoice::System } else { DnsChoice::Servers(list) })
            }
        }
        d.deserialize_any(V)
    }
}

/// The local status socket that `holdfast status` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusSection {
    /// Path of the Unix socket (default `/run/holdfast/client.sock` as root, else in the per-user
    /// runtime dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// Credentials: each item inline (PEM) or as a path to a PEM file, exactly one of the two.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Overrides of the supervisor's timings; each missing key takes the default of [`Timings`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub health_min: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub health_max: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub rpc_deadline: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub backoff_initial: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub repeat_log_every: Option<Duration>,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub nudge_min_interval: Option<Duration>,
}

/// Where and how much the client logs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_files: Option<usize>,
}

/// The PEM material of a client, loaded and checked.
#[derive(Clone)]
pub struct Credentials {
    pub gateway_ca_pem: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

impl ClientFile {
    /// Reads and parses a client file. Errors name the file and the problem.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = super::read_config_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses client-file text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: ClientFile = toml::from_str(text)
            .map_err(|e| ConfigError::Malformed { path: path.to_owned(), reason: super::toml_reason(text, &e) })?;
        file.validate(path)?;
        Ok(file)
    }

    /// Every gateway this file names, `endpoint` first, without repeats.
    pub fn all_endpoints(&self) -> Vec<SocketAddr> {
        let mut all = vec![self.endpoint];
        for e in &self.endpoints {
            if !all.contains(e) {
                all.push(*e);
            }
        }
        all
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::Malformed { path: path.to_owned(), reason };
        if self.name.trim().is_empty() {
            return Err(bad("`name` is empty".into()));
        }
        if self.server_name.trim().is_empty() {
            return Err(bad("`server_name` is empty".into()));
        }
        if let Some(e) =
            std::iter::once(&self.endpoint).chain(&self.endpoints).find(|e| e.port() == 0 || e.ip().is_unspecified())
        {
            return Err(bad(format!("gateway endpoint {e} is not an address and port (in `endpoint` or `endpoints`)")));
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(bad(format!(
                "`endpoints` lists {} gateways; at most {MAX_ENDPOINTS} are accepted",
                self.endpoints.len()
            )));
        }
        let t = self.timings();
        let named = [
            ("health_min", t.health_min),
            ("health_max", t.health_max),
            ("rpc_deadline", t.rpc_deadline),
            ("backoff_initial", t.backoff_initial),
            ("backoff_max", t.backoff_max),
            ("repeat_log_every", t.repeat_log_every),
            ("nudge_min_interval", t.nudge_min_interval),
        ];
        if let Some((key, d)) = named.iter().find(|(_, d)| *d > MAX_TIMING) {
            return Err(bad(format!(
                "[timing] {key} = {} is longer than the {} a timing may be",
                humantime::format_duration(*d),
                humantime::format_duration(MAX_TIMING)
            )));
        }
        if let Some(r) = self.network.pmtu_raise
            && (r < Duration::from_secs(1) || r > MAX_TIMING)
        {
            return Err(bad(format!(
                "[network] pmtu_raise = {} must be at least 1s and at most {}",
                humantime::format_duration(r),
                humantime::format_duration(MAX_TIMING)
            )));
        }
        if let Some(k) = self.network.keepalive
            && (k.is_zero() || k > MAX_TIMING)
        {
            return Err(bad(format!(
                "[network] keepalive = {} must be above zero and at most {}",
                humantime::format_duration(k),
                humantime::format_duration(MAX_TIMING)
            )));
        }
        if self.network.coalesce_writes == Some(true) && self.network.offload == Some(false) {
            return Err(bad("[network] coalesce_writes = true needs offload (merged packets go to the TUN \
                 device with a virtio-net header); drop one of the two keys"
                .into()));
        }
        if t.health_min.is_zero() || t.health_min > t.health_max {
            return Err(bad(format!(
                "[timing] needs 0 < health_min <= health_max (got {:?} and {:?})",
                t.health_min, t.health_max
            )));
        }
        if t.rpc_deadline.is_zero() {
            return Err(bad("[timing] rpc_deadline must be above zero".into()));
        }
        if t.backoff_initial.is_zero() || t.backoff_initial > t.backoff_max {
            return Err(bad(format!(
                "[timing] needs 0 < backoff_initial <= backoff_max (got {:?} and {:?})",
                t.backoff_initial, t.backoff_max
            )));
        }
        if self.log.keep_files == Some(0) {
            return Err(bad("[log] keep_files must be at least 1".into()));
        }
        Ok(())
    }

    /// The supervisor's timings: the defaults with this file's overrides applied.
    pub fn timings(&self) -> Timings {
        let d = Timings::default();
        let t = &self.timing;
        Timings {
            health_min: t.health_min.unwrap_or(d.health_min),
            health_max: t.health_max.unwrap_or(d.health_max),
            rpc_deadline: t.rpc_deadline.unwrap_or(d.rpc_deadline),
            backoff_initial: t.backoff_initial.unwrap_or(d.backoff_initial),
            backoff_max: t.backoff_max.unwrap_or(d.backoff_max),
            repeat_log_every: t.repeat_log_every.unwrap_or(d.repeat_log_every),
            nudge_min_interval: t.nudge_min_interval.unwrap_or(d.nudge_min_interval),
        }
    }

    /// Loads the credentials (inline or from their files; relative paths are relative to the
    /// client file's folder) and checks that each parses as what it claims to be.
    pub fn credentials(&self, path: &Path) -> Result<Credentials, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = &self.tls;
        let ca = load_pem(path, base, "gateway_ca", &tls.gateway_ca, &tls.gateway_ca_file)?;
        let cert = load_pem(path, base, "certificate", &tls.certificate, &tls.certificate_file)?;
        let key = load_pem(path, base, "key", &tls.key, &tls.key_file)?;
        crate::pki::check_certificate_pem(&ca.0).map_err(|reason| ConfigError::BadKey {
            path: ca.1.clone(),
            what: "gateway_ca",
            reason,
        })?;
        crate::pki::check_certificate_pem(&cert.0).map_err(|reason| ConfigError::BadKey {
            path: cert.1.clone(),
            what: "certificate",
            reason,
        })?;
        crate::pki::check_key_pem(&key.0).map_err(|reason| ConfigError::BadKey {
            path: key.1.clone(),
            what: "key",
            reason,
        })?;
        // A key that does not belong to the certificate would only fail later, at every handshake.
        crate::pki::check_pair(&cert.0, &key.0).map_err(|reason| ConfigError::BadKey {
            path: key.1.clone(),
            what: "key",
            reason: format!("does not match the certificate: {reason}"),
        })?;
        Ok(Credentials { gateway_ca_pem: ca.0, certificate_pem: cert.0, key_pem: key.0 })
    }
}

/// One credential: (PEM text, the file it came from, for messages).
fn load_pem(
    file: &Path,
    base: &Path,
    what: &'static str,
    inline: &Option<String>,
    from_file: &Option<PathBuf>,
) -> Result<(String, PathBuf), ConfigError> {
    match (inline, from_file) {
        (Some(_), Some(_)) => Err(ConfigError::Malformed {
            path: file.to_owned(),
            reason: format!("[tls] sets both `{what}` and `{what}_file`; keep one"),
        }),
        (None, None) => Err(ConfigError::MissingKey {
            path: file.to_owned(),
            what,
            reason: format!("[tls] has neither `{what}` nor `{what}_file`"),
        }),
        (Some(pem), None) => Ok((pem.clone(), file.to_owned())),
        (None, Some(p)) => {
            let full = if p.is_absolute() { p.clone() } else { base.join(p) };
            match std::fs::read_to_string(&full) {
                Ok(text) => Ok((text, full)),
                Err(e) => Err(ConfigError::MissingKey { path: full, what, reason: e.to_string() }),
            }
        }
    }
}
