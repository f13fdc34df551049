# Sourced by bench scripts (after nodes.sh) that need real hosts:
#   netns_pair TAG SUBNET RATE   two network namespaces TAG1, TAG2 on a
#                                bridge, addresses SUBNET.1 and SUBNET.2, every
#                                veth held to RATE by `tc tbf` both ways;
#                                deleted (with the nodes) on exit
#   nsnode CLUSTER I PORT LOG [args]  `shoal node` of cluster CLUSTER in
#                                namespace TAG I (1 thread, API on
#                                SUBNET.I:PORT), waits for its API
#   ns_wait_stages URL N         waits until N nodes hold layers, else fails
netns_pair() {
  ns_tag=$1 ns_subnet=$2
  local rate=$3
  # The nodes first (they live in the namespaces), then the namespaces.
  trap 'cleanup; for i in 1 2; do ip netns del "$ns_tag$i" 2>/dev/null || true; done; ip link del "${ns_tag}br" 2>/dev/null || true' EXIT
  ip link add "${ns_tag}br" type bridge
  ip addr add "$ns_subnet.254/24" dev "${ns_tag}br"
  ip link set "${ns_tag}br" up
  for i in 1 2; do
    ip netns add "$ns_tag$i"
    ip link add "${ns_tag}v$i" type veth peer name eth0 netns "$ns_tag$i"
    ip link set "${ns_tag}v$i" master "${ns_tag}br" up
    ip -n "$ns_tag$i" addr add "$ns_subnet.$i/24" dev eth0
    ip -n "$ns_tag$i" link set eth0 up
    ip -n "$ns_tag$i" link set lo up
    # Both directions: egress of the namespace and of the bridge port.
    ip netns exec "$ns_tag$i" tc qdisc add dev eth0 root tbf rate "$rate" burst 64kb latency 50ms
    tc qdisc add dev "${ns_tag}v$i" root tbf rate "$rate" burst 64kb latency 50ms
  done
}
nsnode() {
  local cluster=$1 i=$2 port=$3 log=$4; shift 4
  ip netns exec "$ns_tag$i" "$shoal" node -m "$model" --cluster "$cluster" --cluster-key-file "$work/key" \
    --no-mdns --listen "/ip4/$ns_subnet.$i/tcp/4001" --http "$ns_subnet.$i:$port" -t 1 --ctx 1024 \
    "$@" 2> "$log" &
  pids+=($!)
  for _ in $(seq 100); do grep -q "API on" "$log" && return; sleep 0.1; done
  echo "node did not start:"; cat "$log"; exit 1
}
ns_addr() { "$shoal" status --node "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["addrs"][0])'; }
ns_stages() { "$shoal" status --node "$1" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(1 for n in s["nodes"] if n["layers"]))'; }
ns_wait_stages() {
  for _ in $(seq 300); do [ "$(ns_stages "$1")" = "$2" ] && return; sleep 0.2; done
  echo "the $2-stage pipeline did not form at $1"; exit 1
}
