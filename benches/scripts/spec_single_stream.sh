#!/bin/bash
# Single-stream greedy decode, one chat request whose output repeats its prompt's code.
cd /work/wt/spec
for mode in none ngram; do
  ./target/debug/stral serve --port 18931 --speculative $mode >/tmp/spec_serve_$mode.log 2>&1 &
  pid=$!
  for i in $(seq 1 240); do curl -sf localhost:18931/ready >/dev/null && break; sleep 0.5; done
  body='{"model":"codestral-latest","temperature":0,"max_tokens":128,"min_tokens":128,"messages":[{"role":"user","content":"Repeat this code:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"}]}'
  curl -s localhost:18931/v1/chat/completions -H 'content-type: application/json' -d "$body" >/dev/null  # warm-up
  for r in 1 2 3; do
    s=$(date +%s.%N); out=$(curl -s localhost:18931/v1/chat/completions -H 'content-type: application/json' -d "$body"); e=$(date +%s.%N)
    echo "$mode run $r: $(echo "$e - $s" | bc) s, $(echo $out | python3 -c 'import sys,json; print(json.load(sys.stdin)["usage"]["completion_tokens"])') tokens, text sha $(echo $out | python3 -c 'import sys,json,hashlib; print(hashlib.sha1(json.load(sys.stdin)["choices"][0]["message"]["content"].encode()).hexdigest()[:10])')"
  done
  curl -s localhost:18931/metrics | grep -E "^stral_spec_(draft|accepted)_tokens_total"
  kill $pid; wait $pid 2>/dev/null
done
