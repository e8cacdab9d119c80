//! `sweep.json`: a sink x window grid as run, each cell's folder and PPL.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::float;

/// The file name of the record, which marks a folder as a sweep's.
pub const SWEEP_JSON: &str = "sweep.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    pub model: String,
    pub corpus: Vec<String>,
    pub books: Option<String>,
    pub max_tokens: Option<u64>,
    pub sinks: Vec<usize>,
    pub windows: Vec<usize>,
    pub cells: Vec<SweepCell>,
    pub finished_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepCell {
    pub sinks: usize,
    pub window: usize,
    pub strategy: String,
    pub dir: String,
    pub tokens_scored: u64,
    #[serde(with = "float")]
    pub ppl: f64,
}

impl SweepRecord {
    pub fn read(dir: &Path) -> Result<Self> {
        super::read_json(&dir.join(SWEEP_JSON), "sweep record")
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        super::write_json(self, &dir.join(SWEEP_JSON))
    }
}
