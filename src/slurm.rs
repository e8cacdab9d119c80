//! `--slurm N`: a sweep or reproduction as a Slurm job array of N shards plus a dependent job
//! that merges them, submitted with plain `sbatch` (no service of our own).
//!
//! Task K of the array runs the same command with `--shard K/N` (`scripts/slurm/shard.sbatch`);
//! `--requeue` lets the scheduler restart a preempted task, which resumes from its checkpoints.
//! Once every task has succeeded (`--dependency=afterok`), the same command without a shard
//! (`scripts/slurm/merge.sbatch`) finds every run done and writes the grid or tables.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The two `sbatch` command lines, as argument lists; the merge job's dependency is the
/// placeholder `$ARRAY_JOB` until the array's job id is known.
pub fn sbatch_lines(scripts: &Path, shards: usize, command: &[String]) -> [Vec<String>; 2] {
    let script = |name: &str| scripts.join(name).display().to_string();
    let array = [
        "sbatch".to_string(),
        "--parsable".into(),
        format!("--array=0-{}", shards - 1),
        "--requeue".into(),
        "--job-name=streamppl-shard".into(),
        script("shard.sbatch"),
    ];
    let merge = [
        "sbatch".to_string(),
        "--parsable".into(),
        "--dependency=afterok:$ARRAY_JOB".into(),
        "--job-name=streamppl-merge".into(),
        script("merge.sbatch"),
    ];
    [
        array.into_iter().chain(command.iter().cloned()).collect(),
        merge.into_iter().chain(command.iter().cloned()).collect(),
    ]
}

/// `args` (the process's own, program first) without `--slurm N` and `--dry-run`, the
/// program as an absolute path: the command each job runs.
pub fn job_command(args: &[String]) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the streamppl binary's path")?;
    let mut out = vec![exe.display().to_string()];
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--slurm" => {
                rest.next();
            }
            "--dry-run" => {}
            _ if a.starts_with("--slurm=") => {}
            _ => out.push(a.clone()),
        }
    }
    Ok(out)
}

/// A command line as a shell would take it back (arguments quoted where needed).
pub fn shell_line(args: &[String]) -> String {
    let quote = |a: &String| {
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%$".contains(c));
        match plain {
            true => a.clone(),
            false => format!("'{}'", a.replace('\'', r"'\''")),
        }
    };
    args.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Prints the `sbatch` lines (`dry_run`), or submits them and prints the two job ids.
pub fn submit(scripts: &Path, shards: usize, args: &[String], dry_run: bool) -> Result<()> {
    if shards == 0 {
        bail!("--slurm 0: give the number of shards (array tasks), at least 1");
    }
    for script in ["shard.sbatch", "merge.sbatch"] {
        if !scripts.join(script).is_file() {
            bail!(
                "{}: no such job script; run from the repository root or give --slurm-scripts DIR",
                scripts.join(script).display()
            );
        }
    }
    let [array, merge] = sbatch_lines(scripts, shards, &job_command(args)?);
    if dry_run {
        println!("ARRAY_JOB=$({})", shell_line(&array));
        println!("{}", shell_line(&merge));
        return Ok(());
    }
    let array_job = run_sbatch(&array)?;
    let merge: Vec<String> = merge
        .into_iter()
        .map(|a| a.replace("$ARRAY_JOB", &array_job))
        .collect();
    let merge_job = run_sbatch(&merge)?;
    println!("submitted array job {array_job} ({shards} shards) and merge job {merge_job}");
    Ok(())
}

/// Runs one `sbatch --parsable` line; returns the job id it printed.
fn run_sbatch(line: &[String]) -> Result<String> {
    let out = Command::new(&line[0])
        .args(&line[1..])
        .output()
        .context("cannot run sbatch; is Slurm installed here (or use --dry-run)?")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("sbatch failed: {}", crate::one_line(err.trim()));
    }
    let id = String::from_utf8_lossy(&out.stdout);
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    Ok(id.trim().split(';').next().unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merge_job_waits_for_the_array_and_both_run_the_same_command() {
        let cmd: Vec<String> = [
            "/opt/streamppl",
            "sweep",
            "--sinks",
            "0,4",
            "--out",
            "my out",
        ]
        .map(String::from)
        .to_vec();
        let [array, merge] = sbatch_lines(Path::new("scripts/slurm"), 4, &cmd);
        assert_eq!(
            shell_line(&array),
            "sbatch --parsable --array=0-3 --requeue --job-name=streamppl-shard scripts/slurm/shard.sbatch /opt/streamppl sweep --sinks 0,4 --out 'my out'"
        );
        assert!(shell_line(&merge).starts_with(
            "sbatch --parsable --dependency=afterok:$ARRAY_JOB --job-name=streamppl-merge scripts/slurm/merge.sbatch /opt/streamppl sweep"
        ));
        let args: Vec<String> = [
            "streamppl",
            "sweep",
            "--slurm",
            "4",
            "--dry-run",
            "--slurm=2",
            "--out",
            "x",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(&job_command(&args).unwrap()[1..], ["sweep", "--out", "x"]);
    }
}
