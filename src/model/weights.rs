//! Reading a family's tensors by name, with the shapes its config sets: what every family file
//! shares when it builds the [`super::decoder`] parts.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::decoder::Norm;
use super::linear::Linear;

/// `{name}.weight` (out_dim, in_dim), and `{name}.bias` (out_dim) when `bias`.
pub fn linear(
    vb: &VarBuilder,
    name: &str,
    out_dim: usize,
    in_dim: usize,
    bias: bool,
) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), &format!("{name}.weight"))?;
    let b = bias
        .then(|| vb.get(out_dim, &format!("{name}.bias")))
        .transpose()?;
    Ok(Linear::new(w, b))
}

/// The untied LM head `name` (vocab, d), or `None` when the head is the token embedding.
pub fn untied_head(
    vb: &VarBuilder,
    tied: bool,
    name: &str,
    vocab: usize,
    d: usize,
) -> Result<Option<Tensor>> {
    (!tied).then(|| vb.get((vocab, d), name)).transpose()
}

/// RMS norm `{name}.weight` (d).
pub fn rms_norm(vb: &VarBuilder, name: &str, d: usize, eps: f64) -> Result<Norm> {
    Ok(Norm::Rms {
        weight: vb.get(d, &format!("{name}.weight"))?,
        eps: eps as f32,
    })
}

/// LayerNorm `{name}.weight` (d) and, when `bias`, `{name}.bias` (else zeros).
pub fn layer_norm(vb: &VarBuilder, name: &str, d: usize, eps: f64, bias: bool) -> Result<Norm> {
    let weight = vb.get(d, &format!("{name}.weight"))?;
    let bias = match bias {
        true => vb.get(d, &format!("{name}.bias"))?,
        false => Tensor::zeros(d, weight.dtype(), weight.device())?,
    };
    Ok(Norm::Layer {
        weight,
        bias,
        eps: eps as f32,
    })
}

/// Splits a fused projection whose rows are laid out as `groups` x (`per_group` row blocks of
/// `block` rows) — e.g. GPT-NeoX's (heads, [q k v], head_dim) — into its Q, K, V row sets,
/// each a linear with its heads contiguous. `roles[i]` says which of Q (0), K (1), V (2) row
/// block `i` of a group belongs to.
pub fn unfuse(fused: &Linear, groups: usize, block: usize, roles: &[usize]) -> Result<[Linear; 3]> {
    let per_group = roles.len();
    let pick = |t: &Tensor, role: usize| -> Result<Tensor> {
        let rows: Vec<Tensor> = (0..groups)
            .flat_map(|g| {
                roles
                    .iter()
                    .enumerate()
                    .filter(move |(_, r)| **r == role)
                    .map(move |(i, _)| (g * per_group + i) * block)
            })
            .map(|start| t.narrow(0, start, block))
            .collect::<Result<_>>()?;
        Tensor::cat(&rows, 0)
    };
    let part = |role| -> Result<Linear> {
        Ok(Linear::new(
            pick(fused.weight(), role)?,
            fused.bias().map(|b| pick(b, role)).transpose()?,
        ))
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// The rows of a RoPE projection of `heads` heads, `head_dim` rows each, in half-split pairs
/// (row i with row i + head_dim/2), reordered so pairs are adjacent (rows 2i, 2i+1): the order
/// of GGUF and the interleaved kernel. A weight (rows, cols) or a bias (rows) keeps its shape.
pub fn interleave_pairs(rows: &Linear, heads: usize, head_dim: usize) -> Result<Linear> {
    let reorder = |t: &Tensor| -> Result<Tensor> {
        let shape = t.dims().to_vec();
        let cols = t.elem_count() / (heads * head_dim);
        t.reshape((heads, 2, head_dim / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(shape)
    };
    Ok(Linear::new(
        reorder(rows.weight())?,
        rows.bias().map(reorder).transpose()?,
    ))
}
