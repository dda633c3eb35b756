//! The PostgreSQL store: one registry shared by every gateway of a deployment.
//!
//! Schema: `migrations/` (embedded with `sqlx::migrate!`, applied by whichever holdfast connects
//! first; each migration is one transaction, so an interrupted one leaves the previous schema).
//! Addresses are unique by constraint; `add-client` also takes a transaction-scoped advisory
//! lock, so concurrent runs queue instead of colliding and retrying.
//!
//! What the running gateway does with it lives in `gateway::follow` (which keeps the gateway's
//! in-memory view in step with the database); this module is only the store, and never touches
//! the running gateway's state.
//!
//! Session keys never go to the database: the `holdfast_sessions` table only says which gateway
//! holds each client's current session.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use crate::config::gateway::Tunnel6;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};

use super::{AddPlan, ClientEntry, ClientState, RegistryError, RevokeOutcome, plan_add, timestamp_now, valid_name};
use crate::config::gateway::redact_url;
use crate::pki::CertFingerprint;

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Bound on connecting (and on one query): a database that does not answer in this time counts
/// as unreachable for now; the gateway keeps serving meanwhile.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// Key of the advisory lock that serialises `add-client` across every host ('HfAd').
const ADD_LOCK: i64 = 0x4866_4164;
/// Channels the triggers in migrations/ announce on.
pub const CHANNEL_REGISTRY: &str = "holdfast_registry";
pub const CHANNEL_SESSIONS: &str = "holdfast_sessions";

/// The deployment's address plan, as the database holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployment {
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    /// The IPv6 tunnel plan (`None`: IPv4 only inside the tunnel).
    pub v6: Option<Tunnel6>,
}

/// One consistent read of the registry: every client, every gateway endpoint, the version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSnapshot {
    pub version: u64,
    pub endpoints: Vec<String>,
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientEntry>,
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
    format!("'{}' on {place} (user {})", opts.get_database().unwrap_or(opts.get_username()), opts.get_username())
}

/// Sorts a sqlx error into the problem an operator must fix.
pub(crate) fn classify(db: &str, e: sqlx::Error) -> RegistryError {
    let unreachable = |reason: String| RegistryError::DatabaseUnreachable { db: db.to_owned(), reason };
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // invalid_password, invalid_authorization_specification
                "28P01" | "28000" => RegistryError::DatabaseAuth { db: db.to_owned(), reason: d.message().to_owned() },
                "3D000" => unreachable("the database does not exist (create it first)".into()),
                // connection exceptions, shutting down, too many connections
                c if c.starts_with("08") || c.starts_with("57P") || c == "53300" => unreachable(d.message().to_owned()),
                _ => RegistryError::Database { db: db.to_owned(), reason: d.message().to_owned() },
            }
        }
        sqlx::Error::Io(e) => unreachable(e.to_string()),
        sqlx::Error::Tls(e) => unreachable(format!("TLS: {e}")),
        sqlx::Error::PoolTimedOut => unreachable("no connection within the time limit".into()),
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => unreachable("the connection pool is closed".into()),
        sqlx::Error::Protocol(p) => unreachable(format!("protocol error: {p}")),
        e => RegistryError::Database { db: db.to_owned(), reason: e.to_string() },
    }
}

/// Runs `f` with [`DB_TIMEOUT`]: a database that hangs counts as unreachable.
async fn bounded<T>(db: &str, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, RegistryError> {
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
            .map_err(|e| RegistryError::DatabaseUrl { url: redact_url(url), reason: e.to_string() })?
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
        let has_table: bool =
            bounded(db, sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&mut *conn))
                .await?;
        let applied: Option<i64> = if has_table {
            bounded(
                db,
                sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(&mut *conn),
            )
            .await?
        } else {
            None
        };
        drop(conn);
        let known = known_schema();
        if let Some(version) = applied.filter(|v| *v > known) {
            return Err(RegistryError::SchemaNewer { db: db.clone(), version, known });
        }
        match tokio::time::timeout(DB_TIMEOUT * 6, MIGRATOR.run(&self.pool)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(sqlx::migrate::MigrateError::Execute(e))) => Err(classify(db, e)),
            Ok(Err(e)) => Err(RegistryError::Database { db: db.clone(), reason: format!("schema migration: {e}") }),
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

    async fn deployment_on(&self, conn: &mut PgConnection) -> Result<Option<Deployment>, RegistryError> {
        let row = bounded(
            &self.db,
            sqlx::query(
                "SELECT subnet::text, host(gateway_ip), subnet6::text, host(gateway_ip6) \
                 FROM holdfast_deployment",
            )
            .fetch_optional(&mut *conn),
        )
        .await?;
        let Some(row) = row else { return Ok(None) };
        let bad = |reason: String| RegistryError::Database { db: self.db.clone(), reason };
        let subnet: String = row.try_get(0).map_err(|e| bad(e.to_string()))?;
        let gw: String = row.try_get(1).map_err(|e| bad(e.to_string()))?;
        let subnet6: Option<String> = row.try_get(2).map_err(|e| bad(e.to_string()))?;
        let gw6: Option<String> = row.try_get(3).map_err(|e| bad(e.to_string()))?;
        let v6 = match (subnet6, gw6) {
            (Some(net), Some(gw6)) => Some(Tunnel6 {
                subnet: net.parse().map_err(|_| bad(format!("bad deployment subnet6 {net}")))?,
                gateway_ip: gw6.parse().map_err(|_| bad(format!("bad deployment gateway address {gw6}")))?,
            }),
            _ => None,
        };
        Ok(Some(Deployment {
            v6,
            subnet: subnet.parse().map_err(|_| bad(format!("bad deployment subnet {subnet}")))?,
            gateway_ip: gw.parse().map_err(|_| bad(format!("bad deployment gateway address {gw}")))?,
        }))
    }

    /// The deployment, which must exist.
    pub async fn require_deployment(&self) -> Result<Deployment, RegistryError> {
        self.deployment().await?.ok_or_else(|| RegistryError::NoDeployment { db: self.db.clone() })
    }

    /// Checks that a gateway's subnet and tunnel address are the deployment's.
    pub async fn check_deployment(
        &self,
        subnet: Ipv4Net,
        gateway_ip: Ipv4Addr,
        v6: Option<Tunnel6>,
    ) -> Result<Deployment, RegistryError> {
        let dep = self.require_deployment().await?;
        if dep.v6 != v6 {
            let text = |v: Option<Tunnel6>| {
                v.map_or_else(|| "none".to_owned(), |v| format!("{} (gateway {})", v.subnet, v.gateway_ip))
            };
            return Err(RegistryError::Deployment6Mismatch {
                db: self.db.clone(),
                ours: text(v6),
                theirs: text(dep.v6),
            });
        }
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
                "INSERT INTO holdfast_deployment (subnet, gateway_ip, created, subnet6, gateway_ip6) \
                 VALUES ($1::cidr, $2::inet, $3, $4::cidr, $5::inet) ON CONFLICT DO NOTHING",
            )
            .bind(dep.subnet.to_string())
            .bind(dep.gateway_ip.to_string())
            .bind(timestamp_now())
            .bind(dep.v6.map(|v| v.subnet.to_string()))
            .bind(dep.v6.map(|v| v.gateway_ip.to_string()))
            .execute(&self.pool),
        )
        .await?;
        if done.rows_affected() == 0 {
            let existing = self.require_deployment().await?;
            return Err(RegistryError::DeploymentExists { db: self.db.clone(), subnet: existing.subnet });
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
            return Err(RegistryError::EndpointTaken { endpoint: endpoint.to_owned(), name: owner });
        }
        Ok(())
    }

    /// Removes a gateway from the list (an `init`/`join` that failed after registering).
    pub async fn unregister_gateway(&self, endpoint: &str) -> Result<(), RegistryError> {
        bounded(
            &self.db,
            sqlx::query("DELETE FROM holdfast_gateways WHERE endpoint = $1").bind(endpoint).execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    async fn clients_on(&self, conn: &mut PgConnection) -> Result<Vec<ClientEntry>, RegistryError> {
        let rows = bounded(
            &self.db,
            sqlx::query(
                "SELECT name, host(ip), state, cert_sha256, created, cert_issued, revoked_at, host(ip6) \
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
        let cert: [u8; 32] = cert.try_into().map_err(|_| bad(format!("'{name}': the fingerprint is not 32 bytes")))?;
        Ok(ClientEntry {
            ip: ip.parse().map_err(|_| bad(format!("'{name}': address {ip}")))?,
            name,
            state,
            cert_sha256: CertFingerprint(cert),
            created: get(4)?,
            cert_issued: get(5)?,
            revoked_at: r.try_get::<Option<String>, _>(6).map_err(|e| bad(e.to_string()))?,
            ip6: match r.try_get::<Option<String>, _>(7).map_err(|e| bad(e.to_string()))? {
                Some(ip6) => Some(ip6.parse().map_err(|_| bad(format!("address {ip6}")))?),
                None => None,
            },
        })
    }

    /// Every client, in address order.
    pub async fn clients(&self) -> Result<Vec<ClientEntry>, RegistryError> {
        let mut conn = bounded(&self.db, self.pool.acquire()).await?;
        self.clients_on(&mut conn).await
    }

    /// The registry's version (bumped by every change to clients or gateways).
    pub async fn version(&self) -> Result<u64, RegistryError> {
        let v: i64 =
            bounded(&self.db, sqlx::query_scalar("SELECT version FROM holdfast_version").fetch_one(&self.pool)).await?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// One consistent read of everything a gateway serves from.
    pub async fn snapshot(&self) -> Result<SharedSnapshot, RegistryError> {
        let db = &self.db;
        let mut tx = bounded(db, self.pool.begin()).await?;
        bounded(db, sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx))
            .await?;
        let version: i64 =
            bounded(db, sqlx::query_scalar("SELECT version FROM holdfast_version").fetch_one(&mut *tx)).await?;
        let endpoints: Vec<String> = bounded(
            db,
            sqlx::query_scalar("SELECT endpoint FROM holdfast_gateways ORDER BY joined, endpoint").fetch_all(&mut *tx),
        )
        .await?;
        let clients = self.clients_on(&mut tx).await?;
        bounded(db, tx.commit()).await?;
        Ok(SharedSnapshot { version: u64::try_from(version).unwrap_or(0), endpoints, clients })
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
        bounded(db, sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ADD_LOCK).execute(&mut *tx)).await?;
        let dep = self.deployment_on(&mut tx).await?.ok_or_else(|| RegistryError::NoDeployment { db: db.clone() })?;
        let clients = self.clients_on(&mut tx).await?;
        let plan = plan_add(&clients, dep.subnet, dep.gateway_ip, dep.v6, name, requested)?;
        let cert = issue(&plan)?;
        let now = timestamp_now();
        let query = if plan.reenable {
            sqlx::query(
                "UPDATE holdfast_clients SET state = 'active', cert_sha256 = $2, cert_issued = $3, \
                 revoked_at = NULL, ip6 = $4::inet WHERE name = $1",
            )
            .bind(name)
            .bind(cert.0.to_vec())
            .bind(now)
            .bind(plan.ip6.map(|ip| ip.to_string()))
        } else {
            sqlx::query(
                "INSERT INTO holdfast_clients (name, ip, state, cert_sha256, created, cert_issued, ip6) \
                 VALUES ($1, $4::inet, 'active', $2, $3, $3, $5::inet)",
            )
            .bind(name)
            .bind(cert.0.to_vec())
            .bind(now)
            .bind(plan.ip.to_string())
            .bind(plan.ip6.map(|ip| ip.to_string()))
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
        let row = row.ok_or_else(|| RegistryError::NotRegistered { name: name.to_owned() })?;
        let ip: String = row.try_get(0).map_err(|e| classify(&self.db, e))?;
        let changed: bool = row.try_get(1).map_err(|e| classify(&self.db, e))?;
        let ip = ip.parse().map_err(|_| RegistryError::Database {
            db: self.db.clone(),
            reason: format!("'{name}' has an invalid address {ip}"),
        })?;
        let outcome = if changed { RevokeOutcome::Revoked } else { RevokeOutcome::AlreadyRevoked };
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

    /// A connection listening on both channels.
    pub async fn listen(&self) -> Result<PgListener, RegistryError> {
        let mut l = bounded(&self.db, PgListener::connect_with(&self.pool)).await?;
        bounded(&self.db, l.listen_all([CHANNEL_REGISTRY, CHANNEL_SESSIONS])).await?;
        Ok(l)
    }
}
