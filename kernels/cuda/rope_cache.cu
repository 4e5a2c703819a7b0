// rope_qkv_cache: the fused form of rope + reshape_and_cache over ONE QKV GEMM's
// output. qkv [n, (n_heads + 2·n_kv_heads)·d] holds each token's q | k | v rows; the
// kernel writes rotated q to q_out [n, n_heads·d] (contiguous, for attention) and the
// rotated k and the unchanged v straight into the paged caches
// [num_blocks, n_kv_heads, block_size, d] at slot = block·block_size + offset.
// Mirrors reference::rope_qkv_cache, which is rope then reshape_and_cache on the split
// rows: the same f32 angle and rotation as rope_bf16, one bf16 rounding per element, so
// its output is bit-identical to those two kernels on the same qkv.
// Cost: one read of qkv and one write of q plus the two cache rows; the d/2 sin/cos
// pairs per token are computed once into shared memory (rope.cu's rope_tables, the
// same ROPE_THREADS / ROPE_TOKENS). Requires d % 16 == 0, d <= 512 and a power-of-two
// block_size.

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_qkv_cache_bf16(const bf16* __restrict__ qkv, bf16* __restrict__ q_out,
                        bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                        const u32* __restrict__ positions, const u32* __restrict__ slot_mapping,
                        u32 n_tokens, u32 n_heads, u32 n_kv_heads, u32 head_dim,
                        u32 block_shift, float theta) {
    __shared__ float s_inv[256];
    __shared__ float s_cos[ROPE_TOKENS][256], s_sin[ROPE_TOKENS][256];
    const u64 t0 = static_cast<u64>(blockIdx.x) * ROPE_TOKENS;
    const u32 nt = min(static_cast<u64>(ROPE_TOKENS), n_tokens - t0);
    const u32 half = head_dim / 2;
    rope_tables(s_inv, s_cos, s_sin, positions, t0, nt, head_dim, theta);
    const u64 row = static_cast<u64>(n_heads + 2 * n_kv_heads) * head_dim;
    // Rotation units: 8 pairs of one q or k head; then copy units: 8 elements of one
    // v head.
    const u32 per_head = half / 8;
    const u32 rot_units = (n_heads + n_kv_heads) * per_head;
    const u32 copy_units = n_kv_heads * (head_dim / 8);
    const u32 per_token = rot_units + copy_units;
    for (u32 u = threadIdx.x; u < nt * per_token; u += blockDim.x) {
        const u32 tok = u / per_token, w = u % per_token;
        const u64 t = t0 + tok;
        const bf16* src = qkv + t * row;
        const u64 slot = slot_mapping[t];
        const u64 block = slot >> block_shift, off = slot & ((1u << block_shift) - 1);
        if (w >= rot_units) {
            const u32 v = w - rot_units, h = v / (head_dim / 8), c = (v % (head_dim / 8)) * 8;
            const u64 dst = (((block * n_kv_heads + h) << block_shift) + off) * head_dim + c;
            *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(
                src + static_cast<u64>(n_heads + n_kv_heads + h) * head_dim + c);
            continue;
        }
        const u32 head = w / per_head, c = (w % per_head) * 8;
        float a[8], b[8];
        const bf16* x = src + static_cast<u64>(head) * head_dim;
        load8(x + c, a);
        load8(x + half + c, b);
        rope_rotate8(a, b, &s_cos[tok][c], &s_sin[tok][c]);
        bf16* y;
        if (head < n_heads) {
            y = q_out + (t * n_heads + head) * head_dim;
        } else {
            const u64 h = head - n_heads;
            y = k_cache + (((block * n_kv_heads + h) << block_shift) + off) * head_dim;
        }
        store8(y + c, a);
        store8(y + half + c, b);
    }
}
