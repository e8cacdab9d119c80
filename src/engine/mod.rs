//! Engines: run a model over a [`TokenStream`](crate::stream::TokenStream) under a
//! [`Strategy`](crate::strategy::Strategy) and log each scored token's NLL.
//!
//! The token-by-token engine keeps a real KV cache of pre-RoPE keys and is the executable
//! reference of the spec; `recompute` runs sliding windows from scratch.

pub mod block;
pub mod recompute;
pub mod token;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use crate::checkpoint::{Checkpointer, EngineState, SlotsAfter};
use crate::model::Model;
use crate::nll_log::{NllLog, NllRecord};
use crate::strategy::Strategy;
use crate::stream::{Target, TokenStream};

/// Which engine runs `dense`, `window` and `sink` (recompute always runs its own windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// One forward pass per fed token: the executable reference.
    Token,
    /// One forward pass per block of this many fed tokens, with exact masks.
    Block(usize),
}

impl EngineKind {
    /// The engine's name in run records.
    pub fn name(&self, strategy: Strategy) -> &'static str {
        match (strategy, self) {
            (Strategy::Recompute { .. }, _) => "windows",
            (_, EngineKind::Token) => "token",
            (_, EngineKind::Block(_)) => "block",
        }
    }
}

/// Runs `strategy` over `stream` with the engine that implements it.
/// `pos_shift = false` is the `--no-pos-shift` ablation (window and sink only). With `ckpt`,
/// the run resumes from its checkpoint and saves new ones as it goes.
pub fn run_strategy(
    model: &Model,
    strategy: Strategy,
    pos_shift: bool,
    engine: EngineKind,
    stream: &TokenStream,
    progress: &ProgressBar,
    ckpt: Option<&mut Checkpointer>,
) -> Result<NllLog> {
    match strategy {
        Strategy::Recompute { window, stride } => {
            let batch = recompute::windows_per_batch(window, model.device());
            recompute::run(model, window, stride, batch, stream, progress, ckpt)
        }
        s => match engine {
            EngineKind::Token => {
                token::TokenEngine::new(model, s, pos_shift)?.run(stream, progress, ckpt)
            }
            EngineKind::Block(b) => {
                block::BlockEngine::new(model, s, pos_shift, b)?.run(stream, progress, ckpt)
            }
        },
    }
}

/// The state saved in `ckpt` for this run over `stream`, if a sound one exists (see
/// [`crate::checkpoint`]); moves the progress bar past it. `slots_after` gives the slot map the
/// engine holds after a number of fed tokens (`None`: the engine keeps no cache).
pub(crate) fn resume(
    ckpt: Option<&Checkpointer>,
    model: &Model,
    stream: &TokenStream,
    slots_after: Option<SlotsAfter>,
    progress: &ProgressBar,
) -> Option<EngineState> {
    let state = ckpt?.load(model, stream, slots_after)?;
    progress.set_position(state.log.len() as u64);
    Some(state)
}

/// S+W+`extra` cache slots of `strategy` (`sink:S+W` or `window:W`), which `total` names in
/// the error: budgets near 2^64 are a one-line error, not a cache size that wraps around.
pub(crate) fn cache_slots(strategy: Strategy, extra: usize, total: &str) -> Result<usize> {
    let (s, w) = strategy
        .sink_window()
        .context("only sink:S+W and window:W have a cache budget")?;
    let slots = s
        .checked_add(w)
        .with_context(|| format!("{strategy}: the cache size S+W overflows; give smaller sizes"))?;
    slots.checked_add(extra).with_context(|| {
        format!("{strategy}: the cache size {total} overflows; give smaller sizes")
    })
}

/// The most keys each layer's cache holds at once in a run of `strategy` on `engine` over
/// `fed` tokens: S+W plus the tokens fed at a time (B, or 1 for the token engine; every fed
/// token for dense), and no more than a windowed layer's cap in the block engine (see
/// [`Model::layer_caps`]). Empty for `recompute`, which keeps no cache.
pub fn peak_cache_keys(
    model: &Model,
    strategy: Strategy,
    engine: EngineKind,
    fed: usize,
) -> Vec<usize> {
    let fed_at_once = match engine {
        EngineKind::Token => 1,
        EngineKind::Block(b) => b,
    };
    let held = match strategy {
        Strategy::Recompute { .. } => return Vec::new(),
        Strategy::Dense => fed,
        s => cache_slots(s, fed_at_once, "").map_or(fed, |slots| slots.min(fed)),
    };
    let caps = match engine {
        EngineKind::Token => vec![None; model.dims.n_layer],
        EngineKind::Block(b) => model.layer_caps(b),
    };
    (caps.iter())
        .map(|cap| cap.map_or(held, |c| c.min(held)))
        .collect()
}

/// Warns once when a position passes the model's trained context: an experiment, not an error.
pub(crate) struct ContextWarning {
    context: u64,
    warned: bool,
}

impl ContextWarning {
    pub(crate) fn new(model: &Model) -> Self {
        ContextWarning {
            context: model.dims.context_length as u64,
            warned: false,
        }
    }

    pub(crate) fn check(&mut self, position: u64) {
        if !self.warned && position >= self.context {
            self.warned = true;
            eprintln!(
                "warning: position {position} is past the model's trained context ({}); carrying on (this is the experiment)",
                self.context
            );
        }
    }
}

/// A run's growing log: appends the NLLs of scored targets and shows the count and the running
/// PPL on the progress bar (its sum kept as the log grows, so a long run pays nothing for it).
pub(crate) struct ScoredLog<'p> {
    pub(crate) log: NllLog,
    sum: f64,
    progress: &'p ProgressBar,
}

impl<'p> ScoredLog<'p> {
    /// Continues `log` (empty, or restored from a checkpoint).
    pub(crate) fn new(log: NllLog, progress: &'p ProgressBar) -> Self {
        let scored = ScoredLog {
            sum: log.sum_nll(),
            log,
            progress,
        };
        scored.show();
        scored
    }

    /// Appends the NLLs of `targets` (skipping unscored fed tokens).
    pub(crate) fn append(&mut self, targets: &[Option<Target>], nll: &[f32]) {
        for (t, &v) in targets.iter().flatten().zip(nll) {
            self.log.push(NllRecord {
                position: t.position,
                book: t.book,
                token_id: t.token,
                nll: v,
            });
            self.sum += v as f64;
        }
        self.show();
    }

    fn show(&self) {
        let n = self.log.len();
        self.progress.set_position(n as u64);
        if n > 0 {
            let ppl = (self.sum / n as f64).exp();
            self.progress.set_message(format!("PPL {ppl:.3}"));
        }
    }
}
