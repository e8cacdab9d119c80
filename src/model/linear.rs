//! The dense layer of every family: candle's [`candle_nn::Linear`], except that on the CPU a
//! few rows at a time (the token engine's one-token steps) go through
//! [`kernels::few_rows_times_transposed`], which reads the weights on every core, and that on
//! the CPU the weights may be stored in bf16 (`--dtype bf16`: half the bytes a token reads)
//! while activations stay f32.

use candle_core::{DType, Module, Result, Tensor};

use super::kernels;

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

    /// The same layer with its weight stored in `dtype` (the bias as it is).
    pub fn with_weight_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self::new(
            self.weight().to_dtype(dtype)?,
            self.bias().cloned(),
        ))
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

    #[test]
    fn bf16_weights_give_the_same_rows_one_at_a_time_as_in_a_block() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (50, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 50, &dev).unwrap();
        let lin = Linear::new(w, Some(b))
            .with_weight_dtype(DType::BF16)
            .unwrap();
        assert_eq!(lin.weight().dtype(), DType::BF16);
        assert_eq!(lin.bias().unwrap().dtype(), DType::F32);
        let x = Tensor::randn(0f32, 1.0, (20, 64), &dev).unwrap();
        // 20 rows: the weights widened for gemm; one row: the matrix-vector kernel.
        let block = lin.forward(&x).unwrap();
        for r in 0..20 {
            let row = lin.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
            let diff = (row - block.narrow(0, r, 1).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "row {r}: {diff}");
        }
    }
}
