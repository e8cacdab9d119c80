//! The dense layer of every family: candle's [`candle_nn::Linear`], except that on the CPU a
//! few rows at a time (the token engine's one-token steps) go through
//! [`kernels::few_rows_times_transposed`], which reads the weights on every core.

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
            && self.weight().dtype() == DType::F32
    }
}

impl Module for Linear {
    /// `x` (T, in_dim) -> (T, out_dim).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.few_cpu_rows(x) {
            return kernels::few_rows_times_transposed(x, self.weight(), self.bias());
        }
        self.inner.forward(x)
    }
}
