"""The search client: sends search requests to the `search-requests` queue
and waits for the answers, matching each answer to its request by
correlation_id. Answers come to a reply queue of the client's own (exclusive,
named by the broker, deleted when the client goes) or, with --direct, by
Direct Reply-To (`amq.rabbitmq.reply-to`: straight to the client's channel,
no queue at all).

    python3 examples/request_reply/search_client.py rust python
    python3 examples/request_reply/search_client.py rust python --direct
"""

import argparse
import json
import sys
import time
import uuid

import pika

from search_worker import DEFAULT_URL, declare_queue

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class SearchClient:
    def __init__(self, url, queue="search-requests", direct=False):
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        declare_queue(self.channel, queue)
        if direct:
            self.reply_to = DIRECT_REPLY_TO
        else:
            self.reply_to = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        # Direct Reply-To needs this consumer (no-ack) before the first request.
        self.channel.basic_consume(self.reply_to, self._on_answer, auto_ack=True)
        self.pending = {}  # correlation_id -> answer (None until it comes)
        self.ignored = []  # answers to no pending request: late, duplicate or stray

    def _on_answer(self, channel, method, properties, body):
        correlation_id = properties.correlation_id
        if correlation_id in self.pending and self.pending[correlation_id] is None:
            self.pending[correlation_id] = json.loads(body)
        else:
            self.ignored.append((correlation_id, body))

    def search_many(self, queries, timeout=2.0):
        """Sends every query at once; returns their answers in the same order,
        None for each query not answered within `timeout` seconds."""
        ids = []
        for query in queries:
            correlation_id = uuid.uuid4().hex
            self.pending[correlation_id] = None
            ids.append(correlation_id)
            self.channel.basic_publish(
                "",
                self.queue,
                query.encode(),
                pika.BasicProperties(
                    reply_to=self.reply_to,
                    correlation_id=correlation_id,
                    # Nobody waits for the answer after the timeout: the
                    # broker drops the request rather than have a worker
                    # start on it later.
                    expiration=str(int(timeout * 1000)),
                ),
            )
        deadline = time.monotonic() + timeout
        while any(self.pending[i] is None for i in ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Returns as soon as an answer came in, or after `remaining`.
            self.connection.process_data_events(time_limit=remaining)
        # Forget them: an answer coming later is ignored.
        return [self.pending.pop(i) for i in ids]

    def workers(self):
        """How many workers are consuming requests right now."""
        return self.channel.queue_declare(self.queue, passive=True).method.consumer_count

    def close(self):
        self.connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("query", nargs="+")
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--queue", default="search-requests")
    parser.add_argument("--direct", action="store_true", help="answers by Direct Reply-To")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answers")
    args = parser.parse_args(argv)
    client = SearchClient(args.url, args.queue, direct=args.direct)
    answers = client.search_many(args.query, args.timeout)
    for query, answer in zip(args.query, answers):
        if answer is None:
            print("%r: no answer within %.1f s; is a search worker running?" % (query, args.timeout))
        else:
            print("%r: %s (from %s)" % (query, answer["results"], answer["worker"]))
    client.close()
    return 0 if None not in answers else 1


if __name__ == "__main__":
    sys.exit(main())
