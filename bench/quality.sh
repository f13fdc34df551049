#!/usr/bin/env bash
# shoal vs llama.cpp on output quality, same GGUF:
#  1. perplexity at ctx 256 on English prose (shoal perplexity vs llama-perplexity);
#  2. greedy raw completions of short prompts (shoal run --temp 0 vs llama-simple):
#     how many of the first N generated tokens' text agree.
#
#   bench/quality.sh [MODEL.gguf] [TEXT]
set -euo pipefail
N=${N:-16}
CTX=${CTX:-256}
CHUNKS=${CHUNKS:-20}
source "$(dirname "$0")/setup.sh"
# English prose present on every Debian machine.
text=${2:-/usr/share/common-licenses/GPL-3}
threads=${THREADS:-2}

echo "== perplexity, ctx $CTX, $CHUNKS chunks of $(basename "$text")"
ours=$("$shoal" perplexity -m "$model" -f "$text" --ctx "$CTX" --chunks "$CHUNKS" -t "$threads" 2>/dev/null | grep 'Final estimate' | sed 's/.*PPL = \([0-9.]*\).*/\1/')
theirs=$("$llama/llama-perplexity" -m "$model" -f "$text" -c "$CTX" --chunks "$CHUNKS" -t "$threads" 2>&1 | grep 'Final estimate' | sed 's/.*PPL = \([0-9.]*\).*/\1/')
python3 -c "o,t=$ours,$theirs; print(f'shoal {o:.4f}  llama.cpp {t:.4f}  diff {100*(o-t)/t:+.2f}%')"

echo "== greedy completions, first $N tokens"
mapfile -t prompts < "$root/bench/prompts.txt"
same=0
for p in "${prompts[@]}"; do
  a=$("$shoal" run -m "$model" --no-template --temp 0 -n "$N" -t "$threads" "$p" 2>/dev/null)
  b=$("$llama/llama-simple" -m "$model" -n "$N" "$p" 2>/dev/null)
  b=${b#"$p"}
  if [ "$a" == "$b" ]; then same=$((same+1)); echo "same  | $p|$a"; else echo "DIFF  | $p"; echo "  shoal: $a"; echo "  llama: $b"; fi
done
echo "identical: $same / ${#prompts[@]}"
