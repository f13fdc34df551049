#!/usr/bin/env bash
# KV memory under load: one node with --max-memory MEM gets STREAMS long
# prompts at once (~1,400 tokens each, TOKENS generated, greedy). Reports
# the node's RSS when idle (after one request) and its peak under the load
# (sampled every 50 ms, and the kernel's high-water mark), the KV the
# admitted requests hold, and how many finished or were refused (503:
# no room for their KV cache) — never the node killed.
#
#   bench/memory.sh              MEM=400M STREAMS=16 TOKENS=256 bench/memory.sh
set -euo pipefail
MEM=${MEM:-400M}
STREAMS=${STREAMS:-16}
TOKENS=${TOKENS:-256}
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/nodes.sh"
port=18291
"$shoal" node -m "$model" --cluster mem --cluster-key-file "$work/key" --no-mdns \
  --listen /ip4/127.0.0.1/tcp/0 --http "127.0.0.1:$port" -t 2 --ctx 2048 \
  --max-memory "$MEM" --max-running "$STREAMS" 2> "$work/node.log" &
pid=$!
pids+=($pid)
for _ in $(seq 100); do grep -q "API on" "$work/node.log" && break; sleep 0.1; done
url="http://127.0.0.1:$port"
for _ in $(seq 300); do "$shoal" status --node "$url" --json 2>/dev/null | grep -q '"epoch"' && break; sleep 0.1; done
rss() { awk '/^VmRSS:/ {print int($2/1024)}' "/proc/$1/status"; }
"$shoal" ask --node "$url" -n 8 --temp 0 "Say hello." > /dev/null
idle=$(rss "$pid")
( peak=0; while kill -0 "$pid" 2>/dev/null; do r=$(rss "$pid" 2>/dev/null || echo 0)
    [ "${r:-0}" -gt "$peak" ] && peak=$r && echo "$peak" > "$work/peak"; sleep 0.05; done ) &
sampler=$!
prompt() {  # a distinct long prompt (~1,400 tokens)
  python3 -c "
import sys
words = 'the office cluster keeps every prompt inside the building while the models grow larger than any one machine'.split()
print('Story $1: ' + ' '.join(words[(i * 7 + $1) % len(words)] for i in range(1300)) + '. Summarise it.')"
}
start=$(date +%s.%N)
asks=()
for i in $(seq "$STREAMS"); do
  "$shoal" ask --node "$url" -n "$TOKENS" --temp 0 "$(prompt "$i")" > "$work/out$i" 2> "$work/err$i" &
  asks+=($!)
done
finished=0; refused=0; other=0
for i in $(seq "$STREAMS"); do
  if wait "${asks[$((i - 1))]}"; then finished=$((finished + 1))
  elif grep -qi "memory\|503" "$work/err$i"; then refused=$((refused + 1))
  else other=$((other + 1)); echo "stream $i: $(tail -1 "$work/err$i")"; fi
done
secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
alive=yes; kill -0 "$pid" 2>/dev/null || alive=NO
hwm=$(awk '/^VmHWM:/ {print int($2/1024)}' "/proc/$pid/status" 2>/dev/null || echo "?")
kill "$sampler" 2>/dev/null || true
peak=$(cat "$work/peak" 2>/dev/null || echo "?")
echo "--max-memory $MEM, $STREAMS streams of ~1,400 prompt tokens + $TOKENS, ${secs}s"
echo "RSS idle ${idle} MiB, peak ${peak} MiB (high-water ${hwm} MiB)"
echo "finished $finished, refused for memory $refused, other failures $other, node alive: $alive"
