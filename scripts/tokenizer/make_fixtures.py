#!/usr/bin/env python3
"""Write `coordinator/tests/fixtures/tokenizer_fixtures.json` from `mistral_common` itself.

The Rust tests (`coordinator/tests/tokenizer_fixtures.rs`) must reproduce every id here
without Python. Sections:
  encode  raw text -> ids (no BOS/EOS), and the SentencePiece decode of those ids
  fim     `MistralTokenizer.v3().encode_fim(FIMRequest(prompt=prefix, suffix=suffix))`
  chat    `encode_chat_completion(ChatCompletionRequest(messages=...))`, or the exception
          class name when mistral_common rejects the conversation
  decode  ids -> text (`decode`, SpecialTokenPolicy.IGNORE): model-like outputs, control
          tokens mid-stream, broken byte-fallback sequences, random ids

Run from the repository root (after convert_tokenizer.py's venv is set up):
    target/pyenv-tok/bin/python scripts/tokenizer/make_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import warnings
from pathlib import Path

import mistral_common
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from corpus import SNIPPETS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "coordinator/tests/fixtures/tokenizer_fixtures.json"
SEED = 20240529

warnings.filterwarnings("ignore")
MT = MistralTokenizer.v3()
SP = MT.instruct_tokenizer.tokenizer


def enc(text: str) -> list[int]:
    return SP.encode(text, bos=False, eos=False)


def encode_cases() -> list[dict]:
    edge = {
        "empty": "",
        "one_space": " ",
        "two_spaces": "  ",
        "newline": "\n",
        "crlf": "\r\n",
        "tab": "\t",
        "leading_space": " def f(): pass",
        "trailing_spaces": "return x   ",
        "literal_metaspace": "\u2581x \u2581\u2581 y\u2581",
        "inst_text": "[INST] hi [/INST]",
        "bos_eos_text": "<s>x</s>",
        "fim_text": "[SUFFIX]a[PREFIX]b[MIDDLE]",
        "reference_doc_first": "[REFERENCE_DOC_0]x",
        "reference_doc_mid": "see [REFERENCE_DOC_12] and[REFERENCE_DOC_1]y",
        "reference_doc_only": "[REFERENCE_DOC_19]",
        "byte_token_text": "<0x41><unk>",
        "smiley": "\u263a",
        "rare_cjk": "\U00020000\U0002a6a5\u9f98",
        "emoji_zwj": "\U0001f468\u200d\U0001f469\u200d\U0001f467",
        "digits": "1234567890 3.14159 -42",
        "long_run_spaces": " " * 37 + "x" + "\t" * 9 + "y",
        "repeat_aba": "abababababa ababab",
        "nul_and_controls": "a\x00b\x01c\x7fd",
    }
    cases = [{"name": f"edge_{k}", "text": v} for k, v in edge.items()]
    cases += [{"name": f"snippet_{k}", "text": v} for k, v in SNIPPETS.items()]
    for c in cases:
        c["ids"] = enc(c["text"])
        c["decoded"] = SP.decode(c["ids"])
    return cases


def fim_cases() -> list[dict]:
    rng = random.Random(SEED)
    pairs = [
        ("architecture_example", "def add(a, b):\n    ", "\n\nprint(add(1,2))"),
        ("empty_prefix", "", "    return a + b\n"),
        ("empty_suffix", "def add(a, b):\n    return", ""),
        ("both_empty", "", ""),
        ("suffix_leading_space", "x =", " 1\n"),
        ("suffix_leading_spaces", "if x:\n", "    pass\n"),
        ("suffix_leading_newline", "a = 1", "\nb = 2"),
        ("suffix_leading_tab", "func f() {\n", "\treturn\n}"),
        ("suffix_space_only", "x", " "),
        ("prefix_space_only", " ", "y"),
        ("prefix_trailing_space", "return ", "\n"),
        ("suffix_smiley_first", "s = '", "\u263a smile'"),
        ("suffix_metaspace_first", "a", "\u2581b"),
        ("suffix_emoji_first", "msg = \"", "\U0001f600\"\n"),
        ("suffix_crlf", "int x;\r\n", "\r\nint y;\r\n"),
        ("control_text", "# [INST] not a token\n", "[PREFIX][SUFFIX]</s>"),
        ("suffix_reference_doc_first", "x", "[REFERENCE_DOC_1]y"),
        ("unicode_identifiers", "def 总价(单价):\n    ", "\n# Grüße \u263a"),
    ]
    cases = [{"name": n, "prefix": p, "suffix": s} for n, p, s in pairs]
    for name, text in SNIPPETS.items():
        cuts = {rng.randrange(len(text) + 1) for _ in range(4)}
        nl = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        if nl:
            cuts.add(rng.choice(nl))
        for cut in sorted(cuts):
            cases.append({
                "name": f"{name}@{cut}",
                "prefix": text[max(0, cut - 300):cut],
                "suffix": text[cut:cut + 150],
            })
    for c in cases:
        c["ids"] = MT.encode_fim(FIMRequest(prompt=c["prefix"], suffix=c["suffix"])).tokens
    return cases


def chat_cases() -> list[dict]:
    S = lambda c: {"role": "system", "content": c}  # noqa: E731
    U = lambda c: {"role": "user", "content": c}  # noqa: E731
    A = lambda c, prefix=False: {"role": "assistant", "content": c, "prefix": prefix}  # noqa: E731
    code = SNIPPETS["python_class"]
    convs = {
        "single_user": [U("Write a function that reverses a string.")],
        "system_user": [S("You are a terse coding assistant."), U("What does `git rebase -i` do?")],
        "multi_turn_system_last_user": [
            S("Answer in French."), U("Explain this:\n" + code), A("C'est une classe d'intervalles."),
            U("And `merge`?"), A("Elle fusionne les intervalles qui se chevauchent.  "), U("Merci !"),
        ],
        "two_system_prompts": [S("Rule 1."), U("a"), S("Rule 2."), U("b")],
        "system_between_users": [U("first"), S("sys"), U("second")],
        "consecutive_users": [U("part one"), U("part two"), U("")],
        "consecutive_assistants": [U("q"), A("a1"), A("a2"), U("q2")],
        "assistant_trailing_spaces": [U("q"), A("answer   "), U("again")],
        "assistant_trailing_newline_tab": [U("q"), A("answer\n\t "), U("again")],
        "assistant_prefix_last": [U("Complete:"), A("def f(x):\n    return", prefix=True)],
        "assistant_first": [A("I start."), U("ok")],
        "system_only": [S("Only a system prompt.")],
        "empty_user": [U("")],
        "empty_system_ignored": [S(""), U("hi")],
        "control_text_in_user": [U("[INST] ignore [/INST] </s><s>[SUFFIX] [REFERENCE_DOC_2]")],
        "unicode_crlf_user": [U(SNIPPETS["c_crlf"] + "\nWhy 🤔? 中文 𠀀")],
        "leading_trailing_ws_user": [S("  sys  "), U("  padded  \n")],
        "go_code_user": [U("Review:\n" + SNIPPETS["go_tabs"])],
        # Rejected by mistral_common (the Rust side must reject them too).
        "err_empty": [],
        "err_single_assistant": [A("hello")],
        "err_last_assistant": [U("q"), A("a")],
        "err_assistant_then_system": [U("q"), A("a"), S("s"), U("q2")],
        "err_empty_assistant": [U("q"), A(""), U("q2")],
        "err_prefix_not_last": [U("q"), A("a", prefix=True), U("q2")],
    }
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    cases = []
    for name, msgs in convs.items():
        case: dict = {"name": name, "messages": msgs}
        try:
            objs = [classes[m["role"]](**{k: v for k, v in m.items() if k != "role"}) for m in msgs]
            case["ids"] = MT.encode_chat_completion(ChatCompletionRequest(messages=objs)).tokens
        except Exception as exc:  # noqa: BLE001 -- the class name is the fixture
            case["error"] = type(exc).__name__
        assert name.startswith("err_") == ("error" in case), (name, case.get("error"))
        cases.append(case)
    return cases


def decode_cases() -> list[dict]:
    p = SP._model.piece_to_id
    b = lambda x: p(f"<0x{x:02X}>")  # noqa: E731
    rng = random.Random(SEED + 1)
    seqs = {
        "chat_answer_eos": [*enc("Sure! Here is the code:\n```python\nprint('hi')\n```"), 2],
        "fim_middle_keeps_first_piece": enc("return a + b"),
        "leading_metaspace_pieces": [p("\u2581"), p("\u2581foo")],
        "control_first": [1, 3, p("\u2581foo"), 4],
        "control_mid": [p("\u2581a"), 3, p("\u2581b"), 13, 11],
        "unk_first": [0, p("\u2581x")],
        "emoji_bytes": [p("\u2581hi"), b(0xF0), b(0x9F), b(0x98), b(0x80), p("!")],
        "cjk_bytes_after_space": [p("\u2581"), b(0xE4), b(0xB8), b(0xAD)],
        "truncated_bytes_then_text": [b(0xE4), b(0xB8), p("a"), b(0xF0), b(0x9F), b(0x98), b(0x80)],
        "truncated_bytes_at_end": [p("a"), b(0xE4), b(0xB8)],
        "invalid_byte_mid_run": [b(0xE4), b(0xB8), b(0xAD), b(0xFF), b(0x41)],
        "lone_continuation": [b(0x80), p("\u2581x")],
        "overlong_and_surrogate": [b(0xC0), b(0x80), b(0xED), b(0xA0), b(0x80)],
        "byte_space_first": [b(0x20), p("\u2581x")],
        "metaspace_as_bytes": [p("a"), b(0xE2), b(0x96), b(0x81), p("b")],
        "newline_bytes_first": [b(0x0A), p("\u2581x")],
        "reference_doc_piece": [770, p("\u2581x")],
        "only_controls": [1, 2, 3],
        "empty": [],
    }
    for i in range(12):
        seqs[f"random_ids_{i}"] = [rng.randrange(32768) for _ in range(40)]
    for i in range(6):
        seqs[f"random_bytes_{i}"] = [771 + rng.randrange(256) for _ in range(24)]
    return [{"name": k, "ids": v, "text": SP.decode(v)} for k, v in seqs.items()]


def dump(obj: dict) -> str:
    """One case per line, so a failing case is easy to find and the diff stays readable."""
    d = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    lines = ["{"]
    items = list(obj.items())
    for n, (k, v) in enumerate(items):
        comma = "," if n + 1 < len(items) else ""
        if isinstance(v, list):
            lines.append(f"  {d(k)}: [")
            lines.append(",\n".join(f"    {d(c)}" for c in v))
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {d(k)}: {d(v)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    model = Path(SP.file_path).read_bytes()
    obj = {
        "generator": "scripts/tokenizer/make_fixtures.py",
        "mistral_common": mistral_common.__version__,
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "encode": encode_cases(),
        "fim": fim_cases(),
        "chat": chat_cases(),
        "decode": decode_cases(),
    }
    text = dump(obj)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    counts = ", ".join(f"{k} {len(obj[k])}" for k in ("encode", "fim", "chat", "decode"))
    print(f"wrote {OUT.relative_to(REPO)} ({len(text.encode())} bytes): {counts}")


if __name__ == "__main__":
    main()
