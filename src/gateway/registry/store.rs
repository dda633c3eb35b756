//! The store seam: the registry lives in a file (one gateway, the default) or in PostgreSQL
//! (several gateways of one deployment). [`RegistryStore::open`] is the one place that picks;
//! the commands call the store's operations and never ask which it is.

use std::net::Ipv4Addr;

use super::file::FileStore;
use super::postgres::PgStore;
use super::{AddPlan, ClientEntry, RegistryError, RevokeOutcome};
use crate::config::gateway::GatewayConfig;
use crate::pki::CertFingerprint;

/// Where a gateway's client registry lives.
#[derive(Debug, Clone)]
pub enum RegistryStore {
    /// `registry` in gateway.toml: a TOML file.
    File(FileStore),
    /// `database` in gateway.toml: the deployment's shared registry.
    Postgres(PgStore),
}

/// What `list` shows: every entry and where they come from.
#[derive(Debug, Clone)]
pub struct RegistrySnapshot {
    pub clients: Vec<ClientEntry>,
    /// Every gateway endpoint of the deployment (just this gateway's for a file).
    pub endpoints: Vec<String>,
    /// The store's version (0 for a file, which has none).
    pub version: u64,
}

impl RegistryStore {
    /// Opens the store `config` names. For the database: connects, checks the schema (migrating
    /// an older one) and that the deployment serves this gateway's subnet.
    pub async fn open(config: &GatewayConfig) -> Result<Self, RegistryError> {
        match &config.database {
            None => Ok(Self::File(FileStore::new(&config.registry, config.subnet, config.gateway_ip, config.v6))),
            Some(url) => {
                let store = PgStore::connect(url).await?;
                store.check_deployment(config.subnet, config.gateway_ip, config.v6).await?;
                Ok(Self::Postgres(store))
            }
        }
    }

    /// `add-client`: plans the address, lets `issue` make and write the credentials for it,
    /// then records the client, all under the store's lock (lock file, or advisory lock).
    pub async fn add_client<E: From<RegistryError>>(
        &self,
        name: &str,
        requested: Option<Ipv4Addr>,
        issue: impl FnOnce(&AddPlan) -> Result<CertFingerprint, E>,
    ) -> Result<AddPlan, E> {
        match self {
            Self::File(f) => f.add_client(name, requested, issue),
            Self::Postgres(p) => p.add_client(name, requested, issue).await,
        }
    }

    /// `revoke`: what happened, and the client's address (which stays reserved).
    pub async fn revoke(&self, name: &str) -> Result<(RevokeOutcome, Ipv4Addr), RegistryError> {
        match self {
            Self::File(f) => f.revoke(name),
            Self::Postgres(p) => p.revoke(name).await,
        }
    }

    /// Every entry, with the deployment's endpoints and the store's version.
    pub async fn snapshot(&self, own_endpoint: &str) -> Result<RegistrySnapshot, RegistryError> {
        match self {
            Self::File(f) => {
                Ok(RegistrySnapshot { clients: f.clients()?, endpoints: vec![own_endpoint.to_owned()], version: 0 })
            }
            Self::Postgres(p) => {
                let s = p.snapshot().await?;
                Ok(RegistrySnapshot { clients: s.clients, endpoints: s.endpoints, version: s.version })
            }
        }
    }
}
