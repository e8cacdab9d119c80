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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `value` as pretty JSON, atomically (see [`write_atomically`]).
pub fn write_json<T: Serialize>(value: &T, path: &Path) -> Result<()> {
    write_atomically(
        path,
        (serde_json::to_string_pretty(value)? + "\n").as_bytes(),
    )
}

/// Writes `bytes` to a temporary file beside `path`, then renames it in: a crash never leaves
/// half a file, and two processes writing the same file (two runs of one sweep) each rename a
/// whole file of their own.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_aside(path, |tmp| {
        std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))
    })
}

/// Has `write` make the file at a temporary path beside `path` ([`temp_beside`]), then renames
/// it in; a failed write leaves no temporary file behind.
pub fn write_aside(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_beside(path);
    let written = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the write's error matters more
    }
    written
}

/// A temporary name beside `path` that no other process or thread uses (pid and a counter),
/// ending in `path`'s own name so that writers which go by the extension (PNG) still work.
pub fn temp_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".tmp-{}-{n}-{name}", std::process::id()))
}

/// Reads a JSON record; `what` names it in errors, e.g. "experiment record".
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a streamppl {what}", path.display()))
}
