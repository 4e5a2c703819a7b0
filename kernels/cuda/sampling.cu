// Sampling support on f32 logits [n, vocab], one block of SAMPLE_THREADS per row.
//
// argmax_rows_f32 mirrors reference::argmax_rows (first index on ties);
// argmax_pairs_f32 also returns the maximum (reference::argmax_pairs).
// top_k_rows_f32 mirrors reference::top_k_rows: the row is scaled by 1/temperature
// (temperature <= 0 means greedy: scale 1), and the k largest scaled values are
// returned in descending order (lower index first on ties) with their token ids,
// plus the log-sum-exp of the whole scaled row, so the host can turn candidate
// values into exact probabilities (top-p, logprobs) while reading only k of them.
//
// Top-k is a radix select: four 8-bit passes over an order-preserving u32 key of
// each value find the k-th largest key; a block-wide prefix count then keeps the
// lowest-index ties, and a rank sort orders the k candidates. Cost: five reads of
// the row (L2-resident after the first), O(k^2 / threads) for the final sort.
// Requires k <= SAMPLE_MAX_K and k <= vocab.

#define SAMPLE_THREADS 1024
#define SAMPLE_MAX_K 1024

// Order-preserving map from f32 to u32 (larger float -> larger key).
__device__ __forceinline__ u32 float_key(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float scaled_logit(const float* row, u32 i, float temperature) {
    return temperature > 0.f ? row[i] / temperature : row[i];
}

// The first maximum of `row [vocab]` over the block: valid in thread 0 on return.
// Every thread of the block must call it (it synchronises the block).
__device__ __forceinline__ void block_row_argmax(const float* __restrict__ row, u32 vocab,
                                                 float* best_out, u32* best_i_out) {
    __shared__ float s_val[32];
    __shared__ u32 s_idx[32];
    float best = -INFINITY;
    u32 best_i = 0xffffffffu;
    // Unrolled: eight loads in flight per thread, not one DRAM latency per element.
#pragma unroll 8
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > best || best_i == 0xffffffffu) {
            best = v;
            best_i = i;
        }
    }
    // Each thread saw increasing indices, so its best is its first maximum.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, best, o);
        const u32 oi = __shfl_xor_sync(FULL_MASK, best_i, o);
        if (ov > best || (ov == best && oi < best_i)) {
            best = ov;
            best_i = oi;
        }
    }
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        s_val[warp] = best;
        s_idx[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        const u32 nwarps = blockDim.x / 32;
        best = lane < nwarps ? s_val[lane] : -INFINITY;
        best_i = lane < nwarps ? s_idx[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, best, o);
            const u32 oi = __shfl_xor_sync(FULL_MASK, best_i, o);
            if (ov > best || (ov == best && oi < best_i)) {
                best = ov;
                best_i = oi;
            }
        }
        if (lane == 0) {
            *best_out = best;
            *best_i_out = best_i;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax_rows_f32(const float* __restrict__ logits, u32* __restrict__ out, u32 vocab) {
    float best;
    u32 best_i;
    block_row_argmax(logits + static_cast<u64>(blockIdx.x) * vocab, vocab, &best, &best_i);
    if (threadIdx.x == 0) out[blockIdx.x] = best_i;
}

// argmax_pairs_f32 mirrors reference::argmax_pairs: per row, (max value, its first
// index as f32) into out [n, 2] — what a vocab-parallel rank sends so rank 0 can pick
// each row's argmax without gathering the row (exact while vocab <= 2^24).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax_pairs_f32(const float* __restrict__ logits, float* __restrict__ out, u32 vocab) {
    float best;
    u32 best_i;
    block_row_argmax(logits + static_cast<u64>(blockIdx.x) * vocab, vocab, &best, &best_i);
    if (threadIdx.x == 0) {
        out[2 * static_cast<u64>(blockIdx.x)] = best;
        out[2 * static_cast<u64>(blockIdx.x) + 1] = static_cast<float>(best_i);
    }
}

// Exclusive prefix sum over the block; needs blockDim.x == SAMPLE_THREADS (32 warps).
__device__ __forceinline__ u32 block_exclusive_scan(u32 v, u32* scratch) {
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    u32 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 n = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        u32 w = scratch[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 n = __shfl_up_sync(FULL_MASK, w, o);
            if (lane >= o) w += n;
        }
        scratch[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    return (warp == 0 ? 0 : scratch[warp - 1]) + incl - v;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    top_k_rows_f32(const float* __restrict__ logits, const float* __restrict__ temperatures,
                   float* __restrict__ values, u32* __restrict__ indices,
                   float* __restrict__ lse, u32 vocab, u32 k) {
    __shared__ u32 hist[256];
    __shared__ u32 scan_scratch[32];
    __shared__ float red_scratch[32];
    __shared__ u32 s_prefix, s_remaining, s_count;
    __shared__ float c_val[SAMPLE_MAX_K];
    __shared__ u32 c_idx[SAMPLE_MAX_K];

    const u32 tid = threadIdx.x;
    const float* row = logits + static_cast<u64>(blockIdx.x) * vocab;
    const float temp = temperatures[blockIdx.x];

    // 1. Radix select of the k-th largest key, most significant byte first.
    u32 prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 b = tid; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (u32 i = tid; i < vocab; i += blockDim.x) {
            const u32 key = float_key(scaled_logit(row, i, temp));
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            u32 above = 0, digit = 255;
            for (;; --digit) {
                if (above + hist[digit] >= remaining || digit == 0) break;
                above += hist[digit];
            }
            s_prefix = prefix | (digit << shift);
            s_remaining = remaining - above;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 0xffu << shift;
    }
    // prefix = k-th largest key; keep every key above it and the `remaining` lowest
    // indices equal to it.
    if (tid == 0) s_count = 0;
    __syncthreads();
    const u32 per_thread = (vocab + blockDim.x - 1) / blockDim.x;
    const u32 lo = min(tid * per_thread, vocab), hi = min(lo + per_thread, vocab);
    u32 n_eq = 0;
    for (u32 i = lo; i < hi; ++i) {
        const float v = scaled_logit(row, i, temp);
        const u32 key = float_key(v);
        if (key > prefix) {
            const u32 slot = atomicAdd(&s_count, 1u);
            c_val[slot] = v;
            c_idx[slot] = i;
        } else if (key == prefix) {
            ++n_eq;
        }
    }
    u32 rank = block_exclusive_scan(n_eq, scan_scratch);
    const u32 n_above = k - remaining;
    for (u32 i = lo; i < hi && rank < remaining; ++i) {
        const float v = scaled_logit(row, i, temp);
        if (float_key(v) == prefix) {
            c_val[n_above + rank] = v;
            c_idx[n_above + rank] = i;
            ++rank;
        }
    }
    __syncthreads();

    // 2. Rank sort of the k candidates: descending key (the total order of f32, as
    // f32::total_cmp), ascending index on ties.
    const u64 out_base = static_cast<u64>(blockIdx.x) * k;
    for (u32 j = tid; j < k; j += blockDim.x) {
        const float v = c_val[j];
        const u32 key = float_key(v), idx = c_idx[j];
        u32 r = 0;
        for (u32 i = 0; i < k; ++i) {
            const u32 other = float_key(c_val[i]);
            r += (other > key || (other == key && c_idx[i] < idx)) ? 1u : 0u;
        }
        values[out_base + r] = v;
        indices[out_base + r] = idx;
    }

    // 3. log-sum-exp of the scaled row.
    float mx = -INFINITY;
    for (u32 i = tid; i < vocab; i += blockDim.x) mx = fmaxf(mx, scaled_logit(row, i, temp));
    mx = block_max(mx, red_scratch);
    float sum = 0.f;
    for (u32 i = tid; i < vocab; i += blockDim.x) sum += expf(scaled_logit(row, i, temp) - mx);
    sum = block_sum(sum, red_scratch);
    if (tid == 0) lse[blockIdx.x] = mx + logf(sum);
}
