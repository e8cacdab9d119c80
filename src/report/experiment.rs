//! An experiment's table, figures and reading, regenerated from `experiment.json` and its run
//! folders; and `REPRODUCTION.md`, which gathers every experiment of a results folder.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::chat::{ChatRun, health_reading, health_table};
use super::figures::fmt_ppl;
use super::table::cell;
use super::{Run, plot_generation, plot_latency, plot_long_stream, render_sweep};
use crate::eval::numerics_epoch;
use crate::experiment::{Kind, Plot, Scale};
use crate::nll_log::NllLog;
use crate::records::experiment::{EXPERIMENT_JSON, ExperimentRecord};
use crate::records::generation::GenerationRecord;
use crate::records::latency::LatencyPoint;
use crate::records::memory::read_csv;
use crate::records::run::RunRecord;
use crate::records::sweep::SWEEP_JSON;
use crate::strategy::Strategy;
use anyhow::{Context, Result};

/// A run of an experiment with its log.
struct LoadedRun {
    id: String,
    run: Run,
    log: NllLog,
}

/// Trailing window (scored tokens) of the windowed PPL in departures and long-stream plots.
pub const PPL_WINDOW: usize = 1024;
/// A curve departs from the reference where its windowed PPL is this much higher.
const DEPARTURE_RATIO: f64 = 1.2;

/// Writes `table.md` and the figures of the experiment in `dir`; returns the markdown section
/// for REPRODUCTION.md (heading, table, figures, reading) with paths relative to `dir`.
pub fn render_experiment(dir: &Path) -> Result<String> {
    let rec = ExperimentRecord::read(dir)?;
    let exp = &rec.experiment;
    let mut figures = Vec::new();
    if exp.kind == Kind::Runs && !logs_present(dir, &rec) {
        return saved_section(dir, &rec);
    }
    let (table, reading) = match exp.kind {
        Kind::Runs => {
            let runs = load(dir, &rec)?;
            for plot in &exp.plots {
                figures.extend(draw(dir, &rec, *plot, &runs)?);
            }
            (runs_table(&rec, &runs), runs_reading(&rec, &runs))
        }
        Kind::Latency => {
            if exp.plots.contains(&Plot::Latency) && !rec.latency.is_empty() {
                let png = dir.join("latency.png");
                plot_latency(&rec.latency, &png, &exp.title)?;
                figures.push("latency.png".to_string());
            }
            (latency_table(&rec), latency_reading(&rec))
        }
        Kind::Chat => {
            let runs = (rec.runs.iter())
                .map(|e| ChatRun::load(&e.id, &dir.join(&e.dir)))
                .collect::<Result<Vec<_>>>()?;
            let logs: Vec<_> = (runs.iter()).map(|r| (r.id.as_str(), &r.log)).collect();
            let title = format!("{}, scale {}", exp.title, rec.scale.name());
            plot_generation(&logs, &dir.join("generation.png"), &title)?;
            figures.push("generation.png".to_string());
            (health_table(&runs), health_reading(&runs))
        }
    };
    let compute = compute_of(dir, &rec).map_or(String::new(), |c| format!("{c} · "));
    let header = format!(
        "Scale `{}` · model `{}` · corpus `{}` · {compute}{} threads · finished {}\n\n",
        rec.scale.name(),
        file_name(&rec.model),
        rec.corpus.join(", "),
        rec.threads,
        rec.finished_at
    );
    let file = format!(
        "# {}\n\n{}\n\n{header}{table}\n{reading}\n",
        exp.title, exp.description
    );
    std::fs::write(dir.join("table.md"), &file)
        .with_context(|| format!("{}: cannot write table.md", dir.display()))?;
    let mut section = format!("{}\n\n{}\n\n{header}{table}\n", heading(&rec), exp.title);
    for f in &figures {
        let _ = writeln!(section, "![{}]({f})\n", exp.name);
    }
    let _ = writeln!(section, "**Reading.** {reading}");
    Ok(section)
}

/// Milliseconds with one decimal, or three significant digits below 1 ms (a GPU's block
/// engine needs hundredths of a millisecond per token).
fn fmt_ms(ms: f64) -> String {
    match ms < 1.0 {
        true => format!("{ms:.3}"),
        false => format!("{ms:.1}"),
    }
}

/// `## NAME (MIRRORS)`, with the scale when it is not the default one.
fn heading(rec: &ExperimentRecord) -> String {
    let exp = &rec.experiment;
    match rec.scale {
        Scale::Default => format!("## {} ({})", exp.name, exp.mirrors),
        scale => format!("## {} ({}), {} scale", exp.name, exp.mirrors, scale.name()),
    }
}

/// Whether every run of the experiment still has its per-token log.
fn logs_present(dir: &Path, rec: &ExperimentRecord) -> bool {
    (rec.runs.iter()).all(|e| dir.join(&e.dir).join("nll.parquet").is_file())
}

/// The record of each run of the experiment, by run id (no per-token logs needed).
fn run_records(dir: &Path, rec: &ExperimentRecord) -> Result<Vec<(String, RunRecord)>> {
    (rec.runs.iter())
        .map(|e| {
            Ok((
                e.id.clone(),
                RunRecord::read_json(&dir.join(&e.dir).join("run.json"))?,
            ))
        })
        .collect()
}

/// `cuda:0 bf16`: where the experiment's runs ran, from the first run's record (`None` for
/// records from before devices were recorded).
fn compute_of(dir: &Path, rec: &ExperimentRecord) -> Option<String> {
    let path = dir.join(&rec.runs.first()?.dir).join("run.json");
    let model = match rec.experiment.kind {
        Kind::Chat => GenerationRecord::read_json(&path).ok()?.model,
        _ => RunRecord::read_json(&path).ok()?.model,
    };
    let details = model.details?;
    Some(format!("{} {}", details.device, details.dtype))
}

/// The section of an experiment whose per-token logs are not kept (large paper-scale runs):
/// its table.md and figures as `reproduce` wrote them, which the logs would reproduce exactly.
fn saved_section(dir: &Path, rec: &ExperimentRecord) -> Result<String> {
    let exp = &rec.experiment;
    let on_gpu = compute_of(dir, rec).is_some_and(|c| c.starts_with("cuda"));
    let rerun = format!(
        "streamppl reproduce {} --scale {}{} --out {}",
        exp.name,
        rec.scale.name(),
        if on_gpu { " --device cuda" } else { "" },
        dir.display()
    );
    let saved = std::fs::read_to_string(dir.join("table.md")).with_context(|| {
        format!(
            "{}: neither the per-token logs nor table.md; regenerate with `{rerun}`",
            dir.display()
        )
    })?;
    // table.md is `# title`, the description, then the header, table and reading.
    let body = saved.split_once('\n').map_or("", |(_, rest)| rest).trim();
    let mut section = format!("{}\n\n{}\n\n{body}\n\n", heading(rec), exp.title);
    let mut pngs: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".png"))
        .collect();
    pngs.sort();
    for png in pngs {
        let _ = writeln!(section, "![{}]({png})\n", exp.name);
    }
    let _ = writeln!(
        section,
        "_The per-token logs of these runs are not in the repository (too large): the table and figures are as `reproduce` wrote them; `{rerun}` recomputes them._"
    );
    Ok(section)
}

/// One table per experiment run at several scales (or on several devices): each run's PPL
/// and scored tokens side by side, from the run records.
fn scales_side_by_side(results: &Path, dirs: &[PathBuf]) -> Result<String> {
    let mut by_name: Vec<(String, Vec<(PathBuf, ExperimentRecord)>)> = Vec::new();
    for dir in dirs {
        let rec = ExperimentRecord::read(dir)?;
        match by_name.iter_mut().find(|(n, _)| *n == rec.experiment.name) {
            Some((_, list)) => list.push((dir.clone(), rec)),
            None => by_name.push((rec.experiment.name.clone(), vec![(dir.clone(), rec)])),
        }
    }
    let mut md = String::new();
    // Latency and chat experiments have no PPL runs: their own sections compare the devices.
    by_name.retain(|(_, list)| list.len() > 1 && list[0].1.experiment.kind == Kind::Runs);
    for (name, list) in &mut by_name {
        // Quick, default, then paper scale.
        list.sort_by_key(|(_, rec)| Scale::ALL.iter().position(|s| *s == rec.scale));
        let _ = write!(md, "### {name}\n\n| run |");
        let mut columns = Vec::new();
        for (dir, rec) in list.iter() {
            let compute = compute_of(dir, rec).unwrap_or_else(|| "cpu f32".into());
            let rel = dir
                .strip_prefix(results)
                .unwrap_or(dir)
                .display()
                .to_string();
            let _ = write!(md, " `{rel}`: {}, {compute} |", rec.scale.name());
            columns.push(run_records(dir, rec)?);
        }
        let _ = writeln!(md, "\n|---|{}", "---:|".repeat(list.len()));
        for entry in &list[0].1.runs {
            let _ = write!(md, "| {} |", cell(&entry.id));
            for runs in &columns {
                let value = runs.iter().find(|(id, _)| *id == entry.id).map_or(
                    "-".to_string(),
                    |(_, r)| {
                        let sample = r.options.score_every.filter(|&k| k > 1);
                        let sample = sample.map_or(String::new(), |k| format!(", sample 1/{k}"));
                        format!("{} ({} tokens{sample})", fmt_ppl(r.ppl), r.tokens_scored)
                    },
                );
                let _ = write!(md, " {value} |");
            }
            md.push('\n');
        }
        md.push('\n');
    }
    Ok(md)
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or(path.to_string(), |n| n.to_string_lossy().into_owned())
}

fn load(dir: &Path, rec: &ExperimentRecord) -> Result<Vec<LoadedRun>> {
    rec.runs
        .iter()
        .map(|e| {
            let run = Run::load(dir.join(&e.dir))?;
            let log = NllLog::read_parquet(&run.dir.join("nll.parquet"))?;
            Ok(LoadedRun {
                id: e.id.clone(),
                run,
                log,
            })
        })
        .collect()
}

fn draw(dir: &Path, rec: &ExperimentRecord, plot: Plot, runs: &[LoadedRun]) -> Result<Vec<String>> {
    let title = format!(
        "{}: {}, scale {}",
        rec.experiment.name,
        file_name(&rec.model),
        rec.scale.name()
    );
    Ok(match plot {
        Plot::RunningPpl => {
            let all: Vec<Run> = runs.iter().map(|r| r.run.clone()).collect();
            super::plot_running_ppl(&all, &dir.join("running_ppl.png"), &title)?;
            vec!["running_ppl.png".into()]
        }
        Plot::LongStream => {
            let mut out = Vec::new();
            for r in runs {
                let memory = read_csv(&r.run.dir.join("memory.csv")).unwrap_or_default();
                let name = format!(
                    "long_stream_{}.png",
                    r.run
                        .dir
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .replace([':', '+', '@'], "_")
                );
                plot_long_stream(
                    &r.log,
                    &memory,
                    PPL_WINDOW,
                    &dir.join(&name),
                    &format!("{title}: {}", r.run.record.label),
                )?;
                out.push(name);
            }
            out
        }
        Plot::Latency => Vec::new(),
    })
}

/// Whether a run scored only a sample of its tokens (`--score-every`).
fn sampled(r: &RunRecord) -> bool {
    r.options.is_sample()
}

fn ci95(r: &RunRecord) -> (f64, f64) {
    let mean = r.sum_nll / r.tokens_scored.max(1) as f64;
    let se = r.mean_nll_standard_error;
    ((mean - 1.96 * se).exp(), (mean + 1.96 * se).exp())
}

fn runs_table(rec: &ExperimentRecord, runs: &[LoadedRun]) -> String {
    let paper = &rec.experiment.paper;
    let mut out = String::from("| run | strategy | tokens scored | PPL (ours) |");
    for p in paper {
        let _ = write!(out, " paper: {} |", cell(&p.model));
    }
    out.push_str("\n|---|---|---:|---:|");
    out.push_str(&"---:|".repeat(paper.len()));
    out.push('\n');
    for r in runs {
        let rr = &r.run.record;
        let ppl = if sampled(rr) {
            let (lo, hi) = ci95(rr);
            format!(
                "{} (sample, 95% {}–{})",
                fmt_ppl(rr.ppl),
                fmt_ppl(lo),
                fmt_ppl(hi)
            )
        } else {
            fmt_ppl(rr.ppl)
        };
        let _ = write!(
            out,
            "| {} | {} | {} | {ppl} |",
            cell(&r.id),
            cell(&rr.label),
            rr.tokens_scored
        );
        for p in paper {
            let v = p.values.get(&r.id).map_or("".into(), |v| format!("{v:.2}"));
            let _ = write!(out, " {v} |");
        }
        out.push('\n');
    }
    for p in paper.iter().filter(|p| p.note.is_some()) {
        let _ = writeln!(
            out,
            "\n- Paper, {}: {}",
            p.model,
            p.note.as_deref().unwrap_or_default()
        );
    }
    for r in runs.iter().filter(|r| sampled(&r.run.record)) {
        let _ = writeln!(out, "\n- {}", paired_sentence(r, runs));
    }
    out.push_str(&stale_note(rec, runs));
    out
}

/// One footnote naming the runs computed by another numerics epoch than this build's.
fn stale_note(rec: &ExperimentRecord, runs: &[LoadedRun]) -> String {
    let epoch = numerics_epoch();
    let stale: Vec<String> = runs
        .iter()
        .filter(|r| r.run.record.numerics_epoch != epoch)
        .map(|r| format!("`{}` (epoch {})", r.id, r.run.record.numerics_epoch))
        .collect();
    if stale.is_empty() {
        return String::new();
    }
    format!(
        "\n- Stale, computed by another numerics epoch than this build's ({epoch}): {}; `streamppl reproduce {} --rerun-stale` recomputes them.\n",
        stale.join(", "),
        rec.experiment.name
    )
}

/// A sample's PPL beside every exact run's PPL on the very same tokens.
fn paired_sentence(sample: &LoadedRun, runs: &[LoadedRun]) -> String {
    let rr = &sample.run.record;
    let (lo, hi) = ci95(rr);
    let positions: std::collections::HashSet<u64> =
        sample.log.records.iter().map(|r| r.position).collect();
    let others: Vec<String> = runs
        .iter()
        .filter(|o| !o.run.record.approximate)
        .filter_map(|o| {
            let on: Vec<f64> = o
                .log
                .records
                .iter()
                .filter(|r| positions.contains(&r.position))
                .map(|r| r.nll as f64)
                .collect();
            (on.len() == positions.len()).then(|| {
                format!(
                    "{} {}",
                    o.id,
                    fmt_ppl((on.iter().sum::<f64>() / on.len() as f64).exp())
                )
            })
        })
        .collect();
    let mut s = format!(
        "`{}` is a sample: {} tokens scored exactly, PPL {} (95% interval {}–{})",
        sample.id,
        rr.tokens_scored,
        fmt_ppl(rr.ppl),
        fmt_ppl(lo),
        fmt_ppl(hi)
    );
    if !others.is_empty() {
        let _ = write!(s, "; on the same tokens: {}", others.join(", "));
    }
    s + "."
}

/// For each exact run other than the reference that scores the same tokens: the first scored
/// token (once a whole window is in) where its windowed PPL is `DEPARTURE_RATIO` times the
/// reference's, or `None` if it never is.
fn departures(rec: &ExperimentRecord, runs: &[LoadedRun]) -> Vec<(String, Option<u64>)> {
    let Some(reference) = rec
        .experiment
        .reference
        .as_ref()
        .and_then(|id| runs.iter().find(|r| &r.id == id))
    else {
        return Vec::new();
    };
    let window = PPL_WINDOW.min(reference.log.len() / 4).max(1);
    let base = reference.log.windowed_ppl(window);
    runs.iter()
        .filter(|r| {
            r.id != reference.id && !r.run.record.approximate && r.log.len() == reference.log.len()
        })
        .map(|r| {
            let w = r.log.windowed_ppl(window);
            let at = (window - 1..w.len())
                .find(|&i| w[i] >= DEPARTURE_RATIO * base[i])
                .map(|i| r.log.records[i].position + 1);
            (r.id.clone(), at)
        })
        .collect()
}

fn runs_reading(rec: &ExperimentRecord, runs: &[LoadedRun]) -> String {
    let mut s = Vec::new();
    let exact: Vec<&LoadedRun> = runs.iter().filter(|r| !sampled(&r.run.record)).collect();
    let by_ppl = |a: &&&LoadedRun, b: &&&LoadedRun| a.run.record.ppl.total_cmp(&b.run.record.ppl);
    if let (Some(best), Some(worst)) = (exact.iter().min_by(by_ppl), exact.iter().max_by(by_ppl))
        && exact.len() > 1
    {
        s.push(format!(
            "Over {} scored tokens, the lowest PPL is `{}` ({}) and the highest `{}` ({}, {:.1}x).",
            best.run.record.tokens_scored,
            best.id,
            fmt_ppl(best.run.record.ppl),
            worst.id,
            fmt_ppl(worst.run.record.ppl),
            worst.run.record.ppl / best.run.record.ppl
        ));
    }
    // Window attention against the same cache with sinks.
    let strategy = |r: &LoadedRun| r.run.record.options.strategy().ok();
    let pos_shift = |r: &&&LoadedRun| r.run.record.options.pos_shift;
    for w in exact
        .iter()
        .filter(pos_shift)
        .filter(|r| matches!(strategy(r), Some(Strategy::Sink { sinks: 0, .. })))
    {
        let Some(Strategy::Sink { window, .. }) = strategy(w) else {
            continue;
        };
        let with_sinks: Vec<String> = exact
            .iter()
            .filter(pos_shift)
            .filter(|r| matches!(strategy(r), Some(Strategy::Sink { sinks, window: ww }) if sinks > 0 && sinks + ww == window))
            .map(|r| format!("`{}` {}", r.id, fmt_ppl(r.run.record.ppl)))
            .collect();
        if !with_sinks.is_empty() {
            s.push(format!(
                "Window attention `{}` reaches {}; with sinks in the same cache: {}.",
                w.id,
                fmt_ppl(w.run.record.ppl),
                with_sinks.join(", ")
            ));
        }
    }
    for p in &rec.experiment.paper {
        let ours: Vec<(&str, f64, f64)> = runs
            .iter()
            .filter_map(|r| {
                p.values
                    .get(&r.id)
                    .map(|v| (r.id.as_str(), r.run.record.ppl, *v))
            })
            .collect();
        let (agree, pairs) = pairwise_agreement(&ours);
        if pairs > 0 {
            s.push(format!(
                "Against {} the runs are ordered alike in {agree} of {pairs} pairs (differences under 1% count as ties).",
                p.model
            ));
        }
    }
    let context = runs
        .first()
        .map_or(0, |r| r.run.record.model.trained_context as u64);
    let departures = departures(rec, runs);
    if !departures.is_empty() {
        let reference = rec.experiment.reference.as_deref().unwrap_or_default();
        let each: Vec<String> = departures
            .iter()
            .map(|(id, at)| match at {
                Some(p) if context > 0 && *p > context => {
                    format!("`{id}` at token {p} (past the trained context of {context})")
                }
                Some(p) => format!("`{id}` at token {p}"),
                None => format!("`{id}` never"),
            })
            .collect();
        s.push(format!(
            "Where each curve departs from `{reference}` (its {PPL_WINDOW}-token windowed PPL {DEPARTURE_RATIO}x the reference's or more): {}.",
            each.join(", ")
        ));
    }
    if rec.experiment.plots.contains(&Plot::LongStream) {
        for r in runs {
            s.push(long_stream_sentence(r));
        }
    }
    s.join(" ")
}

/// (pairs ordered as the paper orders them, pairs compared); near-equal values on either side
/// (within 1%) count as agreeing.
fn pairwise_agreement(values: &[(&str, f64, f64)]) -> (usize, usize) {
    let tie = |a: f64, b: f64| (a / b - 1.0).abs() < 0.01;
    let mut agree = 0;
    let mut pairs = 0;
    for i in 0..values.len() {
        for j in i + 1..values.len() {
            let (_, oi, pi) = values[i];
            let (_, oj, pj) = values[j];
            pairs += 1;
            if tie(oi, oj) || tie(pi, pj) || (oi < oj) == (pi < pj) {
                agree += 1;
            }
        }
    }
    (agree, pairs)
}

fn long_stream_sentence(r: &LoadedRun) -> String {
    let rr = &r.run.record;
    let w = r.log.windowed_ppl(PPL_WINDOW);
    let half = &w[w.len() / 2..];
    let (lo, hi) = half
        .iter()
        .fold((f64::INFINITY, 0f64), |(l, h), &v| (l.min(v), h.max(v)));
    let memory = read_csv(&r.run.dir.join("memory.csv")).unwrap_or_default();
    let mut s = format!(
        "`{}` streams {} tokens over {} books at PPL {}; in the second half its {PPL_WINDOW}-token windowed PPL stays within {}–{}.",
        r.id,
        rr.tokens_scored,
        rr.books_scored,
        fmt_ppl(rr.ppl),
        fmt_ppl(lo),
        fmt_ppl(hi)
    );
    // Memory once the model and first buffers are in: from the first tenth of the run on.
    let settled: Vec<f64> = memory
        .iter()
        .filter(|m| m.tokens >= rr.tokens_scored / 10)
        .map(|m| m.rss_mib)
        .collect();
    if let (Some(min), Some(max)) = (
        settled.iter().copied().reduce(f64::min),
        settled.iter().copied().reduce(f64::max),
    ) {
        let _ = write!(
            s,
            " Resident memory stays between {min:.0} and {max:.0} MiB ({} samples after the first 10% of tokens).",
            settled.len()
        );
    }
    s
}

/// Points of one method, by cache size.
fn method<'a>(points: &'a [LatencyPoint], m: &str) -> Vec<&'a LatencyPoint> {
    points.iter().filter(|p| p.method == m).collect()
}

fn latency_table(rec: &ExperimentRecord) -> String {
    let pts = &rec.latency;
    let mut caches: Vec<usize> = pts.iter().map(|p| p.cache).collect();
    caches.sort();
    caches.dedup();
    let get = |m: &str, c: usize| pts.iter().find(|p| p.method == m && p.cache == c);
    let paper = rec.experiment.paper.first();
    let mut out = String::from(
        "| cache | re-computation ms/token | StreamingLLM (token engine) ms/token | speed-up | block engine ms/token | peak RSS MiB (recompute / streaming / block) |",
    );
    if let Some(p) = paper {
        let _ = write!(
            out,
            " paper {}: re-computation / StreamingLLM ms |",
            cell(&p.model)
        );
    }
    out.push_str("\n|---:|---:|---:|---:|---:|---:|");
    if paper.is_some() {
        out.push_str("---:|");
    }
    out.push('\n');
    let ms = |p: Option<&LatencyPoint>| p.map_or("".into(), |p| fmt_ms(p.ms_per_token));
    let rss = |p: Option<&LatencyPoint>| {
        p.and_then(|p| p.peak_rss_mib)
            .map_or("–".into(), |v| format!("{v:.0}"))
    };
    for c in caches {
        let (r, s, b) = (get("recompute", c), get("streaming", c), get("block", c));
        let speedup = match (r, s) {
            (Some(r), Some(s)) => format!("{:.1}x", r.ms_per_token / s.ms_per_token),
            _ => String::new(),
        };
        let _ = write!(
            out,
            "| {c} | {} | {} | {speedup} | {} | {} / {} / {} |",
            ms(r),
            ms(s),
            ms(b),
            rss(r),
            rss(s),
            rss(b)
        );
        if let Some(p) = paper {
            // The paper's cache sizes, which a cache_divisor may have shrunk.
            let div = rec
                .experiment
                .latency
                .as_ref()
                .and_then(|l| {
                    l.caches.iter().find(|&&pc| {
                        rec.experiment
                            .cache_divisor
                            .and_then(|d| d.get(rec.scale))
                            .map_or(pc == c, |d| pc / d == c)
                    })
                })
                .copied()
                .unwrap_or(c);
            let v = |m: &str| {
                p.values
                    .get(&format!("{m}@{div}"))
                    .map_or("–".into(), |v| format!("{v:.0}"))
            };
            let _ = write!(out, " {} / {} |", v("recompute"), v("streaming"));
        }
        out.push('\n');
    }
    if let Some(n) = paper.and_then(|p| p.note.as_ref()) {
        let _ = writeln!(out, "\n- Paper: {n}");
    }
    out
}

fn latency_reading(rec: &ExperimentRecord) -> String {
    let pts = &rec.latency;
    let (r, s, b) = (
        method(pts, "recompute"),
        method(pts, "streaming"),
        method(pts, "block"),
    );
    let (Some(r_last), Some(s_last), Some(r_first), Some(s_first)) =
        (r.last(), s.last(), r.first(), s.first())
    else {
        return "No measurements.".into();
    };
    let mut out = format!(
        "Re-computation grows from {:.1} to {:.1} ms per token between caches {} and {} ({:.1}x), StreamingLLM on the token engine from {:.1} to {:.1} ms ({:.1}x): at cache {} re-computation is {:.1}x slower.",
        r_first.ms_per_token,
        r_last.ms_per_token,
        r_first.cache,
        r_last.cache,
        r_last.ms_per_token / r_first.ms_per_token,
        s_first.ms_per_token,
        s_last.ms_per_token,
        s_last.ms_per_token / s_first.ms_per_token,
        r_last.cache,
        r_last.ms_per_token / s_last.ms_per_token
    );
    if let (Some(bf), Some(bl)) = (b.first(), b.last()) {
        let _ = write!(
            out,
            " The block engine needs {} to {} ms per token for the same strategy.",
            fmt_ms(bf.ms_per_token),
            fmt_ms(bl.ms_per_token)
        );
    }
    out.push_str(" The paper reports 22.2x for Llama-2-13B at cache 4096 on a GPU.");
    out
}

/// Re-renders every experiment under `results` (folders with `experiment.json`, one or two
/// levels down) and every sweep (`sweep.json`), and writes `results/REPRODUCTION.md`; returns its path.
pub fn write_reproduction(results: &Path) -> Result<PathBuf> {
    if !results.is_dir() {
        anyhow::bail!(
            "{}: no such folder; give the folder `streamppl reproduce` wrote (default: results)",
            results.display()
        );
    }
    let mut dirs = Vec::new();
    find_marked(results, EXPERIMENT_JSON, 2, &mut dirs)?;
    if dirs.is_empty() {
        anyhow::bail!(
            "{}: holds no experiment (no {EXPERIMENT_JSON}); run `streamppl reproduce` first",
            results.display()
        );
    }
    // By scale (quick, default, paper), then by folder.
    let scale_rank = |d: &PathBuf| {
        ExperimentRecord::read(d).map_or(0, |r| {
            Scale::ALL.iter().position(|s| *s == r.scale).unwrap_or(0)
        })
    };
    dirs.sort_by_cached_key(|d| (scale_rank(d), d.clone()));
    let mut md = String::from(
        "# Reproducing StreamingLLM (Xiao et al., ICLR 2024)\n\nRegenerated from the result files by `streamppl report`. Each section is one experiment file of `experiments/`, our numbers beside the paper's; the paper used 7B-13B models, we use the default model, so absolute values differ and the comparison is of shapes and orderings.\n\n",
    );
    let side_by_side = scales_side_by_side(results, &dirs)?;
    if !side_by_side.is_empty() {
        md.push_str("## Scales, devices and models side by side\n\nPPL (scored tokens) of each experiment's runs wherever it was run: the default model at the CPU's default scale beside the GPU's paper scale (`results/paper-h200/`), and other models in their own folders (`results/gemma3-270m/`: Gemma 3 270M). Sections for each follow.\n\n");
        md.push_str(&side_by_side);
    }
    md.push_str(&families_reading(results)?);
    for dir in &dirs {
        let section = render_experiment(dir)?;
        let rel = dir.strip_prefix(results).unwrap_or(dir);
        // Figure links relative to REPRODUCTION.md.
        let section = section.replace("](", &format!("]({}/", rel.display()));
        md.push_str(&section);
        md.push('\n');
    }
    // Sweeps (folders with sweep.json), after the experiments.
    let mut sweeps = Vec::new();
    find_marked(results, SWEEP_JSON, 2, &mut sweeps)?;
    sweeps.sort();
    for dir in &sweeps {
        let grid = std::fs::read_to_string(render_sweep(dir)?)?;
        let rel = dir.strip_prefix(results).unwrap_or(dir);
        let body = grid
            .split_once('\n')
            .map_or(grid.as_str(), |(_, rest)| rest);
        md.push_str(&format!(
            "## Sweep `{}`\n{}\n",
            rel.display(),
            body.replace("](", &format!("]({}/", rel.display()))
        ));
    }
    let path = results.join("REPRODUCTION.md");
    std::fs::write(&path, md).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(path)
}

/// The reading across model families, `results/FAMILIES.md`: written by hand from the tables
/// above it (what holds on each family is a judgment, not a number), included verbatim.
fn families_reading(results: &Path) -> Result<String> {
    let path = results.join(FAMILIES_MD);
    if !path.is_file() {
        return Ok(String::new());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(format!(
        "{}

",
        text.trim_end()
    ))
}

/// The hand-written reading across families that REPRODUCTION.md includes.
const FAMILIES_MD: &str = "FAMILIES.md";

/// Folders holding the file `marker`, `dir` itself or up to `depth` levels below it.
fn find_marked(dir: &Path, marker: &str, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if dir.join(marker).is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    if depth == 0 || !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            find_marked(&p, marker, depth - 1, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_agreement_counts_ties_as_agreeing() {
        let v = [("a", 10.0, 100.0), ("b", 5.0, 50.0), ("c", 5.01, 60.0)];
        assert_eq!(pairwise_agreement(&v), (3, 3));
        let v = [("a", 10.0, 50.0), ("b", 5.0, 100.0)];
        assert_eq!(pairwise_agreement(&v), (0, 1));
    }
}
