//! The kill-switch: an nftables table of Holdfast's own that drops every packet that goes neither
//! through the tunnel nor to the gateway.
//!
//! `start()` enables it before anything else and only an explicit stop disables it, so no state of
//! the supervisor ever runs unprotected. The rules name the tunnel by interface *name* and the
//! gateway by address and ports, never anything from a session, so they stay valid across re-auth,
//! Degraded, Backoff and gateway restarts, and even before the TUN device exists.
//!
//! Shape:
//! - [`KillSwitchPlan`]: everything the rules depend on, checked once.
//! - [`render_ruleset`] (pure): the plan as one `nft -f` batch that creates the table
//!   `inet holdfast` *or updates it in place, atomically* (a previous run killed with SIGKILL
//!   leaves its table, failing closed; the next start swaps the rules in one transaction while the
//!   drop policies stay hooked, so there is no instant without protection). Golden-tested below.
//! - [`check_listing`] (pure): compares `nft -j list table inet holdfast` with the plan.
//! - [`NftKillSwitch`]: the IO shell that runs `nft`.
//! - [`unblock`]: removes what a killed client left behind (`holdfast client unblock`).
//!
//! One table per network namespace: two clients in one namespace would replace each other's rules.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use ipnet::IpNet;

use super::dataplane::DEFAULT_TUN_NAME;
use crate::config::client::ClientFile;

const TARGET: &str = "holdfast::killswitch";

/// The nftables table (family `inet`, so IPv4 and IPv6 both) that holds every rule of ours.
pub const TABLE: &str = "holdfast";

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
    /// A short description for logs and the dashboard.
    fn describe(&self) -> String;
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

/// Everything the rules depend on. Nothing here changes while the client runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillSwitchPlan {
    gateway: IpAddr,
    control_port: u16,
    data_port: u16,
    tun_name: String,
    allow_lan: bool,
    lan_subnets: Vec<IpNet>,
    /// DNS (issue 11): when not empty, DNS inside the tunnel may go to these resolvers only.
    tunnel_dns: Vec<IpAddr>,
}

impl KillSwitchPlan {
    /// A plan that allows the gateway's control port (TCP) and data port (UDP) at `gateway`, and
    /// everything through the interface `tun_name`. No LAN access.
    pub fn new(
        gateway: IpAddr,
        control_port: u16,
        data_port: u16,
        tun_name: &str,
    ) -> Result<Self, KillSwitchError> {
        check_ifname(tun_name).map_err(KillSwitchError::InvalidPlan)?;
        if gateway.is_unspecified() || gateway.is_loopback() || gateway.is_multicast() {
            return Err(KillSwitchError::InvalidPlan(format!(
                "the gateway address {gateway} is not a unicast address of another host"
            )));
        }
        if control_port == 0 || data_port == 0 {
            return Err(KillSwitchError::InvalidPlan("the gateway's port is 0".into()));
        }
        Ok(Self {
            gateway,
            control_port,
            data_port,
            tun_name: tun_name.to_owned(),
            allow_lan: false,
            lan_subnets: Vec::new(),
            tunnel_dns: Vec::new(),
        })
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

    /// The plan for a client file: the gateway endpoint (its one port number serves the control
    /// plane over TCP and the data plane over UDP), the TUN name, and with `allow_lan` the given
    /// subnets (see [`lan_subnets`]).
    pub fn for_client(file: &ClientFile, lan: &[IpNet]) -> Result<Self, KillSwitchError> {
        let net = &file.network;
        let tun = net.tun_name.as_deref().unwrap_or(DEFAULT_TUN_NAME);
        let port = file.endpoint.port();
        // The resolvers a file names are known now; those a gateway pushes only after the first
        // answer, so with `dns = "gateway"` DNS through the tunnel is not restricted (it goes
        // encrypted to the gateway either way; outside the tunnel it is dropped in every case).
        let plan = Self::new(file.endpoint.ip(), port, port, tun)?.tunnel_dns_only(net.dns.configured());
        Ok(if net.allow_lan.unwrap_or(false) { plan.allow_lan(lan) } else { plan })
    }

    pub fn gateway(&self) -> IpAddr {
        self.gateway
    }
    pub fn control_port(&self) -> u16 {
        self.control_port
    }
    pub fn data_port(&self) -> u16 {
        self.data_port
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
    if name.is_empty()
        || name.len() > 15
        || !name.chars().all(ok_char)
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "{name:?} is not a usable interface name (1-15 characters: letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

/// One rule of a chain: the nft statement and the comment that names its purpose. The comment is
/// shown by `nft list ruleset` (so a user sees why a packet passes) and is what [`check_listing`]
/// compares, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    statement: String,
    why: &'static str,
}

fn rule(statement: impl Into<String>, why: &'static str) -> Rule {
    Rule { statement: statement.into(), why }
}

/// `ip` or `ip6`, for a match on an address of that family.
fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "ip" } else { "ip6" }
}

fn net_family(net: &IpNet) -> &'static str {
    family(net.addr())
}

/// The rules of the `output` and `input` chains, in order. Order matters: the DNS drop comes after
/// the tunnel and gateway accepts (a gateway on port 53 keeps working) and before the DHCP, ND
/// and LAN accepts (a LAN resolver is never reachable outside the tunnel).
fn chains(plan: &KillSwitchPlan) -> (Vec<Rule>, Vec<Rule>) {
    let tun = &plan.tun_name;
    let gw = plan.gateway;
    let ip = family(gw);
    let (cp, dp) = (plan.control_port, plan.data_port);

    let mut output = vec![rule(r#"oifname "lo" accept"#, "loopback")];
    // DNS (issue 11): in the tunnel, port 53 only to the plan's resolvers (one rule per family).
    output.extend(tunnel_dns_rules(plan));
    output.extend([
        rule(format!(r#"oifname "{tun}" accept"#), "tunnel"),
        rule(format!("{ip} daddr {gw} tcp dport {cp} accept"), "gateway control"),
        rule(format!("{ip} daddr {gw} udp dport {dp} accept"), "gateway data"),
        rule("meta l4proto { tcp, udp } th dport 53 drop", "dns outside the tunnel"),
        rule("udp sport 68 udp dport 67 accept", "dhcpv4"),
        rule("udp sport 546 udp dport 547 accept", "dhcpv6"),
        // Hop limit 255: neighbour discovery never leaves the link (RFC 4861).
        rule(
            "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } \
             ip6 hoplimit 255 accept",
            "ipv6 neighbour discovery",
        ),
    ]);
    let mut input = vec![
        rule(r#"iifname "lo" accept"#, "loopback"),
        rule(format!(r#"iifname "{tun}" accept"#), "tunnel"),
        // Only replies: the client opens the control connection, never the gateway.
        rule(
            format!("{ip} saddr {gw} tcp sport {cp} ct state established accept"),
            "gateway control",
        ),
        // Not tied to conntrack state: every datagram is authenticated by the data plane, and the
        // gateway may answer after conntrack forgot the flow (a long outage, a flushed table).
        rule(format!("{ip} saddr {gw} udp sport {dp} accept"), "gateway data"),
        // Path-MTU and unreachable errors about flows the output chain let through.
        rule(
            "meta l4proto { icmp, icmpv6 } ct state related accept",
            "icmp errors of allowed flows",
        ),
        rule("meta l4proto { tcp, udp } th sport 53 drop", "dns outside the tunnel"),
        rule("udp sport 67 udp dport 68 accept", "dhcpv4"),
        rule("udp sport 547 udp dport 546 accept", "dhcpv6"),
        rule(
            "icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } \
             ip6 hoplimit 255 accept",
            "ipv6 neighbour discovery",
        ),
    ];
    if let Some(lan) = plan.lan() {
        for net in lan {
            let f = net_family(net);
            output.push(rule(format!("{f} daddr {net} accept"), "lan"));
            input.push(rule(format!("{f} saddr {net} accept"), "lan"));
        }
    }
    (output, input)
}

/// DNS through the tunnel to anything but `plan.tunnel_dns` is dropped: for each family, port 53
/// to another address of that family (or to any, when no resolver of that family is listed).
/// Nothing when the plan does not restrict it.
fn tunnel_dns_rules(plan: &KillSwitchPlan) -> Vec<Rule> {
    if plan.tunnel_dns.is_empty() {
        return Vec::new();
    }
    let tun = &plan.tun_name;
    [("ip", "ipv4", true), ("ip6", "ipv6", false)]
        .into_iter()
        .map(|(f, nfproto, v4)| {
            let list: Vec<String> =
                plan.tunnel_dns.iter().filter(|a| a.is_ipv4() == v4).map(ToString::to_string).collect();
            let to = if list.is_empty() {
                format!("meta nfproto {nfproto}")
            } else {
                format!("{f} daddr != {{ {} }}", list.join(", "))
            };
            rule(
                format!(r#"oifname "{tun}" {to} meta l4proto {{ tcp, udp }} th dport 53 drop"#),
                "dns in the tunnel to other resolvers",
            )
        })
        .collect()
}

/// Declares the table (a no-op if it exists) and deletes it: in one batch this removes any previous
/// table without failing when there is none. `destroy table` would do it in one line but needs
/// nft >= 1.0.8.
const REMOVE_BATCH: &str = "table inet holdfast {}\ndelete table inet holdfast\n";

const HEADER: &str = "# Holdfast kill-switch. Remove it with `holdfast client unblock`.\n";

/// The base chains with their hooks and policies (no rules).
fn chain_skeleton() -> String {
    let mut s = String::from("table inet holdfast {\n");
    for name in ["output", "input"] {
        // Writing to a String cannot fail.
        let _ = writeln!(s, "\tchain {name} {{");
        let _ = writeln!(s, "\t\ttype filter hook {name} priority 0; policy drop;");
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// The plan's rules, added to the (existing) chains.
fn chain_rules(plan: &KillSwitchPlan) -> String {
    let (output, input) = chains(plan);
    let mut s = String::from("table inet holdfast {\n");
    for (name, rules) in [("output", &output), ("input", &input)] {
        let _ = writeln!(s, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(s, "\t\t{} comment \"{}\"", r.statement, r.why);
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// The kill-switch as one `nft -f` batch (one transaction: the kernel applies all of it or none)
/// that creates the table, or *updates it in place* when a previous run left it: the base chains
/// are declared (a no-op when they exist with the same hook and policy), their rules flushed and
/// the new rules added. Rules are switched atomically (by generation); the chains and their drop
/// policy stay in place throughout, so no packet passes during the update.
///
/// Why not delete and re-create the table in the batch: that leaks. The first version of this code
/// did it, and `a_leftover_table_is_replaced_without_a_gap` (tests/killswitch_netns.rs), which
/// streams probes while replacing the table 30 times, saw 4 to 13 probes pass on Linux 6.18;
/// updated in place, none pass. The likely cause, from reading nf_tables: a base chain created in
/// a transaction is hooked in before the commit with policy accept and only gets its `drop` policy
/// during the commit, while the old table's chains are unhooked in the same commit.
pub fn render_ruleset(plan: &KillSwitchPlan) -> String {
    format!("{HEADER}{}flush table inet holdfast\n{}", chain_skeleton(), chain_rules(plan))
}

/// The fallback when the table cannot be updated in place (a chain with another hook or priority,
/// an extra chain, from some other version): delete it and build it anew, in one transaction.
/// This has the short window described at [`render_ruleset`]; it is used only when the in-place
/// update fails or does not verify.
pub fn render_rebuild(plan: &KillSwitchPlan) -> String {
    format!("{HEADER}{REMOVE_BATCH}{}{}", chain_skeleton(), chain_rules(plan))
}

/// The batch that removes the table (whether or not it exists).
pub fn render_removal() -> &'static str {
    REMOVE_BATCH
}

/// Checks `nft -j list table inet holdfast` output against the plan: the table exists, it has
/// exactly the chains `output` and `input`, each a filter chain on its hook at priority 0 with
/// policy drop, holding exactly the plan's rules in order (compared by their comments).
pub fn check_listing(json: &str, plan: &KillSwitchPlan) -> Result<(), KillSwitchError> {
    let bad = |m: String| KillSwitchError::Verify(m);
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("nft printed invalid JSON: {e}")))?;
    let items = doc
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("nft printed no `nftables` array".into()))?;
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
    let mut names: Vec<&str> =
        chains_listed.iter().filter_map(|c| c.get("name").and_then(|v| v.as_str())).collect();
    names.sort_unstable();
    if names != ["input", "output"] {
        return Err(bad(format!("expected chains input and output, found {names:?}")));
    }
    let (output, input) = chains(plan);
    for (name, expected) in [("output", &output), ("input", &input)] {
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
        let (addr, mask) =
            unsafe { (sockaddr_to_ip(ifa.ifa_addr), sockaddr_to_ip(ifa.ifa_netmask)) };
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

/// The nftables kill-switch: runs `nft` (which must be installed).
#[derive(Debug, Clone)]
pub struct NftKillSwitch {
    plan: KillSwitchPlan,
    nft: PathBuf,
}

impl NftKillSwitch {
    pub fn new(plan: KillSwitchPlan) -> Self {
        Self { plan, nft: PathBuf::from("nft") }
    }

    /// Uses another `nft` program (a full path, or a stand-in in tests).
    pub fn with_nft_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.nft = program.into();
        self
    }

    pub fn plan(&self) -> &KillSwitchPlan {
        &self.plan
    }

    /// Checks the table the kernel lists against the plan.
    fn verify(&self) -> Result<(), KillSwitchError> {
        let listing = run_nft(&self.nft, &["-j", "list", "table", "inet", TABLE])
            .map_err(|e| KillSwitchError::Verify(format!("cannot list the table: {e}")))?;
        check_listing(&listing, &self.plan)
    }

    /// Whether the table exists in this namespace (whoever made it).
    pub fn table_present(&self) -> Result<bool, KillSwitchError> {
        table_present(&self.nft)
    }
}

impl KillSwitch for NftKillSwitch {
    fn enable(&self) -> Result<(), KillSwitchError> {
        // Every `nft` run is a process start (about 10 ms), and `start()` waits for this: the
        // common case takes two (the batch, which creates the table or updates a leftover one in
        // place, and the verification); the presence check only runs when those fail.
        let applied = run_nft_batch(&self.nft, &render_ruleset(&self.plan))
            .map_err(KillSwitchError::Enable)
            .and_then(|()| self.verify());
        if let Err(e) = applied {
            if !table_present(&self.nft).unwrap_or(false) {
                return Err(e);
            }
            // Only a table left by something else gets here; rebuilding it is still one
            // transaction, and the result is verified like any other.
            tracing::warn!(target: TARGET, "updating the existing kill-switch table failed ({e}); rebuilding it");
            run_nft_batch(&self.nft, &render_rebuild(&self.plan))
                .map_err(KillSwitchError::Enable)?;
            self.verify()?;
        }
        tracing::info!(target: TARGET, "kill-switch on: {}", self.describe());
        Ok(())
    }

    fn disable(&self) -> Result<(), KillSwitchError> {
        run_nft_batch(&self.nft, REMOVE_BATCH).map_err(KillSwitchError::Disable)?;
        tracing::info!(target: TARGET, "kill-switch off: table inet {TABLE} removed");
        Ok(())
    }

    fn describe(&self) -> String {
        let p = &self.plan;
        let lan = match p.lan() {
            None => "no LAN".to_owned(),
            Some(nets) => {
                let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
                format!("LAN {}", list.join(" "))
            }
        };
        format!(
            "nftables inet {TABLE}: only via {} and to {} (tcp {}, udp {}); {lan}",
            p.tun_name, p.gateway, p.control_port, p.data_port
        )
    }
}

/// Runs `nft args...`, returning stdout, or a message with nft's stderr.
fn run_nft(nft: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(nft)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e} (is nftables installed?)", nft.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {} failed ({}): {}",
            nft.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Feeds `batch` to `nft -f -`: one transaction.
fn run_nft_batch(nft: &Path, batch: &str) -> Result<(), String> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e} (is nftables installed?)", nft.display()))?;
    // A write error (nft died early) shows up as a failed exit status below, with nft's message.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(batch.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("nft did not finish: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn table_present(nft: &Path) -> Result<bool, KillSwitchError> {
    let out = Command::new(nft)
        .args(["list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| KillSwitchError::Disable(format!("cannot run {}: {e}", nft.display())))?;
    Ok(out.success())
}

/// `holdfast client unblock`: removes what a client killed without a stop left behind in this
/// namespace — the kill-switch table, the resolver file it rewrote, the host route to the gateway —
/// so a user can get out without starting the client. Safe to run when nothing is left (it says
/// so). Returns a one-line summary for the user.
pub fn unblock() -> Result<String, KillSwitchError> {
    unblock_with(Path::new("nft"), Path::new(super::dns::SYSTEM_RESOLV_CONF))
}

/// [`unblock`] with an explicit `nft` program and resolver file (tests).
pub fn unblock_with(nft: &Path, resolv_conf: &Path) -> Result<String, KillSwitchError> {
    // Each of the three is attempted whatever happened to the others: a user locked out wants
    // back as much as can be given back.
    let mut done = Vec::new();
    let mut failed = Vec::new();
    match table_present(nft).and_then(|had| {
        run_nft_batch(nft, REMOVE_BATCH).map(|()| had).map_err(KillSwitchError::Disable)
    }) {
        Ok(true) => done.push(format!("removed the kill-switch (table inet {TABLE})")),
        Ok(false) => done.push("no kill-switch was active".to_owned()),
        Err(e) => failed.push(e.to_string()),
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

    const GOLDEN_FULL: &str = r#"# Holdfast kill-switch. Remove it with `holdfast client unblock`.
table inet holdfast {
	chain output {
		type filter hook output priority 0; policy drop;
	}
	chain input {
		type filter hook input priority 0; policy drop;
	}
}
flush table inet holdfast
table inet holdfast {
	chain output {
		oifname "lo" accept comment "loopback"
		oifname "holdfast0" accept comment "tunnel"
		ip daddr 198.18.0.1 tcp dport 51820 accept comment "gateway control"
		ip daddr 198.18.0.1 udp dport 51820 accept comment "gateway data"
		meta l4proto { tcp, udp } th dport 53 drop comment "dns outside the tunnel"
		udp sport 68 udp dport 67 accept comment "dhcpv4"
		udp sport 546 udp dport 547 accept comment "dhcpv6"
		icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
	}
	chain input {
		iifname "lo" accept comment "loopback"
		iifname "holdfast0" accept comment "tunnel"
		ip saddr 198.18.0.1 tcp sport 51820 ct state established accept comment "gateway control"
		ip saddr 198.18.0.1 udp sport 51820 accept comment "gateway data"
		meta l4proto { icmp, icmpv6 } ct state related accept comment "icmp errors of allowed flows"
		meta l4proto { tcp, udp } th sport 53 drop comment "dns outside the tunnel"
		udp sport 67 udp dport 68 accept comment "dhcpv4"
		udp sport 547 udp dport 546 accept comment "dhcpv6"
		icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
	}
}
"#;

    #[test]
    fn golden_full_tunnel() {
        assert_eq!(render_ruleset(&plan4()), GOLDEN_FULL);
    }

    #[test]
    fn golden_allow_lan_and_ipv6_gateway() {
        let plan = KillSwitchPlan::new("2001:2::1".parse().unwrap(), 443, 4443, "wg-x_1.2")
            .unwrap()
            .allow_lan(&[
                "192.168.1.77/24".parse().unwrap(),
                "fe80::1234/64".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
            ]);
        let text = render_ruleset(&plan);
        let rules = text.split("flush table inet holdfast\n").nth(1).unwrap();
        let output: Vec<&str> = rules
            .lines()
            .skip_while(|l| !l.contains("chain output"))
            .take_while(|l| !l.contains("chain input"))
            .collect();
        let expected_output = r#"	chain output {
		oifname "lo" accept comment "loopback"
		oifname "wg-x_1.2" accept comment "tunnel"
		ip6 daddr 2001:2::1 tcp dport 443 accept comment "gateway control"
		ip6 daddr 2001:2::1 udp dport 4443 accept comment "gateway data"
		meta l4proto { tcp, udp } th dport 53 drop comment "dns outside the tunnel"
		udp sport 68 udp dport 67 accept comment "dhcpv4"
		udp sport 546 udp dport 547 accept comment "dhcpv6"
		icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept comment "ipv6 neighbour discovery"
		ip daddr 192.168.1.0/24 accept comment "lan"
		ip6 daddr fe80::/64 accept comment "lan"
	}"#;
        assert_eq!(output.join("\n"), expected_output);
        assert!(text.contains("\t\tip6 saddr 2001:2::1 tcp sport 443 ct state established accept"));
        assert!(text.contains("\t\tip6 saddr 2001:2::1 udp sport 4443 accept"));
        // LAN accepts come last in input too, after the DNS drop.
        let input_tail: Vec<&str> = text.lines().rev().skip(2).take(3).collect();
        assert_eq!(
            input_tail,
            [
                "\t\tip6 saddr fe80::/64 accept comment \"lan\"",
                "\t\tip saddr 192.168.1.0/24 accept comment \"lan\"",
                "\t\ticmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } ip6 hoplimit 255 accept comment \"ipv6 neighbour discovery\"",
            ]
        );
    }

    #[test]
    fn dns_drop_precedes_dhcp_nd_and_lan_but_follows_tunnel_and_gateway() {
        let plan = plan4().allow_lan(&["10.0.0.0/8".parse().unwrap()]);
        for chain in [chains(&plan).0, chains(&plan).1] {
            let pos = |why: &str| chain.iter().position(|r| r.why == why).unwrap();
            let dns = pos("dns outside the tunnel");
            for before in ["loopback", "tunnel", "gateway control", "gateway data"] {
                assert!(pos(before) < dns, "{before} must precede the DNS drop");
            }
            for after in ["dhcpv4", "dhcpv6", "ipv6 neighbour discovery", "lan"] {
                assert!(pos(after) > dns, "{after} must follow the DNS drop");
            }
        }
    }

    #[test]
    fn tunnel_dns_is_restricted_to_the_named_resolvers_only_when_asked() {
        // Not restricted by default: the golden full tunnel is unchanged.
        assert!(plan4().tunnel_dns().is_empty());
        let plan = plan4().tunnel_dns_only(&["100.64.0.1".parse().unwrap(), "100.64.0.1".parse().unwrap()]);
        assert_eq!(plan.tunnel_dns(), ["100.64.0.1".parse::<IpAddr>().unwrap()]);
        let text = render_ruleset(&plan);
        assert!(text.contains(
            "\t\toifname \"holdfast0\" ip daddr != { 100.64.0.1 } meta l4proto { tcp, udp } th dport 53 drop comment \"dns in the tunnel to other resolvers\"\n\
             \t\toifname \"holdfast0\" meta nfproto ipv6 meta l4proto { tcp, udp } th dport 53 drop comment \"dns in the tunnel to other resolvers\"\n\
             \t\toifname \"holdfast0\" accept comment \"tunnel\"\n"
        ), "{text}");
        let both = plan4().tunnel_dns_only(&["fd00::1".parse().unwrap(), "100.64.0.1".parse().unwrap()]);
        assert!(render_ruleset(&both).contains("ip6 daddr != { fd00::1 } meta l4proto"));
    }

    #[test]
    fn removal_batch_tolerates_a_missing_table() {
        assert_eq!(render_removal(), "table inet holdfast {}\ndelete table inet holdfast\n");
        // The normal batch never deletes the table (that would open a window); the rebuild does,
        // then declares exactly what the normal batch declares.
        assert!(!render_ruleset(&plan4()).contains("delete"));
        let rebuild = render_rebuild(&plan4());
        let normal = render_ruleset(&plan4()).replace("flush table inet holdfast\n", "");
        let header_end = normal.find('\n').unwrap() + 1;
        assert_eq!(
            rebuild,
            format!("{}{}{}", &normal[..header_end], render_removal(), &normal[header_end..])
        );
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
        }
        assert!(KillSwitchPlan::new(gw, 0, 1, "t").is_err());
        assert!(KillSwitchPlan::new(gw, 1, 0, "t").is_err());
        assert!(KillSwitchPlan::new(gw, 1, 1, "0123456789abcde").is_ok());
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

        let no_lan =
            ClientFile::parse(&text.replace("allow_lan = true", ""), Path::new("c")).unwrap();
        assert_eq!(KillSwitchPlan::for_client(&no_lan, &lan).unwrap().lan(), None);
    }

    /// A listing as `nft -j` prints it for the plan, built from the plan's own rules.
    fn listing(plan: &KillSwitchPlan) -> serde_json::Value {
        let (output, input) = chains(plan);
        let mut items = vec![
            serde_json::json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
            serde_json::json!({"table": {"family": "inet", "name": "holdfast", "handle": 3}}),
        ];
        for name in ["output", "input"] {
            items.push(serde_json::json!({"chain": {"family": "inet", "table": "holdfast",
                "name": name, "handle": 1, "type": "filter", "hook": name, "prio": 0,
                "policy": "drop"}}));
        }
        for (name, rules) in [("output", output), ("input", input)] {
            for r in rules {
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
        // Policy accept instead of drop.
        let err = mutate(&|items| items[2]["chain"]["policy"] = "accept".into()).unwrap_err();
        assert!(err.to_string().contains("policy"), "{err}");
        // Hook priority moved.
        assert!(mutate(&|items| items[3]["chain"]["prio"] = 10.into()).is_err());
        // A rule missing.
        assert!(
            mutate(&|items| {
                items.pop();
            })
            .is_err()
        );
        // An extra chain (e.g. someone added an accepting forward chain to our table).
        assert!(
            mutate(&|items| items.push(serde_json::json!({"chain": {"family": "inet",
            "table": "holdfast", "name": "forward"}})))
            .is_err()
        );
        // Table missing altogether.
        assert!(mutate(&|items| items.retain(|i| i.get("table").is_none())).is_err());
        // Rules in another order.
        assert!(mutate(&|items| items.swap(4, 5)).is_err());
        // Same-named objects in another family are not ours.
        assert!(mutate(&|items| items[2]["chain"]["family"] = "ip".into()).is_err());
        // Not JSON at all.
        assert!(check_listing("Error: No such file", &plan).is_err());
        // A listing for another plan (LAN opened) does not match this one.
        let lan = plan4().allow_lan(&["10.0.0.0/8".parse().unwrap()]);
        assert!(check_listing(&listing(&lan).to_string(), &plan).is_err());
    }

    #[test]
    fn enable_fails_clearly_without_nft() {
        let ks = NftKillSwitch::new(plan4()).with_nft_program("/nonexistent/nft");
        let err = ks.enable().unwrap_err();
        assert!(matches!(err, KillSwitchError::Enable(_)), "{err:?}");
        assert!(err.to_string().contains("is nftables installed"), "{err}");
        assert!(ks.disable().is_err());
    }

    #[test]
    fn enable_fails_when_nft_rejects_the_batch() {
        // `false` stands in for an nft that rejects the ruleset (old kernel, no permission).
        let ks = NftKillSwitch::new(plan4()).with_nft_program("false");
        assert!(matches!(ks.enable(), Err(KillSwitchError::Enable(_))));
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
    fn lan_subnets_skip_loopback() {
        let nets = lan_subnets("nothing").unwrap();
        assert!(nets.iter().all(|n| !n.addr().is_loopback()), "{nets:?}");
        assert!(nets.iter().all(|n| *n == n.trunc()));
    }
}
