//! A run folder (`OUT/<run name>/`): written by one process at a time, and, when it already
//! holds a finished run, told apart as the same computation, a stale one (another numerics
//! epoch) or another configuration, which is never overwritten without `--rerun`.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::nll_log::NllLog;
use crate::records::run::RunRecord;

/// The lock file inside a run folder.
const LOCK: &str = ".lock";

/// An exclusive lock on a run folder for as long as it lives. The operating system drops it
/// when the process dies, so a killed run never blocks the next one. Dropped without
/// [`RunLock::finish`] (an error), it removes the folder if it made it and left it empty.
pub struct RunLock {
    dir: PathBuf,
    file: Option<File>,
    made_dir: bool,
    finished: bool,
}

/// Another process holds a run folder's lock: it is computing that run right now.
#[derive(Debug, thiserror::Error)]
#[error(
    "{dir}: another streamppl process is writing this run (it holds {lock}); wait for it, or give another --out"
)]
pub struct RunLocked {
    pub dir: PathBuf,
    pub lock: PathBuf,
}

impl RunLock {
    /// Creates `dir` if needed and locks it; a [`RunLocked`] error when another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        Self::lock(dir, false)
    }

    /// Like [`RunLock::acquire`], but waits for another process to let go of the folder.
    pub fn acquire_waiting(dir: &Path) -> Result<Self> {
        Self::lock(dir, true)
    }

    fn lock(dir: &Path, wait: bool) -> Result<Self> {
        if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
            bail!(
                "{}: is a file, not a folder; give --out a folder",
                file.display()
            );
        }
        let made_dir = !dir.exists();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the run folder", dir.display()))?;
        let mut lock = RunLock {
            dir: dir.to_path_buf(),
            file: None,
            made_dir,
            finished: false,
        };
        let path = dir.join(LOCK);
        loop {
            let file = File::create(&path)
                .with_context(|| format!("{}: cannot create the lock file", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) if wait => file
                    .lock()
                    .with_context(|| format!("{}: cannot lock", path.display()))?,
                Err(TryLockError::WouldBlock) => {
                    lock.finished = true; // the folder is the other process's: leave it be
                    return Err(RunLocked {
                        dir: dir.into(),
                        lock: path,
                    }
                    .into());
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
                }
            }
            // The holder we waited for removed its lock file before letting go, and a third
            // process may have made a new one since: hold the lock only on the file in place.
            if is_same_file(&file, &path) {
                lock.file = Some(file);
                return Ok(lock);
            }
        }
    }

    /// Marks the run as ended well: the folder stays whatever it holds.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

/// Whether the open `file` is the one now at `path`.
fn is_same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else { return };
        // Removed while still held, so no other process can lock this file after we did.
        let _ = std::fs::remove_file(self.dir.join(LOCK));
        drop(file);
        if self.made_dir && !self.finished {
            let _ = std::fs::remove_dir(&self.dir); // only succeeds when empty
        }
    }
}

/// Removes everything in a locked run folder but its lock, so the run starts afresh.
pub fn discard_contents(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n == LOCK) {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("{}: cannot remove the old run", path.display()))?;
    }
    Ok(())
}

/// What tells two computations in the same run folder apart, as a reader can compare them:
/// the fields of a run record that the fingerprint covers, but the options (the folder's name).
#[derive(Debug, Clone, PartialEq)]
pub struct RunIdentity {
    pub engine: String,
    pub block_size: Option<usize>,
    pub model_sha256: String,
    pub corpus: String,
    pub books: u32,
    pub max_tokens: Option<u64>,
    pub tokens_scored: u64,
    pub numerics_epoch: u32,
}

impl RunIdentity {
    fn of(record: &RunRecord) -> Self {
        RunIdentity {
            engine: record.engine.clone(),
            block_size: record.block_size,
            model_sha256: record.model.sha256.clone(),
            corpus: record.corpus.path.clone(),
            books: record.corpus.books,
            max_tokens: record.corpus.max_tokens,
            tokens_scored: record.tokens_scored,
            numerics_epoch: record.numerics_epoch,
        }
    }

    /// "field: old -> new" for each field that differs.
    fn differences(&self, new: &RunIdentity) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what} {a} -> {b}"));
            }
        };
        let short = |sha: &str| sha.chars().take(12).collect::<String>();
        let opt = |v: Option<u64>| v.map_or("none".into(), |v| v.to_string());
        cmp("engine", self.engine.clone(), new.engine.clone());
        cmp(
            "block size",
            opt(self.block_size.map(|b| b as u64)),
            opt(new.block_size.map(|b| b as u64)),
        );
        cmp(
            "model sha256",
            short(&self.model_sha256),
            short(&new.model_sha256),
        );
        cmp("corpus", self.corpus.clone(), new.corpus.clone());
        cmp("books", self.books.to_string(), new.books.to_string());
        cmp("max tokens", opt(self.max_tokens), opt(new.max_tokens));
        cmp(
            "tokens scored",
            self.tokens_scored.to_string(),
            new.tokens_scored.to_string(),
        );
        cmp(
            "numerics epoch",
            self.numerics_epoch.to_string(),
            new.numerics_epoch.to_string(),
        );
        out
    }
}

/// What a run folder already holds, against the run about to be written into it.
pub enum Existing {
    /// No finished run (nothing, or an unfinished one: its checkpoint resumes it).
    Nothing,
    /// The same computation, finished.
    Same(RunRecord),
    /// The same configuration computed by another numerics epoch.
    Stale(RunRecord),
    /// A finished run of another configuration; the string says how it differs.
    Other(String),
}

/// Classifies the finished run in `dir`, if any. `fingerprint_at(epoch)` is the new run's
/// fingerprint had it been computed by that numerics epoch.
pub fn existing_run(
    dir: &Path,
    new: &RunIdentity,
    fingerprint_at: impl Fn(u32) -> String,
) -> Result<Existing> {
    let record_path = dir.join("run.json");
    if !record_path.is_file() {
        return Ok(Existing::Nothing);
    }
    let record = match RunRecord::read_json(&record_path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("note: {e:#}; computing the run again");
            return Ok(Existing::Nothing);
        }
    };
    if let Err(e) = check_log(dir, &record) {
        eprintln!("note: {e}; computing the run again");
        return Ok(Existing::Nothing);
    }
    if record.fingerprint == fingerprint_at(new.numerics_epoch) {
        return Ok(Existing::Same(record));
    }
    if record.numerics_epoch != new.numerics_epoch
        && record.fingerprint == fingerprint_at(record.numerics_epoch)
    {
        return Ok(Existing::Stale(record));
    }
    let old = RunIdentity::of(&record);
    let mut diff = old.differences(new);
    if diff.is_empty() {
        diff.push("the token stream differs (corpus text, book selection or tokenizer)".into());
    }
    Ok(Existing::Other(diff.join(", ")))
}

/// A finished run's log must hold exactly the tokens its record counts.
pub fn check_log(dir: &Path, record: &RunRecord) -> Result<()> {
    let path = dir.join("nll.parquet");
    if !path.is_file() {
        bail!(
            "{}: missing (run.json counts {} scored tokens)",
            path.display(),
            record.tokens_scored
        );
    }
    let rows = NllLog::count_rows(&path)?;
    if rows != record.tokens_scored {
        bail!(
            "{}: holds {rows} tokens, run.json counts {} (a damaged or replaced log)",
            path.display(),
            record.tokens_scored
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("streamppl-rundir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = scratch("lock").join("sink:4+8");
        let first = RunLock::acquire(&dir).expect("the first writer locks");
        let err = RunLock::acquire(&dir).err().expect("the second is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("another streamppl process") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(dir.is_dir(), "a refused writer leaves the folder alone");
        first.finish();
        let again = RunLock::acquire(&dir).expect("free again once dropped");
        again.finish();
        assert!(!dir.join(LOCK).exists(), "the lock file goes with the lock");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_failed_run_leaves_no_empty_folder_it_made() {
        let root = scratch("failed");
        let dir = root.join("window:8");
        drop(RunLock::acquire(&dir).unwrap()); // dropped without finish: the run failed
        assert!(!dir.exists());
        std::fs::create_dir_all(&dir).unwrap();
        drop(RunLock::acquire(&dir).unwrap()); // a folder the user made stays
        assert!(dir.is_dir());
        let _ = std::fs::remove_dir_all(&root);
    }
}
