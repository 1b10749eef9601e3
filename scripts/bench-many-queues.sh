#!/usr/bin/env bash
# Many queues, each under its own in-memory bound, together above the memory
# watermark: QUEUES queues receive PER_QUEUE 16 KiB transient messages each,
# one queue after another, with no consumer (each publisher gives up after
# 20 s, and the queues after it are left empty: a blocked broker shows as
# messages missing at the end). Runs each Warren binary given
# under the same watermark and reports the time to fill, the peak RSS, the
# memory alarms and the spells above the paging ratio its log shows, and
# how many messages the queues hold at the end.
#
# Usage: scripts/bench-many-queues.sh BINARY... (env: QUEUES=100 PER_QUEUE=600 WATERMARK_MIB=256)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

QUEUES=${QUEUES:-100}
PER_QUEUE=${PER_QUEUE:-600}
WATERMARK_MIB=${WATERMARK_MIB:-256}
SIZE=16384
PERF=./target/release/warren
cargo build --release -p warren --quiet

echo "# $QUEUES queues x $PER_QUEUE x $SIZE-byte transient messages, watermark $WATERMARK_MIB MiB"
for binary in "$@"; do
    data=$(mktemp -d)
    port=$(free_port)
    bench_config "$data" "$port" "$WATERMARK_MIB"
    "$binary" --config "$data/warren.toml" --log info >"$data/warren.log" 2>&1 &
    pid=$!
    wait_port "$port"
    peak=0
    started=$(date +%s.%N)
    for q in $(seq 1 "$QUEUES"); do
        one=$(date +%s)
        timeout 20 "$PERF" perf --port "$port" --producers 1 --size "$SIZE" --publish-only --count "$PER_QUEUE" \
            --queue "many-$q" --duration 3600 --json >/dev/null || true
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
        [ "$rss" -gt "$peak" ] && peak=$rss
        if [ $(($(date +%s) - one)) -ge 19 ]; then
            echo "blocked filling queue $q: the rest are left empty"
            break
        fi
    done
    ended=$(date +%s.%N)
    held=$(python3 -c "
import pika
connection = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', $port))
held = 0
for q in range(1, $QUEUES + 1):
    try:
        held += connection.channel().queue_declare('many-%d' % q, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        pass  # never declared: its publisher was blocked before it could
print(held)")
    alarms=$(grep -c 'memory alarm set' "$data/warren.log" || true)
    spells=$(grep -c 'memory above the paging ratio' "$data/warren.log" || true)
    python3 -c "
import sys
s, e, peak = float('$started'), float('$ended'), int('$peak')
total = $QUEUES * $PER_QUEUE
print('%-28s filled in %6.1f s (%6.0f msg/s)  peak RSS %6.0f MiB  memory alarms %s  paging spells %s  queued %s of %d'
      % ('$(basename "$binary")', e - s, total / (e - s), peak / 1024, '$alarms', '$spells', '$held', total))"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$data"
done
