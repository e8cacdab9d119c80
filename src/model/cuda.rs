//! Kernels of our own for the GPU path, in `cuda/attention.cu` (compiled to PTX by build.rs
//! with the CUDA toolkit's nvcc, loaded by the driver on first use).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg, sys};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape,
};

use super::attention::Visibility;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "streamppl_attention";
/// Scores per thread the softmax keeps in registers (`CACHED` in attention.cu).
const CACHED: usize = 16;

/// Readies a freshly opened `device` for the engines' many small launches, before any tensor
/// is made on it:
/// - the memory freed on it stays in its stream-ordered pool instead of going back to the
///   driver at every synchronization (the pool's default release threshold is 0): the engines
///   synchronize once per block to read its NLLs, and mapping a block's activations afresh
///   after each one cost more than computing the block (on an H200, 1 GiB of logits per block
///   of 2048 tokens took a SmolLM2-shaped run from 66k to 3.9k tok/s);
/// - no CUDA events are made for each allocation: cudarc creates two per buffer (and destroys
///   them with it) to order uses across streams, driver calls on every candle op, and
///   streamppl runs on the one stream of the one thread that opened the device.
pub fn prepare(device: &CudaDevice) -> Result<()> {
    let context = device.cuda_stream().context().clone();
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a valid device; the attribute's value is a u64. Without
    // event tracking, cudarc leaves the ordering of uses across streams to its user: there is
    // one stream, and no tensor exists yet.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .w()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .w()?;
        device.disable_event_tracking();
    }
    Ok(())
}

/// The CPU side of every op here: the CPU runs its own kernels (`super::kernels`).
fn cuda_only<T>(op: &str) -> Result<T> {
    candle_core::bail!("{op} runs on CUDA only (the CPU has its own kernels)")
}

/// `$launch::<T>($args)` for the element type `T` of `$dtype` (f32, bf16 or f16).
macro_rules! by_dtype {
    ($dtype:expr, $($launch:ident)::+, $($args:expr),* $(,)?) => {
        match $dtype {
            DType::F32 => $($launch)::+::<f32>($($args),*),
            DType::BF16 => $($launch)::+::<half::bf16>($($args),*),
            _ => $($launch)::+::<half::f16>($($args),*),
        }
    };
}

/// The kernel `name`_f32, `_bf16` or `_f16` for `dtype`.
fn kernel(name: &str, dtype: DType) -> Result<String> {
    Ok(format!("{name}_{}", kernel_suffix(dtype)?))
}

/// `f32`, `bf16` or `f16`: how a kernel's name says its element type.
fn kernel_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("no {other:?} kernel"),
    })
}

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
        let inputs = [Some(a), b, Some(fed)];
        if inputs.iter().flatten().any(|(_, l)| !l.is_contiguous()) {
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
        let name = kernel("masked_softmax", a.0.dtype())?;
        let out = by_dtype!(a.0.dtype(), launch, &name, a, b, fed, heads, &args)?;
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
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
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
    // One block per row, with enough threads (a warp-multiple) for the row to fit in registers.
    let threads = n.div_ceil(CACHED).next_power_of_two().clamp(32, 1024) as u32;
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
        cuda_only("the fused masked softmax")
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
        cuda_only("the fused masked softmax")
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

/// The NLL of each row's target under the log-softmax of its logits (rows, vocab), in f32
/// whatever the logits' dtype; the second input holds the targets (rows) as u32.
pub struct Nll;

impl Nll {
    fn launch<T: CudaDType + DeviceRepr>(
        logits: Input,
        targets: Input,
        name: &str,
    ) -> Result<CudaStorage> {
        let (rows, vocab) = logits.1.shape().dims2()?;
        let dev = logits.0.device();
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let x = logits
            .0
            .as_cuda_slice::<T>()?
            .slice(logits.1.start_offset()..);
        let t = targets
            .0
            .as_cuda_slice::<u32>()?
            .slice(targets.1.start_offset()..);
        // SAFETY: the kernel writes every row.
        let out = unsafe { dev.alloc::<f32>(rows)? };
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&t);
        builder.arg(&out);
        candle_core::builder_arg!(builder, vocab as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches `nll_*` in attention.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(f32::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp2 for Nll {
    fn name(&self) -> &'static str {
        "nll"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only("the fused NLL")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, _) = l1.shape().dims2()?;
        if !l1.is_contiguous() || !l2.is_contiguous() || l2.shape().dims1()? != rows {
            candle_core::bail!("nll takes contiguous logits (rows, vocab) and targets (rows)")
        }
        let name = kernel("nll", s1.dtype())?;
        let out = by_dtype!(s1.dtype(), Self::launch, (s1, l1), (s2, l2), &name)?;
        Ok((out, Shape::from(rows)))
    }
}

/// `silu(gate) * up` of a fused (rows, 2f) gate-up projection: (rows, f).
pub struct SiluMul;

impl SiluMul {
    fn launch<T: CudaDType + DeviceRepr>(x: Input, name: &str) -> Result<CudaStorage> {
        let (rows, two_f) = x.1.shape().dims2()?;
        let dev = x.0.device();
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let src = x.0.as_cuda_slice::<T>()?.slice(x.1.start_offset()..);
        let n = rows * two_f / 2;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        candle_core::builder_arg!(builder, rows as i64, (two_f / 2) as i64);
        let cfg = LaunchConfig::for_num_elems(n as u32);
        // SAFETY: the argument list matches `silu_mul_*` in attention.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only("the fused silu_mul")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, two_f) = l.shape().dims2()?;
        if !l.is_contiguous() || !two_f.is_multiple_of(2) {
            candle_core::bail!("silu_mul takes a contiguous (rows, 2f) tensor")
        }
        let name = kernel("silu_mul", s.dtype())?;
        let out = by_dtype!(s.dtype(), Self::launch, (s, l), &name)?;
        Ok((out, Shape::from((rows, two_f / 2))))
    }
}

/// The elements of `storage` from `offset` on.
fn view<T: CudaDType>(
    storage: &CudaStorage,
    offset: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>> {
    Ok(storage.as_cuda_slice::<T>()?.slice(offset..))
}

/// The CUDA storage of a tensor's storage.
fn on_gpu(storage: &candle_core::Storage) -> Result<&CudaStorage> {
    match storage {
        candle_core::Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("flash attention inputs must all be on the GPU"),
    }
}

/// Whether `STREAMPPL_ATTENTION=materialized` asks for the attention with its scores written
/// out (the path f32 and ALiBi take) instead of the fused kernel: a switch for comparing the two.
pub fn materialized_attention_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("STREAMPPL_ATTENTION").is_ok_and(|v| v == "materialized"))
}

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const FLASH_MODULE: &str = "streamppl_flash";

/// Attention with the scores kept on chip (`flash.cu`): queries (nh, rows, hd), keys and values
/// (nkv, n_keys, hd), all placed and contiguous, bf16 or f16, hd 64 or 128; returns
/// (rows, nh, hd). The op's inputs are (q, k, v); the sink queries and the fed indices
/// `[q_fed of the pass's n_query queries; k_fed]` (i64) ride along in the op.
pub struct FlashAttention {
    pub q_sink: Option<candle_core::Tensor>,
    pub n_sink: usize,
    pub fed: candle_core::Tensor,
    pub n_query: usize,
    pub first_row: usize,
    pub visibility: Visibility,
    pub window: Option<u64>,
}

impl FlashAttention {
    /// Whether the kernel covers queries of this dtype and head dimension.
    pub fn supports(dtype: DType, head_dim: usize) -> bool {
        matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        q: Input,
        k: Input,
        v: Input,
    ) -> Result<CudaStorage> {
        let (nh, rows, hd) = q.1.shape().dims3()?;
        let (nkv, n_keys, _) = k.1.shape().dims3()?;
        let q_sink = self.q_sink.as_ref().map(|t| t.storage_and_layout());
        let (fed, fed_layout) = self.fed.storage_and_layout();
        let (q_sink_storage, q_sink_offset) = match &q_sink {
            Some((s, l)) => (on_gpu(s)?, l.start_offset()),
            None => (q.0, q.1.start_offset()),
        };
        let fed = on_gpu(&fed)?;
        let dev = q.0.device();
        let name = format!("flash_attention_{}_{hd}", kernel_suffix(q.0.dtype())?);
        let func = dev.get_or_load_custom_func(&name, FLASH_MODULE, FLASH_PTX)?;
        let (qv, qsv) = (
            view::<T>(q.0, q.1.start_offset())?,
            view::<T>(q_sink_storage, q_sink_offset)?,
        );
        let (kv, vv) = (
            view::<T>(k.0, k.1.start_offset())?,
            view::<T>(v.0, v.1.start_offset())?,
        );
        let fv = fed
            .as_cuda_slice::<i64>()?
            .slice(fed_layout.start_offset()..);
        let query_blocks = rows.div_ceil(64) * nh;
        let splits = key_splits(dev, query_blocks)?;
        // SAFETY: the kernel (splits = 1) or the combine (splits > 1) writes every (row, head,
        // dim) of the output; each split writes all of its part of `part_o` and `part_ml`.
        let out = unsafe { dev.alloc::<T>(rows * nh * hd)? };
        // The splits' outputs, then their (max, sum) pairs, in one buffer (one element, never
        // read, when there is one split).
        let o_len = splits * rows * nh * hd;
        let parts = match splits {
            1 => unsafe { dev.alloc::<f32>(1)? },
            _ => unsafe { dev.alloc::<f32>(o_len + splits * rows * nh * 2)? },
        };
        let (part_o, part_ml) = match splits {
            1 => (parts.slice(0..), parts.slice(0..)),
            _ => (parts.slice(0..o_len), parts.slice(o_len..)),
        };
        let mut builder = func.builder();
        for arg in [&qv, &qsv, &kv, &vv] {
            builder.arg(arg);
        }
        builder.arg(&out);
        builder.arg(&fv);
        candle_core::builder_arg!(
            builder,
            nh as i32,
            nkv as i32,
            rows as i32,
            n_keys as i32,
            self.n_sink as i32,
            self.n_query as i32,
            self.first_row as i32,
            clamp_i64(self.visibility.sinks),
            clamp_i64(self.visibility.recent),
            clamp_i64(self.window.unwrap_or(u64::MAX)),
            splits as i32
        );
        builder.arg(&part_o);
        builder.arg(&part_ml);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, nh as u32, splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches `flash_attention_*` in flash.cu.
        unsafe { builder.launch(cfg) }.w()?;
        if splits > 1 {
            let name = format!("flash_combine_{}", kernel_suffix(q.0.dtype())?);
            let func = dev.get_or_load_custom_func(&name, FLASH_MODULE, FLASH_PTX)?;
            let mut builder = func.builder();
            builder.arg(&part_o);
            builder.arg(&part_ml);
            builder.arg(&out);
            candle_core::builder_arg!(builder, (rows * nh) as i32, splits as i32, hd as i32);
            let cfg = LaunchConfig {
                grid_dim: ((rows * nh) as u32, 1, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list matches `flash_combine_*` in flash.cu.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

/// Thread blocks per multiprocessor the attention aims to have in flight: the kernel's blocks
/// are 4 warps, and one warp per 16 query rows leaves a small model's block of queries (SmolLM2:
/// 9 heads, 2048 queries, 288 blocks on 132 multiprocessors) with too few warps to hide the
/// latency of its key tiles.
const BLOCKS_PER_SM: usize = 8;

/// Into how many interleaved sets of key tiles the attention of `query_blocks` blocks of 64
/// queries is split (1 to 4), so that the GPU has about `BLOCKS_PER_SM` blocks per
/// multiprocessor; `STREAMPPL_KEY_SPLITS` overrides it (a switch for measuring).
fn key_splits(dev: &CudaDevice, query_blocks: usize) -> Result<usize> {
    static FORCED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        std::env::var("STREAMPPL_KEY_SPLITS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = forced {
        return Ok((*n).clamp(1, 16));
    }
    // Read once: this runs for every layer of every forward pass (one device per process).
    static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let sms = match SMS.get() {
        Some(&n) => n,
        None => {
            let n = (dev.cuda_stream().context())
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .w()? as usize;
            *SMS.get_or_init(|| n)
        }
    };
    Ok((sms * BLOCKS_PER_SM / query_blocks.max(1)).clamp(1, 4))
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        cuda_only("flash attention")
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
        let (nh, rows, hd) = l1.shape().dims3()?;
        let (nkv, _, khd) = l2.shape().dims3()?;
        let sink_layout = self.q_sink.as_ref().map(|t| t.layout().clone());
        // 16-byte rows of K and V, contiguous inputs, whole groups of query heads per KV head.
        let aligned = |l: &Layout| l.is_contiguous() && l.start_offset().is_multiple_of(8);
        if !FlashAttention::supports(s1.dtype(), hd)
            || khd != hd
            || nkv == 0
            || !nh.is_multiple_of(nkv)
            || ![l1, l2, l3]
                .into_iter()
                .chain(sink_layout.as_ref())
                .all(aligned)
        {
            candle_core::bail!("flash attention got q {:?}, k {:?}", l1.shape(), l2.shape())
        }
        let out = match s1.dtype() {
            DType::BF16 => self.launch::<half::bf16>((s1, l1), (s2, l2), (s3, l3))?,
            _ => self.launch::<half::f16>((s1, l1), (s2, l2), (s3, l3))?,
        };
        Ok((out, Shape::from((rows, nh, hd))))
    }
}
