//! The fuzz harnesses on stable, without libFuzzer: every checked-in corpus file is replayed
//! through the same entry points the fuzz targets call (`fuzz/src/lib.rs`, included below), and
//! every crash the fuzzers found is pinned here as its own test.
//!
//! Regenerate the seed corpus (after a format change) with
//! `HOLDFAST_WRITE_SEEDS=1 cargo test --test fuzz_regressions -- --ignored write_seed_corpus`.

// The fuzz crate's library, compiled into this test (it needs nothing the main crate lacks).
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
fn checked_in_corpus_replays_clean() {
    for (name, target) in harness::TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for {name}");
        for f in files {
            let bytes = std::fs::read(&f).expect("corpus file");
            // A failing oracle panics; name the file so the failure can be replayed with
            // `cargo +nightly fuzz run <target> <file>`.
            let r = std::panic::catch_unwind(|| target(&bytes));
            assert!(r.is_ok(), "{name}: {} fails", f.display());
        }
    }
}

#[test]
fn every_seed_is_checked_in() {
    // Config seeds hold freshly generated keys, so only their presence is checked; the others
    // are deterministic, and a difference means the harness's input format changed.
    for s in harness::seeds::all() {
        let path = corpus_dir(s.target).join(s.name);
        let on_disk =
            std::fs::read(&path).unwrap_or_else(|e| panic!("seed {}: {e}; run write_seed_corpus", path.display()));
        if !s.target.starts_with("config_") {
            assert!(on_disk == s.bytes, "seed {} is stale: run write_seed_corpus", path.display());
        }
    }
}

#[test]
#[ignore = "writes fuzz/corpus/: run by hand to regenerate the seeds"]
fn write_seed_corpus() {
    // Also gated on a variable, so `--include-ignored` does not churn the config seeds (their
    // keys are new on every generation).
    if std::env::var_os("HOLDFAST_WRITE_SEEDS").is_none() {
        eprintln!("set HOLDFAST_WRITE_SEEDS=1 to write fuzz/corpus/");
        return;
    }
    for s in harness::seeds::all() {
        let dir = corpus_dir(s.target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(s.name), &s.bytes).expect("seed file");
    }
}

// --- Findings -----------------------------------------------------------------------------------
//
// Each finding's input is under fuzz/regressions/<target>/ (not in the corpus, which must replay
// clean), replayable with `cargo +nightly fuzz run -a -s none <target> <file>`. Tests of open bugs
// are ignored with the reason; un-ignore them with the fix.

/// Runs `target` on a regression input and reports its panic message, if any.
fn replay(target: fn(&[u8]), input: &[u8]) -> Result<(), String> {
    std::panic::catch_unwind(|| target(input)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// `[timing]` durations are unbounded: a client file with `health_min = health_max =
/// "300000000000y"` (or the same for `backoff_initial`/`backoff_max`) parses and validates, then
/// the supervisor driver's `epoch + at` (src/client/driver.rs:127, `Effect::ArmTimer`) overflows
/// `tokio::time::Instant` and panics: the supervisor task dies after the first Authenticate (or,
/// for the backoff, after the first failed one), and the process keeps running with no
/// supervisor. Reproduced end to end with `holdfast client run`. Fixed: `ClientFile::validate`
/// bounds every `[timing]` value and the driver saturates deadlines.
#[test]
fn timing_durations_beyond_the_clock_range_are_refused_or_survived() {
    for input in [
        &include_bytes!("../fuzz/regressions/config_client/health-interval-overflows-instant")[..],
        &include_bytes!("../fuzz/regressions/config_client/backoff-overflows-instant")[..],
    ] {
        assert_eq!(replay(harness::config_client, input), Ok(()));
    }
}

/// `rpc_deadline = "20000y"` parses and validates, then `Request::set_timeout` (src/client/
/// control.rs:83) panics inside tonic ("duration is unrealistically large": gRPC timeouts have at
/// most 8 digits, so anything over 99,999,999 hours). The panic kills the spawned RPC task, whose
/// result the supervisor waits for forever: the client stays in Authing and never retries.
/// Reproduced end to end with `holdfast client run`. Fixed: `ClientFile::validate` bounds every
/// `[timing]` value (24 h).
#[test]
fn rpc_deadline_beyond_the_grpc_timeout_range_is_refused_or_survived() {
    for input in [
        &include_bytes!("../fuzz/regressions/config_client/rpc-deadline-overflows-grpc-timeout")[..],
        // What libFuzzer found (config dictionary, value profile): `rpc_deadline = "300000000000y5w"`.
        &include_bytes!("../fuzz/regressions/config_client/crash-2d8423030313b3641c37083f4a89f68c2a982d23")[..],
    ] {
        assert_eq!(replay(harness::config_client, input), Ok(()));
    }
}
