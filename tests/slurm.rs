//! Sharded runs on a real Slurm cluster: `scripts/slurm/test-cluster.sh` starts a one-node
//! cluster from Debian's packages on this machine (installing them when missing), runs a 4-shard
//! array of a small sweep with its merge job, requeues a shard mid-run, and starts two
//! processes on one sweep; every check compares against a single-process sweep (see the
//! script). Without the packages it skips loudly, or fails under STREAMPPL_REQUIRE_MODELS=1.

mod common;

use std::process::Command;

#[test]
fn sweeps_sharded_over_a_slurm_array_merge_to_the_single_process_numbers() {
    let Some((model, corpus)) = common::default_model_and_corpus() else {
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new("bash")
        .arg(format!("{root}/scripts/slurm/test-cluster.sh"))
        .arg(env!("CARGO_BIN_EXE_streamppl"))
        .arg(&model)
        .arg(&corpus)
        .status()
        .expect("run bash");
    match status.code() {
        Some(0) => {}
        Some(3) if !common::models_required() => {
            eprintln!(
                "\n!!! SKIPPED: Slurm is not installable here (see the script's output) !!!\n"
            )
        }
        _ => panic!("scripts/slurm/test-cluster.sh failed ({status}); its stderr says which check"),
    }
}
