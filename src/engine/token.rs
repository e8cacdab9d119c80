//! The token-by-token engine: one forward pass per fed token over a real KV cache of pre-RoPE
//! keys, evicting exactly as spec section 2 says. It is the executable reference that every
//! faster engine must match.

use anyhow::{Result, bail};
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::checkpoint::Checkpointer;
use crate::model::{AttnPlan, KvCache, Llama};
use crate::nll_log::NllLog;
use crate::strategy::Strategy;
use crate::stream::TokenStream;

use super::{ContextWarning, log_targets, resume};

/// Cache state of an evicting or dense strategy, fed one token at a time.
pub struct TokenEngine<'m> {
    model: &'m Llama,
    /// `(S, W)`; `None` for dense (nothing is ever evicted).
    budget: Option<(usize, usize)>,
    pos_shift: bool,
    cache: KvCache,
    /// Fed index of the token held in each cache slot.
    slot_token: Vec<u64>,
    /// Number of tokens fed so far.
    fed: u64,
    context: ContextWarning,
}

impl<'m> TokenEngine<'m> {
    /// `pos_shift = false` is the `--no-pos-shift` ablation: keys keep their stream positions.
    pub fn new(model: &'m Llama, strategy: Strategy, pos_shift: bool) -> Result<Self> {
        let budget = match strategy {
            Strategy::Dense => None,
            Strategy::Sink { sinks, window } => Some((sinks, window)),
            Strategy::Recompute { .. } => {
                bail!("{strategy} is not run by the token engine's cache")
            }
        };
        // One slot more than S+W: the current token sits in the cache while it attends.
        let capacity = budget.map_or(1024, |(s, w)| s + w + 1);
        Ok(TokenEngine {
            model,
            budget,
            pos_shift,
            cache: model.new_cache(capacity)?,
            slot_token: Vec::new(),
            fed: 0,
            context: ContextWarning::new(model),
        })
    }

    /// Slot the next fed token `t` goes to: sinks keep slots 0..S, the W+1 most recent tokens
    /// share a ring after them, so the token written over is exactly the one evicted.
    fn slot_for(&self, t: u64) -> usize {
        match self.budget {
            None => t as usize,
            Some((s, _)) if (t as usize) < s => t as usize,
            Some((s, w)) => s + (t as usize - s) % (w + 1),
        }
    }

    /// RoPE position of cached token `j` seen from the token `t` being fed.
    fn position(&self, j: u64, t: u64) -> u64 {
        match self.budget {
            Some((s, w)) if self.pos_shift && t as usize > s + w && j as usize >= s => {
                // Rank in cache order: sinks first, then the W+1 most recent by age.
                s as u64 + j - (t - w as u64)
            }
            _ => j,
        }
    }

    /// Feeds one token; returns its final hidden state (1, hidden).
    pub fn step(&mut self, token: u32) -> Result<Tensor> {
        let t = self.fed;
        let slot = self.slot_for(t);
        if self.budget.is_none() {
            self.cache.ensure_capacity(slot + 1)?;
        }
        if slot == self.slot_token.len() {
            self.slot_token.push(t);
        } else {
            self.slot_token[slot] = t;
        }
        let plan = AttnPlan {
            q_pos: vec![self.position(t, t)],
            write_at: slot,
            k_pos: self
                .slot_token
                .iter()
                .map(|&j| self.position(j, t))
                .collect(),
            mask: None,
            sinks: None,
        };
        self.context.check(plan.q_pos[0]);
        let hidden = self.model.forward(&[token], &plan, &mut self.cache)?;
        self.fed += 1;
        Ok(hidden)
    }

    /// Feeds the whole stream, scoring after every fed token that has a target; resumes from
    /// and saves to `ckpt` when given.
    pub fn run(
        mut self,
        stream: &TokenStream,
        progress: &ProgressBar,
        mut ckpt: Option<&mut Checkpointer>,
    ) -> Result<NllLog> {
        let mut log = NllLog::default();
        if let Some(state) = resume(ckpt.as_deref(), self.model, progress)? {
            if let Some((cache, slot_token)) = state.kv {
                (self.cache, self.slot_token) = (cache, slot_token);
            }
            self.fed = state.next as u64;
            log = state.log;
        }
        for i in self.fed as usize..stream.len() {
            let hidden = self.step(stream.fed[i])?;
            if let Some(target) = stream.targets[i] {
                let nll = self.model.nll(&hidden, &[target.token])?;
                log_targets(&mut log, &stream.targets[i..=i], &nll);
                progress.inc(1);
            }
            if let Some(c) = ckpt.as_deref_mut().filter(|c| c.due()) {
                c.save(i + 1, &log, Some((&self.cache, &self.slot_token)))?;
            }
        }
        Ok(log)
    }
}
