//! A running gateway on a shared registry: its in-memory view ([`LiveRegistry`]) kept in step
//! with the database (LISTEN/NOTIFY, plus a periodic version check for notifications lost while
//! the listener was away), the last good view served while the database is unreachable (said
//! once), and a client's session here ended when the client authenticates at another gateway.
//! `PingSession` and the data plane never wait on the database: they read the in-memory view and
//! session table only.
//!
//! Also, for `gateway run`, [`serve`]: it opens whichever store
//! gateway.toml names and returns what the control plane serves from. (Here rather than in
//! `registry`, so the store modules never import the running gateway's state.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::gateway::Tunnel6;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use tokio::sync::mpsc;

use super::fsutil::{self, Existing};
use super::live::{Claim, ClaimSender, LiveRegistry, RegistryView};
use super::registry::RegistryError;
use super::registry::postgres::{CHANNEL_SESSIONS, PgStore, SharedSnapshot, classify};
use super::sessions::{Clock, SessionTable};
use crate::config::gateway::GatewayConfig;

/// How often the follower compares its view's version with the database's, in case a
/// notification was lost (PgListener reconnects by itself but misses what was sent meanwhile).
const VERSION_CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long the follower waits between attempts while the database is unreachable. Under half a
/// second keeps "a revocation made during the outage applies within 1 s of its return".
const RETRY_EVERY: Duration = Duration::from_millis(400);
/// How long `gateway run` waits for a database it never had a view of before giving up.
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// File name of the last good view, kept in the gateway's dir (start-up without the database).
pub const CACHE_FILE: &str = "registry-cache.toml";

fn view_of(snap: &SharedSnapshot) -> RegistryView {
    RegistryView::from_shared(&snap.clients, snap.version, snap.endpoints.clone())
}

/// The registry of a running gateway: its live view and, for a shared registry, what keeps
/// that view in step with the database.
pub struct ServingRegistry {
    pub live: LiveRegistry,
    shared: Option<SharedStart>,
}

impl ServingRegistry {
    /// Starts following the shared registry (nothing to do for a file, which the control
    /// plane's housekeeping polls).
    pub fn follow(self, sessions: Arc<SessionTable>, clock: Clock) {
        if let Some(shared) = self.shared {
            shared.follow(sessions, clock);
        }
    }
}

/// Opens the registry `gateway run` serves from, as gateway.toml names it (the one choice of
/// store is [`super::registry::RegistryStore`]'s; this is its running-gateway side). A file
/// must load; a database may be unreachable if this gateway has a last good view.
pub async fn serve(config: &GatewayConfig) -> Result<ServingRegistry, RegistryError> {
    match &config.database {
        None => Ok(ServingRegistry {
            live: LiveRegistry::open(&config.registry, config.subnet, config.gateway_ip, config.v6)?,
            shared: None,
        }),
        Some(url) => {
            let shared = start_shared(
                url,
                &config.dir,
                &config.name,
                &config.endpoint.to_string(),
                config.subnet,
                config.gateway_ip,
                config.v6,
            )
            .await?;
            Ok(ServingRegistry { live: shared.live.clone(), shared: Some(shared) })
        }
    }
}

/// Reads the last good view a gateway saved (None: there is none, or it is unreadable).
pub fn read_cache(dir: &Path) -> Option<SharedSnapshot> {
    let text = std::fs::read_to_string(dir.join(CACHE_FILE)).ok()?;
    toml::from_str(&text).ok()
}

fn write_cache(path: &Path, snap: &SharedSnapshot) {
    let text = match toml::to_string(snap) {
        Ok(t) => format!(
            "# The last view of the shared registry this gateway had; it serves from this if it \
             starts while the database is unreachable. Rewritten on every change.\n{t}"
        ),
        Err(e) => {
            tracing::warn!("cannot encode the registry cache: {e}");
            return;
        }
    };
    if let Err(e) = fsutil::write_atomic(path, text.as_bytes(), 0o600, Existing::Replace) {
        tracing::warn!("cannot write the registry cache {}: {e}", path.display());
    }
}

/// What `gateway run` starts from with a shared registry.
pub struct SharedStart {
    pub live: LiveRegistry,
    follower: FollowerParts,
}

struct FollowerParts {
    store: PgStore,
    prepared: bool,
    claims: mpsc::Receiver<Claim>,
    cache: PathBuf,
    me: String,
    name: String,
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    v6: Option<Tunnel6>,
}

/// Claims queued while the database is slow; beyond this they are dropped.
const CLAIM_QUEUE: usize = 1024;

/// Opens the shared registry for `gateway run`: the database's current view, or (while it is
/// unreachable) the last good view from `dir`'s cache. Without either, waits up to
/// [`STARTUP_WAIT`] for the database, then fails. A bad URL, refused credentials, a newer
/// schema or a deployment of another subnet fail at once.
pub async fn start_shared(
    url: &str,
    dir: &Path,
    name: &str,
    endpoint: &str,
    subnet: Ipv4Net,
    gateway_ip: Ipv4Addr,
    v6: Option<Tunnel6>,
) -> Result<SharedStart, RegistryError> {
    let store = PgStore::new(url)?;
    let cache = dir.join(CACHE_FILE);
    let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
    let mut said = false;
    let (snapshot, prepared) = loop {
        let attempt = async {
            store.prepare().await?;
            store.check_deployment(subnet, gateway_ip, v6).await?;
            store.register_gateway(name, endpoint).await?;
            store.snapshot().await
        };
        match attempt.await {
            Ok(snap) => {
                write_cache(&cache, &snap);
                break (snap, true);
            }
            Err(e @ RegistryError::DatabaseUnreachable { .. }) => {
                if let Some(snap) = read_cache(dir) {
                    tracing::warn!(
                        version = snap.version,
                        "{e}; serving from the last good view ({}) until it returns",
                        cache.display()
                    );
                    break (snap, false);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(e);
                }
                if !said {
                    tracing::warn!(
                        "{e}; waiting up to {STARTUP_WAIT:?} for it (this gateway never had a view of the registry)"
                    );
                    said = true;
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(db = %store.db(), version = snapshot.version, clients = snapshot.clients.len(), gateways = snapshot.endpoints.len(), "shared registry loaded");
    let (tx, rx) = mpsc::channel(CLAIM_QUEUE);
    let live = LiveRegistry::pushed(view_of(&snapshot), ClaimSender::new(tx));
    if !prepared {
        live.set_degraded(true);
    }
    Ok(SharedStart {
        live,
        follower: FollowerParts {
            store,
            prepared,
            claims: rx,
            cache,
            me: endpoint.to_owned(),
            name: name.to_owned(),
            subnet,
            gateway_ip,
            v6,
        },
    })
}

impl SharedStart {
    /// Starts the follower on the gateway's session table. It runs until the runtime stops.
    pub fn follow(self, sessions: Arc<SessionTable>, clock: Clock) {
        let follower =
            Follower { parts: self.follower, live: self.live.clone(), sessions, clock, own_claims: HashMap::new() };
        tokio::spawn(follower.run());
    }
}

/// Keeps the gateway's view in step with the database.
struct Follower {
    parts: FollowerParts,
    live: LiveRegistry,
    sessions: Arc<SessionTable>,
    /// The session table's clock (sessions' ages, compared with a claim's).
    clock: Clock,
    /// The latest claim this gateway made per client: a claim by another gateway older than
    /// ours is stale and ends nothing.
    own_claims: HashMap<Arc<str>, i64>,
}

impl Follower {
    async fn run(mut self) {
        loop {
            let Err(e) = self.session().await;
            self.lost(&e);
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Says once that the database is gone and the last good view stays in force.
    fn lost(&self, e: &RegistryError) {
        if !self.live.degraded() {
            self.live.set_degraded(true);
            tracing::warn!(
                version = self.live.view().version(),
                "{e}; serving from the last good view until it returns"
            );
        }
    }

    /// One connection's life: listen, catch up, then follow notifications, claims and the
    /// periodic version check until something fails.
    async fn session(&mut self) -> Result<std::convert::Infallible, RegistryError> {
        let store = self.parts.store.clone();
        if !self.parts.prepared {
            store.prepare().await?;
            store.check_deployment(self.parts.subnet, self.parts.gateway_ip, self.parts.v6).await?;
            store.register_gateway(&self.parts.name, &self.parts.me).await?;
            self.parts.prepared = true;
        }
        let mut listener = store.listen().await?;
        // Listening first, then reading: a change between the two is both read and announced.
        self.catch_up(&store).await?;
        if self.live.degraded() {
            self.live.set_degraded(false);
            tracing::info!(version = self.live.view().version(), "registry database reachable again; caught up");
        }
        let mut check = tokio::time::interval(VERSION_CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                biased;
                Some(claim) = self.parts.claims.recv() => {
                    let age = claim.opened.elapsed();
                    match store.claim_session(&claim.client, &self.parts.me, age).await {
                        Ok(Some(n)) => { self.own_claims.insert(claim.client, n); }
                        Ok(None) => {
                            // The client moved on while this gateway was not looking: its
                            // session here is the stale one.
                            for s in self.sessions.retain(|s| s.id != claim.session) {
                                tracing::info!(client = %s.client, session = %s.id, key_fp = %s.key.fingerprint(), "session closed: the client authenticated at another gateway since");
                            }
                        }
                        Err(e) => {
                            tracing::debug!(client = %claim.client, "session claim not recorded: {e}");
                            return Err(e);
                        }
                    }
                }
                n = listener.try_recv() => match n {
                    Ok(Some(n)) if n.channel() == CHANNEL_SESSIONS => self.claimed_elsewhere(n.payload()),
                    Ok(Some(n)) => {
                        let announced: u64 = n.payload().parse().unwrap_or(u64::MAX);
                        if announced != self.live.view().version() {
                            self.catch_up(&store).await?;
                        }
                    }
                    // The connection dropped: what was announced meanwhile is lost, so start over
                    // (and read everything again).
                    Ok(None) => return Err(RegistryError::DatabaseUnreachable {
                        db: store.db().to_owned(),
                        reason: "the notification connection was closed".into(),
                    }),
                    Err(e) => return Err(classify(store.db(), e)),
                },
                _ = check.tick() => {
                    if store.version().await? != self.live.view().version() {
                        self.catch_up(&store).await?;
                    }
                }
            }
        }
    }

    /// Reads the whole registry and installs it if its version differs from the view's.
    async fn catch_up(&mut self, store: &PgStore) -> Result<(), RegistryError> {
        let snap = store.snapshot().await?;
        if snap.version == self.live.view().version() {
            return Ok(());
        }
        let view = self.live.install(view_of(&snap));
        write_cache(&self.parts.cache, &snap);
        tracing::info!(
            version = view.version(),
            clients = view.len(),
            gateways = view.endpoints().len(),
            "shared registry changed"
        );
        Ok(())
    }

    /// `client gateway claim age_ms` from the sessions channel: another gateway now holds the
    /// client's session, opened `age_ms` ago, so ours ends if it is older (a newer one here
    /// means the client came back, and its own claim follows), unless we claimed it again since.
    fn claimed_elsewhere(&mut self, payload: &str) {
        let mut parts = payload.split(' ');
        let (Some(client), Some(gateway), Some(claim), Some(age)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (Ok(claim), Ok(age)) = (claim.parse::<i64>(), age.parse::<u64>()) else {
            return;
        };
        if gateway == self.parts.me {
            return;
        }
        if self.own_claims.get(client).is_some_and(|ours| *ours > claim) {
            return;
        }
        self.own_claims.remove(client);
        let now = self.clock.now();
        let older = |s: &crate::gateway::Session| now.saturating_sub(s.opened_at) > age;
        for s in self.sessions.retain(|s| &*s.client != client || !older(s)) {
            tracing::info!(client = %s.client, session = %s.id, key_fp = %s.key.fingerprint(), at = %gateway, claim, their_age_ms = age, "session closed: the client authenticated at another gateway");
        }
    }
}
