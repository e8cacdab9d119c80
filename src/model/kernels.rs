//! CPU kernels for the element-wise work around the matmuls, where candle's generic ops call a
//! scalar `exp` and make several passes (measured on the block engine, sink:4+1020, B=128, 2
//! threads: attention softmax 20% of the time, SiLU 5%, LM-head log-softmax before this file
//! existed, more). Each is one pass with a vectorizable `exp`, split over rows on rayon's pool,
//! the pool candle's matmuls use (threads of our own would compete with its spinning workers).
//! Other devices keep using candle's ops.
//!
//! The crate is built for baseline x86-64, where these loops compile to 4-wide SSE2; each row
//! function is also compiled for AVX2+FMA (`simd_dispatch!`) and that copy runs when the CPU has
//! them (the softmax and SiLU took half the time).

use candle_core::{DType, Device, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::rope::PairLayout;
use super::step_tally::{self, Work};
use super::team;

/// `exp(x)` for f32, to about 2 ulp, written so the compiler vectorizes loops over it: range
/// reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r, then 2^n via exponent bits.
/// Inputs below -87.3 (including -inf, a masked score) give 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest with the 1.5 * 2^23 trick: `f32::round` is a libm call that blocks
    // vectorization on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor terms 1/k! up to k = 7: |r| <= 0.347 keeps the remainder under 2e-9.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from the bits of 2^23 + 127 + n (an exact float): its low bits are the biased exponent.
    // (A float-to-int cast would be a saturating conversion, which does not vectorize.)
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    p * scale
}

/// Defines `fn $name(args) -> R` that runs `$generic(args)` compiled for AVX2 and FMA when the
/// CPU has them, else as built. `$generic` and everything it calls must be `#[inline(always)]`:
/// only code inlined into the `target_feature` function is compiled with those features.
macro_rules! simd_dispatch {
    (fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $generic:ident) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

simd_dispatch!(fn log_sum_exp(row: &[f32]) -> f64 = log_sum_exp_generic);
simd_dispatch!(fn softmax_row(row: &mut [f32], parts: &[&[f32]], mask: Option<&[f32]>) = softmax_row_generic);
simd_dispatch!(fn silu_mul_row(out: &mut [f32], gate: &[f32], up: &[f32]) = silu_mul_row_generic);
simd_dispatch!(fn rms_norm_row(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) = rms_norm_row_generic);
simd_dispatch!(fn rope_interleaved_row(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) = rope_interleaved_row_generic);
simd_dispatch!(fn rope_half_split_row(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) = rope_half_split_row_generic);
simd_dispatch!(fn layer_norm_row(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) = layer_norm_row_generic);

/// Sum of `f(x)` with eight independent accumulators, so it vectorizes (a single running f32
/// sum cannot be reordered by the compiler).
#[inline(always)]
fn lane_sum_of(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    lane_sum_of(xs, |x| x)
}

/// Maximum with eight independent lanes (vectorizes like [`lane_sum`]).
#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Calls `f` with the f32 contents of contiguous CPU tensors.
fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    with_typed_slices(ts, f)
}

/// Calls `f` with the contents of contiguous CPU tensors of element type `T`.
fn with_typed_slices<T: candle_core::WithDType, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .zip(&ts)
        .map(|((storage, layout), t)| {
            let Storage::Cpu(cpu) = &**storage else {
                candle_core::bail!("CPU kernel called on a {:?} tensor", t.device())
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
            Ok(&cpu.as_slice::<T>()?[start..end])
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(f(&slices))
}

/// Calls `f` with the elements of a (heads, rows, hd) CPU f32 tensor from its first one, and
/// the distance between its heads: the first rows of a KV cache (rows contiguous within each
/// head) are read in place. Copying them out was most of a dense one-token step past a few
/// thousand keys (the whole cache, every layer, every token).
fn with_head_rows<R>(t: &Tensor, f: impl FnOnce(&[f32], usize) -> R) -> Result<R> {
    let (_, rows, hd) = t.dims3()?;
    let stride = t.stride();
    if stride[2] != 1 || (stride[1] != hd && rows > 1) {
        return with_head_rows(&t.contiguous()?, f);
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("CPU kernel called on a {:?} tensor", t.device())
    };
    Ok(f(
        &cpu.as_slice::<f32>()?[layout.start_offset()..],
        stride[0],
    ))
}

/// A new f32 tensor of `shape`, filled row by row (rows of `row_len` values) in parallel:
/// `fill(r, inputs, row)` gets the row index and the contents of `inputs`.
fn fill_rows(
    inputs: &[&Tensor],
    shape: impl Into<Shape>,
    row_len: usize,
    fill: impl Fn(usize, &[&[f32]], &mut [f32]) + Sync,
) -> Result<Tensor> {
    let shape = shape.into();
    let mut out = vec![0f32; shape.elem_count()];
    // Enough rows per task to amortize the scheduling.
    let rows_per_task = (16_384 / row_len.max(1)).max(1);
    with_slices(inputs, |ins| {
        team::for_each_chunk_mut(&mut out, row_len * rows_per_task, |task, rows| {
            for (i, row) in rows.chunks_mut(row_len).enumerate() {
                fill(task * rows_per_task + i, ins, row)
            }
        });
    })?;
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// NLL of `targets[i]` under row i of `logits` (rows, vocab): log-sum-exp minus the target's
/// logit, the sum of exponentials accumulated in f64.
pub fn nll_from_logits(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let (rows, vocab) = logits.dims2()?;
    let mut out = vec![0f32; rows];
    with_slices(&[logits], |l| {
        let l = l[0];
        out.par_iter_mut().enumerate().for_each(|(r, nll)| {
            let row = &l[r * vocab..(r + 1) * vocab];
            *nll = (log_sum_exp(row) - row[targets[r] as usize] as f64) as f32;
        });
    })?;
    Ok(out)
}

/// `ln(sum(exp(row)))`, the exponentials summed in f32 lanes per block of the row and in f64
/// across blocks.
#[inline(always)]
fn log_sum_exp_generic(row: &[f32]) -> f64 {
    let max = lane_max(row);
    let mut block = [0f32; 256];
    let sum: f64 = row
        .chunks(256)
        .map(|c| {
            let b = &mut block[..c.len()];
            b.iter_mut()
                .zip(c)
                .for_each(|(e, &x)| *e = fast_exp(x - max));
            lane_sum(b) as f64
        })
        .sum();
    max as f64 + sum.ln()
}

/// Softmax over the last axis of `parts` laid side by side, plus an additive `mask`.
/// `parts[p]` (one or two of them): (heads, rows, n_p); `mask`: (rows, sum n_p), the same for
/// every head, -inf where a key is not visible (it gets exactly 0). Returns
/// (heads, rows, sum n_p). Every row must see at least one key.
pub fn masked_softmax(parts: &[Tensor], mask: Option<&Tensor>) -> Result<Tensor> {
    if !(1..=2).contains(&parts.len()) {
        candle_core::bail!("masked_softmax takes one or two parts, not {}", parts.len())
    }
    let (heads, rows, _) = parts[0].dims3()?;
    let widths = parts
        .iter()
        .map(|p| p.dims3().map(|(_, _, n)| n))
        .collect::<Result<Vec<_>>>()?;
    let n: usize = widths.iter().sum();
    if let Some(m) = mask {
        let dims = m.dims2()?;
        if dims != (rows, n) {
            candle_core::bail!("mask is {dims:?}, scores are ({rows}, {n})")
        }
    }
    let inputs: Vec<&Tensor> = parts.iter().chain(mask).collect();
    let (w0, w1) = (widths[0], widths.get(1).copied().unwrap_or(0));
    fill_rows(&inputs, (heads, rows, n), n, |r, ins, dst| {
        // Row r is query r % rows of head r / rows.
        let (parts, mask) = (&ins[..widths.len()], ins.get(widths.len()));
        let q = r % rows;
        let row_parts = [
            &parts[0][r * w0..(r + 1) * w0],
            parts.get(1).map_or(&[][..], |p| &p[r * w1..(r + 1) * w1]),
        ];
        softmax_row(dst, &row_parts, mask.map(|m| &m[q * n..(q + 1) * n]));
    })
}

/// `row = softmax(parts side by side + mask)`, exactly 0 where the mask is -inf.
#[inline(always)]
fn softmax_row_generic(row: &mut [f32], parts: &[&[f32]], mask: Option<&[f32]>) {
    let mut at = 0;
    for part in parts {
        let dst = &mut row[at..at + part.len()];
        match mask {
            Some(m) => dst
                .iter_mut()
                .zip(*part)
                .zip(&m[at..at + part.len()])
                .for_each(|((d, s), m)| *d = s + m),
            None => dst.copy_from_slice(part),
        }
        at += part.len();
    }
    let max = lane_max(row);
    row.iter_mut().for_each(|d| {
        let e = fast_exp(*d - max);
        *d = if *d == f32::NEG_INFINITY { 0.0 } else { e };
    });
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|d| *d *= inv);
}

#[inline(always)]
fn silu_mul_row_generic(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((d, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *d = g / (1.0 + fast_exp(-g)) * u;
    }
}

/// `silu(gate) * up` for `gate_up` (rows, 2f) holding gate then up on each row; returns (rows, f).
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let (rows, two_f) = gate_up.dims2()?;
    let f = two_f / 2;
    fill_rows(&[gate_up], (rows, f), f, |r, gu, dst| {
        let (gate, up) = gu[0][r * two_f..(r + 1) * two_f].split_at(f);
        silu_mul_row(dst, gate, up);
    })
}

#[inline(always)]
fn rms_norm_row_generic(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let mean_sq = lane_sum_of(x, |v| v * v) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// RMS norm of each row of `x` (rows, d), scaled by `weight` (d).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    fill_rows(&[x, weight], (rows, d), d, |r, s, dst| {
        rms_norm_row(dst, &s[0][r * d..(r + 1) * d], s[1], eps)
    })
}

/// Rotates the pairs (x[2i], x[2i+1]) of the first `2 * cos.len()` channels of one row by the
/// angles whose cos and sin are given; the other channels are copied (partial rotary).
#[inline(always)]
fn rope_interleaved_row_generic(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let rotary = 2 * cos.len();
    for (((o, v), &c), &s) in out[..rotary]
        .chunks_exact_mut(2)
        .zip(x.chunks_exact(2))
        .zip(cos)
        .zip(sin)
    {
        o[0] = v[0] * c - v[1] * s;
        o[1] = v[0] * s + v[1] * c;
    }
    out[rotary..].copy_from_slice(&x[rotary..]);
}

/// Rotates the pairs (x[i], x[i + h]), h = `cos.len()`, of the first 2h channels of one row;
/// the other channels are copied (partial rotary).
#[inline(always)]
fn rope_half_split_row_generic(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    let (lo, rest) = out.split_at_mut(h);
    let (hi, tail) = rest.split_at_mut(h);
    for i in 0..h {
        let (a, b) = (x[i], x[i + h]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
    tail.copy_from_slice(&x[2 * h..]);
}

/// Rotary embedding of `x` (heads, t, d) in `layout`, rotating the first `2 * cos.dim(1)`
/// channels of each head: `cos` and `sin` (t, rotary_dim / 2), row i of the tables for
/// position i of every head.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: PairLayout) -> Result<Tensor> {
    let (heads, t, d) = x.dims3()?;
    let (rows, half) = cos.dims2()?;
    if rows != t || sin.dims2()? != (t, half) || 2 * half > d {
        candle_core::bail!("rope tables {:?} do not fit {:?}", cos.shape(), x.shape())
    }
    let row_fn = match layout {
        PairLayout::Interleaved => rope_interleaved_row,
        PairLayout::HalfSplit => rope_half_split_row,
    };
    fill_rows(&[x, cos, sin], (heads, t, d), d, |r, s, dst| {
        // Row r is position r % t of head r / t.
        let p = r % t;
        let (x, cos, sin) = (s[0], s[1], s[2]);
        row_fn(
            dst,
            &x[r * d..(r + 1) * d],
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        )
    })
}

#[inline(always)]
fn layer_norm_row_generic(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x) / n;
    let var = lane_sum_of(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - mean) * inv * w + b;
    }
}

/// LayerNorm of each row of `x` (rows, d): centred, scaled to unit variance, times `weight`
/// plus `bias` (both (d)).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    fill_rows(&[x, weight, bias], (rows, d), d, |r, s, dst| {
        layer_norm_row(dst, &s[0][r * d..(r + 1) * d], s[1], s[2], eps)
    })
}

/// Rows of `x` at most this many go through [`few_rows_times_transposed`]: its weight rows are
/// read once for all of them, so it stays memory-bound (and ahead of gemm) while they fit in L1.
pub const FEW_ROWS: usize = 8;

/// `x (t, k) . w (n, k)^T + bias (n)` for few rows `t` (the token engine's one-token steps):
/// output columns split over the threads, each weight row read once and dotted with every
/// row of `x`. candle's gemm runs `t = 1` as a single-threaded gemv, which leaves half of a
/// 2-core machine's memory bandwidth (the floor of a one-token step) unused.
pub fn few_rows_times_transposed(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("x is ({t}, {k}) but the weight is ({n}, {wk})")
    }
    let inputs: Vec<&Tensor> = [x].into_iter().chain(bias).collect();
    let weight_bytes = w.elem_count() * w.dtype().size_in_bytes();
    let out_t = step_tally::timed(Work::Matrix { rows: n, cols: k }, weight_bytes, || {
        with_slices(&inputs, |ins| {
            let (x, bias) = (ins[0], ins.get(1).copied());
            let asking = asks_for_weights();
            match w.dtype() {
                // Half the bytes of f32, widened exactly as they are read.
                DType::BF16 => with_typed_slices(&[w], |ws| {
                    let dot = if asking {
                        dot_rows_bf16_asking
                    } else {
                        dot_rows_bf16
                    };
                    times_weight_rows(x, ws[0], bias, k, dot)
                }),
                _ => with_slices(&[w], |ws| {
                    let dot = if asking { dot_rows_asking } else { dot_rows };
                    times_weight_rows(x, ws[0], bias, k, dot)
                }),
            }
        })
    })??;
    let out = Tensor::from_vec(out_t, (n, t), &Device::Cpu)?;
    if t == 1 {
        out.reshape((1, n))
    } else {
        out.t()?.contiguous()
    }
}

/// Weights below which a matrix-vector task is not split further: the scheduling would cost
/// more than the second thread saves.
const MIN_WEIGHTS_PER_TASK: usize = 32_768;

/// Matrix-vector tasks per thread of a matrix split evenly, at most (see [`task_bounds`]).
const TASKS_PER_THREAD: usize = 2;

/// The shares of a large matrix's rows in the tiers of its tasks, one task a thread in each
/// tier, handed out in order (see [`task_bounds`]). Others measured beside these (token engine,
/// 2000 tokens, alternating): 0.7/0.2/0.1 ran 52.2 and 52.4 tok/s against 52.6 and 53.0;
/// 0.9/0.07/0.03 a mean 52.8 over five runs against 52.3, inside the runs' spread (51.4-53.8).
const TIERS: [f64; 3] = [0.8, 0.14, 0.06];

/// `(n, t)`: each row of `w` (`k` wide) dotted with the `t` rows of `x`, plus its bias, the
/// weight rows split over the step's team or rayon's pool ([`team::for_each_chunk_mut`]).
fn times_weight_rows<W: Sync>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    k: usize,
    dot: fn(&mut [f32], &[W], &[f32], usize),
) -> Vec<f32> {
    let (t, n) = (x.len() / k, w.len() / k);
    let bounds = task_bounds(n, k, rayon::current_num_threads());
    let mut out_t = vec![0f32; n * t]; // (n, t): each task writes whole rows
    let mut tasks: Vec<(usize, &mut [f32])> = Vec::with_capacity(bounds.len());
    let mut rest = &mut out_t[..];
    for cols in bounds.windows(2) {
        let (dst, after) = rest.split_at_mut((cols[1] - cols[0]) * t);
        tasks.push((cols[0], dst));
        rest = after;
    }
    team::for_each_chunk_mut(&mut tasks, 1, |_, task| {
        let (first, dst) = (task[0].0, &mut *task[0].1);
        let cols = dst.len() / t;
        dot(dst, &w[first * k..(first + cols) * k], x, k);
        if let Some(b) = bias {
            for (col, d) in dst.chunks_mut(t).enumerate() {
                d.iter_mut().for_each(|v| *v += b[first + col]);
            }
        }
    });
    out_t
}

/// The column bounds `[0, .., n]` of the tasks of an (n, k) matrix-vector product on
/// `threads` threads, which claim them in order.
///
/// Few tasks: each is one sequential read, and every switch to a new task restarts the
/// prefetch. Measured on the token engine (2-core Xeon, team of 2, sink:4+1020, 1200 tokens,
/// two runs each): tasks of 16, 32, 64 and 128 Ki weights ran 39.1, 41.9, 44.5 and 46.3 tok/s.
/// But with one or two even tasks a thread, the thread done first waited for the other's last
/// one (the helper spun 8% of a step, half of it during the leader's serial ops; the leader
/// waited 2%). A large matrix is therefore cut into tiers of decreasing size ([`TIERS`], one
/// task a thread each), so that what one thread is left with at the end is a few percent of
/// the matrix. In rounds of 60 steps over the full cache alternating in one process (the
/// bench's paired measurement, a build switching by an environment variable, 8 rounds each)
/// the tiers ran 46.3-48.5 tok/s (mean 47.6) against 45.3-48.0 (mean 46.5) for two even tasks
/// a thread; the commit's own build, 2000 tokens in three alternating pairs, 49.9-50.7 against
/// 48.5-49.6. A matrix of fewer weights than two tasks a thread of [`MIN_WEIGHTS_PER_TASK`],
/// or of fewer rows than 64 a tiered task, is split evenly as before.
fn task_bounds(n: usize, k: usize, threads: usize) -> Vec<usize> {
    let threads = threads.max(1);
    let most = (n * k).div_ceil(MIN_WEIGHTS_PER_TASK);
    if most >= TASKS_PER_THREAD * threads && n >= 64 * TIERS.len() * threads {
        let mut bounds = vec![0];
        let mut done = 0.0;
        for share in TIERS {
            for _ in 0..threads {
                done += share / threads as f64;
                bounds.push(((done * n as f64).round() as usize).min(n));
            }
        }
        *bounds.last_mut().expect("tiers hold tasks") = n;
        return bounds;
    }
    let tasks = most
        .min(TASKS_PER_THREAD * threads)
        .next_multiple_of(threads)
        .clamp(1, n.max(1));
    let cols_per_task = n.div_ceil(tasks).max(1);
    let mut bounds: Vec<usize> = (0..n).step_by(cols_per_task).collect();
    bounds.push(n);
    bounds
}

/// A weight element the matrix-vector kernel reads: f32, or bf16 widened as it is read.
pub trait WeightElement: Copy {
    fn widen(self) -> f32;
}

impl WeightElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElement for half::bf16 {
    /// Exact: a bf16 is the upper half of an f32 (a shift the compiler vectorizes).
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

simd_dispatch!(fn dot_rows(dst: &mut [f32], w: &[f32], x: &[f32], k: usize) = dot_rows_generic);
simd_dispatch!(fn dot_rows_bf16(dst: &mut [f32], w: &[half::bf16], x: &[f32], k: usize) = dot_rows_generic);
simd_dispatch!(fn dot_rows_asking(dst: &mut [f32], w: &[f32], x: &[f32], k: usize) = dot_rows_asking_generic);
simd_dispatch!(fn dot_rows_bf16_asking(dst: &mut [f32], w: &[half::bf16], x: &[f32], k: usize) = dot_rows_asking_generic);

/// `dst[c * t + r] = w row c . x row r` for the weight rows in `w` and the `t` rows of `x`.
#[inline(always)]
fn dot_rows_generic<W: WeightElement>(dst: &mut [f32], w: &[W], x: &[f32], k: usize) {
    dot_rows_with(dst, w, x, k, |_| ())
}

/// [`dot_rows_generic`] asking for the weights [`PREFETCH_AHEAD`] bytes ahead of its reads.
#[inline(always)]
fn dot_rows_asking_generic<W: WeightElement>(dst: &mut [f32], w: &[W], x: &[f32], k: usize) {
    dot_rows_with(dst, w, x, k, prefetch_ahead)
}

#[inline(always)]
fn dot_rows_with<W: WeightElement>(
    dst: &mut [f32],
    w: &[W],
    x: &[f32],
    k: usize,
    ask_ahead: impl Fn(&[W]) + Copy,
) {
    let t = x.len() / k;
    for (w_row, d) in w.chunks_exact(k).zip(dst.chunks_exact_mut(t)) {
        for (x_row, v) in x.chunks_exact(k).zip(d) {
            *v = lane_dot_asking(w_row, x_row, ask_ahead);
        }
    }
}

/// How far ahead of its reads the matrix-vector kernel asks for weights, where it asks
/// ([`asks_for_weights`]). The hardware's stream prefetcher stops at every 4 KiB page; asking
/// 2 KiB ahead keeps lines in flight across the boundaries. On the 2-core Xeon here, one
/// thread's dot products over SmolLM2's weights went from 8.2 to 11.2 GB/s (9.7 to 14.6 on huge
/// pages); 1 and 4 KiB were slower.
pub const PREFETCH_AHEAD: usize = 2048;

/// Whether the matrix-vector kernel asks for its weights ahead: on Intel CPUs yes (see
/// [`PREFETCH_AHEAD`]), on AMD's no. On the 2-core AMD EPYC (Zen 4) here the asks cost speed,
/// the more so the faster the host's memory ran: the bench's paired steps over the full
/// `sink:4+1020` cache, asking and not asking on alternate steps, ran 65.2/67.8/63.1 against
/// 71.9/77.2/67.8 tok/s in rounds where the probe read 51-60 GB/s and 51.5-52.2 against
/// 52.1-53.6 where it read 34-35; asking 6 KiB ahead was slower still (51.1-62.3 against
/// 53.4-72.7).
pub fn asks_for_weights() -> bool {
    static ASKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ASKS.get_or_init(|| !cpu_is_amd())
}

/// Whether the CPU's vendor is AMD (CPUID leaf 0's "AuthenticAMD").
fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks for the cache line `PREFETCH_AHEAD` bytes past `at` (it may point past the slice).
#[inline(always)]
pub fn prefetch_ahead<T>(at: &[T]) {
    prefetch_line(at.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD))
}

/// Asks for the cache line holding `at`: a hint that never faults, whatever the address.
#[inline(always)]
fn prefetch_line<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not fault, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Dot product with sixteen independent lanes (vectorizes like [`lane_sum`]).
#[inline(always)]
fn lane_dot<W: WeightElement>(a: &[W], b: &[f32]) -> f32 {
    lane_dot_asking(a, b, |_| ())
}

/// [`lane_dot`], calling `ask_ahead` with every 16 values of `a` before reading them: the
/// matrix-vector kernel asks for the weights it streams; attention's short rows in cache do not.
#[inline(always)]
fn lane_dot_asking<W: WeightElement>(a: &[W], b: &[f32], ask_ahead: impl Fn(&[W])) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x.widen() * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        ask_ahead(xa);
        for ((s, x), y) in acc.iter_mut().zip(xa).zip(xb) {
            *s += x.widen() * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One layer's attention for a few queries, as [`few_query_attention`] takes it.
pub struct FewQueries<'a> {
    /// (nh, T, hd): the queries, placed and pre-scaled.
    pub q: &'a Tensor,
    /// The first `n` keys are scored by these queries (nh, T, hd) instead: the sinks, seen
    /// from the queries' sink positions.
    pub q_sink: Option<(usize, &'a Tensor)>,
    /// (nkv, n_keys, hd), before positions.
    pub k: &'a Tensor,
    /// The (n_keys, rotary_dim / 2) cos and sin tables that place the keys, if the model
    /// rotates them.
    pub k_rope: Option<(&'a Tensor, &'a Tensor, PairLayout)>,
    /// (nkv, n_keys, hd)
    pub v: &'a Tensor,
    /// (T, n_keys), additive: -inf where a query does not see a key. Every query must see one.
    pub mask: Option<&'a Tensor>,
}

/// Keys per rayon task of [`few_query_attention`].
const KEYS_PER_TASK: usize = 256;

/// Attention of a few queries (the token engine's one) in one pass over the cache, split
/// over (KV head, block of keys) and combined by their softmax maxima (flash-decoding): the
/// keys are rotated as they are read, and neither rotated keys nor scores are stored. With
/// candle's ops a one-token step rotated the whole cache into a new tensor, then ran two
/// small matmuls and a softmax: 9 ms of a 33 ms step at 1024 keys (SmolLM2, 2 threads).
/// Returns (T, nh * hd).
pub fn few_query_attention(a: &FewQueries<'_>) -> Result<Tensor> {
    let (nkv, n_keys, hd) = a.k.dims3()?;
    // The keys and values read (not the RoPE tables, shared by every head and layer).
    let cache_bytes = 2 * nkv * n_keys * hd * std::mem::size_of::<f32>();
    step_tally::timed(Work::Attention, cache_bytes, || attend_few_queries(a))
}

fn attend_few_queries(a: &FewQueries<'_>) -> Result<Tensor> {
    let (nh, t, hd) = a.q.dims3()?;
    let (nkv, n_keys, _) = a.k.dims3()?;
    let n_sink = a.q_sink.map_or(0, |(n, _)| n);
    let mut inputs = vec![a.q, a.q_sink.map_or(a.q, |(_, q)| q)];
    if let Some((cos, sin, _)) = a.k_rope {
        inputs.extend([cos, sin]);
    }
    inputs.extend(a.mask);
    let blocks = n_keys.div_ceil(KEYS_PER_TASK);
    let partials: Vec<Partial> = with_head_rows(a.k, |k, k_stride| {
        with_head_rows(a.v, |v, v_stride| {
            with_slices(&inputs, |s| {
                let rope = a.k_rope.map(|(cos, _, layout)| {
                    let half = cos.dims2().map_or(0, |(_, h)| h);
                    (s[2], s[3], half, layout)
                });
                let mask = a.mask.map(|_| s[s.len() - 1]);
                let group_len = nh / nkv * t * hd; // the query rows of one KV head
                team::map(nkv * blocks, |task| {
                    let (g, first) = (task / blocks, task % blocks * KEYS_PER_TASK);
                    let keys = first..(first + KEYS_PER_TASK).min(n_keys);
                    let queries = g * group_len..(g + 1) * group_len;
                    attend_block(&KeyBlock {
                        q: &s[0][queries.clone()],
                        q_sink: &s[1][queries],
                        n_sink,
                        k: &k[g * k_stride..][..n_keys * hd],
                        v: &v[g * v_stride..][..n_keys * hd],
                        rope,
                        mask,
                        n_keys,
                        t,
                        hd,
                        keys,
                    })
                })
            })
        })
    })???;
    let mut out = vec![0f32; t * nh * hd];
    for (g, blocks) in partials.chunks(blocks).enumerate() {
        for (r, row) in blocks[0].acc.chunks(hd).enumerate() {
            // Row r of KV head g is query r % t of head g * group + r / t.
            let (head, query) = (g * (nh / nkv) + r / t, r % t);
            let dst = &mut out[(query * nh + head) * hd..][..hd];
            combine_row(dst, blocks, r, row.len());
        }
    }
    Tensor::from_vec(out, (t, nh * hd), &Device::Cpu)
}

/// One block of keys of one KV head, and the queries of its heads.
struct KeyBlock<'a> {
    /// (group heads x T, hd), row r: query r % t of the group's head r / t
    q: &'a [f32],
    q_sink: &'a [f32],
    n_sink: usize,
    /// (n_keys, hd) each
    k: &'a [f32],
    v: &'a [f32],
    /// cos, sin (n_keys, half), half, layout
    rope: Option<(&'a [f32], &'a [f32], usize, PairLayout)>,
    mask: Option<&'a [f32]>,
    n_keys: usize,
    t: usize,
    hd: usize,
    keys: std::ops::Range<usize>,
}

/// Softmax statistics of a block's scores per query row, and its rows' unnormalized
/// outputs: max (rows), sum of exp(score - max) (rows), sum of exp(score - max) v (rows x hd).
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// One block's partial attention: [`avx2::attend_block`] where the CPU has AVX2 and FMA and
/// the head dimension is a multiple of 8, else the portable loop.
fn attend_block(b: &KeyBlock<'_>) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if b.hd.is_multiple_of(8)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has the features `avx2::attend_block` is compiled for.
        return unsafe { avx2::attend_block(b) };
    }
    attend_block_portable(b)
}

simd_dispatch!(fn attend_block_portable(b: &KeyBlock<'_>) -> Partial = attend_block_generic);

#[inline(always)]
fn attend_block_generic(b: &KeyBlock<'_>) -> Partial {
    let (hd, len) = (b.hd, b.keys.len());
    let rows = b.q.len() / hd;
    let mut scores = vec![0f32; rows * len];
    let mut placed = vec![0f32; hd];
    for i in 0..len {
        b.score_key(i, &mut placed, &mut scores);
    }
    let mut part = b.softmax(&mut scores);
    for (i, j) in b.keys.clone().enumerate() {
        let value = &b.v[j * hd..(j + 1) * hd];
        for (r, acc) in part.acc.chunks_exact_mut(hd).enumerate() {
            let p = scores[r * len + i];
            acc.iter_mut().zip(value).for_each(|(a, v)| *a += p * v);
        }
    }
    part
}

impl KeyBlock<'_> {
    /// Key `j` at its position: rotated into `placed` if the model rotates keys, else as cached.
    #[inline(always)]
    fn key<'k>(&'k self, j: usize, placed: &'k mut [f32]) -> &'k [f32] {
        let key = &self.k[j * self.hd..(j + 1) * self.hd];
        let Some((cos, sin, half, layout)) = self.rope else {
            return key;
        };
        let (cos, sin) = (
            &cos[j * half..(j + 1) * half],
            &sin[j * half..(j + 1) * half],
        );
        match layout {
            PairLayout::Interleaved => rope_interleaved_row_generic(placed, key, cos, sin),
            PairLayout::HalfSplit => rope_half_split_row_generic(placed, key, cos, sin),
        }
        placed
    }

    /// Scores the block's key `i` (rotated in `placed`, hd long) against every query row:
    /// `scores[r * len + i]`, rows of the block's length.
    #[inline(always)]
    fn score_key(&self, i: usize, placed: &mut [f32], scores: &mut [f32]) {
        let (j, len) = (self.keys.start + i, self.keys.len());
        let key = self.key(j, placed);
        for (r, q_row) in self.queries_of(j).chunks_exact(self.hd).enumerate() {
            scores[r * len + i] = lane_dot(q_row, key) + self.bias(r, j);
        }
    }

    /// The query rows that score key `j`: the sink queries for a sink.
    #[inline(always)]
    fn queries_of(&self, j: usize) -> &[f32] {
        if j < self.n_sink { self.q_sink } else { self.q }
    }

    /// The mask's additive bias of key `j` for query row `r`.
    #[inline(always)]
    fn bias(&self, r: usize, j: usize) -> f32 {
        self.mask.map_or(0.0, |m| m[(r % self.t) * self.n_keys + j])
    }

    /// Turns each row of `scores` (rows x keys) into exp(score - row max) and returns the
    /// rows' statistics, with their output accumulators zeroed.
    #[inline(always)]
    fn softmax(&self, scores: &mut [f32]) -> Partial {
        let rows = self.q.len() / self.hd;
        let mut part = Partial {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            acc: vec![0.0; rows * self.hd],
        };
        for (r, row) in scores.chunks_exact_mut(self.keys.len()).enumerate() {
            let max = lane_max(row);
            if max == f32::NEG_INFINITY {
                continue; // every key of the block hidden from this query: it adds nothing
            }
            row.iter_mut().for_each(|s| {
                *s = if *s == f32::NEG_INFINITY {
                    0.0
                } else {
                    fast_exp(*s - max)
                }
            });
            part.max[r] = max;
            part.sum[r] = lane_sum(row);
        }
        part
    }
}

/// The attention block with AVX2 intrinsics: keys scored eight at a time (one register of
/// scores per query, no reduction per key) and each output row summed in registers. The
/// portable loop reduced 16 lanes to one score for every (query, key) pair and loaded and
/// stored the output row for every key: one SmolLM2 layer at 1024 keys (2 threads, rotated
/// keys) took 128 us with its keys and values in cache and 164 us from memory, 17% of a
/// one-token step; this takes 53 and 94 us.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{KeyBlock, Partial};

    /// Keys scored together: one register of eight scores per query row.
    const GROUP: usize = 8;
    /// Output channels summed together: eight registers of eight.
    const CHANNELS: usize = 64;

    /// [`super::attend_block_generic`]'s result, to float rounding. `b.hd` must be a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_block(b: &KeyBlock<'_>) -> Partial {
        let (hd, len) = (b.hd, b.keys.len());
        let rows = b.q.len() / hd;
        let mut scores = vec![0f32; rows * len];
        let mut placed = vec![0f32; GROUP * hd];
        for i in (0..len).step_by(GROUP) {
            let first = b.keys.start + i;
            let n = GROUP.min(len - i);
            // Each key asks for the row of the key two groups on and for its own value row
            // (read by the weighted sums after the softmax): the first reads of both came
            // straight from memory (see `ask_for`). sink:4+1020 over 2500 tokens, two runs
            // each: 44.0, 44.3 tok/s without, 45.3, 46.0 asking one group ahead, 45.9, 46.3
            // two. Asking key by key, between the keys' rotations, rather than for the whole
            // group at once: the asks of a group all at once filled the core's line-fill
            // buffers and stalled it (in a C model of this loop, 24 against 35 GB/s on two
            // threads); in the kernel, 31,000 against 27,500 cycles a block of 256 keys, 67
            // against 62 us a layer (2000 tokens, average over the cache's growth). (On the AMD
            // EPYC of an earlier session, keys and values two groups ahead had been slower:
            // re-measure there.)
            let ahead = b.k.as_ptr().wrapping_add((first + 2 * GROUP) * hd);
            let values = b.v.as_ptr().wrapping_add(first * hd);
            let ask_row = |g: usize| {
                ask_for(ahead.wrapping_add(g * hd), hd);
                ask_for(values.wrapping_add(g * hd), hd);
            };
            // Eight keys scored at once share their queries: the last, partial group and a
            // group across the end of the sinks go key by key.
            if n < GROUP || (first < b.n_sink && first + GROUP > b.n_sink) {
                for g in 0..n {
                    ask_row(g);
                    b.score_key(i + g, &mut placed[..hd], &mut scores);
                }
                continue;
            }
            let keys = match b.rope {
                Some(_) => {
                    for (g, row) in placed.chunks_exact_mut(hd).enumerate() {
                        ask_row(g);
                        b.key(first + g, row);
                    }
                    &placed[..]
                }
                None => {
                    (0..GROUP).for_each(ask_row);
                    &b.k[first * hd..(first + GROUP) * hd]
                }
            };
            for (r, q_row) in b.queries_of(first).chunks_exact(hd).enumerate() {
                let dst = &mut scores[r * len + i..][..GROUP];
                // SAFETY: q_row holds hd floats, keys GROUP rows of hd, dst GROUP.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), dots8(q_row, keys)) };
                if b.mask.is_some() {
                    for (g, s) in dst.iter_mut().enumerate() {
                        *s += b.bias(r, first + g);
                    }
                }
            }
        }
        let mut part = b.softmax(&mut scores);
        let values = &b.v[b.keys.start * hd..b.keys.end * hd];
        for (p, acc) in scores.chunks_exact(len).zip(part.acc.chunks_exact_mut(hd)) {
            // Whole groups of CHANNELS, then what is left eight at a time: a register count
            // known when compiled keeps the sums in registers.
            let whole = hd / CHANNELS * CHANNELS;
            for c in (0..whole).step_by(CHANNELS) {
                // SAFETY: values holds len rows of hd, acc hd floats, c + CHANNELS <= hd.
                unsafe { weighted_sum::<{ CHANNELS / 8 }>(&mut acc[c..], p, &values[c..], hd) };
            }
            for c in (whole..hd).step_by(8) {
                // SAFETY: as above, c + 8 <= hd.
                unsafe { weighted_sum::<1>(&mut acc[c..], p, &values[c..], hd) };
            }
        }
        part
    }

    /// Asks for the cache lines of `len` floats from `at` (a hint: any address is safe). In
    /// the kernel's profile on the 2-core Xeon, the first load of each key and value row took
    /// most of the samples: the hardware prefetcher does not run ahead of eight 256-byte rows.
    #[inline(always)]
    fn ask_for(at: *const f32, len: usize) {
        for line in (0..len).step_by(16) {
            super::prefetch_line(at.wrapping_add(line));
        }
    }

    /// The dot products of `q` (hd) with each of the GROUP rows of `keys` (GROUP x hd):
    /// vertical sums, then one transposing reduction for all eight.
    ///
    /// Safety: only inlined into code compiled for AVX2 and FMA; `hd` a multiple of 8.
    #[inline(always)]
    unsafe fn dots8(q: &[f32], keys: &[f32]) -> __m256 {
        let hd = q.len();
        debug_assert!(hd.is_multiple_of(8) && keys.len() == GROUP * hd);
        let (q, keys) = (q.as_ptr(), keys.as_ptr());
        unsafe {
            let mut acc = [_mm256_setzero_ps(); GROUP];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.add(c));
                for (g, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys.add(g * hd + c)), *a);
                }
            }
            // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: two rounds
            // leave key g's sums of lanes 0-3 in lane g of the low halves (g < 4), of lanes
            // 4-7 in the high halves.
            let s01 = _mm256_hadd_ps(acc[0], acc[1]);
            let s23 = _mm256_hadd_ps(acc[2], acc[3]);
            let s45 = _mm256_hadd_ps(acc[4], acc[5]);
            let s67 = _mm256_hadd_ps(acc[6], acc[7]);
            let s0123 = _mm256_hadd_ps(s01, s23);
            let s4567 = _mm256_hadd_ps(s45, s67);
            let low = _mm256_permute2f128_ps(s0123, s4567, 0x20);
            let high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
            _mm256_add_ps(low, high)
        }
    }

    /// `acc[..8 LANES] += sum over keys i of p[i] * values[i * stride..][..8 LANES]`, summed
    /// in LANES registers.
    ///
    /// Safety: only inlined into code compiled for AVX2 and FMA; `values` holds every row read.
    #[inline(always)]
    unsafe fn weighted_sum<const LANES: usize>(
        acc: &mut [f32],
        p: &[f32],
        values: &[f32],
        stride: usize,
    ) {
        debug_assert!(acc.len() >= 8 * LANES);
        debug_assert!(p.is_empty() || values.len() >= (p.len() - 1) * stride + 8 * LANES);
        unsafe {
            let mut sum = [_mm256_setzero_ps(); LANES];
            for (i, &w) in p.iter().enumerate() {
                let (w, v) = (_mm256_set1_ps(w), values.as_ptr().add(i * stride));
                for (u, s) in sum.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(u * 8)), *s);
                }
            }
            for (u, s) in sum.iter().enumerate() {
                let dst = acc.as_mut_ptr().add(u * 8);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *s));
            }
        }
    }
}

/// `dst` = row `r` of the attention output from its blocks' partial softmaxes.
fn combine_row(dst: &mut [f32], blocks: &[Partial], r: usize, hd: usize) {
    let max = blocks
        .iter()
        .map(|b| b.max[r])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for b in blocks.iter().filter(|b| b.max[r] > f32::NEG_INFINITY) {
        let scale = (b.max[r] - max).exp();
        sum += scale * b.sum[r];
        let acc = &b.acc[r * hd..(r + 1) * hd];
        dst.iter_mut().zip(acc).for_each(|(d, a)| *d += scale * a);
    }
    let inv = 1.0 / sum;
    dst.iter_mut().for_each(|d| *d *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_exp() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (fast_exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}): {got} vs {want}"
            );
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), fast_exp(-87.3));
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn masked_softmax_matches_candle() {
        let dev = Device::Cpu;
        let (heads, rows) = (3, 5);
        let a = Tensor::randn(0f32, 3.0, (heads, rows, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 3.0, (heads, rows, 37), &dev).unwrap();
        // Row i sees keys 0..=i+3 and the sinks: a causal band like the engines build.
        let mask: Vec<f32> = (0..rows)
            .flat_map(|i| {
                (0..41).map(move |j| {
                    if j < 2 || j <= i + 3 {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rows, 41), &dev).unwrap();
        let got = masked_softmax(&[a.clone(), b.clone()], Some(&mask)).unwrap();
        let scores = Tensor::cat(&[a, b], 2)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
        // Masked keys get exactly zero weight.
        let got = got.to_vec3::<f32>().unwrap();
        assert!(
            got.iter()
                .flatten()
                .all(|row| row[rows + 4..].iter().all(|&p| p == 0.0))
        );
        let unmasked = Tensor::randn(0f32, 3.0, (2, 3, 70), &dev).unwrap();
        let got = masked_softmax(std::slice::from_ref(&unmasked), None).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&unmasked).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn silu_mul_matches_candle() {
        let dev = Device::Cpu;
        let gate_up = Tensor::randn(0f32, 4.0, (7, 2 * 45), &dev).unwrap();
        let got = silu_mul(&gate_up).unwrap();
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, 45).unwrap()).unwrap();
        let want = (gate * gate_up.narrow(1, 45, 45).unwrap()).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn rms_norm_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (6, 43), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, 43, &dev).unwrap();
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(max_abs_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn rope_matches_candle_in_both_layouts_and_partially() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
        let angles = Tensor::randn(0f32, 3.0, (5, 4), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let x4 = x.unsqueeze(0).unwrap();
        for (layout, want) in [
            (
                PairLayout::Interleaved,
                candle_nn::rotary_emb::rope_i(&x4, &cos, &sin),
            ),
            (
                PairLayout::HalfSplit,
                candle_nn::rotary_emb::rope(&x4, &cos, &sin),
            ),
        ] {
            let got = rope(&x, &cos, &sin, layout).unwrap();
            assert!(max_abs_diff(&got, &want.unwrap().squeeze(0).unwrap()) < 1e-6);
        }
        // Partial: the first 4 channels rotate (half-split within them), the last 4 are copied.
        let (cos2, sin2) = (cos.narrow(1, 0, 2).unwrap(), sin.narrow(1, 0, 2).unwrap());
        let got = rope(&x, &cos2, &sin2, PairLayout::HalfSplit).unwrap();
        let rotated = candle_nn::rotary_emb::rope(
            &x4.narrow(3, 0, 4).unwrap().contiguous().unwrap(),
            &cos2.contiguous().unwrap(),
            &sin2.contiguous().unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
        let want = Tensor::cat(&[rotated, x.narrow(2, 4, 4).unwrap()], 2).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn layer_norm_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f32, 2.0, (6, 43), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, 43, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 43, &dev).unwrap();
        let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert!(max_abs_diff(&layer_norm(&x, &w, &b, 1e-5).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn nll_matches_log_softmax() {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 5.0, (9, 1000), &dev).unwrap();
        let targets: Vec<u32> = (0..9).map(|i| i * 97).collect();
        let got = nll_from_logits(&logits, &targets).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, &t) in targets.iter().enumerate() {
            assert!(
                (got[i] + logp[i][t as usize]).abs() < 2e-5,
                "{} vs {}",
                got[i],
                -logp[i][t as usize]
            );
        }
    }

    #[test]
    fn few_rows_times_transposed_matches_matmul() {
        let dev = Device::Cpu;
        for (t, n, k) in [
            (1, 5, 7),
            (1, 300, 576),
            (3, 1000, 40),
            (2, 77, 64),
            (FEW_ROWS, 33, 129),
        ] {
            let x = Tensor::randn(0f32, 1.0, (t, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = few_rows_times_transposed(&x, &w, None).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-4, "({t}, {n}, {k})");
            let want = want.broadcast_add(&b).unwrap();
            let got = few_rows_times_transposed(&x, &w, Some(&b)).unwrap();
            assert!(
                max_abs_diff(&got, &want) < 1e-4,
                "({t}, {n}, {k}) with bias"
            );
            // bf16 weights, widened as read: the product of the rounded weights in f32.
            let w16 = w.to_dtype(DType::BF16).unwrap();
            let widened = w16.to_dtype(DType::F32).unwrap();
            let want = x.matmul(&widened.t().unwrap()).unwrap();
            let got = few_rows_times_transposed(&x, &w16, None).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-4, "({t}, {n}, {k}) bf16");
        }
    }

    /// The attention `few_query_attention` computes, from candle's ops: keys rotated, scores
    /// of the sink keys from `q_sink`, one softmax, times the values.
    fn attention_by_candle(a: &FewQueries<'_>) -> Tensor {
        let (nh, t, hd) = a.q.dims3().unwrap();
        let (nkv, n, _) = a.k.dims3().unwrap();
        let k = match a.k_rope {
            Some((cos, sin, layout)) => rope(a.k, cos, sin, layout).unwrap(),
            None => a.k.clone(),
        };
        let heads_of = |x: &Tensor| repeat_heads(x, nh / nkv);
        let (k, v) = (heads_of(&k), heads_of(a.v));
        let mut scores = a.q.matmul(&k.t().unwrap()).unwrap();
        if let Some((n_sink, q_sink)) = a.q_sink {
            let sink = q_sink
                .matmul(&k.narrow(1, 0, n_sink).unwrap().t().unwrap())
                .unwrap();
            let rest = scores.narrow(2, n_sink, n - n_sink).unwrap();
            scores = Tensor::cat(&[&sink, &rest], 2).unwrap();
        }
        if let Some(m) = a.mask {
            scores = scores.broadcast_add(m).unwrap();
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&v.contiguous().unwrap()).unwrap(); // (nh, t, hd)
        out.transpose(0, 1).unwrap().reshape((t, nh * hd)).unwrap()
    }

    /// `x` (nkv, n, hd) with each KV head repeated `times` times in a row.
    fn repeat_heads(x: &Tensor, times: usize) -> Tensor {
        let copies: Vec<Tensor> = (0..x.dim(0).unwrap())
            .flat_map(|i| std::iter::repeat_n(x.narrow(0, i, 1).unwrap(), times))
            .collect();
        Tensor::cat(&copies, 0).unwrap()
    }

    /// Head dims 16 and 80 take the AVX2 kernel where the CPU has it (80: one group of 64
    /// output channels and one of 16), 12 the portable loop; 600 keys make three blocks, the
    /// last partial, and sinks 2 and 4 split a group of eight keys or fill half of one.
    #[test]
    fn few_query_attention_matches_candle_with_sinks_masks_and_both_layouts() {
        let dev = Device::Cpu;
        let (nh, nkv, n) = (6, 2, 600);
        for (t, hd, layout, half, sinks, masked) in [
            (1, 16, PairLayout::Interleaved, 8, None, false),
            (1, 16, PairLayout::HalfSplit, 4, Some(4), false),
            (3, 16, PairLayout::HalfSplit, 8, Some(2), true),
            (1, 80, PairLayout::HalfSplit, 40, Some(4), false),
            (2, 80, PairLayout::Interleaved, 16, Some(3), true),
            (1, 12, PairLayout::Interleaved, 6, Some(4), false),
            (3, 12, PairLayout::HalfSplit, 4, None, true),
        ] {
            let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let (q, q_sink, k, v) = (
                rand(&[nh, t, hd]),
                rand(&[nh, t, hd]),
                rand(&[nkv, n, hd]),
                rand(&[nkv, n, hd]),
            );
            let angles = rand(&[n, half]);
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            // Query r sees every key but the r + 1 before the last (a block fully hidden
            // from none, keys hidden in the last block).
            let mask: Vec<f32> = (0..t)
                .flat_map(|r| {
                    (0..n).map(move |j| {
                        if j + r + 2 > n && j + 1 < n {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, n), &dev).unwrap();
            let a = FewQueries {
                q: &q,
                q_sink: sinks.map(|s| (s, &q_sink)),
                k: &k,
                k_rope: Some((&cos, &sin, layout)),
                v: &v,
                mask: masked.then_some(&mask),
            };
            let got = few_query_attention(&a).unwrap();
            let diff = max_abs_diff(&got, &attention_by_candle(&a));
            assert!(
                diff < 1e-5,
                "t={t} hd={hd} {layout:?} sinks {sinks:?} masked {masked}: {diff}"
            );
        }
    }

    /// A cache's first rows, read in place (a view with free slots after them, heads apart by
    /// the whole capacity), give exactly the result of the same keys copied out.
    #[test]
    fn few_query_attention_reads_a_cache_view_in_place() {
        let dev = Device::Cpu;
        let (nh, nkv, hd, n, cap) = (6, 3, 16, 300, 512);
        let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (q, k_cache, v_cache) = (
            rand(&[nh, 1, hd]),
            rand(&[nkv, cap, hd]),
            rand(&[nkv, cap, hd]),
        );
        let (k, v) = (
            k_cache.narrow(1, 0, n).unwrap(),
            v_cache.narrow(1, 0, n).unwrap(),
        );
        assert!(!k.is_contiguous());
        let angles = rand(&[n, hd / 2]);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let attend = |k: &Tensor, v: &Tensor| {
            few_query_attention(&FewQueries {
                q: &q,
                q_sink: None,
                k,
                k_rope: Some((&cos, &sin, PairLayout::HalfSplit)),
                v,
                mask: None,
            })
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
        };
        let copied = (k.contiguous().unwrap(), v.contiguous().unwrap());
        assert_eq!(attend(&k, &v), attend(&copied.0, &copied.1));
    }

    #[test]
    fn task_bounds_cover_every_row_once_and_tier_large_matrices() {
        for threads in [1, 2, 3, 16] {
            for (n, k) in [
                (0, 64),
                (1, 64),
                (7, 8),
                (960, 576),
                (1536, 576),
                (49_152, 576),
            ] {
                let bounds = task_bounds(n, k, threads);
                assert_eq!(
                    (bounds[0], *bounds.last().unwrap()),
                    (0, n),
                    "{n}x{k}, {threads}"
                );
                assert!(bounds.windows(2).all(|b| b[0] < b[1]), "{bounds:?}");
            }
            // A large matrix: one task a thread in each tier, shrinking tier by tier.
            let bounds = task_bounds(49_152, 576, threads);
            let sizes: Vec<usize> = bounds.windows(2).map(|b| b[1] - b[0]).collect();
            assert_eq!(sizes.len(), TIERS.len() * threads);
            assert!(sizes[0] > sizes[threads] && sizes[threads] > sizes[2 * threads]);
        }
        // A small one is split evenly, in a multiple of the threads.
        assert_eq!(task_bounds(16, 4096, 2), vec![0, 8, 16]);
        assert_eq!(task_bounds(64, 4096, 2), vec![0, 16, 32, 48, 64]);
        assert_eq!(task_bounds(64, 64, 2), vec![0, 32, 64]);
    }
}
