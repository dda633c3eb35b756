//! The kill-switch: an nftables table of Holdfast's own that drops every packet that goes neither
//! through the tunnel nor to the gateway, and that no other program can remove.
//!
//! `start()` enables it before anything else and only an explicit stop disables it, so no state of
//! the supervisor ever runs unprotected. The rules name the tunnel by interface *name* and the
//! gateway by address and ports, never anything from a session, so they stay valid across re-auth,
//! Degraded, Backoff and gateway restarts, and even before the TUN device exists (or while it is
//! being re-created).
//!
//! Shape:
//! - [`KillSwitchPlan`]: everything the rules depend on, checked once.
//! - [`rules`] (pure): the plan as nf_tables rules, the one place that lists them.
//! - [`nfnl`] (pure): those rules as nf_tables netlink messages in one batch.
//! - [`kernel`]: the socket that sends them and owns the table, and the fallback's watcher.
//! - [`NftKillSwitch`]: the [`KillSwitch`] itself; [`unblock`] removes what a killed client left.
//!
//! Two modes ([`KillSwitchMode`]), chosen at enable and logged:
//! - **owned** (Linux 6.9+): the table has the `owner` and `persist` flags. It belongs to the
//!   netlink socket the client keeps open for its whole life: no other process can flush, delete
//!   or change it (`nft flush ruleset` skips it, `nft delete table` gets EPERM). When the client
//!   dies without a stop (SIGKILL) the table stays, orphaned and still dropping, and the next
//!   start adopts it and updates it in place in one transaction: no instant without protection.
//! - **watched** (older kernels, or forced with [`FORCE_FALLBACK_ENV`] for tests): a plain table
//!   and a thread on the nftables event group that puts it back as soon as another program
//!   touches it (within a millisecond or so; the tests hold it to 100 ms).
//!
//! No `nft` process anywhere: `start()` pays a few netlink round trips (tens of microseconds).
//! One table per network namespace: a second client in the same namespace is refused.

pub mod kernel;
pub mod nfnl;
pub mod rules;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use super::dataplane::DEFAULT_TUN_NAME;
use crate::config::client::ClientFile;
use kernel::{ApplyError, NfSocket, Watcher};
use rules::Ruleset;

const TARGET: &str = "holdfast::killswitch";

/// The nftables table (family `inet`, so IPv4 and IPv6 both) that holds every rule of ours.
pub const TABLE: &str = "holdfast";

/// Test-only switch: when set (to anything), the kill-switch uses the watched fallback mode even
/// where the kernel supports owned tables, so the fallback can be tested on a current kernel.
pub const FORCE_FALLBACK_ENV: &str = "HOLDFAST_TEST_KILLSWITCH_FALLBACK";

/// Why the kill-switch could not be applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    /// Applying the rules failed; the client must not run.
    #[error("cannot enable the kill-switch: {0}")]
    Enable(String),
    /// Removing the rules failed.
    #[error("cannot disable the kill-switch: {0}")]
    Disable(String),
    /// The settings cannot be expressed as rules (for example an invalid interface name).
    #[error("invalid kill-switch settings: {0}")]
    InvalidPlan(String),
    /// The rules were applied, but the table the kernel lists is not the one applied.
    #[error("the kill-switch table is not as applied: {0}")]
    Verify(String),
}

/// Blocks every packet that does not go through the tunnel or to the gateway.
pub trait KillSwitch: Send + Sync {
    /// Applies the rules (atomically) and checks them. Called first thing in `start()`.
    fn enable(&self) -> Result<(), KillSwitchError>;
    /// Removes the rules. Called only on an explicit stop.
    fn disable(&self) -> Result<(), KillSwitchError>;
    /// A short description for logs, the dashboard and `holdfast status` (with the mode in force
    /// once enabled).
    fn describe(&self) -> String;
    /// DNS through the tunnel from now on only to `resolvers` (the ones the gateway pushed, once
    /// they are known); empty lifts the restriction. Updated in place, in one transaction: the
    /// rest of the rules hold throughout. A plan whose client file names its resolvers keeps them.
    fn restrict_tunnel_dns(&self, _resolvers: &[IpAddr]) -> Result<(), KillSwitchError> {
        Ok(())
    }
    /// Also lets the client reach these gateways of its deployment (each on its one port, TCP
    /// control and UDP data), beside those its file names: the list each `Authenticate` answer
    /// carries, so a gateway that joined after the file was written can be failed over to.
    /// Updated in place, like [`KillSwitch::restrict_tunnel_dns`].
    fn allow_gateways(&self, _gateways: &[SocketAddr]) -> Result<(), KillSwitchError> {
        Ok(())
    }
}

/// A kill-switch that blocks nothing and says so in the log (`killswitch = false`).
#[derive(Debug, Default)]
pub struct LoggingNoopKillSwitch;

impl KillSwitch for LoggingNoopKillSwitch {
    fn enable(&self) -> Result<(), KillSwitchError> {
        tracing::warn!(target: TARGET, "kill-switch not active: traffic outside the tunnel is NOT blocked");
        Ok(())
    }
    fn disable(&self) -> Result<(), KillSwitchError> {
        tracing::info!(target: TARGET, "kill-switch (no-op) released");
        Ok(())
    }
    fn describe(&self) -> String {
        "off (no-op)".into()
    }
}

/// One gateway the kill-switch lets the client reach: its address, control port (TCP) and data
/// port (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayEndpoint {
    pub addr: IpAddr,
    pub control_port: u16,
    pub data_port: u16,
}

/// Everything the rules depend on. Nothing here changes while the client runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillSwitchPlan {
    /// At least one; the first is the client file's endpoint.
    gateways: Vec<GatewayEndpoint>,
    tun_name: String,
    allow_lan: bool,
    lan_subnets: Vec<IpNet>,
    /// DNS (issue 11): when not empty, DNS inside the tunnel may go to these resolvers only.
    tunnel_dns: Vec<IpAddr>,
}

fn check_gateway(gateway: IpAddr, control_port: u16, data_port: u16) -> Result<GatewayEndpoint, KillSwitchError> {
    if gateway.is_unspecified() || gateway.is_loopback() || gateway.is_multicast() {
        return Err(KillSwitchError::InvalidPlan(format!(
            "the gateway address {gateway} is not a unicast address of another host"
        )));
    }
    if control_port == 0 || data_port == 0 {
        return Err(KillSwitchError::InvalidPlan("the gateway's port is 0".into()));
    }
    Ok(GatewayEndpoint { addr: gateway, control_port, data_port })
}

impl KillSwitchPlan {
    /// A plan that allows the gateway's control port (TCP) and data port (UDP) at `gateway`, and
    /// everything through the interface `tun_name`. No LAN access.
    pub fn new(gateway: IpAddr, control_port: u16, data_port: u16, tun_name: &str) -> Result<Self, KillSwitchError> {
        check_ifname(tun_name).map_err(KillSwitchError::InvalidPlan)?;
        Ok(Self {
            gateways: vec![check_gateway(gateway, control_port, data_port)?],
            tun_name: tun_name.to_owned(),
            allow_lan: false,
            lan_subnets: Vec::new(),
            tunnel_dns: Vec::new(),
        })
    }

    /// Also allows another gateway (a failover endpoint), either family. Duplicates are ignored.
    pub fn with_gateway(mut self, gateway: IpAddr, control_port: u16, data_port: u16) -> Result<Self, KillSwitchError> {
        let gw = check_gateway(gateway, control_port, data_port)?;
        if !self.gateways.contains(&gw) {
            self.gateways.push(gw);
        }
        Ok(self)
    }

    /// Also allows the directly connected subnets `subnets` (in both directions), except DNS.
    /// Host bits are cleared; duplicates removed.
    pub fn allow_lan(mut self, subnets: &[IpNet]) -> Self {
        let mut nets: Vec<IpNet> = subnets.iter().map(IpNet::trunc).collect();
        nets.sort();
        nets.dedup();
        self.allow_lan = true;
        self.lan_subnets = nets;
        self
    }

    /// The plan for a client file: every gateway endpoint it names (each one port number serves
    /// the control plane over TCP and the data plane over UDP), the TUN name, and with
    /// `allow_lan` the given subnets (see [`lan_subnets`]).
    pub fn for_client(file: &ClientFile, lan: &[IpNet]) -> Result<Self, KillSwitchError> {
        let net = &file.network;
        let tun = net.tun_name.as_deref().unwrap_or(DEFAULT_TUN_NAME);
        let port = file.endpoint.port();
        // The resolvers a file names are known now; those a gateway pushes only after the first
        // answer, so with `dns = "gateway"` DNS through the tunnel is not restricted (it goes
        // encrypted to the gateway either way; outside the tunnel it is dropped in every case).
        let mut plan = Self::new(file.endpoint.ip(), port, port, tun)?.tunnel_dns_only(net.dns.configured());
        // Every gateway of the deployment the file names (a failover never waits on the
        // kill-switch, and nothing else gets through).
        for g in file.all_endpoints().iter().skip(1) {
            plan = plan.with_gateway(g.ip(), g.port(), g.port())?;
        }
        Ok(if net.allow_lan.unwrap_or(false) { plan.allow_lan(lan) } else { plan })
    }

    /// Inside the tunnel too, DNS may go to `resolvers` only (every other port 53 through the
    /// tunnel is dropped). Empty: DNS through the tunnel is not restricted.
    pub fn tunnel_dns_only(mut self, resolvers: &[IpAddr]) -> Self {
        let mut r = resolvers.to_vec();
        r.sort();
        r.dedup();
        self.tunnel_dns = r;
        self
    }

    /// The resolvers DNS through the tunnel is restricted to (empty: not restricted).
    pub fn tunnel_dns(&self) -> &[IpAddr] {
        &self.tunnel_dns
    }

    /// The first gateway (the client file's endpoint).
    pub fn gateway(&self) -> IpAddr {
        self.gateways[0].addr
    }
    pub fn control_port(&self) -> u16 {
        self.gateways[0].control_port
    }
    pub fn data_port(&self) -> u16 {
        self.gateways[0].data_port
    }
    /// Every gateway the rules allow, in order.
    pub fn gateways(&self) -> &[GatewayEndpoint] {
        &self.gateways
    }
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }
    pub fn lan(&self) -> Option<&[IpNet]> {
        self.allow_lan.then_some(self.lan_subnets.as_slice())
    }
}

/// Checks that `name` is a Linux interface name we can put inside an nft string safely: 1 to 15
/// bytes of ASCII letters, digits, `-`, `_` and `.`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 15 || !name.chars().all(ok_char) || name == "." || name == ".." {
        return Err(format!(
            "{name:?} is not a usable interface name (1-15 characters: letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

/// Checks `nft -j list table inet holdfast` output against the plan: the table exists, it has
/// exactly the chains `output` and `input`, each a filter chain on its hook at priority 0 with
/// policy drop, holding exactly the plan's rules in order (compared by their comments). The
/// kill-switch itself never runs `nft`; the tests use this to check the kernel's table with an
/// independent decoder.
pub fn check_listing(json: &str, plan: &KillSwitchPlan) -> Result<(), KillSwitchError> {
    let bad = |m: String| KillSwitchError::Verify(m);
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("nft printed invalid JSON: {e}")))?;
    let items =
        doc.get("nftables").and_then(|v| v.as_array()).ok_or_else(|| bad("nft printed no `nftables` array".into()))?;
    let ours = |o: &serde_json::Value| {
        o.get("family").and_then(|v| v.as_str()) == Some("inet")
            && o.get("table").and_then(|v| v.as_str()) == Some(TABLE)
    };
    let has_table = items.iter().filter_map(|i| i.get("table")).any(|t| {
        t.get("family").and_then(|v| v.as_str()) == Some("inet")
            && t.get("name").and_then(|v| v.as_str()) == Some(TABLE)
    });
    if !has_table {
        return Err(bad("table inet holdfast is missing".into()));
    }
    let chains_listed: Vec<&serde_json::Value> =
        items.iter().filter_map(|i| i.get("chain")).filter(|c| ours(c)).collect();
    let mut names: Vec<&str> = chains_listed.iter().filter_map(|c| c.get("name").and_then(|v| v.as_str())).collect();
    names.sort_unstable();
    if names != ["input", "output"] {
        return Err(bad(format!("expected chains input and output, found {names:?}")));
    }
    let rules = rules::chains(plan);
    for (name, expected) in rules.chains() {
        let chain = chains_listed
            .iter()
            .find(|c| c.get("name").and_then(|v| v.as_str()) == Some(name))
            .ok_or_else(|| bad(format!("chain {name} is missing")))?;
        let field = |k: &str| chain.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let want = [
            ("type", serde_json::json!("filter")),
            ("hook", serde_json::json!(name)),
            ("prio", serde_json::json!(0)),
            ("policy", serde_json::json!("drop")),
        ];
        for (k, v) in want {
            if field(k) != v {
                return Err(bad(format!("chain {name}: {k} is {}, expected {v}", field(k))));
            }
        }
        let listed: Vec<&str> = items
            .iter()
            .filter_map(|i| i.get("rule"))
            .filter(|r| ours(r) && r.get("chain").and_then(|v| v.as_str()) == Some(name))
            .map(|r| r.get("comment").and_then(|v| v.as_str()).unwrap_or(""))
            .collect();
        let wanted: Vec<&str> = expected.iter().map(|r| r.why).collect();
        if listed != wanted {
            return Err(bad(format!("chain {name} holds rules {listed:?}, expected {wanted:?}")));
        }
    }
    Ok(())
}

/// The subnets of this namespace's interfaces (IPv4 and IPv6, link-local included), except
/// loopback and `tun_name`: what `allow_lan` opens. Read once at start; a network joined later is
/// not opened until the client restarts (failing closed).
pub fn lan_subnets(tun_name: &str) -> Result<Vec<IpNet>, KillSwitchError> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(KillSwitchError::Enable(format!(
            "cannot list the local addresses for allow_lan: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) != 0 || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == tun_name.as_bytes() {
            continue;
        }
        // SAFETY: the pointers come from the same node; sockaddr_to_ip checks the family first.
        let (addr, mask) = unsafe { (sockaddr_to_ip(ifa.ifa_addr), sockaddr_to_ip(ifa.ifa_netmask)) };
        if let (Some(addr), Some(mask)) = (addr, mask)
            && let Ok(net) = IpNet::with_netmask(addr, mask)
        {
            out.push(net.trunc());
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// Reads an IPv4 or IPv6 address out of a `sockaddr`; `None` for other families or null.
///
/// # Safety
/// `sa` is null or points to a valid `sockaddr` whose real size matches its family.
unsafe fn sockaddr_to_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: per the contract, `sa` points to a sockaddr of the size its family says.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                // s_addr holds the address in network byte order, as its bytes in memory.
                Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// The kill-switch for a client file: the nftables one, or the logging no-op when the file sets
/// `killswitch = false`. Reads the local subnets when `allow_lan` is on.
pub fn for_client(file: &ClientFile) -> Result<Arc<dyn KillSwitch>, KillSwitchError> {
    if file.network.killswitch == Some(false) {
        return Ok(Arc::new(LoggingNoopKillSwitch));
    }
    let tun = file.network.tun_name.as_deref().unwrap_or(DEFAULT_TUN_NAME);
    let lan = if file.network.allow_lan.unwrap_or(false) { lan_subnets(tun)? } else { Vec::new() };
    Ok(Arc::new(NftKillSwitch::new(KillSwitchPlan::for_client(file, &lan)?)))
}

/// How the table is protected from other programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillSwitchMode {
    /// The kernel does it: the table is owned by our netlink socket and persists after us.
    Owned,
    /// We do it: a plain table, restored on every change another program makes.
    Watched,
}

impl KillSwitchMode {
    /// The name shown in the log and in `holdfast status`.
    pub fn name(self) -> &'static str {
        match self {
            KillSwitchMode::Owned => "owned",
            KillSwitchMode::Watched => "watched",
        }
    }
    fn explain(self) -> &'static str {
        match self {
            KillSwitchMode::Owned => {
                "kernel-owned table (owner+persist flags): no other program can change or remove it"
            }
            KillSwitchMode::Watched => {
                "plain table restored on every change by another program (this kernel has no persistent owned tables)"
            }
        }
    }
}

/// How long `enable` waits, in steps, for a table owner that is going away (see its use).
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
const OWNER_WAITS: u32 = 10;

/// The nftables kill-switch, spoken over netlink (see the module doc).
pub struct NftKillSwitch {
    plan: KillSwitchPlan,
    /// The rules in force: the plan's, with the tunnel resolvers pushed at run time when the
    /// file names none. Shared with the watcher, which restores whatever is current.
    rules: Arc<arc_swap::ArcSwap<Ruleset>>,
    force_fallback: bool,
    /// The socket that owns the table. Opened by the first `enable` (in the network namespace of
    /// the calling thread) and kept until this value is dropped: closing it is what orphans an
    /// owned table.
    sock: Arc<Mutex<Option<NfSocket>>>,
    /// What the running client learnt since the start: added to `plan` for the rules in force.
    learnt: Mutex<Learnt>,
    mode: Mutex<Option<KillSwitchMode>>,
    watcher: Mutex<Option<Watcher>>,
    restores: Arc<AtomicU64>,
}

/// What the kill-switch learns while the client runs (see [`NftKillSwitch::learnt`]).
#[derive(Debug, Default)]
struct Learnt {
    /// The resolvers in force (pushed by the gateway), when the file names none.
    tunnel_dns: Vec<IpAddr>,
    /// The deployment's gateways, as the latest `Authenticate` answer lists them.
    gateways: Vec<SocketAddr>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The socket and the mode stay valid whatever panicked while they were held.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NftKillSwitch {
    /// The kill-switch for `plan`; the fallback mode is forced when [`FORCE_FALLBACK_ENV`] is set.
    pub fn new(plan: KillSwitchPlan) -> Self {
        let force_fallback = std::env::var_os(FORCE_FALLBACK_ENV).is_some();
        Self {
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(rules::chains(&plan))),
            plan,
            force_fallback,
            sock: Arc::new(Mutex::new(None)),
            learnt: Mutex::default(),
            mode: Mutex::new(None),
            watcher: Mutex::new(None),
            restores: Arc::default(),
        }
    }

    pub fn plan(&self) -> &KillSwitchPlan {
        &self.plan
    }

    /// The mode in force, once enabled.
    pub fn mode(&self) -> Option<KillSwitchMode> {
        *lock(&self.mode)
    }

    /// How many times the watched mode put the table back after another program changed it.
    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::Relaxed)
    }

    /// Whether the table exists in the namespace of the calling thread (whoever made it).
    pub fn table_present(&self) -> Result<bool, KillSwitchError> {
        table_present()
    }

    /// Brings the rules in force to the plan plus what was `learnt`, in place and in one
    /// transaction (nothing changes when they are already those). Logs `what` when it applied.
    /// The plan in force: the file's, plus what was learnt at run time (pushed resolvers, the
    /// deployment's other gateways). What the rules are built from and what `describe` shows.
    fn plan_in_force(&self, learnt: &Learnt) -> Result<KillSwitchPlan, KillSwitchError> {
        let mut plan = self.plan.clone();
        if plan.tunnel_dns().is_empty() {
            plan = plan.tunnel_dns_only(&learnt.tunnel_dns);
        }
        for g in &learnt.gateways {
            plan = plan.with_gateway(g.ip(), g.port(), g.port())?;
        }
        Ok(plan)
    }

    fn reapply(&self, learnt: &Learnt, what: &str) -> Result<(), KillSwitchError> {
        let plan = self.plan_in_force(learnt)?;
        let next = Arc::new(rules::chains(&plan));
        if **self.rules.load() == *next {
            return Ok(());
        }
        let mut sock = lock(&self.sock);
        // Stored before applying, so a watcher restoring meanwhile puts back the new rules.
        self.rules.store(next.clone());
        if let (Some(s), Some(mode)) = (sock.as_mut(), self.mode()) {
            kernel::apply(s, &next, mode).map_err(|e| KillSwitchError::Enable(e.to_string()))?;
            tracing::info!(target: TARGET, "kill-switch: {what}");
        }
        Ok(())
    }

    fn enable_inner(&self) -> Result<KillSwitchMode, KillSwitchError> {
        let fail = |e: &dyn std::fmt::Display| KillSwitchError::Enable(e.to_string());
        let mut sock = lock(&self.sock);
        if sock.is_none() {
            *sock =
                Some(NfSocket::open().map_err(|e| fail(&format!("cannot open a netlink socket to nf_tables: {e}")))?);
        }
        let Some(s) = sock.as_mut() else { unreachable!("opened above") };
        let mut mode = if self.force_fallback {
            KillSwitchMode::Watched
        } else {
            lock(&self.mode).unwrap_or(KillSwitchMode::Owned)
        };
        // The watched mode subscribes before applying, so a change right after is not missed.
        let mut sub = None;
        let mut owner_waits = 0;
        loop {
            if mode == KillSwitchMode::Watched && sub.is_none() && lock(&self.watcher).is_none() {
                sub = Some(kernel::subscribe().map_err(|e| fail(&format!("cannot watch nftables events: {e}")))?);
            }
            match kernel::apply(s, &self.rules.load(), mode) {
                Ok(()) => break,
                Err(ApplyError::Unsupported(e)) if mode == KillSwitchMode::Owned => {
                    tracing::info!(target: TARGET, "owned tables unavailable ({e}); using the watched fallback");
                    mode = KillSwitchMode::Watched;
                }
                // An owner that just closed its socket may still hold it for a moment: a child
                // forked by another thread keeps a copy of every descriptor until it execs, and
                // the kernel orphans the table only when the last copy goes.
                Err(ApplyError::OwnedByOther(_)) if owner_waits < OWNER_WAITS => {
                    owner_waits += 1;
                    std::thread::sleep(OWNER_WAIT);
                }
                Err(ApplyError::Verify(m)) => return Err(KillSwitchError::Verify(m)),
                Err(e) => return Err(fail(&e)),
            }
        }
        drop(sock);
        if let Some(sub) = sub {
            let w = Watcher::start(sub, self.sock.clone(), self.rules.clone(), self.restores.clone())
                .map_err(|e| fail(&format!("cannot start the nftables watcher: {e}")))?;
            *lock(&self.watcher) = Some(w);
        }
        *lock(&self.mode) = Some(mode);
        Ok(mode)
    }
}

impl Drop for NftKillSwitch {
    fn drop(&mut self) {
        // Stop the watcher before the socket closes; the table itself stays (failing closed).
        lock(&self.watcher).take();
    }
}

impl KillSwitch for NftKillSwitch {
    fn enable(&self) -> Result<(), KillSwitchError> {
        let mode = self.enable_inner()?;
        tracing::info!(target: TARGET, "kill-switch on ({}: {}): {}", mode.name(), mode.explain(), self.describe());
        Ok(())
    }

    fn disable(&self) -> Result<(), KillSwitchError> {
        // The watcher first, or it would put the table back.
        lock(&self.watcher).take();
        let mut sock = lock(&self.sock);
        if sock.is_none() {
            *sock = Some(NfSocket::open().map_err(|e| KillSwitchError::Disable(e.to_string()))?);
        }
        let Some(s) = sock.as_mut() else { unreachable!("opened above") };
        kernel::remove(s).map_err(|e| KillSwitchError::Disable(e.to_string()))?;
        *lock(&self.mode) = None;
        tracing::info!(target: TARGET, "kill-switch off: table inet {TABLE} removed");
        Ok(())
    }

    fn restrict_tunnel_dns(&self, resolvers: &[IpAddr]) -> Result<(), KillSwitchError> {
        if !self.plan.tunnel_dns().is_empty() {
            // The client file names its resolvers: those are the ones, whatever is pushed.
            return Ok(());
        }
        let mut learnt = lock(&self.learnt);
        learnt.tunnel_dns = resolvers.to_vec();
        let what = if resolvers.is_empty() {
            "any resolver (not restricted)".to_owned()
        } else {
            resolvers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        };
        self.reapply(&learnt, &format!("DNS through the tunnel only to {what}"))
    }

    fn allow_gateways(&self, gateways: &[SocketAddr]) -> Result<(), KillSwitchError> {
        let mut learnt = lock(&self.learnt);
        // An address the plan cannot hold (a gateway listing nonsense) is left out, not fatal.
        learnt.gateways =
            gateways.iter().copied().filter(|g| check_gateway(g.ip(), g.port(), g.port()).is_ok()).collect();
        let list: Vec<String> = learnt.gateways.iter().map(ToString::to_string).collect();
        self.reapply(&learnt, &format!("the deployment's gateways {} allowed", list.join(", ")))
    }

    fn describe(&self) -> String {
        // The learnt parts were checked when they were applied; should one fail now, the file's
        // plan is still a true (if partial) description.
        let p = &self.plan_in_force(&lock(&self.learnt)).unwrap_or_else(|_| self.plan.clone());
        let lan = match p.lan() {
            None => "no LAN".to_owned(),
            Some(nets) => {
                let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
                format!("LAN {}", list.join(" "))
            }
        };
        let gws: Vec<String> =
            p.gateways().iter().map(|g| format!("{} (tcp {}, udp {})", g.addr, g.control_port, g.data_port)).collect();
        let mode = match self.mode() {
            Some(m) => format!(" [{}]", m.name()),
            None => String::new(),
        };
        let dns = match p.tunnel_dns() {
            [] => String::new(),
            list => {
                let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                format!("; DNS in the tunnel only to {}", list.join(" "))
            }
        };
        format!("nftables inet {TABLE}{mode}: only via {} and to {}; {lan}{dns}", p.tun_name, gws.join(", "))
    }
}

/// Whether the table exists in the namespace of the calling thread.
pub fn table_present() -> Result<bool, KillSwitchError> {
    let mut s = NfSocket::open().map_err(|e| KillSwitchError::Verify(e.to_string()))?;
    s.table(TABLE).map(|t| t.is_some()).map_err(|e| KillSwitchError::Verify(e.to_string()))
}

/// `holdfast client unblock`: removes what a client killed without a stop left behind in this
/// namespace — the kill-switch table (adopting it first: an orphaned owned table is deleted by
/// its new owner), the resolver file it rewrote, the host route to the gateway — so a user can
/// get out without starting the client. Safe to run when nothing is left (it says so). Refuses
/// the table of a client that is still running (stop it instead). Returns a one-line summary.
pub fn unblock() -> Result<String, KillSwitchError> {
    unblock_with(Path::new(super::dns::SYSTEM_RESOLV_CONF))
}

/// [`unblock`] with an explicit resolver file (tests).
pub fn unblock_with(resolv_conf: &Path) -> Result<String, KillSwitchError> {
    // Each of the three is attempted whatever happened to the others: a user locked out wants
    // back as much as can be given back.
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let removed =
        NfSocket::open().map_err(|e| e.to_string()).and_then(|mut s| kernel::remove(&mut s).map_err(|e| e.to_string()));
    match removed {
        Ok(true) => done.push(format!("removed the kill-switch (table inet {TABLE})")),
        Ok(false) => done.push("no kill-switch was active".to_owned()),
        Err(e) => failed.push(KillSwitchError::Disable(e).to_string()),
    }
    match super::dns::restore_leftover(resolv_conf) {
        Ok(true) => done.push(format!("restored {}", resolv_conf.display())),
        Ok(false) => {}
        Err(e) => failed.push(e.to_string()),
    }
    match super::routes::remove_leftovers_blocking() {
        Ok(0) => {}
        Ok(n) => done.push(format!("removed {n} leftover route(s)")),
        Err(e) => failed.push(e.to_string()),
    }
    if failed.is_empty() {
        Ok(done.join("; "))
    } else {
        let done = if done.is_empty() { String::new() } else { format!("{}; ", done.join("; ")) };
        Err(KillSwitchError::Disable(format!("{done}failed: {}", failed.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan4() -> KillSwitchPlan {
        KillSwitchPlan::new("198.18.0.1".parse().unwrap(), 51820, 51820, "holdfast0").unwrap()
    }

    #[test]
    fn plan_rejects_what_cannot_be_expressed() {
        let gw: IpAddr = "198.18.0.1".parse().unwrap();
        for bad in ["", "a\"b", "has space", "0123456789abcdef", "x;y", "..", "tun/0", "é"] {
            assert!(
                matches!(KillSwitchPlan::new(gw, 1, 1, bad), Err(KillSwitchError::InvalidPlan(_))),
                "{bad:?} accepted"
            );
        }
        for bad_gw in ["0.0.0.0", "127.0.0.1", "::1", "224.0.0.1", "::"] {
            assert!(KillSwitchPlan::new(bad_gw.parse().unwrap(), 1, 1, "t").is_err(), "{bad_gw}");
            assert!(plan4().with_gateway(bad_gw.parse().unwrap(), 1, 1).is_err(), "{bad_gw}");
        }
        assert!(KillSwitchPlan::new(gw, 0, 1, "t").is_err());
        assert!(KillSwitchPlan::new(gw, 1, 0, "t").is_err());
        assert!(KillSwitchPlan::new(gw, 1, 1, "0123456789abcde").is_ok());
    }

    #[test]
    fn a_plan_holds_a_list_of_gateways() {
        let plan = plan4()
            .with_gateway("2001:db8::1".parse().unwrap(), 443, 444)
            .unwrap()
            .with_gateway("198.18.0.1".parse().unwrap(), 51820, 51820)
            .unwrap();
        let addrs: Vec<String> = plan.gateways().iter().map(|g| g.addr.to_string()).collect();
        assert_eq!(addrs, ["198.18.0.1", "2001:db8::1"], "duplicates are ignored");
        assert_eq!(plan.gateway(), "198.18.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn plan_from_client_file() {
        let text = r#"
            name = "alice"
            endpoint = "198.18.0.1:51820"
            server_name = "gw"
            tunnel_ip = "100.64.0.2"
            [tls]
            [network]
            tun_name = "hf9"
            allow_lan = true
        "#;
        let file = ClientFile::parse(text, Path::new("c.toml")).unwrap();
        let lan: Vec<IpNet> = vec!["192.168.7.9/24".parse().unwrap()];
        let plan = KillSwitchPlan::for_client(&file, &lan).unwrap();
        assert_eq!(plan.gateway(), "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((plan.control_port(), plan.data_port()), (51820, 51820));
        assert_eq!(plan.tun_name(), "hf9");
        assert_eq!(plan.lan(), Some(&["192.168.7.0/24".parse().unwrap()][..]));

        let no_lan = ClientFile::parse(&text.replace("allow_lan = true", ""), Path::new("c")).unwrap();
        assert_eq!(KillSwitchPlan::for_client(&no_lan, &lan).unwrap().lan(), None);
    }

    /// A listing as `nft -j` prints it for the plan, built from the plan's own rules.
    fn listing(plan: &KillSwitchPlan) -> serde_json::Value {
        let rules = rules::chains(plan);
        let mut items = vec![
            serde_json::json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
            serde_json::json!({"table": {"family": "inet", "name": "holdfast", "handle": 3}}),
        ];
        for name in ["output", "input"] {
            items.push(serde_json::json!({"chain": {"family": "inet", "table": "holdfast",
                "name": name, "handle": 1, "type": "filter", "hook": name, "prio": 0,
                "policy": "drop"}}));
        }
        for (name, chain) in rules.chains() {
            for r in chain {
                items.push(serde_json::json!({"rule": {"family": "inet", "table": "holdfast",
                    "chain": name, "handle": 9, "comment": r.why, "expr": []}}));
            }
        }
        serde_json::json!({ "nftables": items })
    }

    #[test]
    fn listing_check_accepts_the_plan_and_rejects_tampering() {
        let plan = plan4();
        let good = listing(&plan);
        check_listing(&good.to_string(), &plan).unwrap();

        let mutate = |f: &dyn Fn(&mut Vec<serde_json::Value>)| {
            let mut doc = good.clone();
            f(doc["nftables"].as_array_mut().unwrap());
            check_listing(&doc.to_string(), &plan)
        };
        let err = mutate(&|items| items[2]["chain"]["policy"] = "accept".into()).unwrap_err();
        assert!(err.to_string().contains("policy"), "{err}");
        assert!(mutate(&|items| items[3]["chain"]["prio"] = 10.into()).is_err());
        assert!(
            mutate(&|items| {
                items.pop();
            })
            .is_err()
        );
        assert!(
            mutate(&|items| items.push(serde_json::json!({"chain": {"family": "inet",
            "table": "holdfast", "name": "forward"}})))
            .is_err()
        );
        assert!(mutate(&|items| items.retain(|i| i.get("table").is_none())).is_err());
        // Rules in another order (loopback and tunnel swapped).
        assert!(mutate(&|items| items.swap(4, 6)).is_err());
        assert!(mutate(&|items| items[2]["chain"]["family"] = "ip".into()).is_err());
        assert!(check_listing("Error: No such file", &plan).is_err());
        let lan = plan4().allow_lan(&["10.0.0.0/8".parse().unwrap()]);
        assert!(check_listing(&listing(&lan).to_string(), &plan).is_err());
    }

    #[test]
    fn describe_names_the_permits() {
        let d = NftKillSwitch::new(plan4().allow_lan(&["10.1.0.0/16".parse().unwrap()])).describe();
        assert_eq!(
            d,
            "nftables inet holdfast: only via holdfast0 and to 198.18.0.1 (tcp 51820, udp 51820); \
             LAN 10.1.0.0/16"
        );
    }

    #[test]
    fn describe_shows_what_was_learnt_at_run_time() {
        let ks = NftKillSwitch::new(plan4());
        // Not enabled: the rules are only recomputed, nothing is applied.
        ks.allow_gateways(&["198.18.0.9:51821".parse().unwrap()]).unwrap();
        ks.restrict_tunnel_dns(&["100.64.0.1".parse().unwrap()]).unwrap();
        assert_eq!(
            ks.describe(),
            "nftables inet holdfast: only via holdfast0 and to 198.18.0.1 (tcp 51820, udp 51820), \
             198.18.0.9 (tcp 51821, udp 51821); no LAN; DNS in the tunnel only to 100.64.0.1"
        );
    }

    #[test]
    fn lan_subnets_skip_loopback() {
        let nets = lan_subnets("nothing").unwrap();
        assert!(nets.iter().all(|n| !n.addr().is_loopback()), "{nets:?}");
        assert!(nets.iter().all(|n| *n == n.trunc()));
    }
}
