//! Loading a Llama-architecture GGUF file: metadata to [`Config`], every tensor dequantized to
//! f32 at load (candle's quantized kernels are slower and numerically touchy on this model).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::llama::{Config, Llama};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{path}: model file not found; run scripts/fetch-defaults.sh or pass --model PATH to a GGUF file"
    )]
    Missing { path: String },
    #[error(
        "{path}: not a readable GGUF file ({why}); re-download it (scripts/fetch-defaults.sh checks the sha256)"
    )]
    Corrupt { path: String, why: String },
    #[error("{path}: unsupported model ({why}); streamppl loads Llama-architecture GGUF files")]
    Unsupported { path: String, why: String },
}

/// A parsed GGUF file: its metadata and the dequantized model.
pub struct GgufModel {
    pub model: Llama,
    pub metadata: HashMap<String, Value>,
}

fn meta<'a>(
    md: &'a HashMap<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Value, ModelError> {
    md.get(key).ok_or_else(|| ModelError::Unsupported {
        path: path.into(),
        why: format!("no `{key}` metadata"),
    })
}

/// Reads the architecture hyper-parameters from GGUF metadata.
pub fn config_from_metadata(md: &HashMap<String, Value>, path: &str) -> Result<Config, ModelError> {
    let arch = meta(md, "general.architecture", path)?
        .to_string()
        .map_err(|e| bad(path, e))?
        .clone();
    if arch != "llama" {
        return Err(ModelError::Unsupported {
            path: path.into(),
            why: format!("architecture `{arch}`"),
        });
    }
    let u = |key: &str| -> Result<usize, ModelError> {
        let v = meta(md, &format!("llama.{key}"), path)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| bad(path, e))
    };
    let f = |key: &str, default: f64| -> Result<f64, ModelError> {
        match md.get(&format!("llama.{key}")) {
            // Via the shortest decimal of the f32, so 1e-5 stays 1e-5 and not 9.99999974e-6.
            Some(v) => v
                .to_f32()
                .map(|x| x.to_string().parse().unwrap_or(x as f64))
                .map_err(|e| bad(path, e)),
            None => Ok(default),
        }
    };
    let vocab_size = match md.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map_err(|e| bad(path, e))?.len(),
        None => u("vocab_size")?,
    };
    let n_head = u("attention.head_count")?;
    Ok(Config {
        vocab_size,
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        n_layer: u("block_count")?,
        n_head,
        n_kv_head: u("attention.head_count_kv").unwrap_or(n_head),
        rope_theta: f("rope.freq_base", 10_000.0)?,
        rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5)?,
        context_length: u("context_length")?,
        tied_embeddings: true, // fixed below from the tensor list
    })
}

fn bad(path: &str, e: impl std::fmt::Display) -> ModelError {
    // candle appends a backtrace to some errors when RUST_BACKTRACE is set: keep the message.
    let why = e
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    ModelError::Corrupt {
        path: path.into(),
        why,
    }
}

/// Loads a GGUF model, dequantizing every tensor to f32 on `device`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel, ModelError> {
    let p = path.display().to_string();
    if !path.is_file() {
        return Err(ModelError::Missing { path: p });
    }
    let mut reader = BufReader::new(File::open(path).map_err(|e| bad(&p, e))?);
    let content = Content::read(&mut reader).map_err(|e| bad(&p, e))?;
    let mut cfg = config_from_metadata(&content.metadata, &p)?;
    cfg.tied_embeddings = !content.tensor_infos.contains_key("output.weight");
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content
            .tensor(&mut reader, name, device)
            .map_err(|e| bad(&p, format!("tensor {name}: {e}")))?;
        let t: Tensor = q
            .dequantize(device)
            .map_err(|e| bad(&p, format!("tensor {name}: {e}")))?;
        tensors.insert(name.clone(), t);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = Llama::new(&cfg, vb).map_err(|e| bad(&p, e))?;
    Ok(GgufModel {
        model,
        metadata: content.metadata,
    })
}
