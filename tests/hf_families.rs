//! Every family against its reference implementation: tiny checkpoints with random weights,
//! written by Hugging Face `transformers` together with the per-token NLLs it computes
//! (`scripts/make_hf_fixtures.py`, versions in `tests/fixtures/hf/README.md`). streamppl's
//! dense NLLs must equal them; then, on the same checkpoints, every strategy's block engine
//! must equal the token-by-token reference engine in every position scheme.

use std::path::{Path, PathBuf};

use candle_core::Device;
use indicatif::ProgressBar;
use serde::Deserialize;
use streamppl::engine::{EngineKind, peak_cache_keys, run_strategy};
use streamppl::model::Model;
use streamppl::model::hf::load_hf;
use streamppl::nll_log::NllLog;
use streamppl::strategy::Strategy;
use streamppl::stream::TokenStream;

#[derive(Deserialize)]
struct Reference {
    model_type: String,
    tokens: Vec<u32>,
    nll: Vec<f32>,
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

/// Every fixture folder (one per checkpoint), sorted by name.
fn fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .expect("tests/fixtures/hf exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "expected the 8 fixtures, found {dirs:?}");
    dirs
}

/// The safetensors files of a checkpoint folder: the shards its index lists, or the one file.
fn weights(dir: &Path) -> Vec<PathBuf> {
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return vec![dir.join("model.safetensors")];
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
    let mut shards: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    shards.sort();
    shards.dedup();
    shards.into_iter().map(|s| dir.join(s)).collect()
}

fn load(dir: &Path) -> (Model, Reference) {
    let model = load_hf(
        &dir.join("config.json"),
        &weights(dir),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (model, reference)
}

fn run(
    model: &Model,
    strategy: &str,
    pos_shift: bool,
    engine: EngineKind,
    stream: &TokenStream,
) -> NllLog {
    let s: Strategy = strategy.parse().unwrap();
    run_strategy(
        model,
        s,
        pos_shift,
        engine,
        stream,
        &ProgressBar::hidden(),
        None,
    )
    .unwrap()
}

#[test]
fn dense_nlls_equal_transformers_for_every_family() {
    for dir in fixtures() {
        let (model, reference) = load(&dir);
        assert!(
            reference.tokens.len() >= 257,
            "{}: too short",
            dir.display()
        );
        let stream = TokenStream::new(std::slice::from_ref(&reference.tokens), &[], None);
        for engine in [EngineKind::Block(64), EngineKind::Token] {
            let log = run(&model, "dense", true, engine, &stream);
            assert_eq!(log.len(), reference.nll.len(), "{}", dir.display());
            let max = log
                .records
                .iter()
                .zip(&reference.nll)
                .map(|(r, &want)| (r.nll - want).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{} ({}, {engine:?}): max |dNLL| {max:.2e} over {} tokens",
                dir.file_name().unwrap().to_string_lossy(),
                reference.model_type,
                log.len()
            );
            assert!(max <= 1e-4, "{}: max |dNLL| {max}", dir.display());
        }
    }
}

#[test]
fn block_engine_equals_token_engine_for_every_family_and_strategy() {
    for dir in fixtures() {
        let (model, reference) = load(&dir);
        // Two books so the cache crosses a book boundary; the first 200 tokens keep it quick.
        let (a, b) = reference.tokens[..200].split_at(90);
        let books = [a.to_vec(), b.to_vec()];
        for (strategy, pos_shift, prefix) in [
            ("sink:4+60", true, vec![]),
            ("window:48", true, vec![]),
            ("sink:4+60", false, vec![]),
            ("sink:2+40", true, vec![reference.tokens[5]; 2]),
        ] {
            let stream = TokenStream::new(&books, &prefix, None);
            let token = run(&model, strategy, pos_shift, EngineKind::Token, &stream);
            // 64: blocks longer than the layer windows of the Mistral and Gemma fixtures (48).
            for b in [32, 64] {
                let block = run(&model, strategy, pos_shift, EngineKind::Block(b), &stream);
                assert_eq!(token.len(), block.len());
                let diffs: Vec<f32> = (token.records.iter().zip(&block.records))
                    .map(|(a, b)| (a.nll - b.nll).abs())
                    .collect();
                let max = diffs.iter().copied().fold(0f32, f32::max);
                let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
                // f32 rounding differs between one token and a block of queries: the mean is
                // float noise (about 1e-6), single tokens reach about 1e-5.
                assert!(
                    mean <= 1e-5 && max <= 5e-5,
                    "{} {strategy} pos_shift={pos_shift} B={b}: block vs token |dNLL| mean {mean}, max {max}",
                    dir.display()
                );
            }
        }
    }
}

/// `recompute:W` scores token t+1 from a fresh window of the W+1 fed tokens ending at t: the
/// same NLL as a dense run over just those tokens.
#[test]
fn recompute_equals_dense_over_each_window_for_every_family() {
    for dir in fixtures() {
        let (model, reference) = load(&dir);
        let tokens = &reference.tokens[..120];
        let window = 40;
        let stream = TokenStream::new(&[tokens.to_vec()], &[], None);
        let log = run(
            &model,
            &format!("recompute:{window}"),
            true,
            EngineKind::Token,
            &stream,
        );
        for t in [window + 1, 77, tokens.len() - 2] {
            let fresh = TokenStream::new(&[tokens[t - window..=t + 1].to_vec()], &[], None);
            let dense = run(&model, "dense", true, EngineKind::Token, &fresh);
            let (got, want) = (log.records[t].nll, dense.records[window].nll);
            assert!(
                (got - want).abs() <= 1e-5,
                "{} token {t}: recompute {got} vs dense window {want}",
                dir.display()
            );
        }
    }
}

/// What a user runs: `streamppl eval --model DIR --corpus corpus.txt --strategy dense` tokenizes
/// the text as transformers' tokenizer does (BOS included where the model adds it) and logs
/// transformers' NLLs token by token.
#[test]
fn the_cli_on_a_checkpoint_folder_logs_transformers_nlls() {
    let out = std::env::temp_dir().join(format!("streamppl-hf-cli-{}", std::process::id()));
    for dir in fixtures() {
        let reference = load(&dir).1;
        let run_dir = out.join(dir.file_name().unwrap());
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_streamppl"))
            .args(["eval", "--model"])
            .arg(&dir)
            .arg("--corpus")
            .arg(fixtures_root().join("corpus.txt"))
            .args(["--strategy", "dense", "--out"])
            .arg(&run_dir)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let log = NllLog::read_parquet(&run_dir.join("dense/nll.parquet")).unwrap();
        let ids: Vec<u32> = log.records.iter().map(|r| r.token_id).collect();
        assert_eq!(ids, reference.tokens[1..], "{}: token ids", dir.display());
        for (r, &want) in log.records.iter().zip(&reference.nll) {
            assert!(
                (r.nll - want).abs() <= 1e-4,
                "{}: {} vs {want}",
                dir.display(),
                r.nll
            );
        }
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("dense/run.json")).unwrap())
                .unwrap();
        let bos = serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.join("reference.json")).unwrap(),
        )
        .unwrap()["bos_added"]
            .clone();
        assert_eq!(
            record["model"]["details"]["bos_added"],
            bos,
            "{}",
            dir.display()
        );
        assert_eq!(record["model"]["details"]["source"]["kind"], "folder");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// `--no-bos` on a model whose tokenizer adds BOS: the book is fed from its first text token,
/// which is not scored, so the log holds the text's ids from the second on; the run folder and
/// run.json say so. (The NLLs against transformers without BOS: tests/gemma3_model.rs.)
#[test]
fn no_bos_feeds_the_book_from_its_first_text_token() {
    let dir = fixtures_root().join("gemma3-local");
    let reference = load(&dir).1;
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    assert_eq!(
        fixture["bos_added"], true,
        "the fixture's tokenizer adds BOS"
    );
    let out = std::env::temp_dir().join(format!("streamppl-no-bos-{}", std::process::id()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--corpus")
        .arg(fixtures_root().join("corpus.txt"))
        .args(["--strategy", "sink:4+60", "--no-bos", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run_dir = out.join("sink:4+60@no-bos");
    let log = NllLog::read_parquet(&run_dir.join("nll.parquet")).unwrap();
    let ids: Vec<u32> = log.records.iter().map(|r| r.token_id).collect();
    assert_eq!(ids, reference.tokens[2..]);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["model"]["details"]["bos_added"], false);
    assert_eq!(
        record["bos"], false,
        "the options (flattened into run.json)"
    );
    assert_eq!(record["tokens_scored"], reference.tokens.len() - 2);
    std::fs::remove_dir_all(&out).unwrap();
}

/// `--local-sinks` on Gemma 3's layout (window 48 in the local layers): the block engine still
/// equals the token engine; the NLLs equal the model as trained until the first sink is 48
/// tokens back, then differ (the local layers now see it).
#[test]
fn local_sinks_reach_past_the_layer_window_in_both_engines() {
    let (model, reference) = load(&fixtures_root().join("gemma3-local"));
    let local_sinks = model.with_local_sinks(4).unwrap();
    let stream = TokenStream::new(
        std::slice::from_ref(&reference.tokens[..200].to_vec()),
        &[],
        None,
    );
    let trained = run(&model, "sink:4+60", true, EngineKind::Block(32), &stream);
    let token = run(&local_sinks, "sink:4+60", true, EngineKind::Token, &stream);
    let block = run(
        &local_sinks,
        "sink:4+60",
        true,
        EngineKind::Block(32),
        &stream,
    );
    let max = |a: &NllLog, b: &NllLog, range: std::ops::Range<usize>| {
        (a.records[range.clone()].iter().zip(&b.records[range]))
            .map(|(x, y)| (x.nll - y.nll).abs())
            .fold(0f32, f32::max)
    };
    let n = block.len();
    assert!(max(&token, &block, 0..n) <= 5e-5, "block vs token");
    // Blocks longer than the window (48) too.
    let long_blocks = run(
        &local_sinks,
        "sink:4+60",
        true,
        EngineKind::Block(64),
        &stream,
    );
    assert!(max(&token, &long_blocks, 0..n) <= 5e-5, "B=64 vs token");
    // Record t is scored after fed token t; sink key 0 leaves the 48-token window at t = 48.
    assert!(
        max(&trained, &block, 0..48) <= 5e-5,
        "same model before the sinks leave the window"
    );
    assert!(
        max(&trained, &block, 48..n) > 1e-3,
        "the local layers see the sinks"
    );
}

/// Gemma 3's local layers (window 48 here) hold at most window + B keys in the block engine:
/// an interrupted run checkpoints those capped layers (their first stored slot recorded) and
/// resumes to exactly the numbers of an uninterrupted one.
#[test]
fn capped_local_layers_checkpoint_and_resume_to_the_same_numbers() {
    use std::time::Duration;
    use streamppl::checkpoint::Checkpointer;
    let (model, reference) = load(&fixtures_root().join("gemma3-local"));
    assert_eq!(model.layer_caps(32), [Some(80), Some(80), None, Some(80)]);
    // What run.json's `kv_cache` reports: layer 2 is global.
    let keys = |spec: &str, engine| peak_cache_keys(&model, spec.parse().unwrap(), engine, 200);
    assert_eq!(keys("sink:4+60", EngineKind::Block(32)), [80, 80, 96, 80]);
    assert_eq!(keys("dense", EngineKind::Block(32)), [80, 80, 200, 80]);
    assert_eq!(keys("sink:4+60", EngineKind::Token), [65; 4]);
    assert!(keys("recompute:64", EngineKind::Block(32)).is_empty());
    let stream = TokenStream::new(
        std::slice::from_ref(&reference.tokens[..200].to_vec()),
        &[],
        None,
    );
    for spec in ["sink:4+60", "dense"] {
        let s: Strategy = spec.parse().unwrap();
        let engine = EngineKind::Block(32);
        let hidden = ProgressBar::hidden();
        let whole = run_strategy(&model, s, true, engine, &stream, &hidden, None).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "streamppl-capped-{}-{}",
            std::process::id(),
            spec.replace(':', "_")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        // A crash right after the checkpoint at fed token 128 (four blocks).
        let cut = TokenStream {
            fed: stream.fed[..128].to_vec(),
            targets: stream.targets[..128].to_vec(),
        };
        let mut ckpt = Checkpointer::new(&dir, "same run".into(), Duration::ZERO);
        run_strategy(&model, s, true, engine, &cut, &hidden, Some(&mut ckpt)).unwrap();
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("checkpoint/state.json")).unwrap(),
        )
        .unwrap();
        let starts = state["kv"]["starts"]
            .as_array()
            .expect("capped layers' starts");
        assert!(
            starts.iter().any(|s| s.as_u64() > Some(0)),
            "{spec}: {starts:?}"
        );
        let mut ckpt = Checkpointer::new(&dir, "same run".into(), Duration::from_secs(3600));
        let resumed =
            run_strategy(&model, s, true, engine, &stream, &hidden, Some(&mut ckpt)).unwrap();
        assert_eq!(resumed, whole, "{spec}: resumed run differs");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
