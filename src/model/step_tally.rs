//! Where a one-token step's time goes: the token engine's CPU kernels (the matrix-vector
//! products and attention over the cache) add their wall time and the bytes they read to a
//! tally, by kind of work, while one is kept.
//!
//! ```no_run
//! # use streamppl::model::step_tally;
//! let tally = step_tally::keep();
//! // ... one-token steps ...
//! for (work, t) in tally.finish() {
//!     println!("{work}: {} calls, {:.1} GB/s", t.calls, t.read_gb_per_s());
//! }
//! ```
//!
//! `streamppl bench` keeps one over its paired rounds, so that every machine's bench says how
//! close each kind of work comes to the memory bandwidth. Without a tally a kernel pays one
//! relaxed atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A kind of work a step's kernels do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Work {
    /// A matrix-vector product with a weight matrix of this shape.
    Matrix { rows: usize, cols: usize },
    /// Attention of a few queries over one layer's cached keys and values.
    Attention,
}

impl std::fmt::Display for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Work::Matrix { rows, cols } => write!(f, "matrix {rows}x{cols}"),
            Work::Attention => write!(f, "attention"),
        }
    }
}

/// Calls, wall time and bytes read of one kind of work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub calls: u64,
    pub seconds: f64,
    pub bytes: u64,
}

impl Tally {
    /// The rate its bytes were read at, GB/s.
    pub fn read_gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }
}

static KEEPING: AtomicBool = AtomicBool::new(false);
static TALLIES: Mutex<Vec<(Work, Tally)>> = Mutex::new(Vec::new());

/// `f()`, its wall time and `bytes` added to `work`'s tally if one is kept.
pub fn timed<R>(work: Work, bytes: usize, f: impl FnOnce() -> R) -> R {
    if !KEEPING.load(Ordering::Relaxed) {
        return f();
    }
    let started = Instant::now();
    let out = f();
    let seconds = started.elapsed().as_secs_f64();
    let mut tallies = TALLIES.lock().unwrap_or_else(|e| e.into_inner());
    let at = match tallies.iter().position(|(w, _)| *w == work) {
        Some(at) => at,
        None => {
            tallies.push((work, Tally::default()));
            tallies.len() - 1
        }
    };
    let t = &mut tallies[at].1;
    t.calls += 1;
    t.seconds += seconds;
    t.bytes += bytes as u64;
    out
}

/// Keeps a tally, from zero, until [`Keeping::finish`] (or the guard's drop). There is one
/// tally per process: a second `keep` starts it from zero again, and either keeper's end stops
/// it.
pub fn keep() -> Keeping {
    TALLIES.lock().unwrap_or_else(|e| e.into_inner()).clear();
    KEEPING.store(true, Ordering::Relaxed);
    Keeping(())
}

/// A tally being kept.
#[must_use = "the tally is kept until finish()"]
pub struct Keeping(());

impl Keeping {
    /// Stops the tally; every kind of work done since [`keep`], in [`Work`]'s order.
    pub fn finish(self) -> Vec<(Work, Tally)> {
        KEEPING.store(false, Ordering::Relaxed);
        let mut tallies = std::mem::take(&mut *TALLIES.lock().unwrap_or_else(|e| e.into_inner()));
        tallies.sort_by_key(|(w, _)| *w);
        tallies
    }
}

impl Drop for Keeping {
    fn drop(&mut self) {
        KEEPING.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_tally_counts_each_kind_of_work_and_none_is_kept_after() {
        // A shape no other test's kernels use: those may run (and count) meanwhile.
        let matrix = Work::Matrix { rows: 3, cols: 4 };
        let tally = keep();
        for _ in 0..3 {
            timed(matrix, 48, || {
                std::thread::sleep(std::time::Duration::from_millis(1))
            });
        }
        assert_eq!(timed(Work::Attention, 100, || 7), 7);
        let got = tally.finish();
        let of = |work: Work| got.iter().find(|(w, _)| *w == work).map(|(_, t)| *t);
        let m = of(matrix).expect("the matrix is tallied");
        assert_eq!((m.calls, m.bytes), (3, 144));
        assert!(m.seconds >= 0.003, "{m:?}");
        assert!(of(Work::Attention).is_some_and(|t| t.calls >= 1));
        assert!(
            got.windows(2).all(|p| p[0].0 < p[1].0),
            "in Work's order, once each"
        );
        timed(matrix, 48, || ());
        let after = TALLIES.lock().unwrap();
        assert!(
            !after.iter().any(|(w, _)| *w == matrix),
            "counted with no tally kept"
        );
        assert_eq!(matrix.to_string(), "matrix 3x4");
    }
}
