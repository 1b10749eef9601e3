"""A search worker: takes search requests from the `search-requests` queue,
one at a time, and publishes each answer to the request's reply_to, with the
request's correlation_id. Start several; they share the requests.

    python3 examples/request_reply/search_worker.py --name worker-1
"""

import argparse
import json
import os
import signal
import sys

import pika

DEFAULT_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")

CATALOGUE = [
    "Programming Rust",
    "The Rust Programming Language",
    "Rust for Rustaceans",
    "Fluent Python",
    "Python Cookbook",
    "Programming Erlang",
    "Designing for Scalability with Erlang/OTP",
    "The Go Programming Language",
    "Learn You a Haskell for Great Good!",
    "SQL Performance Explained",
    "Designing Data-Intensive Applications",
    "Enterprise Integration Patterns",
]


def show(line):
    """Prints a line in one write, so that the lines of several processes
    sharing a terminal do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def search(query):
    return [title for title in CATALOGUE if query.lower() in title.lower()]


def declare_queue(channel, queue):
    """Not durable: a request is worthless once its client has given up."""
    channel.queue_declare(queue)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--queue", default="search-requests")
    parser.add_argument("--name", default="worker-%d" % os.getpid())
    args = parser.parse_args(argv)

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    declare_queue(channel, args.queue)
    channel.basic_qos(prefetch_count=1)

    def on_request(ch, method, properties, body):
        if not properties.reply_to:
            ch.basic_reject(method.delivery_tag, requeue=False)  # nobody to answer
            return
        query = body.decode()
        answer = {"query": query, "results": search(query), "worker": args.name}
        ch.basic_publish(
            "",  # the default exchange: the routing key is the reply queue
            properties.reply_to,
            json.dumps(answer).encode(),
            pika.BasicProperties(correlation_id=properties.correlation_id, content_type="application/json"),
        )
        # Acknowledged after answering: a worker dying before this line
        # leaves the request to another worker (the client may then get two
        # answers and keeps the first).
        ch.basic_ack(method.delivery_tag)
        show("%s: answered %r (%d found)" % (args.name, query, len(answer["results"])))

    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    channel.basic_consume(args.queue, on_request)
    show("%s: answering requests from queue %r" % (args.name, args.queue))
    while not stopping:
        connection.process_data_events(time_limit=0.2)
    connection.close()


if __name__ == "__main__":
    main()
