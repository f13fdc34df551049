#!/usr/bin/env bash
# shoal vs llama.cpp on one machine, same GGUF, same threads, one run:
# prompt processing (pp) and generation (tg) throughput and their ratios.
#
#   bench/single-node.sh [MODEL.gguf]      (default: the default model)
#   THREADS="1 2" PROMPT=128 GEN=64 REPS=5 bench/single-node.sh
set -euo pipefail
THREADS=${THREADS:-"1 2"}
PROMPT=${PROMPT:-128}
GEN=${GEN:-64}
REPS=${REPS:-5}
source "$(dirname "$0")/setup.sh"
out=$(mktemp -d)
for t in $THREADS; do
  "$shoal" bench -m "$model" -t "$t" -p "$PROMPT" -n "$GEN" -r "$REPS" --json > "$out/shoal-$t.json"
  "$llama/llama-bench" -m "$model" -t "$t" -p "$PROMPT" -n "$GEN" -r "$REPS" -o json > "$out/llama-$t.json" 2>/dev/null
done
python3 - "$out" $THREADS <<'PY'
import json, sys
out, threads = sys.argv[1], sys.argv[2:]
def rate(rows, key):
    return next(r["avg_ts"] for r in rows if r[key] > 0)
print(f"{'threads':>7} {'test':>6} {'shoal t/s':>10} {'llama.cpp t/s':>14} {'ratio':>6}")
for t in threads:
    s = json.load(open(f"{out}/shoal-{t}.json")); l = json.load(open(f"{out}/llama-{t}.json"))
    for key, name in (("n_prompt", "pp"), ("n_gen", "tg")):
        a, b = rate(s, key), rate(l, key)
        print(f"{t:>7} {name:>6} {a:>10.1f} {b:>14.1f} {a/b:>6.2f}")
PY
rm -rf "$out"
