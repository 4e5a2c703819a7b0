// reshape_and_cache: writes each token's K and V rows [n, n_kv_heads*d] into the paged
// caches [num_blocks, n_kv_heads, block_size, d] at slot = block * block_size + offset.
// Mirrors reference::reshape_and_cache. One block per token, one 16-byte chunk per
// thread per step. Requires d % 8 == 0 and a power-of-two block_size.

#define CACHE_THREADS 128

extern "C" __global__ void __launch_bounds__(CACHE_THREADS)
    reshape_and_cache_bf16(const bf16* __restrict__ k, const bf16* __restrict__ v,
                           bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                           const u32* __restrict__ slot_mapping, u32 n_kv_heads,
                           u32 block_shift, u32 head_dim) {
    const u64 t = blockIdx.x;
    const u64 slot = slot_mapping[t];
    const u64 block = slot >> block_shift, off = slot & ((1u << block_shift) - 1);
    const u32 chunks = head_dim / 8;
    for (u32 u = threadIdx.x; u < n_kv_heads * chunks; u += blockDim.x) {
        const u32 h = u / chunks, c = (u % chunks) * 8;
        const u64 src = (t * n_kv_heads + h) * head_dim + c;
        const u64 dst = (((block * n_kv_heads + h) << block_shift) + off) * head_dim + c;
        *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(k + src);
        *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(v + src);
    }
}
