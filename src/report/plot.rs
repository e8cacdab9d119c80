//! Running-PPL plot over runs, in the style of Figure 3 of the StreamingLLM paper.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::coord::ranged1d::Ranged;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Run;
use crate::nll_log::NllLog;
use crate::records::write_aside;

const SIZE: (u32, u32) = (1200, 640);
/// Right-hand panel for the legend, so it never hides a curve.
const LEGEND_WIDTH: u32 = 300;
pub(super) const FONT: &str = "sans-serif";
/// Points kept per line: a few per pixel column of the chart, far fewer than a long log holds.
pub(super) const MAX_POINTS: usize = 4000;
/// Tableau 10: distinct hues that stay apart in print and for common colour-vision deficiencies.
pub(super) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Dash and gap length, in pixels, of approximate runs.
pub(super) const DASH: (u32, u32) = (10, 6);

/// One line of the plot.
struct Series {
    label: String,
    approximate: bool,
    /// (scored tokens, running PPL), finite and positive only.
    points: Vec<(f64, f64)>,
}

/// Everything the drawing needs, computed once for both backends.
struct Figure<'a> {
    title: &'a str,
    series: Vec<Series>,
    x_max: f64,
    y_range: (f64, f64),
    y_ticks: Vec<f64>,
    /// Distinct trained contexts that fall inside the x range.
    trained_contexts: Vec<f64>,
}

/// Running PPL (log-scale y) against scored tokens (x), one line per run, legend = label.
/// Writes `out` (PNG) and the same plot as SVG beside it (`out.with_extension("svg")`).
/// Approximate runs are dashed and marked "(approx.)" in the legend. Long logs are downsampled
/// to a few thousand points per line, each at its exact running value. A dashed vertical line
/// marks the model's trained context when the x range passes it.
pub fn plot_running_ppl(runs: &[Run], out: &Path, title: &str) -> Result<()> {
    check_png(out)?;
    let series = runs.iter().map(load_series).collect::<Result<Vec<_>>>()?;
    let figure = Figure::new(runs, series, title);
    write_png_and_svg(out, SIZE, &figure)
}

/// Checked before any work, so a wrong name fails fast with one line.
pub(super) fn check_png(out: &Path) -> Result<()> {
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        bail!(
            "{}: plot output must be a .png file (the .svg is written beside it)",
            out.display()
        );
    }
    Ok(())
}

/// A figure that can draw itself on any backend, so one drawing code makes both PNG and SVG.
pub(super) trait Render {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Writes `out` (PNG) and the same figure as SVG beside it, creating the directory if needed.
pub(super) fn write_png_and_svg(out: &Path, size: (u32, u32), figure: &impl Render) -> Result<()> {
    register_font()?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    // Drawn aside and renamed in, like every record (two runs of one sweep draw one heatmap).
    write_aside(out, |png| {
        figure
            .render(BitMapBackend::new(png, size).into_drawing_area())
            .with_context(|| format!("{}: cannot draw plot", out.display()))
    })?;
    let svg = out.with_extension("svg");
    write_aside(&svg, |tmp| {
        figure
            .render(SVGBackend::new(tmp, size).into_drawing_area())
            .with_context(|| format!("{}: cannot draw plot", svg.display()))
    })
}

/// The ab_glyph backend ships no fonts: text needs one registered under the family name used.
fn register_font() -> Result<()> {
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("cannot load the bundled DejaVu Sans font"))
}

fn load_series(run: &Run) -> Result<Series> {
    let path = run.dir.join("nll.parquet");
    if !path.is_file() {
        bail!("{}: missing NLL log", path.display());
    }
    let log = NllLog::read_parquet(&path)?;
    let label = if run.record.approximate {
        format!("{} (approx.)", run.record.label)
    } else {
        run.record.label.clone()
    };
    Ok(Series {
        label,
        approximate: run.record.approximate,
        points: downsample_by_position(&log, &log.running_ppl()),
    })
}

/// `values` (one per record of `log`) downsampled, as (stream position, 1-based, value): a
/// sampled run (every k-th token scored) then sits on the same axis as a full one.
pub(super) fn downsample_by_position(log: &NllLog, values: &[f64]) -> Vec<(f64, f64)> {
    downsample(values, MAX_POINTS)
        .into_iter()
        .map(|(i, y)| ((log.records[i as usize - 1].position + 1) as f64, y))
        .collect()
}

/// A log axis can only place finite, positive values.
pub(super) fn plottable(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// Keeps at most about `max_points` of `values` as (scored tokens, value): the minimum and the
/// maximum of each bucket, so spikes survive, plus the final value, which readers compare.
/// Kept values are exact, never averaged. Unplottable values are dropped.
pub(super) fn downsample(values: &[f64], max_points: usize) -> Vec<(f64, f64)> {
    let point = |i: usize| ((i + 1) as f64, values[i]);
    let keep = |i: &usize| plottable(values[*i]);
    if values.len() <= max_points {
        return (0..values.len()).filter(keep).map(point).collect();
    }
    let bucket = values.len().div_ceil((max_points / 2).max(1));
    let mut kept = Vec::with_capacity(max_points + 1);
    for start in (0..values.len()).step_by(bucket) {
        let in_bucket = (start..(start + bucket).min(values.len())).filter(keep);
        let by_value = |a: &usize, b: &usize| values[*a].total_cmp(&values[*b]);
        let (Some(lo), Some(hi)) = (
            in_bucket.clone().min_by(by_value),
            in_bucket.max_by(by_value),
        ) else {
            continue;
        };
        kept.push(lo.min(hi));
        if lo != hi {
            kept.push(lo.max(hi));
        }
    }
    if let Some(last) = (0..values.len()).rev().find(keep)
        && kept.last() != Some(&last)
    {
        kept.push(last);
    }
    kept.into_iter().map(point).collect()
}

impl<'a> Figure<'a> {
    fn new(runs: &[Run], series: Vec<Series>, title: &'a str) -> Self {
        let x_max = x_max(series.iter().filter_map(|s| s.points.last()).map(|p| p.0));
        let y_range = settled_y_range(series.iter().flat_map(|s| s.points.iter()), x_max);
        let mut trained_contexts: Vec<f64> = runs
            .iter()
            .map(|r| r.record.model.trained_context as f64)
            .filter(|&c| c > 0.0 && c < x_max)
            .collect();
        trained_contexts.sort_by(f64::total_cmp);
        trained_contexts.dedup();
        Figure {
            title,
            series,
            x_max,
            y_range,
            y_ticks: log_ticks(y_range.0, y_range.1),
            trained_contexts,
        }
    }
}

/// The largest x, but at least 10 tokens, so that a tiny or empty plot still gets whole-token
/// ticks.
pub(super) fn x_max(xs: impl Iterator<Item = f64>) -> f64 {
    xs.fold(10.0, f64::max)
}

/// The y-range of PPL curves over `0..x_max`. The first tokens of a stream have a huge PPL
/// (little context, few samples); letting them set the range would flatten every difference
/// that matters, so lines start off the top of the chart instead.
pub(super) fn settled_y_range<'p>(
    points: impl Iterator<Item = &'p (f64, f64)> + Clone,
    x_max: f64,
) -> (f64, f64) {
    let warm_up = (x_max * 0.02).min(256.0);
    let mut settled = points.clone().filter(|p| p.0 >= warm_up).peekable();
    match settled.peek().is_some() {
        true => y_range(settled.map(|p| p.1)),
        false => y_range(points.map(|p| p.1)),
    }
}

/// The data's extent, padded a little in log space so lines do not touch the frame; a flat or
/// single-point extent is widened since a log axis needs lo < hi; no data gives 1..10.
pub(super) fn y_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (1.0, 10.0);
    }
    let pad = (hi / lo).powf(0.04).max(1.25f64.sqrt());
    (lo / pad, hi * pad)
}

/// Ticks at 1-2-5 style mantissas per decade, the coarsest set that gives at least four ticks;
/// a range too narrow for any (well under one decade) gets evenly spaced ticks instead.
pub(super) fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const MANTISSAS: [&[f64]; 4] = [
        &[1.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0],
        &[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ];
    // Clamped so that a degenerate bound cannot make the loop below run for billions of decades.
    let decade = |v: f64| v.log10().clamp(-300.0, 300.0);
    let decades = decade(lo).floor() as i32..=decade(hi).ceil() as i32;
    for mantissas in MANTISSAS {
        let ticks: Vec<f64> = decades
            .clone()
            .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|t| (lo..=hi).contains(t))
            .collect();
        if ticks.len() >= 4 {
            return ticks;
        }
    }
    linear_ticks(lo, hi)
}

/// Five or so ticks at a 1-2-5 step; just the bounds if the range is empty.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    if !raw.is_finite() || raw <= 0.0 {
        return vec![lo, hi];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(raw);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last)
        .map(|k| k as f64 * step)
        .filter(|t| (lo..=hi).contains(t))
        .collect()
}

/// A tick value without float noise or trailing zeros: 15, 1.5, 0.3.
pub(super) fn fmt_value(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Token counts as 500, 12.5k, 1.5M.
pub(super) fn fmt_tokens(x: f64) -> String {
    match x.abs() {
        a if a >= 1e6 => format!("{}M", fmt_value((x / 1e4).round() / 1e2)),
        a if a >= 1e3 => format!("{}k", fmt_value((x / 1e2).round() / 10.0)),
        _ => fmt_value(x),
    }
}

impl Render for Figure<'_> {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (chart_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        draw_chart(&chart_area, self)?;
        let entries: Vec<LegendEntry> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| LegendEntry {
                label: s.label.clone(),
                color: PALETTE[i % PALETTE.len()].to_rgba(),
                dashed: s.approximate,
                marker: None,
            })
            .collect();
        draw_legend(&legend_area, &entries)?;
        root.present()?;
        Ok(())
    }
}

/// The mesh look shared by every chart of the report: font sizes and faint grid lines.
pub(super) fn house_style<'m, 'a, 'b, X: Ranged, Y: Ranged, DB: DrawingBackend>(
    mesh: &'m mut MeshStyle<'a, 'b, X, Y, DB>,
) -> &'m mut MeshStyle<'a, 'b, X, Y, DB> {
    mesh.label_style((FONT, 17))
        .axis_desc_style((FONT, 19))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
}

fn draw_chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, fig: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (y_lo, y_hi) = fig.y_range;
    let mut chart = ChartBuilder::on(area)
        .caption(fig.title, (FONT, 26))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0.0..fig.x_max,
            (y_lo..y_hi)
                .log_scale()
                .with_key_points(fig.y_ticks.clone()),
        )?;
    house_style(&mut chart.configure_mesh())
        .x_desc("tokens")
        .y_desc("running PPL (log)")
        .x_label_formatter(&|x| fmt_tokens(*x))
        .y_label_formatter(&|y| fmt_value(*y))
        .draw()?;
    for &x in &fig.trained_contexts {
        let style = BLACK.mix(0.55).stroke_width(2);
        chart.draw_series(DashedLineSeries::new([(x, y_lo), (x, y_hi)], 6, 6, style))?;
        let label = Text::new(
            "trained context",
            (6, 6),
            (FONT, 16).into_font().color(&BLACK.mix(0.7)),
        );
        chart.draw_series(std::iter::once(EmptyElement::at((x, y_hi)) + label))?;
    }
    for (i, s) in fig.series.iter().enumerate() {
        let style = PALETTE[i % PALETTE.len()].stroke_width(2);
        let points = s.points.iter().copied();
        if s.approximate {
            chart.draw_series(DashedLineSeries::new(points, DASH.0, DASH.1, style))?;
        } else {
            chart.draw_series(LineSeries::new(points, style))?;
        }
    }
    Ok(())
}

/// Characters per legend line at the legend's font size and width.
pub(super) const LEGEND_CHARS: usize = 24;

/// Splits `text` on spaces into lines of at most `width` characters (a longer word stays whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// One row of a legend drawn beside a chart.
pub(super) struct LegendEntry {
    pub(super) label: String,
    pub(super) color: RGBAColor,
    pub(super) dashed: bool,
    /// The shape (see `draw_markers`) on the sample, for lines drawn with point markers.
    pub(super) marker: Option<usize>,
}

/// Draws a marker of shape `shape` (circle, square, triangle, cross, cycling) at each point.
/// Shapes as well as colours tell series apart where their points coincide or print is grey.
pub(super) fn draw_markers<DB: DrawingBackend, CT: CoordTranslate>(
    area: &DrawingArea<DB, CT>,
    points: impl IntoIterator<Item = CT::From>,
    shape: usize,
    color: RGBAColor,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let fill = color.filled();
    for p in points {
        match shape % 4 {
            0 => area.draw(&Circle::new(p, 5, fill))?,
            1 => area.draw(&(EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], fill)))?,
            2 => area.draw(&TriangleMarker::new(p, 6, fill))?,
            _ => area.draw(&Cross::new(p, 5, color.stroke_width(2)))?,
        }
    }
    Ok(())
}

/// One row per entry: a stroke sample in the entry's colour and dash, then its label.
pub(super) fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    const TOP: i32 = 70;
    const ROW: i32 = 30;
    const SAMPLE: i32 = 36;
    let text_style = (FONT, 17)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let mut y = TOP;
    for s in entries {
        let style = s.color.stroke_width(3);
        let sample = [(8, y), (8 + SAMPLE, y)];
        if s.dashed {
            area.draw(&DashedPathElement::new(sample, DASH.0, DASH.1 / 2, style))?;
        } else {
            area.draw(&PathElement::new(sample, style))?;
        }
        if let Some(shape) = s.marker {
            draw_markers(area, [(8 + SAMPLE / 2, y)], shape, s.color)?;
        }
        // Long labels wrap so the legend never cuts them off.
        for (l, line) in wrap(&s.label, LEGEND_CHARS).iter().enumerate() {
            let line_y = y + l as i32 * (ROW - 8);
            area.draw(&Text::new(
                line.as_str(),
                (SAMPLE + 16, line_y),
                text_style.clone(),
            ))?;
        }
        y += ROW + (wrap(&s.label, LEGEND_CHARS).len() as i32 - 1) * (ROW - 8);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{Scratch, fake_runs};

    #[test]
    fn writes_png_and_svg_with_labels() {
        let (scratch, runs) = fake_runs("plot");
        let out = scratch.0.join("plots/running_ppl.png");
        plot_running_ppl(&runs, &out, "Fake runs").expect("plot");
        let png = std::fs::read(&out).expect("read png");
        assert!(png.len() > 1000);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(out.with_extension("svg")).expect("read svg");
        for label in [
            "Dense",
            "Window 256",
            "Recompute 256/64 (approx.)",
            "trained context",
            "Fake runs",
        ] {
            // Legend labels may wrap onto several lines.
            for line in wrap(label, LEGEND_CHARS) {
                assert!(svg.contains(&line), "svg lacks {line}");
            }
        }
    }

    #[test]
    fn missing_nll_log_is_an_error_naming_it() {
        let (scratch, runs) = fake_runs("plot-missing");
        let log = runs[0].dir.join("nll.parquet");
        std::fs::remove_file(&log).expect("remove log");
        let err = plot_running_ppl(&runs, &scratch.0.join("p.png"), "t").expect_err("missing log");
        assert!(
            err.to_string().contains(&log.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn non_png_output_is_an_error() {
        let scratch = Scratch::new("plot-ext");
        assert!(plot_running_ppl(&[], &scratch.0.join("p.svg"), "t").is_err());
    }

    #[test]
    fn empty_plot_still_draws() {
        let scratch = Scratch::new("plot-empty");
        plot_running_ppl(&[], &scratch.0.join("p.png"), "nothing").expect("empty plot");
    }

    #[test]
    fn downsample_keeps_exact_extremes_and_last() {
        let values: Vec<f64> = (0..100_000).map(|i| 10.0 + (i % 997) as f64).collect();
        let kept = downsample(&values, 1000);
        assert!(kept.len() <= 1001, "{}", kept.len());
        assert!(kept.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(kept.iter().all(|&(x, y)| values[x as usize - 1] == y));
        assert_eq!(kept.last(), Some(&(100_000.0, values[99_999])));
        assert!(kept.iter().any(|p| p.1 == 10.0 + 996.0));
    }

    #[test]
    fn downsample_drops_unplottable_values() {
        let kept = downsample(&[2.0, f64::NAN, f64::INFINITY, 3.0], 10);
        assert_eq!(kept, [(1.0, 2.0), (4.0, 3.0)]);
    }

    #[test]
    fn legend_labels_wrap_on_spaces() {
        assert_eq!(
            wrap("Sliding window w/ re-computation 256", 24),
            ["Sliding window w/", "re-computation 256"]
        );
        assert_eq!(wrap("Dense", 24), ["Dense"]);
    }

    #[test]
    fn y_range_guards_degenerate_data() {
        assert_eq!(y_range(std::iter::empty()), (1.0, 10.0));
        let (lo, hi) = y_range(std::iter::once(7.0));
        assert!(lo < 7.0 && 7.0 < hi);
    }

    #[test]
    fn log_ticks_cover_wide_and_narrow_ranges() {
        assert_eq!(
            log_ticks(0.9, 11_000.0),
            [1.0, 10.0, 100.0, 1000.0, 10_000.0]
        );
        assert_eq!(log_ticks(4.0, 60.0), [5.0, 10.0, 20.0, 50.0]);
        let narrow = log_ticks(9.8, 10.4);
        assert!(
            narrow.len() >= 3 && narrow.iter().all(|t| (9.8..=10.4).contains(t)),
            "{narrow:?}"
        );
        assert_eq!(fmt_value(0.1 * 3.0), "0.3");
        assert_eq!(fmt_tokens(12_500.0), "12.5k");
        assert_eq!(fmt_tokens(2_000_000.0), "2M");
        assert_eq!(fmt_tokens(500.0), "500");
    }
}
