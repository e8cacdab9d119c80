// The fused kernels of streamppl's GPU path, built to PTX by build.rs when the `cuda` feature
// is on. Accumulation is in f32 whatever the storage type.
// - masked_softmax: one thread block per (head, query) row reads the row's scores from its one
//   or two parts (sink keys, recent keys), applies the strategy's visibility rule to the fed
//   indices on the fly (no dense mask is built or read), and writes the probabilities, exactly
//   0 for hidden keys.
// - nll: one block per row of logits: the log-sum-exp in one online pass, minus the target's
//   logit (the log-softmax is never written out).
// - silu_mul: silu(gate) * up of a fused (rows, 2f) gate-up projection.
#include <math.h>

#include "common.cuh"

// The max (IS_MAX) or sum of `v` over the thread block; every thread gets the result.
template <bool IS_MAX> __device__ float block_reduce(float v, float *shared) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffff, v, o);
        v = IS_MAX ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? shared[lane] : (IS_MAX ? -INFINITY : 0.0f);
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_xor_sync(0xffffffff, v, o);
            v = IS_MAX ? fmaxf(v, w) : v + w;
        }
        if (lane == 0) shared[32] = v;
    }
    __syncthreads();
    const float result = shared[32];
    __syncthreads();  // `shared` is reused by the next reduction
    return result;
}

// Scores a row keeps in registers per thread: rows of up to CACHED x blockDim keys are read
// once; longer ones (dense attention far into a stream) are read three times.
#define CACHED 16

// a: (heads, rows, na) and b: (heads, rows, nb) scores; out: (heads, rows, na + nb).
// fed: the fed indices of all `n_query` queries of the pass, then of the na + nb keys; these
// rows are the queries first_row .. first_row + rows.
template <typename T>
__device__ void masked_softmax(const T *a, const T *b, T *out, const long long *fed, int rows,
                               int na, int nb, int n_query, int first_row, long long sinks,
                               long long recent, long long window) {
    __shared__ float shared[33];
    const long long r = blockIdx.x;
    const long long t = fed[first_row + r % rows];
    const long long *k_fed = fed + n_query;
    const int n = na + nb;
    const T *ra = a + r * na;
    const T *rb = b + r * nb;
    T *ro = out + r * n;
    // The score of key j, -inf where it is hidden.
    auto score = [&](int j) {
        return visible(t, k_fed[j], sinks, recent, window) ? to_float(j < na ? ra[j] : rb[j - na])
                                                           : -INFINITY;
    };
    if (n <= CACHED * (int)blockDim.x) {
        float x[CACHED];
        float m = -INFINITY;
#pragma unroll
        for (int c = 0; c < CACHED; c++) {
            const int j = threadIdx.x + c * blockDim.x;
            x[c] = j < n ? score(j) : -INFINITY;
            m = fmaxf(m, x[c]);
        }
        m = block_reduce<true>(m, shared);
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < CACHED; c++) {
            x[c] = x[c] == -INFINITY ? 0.0f : expf(x[c] - m);
            s += x[c];
        }
        s = block_reduce<false>(s, shared);
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
#pragma unroll
        for (int c = 0; c < CACHED; c++) {
            const int j = threadIdx.x + c * blockDim.x;
            if (j < n) ro[j] = from_float<T>(x[c] * inv);
        }
        return;
    }
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, score(j));
    m = block_reduce<true>(m, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float x = score(j);
        if (x != -INFINITY) s += expf(x - m);
    }
    s = block_reduce<false>(s, shared);
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float x = score(j);
        ro[j] = from_float<T>(x == -INFINITY ? 0.0f : expf(x - m) * inv);
    }
}

#define MASKED_SOFTMAX(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T *a, const T *b, T *out, const long long *fed,          \
                                    int rows, int na, int nb, int n_query, int first_row,          \
                                    long long sinks, long long recent, long long window) {         \
        masked_softmax<T>(a, b, out, fed, rows, na, nb, n_query, first_row, sinks, recent,         \
                          window);                                                                \
    }

MASKED_SOFTMAX(masked_softmax_f32, float)
MASKED_SOFTMAX(masked_softmax_bf16, __nv_bfloat16)
MASKED_SOFTMAX(masked_softmax_f16, __half)

// The (max, sum of exp(x - max)) of a block's online softmax, merged over the block; every
// thread gets the result.
__device__ void block_reduce_lse(float &m, float &s, float *shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    auto merge = [](float &m, float &s, float m2, float s2) {
        const float mm = fmaxf(m, m2);
        if (mm == -INFINITY) return;
        s = s * expf(m - mm) + s2 * expf(m2 - mm);
        m = mm;
    };
    for (int o = 16; o > 0; o >>= 1)
        merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
    if (lane == 0) {
        shared[warp] = m;
        shared[32 + warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? shared[lane] : -INFINITY;
        s = lane < warps ? shared[32 + lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1)
            merge(m, s, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, s, o));
        if (lane == 0) {
            shared[64] = m;
            shared[65] = s;
        }
    }
    __syncthreads();
    m = shared[64];
    s = shared[65];
}

// out[r] = logsumexp(logits[r, :]) - logits[r, targets[r]], for rows of `vocab` logits.
template <typename T>
__device__ void nll(const T *logits, const unsigned int *targets, float *out, int vocab) {
    __shared__ float shared[66];
    const T *x = logits + (long long)blockIdx.x * vocab;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = to_float(x[j]);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    block_reduce_lse(m, s, shared);
    if (threadIdx.x == 0) out[blockIdx.x] = m + logf(s) - to_float(x[targets[blockIdx.x]]);
}

// out (rows, f) = silu(gate_up[:, :f]) * gate_up[:, f:].
template <typename T>
__device__ void silu_mul(const T *gate_up, T *out, long long rows, long long f) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < rows * f;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / f, j = i % f;
        const float g = to_float(gate_up[row * 2 * f + j]);
        const float u = to_float(gate_up[row * 2 * f + f + j]);
        out[i] = from_float<T>(g / (1.0f + expf(-g)) * u);
    }
}

#define NLL_AND_SILU(SUFFIX, T)                                                                   \
    extern "C" __global__ void nll_##SUFFIX(const T *logits, const unsigned int *targets,          \
                                            float *out, int vocab) {                               \
        nll<T>(logits, targets, out, vocab);                                                       \
    }                                                                                              \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *out, long long rows,         \
                                                 long long f) {                                    \
        silu_mul<T>(gate_up, out, rows, f);                                                        \
    }

NLL_AND_SILU(f32, float)
NLL_AND_SILU(bf16, __nv_bfloat16)
NLL_AND_SILU(f16, __half)
