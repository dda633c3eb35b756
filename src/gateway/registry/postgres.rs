//! The PostgreSQL store: one registry shared by every gateway of a deployment.
//!
//! Schema: `migrations/` (embedded with `sqlx::migrate!`, applied by whichever holdfast connects
//! first; each migration is one transaction, so an interrupted one leaves the previous schema).
//! Addresses are unique by constraint; `add-client` also takes a transaction-scoped advisory
//! lock, so concurrent runs queue instead of colliding and retrying.
//!
//! What the running gateway does with it lives in [`Follower`]: it keeps the gateway's in-memory
//! view ([`LiveRegistry`]) in step with the database (LISTEN/NOTIFY, plus a periodic version
//! check for notifications lost while the listener was away), keeps serving the last good view
//! while the database is unreachable (saying so once), and ends a client's session here when the
//! client authenticates at another gateway. `PingSession` and the data plane never wait on the
//! database: they read the in-memory view and session table only.
//!
//! Session keys never go to the database: the `holdfast_sessions` table only says which gateway
//! holds each client's current session.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    AddPlan, ClientEntry, ClientState, RegistryError, RevokeOutcome, plan_add, timestamp_now,
    valid_name,
};
use crate::config::gateway::redact_url;
use crate::gateway::fsutil::{self, Existing};
use crate::gateway::live::{LiveRegistry, RegistryView};
use crate::gateway::sessions::{Clock, SessionTable};
use crate::pki::CertFingerprint;
use crate::snapshot::SessionId;

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Bound on connecting (and on one query): a database that does not answer in this time counts
/// as unreachable for now; the gateway keeps serving meanwhile.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the follower compares its view's version with the database's, in case a
/// notification was lost (PgListener reconnects by itself but misses what was sent meanwhile).
const VERSION_CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long the follower waits between attempts while the database is unreachable. Half a
/// second keeps "a revocation made during the outage applies within 1 s of its return".
const RETRY_EVERY: Duration = Duration::from_millis(400);
/// How long `gateway run` waits for a database it never had a view of before giving up.
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// Key of the advisory lock that serialises `add-client` across every host ('HfAd').
const ADD_LOCK: i64 = 0x4866_4164;
/// Channels the triggers in migrations/ announce on.
const CHANNEL_REGISTRY: &str = "holdfast_registry";
const CHANNEL_SESSIONS: &str = "holdfast_sessions";
/// File name of the last good view, kept in the gateway's dir (start-up without the database).
pub const CACHE_FILE: &str = "registry-cache.toml";

/// The deployment's address plan, as the database holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployment {
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
}

/// One consistent read of the registry: every client, every gateway endpoint, the version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSnapshot {
    pub version: u64,
    pub endpoints: Vec<String>,
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientEntry>,
}

impl SharedSnapshot {
    fn view(&self) -> RegistryView {
        RegistryView::from_shared(&self.clients, self.version, self.endpoints.clone())
    }
}

/// A connection pool to the deployment's database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// How errors and logs name the database (never with its password).
    db: String,
}

/// Names a database for messages: `'holdfast' on /run/postgresql (user postgres)`.
fn describe(opts: &PgConnectOptions) -> String {
    let place = match opts.get_socket() {
        Some(dir) => dir.display().to_string(),
        None => format!("{}:{}", opts.get_host(), opts.get_port()),
    };
    format!(
        "'{}' on {place} (user {})",
        opts.get_database().unwrap_or(opts.get_username()),
        opts.get_username()
    )
}

/// Sorts a sqlx error into the problem an operator must fix.
fn classify(db: &str, e: sqlx::Error) -> RegistryError {
    let unreachable = |reason: String| RegistryError::DatabaseUnreachable {
        db: db.to_owned(),
        reason,
    };
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // invalid_password, invalid_authorization_specification
                "28P01" | "28000" => RegistryError::DatabaseAuth {
                    db: db.to_owned(),
                    reason: d.message().to_owned(),
                },
                "3D000" => unreachable("the database does not exist (create it first)".into()),
                // connection exceptions, shutting down, too many connections
                c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                    unreachable(d.message().to_owned())
                }
                _ => RegistryError::Database {
                    db: db.to_owned(),
                    reason: d.message().to_owned(),
                },
            }
        }
        sqlx::Error::Io(e) => unreachable(e.to_string()),
        sqlx::Error::Tls(e) => unreachable(format!("TLS: {e}")),
        sqlx::Error::PoolTimedOut => unreachable("no connection within the time limit".into()),
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            unreachable("the connection pool is closed".into())
        }
        sqlx::Error::Protocol(p) => unreachable(format!("protocol error: {p}")),
        e => RegistryError::Database {
            db: db.to_owned(),
            reason: e.to_string(),
        },
    }
}

/// Runs `f` with [`DB_TIMEOUT`]: a database that hangs counts as unreachable.
async fn bounded<T>(
    db: &str,
    f: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(DB_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| classify(db, e)),
        Err(_) => Err(RegistryError::DatabaseUnreachable {
            db: db.to_owned(),
            reason: format!("no answer within {DB_TIMEOUT:?}"),
        }),
    }
}

/// The newest migration this binary knows.
fn known_schema() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

impl PgStore {
    /// Parses `url` and makes a (lazy) pool: nothing is connected yet.
    pub fn new(url: &str) -> Result<Self, RegistryError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| RegistryError::DatabaseUrl {
                url: redact_url(url),
                reason: e.to_string(),
            })?
            .application_name("holdfast");
        let db = describe(&opts);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(DB_TIMEOUT)
            .connect_lazy_with(opts);
        Ok(Self { pool, db })
    }

    /// [`PgStore::new`], then one connection to check the server, the credentials and the
    /// schema (migrating an older one).
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        let store = Self::new(url)?;
        store.prepare().await?;
        Ok(store)
    }

    /// How messages name this database.
    pub fn db(&self) -> &str {
        &self.db
    }

    /// Connects once, refuses a schema newer than this binary's, and applies missing migrations.
    pub async fn prepare(&self) -> Result<(), RegistryError> {
        let db = &self.db;
        let mut conn = bounded(db, self.pool.acquire()).await?;
        let has_table: bool = bounded(
            db,
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&mut *conn),
        )
        .await?;
        let applied: Option<i64> = if has_table {
            bounded(
                db,
                sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&mut *conn),
            )
            .await?
        } else {
            None
        };
        drop(conn);
        let known = known_schema();
        if let Some(version) = applied.filter(|v| *v > known) {
            return Err(RegistryError::SchemaNewer {
                db: db.clone(),
                version,
                known,
            });
        }
        match tokio::time::timeout(DB_TIMEOUT * 6, MIGRATOR.run(&self.pool)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(sqlx::migrate::MigrateError::Execute(e))) => Err(classify(db, e)),
            Ok(Err(e)) => Err(RegistryError::Database {
                db: db.clone(),
                reason: format!("schema migration: {e}"),
            }),
            Err(_) => Err(RegistryError::DatabaseUnreachable {
                db: db.clone(),
                reason: "the schema migration did not finish in time".into(),
            }),
        }
    }

    /// The deployment's address plan, if one was created.
    pub async fn deployment(&self) -> Result<Option<Deployment>, RegistryError> {
        let mut conn = bounded(&self.db, self.pool.acquire()).await?;
        self.deployment_on(&mut conn).await
    }

    async fn deployment_on(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<Deployment>, RegistryError> {
        let row = bounded(
            &self.db,
            sqlx::query("SELECT subnet::text, host(gateway_ip) FROM holdfast_deployment")
                .fetch_optional(&mut *conn),
        )
        .await?;
        let Some(row) = row else { return Ok(None) };
        let bad = |reason: String| RegistryError::Database {
            db: self.db.clone(),
            reason,
        };
        let subnet: String = row.try_get(0).map_err(|e| bad(e.to_string()))?;
        let gw: String = row.try_get(1).map_err(|e| bad(e.to_string()))?;
        Ok(Some(Deployment {
            subnet: subnet
                .parse()
                .map_err(|_| bad(format!("bad deployment subnet {subnet}")))?,
            gateway_ip: gw
                .parse()
                .map_err(|_| bad(format!("bad deployment gateway address {gw}")))?,
        }))
    }

    /// The deployment, which must exist.
    pub async fn require_deployment(&self) -> Result<Deployment, RegistryError> {
        self.deployment().await?.ok_or_else(|| RegistryError::NoDeployment {
            db: self.db.clone(),
        })
    }

    /// Checks that a gateway's subnet and tunnel address are the deployment's.
    pub async fn check_deployment(
        &self,
        subnet: Ipv4Net,
        gateway_ip: Ipv4Addr,
    ) -> Result<Deployment, RegistryError> {
        let dep = self.require_deployment().await?;
        if dep.subnet != subnet || dep.gateway_ip != gateway_ip {
            return Err(RegistryError::DeploymentMismatch {
                db: self.db.clone(),
                ours: subnet,
                ours_ip: gateway_ip,
                theirs: dep.subnet,
                theirs_ip: dep.gateway_ip,
            });
        }
        Ok(dep)
    }

    /// Creates the deployment (`gateway init --registry`). Refuses a database that has one.
    pub async fn create_deployment(&self, dep: Deployment) -> Result<(), RegistryError> {
        let done = bounded(
            &self.db,
            sqlx::query(
                "INSERT INTO holdfast_deployment (subnet, gateway_ip, created) \
                 VALUES ($1::cidr, $2::inet, $3) ON CONFLICT DO NOTHING",
            )
            .bind(dep.subnet.to_string())
            .bind(dep.gateway_ip.to_string())
            .bind(timestamp_now())
            .execute(&self.pool),
        )
        .await?;
        if done.rows_affected() == 0 {
            let existing = self.require_deployment().await?;
            return Err(RegistryError::DeploymentExists {
                db: self.db.clone(),
                subnet: existing.subnet,
            });
        }
        Ok(())
    }

    /// Adds a gateway to the deployment's list (clients receive it). An endpoint already taken
    /// by another name is refused; the same name again is fine (a restart, a re-run).
    pub async fn register_gateway(&self, name: &str, endpoint: &str) -> Result<(), RegistryError> {
        let row = bounded(
            &self.db,
            sqlx::query(
                "INSERT INTO holdfast_gateways (endpoint, name, joined) VALUES ($1, $2, $3) \
                 ON CONFLICT (endpoint) DO UPDATE SET joined = holdfast_gateways.joined \
                 RETURNING name",
            )
            .bind(endpoint)
            .bind(name)
            .bind(timestamp_now())
            .fetch_one(&self.pool),
        )
        .await?;
        let owner: String = row.try_get(0).map_err(|e| classify(&self.db, e))?;
        if owner != name {
            return Err(RegistryError::EndpointTaken {
                endpoint: endpoint.to_owned(),
                name: owner,
            });
        }
        Ok(())
    }

    /// Removes a gateway from the list (an `init`/`join` that failed after registering).
    pub async fn unregister_gateway(&self, endpoint: &str) -> Result<(), RegistryError> {
        bounded(
            &self.db,
            sqlx::query("DELETE FROM holdfast_gateways WHERE endpoint = $1")
                .bind(endpoint)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    async fn clients_on(&self, conn: &mut PgConnection) -> Result<Vec<ClientEntry>, RegistryError> {
        let rows = bounded(
            &self.db,
            sqlx::query(
                "SELECT name, host(ip), state, cert_sha256, created, cert_issued, revoked_at \
                 FROM holdfast_clients ORDER BY ip",
            )
            .fetch_all(&mut *conn),
        )
        .await?;
        rows.iter().map(|r| self.entry(r)).collect()
    }

    fn entry(&self, r: &sqlx::postgres::PgRow) -> Result<ClientEntry, RegistryError> {
        let bad = |reason: String| RegistryError::Database {
            db: self.db.clone(),
            reason: format!("invalid client row: {reason}"),
        };
        let get = |i: usize| r.try_get::<String, _>(i).map_err(|e| bad(e.to_string()));
        let name = get(0)?;
        let ip = get(1)?;
        let state = match get(2)?.as_str() {
            "active" => ClientState::Active,
            _ => ClientState::Revoked,
        };
        let cert: Vec<u8> = r.try_get(3).map_err(|e| bad(e.to_string()))?;
        let cert: [u8; 32] = cert
            .try_into()
            .map_err(|_| bad(format!("'{name}': the fingerprint is not 32 bytes")))?;
        Ok(ClientEntry {
            ip: ip
                .parse()
                .map_err(|_| bad(format!("'{name}': address {ip}")))?,
            name,
            state,
            cert_sha256: CertFingerprint(cert),
            created: get(4)?,
            cert_issued: get(5)?,
            revoked_at: r
                .try_get::<Option<String>, _>(6)
                .map_err(|e| bad(e.to_string()))?,
        })
    }

    /// Every client, in address order.
    pub async fn clients(&self) -> Result<Vec<ClientEntry>, RegistryError> {
        let mut conn = bounded(&self.db, self.pool.acquire()).await?;
        self.clients_on(&mut conn).await
    }

    /// The registry's version (bumped by every change to clients or gateways).
    pub async fn version(&self) -> Result<u64, RegistryError> {
        let v: i64 = bounded(
            &self.db,
            sqlx::query_scalar("SELECT version FROM holdfast_version").fetch_one(&self.pool),
        )
        .await?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// One consistent read of everything a gateway serves from.
    pub async fn snapshot(&self) -> Result<SharedSnapshot, RegistryError> {
        let db = &self.db;
        let mut tx = bounded(db, self.pool.begin()).await?;
        bounded(
            db,
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx),
        )
        .await?;
        let version: i64 = bounded(
            db,
            sqlx::query_scalar("SELECT version FROM holdfast_version").fetch_one(&mut *tx),
        )
        .await?;
        let endpoints: Vec<String> = bounded(
            db,
            sqlx::query_scalar("SELECT endpoint FROM holdfast_gateways ORDER BY joined, endpoint")
                .fetch_all(&mut *tx),
        )
        .await?;
        let clients = self.clients_on(&mut tx).await?;
        bounded(db, tx.commit()).await?;
        Ok(SharedSnapshot {
            version: u64::try_from(version).unwrap_or(0),
            endpoints,
            clients,
        })
    }

    /// `add-client`: under the deployment-wide advisory lock, plans the address from every
    /// current entry, lets `issue` make (and write) the credentials, and records the client.
    /// The UNIQUE constraint on the address is the guarantee; the lock only avoids retries.
    pub async fn add_client<E: From<RegistryError>>(
        &self,
        name: &str,
        requested: Option<Ipv4Addr>,
        issue: impl FnOnce(&AddPlan) -> Result<CertFingerprint, E>,
    ) -> Result<AddPlan, E> {
        let db = &self.db;
        let mut tx = bounded(db, self.pool.begin()).await?;
        bounded(
            db,
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(ADD_LOCK)
                .execute(&mut *tx),
        )
        .await?;
        let dep = self
            .deployment_on(&mut tx)
            .await?
            .ok_or_else(|| RegistryError::NoDeployment { db: db.clone() })?;
        let clients = self.clients_on(&mut tx).await?;
        let plan = plan_add(&clients, dep.subnet, dep.gateway_ip, name, requested)?;
        let cert = issue(&plan)?;
        let now = timestamp_now();
        let query = if plan.reenable {
            sqlx::query(
                "UPDATE holdfast_clients SET state = 'active', cert_sha256 = $2, cert_issued = $3, \
                 revoked_at = NULL WHERE name = $1",
            )
            .bind(name)
            .bind(cert.0.to_vec())
            .bind(now)
        } else {
            sqlx::query(
                "INSERT INTO holdfast_clients (name, ip, state, cert_sha256, created, cert_issued) \
                 VALUES ($1, $4::inet, 'active', $2, $3, $3)",
            )
            .bind(name)
            .bind(cert.0.to_vec())
            .bind(now)
            .bind(plan.ip.to_string())
        };
        bounded(db, query.execute(&mut *tx)).await?;
        bounded(db, tx.commit()).await?;
        Ok(plan)
    }

    /// `revoke`: marks the client revoked (its address stays reserved).
    pub async fn revoke(&self, name: &str) -> Result<(RevokeOutcome, Ipv4Addr), RegistryError> {
        valid_name(name)?;
        let row = bounded(
            &self.db,
            sqlx::query(
                "WITH changed AS (UPDATE holdfast_clients SET state = 'revoked', revoked_at = $2 \
                 WHERE name = $1 AND state = 'active' RETURNING name) \
                 SELECT host(ip), EXISTS (SELECT 1 FROM changed) FROM holdfast_clients WHERE name = $1",
            )
            .bind(name)
            .bind(timestamp_now())
            .fetch_optional(&self.pool),
        )
        .await?;
        let row = row.ok_or_else(|| RegistryError::NotRegistered {
            name: name.to_owned(),
        })?;
        let ip: String = row.try_get(0).map_err(|e| classify(&self.db, e))?;
        let changed: bool = row.try_get(1).map_err(|e| classify(&self.db, e))?;
        let ip = ip.parse().map_err(|_| RegistryError::Database {
            db: self.db.clone(),
            reason: format!("'{name}' has an invalid address {ip}"),
        })?;
        let outcome = if changed {
            RevokeOutcome::Revoked
        } else {
            RevokeOutcome::AlreadyRevoked
        };
        Ok((outcome, ip))
    }

    /// Records that `gateway` now holds `client`'s live session, opened `age` ago; returns the
    /// claim's number, or `None` when a session opened later elsewhere holds the client (this
    /// claim is stale: its gateway hung or its claim queued while the database was away).
    pub async fn claim_session(
        &self,
        client: &str,
        gateway: &str,
        age: Duration,
    ) -> Result<Option<i64>, RegistryError> {
        bounded(
            &self.db,
            sqlx::query_scalar(
                "INSERT INTO holdfast_sessions (client, gateway, claim, opened_at) \
                 VALUES ($1, $2, nextval('holdfast_claims'), now() - make_interval(secs => $3)) \
                 ON CONFLICT (client) DO UPDATE SET gateway = EXCLUDED.gateway, \
                 claim = EXCLUDED.claim, opened_at = EXCLUDED.opened_at \
                 WHERE holdfast_sessions.opened_at <= EXCLUDED.opened_at \
                 RETURNING claim",
            )
            .bind(client)
            .bind(gateway)
            .bind(age.as_secs_f64())
            .fetch_optional(&self.pool),
        )
        .await
    }

    async fn listen(&self) -> Result<PgListener, RegistryError> {
        let mut l = bounded(&self.db, PgListener::connect_with(&self.pool)).await?;
        bounded(&self.db, l.listen_all([CHANNEL_REGISTRY, CHANNEL_SESSIONS])).await?;
        Ok(l)
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

/// A session opened here, to be claimed in the database.
#[derive(Debug)]
struct Claim {
    client: Arc<str>,
    session: SessionId,
    opened: Instant,
}

/// Tells the follower that a client authenticated here (from `Authenticate`; never waits).
#[derive(Debug, Clone)]
pub struct ClaimSender(mpsc::Sender<Claim>);

impl ClaimSender {
    /// Queues the claim; if the queue is full (the database is slow) it is dropped: the other
    /// gateway's session then ends by idling out instead.
    pub fn claim(&self, client: &Arc<str>, session: SessionId) {
        let _ = self.0.try_send(Claim {
            client: client.clone(),
            session,
            opened: Instant::now(),
        });
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
) -> Result<SharedStart, RegistryError> {
    let store = PgStore::new(url)?;
    let cache = dir.join(CACHE_FILE);
    let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
    let mut said = false;
    let (snapshot, prepared) = loop {
        let attempt = async {
            store.prepare().await?;
            store.check_deployment(subnet, gateway_ip).await?;
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
                    tracing::warn!("{e}; waiting up to {STARTUP_WAIT:?} for it (this gateway never had a view of the registry)");
                    said = true;
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(db = %store.db(), version = snapshot.version, clients = snapshot.clients.len(), gateways = snapshot.endpoints.len(), "shared registry loaded");
    let (tx, rx) = mpsc::channel(CLAIM_QUEUE);
    let live = LiveRegistry::pushed(snapshot.view(), ClaimSender(tx));
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
        },
    })
}

impl SharedStart {
    /// Starts the follower on the gateway's session table. It runs until the runtime stops.
    pub fn follow(self, sessions: Arc<SessionTable>, clock: Clock) {
        let follower = Follower {
            parts: self.follower,
            live: self.live.clone(),
            sessions,
            clock,
            own_claims: HashMap::new(),
        };
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
            store
                .check_deployment(self.parts.subnet, self.parts.gateway_ip)
                .await?;
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
        let view = self.live.install(snap.view());
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
