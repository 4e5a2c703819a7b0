// Embedding gather: out[t] = table[ids[t]], table [vocab, hidden]. Mirrors
// reference::embedding, except that an id >= vocab (a caller bug the CPU op panics
// on) yields a zero row instead of an out-of-bounds read. One block per token.
// Requires hidden % 8 == 0.

#define EMBED_THREADS 256

extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
    embedding_bf16(const u32* __restrict__ ids, const bf16* __restrict__ table,
                   bf16* __restrict__ out, u32 vocab, u32 hidden) {
    const u64 t = blockIdx.x;
    const u64 id = ids[t];
    for (u32 c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (id < vocab) v = *reinterpret_cast<const uint4*>(table + id * hidden + c);
        *reinterpret_cast<uint4*>(out + t * hidden + c) = v;
    }
}
