//! Loading a Hugging Face checkpoint: `config.json` names the family (`model_type`), the
//! family file reads its config and builds the model from the safetensors shards, memory-mapped
//! and upcast to f32 tensor by tensor (f16 and bf16 checkpoints load too).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use super::decoder::Model;
use super::rope::RopeScaling;
use super::{falcon, gemma3, llama, mpt, neox};

/// The `model_type`s streamppl runs, and the family file of each.
pub const MODEL_TYPES: &str = "llama, mistral, qwen2, gpt_neox, falcon, mpt, gemma3_text";

/// Builds the model of the checkpoint whose `config.json` is `config` and whose tensors are in
/// the safetensors files `weights`, on `device` in `dtype`.
pub fn load_hf(config: &Path, weights: &[PathBuf], dtype: DType, device: &Device) -> Result<Model> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read the model config", config.display()))?;
    let model_type = model_type(&text).with_context(|| format!("{}", config.display()))?;
    // SAFETY: the files are mapped read-only; candle copies each tensor out (to `dtype`) on `get`,
    // so nothing refers to the mapping after loading. A file changed while it loads is the
    // caller's race, as with any mmap-based loader.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) }.map_err(|e| {
            anyhow!(
                "{}: cannot read the weights ({})",
                folder(config),
                crate::first_line(&e)
            )
        })?;
    let model = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" => llama::from_hf(&text, vb),
        "gpt_neox" => neox::from_hf(&text, vb),
        "falcon" | "RefinedWeb" | "RefinedWebModel" => falcon::from_hf(&text, vb),
        "mpt" => mpt::from_hf(&text, vb),
        "gemma3_text" => gemma3::from_hf(&text, vb),
        "gemma3" => bail!(
            "{}: a multimodal Gemma 3 checkpoint; streamppl runs the text model (`gemma3_text`): save its language model alone",
            config.display()
        ),
        other => bail!(
            "{}: unknown model_type `{other}`; streamppl runs {MODEL_TYPES}",
            config.display()
        ),
    };
    model.map_err(|e| {
        let why = crate::first_line(&e);
        let hint = match why.contains("shape mismatch") {
            true => "; config.json and the weights disagree (a different checkpoint's shards or an edited config)",
            false => "",
        };
        anyhow!("{}: {why}{hint}", folder(config))
    })
}

fn model_type(config_json: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Head {
        model_type: Option<String>,
    }
    let head: Head = serde_json::from_str(config_json).context("not a valid config.json")?;
    head.model_type
        .ok_or_else(|| anyhow!("no `model_type`; streamppl runs {MODEL_TYPES}"))
}

fn folder(config: &Path) -> String {
    config.parent().unwrap_or(config).display().to_string()
}

/// An error for a config value streamppl does not implement, naming what it does.
pub fn unsupported(field: &str, value: &str, supported: &str) -> anyhow::Error {
    anyhow!("unsupported {field} = {value}; streamppl implements {supported}")
}

/// The RoPE fields of a `config.json`: `rope_theta` and `rope_scaling`, or transformers 5's
/// `rope_parameters` holding both.
#[derive(Debug, Default, Deserialize)]
pub struct RopeConfig {
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
}

impl RopeConfig {
    /// The RoPE settings of one `rope_parameters` object (transformers 5 keeps one per layer
    /// type for Gemma 3).
    pub fn from_parameters(parameters: Option<Value>) -> Self {
        RopeConfig {
            rope_parameters: parameters,
            ..Default::default()
        }
    }

    /// `rope_parameters` as written, if any.
    pub fn parameters(&self) -> Option<&Value> {
        self.rope_parameters.as_ref()
    }

    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0)
    }

    /// The scaling, or an error naming an unsupported type (never a silently wrong number).
    pub fn scaling(&self) -> Result<RopeScaling> {
        let Some(params) = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()) else {
            return Ok(RopeScaling::None);
        };
        if params.is_null() {
            return Ok(RopeScaling::None);
        }
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| -> Result<f64> {
            let x = params
                .get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| anyhow!("rope_scaling of type {kind} needs a number `{key}`"))?;
            match x.is_finite() && x > 0.0 {
                true => Ok(x),
                false => bail!("rope_scaling.{key} = {x} must be positive"),
            }
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: number("factor")?,
            }),
            "llama3" => {
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    bail!(
                        "rope_scaling: high_freq_factor {high} must exceed low_freq_factor {low}"
                    );
                }
                Ok(RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_context: number("original_max_position_embeddings")?,
                })
            }
            other => Err(unsupported(
                "rope_scaling type",
                &format!("`{other}`"),
                "`linear` and `llama3` (or none)",
            )),
        }
    }
}
