//! Falcon: attention and MLP in parallel, half-split RoPE over the whole head, a fused QKV in
//! one of three layouts, LayerNorms with biases, tied head by default.
//! - 7B (`multi_query`): one LayerNorm feeds both branches; one KV head; rows [q heads, k, v].
//! - 40B (`new_decoder_architecture`): `ln_attn` and `ln_mlp`; KV groups, rows per group
//!   [its q heads, k, v].
//! - otherwise (multi-head): rows per head [q, k, v].
//!
//! ```text
//! x += dense(attn(qkv(ln(x)))) + mlp(ln(x))       (7B; 40B: ln_attn and ln_mlp)
//! ```

use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::{Attention, PositionScheme};
use super::decoder::{Architecture, Block, Dims, Mlp, Model, Residual, scaled, stacked};
use super::hf::{RopeConfig, unsupported};
use super::llama::describe_rope;
use super::rope::{PairLayout, Rope};
use super::weights::{layer_norm, linear, unfuse, untied_head};

/// `config.json` of a `falcon` checkpoint (the fields streamppl reads).
#[derive(Debug, Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_kv_heads: Option<usize>,
    #[serde(default = "yes")]
    multi_query: bool,
    #[serde(default)]
    new_decoder_architecture: bool,
    #[serde(default = "yes")]
    parallel_attn: bool,
    #[serde(default)]
    bias: bool,
    #[serde(default)]
    alibi: bool,
    layer_norm_epsilon: f64,
    #[serde(flatten)]
    rope: RopeConfig,
    max_position_embeddings: Option<usize>,
    ffn_hidden_size: Option<usize>,
    num_ln_in_parallel_attn: Option<usize>,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
}

fn yes() -> bool {
    true
}

/// The KV head count, which is also the number of row groups of the fused QKV, and the roles
/// (0 = q, 1 = k, 2 = v) of each group's row blocks.
fn qkv_layout(c: &Config) -> (usize, Vec<usize>) {
    let nh = c.num_attention_heads;
    if c.new_decoder_architecture {
        let nkv = c.num_kv_heads.unwrap_or(nh);
        // (0 KV heads is refused by the caller's check.)
        let per_group = nh.checked_div(nkv).unwrap_or(0);
        (
            nkv,
            std::iter::repeat_n(0, per_group).chain([1, 2]).collect(),
        )
    } else if c.multi_query {
        (1, std::iter::repeat_n(0, nh).chain([1, 2]).collect())
    } else {
        (nh, vec![0, 1, 2])
    }
}

pub fn from_hf(config_json: &str, vb: VarBuilder) -> anyhow::Result<Model> {
    let c: Config = serde_json::from_str(config_json)?;
    if c.alibi {
        return Err(unsupported(
            "alibi",
            "true",
            "Falcon with rotary embeddings (7B, 40B, 180B)",
        ));
    }
    let (d, nh) = (c.hidden_size, c.num_attention_heads);
    let (nkv, roles) = qkv_layout(&c);
    if nh == 0 || !d.is_multiple_of(nh) || nkv == 0 || !nh.is_multiple_of(nkv) {
        anyhow::bail!(
            "invalid model config: hidden_size {d}, num_attention_heads {nh}, num_kv_heads {nkv}: heads must divide the width and KV heads the heads"
        );
    }
    let hd = d / nh;
    let f = c.ffn_hidden_size.unwrap_or(4 * d);
    let eps = c.layer_norm_epsilon;
    let two_norms = c.new_decoder_architecture && c.num_ln_in_parallel_attn.unwrap_or(2) == 2;
    let blocks = (0..c.num_hidden_layers)
        .map(|i| {
            let p = |part: &str| format!("transformer.h.{i}.{part}");
            let fused = linear(
                &vb,
                &p("self_attention.query_key_value"),
                (nh + 2 * nkv) * hd,
                d,
                c.bias,
            )?;
            let [q, k, v] = unfuse(&fused, nkv, hd, &roles)?;
            let (attn_norm, residual) = if two_norms {
                let mlp_norm = layer_norm(&vb, &p("ln_mlp"), d, eps, true)?;
                (
                    layer_norm(&vb, &p("ln_attn"), d, eps, true)?,
                    Residual::Parallel { mlp_norm },
                )
            } else if c.parallel_attn || c.new_decoder_architecture {
                (
                    layer_norm(&vb, &p("input_layernorm"), d, eps, true)?,
                    Residual::ParallelSharedNorm,
                )
            } else {
                let mlp_norm = layer_norm(&vb, &p("post_attention_layernorm"), d, eps, true)?;
                (
                    layer_norm(&vb, &p("input_layernorm"), d, eps, true)?,
                    Residual::Sequential { mlp_norm },
                )
            };
            Ok(Block {
                attn_norm,
                qkv: stacked(&[scaled(&q, 1.0 / (hd as f64).sqrt())?, k, v])?,
                out: linear(&vb, &p("self_attention.dense"), d, d, c.bias)?,
                mlp: Mlp::Gelu {
                    up: linear(&vb, &p("mlp.dense_h_to_4h"), f, d, c.bias)?,
                    down: linear(&vb, &p("mlp.dense_4h_to_h"), d, f, c.bias)?,
                    tanh: false,
                },
                residual,
                window: None,
                qk_norm: None,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let embed = vb.get((c.vocab_size, d), "transformer.word_embeddings.weight")?;
    let lm_head = untied_head(
        &vb,
        c.tie_word_embeddings,
        "lm_head.weight",
        c.vocab_size,
        d,
    )?;
    let final_norm = layer_norm(&vb, "transformer.ln_f", d, eps, true)?;
    let (theta, scaling) = (c.rope.theta(), c.rope.scaling()?);
    let rope = Rope::new(hd, theta, &scaling, PairLayout::HalfSplit);
    let layout = match (c.new_decoder_architecture, c.multi_query) {
        (true, _) => "new decoder architecture",
        (false, true) => "multi-query",
        (false, false) => "multi-head",
    };
    let arch = Architecture {
        family: "falcon".into(),
        model_type: format!("falcon ({layout})"),
        positions: describe_rope("half-split", hd, theta, &scaling),
    };
    let dims = Dims {
        vocab_size: c.vocab_size,
        hidden_size: d,
        n_layer: c.num_hidden_layers,
        n_head: nh,
        n_kv_head: nkv,
        head_dim: hd,
        context_length: c.max_position_embeddings.unwrap_or(2048),
    };
    let attention = Attention {
        n_head: nh,
        n_kv_head: nkv,
        head_dim: hd,
        positions: PositionScheme::Rope(rope),
    };
    Ok(Model::new(
        dims, arch, embed, blocks, final_norm, lm_head, attention,
    )?)
}
