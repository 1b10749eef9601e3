"""The messaging-pattern examples of examples/ (docs/patterns.md) against the
broker under test (WARREN_AMQP_URL, as for the rest of the suite).

Each pattern's run.py runs in this process with names of its own (its
workers and services are separate processes, as in the example), then the
outcome is checked here, from the database, the broker and the recorded
deliveries, against expectations written out independently of the example.
The last test runs each example's documented command as it is.
"""

import importlib.util
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pika
import pytest

# Shared helpers and fixtures of the pika suite.
from test_smoke import AMQP_URL, ch, conn, connect, get_all, res, unique  # noqa: F401

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(example, module="run"):
    """Imports examples/<example>/<module>.py (which imports its neighbours)."""
    directory = EXAMPLES / example
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location("%s_%s" % (example, module), directory / (module + ".py"))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def ready_count(queue):
    c = connect()
    try:
        return c.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        c.close()


# ---------------------------------------------------------------- work queue


def test_work_queue_killed_worker_loses_and_duplicates_nothing(res, tmp_path):
    queue = res.queue()
    db_path = tmp_path / "forms.db"
    result = load("work_queue").main(["--url", AMQP_URL, "--queue", queue, "--db", str(db_path)])

    db = sqlite3.connect(str(db_path))
    rows = {form_id: json.loads(data) for form_id, data in db.execute("SELECT id, data FROM forms")}
    assert len(result["posted"]) == 10
    assert rows == result["posted"]  # every posted form, once, as posted
    names = sorted(form["name"] for form in rows.values())
    assert names == sorted(["Ada", "Grace", "Alan", "Barbara", "Edsger",
                            "Margaret", "Donald", "Frances", "Ken", "Radia"])

    # worker-1 inserted a form and was killed before acking it; the broker
    # gave it to another worker (redelivered), which inserted nothing.
    killed = result["killed_form"]
    handled = db.execute(
        "SELECT worker, redelivered, inserted FROM deliveries WHERE form_id = ? ORDER BY rowid", (killed,)
    ).fetchall()
    assert handled[0] == ("worker-1", 0, 1)
    assert len(handled) == 2
    assert handled[1][0] in ("worker-2", "worker-3") and handled[1][1:] == (1, 0)
    # every other form was delivered exactly once, not redelivered
    others = db.execute(
        "SELECT form_id, count(*), sum(redelivered) FROM deliveries WHERE form_id != ? GROUP BY form_id",
        (killed,),
    ).fetchall()
    assert sorted(f for f, _, _ in others) == sorted(set(rows) - {killed})
    assert all(count == 1 and redelivered == 0 for _, count, redelivered in others)
    db.close()
    assert ready_count(queue) == 0
    assert result["ok"]


def test_work_queue_web_form_publishes_persistent_confirmed_json(ch, res):
    webform = load("work_queue", "webform")
    queue = res.queue()
    server = webform.make_server(AMQP_URL, queue, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d/forms" % server.server_address[1]

    def post(body, headers={}):
        request = urllib.request.Request(url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    ada = {"name": "Ada", "email": "ada@example.com"}
    try:
        status, answer = post(json.dumps(ada).encode())
        assert status == 202
        assert post(b"{not json")[0] == 400
        assert post(b"[1, 2]")[0] == 400
        # a retried post keeps its id: the workers insert it once
        key = unique("form")
        for _ in range(2):
            assert post(json.dumps(ada).encode(), {"Idempotency-Key": key}) == (202, {"id": key})
    finally:
        server.shutdown()
        server.publisher.close()

    # answered 202 only after the confirm: the messages are already queued
    messages = get_all(ch, queue)
    assert [props.message_id for _, props, _ in messages] == [answer["id"], key, key]
    for _, props, body in messages:
        assert json.loads(body) == ada
        assert props.delivery_mode == 2
        assert props.content_type == "application/json"


# ----------------------------------------------------------- publish/subscribe


def test_pubsub_each_service_gets_exactly_its_statuses(res):
    exchange = res.exchange()
    services = ["packaging", "shipping", "delivery", "notifications", "loyalty"]
    res.queues.extend("%s.%s" % (exchange, service) for service in services)
    result = load("pubsub").main(["--url", AMQP_URL, "--exchange", exchange])

    lifecycle = ["created", "paid", "packed", "shipped", "delivered"]
    everything = ([("1001", s) for s in lifecycle] + [("1002", s) for s in ["created", "paid", "cancelled"]]
                  + [("1003", s) for s in lifecycle])
    assert result["published"] == everything  # each change published once
    assert result["received"] == {
        "packaging": [("1001", "paid"), ("1002", "paid"), ("1002", "cancelled"), ("1003", "paid")],
        # was stopped during order 1002 and got its cancellation afterwards
        "shipping": [("1001", "packed"), ("1002", "cancelled"), ("1003", "packed")],
        "delivery": [("1001", "shipped"), ("1001", "delivered"), ("1003", "shipped"), ("1003", "delivered")],
        "notifications": everything,  # order.*
        # subscribed before order 1003 only
        "loyalty": [("1003", "delivered")],
    }
    for service in services:
        assert ready_count("%s.%s" % (exchange, service)) == 0
    assert result["ok"]


# ------------------------------------------------------------------ event log


def test_event_log_readers_replay_from_a_timestamp_and_consume_nothing(res):
    stream = res.queue()
    result = load("event_log").main(["--url", AMQP_URL, "--stream", stream])
    morning = [("1001", "created"), ("1001", "paid"), ("1002", "created")]
    afternoon = [("1002", "paid"), ("1001", "shipped"), ("1003", "created"), ("1002", "cancelled")]
    assert result["results"] == {"dashboard": morning + afternoon, "analytics": afternoon,
                                 "auditor": morning + afternoon}
    assert result["held"] == 7
    assert result["ok"]


# -------------------------------------------------------------- request-reply


def test_request_reply_named_queue_and_direct_reply_to_with_timeout(res):
    queue = res.queue()
    result = load("request_reply").main(["--url", AMQP_URL, "--queue", queue, "--timeout", "0.3"])
    search = load("request_reply", "search_worker").search

    # no worker running: both clients gave up after the timeout
    assert result["unanswered"] == {"reply queue": [None], "Direct Reply-To": [None]}
    for label in ("reply queue", "Direct Reply-To"):
        pairs = result["answered"][label]
        assert [query for query, _ in pairs] == [
            "rust", "python", "erlang", "haskell", "designing", "programming", "cobol"]
        for query, answer in pairs:
            assert answer["query"] == query  # matched to its own request
            assert answer["results"] == search(query)
            assert answer["worker"] in ("worker-1", "worker-2", "worker-3")
        # the timed-out requests expired in the queue: no late answer came
        assert result["ignored"][label] == []
    assert dict(result["answered"]["reply queue"])["rust"]["results"] == [
        "Programming Rust", "The Rust Programming Language", "Rust for Rustaceans"]
    assert dict(result["answered"]["reply queue"])["cobol"]["results"] == []
    assert ready_count(queue) == 0
    assert result["ok"]


@pytest.mark.parametrize("direct", [False, True], ids=["reply-queue", "direct-reply-to"])
def test_request_reply_client_matches_by_correlation_id(res, direct):
    """Answers in another order than the requests, a stray answer and a
    duplicate: each answer goes to its own request, the others are ignored."""
    client_module = load("request_reply", "search_client")
    queue = res.queue()
    client = client_module.SearchClient(AMQP_URL, queue, direct=direct)
    queries = ["one", "two", "three", "four"]
    seen_requests = []

    def worker():
        c = connect()
        try:
            ch = c.channel()
            deadline = time.monotonic() + 10
            while len(seen_requests) < len(queries) and time.monotonic() < deadline:
                method, props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    time.sleep(0.01)
                else:
                    seen_requests.append((props, body))
            if len(seen_requests) < len(queries):
                return

            def answer(props, text, correlation_id=None):
                ch.basic_publish("", props.reply_to, json.dumps({"query": text}).encode(),
                                 pika.BasicProperties(correlation_id=correlation_id or props.correlation_id))

            one, two, three, four = seen_requests
            # all on one channel: they reach the client in this order
            answer(one[0], "stray", correlation_id="no-such-request")
            for props, body in (four, three, two):
                answer(props, body.decode())
            answer(three[0], "duplicate")  # a second answer to "three"
            answer(one[0], "one")
        finally:
            c.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        answers = client.search_many(queries, timeout=10)
    finally:
        thread.join()
    props = [p for p, _ in seen_requests]
    assert [body for _, body in seen_requests] == [b"one", b"two", b"three", b"four"]
    assert len({p.correlation_id for p in props}) == 4
    assert all(p.expiration == "10000" for p in props)
    if direct:
        assert all(p.reply_to.startswith("amq.rabbitmq.reply-to.") for p in props)
    else:
        assert all(p.reply_to == client.reply_to and p.reply_to.startswith("amq.gen-") for p in props)
    assert answers == [{"query": "one"}, {"query": "two"}, {"query": "three"}, {"query": "four"}]
    assert [body for _, body in client.ignored] == [b'{"query": "stray"}', b'{"query": "duplicate"}']
    assert client.pending == {}
    client.close()


# ----------------------------------------------------------------------- chat


def test_chat_rooms_in_order_to_their_participants_only(res):
    exchange = res.exchange()
    result = load("chat").main(["--url", AMQP_URL, "--exchange", exchange])
    seen = result["seen"]

    def room(name):
        return [(r, sender, text) for r, sender, text, _ in result["said"] if r == name]

    rust, random_room = room("rust"), room("random")
    burst = [("rust", "bob", "line %d of my stack trace" % n) for n in range(1, 21)]
    assert rust[3:23] == burst
    assert random_room == [("random", "carol", "lunch?"), ("random", "alice", "yes! in 5 minutes")]
    assert rust[-1] == ("rust", "alice", "bye bob")

    # carol is only in #random, bob only in #rust and left before "bye bob"
    assert seen["carol"] == random_room
    assert seen["bob"] == rust[:-1]
    # alice (both rooms) and eve (every room: room.*) see both rooms, each in
    # the order it was said, and the same interleaving
    for name in ("alice", "eve"):
        assert [line for line in seen[name] if line[0] == "rust"] == rust
        assert [line for line in seen[name] if line[0] == "random"] == random_room
        assert len(seen[name]) == len(rust) + len(random_room)
    assert seen["alice"] == seen["eve"]
    assert result["bob_queue_gone"]  # exclusive, auto-delete: gone with bob
    assert result["ok"]


# ------------------------------------------------------- documented commands


def test_documented_commands_run(res, tmp_path):
    """`python3 examples/<example>/run.py` for the five examples at once, the
    broker in WARREN_AMQP_URL, each with names of its own."""
    services = ["packaging", "shipping", "delivery", "notifications", "loyalty"]
    runs = {}
    for example, option, last_line in [
        ("work_queue", "--queue", "every form is in the database exactly once"),
        ("pubsub", "--exchange", "each service got exactly the changes it subscribed to, in order"),
        ("request_reply", "--queue", "timed out while no worker ran; then every answer matched its request"),
        ("chat", "--exchange", "everyone saw exactly the lines of their rooms, in order"),
        ("event_log", "--stream", "every reader got its events, and reading consumed nothing"),
    ]:
        name = unique("warren-test-" + example)
        if option in ("--queue", "--stream"):
            res.queues.append(name)
        else:
            res.exchanges.append(name)
        if example == "pubsub":
            res.queues.extend("%s.%s" % (name, service) for service in services)
        command = [sys.executable, str(EXAMPLES / example / "run.py"), option, name]
        env = dict(os.environ, WARREN_AMQP_URL=AMQP_URL, TMPDIR=str(tmp_path))
        process = subprocess.Popen(command, env=env, cwd=str(tmp_path), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs[example] = (process, last_line)
    try:
        for example, (process, last_line) in runs.items():
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, "%s:\n%s%s" % (example, out, err)
            assert err == "", example
            assert "MISMATCH" not in out and "WRONG" not in out, out
            assert out.strip().splitlines()[-1] == last_line, out
    finally:
        for process, _ in runs.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_an_example_starts_a_broker_of_its_own_when_none_listens(tmp_path):
    """A newcomer who runs an example before starting Warren gets one from
    this checkout (WARREN_BIN, else a build that is newer than the sources),
    on a free port, for the example's duration."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        silent_port = s.getsockname()[1]
    command = [sys.executable, str(EXAMPLES / "request_reply" / "run.py"),
               "--url", "amqp://guest:guest@localhost:%d/%%2F" % silent_port]
    env = dict(os.environ)
    if env.get("WARREN_BIN"):
        env["WARREN_BIN"] = os.path.abspath(env["WARREN_BIN"])
    run = subprocess.run(command, cwd=str(tmp_path), env=env, text=True, timeout=120,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("no broker at localhost:%d: starting " % silent_port), lines[0]
    assert lines[-1] == "timed out while no worker ran; then every answer matched its request", run.stdout
