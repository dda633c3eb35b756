//! The seed corpus: small, meaningful inputs for every target, written to `fuzz/corpus/<target>/`
//! by `HOLDFAST_WRITE_SEEDS=1 cargo test --test fuzz_regressions -- --ignored write_seed_corpus`.
//!
//! Configuration seeds are real files: a gateway made by `gateway init`, clients by
//! `gateway add-client` (their keys are throwaway, made for this corpus and used nowhere else).
//! Datagram seeds are sealed under the fixed `datagram::FUZZ_KEY`, so they open.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use holdfast::config::client::ClientFile;
use holdfast::config::gateway::DEFAULT_SUBNET;
use holdfast::control::pb::{AuthenticateRequest, AuthenticateResponse, PingSessionRequest};
use holdfast::gateway::cli::{self, AddClientArgs, InitArgs, RevokeArgs};
use holdfast::sansio::replay::WINDOW;
use holdfast::sansio::seal::{Direction, SealedKind};
use holdfast::sansio::wire;
use prost::Message;

use super::control::op as cop;
use super::datagram::{FUZZ_SESSION, op as dop, seal};
use super::input::Writer;

/// One seed file.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: &'static str, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed { target, name, bytes: bytes.into() }
}

/// An IPv4 ICMP echo request from the client's tunnel address to the gateway's: what a Data
/// datagram usually carries. (Checksums are not computed: nothing on the receive path reads them.)
fn icmp_echo() -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 100, 64, 0, 2, 100, 64, 0, 1, // IPv4
        8, 0, 0, 0, 0, 1, 0, 1, // ICMP echo request, id 1, seq 1
    ];
    p.resize(84, 0xab);
    p
}

fn sealed(dir: Direction, kind: SealedKind, counter: u64, payload: &[u8]) -> Vec<u8> {
    seal(dir, kind, FUZZ_SESSION, counter, payload).expect("seed counters are sealable")
}

fn datagram_seeds() -> Vec<Seed> {
    let c2g = Direction::ClientToGateway;
    let g2c = Direction::GatewayToClient;
    let ping = icmp_echo();
    let data = sealed(c2g, SealedKind::Data, 5, &ping);
    let empty = sealed(c2g, SealedKind::Data, 0, &[]);
    let back = sealed(g2c, SealedKind::Data, 9, &ping);
    let keepalive = sealed(c2g, SealedKind::Keepalive, 7, &[]);
    let notice = wire::unknown_session_notice(FUZZ_SESSION, 5).to_vec();
    let mut bad_reserved = data.clone();
    bad_reserved[2] = 1;
    let mut bad_version = keepalive.clone();
    bad_version[0] = 0x22;

    // datagram_open: flags (bit 0 g->c, bit 1 window pre-accepts the u64 that follows).
    let open = |flags: u8, accepted: Option<u64>, d: &[u8]| {
        let w = Writer::new().u8(flags);
        match accepted {
            Some(c) => w.u64(c),
            None => w,
        }
        .raw(d)
        .finish()
    };

    // datagram_sequence ops.
    let seal_op = |w: Writer, flags: u8, counter: u64, payload: &[u8], tamper: Option<(u16, u8)>| {
        let (pos, mask) = tamper.unwrap_or((0, 0));
        w.u8(dop::SEAL).u8(flags).u8(0).u64(counter).bytes(payload).u16(pos).u8(mask)
    };
    let in_order_then_replay = {
        let mut w = Writer::new();
        for c in 0..3 {
            w = seal_op(w, 0, c, &ping, None);
        }
        w.u8(dop::REPLAY).u8(1).finish()
    };
    let reordered = Writer::new()
        .u8(dop::BURST)
        .u8(0)
        .u8(0)
        .u64(100)
        .u8(63) // counters 100..=163, newest first
        .u8(dop::BURST)
        .u8(0)
        .u8(2)
        .u16(10)
        .u8(3) // 153..=156 again: replays
        .finish();
    let window_edge = {
        // Far ahead, then around `top - WINDOW`: the oldest counters still remembered and the
        // first ones forgotten.
        let w = seal_op(Writer::new(), 0, 10, &[], None);
        let w = seal_op(w, 0, 10 + WINDOW + 5, &ping, None);
        w.u8(dop::BURST).u8(0).u8(3).u16(0x8000 - 2).u8(7).finish()
    };
    let forgeries = {
        let w = seal_op(Writer::new(), 0, 1, &ping, Some((30, 0x01))); // flipped ciphertext bit
        let w = seal_op(w, 0, 2, &ping, Some((14, 0x80))); // changed counter
        let w = seal_op(w, 8, 3, &ping, None); // another key
        let w = seal_op(w, 4, 4, &ping, None); // delivered to the other direction
        let w = seal_op(w, 2, 5, &[], Some((0, 0x01))); // keepalive turned into a (too long) notice
        w.u8(dop::RAW).u8(0).bytes(&notice).u8(dop::RAW).u8(1).bytes(&back).finish()
    };
    let both_directions = {
        let w = seal_op(Writer::new(), 0, 7, &ping, None);
        let w = seal_op(w, 1, 7, &ping, None); // same counter, other direction: both fine
        let w = seal_op(w, 3, 8, &[], None); // g->c keepalive
        w.u8(dop::REPLAY).u8(0).u8(dop::REPLAY).u8(1).finish()
    };

    vec![
        seed("datagram_parse", "data-icmp-echo", data.clone()),
        seed("datagram_parse", "data-empty", empty.clone()),
        seed("datagram_parse", "keepalive", keepalive.clone()),
        seed("datagram_parse", "unknown-session-notice", notice.clone()),
        seed("datagram_parse", "bad-reserved", bad_reserved),
        seed("datagram_parse", "bad-version", bad_version),
        seed("datagram_open", "c2g-data", open(0, None, &data)),
        seed("datagram_open", "c2g-data-empty", open(0, None, &empty)),
        seed("datagram_open", "g2c-data", open(1, None, &back)),
        seed("datagram_open", "c2g-keepalive", open(0, None, &keepalive)),
        seed("datagram_open", "older-inside-window", open(2, Some(50), &data)),
        seed("datagram_open", "replay", open(2, Some(5), &data)),
        seed("datagram_open", "too-old", open(2, Some(5 + WINDOW), &data)),
        seed("datagram_open", "wrong-direction", open(1, None, &data)),
        seed("datagram_open", "notice", open(0, None, &notice)),
        seed("datagram_sequence", "in-order-then-replay", in_order_then_replay),
        seed("datagram_sequence", "reordered-burst", reordered),
        seed("datagram_sequence", "window-edge", window_edge),
        seed("datagram_sequence", "forgeries", forgeries),
        seed("datagram_sequence", "both-directions", both_directions),
    ]
}

/// `control_handlers` callers (see `control::peer`).
const NO_PEER: u8 = 0;
const ALICE: u8 = 1;
const BOB_REVOKED: u8 = 2;
const CAROL: u8 = 3;
const KNOWN_NAME_OTHER_CERT: u8 = 4;
const ANY_NAME: u8 = 5;

fn control_seeds() -> Vec<Seed> {
    let auth = |w: Writer, who: u8, version: &str| w.u8(cop::AUTHENTICATE).u8(who).bytes(version.as_bytes());
    // Ping as `who` naming itself, for the `idx`-th session id handed out in this run.
    let ping_issued = |w: Writer, who: u8, idx: u8| w.u8(cop::PING).u8(who).u8(0).u8(1).u8(idx);
    let v = "holdfast/0.1.0";

    let happy = ping_issued(auth(Writer::new(), ALICE, v), ALICE, 0).finish();
    let reauth_grace = {
        let w = auth(auth(Writer::new(), ALICE, v), ALICE, v);
        let w = ping_issued(ping_issued(w, ALICE, 0), ALICE, 1); // previous and current: both OK
        let w = auth(w, ALICE, v);
        ping_issued(w, ALICE, 0).finish() // the one before the previous: expired
    };
    let refused = {
        let w = auth(Writer::new(), BOB_REVOKED, v);
        let w = auth(w, NO_PEER, v);
        let w = w.u8(cop::PING).u8(NO_PEER).u8(1).bytes(b"alice").u8(0).u64(1);
        let w = w.u8(cop::AUTHENTICATE).u8(KNOWN_NAME_OTHER_CERT).raw(&[9; 32]).u8(0).bytes(v.as_bytes());
        let w = w.u8(cop::AUTHENTICATE).u8(ANY_NAME).raw(&[1; 32]).bytes(b"mallory").bytes(v.as_bytes());
        auth(w, ALICE, &"x".repeat(65)).finish() // client_version too long
    };
    let cross_client = {
        let w = auth(auth(Writer::new(), ALICE, v), CAROL, v);
        let w = ping_issued(w, CAROL, 0); // carol names alice's session
        let w = w.u8(cop::PING).u8(ALICE).u8(1).bytes(b"carol").u8(1).u8(0); // alice claims to be carol
        ping_issued(w, CAROL, 1).finish()
    };

    let req = |which: u8, m: Vec<u8>| Writer::new().u8(which).raw(&m).finish();
    let auth_req = AuthenticateRequest { client_version: v.into(), accepts_partial_checksums: true }.encode_to_vec();
    let ping_req = PingSessionRequest { client_id: "alice".into(), session_id: 0x0123_4567_89ab_cdef }.encode_to_vec();
    let mut ping_unknown_field = ping_req.clone();
    ping_unknown_field.extend_from_slice(&[0x78, 0x2a]); // field 15, varint 42: skipped
    vec![
        seed("control_handlers", "authenticate-then-ping", happy),
        seed("control_handlers", "reauth-grace", reauth_grace),
        seed("control_handlers", "refused-callers", refused),
        seed("control_handlers", "cross-client", cross_client),
        seed("control_decode", "authenticate", req(0, auth_req)),
        seed("control_decode", "authenticate-empty", req(0, Vec::new())),
        seed("control_decode", "ping", req(1, ping_req)),
        seed("control_decode", "ping-unknown-field", req(1, ping_unknown_field)),
    ]
    .into_iter()
    .chain(gateway_answer_seeds())
    .collect()
}

/// A well-formed gateway answer, and the same answer with one field broken each.
fn gateway_answer_seeds() -> Vec<Seed> {
    let good = AuthenticateResponse {
        assigned_ip: vec![100, 64, 0, 2],
        gateway_ip: vec![100, 64, 0, 1],
        prefix_len: 24,
        session_id: 0x0123_4567_89ab_cdef,
        session_key: (0..32).collect(),
        data_port: 51820,
        session_idle_timeout_ms: 180_000,
        assigned_ip6: [0xfd, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2].to_vec(),
        gateway_ip6: [0xfd, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1].to_vec(),
        prefix_len6: 64,
        dns_servers: vec![vec![100, 64, 0, 1]],
        search_domains: vec!["corp.example".into()],
        ..Default::default()
    };
    type Break = fn(&mut AuthenticateResponse);
    let broken: [(&'static str, Break); 15] = [
        ("v6-short-ip", |a| a.assigned_ip6.truncate(15)),
        ("v6-half-config", |a| a.gateway_ip6.clear()),
        ("v6-prefix-129", |a| a.prefix_len6 = 129),
        ("v6-outside-subnet", |a| a.assigned_ip6[0] = 0xfc),
        ("v6-multicast", |a| a.assigned_ip6[0] = 0xff),
        ("dns-server-5-bytes", |a| a.dns_servers = vec![vec![100, 64, 0, 1, 0]]),
        ("dns-server-multicast", |a| a.dns_servers = vec![vec![224, 0, 0, 251]]),
        ("search-domain-newline", |a| a.search_domains = vec!["lan\nnameserver 198.18.9.9".into()]),
        ("search-domains-too-many", |a| a.search_domains = vec!["x".into(); 7]),
        ("ipv6-assigned-ip", |a| a.assigned_ip = vec![0xfd; 16]),
        ("prefix-0", |a| a.prefix_len = 0),
        ("session-0", |a| a.session_id = 0),
        ("short-key", |a| a.session_key.truncate(31)),
        ("port-70000", |a| a.data_port = 70_000),
        ("idle-max", |a| a.session_idle_timeout_ms = u64::MAX),
    ];
    let mut seeds = vec![seed("gateway_answer", "valid", good.encode_to_vec())];
    for (name, brk) in broken {
        let mut a = good.clone();
        brk(&mut a);
        seeds.push(seed("gateway_answer", name, a.encode_to_vec()));
    }
    seeds
}

/// A DNS query for `name` (dot-separated labels), type `qtype`, class IN, id `id`, with RD set.
/// Written out byte by byte on purpose: seeds must say exactly what the resolver receives,
/// including the malformed variants below.
fn dns_query_bytes(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// The upstream's answer to [`dns_query_bytes`] (re-id'd to `id`): one A record 198.18.7.7.
fn dns_answer_bytes(query: &[u8], id: u16) -> Vec<u8> {
    let mut a = query.to_vec();
    a[..2].copy_from_slice(&id.to_be_bytes());
    a[2] = 0x81;
    a[3] = 0x80;
    a[7] = 1; // one answer
    // Name: a pointer to the question's name at offset 12; A, IN, TTL 60, 4 bytes.
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 7, 7]);
    a
}

/// Resolver inputs: a good exchange, and the hostile shapes the issue names.
fn dns_seeds() -> Vec<Seed> {
    let up = 0x4242;
    let q = dns_query_bytes(0x1234, "www.example.test", 1);
    let good = Writer::new().u16(up).bytes(&q).bytes(&dns_answer_bytes(&q, up)).finish();
    let wrong_id = Writer::new().u16(up).bytes(&q).bytes(&dns_answer_bytes(&q, up ^ 1)).finish();
    let mut looped = q[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let mut answer_loop = dns_answer_bytes(&q, up);
    let n = answer_loop.len();
    // The answer's name pointer aimed at itself.
    answer_loop[n - 16] = 0xc0;
    answer_loop[n - 15] = u8::try_from(n - 16).unwrap_or(0);
    let truncated = q[..q.len() - 3].to_vec();
    let mut response = q.clone();
    response[2] |= 0x80;
    let axfr = dns_query_bytes(7, "example.test", 252);
    let oversized = dns_query_bytes(8, &["a"; 2100].join("."), 1);
    // One client flooding (byte 0: client 0, no time passing), then others, then answers.
    let flood = Writer::new().u16(up).bytes(&q).bytes(&[]).raw(&[0u8; 40]).raw(&[1, 2, 3, 0x80, 0x80, 8, 16]).finish();
    vec![
        seed("dns_query", "good-exchange", good),
        seed("dns_query", "reply-wrong-id", wrong_id),
        seed("dns_query", "compression-loop", Writer::new().u16(up).bytes(&looped).finish()),
        seed("dns_query", "answer-compression-loop", Writer::new().u16(up).bytes(&q).bytes(&answer_loop).finish()),
        seed("dns_query", "truncated", Writer::new().u16(up).bytes(&truncated).finish()),
        seed("dns_query", "response-as-query", Writer::new().u16(up).bytes(&response).finish()),
        seed("dns_query", "axfr", Writer::new().u16(up).bytes(&axfr).finish()),
        seed("dns_query", "oversized", Writer::new().u16(up).bytes(&oversized).finish()),
        seed("dns_query", "flood-one-client", flood),
    ]
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Real files: `gateway init`, three `add-client`s (one with `--ip`), one `revoke`.
fn config_seeds() -> Vec<Seed> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("gw");
    cli::init(&InitArgs {
        dir: dir.clone(),
        endpoint: "198.18.0.1:51820".parse().expect("literal"),
        subnet: DEFAULT_SUBNET,
        subnet6: Some("fd00:64::/64".parse().expect("literal")),
        name: "holdfast".into(),
        server_name: "holdfast-gateway".into(),
    })
    .expect("gateway init");
    let empty_registry = read(&dir.join("clients.toml"));
    for (name, ip) in [("alice", None), ("bob", None), ("carol", Some(Ipv4Addr::new(100, 64, 0, 200)))] {
        cli::add_client(&AddClientArgs { dir: dir.clone(), name: name.into(), ip, out: None }).expect("add-client");
    }
    cli::revoke(&RevokeArgs { dir: dir.clone(), name: "bob".into() }).expect("revoke");

    let alice_path = dir.join("clients/alice.toml");
    let alice = read(&alice_path);
    // Every optional key set, as the client file's module doc lists them.
    let mut tuned = ClientFile::load(&alice_path).expect("add-client's file loads");
    let secs = |s| Some(Duration::from_secs(s));
    tuned.timing.health_min = secs(15);
    tuned.timing.health_max = secs(30);
    tuned.timing.rpc_deadline = secs(5);
    tuned.timing.backoff_initial = secs(1);
    tuned.timing.backoff_max = secs(300);
    tuned.timing.repeat_log_every = secs(600);
    tuned.timing.nudge_min_interval = secs(1);
    tuned.log.dir = Some("/var/log/holdfast".into());
    tuned.log.level = Some("info,holdfast=debug".into());
    tuned.log.keep_files = Some(7);
    tuned.network.tun_name = Some("holdfast0".into());
    tuned.network.underlay_mtu = Some(1500);
    tuned.network.keepalive = secs(15);
    tuned.network.routes = Some(vec!["0.0.0.0/1".parse().expect("cidr"), "128.0.0.0/1".parse().expect("cidr")]);
    tuned.network.dns = holdfast::config::client::DnsChoice::Servers(vec!["100.64.0.1".parse().expect("ip")]);
    tuned.network.allow_lan = Some(false);
    tuned.network.killswitch = Some(true);
    tuned.status.socket = Some("/run/holdfast/client.sock".into());
    let tuned = toml::to_string(&tuned).expect("serialise");
    // Credentials as files instead of inline.
    let mut files = ClientFile::load(&alice_path).expect("loads");
    files.tls = Default::default();
    files.tls.gateway_ca_file = Some("ca.pem".into());
    files.tls.certificate_file = Some("alice.pem".into());
    files.tls.key_file = Some("/etc/holdfast/alice.key".into());
    let files = toml::to_string(&files).expect("serialise");

    let gateway = read(&dir.join("gateway.toml"));
    let gateway_full = "name = \"gw-1\"\nendpoint = \"203.0.113.7:4433\"\nlisten = \"[::]:4433\"\n\
        subnet = \"10.9.0.0/16\"\ngateway_ip = \"10.9.255.254\"\nserver_name = \"vpn.example.org\"\n\
        ca_cert = \"/etc/holdfast/ca.pem\"\nca_key = \"ca.key\"\ncert = \"server.pem\"\n\
        key = \"server.key\"\nregistry = \"clients.toml\"\nclients_dir = \"clients\"\n\
        session_idle_timeout = \"90s\"\nsession_max_lifetime = \"1h 30m\"\nreauth_grace = \"0s\"\n\
        handshake_timeout = \"100ms\"\n\n[nat]\nenabled = true\nuplink = \"eth0\"\n";
    vec![
        seed("config_client", "alice-add-client", alice),
        seed("config_client", "carol-add-client", read(&dir.join("clients/carol.toml"))),
        seed("config_client", "alice-every-key", tuned),
        seed("config_client", "alice-credential-files", files),
        seed("config_gateway", "gateway-init", gateway),
        seed("config_gateway", "gateway-every-key", gateway_full),
        seed("config_gateway", "gateway-minimal", "endpoint = \"198.18.0.1:51820\"\n"),
        seed("config_registry", "registry-three-clients", read(&dir.join("clients.toml"))),
        seed("config_registry", "registry-empty", empty_registry),
    ]
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut s = datagram_seeds();
    s.extend(control_seeds());
    s.extend(dns_seeds());
    s.extend(config_seeds());
    s
}
