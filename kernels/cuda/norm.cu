// RMSNorm and residual-add + RMSNorm, one block per row.
// Mirrors reference::rms_norm / reference::fused_add_rms_norm. The fused kernel
// rounds `residual + delta` to bf16, stores it, and normalises the rounded value, so
// `normed` is exactly what rms_norm of the stored residual gives.
// Cost: one read of each input and one write of each output per row (the second pass
// re-reads the row from L1/L2, not DRAM). Requires hidden % 8 == 0.

#define NORM_THREADS 256

template <bool ADD>
__device__ __forceinline__ void rms_norm_row(bf16* __restrict__ residual,
                                             const bf16* __restrict__ x,
                                             const bf16* __restrict__ delta,
                                             const bf16* __restrict__ weight,
                                             bf16* __restrict__ out, u32 hidden, float eps) {
    __shared__ float scratch[32];
    const u64 row = blockIdx.x;
    const u32 chunks = hidden / 8;
    const bf16* src = ADD ? residual : x;
    float ss = 0.f;
    for (u32 c = threadIdx.x; c < chunks; c += blockDim.x) {
        const u64 off = row * hidden + c * 8;
        float v[8];
        load8(src + off, v);
        if (ADD) {
            float d[8];
            load8(delta + off, d);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = __bfloat162float(__float2bfloat16_rn(v[i] + d[i]));
            store8(residual + off, v);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (u32 c = threadIdx.x; c < chunks; c += blockDim.x) {
        const u64 off = row * hidden + c * 8;
        float v[8], g[8];
        load8(src + off, v);
        load8(weight + c * 8, g);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * g[i];
        store8(out + off, v);
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ weight,
                  bf16* __restrict__ out, u32 hidden, float eps) {
    rms_norm_row<false>(nullptr, x, nullptr, weight, out, hidden, eps);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    fused_add_rms_norm_bf16(bf16* __restrict__ residual, const bf16* __restrict__ delta,
                            const bf16* __restrict__ weight, bf16* __restrict__ normed,
                            u32 hidden, float eps) {
    rms_norm_row<true>(residual, nullptr, delta, weight, normed, hidden, eps);
}
