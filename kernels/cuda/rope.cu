// Rotary embedding in place on q [n, n_heads*d] and k [n, n_kv_heads*d], ROPE_TOKENS
// tokens per block, rotate-half convention: pair (x[i], x[i + d/2]) turns by
// pos * inv_freq[i]. Mirrors reference::rope bit for bit in the angle:
// inv_freq[i] = 1 / (f32)theta^(2i/d) (power in f64), angle = (f32)pos * inv_freq[i];
// sin/cos with full range reduction.
// Cost: the d/2 inverse frequencies once per block, d/2 sin/cos pairs per token (both
// into shared memory); every element is read and written once. Requires d % 16 == 0
// and d <= 512.

#define ROPE_THREADS 256
#define ROPE_TOKENS 4

// One block's tables: the d/2 inverse frequencies, then the sin/cos of the angles of
// its `nt` tokens from t0 (shared memory; ends with a barrier).
__device__ __forceinline__ void rope_tables(float* s_inv, float (*s_cos)[256], float (*s_sin)[256],
                                            const u32* __restrict__ positions, u64 t0, u32 nt,
                                            u32 head_dim, float theta) {
    const u32 half = head_dim / 2;
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
        s_inv[i] = 1.0f / static_cast<float>(pow(static_cast<double>(theta), 2.0 * i / head_dim));
    }
    __syncthreads();
    for (u32 j = threadIdx.x; j < nt * half; j += blockDim.x) {
        const u32 tok = j / half, i = j % half;
        const float pos = static_cast<float>(positions[t0 + tok]);
        sincosf(pos * s_inv[i], &s_sin[tok][i], &s_cos[tok][i]);
    }
    __syncthreads();
}

// Rotates 8 pairs (a[i], b[i]) = (x[c + i], x[c + d/2 + i]) by the angles cs/sn[i].
__device__ __forceinline__ void rope_rotate8(float* a, float* b, const float* cs, const float* sn) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float lo = a[i] * cs[i] - b[i] * sn[i];
        const float hi = b[i] * cs[i] + a[i] * sn[i];
        a[i] = lo;
        b[i] = hi;
    }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_bf16(bf16* __restrict__ q, bf16* __restrict__ k, const u32* __restrict__ positions,
              u32 n_tokens, u32 n_heads, u32 n_kv_heads, u32 head_dim, float theta) {
    __shared__ float s_inv[256];
    __shared__ float s_cos[ROPE_TOKENS][256], s_sin[ROPE_TOKENS][256];
    const u64 t0 = static_cast<u64>(blockIdx.x) * ROPE_TOKENS;
    const u32 nt = min(static_cast<u64>(ROPE_TOKENS), n_tokens - t0);
    const u32 half = head_dim / 2;
    rope_tables(s_inv, s_cos, s_sin, positions, t0, nt, head_dim, theta);
    const u32 per_head = half / 8;
    const u32 per_token = (n_heads + n_kv_heads) * per_head;
    for (u32 u = threadIdx.x; u < nt * per_token; u += blockDim.x) {
        const u32 tok = u / per_token, head = (u % per_token) / per_head;
        const u32 c = (u % per_head) * 8;
        const u64 t = t0 + tok;
        bf16* x = head < n_heads ? q + (t * n_heads + head) * head_dim
                                 : k + (t * n_kv_heads + (head - n_heads)) * head_dim;
        float a[8], b[8];
        load8(x + c, a);
        load8(x + half + c, b);
        rope_rotate8(a, b, &s_cos[tok][c], &s_sin[tok][c]);
        store8(x + c, a);
        store8(x + half + c, b);
    }
}
