#!/usr/bin/env python3
"""Write amplification of dead-lettering: persistent messages are published
into a durable queue with a dead-letter queue, then all rejected; reports
the bytes the broker process wrote to disk (/proc/PID/io write_bytes) per
message body byte, for the publishes and for the dead-lettering. With
`--delayed`, the same for messages released by a durable delayed exchange
(Warren only: RabbitMQ 3.10.8 as packaged has no delayed-message plugin).

    scripts/bench-deadletter.py --broker warren=5672:PID \\
        --broker rabbitmq=5673:PID [--count 200] [--size 65536] [--delayed]
"""

import argparse
import time
import uuid

import pika


def written(pid):
    with open("/proc/%d/io" % pid) as io:
        for line in io:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise SystemExit("no write_bytes for pid %d" % pid)


def settle(pid):
    """Waits until the process stops writing (the last fsync done)."""
    last = written(pid)
    while True:
        time.sleep(0.3)
        now = written(pid)
        if now == last:
            return now
        last = now


def depth(channel, queue):
    return channel.queue_declare(queue, passive=True).method.message_count


def run(name, port, pid, count, size, delayed):
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    channel = connection.channel()
    channel.confirm_delivery()
    tag = uuid.uuid4().hex[:8]
    work, dlq = "bench-dl-" + tag, "bench-dlq-" + tag
    channel.queue_declare(dlq, durable=True)
    channel.queue_declare(work, durable=True, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
    body = b"x" * size
    properties = pika.BasicProperties(delivery_mode=2)
    exchange, key = "", work
    if delayed:
        exchange = "bench-delayed-" + tag
        channel.exchange_declare(exchange, "x-delayed-message", durable=True,
                                 arguments={"x-delayed-type": "direct"})
        channel.queue_bind(work, exchange, work)
        properties = pika.BasicProperties(delivery_mode=2, headers={"x-delay": 200})
    start = settle(pid)
    for _ in range(count):
        channel.basic_publish(exchange, key, body, properties)
    while depth(channel, work) < count:
        time.sleep(0.05)
    published = settle(pid)
    for _ in range(count):
        method, _, _ = channel.basic_get(work)
        channel.basic_nack(method.delivery_tag, requeue=False)
    while depth(channel, dlq) < count:
        time.sleep(0.05)
    dead = settle(pid)
    payload = count * size
    what = "delayed publish" if delayed else "publish"
    print("%-10s %s %.2f B/B   dead-letter %.2f B/B   (%d x %d B)" % (
        name, what, (published - start) / payload, (dead - published) / payload, count, size))
    channel.queue_delete(work)
    channel.queue_delete(dlq)
    if delayed:
        channel.exchange_delete(exchange)
    connection.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", action="append", required=True, help="name=port:pid")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--delayed", action="store_true")
    args = parser.parse_args()
    for broker in args.broker:
        name, rest = broker.split("=", 1)
        port, pid = rest.split(":")
        run(name, int(port), int(pid), args.count, args.size, args.delayed)


if __name__ == "__main__":
    main()
