#!/usr/bin/env bash
# Private RabbitMQ instance used as the reference broker for side-by-side
# benchmarks and behaviour checks against Warren.
#
# Usage: scripts/rabbitmq.sh start|stop|restart|status
#        scripts/rabbitmq.sh ctl ARGS...   (rabbitmqctl against the private node,
#                                           e.g. `ctl list_queues`)
#
# Environment overrides:
#   RABBITMQ_PORT      AMQP port (default 5673, loopback only)
#   RABBITMQ_REF_DIR   state dir (default /tmp/warren-rabbitmq)
#   RABBITMQ_REF_NODE  Erlang node name (default warren-ref@localhost)
#   RABBITMQ_REF_DIST_PORT  Erlang distribution port (default AMQP port + 20000)
#   RABBITMQ_REF_EPMD_PORT  private epmd port (default 4370, so the system
#                           epmd on 4369 is never touched)
#   RABBITMQ_START_TIMEOUT  seconds to wait for AMQP readiness (default 60)
#   RABBITMQ_EXTRA_CONF     lines appended to rabbitmq.conf (e.g.
#                           "vm_memory_high_watermark.absolute = 256MiB")
#   RABBITMQ_PLUGINS        plugins to enable, comma-separated (e.g.
#                           "rabbitmq_management"; default none)
#
# The instance never touches /var/lib/rabbitmq or /etc/rabbitmq. If a
# system-wide rabbitmq-server (node rabbit@<host>) is running on 5672 it is
# stopped, because Warren itself listens on 5672.
set -euo pipefail

PORT="${RABBITMQ_PORT:-5673}"
DIR="${RABBITMQ_REF_DIR:-/tmp/warren-rabbitmq}"
NODE="${RABBITMQ_REF_NODE:-warren-ref@localhost}"
DIST_PORT="${RABBITMQ_REF_DIST_PORT:-$((PORT + 20000))}"
EPMD_PORT="${RABBITMQ_REF_EPMD_PORT:-4370}"
TIMEOUT="${RABBITMQ_START_TIMEOUT:-60}"
RMQ_BIN=/usr/lib/rabbitmq/bin

log() { echo "rabbitmq.sh: $*" >&2; }

ensure_installed() {
    if [ -x "$RMQ_BIN/rabbitmq-server" ]; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing rabbitmq-server"
        # policy-rc.d style: do not let the package auto-start the system service
        DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null; }
    fi
    [ -x "$RMQ_BIN/rabbitmq-server" ] || { log "rabbitmq-server is not installed"; exit 1; }
}

# Environment shared by the server and the CLI tools.
setup_env() {
    export HOME="$DIR"                       # private .erlang.cookie
    export ERL_EPMD_PORT="$EPMD_PORT"
    export ERL_EPMD_ADDRESS=127.0.0.1        # epmd on loopback only
    # Erlang distribution (server and CLI nodes) on loopback only.
    export ERL_AFLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_USE_LONGNAME=false
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$DIR/mnesia"
    export RABBITMQ_LOG_BASE="$DIR/log"
    export RABBITMQ_PID_FILE="$DIR/rabbitmq.pid"
    export RABBITMQ_LOGS="$DIR/log/rabbit.log"
}

ctl() { "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

# Succeeds if something on 127.0.0.1:$1 answers the AMQP 0-9-1 header with a
# frame (connection.start starts with frame type 1).
amqp_ready() {
    local port="$1" first
    first=$(timeout 3 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/'"$port"' || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        head -c 1 <&3 | od -An -tx1 | tr -d " \n"
    ' 2>/dev/null) || return 1
    [ "$first" = "01" ]
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

server_pid() {
    local pid
    [ -f "$DIR/rabbitmq.pid" ] || return 1
    pid=$(cat "$DIR/rabbitmq.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Stop a distro-installed rabbitmq-server that holds 5672 (apt may auto-start it).
stop_system_service() {
    [ "$PORT" = 5672 ] && return 0
    port_open 5672 || return 0
    local holder
    holder=$(ss -ltnpH 'sport = :5672' 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
    [ -n "$holder" ] || return 0
    local cmd; cmd=$(tr '\0' ' ' < "/proc/$holder/cmdline" 2>/dev/null || true)
    case "$cmd" in
        *beam*rabbit*) ;;
        *) return 0 ;;   # not RabbitMQ (probably Warren): leave it alone
    esac
    case "$cmd" in *"$NODE"*) return 0 ;; esac
    log "stopping system rabbitmq-server on 5672 (pid $holder)"
    if command -v systemctl >/dev/null && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        systemctl stop rabbitmq-server || true
    elif command -v service >/dev/null; then
        service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
    if port_open 5672; then
        (cd /var/lib/rabbitmq 2>/dev/null && su rabbitmq -s /bin/sh -c \
            "HOME=/var/lib/rabbitmq $RMQ_BIN/rabbitmqctl stop" >/dev/null 2>&1) || true
    fi
    for _ in $(seq 1 30); do port_open 5672 || break; sleep 1; done
    if port_open 5672 && kill -0 "$holder" 2>/dev/null; then
        kill "$holder" 2>/dev/null || true
    fi
}

write_config() {
    mkdir -p "$DIR/mnesia" "$DIR/log"
    chmod 700 "$DIR"
    : > "$DIR/rabbitmq-env.conf"
    echo "[${RABBITMQ_PLUGINS:-}]." > "$DIR/enabled_plugins"
    cat > "$DIR/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$PORT
loopback_users.guest = true
log.console = false
log.file.level = info
${RABBITMQ_EXTRA_CONF:-}
CONF
    if [ ! -f "$DIR/.erlang.cookie" ]; then
        head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/.erlang.cookie"
        chmod 400 "$DIR/.erlang.cookie"
    fi
}

cmd_start() {
    ensure_installed
    setup_env
    stop_system_service
    if server_pid >/dev/null && amqp_ready "$PORT"; then
        log "already running on 127.0.0.1:$PORT (node $NODE)"
        return 0
    fi
    if ! server_pid >/dev/null && port_open "$PORT"; then
        log "port $PORT is already in use by another process"; exit 1
    fi
    if ! server_pid >/dev/null; then
        write_config
        # Private epmd, so nothing clashes with a system epmd on 4369.
        epmd -port "$EPMD_PORT" -daemon 2>/dev/null || true
        log "starting node $NODE on 127.0.0.1:$PORT (dir $DIR)"
        (cd "$DIR" && setsid nohup "$RMQ_BIN/rabbitmq-server" \
            > "$DIR/log/startup.log" 2> "$DIR/log/startup.err" < /dev/null &)
        # rabbitmq-server writes RABBITMQ_PID_FILE itself once the VM is up.
    fi
    local deadline=$((SECONDS + TIMEOUT))
    while [ $SECONDS -lt $deadline ]; do
        if amqp_ready "$PORT"; then
            log "ready on amqp://guest:guest@127.0.0.1:$PORT/%2F"
            return 0
        fi
        sleep 0.5
    done
    log "timed out after ${TIMEOUT}s waiting for AMQP on port $PORT; see $DIR/log"
    tail -n 20 "$DIR/log/startup.err" "$DIR/log/rabbit.log" 2>/dev/null >&2 || true
    exit 1
}

cmd_stop() {
    setup_env
    local pid
    pid=$(server_pid || true)
    if [ -z "$pid" ] && ! amqp_ready "$PORT"; then
        log "not running"
        epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
        return 0
    fi
    if [ -x "$RMQ_BIN/rabbitmqctl" ]; then
        ctl stop >/dev/null 2>&1 || true
    fi
    if [ -n "$pid" ]; then
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "node did not stop cleanly, sending SIGTERM to $pid"
            kill "$pid" 2>/dev/null || true
            sleep 2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$DIR/rabbitmq.pid"
    epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    log "stopped"
}

cmd_status() {
    setup_env
    if amqp_ready "$PORT"; then
        echo "running on 127.0.0.1:$PORT (node $NODE, pid $(server_pid || echo '?'))"
    else
        echo "not running"; return 3
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    ctl) shift; setup_env; ctl "$@" ;;
    *) echo "usage: $0 start|stop|restart|status|ctl ARGS..." >&2; exit 2 ;;
esac
