//! Gemma 3 (text): local layers with a sliding window and RoPE base 10,000, every sixth layer
//! global with base 1e6; per-head RMS norms on queries and keys; every branch normed on its way
//! in and out; a tanh-GELU gated MLP; embeddings scaled by sqrt(hidden); a tied head. From a
//! GGUF file (`gemma3.*` metadata, `blk.N.attn_q_norm.weight`, norms stored as 1 + w) or a
//! Hugging Face checkpoint (`gemma3_text`, norms stored as w). Q and K rows are half-split in
//! both (llama.cpp rotates Gemma NeoX-style, so its converter does not reorder them).
//!
//! ```text
//! h = rms(x);  x += rms(o(attn(rope(rms_q(q) * s), rope(rms_k(k)), v)));  h = rms(x);
//! x += rms(down(gelu_tanh(gate(h)) * up(h)))          s = query_pre_attn_scalar^-1/2
//! ```

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GgufValue;
use candle_core::{DType, Result};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::{Attention, PositionScheme};
use super::decoder::{Architecture, Block, Dims, Mlp, Model, Norm, Residual, stacked};
use super::hf::{RopeConfig, unsupported};
use super::llama::describe_rope;
use super::rope::{PairLayout, Rope, RopeScaling};
use super::weights::linear;

/// Every `n`-th layer (the last of each group of six in Gemma 3) attends globally.
const GLOBAL_EVERY: usize = 6;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub context_length: usize,
    /// The window of the local layers: a query sees itself and `sliding_window - 1` keys back.
    pub sliding_window: usize,
    /// Whether each layer is local (sliding window, `local_theta`) or global.
    pub local_layers: Vec<bool>,
    pub local_theta: f64,
    pub global_theta: f64,
    pub global_scaling: RopeScaling,
    /// Scores are multiplied by `query_pre_attn_scalar^-1/2` (not always head_dim's).
    pub query_pre_attn_scalar: f64,
}

/// The layers of an `n_layer` model that are local in Gemma 3's fixed pattern.
fn default_pattern(n_layer: usize) -> Vec<bool> {
    (0..n_layer).map(|i| (i + 1) % GLOBAL_EVERY != 0).collect()
}

impl Config {
    fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("sliding_window", self.sliding_window),
            ("context_length", self.context_length),
        ];
        if let Some((field, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{field} = 0 (must be at least 1)"));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return Err(format!(
                "n_kv_head = {} (must divide the {} attention heads)",
                self.n_kv_head, self.n_head
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim = {} (RoPE rotates pairs: must be even)",
                self.head_dim
            ));
        }
        if self.local_layers.len() != self.n_layer {
            return Err(format!(
                "{} layer types for {} layers",
                self.local_layers.len(),
                self.n_layer
            ));
        }
        for (field, x) in [
            ("rms_eps", self.rms_eps),
            ("local rope_theta", self.local_theta),
            ("global rope_theta", self.global_theta),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ] {
            if !(x.is_finite() && x > 0.0) {
                return Err(format!("{field} = {x} (must be positive and finite)"));
            }
        }
        Ok(())
    }

    fn dims(&self) -> Dims {
        Dims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            context_length: self.context_length,
        }
    }
}

/// Where the weights come from: their tensor names and how their norms are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// llama.cpp's names; norm weights hold 1 + w.
    Gguf,
    /// transformers' names; norm weights hold w.
    HuggingFace,
}

/// Tensor names of one source: embedding, final norm, layer prefix, then (relative to it)
/// attn_norm, q, k, v, out, q_norm, k_norm, post_attn_norm, mlp_norm, post_mlp_norm, gate,
/// up, down.
struct Names {
    embed: &'static str,
    final_norm: &'static str,
    layer: fn(usize) -> String,
    parts: [&'static str; 13],
}

impl Source {
    fn names(self) -> Names {
        match self {
            Source::Gguf => Names {
                embed: "token_embd.weight",
                final_norm: "output_norm",
                layer: |i| format!("blk.{i}"),
                parts: [
                    "attn_norm",
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "attn_q_norm",
                    "attn_k_norm",
                    "post_attention_norm",
                    "ffn_norm",
                    "post_ffw_norm",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ],
            },
            Source::HuggingFace => Names {
                embed: "model.embed_tokens.weight",
                final_norm: "model.norm",
                layer: |i| format!("model.layers.{i}"),
                parts: [
                    "input_layernorm",
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "self_attn.q_norm",
                    "self_attn.k_norm",
                    "post_attention_layernorm",
                    "pre_feedforward_layernorm",
                    "post_feedforward_layernorm",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ],
            },
        }
    }

    /// Gemma's RMS norm `{name}.weight` (d) as the multiplier the norm applies, (1 + w) times
    /// `scale`, computed in f32 and rounded once to the model's dtype.
    fn norm(self, vb: &VarBuilder, name: &str, d: usize, eps: f64, scale: f64) -> Result<Norm> {
        let w = vb.to_dtype(DType::F32).get(d, &format!("{name}.weight"))?;
        let one_plus_w = match self {
            Source::Gguf => w,
            Source::HuggingFace => (w + 1.0)?,
        };
        Ok(Norm::Rms {
            weight: (one_plus_w * scale)?.to_dtype(vb.dtype())?,
            eps: eps as f32,
        })
    }
}

/// Builds a Gemma 3 model of `cfg` from the tensors `vb` holds under `source`'s names.
pub fn load(cfg: &Config, vb: VarBuilder, source: Source, model_type: &str) -> Result<Model> {
    cfg.validate()
        .map_err(|e| candle_core::Error::Msg(format!("invalid model config: {e}")))?;
    let names = source.names();
    let (d, hd, f, eps) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.rms_eps,
    );
    let (nh, nkv) = (cfg.n_head, cfg.n_kv_head);
    let [
        attn_norm,
        q,
        k,
        v,
        out,
        q_norm,
        k_norm,
        post_attn,
        mlp_norm,
        post_mlp,
        gate,
        up,
        down,
    ] = names.parts;
    let blocks = (0..cfg.n_layer)
        .map(|i| {
            let p = |part: &str| format!("{}.{part}", (names.layer)(i));
            let lin = |part, o, i| linear(&vb, &p(part), o, i, false);
            let norm = |part, d, scale| source.norm(&vb, &p(part), d, eps, scale);
            Ok(Block {
                attn_norm: norm(attn_norm, d, 1.0)?,
                qkv: stacked(&[
                    lin(q, nh * hd, d)?,
                    lin(k, nkv * hd, d)?,
                    lin(v, nkv * hd, d)?,
                ])?,
                out: lin(out, d, nh * hd)?,
                mlp: Mlp::GatedGelu {
                    gate_up: stacked(&[lin(gate, f, d)?, lin(up, f, d)?])?,
                    down: lin(down, d, f)?,
                },
                residual: Residual::Sandwich {
                    post_attn_norm: norm(post_attn, d, 1.0)?,
                    mlp_norm: norm(mlp_norm, d, 1.0)?,
                    post_mlp_norm: norm(post_mlp, d, 1.0)?,
                },
                window: cfg.local_layers[i].then_some(cfg.sliding_window),
                qk_norm: Some((
                    norm(q_norm, hd, cfg.query_pre_attn_scalar.powf(-0.5))?,
                    norm(k_norm, hd, 1.0)?,
                )),
            })
        })
        .collect::<Result<_>>()?;
    let embed = vb.get((cfg.vocab_size, d), names.embed)?;
    let final_norm = source.norm(&vb, names.final_norm, d, eps, 1.0)?;
    let local = Rope::new(
        hd,
        cfg.local_theta,
        &RopeScaling::None,
        PairLayout::HalfSplit,
    );
    let global = Rope::new(
        hd,
        cfg.global_theta,
        &cfg.global_scaling,
        PairLayout::HalfSplit,
    );
    let arch = Architecture {
        family: "gemma3".into(),
        model_type: model_type.into(),
        positions: format!(
            "local layers ({} of {}, window {}): {}; global layers: {}",
            cfg.local_layers.iter().filter(|l| **l).count(),
            cfg.n_layer,
            cfg.sliding_window,
            describe_rope("half-split", hd, cfg.local_theta, &RopeScaling::None),
            describe_rope("half-split", hd, cfg.global_theta, &cfg.global_scaling),
        ),
    };
    let attention = Attention {
        n_head: nh,
        n_kv_head: nkv,
        head_dim: hd,
        positions: PositionScheme::LocalGlobalRope { local, global },
    };
    let model = Model::new(cfg.dims(), arch, embed, blocks, final_norm, None, attention)?;
    Ok(model.with_embedding_scale((d as f64).sqrt()))
}

/// The config of a GGUF file whose `general.architecture` is `gemma3`. The file does not say
/// which layers are local, the local RoPE base or the score scale: llama.cpp fixes them for
/// the family (every sixth layer global, base 10,000, 1/sqrt(head_dim) but for the 27B model's
/// 1/sqrt(hidden / heads)), and so does this.
pub fn config_from_gguf(md: &HashMap<String, GgufValue>) -> std::result::Result<Config, String> {
    let number = |key: &str| -> std::result::Result<f64, String> {
        let v = md
            .get(&format!("gemma3.{key}"))
            .ok_or_else(|| format!("no `gemma3.{key}` metadata"))?;
        (v.to_u32().map(f64::from))
            .or_else(|_| v.to_u64().map(|x| x as f64))
            // Via the shortest decimal of the f32, so 1e-6 stays 1e-6.
            .or_else(|_| {
                v.to_f32()
                    .map(|x| x.to_string().parse().unwrap_or(x as f64))
            })
            .map_err(|_| format!("`gemma3.{key}` is not a number"))
    };
    let size = |key: &str| number(key).map(|x| x as usize);
    let vocab_size = match md.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map_err(|e| e.to_string())?.len(),
        None => size("vocab_size")?,
    };
    let (hidden_size, n_head, n_layer) = (
        size("embedding_length")?,
        size("attention.head_count")?,
        size("block_count")?,
    );
    let head_dim = size("attention.key_length")?;
    if size("attention.value_length")? != head_dim {
        return Err("attention.value_length differs from attention.key_length".into());
    }
    let global_scaling = match md.get("gemma3.rope.scaling.type") {
        None => RopeScaling::None,
        Some(kind) => match kind.to_string().map(String::as_str) {
            Ok("none") => RopeScaling::None,
            Ok("linear") => RopeScaling::Linear {
                factor: number("rope.scaling.factor")?,
            },
            _ => {
                return Err(format!(
                    "RoPE scaling type {kind:?} (streamppl reads linear)"
                ));
            }
        },
    };
    let cfg = Config {
        vocab_size,
        hidden_size,
        intermediate_size: size("feed_forward_length")?,
        n_layer,
        n_head,
        n_kv_head: size("attention.head_count_kv")?,
        head_dim,
        rms_eps: number("attention.layer_norm_rms_epsilon")?,
        context_length: size("context_length")?,
        sliding_window: size("attention.sliding_window")?,
        local_layers: default_pattern(n_layer),
        local_theta: 10_000.0,
        global_theta: number("rope.freq_base")?,
        global_scaling,
        query_pre_attn_scalar: match n_layer {
            62 => (hidden_size / n_head) as f64,
            _ => head_dim as f64,
        },
    };
    cfg.validate()?;
    Ok(cfg)
}

/// `config.json` of a `gemma3_text` checkpoint, in the layout of transformers 5 (`rope_parameters` per layer type) or 4 (`rope_theta` and
/// `rope_local_base_freq`).
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    query_pre_attn_scalar: f64,
    sliding_window: usize,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    #[serde(flatten)]
    rope: RopeConfig,
    rope_local_base_freq: Option<f64>,
    #[serde(default = "gelu_tanh")]
    hidden_activation: String,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    use_bidirectional_attention: bool,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
}

fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

fn yes() -> bool {
    true
}

impl HfConfig {
    /// Refuses what this file does not implement, rather than computing something else.
    fn check_supported(&self) -> anyhow::Result<()> {
        let refuse = |field: &str, value: &str, what: &str| Err(unsupported(field, value, what));
        if !matches!(
            self.hidden_activation.as_str(),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast"
        ) {
            return refuse(
                "hidden_activation",
                &self.hidden_activation,
                "Gemma's tanh GELU",
            );
        }
        if let Some(cap) = self.final_logit_softcapping.or(self.attn_logit_softcapping) {
            return refuse("logit softcapping", &cap.to_string(), "Gemma 3 without it");
        }
        if self.attention_bias || self.use_bidirectional_attention {
            return refuse(
                "attention_bias / use_bidirectional_attention",
                "true",
                "causal attention without biases",
            );
        }
        if !self.tie_word_embeddings {
            return refuse("tie_word_embeddings", "false", "Gemma's tied LM head");
        }
        Ok(())
    }

    fn local_layers(&self) -> anyhow::Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        match (&self.layer_types, self.sliding_window_pattern) {
            (Some(types), _) => (types.iter())
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(unsupported(
                        "layer_types entry",
                        &format!("`{other}`"),
                        "sliding_attention and full_attention",
                    )),
                })
                .collect(),
            (None, Some(every)) if every > 0 => Ok((0..n).map(|i| (i + 1) % every != 0).collect()),
            _ => Ok(default_pattern(n)),
        }
    }

    /// (local theta, global theta, global scaling).
    fn ropes(&self) -> anyhow::Result<(f64, f64, RopeScaling)> {
        let by_type = (self.rope.parameters())
            .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        if let Some(params) = by_type {
            let of = |kind: &str| RopeConfig::from_parameters(params.get(kind).cloned());
            let (local, global) = (of("sliding_attention"), of("full_attention"));
            if local.scaling()? != RopeScaling::None {
                anyhow::bail!(
                    "unsupported RoPE scaling on the sliding_attention layers; streamppl scales the global layers only, as Gemma 3 does"
                );
            }
            return Ok((local.theta(), global.theta(), global.scaling()?));
        }
        Ok((
            self.rope_local_base_freq.unwrap_or(10_000.0),
            self.rope.theta(),
            self.rope.scaling()?,
        ))
    }
}

/// A Gemma 3 model from a Hugging Face checkpoint's `config.json` text and tensors.
pub fn from_hf(config_json: &str, vb: VarBuilder) -> anyhow::Result<Model> {
    let hf: HfConfig = serde_json::from_str(config_json)?;
    hf.check_supported()?;
    let (local_theta, global_theta, global_scaling) = hf.ropes()?;
    let cfg = Config {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        n_layer: hf.num_hidden_layers,
        n_head: hf.num_attention_heads,
        n_kv_head: hf.num_key_value_heads,
        head_dim: hf.head_dim,
        rms_eps: hf.rms_norm_eps,
        context_length: hf.max_position_embeddings,
        sliding_window: hf.sliding_window,
        local_layers: hf.local_layers()?,
        local_theta,
        global_theta,
        global_scaling,
        query_pre_attn_scalar: hf.query_pre_attn_scalar,
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid model config: {e}"))?;
    Ok(load(&cfg, vb, Source::HuggingFace, "gemma3_text")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let pattern = default_pattern(18);
        let global: Vec<usize> = (0..18).filter(|&i| !pattern[i]).collect();
        assert_eq!(global, vec![5, 11, 17]);
    }
}
