#!/usr/bin/env bash
# Broker instructions per message, old binary against new: a steadier figure
# than throughput on a shared 2-core machine (no hardware counters here, so
# the broker runs under callgrind, which counts every instruction it
# executes). Each round starts a fresh broker under callgrind, sends a fixed
# number of messages with `warren perf --count`, stops the broker, and
# divides its instruction count by the messages sent. Callgrind runs the
# broker 20 to 50 times slower, so counts are small and timings meaningless.
# The same run with one message is subtracted: start, stop, logins (the
# password KDF alone costs more than thousands of messages) and queue setup.
#
# Usage: scripts/bench-instructions.sh OLD_BINARY NEW_BINARY [ROUNDS] [COUNT]
# PERF_EXTRA adds `warren perf` arguments to every scenario (e.g.
# "--rate 1000" keeps queues short: the fast path without paging).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

old=$1
new=$2
ROUNDS=${3:-3}
COUNT=${4:-20000}

# Instructions the broker executed under callgrind, from start to stop,
# while `warren perf` ran once with the given arguments.
instructions() { # binary perf-args...
    local binary=$1
    shift
    local port data_dir out
    port=$(free_port)
    data_dir=$(mktemp -d)
    out="$data_dir/callgrind.out"
    WARREN_HTTP_PORT=0 WARREN_PROMETHEUS_PORT=0 valgrind --tool=callgrind --callgrind-out-file="$out" --collect-atstart=yes \
        "$binary" --amqp-port "$port" --bind 127.0.0.1 --data-dir "$data_dir/data" --log warn >"$data_dir/log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 600); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    "$new" perf --port "$port" --duration 600 --json ${PERF_EXTRA:-} "$@" >/dev/null
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    # Every thread's file; the totals line of each.
    python3 - "$data_dir" <<'EOF'
import glob, sys
total = 0
for path in glob.glob(sys.argv[1] + "/callgrind.out*"):
    for line in open(path, errors="replace"):
        if line.startswith("summary:") or line.startswith("totals:"):
            total += int(line.split()[1])
            break
print(total)
EOF
    rm -rf "$data_dir"
}

scenario() { # label perf-args...
    local label=$1
    shift
    for which in old new; do
        local binary=$old
        [ "$which" = new ] && binary=$new
        local one many
        one=$(instructions "$binary" "$@" --count 1)
        many=$(instructions "$binary" "$@" --count "$COUNT")
        python3 -c "import sys; print('%-4s %-30s %8.0f' % (sys.argv[1], sys.argv[2], (int(sys.argv[4]) - int(sys.argv[3])) / (int(sys.argv[5]) - 1)))" \
            "$which" "$label" "$one" "$many" "$COUNT"
    done
}

for round in $(seq 1 "$ROUNDS"); do
    echo "# round $round: broker instructions per message (fewer is better)"
    scenario "transient 1 KiB 1p1c" --producers 1 --consumers 1 --size 1024
    scenario "persistent 1 KiB 1p1c confirm" --producers 1 --consumers 1 --size 1024 --confirm 100 --persistent
done
