#!/usr/bin/env bash
# Fuzzes every parser that reads bytes from a peer, a file or a client —
# frames (decode + validation), GGUF headers, the tokenizer, chat templates,
# the HTTP request bodies — with INPUTS mutated inputs each (default 10^6),
# on the stable toolchain (tests/tests/fuzz.rs: seeded mutations, panics
# caught and counted, the largest single allocation held to a limit per
# target). Prints one line per target; exits non-zero on any panic or
# allocation past its limit (the first offending input is written to
# $TMPDIR/shoal-fuzz-<target>*.bin).
#
#   bench/fuzz.sh
#   INPUTS=100000 SEED=7 bench/fuzz.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export SHOAL_FUZZ_INPUTS=${INPUTS:-1000000}
export SHOAL_FUZZ_SEED=${SEED:-1}
cd "$root"
start=$(date +%s)
log=$(mktemp)
status=0
cargo test --release -q -p shoal-tests --test fuzz -- --nocapture --test-threads 1 >"$log" 2>&1 || status=$?
grep -E '^fuzz |panicked|first panic|bytes for|test result|signal' "$log" || true
[ "$status" = 0 ] || { echo "--- fuzz run failed ($status); its log:"; tail -40 "$log"; }
echo "seconds: $(( $(date +%s) - start ))"
rm -f "$log"
exit "$status"
