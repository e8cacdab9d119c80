//! A CPU kernel for the LM head's NLL: candle's log-softmax makes six passes over the
//! (rows x vocab) logits with a scalar `exp`, then a gather; this is one pass with a vectorizable
//! `exp`, split over threads. Other devices keep using candle's ops.

use candle_core::{Result, Storage, Tensor};

/// `exp(x)` for f32, to about 2 ulp, written so the compiler vectorizes loops over it: range
/// reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r, then 2^n via exponent bits.
/// Inputs below -87.3 (including -inf, a masked score) give 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest with the 1.5 * 2^23 trick: `f32::round` is a libm call that blocks
    // vectorization on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor terms 1/k! up to k = 7: |r| <= 0.347 keeps the remainder under 2e-9.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from the bits of 2^23 + 127 + n (an exact float): its low bits are the biased exponent.
    // (A float-to-int cast would be a saturating conversion, which does not vectorize.)
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    p * scale
}

/// Sum with eight independent accumulators, so it vectorizes (a single running f32 sum cannot
/// be reordered by the compiler).
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum with eight independent lanes (vectorizes like [`lane_sum`]).
fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Calls `f` with the f32 contents of a contiguous CPU tensor.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("CPU kernel called on a {:?} tensor", t.device())
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
    Ok(f(&data[start..end]))
}

/// Runs `f(first_row, rows_chunk)` over `out` split into contiguous chunks of whole rows, one per thread.
fn par_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// NLL of `targets[i]` under row i of `logits` (rows, vocab): log-sum-exp minus the target's
/// logit, the sum of exponentials accumulated in f64.
pub fn nll_from_logits(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let (rows, vocab) = logits.dims2()?;
    let mut out = vec![0f32; rows];
    with_slice(logits, |l| {
        par_rows(&mut out, 1, |first, chunk| {
            for (i, nll) in chunk.iter_mut().enumerate() {
                let r = first + i;
                let row = &l[r * vocab..(r + 1) * vocab];
                let max = lane_max(row);
                // f32 lanes per block of the row, summed in f64 across blocks.
                let mut block = [0f32; 256];
                let sum: f64 = row
                    .chunks(256)
                    .map(|c| {
                        let b = &mut block[..c.len()];
                        b.iter_mut()
                            .zip(c)
                            .for_each(|(e, &x)| *e = fast_exp(x - max));
                        lane_sum(b) as f64
                    })
                    .sum();
                *nll = ((max as f64 + sum.ln()) - row[targets[r] as usize] as f64) as f32;
            }
        });
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_exp() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (fast_exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}): {got} vs {want}"
            );
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), fast_exp(-87.3));
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn nll_matches_log_softmax() {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 5.0, (9, 1000), &dev).unwrap();
        let targets: Vec<u32> = (0..9).map(|i| i * 97).collect();
        let got = nll_from_logits(&logits, &targets).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, &t) in targets.iter().enumerate() {
            assert!(
                (got[i] + logp[i][t as usize]).abs() < 2e-5,
                "{} vs {}",
                got[i],
                -logp[i][t as usize]
            );
        }
    }
}
