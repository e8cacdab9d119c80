//! Sliding window with re-computation (`recompute:W`, `recompute:W/s`): every window of up to
//! W+1 fed tokens is run from scratch at positions 0..=W, and scores the last `s` of them
//! (s = 1 is the exact strategy; s > 1 is the Hugging Face / llama.cpp stride approximation).
//!
//! Windows are independent, so several of them run as one batch ([`Model::forward_windows`]):
//! the weight matmuls see windows x (W+1) rows at once. A batch holds the next windows that
//! score something (a `--score-every` sample skips the rest without computing them), and
//! checkpoints are saved only between batches, so a resumed run forms the same batches.

use std::ops::RangeInclusive;

use anyhow::Result;
use candle_core::Device;
use indicatif::ProgressBar;

use crate::checkpoint::Checkpointer;
use crate::model::Model;
use crate::nll_log::NllLog;
use crate::stream::TokenStream;

use super::{ScoredLog, resume};

/// Rows (windows x window length) per batched forward pass. Measured on 2 CPU cores with the
/// default model (ms per window, one at a time -> batched): 65-token windows 217 -> 167 with 16
/// per batch, 257-token windows 657 -> 605 with 4, but 1025-token windows 3727 -> 4441 with 2:
/// past about a thousand rows the matmuls are already large and bigger activations only cost.
const BATCH_ROWS: usize = 1024;
/// Most windows per batch (past this, larger matmuls gain nothing).
const MAX_WINDOWS: usize = 16;
/// A GPU needs far more rows per pass to be busy (a 135M model's layer is a few launches of
/// microseconds each): 32 windows of 1025 tokens, activations and scores a few GB at most.
const GPU_BATCH_ROWS: usize = 1 << 15;
const GPU_MAX_WINDOWS: usize = 256;

/// Windows per batch for `recompute:window` on `device`.
pub fn windows_per_batch(window: usize, device: &Device) -> usize {
    let (rows, most) = match device.is_cpu() {
        true => (BATCH_ROWS, MAX_WINDOWS),
        false => (GPU_BATCH_ROWS, GPU_MAX_WINDOWS),
    };
    (rows / window.saturating_add(1)).clamp(1, most)
}

/// One window: fed tokens `fed`, of which `scored` (its last `s` or fewer) are scored.
struct Window {
    fed: RangeInclusive<usize>,
    scored: RangeInclusive<usize>,
}

impl Window {
    fn len(&self) -> usize {
        self.fed.end() - self.fed.start() + 1
    }
}

/// Runs the stream with up to `batch` windows per forward pass (1: one window at a time).
pub fn run(
    model: &Model,
    window: usize,
    stride: usize,
    batch: usize,
    stream: &TokenStream,
    progress: &ProgressBar,
    mut ckpt: Option<&mut Checkpointer>,
) -> Result<NllLog> {
    let mut log = NllLog::default();
    let mut start = 0;
    if let Some(state) = resume(ckpt.as_deref(), model, stream, None, progress) {
        (start, log) = (state.next, state.log);
    }
    let mut scored = ScoredLog::new(log, progress);
    let n = stream.len();
    while start < n {
        // The next `batch` windows with something to score. A window with nothing to score
        // (sink-text tokens, or a `--score-every` sample that skips it) is not computed at all.
        let mut group = Vec::with_capacity(batch);
        while start < n && group.len() < batch.max(1) {
            // Fed tokens start..=end are scored by the window that ends at `end`.
            let end = start.saturating_add(stride - 1).min(n - 1);
            if stream.targets[start..=end].iter().any(Option::is_some) {
                group.push(Window {
                    fed: end.saturating_sub(window)..=end,
                    scored: start..=end,
                });
            }
            start = end + 1;
        }
        // Windows of one length run together (only the stream's first W windows are shorter).
        for same in group.chunk_by(|a, b| a.len() == b.len()) {
            let tokens: Vec<&[u32]> = same.iter().map(|w| &stream.fed[w.fed.clone()]).collect();
            let hidden = model.forward_windows(&tokens)?; // (windows * len, hidden)
            let len = same[0].len();
            let rows: Vec<u32> = same
                .iter()
                .enumerate()
                .flat_map(|(i, w)| {
                    w.scored
                        .clone()
                        .filter(|&t| stream.targets[t].is_some())
                        .map(move |t| (i * len + t - w.fed.start()) as u32)
                })
                .collect();
            let rows = candle_core::Tensor::new(rows.as_slice(), model.device())?;
            let targets: Vec<_> = same
                .iter()
                .flat_map(|w| stream.targets[w.scored.clone()].iter().copied())
                .collect();
            let ids: Vec<u32> = targets.iter().flatten().map(|t| t.token).collect();
            let nll = model.nll(&hidden.index_select(&rows, 0)?, &ids)?;
            scored.append(&targets, &nll);
        }
        if let Some(c) = ckpt.as_deref_mut().filter(|c| c.due()) {
            c.save(start, &scored.log, None)?;
        }
    }
    Ok(scored.log)
}
