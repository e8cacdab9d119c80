//! Tables and plots over finished runs, read back from their run directories
//! (`run.json` + `nll.parquet`), so reports never need a model or a re-run.
//!
//! ```no_run
//! use streamppl::report::{load_runs, markdown_table, plot_running_ppl};
//! let runs = load_runs(&["runs/pg19".into()]).unwrap();
//! println!("{}", markdown_table(&runs));
//! plot_running_ppl(&runs, "runs/pg19/running_ppl.png".as_ref(), "PG19, Llama").unwrap();
//! ```

pub mod chat;
mod compare;
mod experiment;
mod figures;
mod generation;
mod plot;
mod sweep;
mod table;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::records::run::RunRecord;
use crate::run_dir::check_log;

pub use compare::{NllDiff, compare_logs, compare_runs};
pub use experiment::{PPL_WINDOW, render_experiment, write_reproduction};
pub use figures::{HeatmapCell, plot_heatmap, plot_latency, plot_long_stream};
pub use generation::plot_generation;
pub use plot::plot_running_ppl;
pub use sweep::render_sweep;
pub use table::markdown_table;

/// The record file that marks a directory as a run directory.
const RUN_JSON: &str = "run.json";

/// One finished run: where it lives and what it recorded.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub record: RunRecord,
}

impl Run {
    /// Reads a run folder's record and checks that its log holds the tokens it counts.
    pub fn load(dir: PathBuf) -> Result<Self> {
        let record = RunRecord::read_json(&dir.join(RUN_JSON))?;
        check_log(&dir, &record).map_err(|e| {
            anyhow::anyhow!(
                "{e}; recompute the run (`--rerun`) or remove {}",
                dir.display()
            )
        })?;
        Ok(Run { dir, record })
    }
}

/// The middle value (the upper of the two middle ones for an even count); NaN for none.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Each path is either a run directory (has run.json) or a directory whose subdirectories
/// (searched recursively, sorted by path) are run directories. Error (one line, naming the path)
/// if a path does not exist or holds no run.
pub fn load_runs(paths: &[PathBuf]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for path in paths {
        if !path.is_dir() {
            bail!("{}: no such directory", path.display());
        }
        let mut dirs = Vec::new();
        collect_run_dirs(path, &mut dirs)?;
        if dirs.is_empty() {
            bail!("{}: holds no run (no {RUN_JSON} found)", path.display());
        }
        dirs.sort();
        for dir in dirs {
            runs.push(Run::load(dir)?);
        }
    }
    Ok(runs)
}

/// Appends `dir` if it is a run directory, else every run directory below it.
/// A run directory is a leaf: its own subdirectories are not searched.
fn collect_run_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if dir.join(RUN_JSON).is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list directory", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("{}: cannot list directory", dir.display()))?
            .path();
        if path.is_dir() {
            collect_run_dirs(&path, out)?;
        }
    }
    Ok(())
}

/// Fake run directories shared by the tests of this module's files.
#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::nll_log::{NllLog, NllRecord};
    use crate::records::run::{BookMetrics, CorpusInfo, ModelInfo, Versions};

    pub(crate) const TRAINED_CONTEXT: usize = 2048;

    /// A scratch directory under the system temp dir, removed when dropped.
    pub(crate) struct Scratch(pub(crate) PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("streamppl-report-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// (subdirectory, label, strategy, approximate, tokens): the third one sits one level deeper
    /// so that the recursive search is exercised, and is long enough to be downsampled.
    const FAKES: [(&str, &str, &str, bool, usize); 3] = [
        ("a-dense", "Dense", "dense", false, 6000),
        ("b-window", "Window 256", "window:256", false, 6000),
        (
            "nested/c-recompute",
            "Recompute 256/64",
            "recompute:256/64",
            true,
            12000,
        ),
    ];

    /// A made-up NLL curve per strategy: dense blows up past the trained context, the window
    /// blows up once the first tokens leave it, the recompute run stays flat.
    fn fake_nll(strategy: &str, i: usize) -> f32 {
        let wobble = ((i * 7919) % 100) as f32 / 50.0;
        let base = 2.0 + wobble;
        match strategy {
            "dense" if i > TRAINED_CONTEXT => base + 4.0,
            "window:256" if i > 256 => base + 2.5,
            _ => base,
        }
    }

    fn fake_record(label: &str, strategy: &str, approximate: bool, log: &NllLog) -> RunRecord {
        let tokens = log.len() as u64;
        let strategy_spec: crate::strategy::Strategy = strategy.parse().expect("a strategy");
        RunRecord {
            schema: crate::records::run::RUN_SCHEMA,
            options: crate::records::run::RunOptionsRecord::new(&crate::eval::EvalOptions::new(
                strategy_spec,
            )),
            numerics_epoch: crate::eval::NUMERICS_EPOCH,
            strategy: strategy.to_string(),
            label: label.to_string(),
            engine: "token".to_string(),
            block_size: None,
            approximate,
            note: approximate.then(|| "stride 64: tokens share a recomputed cache".to_string()),
            model: ModelInfo {
                path: "/models/tiny-llama/model.safetensors".to_string(),
                sha256: "ab".repeat(32),
                architecture: "llama".to_string(),
                trained_context: TRAINED_CONTEXT,
                details: None,
            },
            corpus: CorpusInfo {
                path: "/data/pg19-test.parquet".to_string(),
                books: 1,
                max_tokens: None,
            },
            tokens_scored: tokens,
            tokens_fed: tokens + 1,
            books_scored: 1,
            sum_nll: log.sum_nll(),
            ppl: log.ppl(),
            words: tokens * 3 / 4,
            bytes: tokens * 4,
            word_perplexity: log.ppl() * 1.5,
            byte_perplexity: log.ppl().powf(0.25),
            bits_per_byte: log.ppl().log2() / 4.0,
            mean_nll_standard_error: 0.01,
            per_book: vec![BookMetrics {
                book: 0,
                title: "Book".to_string(),
                tokens_scored: tokens,
                ppl: log.ppl(),
            }],
            tokens_per_second: 123.45,
            wall_seconds: tokens as f64 / 123.45,
            peak_rss_bytes: Some(600 << 20),
            kv_cache: Vec::new(),
            threads: 8,
            versions: Versions {
                streamppl: "0.1.0".to_string(),
                candle: "0.11".to_string(),
                tokenizers: "0.23".to_string(),
            },
            finished_at: "2025-01-01T00:00:00Z".to_string(),
            fingerprint: String::new(),
        }
    }

    /// Writes the three fake runs under `root` through the real writers.
    pub(crate) fn write_fake_runs(root: &Path) {
        for (sub, label, strategy, approximate, tokens) in FAKES {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).expect("create run dir");
            let mut log = NllLog::default();
            for i in 0..tokens {
                log.push(NllRecord {
                    position: i as u64,
                    book: 0,
                    token_id: i as u32,
                    nll: fake_nll(strategy, i),
                });
            }
            log.write_parquet(&dir.join("nll.parquet"))
                .expect("write nll.parquet");
            fake_record(label, strategy, approximate, &log)
                .write_json(&dir.join(RUN_JSON))
                .expect("write run.json");
        }
    }

    /// A scratch dir holding the fake runs, and the runs as loaded from it.
    pub(crate) fn fake_runs(tag: &str) -> (Scratch, Vec<Run>) {
        let scratch = Scratch::new(tag);
        write_fake_runs(&scratch.0);
        let runs = load_runs(std::slice::from_ref(&scratch.0)).expect("load fake runs");
        (scratch, runs)
    }

    /// Runs of 0, 1 and 2 tokens, whose standard error is undefined or whose PPL is infinite,
    /// must round-trip through run.json and be readable by every report.
    #[test]
    fn records_of_tiny_runs_and_non_finite_metrics_round_trip_through_the_reports() {
        let scratch = Scratch::new("tiny");
        for (tokens, nll, se) in [
            (0usize, 1.0f32, f64::NAN),
            (1, 2.0, f64::NAN),
            (2, 3.0, 0.5),
            (2, f32::INFINITY, f64::INFINITY),
        ] {
            let dir = scratch.0.join(format!("run-{tokens}-{nll}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut log = NllLog::default();
            for i in 0..tokens {
                log.push(NllRecord {
                    position: i as u64,
                    book: 0,
                    token_id: 1,
                    nll,
                });
            }
            log.write_parquet(&dir.join("nll.parquet")).unwrap();
            let mut record = fake_record("Dense", "dense", false, &log);
            record.mean_nll_standard_error = se;
            record.write_json(&dir.join(RUN_JSON)).unwrap();
            let back = RunRecord::read_json(&dir.join(RUN_JSON)).unwrap();
            let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
            assert!(same(back.mean_nll_standard_error, se), "{tokens} tokens");
            assert!(same(back.ppl, record.ppl) && same(back.sum_nll, record.sum_nll));
            assert_eq!(back.tokens_scored, tokens as u64);
        }
        let runs = load_runs(std::slice::from_ref(&scratch.0)).expect("every run loads");
        assert_eq!(runs.len(), 4);
        let table = markdown_table(&runs);
        assert_eq!(table.matches("| Dense").count(), 4, "{table}");
        let with_tokens: Vec<Run> = runs
            .into_iter()
            .filter(|r| r.record.tokens_scored > 0)
            .collect();
        plot_running_ppl(&with_tokens, &scratch.0.join("ppl.png"), "tiny").expect("plots");
    }

    #[test]
    fn a_missing_or_short_log_is_refused_by_name() {
        let (scratch, _) = fake_runs("short-log");
        let dir = scratch.0.join("a-dense");
        NllLog::default()
            .write_parquet(&dir.join("nll.parquet"))
            .unwrap();
        let err = load_runs(std::slice::from_ref(&scratch.0)).unwrap_err();
        assert!(err.to_string().contains("holds 0 tokens"), "{err}");
        std::fs::remove_file(dir.join("nll.parquet")).unwrap();
        let err = load_runs(std::slice::from_ref(&scratch.0)).unwrap_err();
        assert!(
            err.to_string().contains("nll.parquet: missing") && !err.to_string().contains('\n'),
            "{err}"
        );
    }

    /// run.json files of schema 1 (the committed results were written so) load with their
    /// options taken from the strategy spec and the run folder's variant suffixes.
    #[test]
    fn schema_1_records_migrate_with_their_options() {
        let scratch = Scratch::new("v1");
        let cases = [
            (
                "sink:4+1020@sink-text=%0A",
                "sink:4+1020",
                true,
                Some("\n"),
                None,
            ),
            ("window:1024@no-pos-shift", "window:1024", false, None, None),
            (
                "recompute:1024@every-512",
                "recompute:1024",
                true,
                None,
                Some(512),
            ),
        ];
        for (folder, spec, pos_shift, sink_text, score_every) in cases {
            let mut value = serde_json::to_value(fake_record("x", spec, false, &NllLog::default()))
                .expect("a record as JSON");
            let obj = value.as_object_mut().expect("an object");
            for key in [
                "schema",
                "kind",
                "sinks",
                "window",
                "stride",
                "pos_shift",
                "sink_text",
                "score_every",
                "numerics_epoch",
            ] {
                obj.remove(key);
            }
            obj.insert("mean_nll_standard_error".into(), serde_json::Value::Null);
            let dir = scratch.0.join(folder);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(RUN_JSON), value.to_string()).unwrap();
            let r = RunRecord::read_json(&dir.join(RUN_JSON)).expect("a schema-1 record loads");
            assert_eq!((r.schema, r.numerics_epoch), (1, 1));
            assert!(r.mean_nll_standard_error.is_nan());
            assert_eq!(r.options.pos_shift, pos_shift, "{folder}");
            assert_eq!(r.options.sink_text.as_deref(), sink_text, "{folder}");
            assert_eq!(r.options.score_every, score_every, "{folder}");
            assert_eq!(r.options.strategy().unwrap().to_string(), spec);
        }
        // A committed result, whatever its schema.
        let committed = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results/table1/sink:4+1020@sink-text=%0A")
            .join(RUN_JSON);
        let r = RunRecord::read_json(&committed).expect("the committed record loads");
        assert_eq!(r.options.sink_text.as_deref(), Some("\n"));
    }

    #[test]
    fn load_runs_finds_nested_runs_sorted() {
        let (scratch, runs) = fake_runs("load");
        let dirs: Vec<_> = runs
            .iter()
            .map(|r| r.dir.strip_prefix(&scratch.0).expect("under root"))
            .collect();
        let want: Vec<PathBuf> = FAKES.iter().map(|f| PathBuf::from(f.0)).collect();
        assert_eq!(dirs, want);
        assert_eq!(runs[1].record.label, "Window 256");
    }

    #[test]
    fn load_runs_accepts_a_run_dir_itself() {
        let (scratch, _) = fake_runs("single");
        let runs = load_runs(&[scratch.0.join("b-window")]).expect("load one run");
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].record.strategy, "window:256");
    }

    #[test]
    fn load_runs_errors_on_missing_or_empty_paths() {
        let scratch = Scratch::new("missing");
        let missing = scratch.0.join("nope");
        let err = load_runs(std::slice::from_ref(&missing)).expect_err("missing path");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        let err = load_runs(std::slice::from_ref(&scratch.0)).expect_err("empty dir");
        assert!(err.to_string().contains("holds no run"), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
}
