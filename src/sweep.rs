//! `streamppl sweep`: StreamingLLM over a grid of sink counts x window sizes, one ordinary run
//! folder per cell (`window:W` where S = 0), skipped when finished and resumed from its
//! checkpoint when interrupted; then `grid.md`, `sweep.json` and a heatmap of PPL.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::eval::EvalOptions;
use crate::nll_log::RunRecord;
use crate::report::{HeatmapCell, plot_heatmap};
use crate::runner::{discard_run, load_model, load_tokenized, now_rfc3339, run_one};
use crate::strategy::Strategy;

pub struct SweepJob {
    pub model: PathBuf,
    pub corpus: Vec<PathBuf>,
    pub books: Option<String>,
    pub sinks: Vec<usize>,
    pub windows: Vec<usize>,
    pub max_tokens: Option<u64>,
    pub out: PathBuf,
    pub rerun: bool,
    pub checkpoint_every: Duration,
}

/// `sweep.json`: the grid as run, each cell's folder and PPL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    pub model: String,
    pub corpus: Vec<String>,
    pub books: Option<String>,
    pub max_tokens: Option<u64>,
    pub sinks: Vec<usize>,
    pub windows: Vec<usize>,
    pub cells: Vec<SweepCell>,
    pub finished_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepCell {
    pub sinks: usize,
    pub window: usize,
    pub strategy: String,
    pub dir: String,
    pub tokens_scored: u64,
    pub ppl: f64,
}

/// The cell's strategy: `window:W` for no sinks, else `sink:S+W`.
pub fn cell_strategy(sinks: usize, window: usize) -> Strategy {
    Strategy::Sink { sinks, window }
}

/// Runs every cell (sinks-major order), then writes the grid files; returns `grid.md`'s path.
pub fn sweep(job: &SweepJob) -> Result<PathBuf> {
    if job.sinks.is_empty() || job.windows.is_empty() {
        bail!(
            "--sinks and --windows each need at least one value, e.g. --sinks 0,4 --windows 252,1020"
        );
    }
    if let Some(w) = job.windows.iter().find(|&&w| w == 0) {
        bail!("--windows {w}: a window must be at least 1 token");
    }
    let opts: Vec<EvalOptions> = job
        .sinks
        .iter()
        .flat_map(|&s| job.windows.iter().map(move |&w| (s, w)))
        .map(|(s, w)| EvalOptions {
            max_tokens: job.max_tokens,
            ..EvalOptions::new(cell_strategy(s, w))
        })
        .collect();
    for o in &opts {
        o.validate()?;
    }
    let lm = load_model(&job.model, &Device::Cpu)?;
    let corpus = load_tokenized(&lm, &job.corpus, job.books.as_deref(), &opts)?;
    let mut cells = Vec::new();
    for (i, o) in opts.iter().enumerate() {
        let dir = job.out.join(o.run_name());
        if job.rerun {
            discard_run(&dir)?;
        }
        eprintln!("cell {}/{}: {}", i + 1, opts.len(), o.strategy);
        let rec = run_one(&lm, &corpus, &job.corpus, o, &dir, job.checkpoint_every)?;
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
        sinks: job.sinks.clone(),
        windows: job.windows.clone(),
        cells,
        finished_at: now_rfc3339(),
    };
    let path = job.out.join("sweep.json");
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))?;
    render_sweep(&job.out)
}

/// Writes `grid.md` and `heatmap.png` (+ `.svg`) from `sweep.json` and the cells' run records.
pub fn render_sweep(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("sweep.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let rec: SweepRecord = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a streamppl sweep record", path.display()))?;
    // PPLs from the run records themselves, so the grid always shows what is on disk.
    let mut cells = Vec::new();
    for c in &rec.cells {
        let run = RunRecord::read_json(&dir.join(&c.dir).join("run.json"))?;
        cells.push(HeatmapCell {
            sinks: c.sinks,
            window: c.window,
            ppl: run.ppl,
        });
    }
    let best = cells.iter().map(|c| c.ppl).fold(f64::INFINITY, f64::min);
    let tokens = rec.cells.first().map_or(0, |c| c.tokens_scored);
    let mut md = format!(
        "# Sink x window sweep\n\nModel `{}` · corpus `{}` · {tokens} scored tokens per cell · PPL, best in bold; S = 0 is window attention.\n\n| sinks \\ window |",
        rec.model,
        rec.corpus.join(", ")
    );
    for w in &rec.windows {
        let _ = write!(md, " {w} |");
    }
    md.push_str("\n|---:|");
    md.push_str(&"---:|".repeat(rec.windows.len()));
    md.push('\n');
    for s in &rec.sinks {
        let _ = write!(md, "| {s} |");
        for w in &rec.windows {
            match cells.iter().find(|c| c.sinks == *s && c.window == *w) {
                Some(c) if c.ppl == best => {
                    let _ = write!(md, " **{:.2}** |", c.ppl);
                }
                Some(c) => {
                    let _ = write!(md, " {:.2} |", c.ppl);
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md.push_str("\n![heatmap](heatmap.png)\n");
    let grid = dir.join("grid.md");
    std::fs::write(&grid, md).with_context(|| format!("{}: cannot write", grid.display()))?;
    plot_heatmap(
        &cells,
        &dir.join("heatmap.png"),
        &format!("PPL, sinks x window ({tokens} tokens)"),
    )?;
    Ok(grid)
}
