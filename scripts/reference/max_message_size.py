#!/usr/bin/env python3
"""Publishes a message larger than max_message_size and records the close.

    REF_PORT=5673 python3 scripts/reference/max_message_size.py

Against the private RabbitMQ (scripts/rabbitmq.sh) it temporarily lowers
max_message_size to 4096 bytes through `scripts/rabbitmq.sh ctl eval` and
restores the previous value afterwards. With REF_SET_LIMIT=0 it does not touch
the broker configuration and assumes a limit of REF_MAX_MESSAGE_SIZE bytes.
"""

import os
import re
import subprocess

import pika.spec as spec

from amqp_raw import connected, describe

HERE = os.path.dirname(os.path.abspath(__file__))
RABBITMQ_SH = os.path.join(HERE, "..", "rabbitmq.sh")
LIMIT = int(os.environ.get("REF_MAX_MESSAGE_SIZE", "4096"))


def ctl_eval(expr):
    env = dict(os.environ, RABBITMQ_PORT=os.environ.get("REF_PORT", "5673"))
    out = subprocess.run([RABBITMQ_SH, "ctl", "eval", expr], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    return out


def main():
    set_limit = os.environ.get("REF_SET_LIMIT", "1") != "0"
    previous = None
    if set_limit:
        previous = ctl_eval("application:get_env(rabbit, max_message_size).")
        ctl_eval("application:set_env(rabbit, max_message_size, %d)." % LIMIT)
    try:
        # the limit is read when a channel starts, so open the channel now
        c = connected()
        c.publish(1, "", "whatever", b"x" * LIMIT)  # exactly the limit: accepted
        ok = c.call(1, spec.Queue.Declare(queue="", exclusive=True))
        print("body of exactly %d bytes -> accepted (next call answered %s)"
              % (LIMIT, ok.method.NAME))
        c.publish(1, "", "whatever", b"x" * (LIMIT + 1))
        r = describe(c.wait_close())
        print("body of %d bytes -> %s close %d %r class_id=%d method_id=%d"
              % (LIMIT + 1, r["scope"], r["reply_code"], r["reply_text"],
                 r["class_id"], r["method_id"]))
        c.close()
    finally:
        if set_limit and previous:
            m = re.search(r"\{ok,(\d+)\}", previous)
            if m:
                ctl_eval("application:set_env(rabbit, max_message_size, %s)." % m.group(1))
            else:
                ctl_eval("application:unset_env(rabbit, max_message_size).")
            print("restored max_message_size: %s"
                  % ctl_eval("application:get_env(rabbit, max_message_size)."))


if __name__ == "__main__":
    main()
