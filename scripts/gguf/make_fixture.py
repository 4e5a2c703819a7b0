"""Writes worker/tests/fixtures/gguf/types.gguf and types.json with gguf-py (the
writer llama.cpp uses) as the independent reference for stral's GGUF decoders.

Each tensor is 2 x 512 values. F32/F16/BF16 hold seeded normal values; Q8_0,
Q4_0 and Q4_K hold seeded random blocks (with small finite f16 scales), so every
bit pattern of the quantized payload is exercised. types.json maps each tensor
name to its type and gguf.quants.dequantize's float32 values.

    python -m venv venv && venv/bin/pip install -r scripts/gguf/requirements.txt
    venv/bin/python scripts/gguf/make_fixture.py
"""

import json
import pathlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = pathlib.Path(__file__).resolve().parents[2] / "worker/tests/fixtures/gguf"
ROWS, COLS = 2, 512


def random_blocks(rng, qtype):
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    n_scales = 2 if qtype == T.Q4_K else 1  # Q4_K: d and dmin
    scales = rng.uniform(-0.05, 0.05, size=(n_blocks, n_scales)).astype(np.float16)
    raw[:, : 2 * n_scales] = scales.view(np.uint8).reshape(n_blocks, 2 * n_scales)
    return raw.reshape(ROWS, COLS // block_elems * block_bytes)


def main():
    rng = np.random.default_rng(23)
    OUT.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(OUT / "types.gguf"), arch="llama")
    expected = {}
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    for name, qtype in [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16)]:
        data = quantize(values, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = (qtype.name, dequantize(data, qtype))
    for name, qtype in [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_k", T.Q4_K)]:
        data = random_blocks(rng, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = (qtype.name, dequantize(data, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    doc = {
        name: {"type": ty, "shape": list(v.shape), "values": [float(x) for x in v.reshape(-1)]}
        for name, (ty, v) in expected.items()
    }
    (OUT / "types.json").write_text(json.dumps(doc) + "\n")


if __name__ == "__main__":
    main()
