// Fused attention for the GPU path (bf16 and f16, head dims 64 and 128), in the manner of
// FlashAttention-2: a block of 64 queries (4 warps of 16 rows) walks the key tiles; scores,
// probabilities and the output stay in registers (tensor-core `mma.sync` m16n8k16, whose
// accumulator layout is the next product's operand layout, so P never touches memory), with
// an online softmax in f32. K and V tiles reach shared memory by `cp.async`, the next tile's
// while the current one is computed, and reach the tensor cores by `ldmatrix` (V transposed
// on the way). No (queries x keys) matrix is ever written to memory.
//
// The keys each query sees follow the strategy's rule on fed indices (sinks, recent window, a
// layer's own window): tiles no query of the block sees are never loaded, a warp's tiles that
// its 16 queries see whole skip the per-key test. The sink keys (slots 0..n_sink) are scored by
// the queries placed at their sink positions (`q_sink`), the others by the queries at their own
// positions (`q`): both in one softmax. Output rows are written as (query, head, dim), the
// layout the output projection reads. Built to PTX by build.rs when the `cuda` feature is on.
#include <math.h>
#include <climits>

#include "common.cuh"

#define BQ 64  // queries per block: 4 warps of 16 rows
#define WARPS 4
// Keys per tile: 64 at head dim 64, 32 at 128 (two tiles of K and V in 48 KB of static shared
// memory).
#define TILE_KEYS(HD) ((HD) == 64 ? 64 : 32)
// A row's running max is raised only when a tile's max exceeds it by more than this (in nats):
// the probabilities stay below e^8 (well inside f32 and bf16), and the output is rescaled far
// less often (FlashAttention-3's lazy rescaling).
#define RESCALE_MARGIN 8.0f
#define LOG2E 1.4426950408889634f

struct Rule {
    long long sinks, recent, window;
};

// Whether a query with fed indices in [q_lo, q_hi] may see a key in [k_lo, k_hi] (false: none
// of them sees any: all keys in the future, all evicted and no sink, or all past the window).
__device__ __forceinline__ bool may_see(long long q_lo, long long q_hi, long long k_lo,
                                        long long k_hi, Rule r) {
    return k_lo <= q_hi && (k_lo < r.sinks || q_lo - k_hi <= r.recent) && q_lo - k_hi < r.window;
}

// Whether every query in [q_lo, q_hi] sees every key in [k_lo, k_hi].
__device__ __forceinline__ bool sees_all(long long q_lo, long long q_hi, long long k_lo,
                                         long long k_hi, Rule r) {
    return k_hi <= q_lo && (k_hi < r.sinks || q_hi - k_lo <= r.recent) && q_hi - k_lo < r.window;
}

// The tensor-core product d += a b of one warp (m16n8k16, f32 accumulators), and two f32
// packed as the operand type; PTX names the operand type, T2 and TO_T2 are its pair type and
// conversion.
template <typename T> struct Mma;
#define MMA(T, PTX, T2, TO_T2)                                                                    \
    template <> struct Mma<T> {                                                                   \
        static __device__ __forceinline__ void run(float *d, const unsigned *a, unsigned b0,      \
                                                   unsigned b1) {                                 \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                     \
                         ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"          \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));         \
        }                                                                                         \
        static __device__ __forceinline__ unsigned pack(float lo, float hi) {                     \
            T2 v = TO_T2(lo, hi);                                                                 \
            return *reinterpret_cast<unsigned *>(&v);                                             \
        }                                                                                         \
    };
MMA(__nv_bfloat16, "bf16", __nv_bfloat162, __floats2bfloat162_rn)
MMA(__half, "f16", __half2, __floats2half2_rn)

// Four 8x8 matrices of 16-bit elements from shared memory, row addresses from lanes 0-7,
// 8-15, 16-23, 24-31; TRANS hands each lane columns instead of rows.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned *r, const void *smem_row) {
    const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(at));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(at));
}

// 16 bytes from global to shared memory without a register round trip; zeros when !valid.
__device__ __forceinline__ void cp_async_16(void *smem, const void *global, bool valid) {
    const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(at), "l"(global),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all_but_newest() {
    asm volatile("cp.async.wait_group 1;\n");
}

// Minimum and maximum over the warp (every lane gets them).
__device__ __forceinline__ void warp_range(long long &lo, long long &hi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffff, lo, o));
        hi = max(hi, __shfl_xor_sync(0xffffffff, hi, o));
    }
}

// Fed-index range of `n` (<= 64) entries, over the warp.
__device__ __forceinline__ void fed_range(const long long *f, int n, long long &lo,
                                          long long &hi) {
    const int lane = threadIdx.x & 31;
    lo = LLONG_MAX;
    hi = LLONG_MIN;
    for (int i = lane; i < n; i += 32) {
        lo = min(lo, f[i]);
        hi = max(hi, f[i]);
    }
    warp_range(lo, hi);
}

// Key tiles: first those of the sink slots [0, n_sink), then those of [n_sink, n_keys).
struct Tiles {
    int n_sink, n_keys, sink_tiles, total;
    __device__ Tiles(int n_sink, int n_keys, int bk)
        : n_sink(n_sink), n_keys(n_keys), sink_tiles((n_sink + bk - 1) / bk),
          total(sink_tiles + (n_keys - n_sink + bk - 1) / bk) {}
    __device__ int start(int i, int bk) const {
        return i < sink_tiles ? i * bk : n_sink + (i - sink_tiles) * bk;
    }
    __device__ int end(int i, int bk) const {
        return i < sink_tiles ? min(n_sink, (i + 1) * bk) : min(n_keys, start(i, bk) + bk);
    }
};

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
    constexpr int LD = HD + 8;  // padded rows: ldmatrix's 8 row reads fall in distinct banks
    __shared__ __align__(128) T k_tile[2][BK * LD];
    __shared__ __align__(128) T v_tile[2][BK * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, qd = lane & 3;  // the lane's row (and row + 8), its column pair
    const int h = blockIdx.y, kvh = h / (nh / nkv);
    const int block_row0 = blockIdx.x * BQ, row0 = block_row0 + warp * 16;
    const long long *q_fed = fed + first_row, *k_fed = fed + n_query;
    q += (long long)h * rows * HD;
    q_sink += (long long)h * rows * HD;
    k += (long long)kvh * n_keys * HD;
    v += (long long)kvh * n_keys * HD;

    // Fed-index ranges of the block's and of the warp's queries (every warp computes the
    // block's: the same in all, so the tile choices below are uniform over the block).
    long long bq_lo, bq_hi, wq_lo, wq_hi;
    fed_range(q_fed + block_row0, min(BQ, rows - block_row0), bq_lo, bq_hi);
    const bool warp_has_rows = row0 < rows;
    fed_range(q_fed + row0, warp_has_rows ? min(16, rows - row0) : 0, wq_lo, wq_hi);
    // -1: a row past the last sees nothing.
    const long long t0 = row0 + g < rows ? q_fed[row0 + g] : -1;
    const long long t1 = row0 + g + 8 < rows ? q_fed[row0 + g + 8] : -1;

    const Tiles tiles(n_sink, n_keys, BK);
    // The split's next tile after `i` that some query of the block sees, and its key range;
    // -1 when there is none.
    auto next_tile = [&](int i, long long &k_lo, long long &k_hi) {
        for (int j = i < 0 ? (int)blockIdx.z : i + splits; j < tiles.total; j += splits) {
            const int start = tiles.start(j, BK);
            fed_range(k_fed + start, tiles.end(j, BK) - start, k_lo, k_hi);
            if (may_see(bq_lo, bq_hi, k_lo, k_hi, rule)) return j;
        }
        return -1;
    };
    // K and V rows of tile i into buffer b, zeros past the tile's keys.
    auto load_tile = [&](int i, int b) {
        const int start = tiles.start(i, BK), n_tile = tiles.end(i, BK) - start;
        constexpr int PER_ROW = HD / 8;
        for (int e = threadIdx.x; e < BK * PER_ROW; e += WARPS * 32) {
            const int r = e / PER_ROW, c = (e % PER_ROW) * 8;
            const long long at = (long long)(start + min(r, n_tile - 1)) * HD + c;
            cp_async_16(&k_tile[b][r * LD + c], k + at, r < n_tile);
            cp_async_16(&v_tile[b][r * LD + c], v + at, r < n_tile);
        }
    };

    unsigned qa[HD / 16][4];  // the warp's 16 queries as mma operands
    int q_segment = -1;       // which queries qa holds: 0 q_sink, 1 q
    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows g and g + 8

    long long k_lo, k_hi, next_lo, next_hi;
    int tile = next_tile(-1, k_lo, k_hi), buf = 0;
    if (tile >= 0) load_tile(tile, 0);
    cp_async_commit();
    while (tile >= 0) {
        const int next = next_tile(tile, next_lo, next_hi);
        if (next >= 0) load_tile(next, buf ^ 1);
        cp_async_commit();
        cp_async_wait_all_but_newest();
        __syncthreads();  // the tile is in shared memory for every warp

        const int start = tiles.start(tile, BK), n_tile = tiles.end(tile, BK) - start;
        if (warp_has_rows && may_see(wq_lo, wq_hi, k_lo, k_hi, rule)) {
            const int segment = tile < tiles.sink_tiles ? 0 : 1;
            if (segment != q_segment) {
                const T *src = segment == 0 ? q_sink : q;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
                    for (int part = 0; part < 4; part++) {
                        const int row = row0 + g + (part & 1) * 8;
                        const int col = kk * 16 + (part >> 1) * 8 + qd * 2;
                        qa[kk][part] = row < rows ? *reinterpret_cast<const unsigned *>(
                                                        src + (long long)row * HD + col)
                                                  : 0u;
                    }
                }
                q_segment = segment;
            }
            const T *ks = k_tile[buf], *vs = v_tile[buf];

            // Scores of the warp's 16 queries against the tile's BK keys: s[n] holds keys
            // n*8 + qd*2 + {0, 1} of rows g ([0], [1]) and g + 8 ([2], [3]).
            float s[BK / 8][4];
#pragma unroll
            for (int n = 0; n < BK / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
                for (int np = 0; np < BK / 16; np++) {
                    unsigned b[4];
                    const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
                    ldmatrix_x4<false>(b, ks + key * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                    Mma<T>::run(s[2 * np], qa[kk], b[0], b[1]);
                    Mma<T>::run(s[2 * np + 1], qa[kk], b[2], b[3]);
                }
            }
            if (n_tile < BK || !sees_all(wq_lo, wq_hi, k_lo, k_hi, rule)) {
#pragma unroll
                for (int n = 0; n < BK / 8; n++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int col = n * 8 + qd * 2 + e;
                        const long long f = col < n_tile ? k_fed[start + col] : LLONG_MAX;
                        if (!visible(t0, f, rule.sinks, rule.recent, rule.window))
                            s[n][e] = -INFINITY;
                        if (!visible(t1, f, rule.sinks, rule.recent, rule.window))
                            s[n][2 + e] = -INFINITY;
                    }
                }
            }

            // Online softmax: the rows' maxima over the quad that shares them.
            float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                x0 = fmaxf(x0, fmaxf(s[n][0], s[n][1]));
                x1 = fmaxf(x1, fmaxf(s[n][2], s[n][3]));
            }
#pragma unroll
            for (int o2 = 1; o2 < 4; o2 <<= 1) {
                x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, o2));
                x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, o2));
            }
            const float n0 = x0 > m0 + RESCALE_MARGIN ? x0 : m0;
            const float n1 = x1 > m1 + RESCALE_MARGIN ? x1 : m1;
            const float scale0 = n0 == -INFINITY ? 1.0f : exp2f((m0 - n0) * LOG2E);
            const float scale1 = n1 == -INFINITY ? 1.0f : exp2f((m1 - n1) * LOG2E);
            m0 = n0;
            m1 = n1;
            const float base0 = n0 * LOG2E, base1 = n1 * LOG2E;
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    s[n][e] = s[n][e] == -INFINITY ? 0.0f : exp2f(fmaf(s[n][e], LOG2E, -base0));
                    s[n][2 + e] =
                        s[n][2 + e] == -INFINITY ? 0.0f : exp2f(fmaf(s[n][2 + e], LOG2E, -base1));
                    sum0 += s[n][e];
                    sum1 += s[n][2 + e];
                }
            }
            // Each lane keeps its own part of the rows' sums; the quad adds them at the end.
            l0 = l0 * scale0 + sum0;
            l1 = l1 * scale1 + sum1;
            if (__any_sync(0xffffffff, scale0 != 1.0f || scale1 != 1.0f)) {
#pragma unroll
                for (int j = 0; j < HD / 8; j++) {
                    o[j][0] *= scale0;
                    o[j][1] *= scale0;
                    o[j][2] *= scale1;
                    o[j][3] *= scale1;
                }
            }

            // O += P V: the scores' accumulators, packed, are the product's first operand.
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                const unsigned pa[4] = {
                    Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                    Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                    Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
                };
#pragma unroll
                for (int dp = 0; dp < HD / 16; dp++) {
                    unsigned b[4];
                    const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                    ldmatrix_x4<true>(b, vs + key * LD + dp * 16 + (lane >> 4) * 8);
                    Mma<T>::run(o[2 * dp], pa, b[0], b[1]);
                    Mma<T>::run(o[2 * dp + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with the buffer the next load overwrites
        tile = next;
        k_lo = next_lo;
        k_hi = next_hi;
        buf ^= 1;
    }

    // The rows' sums over their quad; out = O / l for the rows that exist (a row that sees
    // nothing gets zeros), or this split's O, m and l as they are.
#pragma unroll
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
        l0 += __shfl_xor_sync(0xffffffff, l0, o2);
        l1 += __shfl_xor_sync(0xffffffff, l1, o2);
    }
    const bool split = splits > 1;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int query = row0 + g + half * 8;
        if (query >= rows) continue;
        const float m = half ? m1 : m0, l = half ? l1 : l0;
        const float r = split ? 1.0f : l > 0.0f ? 1.0f / l : 0.0f;
        if (split && qd == 0) {
            float *ml = part_ml + (((long long)blockIdx.z * rows + query) * nh + h) * 2;
            ml[0] = m;
            ml[1] = l;
        }
        const long long row_at = ((long long)query * nh + h) * HD + qd * 2;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) {
            const float a = o[j][half * 2] * r, b = o[j][half * 2 + 1] * r;
            if (split) {
                float *dst = part_o + (long long)blockIdx.z * rows * nh * HD + row_at + j * 8;
                *reinterpret_cast<float2 *>(dst) = make_float2(a, b);
            } else {
                *reinterpret_cast<unsigned *>(out + row_at + j * 8) = Mma<T>::pack(a, b);
            }
        }
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
