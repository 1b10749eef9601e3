"""py-amqp (the client under kombu and Celery) against Warren.

    WARREN_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F python3 -m pytest tests/clients
"""
import os
import uuid
from urllib.parse import unquote, urlparse

import amqp
import pytest

URL = urlparse(os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))


def connect():
    conn = amqp.Connection(
        host="%s:%s" % (URL.hostname, URL.port or 5672),
        userid=URL.username or "guest",
        password=URL.password or "guest",
        virtual_host=unquote(URL.path[1:]) or "/",
        connect_timeout=5,
    )
    conn.connect()
    return conn


def test_queue_delete_on_the_consuming_channel_returns_the_message_count():
    """py-amqp waits for delete-ok; a basic.cancel arriving first made it
    raise ConsumerCancelled (RabbitMQ sends delete-ok, then the cancel)."""
    conn = connect()
    try:
        ch = conn.channel()
        queue = "py-amqp-delete-%s" % uuid.uuid4().hex[:8]
        ch.queue_declare(queue, auto_delete=False)
        ch.basic_publish(amqp.Message("left over"), routing_key=queue)
        ch.basic_publish(amqp.Message("left over"), routing_key=queue)
        ch.basic_qos(0, 1, False)
        received = []
        ch.basic_consume(queue, callback=received.append)
        conn.drain_events(timeout=5)
        assert [m.body for m in received] == ["left over"]
        # One delivered and unacked, one still ready.
        assert ch.queue_delete(queue) == 1
        # Then the broker's cancel (no on_cancel given: py-amqp raises).
        with pytest.raises(amqp.exceptions.ConsumerCancelled):
            conn.drain_events(timeout=5)
        ch.close()
    finally:
        conn.close()
