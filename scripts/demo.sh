#!/usr/bin/env bash
# Starts the local 3-node cluster of config.json and shows it working:
# an election, writes through every node, kill -9 of the leader and the
# failover, the dead node's restart and catch-up, identical replica logs.
# Every node is a separate `raft-zmq --node-id N` process; all of them are
# stopped when the script ends, however it ends. State persists in state/
# and logs/, so a second run continues where the first one stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/need-libzmq.sh
echo "== building (release)"
cargo build --release --quiet
BIN=target/release/raft-zmq
OUT=target/demo
mkdir -p "$OUT"
declare -A PID

field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }
client() { "$BIN" client --timeout-ms 2000 "$@"; }
start() {
  "$BIN" --node-id "$1" >>"$OUT/node$1.log" 2>&1 &
  PID[$1]=$!
  echo "started node $1 (pid ${PID[$1]}), output in $OUT/node$1.log"
}
stop_all() {
  for id in "${!PID[@]}"; do kill "${PID[$id]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all EXIT

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
echo "watch it live: open http://127.0.0.1:7200/ (or :7201, :7202) in a browser"
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

echo "== restart node $L: it recovers from state/$L and catches up from the leader"
start "$L"
COMMIT=$(client --node "$NEW" status | field commit_index)
for _ in $(seq 150); do
  APPLIED=$(client --node "$L" status 2>/dev/null | field last_applied || echo 0)
  [ "$APPLIED" -ge "$COMMIT" ] && break
  sleep 0.2
done
echo "node $L applied $APPLIED of $COMMIT committed entries"

echo "== the cluster at a glance: $BIN status"
"$BIN" status || true

echo "== the replicas' logs agree"
for id in 0 1 2; do echo "logs/$id.txt: $(wc -l <logs/$id.txt) lines"; done
diff logs/0.txt logs/1.txt && diff logs/1.txt logs/2.txt && echo "diff logs/0.txt logs/1.txt logs/2.txt: identical"
echo "last lines of logs/$L.txt:"
tail -n 3 "logs/$L.txt" | sed 's/^/    /'
if [ -t 0 ]; then
  echo "== the cluster keeps running: http://127.0.0.1:7200/ shows it, $BIN client opens a shell;"
  read -r -p "   press Enter to stop it " _
fi
echo "== done; stopping the cluster"
