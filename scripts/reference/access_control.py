#!/usr/bin/env python3
"""Records what a pika client sees for access control and limits: logins to
vhosts without permissions or that do not exist, every AMQP operation with
the configure, write or read permission missing, partially matching
permission regexes, topic permissions (including {username}/{vhost}
expansion), vhost and user limits, and users, vhosts, permissions and
passwords changed or deleted while a client is connected.

    REF_PORT=5673 REF_CTL="scripts/rabbitmq.sh ctl" \\
        python3 scripts/reference/access_control.py [--json | --out FILE]

Users, vhosts, permissions and limits are managed through REF_CTL, a command
prefix that accepts this subset of rabbitmqctl syntax (default: this
repository's scripts/rabbitmq.sh ctl):

    add_user NAME PASSWORD          delete_user NAME
    change_password NAME PASSWORD   set_user_tags NAME TAG...
    add_vhost NAME                  delete_vhost NAME
    set_permissions -p VHOST USER CONF WRITE READ
    clear_permissions -p VHOST USER
    set_topic_permissions -p VHOST USER EXCHANGE WRITE READ
    clear_topic_permissions -p VHOST USER
    set_vhost_limits -p VHOST JSON  set_user_limits USER JSON

After every ctl call the probe sleeps REF_CTL_SETTLE seconds (default 0) for
brokers that apply changes asynchronously. guest (full permissions on every
probe vhost) creates fixtures and checks side effects (whether a queue,
exchange or binding exists, message counts) after each refused operation.

Prints (or writes to FILE) a JSON list with one object per case. A close is
recorded as {"closed": "channel"|"connection", "reply_code", "reply_text"};
a refused login as the exception pika raised plus the reply code and text of
the broker's connection.close. Users and vhosts get a random suffix per run,
and are recorded as placeholders: ac-user-1a2b3c4d -> <user>,
ac-vhost-maxconn-1a2b3c4d -> <vhost-maxconn>; server-generated queue names
become "<generated>". Everything the probe created is deleted at the end.
The RabbitMQ 3.10.8 reference is docs/rabbitmq-access-control.json.
"""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid

import pika
import pika.exceptions

HOST = os.environ.get("REF_HOST", "127.0.0.1")
PORT = int(os.environ.get("REF_PORT", "5673"))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CTL = shlex.split(os.environ.get("REF_CTL", os.path.join(ROOT, "scripts", "rabbitmq.sh") + " ctl"))
SETTLE = float(os.environ.get("REF_CTL_SETTLE", "0"))
WAIT = 2.0  # seconds to wait for something the broker does on its own

RUN = uuid.uuid4().hex[:8]
CREATED_USERS = []
CREATED_VHOSTS = []

CASES = []


def case(title):
    def register(fn):
        CASES.append((title, fn))
        return fn
    return register


# ----------------------------------------------------------------- management


class CtlError(Exception):
    pass


def ctl(*args, settle=True):
    run = subprocess.run(CTL + list(args), capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise CtlError("ctl %s failed (%d): %s" % (
            " ".join(args), run.returncode, (run.stderr or run.stdout).strip()[-300:]))
    if settle and SETTLE:
        time.sleep(SETTLE)


def name(role):
    """A per-run user or vhost name; recorded as <role>."""
    return "ac-%s-%s" % (role, RUN)


def add_user(role, password="secret"):
    user = name(role)
    ctl("add_user", user, password)
    CREATED_USERS.append(user)
    return user


def add_vhost(role):
    """A fresh vhost on which guest has full permissions."""
    vhost = name(role)
    ctl("add_vhost", vhost)
    CREATED_VHOSTS.append(vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost


def set_permissions(vhost, user, conf, write, read):
    ctl("set_permissions", "-p", vhost, user, conf, write, read)


# The user 'u' and vhost 'v' most cases use (created in main()).
USER, PASSWORD, VHOST = name("user"), "u-secret", name("vhost")


# -------------------------------------------------------------------- clients


def connect(user=USER, password=PASSWORD, vhost=VHOST):
    return pika.BlockingConnection(pika.ConnectionParameters(
        host=HOST, port=PORT, virtual_host=vhost, connection_attempts=1,
        socket_timeout=5, credentials=pika.PlainCredentials(user, password)))


def closed(e):
    if isinstance(e, (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed)):
        return {"closed": "channel" if isinstance(e, pika.exceptions.ChannelClosed) else
                "connection", "reply_code": e.reply_code, "reply_text": e.reply_text}
    return {"error": type(e).__name__}


def refused(e):
    """A failed pika.BlockingConnection(): the exception class and the code and
    text of the broker's connection.close it wraps."""
    out = {"login": "refused", "exception": type(e).__name__}
    text = e.args[0] if e.args and isinstance(e.args[0], str) else repr(e)
    m = re.match(r"ConnectionClosedByBroker: \((\d+)\) (.*)$", text, re.S)
    if m:
        out["reply_code"] = int(m.group(1))
        try:
            out["reply_text"] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            out["reply_text"] = m.group(2)
    else:
        out["detail"] = text
    return out


def login(user=USER, password=PASSWORD, vhost=VHOST):
    """(connection or None, outcome)."""
    try:
        return connect(user, password, vhost), {"login": "ok"}
    except pika.exceptions.AMQPConnectionError as e:
        return None, refused(e)


def login_outcome(user=USER, password=PASSWORD, vhost=VHOST):
    conn, outcome = login(user, password, vhost)
    if conn:
        conn.close()
    return outcome


def login_within(timeout, user=USER, password=PASSWORD, vhost=VHOST):
    """Retries a login until it works or timeout passes (limits are counted
    from connection tracking that may lag a close)."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = login_outcome(user, password, vhost)
        if outcome["login"] == "ok" or time.monotonic() >= deadline:
            return outcome
        time.sleep(0.1)


def close_quietly(conn):
    try:
        if conn is not None and conn.is_open:
            conn.close()
    except pika.exceptions.AMQPError:
        pass


def wait_for_close(conn, timeout=WAIT):
    """Processes events until the broker closes conn or timeout passes."""
    deadline = time.monotonic() + timeout
    try:
        while conn.is_open and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.1)
    except pika.exceptions.ConnectionClosed as e:
        return closed(e)
    except pika.exceptions.AMQPConnectionError as e:
        return {"closed": "connection", "error": type(e).__name__}
    return {"closed": "connection"} if conn.is_closed else None


def still_usable(conn):
    """Whether conn is open and a new channel answers a synchronous method."""
    if not conn.is_open:
        return False
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=0)
        ch.close()
        return True
    except pika.exceptions.AMQPError:
        return False


class Session:
    """A user's connection; every operation runs on a fresh channel."""

    def __init__(self, user=USER, password=PASSWORD, vhost=VHOST):
        self.args = (user, password, vhost)
        self.conn = connect(*self.args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        close_quietly(self.conn)

    def run(self, fn):
        """{"result": "ok", ...fn's dict} or the close fn ran into."""
        if not self.conn.is_open:
            self.conn = connect(*self.args)
        ch = None
        try:
            ch = self.conn.channel()
            out = {"result": "ok"}
            out.update(fn(ch) or {})
            return out
        except pika.exceptions.AMQPError as e:
            return closed(e)
        finally:
            if ch is not None and ch.is_open:
                ch.close()


class Admin:
    """guest on one vhost: creates fixtures and checks side effects."""

    def __init__(self, vhost=VHOST):
        self.conn = connect("guest", "guest", vhost)
        self.ch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        close_quietly(self.conn)

    def channel(self):
        if self.ch is None or not self.ch.is_open:
            self.ch = self.conn.channel()
            self.ch.confirm_delivery()
        return self.ch

    def queue(self, q, messages=0):
        self.channel().queue_declare(q)
        for _ in range(messages):
            self.ch.basic_publish("", q, b"fixture")
        return q

    def exchange(self, x, kind="direct"):
        self.channel().exchange_declare(x, exchange_type=kind)
        return x

    def bind(self, q, x, key="k"):
        self.channel().queue_bind(q, x, key)

    def exchange_bind(self, destination, source, key="k"):
        self.channel().exchange_bind(destination, source, key)

    def count(self, q):
        """Message count of q, or None if q does not exist."""
        try:
            return self.channel().queue_declare(q, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return None
            raise

    def queue_exists(self, q):
        return self.count(q) is not None

    def exchange_exists(self, x):
        try:
            self.channel().exchange_declare(x, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return False
            raise

    def routed(self, x, key):
        """Whether a mandatory publish to x with key reaches any queue."""
        try:
            self.channel().basic_publish(x, key, b"routing-check", mandatory=True)
            return True
        except pika.exceptions.UnroutableError:
            return False


def publish(ch, exchange, key, confirms, **props):
    """basic.publish; with confirms the outcome is the confirm, without it the
    answer to the next synchronous method on the channel (basic.qos)."""
    properties = pika.BasicProperties(**props) if props else None
    if confirms:
        ch.confirm_delivery()
        try:
            ch.basic_publish(exchange, key, b"payload", properties)
            return {"confirm": "ack"}
        except pika.exceptions.NackError:
            return {"confirm": "nack"}
    ch.basic_publish(exchange, key, b"payload", properties)
    ch.basic_qos(prefetch_count=0)
    return {"next_sync_call": "basic.qos-ok"}


# ------------------------------------------------------------------- logins


@case("1. connection.open to a vhost where the user has no permissions")
def _():
    vhost = add_vhost("vhost-noperm")
    return login_outcome(vhost=vhost)


@case("2. connection.open to a vhost that does not exist")
def _():
    return login_outcome(vhost=name("vhost-missing"))


# ------------------------------------------------------- permission matrix


def matrix(tag, conf, write, read):
    """Every permission-checked AMQP operation by 'u' with the given
    permissions on 'v'; fixtures named q.TAG.* / x.TAG.* are made by guest."""
    set_permissions(VHOST, USER, conf, write, read)
    q = lambda role: "q.%s.%s" % (tag, role)  # noqa: E731
    x = lambda role: "x.%s.%s" % (tag, role)  # noqa: E731
    with Admin() as a:
        for role in ("existing", "del", "bind", "unbind", "pub", "sink", "sink2"):
            a.queue(q(role))
        for role in ("get", "consume", "purge"):
            a.queue(q(role), messages=1)
        for role in ("existing", "del", "bind", "unbind", "pub", "src", "src2"):
            a.exchange(x(role))
        a.exchange(x("dest"), "fanout")
        a.exchange(x("dest2"), "fanout")
        a.bind(q("unbind"), x("unbind"))
        a.bind(q("pub"), x("pub"))
        a.bind(q("sink"), x("dest"), "")
        a.bind(q("sink2"), x("dest2"), "")
        a.exchange_bind(x("dest2"), x("src2"))

        conn, outcome = login()
        result = dict({"permissions": [conf, write, read]}, **outcome)
        if conn is None:
            return result
        conn.close()
        ops = []
        with Session() as s:
            def op(label, fn, side=None):
                entry = {"op": label}
                entry.update(s.run(fn))
                if side:
                    entry.update(side())
                ops.append(entry)

            op("queue.declare %s (new)" % q("new"), lambda ch: ch.queue_declare(q("new")) and None,
               lambda: {"queue_exists_after": a.queue_exists(q("new"))})
            op("queue.declare %s (existing, non-passive)" % q("existing"),
               lambda ch: ch.queue_declare(q("existing")) and None)
            op("queue.declare %s passive (existing)" % q("existing"),
               lambda ch: ch.queue_declare(q("existing"), passive=True) and None)
            op("queue.declare %s passive (missing)" % q("missing"),
               lambda ch: ch.queue_declare(q("missing"), passive=True) and None)
            op("queue.declare '' (server-named)",
               lambda ch: {"queue": ch.queue_declare("", exclusive=True).method.queue})
            op("queue.delete %s" % q("del"), lambda ch: ch.queue_delete(q("del")) and None,
               lambda: {"queue_exists_after": a.queue_exists(q("del"))})
            op("queue.purge %s (1 message)" % q("purge"),
               lambda ch: {"message_count": ch.queue_purge(q("purge")).method.message_count},
               lambda: {"message_count_after": a.count(q("purge"))})
            op("exchange.declare %s (new, direct)" % x("new"),
               lambda ch: ch.exchange_declare(x("new")) and None,
               lambda: {"exchange_exists_after": a.exchange_exists(x("new"))})
            op("exchange.declare %s (existing, non-passive)" % x("existing"),
               lambda ch: ch.exchange_declare(x("existing")) and None)
            op("exchange.declare %s passive (existing)" % x("existing"),
               lambda ch: ch.exchange_declare(x("existing"), passive=True) and None)
            op("exchange.declare %s passive (missing)" % x("missing"),
               lambda ch: ch.exchange_declare(x("missing"), passive=True) and None)
            op("exchange.delete %s" % x("del"), lambda ch: ch.exchange_delete(x("del")) and None,
               lambda: {"exchange_exists_after": a.exchange_exists(x("del"))})
            op("queue.bind %s to %s key k" % (q("bind"), x("bind")),
               lambda ch: ch.queue_bind(q("bind"), x("bind"), "k") and None,
               lambda: {"bound_after": a.routed(x("bind"), "k")})
            op("queue.unbind %s from %s key k (bound by guest)" % (q("unbind"), x("unbind")),
               lambda ch: ch.queue_unbind(q("unbind"), x("unbind"), "k") and None,
               lambda: {"bound_after": a.routed(x("unbind"), "k")})
            op("exchange.bind destination %s source %s key k" % (x("dest"), x("src")),
               lambda ch: ch.exchange_bind(x("dest"), x("src"), "k") and None,
               lambda: {"bound_after": a.routed(x("src"), "k")})
            op("exchange.unbind destination %s source %s key k (bound by guest)"
               % (x("dest2"), x("src2")),
               lambda ch: ch.exchange_unbind(x("dest2"), x("src2"), "k") and None,
               lambda: {"bound_after": a.routed(x("src2"), "k")})
            for exchange, key in ((x("pub"), "k"), ("", q("pub"))):
                for confirms in (False, True):
                    op("basic.publish exchange '%s' key %s, confirms %s"
                       % (exchange, key, "on" if confirms else "off"),
                       lambda ch: publish(ch, exchange, key, confirms),
                       lambda: {"queue_message_count_after": a.count(q("pub"))})
            op("basic.get %s (1 message)" % q("get"),
               lambda ch: {"got_message": ch.basic_get(q("get"), auto_ack=True)[0] is not None},
               lambda: {"message_count_after": a.count(q("get"))})
            op("basic.consume %s (1 message, auto-ack)" % q("consume"),
               lambda ch: ch.basic_consume(q("consume"), lambda *m: None, auto_ack=True)
               and None)
            usable = still_usable(s.conn)
        result["operations"] = ops
        result["connection_usable_after_all_operations"] = usable
        return result


@case("3/6. permission matrix: full permissions (control)")
def _():
    return matrix("full", ".*", ".*", ".*")


@case("3/6. permission matrix: configure missing")
def _():
    return matrix("noconf", "", ".*", ".*")


@case("4/6. permission matrix: write missing")
def _():
    return matrix("nowrite", ".*", "", ".*")


@case("5/6. permission matrix: read missing")
def _():
    return matrix("noread", ".*", ".*", "")


@case("6/7. permission matrix: all three permissions '' (login allowed? check order)")
def _():
    return matrix("none", "", "", "")


# ------------------------------------------------------------------- regexes


@case("7. partially matching permission regexes")
def _():
    results = {}
    set_permissions(VHOST, USER, r"^app\.", r"^app\.", r"^app\.")
    with Admin() as a, Session() as s:
        a.queue("app.fixture", messages=1)
        results["permissions ^app\\. ^app\\. ^app\\."] = {
            "queue.declare app.x": s.run(lambda ch: ch.queue_declare("app.x") and None),
            "queue.declare xapp.x": s.run(lambda ch: ch.queue_declare("xapp.x") and None),
            "queue.declare app": s.run(lambda ch: ch.queue_declare("app") and None),
            "queue.declare App.x": s.run(lambda ch: ch.queue_declare("App.x") and None),
            "exchange.declare app.ex": s.run(lambda ch: ch.exchange_declare("app.ex") and None),
            "queue.bind app.x to app.ex": s.run(
                lambda ch: ch.queue_bind("app.x", "app.ex", "k") and None),
            "basic.publish app.ex key k (confirms)": s.run(
                lambda ch: publish(ch, "app.ex", "k", True)),
            "basic.publish '' key app.x (confirms)": s.run(
                lambda ch: publish(ch, "", "app.x", True)),
            "basic.get app.fixture": s.run(
                lambda ch: {"got_message": ch.basic_get("app.fixture")[0] is not None}),
            "queue_exists_after: app.x, xapp.x, app": [
                a.queue_exists("app.x"), a.queue_exists("xapp.x"), a.queue_exists("app")],
        }
    set_permissions(VHOST, USER, "app", r"amq\.default", "")
    with Admin() as a, Session() as s:
        results["permissions app amq\\.default '' (unanchored)"] = {
            "queue.declare xapp.y": s.run(lambda ch: ch.queue_declare("xapp.y") and None),
            "queue.declare ap.y": s.run(lambda ch: ch.queue_declare("ap.y") and None),
            "basic.publish '' key app.x (confirms)": s.run(
                lambda ch: publish(ch, "", "app.x", True)),
            "basic.publish app.ex key k (confirms)": s.run(
                lambda ch: publish(ch, "app.ex", "k", True)),
            "basic.get app.x": s.run(
                lambda ch: {"got_message": ch.basic_get("app.x")[0] is not None}),
            "app.x message_count_after": a.count("app.x"),
        }
    return results


# ------------------------------------------------------------------- topics


@case("8. topic permissions (write on publish, read on bind; {username}/{vhost})")
def _():
    set_permissions(VHOST, USER, ".*", ".*", ".*")
    with Admin() as a:
        for x in ("t.topic", "t.free", "t.var", "t.dest"):
            a.exchange(x, "topic")
        a.exchange("t.direct", "direct")
        a.queue("t.q")
        a.queue("t.sink")
        a.bind("t.q", "t.topic", "other.#")  # for the unbind attempt
        a.bind("t.sink", "t.dest", "#")
        ctl("set_topic_permissions", "-p", VHOST, USER, "t.topic", r"^allowed\.", r"^readable\.")
        ctl("set_topic_permissions", "-p", VHOST, USER, "t.direct", r"^allowed\.", r"^readable\.")
        ctl("set_topic_permissions", "-p", VHOST, USER, "t.var", r"^{username}\.", r"^{vhost}\.")
        r = {"topic_permissions": [["t.topic", r"^allowed\.", r"^readable\."],
                                   ["t.direct", r"^allowed\.", r"^readable\."],
                                   ["t.var", r"^{username}\.", r"^{vhost}\."]]}
        with Session() as s:
            pub = lambda x, k: s.run(lambda ch: publish(ch, x, k, True))  # noqa: E731
            bind = lambda x, k: s.run(lambda ch: ch.queue_bind("t.q", x, k) and None)  # noqa: E731
            r["publish t.topic allowed.1"] = pub("t.topic", "allowed.1")
            r["publish t.topic denied.1"] = pub("t.topic", "denied.1")
            r["publish t.topic allowed (no dot)"] = pub("t.topic", "allowed")
            r["publish t.topic allowed.1, confirms off"] = s.run(
                lambda ch: publish(ch, "t.topic", "allowed.1", False))
            r["publish t.topic denied.1, confirms off"] = s.run(
                lambda ch: publish(ch, "t.topic", "denied.1", False))
            r["publish t.free denied.1 (topic exchange without topic permissions)"] = pub(
                "t.free", "denied.1")
            r["publish t.direct denied.1 (direct exchange with topic permissions)"] = pub(
                "t.direct", "denied.1")
            r["queue.bind t.q to t.topic readable.#"] = bind("t.topic", "readable.#")
            r["queue.bind t.q to t.topic other.x"] = bind("t.topic", "other.x")
            r["t.topic routes other.x after refused bind"] = a.routed("t.topic", "other.x")
            r["queue.unbind t.q from t.topic other.# (bound by guest)"] = s.run(
                lambda ch: ch.queue_unbind("t.q", "t.topic", "other.#") and None)
            r["t.topic routes other.1 after unbind attempt"] = a.routed("t.topic", "other.1")
            r["exchange.bind destination t.dest source t.topic key other.x"] = s.run(
                lambda ch: ch.exchange_bind("t.dest", "t.topic", "other.x") and None)
            r["exchange.bind destination t.topic source t.free key other.x"] = s.run(
                lambda ch: ch.exchange_bind("t.topic", "t.free", "other.x") and None)
            r["queue.bind t.q to t.direct other.x (direct exchange)"] = bind("t.direct", "other.x")
            r["publish t.var <user>.1"] = pub("t.var", USER + ".1")
            r["publish t.var someone.1"] = pub("t.var", "someone.1")
            r["publish t.var {username}.1 (literal)"] = pub("t.var", "{username}.1")
            r["queue.bind t.q to t.var <vhost>.#"] = bind("t.var", VHOST + ".#")
            r["queue.bind t.q to t.var <user>.#"] = bind("t.var", USER + ".#")
            r["queue.bind t.q to t.var {vhost}.# (literal)"] = bind("t.var", "{vhost}.#")
        ctl("clear_topic_permissions", "-p", VHOST, USER)
        with Session() as s:
            r["after clear_topic_permissions: publish t.topic denied.1"] = s.run(
                lambda ch: publish(ch, "t.topic", "denied.1", True))
            r["after clear_topic_permissions: queue.bind t.q to t.topic other.y"] = s.run(
                lambda ch: ch.queue_bind("t.q", "t.topic", "other.y") and None)
        return r


# -------------------------------------------------------------------- limits


@case("9. vhost limit max-connections=2: third connection")
def _():
    vhost = add_vhost("vhost-maxconn")
    ctl("set_vhost_limits", "-p", vhost, '{"max-connections": 2}')
    first = connect("guest", "guest", vhost)
    second = connect("guest", "guest", vhost)
    r = {"third (guest)": login_outcome("guest", "guest", vhost)}
    set_permissions(vhost, USER, ".*", ".*", ".*")
    r["third (another user)"] = login_outcome(USER, PASSWORD, vhost)
    r["first still usable"] = still_usable(first)
    second.close()
    r["after closing one: new connection within 2 s"] = login_within(WAIT, "guest", "guest",
                                                                     vhost)
    first.close()
    return r


@case("9. vhost limit max-connections=0")
def _():
    vhost = add_vhost("vhost-noconn")
    ctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
    return {"guest": login_outcome("guest", "guest", vhost)}


@case("9. vhost limit max-queues=1")
def _():
    vhost = add_vhost("vhost-maxqueues")
    ctl("set_vhost_limits", "-p", vhost, '{"max-queues": 1}')
    r = {}
    with Session("guest", "guest", vhost) as s, Admin(vhost) as a:
        r["queue.declare q1"] = s.run(lambda ch: ch.queue_declare("q1") and None)
        r["queue.declare q2 (at limit)"] = s.run(lambda ch: ch.queue_declare("q2") and None)
        r["q2 exists after"] = a.queue_exists("q2")
        r["queue.declare '' (server-named, at limit)"] = s.run(
            lambda ch: ch.queue_declare("", exclusive=True) and None)
        r["queue.declare q1 again (existing, at limit)"] = s.run(
            lambda ch: ch.queue_declare("q1") and None)
        r["queue.declare q1 passive (at limit)"] = s.run(
            lambda ch: ch.queue_declare("q1", passive=True) and None)
        r["connection usable after refusals"] = still_usable(s.conn)
        r["queue.delete q1"] = s.run(lambda ch: ch.queue_delete("q1") and None)
        r["queue.declare q2 after deleting q1"] = s.run(lambda ch: ch.queue_declare("q2") and None)
    return r


@case("10. user limit max-connections=1: second connection")
def _():
    user = add_user("user-maxconn")
    set_permissions(VHOST, user, ".*", ".*", ".*")
    ctl("set_user_limits", user, '{"max-connections": 1}')
    first = connect(user, "secret")
    r = {"second": login_outcome(user, "secret"),
         "first still usable": still_usable(first)}
    first.close()
    r["after closing the first: new connection within 2 s"] = login_within(WAIT, user, "secret")
    return r


@case("10. user limit max-channels=2: third channel")
def _():
    user = add_user("user-maxchannels")
    set_permissions(VHOST, user, ".*", ".*", ".*")
    ctl("set_user_limits", user, '{"max-channels": 2}')
    r = {}
    conn = connect(user, "secret")
    chans = [conn.channel(), conn.channel()]
    other = connect(user, "secret")
    try:
        other.channel()
        r["channel on a second connection while the first has 2"] = {"result": "ok"}
    except pika.exceptions.AMQPError as e:
        r["channel on a second connection while the first has 2"] = closed(e)
    r["second connection open after"] = other.is_open
    close_quietly(other)
    try:
        conn.channel()
        r["third channel on the first connection"] = {"result": "ok"}
    except pika.exceptions.AMQPError as e:
        r["third channel on the first connection"] = closed(e)
    r["first connection open after"] = conn.is_open
    r["existing channels open after"] = [c.is_open for c in chans]
    close_quietly(conn)
    # A refused channel.open closes the connection, so a retry (should the
    # broker count channels lazily) starts over on a new connection.
    label = "after closing one of 2 channels: new channel within 2 s"
    deadline = time.monotonic() + WAIT
    while True:
        conn = connect(user, "secret")
        conn.channel()
        conn.channel().close()
        try:
            conn.channel()
            r[label] = {"result": "ok"}
            break
        except pika.exceptions.AMQPError as e:
            if time.monotonic() >= deadline:
                r[label] = closed(e)
                break
            time.sleep(0.1)
    close_quietly(conn)
    return r


# ------------------------------------------------------- changes while connected


@case("11. delete_user while the user is connected")
def _():
    user = add_user("user-doomed")
    set_permissions(VHOST, user, ".*", ".*", ".*")
    conn = connect(user, "secret")
    ch = conn.channel()
    ctl("delete_user", user)
    r = {"connection (waited up to 2 s)": wait_for_close(conn) or "still open"}
    if conn.is_open:
        try:
            ch.queue_declare("doomed.q")
            r["queue.declare on the existing channel"] = {"result": "ok"}
        except pika.exceptions.AMQPError as e:
            r["queue.declare on the existing channel"] = closed(e)
        r["new channel usable"] = still_usable(conn)
    close_quietly(conn)
    r["new login"] = login_outcome(user, "secret")
    return r


@case("11. delete_vhost while a client is connected to it")
def _():
    vhost = add_vhost("vhost-doomed")
    conn = connect("guest", "guest", vhost)
    ch = conn.channel()
    ch.queue_declare("doomed.q")
    ctl("delete_vhost", vhost)
    r = {"connection (waited up to 2 s)": wait_for_close(conn) or "still open"}
    close_quietly(conn)
    r["new login"] = login_outcome("guest", "guest", vhost)
    return r


@case("11. clear_permissions while connected")
def _():
    set_permissions(VHOST, USER, ".*", ".*", ".*")
    conn = connect()
    same, other = conn.channel(), conn.channel()
    same.queue_declare("cleared.cached")
    other.queue_declare("cleared.cached")
    ctl("clear_permissions", "-p", VHOST, USER)
    r = {"connection (waited up to 2 s)": wait_for_close(conn) or "still open"}

    def attempt(fn):
        try:
            fn()
            return {"result": "ok"}
        except pika.exceptions.AMQPError as e:
            return closed(e)

    with Admin() as a:
        if conn.is_open:
            r["existing channel: queue.declare cleared.cached (declared before)"] = attempt(
                lambda: same.queue_declare("cleared.cached"))
            r["existing channel: queue.declare cleared.new"] = attempt(
                lambda: other.queue_declare("cleared.new"))
            r["cleared.new exists after"] = a.queue_exists("cleared.new")
            r["new channel: queue.declare cleared.cached"] = attempt(
                lambda: conn.channel().queue_declare("cleared.cached"))
            r["new channel: queue.declare cleared.cached passive"] = attempt(
                lambda: conn.channel().queue_declare("cleared.cached", passive=True))
            r["new channel: basic.publish '' key cleared.cached (confirms)"] = attempt(
                lambda: publish(conn.channel(), "", "cleared.cached", True))
            r["connection open after"] = conn.is_open
    close_quietly(conn)
    r["new login"] = login_outcome()
    return r


@case("12. change_password while connected")
def _():
    user = add_user("user-pwchange", "old-secret")
    set_permissions(VHOST, user, ".*", ".*", ".*")
    conn = connect(user, "old-secret")
    ch = conn.channel()
    ctl("change_password", user, "new-secret")
    r = {"connection (waited up to 2 s)": wait_for_close(conn) or "still open"}
    if conn.is_open:
        try:
            ch.queue_declare("pwchange.q")
            r["queue.declare on the existing channel"] = {"result": "ok"}
        except pika.exceptions.AMQPError as e:
            r["queue.declare on the existing channel"] = closed(e)
        r["new channel usable"] = still_usable(conn)
    close_quietly(conn)
    r["new login, old password"] = login_outcome(user, "old-secret")
    r["new login, new password"] = login_outcome(user, "new-secret")
    return r


@case("13. set_user_tags administrator")
def _():
    set_permissions(VHOST, USER, ".*", ".*", ".*")
    ctl("set_user_tags", USER, "administrator")
    return {"login to <vhost> (has permissions)": login_outcome(),
            "login to <vhost-noperm> (no permissions)": login_outcome(
                vhost=name("vhost-noperm"))}


@case("14. basic.publish user_id property as user 'u'")
def _():
    set_permissions(VHOST, USER, ".*", ".*", ".*")
    r = {}
    with Admin() as a, Session() as s:
        a.queue("uid.q")
        for label, props in (("user_id equal to the user", {"user_id": USER}),
                             ("user_id different (mallory)", {"user_id": "mallory"}),
                             ("no user_id", {})):
            entry = s.run(lambda ch: publish(ch, "", "uid.q", True, **props))
            got = a.channel().basic_get("uid.q", auto_ack=True)
            entry["delivered_user_id"] = got[1].user_id if got[0] else "<no message>"
            r[label] = entry
        r["connection usable after"] = still_usable(s.conn)
    return r


# --------------------------------------------------------------------- output


def normalise(value):
    if isinstance(value, dict):
        return {normalise(k): normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, bytes):
        return normalise(value.decode("utf-8", "replace"))
    if isinstance(value, str):
        value = re.sub(r"amq\.gen-[\w-]+", "<generated>", value)
        return re.sub(r"ac-([a-z-]+?)-" + RUN, r"<\1>", value)
    return value


def cleanup():
    for user in CREATED_USERS + [USER]:
        try:
            ctl("delete_user", user, settle=False)
        except CtlError:
            pass
    for vhost in CREATED_VHOSTS + [VHOST]:
        try:
            ctl("delete_vhost", vhost, settle=False)
        except CtlError:
            pass


def run():
    results = []
    try:
        ctl("add_user", USER, PASSWORD)
        ctl("add_vhost", VHOST)
        ctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
        for title, fn in CASES:
            try:
                r = fn()
            except Exception as e:  # record probe failures instead of aborting
                r = {"result": "probe error: %s: %s" % (type(e).__name__, e)}
            results.append(normalise(dict({"case": title}, **r)))
    finally:
        cleanup()
    return results


if __name__ == "__main__":
    text = json.dumps(run(), indent=2) + "\n"
    if "--out" in sys.argv:  # otherwise (with or without --json) to stdout
        with open(sys.argv[sys.argv.index("--out") + 1], "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
