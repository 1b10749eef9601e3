"""A worker of the work queue: takes submitted forms off the queue one at a
time, inserts each into the SQLite database, and acknowledges it only once
the row is committed. Start as many as you like; they compete for the forms.

    python3 examples/work_queue/worker.py --db forms.db --name worker-1

A form can arrive twice (its first worker died after the insert but before
the ack, so the broker gave it to another one). The insert is keyed on the
form's id (the message_id the web form set), so the second copy changes
nothing: at-least-once delivery, exactly-once effect.
"""

import argparse
import json
import os
import signal
import sqlite3
import sys

import pika

DEFAULT_URL = os.environ.get("WARREN_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")

SCHEMA = """
CREATE TABLE IF NOT EXISTS forms (
    id TEXT PRIMARY KEY,     -- the form's id: the message_id set by the web form
    data TEXT NOT NULL,      -- the form as posted (JSON)
    worker TEXT NOT NULL     -- who inserted it
);
-- Every delivery a worker handled, so the demo can show what happened.
CREATE TABLE IF NOT EXISTS deliveries (
    form_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    redelivered INTEGER NOT NULL,
    inserted INTEGER NOT NULL
);
"""


def show(line):
    """Prints a line in one write, so that the lines of several processes
    sharing a terminal do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def open_db(path):
    db = sqlite3.connect(path, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")  # several worker processes write at once
    db.executescript(SCHEMA)
    return db


def declare_queue(channel, queue):
    """The work queue: durable, so queued forms survive a broker restart."""
    channel.queue_declare(queue, durable=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--queue", default="forms")
    parser.add_argument("--db", default="forms.db", help="SQLite database file")
    parser.add_argument("--name", default="worker-%d" % os.getpid())
    parser.add_argument(
        "--die-before-ack", type=int, metavar="N", default=0,
        help="for the demo: be killed (SIGKILL) after inserting the Nth form, before acknowledging it",
    )
    args = parser.parse_args(argv)

    db = open_db(args.db)
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    declare_queue(channel, args.queue)
    # One unacknowledged form at a time: a busy worker gets no more until it
    # is done, and a dying worker takes only one form down with it.
    channel.basic_qos(prefetch_count=1)
    handled = 0

    def on_form(ch, method, properties, body):
        nonlocal handled
        form_id = properties.message_id
        try:
            data = body.decode()
            json.loads(data)
        except ValueError:  # also UnicodeDecodeError
            form_id = None
        if not form_id:
            # Without an id or as broken JSON it can never be inserted:
            # dropped (or dead-lettered, with x-dead-letter-exchange).
            show("%s: dropped a message that is not a form" % args.name)
            ch.basic_reject(method.delivery_tag, requeue=False)
            return
        with db:  # one transaction: the row and the log entry, or neither
            inserted = db.execute(
                "INSERT OR IGNORE INTO forms (id, data, worker) VALUES (?, ?, ?)",
                (form_id, data, args.name),
            ).rowcount
            db.execute(
                "INSERT INTO deliveries (form_id, worker, redelivered, inserted) VALUES (?, ?, ?, ?)",
                (form_id, args.name, int(method.redelivered), inserted),
            )
        handled += 1
        again = " (redelivered)" if method.redelivered else ""
        if inserted:
            show("%s: inserted form %s%s" % (args.name, form_id[:8], again))
        else:
            show("%s: form %s%s is already in the database, nothing to do" % (args.name, form_id[:8], again))
        if handled == args.die_before_ack:
            show("%s: killed before acknowledging form %s" % (args.name, form_id[:8]))
            os.kill(os.getpid(), signal.SIGKILL)
        ch.basic_ack(method.delivery_tag)

    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True  # finish the form in hand, then leave

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    channel.basic_consume(args.queue, on_form)
    show("%s: waiting for forms on queue %r" % (args.name, args.queue))
    while not stopping:
        connection.process_data_events(time_limit=0.2)
    connection.close()  # a form delivered but not acknowledged goes back to the queue


if __name__ == "__main__":
    main()
