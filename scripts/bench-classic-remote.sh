#!/usr/bin/env bash
# A classic queue through other nodes of a local three-node cluster: the
# queue is declared on node 1 (its home), COUNT (default 50,000) persistent
# 1 KiB messages are published with confirms (window WINDOW, default 100)
# through node 2, then consumed with acks through node 3; and, for
# reference, the same published and consumed through node 1 itself. Prints
# each phase's rate and each node's CPU ticks (1/100 s). Warren via
# scripts/cluster.sh, RabbitMQ via scripts/rabbitmq-cluster.sh.
#
# Usage: scripts/bench-classic-remote.sh warren|rabbit   (WARREN_BIN: the binary, default target/release/warren)
set -u
cd "$(dirname "$0")/.."
PERF=${WARREN_BIN:-./target/release/warren}
OUT=$(mktemp -d)
COUNT=${COUNT:-50000}
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
if [ "$1" = warren ]; then
  export CLUSTER_DIR=$OUT/cluster WARREN_BIN=$PERF; scripts/cluster.sh up >/dev/null; sleep 3
  P=($(cat "$CLUSTER_DIR"/node-1.pid) $(cat "$CLUSTER_DIR"/node-2.pid) $(cat "$CLUSTER_DIR"/node-3.pid)); BASE=5700
else
  scripts/rabbitmq-cluster.sh up >/dev/null 2>&1
  P=($(scripts/rabbitmq-cluster.sh pid 1) $(scripts/rabbitmq-cluster.sh pid 2) $(scripts/rabbitmq-cluster.sh pid 3)); BASE=5680
fi
python3 -c "import pika; c=pika.BlockingConnection(pika.ConnectionParameters(port=$((BASE + 1)))); c.channel().queue_declare('remote', durable=True); c.close()"
sleep 1
phase() { # name, node to publish through, node to consume through
  local a=($(cpu ${P[0]}) $(cpu ${P[1]}) $(cpu ${P[2]}))
  local line
  line=$("$PERF" perf --port $((BASE + $2)) --size 1024 --confirm ${WINDOW:-100} --persistent --publish-only --count "$COUNT" --queue remote --duration 600 2>&1 | grep "^published")
  local b=($(cpu ${P[0]}) $(cpu ${P[1]}) $(cpu ${P[2]}))
  echo "$1 publish via node $2: $line; cpu ticks $((b[0]-a[0])) $((b[1]-a[1])) $((b[2]-a[2]))"
  line=$("$PERF" perf --port $((BASE + $3)) --persistent --consume-only --prefetch 1000 --queue remote --duration 600 2>&1 | grep "^consumed")
  local c=($(cpu ${P[0]}) $(cpu ${P[1]}) $(cpu ${P[2]}))
  echo "$1 consume via node $3: $line; cpu ticks $((c[0]-b[0])) $((c[1]-b[1])) $((c[2]-b[2]))"
}
phase "$1" 2 3
phase "$1" 1 1
if [ "$1" = warren ]; then scripts/cluster.sh down >/dev/null; rm -rf "$CLUSTER_DIR"; else scripts/rabbitmq-cluster.sh down >/dev/null 2>&1; fi
rm -rf "$OUT"
