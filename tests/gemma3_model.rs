//! The real Gemma 3 270M (`scripts/fetch-defaults.sh --model gemma3-270m`) against the
//! held-out reference of `tests/fixtures/gemma3-270m/` (transformers on the same GGUF,
//! dequantized to f32, with SentencePiece's ids). Skips loudly when the model is missing, and
//! fails instead under STREAMPPL_REQUIRE_MODELS=1 (CI).

mod common;

use indicatif::ProgressBar;
use serde_json::Value as Json;
use streamppl::corpus::load_corpus;
use streamppl::eval::{EvalOptions, TokenizedCorpus, corpus_as_fed, evaluate, metrics};
use streamppl::runner::{Compute, load_model};

use common::registered_model_and_corpus;

const REFERENCE: &str = "tests/fixtures/gemma3-270m/reference.json";

/// Dense over the first 2048 tokens of Paradise Lost, the BOS first (2047 scored): the PPL is
/// streamppl's own measured value (64.798; the held-out transformers reference is 64.7948),
/// and every token's NLL is transformers' within float noise.
#[test]
fn dense_ppl_of_the_first_2048_tokens_of_paradise_lost_with_bos() {
    dense_against_the_reference(true, 64.798);
}

/// `--no-bos`: the first 2048 text ids alone (2047 scored), against transformers on the same
/// ids: streamppl measured 97.856 (transformers 97.8508); the BOS is worth a third of the PPL
/// at the start of a book.
#[test]
fn dense_ppl_of_the_first_2048_tokens_of_paradise_lost_without_bos() {
    dense_against_the_reference(false, 97.856);
}

/// Dense over 2047 scored tokens of the first book, with or without the BOS: the PPL within
/// 0.01 of `measured_ppl` and every token's NLL within float noise of the reference's.
fn dense_against_the_reference(bos: bool, measured_ppl: f64) {
    let Some((model, corpus)) = registered_model_and_corpus("gemma3-270m") else {
        return;
    };
    let lm = load_model(&model, &Compute::cpu()).unwrap();
    assert_eq!(lm.tokenizer.bos(), Some(2), "Gemma's BOS is <bos>, id 2");
    let books = load_corpus(&corpus).unwrap();
    let corpus = TokenizedCorpus::new(
        &lm.tokenizer,
        books[..1].to_vec(),
        None,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let mut opts = EvalOptions::new("dense".parse().unwrap());
    opts.max_tokens = Some(2047);
    opts.bos = bos;
    let log = evaluate(
        &lm.model,
        &lm.tokenizer,
        &corpus,
        &opts,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let fed = corpus_as_fed(&corpus, &lm.tokenizer, &opts);
    let m = metrics(&log, &fed, &lm.tokenizer);
    assert_eq!(m.tokens, 2047);
    let key = if bos { "with_bos" } else { "without_bos" };
    let reference: Json = serde_json::from_str(&std::fs::read_to_string(REFERENCE).unwrap())
        .unwrap_or_else(|e| panic!("{REFERENCE}: {e}"));
    let reference = &reference["dense"][key];
    assert!(
        (m.ppl - measured_ppl).abs() <= 0.01,
        "dense PPL {key} {} (measured {measured_ppl}; transformers {})",
        m.ppl,
        reference["ppl"]
    );
    let want = reference["nll"].as_array().unwrap();
    assert_eq!(want.len(), log.records.len());
    let diffs: Vec<f64> = (log.records.iter().zip(want))
        .map(|(r, w)| (r.nll as f64 - w.as_f64().unwrap()).abs())
        .collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let max = diffs.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "Gemma 3 270M dense {key}: PPL {:.4}; vs transformers: mean |dNLL| {mean:.2e}, max {max:.2e}",
        m.ppl
    );
    assert!(mean <= 2e-4 && max <= 2e-3, "mean |dNLL| {mean}, max {max}");
}
