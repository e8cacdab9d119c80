//! MPT: ALiBi instead of position embeddings, LayerNorms without biases, no biases anywhere (as
//! in transformers, whatever `no_bias` says), a fused QKV with rows [q, k, v], a tied head.
//!
//! ```text
//! x += out_proj(attn(Wqkv(norm_1(x))) + alibi);  x += down(gelu(up(norm_2(x))))
//! ```

use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::{Attention, PositionScheme};
use super::decoder::{Architecture, Block, Dims, Mlp, Model, Residual, scaled, stacked};
use super::hf::unsupported;
use super::weights::{layer_norm, linear, unfuse};

/// `config.json` of an `mpt` checkpoint (the fields streamppl reads).
#[derive(Debug, Deserialize)]
struct Config {
    vocab_size: usize,
    d_model: usize,
    n_heads: usize,
    n_layers: usize,
    #[serde(default = "four")]
    expansion_ratio: usize,
    max_seq_len: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    attn_config: AttnConfig,
}

#[derive(Debug, Deserialize)]
struct AttnConfig {
    #[serde(default)]
    alibi: bool,
    #[serde(default = "eight")]
    alibi_bias_max: f64,
    softmax_scale: Option<f64>,
    clip_qkv: Option<f64>,
    #[serde(default)]
    qk_ln: bool,
}

impl Default for AttnConfig {
    fn default() -> Self {
        AttnConfig {
            alibi: false,
            alibi_bias_max: 8.0,
            softmax_scale: None,
            clip_qkv: None,
            qk_ln: false,
        }
    }
}

fn four() -> usize {
    4
}
fn eight() -> f64 {
    8.0
}
fn default_eps() -> f64 {
    1e-5
}

pub fn from_hf(config_json: &str, vb: VarBuilder) -> anyhow::Result<Model> {
    let c: Config = serde_json::from_str(config_json)?;
    let a = &c.attn_config;
    if !a.alibi {
        return Err(unsupported(
            "attn_config.alibi",
            "false",
            "MPT with ALiBi (as transformers does)",
        ));
    }
    if let Some(clip) = a.clip_qkv {
        return Err(unsupported(
            "attn_config.clip_qkv",
            &clip.to_string(),
            "MPT without QKV clipping",
        ));
    }
    if a.qk_ln {
        return Err(unsupported(
            "attn_config.qk_ln",
            "true",
            "MPT without QK LayerNorm",
        ));
    }
    if c.expansion_ratio != 4 {
        return Err(unsupported(
            "expansion_ratio",
            &c.expansion_ratio.to_string(),
            "MPT's 4 x d_model MLP (transformers' MptMLP hard-codes it)",
        ));
    }
    let (d, nh) = (c.d_model, c.n_heads);
    if nh == 0 || !d.is_multiple_of(nh) {
        anyhow::bail!("invalid model config: d_model {d} is not a multiple of n_heads {nh}");
    }
    let hd = d / nh;
    let f = c.expansion_ratio * d;
    let scale = a.softmax_scale.unwrap_or(1.0 / (hd as f64).sqrt());
    let eps = c.layer_norm_epsilon;
    let blocks = (0..c.n_layers)
        .map(|i| {
            let p = |part: &str| format!("transformer.blocks.{i}.{part}");
            let fused = linear(&vb, &p("attn.Wqkv"), 3 * d, d, false)?;
            // All q heads, then all k heads, then all v heads.
            let [q, k, v] = unfuse(&fused, 1, d, &[0, 1, 2])?;
            Ok(Block {
                attn_norm: layer_norm(&vb, &p("norm_1"), d, eps, false)?,
                qkv: stacked(&[scaled(&q, scale)?, k, v])?,
                out: linear(&vb, &p("attn.out_proj"), d, d, false)?,
                mlp: Mlp::Gelu {
                    up: linear(&vb, &p("ffn.up_proj"), f, d, false)?,
                    down: linear(&vb, &p("ffn.down_proj"), d, f, false)?,
                    tanh: false,
                },
                residual: Residual::Sequential {
                    mlp_norm: layer_norm(&vb, &p("norm_2"), d, eps, false)?,
                },
                window: None,
                qk_norm: None,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let embed = vb.get((c.vocab_size, d), "transformer.wte.weight")?;
    let final_norm = layer_norm(&vb, "transformer.norm_f", d, eps, false)?;
    let arch = Architecture {
        family: "mpt".into(),
        model_type: "mpt".into(),
        positions: format!("alibi, max bias {}", a.alibi_bias_max),
    };
    let dims = Dims {
        vocab_size: c.vocab_size,
        hidden_size: d,
        n_layer: c.n_layers,
        n_head: nh,
        n_kv_head: nh,
        head_dim: hd,
        context_length: c.max_seq_len,
    };
    let attention = Attention {
        n_head: nh,
        n_kv_head: nh,
        head_dim: hd,
        positions: PositionScheme::mpt_alibi(nh, a.alibi_bias_max),
    };
    Ok(Model::new(
        dims, arch, embed, blocks, final_norm, None, attention,
    )?)
}
