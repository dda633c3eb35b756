//! The status socket: `serve` on a temporary path fed by a watch channel, `query` it the way
//! `holdfast status` does, and check what comes back (fields, no key), the permissions, the
//! clear error when no client runs, and the handling of a socket left by a killed client.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use holdfast::client::status::{ClientStatus, SnapshotView, TransitionRecord};
use holdfast::client::status_socket::{
    self, DataPlaneSample, DropCount, PathMtuInfo, Sampler, StatusQueryError, StatusReport, TunInfo,
};
use holdfast::sansio::supervisor::{StateName, Timer};
use holdfast::snapshot::{SessionKey, VpnAuthResponse};
use tokio::sync::watch;

const S: Duration = Duration::from_secs(1);

/// Bytes 0x5A, 0x5B, ...: a key whose hex ("5a5b5c...") is easy to search for.
fn key_bytes() -> [u8; 32] {
    std::array::from_fn(|i| 0x5Au8.wrapping_add(i as u8))
}

fn key_hex() -> String {
    key_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn auth() -> VpnAuthResponse {
    VpnAuthResponse {
        assigned_ip: Ipv4Addr::new(100, 64, 0, 9),
        received_at: SystemTime::now() - 30 * S,
        ..VpnAuthResponse::fixture(0xfeed_beef_0000_0042, key_bytes())
    }
}

fn healthy() -> ClientStatus {
    let mut st = ClientStatus::initial(std::time::Instant::now());
    st.supervisor.state = StateName::Healthy;
    st.supervisor.superstate = StateName::Healthy.superstate();
    st.supervisor.last_cause = "AuthSucceeded".into();
    st.supervisor.next_timer = Some((Timer::Health, 3600 * S));
    st.supervisor.last_rtt = Some(Duration::from_micros(2_500));
    st.snapshot = Some(SnapshotView::of(&auth()));
    st.recent = vec![
        TransitionRecord {
            at: Duration::ZERO,
            from: StateName::Unauthed,
            to: StateName::Authing,
            cause: "Started".into(),
        },
        TransitionRecord {
            at: Duration::ZERO,
            from: StateName::Authing,
            to: StateName::Healthy,
            cause: "AuthSucceeded".into(),
        },
    ];
    st
}

fn sampler() -> Sampler {
    Arc::new(|| {
        Some(DataPlaneSample {
            tun: Some(TunInfo { name: "holdfast0".into(), ifindex: 12 }),
            loop_starts: 1,
            rx_packets: 10,
            rx_bytes: 12_345,
            tx_packets: 20,
            tx_bytes: 2_345,
            drops: vec![DropCount::new("no session", 0), DropCount::new("replay", 4)],
            path_mtu: Some(PathMtuInfo { outer: 1280, tun_mtu: 1280, bound: "link".into() }),
            aead: "aws-lc-rs".into(),
        })
    })
}

/// `query` blocks; run it off the runtime's threads so the server can answer.
async fn ask(path: &Path) -> Result<StatusReport, StatusQueryError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || status_socket::query(&path)).await.expect("query task")
}

async fn ask_raw(path: &Path) -> Result<String, StatusQueryError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || status_socket::query_raw(&path)).await.expect("query task")
}

fn sock_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("run").join("holdfast").join("client.sock")
}

#[tokio::test]
async fn a_query_gets_the_status_without_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = sock_in(&dir);
    let (tx, rx) = watch::channel(healthy());
    let guard = status_socket::serve(&path, rx, Some(sampler()), "on (test)".into()).expect("serve");
    assert_eq!(guard.path(), path);

    let r = ask(&path).await.expect("a report");
    assert_eq!(r.version, status_socket::REPORT_VERSION);
    assert_eq!(r.pid, std::process::id());
    assert_eq!(r.state, "Healthy");
    assert_eq!(r.superstates, vec!["Running", "Connected"]);
    assert_eq!(r.last_cause, "AuthSucceeded");
    let timer = r.next_timer.as_ref().expect("armed timer");
    assert_eq!(timer.purpose, "health check");
    assert!(timer.in_ms > 3_000_000, "the timer is an hour out: {timer:?}");
    assert_eq!(r.last_rtt_us, Some(2_500));
    assert_eq!(r.killswitch, "on (test)");
    let snap = r.snapshot.as_ref().expect("snapshot");
    assert_eq!(snap.assigned_ip, "100.64.0.9");
    // Both tunnel addresses are shown.
    assert_eq!(snap.assigned_ip6.as_deref(), Some("fd00:64::2"));
    assert_eq!((snap.prefix_len6, snap.gateway_ip6.as_deref()), (64, Some("fd00:64::1")));
    assert_eq!(snap.session_id, "feedbeef00000042");
    assert_eq!(snap.key_fingerprint, SessionKey::new(key_bytes()).fingerprint().to_string());
    assert!((29_000..120_000).contains(&snap.age_ms), "age {}", snap.age_ms);
    let dp = r.data_plane.as_ref().expect("counters");
    assert_eq!((dp.rx_bytes, dp.tx_packets, dp.loop_starts), (12_345, 20, 1));
    assert_eq!(dp.drops[1], DropCount::new("replay", 4));
    assert_eq!(r.recent[0].to, "Healthy", "newest first");
    assert_eq!(r.recent[1].from, "Unauthed");

    // The key is in neither the JSON nor the human form.
    let raw = ask_raw(&path).await.expect("raw");
    assert!(!raw.contains(&key_hex()), "{raw}");
    assert!(!raw.contains(&key_hex()[..16]), "{raw}");
    let human = status_socket::format_human(&r);
    assert!(!human.contains(&key_hex()[..16]), "{human}");
    assert!(human.contains("holdfast client: Healthy (Running > Connected)"), "{human}");
    assert!(human.contains("address:      100.64.0.9/24"), "{human}");
    assert!(human.contains("address6:     fd00:64::2/64"), "{human}");
    assert!(human.contains("gateway6:     fd00:64::1"), "{human}");
    assert!(human.contains("tunnel holdfast0 (ifindex 12)"), "{human}");
    assert!(human.contains("replay 4"), "{human}");
    // The path's size, what bounds it, and the TUN's (kept at IPv6's 1280 under a 1280 path).
    assert!(human.contains("path MTU:     1280 (link), TUN MTU 1280"), "{human}");
    let p = r.data_plane.as_ref().and_then(|d| d.path_mtu.as_ref()).expect("path MTU in the report");
    assert_eq!((p.outer, p.tun_mtu, p.bound.as_str()), (1280, 1280, "link"));
    // Which library runs the cipher (the key's fingerprint is shown, never the key).
    assert!(human.contains("cipher:       AES-256-GCM (aws-lc-rs)"), "{human}");

    // A later status is what the next query sees.
    let mut next = healthy();
    next.supervisor.state = StateName::Degraded;
    next.supervisor.failures = 2;
    next.supervisor.backoff = 2 * S;
    tx.send_replace(next);
    let r = ask(&path).await.expect("a report");
    assert_eq!((r.state.as_str(), r.failures, r.backoff_ms), ("Degraded", 2, 2000));
    assert_eq!(r.next_timer.map(|t| t.purpose).as_deref(), Some("ping retry"));
}

#[tokio::test]
async fn the_socket_is_0600_in_a_0700_folder_and_goes_away_on_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = sock_in(&dir);
    let (_tx, rx) = watch::channel(ClientStatus::initial(std::time::Instant::now()));
    let guard = status_socket::serve(&path, rx, None, "off".into()).expect("serve");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    let parent = path.parent().expect("parent");
    assert_eq!(mode(parent) & 0o077, 0, "no access for group/others: {:o}", mode(parent));
    // Nothing but the socket is left in the folder (the temporary bind name was renamed).
    let names: Vec<_> = std::fs::read_dir(parent).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("client.sock")]);

    // Before the data plane is up, the report says so.
    let r = ask(&path).await.expect("report");
    assert_eq!(r.state, "Unauthed");
    assert!(r.data_plane.is_none() && r.snapshot.is_none());
    assert!(status_socket::format_human(&r).contains("data plane: not up"));

    drop(guard);
    assert!(!path.exists(), "removed on drop");
    let err = ask(&path).await.expect_err("nobody serves");
    assert!(matches!(err, StatusQueryError::NotRunning { .. }), "{err:?}");
}

#[tokio::test]
async fn no_client_running_is_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("client.sock");
    let err = ask(&path).await.expect_err("no socket");
    assert_eq!(err.to_string(), format!("no holdfast client is running (no socket at {})", path.display()));
    assert_eq!(err.exit_code(), 3);
}

#[tokio::test]
async fn a_stale_socket_from_a_killed_client_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("client.sock");
    // A killed client leaves its socket file behind with nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let err = ask(&path).await.expect_err("stale");
    assert!(matches!(err, StatusQueryError::Stale { .. }), "{err:?}");
    assert!(err.to_string().starts_with("no holdfast client is running"), "{err}");

    let (_tx, rx) = watch::channel(healthy());
    let _guard = status_socket::serve(&path, rx, None, "off".into()).expect("serve over a stale socket");
    assert_eq!(ask(&path).await.expect("report").state, "Healthy");
}

#[tokio::test]
async fn a_live_socket_or_a_plain_file_is_not_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("client.sock");
    let (_tx, rx) = watch::channel(healthy());
    let _first = status_socket::serve(&path, rx.clone(), None, "off".into()).expect("serve");
    let err = status_socket::serve(&path, rx.clone(), None, "off".into()).expect_err("second server");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert_eq!(ask(&path).await.expect("first still answers").state, "Healthy");

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").expect("write");
    let err = status_socket::serve(&file, rx, None, "off".into()).expect_err("not a socket");
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
}

#[tokio::test]
async fn a_peer_that_is_not_a_holdfast_client_is_reported_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let err = ask(&path).await.expect_err("not a report");
    assert!(matches!(err, StatusQueryError::Malformed { .. }), "{err:?}");
}

#[tokio::test]
async fn the_status_command_prints_text_or_json_and_exits_3_without_a_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("client.sock");
    let run = |json: bool| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || status_socket::status_text(json, Some(path), None))
    };
    let err = run(false).await.expect("task").expect_err("no client");
    assert_eq!(err.exit_code(), 3);
    let missing = path.clone();
    let code = tokio::task::spawn_blocking(move || status_socket::status_command(false, Some(missing), None));
    assert_eq!(code.await.expect("task"), 3);

    let (_tx, rx) = watch::channel(healthy());
    let _guard = status_socket::serve(&path, rx, None, "off".into()).expect("serve");
    let text = run(false).await.expect("task").expect("text");
    assert!(text.starts_with("holdfast client: Healthy"), "{text}");
    let json = run(true).await.expect("task").expect("json");
    let back: StatusReport = serde_json::from_str(&json).expect("the JSON is a report");
    assert_eq!(back.state, "Healthy");
    assert!(json.contains("\n  \"state\": \"Healthy\""), "pretty-printed: {json}");
    assert!(!json.contains(&key_hex()[..16]));
}

#[test]
fn the_default_socket_path_fits_the_user() {
    let p = status_socket::default_socket_path();
    assert!(p.ends_with("client.sock"), "{}", p.display());
    if holdfast::config::running_as_root() {
        assert_eq!(p, Path::new("/run/holdfast/client.sock"));
    } else {
        assert!(p.parent().is_some_and(|d| d.ends_with("holdfast") || d.starts_with("/tmp")), "{}", p.display());
    }
    // An explicit path wins; a config that cannot be read falls back to the default.
    let explicit = PathBuf::from("/x/y.sock");
    assert_eq!(status_socket::resolve_socket_path(Some(explicit.clone()), None), explicit);
    assert_eq!(status_socket::resolve_socket_path(None, Some(Path::new("/nonexistent/client.toml"))), p);
}
