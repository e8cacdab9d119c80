//! The command line's contract for bad input: a one-line error naming the input and the fix,
//! a non-zero exit, and never a panic.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn streamppl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .args(args)
        .output()
        .expect("run streamppl")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamppl-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Fails unless the command exited non-zero with exactly one line on stderr containing `want`.
fn assert_one_line_error(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() <= 2, "want a one-line error, got:\n{err}"); // clap may add a usage hint line
    assert!(err.contains(want), "error should mention `{want}`:\n{err}");
}

fn text_corpus() -> PathBuf {
    let f = tmp("corpus").join("book.txt");
    std::fs::write(&f, "It was the best of times, it was the worst of times.").unwrap();
    f
}

/// The default model's path, or `None` after a loud skip (a panic under
/// STREAMPPL_REQUIRE_MODELS=1); the corpus is required too, as some tests read it.
fn real_model() -> Option<String> {
    common::default_model_and_corpus().map(|(model, _)| model.display().to_string())
}

#[test]
fn malformed_strategies_are_rejected_before_any_work() {
    let corpus = text_corpus();
    for bad in ["sink:4", "sink:4+0", "window:-1", "recompute:0"] {
        let out = streamppl(&[
            "eval",
            "--model",
            "does-not-matter.gguf",
            "--corpus",
            corpus.to_str().unwrap(),
            "--strategy",
            bad,
        ]);
        assert_one_line_error(&out, bad);
    }
}

#[test]
fn a_missing_model_file_names_the_file_and_the_fix() {
    let corpus = text_corpus();
    let out = streamppl(&[
        "eval",
        "--model",
        "/nonexistent/m.gguf",
        "--corpus",
        corpus.to_str().unwrap(),
        "--strategy",
        "dense",
    ]);
    assert_one_line_error(&out, "/nonexistent/m.gguf");
    assert_one_line_error(&out, "fetch-defaults");
}

#[test]
fn a_truncated_model_file_is_an_error_not_a_panic() {
    let Some(model) = real_model() else { return };
    let bytes = std::fs::read(&model).unwrap();
    let corpus = text_corpus();
    for (name, len) in [("head", 100), ("half", bytes.len() / 2)] {
        let cut = tmp("truncated").join(format!("{name}.gguf"));
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let out = streamppl(&[
            "eval",
            "--model",
            cut.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--strategy",
            "dense",
        ]);
        assert_one_line_error(&out, cut.to_str().unwrap());
    }
}

#[test]
fn max_tokens_zero_is_rejected() {
    let corpus = text_corpus();
    let out = streamppl(&[
        "eval",
        "--model",
        "m.gguf",
        "--corpus",
        corpus.to_str().unwrap(),
        "--strategy",
        "dense",
        "--max-tokens",
        "0",
    ]);
    assert_one_line_error(&out, "--max-tokens");
}

#[test]
fn an_empty_corpus_file_is_rejected() {
    let Some(model) = real_model() else { return };
    let empty = tmp("empty").join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = streamppl(&[
        "eval",
        "--model",
        &model,
        "--corpus",
        empty.to_str().unwrap(),
        "--strategy",
        "dense",
    ]);
    assert_one_line_error(&out, "empty.txt");
}

#[test]
fn eval_table_and_plot_run_end_to_end() {
    let Some(model) = real_model() else { return };
    let corpus = text_corpus();
    let out_dir = tmp("e2e");
    let out = streamppl(&[
        "eval",
        "--model",
        &model,
        "--corpus",
        corpus.to_str().unwrap(),
        "--strategy",
        "dense",
        "--strategy",
        "sink:2+4",
        "--strategy",
        "recompute:4/2",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for run in ["dense", "sink:2+4", "recompute:4_2"] {
        let record =
            streamppl::records::run::RunRecord::read_json(&out_dir.join(run).join("run.json"))
                .unwrap();
        let log = streamppl::nll_log::NllLog::read_parquet(&out_dir.join(run).join("nll.parquet"))
            .unwrap();
        assert_eq!(record.tokens_scored, log.len() as u64);
        assert!(record.tokens_scored > 5 && record.ppl.is_finite() && record.ppl > 1.0);
        assert_eq!(record.approximate, run == "recompute:4_2");
    }
    let table = streamppl(&["table", out_dir.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| strategy"))
            .count(),
        3,
        "{table}"
    );
    let png = out_dir.join("ppl.png");
    let plot = streamppl(&[
        "plot",
        out_dir.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert!(png.with_extension("svg").is_file());
}

#[test]
fn a_score_every_sample_is_labelled_as_such() {
    let Some(model) = real_model() else { return };
    let corpus = text_corpus();
    let out_dir = tmp("sample");
    let out = streamppl(&[
        "eval",
        "--model",
        &model,
        "--corpus",
        corpus.to_str().unwrap(),
        "--strategy",
        "recompute:4",
        "--score-every",
        "3",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = out_dir.join("recompute:4@every-3");
    let record = streamppl::records::run::RunRecord::read_json(&run.join("run.json")).unwrap();
    assert!(
        record.approximate && record.label.contains("sample 1/3"),
        "{}",
        record.label
    );
    assert!(
        record
            .note
            .as_deref()
            .unwrap_or("")
            .contains("95% interval")
    );
    let log = streamppl::nll_log::NllLog::read_parquet(&run.join("nll.parquet")).unwrap();
    assert!(log.records.iter().all(|r| r.position % 3 == 0));
    let table = streamppl(&["table", run.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("sample 1/3"));
}

#[test]
fn the_quick_bench_writes_its_report() {
    let Some(model) = real_model() else { return };
    let corpus =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/gutenberg-mini/test.parquet");
    let out_dir = tmp("bench");
    let out = streamppl(&[
        "bench",
        "--quick",
        "--model",
        &model,
        "--corpus",
        corpus.to_str().unwrap(),
        "--name",
        "smoke",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("smoke.json")).unwrap())
            .unwrap();
    assert_eq!(report["measurements"].as_array().unwrap().len(), 5);
    assert!(report["block_speedup"].as_f64().unwrap() > 1.0);
    assert!(
        report["measurements"][4]["peak_rss_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        std::fs::read_to_string(out_dir.join("smoke.md"))
            .unwrap()
            .contains("tokens/s")
    );
    // The floor: SmolLM2's f32 weights (135M parameters, the embedding tied to the head) over
    // a read bandwidth that no machine here has below 1 GB/s or above 1 TB/s.
    let floor = &report["token_floor"];
    let bytes = floor["weight_bytes_per_token"].as_u64().unwrap();
    assert!((530_000_000..545_000_000).contains(&bytes), "{floor}");
    let gbps = floor["read_gb_per_s"].as_f64().unwrap();
    assert!((1.0..1000.0).contains(&gbps), "{floor}");
    let tps = floor["floor_tokens_per_second"].as_f64().unwrap();
    assert!(
        (tps - gbps * 1e9 / bytes as f64).abs() < 1e-6 * tps,
        "{floor}"
    );
    // Over a full sink:4+1020 cache: 1025 slots x 30 layers x K and V x 3 KV heads x 64 x f32.
    let kv = floor["kv_bytes_per_token"].as_u64().unwrap();
    assert_eq!(kv, 1025 * 30 * 2 * 3 * 64 * 4, "{floor}");
    let with_cache = floor["floor_with_cache_tokens_per_second"]
        .as_f64()
        .unwrap();
    assert!(
        (with_cache - gbps * 1e9 / (bytes + kv) as f64).abs() < 1e-6 * with_cache,
        "{floor}"
    );
    // The paired rounds (--quick: 2 of 16 steps): each share is its own round's speed over its
    // own bandwidth's floor.
    let paired = floor["paired"].as_array().unwrap();
    assert_eq!(paired.len(), 2, "{floor}");
    for round in paired {
        assert_eq!(round["steps"].as_u64(), Some(16), "{round}");
        let (round_gbps, round_tps) = (
            round["read_gb_per_s"].as_f64().unwrap(),
            round["tokens_per_second"].as_f64().unwrap(),
        );
        assert!((1.0..1000.0).contains(&round_gbps), "{round}");
        let share = round_tps * bytes as f64 / (round_gbps * 1e9);
        assert!(
            (round["share"].as_f64().unwrap() - share).abs() < 1e-6 * share,
            "{round}"
        );
    }
    // Each round's bandwidth is read in 64 MiB slices between its steps.
    assert_eq!(
        floor["paired_slice_bytes"].as_u64(),
        Some(64 << 20),
        "{floor}"
    );
    let md = std::fs::read_to_string(out_dir.join("smoke.md")).unwrap();
    assert!(md.contains("Measured in pairs instead"), "{md}");
    assert!(md.contains("64 MiB slice"), "{md}");
    // Where those 32 steps went: SmolLM2's five weight shapes (30 layers' QKV, output, gate and
    // up, down; one head) and 30 layers' attention, each over its own bytes, within the steps.
    let breakdown = &floor["step_breakdown"];
    assert_eq!(breakdown["steps"].as_u64(), Some(32), "{breakdown}");
    // The matrix kernel asks for its weights ahead on Intel CPUs, not on AMD's.
    let amd = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .contains("AuthenticAMD");
    assert_eq!(
        breakdown["weights_asked_ahead"].as_bool(),
        Some(!amd),
        "{breakdown}"
    );
    // The parts are set against the probe read between these steps.
    let probe = breakdown["probe_gb_per_s"].as_f64().unwrap();
    assert!((1.0..1000.0).contains(&probe), "{breakdown}");
    let parts = breakdown["parts"].as_array().unwrap();
    let calls: Vec<(&str, f64)> = (parts.iter())
        .map(|p| {
            (
                p["work"].as_str().unwrap(),
                p["calls_per_step"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            ("matrix 576x576", 30.0),
            ("matrix 576x1536", 30.0),
            ("matrix 960x576", 30.0),
            ("matrix 3072x576", 30.0),
            ("matrix 49152x576", 1.0),
            ("attention", 30.0),
        ],
        "{breakdown}"
    );
    let ms: f64 = parts
        .iter()
        .map(|p| p["ms_per_step"].as_f64().unwrap())
        .sum();
    let step_ms = breakdown["step_ms"].as_f64().unwrap();
    assert!(0.0 < ms && ms < step_ms, "{breakdown}");
    for part in parts {
        let rate = part["read_gb_per_s"].as_f64().unwrap();
        assert!((0.1..1000.0).contains(&rate), "{part}");
    }
    // The head reads its 49152 x 576 f32 weights once a step.
    let head = &parts[4];
    let head_gb = 49152.0 * 576.0 * 4.0 / 1e9;
    let head_ms = head["ms_per_step"].as_f64().unwrap();
    let rate = head["read_gb_per_s"].as_f64().unwrap();
    assert!(
        (rate - head_gb / (head_ms / 1e3)).abs() < 1e-6 * rate,
        "{head}"
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_numbers() {
    let Some(model) = real_model() else { return };
    let corpus =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/gutenberg-mini/test.parquet");
    let (killed, fresh) = (tmp("killed"), tmp("fresh"));
    let args = |out: &PathBuf| -> Vec<String> {
        [
            "eval",
            "--model",
            &model,
            "--corpus",
            corpus.to_str().unwrap(),
            "--strategy",
            "sink:4+252",
            "--max-tokens",
            "2000",
            "--block-size",
            "64",
            "--checkpoint-every",
            "0",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let _ = std::fs::remove_dir_all(killed.join("sink:4+252"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .args(args(&killed))
        .spawn()
        .unwrap();
    // Kill it (SIGKILL: no chance to clean up) once a checkpoint is on disk.
    let state = killed.join("sink:4+252/checkpoint/state.json");
    let start = std::time::Instant::now();
    while !state.is_file() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(state.is_file(), "no checkpoint was written");
    assert!(
        !killed.join("sink:4+252/run.json").is_file(),
        "the run finished before it was killed"
    );
    let resumed = streamppl(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let said = String::from_utf8_lossy(&resumed.stderr);
    assert!(said.contains("resuming from"), "{said}");
    let mut fresh_args = args(&fresh);
    fresh_args.push("--rerun".into());
    let whole = streamppl(&fresh_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(whole.status.success());
    let read = |d: &PathBuf| {
        streamppl::nll_log::NllLog::read_parquet(&d.join("sink:4+252/nll.parquet")).unwrap()
    };
    assert_eq!(
        read(&killed),
        read(&fresh),
        "resumed NLLs differ from an uninterrupted run"
    );
    assert!(
        !killed.join("sink:4+252/checkpoint").exists(),
        "checkpoint left behind"
    );
}
