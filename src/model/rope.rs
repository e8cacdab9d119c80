//! Rotary position embedding: frequencies (with the RoPE scalings of `config.json`), and cos/sin
//! tables built in f64 and cast to f32 (spec section 3: at position 2,000,000 an f32 angle is off
//! by about 0.2 rad).

use candle_core::{Device, Result, Tensor};

/// Positions below this come from a precomputed table; larger ones are computed on demand,
/// so a multi-million-token stream does not need a table of that length.
const TABLE_LEN: usize = 1 << 16;

/// Which channels of a head rotate together (spec section 3b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairLayout {
    /// Channels 2i and 2i+1 (GGUF's Llama tensors).
    Interleaved,
    /// Channels i and i + rotary_dim/2 (Hugging Face checkpoints).
    HalfSplit,
}

/// How a checkpoint rescales RoPE frequencies (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions compressed).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
}

impl RopeScaling {
    /// The scaled inverse frequency of one pair (transformers' `_compute_llama3_parameters`).
    fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < original_context / high_freq_factor {
                    inv_freq
                } else if wavelen > original_context / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rope {
    pub layout: PairLayout,
    /// Channels of each head that rotate (the first ones); the rest carry no position.
    pub rotary_dim: usize,
    inv_freq: Vec<f64>,
    /// Row-major (TABLE_LEN, rotary_dim / 2).
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(rotary_dim: usize, theta: f64, scaling: &RopeScaling, layout: PairLayout) -> Self {
        let inv_freq: Vec<f64> = (0..rotary_dim / 2)
            .map(|i| scaling.apply(theta.powf(-((2 * i) as f64) / rotary_dim as f64)))
            .collect();
        let mut cos = Vec::with_capacity(TABLE_LEN * inv_freq.len());
        let mut sin = Vec::with_capacity(TABLE_LEN * inv_freq.len());
        for p in 0..TABLE_LEN {
            for &f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope {
            layout,
            rotary_dim,
            inv_freq,
            cos,
            sin,
        }
    }

    /// `(cos, sin)` tensors of shape (positions.len(), rotary_dim / 2).
    pub fn cos_sin(&self, positions: &[u64], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            if (p as usize) < TABLE_LEN {
                let row = p as usize * half..(p as usize + 1) * half;
                cos.extend_from_slice(&self.cos[row.clone()]);
                sin.extend_from_slice(&self.sin[row]);
            } else {
                for &f in &self.inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        // Wavelength 2pi/1 = 6.3 tokens: far below 8192/4, kept.
        assert_eq!(s.apply(1.0), 1.0);
        // Wavelength 2pi/1e-5 = 628,000 tokens: above 8192, divided by the factor.
        assert_eq!(s.apply(1e-5), 1e-5 / 8.0);
        // Wavelength 4096 (between 2048 and 8192): blended, smooth = 8192/4096 - 1 = 1/3.
        let f = 2.0 * std::f64::consts::PI / 4096.0;
        let want = (2.0 / 3.0) * f / 8.0 + (1.0 / 3.0) * f;
        assert!((s.apply(f) - want).abs() < 1e-15);
        assert_eq!(RopeScaling::Linear { factor: 2.0 }.apply(0.5), 0.25);
    }
}
