//! `streamppl reproduce NAME|all`: runs an experiment file (see [`crate::experiment`]) on a
//! model and corpus, writes every run as an ordinary `eval` run folder plus `experiment.json`,
//! then renders its table and figures (see [`crate::report::render_experiment`]).
//!
//! Runs are skipped when finished, resumed from their checkpoint when interrupted, and copied
//! from any sibling experiment folder that already holds the same computation (the same
//! configuration fingerprint), so `table6` reuses `table2`'s `4+2044` and `ablation` reuses
//! `table1`'s runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::eval::{EvalOptions, default_block_size, fingerprint, numerics_epoch, stream_for};
use crate::experiment::{Experiment, Kind, Scale};
use crate::generate::sampler::Sampling;
use crate::generate::{GenerateJob, Prompts, generate_with};
use crate::latency::{LatencyOptions, measure_latency};
use crate::records::experiment::{ExperimentRecord, RunEntry};
use crate::records::generation::GenerationRecord;
use crate::records::latency::LatencyPoint;
use crate::records::run::RunRecord;
use crate::run_dir::check_log;
use crate::runner::{
    Compute, LoadedModel, RunPolicy, RunStatus, load_model, load_tokenized, now_rfc3339,
    progress_bar, run_each_once, run_one, versions,
};
use crate::shard::{Shard, estimated_cost, partition};
use crate::strategy::Strategy;

pub struct ReproduceJob {
    /// Folder of the experiment files (`experiments/`).
    pub experiments: PathBuf,
    /// Experiment names; `all` is expanded by the caller with [`all_names`].
    pub names: Vec<String>,
    pub scale: Scale,
    /// Output folder of one experiment; `None`: `results/NAME` (default scale) or
    /// `results/SCALE/NAME`. With several experiments, `OUT/NAME` each.
    pub out: Option<PathBuf>,
    pub model: PathBuf,
    pub corpus: Vec<PathBuf>,
    pub policy: RunPolicy,
    /// Compute only this shard's runs (see [`crate::shard`]): no tables, which the same
    /// command without a shard writes once every shard is done.
    pub shard: Option<Shard>,
    pub compute: Compute,
}

impl ReproduceJob {
    /// The block engine's block size on the job's device.
    fn block_size(&self) -> usize {
        default_block_size(&self.compute.device)
    }
}

/// Names of every experiment file in `dir`, sorted; an error naming the fix when there is none.
pub fn all_names(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        bail!(
            "{}: no such folder of experiment files; run from the repository root, or give --experiments DIR",
            dir.display()
        );
    }
    let names: Vec<String> = crate::experiment::list(dir)?
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    if names.is_empty() {
        bail!(
            "{}: holds no experiment file (NAME.toml); run from the repository root, or give --experiments DIR",
            dir.display()
        );
    }
    Ok(names)
}

/// The folder an experiment writes to: `--out`, else under `results/`, in the model's own
/// folder for a registered model other than the default (`results/gemma3-270m/NAME`).
pub fn out_dir(job: &ReproduceJob, name: &str) -> PathBuf {
    let model = (crate::registry::lookup(&job.model.to_string_lossy()))
        .or_else(|| crate::registry::by_path(&job.model));
    let root = Path::new("results").join(model.map(|m| m.results).unwrap_or_default());
    match (&job.out, job.names.len()) {
        (Some(out), 1) => out.clone(),
        (Some(out), _) => out.join(name),
        (None, _) if job.scale == Scale::Default => root.join(name),
        (None, _) => root.join(job.scale.name()).join(name),
    }
}

/// Runs every named experiment; returns their folders. All files are checked before any runs.
pub fn reproduce(job: &ReproduceJob) -> Result<Vec<PathBuf>> {
    let known = all_names(&job.experiments)?;
    let experiments = job
        .names
        .iter()
        .map(|name| {
            let path = job.experiments.join(format!("{name}.toml"));
            if !path.is_file() {
                bail!(
                    "unknown experiment `{name}`: no {}; known: {}, or all",
                    path.display(),
                    known.join(", ")
                );
            }
            Experiment::load(&path)
        })
        .collect::<Result<Vec<_>>>()?;
    let owners = shard_owners(&experiments, job)?;
    let lm = load_model(&job.model, &job.compute)?;
    let mut dirs = Vec::new();
    for exp in &experiments {
        let dir = out_dir(job, &exp.name);
        eprintln!(
            "== {} ({}, scale {}) -> {}",
            exp.name,
            exp.mirrors,
            job.scale.name(),
            dir.display()
        );
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create output folder", dir.display()))?;
        if let Some(shard) = job.shard {
            let mine =
                |unit: &str| owners.get(&format!("{}/{unit}", exp.name)) == Some(&shard.index);
            match exp.kind {
                Kind::Runs => {
                    run_experiment(&lm, exp, job, &dir, &mine)?;
                }
                Kind::Latency if mine(LATENCY_UNIT) => {
                    // Measured by one shard, kept for the merge (timings are not rerun there).
                    let points = run_latency(&lm, exp, job)?;
                    LatencyPoint::write_json(&points, &dir.join(LATENCY_FILE))?;
                }
                Kind::Latency => {}
                Kind::Chat => {
                    run_chats(&lm, exp, job, &dir, &mine)?;
                }
            }
            continue;
        }
        let (runs, latency) = match exp.kind {
            Kind::Runs => (run_experiment(&lm, exp, job, &dir, &|_| true)?, Vec::new()),
            Kind::Latency => (Vec::new(), merged_or_measured_latency(&lm, exp, job, &dir)?),
            Kind::Chat => (run_chats(&lm, exp, job, &dir, &|_| true)?, Vec::new()),
        };
        let record = ExperimentRecord {
            experiment: exp.clone(),
            scale: job.scale,
            model: job.model.display().to_string(),
            corpus: job.corpus.iter().map(|p| p.display().to_string()).collect(),
            runs,
            latency,
            threads: candle_core::utils::get_num_threads(),
            versions: versions(),
            finished_at: now_rfc3339(),
        };
        record.write(&dir)?;
        crate::report::render_experiment(&dir)?;
        eprintln!("   wrote {}", dir.join("table.md").display());
        dirs.push(dir);
    }
    if let Some(shard) = job.shard {
        eprintln!(
            "shard {shard} done; the same command without --shard writes the tables once every shard is"
        );
    }
    Ok(dirs)
}

/// A latency experiment is one unit of work for sharding (its timings belong together).
const LATENCY_UNIT: &str = "latency";
/// Where a shard leaves a latency experiment's points for the merge.
const LATENCY_FILE: &str = "latency-shard.json";

/// The shard of every unit of work, `EXPERIMENT/RUN` (or `EXPERIMENT/latency`), balanced by
/// estimated cost; empty without `--shard`.
fn shard_owners(experiments: &[Experiment], job: &ReproduceJob) -> Result<HashMap<String, usize>> {
    let Some(shard) = job.shard else {
        return Ok(HashMap::new());
    };
    let mut units = Vec::new();
    for exp in experiments {
        match exp.kind {
            Kind::Runs => {
                for run in exp.resolve(job.scale, job.block_size())? {
                    // Without --max-tokens a run scores the whole corpus: cost it as 1M tokens.
                    let tokens = run.options.max_tokens.unwrap_or(1 << 20);
                    let name = format!("{}/{}", exp.name, run.options.run_name());
                    units.push((name, estimated_cost(&run.options, tokens)));
                }
            }
            Kind::Latency => {
                let tokens: usize = exp.latency_caches(job.scale)?.iter().sum();
                let cost = estimated_cost(&EvalOptions::new(Strategy::Dense), tokens as u64);
                units.push((format!("{}/{LATENCY_UNIT}", exp.name), cost));
            }
            Kind::Chat => {
                for (_, chat) in chat_jobs(exp, job, Path::new(""))? {
                    let tokens = chat.total_tokens.unwrap_or(1 << 20);
                    let cost = estimated_cost(&EvalOptions::new(chat.strategy), tokens);
                    units.push((format!("{}/{}", exp.name, chat_dir_name(&chat)), cost));
                }
            }
        }
    }
    let owners = partition(&units, shard.count);
    Ok(units
        .into_iter()
        .map(|(name, _)| name)
        .zip(owners)
        .collect())
}

/// A latency experiment's points: those a shard measured, else measured now.
fn merged_or_measured_latency(
    lm: &LoadedModel,
    exp: &Experiment,
    job: &ReproduceJob,
    dir: &Path,
) -> Result<Vec<LatencyPoint>> {
    let shard_file = dir.join(LATENCY_FILE);
    if shard_file.is_file() && !job.policy.rerun {
        eprintln!("   latency measured by a shard: {}", shard_file.display());
        return LatencyPoint::read_json(&shard_file);
    }
    run_latency(lm, exp, job)
}

/// Runs the experiment's runs for which `mine(run name)` holds (all, without a shard).
fn run_experiment(
    lm: &LoadedModel,
    exp: &Experiment,
    job: &ReproduceJob,
    dir: &Path,
    mine: &dyn Fn(&str) -> bool,
) -> Result<Vec<RunEntry>> {
    let runs: Vec<_> = (exp.resolve(job.scale, job.block_size())?)
        .into_iter()
        .filter(|r| mine(&r.options.run_name()))
        .collect();
    let options: Vec<_> = runs.iter().map(|r| r.options.clone()).collect();
    let corpus = load_tokenized(lm, &job.corpus, exp.books.as_deref(), &options)?;
    let finished = run_each_once(runs.len(), &job.policy, |i, policy| {
        let options = &runs[i].options;
        let run_dir = dir.join(options.run_name());
        if !policy.rerun {
            let stream = stream_for(&lm.tokenizer, &corpus, options)?;
            let fp = fingerprint(options, &lm.identity(), &stream, numerics_epoch());
            reuse_finished(&run_dir, &fp, dir.parent())?;
        }
        run_one(lm, &corpus, &job.corpus, options, &run_dir, policy)
    })?;
    let stale = (finished.iter())
        .filter(|f| f.status == RunStatus::Stale)
        .count();
    let entries = runs
        .iter()
        .map(|run| RunEntry {
            id: run.id.clone(),
            dir: run.options.run_name(),
        })
        .collect();
    if stale > 0 {
        eprintln!(
            "   {stale} stale run(s) kept in {} (computed by another numerics epoch); `--rerun-stale` recomputes them",
            dir.display()
        );
    }
    Ok(entries)
}

/// Files that make a finished run folder.
const RUN_FILES: [&str; 3] = ["run.json", "nll.parquet", "memory.csv"];

/// If `run_dir` is not already the finished run with fingerprint `fp`, copies one from any
/// experiment folder beside it (`parent/*/*`), so the same computation is never done twice.
fn reuse_finished(run_dir: &Path, fp: &str, parent: Option<&Path>) -> Result<()> {
    let finished = |d: &Path| {
        RunRecord::read_json(&d.join("run.json"))
            .is_ok_and(|r| r.fingerprint == fp && check_log(d, &r).is_ok())
    };
    if finished(run_dir) {
        return Ok(());
    }
    let Some(parent) = parent.filter(|p| p.is_dir()) else {
        return Ok(());
    };
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(parent)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .flat_map(|exp| std::fs::read_dir(exp).into_iter().flatten())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    candidates.sort();
    let Some(source) = candidates.iter().find(|d| *d != run_dir && finished(d)) else {
        return Ok(());
    };
    std::fs::create_dir_all(run_dir)?;
    for file in RUN_FILES {
        let from = source.join(file);
        if from.is_file() {
            std::fs::copy(&from, run_dir.join(file))
                .with_context(|| format!("copying {} to {}", from.display(), run_dir.display()))?;
        }
    }
    eprintln!("   reused {} (same configuration)", source.display());
    Ok(())
}

/// A chat experiment's runs as generation jobs writing into `dir`, with their run ids: greedy,
/// the prompt file asked again and again until the scale's tokens are generated.
fn chat_jobs(
    exp: &Experiment,
    job: &ReproduceJob,
    dir: &Path,
) -> Result<Vec<(String, GenerateJob)>> {
    let Some(chat) = &exp.chat else {
        bail!("{}: kind = \"chat\" needs a [chat] table", exp.name);
    };
    let runs = exp.resolve(job.scale, job.block_size())?;
    Ok(runs
        .into_iter()
        .map(|run| {
            let generate = GenerateJob {
                model: job.model.clone(),
                compute: job.compute.clone(),
                strategy: run.options.strategy,
                prompts: Prompts::Repeat(job.experiments.join(&chat.prompts)),
                max_new_tokens: chat.max_new_tokens,
                sampling: Sampling::GREEDY,
                total_tokens: exp.max_tokens(job.scale),
                out: dir.to_path_buf(),
                echo: false,
                checkpoint_every: job.policy.checkpoint_every,
                rerun: job.policy.rerun,
            };
            (run.id, generate)
        })
        .collect())
}

/// The run folder's name within the experiment folder.
fn chat_dir_name(chat: &GenerateJob) -> String {
    let dir = chat.run_dir();
    dir.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Generates the chat experiment's conversations for which `mine(run folder)` holds, skipping
/// those already finished with the same settings (an interrupted one resumes from its
/// checkpoint).
fn run_chats(
    lm: &LoadedModel,
    exp: &Experiment,
    job: &ReproduceJob,
    dir: &Path,
    mine: &dyn Fn(&str) -> bool,
) -> Result<Vec<RunEntry>> {
    let mut entries = Vec::new();
    for (id, chat) in chat_jobs(exp, job, dir)? {
        let name = chat_dir_name(&chat);
        if mine(&name) {
            match finished_chat(&chat, lm) {
                Some(done) if !job.policy.rerun => eprintln!(
                    "   {id}: already done ({} tokens in {})",
                    done.tokens_generated,
                    chat.run_dir().display()
                ),
                _ => {
                    eprintln!("   {id}: generating with {}", chat.strategy);
                    generate_with(lm, &chat)?;
                }
            }
        }
        entries.push(RunEntry { id, dir: name });
    }
    Ok(entries)
}

/// The record of `chat`'s run folder when it holds the finished conversation `chat` asks for
/// on `lm`.
fn finished_chat(chat: &GenerateJob, lm: &LoadedModel) -> Option<GenerationRecord> {
    let record = GenerationRecord::read_json(&chat.run_dir().join("run.json")).ok()?;
    let same = record.model.sha256 == lm.info.sha256
        && record.model.details == lm.info.details
        && record.strategy == chat.strategy.to_string()
        && record.max_new_tokens == chat.max_new_tokens
        && Some(record.tokens_generated) == chat.total_tokens
        && (record.temperature, record.top_p, record.seed)
            == (
                chat.sampling.temperature,
                chat.sampling.top_p,
                chat.sampling.seed,
            );
    same.then_some(record)
}

fn run_latency(
    lm: &LoadedModel,
    exp: &Experiment,
    job: &ReproduceJob,
) -> Result<Vec<LatencyPoint>> {
    let Some(def) = &exp.latency else {
        bail!("{}: kind = \"latency\" needs a [latency] table", exp.name);
    };
    let caches = exp.latency_caches(job.scale)?;
    let steps = def.steps.get(job.scale).unwrap_or(1);
    let opts = LatencyOptions {
        caches: caches.clone(),
        sinks: def.sinks,
        steps,
        block_size: job.block_size(),
    };
    let need = opts.tokens_needed();
    let corpus = load_tokenized(
        lm,
        &job.corpus,
        None,
        &[EvalOptions {
            max_tokens: Some(need as u64),
            ..EvalOptions::new(Strategy::Dense)
        }],
    )?;
    let tokens: Vec<u32> = corpus.ids.concat().into_iter().take(need).collect();
    let bar = progress_bar(3 * caches.len() as u64, "latency", "measurements");
    let points = measure_latency(&lm.model, &tokens, &opts, &bar)?;
    bar.finish_and_clear();
    Ok(points)
}
