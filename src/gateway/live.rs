//! The running gateway's view of the client registry, reloaded when the file changes, so
//! `add-client` and `revoke` take effect without a restart. With a shared registry (PostgreSQL)
//! the view is pushed instead, by the follower in [`super::registry::postgres`], which installs
//! each new version with [`LiveRegistry::install`]; readers see no difference.
//!
//! Change detection is a `stat(2)` compared with the stamp of the loaded version (device, inode,
//! size, mtime and ctime in nanoseconds). Every save is a rename of a new file, so the inode changes
//! on every edit; the stamp is taken with `fstat` on the very file handle the content is read from,
//! so content and stamp always match.
//!
//! Readers get the current view with one atomic load (`ArcSwap`), never a lock. Reloads are
//! serialised by a mutex that readers never touch; callers that must not wait (PingSession) only
//! *try* it.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

use super::registry::{ClientState, Registry, RegistryError};
use crate::config::gateway::Tunnel6;
use crate::pki::CertFingerprint;

/// Identifies one version of the registry file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// What the control plane needs to know about one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRecord {
    pub ip: Ipv4Addr,
    /// `None` for an entry from before IPv6 not yet upgraded: that client is served IPv4 only.
    pub ip6: Option<Ipv6Addr>,
    pub cert: CertFingerprint,
    pub revoked: bool,
}

/// Why a verified certificate is not (or no longer) admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotRegistered,
    Revoked,
    CertificateReplaced,
}

/// One immutable version of the registry.
#[derive(Debug, Default)]
pub struct RegistryView {
    stamp: Option<FileStamp>,
    clients: HashMap<String, ClientRecord>,
    /// The store's version of this view (the database's counter; for the file, the number of
    /// loads so far). For status and metrics.
    version: u64,
    /// Every gateway endpoint of the deployment, as clients should be told (empty: a single
    /// gateway, whose clients know its one endpoint).
    endpoints: Vec<String>,
}

impl RegistryView {
    fn from_registry(reg: &Registry, stamp: Option<FileStamp>) -> Self {
        Self::from_entries(reg.clients(), stamp, 0, Vec::new())
    }

    /// A view of `clients` at `version` of the store, with the deployment's gateway endpoints.
    pub fn from_shared(clients: &[super::registry::ClientEntry], version: u64, endpoints: Vec<String>) -> Self {
        Self::from_entries(clients, None, version, endpoints)
    }

    fn from_entries(
        clients: &[super::registry::ClientEntry],
        stamp: Option<FileStamp>,
        version: u64,
        endpoints: Vec<String>,
    ) -> Self {
        let clients = clients
            .iter()
            .map(|c| {
                let rec = ClientRecord {
                    ip: c.ip,
                    ip6: c.ip6,
                    cert: c.cert_sha256,
                    revoked: c.state == ClientState::Revoked,
                };
                (c.name.clone(), rec)
            })
            .collect();
        Self { stamp, clients, version, endpoints }
    }

    /// The store's version of this view (see the field).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The deployment's gateway endpoints (empty for a single gateway on a file registry).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The record of `name` if the client may use the certificate `cert` now. No allocation.
    pub fn admit(&self, name: &str, cert: &CertFingerprint) -> Result<&ClientRecord, Refusal> {
        let rec = self.clients.get(name).ok_or(Refusal::NotRegistered)?;
        if rec.revoked {
            return Err(Refusal::Revoked);
        }
        if rec.cert != *cert {
            return Err(Refusal::CertificateReplaced);
        }
        Ok(rec)
    }

    /// Number of registered clients (active or revoked).
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// A session opened here, to be claimed in a shared registry (see `gateway::follow`).
#[derive(Debug)]
pub struct Claim {
    pub client: Arc<str>,
    pub session: crate::snapshot::SessionId,
    pub opened: tokio::time::Instant,
}

/// Tells the follower that a client authenticated here (from `Authenticate`; never waits).
#[derive(Debug, Clone)]
pub struct ClaimSender(tokio::sync::mpsc::Sender<Claim>);

impl ClaimSender {
    pub fn new(tx: tokio::sync::mpsc::Sender<Claim>) -> Self {
        Self(tx)
    }

    /// Queues the claim; if the queue is full (the database is slow) it is dropped: the other
    /// gateway's session then ends by idling out instead.
    pub fn claim(&self, client: &Arc<str>, session: crate::snapshot::SessionId) {
        let _ = self.0.try_send(Claim { client: client.clone(), session, opened: tokio::time::Instant::now() });
    }
}

/// How a caller of [`LiveRegistry::refresh`] deals with a reload already in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait for it (Authenticate: correctness first, and reloads are rare and short).
    Yes,
    /// Skip; the current view is recent enough (PingSession: never wait on a lock).
    No,
}

/// Where the views come from.
enum Source {
    /// The registry file, polled by `refresh`.
    File {
        path: PathBuf,
        subnet: Ipv4Net,
        gateway_ip: Ipv4Addr,
        v6: Option<Tunnel6>,
        /// Serialises reloads; also remembers the stamp of the last version that failed to
        /// load (`Some(None)`: the file was missing), so a broken file is reported once, not
        /// per request.
        reload: Mutex<Option<Option<FileStamp>>>,
    },
    /// A shared registry: views are installed by its follower; `refresh` has nothing to do.
    Pushed,
}

/// The registry as the running gateway sees it. Cloning shares it (the control service and a
/// shared registry's follower hold the same one).
#[derive(Clone)]
pub struct LiveRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    view: ArcSwap<RegistryView>,
    /// Wakes the housekeeping task when a pushed view arrives, so a revocation ends sessions
    /// at once rather than at the next tick.
    changed: tokio::sync::Notify,
    /// The shared registry's database is unreachable: the view is the last good one.
    degraded: std::sync::atomic::AtomicBool,
    /// With a shared registry: where Authenticate reports the clients that opened a session
    /// here, so the other gateways end theirs.
    claims: Option<ClaimSender>,
}

impl std::fmt::Debug for LiveRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("LiveRegistry");
        if let Source::File { path, .. } = &self.inner.source {
            d.field("path", path);
        }
        d.finish_non_exhaustive()
    }
}

impl LiveRegistry {
    /// Loads the registry; a missing file is an empty registry, any other failure is an error
    /// (at start-up the operator must hear about a broken registry).
    pub fn open(
        path: &Path,
        subnet: Ipv4Net,
        gateway_ip: Ipv4Addr,
        v6: Option<Tunnel6>,
    ) -> Result<Self, RegistryError> {
        let mut view = load_view(path, subnet, gateway_ip, v6)?;
        view.version = 1;
        Ok(Self::from_inner(Inner {
            source: Source::File { path: path.to_owned(), subnet, gateway_ip, v6, reload: Mutex::new(None) },
            view: ArcSwap::from_pointee(view),
            changed: tokio::sync::Notify::new(),
            degraded: Default::default(),
            claims: None,
        }))
    }

    fn from_inner(inner: Inner) -> Self {
        Self { inner: Arc::new(inner) }
    }

    /// A registry whose views are pushed (a shared registry's follower), starting at `view`;
    /// `claims` hears of every session opened here.
    pub fn pushed(view: RegistryView, claims: ClaimSender) -> Self {
        Self::from_inner(Inner {
            source: Source::Pushed,
            view: ArcSwap::from_pointee(view),
            changed: tokio::sync::Notify::new(),
            degraded: Default::default(),
            claims: Some(claims),
        })
    }

    /// Authenticate opened `session` for `client` here (tells a shared registry; never waits).
    pub fn session_opened(&self, client: &Arc<str>, session: crate::snapshot::SessionId) {
        if let Some(c) = &self.inner.claims {
            c.claim(client, session);
        }
    }

    /// Whether the view is the last good one of a database that is unreachable now (for the
    /// log and status).
    pub fn degraded(&self) -> bool {
        self.inner.degraded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Set by the shared registry's follower when it loses or regains the database.
    pub fn set_degraded(&self, degraded: bool) {
        self.inner.degraded.store(degraded, std::sync::atomic::Ordering::Relaxed);
    }

    /// The current view: one atomic load.
    pub fn view(&self) -> Arc<RegistryView> {
        self.inner.view.load_full()
    }

    /// Installs a new pushed view and wakes whoever waits in [`LiveRegistry::changed`].
    pub fn install(&self, view: RegistryView) -> Arc<RegistryView> {
        let view = Arc::new(view);
        self.inner.view.store(view.clone());
        self.inner.changed.notify_one();
        view
    }

    /// Completes when a pushed view was installed since the last call (never for a file).
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    /// Reloads the registry if its file changed. Returns the new view if it did.
    ///
    /// A file that fails to load keeps the previous view in force (a half-edited file must not
    /// lock every client out or let a revoked one back in); it is logged once per version.
    /// A pushed registry returns `None`: its follower installs new views itself.
    pub fn refresh(&self, wait: Wait) -> Option<Arc<RegistryView>> {
        let Source::File { path, subnet, gateway_ip, v6, reload } = &self.inner.source else {
            return None;
        };
        let on_disk = std::fs::metadata(path).ok().map(|m| FileStamp::of(&m));
        if on_disk == self.inner.view.load().stamp {
            return None;
        }
        let mut failed = match wait {
            Wait::Yes => reload.lock().unwrap_or_else(|p| p.into_inner()),
            Wait::No => match reload.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            },
        };
        // Another caller may have reloaded (or failed to) while we waited for the lock.
        if on_disk == self.inner.view.load().stamp || *failed == Some(on_disk) {
            return None;
        }
        let loaded = match on_disk {
            // A registry that vanished while running is an operator mistake (or a move in
            // progress), not "revoke everyone": keep the last version.
            None => Err(format!("the client registry {} has disappeared", path.display())),
            Some(_) => load_view(path, *subnet, *gateway_ip, *v6).map_err(|e| e.to_string()),
        };
        match loaded {
            Ok(mut view) => {
                // Loads so far: only this code, under `reload`, stores a file's views.
                view.version = self.inner.view.load().version + 1;
                let view = Arc::new(view);
                self.inner.view.store(view.clone());
                *failed = None;
                tracing::info!(registry = %path.display(), clients = view.len(), "client registry reloaded");
                Some(view)
            }
            Err(e) => {
                *failed = Some(on_disk);
                tracing::warn!("{e}; keeping the previous version in force");
                None
            }
        }
    }
}

fn load_view(
    path: &Path,
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    v6: Option<Tunnel6>,
) -> Result<RegistryView, RegistryError> {
    let read_err = |source| RegistryError::Read { path: path.to_owned(), source };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryView::default()),
        Err(e) => return Err(read_err(e)),
    };
    let stamp = FileStamp::of(&file.metadata().map_err(read_err)?);
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_err)?;
    let reg = Registry::parse(&bytes, path, subnet, gateway_ip, v6)?;
    Ok(RegistryView::from_registry(&reg, Some(stamp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_up_changes_and_keeps_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.toml");
        let subnet: Ipv4Net = "10.1.0.0/24".parse().unwrap();
        let gw = Ipv4Addr::new(10, 1, 0, 1);
        let live = LiveRegistry::open(&path, subnet, gw, None).unwrap();
        assert!(live.view().is_empty());
        assert_eq!(live.view().version(), 1, "the first load");
        assert!(live.refresh(Wait::Yes).is_none(), "missing before and after: no change");

        let mut reg = Registry::empty(&path, subnet, gw, None);
        let plan = reg.plan_add("alice", None).unwrap();
        reg.commit_add("alice", plan, CertFingerprint([1; 32]), "t");
        reg.save().unwrap();
        let view = live.refresh(Wait::No).expect("reloaded");
        assert_eq!(view.version(), 2, "versions count the loads");
        assert_eq!(view.admit("alice", &CertFingerprint([1; 32])).unwrap().ip, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(view.admit("alice", &CertFingerprint([2; 32])), Err(Refusal::CertificateReplaced));
        assert_eq!(view.admit("bob", &CertFingerprint([1; 32])), Err(Refusal::NotRegistered));
        assert!(live.refresh(Wait::Yes).is_none(), "unchanged");

        reg.revoke("alice", "t").unwrap();
        reg.save().unwrap();
        assert!(live.refresh(Wait::Yes).is_some());
        assert_eq!(live.view().admit("alice", &CertFingerprint([1; 32])), Err(Refusal::Revoked));
        assert_eq!(live.view().version(), 3);

        // A broken edit, or a vanished file, keeps the revocation in force.
        std::fs::write(&path, "not toml [[[").unwrap();
        assert!(live.refresh(Wait::Yes).is_none());
        assert_eq!(live.view().admit("alice", &CertFingerprint([1; 32])), Err(Refusal::Revoked));
        std::fs::remove_file(&path).unwrap();
        assert!(live.refresh(Wait::Yes).is_none());
        assert_eq!(live.view().admit("alice", &CertFingerprint([1; 32])), Err(Refusal::Revoked));
        assert_eq!(live.view().version(), 3, "a failed load is no version");
        // And the next good version is picked up.
        reg.save().unwrap();
        assert!(live.refresh(Wait::No).is_some());
    }
}
