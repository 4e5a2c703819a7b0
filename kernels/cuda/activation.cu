// SwiGLU on the fused gate|up projection: out[t, i] = silu(gu[t, i]) * gu[t, f + i],
// gu [n, 2f] -> out [n, f]. Mirrors reference::swiglu. Grid-stride over 16-byte
// chunks of the output; every input element is read once. Requires f % 8 == 0.

extern "C" __global__ void swiglu_bf16(const bf16* __restrict__ gate_up, bf16* __restrict__ out,
                                       u32 n, u32 f) {
    const u64 chunks = static_cast<u64>(n) * (f / 8);
    for (u64 i = blockIdx.x * static_cast<u64>(blockDim.x) + threadIdx.x; i < chunks;
         i += static_cast<u64>(gridDim.x) * blockDim.x) {
        const u64 row = i / (f / 8), c = (i % (f / 8)) * 8;
        float g[8], u[8];
        load8(gate_up + row * 2 * f + c, g);
        load8(gate_up + row * 2 * f + f + c, u);
#pragma unroll
        for (int j = 0; j < 8; ++j) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        store8(out + row * f + c, g);
    }
}
