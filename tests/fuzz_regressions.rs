//! The fuzz harnesses on stable, without libFuzzer: every checked-in corpus file is replayed
//! through the same entry points the fuzz targets call (`fuzz/src/lib.rs`, included below), and
//! every crash the fuzzers found is pinned here as its own test.
//!
//! Regenerate the seed corpus (after a format change) with
//! `cargo test --test fuzz_regressions -- --ignored write_seed_corpus`.

// The harness is a library of the fuzz crate; this test uses all of its targets but not every
// helper it exports.
#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
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
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("seed {}: {e}; run write_seed_corpus", path.display()));
        if !s.target.starts_with("config_") {
            assert!(
                on_disk == s.bytes,
                "seed {} is stale: run write_seed_corpus",
                path.display()
            );
        }
    }
}

#[test]
#[ignore = "writes fuzz/corpus/: run by hand to regenerate the seeds"]
fn write_seed_corpus() {
    for s in harness::seeds::all() {
        let dir = corpus_dir(s.target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(s.name), &s.bytes).expect("seed file");
    }
}
