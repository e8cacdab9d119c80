//! Shared by the integration tests.
//!
//! Every integration test file is its own crate and uses only some of these helpers, so each
//! item allows dead code: without that, a file that uses `books` but not the real-model helper
//! (or the other way round) fails `clippy -D warnings`.

use std::io::Write;
use std::path::PathBuf;

/// Deterministic pseudo-random books of the given lengths over a vocabulary of `vocab` ids.
#[allow(dead_code)] // used by some test crates only (see the module comment)
pub fn books(lengths: &[usize], vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut seed = seed;
    lengths
        .iter()
        .map(|&n| {
            seed = seed.wrapping_add(1);
            streamppl::model::random::random_tokens(n, vocab, seed)
        })
        .collect()
}

/// Whether a missing model or corpus must fail the test instead of skipping it:
/// `STREAMPPL_REQUIRE_MODELS` set to anything but empty or `0` (CI sets it to 1).
#[allow(dead_code)] // used by some test crates only (see the module comment)
pub fn models_required() -> bool {
    std::env::var("STREAMPPL_REQUIRE_MODELS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A registered model's file (`models.toml`) and the default corpus, like
/// [`default_model_and_corpus`]: `None` after a loud SKIPPED line when either is missing, a
/// panic instead under `STREAMPPL_REQUIRE_MODELS=1`.
#[allow(dead_code)] // used by some test crates only (see the module comment)
pub fn registered_model_and_corpus(name: &str) -> Option<(PathBuf, PathBuf)> {
    let (_, corpus) = default_model_and_corpus()?;
    let entry = streamppl::registry::lookup(name).expect("a name in models.toml");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&entry.path);
    if model.is_file() {
        return Some((model, corpus));
    }
    let why = format!("missing {}; run {}", model.display(), entry.fetch);
    assert!(
        !models_required(),
        "STREAMPPL_REQUIRE_MODELS=1 (CI runs this test, never skips it): {why}"
    );
    let _ = writeln!(std::io::stderr(), "\n!!! SKIPPED: {why} !!!\n");
    None
}

/// The default model and corpus, which scripts/fetch-defaults.sh puts in place. When either is
/// missing: a loud SKIPPED line and `None`, or, under `STREAMPPL_REQUIRE_MODELS=1`, a panic
/// naming the missing file, so that CI can never pass by skipping.
#[allow(dead_code)] // used by some test crates only (see the module comment)
pub fn default_model_and_corpus() -> Option<(PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let corpus = root.join("datasets/gutenberg-mini/test.parquet");
    let missing: Vec<String> = [&model, &corpus]
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some((model, corpus));
    }
    let why = format!(
        "missing {}; run scripts/fetch-defaults.sh",
        missing.join(" and ")
    );
    assert!(
        !models_required(),
        "STREAMPPL_REQUIRE_MODELS=1 (CI runs this test, never skips it): {why}"
    );
    // Straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must show.
    let _ = writeln!(std::io::stderr(), "\n!!! SKIPPED: {why} !!!\n");
    None
}
