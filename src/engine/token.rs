//! The token-by-token engine: one forward pass per fed token over a real KV cache of pre-RoPE
//! keys, evicting exactly as spec section 2 says. It is the executable reference that every
//! faster engine must match.

use anyhow::{Result, bail};
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::checkpoint::Checkpointer;
use crate::model::{AttnPlan, KvCache, Model, Visibility};
use crate::nll_log::NllLog;
use crate::strategy::Strategy;
use crate::stream::TokenStream;

use super::{ContextWarning, ScoredLog, cache_slots, resume};

/// Cache state of an evicting or dense strategy, fed one token at a time.
pub struct TokenEngine<'m> {
    model: &'m Model,
    /// `(S, W)`; `None` for dense (nothing is ever evicted).
    budget: Option<(usize, usize)>,
    pos_shift: bool,
    cache: KvCache,
    /// Most slots the cache can ever need: S+W+1 (the token being fed sits in the cache while
    /// it attends), or every fed token for dense; `run` lowers it to the stream's length. The
    /// cache grows up to it on demand, so a budget far beyond the stream costs memory in
    /// proportion to the stream, not to the budget.
    max_slots: usize,
    /// Fed index of the token held in each cache slot.
    slot_token: Vec<u64>,
    /// Number of tokens fed so far.
    fed: u64,
    context: ContextWarning,
}

impl<'m> TokenEngine<'m> {
    /// `pos_shift = false` is the `--no-pos-shift` ablation: keys keep their stream positions.
    pub fn new(model: &'m Model, strategy: Strategy, pos_shift: bool) -> Result<Self> {
        let budget = match strategy {
            Strategy::Dense => None,
            Strategy::Sink { sinks, window } => Some((sinks, window)),
            Strategy::Recompute { .. } => {
                bail!("{strategy} is not run by the token engine's cache")
            }
        };
        let max_slots = match budget {
            None => usize::MAX,
            Some(_) => cache_slots(strategy, 1, "S+W+1")?,
        };
        Ok(TokenEngine {
            model,
            budget,
            pos_shift,
            cache: model.new_cache(0)?,
            max_slots,
            slot_token: Vec::new(),
            fed: 0,
            context: ContextWarning::new(model),
        })
    }

    /// Slot the next fed token `t` goes to: sinks keep slots 0..S, the W+1 most recent tokens
    /// share a ring after them, so the token written over is exactly the one evicted.
    /// (S+W+1 cannot overflow: `new` checked it.)
    fn slot_for(&self, t: u64) -> usize {
        match self.budget {
            None => t as usize,
            Some((s, _)) if (t as usize) < s => t as usize,
            Some((s, w)) => s + (t as usize - s) % (w + 1),
        }
    }

    /// The slot map after feeding fed tokens `0..next`.
    fn slots_after(&self, next: usize) -> Vec<u64> {
        let mut slots = Vec::new();
        for t in 0..next as u64 {
            match self.slot_for(t) {
                slot if slot == slots.len() => slots.push(t),
                slot => slots[slot] = t,
            }
        }
        slots
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

    /// Tokens fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Keys the cache holds now.
    pub fn cached(&self) -> usize {
        self.slot_token.len()
    }

    /// The cache and its slot map (the fed index of the token in each slot), for a checkpoint.
    pub fn cache_state(&self) -> (&KvCache, &[u64]) {
        (&self.cache, &self.slot_token)
    }

    /// Puts back a cache and slot map saved after `fed` tokens; an error if the slot map is
    /// not the one this strategy has after `fed` tokens.
    pub fn restore(&mut self, cache: KvCache, slot_token: Vec<u64>, fed: u64) -> Result<()> {
        if slot_token != self.slots_after(fed as usize) {
            bail!("the saved slot map is not the engine's after {fed} fed tokens");
        }
        (self.cache, self.slot_token, self.fed) = (cache, slot_token, fed);
        Ok(())
    }

    /// Feeds one token; returns its final hidden state (1, hidden).
    pub fn step(&mut self, token: u32) -> Result<Tensor> {
        let t = self.fed;
        let slot = self.slot_for(t);
        self.cache.ensure_capacity(slot + 1, self.max_slots)?;
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
            visibility: Visibility::CAUSAL, // the cache holds only what t sees
            sinks: None,
            q_fed: vec![t],
            k_fed: self.slot_token.clone(),
        };
        self.context.check(plan.q_pos[0]);
        let hidden = self.model.forward(&[token], &plan, &mut self.cache)?;
        self.fed += 1;
        Ok(hidden)
    }

    /// Feeds the first `tokens` of the stream in ONE forward pass (causal mask, positions and
    /// slots 0..n), leaving the engine exactly as `step` on each of them would: a latency
    /// measurement can fill the cache at prefill speed and then time `step` over a full cache.
    /// Only a fresh engine can prefill, and only as many tokens as fit without eviction
    /// (S+W+1; a dense cache grows).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let n = tokens.len();
        if self.fed != 0 {
            bail!(
                "prefill needs a fresh engine; {} tokens were fed already",
                self.fed
            );
        }
        if n == 0 {
            return Ok(());
        }
        match self.budget {
            // Up to S+W+1 tokens, token t sits in slot t at position t, as `step` puts it.
            Some((s, w)) if n > self.max_slots => bail!(
                "prefill of {n} tokens would evict: sink:{s}+{w} holds at most {} without eviction",
                self.max_slots
            ),
            _ => self.cache.ensure_capacity(n, self.max_slots)?,
        }
        let pos: Vec<u64> = (0..n as u64).collect();
        let plan = AttnPlan {
            q_pos: pos.clone(),
            write_at: 0,
            k_pos: pos.clone(),
            visibility: Visibility::CAUSAL,
            sinks: None,
            q_fed: pos.clone(),
            k_fed: pos,
        };
        self.context.check(n as u64 - 1);
        self.model.forward(tokens, &plan, &mut self.cache)?; // (n, hidden), unused
        self.slot_token = (0..n as u64).collect();
        self.fed = n as u64;
        Ok(())
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
        let slots_after = |next| self.slots_after(next);
        if let Some(state) = resume(
            ckpt.as_deref(),
            self.model,
            stream,
            Some(&slots_after),
            progress,
        ) {
            if let Some((cache, slot_token)) = state.kv {
                (self.cache, self.slot_token) = (cache, slot_token);
            }
            self.fed = state.next as u64;
            log = state.log;
        }
        let mut scored = ScoredLog::new(log, progress);
        self.max_slots = self.max_slots.min(stream.len());
        // An evicting cache is allocated whole; a dense one doubles from 1024 slots.
        let initial = match self.budget {
            Some(_) => self.max_slots,
            None => self.max_slots.min(1024),
        };
        self.cache.ensure_capacity(initial, self.max_slots)?;
        for i in self.fed as usize..stream.len() {
            let hidden = self.step(stream.fed[i])?;
            if let Some(target) = stream.targets[i] {
                let nll = self.model.nll(&hidden, &[target.token])?;
                scored.append(&stream.targets[i..=i], &nll);
            }
            if let Some(c) = ckpt.as_deref_mut().filter(|c| c.due()) {
                c.save(i + 1, &scored.log, Some((&self.cache, &self.slot_token)))?;
            }
        }
        Ok(scored.log)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::Config;
    use crate::model::random::random_llama;

    fn tokens(n: usize, vocab: usize) -> Vec<u32> {
        crate::model::random::random_tokens(n, vocab, 5)
    }

    /// Prefilling the first `n` tokens and stepping over the rest gives the hidden states and
    /// NLLs of stepping over every token, with eviction (and the pos shift) after the prefill.
    fn prefill_matches_steps(strategy: &str, pos_shift: bool, n: usize) {
        let cfg = Config::tiny(47);
        let model = random_llama(&cfg, 3, &Device::Cpu).unwrap();
        let ids = tokens(30, cfg.vocab_size);
        let s: Strategy = strategy.parse().unwrap();
        let mut stepped = TokenEngine::new(&model, s, pos_shift).unwrap();
        let mut prefilled = TokenEngine::new(&model, s, pos_shift).unwrap();
        for &t in &ids[..n] {
            stepped.step(t).unwrap();
        }
        prefilled.prefill(&ids[..n]).unwrap();
        assert_eq!(prefilled.slot_token, stepped.slot_token);
        assert_eq!(prefilled.fed, stepped.fed);
        for i in n..ids.len() - 1 {
            let a = stepped.step(ids[i]).unwrap(); // (1, hidden)
            let b = prefilled.step(ids[i]).unwrap();
            let diff = (a.clone() - &b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-5,
                "{strategy} prefill {n}, token {i}: hidden off by {diff}"
            );
            let next = [ids[i + 1]];
            let (na, nb) = (model.nll(&a, &next).unwrap(), model.nll(&b, &next).unwrap());
            assert!(
                (na[0] - nb[0]).abs() <= 1e-5,
                "{strategy} prefill {n}, token {i}: NLL {} vs {}",
                na[0],
                nb[0]
            );
        }
    }

    #[test]
    fn prefill_then_step_matches_step_on_every_token() {
        // sink:2+5 evicts from the 9th token on: prefill a full cache (7 = S+W), the most that
        // fits (8 = S+W+1), and a partial one.
        for n in [7, 8, 4] {
            prefill_matches_steps("sink:2+5", true, n);
        }
        prefill_matches_steps("sink:2+5", false, 7);
        prefill_matches_steps("window:6", true, 7);
        prefill_matches_steps("dense", true, 12);
    }

    #[test]
    fn prefill_refuses_eviction_and_a_used_engine() {
        let model = random_llama(&Config::tiny(47), 3, &Device::Cpu).unwrap();
        let s: Strategy = "sink:2+5".parse().unwrap();
        let ids = tokens(9, 47);
        let err = TokenEngine::new(&model, s, true)
            .unwrap()
            .prefill(&ids)
            .unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
        let mut used = TokenEngine::new(&model, s, true).unwrap();
        used.step(ids[0]).unwrap();
        assert!(used.prefill(&ids[1..3]).is_err());
    }
}
