#!/usr/bin/env bash
# Speculative decoding (prompt lookup) through a 2-node loopback pipeline,
# one thread per node: decode speed with and without it, on copy-friendly
# prompts (editing, quoting, refactoring) and on free writing, against
# llama.cpp RPC (two 1-thread rpc-servers). Same GGUF, one run, rounds
# interleaved. Greedy: the answers are checked identical with and without.
#
#   bench/speculative.sh [MODEL.gguf]          GEN=128 REPS=3 bench/speculative.sh
#   SETS="code free" bench/speculative.sh qwen2.5-coder:1.5b   # code-edit chats
set -euo pipefail
GEN=${GEN:-128}
REPS=${REPS:-3}
SETS=${SETS:-"copy free"}
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/nodes.sh"

# Two pipelines: adaptive speculation (and, per request with
# --no-speculate, plain: the same nodes and the same split of layers, which
# each pipeline's calibration would otherwise choose on its own), and
# always 4 proposals.
start_pipe() {  # name port [args...]
  local name=$1 port=$2; shift 2
  node "$name" "$port" 1 --plan-for throughput "$@"
  node "$name" "$((port + 1))" 1 --plan-for throughput --peer "$(addr "$port")" "$@"
  for _ in $(seq 100); do [ "$(stages "$port")" = 2 ] && break; sleep 0.1; done
  [ "$(stages "$port")" = 2 ] || { echo "pipeline $name did not form"; exit 1; }
}
start_pipe adaptive 18283 --speculate
start_pipe fixed 18285 --speculate 4

"$llama/rpc-server" -t 1 -p 50162 > "$work/rpc1.log" 2>&1 & pids+=($!)
"$llama/rpc-server" -t 1 -p 50163 > "$work/rpc2.log" 2>&1 & pids+=($!)
sleep 1

copy=(
"Rewrite this Python code with the same functions but add a docstring to each function:

def add(a, b):
    return a + b

def sub(a, b):
    return a - b

def mul(a, b):
    return a * b

def div(a, b):
    return a / b"
"Repeat this paragraph exactly, then stop: The committee met on Tuesday to review the budget. The committee agreed that the budget for next year should stay the same as this year, and that any new spending must be approved by the whole committee."
"Fix the spelling in this text and return it whole: The quick brwon fox jumpd over the lazy dog. The dog was not amused, and the fox ran awy into the forrest before the farmer came."
)
# Code-edit chats: the whole code back with one change.
code=(
"Rename the variable \`tmp\` to \`total\` in this function and return the whole function:

def summarize(values):
    tmp = 0
    for v in values:
        tmp += v
    avg = tmp / len(values)
    return tmp, avg"
"Add type hints to this Python function and return the whole code:

def merge(left, right):
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result"
"Fix the bug in this function (it should return the largest value) and return the whole code:

def largest(values):
    best = values[0]
    for v in values:
        if v < best:
            best = v
    return best"
)
free=(
"Write a short story about a lighthouse keeper."
"Explain how photosynthesis works."
"What are three good habits for learning a new language?"
)

ask() {  # port prompt [ask flags] -> "tok/s<TAB>answer-hash"
  local out err port=$1 prompt=$2; shift 2
  out=$("$shoal" ask --node "http://127.0.0.1:$port" --temp 0 -n "$GEN" -v "$@" "$prompt" 2>"$work/err")
  err=$(sed -n 's/.*gen [0-9]* tok, \([0-9.]*\) tok\/s.*/\1/p' "$work/err")
  printf '%s\t%s\n' "$err" "$(printf '%s' "$out" | sha1sum | cut -c1-12)"
}
llama_tg() {
  "$llama/llama-bench" -m "$model" -t 1 -p 0 -n "$GEN" -r 1 -o json "$@" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'
}
ask 18283 "warm up" >/dev/null; ask 18285 "warm up" >/dev/null
for r in $(seq "$REPS"); do
  for set in $SETS; do
    declare -n prompts=$set
    for i in "${!prompts[@]}"; do
      echo "$set $i plain $(ask 18283 "${prompts[$i]}" --no-speculate)" >> "$work/results"
      echo "$set $i adaptive $(ask 18283 "${prompts[$i]}")" >> "$work/results"
      echo "$set $i fixed $(ask 18285 "${prompts[$i]}")" >> "$work/results"
    done
  done
  echo "rpc - rpc $(llama_tg --rpc 127.0.0.1:50162,127.0.0.1:50163 -ngl 99) -" >> "$work/results"
done
python3 - "$work/results" "$GEN" "$REPS" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 5]
rate, hashes = {}, {}
for s, i, cfg, ts, h in rows:
    rate.setdefault((s, cfg), []).append(float(ts))
    hashes.setdefault((s, i), {}).setdefault(cfg, set()).add(h)
same = all(len(set.union(*v.values())) == 1 for k, v in hashes.items() if k[0] != "rpc")
med = {k: statistics.median(v) for k, v in rate.items()}
rpc = med[("rpc", "rpc")]
print(f"decode, {sys.argv[2]} tokens, greedy, median over prompts x {sys.argv[3]} rounds (tok/s):")
for s in sorted({k[0] for k in med if k[0] != "rpc"}):
    p = med[(s, "plain")]
    for cfg in ("plain", "adaptive", "fixed"):
        m = med[(s, cfg)]
        print(f"  {s:<5} {cfg:<9} {m:7.1f}   x{m/p:.2f} vs plain   x{m/rpc:.2f} vs llama.cpp RPC")
print(f"  llama.cpp RPC, 2 rpc-servers x 1 thread {rpc:7.1f}")
per = {}
for s, i, cfg, ts, h in rows:
    if s != "rpc":
        per.setdefault((s, int(i), cfg), []).append(float(ts))
print("  per prompt (median tok/s): plain / adaptive / fixed")
for s, i in sorted({(k[0], k[1]) for k in per}):
    m = [statistics.median(per[(s, i, c)]) for c in ("plain", "adaptive", "fixed")]
    print(f"    {s} {i}: {m[0]:6.1f} / {m[1]:6.1f} / {m[2]:6.1f}")
print("  answers identical with and without speculation:", "yes" if same else "NO")
PY
