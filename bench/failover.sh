#!/usr/bin/env bash
# Failover trials (bench/failover.py): a 3-node cluster, TRIALS 300-token
# answers greedy and TRIALS seeded at 0.8, a stage killed at a random
# moment of each; every answer compared with one machine. On loopback, then
# on network namespaces (needs root).
#
#   bench/failover.sh          TRIALS=10 bench/failover.sh
set -euo pipefail
source "$(dirname "$0")/setup.sh"
status=0
python3 "$root/bench/failover.py" --shoal "$shoal" --model "$model" --trials "${TRIALS:-20}" || status=1
python3 "$root/bench/failover.py" --shoal "$shoal" --model "$model" --trials "${TRIALS:-20}" --netns || status=1
exit $status
