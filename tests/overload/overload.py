#!/usr/bin/env python3
"""Overload: publishers at ten times the consumers' rate against a broker
with a memory high watermark, through pika.

Starts its own Warren (WARREN_BIN, else target/{release,debug}/warren) with
`memory_high_watermark_bytes`, then runs:

- PUBLISHERS publisher connections, each publishing BODY-byte messages with
  publisher confirms as fast as the broker lets it (half persistent, half
  transient), every message numbered;
- one consumer connection acking at a tenth of the publishers' first-second
  rate;
- a sampler reading the broker's resident set every 50 ms.

When the time is up the publishers stop, the consumer drains the queue at
full speed, and the run checks: peak RSS against the watermark plus the
margin, `connection.blocked` and `connection.unblocked` seen by publishers,
every confirmed message received (0 lost), the broker still running.

    python3 tests/overload/overload.py --seconds 180 --watermark-mb 256

With --port and --pid it runs against a broker already listening on that
port (guest/guest on 127.0.0.1), sampling the resident set of that process:
the same load against RabbitMQ started with the same watermark
(scripts/rabbitmq.sh with RABBITMQ_EXTRA_CONF, see docs/benchmarks.md).

Prints one JSON line with the figures; exits non-zero if a check fails.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUEUE = "overload"
# Documented overshoot allowance besides the relative margin: what arrives
# between two memory checks (100 ms) plus allocator slack.
MARGIN_BYTES = 16 * 1024 * 1024


def find_broker():
    explicit = os.environ.get("WARREN_BIN")
    if explicit:
        return explicit
    for profile in ("release", "debug"):
        path = os.path.join(ROOT, "target", profile, "warren")
        if os.path.exists(path):
            return path
    sys.exit("no broker binary: set WARREN_BIN or run `cargo build -p warren`")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Broker:
    def __init__(self, watermark, extra_config=""):
        self.dir = tempfile.mkdtemp(prefix="warren-overload-")
        self.port = free_port()
        config = os.path.join(self.dir, "warren.toml")
        with open(config, "w") as f:
            f.write("amqp_port = %d\nhttp_port = 0\nprometheus_port = 0\nbind = [\"127.0.0.1\"]\ndata_dir = \"%s\"\n"
                    "memory_high_watermark_bytes = %d\n%s" % (self.port, os.path.join(self.dir, "data"), watermark,
                                                               extra_config))
        self.log = open(os.path.join(self.dir, "warren.log"), "w")
        self.process = subprocess.Popen([find_broker(), "--config", config, "--log", "info"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError("broker did not start")
                time.sleep(0.05)

    def params(self):
        return pika.ConnectionParameters("127.0.0.1", self.port, heartbeat=0, blocked_connection_timeout=None)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def log_text(self):
        with open(os.path.join(self.dir, "warren.log")) as f:
            return f.read()

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class ExternalBroker:
    """A broker this script did not start: only sampled, never stopped."""

    class Process:
        def __init__(self, pid):
            self.pid = pid

        def poll(self):
            return None if os.path.exists("/proc/%d" % self.pid) else 1

    def __init__(self, port, pid):
        self.port = port
        self.process = ExternalBroker.Process(pid)

    def params(self):
        return pika.ConnectionParameters("127.0.0.1", self.port, heartbeat=0, blocked_connection_timeout=None)

    def stop(self):
        pass

    def log_text(self):
        return ""

    def cleanup(self):
        pass


class Publisher(threading.Thread):
    def __init__(self, broker, number, body, persistent, stop):
        super().__init__(daemon=True)
        self.broker, self.number, self.body, self.persistent, self.stop = broker, number, body, persistent, stop
        self.confirmed = []
        self.blocked = 0
        self.unblocked = 0
        self.blocked_seconds = 0.0
        self.blocked_since = None
        self.error = None

    def run(self):
        try:
            conn = pika.BlockingConnection(self.broker.params())
            conn.add_on_connection_blocked_callback(lambda *_: self._count("blocked"))
            conn.add_on_connection_unblocked_callback(lambda *_: self._count("unblocked"))
            ch = conn.channel()
            ch.confirm_delivery()
            props = pika.BasicProperties(delivery_mode=2 if self.persistent else 1)
            seq = 0
            while not self.stop.is_set():
                seq += 1
                ident = "%d-%d" % (self.number, seq)
                props.message_id = ident
                ch.basic_publish("", QUEUE, self.body, props)
                self.confirmed.append(ident)
                # Runs the blocked/unblocked callbacks queued meanwhile.
                conn.process_data_events(0)
            conn.close()
        except Exception as e:  # reported by the run, never swallowed
            self.error = repr(e)
        self._count("stopped")

    def _count(self, what):
        now = time.monotonic()
        if what == "blocked" and self.blocked_since is None:
            self.blocked_since = now
        elif what in ("unblocked", "stopped") and self.blocked_since is not None:
            self.blocked_seconds += now - self.blocked_since
            self.blocked_since = None
        if what != "stopped":
            setattr(self, what, getattr(self, what) + 1)


class Consumer(threading.Thread):
    def __init__(self, broker, rate, prefetch=200):
        super().__init__(daemon=True)
        self.broker = broker
        self.prefetch = prefetch
        self.rate = rate  # messages per second; None = as fast as possible
        self.received = set()
        self.deliveries = 0
        self.error = None
        self.done = threading.Event()
        self.lock = threading.Lock()

    def set_rate(self, rate):
        with self.lock:
            self.rate = rate

    def run(self):
        try:
            conn = pika.BlockingConnection(self.broker.params())
            ch = conn.channel()
            ch.basic_qos(prefetch_count=self.prefetch)
            started, count = time.time(), 0
            for method, props, _body in ch.consume(QUEUE, inactivity_timeout=0.5):
                if self.done.is_set() and method is None:
                    break
                if method is None:
                    continue
                self.received.add(props.message_id)
                self.deliveries += 1
                ch.basic_ack(method.delivery_tag)
                count += 1
                with self.lock:
                    rate = self.rate
                if rate:
                    ahead = count / rate - (time.time() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                else:
                    started, count = time.time(), 0
            conn.close()
        except Exception as e:
            self.error = repr(e)


def run(seconds, watermark_mb, publishers, body_kib, margin, external=None, transient=False, prefetch=200,
        expect_blocking=False):
    """transient: every message transient, into a non-durable queue (else
    half persistent, into a durable one). prefetch: the consumer's (0: no
    limit, so deliveries pile up unacknowledged in the broker, which no
    paging can take). expect_blocking: the memory alarm must block and
    unblock the publishers; else they must not be blocked for more than a
    second in all (the spike is paged to disk)."""
    watermark = watermark_mb * 1024 * 1024
    broker = ExternalBroker(*external) if external else Broker(watermark)
    try:
        setup = pika.BlockingConnection(broker.params())
        setup.channel().queue_delete(QUEUE)
        setup.channel().queue_declare(QUEUE, durable=not transient)
        setup.close()
        baseline = rss_bytes(broker.process.pid)

        stop = threading.Event()
        body = os.urandom(body_kib * 1024)
        pubs = [Publisher(broker, i, body, not transient and i % 2 == 0, stop) for i in range(publishers)]
        publish_started = time.time()
        for p in pubs:
            p.start()
        # The publishers' unhindered rate over the first second sets the
        # consumer at a tenth of it.
        time.sleep(1.0)
        publish_rate = max(1, sum(len(p.confirmed) for p in pubs))
        consumer = Consumer(broker, max(1, publish_rate // 10), prefetch)
        consumer.start()

        peak, samples = 0, 0
        deadline = time.time() + seconds
        while time.time() < deadline:
            if broker.process.poll() is not None:
                break
            peak = max(peak, rss_bytes(broker.process.pid))
            samples += 1
            time.sleep(0.05)
        stop.set()
        for p in pubs:
            p.join(60)
        publish_seconds = time.time() - publish_started
        drained_before = consumer.deliveries
        consumer.set_rate(None)
        drain_started = time.time()
        confirmed = {ident for p in pubs for ident in p.confirmed}
        drain_deadline = time.time() + 60
        while len(consumer.received & confirmed) < len(confirmed) and time.time() < drain_deadline:
            if broker.process.poll() is not None:
                break
            peak = max(peak, rss_bytes(broker.process.pid))
            time.sleep(0.1)
        drain_seconds = time.time() - drain_started
        drained = consumer.deliveries - drained_before
        consumer.done.set()
        consumer.join(30)
        alive = broker.process.poll() is None
        ready_after = None
        if alive:
            check = pika.BlockingConnection(broker.params())
            ready_after = check.channel().queue_declare(QUEUE, passive=True).method.message_count
            check.close()
        result = {
            "seconds": seconds,
            "publishers": publishers,
            "body_bytes": len(body),
            "first_second_publish_rate": publish_rate,
            "consumer_rate": publish_rate // 10,
            "watermark_bytes": watermark,
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak,
            "peak_over_watermark": round(peak / watermark, 3),
            "rss_samples": samples,
            "confirmed": len(confirmed),
            "received": len(consumer.received),
            "deliveries": consumer.deliveries,
            "lost": len(confirmed - consumer.received),
            "lost_sample": sorted(confirmed - consumer.received)[:10],
            "ready_after_drain": ready_after,
            "blocked_seen": sum(p.blocked for p in pubs),
            "unblocked_seen": sum(p.unblocked for p in pubs),
            "blocked_seconds_max": round(max((p.blocked_seconds for p in pubs), default=0.0), 3),
            "transient": transient,
            "accepted_per_second": round(len(confirmed) / publish_seconds),
            "drained_per_second": round(drained / max(drain_seconds, 0.001)),
            "publisher_errors": [p.error for p in pubs if p.error],
            "consumer_error": consumer.error,
            "broker_alive": alive,
        }
        stopped_cleanly = alive
        broker.stop()
        log = broker.log_text()
        result["memory_alarms"] = log.count("memory alarm set")
        if result["lost"] and os.environ.get("OVERLOAD_KEEP_LOG"):
            shutil.copy(os.path.join(broker.dir, "warren.log"), os.environ["OVERLOAD_KEEP_LOG"])
        result["broker_errors"] = [line for line in log.splitlines()
                                   if "ERROR" in line or ("WARN" in line and "alarm" not in line)][:10]
        checks = {
            "no confirmed message lost": result["lost"] == 0,
            "no client errors": not result["publisher_errors"] and result["consumer_error"] is None,
            "broker alive": stopped_cleanly,
        }
        if prefetch:
            checks["peak RSS within watermark + margin"] = peak <= watermark * (1 + margin) + MARGIN_BYTES
        # else a consumer without a prefetch limit pulls every queued message
        # into memory as an unacknowledged delivery, alarm or not.
        if expect_blocking:
            checks["publishers saw connection.blocked"] = result["blocked_seen"] > 0
            checks["publishers saw connection.unblocked"] = result["unblocked_seen"] > 0
        else:
            checks["no publisher blocked for more than 1 s in all"] = result["blocked_seconds_max"] <= 1.0
        result["checks"] = checks
        return result
    finally:
        broker.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--watermark-mb", type=int, default=256)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--body-kib", type=int, default=16)
    parser.add_argument("--margin", type=float, default=0.10,
                        help="allowed overshoot of peak RSS above the watermark, as a fraction "
                             "(on top of a fixed 16 MiB)")
    parser.add_argument("--transient", action="store_true",
                        help="transient messages into a non-durable queue (else half persistent, durable queue)")
    parser.add_argument("--prefetch", type=int, default=200,
                        help="the consumer's prefetch; 0 lets deliveries pile up unacknowledged")
    parser.add_argument("--expect-blocking", action="store_true",
                        help="check that the memory alarm blocks and unblocks the publishers")
    parser.add_argument("--port", type=int, help="use the broker already listening on this port")
    parser.add_argument("--pid", type=int, help="with --port: the process whose resident set is sampled")
    args = parser.parse_args()
    if (args.port is None) != (args.pid is None):
        parser.error("--port and --pid go together")
    external = (args.port, args.pid) if args.port else None
    result = run(args.seconds, args.watermark_mb, args.publishers, args.body_kib, args.margin, external,
                 transient=args.transient, prefetch=args.prefetch, expect_blocking=args.expect_blocking)
    print(json.dumps(result))
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        sys.exit("FAILED: " + ", ".join(failed))


if __name__ == "__main__":
    main()
