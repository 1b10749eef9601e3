#!/usr/bin/env bash
# Reruns every reference probe against the broker on REF_PORT (default 5673,
# the private RabbitMQ started by scripts/rabbitmq.sh start).
#   REF_PORT=5673 scripts/reference/run_all.sh          # RabbitMQ reference
#   REF_PORT=5672 REF_SET_LIMIT=0 scripts/reference/run_all.sh   # Warren
# Takes about a minute (several cases wait for RabbitMQ's 3 s silent close).
set -euo pipefail
cd "$(dirname "$0")"
export REF_PORT="${REF_PORT:-5673}"
echo "### handshake (port $REF_PORT)"
python3 handshake.py "$@"
echo
echo "### error cases"
python3 error_cases.py
echo
echo "### pika's view"
python3 pika_views.py
echo
echo "### direct reply-to"
python3 direct_reply_to.py
echo
echo "### max_message_size"
python3 max_message_size.py
echo
echo "### queue features (JSON; reference copy in docs/rabbitmq-queue-features.json)"
python3 queue_features.py
