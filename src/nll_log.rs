//! Per-token NLL logs (`nll.parquet`) and the self-describing run record (`run.json`).
//!
//! ```no_run
//! use streamppl::nll_log::{NllLog, NllRecord};
//! let mut log = NllLog::default();
//! log.push(NllRecord { position: 0, book: 0, token_id: 42, nll: 3.2 });
//! log.write_parquet(std::path::Path::new("nll.parquet")).unwrap();
//! ```

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, Float32Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

/// One scored token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NllRecord {
    /// Index of the fed token (in the corpus stream, across books, injected sink tokens excluded)
    /// after which this token was scored.
    pub position: u64,
    /// Index of the book (document) in the corpus.
    pub book: u32,
    /// The scored token.
    pub token_id: u32,
    /// Natural-log negative log-likelihood.
    pub nll: f32,
}

/// The per-token log of one run, in scoring order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NllLog {
    pub records: Vec<NllRecord>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("position", DataType::UInt64, false),
        Field::new("book", DataType::UInt32, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new("nll", DataType::Float32, false),
    ]))
}

impl NllLog {
    pub fn push(&mut self, r: NllRecord) {
        self.records.push(r);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Sum of NLLs, accumulated in f64.
    pub fn sum_nll(&self) -> f64 {
        self.records.iter().map(|r| r.nll as f64).sum()
    }

    /// exp(mean NLL).
    pub fn ppl(&self) -> f64 {
        (self.sum_nll() / self.len().max(1) as f64).exp()
    }

    /// Running PPL after each scored token: exp(cumulative mean NLL).
    pub fn running_ppl(&self) -> Vec<f64> {
        let mut sum = 0f64;
        self.records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                sum += r.nll as f64;
                (sum / (i + 1) as f64).exp()
            })
            .collect()
    }

    /// Writes the log atomically (temp file, then rename), so a crash never leaves half a file.
    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let col = |f: fn(&NllRecord) -> u64| self.records.iter().map(f).collect::<Vec<_>>();
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(UInt64Array::from(col(|r| r.position))),
                Arc::new(UInt32Array::from(
                    self.records.iter().map(|r| r.book).collect::<Vec<_>>(),
                )),
                Arc::new(UInt32Array::from(
                    self.records.iter().map(|r| r.token_id).collect::<Vec<_>>(),
                )),
                Arc::new(Float32Array::from(
                    self.records.iter().map(|r| r.nll).collect::<Vec<_>>(),
                )),
            ],
        )?;
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = ArrowWriter::try_new(file, schema(), None)?;
        writer.write(&batch)?;
        writer.close()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    pub fn read_parquet(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("{}: cannot open NLL log", path.display()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a parquet file", path.display()))?
            .build()?;
        let mut log = NllLog::default();
        for batch in reader {
            let batch = batch?;
            let get = |name: &str| {
                batch
                    .column_by_name(name)
                    .with_context(|| format!("{}: NLL log has no `{name}` column", path.display()))
            };
            let (pos, book, tok, nll) = (
                get("position")?,
                get("book")?,
                get("token_id")?,
                get("nll")?,
            );
            let (Some(pos), Some(book), Some(tok), Some(nll)) = (
                pos.as_any().downcast_ref::<UInt64Array>(),
                book.as_any().downcast_ref::<UInt32Array>(),
                tok.as_any().downcast_ref::<UInt32Array>(),
                nll.as_any().downcast_ref::<Float32Array>(),
            ) else {
                bail!(
                    "{}: NLL log columns have unexpected types (want u64, u32, u32, f32)",
                    path.display()
                );
            };
            for i in 0..batch.num_rows() {
                log.push(NllRecord {
                    position: pos.value(i),
                    book: book.value(i),
                    token_id: tok.value(i),
                    nll: nll.value(i),
                });
            }
        }
        Ok(log)
    }
}

/// `run.json`: everything needed to regenerate tables and plots without re-running.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// Strategy spec as given on the command line, e.g. `sink:4+252`.
    pub strategy: String,
    /// Human-readable label for tables and plot legends, e.g. `StreamingLLM 4+252`.
    pub label: String,
    /// `token` (token-by-token), `block` (block-parallel) or `windows` (recompute).
    pub engine: String,
    /// Fed tokens per forward pass of the block engine.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// True when the reported numbers are an approximation (e.g. `recompute:W/s` with s > 1).
    pub approximate: bool,
    /// Free-text qualification of the numbers, if any (e.g. the stride approximation).
    pub note: Option<String>,
    pub model: ModelInfo,
    pub corpus: CorpusInfo,
    /// Scored tokens.
    pub tokens_scored: u64,
    /// Fed tokens, injected sink tokens included.
    pub tokens_fed: u64,
    pub books_scored: u32,
    pub sum_nll: f64,
    pub ppl: f64,
    pub words: u64,
    pub bytes: u64,
    pub word_perplexity: f64,
    pub byte_perplexity: f64,
    pub bits_per_byte: f64,
    /// Standard error of the mean NLL; a `--score-every` sample's PPL is exp(mean +/- 1.96 SE).
    #[serde(default)]
    pub mean_nll_standard_error: f64,
    pub per_book: Vec<BookMetrics>,
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
    /// Peak resident memory of the process during this run (Linux VmHWM, reset at the start).
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    pub threads: usize,
    pub versions: Versions,
    /// UTC time the run finished, RFC 3339.
    pub finished_at: String,
    /// Hash of the options, model and token stream: a rerun with the same one is skipped.
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub path: String,
    pub sha256: String,
    pub architecture: String,
    pub trained_context: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusInfo {
    pub path: String,
    pub books: u32,
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BookMetrics {
    pub book: u32,
    pub title: String,
    pub tokens_scored: u64,
    pub ppl: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Versions {
    pub streamppl: String,
    pub candle: String,
    pub tokenizers: String,
}

impl RunRecord {
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read run record", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a streamppl run.json", path.display()))
    }
}
