#!/usr/bin/env python3
"""Durable queue declarations against a broker while another connection
publishes: how long N declarations take, and the latency (publish to
confirm) a concurrent publisher sees meanwhile.

    python3 scripts/bench-declare.py --url amqp://guest:guest@127.0.0.1:5672/%2F [--queues 10000]

Prints one JSON line: declare_s, declares_per_s, and the publisher's p50,
p99 and max confirm latency in milliseconds during the declarations, plus
its p99 before them (baseline). Declared queues are deleted at the end.
"""

import argparse
import json
import threading
import time
import uuid

import pika


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))]


class Publisher(threading.Thread):
    """Publishes one small persistent message at a time with confirms, to a
    durable queue, recording (start, latency) of each."""

    def __init__(self, url, queue, interval_s):
        super().__init__(daemon=True)
        self.url, self.queue, self.interval_s = url, queue, interval_s
        self.samples = []
        self.stop = threading.Event()

    def run(self):
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        ch.queue_declare(self.queue, durable=True)
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)
        while not self.stop.is_set():
            started = time.monotonic()
            ch.basic_publish("", self.queue, b"x" * 64, props)
            self.samples.append((started, time.monotonic() - started))
            ch.queue_purge(self.queue) if len(self.samples) % 1000 == 0 else None
            time.sleep(self.interval_s)
        ch.queue_delete(self.queue)
        conn.close()

    def latencies_ms(self, start, end):
        return [latency * 1000 for at, latency in self.samples if start <= at < end]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queues", type=int, default=10000)
    parser.add_argument("--publish-interval-ms", type=float, default=2.0)
    args = parser.parse_args()
    prefix = "bench-declare-%s-" % uuid.uuid4().hex[:6]
    publisher = Publisher(args.url, prefix + "publisher", args.publish_interval_ms / 1000)
    publisher.start()
    time.sleep(2.0)
    baseline_end = time.monotonic()
    conn = pika.BlockingConnection(pika.URLParameters(args.url))
    ch = conn.channel()
    started = time.monotonic()
    for n in range(args.queues):
        ch.queue_declare(prefix + str(n), durable=True)
    declare_s = time.monotonic() - started
    ended = time.monotonic()
    publisher.stop.set()
    publisher.join()
    during = publisher.latencies_ms(started, ended)
    before = publisher.latencies_ms(0, baseline_end)
    for n in range(args.queues):
        ch.queue_delete(prefix + str(n))
    conn.close()
    print(json.dumps({
        "queues": args.queues,
        "declare_s": round(declare_s, 2),
        "declares_per_s": round(args.queues / declare_s),
        "publishes_during": len(during),
        "publish_p50_ms": round(percentile(during, 50), 2),
        "publish_p99_ms": round(percentile(during, 99), 2),
        "publish_max_ms": round(max(during), 2),
        "baseline_p99_ms": round(percentile(before, 99), 2),
    }))


if __name__ == "__main__":
    main()
