//! Llama models with seeded random weights, for exactness tests and benchmarks that must not
//! depend on a downloaded file.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::decoder::Model;
use super::llama::{self, Config, Naming};

/// `n` pseudo-random token ids below `vocab` (a fixed LCG, so tests are reproducible).
pub fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// SplitMix64: a tiny, well-mixed, seedable generator (no dependency needed).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Every weight of a model of shape `cfg`, as GGUF-named tensors: uniform with a scale that keeps
/// activations O(1), norms near 1, so attention patterns are far from uniform.
pub fn random_weights(cfg: &Config, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64(seed);
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| offset + scale * rng.next_f32()).collect();
        out.push((name, shape, data));
    };
    add(
        "token_embd.weight".into(),
        vec![cfg.vocab_size, d],
        0.5,
        0.0,
    );
    add("output_norm.weight".into(), vec![d], 0.2, 1.0);
    if !cfg.tied_embeddings {
        add("output.weight".into(), vec![cfg.vocab_size, d], 1.0, 0.0);
    }
    let s = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    for i in 0..cfg.n_layer {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), vec![d], 0.2, 1.0);
        add(
            format!("{p}.attn_q.weight"),
            vec![cfg.n_head * hd, d],
            1.5 * s(d),
            0.0,
        );
        add(
            format!("{p}.attn_k.weight"),
            vec![cfg.n_kv_head * hd, d],
            1.5 * s(d),
            0.0,
        );
        add(
            format!("{p}.attn_v.weight"),
            vec![cfg.n_kv_head * hd, d],
            s(d),
            0.0,
        );
        add(
            format!("{p}.attn_output.weight"),
            vec![d, cfg.n_head * hd],
            s(cfg.n_head * hd),
            0.0,
        );
        add(format!("{p}.ffn_norm.weight"), vec![d], 0.2, 1.0);
        add(format!("{p}.ffn_gate.weight"), vec![f, d], s(d), 0.0);
        add(format!("{p}.ffn_up.weight"), vec![f, d], s(d), 0.0);
        add(format!("{p}.ffn_down.weight"), vec![d, f], s(f), 0.0);
    }
    out
}

/// A model of shape `cfg` with [`random_weights`].
pub fn random_llama(cfg: &Config, seed: u64, device: &Device) -> Result<Model> {
    let tensors = random_weights(cfg, seed)
        .into_iter()
        .map(|(name, shape, data)| Ok((name, Tensor::from_vec(data, shape, device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    llama::load(cfg, vb, Naming::Gguf, "llama")
}
