//! The file store: the registry as one TOML file beside gateway.toml (the default, for a single
//! gateway). Each change takes the file's edit lock, loads, edits and saves atomically, exactly
//! as before the store seam existed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use crate::config::gateway::Tunnel6;

use super::{AddPlan, ClientEntry, Registry, RegistryError, RevokeOutcome, timestamp_now};
use crate::pki::CertFingerprint;

/// The registry file of one gateway.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    v6: Option<Tunnel6>,
}

impl FileStore {
    pub fn new(path: &Path, subnet: Ipv4Net, gateway_ip: Ipv4Addr, v6: Option<Tunnel6>) -> Self {
        Self { path: path.to_owned(), subnet, gateway_ip, v6 }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes an empty registry (what `init` does).
    pub fn create(&self) -> Result<(), RegistryError> {
        Registry::empty(&self.path, self.subnet, self.gateway_ip, self.v6).save()
    }

    /// Plans the address, lets `issue` make (and write) the credentials for it, then records the
    /// client; all under the edit lock.
    pub fn add_client<E: From<RegistryError>>(
        &self,
        name: &str,
        requested: Option<Ipv4Addr>,
        issue: impl FnOnce(&AddPlan) -> Result<CertFingerprint, E>,
    ) -> Result<AddPlan, E> {
        let _lock = Registry::lock(&self.path)?;
        let mut registry = Registry::load(&self.path, self.subnet, self.gateway_ip, self.v6)?;
        let plan = registry.plan_add(name, requested)?;
        let cert = issue(&plan)?;
        registry.commit_add(name, plan, cert, &timestamp_now());
        registry.save()?;
        Ok(plan)
    }

    /// Revokes `name`; returns what happened and the client's (still reserved) address.
    pub fn revoke(&self, name: &str) -> Result<(RevokeOutcome, Ipv4Addr), RegistryError> {
        let _lock = Registry::lock(&self.path)?;
        let mut registry = Registry::load(&self.path, self.subnet, self.gateway_ip, self.v6)?;
        let outcome = registry.revoke(name, &timestamp_now())?;
        if outcome == RevokeOutcome::Revoked {
            registry.save()?;
        }
        let ip =
            registry.get(name).map(|c| c.ip).ok_or_else(|| RegistryError::NotRegistered { name: name.to_owned() })?;
        Ok((outcome, ip))
    }

    /// Checks that the file can be read (what an upgrade must know before it writes anything):
    /// a registry that holds IPv6 addresses while this store has no IPv6 subnet is refused,
    /// naming the missing `subnet6`.
    pub fn check(&self) -> Result<(), RegistryError> {
        Registry::load(&self.path, self.subnet, self.gateway_ip, self.v6).map(drop)
    }

    /// The file-store counterpart of the database's migration 2: gives every client without an
    /// IPv6 address one from the subnet (IPv4 addresses unchanged), under the edit lock. Returns
    /// the names of the clients it gave one; nothing is written when there are none (or no
    /// IPv6 subnet).
    pub fn assign_missing_ip6(&self) -> Result<Vec<String>, RegistryError> {
        if self.v6.is_none() {
            return Ok(Vec::new());
        }
        let _lock = Registry::lock(&self.path)?;
        let mut registry = Registry::load(&self.path, self.subnet, self.gateway_ip, self.v6)?;
        let named = registry.assign_missing_ip6()?;
        if !named.is_empty() {
            registry.save()?;
        }
        Ok(named)
    }

    /// Every entry.
    pub fn clients(&self) -> Result<Vec<ClientEntry>, RegistryError> {
        Ok(Registry::load(&self.path, self.subnet, self.gateway_ip, self.v6)?.clients().to_vec())
    }
}
