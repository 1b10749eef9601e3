"""A subscriber service. Each service has its own durable queue,
`<exchange>.<service>`, bound to the statuses it acts on; the broker puts a
copy of each matching status change in it. While the service is down its
queue keeps the changes, and it catches up when it starts again.

    python3 examples/pubsub/subscriber.py shipping
"""

import argparse
import json
import signal

import pika

from order_service import DEFAULT_URL, declare_exchange

# What each service does on which status ("*" binds order.*: every status).
SERVICES = {
    "packaging": {"paid": "pick and pack the items", "cancelled": "put the items back on the shelf"},
    "shipping": {"packed": "book a courier", "cancelled": "cancel the courier"},
    "delivery": {"shipped": "plan the delivery route", "delivered": "file the proof of delivery"},
    "notifications": {"*": "email the customer"},
    "loyalty": {"delivered": "award loyalty points"},
}


def binding_keys(service):
    return ["order." + status for status in SERVICES[service]]


def wants(service, status):
    return status in SERVICES[service] or "*" in SERVICES[service]


def queue_name(exchange, service):
    return "%s.%s" % (exchange, service)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--exchange", default="order-status")
    args = parser.parse_args(argv)
    name, actions = args.service, SERVICES[args.service]
    queue = queue_name(args.exchange, name)

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    declare_exchange(channel, args.exchange)
    channel.queue_declare(queue, durable=True)
    for key in binding_keys(name):
        channel.queue_bind(queue, args.exchange, routing_key=key)
    channel.basic_qos(prefetch_count=10)

    def on_status(ch, method, properties, body):
        event = json.loads(body)
        action = actions.get(event["status"]) or actions["*"]
        print("%s: order %s %s -> %s" % (name, event["order"], event["status"], action), flush=True)
        # Acknowledged once acted on: if the service dies before this line,
        # the change is delivered again (at least once; acting twice must be
        # harmless).
        ch.basic_ack(method.delivery_tag)

    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True  # finish the change in hand, then leave

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    channel.basic_consume(queue, on_status)
    print("%s: listening on queue %s for %s" % (name, queue, ", ".join(binding_keys(name))), flush=True)
    while not stopping:
        connection.process_data_events(time_limit=0.2)
    connection.close()  # prefetched changes not yet acted on go back to the queue


if __name__ == "__main__":
    main()
