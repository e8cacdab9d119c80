//! `streamppl bench`: the speed and memory figures of the engines on one model and corpus, in
//! one run, written as `results/bench/<name>.json` and `.md` with the machine they ran on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::corpus::load_corpora;
use crate::engine::EngineKind;
use crate::engine::token::TokenEngine;
use crate::eval::{EvalOptions, TokenizedCorpus};
use crate::model::step_tally::{self, Tally, Work};
use crate::model::{Model, huge_pages, kernels};
use crate::records::bench::{
    BenchReport, Machine, Measurement, PairedRound, StepBreakdown, StepPart, TokenFloor,
};
use crate::runner::{Compute, LoadedModel, RunPolicy, load_model, progress_bar, run_one, versions};
use crate::strategy::Strategy;

/// Token counts of each measurement.
#[derive(Debug, Clone)]
pub struct BenchSizes {
    /// `sink:4+1020`, token engine vs block engine.
    pub engines: u64,
    /// Dense prefill (block engine, one block of this many tokens).
    pub dense_prefill: u64,
    /// `sink:4+1020` on the block engine, short and long: memory must stay flat.
    pub flat_memory: [u64; 2],
    /// Rounds of the paired floor measurement, and the one-token steps each times.
    pub paired: (usize, usize),
}

impl BenchSizes {
    pub const FULL: BenchSizes = BenchSizes {
        engines: 8192,
        dense_prefill: 2048,
        flat_memory: [16_384, 131_072],
        paired: (6, 128),
    };
    /// A smoke test: minutes, not hours.
    pub const QUICK: BenchSizes = BenchSizes {
        engines: 256,
        dense_prefill: 256,
        flat_memory: [512, 2048],
        paired: (2, 16),
    };
}

fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let mem_kb: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kb / (1024.0 * 1024.0),
        load_average_at_start: read("/proc/loadavg")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0),
    }
}

/// What one `streamppl bench` measures, and where it writes.
pub struct BenchJob<'a> {
    pub model: &'a Path,
    pub corpus: &'a [PathBuf],
    /// Stem of the result files.
    pub name: &'a str,
    pub sizes: &'a BenchSizes,
    pub block_size: usize,
    pub out_dir: &'a Path,
    pub compute: &'a Compute,
    /// Further models measured beside the main one (`--also-model`): the block engine at
    /// `sink:4+1020` over `sizes.engines` tokens, each loaded after the previous one is dropped
    /// so that its peak RSS is its own.
    pub also_models: &'a [PathBuf],
}

/// Runs every measurement; writes `out_dir/<name>.json` and `out_dir/<name>.md`.
pub fn run_bench(job: &BenchJob) -> Result<BenchReport> {
    let BenchJob {
        model,
        corpus,
        name,
        sizes,
        block_size,
        out_dir,
        compute,
        also_models,
    } = *job;
    let machine = machine();
    let lm = load_model(model, compute)?;
    let longest = sizes.flat_memory[1].max(sizes.engines);
    let tokenized = tokenize(&lm, corpus, longest)?;
    let scratch = out_dir.join("runs").join(name);
    let block = EngineKind::Block(block_size);
    let plan: Vec<(&str, &str, EngineKind, u64)> = vec![
        (
            "token engine",
            "sink:4+1020",
            EngineKind::Token,
            sizes.engines,
        ),
        ("block engine", "sink:4+1020", block, sizes.engines),
        (
            "dense prefill",
            "dense",
            EngineKind::Block(sizes.dense_prefill as usize),
            sizes.dense_prefill,
        ),
        (
            "flat memory, short",
            "sink:4+1020",
            block,
            sizes.flat_memory[0],
        ),
        (
            "flat memory, long",
            "sink:4+1020",
            block,
            sizes.flat_memory[1],
        ),
    ];
    let mut measurements = Vec::new();
    for (what, strategy, engine, tokens) in plan {
        measurements.push(measure(
            &lm, &tokenized, corpus, what, strategy, engine, tokens, &scratch,
        )?);
    }
    let main_model = lm.info.path.clone();
    let weight_bytes = lm.model.weight_bytes_per_token() as u64;
    // The token engine's sink:4+1020 cache holds S + W + 1 slots once full.
    let kv_bytes = (lm.model.kv_bytes_per_slot() * 1025) as u64;
    let (paired, step_breakdown) = match compute.device.is_cpu() {
        true => paired_floor(&lm.model, &tokenized, weight_bytes, sizes.paired)?,
        false => (Vec::new(), None),
    };
    drop((lm, tokenized));
    for other in also_models {
        let lm = load_model(other, compute)?;
        let tokenized = tokenize(&lm, corpus, sizes.engines)?;
        let what = format!("block engine, {}", other.display());
        let mut m = measure(
            &lm,
            &tokenized,
            corpus,
            &what,
            "sink:4+1020",
            block,
            sizes.engines,
            &scratch,
        )?;
        m.model = Some(lm.info.path.clone());
        measurements.push(m);
    }
    let tps = |what: &str| {
        measurements
            .iter()
            .find(|m| m.name == what)
            .map_or(f64::NAN, |m| m.tokens_per_second)
    };
    let rss = |what: &str| {
        measurements
            .iter()
            .find(|m| m.name == what)
            .and_then(|m| m.peak_rss_bytes)
    };
    // Last, so its buffer is in no run's peak RSS; host memory bounds only a CPU's engines.
    let token_floor = (compute.device.is_cpu()).then(|| {
        let read_gb_per_s = read_bandwidth(BANDWIDTH_BUFFER, BANDWIDTH_PASSES);
        let floor = read_gb_per_s * 1e9 / weight_bytes as f64;
        TokenFloor {
            read_gb_per_s,
            buffer_bytes: BANDWIDTH_BUFFER as u64,
            passes: BANDWIDTH_PASSES,
            weight_bytes_per_token: weight_bytes,
            floor_tokens_per_second: floor,
            token_engine_share: tps("token engine") / floor,
            kv_bytes_per_token: kv_bytes,
            floor_with_cache_tokens_per_second: read_gb_per_s * 1e9
                / (weight_bytes + kv_bytes) as f64,
            paired_slice_bytes: PAIRED_SLICE as u64,
            paired,
            step_breakdown,
        }
    });
    let report = BenchReport {
        name: name.to_string(),
        machine,
        threads: candle_core::utils::get_num_threads(),
        runs_per_figure: 1,
        model: main_model,
        corpus: corpus
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
        block_speedup: tps("block engine") / tps("token engine"),
        rss_ratio_long_over_short: rss("flat memory, long")
            .zip(rss("flat memory, short"))
            .map(|(l, s)| l as f64 / s as f64),
        token_floor,
        measurements,
        versions: versions(),
        finished_at: crate::runner::now_rfc3339(),
    };
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))?;
    std::fs::write(
        out_dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(out_dir.join(format!("{name}.md")), markdown(&report))?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(report)
}

/// Bytes of each pass of [`read_bandwidth`]: far past any cache.
const BANDWIDTH_BUFFER: usize = 1 << 30;
const BANDWIDTH_PASSES: u32 = 5;

/// The best read bandwidth, GB/s, of `passes` passes summing a buffer of `bytes` in parallel
/// on the global rayon pool, the one the CPU kernels of the token engine use.
fn read_bandwidth(bytes: usize, passes: u32) -> f64 {
    best_read_bandwidth(&huge_pages::filled(bytes / 4, 1.0f32), passes)
}

/// The best read bandwidth, GB/s, of `passes` passes summing `data`, each pass both with and
/// without asking for the data ahead as the token engine's kernel does: the probe must read
/// at least as well as the engine can, or the floor it sets is too low. `data` sits on huge
/// pages like the weights.
fn best_read_bandwidth(data: &[f32], passes: u32) -> f64 {
    let bytes = std::mem::size_of_val(data);
    let mut best = 0.0f64;
    for _ in 0..passes {
        for sum_of in PROBE_WAYS {
            best = best.max(bytes as f64 / seconds_to_sum(data, sum_of) / 1e9);
        }
    }
    best
}

/// The probe's two ways of reading: without and with asking for the data ahead.
const PROBE_WAYS: [fn(&[f32]) -> f32; 2] = [sum_in_lanes, sum_in_lanes_prefetched];

/// Seconds to sum `data` one way on the engines' threads.
fn seconds_to_sum(data: &[f32], sum_of: fn(&[f32]) -> f32) -> f64 {
    let started = Instant::now();
    let sum: f32 = data.par_chunks(1 << 16).map(sum_of).sum();
    let seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    seconds
}

/// Bytes of each slice of the probe's buffer the paired rounds read after a step: past the
/// last-level cache (32 MiB on the 2-core EPYC), about 2 ms of reading.
const PAIRED_SLICE: usize = 64 << 20;

/// The token engine's share of the bandwidth floor measured in pairs: each of `rounds` times
/// `steps` one-token steps of `sink:4+1020` over its full cache, and after every step reads
/// the next slice of the probe's buffer both ways ([`SlicedProbe`]), so that the steps and the
/// probe sample the same seconds of the host. Its bandwidth moves by 2x within seconds: a probe
/// before the round, of a tenth of a second, caught a fast or a slow second and set the round's
/// floor from it (on the EPYC, 54% to 85% of the floor between the rounds of one bench). With
/// the rounds, where their steps went. Empty when the corpus holds too few tokens (C + every
/// round's steps + 1).
fn paired_floor(
    model: &Model,
    tokenized: &TokenizedCorpus,
    weight_bytes: u64,
    (rounds, steps): (usize, usize),
) -> Result<(Vec<PairedRound>, Option<StepBreakdown>)> {
    const CACHE: usize = 1024;
    let needed = CACHE + rounds * steps + 2;
    let tokens: Vec<u32> = tokenized
        .ids
        .iter()
        .flatten()
        .copied()
        .take(needed)
        .collect();
    if tokens.len() < needed {
        return Ok((Vec::new(), None));
    }
    let strategy = Strategy::Sink {
        sinks: 4,
        window: CACHE - 4,
    };
    let mut engine = TokenEngine::new(model, strategy, true)?;
    engine.prefill(&tokens[..CACHE])?;
    // Fed token i scores token i + 1; the first step (untimed) fills the cache's last slot.
    let mut step = |i: usize| -> Result<f64> {
        let started = Instant::now();
        let hidden = engine.step(tokens[i])?;
        model.nll(&hidden, &[tokens[i + 1]])?;
        Ok(started.elapsed().as_secs_f64())
    };
    step(CACHE)?;
    let data = huge_pages::filled(BANDWIDTH_BUFFER / 4, 1.0f32);
    let mut probe = SlicedProbe::new(&data);
    let mut paired = Vec::with_capacity(rounds);
    // The probe runs no kernel, so one tally holds only the steps' work.
    let tally = step_tally::keep();
    let mut stepping = 0.0;
    for round in 0..rounds {
        let first = CACHE + 1 + round * steps;
        let mut seconds = 0.0;
        for i in first..first + steps {
            seconds += step(i)?;
            probe.read_slice();
        }
        stepping += seconds;
        let read_gb_per_s = probe.take_round_gb_per_s();
        let tokens_per_second = steps as f64 / seconds;
        paired.push(PairedRound {
            read_gb_per_s,
            steps: steps as u64,
            tokens_per_second,
            share: tokens_per_second * weight_bytes as f64 / (read_gb_per_s * 1e9),
        });
    }
    let breakdown = step_breakdown(
        (rounds * steps) as u64,
        stepping,
        tally.finish(),
        probe.all_gb_per_s(),
    );
    Ok((paired, Some(breakdown)))
}

/// The bandwidth probe read in slices between other work: each slice of [`PAIRED_SLICE`] bytes
/// (the next one of the buffer, round the end) summed both ways [`best_read_bandwidth`] sums,
/// each way's bytes and seconds added up for the round and, once taken, over the rounds; a
/// rate is the better way's.
struct SlicedProbe<'a> {
    data: &'a [f32],
    next: usize,
    /// Per way (without, with prefetch): bytes read and seconds taken since the last take.
    round: [(f64, f64); 2],
    /// The same over the rounds taken.
    all: [(f64, f64); 2],
}

impl<'a> SlicedProbe<'a> {
    fn new(data: &'a [f32]) -> Self {
        Self {
            data,
            next: 0,
            round: [(0.0, 0.0); 2],
            all: [(0.0, 0.0); 2],
        }
    }

    /// Reads the next slice both ways, a different slice each way.
    fn read_slice(&mut self) {
        let len = (PAIRED_SLICE / 4).min(self.data.len());
        for (read, sum_of) in self.round.iter_mut().zip(PROBE_WAYS) {
            if self.next + len > self.data.len() {
                self.next = 0;
            }
            let slice = &self.data[self.next..self.next + len];
            self.next += len;
            read.0 += std::mem::size_of_val(slice) as f64;
            read.1 += seconds_to_sum(slice, sum_of);
        }
    }

    /// GB/s of the better way since the last take, and a fresh start.
    fn take_round_gb_per_s(&mut self) -> f64 {
        let rate = better_rate(&self.round);
        for (all, round) in self.all.iter_mut().zip(&mut self.round) {
            all.0 += round.0;
            all.1 += round.1;
            *round = (0.0, 0.0);
        }
        rate
    }

    /// GB/s of the better way over the rounds taken.
    fn all_gb_per_s(&self) -> f64 {
        better_rate(&self.all)
    }
}

/// GB/s of the faster of two ways' (bytes, seconds).
fn better_rate(ways: &[(f64, f64); 2]) -> f64 {
    (ways.iter())
        .map(|(bytes, seconds)| bytes / seconds / 1e9)
        .fold(0.0, f64::max)
}

/// `tallies` per step of the `steps` that took `seconds`, with the probe's rate beside them.
fn step_breakdown(
    steps: u64,
    seconds: f64,
    tallies: Vec<(Work, Tally)>,
    probe_gb_per_s: f64,
) -> StepBreakdown {
    let per_step = |x: f64| x / steps.max(1) as f64;
    StepBreakdown {
        steps,
        step_ms: per_step(seconds * 1e3),
        parts: (tallies.into_iter())
            .map(|(work, t)| StepPart {
                work: work.to_string(),
                calls_per_step: per_step(t.calls as f64),
                ms_per_step: per_step(t.seconds * 1e3),
                read_gb_per_s: t.read_gb_per_s(),
            })
            .collect(),
        weights_asked_ahead: Some(kernels::asks_for_weights()),
        probe_gb_per_s: Some(probe_gb_per_s),
    }
}

/// A sum over 16 independent lanes, which the compiler vectorizes: memory, not a chain of
/// dependent adds, bounds it.
fn sum_in_lanes(values: &[f32]) -> f32 {
    sum_in_lanes_asking(values, |_| ())
}

/// [`sum_in_lanes`] asking for each line ahead of the reads, as the matrix-vector kernel does.
fn sum_in_lanes_prefetched(values: &[f32]) -> f32 {
    sum_in_lanes_asking(values, kernels::prefetch_ahead)
}

#[inline(always)]
fn sum_in_lanes_asking(values: &[f32], ask_ahead: impl Fn(&[f32])) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        ask_ahead(chunk);
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// The corpus in `lm`'s tokens, up to `tokens` scored.
fn tokenize(lm: &LoadedModel, corpus: &[PathBuf], tokens: u64) -> Result<TokenizedCorpus> {
    let books = load_corpora(corpus)?;
    let bar = progress_bar(books.len() as u64, "tokenizing", "books");
    let tokenized = TokenizedCorpus::new(&lm.tokenizer, books, Some(tokens), &bar)?;
    bar.finish_and_clear();
    Ok(tokenized)
}

#[allow(clippy::too_many_arguments)]
fn measure(
    lm: &LoadedModel,
    corpus: &TokenizedCorpus,
    corpus_paths: &[PathBuf],
    what: &str,
    strategy: &str,
    engine: EngineKind,
    tokens: u64,
    scratch: &Path,
) -> Result<Measurement> {
    let mut opts = EvalOptions::new(strategy.parse()?);
    opts.engine = engine;
    opts.max_tokens = Some(tokens);
    let dir = scratch.join(what.replace([' ', ','], "_"));
    // A fresh run every time (a bench never reuses a finished run), never checkpointed.
    let policy = RunPolicy {
        rerun: true,
        ..RunPolicy::new(Duration::from_secs(u64::MAX / 4))
    };
    let r = run_one(lm, corpus, corpus_paths, &opts, &dir, &policy)?.record;
    Ok(Measurement {
        name: what.to_string(),
        strategy: r.strategy,
        engine: r.engine,
        block_size: r.block_size,
        tokens: r.tokens_scored,
        tokens_per_second: r.tokens_per_second,
        wall_seconds: r.wall_seconds,
        peak_rss_bytes: r.peak_rss_bytes,
        ppl: r.ppl,
        model: None,
    })
}

/// Where the paired rounds' steps went, as a paragraph and a table, each kind of work's read
/// rate beside `probe_gb_per_s` (the probe's rate between the steps; in benches before it was
/// recorded, the rounds' median).
fn step_breakdown_table(b: &StepBreakdown, probe_gb_per_s: f64) -> String {
    let asking = match b.weights_asked_ahead {
        Some(false) => "not asking for its weights ahead",
        _ => "asking for its weights ahead",
    };
    let mut s = format!(
        "\n\nWhere the paired rounds' {} steps went ({:.2} ms a step; each kernel's wall time as its caller saw it, the matrix kernel {asking}; the probe read {probe_gb_per_s:.1} GB/s between them):\n\n\
         | work | calls a step | ms a step | read GB/s | of the probe |\n|---|---:|---:|---:|---:|\n",
        b.steps, b.step_ms
    );
    for p in &b.parts {
        s += &format!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.0}% |\n",
            p.work,
            p.calls_per_step,
            p.ms_per_step,
            p.read_gb_per_s,
            100.0 * p.read_gb_per_s / probe_gb_per_s
        );
    }
    let rest = b.step_ms - b.parts.iter().map(|p| p.ms_per_step).sum::<f64>();
    s + &format!(
        "| everything else (norms, rotations, hand-offs, the NLL) | | {rest:.2} | | |\n\n\
         (Attention's bytes are its keys and values, not its RoPE tables.)"
    )
}

/// The report as a short markdown table.
pub fn markdown(r: &BenchReport) -> String {
    let mut s = format!(
        "Bench `{}`: {} ({} cores, {:.0} GiB), {} threads, load average {:.2} at start, one run per figure, {}.\n\n\
         | measurement | strategy | engine | tokens | tokens/s | peak RSS (MiB) | PPL |\n|---|---|---|---:|---:|---:|---:|\n",
        r.name,
        r.machine.cpu,
        r.machine.cores,
        r.machine.memory_gib,
        r.threads,
        r.machine.load_average_at_start,
        r.finished_at
    );
    for m in &r.measurements {
        let engine = match m.block_size {
            Some(b) => format!("{} (B={b})", m.engine),
            None => m.engine.clone(),
        };
        let rss = m.peak_rss_bytes.map_or("-".into(), |b| {
            format!("{:.0}", b as f64 / (1 << 20) as f64)
        });
        s += &format!(
            "| {} | `{}` | {} | {} | {:.1} | {} | {:.3} |\n",
            m.name, m.strategy, engine, m.tokens, m.tokens_per_second, rss, m.ppl
        );
    }
    s += &format!(
        "\nBlock engine speed-up over the token engine: {:.1}x.",
        r.block_speedup
    );
    if let Some(ratio) = r.rss_ratio_long_over_short {
        s += &format!(" Peak RSS, long run over short run: {ratio:.3}.");
    }
    if let Some(f) = &r.token_floor {
        s += &format!(
            "\n\nMemory read bandwidth {:.1} GB/s ({} threads, best of {} passes summing {:.0} MiB on huge pages, each with and without prefetch as the engine reads); the weights one token reads are {:.0} MB, so no engine reading them all runs faster than **{:.1} tok/s**: the token engine runs at {:.0}% of that floor.",
            f.read_gb_per_s,
            r.threads,
            f.passes,
            f.buffer_bytes as f64 / (1 << 20) as f64,
            f.weight_bytes_per_token as f64 / 1e6,
            f.floor_tokens_per_second,
            100.0 * f.token_engine_share
        );
        if !f.paired.is_empty() {
            let median = crate::report::median(f.paired.iter().map(|p| p.share).collect());
            let each: Vec<String> = f
                .paired
                .iter()
                .map(|p| {
                    format!(
                        "{:.0}% ({:.1} tok/s at {:.1} GB/s)",
                        100.0 * p.share,
                        p.tokens_per_second,
                        p.read_gb_per_s
                    )
                })
                .collect();
            let steps = f.paired[0].steps;
            let how = match f.paired_slice_bytes {
                0 => format!(
                    "the bandwidth (best of 3 passes) and then {steps} one-token steps over the full cache, seconds apart"
                ),
                slice => format!(
                    "{steps} one-token steps over the full cache a round, each followed by reading a {:.0} MiB slice of the probe's buffer with and without prefetch, so that the steps and the bandwidth share the host's seconds",
                    slice as f64 / (1u64 << 20) as f64
                ),
            };
            s += &format!(
                " Measured in pairs instead, {how}, in {} rounds: **{:.0}%** of each round's floor (median; {}).",
                f.paired.len(),
                100.0 * median,
                each.join(", ")
            );
        }
        if f.kv_bytes_per_token > 0 {
            s += &format!(
                " With the {:.0} MB of keys and values a step reads over its full cache, the floor is {:.1} tok/s, and the token engine runs at {:.0}% of it.",
                f.kv_bytes_per_token as f64 / 1e6,
                f.floor_with_cache_tokens_per_second,
                100.0 * f.token_engine_share * f.floor_tokens_per_second
                    / f.floor_with_cache_tokens_per_second
            );
        }
        if let Some(b) = &f.step_breakdown {
            let median =
                || crate::report::median(f.paired.iter().map(|p| p.read_gb_per_s).collect());
            s += &step_breakdown_table(b, b.probe_gb_per_s.unwrap_or_else(median));
        }
    }
    s + "\n"
}
