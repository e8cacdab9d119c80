//! `run.json`: everything needed to regenerate tables and plots of one run without re-running,
//! with the run's options as data (not only as a label).
//!
//! Schema history: 1 (no `schema` field) had the strategy only as its spec and label; 2 adds
//! the options (`kind`, `sinks`, `window`, `stride`, `pos_shift`, `sink_text`,
//! `score_every`), `numerics_epoch` and floats that may be NaN or infinite. A schema-1 file
//! loads through [`migrate_v1`].

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::eval::EvalOptions;
use crate::strategy::Strategy;

use super::float;

/// The schema this build writes.
pub const RUN_SCHEMA: u32 = 2;

/// The strategy family, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    Dense,
    Window,
    Sink,
    Recompute,
}

/// A run's options: what [`EvalOptions`] holds, less the engine (kept beside it in the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOptionsRecord {
    pub kind: StrategyKind,
    /// Sink tokens S (0 but for `sink`).
    pub sinks: usize,
    /// Recent window W (`window`, `sink`, `recompute`); `None` for dense.
    pub window: Option<usize>,
    /// Stride s of `recompute` (1 = exact); `None` otherwise.
    pub stride: Option<usize>,
    /// `false` is `--no-pos-shift`: keys cached at their stream positions.
    pub pos_shift: bool,
    /// `--sink-text`, as the program received it (escapes interpreted).
    pub sink_text: Option<String>,
    /// `--score-every k`: a systematic 1-in-k sample.
    pub score_every: Option<u64>,
    /// `--local-sinks`: the sinks visible in layers with a window of their own too (written
    /// only when set, so records of other runs are unchanged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_sinks: bool,
    /// `false` is `--no-bos` (written only then).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub bos: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl RunOptionsRecord {
    pub fn new(opts: &EvalOptions) -> Self {
        let (kind, sinks, window, stride) = match opts.strategy {
            Strategy::Dense => (StrategyKind::Dense, 0, None, None),
            Strategy::Sink { sinks: 0, window } => (StrategyKind::Window, 0, Some(window), None),
            Strategy::Sink { sinks, window } => (StrategyKind::Sink, sinks, Some(window), None),
            Strategy::Recompute { window, stride } => {
                (StrategyKind::Recompute, 0, Some(window), Some(stride))
            }
        };
        RunOptionsRecord {
            kind,
            sinks,
            window,
            stride,
            pos_shift: opts.pos_shift,
            sink_text: opts.sink_text.clone(),
            score_every: opts.score_every,
            local_sinks: opts.local_sinks,
            bos: opts.bos,
        }
    }

    /// The strategy these fields describe; an error if they do not make one.
    pub fn strategy(&self) -> Result<Strategy> {
        let window = || {
            self.window
                .filter(|&w| w > 0)
                .with_context(|| format!("a {:?} run needs a window of at least 1", self.kind))
        };
        Ok(match self.kind {
            StrategyKind::Dense => Strategy::Dense,
            StrategyKind::Window => Strategy::Sink {
                sinks: 0,
                window: window()?,
            },
            StrategyKind::Sink => Strategy::Sink {
                sinks: self.sinks,
                window: window()?,
            },
            StrategyKind::Recompute => Strategy::Recompute {
                window: window()?,
                stride: self.stride.unwrap_or(1),
            },
        })
    }

    /// The options these fields describe (the engine left at its default: it is kept beside
    /// them in the record).
    pub fn eval_options(&self) -> Result<EvalOptions> {
        Ok(EvalOptions {
            pos_shift: self.pos_shift,
            sink_text: self.sink_text.clone(),
            score_every: self.score_every,
            local_sinks: self.local_sinks,
            bos: self.bos,
            ..EvalOptions::new(self.strategy()?)
        })
    }

    /// Whether only a sample of the tokens was scored (`--score-every k`, k > 1).
    pub fn is_sample(&self) -> bool {
        self.score_every.is_some_and(|k| k > 1)
    }
}

/// `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// [`RUN_SCHEMA`] when written by this build; 1 for a migrated older file.
    pub schema: u32,
    /// Strategy spec as given on the command line, e.g. `sink:4+252`.
    pub strategy: String,
    /// The options as data; reports read these, never the label.
    #[serde(flatten)]
    pub options: RunOptionsRecord,
    /// Human-readable label for tables and plot legends, e.g. `StreamingLLM 4+252`.
    pub label: String,
    /// `token` (token-by-token), `block` (block-parallel) or `windows` (recompute).
    pub engine: String,
    /// Fed tokens per forward pass of the block engine.
    pub block_size: Option<usize>,
    /// The numerics epoch of the build that computed the NLLs (see
    /// [`crate::eval::NUMERICS_EPOCH`]).
    pub numerics_epoch: u32,
    /// True when the reported numbers are an approximation (the stride approximation of
    /// re-computation, or a `--score-every` sample).
    pub approximate: bool,
    /// Free-text qualification of the numbers, if any.
    pub note: Option<String>,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    /// Scored tokens.
    pub tokens_scored: u64,
    /// Fed tokens, injected sink tokens included.
    pub tokens_fed: u64,
    pub books_scored: u32,
    #[serde(with = "float")]
    pub sum_nll: f64,
    #[serde(with = "float")]
    pub ppl: f64,
    pub words: u64,
    pub bytes: u64,
    #[serde(with = "float")]
    pub word_perplexity: f64,
    #[serde(with = "float")]
    pub byte_perplexity: f64,
    #[serde(with = "float")]
    pub bits_per_byte: f64,
    /// Standard error of the mean NLL (NaN below two tokens); a `--score-every` sample's PPL is
    /// exp(mean +/- 1.96 SE), and any PPL is +/- PPL x SE (delta method).
    #[serde(with = "float")]
    pub mean_nll_standard_error: f64,
    pub per_book: Vec<BookMetrics>,
    #[serde(with = "float")]
    pub tokens_per_second: f64,
    #[serde(with = "float")]
    pub wall_seconds: f64,
    /// Peak resident memory of the process during this run (Linux VmHWM, reset at the start).
    pub peak_rss_bytes: Option<u64>,
    /// The KV cache at its fullest, per kind of layer (absent for `recompute`, which keeps none,
    /// and in records written before it was kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_cache: Vec<KvCacheRecord>,
    pub threads: usize,
    pub versions: Versions,
    /// UTC time the run finished, RFC 3339.
    pub finished_at: String,
    /// Hash of the options, model, token stream and numerics epoch: a rerun with the same one
    /// is skipped.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// The `--model` argument as given.
    pub path: String,
    /// Of the GGUF file; of a Hugging Face checkpoint, over its config, tokenizer and weight
    /// files (see `runner::checkpoint_digest`).
    pub sha256: String,
    /// The family (`llama`, `gpt_neox`, `falcon`, `mpt`).
    pub architecture: String,
    pub trained_context: usize,
    /// The fields below are absent from records written before Hugging Face checkpoints loaded
    /// (all of those are the GGUF Llama, in f32, on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<ModelDetails>,
}

/// What a run record says of its model beyond the file: where it came from, how it was run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelDetails {
    pub source: crate::source::ModelSource,
    /// What the checkpoint calls itself (`model_type`, GGUF `general.architecture`).
    pub model_type: String,
    /// The position scheme in words, e.g. `rope half-split, 64 of each head's channels, ...`.
    pub positions: String,
    /// The compute dtype (weights on disk in f16 or bf16 are upcast to it).
    pub dtype: String,
    pub device: String,
    pub parameters: u64,
    /// Whether the tokenizer puts a BOS token before every book.
    pub bos_added: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusInfo {
    pub path: String,
    pub books: u32,
    pub max_tokens: Option<u64>,
}

/// The KV cache of one kind of layer: those with the same own window holding as many keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KvCacheRecord {
    /// The layers' own sliding window (`None`: global layers, which follow the strategy alone).
    pub window: Option<usize>,
    pub layers: usize,
    /// Keys (and as many values) each of these layers holds at most during the run.
    pub keys_per_layer: usize,
    /// Bytes of those keys and values in all of these layers, in the compute dtype.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BookMetrics {
    pub book: u32,
    pub title: String,
    pub tokens_scored: u64,
    #[serde(with = "float")]
    pub ppl: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Versions {
    pub streamppl: String,
    pub candle: String,
    pub tokenizers: String,
}

impl RunRecord {
    /// The mean NLL's standard error as a PPL interval half-width (delta method: PPL x SE);
    /// `None` when undefined (fewer than two scored tokens).
    pub fn ppl_plus_minus(&self) -> Option<f64> {
        let pm = self.ppl * self.mean_nll_standard_error;
        pm.is_finite().then_some(pm)
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        super::write_json(self, path)
    }

    /// Reads `run.json` of any schema this build knows; a schema-1 file is migrated in memory
    /// (its options taken from its strategy spec and its run folder's name, which that version
    /// wrote from the options).
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read run record", path.display()))?;
        let mut value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a streamppl run.json", path.display()))?;
        match value.get("schema").map(|s| s.as_u64()) {
            None => migrate_v1(&mut value, path)?,
            Some(Some(v)) if v == RUN_SCHEMA as u64 => {}
            Some(Some(v)) if v > RUN_SCHEMA as u64 => bail!(
                "{}: run.json schema {v} is newer than this streamppl reads ({RUN_SCHEMA}); update streamppl",
                path.display()
            ),
            Some(other) => bail!(
                "{}: unknown run.json schema {other:?}; recompute the run with `streamppl eval ... --rerun`",
                path.display()
            ),
        }
        serde_json::from_value(value)
            .with_context(|| format!("{}: not a streamppl run.json", path.display()))
    }
}

/// Fills the schema-2 fields of a schema-1 record: kind, sizes and stride from its `strategy`
/// spec; `pos_shift`, `sink_text` and `score_every` from the variant suffixes that version's
/// run folder names carry (`@no-pos-shift`, `@sink-text=%0A`, `@every-512`); numerics epoch 1.
fn migrate_v1(value: &mut serde_json::Value, path: &Path) -> Result<()> {
    let regenerate = || {
        format!(
            "{}: a run.json from an older streamppl that cannot be migrated; recompute it with `streamppl eval ... --rerun`",
            path.display()
        )
    };
    let spec = value
        .get("strategy")
        .and_then(|s| s.as_str())
        .with_context(regenerate)?;
    let strategy: Strategy = spec.parse().with_context(regenerate)?;
    let folder = path
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut opts = EvalOptions::new(strategy);
    for variant in folder.split('@').skip(1) {
        if variant == "no-pos-shift" {
            opts.pos_shift = false;
        } else if let Some(k) = variant.strip_prefix("every-") {
            opts.score_every = Some(k.parse().with_context(regenerate)?);
        } else if let Some(text) = variant.strip_prefix("sink-text=") {
            opts.sink_text = Some(percent_decode(text).with_context(regenerate)?);
        } else {
            return Err(anyhow::anyhow!(regenerate()));
        }
    }
    let fields = serde_json::to_value(RunOptionsRecord::new(&opts))?;
    let (Some(obj), serde_json::Value::Object(fields)) = (value.as_object_mut(), fields) else {
        bail!(regenerate());
    };
    obj.extend(fields);
    obj.insert("schema".into(), 1.into());
    obj.entry("numerics_epoch").or_insert(1.into());
    obj.entry("block_size").or_insert(serde_json::Value::Null);
    obj.entry("peak_rss_bytes")
        .or_insert(serde_json::Value::Null);
    obj.entry("mean_nll_standard_error")
        .or_insert(serde_json::Value::Null);
    obj.entry("fingerprint").or_insert("".into());
    Ok(())
}

/// Inverse of the `%XX` escaping of run folder names (every byte but ASCII alphanumerics).
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}
