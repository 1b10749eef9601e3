#!/usr/bin/env bash
# A spike larger than the memory watermark: 4 publishers send 16 KiB
# transient messages into a non-durable queue with no consumer until
# TOTAL_MIB are queued, then one consumer drains it. Warren (release build)
# and RabbitMQ (scripts/rabbitmq.sh, restarted with the same watermark) in
# the same run. Reports accepted and drain rates, the broker's peak RSS
# (sampled every 100 ms) and the memory alarms its log shows.
#
# Usage: scripts/bench-spike.sh [TOTAL_MIB] [WATERMARK_MIB]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

TOTAL_MIB=${1:-4096}
WATERMARK_MIB=${2:-256}
SIZE=16384
PRODUCERS=4
COUNT=$((TOTAL_MIB * 1024 * 1024 / SIZE / PRODUCERS))
PERF=./target/release/warren

sample_rss() { # pid out-file: peak RSS in KiB until the pid's stop file exists
    local pid=$1 out=$2 peak=0 rss
    while [ ! -e "$out.stop" ]; do
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ "${rss:-0}" -gt "$peak" ] && peak=$rss
        sleep 0.1
    done
    echo "$peak" >"$out"
}

run() { # name port pid
    local name=$1 port=$2 pid=$3 rss_file
    rss_file=$(mktemp)
    sample_rss "$pid" "$rss_file" &
    local sampler=$!
    local started ended
    started=$(date +%s.%N)
    "$PERF" perf --port "$port" --producers "$PRODUCERS" --size "$SIZE" --publish-only --count "$COUNT" \
        --queue spike --duration 3600 --json >/dev/null
    ended=$(date +%s.%N)
    local drain_started drain_ended
    drain_started=$(date +%s.%N)
    "$PERF" perf --port "$port" --consume-only --queue spike --consumers 1 --prefetch 1000 --duration 3600 \
        --json >/dev/null
    drain_ended=$(date +%s.%N)
    touch "$rss_file.stop"
    wait "$sampler"
    python3 - "$name" "$started" "$ended" "$drain_started" "$drain_ended" "$(cat "$rss_file")" \
        "$((COUNT * PRODUCERS))" "$SIZE" <<'EOF'
import sys
name, s, e, ds, de, peak_kib, count, size = sys.argv[1:]
publish = float(e) - float(s)
# The drain ends one idle second after the last message.
drain = max(0.001, float(de) - float(ds) - 1.0)
count, size = int(count), int(size)
print("%-9s %7d msgs  accepted %8.0f msg/s (%6.0f MiB/s)  drained %8.0f msg/s (%6.0f MiB/s)  peak RSS %6.0f MiB"
      % (name, count, count / publish, count * size / publish / 2**20, count / drain, count * size / drain / 2**20,
         int(peak_kib) / 1024))
EOF
    rm -f "$rss_file" "$rss_file.stop"
}

cargo build --release -p warren --quiet
data=$(mktemp -d)
port=$(free_port)
bench_config "$data" "$port" "$WATERMARK_MIB"
./target/release/warren --config "$data/warren.toml" --log info >"$data/warren.log" 2>&1 &
warren_pid=$!
wait_port "$port"
echo "# $PRODUCERS publishers, $SIZE-byte transient messages, non-durable queue, $TOTAL_MIB MiB, watermark $WATERMARK_MIB MiB"
run warren "$port" "$warren_pid"
echo "warren: memory alarms $(grep -c 'memory alarm set' "$data/warren.log" || true)," \
    "spells above the paging ratio $(grep -c 'memory above the paging ratio' "$data/warren.log" || true)"
kill -TERM "$warren_pid"
wait "$warren_pid" 2>/dev/null || true
rm -rf "$data"

RABBITMQ_EXTRA_CONF="vm_memory_high_watermark.absolute = ${WATERMARK_MIB}MiB" scripts/rabbitmq.sh restart \
    </dev/null >/dev/null 2>&1
rabbit_pid=$(cat "${RABBITMQ_REF_DIR:-/tmp/warren-rabbitmq}/rabbitmq.pid")
run rabbitmq "${RABBITMQ_PORT:-5673}" "$rabbit_pid"
echo "rabbitmq: memory alarms $(cat "${RABBITMQ_REF_DIR:-/tmp/warren-rabbitmq}"/log/*.log 2>/dev/null \
    | grep -c 'memory resource limit alarm set' || true)"
