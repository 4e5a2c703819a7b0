"""PyTorch reference timings for kernels/examples/cuda_bench.rs: the same shapes through
torch.nn.functional.scaled_dot_product_attention (dense, not paged; GQA via enable_gqa).

Method as in the Rust bench: CUDA events behind a filler copy, 5 warm-ups, median of 30; K/V rotated over
copies totalling >= 512 MB when one launch would fit in L2. Prints markdown tables."""
import statistics
import sys

import torch
import torch.nn.functional as F

WARMUP, REPEATS, ROTATE = 5, 30, 512 << 20
D = 128


FILLER = None


def time_ms(fn):
    """Median device time; a 256 MB copy queued before each start event keeps the GPU
    busy while the host queues the launch, so host overhead is not counted."""
    for i in range(WARMUP):
        fn(i)
    times = []
    for i in range(REPEATS):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        FILLER[1].copy_(FILLER[0])
        s.record()
        fn(WARMUP + i)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def copies_for(nbytes):
    return max(1, min(64, -(-ROTATE // max(nbytes, 1))))


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def main():
    quick = "--quick" in sys.argv
    dev = torch.device("cuda")
    global FILLER
    FILLER = (torch.randn(128 << 20, device=dev, dtype=torch.bfloat16), torch.empty(128 << 20, device=dev, dtype=torch.bfloat16))
    print(f"\n### PyTorch {torch.__version__} SDPA on {torch.cuda.get_device_name()} (dense KV)\n")
    print("| case | heads q/kv | batch | context | time (µs) | KV GB/s or TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for hq, hkv, label in [(48, 8, "48/8"), (24, 4, "24/4")]:
        for batch in ([1, 64] if quick else [1, 16, 64, 256]):
            for ctx in [512, 4096, 32768]:
                kv_bytes = batch * ctx * hkv * D * 2 * 2
                n = copies_for(kv_bytes)
                q = torch.randn(batch, hq, 1, D, device=dev, dtype=torch.bfloat16)
                ks = [torch.randn(batch, hkv, ctx, D, device=dev, dtype=torch.bfloat16) for _ in range(n)]
                vs = [torch.randn(batch, hkv, ctx, D, device=dev, dtype=torch.bfloat16) for _ in range(n)]
                ms = time_ms(lambda i: sdpa(q, ks[i % n], vs[i % n], False))
                print(f"| decode | {label} | {batch} | {ctx} | {ms * 1e3:.1f} | {kv_bytes / ms / 1e6:.0f} GB/s |")
                del ks, vs
                torch.cuda.empty_cache()
        for tokens in [2048, 8192]:
            q = torch.randn(1, hq, tokens, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, tokens, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, tokens, D, device=dev, dtype=torch.bfloat16)
            ms = time_ms(lambda i: sdpa(q, k, v, True))
            flops = 4 * tokens * (tokens + 1) / 2 * D * hq
            print(f"| prefill causal | {label} | 1 | {tokens} | {ms * 1e3:.1f} | {flops / ms / 1e9:.0f} TFLOP/s |")


if __name__ == "__main__":
    main()
