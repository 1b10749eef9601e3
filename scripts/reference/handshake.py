#!/usr/bin/env python3
"""Records the broker's connection handshake: connection.start contents
(server_properties, mechanisms, locales), the connection.tune proposal, and
the exact bytes sent back for wrong protocol headers.

    REF_PORT=5673 python3 scripts/reference/handshake.py [--slow]

--slow also measures the timeout for a client that sends a partial header.
"""

import sys
import time

import pika.spec as spec

from amqp_raw import RawClient


def show_table(t, indent="  "):
    for k in sorted(t):
        v = t[k]
        if isinstance(v, dict):
            print("%s%s:" % (indent, k))
            show_table(v, indent + "  ")
        else:
            print("%s%s: %r" % (indent, k, v))


def start_and_tune():
    c = RawClient()
    c.send_raw(b"AMQP\x00\x00\x09\x01")
    start = c.recv_frame()
    m = start.method
    print("== connection.start (channel %d)" % start.channel_number)
    print("version_major=%d version_minor=%d" % (m.version_major, m.version_minor))
    print("mechanisms=%r" % m.mechanisms)
    print("locales=%r" % m.locales)
    print("server_properties:")
    show_table(m.server_properties)
    c.send_method(0, spec.Connection.StartOk(
        client_properties={"capabilities": {"authentication_failure_close": True}},
        mechanism="PLAIN", response=b"\x00guest\x00guest"))
    tune = c.recv_frame().method
    print("== connection.tune")
    print("channel_max=%d frame_max=%d heartbeat=%d"
          % (tune.channel_max, tune.frame_max, tune.heartbeat))
    c.send_method(0, spec.Connection.TuneOk(
        channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
    c.send_method(0, spec.Connection.Open(virtual_host="/"))
    ok = c.recv_frame().method
    print("== connection.open-ok known_hosts=%r" % ok.known_hosts)
    c.send_method(1, spec.Channel.Open())
    print("== channel.open-ok channel_id=%r" % c.recv_frame().method.channel_id)
    c.send_method(0, spec.Connection.Close(reply_code=200, reply_text="bye",
                                           class_id=0, method_id=0))
    reply = c.recv_frame()
    print("== connection.close -> %s" % reply.method.NAME)
    data, secs, how = c.wait_socket_close(5)
    print("   after close-ok: extra bytes %r; socket %s"
          % (data, "closed by server (%s) after %.2fs" % (how, secs) if secs is not None
             else "still open after 5s (server waits for the client to close)"))


HEADERS = [
    ("AMQP 0-9-1 with wrong revision", b"AMQP\x00\x00\x09\x00"),
    ("AMQP 0-10", b"AMQP\x00\x00\x0a\x00"),
    ("AMQP 0-8 (old style 1,1,8,0)", b"AMQP\x01\x01\x08\x00"),
    ("AMQP 0-9 (old style 1,1,0,9)", b"AMQP\x01\x01\x00\x09"),
    ("AMQP 0-8 (new style 0,0,8,0)", b"AMQP\x00\x00\x08\x00"),
    ("AMQP 1.0", b"AMQP\x00\x01\x00\x00"),
    ("AMQP 1.0 SASL", b"AMQP\x03\x01\x00\x00"),
    ("HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("garbage 8 bytes", b"XYZW\x00\x00\x09\x01"),
]


def wrong_headers():
    print("== protocol headers")
    for title, hdr in HEADERS:
        c = RawClient()
        c.send_raw(hdr)
        data, secs, how = c.wait_socket_close(5)
        when = "closed (%s) after %.2fs" % (how, secs) if secs is not None else "still open after 5s"
        shown = data if len(data) <= 16 else data[:16] + b"...(%d bytes)" % len(data)
        print("%-32s sent %-40r -> got %r, socket %s" % (title, hdr, shown, when))


def partial_header():
    c = RawClient()
    c.send_raw(b"AMQP")
    data, secs, how = c.wait_socket_close(20)
    print("partial header 'AMQP' then silence -> got %r, socket %s"
          % (data, "closed (%s) after %.1fs" % (how, secs) if secs is not None else "open after 20s"))
    c = RawClient()
    data, secs, how = c.wait_socket_close(20)
    print("connect and send nothing -> got %r, socket %s"
          % (data, "closed (%s) after %.1fs" % (how, secs) if secs is not None else "open after 20s"))


if __name__ == "__main__":
    start_and_tune()
    wrong_headers()
    if "--slow" in sys.argv:
        partial_header()
