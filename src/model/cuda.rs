//! Kernels of our own for the GPU path, in `cuda/attention.cu` (compiled to PTX by build.rs
//! with the CUDA toolkit's nvcc, loaded by the driver on first use).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape};

use super::attention::Visibility;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// The softmax over one or two score parts (heads, rows, n_p) side by side, with the
/// strategy's visibility rule applied to fed indices in the kernel (see `attention.cu`).
/// Its last input is `[q_fed of the pass's n_query queries; k_fed]` (i64); the parts' rows are
/// queries `first_row..first_row + rows` of the pass.
pub struct MaskedSoftmax {
    pub n_query: usize,
    pub first_row: usize,
    pub visibility: Visibility,
    pub window: Option<u64>,
}

type Input<'a> = (&'a CudaStorage, &'a Layout);

impl MaskedSoftmax {
    fn launch(&self, a: Input, b: Option<Input>, fed: Input) -> Result<(CudaStorage, Shape)> {
        let (heads, rows, na) = a.1.shape().dims3()?;
        let nb = match b {
            Some((_, l)) if l.shape().dims3()?.0 != heads || l.shape().dims3()?.1 != rows => {
                candle_core::bail!("masked_softmax parts {:?} and {:?}", a.1.shape(), l.shape())
            }
            Some((_, l)) => l.shape().dims3()?.2,
            None => 0,
        };
        let contiguous = [Some(a), b, Some(fed)].into_iter().flatten();
        if contiguous.clone().any(|(_, l)| !l.is_contiguous()) {
            candle_core::bail!("masked_softmax takes contiguous inputs")
        }
        let args = Args {
            rows: rows as i32,
            na: na as i32,
            nb: nb as i32,
            n_query: self.n_query as i32,
            first_row: self.first_row as i32,
            sinks: clamp_i64(self.visibility.sinks),
            recent: clamp_i64(self.visibility.recent),
            window: clamp_i64(self.window.unwrap_or(u64::MAX)),
        };
        let out = match a.0.dtype() {
            DType::F32 => launch::<f32>("masked_softmax_f32", a, b, fed, heads, &args)?,
            DType::BF16 => launch::<half::bf16>("masked_softmax_bf16", a, b, fed, heads, &args)?,
            DType::F16 => launch::<half::f16>("masked_softmax_f16", a, b, fed, heads, &args)?,
            other => candle_core::bail!("masked_softmax has no {other:?} kernel"),
        };
        Ok((out, Shape::from((heads, rows, na + nb))))
    }
}

fn clamp_i64(x: u64) -> i64 {
    x.min(i64::MAX as u64) as i64
}

/// The kernel's scalar arguments, in its order.
struct Args {
    rows: i32,
    na: i32,
    nb: i32,
    n_query: i32,
    first_row: i32,
    sinks: i64,
    recent: i64,
    window: i64,
}

fn launch<T: CudaDType + DeviceRepr>(
    name: &str,
    a: Input,
    b: Option<Input>,
    fed: Input,
    heads: usize,
    args: &Args,
) -> Result<CudaStorage> {
    let dev = a.0.device();
    let func = dev.get_or_load_custom_func(name, "streamppl_attention", PTX)?;
    let a_view = a.0.as_cuda_slice::<T>()?.slice(a.1.start_offset()..);
    // With no second part the kernel never reads `b` (nb = 0): pass `a` in its place.
    let b_view = match b {
        Some((s, l)) => s.as_cuda_slice::<T>()?.slice(l.start_offset()..),
        None => a.0.as_cuda_slice::<T>()?.slice(a.1.start_offset()..),
    };
    let fed_view = fed.0.as_cuda_slice::<i64>()?.slice(fed.1.start_offset()..);
    let n_rows = heads * args.rows as usize;
    let n = (args.na + args.nb) as usize;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<T>(n_rows * n)? };
    // One block per row; a warp-multiple of threads, no more than the row needs.
    let threads = (n.next_power_of_two()).clamp(32, 256) as u32;
    let cfg = LaunchConfig {
        grid_dim: (n_rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = func.builder();
    builder.arg(&a_view);
    builder.arg(&b_view);
    builder.arg(&out);
    builder.arg(&fed_view);
    candle_core::builder_arg!(
        builder,
        args.rows,
        args.na,
        args.nb,
        args.n_query,
        args.first_row,
        args.sinks,
        args.recent,
        args.window
    );
    // SAFETY: the argument list matches `masked_softmax_*` in attention.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "the fused masked softmax runs on CUDA only (the CPU has its own kernel)"
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.launch((s1, l1), None, (s2, l2))
    }
}

impl CustomOp3 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "the fused masked softmax runs on CUDA only (the CPU has its own kernel)"
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.launch((s1, l1), Some((s2, l2)), (s3, l3))
    }
}
