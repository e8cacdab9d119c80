//! The `eval` job: load model, tokenizer and corpus once, then run each strategy and write
//! `OUT/<run name>/nll.parquet` and `OUT/<run name>/run.json`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpointer;
use crate::corpus::{Book, load_corpora};
use crate::engine::{EngineKind, run_strategy};
use crate::eval::{EvalOptions, TokenizedCorpus, fingerprint, metrics, numerics_epoch, stream_for};
use crate::memory::MemorySampler;
use crate::model::Model;
use crate::model::gguf::load_gguf;
use crate::model::hf::load_hf;
use crate::records::memory::write_csv;
use crate::records::run::{
    CorpusInfo, KvCacheRecord, ModelDetails, ModelInfo, RUN_SCHEMA, RunOptionsRecord, RunRecord,
    Versions,
};
use crate::run_dir::{Existing, RunIdentity, RunLock, RunLocked, discard_contents, existing_run};
use crate::source::{HfModelFiles, HubSettings, ModelFiles, resolve_model};
use crate::strategy::Strategy;
use crate::stream::TokenStream;
use crate::tokenizer::TextTokenizer;

/// A loaded model with what run records say about it.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub info: ModelInfo,
}

impl LoadedModel {
    /// The model as a run's fingerprint knows it: its checksum, and its dtype unless f32 (so a
    /// bf16 run never stands in for an f32 one, and f32 runs keep their fingerprints).
    pub fn identity(&self) -> String {
        // The dtype asked for, not the activations' (f32 on the CPU whatever the weights are).
        match self.info.details.as_ref().map(|d| d.dtype.as_str()) {
            None | Some("f32") => self.info.sha256.clone(),
            Some(dtype) => format!("{} {dtype}", self.info.sha256),
        }
    }
}

/// Loads the model `--model` names: a GGUF file, a Hugging Face model folder, or a hub id
/// `org/name[@revision]` resolved through the hub cache (see [`crate::source`]), onto the
/// device and into the dtype `compute` says.
pub fn load_model(spec: &Path, compute: &Compute) -> Result<LoadedModel> {
    let resolved = resolve_model(&spec.to_string_lossy(), &HubSettings::from_env())?;
    let Compute { device, dtype } = compute;
    // The CPU computes in f32; there `--dtype bf16` stores the linear layers' weights in bf16.
    let load_dtype = if device.is_cpu() { DType::F32 } else { *dtype };
    let weight_files: Vec<PathBuf> = match &resolved.files {
        ModelFiles::Gguf(path) => vec![path.clone()],
        ModelFiles::HuggingFace(files) => files.weights.clone(),
    };
    let (model, sha256) = match &resolved.files {
        ModelFiles::Gguf(path) => (
            load_gguf(path, load_dtype, device)
                .map(|g| g.model)
                .map_err(anyhow::Error::from),
            sha256_file(path)?,
        ),
        ModelFiles::HuggingFace(files) => (
            load_hf(&files.config, &files.weights, load_dtype, device),
            checkpoint_digest(files)?,
        ),
    };
    let mut model = model.map_err(|e| too_large_or(e, spec, compute, &weight_files))?;
    if device.is_cpu() {
        model.place_linear_weights(*dtype)?;
    }
    let tokenizer = TextTokenizer::for_resolved(&resolved)?;
    tokenizer
        .check_vocab(model.dims.vocab_size)
        .with_context(|| format!("{}", resolved.source))?;
    let details = ModelDetails {
        source: resolved.source,
        model_type: model.arch.model_type.clone(),
        positions: model.arch.positions.clone(),
        dtype: dtype_name(*dtype).into(),
        device: device_name(device),
        parameters: model.parameter_count() as u64,
        bos_added: tokenizer.bos_added(),
    };
    let info = ModelInfo {
        path: spec.display().to_string(),
        sha256,
        architecture: model.arch.family.clone(),
        trained_context: model.dims.context_length,
        details: Some(details),
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        info,
    })
}

/// A load error, or for a model that ran out of GPU memory, a one-line error with the sizes.
fn too_large_or(
    err: anyhow::Error,
    spec: &Path,
    compute: &Compute,
    weight_files: &[PathBuf],
) -> anyhow::Error {
    let Some((free, total)) = gpu_memory(&compute.device) else {
        return err;
    };
    if !format!("{err:#}").contains("OUT_OF_MEMORY") {
        return err;
    }
    let on_disk: u64 = (weight_files.iter())
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    anyhow::anyhow!(
        "{}: does not fit on {} in {} (weights {:.1} GiB on disk; GPU {:.1} GiB free of {:.1} GiB); use a smaller --dtype, a smaller model or another GPU",
        spec.display(),
        device_name(&compute.device),
        dtype_name(compute.dtype),
        gib(on_disk),
        gib(free as u64),
        gib(total as u64),
    )
}

/// Free and total bytes of a GPU's memory; `None` on the CPU.
fn gpu_memory(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        return gpu.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

/// The tokenizer of the model `--model` names, without loading its weights.
pub fn load_tokenizer(spec: &Path) -> Result<TextTokenizer> {
    TextTokenizer::for_resolved(&resolve_model(
        &spec.to_string_lossy(),
        &HubSettings::from_env(),
    )?)
}

/// Where a model runs and in which precision (`--device`, `--dtype`).
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
}

impl Compute {
    /// The CPU engine: f32, the only precision its kernels compute in.
    pub fn cpu() -> Self {
        Compute {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// From `--device` and `--dtype`. Left out, the device is cuda:0 when this build has CUDA
    /// and a GPU is visible, else the CPU; the dtype bf16 on a GPU, f32 on the CPU.
    pub fn from_flags(device: Option<&str>, dtype: Option<&str>) -> Result<Self> {
        let device = match device {
            Some(spec) => parse_device(spec)?,
            None if cfg!(feature = "cuda") => parse_device("cuda").unwrap_or(Device::Cpu),
            None => Device::Cpu,
        };
        let dtype = match dtype {
            Some(spec) => parse_dtype(spec)?,
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
        };
        if device.is_cpu() && dtype == DType::F16 {
            bail!(
                "--dtype f16: the CPU engine computes in f32 from f32 or bf16 weights; use --dtype f32 or bf16, or --device cuda"
            );
        }
        Ok(Compute { device, dtype })
    }
}

/// `f32`, `bf16` or `f16`.
fn parse_dtype(spec: &str) -> Result<DType> {
    Ok(match spec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => bail!("--dtype {spec}: give f32, bf16 or f16"),
    })
}

/// `f32`, `bf16`, `f16` for records.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// The device `--device` names: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; a one-line error that
/// says how to build for CUDA, or which devices exist.
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Some(0),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        bail!("--device {spec}: give cpu, cuda or cuda:N");
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "--device {spec}: this streamppl was built without CUDA; build it with `cargo build --release --features cuda` (a CUDA toolkit is needed), or use --device cpu"
        );
    }
    let device = Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!(
            "--device {spec}: no such CUDA device ({}); check nvidia-smi, or use --device cpu",
            crate::one_line(e)
        )
    })?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = &device {
        crate::model::cuda::prepare(gpu)?;
    }
    Ok(device)
}

/// `cpu`, `cuda:0`, ... for records.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The identity of a Hugging Face checkpoint: sha256 over the lines `NAME SHA256` of its
/// config, tokenizer files and weight files, in that order (so any changed file changes it).
pub fn checkpoint_digest(files: &HfModelFiles) -> Result<String> {
    let mut lines = String::new();
    let named = [
        Some(&files.config),
        Some(&files.tokenizer),
        files.tokenizer_config.as_ref(),
    ];
    for path in named.into_iter().flatten().chain(&files.weights) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        lines.push_str(&format!("{name} {}\n", sha256_file(path)?));
    }
    let digest = Sha256::digest(lines.as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A progress bar on stderr with rate and ETA (hidden when stderr is not a terminal); its
/// message is free for a running figure (the engines show the running PPL).
pub fn progress_bar(len: u64, what: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = format!(
        "{{prefix:>24}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}} {{msg}}"
    );
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Selects books by `--books`: `N` (the first N, or all if fewer), `A-B` (indices A..=B) or
/// `I,J,K` (those indices, in that order; each at most once). Spaces around numbers are
/// ignored. Every index is checked against the corpus before anything is allocated.
pub fn select_books(books: Vec<Book>, spec: Option<&str>) -> Result<Vec<Book>> {
    let Some(spec) = spec else { return Ok(books) };
    let n = books.len();
    let fail = |why: String| anyhow::anyhow!("--books `{spec}`: {why}");
    let index = |s: &str| -> Result<usize> {
        let s = s.trim();
        if s.is_empty() {
            return Err(fail(
                "an index is missing; write N (first N books), A-B (indices, inclusive) or I,J,K"
                    .into(),
            ));
        }
        s.parse().map_err(|_| {
            fail(format!(
                "`{s}` is not a book index (a non-negative integer); write N (first N books), A-B (indices, inclusive) or I,J,K"
            ))
        })
    };
    let exists = |i: usize| -> Result<usize> {
        match i < n {
            true => Ok(i),
            false => Err(fail(format!(
                "book {i} does not exist; the corpus has {n} books, indices 0..={}",
                n.saturating_sub(1)
            ))),
        }
    };
    let idx: Vec<usize> = if spec.contains(',') {
        let mut seen = std::collections::HashSet::new();
        let mut idx = Vec::new();
        for item in spec.split(',') {
            let i = exists(index(item)?)?;
            if !seen.insert(i) {
                return Err(fail(format!(
                    "book {i} is listed twice; list each book once"
                )));
            }
            idx.push(i);
        }
        idx
    } else if let Some((a, b)) = spec.split_once('-') {
        let (a, b) = (index(a)?, index(b)?);
        if a > b {
            return Err(fail("the range is reversed; write A-B with A <= B".into()));
        }
        (a..=exists(b)?).collect()
    } else {
        match index(spec)? {
            0 => return Err(anyhow::anyhow!("--books 0 selects no book; give N >= 1")),
            first => (0..first.min(n)).collect(),
        }
    };
    Ok(idx.into_iter().map(|i| books[i].clone()).collect())
}

pub struct EvalJob {
    pub model: PathBuf,
    pub corpus: Vec<PathBuf>,
    pub books: Option<String>,
    pub runs: Vec<EvalOptions>,
    pub out: PathBuf,
    pub policy: RunPolicy,
    pub compute: Compute,
}

/// How `run_one` treats what a run folder already holds, and how often it checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct RunPolicy {
    /// How often a running strategy saves its state (an interruption loses at most this much).
    pub checkpoint_every: Duration,
    /// Start every run afresh, even one finished or checkpointed on disk.
    pub rerun: bool,
    /// Recompute finished runs of another numerics epoch (else they are kept and reported).
    pub rerun_stale: bool,
    /// Wait for a run another process is computing (then reuse it), instead of failing.
    pub wait_for_lock: bool,
}

impl RunPolicy {
    pub fn new(checkpoint_every: Duration) -> Self {
        RunPolicy {
            checkpoint_every,
            rerun: false,
            rerun_stale: false,
            wait_for_lock: false,
        }
    }
}

/// Runs `count` runs in order with `run(i, policy)`. A run another process is computing right
/// now (its folder locked) is skipped, said on stderr, and collected at the end by waiting for
/// that process and reusing its result: processes sharing an output folder compute each run
/// once, and each ends with every result.
pub fn run_each_once<T>(
    count: usize,
    policy: &RunPolicy,
    mut run: impl FnMut(usize, &RunPolicy) -> Result<T>,
) -> Result<Vec<T>> {
    let mut results: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let mut locked = Vec::new();
    for (i, slot) in results.iter_mut().enumerate() {
        match run(i, policy) {
            Ok(done) => *slot = Some(done),
            Err(e) if e.downcast_ref::<RunLocked>().is_some() => {
                eprintln!("skipped for now: {e}");
                locked.push(i);
            }
            Err(e) => return Err(e),
        }
    }
    let waiting = RunPolicy {
        wait_for_lock: true,
        rerun: false,
        ..*policy
    };
    for i in locked {
        results[i] = Some(run(i, &waiting)?);
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every run done"))
        .collect())
}

/// How a run's numbers came to be in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Computed,
    /// Finished before, with the same configuration.
    Reused,
    /// Finished before by another numerics epoch, and kept.
    Stale,
}

/// A finished run: its record and how it came to be.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub record: RunRecord,
    pub status: RunStatus,
}

/// Runs every strategy of the job; returns the finished runs in order.
pub fn run_eval(job: &EvalJob) -> Result<Vec<FinishedRun>> {
    for opts in &job.runs {
        opts.validate()?;
    }
    let lm = load_model(&job.model, &job.compute)?;
    let corpus = load_tokenized(&lm, &job.corpus, job.books.as_deref(), &job.runs)?;
    job.runs
        .iter()
        .map(|opts| {
            let dir = job.out.join(opts.run_name());
            run_one(&lm, &corpus, &job.corpus, opts, &dir, &job.policy)
        })
        .collect()
}

/// The line people know from llama.cpp's perplexity tool:
/// `sink:4+1020  PPL = 79.057 +/- 0.812  (8192 tokens, 218.9 tok/s)`; the +/- is PPL x the
/// standard error of the mean NLL (delta method).
pub fn summary_line(run: &FinishedRun) -> String {
    let r = &run.record;
    let pm = r
        .ppl_plus_minus()
        .map_or("n/a".to_string(), |v| format!("{v:.3}"));
    let mut name = r.strategy.clone();
    if let Some(dir) = run_name_suffix(r) {
        name.push_str(&dir);
    }
    let status = match run.status {
        RunStatus::Computed => "",
        RunStatus::Reused => ", already done",
        RunStatus::Stale => ", STALE: another numerics epoch",
    };
    format!(
        "{name}  PPL = {:.3} +/- {pm}  ({} tokens, {:.1} tok/s{status})",
        r.ppl, r.tokens_scored, r.tokens_per_second
    )
}

/// The variants of a run as its folder name writes them (`@no-pos-shift`, ...), if any.
fn run_name_suffix(r: &RunRecord) -> Option<String> {
    let name = r.options.eval_options().ok()?.run_name();
    name.find('@').map(|i| name[i..].to_string())
}

/// Loads the corpus, selects `--books`, and tokenizes (with a bar) as far as the longest of
/// `runs` needs: all books if any run wants the whole corpus.
pub fn load_tokenized(
    lm: &LoadedModel,
    corpus: &[PathBuf],
    books: Option<&str>,
    runs: &[EvalOptions],
) -> Result<TokenizedCorpus> {
    let books = select_books(load_corpora(corpus)?, books)?;
    let max_tokens = match runs.iter().any(|o| o.max_tokens.is_none()) {
        true => None,
        false => runs.iter().filter_map(|o| o.max_tokens).max(),
    };
    let bar = progress_bar(books.len() as u64, "tokenizing", "books");
    let corpus = TokenizedCorpus::new(&lm.tokenizer, books, max_tokens, &bar)?;
    bar.finish_and_clear();
    Ok(corpus)
}

/// Runs one strategy into `dir` (`nll.parquet`, `run.json`, `memory.csv`), holding the
/// folder's lock: resumes from its checkpoint, skips a finished run of the same configuration,
/// keeps (or with `rerun_stale` recomputes) one of another numerics epoch, and refuses to
/// overwrite one of another configuration unless `rerun`.
pub fn run_one(
    lm: &LoadedModel,
    corpus: &TokenizedCorpus,
    corpus_paths: &[PathBuf],
    opts: &EvalOptions,
    dir: &Path,
    policy: &RunPolicy,
) -> Result<FinishedRun> {
    let fed = crate::eval::corpus_as_fed(corpus, &lm.tokenizer, opts);
    let corpus: &TokenizedCorpus = &fed;
    let stream = stream_for(&lm.tokenizer, corpus, opts)?;
    let lock = match policy.wait_for_lock {
        true => RunLock::acquire_waiting(dir)?,
        false => RunLock::acquire(dir)?,
    };
    if policy.rerun {
        discard_contents(dir)?;
    }
    let epoch = numerics_epoch();
    let corpus_info = CorpusInfo {
        path: corpus_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
        books: corpus.books.len() as u32,
        max_tokens: opts.max_tokens,
    };
    let identity = RunIdentity {
        engine: opts.engine.name(opts.strategy).into(),
        block_size: block_size(opts),
        model_sha256: lm.info.sha256.clone(),
        corpus: corpus_info.path.clone(),
        books: corpus_info.books,
        max_tokens: opts.max_tokens,
        tokens_scored: stream.scored_count(),
        numerics_epoch: epoch,
    };
    let fingerprint_at = |e| fingerprint(opts, &lm.identity(), &stream, e);
    match existing_run(dir, &identity, fingerprint_at)? {
        Existing::Nothing => {}
        Existing::Same(record) => {
            eprintln!("{:<28} already done -> {}", opts.run_name(), dir.display());
            lock.finish();
            return Ok(FinishedRun {
                record,
                status: RunStatus::Reused,
            });
        }
        Existing::Stale(record) if !policy.rerun_stale => {
            eprintln!(
                "stale: {}: computed by numerics epoch {} (this build: {epoch}); `--rerun-stale` recomputes it",
                dir.display(),
                record.numerics_epoch
            );
            lock.finish();
            return Ok(FinishedRun {
                record,
                status: RunStatus::Stale,
            });
        }
        Existing::Stale(_) => discard_contents(dir)?,
        Existing::Other(difference) => bail!(
            "{}: holds a finished run of another configuration ({difference}); `--rerun` replaces it, or give another --out",
            dir.display()
        ),
    }
    let planned = PlannedRun {
        fingerprint: fingerprint_at(epoch),
        identity,
        corpus_info,
    };
    // One line per computed run: what a shared output folder's processes can be audited by.
    eprintln!("{:<28} computing -> {}", opts.run_name(), dir.display());
    let record = compute(lm, corpus, opts, dir, &stream, policy, planned)?;
    lock.finish();
    Ok(FinishedRun {
        record,
        status: RunStatus::Computed,
    })
}

/// Block size of the block engine in run records; `None` for the other engines.
fn block_size(opts: &EvalOptions) -> Option<usize> {
    match (opts.engine, opts.strategy) {
        (_, Strategy::Recompute { .. }) | (EngineKind::Token, _) => None,
        (EngineKind::Block(b), _) => Some(b),
    }
}

/// What a run to compute is known as before it runs.
struct PlannedRun {
    fingerprint: String,
    identity: RunIdentity,
    corpus_info: CorpusInfo,
}

/// Runs the engine over the stream (from the checkpoint, if any) and writes the run's files.
fn compute(
    lm: &LoadedModel,
    corpus: &TokenizedCorpus,
    opts: &EvalOptions,
    dir: &Path,
    stream: &TokenStream,
    policy: &RunPolicy,
    planned: PlannedRun,
) -> Result<RunRecord> {
    let PlannedRun {
        fingerprint,
        identity,
        corpus_info,
    } = planned;
    let mut ckpt = Checkpointer::new(dir, fingerprint.clone(), policy.checkpoint_every);
    let bar = progress_bar(stream.scored_count(), &opts.run_name(), "tok");
    reset_peak_rss();
    let memory = MemorySampler::start(bar.clone(), Duration::from_secs(1));
    let started = Instant::now();
    let model = crate::eval::model_for(&lm.model, opts)?;
    let log = run_strategy(
        &model,
        opts.strategy,
        opts.pos_shift,
        opts.engine,
        stream,
        &bar,
        Some(&mut ckpt),
    )?;
    let wall = started.elapsed().as_secs_f64();
    let memory = memory.stop();
    bar.finish_and_clear();
    let m = metrics(&log, corpus, &lm.tokenizer);
    // Throughput of this process only: tokens restored from a checkpoint took no time here.
    let scored_here = m.tokens - ckpt.resumed_tokens() as u64;
    let record = RunRecord {
        schema: RUN_SCHEMA,
        strategy: opts.strategy.to_string(),
        options: RunOptionsRecord::new(opts),
        label: opts.label(),
        engine: identity.engine.clone(),
        block_size: identity.block_size,
        numerics_epoch: identity.numerics_epoch,
        approximate: opts.is_approximate(),
        note: approximation_note(opts, &m),
        model: model_info_as_fed(&lm.info, opts),
        corpus: corpus_info,
        tokens_scored: m.tokens,
        tokens_fed: stream.len() as u64,
        books_scored: m.per_book.len() as u32,
        sum_nll: m.sum_nll,
        ppl: m.ppl,
        words: m.words,
        bytes: m.bytes,
        word_perplexity: m.word_perplexity,
        byte_perplexity: m.byte_perplexity,
        bits_per_byte: m.bits_per_byte,
        mean_nll_standard_error: m.mean_nll_standard_error,
        per_book: m.per_book,
        tokens_per_second: scored_here as f64 / wall,
        wall_seconds: wall,
        peak_rss_bytes: peak_rss_bytes(),
        kv_cache: kv_cache_record(&model, opts, stream.len()),
        threads: candle_core::utils::get_num_threads(),
        versions: versions(),
        finished_at: now_rfc3339(),
        fingerprint,
    };
    log.write_parquet(&dir.join("nll.parquet"))?;
    // Resident memory of this process over the run (a resumed run logs only its own part).
    write_csv(&memory, &dir.join("memory.csv"))?;
    record.write_json(&dir.join("run.json"))?;
    ckpt.clear()?;
    eprintln!(
        "{:<28} {:>7} tokens  ppl {:>10.3}  {:>7.1} tok/s  -> {}",
        opts.run_name(),
        m.tokens,
        m.ppl,
        record.tokens_per_second,
        dir.display()
    );
    Ok(record)
}

/// The KV cache of a run over `fed` tokens at its fullest, per kind of layer (grouped by
/// their own window and the keys they hold).
fn kv_cache_record(model: &Model, opts: &EvalOptions, fed: usize) -> Vec<KvCacheRecord> {
    let keys = crate::engine::peak_cache_keys(model, opts.strategy, opts.engine, fed);
    let bytes_per_key =
        2 * model.dims.n_kv_head * model.dims.head_dim * model.dtype().size_in_bytes();
    let mut kinds: Vec<KvCacheRecord> = Vec::new();
    for (window, keys) in model.layer_windows().into_iter().zip(keys) {
        match kinds
            .iter_mut()
            .find(|k| k.window == window && k.keys_per_layer == keys)
        {
            Some(kind) => kind.layers += 1,
            None => kinds.push(KvCacheRecord {
                window,
                layers: 1,
                keys_per_layer: keys,
                bytes: 0,
            }),
        }
    }
    for kind in &mut kinds {
        kind.bytes = (kind.layers * kind.keys_per_layer * bytes_per_key) as u64;
    }
    kinds
}

/// The model's record as the run fed it: with `--no-bos`, no BOS was added.
fn model_info_as_fed(info: &ModelInfo, opts: &EvalOptions) -> ModelInfo {
    let mut info = info.clone();
    if let Some(details) = info.details.as_mut() {
        details.bos_added &= opts.bos;
    }
    info
}

/// What a reader must know about numbers that estimate rather than compute the strategy.
fn approximation_note(opts: &EvalOptions, m: &crate::eval::Metrics) -> Option<String> {
    if opts.strategy.is_approximate() {
        return Some(format!(
            "{}: stride approximation of re-computation, not the exact strategy",
            opts.strategy
        ));
    }
    let k = opts.score_every.filter(|&k| k > 1)?;
    let mean = m.sum_nll / m.tokens.max(1) as f64;
    let ci = |z: f64| (mean + z * m.mean_nll_standard_error).exp();
    Some(format!(
        "{}: a sample, every {k}th token scored exactly ({} tokens); PPL {:.3}, 95% interval [{:.3}, {:.3}]",
        opts.strategy,
        m.tokens,
        m.ppl,
        ci(-1.96),
        ci(1.96)
    ))
}

/// Resets the kernel's peak-RSS counter (VmHWM) of this process, so each run (or latency
/// method) reports its own: what earlier work freed goes back to the OS first, rather than
/// count in this run's peak.
pub fn reset_peak_rss() {
    crate::model::huge_pages::return_freed_memory();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process since the last reset (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn versions() -> Versions {
    Versions {
        streamppl: env!("CARGO_PKG_VERSION").into(),
        candle: env!("STREAMPPL_CANDLE_VERSION").into(),
        tokenizers: env!("STREAMPPL_TOKENIZERS_VERSION").into(),
    }
}

/// UTC now as RFC 3339, without a date-time dependency.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `streamppl info`: where the model comes from, its family, shapes and position scheme, the
/// tokenizer, and the checksum run records use.
pub fn model_info(spec: &Path) -> Result<String> {
    let lm = load_model(spec, &Compute::cpu())?;
    let (d, a) = (&lm.model.dims, &lm.model.arch);
    let details = lm
        .info
        .details
        .as_ref()
        .expect("load_model fills the details");
    Ok(format!(
        "model: {}\nsource: {}\nsha256: {}\nfamily: {} ({}), {} parameters, {} on {}\n\
         {} layers, hidden {}, {} heads ({} KV heads), head dim {}, trained context: {}\n\
         positions: {}\nvocab: {} (tokenizer: {} entries, BOS added: {})\n",
        lm.info.path,
        details.source,
        lm.info.sha256,
        a.family,
        a.model_type,
        details.parameters,
        details.dtype,
        details.device,
        d.n_layer,
        d.hidden_size,
        d.n_head,
        d.n_kv_head,
        d.head_dim,
        d.context_length,
        a.positions,
        d.vocab_size,
        lm.tokenizer.vocab_size(),
        details.bos_added,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(n: usize) -> Vec<Book> {
        (0..n)
            .map(|i| Book {
                title: format!("book {i}"),
                url: None,
                publication_date: None,
                text: format!("text {i}"),
            })
            .collect()
    }

    fn titles(spec: &str) -> Vec<String> {
        select_books(corpus(5), Some(spec))
            .unwrap()
            .into_iter()
            .map(|b| b.title)
            .collect()
    }

    #[test]
    fn selects_first_n_a_range_or_a_list() {
        assert_eq!(titles("2"), ["book 0", "book 1"]);
        assert_eq!(titles("9").len(), 5, "N past the corpus is all books");
        assert_eq!(titles("1-3"), ["book 1", "book 2", "book 3"]);
        assert_eq!(titles("4-4"), ["book 4"]);
        assert_eq!(titles(" 3 , 0 "), ["book 3", "book 0"]);
        assert_eq!(select_books(corpus(2), None).unwrap().len(), 2);
    }

    #[test]
    fn rejects_bad_specs_with_one_line_naming_the_spec() {
        for (spec, want) in [
            ("0", "selects no book"),
            ("5-2", "the range is reversed"),
            ("0-18446744073709551615", "the corpus has 5 books"),
            ("0-99999999999999999999999", "is not a book index"),
            ("1,7", "book 7 does not exist"),
            ("1,,2", "an index is missing"),
            ("1,", "an index is missing"),
            ("-3", "an index is missing"),
            ("1,1", "listed twice"),
            ("a-b", "`a` is not a book index"),
            ("", "an index is missing"),
        ] {
            let e = select_books(corpus(5), Some(spec)).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("--books") && !e.contains('\n'),
                "{spec}: {e}"
            );
        }
    }
}
