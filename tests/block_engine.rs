//! The block-parallel engine gives the token engine's NLLs (to 1e-5) on tiny random Llamas of
//! several shapes, for every block size, cache budget and across book boundaries.

mod common;

use candle_core::Device;
use indicatif::ProgressBar;
use streamppl::engine::{EngineKind, run_strategy};
use streamppl::model::Config;
use streamppl::model::random::random_llama;
use streamppl::strategy::Strategy;
use streamppl::stream::TokenStream;

fn configs() -> Vec<Config> {
    let gqa = Config::tiny(53); // 4 query heads, 2 KV heads
    let wide_gqa = Config {
        hidden_size: 48,
        n_head: 6,
        n_kv_head: 2,
        n_layer: 3,
        ..Config::tiny(40)
    };
    let mha = Config {
        n_kv_head: 4,
        ..Config::tiny(37)
    };
    vec![gqa, wide_gqa, mha]
}

fn compare(cfg: &Config, strategy: &str, pos_shift: bool, block: usize, prefix: &[u32]) {
    let model = random_llama(cfg, 11, &Device::Cpu).unwrap();
    // Four books, one of a single token (nothing fed from it), 60 fed tokens in all.
    let stream = TokenStream::new(
        &common::books(&[23, 1, 18, 22], cfg.vocab_size, 3),
        prefix,
        None,
    );
    let s: Strategy = strategy.parse().unwrap();
    let run = |engine| {
        run_strategy(
            &model,
            s,
            pos_shift,
            engine,
            &stream,
            &ProgressBar::hidden(),
            None,
        )
        .unwrap()
    };
    let token = run(EngineKind::Token);
    let blocked = run(EngineKind::Block(block));
    assert_eq!(token.len(), blocked.len());
    for (a, b) in token.records.iter().zip(&blocked.records) {
        assert_eq!(
            (a.position, a.book, a.token_id),
            (b.position, b.book, b.token_id)
        );
        assert!(
            (a.nll - b.nll).abs() <= 1e-5,
            "{strategy} pos_shift={pos_shift} B={block} heads={}/{}: position {}: token {} vs block {}",
            cfg.n_head,
            cfg.n_kv_head,
            a.position,
            a.nll,
            b.nll
        );
    }
}

#[test]
fn sink_and_window_match_the_token_engine() {
    for cfg in configs() {
        for block in [1, 3, 16] {
            // W smaller and larger than B; S in {0, 1, 4}.
            for strategy in [
                "window:2",
                "window:20",
                "sink:1+2",
                "sink:1+20",
                "sink:4+5",
                "sink:4+30",
            ] {
                compare(&cfg, strategy, true, block, &[]);
            }
        }
    }
}

#[test]
fn dense_matches_the_token_engine() {
    for cfg in configs() {
        for block in [1, 3, 16, 64] {
            compare(&cfg, "dense", true, block, &[]);
        }
    }
}

#[test]
fn no_pos_shift_and_sink_text_match_the_token_engine() {
    let cfg = &configs()[0];
    for block in [1, 3, 16] {
        compare(cfg, "sink:4+5", false, block, &[]);
        compare(cfg, "window:7", false, block, &[]);
        compare(cfg, "sink:3+6", true, block, &[2, 2, 2]);
    }
}

#[test]
fn block_runs_resume_from_a_checkpoint_to_the_same_numbers() {
    use std::time::Duration;
    use streamppl::checkpoint::Checkpointer;
    let cfg = &configs()[0];
    let model = random_llama(cfg, 11, &Device::Cpu).unwrap();
    let stream = TokenStream::new(&common::books(&[40, 30], cfg.vocab_size, 5), &[], None);
    let s: Strategy = "sink:2+9".parse().unwrap();
    let engine = EngineKind::Block(8);
    let run = |stream: &TokenStream, ckpt| {
        run_strategy(
            &model,
            s,
            true,
            engine,
            stream,
            &ProgressBar::hidden(),
            ckpt,
        )
        .unwrap()
    };
    let whole = run(&stream, None);
    let dir = std::env::temp_dir().join(format!("streamppl-block-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A crash right after the checkpoint at fed token 32 (a block boundary).
    let cut = TokenStream {
        fed: stream.fed[..32].to_vec(),
        targets: stream.targets[..32].to_vec(),
    };
    let mut every_block = Checkpointer::new(&dir, "run".into(), Duration::ZERO);
    run(&cut, Some(&mut every_block));
    let mut rarely = Checkpointer::new(&dir, "run".into(), Duration::from_secs(3600));
    let resumed = run(&stream, Some(&mut rarely));
    assert_eq!(resumed, whole);
    std::fs::remove_dir_all(&dir).unwrap();
}
