"""Request-reply, end to end: a search client sends requests through the
`search-requests` queue with reply_to and correlation_id, first with no
worker running (the requests time out), then to a pool of three search
workers, whose answers it matches to its requests; once with a reply queue
of its own, once with Direct Reply-To.

    python3 examples/request_reply/run.py

The broker is $WARREN_AMQP_URL (default amqp://guest:guest@localhost:5672/%2F).
"""

import argparse
import os
import subprocess
import sys
import time

from search_client import SearchClient
from search_worker import DEFAULT_URL

HERE = os.path.dirname(os.path.abspath(__file__))

QUERIES = ["rust", "python", "erlang", "haskell", "designing", "programming", "cobol"]


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--queue", default="search-requests")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=0.5, help="seconds to wait while no worker runs")
    args = parser.parse_args(argv)

    clients = {
        "reply queue": SearchClient(args.url, args.queue),
        "Direct Reply-To": SearchClient(args.url, args.queue, direct=True),
    }
    clients["reply queue"].channel.queue_purge(args.queue)  # requests left over from an earlier run
    show("client with a reply queue: replies to %s" % clients["reply queue"].reply_to)
    show("client with Direct Reply-To: replies to %s" % clients["Direct Reply-To"].reply_to)

    show("--- no search worker is running")
    unanswered = {}
    for label, client in clients.items():
        started = time.monotonic()
        unanswered[label] = client.search_many(["rust"], timeout=args.timeout)
        show("%s: 'rust' -> %s after %.2f s" % (
            label, "no answer" if unanswered[label] == [None] else unanswered[label],
            time.monotonic() - started))

    show("--- %d search workers start" % args.workers)
    workers = []
    answered = {}
    try:
        for n in range(1, args.workers + 1):
            workers.append(subprocess.Popen([
                sys.executable, os.path.join(HERE, "search_worker.py"),
                "--url", args.url, "--queue", args.queue, "--name", "worker-%d" % n,
            ]))
        client = clients["reply queue"]
        wait_for(lambda: client.workers() == args.workers, 15, "the workers to start")

        for label, client in clients.items():
            show("--- %d requests at once, answers by %s" % (len(QUERIES), label))
            answers = client.search_many(QUERIES, timeout=5)
            answered[label] = list(zip(QUERIES, answers))
            for query, answer in answered[label]:
                if answer is None:
                    show("%s: %r -> no answer" % (label, query))
                else:
                    show("%s: %r -> %s (%s)" % (label, query, answer["results"], answer["worker"]))
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait()
        ignored = {label: client.ignored for label, client in clients.items()}
        for client in clients.values():
            client.close()

    ok = all(answers == [None] for answers in unanswered.values()) and all(
        answer is not None and answer["query"] == query
        for pairs in answered.values() for query, answer in pairs
    )
    show("")
    show("timed out while no worker ran; then every answer matched its request" if ok else "MISMATCH")
    return {"ok": ok, "unanswered": unanswered, "answered": answered, "ignored": ignored}


if __name__ == "__main__":
    # A broker from this checkout when none listens at the default address.
    sys.path.insert(0, os.path.dirname(HERE))
    import local_broker  # noqa: E402

    sys.exit(0 if local_broker.run_example(main, DEFAULT_URL) else 1)
