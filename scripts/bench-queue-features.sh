#!/usr/bin/env bash
# Queue-feature benchmarks, Warren and a local RabbitMQ in one run:
# - what a TTL and a priority queue cost transient throughput, against a
#   plain queue (target: at most 10% less);
# - how fast 1,000,000 messages expire under a queue TTL while a probe
#   publisher measures its confirm latency (target: >= 100,000 msg/s);
# - 1,000,000 persistent delayed messages: broker RSS growth while they
#   wait and lateness at 10,000 due/s (Warren only: the delayed-message
#   plugin is not part of the Debian RabbitMQ package).
#
#   scripts/bench-queue-features.sh
#   DURATION=20 DELAYED=200000 scripts/bench-queue-features.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
EXPIRE=${EXPIRE:-1000000}
DELAYED=${DELAYED:-1000000}
RABBIT_PORT=${RABBITMQ_PORT:-5673}

cargo build --release --quiet --bin warren
WARREN=./target/release/warren
port=$(free_port)
data_dir=$(mktemp -d)
trap 'stop_warren "${WARREN_PID:-}"; rm -rf "$data_dir"' EXIT
start_warren "$WARREN" "$port" "$data_dir" "$data_dir/warren.log"
warren_pid=$WARREN_PID
RABBITMQ_PORT=$RABBIT_PORT scripts/rabbitmq.sh start >/dev/null
rabbit_pid=$(pgrep -f 'beam.smp.*warren-ref' | head -n1 || pgrep -f beam.smp | head -n1)

run() { # broker port pid label args...
    local broker=$1 p=$2 pid=$3 label=$4
    shift 4
    local line
    line=$($WARREN perf --port "$p" --broker-pid "$pid" --json "$@" 2>/dev/null | tail -n1)
    echo "$broker $label $line"
}

for broker in warren rabbitmq; do
    if [ "$broker" = warren ]; then p=$port; pid=$warren_pid; else p=$RABBIT_PORT; pid=$rabbit_pid; fi
    run $broker "$p" "$pid" plain --duration "$DURATION" --size 16 --queue "qf-plain-$broker"
    run $broker "$p" "$pid" ttl --duration "$DURATION" --size 16 --queue "qf-ttl-$broker" --queue-arg x-message-ttl=600000
    run $broker "$p" "$pid" priority --duration "$DURATION" --size 16 --queue "qf-prio-$broker" \
        --queue-arg x-max-priority=10 --priority 5
    run $broker "$p" "$pid" expire-transient --expire "$EXPIRE" --ttl-ms 6000 --size 16
    run $broker "$p" "$pid" expire-persistent-1KiB --expire "$EXPIRE" --ttl-ms 6000 --size 1024 --persistent
done
# A fresh broker, so the RSS growth is not hidden by memory freed earlier.
stop_warren "$warren_pid"
rm -rf "${data_dir:?}"/*
start_warren "$WARREN" "$port" "$data_dir" "$data_dir/warren.log"
warren_pid=$WARREN_PID
run warren "$port" "$warren_pid" delayed-persistent --delayed "$DELAYED" --due-rate 10000 --persistent
