#!/usr/bin/env bash
# 100 quorum queues on a local three-node cluster, one confirmed publisher
# each (a `warren perf` process per queue, all through node 1, so node 1
# leads every queue), COUNT (default 2,000) persistent 1 KiB messages per queue: the total
# rate, each node's CPU and the whole machine's busy and idle time (clock
# ticks, 1/100 s; the publishers run on the same machine). Warren via
# scripts/cluster.sh, RabbitMQ via scripts/rabbitmq-cluster.sh.
#
# Usage: scripts/bench-quorum-many.sh warren|rabbit   (WARREN_BIN: the binary, default target/release/warren)
set -u
cd "$(dirname "$0")/.."
PERF=${WARREN_BIN:-./target/release/warren}
OUT=$(mktemp -d)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
if [ "$1" = warren ]; then
  export CLUSTER_DIR=$OUT/cluster WARREN_BIN=$PERF; scripts/cluster.sh up >/dev/null; sleep 3
  P=($(cat "$CLUSTER_DIR"/node-1.pid) $(cat "$CLUSTER_DIR"/node-2.pid) $(cat "$CLUSTER_DIR"/node-3.pid)); PORT=5701
else
  scripts/rabbitmq-cluster.sh up >/dev/null 2>&1
  P=($(scripts/rabbitmq-cluster.sh pid 1) $(scripts/rabbitmq-cluster.sh pid 2) $(scripts/rabbitmq-cluster.sh pid 3)); PORT=5681
fi
# Declared first (not timed).
for q in $(seq 1 100); do python3 -c "import pika; c=pika.BlockingConnection(pika.ConnectionParameters(port=$PORT)); c.channel().queue_declare('m$q', durable=True, arguments={'x-queue-type':'quorum'}); c.close()"; done
a=($(cpu ${P[0]}) $(cpu ${P[1]}) $(cpu ${P[2]}))
machine_a=($(head -1 /proc/stat))
start=$(date +%s.%N)
for q in $(seq 1 100); do
  "$PERF" perf --port $PORT --size 1024 --confirm ${WINDOW:-100} --persistent --publish-only --count ${COUNT:-2000} --queue m$q --queue-arg x-queue-type=quorum --duration 600 >"$OUT/many-$q.out" 2>&1 &
done
wait
end=$(date +%s.%N)
b=($(cpu ${P[0]}) $(cpu ${P[1]}) $(cpu ${P[2]}))
machine_b=($(head -1 /proc/stat))
busy=0; for i in 1 2 3 6 7 8; do busy=$((busy + machine_b[i] - machine_a[i])); done
idle=$((machine_b[4] - machine_a[4])); iowait=$((machine_b[5] - machine_a[5]))
confirmed=$(grep -h "^published" "$OUT"/many-*.out | sed 's/.*confirmed: \([0-9]*\).*/\1/' | paste -sd+ | bc)
echo "$1: 100 queues, confirmed $confirmed in $(echo "$end - $start" | bc) s = $(echo "$confirmed / ($end - $start)" | bc) msg/s; cpu ticks $((b[0]-a[0])) $((b[1]-a[1])) $((b[2]-a[2])); machine busy $busy idle $idle iowait $iowait (all processes)"
if [ "$1" = warren ]; then scripts/cluster.sh down >/dev/null; rm -rf "$CLUSTER_DIR"; else scripts/rabbitmq-cluster.sh down >/dev/null 2>&1; fi
