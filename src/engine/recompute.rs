//! Sliding window with re-computation (`recompute:W`, `recompute:W/s`): every window of up to
//! W+1 fed tokens is run from scratch at positions 0..=W, and scores the last `s` of them
//! (s = 1 is the exact strategy; s > 1 is the Hugging Face / llama.cpp stride approximation).

use anyhow::Result;
use indicatif::ProgressBar;

use crate::checkpoint::Checkpointer;
use crate::model::{AttnPlan, Llama};
use crate::nll_log::NllLog;
use crate::stream::TokenStream;

use super::{log_targets, resume};

pub fn run(
    model: &Llama,
    window: usize,
    stride: usize,
    stream: &TokenStream,
    progress: &ProgressBar,
    mut ckpt: Option<&mut Checkpointer>,
) -> Result<NllLog> {
    let mut log = NllLog::default();
    let mut start = 0;
    if let Some(state) = resume(ckpt.as_deref(), model, progress)? {
        (start, log) = (state.next, state.log);
    }
    let mut cache = model.new_cache(window + 1)?;
    let n = stream.len();
    while start < n {
        // Fed tokens start..=end are scored by the window that ends at `end`.
        let end = (start + stride - 1).min(n - 1);
        let first = end.saturating_sub(window);
        let len = end - first + 1;
        let scored_from = start - first;
        let targets = &stream.targets[start..=end];
        let rows: Vec<usize> = (0..targets.len())
            .filter(|&i| targets[i].is_some())
            .collect();
        // A window with nothing to score (sink-text tokens, or a `--score-every` sample that
        // skips it) is not computed at all, nor is its (W+1)^2 mask built: for a 1/k sample
        // that would be k-1 masks of millions of floats per scored token.
        if !rows.is_empty() {
            let plan = AttnPlan {
                q_pos: (0..len as u64).collect(),
                write_at: 0,
                k_pos: (0..len as u64).collect(),
                mask: Some(AttnPlan::causal_mask(len, model.device())?),
                sinks: None,
            };
            let hidden = model.forward(&stream.fed[first..=end], &plan, &mut cache)?;
            let idx = candle_core::Tensor::new(
                rows.iter()
                    .map(|&i| (scored_from + i) as u32)
                    .collect::<Vec<_>>(),
                model.device(),
            )?;
            let ids: Vec<u32> = targets.iter().flatten().map(|t| t.token).collect();
            let nll = model.nll(&hidden.index_select(&idx, 0)?, &ids)?;
            log_targets(&mut log, targets, &nll);
            progress.inc(rows.len() as u64);
        }
        start = end + 1;
        if let Some(c) = ckpt.as_deref_mut().filter(|c| c.due()) {
            c.save(start, &log, None)?;
        }
    }
    Ok(log)
}
