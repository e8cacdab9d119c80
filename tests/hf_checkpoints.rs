//! The default model from a Hugging Face checkpoint: its GGUF weights written as a Hugging Face
//! folder (tensor names of transformers' Llama, Q and K rows back in half-split order, the
//! inverse of llama.cpp's conversion, and its tokenizer as tokenizer.json) must tokenize the
//! same and give the same NLLs as the GGUF, loaded as a folder and as a hub id from a hub cache
//! laid out as `huggingface_hub` does, offline.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use streamppl::corpus::load_corpus;
use streamppl::eval::{EvalOptions, TokenizedCorpus, evaluate};
use streamppl::nll_log::NllLog;
use streamppl::runner::{Compute, LoadedModel, load_model};

use common::default_model_and_corpus;

const HUB_ID: &str = "streamppl-test/SmolLM2-135M-from-gguf";
const COMMIT: &str = "5a1b2c3d4e5f60718293a4b5c6d7e8f901234567";

/// The Hugging Face name of a GGUF Llama tensor.
fn hf_name(gguf: &str) -> String {
    let layer_part = |part: &str| match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => panic!("unexpected GGUF tensor part {other}"),
    };
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        name => {
            let (layer, part) = name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split_once('.'))
                .unwrap_or_else(|| panic!("unexpected GGUF tensor {name}"));
            format!("model.layers.{layer}.{}", layer_part(part))
        }
    }
}

/// GGUF's interleaved Q/K rows (head h, row 2i+j) back to transformers' half-split order
/// (head h, row j*hd/2+i).
fn half_split_rows(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let half = rows / heads / 2;
    w.reshape((heads, half, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
        .contiguous()
        .unwrap()
}

/// Writes `gguf` as a Hugging Face Llama folder in `dir`: config.json, model.safetensors (f32)
/// and tokenizer.json.
fn write_hf_folder(gguf: &Path, lm: &LoadedModel, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut reader = BufReader::new(File::open(gguf).unwrap());
    let content = Content::read(&mut reader).unwrap();
    let md = &content.metadata;
    let u = |key: &str| md[&format!("llama.{key}")].to_u32().unwrap() as usize;
    let f = |key: &str| md[&format!("llama.{key}")].to_f32().unwrap() as f64;
    let (heads, kv_heads) = (u("attention.head_count"), u("attention.head_count_kv"));
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content
            .tensor(&mut reader, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let t = match name.rsplit('.').nth(1) {
            Some("attn_q") => half_split_rows(&t, heads),
            Some("attn_k") => half_split_rows(&t, kv_heads),
            _ => t,
        };
        tensors.insert(hf_name(name), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": lm.model.dims.vocab_size,
        "hidden_size": u("embedding_length"),
        "intermediate_size": u("feed_forward_length"),
        "num_hidden_layers": u("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rope_theta": f("rope.freq_base"),
        "rms_norm_eps": f("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": u("context_length"),
        "tie_word_embeddings": !tensors.contains_key("lm_head.weight"),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    lm.tokenizer.save_json(&dir.join("tokenizer.json")).unwrap();
}

/// Dense NLLs of the first `tokens` tokens of `text` under `lm`, and the token ids.
fn dense_nlls(
    lm: &LoadedModel,
    books: &[streamppl::corpus::Book],
    tokens: u64,
) -> (NllLog, Vec<u32>) {
    let corpus =
        TokenizedCorpus::new(&lm.tokenizer, books.to_vec(), None, &ProgressBar::hidden()).unwrap();
    let mut opts = EvalOptions::new("dense".parse().unwrap());
    opts.max_tokens = Some(tokens - 1);
    let log = evaluate(
        &lm.model,
        &lm.tokenizer,
        &corpus,
        &opts,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let ids = corpus.ids[0][..tokens as usize].to_vec();
    (log, ids)
}

fn max_abs_diff(a: &NllLog, b: &NllLog) -> f32 {
    assert_eq!(a.len(), b.len());
    (a.records.iter().zip(&b.records))
        .map(|(x, y)| (x.nll - y.nll).abs())
        .fold(0f32, f32::max)
}

#[test]
fn the_default_gguf_as_a_hugging_face_folder_and_hub_id_gives_the_same_nlls() {
    let Some((gguf, corpus)) = default_model_and_corpus() else {
        return;
    };
    let tmp = std::env::temp_dir().join(format!("streamppl-hf-ckpt-{}", std::process::id()));
    let hub = tmp.join("hub");
    let repo = hub.join(format!("models--{}", HUB_ID.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(COMMIT);
    let books = load_corpus(&corpus).unwrap()[..1].to_vec();

    let from_gguf = load_model(&gguf, &Compute::cpu()).unwrap();
    write_hf_folder(&gguf, &from_gguf, &snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();

    let (want, want_ids) = dense_nlls(&from_gguf, &books, 2048);
    drop(from_gguf);
    let from_folder = load_model(&snapshot, &Compute::cpu()).unwrap();
    let (got, got_ids) = dense_nlls(&from_folder, &books, 2048);
    assert_eq!(
        got_ids, want_ids,
        "tokenizer.json tokenizes like the GGUF's tokenizer"
    );
    let max = max_abs_diff(&got, &want);
    eprintln!("GGUF vs Hugging Face folder, 2048 tokens dense: max |dNLL| {max:.2e}");
    // Q/K rows reordered to GGUF's order at load: the same sums in the same order.
    assert!(max <= 1e-5, "max |dNLL| {max}");
    let details = from_folder.info.details.clone().unwrap();
    assert_eq!(from_folder.info.architecture, "llama");
    assert!(
        details.positions.starts_with("rope half-split"),
        "{}",
        details.positions
    );
    drop(from_folder);

    // SAFETY: this test binary has one test, and nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", &hub);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let from_hub = load_model(Path::new(HUB_ID), &Compute::cpu()).unwrap();
    // The same files as the folder: the first 256 tokens' NLLs (a shorter run's last block
    // has another shape, so equal up to rounding, not bit for bit).
    let (hub_log, _) = dense_nlls(&from_hub, &books, 256);
    let prefix = NllLog {
        records: got.records[..255].to_vec(),
    };
    assert!(max_abs_diff(&hub_log, &prefix) <= 1e-5);
    let source = serde_json::to_value(&from_hub.info.details.unwrap().source).unwrap();
    assert_eq!(source["kind"], "hub");
    assert_eq!(source["id"], HUB_ID);
    assert_eq!(source["commit"], COMMIT);
    std::fs::remove_dir_all(&tmp).unwrap();
}
