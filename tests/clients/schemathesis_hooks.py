"""Schemathesis hooks for tests/sdk_clients.rs (loaded through SCHEMATHESIS_HOOKS).

Generated bodies may ask for up to the whole context (a missing `max_tokens` means
"the rest of the context"). To keep the fuzzing run short, a body that is a JSON object
gets a small `max_tokens` when it has none (absent or null) or an in-range integer above
the cap, and an in-range `min_tokens` above that is lowered to it (min_tokens >
max_tokens is a 400 that JSON Schema cannot express). Every other value (a wrong type,
zero, a negative or out-of-range number) is left alone, so negative cases stay negative
and the server still has to reject them.
"""

import schemathesis

MAX_TOKENS_CAP = 8
U32_MAX = 2**32 - 1


def _int_in(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


@schemathesis.hook
def before_call(context, case, kwargs):
    """Runs before every request of every phase (coverage cases skip the map_* hooks)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if body.get("max_tokens") is None or _int_in(body["max_tokens"], MAX_TOKENS_CAP + 1, U32_MAX):
        body["max_tokens"] = MAX_TOKENS_CAP
    m = body["max_tokens"]
    if _int_in(m, 1, U32_MAX) and _int_in(body.get("min_tokens"), m + 1, U32_MAX):
        body["min_tokens"] = m
