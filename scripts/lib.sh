# Shell steps the scripts share. Source it: `. scripts/lib.sh`.

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until something accepts connections on 127.0.0.1:$1 (up to 10 s).
wait_port() {
    for _ in $(seq 1 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1 after 10 s" >&2
    return 1
}

# Starts a Warren binary on 127.0.0.1:PORT with DATA_DIR, appending its log
# to LOG, and waits for it to listen; its pid is left in WARREN_PID. The
# management API and Prometheus endpoint are off unless WARREN_HTTP_PORT /
# WARREN_PROMETHEUS_PORT say otherwise (environment variables, which older
# binaries ignore).
# Usage: start_warren BINARY PORT DATA_DIR LOG
start_warren() {
    WARREN_HTTP_PORT=${WARREN_HTTP_PORT:-0} WARREN_PROMETHEUS_PORT=${WARREN_PROMETHEUS_PORT:-0} "$1" --amqp-port "$2" --bind 127.0.0.1 --data-dir "$3" --log warn >>"$4" 2>&1 &
    WARREN_PID=$!
    wait_port "$2"
}

# Stops a broker started by start_warren.
stop_warren() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Writes DATA_DIR/warren.toml for a benchmark broker on 127.0.0.1:PORT with
# its data in DATA_DIR/data, the management API and Prometheus off, and a
# memory watermark of WATERMARK_MIB.
# Usage: bench_config DATA_DIR PORT WATERMARK_MIB
bench_config() {
    cat >"$1/warren.toml" <<CONF
amqp_port = $2
http_port = 0
prometheus_port = 0
bind = ["127.0.0.1"]
data_dir = "$1/data"
memory_high_watermark_bytes = $(($3 * 1024 * 1024))
CONF
}
