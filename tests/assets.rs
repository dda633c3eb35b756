//! The files in `assets/`: the sample configs parse (as shipped, and with every commented key
//! switched on), name every key the config modules document, and hold no key material; the
//! systemd units run the commands the README documents, restart always and keep the
//! capabilities the processes need.

use std::collections::BTreeSet;
use std::path::Path;

use holdfast::config::client::ClientFile;
use holdfast::config::gateway::GatewayConfig;

const CLIENT_SAMPLE: &str = include_str!("../assets/client.sample.toml");
const GATEWAY_SAMPLE: &str = include_str!("../assets/gateway.sample.toml");
const CLIENT_UNIT: &str = include_str!("../assets/holdfast-client.service");
const GATEWAY_UNIT: &str = include_str!("../assets/holdfast-gateway.service");
const CLIENT_DOC: &str = include_str!("../src/config/client.rs");
const GATEWAY_DOC: &str = include_str!("../src/config/gateway.rs");

/// `key` if `line` (after `prefix`, and an optional "# ") is `key = value`.
fn key_of<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(prefix)?.trim_start();
    let rest = rest.strip_prefix("# ").unwrap_or(rest);
    let (key, _) = rest.split_once(" = ")?;
    let key = key.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

/// The sample with every commented-out `# key = value` line switched on.
fn all_on(sample: &str) -> String {
    sample
        .lines()
        .map(|l| match key_of(l, "") {
            Some(_) => l.strip_prefix("# ").unwrap_or(l),
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keys a config module's doc comment (the `//!` TOML block) documents.
fn documented_keys(source: &str) -> BTreeSet<String> {
    source.lines().filter_map(|l| key_of(l, "//!")).map(String::from).collect()
}

/// The keys `source`'s doc comment documents that `sample` does not show (commented or not).
fn undocumented(source: &str, sample: &str, at_least: usize) -> Vec<String> {
    let documented = documented_keys(source);
    assert!(documented.len() >= at_least, "parsed the doc comment: {documented:?}");
    let shown: BTreeSet<String> = sample.lines().filter_map(|l| key_of(l, "")).map(String::from).collect();
    documented.difference(&shown).cloned().collect()
}

#[test]
fn the_client_sample_parses_and_documents_every_key() {
    let path = Path::new("/etc/holdfast/client.toml");
    let shipped = ClientFile::parse(CLIENT_SAMPLE, path).expect("sample as shipped");
    assert_eq!(shipped.tls.key_file.as_deref(), Some(Path::new("/etc/holdfast/alice.key")));
    let on = ClientFile::parse(&all_on(CLIENT_SAMPLE), path).expect("sample with every key on");
    // The commented values are the defaults, so switching them on changes no timing.
    assert_eq!(on.timings(), shipped.timings());
    assert_eq!(on.status.socket.as_deref(), Some(Path::new("/run/holdfast/client.sock")));

    let missing = undocumented(CLIENT_DOC, CLIENT_SAMPLE, 20);
    assert!(missing.is_empty(), "keys documented in src/config/client.rs but not in the sample: {missing:?}");
}

#[test]
fn the_client_sample_holds_no_key() {
    for marker in ["PRIVATE KEY-----\n", "-----END", "MII"] {
        let found = CLIENT_SAMPLE.lines().any(|l| !l.trim_start().starts_with("# ") && l.contains(marker))
            || CLIENT_SAMPLE.contains(&format!("{marker}M"));
        assert!(!found, "sample contains {marker:?}");
    }
    assert!(!CLIENT_SAMPLE.lines().any(|l| l.starts_with("key = ")), "the key is by file only");
}

#[test]
fn the_gateway_sample_parses_and_documents_every_key() {
    let path = Path::new("/etc/holdfast/gateway/gateway.toml");
    let shipped = GatewayConfig::parse(GATEWAY_SAMPLE, path).expect("sample as shipped");
    let mut on = GatewayConfig::parse(&all_on(GATEWAY_SAMPLE), path).expect("sample with every key on");
    // `[dns] upstreams` has no value that means its default (this host's resolv.conf): the
    // sample shows an example list, which must parse.
    assert_eq!(on.dns.upstreams.take().map(|u| u.len()), Some(2));
    assert_eq!(on, shipped, "the commented values are the defaults");
    assert_eq!(shipped.ca_key, Path::new("/etc/holdfast/gateway/ca.key"));

    let missing = undocumented(GATEWAY_DOC, GATEWAY_SAMPLE, 15);
    assert!(missing.is_empty(), "keys documented in src/config/gateway.rs but not in the sample: {missing:?}");
}

/// The value of `Key=` in a unit (the last one wins, as in systemd).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines().rev().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_units_run_the_documented_commands_and_restart_always() {
    assert_eq!(
        unit_value(CLIENT_UNIT, "ExecStart"),
        Some("/usr/local/bin/holdfast-client run --no-tui --config /etc/holdfast/client.toml")
    );
    assert_eq!(
        unit_value(GATEWAY_UNIT, "ExecStart"),
        Some("/usr/local/bin/holdfast gateway run --dir /etc/holdfast/gateway")
    );
    for (name, unit, caps) in [
        ("client", CLIENT_UNIT, &["CAP_NET_ADMIN"][..]),
        ("gateway", GATEWAY_UNIT, &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"][..]),
    ] {
        assert_eq!(unit_value(unit, "Restart"), Some("always"), "{name}");
        for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
            let set: BTreeSet<&str> = unit_value(unit, key).unwrap_or("").split_whitespace().collect();
            assert_eq!(set, caps.iter().copied().collect(), "{name} {key}");
        }
        assert_eq!(unit_value(unit, "DeviceAllow"), Some("/dev/net/tun rw"), "{name}: the TUN device");
        // A config error is not retried forever; 0 (explicit stop) and 77 are not in the list.
        let prevent: Vec<&str> =
            unit_value(unit, "RestartPreventExitStatus").unwrap_or("").split_whitespace().collect();
        assert_eq!(prevent, ["65", "66", "78"], "{name}");
    }
    // The status socket's folder: /run/holdfast, 0700.
    assert_eq!(unit_value(CLIENT_UNIT, "RuntimeDirectory"), Some("holdfast"));
    assert_eq!(unit_value(CLIENT_UNIT, "RuntimeDirectoryMode"), Some("0700"));
}
