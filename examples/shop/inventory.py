"""The shop's inventory service: owns the stock levels (SQLite) and answers
the cart's reservation requests, which it takes from Warren at its own pace.

    python3 examples/shop/inventory.py --url amqp://guest:guest@localhost:5672/%2F

It never talks to the cart. Requests arrive on the durable queue
"inventory.reservations" (bound to the topic exchange "shop" with the key
"reservation.request"); each outcome goes back to the request's reply_to
queue ("cart.replies") as a persistent, confirmed message.

For each request, in one SQLite transaction: if the reservation was already
handled (a redelivery: this process was killed after committing but before
acknowledging), stock is left alone and the stored outcome is sent again;
otherwise the stock is reserved (or the request rejected for lack of stock)
and the outcome recorded. Only after the reply is confirmed is the request
acknowledged. So a kill -9 at any moment loses nothing and reserves nothing
twice: at-least-once delivery, exactly-once effect.

A malformed request (not JSON, a missing field, a qty that is not a positive
integer) is rejected without requeue. The queue's x-retry-delay brings it
back after 200 ms, 400 ms, 800 ms; rejected a fourth time, it has been
returned more often than x-delivery-limit (3) allows and Warren dead-letters
it to "inventory.dead", where an operator can look at it:

    python3 examples/shop/inventory.py --list-dead
"""

import argparse
import collections
import json
import os
import signal
import sqlite3
import sys
import time

import pika
import pika.exceptions

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")

# The wiring, declared identically by the cart (Warren, like RabbitMQ, answers
# 406 PRECONDITION_FAILED to a redeclaration with other arguments).
EXCHANGE = "shop"
REQUESTS = "inventory.reservations"
REQUEST_KEY = "reservation.request"
DEAD = "inventory.dead"
REPLIES = "cart.replies"
REQUEST_ARGUMENTS = {
    "x-retry-delay": 200,  # a rejected request comes back after 200 ms, 400 ms, 800 ms
    "x-delivery-limit": 3,  # ... and is dead-lettered when rejected a 4th time
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": DEAD,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku TEXT PRIMARY KEY,
    initial INTEGER NOT NULL,      -- as seeded, so stock can be audited
    available INTEGER NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    reservation_id TEXT PRIMARY KEY,   -- the idempotency key
    cart_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    qty INTEGER NOT NULL,
    status TEXT NOT NULL,              -- reserved | rejected
    reason TEXT,                       -- why it was rejected
    processed_at REAL NOT NULL,        -- unix time of the first handling
    redelivered INTEGER NOT NULL,      -- 1: first handled from a redelivery (an earlier consumer died)
    deliveries INTEGER NOT NULL DEFAULT 1  -- > 1: handled again after a redelivery
);
"""


def show(line):
    """One write per line, so lines of processes sharing a terminal do not mix."""
    sys.stdout.write("inventory: %s\n" % line)
    sys.stdout.flush()


def declare(channel):
    """Declares everything the inventory uses (idempotent, same arguments as the cart)."""
    channel.exchange_declare(EXCHANGE, "topic", durable=True)
    channel.queue_declare(DEAD, durable=True)
    channel.queue_declare(REQUESTS, durable=True, arguments=REQUEST_ARGUMENTS)
    channel.queue_bind(REQUESTS, EXCHANGE, routing_key=REQUEST_KEY)
    # Replies wait here even while the cart is down.
    channel.queue_declare(REPLIES, durable=True)


def open_db(path, skus=20, stock=1000000, seed=()):
    """Opens (creating and seeding when missing) the inventory database:
    sku-1..sku-N with `stock` units each, plus the (sku, qty) pairs of `seed`."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)  # transactions by hand
    db.execute("PRAGMA journal_mode=WAL")  # readers (the demo's audit) never block us
    db.execute("PRAGMA synchronous=FULL")  # a commit is on disk, not just in the OS
    db.executescript(SCHEMA)
    rows = [("sku-%d" % n, stock, stock) for n in range(1, skus + 1)]
    rows += [(sku, qty, qty) for sku, qty in seed]
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT OR IGNORE INTO stock (sku, initial, available) VALUES (?, ?, ?)", rows)
    db.execute("COMMIT")
    return db


class Malformed(Exception):
    pass


def parse_request(body):
    """The request as a dict, or Malformed saying what is wrong with it."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise Malformed("not JSON: %s" % error)
    if not isinstance(request, dict):
        raise Malformed("not a JSON object")
    for field in ("reservation_id", "cart_id", "sku"):
        value = request.get(field)
        if not isinstance(value, str) or not value:
            raise Malformed("%s missing or not a non-empty string" % field)
    qty = request.get("qty")
    if isinstance(qty, bool) or not isinstance(qty, int) or qty <= 0:
        raise Malformed("qty missing or not a positive integer: %r" % (qty,))
    return request


def reserve(db, request, redelivered=False):
    """Handles one request in one transaction. Returns (status, reason, again):
    `again` is true when the reservation had been handled before (its stored
    outcome is returned, stock untouched)."""
    reservation_id = request["reservation_id"]
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute(
            "SELECT status, reason FROM reservations WHERE reservation_id = ?", (reservation_id,)
        ).fetchone()
        if row is not None:
            db.execute(
                "UPDATE reservations SET deliveries = deliveries + 1 WHERE reservation_id = ?",
                (reservation_id,),
            )
            db.execute("COMMIT")
            return row[0], row[1], True
        sku, qty = request["sku"], request["qty"]
        stock = db.execute("SELECT available FROM stock WHERE sku = ?", (sku,)).fetchone()
        if stock is None:
            status, reason = "rejected", "unknown sku"
        elif stock[0] < qty:
            status, reason = "rejected", "out of stock (%d left)" % stock[0]
        else:
            db.execute("UPDATE stock SET available = available - ? WHERE sku = ?", (qty, sku))
            status, reason = "reserved", None
        db.execute(
            "INSERT INTO reservations (reservation_id, cart_id, sku, qty, status, reason, processed_at,"
            " redelivered) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (reservation_id, request["cart_id"], sku, qty, status, reason, time.time(), int(redelivered)),
        )
        db.execute("COMMIT")
        return status, reason, False
    except BaseException:
        db.execute("ROLLBACK")
        raise


class Inventory:
    def __init__(self, args):
        self.args = args
        self.db = open_db(args.db, args.skus, args.stock, args.seed)
        self.stopping = False
        self.counts = collections.Counter()
        self.committed = 0  # reservations committed by this process (for --die-after-commit)
        self.last_report = time.monotonic()
        self.reported = collections.Counter()

    def run(self):
        """Consumes until stopped, reconnecting when the broker goes away."""
        delay = 0.2
        while not self.stopping:
            try:
                self.consume()
                return
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
                    ConnectionError) as error:  # a refused reply (NackError) too
                if self.stopping:
                    return
                # Deliveries not yet acknowledged go back to the queue by themselves.
                show("connection lost (%s), reconnecting in %.1f s" % (error.__class__.__name__, delay))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def consume(self):
        params = pika.URLParameters(self.args.url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            declare(channel)
            channel.confirm_delivery()
            # The backlog stays in Warren: at most `prefetch` requests are
            # handed to us before we acknowledge some.
            channel.basic_qos(prefetch_count=self.args.prefetch)
            waiting = collections.deque()
            channel.basic_consume(
                REQUESTS, lambda _ch, method, props, body: waiting.append((method, props, body))
            )
            show("consuming %s (prefetch %d, at most %s requests/s)"
                 % (REQUESTS, self.args.prefetch, self.args.rate or "unlimited"))
            interval = 1.0 / self.args.rate if self.args.rate else 0.0
            next_slot = time.monotonic()
            while not self.stopping:
                now = time.monotonic()
                if waiting and now >= next_slot:
                    self.handle(channel, *waiting.popleft())
                    # A late wake-up is made up for on the next request, so a
                    # backlog is handled at `rate` exactly.
                    next_slot = max(next_slot, now - interval) + interval
                    connection.process_data_events(time_limit=0)
                else:
                    wait = max(0.0, next_slot - now) if waiting else 0.5
                    connection.process_data_events(time_limit=wait)
                self.report()
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def handle(self, channel, method, props, body):
        tag = method.delivery_tag
        try:
            request = parse_request(body)
        except Malformed as error:
            count = (props.headers or {}).get("x-delivery-count", 0)
            show("malformed request %s (delivery %d, message_id %s): %s; rejected"
                 % (body[:60], count + 1, props.message_id, error))
            # No requeue: the queue retries it later, then dead-letters it.
            channel.basic_reject(tag, requeue=False)
            self.counts["malformed"] += 1
            return
        status, reason, again = reserve(self.db, request, method.redelivered)
        self.committed += 0 if again else 1
        if self.args.die_after_commit and self.committed == self.args.die_after_commit and not again:
            show("killed after committing %s, before replying and acknowledging" % request["reservation_id"])
            os.kill(os.getpid(), signal.SIGKILL)
        self.counts["again" if again else status] += 1
        if again:
            show("%s handled before (redelivered): %s again, stock untouched"
                 % (request["reservation_id"], status))
        elif self.args.verbose:
            show("%s %s x%d: %s%s" % (request["reservation_id"], request["sku"], request["qty"], status,
                                      " (%s)" % reason if reason else ""))
        if props.reply_to:
            reply = {"reservation_id": request["reservation_id"], "status": status, "reason": reason}
            try:
                # Blocks until Warren confirms it (the channel is in confirm mode).
                channel.basic_publish(
                    "", props.reply_to, json.dumps(reply).encode(),
                    pika.BasicProperties(
                        delivery_mode=2, content_type="application/json",
                        correlation_id=request["reservation_id"],
                    ),
                    mandatory=True,
                )
            except pika.exceptions.UnroutableError:
                show("reply queue %r does not exist; outcome of %s kept in the database only"
                     % (props.reply_to, request["reservation_id"]))
        channel.basic_ack(tag)

    def report(self):
        now = time.monotonic()
        if now - self.last_report < self.args.report_every:
            return
        self.last_report = now
        delta = self.counts - self.reported
        if delta:
            show("last %.0f s: %d reserved, %d rejected, %d redelivered and answered again, %d malformed"
                 % (self.args.report_every, delta["reserved"], delta["rejected"], delta["again"],
                    delta["malformed"]))
            self.reported = collections.Counter(self.counts)


def list_dead(url):
    """Prints the dead-lettered requests, leaving them in the queue."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    declare(channel)
    count = 0
    while True:
        method, props, body = channel.basic_get(DEAD, auto_ack=False)
        if method is None:
            break
        count += 1
        death = ((props.headers or {}).get("x-death") or [{}])[0]
        print("%s  message_id=%s  reason=%s  queue=%s  body=%r"
              % (death.get("time"), props.message_id, death.get("reason"), death.get("queue"), body[:200]))
    print("%d message(s) in %s" % (count, DEAD))
    connection.close()  # unacknowledged: they all go back to the queue


def parse_seed(text):
    sku, _, qty = text.partition("=")
    if not sku or not qty.isdigit():
        raise argparse.ArgumentTypeError("expected SKU=QTY, e.g. sku-rare=5")
    return sku, int(qty)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--db", default=os.path.join(HERE, "inventory.db"), help="SQLite database file")
    parser.add_argument("--skus", type=int, default=20, help="seed sku-1..sku-N when missing (default 20)")
    parser.add_argument("--stock", type=int, default=1000000, help="units seeded per SKU (default 1000000)")
    parser.add_argument("--seed", type=parse_seed, action="append", default=[], metavar="SKU=QTY",
                        help="also seed this SKU with QTY units when missing (repeatable)")
    parser.add_argument("--prefetch", type=int, default=20, help="unacknowledged requests at most (default 20)")
    parser.add_argument("--rate", type=float, default=200,
                        help="requests handled per second at most, 0 = no limit (default 200)")
    parser.add_argument("--report-every", type=float, default=1.0, metavar="SECONDS",
                        help="print counts this often (default 1)")
    parser.add_argument("--verbose", action="store_true", help="print every request")
    parser.add_argument("--list-dead", action="store_true", help="print the dead-lettered requests and exit")
    parser.add_argument("--die-after-commit", type=int, default=0, metavar="N",
                        help="for tests: be killed (SIGKILL) after committing the Nth reservation,"
                             " before replying and acknowledging")
    args = parser.parse_args(argv)

    if args.list_dead:
        list_dead(args.url)
        return 0
    inventory = Inventory(args)

    def stop(_signum, _frame):
        inventory.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    inventory.run()
    show("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
