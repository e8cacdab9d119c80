//! Llama-architecture decoder whose attention takes an explicit plan: which cached keys each
//! query sees ([`AttnPlan::mask`]) and at which positions ([`AttnPlan::k_pos`]), so every cache
//! strategy, and the block-parallel engine after it, runs on the same model code.
//!
//! Weights use the GGUF tensor names (`token_embd.weight`, `blk.N.attn_q.weight`, ...), with
//! Q and K rows in GGUF's interleaved-RoPE order.

use candle_core::{D, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::kernels;
use super::kv_cache::KvCache;
use super::rope::Rope;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    /// The context length the model was trained with (going past it is an experiment, not an error).
    pub context_length: usize,
    /// The LM head is the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head
    }

    /// A small config for tests that build random weights.
    pub fn tiny(vocab_size: usize) -> Self {
        Config {
            vocab_size,
            hidden_size: 32,
            intermediate_size: 48,
            n_layer: 2,
            n_head: 4,
            n_kv_head: 2,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_length: 64,
            tied_embeddings: true,
        }
    }
}

/// What the fed tokens of one forward pass attend to.
///
/// The T new tokens are written into cache slots `write_at..write_at + T`; attention then runs
/// over slots `0..k_pos.len()`, each key rotated to `k_pos[slot]`, each query to `q_pos[i]`.
#[derive(Debug, Clone)]
pub struct AttnPlan {
    pub q_pos: Vec<u64>,
    pub write_at: usize,
    pub k_pos: Vec<u64>,
    /// Additive mask (T, k_pos.len()): 0 where visible, -inf where not. `None`: all visible.
    pub mask: Option<Tensor>,
    /// Keys in slots `0..n_keys` scored with queries at other positions (the sinks, at a
    /// constant distance once eviction starts; spec section 3). `None`: one rotation for all.
    pub sinks: Option<SinkRotation>,
}

/// A second query rotation for the first `n_keys` key slots.
#[derive(Debug, Clone)]
pub struct SinkRotation {
    pub n_keys: usize,
    /// Position of each query when it scores the sink keys.
    pub q_pos: Vec<u64>,
}

impl AttnPlan {
    /// A causal mask over `t` fresh tokens in slots `0..t`.
    pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Tensor::from_vec(m, (t, t), device)
    }
}

#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    /// Q, K and V projections in one matrix: one matmul instead of three.
    wqkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections in one matrix.
    w_gate_up: Linear,
    w_down: Linear,
}

#[derive(Debug)]
pub struct Llama {
    cfg: Config,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
}

/// One linear layer computing the given ones side by side (their outputs concatenated).
fn stacked(parts: &[Linear]) -> Result<Linear> {
    let weights: Vec<Tensor> = parts.iter().map(|l| l.weight().clone()).collect();
    Ok(Linear::new(Tensor::cat(&weights, 0)?, None))
}

fn linear(vb: &VarBuilder, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), &format!("{name}.weight"))?,
        None,
    ))
}

impl Llama {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let embed_w = vb.get((cfg.vocab_size, d), "token_embd.weight")?;
        let lm_head = if cfg.tied_embeddings {
            Linear::new(embed_w.clone(), None)
        } else {
            linear(&vb, "output", cfg.vocab_size, d)?
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("blk.{i}");
                Ok(Block {
                    attn_norm: vb.get(d, &format!("{p}.attn_norm.weight"))?,
                    wqkv: stacked(&[
                        linear(&vb, &format!("{p}.attn_q"), cfg.n_head * hd, d)?,
                        linear(&vb, &format!("{p}.attn_k"), cfg.n_kv_head * hd, d)?,
                        linear(&vb, &format!("{p}.attn_v"), cfg.n_kv_head * hd, d)?,
                    ])?,
                    wo: linear(&vb, &format!("{p}.attn_output"), d, cfg.n_head * hd)?,
                    ffn_norm: vb.get(d, &format!("{p}.ffn_norm.weight"))?,
                    w_gate_up: stacked(&[
                        linear(&vb, &format!("{p}.ffn_gate"), cfg.intermediate_size, d)?,
                        linear(&vb, &format!("{p}.ffn_up"), cfg.intermediate_size, d)?,
                    ])?,
                    w_down: linear(&vb, &format!("{p}.ffn_down"), d, cfg.intermediate_size)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, d),
            blocks,
            norm: vb.get(d, "output_norm.weight")?,
            lm_head,
            rope: Rope::new(hd, cfg.rope_theta),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV cache shaped for this model.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.cfg.n_layer,
            self.cfg.n_kv_head,
            self.cfg.head_dim(),
            capacity,
            &self.device,
        )
    }

    /// Feeds `tokens` under `plan`, writing their keys and values into `cache`.
    /// Returns the final-normed hidden states (T, hidden).
    pub fn forward(&self, tokens: &[u32], plan: &AttnPlan, cache: &mut KvCache) -> Result<Tensor> {
        let t = tokens.len();
        let q_rope = self.rope.cos_sin(&plan.q_pos, &self.device)?;
        let k_rope = self.rope.cos_sin(&plan.k_pos, &self.device)?;
        let sink_q_rope = match &plan.sinks {
            Some(s) => Some(self.rope.cos_sin(&s.q_pos, &self.device)?),
            None => None,
        };
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.forward(&ids)?; // (T, d)
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, self.cfg.rms_eps as f32)?;
            let attn = self.attention(
                layer,
                b,
                &h,
                plan,
                cache,
                (&q_rope.0, &q_rope.1),
                (&k_rope.0, &k_rope.1),
                sink_q_rope.as_ref().map(|(c, s)| (c, s)),
            )?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, self.cfg.rms_eps as f32)?;
            let f = self.cfg.intermediate_size;
            let gate_up = b.w_gate_up.forward(&h)?; // (T, 2 * ffn)
            let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, f)?)?;
            let mlp = b.w_down.forward(&(gate * gate_up.narrow(1, f, f)?)?)?;
            x = (x + mlp)?;
        }
        debug_assert_eq!(x.dim(0)?, t);
        candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_eps as f32)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        b: &Block,
        h: &Tensor,
        plan: &AttnPlan,
        cache: &mut KvCache,
        q_rope: (&Tensor, &Tensor),
        k_rope: (&Tensor, &Tensor),
        sink_q_rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim());
        let n_keys = plan.k_pos.len();
        // (T, heads*hd) -> (heads, T, hd)
        let heads = |x: Tensor, n: usize| x.reshape((t, n, hd))?.transpose(0, 1)?.contiguous();
        let qkv = b.wqkv.forward(h)?; // (T, (nh + 2 nkv) * hd)
        // The softmax scale goes on the queries: (T, nh*hd) values instead of (nh, T, keys).
        let scale = 1.0 / (hd as f64).sqrt();
        let q = heads((qkv.narrow(1, 0, nh * hd)? * scale)?, nh)?.unsqueeze(0)?;
        let k_new = heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv)?;
        let v_new = heads(qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?, nkv)?;
        cache.write(layer, plan.write_at, &k_new, &v_new)?;
        let (k, v) = cache.read(layer, n_keys)?; // (nkv, n_keys, hd), pre-RoPE keys
        let rope =
            |x: &Tensor, (cos, sin): (&Tensor, &Tensor)| candle_nn::rotary_emb::rope_i(x, cos, sin);
        let k = rope(&k.unsqueeze(0)?, k_rope)?.squeeze(0)?;
        let q_main = rope(&q, q_rope)?.squeeze(0)?; // (nh, T, hd)
        let q_sink = sink_q_rope.map(|r| rope(&q, r)?.squeeze(0)).transpose()?;
        let n_sink = plan.sinks.as_ref().map_or(0, |s| s.n_keys);
        // Query tiles keep the (heads, tile, keys) scores near SCORE_BUDGET floats.
        const SCORE_BUDGET: usize = 4 << 20;
        let tile = (SCORE_BUDGET / (nh * n_keys.max(1))).clamp(1, t.max(1));
        let mut outs = Vec::with_capacity(t.div_ceil(tile));
        for start in (0..t).step_by(tile) {
            let tq = tile.min(t - start);
            let mask = plan
                .mask
                .as_ref()
                .map(|m| m.narrow(0, start, tq))
                .transpose()?;
            let q_main = q_main.narrow(1, start, tq)?;
            let parts = match &q_sink {
                // Sinks are scored by the queries rotated to their sink positions, recent keys by
                // the queries at their own positions; both go into ONE softmax.
                Some(q_sink) if n_sink > 0 => vec![
                    self.scores(&q_sink.narrow(1, start, tq)?, &k.narrow(1, 0, n_sink)?)?,
                    self.scores(&q_main, &k.narrow(1, n_sink, n_keys - n_sink)?)?,
                ],
                _ => vec![self.scores(&q_main, &k)?],
            }; // each (nh, tq, keys of the part)
            let probs = self.masked_softmax(&parts, mask.as_ref())?; // (nh, tq, n_keys)
            outs.push(self.grouped(&probs, |p| p.matmul(&v))?); // (nh, tq, hd)
        }
        let out = match outs.len() {
            1 => outs.swap_remove(0),
            _ => Tensor::cat(&outs, 1)?,
        }
        .transpose(0, 1)?
        .reshape((t, nh * hd))?;
        b.wo.forward(&out)
    }

    /// Softmax over [parts side by side] + mask. (A fused CPU kernel for this was faster alone
    /// but slowed the matmuls around it; see the block-engine notes.)
    fn masked_softmax(&self, parts: &[Tensor], mask: Option<&Tensor>) -> Result<Tensor> {
        let scores = Tensor::cat(parts, D::Minus1)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)
    }

    /// Scores (nh, tq, n) of rotated, pre-scaled queries (nh, tq, hd) against rotated keys (nkv, n, hd).
    fn scores(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        self.grouped(q, |q| q.matmul(&k.t()?))
    }

    /// Applies `f` to (nkv, group*rows, cols) views of a (nh, rows, cols) tensor: query heads
    /// j*group..(j+1)*group share KV head j, so they become one matmul per KV head.
    fn grouped(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (nh, rows, cols) = x.dims3()?;
        let nkv = self.cfg.n_kv_head;
        let y = f(&x.contiguous()?.reshape((nkv, nh / nkv * rows, cols))?)?;
        let last = y.dim(D::Minus1)?;
        y.reshape((nh, rows, last))
    }

    /// NLL of each `targets[i]` given hidden state row i (T, hidden), from the full-vocabulary
    /// log-softmax in f32. Rows are processed in tiles so the logits never exceed a tile.
    pub fn nll(&self, hidden: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        // The logits of a 64-row tile are 12.6 MB for a 49152-token vocabulary (128 rows measured
        // no faster here).
        const TILE: usize = 64;
        let mut out = Vec::with_capacity(targets.len());
        for start in (0..targets.len()).step_by(TILE) {
            let n = TILE.min(targets.len() - start);
            let logits = self.lm_head.forward(&hidden.narrow(0, start, n)?)?; // (n, vocab)
            let targets = &targets[start..start + n];
            if self.device.is_cpu() {
                out.extend(kernels::nll_from_logits(&logits, targets)?);
                continue;
            }
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let idx = Tensor::new(targets, &self.device)?.unsqueeze(1)?;
            let picked = logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
            out.extend(picked.into_iter().map(|lp| -lp));
        }
        Ok(out)
    }
}
