#!/usr/bin/env bash
# Runs the same workloads against Warren and a local RabbitMQ in one run and
# prints each figure side by side with the ratio.
#
#   scripts/bench-vs-rabbitmq.sh            # 10 s per load scenario
#   DURATION=20 scripts/bench-vs-rabbitmq.sh
#   IDLE_CONNECTIONS=10000 IDLE_QUEUES=1000 scripts/bench-vs-rabbitmq.sh
#
# RabbitMQ comes from the Debian package (scripts/rabbitmq.sh installs and
# starts a private instance on port 5673). Both brokers run on this machine,
# one at a time under load, so the comparison shares its noise.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
DEEP=${DEEP:-1000000}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
IDLE_QUEUES=${IDLE_QUEUES:-1000}
RABBIT_IDLE_CONNECTIONS=${RABBIT_IDLE_CONNECTIONS:-2000}
RABBIT_PORT=${RABBITMQ_PORT:-5673}

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet --bin warren
WARREN=./target/release/warren

port=$(free_port)
data_dir=$(mktemp -d)
trap 'stop_warren "${WARREN_PID:-}"; rm -rf "$data_dir"' EXIT
start_warren "$WARREN" "$port" "$data_dir" "$data_dir/warren.log"
warren_pid=$WARREN_PID

RABBITMQ_PORT=$RABBIT_PORT scripts/rabbitmq.sh start >/dev/null
rabbit_pid=$(pgrep -f 'beam.smp.*warren-ref' | head -n1 || true)
if [ -z "$rabbit_pid" ]; then
    rabbit_pid=$(pgrep -f beam.smp | head -n1)
fi

results=$(mktemp)
run() { # name broker port pid args...
    local name=$1 broker=$2 p=$3 pid=$4
    shift 4
    local line
    line=$($WARREN perf --port "$p" --broker-pid "$pid" --json "$@" 2>/dev/null | tail -n1)
    echo "$name $broker $line" >>"$results"
    echo "  $broker $name: $line" >&2
}

echo "warren pid $warren_pid on $port, rabbitmq pid $rabbit_pid on $RABBIT_PORT; ${DURATION}s per scenario" >&2
for broker in warren rabbitmq; do
    if [ "$broker" = warren ]; then p=$port; pid=$warren_pid; else p=$RABBIT_PORT; pid=$rabbit_pid; fi
    run transient-16B $broker "$p" "$pid" --duration "$DURATION" --size 16 --prefetch 1000 --queue "bench-16-$broker"
    run transient-1KiB $broker "$p" "$pid" --duration "$DURATION" --size 1024 --prefetch 1000 --queue "bench-1k-$broker"
    run latency-1k-per-s $broker "$p" "$pid" --duration "$DURATION" --size 16 --rate 1000 --queue "bench-lat-$broker"
    run confirms-1KiB $broker "$p" "$pid" --duration "$DURATION" --size 1024 --confirm 1000 --queue "bench-conf-$broker"
    run persistent-1KiB $broker "$p" "$pid" --duration "$DURATION" --size 1024 --confirm 1000 --persistent --queue "bench-pers-$broker"
    # A deep durable queue: fill with no consumer, then drain.
    run deep-fill $broker "$p" "$pid" --publish-only --persistent --confirm 1000 --size 1024 --count "$DEEP" --duration 600 --queue "bench-deep-$broker"
    run deep-drain $broker "$p" "$pid" --consume-only --persistent --prefetch 1000 --duration 600 --queue "bench-deep-$broker"
done
# Idle memory on a fresh broker, so load scenarios do not skew the baseline.
stop_warren "$warren_pid"
start_warren "$WARREN" "$port" "$data_dir" "$data_dir/warren.log"
warren_pid=$WARREN_PID
run idle warren "$port" "$warren_pid" --idle-connections "$IDLE_CONNECTIONS" --idle-queues "$IDLE_QUEUES"
run idle rabbitmq "$RABBIT_PORT" "$rabbit_pid" --idle-connections "$RABBIT_IDLE_CONNECTIONS" --idle-queues "$IDLE_QUEUES"

python3 - "$results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, broker, payload = line.split(" ", 2)
    try:
        rows.setdefault(name, {})[broker] = json.loads(payload)
    except json.JSONDecodeError:
        rows.setdefault(name, {})[broker] = {}
def show(name, key, better="higher", unit=""):
    w = rows.get(name, {}).get("warren", {}).get(key)
    r = rows.get(name, {}).get("rabbitmq", {}).get(key)
    ratio = ""
    if isinstance(w, (int, float)) and isinstance(r, (int, float)) and w and r:
        ratio = f"{w / r:.2f}x"
    print(f"| {name} | {key}{unit} | {w} | {r} | {ratio} ({better} is better) |")
print("| scenario | figure | Warren | RabbitMQ | Warren/RabbitMQ |")
print("|---|---|---|---|---|")
for name in ("transient-16B", "transient-1KiB", "confirms-1KiB", "persistent-1KiB"):
    show(name, "consumed_per_s")
    show(name, "broker_cpu_us_per_msg", "lower")
show("persistent-1KiB", "confirm_us_p99", "lower")
show("deep-fill", "published_per_s")
show("deep-drain", "consumed_per_s")
for broker in ("warren", "rabbitmq"):
    fill = rows.get("deep-fill", {}).get(broker, {})
    if fill.get("rss_after_kib") is not None and fill.get("rss_before_kib") is not None:
        print(f"| deep-fill | {broker} RSS growth MiB | {(fill['rss_after_kib'] - fill['rss_before_kib']) / 1024:.0f} | | |")
show("latency-1k-per-s", "latency_us_p50", "lower")
show("latency-1k-per-s", "latency_us_p99", "lower")
show("idle", "kib_per_connection", "lower")
for broker in ("warren", "rabbitmq"):
    idle = rows.get("idle", {}).get(broker, {})
    if idle:
        print(f"\n{broker}: {idle.get('connections')} idle connections + {idle.get('queues')} queues -> RSS {idle.get('rss_after_kib', 0) / 1024:.0f} MiB")
PY
