#!/usr/bin/env bash
# Stream queues on one broker, for side-by-side runs of Warren and RabbitMQ
# (the private instance of scripts/rabbitmq.sh on 5673):
#   1. publish COUNT persistent 1 KiB messages with confirms (a window of
#      CONFIRM, default 1000, as the other benchmarks) into a fresh stream:
#      rate and broker CPU per message;
#   2. READERS consumers, each reading the whole stream from `first`
#      (prefetch 1000, acks every 250): aggregate and per-reader rate, and
#      the broker's peak RSS growth while they read;
#   3. a consumer starting at `last`: time to its first message;
#   4. the stream deleted.
#
# Usage: scripts/bench-streams.sh warren|rabbit   (COUNT, READERS, CONFIRM, WARREN_BIN)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
BIN=${WARREN_BIN:-./target/release/warren}
COUNT=${COUNT:-1000000}
READERS=${READERS:-10}
CONFIRM=${CONFIRM:-1000}
STREAM=bench-stream-$$
if [ "$1" = warren ]; then
    port=$(free_port)
    data=$(mktemp -d)
    trap 'stop_warren "${WARREN_PID:-}"; rm -rf "$data"' EXIT
    WARREN_HTTP_PORT=0 start_warren "$BIN" "$port" "$data" "$data/warren.log"
    pid=$WARREN_PID
else
    port=${RABBITMQ_PORT:-5673}
    pid=$(scripts/rabbitmq.sh status | grep -o 'pid [0-9]*' | grep -o '[0-9]*')
fi
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
common=(--port "$port" --size 1024 --persistent --queue "$STREAM" --queue-arg x-queue-type=stream --json)
# What earlier runs left dirty in the page cache is written out first: its
# writeback would otherwise share the disk (and the fsyncs) with this run.
sync; sleep 2

line=$("$BIN" perf "${common[@]}" --confirm "$CONFIRM" --publish-only --count "$COUNT" --duration 3600 --broker-pid "$pid")
rate=$(echo "$line" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.0f %s" % (d["published_per_s"], d["broker_cpu_us_per_msg"]))')
echo "$1 publish: $COUNT x 1 KiB with confirms (window $CONFIRM): ${rate% *} msg/s, broker CPU ${rate#* } us/msg"
sync; sleep 2

before=$(rss "$pid"); peak=$before
( while kill -0 "$pid" 2>/dev/null; do r=$(rss "$pid"); echo "$r"; sleep 0.1; done ) > /tmp/bench-streams-rss.$$ &
sampler=$!
line=$("$BIN" perf "${common[@]}" --consume-only --consumers "$READERS" --prefetch 1000 \
    --consume-arg x-stream-offset=first --duration 3600)
kill "$sampler" 2>/dev/null || true
peak=$(sort -n /tmp/bench-streams-rss.$$ | tail -n1); rm -f /tmp/bench-streams-rss.$$
python3 - "$1" "$line" "$READERS" "$COUNT" "$before" "$peak" <<'EOF'
import json, sys
name, line, readers, count, before, peak = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
total = line["consumed_per_s"]
print("%s read: %d readers from first, %d messages each: %.0f msg/s in all, %.0f msg/s (%.0f MB/s of payload) per reader; broker RSS %d -> peak %d MiB (+%d)" % (
    name, readers, count, total, total / readers, total / readers * 1024 / 1e6, before // 1024, peak // 1024, (peak - before) // 1024))
EOF

python3 - "$port" "$STREAM" "$1" <<'EOF'
import sys, time, pika
port, stream, name = sys.argv[1], sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:%s/%%2F" % port))
times = []
for _ in range(5):
    # A channel each, closed after (pika's basic_cancel would reject what
    # it still holds, which a stream refuses).
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    got = []
    start = time.monotonic()
    ch.basic_consume(stream, lambda c, m, p, b: got.append(time.monotonic()), arguments={"x-stream-offset": "last"})
    while not got and time.monotonic() - start < 10:
        conn.process_data_events(time_limit=0.001)
    ch.close()
    times.append((got[0] - start) * 1000 if got else float("inf"))
ch = conn.channel()
times.sort()
print("%s last: first message after %.1f ms (median of 5; min %.1f, max %.1f)" % (name, times[2], times[0], times[-1]))
ch.queue_delete(stream)
conn.close()
EOF
