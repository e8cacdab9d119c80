//! Rotary position embedding tables, built in f64 and cast to f32 (spec section 3: at position
//! 2,000,000 an f32 angle is off by about 0.2 rad).

use candle_core::{Device, Result, Tensor};

/// Positions below this come from a precomputed table; larger ones are computed on demand,
/// so a multi-million-token stream does not need a table of that length.
const TABLE_LEN: usize = 1 << 16;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// Row-major (TABLE_LEN, head_dim / 2).
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
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
        Rope { inv_freq, cos, sin }
    }

    /// `(cos, sin)` tensors of shape (positions.len(), head_dim / 2).
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
