"""A chat client. Rooms are routing keys, `room.<name>`, on the `chat` topic
exchange. Each participant has its own exclusive, auto-delete queue, bound to
the rooms it is in: it gets every message of those rooms the moment it is
sent, in the order it was sent, and its queue is gone when it leaves.

    python3 examples/chat/chat.py alice rust random

Type a line to say it in your first room, `#room text` to say it in another
of your rooms, `/join room`, `/leave room`, `/quit` (or end the input). The
room `*` is every room: `python3 examples/chat/chat.py eve '*'` reads them all.
"""

import argparse
import functools
import json
import os
import sys
import threading

import pika

DEFAULT_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")


def room_key(room):
    return "room." + room


class Chat:
    def __init__(self, url, name, rooms, exchange="chat"):
        self.name = name
        self.exchange = exchange
        self.rooms = []
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, "topic")
        # Named by the broker; only this connection may use it, and it is
        # deleted with it: nothing piles up for someone who has left.
        self.queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for room in rooms:
            self.join(room)
        # auto_ack: a chat line is worth nothing once its reader is gone.
        self.channel.basic_consume(self.queue, self.on_message, auto_ack=True)

    def join(self, room):
        self.channel.queue_bind(self.queue, self.exchange, routing_key=room_key(room))
        self.rooms.append(room)

    def leave(self, room):
        self.channel.queue_unbind(self.queue, self.exchange, routing_key=room_key(room))
        self.rooms.remove(room)

    def say(self, room, text):
        message = json.dumps({"from": self.name, "text": text}).encode()
        self.channel.basic_publish(self.exchange, room_key(room), message)

    def on_message(self, channel, method, properties, body):
        message = json.loads(body)
        room = method.routing_key[len("room."):]
        print("#%s <%s> %s" % (room, message["from"], message["text"]), flush=True)

    def command(self, line):
        """One line typed by the participant (run on the connection's thread)."""
        line = line.strip()
        if line == "/quit":
            self.channel.stop_consuming()
        elif line.startswith("/join "):
            self.join(line.split()[1])
            print("* %s joined #%s" % (self.name, line.split()[1]), flush=True)
        elif line.startswith("/leave "):
            room = line.split()[1]
            if room in self.rooms:
                self.leave(room)
                print("* %s left #%s" % (self.name, room), flush=True)
        elif line.startswith("#"):
            room, _, text = line[1:].partition(" ")
            if room in self.rooms and room != "*":
                self.say(room, text)
            else:
                print("* you are not in #%s" % room, flush=True)
        elif line and self.rooms and self.rooms[0] != "*":
            self.say(self.rooms[0], line)

    def run(self, lines):
        """Says what comes from `lines` while printing what the rooms say."""

        def read():
            for line in iter(lines.readline, ""):
                self.connection.add_callback_threadsafe(functools.partial(self.command, line))
            self.connection.add_callback_threadsafe(self.channel.stop_consuming)

        threading.Thread(target=read, daemon=True).start()
        self.channel.start_consuming()
        self.connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("rooms", nargs="+", metavar="room")
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--exchange", default="chat")
    args = parser.parse_args(argv)
    chat = Chat(args.url, args.name, args.rooms, args.exchange)
    rooms = ", ".join("#" + room for room in args.rooms)
    print("* %s is in %s (queue %s)" % (args.name, rooms, chat.queue), flush=True)
    try:
        chat.run(sys.stdin)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
