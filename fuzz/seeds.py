#!/usr/bin/env python3
"""Writes the starting corpus: real AMQP frames (a publish with its header
and body, a queue.declare with a field table, heartbeats) for
frame_decoder, and small valid segments for segment_recovery. The fuzzer
adds what it finds to the same directories.

    python3 fuzz/seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def shortstr(s):
    b = s.encode()
    return bytes([len(b)]) + b


def table(pairs):
    body = b""
    for key, kind, value in pairs:
        body += shortstr(key) + kind + value
    return struct.pack(">I", len(body)) + body


def frame(kind, channel, payload):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def method(class_id, method_id, args):
    return frame(1, 1, struct.pack(">HH", class_id, method_id) + args)


publish = method(60, 40, struct.pack(">H", 0) + shortstr("amq.direct") + shortstr("key") + b"\x00")
headers = table([("x-delay", b"I", struct.pack(">i", 5000)), ("name", b"S", struct.pack(">I", 3) + b"abc")])
# delivery-mode, headers, message-id, expiration
flags = (1 << 12) | (1 << 13) | (1 << 8) | (1 << 4)
props = headers + b"\x02" + shortstr("60000") + shortstr("id-1")
header = frame(2, 1, struct.pack(">HHQH", 60, 0, 5, flags) + props)
body = frame(3, 1, b"hello")
declare = method(50, 10, struct.pack(">H", 0) + shortstr("jobs") + b"\x02"
                 + table([("x-max-length", b"l", struct.pack(">q", 10)), ("x-queue-type", b"S", struct.pack(">I", 7) + b"classic")]))
heartbeat = frame(8, 0, b"")
frame_max = struct.pack(">H", 0x1000)
seeds = {
    "publish": frame_max + publish + header + body,
    "declare": frame_max + declare,
    "heartbeat": frame_max + heartbeat * 3,
    "oversized": frame_max + struct.pack(">BHI", 3, 1, 0xFFFFFFF0),
}
for name, data in seeds.items():
    with open(os.path.join(HERE, "corpus", "frame_decoder", name), "wb") as f:
        f.write(data)

# segment_recovery input: [records % 8 | flip flag][flip offset u16] then,
# per record, a length byte and payload; the rest is the raw tail.
for name, data in {
    "three-records": bytes([3]) + b"\x00\x10" + b"\x05hello" + b"\x03abc" + b"\x00",
    "torn-tail": bytes([2]) + b"\x00\x00" + b"\x04ping" + b"\x04pong" + b"\x01\x02\x03",
    "flipped": bytes([0x82]) + b"\x00\x09" + b"\x06record" + b"\x06second",
}.items():
    with open(os.path.join(HERE, "corpus", "segment_recovery", name), "wb") as f:
        f.write(data)
print("seeds written")
