#!/usr/bin/env bash
# Throughput and broker CPU per message of two Warren binaries, in the same
# run, alternating: transient and persistent (confirmed) loads, ROUNDS rounds
# each. The load generator is the second binary's `perf` for both, so only
# the broker differs. Prints one line per run and the medians.
#
#   scripts/bench-old-new.sh OLD_BINARY NEW_BINARY
#   ROUNDS=3 DURATION=10 scripts/bench-old-new.sh /tmp/warren-before target/release/warren
set -euo pipefail
. "$(dirname "$0")/lib.sh"
old=$1
new=$2
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}

run() { # binary label load-args...
    local binary=$1 label=$2
    shift 2
    local port data_dir pid
    port=$(free_port)
    data_dir=$(mktemp -d)
    start_warren "$binary" "$port" "$data_dir" /dev/null
    pid=$WARREN_PID
    local line
    line=$("$new" perf --port "$port" --duration "$DURATION" --broker-pid "$pid" --json "$@")
    stop_warren "$pid"
    rm -rf "$data_dir"
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('%s %.0f %s' % (sys.argv[2], d['published_per_s'], d['broker_cpu_us_per_msg']))" "$line" "$label"
}

results=$(mktemp)
for round in $(seq 1 "$ROUNDS"); do
    for which in old new; do
        binary=$old
        [ "$which" = new ] && binary=$new
        run "$binary" "$which transient" --producers 2 --consumers 2 | tee -a "$results"
        run "$binary" "$which persistent" --producers 2 --consumers 2 --persistent --confirm 1000 | tee -a "$results"
    done
done
python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    which, load, rate, cpu = line.split()
    rows.setdefault((load, which), []).append((float(rate), float(cpu)))
print("load        binary  median msg/s  median broker CPU us/msg")
for load in ("transient", "persistent"):
    base = None
    for which in ("old", "new"):
        runs = rows.get((load, which), [])
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        ratio = "" if base is None else "  (%+.1f%% msg/s, %+.1f%% CPU)" % (100 * (rate / base[0] - 1), 100 * (cpu / base[1] - 1))
        base = base or (rate, cpu)
        print("%-11s %-7s %12.0f %12.2f%s" % (load, which, rate, cpu, ratio))
PY
rm -f "$results"
