#!/usr/bin/env python3
"""Direct Reply-To details: rewritten reply_to format, the reply delivery's
fields, and how publishes to amq.rabbitmq.reply-to.* names are confirmed.

    REF_PORT=5673 python3 scripts/reference/direct_reply_to.py
"""

import os

import pika
import pika.exceptions

URL = "amqp://guest:guest@%s:%s/%%2F" % (os.environ.get("REF_HOST", "127.0.0.1"),
                                        os.environ.get("REF_PORT", "5673"))


def main():
    p = pika.URLParameters(URL)
    c = pika.BlockingConnection(p)
    ch = c.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    got = []
    tag = ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: got.append(a), auto_ack=True)
    print("consume-ok consumer_tag (client-chosen by pika):", tag)
    ok = ch.queue_declare("amq.rabbitmq.reply-to", passive=True).method
    print("passive declare amq.rabbitmq.reply-to -> queue=%r message_count=%d consumer_count=%d"
          % (ok.queue, ok.message_count, ok.consumer_count))
    ch.basic_publish("", q, b"req", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    m, props, _ = ch.basic_get(q, auto_ack=True)
    print("rewritten reply_to (%d chars): %s" % (len(props.reply_to), props.reply_to))

    ch.basic_publish("", props.reply_to, b"r1")
    c.process_data_events(time_limit=0.5)
    d = got[0][1]
    print("reply delivery: consumer_tag=%s delivery_tag=%d exchange=%r redelivered=%s "
          "routing_key=<rewritten name>=%s" % (d.consumer_tag, d.delivery_tag, d.exchange,
                                               d.redelivered, d.routing_key == props.reply_to))

    c2 = pika.BlockingConnection(p)
    ch2 = c2.channel()
    ch2.confirm_delivery()
    try:
        ch2.basic_publish("", props.reply_to, b"r2", mandatory=True)
        print("mandatory publish to live reply-to name -> confirmed, no return")
    except pika.exceptions.UnroutableError as e:
        print("mandatory publish to live reply-to name -> basic.return %s"
              % [(x.method.reply_code, x.method.reply_text) for x in e.messages])
    before = len(got)
    c.process_data_events(time_limit=0.5)
    print("  ... and the reply was delivered anyway:", len(got) > before)
    print("non-mandatory publish to live name -> basic.ack (%s)"
          % (ch2.basic_publish("", props.reply_to, b"r3") is None))
    ch.basic_cancel(tag)
    c.process_data_events(time_limit=0.2)
    print("after basic.cancel, publish to old name -> acked silently (%s)"
          % (ch2.basic_publish("", props.reply_to, b"r4") is None))
    c.close()
    print("after reply connection closed, publish to old name -> acked silently (%s)"
          % (ch2.basic_publish("", props.reply_to, b"r5") is None))
    try:
        ch2.basic_publish("", "amq.rabbitmq.reply-to.bogus", b"r6", mandatory=True)
        print("mandatory publish to malformed reply-to name -> confirmed")
    except pika.exceptions.UnroutableError as e:
        print("mandatory publish to malformed reply-to name -> basic.return %s"
              % [(x.method.reply_code, x.method.reply_text) for x in e.messages])
    print("channel still open:", ch2.is_open)
    c2.close()


if __name__ == "__main__":
    main()
