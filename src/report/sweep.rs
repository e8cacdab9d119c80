//! A sweep's grid (`grid.md`) and heatmap, regenerated from `sweep.json` and its cells' run
//! records.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{HeatmapCell, plot_heatmap};
use crate::records::run::RunRecord;
use crate::records::sweep::SweepRecord;

/// Writes `grid.md` and `heatmap.png` (+ `.svg`) from `sweep.json` and the cells' run records.
pub fn render_sweep(dir: &Path) -> Result<PathBuf> {
    let rec = SweepRecord::read(dir)?;
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
    crate::records::write_atomically(&grid, md.as_bytes())?;
    plot_heatmap(
        &cells,
        &dir.join("heatmap.png"),
        &format!("PPL, sinks x window ({tokens} tokens)"),
    )?;
    Ok(grid)
}
