"""Publish/subscribe, end to end: the order service publishes every status
change of three orders once, to a topic exchange. Packaging, shipping,
delivery and customer notifications each have their own queue and act on
the statuses they care about. Shipping is stopped during the second order
and catches up from its queue when it starts again; a loyalty service
subscribes before the third order, without any change to the publisher.

    python3 examples/pubsub/run.py

The broker is $WARREN_AMQP_URL (default amqp://guest:guest@localhost:5672/%2F).
"""

import argparse
import os
import re
import subprocess
import sys
import threading
import time

import pika

import subscriber
from order_service import DEFAULT_URL, OrderService

HERE = os.path.dirname(os.path.abspath(__file__))

ORDERS = [
    ("1001", ["created", "paid", "packed", "shipped", "delivered"]),
    ("1002", ["created", "paid", "cancelled"]),
    ("1003", ["created", "paid", "packed", "shipped", "delivered"]),
]


def show(line):
    """Prints a line in one write, so that the lines of several processes
    sharing a terminal do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting for " + what)
        time.sleep(0.02)


class Service:
    """A subscriber process; its output is shown and what it acted on recorded."""

    def __init__(self, name, url, exchange, received):
        self.name = name
        self.received = received  # (order, status) in the order acted on
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "subscriber.py"), name, "--url", url, "--exchange", exchange],
            stdout=subprocess.PIPE, text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            show(line.rstrip("\n"))
            if ": listening" in line:
                self.ready.set()
            acted = re.match(r"\S+: order (\S+) (\S+) ->", line)
            if acted:
                self.received.append(acted.groups())

    def wait_ready(self):
        wait_for(lambda: self.ready.is_set() or self.process.poll() is not None, 15, self.name)
        if not self.ready.is_set():
            raise RuntimeError("%s exited with status %d" % (self.name, self.process.returncode))

    def stop(self):
        self.process.terminate()
        self.process.wait()
        self.reader.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--exchange", default="order-status")
    args = parser.parse_args(argv)

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    for name in subscriber.SERVICES:  # start from scratch: no queues of an earlier run
        channel.queue_delete(subscriber.queue_name(args.exchange, name))

    received = {name: [] for name in subscriber.SERVICES}
    published = []  # every (order, status), in order
    subscribed_at = {}  # how many changes had been published when a service's queue appeared
    running = {}
    orders = OrderService(args.url, args.exchange)

    def start(*names):
        for name in names:
            running[name] = Service(name, args.url, args.exchange, received[name])
        for name in names:
            running[name].wait_ready()
            subscribed_at.setdefault(name, len(published))

    def publish(order, statuses):
        for status in statuses:
            show("order service: order %s is %s" % (order, status))
            orders.publish_status(order, status)
            published.append((order, status))

    try:
        start("packaging", "shipping", "delivery", "notifications")
        publish(*ORDERS[0])

        show("--- shipping stops; its queue keeps what comes meanwhile")
        running.pop("shipping").stop()
        publish(*ORDERS[1])
        show("--- shipping starts again")
        start("shipping")

        show("--- a loyalty service subscribes; the order service is not touched")
        start("loyalty")
        publish(*ORDERS[2])

        expected = {
            name: [(order, status) for order, status in published[subscribed_at[name]:]
                   if subscriber.wants(name, status)]
            for name in subscriber.SERVICES
        }
        wait_for(lambda: all(len(received[n]) >= len(expected[n]) for n in expected), 15,
                 "every service to get its status changes")
    finally:
        for service in running.values():
            service.process.terminate()  # all at once, then wait for each
        for service in running.values():
            service.stop()
        orders.close()

    # Nothing more is waiting for anyone (the services have stopped, so
    # anything delivered but not acted on would be back in a queue).
    left = {}
    for name in subscriber.SERVICES:
        declared = channel.queue_declare(subscriber.queue_name(args.exchange, name), passive=True)
        left[name] = declared.method.message_count
    connection.close()

    show("")
    ok = True
    for name in subscriber.SERVICES:
        good = received[name] == expected[name] and left[name] == 0
        ok = ok and good
        statuses = ", ".join("%s %s" % event for event in received[name])
        show("%-13s %-8s %s" % (name, "ok" if good else "WRONG", statuses))
    show("each service got exactly the changes it subscribed to, in order" if ok else "MISMATCH")
    return {"ok": ok, "published": published, "expected": expected, "received": received, "left": left}


if __name__ == "__main__":
    # A broker from this checkout when none listens at the default address.
    sys.path.insert(0, os.path.dirname(HERE))
    import local_broker  # noqa: E402

    sys.exit(0 if local_broker.run_example(main, DEFAULT_URL) else 1)
