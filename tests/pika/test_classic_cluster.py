"""Classic queues on a three-node Warren cluster, through pika: a queue
lives on the node that declared it and is reachable from every node, as in
a RabbitMQ cluster.

Starts its own three `warren` processes (see test_quorum_cluster.py).
"""

import time
import uuid

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from test_quorum_cluster import BINARY, cluster, connect, consume_all, eventually  # noqa: F401

pytestmark = pytest.mark.skipif(not BINARY.exists(), reason="no warren binary to start a cluster with")


def passive(node, name):
    """(messages, consumers) of `name` as `node` answers a passive declare,
    or the reply code it refused it with."""
    conn = connect(node["amqp"])
    try:
        ok = conn.channel().queue_declare(name, passive=True)
        return (ok.method.message_count, ok.method.consumer_count)
    except ChannelClosedByBroker as e:
        return e.reply_code
    finally:
        if conn.is_open:
            conn.close()


def publish(node, exchange, key, bodies, mandatory=True):
    """Publishes persistent messages with confirms (raises on a nack or,
    mandatory, on an unroutable message)."""
    conn = connect(node["amqp"])
    ch = conn.channel()
    ch.confirm_delivery()
    for body in bodies:
        ch.basic_publish(exchange, key, body.encode(), pika.BasicProperties(delivery_mode=2), mandatory=mandatory)
    conn.close()


def receive(conn, got, count):
    """Serves `conn` until its consumers filled `got` with `count` bodies
    (10 s at most)."""
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)


def test_a_classic_queue_is_reachable_through_every_node(cluster):
    home, second, third = cluster.nodes
    name = "jobs-" + uuid.uuid4().hex[:8]
    conn = connect(home["amqp"])
    conn.channel().queue_declare(name, durable=True)
    conn.close()

    # The other nodes know it once they applied its placement.
    eventually("the second node knows the queue", lambda: passive(second, name) == (0, 0), timeout=5)
    eventually("the third node knows the queue", lambda: passive(third, name) == (0, 0), timeout=5)

    # Published through the second node (mandatory: routed by the default
    # exchange to the queue there), confirmed once stored on its home.
    publish(second, "", name, ["m%d" % i for i in range(200)])
    assert passive(home, name) == (200, 0)
    # Every node reports the home node's counts.
    assert passive(third, name) == (200, 0)

    # basic.get through the second node: acked, rejected back into the
    # queue, left unsettled on a channel that closes (back too), no-ack.
    conn = connect(second["amqp"])
    ch = conn.channel()
    method, _, body = ch.basic_get(name)
    assert (body, method.redelivered, method.message_count) == (b"m0", False, 199)
    ch.basic_ack(method.delivery_tag)
    method, _, body = ch.basic_get(name)
    assert body == b"m1"
    ch.basic_reject(method.delivery_tag, requeue=True)
    other = conn.channel()
    method, _, body = other.basic_get(name)
    assert (body, method.redelivered) == (b"m1", True)
    other.close()
    method, _, body = ch.basic_get(name, auto_ack=True)
    assert (body, method.redelivered) == (b"m1", True)
    conn.close()
    eventually("the home node settled the gets", lambda: passive(home, name) == (198, 0), timeout=5)

    # Consumed through the third node, in order.
    got = consume_all(third["amqp"], name, 198)
    assert [body for body, _ in got] == ["m%d" % i for i in range(2, 200)]
    assert not any(redelivered for _, redelivered in got)
    eventually("the home node has no message left", lambda: passive(home, name) == (0, 0), timeout=5)

    # A binding made through the second node routes on every node.
    conn = connect(second["amqp"])
    conn.channel().queue_bind(name, "amq.topic", routing_key="jobs.#")
    conn.close()

    def routes(node, body):
        try:
            publish(node, "amq.topic", "jobs.new", [body])
            return True
        except pika.exceptions.UnroutableError:
            return False

    eventually("the third node routes by the binding", lambda: routes(third, "via-third"), timeout=5)
    assert routes(home, "via-home")
    assert sorted(body for body, _ in consume_all(home["amqp"], name, 2)) == ["via-home", "via-third"]

    # Purged through the third node: its home node purges it.
    publish(second, "", name, ["purged-%d" % i for i in range(7)])
    conn = connect(third["amqp"])
    assert conn.channel().queue_purge(name).method.message_count == 7
    conn.close()
    assert passive(home, name) == (0, 0)

    # Deleted through the second node, its home node checks if-empty and
    # counts what it deleted; then it is gone on every node.
    publish(third, "", name, ["left-%d" % i for i in range(3)])
    conn = connect(second["amqp"])
    with pytest.raises(ChannelClosedByBroker) as refused:
        conn.channel().queue_delete(name, if_empty=True)
    assert refused.value.reply_code == 406 and "not empty" in refused.value.reply_text
    assert conn.channel().queue_delete(name).method.message_count == 3
    conn.close()
    assert passive(second, name) == 404
    eventually("the home node deleted the queue", lambda: passive(home, name) == 404, timeout=5)
    eventually("the third node forgot the queue", lambda: passive(third, name) == 404, timeout=5)


def test_a_transient_auto_delete_queue_goes_on_every_node_with_its_last_consumer(cluster):
    home, second, third = cluster.nodes
    name = "replies-" + uuid.uuid4().hex[:8]
    conn = connect(home["amqp"])
    conn.channel().queue_declare(name, auto_delete=True)
    conn.close()
    # Declared again through another node as it was: equivalent.
    eventually("the second node knows the queue", lambda: passive(second, name) == (0, 0), timeout=5)
    conn = connect(second["amqp"])
    ch = conn.channel()
    ch.queue_declare(name, auto_delete=True)
    with pytest.raises(ChannelClosedByBroker) as refused:
        conn.channel().queue_declare(name, durable=True, auto_delete=True)
    assert refused.value.reply_code == 406

    # A consumer through the second node counts on the home node.
    got = []
    ch.basic_consume(name, lambda c, m, p, body: (got.append(body), c.basic_ack(m.delivery_tag)))
    eventually("the home node counts the consumer", lambda: passive(home, name) == (0, 1), timeout=5)
    publish(third, "", name, ["r1", "r2"])
    receive(conn, got, 2)
    assert got == [b"r1", b"r2"]

    # Its cancel is the last consumer gone: the queue goes everywhere.
    ch.basic_cancel(ch.consumer_tags[0])
    conn.close()
    for node in cluster.nodes:
        eventually("%s forgot the queue" % node["name"], lambda: passive(node, name) == 404, timeout=5)


def test_a_classic_queue_waits_for_its_home_node(cluster):
    home, second, third = cluster.nodes
    durable = "ledger-" + uuid.uuid4().hex[:8]
    transient = "scratch-" + uuid.uuid4().hex[:8]
    conn = connect(home["amqp"])
    ch = conn.channel()
    ch.queue_declare(durable, durable=True)
    ch.queue_declare(transient)
    conn.close()
    eventually("the second node knows the queues",
               lambda: passive(second, durable) == (0, 0) and passive(second, transient) == (0, 0), timeout=5)
    publish(second, "", durable, ["kept-%d" % i for i in range(50)])

    cluster.kill(home)
    # Publishes to it are not confirmed while its node is down.
    with pytest.raises(pika.exceptions.NackError):
        publish(second, "", durable, ["lost"])
    # A consumer and a get are refused as RabbitMQ refuses them.
    conn = connect(second["amqp"])
    with pytest.raises(ChannelClosedByBroker) as refused:
        conn.channel().basic_get(durable)
    assert refused.value.reply_code == 404
    conn.close()
    conn = connect(third["amqp"])
    with pytest.raises(ChannelClosedByBroker) as refused:
        ch = conn.channel()
        ch.basic_consume(durable, lambda *a: None)
        conn.process_data_events(time_limit=1)
    assert refused.value.reply_code == 404
    assert "is down or inaccessible" in refused.value.reply_text
    conn.close()

    # Back: the durable queue and its confirmed messages are there; the
    # transient queue was lost with the node, and every node forgets it.
    cluster.start(home)
    eventually("the durable queue is reachable again", lambda: passive(third, durable) == (50, 0))
    got = consume_all(third["amqp"], durable, 50)
    assert [body for body, _ in got] == ["kept-%d" % i for i in range(50)]
    for node in cluster.nodes:
        eventually("%s forgot the transient queue" % node["name"], lambda: passive(node, transient) == 404)


def test_publish_subscribe_reaches_subscribers_on_every_node(cluster):
    """The pattern of RabbitMQ's tutorials: every client declares a
    non-durable fanout exchange; each subscriber binds an exclusive,
    server-named queue to it; the publisher is on another node."""
    first, second, third = cluster.nodes
    exchange = "logs-" + uuid.uuid4().hex[:8]
    subscribers = []
    for node in (second, third):
        conn = connect(node["amqp"])
        ch = conn.channel()
        ch.exchange_declare(exchange, "fanout")
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(queue, exchange)
        subscribers.append((node, conn, ch, queue))

    # Another connection cannot use an exclusive queue, on any node.
    for node in cluster.nodes:
        eventually("%s refuses the queue to another connection" % node["name"],
                   lambda: passive(node, subscribers[0][3]) == 405, timeout=5)

    conn = connect(first["amqp"])
    ch = conn.channel()
    ch.exchange_declare(exchange, "fanout")
    conn.close()
    got = {}
    for node, conn, ch, queue in subscribers:
        got[node["name"]] = []
        ch.basic_consume(queue, lambda c, m, p, body, into=got[node["name"]]: into.append(body.decode()),
                         auto_ack=True)
    publish(first, exchange, "", ["event-%d" % i for i in range(10)], mandatory=False)
    for node, conn, ch, queue in subscribers:
        receive(conn, got[node["name"]], 10)
        assert got[node["name"]] == ["event-%d" % i for i in range(10)], node["name"]

    # A subscriber that leaves takes its queue with it, on every node.
    gone = subscribers[0][3]
    subscribers[0][1].close()
    for node in cluster.nodes:
        eventually("%s forgot the queue" % node["name"], lambda: passive(node, gone) == 404, timeout=5)
    publish(first, exchange, "", ["after"], mandatory=True)
    node, conn, ch, queue = subscribers[1]
    receive(conn, got[node["name"]], 11)
    assert got[node["name"]][10:] == ["after"]
    conn.close()
