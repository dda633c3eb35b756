//! The data-plane keys of the client file (`[network] offload`, `coalesce_writes`, `pmtu_raise`): defaults are
//! the fastest setting, each can be turned off, and a contradiction is refused with the key named.

use std::path::Path;

use holdfast::client::dataplane::ClientDataPlaneConfig;
use holdfast::config::ConfigError;
use holdfast::config::client::ClientFile;

const BASE: &str = "name = \"a\"\nendpoint = \"198.18.0.1:51820\"\nserver_name = \"g\"\n\
                    tunnel_ip = \"100.64.0.2\"\n[tls]\n[network]\n";

fn modes(network: &str) -> Result<(bool, bool), ConfigError> {
    let file = ClientFile::parse(&format!("{BASE}{network}"), Path::new("client.toml"))?;
    let cfg = ClientDataPlaneConfig::from_file(&file);
    Ok((cfg.offload, cfg.coalesce_writes))
}

#[test]
fn offload_and_coalescing_default_on_and_turn_off() {
    assert_eq!(modes("").expect("defaults"), (true, true));
    assert_eq!(modes("coalesce_writes = false").expect("parses"), (true, false));
    // Offload off takes merging with it (merged packets need the virtio-net header).
    assert_eq!(modes("offload = false").expect("parses"), (false, false));
    assert_eq!(modes("offload = true\ncoalesce_writes = true").expect("parses"), (true, true));
}

#[test]
fn coalescing_without_offload_is_refused_naming_the_key() {
    match modes("offload = false\ncoalesce_writes = true") {
        Err(ConfigError::Malformed { reason, .. }) => {
            assert!(reason.contains("coalesce_writes"), "{reason}")
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert!(matches!(modes("offload = \"yes\""), Err(ConfigError::Malformed { .. })));
}

#[test]
fn pmtu_raise_defaults_to_rfc_8899s_ten_minutes_and_nonsense_is_refused_naming_the_key() {
    let raise = |network: &str| {
        ClientFile::parse(&format!("{BASE}{network}"), Path::new("client.toml"))
            .map(|f| ClientDataPlaneConfig::from_file(&f).pmtu_raise)
    };
    assert_eq!(raise("").expect("default"), std::time::Duration::from_secs(600));
    assert_eq!(raise("pmtu_raise = \"30s\"").expect("parses"), std::time::Duration::from_secs(30));
    for bad in ["pmtu_raise = \"0s\"", "pmtu_raise = \"500ms\"", "pmtu_raise = \"2days\""] {
        match raise(bad) {
            Err(ConfigError::Malformed { reason, .. }) => assert!(reason.contains("pmtu_raise"), "{reason}"),
            other => panic!("{bad}: expected Malformed, got {other:?}"),
        }
    }
}
