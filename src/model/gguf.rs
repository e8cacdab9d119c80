//! Loading a GGUF file (llama or gemma3): metadata to the family's config, every tensor dequantized to
//! f32 at load (candle's quantized kernels are slower and numerically touchy on this model).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::decoder::Model;
use super::gemma3;
use super::llama::{self, Config, InvalidConfig, Naming};
use super::rope::RopeScaling;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{path}: model file not found; run scripts/fetch-defaults.sh or pass --model PATH to a GGUF file"
    )]
    Missing { path: String },
    #[error("{path} is a folder; give the model file (a .gguf)")]
    Folder { path: String },
    #[error("{path}: not a regular file; give the model file (a .gguf)")]
    NotAFile { path: String },
    #[error("{path}: not a GGUF file ({what}); give a Llama-architecture .gguf model file")]
    NotGguf { path: String, what: String },
    #[error(
        "{path}: not a readable GGUF file ({why}); re-download it (scripts/fetch-defaults.sh checks the sha256)"
    )]
    Corrupt { path: String, why: String },
    #[error("{path}: unsupported model ({why}); streamppl loads llama and gemma3 GGUF files")]
    Unsupported { path: String, why: String },
    #[error("{path}: invalid model config: {field} = {value} ({why})")]
    InvalidConfig {
        path: String,
        field: String,
        value: String,
        why: String,
    },
}

/// Checks that `path` is a readable regular file that starts with the GGUF magic, so a wrong
/// `--model` is named for what it is (a folder, a text file) before anything is parsed.
pub fn check_model_file(path: &Path) -> Result<(), ModelError> {
    let p = path.display().to_string();
    let kind = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::Missing { path: p });
        }
        Err(e) => return Err(bad(&p, e)),
        Ok(m) => m.file_type(),
    };
    if kind.is_dir() {
        return Err(ModelError::Folder { path: p });
    }
    if !kind.is_file() {
        return Err(ModelError::NotAFile { path: p });
    }
    let mut head = Vec::with_capacity(4);
    File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .map_err(|e| bad(&p, e))?;
    if head != b"GGUF" {
        let what = match head.is_empty() {
            true => "it is empty".to_string(),
            false => format!(
                "it starts with {:?}, not \"GGUF\"",
                String::from_utf8_lossy(&head)
            ),
        };
        return Err(ModelError::NotGguf { path: p, what });
    }
    Ok(())
}

/// A parsed GGUF file: its metadata and the dequantized model.
pub struct GgufModel {
    pub model: Model,
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
    let wrong_type = |key: &str, v: &Value, want: &str| ModelError::InvalidConfig {
        path: path.into(),
        field: format!("llama.{key}"),
        value: format!("{v:?}"),
        why: format!("must be {want}"),
    };
    let u = |key: &str| -> Result<usize, ModelError> {
        let v = meta(md, &format!("llama.{key}"), path)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|_| wrong_type(key, v, "an unsigned integer"))
    };
    let f = |key: &str, default: f64| -> Result<f64, ModelError> {
        match md.get(&format!("llama.{key}")) {
            // Via the shortest decimal of the f32, so 1e-5 stays 1e-5 and not 9.99999974e-6.
            Some(v) => v
                .to_f32()
                .map(|x| x.to_string().parse().unwrap_or(x as f64))
                .or_else(|_| v.to_f64())
                .map_err(|_| wrong_type(key, v, "a number")),
            None => Ok(default),
        }
    };
    let vocab_size = match md.get("tokenizer.ggml.tokens") {
        Some(v) => v.to_vec().map_err(|e| bad(path, e))?.len(),
        None => u("vocab_size")?,
    };
    let n_head = u("attention.head_count")?;
    let cfg = Config {
        vocab_size,
        hidden_size: u("embedding_length")?,
        intermediate_size: u("feed_forward_length")?,
        n_layer: u("block_count")?,
        n_head,
        n_kv_head: match md.contains_key("llama.attention.head_count_kv") {
            true => u("attention.head_count_kv")?,
            false => n_head,
        },
        explicit_head_dim: None,
        rope_theta: f("rope.freq_base", 10_000.0)?,
        rope_scaling: rope_scaling(md, path)?,
        rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5)?,
        context_length: u("context_length")?,
        tied_embeddings: true, // fixed below from the tensor list
        qkv_bias: false,
        out_bias: false,
        layer_windows: Vec::new(),
    };
    cfg.validate().map_err(|e| invalid_config(path, md, e))?;
    Ok(cfg)
}

/// `llama.rope.scaling.type` (and `.factor`): none or linear; others are an error.
fn rope_scaling(md: &HashMap<String, Value>, path: &str) -> Result<RopeScaling, ModelError> {
    let Some(kind) = md.get("llama.rope.scaling.type") else {
        return Ok(RopeScaling::None);
    };
    let unsupported = |why: String| ModelError::Unsupported {
        path: path.into(),
        why,
    };
    match kind.to_string().map(String::as_str) {
        Ok("none") => Ok(RopeScaling::None),
        Ok("linear") => {
            let factor = md
                .get("llama.rope.scaling.factor")
                .and_then(|v| v.to_f32().ok())
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| {
                    unsupported(
                        "linear RoPE scaling without a positive llama.rope.scaling.factor".into(),
                    )
                })?;
            Ok(RopeScaling::Linear {
                factor: factor as f64,
            })
        }
        _ => Err(unsupported(format!(
            "RoPE scaling type {kind:?}; streamppl reads linear scaling from GGUF (load the Hugging Face checkpoint for llama3 scaling)"
        ))),
    }
}

/// A [`InvalidConfig`] of a GGUF file, its field named by the metadata key it came from.
fn invalid_config(path: &str, md: &HashMap<String, Value>, e: InvalidConfig) -> ModelError {
    let field = match e.field {
        "vocab_size" if md.contains_key("tokenizer.ggml.tokens") => {
            "vocab size (entries of tokenizer.ggml.tokens)"
        }
        "vocab_size" => "llama.vocab_size",
        "hidden_size" => "llama.embedding_length",
        "intermediate_size" => "llama.feed_forward_length",
        "n_layer" => "llama.block_count",
        "n_head" => "llama.attention.head_count",
        "n_kv_head" => "llama.attention.head_count_kv",
        "head_dim" => "head dim (llama.embedding_length / llama.attention.head_count)",
        "rope_theta" => "llama.rope.freq_base",
        "rms_eps" => "llama.attention.layer_norm_rms_epsilon",
        "context_length" => "llama.context_length",
        other => other,
    };
    ModelError::InvalidConfig {
        path: path.into(),
        field: field.into(),
        value: e.value,
        why: e.why,
    }
}

/// A tensor dimension, as the config sets it.
#[derive(Clone, Copy)]
enum Dim {
    Vocab,
    Embedding,
    FeedForward,
    QueryHeads,
    KvHeads,
}

impl Dim {
    fn size(self, cfg: &Config) -> usize {
        match self {
            Dim::Vocab => cfg.vocab_size,
            Dim::Embedding => cfg.hidden_size,
            Dim::FeedForward => cfg.intermediate_size,
            Dim::QueryHeads => cfg.n_head * cfg.head_dim(),
            Dim::KvHeads => cfg.n_kv_head * cfg.head_dim(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dim::Vocab => "vocab",
            Dim::Embedding => "embedding_length",
            Dim::FeedForward => "feed_forward_length",
            Dim::QueryHeads => "head_count * head_dim",
            Dim::KvHeads => "head_count_kv * head_dim",
        }
    }
}

/// The tensors a Llama of `cfg` reads, with their dimensions as candle sees them (rows first).
fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<Dim>)> {
    use Dim::{Embedding as E, FeedForward as F, KvHeads as KV, QueryHeads as Q, Vocab as V};
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![V, E]),
        ("output_norm.weight".to_string(), vec![E]),
    ];
    if !cfg.tied_embeddings {
        out.push(("output.weight".to_string(), vec![V, E]));
    }
    for i in 0..cfg.n_layer {
        let t = |name: &str| format!("blk.{i}.{name}.weight");
        out.extend([
            (t("attn_norm"), vec![E]),
            (t("attn_q"), vec![Q, E]),
            (t("attn_k"), vec![KV, E]),
            (t("attn_v"), vec![KV, E]),
            (t("attn_output"), vec![E, Q]),
            (t("ffn_norm"), vec![E]),
            (t("ffn_gate"), vec![F, E]),
            (t("ffn_up"), vec![F, E]),
            (t("ffn_down"), vec![E, F]),
        ]);
    }
    out
}

/// Checks the file's layer count and every tensor's shape against the config, before any
/// tensor is read: a mismatch is named here rather than found as a shape error mid-load.
fn check_tensor_shapes(
    cfg: &Config,
    tensors: &HashMap<String, TensorInfo>,
    path: &str,
) -> Result<Vec<String>, ModelError> {
    let layers_in_file = tensors
        .keys()
        .filter_map(|name| {
            name.strip_prefix("blk.")?
                .split_once('.')?
                .0
                .parse::<usize>()
                .ok()
        })
        .collect::<std::collections::HashSet<_>>()
        .len();
    if layers_in_file != cfg.n_layer {
        return Err(ModelError::InvalidConfig {
            path: path.into(),
            field: "llama.block_count".into(),
            value: cfg.n_layer.to_string(),
            why: format!("the file has tensors for {layers_in_file} layer(s), blk.N.*"),
        });
    }
    let mut names = Vec::new();
    for (name, dims) in expected_tensors(cfg) {
        let info = tensors.get(&name).ok_or_else(|| ModelError::Unsupported {
            path: path.into(),
            why: format!("no tensor `{name}`"),
        })?;
        let want: Vec<usize> = dims.iter().map(|d| d.size(cfg)).collect();
        if info.shape.dims() != want {
            let names: Vec<&str> = dims.iter().map(|d| d.name()).collect();
            return Err(ModelError::InvalidConfig {
                path: path.into(),
                field: format!("{name} shape"),
                value: format!("{:?}", info.shape.dims()),
                why: format!("the config makes it [{}] = {want:?}", names.join(", ")),
            });
        }
        names.push(name);
    }
    Ok(names)
}

fn bad(path: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Corrupt {
        path: path.into(),
        why: crate::first_line(e),
    }
}

/// Loads a GGUF model, dequantizing every tensor to f32 on `device`, then to `dtype`.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel, ModelError> {
    let p = path.display().to_string();
    check_model_file(path)?;
    let mut reader = BufReader::new(File::open(path).map_err(|e| bad(&p, e))?);
    let content = Content::read(&mut reader).map_err(|e| bad(&p, e))?;
    let arch = meta(&content.metadata, "general.architecture", &p)?
        .to_string()
        .map_err(|e| bad(&p, e))?
        .clone();
    let model = match arch.as_str() {
        "gemma3" => load_gemma3(&content, &mut reader, &p, dtype, device)?,
        _ => load_llama(&content, &mut reader, &p, dtype, device)?,
    };
    Ok(GgufModel {
        model,
        metadata: content.metadata,
    })
}

/// Every tensor `names` of the file, dequantized to f32 on `device`.
fn dequantized(
    content: &Content,
    reader: &mut BufReader<File>,
    names: impl IntoIterator<Item = String>,
    path: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut tensors = HashMap::new();
    for name in names {
        let q = content
            .tensor(reader, &name, device)
            .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
        let t: Tensor = q
            .dequantize(device)
            .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
        tensors.insert(name, t);
    }
    Ok(tensors)
}

fn load_llama(
    content: &Content,
    reader: &mut BufReader<File>,
    p: &str,
    dtype: DType,
    device: &Device,
) -> Result<Model, ModelError> {
    let mut cfg = config_from_metadata(&content.metadata, p)?;
    cfg.tied_embeddings = !content.tensor_infos.contains_key("output.weight");
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::Unsupported {
            path: p.into(),
            why: "per-frequency RoPE factors (rope_freqs.weight, llama3 scaling); load the Hugging Face checkpoint instead".into(),
        });
    }
    // Only the tensors the model reads: others (e.g. rope_freqs) are never dequantized.
    let names = check_tensor_shapes(&cfg, &content.tensor_infos, p)?;
    let tensors = dequantized(content, reader, names, p, device)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    llama::load(&cfg, vb, Naming::Gguf, "llama").map_err(|e| bad(p, e))
}

/// Gemma 3: every tensor of the file is the model's; a missing or misshapen one is named by
/// the loader.
fn load_gemma3(
    content: &Content,
    reader: &mut BufReader<File>,
    p: &str,
    dtype: DType,
    device: &Device,
) -> Result<Model, ModelError> {
    let cfg =
        gemma3::config_from_gguf(&content.metadata).map_err(|why| ModelError::Unsupported {
            path: p.into(),
            why: format!("invalid gemma3 metadata: {why}"),
        })?;
    let names = content.tensor_infos.keys().cloned();
    let tensors = dequantized(content, reader, names, p, device)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    gemma3::load(&cfg, vb, gemma3::Source::Gguf, "gemma3").map_err(|e| bad(p, e))
}
