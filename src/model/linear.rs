//! The dense layer of every family: candle's [`candle_nn::Linear`], except that on the CPU a
//! few rows at a time (the token engine's one-token steps) go through
//! [`kernels::few_rows_times_transposed`], which reads the weights on every core, and that on
//! the CPU the weights may be stored in bf16 (`--dtype bf16`: half the bytes a token reads)
//! while activations stay f32, packed on huge pages ([`place_weights`]).

use candle_core::{DType, Device, Module, Result, Tensor, WithDType};

use super::{huge_pages, kernels};

/// Weights are packed into allocations of at least this size: all but the first partial huge
/// page of each can be huge pages, and placing holds at most one group in two copies.
const GROUP_BYTES: usize = 64 << 20;

/// Re-stores the weights of `linears` (on the CPU) in `dtype` (f32 or bf16), in their order,
/// packed into allocations of about [`GROUP_BYTES`] on huge pages where the OS grants them
/// (the token engine streams them all every step; see [`huge_pages`]). Biases stay as they are.
pub fn place_weights(linears: &mut [&mut Linear], dtype: DType) -> Result<()> {
    // What loading freed (dequantized and fused copies) goes back before the copies here.
    huge_pages::return_freed_memory();
    let mut start = 0;
    while start < linears.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < linears.len() && bytes < GROUP_BYTES {
            bytes += linears[end].weight().elem_count() * dtype.size_in_bytes();
            end += 1;
        }
        let group = &mut linears[start..end];
        let weights: Vec<&Tensor> = group.iter().map(|l| l.weight()).collect();
        let placed = match dtype {
            DType::F32 => packed::<f32>(&weights)?,
            DType::BF16 => packed::<half::bf16>(&weights)?,
            other => candle_core::bail!("the CPU stores weights in f32 or bf16, not {other:?}"),
        };
        for (linear, weight) in group.iter_mut().zip(placed) {
            **linear = Linear::new(weight, linear.bias().cloned());
        }
        huge_pages::return_freed_memory();
        start = end;
    }
    Ok(())
}

/// `weights` converted to `T` and copied one after another into one buffer on huge pages;
/// returns views of it in their shapes.
fn packed<T: WithDType>(weights: &[&Tensor]) -> Result<Vec<Tensor>> {
    let total = weights.iter().map(|w| w.elem_count()).sum();
    let mut buffer: Vec<T> = Vec::with_capacity(total);
    huge_pages::advise(buffer.spare_capacity_mut());
    let mut offsets = Vec::with_capacity(weights.len());
    for w in weights {
        offsets.push(buffer.len());
        buffer.extend(w.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?);
    }
    huge_pages::collapse(&buffer);
    let buffer = Tensor::from_vec(buffer, total, &Device::Cpu)?;
    (weights.iter().zip(offsets))
        .map(|(w, at)| buffer.narrow(0, at, w.elem_count())?.reshape(w.shape()))
        .collect()
}

/// `y = x W^T + b` with `W` (out_dim, in_dim).
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// (out_dim, in_dim)
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// (out_dim)
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Whether `x` is a few f32 rows on the CPU, the shape the matrix-vector kernel is for.
    fn few_cpu_rows(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.rank() == 2
            && x.dim(0).is_ok_and(|t| t <= kernels::FEW_ROWS)
            && x.dtype() == DType::F32
            && matches!(self.weight().dtype(), DType::F32 | DType::BF16)
    }

    /// Whether f32 activations meet bf16 weights on the CPU (`--dtype bf16` there).
    fn widened_on_cpu(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32 && self.weight().dtype() == DType::BF16
    }
}

impl Module for Linear {
    /// `x` (T, in_dim) -> (T, out_dim).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.few_cpu_rows(x) {
            return kernels::few_rows_times_transposed(x, self.weight(), self.bias());
        }
        if self.widened_on_cpu(x) {
            // Many rows (a block): widen the weight once for the call; gemm does the rest.
            let weight = self.weight().to_dtype(DType::F32)?;
            return candle_nn::Linear::new(weight, self.bias().cloned()).forward(x);
        }
        self.inner.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Two layers of different widths, with and without bias, placed in `dtype`.
    fn placed(dtype: DType) -> (Vec<Linear>, Vec<Linear>) {
        let dev = Device::Cpu;
        let original = vec![
            Linear::new(
                Tensor::randn(0f32, 1.0, (50, 64), &dev).unwrap(),
                Some(Tensor::randn(0f32, 1.0, 50, &dev).unwrap()),
            ),
            Linear::new(Tensor::randn(0f32, 1.0, (30, 50), &dev).unwrap(), None),
        ];
        let mut placed = original.clone();
        place_weights(&mut placed.iter_mut().collect::<Vec<_>>(), dtype).unwrap();
        (original, placed)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        diff.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn placed_f32_weights_are_the_same_weights_in_one_buffer() {
        let (original, placed) = placed(DType::F32);
        for (o, p) in original.iter().zip(&placed) {
            assert_eq!(p.weight().dims(), o.weight().dims());
            assert_eq!(max_diff(p.weight(), o.weight()), 0.0);
            assert_eq!(p.bias().is_some(), o.bias().is_some());
        }
        // One row through the kernel and a block through gemm read the views alike.
        let x = Tensor::randn(0f32, 1.0, (20, 64), &Device::Cpu).unwrap();
        let (row, block) = (x.narrow(0, 3, 1).unwrap(), placed[0].forward(&x).unwrap());
        let want = original[0].forward(&x).unwrap();
        assert!(max_diff(&block, &want) < 1e-5);
        assert!(
            max_diff(
                &placed[0].forward(&row).unwrap(),
                &want.narrow(0, 3, 1).unwrap()
            ) < 1e-5
        );
        let second = placed[1].forward(&block).unwrap();
        assert!(max_diff(&second, &original[1].forward(&want).unwrap()) < 1e-4);
    }

    #[test]
    fn bf16_weights_give_the_same_rows_one_at_a_time_as_in_a_block() {
        let (original, placed) = placed(DType::BF16);
        let lin = &placed[0];
        assert_eq!(lin.weight().dtype(), DType::BF16);
        assert_eq!(lin.bias().unwrap().dtype(), DType::F32);
        assert_eq!(
            max_diff(
                lin.weight(),
                &original[0].weight().to_dtype(DType::BF16).unwrap()
            ),
            0.0
        );
        let x = Tensor::randn(0f32, 1.0, (20, 64), &Device::Cpu).unwrap();
        // 20 rows: the weights widened for gemm; one row: the matrix-vector kernel.
        let block = lin.forward(&x).unwrap();
        for r in 0..20 {
            let row = lin.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
            let diff = max_diff(&row, &block.narrow(0, r, 1).unwrap());
            assert!(diff < 1e-4, "row {r}: {diff}");
        }
    }
}
