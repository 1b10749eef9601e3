"""Work queue, end to end: a web form posts JSON forms to one queue, three
competing workers insert them into SQLite, one worker is killed in the middle
of a form (inserted, not yet acknowledged) and another worker gets that form
again. At the end every form is in the database exactly once.

    python3 examples/work_queue/run.py

The broker is $WARREN_AMQP_URL (default amqp://guest:guest@localhost:5672/%2F).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pika

import webform
import worker

HERE = os.path.dirname(os.path.abspath(__file__))

PEOPLE = ["Ada", "Grace", "Alan", "Barbara", "Edsger", "Margaret", "Donald", "Frances", "Ken", "Radia"]


def show(line):
    """Prints a line in one write, so that the lines of several processes
    sharing a terminal do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting for " + what)
        time.sleep(0.02)


def post_form(port, form):
    """What the browser does: POST the form as JSON; returns the form's id."""
    request = urllib.request.Request(
        "http://127.0.0.1:%d/forms" % port,
        data=json.dumps(form).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["id"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=worker.DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--queue", default="forms")
    parser.add_argument("--db", help="SQLite database file (default: a new temporary one)")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    db_path = args.db or os.path.join(tempfile.mkdtemp(prefix="work-queue-"), "forms.db")
    db = worker.open_db(db_path)

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    worker.declare_queue(channel, args.queue)
    channel.queue_purge(args.queue)  # forms left over from an earlier run

    def consumers():
        return channel.queue_declare(args.queue, passive=True).method.consumer_count

    workers = {}
    server = None
    try:
        # worker-1 will be killed after inserting its first form, before its ack.
        for n in range(1, args.workers + 1):
            name = "worker-%d" % n
            command = [sys.executable, os.path.join(HERE, "worker.py"), "--url", args.url,
                       "--queue", args.queue, "--db", db_path, "--name", name]
            if n == 1:
                command += ["--die-before-ack", "1"]
            workers[name] = subprocess.Popen(command)
        wait_for(lambda: consumers() == args.workers, 15, "the workers to start")

        server = webform.make_server(args.url, args.queue, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        posted = {}
        for person in PEOPLE:
            form = {"name": person, "email": "%s@example.com" % person.lower(), "message": "Hello!"}
            form_id = post_form(server.server_address[1], form)
            posted[form_id] = form
            show("web form: %s posted form %s, queued and confirmed" % (person, form_id[:8]))

        def killed_form():
            """The form worker-1 died with, once another worker has handled it."""
            if workers["worker-1"].poll() is None:
                return None
            row = db.execute(
                "SELECT d.form_id, d.worker, d.inserted FROM deliveries d"
                " JOIN deliveries k ON k.form_id = d.form_id AND k.worker = 'worker-1'"
                " WHERE d.worker != 'worker-1'"
            ).fetchone()
            return row

        def all_done():
            count = db.execute("SELECT count(*) FROM forms").fetchone()[0]
            return count == len(posted) and killed_form() is not None

        wait_for(all_done, 20, "all forms to be inserted")
    finally:
        if server is not None:
            server.shutdown()
            server.publisher.close()
        for process in workers.values():
            process.terminate()
        for process in workers.values():
            process.wait()

    # Anything delivered but not acknowledged would be back in the queue now.
    left = channel.queue_declare(args.queue, passive=True).method.message_count
    connection.close()
    rows = {form_id: json.loads(data) for form_id, data in db.execute("SELECT id, data FROM forms")}
    deliveries = db.execute("SELECT count(*) FROM deliveries").fetchone()[0]
    form_id, taken_over_by, inserted_again = killed_form()
    db.close()

    show("")
    outcome = "inserted it" if inserted_again else "found it already inserted"
    show("worker-1 was killed holding form %s (exit status %d); %s got it again and %s"
         % (form_id[:8], workers["worker-1"].returncode, taken_over_by, outcome))
    show("%d forms posted, %d deliveries handled, %d rows in %s, %d messages left in the queue"
         % (len(posted), deliveries, len(rows), db_path, left))
    ok = rows == posted and left == 0
    show("every form is in the database exactly once" if ok else "MISMATCH between posted forms and rows")
    return {
        "ok": ok,
        "db": db_path,
        "posted": posted,
        "rows": rows,
        "killed_form": form_id,
        "taken_over_by": taken_over_by,
        "left_in_queue": left,
    }


if __name__ == "__main__":
    # A broker from this checkout when none listens at the default address.
    sys.path.insert(0, os.path.dirname(HERE))
    import local_broker  # noqa: E402

    sys.exit(0 if local_broker.run_example(main, worker.DEFAULT_URL) else 1)
