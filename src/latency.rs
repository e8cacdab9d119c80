//! Per-token decoding latency and peak memory against cache size (the paper's Figure 10):
//! sliding window with re-computation vs StreamingLLM on the token engine, plus the block
//! engine's time per token, each with its own peak memory.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use indicatif::ProgressBar;

use crate::engine::block::BlockEngine;
use crate::engine::token::TokenEngine;
use crate::model::Model;
use crate::records::latency::LatencyPoint;
use crate::runner::{peak_rss_bytes, reset_peak_rss};
use crate::strategy::Strategy;
use crate::stream::TokenStream;

/// What [`measure_latency`] measures.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    /// Cache sizes C = S + W to measure (e.g. 256, 512, 1024, 2048, 4096).
    pub caches: Vec<usize>,
    /// Sinks S of the StreamingLLM runs (4 in the paper).
    pub sinks: usize,
    /// Tokens timed per method and cache size (after warm-up).
    pub steps: usize,
    /// Block size of the block engine.
    pub block_size: usize,
}

impl LatencyOptions {
    /// Tokens the block engine times past the full cache: at least two whole blocks, so the
    /// difference of two runs is not only the noise of one block. (A block size of 0, which
    /// `measure_latency` refuses, counts as 1 here so that `tokens_needed` cannot panic.)
    fn block_steps(&self) -> usize {
        let b = self.block_size.max(1);
        self.steps.max(2 * b).div_ceil(b) * b
    }

    /// Tokens `measure_latency` needs: for the largest cache C, the token engine and
    /// recompute feed tokens 0..C+steps and score the token after each (`steps` timed plus one
    /// warm-up); the block engine feeds C + block_steps tokens and scores the token after each.
    pub fn tokens_needed(&self) -> usize {
        let largest = self.caches.iter().max().copied().unwrap_or(0);
        largest + (self.steps + 2).max(self.block_steps() + 1)
    }
}

/// Figure 10: for each cache size C, per-token time and peak RSS of StreamingLLM
/// `sink:S+(C-S)` on the token engine (`streaming`), the same on the block engine (`block`),
/// and exact sliding window with re-computation over C+1 tokens (`recompute`), in that order.
/// `tokens` is one stream of at least C + steps + 2 tokens (more for the block engine; the
/// error says how many); `progress` moves once per method and cache.
pub fn measure_latency(
    model: &Model,
    tokens: &[u32],
    opts: &LatencyOptions,
    progress: &ProgressBar,
) -> Result<Vec<LatencyPoint>> {
    if opts.steps == 0 || opts.block_size == 0 {
        bail!("latency needs at least one timed step and a block size of at least 1");
    }
    if let Some(&c) = opts.caches.iter().find(|&&c| c <= opts.sinks) {
        bail!(
            "cache {c} leaves no window after {} sinks; each cache must exceed the sinks",
            opts.sinks
        );
    }
    let needed = opts.tokens_needed();
    if tokens.len() < needed {
        bail!(
            "latency needs {needed} tokens for caches up to {} and {} steps, got {}",
            opts.caches.iter().max().unwrap_or(&0),
            opts.steps,
            tokens.len()
        );
    }
    // One book: the block engine's stream feeds its first n tokens when capped at n scored.
    let stream_tokens = [tokens[..needed].to_vec()];
    let mut points = Vec::with_capacity(3 * opts.caches.len());
    for &cache in &opts.caches {
        let strategy = Strategy::Sink {
            sinks: opts.sinks,
            window: cache - opts.sinks,
        };
        // The allocator keeps memory that earlier measurements freed, so a method's peak RSS is
        // that of the process so far: recompute, which allocates the most (its (C+1)-token
        // activations), runs last for each cache, so the cache engines are not charged for it
        // (at the next, larger cache they are charged for the smaller recompute before them).
        for method in ["streaming", "block", "recompute"] {
            progress.set_message(format!("{method}, cache {cache}"));
            reset_peak_rss();
            let (ms_per_token, timed) = match method {
                "streaming" => time_streaming(model, strategy, tokens, cache, opts.steps)?,
                "block" => time_block(model, strategy, &stream_tokens, cache, opts)?,
                _ => time_recompute(model, tokens, cache, opts.steps)?,
            };
            points.push(LatencyPoint {
                method: method.into(),
                cache,
                ms_per_token,
                tokens: timed,
                peak_rss_mib: peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
            });
            progress.inc(1);
        }
    }
    Ok(points)
}

/// Milliseconds per token of `steps` calls of `f(i)`, i = 0..steps.
fn mean_ms(steps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    for i in 0..steps {
        f(i)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / steps as f64)
}

/// The token engine over a full, evicting cache: prefill C tokens (untimed), one warm-up
/// step, then `steps` timed steps each scoring its next token. Returns (ms/token, tokens).
fn time_streaming(
    model: &Model,
    strategy: Strategy,
    tokens: &[u32],
    cache: usize,
    steps: usize,
) -> Result<(f64, usize)> {
    let mut engine = TokenEngine::new(model, strategy, true)?;
    engine.prefill(&tokens[..cache])?;
    // Fed token i (from C on: the cache is full, so each step evicts) scores token i+1.
    let mut decode = |i: usize| -> Result<()> {
        let hidden = engine.step(tokens[i])?; // (1, hidden)
        model.nll(&hidden, &[tokens[i + 1]])?;
        Ok(())
    };
    decode(cache)?;
    let ms = mean_ms(steps, |i| decode(cache + 1 + i))?;
    Ok((ms, steps))
}

/// Block-engine runs repeat until each length ran twice and all took at least this long.
const BLOCK_TIMING_FLOOR: Duration = Duration::from_millis(250);

/// The block engine's time per token once the cache is full: the difference of a run over
/// C + block_steps fed tokens and one over C (which only fills the cache), over block_steps.
/// The difference is a small part of either run, so one preemption could swamp it: the two
/// runs alternate, at least twice each and until [`BLOCK_TIMING_FLOOR`] has passed (many times
/// for a small model, twice for a real one), and the fastest of each length counts.
fn time_block(
    model: &Model,
    strategy: Strategy,
    books: &[Vec<u32>],
    cache: usize,
    opts: &LatencyOptions,
) -> Result<(f64, usize)> {
    let extra = opts.block_steps();
    let stream = |fed: usize| TokenStream::new(books, &[], Some(fed as u64));
    let (fill_stream, full_stream) = (stream(cache), stream(cache + extra));
    let run_ms = |stream: &TokenStream| -> Result<f64> {
        let start = Instant::now();
        BlockEngine::new(model, strategy, true, opts.block_size)?.run(
            stream,
            &ProgressBar::hidden(),
            None,
        )?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let (mut fill, mut full) = (f64::INFINITY, f64::INFINITY);
    let started = Instant::now();
    for repeat in 0.. {
        if repeat >= 2 && started.elapsed() >= BLOCK_TIMING_FLOOR {
            break;
        }
        fill = fill.min(run_ms(&fill_stream)?);
        full = full.min(run_ms(&full_stream)?);
    }
    Ok(((full - fill) / extra as f64, extra))
}

/// Exact sliding window with re-computation: each decoded token i runs tokens i-C..=i from
/// scratch at positions 0..=C under a causal mask (as `engine::recompute` does, one window per
/// forward pass) and scores token i+1 from the last row. One warm-up token, then `steps` timed.
fn time_recompute(
    model: &Model,
    tokens: &[u32],
    cache: usize,
    steps: usize,
) -> Result<(f64, usize)> {
    let decode = |i: usize| -> Result<()> {
        let hidden = model.forward_windows(&[&tokens[i - cache..=i]])?; // (C+1, hidden)
        model.nll(&hidden.narrow(0, cache, 1)?, &[tokens[i + 1]])?;
        Ok(())
    };
    decode(cache)?;
    let ms = mean_ms(steps, |i| decode(cache + 1 + i))?;
    Ok((ms, steps))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::Config;
    use crate::model::random::random_llama;

    fn opts() -> LatencyOptions {
        LatencyOptions {
            caches: vec![8, 16],
            sinks: 2,
            steps: 3,
            block_size: 4,
        }
    }

    fn tokens(n: usize, vocab: usize) -> Vec<u32> {
        crate::model::random::random_tokens(n, vocab, 5)
    }

    #[test]
    fn measures_three_methods_per_cache() {
        let cfg = Config::tiny(41);
        let model = random_llama(&cfg, 5, &Device::Cpu).unwrap();
        let o = opts();
        // Block engine: 8 tokens past the cache (2 blocks of 4), plus the last one scored.
        assert_eq!(o.tokens_needed(), 25);
        let progress = ProgressBar::hidden();
        let points = measure_latency(&model, &tokens(25, cfg.vocab_size), &o, &progress).unwrap();
        assert_eq!(progress.position(), 6);
        let got: Vec<(&str, usize, usize)> = points
            .iter()
            .map(|p| (p.method.as_str(), p.cache, p.tokens))
            .collect();
        assert_eq!(
            got,
            [
                ("streaming", 8, 3),
                ("block", 8, 8),
                ("recompute", 8, 3),
                ("streaming", 16, 3),
                ("block", 16, 8),
                ("recompute", 16, 3),
            ]
        );
        for p in &points {
            assert!(p.ms_per_token.is_finite() && p.ms_per_token > 0.0, "{p:?}");
        }
    }

    #[test]
    fn too_few_tokens_names_the_count_needed() {
        let cfg = Config::tiny(41);
        let model = random_llama(&cfg, 5, &Device::Cpu).unwrap();
        let err = measure_latency(&model, &tokens(24, 41), &opts(), &ProgressBar::hidden())
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 25 tokens"), "{err}");
    }
}
