#!/usr/bin/env python3
"""Recovery time with many deleted durable queues in the log: a broker
binary is started on a fresh data directory, given --live persistent
messages in one durable queue and --deleted durable queues that each got a
persistent message and were then deleted, stopped (SIGTERM) and started
again; the restart is timed until a client completes a passive declare.

    python3 scripts/bench-recovery-deleted.py --bin target/release/warren [--deleted 10000] [--live 100000]

Prints one JSON line: fill_s, restart_s, and the live queue's count after it.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pika


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, port, data_dir):
    return subprocess.Popen([binary, "--amqp-port", str(port), "--http-port", "0", "--prometheus-port", "0", "--bind", "127.0.0.1", "--data-dir", data_dir,
                             "--log", "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def connect_when_up(url, deadline):
    while True:
        try:
            return pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True)
    parser.add_argument("--deleted", type=int, default=10000)
    parser.add_argument("--live", type=int, default=100000)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="warren-recovery-bench-")
    port = free_port()
    url = "amqp://guest:guest@127.0.0.1:%d/%%2F" % port
    broker = start(args.bin, port, data_dir)
    try:
        started = time.monotonic()
        conn = connect_when_up(url, time.monotonic() + 30)
        ch = conn.channel()
        persistent = pika.BasicProperties(delivery_mode=2)
        ch.queue_declare("live", durable=True)
        # Unconfirmed: the graceful stop below commits what is pending.
        for _ in range(args.live):
            ch.basic_publish("", "live", b"x" * 100, persistent)
        for n in range(args.deleted):
            name = "deleted-%d" % n
            ch.queue_declare(name, durable=True)
            ch.basic_publish("", name, b"gone", persistent)
            ch.queue_delete(name)
        live_before = ch.queue_declare("live", durable=True, passive=True).method.message_count
        conn.close()
        fill_s = time.monotonic() - started
        broker.send_signal(signal.SIGTERM)
        broker.wait(60)
        restarted = time.monotonic()
        broker = start(args.bin, port, data_dir)
        conn = connect_when_up(url, time.monotonic() + 600)
        live_after = conn.channel().queue_declare("live", durable=True, passive=True).method.message_count
        restart_s = time.monotonic() - restarted
        conn.close()
        print(json.dumps({"deleted_queues": args.deleted, "live": live_before, "fill_s": round(fill_s, 1),
                          "restart_s": round(restart_s, 2), "live_after_restart": live_after}))
    finally:
        broker.kill()
        broker.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
