"""Code snippets the tokenizer fixtures are made of (see make_fixtures.py).

Each snippet stresses something the Codestral tokenizer has to get exactly right:
indentation with spaces and tabs, CRLF line ends, leading/trailing whitespace,
non-ASCII identifiers and strings, emoji and rare CJK (byte fallback), text that
looks like control tokens, and long lines.
"""

SNIPPETS: dict[str, str] = {}

SNIPPETS["python_class"] = '''import dataclasses
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Interval:
    """A half-open interval [lo, hi)."""

    lo: int
    hi: int

    def __contains__(self, x: int) -> bool:
        return self.lo <= x < self.hi

    def split(self, at: int) -> tuple["Interval", "Interval"]:
        if at not in self:
            raise ValueError(f"{at} outside [{self.lo}, {self.hi})")
        return Interval(self.lo, at), Interval(at, self.hi)


def merge(intervals: list[Interval]) -> Iterator[Interval]:
    cur = None
    for iv in sorted(intervals, key=lambda i: i.lo):
        if cur is None:
            cur = iv
        elif iv.lo <= cur.hi:
            cur = Interval(cur.lo, max(cur.hi, iv.hi))
        else:
            yield cur
            cur = iv
    if cur is not None:
        yield cur
'''

SNIPPETS["python_async_unicode"] = '''# -*- coding: utf-8 -*-
"""Télécharge des pages en parallèle — déjà testé à Zürich."""
import asyncio

GRÜSSE = {"de": "Grüß Gott", "fr": "Ça va ?", "es": "¿Qué tal?", "el": "Καλημέρα", "ru": "Привет"}


async def fetch(session, url: str, *, retries: int = 3) -> bytes:
    for attempt in range(retries):
        try:
            async with session.get(url, timeout=10) as resp:
                resp.raise_for_status()
                return await resp.read()
        except Exception as exc:  # noqa: BLE001
            print(f"essai {attempt + 1}/{retries} échoué: {exc!r} 😕")
            await asyncio.sleep(2 ** attempt)
    raise RuntimeError("abandon ✗")
'''

SNIPPETS["rust_trait"] = '''use std::collections::HashMap;
use std::fmt;

/// A least-recently-used cache with a fixed capacity.
pub struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    clock: u64,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V> Lru<K, V> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "capacity must be positive");
        Self { map: HashMap::with_capacity(capacity), clock: 0, capacity }
    }

    pub fn get(&mut self, k: &K) -> Option<&V> {
        self.clock += 1;
        let now = self.clock;
        self.map.get_mut(k).map(|(v, t)| {
            *t = now;
            &*v
        })
    }

    pub fn put(&mut self, k: K, v: V) {
        if self.map.len() == self.capacity && !self.map.contains_key(&k) {
            let oldest = self.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone());
            if let Some(o) = oldest {
                self.map.remove(&o);
            }
        }
        self.clock += 1;
        self.map.insert(k, (v, self.clock));
    }
}

impl<K, V> fmt::Debug for Lru<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lru {{ len: {}, cap: {} }}", self.map.len(), self.capacity)
    }
}
'''

SNIPPETS["rust_macro_lifetimes"] = '''macro_rules! try_opt {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Err(Error::Missing(stringify!($e))),
        }
    };
}

fn parse<'a>(s: &'a str) -> Result<(&'a str, u32), Error> {
    let (name, rest) = try_opt!(s.split_once('='));
    let n: u32 = rest.trim().parse().map_err(|_| Error::Number)?;
    Ok((name, n))
}
'''

SNIPPETS["js_react"] = '''import React, { useEffect, useState } from "react";

export default function Counter({ start = 0, step = 1 }) {
  const [count, setCount] = useState(start);
  useEffect(() => {
    document.title = `Clicked ${count} times 🎉`;
  }, [count]);
  return (
    <div className="counter">
      <p>You clicked {count} times</p>
      <button onClick={() => setCount((c) => c + step)}>+{step}</button>
      <button onClick={() => setCount(start)} disabled={count === start}>
        Reset
      </button>
    </div>
  );
}
'''

SNIPPETS["js_minified_long_line"] = (
    '!function(e,t){"object"==typeof exports&&"undefined"!=typeof module?module.exports=t():'
    '"function"==typeof define&&define.amd?define(t):(e=e||self).tiny=t()}(this,function(){"use strict";'
    'var e=function(e,t){for(var n=0,r=e.length;n<r;n++)if(t(e[n],n))return e[n]},t=function(e){return '
    'e.replace(/[&<>"\']/g,function(e){return{"&":"&amp;","<":"&lt;",">":"&gt;",\'"\':"&quot;","\'":"&#39;"}[e]})};'
    'return{find:e,escape:t,version:"1.4.2",sum:function(){for(var e=0,t=0;t<arguments.length;t++)e+=arguments[t];'
    'return e},range:function(e,t,n){n=n||1;for(var r=[],o=e;o<t;o+=n)r.push(o);return r}}});\n'
)

SNIPPETS["ts_generics"] = '''type Result<T, E = Error> = { ok: true; value: T } | { ok: false; error: E };

export async function retry<T>(fn: () => Promise<T>, attempts = 3): Promise<Result<T>> {
  let last: unknown;
  for (let i = 0; i < attempts; i++) {
    try {
      return { ok: true, value: await fn() };
    } catch (e) {
      last = e;
    }
  }
  return { ok: false, error: last instanceof Error ? last : new Error(String(last)) };
}
'''

SNIPPETS["c_crlf"] = (
    "#include <stdio.h>\r\n"
    "#include <stdlib.h>\r\n"
    "\r\n"
    "/* Windows line endings on purpose. */\r\n"
    "static int cmp(const void *a, const void *b) {\r\n"
    "    int x = *(const int *)a, y = *(const int *)b;\r\n"
    "    return (x > y) - (x < y);\r\n"
    "}\r\n"
    "\r\n"
    "int main(int argc, char **argv) {\r\n"
    "    int n = argc - 1;\r\n"
    "    int *v = malloc(sizeof *v * (size_t)n);\r\n"
    "    if (!v) { perror(\"malloc\"); return 1; }\r\n"
    "    for (int i = 0; i < n; i++) v[i] = atoi(argv[i + 1]);\r\n"
    "    qsort(v, (size_t)n, sizeof *v, cmp);\r\n"
    "    for (int i = 0; i < n; i++) printf(\"%d%c\", v[i], i + 1 == n ? '\\n' : ' ');\r\n"
    "    free(v);\r\n"
    "    return 0;\r\n"
    "}\r\n"
)

SNIPPETS["c_kernel_style_tabs"] = (
    "static int ring_push(struct ring *r, const void *src, size_t len)\n"
    "{\n"
    "\tsize_t head = READ_ONCE(r->head);\n"
    "\tsize_t tail = smp_load_acquire(&r->tail);\n"
    "\n"
    "\tif (len > r->size - (head - tail))\n"
    "\t\treturn -ENOSPC;\t/* full */\n"
    "\tmemcpy(r->buf + (head & r->mask), src, len);\n"
    "\tsmp_store_release(&r->head, head + len);\n"
    "\treturn 0;\n"
    "}\n"
)

SNIPPETS["go_tabs"] = (
    "package main\n"
    "\n"
    "import (\n"
    "\t\"fmt\"\n"
    "\t\"sync\"\n"
    ")\n"
    "\n"
    "// Fan out work to n goroutines and collect results in order.\n"
    "func parallelMap(xs []int, n int, f func(int) int) []int {\n"
    "\tout := make([]int, len(xs))\n"
    "\tvar wg sync.WaitGroup\n"
    "\tch := make(chan int)\n"
    "\tfor w := 0; w < n; w++ {\n"
    "\t\twg.Add(1)\n"
    "\t\tgo func() {\n"
    "\t\t\tdefer wg.Done()\n"
    "\t\t\tfor i := range ch {\n"
    "\t\t\t\tout[i] = f(xs[i])\n"
    "\t\t\t}\n"
    "\t\t}()\n"
    "\t}\n"
    "\tfor i := range xs {\n"
    "\t\tch <- i\n"
    "\t}\n"
    "\tclose(ch)\n"
    "\twg.Wait()\n"
    "\treturn out\n"
    "}\n"
    "\n"
    "func main() {\n"
    "\tfmt.Println(parallelMap([]int{1, 2, 3, 4}, 2, func(x int) int { return x * x }))\n"
    "}\n"
)

SNIPPETS["java_cjk_comments"] = '''public final class 订单服务 {
    // 计算订单总价（含税）。注意：税率按地区不同。
    public static long 总价(long[] 单价, int[] 数量, double 税率) {
        long sum = 0;
        for (int i = 0; i < 单价.length; i++) {
            sum += 单价[i] * 数量[i];
        }
        return Math.round(sum * (1.0 + 税率));
    }
    // 日本語のコメント：テスト用。한국어 주석도 있습니다.
}
'''

SNIPPETS["rare_cjk_emoji_bytes"] = (
    "# Rare characters that fall back to bytes: 𠀀𠀁 𪚥 龘 𰻞 (biáng)\n"
    "LABELS = {\n"
    '    "family": "👨\u200d👩\u200d👧\u200d👦",\n'
    '    "flag": "🇫🇷🇯🇵",\n'
    '    "skin": "👍🏽👋🏿",\n'
    '    "math": "𝔸𝕓𝒸 ∮ ∇ ≠ ≤ ℵ₀",\n'
    '    "misc": "🦀🐍🦫🪿 ☃ ♞ ⌘ ⏎",\n'
    "}\n"
)

SNIPPETS["control_token_text"] = '''# Prompt-injection-looking text must stay plain text.
TEMPLATE = "<s>[INST] {user} [/INST]"
FIM = "[SUFFIX]{suffix}[PREFIX]{prefix}[MIDDLE]"
assert "</s>" not in TEMPLATE.replace("<s>", "")
tools = "[AVAILABLE_TOOLS][/AVAILABLE_TOOLS][TOOL_CALLS][TOOL_RESULTS] <unk> [control_12]"
refs = "[REFERENCE_DOC_0] and [REFERENCE_DOC_19]"
'''

SNIPPETS["leading_trailing_ws"] = "   \n\t  def f():  \n        return  1   \n\n   "

SNIPPETS["shell_script"] = '''#!/usr/bin/env bash
set -euo pipefail
shopt -s nullglob

for f in "${1:-.}"/*.log; do
  n=$(grep -c 'ERROR' "$f" || true)
  if (( n > 0 )); then
    printf '%-40s %6d\\n' "$(basename "$f")" "$n"
  fi
done | sort -k2 -nr | head -n "${TOP:-10}"
'''

SNIPPETS["sql"] = '''-- Top customers by revenue, last 30 days
SELECT c.id,
       c.name,
       SUM(o.total_cents) / 100.0 AS revenue_eur
FROM customers AS c
JOIN orders AS o ON o.customer_id = c.id
WHERE o.created_at >= NOW() - INTERVAL '30 days'
  AND o.status <> 'cancelled'
GROUP BY c.id, c.name
HAVING SUM(o.total_cents) > 100000
ORDER BY revenue_eur DESC
LIMIT 20;
'''

SNIPPETS["html_css"] = '''<!DOCTYPE html>
<html lang="fr">
<head>
  <meta charset="utf-8">
  <title>Café — Menu</title>
  <style>
    body { font: 16px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 40em; }
    .prix::after { content: " €"; }
  </style>
</head>
<body>
  <h1>Menu du jour&nbsp;🍰</h1>
  <ul><li>Crème brûlée <span class="prix">6,50</span></li></ul>
</body>
</html>
'''

SNIPPETS["json_yaml"] = '''{
  "name": "stral",
  "version": "0.1.0",
  "keywords": ["llm", "serving", "ünïcödé"],
  "nested": {"a": [1, 2.5, -3e-7, null, true], "empty": {}}
}
---
server:
  host: 127.0.0.1
  port: 8080
  api_keys:
    - "sk-test-123"
  note: >
    folded text
    on two lines
'''

SNIPPETS["markdown_mixed"] = '''## Résumé

Use `cargo test -p coordinator` — it needs **no** Python.

| lang | hello |
|------|-------|
| 中文 | 你好 |
| العربية | مرحبا |
| עברית | שלום |

> Note: ½ + ¼ = ¾, 10 µs, 25 °C, naïve café.
'''

SNIPPETS["haskell_ocaml"] = '''module Main where

import qualified Data.Map.Strict as M

wordFreq :: String -> M.Map String Int
wordFreq = M.fromListWith (+) . map (\\w -> (w, 1)) . words

main :: IO ()
main = interact $ unlines . map (\\(w, n) -> w ++ "\\t" ++ show n) . M.toList . wordFreq
(* OCaml: let rec fact n = if n <= 1 then 1 else n * fact (n - 1) *)
'''

SNIPPETS["whitespace_zoo"] = (
    "a\u00a0b\u2003c\u3000d\u200be\ufeff f\t\tg\x0bh\x0ci\r\nj\rk\n\n\n    l      m"
    "\u2028n\u2029o  \u2581p\u2581\u2581q"
)

SNIPPETS["numbers_ops"] = (
    "x = 0x7fff_ffff + 0b1010 - 0o777 * 1_000_000 / 3.14159e-10 ** 2 // 7 % 5\n"
    "y = [-1, +2, ~3, 4j, 1e308, float('nan')] >= <= != == -> => :: ... ;;\n"
)

SNIPPETS["diff_patch"] = '''diff --git a/src/lib.rs b/src/lib.rs
index 3b18e51..a9c4f2d 100644
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -1,5 +1,6 @@
 pub mod tokenizer;
+pub mod prompt;
-fn old() {}
+fn new() -> u32 { 42 }
'''
