"""Queue features through pika: dead-lettering (x-death), message TTL,
length limits, priorities and the delayed-message exchange.

Same broker and rules as test_smoke.py (WARREN_AMQP_URL; every test must pass
against a stock RabbitMQ too, except the delayed-message exchange, which needs
RabbitMQ's rabbitmq_delayed_message_exchange plugin and is skipped there when
the plugin is missing). The expected values are RabbitMQ 3.10's, as recorded in
docs/rabbitmq-queue-features.json.
"""

import datetime
import time

import pytest
from pika import BasicProperties
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker, NackError

# Shared helpers and fixtures (conn, ch, res) of the pika suite.
from test_smoke import ch, conn, connect, drain, get_all, res  # noqa: F401


def get_within(ch, queue, timeout=1.5, auto_ack=True):
    """basic_get until a message arrives; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            return method, props, body
        if time.monotonic() >= deadline:
            raise AssertionError("nothing arrived in %s within %.1f s" % (queue, timeout))
        time.sleep(0.01)


def message_count(ch, queue):
    return ch.queue_declare(queue, passive=True).method.message_count


def dead_letter_target(ch, res):
    """A fanout dead-letter exchange with one queue bound to it."""
    dlx, dlq = res.exchange(), res.queue()
    ch.exchange_declare(dlx, exchange_type="fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    return dlx, dlq


def assert_recent(when):
    """An x-death time: a datetime (AMQP timestamp, whole seconds, UTC)."""
    assert isinstance(when, datetime.datetime)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - when.replace(tzinfo=None)).total_seconds()) < 10


# ------------------------------------------------------------ dead-lettering


def test_reject_dead_letters_with_x_death(ch, res):
    dlx, dlq = dead_letter_target(ch, res)
    q = res.queue()
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"doomed", BasicProperties(
        headers={"x-custom": "kept"}, content_type="text/plain", message_id="m-1"))
    method, _, _ = get_within(ch, q, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=False)

    method, props, body = get_within(ch, dlq)
    assert body == b"doomed"
    # republished to the DLX with the original routing key
    assert method.exchange == dlx
    assert method.routing_key == q
    assert props.content_type == "text/plain"
    assert props.message_id == "m-1"
    headers = props.headers
    assert headers["x-custom"] == "kept"
    [death] = headers["x-death"]
    assert set(death) == {"count", "reason", "queue", "time", "exchange", "routing-keys"}
    assert death["count"] == 1
    assert death["reason"] == "rejected"
    assert death["queue"] == q
    assert death["exchange"] == ""
    assert death["routing-keys"] == [q]
    assert_recent(death["time"])
    assert headers["x-first-death-exchange"] == ""
    assert headers["x-first-death-queue"] == q
    assert headers["x-first-death-reason"] == "rejected"
    assert message_count(ch, q) == 0


def test_dead_lettered_again_counts_and_keeps_first_death(ch, res):
    """q1 -> dlx1 -> q2 -> dlx2 -> q3: the newest x-death entry comes first,
    the x-first-death-* headers keep describing the first one."""
    q1, q2, q3 = res.queue(), res.queue(), res.queue()
    dlx1, dlx2 = res.exchange(), res.exchange()
    for x in (dlx1, dlx2):
        ch.exchange_declare(x, exchange_type="fanout")
    ch.queue_declare(q3)
    ch.queue_declare(q2, arguments={"x-dead-letter-exchange": dlx2})
    ch.queue_declare(q1, arguments={"x-dead-letter-exchange": dlx1})
    ch.queue_bind(q2, dlx1)
    ch.queue_bind(q3, dlx2)
    ch.basic_publish("", q1, b"twice")
    ch.basic_reject(get_within(ch, q1, auto_ack=False)[0].delivery_tag, requeue=False)
    ch.basic_nack(get_within(ch, q2, auto_ack=False)[0].delivery_tag, requeue=False)

    method, props, _ = get_within(ch, q3)
    assert (method.exchange, method.routing_key) == (dlx2, q1)
    newest, first = props.headers["x-death"]
    assert (newest["queue"], newest["exchange"], newest["reason"], newest["count"]) == (q2, dlx1, "rejected", 1)
    assert newest["routing-keys"] == [q1]
    assert (first["queue"], first["exchange"], first["reason"], first["count"]) == (q1, "", "rejected", 1)
    assert props.headers["x-first-death-queue"] == q1
    assert props.headers["x-first-death-exchange"] == ""


# ----------------------------------------------------------------------- TTL


def test_per_message_ttl_expires_into_dead_letter_queue(ch, res):
    dlx, dlq = dead_letter_target(ch, res)
    q = res.queue()
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
    ch.confirm_delivery()  # both enqueued when the counts are read
    ch.basic_publish("", q, b"short-lived", BasicProperties(expiration="200"))
    ch.basic_publish("", q, b"long-lived", BasicProperties(expiration="60000"))
    assert message_count(ch, q) == 2
    assert message_count(ch, dlq) == 0

    method, props, body = get_within(ch, dlq)
    assert body == b"short-lived"
    assert method.routing_key == q
    # the expiration property is removed and kept in the x-death entry
    assert props.expiration is None
    [death] = props.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["queue"] == q
    assert death["original-expiration"] == "200"
    assert props.headers["x-first-death-reason"] == "expired"
    # only the expired message left
    assert [body for _, _, body in get_all(ch, q)] == [b"long-lived"]
    assert message_count(ch, dlq) == 0


# ------------------------------------------------------------- length limits


def test_max_length_reject_publish_nacks_in_confirm_mode(ch, res):
    q = res.queue()
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"m1")
    ch.basic_publish("", q, b"m2")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"m3")
    assert ch.is_open
    assert [body for _, _, body in get_all(ch, q)] == [b"m1", b"m2"]
    # room again: accepted
    assert ch.basic_publish("", q, b"m4") is None
    assert message_count(ch, q) == 1


# ------------------------------------------------------ delayed-message exchange


def test_delayed_message_exchange_delivers_after_the_delay(conn, ch, res):
    x, q = res.exchange(), res.queue()
    product = conn._impl.server_properties.get("product")
    try:
        ch.exchange_declare(x, exchange_type="x-delayed-message",
                            arguments={"x-delayed-type": "direct"})
    except (ChannelClosedByBroker, ConnectionClosedByBroker) as e:
        # RabbitMQ without the plugin: connection.close 503 unknown exchange type
        if product == "RabbitMQ" and e.reply_code == 503:
            pytest.skip("rabbitmq_delayed_message_exchange plugin not enabled")
        raise
    ch.queue_declare(q)
    ch.queue_bind(q, x, "delayed-key")
    ch.queue_bind(q, x, "other-key")  # the delayed type's routing still applies
    arrivals = []
    # Due times are kept on the wall clock (they survive restarts), so the
    # delay is measured on it too; the broker truncates them to the millisecond.
    ch.basic_consume(q, lambda _c, m, _p, body: arrivals.append((body, time.time())),
                     auto_ack=True)

    start = time.time()
    ch.basic_publish(x, "delayed-key", b"later", BasicProperties(headers={"x-delay": 300}))
    ch.basic_publish(x, "not-bound", b"unroutable", BasicProperties(headers={"x-delay": 50}))
    ch.basic_publish(x, "other-key", b"now")  # no x-delay: routed at once
    drain(conn, lambda: arrivals, timeout=1.0)
    assert [body for body, _ in arrivals] == [b"now"]
    conn.process_data_events(time_limit=0.15)
    assert [body for body, _ in arrivals] == [b"now"], "delayed message arrived early"

    drain(conn, lambda: len(arrivals) == 2, timeout=1.5)
    body, arrived = arrivals[1]
    assert body == b"later"
    assert 0.299 <= arrived - start < 1.3
    conn.process_data_events(time_limit=0.1)
    assert len(arrivals) == 2


# ---------------------------------------------------------------- priorities


PRIORITY_PUBLISHES = [("low", 0), ("none", None), ("high-a", 5), ("mid", 3), ("over-max", 9),
                      ("high-b", 5), ("one", 1)]
# Highest first, FIFO within a priority; above x-max-priority counts as the
# maximum, no priority as 0. The priority property itself is left unchanged.
PRIORITY_ORDER = [("high-a", 5), ("over-max", 9), ("high-b", 5), ("mid", 3), ("one", 1),
                  ("low", 0), ("none", None)]


def publish_prioritised(ch, res):
    q = res.queue()
    ch.queue_declare(q, arguments={"x-max-priority": 5})
    ch.confirm_delivery()  # every publish is enqueued before we read
    for body, priority in PRIORITY_PUBLISHES:
        ch.basic_publish("", q, body.encode(), BasicProperties(priority=priority))
    return q


def test_max_priority_orders_basic_get(ch, res):
    q = publish_prioritised(ch, res)
    got = [(body.decode(), props.priority) for _, props, body in get_all(ch, q)]
    assert got == PRIORITY_ORDER


def test_max_priority_orders_consumer_deliveries(conn, ch, res):
    q = publish_prioritised(ch, res)
    ch.basic_qos(prefetch_count=1)
    got = []

    def on_message(channel, method, props, body):
        got.append((body.decode(), props.priority))
        channel.basic_ack(method.delivery_tag)

    ch.basic_consume(q, on_message)
    drain(conn, lambda: len(got) == len(PRIORITY_ORDER), timeout=1.5)
    assert got == PRIORITY_ORDER
