"""The real API clients against a live `stral serve` (driven by tests/sdk_clients.rs).

Runs the unmodified `mistralai` and `openai` SDKs (pinned in requirements.txt) against
the server at --base-url, which must have been started with --api-key KEY, and fails
(non-zero exit, AssertionError naming the check) on any incompatibility:

- mistralai: fim.complete, fim.stream, chat.complete, chat.stream
- openai: chat.completions.create and completions.create (with suffix), each streamed
  and not streamed
- greedy (temperature 0) streamed pieces concatenate to the non-streamed text
- finish_reason is stop or length; usage counts add up and match the streamed length
- both default aliases (codestral-latest, codestral-2405) are accepted; an unknown model
  is a 404 and a wrong key a 401, each raised as the SDK's own error type
- the same prompt twice reports usage.prompt_tokens_details.cached_tokens > 0

Prints one line per check to stdout.
"""

import argparse
import sys

import mistralai.client.errors as mistral_errors
import openai
from mistralai.client import Mistral

PREFIX = "def fibonacci(n):\n    "
SUFFIX = "\n\nprint(fibonacci(10))\n"
MAX_TOKENS = 12
FINISH = ("stop", "length")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def check_usage(usage, what, completion_tokens=None):
    check(usage is not None, f"{what}: no usage")
    check(usage.prompt_tokens > 0, f"{what}: prompt_tokens {usage.prompt_tokens}")
    check(
        0 < usage.completion_tokens <= MAX_TOKENS,
        f"{what}: completion_tokens {usage.completion_tokens} not in 1..={MAX_TOKENS}",
    )
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: total_tokens {usage.total_tokens} != prompt + completion",
    )
    if completion_tokens is not None:
        check(
            usage.completion_tokens == completion_tokens,
            f"{what}: completion_tokens {usage.completion_tokens} != {completion_tokens}",
        )


def report(what, text, finish, usage):
    print(
        f"ok {what}: finish={finish} prompt={usage.prompt_tokens} "
        f"completion={usage.completion_tokens} text={text!r}"
    )


def mistral_checks(base_url, key):
    client = Mistral(api_key=key, server_url=base_url)
    # min_tokens keeps EOS away so the text is never empty.
    fim = dict(
        model="codestral-latest",
        prompt=PREFIX,
        suffix=SUFFIX,
        temperature=0,
        max_tokens=MAX_TOKENS,
        min_tokens=4,
    )
    r = client.fim.complete(**fim)
    text = r.choices[0].message.content
    finish = r.choices[0].finish_reason
    check(isinstance(text, str) and text, f"mistral fim.complete: empty text {text!r}")
    check(finish in FINISH, f"mistral fim.complete: finish_reason {finish}")
    check(r.model == "codestral-latest", f"mistral fim.complete: model echo {r.model}")
    check_usage(r.usage, "mistral fim.complete")
    report("mistral fim.complete", text, finish, r.usage)

    pieces, finish_s, usage_s, chunks = [], None, None, 0
    with client.fim.stream(**fim) as events:
        for ev in events:
            chunks += 1
            choice = ev.data.choices[0]
            if isinstance(choice.delta.content, str):
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_s = choice.finish_reason
            if ev.data.usage is not None:
                usage_s = ev.data.usage
    streamed = "".join(pieces)
    check(streamed == text, f"mistral fim.stream: {streamed!r} != complete {text!r}")
    check(finish_s == finish, f"mistral fim.stream: finish_reason {finish_s} != {finish}")
    check_usage(usage_s, "mistral fim.stream", r.usage.completion_tokens)
    check(chunks >= 2, f"mistral fim.stream: only {chunks} events")
    report("mistral fim.stream", streamed, finish_s, usage_s)

    chat = dict(
        model="codestral-2405",
        messages=[
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Write a function that adds two numbers."},
        ],
        temperature=0,
        max_tokens=MAX_TOKENS,
        min_tokens=4,
    )
    r = client.chat.complete(**chat)
    text = r.choices[0].message.content
    finish = r.choices[0].finish_reason
    check(isinstance(text, str) and text, f"mistral chat.complete: empty text {text!r}")
    check(finish in FINISH, f"mistral chat.complete: finish_reason {finish}")
    check(r.model == "codestral-2405", f"mistral chat.complete: model echo {r.model}")
    check_usage(r.usage, "mistral chat.complete")
    report("mistral chat.complete", text, finish, r.usage)

    pieces, finish_s, usage_s = [], None, None
    with client.chat.stream(**chat) as events:
        for ev in events:
            choice = ev.data.choices[0]
            if isinstance(choice.delta.content, str):
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_s = choice.finish_reason
            if ev.data.usage is not None:
                usage_s = ev.data.usage
    streamed = "".join(pieces)
    check(streamed == text, f"mistral chat.stream: {streamed!r} != complete {text!r}")
    check(finish_s == finish, f"mistral chat.stream: finish_reason {finish_s} != {finish}")
    check_usage(usage_s, "mistral chat.stream", r.usage.completion_tokens)
    report("mistral chat.stream", streamed, finish_s, usage_s)

    try:
        Mistral(api_key="wrong-key", server_url=base_url).fim.complete(**fim)
        raise AssertionError("mistral: a wrong API key was accepted")
    except mistral_errors.SDKError as e:
        check(e.status_code == 401, f"mistral wrong key: status {e.status_code}")
    print("ok mistral wrong key: 401")


def openai_checks(base_url, key):
    client = openai.OpenAI(api_key=key, base_url=f"{base_url}/v1", max_retries=0)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    chat = dict(
        model="codestral-latest",
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"min_tokens": 4},
    )
    r = client.chat.completions.create(**chat)
    text = r.choices[0].message.content
    finish = r.choices[0].finish_reason
    check(isinstance(text, str) and text, f"openai chat: empty text {text!r}")
    check(finish in FINISH, f"openai chat: finish_reason {finish}")
    check(r.object == "chat.completion", f"openai chat: object {r.object}")
    check_usage(r.usage, "openai chat")
    report("openai chat.completions.create", text, finish, r.usage)

    pieces, finish_s, usage_s = [], None, None
    for ch in client.chat.completions.create(
        **chat, stream=True, stream_options={"include_usage": True}
    ):
        check(ch.object == "chat.completion.chunk", f"openai chat stream: object {ch.object}")
        if ch.choices:
            if ch.choices[0].delta.content is not None:
                pieces.append(ch.choices[0].delta.content)
            if ch.choices[0].finish_reason is not None:
                finish_s = ch.choices[0].finish_reason
        if ch.usage is not None:
            usage_s = ch.usage
    streamed = "".join(pieces)
    check(streamed == text, f"openai chat stream: {streamed!r} != {text!r}")
    check(finish_s == finish, f"openai chat stream: finish_reason {finish_s} != {finish}")
    check_usage(usage_s, "openai chat stream", r.usage.completion_tokens)
    report("openai chat.completions.create(stream)", streamed, finish_s, usage_s)

    legacy = dict(
        model="codestral-2405",
        prompt=PREFIX,
        suffix=SUFFIX,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"min_tokens": 4},
    )
    r = client.completions.create(**legacy)
    text = r.choices[0].text
    finish = r.choices[0].finish_reason
    check(isinstance(text, str) and text, f"openai completions: empty text {text!r}")
    check(finish in FINISH, f"openai completions: finish_reason {finish}")
    check(r.object == "text_completion", f"openai completions: object {r.object}")
    check_usage(r.usage, "openai completions")
    report("openai completions.create(suffix)", text, finish, r.usage)

    pieces, finish_s, usage_s = [], None, None
    for ch in client.completions.create(
        **legacy, stream=True, stream_options={"include_usage": True}
    ):
        if ch.choices:
            pieces.append(ch.choices[0].text)
            if ch.choices[0].finish_reason is not None:
                finish_s = ch.choices[0].finish_reason
        if ch.usage is not None:
            usage_s = ch.usage
    streamed = "".join(pieces)
    check(streamed == text, f"openai completions stream: {streamed!r} != {text!r}")
    check(finish_s == finish, f"openai completions stream: finish_reason {finish_s} != {finish}")
    check_usage(usage_s, "openai completions stream", r.usage.completion_tokens)
    report("openai completions.create(suffix, stream)", streamed, finish_s, usage_s)

    # Prefix caching: a prompt of several full KV blocks, sent twice.
    long_prompt = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(40))
    cached = []
    for _ in range(2):
        r = client.completions.create(
            model="codestral-latest", prompt=long_prompt, temperature=0, max_tokens=2
        )
        details = r.usage.prompt_tokens_details
        check(details is not None, "openai completions: no usage.prompt_tokens_details")
        check(
            0 <= details.cached_tokens < r.usage.prompt_tokens,
            f"cached_tokens {details.cached_tokens} of {r.usage.prompt_tokens} prompt tokens",
        )
        cached.append(details.cached_tokens)
    check(cached[1] > 0, f"second identical prompt reported cached_tokens {cached}")
    print(f"ok openai cached_tokens: first={cached[0]} second={cached[1]}")

    # Logprobs, parsed by the SDK's own types: greedy, so each token is its top alternative,
    # and the tokens (and their bytes) concatenate to the text.
    r = client.chat.completions.create(**chat, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    text = r.choices[0].message.content
    check(len(content) == r.usage.completion_tokens, f"openai chat logprobs: {len(content)} entries")
    check("".join(c.token for c in content) == text, "openai chat logprobs: tokens != text")
    check(bytes(b for c in content for b in c.bytes) == text.encode(), "openai chat logprobs: bytes")
    for c in content:
        check(len(c.top_logprobs) == 3, f"openai chat logprobs: {len(c.top_logprobs)} alternatives")
        best = max(c.top_logprobs, key=lambda t: t.logprob)
        check(c.logprob == best.logprob and c.token == best.token, f"greedy token {c} is not its best alternative")
        check(c.logprob <= 0, f"logprob {c.logprob} > 0")
    print(f"ok openai chat logprobs: {len(content)} tokens")
    r = client.completions.create(**legacy, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    check("".join(lp.tokens) == text, f"openai completions logprobs: {lp.tokens} != {text!r}")
    for tok, off in zip(lp.tokens, lp.text_offset):
        check(text[off:off + len(tok)] == tok, f"text_offset {off} does not index {tok!r}")
    for l, top in zip(lp.token_logprobs, lp.top_logprobs):
        check(l == max(top.values()), f"greedy logprob {l} is not the best of {top}")
    print(f"ok openai completions logprobs: {len(lp.tokens)} tokens")

    try:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
        raise AssertionError("openai: an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"openai unknown model: status {e.status_code}")
    print("ok openai unknown model: 404")

    try:
        openai.OpenAI(api_key="wrong-key", base_url=f"{base_url}/v1", max_retries=0).models.list()
        raise AssertionError("openai: a wrong API key was accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"openai wrong key: status {e.status_code}")
    models = [m.id for m in client.models.list()]
    check(
        "codestral-latest" in models and "codestral-2405" in models,
        f"openai models.list: {models}",
    )
    print(f"ok openai wrong key: 401; models.list: {models}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080")
    ap.add_argument("--api-key", required=True)
    args = ap.parse_args()
    mistral_checks(args.base_url, args.api_key)
    openai_checks(args.base_url, args.api_key)
    print("all SDK checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
