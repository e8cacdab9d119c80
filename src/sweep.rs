//! `streamppl sweep`: StreamingLLM over a grid of sink counts x window sizes, one ordinary run
//! folder per cell (`window:W` where S = 0), skipped when finished and resumed from its
//! checkpoint when interrupted; then `grid.md`, `sweep.json` and a heatmap of PPL.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::eval::{EvalOptions, TokenizedCorpus};
use crate::records::sweep::{SweepCell, SweepRecord};
use crate::report::render_sweep;
use crate::runner::{
    Compute, LoadedModel, RunPolicy, RunStatus, load_model, load_tokenized, now_rfc3339,
    run_each_once, run_one,
};
use crate::shard::{Shard, estimated_cost, partition};
use crate::strategy::Strategy;

pub struct SweepJob {
    pub model: PathBuf,
    pub corpus: Vec<PathBuf>,
    pub books: Option<String>,
    pub sinks: Vec<usize>,
    pub windows: Vec<usize>,
    pub max_tokens: Option<u64>,
    pub out: PathBuf,
    pub policy: RunPolicy,
    /// Compute only this shard's cells (see [`crate::shard`]); the grid is written by a run
    /// without a shard once every shard is done.
    pub shard: Option<Shard>,
    pub compute: Compute,
}

/// Runs every cell (sinks-major order), then writes the grid files; returns `grid.md`'s path,
/// or with a shard, computes its cells only and returns `None`.
pub fn sweep(job: &SweepJob) -> Result<Option<PathBuf>> {
    if job.sinks.is_empty() || job.windows.is_empty() {
        bail!(
            "--sinks and --windows each need at least one value, e.g. --sinks 0,4 --windows 252,1020"
        );
    }
    if let Some(w) = job.windows.iter().find(|&&w| w == 0) {
        bail!("--windows {w}: a window must be at least 1 token");
    }
    let (sinks, windows) = (distinct(&job.sinks), distinct(&job.windows));
    let opts = sinks
        .iter()
        .flat_map(|&s| windows.iter().map(move |&w| (s, w)))
        .map(|(s, w)| {
            Ok(EvalOptions {
                max_tokens: job.max_tokens,
                ..EvalOptions::new(Strategy::sink(s, w)?)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for o in &opts {
        o.validate()?;
    }
    let lm = load_model(&job.model, &job.compute)?;
    let corpus = load_tokenized(&lm, &job.corpus, job.books.as_deref(), &opts)?;
    if let Some(shard) = job.shard {
        return run_shard(job, shard, &lm, &corpus, &opts).map(|()| None);
    }
    let finished = run_each_once(opts.len(), &job.policy, |i, policy| {
        eprintln!("cell {}/{}: {}", i + 1, opts.len(), opts[i].strategy);
        run_one(
            &lm,
            &corpus,
            &job.corpus,
            &opts[i],
            &job.out.join(opts[i].run_name()),
            policy,
        )
    })?;
    let mut cells = Vec::new();
    let mut stale = 0;
    for (o, finished) in opts.iter().zip(finished) {
        stale += usize::from(finished.status == RunStatus::Stale);
        let rec = finished.record;
        let Strategy::Sink { sinks, window } = o.strategy else {
            unreachable!("sweep cells are sink strategies")
        };
        cells.push(SweepCell {
            sinks,
            window,
            strategy: rec.strategy.clone(),
            dir: o.run_name(),
            tokens_scored: rec.tokens_scored,
            ppl: rec.ppl,
        });
    }
    let record = SweepRecord {
        model: job.model.display().to_string(),
        corpus: job.corpus.iter().map(|p| p.display().to_string()).collect(),
        books: job.books.clone(),
        max_tokens: job.max_tokens,
        sinks,
        windows,
        cells,
        finished_at: now_rfc3339(),
    };
    record.write(&job.out)?;
    if stale > 0 {
        eprintln!(
            "{stale} stale cell(s) kept (computed by another numerics epoch); `--rerun-stale` recomputes them"
        );
    }
    render_sweep(&job.out).map(Some)
}

/// Computes the cells of `shard` (see [`crate::shard`]), balanced by their estimated cost.
fn run_shard(
    job: &SweepJob,
    shard: Shard,
    lm: &LoadedModel,
    corpus: &TokenizedCorpus,
    opts: &[EvalOptions],
) -> Result<()> {
    let scored: u64 = (corpus.ids.iter())
        .map(|b| b.len().saturating_sub(1) as u64)
        .sum();
    let costs: Vec<(String, f64)> = (opts.iter())
        .map(|o| {
            let tokens = o.max_tokens.unwrap_or(scored).min(scored);
            (o.run_name(), estimated_cost(o, tokens))
        })
        .collect();
    let owner = partition(&costs, shard.count);
    let mine: Vec<&EvalOptions> = (opts.iter().zip(&owner))
        .filter(|(_, s)| shard.owns(**s))
        .map(|(o, _)| o)
        .collect();
    eprintln!("shard {shard}: {} of the {} cells", mine.len(), opts.len());
    run_each_once(mine.len(), &job.policy, |i, policy| {
        let dir = job.out.join(mine[i].run_name());
        run_one(lm, corpus, &job.corpus, mine[i], &dir, policy)
    })?;
    eprintln!(
        "shard {shard} done; the same command without --shard writes the grid once every shard is"
    );
    Ok(())
}

/// The values in their first order, each once (`--sinks 4,4` is one row).
fn distinct(values: &[usize]) -> Vec<usize> {
    let mut seen = Vec::new();
    for &v in values {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    seen
}
