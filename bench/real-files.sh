#!/usr/bin/env bash
# The headline table: shoal vs llama.cpp on the real mid-size files people
# run (Qwen2.5-Coder-1.5B Q4_K_M: Q4_K/Q6_K at width 1536, FFN 8960,
# vocabulary 151,936; and the 0.5B mixed-quant file), same machine, same
# run, paired per setting: tg and pp128/pp512 at 1 and 2 threads, as ratios.
#
#   bench/real-files.sh                      (both models, fetched on first use)
#   MODELS="qwen2.5-coder:1.5b" THREADS="1 2" PROMPTS="128 512" GEN=64 REPS=3 bench/real-files.sh
set -euo pipefail
MODELS=${MODELS:-"qwen2.5-coder:1.5b qwen2.5-coder:0.5b"}
THREADS=${THREADS:-"1 2"}
PROMPTS=${PROMPTS:-"128 512"}
GEN=${GEN:-64}
REPS=${REPS:-3}
here=$(dirname "$0")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for m in $MODELS; do
  source "$here/setup.sh" "$m"
  for t in $THREADS; do
    # Alternate the two programs per setting, so drift on a shared machine
    # lands on both.
    "$shoal" bench -m "$model" -t "$t" -p 0 -n "$GEN" -r "$REPS" --json > "$out/$m-s-$t-tg.json"
    "$llama/llama-bench" -m "$model" -t "$t" -p 0 -n "$GEN" -r "$REPS" -o json > "$out/$m-l-$t-tg.json" 2>/dev/null
    for p in $PROMPTS; do
      "$shoal" bench -m "$model" -t "$t" -p "$p" -n 0 -r "$REPS" --json > "$out/$m-s-$t-pp$p.json"
      "$llama/llama-bench" -m "$model" -t "$t" -p "$p" -n 0 -r "$REPS" -o json > "$out/$m-l-$t-pp$p.json" 2>/dev/null
    done
  done
done
python3 - "$out" "$GEN" <<'PY'
import glob, json, os, sys
out, gen = sys.argv[1], sys.argv[2]
rows = {}
for f in sorted(glob.glob(f"{out}/*.json")):
    m, who, t, test = os.path.basename(f)[:-5].rsplit("-", 3)
    r = json.load(open(f))[0]
    rows.setdefault((m, t, test), {})[who] = r["avg_ts"]
print("| model | threads | test | shoal t/s | llama.cpp t/s | ratio |")
print("| --- | ---: | --- | ---: | ---: | ---: |")
for (m, t, test), v in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "tg", kv[0][2])):
    name = f"tg{gen}" if test == "tg" else test
    print(f"| {m} | {t} | {name} | {v['s']:.1f} | {v['l']:.1f} | {v['s'] / v['l']:.2f} |")
PY
