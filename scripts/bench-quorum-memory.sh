#!/usr/bin/env bash
# Memory of a deep quorum queue on a local three-node cluster: COUNT
# persistent 1 KiB messages (default 1,000,000) published with confirms
# through node 1 (which leads the queue), then each node's RSS (right after
# the fill, and once it settled); then node 1 is killed with SIGKILL and
# started again, the queue is drained through node 2 and every message
# counted. Warren via scripts/cluster.sh, RabbitMQ via
# scripts/rabbitmq-cluster.sh.
#
# Usage: scripts/bench-quorum-memory.sh warren|rabbit   (COUNT, WARREN_BIN)
set -u
cd "$(dirname "$0")/.."
PERF=${WARREN_BIN:-./target/release/warren}
COUNT=${COUNT:-1000000}
OUT=$(mktemp -d)
rss() { awk '/VmRSS/ {printf "%d", $2/1024}' /proc/$1/status; }
if [ "$1" = warren ]; then
  export CLUSTER_DIR=$OUT/cluster WARREN_BIN=$PERF; scripts/cluster.sh up >/dev/null; sleep 3
  pids() { P=($(cat "$CLUSTER_DIR"/node-1.pid) $(cat "$CLUSTER_DIR"/node-2.pid) $(cat "$CLUSTER_DIR"/node-3.pid)); }
  restart1() { scripts/cluster.sh up >/dev/null; }
  PORT=5701
else
  scripts/rabbitmq-cluster.sh up >/dev/null 2>&1
  pids() { P=($(scripts/rabbitmq-cluster.sh pid 1) $(scripts/rabbitmq-cluster.sh pid 2) $(scripts/rabbitmq-cluster.sh pid 3)); }
  restart1() { scripts/rabbitmq-cluster.sh start 1 >/dev/null 2>&1; }
  PORT=5681
fi
show() { pids; echo "$1: RSS MiB node1 $(rss ${P[0]}) node2 $(rss ${P[1]}) node3 $(rss ${P[2]})"; }
show "$1 before"
"$PERF" perf --port $PORT --size 1024 --confirm 1000 --persistent --publish-only --queue deep --count "$COUNT" \
  --queue-arg x-queue-type=quorum --duration 3600 2>&1 | grep "^published"
show "$1 filled"
sleep 15
show "$1 settled"
pids; kill -9 "${P[0]}"; sleep 2; restart1; sleep 5
show "$1 node 1 restarted"
"$PERF" perf --port $((PORT + 1)) --size 1024 --prefetch 1000 --persistent --consume-only --queue deep \
  --queue-arg x-queue-type=quorum --duration 3600 >"$OUT/drain.out" 2>&1
echo "$1: drained $(grep -o 'consumed=[0-9]*' "$OUT/drain.out" | tail -1) of $COUNT through node 2"
show "$1 drained"
if [ "$1" = warren ]; then scripts/cluster.sh down >/dev/null; else scripts/rabbitmq-cluster.sh down >/dev/null 2>&1; fi
rm -rf "$OUT"
