#!/usr/bin/env python3
"""What an unchanged pika client sees for connection-level failures
(wrong password with/without the authentication_failure_close capability,
missing vhost) and for channel errors surfaced through pika.

    REF_PORT=5673 python3 scripts/reference/pika_views.py
"""

import os
import time

import pika
import pika.exceptions

PORT = int(os.environ.get("REF_PORT", "5673"))
HOST = os.environ.get("REF_HOST", "127.0.0.1")


def params(**kw):
    p = pika.ConnectionParameters(
        host=HOST, port=PORT, connection_attempts=1, socket_timeout=10,
        credentials=pika.PlainCredentials(kw.pop("user", "guest"), kw.pop("password", "guest")),
        **kw)
    return p


def attempt(title, p):
    t0 = time.monotonic()
    try:
        conn = pika.BlockingConnection(p)
    except Exception as e:  # noqa: BLE001 - we want to see what pika raises
        inner = ""
        if getattr(e, "args", None):
            inner = " args=%r" % (e.args,)
        print("%-60s -> %s%s after %.2fs" % (title, type(e).__name__, inner, time.monotonic() - t0))
        return
    print("%-60s -> connected (unexpected)" % title)
    conn.close()


def main():
    attempt("wrong password (pika default caps: auth_failure_close=true)",
            params(password="wrong"))
    attempt("wrong password, capabilities={} (no auth_failure_close)",
            params(password="wrong", client_properties={"capabilities": {}}))
    attempt("missing vhost", params(virtual_host="no-such-vhost"))

    conn = pika.BlockingConnection(params())
    ch = conn.channel()
    try:
        ch.queue_declare("missing-queue", passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        print("%-60s -> ChannelClosedByBroker(%d, %r)" % ("passive declare missing queue",
                                                           e.reply_code, e.reply_text))
    ch = conn.channel()
    try:
        ch.basic_qos(prefetch_size=1)
    except pika.exceptions.ConnectionClosedByBroker as e:
        print("%-60s -> ConnectionClosedByBroker(%d, %r)" % ("basic.qos prefetch_size=1",
                                                              e.reply_code, e.reply_text))
    if conn.is_open:
        conn.close()


if __name__ == "__main__":
    main()
