//! Replays the fuzz targets' kept corpus (`tests/fuzz/corpus/<target>/`) and every input a
//! fuzzer found failing (`tests/fuzz/regressions/<target>/`, named after the failure) through
//! the same checks the fuzz targets run, so each finding stays fixed on stable Rust in CI.

use std::path::{Path, PathBuf};

use crate::fuzz_checks;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no corpus for fuzz target {target}: tests/fuzz/corpus/{target}/ must hold its seeds"
    );
    for path in files {
        let data = std::fs::read(&path).expect("read fuzz input");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "fuzz input {} fails its check",
            path.display()
        );
    }
}

#[test]
fn command_corpus_and_regressions_pass_the_fuzz_checks() {
    replay("command", fuzz_checks::command);
}

#[test]
fn product_page_corpus_and_regressions_pass_the_fuzz_checks() {
    replay("product_page", fuzz_checks::product_page);
}
