//! GPT-NeoX (Pythia): LayerNorms with biases, biases on every projection, a fused QKV laid out
//! per head (heads, [q k v], head_dim), partial half-split RoPE (`rotary_pct`), a parallel
//! residual by default, an untied head (`embed_out`).
//!
//! ```text
//! x += dense(attn(qkv(ln1(x)))) + mlp(ln2(x))        (use_parallel_residual, the default)
//! ```

use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::{Attention, PositionScheme};
use super::decoder::{Architecture, Block, Dims, Mlp, Model, Residual, scaled, stacked};
use super::hf::{RopeConfig, unsupported};
use super::llama::describe_rope;
use super::rope::{PairLayout, Rope};
use super::weights::{layer_norm, linear, unfuse, untied_head};

/// `config.json` of a `gpt_neox` checkpoint (the fields streamppl reads).
#[derive(Debug, Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    rotary_pct: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rotary_emb_base: Option<f64>,
    #[serde(flatten)]
    rope: RopeConfig,
    layer_norm_eps: f64,
    max_position_embeddings: usize,
    #[serde(default = "yes")]
    use_parallel_residual: bool,
    #[serde(default = "yes")]
    attention_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: String,
}

fn yes() -> bool {
    true
}

/// Whether `hidden_act` is the tanh GELU (else the exact one); others are an error.
pub fn gelu_is_tanh(hidden_act: &str) -> anyhow::Result<bool> {
    match hidden_act {
        "gelu" => Ok(false),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(true),
        other => Err(unsupported(
            "hidden_act",
            &format!("`{other}`"),
            "gelu and gelu_new",
        )),
    }
}

pub fn from_hf(config_json: &str, vb: VarBuilder) -> anyhow::Result<Model> {
    let c: Config = serde_json::from_str(config_json)?;
    let (d, nh, f) = (c.hidden_size, c.num_attention_heads, c.intermediate_size);
    if nh == 0 || !d.is_multiple_of(nh) {
        anyhow::bail!(
            "invalid model config: hidden_size {d} is not a multiple of num_attention_heads {nh}"
        );
    }
    let hd = d / nh;
    let pct = c.rotary_pct.or(c.partial_rotary_factor).unwrap_or(1.0);
    // transformers: rotary_ndims = int(head_size * rotary_pct).
    let rotary_dim = (hd as f64 * pct) as usize;
    if !rotary_dim.is_multiple_of(2) || rotary_dim > hd {
        anyhow::bail!(
            "invalid model config: rotary_pct {pct} gives {rotary_dim} rotary channels of {hd}; they rotate in pairs"
        );
    }
    let gelu_tanh = gelu_is_tanh(&c.hidden_act)?;
    let theta = c.rotary_emb_base.unwrap_or_else(|| c.rope.theta());
    let scaling = c.rope.scaling()?;
    let bias = c.attention_bias;
    let blocks = (0..c.num_hidden_layers)
        .map(|i| {
            let p = |part: &str| format!("gpt_neox.layers.{i}.{part}");
            let fused = linear(&vb, &p("attention.query_key_value"), 3 * d, d, bias)?;
            // Rows per head: its q, then k, then v (roles 0, 1, 2).
            let [q, k, v] = unfuse(&fused, nh, hd, &[0, 1, 2])?;
            let mlp_norm = layer_norm(
                &vb,
                &p("post_attention_layernorm"),
                d,
                c.layer_norm_eps,
                true,
            )?;
            Ok(Block {
                attn_norm: layer_norm(&vb, &p("input_layernorm"), d, c.layer_norm_eps, true)?,
                qkv: stacked(&[scaled(&q, 1.0 / (hd as f64).sqrt())?, k, v])?,
                out: linear(&vb, &p("attention.dense"), d, d, bias)?,
                mlp: Mlp::Gelu {
                    up: linear(&vb, &p("mlp.dense_h_to_4h"), f, d, true)?,
                    down: linear(&vb, &p("mlp.dense_4h_to_h"), d, f, true)?,
                    tanh: gelu_tanh,
                },
                residual: match c.use_parallel_residual {
                    true => Residual::Parallel { mlp_norm },
                    false => Residual::Sequential { mlp_norm },
                },
                window: None,
                qk_norm: None,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let embed = vb.get((c.vocab_size, d), "gpt_neox.embed_in.weight")?;
    let lm_head = untied_head(
        &vb,
        c.tie_word_embeddings,
        "embed_out.weight",
        c.vocab_size,
        d,
    )?;
    let final_norm = layer_norm(&vb, "gpt_neox.final_layer_norm", d, c.layer_norm_eps, true)?;
    let rope = Rope::new(rotary_dim, theta, &scaling, PairLayout::HalfSplit);
    let arch = Architecture {
        family: "gpt_neox".into(),
        model_type: "gpt_neox".into(),
        positions: describe_rope("half-split", rotary_dim, theta, &scaling),
    };
    let dims = Dims {
        vocab_size: c.vocab_size,
        hidden_size: d,
        n_layer: c.num_hidden_layers,
        n_head: nh,
        n_kv_head: nh,
        head_dim: hd,
        context_length: c.max_position_embeddings,
    };
    let attention = Attention {
        n_head: nh,
        n_kv_head: nh,
        head_dim: hd,
        positions: PositionScheme::Rope(rope),
    };
    Ok(Model::new(
        dims, arch, embed, blocks, final_norm, lm_head, attention,
    )?)
}
