//! The client registry: one TOML file (`DIR/clients.toml` by default) that maps each client name to
//! its tunnel address, the fingerprint of the one certificate it may use, and whether it is
//! revoked.
//!
//! ```toml
//! [[client]]
//! name = "alice"
//! ip = "100.64.0.2"
//! ip6 = "fd12:3456:789a:1::2"  # its IPv6 tunnel address (entries from before IPv6 get one on upgrade)
//! state = "active"            # or "revoked": the entry stays, so its address stays reserved
//! cert_sha256 = "3f1c..."     # SHA-256 of the client's certificate (DER), 64 hex digits
//! created = "2025-01-01T12:00:00Z"
//! cert_issued = "2025-01-01T12:00:00Z"
//! revoked_at = "2025-02-01T08:00:00Z"   # only when revoked
//! ```
//!
//! Why a pinned fingerprint on top of the authority's signature: re-adding a client issues a new
//! certificate, and the old one (still validly signed) must stop working at once, without a CRL.
//!
//! Every change is a whole-file atomic replacement ([`fsutil::write_atomic`]) under a lock file,
//! so a crash never leaves the registry half-written and two concurrent `add-client` runs cannot
//! lose each other's entry. The running gateway reloads the file when it changes (see
//! [`super::live`]).

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub mod file;
pub mod postgres;
mod store;

pub use store::{RegistrySnapshot, RegistryStore};

use super::fsutil::{self, Existing};
use crate::config::gateway::{Tunnel6, check_host_in, check_host6_in};
// The naming rule is the config layer's (a gateway's `name` follows it too); re-exported here,
// where the registry's callers look for it.
pub use crate::config::{MAX_NAME_LEN, check_name};
use crate::pki::CertFingerprint;

/// A problem with the registry or a requested change to it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry file exists but cannot be read.
    #[error("cannot read the client registry {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The registry file does not parse or is inconsistent.
    #[error("invalid client registry {}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    /// Writing the registry (or taking its lock) failed; the previous version is intact.
    #[error("cannot write the client registry {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    /// A client name breaks the naming rule.
    #[error("invalid client name '{name}': {reason}")]
    InvalidName { name: String, reason: String },
    /// `add-client` for a name that is registered and active.
    #[error("client '{name}' is already registered (active, {ip}); revoke it first to issue a new client file")]
    AlreadyActive { name: String, ip: Ipv4Addr },
    /// `revoke` (or a lookup) for a name that is not in the registry.
    #[error("client '{name}' is not registered")]
    NotRegistered { name: String },
    /// `--ip` names an address that cannot be given to this client.
    #[error("address {ip} cannot be assigned: {reason}")]
    AddressUnavailable { ip: Ipv4Addr, reason: String },
    /// Every address in the subnet is taken (revoked entries keep theirs).
    #[error("no free address left in {subnet} (revoked clients keep their addresses)")]
    SubnetFull { subnet: Ipv4Net },
    /// `database` in gateway.toml (or `--registry`) is not a usable PostgreSQL URL.
    #[error("invalid database URL '{url}': {reason}")]
    DatabaseUrl { url: String, reason: String },
    /// The database server cannot be reached (or the database does not exist).
    #[error("cannot reach the registry database {db}: {reason}")]
    DatabaseUnreachable { db: String, reason: String },
    /// The database refused the user name or password.
    #[error("the registry database {db} refused the credentials: {reason}")]
    DatabaseAuth { db: String, reason: String },
    /// The database's schema was made by a newer holdfast; this binary does not touch it.
    #[error(
        "the registry database {db} has schema version {version}, newer than this holdfast knows (up to {known}); upgrade holdfast"
    )]
    SchemaNewer { db: String, version: i64, known: i64 },
    /// Any other database failure (a query or a migration failed).
    #[error("registry database {db}: {reason}")]
    Database { db: String, reason: String },
    /// The database holds no deployment yet (`gateway init --registry` creates one).
    #[error("the registry database {db} holds no deployment; create one with `holdfast gateway init --registry URL`")]
    NoDeployment { db: String },
    /// `init --registry` on a database that already holds a deployment.
    #[error(
        "the registry database {db} already holds a deployment (subnet {subnet}); add a gateway to it with `holdfast gateway join`"
    )]
    DeploymentExists { db: String, subnet: Ipv4Net },
    /// gateway.toml's subnet or tunnel address disagrees with the deployment's.
    #[error(
        "this gateway's subnet {ours} (gateway {ours_ip}) differs from the deployment's {theirs} (gateway {theirs_ip}) in {db}; every gateway of a deployment serves the same subnet"
    )]
    DeploymentMismatch { db: String, ours: Ipv4Net, ours_ip: Ipv4Addr, theirs: Ipv4Net, theirs_ip: Ipv4Addr },
    /// gateway.toml's IPv6 tunnel plan disagrees with the deployment's.
    #[error(
        "this gateway's IPv6 tunnel plan {ours} differs from the deployment's {theirs} in {db}; every gateway of a deployment serves the same subnets"
    )]
    Deployment6Mismatch { db: String, ours: String, theirs: String },
    /// Another gateway of the deployment already uses this endpoint.
    #[error("endpoint {endpoint} is already a gateway of this deployment ('{name}')")]
    EndpointTaken { endpoint: String, name: String },
    /// Every address in the IPv6 subnet is taken (only possible with a long `subnet6` prefix).
    #[error("no free address left in {subnet} (revoked clients keep their addresses)")]
    Subnet6Full { subnet: ipnet::Ipv6Net },
}

/// Whether a client may authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientState {
    Active,
    Revoked,
}

/// One registered client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub name: String,
    /// The client's tunnel address: fixed for the life of the entry, revoked or not.
    pub ip: Ipv4Addr,
    /// The client's IPv6 tunnel address, fixed like `ip`. `None` only in a registry written
    /// before IPv6, until the gateway's upgrade ([`Registry::assign_missing_ip6`]) gives it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub state: ClientState,
    /// The only certificate this client may present.
    #[serde(with = "fingerprint_hex")]
    pub cert_sha256: CertFingerprint,
    /// When the name was first registered (RFC 3339).
    pub created: String,
    /// When the current certificate was issued (RFC 3339).
    pub cert_issued: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

mod fingerprint_hex {
    use super::CertFingerprint;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(fp: &CertFingerprint, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(fp)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CertFingerprint, D::Error> {
        let s = String::deserialize(d)?;
        CertFingerprint::from_hex(&s).ok_or_else(|| D::Error::custom("expected 64 hex digits (SHA-256)"))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default, rename = "client")]
    clients: Vec<ClientEntry>,
}

const HEADER: &str = "# Holdfast client registry. Rewritten as a whole by `holdfast gateway add-client` and\n\
                      # `revoke`; the running gateway reloads it when it changes. Prefer the commands to\n\
                      # editing by hand.\n\n";

fn valid_name(name: &str) -> Result<(), RegistryError> {
    check_name(name).map_err(|reason| RegistryError::InvalidName { name: name.to_owned(), reason })
}

/// The current time as an RFC 3339 string (seconds), for the registry's timestamps.
pub fn timestamp_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The registry, as loaded from its file and checked against the gateway's subnet.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    v6: Option<Tunnel6>,
    clients: Vec<ClientEntry>,
}

/// The lowest host address of `subnet` that is neither the gateway's nor in `taken`: how a new
/// client gets its IPv4 address. Pure, so every registry store allocates the same way.
pub fn next_free_ip4(subnet: Ipv4Net, gateway_ip: Ipv4Addr, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    subnet.hosts().find(|ip| *ip != gateway_ip && !taken.contains(ip))
}

/// The IPv6 counterpart of [`next_free_ip4`]: the lowest address after the subnet-router anycast
/// address that is neither the gateway's nor in `taken`. Looks at most `taken.len() + 2`
/// candidates, however large the subnet.
pub fn next_free_ip6(plan: Tunnel6, taken: &HashSet<Ipv6Addr>) -> Option<Ipv6Addr> {
    let first = u128::from(plan.subnet.network()).checked_add(1)?;
    let last = u128::from(plan.subnet.broadcast());
    (first..=last).map(Ipv6Addr::from).take(taken.len() + 2).find(|ip| *ip != plan.gateway_ip && !taken.contains(ip))
}

/// What `add-client` is about to do, decided before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddPlan {
    pub ip: Ipv4Addr,
    /// The IPv6 address (`None` when the gateway has no IPv6 plan).
    pub ip6: Option<Ipv6Addr>,
    /// The name was revoked and is being re-enabled (same address, new certificate).
    pub reenable: bool,
}

/// Result of [`Registry::revoke`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    AlreadyRevoked,
}

impl Registry {
    /// An empty registry (what `init` writes).
    pub fn empty(path: &Path, subnet: Ipv4Net, gateway_ip: Ipv4Addr, v6: Option<Tunnel6>) -> Self {
        Self { path: path.to_owned(), subnet, gateway_ip, v6, clients: Vec::new() }
    }

    /// Loads the registry at `path`. A missing file is an empty registry (no client added yet).
    pub fn load(
        path: &Path,
        subnet: Ipv4Net,
        gateway_ip: Ipv4Addr,
        v6: Option<Tunnel6>,
    ) -> Result<Self, RegistryError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path, subnet, gateway_ip, v6),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::empty(path, subnet, gateway_ip, v6)),
            Err(source) => Err(RegistryError::Read { path: path.to_owned(), source }),
        }
    }

    /// Parses registry bytes and checks every entry: valid unique names, unique usable addresses
    /// inside `subnet` other than the gateway's, and the same for the IPv6 addresses against
    /// `v6` (an `ip6` without a `v6` plan is refused: the gateway could not route it).
    pub fn parse(
        bytes: &[u8],
        path: &Path,
        subnet: Ipv4Net,
        gateway_ip: Ipv4Addr,
        v6: Option<Tunnel6>,
    ) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::Malformed { path: path.to_owned(), reason };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let file: RegistryFile = toml::from_str(text).map_err(|e| bad(crate::config::toml_reason(text, &e)))?;
        let mut names = HashSet::new();
        let mut ips = HashSet::new();
        let mut ip6s = HashSet::new();
        for c in &file.clients {
            check_name(&c.name).map_err(|r| bad(format!("client name '{}': {r}", c.name)))?;
            if !names.insert(c.name.as_str()) {
                return Err(bad(format!("client '{}' appears twice", c.name)));
            }
            if !ips.insert(c.ip) {
                return Err(bad(format!("address {} is given to two clients", c.ip)));
            }
            check_host_in(subnet, c.ip)
                .and_then(|()| if c.ip == gateway_ip { Err("the gateway's own address".into()) } else { Ok(()) })
                .map_err(|r| bad(format!("client '{}' has address {}: {r}", c.name, c.ip)))?;
            if let Some(ip6) = c.ip6 {
                if !ip6s.insert(ip6) {
                    return Err(bad(format!("address {ip6} is given to two clients")));
                }
                let plan = v6.ok_or_else(|| {
                    bad(format!("client '{}' has IPv6 address {ip6} but gateway.toml has no `subnet6`", c.name))
                })?;
                check_host6_in(plan.subnet, ip6)
                    .and_then(
                        |()| {
                            if ip6 == plan.gateway_ip { Err("the gateway's own address".into()) } else { Ok(()) }
                        },
                    )
                    .map_err(|r| bad(format!("client '{}' has address {ip6}: {r}", c.name)))?;
            }
        }
        Ok(Self { path: path.to_owned(), subnet, gateway_ip, v6, clients: file.clients })
    }

    /// Writes the registry atomically (mode 0600: it is not secret, but it is the access list).
    pub fn save(&self) -> Result<(), RegistryError> {
        let file = RegistryFile { clients: self.clients.clone() };
        let body = toml::to_string(&file)
            .map_err(|e| RegistryError::Write { path: self.path.clone(), source: io::Error::other(e.to_string()) })?;
        let text = format!("{HEADER}{body}");
        fsutil::write_atomic(&self.path, text.as_bytes(), 0o600, Existing::Replace)
            .map_err(|source| RegistryError::Write { path: self.path.clone(), source })
    }

    /// Takes the registry's edit lock (`<registry>.lock`); hold it from load to save.
    pub fn lock(path: &Path) -> Result<fsutil::FileLock, RegistryError> {
        let mut lock = path.as_os_str().to_owned();
        lock.push(".lock");
        fsutil::FileLock::acquire(Path::new(&lock))
            .map_err(|source| RegistryError::Write { path: path.to_owned(), source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn clients(&self) -> &[ClientEntry] {
        &self.clients
    }

    pub fn get(&self, name: &str) -> Option<&ClientEntry> {
        self.clients.iter().find(|c| c.name == name)
    }

    /// Decides the address for `add-client NAME [--ip IP]` without changing anything:
    /// a revoked name gets its reserved address back; a new name gets `requested` (checked) or the
    /// lowest free address.
    pub fn plan_add(&self, name: &str, requested: Option<Ipv4Addr>) -> Result<AddPlan, RegistryError> {
        plan_add(&self.clients, self.subnet, self.gateway_ip, self.v6, name, requested)
    }

    /// The lowest host address of the subnet not used by the gateway or any entry.
    pub fn next_free(&self) -> Option<Ipv4Addr> {
        next_free_v4(&self.clients, self.subnet, self.gateway_ip)
    }

    /// The lowest free IPv6 address; `Ok(None)` when the gateway has no IPv6 plan.
    fn free_ip6(&self) -> Result<Option<Ipv6Addr>, RegistryError> {
        free_ip6(&self.clients, self.v6)
    }

    /// The in-place upgrade to dual stack: gives every entry without an IPv6 address the next
    /// free one (in file order, so the result does not depend on timing). IPv4 addresses are not
    /// touched. Returns the names upgraded; the caller saves (under the lock) if any.
    pub fn assign_missing_ip6(&mut self) -> Result<Vec<String>, RegistryError> {
        let mut done = Vec::new();
        for i in 0..self.clients.len() {
            if self.clients[i].ip6.is_none() {
                let Some(ip6) = self.free_ip6()? else { break };
                self.clients[i].ip6 = Some(ip6);
                done.push(self.clients[i].name.clone());
            }
        }
        Ok(done)
    }

    /// Records a (re-)added client with the certificate just issued for it. `plan` must come from
    /// [`Registry::plan_add`] on this same registry.
    pub fn commit_add(&mut self, name: &str, plan: AddPlan, cert: CertFingerprint, now: &str) {
        if let Some(existing) = self.clients.iter_mut().find(|c| c.name == name) {
            existing.ip6 = existing.ip6.or(plan.ip6);
            existing.state = ClientState::Active;
            existing.cert_sha256 = cert;
            existing.cert_issued = now.to_owned();
            existing.revoked_at = None;
            return;
        }
        self.clients.push(ClientEntry {
            name: name.to_owned(),
            ip: plan.ip,
            ip6: plan.ip6,
            state: ClientState::Active,
            cert_sha256: cert,
            created: now.to_owned(),
            cert_issued: now.to_owned(),
            revoked_at: None,
        });
    }

    /// Marks a client revoked. The entry stays, so its address stays reserved for it.
    pub fn revoke(&mut self, name: &str, now: &str) -> Result<RevokeOutcome, RegistryError> {
        valid_name(name)?;
        let entry = self
            .clients
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| RegistryError::NotRegistered { name: name.to_owned() })?;
        if entry.state == ClientState::Revoked {
            return Ok(RevokeOutcome::AlreadyRevoked);
        }
        entry.state = ClientState::Revoked;
        entry.revoked_at = Some(now.to_owned());
        Ok(RevokeOutcome::Revoked)
    }
}

/// Decides the address for `add-client NAME [--ip IP]` given every current entry, without
/// changing anything: a revoked name gets its reserved address back; a new name gets `requested`
/// (checked) or the lowest free address. Shared by every store (the file store under its lock
/// file, the database under its advisory lock, where a UNIQUE constraint backs it up).
pub fn plan_add(
    clients: &[ClientEntry],
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    v6: Option<Tunnel6>,
    name: &str,
    requested: Option<Ipv4Addr>,
) -> Result<AddPlan, RegistryError> {
    valid_name(name)?;
    if let Some(existing) = clients.iter().find(|c| c.name == name) {
        if existing.state == ClientState::Active {
            return Err(RegistryError::AlreadyActive { name: name.to_owned(), ip: existing.ip });
        }
        if let Some(ip) = requested.filter(|ip| *ip != existing.ip) {
            return Err(RegistryError::AddressUnavailable {
                ip,
                reason: format!("'{name}' keeps its reserved address {}; omit --ip", existing.ip),
            });
        }
        return Ok(AddPlan {
            ip: existing.ip,
            ip6: match existing.ip6 {
                Some(ip6) => Some(ip6),
                None => free_ip6(clients, v6)?,
            },
            reenable: true,
        });
    }
    let ip = match requested {
        Some(ip) => {
            check_free(clients, subnet, gateway_ip, ip)?;
            ip
        }
        None => next_free_v4(clients, subnet, gateway_ip).ok_or(RegistryError::SubnetFull { subnet })?,
    };
    Ok(AddPlan { ip, ip6: free_ip6(clients, v6)?, reenable: false })
}

/// The lowest free IPv6 address given every entry; `Ok(None)` when there is no IPv6 plan.
fn free_ip6(clients: &[ClientEntry], v6: Option<Tunnel6>) -> Result<Option<Ipv6Addr>, RegistryError> {
    let Some(plan) = v6 else { return Ok(None) };
    let taken: HashSet<Ipv6Addr> = clients.iter().filter_map(|c| c.ip6).collect();
    next_free_ip6(plan, &taken).map(Some).ok_or(RegistryError::Subnet6Full { subnet: plan.subnet })
}

fn check_free(
    clients: &[ClientEntry],
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    ip: Ipv4Addr,
) -> Result<(), RegistryError> {
    let unavailable = |reason: String| RegistryError::AddressUnavailable { ip, reason };
    check_host_in(subnet, ip).map_err(unavailable)?;
    if ip == gateway_ip {
        return Err(unavailable("it is the gateway's own address".into()));
    }
    if let Some(owner) = clients.iter().find(|c| c.ip == ip) {
        return Err(unavailable(format!("taken by '{}' ({:?})", owner.name, owner.state)));
    }
    Ok(())
}

/// The lowest host address of `subnet` used neither by the gateway nor by any entry.
pub fn next_free_v4(clients: &[ClientEntry], subnet: Ipv4Net, gateway_ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let taken: HashSet<Ipv4Addr> = clients.iter().map(|c| c.ip).collect();
    next_free_ip4(subnet, gateway_ip, &taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2025-01-01T00:00:00Z";

    fn subnet() -> Ipv4Net {
        "10.1.0.0/29".parse().unwrap() // hosts .1 to .6
    }

    fn fresh(dir: &Path) -> Registry {
        Registry::empty(&dir.join("clients.toml"), subnet(), Ipv4Addr::new(10, 1, 0, 1), Some(v6()))
    }

    fn v6() -> Tunnel6 {
        Tunnel6 { subnet: "fd00:1::/64".parse().unwrap(), gateway_ip: "fd00:1::1".parse().unwrap() }
    }

    fn reload(r: &Registry) -> Registry {
        Registry::load(r.path(), subnet(), Ipv4Addr::new(10, 1, 0, 1), Some(v6())).unwrap()
    }

    fn add(r: &mut Registry, name: &str, ip: Option<Ipv4Addr>, fp: u8) -> Result<AddPlan, RegistryError> {
        let plan = r.plan_add(name, ip)?;
        r.commit_add(name, plan, CertFingerprint([fp; 32]), NOW);
        r.save().unwrap();
        *r = reload(r);
        Ok(plan)
    }

    #[test]
    fn next_free_skips_gateway_and_taken_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = fresh(dir.path());
        assert_eq!(add(&mut r, "a", None, 1).unwrap().ip, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(add(&mut r, "b", Some(Ipv4Addr::new(10, 1, 0, 4)), 2).unwrap().ip, Ipv4Addr::new(10, 1, 0, 4));
        assert_eq!(add(&mut r, "c", None, 3).unwrap().ip, Ipv4Addr::new(10, 1, 0, 3));
        r.revoke("c", NOW).unwrap();
        r.save().unwrap();
        // c's address stays reserved.
        assert_eq!(add(&mut r, "d", None, 4).unwrap().ip, Ipv4Addr::new(10, 1, 0, 5));
        assert_eq!(add(&mut r, "e", None, 5).unwrap().ip, Ipv4Addr::new(10, 1, 0, 6));
        assert!(matches!(add(&mut r, "f", None, 6), Err(RegistryError::SubnetFull { .. })));
    }

    #[test]
    fn revoke_then_readd_keeps_the_address_and_pins_the_new_cert() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = fresh(dir.path());
        add(&mut r, "alice", None, 1).unwrap();
        add(&mut r, "bob", None, 2).unwrap();
        assert!(matches!(add(&mut r, "alice", None, 9), Err(RegistryError::AlreadyActive { .. })));
        assert_eq!(r.revoke("alice", NOW).unwrap(), RevokeOutcome::Revoked);
        assert_eq!(r.revoke("alice", NOW).unwrap(), RevokeOutcome::AlreadyRevoked);
        r.save().unwrap();
        let r2 = reload(&r);
        let a = r2.get("alice").unwrap();
        assert_eq!(
            (a.state, a.ip, a.revoked_at.as_deref()),
            (ClientState::Revoked, Ipv4Addr::new(10, 1, 0, 2), Some(NOW))
        );
        let mut r = r2;
        let err = add(&mut r, "alice", Some(Ipv4Addr::new(10, 1, 0, 5)), 3).unwrap_err();
        assert!(err.to_string().contains("keeps its reserved address 10.1.0.2"), "{err}");
        let plan = add(&mut r, "alice", None, 3).unwrap();
        assert_eq!(
            plan,
            AddPlan { ip: Ipv4Addr::new(10, 1, 0, 2), ip6: Some("fd00:1::2".parse().unwrap()), reenable: true }
        );
        let a = r.get("alice").unwrap();
        assert_eq!(a.state, ClientState::Active);
        assert_eq!(a.cert_sha256, CertFingerprint([3; 32]));
        assert_eq!(a.revoked_at, None);
        assert!(matches!(r.revoke("carol", NOW), Err(RegistryError::NotRegistered { .. })));
    }

    #[test]
    fn every_client_gets_a_stable_ip6_next_to_its_ip4() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = fresh(dir.path());
        let a = add(&mut r, "a", None, 1).unwrap();
        let b = add(&mut r, "b", None, 2).unwrap();
        assert_eq!(a.ip6, Some("fd00:1::2".parse().unwrap()));
        assert_eq!(b.ip6, Some("fd00:1::3".parse().unwrap()));
        assert_eq!(reload(&r).get("b").unwrap().ip6, b.ip6);
    }

    #[test]
    fn upgrade_in_place_adds_ip6_and_keeps_every_ip4() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clients.toml");
        // A registry written before IPv6: no `ip6` keys, and the gateway had no v6 plan.
        let mut old = Registry::empty(&p, subnet(), Ipv4Addr::new(10, 1, 0, 1), None);
        for (name, ip) in [("a", 5), ("b", 2), ("c", 3)] {
            let plan = old.plan_add(name, Some(Ipv4Addr::new(10, 1, 0, ip))).unwrap();
            assert_eq!(plan.ip6, None);
            old.commit_add(name, plan, CertFingerprint([ip; 32]), NOW);
        }
        old.revoke("c", NOW).unwrap();
        old.save().unwrap();
        assert!(!std::fs::read_to_string(&p).unwrap().contains("ip6"));
        let mut r = reload(&old);
        assert_eq!(r.assign_missing_ip6().unwrap(), ["a", "b", "c"]);
        r.save().unwrap();
        let r = reload(&r);
        for (before, after) in old.clients().iter().zip(r.clients()) {
            assert_eq!((&before.name, before.ip, before.state), (&after.name, after.ip, after.state));
        }
        let ip6 = |n| r.get(n).unwrap().ip6.unwrap().to_string();
        assert_eq!((ip6("a"), ip6("b"), ip6("c")), ("fd00:1::2".into(), "fd00:1::3".into(), "fd00:1::4".into()));
        let mut r = r;
        assert!(r.assign_missing_ip6().unwrap().is_empty());
    }

    #[test]
    fn next_free_ip6_is_pure_and_bounded() {
        let small = Tunnel6 { subnet: "fd00:1::/126".parse().unwrap(), gateway_ip: "fd00:1::1".parse().unwrap() };
        let mut taken = HashSet::new();
        assert_eq!(next_free_ip6(small, &taken), Some("fd00:1::2".parse().unwrap()));
        taken.insert("fd00:1::2".parse().unwrap());
        assert_eq!(next_free_ip6(small, &taken), Some("fd00:1::3".parse().unwrap()));
        taken.insert("fd00:1::3".parse().unwrap());
        assert_eq!(next_free_ip6(small, &taken), None);
    }

    #[test]
    fn requested_addresses_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = fresh(dir.path());
        add(&mut r, "a", None, 1).unwrap();
        for (ip, want) in [
            ([10, 1, 0, 0], "network address"),
            ([10, 1, 0, 7], "broadcast address"),
            ([10, 1, 0, 1], "gateway's own address"),
            ([10, 1, 0, 2], "taken by 'a'"),
            ([10, 2, 0, 2], "outside the subnet"),
        ] {
            let err = r.plan_add("b", Some(Ipv4Addr::from(ip))).unwrap_err();
            assert!(err.to_string().contains(want), "{ip:?}: {err}");
        }
    }

    #[test]
    fn names_are_validated() {
        for ok in ["a", "alice", "Laptop-2.home_x", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "-opt", "a/b", "a b", "é", "a\n", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let r = fresh(dir.path());
        assert!(matches!(r.plan_add("../etc", None), Err(RegistryError::InvalidName { .. })));
    }

    #[test]
    fn leftover_temp_file_does_not_corrupt_and_file_parses_after_each_op() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = fresh(dir.path());
        add(&mut r, "a", None, 1).unwrap();
        // A crash mid-write leaves a temp file beside the registry; it is never read.
        std::fs::write(dir.path().join(".clients.toml.tmp.1.deadbeef"), "[[client]]\nname = \"tru").unwrap();
        let r2 = reload(&r);
        assert_eq!(r2.clients().len(), 1);
        let mut r = r2;
        add(&mut r, "b", None, 2).unwrap();
        let text = std::fs::read_to_string(r.path()).unwrap();
        assert!(text.starts_with("# Holdfast client registry"));
        assert_eq!(reload(&r).clients().len(), 2);
    }

    #[test]
    fn inconsistent_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clients.toml");
        let entry = |name: &str, ip: &str| {
            format!(
                "[[client]]\nname = \"{name}\"\nip = \"{ip}\"\nstate = \"active\"\ncert_sha256 = \"{}\"\ncreated = \"{NOW}\"\ncert_issued = \"{NOW}\"\n",
                "ab".repeat(32)
            )
        };
        let cases = [
            (format!("{}{}", entry("a", "10.1.0.2"), entry("a", "10.1.0.3")), "appears twice"),
            (format!("{}{}", entry("a", "10.1.0.2"), entry("b", "10.1.0.2")), "two clients"),
            (entry("a", "10.1.0.1"), "gateway's own address"),
            (entry("a", "10.9.0.1"), "outside the subnet"),
            (entry("a/b", "10.1.0.2"), "client name"),
            (entry("a", "10.1.0.2").replace(&"ab".repeat(32), "abc"), "64 hex digits"),
            (entry("a", "10.1.0.2").replace("active", "paused"), "unknown variant"),
            ("[[client]]\nname = \"a\"\n".to_string(), "missing field"),
            (format!("{}ip6 = \"fd00:2::2\"\n", entry("a", "10.1.0.2")), "outside the subnet fd00:1::/64"),
            (format!("{}ip6 = \"fd00:1::1\"\n", entry("a", "10.1.0.2")), "gateway's own address"),
            (
                format!(
                    "{}ip6 = \"fd00:1::5\"\n{}ip6 = \"fd00:1::5\"\n",
                    entry("a", "10.1.0.2"),
                    entry("b", "10.1.0.3")
                ),
                "two clients",
            ),
        ];
        for (text, want) in cases {
            std::fs::write(&p, &text).unwrap();
            let err = Registry::load(&p, subnet(), Ipv4Addr::new(10, 1, 0, 1), Some(v6())).unwrap_err();
            assert!(matches!(err, RegistryError::Malformed { .. }), "{err}");
            assert!(err.to_string().contains(want), "expected {want:?} in {err}");
        }
        std::fs::remove_file(&p).unwrap();
        assert!(Registry::load(&p, subnet(), Ipv4Addr::new(10, 1, 0, 1), Some(v6())).unwrap().clients().is_empty());
    }
}
