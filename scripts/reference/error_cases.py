#!/usr/bin/env python3
"""Records a broker's exact behaviour for AMQP error cases.

    REF_PORT=5673 python3 scripts/reference/error_cases.py [--json]

Prints a markdown table (or JSON) with, for each case, the close scope
(channel/connection), reply code, exact reply_text and class/method ids.
Run against RabbitMQ (scripts/rabbitmq.sh start) to get the reference, and
against Warren (REF_PORT=5672) to compare.
"""

import json
import sys
import uuid

import pika.spec as spec

from amqp_raw import RawClient, connected, describe, Closed

CASES = []


def case(title):
    def register(fn):
        CASES.append((title, fn))
        return fn
    return register


def uniq(prefix="ref"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def result_or_close(frame):
    if isinstance(frame.method, (spec.Channel.Close, spec.Connection.Close)):
        return describe(frame)
    return {"result": frame.method.NAME}


def socket_outcome(c, timeout=10.0):
    data, secs, how = c.wait_socket_close(timeout)
    if data:
        return {"result": "received %r, then socket %s" % (
            data, "closed (%s) after %.1fs" % (how, secs) if secs is not None else "left open")}
    if secs is None:
        return {"result": "nothing received; socket still open after %.0fs" % timeout}
    return {"result": "no AMQP frame; server closed TCP (%s) after %.1fs" % (how, secs)}


def tune_ok_outcome(channel_max, frame_max, heartbeat=0):
    c = RawClient()
    c.send_raw(b"AMQP\x00\x00\x09\x01")
    c.recv_frame()
    c.send_method(0, spec.Connection.StartOk(
        client_properties={"capabilities": {"authentication_failure_close": True}},
        mechanism="PLAIN", response=b"\x00guest\x00guest"))
    c.recv_frame()
    c.send_method(0, spec.Connection.TuneOk(
        channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat))
    return socket_outcome(c)


def close_of(c, method, channel=1):
    c.send_method(channel, method)
    return describe(c.wait_close())


def cleanup_queue(name):
    c = connected()
    c.call(1, spec.Queue.Delete(queue=name))
    c.close()


def cleanup_exchange(name):
    c = connected()
    c.call(1, spec.Exchange.Delete(exchange=name))
    c.close()


# ------------------------------------------------------------------ declares


@case("queue.declare passive, missing queue")
def _():
    c = connected()
    q = "missing-queue"
    return close_of(c, spec.Queue.Declare(queue=q, passive=True))


@case("exchange.declare passive, missing exchange")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Declare(exchange="missing-exchange", passive=True))


@case("queue.declare inequivalent durable (declared durable=false, redeclared durable=true)")
def _():
    c = connected()
    q = "ref-q-durable"
    c.call(1, spec.Queue.Declare(queue=q, durable=False))
    r = close_of(c, spec.Queue.Declare(queue=q, durable=True))
    cleanup_queue(q)
    return r


@case("queue.declare inequivalent durable (declared durable=true, redeclared durable=false)")
def _():
    c = connected()
    q = "ref-q-durable2"
    c.call(1, spec.Queue.Declare(queue=q, durable=True))
    r = close_of(c, spec.Queue.Declare(queue=q, durable=False))
    cleanup_queue(q)
    return r


@case("queue.declare inequivalent exclusive/auto_delete (auto_delete false -> true)")
def _():
    c = connected()
    q = "ref-q-autodel"
    c.call(1, spec.Queue.Declare(queue=q))
    r = close_of(c, spec.Queue.Declare(queue=q, auto_delete=True))
    cleanup_queue(q)
    return r


@case("queue.declare exclusive=true for an existing non-exclusive queue (same connection)")
def _():
    c = connected()
    q = "ref-q-excl-mismatch"
    c.call(1, spec.Queue.Declare(queue=q))
    r = close_of(c, spec.Queue.Declare(queue=q, exclusive=True))
    cleanup_queue(q)
    return r


@case("queue.declare with durable, auto_delete and x-max-length all different (check order)")
def _():
    c = connected()
    q = "ref-q-order"
    c.call(1, spec.Queue.Declare(queue=q, arguments={"x-max-length": 10}))
    r = close_of(c, spec.Queue.Declare(queue=q, durable=True, auto_delete=True,
                                       arguments={"x-max-length": 20}))
    cleanup_queue(q)
    return r


@case("queue.declare inequivalent arg x-max-length (10 -> 20)")
def _():
    c = connected()
    q = "ref-q-maxlen"
    c.call(1, spec.Queue.Declare(queue=q, arguments={"x-max-length": 10}))
    r = close_of(c, spec.Queue.Declare(queue=q, arguments={"x-max-length": 20}))
    cleanup_queue(q)
    return r


@case("queue.declare inequivalent arg x-max-length (10 -> absent)")
def _():
    c = connected()
    q = "ref-q-maxlen2"
    c.call(1, spec.Queue.Declare(queue=q, arguments={"x-max-length": 10}))
    r = close_of(c, spec.Queue.Declare(queue=q, arguments={}))
    cleanup_queue(q)
    return r


@case("queue.declare inequivalent arg x-max-length (absent -> 10)")
def _():
    c = connected()
    q = "ref-q-maxlen3"
    c.call(1, spec.Queue.Declare(queue=q))
    r = close_of(c, spec.Queue.Declare(queue=q, arguments={"x-max-length": 10}))
    cleanup_queue(q)
    return r


@case("queue.declare passive ignores args/flags of existing queue (durable=true, x-max-length=99)")
def _():
    c = connected()
    q = "ref-q-passive"
    c.call(1, spec.Queue.Declare(queue=q))
    r = c.call(1, spec.Queue.Declare(queue=q, passive=True, durable=True,
                                     arguments={"x-max-length": 99}))
    cleanup_queue(q)
    return {"result": r.method.NAME + " (queue=%s message_count=%d consumer_count=%d)"
            % ("ref-q-passive", r.method.message_count, r.method.consumer_count)}


@case("queue.declare x-max-length with a string value")
def _():
    c = connected()
    return close_of(c, spec.Queue.Declare(queue="ref-q-badarg",
                                          arguments={"x-max-length": "ten"}))


@case("queue.declare name with reserved prefix amq.")
def _():
    c = connected()
    return close_of(c, spec.Queue.Declare(queue="amq.custom"))


@case("exchange.declare existing exchange with different type (direct -> topic)")
def _():
    c = connected()
    x = "ref-x-type"
    c.call(1, spec.Exchange.Declare(exchange=x, type="direct"))
    r = close_of(c, spec.Exchange.Declare(exchange=x, type="topic"))
    cleanup_exchange(x)
    return r


@case("exchange.declare existing exchange with different durable")
def _():
    c = connected()
    x = "ref-x-durable"
    c.call(1, spec.Exchange.Declare(exchange=x, type="direct", durable=False))
    r = close_of(c, spec.Exchange.Declare(exchange=x, type="direct", durable=True))
    cleanup_exchange(x)
    return r


@case("exchange.declare unknown type")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Declare(exchange="ref-x-badtype", type="nosuchtype"))


@case("exchange.declare name starting amq. (new, non-passive)")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Declare(exchange="amq.custom", type="direct"))


@case("exchange.declare amq.direct (existing, same type, durable=true, non-passive)")
def _():
    c = connected()
    r = c.call(1, spec.Exchange.Declare(exchange="amq.direct", type="direct", durable=True))
    return {"result": r.method.NAME}


@case("exchange.declare default exchange \"\" (non-passive)")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Declare(exchange="", type="direct", durable=True))


@case("exchange.declare default exchange \"\" passive")
def _():
    c = connected()
    r = c.call(1, spec.Exchange.Declare(exchange="", type="direct", passive=True))
    return result_or_close(r)


# ------------------------------------------------------------------ bindings


@case("queue.bind to missing exchange")
def _():
    c = connected()
    q = "ref-q-bind"
    c.call(1, spec.Queue.Declare(queue=q))
    r = close_of(c, spec.Queue.Bind(queue=q, exchange="missing-exchange", routing_key="k"))
    cleanup_queue(q)
    return r


@case("queue.bind missing queue to existing exchange")
def _():
    c = connected()
    return close_of(c, spec.Queue.Bind(queue="missing-queue", exchange="amq.direct",
                                       routing_key="k"))


@case("queue.bind missing queue to missing exchange")
def _():
    c = connected()
    return close_of(c, spec.Queue.Bind(queue="missing-queue", exchange="missing-exchange",
                                       routing_key="k"))


@case("queue.bind to default exchange \"\"")
def _():
    c = connected()
    q = "ref-q-bind-default"
    c.call(1, spec.Queue.Declare(queue=q))
    r = close_of(c, spec.Queue.Bind(queue=q, exchange="", routing_key="k"))
    cleanup_queue(q)
    return r


@case("queue.unbind from default exchange \"\"")
def _():
    c = connected()
    q = "ref-q-unbind-default"
    c.call(1, spec.Queue.Declare(queue=q))
    r = close_of(c, spec.Queue.Unbind(queue=q, exchange="", routing_key=q))
    cleanup_queue(q)
    return r


@case("queue.unbind of a binding that does not exist (queue and exchange exist)")
def _():
    c = connected()
    q = "ref-q-unbind"
    c.call(1, spec.Queue.Declare(queue=q))
    r = c.call(1, spec.Queue.Unbind(queue=q, exchange="amq.direct", routing_key="nope"))
    cleanup_queue(q)
    return {"result": r.method.NAME}


@case("queue.unbind with missing exchange")
def _():
    c = connected()
    q = "ref-q-unbind2"
    c.call(1, spec.Queue.Declare(queue=q))
    r = c.send_method(1, spec.Queue.Unbind(queue=q, exchange="missing-exchange", routing_key="k"))
    frame = c.next_method()
    cleanup_queue(q)
    if isinstance(frame.method, (spec.Channel.Close, spec.Connection.Close)):
        return describe(frame)
    return {"result": frame.method.NAME}


@case("exchange.bind to missing source exchange")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Bind(destination="amq.fanout", source="missing-exchange",
                                          routing_key="k"))


# ------------------------------------------------------------------ publish


@case("basic.publish to missing exchange")
def _():
    c = connected()
    c.publish(1, "missing-exchange", "rk", b"x")
    return describe(c.wait_close())


@case("basic.publish mandatory, unroutable (basic.return)")
def _():
    c = connected()
    c.publish(1, "", "no-such-queue-" + uuid.uuid4().hex[:6], b"x", mandatory=True)
    frame = c.recv_frame()
    m = frame.method
    return {"result": "%s reply_code=%d reply_text=%r exchange=%r"
            % (m.NAME, m.reply_code, m.reply_text, m.exchange)}


@case("basic.publish immediate=true")
def _():
    c = connected()
    c.publish(1, "", "whatever", b"x", immediate=True)
    return describe(c.wait_close())


@case("basic.publish user_id different from authenticated user")
def _():
    c = connected()
    c.publish(1, "", "whatever", b"x", props=spec.BasicProperties(user_id="mallory"))
    return describe(c.wait_close())


@case("basic.publish to internal exchange")
def _():
    c = connected()
    x = "ref-x-internal"
    c.call(1, spec.Exchange.Declare(exchange=x, type="fanout", internal=True))
    c.publish(1, x, "k", b"x")
    r = describe(c.wait_close())
    cleanup_exchange(x)
    return r


# ------------------------------------------------------------------ acks


@case("basic.ack unknown delivery tag (999)")
def _():
    c = connected()
    return close_of(c, spec.Basic.Ack(delivery_tag=999))


@case("basic.ack unknown delivery tag with multiple=true (999)")
def _():
    c = connected()
    return close_of(c, spec.Basic.Ack(delivery_tag=999, multiple=True))


@case("basic.ack delivery_tag=0 multiple=true with nothing outstanding")
def _():
    c = connected()
    c.send_method(1, spec.Basic.Ack(delivery_tag=0, multiple=True))
    r = c.call(1, spec.Basic.Qos(prefetch_count=1))
    if isinstance(r.method, (spec.Channel.Close, spec.Connection.Close)):
        return describe(r)
    return {"result": "no error (next sync call answered %s)" % r.method.NAME}


@case("basic.ack same delivery tag twice")
def _():
    c = connected()
    q = uniq()
    c.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c.publish(1, "", q, b"x")
    c.call(1, spec.Basic.Get(queue=q))
    c.send_method(1, spec.Basic.Ack(delivery_tag=1))
    return close_of(c, spec.Basic.Ack(delivery_tag=1))


@case("basic.reject unknown delivery tag (999)")
def _():
    c = connected()
    return close_of(c, spec.Basic.Reject(delivery_tag=999))


@case("basic.nack unknown delivery tag (999)")
def _():
    c = connected()
    return close_of(c, spec.Basic.Nack(delivery_tag=999))


# ------------------------------------------------------------------ consumers


@case("basic.consume reusing a consumer tag on the same channel")
def _():
    c = connected()
    q = uniq()
    c.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c.call(1, spec.Basic.Consume(queue=q, consumer_tag="ctag"))
    return close_of(c, spec.Basic.Consume(queue=q, consumer_tag="ctag"))


@case("basic.consume on missing queue")
def _():
    c = connected()
    return close_of(c, spec.Basic.Consume(queue="missing-queue"))


@case("basic.get on missing queue")
def _():
    c = connected()
    return close_of(c, spec.Basic.Get(queue="missing-queue"))


@case("basic.consume exclusive=true on a queue that already has a consumer")
def _():
    c = connected()
    q = "ref-q-excl-consume"
    c.call(1, spec.Queue.Declare(queue=q))
    c.call(1, spec.Basic.Consume(queue=q, consumer_tag="first"))
    c2 = connected()
    r = close_of(c2, spec.Basic.Consume(queue=q, exclusive=True))
    c.close()
    cleanup_queue(q)
    return r


@case("basic.consume on a queue that has an exclusive consumer")
def _():
    c = connected()
    q = "ref-q-excl-consume2"
    c.call(1, spec.Queue.Declare(queue=q))
    c.call(1, spec.Basic.Consume(queue=q, consumer_tag="first", exclusive=True))
    c2 = connected()
    r = close_of(c2, spec.Basic.Consume(queue=q))
    c.close()
    cleanup_queue(q)
    return r


@case("basic.consume on an exclusive queue from another connection")
def _():
    owner = connected()
    q = "ref-q-exclusive"
    owner.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c = connected()
    r = close_of(c, spec.Basic.Consume(queue=q))
    owner.close()
    return r


@case("queue.declare passive of an exclusive queue from another connection")
def _():
    owner = connected()
    q = "ref-q-exclusive2"
    owner.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c = connected()
    r = close_of(c, spec.Queue.Declare(queue=q, passive=True))
    owner.close()
    return r


@case("queue.declare (non-passive) of an exclusive queue from another connection")
def _():
    owner = connected()
    q = "ref-q-exclusive3"
    owner.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c = connected()
    r = close_of(c, spec.Queue.Declare(queue=q, exclusive=True))
    owner.close()
    return r


@case("basic.get on an exclusive queue from another connection")
def _():
    owner = connected()
    q = "ref-q-exclusive4"
    owner.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c = connected()
    r = close_of(c, spec.Basic.Get(queue=q))
    owner.close()
    return r


@case("queue.delete of an exclusive queue from another connection")
def _():
    owner = connected()
    q = "ref-q-exclusive5"
    owner.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c = connected()
    r = close_of(c, spec.Queue.Delete(queue=q))
    owner.close()
    return r


@case("basic.cancel of an unknown consumer tag")
def _():
    c = connected()
    r = c.call(1, spec.Basic.Cancel(consumer_tag="nope"))
    return {"result": "%s consumer_tag=%r" % (r.method.NAME, r.method.consumer_tag)}


# ------------------------------------------------------------------ deletes


@case("queue.delete if_unused=true, queue has a consumer")
def _():
    c = connected()
    q = "ref-q-inuse"
    c.call(1, spec.Queue.Declare(queue=q))
    c.call(1, spec.Basic.Consume(queue=q, consumer_tag="c1"))
    r = close_of(c, spec.Queue.Delete(queue=q, if_unused=True))
    cleanup_queue(q)
    return r


@case("queue.delete if_empty=true, queue has messages")
def _():
    c = connected()
    q = "ref-q-notempty"
    c.call(1, spec.Queue.Declare(queue=q))
    c.publish(1, "", q, b"x")
    r = close_of(c, spec.Queue.Delete(queue=q, if_empty=True))
    cleanup_queue(q)
    return r


@case("queue.delete of a missing queue")
def _():
    c = connected()
    r = c.call(1, spec.Queue.Delete(queue="missing-queue"))
    if isinstance(r.method, (spec.Channel.Close, spec.Connection.Close)):
        return describe(r)
    return {"result": "%s message_count=%d" % (r.method.NAME, r.method.message_count)}


@case("queue.purge of a missing queue")
def _():
    c = connected()
    return close_of(c, spec.Queue.Purge(queue="missing-queue"))


@case("exchange.delete if_unused=true, exchange has bindings")
def _():
    c = connected()
    x, q = "ref-x-inuse", "ref-q-xinuse"
    c.call(1, spec.Exchange.Declare(exchange=x, type="direct"))
    c.call(1, spec.Queue.Declare(queue=q, exclusive=True))
    c.call(1, spec.Queue.Bind(queue=q, exchange=x, routing_key="k"))
    r = close_of(c, spec.Exchange.Delete(exchange=x, if_unused=True))
    cleanup_exchange(x)
    return r


@case("exchange.delete of a missing exchange")
def _():
    c = connected()
    r = c.call(1, spec.Exchange.Delete(exchange="missing-exchange"))
    if isinstance(r.method, (spec.Channel.Close, spec.Connection.Close)):
        return describe(r)
    return {"result": r.method.NAME}


@case("exchange.delete default exchange \"\"")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Delete(exchange=""))


@case("exchange.delete amq.direct")
def _():
    c = connected()
    return close_of(c, spec.Exchange.Delete(exchange="amq.direct"))


# ------------------------------------------------------------------ qos / tx / confirm


@case("basic.qos prefetch_size=1 (non-zero)")
def _():
    c = connected()
    return close_of(c, spec.Basic.Qos(prefetch_size=1, prefetch_count=10))


@case("confirm.select on a channel in tx mode")
def _():
    c = connected()
    c.call(1, spec.Tx.Select())
    return close_of(c, spec.Confirm.Select())


@case("tx.select on a channel in confirm mode")
def _():
    c = connected()
    c.call(1, spec.Confirm.Select())
    return close_of(c, spec.Tx.Select())


@case("tx.commit without tx.select")
def _():
    c = connected()
    return close_of(c, spec.Tx.Commit())


@case("tx.rollback without tx.select")
def _():
    c = connected()
    return close_of(c, spec.Tx.Rollback())


# ------------------------------------------------------------------ direct reply-to


@case("publish with reply_to=amq.rabbitmq.reply-to without a reply consumer")
def _():
    c = connected()
    c.publish(1, "", "some-queue", b"x",
              props=spec.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    return describe(c.wait_close())


@case("basic.consume amq.rabbitmq.reply-to with no_ack=false")
def _():
    c = connected()
    return close_of(c, spec.Basic.Consume(queue="amq.rabbitmq.reply-to", no_ack=False))


@case("basic.consume amq.rabbitmq.reply-to twice on one channel (no_ack=true)")
def _():
    c = connected()
    c.call(1, spec.Basic.Consume(queue="amq.rabbitmq.reply-to", no_ack=True, consumer_tag="a"))
    return close_of(c, spec.Basic.Consume(queue="amq.rabbitmq.reply-to", no_ack=True,
                                          consumer_tag="b"))


@case("queue.declare passive amq.rabbitmq.reply-to")
def _():
    c = connected()
    r = c.call(1, spec.Queue.Declare(queue="amq.rabbitmq.reply-to", passive=True))
    if isinstance(r.method, (spec.Channel.Close, spec.Connection.Close)):
        return describe(r)
    m = r.method
    return {"result": "%s queue=%r message_count=%d consumer_count=%d"
            % (m.NAME, m.queue, m.message_count, m.consumer_count)}


@case("publish to a stale/unknown amq.rabbitmq.reply-to.* name")
def _():
    c = connected()
    c.publish(1, "", "amq.rabbitmq.reply-to.g1hkABCDEF", b"x", mandatory=True)
    frame = c.next_method(timeout=2)
    if isinstance(frame.method, spec.Basic.Return):
        m = frame.method
        return {"result": "%s reply_code=%d reply_text=%r routing_key=%r (channel stays open)"
                % (m.NAME, m.reply_code, m.reply_text, m.routing_key)}
    return result_or_close(frame)


# ------------------------------------------------------------------ channels


@case("channel.open on a channel number that is already open")
def _():
    c = connected()
    return close_of(c, spec.Channel.Open())


@case("method on a channel that was never opened (queue.declare on channel 5)")
def _():
    c = connected()
    return close_of(c, spec.Queue.Declare(queue="", exclusive=True), channel=5)


@case("channel.open with channel number 2048 (> channel_max 2047)")
def _():
    c = connected(channel=0)
    r = c.call(c.tune.channel_max + 1, spec.Channel.Open())
    return result_or_close(r)


@case("channel.open beyond negotiated channel_max=2 (third channel, numbers 1,2,3)")
def _():
    c = RawClient()
    assert isinstance(c.handshake(channel_max=2).method, spec.Connection.OpenOk)
    c.open_channel(1)
    c.open_channel(2)
    return close_of(c, spec.Channel.Open(), channel=3)


@case("tune-ok with channel_max=0 (client asks for no limit)")
def _():
    return tune_ok_outcome(channel_max=0, frame_max=131072)


@case("tune-ok with channel_max above server's 2047 (4000)")
def _():
    return tune_ok_outcome(channel_max=4000, frame_max=131072)


@case("tune-ok with frame_max=0 (client asks for no limit)")
def _():
    return tune_ok_outcome(channel_max=2047, frame_max=0)


# ------------------------------------------------------------------ connection


@case("connection.open to a non-existent vhost")
def _():
    c = RawClient()
    reply = c.handshake(vhost="no-such-vhost")
    return describe(reply)


@case("login with wrong password, authentication_failure_close=true")
def _():
    c = RawClient()
    reply = c.handshake(password="wrong")
    if isinstance(reply.method, spec.Connection.Close):
        return describe(reply)
    return {"result": reply.method.NAME}


@case("login with wrong password, no authentication_failure_close capability")
def _():
    c = RawClient()
    c.send_raw(b"AMQP\x00\x00\x09\x01")
    c.recv_frame()
    c.send_method(0, spec.Connection.StartOk(
        client_properties={"capabilities": {}}, mechanism="PLAIN",
        response=b"\x00guest\x00wrong"))
    return socket_outcome(c)


@case("login with unknown user, authentication_failure_close=true")
def _():
    c = RawClient()
    reply = c.handshake(user="nobody", password="x")
    return describe(reply)


@case("start-ok with unsupported mechanism (AMQPLAIN-XYZ)")
def _():
    c = RawClient()
    c.send_raw(b"AMQP\x00\x00\x09\x01")
    c.recv_frame()
    c.send_method(0, spec.Connection.StartOk(
        client_properties={"capabilities": {"authentication_failure_close": True}},
        mechanism="AMQPLAIN-XYZ", response=b"x"))
    return socket_outcome(c)


@case("tune-ok with frame_max below 4096 (1024)")
def _():
    return tune_ok_outcome(channel_max=2047, frame_max=1024)


@case("tune-ok with frame_max above server's 131072 (262144)")
def _():
    return tune_ok_outcome(channel_max=2047, frame_max=262144)


@case("body frame larger than negotiated frame_max")
def _():
    c = connected()
    body = b"x" * 200000
    c.publish(1, "", "whatever", body, frame_max=len(body) + 8)
    try:
        return describe(c.wait_close())
    except Closed:
        return {"result": "TCP connection closed without any AMQP frame"}


@case("content body frame without a preceding publish (unexpected frame)")
def _():
    c = connected()
    import pika.frame
    c.send_raw(pika.frame.Body(1, b"stray").marshal())
    return describe(c.wait_close())


@case("frame with bad frame-end octet")
def _():
    c = connected()
    import pika.frame
    data = bytearray(pika.frame.Method(1, spec.Basic.Qos(prefetch_count=1)).marshal())
    data[-1] = 0x00
    c.send_raw(bytes(data))
    try:
        return describe(c.wait_close())
    except Closed:
        return {"result": "TCP connection closed without any AMQP frame"}


def run():
    results = []
    for title, fn in CASES:
        try:
            r = fn()
        except Exception as e:  # record probe failures instead of aborting
            r = {"result": "probe error: %s: %s" % (type(e).__name__, e)}
        r["case"] = title
        results.append(r)
    return results


def markdown(results):
    lines = ["| Case | Closes | Code | reply_text | class.method |",
             "|---|---|---|---|---|"]
    for r in results:
        if "reply_code" in r:
            lines.append("| %s | %s | %d | `%s` | %d.%d (%s) |" % (
                r["case"], r["scope"], r["reply_code"],
                r["reply_text"].replace("|", "\\|"),
                r["class_id"], r["method_id"], r["method"] or "-"))
        else:
            lines.append("| %s | no close | - | %s | - |" % (
                r["case"], r["result"].replace("|", "\\|")))
    return "\n".join(lines)


if __name__ == "__main__":
    res = run()
    if "--json" in sys.argv:
        print(json.dumps(res, indent=2))
    else:
        print(markdown(res))
