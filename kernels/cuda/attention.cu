// Paged attention for decode and prefill (one kernel template), plus the split-K merge.
// Mirrors reference::paged_attention: causal, optional sliding window, GQA.
//
// Work decomposition (planned on the host once per step, see cuda/attention.rs):
// a work item is (seq, tokens [tb, te) of that sequence's query rows, keys
// [kv_begin, kv_end), split index, the sequence's first row in the batch and the
// position of that row), so a block needs no other metadata than its block table. Block (item, kv head kh) packs the item's query
// rows for the `group` q heads that share kh into one tile of rows
// r = (token - tb) * group + g, so every K/V page of kh is read once per item for the
// whole group (GQA-aware), and streams the item's keys through shared memory in
// tiles of BN keys, STAGES deep with cp.async. Each warp owns 16 rows:
// S = Q·K^T and O += P·V run on tensor cores (mma.sync m16n8k16, bf16 in, f32
// accumulate) with an online (flash) softmax in f32.
//
// Three shapes: WARPS = 1 (16 rows: decodes, q_len * group <= 16; 32-key tiles three
// deep, so two tiles are in flight while one is computed, in 52 KB of shared memory
// for d = 128: four such blocks fit an H100 SM), 4 (64 rows: short chunks) and 8 (128 rows: long prompts;
// the K/V tile in shared memory then serves twice the rows, halving shared-memory
// and L2 traffic per FLOP); both 64-key tiles, double-buffered. Long key ranges with too few blocks to fill the GPU are
// split (flash-decoding): each split writes an f32 partial output and its
// log2-sum-exp; attn_merge_bf16 combines them. Items that are not split write bf16
// directly.
//
// Shared memory rows are D bf16; their 16-byte chunks are XOR-swizzled with the row
// index (chunk ^ (row & 7)) so ldmatrix and cp.async are bank-conflict free.
// Keys outside [kv_begin, kv_end) are zero-filled, never read: cache slots past a
// sequence's length may hold garbage (even NaN), and 0 * NaN would poison P·V.

#define ATTN_NO_SPLIT 0xffffffffu
#define ATTN_WORK_WORDS 8

// Kernel parameters, passed by value; layout mirrors `AttnParams` in cuda/attention.rs.
struct AttnParams {
    const bf16* q;             // [n_tokens, n_heads, D]
    const bf16* k_cache;       // [num_blocks, n_kv_heads, block_size, D]
    const bf16* v_cache;
    bf16* out;                 // [n_tokens, n_heads, D]
    float* part_o;             // [max_splits, n_tokens, n_heads, D]
    float* part_lse;           // [max_splits, n_tokens, n_heads], log2 domain
    const u32* work;           // [n_items, ATTN_WORK_WORDS]
    const u32* block_tables;   // [n_seqs, max_blocks]
    u32 max_blocks;
    u32 block_shift;           // log2(block_size)
    u32 n_heads;
    u32 n_kv_heads;
    u32 group;                 // n_heads / n_kv_heads
    u32 n_tokens;
    u32 window;                // sliding window, 0 = none
    float scale_log2;          // log2(e) / sqrt(D)
};

template <int D>
__device__ __forceinline__ u32 swz(u32 row, u32 chunk) {
    return row * D + ((chunk ^ (row & 7)) * 8);
}

template <int D, int WARPS, int BN, int STAGES>
__device__ __forceinline__ void attn_tile(const AttnParams& p) {
    constexpr int ROWS = WARPS * 16;
    constexpr int THREADS = WARPS * 32;
    constexpr int CHUNKS = D / 8;             // 16-byte chunks per row
    constexpr int NT = BN / 8;                // 8-key score tiles per block of keys
    constexpr int DT = D / 8;                 // 8-wide output tiles
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* s_q = reinterpret_cast<bf16*>(smem_raw);
    bf16* s_k = s_q + ROWS * D;
    bf16* s_v = s_k + STAGES * BN * D;

    const uint4* w = reinterpret_cast<const uint4*>(p.work + static_cast<u64>(blockIdx.x) * ATTN_WORK_WORDS);
    const uint4 w0 = w[0], w1 = w[1];
    const u32 seq = w0.x, tb = w0.y, te = w0.z, kv_begin = w0.w, kv_end = w1.x, split = w1.y;
    const u32 q0 = w1.z;    // batch row of the sequence's first query token
    const u32 pos0 = w1.w;  // its position
    const u32 kh = blockIdx.y;
    const u32* table = p.block_tables + static_cast<u64>(seq) * p.max_blocks;
    const u32 n_rows = (te - tb) * p.group;
    const u32 tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const u32 bmask = (1u << p.block_shift) - 1;

    // Q tile: rows past n_rows are zero.
    for (u32 i = tid; i < ROWS * CHUNKS; i += THREADS) {
        const u32 r = i / CHUNKS, c = i % CHUNKS;
        const bf16* src = p.q;
        u32 bytes = 0;
        if (r < n_rows) {
            const u64 tok = q0 + tb + r / p.group;
            const u64 h = kh * p.group + r % p.group;
            src = p.q + (tok * p.n_heads + h) * D + c * 8;
            bytes = 16;
        }
        cp_async16(smem_addr(s_q + swz<D>(r, c)), src, bytes);
    }

    auto load_kv = [&](u32 tile, u32 stage) {
        const u32 key0 = kv_begin + tile * BN;
        bf16* sk = s_k + stage * BN * D;
        bf16* sv = s_v + stage * BN * D;
        // Unrolled (the trip count is a constant) so all block-table reads issue at once.
#pragma unroll
        for (u32 i = tid; i < BN * CHUNKS; i += THREADS) {
            const u32 j = i / CHUNKS, c = i % CHUNKS, key = key0 + j;
            u64 off = 0;
            u32 bytes = 0;
            if (key < kv_end) {
                const u64 page = table[key >> p.block_shift];
                off = (((page * p.n_kv_heads + kh) << p.block_shift) + (key & bmask)) * D + c * 8;
                bytes = 16;
            }
            cp_async16(smem_addr(sk + swz<D>(j, c)), p.k_cache + off, bytes);
            cp_async16(smem_addr(sv + swz<D>(j, c)), p.v_cache + off, bytes);
        }
    };

    // Prologue: tiles 0..STAGES-2 in flight (group 0 also holds Q). One commit group per
    // tile slot, empty ones included, so "tile t has landed" is always wait<STAGES-2>.
    const u32 n_tiles = (kv_end - kv_begin + BN - 1) / BN;
#pragma unroll
    for (u32 t = 0; t < STAGES - 1; ++t) {
        if (t < n_tiles) load_kv(t, t);
        cp_async_commit();
    }

    // This thread's two rows (C-fragment rows g and g + 8 of its warp).
    const u32 g = lane / 4, t4 = lane % 4;
    u32 row_pos[2], row_lo[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 r = warp * 16 + g + h * 8;
        row_pos[h] = pos0 + tb + r / p.group;
        row_lo[h] = (p.window != 0 && row_pos[h] + 1 > p.window) ? row_pos[h] + 1 - p.window : 0;
    }
    // Keys every row of the block may see without masking: [max lo, min pos].
    const u32 blk_pos_min = pos0 + tb;
    const u32 blk_last = pos0 + te - 1;
    const u32 blk_lo_max =
        (p.window != 0 && blk_last + 1 > p.window) ? blk_last + 1 - p.window : 0;

    u32 qf[D / 16][4];
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (u32 tile = 0; tile < n_tiles; ++tile) {
        const u32 stage = tile % STAGES;
        cp_async_wait<STAGES - 2>();
        // Tile `tile` is visible to all; and every warp is done with tile - 1, whose
        // stage the load below refills.
        __syncthreads();
        if (tile + STAGES - 1 < n_tiles) load_kv(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
        cp_async_commit();
        if (tile == 0) {
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                const u32 r = warp * 16 + (lane % 16), c = ks * 2 + lane / 16;
                ldmatrix_x4(qf[ks], smem_addr(s_q + swz<D>(r, c)));
            }
        }
        const bf16* sk = s_k + stage * BN * D;
        const bf16* sv = s_v + stage * BN * D;

        // S = Q K^T for this warp's 16 rows x BN keys.
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
            for (int nj = 0; nj < NT / 2; ++nj) {
                const u32 key = nj * 16 + (lane / 16) * 8 + (lane % 8);
                const u32 c = ks * 2 + (lane / 8) % 2;
                u32 b[4];
                ldmatrix_x4(b, smem_addr(sk + swz<D>(key, c)));
                mma_bf16_16816(s[2 * nj], qf[ks], b[0], b[1]);
                mma_bf16_16816(s[2 * nj + 1], qf[ks], b[2], b[3]);
            }
        }

        // Scale into the log2 domain; mask keys outside each row's causal window.
        const u32 key0 = kv_begin + tile * BN;
        const bool need_mask =
            key0 + BN > kv_end || key0 + BN - 1 > blk_pos_min || key0 < blk_lo_max;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float v = s[nt][e] * p.scale_log2;
                if (need_mask) {
                    const u32 key = key0 + nt * 8 + 2 * t4 + (e & 1);
                    const int h = e >> 1;
                    if (key >= kv_end || key > row_pos[h] || key < row_lo[h]) v = -INFINITY;
                }
                s[nt][e] = v;
            }
        }

        // Online softmax: new running max, rescale O and l.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float m_new = fmaxf(m[h], mx);
            const float base = m_new == -INFINITY ? 0.f : m_new;
            const float alpha = exp2f(m[h] - base);
            m[h] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][2 * h] = exp2f(s[nt][2 * h] - base);
                s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - base);
                sum += s[nt][2 * h] + s[nt][2 * h + 1];
            }
            l[h] = l[h] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][2 * h] *= alpha;
                o[dt][2 * h + 1] *= alpha;
            }
        }

        // O += P V: the score C-fragments are reused as A-fragments (bf16).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 pa[4];
            pa[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dn = 0; dn < DT / 2; ++dn) {
                const u32 key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                const u32 c = dn * 2 + lane / 16;
                u32 b[4];
                ldmatrix_x4_trans(b, smem_addr(sv + swz<D>(key, c)));
                mma_bf16_16816(o[2 * dn], pa, b[0], b[1]);
                mma_bf16_16816(o[2 * dn + 1], pa, b[2], b[3]);
            }
        }
    }

    // Epilogue: full row sums, normalise, write bf16 output or the split's partial.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float lt = l[h];
        lt += __shfl_xor_sync(FULL_MASK, lt, 1);
        lt += __shfl_xor_sync(FULL_MASK, lt, 2);
        const u32 r = warp * 16 + g + h * 8;
        if (r >= n_rows) continue;
        const u64 tok = q0 + tb + r / p.group;
        const u64 head = kh * p.group + r % p.group;
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        if (split == ATTN_NO_SPLIT) {
            bf16* dst = p.out + (tok * p.n_heads + head) * D;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                *reinterpret_cast<u32*>(dst + dt * 8 + 2 * t4) =
                    pack_bf16x2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
            }
        } else {
            const u64 prow = (static_cast<u64>(split) * p.n_tokens + tok) * p.n_heads + head;
            float* dst = p.part_o + prow * D;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                *reinterpret_cast<float2*>(dst + dt * 8 + 2 * t4) =
                    make_float2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
            }
            if (t4 == 0) p.part_lse[prow] = lt > 0.f ? m[h] + log2f(lt) : -INFINITY;
        }
    }
}

// Instantiations; (BN, STAGES) must match `TIERS` in cuda/attention.rs.
#define ATTN_KERNEL(D, WARPS, BN, STAGES)                                                \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)                          \
        paged_attention_d##D##_w##WARPS(const AttnParams p) {                             \
        attn_tile<D, WARPS, BN, STAGES>(p);                                              \
    }

ATTN_KERNEL(128, 1, 32, 3)
ATTN_KERNEL(128, 4, 64, 2)
ATTN_KERNEL(128, 8, 64, 2)
ATTN_KERNEL(64, 1, 32, 3)
ATTN_KERNEL(64, 4, 64, 2)
ATTN_KERNEL(64, 8, 64, 2)

// Combines the splits of every token whose keys were split: with per-split log2-sum-exp
// L_i and normalised partial O_i, out = sum_i 2^(L_i - L) O_i with L = log2 sum 2^L_i.
// Grid (n_tokens, n_heads), one block per (token, head), one thread per column; tokens
// with splits <= 1 were written directly and are skipped. The split loop is unrolled so
// the partial rows are loaded in parallel rather than one DRAM latency each.
#define ATTN_MAX_SPLITS 64
#define MERGE_THREADS 128

extern "C" __global__ void __launch_bounds__(MERGE_THREADS)
    attn_merge_bf16(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                    const u32* __restrict__ token_splits, bf16* __restrict__ out, u32 n_tokens,
                    u32 n_heads, u32 head_dim) {
    __shared__ float s_w[ATTN_MAX_SPLITS];
    const u64 tok = blockIdx.x, head = blockIdx.y;
    const u32 n_splits = token_splits[tok];
    if (n_splits <= 1) return;
    const u64 stride = static_cast<u64>(n_tokens) * n_heads;
    const u64 row = tok * n_heads + head;
    for (u32 s = threadIdx.x; s < n_splits; s += blockDim.x) s_w[s] = part_lse[s * stride + row];
    __syncthreads();
    float mx = -INFINITY;
    for (u32 s = 0; s < n_splits; ++s) mx = fmaxf(mx, s_w[s]);
    float wsum = 0.f;
    for (u32 s = 0; s < n_splits; ++s) wsum += exp2f(s_w[s] - mx);
    __syncthreads();
    for (u32 s = threadIdx.x; s < n_splits; s += blockDim.x) s_w[s] = exp2f(s_w[s] - mx) / wsum;
    __syncthreads();
    for (u32 c = threadIdx.x; c < head_dim; c += blockDim.x) {
        float acc = 0.f;
#pragma unroll 8
        for (u32 s = 0; s < n_splits; ++s) acc += s_w[s] * part_o[(s * stride + row) * head_dim + c];
        out[row * head_dim + c] = __float2bfloat16_rn(acc);
    }
}
