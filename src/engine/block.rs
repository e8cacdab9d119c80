//! The block-parallel engine (spec section 3): B consecutive fed tokens in one forward pass,
//! each query with an exact mask over the keys the strategy lets it see, recent keys at their
//! true relative distance and sinks at the constant distance S+W-i once eviction has started.
//! It gives the token engine's numbers at prefill speed.

use anyhow::{Result, bail};
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::checkpoint::Checkpointer;
use crate::model::{AttnPlan, KvCache, Model, SinkRotation, Visibility};
use crate::nll_log::NllLog;
use crate::strategy::Strategy;
use crate::stream::TokenStream;

use super::{ContextWarning, ScoredLog, cache_slots, resume};

pub struct BlockEngine<'m> {
    model: &'m Model,
    /// `(S, W)`; `None` for dense.
    budget: Option<(usize, usize)>,
    pos_shift: bool,
    block: usize,
    cache: KvCache,
    /// Most slots the cache can ever need: S+W+B, or every fed token for dense; `run` lowers it
    /// to the stream's length. The cache grows up to it on demand, so a budget far beyond the
    /// stream costs memory in proportion to the stream, not to the budget.
    max_slots: usize,
    /// Fed index of the token in each occupied slot, ascending: sinks, then recent tokens.
    held: Vec<u64>,
    context: ContextWarning,
}

impl<'m> BlockEngine<'m> {
    pub fn new(
        model: &'m Model,
        strategy: Strategy,
        pos_shift: bool,
        block: usize,
    ) -> Result<Self> {
        let budget = match strategy {
            Strategy::Dense => None,
            Strategy::Sink { sinks, window } => Some((sinks, window)),
            Strategy::Recompute { .. } => bail!("{strategy} is not run by the block engine"),
        };
        if block == 0 {
            bail!("--block-size must be at least 1");
        }
        let max_slots = match budget {
            None => usize::MAX,
            Some(_) => cache_slots(
                strategy,
                block,
                &format!("S+W+B (B = --block-size {block})"),
            )?,
        };
        Ok(BlockEngine {
            model,
            budget,
            pos_shift,
            block,
            // Empty until `run` knows the stream; a layer with a window of its own holds at
            // most window + B keys whatever the strategy.
            cache: model
                .new_cache(0)?
                .with_layer_caps(&model.layer_caps(block))?,
            max_slots,
            held: Vec::new(),
            context: ContextWarning::new(model),
        })
    }

    /// Which keys a query sees (spec section 2).
    fn visibility(&self) -> Visibility {
        match self.budget {
            None => Visibility::CAUSAL,
            Some((s, w)) => Visibility {
                sinks: s as u64,
                recent: w as u64,
            },
        }
    }

    /// Feeds fed tokens `first..first + tokens.len()`; returns their hidden states (B, hidden).
    fn feed(&mut self, first: u64, tokens: &[u32]) -> Result<Tensor> {
        let n_new = tokens.len();
        let write_at = self.held.len();
        self.held.extend(first..first + n_new as u64);
        self.cache
            .ensure_capacity(self.held.len(), self.max_slots)?;
        let queries: Vec<u64> = (first..first + n_new as u64).collect();
        let n_sink = match self.budget {
            Some((s, _)) if self.pos_shift => {
                self.held.iter().take_while(|&&j| j < s as u64).count()
            }
            _ => 0,
        };
        let plan = match (self.budget, self.pos_shift) {
            // Recent keys and queries at positions relative to the oldest recent key (only
            // differences matter, and small numbers keep f32 angles exact); the sinks seen from
            // query t at distance min(t, S+W) - i: the true one before eviction starts, the
            // constant S+W-i after. (S+W cannot overflow: `new` checked S+W+B.)
            (Some((s, w)), true) => {
                // (A query that is itself a sink sees no recent key, so `first` bounds it too.)
                let base = self.held.get(n_sink).map_or(first, |&j| j.min(first));
                AttnPlan {
                    q_pos: queries.iter().map(|&t| t - base).collect(),
                    write_at,
                    k_pos: self
                        .held
                        .iter()
                        .enumerate()
                        .map(|(i, &j)| if i < n_sink { j } else { j - base })
                        .collect(),
                    visibility: self.visibility(),
                    // No sink keys (window:W): no second rotation of the queries to compute.
                    sinks: (n_sink > 0).then(|| SinkRotation {
                        n_keys: n_sink,
                        q_pos: queries.iter().map(|&t| t.min((s + w) as u64)).collect(),
                    }),
                    q_fed: queries.clone(),
                    k_fed: self.held.clone(),
                }
            }
            // Dense and --no-pos-shift: every key at its stream position (f64-built tables).
            _ => AttnPlan {
                q_pos: queries.clone(),
                write_at,
                k_pos: self.held.clone(),
                visibility: self.visibility(),
                sinks: None,
                q_fed: queries.clone(),
                k_fed: self.held.clone(),
            },
        };
        // The last query's position as the token engine would give it.
        let last = first + n_new as u64 - 1;
        self.context.check(match self.budget {
            Some((s, w)) if self.pos_shift => last.min((s + w) as u64),
            _ => last,
        });
        let hidden = self.model.forward(tokens, &plan, &mut self.cache)?;
        self.evict()?;
        Ok(hidden)
    }

    /// The slot map after feeding fed tokens `0..next` (at a block boundary): the first S, then
    /// the W most recent of the rest (everything for dense).
    fn held_after(&self, next: usize) -> Vec<u64> {
        let next = next as u64;
        match self.budget {
            None => (0..next).collect(),
            Some((s, w)) => {
                let sinks = next.min(s as u64);
                let recent = next.saturating_sub(w as u64).max(sinks);
                (0..sinks).chain(recent..next).collect()
            }
        }
    }

    /// After a block, keeps the first S entries and the last W of the rest.
    fn evict(&mut self) -> Result<()> {
        let Some((s, w)) = self.budget else {
            return Ok(());
        };
        let n_sink = self.held.iter().take_while(|&&j| j < s as u64).count();
        let rest = self.held.len() - n_sink;
        if rest > w {
            self.cache.move_slots(n_sink + rest - w, n_sink, w)?;
            self.held.drain(n_sink..n_sink + rest - w);
        }
        Ok(())
    }

    /// Feeds the whole stream block by block, scoring every fed token that has a target;
    /// resumes from and saves to `ckpt` when given (at block boundaries).
    pub fn run(
        mut self,
        stream: &TokenStream,
        progress: &ProgressBar,
        mut ckpt: Option<&mut Checkpointer>,
    ) -> Result<NllLog> {
        let mut log = NllLog::default();
        let mut start = 0;
        let held_after = |next| self.held_after(next);
        if let Some(state) = resume(
            ckpt.as_deref(),
            self.model,
            stream,
            Some(&held_after),
            progress,
        ) {
            if let Some((cache, held)) = state.kv {
                let caps = self.model.layer_caps(self.block);
                (self.cache, self.held) = (cache.with_layer_caps(&caps)?, held);
            }
            (start, log) = (state.next, state.log);
        }
        let mut scored = ScoredLog::new(log, progress);
        self.max_slots = self.max_slots.min(stream.len());
        // An evicting cache is allocated whole (no growth while a latency run times it); a dense
        // one doubles from four blocks.
        let initial = match self.budget {
            Some(_) => self.max_slots,
            None => self.block.saturating_mul(4).min(self.max_slots),
        };
        self.cache.ensure_capacity(initial, self.max_slots)?;
        while start < stream.len() {
            let end = start.saturating_add(self.block).min(stream.len());
            let hidden = self.feed(start as u64, &stream.fed[start..end])?;
            let targets = &stream.targets[start..end];
            let rows: Vec<u32> = (0..targets.len() as u32)
                .filter(|&i| targets[i as usize].is_some())
                .collect();
            if !rows.is_empty() {
                let ids: Vec<u32> = targets.iter().flatten().map(|t| t.token).collect();
                let hidden = if rows.len() == targets.len() {
                    hidden
                } else {
                    hidden.index_select(&Tensor::new(rows.as_slice(), self.model.device())?, 0)?
                };
                scored.append(targets, &self.model.nll(&hidden, &ids)?);
            }
            start = end;
            if let Some(c) = ckpt.as_deref_mut().filter(|c| c.due()) {
                c.save(start, &scored.log, Some((&self.cache, &self.held)))?;
            }
        }
        Ok(scored.log)
    }
}
