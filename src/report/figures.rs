//! Figures beyond the running-PPL plot: the sweep heatmap, Figure 10's latency and memory
//! against cache size, and Figure 5's long stream with its memory.

use std::ops::Range;
use std::path::Path;

use anyhow::{Result, bail};
use plotters::coord::Shift;
use plotters::coord::combinators::IntoPartialAxis;
use plotters::coord::ranged1d::DefaultFormatting;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::plot::{
    DASH, FONT, LegendEntry, MAX_POINTS, PALETTE, Render, check_png, downsample,
    downsample_by_position, draw_legend, draw_markers, fmt_tokens, fmt_value, house_style,
    log_ticks, plottable, settled_y_range, write_png_and_svg, x_max, y_range,
};
use crate::nll_log::NllLog;
use crate::records::latency::LatencyPoint;
use crate::records::memory::MemorySample;

/// Right-hand column for a legend, so it never hides a curve.
pub(super) const LEGEND_WIDTH: u32 = 300;
const TITLE_SIZE: u32 = 26;
/// Room for the axis description and tick labels left of and below every chart, the same in
/// every panel so that stacked panels share their x positions.
const Y_LABEL_AREA: u32 = 80;
pub(super) const X_LABEL_AREA: u32 = 56;
const MARGIN: u32 = 16;

/// One cell of a sink x window sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeatmapCell {
    pub sinks: usize,
    pub window: usize,
    pub ppl: f64,
}

/// Grid of PPL, rows = sinks, columns = windows; writes `out` (PNG) and the SVG beside it.
///
/// Rows are the distinct sink counts, ascending from the top; columns the distinct windows,
/// ascending to the right. Each cell shows its PPL on a log colour scale from the best (lowest,
/// brightest) PPL to 4x the best (darkest), worse cells clamped to the darkest colour, so that
/// the good cells stay apart. The best cell is outlined; a combination missing from `cells` is
/// grey with a dash; a repeated (sinks, window) keeps its first PPL. Errors if `cells` is empty
/// or no cell has a finite, positive PPL.
pub fn plot_heatmap(cells: &[HeatmapCell], out: &Path, title: &str) -> Result<()> {
    check_png(out)?;
    if cells.is_empty() {
        bail!("no cells to plot");
    }
    let heatmap = Heatmap::new(cells, title)?;
    let size = heatmap.size();
    write_png_and_svg(out, size, &heatmap)
}

/// Latency (ms/token) and peak memory against cache size, one line per method.
///
/// Figure 10 of the paper: left, mean ms per token (log y); right, peak resident memory in MiB
/// (linear y from 0, points without a measurement skipped). The x axis places the distinct
/// cache sizes evenly. Known methods get the paper's names in the legend (`recompute`,
/// `streaming`, `block`, in that order), others their own name, after them. Errors if `points`
/// is empty.
pub fn plot_latency(points: &[LatencyPoint], out: &Path, title: &str) -> Result<()> {
    check_png(out)?;
    if points.is_empty() {
        bail!("no latency points to plot");
    }
    write_png_and_svg(out, (1400, 620), &Latency::new(points, title))
}

/// A long stream: running and windowed PPL with book boundaries, and memory over the stream.
///
/// Figure 5 of the paper: on top, the running PPL and the PPL over the last `window` scored
/// tokens (log y) against scored tokens, with a dashed line where the book changes; below,
/// resident memory (MiB, linear y from 0) against tokens scored. Long series are downsampled,
/// keeping each bucket's extremes. Errors if `window` is 0.
pub fn plot_long_stream(
    log: &NllLog,
    memory: &[MemorySample],
    window: usize,
    out: &Path,
    title: &str,
) -> Result<()> {
    check_png(out)?;
    if window == 0 {
        bail!("the PPL window must hold at least one token");
    }
    write_png_and_svg(
        out,
        (1200, 820),
        &LongStream::new(log, memory, window, title),
    )
}

// ---------------------------------------------------------------------------------------------
// Heatmap

/// Colour scale span: PPL from the best to this multiple of it get distinct colours.
const HEAT_CAP: f64 = 4.0;
/// Width of the colour-bar column.
const BAR_WIDTH: u32 = 230;

struct Heatmap<'a> {
    title: &'a str,
    sinks: Vec<usize>,
    windows: Vec<usize>,
    /// `ppl[row][column]`, None where the sweep has no such cell.
    ppl: Vec<Vec<Option<f64>>>,
    best: f64,
    /// (row, column) of the best cell.
    best_at: (usize, usize),
}

impl<'a> Heatmap<'a> {
    fn new(cells: &[HeatmapCell], title: &'a str) -> Result<Self> {
        let distinct = |key: fn(&HeatmapCell) -> usize| {
            let mut v: Vec<usize> = cells.iter().map(key).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let sinks = distinct(|c| c.sinks);
        let windows = distinct(|c| c.window);
        let mut ppl = vec![vec![None; windows.len()]; sinks.len()];
        for c in cells {
            let row = sinks.binary_search(&c.sinks).unwrap_or_default();
            let column = windows.binary_search(&c.window).unwrap_or_default();
            ppl[row][column].get_or_insert(c.ppl);
        }
        let best_at = (0..sinks.len())
            .flat_map(|r| (0..windows.len()).map(move |c| (r, c)))
            .filter(|&(r, c)| ppl[r][c].is_some_and(plottable))
            .min_by(|a, b| {
                let at = |(r, c): (usize, usize)| ppl[r][c].unwrap_or(f64::INFINITY);
                at(*a).total_cmp(&at(*b))
            });
        let Some(best_at) = best_at else {
            bail!("no cell has a finite, positive PPL to plot");
        };
        let best = ppl[best_at.0][best_at.1].unwrap_or(1.0);
        Ok(Heatmap {
            title,
            sinks,
            windows,
            ppl,
            best,
            best_at,
        })
    }

    /// About 120 x 70 pixels a cell, within bounds that keep small grids readable and big ones
    /// on a screen.
    fn size(&self) -> (u32, u32) {
        let width = 120 * self.windows.len() as u32 + Y_LABEL_AREA + BAR_WIDTH + 3 * MARGIN;
        let height = 70 * self.sinks.len() as u32 + X_LABEL_AREA + 3 * MARGIN + 60;
        (width.clamp(900, 2000), height.clamp(480, 1400))
    }
}

/// Where `ppl` sits on the colour scale: 0 at `best`, 1 at `HEAT_CAP` x `best` and beyond
/// (also for a PPL that is not finite), linear in log PPL between.
fn heat_fraction(ppl: f64, best: f64) -> f64 {
    if !plottable(ppl) {
        return 1.0;
    }
    ((ppl / best).ln() / HEAT_CAP.ln()).clamp(0.0, 1.0)
}

/// Viridis, reversed: the best cells bright yellow, the worst dark purple. Perceptually even,
/// readable in grey print and for common colour-vision deficiencies.
fn heat_color(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (253, 231, 37),
        (170, 220, 50),
        (92, 200, 99),
        (39, 173, 129),
        (33, 144, 141),
        (44, 113, 142),
        (59, 81, 139),
        (71, 44, 122),
        (68, 1, 84),
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Black on light fills, white on dark ones (by relative luminance).
fn text_color(fill: RGBColor) -> RGBColor {
    let luminance = 0.2126 * fill.0 as f64 + 0.7152 * fill.1 as f64 + 0.0722 * fill.2 as f64;
    if luminance > 140.0 { BLACK } else { WHITE }
}

/// A cell's value: 2 decimals, 1 from 1000 up so that it still fits.
/// PPL as tables and figures print it: 2 decimals, 1 from 1000 up.
pub(super) fn fmt_ppl(ppl: f64) -> String {
    if ppl >= 1000.0 {
        format!("{ppl:.1}")
    } else {
        format!("{ppl:.2}")
    }
}

impl Render for Heatmap<'_> {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title, (FONT, TITLE_SIZE))?;
        let (width, _) = body.dim_in_pixel();
        let (grid_area, bar_area) = body.split_horizontally(width - BAR_WIDTH);
        self.draw_grid(&grid_area)?;
        self.draw_colour_bar(&bar_area)?;
        root.present()?;
        Ok(())
    }
}

impl Heatmap<'_> {
    fn draw_grid<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let (rows, columns) = (self.sinks.len(), self.windows.len());
        let centres = |n: usize| (0..n).map(|i| i as f64 + 0.5).collect::<Vec<_>>();
        // Row 0 (fewest sinks) is at the top: y runs up, so it spans rows-1 .. rows.
        let y_of = |row: usize| (rows - 1 - row) as f64;
        let mut chart = chart_builder(area, X_LABEL_AREA).build_cartesian_2d(
            ticked(0.0..columns as f64, centres(columns)),
            ticked(0.0..rows as f64, centres(rows)),
        )?;
        let column_label = |x: &f64| {
            self.windows
                .get(x.floor() as usize)
                .map_or(String::new(), |w| w.to_string())
        };
        let row_label = |y: &f64| {
            self.sinks
                .get((rows as f64 - y).floor() as usize)
                .map_or(String::new(), |s| s.to_string())
        };
        house_style(chart.configure_mesh().disable_mesh())
            .x_desc("window W")
            .y_desc("sinks S")
            .x_label_formatter(&column_label)
            .y_label_formatter(&row_label)
            .draw()?;

        let (plot_w, plot_h) = chart.plotting_area().dim_in_pixel();
        let (cell_w, cell_h) = (plot_w as f64 / columns as f64, plot_h as f64 / rows as f64);
        let longest = self
            .ppl
            .iter()
            .flatten()
            .flatten()
            .map(|p| fmt_ppl(*p).len())
            .max()
            .unwrap_or(1);
        // As large as fits the cell: digits are about 0.6 em wide.
        let font_size = (cell_h * 0.38)
            .min(cell_w * 0.85 / (0.6 * longest as f64))
            .clamp(9.0, 22.0);
        let centred = Pos::new(HPos::Center, VPos::Center);
        for (row, values) in self.ppl.iter().enumerate() {
            for (column, value) in values.iter().enumerate() {
                let (x, y) = (column as f64, y_of(row));
                let (fill, label) = match value {
                    Some(p) => (heat_color(heat_fraction(*p, self.best)), fmt_ppl(*p)),
                    None => (RGBColor(225, 225, 225), "–".to_string()),
                };
                let corners = [(x, y), (x + 1.0, y + 1.0)];
                chart.draw_series([
                    Rectangle::new(corners, fill.filled()),
                    // White gaps keep neighbouring cells of similar colour apart.
                    Rectangle::new(corners, WHITE.stroke_width(1)),
                ])?;
                let style = (FONT, font_size)
                    .into_font()
                    .color(&text_color(fill))
                    .pos(centred);
                chart.draw_series([Text::new(label, (x + 0.5, y + 0.5), style)])?;
            }
        }
        // Best cell: a thick black frame with a white line inside it, visible on any fill.
        let (x, y) = (self.best_at.1 as f64, y_of(self.best_at.0));
        let inset = |px: f64| (px / cell_w, px / cell_h);
        for (px, style) in [(2.0, BLACK.stroke_width(5)), (5.0, WHITE.stroke_width(2))] {
            let (dx, dy) = inset(px);
            chart.draw_series([Rectangle::new(
                [(x + dx, y + dy), (x + 1.0 - dx, y + 1.0 - dy)],
                style,
            )])?;
        }
        Ok(())
    }

    fn draw_colour_bar<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let (lo, hi) = (self.best, self.best * HEAT_CAP);
        let mut ticks = log_ticks(lo, hi);
        // The ends are the scale's meaning (best, cap): always labelled, as the cells are,
        // dropping round ticks that would crowd them.
        let near = |a: f64, b: f64| (a / b).ln().abs() < 0.08;
        ticks.retain(|&t| !near(t, lo) && !near(t, hi));
        let mut chart = ChartBuilder::on(area)
            .margin(MARGIN)
            .margin_left(70)
            .margin_right(8)
            .x_label_area_size(X_LABEL_AREA)
            .right_y_label_area_size(70)
            .build_cartesian_2d(
                0.0..1.0,
                (lo..hi)
                    .log_scale()
                    .with_key_points([vec![lo, hi], ticks].concat()),
            )?;
        let tick_label = |y: &f64| match near(*y, lo) || near(*y, hi) {
            true => fmt_ppl(*y),
            false => fmt_value(*y),
        };
        house_style(chart.configure_mesh().disable_mesh())
            .disable_x_axis()
            .y_label_formatter(&tick_label)
            .draw()?;
        const STEPS: usize = 120;
        let ratio = HEAT_CAP.powf(1.0 / STEPS as f64);
        chart.draw_series((0..STEPS).map(|i| {
            let y0 = lo * ratio.powi(i as i32);
            let colour = heat_color((i as f64 + 0.5) / STEPS as f64);
            Rectangle::new([(0.0, y0), (1.0, y0 * ratio)], colour.filled())
        }))?;
        chart.draw_series([Rectangle::new(
            [(0.0, lo), (1.0, hi)],
            BLACK.stroke_width(1),
        )])?;
        // Under the bar, in the x label area the bar does not use.
        let (bar_w, bar_h) = area.dim_in_pixel();
        let note = (FONT, 15)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let top = bar_h as i32 - X_LABEL_AREA as i32 - MARGIN as i32 + 8;
        for (i, line) in [
            "colour: PPL, log scale,",
            "capped at 4x best;",
            "framed: best cell",
        ]
        .iter()
        .enumerate()
        {
            area.draw(&Text::new(
                *line,
                (bar_w as i32 / 2, top + 17 * i as i32),
                note.clone(),
            ))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Latency (Figure 10)

/// Known methods in legend order, with the paper's names.
const METHODS: [(&str, &str); 3] = [
    ("recompute", "Sliding window w/ re-computation"),
    ("streaming", "StreamingLLM (token engine)"),
    ("block", "StreamingLLM (block engine)"),
];

/// The legend name of a method: the paper's for the known ones, else the method as given.
fn method_label(method: &str) -> &str {
    METHODS
        .iter()
        .find(|(m, _)| *m == method)
        .map_or(method, |(_, label)| label)
}

struct LatencySeries {
    label: String,
    /// (index of the cache size, ms per token), plottable only, by cache size.
    ms: Vec<(f64, f64)>,
    /// (index of the cache size, peak MiB), measured only, by cache size.
    mib: Vec<(f64, f64)>,
}

struct Latency<'a> {
    title: &'a str,
    caches: Vec<usize>,
    series: Vec<LatencySeries>,
}

impl<'a> Latency<'a> {
    fn new(points: &[LatencyPoint], title: &'a str) -> Self {
        let mut caches: Vec<usize> = points.iter().map(|p| p.cache).collect();
        caches.sort_unstable();
        caches.dedup();
        let mut methods: Vec<&str> = Vec::new();
        for p in points {
            if !methods.contains(&p.method.as_str()) {
                methods.push(&p.method);
            }
        }
        // Known methods first, in the paper's order; the rest as they came.
        let rank = |m: &str| {
            METHODS
                .iter()
                .position(|k| k.0 == m)
                .unwrap_or(METHODS.len())
        };
        methods.sort_by_key(|m| rank(m));
        let series = methods
            .into_iter()
            .map(|method| {
                let mut mine: Vec<&LatencyPoint> =
                    points.iter().filter(|p| p.method == method).collect();
                mine.sort_by_key(|p| p.cache);
                let x =
                    |p: &LatencyPoint| caches.binary_search(&p.cache).unwrap_or_default() as f64;
                LatencySeries {
                    label: method_label(method).to_string(),
                    ms: mine
                        .iter()
                        .filter(|p| plottable(p.ms_per_token))
                        .map(|p| (x(p), p.ms_per_token))
                        .collect(),
                    mib: mine
                        .iter()
                        .filter_map(|p| Some((x(p), p.peak_rss_mib.filter(|m| m.is_finite())?)))
                        .collect(),
                }
            })
            .collect();
        Latency {
            title,
            caches,
            series,
        }
    }
}

impl Render for Latency<'_> {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title, (FONT, TITLE_SIZE))?;
        let (width, _) = body.dim_in_pixel();
        let (panels, legend_area) = body.split_horizontally(width - LEGEND_WIDTH);
        let panels = panels.split_evenly((1, 2));
        self.draw_panel(&panels[0], Panel::Latency)?;
        self.draw_panel(&panels[1], Panel::Memory)?;
        let entries: Vec<LegendEntry> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| LegendEntry {
                label: s.label.clone(),
                color: PALETTE[i % PALETTE.len()].to_rgba(),
                dashed: false,
                marker: Some(i),
            })
            .collect();
        draw_legend(&legend_area, &entries)?;
        root.present()?;
        Ok(())
    }
}

impl Latency<'_> {
    /// The latency panel (log y) or the memory panel (linear y from 0).
    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        panel: Panel,
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let all = self
            .series
            .iter()
            .flat_map(|s| panel.points(s).iter().map(|p| p.1));
        // Cache sizes sit at 0, 1, 2, ...: even spacing whatever their ratios.
        let n = self.caches.len();
        let x_axis = || ticked(-0.5..n as f64 - 0.5, (0..n).map(|i| i as f64).collect());
        let mut builder = chart_builder(area, X_LABEL_AREA);
        builder.caption(panel.caption(), (FONT, 20));
        match panel {
            Panel::Latency => {
                let (lo, hi) = y_range(all);
                let y_axis = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
                let mut chart = builder.build_cartesian_2d(x_axis(), y_axis)?;
                self.draw_lines(&mut chart, panel)
            }
            Panel::Memory => {
                let hi = all.fold(0.0, f64::max) * 1.15;
                let mut chart = builder.build_cartesian_2d(x_axis(), 0.0..hi.max(1.0))?;
                self.draw_lines(&mut chart, panel)
            }
        }
    }

    /// Axes, then one line with markers per method, on either panel's chart.
    fn draw_lines<DB, X, Y>(
        &self,
        chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
        panel: Panel,
    ) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
        X: Ranged<ValueType = f64> + ValueFormatter<f64>,
        Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let cache_label = |x: &f64| {
            let i = x.round();
            match (i - x).abs() < 1e-6 {
                true => self
                    .caches
                    .get(i as usize)
                    .map_or(String::new(), |c| c.to_string()),
                false => String::new(),
            }
        };
        house_style(&mut chart.configure_mesh())
            .x_desc("cache size (tokens)")
            .y_desc(panel.y_desc())
            .x_label_formatter(&cache_label)
            .y_label_formatter(&|y| fmt_value(*y))
            .draw()?;
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()].to_rgba();
            let points = panel.points(s).iter().copied();
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            draw_markers(chart.plotting_area(), points, i, color)?;
        }
        if self.series.iter().all(|s| panel.points(s).is_empty()) {
            no_data(chart, panel.empty_note())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Panel {
    Latency,
    Memory,
}

impl Panel {
    fn caption(self) -> &'static str {
        match self {
            Panel::Latency => "Latency",
            Panel::Memory => "Memory",
        }
    }

    fn y_desc(self) -> &'static str {
        match self {
            Panel::Latency => "ms per token (log)",
            Panel::Memory => "peak memory (MiB)",
        }
    }

    fn empty_note(self) -> &'static str {
        match self {
            Panel::Latency => "no latency measurements",
            Panel::Memory => "no memory measurements",
        }
    }

    fn points(self, s: &LatencySeries) -> &[(f64, f64)] {
        match self {
            Panel::Latency => &s.ms,
            Panel::Memory => &s.mib,
        }
    }
}

/// A chart with the report's margins and label room, so that panels line up.
pub(super) fn chart_builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    x_label_area: u32,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(MARGIN)
        .x_label_area_size(x_label_area)
        .y_label_area_size(Y_LABEL_AREA);
    builder
}

/// A linear axis with ticks at exactly `ticks`, for categories placed at evenly spaced values.
/// The partial axis (spanning the whole range) only makes plotters accept a label formatter:
/// it has none of its own for a linear axis with given key points.
fn ticked(
    range: Range<f64>,
    ticks: Vec<f64>,
) -> impl Ranged<ValueType = f64, FormatOption = DefaultFormatting> {
    let whole = range.clone();
    range.with_key_points(ticks).partial_axis(whole)
}

/// A note in the middle of an empty chart, so that a blank panel is not mistaken for a bug.
fn no_data<DB: DrawingBackend, CT: CoordTranslate>(
    chart: &ChartContext<DB, CT>,
    note: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let area = chart.plotting_area().strip_coord_spec();
    let (w, h) = area.dim_in_pixel();
    let style = (FONT, 20)
        .into_font()
        .color(&BLACK.mix(0.6))
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(note, (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Long stream (Figure 5)

/// Past this many book boundaries the lines are solid and faint: dense dashes would grey out the
/// plot in a moiré of dots.
const MANY_BOUNDARIES: usize = 60;

struct LongStream<'a> {
    title: &'a str,
    window: usize,
    /// (scored tokens, PPL), downsampled.
    running: Vec<(f64, f64)>,
    windowed: Vec<(f64, f64)>,
    /// x of each change of book.
    boundaries: Vec<f64>,
    /// (tokens scored, resident MiB), downsampled.
    memory: Vec<(f64, f64)>,
    x_max: f64,
}

impl<'a> LongStream<'a> {
    fn new(log: &NllLog, memory: &[MemorySample], window: usize, title: &'a str) -> Self {
        let running = downsample_by_position(log, &log.running_ppl());
        let windowed = downsample_by_position(log, &log.windowed_ppl(window));
        // Half a token before the first token of the new book.
        let boundaries = log
            .records
            .windows(2)
            .filter(|w| w[0].book != w[1].book)
            .map(|w| (w[1].position + 1) as f64 - 0.5)
            .collect();
        let rss: Vec<f64> = memory.iter().map(|m| m.rss_mib).collect();
        let samples: Vec<(f64, f64)> = downsample(&rss, MAX_POINTS)
            .into_iter()
            .map(|(i, mib)| (memory[i as usize - 1].tokens as f64, mib))
            .collect();
        let x_max = x_max(
            log.records
                .last()
                .map(|r| (r.position + 1) as f64)
                .into_iter()
                .chain(samples.iter().map(|m| m.0)),
        );
        LongStream {
            title,
            window,
            running,
            windowed,
            boundaries,
            memory: samples,
            x_max,
        }
    }
}

impl Render for LongStream<'_> {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title, (FONT, TITLE_SIZE))?;
        let (width, height) = body.dim_in_pixel();
        let (panels, legend_area) = body.split_horizontally(width - LEGEND_WIDTH);
        let (top, bottom) = panels.split_vertically(height * 62 / 100);
        self.draw_ppl(&top)?;
        self.draw_memory(&bottom)?;
        let mut entries = vec![
            LegendEntry {
                label: "running PPL".to_string(),
                color: PALETTE[0].to_rgba(),
                dashed: false,
                marker: None,
            },
            LegendEntry {
                label: format!("PPL over the last {} tokens", self.window),
                color: PALETTE[1].to_rgba(),
                dashed: false,
                marker: None,
            },
        ];
        if !self.boundaries.is_empty() {
            entries.push(LegendEntry {
                label: format!("book boundary ({})", self.boundaries.len()),
                color: self.boundary_color(),
                dashed: !self.many_boundaries(),
                marker: None,
            });
        }
        draw_legend(&legend_area, &entries)?;
        root.present()?;
        Ok(())
    }
}

impl LongStream<'_> {
    fn many_boundaries(&self) -> bool {
        self.boundaries.len() > MANY_BOUNDARIES
    }

    fn boundary_color(&self) -> RGBAColor {
        let alpha = match self.many_boundaries() {
            true => 0.2,
            false => 0.6,
        };
        RGBColor(110, 110, 110).mix(alpha)
    }

    fn draw_ppl<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let (lo, hi) = settled_y_range(self.running.iter().chain(&self.windowed), self.x_max);
        // The x axis is the memory panel's, described there only: tick labels need less room.
        let mut chart = chart_builder(area, X_LABEL_AREA / 2).build_cartesian_2d(
            0.0..self.x_max,
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )?;
        house_style(&mut chart.configure_mesh())
            .y_desc("PPL (log)")
            .x_label_formatter(&|x| fmt_tokens(*x))
            .y_label_formatter(&|y| fmt_value(*y))
            .draw()?;
        let boundary = self.boundary_color().stroke_width(1);
        for &x in &self.boundaries {
            let line = [(x, lo), (x, hi)];
            if self.many_boundaries() {
                chart.draw_series(LineSeries::new(line, boundary))?;
            } else {
                chart.draw_series(DashedLineSeries::new(line, DASH.1, DASH.1, boundary))?;
            }
        }
        // The windowed PPL swings more: drawn first and thinner, so the running PPL stays
        // visible on top of it.
        chart.draw_series(LineSeries::new(
            self.windowed.iter().copied(),
            PALETTE[1].stroke_width(1),
        ))?;
        chart.draw_series(LineSeries::new(
            self.running.iter().copied(),
            PALETTE[0].stroke_width(2),
        ))?;
        Ok(())
    }

    fn draw_memory<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        // From 0, so that a flat line reads as flat rather than as zoomed-in noise.
        let hi = self.memory.iter().map(|m| m.1).fold(0.0, f64::max) * 1.15;
        let mut chart = chart_builder(area, X_LABEL_AREA)
            .build_cartesian_2d(0.0..self.x_max, 0.0..hi.max(1.0))?;
        // A short panel: few y labels, none when there is nothing to read them against.
        house_style(&mut chart.configure_mesh())
            .y_labels(if self.memory.is_empty() { 0 } else { 6 })
            .x_desc("tokens scored")
            .y_desc("resident memory (MiB)")
            .x_label_formatter(&|x| fmt_tokens(*x))
            .y_label_formatter(&|y| fmt_value(*y))
            .draw()?;
        if self.memory.is_empty() {
            return no_data(&chart, "no memory samples");
        }
        chart.draw_series(LineSeries::new(
            self.memory.iter().copied(),
            PALETTE[2].stroke_width(2),
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nll_log::NllRecord;
    use crate::report::tests::Scratch;

    /// Reads back the PNG and the SVG, checks they are real, and returns the SVG's text.
    fn written(out: &Path) -> String {
        let png = std::fs::read(out).expect("read png");
        assert!(png.len() > 5000, "png only {} bytes", png.len());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(out.with_extension("svg")).expect("read svg");
        assert!(svg.len() > 5000, "svg only {} bytes", svg.len());
        svg
    }

    fn sweep() -> Vec<HeatmapCell> {
        let mut cells = Vec::new();
        for sinks in [0, 1, 2, 4, 8] {
            for window in [256, 512, 1020, 2044] {
                // (0, 2044) missing, (8, 256) diverged, best at (4, 2044).
                if (sinks, window) == (0, 2044) {
                    continue;
                }
                let ppl = match (sinks, window) {
                    (8, 256) => 1234.56,
                    (0, w) => 400.0 - w as f64 / 10.0,
                    (s, w) => 9.0 + 40.0 / s as f64 + 4000.0 / w as f64,
                };
                cells.push(HeatmapCell { sinks, window, ppl });
            }
        }
        cells
    }

    #[test]
    fn heatmap_writes_png_and_svg_with_values_and_labels() {
        let scratch = Scratch::new("heatmap");
        let out = scratch.0.join("figs/heatmap.png");
        plot_heatmap(&sweep(), &out, "Sink x window sweep").expect("heatmap");
        let svg = written(&out);
        let best = 9.0 + 40.0 / 8.0 + 4000.0 / 2044.0;
        for text in [
            fmt_ppl(best).as_str(),
            "1234.6",
            "2044",
            "\n8\n</text>",
            "window W",
            "sinks S",
            "capped at 4x best",
            "Sink x window sweep",
            "–",
        ] {
            assert!(svg.contains(text), "svg lacks {text}");
        }
    }

    #[test]
    fn heatmap_single_cell_and_errors() {
        let scratch = Scratch::new("heatmap-err");
        let one = [HeatmapCell {
            sinks: 4,
            window: 1020,
            ppl: 8.5,
        }];
        plot_heatmap(&one, &scratch.0.join("one.png"), "one").expect("single cell");
        let err = plot_heatmap(&[], &scratch.0.join("h.png"), "t").expect_err("empty");
        assert_eq!(err.to_string(), "no cells to plot");
        let err = plot_heatmap(&one, &scratch.0.join("h.svg"), "t").expect_err("not png");
        assert!(err.to_string().contains(".png"), "{err}");
        let diverged = [HeatmapCell {
            ppl: f64::INFINITY,
            ..one[0]
        }];
        assert!(plot_heatmap(&diverged, &scratch.0.join("d.png"), "t").is_err());
    }

    #[test]
    fn heat_colours_clamp_at_the_cap() {
        assert_eq!(heat_fraction(10.0, 10.0), 0.0);
        assert!((heat_fraction(20.0, 10.0) - 0.5).abs() < 1e-12);
        assert_eq!(heat_fraction(40.0, 10.0), 1.0);
        assert_eq!(heat_fraction(4000.0, 10.0), 1.0);
        assert_eq!(heat_fraction(f64::NAN, 10.0), 1.0);
        assert_eq!(heat_color(1.0), heat_color(7.0));
        assert_eq!(heat_color(0.0), RGBColor(253, 231, 37));
        assert_eq!(text_color(heat_color(0.0)), BLACK);
        assert_eq!(text_color(heat_color(1.0)), WHITE);
        assert_eq!(fmt_ppl(8.456), "8.46");
        assert_eq!(fmt_ppl(1234.56), "1234.6");
    }

    fn latency_points() -> Vec<LatencyPoint> {
        let mut points = Vec::new();
        for (i, cache) in [256, 512, 1024, 2048, 4096].into_iter().enumerate() {
            for (method, ms) in [
                ("block", 20.0),
                ("recompute", 30.0 * 2f64.powi(i as i32)),
                ("streaming", 25.0),
                ("mystery", 40.0),
            ] {
                points.push(LatencyPoint {
                    method: method.to_string(),
                    cache,
                    ms_per_token: ms + i as f64,
                    tokens: 100,
                    peak_rss_mib: match method {
                        "recompute" => Some(560.0 + 60.0 * i as f64),
                        "streaming" => Some(520.0 + 40.0 * i as f64),
                        "block" => Some(520.0 + 30.0 * i as f64),
                        _ => None,
                    },
                });
            }
        }
        points
    }

    #[test]
    fn latency_writes_png_and_svg_with_legend() {
        let scratch = Scratch::new("latency");
        let out = scratch.0.join("latency.png");
        plot_latency(&latency_points(), &out, "Per-token latency").expect("latency");
        let svg = written(&out);
        // The legend wraps long names onto lines of at most 24 characters.
        for text in [
            "Sliding window w/",
            "re-computation",
            "StreamingLLM (token",
            "mystery",
            "4096",
            "ms per token (log)",
            "peak memory (MiB)",
        ] {
            assert!(svg.contains(text), "svg lacks {text}");
        }
        assert!(plot_latency(&[], &scratch.0.join("e.png"), "t").is_err());
        assert!(plot_latency(&latency_points(), &scratch.0.join("l.jpg"), "t").is_err());
    }

    #[test]
    fn latency_orders_and_names_methods() {
        let latency = Latency::new(&latency_points(), "t");
        let labels: Vec<&str> = latency.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "Sliding window w/ re-computation",
                "StreamingLLM (token engine)",
                "StreamingLLM (block engine)",
                "mystery"
            ]
        );
        assert_eq!(latency.caches, [256, 512, 1024, 2048, 4096]);
        assert!(latency.series[3].mib.is_empty());
        assert_eq!(latency.series[0].ms[4], (4.0, 30.0 * 16.0 + 4.0));
    }

    /// Four books of 5000 tokens, NLL drifting within each; memory flat after a ramp.
    fn long_log() -> (NllLog, Vec<MemorySample>) {
        let mut log = NllLog::default();
        for i in 0..20_000u64 {
            log.push(NllRecord {
                position: i,
                book: (i / 5000) as u32,
                token_id: 0,
                nll: 2.0 + ((i % 5000) as f32 / 5000.0) + ((i * 7919) % 13) as f32 / 13.0,
            });
        }
        let memory = (0..=200u64)
            .map(|k| MemorySample {
                seconds: k as f64,
                tokens: k * 100,
                rss_mib: 700.0 + (k.min(10) * 10) as f64,
            })
            .collect();
        (log, memory)
    }

    #[test]
    fn long_stream_writes_png_and_svg() {
        let scratch = Scratch::new("long");
        let (log, memory) = long_log();
        let out = scratch.0.join("long.png");
        plot_long_stream(&log, &memory, 1024, &out, "Long stream, 20k tokens").expect("plot");
        let svg = written(&out);
        for text in [
            "Long stream, 20k tokens",
            "running PPL",
            "book boundary (3)",
            "resident memory (MiB)",
        ] {
            assert!(svg.contains(text), "svg lacks {text}");
        }
        let long = LongStream::new(&log, &memory, 1024, "t");
        assert_eq!(long.boundaries, [5000.5, 10000.5, 15000.5]);
        assert!(long.running.len() <= MAX_POINTS + 1);
        assert_eq!(long.x_max, 20_000.0);
    }

    #[test]
    fn long_stream_without_memory_or_tokens() {
        let scratch = Scratch::new("long-empty");
        let (log, _) = long_log();
        let out = scratch.0.join("no-memory.png");
        plot_long_stream(&log, &[], 512, &out, "t").expect("no memory");
        assert!(written(&out).contains("no memory samples"));
        plot_long_stream(&NllLog::default(), &[], 512, &scratch.0.join("e.png"), "t")
            .expect("empty log");
        assert!(plot_long_stream(&log, &[], 0, &scratch.0.join("w.png"), "t").is_err());
        assert!(plot_long_stream(&log, &[], 8, &scratch.0.join("w.svg"), "t").is_err());
    }

    #[test]
    fn long_stream_with_many_books_draws_every_boundary() {
        let scratch = Scratch::new("long-books");
        let mut log = NllLog::default();
        for i in 0..30_000u64 {
            log.push(NllRecord {
                position: i,
                book: (i / 200) as u32,
                token_id: 0,
                nll: 2.5,
            });
        }
        let long = LongStream::new(&log, &[], 4096, "t");
        assert_eq!(long.boundaries.len(), 149);
        assert!(long.many_boundaries());
        // A constant NLL gives a constant windowed (and running) PPL of exp(NLL).
        let flat = |points: &[(f64, f64)]| points.iter().all(|p| (p.1 - 2.5f64.exp()).abs() < 1e-9);
        assert!(flat(&long.windowed) && flat(&long.running));
        let out = scratch.0.join("books.png");
        plot_long_stream(&log, &[], 4096, &out, "150 books").expect("plot");
        assert!(written(&out).contains("book boundary (149)"));
    }
}
