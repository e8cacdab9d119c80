//! `experiment.json`: an experiment's definition as run and where its results are. Tables,
//! figures and REPRODUCTION.md are regenerated from it and the run folders, never from memory.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::latency::LatencyPoint;
use super::run::Versions;
use crate::experiment::{Experiment, Scale};

/// The file name of the record, which marks a folder as an experiment's.
pub const EXPERIMENT_JSON: &str = "experiment.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub experiment: Experiment,
    pub scale: Scale,
    pub model: String,
    pub corpus: Vec<String>,
    /// Run folders, in the experiment's order.
    pub runs: Vec<RunEntry>,
    /// Figure 10's measurements (latency experiments only).
    #[serde(default)]
    pub latency: Vec<LatencyPoint>,
    pub threads: usize,
    pub versions: Versions,
    pub finished_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEntry {
    pub id: String,
    /// Folder of the run, relative to the experiment folder.
    pub dir: String,
}

impl ExperimentRecord {
    pub fn read(dir: &Path) -> Result<Self> {
        super::read_json(&dir.join(EXPERIMENT_JSON), "experiment record")
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        super::write_json(self, &dir.join(EXPERIMENT_JSON))
    }
}
