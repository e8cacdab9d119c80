//! `results/bench/NAME.json`: the speed and memory figures of one `streamppl bench` run, with
//! the machine they ran on.

use serde::{Deserialize, Serialize};

use super::float;
use super::run::Versions;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub name: String,
    pub strategy: String,
    pub engine: String,
    pub block_size: Option<usize>,
    pub tokens: u64,
    #[serde(with = "float")]
    pub tokens_per_second: f64,
    #[serde(with = "float")]
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    #[serde(with = "float")]
    pub ppl: f64,
    /// The model measured, when not the report's (`--also-model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub name: String,
    pub machine: Machine,
    pub threads: usize,
    /// Each figure is one run (the runs are long; their own progress is steady after warm-up).
    pub runs_per_figure: u32,
    pub model: String,
    pub corpus: String,
    pub measurements: Vec<Measurement>,
    /// Block-engine over token-engine tokens/s for `sink:4+1020`.
    pub block_speedup: f64,
    /// Peak RSS of the long flat-memory run over the short one.
    pub rss_ratio_long_over_short: Option<f64>,
    /// The memory-bandwidth floor of the token engine (absent from reports of before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_floor: Option<TokenFloor>,
    pub versions: Versions,
    pub finished_at: String,
}

/// What one token's weights cost at the machine's memory bandwidth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenFloor {
    /// Read bandwidth, GB/s: the best of several passes summing a buffer far larger than the
    /// caches, on the bench's threads, on huge pages where granted, each pass with and without
    /// software prefetch (the weights' placement and the kernel's reads).
    #[serde(with = "float")]
    pub read_gb_per_s: f64,
    pub buffer_bytes: u64,
    pub passes: u32,
    /// Weight bytes one token reads (see `Model::weight_bytes_per_token`).
    pub weight_bytes_per_token: u64,
    /// read_gb_per_s / weight bytes: no engine that reads every weight per token runs faster.
    #[serde(with = "float")]
    pub floor_tokens_per_second: f64,
    /// The token engine's tokens/s over the floor's.
    #[serde(with = "float")]
    pub token_engine_share: f64,
    /// Bytes of keys and values one step reads besides, over the token engine's full
    /// `sink:4+1020` cache (1025 slots); 0 in benches from before it was recorded.
    #[serde(default)]
    pub kv_bytes_per_token: u64,
    /// read_gb_per_s / (weight + KV bytes): the floor of a step over that cache.
    #[serde(default, with = "float")]
    pub floor_with_cache_tokens_per_second: f64,
    /// How the paired rounds read the bandwidth: 0 (benches before it was recorded) a probe of
    /// 3 passes before each round's steps; else a slice of this many bytes of the probe's
    /// buffer after each step, both ways, the round's rate the better way's over its slices.
    #[serde(default)]
    pub paired_slice_bytes: u64,
    /// The same share measured in pairs (token-engine steps and the bandwidth beside them),
    /// round by round; empty in benches from before it was recorded, or when the corpus was
    /// too short for it.
    #[serde(default)]
    pub paired: Vec<PairedRound>,
    /// Where the paired rounds' steps went; absent from benches of before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_breakdown: Option<StepBreakdown>,
}

/// The paired rounds' one-token steps by kind of work: each kernel's wall time on the calling
/// thread and the bytes it read (see `model::step_tally`), per step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepBreakdown {
    pub steps: u64,
    /// Mean wall time of a step, milliseconds.
    #[serde(with = "float")]
    pub step_ms: f64,
    /// In `step_tally::Work`'s order: the weight matrices by shape, then attention.
    pub parts: Vec<StepPart>,
    /// Whether the matrix kernel asked for its weights ahead of its reads (it does on Intel
    /// CPUs, not on AMD's: `model::kernels::asks_for_weights`); absent from benches of before
    /// it was recorded (they asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_asked_ahead: Option<bool>,
    /// The probe's read rate over all the slices read between these steps (bytes over
    /// seconds), what each part's rate is set against; absent from benches of before it was
    /// recorded (their parts were set against the rounds' median probe).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "float::option"
    )]
    pub probe_gb_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepPart {
    /// `matrix ROWSxCOLS` (a weight matrix of that shape) or `attention` (keys and values).
    pub work: String,
    #[serde(with = "float")]
    pub calls_per_step: f64,
    #[serde(with = "float")]
    pub ms_per_step: f64,
    /// Bytes read over wall time (attention: its keys and values, not its RoPE tables).
    #[serde(with = "float")]
    pub read_gb_per_s: f64,
}

/// One round of the paired floor measurement: the read bandwidth (best of a few passes), then
/// the token engine's one-token steps over its full `sink:4+1020` cache, back to back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedRound {
    #[serde(with = "float")]
    pub read_gb_per_s: f64,
    /// One-token steps timed.
    pub steps: u64,
    #[serde(with = "float")]
    pub tokens_per_second: f64,
    /// tokens_per_second over this round's floor (read_gb_per_s / weight bytes per token).
    #[serde(with = "float")]
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    /// 1-minute load average when the bench started (an idle machine reads near 0).
    pub load_average_at_start: f64,
}
