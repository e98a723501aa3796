// Kernels of qatflow's CUDA decoder (crates/model/src/run/cuda), compiled at run time by
// NVRTC. Activations are float32; weights are bfloat16 or float32. Every kernel reads its
// rows' metadata (token id, position, key and value cache addresses) from `meta`, four
// 64-bit words per row.

typedef unsigned short bf16;
typedef unsigned long long u64;

#define META_ID 0
#define META_POS 1
#define META_KEYS 2
#define META_VALUES 3
#define META_WORDS 4

// Most input rows one GEMV call takes (the host splits larger steps).
#define GEMV_MAX_ROWS 16

// Negative infinity (NVRTC has no math.h).
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float from_bf16(bf16 v) {
    return __uint_as_float(((unsigned)v) << 16);
}

// Round to nearest even, NaN kept a (quiet) NaN.
__device__ __forceinline__ bf16 to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets it. Called by every
// thread of the block.
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    float t = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f;
    return warp_sum(t);
}

// ---- NVFP4 fake quantization (the arithmetic of qatflow_nvfp4::codec) ----

// E4M3 byte of a positive value already clamped to [2^-9, 448].
__device__ unsigned fp8_encode(float a) {
    if (a >= 448.0f) {
        return 0x7Eu;
    }
    if (a < 1.0f / 64.0f) {
        return (unsigned)rintf(a * 512.0f);
    }
    const int e = (int)((__float_as_uint(a) >> 23) & 0xFFu) - 127;
    const unsigned m = (unsigned)rintf(a * ldexpf(1.0f, 3 - e));
    return ((unsigned)(e + 7) << 3) + (m - 8u);
}

// A non-negative E4M3 byte's value.
__device__ float fp8_decode(unsigned b) {
    const int e = (int)((b >> 3) & 15u);
    const float m = (float)(b & 7u);
    return e == 0 ? m * (1.0f / 512.0f) : ldexpf(8.0f + m, e - 10);
}

// The E2M1 value nearest to `x` (ties to the even code, saturating at 6; ModelOpt's rule).
__device__ __forceinline__ float e2m1_round(float x) {
    const float a = fabsf(x);
    int mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f)
        + (a > 5.0f);
    if (a != a) {
        mag = 7;
    }
    const float values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const float v = values[mag];
    return (x < 0.0f && mag != 0) ? -v : v;
}

// Replaces a block of 16 values by their dequantized NVFP4 values under global scale
// `scale_2` (qatflow_nvfp4::codec::fake_quantize_block).
__device__ void fake_quantize_block(float* v, float scale_2) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const float s = amax / (6.0f * scale_2);
    const unsigned scale =
        s == 0.0f ? 0x38u : fp8_encode(fminf(fmaxf(s, 1.0f / 512.0f), 448.0f));
    const float step = fp8_decode(scale) * scale_2;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        v[i] = e2m1_round(v[i] / step) * step;
    }
}

// ---- kernels ----

// x[r] = table[id of row r]. Grid: rows.
extern "C" __global__ void embed_bf16(const bf16* table, const u64* meta, float* x, int hidden) {
    const bf16* row = table + meta[blockIdx.x * META_WORDS + META_ID] * (u64)hidden;
    float* out = x + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[i] = from_bf16(row[i]);
    }
}

extern "C" __global__ void embed_f32(const float* table, const u64* meta, float* x, int hidden) {
    const float* row = table + meta[blockIdx.x * META_WORDS + META_ID] * (u64)hidden;
    float* out = x + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[i] = row[i];
    }
}

// The input of a projection, one block per row: `mode` 0 copies row `r` of `x` (stride
// `x_ld`), 1 RMS-normalizes it with `weight`, 2 is SwiGLU of `[gate | up]` (width 2k);
// then, when `scale_2 > 0`, NVFP4 fake quantization in blocks of 16. Writes `k` values per
// row to `out` (float32) or `out_bf16`, whichever is not null. k is a multiple of 16.
extern "C" __global__ void prep(const float* x, int x_ld, float* out, bf16* out_bf16, int k,
                                int mode, const float* weight, float eps, float scale_2) {
    __shared__ float red[32];
    const float* row = x + (size_t)blockIdx.x * x_ld;
    float inv = 1.0f;
    if (mode == 1) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < k; i += blockDim.x) {
            ss += row[i] * row[i];
        }
        ss = block_sum(ss, red);
        inv = 1.0f / sqrtf(ss / (float)k + eps);
    }
    for (int b = threadIdx.x; b < k / 16; b += blockDim.x) {
        float v[16];
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int c = b * 16 + i;
            if (mode == 1) {
                v[i] = row[c] * inv * weight[c];
            } else if (mode == 2) {
                const float g = row[c];
                v[i] = g / (1.0f + expf(-g)) * row[k + c];
            } else {
                v[i] = row[c];
            }
        }
        if (scale_2 > 0.0f) {
            fake_quantize_block(v, scale_2);
        }
        const size_t at = (size_t)blockIdx.x * k + b * 16;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (out) {
                out[at + i] = v[i];
            } else {
                out_bf16[at + i] = to_bf16(v[i]);
            }
        }
    }
}

__device__ __forceinline__ void load8(const bf16* p, float* w) {
    const uint4 raw = *(const uint4*)p;
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w[2 * i] = __uint_as_float(words[i] << 16);
        w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void load8(const float* p, float* w) {
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
    w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
}

// y[j, o] (+)= x[j, :] · w[o, :] for n ≤ GEMV_MAX_ROWS input rows: one warp per output
// feature `o`, reading its weight row once for all input rows. k is a multiple of 8.
template <typename W>
__device__ void gemv(const float* x, const W* w, float* y, int n, int k, int rows, int y_ld,
                     int accumulate) {
    const int o = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (o >= rows) {
        return;
    }
    const W* wr = w + (size_t)o * k;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int j = 0; j < GEMV_MAX_ROWS; j++) {
        acc[j] = 0.0f;
    }
    for (int c = lane * 8; c < k; c += 256) {
        float wv[8];
        load8(wr + c, wv);
#pragma unroll
        for (int j = 0; j < GEMV_MAX_ROWS; j++) {
            if (j < n) {
                float xv[8];
                load8(x + (size_t)j * k + c, xv);
                float s = acc[j];
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    s += wv[i] * xv[i];
                }
                acc[j] = s;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < GEMV_MAX_ROWS; j++) {
        if (j < n) {
            const float s = warp_sum(acc[j]);
            if (lane == 0) {
                float* out = y + (size_t)j * y_ld + o;
                *out = accumulate ? *out + s : s;
            }
        }
    }
}

extern "C" __global__ void gemv_bf16(const float* x, const bf16* w, float* y, int n, int k,
                                     int rows, int y_ld, int accumulate) {
    gemv(x, w, y, n, k, rows, y_ld, accumulate);
}

extern "C" __global__ void gemv_f32(const float* x, const float* w, float* y, int n, int k,
                                    int rows, int y_ld, int accumulate) {
    gemv(x, w, y, n, k, rows, y_ld, accumulate);
}

// After the q/k/v projection (rows of `[q heads | k heads | v heads]`, width `width`): q and
// k heads RMS-normed per head when their norm weight is given (Qwen3), rotated (RoPE, per
// row `cos`/`sin` of width hd); q written to `q_out` `[rows, heads, hd]`, k and v to the
// row's cache at its position. Grid: (rows, heads + 2 kv_heads); block: hd rounded up to a
// multiple of 32 (hd even, at most 256).
extern "C" __global__ void qkv_post(const float* qkv, int width, const float* cos,
                                    const float* sin, const float* q_norm, const float* k_norm,
                                    float eps, float* q_out, const u64* meta, int heads,
                                    int kv_heads, int hd, int layer, int layers) {
    __shared__ float red[32];
    __shared__ float head[256];
    const int r = blockIdx.x, slot = blockIdx.y, t = threadIdx.x;
    const bool on = t < hd;
    float v = on ? qkv[(size_t)r * width + (size_t)slot * hd + t] : 0.0f;
    const u64* m = meta + (size_t)r * META_WORDS;
    const u64 cell = ((m[META_POS] * (u64)layers + (u64)layer) * (u64)kv_heads) * (u64)hd;
    if (slot >= heads + kv_heads) {
        if (on) {
            float* values = (float*)m[META_VALUES];
            values[cell + (u64)(slot - heads - kv_heads) * hd + t] = v;
        }
        return;
    }
    const float* norm = slot < heads ? q_norm : k_norm;
    if (norm) {
        const float ss = block_sum(v * v, red);
        const float inv = 1.0f / sqrtf(ss / (float)hd + eps);
        v = on ? v * inv * norm[t] : 0.0f;
    }
    if (on) {
        head[t] = v;
    }
    __syncthreads();
    if (!on) {
        return;
    }
    const int half = hd / 2;
    const float c = cos[(size_t)r * hd + t], s = sin[(size_t)r * hd + t];
    const float rotated = t < half ? v * c + (-head[t + half]) * s : v * c + head[t - half] * s;
    if (slot < heads) {
        q_out[((size_t)r * heads + slot) * hd + t] = rotated;
    } else {
        float* keys = (float*)m[META_KEYS];
        keys[cell + (u64)(slot - heads) * hd + t] = rotated;
    }
}

// Attention of each row over its own cache, positions 0..=its position, split into runs of
// `span` positions (grid z): one block of warps per (row, head, run), each warp taking four
// positions at a time (their loads in flight together) with an online softmax, the warps
// merged at the end. With one run (gridDim.z == 1) the block writes the row's output;
// otherwise its unnormalized partial `[acc (hd), max, sum]` goes to `partials`
// `[rows, heads, runs, hd + 2]` for `attend_merge`. hd is at most 256. Block: 256 threads.
extern "C" __global__ void attend_rows(const float* q, float* out, float* partials,
                                       const u64* meta, int heads, int kv_heads, int hd,
                                       int layer, int layers, float scale, int span) {
    __shared__ float partial[8 * (256 + 2)];
    const int r = blockIdx.x, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int kvh = h / (heads / kv_heads);
    const u64* m = meta + (size_t)r * META_WORDS;
    const u64 last = m[META_POS];
    const u64 begin = (u64)blockIdx.z * (u64)span;
    const u64 end = min(begin + (u64)span - 1, last);
    const float* keys = (const float*)m[META_KEYS];
    const float* values = (const float*)m[META_VALUES];
    const u64 stride = (u64)layers * kv_heads * hd;
    const u64 base = ((u64)layer * kv_heads + kvh) * hd;
    const float* qr = q + ((size_t)r * heads + h) * hd;
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        qv[i] = lane + 32 * i < hd ? qr[lane + 32 * i] : 0.0f;
        acc[i] = 0.0f;
    }
    float mx = NEG_INF, sum = 0.0f;
    for (u64 p0 = begin + 4 * (u64)warp; begin <= end && p0 <= end; p0 += 4 * (u64)warps) {
        float d[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            d[j] = 0.0f;
            if (p0 + j <= end) {
                const float* kp = keys + (p0 + j) * stride + base;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    if (lane + 32 * i < hd) {
                        d[j] += qv[i] * kp[lane + 32 * i];
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            d[j] = warp_sum(d[j]) * scale;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (p0 + j > end) {
                break;
            }
            const float* vp = values + (p0 + j) * stride + base;
            if (d[j] > mx) {
                const float c = __expf(mx - d[j]);
                sum *= c;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    acc[i] *= c;
                }
                mx = d[j];
            }
            const float pr = __expf(d[j] - mx);
            sum += pr;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                if (lane + 32 * i < hd) {
                    acc[i] += pr * vp[lane + 32 * i];
                }
            }
        }
    }
    float* mine = partial + warp * (hd + 2);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (lane + 32 * i < hd) {
            mine[lane + 32 * i] = acc[i];
        }
    }
    if (lane == 0) {
        mine[hd] = mx;
        mine[hd + 1] = sum;
    }
    __syncthreads();
    float top = NEG_INF;
    for (int w = 0; w < warps; w++) {
        top = fmaxf(top, partial[w * (hd + 2) + hd]);
    }
    float total = 0.0f;
    for (int w = 0; w < warps; w++) {
        const float mw = partial[w * (hd + 2) + hd];
        if (mw != NEG_INF) {
            total += partial[w * (hd + 2) + hd + 1] * __expf(mw - top);
        }
    }
    const bool whole = gridDim.z == 1;
    float* dst = whole ? out + ((size_t)r * heads + h) * hd
                       : partials + (((size_t)r * heads + h) * gridDim.z + blockIdx.z) * (hd + 2);
    for (int t = threadIdx.x; t < hd; t += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; w++) {
            const float mw = partial[w * (hd + 2) + hd];
            if (mw != NEG_INF) {
                o += partial[w * (hd + 2) + t] * __expf(mw - top);
            }
        }
        dst[t] = whole ? o / total : o;
    }
    if (!whole && threadIdx.x == 0) {
        dst[hd] = top;
        dst[hd + 1] = total;
    }
}

// Joins the `runs` partials of `attend_rows` per (row, head) into the output. Grid: (rows,
// heads); block: hd rounded up to a multiple of 32.
extern "C" __global__ void attend_merge(const float* partials, float* out, int heads, int hd,
                                        int runs) {
    const int r = blockIdx.x, h = blockIdx.y, t = threadIdx.x;
    if (t >= hd) {
        return;
    }
    const float* p = partials + ((size_t)r * heads + h) * runs * (hd + 2);
    float top = NEG_INF;
    for (int z = 0; z < runs; z++) {
        top = fmaxf(top, p[z * (hd + 2) + hd]);
    }
    float total = 0.0f, o = 0.0f;
    for (int z = 0; z < runs; z++) {
        const float mz = p[z * (hd + 2) + hd];
        if (mz != NEG_INF) {
            const float f = __expf(mz - top);
            total += p[z * (hd + 2) + hd + 1] * f;
            o += p[z * (hd + 2) + t] * f;
        }
    }
    out[((size_t)r * heads + h) * hd + t] = o / total;
}

// Causal attention of `n` consecutive rows of one sequence (row i at position first + i)
// over the cache `keys`/`values`, flash-style: a block takes 16 * RPT query rows of one head
// and walks the keys 16 * KPT at a time through shared memory, with an online softmax, so
// no row of scores is ever stored whole. The 256 threads form a 16 x 16 grid: thread
// (tr, tc) computes the scores of rows tr + 16 i and keys tc + 16 c, and the outputs of
// rows tr + 16 i and columns 4 tc + 64 k .. + 4 (k < MAXK, hd <= 64 * MAXK). Rows of
// queries, keys and values are staged with a row stride `ld` (hd + 4 or hd + 8) that keeps
// the 16-byte loads of eight neighbouring threads on distinct banks. hd is a multiple of 4.
// Grid: (ceil(n / (16 * RPT)), heads), 256 threads; dynamic shared memory:
// prefill_tiles(hd).shared_floats in mod.rs.
template <int RPT, int KPT, int MAXK>
__device__ __forceinline__ void attend_prefill_tiled(const float* q, float* out, int n, u64 first,
                                                     const float* keys, const float* values,
                                                     int heads, int kv_heads, int hd, int layer,
                                                     int layers, float scale) {
    constexpr int BR = 16 * RPT, BC = 16 * KPT, PLD = BC + 4;
    extern __shared__ float4 staged4[];
    float* staged = (float*)staged4;
    const int ld = hd + (hd % 8 == 0 ? 4 : 8);
    float* qs = staged;
    float* ks = qs + BR * ld;
    float* vs = ks + BC * ld;
    float* ps = vs + BC * ld;
    const int tr = threadIdx.x >> 4, tc = threadIdx.x & 15;
    // The longest blocks (last rows, most keys) start first.
    const int r0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const u64 stride = (u64)layers * kv_heads * hd;
    const u64 base = ((u64)layer * kv_heads + kvh) * hd;
    const int quads = hd >> 2;
    for (int idx = threadIdx.x; idx < BR * quads; idx += blockDim.x) {
        const int r = idx / quads, d = (idx % quads) * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + r < n) {
            v = *(const float4*)(q + ((size_t)(r0 + r) * heads + h) * hd + d);
            v.x *= scale;
            v.y *= scale;
            v.z *= scale;
            v.w *= scale;
        }
        *(float4*)(qs + r * ld + d) = v;
    }
    float o[RPT][MAXK * 4], m[RPT], l[RPT];
#pragma unroll
    for (int i = 0; i < RPT; i++) {
        m[i] = NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXK * 4; c++) {
            o[i][c] = 0.0f;
        }
    }
    const u64 end = first + (u64)min(n, r0 + BR) - 1;
    for (u64 start = 0; start <= end; start += BC) {
        const int count = (int)min((u64)BC, end + 1 - start);
        __syncthreads();
        for (int idx = threadIdx.x; idx < BC * quads; idx += blockDim.x) {
            const int j = idx / quads, d = (idx % quads) * 4;
            float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
            if (j < count) {
                const u64 at = (start + j) * stride + base + d;
                kv = *(const float4*)(keys + at);
                vv = *(const float4*)(values + at);
            }
            *(float4*)(ks + j * ld + d) = kv;
            *(float4*)(vs + j * ld + d) = vv;
        }
        __syncthreads();
        float sc[RPT][KPT];
#pragma unroll
        for (int i = 0; i < RPT; i++) {
#pragma unroll
            for (int c = 0; c < KPT; c++) {
                sc[i][c] = 0.0f;
            }
        }
        for (int d = 0; d < hd; d += 4) {
            float4 qv[RPT], kv[KPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                qv[i] = *(const float4*)(qs + (tr + 16 * i) * ld + d);
            }
#pragma unroll
            for (int c = 0; c < KPT; c++) {
                kv[c] = *(const float4*)(ks + (tc + 16 * c) * ld + d);
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) {
#pragma unroll
                for (int c = 0; c < KPT; c++) {
                    sc[i][c] += qv[i].x * kv[c].x + qv[i].y * kv[c].y + qv[i].z * kv[c].z +
                                qv[i].w * kv[c].w;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < RPT; i++) {
            const u64 pos = first + (u64)(r0 + tr + 16 * i);
            float top = NEG_INF;
#pragma unroll
            for (int c = 0; c < KPT; c++) {
                if (start + (u64)(tc + 16 * c) > pos) {
                    sc[i][c] = NEG_INF;
                }
                top = fmaxf(top, sc[i][c]);
            }
            for (int w = 8; w > 0; w >>= 1) {
                top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, w));
            }
            const float next = fmaxf(m[i], top);
            // A row that has seen no key yet keeps zeros (its exponentials are all 0).
            const float ref = next == NEG_INF ? 0.0f : next;
            const float keep = __expf(m[i] - ref);
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < KPT; c++) {
                const float p = __expf(sc[i][c] - ref);
                sum += p;
                ps[(tr + 16 * i) * PLD + tc + 16 * c] = p;
            }
            for (int w = 8; w > 0; w >>= 1) {
                sum += __shfl_xor_sync(0xffffffffu, sum, w);
            }
            l[i] = l[i] * keep + sum;
            m[i] = next;
#pragma unroll
            for (int c = 0; c < MAXK * 4; c++) {
                o[i][c] *= keep;
            }
        }
        __syncthreads();
        for (int j = 0; j < BC; j += 4) {
            float4 pv[RPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                pv[i] = *(const float4*)(ps + (tr + 16 * i) * PLD + j);
            }
#pragma unroll
            for (int k = 0; k < MAXK; k++) {
                const int col = 4 * tc + 64 * k;
                if (col < hd) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float4 v = *(const float4*)(vs + (j + e) * ld + col);
#pragma unroll
                        for (int i = 0; i < RPT; i++) {
                            const float p = e == 0 ? pv[i].x : e == 1 ? pv[i].y : e == 2 ? pv[i].z : pv[i].w;
                            o[i][4 * k] += p * v.x;
                            o[i][4 * k + 1] += p * v.y;
                            o[i][4 * k + 2] += p * v.z;
                            o[i][4 * k + 3] += p * v.w;
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RPT; i++) {
        const int r = r0 + tr + 16 * i;
        if (r >= n) {
            continue;
        }
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int k = 0; k < MAXK; k++) {
            const int col = 4 * tc + 64 * k;
            if (col < hd) {
                *(float4*)(out + ((size_t)r * heads + h) * hd + col) =
                    make_float4(o[i][4 * k] * inv, o[i][4 * k + 1] * inv, o[i][4 * k + 2] * inv,
                                o[i][4 * k + 3] * inv);
            }
        }
    }
}

// The prefill attention's entry points: `name` with RPT rows and KPT keys per thread and
// outputs of head sizes up to 64 * MAXK.
#define ATTEND_PREFILL(name, RPT, KPT, MAXK)                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        name(const float* q, float* out, int n, u64 first, const float* keys,                  \
             const float* values, int heads, int kv_heads, int hd, int layer, int layers,      \
             float scale) {                                                                   \
        attend_prefill_tiled<RPT, KPT, MAXK>(q, out, n, first, keys, values, heads, kv_heads, \
                                             hd, layer, layers, scale);                       \
    }

// 64 query rows and 32 keys per step, for head sizes up to 128.
ATTEND_PREFILL(attend_prefill_64, 4, 2, 2)
// 32 query rows and 16 keys per step, for head sizes up to 256 (less shared memory).
ATTEND_PREFILL(attend_prefill_32, 2, 1, 4)
