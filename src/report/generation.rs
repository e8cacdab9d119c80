//! `streamppl plot-generation`: long generations side by side. Three stacked panels against
//! tokens generated: per-token latency (ms, log scale), resident memory (MiB, from 0) and the
//! running mean self-NLL (the model's NLL of the tokens it chose), one colour per run.

use std::path::Path;

use anyhow::{Result, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::figures::{LEGEND_WIDTH, X_LABEL_AREA, chart_builder};
use super::plot::{
    LegendEntry, MAX_POINTS, PALETTE, Render, check_png, downsample, draw_legend, fmt_tokens,
    fmt_value, house_style, log_ticks, write_png_and_svg, x_max, y_range,
};
use crate::records::generation::GenerationLog;

/// One run's curves, each (tokens generated, value), downsampled.
struct Curves {
    label: String,
    latency_ms: Vec<(f64, f64)>,
    rss_mib: Vec<(f64, f64)>,
    mean_nll: Vec<(f64, f64)>,
}

impl Curves {
    fn new(label: &str, log: &GenerationLog) -> Self {
        let series = |values: Vec<f64>| downsample(&values, MAX_POINTS);
        let mut sum = 0.0;
        let mean_nll = (log.tokens.iter().enumerate())
            .map(|(i, t)| {
                sum += t.nll as f64;
                sum / (i + 1) as f64
            })
            .collect();
        Curves {
            label: label.to_string(),
            latency_ms: series(
                log.tokens
                    .iter()
                    .map(|t| t.latency_s as f64 * 1e3)
                    .collect(),
            ),
            rss_mib: series(log.tokens.iter().map(|t| t.rss_mib as f64).collect()),
            // (The downsampling keeps positive values only: a mean NLL is 0 only for a model
            // sure of every token it chose.)
            mean_nll: series(mean_nll),
        }
    }
}

struct GenerationFigure<'a> {
    title: &'a str,
    runs: Vec<Curves>,
    x_max: f64,
}

/// Plots `runs` (legend label, log) into `out` (PNG) and the SVG beside it. Errors if `runs` is
/// empty or holds no token.
pub fn plot_generation(runs: &[(&str, &GenerationLog)], out: &Path, title: &str) -> Result<()> {
    check_png(out)?;
    if runs.iter().all(|(_, log)| log.tokens.is_empty()) {
        bail!("no generated token to plot");
    }
    let curves: Vec<Curves> = runs.iter().map(|(l, log)| Curves::new(l, log)).collect();
    let x_max = x_max(runs.iter().map(|(_, log)| log.tokens.len() as f64));
    let figure = GenerationFigure {
        title,
        runs: curves,
        x_max,
    };
    write_png_and_svg(out, (1200, 1000), &figure)
}

impl Render for GenerationFigure<'_> {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title, (super::plot::FONT, 26))?;
        let (width, _) = body.dim_in_pixel();
        let (panels, legend_area) = body.split_horizontally(width - LEGEND_WIDTH);
        let panels = panels.split_evenly((3, 1));
        self.draw_latency(&panels[0])?;
        self.draw_linear(&panels[1], "resident memory (MiB)", true, |c| &c.rss_mib)?;
        self.draw_linear(&panels[2], "mean self-NLL so far", false, |c| &c.mean_nll)?;
        let entries: Vec<LegendEntry> = (self.runs.iter().enumerate())
            .map(|(i, c)| LegendEntry {
                label: c.label.clone(),
                color: PALETTE[i % PALETTE.len()].to_rgba(),
                dashed: false,
                marker: None,
            })
            .collect();
        draw_legend(&legend_area, &entries)?;
        root.present()?;
        Ok(())
    }
}

impl GenerationFigure<'_> {
    fn draw_latency<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let (lo, hi) = y_range(
            self.runs
                .iter()
                .flat_map(|c| c.latency_ms.iter().map(|p| p.1)),
        );
        let mut chart = chart_builder(area, X_LABEL_AREA / 2).build_cartesian_2d(
            0.0..self.x_max,
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )?;
        house_style(&mut chart.configure_mesh())
            .y_desc("latency per token (ms, log)")
            .x_label_formatter(&|x| fmt_tokens(*x))
            .y_label_formatter(&|y| fmt_value(*y))
            .draw()?;
        for (i, c) in self.runs.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart.draw_series(LineSeries::new(
                c.latency_ms.iter().copied(),
                colour.stroke_width(1),
            ))?;
        }
        Ok(())
    }

    /// A panel on a linear y axis (from 0 when `from_zero`); the bottom one describes x.
    fn draw_linear<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        y_desc: &str,
        from_zero: bool,
        series: impl Fn(&Curves) -> &Vec<(f64, f64)>,
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let values = || self.runs.iter().flat_map(|c| series(c).iter().map(|p| p.1));
        let hi = values().fold(0.0, f64::max);
        let lo = match from_zero {
            true => 0.0,
            false => values().fold(hi, f64::min),
        };
        let pad = ((hi - lo) * 0.08).max(1e-3);
        let bottom = !from_zero;
        let x_label_area = if bottom {
            X_LABEL_AREA
        } else {
            X_LABEL_AREA / 2
        };
        let y_lo = if from_zero { 0.0 } else { lo - pad };
        let mut chart = chart_builder(area, x_label_area)
            .build_cartesian_2d(0.0..self.x_max, y_lo..hi + pad)?;
        let mut mesh = chart.configure_mesh();
        house_style(&mut mesh)
            .y_desc(y_desc)
            .x_label_formatter(&|x| fmt_tokens(*x))
            .y_label_formatter(&|y| fmt_value(*y));
        if bottom {
            mesh.x_desc("tokens generated");
        }
        mesh.draw()?;
        for (i, c) in self.runs.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart.draw_series(LineSeries::new(
                series(c).iter().copied(),
                colour.stroke_width(2),
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::generation::GeneratedToken;

    fn log(n: usize, slope: f32) -> GenerationLog {
        GenerationLog {
            tokens: (0..n)
                .map(|i| GeneratedToken {
                    turn: (i / 50) as u32,
                    position: 10 + i as u64,
                    token_id: i as u32,
                    nll: 1.0 + (i % 7) as f32 * 0.1,
                    cache_keys: (i as u32).min(64),
                    latency_s: 0.01 + slope * i as f32,
                    rss_mib: 500.0 + slope * 1e4 * i as f32,
                })
                .collect(),
        }
    }

    #[test]
    fn several_runs_plot_to_png_and_svg_and_an_empty_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("streamppl-genplot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("generation.png");
        let (sink, dense) = (log(600, 0.0), log(400, 1e-4));
        let runs = [("StreamingLLM 4+60", &sink), ("Dense", &dense)];
        plot_generation(&runs, &out, "generation").unwrap();
        let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
        assert!(svg.contains("StreamingLLM 4+60") && svg.contains("tokens generated"));
        assert!(std::fs::metadata(&out).unwrap().len() > 5000);
        let empty = [("none", &GenerationLog::default())];
        assert!(plot_generation(&empty, &out, "t").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
