//! What `streamppl generate` writes into its run folder: `generation.parquet` (one row per
//! generated token), `generation.jsonl` (one [`TurnRecord`] per answered turn) and `run.json`
//! ([`GenerationRecord`]).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, Float32Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use super::float;
use super::run::{ModelInfo, Versions};
use crate::nll_log::write_parquet_atomically;

/// One generated token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratedToken {
    /// The conversation's turn (0, 1, ... over every question asked).
    pub turn: u32,
    /// Fed index the token has (or would have, for an end-of-turn token) in the stream.
    pub position: u64,
    pub token_id: u32,
    /// The model's NLL of the token it chose (its self-NLL).
    pub nll: f32,
    /// Keys the cache held when the token's distribution was computed.
    pub cache_keys: u32,
    /// Seconds from feeding the previous token to choosing this one (one one-token forward
    /// pass, the log-softmax and the choice).
    pub latency_s: f32,
    /// Resident memory of the process right after, in MiB.
    pub rss_mib: f32,
}

/// `generation.parquet`'s rows in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationLog {
    pub tokens: Vec<GeneratedToken>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("turn", DataType::UInt32, false),
        Field::new("position", DataType::UInt64, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new("nll", DataType::Float32, false),
        Field::new("cache_keys", DataType::UInt32, false),
        Field::new("latency_s", DataType::Float32, false),
        Field::new("rss_mib", DataType::Float32, false),
    ]))
}

impl GenerationLog {
    /// Writes the log atomically (temp file, then rename).
    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let u32s = |f: fn(&GeneratedToken) -> u32| {
            Arc::new(UInt32Array::from(
                self.tokens.iter().map(f).collect::<Vec<_>>(),
            ))
        };
        let f32s = |f: fn(&GeneratedToken) -> f32| {
            Arc::new(Float32Array::from(
                self.tokens.iter().map(f).collect::<Vec<_>>(),
            ))
        };
        let positions: Vec<u64> = self.tokens.iter().map(|t| t.position).collect();
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                u32s(|t| t.turn),
                Arc::new(UInt64Array::from(positions)),
                u32s(|t| t.token_id),
                f32s(|t| t.nll),
                u32s(|t| t.cache_keys),
                f32s(|t| t.latency_s),
                f32s(|t| t.rss_mib),
            ],
        )?;
        write_parquet_atomically(&batch, path)
    }

    pub fn read_parquet(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("{}: cannot open the generation log", path.display()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a parquet file", path.display()))?
            .build()?;
        let mut log = GenerationLog::default();
        for batch in reader {
            let batch = batch?;
            let column = |name: &str| {
                batch.column_by_name(name).with_context(|| {
                    format!(
                        "{}: the generation log has no `{name}` column",
                        path.display()
                    )
                })
            };
            let u32s = |name: &str| -> Result<UInt32Array> {
                match column(name)?.as_any().downcast_ref::<UInt32Array>() {
                    Some(a) => Ok(a.clone()),
                    None => bail!("{}: column `{name}` is not u32", path.display()),
                }
            };
            let f32s = |name: &str| -> Result<Float32Array> {
                match column(name)?.as_any().downcast_ref::<Float32Array>() {
                    Some(a) => Ok(a.clone()),
                    None => bail!("{}: column `{name}` is not f32", path.display()),
                }
            };
            let Some(position) = column("position")?.as_any().downcast_ref::<UInt64Array>() else {
                bail!("{}: column `position` is not u64", path.display());
            };
            let (turn, token, keys) = (u32s("turn")?, u32s("token_id")?, u32s("cache_keys")?);
            let (nll, latency, rss) = (f32s("nll")?, f32s("latency_s")?, f32s("rss_mib")?);
            for i in 0..batch.num_rows() {
                log.tokens.push(GeneratedToken {
                    turn: turn.value(i),
                    position: position.value(i),
                    token_id: token.value(i),
                    nll: nll.value(i),
                    cache_keys: keys.value(i),
                    latency_s: latency.value(i),
                    rss_mib: rss.value(i),
                });
            }
        }
        Ok(log)
    }
}

/// One answered turn: a line of `generation.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TurnRecord {
    /// The conversation's turn (0, 1, ...).
    pub turn: u32,
    pub question_id: String,
    /// Which of the question's turns (0 = its first).
    pub question_turn: u32,
    pub prompt: String,
    pub answer: String,
    /// Tokens fed for the turn before the answer (the rendered template's new text).
    pub prompt_tokens: u64,
    /// Tokens generated, the end-of-turn token included when it came.
    pub answer_tokens: u64,
    /// `end_of_turn`, `max_new_tokens` or `total_tokens`.
    pub stop: String,
    /// Share of the answer's 4-grams (of token ids) that already occurred earlier in the same
    /// answer: 0 for varied text, near 1 for a loop. `None` under 5 tokens.
    pub repeated_4grams: Option<f64>,
    pub seconds: f64,
}

impl TurnRecord {
    /// A `generation.jsonl`'s turns in order; an error names the line that is not a turn.
    pub fn read_jsonl(path: &Path) -> Result<Vec<TurnRecord>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the turns", path.display()))?;
        (text.lines().enumerate())
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line).with_context(|| {
                    format!("{}:{}: not a streamppl turn record", path.display(), i + 1)
                })
            })
            .collect()
    }
}

/// `run.json` of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationRecord {
    pub schema: u32,
    pub kind: String,
    pub strategy: String,
    pub label: String,
    pub model: ModelInfo,
    /// The prompt file, or `stdin` for `--interactive`.
    pub prompts: String,
    /// Whether the model's chat template rendered the turns (else plain `User:`/`Assistant:`).
    pub chat_template: bool,
    pub stop_tokens: Vec<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub turns: u32,
    pub tokens_generated: u64,
    /// Every token fed: prompts and answers.
    pub tokens_fed: u64,
    /// Generated tokens per second of their own forward passes.
    #[serde(with = "float")]
    pub tokens_per_second: f64,
    #[serde(with = "float")]
    pub median_latency_s: f64,
    /// exp(mean self-NLL) of the generated tokens.
    #[serde(with = "float")]
    pub self_ppl: f64,
    #[serde(with = "float")]
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    pub threads: usize,
    pub versions: Versions,
    pub finished_at: String,
}

/// [`GenerationRecord::schema`] written by this build.
pub const GENERATION_SCHEMA: u32 = 1;

impl GenerationRecord {
    pub fn read_json(path: &Path) -> Result<Self> {
        super::read_json(path, "generation record")
    }
}

/// The share of `ids`' 4-grams that occurred earlier in `ids` (see [`TurnRecord`]).
pub fn repeated_4grams(ids: &[u32]) -> Option<f64> {
    if ids.len() < 5 {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let grams = ids.windows(4);
    let total = grams.len();
    let repeated = grams.filter(|g| !seen.insert(*g)).count();
    Some(repeated as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_counts_4grams_seen_before() {
        assert_eq!(repeated_4grams(&[1, 2, 3, 4]), None);
        assert_eq!(repeated_4grams(&[1, 2, 3, 4, 5, 6]), Some(0.0));
        // 1 2 3 4 1 2 3 4: 5 4-grams, the last (1 2 3 4) repeats the first.
        assert_eq!(repeated_4grams(&[1, 2, 3, 4, 1, 2, 3, 4]), Some(0.2));
        assert!(repeated_4grams(&[7; 20]).unwrap() > 0.9);
    }

    #[test]
    fn the_log_round_trips_through_parquet() {
        let log = GenerationLog {
            tokens: (0..5)
                .map(|i| GeneratedToken {
                    turn: i / 2,
                    position: 10 + i as u64,
                    token_id: 100 + i,
                    nll: i as f32 * 0.5,
                    cache_keys: 3 + i,
                    latency_s: 0.01,
                    rss_mib: 512.0,
                })
                .collect(),
        };
        let path =
            std::env::temp_dir().join(format!("streamppl-gen-{}.parquet", std::process::id()));
        log.write_parquet(&path).unwrap();
        assert_eq!(GenerationLog::read_parquet(&path).unwrap(), log);
        std::fs::remove_file(path).unwrap();
    }
}
