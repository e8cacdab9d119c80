//! The attention core every family shares: a plan says which cached keys each query sees
//! ([`AttnPlan::mask`]) and at which positions ([`AttnPlan::k_pos`]); the family's position
//! scheme (RoPE in either pair layout, partial or scaled, or ALiBi) turns those positions into
//! rotations or biases. Keys are cached before any position is applied, so a strategy can give
//! every cached key a new position at every step (spec sections 2 and 3b).

use candle_core::{D, DType, Device, Result, Tensor};

use super::kernels::{self, FEW_ROWS, FewQueries};
use super::ops;
use super::rope::Rope;

/// What the fed tokens of one forward pass attend to.
///
/// The T new tokens are written into cache slots `write_at..write_at + T`; attention then runs
/// over slots `0..k_pos.len()`, each key at position `k_pos[slot]`, each query at `q_pos[i]`,
/// seeing the keys that `visibility` allows by their fed indices `k_fed` and `q_fed`.
#[derive(Debug, Clone)]
pub struct AttnPlan {
    pub q_pos: Vec<u64>,
    pub write_at: usize,
    pub k_pos: Vec<u64>,
    pub visibility: Visibility,
    /// Keys in slots `0..n_keys` scored with queries at other positions (the sinks, at a
    /// constant distance once eviction starts; spec section 3). `None`: one position for all.
    pub sinks: Option<SinkRotation>,
    /// Fed-token index of each query and of the token in each key slot.
    pub q_fed: Vec<u64>,
    pub k_fed: Vec<u64>,
}

/// A second query position for the first `n_keys` key slots.
#[derive(Debug, Clone)]
pub struct SinkRotation {
    pub n_keys: usize,
    /// Position of each query when it scores the sink keys.
    pub q_pos: Vec<u64>,
}

/// Which keys a query sees, by fed index (spec section 2): key j is visible from query t when
/// j <= t and either j < `sinks` or t - j <= `recent`. A rule rather than a mask, so that a
/// device can apply it inside the softmax instead of reading a dense (T, keys) mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visibility {
    pub sinks: u64,
    pub recent: u64,
}

impl Visibility {
    /// Every key up to the query itself (dense attention, a window run from scratch).
    pub const CAUSAL: Visibility = Visibility {
        sinks: 0,
        recent: u64::MAX,
    };

    /// Whether key `j` is visible from query `t` in a layer whose own sliding window (Mistral,
    /// Gemma) hides keys `window` or more tokens back (spec section 3b).
    pub fn visible(&self, t: u64, j: u64, window: Option<u64>) -> bool {
        j <= t && (j < self.sinks || t - j <= self.recent) && window.is_none_or(|w| t - j < w)
    }
}

/// The keys of one forward pass's queries, made ready for the device's softmax.
pub(crate) enum KeyMask {
    /// Every key visible to every query.
    All,
    /// Additive (T, n_keys), 0 or -inf: what the CPU kernel reads.
    Dense(Tensor),
    /// The rule over fed indices `[q_fed; k_fed]` (i64, on the device), applied in the fused
    /// softmax kernel of a GPU: no (T, n_keys) mask is built or read.
    Rule {
        fed: Tensor,
        n_query: usize,
        visibility: Visibility,
        window: Option<u64>,
    },
}

impl KeyMask {
    /// The mask of a layer with the given own window over the key slots from `start` on (a
    /// capped layer stores no earlier one), through which the first `local_sinks` fed tokens
    /// stay visible (`--local-sinks`; CPU only).
    fn new(
        plan: &AttnPlan,
        (window, start): (Option<u64>, usize),
        local_sinks: u64,
        device: &Device,
    ) -> Result<Self> {
        let (q_fed, k_fed) = (&plan.q_fed, &plan.k_fed[start..]);
        if !device.is_cpu() {
            if local_sinks > 0 {
                candle_core::bail!("--local-sinks runs on the CPU only; give --device cpu");
            }
            let fed: Vec<i64> = q_fed.iter().chain(k_fed).map(|&i| i as i64).collect();
            return Ok(KeyMask::Rule {
                fed: Tensor::from_vec(fed, q_fed.len() + k_fed.len(), device)?,
                n_query: q_fed.len(),
                visibility: plan.visibility,
                window,
            });
        }
        let mut all_visible = true;
        let mask: Vec<f32> = q_fed
            .iter()
            .flat_map(|&t| k_fed.iter().map(move |&j| (t, j)))
            .map(|(t, j)| {
                // `--local-sinks`: the first fed tokens are seen through the layer's window.
                let window = window.filter(|_| j >= local_sinks);
                match plan.visibility.visible(t, j, window) {
                    true => 0.0,
                    false => {
                        all_visible = false;
                        f32::NEG_INFINITY
                    }
                }
            })
            .collect();
        Ok(match all_visible {
            true => KeyMask::All,
            false => KeyMask::Dense(Tensor::from_vec(mask, (q_fed.len(), k_fed.len()), device)?),
        })
    }
}

/// How a family gives keys and queries their positions (spec section 3b).
#[derive(Debug, Clone)]
pub enum PositionScheme {
    /// Rotary embedding of queries and keys.
    Rope(Rope),
    /// Rotary embeddings of two bases: layers with a sliding window of their own rotate with
    /// `local`, the others with `global` (Gemma 3: 10,000 and 1e6).
    LocalGlobalRope { local: Rope, global: Rope },
    /// A bias of -slope_h x (query position - key position) on head h's scores (MPT).
    Alibi { slopes: Vec<f32> },
}

impl PositionScheme {
    /// Which of the scheme's rotary embeddings a layer with the given own window uses: 1 for
    /// a local layer of [`PositionScheme::LocalGlobalRope`], else 0 (one table set serves
    /// every layer of a one-base scheme, windowed or not).
    fn rope_kind(&self, window: Option<usize>) -> usize {
        usize::from(matches!(self, PositionScheme::LocalGlobalRope { .. }) && window.is_some())
    }

    /// The rotary embedding of a layer with the given own window, if the scheme rotates.
    fn rope(&self, window: Option<usize>) -> Option<&Rope> {
        match (self, self.rope_kind(window)) {
            (PositionScheme::Rope(rope), _) => Some(rope),
            (PositionScheme::LocalGlobalRope { local, .. }, 1) => Some(local),
            (PositionScheme::LocalGlobalRope { global, .. }, _) => Some(global),
            (PositionScheme::Alibi { .. }, _) => None,
        }
    }

    /// MPT's ALiBi slopes for `n_head` heads: 1 / 2^(k * max_bias / n) for k = 1..n, n the
    /// next power of two; for other head counts, the odd-k slopes then the even-k ones, cut to
    /// `n_head` (transformers' `build_mpt_alibi_tensor`).
    pub fn mpt_alibi(n_head: usize, max_bias: f64) -> Self {
        let n = n_head.next_power_of_two();
        let all: Vec<f32> = (1..=n)
            .map(|k| (1.0 / 2f64.powf(k as f64 * max_bias / n as f64)) as f32)
            .collect();
        let slopes = match n == n_head {
            true => all,
            false => (all.iter().skip(1).step_by(2))
                .chain(all.iter().step_by(2))
                .take(n_head)
                .copied()
                .collect(),
        };
        PositionScheme::Alibi { slopes }
    }
}

/// The positions and masks of one forward pass, made ready for its layers (tables and masks
/// built once, not per layer).
pub(crate) struct Placement<'p> {
    q_pos: &'p [u64],
    k_pos: &'p [u64],
    /// The sink key count and the queries' positions for scoring them.
    sink_q_pos: Option<(usize, &'p [u64])>,
    /// The tables of each of the scheme's rotary embeddings, by [`PositionScheme::rope_kind`].
    rope: [Option<RopeTables>; 2],
    /// One mask for each distinct layer window (`None`: the layers without one) and first
    /// stored key slot.
    masks: Vec<((Option<u64>, usize), KeyMask)>,
}

impl Placement<'_> {
    fn mask(&self, (window, start): LayerKeys) -> &KeyMask {
        let keys = (window.map(|w| w as u64), start);
        let (_, mask) = (self.masks.iter())
            .find(|(k, _)| *k == keys)
            .expect("Attention::place prepares a mask for every layer window and start");
        mask
    }
}

/// A layer's own window (`None`: none) and the first key slot its cache stores (0 unless the
/// cache is capped): which of a plan's keys the layer attends over, and how.
pub(crate) type LayerKeys = (Option<usize>, usize);

/// Rotary tables (cos, sin), each (rows, rotary_dim / 2).
struct RopeTables {
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    sink_q: Option<(Tensor, Tensor)>,
}

/// Multi-head attention with grouped KV heads over pre-position keys.
#[derive(Debug, Clone)]
pub struct Attention {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub positions: PositionScheme,
}

impl Attention {
    /// The attention of `n` independent windows run side by side, each window's heads as heads
    /// of their own (window-major): `attend` then covers them all in one set of launches.
    pub(crate) fn for_windows(&self, n: usize) -> Attention {
        let positions = match &self.positions {
            PositionScheme::Alibi { slopes } => PositionScheme::Alibi {
                slopes: slopes.repeat(n),
            },
            rope => rope.clone(),
        };
        Attention {
            n_head: self.n_head * n,
            n_kv_head: self.n_kv_head * n,
            head_dim: self.head_dim,
            positions,
        }
    }

    /// Prepares the plan's positions, in `dtype`, and its masks for layers with each of the
    /// `layers`' windows and first key slots (through the windows, the first `local_sinks` fed
    /// tokens stay visible).
    pub(crate) fn place<'p>(
        &self,
        plan: &'p AttnPlan,
        layers: impl IntoIterator<Item = LayerKeys>,
        local_sinks: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Placement<'p>> {
        let sink_q_pos = (plan.sinks.as_ref())
            .filter(|s| s.n_keys > 0)
            .map(|s| (s.n_keys, s.q_pos.as_slice()));
        let table = |rope: &Rope, pos: &[u64]| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rope.cos_sin(pos, device)?;
            Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
        };
        let tables = |rope: &Rope| -> Result<RopeTables> {
            Ok(RopeTables {
                q: table(rope, &plan.q_pos)?,
                k: table(rope, &plan.k_pos)?,
                sink_q: sink_q_pos.map(|(_, pos)| table(rope, pos)).transpose()?,
            })
        };
        let mut rope = [None, None];
        let mut masks: Vec<((Option<u64>, usize), KeyMask)> = Vec::new();
        for (window, start) in layers {
            let kind = self.positions.rope_kind(window);
            if let (None, Some(r)) = (&rope[kind], self.positions.rope(window)) {
                rope[kind] = Some(tables(r)?);
            }
            let keys = (window.map(|w| w as u64), start);
            if !masks.iter().any(|(have, _)| *have == keys) {
                masks.push((keys, KeyMask::new(plan, keys, local_sinks, device)?));
            }
        }
        Ok(Placement {
            q_pos: &plan.q_pos,
            k_pos: &plan.k_pos,
            sink_q_pos,
            rope,
            masks,
        })
    }

    /// Attention of queries `q` (nh, T, hd), pre-scaled, over keys `k` and values `v`
    /// (nkv, n_keys, hd), the plan's key slots from `first_key` on, all before positions,
    /// placed by `at`, in a layer with the sliding `window` of its own, if any. Returns
    /// (T, nh * hd), before the output projection.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        at: &Placement<'_>,
        (window, first_key): LayerKeys,
    ) -> Result<Tensor> {
        let (nh, t, hd) = q.dims3()?;
        let n_keys = k.dim(1)?;
        let rope = self.positions.rope(window);
        let rotate = |x: &Tensor, table: Option<&(Tensor, Tensor)>| match (rope, table) {
            (Some(rope), Some((cos, sin))) => ops::rope(x, cos, sin, rope.layout),
            _ => Ok(x.clone()),
        };
        let tables = at.rope[self.positions.rope_kind(window)].as_ref();
        let k_table = match tables.map(|r| &r.k) {
            Some((cos, sin)) if first_key > 0 => Some((
                cos.narrow(0, first_key, n_keys)?,
                sin.narrow(0, first_key, n_keys)?,
            )),
            table => table.cloned(),
        };
        let k_pos = &at.k_pos[first_key..];
        let q_main = rotate(q, tables.map(|r| &r.q))?; // (nh, T, hd)
        // The sink keys the layer stores, the queries' sink positions, and the queries placed
        // there.
        let q_sink = match at.sink_q_pos {
            Some((n_sink, pos)) if n_sink > first_key => Some((
                n_sink - first_key,
                pos,
                rotate(q, tables.and_then(|r| r.sink_q.as_ref()))?,
            )),
            _ => None,
        };
        let mask = at.mask((window, first_key));
        let sink_queries = q_sink.as_ref().map(|(n, _, q)| (*n, q));
        // A few f32 queries on the CPU (the token engine's one) take one pass over the cache,
        // unless ALiBi biases their scores; the CPU never gets a `Rule` mask.
        let few_cpu_queries = q.device().is_cpu() && q.dtype() == DType::F32 && t <= FEW_ROWS;
        let alibi = matches!(self.positions, PositionScheme::Alibi { .. });
        let cpu_mask = match mask {
            KeyMask::All => Some(None),
            KeyMask::Dense(m) => Some(Some(m)),
            KeyMask::Rule { .. } => None,
        };
        if let Some(mask) = cpu_mask.filter(|_| few_cpu_queries && !alibi) {
            return kernels::few_query_attention(&FewQueries {
                q: &q_main,
                q_sink: sink_queries,
                k,
                k_rope: (rope.zip(k_table.as_ref()))
                    .map(|(rope, (cos, sin))| (cos, sin, rope.layout)),
                v,
                mask,
            });
        }
        // The cache's views, copied out once for the batched ops.
        let (k, v) = (&k.contiguous()?, &v.contiguous()?);
        let k = rotate(k, k_table.as_ref())?;
        if let Some(out) = self.fused(&q_main, sink_queries, &k, v, mask, rope.is_some())? {
            return Ok(out);
        }
        // Query tiles keep the (heads, tile, keys) scores within the device's budget.
        let tile = (ops::score_budget(q.device()) / (nh * n_keys.max(1))).clamp(1, t.max(1));
        let mut outs = Vec::with_capacity(t.div_ceil(tile));
        for start in (0..t).step_by(tile) {
            let tq = tile.min(t - start);
            let q_main = q_main.narrow(1, start, tq)?;
            let rows = start..start + tq;
            let parts = match &q_sink {
                // Sinks are scored by the queries at their sink positions, recent keys by the
                // queries at their own positions; both go into ONE softmax.
                Some((n_sink, sink_pos, q_sink)) => {
                    vec![
                        self.part_scores(
                            &q_sink.narrow(1, start, tq)?,
                            &k.narrow(1, 0, *n_sink)?,
                            (&sink_pos[rows.clone()], &k_pos[..*n_sink]),
                        )?,
                        self.part_scores(
                            &q_main,
                            &k.narrow(1, *n_sink, n_keys - n_sink)?,
                            (&at.q_pos[rows], &k_pos[*n_sink..]),
                        )?,
                    ]
                }
                None => vec![self.part_scores(&q_main, &k, (&at.q_pos[rows], k_pos))?],
            }; // each (nh, tq, keys of the part)
            let probs = ops::masked_softmax(&parts, mask, start..start + tq)?; // (nh, tq, n_keys)
            outs.push(self.grouped(&probs, |p| p.matmul(v))?); // (nh, tq, hd)
        }
        match outs.len() {
            1 => outs.swap_remove(0),
            _ => Tensor::cat(&outs, 1)?,
        }
        .transpose(0, 1)?
        .reshape((t, nh * hd))
    }

    /// The attention of placed queries `q` (and `q_sink` for the first sink slots) over placed
    /// keys `k` and values `v` by a GPU's fused kernel, scores never leaving the chip:
    /// (T, nh * hd), or `None` where the kernel does not apply (the CPU, f32, ALiBi, other head
    /// dims, or `STREAMPPL_ATTENTION=materialized`).
    #[cfg(feature = "cuda")]
    fn fused(
        &self,
        q: &Tensor,
        q_sink: Option<(usize, &Tensor)>,
        k: &Tensor,
        v: &Tensor,
        mask: &KeyMask,
        rope: bool,
    ) -> Result<Option<Tensor>> {
        use super::cuda::{FlashAttention, materialized_attention_forced};
        let KeyMask::Rule {
            fed,
            n_query,
            visibility,
            window,
        } = mask
        else {
            return Ok(None);
        };
        // A few queries (the token engine's one) leave the kernel, one thread block per head
        // walking every key, without parallelism; the materialized path spreads the keys over
        // the GPU. (On the H200, SmolLM2's shape, sink:4+1020: the token engine ran 177 tok/s
        // over 1000 tokens materialized, and 122 over 512 tokens fused, with the memory pool
        // fix that helps every path; to be measured side by side.)
        const MIN_ROWS: usize = 16;
        if !rope
            || q.dim(1)? < MIN_ROWS
            || !FlashAttention::supports(q.dtype(), self.head_dim)
            || materialized_attention_forced()
        {
            return Ok(None);
        }
        let op = FlashAttention {
            q_sink: q_sink.map(|(_, q)| q.contiguous()).transpose()?,
            n_sink: q_sink.map_or(0, |(n, _)| n),
            fed: fed.clone(),
            n_query: *n_query,
            first_row: 0,
            visibility: *visibility,
            window: *window,
        };
        let (nh, t, hd) = q.dims3()?;
        let out = (q.contiguous()?).apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        Ok(Some(out.reshape((t, nh * hd))?))
    }

    #[cfg(not(feature = "cuda"))]
    fn fused(
        &self,
        _: &Tensor,
        _: Option<(usize, &Tensor)>,
        _: &Tensor,
        _: &Tensor,
        _: &KeyMask,
        _: bool,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Scores (nh, tq, n) of placed queries (nh, tq, hd) against placed keys (nkv, n, hd),
    /// plus the ALiBi bias of their positions `(q_pos, k_pos)` for ALiBi families.
    fn part_scores(
        &self,
        q: &Tensor,
        k: &Tensor,
        (q_pos, k_pos): (&[u64], &[u64]),
    ) -> Result<Tensor> {
        let scores = self.grouped(q, |q| q.matmul(&k.t()?))?;
        let PositionScheme::Alibi { slopes } = &self.positions else {
            return Ok(scores);
        };
        // Distances are small integers (exact in f32 up to 2^24) even at large positions.
        let dist: Vec<f32> = q_pos
            .iter()
            .flat_map(|&t| k_pos.iter().map(move |&j| (t as i64 - j as i64) as f32))
            .collect();
        let dist = Tensor::from_vec(dist, (1, q_pos.len(), k_pos.len()), q.device())?;
        let neg_slopes: Vec<f32> = slopes.iter().map(|s| -s).collect();
        let neg_slopes = Tensor::from_vec(neg_slopes, (slopes.len(), 1, 1), q.device())?;
        scores + dist.broadcast_mul(&neg_slopes)?.to_dtype(q.dtype())?
    }

    /// Applies `f` to (nkv, group*rows, cols) views of a (nh, rows, cols) tensor: query heads
    /// j*group..(j+1)*group share KV head j, so they become one matmul per KV head.
    fn grouped(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (nh, rows, cols) = x.dims3()?;
        let nkv = self.n_kv_head;
        let y = f(&x.contiguous()?.reshape((nkv, nh / nkv * rows, cols))?)?;
        let last = y.dim(D::Minus1)?;
        y.reshape((nh, rows, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_is_the_spec_rule_with_layer_windows() {
        let sink = Visibility {
            sinks: 2,
            recent: 3,
        };
        let seen: Vec<u64> = (0..=10).filter(|&j| sink.visible(10, j, None)).collect();
        assert_eq!(seen, vec![0, 1, 7, 8, 9, 10], "sinks, then t - j <= W");
        assert!(!sink.visible(10, 11, None), "never the future");
        // A layer window of 2 hides the sinks and everything 2 or more back.
        let seen: Vec<u64> = (0..=10).filter(|&j| sink.visible(10, j, Some(2))).collect();
        assert_eq!(seen, vec![9, 10]);
        assert!(Visibility::CAUSAL.visible(u64::MAX, 0, None));
    }

    fn plan(q_fed: Vec<u64>, k_fed: Vec<u64>, visibility: Visibility) -> AttnPlan {
        AttnPlan {
            q_pos: q_fed.clone(),
            write_at: 0,
            k_pos: k_fed.clone(),
            visibility,
            sinks: None,
            q_fed,
            k_fed,
        }
    }

    #[test]
    fn the_cpu_mask_is_the_rule_or_nothing_when_all_is_visible() {
        let dev = Device::Cpu;
        // One query over a cache that holds only what it sees (the token engine): no mask.
        let token = plan(vec![9], vec![0, 1, 6, 7, 8, 9], Visibility::CAUSAL);
        assert!(matches!(
            KeyMask::new(&token, (None, 0), 0, &dev).unwrap(),
            KeyMask::All
        ));
        let rule = Visibility {
            sinks: 1,
            recent: 1,
        };
        let block = plan(vec![3, 4], vec![0, 2, 3, 4], rule);
        let KeyMask::Dense(mask) = KeyMask::new(&block, (None, 0), 0, &dev).unwrap() else {
            panic!("a block with hidden keys needs a mask")
        };
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            mask.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 0.0, 0.0, inf], vec![0.0, inf, 0.0, 0.0]]
        );
    }

    #[test]
    fn mpt_slopes_for_power_of_two_and_other_head_counts() {
        let PositionScheme::Alibi { slopes } = PositionScheme::mpt_alibi(4, 8.0) else {
            unreachable!()
        };
        assert_eq!(slopes, vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // 6 heads: the 8-head slopes 2^-1..2^-8, odd k first (2^-2, 2^-4, ...), then even.
        let PositionScheme::Alibi { slopes } = PositionScheme::mpt_alibi(6, 8.0) else {
            unreachable!()
        };
        let p = |k: i32| 2f32.powi(-k);
        assert_eq!(slopes, vec![p(2), p(4), p(6), p(8), p(1), p(3)]);
    }
}
