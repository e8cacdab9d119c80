//! The Llama family: Llama 2 and 3.x, Mistral (a layer sliding window) and Qwen2 (QKV bias) as
//! config variants, from a GGUF file (tensor names `blk.N.attn_q.weight`, Q and K rows in
//! interleaved-RoPE order) or a Hugging Face checkpoint (`model.layers.N.self_attn.q_proj.weight`,
//! half-split order).
//!
//! ```text
//! x += o(attn(rope(q), rope(k), v) of rms_norm(x));  x += down(silu(gate(h)) * up(h)), h = rms_norm(x)
//! ```

use candle_core::Result;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::{Attention, PositionScheme};
use super::decoder::{Architecture, Block, Dims, Mlp, Model, Residual, scaled, stacked};
use super::hf::{RopeConfig, unsupported};
use super::linear::Linear;
use super::rope::{PairLayout, Rope, RopeScaling};
use super::weights::{interleave_pairs, linear, rms_norm, untied_head};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    /// Set by checkpoints whose heads are not hidden_size / n_head wide.
    pub explicit_head_dim: Option<usize>,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f64,
    /// The context length the model was trained with (going past it is an experiment, not an error).
    pub context_length: usize,
    /// The LM head is the token embedding (no `output.weight` / `lm_head.weight`).
    pub tied_embeddings: bool,
    /// Q, K, V projections with a bias (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Output projection with a bias (Llama's `attention_bias`).
    pub out_bias: bool,
    /// The sliding window of each layer (`None`: full attention), Mistral's `sliding_window`;
    /// empty when no layer has one.
    pub layer_windows: Vec<Option<usize>>,
}

/// A config field that no working model can have: `field` (a [`Config`] field name, or
/// `head_dim`) is `value`, and `why` says what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value} ({why})")]
pub struct InvalidConfig {
    pub field: &'static str,
    pub value: String,
    pub why: String,
}

/// Whose tensor names and RoPE pair order the weights use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Gguf,
    HuggingFace,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim
            .unwrap_or(self.hidden_size / self.n_head.max(1))
    }

    /// Checks every field that the model divides by or sizes tensors with, so a bad file is
    /// an error at load and never a division by zero or a silently truncated shape later.
    pub fn validate(&self) -> std::result::Result<(), InvalidConfig> {
        let invalid = |field, value: &dyn std::fmt::Display, why: String| {
            Err(InvalidConfig {
                field,
                value: value.to_string(),
                why,
            })
        };
        for (field, value, what) in [
            ("vocab_size", self.vocab_size, "token"),
            ("hidden_size", self.hidden_size, "embedding dimension"),
            (
                "intermediate_size",
                self.intermediate_size,
                "feed-forward unit",
            ),
            ("n_layer", self.n_layer, "layer"),
            ("n_head", self.n_head, "attention head"),
            ("n_kv_head", self.n_kv_head, "KV head"),
            ("context_length", self.context_length, "trained position"),
        ] {
            if value == 0 {
                return invalid(field, &value, format!("a model needs at least one {what}"));
            }
        }
        if self.vocab_size - 1 > u32::MAX as usize {
            return invalid(
                "vocab_size",
                &self.vocab_size,
                "token ids are 32-bit: at most 2^32 tokens".into(),
            );
        }
        if self.explicit_head_dim.is_none() && !self.hidden_size.is_multiple_of(self.n_head) {
            return invalid(
                "hidden_size",
                &self.hidden_size,
                format!("must be a multiple of the {} attention heads", self.n_head),
            );
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return invalid(
                "n_kv_head",
                &self.n_kv_head,
                format!(
                    "must divide the {} attention heads: query heads share KV heads in equal groups",
                    self.n_head
                ),
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return invalid(
                "head_dim",
                &self.head_dim(),
                "hidden_size / n_head must be even: RoPE rotates pairs of dimensions".into(),
            );
        }
        for (field, value) in [("rope_theta", self.rope_theta), ("rms_eps", self.rms_eps)] {
            if !(value.is_finite() && value > 0.0) {
                return invalid(field, &value, "must be positive and finite".into());
            }
        }
        let windows = self.layer_windows.len();
        if (windows != 0 && windows != self.n_layer) || self.layer_windows.contains(&Some(0)) {
            return invalid(
                "sliding_window",
                &format!("{:?}", self.layer_windows),
                "one window of at least 1 token per layer".into(),
            );
        }
        Ok(())
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
            explicit_head_dim: None,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            context_length: 64,
            tied_embeddings: true,
            qkv_bias: false,
            out_bias: false,
            layer_windows: Vec::new(),
        }
    }

    fn dims(&self) -> Dims {
        Dims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim(),
            context_length: self.context_length,
        }
    }
}

/// Tensor names of one weight source.
struct Names {
    embed: &'static str,
    final_norm: &'static str,
    lm_head: &'static str,
    layer: fn(usize) -> String,
    /// attn_norm, q, k, v, out, mlp_norm, gate, up, down (relative to the layer prefix).
    parts: [&'static str; 9],
}

impl Naming {
    fn names(self) -> Names {
        match self {
            Naming::Gguf => Names {
                embed: "token_embd.weight",
                final_norm: "output_norm",
                lm_head: "output.weight",
                layer: |i| format!("blk.{i}"),
                parts: [
                    "attn_norm",
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_norm",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ],
            },
            Naming::HuggingFace => Names {
                embed: "model.embed_tokens.weight",
                final_norm: "model.norm",
                lm_head: "lm_head.weight",
                layer: |i| format!("model.layers.{i}"),
                parts: [
                    "input_layernorm",
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "post_attention_layernorm",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ],
            },
        }
    }

    /// The checkpoint's RoPE pair order, in words for records.
    fn layout_words(self) -> &'static str {
        match self {
            Naming::Gguf => "interleaved",
            Naming::HuggingFace => "half-split (Q/K rows reordered to interleaved pairs at load)",
        }
    }

    /// Q or K rows as the interleaved kernel takes them. Hugging Face rows are half-split;
    /// reordering them at load (the inverse of llama.cpp's conversion) rather than rotating
    /// half-split pairs makes a checkpoint and its GGUF compute the same sums in the same
    /// order: the same NLLs, not just equal up to rounding.
    fn interleaved(self, rows: Linear, heads: usize, head_dim: usize) -> Result<Linear> {
        match self {
            Naming::Gguf => Ok(rows),
            Naming::HuggingFace => interleave_pairs(&rows, heads, head_dim),
        }
    }
}

/// Builds a Llama-family model of `cfg` from the tensors `vb` holds under `naming`'s names.
pub fn load(cfg: &Config, vb: VarBuilder, naming: Naming, model_type: &str) -> Result<Model> {
    cfg.validate()
        .map_err(|e| candle_core::Error::Msg(format!("invalid model config: {e}")))?;
    let names = naming.names();
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let (nh, nkv) = (cfg.n_head, cfg.n_kv_head);
    let embed = vb.get((cfg.vocab_size, d), names.embed)?;
    let lm_head = untied_head(&vb, cfg.tied_embeddings, names.lm_head, cfg.vocab_size, d)?;
    let [attn_norm, q, k, v, out, mlp_norm, gate, up, down] = names.parts;
    let blocks = (0..cfg.n_layer)
        .map(|i| {
            let p = |part: &str| format!("{}.{part}", (names.layer)(i));
            let lin = |part, o, i, bias| linear(&vb, &p(part), o, i, bias);
            Ok(Block {
                attn_norm: rms_norm(&vb, &p(attn_norm), d, cfg.rms_eps)?,
                qkv: stacked(&[
                    scaled(
                        &naming.interleaved(lin(q, nh * hd, d, cfg.qkv_bias)?, nh, hd)?,
                        1.0 / (hd as f64).sqrt(),
                    )?,
                    naming.interleaved(lin(k, nkv * hd, d, cfg.qkv_bias)?, nkv, hd)?,
                    lin(v, nkv * hd, d, cfg.qkv_bias)?,
                ])?,
                out: lin(out, d, nh * hd, cfg.out_bias)?,
                mlp: Mlp::GatedSilu {
                    gate_up: stacked(&[lin(gate, f, d, false)?, lin(up, f, d, false)?])?,
                    down: lin(down, d, f, false)?,
                },
                residual: Residual::Sequential {
                    mlp_norm: rms_norm(&vb, &p(mlp_norm), d, cfg.rms_eps)?,
                },
                window: cfg.layer_windows.get(i).copied().flatten(),
                qk_norm: None,
            })
        })
        .collect::<Result<_>>()?;
    let rope = Rope::new(
        hd,
        cfg.rope_theta,
        &cfg.rope_scaling,
        PairLayout::Interleaved,
    );
    let arch = Architecture {
        family: "llama".into(),
        model_type: model_type.into(),
        positions: describe_rope(naming.layout_words(), hd, cfg.rope_theta, &cfg.rope_scaling),
    };
    let attention = Attention {
        n_head: nh,
        n_kv_head: nkv,
        head_dim: hd,
        positions: PositionScheme::Rope(rope),
    };
    let final_norm = rms_norm(&vb, names.final_norm, d, cfg.rms_eps)?;
    Model::new(
        cfg.dims(),
        arch,
        embed,
        blocks,
        final_norm,
        lm_head,
        attention,
    )
}

/// `rope half-split, 64 of each head's channels, theta 10000, llama3 scaling x8` and the like,
/// for records.
pub fn describe_rope(layout: &str, rotary_dim: usize, theta: f64, scaling: &RopeScaling) -> String {
    let scaling = match scaling {
        RopeScaling::None => String::new(),
        RopeScaling::Linear { factor } => format!(", linear scaling x{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!(", llama3 scaling x{factor}"),
    };
    format!(
        "rope {layout}, {} of each head's channels, theta {theta}{scaling}",
        rotary_dim
    )
}

/// `config.json` of `llama`, `mistral` and `qwen2` checkpoints (the fields streamppl reads).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(flatten)]
    rope: RopeConfig,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

/// A Llama-family model from a Hugging Face checkpoint's `config.json` text and tensors.
pub fn from_hf(config_json: &str, vb: VarBuilder) -> anyhow::Result<Model> {
    let hf: HfConfig = serde_json::from_str(config_json)?;
    if hf.mlp_bias {
        return Err(unsupported("mlp_bias", "true", "Llama MLPs without biases"));
    }
    let qwen2 = hf.model_type == "qwen2";
    let n = hf.num_hidden_layers;
    let layer_windows = (0..n)
        .map(|i| {
            let sliding = match (&hf.layer_types, hf.model_type.as_str()) {
                (Some(types), _) => types.get(i).is_some_and(|t| t == "sliding_attention"),
                (None, "mistral") => true,
                (None, "qwen2") => {
                    hf.use_sliding_window == Some(true) && i >= hf.max_window_layers.unwrap_or(0)
                }
                _ => false,
            };
            sliding.then_some(hf.sliding_window).flatten()
        })
        .collect();
    let cfg = Config {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        n_layer: n,
        n_head: hf.num_attention_heads,
        n_kv_head: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        explicit_head_dim: hf.head_dim,
        rope_theta: hf.rope.theta(),
        rope_scaling: hf.rope.scaling()?,
        rms_eps: hf.rms_norm_eps,
        context_length: hf.max_position_embeddings,
        // Llama's and Mistral's default is untied; Qwen2's too unless the config says so.
        tied_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        qkv_bias: qwen2 || hf.attention_bias,
        out_bias: hf.attention_bias,
        layer_windows,
    };
    if let Err(e) = cfg.validate() {
        anyhow::bail!("invalid model config: {e}");
    }
    Ok(load(&cfg, vb, Naming::HuggingFace, &hf.model_type)?)
}
