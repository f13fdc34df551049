#!/usr/bin/env bash
# Chaos for SECS seconds (default 600): 4 nodes on network namespaces, STREAMS
# greedy streams (default 6) to node 0 while nodes 1-3 are killed, frozen,
# stopped with SIGTERM and cut off the bridge at seeded random moments
# (bench/chaos.py: it prints requests identical to one machine, different,
# failed with reasons, hung, replays, and each node's RSS). Needs root.
#
#   bench/chaos.sh          SECS=120 STREAMS=4 SEED=3 bench/chaos.sh
set -euo pipefail
source "$(dirname "$0")/setup.sh"
python3 "$root/bench/chaos.py" --shoal "$shoal" --model "$model" \
  --seconds "${SECS:-600}" --streams "${STREAMS:-6}" --seed "${SEED:-1}" \
  --tokens "${TOKENS:-64}" --json "${JSON:-/tmp/shoal-chaos.json}"
