"""The fused attention kernels of src/model/cuda/flash.cu on their own, on a GPU machine with
torch (no Rust): each kernel against a masked softmax computed by torch in f32 (max |diff| at
bf16/f16 rounding level, about 1e-2 and 1e-3, means the same function), over the cases that
exercise its edges (sinks scored by their own queries, rotated cache slots, rows and keys not
multiples of the tiles, a layer window, a pass's later rows, split keys), and timed in
TFLOP/s of the (query, key) pairs the rule lets through. Given a second PTX (a previous
flash.cu), runs the same cases on it, side by side.

  nvcc --ptx -O3 -arch=sm_90 -o flash.ptx src/model/cuda/flash.cu    # here, with build-cuda.sh's nvcc
  python3 scripts/check_flash_kernel.py flash.ptx [previous.ptx]     # there

Kernels are launched through the CUDA driver API with the arguments, grid and block streamppl's
FlashAttention::launch uses."""
import ctypes, sys, torch
cuda = ctypes.CDLL("libcuda.so.1")
torch.zeros(1, device="cuda")
def ok(r):
    assert r == 0, f"CUDA driver error {r}"
def module(path):
    m = ctypes.c_void_p()
    ok(cuda.cuModuleLoadData(ctypes.byref(m), ctypes.c_char_p(open(path, "rb").read() + b"\0")))
    return m
def function(m, name):
    f = ctypes.c_void_p(); ok(cuda.cuModuleGetFunction(ctypes.byref(f), m, name.encode())); return f
MODS = {"this": module(sys.argv[1])}
if len(sys.argv) > 2:
    MODS["previous"] = module(sys.argv[2])
I64MAX = 2**63 - 1
# Past the storage type's rounding of outputs of size ~1 (seen: bf16 <= 1.4e-2, f16 <= 1.6e-3).
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
FAILED = []

def launch(which, q, qs, k, v, fed, nq, first_row, n_sink, rule, splits):
    nh, rows, hd = q.shape; nkv, n_keys, _ = k.shape
    suffix = {torch.bfloat16: "bf16", torch.float16: "f16"}[q.dtype]
    out = torch.empty(rows, nh, hd, dtype=q.dtype, device="cuda")
    # One element, never read, when there is one split.
    part_o = torch.empty(splits * rows * nh * hd if splits > 1 else 1, device="cuda")
    part_ml = torch.empty(splits * rows * nh * 2 if splits > 1 else 1, device="cuda")
    vals = [ctypes.c_void_p(t.data_ptr()) for t in (q, qs, k, v, out, fed)]
    vals += [ctypes.c_int32(x) for x in (nh, nkv, rows, n_keys, n_sink, nq, first_row)]
    vals += [ctypes.c_int64(x) for x in rule] + [ctypes.c_int32(splits)]
    vals += [ctypes.c_void_p(part_o.data_ptr()), ctypes.c_void_p(part_ml.data_ptr())]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(x), ctypes.c_void_p) for x in vals])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    f = function(MODS[which], f"flash_attention_{suffix}_{hd}")
    ok(cuda.cuLaunchKernel(f, (rows + 63) // 64, nh, splits, 128, 1, 1, 0, stream, params, None))
    if splits > 1:
        c = function(MODS[which], f"flash_combine_{suffix}")
        cv = [ctypes.c_void_p(part_o.data_ptr()), ctypes.c_void_p(part_ml.data_ptr()), ctypes.c_void_p(out.data_ptr()),
              ctypes.c_int32(rows * nh), ctypes.c_int32(splits), ctypes.c_int32(hd)]
        cp = (ctypes.c_void_p * len(cv))(*[ctypes.cast(ctypes.byref(x), ctypes.c_void_p) for x in cv])
        ok(cuda.cuLaunchKernel(c, rows * nh, 1, 1, hd, 1, 1, 0, stream, cp, None))
    return out

def visible(q_fed, k_fed, rule):
    """(queries, keys): key j visible from query t under (sinks, recent, window)."""
    t = q_fed[:, None]; j = k_fed[None, :]
    sinks, recent, window = rule
    return (j <= t) & ((j < sinks) | (t - j <= recent)) & (t - j < window)

def reference(q, qs, k, v, q_fed, k_fed, n_sink, rule):
    nh, rows, hd = q.shape; nkv = k.shape[0]
    kk = k.float().repeat_interleave(nh // nkv, 0); vv = v.float().repeat_interleave(nh // nkv, 0)
    s = torch.cat([qs.float() @ kk[:, :n_sink].transpose(1, 2), q.float() @ kk[:, n_sink:].transpose(1, 2)], 2)
    vis = visible(q_fed, k_fed, rule)
    s = s.masked_fill(~vis[None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vv).transpose(0, 1)

def case(nh, nkv, hd, rows, window_keys, block, dtype, rule=(4, 1020, I64MAX), T=10000, rot=777, first_row=0, extra_q=0):
    g = torch.Generator(device="cuda").manual_seed(0)
    n_sink = 4
    body = torch.arange(T - window_keys, T + block, device="cuda")
    body = torch.roll(body, rot)
    k_fed = torch.cat([torch.arange(n_sink, device="cuda"), body])
    n_keys = k_fed.numel()
    nq = first_row + rows + extra_q
    q_fed_all = torch.arange(T - first_row, T - first_row + nq, device="cuda")
    fed = torch.cat([q_fed_all, k_fed]).to(torch.int64).contiguous()
    q = (torch.randn(nh, rows, hd, device="cuda", generator=g) * hd ** -0.5 * 2).to(dtype)
    qs = (torch.randn(nh, rows, hd, device="cuda", generator=g) * hd ** -0.5 * 2).to(dtype)
    k = torch.randn(nkv, n_keys, hd, device="cuda", generator=g).to(dtype)
    v = torch.randn(nkv, n_keys, hd, device="cuda", generator=g).to(dtype)
    return q, qs, k, v, fed, nq, first_row, n_sink, rule, q_fed_all[first_row:first_row + rows], k_fed

def check(name, args, splits_list=(1, 3)):
    q, qs, k, v, fed, nq, first_row, n_sink, rule, q_fed, k_fed = args
    ref = reference(q, qs, k, v, q_fed, k_fed, n_sink, rule)
    for which in MODS:
        for splits in splits_list:
            out = launch(which, q, qs, k, v, fed, nq, first_row, n_sink, rule, splits).float()
            err = (out - ref).abs().max().item()
            print(f"{name:48s} {which} splits={splits}: max |diff| {err:.2e}", flush=True)
            if which == "this" and not err <= TOLERANCE[q.dtype]:
                FAILED.append(f"{name} splits={splits}: max |diff| {err:.2e}")

def timeit(name, args, splits_list=(1, 2, 3)):
    q, qs, k, v, fed, nq, first_row, n_sink, rule, q_fed, k_fed = args
    pairs = int(visible(q_fed, k_fed, rule).sum())
    flops = pairs * q.shape[0] * q.shape[2] * 4
    for which in MODS:
        for splits in splits_list:
            for _ in range(3): launch(which, q, qs, k, v, fed, nq, first_row, n_sink, rule, splits)
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20): launch(which, q, qs, k, v, fed, nq, first_row, n_sink, rule, splits)
            b.record(); torch.cuda.synchronize()
            ms = a.elapsed_time(b) / 20
            print(f"{name:48s} {which} splits={splits}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s (visible pairs)", flush=True)

bf, f16 = torch.bfloat16, torch.float16
check("smol hd64 bf16 rows2048", case(9, 3, 64, 2048, 1020, 2048, bf))
check("7b hd128 bf16 rows2048", case(32, 32, 128, 2048, 1020, 2048, bf), (1, 2))
check("hd64 f16 rows1000 odd keys", case(4, 2, 64, 1000, 1001, 1000, f16))
check("hd128 f16 rows 77 first_row 300 window 40", case(4, 1, 128, 77, 500, 400, f16, rule=(4, 300, 40), first_row=300, extra_q=23))
check("hd64 bf16 dense rows 333", case(2, 1, 64, 333, 0, 333, bf, rule=(0, I64MAX, I64MAX), T=0, rot=0))
check("hd128 bf16 early T (sinks in window)", case(4, 4, 128, 500, 2, 500, bf, T=2))
timeit("smol hd64 bf16 rows2048", case(9, 3, 64, 2048, 1020, 2048, bf), (1, 2, 3, 4))
timeit("smol hd64 bf16 rows4096", case(9, 3, 64, 4096, 1020, 4096, bf), (1, 2))
timeit("7b hd128 bf16 rows2048", case(32, 32, 128, 2048, 1020, 2048, bf), (1, 2))
timeit("7b hd128 bf16 dense 4096", case(32, 32, 128, 4096, 0, 4096, bf, rule=(0, I64MAX, I64MAX), T=0, rot=0), (1,))
if FAILED:
    sys.exit("flash.cu differs from the reference: " + "; ".join(FAILED))
print("flash.cu: every case within tolerance")
