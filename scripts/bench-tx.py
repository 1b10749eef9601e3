#!/usr/bin/env python3
"""tx.commit latency: publishers each commit transactions of N persistent
messages into a durable queue, as fast as their commits come back; reports
the commit latency (tx.commit sent to commit-ok) p50/p99 and messages/s.
Runs against every broker given, one after the other, in the same run.

    scripts/bench-tx.py --broker warren=5672 --broker rabbitmq=5673 \\
        [--publishers 4] [--batch 100] [--seconds 10]
"""

import argparse
import statistics
import threading
import time
import uuid

import pika


def publisher(port, queue, batch, deadline, latencies, counts):
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    channel = connection.channel()
    channel.tx_select()
    body = b"x" * 1024
    properties = pika.BasicProperties(delivery_mode=2)
    mine = []
    sent = 0
    while time.monotonic() < deadline:
        for _ in range(batch):
            channel.basic_publish("", queue, body, properties)
        started = time.perf_counter()
        channel.tx_commit()
        mine.append(time.perf_counter() - started)
        sent += batch
    latencies.extend(mine)
    counts.append(sent)
    connection.close()


def run(name, port, publishers, batch, seconds):
    queue = "bench-tx-" + uuid.uuid4().hex[:8]
    setup = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    setup.channel().queue_declare(queue, durable=True)
    latencies, counts = [], []
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=publisher, args=(port, queue, batch, deadline, latencies, counts))
               for _ in range(publishers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    setup.channel().queue_delete(queue)
    setup.close()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    rate = sum(counts) / elapsed
    print("%-10s commits %6d  p50 %7.2f ms  p99 %7.2f ms  %8.0f msg/s" % (name, len(latencies), p50, p99, rate))
    return p50, p99, rate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", action="append", required=True, help="name=port")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print("# %d publishers, transactions of %d persistent 1 KiB messages into a durable queue"
          % (args.publishers, args.batch))
    results = {}
    for spec in args.broker:
        name, port = spec.split("=")
        results[name] = run(name, int(port), args.publishers, args.batch, args.seconds)
    names = list(results)
    if len(names) == 2:
        (a, b) = (results[names[0]], results[names[1]])
        print("# %s / %s: p50 %.2fx, p99 %.2fx lower latency; %.2fx the throughput"
              % (names[0], names[1], b[0] / a[0], b[1] / a[1], a[2] / b[2]))


if __name__ == "__main__":
    main()
