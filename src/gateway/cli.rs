//! `holdfast gateway <command>`: the operator's commands.
//!
//! The binary parses a [`GatewayCommand`] and calls [`GatewayCommand::run`]; on error it prints
//! the error (one line naming the file or value and the problem) and exits with
//! [`super::GatewayError::exit_code`]. Everything a command prints on success is printed here.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use ipnet::{Ipv4Net, Ipv6Net};

use super::GatewayError;
use super::fsutil::{self, Existing};
use super::registry::file::FileStore;
use super::registry::postgres::{Deployment, PgStore};
use super::registry::{ClientState, RegistryError, RegistryStore, RevokeOutcome, check_name};
use super::server::ControlPlane;
use crate::config::ConfigError;
use crate::config::client::{ClientFile, TlsSection};
use crate::config::gateway::{
    self as gwconf, DEFAULT_NAME, DEFAULT_SERVER_NAME, DEFAULT_SUBNET, GATEWAY_FILE, GatewayConfig, InitialValues,
    SharedValues,
};
use crate::pki::Authority;

/// Mode of files holding a private key (and of client files, which hold one).
const SECRET_MODE: u32 = 0o600;
/// Mode of public files (certificates, gateway.toml).
const PUBLIC_MODE: u32 = 0o644;

/// Manage and run a Holdfast gateway.
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Create a gateway: its authority, its TLS identity, gateway.toml and an empty registry.
    ///
    /// Writes into DIR: gateway.toml, ca.pem + ca.key (the authority that issues client
    /// credentials), server.pem + server.key (the gateway's TLS 1.3 identity, signed by the
    /// authority) and clients.toml (the client registry). Keys are written with mode 0600.
    /// Refuses to overwrite an existing identity.
    ///
    /// With --registry postgres://..., the registry is the database's instead of clients.toml:
    /// the deployment (its subnet) is created there and this gateway is its first; add more
    /// with `gateway join`.
    Init(InitCommand),
    /// Create another gateway of an existing deployment (shared registry in PostgreSQL).
    ///
    /// Copies the authority and the registry's database from --from DIR, takes the deployment's
    /// subnet, and writes into NEW its own TLS identity for --endpoint and its gateway.toml.
    /// Clients are told about every gateway and fail over between them.
    Join(JoinArgs),
    /// Register a client and write its self-contained client file.
    ///
    /// The client gets a stable tunnel address (the next free one in the subnet, or --ip) and a
    /// new certificate signed by the gateway's authority. The client file (endpoint, the
    /// authority to pin, the client's key and certificate, tunnel address) is written with mode
    /// 0600; copy it to the client as its config. Re-adding a revoked client re-enables it with
    /// the same address and a new certificate (its old client file stays unusable).
    /// A running gateway picks the change up without a restart.
    AddClient(AddClientArgs),
    /// Revoke a client: it can no longer authenticate and its sessions end.
    ///
    /// The entry stays in the registry (marked revoked), so its tunnel address stays reserved
    /// for it; `add-client` re-enables it. A running gateway applies it without a restart.
    Revoke(RevokeArgs),
    /// Show the client registry: name, tunnel address, state, certificate, creation time.
    List(ListArgs),
    /// Serve the control plane (gRPC over mutual TLS 1.3) and the data plane until SIGINT or
    /// SIGTERM.
    ///
    /// Listens on `listen` from gateway.toml (TCP for the control plane, UDP on the same port for
    /// the data plane). Registry changes (add-client, revoke) take effect without a restart.
    /// The resolver (`[dns]`, on by default) answers DNS on UDP and TCP port 53 of the tunnel
    /// address, only for clients with a live session, forwarding to `[dns] upstreams` or this
    /// host's /etc/resolv.conf nameservers; clients are told to use it when they connect.
    /// Signals: SIGUSR2 ends every session (clients re-authenticate by themselves); SIGUSR1 logs
    /// the data plane's and the resolver's counters; SIGHUP re-reads gateway.toml and applies, without a restart,
    /// the session timeouts (session_idle_timeout, session_max_lifetime, reauth_grace), the
    /// `[metrics]` endpoint and `[log]` level (unless RUST_LOG is set). Other changes wait for a
    /// restart (the log line names them); a file that does not load is refused and the running
    /// configuration stays.
    ///
    /// Serves `gateway status` on `status_socket` (default DIR/gateway.sock, mode 0600) and,
    /// if `[metrics]` is on, Prometheus metrics at http://LISTEN/metrics.
    Run(RunArgs),
    /// Show what the running gateway is doing (like `wg show`): live sessions with client,
    /// tunnel addresses, endpoint, age, last seen, traffic and drops (never a key: a
    /// fingerprint), the control plane's totals and the data plane's counters.
    ///
    /// Asks the gateway on its status socket (`status_socket` in DIR/gateway.toml, default
    /// DIR/gateway.sock; root-only for a gateway run as root). Exits 3 when no gateway is
    /// running.
    Status(StatusArgs),
}

/// Arguments of `gateway status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The gateway's directory (holding gateway.toml, which names the status socket).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The status socket to ask, instead of the one gateway.toml names.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Arguments of `gateway init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The gateway's directory (created if missing, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The public address and port clients connect to (TCP control plane and UDP data plane).
    #[arg(long, value_name = "ADDR:PORT")]
    pub endpoint: SocketAddr,
    /// The tunnel subnet; the gateway takes its first host address.
    #[arg(long, value_name = "CIDR", default_value_t = DEFAULT_SUBNET)]
    pub subnet: Ipv4Net,
    /// The IPv6 tunnel subnet (/48 to /120); the gateway takes its first host address.
    /// Default: a random RFC 4193 unique local /64 (fdXX:XXXX:XXXX::/64), chosen once here.
    #[arg(long, value_name = "CIDR6")]
    pub subnet6: Option<Ipv6Net>,
    /// This gateway's name (logs, the authority's certificate).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_NAME)]
    pub name: String,
    /// The DNS name in the gateway's TLS certificate, checked by clients (the endpoint's IP
    /// address is always included too).
    #[arg(long, value_name = "DNS-NAME", default_value = DEFAULT_SERVER_NAME)]
    pub server_name: String,
}

/// `gateway init`: the file-store arguments plus `--registry`.
#[derive(Debug, Args)]
pub struct InitCommand {
    #[command(flatten)]
    pub args: InitArgs,
    /// Keep the registry in this PostgreSQL database (shared by every gateway of the
    /// deployment) instead of DIR/clients.toml, e.g. postgres://holdfast@localhost/holdfast?host=/run/postgresql
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,
}

// `gateway init`'s flags are InitArgs' (the file store's, as before) plus one: reading them through
// the command keeps every caller of InitArgs unchanged.
impl std::ops::Deref for InitCommand {
    type Target = InitArgs;
    fn deref(&self) -> &InitArgs {
        &self.args
    }
}

/// Arguments of `gateway join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The new gateway's directory (created if missing, mode 0700).
    #[arg(long, value_name = "NEW")]
    pub dir: PathBuf,
    /// The directory of a gateway of the deployment (its authority and database are used).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// The new gateway's public address and port.
    #[arg(long, value_name = "ADDR:PORT")]
    pub endpoint: SocketAddr,
    /// The new gateway's name (default: the --from gateway's).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// Arguments of `gateway add-client`.
#[derive(Debug, Args)]
pub struct AddClientArgs {
    /// The gateway's directory (holding gateway.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The client's name: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The tunnel address to give the client (default: the next free one in the subnet).
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<Ipv4Addr>,
    /// Where to write the client file (default: DIR/clients/NAME.toml). Replaced if it exists.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Arguments of `gateway revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The gateway's directory (holding gateway.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The client to revoke.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// Arguments of `gateway list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The gateway's directory (holding gateway.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

/// Arguments of `gateway run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The gateway's directory (holding gateway.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

impl GatewayCommand {
    /// Runs the command. `run` serves until SIGINT/SIGTERM (then returns `Ok`); the others
    /// return when done. Needs a tokio runtime; `run` logs through `tracing`, so the binary
    /// installs a subscriber first.
    pub async fn run(self) -> Result<(), GatewayError> {
        match self {
            GatewayCommand::Init(a) => match &a.registry {
                None => init(&a.args),
                Some(url) => init_shared(&a.args, url).await,
            }
            .map(|report| say(&report)),
            GatewayCommand::Join(a) => join(&a).await.map(|report| say(&report)),
            GatewayCommand::AddClient(a) => add_client_in(&a).await.map(|report| say(&report)),
            GatewayCommand::Revoke(a) => revoke_in(&a).await.map(|report| say(&report)),
            GatewayCommand::List(a) => list_in(&a.dir).await.map(|report| say(&report)),
            GatewayCommand::Run(a) => run(&a.dir).await,
            GatewayCommand::Status(a) => {
                // Blocks (bounded by the query's timeout): the binary runs commands on its main
                // thread with nothing else to do meanwhile.
                let path = super::status::socket_of(&a.dir, a.socket);
                say(&super::status::status_text(&path, a.json)?);
                Ok(())
            }
        }
    }
}

/// Prints a command's report. A closed stdout (`| head`) is not an error worth failing over.
fn say(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> Result<(), GatewayError> {
    fsutil::write_atomic(path, bytes, mode, existing).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => GatewayError::AlreadyInitialised { path: path.to_owned() },
        _ => GatewayError::Write { path: path.to_owned(), source },
    })
}

/// `gateway init` with the file store. Returns the text to print.
pub fn init(a: &InitArgs) -> Result<String, GatewayError> {
    let (config, config_text) = plan_init(a, &SharedValues::default())?;
    let authority = Authority::generate(&a.name)?;
    write_identity(&config, &authority)?;
    FileStore::new(&config.registry, config.subnet, config.gateway_ip, config.v6).create()?;
    write_file(&config.dir.join(GATEWAY_FILE), config_text.as_bytes(), PUBLIC_MODE, Existing::Refuse)?;
    Ok(init_report(&config, &a.dir, &config.registry.display().to_string()))
}

/// `gateway init --registry URL`: the deployment is created in the database, this gateway is
/// its first.
pub async fn init_shared(a: &InitArgs, url: &str) -> Result<String, GatewayError> {
    gwconf::check_database_url(url)
        .map_err(|reason| RegistryError::DatabaseUrl { url: gwconf::redact_url(url), reason })?;
    let shared = SharedValues { database: Some(url.to_owned()), gateway_ip: None, gateway_ip6: None };
    let (config, config_text) = plan_init(a, &shared)?;
    let store = PgStore::connect(url).await?;
    store.create_deployment(Deployment { subnet: config.subnet, gateway_ip: config.gateway_ip, v6: config.v6 }).await?;
    let authority = Authority::generate(&a.name)?;
    finish_shared(&store, &config, &config_text, &authority).await?;
    Ok(init_report(&config, &a.dir, &format!("database {}", store.db())))
}

/// `gateway join`: another gateway of the deployment `--from` belongs to.
pub async fn join(a: &JoinArgs) -> Result<String, GatewayError> {
    let from = GatewayConfig::load_dir(&a.from)?;
    let Some(url) = from.database.clone() else {
        return Err(GatewayError::Usage {
            flag: "--from",
            reason: format!(
                "{} keeps its registry in a file; only gateways on a shared registry \
                 (`gateway init --registry postgres://...`) can be joined",
                a.from.display()
            ),
        });
    };
    let store = PgStore::connect(&url).await?;
    let dep = store.check_deployment(from.subnet, from.gateway_ip, from.v6).await?;
    let args = InitArgs {
        dir: a.dir.clone(),
        endpoint: a.endpoint,
        subnet: dep.subnet,
        subnet6: dep.v6.map(|v6| v6.subnet),
        name: a.name.clone().unwrap_or_else(|| from.name.clone()),
        server_name: from.server_name.clone(),
    };
    let shared = SharedValues {
        database: Some(url),
        gateway_ip: Some(dep.gateway_ip),
        gateway_ip6: dep.v6.map(|v6| v6.gateway_ip),
    };
    let (config, config_text) = plan_init(&args, &shared)?;
    let authority = load_authority(&from)?;
    finish_shared(&store, &config, &config_text, &authority).await?;
    let endpoints = store.snapshot().await?.endpoints;
    Ok(format!(
        "Gateway '{}' joined the deployment in {}\n  endpoint     {}\n  subnet       {} (gateway {})\n  \
         gateways     {}\n  registry     database {}\n\
         Start it with: holdfast gateway run --dir {}\n",
        config.name,
        a.dir.display(),
        config.endpoint,
        config.subnet,
        config.gateway_ip,
        endpoints.join(", "),
        store.db(),
        a.dir.display(),
    ))
}

/// Checks the flags, renders gateway.toml and parses it back; refuses an existing identity.
fn plan_init(a: &InitArgs, shared: &SharedValues) -> Result<(GatewayConfig, String), GatewayError> {
    let usage = |flag, reason| GatewayError::Usage { flag, reason };
    check_name(&a.name).map_err(|r| usage("--name", format!("'{}': {r}", a.name)))?;
    gwconf::check_server_name(&a.server_name).map_err(|r| usage("--server-name", r))?;
    gwconf::check_subnet(a.subnet).map_err(|r| usage("--subnet", r))?;
    let subnet6 = match a.subnet6 {
        Some(net) => gwconf::check_subnet6(net).map_err(|r| usage("--subnet6", r))?,
        None => random_ula(),
    };
    if a.endpoint.port() == 0 || a.endpoint.ip().is_unspecified() {
        return Err(usage("--endpoint", format!("{} is not an address and port clients can reach", a.endpoint)));
    }
    let values = InitialValues {
        name: a.name.clone(),
        endpoint: a.endpoint,
        subnet: a.subnet,
        subnet6,
        server_name: a.server_name.clone(),
    };
    let config_path = a.dir.join(GATEWAY_FILE);
    let config_text = gwconf::render_with(&values, shared);
    // What we are about to write must be what every other command reads back.
    let config = GatewayConfig::parse(&config_text, &config_path)?;
    let mut files = vec![&config_path, &config.ca_cert, &config.ca_key, &config.cert, &config.key];
    if config.database.is_none() {
        files.push(&config.registry);
    }
    if let Some(existing) = files.iter().find(|p| p.exists()) {
        return Err(GatewayError::AlreadyInitialised { path: existing.to_path_buf() });
    }
    fsutil::create_private_dir(&a.dir).map_err(|source| GatewayError::Write { path: a.dir.clone(), source })?;
    Ok((config, config_text))
}

/// Writes the authority (new for init, copied for join) and a new TLS identity for this
/// gateway's endpoint. Keys first, gateway.toml last (the caller): an interrupted init leaves no
/// config pointing at missing files (and a re-run names the leftover file it refuses to
/// overwrite).
fn write_identity(config: &GatewayConfig, authority: &Authority) -> Result<(), GatewayError> {
    let server = authority.issue_server(&config.server_name, Some(config.endpoint.ip()))?;
    write_file(&config.ca_key, authority.key_pem().as_bytes(), SECRET_MODE, Existing::Refuse)?;
    write_file(&config.key, server.key_pem.as_bytes(), SECRET_MODE, Existing::Refuse)?;
    write_file(&config.ca_cert, authority.cert_pem().as_bytes(), PUBLIC_MODE, Existing::Refuse)?;
    write_file(&config.cert, server.cert_pem.as_bytes(), PUBLIC_MODE, Existing::Refuse)?;
    Ok(())
}

/// The shared-registry half of init and join: registers the gateway's endpoint, then writes its
/// identity and gateway.toml (mode 0600: the database URL may hold a password). A failure
/// after registering takes the endpoint back out of the list.
async fn finish_shared(
    store: &PgStore,
    config: &GatewayConfig,
    config_text: &str,
    authority: &Authority,
) -> Result<(), GatewayError> {
    let endpoint = config.endpoint.to_string();
    store.register_gateway(&config.name, &endpoint).await?;
    let written = write_identity(config, authority).and_then(|()| {
        write_file(&config.dir.join(GATEWAY_FILE), config_text.as_bytes(), SECRET_MODE, Existing::Refuse)
    });
    if written.is_err() {
        let _ = store.unregister_gateway(&endpoint).await;
    }
    written
}

fn init_report(config: &GatewayConfig, dir: &Path, registry: &str) -> String {
    format!(
        "Initialised gateway '{}' in {}\n  endpoint     {}\n  subnet       {} (gateway {})\n  subnet6      {}\n  server name  {}\n  \
         authority    {} (key {})\n  TLS identity {} (key {})\n  registry     {}\n\
         Next: holdfast gateway add-client --dir {} NAME\n",
        config.name,
        dir.display(),
        config.endpoint,
        config.subnet,
        config.gateway_ip,
        v6_text(config),
        config.server_name,
        config.ca_cert.display(),
        config.ca_key.display(),
        config.cert.display(),
        config.key.display(),
        registry,
        dir.display(),
    )
}

/// A random RFC 4193 unique local /64 (40 random bits of global id).
fn random_ula() -> Ipv6Net {
    let mut id = [0u8; 5];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    gwconf::random_ula64(id)
}

/// "SUBNET6 (gateway GW6)" or "none", for reports.
fn v6_text(config: &GatewayConfig) -> String {
    match config.v6 {
        Some(v6) => format!("{} (gateway {})", v6.subnet, v6.gateway_ip),
        None => "none".into(),
    }
}

/// Loads `DIR/gateway.toml` for a command that serves or adds clients, upgrading a directory
/// written before IPv6 in place first: gateway.toml gets a random ULA `subnet6` (inserted as
/// text, so comments and layout stay), and every registry entry without an IPv6 address gets
/// one. IPv4 addresses never change. Returns the config and one line per change made (empty
/// when there was nothing to do), which the caller prints or logs. A gateway on a shared
/// registry is left as it is: its deployment's address plan lives in the database.
pub fn load_upgraded(dir: &Path) -> Result<(GatewayConfig, Vec<String>), GatewayError> {
    let path = dir.join(GATEWAY_FILE);
    let mut config = GatewayConfig::load(&path)?;
    let mut changes = Vec::new();
    if config.database.is_some() {
        return Ok((config, changes));
    }
    if config.v6.is_none() {
        // A registry that already holds IPv6 addresses lost its `subnet6` (an edit gone wrong):
        // a fresh random one would not contain them. Refused, naming the key (the registry's
        // own check says "... but gateway.toml has no `subnet6`"), and nothing is written.
        FileStore::new(&config.registry, config.subnet, config.gateway_ip, None).check()?;
        let text = crate::config::read_config_text(&path)?;
        let subnet6 = random_ula();
        if let Some(new_text) = gwconf::upgrade_text(&text, subnet6) {
            // Parse what we are about to write: the upgrade must never break the file.
            let upgraded = GatewayConfig::parse(&new_text, &path)?;
            write_file(&path, new_text.as_bytes(), PUBLIC_MODE, Existing::Replace)?;
            changes.push(format!("{}: added subnet6 = \"{subnet6}\" (dual stack)", path.display()));
            config = upgraded;
        }
    }
    let named = FileStore::new(&config.registry, config.subnet, config.gateway_ip, config.v6).assign_missing_ip6()?;
    if !named.is_empty() {
        changes.push(format!(
            "{}: gave {} client(s) an IPv6 address ({}); IPv4 addresses unchanged",
            config.registry.display(),
            named.len(),
            named.join(", ")
        ));
    }
    Ok((config, changes))
}

fn load_authority(config: &GatewayConfig) -> Result<Authority, GatewayError> {
    let read = |path: &Path, what| {
        std::fs::read_to_string(path).map_err(|e| ConfigError::MissingKey {
            path: path.to_owned(),
            what,
            reason: e.to_string(),
        })
    };
    let cert = read(&config.ca_cert, "authority certificate")?;
    let key = read(&config.ca_key, "authority key")?;
    Authority::from_pem(&cert, &key).map_err(|e| {
        let path = match &e {
            crate::pki::PkiError::BadAuthority { what: "key", .. } => config.ca_key.clone(),
            _ => config.ca_cert.clone(),
        };
        ConfigError::BadKey { path, what: "authority", reason: e.to_string() }.into()
    })
}

const CLIENT_FILE_HEADER: &str = "# Holdfast client file, written by `holdfast gateway add-client`.\n\
                                  # It holds this client's private key: keep it mode 0600, copy it only to the client.\n\n";

/// Runs a one-shot command's future for a caller outside any tokio runtime (the async
/// versions are what `GatewayCommand::run` uses). Called from inside a runtime, it runs on a
/// thread of its own, since a runtime cannot block on another.
fn block_on<T: Send>(f: impl Future<Output = Result<T, GatewayError>> + Send) -> Result<T, GatewayError> {
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| GatewayError::Write { path: PathBuf::from("(tokio runtime)"), source: e })?
            .block_on(f)
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| s.spawn(run).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
}

/// `gateway add-client`, outside a runtime. Returns the text to print.
pub fn add_client(a: &AddClientArgs) -> Result<String, GatewayError> {
    block_on(add_client_in(a))
}

/// `gateway add-client`. Returns the text to print.
pub async fn add_client_in(a: &AddClientArgs) -> Result<String, GatewayError> {
    check_name(&a.name).map_err(|r| GatewayError::Usage { flag: "NAME", reason: format!("'{}': {r}", a.name) })?;
    let (config, upgraded) = load_upgraded(&a.dir)?;
    let store = RegistryStore::open(&config).await?;
    // Every gateway of the deployment goes into the client file, this one first.
    let mut endpoints = store.snapshot(&config.endpoint.to_string()).await?.endpoints;
    let own = config.endpoint.to_string();
    endpoints.retain(|e| *e != own);
    endpoints.insert(0, own);
    let mut written = None;
    let plan = store
        .add_client(&a.name, a.ip, |plan| {
            let authority = load_authority(&config)?;
            let issued = authority.issue_client(&a.name)?;
            let out = write_client_file(a, &config, &authority, &issued, plan, &endpoints)?;
            written = Some((out, issued.fingerprint));
            Ok::<_, GatewayError>(issued.fingerprint)
        })
        .await?;
    // Invariant: the store returns Ok only after running `issue`, which set `written`.
    let (out, fp) = written.expect("add_client ran issue");
    let what = if plan.reenable { "re-enabled (same address, new certificate)" } else { "registered" };
    let ip6 = plan.ip6.map(|ip| format!(" and {ip}")).unwrap_or_default();
    let mut report: String = upgraded.iter().map(|l| format!("Upgraded {l}\n")).collect();
    report.push_str(&format!(
        "Client '{}' {what}: tunnel address {}{ip6}, certificate {}\nClient file (mode 0600, contains the client's key): {}\n",
        a.name,
        plan.ip,
        fp.short(),
        out.display()
    ));
    Ok(report)
}

/// Writes the client file for a planned add: the client must be able to read back exactly what
/// we write. The file first, the registry second: if we stop in between, the registry still pins
/// the old certificate (or has no entry), and running add-client again fixes it.
fn write_client_file(
    a: &AddClientArgs,
    config: &GatewayConfig,
    authority: &Authority,
    issued: &crate::pki::IssuedCert,
    plan: &super::registry::AddPlan,
    endpoints: &[String],
) -> Result<PathBuf, GatewayError> {
    let file = ClientFile {
        name: a.name.clone(),
        endpoint: config.endpoint,
        // Only a deployment with several gateways lists them (a single gateway's file stays as
        // it always was).
        endpoints: if endpoints.len() > 1 {
            endpoints.iter().filter_map(|e| e.parse().ok()).collect()
        } else {
            Vec::new()
        },
        server_name: config.server_name.clone(),
        tunnel_ip: plan.ip,
        tls: TlsSection {
            gateway_ca: Some(authority.cert_pem().to_owned()),
            certificate: Some(issued.cert_pem.clone()),
            key: Some(issued.key_pem.clone()),
            ..TlsSection::default()
        },
        timing: Default::default(),
        log: Default::default(),
        network: Default::default(),
        status: Default::default(),
    };
    let out = match &a.out {
        Some(p) => p.clone(),
        None => {
            fsutil::create_private_dir(&config.clients_dir)
                .map_err(|source| GatewayError::Write { path: config.clients_dir.clone(), source })?;
            config.clients_dir.join(format!("{}.toml", a.name))
        }
    };
    let body = toml::to_string(&file)
        .map_err(|e| GatewayError::Write { path: out.clone(), source: std::io::Error::other(e.to_string()) })?;
    let text = format!("{CLIENT_FILE_HEADER}{body}");
    ClientFile::parse(&text, &out)?.credentials(&out)?;
    write_file(&out, text.as_bytes(), SECRET_MODE, Existing::Replace)?;
    Ok(out)
}

/// `gateway revoke`, outside a runtime. Returns the text to print.
pub fn revoke(a: &RevokeArgs) -> Result<String, GatewayError> {
    block_on(revoke_in(a))
}

/// `gateway revoke`. Returns the text to print.
pub async fn revoke_in(a: &RevokeArgs) -> Result<String, GatewayError> {
    let config = GatewayConfig::load_dir(&a.dir)?;
    let store = RegistryStore::open(&config).await?;
    match store.revoke(&a.name).await? {
        (RevokeOutcome::AlreadyRevoked, _) => Ok(format!("Client '{}' was already revoked.\n", a.name)),
        (RevokeOutcome::Revoked, ip) => Ok(format!(
            "Client '{}' revoked; its address {ip} stays reserved for it (add-client re-enables it).\n",
            a.name
        )),
    }
}

/// `gateway list`, outside a runtime. Returns the table to print.
pub fn list(dir: &Path) -> Result<String, GatewayError> {
    block_on(list_in(dir))
}

/// `gateway list`. Returns the table to print.
pub async fn list_in(dir: &Path) -> Result<String, GatewayError> {
    let config = GatewayConfig::load_dir(dir)?;
    let store = RegistryStore::open(&config).await?;
    let snapshot = store.snapshot(&config.endpoint.to_string()).await?;
    let mut clients: Vec<_> = snapshot.clients.iter().collect();
    clients.sort_by_key(|c| c.ip);
    let mut out = format!(
        "{:<24} {:<15} {:<24} {:<8} {:<16} CREATED\n",
        "NAME", "ADDRESS", "ADDRESS6", "STATE", "CERT (SHA-256)"
    );
    for c in &clients {
        let state = match c.state {
            ClientState::Active => "active",
            ClientState::Revoked => "revoked",
        };
        out.push_str(&format!(
            "{:<24} {:<15} {:<24} {:<8} {:<16} {}\n",
            c.name,
            c.ip.to_string(),
            c.ip6.map_or_else(|| "-".to_string(), |ip| ip.to_string()),
            state,
            c.cert_sha256.short().to_string(),
            c.created
        ));
    }
    let active = clients.iter().filter(|c| c.state == ClientState::Active).count();
    out.push_str(&format!(
        "{} client(s), {active} active; subnet {} (gateway {}); subnet6 {}\n",
        clients.len(),
        config.subnet,
        config.gateway_ip,
        v6_text(&config)
    ));
    if config.database.is_some() {
        out.push_str(&format!(
            "shared registry version {}; gateways: {}\n",
            snapshot.version,
            snapshot.endpoints.join(", ")
        ));
    }
    Ok(out)
}

/// `gateway run`: serves until SIGINT or SIGTERM.
async fn run(dir: &Path) -> Result<(), GatewayError> {
    let (config, upgraded) = load_upgraded(dir)?;
    let early = super::ops::Early::now(&config);
    for change in &upgraded {
        tracing::info!("upgraded {change}");
    }
    if config.v6.is_some() && super::dataplane::served_v6(&config).is_none() {
        tracing::warn!(
            "IPv6 is disabled on this host (net.ipv6.conf.*.disable_ipv6 = 1): serving IPv4 only; `subnet6` is kept for when it is enabled"
        );
    }
    // The resolver (issue 11): decided first, because clients are told about it when they
    // authenticate; started once the TUN device (its address) exists.
    let dns_plan = super::dns::ResolverPlan::for_gateway(&config);
    let push = dns_plan.as_ref().map(super::dns::ResolverPlan::push).unwrap_or_default();
    let serving = super::follow::serve(&config).await?;
    let plane = ControlPlane::bind_with(&config, serving.live.clone(), push)?;
    serving.follow(plane.sessions(), plane.clock());
    tracing::info!(gateway = %config.name, endpoint = %config.endpoint, subnet = %config.subnet, subnet6 = %v6_text(&config), "gateway starting");
    // Data plane (issue 3): TUN, UDP loops and NAT beside the control plane, on its sessions.
    let sessions = std::sync::Arc::new(super::dataplane::ControlSessions::of(&plane));
    let data = super::dataplane::start_for(&config, sessions.clone()).await?;
    let resolver = match dns_plan {
        Some(plan) => {
            let live = std::sync::Arc::new(super::dns::LiveSessions { table: plane.sessions(), clock: plane.clock() });
            match super::dns::GatewayResolver::start(plan, &data.tun_name, live, plane.dns_counters()) {
                Ok(r) => Some(r),
                Err(e) => {
                    data.stop().await;
                    return Err(e.into());
                }
            }
        }
        None => None,
    };
    if let Some(r) = &resolver {
        tokio::spawn(super::dns::log_stats_on_sigusr1(r.counters()));
    }
    // Operations (issue 15): the status socket, metrics, SIGHUP.
    let _ops = super::ops::start(early, &config, &plane, sessions, &data).await?;
    tokio::spawn(end_sessions_on_sigusr2(plane.sessions()));
    let result = plane.serve(stop_signal()).await;
    if let Some(r) = resolver {
        r.stop().await;
    }
    data.stop().await;
    result
}

/// On SIGUSR2, ends every session at once (an operator's way to make every client
/// re-authenticate, e.g. after rotating the authority; the demo's "expire session" key). Clients
/// learn it at their next health check or data packet and re-authenticate by themselves.
/// The handler is registered at the call, before the gateway serves: a SIGUSR2 sent as soon as
/// it answers must not meet the default action (which ends the process).
fn end_sessions_on_sigusr2(
    sessions: std::sync::Arc<super::SessionTable>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let usr2 = tokio::signal::unix::SignalKind::user_defined2();
    crate::logging::on_signal(usr2, "sessions cannot be ended on demand", move || {
        let ended = sessions.retain(|_| false);
        tracing::info!(sessions = ended.len(), "SIGUSR2: ended every session; clients will re-authenticate");
    })
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stop requested");
}
