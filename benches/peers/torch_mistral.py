#!/usr/bin/env python3
"""The PyTorch peer for the CUDA step benchmark (issue #16, item 4).

Hugging Face transformers `MistralForCausalLM` of the same shape as stral's
`synthetic:codestral-22b` (read from worker/src/config.rs, or from the shapes.json that
worker/scripts/device-pack.sh writes from it), random bf16 weights, SDPA attention,
a static KV cache (`--compile`: torch.compile, mode reduce-overhead). In one run it
measures, on the same GPU:

  - device copy bandwidth (1 GiB device-to-device, read + write) and the bf16 GEMM
    rate at stral's bench shape (8192 x 16384 x 6144): the roofline inputs;
  - decode step time at batch 1/8/64/256 x context 1K/8K (one token per sequence
    against a cache of `context` positions; shapes whose KV cache does not fit in
    the free memory are listed as skipped), against the weights-read roofline;
  - prefill tokens/s at 2K and 8K prompts, against the measured GEMM rate;

and writes markdown (`--out peer.md`, rewritten after every shape, so a timeout keeps
what was measured). `--stral bench.md` (cuda_step_bench's output) adds stral's time
and stral time / PyTorch time per shape.

`--tiny`: the tiny preset, small batches and contexts, on CPU when there is no GPU
(a check that the script runs, not a benchmark). `--print-shape`: prints the shapes
parsed from worker/src/config.rs as JSON and exits (needs no torch).
"""

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_RS = os.path.join(HERE, "..", "..", "worker", "src", "config.rs")
PRESETS = {"codestral-22b": "codestral_22b", "tiny": "tiny"}
FIELDS = ["n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
          "vocab_size", "norm_eps", "rope_theta", "max_position_embeddings"]


def parse_config_rs(path):
    """The presets' fields from `pub fn <preset>() -> Self { Self { field: value, ... } }`."""
    src = open(path).read()
    shapes = {}
    for name, fn in PRESETS.items():
        m = re.search(r"pub fn " + fn + r"\(\) -> Self \{\s*Self \{(.*?)\}\s*\}", src, re.S)
        if not m:
            raise SystemExit(f"{path}: no `pub fn {fn}() -> Self {{ Self {{ .. }} }}`")
        shape = {}
        for key, val in re.findall(r"(\w+):\s*([^,\n]+),", m.group(1)):
            val = val.strip()
            if val == "None":
                shape[key] = None
            elif re.fullmatch(r"-?[0-9_]+", val):
                shape[key] = int(val.replace("_", ""))
            else:
                try:
                    shape[key] = float(val)
                except ValueError:
                    continue
        missing = [f for f in FIELDS if f not in shape]
        if missing:
            raise SystemExit(f"{path}: preset {fn} lacks {missing}")
        shapes[name] = shape
    return shapes


def load_shapes(args):
    if args.shapes:
        return json.load(open(args.shapes))
    local = os.path.join(HERE, "shapes.json")
    if os.path.exists(local):
        return json.load(open(local))
    return parse_config_rs(args.config_rs)


def parse_stral_bench(path):
    """{("decode", batch, ctx): ms, ("prefill", prompt): tokens/s} from bench.md."""
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        try:
            if cells[0] == "decode" and len(cells) >= 4:
                out[("decode", int(cells[1]), int(cells[2]))] = float(cells[3])
            elif cells[0] == "prefill" and len(cells) >= 3:
                out[("prefill", int(cells[1]))] = float(cells[2])
        except ValueError:
            pass  # "(KV too small)" and header rows
    return out


class Report:
    """The markdown report, rewritten after every measurement."""

    def __init__(self, path, head, stral):
        self.path, self.head, self.stral = path, head, stral
        self.decode, self.prefill, self.notes = [], [], []

    def write(self):
        s = self.stral is not None
        lines = list(self.head) + [""]
        lines.append("| step | batch | context | PyTorch ms/step | x roofline |"
                     + (" stral ms/step | stral / PyTorch |" if s else ""))
        lines.append("|---|---|---|---|---|" + ("---|---|" if s else ""))
        for b, c, ms, roof in self.decode:
            row = f"| decode | {b} | {c} | " + (f"{ms:.2f} | {ms / roof:.2f} |" if ms else "(skipped: KV does not fit) | |")
            if s:
                st = self.stral.get(("decode", b, c))
                row += (f" {st:.2f} | {st / ms:.2f} |" if st and ms else " | |")
            lines.append(row)
        lines += ["", "| step | prompt | PyTorch tokens/s | % of GEMM rate |"
                  + (" stral tokens/s | stral / PyTorch (time) |" if s else ""),
                  "|---|---|---|---|" + ("---|---|" if s else "")]
        for p, tps, pct in self.prefill:
            row = f"| prefill | {p} | {tps:.0f} | {pct:.0f} % |"
            if s:
                st = self.stral.get(("prefill", p))
                row += (f" {st:.0f} | {tps / st:.2f} |" if st else " | |")
            lines.append(row)
        lines += [""] + [f"- {n}" for n in self.notes]
        text = "\n".join(lines) + "\n"
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                f.write(text)
            os.replace(self.path + ".tmp", self.path)
        return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="codestral-22b", choices=sorted(PRESETS))
    ap.add_argument("--shapes", help="shapes.json (device-pack.sh writes it); default: "
                    "shapes.json next to this script, else parse --config-rs")
    ap.add_argument("--config-rs", default=CONFIG_RS)
    ap.add_argument("--print-shape", action="store_true", help="print the parsed shapes as JSON and exit")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, small shapes, CPU if no GPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward (reduce-overhead)")
    ap.add_argument("--stral", help="cuda_step_bench output (bench.md) to compare against")
    ap.add_argument("--out", default="peer.md")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    if args.print_shape:
        print(json.dumps(parse_config_rs(args.config_rs), indent=2))
        return 0
    shapes = load_shapes(args)
    preset = "tiny" if args.tiny else args.preset
    shape = shapes[preset]
    stral = parse_stral_bench(args.stral) if args.stral and os.path.exists(args.stral) else None

    import torch
    import transformers
    from transformers import MistralConfig, MistralForCausalLM

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("error: no CUDA device visible to torch (use --tiny for a CPU check)", file=sys.stderr)
        return 3
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16
    batches, contexts, prompts = ([1, 2], [64, 256], [64, 256]) if args.tiny else (
        [1, 8, 64, 256], [1024, 8192], [2048, 8192])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, reps):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps

    # Roofline inputs, measured here.
    n = (1 << 29) if cuda else (1 << 22)
    src = torch.empty(n, dtype=dt, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * n * 2 / timed(lambda: dst.copy_(src), 10) / 1e9
    del src, dst
    m, nn, k = (8192, 16384, 6144) if cuda else (256, 512, 256)
    x = torch.randn(m, k, dtype=dt, device=dev)
    w = torch.randn(k, nn, dtype=dt, device=dev)
    gemm_tflops = 2 * m * nn * k / timed(lambda: x @ w, 10) / 1e12
    del x, w

    cfg = MistralConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
        intermediate_size=shape["hidden_dim"], num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
        head_dim=shape["head_dim"], rms_norm_eps=shape["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        max_position_embeddings=shape["max_position_embeddings"],
        sliding_window=None, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(dt)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = MistralForCausalLM(cfg)
    model.eval()
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    roofline_ms = weight_bytes / (copy_gbs * 1e9) * 1e3
    load_s = time.perf_counter() - t0
    forward = model.forward
    if args.compile:
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    gpu = torch.cuda.get_device_name(0) if cuda else "CPU"
    head = [f"## PyTorch peer - {preset}: {shape['n_layers']} layers, dim {shape['dim']}, "
            f"{n_params / 1e9:.2f} B params, bf16, SDPA, static KV cache"
            + (", torch.compile" if args.compile else ", eager"),
            "",
            f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"random weights built in {load_s:.1f} s",
            "",
            f"copy bandwidth {copy_gbs:.0f} GB/s -> weights-read roofline {roofline_ms:.2f} ms; "
            f"bf16 GEMM {m}x{nn}x{k}: {gemm_tflops:.0f} TFLOP/s"]
    rep = Report(args.out, head, stral)
    rep.write()

    kv_per_token = 2 * shape["n_layers"] * shape["n_kv_heads"] * shape["head_dim"] * 2

    def fits(batch, context):
        if not cuda:
            return True
        free, _ = torch.cuda.mem_get_info()
        # The static KV cache plus f32 logits and activations, with 15 % headroom.
        need = batch * context * kv_per_token + batch * (shape["vocab_size"] + 8 * shape["hidden_dim"]) * 4
        return need < 0.85 * free

    def cache_for(length):
        # transformers 5: the static cache allocates on first update and keeps its own
        # write position per layer (`cumulative_length`), which `at` sets.
        from transformers import StaticCache
        return StaticCache(config=cfg, max_cache_len=length)

    def at(cache, position):
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(position)

    with torch.inference_mode():
        for c in contexts:
            for b in batches:
                if not fits(b, c):
                    rep.decode.append((b, c, None, roofline_ms))
                    rep.write()
                    continue
                cache = cache_for(c)
                ids = torch.ones(b, 1, dtype=torch.long, device=dev)
                pos = torch.full((b, 1), c - 1, dtype=torch.long, device=dev)

                def step():
                    at(cache, c - 1)  # every step writes slot c-1 and attends over c slots
                    return forward(input_ids=ids, position_ids=pos, past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
                ms = timed(step, args.reps) * 1e3
                rep.decode.append((b, c, ms, roofline_ms))
                rep.write()
                print(f"decode batch {b} context {c}: {ms:.2f} ms", file=sys.stderr)
                del cache
                if cuda:
                    torch.cuda.empty_cache()
        for p in prompts:
            cache = cache_for(p)
            ids = torch.ones(1, p, dtype=torch.long, device=dev)

            def step():
                at(cache, 0)
                return model.forward(input_ids=ids, past_key_values=cache, use_cache=True,
                                     logits_to_keep=1)
            s = timed(step, max(1, args.reps // 2))
            tps = p / s
            ideal = gemm_tflops * 1e12 / (2 * n_params)
            rep.prefill.append((p, tps, 100 * tps / ideal))
            rep.write()
            print(f"prefill {p}: {tps:.0f} tokens/s", file=sys.stderr)
            del cache
            if cuda:
                torch.cuda.empty_cache()
    rep.notes.append("decode: one new token per sequence written at slot context-1 of a static cache of "
                     "`context` slots, attending over all of them (contents are zeros; the cost does not "
                     "depend on them)")
    rep.notes.append("prefill: eager forward (also with --compile: shapes vary); logits of the last row only")
    print(rep.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
