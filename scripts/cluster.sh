#!/usr/bin/env bash
# A local cluster on 127.0.0.1 to try clustering on one machine: N nodes
# (default 3) named node-1@local ..., AMQP on 5701.., management API on
# 15701.., cluster ports 25701.., data under ./cluster-data (a shared secret
# is generated there on first use). Nodes run in the background; `down`
# stops them, `status` shows what node 1 knows of the others and of the
# metadata Raft group.
#
# Usage: scripts/cluster.sh up [N] | down | status
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

DIR=${CLUSTER_DIR:-./cluster-data}
BIN=${WARREN_BIN:-./target/release/warren}

# A process that was killed stays a zombie until something reaps it
# (kill -0 still succeeds): it is not running.
alive() {
    kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != Z ]
}

up() {
    local n=${1:-3} seeds="" i
    [ -x "$BIN" ] || cargo build --release -p warren --quiet
    mkdir -p "$DIR"
    [ -s "$DIR/secret" ] || head -c 32 /dev/urandom | base64 >"$DIR/secret"
    chmod 600 "$DIR/secret"
    for i in $(seq 1 "$n"); do seeds="$seeds${seeds:+,}127.0.0.1:$((25700 + i))"; done
    for i in $(seq 1 "$n"); do
        if [ -f "$DIR/node-$i.pid" ] && alive "$(cat "$DIR/node-$i.pid")"; then
            echo "node-$i@local is already running"
            continue
        fi
        "$BIN" --node-name "node-$i@local" --bind 127.0.0.1 --data-dir "$DIR/node-$i" \
            --amqp-port $((5700 + i)) --http-port $((15700 + i)) --prometheus-port 0 \
            --cluster-port $((25700 + i)) --cluster-seeds "$seeds" --cluster-secret-file "$DIR/secret" \
            >>"$DIR/node-$i.log" 2>&1 &
        echo $! >"$DIR/node-$i.pid"
        wait_port $((5700 + i))
        echo "node-$i@local: amqp://guest:guest@127.0.0.1:$((5700 + i)), http://127.0.0.1:$((15700 + i))/, log $DIR/node-$i.log"
    done
}

down() {
    local pid_file pid
    for pid_file in "$DIR"/node-*.pid; do
        [ -e "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        kill "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.1; done
        rm -f "$pid_file"
        echo "stopped $(basename "$pid_file" .pid)@local"
    done
}

status() {
    curl -fsS -u guest:guest http://127.0.0.1:15701/api/nodes | python3 -c '
import json, sys
for node in json.load(sys.stdin):
    error = node.get("warren_cluster_error")
    print("%-16s %s%s" % (node["name"], "running" if node["running"] else "not running",
                          "  (" + error + ")" if error else ""))
    meta = node.get("warren_metadata")
    if meta:
        print("metadata group:  leader %s, term %s, members %s" % (meta["leader"], meta["term"], ", ".join(meta["members"]) or "none yet"))'
}

case "${1:-}" in
    up) up "${2:-3}" ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up [N] | down | status" >&2; exit 2 ;;
esac
