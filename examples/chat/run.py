"""Real-time chat, end to end: four participants in two rooms (eve reads
every room), a short conversation where each line is answered only after it
arrived, a burst of lines from one participant, and bob leaving (his queue
disappears; he gets nothing said after he left).

    python3 examples/chat/run.py

The broker is $WARREN_AMQP_URL (default amqp://guest:guest@localhost:5672/%2F).
"""

import argparse
import os
import re
import subprocess
import sys
import threading
import time

import pika
import pika.exceptions

from chat import DEFAULT_URL

HERE = os.path.dirname(os.path.abspath(__file__))

PARTICIPANTS = {"alice": ["rust", "random"], "bob": ["rust"], "carol": ["random"], "eve": ["*"]}

CONVERSATION = [
    ("alice", "rust", "has anyone tried the new borrow checker?"),
    ("bob", "rust", "yes, it finally accepts my code"),
    ("carol", "random", "lunch?"),
    ("alice", "random", "yes! in 5 minutes"),
    ("bob", "rust", "alice: see you after lunch then"),
]


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
        time.sleep(0.002)


def wait_until_deleted(url, queue, timeout=5):
    """Whether `queue` is gone (passive declare: 404) within `timeout` s."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                connection.channel().queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code == 404:
                    return True
                raise
            time.sleep(0.02)
        return False
    finally:
        connection.close()


class Participant:
    """A chat.py process: we type into its input and read what it shows."""

    def __init__(self, name, rooms, url, exchange):
        self.name = name
        self.rooms = rooms
        self.seen = []  # (room, from, text), in the order shown
        self.echo = True  # show what it sees as it comes
        self.queue = None
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "chat.py"), name, *rooms,
             "--url", url, "--exchange", exchange],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            message = re.match(r"#(\S+) <([^>]+)> (.*)", line.rstrip("\n"))
            if message:
                self.seen.append(message.groups())
                if self.echo:
                    show("%-6s sees %s" % (self.name, line.rstrip("\n")))
            ready = re.search(r"\(queue (\S+)\)", line)
            if ready:
                self.queue = ready.group(1)
                show(line.rstrip("\n"))

    def wait_ready(self):
        wait_for(lambda: self.queue or self.process.poll() is not None, 15, self.name)
        if not self.queue:
            raise RuntimeError("%s exited with status %d" % (self.name, self.process.returncode))

    def type(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def is_in(self, room):
        return room in self.rooms or "*" in self.rooms

    def quit(self):
        if self.process.poll() is None:
            self.type("/quit")
        self.process.wait()
        self.reader.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default: $WARREN_AMQP_URL)")
    parser.add_argument("--exchange", default="chat")
    args = parser.parse_args(argv)

    people = {name: Participant(name, rooms, args.url, args.exchange) for name, rooms in PARTICIPANTS.items()}
    said = []  # (room, from, text, who was there to hear it)
    latencies = []
    try:
        for person in people.values():
            person.wait_ready()
        present = dict(people)

        def say(name, room, text, wait=True):
            audience = [p for p in present.values() if p.is_in(room)]
            expected = {p.name: len(p.seen) + 1 for p in audience}
            said.append((room, name, text, [p.name for p in audience]))
            sent = time.monotonic()
            people[name].type("#%s %s" % (room, text))
            if wait:  # a conversation: nobody answers before the line arrived
                wait_for(lambda: all(len(p.seen) >= expected[p.name] for p in audience), 5, "%r" % text)
                latencies.append(time.monotonic() - sent)

        show("--- a conversation")
        for name, room, text in CONVERSATION:
            say(name, room, text)

        show("--- bob pastes 20 lines at once")
        for person in people.values():
            person.echo = False
        for n in range(1, 21):
            say("bob", "rust", "line %d of my stack trace" % n, wait=False)

        def heard_everything(p):
            return len(p.seen) >= sum(1 for _, _, _, audience in said if p.name in audience)

        wait_for(lambda: all(heard_everything(p) for p in present.values()), 5, "the burst")
        for person in people.values():
            lines = [text for room, sender, text in person.seen if text.endswith("of my stack trace")]
            if lines:
                show("%-6s sees the 20 lines: %s ... %s" % (person.name, lines[0], lines[-1]))
            person.echo = True

        show("--- bob leaves")
        present.pop("bob").quit()
        bob_queue_gone = wait_until_deleted(args.url, people["bob"].queue)
        show("bob's queue %s: %s" % (people["bob"].queue, "deleted" if bob_queue_gone else "STILL THERE"))
        say("alice", "rust", "bye bob")
        wait_for(lambda: all(heard_everything(p) for p in present.values()), 5, "the last line")
    finally:
        for person in people.values():
            person.quit()

    show("")
    ok = bob_queue_gone
    for person in people.values():
        expected = [(room, sender, text) for room, sender, text, audience in said if person.name in audience]
        good = person.seen == expected
        ok = ok and good
        show("%-6s %-5s saw %d lines of %s" % (
            person.name, "ok" if good else "WRONG", len(person.seen),
            ", ".join("#" + room for room in person.rooms)))
    show("conversation lines arrived in %.0f ms at most" % (1000 * max(latencies)))
    show("everyone saw exactly the lines of their rooms, in order" if ok else "MISMATCH")
    return {
        "ok": ok,
        "said": said,
        "seen": {name: person.seen for name, person in people.items()},
        "bob_queue_gone": bob_queue_gone,
        "latencies": latencies,
    }


if __name__ == "__main__":
    # A broker from this checkout when none listens at the default address.
    sys.path.insert(0, os.path.dirname(HERE))
    import local_broker  # noqa: E402

    sys.exit(0 if local_broker.run_example(main, DEFAULT_URL) else 1)
