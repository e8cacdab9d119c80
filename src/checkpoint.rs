//! Checkpoints: an interrupted run loses at most one checkpoint interval and resumes to the
//! same numbers, because the whole engine state (KV cache bits, slot map, log so far) is saved.
//!
//! Layout: `RUN_DIR/checkpoint/{state.json, nll.parquet, kv.safetensors}`, written to
//! `checkpoint.tmp/` and swapped in by renames.

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

    /// Writes the engine state as the new checkpoint. A kill at any instant leaves a whole
    /// checkpoint on disk: `checkpoint/`, or between the two renames `checkpoint.old/`, which
    /// `load` falls back to.
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
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if self.dir.exists() {
            std::fs::rename(&self.dir, &old)
                .with_context(|| format!("{}: cannot set aside", self.dir.display()))?;
        }
        std::fs::rename(&tmp, &self.dir)
            .with_context(|| format!("{}: cannot replace checkpoint", self.dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
        self.last = Instant::now();
        Ok(())
    }

    /// The saved state of this same run, if there is one.
    pub fn load(&self, n_layer: usize, device: &Device) -> Result<Option<EngineState>> {
        let old = self.dir.with_extension("old");
        let dir = if self.dir.join("state.json").is_file() {
            &self.dir
        } else {
            &old
        };
        let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else {
            return Ok(None);
        };
        let state: StateFile = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "note: {}: unreadable checkpoint ({e}); starting over",
                    dir.display()
                );
                return Ok(None);
            }
        };
        if state.fingerprint != self.fingerprint {
            eprintln!(
                "note: {} belongs to a different run configuration; starting over",
                dir.display()
            );
            return Ok(None);
        }
        let log = NllLog::read_parquet(&dir.join("nll.parquet"))?;
        let kv = match state.slot_token {
            Some(slots) => {
                let named = candle_core::safetensors::load(dir.join("kv.safetensors"), device)?;
                Some((KvCache::from_named_tensors(named, n_layer)?, slots))
            }
            None => None,
        };
        self.resumed.set(log.len());
        eprintln!(
            "resuming from {} ({} tokens already scored)",
            dir.display(),
            log.len()
        );
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
        for dir in [
            self.dir.clone(),
            self.dir.with_extension("old"),
            self.dir.with_extension("tmp"),
        ] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}
