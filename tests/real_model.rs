//! Tests on the real default model and corpus (fetched by scripts/fetch-defaults.sh, which
//! scripts/test.sh runs first). They skip, loudly, only when those files are absent.

use std::path::PathBuf;

use indicatif::ProgressBar;
use streamppl::corpus::load_corpus;
use streamppl::eval::{EvalOptions, TokenizedCorpus, evaluate, metrics};
use streamppl::runner::load_model;

fn defaults() -> Option<(PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let corpus = root.join("datasets/gutenberg-mini/test.parquet");
    if model.is_file() && corpus.is_file() {
        Some((model, corpus))
    } else {
        eprintln!(
            "\n!!! SKIPPED: the default model/corpus are missing; run scripts/fetch-defaults.sh !!!\n"
        );
        None
    }
}

#[test]
fn dense_ppl_of_the_first_2048_tokens_of_paradise_lost_is_the_reference() {
    let Some((model, corpus)) = defaults() else {
        return;
    };
    let lm = load_model(&model, &candle_core::Device::Cpu).unwrap();
    let books = load_corpus(&corpus).unwrap();
    assert_eq!(books[0].title, "Paradise Lost");
    let corpus = TokenizedCorpus::new(
        &lm.tokenizer,
        books[..1].to_vec(),
        None,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let mut opts = EvalOptions::new("dense".parse().unwrap());
    opts.max_tokens = Some(2047); // 2048 tokens, no BOS: 2047 scored
    let log = evaluate(
        &lm.model,
        &lm.tokenizer,
        &corpus,
        &opts,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let m = metrics(&log, &corpus, &lm.tokenizer);
    assert_eq!(m.tokens, 2047);
    assert!(
        (m.ppl - 66.233).abs() <= 0.01,
        "dense PPL {} (spec: 66.233 +/- 0.01)",
        m.ppl
    );
    // bits/byte and byte PPL describe the same sum over the same bytes.
    assert!((m.byte_perplexity.log2() - m.bits_per_byte).abs() < 1e-9);
}

#[test]
fn block_and_token_engines_agree_on_the_first_3000_tokens() {
    use streamppl::engine::EngineKind;
    let Some((model, corpus)) = defaults() else {
        return;
    };
    let lm = load_model(&model, &candle_core::Device::Cpu).unwrap();
    let books = load_corpus(&corpus).unwrap();
    let corpus =
        TokenizedCorpus::new(&lm.tokenizer, books, Some(3000), &ProgressBar::hidden()).unwrap();
    for strategy in ["sink:4+252", "window:256", "dense"] {
        let mut opts = EvalOptions::new(strategy.parse().unwrap());
        opts.max_tokens = Some(3000);
        let run = |engine| {
            let opts = EvalOptions {
                engine,
                ..opts.clone()
            };
            evaluate(
                &lm.model,
                &lm.tokenizer,
                &corpus,
                &opts,
                &ProgressBar::hidden(),
            )
            .unwrap()
        };
        let token = run(EngineKind::Token);
        let block = run(EngineKind::Block(streamppl::eval::DEFAULT_BLOCK_SIZE));
        assert_eq!(token.len(), 3000);
        let deltas: Vec<f64> = token
            .records
            .iter()
            .zip(&block.records)
            .map(|(a, b)| (a.nll as f64 - b.nll as f64).abs())
            .collect();
        let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
        let max = deltas.iter().cloned().fold(0.0, f64::max);
        eprintln!(
            "{strategy}: token vs block over 3000 tokens: mean |dNLL| {mean:.2e}, max {max:.2e}"
        );
        assert!(
            mean <= 1e-4 && max <= 1e-3,
            "{strategy}: mean {mean:e}, max {max:e}"
        );
    }
}

#[test]
fn tokenizer_round_trips_every_book_byte_for_byte() {
    let Some((model, corpus)) = defaults() else {
        return;
    };
    let tok = streamppl::tokenizer::TextTokenizer::for_model(&model).unwrap();
    let books = load_corpus(&corpus).unwrap();
    assert_eq!(books.len(), 49);
    for book in &books {
        let ids = tok.encode(&book.text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), book.text, "{}", book.title);
        // Per-token byte lengths (used for bits/byte) add up to the text's length.
        let bytes: u64 = ids.iter().map(|&id| tok.token_bytes(id)).sum();
        assert_eq!(bytes, book.text.len() as u64, "{}", book.title);
    }
}

#[test]
fn the_paper_sink_text_is_one_token_and_fills_the_sinks() {
    let Some((model, _)) = defaults() else { return };
    let tok = streamppl::tokenizer::TextTokenizer::for_model(&model).unwrap();
    let mut opts = EvalOptions::new("sink:4+252".parse().unwrap());
    opts.sink_text = Some("\n".into());
    let prefix = opts.sink_prefix(&tok).unwrap();
    assert_eq!(prefix.len(), 4);
    assert!(prefix.iter().all(|&id| tok.decode(&[id]).unwrap() == "\n"));
}
