//! `reproduce`, `report` and `sweep` end to end on the real default model, at `--scale quick`.
//! They skip, loudly, only when the model and corpus are absent (scripts/fetch-defaults.sh),
//! and fail instead under STREAMPPL_REQUIRE_MODELS=1 (CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use streamppl::experiment::{Kind, Scale};
use streamppl::nll_log::NllLog;
use streamppl::records::experiment::ExperimentRecord;
use streamppl::records::run::RunRecord;
use streamppl::report::chat::{ChatRun, Health};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model and corpus paths, or `None` after a loud skip (a panic under
/// STREAMPPL_REQUIRE_MODELS=1).
fn defaults() -> Option<(String, String)> {
    let (model, corpus) = common::default_model_and_corpus()?;
    Some((model.display().to_string(), corpus.display().to_string()))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamppl-repro-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn streamppl(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run streamppl");
    assert!(
        out.status.success(),
        "streamppl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_figure(dir: &Path, png: &str) {
    let p = dir.join(png);
    assert!(
        std::fs::metadata(&p).is_ok_and(|m| m.len() > 5_000),
        "{} missing or empty",
        p.display()
    );
    assert!(
        p.with_extension("svg").is_file(),
        "{} has no SVG",
        p.display()
    );
}

/// Every experiment at quick scale: the outputs' shapes, the paper's numbers beside ours, a
/// second invocation that computes nothing, and the report that gathers them.
#[test]
fn every_experiment_reproduces_at_quick_scale_and_reruns_nothing() {
    let Some((model, corpus)) = defaults() else {
        return;
    };
    let out = tmp("all");
    let out_s = out.to_str().unwrap();
    let args = [
        "reproduce",
        "all",
        "--scale",
        "quick",
        "--out",
        out_s,
        "--model",
        &model,
        "--corpus",
        &corpus,
    ];
    streamppl(&args);
    let names = streamppl::reproduce::all_names(&root().join("experiments")).unwrap();
    assert_eq!(
        names,
        [
            "ablation",
            "bos",
            "chat",
            "figure10",
            "figure3",
            "figure5",
            "local-sinks",
            "table1",
            "table2",
            "table6"
        ]
    );
    for name in &names {
        let dir = out.join(name);
        let rec = ExperimentRecord::read(&dir).unwrap();
        let table = read(&dir.join("table.md"));
        assert_eq!(rec.runs.len(), rec.experiment.runs.len(), "{name}");
        if rec.experiment.kind == Kind::Chat {
            assert_chat(&dir, &rec, &table);
            continue;
        }
        for run in &rec.runs {
            let r = RunRecord::read_json(&dir.join(&run.dir).join("run.json")).unwrap();
            assert!(
                r.ppl.is_finite() && r.ppl > 1.0,
                "{name}/{}: {}",
                run.id,
                r.ppl
            );
            assert!(
                table.contains(&format!("| {} |", run.id.replace('|', "\\|"))),
                "{name}: no row for {}:\n{table}",
                run.id
            );
            assert!(dir.join(&run.dir).join("memory.csv").is_file());
        }
    }
    // Paper numbers side by side, the recompute sample labelled, cache shrunk 8x at quick scale.
    let t1 = read(&out.join("table1/table.md"));
    for want in [
        "paper: Llama-2-13B (Table 1)",
        "5158.07",
        "(sample, 95%",
        "on the same tokens",
        "Window 128",
    ] {
        assert!(t1.contains(want), "table1 lacks `{want}`:\n{t1}");
    }
    assert!(read(&out.join("figure3/table.md")).contains("departs from `4+4092`"));
    assert!(read(&out.join("table1/table.md")).contains("`0+1024` at token"));
    for (name, png) in [
        ("table1", "running_ppl.png"),
        ("table2", "running_ppl.png"),
        ("figure3", "running_ppl.png"),
        ("figure10", "latency.png"),
        ("figure5", "long_stream_sink_4_124.png"),
    ] {
        assert_figure(&out.join(name), png);
    }
    let lat = ExperimentRecord::read(&out.join("figure10"))
        .unwrap()
        .latency;
    assert_eq!(lat.len(), 3 * 4, "{lat:?}");
    assert!(
        lat.iter()
            .all(|p| p.ms_per_token > 0.0 && p.ms_per_token.is_finite())
    );
    // Shared runs are copied, not recomputed: table6's 4+2044 is table2's.
    let nll = |p: &str| NllLog::read_parquet(&out.join(p).join("nll.parquet")).unwrap();
    assert_eq!(nll("table6/sink:4+252"), nll("table2/sink:4+252"));

    // Again: every run is found on disk.
    let again = streamppl(&args);
    let said = String::from_utf8_lossy(&again.stderr);
    let done = said.matches("already done").count();
    let runs: usize = names
        .iter()
        .map(|n| ExperimentRecord::read(&out.join(n)).unwrap().runs.len())
        .sum();
    assert_eq!(done, runs, "{said}");
    assert!(!said.contains("tok/s"), "a run was recomputed:\n{said}");

    streamppl(&["report", out_s]);
    let report = read(&out.join("REPRODUCTION.md"));
    for name in &names {
        assert!(
            report.contains(&format!("## {name} (")),
            "no section for {name}"
        );
    }
    assert_eq!(report.matches("**Reading.**").count(), names.len());
    for link in report
        .split("](")
        .skip(1)
        .filter_map(|s| s.split(')').next())
    {
        assert!(
            out.join(link).is_file(),
            "REPRODUCTION.md links a missing {link}"
        );
    }
    the_report_sets_scales_side_by_side_and_shows_experiments_without_logs(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// The chat experiment at quick scale: each strategy's conversation generated to the scale's
/// tokens, greedy, a row of the table each with what broke, and the figure.
fn assert_chat(dir: &Path, rec: &ExperimentRecord, table: &str) {
    let tokens = rec.experiment.max_tokens(Scale::Quick).unwrap();
    for run in &rec.runs {
        let chat = ChatRun::load(&run.id, &dir.join(&run.dir)).unwrap();
        assert_eq!(chat.record.tokens_generated, tokens, "chat/{}", run.id);
        assert_eq!(chat.log.tokens.len() as u64, tokens, "chat/{}", run.id);
        assert!(chat.record.chat_template && chat.record.temperature == 0.0);
        let answered: u64 = chat.turns.iter().map(|t| t.answer_tokens).sum();
        assert_eq!(answered, tokens, "chat/{}: turns and log disagree", run.id);
        let health = Health::of(&chat.log, &chat.turns).unwrap();
        assert!(health.peak_rss_mib > 0.0 && health.early_latency_s > 0.0);
        let row = format!("| {} | `{}` | {tokens} |", run.id, chat.record.strategy);
        assert!(table.contains(&row), "chat: no row `{row}`:\n{table}");
    }
    assert!(
        table.contains("breaks by") || table.contains("holds"),
        "{table}"
    );
    assert_figure(dir, "generation.png");
}

/// table2 copied as if run at the paper scale, its per-token logs removed (as the large
/// paper-scale logs are not kept): the report puts both scales side by side and shows the copy
/// from its table.md.
fn the_report_sets_scales_side_by_side_and_shows_experiments_without_logs(out: &Path) {
    let copy = out.join("elsewhere").join("table2");
    std::fs::create_dir_all(&copy).unwrap();
    let status = Command::new("cp")
        .args(["-r", out.join("table2").to_str().unwrap()])
        .arg(out.join("elsewhere"))
        .status()
        .unwrap();
    assert!(status.success());
    let json = copy.join("experiment.json");
    let mut rec: serde_json::Value = serde_json::from_str(&read(&json)).unwrap();
    rec["scale"] = "paper".into();
    std::fs::write(&json, rec.to_string()).unwrap();
    for e in std::fs::read_dir(&copy).unwrap() {
        let _ = std::fs::remove_file(e.unwrap().path().join("nll.parquet"));
    }
    streamppl(&["report", out.to_str().unwrap()]);
    let report = read(&out.join("REPRODUCTION.md"));
    for want in [
        "## Scales, devices and models side by side",
        "### table2",
        "| run | `table2`: quick, cpu f32 | `elsewhere/table2`: paper, cpu f32 |",
        "## table2 (Table 2), paper scale",
        "per-token logs of these runs are not in the repository",
        "](elsewhere/table2/running_ppl.png)",
    ] {
        assert!(
            report.contains(want),
            "REPRODUCTION.md lacks `{want}`:\n{report}"
        );
    }
}

#[test]
fn unknown_experiment_is_a_one_line_error_listing_the_known_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .current_dir(root())
        .args(["reproduce", "table99", "--model", "nope.gguf"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unknown experiment `table99`") && err.contains("table2"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A sweep killed during its third cell redoes only that cell, from its checkpoint, and ends
/// with NLLs identical to an uninterrupted sweep's.
#[test]
fn a_killed_sweep_redoes_only_the_unfinished_cell_to_the_same_numbers() {
    let Some((model, corpus)) = defaults() else {
        return;
    };
    let args = |out: &Path| -> Vec<String> {
        [
            "sweep",
            "--sinks",
            "0,4",
            "--windows",
            "60,124",
            "--max-tokens",
            "1500",
            "--checkpoint-every",
            "0",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let (killed, fresh) = (tmp("sweep-killed"), tmp("sweep-fresh"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .current_dir(root())
        .args(args(&killed))
        .spawn()
        .unwrap();
    let third = killed.join("sink:4+60/checkpoint/state.json");
    let start = std::time::Instant::now();
    while !third.is_file() && start.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(third.is_file(), "the third cell never checkpointed");
    assert!(
        !killed.join("sink:4+60/run.json").is_file(),
        "the third cell finished before the kill"
    );
    let finished_at = |d: &Path| {
        RunRecord::read_json(&d.join("window:60/run.json"))
            .unwrap()
            .finished_at
    };
    let before = finished_at(&killed);

    let resumed = streamppl(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    let said = String::from_utf8_lossy(&resumed.stderr);
    assert_eq!(said.matches("already done").count(), 2, "{said}");
    assert!(said.contains("resuming from"), "{said}");
    assert_eq!(
        finished_at(&killed),
        before,
        "a finished cell was recomputed"
    );

    streamppl(&args(&fresh).iter().map(String::as_str).collect::<Vec<_>>());
    for cell in ["window:60", "window:124", "sink:4+60", "sink:4+124"] {
        let nll = |d: &Path| NllLog::read_parquet(&d.join(cell).join("nll.parquet")).unwrap();
        assert_eq!(
            nll(&killed),
            nll(&fresh),
            "{cell} differs from the uninterrupted sweep"
        );
    }
    let grid = read(&killed.join("grid.md"));
    assert_eq!(
        grid,
        read(&fresh.join("grid.md")).replace(fresh.to_str().unwrap(), killed.to_str().unwrap())
    );
    assert!(grid.contains("| 4 |") && grid.contains("**"), "{grid}");
    assert!(killed.join("heatmap.png").is_file() && killed.join("heatmap.svg").is_file());
    let _ = std::fs::remove_dir_all(&killed);
    let _ = std::fs::remove_dir_all(&fresh);
}
