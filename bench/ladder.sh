#!/usr/bin/env bash
# The size ladder: random-weight files of real models' shapes in Q4_K_M's
# mix (bench/random_gguf.py: Llama-3.2-3B, Llama-3.1-8B, Qwen2.5-14B), each
# run by shoal and llama.cpp on the same file, same machine, same run.
#
#  1. one node: tg and pp at 1 and 2 threads (shoal bench vs llama-bench),
#     resident memory and seconds from start to the first token of a
#     one-token answer (shoal run vs llama-simple);
#  2. NODES (default "2 3") loopback nodes, one thread each, each with
#     --max-memory below the whole model, against llama.cpp RPC over as many
#     rpc-servers: decode tok/s, and each node's resident memory beside its
#     share of the weights.
#
#   bench/ladder.sh                              (all three shapes; files cached)
#   SHAPES="llama3.1-8b" NODES="2" TG=16 PP=64 bench/ladder.sh
# Files go to $SHOAL_CACHE_DIR/ladder (~3, 5 and 9 GB).
set -euo pipefail
SHAPES=${SHAPES:-"llama3.2-3b llama3.1-8b qwen2.5-14b"}
NODES=${NODES:-"2 3"}
TG=${TG:-16}
PP=${PP:-64}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/setup.sh" qwen2.5-coder:0.5b   # its tokenizer goes into the files
tokenizer_source=$model
dir="$cache/ladder"
mkdir -p "$dir"
source "$here/nodes.sh"
results="$work/results"

# Peak resident memory of a process so far (VmHWM), MiB.
rss_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
# "RSS/share" MiB of each node of the plan, in pipeline order: resident
# memory beside the weights its layers hold (bench/gguf_share.py).
node_memory() {  # first-port; pids by port in $port_pid
  "$shoal" status --node "http://127.0.0.1:$1" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
n = max(x["layers"][1] for x in s["nodes"] if x["layers"])
for x in sorted((x for x in s["nodes"] if x["layers"]), key=lambda x: x["layers"][0]):
    a, b = x["layers"]
    print(x["http"].rsplit(":", 1)[1], a, b, int(a == 0), int(b == n))' |
  while read -r port a b first last; do
    printf '%s/%s ' "$(rss_mib "${port_pid[$port]}")" "$(python3 "$here/gguf_share.py" "$model" "$a" "$b" "$first" "$last")"
  done
}
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
bench_ts() {  # avg tokens/s of a llama-bench-shaped JSON on stdin
  python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)[0]["avg_ts"])'
}

for shape in $SHAPES; do
  model="$dir/random-$shape-q4_k_m.gguf"
  [ -f "$model" ] || python3 "$here/random_gguf.py" "$shape" "$model" "$tokenizer_source"
  gib=$(python3 -c "import os; print(f'{os.path.getsize(\"$model\") / 2**30:.2f}')")
  echo "== $shape ($gib GiB)"
  # 1. One node.
  for t in 1 2; do
    for test in "-p 0 -n $TG" "-p $PP -n 0"; do
      # shellcheck disable=SC2086
      s=$("$shoal" bench -m "$model" -t "$t" $test -r 1 --json | bench_ts)
      # shellcheck disable=SC2086
      l=$("$llama/llama-bench" -m "$model" -t "$t" $test -r 1 -o json 2>/dev/null | bench_ts)
      name=$([ "${test#-p 0}" != "$test" ] && echo "tg$TG" || echo "pp$PP")
      echo "$shape | 1 node, $t threads | $name | $s | $l | $(ratio "$s" "$l")" | tee -a "$results"
    done
  done
  read -r s_sec s_kib < <(/usr/bin/time -f "%e %M" "$shoal" run -m "$model" --no-template --temp 0 -n 1 -t 2 "Hello" 2>&1 >/dev/null | tail -1)
  read -r l_sec l_kib < <(/usr/bin/time -f "%e %M" "$llama/llama-simple" -m "$model" -n 1 "Hello" 2>&1 >/dev/null | tail -1)
  echo "$shape | start to first token, s (ratio: llama.cpp / shoal) | | $s_sec | $l_sec | $(ratio "$l_sec" "$s_sec")" | tee -a "$results"
  echo "$shape | peak RSS, MiB (ratio: llama.cpp / shoal) | | $((s_kib / 1024)) | $((l_kib / 1024)) | $(ratio "$l_kib" "$s_kib")" | tee -a "$results"
  # 2. A pipeline over loopback nodes, each below the whole model.
  for n in $NODES; do
    bytes=$(stat -c %s "$model")
    cap="$(( (bytes / n + bytes / n / 4) / 1048576 + 200 ))M"   # share + 25% + KV
    base=$((18300 + 10 * n))
    declare -A port_pid=()
    node "ladder$n" "$base" 1 --plan-for throughput --max-memory "$cap"
    port_pid[$base]=${pids[-1]}
    for i in $(seq 2 "$n"); do
      node "ladder$n" $((base + i - 1)) 1 --plan-for throughput --max-memory "$cap" --peer "$(addr "$base")"
      port_pid[$((base + i - 1))]=${pids[-1]}
    done
    for _ in $(seq 600); do [ "$(stages "$base")" = "$n" ] && break; sleep 0.5; done
    [ "$(stages "$base")" = "$n" ] || { echo "no $n-stage plan"; "$shoal" status --node "http://127.0.0.1:$base"; exit 1; }
    ask() {
      "$shoal" ask --node "http://127.0.0.1:$base" --no-template --temp 0 -n "$TG" -v "Once upon a time" 2>&1 >/dev/null \
        | sed -n 's/.*gen [0-9]* tok, \([0-9.]*\) tok\/s.*/\1/p'
    }
    ask >/dev/null
    s=$(ask)
    rss=$(node_memory "$base")
    "$shoal" status --node "http://127.0.0.1:$base" | sed -n 3p
    # Stop this pipeline before llama.cpp runs (same cores).
    kill "${pids[@]: -$n}"; wait "${pids[@]: -$n}" 2>/dev/null || true
    servers=()
    rpc_pids=()
    for i in $(seq "$n"); do
      "$llama/rpc-server" -t 1 -p $((50200 + i)) > "$work/rpc$i.log" 2>&1 &
      rpc_pids+=($!); pids+=($!)
      servers+=("127.0.0.1:$((50200 + i))")
    done
    sleep 1
    l=$("$llama/llama-bench" -m "$model" -t 1 -p 0 -n "$TG" -r 1 -o json --rpc "$(IFS=,; echo "${servers[*]}")" -ngl 99 2>/dev/null | bench_ts)
    lrss=""
    for pid in "${rpc_pids[@]}"; do lrss+="$(rss_mib "$pid") "; done   # peak, while it served
    kill "${rpc_pids[@]}"; wait "${rpc_pids[@]}" 2>/dev/null || true
    echo "$shape | $n nodes x 1 thread, decode | tg$TG | $s | $l | $(ratio "$s" "$l")" | tee -a "$results"
    echo "$shape | $n nodes, peak RSS MiB per node (shoal: RSS/share, pipeline order) | | ${rss% } | ${lrss% } |" | tee -a "$results"
  done
done
echo
echo "| model | setting | test | shoal | llama.cpp | shoal / llama.cpp |"
echo "| --- | --- | --- | ---: | ---: | ---: |"
sed 's/^/| /; s/$/ |/' "$results"
