//! The element-wise operations of every family, one code path for every device: the CPU runs
//! the kernels of [`super::kernels`] (one vectorized pass each), a GPU candle's ops and, where
//! candle's would take several passes, our fused kernels ([`super::cuda`]).

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use super::attention::{KeyMask, Visibility};
use super::kernels;
use super::rope::PairLayout;

/// RMS norm of the rows of `x` (T, d), times `weight` (d).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() {
        return kernels::rms_norm(x, weight, eps);
    }
    candle_nn::ops::rms_norm(x, weight, eps)
}

/// LayerNorm of the rows of `x` (T, d), times `weight` plus `bias` (d).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() {
        return kernels::layer_norm(x, weight, bias, eps);
    }
    candle_nn::ops::layer_norm(x, weight, bias, eps)
}

/// `silu(gate) * up` for `gate_up` (T, 2f) holding gate then up on each row; returns (T, f).
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    if gate_up.device().is_cpu() {
        return kernels::silu_mul(gate_up);
    }
    #[cfg(feature = "cuda")]
    {
        gate_up
            .contiguous()?
            .apply_op1_no_bwd(&super::cuda::SiluMul)
    }
    #[cfg(not(feature = "cuda"))]
    {
        no_gpu_kernel("silu_mul")
    }
}

/// The error of a GPU-only kernel in a build without the cuda feature (unreachable: such a
/// build has no GPU device).
#[cfg(not(feature = "cuda"))]
fn no_gpu_kernel<T>(name: &str) -> Result<T> {
    candle_core::bail!("{name} on a GPU needs a build with the cuda feature")
}

/// `x` (heads, rows, hd) with its first `2 * cos.dim(1)` channels rotated by the tables
/// (rows, rotary_dim / 2) in `layout`; the other channels unchanged.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: PairLayout) -> Result<Tensor> {
    if x.device().is_cpu() {
        return kernels::rope(x, cos, sin, layout);
    }
    let (hd, rotary) = (x.dim(2)?, 2 * cos.dim(1)?);
    let x4 = x.unsqueeze(0)?;
    let head = x4.narrow(3, 0, rotary)?.contiguous()?;
    let rotated = match layout {
        PairLayout::Interleaved => candle_nn::rotary_emb::rope_i(&head, cos, sin)?,
        PairLayout::HalfSplit => candle_nn::rotary_emb::rope(&head, cos, sin)?,
    };
    let rotated = match rotary < hd {
        // candle concatenates on a last axis through transposes: make the result contiguous
        // for the matmuls after it.
        true => Tensor::cat(&[rotated, x4.narrow(3, rotary, hd - rotary)?], 3)?.contiguous()?,
        false => rotated,
    };
    rotated.squeeze(0)
}

/// Floats of attention scores one query tile may hold: small on the CPU (the tile stays in
/// cache), large on a GPU (few, large launches).
pub fn score_budget(device: &Device) -> usize {
    match device.is_cpu() {
        true => 4 << 20,
        false => 512 << 20,
    }
}

/// Softmax over the last axis of `parts` (each (heads, rows, n_p)) side by side, for the
/// queries `rows` of the forward pass, with the keys `mask` hides at exactly 0.
pub(crate) fn masked_softmax(
    parts: &[Tensor],
    mask: &KeyMask,
    rows: Range<usize>,
) -> Result<Tensor> {
    match mask {
        // (Only the CPU gets these two: a GPU always applies the rule in its kernel.)
        KeyMask::All => kernels::masked_softmax(parts, None),
        KeyMask::Dense(mask) => {
            kernels::masked_softmax(parts, Some(&mask.narrow(0, rows.start, rows.len())?))
        }
        KeyMask::Rule {
            fed,
            n_query,
            visibility,
            window,
        } => fused_masked_softmax(parts, fed, (*n_query, rows.start), *visibility, *window),
    }
}

#[cfg(feature = "cuda")]
fn fused_masked_softmax(
    parts: &[Tensor],
    fed: &Tensor,
    (n_query, first_row): (usize, usize),
    visibility: Visibility,
    window: Option<u64>,
) -> Result<Tensor> {
    let op = super::cuda::MaskedSoftmax {
        n_query,
        first_row,
        visibility,
        window,
    };
    match parts {
        [a] => a.contiguous()?.apply_op2_no_bwd(fed, &op),
        [a, b] => a.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, fed, &op),
        _ => candle_core::bail!("masked_softmax takes one or two parts, not {}", parts.len()),
    }
}

#[cfg(not(feature = "cuda"))]
fn fused_masked_softmax(
    _: &[Tensor],
    _: &Tensor,
    _: (usize, usize),
    _: Visibility,
    _: Option<u64>,
) -> Result<Tensor> {
    no_gpu_kernel("masked_softmax")
}

/// Rows of logits per tile of the NLL on `device` for a `vocab`-entry vocabulary. On the CPU,
/// 128 rows (25 MB for a 49152-token vocabulary) keep the LM-head matmul efficient (64-row
/// tiles took 20% longer on a 2-core AMD EPYC); a GPU takes up to 2^28 f32 logits (1 GiB) per
/// tile, so that a block's NLLs come back in one transfer.
pub fn logit_rows(device: &Device, vocab: usize) -> usize {
    match device.is_cpu() {
        true => 128,
        false => ((1 << 28) / vocab.max(1)).max(1),
    }
}

/// NLL of `targets[i]` under row i of `logits` (rows, vocab), from the log-softmax in f32.
pub fn nll_from_logits(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    if logits.device().is_cpu() {
        return kernels::nll_from_logits(logits, targets);
    }
    #[cfg(feature = "cuda")]
    {
        (logits.contiguous()?)
            .apply_op2_no_bwd(&Tensor::new(targets, logits.device())?, &super::cuda::Nll)?
            .to_vec1::<f32>()
    }
    #[cfg(not(feature = "cuda"))]
    {
        no_gpu_kernel("nll")
    }
}
