//! Per-token NLL logs (`nll.parquet`); the run record beside it is [`crate::records::run`].
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

/// Writes `batch` as a parquet file atomically (a temporary file, then a rename), so a crash
/// never leaves half a file; every per-token log goes through it.
pub(crate) fn write_parquet_atomically(batch: &RecordBatch, path: &Path) -> Result<()> {
    crate::records::write_aside(path, |tmp| {
        let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None)?;
        writer.write(batch)?;
        writer.close()?;
        Ok(())
    })
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

    /// exp(mean NLL) over the trailing `window` records ending at each record.
    pub fn windowed_ppl(&self, window: usize) -> Vec<f64> {
        let nll: Vec<f64> = self.records.iter().map(|r| r.nll as f64).collect();
        let mut sum = 0f64;
        (0..nll.len())
            .map(|i| {
                sum += nll[i];
                if i >= window {
                    sum -= nll[i - window];
                }
                (sum / (i + 1).min(window) as f64).exp()
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
        write_parquet_atomically(&batch, path)
    }

    /// Rows of an NLL log file, from its footer (cheap: reads no data).
    pub fn count_rows(path: &Path) -> Result<u64> {
        let file =
            File::open(path).with_context(|| format!("{}: cannot open NLL log", path.display()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a whole parquet file", path.display()))?;
        Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windowed_ppl_is_the_trailing_mean() {
        let log = NllLog {
            records: [1.0f32, 3.0, 5.0, 7.0]
                .iter()
                .enumerate()
                .map(|(i, &nll)| NllRecord {
                    position: i as u64,
                    book: 0,
                    token_id: 1,
                    nll,
                })
                .collect(),
        };
        let w = log.windowed_ppl(2);
        let want = [1.0f64, 2.0, 4.0, 6.0].map(f64::exp);
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-9 * b, "{w:?}");
        }
    }
}
