//! A team of spinning threads for the many short parallel loops of a one-token step.
//!
//! A one-token step of SmolLM2 is some 150 parallel loops (matrix-vector products, attention,
//! norms) of 20-500 us each. Through rayon, the pool's other workers fall asleep between them
//! and each loop wakes them through the kernel: on the 2-core Xeon here the scheduler took 13%
//! of the samples of the token engine. [`with_team`] instead holds the pool's other workers for
//! the length of one call (a forward pass, the head's logits), spinning on one job slot; the
//! loops of that call ([`for_each_chunk_mut`], [`map`]) hand out their chunks through it, the
//! caller taking chunks too. Outside a team, or on another thread, the same calls go through
//! rayon, so the kernels do not care which runs them.

use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

/// `work()` on this thread with the pool's other workers spinning as its team (see the
/// module's docs). One team runs at a time; a second caller, a nested call, or a pool of one
/// thread runs `work()` alone, its loops on rayon.
pub fn with_team<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || LEADS.get() || TEAM.taken.swap(true, Ordering::Acquire) {
        return work();
    }
    let _taken = Taken;
    let stop = AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| TEAM.help(&stop));
        }
        // Releases the helpers even if `work` panics (the scope waits for them).
        let _lead = Lead::start(&stop);
        work()
    })
}

/// The team is this call's until dropped (a panic included).
struct Taken;

impl Drop for Taken {
    fn drop(&mut self) {
        TEAM.taken.store(false, Ordering::Release);
    }
}

/// This thread's lead of the team, until dropped: then the helpers stop.
struct Lead<'a>(&'a AtomicBool);

impl<'a> Lead<'a> {
    fn start(stop: &'a AtomicBool) -> Self {
        LEADS.set(true);
        Lead(stop)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        LEADS.set(false);
        self.0.store(true, Ordering::Release);
    }
}

/// `body(i, chunk i)` for every chunk of `chunk_len` elements of `data` (the last may be
/// shorter), in parallel: on the team if this thread leads one, else on rayon.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    body: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    if (1..=chunk_len).contains(&data.len()) {
        // One chunk: handing it out to the team would only add the threads' handshake. A
        // one-token step of SmolLM2 has 121 such loops (norms, rotations, the MLP's gate):
        // inline, the step's serial part shrank by some 30 us (2000 tokens, timers in the team).
        body(0, data);
        return;
    }
    if !LEADS.get() {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, chunk)| body(i, chunk));
        return;
    }
    let (len, base) = (data.len(), SharedPtr(data.as_mut_ptr()));
    TEAM.run(len.div_ceil(chunk_len), &|i| {
        let start = i * chunk_len;
        let n = chunk_len.min(len - start);
        // SAFETY: the team runs each index once, so the chunks given out are disjoint, and
        // all within `data`, which stays borrowed mutably until `run` returns.
        body(i, unsafe {
            std::slice::from_raw_parts_mut(base.at(start), n)
        })
    });
}

/// `[f(0), .., f(n - 1)]`, computed in parallel like [`for_each_chunk_mut`].
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for_each_chunk_mut(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter().flatten().collect()
}

thread_local! {
    /// Whether this thread leads the team now.
    static LEADS: Cell<bool> = const { Cell::new(false) };
}

static TEAM: Team = Team {
    taken: AtomicBool::new(false),
    state: AtomicU64::new(0),
    job: UnsafeCell::new(None),
    next: OwnLine(AtomicUsize::new(0)),
    finished: OwnLine(AtomicUsize::new(0)),
};

/// A value on a cache line (pair) of its own: the chunk counter, which every thread bumps,
/// must not share a line with the state the helpers poll.
#[repr(align(128))]
struct OwnLine<T>(T);

/// The job slot. `state` packs the job's generation (high 32 bits), whether it is closed to
/// helpers (bit 31) and how many helpers joined it (low bits). A helper joins an open job by
/// raising the count; the leader, done with its own chunks, closes the job and waits for the
/// helpers that joined, so the slot is never rewritten while one of them reads it.
struct Team {
    taken: AtomicBool,
    state: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    /// The next chunk index to hand out.
    next: OwnLine<AtomicUsize>,
    /// Helpers done with the current job.
    finished: OwnLine<AtomicUsize>,
}

/// A loop body and its chunk count; the body's lifetime is that of [`Team::run`]'s call.
#[derive(Clone, Copy)]
struct Job {
    body: *const (dyn Fn(usize) + Sync),
    chunks: usize,
}

// SAFETY: `job` is written only by the leader while no helper has joined (see `Team`), and
// read by helpers only after joining; the body it points to is `Sync`.
unsafe impl Sync for Team {}

const CLOSED: u64 = 1 << 31;
const GENERATION: u64 = 1 << 32;

impl Team {
    /// Runs `body` over `chunks` indices with whichever helpers join: called by the leader.
    fn run(&self, chunks: usize, body: &(dyn Fn(usize) + Sync)) {
        // SAFETY: the previous job is closed and every helper that joined it has finished,
        // so nobody reads the slot; the body outlives this call, the only time it is read.
        unsafe {
            let body: *const (dyn Fn(usize) + Sync + '_) = body;
            *self.job.get() = Some(Job {
                body: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(body),
                chunks,
            });
        }
        self.next.0.store(0, Ordering::Relaxed);
        self.finished.0.store(0, Ordering::Relaxed);
        let generation =
            (self.state.load(Ordering::Relaxed) & !(GENERATION - 1)).wrapping_add(GENERATION);
        self.state.store(generation, Ordering::Release);
        // A panicking body must not unwind past helpers still running it.
        let outcome = catch_unwind(AssertUnwindSafe(|| self.claim_chunks(chunks, body)));
        let joined = self.state.fetch_or(CLOSED, Ordering::AcqRel) & (CLOSED - 1);
        while (self.finished.0.load(Ordering::Acquire) as u64) < joined {
            std::hint::spin_loop();
        }
        if let Err(panic) = outcome {
            resume_unwind(panic)
        }
    }

    fn claim_chunks(&self, chunks: usize, body: &(dyn Fn(usize) + Sync)) {
        loop {
            let i = self.next.0.fetch_add(1, Ordering::Relaxed);
            if i >= chunks {
                return;
            }
            body(i);
        }
    }

    /// A helper's loop: join every open job until `stop`.
    fn help(&self, stop: &AtomicBool) {
        let mut last = self.state.load(Ordering::Acquire) & !(GENERATION - 1);
        while !stop.load(Ordering::Acquire) {
            let state = self.state.load(Ordering::Acquire);
            let generation = state & !(GENERATION - 1);
            let open = generation != last && state & CLOSED == 0;
            if !open
                || (self.state)
                    .compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                std::hint::spin_loop();
                continue;
            }
            last = generation;
            // SAFETY: joined to an open job: the leader does not rewrite the slot until this
            // helper counts itself finished.
            let job = unsafe { (*self.job.get()).expect("an open job is in the slot") };
            // SAFETY: the body lives until the leader sees this helper finished.
            let body = unsafe { &*job.body };
            let outcome = catch_unwind(AssertUnwindSafe(|| self.claim_chunks(job.chunks, body)));
            self.finished.0.fetch_add(1, Ordering::Release);
            if let Err(panic) = outcome {
                // Out of the team; the scope of `with_team` passes the panic on.
                resume_unwind(panic)
            }
        }
    }
}

/// A pointer to the chunks of a slice handed to the team's threads.
struct SharedPtr<T>(*mut T);

impl<T> Clone for SharedPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedPtr<T> {}

// SAFETY: only disjoint chunks are made from it (see `for_each_chunk_mut`).
unsafe impl<T: Send> Sync for SharedPtr<T> {}
unsafe impl<T: Send> Send for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    fn at(self, offset: usize) -> *mut T {
        // SAFETY (callers): offset lies within the slice the pointer came from.
        self.0.wrapping_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_team_runs_every_chunk_once_and_returns_the_work_result() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (sums, squares) = pool.install(|| {
            with_team(|| {
                let mut data: Vec<u64> = (0..10_007).collect();
                // Many loops in one team, as in a forward pass.
                for _ in 0..200 {
                    for_each_chunk_mut(&mut data, 97, |_, chunk| {
                        chunk.iter_mut().for_each(|v| *v += 1)
                    });
                }
                (data, map(1000, |i| i * i))
            })
        });
        assert!(sums.iter().enumerate().all(|(i, &v)| v == i as u64 + 200));
        assert_eq!(squares, (0..1000).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_loop_body_reaches_the_caller_and_later_teams_still_work() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let caught = pool.install(|| {
            std::panic::catch_unwind(|| {
                with_team(|| {
                    let mut data = vec![0u8; 64];
                    for_each_chunk_mut(&mut data, 1, |i, _| assert!(i != 40, "chunk 40"));
                })
            })
        });
        assert!(caught.is_err());
        let again = pool.install(|| with_team(|| map(100, |i| i).iter().sum::<usize>()));
        assert_eq!(again, 4950);
    }

    #[test]
    fn empty_and_one_chunk_loops_call_the_body_once_per_chunk() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            with_team(|| {
                assert!(map(0, |i| i).is_empty());
                assert_eq!(map(1, |i| i + 7), vec![7]);
                let calls = AtomicUsize::new(0);
                for_each_chunk_mut(&mut [0u8; 0], 4, |_, _| {
                    calls.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(calls.into_inner(), 0);
            })
        });
        assert!(map(0, |i| i).is_empty());
    }

    #[test]
    fn without_a_team_the_loops_run_on_rayon() {
        let mut data = vec![1u32; 1000];
        for_each_chunk_mut(&mut data, 7, |i, chunk| {
            chunk.iter_mut().for_each(|v| *v += i as u32)
        });
        assert_eq!(data[999], 1 + 999 / 7);
        assert_eq!(map(5, |i| i + 1), vec![1, 2, 3, 4, 5]);
    }
}
