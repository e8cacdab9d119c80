//! Figures beyond the running-PPL plot: the sweep heatmap, Figure 10's latency and memory
//! against cache size, and Figure 5's long stream with its memory. (Being written.)

use std::path::Path;

use anyhow::Result;

use crate::latency::LatencyPoint;
use crate::memory::MemorySample;
use crate::nll_log::NllLog;

/// One cell of a sink x window sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeatmapCell {
    pub sinks: usize,
    pub window: usize,
    pub ppl: f64,
}

/// Grid of PPL, rows = sinks, columns = windows; writes `out` (PNG) and the SVG beside it.
pub fn plot_heatmap(_cells: &[HeatmapCell], _out: &Path, _title: &str) -> Result<()> {
    anyhow::bail!("plot_heatmap: not written yet")
}

/// Latency (ms/token) and peak memory against cache size, one line per method.
pub fn plot_latency(_points: &[LatencyPoint], _out: &Path, _title: &str) -> Result<()> {
    anyhow::bail!("plot_latency: not written yet")
}

/// A long stream: running and windowed PPL with book boundaries, and memory over the stream.
pub fn plot_long_stream(
    _log: &NllLog,
    _memory: &[MemorySample],
    _window: usize,
    _out: &Path,
    _title: &str,
) -> Result<()> {
    anyhow::bail!("plot_long_stream: not written yet")
}
