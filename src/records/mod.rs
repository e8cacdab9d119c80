//! Every file streamppl writes for later reading, except the per-token log
//! ([`crate::nll_log`]): one place for the on-disk schemas, so that `report` reads files
//! without depending on the commands that wrote them.
//!
//! ```no_run
//! use streamppl::records::run::RunRecord;
//! let record = RunRecord::read_json("results/table1/sink:4+1020/run.json".as_ref()).unwrap();
//! println!("{} {:?} PPL {:.3}", record.strategy, record.options.kind, record.ppl);
//! ```
//!
//! - `run.json`: [`run::RunRecord`] (versioned by `schema`; older files load through a migration);
//! - `experiment.json`: [`experiment::ExperimentRecord`], with Figure 10's [`latency::LatencyPoint`]s;
//! - `sweep.json`: [`sweep::SweepRecord`];
//! - `memory.csv`: [`memory::MemorySample`]s;
//! - `results/bench/NAME.json`: [`bench::BenchReport`];
//! - a generation's `run.json`, `generation.jsonl` and `generation.parquet`: [`generation`].
//!
//! Floats that can be undefined (the standard error of one token) or infinite (a PPL over a
//! token of probability 0) round-trip through [`float`]: JSON has no NaN or infinity.

pub mod bench;
pub mod experiment;
pub mod float;
pub mod generation;
pub mod latency;
pub mod memory;
pub mod run;
pub mod sweep;

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `value` as pretty JSON, atomically (a temporary file, then a rename), so a crash
/// never leaves half a record.
pub fn write_json<T: Serialize>(value: &T, path: &Path) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// Reads a JSON record; `what` names it in errors, e.g. "experiment record".
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a streamppl {what}", path.display()))
}
