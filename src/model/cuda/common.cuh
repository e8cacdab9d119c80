// What attention.cu and flash.cu share: conversions between the storage types and f32, and the
// strategy's visibility rule on fed indices.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
