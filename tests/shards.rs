//! `reproduce --shard K/N`: the shards compute every run of an experiment exactly once between
//! them, and the same command without a shard computes nothing more and writes the table.
//! (Sweeps over a real Slurm array are checked in tests/slurm.rs.)

mod common;

use std::process::Command;

/// Runs streamppl; returns its stderr, asserting success.
fn streamppl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_streamppl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "streamppl {args:?}: {err}");
    err
}

fn computed(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(" computing -> "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn reproduce_shards_compute_each_run_once_and_the_merge_writes_the_table() {
    let Some((model, corpus)) = common::default_model_and_corpus() else {
        return;
    };
    // In a folder of its own: reproduce reuses finished runs of sibling experiment folders.
    let root = std::env::temp_dir().join(format!("streamppl-shards-{}", std::process::id()));
    let out = root.join("table2");
    let (model, corpus, out_s) = (
        model.display().to_string(),
        corpus.display().to_string(),
        out.display().to_string(),
    );
    let base = [
        "reproduce",
        "table2",
        "--scale",
        "quick",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--out",
        &out_s,
    ];
    let mut runs = Vec::new();
    for shard in ["0/3", "1/3", "2/3"] {
        let err = streamppl(&[&base[..], &["--shard", shard]].concat());
        assert!(err.contains(&format!("shard {shard} done")), "{err}");
        runs.extend(computed(&err));
    }
    assert!(!out.join("table.md").exists(), "a shard writes no table");
    let mut distinct = runs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), runs.len(), "a run computed twice: {runs:?}");
    assert_eq!(runs.len(), 5, "table2 has 5 runs: {runs:?}");
    let merge = streamppl(&base);
    assert!(computed(&merge).is_empty(), "the merge computed: {merge}");
    assert!(out.join("table.md").is_file() && out.join("experiment.json").is_file());
    std::fs::remove_dir_all(&root).unwrap();
}
