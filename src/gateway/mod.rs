//! The gateway: its identity and client registry (managed by the `gateway` commands), the session
//! registry, and the control service (gRPC over mutual TLS 1.3).
//!
//! - [`cli`]: the `holdfast gateway <command>` commands (init, add-client, revoke, list, run).
//! - [`registry`]: the client registry (names, stable tunnel addresses, pinned certificates)
//!   behind one store seam: a file (one gateway) or PostgreSQL (several gateways).
//! - [`live`]: the running gateway's view of the registry, reloaded when the file changes.
//! - [`follow`]: with a shared registry, keeps that view in step with the database.
//! - [`sessions`]: the session table: lock-free lookups by session id and by tunnel address.
//! - [`service`]: the `Authenticate` and `PingSession` RPCs.
//! - [`tls`]: TLS 1.3-only mutual authentication, one handshake task per connection.
//! - [`server`]: binds, serves, and runs housekeeping.
//! - [`dataplane`]: the TUN device, the UDP loops and the NAT rule.
//! - [`dns`]: the resolver on the tunnel address(es), pushed to clients.
//! - [`fsutil`]: atomic file writes and the registry's edit lock.
//! - [`status`]: `gateway status` and the status socket the running gateway answers it on.
//! - [`metrics`]: the control plane's counters and the opt-in Prometheus endpoint.
//! - [`reload`]: what `gateway run` re-reads on SIGHUP.
//! - [`ops`]: starts the three above for `gateway run`.

pub mod cli;
pub mod dataplane;
pub mod dns;
pub mod follow;
pub mod fsutil;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod registry;
pub mod reload;
pub mod server;
pub mod service;
pub mod sessions;
pub mod status;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{ConfigError, exit};
use crate::pki::PkiError;
use registry::RegistryError;

pub use cli::GatewayCommand;
pub use server::ControlPlane;
pub use sessions::{Clock, Millis, PingVerdict, Session, SessionTable};
pub use tls::PeerIdentity;

/// Why a `gateway` command failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// `gateway.toml`, or a key or certificate it names, is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The client registry is unreadable or invalid, or the requested change is not possible.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Creating or loading the authority or a certificate failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A command-line value is invalid.
    #[error("invalid {flag}: {reason}")]
    Usage { flag: &'static str, reason: String },
    /// `init` found an existing identity file and changed nothing.
    #[error("{} already exists: refusing to overwrite an existing gateway identity (choose another --dir)", path.display())]
    AlreadyInitialised { path: PathBuf },
    /// Writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    /// The control port cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// The gRPC server failed while serving.
    #[error("the control plane server failed: {0}")]
    Serve(tonic::transport::Error),
    /// The data plane (TUN device, UDP socket, NAT rule) could not start.
    #[error(transparent)]
    DataPlane(#[from] dataplane::GatewayDataPlaneError),
    /// The resolver could not start (`[dns]`).
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    /// The status socket cannot be served (`status_socket`).
    #[error("cannot serve the status socket {} (`status_socket` in gateway.toml): {source}", path.display())]
    StatusSocket { path: PathBuf, source: io::Error },
    /// The metrics endpoint cannot be bound (`[metrics] listen`).
    #[error("cannot serve metrics on {addr} ([metrics] `listen` in gateway.toml): {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    /// `gateway status` got no report.
    #[error(transparent)]
    Status(#[from] crate::local_socket::StatusQueryError),
}

impl GatewayError {
    /// The process exit code (see [`crate::config::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            GatewayError::Config(e) => e.exit_code(),
            GatewayError::Registry(RegistryError::Read { .. }) => exit::CONFIG_MISSING,
            GatewayError::Registry(RegistryError::Malformed { .. }) => exit::CONFIG_INVALID,
            GatewayError::Registry(RegistryError::DatabaseUrl { .. }) => exit::CONFIG_INVALID,
            GatewayError::Registry(RegistryError::DatabaseUnreachable { .. }) => exit::DB_UNAVAILABLE,
            GatewayError::Registry(RegistryError::DatabaseAuth { .. }) => exit::DB_CREDENTIALS,
            GatewayError::Registry(RegistryError::SchemaNewer { .. }) => exit::DB_SCHEMA_NEWER,
            GatewayError::Pki(PkiError::BadAuthority { .. }) => exit::BAD_KEYS,
            GatewayError::Bind { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                exit::NOT_PERMITTED
            }
            GatewayError::DataPlane(e) if e.not_permitted() => exit::NOT_PERMITTED,
            GatewayError::Dns(e) if e.not_permitted() => exit::NOT_PERMITTED,
            GatewayError::Status(e) => e.exit_code(),
            _ => exit::FAILURE,
        }
    }
}
