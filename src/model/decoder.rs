//! The decoder every family is built into: embeddings, blocks of attention and MLP with the
//! family's norms and residual order, a final norm and the LM head. A family file (`llama.rs`,
//! `neox.rs`, ...) reads its config and weights, in its own names and layouts, into these parts;
//! the engines see only [`Model`].

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;

use super::attention::{Attention, AttnPlan, Visibility};
use super::kv_cache::KvCache;
use super::linear::{self, Linear};
use super::ops;
use super::{kernels, team};

/// The shapes engines, caches and records need, whatever the family.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Dims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// The context length the model was trained with (going past it is an experiment).
    pub context_length: usize,
}

#[derive(Debug, Clone)]
pub enum Norm {
    Rms {
        weight: Tensor,
        eps: f32,
    },
    /// LayerNorm; a checkpoint without a bias gets zeros.
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f32,
    },
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { weight, eps } => ops::rms_norm(x, weight, *eps),
            Norm::Layer { weight, bias, eps } => ops::layer_norm(x, weight, bias, *eps),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Mlp {
    /// `down(silu(gate(x)) * up(x))` (Llama), gate and up in one matrix.
    GatedSilu { gate_up: Linear, down: Linear },
    /// `down(gelu_tanh(gate(x)) * up(x))` (Gemma), gate and up in one matrix.
    GatedGelu { gate_up: Linear, down: Linear },
    /// `down(gelu(up(x)))`, the exact (erf) GELU (GPT-NeoX, Falcon, MPT) or, with `tanh`,
    /// its tanh approximation (`gelu_new`).
    Gelu {
        up: Linear,
        down: Linear,
        tanh: bool,
    },
}

impl Mlp {
    /// Its two matrices, in the order they are applied.
    fn matrices(&self) -> (&Linear, &Linear) {
        match self {
            Mlp::GatedSilu { gate_up, down } | Mlp::GatedGelu { gate_up, down } => (gate_up, down),
            Mlp::Gelu { up, down, .. } => (up, down),
        }
    }

    fn matrices_mut(&mut self) -> (&mut Linear, &mut Linear) {
        match self {
            Mlp::GatedSilu { gate_up, down } | Mlp::GatedGelu { gate_up, down } => (gate_up, down),
            Mlp::Gelu { up, down, .. } => (up, down),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::GatedSilu { gate_up, down } => down.forward(&ops::silu_mul(&gate_up.forward(x)?)?),
            Mlp::GatedGelu { gate_up, down } => {
                let h = gate_up.forward(x)?; // (T, 2f): gate then up
                let f = h.dim(1)? / 2;
                down.forward(&(h.narrow(1, 0, f)?.gelu()? * h.narrow(1, f, f)?)?)
            }
            Mlp::Gelu { up, down, tanh } => {
                let h = up.forward(x)?;
                down.forward(&if *tanh { h.gelu()? } else { h.gelu_erf()? })
            }
        }
    }
}

/// Where a block's MLP reads from and adds to.
#[derive(Debug, Clone)]
pub enum Residual {
    /// `x += attn(norm1(x)); x += mlp(norm2(x))` (Llama, MPT).
    Sequential { mlp_norm: Norm },
    /// `x += attn(norm1(x)) + mlp(norm2(x))`, both from the block's input (GPT-NeoX, Falcon 40B).
    Parallel { mlp_norm: Norm },
    /// `h = norm1(x); x += attn(h) + mlp(h)` (Falcon 7B).
    ParallelSharedNorm,
    /// `x += post_attn_norm(attn(norm1(x))); x += post_mlp_norm(mlp(mlp_norm(x)))`: each
    /// branch normed on its way in and on its way out (Gemma 2 and 3).
    Sandwich {
        post_attn_norm: Norm,
        mlp_norm: Norm,
        post_mlp_norm: Norm,
    },
}

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Norm,
    /// Q, K and V projections in one matrix, rows in that order, heads contiguous; the Q rows
    /// (and bias) pre-multiplied by the softmax scale.
    pub qkv: Linear,
    pub out: Linear,
    pub mlp: Mlp,
    pub residual: Residual,
    /// The layer's own sliding window (Mistral): keys `window` or more tokens back are hidden.
    pub window: Option<usize>,
    /// RMS norms over each head's channels of the queries and of the keys, after the
    /// projection and before positions (Gemma 3). The query norm then carries the softmax
    /// scale instead of the Q rows, since a norm would undo a scale applied before it.
    pub qk_norm: Option<(Norm, Norm)>,
}

/// A family's description, for records and `streamppl info`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Architecture {
    /// `llama`, `gpt_neox`, `falcon`, `mpt` (the family file).
    pub family: String,
    /// What the checkpoint calls itself (`model_type`, or GGUF's `general.architecture`).
    pub model_type: String,
    /// The position scheme in words, e.g. `rope half-split, theta 10000, llama3 scaling x8`.
    pub positions: String,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub dims: Dims,
    pub arch: Architecture,
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Norm,
    lm_head: Linear,
    /// Whether the head is the input embedding (counted once; its weights may be stored apart
    /// from the embedding's, see [`Model::place_linear_weights`]).
    tied_head: bool,
    attention: Attention,
    /// Multiplies the embeddings on their way in, not the tied LM head (Gemma: sqrt(hidden)).
    embed_scale: Option<f64>,
    /// Layers with a window of their own see the first `local_sinks` fed tokens too, the
    /// strategy's sinks (`--local-sinks`; 0: the model as trained).
    local_sinks: u64,
    device: Device,
}

/// Weights and bias of a linear layer.
fn linear_parameters(l: &Linear) -> usize {
    l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count())
}

/// One linear layer computing the given ones side by side (outputs concatenated).
pub fn stacked(parts: &[Linear]) -> Result<Linear> {
    let weights: Vec<Tensor> = parts.iter().map(|l| l.weight().clone()).collect();
    let biases: Vec<Tensor> = parts.iter().filter_map(|l| l.bias().cloned()).collect();
    let bias = match biases.len() {
        0 => None,
        n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
        _ => candle_core::bail!("stacked layers must all have a bias or none"),
    };
    Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

/// `linear` with its output rows (and bias) multiplied by `scale`, rounded once to its dtype
/// (the product is taken in f32, so a bf16 weight is not rounded twice).
pub fn scaled(linear: &Linear, scale: f64) -> Result<Linear> {
    let times = |t: &Tensor| (t.to_dtype(DType::F32)? * scale)?.to_dtype(t.dtype());
    Ok(Linear::new(
        times(linear.weight())?,
        linear.bias().map(times).transpose()?,
    ))
}

impl Model {
    /// Assembles a model; `lm_head` `None` ties the head to the embeddings.
    pub fn new(
        dims: Dims,
        arch: Architecture,
        embed: Tensor,
        blocks: Vec<Block>,
        final_norm: Norm,
        lm_head: Option<Tensor>,
        attention: Attention,
    ) -> Result<Self> {
        let device = embed.device().clone();
        let tied_head = lm_head.is_none();
        let lm_head = Linear::new(lm_head.unwrap_or_else(|| embed.clone()), None);
        Ok(Model {
            embed: Embedding::new(embed, dims.hidden_size),
            dims,
            arch,
            blocks,
            final_norm,
            lm_head,
            tied_head,
            attention,
            embed_scale: None,
            local_sinks: 0,
            device,
        })
    }

    /// The same model with its input embeddings multiplied by `scale`, rounded to the model's
    /// dtype as the reference does (Gemma's sqrt(hidden) is 25.25 in bf16, not 25.298).
    pub fn with_embedding_scale(mut self, scale: f64) -> Self {
        self.embed_scale = Some(scale);
        self
    }

    /// The same blocks under another position scheme: how the spec oracle checks every
    /// scheme's positions (tests/strategies.rs) on one tiny block.
    pub fn with_positions(mut self, positions: super::attention::PositionScheme) -> Self {
        self.attention.positions = positions;
        self
    }

    /// The same model (its tensors shared, not copied) with the first `sinks` fed tokens, the
    /// strategy's sinks, visible in the layers that have a sliding window of their own, as an
    /// experiment: the `--local-sinks` ablation. CPU only (the GPU kernels apply layer windows
    /// as trained).
    pub fn with_local_sinks(&self, sinks: u64) -> Result<Model> {
        if !self.device.is_cpu() {
            candle_core::bail!("--local-sinks runs on the CPU only; give --device cpu");
        }
        Ok(Model {
            local_sinks: sinks,
            ..self.clone()
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of parameters, counting tied and fused matrices once.
    pub fn parameter_count(&self) -> usize {
        let head = match self.tied_head {
            true => 0,
            false => linear_parameters(&self.lm_head),
        };
        let blocks: usize = (self.linears())
            .take(4 * self.blocks.len())
            .map(linear_parameters)
            .sum();
        self.embed.embeddings().elem_count() + head + blocks + self.norm_parameters()
    }

    /// Parameters of every norm: each block's and the final one.
    fn norm_parameters(&self) -> usize {
        let norm = |n: &Norm| match n {
            Norm::Rms { weight, .. } => weight.elem_count(),
            Norm::Layer { weight, bias, .. } => weight.elem_count() + bias.elem_count(),
        };
        let mut n = norm(&self.final_norm);
        for b in &self.blocks {
            n += norm(&b.attn_norm);
            n += b.qk_norm.as_ref().map_or(0, |(q, k)| norm(q) + norm(k));
            n += match &b.residual {
                Residual::Sequential { mlp_norm } | Residual::Parallel { mlp_norm } => {
                    norm(mlp_norm)
                }
                Residual::ParallelSharedNorm => 0,
                Residual::Sandwich {
                    post_attn_norm,
                    mlp_norm,
                    post_mlp_norm,
                } => norm(post_attn_norm) + norm(mlp_norm) + norm(post_mlp_norm),
            };
        }
        n
    }

    /// Bytes of weights one token's forward pass and logits read, each tensor in its dtype:
    /// every linear layer (the head included) and norm; not the input embedding, of which a
    /// token reads one row (tied to the head, it is read whole as the head). Reading them sets
    /// the token engine's floor on a machine of known memory bandwidth.
    pub fn weight_bytes_per_token(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let linear: usize = (self.linears())
            .map(|l| bytes(l.weight()) + l.bias().map_or(0, bytes))
            .sum();
        linear + self.norm_parameters() * self.dtype().size_in_bytes()
    }

    /// Every linear layer: each block's, then the head.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let (first, second) = b.mlp.matrices();
                [&b.qkv, &b.out, first, second]
            })
            .chain([&self.lm_head])
    }

    /// Stores every linear layer's weights on the CPU in `dtype` (`--dtype bf16`: half the
    /// bytes a token reads), packed on huge pages where the OS grants them (see
    /// [`linear::place_weights`]); norms, activations and the cache stay as they are. A head
    /// tied to the embeddings in f32 stays one tensor: the embeddings then read the placed copy.
    pub fn place_linear_weights(&mut self, dtype: DType) -> Result<()> {
        let mut linears: Vec<&mut Linear> = (self.blocks.iter_mut())
            .flat_map(|b| {
                let (first, second) = b.mlp.matrices_mut();
                [&mut b.qkv, &mut b.out, first, second]
            })
            .chain([&mut self.lm_head])
            .collect();
        linear::place_weights(&mut linears, dtype)?;
        if self.tied_head && dtype == self.embed.embeddings().dtype() {
            self.embed = Embedding::new(self.lm_head.weight().clone(), self.dims.hidden_size);
        }
        Ok(())
    }

    /// How many slots each layer's cache needs at most when `extra` tokens are fed at a time:
    /// a layer with a window of its own sees the last `window` keys only, so `window + extra`
    /// (every slot, `None`, for the others, and for all under `--local-sinks`, whose windowed
    /// layers see the first keys too).
    pub fn layer_caps(&self, extra: usize) -> Vec<Option<usize>> {
        (self.blocks.iter())
            .map(|b| {
                b.window
                    .filter(|_| self.local_sinks == 0)
                    .map(|w| w.saturating_add(extra))
            })
            .collect()
    }

    /// The layers' own windows (`None`: none), in order.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        self.blocks.iter().map(|b| b.window).collect()
    }

    /// Bytes one cached token's keys and values take, over all layers: a one-token step over
    /// a full cache of C slots reads C times this besides the weights.
    pub fn kv_bytes_per_slot(&self) -> usize {
        let d = &self.dims;
        2 * d.n_layer * d.n_kv_head * d.head_dim * self.dtype().size_in_bytes()
    }

    /// A KV cache shaped for this model, in its dtype.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let d = &self.dims;
        KvCache::new(
            d.n_layer,
            d.n_kv_head,
            d.head_dim,
            capacity,
            self.dtype(),
            &self.device,
        )
    }

    /// The dtype the model computes in (its weights' and its caches'); the log-softmax of the
    /// NLL is f32 whatever it is.
    pub fn dtype(&self) -> DType {
        self.embed.embeddings().dtype()
    }

    /// Feeds `tokens` under `plan`, writing their keys and values into `cache`.
    /// Returns the final-normed hidden states (T, hidden).
    pub fn forward(&self, tokens: &[u32], plan: &AttnPlan, cache: &mut KvCache) -> Result<Tensor> {
        self.in_team_for(tokens.len(), || self.forward_alone(tokens, plan, cache))
    }

    /// `work()`, its loops on a spinning [`team`] when it is a few rows on the CPU (the token
    /// engine's steps: some 150 short loops each), else on rayon as they come.
    fn in_team_for<R: Send>(&self, rows: usize, work: impl FnOnce() -> R + Send) -> R {
        match self.device.is_cpu() && rows <= kernels::FEW_ROWS {
            true => team::with_team(work),
            false => work(),
        }
    }

    fn forward_alone(
        &self,
        tokens: &[u32],
        plan: &AttnPlan,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        // A capped layer's cache (see `layer_caps`) drops its oldest keys first; it then
        // attends over the slots it still stores, from `cache.start(layer)` on.
        cache.make_room(plan.write_at, plan.write_at + tokens.len())?;
        let layers: Vec<(Option<usize>, usize)> = (self.blocks.iter().enumerate())
            .map(|(i, b)| (b.window, cache.start(i)))
            .collect();
        let at = (self.attention).place(
            plan,
            layers.iter().copied(),
            self.local_sinks,
            self.dtype(),
            &self.device,
        )?;
        self.decoder(tokens, |layer, b, h| {
            let (q, k_new, v_new) = self.project_qkv(b, h)?;
            cache.write(layer, plan.write_at, &k_new, &v_new)?;
            // (nkv, n_keys - start, hd), pre-position
            let (k, v) = cache.read(layer, plan.k_pos.len())?;
            let keys = layers[layer];
            b.out
                .forward(&self.attention.attend(&q, &k, &v, &at, keys)?)
        })
    }

    /// Runs independent windows of one length L as one batch, each from scratch at positions
    /// 0..L with a causal mask (exact `recompute:W`): the projections and the MLP see all the
    /// windows' rows at once, and attention runs on them as if each window's heads were heads
    /// of their own (one set of launches for the whole batch). Row `w * L + i` of the result is
    /// the final-normed hidden state of token i of window w.
    pub fn forward_windows(&self, windows: &[&[u32]]) -> Result<Tensor> {
        let l = windows.first().map_or(0, |w| w.len());
        if l == 0 || windows.iter().any(|w| w.len() != l) {
            candle_core::bail!("forward_windows takes non-empty windows of one length")
        }
        let n_win = windows.len();
        let positions: Vec<u64> = (0..l as u64).collect();
        let plan = AttnPlan {
            q_pos: positions.clone(),
            write_at: 0,
            k_pos: positions.clone(),
            visibility: Visibility::CAUSAL,
            sinks: None,
            q_fed: positions.clone(),
            k_fed: positions,
        };
        let batched = self.attention.for_windows(n_win);
        let layers: Vec<(Option<usize>, usize)> =
            self.blocks.iter().map(|b| (b.window, 0)).collect();
        let at = batched.place(&plan, layers, 0, self.dtype(), &self.device)?;
        // (heads, n_win * L, hd) -> (n_win * heads, L, hd): window w's heads come w-th.
        let by_window = |x: Tensor| -> Result<Tensor> {
            let (nh, _, hd) = x.dims3()?;
            (x.reshape((nh, n_win, l, hd))?
                .transpose(0, 1)?
                .contiguous()?)
            .reshape((n_win * nh, l, hd))
        };
        self.decoder(&windows.concat(), |_, b, h| {
            let (q, k, v) = self.project_qkv(b, h)?;
            let out = batched.attend(
                &by_window(q)?,
                &by_window(k)?,
                &by_window(v)?,
                &at,
                (b.window, 0),
            )?;
            // (L, n_win * nh * hd) with columns by (window, head) -> rows by (window, token).
            let width = out.dim(1)? / n_win;
            let out = (out
                .reshape((l, n_win, width))?
                .transpose(0, 1)?
                .contiguous()?)
            .reshape((n_win * l, width))?;
            b.out.forward(&out)
        })
    }

    /// Each layer's own sliding window, if any.
    /// The decoder stack over `tokens`, with `attention(layer, block, normed x)` giving each
    /// layer's attention output (T, hidden). Returns the final-normed hidden states (T, hidden).
    fn decoder(
        &self,
        tokens: &[u32],
        mut attention: impl FnMut(usize, &Block, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.forward(&ids)?; // (T, d)
        if let Some(scale) = self.embed_scale {
            x = x.affine(scale, 0.0)?;
        }
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = b.attn_norm.forward(&x)?;
            let attn = attention(layer, b, &h)?;
            x = match &b.residual {
                Residual::Sequential { mlp_norm } => {
                    let x = (x + attn)?;
                    let m = b.mlp.forward(&mlp_norm.forward(&x)?)?;
                    (x + m)?
                }
                Residual::Parallel { mlp_norm } => {
                    let m = b.mlp.forward(&mlp_norm.forward(&x)?)?;
                    ((x + attn)? + m)?
                }
                Residual::ParallelSharedNorm => ((x + attn)? + b.mlp.forward(&h)?)?,
                Residual::Sandwich {
                    post_attn_norm,
                    mlp_norm,
                    post_mlp_norm,
                } => {
                    let x = (x + post_attn_norm.forward(&attn)?)?;
                    let m = b.mlp.forward(&mlp_norm.forward(&x)?)?;
                    (&x + post_mlp_norm.forward(&m)?)?
                }
            };
        }
        self.final_norm.forward(&x)
    }

    /// Queries (nh, T, hd), pre-scaled, and new keys and values (nkv, T, hd), all before
    /// positions, of the normed hidden states `h` (T, hidden).
    fn project_qkv(&self, b: &Block, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, _) = h.dims2()?;
        let d = &self.dims;
        let (nh, nkv, hd) = (d.n_head, d.n_kv_head, d.head_dim);
        // (T, heads*hd) -> (heads, T, hd), each head's channels normed first if the block says.
        let heads = |x: Tensor, n: usize, norm: Option<&Norm>| -> Result<Tensor> {
            let x = match norm {
                Some(norm) => norm.forward(&x.contiguous()?.reshape((t * n, hd))?)?,
                None => x,
            };
            x.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()
        };
        let (q_norm, k_norm) = b.qk_norm.as_ref().map(|(q, k)| (q, k)).unzip();
        let qkv = b.qkv.forward(h)?; // (T, (nh + 2 nkv) * hd)
        Ok((
            heads(qkv.narrow(1, 0, nh * hd)?, nh, q_norm)?,
            heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv, k_norm)?,
            heads(qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?, nkv, None)?,
        ))
    }

    /// Log-probabilities of every token after the last row of `hidden` (T, hidden), from the
    /// log-softmax in f32 (what a generator picks the next token from).
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let last = hidden.narrow(0, hidden.dim(0)? - 1, 1)?;
        let logits = (self.in_team_for(1, || self.lm_head.forward(&last))?)
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        Ok(logits.iter().map(|l| l - log_sum).collect())
    }

    /// NLL of each `targets[i]` given hidden state row i (T, hidden), from the full-vocabulary
    /// log-softmax in f32. Rows are processed in tiles so the logits never exceed a tile.
    pub fn nll(&self, hidden: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        let tile = ops::logit_rows(&self.device, self.dims.vocab_size);
        let mut out = Vec::with_capacity(targets.len());
        for start in (0..targets.len()).step_by(tile) {
            let n = tile.min(targets.len() - start);
            let rows = hidden.narrow(0, start, n)?;
            let logits = self.in_team_for(n, || self.lm_head.forward(&rows))?; // (n, vocab)
            out.extend(ops::nll_from_logits(&logits, &targets[start..start + n])?);
        }
        Ok(out)
    }
}
