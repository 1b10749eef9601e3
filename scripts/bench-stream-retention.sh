#!/usr/bin/env bash
# Stream retention by size: a stream with x-max-length-bytes LIMIT (default
# 1 GiB) and the default 500,000,000-byte segments takes persistent 1 KiB
# messages with confirms for DURATION seconds (default 60); the stream's directory
# is measured every half second. Disk use must stay within one segment of
# the limit. Warren only (RabbitMQ keeps its stream files elsewhere).
#
# Usage: scripts/bench-stream-retention.sh   (LIMIT, DURATION, WARREN_BIN)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
BIN=${WARREN_BIN:-./target/release/warren}
LIMIT=${LIMIT:-1073741824}
SECONDS_TO_RUN=${DURATION:-60}
port=$(free_port)
data=$(mktemp -d)
trap 'stop_warren "${WARREN_PID:-}"; rm -rf "$data"' EXIT
WARREN_HTTP_PORT=0 start_warren "$BIN" "$port" "$data" "$data/warren.log"
( set +e; while true; do du -sb "$data/streams" 2>/dev/null | cut -f1; sleep 0.5; done ) > "$data/du.txt" &
sampler=$!
line=$("$BIN" perf --port "$port" --size 1024 --persistent --queue retained --queue-arg x-queue-type=stream \
    --queue-arg "x-max-length-bytes=$LIMIT" --confirm 256 --publish-only --duration "$SECONDS_TO_RUN" --json)
sleep 1
kill "$sampler" 2>/dev/null || true
python3 - "$line" "$LIMIT" "$data/du.txt" <<'EOF'
import json, sys
line, limit, samples = json.loads(sys.argv[1]), int(sys.argv[2]), [int(x) for x in open(sys.argv[3]) if x.strip()]
segment = 500_000_000
peak, last = max(samples), samples[-1]
print("published %d x 1 KiB (%.0f MB) at %.0f msg/s; stream directory: peak %.0f MB, last %.0f MB; limit %.0f MB, limit + one segment %.0f MB: %s" % (
    line["published"], line["published"] * 1024 / 1e6, line["published_per_s"], peak / 1e6, last / 1e6, limit / 1e6,
    (limit + segment) / 1e6, "within" if peak <= limit + segment else "OVER"))
EOF
