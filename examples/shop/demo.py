"""The shop demo, in one command: starts a Warren broker, the cart service and
the inventory service, then plays a timeline against the cart's HTTP API and
prints what happens:

  (1) steady traffic, inventory up;
  (2) a burst of add-item requests, ten or more times what inventory handles
      per second: the queue absorbs it and inventory drains it at its own pace;
  (3) inventory killed with SIGKILL in the middle of that backlog, traffic
      going on: the cart keeps answering at its normal speed;
  (4) inventory restarted: it works through the backlog;
  (5) a buggy producer publishes malformed requests: each is retried a few
      times, then dead-lettered to inventory.dead, while the others flow.

At the end it checks that nothing was lost or done twice: every request the
cart accepted reached a final status in the cart, the inventory's SQLite
database holds exactly one reservation per accepted request, stock went down
by exactly the reserved quantities, and the malformed requests are in
inventory.dead. It exits non-zero if any check fails.

    python3 examples/shop/demo.py            # about a minute
    python3 examples/shop/demo.py --quick    # smaller numbers, under 30 s

Binaries: $WARREN_BIN, else target/release/warren, else target/debug/warren;
$SHOP_CART_BIN, else target/release/shop-cart, else target/debug/shop-cart,
whichever is newer than the sources; when neither is, the demo builds them
first (`cargo build --release -p warren -p shop-cart`, a few minutes the
first time).
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

try:
    import pika
    import pika.exceptions
except ImportError:
    sys.exit("the demo needs pika: python3 -m pip install pika")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import inventory  # noqa: E402  (the wiring: exchange, queue names and arguments)
import local_broker  # noqa: E402  (finds or builds the binaries)

# The numbers of the timeline. The inventory is slowed down to `rate`
# requests per second so that a backlog builds up and can be watched.
FULL = dict(rate=50, background=10, steady=6, burst=1000, burst_threads=8,
            drain_before_kill=4, outage=8, carts=40, rare_stock=40)
QUICK = dict(rate=40, background=5, steady=2, burst=400, burst_threads=6,
             drain_before_kill=1.5, outage=3, carts=20, rare_stock=15)

# SKUs the load asks for: the 20 seeded ones, a scarce one (some requests are
# rejected once it runs out) and one inventory does not know (rejected).
RARE_SKU = "sku-rare"
UNKNOWN_SKU = "sku-retired"

# What the buggy producer publishes to the request queue.
POISON = [
    ("poison-not-json", b'{"reservation_id": "poison-not-json", "sku": "sku-1", "qty": 1'),
    ("poison-no-sku", json.dumps({"reservation_id": "poison-no-sku", "cart_id": "cart-1", "qty": 1}).encode()),
    ("poison-bad-qty", json.dumps({"reservation_id": "poison-bad-qty", "cart_id": "cart-1",
                                   "sku": "sku-1", "qty": "two"}).encode()),
]

print_lock = threading.Lock()


def say(line=""):
    with print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, pika.exceptions.AMQPError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting for " + what)
        time.sleep(0.05)


def percentile(values, p):
    """Nearest-rank percentile of a list of numbers (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))]


def ms(seconds):
    return "-" if seconds is None else "%.1f" % (seconds * 1000)


class Shop:
    """The three processes, their logs in a temporary directory."""

    def __init__(self, warren_bin, cart_bin, workdir, settings):
        self.warren_bin, self.cart_bin, self.workdir = warren_bin, cart_bin, workdir
        self.settings = settings
        self.amqp_port, self.http_port = free_port(), free_port()
        self.url = "amqp://guest:guest@127.0.0.1:%d/%%2F" % self.amqp_port
        self.db_path = os.path.join(workdir, "inventory.db")
        self.broker = self.cart = self.inventory = None
        self.inventory_log = os.path.join(workdir, "inventory.log")

    def log(self, name):
        return open(os.path.join(self.workdir, name), "ab")

    def start_broker(self):
        data = os.path.join(self.workdir, "warren-data")
        self.broker = subprocess.Popen(
            [self.warren_bin, "--amqp-port", str(self.amqp_port), "--http-port", "0", "--prometheus-port", "0", "--bind", "127.0.0.1",
             "--data-dir", data, "--log", "warn"],
            stdout=self.log("warren.log"), stderr=subprocess.STDOUT)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.amqp_port), 1).close() or True,
                 30, "the broker to listen")

    def start_cart(self):
        self.cart = subprocess.Popen(
            [self.cart_bin, "--amqp-url", self.url, "--listen", "127.0.0.1:%d" % self.http_port],
            stdout=self.log("cart.log"), stderr=subprocess.STDOUT)

        def answers():
            if self.cart.poll() is not None:
                raise SystemExit("the cart exited with code %s (see %s)"
                                 % (self.cart.returncode, os.path.join(self.workdir, "cart.log")))
            status, _ = http_call(self.http_port, "GET", "/stats")
            return status == 200
        wait_for(answers, 30, "the cart to answer")

    def start_inventory(self):
        self.inventory = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "inventory.py"), "--url", self.url, "--db", self.db_path,
             "--rate", str(self.settings["rate"]), "--prefetch", "20",
             "--seed", "%s=%d" % (RARE_SKU, self.settings["rare_stock"])],
            stdout=self.log("inventory.log"), stderr=subprocess.STDOUT)
        return self.inventory.pid

    def kill_inventory(self):
        self.inventory.send_signal(signal.SIGKILL)
        self.inventory.wait()

    def stop(self):
        for process in (self.inventory, self.cart, self.broker):
            if process is not None and process.poll() is None:
                process.terminate()
        for process in (self.inventory, self.cart, self.broker):
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def http_call(port, method, path, body=None, connection=None):
    """(status, decoded JSON body) of one request; reuses `connection` if given."""
    own = connection is None
    if own:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, payload, headers)
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data
    finally:
        if own:
            connection.close()


class Load:
    """Users adding items to carts through the cart's HTTP API, from a few
    threads, each keeping its HTTP connection open. Records every request:
    phase, start time, latency, result."""

    def __init__(self, port, settings, clock):
        self.port, self.settings, self.clock = port, settings, clock
        self.phase = "steady"
        self.lock = threading.Lock()
        self.records = []  # (phase, started, latency, status, reservation_id, cart, sku, qty)
        self.random = random.Random(7)
        self.stop_background = threading.Event()
        self.background_threads = []

    def item(self):
        with self.lock:
            r = self.random.random()
            cart = "cart-%d" % self.random.randint(1, self.settings["carts"])
            if r < 0.06:
                sku = RARE_SKU
            elif r < 0.08:
                sku = UNKNOWN_SKU
            else:
                sku = "sku-%d" % self.random.randint(1, 20)
            return cart, sku, self.random.randint(1, 3)

    def add_item(self, connection):
        cart, sku, qty = self.item()
        phase, started = self.phase, self.clock()
        try:
            status, body = http_call(self.port, "POST", "/carts/%s/items" % cart, {"sku": sku, "qty": qty},
                                     connection)
            reservation_id = body.get("reservation_id") if status == 202 and isinstance(body, dict) else None
            if status == 202 and (not reservation_id or body.get("status") != "pending"):
                status = "202 without reservation_id/pending: %r" % (body,)
        except (OSError, http.client.HTTPException) as error:
            status, reservation_id = "%s: %s" % (error.__class__.__name__, error), None
            connection.close()  # reconnects on the next request
        latency = self.clock() - started
        with self.lock:
            self.records.append((phase, started, latency, status, reservation_id, cart, sku, qty))

    def background(self):
        """Starts the steady trickle of users, which runs through every phase."""
        threads = 2
        interval = threads / float(self.settings["background"])

        def user(offset):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            next_at = self.clock() + offset
            while not self.stop_background.is_set():
                delay = next_at - self.clock()
                if delay > 0 and self.stop_background.wait(delay):
                    break
                next_at = max(next_at + interval, self.clock() - interval)
                self.add_item(connection)
            connection.close()

        for n in range(threads):
            thread = threading.Thread(target=user, args=(n * interval / threads,), daemon=True)
            thread.start()
            self.background_threads.append(thread)

    def end_background(self):
        self.stop_background.set()
        for thread in self.background_threads:
            thread.join()

    def burst(self, count, threads):
        """`count` add-item requests as fast as the cart takes them."""
        left = [count]

        def user():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            while True:
                with self.lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                self.add_item(connection)
            connection.close()

        workers = [threading.Thread(target=user, daemon=True) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def snapshot(self):
        with self.lock:
            return list(self.records)


class Monitor(threading.Thread):
    """Samples the request queue (passive declare) and the cart's counts every
    200 ms, and prints one timeline line per second."""

    HEADER = "  t(s)  phase      inventory  adds/s  p99 ms  queued  pending  reserved  rejected"

    def __init__(self, shop, load, clock):
        super().__init__(daemon=True)
        self.shop, self.load, self.clock = shop, load, clock
        self.samples = []  # (t, ready in the queue, consumers, pending, reserved, rejected)
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        try:
            self.sample()
        except Exception as error:  # the demo waits on these samples: say why they stopped
            say("monitor stopped: %r" % (error,))
            raise

    def sample(self):
        connection = pika.BlockingConnection(pika.URLParameters(self.shop.url))
        channel = connection.channel()
        http_connection = http.client.HTTPConnection("127.0.0.1", self.shop.http_port, timeout=10)
        next_line = 1.0
        while not self.stopped.is_set():
            queue = channel.queue_declare(inventory.REQUESTS, passive=True).method
            try:
                _, stats = http_call(self.shop.http_port, "GET", "/stats", connection=http_connection)
            except (OSError, http.client.HTTPException):
                http_connection.close()
                stats = {}
            now = self.clock()
            sample = (now, queue.message_count, queue.consumer_count,
                      stats.get("pending"), stats.get("reserved"), stats.get("rejected"))
            with self.lock:
                self.samples.append(sample)
            if now >= next_line:
                self.line(sample)
                next_line += 1.0
            connection.process_data_events(time_limit=0)
            self.stopped.wait(0.2)
        connection.close()
        http_connection.close()

    def line(self, sample):
        now, ready, consumers, pending, reserved, rejected = sample
        recent = [r for r in self.load.snapshot() if now - 1.0 <= r[1] < now]
        say("%6.1f  %-10s %-9s  %6d  %6s  %6d  %7s  %8s  %8s"
            % (now, self.load.phase, "up" if consumers else "DOWN", len(recent),
               ms(percentile([r[2] for r in recent], 99)), ready, pending, reserved, rejected))

    def latest(self):
        with self.lock:
            return self.samples[-1] if self.samples else None

    def cart_pending(self):
        sample = self.latest()
        return None if sample is None else sample[3]


def consumers(channel):
    return channel.queue_declare(inventory.REQUESTS, passive=True).method.consumer_count


def run(settings, shop):
    clock_zero = time.monotonic()

    def clock():
        return time.monotonic() - clock_zero

    figures = {}
    shop.start_broker()
    shop.start_cart()
    shop.start_inventory()
    connection = pika.BlockingConnection(pika.URLParameters(shop.url))
    channel = connection.channel()
    wait_for(lambda: consumers(channel) == 1, 30, "the inventory to consume")
    # Order events, to check that checkout publishes them.
    orders = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(orders, inventory.EXCHANGE, routing_key="order.placed")

    load = Load(shop.http_port, settings, clock)
    monitor = Monitor(shop, load, clock)
    rate = settings["rate"]
    say("Broker %s, cart http://127.0.0.1:%d, inventory handling at most %d requests/s (prefetch 20)."
        % (shop.url, shop.http_port, rate))
    say("Logs and the inventory database: %s" % shop.workdir)
    say()
    say("-- (1) steady traffic: %d add-item requests/s, inventory up" % settings["background"])
    say(Monitor.HEADER)
    clock_zero = time.monotonic()
    monitor.start()
    load.background()
    connection.sleep(settings["steady"])

    # (2) The burst.
    load.phase = "burst"
    say("-- (2) burst: %d add-item requests at once (%dx what inventory handles per second)"
        % (settings["burst"], settings["burst"] // rate))
    started = clock()
    load.burst(settings["burst"], settings["burst_threads"])
    took = clock() - started
    figures["burst"] = (settings["burst"], took)
    say("-- burst sent in %.1f s (%.0f requests/s, %.0fx inventory's rate); the queue absorbs it"
        % (took, settings["burst"] / took, settings["burst"] / took / rate))
    load.phase = "draining"
    connection.sleep(settings["drain_before_kill"])

    # (3) The outage.
    load.phase = "outage"
    pid = shop.inventory.pid
    shop.kill_inventory()
    say("-- (3) inventory killed (SIGKILL, pid %d) with its prefetched requests unacknowledged;"
        " traffic goes on" % pid)
    connection.sleep(settings["outage"])

    # (4) Recovery.
    load.phase = "recovery"
    shop.start_inventory()
    wait_for(lambda: consumers(channel) == 1, 30, "the inventory to consume again")
    recovered_at, recovered_wall = clock(), time.time()
    backlog = monitor.cart_pending()
    say("-- (4) inventory restarted (pid %d): %s requests waiting; it drains them at its own pace"
        % (shop.inventory.pid, backlog))

    def drained():
        sample = monitor.latest()
        return sample is not None and sample[0] > recovered_at and sample[1] == 0 and sample[3] is not None \
            and sample[3] <= max(3, settings["background"] // 2)
    wait_for(drained, 300, "the backlog to drain")
    drained_at, drained_wall = clock(), time.time()
    db = sqlite3.connect("file:%s?mode=ro" % shop.db_path, uri=True, timeout=30)
    processed, first, last = db.execute(
        "SELECT count(*), min(processed_at), max(processed_at) FROM reservations"
        " WHERE processed_at BETWEEN ? AND ?", (recovered_wall, drained_wall)).fetchone()
    db.close()
    # Handled per second, from the inventory's own timestamps.
    drain_rate = (processed - 1) / (last - first) if processed > 1 and last > first else 0.0
    figures["drain"] = (backlog, drained_at - recovered_at, processed, drain_rate)
    say("-- backlog drained in %.1f s: %d requests handled, %.1f/s"
        % (drained_at - recovered_at, processed, drain_rate))

    # (5) Poison messages from a buggy producer.
    load.phase = "poison"
    say("-- (5) a buggy producer publishes %d malformed requests straight to the exchange" % len(POISON))
    channel.confirm_delivery()
    poisoned_at = clock()
    for message_id, body in POISON:
        channel.basic_publish(inventory.EXCHANGE, inventory.REQUEST_KEY, body,
                              pika.BasicProperties(delivery_mode=2, message_id=message_id,
                                                   content_type="application/json", reply_to="cart.replies"))

    def dead_count():
        return channel.queue_declare(inventory.DEAD, passive=True).method.message_count
    try:
        wait_for(lambda: dead_count() >= len(POISON), 15, "the malformed requests to be dead-lettered")
        figures["poison_dead_after"] = clock() - poisoned_at
        say("-- all %d in %s after %.1f s (retried after 200, 400, 800 ms, then dead-lettered)"
            % (len(POISON), inventory.DEAD, figures["poison_dead_after"]))
    except TimeoutError as error:
        say("-- %s" % error)
    connection.sleep(1.0)
    load.end_background()
    load.phase = "done"
    say("-- traffic stopped; waiting for the last replies")
    try:
        wait_for(lambda: monitor.cart_pending() == 0, 60, "the cart to have no pending item")
    except TimeoutError as error:
        say("-- %s" % error)
    connection.sleep(0.5)
    monitor.stopped.set()
    monitor.join()
    say()
    return audit(shop, load, channel, orders, figures, settings)


def audit(shop, load, channel, orders, figures, settings):
    checks = []

    def check(ok, line):
        checks.append(ok)
        say("%s %s" % ("  ok  " if ok else "  FAIL", line))

    records = load.snapshot()
    accepted = {r[4]: r for r in records if r[3] == 202}
    failed = [r for r in records if r[3] != 202]
    duplicate_ids = len(records) - len(failed) - len(accepted)

    # The cart's view of every cart.
    cart_items = {}
    for n in range(1, settings["carts"] + 1):
        cart = "cart-%d" % n
        status, body = http_call(shop.http_port, "GET", "/carts/%s" % cart)
        if status == 200:
            for item in body.get("items", []):
                cart_items[item.get("reservation_id")] = (cart, item)
    final = {rid: item["status"] for rid, (_, item) in cart_items.items()
             if item.get("status") in ("reserved", "rejected")}
    lost = [rid for rid in accepted if rid not in final]
    wrong = [rid for rid, r in accepted.items() if rid in cart_items
             and (cart_items[rid][0], cart_items[rid][1].get("sku"), cart_items[rid][1].get("qty")) != r[5:8]]
    extra = [rid for rid in cart_items if rid not in accepted]

    # The inventory's database.
    db = sqlite3.connect("file:%s?mode=ro" % shop.db_path, uri=True, timeout=30)
    rows = {rid: (status, sku, qty, deliveries, redelivered)
            for rid, status, sku, qty, deliveries, redelivered in db.execute(
                "SELECT reservation_id, status, sku, qty, deliveries, redelivered FROM reservations")}
    missing_rows = [rid for rid in accepted if rid not in rows]
    unknown_rows = [rid for rid in rows if rid not in accepted]
    mismatched = [rid for rid in accepted if rid in rows and rid in final and rows[rid][0] != final[rid]]
    handled_again = sum(1 for row in rows.values() if row[3] > 1)
    redelivered_first = sum(1 for row in rows.values() if row[4])
    reserved_by_sku = {}
    for status, sku, qty, _, _ in rows.values():
        if status == "reserved":
            reserved_by_sku[sku] = reserved_by_sku.get(sku, 0) + qty
    stock_off = [(sku, initial - available, reserved_by_sku.get(sku, 0))
                 for sku, initial, available in db.execute("SELECT sku, initial, available FROM stock")
                 if initial - available != reserved_by_sku.get(sku, 0)]
    reserved = sum(1 for status in final.values() if status == "reserved")
    rejected = sum(1 for status in final.values() if status == "rejected")

    # The dead-letter queue, looked at without taking anything out of it.
    dead = {}
    while True:
        method, props, body = channel.basic_get(inventory.DEAD, auto_ack=False)
        if method is None:
            break
        death = ((props.headers or {}).get("x-death") or [{}])[0]
        dead[props.message_id] = (death.get("reason"), death.get("queue"), body)
    channel.basic_recover(requeue=True)
    dead_ok = [mid for mid, body in POISON
               if mid in dead and dead[mid][0] == "delivery_limit" and dead[mid][2] == body]
    deliveries = {}
    with open(shop.inventory_log, errors="replace") as log:
        for line in log:
            found = re.search(r"malformed request .*\(delivery \d+, message_id (\S+)\)", line)
            if found:
                deliveries[found.group(1)] = deliveries.get(found.group(1), 0) + 1

    # Checkout: every cart with something reserved places an order.
    placed, refused = [], []
    for n in range(1, settings["carts"] + 1):
        cart = "cart-%d" % n
        if any(c == cart and final.get(rid) == "reserved" for rid, (c, _) in cart_items.items()):
            status, body = http_call(shop.http_port, "POST", "/carts/%s/checkout" % cart)
            (placed if status == 202 and isinstance(body, dict) and body.get("order_id") else refused).append(
                (cart, status, body))
    events = set()
    deadline = time.monotonic() + 5
    while len(events) < len(placed) and time.monotonic() < deadline:
        method, _, body = channel.basic_get(orders, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        events.add(json.loads(body).get("order_id"))
    orders_ok = not refused and events == {body["order_id"] for _, _, body in placed}

    # Latency of the cart, per phase.
    by_phase = {}
    for r in records:
        by_phase.setdefault(r[0], []).append(r[2])

    say("== Checks")
    check(not failed, "cart answered every add-item request: %d of %d with 202%s"
          % (len(records) - len(failed), len(records),
             "" if not failed else " (first failures: %s)" % [r[3] for r in failed[:3]]))
    check(duplicate_ids == 0, "reservation ids unique: %d repeated" % duplicate_ids)
    check(not lost, "every accepted request reached a final status in the cart: %d reserved + %d rejected"
                    " of %d accepted" % (reserved, rejected, len(accepted)))
    check(not wrong and not extra, "cart items match what was added: %d wrong, %d unknown"
          % (len(wrong), len(extra)))
    check(not missing_rows and not unknown_rows,
          "SQLite has exactly one reservation per accepted request: %d rows, %d missing, %d unknown"
          % (len(rows), len(missing_rows), len(unknown_rows)))
    check(not mismatched, "cart and inventory agree on every outcome: %d differ" % len(mismatched))
    check(not stock_off, "stock went down by exactly the reserved quantities%s"
          % ("" if not stock_off else ": %s" % stock_off[:5]))
    check(len(dead_ok) == len(POISON), "malformed requests in %s with reason delivery_limit: %d of %d (%s)"
          % (inventory.DEAD, len(dead_ok), len(POISON),
             ", ".join("%s: %d deliveries" % (mid, deliveries.get(mid, 0)) for mid, _ in POISON)))
    check(orders_ok, "checkout: %d orders placed, %d order.placed events seen%s"
          % (len(placed), len(events), "" if not refused else ", refused: %s" % refused[:3]))

    burst_count, burst_took = figures["burst"]
    backlog, drain_took, drained, drain_rate = figures["drain"]
    say()
    say("== Summary")
    say("requests accepted by the cart: %d (%d failed)" % (len(accepted), len(failed)))
    say("final in the cart: %d reserved, %d rejected (out of stock or unknown sku), %d pending"
        % (reserved, rejected, len(lost)))
    say("lost: %d" % (len(lost) + len(missing_rows)))
    say("duplicates: %d" % (len(stock_off) + len(unknown_rows) + duplicate_ids))
    say("redelivered after the kill: %d requests (%d new to inventory, %d already handled and answered"
        " from the stored outcome, stock untouched)" % (redelivered_first + handled_again, redelivered_first,
                                                        handled_again))
    say("poison messages dead-lettered: %d of %d" % (len(dead_ok), len(POISON)))
    say("burst: %d requests in %.1f s = %.0f/s, %.0fx inventory's %d/s"
        % (burst_count, burst_took, burst_count / burst_took, burst_count / burst_took / settings["rate"],
           settings["rate"]))
    say("drain after recovery: %s waiting requests (and %d arriving meanwhile) cleared in %.1f s:"
        " %.1f requests/s handled (limit %d/s)"
        % (backlog, max(0, drained - (backlog or 0)), drain_took, drain_rate, settings["rate"]))
    say("cart add-item latency, ms:")
    for phase, label in (("steady", "inventory up"), ("burst", "during the burst"),
                         ("draining", "after the burst, draining"), ("outage", "inventory down (killed)"),
                         ("recovery", "inventory back, draining"), ("poison", "poison retries")):
        latencies = by_phase.get(phase, [])
        say("  %-28s n=%5d  p50 %6s  p99 %6s  max %6s"
            % (label, len(latencies), ms(percentile(latencies, 50)), ms(percentile(latencies, 99)),
               ms(max(latencies) if latencies else None)))
    ok = all(checks)
    say("RESULT: %s" % ("PASS" if ok else "FAIL"))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller numbers (under 30 s), for the tests")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the database afterwards")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    found = local_broker.binaries({"warren": "WARREN_BIN", "shop-cart": "SHOP_CART_BIN"})
    warren_bin, cart_bin = found["warren"], found["shop-cart"]
    workdir = tempfile.mkdtemp(prefix="shop-demo-")
    shop = Shop(warren_bin, cart_bin, workdir, settings)
    ok = False
    try:
        ok = run(settings, shop)
    finally:
        shop.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say("logs and database kept in %s" % workdir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
