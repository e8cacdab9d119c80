//! One point of Figure 10 (per-token latency and peak memory against cache size), stored in
//! `experiment.json`.

use serde::{Deserialize, Serialize};

use super::float;

/// One measurement of one method at one cache size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyPoint {
    /// `recompute` (exact, one (C+1)-token forward per token), `streaming` (token engine,
    /// `sink:S+(C-S)` over a full cache) or `block` (block engine, same strategy).
    pub method: String,
    /// Cache size C = S + W.
    pub cache: usize,
    /// Mean wall time per token, milliseconds.
    #[serde(with = "float")]
    pub ms_per_token: f64,
    /// Tokens timed.
    pub tokens: usize,
    /// Peak RSS of the process while this method ran (VmHWM reset before it), MiB.
    #[serde(with = "float::option", default)]
    pub peak_rss_mib: Option<f64>,
}

impl LatencyPoint {
    /// Writes `points` as a JSON array (a shard's measurements, kept for the merge).
    pub fn write_json(points: &[LatencyPoint], path: &std::path::Path) -> anyhow::Result<()> {
        super::write_json(&points, path)
    }

    pub fn read_json(path: &std::path::Path) -> anyhow::Result<Vec<LatencyPoint>> {
        super::read_json(path, "latency shard record")
    }
}
