"""The shop example, end to end.

test_demo runs the demo's whole timeline (burst, inventory killed, recovery,
poison messages) in its quick form and checks its verdict. The other tests
drive the inventory service alone against a broker.

Binaries: $WARREN_BIN and $SHOP_CART_BIN, else those the demo itself finds
or builds (examples/local_broker.py).

    WARREN_BIN=target/debug/warren SHOP_CART_BIN=target/debug/shop-cart pytest tests/shop
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pika
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOP = os.path.join(ROOT, "examples", "shop")
sys.path.insert(0, SHOP)
import demo  # noqa: E402
import inventory  # noqa: E402
import local_broker  # noqa: E402  (on the path through demo)


def warren_bin():
    return local_broker.binaries({"warren": "WARREN_BIN"})["warren"]


def test_demo():
    run = subprocess.run([sys.executable, os.path.join(SHOP, "demo.py"), "--quick"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180)
    output = run.stdout.decode(errors="replace")
    print(output)
    assert run.returncode == 0, output
    lines = output.splitlines()
    for expected in ("lost: 0", "duplicates: 0", "poison messages dead-lettered: 3 of 3", "RESULT: PASS"):
        assert expected in lines, "missing %r in:\n%s" % (expected, output)
    assert any(line.startswith("burst: ") for line in lines)


@pytest.fixture
def broker():
    workdir = tempfile.mkdtemp(prefix="shop-test-")
    shop = demo.Shop(warren_bin(), None, workdir, demo.QUICK)
    shop.start_broker()
    try:
        yield shop
    finally:
        shop.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def start_inventory(shop, *extra):
    return subprocess.Popen(
        [sys.executable, os.path.join(SHOP, "inventory.py"), "--url", shop.url, "--db", shop.db_path,
         "--rate", "0", "--seed", "sku-rare=5", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def publish_requests(channel, requests):
    channel.confirm_delivery()
    for request in requests:
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        rid = request["reservation_id"] if isinstance(request, dict) else "bad"
        channel.basic_publish(inventory.EXCHANGE, inventory.REQUEST_KEY, body, pika.BasicProperties(
            delivery_mode=2, content_type="application/json", message_id=rid, correlation_id=rid,
            reply_to=inventory.REPLIES))


def replies(channel, count, timeout=15):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        method, props, body = channel.basic_get(inventory.REPLIES, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        reply = json.loads(body)
        assert props.correlation_id == reply["reservation_id"]
        got.append(reply)
    return got


def test_inventory_killed_between_commit_and_ack(broker):
    """Killed after committing a reservation, before replying and acking:
    the redelivered request is answered from the stored outcome, and stock
    is taken once."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    inventory.declare(channel)
    requests = [{"reservation_id": "r-%d" % n, "cart_id": "c-1", "sku": "sku-rare", "qty": 2} for n in range(4)]
    publish_requests(channel, requests)

    first = start_inventory(broker, "--die-after-commit", "2")
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, first.stdout.read().decode()
    second = start_inventory(broker)
    try:
        got = replies(channel, 4)
    finally:
        second.terminate()
        second.wait(timeout=10)

    # One reply each: the killed process never replied for r-1.
    assert sorted(r["reservation_id"] for r in got) == ["r-0", "r-1", "r-2", "r-3"]
    assert {r["reservation_id"]: r["status"] for r in got} == {
        "r-0": "reserved", "r-1": "reserved", "r-2": "rejected", "r-3": "rejected"}
    assert [r["reason"] for r in got if r["status"] == "rejected"] == ["out of stock (1 left)"] * 2
    db = inventory.open_db(broker.db_path)
    assert db.execute("SELECT initial, available FROM stock WHERE sku = 'sku-rare'").fetchone() == (5, 1)
    assert dict(db.execute("SELECT reservation_id, deliveries FROM reservations")) == {
        "r-0": 1, "r-1": 2, "r-2": 1, "r-3": 1}
    assert channel.queue_declare(inventory.REQUESTS, passive=True).method.message_count == 0
    connection.close()


def test_malformed_requests_are_dead_lettered(broker):
    """Each malformed request is retried, then dead-lettered with reason
    delivery_limit; valid requests published after them are not held up."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    inventory.declare(channel)
    bad = [b"not json", b"[1, 2]",
           json.dumps({"reservation_id": "x", "cart_id": "c", "sku": "sku-1"}).encode(),
           json.dumps({"reservation_id": "x", "cart_id": "c", "sku": "sku-1", "qty": 0}).encode(),
           json.dumps({"reservation_id": "x", "cart_id": "c", "sku": "sku-1", "qty": 1.5}).encode(),
           json.dumps({"reservation_id": "x", "cart_id": "c", "sku": "sku-1", "qty": True}).encode(),
           json.dumps({"reservation_id": "", "cart_id": "c", "sku": "sku-1", "qty": 1}).encode()]
    good = [{"reservation_id": "ok-%d" % n, "cart_id": "c-1", "sku": "sku-1", "qty": 1} for n in range(5)]
    good.append({"reservation_id": "ok-unknown", "cart_id": "c-1", "sku": "sku-nope", "qty": 1})
    publish_requests(channel, bad + good)
    process = start_inventory(broker)
    try:
        started = time.monotonic()
        got = replies(channel, len(good))
        answered_after = time.monotonic() - started
        deadline = time.monotonic() + 15
        while channel.queue_declare(inventory.DEAD, passive=True).method.message_count < len(bad):
            assert time.monotonic() < deadline, "malformed requests not dead-lettered"
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert sorted(r["reservation_id"] for r in got) == sorted(r["reservation_id"] for r in good)
    assert {r["reservation_id"]: r["reason"] for r in got}["ok-unknown"] == "unknown sku"
    assert answered_after < 1.0, "valid requests waited %.1f s behind the malformed ones" % answered_after
    dead = []
    while True:
        method, props, body = channel.basic_get(inventory.DEAD, auto_ack=True)
        if method is None:
            break
        death = props.headers["x-death"][0]
        assert (death["reason"], death["queue"]) == ("delivery_limit", inventory.REQUESTS)
        dead.append(body)
    assert sorted(dead) == sorted(bad)
    db = inventory.open_db(broker.db_path)
    assert db.execute("SELECT count(*) FROM reservations").fetchone()[0] == len(good)
    connection.close()


def test_inventory_killed_at_random_moments(broker):
    """Killed with SIGKILL three times while it works through 300 requests:
    every request is answered, stock is taken exactly once per reservation.
    (Three kills at most: a request returned a fourth time would be over the
    queue's delivery limit.)"""
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    channel = connection.channel()
    inventory.declare(channel)
    requests = [{"reservation_id": "r-%d" % n, "cart_id": "c-%d" % (n % 7), "sku": "sku-%d" % (n % 5 + 1),
                 "qty": n % 3 + 1} for n in range(300)]
    publish_requests(channel, requests)
    for delay in (0.4, 0.25, 0.55):
        process = start_inventory(broker, "--rate", "300")
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    process = start_inventory(broker, "--rate", "300")
    try:
        got = replies(channel, 300, timeout=30)
        time.sleep(0.3)  # any duplicate reply still on its way
        got += replies(channel, 300, timeout=0.2)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert {r["reservation_id"] for r in got} == {r["reservation_id"] for r in requests}
    assert all(r["status"] == "reserved" for r in got)
    db = inventory.open_db(broker.db_path)
    assert db.execute("SELECT count(*) FROM reservations").fetchone()[0] == 300
    taken = {}
    for r in requests:
        taken[r["sku"]] = taken.get(r["sku"], 0) + r["qty"]
    assert dict(db.execute("SELECT sku, initial - available FROM stock WHERE initial != available")) == taken
    assert channel.queue_declare(inventory.DEAD, passive=True).method.message_count == 0
    connection.close()
