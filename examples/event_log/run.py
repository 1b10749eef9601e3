"""An event log on a stream queue: the order service appends every order
event to the stream `order-events`; a live dashboard reads new events as
they come; later, a new analytics service replays the events since a point
in time, and an auditor reads the whole history. Reading consumes nothing:
every reader gets its own copy, and the stream still holds every event.

    python3 examples/event_log/run.py

The broker is $WARREN_AMQP_URL (default amqp://guest:guest@localhost:5672/%2F).
"""

import argparse
import datetime
import json
import os
import sys
import time

import pika

DEFAULT_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")

MORNING = [("1001", "created"), ("1001", "paid"), ("1002", "created")]
AFTERNOON = [("1002", "paid"), ("1001", "shipped"), ("1003", "created"), ("1002", "cancelled")]


def show(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Reader:
    """A consumer of the stream from `offset`: the events it got, in order."""

    def __init__(self, connection, stream, name, offset):
        self.name, self.events, self.connection = name, [], connection
        self.channel = connection.channel()
        # A stream consumer needs a prefetch; its acks only give credit back.
        self.channel.basic_qos(prefetch_count=100)
        self.channel.basic_consume(stream, self.on_event, arguments={"x-stream-offset": offset})

    def on_event(self, channel, method, properties, body):
        event = json.loads(body)
        offset = properties.headers["x-stream-offset"]
        show("%s: #%d order %s %s" % (self.name, offset, event["order"], event["status"]))
        self.events.append((event["order"], event["status"]))
        channel.basic_ack(method.delivery_tag)

    def wait_for(self, count, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)
        # Anything beyond what was expected would show up now.
        self.connection.process_data_events(time_limit=0.2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--stream", default="order-events")
    args = parser.parse_args(argv)

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    publisher = connection.channel()
    publisher.queue_delete(args.stream)  # start from scratch: no events of an earlier run
    # Durable, and kept for a week (or 1 GiB), whoever has read it.
    publisher.queue_declare(args.stream, durable=True, arguments={
        "x-queue-type": "stream", "x-max-age": "7D", "x-max-length-bytes": 1 << 30})
    publisher.confirm_delivery()

    def publish(events):
        for order, status in events:
            body = json.dumps({"order": order, "status": status})
            # Confirmed once the event is on disk.
            publisher.basic_publish("", args.stream, body.encode(), pika.BasicProperties(
                content_type="application/json", delivery_mode=2))
            show("order service: order %s %s" % (order, status))

    dashboard = Reader(connection, args.stream, "dashboard", "next")
    publish(MORNING)
    dashboard.wait_for(len(MORNING))

    # Stream timestamps have a resolution of one second: the afternoon
    # starts at the next whole second.
    time.sleep(1.1 - time.time() % 1)
    afternoon = datetime.datetime.fromtimestamp(int(time.time()), datetime.timezone.utc)
    time.sleep(0.1)
    show("--- afternoon starts at %s" % afternoon.strftime("%H:%M:%S"))
    publish(AFTERNOON)
    dashboard.wait_for(len(MORNING) + len(AFTERNOON))

    show("--- a new analytics service replays the events since the afternoon began")
    analytics = Reader(connection, args.stream, "analytics", afternoon)
    analytics.wait_for(len(AFTERNOON))
    show("--- an auditor reads the whole history")
    auditor = Reader(connection, args.stream, "auditor", "first")
    auditor.wait_for(len(MORNING) + len(AFTERNOON))
    held = publisher.queue_declare(args.stream, durable=True, passive=True).method.message_count
    connection.close()

    results = {"dashboard": dashboard.events, "analytics": analytics.events, "auditor": auditor.events}
    expected = {"dashboard": MORNING + AFTERNOON, "analytics": AFTERNOON, "auditor": MORNING + AFTERNOON}
    ok = results == expected and held == len(MORNING) + len(AFTERNOON)
    show("")
    for name in results:
        show("%-9s %-5s %d events" % (name, "ok" if results[name] == expected[name] else "WRONG", len(results[name])))
    show("the stream still holds %d events" % held)
    show("every reader got its events, and reading consumed nothing" if ok else "MISMATCH")
    return {"ok": ok, "results": results, "held": held}


if __name__ == "__main__":
    # A broker from this checkout when none listens at the default address.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import local_broker  # noqa: E402

    sys.exit(0 if local_broker.run_example(main, DEFAULT_URL) else 1)
