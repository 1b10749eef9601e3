#!/usr/bin/env python3
"""Quorum-queue failover under a confirmed publisher, on a local three-node
Warren cluster (scripts/cluster.sh) or RabbitMQ cluster
(scripts/rabbitmq-cluster.sh).

Each cycle finds the queue's leader, keeps a publisher (pika, one message
at a time, each waiting for its confirm) connected to another node, kills
the leader's process with SIGKILL and times how long the publisher waits
for its next confirm; then the node is started again and the next cycle
begins once it is back. With --consumer, an acking consumer (prefetch
100) connected to the third node takes messages throughout each cycle.
At the end every confirmed message is drained from the queue and checked:
none may be missing, and a message delivered twice must say so
(`redelivered`) the second time.

Usage:
  scripts/bench-quorum-failover.py [--cycles N] [--consumer] [--rabbitmq] [--stop]

With --stop the leader is stopped gracefully (SIGTERM) instead of killed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import base64

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE = "failover"


class Warren:
    name = "Warren"

    def __init__(self):
        self.dir = os.environ.get("CLUSTER_DIR", "/tmp/warren-failover")
        self.env = dict(os.environ, CLUSTER_DIR=self.dir)

    def up(self):
        subprocess.run([f"{ROOT}/scripts/cluster.sh", "up"], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def down(self):
        subprocess.run([f"{ROOT}/scripts/cluster.sh", "down"], env=self.env, stdout=subprocess.DEVNULL)

    def ports(self):
        return {i: 5700 + i for i in (1, 2, 3)}

    def api(self, i, path):
        request = urllib.request.Request(f"http://127.0.0.1:{15700 + i}{path}")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        with urllib.request.urlopen(request, timeout=2) as response:
            return json.load(response)

    def ready(self):
        """All three nodes up and the metadata group led."""
        try:
            nodes = self.api(1, "/api/nodes")
            return all(n["running"] for n in nodes) and len(nodes) == 3 and nodes[0]["warren_metadata"]["leader"]
        except Exception:
            return False

    def leader(self, alive):
        for i in alive:
            try:
                status = self.api(i, f"/api/warren/quorum/%2F/{QUEUE}")
                if status.get("leader"):
                    return int(status["leader"].split("-")[1].split("@")[0])
            except Exception:
                continue
        return None

    def caught_up(self, i):
        try:
            return self.api(i, f"/api/warren/quorum/%2F/{QUEUE}").get("raft_state") in ("Follower", "Leader")
        except Exception:
            return False

    def pid(self, i):
        with open(f"{self.dir}/node-{i}.pid") as f:
            return int(f.read())

    def restart(self, i):
        self.up()


class RabbitMQ:
    name = "RabbitMQ"

    def __init__(self):
        self.script = f"{ROOT}/scripts/rabbitmq-cluster.sh"

    def up(self):
        subprocess.run([self.script, "up"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def down(self):
        subprocess.run([self.script, "down"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ports(self):
        return {i: 5680 + i for i in (1, 2, 3)}

    def ready(self):
        return True

    def ctl(self, i, *args):
        return subprocess.run([self.script, "ctl", str(i), *args], capture_output=True, text=True, timeout=30)

    def leader(self, alive):
        for i in alive:
            out = self.ctl(i, "list_queues", "name", "leader", "--quiet").stdout
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == QUEUE:
                    return int(parts[1].split("@")[0][-1])
        return None

    def caught_up(self, i):
        return self.ctl(i, "await_startup").returncode == 0

    def pid(self, i):
        return int(subprocess.run([self.script, "pid", str(i)], capture_output=True, text=True).stdout.strip())

    def restart(self, i):
        subprocess.run([self.script, "start", str(i)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Publisher(threading.Thread):
    """Publishes numbered messages one at a time through one node, each
    waiting for its confirm; records when each confirm came."""

    def __init__(self, port, cycle):
        super().__init__(daemon=True)
        self.port = port
        self.cycle = cycle
        self.confirmed = []
        self.times = []
        self.stop = False
        self.next = 0
        self.error = None

    def run(self):
        try:
            conn = pika.BlockingConnection(pika.ConnectionParameters(port=self.port, heartbeat=0))
            channel = conn.channel()
            channel.confirm_delivery()
            while not self.stop:
                body = f"{self.cycle}-{self.next}"
                self.next += 1
                try:
                    channel.basic_publish("", QUEUE, body.encode(), pika.BasicProperties(delivery_mode=2))
                except pika.exceptions.NackError:
                    continue
                self.confirmed.append(body)
                self.times.append(time.monotonic())
            conn.close()
        except Exception as e:  # the cycle reports it
            self.error = e


class Consumer(threading.Thread):
    """Consumes through one node with acks; records each delivery's body
    and redelivered flag, and whether the broker cancelled it."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.received = []
        self.cancelled = False
        self.stop = False
        self.error = None

    def run(self):
        try:
            conn = pika.BlockingConnection(pika.ConnectionParameters(port=self.port, heartbeat=0))
            channel = conn.channel()
            channel.basic_qos(prefetch_count=100)

            def on_message(ch, method, properties, body):
                self.received.append((body.decode(), method.redelivered))
                ch.basic_ack(method.delivery_tag)

            channel.add_on_cancel_callback(lambda frame: setattr(self, "cancelled", True))
            channel.basic_consume(QUEUE, on_message)
            while not self.stop:
                conn.process_data_events(time_limit=0.05)
            conn.close()
        except Exception as e:  # the cycle reports it
            self.error = e


def running(pid):
    """Whether the process is there and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--rabbitmq", action="store_true")
    parser.add_argument("--consumer", action="store_true", help="an acking consumer through the third node")
    parser.add_argument("--stop", action="store_true", help="stop the leader with SIGTERM instead of SIGKILL")
    args = parser.parse_args()
    broker = RabbitMQ() if args.rabbitmq else Warren()
    broker.up()
    ports = broker.ports()
    deadline = time.monotonic() + 30
    while not broker.ready():
        assert time.monotonic() < deadline, "the cluster did not form"
        time.sleep(0.2)
    conn = pika.BlockingConnection(pika.ConnectionParameters(port=ports[1]))
    conn.channel().queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    time.sleep(1)

    gaps, confirmed, consumed, cancels = [], [], [], 0
    for cycle in range(args.cycles):
        leader = broker.leader([1, 2, 3])
        assert leader, "no leader"
        via = next(i for i in (1, 2, 3) if i != leader)
        consumer = None
        if args.consumer:
            consumer = Consumer(ports[next(i for i in (1, 2, 3) if i not in (leader, via))])
            consumer.start()
        publisher = Publisher(ports[via], cycle)
        publisher.start()
        time.sleep(1.0)
        assert publisher.error is None, publisher.error
        killed_at = time.monotonic()
        pid = broker.pid(leader)
        os.kill(pid, signal.SIGTERM if args.stop else signal.SIGKILL)
        while time.monotonic() - killed_at < 30:
            if publisher.times and publisher.times[-1] > killed_at:
                break
            time.sleep(0.005)
        time.sleep(0.5)
        # The longest wait between two confirms from just before the kill
        # on (a confirm already on its way when the leader died does not
        # count as the publisher going on).
        times = [t for t in publisher.times if t > killed_at - 0.1]
        gap = max((b - a for a, b in zip(times, times[1:])), default=float("inf"))
        publisher.stop = True
        publisher.join(10)
        confirmed.extend(publisher.confirmed)
        gaps.append(gap)
        if consumer:
            consumer.stop = True
            consumer.join(10)
            assert consumer.error is None, consumer.error
            consumed.extend(consumer.received)
            cancels += consumer.cancelled
        how = "stopped" if args.stop else "killed"
        print(f"cycle {cycle + 1}: leader node {leader} {how}, publisher through node {via}: longest wait for a confirm {gap * 1000:.0f} ms", flush=True)
        deadline = time.monotonic() + 30
        while running(pid):
            assert time.monotonic() < deadline, f"node {leader} did not stop"
            time.sleep(0.05)
        broker.restart(leader)
        deadline = time.monotonic() + 60
        while not (broker.ready() and broker.caught_up(leader)):
            assert time.monotonic() < deadline, f"node {leader} did not come back"
            time.sleep(0.2)
        time.sleep(1.0)

    # Drain from the leader and check.
    leader = broker.leader([1, 2, 3])
    conn = pika.BlockingConnection(pika.ConnectionParameters(port=ports[leader]))
    channel = conn.channel()
    deliveries = list(consumed)
    while True:
        method, _, body = channel.basic_get(QUEUE, auto_ack=True)
        if method is None:
            break
        deliveries.append((body.decode(), method.redelivered))
    conn.close()
    seen, unflagged = {}, 0
    for body, redelivered in deliveries:
        if body in seen and not redelivered:
            unflagged += 1
        seen[body] = seen.get(body, 0) + 1
    lost = [b for b in confirmed if b not in seen]
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    print(f"{broker.name}: {len(gaps)} cycles, longest wait for a confirm across a {'graceful stop' if args.stop else 'kill -9'} of the leader: "
          f"p50 {percentile(gaps, 0.5) * 1000:.0f} ms, p90 {percentile(gaps, 0.9) * 1000:.0f} ms, "
          f"max {max(gaps) * 1000:.0f} ms; {len(confirmed)} confirmed, {len(lost)} lost, "
          f"{duplicates} delivered twice ({unflagged} of them without redelivered)"
          + (f"; the consumer took {len(consumed)}, cancelled {cancels} times" if args.consumer else ""))
    broker.down()
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
