#!/usr/bin/env bash
# Activation compression between stages: what f16 and bf16 hidden states
# (`shoal node --activations`) cost in output quality and buy in speed.
#  1. Quality: 12 greedy raw completions of N tokens through a 2-node
#     loopback pipeline with f32, f16 and bf16 activations, each against
#     `shoal run` on one node: identical completions, and the mean number
#     of leading tokens' text that agree.
#  2. Speed (root only): the same pipeline in two network namespaces whose
#     links `tc tbf` holds to RATE (default 20mbit), one stream and four,
#     through `shoal bench --cluster`.
#
#   bench/activations.sh [MODEL.gguf]      N=48 RATE=20mbit
set -euo pipefail
N=${N:-48}
RATE=${RATE:-20mbit}
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/nodes.sh"
mapfile -t prompts < "$root/bench/prompts.txt"
mkdir -p "$work/ref"
for i in "${!prompts[@]}"; do
  "$shoal" run -m "$model" --no-template --temp 0 -n "$N" -t 1 "${prompts[$i]}" 2>/dev/null > "$work/ref/$i"
done
port=18500
echo "== quality: 2-node pipeline vs one node, greedy, $N tokens, ${#prompts[@]} prompts"
for prec in f32 f16 bf16; do
  port=$((port + 10))
  node "a$prec" "$port" 1 --plan-for throughput --activations "$prec"; a=$!
  node "a$prec" $((port + 1)) 1 --plan-for throughput --activations "$prec" --peer "$(addr "$port")"; b=$!
  for _ in $(seq 300); do [ "$(stages "$port")" = 2 ] && break; sleep 0.2; done
  [ "$(stages "$port")" = 2 ] || { echo "the 2-stage pipeline did not form"; exit 1; }
  mkdir -p "$work/$prec"
  for i in "${!prompts[@]}"; do
    "$shoal" ask --node "http://127.0.0.1:$port" --no-template --temp 0 -n "$N" "${prompts[$i]}" 2>/dev/null > "$work/$prec/$i"
  done
  python3 - "$work" "$prec" "${#prompts[@]}" <<'PY'
import sys, os
work, prec, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
same, agree = 0, []
for i in range(n):
    a = open(os.path.join(work, "ref", str(i))).read().strip()
    b = open(os.path.join(work, prec, str(i))).read().strip()
    same += a == b
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    agree.append(k / max(len(a), 1))
print(f"{prec:>5}: {same}/{n} completions identical to one node; "
      f"mean agreeing prefix {100 * sum(agree) / n:.0f}% of the text")
PY
  kill "$a" "$b"; wait "$a" "$b" 2>/dev/null || true
done

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  echo "== speed skipped (needs root, ip and tc)"; exit 0
fi
source "$root/bench/netns.sh"
netns_pair "sa$$" 10.78.0 "$RATE"
echo "== speed: 2 namespaces, links tbf $RATE"
for prec in f32 f16; do
  nsnode "sa$$$prec" 1 18600 "$work/ns${prec}1.log" --plan-for throughput --activations "$prec"; ids=($!)
  nsnode "sa$$$prec" 2 18600 "$work/ns${prec}2.log" --plan-for throughput --activations "$prec" \
    --peer "$(ns_addr http://10.78.0.1:18600)"; ids+=($!)
  ns_wait_stages http://10.78.0.1:18600 2
  echo "-- $prec"
  "$shoal" bench --cluster http://10.78.0.1:18600 -m "$model" --streams 1,4 -n 64 --same-machine \
    --link-mbit "${RATE%mbit}" | sed -n '/streams/,$p'
  kill "${ids[@]}"; wait "${ids[@]}" 2>/dev/null || true
done
