//! The `gateway` commands on real directories: files written, their modes, refusals, and the exit
//! code of every kind of failure.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use holdfast::config::client::ClientFile;
use holdfast::config::exit;
use holdfast::config::gateway::GatewayConfig;
use holdfast::gateway::cli::{self, AddClientArgs, GatewayCommand, InitArgs, RevokeArgs};
use holdfast::gateway::registry::{ClientState, Registry};
use holdfast::gateway::{ControlPlane, GatewayError};
use holdfast::pki;

/// Stand-in for the binary's `holdfast gateway` level.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: GatewayCommand,
}

fn init_args(dir: &Path) -> InitArgs {
    InitArgs {
        dir: dir.to_owned(),
        endpoint: "192.0.2.10:4433".parse().unwrap(),
        subnet: "10.77.0.0/24".parse().unwrap(),
        subnet6: None,
        name: "gw".into(),
        server_name: "vpn.example.net".into(),
    }
}

fn add(dir: &Path, name: &str, ip: Option<&str>) -> Result<String, GatewayError> {
    cli::add_client(&AddClientArgs {
        dir: dir.to_owned(),
        name: name.into(),
        ip: ip.map(|s| s.parse().unwrap()),
        out: None,
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn registry(dir: &Path) -> Registry {
    let c = GatewayConfig::load_dir(dir).unwrap();
    Registry::load(&c.registry, c.subnet, c.gateway_ip, c.v6).unwrap()
}

#[test]
fn clap_definition_is_consistent_and_parses() {
    Cli::command().debug_assert();
    let cli =
        Cli::try_parse_from("gateway init --dir /tmp/x --endpoint 198.51.100.1:51820".split_whitespace()).unwrap();
    match cli.cmd {
        GatewayCommand::Init(a) => {
            assert_eq!(a.subnet.to_string(), "100.64.0.0/24");
            assert_eq!(a.server_name, "holdfast-gateway");
            assert_eq!(a.name, "holdfast");
        }
        other => panic!("parsed as {other:?}"),
    }
    let parse = |line: &str| Cli::try_parse_from(line.split_whitespace());
    let cli = parse("gateway add-client --dir d alice --ip 100.64.0.9").unwrap();
    assert!(matches!(cli.cmd, GatewayCommand::AddClient(a) if a.name == "alice" && a.ip.is_some()));
    assert!(parse("gateway add-client --dir d alice --ip nope").is_err());
    assert!(parse("gateway revoke --dir d").is_err(), "NAME is required");
}

#[test]
fn init_writes_the_identity_with_private_keys_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    let report = cli::init(&init_args(&dir)).unwrap();
    assert!(report.contains("Initialised gateway 'gw'"), "{report}");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("server.key")), 0o600);
    let config = GatewayConfig::load_dir(&dir).unwrap();
    assert_eq!(config.gateway_ip.to_string(), "10.77.0.1");
    assert_eq!(config.listen.to_string(), "[::]:4433");
    // A random RFC 4193 ULA /64 (fd00::/8 + 40 random bits), the gateway on its first host.
    let v6 = config.v6.expect("init gives every gateway an IPv6 subnet");
    assert_eq!((v6.subnet.prefix_len(), v6.subnet.network().octets()[0]), (64, 0xfd));
    assert_eq!(u128::from(v6.gateway_ip), u128::from(v6.subnet.network()) + 1);
    assert_eq!(config.server_name, "vpn.example.net");
    pki::check_pair(&std::fs::read_to_string(&config.cert).unwrap(), &std::fs::read_to_string(&config.key).unwrap())
        .unwrap();
    assert!(registry(&dir).clients().is_empty());

    let key_before = std::fs::read(dir.join("ca.key")).unwrap();
    let err = cli::init(&init_args(&dir)).unwrap_err();
    assert!(matches!(err, GatewayError::AlreadyInitialised { .. }), "{err}");
    assert_eq!(err.exit_code(), exit::FAILURE);
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), key_before, "identity untouched");

    // Any one leftover identity file is enough to refuse.
    let dir2 = tmp.path().join("gw2");
    std::fs::create_dir(&dir2).unwrap();
    std::fs::write(dir2.join("server.key"), "x").unwrap();
    let err = cli::init(&init_args(&dir2)).unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    assert!(!dir2.join("gateway.toml").exists());
}

#[test]
fn init_picks_a_fresh_ula_each_time_or_takes_subnet6() {
    let tmp = tempfile::tempdir().unwrap();
    let subnet6 = |dir: &Path| GatewayConfig::load_dir(dir).unwrap().v6.unwrap().subnet;
    cli::init(&init_args(&tmp.path().join("a"))).unwrap();
    cli::init(&init_args(&tmp.path().join("b"))).unwrap();
    assert_ne!(subnet6(&tmp.path().join("a")), subnet6(&tmp.path().join("b")), "40 random bits");
    let c = tmp.path().join("c");
    let report = cli::init(&InitArgs { subnet6: Some("fd00:77::/64".parse().unwrap()), ..init_args(&c) }).unwrap();
    assert!(report.contains("fd00:77::/64 (gateway fd00:77::1)"), "{report}");
    let err =
        cli::init(&InitArgs { subnet6: Some("fd00:77::/32".parse().unwrap()), ..init_args(&tmp.path().join("d")) })
            .unwrap_err();
    assert!(err.to_string().contains("--subnet6"), "{err}");
}

#[test]
fn a_gateway_dir_from_before_ipv6_upgrades_in_place_keeping_every_ipv4_address() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    cli::init(&init_args(&dir)).unwrap();
    add(&dir, "alice", None).unwrap();
    add(&dir, "bob", Some("10.77.0.9")).unwrap();
    add(&dir, "carol", None).unwrap();
    cli::revoke(&RevokeArgs { dir: dir.clone(), name: "carol".into() }).unwrap();
    // Make it what an older release wrote: no subnet6/gateway_ip6, no ip6 in the registry.
    let strip = |path: PathBuf, keys: &[&str]| {
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().filter(|l| !keys.iter().any(|k| l.starts_with(k))).collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
    };
    strip(dir.join("gateway.toml"), &["subnet6", "gateway_ip6"]);
    strip(dir.join("clients.toml"), &["ip6"]);
    let old = GatewayConfig::load_dir(&dir).unwrap();
    assert_eq!(old.v6, None);
    let before: Vec<_> = registry(&dir).clients().iter().map(|c| (c.name.clone(), c.ip, c.ip6)).collect();
    assert!(before.iter().all(|(_, _, ip6)| ip6.is_none()));

    let report = add(&dir, "dave", None).unwrap();
    assert!(report.contains("Upgraded") && report.contains("subnet6"), "{report}");
    let new = GatewayConfig::load_dir(&dir).unwrap();
    let v6 = new.v6.expect("upgraded");
    assert_eq!(v6.subnet.network().octets()[0], 0xfd);
    assert_eq!((new.subnet, new.gateway_ip), (old.subnet, old.gateway_ip));
    let after = registry(&dir);
    for (name, ip, _) in &before {
        let e = after.get(name).unwrap();
        assert_eq!(e.ip, *ip, "{name}'s IPv4 address must not change");
        assert!(e.ip6.is_some_and(|ip6| v6.subnet.contains(&ip6)), "{name}: {:?}", e.ip6);
    }
    let dave = after.get("dave").unwrap();
    assert!(dave.ip6.is_some());
    let all: HashSet<_> = after.clients().iter().filter_map(|c| c.ip6).collect();
    assert_eq!(all.len(), 4, "every IPv6 address distinct");
    // A second run has nothing left to do, and keeps the addresses.
    let (_, changes) = cli::load_upgraded(&dir).unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(registry(&dir).get("alice").unwrap().ip6, after.get("alice").unwrap().ip6);

    // `subnet6` lost while the registry holds IPv6 addresses: refused, nothing rewritten.
    strip(dir.join("gateway.toml"), &["subnet6", "gateway_ip6"]);
    let text = std::fs::read_to_string(dir.join("gateway.toml")).unwrap();
    let err = cli::load_upgraded(&dir).unwrap_err();
    assert!(err.to_string().contains("no `subnet6`"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("gateway.toml")).unwrap(), text);
}

#[test]
fn init_rejects_bad_arguments_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    type Spoil = fn(&mut InitArgs);
    let cases: [(Spoil, &str); 4] = [
        (|a| a.subnet = "10.0.0.0/31".parse().unwrap(), "--subnet"),
        (|a| a.endpoint = "0.0.0.0:4433".parse().unwrap(), "--endpoint"),
        (|a| a.name = "../x".into(), "--name"),
        (|a| a.server_name = "not a name".into(), "--server-name"),
    ];
    for (spoil, flag) in cases {
        let mut a = init_args(&dir);
        spoil(&mut a);
        let err = cli::init(&a).unwrap_err();
        assert!(err.to_string().contains(flag), "{err}");
        assert!(!dir.exists(), "nothing written for a bad {flag}");
    }
}

#[test]
fn add_client_writes_one_private_self_contained_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    cli::init(&init_args(&dir)).unwrap();
    let report = add(&dir, "alice", None).unwrap();
    assert!(report.contains("tunnel address 10.77.0.2"), "{report}");
    let path = dir.join("clients/alice.toml");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.join("clients")), 0o700);

    let file = ClientFile::load(&path).unwrap();
    assert_eq!(file.name, "alice");
    assert_eq!(file.endpoint.to_string(), "192.0.2.10:4433");
    assert_eq!(file.server_name, "vpn.example.net");
    assert_eq!(file.tunnel_ip.to_string(), "10.77.0.2");
    let creds = file.credentials(&path).unwrap();
    pki::check_pair(&creds.certificate_pem, &creds.key_pem).unwrap();
    assert_eq!(creds.gateway_ca_pem, std::fs::read_to_string(dir.join("ca.pem")).unwrap());
    // The registry pins exactly this certificate, under the name it carries.
    let der = pki::certificates_from_pem(&creds.certificate_pem).unwrap().remove(0);
    let (cn, fp) = pki::leaf_identity(&der).unwrap();
    assert_eq!(cn, "alice");
    let reg = registry(&dir);
    let entry = reg.get("alice").unwrap();
    assert_eq!(entry.cert_sha256, fp);
    assert_eq!(entry.state, ClientState::Active);

    // --out and --ip.
    let out = tmp.path().join("elsewhere/bob.toml");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    cli::add_client(&AddClientArgs {
        dir: dir.clone(),
        name: "bob".into(),
        ip: Some("10.77.0.50".parse().unwrap()),
        out: Some(out.clone()),
    })
    .unwrap();
    assert_eq!(mode(&out), 0o600);
    assert_eq!(ClientFile::load(&out).unwrap().tunnel_ip.to_string(), "10.77.0.50");
    assert!(!dir.join("clients/bob.toml").exists());
}

#[test]
fn add_revoke_list_and_their_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    cli::init(&init_args(&dir)).unwrap();
    add(&dir, "alice", None).unwrap();
    add(&dir, "bob", None).unwrap();

    let err = add(&dir, "alice", None).unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    let err = add(&dir, "carol", Some("10.77.0.3")).unwrap_err();
    assert!(err.to_string().contains("taken by 'bob'"), "{err}");
    let err = add(&dir, "carol", Some("10.77.0.1")).unwrap_err();
    assert!(err.to_string().contains("gateway's own address"), "{err}");
    let err = add(&dir, "bad/name", None).unwrap_err();
    assert!(err.to_string().contains("invalid NAME"), "{err}");
    assert_eq!(err.exit_code(), exit::FAILURE);

    let report = cli::revoke(&RevokeArgs { dir: dir.clone(), name: "alice".into() }).unwrap();
    assert!(report.contains("10.77.0.2 stays reserved"), "{report}");
    let err = cli::revoke(&RevokeArgs { dir: dir.clone(), name: "zed".into() }).unwrap_err();
    assert!(err.to_string().contains("'zed' is not registered"), "{err}");

    let table = cli::list(&dir).unwrap();
    let alice = table.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(alice.contains("10.77.0.2") && alice.contains("revoked"), "{table}");
    let bob = table.lines().find(|l| l.starts_with("bob")).unwrap();
    assert!(bob.contains("10.77.0.3") && bob.contains("active"), "{table}");
    assert!(table.contains("2 client(s), 1 active"), "{table}");

    // Re-adding alice: same address, new certificate.
    let old_fp = registry(&dir).get("alice").unwrap().cert_sha256;
    let report = add(&dir, "alice", None).unwrap();
    assert!(report.contains("re-enabled") && report.contains("10.77.0.2"), "{report}");
    let entry = registry(&dir).get("alice").unwrap().clone();
    assert_eq!(entry.state, ClientState::Active);
    assert_ne!(entry.cert_sha256, old_fp);
}

#[test]
fn concurrent_add_clients_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw");
    cli::init(&init_args(&dir)).unwrap();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let dir = dir.clone();
            std::thread::spawn(move || add(&dir, &format!("c{i}"), None).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let reg = registry(&dir);
    assert_eq!(reg.clients().len(), 6);
    let ips: HashSet<_> = reg.clients().iter().map(|c| c.ip).collect();
    assert_eq!(ips.len(), 6, "every client got its own address");
}

#[tokio::test]
async fn every_failure_kind_has_its_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let missing: PathBuf = tmp.path().join("nothing-here");
    let err = cli::list(&missing).unwrap_err();
    assert_eq!(err.exit_code(), exit::CONFIG_MISSING, "{err}");
    assert!(err.to_string().contains("gateway.toml"), "{err}");

    let dir = tmp.path().join("gw");
    cli::init(&init_args(&dir)).unwrap();

    let config_path = dir.join("gateway.toml");
    let good_config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, good_config.replace("reauth_grace = \"10s\"", "reauth_grace = \"soon\"")).unwrap();
    let err = add(&dir, "alice", None).unwrap_err();
    assert_eq!(err.exit_code(), exit::CONFIG_INVALID, "{err}");
    assert!(err.to_string().contains("reauth_grace"), "{err}");
    std::fs::write(&config_path, &good_config).unwrap();

    let registry_path = dir.join("clients.toml");
    std::fs::write(&registry_path, "[[client]]\nname = 1\n").unwrap();
    let err = cli::list(&dir).unwrap_err();
    assert_eq!(err.exit_code(), exit::CONFIG_INVALID, "{err}");
    std::fs::remove_file(&registry_path).unwrap();

    let ca_key = dir.join("ca.key");
    let key = std::fs::read(&ca_key).unwrap();
    std::fs::write(&ca_key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let err = add(&dir, "alice", None).unwrap_err();
    assert_eq!(err.exit_code(), exit::BAD_KEYS, "{err}");
    assert!(err.to_string().contains("ca.key"), "{err}");
    std::fs::write(&ca_key, &key).unwrap();

    let mut config = GatewayConfig::load_dir(&dir).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server_key = dir.join("server.key");
    let key = std::fs::read(&server_key).unwrap();
    std::fs::remove_file(&server_key).unwrap();
    let err = ControlPlane::bind(&config).unwrap_err();
    assert_eq!(err.exit_code(), exit::BAD_KEYS, "{err}");
    assert!(err.to_string().contains("server.key"), "{err}");
    // A key of another identity: refused as not matching the certificate.
    std::fs::write(&server_key, std::fs::read(&ca_key).unwrap()).unwrap();
    let err = ControlPlane::bind(&config).unwrap_err();
    assert_eq!(err.exit_code(), exit::BAD_KEYS, "{err}");
    std::fs::write(&server_key, &key).unwrap();
    ControlPlane::bind(&config).expect("intact identity binds");

    // The port is taken.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.listen = holder.local_addr().unwrap();
    let err = ControlPlane::bind(&config).unwrap_err();
    assert!(matches!(err, GatewayError::Bind { .. }), "{err}");
    assert_eq!(err.exit_code(), exit::FAILURE);
}
