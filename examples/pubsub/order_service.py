"""The order service: publishes each status change of an order, once, to the
`order-status` topic exchange, with the routing key `order.<status>`. It does
not know who listens; new subscribers need no change here.

    python3 examples/pubsub/order_service.py 1001 paid
"""

import argparse
import datetime
import json
import os

import pika

DEFAULT_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")


def declare_exchange(channel, exchange):
    channel.exchange_declare(exchange, "topic", durable=True)


class OrderService:
    def __init__(self, url, exchange="order-status"):
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declare_exchange(self.channel, exchange)

    def publish_status(self, order_id, status):
        """Returns once the broker has the message in every queue bound to
        `order.<status>` (on disk for durable queues); raises if not."""
        event = {
            "order": order_id,
            "status": status,
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        self.channel.basic_publish(
            self.exchange,
            "order." + status,
            json.dumps(event).encode(),
            pika.BasicProperties(delivery_mode=2, content_type="application/json"),
        )

    def close(self):
        self.connection.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("order")
    parser.add_argument("status", nargs="+", help="e.g. created paid packed shipped delivered")
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--exchange", default="order-status")
    args = parser.parse_args(argv)
    service = OrderService(args.url, args.exchange)
    for status in args.status:
        service.publish_status(args.order, status)
        print("order %s is %s" % (args.order, status))
    service.close()


if __name__ == "__main__":
    main()
