// The fused attention softmax of streamppl's GPU path: one thread block per (head, query) row
// reads the row's scores from its one or two parts (sink keys, recent keys), applies the
// strategy's visibility rule to the fed indices on the fly (no dense mask is built or read),
// and writes the probabilities, exactly 0 for hidden keys. Accumulation is in f32 whatever the
// storage type. Built to PTX by build.rs when the `cuda` feature is on.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Key j is visible from query t: j <= t, and j is a sink or at most `recent` back, and fewer
// than `window` back (the layer's own sliding window; LLONG_MAX when it has none).
__device__ __forceinline__ bool visible(long long t, long long j, long long sinks, long long recent,
                                        long long window) {
    return j <= t && (j < sinks || t - j <= recent) && t - j < window;
}

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
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        if (visible(t, k_fed[j], sinks, recent, window))
            m = fmaxf(m, to_float(j < na ? ra[j] : rb[j - na]));
    }
    m = block_reduce<true>(m, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        if (visible(t, k_fed[j], sinks, recent, window))
            s += expf(to_float(j < na ? ra[j] : rb[j - na]) - m);
    }
    s = block_reduce<false>(s, shared);
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float p = 0.0f;
        if (visible(t, k_fed[j], sinks, recent, window))
            p = expf(to_float(j < na ? ra[j] : rb[j - na]) - m) * inv;
        ro[j] = from_float<T>(p);
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
