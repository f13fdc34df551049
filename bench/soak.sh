#!/usr/bin/env bash
# Soak: one node (2 threads), then a 3-node loopback cluster (1 thread
# each), STREAMS greedy streams (default 8) for MINUTES each (default 60):
# requests finished and failed, p50/p99 time between tokens per 10-minute
# window, and each node's RSS at the start and the end (bench/soak.py).
#
#   bench/soak.sh            MINUTES=10 WINDOW=120 bench/soak.sh
set -euo pipefail
source "$(dirname "$0")/setup.sh"
python3 "$root/bench/soak.py" --shoal "$shoal" --model "$model" \
  --minutes "${MINUTES:-60}" --streams "${STREAMS:-8}" --tokens "${TOKENS:-128}" \
  --window "${WINDOW:-600}" --json "${JSON:-/tmp/shoal-soak.json}"
