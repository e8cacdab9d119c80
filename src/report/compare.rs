//! Token-by-token comparison of two runs over the same stream (e.g. two engines, or streamppl
//! against another tool's log converted to the NLL-log schema).

use std::path::Path;

use anyhow::{Result, bail};

use crate::nll_log::NllLog;

/// |delta NLL| statistics over the positions two logs share.
#[derive(Debug, Clone, PartialEq)]
pub struct NllDiff {
    pub tokens: usize,
    pub mean_abs: f64,
    pub max_abs: f64,
    /// Stream position of the largest difference.
    pub max_at: u64,
}

/// Compares the logs of two run directories, which must score the same tokens in the same order.
pub fn compare_runs(a: &Path, b: &Path) -> Result<NllDiff> {
    let la = NllLog::read_parquet(&a.join("nll.parquet"))?;
    let lb = NllLog::read_parquet(&b.join("nll.parquet"))?;
    compare_logs(&la, &lb).map_err(|e| anyhow::anyhow!("{} vs {}: {e}", a.display(), b.display()))
}

/// Compares two logs of the same tokens; logs of different lengths are refused rather than
/// silently compared over their common prefix.
pub fn compare_logs(a: &NllLog, b: &NllLog) -> Result<NllDiff> {
    let n = a.len();
    if n != b.len() {
        bail!(
            "the runs score {n} and {} tokens; compare runs over the same tokens (the same corpus, --books and --max-tokens)",
            b.len()
        );
    }
    if n == 0 {
        bail!("no token to compare");
    }
    let (mut sum, mut max, mut max_at) = (0f64, 0f64, 0u64);
    for (x, y) in a.records.iter().zip(&b.records) {
        if (x.position, x.token_id) != (y.position, y.token_id) {
            bail!(
                "the logs score different tokens at position {} (token {} vs {})",
                x.position,
                x.token_id,
                y.token_id
            );
        }
        let d = (x.nll as f64 - y.nll as f64).abs();
        sum += d;
        if d > max {
            (max, max_at) = (d, x.position);
        }
    }
    Ok(NllDiff {
        tokens: n,
        mean_abs: sum / n as f64,
        max_abs: max,
        max_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nll_log::NllRecord;

    fn log(nlls: &[f32]) -> NllLog {
        let mut l = NllLog::default();
        for (i, &nll) in nlls.iter().enumerate() {
            l.push(NllRecord {
                position: i as u64,
                book: 0,
                token_id: 7,
                nll,
            });
        }
        l
    }

    #[test]
    fn reports_mean_and_max_over_the_tokens() {
        let d = compare_logs(&log(&[1.0, 2.0, 3.0]), &log(&[1.0, 2.5, 2.0])).unwrap();
        assert_eq!(d.tokens, 3);
        assert!((d.mean_abs - 0.5).abs() < 1e-9 && (d.max_abs - 1.0).abs() < 1e-9 && d.max_at == 2);
    }

    #[test]
    fn refuses_logs_of_different_lengths() {
        let err = compare_logs(&log(&[1.0, 2.0, 3.0]), &log(&[1.0, 2.5, 2.0, 9.0])).unwrap_err();
        assert!(err.to_string().contains("3 and 4 tokens"), "{err}");
    }

    #[test]
    fn refuses_logs_of_different_streams() {
        let mut other = log(&[1.0]);
        other.records[0].token_id = 8;
        assert!(compare_logs(&log(&[1.0]), &other).is_err());
    }
}
