# Sourced by the bench scripts that start shoal nodes (after setup.sh):
# a scratch dir and cluster key, cleanup of everything started, and
#   node NAME HTTP_PORT THREADS [args...]   start a loopback node, wait for its API
#   addr PORT                               its first libp2p address (for --peer)
#   stages PORT                             how many nodes hold layers in its plan
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$shoal" keygen "$work/key"

node() {
  local name=$1 port=$2 threads=$3; shift 3
  "$shoal" node -m "$model" --cluster "$name" --cluster-key-file "$work/key" --no-mdns \
    --listen /ip4/127.0.0.1/tcp/0 --http "127.0.0.1:$port" -t "$threads" --ctx 1024 "$@" \
    2> "$work/$name-$port.log" &
  pids+=($!)
  for _ in $(seq 100); do grep -q "API on" "$work/$name-$port.log" && return; sleep 0.1; done
  echo "node did not start:"; cat "$work/$name-$port.log"; exit 1
}
addr() { "$shoal" status --node "http://127.0.0.1:$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["addrs"][0])'; }
stages() { "$shoal" status --node "http://127.0.0.1:$1" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(1 for n in s["nodes"] if n["layers"]))'; }
