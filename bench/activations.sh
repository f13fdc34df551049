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
prompts=(
  "The capital of France is"
  "Once upon a time, there was a"
  "The best way to learn a programming language is"
  "Water boils at a temperature of"
  "In 1492, Christopher Columbus"
  "The three primary colors are"
  "def fibonacci(n):"
  "My favourite recipe for pancakes starts with"
  "The theory of relativity was developed by"
  "To be or not to be,"
  "The largest planet in our solar system is"
  "Machine learning is a field of"
)
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

if [ "$(id -u)" != 0 ] || ! command -v tc >/dev/null; then
  echo "== speed skipped (needs root and tc)"; exit 0
fi
tag="sa$$"
ns_cleanup() {
  for i in 1 2; do ip netns del "$tag$i" 2>/dev/null || true; done
  ip link del "${tag}br" 2>/dev/null || true
}
trap 'ns_cleanup; cleanup' EXIT
ip link add "${tag}br" type bridge && ip addr add 10.78.0.254/24 dev "${tag}br" && ip link set "${tag}br" up
for i in 1 2; do
  ip netns add "$tag$i"
  ip link add "${tag}v$i" type veth peer name eth0 netns "$tag$i"
  ip link set "${tag}v$i" master "${tag}br" up
  ip -n "$tag$i" addr add "10.78.0.$i/24" dev eth0
  ip -n "$tag$i" link set eth0 up; ip -n "$tag$i" link set lo up
  ip netns exec "$tag$i" tc qdisc add dev eth0 root tbf rate "$RATE" burst 32kb latency 50ms
  tc qdisc add dev "${tag}v$i" root tbf rate "$RATE" burst 32kb latency 50ms
done
echo "== speed: 2 namespaces, links tbf $RATE"
for prec in f32 f16; do
  ids=()
  for i in 1 2; do
    extra=()
    [ "$i" = 2 ] && extra=(--peer "$("$shoal" status --node http://10.78.0.1:18600 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["addrs"][0])')")
    ip netns exec "$tag$i" "$shoal" node -m "$model" --cluster "$tag$prec" --cluster-key-file "$work/key" \
      --no-mdns --listen "/ip4/10.78.0.$i/tcp/4001" --http "10.78.0.$i:18600" -t 1 --ctx 1024 \
      --plan-for throughput --activations "$prec" "${extra[@]}" 2> "$work/ns$prec$i.log" &
    ids+=($!); pids+=($!)
    for _ in $(seq 100); do grep -q "API on" "$work/ns$prec$i.log" && break; sleep 0.1; done
  done
  for _ in $(seq 300); do
    [ "$("$shoal" status --node http://10.78.0.1:18600 --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(1 for n in s["nodes"] if n["layers"]))')" = 2 ] && break
    sleep 0.2
  done
  echo "-- $prec"
  "$shoal" bench --cluster http://10.78.0.1:18600 -m "$model" --streams 1,4 -n 64 --same-machine \
    --link-mbit "${RATE%mbit}" | sed -n '/streams/,$p'
  kill "${ids[@]}"; wait "${ids[@]}" 2>/dev/null || true
done
