//! Run folders on the real model: what a finished run in `--out` is to the next command (the
//! same run, a stale one, another configuration), and runs too short for a standard error.

use std::path::PathBuf;
use std::process::{Command, Output};

use streamppl::records::run::RunRecord;

mod common;

fn streamppl(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .args(args)
        .envs(env.iter().copied())
        .env("CANDLE_NUM_THREADS", "2")
        .output()
        .expect("run streamppl")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamppl-folders-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn model_and_corpus() -> Option<(String, String)> {
    let (model, corpus) = common::default_model_and_corpus()?;
    Some((model.display().to_string(), corpus.display().to_string()))
}

#[test]
fn a_one_token_run_prints_its_ppl_and_reads_back_everywhere() {
    let Some((model, corpus)) = model_and_corpus() else {
        return;
    };
    let out = tmp("one");
    let o = out.display().to_string();
    let stdout = ok(&streamppl(
        &[
            "eval",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--strategy",
            "dense",
            "--strategy",
            "window:8",
            "--max-tokens",
            "1",
            "--out",
            &o,
        ],
        &[],
    ));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("dense  PPL = ") && lines[0].contains("+/- n/a  (1 tokens"),
        "{stdout}"
    );
    let record = RunRecord::read_json(&out.join("dense/run.json")).unwrap();
    assert!(record.mean_nll_standard_error.is_nan());
    assert!(ok(&streamppl(&["table", &o], &[])).contains("| Dense"));
    ok(&streamppl(
        &["plot", &o, "-o", &out.join("ppl.png").display().to_string()],
        &[],
    ));
    // The finished runs are reused, not recomputed.
    let again = ok(&streamppl(
        &[
            "eval",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--strategy",
            "dense",
            "--max-tokens",
            "1",
            "--out",
            &o,
        ],
        &[],
    ));
    assert!(again.contains("already done"), "{again}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn another_configuration_is_refused_and_another_epoch_is_stale() {
    let Some((model, corpus)) = model_and_corpus() else {
        return;
    };
    let out = tmp("conflict");
    let o = out.display().to_string();
    let eval = |tokens: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "eval",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--strategy",
            "sink:2+6",
            "--max-tokens",
            tokens,
            "--out",
            &o,
        ];
        args.extend_from_slice(extra);
        streamppl(&args, env)
    };
    ok(&eval("40", &[], &[]));
    let refused = eval("30", &[], &[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another configuration (max tokens 40 -> 30, tokens scored 40 -> 30)")
            && err.contains("--rerun"),
        "{err}"
    );
    let refused = eval("40", &["--engine", "token"], &[]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("engine block -> token"));
    let run_json = out.join("sink:2+6/run.json");
    let before = std::fs::read_to_string(&run_json).unwrap();
    // A build of another numerics epoch keeps the run and says so, until --rerun-stale.
    let epoch2 = [("STREAMPPL_NUMERICS_EPOCH", "2")];
    let stale = eval("40", &[], &epoch2);
    assert!(ok(&stale).contains("STALE"));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("computed by numerics epoch 1"));
    assert_eq!(std::fs::read_to_string(&run_json).unwrap(), before);
    ok(&eval("40", &["--rerun-stale"], &epoch2));
    let recomputed = RunRecord::read_json(&run_json).unwrap();
    let old: RunRecord = serde_json::from_str(&before).unwrap();
    assert_eq!(recomputed.numerics_epoch, 2);
    assert_eq!(
        recomputed.sum_nll, old.sum_nll,
        "same kernels, same numbers"
    );
    ok(&eval("30", &["--rerun"], &[]));
    assert_eq!(RunRecord::read_json(&run_json).unwrap().tokens_scored, 30);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_sweep_reports_stale_cells_and_repeats_no_row() {
    let Some((model, corpus)) = model_and_corpus() else {
        return;
    };
    let out = tmp("sweep");
    let o = out.display().to_string();
    let sweep = |env: &[(&str, &str)]| {
        streamppl(
            &[
                "sweep",
                "--model",
                &model,
                "--corpus",
                &corpus,
                "--sinks",
                "2,2,0",
                "--windows",
                "6",
                "--max-tokens",
                "30",
                "--out",
                &o,
            ],
            env,
        )
    };
    let grid = ok(&sweep(&[]));
    assert_eq!(grid.matches("| 2 |").count(), 1, "{grid}");
    let stale = sweep(&[("STREAMPPL_NUMERICS_EPOCH", "3")]);
    ok(&stale);
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(
        err.contains("2 stale cell(s) kept") && err.contains("--rerun-stale"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
