#!/usr/bin/env python3
"""Speculative decoding on the CPU (issue #19's Benchmark section), against a running
`stral serve` (speculation on: prompt lookup by default). "Off" runs send
`"speculative": false` to the same server, so off and on alternate within one run on
the same processes and model.

Cases, each greedy with a fixed output length (`min_tokens` = `max_tokens`):
  (a) prediction = the request's own greedy output (from the preceding off run)
  (b) the same with every 10th token replaced (tokens from the off run's logprobs)
  (c) prompt lookup only, on a prompt whose greedy output repeats part of it
  (d) no useful draft: a prompt of distinct words and an unrelated prediction
  batch16 (a): 16 concurrent streams, each predicting its own greedy output

Decode tokens/s of one stream = (completion_tokens - 1) / (last chunk - first chunk);
for the batch, all output tokens / (last end - first send). Acceptance = accepted /
(accepted + rejected) from the responses' usage; mean accepted length = accepted
drafts per verified draft, from /metrics' `stral_spec_acceptance_length` over the on
runs; engine steps per run and mean step wall time from /metrics (what a verified
draft costs the step). Prints a Markdown table.

Usage: spec_bench.py PORT [ROUNDS] [MAX_TOKENS]
"""
import json
import statistics
import sys
import threading
import time
import http.client

PORT = int(sys.argv[1])
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
MAX_TOKENS = int(sys.argv[3]) if len(sys.argv) > 3 else 256
BATCH, BATCH_TOKENS = 16, 128

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu")
UNRELATED = "SELECT name, email FROM users WHERE id = 42 ORDER BY created_at DESC;\n" * 8


def stream(body):
    """One streamed chat request: (tokens, decode seconds, usage, text, start, end)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first = last = None
    usage, text = None, []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        v = json.loads(data)
        assert "error" not in v, v
        if v.get("usage"):
            usage = v["usage"]
        for c in v.get("choices", []):
            piece = (c.get("delta") or {}).get("content") or ""
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text.append(piece)
    end = time.perf_counter()
    conn.close()
    n = usage["completion_tokens"]
    return n, (last - first) if n > 1 else 0.0, usage, "".join(text), start, end


def post(body):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    v = json.loads(conn.getresponse().read())
    conn.close()
    return v


def metrics():
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        for name in ("stral_spec_acceptance_length_sum", "stral_spec_acceptance_length_count",
                     "stral_engine_steps_total", "stral_step_duration_seconds_sum"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def request(prompt, max_tokens=MAX_TOKENS, **extra):
    return dict({"model": "codestral-latest", "temperature": 0, "max_tokens": max_tokens,
                 "min_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}, **extra)


def every_10th_changed(prompt):
    """The greedy output of `prompt` with tokens 10, 20, ... replaced."""
    v = post(request(prompt, logprobs=True, speculative=False))
    tokens = [t["token"] for t in v["choices"][0]["logprobs"]["content"]]
    return "".join(" elephant" if i % 10 == 9 else t for i, t in enumerate(tokens))


class Case:
    def __init__(self, name):
        self.name = name
        self.off, self.on = [], []
        self.accepted = self.rejected = 0
        self.len_sum = self.len_count = 0.0
        self.identical = True
        # Engine steps and their summed wall time, off and on.
        self.steps = {"off": [0.0, 0.0], "on": [0.0, 0.0]}

    def count_steps(self, mode, before, after):
        s = self.steps[mode]
        s[0] += after["stral_engine_steps_total"] - before["stral_engine_steps_total"]
        s[1] += after["stral_step_duration_seconds_sum"] - before["stral_step_duration_seconds_sum"]

    def row(self):
        off, on = statistics.median(self.off), statistics.median(self.on)
        verified = self.accepted + self.rejected
        rate = f"{100 * self.accepted / verified:.0f} %" if verified else "no drafts"
        mean_len = f"{self.len_sum / self.len_count:.2f}" if self.len_count else "–"
        same = "yes" if self.identical else "**NO**"
        (n_off, t_off), (n_on, t_on) = self.steps["off"], self.steps["on"]
        steps = f"{n_off / ROUNDS:.0f} / {n_on / ROUNDS:.0f}"
        step_ms = f"{1e3 * t_off / n_off:.2f} / {1e3 * t_on / n_on:.2f}"
        return (f"| {self.name} | {off:.1f} | {on:.1f} | {on / off:.2f}× | {rate} | {mean_len} "
                f"| {steps} | {step_ms} | {same} |")


def single(case, prompt, prediction_of):
    """Alternates off and on runs; `prediction_of(plain_text)` gives the on run's extras."""
    for _ in range(ROUNDS):
        before = metrics()
        n, dt, _, plain, _, _ = stream(request(prompt, speculative=False))
        case.count_steps("off", before, metrics())
        case.off.append((n - 1) / dt)
        before = metrics()
        n, dt, usage, text, _, _ = stream(request(prompt, **prediction_of(plain)))
        after = metrics()
        case.count_steps("on", before, after)
        case.on.append((n - 1) / dt)
        d = usage["completion_tokens_details"]
        case.accepted += d["accepted_prediction_tokens"]
        case.rejected += d["rejected_prediction_tokens"]
        case.len_sum += after["stral_spec_acceptance_length_sum"] - before["stral_spec_acceptance_length_sum"]
        case.len_count += after["stral_spec_acceptance_length_count"] - before["stral_spec_acceptance_length_count"]
        case.identical &= text == plain


def batch(case):
    prompts = [f"Rewrite function {i}:\n{CODE}" for i in range(BATCH)]

    def run(extras):
        results = [None] * BATCH

        def one(i):
            results[i] = stream(request(prompts[i], max_tokens=BATCH_TOKENS, **extras[i]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(BATCH)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tokens = sum(r[0] for r in results)
        wall = max(r[5] for r in results) - min(r[4] for r in results)
        return tokens / wall, results

    for _ in range(ROUNDS):
        before = metrics()
        tput, plain = run([{"speculative": False}] * BATCH)
        case.count_steps("off", before, metrics())
        case.off.append(tput)
        before = metrics()
        tput, spec = run([{"prediction": {"type": "content", "content": p[3]}} for p in plain])
        after = metrics()
        case.count_steps("on", before, after)
        case.on.append(tput)
        for r in spec:
            d = r[2]["completion_tokens_details"]
            case.accepted += d["accepted_prediction_tokens"]
            case.rejected += d["rejected_prediction_tokens"]
        case.len_sum += after["stral_spec_acceptance_length_sum"] - before["stral_spec_acceptance_length_sum"]
        case.len_count += after["stral_spec_acceptance_length_count"] - before["stral_spec_acceptance_length_count"]
        case.identical &= [p[3] for p in plain] == [s[3] for s in spec]


def main():
    edit = f"Rewrite this code:\n{CODE}"
    stream(request(edit, speculative=False))  # warm-up
    cases = []
    a = Case("(a) prediction = greedy output")
    single(a, edit, lambda plain: {"prediction": {"type": "content", "content": plain}})
    cases.append(a)
    b = Case("(b) prediction, every 10th token changed")
    changed = every_10th_changed(edit)
    single(b, edit, lambda plain: {"prediction": {"type": "content", "content": changed}})
    cases.append(b)
    c = Case("(c) prompt lookup, output repeats the prompt")
    single(c, "Copy:\n" + "x = x + 1\n" * 20, lambda plain: {})
    cases.append(c)
    d = Case("(d) no useful draft (distinct words, unrelated prediction)")
    single(d, WORDS, lambda plain: {"prediction": {"type": "content", "content": UNRELATED}})
    cases.append(d)
    e = Case(f"batch {BATCH}, (a)")
    batch(e)
    cases.append(e)
    print(f"{ROUNDS} off/on pairs per case, alternated; single stream {MAX_TOKENS} tokens, "
          f"batch {BATCH} × {BATCH_TOKENS} tokens; medians\n")
    print("| case | off tok/s | on tok/s | speed-up | acceptance | mean accepted length "
          "| steps per run off / on | ms per step off / on | same text |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        print(case.row())


if __name__ == "__main__":
    main()
