#!/usr/bin/env python3
"""Records a broker's behaviour for stream queues (x-queue-type=stream) as an
AMQP 0-9-1 client (pika) sees it: declare rules and argument validation,
which consume options are required or refused, x-stream-offset ("first",
"last", "next", integers, timestamps, intervals, bad values), the
x-stream-offset header on deliveries (value and wire type), acknowledgement
and credit, basic.get/nack/reject/purge, filtering arguments, publishing and
a quick retention check.

    REF_PORT=5673 python3 scripts/reference/streams.py --json [--out FILE]

Prints (or writes to FILE) a JSON list with one object per case; JSON is the
only format, --json is accepted like the other probes. Deliveries are
recorded with their body, delivery tag, redelivered flag, the x-stream-offset
header (value and AMQP wire type tag) and the other headers in the order pika
decoded them; some cases record the full view (every property) of
queue_features.py. A close is {"closed": "channel"|"connection", "reply_code",
"reply_text"}. Values that vary between runs are normalised as in
queue_features.py (times to "<time>", the random suffix of the probe's
st-... names removed); offsets are recorded as they are, since every case
uses a fresh stream whose offsets start at 0. Every stream a case declares is
deleted at the end of the case. The RabbitMQ 3.10.8 reference is
docs/rabbitmq-streams.json.
"""

import datetime
import decimal
import json
import os
import re
import sys
import time
import uuid

import pika
import pika.exceptions

# Importing queue_features registers its own cases in its own CASES list (it
# runs none of them) and makes pika record the wire type of every header.
import queue_features
from queue_features import closed, publish_outcome, view

CASES = []


def case(title):
    def register(fn):
        CASES.append((title, fn))
        return fn
    return register


STREAM = {"x-queue-type": "stream"}

FULL_PROPERTIES = dict(
    content_type="text/plain", content_encoding="utf-8",
    headers={"x-custom": "custom-value", "a-number": 42},
    delivery_mode=2, priority=3, correlation_id="corr-1", reply_to="reply-queue",
    expiration="60000", message_id="msg-1", timestamp=1700000000, type="probe-type",
    user_id="guest", app_id="streams-probe")

# Seconds a consumer collects deliveries, and a stream's message_count must
# stay unchanged to count as settled. RabbitMQ needs the defaults (it updates
# the count about once a second); a broker that answers at once can be probed
# with less (scripts/conformance.py runs Warren with 0.3 and 0.3).
COLLECT = float(os.environ.get("REF_STREAM_COLLECT", "1.0"))
SETTLE = float(os.environ.get("REF_STREAM_SETTLE", "1.5"))


def stream_args(**extra):
    return dict(STREAM, **{k.replace("_", "-"): v for k, v in extra.items()})


class Probe(queue_features.Probe):
    """queue_features.Probe with st-... names and stream helpers."""

    def name(self, role):
        return "st-%s-%s" % (role, uuid.uuid4().hex[:8])

    def connection(self):
        """The probe connection, reopened if the broker closed it (several
        stream refusals close the whole connection)."""
        if not self.conn.is_open:
            self.conn = pika.BlockingConnection(pika.URLParameters(queue_features.URL))
            self.ch = self.conn.channel()
        return self.conn

    def channel(self):
        self.connection()
        return super().channel()

    def message_count(self, q, settle=SETTLE, limit=10.0):
        """message_count of a passive declare once it stopped changing for
        `settle` seconds (RabbitMQ updates a stream's count about once a
        second, so it reads 0 right after publishing)."""
        deadline = time.monotonic() + limit
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            count = self.channel().queue_declare(q, passive=True).method.message_count
            if count != last:
                last, since = count, time.monotonic()
            elif count and time.monotonic() - since >= settle:
                break
            time.sleep(0.25)
        return last

    def stream(self, role, arguments=None):
        q = self.name(role)
        self.queues.append(q)
        self.channel().queue_declare(q, durable=True, arguments=dict(STREAM, **(arguments or {})))
        return q

    def publish_ten(self, q):
        """m0..m9 one by one with confirms: m0 without properties, m5 with
        every property, the others with headers x-custom and n. Returns the
        confirms."""
        ch = self.connection().channel()
        ch.confirm_delivery()
        outcomes = [publish_outcome(ch, "", q, b"m%d" % i, message_properties(i))
                    for i in range(10)]
        ch.close()
        return outcomes

    def publish_burst(self, q, bodies, properties=None):
        """Publishes without confirms or waiting, then waits for the stream to
        store them."""
        ch = self.connection().channel()
        for body in bodies:
            ch.basic_publish("", q, body.encode(), properties)
        ch.close()
        time.sleep(0.5)

    def consume(self, q, arguments=None, prefetch=100, global_qos=None, auto_ack=False,
                exclusive=False, ack=True, collect=COLLECT, full=False, after=None):
        """basic.qos (unless prefetch is None), basic.consume on a new channel
        and every delivery within `collect` seconds (each acked on arrival if
        `ack`). `after(channel)` runs once consume-ok arrived, followed by
        another collection period. Returns a dict: deliveries, or the close."""
        ch = self.connection().channel()
        deliveries = []
        result = {}

        def on_message(chan, method, props, body):
            deliveries.append(view(method, props, body) if full else delivery(method, props, body))
            if ack and not auto_ack:
                chan.basic_ack(method.delivery_tag)

        try:
            if prefetch is not None:
                ch.basic_qos(prefetch_count=prefetch,
                             **({"global_qos": global_qos} if global_qos is not None else {}))
            ch.basic_consume(q, on_message, auto_ack=auto_ack, exclusive=exclusive,
                             arguments=arguments)
            result["consume"] = "consume-ok"
            self.collect(collect)
            if after:
                result["after"] = after(ch)
                self.collect(collect)
        except pika.exceptions.AMQPError as e:
            result.update(closed(e))
        if "closed" not in result and async_close(ch):
            result.update(async_close(ch))
        result["deliveries"] = deliveries
        if ch.is_open:
            ch.close()
        return result

    def collect(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=max(0.0, deadline - time.monotonic()))


def async_close(ch):
    """The close of a channel the broker closed while the probe was only
    waiting for deliveries (pika raises nothing then), or None."""
    reason = getattr(ch, "_closing_reason", None)
    if not ch.is_open and isinstance(reason, pika.exceptions.AMQPError):
        return closed(reason)
    return None


def message_properties(i):
    if i == 0:
        return None
    if i == 5:
        return pika.BasicProperties(**FULL_PROPERTIES)
    return pika.BasicProperties(headers={"x-custom": "v", "n": i})


def delivery(method, props, body):
    """One delivery, compactly: body, tag, redelivered, the x-stream-offset
    header (value and wire type) and the other headers in decoded order."""
    headers = props.headers or {}
    wire = getattr(props, "wire_header_types", None) or {}
    d = {"body": body.decode("utf-8", "replace"), "delivery_tag": method.delivery_tag,
         "redelivered": method.redelivered}
    if "x-stream-offset" in headers:
        d["x-stream-offset"] = headers["x-stream-offset"]
        d["x-stream-offset_wire_type"] = wire.get("x-stream-offset")
    d["header_order"] = list(headers) if props.headers is not None else None
    d["other_headers"] = {k: v for k, v in headers.items() if k != "x-stream-offset"}
    return d


def bodies(result):
    return [d["body"] for d in result.get("deliveries", [])]


def summary(result):
    """A consume result with the bodies and offsets listed up front."""
    out = {"bodies": bodies(result),
           "offsets": [d.get("x-stream-offset") for d in result.get("deliveries", [])]}
    out.update(result)
    return out


def declare_outcome(arguments, durable=True, exclusive=False, auto_delete=False):
    """One queue.declare of a fresh stream (deleted again): declare-ok or the
    close."""
    entry = {"arguments": arguments, "durable": durable, "exclusive": exclusive,
             "auto_delete": auto_delete}
    with Probe() as p:
        q = p.name("decl")
        p.queues.append(q)
        try:
            ok = p.ch.queue_declare(q, durable=durable, exclusive=exclusive,
                                    auto_delete=auto_delete, arguments=arguments)
            entry["result"] = "declare-ok"
            entry["message_count"] = ok.method.message_count
            entry["consumer_count"] = ok.method.consumer_count
        except pika.exceptions.AMQPError as e:
            entry.update(closed(e))
    return entry


# ------------------------------------------------------------------- declare


@case("stream declare rules: durable, exclusive, auto_delete")
def _():
    attempts = [(STREAM, False, False, False), (STREAM, True, True, False),
                (STREAM, True, False, True), (STREAM, True, False, False)]
    return {"declares": [declare_outcome(*a) for a in attempts]}


@case("stream redeclare: same arguments, different x-max-length-bytes, none, other types")
def _():
    with Probe() as p:
        first = stream_args(x_max_length_bytes=1000000)
        q = p.stream("redeclare", {"x-max-length-bytes": 1000000})
        outcomes = []
        for arguments, passive in ((first, False), (stream_args(x_max_length_bytes=2000000), False),
                                   (STREAM, False), (stream_args(x_max_age="1D"), False),
                                   ({}, False), ({"x-queue-type": "classic"}, False),
                                   ({}, True)):
            entry = {"arguments": arguments, "passive": passive}
            try:
                ok = p.channel().queue_declare(q, durable=True, passive=passive,
                                               arguments=arguments)
                entry["result"] = "declare-ok"
                entry["message_count"] = ok.method.message_count
            except pika.exceptions.AMQPError as e:
                entry.update(closed(e))
            outcomes.append(entry)
        plain = p.stream("redeclare-plain")
        plain_outcomes = []
        for arguments in (STREAM, {}, {"x-queue-type": "classic"}, {"x-queue-type": "quorum"},
                          stream_args(x_max_age="1D"), stream_args(x_foo="bar")):
            entry = {"arguments": arguments}
            try:
                p.channel().queue_declare(plain, durable=True, arguments=arguments)
                entry["result"] = "declare-ok"
            except pika.exceptions.AMQPError as e:
                entry.update(closed(e))
            plain_outcomes.append(entry)
        return {"first_declare": first, "redeclares": outcomes,
                "stream declared with only x-queue-type, redeclared": plain_outcomes}


# ----------------------------------------------------------------- arguments


@case("stream declare arguments: retention and segment size")
def _():
    attempts = [{"x-max-length-bytes": 1000000}, {"x-max-length-bytes": "1000000"},
                {"x-max-length-bytes": 0}, {"x-max-length-bytes": -1}]
    attempts += [{"x-max-age": v} for v in ("7D", "12h", "30m", "10s", "1Y", "2M",
                                           "7d", "abc", "1", 7, "0s", "-1h", "1H", "1W")]
    attempts += [{"x-stream-max-segment-size-bytes": v}
                 for v in (500000000, 1000, 0, -1, 3000000000, 4000000000, "1000")]
    attempts += [{"x-stream-filter-size-bytes": v} for v in (16, 300, 0)]
    return {"declares": [declare_outcome(dict(STREAM, **a)) for a in attempts]}


@case("stream declare arguments: classic and quorum queue arguments")
def _():
    attempts = [{"x-message-ttl": 1000}, {"x-dead-letter-exchange": "dlx"},
                {"x-dead-letter-routing-key": "rk"}, {"x-max-length": 10},
                {"x-max-priority": 5}, {"x-overflow": "reject-publish"},
                {"x-overflow": "drop-head"}, {"x-expires": 100000},
                {"x-single-active-consumer": True}, {"x-delivery-limit": 3},
                {"x-queue-mode": "lazy"}, {"x-max-in-memory-length": 10},
                {"x-max-in-memory-bytes": 10}, {"x-dead-letter-strategy": "at-least-once"},
                {"x-quorum-initial-group-size": 3}, {"x-queue-leader-locator": "balanced"},
                {"x-queue-leader-locator": "client-local"}, {"x-queue-leader-locator": "bogus"},
                {"x-initial-cluster-size": 1}, {"x-initial-cluster-size": 3},
                {"x-initial-cluster-size": 0}, {"x-initial-cluster-size": "1"},
                {"x-queue-master-locator": "min-masters"}, {"x-queue-version": 2},
                {"x-foo": "bar"}]
    return {"declares": [declare_outcome(dict(STREAM, **a)) for a in attempts]}


# ----------------------------------------------------------------- consuming


@case("stream consume: without basic.qos")
def _():
    with Probe() as p:
        q = p.stream("noqos")
        p.publish_ten(q)
        return p.consume(q, prefetch=None)


@case("stream consume: basic.qos prefetch_count=10 global_qos=true only")
def _():
    with Probe() as p:
        q = p.stream("globalqos")
        p.publish_ten(q)
        return p.consume(q, prefetch=10, global_qos=True)


@case("stream consume: basic.qos prefetch_count=10 global and per-consumer")
def _():
    with Probe() as p:
        q = p.stream("bothqos")
        p.publish_ten(q)
        ch = p.connection().channel()
        deliveries = []
        ch.basic_qos(prefetch_count=10, global_qos=True)
        ch.basic_qos(prefetch_count=10)
        try:
            ch.basic_consume(q, lambda c, m, pr, b: (deliveries.append(m.delivery_tag),
                                                     c.basic_ack(m.delivery_tag)),
                             arguments={"x-stream-offset": "first"})
            p.collect(COLLECT)
            return {"consume": "consume-ok", "delivery_tags": deliveries}
        except pika.exceptions.AMQPError as e:
            return closed(e)


@case("stream consume: auto_ack=true with prefetch")
def _():
    with Probe() as p:
        q = p.stream("autoack")
        p.publish_ten(q)
        return p.consume(q, auto_ack=True, arguments={"x-stream-offset": "first"})


@case("stream consume: basic.get")
def _():
    with Probe() as p:
        q = p.stream("get")
        p.publish_ten(q)
        out = {}
        for auto_ack in (False, True):
            try:
                m, props, body = p.channel().basic_get(q, auto_ack=auto_ack)
                out["auto_ack=%s" % auto_ack] = view(m, props, body) if m else "get-empty"
            except pika.exceptions.AMQPError as e:
                out["auto_ack=%s" % auto_ack] = closed(e)
        return out


@case("stream consume: exclusive consumer, then a second consumer")
def _():
    with Probe() as p:
        q = p.stream("exclusive")
        p.publish_ten(q)

        def second(_ch):
            try:
                ch2 = p.connection().channel()
                ch2.basic_qos(prefetch_count=10)
                ch2.basic_consume(q, lambda *_: None)
                ch2.close()
                return "consume-ok"
            except pika.exceptions.AMQPError as e:
                return closed(e)
        return summary(p.consume(q, exclusive=True, arguments={"x-stream-offset": "first"},
                                 after=second))


# ------------------------------------------------------------------- offsets


@case("stream offsets: 'first' on 10 messages published one by one with confirms (full view)")
def _():
    with Probe() as p:
        q = p.stream("first")
        confirms = p.publish_ten(q)
        result = p.consume(q, arguments={"x-stream-offset": "first"}, full=True)
        return {"confirms": confirms, "published_properties_of_m5": FULL_PROPERTIES,
                "bodies": bodies(result), **result}


def offset_case(offset, **kw):
    with Probe() as p:
        q = p.stream("offset")
        p.publish_ten(q)
        arguments = None if offset is None else {"x-stream-offset": offset}
        return summary(p.consume(q, arguments=arguments, **kw))


for _title, _offset in (("absent (default)", None), ("'first'", "first"), ("'last'", "last"),
                        ("integer 3", 3), ("integer 0", 0), ("integer 9", 9),
                        ("integer 10 (next offset)", 10), ("integer 100 (beyond the end)", 100),
                        ("integer -1", -1), ("'FIRST' (wrong case)", "FIRST"),
                        ("'bad'", "bad"), ("empty string", ""),
                        ("decimal 1.5 (AMQP 'D'; pika cannot send a float)", decimal.Decimal("1.5")),
                        ("boolean true", True), ("short string '3' (numeric text)", "3")):
    def _make(offset=_offset):
        return lambda: offset_case(offset)
    case("stream offsets: %s on 10 messages published one by one" % _title)(_make())


@case("stream offsets: 'next', then 2 more published while consuming")
def _():
    with Probe() as p:
        q = p.stream("next")
        p.publish_ten(q)

        def publish_two(_ch):
            ch = p.connection().channel()
            ch.confirm_delivery()
            confirms = [publish_outcome(ch, "", q, b, pika.BasicProperties(headers={"late": True}))
                        for b in (b"m10", b"m11")]
            ch.close()
            return {"published": ["m10", "m11"], "confirms": confirms}
        return summary(p.consume(q, arguments={"x-stream-offset": "next"}, after=publish_two))


@case("stream offsets: 'last', then 2 more published while consuming")
def _():
    with Probe() as p:
        q = p.stream("last-live")
        p.publish_ten(q)

        def publish_two(_ch):
            ch = p.connection().channel()
            ch.confirm_delivery()
            for b in (b"m10", b"m11"):
                ch.basic_publish("", q, b)
            ch.close()
            return {"published": ["m10", "m11"]}
        return summary(p.consume(q, arguments={"x-stream-offset": "last"}, after=publish_two))


@case("stream offsets: 'first' with prefetch 100 on an empty stream, then 3 published")
def _():
    with Probe() as p:
        q = p.stream("empty")

        def publish_three(_ch):
            ch = p.connection().channel()
            ch.confirm_delivery()
            for b in (b"e0", b"e1", b"e2"):
                ch.basic_publish("", q, b)
            ch.close()
            return {"published": ["e0", "e1", "e2"]}
        return summary(p.consume(q, arguments={"x-stream-offset": "first"}, after=publish_three))


@case("stream offsets: 300 messages published in one burst without confirms")
def _():
    """A burst is stored in chunks of several messages, how many varies from
    run to run: 'last' (the start of the last chunk) is recorded by what is
    stable, the other offsets exactly."""
    with Probe() as p:
        q = p.stream("burst")
        p.publish_burst(q, ["b%d" % i for i in range(300)])
        out = {}
        for label, offset in (("first", "first"), ("integer 150", 150), ("integer 299", 299),
                              ("next", "next"), ("last", "last")):
            r = p.consume(q, arguments={"x-stream-offset": offset})
            got = bodies(r)
            offsets = [d.get("x-stream-offset") for d in r["deliveries"]]
            out[label] = {k: v for k, v in r.items() if k != "deliveries"}
            out[label]["count"] = len(got)
            out[label]["first_body"] = got[0] if got else None
            out[label]["last_body"] = got[-1] if got else None
            out[label]["offsets_are_contiguous_and_match_bodies"] = offsets == [
                int(b[1:]) for b in got]
        last = out["last"]
        last["at_least_one_and_fewer_than_300"] = 0 < last["count"] < 300
        last["count"] = "<chunk size: varies>"
        last["first_body"] = "<start of the last chunk: varies>"
        return out


def timestamp(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


@case("stream offsets: timestamps (AMQP 'T') an hour before the first publish and in the future")
def _():
    with Probe() as p:
        q = p.stream("timestamp")
        p.publish_ten(q)
        now = int(time.time())
        return {"one hour before the first publish": summary(p.consume(
                    q, arguments={"x-stream-offset": timestamp(now - 3600)})),
                "one hour in the future": summary(p.consume(
                    q, arguments={"x-stream-offset": timestamp(now + 3600)})),
                "zero (1970)": summary(p.consume(q, arguments={"x-stream-offset": timestamp(0)}))}


@case("stream offsets: timestamp between two batches published 1.5 s apart")
def _():
    with Probe() as p:
        q = p.stream("timestamp-mid")
        ch = p.connection().channel()
        ch.confirm_delivery()
        for i in range(3):
            ch.basic_publish("", q, b"early%d" % i)
        # wait until the next whole second (+0.5 s): that second is after
        # every early message and before every late one
        time.sleep(1.5 - (time.time() % 1.0))
        boundary = int(time.time())
        time.sleep(0.5)
        for i in range(3):
            ch.basic_publish("", q, b"late%d" % i)
        ch.close()
        return {"note": "timestamp = the first whole second after the early batch",
                **summary(p.consume(q, arguments={"x-stream-offset": timestamp(boundary)}))}


@case("stream offsets: intervals '1h', '30m', '10s', '1D', '1Y', '1s', '7d', '1x'")
def _():
    with Probe() as p:
        q = p.stream("interval")
        p.publish_ten(q)
        out = {}
        for interval in ("1h", "30m", "10s", "1D", "1Y", "1s", "7d", "1x"):
            r = summary(p.consume(q, arguments={"x-stream-offset": interval}))
            r.pop("deliveries")
            out[interval] = r
        return out


@case("stream offsets: interval '1s' after waiting 2.5 s")
def _():
    with Probe() as p:
        q = p.stream("interval-old")
        p.publish_ten(q)
        time.sleep(2.5)
        r = summary(p.consume(q, arguments={"x-stream-offset": "1s"}))
        return r


@case("x-stream-offset on a classic queue consume")
def _():
    with Probe() as p:
        q = p.queue("classic")
        for i in range(3):
            p.ch.basic_publish("", q, b"c%d" % i)
        time.sleep(0.2)
        first = p.consume(q, arguments={"x-stream-offset": "first"}, ack=False)
        return {"x-stream-offset first": summary(first),
                "x-stream-offset decimal 1.5": summary(
                    p.consume(q, arguments={"x-stream-offset": decimal.Decimal("1.5")},
                              ack=False)),
                "x-stream-offset 'bad'": summary(
                    p.consume(q, arguments={"x-stream-offset": "bad"}, ack=False))}


# ------------------------------------------------------------------- acking


@case("stream acks: prefetch 3, nothing acked, then acks")
def _():
    with Probe() as p:
        q = p.stream("credit")
        p.publish_ten(q)
        ch = p.connection().channel()
        ch.basic_qos(prefetch_count=3)
        seen = []
        ch.basic_consume(q, lambda c, m, pr, b: seen.append((m.delivery_tag, b.decode())),
                         arguments={"x-stream-offset": "first"})
        p.collect(COLLECT)
        before = [b for _, b in seen]
        ch.basic_ack(seen[-1][0], multiple=True)
        p.collect(COLLECT)
        after_multiple = [b for _, b in seen][len(before):]
        ch.basic_ack(seen[-2][0])  # one of the new three: frees one credit
        p.collect(COLLECT)
        after_single = [b for _, b in seen][len(before) + len(after_multiple):]
        ch.close()
        return {"unacked_after_1s": before,
                "after_ack_multiple_of_all_three": after_multiple,
                "after_acking_one_of_the_next_three_(not_the_first)": after_single,
                "delivery_tags": [t for t, _ in seen]}


def settle_case(settle):
    with Probe() as p:
        q = p.stream("settle")
        p.publish_ten(q)
        ch = p.connection().channel()
        ch.basic_qos(prefetch_count=2)
        seen = []
        ch.basic_consume(q, lambda c, m, pr, b: seen.append((m.delivery_tag, b.decode(),
                                                             m.redelivered)),
                         arguments={"x-stream-offset": "first"})
        out = {}
        try:
            p.collect(0.5)
            out["before"] = [b for _, b, _ in seen]
            settle(ch, seen[0][0])
            p.collect(COLLECT)
            out.update(async_close(ch) or {"result": "no close"})
        except pika.exceptions.AMQPError as e:
            out.update(closed(e))
        out["after"] = [[b, r] for _, b, r in seen][len(out.get("before", [])):]
        out["channel_open"] = ch.is_open
        if ch.is_open:
            ch.close()
        return out


@case("stream acks: basic.nack requeue=true")
def _():
    return settle_case(lambda ch, tag: ch.basic_nack(tag, requeue=True))


@case("stream acks: basic.nack requeue=false")
def _():
    return settle_case(lambda ch, tag: ch.basic_nack(tag, requeue=False))


@case("stream acks: basic.reject requeue=true")
def _():
    return settle_case(lambda ch, tag: ch.basic_reject(tag, requeue=True))


@case("stream acks: basic.reject requeue=false")
def _():
    return settle_case(lambda ch, tag: ch.basic_reject(tag, requeue=False))


@case("stream acks: basic.recover requeue=true")
def _():
    return settle_case(lambda ch, tag: ch.basic_recover(requeue=True))


@case("stream acks: basic.ack of an unknown delivery tag")
def _():
    return settle_case(lambda ch, tag: ch.basic_ack(tag + 1000))


# ------------------------------------------------------ purge, passive, delete


def passive(p, q):
    try:
        ok = p.channel().queue_declare(q, passive=True).method
        return {"result": "declare-ok", "message_count": ok.message_count,
                "consumer_count": ok.consumer_count}
    except pika.exceptions.AMQPError as e:
        return closed(e)


def delete(p, q, **kwargs):
    try:
        ok = p.channel().queue_delete(q, **kwargs).method
        return {"result": "delete-ok", "message_count": ok.message_count}
    except pika.exceptions.AMQPError as e:
        return closed(e)


@case("stream: queue.purge and passive declare (12 messages, then a consumer)")
def _():
    with Probe() as p:
        q = p.stream("admin")
        p.publish_ten(q)
        ch = p.connection().channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, b"m10")
        ch.basic_publish("", q, b"m11")
        ch.close()
        consumer_count = passive(p, q)["consumer_count"]
        out = {"note": "message_count is read once it is stable (RabbitMQ updates it about "
                       "once a second; right after publishing it reads 0)",
               "passive_declare": {"message_count": p.message_count(q),
                                   "consumer_count": consumer_count}}
        try:
            out["purge"] = {"result": "purge-ok",
                            "message_count": p.channel().queue_purge(q).method.message_count}
        except pika.exceptions.AMQPError as e:
            out["purge"] = closed(e)
        out["message_count_after_purge"] = p.message_count(q)
        cch = p.connection().channel()
        cch.basic_qos(prefetch_count=5)
        cch.basic_consume(q, lambda *_: None, arguments={"x-stream-offset": "first"})
        p.collect(0.3)
        consumer_count = passive(p, q)["consumer_count"]
        p.collect(1.5)
        out["passive_declare_with_a_consumer_holding_5_unacked"] = {
            "message_count": p.message_count(q),
            "consumer_count (at once, after 1.5 s)": [
                consumer_count, passive(p, q)["consumer_count"]]}
        cch.close()
        return out


@case("stream: queue.delete if_empty, if_unused (with a consumer), plain")
def _():
    with Probe() as p:
        out = {}
        q = p.stream("if-empty")
        p.publish_ten(q)
        out["if_empty right after publishing 10"] = delete(p, q, if_empty=True)
        out["passive after if_empty"] = passive(p, q)
        q = p.stream("if-empty-settled")
        p.publish_ten(q)
        out["if_empty: settled message_count"] = p.message_count(q)
        out["if_empty once message_count settled"] = delete(p, q, if_empty=True)
        out["passive after settled if_empty"] = passive(p, q)

        q = p.stream("if-unused")
        p.publish_ten(q)
        cch = p.connection().channel()
        cancelled = []
        cch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.NAME))
        cch.basic_qos(prefetch_count=5)
        cch.basic_consume(q, lambda *_: None, arguments={"x-stream-offset": "first"})
        p.collect(0.3)
        out["if_unused with a consumer"] = delete(p, q, if_unused=True)
        p.collect(0.5)
        out["consumer after it"] = {"cancel_received": cancelled,
                                    "channel_open": cch.is_open}
        out["passive after if_unused"] = passive(p, q)
        if cch.is_open:
            cch.close()

        q = p.stream("plain")
        p.publish_ten(q)
        p.message_count(q)
        out["plain delete with 10 messages (count settled)"] = delete(p, q)
        out["passive after plain delete"] = passive(p, q)
        out["delete again"] = delete(p, q)
        return out


# ----------------------------------------------------------------- filtering


@case("stream filtering: x-stream-filter-value on publish, x-stream-filter on consume")
def _():
    with Probe() as p:
        q = p.stream("filter", {"x-stream-filter-size-bytes": 32})
        ch = p.connection().channel()
        ch.confirm_delivery()
        published = []
        for i, value in enumerate(["a", "b", None, "a", "b", None]):
            body = "f%d-%s" % (i, value or "none")
            headers = {"x-stream-filter-value": value} if value else None
            ch.basic_publish("", q, body.encode(), pika.BasicProperties(headers=headers))
            published.append(body)
        ch.close()
        out = {"published": published}
        for label, arguments in (
                ("x-stream-filter 'a'", {"x-stream-filter": "a"}),
                ("x-stream-filter ['a','b']", {"x-stream-filter": ["a", "b"]}),
                ("x-stream-filter 'a' + x-stream-match-unfiltered true",
                 {"x-stream-filter": "a", "x-stream-match-unfiltered": True}),
                ("x-stream-match-unfiltered true alone", {"x-stream-match-unfiltered": True}),
                ("x-stream-filter 5 (integer)", {"x-stream-filter": 5})):
            r = summary(p.consume(q, arguments=dict({"x-stream-offset": "first"}, **arguments)))
            r["other_headers"] = [d["other_headers"] for d in r.pop("deliveries")]
            out[label] = r
        return out


# --------------------------------------------------------------- publishing


@case("stream publishing: mandatory, persistent and transient, confirms")
def _():
    with Probe() as p:
        q = p.stream("publish")
        ch = p.connection().channel()
        ch.confirm_delivery()
        confirms = {
            "mandatory": publish_outcome(ch, "", q, b"mandatory", mandatory=True),
            "persistent (delivery_mode 2)": publish_outcome(
                ch, "", q, b"persistent", pika.BasicProperties(delivery_mode=2)),
            "transient (delivery_mode 1)": publish_outcome(
                ch, "", q, b"transient", pika.BasicProperties(delivery_mode=1)),
            "mandatory to a missing queue": publish_outcome(
                ch, "", "st-missing-queue", b"nowhere", mandatory=True),
        }
        ch.close()
        result = p.consume(q, arguments={"x-stream-offset": "first"}, full=True)
        return {"confirms": confirms, "bodies": bodies(result), **result}


@case("stream publishing: through a fanout exchange bound to a stream and a classic queue")
def _():
    with Probe() as p:
        x = p.exchange("fanout")
        s = p.stream("bound")
        c = p.queue("classic")
        p.ch.queue_bind(s, x)
        p.ch.queue_bind(c, x)
        ch = p.connection().channel()
        ch.confirm_delivery()
        confirms = [publish_outcome(ch, x, "rk", b"fan%d" % i) for i in range(3)]
        ch.close()
        result = summary(p.consume(s, arguments={"x-stream-offset": "first"}))
        return {"confirms": confirms, "stream": result, "classic_queue": p.drain(c)}


# ---------------------------------------------------------------- retention


@case("stream retention: x-max-length-bytes=10000, segments of 2000 bytes, 100 x 500 bytes")
def _():
    with Probe() as p:
        q = p.stream("retention", {"x-max-length-bytes": 10000,
                                   "x-stream-max-segment-size-bytes": 2000})
        ch = p.connection().channel()
        ch.confirm_delivery()
        for i in range(100):
            ch.basic_publish("", q, (b"%03d-" % i) + b"x" * 496)
            # without a pause, retention (run after each segment roll) can
            # race the writer and keep one segment more in some runs
            time.sleep(0.02)
        ch.close()
        time.sleep(1.0)
        r = p.consume(q, arguments={"x-stream-offset": "first"}, collect=2.0)
        offsets = [d.get("x-stream-offset") for d in r.get("deliveries", [])]
        return {"published": 100, "received": len(offsets),
                "bodies_prefixes": [d["body"][:3] for d in r["deliveries"]],
                "offsets": offsets,
                "first_offset": offsets[0] if offsets else None,
                "last_offset": offsets[-1] if offsets else None,
                "first_body_prefix": r["deliveries"][0]["body"][:4] if offsets else None,
                "contiguous": offsets == list(range(offsets[0], offsets[0] + len(offsets)))
                if offsets else None,
                "passive_declare_message_count": p.message_count(q)}


# --------------------------------------------------------------------- output


def normalise(value):
    value = queue_features.normalise(value)
    if isinstance(value, dict):
        return {normalise(k): normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"\b(st-[\w.-]+?)-[0-9a-f]{8}\b", r"\1", value)
    return value


if __name__ == "__main__":
    queue_features.write(queue_features.run(CASES, normalise))
