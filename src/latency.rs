//! Per-token decoding latency and peak memory against cache size (the paper's Figure 10):
//! sliding window with re-computation vs StreamingLLM on the token engine, plus the block
//! engine's time per token. (Being written: see `measure_latency`.)

use serde::{Deserialize, Serialize};

/// One measurement of one method at one cache size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyPoint {
    /// `recompute` (exact, one (C+1)-token forward per token), `streaming` (token engine,
    /// `sink:S+(C-S)` over a full cache) or `block` (block engine, same strategy).
    pub method: String,
    /// Cache size C = S + W.
    pub cache: usize,
    /// Mean wall time per token, milliseconds.
    pub ms_per_token: f64,
    /// Tokens timed.
    pub tokens: usize,
    /// Peak RSS of the process while this method ran (VmHWM reset before it), MiB.
    pub peak_rss_mib: Option<f64>,
}
