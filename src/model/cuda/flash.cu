// Fused attention for the GPU path (bf16 and f16, head dims 64 and 128), in the manner of
// FlashAttention-2: the scores of a tile of 64 queries against 32 keys at a time stay on chip
// (tensor-core products through WMMA, an online softmax in f32), so no (queries x keys) matrix is
// ever written to memory. The keys each query sees follow the strategy's rule on fed indices
// (sinks, recent window, a layer's own window), and tiles that no query of the block can see are
// skipped. The sink keys (slots 0..n_sink) are scored by the queries placed at their sink
// positions (`q_sink`), the others by the queries at their own positions (`q`): both in one
// softmax. Output rows are written as (query, head, dim), the layout the output projection
// reads. Built to PTX by build.rs when the `cuda` feature is on.
#include <math.h>
#include <climits>
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

#define BQ 64  // queries per block: 4 warps of 16 rows
#define WARPS 4
// Keys per tile: 64 at head dim 64, 32 at 128 (what fits the 48 KB of static shared memory).
#define TILE_KEYS(HD) ((HD) == 64 ? 64 : 32)
// A row's running max is raised only when a tile's max exceeds it by more than this (in nats):
// the probabilities stay below e^8 (well inside f32 and bf16), and the accumulated output is
// rescaled far less often (FlashAttention-3's lazy rescaling).
#define RESCALE_MARGIN 8.0f

struct Rule {
    long long sinks, recent, window;
};

// Row strides of the scores (f32) and probabilities (T) in shared memory: padded past BK so that
// the 16 rows a warp's lanes read side by side fall in different banks (unpadded, every lane of
// the softmax hit the same bank: 32-way conflicts on each score read). WMMA wants multiples of 4
// (f32) and 8 (16-bit) elements.
#define S_LD(BK) ((BK) + 4)
#define P_LD(BK) ((BK) + 8)

// Shared memory of one block; the K and V tiles double as the staging area of the queries.
template <typename T, int HD, int BK> struct Smem {
    T k[BK * HD];
    T v[BK * HD];
    float s[WARPS][16 * S_LD(BK)];
    T p[WARPS][16 * P_LD(BK)];
    float scratch[WARPS][16 * 16];
    float row_scale[WARPS][16];
    long long k_fed[BK];
    long long q_range[2];
    long long k_range[2];
};

// Loads the warp's 16 query rows (zero past `rows`) of `q` (rows, HD) into fragments, staged
// through `stage` (16 x HD elements of this warp's own).
template <typename T, int HD>
__device__ void load_queries(const T *q, int row0, int rows, T *stage,
                             wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> *qa) {
    const int lane = threadIdx.x & 31;
    for (int e = lane; e < 16 * HD; e += 32) {
        const int r = e / HD;
        stage[e] = row0 + r < rows ? q[(long long)(row0 + r) * HD + e % HD] : from_float<T>(0.0f);
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) wmma::load_matrix_sync(qa[kk], stage + kk * 16, HD);
    __syncwarp();
}

// Multiplies each row of the accumulators `o` by row_scale[row], through the warp's scratch.
template <int HD>
__device__ void scale_rows(wmma::fragment<wmma::accumulator, 16, 16, 16, float> *o, float *scratch,
                           const float *row_scale) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < HD / 16; j++) {
        wmma::store_matrix_sync(scratch, o[j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) scratch[e] *= row_scale[e / 16];
        __syncwarp();
        wmma::load_matrix_sync(o[j], scratch, 16, wmma::mem_row_major);
        __syncwarp();
    }
}

// q, q_sink: (nh, rows, HD); k, v: (nkv, n_keys, HD); out: (rows, nh, HD).
// fed: fed indices of the pass's n_query queries, then of the n_keys keys; this call's rows
// are queries first_row .. first_row + rows.
//
// Split keys (splits > 1, blockIdx.z = the split): block z takes the key tiles z, z + splits, ...
// and writes its unnormalized output (rows, nh, HD) to part_o[z] and its running max and sum
// to part_ml[z] (rows, nh, 2), all f32, for flash_combine; with splits = 1 it writes `out`.
template <typename T, int HD, int BK>
__device__ void flash_attention(const T *q, const T *q_sink, const T *k, const T *v, T *out,
                                const long long *fed, int nh, int nkv, int rows, int n_keys,
                                int n_sink, int n_query, int first_row, Rule rule, int splits,
                                float *part_o, float *part_ml) {
    __shared__ __align__(128) Smem<T, HD, BK> sm;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, kvh = h / (nh / nkv);
    const int block_row0 = blockIdx.x * BQ, row0 = block_row0 + warp * 16;
    const long long *q_fed = fed + first_row, *k_fed = fed + n_query;
    q += (long long)h * rows * HD;
    q_sink += (long long)h * rows * HD;
    k += (long long)kvh * n_keys * HD;
    v += (long long)kvh * n_keys * HD;

    // The block's query range, for skipping tiles none of its queries sees.
    if (threadIdx.x == 0) {
        long long lo = LLONG_MAX, hi = LLONG_MIN;
        for (int i = block_row0; i < min(block_row0 + BQ, rows); i++) {
            lo = min(lo, q_fed[i]);
            hi = max(hi, q_fed[i]);
        }
        sm.q_range[0] = lo;
        sm.q_range[1] = hi;
    }

    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[HD / 16];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[HD / 16];
#pragma unroll
    for (int j = 0; j < HD / 16; j++) wmma::fill_fragment(o[j], 0.0f);
    // Two lanes per row: this lane's row of the warp, and its half of the tile's keys (the
    // even or the odd columns).
    const int my_row = lane >> 1, half = lane & 1;
    const int my_query = row0 + my_row;
    const long long t = my_query < rows ? q_fed[my_query] : -1;  // -1: sees nothing
    float m = -INFINITY, l = 0.0f;
    int tile_no = 0;  // key tiles met so far, over both segments
    T *stage = (warp < 2 ? sm.k : sm.v) + (warp & 1) * 16 * HD;

    // Segment 0: the sink slots, scored by q_sink; segment 1: the rest, scored by q.
    for (int segment = 0; segment < 2; segment++) {
        const int seg_start = segment == 0 ? 0 : n_sink, seg_end = segment == 0 ? n_sink : n_keys;
        if (seg_start >= seg_end) continue;
        __syncthreads();  // the K/V tiles double as the staging area
        load_queries<T, HD>(segment == 0 ? q_sink : q, row0, rows, stage, qa);
        for (int start = seg_start; start < seg_end; start += BK) {
            // Another split's tile. (Uniform over the block: no barrier is skipped by some only.)
            if (tile_no++ % splits != (int)blockIdx.z) continue;
            const int n_tile = min(BK, seg_end - start);
            __syncthreads();  // the previous tile (or the staging) is done with sm.k / sm.v
            // Warp 0: the tile's fed indices and their range.
            if (warp == 0) {
                long long lo = LLONG_MAX, hi = LLONG_MIN;
                for (int j = lane; j < BK; j += 32) {
                    const long long f = j < n_tile ? k_fed[start + j] : LLONG_MAX;
                    sm.k_fed[j] = f;
                    if (j < n_tile) {
                        lo = min(lo, f);
                        hi = max(hi, f);
                    }
                }
                for (int o = 16; o > 0; o >>= 1) {
                    lo = min(lo, __shfl_xor_sync(0xffffffff, lo, o));
                    hi = max(hi, __shfl_xor_sync(0xffffffff, hi, o));
                }
                if (lane == 0) {
                    sm.k_range[0] = lo;
                    sm.k_range[1] = hi;
                }
            }
            __syncthreads();
            const long long q_lo = sm.q_range[0], q_hi = sm.q_range[1];
            const long long k_lo = sm.k_range[0], k_hi = sm.k_range[1];
            // No query of the block sees any key of the tile: all in the future, all evicted
            // (no sink among them), or all beyond the layer's window. (Uniform: no divergence.)
            if (k_lo > q_hi || (k_lo >= rule.sinks && q_lo - k_hi > rule.recent) ||
                q_lo - k_hi >= rule.window)
                continue;
            // K and V rows as 16-byte vectors, zero past the tile's keys.
            constexpr int VEC = 16 / sizeof(T), PER_ROW = HD / VEC;
            for (int e = threadIdx.x; e < BK * PER_ROW; e += blockDim.x) {
                const int r = e / PER_ROW, c = (e % PER_ROW) * VEC;
                int4 kv = make_int4(0, 0, 0, 0), vv = make_int4(0, 0, 0, 0);
                if (r < n_tile) {
                    kv = *reinterpret_cast<const int4 *>(k + (long long)(start + r) * HD + c);
                    vv = *reinterpret_cast<const int4 *>(v + (long long)(start + r) * HD + c);
                }
                *reinterpret_cast<int4 *>(sm.k + r * HD + c) = kv;
                *reinterpret_cast<int4 *>(sm.v + r * HD + c) = vv;
            }
            __syncthreads();

            // Scores of the warp's 16 queries against the tile's keys.
#pragma unroll
            for (int n = 0; n < BK / 16; n++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
                wmma::fill_fragment(s, 0.0f);
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
                    wmma::load_matrix_sync(kb, sm.k + n * 16 * HD + kk * 16, HD);
                    wmma::mma_sync(s, qa[kk], kb, s);
                }
                wmma::store_matrix_sync(sm.s[warp] + n * 16, s, S_LD(BK), wmma::mem_row_major);
            }
            __syncwarp();

            // Online softmax over the lane's half row.
            float x[BK / 2];
            float tile_max = -INFINITY;
#pragma unroll
            for (int c = 0; c < BK / 2; c++) {
                const int col = 2 * c + half;
                const bool vis = visible(t, sm.k_fed[col], rule.sinks, rule.recent, rule.window);
                x[c] = vis ? sm.s[warp][my_row * S_LD(BK) + col] : -INFINITY;
                tile_max = fmaxf(tile_max, x[c]);
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
            const float m_new = tile_max > m + RESCALE_MARGIN ? tile_max : m;
            const float scale = m_new == -INFINITY ? 1.0f : expf(m - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < BK / 2; c++) {
                const float p = x[c] == -INFINITY ? 0.0f : expf(x[c] - m_new);
                sum += p;
                sm.p[warp][my_row * P_LD(BK) + 2 * c + half] = from_float<T>(p);
            }
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            l = l * scale + sum;
            m = m_new;
            if (half == 0) sm.row_scale[warp][my_row] = scale;
            __syncwarp();
            if (__any_sync(0xffffffff, scale != 1.0f))
                scale_rows<HD>(o, sm.scratch[warp], sm.row_scale[warp]);

            // O += P V.
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
                wmma::load_matrix_sync(pa, sm.p[warp] + kk * 16, P_LD(BK));
#pragma unroll
                for (int j = 0; j < HD / 16; j++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
                    wmma::load_matrix_sync(vb, sm.v + kk * 16 * HD + j * 16, HD);
                    wmma::mma_sync(o[j], pa, vb, o[j]);
                }
            }
        }
    }

    // out = O / l, for the rows that exist (a row that sees nothing gets zeros); or this
    // split's O, m and l as they are.
    const bool split = splits > 1;
    if (half == 0) sm.row_scale[warp][my_row] = split ? 1.0f : l > 0.0f ? 1.0f / l : 0.0f;
    if (split && half == 0 && my_query < rows) {
        float *ml = part_ml + (((long long)blockIdx.z * rows + my_query) * nh + h) * 2;
        ml[0] = m;
        ml[1] = l;
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < HD / 16; j++) {
        wmma::store_matrix_sync(sm.scratch[warp], o[j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
            const int r = e / 16, query = row0 + r;
            if (query >= rows) continue;
            const long long at = ((long long)query * nh + h) * HD + j * 16 + e % 16;
            const float x = sm.scratch[warp][e] * sm.row_scale[warp][r];
            if (split)
                part_o[(long long)blockIdx.z * rows * nh * HD + at] = x;
            else
                out[at] = from_float<T>(x);
        }
        __syncwarp();
    }
}

// The output of split keys: each (row, head) of one block, HD threads, merges the splits'
// outputs by their running maxima, out = sum_z e^(m_z - M) O_z / sum_z e^(m_z - M) l_z (zeros
// for a row that sees nothing).
template <typename T>
__device__ void flash_combine(const float *part_o, const float *part_ml, T *out, int rows_heads,
                              int splits, int hd) {
    const long long row = blockIdx.x;
    float big = -INFINITY;
    for (int z = 0; z < splits; z++) {
        const float *ml = part_ml + ((long long)z * rows_heads + row) * 2;
        if (ml[1] > 0.0f) big = fmaxf(big, ml[0]);
    }
    float sum = 0.0f, acc = 0.0f;
    for (int z = 0; z < splits; z++) {
        const float *ml = part_ml + ((long long)z * rows_heads + row) * 2;
        if (ml[1] <= 0.0f) continue;
        const float w = expf(ml[0] - big);
        sum += w * ml[1];
        acc += w * part_o[((long long)z * rows_heads + row) * hd + threadIdx.x];
    }
    out[row * hd + threadIdx.x] = from_float<T>(sum > 0.0f ? acc / sum : 0.0f);
}

#define FLASH(SUFFIX, T, HD)                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) flash_attention_##SUFFIX##_##HD(     \
        const T *q, const T *q_sink, const T *k, const T *v, T *out, const long long *fed,          \
        int nh, int nkv, int rows, int n_keys, int n_sink, int n_query, int first_row,              \
        long long sinks, long long recent, long long window, int splits, float *part_o,             \
        float *part_ml) {                                                                          \
        flash_attention<T, HD, TILE_KEYS(HD)>(q, q_sink, k, v, out, fed, nh, nkv, rows, n_keys,    \
                                              n_sink, n_query, first_row,                          \
                                              Rule{sinks, recent, window}, splits, part_o,         \
                                              part_ml);                                            \
    }

#define COMBINE(SUFFIX, T)                                                                        \
    extern "C" __global__ void flash_combine_##SUFFIX(const float *part_o, const float *part_ml,  \
                                                      T *out, int rows_heads, int splits, int hd) { \
        flash_combine<T>(part_o, part_ml, out, rows_heads, splits, hd);                            \
    }

FLASH(bf16, __nv_bfloat16, 64)
FLASH(bf16, __nv_bfloat16, 128)
FLASH(f16, __half, 64)
FLASH(f16, __half, 128)
COMBINE(bf16, __nv_bfloat16)
COMBINE(f16, __half)
