"""The web form: an HTTP endpoint that accepts a form as POSTed JSON and puts
it on the work queue as a persistent message. It answers 202 with the form's
id only once the broker has confirmed the message (it is then on disk), and
503 if it could not be queued, so the browser can try again.

    python3 examples/work_queue/webform.py --port 8080
    curl -d '{"name": "Ada", "email": "ada@example.com"}' http://localhost:8080/forms

A form's id is its Idempotency-Key header if it has one, else a new UUID.
"""

import argparse
import json
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pika
import pika.exceptions

from worker import DEFAULT_URL, declare_queue


class Publisher:
    """One connection and confirm-mode channel, reopened when lost."""

    def __init__(self, url, queue):
        self.url = url
        self.queue = queue
        self.connection = None
        self.channel = None

    def publish(self, form_id, form):
        body = json.dumps(form).encode()
        properties = pika.BasicProperties(
            delivery_mode=2,  # persistent: written to disk before the confirm
            content_type="application/json",
            message_id=form_id,  # the idempotency key the workers insert by
        )
        for attempt in (1, 2):
            try:
                if self.connection is None:
                    self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
                    self.channel = self.connection.channel()
                    self.channel.confirm_delivery()
                    declare_queue(self.channel, self.queue)
                # Returns once the broker confirmed; raises if it did not.
                self.channel.basic_publish("", self.queue, body, properties, mandatory=True)
                return
            except pika.exceptions.AMQPError:
                # Lost connection, nack, unroutable: start again on a new
                # connection, once. The message may have been stored before
                # the connection broke; sending it again is safe, the workers
                # ignore a form id they have already inserted.
                self.close()
                if attempt == 2:
                    raise

    def keep_alive(self):
        """Answer heartbeats while no form comes in."""
        if self.connection is not None:
            try:
                self.connection.process_data_events(time_limit=0)
            except pika.exceptions.AMQPError:
                self.close()

    def close(self):
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except pika.exceptions.AMQPError:
                pass
        self.connection = None


class FormHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/forms":
            return self.answer(404, {"error": "POST forms to /forms"})
        length = int(self.headers.get("Content-Length") or 0)
        try:
            form = json.loads(self.rfile.read(length))
        except ValueError:
            return self.answer(400, {"error": "the body must be JSON"})
        if not isinstance(form, dict):
            return self.answer(400, {"error": "the body must be a JSON object"})
        # A browser that retries a post (no answer, a 503) sends the same
        # Idempotency-Key, so a form queued twice is still inserted once.
        form_id = self.headers.get("Idempotency-Key") or str(uuid.uuid4())
        try:
            self.server.publisher.publish(form_id, form)
        except pika.exceptions.AMQPError as error:
            return self.answer(503, {"error": "could not queue the form: %r" % error})
        self.answer(202, {"id": form_id})

    def answer(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # quiet: the workers tell the story


class FormServer(HTTPServer):
    """Single-threaded, so the one pika connection is only used by one thread."""

    def __init__(self, address, publisher):
        super().__init__(address, FormHandler)
        self.publisher = publisher

    def service_actions(self):
        self.publisher.keep_alive()  # called by serve_forever() twice a second


def make_server(url, queue, host="127.0.0.1", port=8080):
    return FormServer((host, port), Publisher(url, queue))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--queue", default="forms")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    server = make_server(args.url, args.queue, port=args.port)
    print("POST forms to http://127.0.0.1:%d/forms" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.publisher.close()


if __name__ == "__main__":
    main()
