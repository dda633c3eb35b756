//! Bad input gives a clear error and crashes nothing: malformed or missing config, missing or
//! invalid keys (critical start-up failures, each with its own exit code and a message naming the
//! file), a client file of another gateway and garbage on the control port (survived).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use holdfast::config::exit;
use support::*;

const T: Duration = Duration::from_secs(20);

/// Runs `holdfast client run` on `file`, expecting a start-up failure; returns (exit code,
/// stderr). `holdfast-client run` must fail the same way, with the same exit code and a message
/// that differs only in how the binary names itself.
fn client_fails(file: &std::path::Path) -> (i32, String) {
    let out = holdfast(&["client", "run", "--config", s(file)]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().expect("exited, not signalled");
    assert_ne!(code, 0, "must fail: {err}");
    let alone = holdfast_client(&["run", "--config", s(file)]);
    let alone_err = String::from_utf8_lossy(&alone.stderr).into_owned();
    assert_eq!(alone.status.code(), Some(code), "holdfast-client run: {alone_err}");
    assert_eq!(alone_err.replacen("holdfast-client:", "holdfast client:", 1), err, "holdfast-client run says the same");
    (code, err)
}

#[test]
fn missing_config_file_is_named_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let (code, err) = client_fails(&path);
    assert_eq!(code, exit::CONFIG_MISSING, "{err}");
    assert!(err.contains(s(&path)), "the message names the file: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn malformed_config_is_named_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("syntax.toml", "name = \n"),
        (
            "unknown-key.toml",
            "name = \"a\"\nendpoint = \"127.0.0.1:1\"\nserver_name = \"g\"\ntunnel_ip = \"100.64.0.2\"\ncolour = 1\n[tls]\n",
        ),
        (
            "bad-endpoint.toml",
            "name = \"a\"\nendpoint = \"nowhere\"\nserver_name = \"g\"\ntunnel_ip = \"100.64.0.2\"\n[tls]\n",
        ),
        ("binary.toml", "\u{0}\u{1}\u{2}"),
        // Found by fuzzing: durations beyond the clock's range used to kill the supervisor task.
        (
            "huge-keepalive.toml",
            "name = \"a\"\nendpoint = \"127.0.0.1:1\"\nserver_name = \"g\"\ntunnel_ip = \"100.64.0.2\"\n[tls]\n[network]\nkeepalive = \"300000000000y\"\n",
        ),
        (
            "huge-timing.toml",
            "name = \"a\"\nendpoint = \"127.0.0.1:1\"\nserver_name = \"g\"\ntunnel_ip = \"100.64.0.2\"\n[tls]\n[timing]\nhealth_min = \"300000000000y\"\nhealth_max = \"300000000000y\"\n",
        ),
    ];
    for (name, text) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (code, err) = client_fails(&path);
        assert_eq!(code, exit::CONFIG_INVALID, "{name}: {err}");
        assert!(err.contains(s(&path)), "{name}: names the file: {err}");
    }
}

#[test]
fn missing_or_invalid_keys_are_named_with_their_exit_code() {
    let gw = GatewayDir::init();
    let good = gw.add_client("keys", |_| {});
    let dir = tempfile::tempdir().unwrap();

    // The key moved out to a file that does not exist.
    let missing = dir.path().join("missing-key.toml");
    std::fs::copy(&good, &missing).unwrap();
    edit_client_file(&missing, |f| {
        f.tls.key = None;
        f.tls.key_file = Some("no-such-key.pem".into());
    });
    let (code, err) = client_fails(&missing);
    assert_eq!(code, exit::BAD_KEYS, "{err}");
    assert!(err.contains("no-such-key.pem"), "{err}");

    // A key that is not a key.
    let garbage = dir.path().join("garbage-key.toml");
    std::fs::copy(&good, &garbage).unwrap();
    edit_client_file(&garbage, |f| {
        f.tls.key = Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into())
    });
    let (code, err) = client_fails(&garbage);
    assert_eq!(code, exit::BAD_KEYS, "{err}");
    assert!(err.contains("key"), "{err}");

    // A certificate that is not a certificate.
    let badcert = dir.path().join("bad-cert.toml");
    std::fs::copy(&good, &badcert).unwrap();
    edit_client_file(&badcert, |f| f.tls.certificate = Some("hello".into()));
    let (code, err) = client_fails(&badcert);
    assert_eq!(code, exit::BAD_KEYS, "{err}");
    assert!(err.contains("certificate"), "{err}");

    // A valid key that belongs to another client's certificate.
    let other = gw.add_client("other", |_| {});
    let other_key = holdfast::config::client::ClientFile::load(&other).unwrap().tls.key;
    let swapped = dir.path().join("swapped-key.toml");
    std::fs::copy(&good, &swapped).unwrap();
    edit_client_file(&swapped, |f| f.tls.key = other_key);
    let (code, err) = client_fails(&swapped);
    assert_eq!(code, exit::BAD_KEYS, "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");

    // No key at all.
    let nokey = dir.path().join("no-key.toml");
    std::fs::copy(&good, &nokey).unwrap();
    edit_client_file(&nokey, |f| f.tls.key = None);
    let (code, err) = client_fails(&nokey);
    assert_eq!(code, exit::BAD_KEYS, "{err}");
}

#[test]
fn a_client_file_of_another_gateway_is_refused_clearly_and_the_client_keeps_running() {
    let ours = GatewayDir::init();
    let theirs = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    // Registered at *their* gateway, pointed at *ours*: neither side trusts the other's authority.
    let port = ours.port;
    let file = theirs.add_client("mallory", |f| {
        fast_timings(f, logs.path());
        f.endpoint = format!("127.0.0.1:{port}").parse().unwrap();
    });
    let mut gateway = ours.run("gateway");
    gateway.wait_for(&["listening"], T);
    let mut client = ours.run_client("client", &file);
    let refused = client.wait_for(&["-> Backoff", "CertificateRefused"], T);
    assert!(refused.to_lowercase().contains("certificate"), "says why: {refused}");
    client.wait_for(&["Backoff -> Authing"], T);
    assert!(client.is_alive() && gateway.is_alive());
    assert_eq!(client.terminate(T), Some(0));
}

#[test]
fn garbage_on_the_control_port_disturbs_nobody() {
    let gw = GatewayDir::init();
    let logs = tempfile::tempdir().unwrap();
    let file = gw.add_client("good", |f| fast_timings(f, logs.path()));
    let mut gateway = gw.run("gateway");
    gateway.wait_for(&["listening"], T);

    // A silent connection that never handshakes, and a few that send junk (from inside the
    // gateway's namespace, where it listens).
    let port = gw.port;
    let _silent = gw.inside(move || {
        let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff][..], &[0u8; 4096][..]] {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = c.write_all(junk);
        }
        silent
    });
    let mut client = gw.run_client("client", &file);
    client.wait_for(&["-> Healthy"], T);
    assert!(gateway.is_alive(), "garbage must not crash the gateway");
    assert_eq!(client.terminate(T), Some(0));
}

/// `holdfast-client` offers the client's commands and nothing else: its help names run, unblock
/// and status, and no gateway command; its status says no client is running (exit 3) as
/// `holdfast status` does.
#[test]
fn the_client_binary_offers_the_client_commands_alone() {
    let help = holdfast_client(&["--help"]);
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for cmd in ["run", "unblock", "status"] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(cmd)), "{cmd} in: {help}");
    }
    assert!(!help.contains("gateway "), "no gateway command: {help}");
    assert_eq!(holdfast_client(&["gateway", "run"]).status.code(), Some(2), "unknown command");

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("client.sock");
    for out in [holdfast(&["status", "--socket", s(&socket)]), holdfast_client(&["status", "--socket", s(&socket)])] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains("no holdfast client is running"), "{err}");
    }
}
