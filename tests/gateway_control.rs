//! The control plane end to end, in process, on loopback: a gateway created by `init` +
//! `add-client`, served by `ControlPlane`, and clients built exactly as the Holdfast client builds
//! them (tonic `ClientTlsConfig` with the client file's authority, identity and server name).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use holdfast::config::client::ClientFile;
use holdfast::config::gateway::GatewayConfig;
use holdfast::control::pb::control_client::ControlClient;
use holdfast::control::pb::{AuthenticateRequest, AuthenticateResponse, PingSessionRequest, PingStatus};
use holdfast::gateway::cli::{self, AddClientArgs, InitArgs, RevokeArgs};
use holdfast::gateway::{ControlPlane, SessionTable};
use holdfast::pki::{self, Authority};
use holdfast::snapshot::SessionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Generous bound on anything that should happen "at once", so a slow CI machine does not flake;
/// a test only ever waits this long when it is about to fail.
const PATIENCE: Duration = Duration::from_secs(10);

fn logs() {
    let _ =
        tracing_subscriber::fmt().with_test_writer().with_env_filter("holdfast=debug,gateway_control=debug").try_init();
}

/// A gateway directory: `init` then `add-client` for each name.
struct Gateway {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Gateway {
    fn new(clients: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("gw");
        cli::init(&InitArgs {
            dir: dir.clone(),
            endpoint: "127.0.0.1:51820".parse().unwrap(),
            subnet: "100.64.0.0/24".parse().unwrap(),
            subnet6: Some("fd00:64::/64".parse().unwrap()),
            name: "test-gw".into(),
            server_name: "holdfast-gateway".into(),
        })
        .unwrap();
        let gw = Self { _tmp: tmp, dir };
        for c in clients {
            gw.add(c);
        }
        gw
    }

    fn add(&self, name: &str) -> PathBuf {
        cli::add_client(&AddClientArgs { dir: self.dir.clone(), name: name.into(), ip: None, out: None }).unwrap();
        self.client_file(name)
    }

    fn revoke(&self, name: &str) {
        cli::revoke(&RevokeArgs { dir: self.dir.clone(), name: name.into() }).unwrap();
    }

    /// A connected client with `name`'s client file.
    async fn client(&self, server: &Running, name: &str) -> ControlClient<Channel> {
        connect(server.addr, &self.client_file(name)).await.unwrap()
    }

    fn client_file(&self, name: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{name}.toml"))
    }

    fn config(&self) -> GatewayConfig {
        let mut c = GatewayConfig::load_dir(&self.dir).unwrap();
        c.listen = "127.0.0.1:0".parse().unwrap();
        c
    }

    fn start(&self) -> Running {
        Running::start(&self.config())
    }
}

/// A control plane served on a background task.
struct Running {
    addr: SocketAddr,
    /// The session table, as the data plane sees it.
    sessions: Arc<SessionTable>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), holdfast::gateway::GatewayError>>,
}

impl Running {
    fn start(config: &GatewayConfig) -> Self {
        let plane = ControlPlane::bind(config).unwrap();
        let addr = plane.local_addr();
        let sessions = plane.sessions();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(plane.serve(async move {
            let _ = stopped.await;
        }));
        Self { addr, sessions, stop: Some(stop), task }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(PATIENCE, &mut self.task).await.expect("server stops").unwrap();
        result.unwrap();
    }
}

/// The client's way to the gateway: tonic with the client file's credentials.
async fn connect(addr: SocketAddr, client_file: &Path) -> Result<ControlClient<Channel>, tonic::transport::Error> {
    let file = ClientFile::load(client_file).unwrap();
    let creds = file.credentials(client_file).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.gateway_ca_pem))
        .identity(Identity::from_pem(&creds.certificate_pem, &creds.key_pem))
        .domain_name(file.server_name.clone());
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(PATIENCE)
        .timeout(PATIENCE)
        .connect()
        .await?;
    Ok(ControlClient::new(channel))
}

async fn auth(c: &mut ControlClient<Channel>) -> Result<AuthenticateResponse, tonic::Status> {
    auth_with(c, true).await
}

/// Authenticate, telling the gateway whether this client takes partial checksums.
async fn auth_with(c: &mut ControlClient<Channel>, partial: bool) -> Result<AuthenticateResponse, tonic::Status> {
    let req = AuthenticateRequest { client_version: "test/1".into(), accepts_partial_checksums: partial };
    c.authenticate(req).await.map(|r| r.into_inner())
}

async fn ping(c: &mut ControlClient<Channel>, client_id: &str, session_id: u64) -> PingStatus {
    let r = c
        .ping_session(PingSessionRequest { client_id: client_id.into(), session_id })
        .await
        .expect("ping answered")
        .into_inner();
    PingStatus::try_from(r.status).expect("known status")
}

fn ip(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_twice_gives_same_ip_and_fresh_sessions() {
    logs();
    let gw = Gateway::new(&["alice"]);
    let server = gw.start();
    let mut c = gw.client(&server, "alice").await;

    let a = auth(&mut c).await.unwrap();
    assert_eq!(ip(&a.assigned_ip), Ipv4Addr::new(100, 64, 0, 2));
    assert_eq!(ip(&a.gateway_ip), Ipv4Addr::new(100, 64, 0, 1));
    assert_eq!(a.prefix_len, 24);
    // Dual stack: the client's IPv6 address next to the IPv4 one, in the gateway's subnet6.
    assert_eq!(a.assigned_ip6, "fd00:64::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(a.gateway_ip6, "fd00:64::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    assert_eq!(a.prefix_len6, 64);
    assert_ne!(a.session_id, 0);
    assert_eq!(a.session_key.len(), 32);
    assert_eq!(a.data_port, 51820);
    assert_eq!(a.session_idle_timeout_ms, 180_000);

    // Offload is on by default: the gateway takes partial checksums, and keeps what each
    // session's client said of them, for its own sends.
    assert!(a.accepts_partial_checksums);
    assert!(server.sessions.get(SessionId(a.session_id)).expect("open").partial_checksums);

    let b = auth(&mut c).await.unwrap();
    assert_eq!(b.assigned_ip, a.assigned_ip, "the same client always gets the same address");
    assert_ne!(b.session_id, a.session_id);
    assert_ne!(b.session_key, a.session_key);

    assert_eq!(ping(&mut c, "alice", b.session_id).await, PingStatus::Ok);
    assert_eq!(ping(&mut c, "alice", a.session_id).await, PingStatus::Ok, "previous session is in its grace period");
    assert_eq!(ping(&mut c, "alice", 0x1234_5678).await, PingStatus::SessionExpired, "unknown id");
    assert_eq!(ping(&mut c, "bob", b.session_id).await, PingStatus::SessionExpired, "client_id is not the caller");
    let old = auth_with(&mut c, false).await.unwrap();
    assert!(!server.sessions.get(SessionId(old.session_id)).expect("open").partial_checksums, "a client from before");

    let long = "v".repeat(65);
    let err = c
        .authenticate(AuthenticateRequest { client_version: long, accepts_partial_checksums: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_another_client_is_expired() {
    logs();
    let gw = Gateway::new(&["alice", "bob"]);
    let server = gw.start();
    let mut alice = gw.client(&server, "alice").await;
    let mut bob = gw.client(&server, "bob").await;
    let a = auth(&mut alice).await.unwrap();
    let b = auth(&mut bob).await.unwrap();
    assert_eq!(ip(&b.assigned_ip), Ipv4Addr::new(100, 64, 0, 3));
    assert_eq!(ping(&mut bob, "bob", a.session_id).await, PingStatus::SessionExpired);
    // Claiming to be alice does not help: the identity is bob's certificate.
    assert_eq!(ping(&mut bob, "alice", a.session_id).await, PingStatus::SessionExpired);
    assert_eq!(ping(&mut alice, "alice", a.session_id).await, PingStatus::Ok);
    assert_eq!(ping(&mut bob, "bob", b.session_id).await, PingStatus::Ok);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_applies_without_restart_and_readd_replaces_the_certificate() {
    logs();
    let gw = Gateway::new(&["alice", "bob"]);
    let server = gw.start();
    let old_file = std::env::temp_dir().join(format!("holdfast-old-alice-{}.toml", std::process::id()));
    std::fs::copy(gw.client_file("alice"), &old_file).unwrap();
    let mut alice = gw.client(&server, "alice").await;
    let mut bob = gw.client(&server, "bob").await;
    let a = auth(&mut alice).await.unwrap();
    let b = auth(&mut bob).await.unwrap();

    gw.revoke("alice");
    assert_eq!(ping(&mut alice, "alice", a.session_id).await, PingStatus::SessionExpired, "revoked: sessions dropped");
    let err = auth(&mut alice).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("client 'alice' is revoked"), "{}", err.message());
    assert_eq!(ping(&mut bob, "bob", b.session_id).await, PingStatus::Ok, "others unaffected");

    // Re-adding re-enables alice with the same address and a new certificate ...
    gw.add("alice");
    let mut alice2 = gw.client(&server, "alice").await;
    let a2 = auth(&mut alice2).await.unwrap();
    assert_eq!(a2.assigned_ip, a.assigned_ip);
    // ... and the old client file (still signed by the authority) stops working.
    let mut stale = connect(server.addr, &old_file).await.unwrap();
    let err = auth(&mut stale).await.unwrap_err();
    std::fs::remove_file(&old_file).unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("was replaced; use the new client file"), "{}", err.message());

    // Without any RPC, the housekeeping task applies a revocation to the session table (what
    // the data plane reads): bob's session disappears by id and by address.
    assert!(server.sessions.get(SessionId(b.session_id)).is_some());
    gw.revoke("bob");
    let gone = tokio::time::timeout(PATIENCE, async {
        while server.sessions.get(SessionId(b.session_id)).is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "revoked client's session still in the table");
    assert!(server.sessions.get_by_ip(ip(&b.assigned_ip)).is_none());
    assert!(server.sessions.get(SessionId(a2.session_id)).is_some(), "alice unaffected");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_an_unregistered_name_is_refused() {
    logs();
    let gw = Gateway::new(&["alice"]);
    let config = gw.config();
    // Someone with the authority's key (but no registry entry) issues "mallory" a certificate.
    let authority = Authority::from_pem(
        &std::fs::read_to_string(&config.ca_cert).unwrap(),
        &std::fs::read_to_string(&config.ca_key).unwrap(),
    )
    .unwrap();
    let issued = authority.issue_client("mallory").unwrap();
    let mut file = ClientFile::load(&gw.client_file("alice")).unwrap();
    file.name = "mallory".into();
    file.tls.certificate = Some(issued.cert_pem);
    file.tls.key = Some(issued.key_pem);
    let path = gw.dir.join("mallory.toml");
    std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();

    let server = gw.start();
    let mut c = connect(server.addr, &path).await.unwrap();
    let err = auth(&mut c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("client 'mallory' is not registered"), "{}", err.message());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_file_of_another_gateway_fails_cleanly() {
    logs();
    let gw = Gateway::new(&["alice"]);
    let other = Gateway::new(&["alice"]);
    let server = gw.start();
    // Both directions are wrong: the other gateway's authority does not sign our server
    // certificate, and ours did not sign the other client certificate.
    let outcome = match connect(server.addr, &other.client_file("alice")).await {
        Err(e) => format!("connect: {e}"),
        Ok(mut c) => match auth(&mut c).await {
            Err(status) => format!("rpc: {status}"),
            Ok(_) => panic!("a foreign client file authenticated"),
        },
    };
    tracing::info!("foreign client file: {outcome}");
    // The gateway is unharmed.
    let mut good = gw.client(&server, "alice").await;
    auth(&mut good).await.unwrap();

    // Only the client certificate is foreign: our authority pinned, their client key and cert.
    let mut file = ClientFile::load(&other.client_file("alice")).unwrap();
    file.tls.gateway_ca = ClientFile::load(&gw.client_file("alice")).unwrap().tls.gateway_ca;
    let path = gw.dir.join("foreign-cert.toml");
    std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
    // Under TLS 1.3 the server's refusal arrives after the client finished its side of the
    // handshake: connect may succeed, the first RPC must fail.
    if let Ok(mut c) = connect(server.addr, &path).await {
        let status = auth(&mut c).await.expect_err("a foreign client certificate authenticated");
        tracing::info!("foreign client certificate: {status}");
    }
    auth(&mut good).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_connections_do_not_disturb_a_good_client() {
    logs();
    let gw = Gateway::new(&["alice"]);
    let mut config = gw.config();
    config.handshake_timeout = Duration::from_millis(500);
    let server = Running::start(&config);

    // A silent peer: connects and never speaks.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // A garbage peer: not TLS at all.
    let mut garbage = TcpStream::connect(server.addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x16\x03\x01garbage").await.unwrap();

    // While both are open, a good client authenticates and pings.
    let mut c = gw.client(&server, "alice").await;
    let a = auth(&mut c).await.unwrap();
    assert_eq!(ping(&mut c, "alice", a.session_id).await, PingStatus::Ok);

    // The garbage peer is answered with a TLS alert (or nothing) and closed.
    let mut buf = vec![0u8; 1024];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match garbage.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway closes a connection that sends garbage");
    // The silent peer is dropped once handshake_timeout passes.
    let dropped = tokio::time::timeout(PATIENCE, silent.read(&mut buf)).await;
    assert!(matches!(dropped, Ok(Ok(0)) | Ok(Err(_))), "silent connection closed: {dropped:?}");

    // And the gateway still serves.
    assert_eq!(ping(&mut c, "alice", a.session_id).await, PingStatus::Ok);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_addresses_and_expires_old_sessions() {
    logs();
    let gw = Gateway::new(&["alice"]);
    let server = gw.start();
    let mut c = gw.client(&server, "alice").await;
    let before = auth(&mut c).await.unwrap();
    server.shutdown().await;

    let server = gw.start();
    let mut c = gw.client(&server, "alice").await;
    assert_eq!(ping(&mut c, "alice", before.session_id).await, PingStatus::SessionExpired);
    let after = auth(&mut c).await.unwrap();
    assert_eq!(after.assigned_ip, before.assigned_ip);
    assert_eq!(after.assigned_ip6, before.assigned_ip6, "the IPv6 address survives a restart too");
    assert_eq!(after.assigned_ip6.len(), 16);
    assert_ne!(after.session_id, before.session_id);
    server.shutdown().await;
}

/// A raw rustls client with the client file's credentials and the given protocol versions.
fn raw_client(
    gw: &Gateway,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>) {
    let path = gw.client_file("alice");
    let file = ClientFile::load(&path).unwrap();
    let creds = file.credentials(&path).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::certificates_from_pem(&creds.gateway_ca_pem).unwrap() {
        roots.add(ca).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pki::certificates_from_pem(&creds.certificate_pem).unwrap(),
            pki::private_key_from_pem(&creds.key_pem).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(file.server_name).unwrap();
    (tokio_rustls::TlsConnector::from(Arc::new(config)), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls13_is_spoken() {
    logs();
    let gw = Gateway::new(&["alice"]);
    let server = gw.start();

    let (tls13, name) = raw_client(&gw, &[&rustls::version::TLS13, &rustls::version::TLS12]);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let conn = tls13.connect(name.clone(), tcp).await.unwrap();
    let (_, session) = conn.get_ref();
    assert_eq!(session.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));

    let (tls12, name) = raw_client(&gw, &[&rustls::version::TLS12]);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let err = tls12.connect(name, tcp).await.expect_err("a TLS 1.2-only client is refused");
    tracing::info!("TLS 1.2 client: {err}");
    server.shutdown().await;
}
