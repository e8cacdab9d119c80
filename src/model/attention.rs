//! The attention core every family shares: a plan says which cached keys each query sees
//! ([`AttnPlan::mask`]) and at which positions ([`AttnPlan::k_pos`]); the family's position
//! scheme (RoPE in either pair layout, partial or scaled, or ALiBi) turns those positions into
//! rotations or biases. Keys are cached before any position is applied, so a strategy can give
//! every cached key a new position at every step (spec sections 2 and 3b).

use candle_core::{D, Device, Result, Tensor};

use super::ops;
use super::rope::Rope;

/// What the fed tokens of one forward pass attend to.
///
/// The T new tokens are written into cache slots `write_at..write_at + T`; attention then runs
/// over slots `0..k_pos.len()`, each key at position `k_pos[slot]`, each query at `q_pos[i]`.
#[derive(Debug, Clone)]
pub struct AttnPlan {
    pub q_pos: Vec<u64>,
    pub write_at: usize,
    pub k_pos: Vec<u64>,
    /// Additive mask (T, k_pos.len()): 0 where visible, -inf where not. `None`: all visible.
    pub mask: Option<Tensor>,
    /// Keys in slots `0..n_keys` scored with queries at other positions (the sinks, at a
    /// constant distance once eviction starts; spec section 3). `None`: one position for all.
    pub sinks: Option<SinkRotation>,
    /// Fed-token index of each query and of the token in each key slot: layers with a sliding
    /// window of their own never see a key `window` or more tokens back (spec section 3b).
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

impl AttnPlan {
    /// A causal mask over `t` fresh tokens in slots `0..t`.
    pub fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Tensor::from_vec(m, (t, t), device)
    }

    /// The plan's mask narrowed to keys fewer than `window` fed tokens before each query.
    pub fn window_mask(&self, window: usize, device: &Device) -> Result<Tensor> {
        let n = self.k_fed.len();
        let base = match &self.mask {
            Some(m) => m
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            None => vec![0f32; self.q_fed.len() * n],
        };
        let mask: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(at, &m)| {
                let (t, j) = (self.q_fed[at / n], self.k_fed[at % n]);
                match t.saturating_sub(j) >= window as u64 {
                    true => f32::NEG_INFINITY,
                    false => m,
                }
            })
            .collect();
        Tensor::from_vec(mask, (self.q_fed.len(), n), device)
    }
}

/// How a family gives keys and queries their positions (spec section 3b).
#[derive(Debug, Clone)]
pub enum PositionScheme {
    /// Rotary embedding of queries and keys.
    Rope(Rope),
    /// A bias of -slope_h x (query position - key position) on head h's scores (MPT).
    Alibi { slopes: Vec<f32> },
}

impl PositionScheme {
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

/// The positions of one forward pass, made ready for its layers (tables built once, not per layer).
pub(crate) struct Placement<'p> {
    q_pos: &'p [u64],
    k_pos: &'p [u64],
    /// The sink key count and the queries' positions for scoring them.
    sink_q_pos: Option<(usize, &'p [u64])>,
    rope: Option<RopeTables>,
}

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
    /// Prepares query positions `q_pos`, key positions `k_pos` and the optional sink positions.
    pub(crate) fn place<'p>(
        &self,
        q_pos: &'p [u64],
        k_pos: &'p [u64],
        sinks: Option<&'p SinkRotation>,
        device: &Device,
    ) -> Result<Placement<'p>> {
        let sink_q_pos = sinks
            .filter(|s| s.n_keys > 0)
            .map(|s| (s.n_keys, s.q_pos.as_slice()));
        let rope = match &self.positions {
            PositionScheme::Rope(rope) => Some(RopeTables {
                q: rope.cos_sin(q_pos, device)?,
                k: rope.cos_sin(k_pos, device)?,
                sink_q: match sink_q_pos {
                    Some((_, pos)) => Some(rope.cos_sin(pos, device)?),
                    None => None,
                },
            }),
            PositionScheme::Alibi { .. } => None,
        };
        Ok(Placement {
            q_pos,
            k_pos,
            sink_q_pos,
            rope,
        })
    }

    /// Attention of queries `q` (nh, T, hd), pre-scaled, over keys `k` and values `v`
    /// (nkv, n_keys, hd), all before positions, placed by `at`, under the additive `mask`
    /// (T, n_keys). Returns (T, nh * hd), before the output projection.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        at: &Placement<'_>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (nh, t, hd) = q.dims3()?;
        let n_keys = k.dim(1)?;
        let rotate = |x: &Tensor, table: Option<&(Tensor, Tensor)>| match (&self.positions, table) {
            (PositionScheme::Rope(rope), Some((cos, sin))) => ops::rope(x, cos, sin, rope.layout),
            _ => Ok(x.clone()),
        };
        let tables = at.rope.as_ref();
        let k = rotate(k, tables.map(|r| &r.k))?;
        let q_main = rotate(q, tables.map(|r| &r.q))?; // (nh, T, hd)
        // The sink key count, the queries' sink positions, and the queries placed there.
        let q_sink = match at.sink_q_pos {
            Some((n_sink, pos)) => Some((
                n_sink,
                pos,
                rotate(q, tables.and_then(|r| r.sink_q.as_ref()))?,
            )),
            None => None,
        };
        // Query tiles keep the (heads, tile, keys) scores near SCORE_BUDGET floats.
        const SCORE_BUDGET: usize = 4 << 20;
        let tile = (SCORE_BUDGET / (nh * n_keys.max(1))).clamp(1, t.max(1));
        let mut outs = Vec::with_capacity(t.div_ceil(tile));
        for start in (0..t).step_by(tile) {
            let tq = tile.min(t - start);
            let mask = mask.map(|m| m.narrow(0, start, tq)).transpose()?;
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
                            (&sink_pos[rows.clone()], &at.k_pos[..*n_sink]),
                        )?,
                        self.part_scores(
                            &q_main,
                            &k.narrow(1, *n_sink, n_keys - n_sink)?,
                            (&at.q_pos[rows], &at.k_pos[*n_sink..]),
                        )?,
                    ]
                }
                None => vec![self.part_scores(&q_main, &k, (&at.q_pos[rows], at.k_pos))?],
            }; // each (nh, tq, keys of the part)
            let probs = ops::masked_softmax(&parts, mask.as_ref())?; // (nh, tq, n_keys)
            outs.push(self.grouped(&probs, |p| p.matmul(v))?); // (nh, tq, hd)
        }
        match outs.len() {
            1 => outs.swap_remove(0),
            _ => Tensor::cat(&outs, 1)?,
        }
        .transpose(0, 1)?
        .reshape((t, nh * hd))
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
        scores + dist.broadcast_mul(&neg_slopes)?
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
