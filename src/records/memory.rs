//! `memory.csv`: a run's resident memory over time, one reading a second with the tokens
//! scored by then (written by [`crate::memory::MemorySampler`]'s caller).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One reading: seconds since the run started, tokens scored by then, resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    pub seconds: f64,
    pub tokens: u64,
    pub rss_mib: f64,
}

const HEADER: &str = "seconds,tokens,rss_mib";

pub fn write_csv(samples: &[MemorySample], path: &Path) -> Result<()> {
    let mut text = format!("{HEADER}\n");
    for s in samples {
        text.push_str(&format!("{:.3},{},{:.1}\n", s.seconds, s.tokens, s.rss_mib));
    }
    super::write_atomically(path, text.as_bytes())
}

pub fn read_csv(path: &Path) -> Result<Vec<MemorySample>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read memory log", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        bail!(
            "{}: not a streamppl memory.csv (expected the header `{HEADER}`)",
            path.display()
        );
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            let parsed = (f.len() == 3)
                .then(|| {
                    Some(MemorySample {
                        seconds: f[0].parse().ok()?,
                        tokens: f[1].parse().ok()?,
                        rss_mib: f[2].parse().ok()?,
                    })
                })
                .flatten();
            parsed.with_context(|| {
                format!(
                    "{}: line {}: expected seconds,tokens,rss_mib",
                    path.display(),
                    i + 2
                )
            })
        })
        .collect()
}
