"""Minimal raw-socket AMQP 0-9-1 client used to record a broker's exact replies.

Uses pika only as a frame codec (pika.frame / pika.spec); the connection
handshake and every method are driven by hand, so the exact close codes,
texts and class/method ids the broker sends can be observed.

Port: REF_PORT (default 5673), host: REF_HOST (default 127.0.0.1).
"""

import os
import socket
import struct
import time

import pika.frame
import pika.spec as spec

HOST = os.environ.get("REF_HOST", "127.0.0.1")
PORT = int(os.environ.get("REF_PORT", "5673"))
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

DEFAULT_CAPABILITIES = {
    "authentication_failure_close": True,
    "basic.nack": True,
    "connection.blocked": True,
    "consumer_cancel_notify": True,
    "publisher_confirms": True,
}


class Closed(Exception):
    """The socket was closed by the peer."""


class RawClient:
    def __init__(self, host=HOST, port=PORT, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.server_properties = None
        self.tune = None

    # ------------------------------------------------------------ transport

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_raw(self, timeout=2.0):
        """Read everything until the peer closes or `timeout` elapses."""
        self.sock.settimeout(timeout)
        data = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        except ConnectionResetError:
            pass
        return data

    def wait_socket_close(self, timeout=10.0):
        """Returns (bytes received, seconds until the peer closed or None,
        how it closed: "FIN", "RST" or None)."""
        t0 = time.monotonic()
        self.sock.settimeout(timeout)
        data = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return data, time.monotonic() - t0, "FIN"
                data += chunk
        except socket.timeout:
            return data, None, None
        except ConnectionResetError:
            return data, time.monotonic() - t0, "RST"

    def recv_frame(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.buf:
                consumed, frame = pika.frame.decode_frame(self.buf)
                if frame is not None:
                    self.buf = self.buf[consumed:]
                    if isinstance(frame, pika.frame.Heartbeat):
                        continue
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame within %.1fs" % timeout)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no frame within %.1fs" % timeout)
            except ConnectionResetError:
                raise Closed("connection reset by peer (RST)")
            if not chunk:
                raise Closed("socket closed by peer (FIN)")
            self.buf += chunk

    def send_method(self, channel, method):
        self.sock.sendall(pika.frame.Method(channel, method).marshal())

    def publish(self, channel, exchange, routing_key, body=b"", props=None,
                mandatory=False, immediate=False, frame_max=131072):
        props = props or spec.BasicProperties()
        out = [
            pika.frame.Method(channel, spec.Basic.Publish(
                exchange=exchange, routing_key=routing_key,
                mandatory=mandatory, immediate=immediate)).marshal(),
            pika.frame.Header(channel, len(body), props).marshal(),
        ]
        step = frame_max - 8
        for i in range(0, len(body), step):
            out.append(pika.frame.Body(channel, body[i:i + step]).marshal())
        self.sock.sendall(b"".join(out))

    # ------------------------------------------------------------ handshake

    def handshake(self, user="guest", password="guest", vhost="/",
                  capabilities=None, heartbeat=0, channel_max=None):
        """Runs start/start-ok/tune/tune-ok/open. Returns the open reply frame
        (Connection.OpenOk, or Connection.Close on failure)."""
        self.send_raw(PROTOCOL_HEADER)
        start = self.recv_frame()
        assert isinstance(start.method, spec.Connection.Start), start
        self.server_properties = start.method.server_properties
        self.start = start.method
        caps = DEFAULT_CAPABILITIES if capabilities is None else capabilities
        client_props = {"product": "warren-reference-probe", "capabilities": caps}
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        self.send_method(0, spec.Connection.StartOk(
            client_properties=client_props, mechanism="PLAIN", response=response))
        reply = self.recv_frame()
        if not isinstance(reply.method, spec.Connection.Tune):
            return reply
        self.tune = reply.method
        self.send_method(0, spec.Connection.TuneOk(
            channel_max=reply.method.channel_max if channel_max is None else channel_max,
            frame_max=reply.method.frame_max,
            heartbeat=heartbeat))
        self.send_method(0, spec.Connection.Open(virtual_host=vhost))
        return self.recv_frame()

    def open_channel(self, channel):
        self.send_method(channel, spec.Channel.Open())
        reply = self.recv_frame()
        assert isinstance(reply.method, spec.Channel.OpenOk), reply
        return reply

    def call(self, channel, method, timeout=5.0):
        """Send a method and return the next method frame (skipping content)."""
        self.send_method(channel, method)
        return self.next_method(timeout)

    def next_method(self, timeout=5.0):
        """Next method frame; content header/body frames are skipped."""
        while True:
            frame = self.recv_frame(timeout)
            if isinstance(frame, pika.frame.Method):
                return frame

    def wait_close(self, timeout=5.0):
        """Wait for channel.close or connection.close; answer it with close-ok.
        Other methods (deliveries, returns, ...) are skipped."""
        while True:
            frame = self.next_method(timeout)
            m = frame.method
            if isinstance(m, spec.Channel.Close):
                self.send_method(frame.channel_number, spec.Channel.CloseOk())
                return frame
            if isinstance(m, spec.Connection.Close):
                self.send_method(0, spec.Connection.CloseOk())
                return frame

    def close(self):
        try:
            self.send_method(0, spec.Connection.Close(
                reply_code=200, reply_text="bye", class_id=0, method_id=0))
            self.recv_frame(2.0)
        except Exception:
            pass
        try:
            self.sock.close()
        except Exception:
            pass


def connected(channel=1, **kw):
    c = RawClient()
    reply = c.handshake(**kw)
    assert isinstance(reply.method, spec.Connection.OpenOk), reply
    if channel:
        c.open_channel(channel)
    return c


def describe(frame):
    """Normalises a close frame into a dict for the report."""
    m = frame.method
    scope = "connection" if isinstance(m, spec.Connection.Close) else "channel"
    cls = spec.methods.get((m.class_id << 16) | m.method_id)
    return {
        "scope": scope,
        "reply_code": m.reply_code,
        "reply_text": m.reply_text,
        "class_id": m.class_id,
        "method_id": m.method_id,
        "method": cls.NAME if cls else None,
    }
