#!/usr/bin/env bash
# The simulator against real clusters: `shoal bench --cluster` loads each
# cluster with 1, 2 and 4 concurrent streams and prints what its clients
# measured beside what the simulator predicts from the nodes' own
# calibration, the split in force and the probed links.
#   A. loopback: 1, 2 and 3 nodes, one thread each (planned for throughput)
#   B. loopback, 2 nodes whose data ports sit behind bench/relay.py, a UDP
#      relay delaying each datagram by DELAY_MS (default 5) both ways
#   C. network namespaces on a bridge, each veth shaped by `tc tbf`
#      (RATE, default 100mbit), 2 nodes (needs root; skipped otherwise)
# Every node runs on this machine, so the simulator is told they share its
# cores (`--same-machine`), and the links it simulates are the ones set up
# here. The 1-stream level fits one factor on the nodes' start-up speeds
# (this machine is shared: its speed drifts by ±20 % within minutes); the
# other levels are predictions.
#
#   bench/calibrate.sh [MODEL.gguf]      TOKENS=64 STREAMS=1,2,4 RATE=100mbit DELAY_MS=5
#                                        SETS="loopback relay netns" (which of A, B, C)
set -euo pipefail
TOKENS=${TOKENS:-64}
STREAMS=${STREAMS:-1,2,4}
RATE=${RATE:-100mbit}
DELAY_MS=${DELAY_MS:-5}
SETS=${SETS:-"loopback relay netns"}
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/nodes.sh"
bench() {  # bench LABEL URL [flags]
  echo "== $1"
  local label=$1 url=$2; shift 2
  "$shoal" bench --cluster "$url" -m "$model" --streams "$STREAMS" -n "$TOKENS" \
    --requests-per-stream 2 --same-machine "$@"
}
wait_stages() {  # wait_stages PORT N
  for _ in $(seq 300); do [ "$(stages "$1")" = "$2" ] && return; sleep 0.2; done
  echo "the $2-stage pipeline did not form"; exit 1
}

has() { [[ " $SETS " == *" $1 "* ]]; }

for n in $(has loopback && echo 1 2 3); do
  port=$((18300 + 10 * n))
  node "c$n" "$port" 1 --plan-for throughput; first=$!; ids=($first)
  for i in $(seq 2 "$n"); do
    node "c$n" $((port + i)) 1 --plan-for throughput --peer "$(addr "$port")"; ids+=($!)
  done
  wait_stages "$port" "$n"
  bench "loopback, $n node(s) x 1 thread" "http://127.0.0.1:$port"
  kill "${ids[@]}"; wait "${ids[@]}" 2>/dev/null || true
done

# B: 2 nodes, each one's QUIC port behind a delaying relay.
if has relay; then
python3 "$root/bench/relay.py" 18351 18361 "$DELAY_MS" & pids+=($!)
python3 "$root/bench/relay.py" 18352 18362 "$DELAY_MS" & pids+=($!)
node d 18350 1 --plan-for throughput --data 127.0.0.1:18361 --data-advertise 127.0.0.1:18351; ids=($!)
node d 18353 1 --plan-for throughput --data 127.0.0.1:18362 --data-advertise 127.0.0.1:18352 \
  --peer "$(addr 18350)"; ids+=($!)
wait_stages 18350 2
# The relay's own delay adds to DELAY_MS (asyncio timers, Python per
# datagram): the simulator takes the latency the nodes' probes measured.
bench "loopback, 2 nodes x 1 thread, links delayed ${DELAY_MS} ms each way" "http://127.0.0.1:18350"
kill "${ids[@]}"; wait "${ids[@]}" 2>/dev/null || true
fi

has netns || exit 0
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  echo "== namespaces skipped (needs root, ip and tc)"; exit 0
fi
source "$root/bench/netns.sh"
netns_pair "sc$$" 10.77.0 "$RATE"
nsnode "sc$$" 1 18400 "$work/ns1.log" --plan-for throughput
nsnode "sc$$" 2 18400 "$work/ns2.log" --plan-for throughput --peer "$(ns_addr http://10.77.0.1:18400)"
ns_wait_stages http://10.77.0.1:18400 2
bench "namespaces, 2 nodes x 1 thread, links tbf $RATE" "http://10.77.0.1:18400" \
  --link-mbit "${RATE%mbit}"
