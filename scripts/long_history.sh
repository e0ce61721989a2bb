#!/usr/bin/env bash
# What a long history costs (issue #8): runs a local 3-node cluster of
# BINARY (default target/release/raft-zmq, from this repo's config.json),
# writes 256-byte values over 1,000 keys for SECONDS (default 30) with the
# bench, then prints each node's peak RSS, state dir and mirror sizes, and
# how long a follower killed with -9 takes from restart to serving again
# (status answering with everything committed applied).
#
#   scripts/long_history.sh [SECONDS] [BINARY]
set -euo pipefail

seconds=${1:-30}
bin=$(realpath "${2:-target/release/raft-zmq}")
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
cp "$root/config.json" "$dir/"
cd "$dir"
cleanup() {
    pkill -9 -f "$dir/config.json" 2>/dev/null || true
    kill "$(jobs -p)" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

status() { "$bin" client --config "$dir/config.json" --node "$1" --timeout-ms 500 status 2>/dev/null || true; }
field() {
    python3 -c 'import json,sys; v=json.loads(sys.stdin.read() or "{}").get(sys.argv[1]); print("" if v is None else v)' "$1"
}

"$bin" cluster --config "$dir/config.json" > cluster.log 2>&1 &
for _ in $(seq 100); do
    [ -n "$(status 0 | field leader)" ] && break
    sleep 0.1
done
"$bin" bench --config "$dir/config.json" --clients 64 --duration "$seconds" --keys 1000 --value-size 256 | tail -2

leader=$(status 0 | field leader)
follower=$(( (leader + 1) % 3 ))
for id in 0 1 2; do
    pid=$(pgrep -f -- "--node-id $id --config $dir/config.json" | head -1)
    rss=$(awk '/VmHWM/ {print $2 / 1024 " MB"}' "/proc/$pid/status")
    echo "node $id: peak RSS $rss, state dir $(du -sh "state/$id" | cut -f1)," \
        "mirror $(du -ch logs/$id.txt* | tail -1 | cut -f1) in $(ls logs/$id.txt* | wc -l) file(s)," \
        "first log index $(status "$id" | field first_log_index)"
done

grep -hE "snapshot at .* taken|log compacted" cluster.log | tail -4
commit=$(status "$leader" | field commit_index)
pkill -9 -f -- "--node-id $follower --config $dir/config.json"
sleep 0.5
start=$(date +%s.%N)
"$bin" --node-id "$follower" --config "$dir/config.json" > "restart-$follower.log" 2>&1 &
until [ "$(status "$follower" | field last_applied)" -ge "$commit" ] 2>/dev/null; do sleep 0.02; done
echo "follower $follower: serving $(echo "$(date +%s.%N) - $start" | bc) s after restart (applied >= $commit)"
