#!/usr/bin/env bash
# Local three-node RabbitMQ cluster on 127.0.0.1, the reference for
# quorum-queue benchmarks against Warren's own cluster (scripts/cluster.sh).
# Each node is a private instance started by scripts/rabbitmq.sh:
#
#   rc1@localhost  AMQP 5681  distribution 25681  dir /tmp/warren-rabbitmq-c1
#   rc2@localhost  AMQP 5682  distribution 25682  dir /tmp/warren-rabbitmq-c2
#   rc3@localhost  AMQP 5683  distribution 25683  dir /tmp/warren-rabbitmq-c3
#
# They share one private epmd (port 4371) and one Erlang cookie; nodes 2 and
# 3 are joined to node 1. A quorum queue declared through a node gets its
# leader on that node (client-local leader locator), e.g. `perf --port 5681
# --queue-arg x-queue-type=quorum` puts the leader on rc1.
#
# Usage: scripts/rabbitmq-cluster.sh up|down|status
#        scripts/rabbitmq-cluster.sh ctl N ARGS...   (rabbitmqctl against node N)
#        scripts/rabbitmq-cluster.sh pid N           (pid of node N's beam.smp)
#        scripts/rabbitmq-cluster.sh start N         (start node N again after a kill)
#
# `up` does nothing if all three nodes are running and clustered; otherwise
# it stops any leftover nodes and builds a fresh cluster (node data is wiped,
# the reference keeps nothing between runs). `down` stops all three.
#
# Environment overrides:
#   RABBITMQ_CLUSTER_BASE_PORT  node i gets AMQP port base+i and distribution
#                               port base+i+20000 (default 5680)
#   RABBITMQ_CLUSTER_DIR        state dir prefix, node i uses ${prefix}i
#                               (default /tmp/warren-rabbitmq-c)
#   RABBITMQ_CLUSTER_EPMD_PORT  shared private epmd port (default 4371; the
#                               single instance of rabbitmq.sh uses 4370)
# RABBITMQ_EXTRA_CONF, RABBITMQ_PLUGINS and RABBITMQ_START_TIMEOUT are passed
# on to scripts/rabbitmq.sh. Ports Warren uses (5672, 5701-5703, 15701-15703,
# 25701-25703) are refused.
set -euo pipefail

RMQ="$(cd "$(dirname "$0")" && pwd)/rabbitmq.sh"
BASE_PORT="${RABBITMQ_CLUSTER_BASE_PORT:-5680}"
DIR_PREFIX="${RABBITMQ_CLUSTER_DIR:-/tmp/warren-rabbitmq-c}"
EPMD_PORT="${RABBITMQ_CLUSTER_EPMD_PORT:-4371}"
NODES=(1 2 3)

log() { echo "rabbitmq-cluster.sh: $*" >&2; }

amqp_port() { echo $((BASE_PORT + $1)); }
dist_port() { echo $((BASE_PORT + $1 + 20000)); }
node_dir() { echo "$DIR_PREFIX$1"; }
node_name() { echo "rc$1@localhost"; }

# Never collide with Warren's listeners.
check_ports() {
    local i p
    for i in "${NODES[@]}"; do
        for p in "$(amqp_port "$i")" "$(dist_port "$i")"; do
            case "$p" in
                5672|5701|5702|5703|15701|15702|15703|25701|25702|25703)
                    log "port $p is used by Warren; pick another RABBITMQ_CLUSTER_BASE_PORT"
                    exit 1 ;;
            esac
        done
    done
}

# scripts/rabbitmq.sh against node N: rmq N start|stop|status|ctl ARGS...
rmq() {
    local i="$1"; shift
    RABBITMQ_PORT="$(amqp_port "$i")" \
    RABBITMQ_REF_DIR="$(node_dir "$i")" \
    RABBITMQ_REF_NODE="$(node_name "$i")" \
    RABBITMQ_REF_DIST_PORT="$(dist_port "$i")" \
    RABBITMQ_REF_EPMD_PORT="$EPMD_PORT" \
        "$RMQ" "$@"
}

node_pid() {
    local f; f="$(node_dir "$1")/rabbitmq.pid"
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

# Running nodes as node 1 sees them, one per line.
running_nodes() {
    rmq 1 ctl cluster_status --formatter json 2>/dev/null \
        | grep -o '"running_nodes":\[[^]]*\]' | grep -o 'rc[0-9]*@localhost' || true
}

all_up() {
    local i
    for i in "${NODES[@]}"; do rmq "$i" status >/dev/null 2>&1 || return 1; done
    [ "$(running_nodes | sort -u | wc -l)" -eq "${#NODES[@]}" ]
}

# The same cookie in every node's dir (rabbitmq.sh only creates a missing one).
share_cookie() {
    local i dir cookie=""
    [ -s "$(node_dir 1)/.erlang.cookie" ] && cookie=$(cat "$(node_dir 1)/.erlang.cookie")
    [ -n "$cookie" ] || cookie=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for i in "${NODES[@]}"; do
        dir=$(node_dir "$i")
        mkdir -p "$dir"
        chmod 700 "$dir"
        if [ "$(cat "$dir/.erlang.cookie" 2>/dev/null || true)" != "$cookie" ]; then
            rm -f "$dir/.erlang.cookie"
            printf '%s' "$cookie" > "$dir/.erlang.cookie"
            chmod 400 "$dir/.erlang.cookie"
        fi
    done
}

cmd_up() {
    check_ports
    if all_up; then
        log "already up"
        cmd_status
        return 0
    fi
    cmd_down
    local i
    for i in "${NODES[@]}"; do rm -rf "$(node_dir "$i")/mnesia"; done
    share_cookie
    # rabbitmq.sh start leaves a background subshell holding its stdout and
    # stderr for the node's lifetime, so `up | tail` would never end: send
    # its output through a file instead.
    local out
    for i in "${NODES[@]}"; do
        out="$(node_dir "$i")/start.out"
        if ! rmq "$i" start >"$out" 2>&1; then cat "$out" >&2; exit 1; fi
        cat "$out" >&2
    done
    for i in "${NODES[@]:1}"; do
        if running_nodes | grep -qx "$(node_name "$i")"; then continue; fi
        log "joining $(node_name "$i") to $(node_name 1)"
        # join_cluster logs harmless "Failed to create a tracked connection
        # table ... node_not_running" errors (3.10): show its output only if
        # it fails.
        out="$(node_dir "$i")/join.out"
        if ! { rmq "$i" ctl stop_app && rmq "$i" ctl join_cluster "$(node_name 1)" \
                && rmq "$i" ctl start_app; } >"$out" 2>&1; then
            cat "$out" >&2; exit 1
        fi
    done
    if ! all_up; then
        log "cluster did not form; running nodes seen by $(node_name 1): $(running_nodes | tr '\n' ' ')"
        exit 1
    fi
    log "up: $(for i in "${NODES[@]}"; do printf '%s ' "$(node_name "$i") amqp://127.0.0.1:$(amqp_port "$i") pid $(node_pid "$i");"; done)"
}

cmd_down() {
    local i pid dir
    # Last first, so node 1 (the one the others joined) goes down last.
    for i in 3 2 1; do
        rmq "$i" stop || true
        # A VM that outlived its pid file (e.g. a crashed start): find it by
        # its state dir and stop it by pid.
        dir=$(node_dir "$i")
        for pid in $(pgrep -f "beam.smp.*$dir/" || true); do
            log "stopping leftover beam.smp $pid of $(node_name "$i")"
            kill "$pid" 2>/dev/null || true
            sleep 2
            kill -9 "$pid" 2>/dev/null || true
        done
    done
    epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
}

cmd_status() {
    local i rc=0
    for i in "${NODES[@]}"; do
        printf '%s: ' "$(node_name "$i")"
        rmq "$i" status || rc=$?
    done
    [ "$rc" = 0 ] || return "$rc"
    rmq 1 ctl cluster_status
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    ctl) shift; n="${1:?usage: $0 ctl N ARGS...}"; shift; rmq "$n" ctl "$@" ;;
    pid) node_pid "${2:?usage: $0 pid N}" ;;
    start)
        # Starts node N again (after a kill); it rejoins from its own data.
        n="${2:?usage: $0 start N}"; out="$(node_dir "$n")/start.out"
        if ! rmq "$n" start >"$out" 2>&1; then cat "$out" >&2; exit 1; fi ;;
    *) echo "usage: $0 up|down|status | ctl N ARGS... | pid N | start N" >&2; exit 2 ;;
esac
