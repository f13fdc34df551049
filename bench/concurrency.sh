#!/usr/bin/env bash
# Throughput under concurrency, through the official `openai` client
# (bench/load.py: N streaming chat completions at once, greedy, TOKENS each),
# one run, rounds interleaved:
#   A. one shoal node, 2 threads, 8 streams  vs  llama-server -t 2 -np 8 --cont-batching
#   B. 2-node shoal pipeline on loopback, 1 thread per node, 4 streams
#      vs  one shoal node with 1 thread, 4 streams (and llama-server -t 1 -np 4)
#
#   bench/concurrency.sh [MODEL.gguf]        TOKENS=96 REPS=3 bench/concurrency.sh
set -euo pipefail
TOKENS=${TOKENS:-96}
REPS=${REPS:-3}
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/nodes.sh"
py="$cache/py/openai-1"
if [ ! -d "$py/openai" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$py.tmp$$" 'openai>=1.40,<2'
  mv "$py.tmp$$" "$py"
fi
load() { PYTHONPATH="$py" python3 "$root/bench/load.py" "http://127.0.0.1:$1" "$2" "$TOKENS"; }
server() {  # server PORT THREADS SLOTS: llama-server as the issue names it (its defaults otherwise)
  "$llama/llama-server" -m "$model" --port "$1" -t "$2" -np "$3" --cont-batching \
    > "$work/server-$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return; sleep 0.1; done
  echo "llama-server did not start:"; cat "$work/server-$1.log"; exit 1
}
stop() { kill "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }

run_set() {  # run_set LABEL PORT STREAMS: one measurement into results
  echo "$1 $(load "$2" "$3" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tok_s"])')" >> "$work/results"
}

# A: 2 threads, 8 streams. Servers run one at a time (they would share cores).
for r in $(seq "$REPS"); do
  node a 18191 2 --max-running 16; a=$!
  load 18191 1 >/dev/null
  run_set shoal2x8 18191 8
  run_set shoal2x1 18191 1
  stop $a
  server 18192 2 8; s=$!
  load 18192 1 >/dev/null
  run_set llama2x8 18192 8
  run_set llama2x1 18192 1
  stop $s
  # B: one thread per node.
  node b 18193 1; b=$!
  load 18193 1 >/dev/null
  run_set one1x4 18193 4
  stop $b
  node p 18194 1 --plan-for throughput; p1=$!
  node p 18195 1 --plan-for throughput --peer "$(addr 18194)"; p2=$!
  for _ in $(seq 100); do [ "$(stages 18194)" = 2 ] && break; sleep 0.1; done
  [ "$(stages 18194)" = 2 ] || { echo "pipeline did not form"; exit 1; }
  load 18194 1 >/dev/null
  run_set pipe1x4 18194 4
  stop $p1; stop $p2
  server 18196 1 4; s=$!
  load 18196 1 >/dev/null
  run_set llama1x4 18196 4
  run_set llama1x1 18196 1
  stop $s
done
python3 - "$work/results" "$TOKENS" "$REPS" <<'PY'
import sys, statistics
by = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    by.setdefault(k, []).append(float(v))
med = {k: statistics.median(v) for k, v in by.items()}
names = {
    "shoal2x1": "shoal, 1 node x 2 threads, 1 stream",
    "shoal2x8": "shoal, 1 node x 2 threads, 8 streams",
    "llama2x1": "llama-server -t 2 -np 8, 1 stream",
    "llama2x8": "llama-server -t 2 -np 8, 8 streams",
    "one1x4": "shoal, 1 node x 1 thread, 4 streams",
    "pipe1x4": "shoal, 2-node pipeline x 1 thread, 4 streams",
    "llama1x1": "llama-server -t 1 -np 4, 1 stream",
    "llama1x4": "llama-server -t 1 -np 4, 4 streams",
}
print(f"total tokens/s, {sys.argv[2]} tokens per stream, median of {sys.argv[3]} rounds:")
for k, name in names.items():
    if k in med:
        print(f"  {name:<46} {med[k]:7.1f}   [{min(by[k]):.1f}..{max(by[k]):.1f}]")
print(f"  8 streams: shoal / llama-server        {med['shoal2x8']/med['llama2x8']:.2f}x   (goal >= 1.10)")
print(f"  4 streams: pipeline / one node         {med['pipe1x4']/med['one1x4']:.2f}x   (goal >= 1.70)")
PY
