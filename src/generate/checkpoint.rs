//! A chat's checkpoint: what its conversation holds between two turns, so that an interrupted
//! `streamppl generate`, run again with the same command, loses at most one checkpoint interval
//! (and the turn it was in) and goes on to the same tokens.
//!
//! Layout: `RUN_DIR/checkpoint/{state.json, kv.safetensors}` (the cache as an eval checkpoint
//! writes it, see [`crate::checkpoint`]), written to `checkpoint.tmp/` and swapped in by
//! renames. The generated tokens and turns are not copied: the run folder's
//! `generation.parquet` and `generation.jsonl` are rewritten after every turn, so they hold at
//! least the checkpoint's; `state.json` says how many and seals their token ids with a CRC-32,
//! and a resume keeps exactly those. A checkpoint that does not check out is reported on one
//! `note:` line and the chat starts over.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{KvState, read_kv, remove_if_present, save_kv};
use crate::model::{KvCache, Model};
use crate::records::generation::{GeneratedToken, GenerationLog, TurnRecord};

const STATE: &str = "state.json";
const KV: &str = "kv.safetensors";

/// The conversation between two turns, less its cache.
#[derive(Serialize, Deserialize)]
pub(super) struct ChatState {
    /// Turns answered, and tokens generated over them (rows of `generation.parquet`).
    pub turns: u32,
    pub tokens: usize,
    /// Over those tokens' (turn, id) pairs: see [`tokens_crc32`].
    pub tokens_crc32: u32,
    /// (question, turn) of the next user turn.
    pub next_turn: (usize, usize),
    /// The conversation so far: (role, content).
    pub messages: Vec<(String, String)>,
    pub fed_text: String,
    pub answer_start: usize,
    pub warned_prefix: bool,
    /// Tokens fed; the last one's hidden state (f32) and its forward pass in seconds.
    pub fed: u64,
    pub hidden: Vec<f32>,
    pub forward_s: f64,
    pub sampler_state: u64,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    /// The settings the chat runs with; a checkpoint of other settings is ignored.
    fingerprint: String,
    chat: ChatState,
    kv: KvState,
}

/// What a checkpoint restores: the conversation, the engine's cache and slot map, and the
/// tokens and turns generated before it.
pub(super) struct Restored {
    pub chat: ChatState,
    pub cache: KvCache,
    pub slot_token: Vec<u64>,
    pub log: GenerationLog,
    pub turns: Vec<TurnRecord>,
}

/// CRC-32 of the (turn, token id) pairs of `tokens`, little-endian.
pub(super) fn tokens_crc32(tokens: &[GeneratedToken]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for t in tokens {
        hasher.update(&t.turn.to_le_bytes());
        hasher.update(&t.token_id.to_le_bytes());
    }
    hasher.finalize()
}

/// Saves a chat's state every `every` (between turns) and loads it back.
pub(super) struct ChatCheckpoint {
    run_dir: PathBuf,
    fingerprint: String,
    every: Duration,
    last: Instant,
}

impl ChatCheckpoint {
    pub fn new(run_dir: &Path, fingerprint: String, every: Duration) -> Self {
        ChatCheckpoint {
            run_dir: run_dir.to_path_buf(),
            fingerprint,
            every,
            last: Instant::now(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.run_dir.join("checkpoint")
    }

    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    /// Writes `chat` and slots `0..slot_token.len()` of `cache` as the checkpoint; a kill at
    /// any instant leaves the previous checkpoint or this one whole.
    pub fn save(&mut self, chat: ChatState, cache: &KvCache, slot_token: &[u64]) -> Result<()> {
        let (dir, tmp, old) = (self.dir(), self.dir().with_extension("tmp"), self.old());
        remove_if_present(&tmp)?;
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        let state = StateFile {
            fingerprint: self.fingerprint.clone(),
            chat,
            kv: save_kv(cache, slot_token, &tmp.join(KV))?,
        };
        let path = tmp.join(STATE);
        std::fs::write(&path, serde_json::to_string(&state)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        remove_if_present(&old)?;
        if dir.exists() {
            std::fs::rename(&dir, &old)
                .with_context(|| format!("{}: cannot set aside", dir.display()))?;
        }
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("{}: cannot replace checkpoint", dir.display()))?;
        remove_if_present(&old)?;
        self.last = Instant::now();
        Ok(())
    }

    fn old(&self) -> PathBuf {
        self.dir().with_extension("old")
    }

    /// The saved chat, if a sound one of these settings exists (`checkpoint/`, else
    /// `checkpoint.old/` when a save was killed between its renames). Never fails: a
    /// checkpoint that does not check out is reported on one `note:` line and skipped.
    pub fn load(&self, model: &Model) -> Option<Restored> {
        let mut why = Vec::new();
        for dir in [self.dir(), self.old()] {
            if !dir.join(STATE).exists() {
                continue;
            }
            match self.read(&dir, model) {
                Ok(restored) => {
                    eprintln!(
                        "resuming from {} ({} turns, {} tokens already generated)",
                        dir.display(),
                        restored.chat.turns,
                        restored.chat.tokens
                    );
                    return Some(restored);
                }
                Err(e) => why.push(e),
            }
        }
        if !why.is_empty() {
            eprintln!("note: {}; starting over", why.join("; "));
        }
        None
    }

    fn read(&self, dir: &Path, model: &Model) -> std::result::Result<Restored, String> {
        let path = dir.join(STATE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let state: StateFile = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a chat checkpoint ({e})", path.display()))?;
        if state.fingerprint != self.fingerprint {
            return Err(format!(
                "{}: belongs to a chat with other settings",
                path.display()
            ));
        }
        let cache = read_kv(&dir.join(KV), &state.kv, model)?;
        let (log, turns) = self.generated_before(&state.chat)?;
        Ok(Restored {
            chat: state.chat,
            cache,
            slot_token: state.kv.slot_token,
            log,
            turns,
        })
    }

    /// The first tokens and turns of the run folder's logs, those the checkpoint covers.
    fn generated_before(
        &self,
        chat: &ChatState,
    ) -> std::result::Result<(GenerationLog, Vec<TurnRecord>), String> {
        let parquet = self.run_dir.join("generation.parquet");
        let mut log = GenerationLog::read_parquet(&parquet).map_err(|e| format!("{e:#}"))?;
        let jsonl = self.run_dir.join("generation.jsonl");
        let mut turns = TurnRecord::read_jsonl(&jsonl).map_err(|e| format!("{e:#}"))?;
        if log.tokens.len() < chat.tokens || turns.len() < chat.turns as usize {
            return Err(format!(
                "{}: holds {} tokens and {} turns, fewer than the checkpoint's {} and {}",
                self.run_dir.display(),
                log.tokens.len(),
                turns.len(),
                chat.tokens,
                chat.turns
            ));
        }
        log.tokens.truncate(chat.tokens);
        turns.truncate(chat.turns as usize);
        if tokens_crc32(&log.tokens) != chat.tokens_crc32 {
            return Err(format!(
                "{}: its first {} tokens are not the checkpoint's",
                parquet.display(),
                chat.tokens
            ));
        }
        Ok((log, turns))
    }

    /// Removes the checkpoint once the chat's final files are written.
    pub fn clear(&self) -> Result<()> {
        for dir in [self.dir(), self.old(), self.dir().with_extension("tmp")] {
            remove_if_present(&dir)?;
        }
        Ok(())
    }
}
