//! Checkpoints: an interrupted run loses at most one checkpoint interval and resumes to the
//! same numbers, because the whole engine state (KV cache bits, slot map, log so far) is saved.
//!
//! Layout: `RUN_DIR/checkpoint/{state.json, nll.parquet, kv.safetensors}`, replaced atomically
//! (written to `checkpoint.tmp/`, then renamed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::model::KvCache;
use crate::nll_log::NllLog;

/// Engine state after `next` fed tokens of the stream.
pub struct EngineState {
    /// Index in the stream of the next token to feed.
    pub next: usize,
    pub log: NllLog,
    /// The token engine's cache and slot map; `None` for engines without state across windows.
    pub kv: Option<(KvCache, Vec<u64>)>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    /// Identifies the run (options, model, stream); a checkpoint of another run is ignored.
    fingerprint: String,
    next: usize,
    slot_token: Option<Vec<u64>>,
}

/// Saves engine state every `every` and loads it back.
pub struct Checkpointer {
    dir: PathBuf,
    fingerprint: String,
    every: Duration,
    last: Instant,
    /// Scored tokens restored by the last successful `load`.
    resumed: std::cell::Cell<usize>,
}

impl Checkpointer {
    pub fn new(run_dir: &Path, fingerprint: String, every: Duration) -> Self {
        Checkpointer {
            dir: run_dir.join("checkpoint"),
            fingerprint,
            every,
            last: Instant::now(),
            resumed: std::cell::Cell::new(0),
        }
    }

    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    /// Writes `state` as the new checkpoint, atomically.
    pub fn save(
        &mut self,
        next: usize,
        log: &NllLog,
        kv: Option<(&KvCache, &[u64])>,
    ) -> Result<()> {
        let tmp = self.dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        log.write_parquet(&tmp.join("nll.parquet"))?;
        if let Some((cache, _)) = kv {
            candle_core::safetensors::save(&cache.named_tensors(), tmp.join("kv.safetensors"))?;
        }
        let state = StateFile {
            fingerprint: self.fingerprint.clone(),
            next,
            slot_token: kv.map(|(_, slots)| slots.to_vec()),
        };
        std::fs::write(tmp.join("state.json"), serde_json::to_string(&state)?)?;
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::rename(&tmp, &self.dir)
            .with_context(|| format!("{}: cannot replace checkpoint", self.dir.display()))?;
        self.last = Instant::now();
        Ok(())
    }

    /// The saved state of this same run, if there is one.
    pub fn load(&self, n_layer: usize, device: &Device) -> Result<Option<EngineState>> {
        let Ok(text) = std::fs::read_to_string(self.dir.join("state.json")) else {
            return Ok(None);
        };
        let state: StateFile = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(_) => return Ok(None),
        };
        if state.fingerprint != self.fingerprint {
            eprintln!(
                "note: {} belongs to a different run configuration; starting over",
                self.dir.display()
            );
            return Ok(None);
        }
        let log = NllLog::read_parquet(&self.dir.join("nll.parquet"))?;
        let kv = match state.slot_token {
            Some(slots) => {
                let named =
                    candle_core::safetensors::load(self.dir.join("kv.safetensors"), device)?;
                Some((KvCache::from_named_tensors(named, n_layer)?, slots))
            }
            None => None,
        };
        Ok(Some(EngineState {
            next: state.next,
            log,
            kv,
        }))
    }

    /// How many scored tokens the last `load` restored (0 if none).
    pub fn resumed_tokens(&self) -> usize {
        self.resumed.get()
    }

    /// Removes the checkpoint once the run's final files are written.
    pub fn clear(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
