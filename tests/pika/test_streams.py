"""Stream queues (x-queue-type: stream) through pika: offsets, the
x-stream-offset header, credit-only acks, independent readers, filters and
RabbitMQ's refusals.

Same broker and rules as test_smoke.py (WARREN_AMQP_URL); every test passes
against RabbitMQ 3.10 too, except filtering, which RabbitMQ has only from
3.13 (skipped there). RabbitMQ's answers are recorded in
docs/rabbitmq-streams.json.
"""

import datetime
import time

import pytest
from pika import BasicProperties
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from test_smoke import ch, conn, connect, res  # noqa: F401

STREAM = {"x-queue-type": "stream"}


def stream(ch, res, arguments=None):
    q = res.queue()
    ch.queue_declare(q, durable=True, arguments=dict(STREAM, **(arguments or {})))
    return q


def publish(ch, q, bodies, **properties):
    ch.confirm_delivery()
    for body in bodies:
        ch.basic_publish("", q, body.encode(), BasicProperties(**properties))


def read(conn, q, offset=None, prefetch=100, wait=1.0, expect=None, arguments=None):
    """Bodies and x-stream-offset headers a new consumer gets within
    `wait` s (sooner once `expect` arrived), acking each."""
    ch = conn.channel()
    ch.basic_qos(prefetch_count=prefetch)
    got = []

    def on_message(channel, method, props, body):
        got.append((body.decode(), props.headers["x-stream-offset"]))
        channel.basic_ack(method.delivery_tag)

    args = dict(arguments or {})
    if offset is not None:
        args["x-stream-offset"] = offset
    ch.basic_consume(q, on_message, arguments=args)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and (expect is None or len(got) < expect):
        conn.process_data_events(time_limit=0.05)
    ch.close()
    return got


def pump(conn, done, timeout=2.0):
    """Processes events until `done()` or `timeout` s (pika returns from
    process_data_events as soon as anything was dispatched)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)


def numbered(n, start=0):
    return [("m%d" % i, i) for i in range(start, n)]


def test_offsets_first_integer_next_and_last(conn, ch, res):
    q = stream(ch, res)
    publish(ch, q, ["m%d" % i for i in range(10)])
    assert read(conn, q, "first", expect=10) == numbered(10)
    assert read(conn, q, 3, expect=7) == numbered(10, 3)
    # Beyond the end: only what comes next; before the start: from the start.
    assert read(conn, q, 100, wait=0.3) == []
    assert read(conn, q, -5, expect=10) == numbered(10)
    # "last" is the start of the newest chunk: at least the last message.
    last = read(conn, q, "last", wait=0.5)
    assert last and last[-1] == ("m9", 9)
    assert ch.queue_declare(q, passive=True).method.message_count == 10


def test_next_is_the_default_and_sees_only_new_messages(conn, res):
    publisher = conn.channel()
    q = stream(publisher, res)
    publish(publisher, q, ["old"])
    consumer = conn.channel()
    consumer.basic_qos(prefetch_count=10)
    got = []
    consumer.basic_consume(q, lambda c, m, p, b: (got.append(b), c.basic_ack(m.delivery_tag)))
    conn.process_data_events(time_limit=0.3)
    publish(publisher, q, ["new1", "new2"])
    deadline = time.monotonic() + 3
    while len(got) < 2 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == [b"new1", b"new2"]


def test_timestamps_and_intervals(conn, ch, res):
    q = stream(ch, res)
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    publish(ch, q, ["a", "b", "c"])
    assert read(conn, q, before, expect=3) == [("a", 0), ("b", 1), ("c", 2)]
    assert read(conn, q, "1h", expect=3) == [("a", 0), ("b", 1), ("c", 2)]
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    assert read(conn, q, future, wait=0.3) == []


def test_messages_keep_their_properties_and_get_the_offset_as_a_long(conn, ch, res):
    q = stream(ch, res)
    props = BasicProperties(content_type="application/json", message_id="id-1", correlation_id="c-1",
                            headers={"z-last": "z", "a-first": 1}, delivery_mode=2, priority=4)
    publish(ch, q, ["{}"], **props.__dict__)
    reader = conn.channel()
    reader.basic_qos(prefetch_count=1)
    got = []
    reader.basic_consume(q, lambda c, m, p, b: got.append((m, p, b)), arguments={"x-stream-offset": "first"})
    deadline = time.monotonic() + 3
    while not got and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    method, p, body = got[0]
    assert body == b"{}" and not method.redelivered
    assert (p.content_type, p.message_id, p.correlation_id, p.delivery_mode, p.priority) == \
        ("application/json", "id-1", "c-1", 2, 4)
    assert p.headers["z-last"] == "z" and p.headers["a-first"] == 1
    assert p.headers["x-stream-offset"] == 0
    # An AMQP long ('l'), which pika decodes as its `long`.
    assert type(p.headers["x-stream-offset"]).__name__ == "long"


def test_acks_only_give_credit_and_readers_are_independent(conn, ch, res):
    q = stream(ch, res)
    publish(ch, q, ["m%d" % i for i in range(20)])
    slow = conn.channel()
    slow.basic_qos(prefetch_count=3)
    held = []
    slow.basic_consume(q, lambda c, m, p, b: held.append(m.delivery_tag), arguments={"x-stream-offset": "first"})
    pump(conn, lambda: False, 0.5)
    assert len(held) == 3, "no more than the prefetch without acks"
    # Another reader gets everything, whatever the first one holds.
    assert read(conn, q, "first", expect=20) == numbered(20)
    slow.basic_ack(held[-1], multiple=True)
    pump(conn, lambda: len(held) >= 6)
    pump(conn, lambda: False, 0.2)
    assert len(held) == 6
    slow.close()
    # Nothing was consumed: the stream still holds all 20.
    assert ch.queue_declare(q, passive=True).method.message_count == 20
    assert read(conn, q, "first", expect=20) == numbered(20)


def test_consume_without_prefetch_is_refused(conn, ch, res):
    q = stream(ch, res)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.basic_consume(q, lambda *a: None)
        conn.process_data_events(time_limit=0.5)
    assert e.value.reply_code == 406
    assert e.value.reply_text == \
        "PRECONDITION_FAILED - consumer prefetch count is not set for 'queue '%s' in vhost '/''" % q


def test_declare_must_be_durable_and_not_exclusive_or_auto_delete(conn, res):
    for flags, what in [(dict(durable=False), "non-durable"), (dict(durable=True, exclusive=True), "exclusive-owner"),
                        (dict(durable=True, auto_delete=True), "auto-delete")]:
        ch = conn.channel()
        q = res.queue()
        with pytest.raises(ChannelClosedByBroker) as e:
            ch.queue_declare(q, arguments=STREAM, **flags)
        assert e.value.reply_code == 406
        assert "invalid property '%s' for queue '%s'" % (what, q) in e.value.reply_text


def is_rabbitmq(conn):
    return conn._impl.server_properties.get("product") == "RabbitMQ"


def test_filters_deliver_only_the_wanted_values(conn, ch, res):
    if is_rabbitmq(conn):
        pytest.skip("stream filtering needs RabbitMQ 3.13")
    q = stream(ch, res)
    ch.confirm_delivery()
    for body, value in [("r1", "red"), ("b1", "blue"), ("n1", None), ("r2", "red")]:
        headers = {"x-stream-filter-value": value} if value else {}
        ch.basic_publish("", q, body.encode(), BasicProperties(headers=headers))
    red = read(conn, q, "first", expect=2, arguments={"x-stream-filter": "red"})
    assert [b for b, _ in red] == ["r1", "r2"]
    both = read(conn, q, "first", expect=3, arguments={"x-stream-filter": ["red", "blue"]})
    assert [b for b, _ in both] == ["r1", "b1", "r2"]
    unfiltered = read(conn, q, "first", expect=3,
                      arguments={"x-stream-filter": "blue", "x-stream-match-unfiltered": True})
    assert [b for b, _ in unfiltered] == ["b1", "n1"]


def test_retention_by_size_drops_whole_old_segments(conn, ch, res):
    q = stream(ch, res, {"x-max-length-bytes": 20000, "x-stream-max-segment-size-bytes": 5000})
    publish(ch, q, ["x" * 500 + str(i) for i in range(200)])
    time.sleep(0.3)
    count = ch.queue_declare(q, passive=True).method.message_count
    assert 0 < count < 200
    got = read(conn, q, "first", expect=count)
    assert len(got) == count
    first = got[0][1]
    assert first > 0 and [o for _, o in got] == list(range(first, 200))


def test_server_side_offset_tracking_resumes_after_the_last_ack(conn, ch, res):
    if is_rabbitmq(conn):
        pytest.skip("server-side offset tracking over AMQP is LavinMQ's and Warren's")
    q = stream(ch, res)
    publish(ch, q, ["m%d" % i for i in range(10)])
    tag = "tracker-" + q

    def consume_acking(limit, arguments):
        reader = conn.channel()
        reader.basic_qos(prefetch_count=1)
        got = []

        def on_message(channel, method, props, body):
            if len(got) < limit:
                got.append(props.headers["x-stream-offset"])
                channel.basic_ack(method.delivery_tag)

        reader.basic_consume(q, on_message, consumer_tag=tag, arguments=arguments)
        pump(conn, lambda: len(got) >= limit)
        pump(conn, lambda: False, 0.2)
        reader.close()
        return got

    # x-stream-offset void: from the first message, then from after the last ack.
    assert consume_acking(4, {"x-stream-offset": None}) == [0, 1, 2, 3]
    assert consume_acking(3, {"x-stream-offset": None}) == [4, 5, 6]
    # With automatic tracking, a given offset counts only the first time; a
    # tag that tracked before resumes.
    assert consume_acking(2, {"x-stream-offset": "first", "x-stream-automatic-offset-tracking": True}) == [7, 8]
    # A plain offset turns tracking off for that consumer.
    assert consume_acking(2, {"x-stream-offset": 1}) == [1, 2]
