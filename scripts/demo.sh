#!/usr/bin/env bash
# Starts the local 3-node cluster of config.json and shows it working:
# an election, writes through every node, kill -9 of the leader and the
# failover, the dead node's restart and catch-up, identical replica logs.
# Every node is a separate `raft-zmq --node-id N` process; all of them are
# stopped when the script ends, however it ends. State persists in state/
# and logs/, so a second run continues where the first one stopped.
#
# scripts/demo.sh --hosts (as root) runs the same demo with every node on a
# host of its own: a network namespace with its own address on a bridge, in
# a private 10.213.x.0/24 that nothing else on the machine uses, reached
# from here over the bridge. The nodes bind and advertise those addresses;
# with the kernel's netem, every link gets 2.5 ms +/- 0.5 ms of delay each
# way (5 ms round trips), without it none. The config, state and logs are
# new every run, in target/demo-hosts/; the namespaces, links and bridge
# are removed when the script ends, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTS=0
case "${1:-}" in
  "") ;;
  --hosts) HOSTS=1 ;;
  *) echo "usage: scripts/demo.sh [--hosts]" >&2; exit 2 ;;
esac
if [ "$HOSTS" = 1 ] && [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh --hosts needs root: it makes network namespaces, veth links and a bridge (try sudo)" >&2
  exit 1
fi

scripts/need-libzmq.sh
echo "== building (release)"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/raft-zmq"
OUT=target/demo
CONFIG=config.json
LOGS=logs
STATE=state
WEB=127.0.0.1
mkdir -p "$OUT"
declare -A PID

field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }
client() { "$BIN" client --config "$CONFIG" --timeout-ms 2000 "$@"; }
# The command that runs node $1: on its own host with --hosts.
on_host() { if [ "$HOSTS" = 1 ]; then echo ip netns exec "rzd-$$-$1"; fi; }
start() {
  $(on_host "$1") "$BIN" --node-id "$1" --config "$CONFIG" >>"$OUT/node$1.log" 2>&1 &
  PID[$1]=$!
  echo "started node $1 (pid ${PID[$1]}), output in $OUT/node$1.log"
}
stop_all() {
  for id in "${!PID[@]}"; do kill "${PID[$id]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$HOSTS" = 1 ]; then hosts_down; fi
}
trap stop_all EXIT

# --hosts: a bridge and three namespaces, one veth pair each.
BRIDGE="rzd$$b"
hosts_down() {
  for id in 0 1 2; do
    ip link del "rzd$$h$id" 2>/dev/null || true
    ip netns del "rzd-$$-$id" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  echo "removed the namespaces rzd-$$-0..2, their links and the bridge $BRIDGE"
}
hosts_up() {
  # A /24 in 10.213.0.0/16 that no address or route of this machine overlaps.
  SUBNET=$( (ip -4 -o addr show; ip -4 route show table all) | python3 -c '
import ipaddress, re, sys
taken = [ipaddress.ip_network(m, strict=False) for m in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", sys.stdin.read())]
for c in range(256):
    net = ipaddress.ip_network(f"10.213.{c}.0/24")
    if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
        print(f"10.213.{c}"); break
else:
    sys.exit("no free /24 in 10.213.0.0/16")')
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  DELAY="no delay (this kernel has no netem)"
  for id in 0 1 2; do
    ns="rzd-$$-$id" port="rzd$$h$id"
    ip netns add "$ns"
    ip link add "$port" type veth peer name eth0 netns "$ns"
    ip link set "$port" master "$BRIDGE"
    ip link set "$port" up
    ip -n "$ns" addr add "$SUBNET.$((10 + id))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if ip netns exec "$ns" tc qdisc add dev eth0 root netem delay 2.5ms 0.5ms 2>/dev/null; then
      DELAY="2.5 ms +/- 0.5 ms each way on every link (netem)"
    fi
  done
  echo "bridge $BRIDGE at $SUBNET.1/24; nodes 0, 1, 2 in namespaces rzd-$$-0..2 at $SUBNET.10, .11, .12"
  echo "links: $DELAY"
  local dir=target/demo-hosts
  rm -rf "$dir" && mkdir -p "$dir"
  python3 - "$SUBNET" >"$dir/config.json" <<'PY'
import json, sys
s = sys.argv[1]
nodes = [{"id": i, "raft": f"tcp://{s}.{10 + i}:7000", "client": f"tcp://{s}.{10 + i}:7100",
          "http": f"{s}.{10 + i}:7200"} for i in range(3)]
print(json.dumps({"nodes": nodes}, indent=2))
PY
  CONFIG="$dir/config.json" LOGS="$dir/logs" STATE="$dir/state" WEB="$SUBNET.10" OUT="$dir"
  echo "config: $CONFIG (state, logs and the nodes' output beside it)"
}
if [ "$HOSTS" = 1 ]; then
  echo "== making three hosts (network namespaces)"
  hosts_up
fi

# Prints the id of the node every live node agrees leads; waits up to 30 s.
leader() {
  for _ in $(seq 150); do
    for id in "${!PID[@]}"; do
      if s=$(client --node "$id" status 2>/dev/null) && [ "$(field role <<<"$s")" = leader ]; then
        echo "$id"; return 0
      fi
    done
    sleep 0.2
  done
  echo "no leader after 30 s" >&2; return 1
}

echo "== starting 3 nodes"
for id in 0 1 2; do start "$id"; done
L=$(leader)
if [ "$HOSTS" = 1 ]; then
  echo "watch it live: open http://$WEB:7200/ (each node serves its own) in a browser on this machine"
else
  echo "watch it live: open http://127.0.0.1:7200/ (or :7201, :7202) in a browser"
fi
echo "leader is node $L. Election, from the nodes' logs:"
grep -h -E "became (candidate|leader)|granted vote" "$OUT"/node*.log | tail -n 4 | sed 's/^/    /'

echo "== one write through every node (followers forward to the leader)"
for id in 0 1 2; do
  echo "node $id: put greeting-$id -> $(client --node "$id" put "greeting-$id" "hello from node $id")"
done
echo "node 2: get greeting-0 -> $(client --node 2 get greeting-0)"
echo "node 0: cas greeting-1 -> $(client --node 0 cas greeting-1 replaced --expect 'hello from node 1')"

echo "== kill -9 the leader (node $L)"
kill -9 "${PID[$L]}"; wait "${PID[$L]}" 2>/dev/null || true; unset "PID[$L]"
T0=$(date +%s%N)
SURVIVOR=$(( (L + 1) % 3 ))
until client --node "$SURVIVOR" put after-failover yes >/dev/null 2>&1; do sleep 0.05; done
echo "first acknowledged write after the kill: $(( ($(date +%s%N) - T0) / 1000000 )) ms"
NEW=$(leader)
echo "new leader is node $NEW; the old data is all there: get greeting-2 -> $(client --node "$NEW" get greeting-2)"
for i in $(seq 1 20); do client --node "$NEW" put "while-node-$L-was-down-$i" "$i" >/dev/null; done
echo "wrote 20 more keys while node $L was down"

echo "== restart node $L: it recovers from $STATE/$L and catches up from the leader"
start "$L"
COMMIT=$(client --node "$NEW" status | field commit_index)
for _ in $(seq 150); do
  APPLIED=$(client --node "$L" status 2>/dev/null | field last_applied || echo 0)
  [ "$APPLIED" -ge "$COMMIT" ] && break
  sleep 0.2
done
echo "node $L applied $APPLIED of $COMMIT committed entries"

echo "== the cluster at a glance: $BIN status"
"$BIN" status --config "$CONFIG" || true

echo "== the replicas' logs agree"
for id in 0 1 2; do echo "$LOGS/$id.txt: $(wc -l <"$LOGS/$id.txt") lines"; done
diff "$LOGS/0.txt" "$LOGS/1.txt" && diff "$LOGS/1.txt" "$LOGS/2.txt" &&
  echo "diff $LOGS/0.txt $LOGS/1.txt $LOGS/2.txt: identical"
echo "last lines of $LOGS/$L.txt:"
tail -n 3 "$LOGS/$L.txt" | sed 's/^/    /'
if [ -t 0 ]; then
  shell="$BIN client"
  if [ "$HOSTS" = 1 ]; then shell="$shell --config $CONFIG"; fi
  echo "== the cluster keeps running: http://$WEB:7200/ shows it, $shell opens a shell;"
  read -r -p "   press Enter to stop it " _
fi
echo "== done; stopping the cluster"
