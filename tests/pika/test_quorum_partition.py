"""A network partition of a three-node Warren cluster, through pika.

Each node runs in its own network namespace (`ip netns`), joined to the
others by a veth pair on a bridge; cutting a node's link isolates it with
no connection closing, as a real partition does. The quorum queue's leader
is cut off: the majority side elects another leader and its publisher
carries on with confirms, the cut-off leader confirms nothing, and once
the link is back it follows the new leader and catches up.

Needs root (network namespaces); skipped otherwise, and when no warren
binary is there.
"""

import os
import subprocess
import time
import uuid
from pathlib import Path

import pika
import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("WARREN_BIN", ROOT / "target" / "debug" / "warren")).resolve()


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def namespaces_work():
    if os.geteuid() != 0:
        return False
    name = "wprobe%d" % os.getpid()
    if sh("ip", "netns", "add", name, check=False).returncode != 0:
        return False
    sh("ip", "netns", "del", name, check=False)
    return True


pytestmark = [
    pytest.mark.skipif(not BINARY.exists(), reason="no warren binary to start a cluster with"),
    pytest.mark.skipif(not namespaces_work(), reason="network namespaces need root and `ip netns`"),
]


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


class Network:
    """Three namespaces on one bridge; node i at 10.77.<net>.i."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.net = os.getpid() % 250
        self.bridge = "wb%d" % tag
        self.links = {i: "wv%d%d" % (tag, i) for i in (1, 2, 3)}
        self.spaces = {i: "w%dn%d" % (tag, i) for i in (1, 2, 3)}
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", "10.77.%d.254/24" % self.net, "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in (1, 2, 3):
            space, link = self.spaces[i], self.links[i]
            sh("ip", "netns", "add", space)
            sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", space)
            sh("ip", "link", "set", link, "master", self.bridge)
            sh("ip", "link", "set", link, "up")
            sh("ip", "netns", "exec", space, "ip", "addr", "add", self.address(i) + "/24", "dev", "eth0")
            sh("ip", "netns", "exec", space, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", space, "ip", "link", "set", "lo", "up")

    def address(self, i):
        return "10.77.%d.%d" % (self.net, i)

    def cut(self, i, cut=True):
        sh("ip", "link", "set", self.links[i], "down" if cut else "up")

    def remove(self):
        for i in (1, 2, 3):
            sh("ip", "link", "del", self.links[i], check=False)
            sh("ip", "netns", "del", self.spaces[i], check=False)
        sh("ip", "link", "del", self.bridge, check=False)


@pytest.fixture
def cluster(tmp_path):
    network = Network()
    processes = []
    try:
        (tmp_path / "secret").write_text("cookie\n")
        seeds = ",".join("%s:25672" % network.address(i) for i in (1, 2, 3))
        for i in (1, 2, 3):
            # guest may log in from loopback only, as in RabbitMQ; users are
            # not replicated yet: each node gets its own.
            data = str(tmp_path / ("n%d" % i))
            sh(str(BINARY), "ctl", "--data-dir", data, "add_user", "part", "part")
            sh(str(BINARY), "ctl", "--data-dir", data, "set_permissions", "-p", "/", "part", ".*", ".*", ".*")
            log = open(tmp_path / ("n%d.log" % i), "a")
            processes.append(subprocess.Popen(
                ["ip", "netns", "exec", network.spaces[i], str(BINARY), "--node-name", "n%d@partition" % i,
                 "--bind", network.address(i), "--amqp-port", "5672", "--http-port", "0",
                 "--prometheus-port", "0", "--data-dir", str(tmp_path / ("n%d" % i)),
                 "--cluster-port", "25672", "--cluster-seeds", seeds,
                 "--cluster-secret-file", str(tmp_path / "secret")],
                stdout=log, stderr=log))
        yield network
    finally:
        for process in processes:
            process.kill()
            process.wait()
        network.remove()


CREDENTIALS = pika.PlainCredentials("part", "part")


def connect(host):
    parameters = pika.ConnectionParameters(host=host, credentials=CREDENTIALS, socket_timeout=5, connection_attempts=1)
    return pika.BlockingConnection(parameters)


def basic_get_works(host, name):
    """Whether the node at `host` leads `name` (basic.get works only there)."""
    conn = connect(host)
    try:
        conn.channel().basic_get(name)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if conn.is_open:
            conn.close()


def publish_confirmed(channel, name, bodies):
    for body in bodies:
        channel.basic_publish("", name, body.encode(), pika.BasicProperties(delivery_mode=2))


def test_the_majority_side_carries_on_and_the_cut_off_leader_confirms_nothing(cluster):
    first, second, third = (cluster.address(i) for i in (1, 2, 3))
    name = "split-" + uuid.uuid4().hex[:8]

    def declared():
        conn = connect(first)
        conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        conn.close()
        return True

    eventually("the quorum queue is declared on the first node", declared)
    assert basic_get_works(first, name), "the declaring node leads the queue"
    majority = connect(second)
    publishing = majority.channel()
    publishing.confirm_delivery()
    publish_confirmed(publishing, name, ("p%d" % i for i in range(100)))

    # The leader's link goes down: no connection closes, heartbeats stop.
    cut_at = time.monotonic()
    cluster.cut(1)
    # The majority side goes on: the same publisher gets its confirms again
    # once a new leader took over (a publish waits for it meanwhile).
    publish_confirmed(publishing, name, ("q%d" % i for i in range(100)))
    print("confirms again %.2f s after the partition" % (time.monotonic() - cut_at))
    assert time.monotonic() - cut_at < 15
    new_leader = eventually("a majority node leads", lambda: next(
        (h for h in (second, third) if basic_get_works(h, name)), None), timeout=10)

    # The cut-off side cannot commit: its publish is not confirmed while
    # the partition lasts. (Its client is in its namespace: run it there.)
    script = (
        "import pika,sys\n"
        "c=pika.BlockingConnection(pika.ConnectionParameters(host=%r,socket_timeout=5,\n"
        "    credentials=pika.PlainCredentials('part','part')))\n"
        "ch=c.channel(); ch.confirm_delivery()\n"
        "ch.basic_publish('', %r, b'minority', pika.BasicProperties(delivery_mode=2))\n"
        "print('confirmed')\n" % (first, name))
    minority = subprocess.run(["ip", "netns", "exec", cluster.spaces[1], "timeout", "4", "python3", "-c", script],
                              capture_output=True, text=True)
    assert "confirmed" not in minority.stdout, minority.stdout + minority.stderr

    # Healed: the old leader follows the new one and its replica catches up.
    cluster.cut(1, cut=False)

    def replica_has_all():
        conn = connect(first)
        try:
            return conn.channel().queue_declare(name, passive=True).method.message_count == 200
        finally:
            conn.close()

    eventually("the healed node's replica holds the 200 confirmed messages", replica_has_all, timeout=20)
    assert not basic_get_works(first, name), "the healed old leader does not serve the queue"

    # Every confirmed message is there once, through the healed node too.
    conn = connect(first)
    channel = conn.channel()
    channel.basic_qos(prefetch_count=100)
    bodies = []

    def on_message(ch, method, properties, body):
        bodies.append(body.decode())
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(name, on_message)
    deadline = time.monotonic() + 15
    while len(bodies) < 200 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    conn.close()
    majority.close()
    expected = ["p%d" % i for i in range(100)] + ["q%d" % i for i in range(100)]
    assert sorted(bodies) == sorted(expected), (len(bodies), new_leader)
    assert "minority" not in bodies
