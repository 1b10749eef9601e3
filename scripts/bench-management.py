#!/usr/bin/env python3
"""The management API's cost to the broker, and large listings.

1. Publish-path overhead: `warren perf` (2 publishers, 2 consumers, 1 KiB,
   transient) against a broker with 1,000 queues, reporting the broker's CPU
   per message: with the HTTP API off, and with it on while a client polls
   `GET /api/queues` every second. Alternated, `--rounds` times each.
2. Large listing: 10,000 queues; the time of `GET /api/queues` (median of
   10), and the confirm latency p99 of a publisher while a client lists them
   back to back, against the same publisher with no listing.

Usage: scripts/bench-management.py [--binary target/release/warren] [--rounds 3]
"""

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %d" % port)


AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def request(http_port, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (http_port, path), data=data, method=method)
    req.add_header("Authorization", AUTH)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as response:
        return response.read()


class Broker:
    def __init__(self, binary, http):
        self.dir = tempfile.mkdtemp(prefix="warren-bench-mgmt-")
        self.amqp, self.http = free_port(), free_port()
        env = dict(os.environ, WARREN_PROMETHEUS_PORT="0")
        self.log = os.path.join(self.dir, "warren.log")
        self.process = subprocess.Popen(
            [binary, "--amqp-port", str(self.amqp), "--http-port", str(self.http if http else 0),
             "--bind", "127.0.0.1", "--data-dir", os.path.join(self.dir, "data"),
             "--log", "warn,warren_management=debug"],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        wait_port(self.amqp)
        if http:
            wait_port(self.http)

    def stop(self):
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def declare_queues(broker, prefix, count):
    """Non-durable queues no connection owns, declared with pika."""
    import pika
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", broker.amqp))
    channel = connection.channel()
    for i in range(count):
        channel.queue_declare(prefix + str(i))
    connection.close()


def perf(binary, broker, extra):
    line = subprocess.run(
        [binary, "perf", "--port", str(broker.amqp), "--broker-pid", str(broker.process.pid), "--json"] + extra,
        check=True, capture_output=True, text=True, timeout=600).stdout.strip().splitlines()[-1]
    return json.loads(line)


def poll(http_port, every, stop, timings):
    while not stop.is_set():
        started = time.monotonic()
        request(http_port, "GET", "/api/queues")
        timings.append(time.monotonic() - started)
        if every:
            stop.wait(every)


def overhead(binary, rounds):
    load = ["--producers", "2", "--consumers", "2", "--size", "1024", "--duration", "10"]
    results = {"off": [], "on+poll": []}
    for _ in range(rounds):
        for mode in ("off", "on+poll"):
            broker = Broker(binary, http=(mode != "off"))
            try:
                declare_queues(broker, "idle-", 1000)
                if mode == "off":
                    result = perf(binary, broker, load)
                else:
                    stop, timings = threading.Event(), []
                    poller = threading.Thread(target=poll, args=(broker.http, 1.0, stop, timings))
                    poller.start()
                    result = perf(binary, broker, load)
                    stop.set()
                    poller.join()
                results[mode].append(result["broker_cpu_us_per_msg"])
                print("%-8s %8.0f msg/s  broker CPU %.2f us/msg" % (
                    mode, result["published_per_s"], result["broker_cpu_us_per_msg"]), flush=True)
            finally:
                broker.stop()
    off, on = statistics.median(results["off"]), statistics.median(results["on+poll"])
    print("publish path: broker CPU/msg median off %.2f us, on with polling %.2f us: %+.1f%%" % (
        off, on, (on / off - 1) * 100))


def listing(binary):
    broker = Broker(binary, http=True)
    try:
        declare_queues(broker, "many-", 10_000)
        times = []
        for _ in range(10):
            started = time.monotonic()
            body = request(broker.http, "GET", "/api/queues")
            times.append(time.monotonic() - started)
        assert len(json.loads(body)) == 10_000
        print("GET /api/queues with 10,000 queues: median %.0f ms, max %.0f ms (%d KiB)" % (
            statistics.median(times) * 1000, max(times) * 1000, len(body) // 1024))
        import re
        held = [int(m) for m in re.findall(r"longest_lock_us=(\d+)", open(broker.log).read())]
        print("longest hold of the vhost lock per listing: max %d us over %d listings" % (max(held), len(held)))
        load = ["--producers", "1", "--consumers", "1", "--size", "1024", "--confirm", "10",
                "--rate", "2000", "--duration", "10"]
        for every, label in ((1.0, "listed every second"), (0, "listed back to back")):
            quiet = perf(binary, broker, load)
            stop, timings = threading.Event(), []
            poller = threading.Thread(target=poll, args=(broker.http, every, stop, timings))
            poller.start()
            busy = perf(binary, broker, load)
            stop.set()
            poller.join()
            print("confirm latency p99 at 2,000 msg/s: %.2f ms alone, %.2f ms while /api/queues is %s "
                  "(%d listings)" % (quiet["confirm_us_p99"] / 1000, busy["confirm_us_p99"] / 1000, label,
                                     len(timings)))
    finally:
        broker.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/warren")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["overhead", "listing"])
    args = parser.parse_args()
    if args.only != "listing":
        overhead(args.binary, args.rounds)
    if args.only != "overhead":
        listing(args.binary)


if __name__ == "__main__":
    main()
