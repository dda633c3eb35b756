//! The client's promise, with real processes over mutual TLS on loopback: once started it never
//! dies, and it recovers by itself from gateway restarts, revocation, a hung gateway and expired
//! sessions. Every wait is on a log line (an event), bounded in time.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(20);

/// Parses "session <hex> ip <a.b.c.d>/<len>" out of a transition line.
fn session_of(line: &str) -> (String, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .unwrap_or_else(|| panic!("no `{key}` in {line}"))
            .to_string()
    };
    let ip = at("ip");
    (at("session"), ip.split('/').next().unwrap_or_default().to_owned())
}

#[test]
fn authenticates_and_pings_then_survives_a_gateway_restart() {
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("alice", |f| fast_timings(f, logs.path()));
    let mut gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);

    let first = client.wait_for(&["-> Healthy", "session"], T);
    let (sid1, ip1) = session_of(&first);
    // Health checks reach the gateway and are answered OK.
    gateway.wait_for(&["PingSession", &sid1, "ok"], T);

    gateway.kill();
    let mut gateway = gw.run("gateway-restarted");
    // The restarted gateway does not know the session: the client re-authenticates by itself.
    let second = client.wait_for(&["-> Healthy", "session"], T);
    let (sid2, ip2) = session_of(&second);
    assert_ne!(sid1, sid2, "a restart must give a new session");
    assert_eq!(ip1, ip2, "the assigned IP is stable across gateway restarts");
    assert!(client.is_alive(), "the client process never restarts");
    gateway.wait_for(&["PingSession", &sid2, "ok"], T);

    assert_eq!(client.terminate(T), Some(0), "explicit stop exits 0");
}

#[test]
fn a_revoked_client_keeps_retrying_and_recovers_when_re_added() {
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("bob", |f| fast_timings(f, logs.path()));
    let _gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);
    client.wait_for(&["-> Healthy"], T);

    holdfast_ok(&["gateway", "revoke", "--dir", s(gw.path()), "bob"]);
    // Its session is dropped, re-authentication is refused with a clear reason, and it backs off.
    // (The rejection says why.)
    client.wait_for(&["-> Backoff", "Rejected", "revoked"], T);
    // ... and keeps trying, at most Debug level after the first warning.
    client.wait_for(&["Backoff -> Authing"], T);
    client.wait_for(&["-> Backoff"], T);
    assert!(client.is_alive());

    // The operator re-adds it; the new credentials land in the same client file.
    holdfast_ok(&["gateway", "add-client", "--dir", s(gw.path()), "bob", "--out", s(&file)]);
    edit_client_file(&file, |f| fast_timings(f, logs.path()));
    client.wait_for(&["-> Healthy", "session"], T);
    let warns = client.all_lines().iter().filter(|l| l.contains("WARN")).count();
    assert!(warns <= 3, "repeated identical failures must not add warnings:\n{}", client.all_lines().join("\n"));
    assert_eq!(client.terminate(T), Some(0));
}

#[test]
fn a_gateway_that_accepts_tcp_but_never_answers_makes_the_client_degraded_not_dead() {
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("carol", |f| fast_timings(f, logs.path()));
    let gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);
    let first = client.wait_for(&["-> Healthy", "session"], T);
    let (sid1, _) = session_of(&first);

    // A stopped gateway's kernel still accepts TCP; nothing answers.
    gateway.signal("STOP");
    let degraded = client.wait_for(&["Healthy -> Degraded"], T);
    assert!(degraded.contains("TimedOut") || degraded.contains("Unreachable"), "{degraded}");
    assert!(client.is_alive());
    gateway.signal("CONT");
    // The session survived the pause: the client goes back to Healthy without re-authenticating.
    let back = client.wait_for(&["Degraded -> Healthy"], T);
    assert!(!back.contains("AuthSucceeded"), "{back}");
    assert!(
        !client.all_lines().iter().any(|l| l.contains("Healthy -> Authing") || l.contains("Degraded -> Authing")),
        "a transient failure must not cause a re-authentication (session {sid1})"
    );
    assert_eq!(client.terminate(T), Some(0));
}

#[test]
fn an_expired_session_makes_the_client_re_authenticate() {
    let gw = GatewayDir::init();
    gw.set("session_max_lifetime", "\"2s\"");
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("dave", |f| fast_timings(f, logs.path()));
    let _gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);
    let first = client.wait_for(&["-> Healthy", "session"], T);
    let (sid1, ip1) = session_of(&first);
    let expired = client.wait_for(&["-> Authing"], T);
    assert!(expired.contains("SessionExpired"), "{expired}");
    let second = client.wait_for(&["-> Healthy", "session"], T);
    let (sid2, ip2) = session_of(&second);
    assert_ne!(sid1, sid2);
    assert_eq!(ip1, ip2);
    assert_eq!(client.terminate(T), Some(0));
}

#[test]
fn a_client_started_while_the_gateway_is_down_connects_when_it_comes_up() {
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("erin", |f| fast_timings(f, logs.path()));
    let mut client = gw.run_client("client", &file);
    let down = client.wait_for(&["-> Backoff"], T);
    assert!(down.contains("Unreachable"), "{down}");
    let _gateway = gw.run("gateway");
    client.wait_for(&["-> Healthy", "session"], T);
    assert_eq!(client.terminate(T), Some(0));
}

#[test]
fn sighup_re_authenticates_without_restarting_the_client() {
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("carol", |f| fast_timings(f, logs.path()));
    let mut gateway = gw.run("gateway");
    let mut client = gw.run_client("client", &file);
    let (sid1, ip1) = session_of(&client.wait_for(&["-> Healthy", "session"], T));
    let pid = client.pid();

    client.signal("HUP");
    let line = client.wait_for(&["Healthy -> Authing", "ReauthRequested"], T);
    assert!(!line.contains("WARN"), "a requested re-auth is not a failure: {line}");
    let (sid2, ip2) = session_of(&client.wait_for(&["Authing -> Healthy", "session"], T));
    assert_ne!(sid1, sid2, "SIGHUP gives a new session");
    assert_eq!(ip1, ip2);
    // The gateway saw the hand-over: the new session replaced the old one, which keeps its grace.
    gateway.wait_for(&["PingSession", &sid2, "ok"], T);
    assert!(client.is_alive() && client.pid() == pid, "SIGHUP no longer ends the process");
    assert_eq!(client.terminate(T), Some(0));
}
