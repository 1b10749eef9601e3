#!/usr/bin/env python3
"""Records a broker's behaviour for queue features: dead-lettering (x-death
headers, CC handling, cycles), TTLs, length limits and overflow modes,
priorities, queue expiry, argument validation and quorum delivery limits.

    REF_PORT=5673 python3 scripts/reference/queue_features.py [--json | --out FILE]

Prints (or writes to FILE) a JSON list with one object per case; JSON is the
only format, --json is accepted like error_cases.py's flag. Header tables are
recorded as dicts together with the order of their keys as pika decoded them,
the Python type of each value ("long" is pika's int subclass for 'l' values)
and the AMQP field type tags read from the wire. Values that vary between runs
are normalised: times to "<time>", server-generated queue names to
"<generated>", and the random suffix of the probe's own queue/exchange names
is removed. scripts/conformance.py compares Warren's output with RabbitMQ's
(docs/rabbitmq-queue-features.json).
"""

import datetime
import json
import os
import re
import sys
import time
import uuid

import pika
import pika.data
import pika.exceptions
import pika.spec as spec

URL = "amqp://guest:guest@%s:%s/%%2F" % (os.environ.get("REF_HOST", "127.0.0.1"),
                                        os.environ.get("REF_PORT", "5673"))

CASES = []


def case(title):
    def register(fn):
        CASES.append((title, fn))
        return fn
    return register


# ------------------------------------------------------------ wire field types


def _skip_shortstr(encoded, offset):
    return offset + 1 + encoded[offset]


def _field_types(encoded, offset):
    """Type tag of the field value at offset: a tag string, a list for arrays
    or a dict for tables. Returns (description, new offset)."""
    kind = encoded[offset:offset + 1]
    if kind == b"F":
        return _table_types(encoded, offset + 1)
    if kind == b"A":
        length = int.from_bytes(encoded[offset + 1:offset + 5], "big")
        offset += 5
        end = offset + length
        items = []
        while offset < end:
            item, offset = _field_types(encoded, offset)
            items.append(item)
        return items, offset
    _, offset = pika.data.decode_value(encoded, offset)
    return kind.decode(), offset


def _table_types(encoded, offset):
    length = int.from_bytes(encoded[offset:offset + 4], "big")
    offset += 4
    end = offset + length
    types = {}
    while offset < end:
        key, offset = pika.data.decode_short_string(encoded, offset)
        types[key], offset = _field_types(encoded, offset)
    return types, offset


def header_wire_types(encoded, offset=0):
    """AMQP type tags of the headers table in encoded basic properties."""
    flags = int.from_bytes(encoded[offset:offset + 2], "big")
    offset += 2
    if not flags & spec.BasicProperties.FLAG_HEADERS:
        return None
    if flags & spec.BasicProperties.FLAG_CONTENT_TYPE:
        offset = _skip_shortstr(encoded, offset)
    if flags & spec.BasicProperties.FLAG_CONTENT_ENCODING:
        offset = _skip_shortstr(encoded, offset)
    return _table_types(encoded, offset)[0]


_decode_properties = spec.BasicProperties.decode


def _decode_recording_types(self, encoded, offset=0):
    self.wire_header_types = header_wire_types(encoded, offset)
    return _decode_properties(self, encoded, offset)


spec.BasicProperties.decode = _decode_recording_types


# ------------------------------------------------------------------- helpers


PROPERTY_NAMES = ("content_type", "content_encoding", "headers", "delivery_mode",
                  "priority", "correlation_id", "reply_to", "expiration", "message_id",
                  "timestamp", "type", "user_id", "app_id", "cluster_id")


def type_name(value):
    if isinstance(value, list):
        return "list[%s]" % ",".join(sorted({type_name(v) for v in value}))
    return type(value).__name__


def view(method, props, body):
    """Everything a client sees of one delivered (or got) message."""
    v = {"body": body.decode("utf-8", "replace"),
         "exchange": method.exchange,
         "routing_key": method.routing_key,
         "redelivered": method.redelivered,
         "properties": {k: getattr(props, k) for k in PROPERTY_NAMES}}
    headers = props.headers
    if headers is not None:
        v["header_order"] = list(headers)
        v["header_types"] = {k: type_name(x) for k, x in headers.items()}
        v["header_wire_types"] = getattr(props, "wire_header_types", None)
        deaths = headers.get("x-death")
        if isinstance(deaths, list):
            v["x_death_key_order"] = [list(d) for d in deaths]
            v["x_death_types"] = [{k: type_name(x) for k, x in d.items()} for d in deaths]
    return v


def publish_outcome(ch, *args, **kwargs):
    """basic_publish on a confirm-mode channel: 'ack', 'nack' or 'returned'."""
    try:
        ch.basic_publish(*args, **kwargs)
        return "ack"
    except pika.exceptions.NackError:
        return "nack"
    except pika.exceptions.UnroutableError:
        return "returned"


def closed(e):
    return {"closed": "channel" if isinstance(e, pika.exceptions.ChannelClosed) else
            "connection", "reply_code": e.reply_code, "reply_text": e.reply_text}


FULL_PROPERTIES = dict(
    content_type="text/plain", content_encoding="utf-8",
    headers={"x-custom": "custom-value", "a-number": 42},
    delivery_mode=2, priority=3, correlation_id="corr-1", reply_to="reply-queue",
    message_id="msg-1", timestamp=1700000000, type="probe-type", user_id="guest",
    app_id="queue-features-probe")


class Probe:
    """One case's connection, channel and the names it declared."""

    def __init__(self):
        self.conn = pika.BlockingConnection(pika.URLParameters(URL))
        self.ch = self.conn.channel()
        self.queues = []
        self.exchanges = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def name(self, role):
        return "qf-%s-%s" % (role, uuid.uuid4().hex[:8])

    def channel(self):
        """The probe channel, reopened if the broker closed it."""
        if not self.ch.is_open:
            self.ch = self.conn.channel()
        return self.ch

    def queue(self, role, arguments=None, durable=False):
        q = self.name(role)
        self.queues.append(q)
        self.channel().queue_declare(q, durable=durable, arguments=arguments)
        return q

    def exchange(self, role, kind="fanout"):
        x = self.name(role)
        self.exchanges.append(x)
        self.channel().exchange_declare(x, exchange_type=kind)
        return x

    def dlx_to_queue(self, role="dlq", kind="fanout", routing_key=""):
        """A dead-letter exchange with one queue bound to it."""
        x = self.exchange(role + "-x", kind)
        q = self.queue(role)
        self.channel().queue_bind(q, x, routing_key)
        return x, q

    def get(self, queue, timeout=2.0, auto_ack=True):
        """basic.get, retrying until a message arrives or timeout passes."""
        deadline = time.monotonic() + timeout
        while True:
            m, props, body = self.channel().basic_get(queue, auto_ack=auto_ack)
            if m is not None:
                return m, props, body
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def get_view(self, queue, timeout=2.0):
        got = self.get(queue, timeout)
        return view(*got) if got else None

    def drain(self, queue, first_timeout=0.0):
        """Bodies of every message left in queue (acked), in order."""
        bodies = []
        got = self.get(queue, first_timeout)
        while got:
            bodies.append(got[2].decode())
            got = self.get(queue, 0)
        return bodies

    def drain_views(self, queue, first_timeout=0.0):
        views = []
        got = self.get(queue, first_timeout)
        while got:
            views.append(view(*got))
            got = self.get(queue, 0)
        return views

    def count(self, queue):
        return self.channel().queue_declare(queue, passive=True).method.message_count

    def cleanup(self):
        try:
            if self.conn.is_open:
                self.conn.close()
        except pika.exceptions.AMQPError:
            pass
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        for q in self.queues:
            ch.queue_delete(q)
        for x in self.exchanges:
            ch.exchange_delete(x)
        conn.close()


# ------------------------------------------------------------ dead-lettering


@case("reject requeue=false with a fanout x-dead-letter-exchange")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("src", {"x-dead-letter-exchange": dlx})
        p.ch.basic_publish("", q, b"hello", pika.BasicProperties(**FULL_PROPERTIES))
        m, props, body = p.get(q, auto_ack=False)
        delivered = view(m, props, body)
        p.ch.basic_reject(m.delivery_tag, requeue=False)
        return {"published_properties": FULL_PROPERTIES, "delivered_from_source": delivered,
                "dead_lettered": p.get_view(dlq)}


@case("reject with x-dead-letter-routing-key, message published with a CC header")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue(kind="direct", routing_key="dl-key")
        cc_q = p.queue("cc")
        q = p.queue("src", {"x-dead-letter-exchange": dlx,
                            "x-dead-letter-routing-key": "dl-key"})
        p.ch.basic_publish("", q, b"cc-msg", pika.BasicProperties(
            headers={"CC": [cc_q], "x-custom": "v"}))
        m, _, _ = p.get(q, auto_ack=False)
        p.ch.basic_reject(m.delivery_tag, requeue=False)
        return {"delivered_to_cc_queue": p.get_view(cc_q),
                "dead_lettered": p.get_view(dlq),
                "further_copies_in_dlq": p.drain(dlq, 0.2)}


@case("reject without x-dead-letter-routing-key, message published with a CC header")
def _():
    with Probe() as p:
        dlx = p.exchange("dlx", "direct")
        by_key = p.queue("dlq-by-key")
        by_cc = p.queue("dlq-by-cc")
        cc_q = p.queue("cc")
        q = p.queue("src", {"x-dead-letter-exchange": dlx})
        p.ch.queue_bind(by_key, dlx, q)
        p.ch.queue_bind(by_cc, dlx, cc_q)
        p.ch.basic_publish("", q, b"cc-msg", pika.BasicProperties(headers={"CC": [cc_q]}))
        m, _, _ = p.get(q, auto_ack=False)
        p.ch.basic_reject(m.delivery_tag, requeue=False)
        return {"note": "dlx (direct) binds one queue by the original routing key and "
                        "one by the CC key",
                "dlq_bound_by_routing_key": p.drain_views(by_key, 1.0),
                "dlq_bound_by_cc_key": p.drain_views(by_cc, 0.3),
                "cc_queue": p.drain(cc_q, 0.3)}


@case("basic.nack multiple=true requeue=false of 3 messages")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("src", {"x-dead-letter-exchange": dlx})
        for body in (b"m1", b"m2", b"m3"):
            p.ch.basic_publish("", q, body)
        tags = [p.get(q, auto_ack=False)[0].delivery_tag for _ in range(3)]
        p.ch.basic_nack(tags[-1], multiple=True, requeue=False)
        return {"dlq_order": p.drain(dlq, 1.0) + p.drain(dlq, 0.3)}


@case("dead-lettered twice through two queues (q1 -> dlx1 -> q2 -> dlx2 -> q3)")
def _():
    with Probe() as p:
        dlx1 = p.exchange("dlx1")
        dlx2 = p.exchange("dlx2")
        q3 = p.queue("q3")
        q2 = p.queue("q2", {"x-dead-letter-exchange": dlx2})
        q1 = p.queue("q1", {"x-dead-letter-exchange": dlx1})
        p.ch.queue_bind(q2, dlx1)
        p.ch.queue_bind(q3, dlx2)
        p.ch.basic_publish("", q1, b"twice", pika.BasicProperties(headers={"x-custom": "v"}))
        m, _, _ = p.get(q1, auto_ack=False)
        p.ch.basic_reject(m.delivery_tag, requeue=False)
        m, props, body = p.get(q2, auto_ack=False)
        in_q2 = view(m, props, body)
        p.ch.basic_reject(m.delivery_tag, requeue=False)
        return {"in_q2": in_q2, "in_q3": p.get_view(q3)}


@case("rejected twice from the same queue (dead-letters back to itself)")
def _():
    with Probe() as p:
        q = p.name("self")
        p.queues.append(q)
        p.ch.queue_declare(q, arguments={"x-dead-letter-exchange": "",
                                         "x-dead-letter-routing-key": q})
        p.ch.basic_publish("", q, b"loop", pika.BasicProperties(headers={"x-custom": "v"}))
        seen = []
        for _ in range(3):
            m, props, body = p.get(q, auto_ack=False)
            seen.append((view(m, props, body), props.headers))
            if len(seen) == 2:
                time.sleep(1.1)  # x-death times have one-second resolution
            if len(seen) < 3:
                p.ch.basic_reject(m.delivery_tag, requeue=False)
        p.ch.basic_ack(m.delivery_tag)
        first_time = seen[1][1]["x-death"][0]["time"]
        second_time = seen[2][1]["x-death"][0]["time"]
        return {"first_delivery": seen[0][0], "after_first_reject": seen[1][0],
                "after_second_reject": seen[2][0],
                "x_death_time_updated_by_second_reject (1.1 s later)":
                    second_time != first_time}


# ----------------------------------------------------------------------- TTL


@case("per-queue TTL (x-message-ttl=50) with a dead-letter exchange")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("ttl", {"x-message-ttl": 50, "x-dead-letter-exchange": dlx})
        p.ch.basic_publish("", q, b"expires", pika.BasicProperties(headers={"x-custom": "v"}))
        return {"dead_lettered": p.get_view(dlq)}


@case("per-message expiration=50 on a queue without TTL, with a dead-letter exchange")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("src", {"x-dead-letter-exchange": dlx})
        p.ch.basic_publish("", q, b"expires", pika.BasicProperties(expiration="50"))
        return {"dead_lettered": p.get_view(dlq)}


@case("per-message expiration=60000, rejected (requeue=false) before it expires")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("src", {"x-dead-letter-exchange": dlx})
        p.ch.basic_publish("", q, b"rejected", pika.BasicProperties(expiration="60000"))
        m, _, _ = p.get(q, auto_ack=False)
        p.ch.basic_reject(m.delivery_tag, requeue=False)
        return {"dead_lettered": p.get_view(dlq)}


@case("TTL cycle: x-message-ttl=50 dead-lettering to itself via the default exchange")
def _():
    with Probe() as p:
        q = p.name("ttl-cycle")
        p.queues.append(q)
        p.ch.queue_declare(q, arguments={"x-message-ttl": 50, "x-dead-letter-exchange": "",
                                         "x-dead-letter-routing-key": q})
        p.ch.basic_publish("", q, b"cycle")
        time.sleep(0.5)
        count = p.count(q)
        return {"message_count_after_500ms": count,
                "message_if_any": p.get_view(q, 0) if count else None}


@case("TTL cycle through a fanout DLX bound to the queue itself and to a monitor queue")
def _():
    with Probe() as p:
        dlx = p.exchange("dlx")
        monitor = p.queue("monitor")
        q = p.queue("ttl-cycle", {"x-message-ttl": 50, "x-dead-letter-exchange": dlx})
        p.ch.queue_bind(q, dlx)
        p.ch.queue_bind(monitor, dlx)
        p.ch.basic_publish("", q, b"cycle")
        time.sleep(0.5)
        return {"cycling_queue_count_after_500ms": p.count(q),
                "monitor_queue": p.drain_views(monitor)}


@case("per-message expiration=50 on a queue dead-lettering to itself via the default exchange")
def _():
    with Probe() as p:
        q = p.name("exp-cycle")
        p.queues.append(q)
        p.ch.queue_declare(q, arguments={"x-dead-letter-exchange": "",
                                         "x-dead-letter-routing-key": q})
        p.ch.basic_publish("", q, b"cycle", pika.BasicProperties(expiration="50"))
        time.sleep(0.5)
        count = p.count(q)
        return {"message_count_after_500ms": count,
                "message_if_any": p.get_view(q, 0) if count else None}


# ----------------------------------------------------------- length limits


@case("x-max-length=2, default overflow (drop-head), with a dead-letter exchange")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("maxlen", {"x-max-length": 2, "x-dead-letter-exchange": dlx})
        p.ch.confirm_delivery()
        outcomes = [publish_outcome(p.ch, "", q, b) for b in (b"m1", b"m2", b"m3")]
        return {"confirms": outcomes, "dead_lettered": p.drain_views(dlq, 1.0),
                "queue_contents": p.drain(q)}


@case("x-max-length=2, x-overflow=reject-publish, publisher confirms")
def _():
    with Probe() as p:
        q = p.queue("reject-publish", {"x-max-length": 2, "x-overflow": "reject-publish"})
        p.ch.confirm_delivery()
        outcomes = [publish_outcome(p.ch, "", q, b) for b in (b"m1", b"m2", b"m3")]
        return {"confirms": outcomes, "queue_contents": p.drain(q)}


@case("x-max-length=2, x-overflow=reject-publish-dlx, with a dead-letter exchange")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("reject-publish-dlx", {"x-max-length": 2,
                                           "x-overflow": "reject-publish-dlx",
                                           "x-dead-letter-exchange": dlx})
        p.ch.confirm_delivery()
        outcomes = [publish_outcome(p.ch, "", q, b) for b in (b"m1", b"m2", b"m3")]
        return {"confirms": outcomes, "dead_lettered": p.drain_views(dlq, 1.0),
                "queue_contents": p.drain(q)}


@case("x-max-length-bytes=10 with 6-byte bodies, with a dead-letter exchange")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.queue("maxbytes", {"x-max-length-bytes": 10, "x-dead-letter-exchange": dlx})
        p.ch.confirm_delivery()
        outcomes = [publish_outcome(p.ch, "", q, b)
                    for b in (b"body-1", b"body-2", b"body-3")]
        dead = p.drain_views(dlq, 1.0)
        dead += p.drain_views(dlq, 0.3)
        return {"confirms": outcomes, "queue_contents": p.drain(q),
                "dead_lettered_bodies": [d["body"] for d in dead],
                "dead_letter_reasons": [d["properties"]["headers"]["x-death"][0]["reason"]
                                        for d in dead]}


# ---------------------------------------------------------------- priorities


def get_order(p, q):
    """Every message of q by basic.get: body and priority, in order."""
    order = []
    got = p.get(q, 0)
    while got:
        order.append({"body": got[2].decode(), "priority": got[1].priority})
        got = p.get(q, 0)
    return order


@case("x-max-priority=5: priorities 0,5,1,5,9,3 published, then basic.get all")
def _():
    with Probe() as p:
        q = p.queue("prio", {"x-max-priority": 5})
        p.ch.confirm_delivery()
        for body, prio in (("p0", 0), ("p5-a", 5), ("p1", 1), ("p5-b", 5), ("p9", 9),
                           ("p3", 3)):
            p.ch.basic_publish("", q, body.encode(), pika.BasicProperties(priority=prio))
        return {"get_order": get_order(p, q)}


@case("x-max-priority=5: priority absent mixed with priorities 2 and 0")
def _():
    with Probe() as p:
        q = p.queue("prio", {"x-max-priority": 5})
        p.ch.confirm_delivery()
        for body, prio in (("none-a", None), ("p2", 2), ("none-b", None), ("p0", 0)):
            p.ch.basic_publish("", q, body.encode(), pika.BasicProperties(priority=prio))
        return {"get_order": get_order(p, q)}


@case("priorities published to a queue without x-max-priority")
def _():
    with Probe() as p:
        q = p.queue("no-prio")
        p.ch.confirm_delivery()
        for body, prio in (("p0", 0), ("p5", 5), ("p9", 9)):
            p.ch.basic_publish("", q, body.encode(), pika.BasicProperties(priority=prio))
        return {"get_order": p.drain(q)}


# --------------------------------------------------------------- queue expiry


@case("x-expires=200: passive declare after 500 ms")
def _():
    with Probe() as p:
        q = p.queue("expires", {"x-expires": 200})
        time.sleep(0.5)
        try:
            ok = p.ch.queue_declare(q, passive=True).method
            return {"result": "declare-ok", "message_count": ok.message_count}
        except pika.exceptions.AMQPError as e:
            return closed(e)


# ------------------------------------------------------------ declare errors


def declare_outcome(arguments, durable=False):
    with Probe() as p:
        q = p.name("bad-arg")
        p.queues.append(q)
        try:
            p.ch.queue_declare(q, durable=durable, arguments=arguments)
            return {"arguments": arguments, "result": "declare-ok"}
        except pika.exceptions.AMQPError as e:
            return dict({"arguments": arguments}, **closed(e))


@case("queue.declare argument errors")
def _():
    attempts = [{"x-message-ttl": -1}, {"x-expires": 0}, {"x-max-length": -1},
                {"x-overflow": "bogus"}, {"x-max-priority": 300},
                {"x-dead-letter-routing-key": "rk"}, {"x-message-ttl": "50"},
                {"x-delivery-limit": 2}, {"x-max-length-bytes": -1},
                {"x-queue-type": "bogus"}, {"x-dead-letter-exchange": 5}]
    return {"declares": [declare_outcome(a) for a in attempts]}


# ---------------------------------------------------------------- expiration


@case("publish with an invalid expiration property")
def _():
    results = []
    for expiration in ("abc", "-1", "", "1.5"):
        with Probe() as p:
            q = p.queue("exp")
            entry = {"expiration": expiration}
            try:
                p.ch.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
                entry["message_count_after"] = p.count(q)
                entry["result"] = "accepted"
            except pika.exceptions.AMQPError as e:
                entry.update(closed(e))
            results.append(entry)
    return {"publishes": results}


@case("expiration=0: waiting consumer vs no consumer (with a dead-letter exchange)")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        consumed = p.queue("consumed", {"x-dead-letter-exchange": dlx})
        idle = p.queue("idle", {"x-dead-letter-exchange": dlx})
        deliveries = []
        p.ch.basic_consume(consumed, lambda _c, m, props, body: deliveries.append(
            view(m, props, body)), auto_ack=True)
        p.ch.basic_publish("", consumed, b"to-consumer", pika.BasicProperties(expiration="0"))
        p.conn.process_data_events(time_limit=0.3)
        p.ch.basic_publish("", idle, b"no-consumer", pika.BasicProperties(expiration="0"))
        time.sleep(0.2)
        return {"with_consumer": {"deliveries": deliveries},
                "without_consumer": {"message_count": p.count(idle)},
                "dead_lettered": p.drain_views(dlq, 0.5)}


# -------------------------------------------------------------------- quorum


@case("quorum queue x-delivery-limit=2 with a dead-letter exchange, reject requeue=true")
def _():
    with Probe() as p:
        dlx, dlq = p.dlx_to_queue()
        q = p.name("quorum")
        p.queues.append(q)
        try:
            p.ch.queue_declare(q, durable=True, arguments={
                "x-queue-type": "quorum", "x-delivery-limit": 2,
                "x-dead-letter-exchange": dlx})
        except pika.exceptions.AMQPError as e:
            return {"declare": closed(e)}
        p.ch.basic_publish("", q, b"limited", pika.BasicProperties(headers={"x-custom": "v"}))
        deliveries = []
        got = p.get(q, 2.0, auto_ack=False)
        while got and len(deliveries) < 10:
            v = view(*got)
            deliveries.append({"redelivered": v["redelivered"],
                               "x-delivery-count": (v["properties"]["headers"] or {})
                               .get("x-delivery-count"),
                               "headers": v["properties"]["headers"],
                               "header_wire_types": v.get("header_wire_types")})
            p.ch.basic_reject(got[0].delivery_tag, requeue=True)
            got = p.get(q, 0.5, auto_ack=False)
        return {"deliveries": deliveries, "dead_lettered": p.get_view(dlq, 1.0),
                "quorum_queue_count_after": p.count(q)}


# ---------------------------------------------------------------- queue types


def typed_declare(arguments, durable=True, exclusive=False, auto_delete=False):
    """One queue.declare with these flags: declare-ok or the close."""
    entry = {"arguments": arguments, "durable": durable, "exclusive": exclusive,
             "auto_delete": auto_delete}
    with Probe() as p:
        q = p.name("typed")
        p.queues.append(q)
        try:
            p.ch.queue_declare(q, durable=durable, exclusive=exclusive,
                               auto_delete=auto_delete, arguments=arguments)
            entry["result"] = "declare-ok"
        except pika.exceptions.AMQPError as e:
            entry.update(closed(e))
    return entry


QUORUM = {"x-queue-type": "quorum"}


@case("x-queue-type=quorum: declare rules (properties, arguments it refuses or checks)")
def _():
    attempts = [
        (QUORUM, False, False, False), (QUORUM, True, True, False), (QUORUM, True, False, True),
        (QUORUM, False, True, True), (QUORUM, False, False, True), (QUORUM, False, True, False),
        (dict(QUORUM, **{"x-max-priority": 5}), True, False, False),
        (dict(QUORUM, **{"x-max-priority": "x"}), True, False, False),
        (dict(QUORUM, **{"x-max-priority": 5}), False, True, True),
        (dict(QUORUM, **{"x-max-priority": 5, "x-message-ttl": -1}), True, False, False),
        (dict(QUORUM, **{"x-queue-mode": "lazy"}), True, False, False),
        (dict(QUORUM, **{"x-queue-master-locator": "min-masters"}), True, False, False),
        (dict(QUORUM, **{"x-queue-version": 2}), True, False, False),
        (dict(QUORUM, **{"x-max-age": "1D"}), True, False, False),
        (dict(QUORUM, **{"x-stream-max-segment-size-bytes": 1000}), True, False, False),
        (dict(QUORUM, **{"x-dead-letter-strategy": "bogus"}), True, False, False),
        (dict(QUORUM, **{"x-queue-leader-locator": "bogus"}), True, False, False),
        (dict(QUORUM, **{"x-quorum-initial-group-size": "3"}), True, False, False),
        (dict(QUORUM, **{"x-message-ttl": 1000, "x-expires": 100000, "x-max-length": 10,
                         "x-max-length-bytes": 1000, "x-overflow": "reject-publish"}), True, False, False),
        (dict(QUORUM, **{"x-overflow": "drop-head", "x-single-active-consumer": True,
                         "x-dead-letter-exchange": "dlx", "x-dead-letter-strategy": "at-least-once",
                         "x-quorum-initial-group-size": 3, "x-queue-leader-locator": "balanced",
                         "x-max-in-memory-length": 10, "x-max-in-memory-bytes": 10}), True, False, False),
        (dict(QUORUM, **{"x-custom-argument": "kept"}), True, False, False),
    ]
    return {"declares": [typed_declare(*a) for a in attempts]}


@case("classic queue with quorum-only and stream-only arguments")
def _():
    attempts = [{"x-quorum-initial-group-size": 3}, {"x-dead-letter-strategy": "at-least-once"},
                {"x-queue-leader-locator": "balanced"}, {"x-max-in-memory-length": 10},
                {"x-max-age": "1D"}, {"x-stream-max-segment-size-bytes": 100},
                {"x-queue-type": "classic", "x-max-priority": 3}]
    return {"declares": [typed_declare(a) for a in attempts]}


@case("x-queue-type: redeclaring with another type, or none")
def _():
    results = {}
    for first, then in (("quorum", [{}, {"x-queue-type": "classic"}, QUORUM]),
                        ("classic", [QUORUM, {"x-queue-type": "classic"}, {}])):
        with Probe() as p:
            q = p.name(first)
            p.queues.append(q)
            p.ch.queue_declare(q, durable=True,
                               arguments={} if first == "classic" else QUORUM)
            outcomes = []
            for arguments in then:
                try:
                    p.channel().queue_declare(q, durable=True, arguments=arguments)
                    outcomes.append({"arguments": arguments, "result": "declare-ok"})
                except pika.exceptions.AMQPError as e:
                    outcomes.append(dict({"arguments": arguments}, **closed(e)))
            results[first] = outcomes
    return results


@case("x-queue-type=stream declare")
def _():
    return typed_declare({"x-queue-type": "stream"})


@case("quorum queue: basic.consume on a channel with global qos")
def _():
    with Probe() as p:
        q = p.name("quorum")
        p.queues.append(q)
        p.ch.queue_declare(q, durable=True, arguments=QUORUM)
        p.ch.basic_qos(prefetch_count=5, global_qos=True)
        try:
            p.ch.basic_consume(q, lambda *_: None)
            p.conn.process_data_events(time_limit=0.3)
            return {"result": "consume-ok"}
        except pika.exceptions.AMQPError as e:
            return closed(e)


# --------------------------------------------------------------------- output


def normalise(value):
    if isinstance(value, dict):
        return {normalise(k): normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, datetime.datetime):
        return "<time>"
    if isinstance(value, bytes):
        return normalise(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        value = re.sub(r"amq\.gen-[\w-]+", "<generated>", value)
        return re.sub(r"\b(qf-[\w.-]+?)-[0-9a-f]{8}\b", r"\1", value)
    return value


def run(cases=None, normalise_case=None):
    """Every case's result (a probe failure recorded as the case's result),
    normalised. Another probe passes its own cases and normaliser."""
    results = []
    for title, fn in CASES if cases is None else cases:
        try:
            r = fn()
        except Exception as e:  # record probe failures instead of aborting
            r = {"result": "probe error: %s: %s" % (type(e).__name__, e)}
        results.append((normalise_case or normalise)(dict({"case": title}, **r)))
    return results


def write(results):
    """The results as JSON, to --out FILE or (with or without --json) stdout."""
    text = json.dumps(results, indent=2) + "\n"
    if "--out" in sys.argv:
        with open(sys.argv[sys.argv.index("--out") + 1], "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    write(run())
