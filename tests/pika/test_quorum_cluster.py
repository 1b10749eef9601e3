"""Quorum queues on a three-node Warren cluster, through pika.

Starts its own three `warren` processes (WARREN_BIN, else
target/debug/warren) on free ports; skipped when no binary is there (as
against a RabbitMQ reference, which these tests cannot cluster).
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("WARREN_BIN", ROOT / "target" / "debug" / "warren")).resolve()

pytestmark = pytest.mark.skipif(not BINARY.exists(), reason="no warren binary to start a cluster with")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port):
    params = pika.ConnectionParameters(port=port, socket_timeout=5, connection_attempts=1)
    return pika.BlockingConnection(params)


def eventually(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # a node still starting, a queue still moving
            pass
        if time.monotonic() > deadline:
            raise AssertionError("never happened: " + what)
        time.sleep(0.1)


class Cluster:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        (tmp_path / "secret").write_text("cookie\n")
        cluster_ports = [free_port() for _ in range(3)]
        self.seeds = ",".join("127.0.0.1:%d" % p for p in cluster_ports)
        self.nodes = []
        for i, cluster_port in enumerate(cluster_ports):
            self.nodes.append({"name": "n%d@pika" % i, "amqp": free_port(), "http": free_port(),
                               "cluster": cluster_port, "data": tmp_path / ("n%d" % i), "process": None})
        for node in self.nodes:
            self.start(node)
        # Every node sees the others before a test places queues (a queue
        # declared earlier would get fewer replicas).
        for node in self.nodes:
            eventually("%s sees the whole cluster" % node["name"], lambda: self.running(node) == 3)

    def running(self, node):
        request = urllib.request.Request("http://127.0.0.1:%d/api/nodes" % node["http"],
                                         headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})
        with urllib.request.urlopen(request, timeout=5) as response:
            return sum(1 for n in json.load(response) if n.get("running"))

    def start(self, node):
        log = open(self.tmp / ("%s.log" % node["name"]), "a")
        node["process"] = subprocess.Popen(
            [str(BINARY), "--node-name", node["name"], "--bind", "127.0.0.1", "--log", "warn",
             "--amqp-port", str(node["amqp"]), "--http-port", str(node["http"]), "--prometheus-port", "0",
             "--data-dir", str(node["data"]), "--cluster-port", str(node["cluster"]),
             "--cluster-seeds", self.seeds, "--cluster-secret-file", str(self.tmp / "secret")],
            stdout=log, stderr=log)

    def kill(self, node):
        node["process"].send_signal(signal.SIGKILL)
        node["process"].wait()

    def stop(self):
        for node in self.nodes:
            if node["process"] and node["process"].poll() is None:
                node["process"].kill()
                node["process"].wait()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def declare(port, name, **arguments):
    conn = connect(port)
    try:
        conn.channel().queue_declare(name, durable=True, arguments=dict({"x-queue-type": "quorum"}, **arguments))
    finally:
        conn.close()


def leader_of(nodes, name):
    """The node of `nodes` that leads `name` (basic.get works there only), if any."""
    for node in nodes:
        conn = connect(node["amqp"])
        try:
            conn.channel().basic_get(name)
            return node
        except ChannelClosedByBroker:
            continue
        finally:
            if conn.is_open:
                conn.close()
    return None


def consume_all(port, name, expected):
    """Consumes `expected` messages on the node at `port`, acking each."""
    conn = connect(port)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    bodies = []

    def on_message(channel, method, properties, body):
        bodies.append((body.decode(), method.redelivered))
        channel.basic_ack(method.delivery_tag)

    ch.basic_consume(name, on_message)
    deadline = time.monotonic() + 10
    while len(bodies) < expected and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    conn.close()
    return bodies


def test_a_quorum_queue_takes_publishes_and_serves_consumers_through_any_node(cluster):
    first, second, third = cluster.nodes
    name = "orders-" + uuid.uuid4().hex[:8]
    # The metadata group forms once the nodes meet; declaring waits for it.
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)

    # Through another node: forwarded to the leader, confirmed once committed.
    conn = connect(second["amqp"])
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(50):
        ch.basic_publish("", name, b"m%d" % i, pika.BasicProperties(delivery_mode=2))
    # basic.get there is refused, not answered empty.
    with pytest.raises(ChannelClosedByBroker) as refused:
        conn.channel().basic_get(name)
    assert refused.value.reply_code == 406
    assert "led from another node" in refused.value.reply_text
    conn.close()

    # A passive declare on the third node answers from its replica.
    passive = eventually("the third replica has the messages",
                         lambda: connect(third["amqp"]).channel().queue_declare(name, passive=True)
                         .method.message_count == 50)
    assert passive

    # A consumer on the third node is served by the leader, in order, and
    # its acks settle the messages there.
    bodies = consume_all(third["amqp"], name, 50)
    assert bodies == [("m%d" % i, False) for i in range(50)]
    conn = connect(first["amqp"])
    assert conn.channel().queue_declare(name, passive=True).method.message_count == 0
    conn.close()

    # Deleted on its leader: gone from every node.
    conn = connect(first["amqp"])
    conn.channel().queue_delete(name)
    conn.close()

    def gone(node):
        conn = connect(node["amqp"])
        try:
            conn.channel().queue_declare(name, passive=True)
            return False
        except ChannelClosedByBroker as e:
            return e.reply_code == 404
        finally:
            if conn.is_open:
                conn.close()

    for node in (first, second, third):
        eventually("the deleted queue is gone from %s" % node["name"], lambda: gone(node), timeout=10)


def exchange_exists(node, exchange):
    conn = connect(node["amqp"])
    try:
        conn.channel().exchange_declare(exchange, passive=True)
        return True
    except ChannelClosedByBroker as e:
        assert e.reply_code == 404
        return False
    finally:
        if conn.is_open:
            conn.close()


def publish_routed(port, exchange, key, bodies):
    """Publishes mandatory with confirms: raises if a message is not routed."""
    conn = connect(port)
    ch = conn.channel()
    ch.confirm_delivery()
    for body in bodies:
        ch.basic_publish(exchange, key, body.encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
    conn.close()


def test_exchanges_and_bindings_made_on_one_node_route_on_every_node(cluster):
    first, second, third = cluster.nodes
    name = "shipping-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)

    # Declared and bound on the first node; the replies come once the
    # metadata group committed them.
    conn = connect(first["amqp"])
    ch = conn.channel()
    ch.exchange_declare("orders", "topic", durable=True)
    ch.exchange_declare("orders.all", "fanout", durable=True)
    ch.exchange_bind("orders", "orders.all")
    ch.queue_bind(name, "orders", routing_key="order.*")
    conn.close()

    # The other nodes route through both exchanges into the queue (an
    # unroutable mandatory publish would be returned and raise here), once
    # they applied what was committed (milliseconds later).
    def routes(node, exchange, key, body):
        try:
            publish_routed(node["amqp"], exchange, key, [body])
            return True
        except pika.exceptions.UnroutableError:
            return False

    eventually("the second node routes by the topic binding",
               lambda: routes(second, "orders", "order.created", "via-topic-0"), timeout=5)
    eventually("the third node routes by the exchange binding",
               lambda: routes(third, "orders.all", "order.fanned", "via-fanout-0"), timeout=5)
    publish_routed(second["amqp"], "orders", "order.created", ["via-topic-%d" % i for i in range(1, 20)])
    publish_routed(third["amqp"], "orders.all", "order.fanned", ["via-fanout-%d" % i for i in range(1, 20)])
    with pytest.raises(pika.exceptions.UnroutableError):
        publish_routed(second["amqp"], "orders", "invoice.created", ["nowhere"])
    bodies = [body for body, _ in consume_all(third["amqp"], name, 40)]
    assert sorted(bodies) == sorted(["via-topic-%d" % i for i in range(20)] + ["via-fanout-%d" % i for i in range(20)])

    # Unbound on the third node: no node routes that way any more.
    conn = connect(third["amqp"])
    conn.channel().queue_unbind(name, "orders", routing_key="order.*")
    conn.close()
    eventually("the first node no longer routes by the removed binding",
               lambda: not routes(first, "orders", "order.created", "unbound"), timeout=5)

    # A node that was down hears of what changed meanwhile.
    cluster.kill(third)
    conn = connect(second["amqp"])
    ch = conn.channel()
    ch.exchange_delete("orders.all")
    ch.exchange_declare("invoices", "direct", durable=True)
    ch.queue_bind(name, "invoices", routing_key="due")
    conn.close()
    eventually("the first node deleted the exchange", lambda: not exchange_exists(first, "orders.all"), timeout=5)
    cluster.start(third)
    eventually("the restarted node knows the new exchange", lambda: exchange_exists(third, "invoices"))
    assert not exchange_exists(third, "orders.all")
    eventually("the restarted node routes by the new binding",
               lambda: publish_routed(third["amqp"], "invoices", "due", ["invoice"]) or True)
    assert [body for body, _ in consume_all(first["amqp"], name, 1)] == ["invoice"]


def ctl(node, *args):
    done = subprocess.run([str(BINARY), "ctl", "--data-dir", str(node["data"])] + list(args),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def logs_in(node, user, password, vhost="/"):
    params = pika.ConnectionParameters(port=node["amqp"], virtual_host=vhost, socket_timeout=5,
                                       connection_attempts=1,
                                       credentials=pika.PlainCredentials(user, password))
    try:
        pika.BlockingConnection(params).close()
        return True
    except (pika.exceptions.ProbableAccessDeniedError, pika.exceptions.ProbableAuthenticationError):
        return False


def test_users_virtual_hosts_and_permissions_made_on_one_node_hold_on_every_node(cluster):
    first, second, third = cluster.nodes
    eventually("the cluster is up", lambda: declare(first["amqp"], "up-" + uuid.uuid4().hex[:6]) or True)

    # Made with `warren ctl` on the first node's data directory only.
    ctl(first, "add_user", "carol", "s3cret")
    ctl(first, "add_vhost", "shop")
    ctl(first, "set_permissions", "-p", "shop", "carol", ".*", ".*", ".*")
    for node in (second, third):
        eventually("carol logs in to vhost shop on %s" % node["name"],
                   lambda: logs_in(node, "carol", "s3cret", "shop"), timeout=10)
    assert not logs_in(third, "carol", "wrong", "shop")

    # Changed on another node: the first one follows.
    ctl(third, "change_password", "carol", "n3w")
    eventually("the new password works on the first node", lambda: logs_in(first, "carol", "n3w", "shop"), timeout=10)
    assert not logs_in(first, "carol", "s3cret", "shop")
    ctl(second, "delete_user", "carol")
    eventually("carol is gone from the first node", lambda: not logs_in(first, "carol", "n3w", "shop"), timeout=10)


def test_nodes_without_a_replica_take_publishes_and_consumers_too(cluster):
    first, second, third = cluster.nodes
    name = "single-" + uuid.uuid4().hex[:8]
    # One replica, on the first node: the others hold none.
    eventually("the quorum queue is declared",
               lambda: declare(first["amqp"], name, **{"x-quorum-initial-group-size": 1}) or True)
    # Declared again on a node without a replica: answered as placed.
    declare(second["amqp"], name, **{"x-quorum-initial-group-size": 1})

    # A purge through a node without a replica purges the leader's queue.
    publish_routed(second["amqp"], "", name, ["purged-%d" % i for i in range(5)])
    conn = connect(third["amqp"])
    assert conn.channel().queue_purge(name).method.message_count == 5
    conn.close()

    publish_routed(second["amqp"], "", name, ["s%d" % i for i in range(100)])
    bodies = consume_all(third["amqp"], name, 100)
    assert bodies == [("s%d" % i, False) for i in range(100)]
    # The acks reach the leader after the consumer is gone (as in
    # RabbitMQ, nothing waits for them): settled before the kill below.
    eventually("the leader settled the acks", lambda: connect(first["amqp"]).channel()
               .queue_declare(name, passive=True).method.message_count == 0, timeout=10)

    # Its leader's node restarted: the others find the leader again.
    cluster.kill(first)
    cluster.start(first)
    eventually("the queue takes publishes through the second node again",
               lambda: publish_routed(second["amqp"], "", name, ["after"]) or True)
    # (Marked redelivered if the new leader found it in its replica when it
    # took the queue up: it cannot tell whether it was delivered.)
    assert [body for body, _ in consume_all(third["amqp"], name, 1)] == ["after"]


def test_a_passive_declare_on_any_node_reports_the_leaders_counts(cluster):
    first, second, third = cluster.nodes
    name = "counted-" + uuid.uuid4().hex[:8]
    # Two replicas, the leader's on the first node: the third holds none.
    eventually("the quorum queue is declared",
               lambda: declare(first["amqp"], name, **{"x-quorum-initial-group-size": 2}) or True)
    eventually("the first node leads the queue", lambda: leader_of((first,), name))
    publish_routed(first["amqp"], "", name, ["c%d" % i for i in range(10)])
    # Three delivered and not acknowledged: not ready, as RabbitMQ counts.
    conn = connect(first["amqp"])
    ch = conn.channel()
    ch.basic_qos(prefetch_count=3)
    held = []
    ch.basic_consume(name, lambda channel, method, properties, body: held.append(method.delivery_tag))
    deadline = time.monotonic() + 10
    while len(held) < 3 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert len(held) == 3

    for node in (first, second, third):
        other = connect(node["amqp"])
        declared = other.channel().queue_declare(name, passive=True).method
        other.close()
        assert (declared.message_count, declared.consumer_count) == (7, 1), node["name"]
    conn.close()


def test_a_quorum_queue_refuses_what_rabbitmq_refuses(cluster):
    first = cluster.nodes[0]
    conn = eventually("a connection", lambda: connect(first["amqp"]))
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as refused:
        ch.queue_declare("qq-" + uuid.uuid4().hex[:8], durable=True,
                         arguments={"x-queue-type": "quorum", "x-max-priority": 5})
    assert refused.value.reply_code == 406
    assert "invalid arg 'x-max-priority'" in refused.value.reply_text
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as refused:
        ch.queue_declare("qq-" + uuid.uuid4().hex[:8], durable=False, arguments={"x-queue-type": "quorum"})
    assert refused.value.reply_code == 406
    assert "invalid property 'non-durable'" in refused.value.reply_text
    conn.close()


def test_confirmed_messages_survive_a_kill_of_the_leaders_node(cluster):
    first, second, third = cluster.nodes
    name = "jobs-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)
    publish_routed(first["amqp"], "", name, ["j%d" % i for i in range(200)])
    cluster.kill(first)

    leader = eventually("another node leads the queue", lambda: leader_of((second, third), name), timeout=20)
    bodies = consume_all(leader["amqp"], name, 200)
    assert sorted(int(b[1:]) for b, _ in bodies) == list(range(200))


def test_committed_transactions_survive_a_kill_of_the_leaders_node(cluster):
    first, second, third = cluster.nodes
    name = "tx-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)
    eventually("the first node leads the queue", lambda: leader_of((first,), name))
    # commit-ok comes once the group committed the messages (through a
    # node that forwards them, and through the leader's node, killed the
    # moment commit-ok arrives: large bodies keep the commit under way).
    padding = "x" * (64 << 10)
    for node, numbers in ((second, range(50)), (first, range(50, 250))):
        conn = connect(node["amqp"])
        ch = conn.channel()
        ch.tx_select()
        for i in numbers:
            ch.basic_publish("", name, "t%d %s" % (i, padding), pika.BasicProperties(delivery_mode=2))
        ch.tx_commit()
    cluster.kill(first)

    leader = eventually("another node leads the queue", lambda: leader_of((second, third), name), timeout=20)
    bodies = consume_all(leader["amqp"], name, 250)
    assert sorted(int(b.split()[0][1:]) for b, _ in bodies) == list(range(250))


def test_messages_with_their_own_expiration_expire_after_a_change_of_leader(cluster):
    first, second, third = cluster.nodes
    name = "expiring-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)
    eventually("the first node leads the queue", lambda: leader_of((first,), name))
    conn = connect(first["amqp"])
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(50):
        ch.basic_publish("", name, "e%d" % i, pika.BasicProperties(delivery_mode=2, expiration="1500"))
    ch.basic_publish("", name, "kept", pika.BasicProperties(delivery_mode=2))
    conn.close()
    cluster.kill(first)

    # Nothing consumes: the new leader expires them at the head, as
    # RabbitMQ's quorum queues do.
    leader = eventually("another node leads the queue", lambda: leader_of((second, third), name), timeout=20)

    def count():
        other = connect(leader["amqp"])
        try:
            return other.channel().queue_declare(name, passive=True).method.message_count
        finally:
            other.close()

    eventually("the expired messages are gone", lambda: count() == 1, timeout=10)
    assert [body for body, _ in consume_all(leader["amqp"], name, 1)] == ["kept"]


def test_a_new_leader_serves_messages_in_the_order_they_were_confirmed_whichever_node_took_them(cluster):
    first, second, third = cluster.nodes
    name = "ordered-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)
    eventually("the first node leads the queue", lambda: leader_of((first,), name))
    # The first half through a node that forwards them, the second through
    # the leader's own node.
    for node, numbers in ((second, range(100)), (first, range(100, 200))):
        publish_routed(node["amqp"], "", name, ["o%d" % i for i in numbers])
    cluster.kill(first)

    leader = eventually("another node leads the queue", lambda: leader_of((second, third), name), timeout=20)
    bodies = consume_all(leader["amqp"], name, 200)
    assert [int(b[1:]) for b, _ in bodies] == list(range(200))


def test_an_exclusive_consumer_through_another_node_holds_the_queue_on_every_node(cluster):
    first, second, third = cluster.nodes
    name = "solo-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)
    holder = connect(second["amqp"])
    held = holder.channel()
    held.basic_consume(name, lambda *a: None, exclusive=True)
    # Refused as RabbitMQ refuses it, whichever node the second consumer uses.
    for node in (third, first):
        conn = connect(node["amqp"])
        with pytest.raises(ChannelClosedByBroker) as refused:
            conn.channel().basic_consume(name, lambda *a: None)
        assert refused.value.reply_code == 403
        assert "in exclusive use" in refused.value.reply_text
        conn.close()
    # Once the holder cancels, the queue is free again.
    held.basic_cancel(held.consumer_tags[0])
    holder.close()
    conn = connect(third["amqp"])
    eventually("the queue is free", lambda: conn.channel().basic_consume(name, lambda *a: None) or True, timeout=5)
    conn.close()


def test_a_consumer_through_another_node_carries_on_across_a_kill_of_the_leader(cluster):
    first, second, third = cluster.nodes
    name = "feed-" + uuid.uuid4().hex[:8]
    eventually("the quorum queue is declared", lambda: declare(first["amqp"], name) or True)
    publish_routed(first["amqp"], "", name, ["f%d" % i for i in range(300)])

    conn = connect(second["amqp"])
    ch = conn.channel()
    ch.basic_qos(prefetch_count=50)
    received, cancelled = [], []

    def on_message(channel, method, properties, body):
        received.append((body.decode(), method.redelivered))
        channel.basic_ack(method.delivery_tag)

    ch.add_on_cancel_callback(cancelled.append)
    ch.basic_consume(name, on_message)
    deadline = time.monotonic() + 30
    killed = False
    while len({b for b, _ in received}) < 300 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
        if not killed and len(received) >= 100:
            cluster.kill(first)
            killed = True
    conn.close()

    assert killed
    assert {b for b, _ in received} == {"f%d" % i for i in range(300)}
    assert cancelled == []
    # A message delivered again (its ack lost with the leader) says so.
    seen = set()
    for body, redelivered in received:
        assert body not in seen or redelivered, body
        seen.add(body)


def test_balanced_placement_spreads_the_leaders(cluster):
    first = cluster.nodes[0]
    names = ["spread-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(3)]
    for name in names:
        # All declared through the same node.
        eventually("declared", lambda: declare(first["amqp"], name, **{"x-queue-leader-locator": "balanced"}) or True)

    leaders = [eventually("%s has a leader" % name, lambda: leader_of(cluster.nodes, name), timeout=10)["name"]
               for name in names]
    assert sorted(leaders) == sorted(node["name"] for node in cluster.nodes), leaders
