"""Smoke tests for an AMQP 0-9-1 broker, using pika's BlockingConnection.

The broker under test is given by WARREN_AMQP_URL
(default amqp://guest:guest@127.0.0.1:5672/%2F).

RabbitMQ is the reference: every test here must pass against a stock
RabbitMQ too, e.g.

    scripts/rabbitmq.sh start
    WARREN_AMQP_URL=amqp://guest:guest@127.0.0.1:5673/%2F pytest tests/pika
"""

import datetime
import decimal
import os
import time
import uuid

import pika
import pika.exceptions
import pytest
from pika.exceptions import ChannelClosedByBroker, UnroutableError

AMQP_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


# ---------------------------------------------------------------- helpers


def connect():
    params = pika.URLParameters(AMQP_URL)
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    params.connection_attempts = 1
    return pika.BlockingConnection(params)


def unique(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


def drain(conn, done, timeout=5.0):
    """Process I/O on `conn` until done() is true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for deliveries")
        conn.process_data_events(time_limit=min(0.05, remaining))


def get_all(ch, queue, auto_ack=True, limit=100):
    """basic_get until get-empty; returns [(method, props, body)]."""
    out = []
    for _ in range(limit):
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is None:
            return out
        out.append((method, props, body))
    raise AssertionError("queue %s did not run empty" % queue)


def bodies(ch, queue):
    return sorted(body for _, _, body in get_all(ch, queue))


class Resources:
    """Names of queues/exchanges created by one test; deleted afterwards."""

    def __init__(self):
        self.queues = []
        self.exchanges = []

    def queue(self):
        name = unique("warren-test-q")
        self.queues.append(name)
        return name

    def exchange(self):
        name = unique("warren-test-x")
        self.exchanges.append(name)
        return name

    def cleanup(self):
        if not (self.queues or self.exchanges):
            return
        conn = connect()
        try:
            for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                for name in names:
                    ch = conn.channel()
                    try:
                        if kind == "queue":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                        ch.close()
                    except pika.exceptions.AMQPError:
                        pass
        finally:
            conn.close()


@pytest.fixture
def res():
    r = Resources()
    yield r
    r.cleanup()


@pytest.fixture
def conn():
    c = connect()
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def ch(conn):
    return conn.channel()


# ---------------------------------------------------------------- basics


def test_declare_returns_counts(ch, res):
    q = res.queue()
    ok = ch.queue_declare(q)
    assert ok.method.queue == q
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 0
    for i in range(3):
        ch.basic_publish("", q, b"m%d" % i)
    # passive declare sees the messages (publish is async: declare is a sync point)
    ok = ch.queue_declare(q, passive=True)
    assert ok.method.message_count == 3
    assert ch.queue_purge(q).method.message_count == 3
    ch.basic_publish("", q, b"again")
    assert ch.queue_declare(q, passive=True).method.message_count == 1
    assert ch.queue_delete(q).method.message_count == 1


def test_server_named_queue(ch):
    ok = ch.queue_declare("", exclusive=True)
    name = ok.method.queue
    assert name.startswith("amq.gen-")
    ch.basic_publish("", name, b"hello")
    method, _, body = ch.basic_get(name, auto_ack=True)
    assert body == b"hello"
    assert method.routing_key == name


def test_publish_consume_order_and_properties(conn, ch, res):
    q = res.queue()
    ch.queue_declare(q)
    headers = {
        "str": "text value",
        "int": 42,
        "negative": -7,
        "big": 2 ** 40,
        "bool_true": True,
        "bool_false": False,
        "decimal": decimal.Decimal("3.14"),
        "none": None,
        "bytes": b"\x00\x01binary",
        "list": [1, "two", True, [3]],
        "table": {"nested": "yes", "n": 1},
        "when": datetime.datetime(2021, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
    }
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=5,
        correlation_id="corr-123",
        reply_to="reply-queue",
        expiration="60000",
        message_id="msg-abc",
        timestamp=1700000000,
        type="test.type",
        user_id="guest",
        app_id="warren-smoke",
    )
    sent = [b"message-%d" % i for i in range(10)]
    sent.append(b"")  # empty body
    sent.append(bytes(range(256)) * 1200)  # ~300 KB: spans several body frames
    for body in sent:
        ch.basic_publish("", q, body, props)

    received = []

    def on_message(channel, method, properties, body):
        received.append((method, properties, body))
        channel.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(q, on_message, auto_ack=False)
    drain(conn, lambda: len(received) == len(sent))
    ch.basic_cancel(tag)

    assert [body for _, _, body in received] == sent
    tags = [m.delivery_tag for m, _, _ in received]
    assert tags == list(range(1, len(sent) + 1))
    for method, p, _ in received:
        assert method.consumer_tag == tag
        assert method.exchange == ""
        assert method.routing_key == q
        assert method.redelivered is False
        assert p.content_type == "application/json"
        assert p.content_encoding == "utf-8"
        assert p.headers == headers
        assert p.delivery_mode == 2
        assert p.priority == 5
        assert p.correlation_id == "corr-123"
        assert p.reply_to == "reply-queue"
        assert p.expiration == "60000"
        assert p.message_id == "msg-abc"
        assert p.timestamp == 1700000000
        assert p.type == "test.type"
        assert p.user_id == "guest"
        assert p.app_id == "warren-smoke"
    # everything was acked: nothing left
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_unacked_messages_requeued_on_channel_close(conn, res):
    q = res.queue()
    ch1 = conn.channel()
    ch1.queue_declare(q)
    for i in range(3):
        ch1.basic_publish("", q, b"%d" % i)
    got = []
    ch1.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=False)
    drain(conn, lambda: len(got) == 3)
    ch1.close()
    ch2 = conn.channel()
    msgs = get_all(ch2, q)
    assert [b for _, _, b in msgs] == [b"0", b"1", b"2"]
    assert all(m.redelivered for m, _, _ in msgs)


def test_prefetch_limits_unacked_deliveries(conn, ch, res):
    q = res.queue()
    ch.queue_declare(q)
    for i in range(5):
        ch.basic_publish("", q, b"%d" % i)
    ch.basic_qos(prefetch_count=2)
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(m), auto_ack=False)
    drain(conn, lambda: len(got) == 2)
    conn.process_data_events(time_limit=0.3)
    assert len(got) == 2  # no more than prefetch_count unacked
    ch.basic_ack(got[-1].delivery_tag, multiple=True)
    drain(conn, lambda: len(got) == 4)
    conn.process_data_events(time_limit=0.3)
    assert len(got) == 4
    ch.basic_ack(got[-1].delivery_tag, multiple=True)
    drain(conn, lambda: len(got) == 5)
    ch.basic_ack(got[-1].delivery_tag)
    assert [m.delivery_tag for m in got] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- confirms


def test_publisher_confirms(ch, res):
    q = res.queue()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(5):
        # raises on nack / unroutable; returns None when confirmed
        assert ch.basic_publish("", q, b"confirmed-%d" % i, mandatory=True) is None
    assert ch.queue_declare(q, passive=True).method.message_count == 5


def test_confirm_mandatory_unroutable_raises(ch, res):
    ch.confirm_delivery()
    missing = unique("warren-test-nowhere")
    with pytest.raises(UnroutableError) as exc:
        ch.basic_publish("", missing, b"lost", mandatory=True)
    returned = exc.value.messages
    assert len(returned) == 1
    assert returned[0].body == b"lost"
    assert returned[0].method.reply_code == 312
    assert returned[0].method.reply_text == "NO_ROUTE"
    assert returned[0].method.routing_key == missing
    # channel still usable after the basic.return
    q = res.queue()
    ch.queue_declare(q)
    assert ch.basic_publish("", q, b"ok", mandatory=True) is None


def test_confirm_non_mandatory_unroutable_is_acked(ch):
    ch.confirm_delivery()
    # no queue bound: message dropped silently, but still confirmed
    assert ch.basic_publish("", unique("warren-test-nowhere"), b"dropped") is None
    assert ch.is_open


# ---------------------------------------------------------------- basic.get


def test_basic_get(ch, res):
    q = res.queue()
    ch.queue_declare(q)
    assert ch.basic_get(q) == (None, None, None)  # get-empty
    for i in range(3):
        ch.basic_publish("", q, b"g%d" % i, pika.BasicProperties(message_id=str(i)))
    method, props, body = ch.basic_get(q, auto_ack=False)
    assert isinstance(method, pika.spec.Basic.GetOk)
    assert body == b"g0"
    assert props.message_id == "0"
    assert method.message_count == 2  # messages remaining after this one
    assert method.redelivered is False
    assert method.exchange == ""
    assert method.routing_key == q
    ch.basic_ack(method.delivery_tag)
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert (body, method.message_count) == (b"g1", 1)
    method, _, body = ch.basic_get(q, auto_ack=True)
    assert (body, method.message_count) == (b"g2", 0)
    assert ch.basic_get(q) == (None, None, None)


# ---------------------------------------------------------------- reject / nack


def test_reject_requeue_true_redelivers(ch, res):
    q = res.queue()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"bounce")
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert method.redelivered is False
    ch.basic_reject(method.delivery_tag, requeue=True)
    method2, _, body2 = ch.basic_get(q, auto_ack=False)
    assert body2 == body == b"bounce"
    assert method2.redelivered is True
    assert method2.delivery_tag != method.delivery_tag
    ch.basic_ack(method2.delivery_tag)
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_reject_requeue_false_discards(ch, res):
    q = res.queue()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"drop me")
    ch.basic_publish("", q, b"keep me")
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert body == b"drop me"
    ch.basic_reject(method.delivery_tag, requeue=False)
    remaining = get_all(ch, q)
    assert [b for _, _, b in remaining] == [b"keep me"]
    assert remaining[0][0].redelivered is False


def test_nack_multiple(ch, res):
    q = res.queue()
    ch.queue_declare(q)
    for i in range(4):
        ch.basic_publish("", q, b"n%d" % i)
    tags = []
    for _ in range(4):
        method, _, _ = ch.basic_get(q, auto_ack=False)
        tags.append(method.delivery_tag)
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    # nack n0, n1 (multiple) without requeue: dropped
    ch.basic_nack(tags[1], multiple=True, requeue=False)
    # nack n2, n3 (multiple, everything outstanding) with requeue
    ch.basic_nack(tags[3], multiple=True, requeue=True)
    msgs = get_all(ch, q)
    assert [b for _, _, b in msgs] == [b"n2", b"n3"]
    assert all(m.redelivered for m, _, _ in msgs)


def test_nack_multiple_on_consumer(conn, ch, res):
    q = res.queue()
    ch.queue_declare(q)
    for i in range(3):
        ch.basic_publish("", q, b"c%d" % i)
    got = []
    tag = ch.basic_consume(q, lambda c, m, p, b: got.append((m, b)), auto_ack=False)
    drain(conn, lambda: len(got) == 3)
    ch.basic_cancel(tag)
    ch.basic_nack(0, multiple=True, requeue=True)  # tag 0 + multiple = all outstanding
    msgs = get_all(ch, q)
    assert [b for _, _, b in msgs] == [b"c0", b"c1", b"c2"]
    assert all(m.redelivered for m, _, _ in msgs)


# ---------------------------------------------------------------- RPC


def test_rpc_named_reply_queue(conn, res):
    rpc_q = res.queue()
    reply_q = res.queue()
    client = conn.channel()
    client.queue_declare(rpc_q)
    client.queue_declare(reply_q, exclusive=True)

    server_conn = connect()
    try:
        server = server_conn.channel()

        def on_request(channel, method, props, body):
            channel.basic_publish(
                "",
                props.reply_to,
                body.upper(),
                pika.BasicProperties(correlation_id=props.correlation_id),
            )
            channel.basic_ack(method.delivery_tag)

        server.basic_consume(rpc_q, on_request)

        replies = []
        client.basic_consume(
            reply_q, lambda c, m, p, b: replies.append((p, b)), auto_ack=True
        )
        corr = uuid.uuid4().hex
        client.basic_publish(
            "", rpc_q, b"ping", pika.BasicProperties(reply_to=reply_q, correlation_id=corr)
        )
        deadline = time.monotonic() + 5
        while not replies and time.monotonic() < deadline:
            server_conn.process_data_events(time_limit=0.02)
            conn.process_data_events(time_limit=0.02)
        assert len(replies) == 1
        props, body = replies[0]
        assert body == b"PING"
        assert props.correlation_id == corr
    finally:
        server_conn.close()


def test_rpc_direct_reply_to(conn, res):
    rpc_q = res.queue()
    client = conn.channel()
    client.queue_declare(rpc_q)

    replies = []
    client.basic_consume(
        DIRECT_REPLY_TO, lambda c, m, p, b: replies.append((m, p, b)), auto_ack=True
    )
    corr = uuid.uuid4().hex
    client.basic_publish(
        "",
        rpc_q,
        b"question",
        pika.BasicProperties(reply_to=DIRECT_REPLY_TO, correlation_id=corr),
    )

    server_conn = connect()
    try:
        server = server_conn.channel()
        method = None
        deadline = time.monotonic() + 5
        while method is None and time.monotonic() < deadline:
            method, props, body = server.basic_get(rpc_q, auto_ack=True)
        assert method is not None, "request never reached the rpc queue"
        assert body == b"question"
        # the broker rewrites reply_to to a per-channel pseudo-queue name
        assert props.reply_to.startswith(DIRECT_REPLY_TO + ".")
        assert len(props.reply_to) > len(DIRECT_REPLY_TO) + 1
        assert props.correlation_id == corr
        server.basic_publish(
            "",
            props.reply_to,
            b"answer",
            pika.BasicProperties(correlation_id=props.correlation_id),
        )
        drain(conn, lambda: len(replies) == 1)
        m, p, b = replies[0]
        assert b == b"answer"
        assert p.correlation_id == corr
        assert m.exchange == ""
        assert m.routing_key == props.reply_to
    finally:
        server_conn.close()


# ---------------------------------------------------------------- exchanges


def test_direct_exchange_routing(ch, res):
    x = res.exchange()
    qa, qb = res.queue(), res.queue()
    ch.exchange_declare(x, "direct")
    ch.queue_declare(qa)
    ch.queue_declare(qb)
    ch.queue_bind(qa, x, "a")
    ch.queue_bind(qb, x, "b")
    ch.queue_bind(qb, x, "shared")
    ch.queue_bind(qa, x, "shared")
    for key in ("a", "b", "shared", "none"):
        ch.basic_publish(x, key, key.encode())
    assert bodies(ch, qa) == [b"a", b"shared"]
    assert bodies(ch, qb) == [b"b", b"shared"]
    ch.queue_unbind(qa, x, "shared")
    ch.basic_publish(x, "shared", b"after-unbind")
    assert bodies(ch, qa) == []
    assert bodies(ch, qb) == [b"after-unbind"]


def test_topic_exchange_routing(ch, res):
    x = res.exchange()
    ch.exchange_declare(x, "topic")
    bindings = {
        "star": "a.*",
        "hash": "a.#",
        "all": "#",
        "mid": "*.b.*",
        "exact": "a.b",
    }
    queues = {}
    for label, pattern in bindings.items():
        q = res.queue()
        ch.queue_declare(q)
        ch.queue_bind(q, x, pattern)
        queues[label] = q
    keys = ["a", "a.b", "a.b.c", "x.b.y", "b", ""]
    for key in keys:
        ch.basic_publish(x, key, ("k:" + key).encode())

    def got(label):
        return [b.decode()[2:] for b in bodies(ch, queues[label])]

    assert got("star") == ["a.b"]
    assert got("hash") == sorted(["a", "a.b", "a.b.c"])
    assert got("all") == sorted(keys)
    assert got("mid") == ["a.b.c", "x.b.y"]
    assert got("exact") == ["a.b"]


def test_fanout_exchange_routing(ch, res):
    x = res.exchange()
    ch.exchange_declare(x, "fanout")
    qs = [res.queue() for _ in range(3)]
    for i, q in enumerate(qs):
        ch.queue_declare(q)
        ch.queue_bind(q, x, "ignored-%d" % i)
    ch.basic_publish(x, "whatever", b"broadcast")
    for q in qs:
        msgs = get_all(ch, q)
        assert [b for _, _, b in msgs] == [b"broadcast"]
        assert msgs[0][0].exchange == x
        assert msgs[0][0].routing_key == "whatever"


def test_headers_exchange_routing(ch, res):
    x = res.exchange()
    ch.exchange_declare(x, "headers")
    q_all, q_any = res.queue(), res.queue()
    ch.queue_declare(q_all)
    ch.queue_declare(q_any)
    ch.queue_bind(q_all, x, "", arguments={"x-match": "all", "a": "1", "b": "2"})
    ch.queue_bind(q_any, x, "", arguments={"x-match": "any", "a": "1", "b": "2"})
    ch.basic_publish(x, "", b"both", pika.BasicProperties(headers={"a": "1", "b": "2"}))
    ch.basic_publish(x, "", b"one", pika.BasicProperties(headers={"a": "1"}))
    ch.basic_publish(x, "", b"none", pika.BasicProperties(headers={"c": "3"}))
    assert bodies(ch, q_all) == [b"both"]
    assert bodies(ch, q_any) == [b"both", b"one"]


# ---------------------------------------------------------------- errors


def test_passive_declare_missing_queue_404(conn, ch):
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.queue_declare(unique("warren-test-missing"), passive=True)
    assert exc.value.reply_code == 404
    assert "NOT_FOUND" in exc.value.reply_text
    assert not ch.is_open
    assert conn.is_open  # only the channel is closed
    assert conn.channel().is_open


def test_redeclare_with_different_durable_406(conn, ch, res):
    q = res.queue()
    ch.queue_declare(q, durable=False)
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.queue_declare(q, durable=True)
    assert exc.value.reply_code == 406
    assert "PRECONDITION_FAILED" in exc.value.reply_text
    assert "durable" in exc.value.reply_text
    assert conn.is_open
    # the original queue is untouched
    ok = conn.channel().queue_declare(q, passive=True)
    assert ok.method.queue == q


def test_ack_unknown_delivery_tag_406(conn, ch):
    ch.basic_ack(delivery_tag=999)
    with pytest.raises(ChannelClosedByBroker) as exc:
        # any synchronous call after the ack observes the channel.close
        ch.queue_declare("", exclusive=True)
    assert exc.value.reply_code == 406
    assert "PRECONDITION_FAILED" in exc.value.reply_text
    assert "unknown delivery tag 999" in exc.value.reply_text
    assert conn.is_open


def test_publish_to_missing_exchange_404(conn, ch):
    missing = unique("warren-test-missing-x")
    ch.basic_publish(missing, "rk", b"x")
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.queue_declare("", exclusive=True)
    assert exc.value.reply_code == 404
    assert missing in exc.value.reply_text
    assert conn.is_open
