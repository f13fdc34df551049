#!/usr/bin/env bash
# Pipeline overhead: decode speed of a 2-node shoal pipeline on loopback
# (one thread per node) against one shoal node with one thread, and against
# llama.cpp's RPC mode (two rpc-servers with one thread each), one run,
# same GGUF, rounds interleaved so machine noise hits every side alike.
#
#   bench/cluster.sh [MODEL.gguf]          GEN=128 REPS=5 bench/cluster.sh
set -euo pipefail
GEN=${GEN:-128}
REPS=${REPS:-5}
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/nodes.sh"

node one 18181 1
# --plan-for throughput: two equal nodes split the model evenly.
node pipe 18182 1 --plan-for throughput
node pipe 18183 1 --plan-for throughput --peer "$(addr 18182)"
for _ in $(seq 100); do [ "$(stages 18182)" = 2 ] && break; sleep 0.1; done
[ "$(stages 18182)" = 2 ] || { echo "pipeline did not form"; exit 1; }
"$shoal" status --node http://127.0.0.1:18182 | sed -n 3p

"$llama/rpc-server" -t 1 -p 50152 > "$work/rpc1.log" 2>&1 & pids+=($!)
"$llama/rpc-server" -t 1 -p 50153 > "$work/rpc2.log" 2>&1 & pids+=($!)
sleep 1

ask() {  # tokens/s of generation through the node on port $1
  "$shoal" ask --node "http://127.0.0.1:$1" --no-template --temp 0 -n "$GEN" -v "Once upon a time" 2>&1 >/dev/null \
    | sed -n 's/.*gen [0-9]* tok, \([0-9.]*\) tok\/s.*/\1/p'
}
llama_tg() {  # tokens/s of llama-bench generation, extra args passed on
  "$llama/llama-bench" -m "$model" -t 1 -p 0 -n "$GEN" -r 1 -o json "$@" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'
}
ask 18181 >/dev/null; ask 18182 >/dev/null   # warm-up: tokenizer, caches
for r in $(seq "$REPS"); do
  echo "one $(ask 18181)" >> "$work/results"
  echo "pipe $(ask 18182)" >> "$work/results"
  echo "llama $(llama_tg)" >> "$work/results"
  echo "rpc $(llama_tg --rpc 127.0.0.1:50152,127.0.0.1:50153 -ngl 99)" >> "$work/results"
done
python3 - "$work/results" "$GEN" "$REPS" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 2]
by = {}
for k, v in rows:
    by.setdefault(k, []).append(float(v))
med = {k: statistics.median(v) for k, v in by.items()}
names = {"one": "shoal, 1 node x 1 thread", "pipe": "shoal, 2-node pipeline, 1 thread each",
         "llama": "llama.cpp, 1 thread", "rpc": "llama.cpp RPC, 2 rpc-servers x 1 thread"}
print(f"decode, {sys.argv[2]} tokens, median of {sys.argv[3]} interleaved rounds (tok/s):")
for k in ("one", "pipe", "llama", "rpc"):
    print(f"  {names[k]:<42} {med[k]:7.1f}   [{min(by[k]):.1f}..{max(by[k]):.1f}]")
print(f"  pipeline / one node      {med['pipe']/med['one']:.2f}x   (goal >= 0.90)")
print(f"  pipeline / llama.cpp RPC {med['pipe']/med['rpc']:.2f}x   (goal >= 1.00)")
PY
